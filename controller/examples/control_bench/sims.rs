//! The simulated agents: the real agent control session
//! (`skymesh_agent::control::run_session_reporting`) per node, each followed by
//! a task that tracks which peers its netmap holds and notes when a watched
//! change arrives.
//!
//! Owns the agents' registrations, their view of the netmap (a bitset of peer
//! indices, not a copy of the netmap: 3,000 copies of 3,000 peers would cost
//! the bench gigabytes) and the probe of the change being measured. The link
//! state they report belongs to [`LinkModel`].

use crate::links::{BitSet, LinkModel};
use ipnet::IpNet;
use skymesh_agent::control::{self, ControlEvent, Identity, ReportSource};
use skymesh_wire::control::{Register, CAPABILITY};
use skymesh_wire::{PathSpec, PublicKey, Via};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};

/// Names of the nodes: `sim-00042` for the N agents that hold netmaps,
/// `new-003` for the nodes that join one by one; index order is that order.
#[derive(Clone, Copy)]
pub(crate) struct Names {
    /// The number of `sim-` nodes.
    pub(crate) sims: usize,
}

impl Names {
    pub(crate) fn name(&self, i: usize) -> String {
        if i < self.sims {
            format!("sim-{i:05}")
        } else {
            format!("new-{:03}", i - self.sims)
        }
    }

    pub(crate) fn index(&self, name: &str) -> Option<usize> {
        if let Some(i) = name.strip_prefix("sim-") {
            i.parse().ok()
        } else {
            name.strip_prefix("new-")
                .and_then(|i| i.parse::<usize>().ok())
                .map(|i| self.sims + i)
        }
    }
}

/// What the agent tasks report to the measuring task.
pub(crate) struct Shared {
    names: Names,
    /// Peers in each agent's netmap; `usize::MAX` before its first netmap.
    peers: Vec<AtomicUsize>,
    pub(crate) disconnects: AtomicUsize,
    pub(crate) full_maps: AtomicUsize,
    /// Path entries received (in full netmaps and updates) that go through a transit.
    pub(crate) transit_paths: AtomicUsize,
    /// Peer entries received, in full netmaps and updates, and path entries
    /// by where they came: in full netmaps, in whole path lists of updates,
    /// as path changes. Against the N × (N − 1) each a cold start needs at
    /// least, they show what is sent again.
    pub(crate) peer_entries: AtomicUsize,
    pub(crate) path_entries: [AtomicUsize; 3],
    /// Why sessions ended, as the agents saw it, with how often.
    reasons: Mutex<BTreeMap<String, usize>>,
    probe: Mutex<Option<Probe>>,
    done: Arc<Notify>,
}

/// The change being measured: when each of the first `arrived.len()` agents got
/// the named peer.
pub(crate) struct Probe {
    pub(crate) name: String,
    new_index: usize,
    pub(crate) arrived: Vec<Option<Instant>>,
    missing: usize,
    pub(crate) own_netmap: Option<Instant>,
}

impl Shared {
    pub(crate) fn new(names: Names, agents: usize) -> Self {
        Self {
            names,
            peers: (0..agents).map(|_| AtomicUsize::new(usize::MAX)).collect(),
            disconnects: AtomicUsize::new(0),
            full_maps: AtomicUsize::new(0),
            transit_paths: AtomicUsize::new(0),
            peer_entries: AtomicUsize::new(0),
            path_entries: Default::default(),
            reasons: Mutex::new(BTreeMap::new()),
            probe: Mutex::new(None),
            done: Arc::new(Notify::new()),
        }
    }

    /// How many of `agents` hold exactly `peers` peers.
    pub(crate) fn holding(&self, agents: std::ops::Range<usize>, peers: usize) -> usize {
        self.peers[agents]
            .iter()
            .filter(|p| p.load(Ordering::Relaxed) == peers)
            .count()
    }

    /// Starts watching for `name` at the first `watched` agents.
    pub(crate) fn arm(&self, name: &str, new_index: usize, watched: usize) -> Arc<Notify> {
        *self.lock() = Some(Probe {
            name: name.to_string(),
            new_index,
            arrived: vec![None; watched],
            missing: watched,
            own_netmap: None,
        });
        self.done.clone()
    }

