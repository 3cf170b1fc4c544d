//! The netmap hub: one task that owns the [`Fabric`] and the [`PathEngine`].
//! It follows the store's node records and link overrides through watches (so
//! a change made by any controller replica reaches every agent), takes the
//! agents' link reports, decides paths about once a second, and queues what
//! changed in each connected agent's [`Outbox`].
//!
//! Nothing here waits for an agent: a change is merged into the outboxes it
//! concerns, and each session's writer sends what has gathered whenever its
//! agent reads. Whole netmaps and whole path lists are rendered when a writer
//! asks for them, so their memory is held only while one is being written.

use super::outbox::{self, Outbox};
use crate::fabric::{Fabric, Output};
use crate::metrics::Metrics;
use crate::paths::{LinkOverride, LinkView, PairView, PathConfig, PathEngine};
use crate::registry::Registry;
use crate::store::records::{self, NodeRecord};
use crate::store::{StoreError, WatchEvent};
use anyhow::{anyhow, Result};
use skymesh_wire::control::RefusalCode;
use skymesh_wire::{LinkSample, PathSpec, Via};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::sessions::{Admission, Sessions};

/// How often paths are decided from the link reports.
const PATH_TICK: Duration = Duration::from_secs(1);
/// After a (re)start, paths are neither computed nor sent until the agents have
/// had time to report: netmaps sent meanwhile carry no paths, which tells an agent
/// to keep the ones it has, instead of every pair falling back to direct.
const PATH_WARMUP: Duration = Duration::from_secs(3);

/// Identifies one session of a node, so an old session ending does not remove a
/// newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId(u64);

struct Subscriber {
    id: SessionId,
    outbox: Arc<Outbox>,
    since: u64,
}

/// What a session's writer asks the hub to render.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Render {
    /// The node's whole netmap.
    NetMap,
    /// The node's whole path list.
    Paths,
}

/// Which links and pairs a [`Hub::paths`] call wants.
#[derive(Debug, Clone, Default)]
pub struct PathsQuery {
    /// Reload the overrides from the store and decide first (after an
    /// operator's change).
    pub refresh: bool,
    /// Only the pairs with this node as an end, with the node's links and
    /// those of the transits its primaries cross (what the AI gateway needs
    /// to add up a path's RTT).
    pub node: Option<String>,
}

enum HubCmd {
    Subscribe {
        node: String,
        outbox: Arc<Outbox>,
        min_revision: u64,
        reply: oneshot::Sender<SessionId>,
    },
    Unsubscribe {
        node: String,
        id: SessionId,
    },
    Render {
        node: String,
        what: Render,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    Paths {
        query: PathsQuery,
        reply: oneshot::Sender<PathsSnapshot>,
    },
}

/// The measured links and the chosen paths, as the API shows them.
#[derive(Debug, Clone)]
pub struct PathsSnapshot {
    pub links: Vec<LinkView>,
    pub pairs: Vec<PairView>,
}

/// A node's link measurements: its whole report (replacing) or the changes
/// since the last one.
struct Report {
    node: String,
    whole: bool,
    samples: Vec<LinkSample>,
    /// Its share of [`REPORT_QUEUE`], given back when the hub has taken it.
    _credit: OwnedSemaphorePermit,
}

/// Link samples waiting for the hub, in all queued reports (about 56 bytes
/// each decoded, so ~3.5 MiB): when the hub falls behind, sessions wait to
/// read more from their agents (QUIC flow control holds the rest on the
/// agents) instead of the queue growing. Bounded by samples, not reports: a
/// cold start sends one whole report of N−1 links per agent, and a thousand
/// of them queued would be ~55 MiB at N = 1,000.
const REPORT_QUEUE: u32 = 1 << 16;

/// Handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    cmds: mpsc::UnboundedSender<HubCmd>,
    reports: mpsc::UnboundedSender<Report>,
    /// [`REPORT_QUEUE`] samples' worth of credit.
    report_credit: Arc<Semaphore>,
    online: Arc<Mutex<HashMap<String, u64>>>,
    /// The authenticated sessions, one per node.
    sessions: Arc<Sessions<quinn::Connection>>,
    /// Nodes enrolled as of the hub's last event: what the session cap and the
    /// link report bound scale with.
    enrolled: Arc<AtomicUsize>,
}

