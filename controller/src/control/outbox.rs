//! What is waiting to go to one agent: changes merged as they queue, so an
//! agent that reads slowly gets one update with the latest of everything
//! instead of a backlog, and is never dropped for being slow.
//!
//! The hub pushes changes ([`Outbox::peer`], [`Outbox::path`], ...) and the
//! session's writer takes them all at once ([`Outbox::take`]) whenever it can
//! write. A peer changed ten times while the agent was busy is sent once; the
//! queue holds at most one entry per peer and per destination, so its memory
//! is bounded by the mesh, not by how far behind the agent is. Owns no IO.

use crate::fabric::PeerJson;
use crate::paths::SharedPath;
use serde::Serialize;
use serde_json::value::RawValue;
use skymesh_wire::control::{self, FrameError, RefusalCode, SelfInfo};
use skymesh_wire::PathSpec;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Path changes an outbox holds; one more makes it send the whole list.
pub(crate) const PATH_CHANGES_MAX: usize = 256;

/// One agent's queue.
#[derive(Debug)]
pub(crate) struct Outbox {
    pending: Mutex<Pending>,
    ready: Notify,
    /// What the agent announced ([`control::CAPABILITY`]).
    capability: u32,
}

/// Everything not yet taken by the writer, merged.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// Store revision of the newest change queued.
    pub(crate) seq: u64,
    /// The agent needs its whole netmap: what was queued before is in it.
    pub(crate) full: bool,
    /// The agent needs its whole path list (after the warm-up, or an agent of
    /// capability 0 whose paths changed).
    pub(crate) whole_paths: bool,
    pub(crate) node: Option<SelfInfo>,
    /// Peer name → its new entry, or `None` for a removal.
    pub(crate) peers: BTreeMap<String, Option<PeerJson>>,
    /// Destination → its new path (names shared with the path engine).
    pub(crate) paths: BTreeMap<Arc<str>, SharedPath>,
    pub(crate) close: Option<(RefusalCode, String)>,
}

impl Outbox {
    /// An empty queue; the hub queues the whole netmap first
    /// ([`full`](Self::full)) when it takes the session in.
    pub(crate) fn new(capability: u32) -> Self {
        Self {
            pending: Mutex::new(Pending::default()),
            ready: Notify::new(),
            capability,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, seq: u64, change: impl FnOnce(&mut Pending)) {
        {
            let mut p = self.lock();
            p.seq = p.seq.max(seq);
            change(&mut p);
        }
        self.ready.notify_one();
    }

    /// The agent needs its whole netmap.
    pub(crate) fn full(&self, seq: u64) {
        self.push(seq, |p| p.full = true);
    }

    /// A peer's entry changed (`None`: it left).
    pub(crate) fn peer(&self, seq: u64, name: &str, entry: Option<PeerJson>) {
        self.push(seq, |p| {
            // A whole netmap due will carry it.
            if !p.full {
                p.peers.insert(name.to_string(), entry);
            }
        });
    }

    /// What the node is told about itself changed.
    pub(crate) fn self_info(&self, seq: u64, info: SelfInfo) {
        self.push(seq, |p| p.node = Some(info));
    }

    /// The path to one destination changed. Past [`PATH_CHANGES_MAX`]
    /// queued changes the whole path list is sent instead, rendered when the
    /// writer is ready: a mass switch (hundreds of thousands of pairs whose
    /// hold ends together) then costs each outbox a flag, not an entry per
    /// change.
    pub(crate) fn path(&self, seq: u64, spec: SharedPath) {
        let whole = self.capability < 1;
        self.push(seq, |p| {
            let at_cap = p.paths.len() >= PATH_CHANGES_MAX && !p.paths.contains_key(&spec.dest);
            if whole || at_cap {
                p.paths = BTreeMap::new();
                p.whole_paths = true;
            } else if !(p.full || p.whole_paths) {
                p.paths.insert(spec.dest.clone(), spec);
            }
        });
    }

    /// Whether a path change queued now would be sent as such: not when the
    /// whole netmap or path list is already due, which will carry it (the
    /// hub then need not build it). Only a hint: the writer may take the
    /// queue right after.
    pub(crate) fn wants_path_changes(&self) -> bool {
        let p = self.lock();
        !(p.full || p.whole_paths)
    }

    /// The agent needs its whole path list.
    pub(crate) fn whole_paths(&self, seq: u64) {
        self.push(seq, |p| p.whole_paths = true);
    }

    /// Ends the session with a refusal; nothing queued is sent.
    pub(crate) fn close(&self, code: RefusalCode, message: String) {
        self.push(0, |p| p.close = Some((code, message)));
    }

    /// Waits until something is queued (returns at once if something was
    /// queued since the last [`take`](Self::take)).
    pub(crate) async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Takes everything queued. What a whole netmap or a whole path list
    /// will carry is dropped: the writer asks the hub for those, which
    /// renders them from its state at that moment, newer than the changes.
    pub(crate) fn take(&self) -> Pending {
        let mut p = std::mem::take(&mut *self.lock());
        p.normalize();
        p
    }
}

impl Pending {
    /// `later` (taken after this) on top of this, as if taken at once: what a
    /// whole netmap or path list to be rendered will carry is dropped.
    pub(crate) fn merge(mut self, later: Pending) -> Pending {
        self.seq = self.seq.max(later.seq);
        self.full |= later.full;
        self.whole_paths |= later.whole_paths;
        if later.node.is_some() {
            self.node = later.node;
        }
        self.peers.extend(later.peers);
        self.paths.extend(later.paths);
        self.close = self.close.or(later.close);
        self.normalize();
        self
    }

