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
    /// Its session is up and has reported no link yet: its pairs wait (see
    /// [`PathEngine::set_live`](super::PathEngine::set_live)).
    pub(super) awaiting: bool,
    /// Tells the timer of the current wait from one of an earlier session.
    pub(super) await_gen: u32,
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

    /// [`name`](Self::name), shared.
    pub(super) fn shared_name(&self, id: Id) -> Arc<str> {
        self.get(id)
            .map_or_else(|| Arc::from("?"), |n| n.name.clone())
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
            awaiting: false,
            await_gen: 0,
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

/// Entries per chunk of a [`Chunked`] table.
const CHUNK_BITS: u32 = 14;
const CHUNK: usize = 1 << CHUNK_BITS;

/// A growable array in chunks of [`CHUNK`] entries. A new id appends its
/// slots at the end of the triangle, so the table grows by chunks and never
/// copies what it holds: no moment with two copies of a table of N² entries
/// (a `Vec` doubling from 24 to 48 MiB held 72), and no room reserved ahead
/// beyond one chunk.
#[derive(Debug, Clone)]
pub(super) struct Chunked<T> {
    chunks: Vec<Box<[T]>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Copy> Chunked<T> {
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Grows to `len` entries, the new ones `value` (never shrinks).
    pub(super) fn grow(&mut self, len: usize, value: T) {
        // The old last chunk's entries past the old length are set here; new
        // chunks come filled.
        let room = len.min(self.chunks.len() * CHUNK);
        for i in self.len..room {
            self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)] = value;
        }
        while self.chunks.len() * CHUNK < len {
            self.chunks.push(vec![value; CHUNK].into_boxed_slice());
        }
        self.len = self.len.max(len);
    }
}

impl<T> std::ops::Index<usize> for Chunked<T> {
    type Output = T;

    #[inline]
    fn index(&self, i: usize) -> &T {
        debug_assert!(i < self.len, "slot {i} beyond the table's {}", self.len);
        &self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

impl<T> std::ops::IndexMut<usize> for Chunked<T> {
    #[inline]
    fn index_mut(&mut self, i: usize) -> &mut T {
        debug_assert!(i < self.len, "slot {i} beyond the table's {}", self.len);
        &mut self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

/// What each end of a link last reported about it (the lower id's report is
/// side 0), and flags of the pair.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sides {
    pub(super) rtt_us: [u32; 2],
    pub(super) loss_ppm: [u32; 2],
    /// Jitter in units of [`JITTER_UNIT_US`], saturating at ~655 ms: it is
    /// only shown, never chosen by, and a whole u32 per side would make the
    /// entry 28 bytes instead of 24.
    jitter: [u16; 2],
    pub(super) flags: u8,
}

/// The unit of [`Sides`]' jitter, in microseconds.
pub(super) const JITTER_UNIT_US: u32 = 10;

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
            jitter_us: self.jitter_us(side),
            loss_ppm: self.loss_ppm[side],
        };
        s.differs_materially(&held)
    }

    /// The side's jitter, to [`JITTER_UNIT_US`].
    pub(super) fn jitter_us(&self, side: usize) -> u32 {
        u32::from(self.jitter[side]) * JITTER_UNIT_US
    }

    pub(super) fn set(&mut self, side: usize, s: &LinkSample) {
        self.rtt_us[side] = s.rtt_us;
        self.jitter[side] = u16::try_from(s.jitter_us.div_ceil(JITTER_UNIT_US)).unwrap_or(u16::MAX);
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
        self.jitter[side] = 0;
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
        assert_eq!(std::mem::size_of::<Sides>(), 24);
    }

    #[test]
    fn a_chunked_table_grows_without_moving_or_changing_entries() {
        let mut t: Chunked<u32> = Chunked::default();
        t.grow(10, 7);
        t[3] = 3;
        let first = &t[0] as *const u32;
        t.grow(3 * CHUNK + 5, 9);
        assert_eq!(t.len(), 3 * CHUNK + 5);
        assert_eq!(&t[0] as *const u32, first, "grown by copying");
        assert_eq!(
            (t[3], t[9], t[10], t[CHUNK], t[3 * CHUNK + 4]),
            (3, 7, 9, 9, 9)
        );
        t[CHUNK + 1] = 1;
        // Never shrinks; a smaller length changes nothing.
        t.grow(4, 0);
        assert_eq!((t.len(), t[3], t[CHUNK + 1]), (3 * CHUNK + 5, 3, 1));
        // Jitter is kept to 10 µs, saturating.
        let mut sides = Sides::default();
        let mut s = LinkSample {
            peer: String::new(),
            up: true,
            rtt_us: 1,
            jitter_us: 301,
            loss_ppm: 0,
        };
        sides.set(1, &s);
        assert_eq!(sides.jitter_us(1), 310);
        s.jitter_us = u32::MAX;
        sides.set(0, &s);
        assert_eq!(sides.jitter_us(0), 655_350);
    }
}