impl Hub {
    /// Starts the hub: it loads every node record and follows the store.
    pub fn start(
        registry: Arc<Registry>,
        mtu: u16,
        metrics: Arc<Metrics>,
        paths: PathConfig,
    ) -> Self {
        let (cmds, rx) = mpsc::unbounded_channel();
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let online = Arc::new(Mutex::new(HashMap::new()));
        let enrolled = Arc::new(AtomicUsize::new(0));
        let hub = Self {
            cmds,
            reports,
            report_credit: Arc::new(Semaphore::new(REPORT_QUEUE as usize)),
            online: online.clone(),
            sessions: Sessions::new(),
            enrolled: enrolled.clone(),
        };
        tokio::spawn(async move {
            let mut state = HubState {
                registry,
                mtu,
                metrics,
                fabric: Fabric::new(mtu, []),
                engine: PathEngine::new(paths),
                started: Instant::now(),
                warm: false,
                revision: 0,
                sessions: HashMap::new(),
                pending: Vec::new(),
                next_id: 0,
                online,
                enrolled,
            };
            if let Err(e) = state.run(rx, reports_rx).await {
                tracing::error!(error = %format!("{e:#}"), "netmap hub stopped");
            }
        });
        hub
    }

    fn send(&self, cmd: HubCmd) -> Result<()> {
        self.cmds
            .send(cmd)
            .map_err(|_| anyhow!("the netmap hub has stopped"))
    }

    /// Registers a session of `node` whose writer sends what `outbox` gathers;
    /// its first message is the whole netmap as of at least `min_revision`. A
    /// newer session of the same node replaces an older one.
    pub(crate) async fn subscribe(
        &self,
        node: &str,
        outbox: Arc<Outbox>,
        min_revision: u64,
    ) -> Result<SessionId> {
        let (reply, rx) = oneshot::channel();
        self.send(HubCmd::Subscribe {
            node: node.to_string(),
            outbox,
            min_revision,
            reply,
        })?;
        rx.await.map_err(|_| anyhow!("the netmap hub has stopped"))
    }

    pub fn unsubscribe(&self, node: &str, id: SessionId) {
        let _ = self.send(HubCmd::Unsubscribe {
            node: node.to_string(),
            id,
        });
    }

    /// A node's link measurements: its whole report, or what changed. Waits
    /// while the hub is behind.
    pub async fn report(&self, node: &str, whole: bool, samples: Vec<LinkSample>) {
        // An empty report costs one credit; one larger than the whole queue
        // waits for all of it.
        let cost = u32::try_from(samples.len())
            .unwrap_or(u32::MAX)
            .clamp(1, REPORT_QUEUE);
        let Ok(credit) = self.report_credit.clone().acquire_many_owned(cost).await else {
            return;
        };
        let _ = self.reports.send(Report {
            node: node.to_string(),
            whole,
            samples,
            _credit: credit,
        });
    }

    /// Renders `node`'s whole netmap or path list as one frame, from the
    /// hub's state now; `None` if the node is not enrolled any more.
    pub(crate) async fn render(&self, node: &str, what: Render) -> Result<Option<Vec<u8>>> {
        let (reply, rx) = oneshot::channel();
        self.send(HubCmd::Render {
            node: node.to_string(),
            what,
            reply,
        })?;
        rx.await.map_err(|_| anyhow!("the netmap hub has stopped"))
    }

    /// The links and paths now, as `query` asks.
    pub async fn paths(&self, query: PathsQuery) -> Result<PathsSnapshot> {
        let (reply, rx) = oneshot::channel();
        self.send(HubCmd::Paths { query, reply })?;
        rx.await.map_err(|_| anyhow!("the netmap hub has stopped"))
    }

    /// Takes an authenticated session of `node` in: at most one per node (the
    /// older one is handed back to close), at most [`super::sessions::cap`] in all.
    pub(crate) fn admit_session(
        &self,
        node: &str,
        conn: quinn::Connection,
    ) -> Admission<quinn::Connection> {
        self.sessions
            .admit(node, conn, self.enrolled.load(Ordering::Relaxed))
    }

    /// Nodes enrolled, as the hub last saw the store.
    pub fn enrolled(&self) -> usize {
        self.enrolled.load(Ordering::Relaxed)
    }

    /// Authenticated control sessions open now, replaced ones still closing
    /// included.
    pub fn sessions_open(&self) -> usize {
        self.sessions.open()
    }

