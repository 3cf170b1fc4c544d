//! The authenticated control sessions of one controller: at most one per node,
//! and at most [`cap`] in all.
//!
//! A newer session of a node replaces its older one: the caller closes the
//! older connection before the newer one reads a byte, so a node's
//! certificate opens one buffer on the controller however many connections it
//! makes. Replaced sessions count against the cap until their task has ended,
//! so a burst of reconnects cannot stack up memory behind the table's back.
//! Owns no IO: it hands back the connection to close and the caller closes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Sessions beyond twice the enrolled nodes that the cap leaves room for: a
/// controller that has not loaded its nodes yet, nodes enrolled a moment ago.
const MARGIN: usize = 64;

/// The most sessions open at once with `enrolled` nodes: twice as many (a
/// replaced session of each still closing) and a margin.
pub(crate) fn cap(enrolled: usize) -> usize {
    enrolled.saturating_mul(2).saturating_add(MARGIN)
}

/// The table; `C` is what closes a session (a QUIC connection).
pub(crate) struct Sessions<C> {
    table: Mutex<Table<C>>,
}

struct Table<C> {
    next_id: u64,
    /// The current session of each node.
    live: HashMap<String, (u64, C)>,
    /// Replaced sessions whose task has not ended yet.
    leaving: usize,
}

/// What [`Sessions::admit`] decided.
pub(crate) enum Admission<C> {
    /// Go on; close `replaced` (the node's older session) first.
    Admitted {
        ticket: Ticket<C>,
        replaced: Option<C>,
    },
    /// At the cap: close the newcomer without reading from it.
    AtCap { open: usize, cap: usize },
}

/// A session's place in the table, given back when dropped.
pub(crate) struct Ticket<C> {
    sessions: Arc<Sessions<C>>,
    node: String,
    id: u64,
}

impl<C> Sessions<C> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table {
                next_id: 0,
                live: HashMap::new(),
                leaving: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table<C>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sessions open now, replaced ones still closing included.
    pub(crate) fn open(&self) -> usize {
        let t = self.lock();
        t.live.len() + t.leaving
    }

    /// Takes a new session of `node` in, with `enrolled` nodes in the mesh.
    pub(crate) fn admit(self: &Arc<Self>, node: &str, conn: C, enrolled: usize) -> Admission<C> {
        let mut t = self.lock();
        let open = t.live.len() + t.leaving;
        let cap = cap(enrolled);
        if open >= cap {
            return Admission::AtCap { open, cap };
        }
        t.next_id += 1;
        let id = t.next_id;
        let replaced = t.live.insert(node.to_string(), (id, conn)).map(|(_, c)| c);
        if replaced.is_some() {
            t.leaving += 1;
        }
        Admission::Admitted {
            ticket: Ticket {
                sessions: self.clone(),
                node: node.to_string(),
                id,
            },
            replaced,
        }
    }
}

impl<C> Drop for Ticket<C> {
    fn drop(&mut self) {
        let mut t = self.sessions.lock();
        if t.live.get(&self.node).is_some_and(|(id, _)| *id == self.id) {
            t.live.remove(&self.node);
        } else {
            t.leaving = t.leaving.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(a: Admission<u32>) -> (Ticket<u32>, Option<u32>) {
        match a {
            Admission::Admitted { ticket, replaced } => (ticket, replaced),
            Admission::AtCap { open, cap } => panic!("refused at {open}/{cap}"),
        }
    }

    #[test]
    fn a_newer_session_of_a_node_replaces_the_older_one() {
        let s = Sessions::new();
        let (first, replaced) = admitted(s.admit("a", 1, 1));
        assert_eq!(replaced, None);
        let (second, replaced) = admitted(s.admit("a", 2, 1));
        assert_eq!(
            replaced,
            Some(1),
            "the older connection is handed back to close"
        );
        assert_eq!(s.open(), 2, "the replaced one counts until it has gone");
        drop(first);
        assert_eq!(s.open(), 1);
        // The older one ending does not remove the newer.
        let (_third, replaced) = admitted(s.admit("b", 3, 1));
        assert_eq!(replaced, None);
        assert_eq!(s.open(), 2);
        drop(second);
        assert_eq!(s.open(), 1);
    }

    #[test]
    fn sessions_beyond_the_cap_are_refused_and_room_comes_back() {
        let s = Sessions::new();
        let cap = cap(0);
        let tickets: Vec<_> = (0..cap)
            .map(|i| admitted(s.admit(&format!("n{i}"), 0, 0)).0)
            .collect();
        assert!(matches!(
            s.admit("late", 0, 0),
            Admission::AtCap { open, cap: c } if open == cap && c == cap
        ));
        // More nodes enrolled: more room.
        let (_late, _) = admitted(s.admit("late", 0, 1));
        drop(tickets);
        assert_eq!(s.open(), 1);
    }
}