    fn normalize(&mut self) {
        if self.full {
            self.node = None;
            self.peers.clear();
            self.paths.clear();
            self.whole_paths = false;
        } else if self.whole_paths {
            self.paths.clear();
        }
    }

    /// Whether there is a change to send as an update.
    pub(crate) fn has_update(&self) -> bool {
        self.node.is_some() || !self.peers.is_empty() || !self.paths.is_empty()
    }

    /// The changes as one `update` frame (a test decodes it as the wire type).
    pub(crate) fn update_frame(&self) -> Result<Vec<u8>, FrameError> {
        let mut upsert = Vec::new();
        let mut remove = Vec::new();
        for (name, entry) in &self.peers {
            match entry {
                Some(json) => upsert.push(json.raw()),
                None => remove.push(name.as_str()),
            }
        }
        control::encode(&UpdateOut {
            kind: "update",
            seq: self.seq,
            node: self.node.as_ref(),
            upsert,
            remove,
            paths: None,
            path_changes: self.paths.values().collect(),
        })
    }
}

/// A whole path list as one `update` frame.
pub(crate) fn paths_frame(seq: u64, paths: &[PathSpec]) -> Result<Vec<u8>, FrameError> {
    control::encode(&UpdateOut {
        kind: "update",
        seq,
        node: None,
        upsert: Vec::new(),
        remove: Vec::new(),
        paths: Some(paths),
        path_changes: Vec::new(),
    })
}

/// `ControllerMessage::Update` as it goes out, with pre-encoded peers.
#[derive(Serialize)]
struct UpdateOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a SelfInfo>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    upsert: Vec<&'a RawValue>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    remove: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    paths: Option<&'a [PathSpec]>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    path_changes: Vec<&'a SharedPath>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fabric::{Fabric, Output};
    use crate::paths::Hop;
    use crate::store::records::NodeRecord;
    use skymesh_wire::control::{ControllerMessage, FrameBuffer, NetMapUpdate};
    use skymesh_wire::{PublicKey, Via};