    /// Connected nodes, with the unix time their session started.
    pub fn online(&self) -> HashMap<String, u64> {
        self.online.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

struct HubState {
    registry: Arc<Registry>,
    mtu: u16,
    metrics: Arc<Metrics>,
    fabric: Fabric,
    engine: PathEngine,
    started: Instant,
    /// Paths have been pushed since the warm-up ended.
    warm: bool,
    revision: u64,
    sessions: HashMap<String, Subscriber>,
    pending: Vec<(String, Arc<Outbox>, u64, oneshot::Sender<SessionId>)>,
    next_id: u64,
    online: Arc<Mutex<HashMap<String, u64>>>,
    enrolled: Arc<AtomicUsize>,
}

impl HubState {
    async fn run(
        &mut self,
        mut cmds: mpsc::UnboundedReceiver<HubCmd>,
        mut reports: mpsc::UnboundedReceiver<Report>,
    ) -> Result<()> {
        let mut nodes = self.resync().await?;
        // Overrides are loaded before the first command is served, so the API
        // shows them right after a restart.
        let mut links = self.watch_links().await?;
        self.update_paths();
        let mut tick = tokio::time::interval(PATH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.update_paths(),
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.handle_cmd(cmd).await,
                    None => return Ok(()),
                },
                Some(report) = reports.recv() => self.take_report(report),
                ev = nodes.recv() => match ev {
                    Some(ev) => {
                        self.handle_event(ev);
                        self.serve_pending();
                    }
                    None => {
                        tracing::warn!("store watch ended; reloading every node and resending full netmaps");
                        nodes = self.resync().await?;
                        for s in self.sessions.values() {
                            s.outbox.full(self.revision);
                        }
                        self.serve_pending();
                    }
                },
                ev = links.recv() => match ev {
                    Some(ev) => self.handle_link_event(ev),
                    None => {
                        tracing::warn!("link override watch ended; reloading the overrides");
                        links = self.watch_links().await?;
                    }
                },
            }
        }
    }

    async fn handle_cmd(&mut self, cmd: HubCmd) {
        match cmd {
            HubCmd::Subscribe {
                node,
                outbox,
                min_revision,
                reply,
            } => {
                self.pending.push((node, outbox, min_revision, reply));
                self.serve_pending();
            }
            HubCmd::Unsubscribe { node, id } => {
                if self.sessions.get(&node).is_some_and(|s| s.id == id) {
                    self.sessions.remove(&node);
                    self.engine.set_live(&node, false, Instant::now());
                    self.set_online();
                }
            }
            HubCmd::Render { node, what, reply } => {
                let _ = reply.send(self.render(&node, what));
            }
            HubCmd::Paths { query, reply } => {
                if query.refresh {
                    self.reload_overrides().await;
                }
                // Cheap when nothing changed, and the views then match the
                // decisions.
                self.update_paths();
                let now = Instant::now();
                let snapshot = match &query.node {
                    Some(node) => {
                        // The node's pairs, its links and those of the
                        // transits its primaries cross.
                        let pairs = self.engine.pairs_of(node, now);
                        let transits: std::collections::BTreeSet<&str> = pairs
                            .iter()
                            .map(|p| p.primary.as_str())
                            .filter(|p| *p != skymesh_wire::path::DIRECT)
                            .collect();
                        let touches = |n: &str| n == node || transits.contains(n);
                        let links = self
                            .engine
                            .links_where(now, |a, b| touches(a) || touches(b));
                        PathsSnapshot { links, pairs }
                    }
                    None => PathsSnapshot {
                        links: self.engine.links(now),
                        pairs: self.engine.pairs(now),
                    },
                };
                let _ = reply.send(snapshot);
            }
        }
    }

    fn take_report(&mut self, r: Report) {
        let now = Instant::now();
        if r.whole {
            let report = skymesh_wire::LinkReport { links: r.samples };
            self.engine.report(&r.node, &report, now);
        } else {
            self.engine.report_changes(&r.node, &r.samples, now);
        }
    }

