//! The engine's memory: interned nodes, and one compact entry per unordered
//! pair of them holding the link's two reported sides, its cost and the pair's
//! path decision.
//!
//! Node names are interned once; a pair is two `u32` ids and lives at a fixed
//! index of a triangular table (`hi * (hi - 1) / 2 + lo`), so a new node
//! appends one row and per-pair state carries no strings: about 48 bytes a
//! pair (36 MB at 1,000 nodes, 216 MB at 3,000). Explanations and views are
//! built from this when asked. This module knows nothing of how decisions are
//! made.

use rustc_hash::FxHashMap;
use skymesh_wire::LinkSample;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// A node's index in the table. Reused after the node has left and no
/// decision refers to it any more.
pub(super) type Id = u32;

/// A route of a pair, packed: [`DIRECT`], [`NO_ROUTE`] or a transit's id.
pub(super) type Route = u32;
pub(super) const DIRECT: Route = u32::MAX;
pub(super) const NO_ROUTE: Route = u32::MAX - 1;

/// One node as the engine knows it.
#[derive(Debug)]
pub(super) struct Node {
    pub(super) name: Arc<str>,
    pub(super) transit: bool,
    /// False from its removal until the next recompute has re-decided every
    /// pair that went through it; its id is free after that.
    pub(super) member: bool,
    /// Its control session is up: what it reported stays current until the
    /// session ends, however long it stays silent (agents send changes only).
    pub(super) live: bool,
    /// When it last reported anything, or its session ended.
    pub(super) heard_at: Option<Instant>,
    /// Its reports count: it is live, or was heard within `stale_after`.
    pub(super) fresh: bool,
    /// Tells a stale timer set before the latest report from a current one.
    pub(super) stale_gen: u32,
}

/// The nodes by id and by name.
#[derive(Debug, Default)]
pub(super) struct Nodes {
    slots: Vec<Option<Node>>,
    /// Members in name order (views, path lists) and by name (reports).
    by_name: BTreeMap<Arc<str>, Id>,
    index: FxHashMap<Arc<str>, Id>,
    free: Vec<Id>,
    /// Transit members, sorted by name: the candidates of every pair, in the
    /// order that breaks cost ties.
    transits: Vec<Id>,
}

impl Nodes {
    /// Ids handed out so far (members, leaving nodes and free ids).
    pub(super) fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn get(&self, id: Id) -> Option<&Node> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    pub(super) fn get_mut(&mut self, id: Id) -> Option<&mut Node> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// The node's name; "?" for an id that is free (never shown: decisions
    /// refer only to members and leaving nodes).
    pub(super) fn name(&self, id: Id) -> &str {
        self.get(id).map_or("?", |n| &n.name)
    }

    pub(super) fn is_member(&self, id: Id) -> bool {
        self.get(id).is_some_and(|n| n.member)
    }

    pub(super) fn is_transit(&self, id: Id) -> bool {
        self.get(id).is_some_and(|n| n.member && n.transit)
    }

    /// The member of that name.
    pub(super) fn id(&self, name: &str) -> Option<Id> {
        self.index.get(name).copied()
    }

    /// Members sorted by name.
    pub(super) fn members(&self) -> impl Iterator<Item = (&str, Id)> + '_ {
        self.by_name.iter().map(|(n, id)| (&**n, *id))
    }

    pub(super) fn member_count(&self) -> usize {
        self.by_name.len()
    }

    pub(super) fn transits(&self) -> &[Id] {
        &self.transits
    }

    /// Takes a new member in; returns its id and whether the id is reused
    /// (its pairs must then be reset).
    pub(super) fn insert(&mut self, name: &str, transit: bool) -> (Id, bool) {
        let name: Arc<str> = Arc::from(name);
        let node = Node {
            name: name.clone(),
            transit,
            member: true,
            live: false,
            heard_at: None,
            fresh: false,
            stale_gen: 0,
        };
        let (id, reused) = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(node);
                (id, true)
            }
            None => {
                self.slots.push(Some(node));
                ((self.slots.len() - 1) as Id, false)
            }
        };
        self.by_name.insert(name.clone(), id);
        self.index.insert(name, id);
        if transit {
            self.sort_transits();
        }
        (id, reused)
    }

    /// Marks a member as leaving: no longer found by name nor a candidate.
    pub(super) fn leave(&mut self, id: Id) {
        let Some(node) = self.get_mut(id) else {
            return;
        };
        node.member = false;
        let name = node.name.clone();
        let was_transit = node.transit;
        if self.by_name.get(&name) == Some(&id) {
            self.by_name.remove(&name);
            self.index.remove(&name);
        }
        if was_transit {
            self.sort_transits();
        }
    }

    /// Frees a left node's id for reuse.
    pub(super) fn free(&mut self, id: Id) {
        if let Some(slot) = self.slots.get_mut(id as usize) {
            if slot.as_ref().is_some_and(|n| !n.member) {
                *slot = None;
                self.free.push(id);
            }
        }
    }

    pub(super) fn set_transit(&mut self, id: Id, transit: bool) {
        if let Some(n) = self.get_mut(id) {
            n.transit = transit;
        }
        self.sort_transits();
    }

    fn sort_transits(&mut self) {
        self.transits = self
            .by_name
            .values()
            .copied()
            .filter(|id| self.is_transit(*id))
            .collect();
    }
}