    fn record(name: &str, i: u8, port: u16) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            site: name.into(),
            cloud: "aws".into(),
            region: "r".into(),
            overlay_ip: format!("100.96.0.{i}").parse().expect("ip"),
            cert_sha256: String::new(),
            token_id: String::new(),
            enrolled_at: 0,
            public_key: Some(PublicKey::from_bytes([i; 32])),
            listen_port: port,
            endpoints: Vec::new(),
            observed_endpoint: Some(format!("203.0.113.{i}:{port}").parse().expect("addr")),
            advertised: Vec::new(),
            prefixes: Vec::new(),
            rejected_prefixes: Vec::new(),
            underlay: Vec::new(),
            agent_version: String::new(),
            last_seen: 0,
            transit: false,
        }
    }

    fn entry(f: &mut Fabric, r: NodeRecord) -> PeerJson {
        f.handle_put(r)
            .into_iter()
            .find_map(|o| match o {
                Output::Peer { entry, .. } => entry,
                _ => None,
            })
            .expect("a peer entry")
    }

    fn decode(frame: &[u8]) -> NetMapUpdate {
        let mut buf = FrameBuffer::new();
        buf.extend(frame);
        match buf.next_message().expect("frame").expect("one") {
            ControllerMessage::Update(u) => u,
            other => panic!("not an update: {other:?}"),
        }
    }

    fn shared(p: PathSpec) -> SharedPath {
        let hop = |v: Via| match v {
            Via::Direct => Hop::Direct,
            Via::Transit(t) => Hop::Transit(t.into()),
        };
        SharedPath {
            dest: p.dest.into(),
            primary: hop(p.primary),
            backup: p.backup.map(hop),
        }
    }

    fn path(dest: &str, via: Via) -> PathSpec {
        PathSpec {
            dest: dest.into(),
            primary: via,
            backup: None,
        }
    }

    #[test]
    fn changes_queued_for_a_slow_agent_merge_into_one_update() {
        let mut f = Fabric::new(1420, []);
        let out = Outbox::new(control::CAPABILITY);
        out.full(1);
        let first = out.take();
        assert!(first.full, "a new session starts with its whole netmap");
        // Ten changes of b's endpoint, a peer that comes and goes, paths that
        // change twice: the agent was busy meanwhile.
        for port in 1..=10 {
            out.peer(
                10 + u64::from(port),
                "b",
                Some(entry(&mut f, record("b", 2, port))),
            );
        }
        out.peer(30, "c", Some(entry(&mut f, record("c", 3, 1))));
        out.peer(31, "c", None);
        out.path(32, shared(path("b", Via::Direct)));
        out.path(33, shared(path("b", Via::Transit("t".into()))));
        let p = out.take();
        assert!(!p.full && p.has_update());
        let u = decode(&p.update_frame().expect("encodes"));
        assert_eq!(u.seq, 33);
        assert_eq!(u.upsert.len(), 1);
        assert_eq!(
            u.upsert[0].endpoint,
            Some("203.0.113.2:10".parse().expect("addr"))
        );
        assert_eq!(u.remove, ["c"]);
        assert_eq!(u.path_changes, [path("b", Via::Transit("t".into()))]);
        assert!(u.paths.is_none());
        assert!(!out.take().has_update(), "taken once");
    }

    #[test]
    fn a_whole_netmap_or_path_list_supersedes_what_was_queued_before_it() {
        let mut f = Fabric::new(1420, []);
        let out = Outbox::new(control::CAPABILITY);
        out.full(4);
        out.peer(5, "b", Some(entry(&mut f, record("b", 2, 1))));
        out.path(5, shared(path("b", Via::Direct)));
        let p = out.take();
        assert!(
            p.full && !p.has_update(),
            "the netmap rendered now holds both"
        );
        out.path(6, shared(path("b", Via::Direct)));
        out.whole_paths(7);
        out.peer(7, "b", None);
        let p = out.take();
        assert!(p.whole_paths && p.paths.is_empty());
        assert_eq!(
            p.peers.len(),
            1,
            "peer changes still go out beside the list"
        );
    }

    #[test]
    fn a_flood_of_path_changes_becomes_one_whole_path_list() {
        let out = Outbox::new(control::CAPABILITY);
        let _ = out.take();
        for i in 0..PATH_CHANGES_MAX {
            out.path(1, shared(path(&format!("n{i}"), Via::Direct)));
        }
        // Up to the bound, changes are queued as such...
        out.path(1, shared(path("n0", Via::Transit("t".into()))));
        assert!(out.wants_path_changes());
        let p = out.take();
        assert!(!p.whole_paths);
        assert_eq!(p.paths.len(), PATH_CHANGES_MAX);
        assert_eq!(
            p.paths["n0"].primary,
            Hop::Transit("t".into()),
            "the latest change of a destination wins"
        );
        // ...one more, and the queue holds the flag instead.
        for i in 0..=PATH_CHANGES_MAX {
            out.path(2, shared(path(&format!("n{i}"), Via::Direct)));
        }
        assert!(!out.wants_path_changes());
        let p = out.take();
        assert!(p.whole_paths && p.paths.is_empty() && p.seq == 2);
    }

    #[test]
    fn an_agent_without_the_capability_gets_whole_path_lists() {
        let out = Outbox::new(0);
        let _ = out.take();
        out.path(3, shared(path("b", Via::Direct)));
        let p = out.take();
        assert!(p.whole_paths && p.paths.is_empty());
        let frame = paths_frame(3, &[path("b", Via::Direct)]).expect("encodes");
        let u = decode(&frame);
        assert_eq!(u.paths, Some(vec![path("b", Via::Direct)]));
        assert!(u.path_changes.is_empty());
    }
}