    fn render(&self, node: &str, what: Render) -> Option<Vec<u8>> {
        let paths = if self.warm {
            without_plain_direct(self.engine.paths_for(node))
        } else {
            Vec::new()
        };
        let frame = match what {
            Render::NetMap => self.fabric.full_frame(node, self.revision, &paths)?,
            Render::Paths => {
                if !self.fabric.contains(node) {
                    return None;
                }
                outbox::paths_frame(self.revision, &paths)
            }
        };
        match frame {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(node, error = %e, "cannot encode a netmap");
                None
            }
        }
    }

    /// Loads every node record and watches from there.
    async fn resync(&mut self) -> Result<mpsc::Receiver<WatchEvent>> {
        loop {
            let (kvs, rev) = self.registry.store().range(records::NODES).await?;
            let nodes = kvs
                .iter()
                .filter_map(
                    |kv| match records::decode::<NodeRecord>(&kv.key, &kv.value) {
                        Ok(n) => Some(n),
                        Err(e) => {
                            tracing::error!(error = %e, "skipping an unreadable node record");
                            None
                        }
                    },
                )
                .collect::<Vec<_>>();
            match self.registry.store().watch(records::NODES, rev).await {
                Ok(w) => {
                    self.enrolled.store(nodes.len(), Ordering::Relaxed);
                    self.fabric = Fabric::new(self.mtu, nodes);
                    self.engine.set_nodes(self.fabric.members());
                    self.revision = self.revision.max(rev);
                    return Ok(w);
                }
                Err(StoreError::Compacted { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Loads every link override and watches from there.
    async fn watch_links(&mut self) -> Result<mpsc::Receiver<WatchEvent>> {
        loop {
            let rev = self.reload_overrides().await;
            match self.registry.store().watch(records::LINKS, rev).await {
                Ok(w) => return Ok(w),
                Err(StoreError::Compacted { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Makes the engine's overrides those in the store (the truth, so every
    /// replica and a restarted controller agree); returns the store revision
    /// read, 0 if the read failed (the previous overrides stay).
    async fn reload_overrides(&mut self) -> u64 {
        let (kvs, rev) = match self.registry.store().range(records::LINKS).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not read link overrides; keeping the previous ones");
                return 0;
            }
        };
        let mut wanted: BTreeMap<(String, String), LinkOverride> = BTreeMap::new();
        for kv in &kvs {
            if let Some((key, o)) = read_override(&kv.key, &kv.value) {
                wanted.insert(key, o);
            }
        }
        let stale: Vec<(String, String)> = self
            .engine
            .overrides()
            .map(|(a, b, _)| (a.to_string(), b.to_string()))
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for (a, b) in stale {
            let _ = self.engine.set_override(&a, &b, None);
        }
        for ((a, b), o) in wanted {
            self.set_override(&a, &b, Some(o));
        }
        rev
    }

    fn handle_link_event(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => {
                if let Some(((a, b), o)) = read_override(&kv.key, &kv.value) {
                    self.set_override(&a, &b, Some(o));
                }
            }
            WatchEvent::Delete { key, .. } => {
                if let Some((a, b)) = records::link_from_key(&key) {
                    self.set_override(&a, &b, None);
                }
            }
        }
    }

    fn set_override(&mut self, a: &str, b: &str, o: Option<LinkOverride>) {
        if self.engine.override_for(a, b) == o.as_ref() {
            return;
        }
        if let Err(e) = self.engine.set_override(a, b, o) {
            tracing::error!(error = %e, "ignoring an invalid link override");
        }
    }

    fn handle_event(&mut self, ev: WatchEvent) {
        let (outputs, changed) = match ev {
            WatchEvent::Put(kv) => {
                self.revision = self.revision.max(kv.mod_revision);
                match records::decode::<NodeRecord>(&kv.key, &kv.value) {
                    Ok(node) => {
                        if !self.fabric.contains(&node.name) {
                            self.enrolled.fetch_add(1, Ordering::Relaxed);
                        }
                        let name = node.name.clone();
                        (self.fabric.handle_put(node), Some(name))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "ignoring an unreadable node record");
                        (Vec::new(), None)
                    }
                }
            }
            WatchEvent::Delete { key, revision } => {
                self.revision = self.revision.max(revision);
                let name = key.strip_prefix(records::NODES).unwrap_or(&key).to_string();
                if self.fabric.contains(&name) {
                    self.enrolled.fetch_sub(1, Ordering::Relaxed);
                }
                (self.fabric.handle_delete(&name), Some(name))
            }
        };
        // The engine's members are the nodes others have as peers.
        if let Some(name) = changed {
            match self.fabric.node(&name) {
                Some(n) if n.public_key.is_some() => {
                    let transit = n.transit;
                    self.engine.upsert_node(&name, transit);
                }
                _ => self.engine.remove_node(&name),
            }
        }
        let seq = self.revision;
        for out in outputs {
            match out {
                Output::Peer { name, entry } => {
                    for (other, s) in &self.sessions {
                        if *other != name {
                            s.outbox.peer(seq, &name, entry.clone());
                        }
                    }
                }
                Output::SelfInfo(info) => {
                    if let Some(s) = self.sessions.get(&info.name) {
                        s.outbox.self_info(seq, info);
                    }
                }
                Output::Disconnect(name) => {
                    if let Some(s) = self.sessions.remove(&name) {
                        s.outbox.close(
                            RefusalCode::InvalidCertificate,
                            format!("node {name:?} was revoked"),
                        );
                    }
                    self.set_online();
                }
            }
        }
    }

    fn serve_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for (node, outbox, min_rev, reply) in pending {
            if self.revision < min_rev {
                self.pending.push((node, outbox, min_rev, reply));
                continue;
            }
            self.next_id += 1;
            let id = SessionId(self.next_id);
            if !self.fabric.contains(&node) {
                // Revoked between its register and now.
                outbox.close(
                    RefusalCode::InvalidCertificate,
                    format!("node {node:?} is not enrolled"),
                );
                let _ = reply.send(id);
                continue;
            }
            // Its outbox starts with the whole netmap; let the writer go.
            outbox.full(self.revision);
            self.engine.set_live(&node, true, Instant::now());
            self.sessions.insert(
                node,
                Subscriber {
                    id,
                    outbox,
                    since: records::unix_now(),
                },
            );
            self.set_online();
            let _ = reply.send(id);
        }
    }

    /// Decides the pairs whose inputs changed and queues each changed path to
    /// the two nodes of its pair.
    fn update_paths(&mut self) {
        let seq = self.revision;
        let warming = self.started.elapsed() < PATH_WARMUP;
        // Netmaps sent during the warm-up carried no paths: at its end
        // everyone gets the whole list, rendered when its writer is ready.
        let first = !warming && !std::mem::replace(&mut self.warm, true);
        let sessions = &self.sessions;
        let wanted = |node: &str| {
            !warming
                && !first
                && sessions
                    .get(node)
                    .is_some_and(|s| s.outbox.wants_path_changes())
        };
        for (node, spec) in self.engine.recompute_paths(Instant::now(), wanted) {
            if let Some(s) = sessions.get(node) {
                tracing::trace!(node = %node, path = ?spec, "path changed");
                s.outbox.path(seq, spec);
            }
        }
        self.metrics
            .path_decisions
            .store(self.engine.decisions(), Ordering::Relaxed);
        if first {
            for s in self.sessions.values() {
                s.outbox.whole_paths(seq);
            }
        }
    }

    fn set_online(&self) {
        if let Ok(mut m) = self.online.lock() {
            *m = self
                .sessions
                .iter()
                .map(|(n, s)| (n.clone(), s.since))
                .collect();
        }
    }
}

/// A path list without the entries that say "direct, no backup": a peer a
/// list leaves out is reached directly, and most of a joining node's pairs are
/// not decided yet. One entry stays if all would go, since an empty list
/// means "no decision yet" to an agent, which then keeps the paths it had.
fn without_plain_direct(mut paths: Vec<PathSpec>) -> Vec<PathSpec> {
    let plain = |p: &PathSpec| p.primary == Via::Direct && p.backup.is_none();
    if paths.iter().all(plain) {
        paths.truncate(1);
    } else {
        paths.retain(|p| !plain(p));
    }
    paths
}

/// A stored override, or `None` (logged) if its key or value is unreadable.
fn read_override(key: &str, value: &[u8]) -> Option<((String, String), LinkOverride)> {
    let (a, b) = records::link_from_key(key)?;
    match serde_json::from_slice::<LinkOverride>(value) {
        Ok(o) => Some(((a, b), o)),
        Err(e) => {
            tracing::error!(key, error = %e, "ignoring an unreadable link override");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(dest: &str, primary: Via, backup: Option<Via>) -> PathSpec {
        PathSpec {
            dest: dest.into(),
            primary,
            backup,
        }
    }

    #[test]
    fn path_lists_leave_out_what_an_agent_does_without_them() {
        let t = || Via::Transit("t".into());
        let mixed = vec![
            path("a", Via::Direct, None),
            path("b", Via::Direct, Some(t())),
            path("c", t(), None),
            path("d", Via::Direct, None),
        ];
        assert_eq!(
            without_plain_direct(mixed),
            [path("b", Via::Direct, Some(t())), path("c", t(), None)]
        );
        // Never empty when there were paths: empty means "no decision yet".
        let plain = vec![path("a", Via::Direct, None), path("d", Via::Direct, None)];
        assert_eq!(without_plain_direct(plain), [path("a", Via::Direct, None)]);
        assert!(without_plain_direct(Vec::new()).is_empty());
    }
}