/// The table index of the pair `{a, b}`, `a != b`.
pub(super) fn slot(a: Id, b: Id) -> usize {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let hi = hi as usize;
    hi * (hi - 1) / 2 + lo as usize
}

/// Entries a table needs for `ids` ids.
pub(super) fn table_len(ids: usize) -> usize {
    ids * ids.saturating_sub(1) / 2
}

/// What each end of a link last reported about it (the lower id's report is
/// side 0), and flags of the pair.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sides {
    pub(super) rtt_us: [u32; 2],
    pub(super) jitter_us: [u32; 2],
    pub(super) loss_ppm: [u32; 2],
    pub(super) flags: u8,
}

pub(super) const PRESENT: [u8; 2] = [1, 2];
pub(super) const UP: [u8; 2] = [4, 8];
/// The link has an override or a configured weight: look it up.
pub(super) const ADJUSTED: u8 = 16;
/// The pair is queued for a decision.
pub(super) const DIRTY: u8 = 32;
/// The pair has an entry in the engine's challengers (so that a pair without
/// one costs no lookup).
pub(super) const CHALLENGED: u8 = 64;

impl Sides {
    pub(super) fn has(&self, side: usize) -> bool {
        self.flags & PRESENT[side] != 0
    }

    /// Whether `s` is worth taking over the side's current sample.
    pub(super) fn differs(&self, side: usize, s: &LinkSample) -> bool {
        if !self.has(side) {
            return true;
        }
        let held = LinkSample {
            peer: String::new(),
            up: self.flags & UP[side] != 0,
            rtt_us: self.rtt_us[side],
            jitter_us: self.jitter_us[side],
            loss_ppm: self.loss_ppm[side],
        };
        s.differs_materially(&held)
    }

    pub(super) fn set(&mut self, side: usize, s: &LinkSample) {
        self.rtt_us[side] = s.rtt_us;
        self.jitter_us[side] = s.jitter_us;
        self.loss_ppm[side] = s.loss_ppm;
        self.flags |= PRESENT[side];
        if s.up {
            self.flags |= UP[side];
        } else {
            self.flags &= !UP[side];
        }
    }

    pub(super) fn clear(&mut self, side: usize) {
        self.flags &= !(PRESENT[side] | UP[side]);
        self.rtt_us[side] = 0;
        self.jitter_us[side] = 0;
        self.loss_ppm[side] = 0;
    }
}

/// The decision about one pair, kept between recomputes: 16 bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct PairState {
    pub(super) primary: Route,
    pub(super) backup: Route,
    /// When the primary came into use, in tenths of a second since the
    /// engine's epoch.
    pub(super) since_ds: u32,
    /// Changes of the primary (low 30 bits), [`CHOSEN`], [`DECIDED`].
    meta: u32,
}

/// A usable path has been chosen; until then the primary is a placeholder
/// that any usable path replaces at once.
const CHOSEN: u32 = 1 << 31;
/// Decided at least once.
const DECIDED: u32 = 1 << 30;
const CHANGES: u32 = DECIDED - 1;

impl Default for PairState {
    fn default() -> Self {
        Self {
            primary: DIRECT,
            backup: NO_ROUTE,
            since_ds: 0,
            meta: 0,
        }
    }
}

impl PairState {
    pub(super) fn chosen(&self) -> bool {
        self.meta & CHOSEN != 0
    }

    pub(super) fn set_chosen(&mut self, chosen: bool) {
        if chosen {
            self.meta |= CHOSEN;
        } else {
            self.meta &= !CHOSEN;
        }
    }

    pub(super) fn decided(&self) -> bool {
        self.meta & DECIDED != 0
    }

    pub(super) fn set_decided(&mut self) {
        self.meta |= DECIDED;
    }

    pub(super) fn changes(&self) -> u64 {
        u64::from(self.meta & CHANGES)
    }

    pub(super) fn count_change(&mut self) {
        if self.meta & CHANGES != CHANGES {
            self.meta += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dense_and_unique_in_either_order() {
        let n = 50;
        let mut seen = vec![false; table_len(n)];
        for hi in 1..n as Id {
            for lo in 0..hi {
                assert_eq!(slot(lo, hi), slot(hi, lo));
                let s = slot(lo, hi);
                assert!(!seen[s], "slot {s} twice");
                seen[s] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(std::mem::size_of::<PairState>(), 16);
        assert_eq!(std::mem::size_of::<Sides>(), 28);
    }
}