    pub(crate) fn disarm(&self) -> Probe {
        self.lock().take().unwrap_or(Probe {
            name: String::new(),
            new_index: usize::MAX,
            arrived: Vec::new(),
            missing: 0,
            own_netmap: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Probe>> {
        self.probe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Agent `idx` received, at `at`, a message with these peers upserted.
    fn saw<'a>(
        &self,
        idx: usize,
        mut upserted: impl Iterator<Item = &'a str>,
        full: bool,
        at: Instant,
    ) {
        let mut guard = self.lock();
        let Some(p) = guard.as_mut() else {
            return;
        };
        if full && idx == p.new_index && p.own_netmap.is_none() {
            p.own_netmap = Some(at);
        }
        if idx >= p.arrived.len() || p.arrived[idx].is_some() {
            return;
        }
        if upserted.any(|name| name == p.name) {
            p.arrived[idx] = Some(at);
            p.missing -= 1;
            if p.missing == 0 {
                self.done.notify_one();
            }
        }
    }

    fn note_disconnect(&self, reason: String) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        *reasons.entry(reason).or_default() += 1;
    }

    /// The most frequent reasons sessions ended, most frequent first.
    pub(crate) fn disconnect_reasons(&self, most: usize) -> Vec<(String, usize)> {
        let reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(String, usize)> = reasons.iter().map(|(r, c)| (r.clone(), *c)).collect();
        all.sort_by_key(|r| std::cmp::Reverse(r.1));
        all.truncate(most);
        all
    }

    /// Counts path entries received as `kind` (an index of `path_entries`).
    fn count_paths<'a>(&self, kind: usize, paths: impl Iterator<Item = &'a PathSpec>) {
        let (mut all, mut via_transit) = (0, 0);
        for p in paths {
            all += 1;
            via_transit += usize::from(matches!(p.primary, Via::Transit(_)));
        }
        self.path_entries[kind].fetch_add(all, Ordering::Relaxed);
        if via_transit > 0 {
            self.transit_paths.fetch_add(via_transit, Ordering::Relaxed);
        }
    }
}

/// Starts agent `idx`'s session, reporting links from `model`, and its follower.
pub(crate) fn start_agent(
    sessions: &mut tokio::task::JoinSet<()>,
    shared: &Arc<Shared>,
    model: &Arc<LinkModel>,
    idx: usize,
    identity: Identity,
    transit: bool,
    first_netmap: Option<OwnedSemaphorePermit>,
) {
    let (tx, rx) = mpsc::channel(1024);
    sessions.spawn(follow(idx, rx, shared.clone(), model.clone(), first_netmap));
    let source: ReportSource = {
        let model = model.clone();
        Arc::new(move || model.report(idx))
    };
    sessions.spawn(async move {
        // Returns only on a refusal retrying cannot fix; the follower sees its end.
        let _ = control::run_session_reporting(identity, register(idx, transit), tx, Some(source))
            .await;
    });
}

/// One agent's view: which peers its netmap holds, updated as the daemon
/// applies netmaps and updates; peers new to it go to the link model.
async fn follow(
    idx: usize,
    mut events: mpsc::Receiver<ControlEvent>,
    shared: Arc<Shared>,
    model: Arc<LinkModel>,
    mut first_netmap: Option<OwnedSemaphorePermit>,
) {
    let names = shared.names;
    let mut in_map = BitSet::new(model.nodes());
    let mut appeared: Vec<u32> = Vec::new();
    let mut has_map = false;
    while let Some(ev) = events.recv().await {
        let at = Instant::now();
        match ev {
            ControlEvent::NetMap(full) => {
                shared.full_maps.fetch_add(1, Ordering::Relaxed);
                let peers = &full.netmap.peers;
                shared.saw(idx, peers.iter().map(|p| p.name.as_str()), true, at);
                let mut next = BitSet::new(model.nodes());
                for b in peers.iter().filter_map(|p| names.index(&p.name)) {
                    next.insert(b);
                    if !in_map.contains(b) {
                        appeared.push(b as u32);
                    }
                }
                in_map = next;
                shared
                    .peer_entries
                    .fetch_add(peers.len(), Ordering::Relaxed);
                shared.count_paths(0, full.netmap.paths.iter());
                has_map = true;
                first_netmap = None;
            }
            ControlEvent::Update(u) => {
                shared.saw(idx, u.upsert.iter().map(|p| p.name.as_str()), false, at);
                for b in u.remove.iter().filter_map(|n| names.index(n)) {
                    in_map.remove(b);
                }
                for b in u.upsert.iter().filter_map(|p| names.index(&p.name)) {
                    if in_map.insert(b) {
                        appeared.push(b as u32);
                    }
                }
                shared
                    .peer_entries
                    .fetch_add(u.upsert.len(), Ordering::Relaxed);
                shared.count_paths(1, u.paths.iter().flatten());
                shared.count_paths(2, u.path_changes.iter());
            }
            ControlEvent::Disconnected { reason } => {
                shared.disconnects.fetch_add(1, Ordering::Relaxed);
                shared.note_disconnect(reason);
            }
            ControlEvent::Connected { .. } => {}
        }
        if !appeared.is_empty() {
            model.appeared(idx, &appeared);
            appeared.clear();
        }
        if has_map {
            shared.peers[idx].store(in_map.len(), Ordering::Relaxed);
        }
    }
    drop(first_netmap);
}

/// Agent `i`'s registration: a random key, a documentation endpoint, its own
/// /24 and the current protocol capability, so it gets incremental updates.
fn register(i: usize, transit: bool) -> Register {
    let (hi, lo) = ((i >> 8) as u8, i as u8);
    let advertise: IpNet = format!("10.{hi}.{lo}.0/24")
        .parse()
        .unwrap_or_else(|_| IpNet::default());
    Register {
        public_key: PublicKey::from_bytes(rand::random()),
        listen_port: 51820,
        endpoints: vec![std::net::SocketAddr::from(([198, 18, hi, lo], 51820))],
        advertise: vec![advertise],
        underlay: vec![],
        agent_version: "control-bench".into(),
        transit,
        capability: CAPABILITY,
    }
}
