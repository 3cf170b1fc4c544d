//! The agent's sans-IO core: the peer table, cryptokey routing and WireGuard
//! sessions (boringtun `noise::Tunn`, one per peer).
//!
//! Inputs are `handle_*` calls with the current time; outputs go into the caller's
//! [`Transmits`] / [`TunWrites`] batches, plus [`Node::poll_event`] and
//! [`Node::poll_timeout`]. It owns no socket, no device and no clock. (boringtun's
//! session timers read the monotonic clock internally; everything this module
//! schedules itself runs on the `now` it is given.)

use crate::batch::{Transmits, TunWrites};
use crate::keys::PrivateKey;
use crate::packet;
use crate::probe::{DownCause, Link, Probe, ProbeConfig, Transition};
use crate::routing::RoutingTable;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::PublicKey as XPublic;
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skymesh_wire::{NetMap, NetMapError, PeerSpec, PublicKey, Via};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often boringtun's session timers (rekey, keepalive, retries) are driven.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshake initiations per second accepted before cookies are demanded.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
const LIMITER_RESET: Duration = Duration::from_secs(1);
/// WireGuard's largest handshake message; any output slot must hold it.
const MIN_SLOT: usize = 148;
const DATA_OVERHEAD: usize = 32;
const MSG_DATA: u8 = 4;
/// Sessions older than this are about to be rejected (WireGuard's 180 s);
/// probes then wait for the new handshake instead of queueing behind it.
const SESSION_FRESH: Duration = Duration::from_secs(170);
/// A link check this late means the agent's timers were not running: the time
/// past the schedule does not count as silence.
pub const STALL: Duration = Duration::from_millis(50);
/// At most one [`Event::Stalled`] per this.
pub const STALL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a packet was dropped. The label is the `reason` of the drop metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A datagram that is no WireGuard message, or a TUN packet that is not IP.
    Malformed,
    /// A message for a key or session index this node does not know.
    UnknownPeer,
    /// A data counter or handshake timestamp seen before.
    Replay,
    /// MAC, AEAD tag or key check failed.
    AuthFailed,
    /// Data for a session that does not exist (yet or any more).
    NoSession,
    /// A decrypted packet whose source the sending peer may not use.
    SourceNotAllowed,
    /// No peer's allowed_ips contains the destination.
    NoRoute,
    /// The peer's endpoint is unknown (it has not reached us yet).
    NoEndpoint,
    /// Handshake refused while rate limiting without a source address.
    UnderLoad,
    /// Decrypted content that is not a valid IP packet.
    InvalidInner,
    /// A valid message at the wrong time (for example a response to no handshake).
    Unexpected,
    /// The UDP send failed.
    SendFailed,
    /// The write to the TUN device failed.
    TunWriteFailed,
    /// A packet to forward (transit) whose TTL or hop limit ran out.
    TtlExceeded,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::Replay,
        DropReason::AuthFailed,
        DropReason::NoSession,
        DropReason::SourceNotAllowed,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::UnderLoad,
        DropReason::InvalidInner,
        DropReason::Unexpected,
        DropReason::SendFailed,
        DropReason::TunWriteFailed,
        DropReason::TtlExceeded,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::Replay => "replay",
            DropReason::AuthFailed => "auth_failed",
            DropReason::NoSession => "no_session",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::UnderLoad => "under_load",
            DropReason::InvalidInner => "invalid_inner",
            DropReason::Unexpected => "unexpected",
            DropReason::SendFailed => "send_failed",
            DropReason::TunWriteFailed => "tun_write_failed",
            DropReason::TtlExceeded => "ttl_exceeded",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    fn from_wireguard(e: &WireGuardError) -> Self {
        match e {
            WireGuardError::DuplicateCounter
            | WireGuardError::InvalidCounter
            | WireGuardError::WrongTai64nTimestamp => DropReason::Replay,
            WireGuardError::InvalidMac
            | WireGuardError::InvalidAeadTag
            | WireGuardError::WrongKey
            | WireGuardError::InvalidTai64nTimestamp => DropReason::AuthFailed,
            WireGuardError::NoCurrentSession => DropReason::NoSession,
            WireGuardError::WrongIndex => DropReason::UnknownPeer,
            WireGuardError::UnderLoad => DropReason::UnderLoad,
            WireGuardError::InvalidPacket => DropReason::InvalidInner,
            WireGuardError::IncorrectPacketLength | WireGuardError::WrongPacketType => {
                DropReason::Malformed
            }
            _ => DropReason::Unexpected,
        }
    }
}

/// Something the driver may want to log or act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer's endpoint moved to the source of its authenticated packets.
    EndpointChanged {
        peer: String,
        from: Option<SocketAddr>,
        to: SocketAddr,
    },
    /// boringtun gave up on a peer's session (no handshake for 3 minutes); it
    /// restarts on the next packet.
    SessionExpired {
        peer: String,
    },
    /// The link to a peer failed (probes lost) or recovered.
    LinkDown {
        peer: String,
        cause: DownCause,
    },
    LinkUp {
        peer: String,
    },
    /// The link check ran `late` after its time: the agent's timers did not run
    /// (CPU starvation, a paused VM, a blocked runtime), so that time is not
    /// counted as silence. `count` such checks since the last event (events
    /// are at most one per [`STALL_LOG_EVERY`]).
    Stalled {
        late: Duration,
        count: u64,
    },
    /// Traffic to `dest` now takes another path.
    PathChanged {
        dest: String,
        from: Via,
        to: Via,
        cause: PathCause,
    },
}

/// Why a destination's path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathCause {
    /// The controller sent new paths.
    Controller,
    /// The primary's first hop failed: local switch to the backup.
    Failover,
    /// The primary's first hop is healthy again (and stayed so for the hold time).
    Failback,
}

/// A link as status and metrics show it.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    pub peer: String,
    pub up: bool,
    pub rtt: Option<Duration>,
    pub jitter: Duration,
    pub loss: f64,
    pub probes_sent: u64,
    pub probes_received: u64,
}

/// The path to one destination as status and metrics show it.
#[derive(Debug, Clone)]
pub struct PathStatus {
    pub dest: String,
    pub primary: Via,
    pub backup: Option<Via>,
    /// The path in use.
    pub active: Via,
    pub changes: u64,
    pub failovers: u64,
}

/// Traffic counters of one peer. Bytes are WireGuard datagram bytes on the wire
/// (as `wg show` counts them); packets are data messages, keepalives included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// A peer as status and metrics show it.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// Time since the last completed handshake, if any.
    pub since_handshake: Option<Duration>,
    pub counters: PeerCounters,
}

/// What [`Node::apply`] changed, for the driver to mirror in the kernel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyDiff {
    pub routes_added: Vec<IpNet>,
    pub routes_removed: Vec<IpNet>,
    pub peers_added: Vec<String>,
    pub peers_removed: Vec<String>,
    pub peers_updated: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PeerId(usize);

/// The first hop towards a destination: the destination itself, or a transit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Direct,
    Via(PeerId),
}

/// Path state of one destination peer.
#[derive(Debug, Clone)]
struct PathState {
    primary: Hop,
    backup: Option<Hop>,
    active: Hop,
    changes: u64,
    failovers: u64,
}

impl PathState {
    fn direct() -> Self {
        Self {
            primary: Hop::Direct,
            backup: None,
            active: Hop::Direct,
            changes: 0,
            failovers: 0,
        }
    }

    /// Whether `sender` may relay packets from (and to) this destination.
    fn relays(&self, sender: PeerId) -> bool {
        self.primary == Hop::Via(sender) || self.backup == Some(Hop::Via(sender))
    }
}

struct Peer {
    spec: PeerSpec,
    tunn: Tunn,
    /// Our 24-bit session index base for this peer (boringtun shifts it left by 8).
    index: u32,
    endpoint: Option<SocketAddr>,
    counters: PeerCounters,
    link: Link,
    /// The peer's node address (its first IPv4 prefix), named in down lists.
    addr: Option<Ipv4Addr>,
}

impl Peer {
    /// Sends the `len`-byte message just written into `out`'s spare slot to this
    /// peer's endpoint, and counts it; without an endpoint it is dropped.
    fn commit_to_endpoint(
        &mut self,
        out: &mut Transmits,
        len: usize,
        is_data: bool,
    ) -> Option<DropReason> {
        let Some(ep) = self.endpoint else {
            return Some(DropReason::NoEndpoint);
        };
        self.counters.tx_bytes += len as u64;
        if is_data {
            self.counters.tx_packets += 1;
        }
        out.commit(ep, len);
        None
    }
}

pub struct Node {
    key: PrivateKey,
    public: XPublic,
    peers: Vec<Option<Peer>>,
    by_key: HashMap<PublicKey, PeerId>,
    by_index: HashMap<u32, PeerId>,
    routes: RoutingTable<PeerId>,
    limiter: Arc<RateLimiter>,
    drops: [u64; DropReason::ALL.len()],
    cookie_replies: u64,
    next_tick: Instant,
    next_limiter_reset: Instant,
    /// Peers that should start a handshake at the next timeout (keepalive peers).
    pending_initiation: Vec<PeerId>,
    events: VecDeque<Event>,
    rng: StdRng,
    address: Option<IpNet>,
    /// Path state per peer, indexed like `peers` (a separate vector so that a
    /// peer and another's path can be borrowed together).
    paths: Vec<Option<PathState>>,
    /// Whether this node forwards between peers (a transit gateway).
    transit: bool,
    probe: ProbeConfig,
    next_probe: Instant,
    next_check: Instant,
    /// The last non-empty path list applied (an empty one keeps it).
    path_specs: Vec<skymesh_wire::PathSpec>,
    /// Link checks that ran more than [`STALL`] late.
    stalls: u64,
    /// When the last [`Event::Stalled`] was queued, and `stalls` then.
    stall_logged: Option<(Instant, u64)>,
    /// Whether a link check ran yet.
    checked: bool,
}

impl Node {
    /// A node with no peers. `seed` feeds the session-index generator (tests pass a
    /// fixed one; the daemon passes OS randomness).
    pub fn new(key: PrivateKey, seed: u64, now: Instant) -> Self {
        let public = XPublic::from(key.secret());
        Self {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            key,
            public,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: RoutingTable::default(),
            drops: [0; DropReason::ALL.len()],
            cookie_replies: 0,
            next_tick: now,
            next_limiter_reset: now + LIMITER_RESET,
            pending_initiation: Vec::new(),
            events: VecDeque::new(),
            rng: StdRng::seed_from_u64(seed),
            address: None,
            paths: Vec::new(),
            transit: false,
            probe: ProbeConfig::default(),
            next_probe: now,
            next_check: now,
            stalls: 0,
            stall_logged: None,
            checked: false,
            path_specs: Vec::new(),
        }
    }

    /// Sets the probe settings; call before the first [`apply`](Self::apply).
    pub fn set_probe_config(&mut self, config: ProbeConfig) {
        self.probe = config;
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(self.public.to_bytes())
    }

    /// Makes the peer table match `map`, by diff: peers whose key is unchanged keep
    /// their sessions; only routes that changed are reported.
    pub fn apply(&mut self, map: &NetMap, now: Instant) -> Result<ApplyDiff, NetMapError> {
        map.validate()?;
        let mut diff = ApplyDiff::default();
        self.address = Some(map.address);

        // Remove peers no longer present.
        let wanted: HashMap<&PublicKey, &PeerSpec> =
            map.peers.iter().map(|p| (&p.public_key, p)).collect();
        let gone: Vec<PeerId> = self
            .by_key
            .iter()
            .filter(|(k, _)| !wanted.contains_key(k))
            .map(|(_, id)| *id)
            .collect();
        for id in gone {
            if let Some(peer) = self.peers[id.0].take() {
                self.by_key.remove(&peer.spec.public_key);
                self.by_index.remove(&peer.index);
                for net in &peer.spec.allowed_ips {
                    self.routes.remove(*net);
                    diff.routes_removed.push(*net);
                }
                diff.peers_removed.push(peer.spec.name);
            }
        }

        // Routes are rebuilt from scratch below; remember the old set for the diff.
        let mut old_routes: Vec<IpNet> = Vec::new();
        for peer in self.peers.iter().flatten() {
            old_routes.extend(peer.spec.allowed_ips.iter().copied());
            for net in &peer.spec.allowed_ips {
                self.routes.remove(*net);
            }
        }

        for spec in &map.peers {
            match self.by_key.get(&spec.public_key).copied() {
                Some(id) => {
                    let Some(peer) = self.peers[id.0].as_mut() else {
                        continue;
                    };
                    if peer.spec != *spec {
                        diff.peers_updated.push(spec.name.clone());
                        if spec.endpoint.is_some() && spec.endpoint != peer.spec.endpoint {
                            peer.endpoint = spec.endpoint;
                        }
                        if spec.persistent_keepalive != peer.spec.persistent_keepalive {
                            // boringtun fixes keepalive at construction: a new Tunn
                            // (and so a new handshake) is the only way to change it.
                            peer.tunn = Tunn::new(
                                self.key.secret().clone(),
                                XPublic::from(*spec.public_key.as_bytes()),
                                None,
                                spec.persistent_keepalive,
                                peer.index,
                                None,
                            );
                            if spec.persistent_keepalive.is_some() {
                                self.pending_initiation.push(id);
                            }
                        }
                        peer.addr = node_addr(spec);
                        peer.spec = spec.clone();
                    }
                }
                None => {
                    let index = self.fresh_index();
                    let tunn = Tunn::new(
                        self.key.secret().clone(),
                        XPublic::from(*spec.public_key.as_bytes()),
                        None,
                        spec.persistent_keepalive,
                        index,
                        None,
                    );
                    let id = PeerId(match self.peers.iter().position(Option::is_none) {
                        Some(free) => free,
                        None => {
                            self.peers.push(None);
                            self.peers.len() - 1
                        }
                    });
                    self.peers[id.0] = Some(Peer {
                        spec: spec.clone(),
                        tunn,
                        index,
                        endpoint: spec.endpoint,
                        counters: PeerCounters::default(),
                        link: Link::new(self.probe.window, now),
                        addr: node_addr(spec),
                    });
                    self.by_key.insert(spec.public_key, id);
                    self.by_index.insert(index, id);
                    // A gateway handshakes with every peer it can reach as soon as it
                    // knows it, instead of on the first packet: the mesh is ready (and
                    // `status` says so) before traffic, and a restarted agent's peers
                    // switch to the new session at once instead of after their
                    // 15-second retry timer.
                    if spec.endpoint.is_some() {
                        self.pending_initiation.push(id);
                    }
                    diff.peers_added.push(spec.name.clone());
                }
            }
        }

        let mut new_routes: Vec<IpNet> = Vec::new();
        for (i, peer) in self.peers.iter().enumerate() {
            if let Some(peer) = peer {
                for net in &peer.spec.allowed_ips {
                    self.routes.insert(*net, PeerId(i));
                    new_routes.push(*net);
                }
            }
        }
        diff.routes_added = new_routes
            .iter()
            .filter(|n| !old_routes.contains(n))
            .copied()
            .collect();
        diff.routes_removed.extend(
            old_routes
                .iter()
                .filter(|n| !new_routes.contains(n))
                .copied(),
        );
        self.transit = map.transit;
        self.apply_paths(map);
        self.reroute(now);
        self.next_tick = self.next_tick.min(now);
        Ok(diff)
    }

    /// Takes primary and backup paths from the netmap (direct where it names
    /// none). A destination keeps its active path if that is still one of them.
    fn apply_paths(&mut self, map: &NetMap) {
        if !map.paths.is_empty() {
            self.path_specs = map.paths.clone();
        }
        let specs = std::mem::take(&mut self.path_specs);
        self.paths.resize(self.peers.len(), None);
        let resolve = |via: &Via, by_name: &HashMap<&str, PeerId>| match via {
            Via::Direct => Some(Hop::Direct),
            Via::Transit(t) => by_name.get(t.as_str()).map(|id| Hop::Via(*id)),
        };
        let by_name: HashMap<&str, PeerId> = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (p.spec.name.as_str(), PeerId(i))))
            .collect();
        // By destination: a mesh of thousands would otherwise scan the list
        // once per peer on every update.
        let spec_of: HashMap<&str, &skymesh_wire::PathSpec> =
            specs.iter().map(|p| (p.dest.as_str(), p)).collect();
        for i in 0..self.peers.len() {
            let Some(peer) = &self.peers[i] else {
                self.paths[i] = None;
                continue;
            };
            let spec = spec_of.get(peer.spec.name.as_str()).copied();
            let primary = spec
                .and_then(|p| resolve(&p.primary, &by_name))
                .unwrap_or(Hop::Direct);
            let backup = spec
                .and_then(|p| p.backup.as_ref())
                .and_then(|b| resolve(b, &by_name))
                .filter(|b| *b != primary);
            // A new destination starts on its primary: that is no change.
            let state = self.paths[i].get_or_insert_with(|| PathState {
                active: primary,
                ..PathState::direct()
            });
            state.primary = primary;
            state.backup = backup;
            if state.active != primary && Some(state.active) != backup {
                let from = state.active;
                state.active = primary;
                state.changes += 1;
                let (from, to) = (self.via(from), self.via(primary));
                self.events.push_back(Event::PathChanged {
                    dest: peer.spec.name.clone(),
                    from,
                    to,
                    cause: PathCause::Controller,
                });
            }
        }
        self.path_specs = specs;
    }

    /// The `Via` a hop stands for, by name.
    fn via(&self, hop: Hop) -> Via {
        match hop {
            Hop::Direct => Via::Direct,
            Hop::Via(t) => Via::Transit(
                self.peers[t.0]
                    .as_ref()
                    .map(|p| p.spec.name.clone())
                    .unwrap_or_default(),
            ),
        }
    }

    /// The peer that carries traffic for `dest` over `hop`.
    fn first_hop(dest: PeerId, hop: Hop) -> PeerId {
        match hop {
            Hop::Direct => dest,
            Hop::Via(t) => t,
        }
    }

    /// Whether `hop` towards `dest` works now: its first link is up and, through
    /// a transit, the transit has not reported losing `dest`.
    fn hop_ok(&self, dest: PeerId, hop: Hop, settled: bool, now: Instant) -> bool {
        let Some(first) = self.peers[Self::first_hop(dest, hop).0].as_ref() else {
            return false;
        };
        let link_ok = if settled {
            first.link.settled(self.probe.failback_hold, now)
        } else {
            first.link.up()
        };
        let relay_ok = match (hop, self.peers[dest.0].as_ref().and_then(|d| d.addr)) {
            (Hop::Via(_), Some(addr)) => !first.link.peer_cannot_reach(addr),
            _ => true,
        };
        link_ok && relay_ok
    }

    /// Whether the first link of `hop` ever worked (before that, it is not
    /// measured yet and the primary is kept).
    fn hop_known(&self, dest: PeerId, hop: Hop) -> bool {
        self.peers[Self::first_hop(dest, hop).0]
            .as_ref()
            .is_some_and(|p| p.link.known())
    }

    /// Local failover and failback: moves each destination between its primary
    /// and backup paths by the state of their first hops, without the controller.
    fn reroute(&mut self, now: Instant) {
        for i in 0..self.paths.len() {
            let dest = PeerId(i);
            let Some(state) = self.paths[i].clone() else {
                continue;
            };
            let ok = |hop: Hop| self.hop_ok(dest, hop, false, now);
            let backup_ok = state.backup.is_some_and(ok);
            let (want, cause) = if state.active == state.primary {
                if ok(state.primary) || !self.hop_known(dest, state.primary) || !backup_ok {
                    (state.primary, None)
                } else {
                    (
                        state.backup.unwrap_or(state.primary),
                        Some(PathCause::Failover),
                    )
                }
            } else if self.hop_ok(dest, state.primary, true, now) {
                (state.primary, Some(PathCause::Failback))
            } else if backup_ok {
                (state.active, None)
            } else if ok(state.primary) {
                (state.primary, Some(PathCause::Failback))
            } else {
                (state.active, None)
            };
            let (Some(cause), true) = (cause, want != state.active) else {
                continue;
            };
            let (from, to) = (self.via(state.active), self.via(want));
            if let Some(st) = self.paths[i].as_mut() {
                st.active = want;
                st.changes += 1;
                if cause == PathCause::Failover {
                    st.failovers += 1;
                }
            }
            let name = self.peers[i]
                .as_ref()
                .map(|p| p.spec.name.clone())
                .unwrap_or_default();
            self.events.push_back(Event::PathChanged {
                dest: name,
                from,
                to,
                cause,
            });
        }
    }

    /// The peer whose session carries traffic for `dest` now.
    fn next_hop(&self, dest: PeerId) -> PeerId {
        match self.paths.get(dest.0).and_then(Option::as_ref) {
            Some(state) => Self::first_hop(dest, state.active),
            None => dest,
        }
    }

    fn fresh_index(&mut self) -> u32 {
        loop {
            let candidate = self.rng.gen::<u32>() & 0x00FF_FFFF;
            if !self.by_index.contains_key(&candidate) {
                return candidate;
            }
        }
    }

    /// An IP packet read from the TUN device: route it to a peer and encrypt it.
    pub fn handle_tun_packet(&mut self, ip_packet: &[u8], out: &mut Transmits, _now: Instant) {
        let Some(dst) = packet::destination(ip_packet) else {
            self.count_drop(DropReason::Malformed);
            return;
        };
        let Some(dest) = self.routes.lookup(dst) else {
            self.count_drop(DropReason::NoRoute);
            return;
        };
        let id = self.next_hop(dest);
        let Some(peer) = self.peers[id.0].as_mut() else {
            return;
        };
        let slot = out.spare((ip_packet.len() + DATA_OVERHEAD + 16).max(MIN_SLOT));
        let drop = match peer.tunn.encapsulate(ip_packet, slot) {
            TunnResult::WriteToNetwork(msg) => {
                let (len, is_data) = (msg.len(), msg[0] == MSG_DATA);
                peer.commit_to_endpoint(out, len, is_data)
            }
            TunnResult::Done => None, // queued until the handshake completes
            TunnResult::Err(e) => Some(DropReason::from_wireguard(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => None,
        };
        if let Some(reason) = drop {
            self.count_drop(reason);
        }
    }

    /// A datagram from the underlay. Decrypted packets go to `tun`; replies
    /// (handshake responses, cookies, queued packets) go to `out`.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        tun: &mut TunWrites,
        out: &mut Transmits,
        now: Instant,
    ) {
        let parsed = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return self.count_drop(DropReason::Malformed),
        };
        let id = match &parsed {
            Packet::HandshakeInit(init) => {
                // mac1 check and, under load, the cookie dance happen before the
                // expensive DH that identifies the peer.
                let mut cookie = [0u8; 64];
                match self
                    .limiter
                    .verify_packet(Some(from.ip()), datagram, &mut cookie)
                {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        out.push(from, reply);
                        self.cookie_replies += 1;
                        return;
                    }
                    Err(TunnResult::Err(e)) => {
                        return self.count_drop(DropReason::from_wireguard(&e))
                    }
                    Err(_) => return self.count_drop(DropReason::Unexpected),
                }
                let half = match parse_handshake_anon(self.key.secret(), &self.public, init) {
                    Ok(h) => h,
                    Err(e) => return self.count_drop(DropReason::from_wireguard(&e)),
                };
                self.by_key
                    .get(&PublicKey::from_bytes(half.peer_static_public))
                    .copied()
            }
            Packet::HandshakeResponse(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketCookieReply(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Packet::PacketData(p) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
        };
        let is_data = matches!(parsed, Packet::PacketData(_));
        let is_cookie = matches!(parsed, Packet::PacketCookieReply(_));
        let Some(id) = id else {
            return self.count_drop(DropReason::UnknownPeer);
        };
        let Some(peer) = self.peers[id.0].as_mut() else {
            return self.count_drop(DropReason::UnknownPeer);
        };

        let slot = if is_data {
            tun.spare(datagram.len())
        } else {
            out.spare(MIN_SLOT.max(datagram.len()))
        };
        let mut roam = !is_cookie;
        let mut flush = false;
        let mut drop = None;
        let mut forward: Option<(PeerId, usize)> = None;
        let mut reroute = false;
        match peer.tunn.decapsulate(Some(from.ip()), datagram, slot) {
            TunnResult::Done => {}
            TunnResult::WriteToNetwork(reply) => {
                let len = reply.len();
                let is_cookie_reply = reply.first() == Some(&3);
                if is_data {
                    // Not produced for data messages; never write into the TUN batch as a datagram.
                    drop = Some(DropReason::Unexpected);
                } else {
                    peer.counters.tx_bytes += len as u64;
                    out.commit(from, len);
                    flush = true;
                    if is_cookie_reply {
                        // A cookie reply from the per-peer limiter: the message was
                        // not processed, so it proves nothing about the endpoint.
                        self.cookie_replies += 1;
                        roam = false;
                    }
                }
            }
            TunnResult::WriteToTunnelV4(inner, _) | TunnResult::WriteToTunnelV6(inner, _)
                if Probe::is_probe(inner) =>
            {
                // A probe ends here, whatever its addresses: it measures this link.
                match Probe::decode(inner) {
                    Some(probe) => {
                        let had_down = peer.link.reports_down();
                        let change = peer.link.handle_probe(&probe, now);
                        if change == Some(Transition::Up) {
                            self.events.push_back(Event::LinkUp {
                                peer: peer.spec.name.clone(),
                            });
                        }
                        reroute = change.is_some() || had_down || peer.link.reports_down();
                    }
                    None => drop = Some(DropReason::InvalidInner),
                }
            }
            TunnResult::WriteToTunnelV4(inner, _) | TunnResult::WriteToTunnelV6(inner, _) => {
                let len = inner.len();
                // Cryptokey routing: the inner source must route back to this peer,
                // or belong to a node whose path this peer relays (it is our
                // transit towards that node, primary or backup).
                let owner = packet::source(inner).and_then(|src| self.routes.lookup(src));
                let allowed = owner == Some(id)
                    || owner.is_some_and(|o| {
                        self.paths
                            .get(o.0)
                            .and_then(Option::as_ref)
                            .is_some_and(|st| st.relays(id))
                    });
                // A transit node forwards what is for another peer, directly to
                // it: never through a second transit, so nothing can loop.
                let onward = if self.transit {
                    packet::destination(inner)
                        .and_then(|dst| self.routes.lookup(dst))
                        .filter(|p| *p != id)
                } else {
                    None
                };
                if !allowed {
                    drop = Some(DropReason::SourceNotAllowed);
                } else if let Some(next) = onward {
                    // Only the sender's own traffic is relayed: a packet a peer
                    // relays for a third node is for us, never onward (that would
                    // be a second transit hop and would launder its source).
                    if owner == Some(id) {
                        forward = Some((next, len));
                    } else {
                        drop = Some(DropReason::SourceNotAllowed);
                    }
                } else {
                    tun.commit((), len);
                }
            }
            TunnResult::Err(e) => {
                roam = false;
                drop = Some(DropReason::from_wireguard(&e));
            }
        }
        if drop.is_none() || drop == Some(DropReason::SourceNotAllowed) {
            // Authenticated: count it and follow the peer's endpoint (roaming).
            peer.counters.rx_bytes += datagram.len() as u64;
            if is_data {
                peer.counters.rx_packets += 1;
            }
        }
        if roam && drop.is_none() && peer.endpoint != Some(from) {
            self.events.push_back(Event::EndpointChanged {
                peer: peer.spec.name.clone(),
                from: peer.endpoint,
                to: from,
            });
            peer.endpoint = Some(from);
        }
        if flush || (is_data && drop.is_none()) {
            // Packets queued while no session was usable can leave now: after our
            // handshake completed, or after the peer's first data packet confirmed
            // the session we answered (both sides initiating at once).
            Self::flush_queue(peer, out);
        }
        if let Some(reason) = drop {
            self.count_drop(reason);
        }
        if let Some((next, len)) = forward {
            self.forward(next, len, tun, out);
        }
        if reroute {
            self.reroute(now);
        }
    }

    /// Transit: re-encrypts the decrypted packet left in `tun`'s spare space
    /// (`len` bytes) to peer `next`.
    fn forward(&mut self, next: PeerId, len: usize, tun: &mut TunWrites, out: &mut Transmits) {
        let inner = &mut tun.spare(len)[..len];
        if !packet::decrement_ttl(inner) {
            return self.count_drop(DropReason::TtlExceeded);
        }
        let Some(peer) = self.peers[next.0].as_mut() else {
            return self.count_drop(DropReason::NoRoute);
        };
        let slot = out.spare((len + DATA_OVERHEAD + 16).max(MIN_SLOT));
        let drop = match peer.tunn.encapsulate(inner, slot) {
            TunnResult::WriteToNetwork(msg) => {
                let (len, is_data) = (msg.len(), msg[0] == MSG_DATA);
                peer.commit_to_endpoint(out, len, is_data)
            }
            TunnResult::Err(e) => Some(DropReason::from_wireguard(&e)),
            _ => None,
        };
        if let Some(reason) = drop {
            self.count_drop(reason);
        }
    }

    fn flush_queue(peer: &mut Peer, out: &mut Transmits) {
        loop {
            let slot = out.spare(crate::batch::MAX_PACKET);
            let TunnResult::WriteToNetwork(msg) = peer.tunn.decapsulate(None, &[], slot) else {
                break;
            };
            let len = msg.len();
            if peer.commit_to_endpoint(out, len, true).is_some() {
                break;
            }
        }
    }

    /// Drives session timers (handshake retries, rekeying, keepalives) and the
    /// handshake rate limiter. Call when [`poll_timeout`](Self::poll_timeout) is due.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Transmits) {
        self.handle_timeout_woken(now, now, out);
    }

    /// [`handle_timeout`](Self::handle_timeout) for a caller that woke at
    /// `woke` and did other work (reading its socket) before `now`: only how
    /// late the wake-up was counts as the agent standing still.
    pub fn handle_timeout_woken(&mut self, woke: Instant, now: Instant, out: &mut Transmits) {
        if now >= self.next_limiter_reset {
            self.limiter.reset_count();
            self.next_limiter_reset = now + LIMITER_RESET;
        }
        if now >= self.next_probe {
            self.send_probes(now, out);
            self.next_probe = (self.next_probe + self.probe.interval).max(now);
        }
        if now >= self.next_check {
            // Late against the schedule of a previous check (the first has none).
            let late = woke.min(now).saturating_duration_since(self.next_check);
            if self.checked && late > STALL {
                self.stalls += 1;
                let (from, to) = (self.next_check, self.next_check + late);
                for peer in self.peers.iter_mut().flatten() {
                    peer.link.stood_still(from, to);
                }
                // One log line per STALL_LOG_EVERY at most, with the count.
                if self
                    .stall_logged
                    .is_none_or(|(at, _)| now.saturating_duration_since(at) >= STALL_LOG_EVERY)
                {
                    let count = self.stalls - self.stall_logged.map_or(0, |(_, n)| n);
                    self.stall_logged = Some((now, self.stalls));
                    self.events.push_back(Event::Stalled { late, count });
                }
            }
            self.check_links(now);
            self.checked = true;
            self.next_check = now + (self.probe.interval / 4).min(Duration::from_millis(25));
        }
        for id in std::mem::take(&mut self.pending_initiation) {
            let Some(peer) = self.peers[id.0].as_mut() else {
                continue;
            };
            if peer.endpoint.is_some() {
                let slot = out.spare(MIN_SLOT);
                if let TunnResult::WriteToNetwork(msg) =
                    peer.tunn.format_handshake_initiation(slot, false)
                {
                    let len = msg.len();
                    peer.commit_to_endpoint(out, len, false);
                }
            }
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        let mut no_endpoint = 0;
        for peer in self.peers.iter_mut().flatten() {
            let slot = out.spare(MIN_SLOT);
            match peer.tunn.update_timers(slot) {
                TunnResult::WriteToNetwork(msg) => {
                    let (len, is_data) = (msg.len(), msg[0] == MSG_DATA);
                    if peer.commit_to_endpoint(out, len, is_data).is_some() {
                        no_endpoint += 1;
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    self.events.push_back(Event::SessionExpired {
                        peer: peer.spec.name.clone(),
                    });
                }
                _ => {}
            }
        }
        self.count_drops(DropReason::NoEndpoint, no_endpoint);
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
            .min(self.next_limiter_reset)
            .min(self.next_probe)
            .min(self.next_check)
    }

    /// One probe to every peer with a session; a handshake to those without.
    fn send_probes(&mut self, now: Instant, out: &mut Transmits) {
        let down: Vec<Ipv4Addr> = self
            .peers
            .iter()
            .flatten()
            .filter(|p| p.link.reports_down_self())
            .filter_map(|p| p.addr)
            .collect();
        let src = match self.address.map(|a| a.addr()) {
            Some(IpAddr::V4(v4)) => v4,
            _ => Ipv4Addr::UNSPECIFIED,
        };
        let mut buf = [0u8; 20 + 12 + 4 * crate::probe::MAX_DOWN];
        for peer in self.peers.iter_mut().flatten() {
            if peer.endpoint.is_none() {
                continue;
            }
            let fresh = peer.tunn.stats().0.is_some_and(|age| age < SESSION_FRESH);
            let slot = out.spare(MIN_SLOT.max(buf.len() + DATA_OVERHEAD + 16));
            let result = if fresh {
                let probe = peer.link.next_probe(down.clone(), now);
                let len = probe.encode(src, peer.addr.unwrap_or(Ipv4Addr::UNSPECIFIED), &mut buf);
                peer.tunn.encapsulate(&buf[..len], slot)
            } else {
                // No usable session (never made, or expired during a long
                // outage): start one; nothing happens while one is in progress.
                peer.tunn.format_handshake_initiation(slot, false)
            };
            if let TunnResult::WriteToNetwork(msg) = result {
                let (len, is_data) = (msg.len(), msg[0] == MSG_DATA);
                peer.commit_to_endpoint(out, len, is_data);
            }
        }
    }

    /// Whether the link check due at `now` could declare a link down (judged
    /// as if it ran on time): the caller may first read what waits in its
    /// socket (see the daemon's timers).
    pub fn link_check_would_fail(&self, now: Instant) -> bool {
        now >= self.next_check
            && self
                .peers
                .iter()
                .flatten()
                .any(|p| p.link.failing(&self.probe, now).is_some())
    }

    /// Declares links down whose probes stopped, and fails over around them.
    fn check_links(&mut self, now: Instant) {
        for peer in self.peers.iter_mut().flatten() {
            if let Some(Transition::Down(cause)) = peer.link.check(&self.probe, now) {
                self.events.push_back(Event::LinkDown {
                    peer: peer.spec.name.clone(),
                    cause,
                });
            }
        }
        // Failback waits for a hold time that no packet signals: look every check.
        self.reroute(now);
    }

    /// Every link's measurements, by peer name.
    pub fn links(&self) -> Vec<LinkStatus> {
        let mut out: Vec<LinkStatus> = self
            .peers
            .iter()
            .flatten()
            .map(|p| LinkStatus {
                peer: p.spec.name.clone(),
                up: p.link.up(),
                rtt: p.link.rtt(),
                jitter: p.link.jitter(),
                loss: p.link.loss(),
                probes_sent: p.link.probes_sent(),
                probes_received: p.link.probes_received(),
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// Every destination's paths, by peer name.
    pub fn paths(&self) -> Vec<PathStatus> {
        let mut out: Vec<PathStatus> = self
            .paths
            .iter()
            .enumerate()
            .filter_map(|(i, st)| {
                let st = st.as_ref()?;
                let peer = self.peers.get(i)?.as_ref()?;
                Some(PathStatus {
                    dest: peer.spec.name.clone(),
                    primary: self.via(st.primary),
                    backup: st.backup.map(|b| self.via(b)),
                    active: self.via(st.active),
                    changes: st.changes,
                    failovers: st.failovers,
                })
            })
            .collect();
        out.sort_by(|a, b| a.dest.cmp(&b.dest));
        out
    }

    /// What the controller gets: every link with at least one RTT sample.
    pub fn link_report(&self) -> skymesh_wire::LinkReport {
        let micros = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        skymesh_wire::LinkReport {
            links: self
                .links()
                .into_iter()
                .filter_map(|l| {
                    Some(skymesh_wire::LinkSample {
                        rtt_us: micros(l.rtt?),
                        jitter_us: micros(l.jitter),
                        loss_ppm: (l.loss * 1e6).round() as u32,
                        up: l.up,
                        peer: l.peer,
                    })
                })
                .collect(),
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Counts a drop seen by a driver (send or TUN write failures).
    pub fn count_drop(&mut self, reason: DropReason) {
        self.count_drops(reason, 1);
    }

    /// Counts `n` drops of one reason at once (a failed batch).
    pub fn count_drops(&mut self, reason: DropReason, n: u64) {
        self.drops[reason.index()] += n;
    }

    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops[r.index()]))
    }

    pub fn cookie_replies(&self) -> u64 {
        self.cookie_replies
    }

    /// Link checks that ran more than [`STALL`] late (that time is not silence).
    pub fn stalls(&self) -> u64 {
        self.stalls
    }

    pub fn address(&self) -> Option<IpNet> {
        self.address
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut out: Vec<PeerStatus> = self
            .peers
            .iter()
            .flatten()
            .map(|p| PeerStatus {
                name: p.spec.name.clone(),
                public_key: p.spec.public_key,
                endpoint: p.endpoint,
                allowed_ips: p.spec.allowed_ips.clone(),
                persistent_keepalive: p.spec.persistent_keepalive,
                since_handshake: p.tunn.stats().0,
                counters: p.counters,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// A peer's node address: the first IPv4 address it may send from (its overlay
/// address in controller mode).
fn node_addr(spec: &PeerSpec) -> Option<Ipv4Addr> {
    spec.allowed_ips.iter().find_map(|net| match net.addr() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::ipv4_packet;
    use skymesh_wire::PROTOCOL_VERSION;
    use std::net::Ipv4Addr;

    const A_UNDERLAY: &str = "192.0.2.1:51820";
    const B_UNDERLAY: &str = "192.0.2.2:51820";

    fn sock(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    struct Pair {
        a: Node,
        b: Node,
        now: Instant,
    }

    fn spec(
        name: &str,
        key: PublicKey,
        endpoint: Option<&str>,
        ips: &[&str],
        keepalive: Option<u16>,
    ) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            public_key: key,
            endpoint: endpoint.map(sock),
            allowed_ips: ips.iter().map(|s| s.parse().expect("cidr")).collect(),
            persistent_keepalive: keepalive,
        }
    }

    fn map(address: &str, peers: Vec<PeerSpec>) -> NetMap {
        NetMap {
            version: PROTOCOL_VERSION,
            address: address.parse().expect("cidr"),
            mtu: 1420,
            peers,
            transit: false,
            paths: Vec::new(),
        }
    }

    /// Two nodes: A knows B's endpoint, B learns A's from its packets.
    fn pair() -> Pair {
        pair_with(None)
    }

    /// Two nodes; A knows B's endpoint, and B knows A's if `b_knows_a` is given.
    fn pair_with(b_knows_a: Option<&str>) -> Pair {
        let now = Instant::now();
        let (ka, kb) = (
            PrivateKey::from_bytes([1; 32]),
            PrivateKey::from_bytes([2; 32]),
        );
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let mut a = Node::new(ka, 1, now);
        let mut b = Node::new(kb, 2, now);
        a.apply(
            &map(
                "100.96.0.1/32",
                vec![spec(
                    "b",
                    pb,
                    Some(B_UNDERLAY),
                    &["100.96.0.2/32", "10.10.0.0/16"],
                    None,
                )],
            ),
            now,
        )
        .expect("apply a");
        b.apply(
            &map(
                "100.96.0.2/32",
                vec![spec(
                    "a",
                    pa,
                    b_knows_a,
                    &["100.96.0.1/32", "10.0.0.0/16"],
                    None,
                )],
            ),
            now,
        )
        .expect("apply b");
        Pair { a, b, now }
    }

    /// Delivers everything in `out` from `from_addr` to `to`; returns what `to` wrote to its TUN.
    fn deliver(
        to: &mut Node,
        from_addr: &str,
        out: &Transmits,
        replies: &mut Transmits,
        now: Instant,
    ) -> Vec<Vec<u8>> {
        let mut tun = TunWrites::with_capacity(4);
        for (_, d) in out.iter() {
            to.handle_datagram(sock(from_addr), d, &mut tun, replies, now);
        }
        tun.iter().map(|(_, p)| p.to_vec()).collect()
    }

    fn drops_of(n: &Node, reason: DropReason) -> u64 {
        n.drops()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| c)
            .unwrap_or(0)
    }

    /// A encrypts an IPv4 packet `src → dst`; B receives the result from `from`.
    /// Returns what B wrote to its TUN.
    fn a_to_b(p: &mut Pair, src: &str, dst: &str, payload: &[u8], from: &str) -> Vec<Vec<u8>> {
        let mut out = Transmits::with_capacity(2);
        p.a.handle_tun_packet(&ipv4_packet(ip(src), ip(dst), payload), &mut out, p.now);
        let mut sink = Transmits::with_capacity(1);
        deliver(&mut p.b, from, &out, &mut sink, p.now)
    }

    /// Runs the handshake triggered by A's first packet; returns the packet B received.
    fn first_packet(p: &mut Pair, payload: &[u8]) -> Vec<Vec<u8>> {
        let pkt = ipv4_packet(ip("100.96.0.1"), ip("100.96.0.2"), payload);
        let mut a_out = Transmits::with_capacity(4);
        p.a.handle_tun_packet(&pkt, &mut a_out, p.now);
        assert_eq!(a_out.len(), 1, "a handshake initiation");
        let (dst, init) = a_out.iter().next().expect("init");
        assert_eq!(dst, sock(B_UNDERLAY));
        assert_eq!(init[0], 1);
        let mut b_out = Transmits::with_capacity(4);
        assert!(deliver(&mut p.b, A_UNDERLAY, &a_out, &mut b_out, p.now).is_empty());
        let (dst, resp) = b_out.iter().next().expect("response");
        assert_eq!(
            dst,
            sock(A_UNDERLAY),
            "B answers where the initiation came from"
        );
        assert_eq!(resp[0], 2);
        let mut a_out2 = Transmits::with_capacity(4);
        deliver(&mut p.a, B_UNDERLAY, &b_out, &mut a_out2, p.now);
        // Keepalive confirming the session, then the queued packet.
        assert_eq!(a_out2.len(), 2);
        let mut sink = Transmits::with_capacity(4);
        deliver(&mut p.b, A_UNDERLAY, &a_out2, &mut sink, p.now)
    }

    #[test]
    fn handshake_then_data_reaches_the_peer_tun() {
        let mut p = pair();
        let got = first_packet(&mut p, b"hello");
        assert_eq!(
            got,
            vec![ipv4_packet(ip("100.96.0.1"), ip("100.96.0.2"), b"hello")]
        );
        let b_peer = &p.b.peers()[0];
        assert_eq!(
            b_peer.endpoint,
            Some(sock(A_UNDERLAY)),
            "B learned A's endpoint"
        );
        assert_eq!(b_peer.counters.rx_packets, 2);
        assert!(b_peer.since_handshake.is_some());
        assert_eq!(
            p.b.poll_event(),
            Some(Event::EndpointChanged {
                peer: "a".into(),
                from: None,
                to: sock(A_UNDERLAY)
            })
        );

        // Later packets go straight out as data, and back the other way too.
        let mut out = Transmits::with_capacity(4);
        p.b.handle_tun_packet(
            &ipv4_packet(ip("100.96.0.2"), ip("10.0.3.4"), b"reply"),
            &mut out,
            p.now,
        );
        assert_eq!(
            out.iter().next().map(|(d, m)| (d, m[0])),
            Some((sock(A_UNDERLAY), MSG_DATA))
        );
        let mut sink = Transmits::with_capacity(1);
        let got = deliver(&mut p.a, B_UNDERLAY, &out, &mut sink, p.now);
        assert_eq!(
            got,
            vec![ipv4_packet(ip("100.96.0.2"), ip("10.0.3.4"), b"reply")]
        );
    }

    #[test]
    fn source_outside_allowed_ips_is_dropped() {
        let mut p = pair();
        first_packet(&mut p, b"hi");
        // A sends with a source B does not accept from A (10.99/16 is nobody's).
        assert!(a_to_b(&mut p, "10.99.0.1", "10.10.0.5", b"spoof", A_UNDERLAY).is_empty());
        assert_eq!(drops_of(&p.b, DropReason::SourceNotAllowed), 1);
    }

    #[test]
    fn replay_and_garbage_are_counted_and_harmless() {
        let mut p = pair();
        first_packet(&mut p, b"hi");
        let mut out = Transmits::with_capacity(2);
        let once = ipv4_packet(ip("100.96.0.1"), ip("100.96.0.2"), b"once");
        p.a.handle_tun_packet(&once, &mut out, p.now);
        let mut sink = Transmits::with_capacity(1);
        assert_eq!(
            deliver(&mut p.b, A_UNDERLAY, &out, &mut sink, p.now),
            vec![once]
        );
        // The same datagram again, from another address: dropped, endpoint unchanged.
        assert!(deliver(&mut p.b, "203.0.113.9:4444", &out, &mut sink, p.now).is_empty());
        assert_eq!(drops_of(&p.b, DropReason::Replay), 1);
        assert_eq!(p.b.peers()[0].endpoint, Some(sock(A_UNDERLAY)));

        let mut tun = TunWrites::with_capacity(1);
        let unknown_index = [
            4u8, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
            12, 13, 14, 15, 16,
        ];
        for garbage in [
            &b""[..],
            b"\x01",
            b"\x04\0\0\0garbage",
            &[0xff; 200],
            &unknown_index,
        ] {
            p.b.handle_datagram(
                sock("203.0.113.9:4444"),
                garbage,
                &mut tun,
                &mut sink,
                p.now,
            );
        }
        assert!(tun.is_empty());
        assert!(drops_of(&p.b, DropReason::Malformed) >= 3);
        assert!(drops_of(&p.b, DropReason::UnknownPeer) >= 1);
        // The tunnel still works.
        assert_eq!(
            a_to_b(&mut p, "100.96.0.1", "100.96.0.2", b"after", A_UNDERLAY).len(),
            1
        );
    }

    #[test]
    fn roaming_follows_authenticated_packets() {
        let mut p = pair();
        first_packet(&mut p, b"hi");
        assert_eq!(
            a_to_b(
                &mut p,
                "100.96.0.1",
                "100.96.0.2",
                b"moved",
                "198.51.100.50:40000"
            )
            .len(),
            1
        );
        assert_eq!(p.b.peers()[0].endpoint, Some(sock("198.51.100.50:40000")));
    }

    #[test]
    fn no_route_and_no_endpoint_are_counted() {
        let mut p = pair();
        let mut out = Transmits::with_capacity(2);
        p.a.handle_tun_packet(
            &ipv4_packet(ip("100.96.0.1"), ip("10.50.0.1"), b"x"),
            &mut out,
            p.now,
        );
        assert!(out.is_empty());
        assert_eq!(drops_of(&p.a, DropReason::NoRoute), 1);
        // B does not know where A is until A speaks first.
        p.b.handle_tun_packet(
            &ipv4_packet(ip("100.96.0.2"), ip("100.96.0.1"), b"x"),
            &mut out,
            p.now,
        );
        assert!(out.is_empty());
        assert_eq!(drops_of(&p.b, DropReason::NoEndpoint), 1);
    }

    #[test]
    fn apply_by_diff_keeps_sessions_and_reports_routes() {
        let mut p = pair();
        first_packet(&mut p, b"hi");
        let pb = PrivateKey::from_bytes([2; 32]).public_key();
        let pc = PrivateKey::from_bytes([3; 32]).public_key();
        let diff =
            p.a.apply(
                &map(
                    "100.96.0.1/32",
                    vec![
                        spec(
                            "b",
                            pb,
                            Some(B_UNDERLAY),
                            &["100.96.0.2/32", "10.10.0.0/16", "10.11.0.0/16"],
                            None,
                        ),
                        spec("c", pc, None, &["100.96.0.3/32"], None),
                    ],
                ),
                p.now,
            )
            .expect("apply");
        assert_eq!(
            diff.routes_added,
            vec![
                "10.11.0.0/16".parse().expect("cidr"),
                "100.96.0.3/32".parse().expect("cidr")
            ]
        );
        assert!(diff.routes_removed.is_empty());
        assert_eq!(diff.peers_added, vec!["c".to_string()]);
        assert_eq!(diff.peers_updated, vec!["b".to_string()]);
        // The session with B survived: the next packet is data, not a new handshake.
        let mut out = Transmits::with_capacity(2);
        p.a.handle_tun_packet(
            &ipv4_packet(ip("100.96.0.1"), ip("10.11.0.9"), b"x"),
            &mut out,
            p.now,
        );
        assert_eq!(out.iter().next().map(|(_, m)| m[0]), Some(MSG_DATA));

        let diff =
            p.a.apply(&map("100.96.0.1/32", vec![]), p.now)
                .expect("apply");
        assert_eq!(diff.peers_removed.len(), 2);
        assert_eq!(diff.routes_removed.len(), 4);
        let mut out = Transmits::with_capacity(2);
        p.a.handle_tun_packet(
            &ipv4_packet(ip("100.96.0.1"), ip("100.96.0.2"), b"x"),
            &mut out,
            p.now,
        );
        assert_eq!(drops_of(&p.a, DropReason::NoRoute), 1);
    }

    #[test]
    fn peers_with_endpoints_initiate_at_once_and_timers_tick_on_injected_time() {
        let now = Instant::now();
        let ka = PrivateKey::from_bytes([1; 32]);
        let pb = PrivateKey::from_bytes([2; 32]).public_key();
        let mut a = Node::new(ka, 7, now);
        a.apply(
            &map(
                "100.96.0.1/32",
                vec![
                    spec("b", pb, Some(B_UNDERLAY), &["100.96.0.2/32"], None),
                    // Without an endpoint there is nobody to call: it waits for the peer.
                    spec(
                        "c",
                        PrivateKey::from_bytes([3; 32]).public_key(),
                        None,
                        &["100.96.0.3/32"],
                        None,
                    ),
                ],
            ),
            now,
        )
        .expect("apply");
        assert!(a.poll_timeout() <= now, "due at once");
        let mut out = Transmits::with_capacity(2);
        a.handle_timeout(now, &mut out);
        assert_eq!(out.len(), 1, "one initiation, to the peer with an endpoint");
        assert_eq!(
            out.iter().next().map(|(d, m)| (d, m[0])),
            Some((sock(B_UNDERLAY), 1))
        );
        // Link checks run every 25 ms; they send nothing.
        assert_eq!(a.poll_timeout(), now + Duration::from_millis(25));
        out.clear();
        a.handle_timeout(now + Duration::from_millis(100), &mut out);
        assert!(
            out.is_empty(),
            "no probe without a session, no second initiation while one is in progress"
        );
    }

    /// Both gateways initiate at once and A's initiation is lost: A answers B's,
    /// queues its own traffic, and sends it as soon as B's keepalive confirms the
    /// session, without waiting for a handshake of its own to complete.
    #[test]
    fn simultaneous_initiation_flushes_queue_on_confirmation() {
        let p = pair_with(Some(A_UNDERLAY));
        let (mut a, mut b, now) = (p.a, p.b, p.now);
        let (mut a_init, mut b_init) = (Transmits::with_capacity(2), Transmits::with_capacity(2));
        a.handle_timeout(now, &mut a_init); // lost on the way
        b.handle_timeout(now, &mut b_init);
        let mut a_resp = Transmits::with_capacity(2);
        assert!(deliver(&mut a, B_UNDERLAY, &b_init, &mut a_resp, now).is_empty());
        let ping = ipv4_packet(ip("100.96.0.1"), ip("100.96.0.2"), b"early");
        let mut queued = Transmits::with_capacity(2);
        a.handle_tun_packet(&ping, &mut queued, now);
        assert!(
            queued.iter().all(|(_, m)| m[0] != MSG_DATA),
            "A has no confirmed session yet: the packet waits (A may start a handshake)"
        );
        let mut b_keepalive = Transmits::with_capacity(2);
        deliver(&mut b, A_UNDERLAY, &a_resp, &mut b_keepalive, now);
        let mut a_out = Transmits::with_capacity(2);
        deliver(&mut a, B_UNDERLAY, &b_keepalive, &mut a_out, now);
        assert_eq!(
            a_out.len(),
            1,
            "the queued packet leaves with the confirmation"
        );
        let mut sink = Transmits::with_capacity(1);
        assert_eq!(
            deliver(&mut b, A_UNDERLAY, &a_out, &mut sink, now),
            vec![ping]
        );
    }

    #[test]
    fn handshake_flood_gets_cookie_replies() {
        let now = Instant::now();
        let kb = PrivateKey::from_bytes([2; 32]);
        let pa = PrivateKey::from_bytes([1; 32]).public_key();
        let mut b = Node::new(kb.clone(), 2, now);
        b.apply(
            &map(
                "100.96.0.2/32",
                vec![spec("a", pa, None, &["100.96.0.1/32"], None)],
            ),
            now,
        )
        .expect("apply");
        let mut attacker = Tunn::new(
            PrivateKey::from_bytes([1; 32]).secret().clone(),
            XPublic::from(*kb.public_key().as_bytes()),
            None,
            None,
            1,
            None,
        );
        let mut tun = TunWrites::with_capacity(1);
        let mut out = Transmits::with_capacity(8);
        let mut buf = [0u8; 256];
        for _ in 0..(HANDSHAKE_RATE_LIMIT + 20) {
            if let TunnResult::WriteToNetwork(init) =
                attacker.format_handshake_initiation(&mut buf, true)
            {
                let init = init.to_vec();
                b.handle_datagram(sock("203.0.113.5:1000"), &init, &mut tun, &mut out, now);
            }
        }
        assert!(b.cookie_replies() > 0);
        assert!(out.iter().any(|(_, m)| m[0] == 3 && m.len() == 64));
        // Below the limit, initiations were answered with real responses.
        assert!(out.iter().any(|(_, m)| m[0] == 2 && m.len() == 92));
    }

    /// A simulated underlay for several nodes: per-pair one-way delays, cuts,
    /// and injected time. Everything a node writes to its TUN is collected.
    mod sim {
        use super::*;
        use std::cmp::Reverse;
        use std::collections::{BTreeMap, BinaryHeap, HashSet};

        /// A datagram on the wire: arrival, tie-break, from, to, bytes.
        type InFlight = (Instant, u64, usize, usize, Vec<u8>);

        pub struct Net {
            pub nodes: Vec<Node>,
            pub names: Vec<&'static str>,
            pub now: Instant,
            delay: BTreeMap<(usize, usize), Duration>,
            pub cut: HashSet<(usize, usize)>,
            queue: BinaryHeap<Reverse<InFlight>>,
            seq: u64,
            pub tun: Vec<Vec<Vec<u8>>>,
            /// Node i does not run before this (a stalled process).
            asleep_until: Vec<Instant>,
        }

        pub fn underlay(i: usize) -> SocketAddr {
            SocketAddr::from(([192, 0, 2, i as u8 + 1], 51820))
        }

        fn index_of(addr: SocketAddr) -> usize {
            match addr.ip() {
                IpAddr::V4(v4) => usize::from(v4.octets()[3]) - 1,
                IpAddr::V6(_) => usize::MAX,
            }
        }

        impl Net {
            /// Nodes named `names`; node i has overlay 100.96.0.(i+1) and VPC 10.i.0.0/16.
            pub fn new(names: &[&'static str], probe: ProbeConfig) -> Self {
                let now = Instant::now();
                let nodes = (0..names.len())
                    .map(|i| {
                        let mut n =
                            Node::new(PrivateKey::from_bytes([i as u8 + 1; 32]), i as u64, now);
                        n.set_probe_config(probe);
                        n
                    })
                    .collect();
                Self {
                    nodes,
                    names: names.to_vec(),
                    now,
                    delay: BTreeMap::new(),
                    cut: HashSet::new(),
                    queue: BinaryHeap::new(),
                    seq: 0,
                    tun: vec![Vec::new(); names.len()],
                    asleep_until: vec![now; names.len()],
                }
            }

            pub fn overlay(i: usize) -> Ipv4Addr {
                Ipv4Addr::new(100, 96, 0, i as u8 + 1)
            }

            pub fn vpc_host(i: usize, host: u8) -> Ipv4Addr {
                Ipv4Addr::new(10, i as u8, 0, host)
            }

            /// Node `i`'s netmap: every other node a peer; `paths` as (dest, primary, backup).
            pub fn apply(&mut self, i: usize, transit: bool, paths: &[(&str, &str, Option<&str>)]) {
                let peers = (0..self.names.len())
                    .filter(|j| *j != i)
                    .map(|j| PeerSpec {
                        name: self.names[j].into(),
                        public_key: PrivateKey::from_bytes([j as u8 + 1; 32]).public_key(),
                        endpoint: Some(underlay(j)),
                        allowed_ips: vec![
                            format!("{}/32", Self::overlay(j)).parse().expect("cidr"),
                            format!("10.{j}.0.0/16").parse().expect("cidr"),
                        ],
                        persistent_keepalive: None,
                    })
                    .collect();
                let mut m = map(&format!("{}/32", Self::overlay(i)), peers);
                m.transit = transit;
                m.paths = paths
                    .iter()
                    .map(|(d, p, b)| skymesh_wire::PathSpec {
                        dest: (*d).into(),
                        primary: Via::from_label(p),
                        backup: b.map(Via::from_label),
                    })
                    .collect();
                let now = self.now;
                self.nodes[i].apply(&m, now).expect("apply");
            }

            pub fn set_delay(&mut self, a: usize, b: usize, one_way: Duration) {
                self.delay.insert((a, b), one_way);
                self.delay.insert((b, a), one_way);
            }

            pub fn set_cut(&mut self, a: usize, b: usize, cut: bool) {
                for k in [(a, b), (b, a)] {
                    if cut {
                        self.cut.insert(k);
                    } else {
                        self.cut.remove(&k);
                    }
                }
            }

            fn send(&mut self, from: usize, out: &Transmits) {
                for (to, d) in out.iter() {
                    let to = index_of(to);
                    if to >= self.nodes.len() || self.cut.contains(&(from, to)) {
                        continue;
                    }
                    let delay = self.delay.get(&(from, to)).copied().unwrap_or_default();
                    // Arriving while `to` is stalled: read just after it wakes.
                    let at = if self.now + delay < self.asleep_until[to] {
                        self.asleep_until[to] + Duration::from_micros(1)
                    } else {
                        self.now + delay
                    };
                    self.seq += 1;
                    self.queue
                        .push(Reverse((at, self.seq, from, to, d.to_vec())));
                }
            }

            /// A packet entering node `i` from its TUN.
            pub fn inject(&mut self, i: usize, packet: &[u8]) {
                let mut out = Transmits::with_capacity(2);
                let now = self.now;
                self.nodes[i].handle_tun_packet(packet, &mut out, now);
                self.send(i, &out);
            }

            /// Node `i` is not scheduled for `d` from now: its timers wait, and
            /// so do packets for it. When it wakes, its overdue timers run before
            /// it reads what queued up (the worse order for link checks).
            pub fn stall(&mut self, i: usize, d: Duration) {
                self.asleep_until[i] = self.now + d;
            }

            /// Runs the network for `d` of simulated time.
            pub fn run(&mut self, d: Duration) {
                let end = self.now + d;
                loop {
                    let timer = self
                        .nodes
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (n.poll_timeout().max(self.asleep_until[i]), i))
                        .min()
                        .expect("nodes");
                    let packet = self.queue.peek().map(|Reverse(e)| e.0);
                    let next = packet.map_or(timer.0, |p| p.min(timer.0));
                    if next > end {
                        self.now = end;
                        return;
                    }
                    self.now = self.now.max(next);
                    let now = self.now;
                    let mut out = Transmits::with_capacity(8);
                    if packet.is_some_and(|p| p <= timer.0) {
                        let Some(Reverse((_, _, from, to, data))) = self.queue.pop() else {
                            continue;
                        };
                        let mut tun = TunWrites::with_capacity(2);
                        self.nodes[to].handle_datagram(
                            underlay(from),
                            &data,
                            &mut tun,
                            &mut out,
                            now,
                        );
                        self.tun[to].extend(tun.iter().map(|(_, p)| p.to_vec()));
                        self.send(to, &out);
                    } else {
                        let i = timer.1;
                        self.nodes[i].handle_timeout(now, &mut out);
                        self.send(i, &out);
                    }
                }
            }

            pub fn link(&self, i: usize, peer: &str) -> LinkStatus {
                self.nodes[i]
                    .links()
                    .into_iter()
                    .find(|l| l.peer == peer)
                    .expect("link")
            }

            pub fn path_of(&self, i: usize, dest: &str) -> PathStatus {
                self.nodes[i]
                    .paths()
                    .into_iter()
                    .find(|r| r.dest == dest)
                    .expect("route")
            }

            /// Sends a UDP-ish packet from a VPC host of `from` to one of `to`
            /// and returns whether it came out of `to`'s TUN.
            pub fn reaches(&mut self, from: usize, to: usize, marker: &[u8]) -> bool {
                let p = ipv4_packet(Self::vpc_host(from, 5), Self::vpc_host(to, 7), marker);
                self.inject(from, &p);
                self.run(Duration::from_millis(400));
                self.tun[to].iter().any(|q| q.ends_with(marker))
            }
        }
    }

    use sim::Net;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// aws(0) - azure(1, transit) - alibaba(2), aws-alibaba long and primary via azure.
    fn transit_net() -> Net {
        let mut net = Net::new(&["aws", "azure", "alibaba"], ProbeConfig::default());
        net.set_delay(0, 1, ms(75));
        net.set_delay(1, 2, ms(15));
        net.set_delay(0, 2, ms(110));
        net.apply(0, false, &[("alibaba", "azure", Some("direct"))]);
        net.apply(1, true, &[]);
        net.apply(2, false, &[("aws", "azure", Some("direct"))]);
        net.run(ms(3_000));
        net
    }

    #[test]
    fn probes_measure_every_link_inside_the_tunnel() {
        let net = transit_net();
        let rtt = |i, p: &str| net.link(i, p).rtt.expect("rtt sampled");
        assert!(
            rtt(0, "azure").abs_diff(ms(150)) < ms(1),
            "{:?}",
            rtt(0, "azure")
        );
        assert!(rtt(1, "alibaba").abs_diff(ms(30)) < ms(1));
        assert!(rtt(2, "aws").abs_diff(ms(220)) < ms(1));
        let l = net.link(0, "azure");
        assert!(l.up && l.loss == 0.0, "{l:?}");
        // About one probe per 100 ms went each way; none reached a TUN.
        assert!((25..=32).contains(&l.probes_sent), "{}", l.probes_sent);
        assert!(
            net.tun.iter().all(Vec::is_empty),
            "probes never reach a TUN"
        );
        let report = net.nodes[0].link_report();
        assert_eq!(report.links.len(), 2);
        assert!(report.links.iter().all(|s| s.up && s.loss_ppm == 0));
    }

    #[test]
    fn transit_forwards_with_ttl_and_the_destination_accepts_its_source() {
        let mut net = transit_net();
        assert_eq!(
            net.path_of(0, "alibaba").active,
            Via::Transit("azure".into())
        );
        assert!(net.reaches(0, 2, b"aws-to-alibaba"));
        let got = net.tun[2].last().expect("delivered").clone();
        assert_eq!(got[8], 63, "the transit decremented the TTL");
        assert!(net.tun[1].is_empty(), "the transit's own TUN sees nothing");
        // It went through azure: azure's counters to alibaba moved.
        assert!(net.reaches(2, 0, b"alibaba-to-aws"));
    }

    #[test]
    fn a_transit_cannot_spoof_a_node_whose_traffic_it_does_not_carry() {
        let mut net = Net::new(&["aws", "azure", "alibaba", "gcp"], ProbeConfig::default());
        net.apply(0, false, &[("alibaba", "azure", Some("direct"))]);
        net.apply(1, true, &[]);
        net.apply(2, false, &[("aws", "azure", Some("direct"))]);
        net.apply(3, false, &[]);
        net.run(ms(1_000));
        // azure sends from gcp's VPC to alibaba: alibaba's path to gcp is direct.
        let spoof = ipv4_packet(Net::vpc_host(3, 5), Net::vpc_host(2, 7), b"spoofed-gcp");
        net.inject(1, &spoof);
        net.run(ms(200));
        assert!(net.tun[2].iter().all(|p| !p.ends_with(b"spoofed-gcp")));
        assert_eq!(drops_of(&net.nodes[2], DropReason::SourceNotAllowed), 1);
        // aws sends with gcp's source through azure: the transit refuses it.
        let spoof = ipv4_packet(Net::vpc_host(3, 5), Net::vpc_host(2, 7), b"spoofed-by-aws");
        net.inject(0, &spoof);
        net.run(ms(200));
        assert!(net
            .tun
            .iter()
            .flatten()
            .all(|p| !p.ends_with(b"spoofed-by-aws")));
        assert_eq!(drops_of(&net.nodes[1], DropReason::SourceNotAllowed), 1);
        // gcp may relay aws's traffic to alibaba (as its backup), but a transit
        // never relays what a peer relays: gcp cannot launder aws's source via azure.
        net.apply(
            3,
            true,
            &[
                ("alibaba", "azure", Some("direct")),
                ("aws", "direct", None),
            ],
        );
        net.apply(2, false, &[("aws", "azure", Some("gcp"))]);
        // azure itself accepts aws's traffic from gcp (its backup towards aws)...
        net.apply(1, true, &[("aws", "direct", Some("gcp"))]);
        let launder = ipv4_packet(Net::vpc_host(0, 5), Net::vpc_host(2, 7), b"laundered");
        net.inject(3, &launder);
        net.run(ms(200));
        assert!(net.tun.iter().flatten().all(|p| !p.ends_with(b"laundered")));
        assert_eq!(drops_of(&net.nodes[1], DropReason::SourceNotAllowed), 2);
        // A non-transit node hands packets for others to its kernel, never onward.
        net.apply(1, false, &[]);
        let p = ipv4_packet(Net::vpc_host(0, 5), Net::vpc_host(2, 7), b"no-transit");
        net.inject(0, &p);
        net.run(ms(200));
        assert!(net.tun[1].iter().any(|p| p.ends_with(b"no-transit")));
        assert!(net.tun[2].iter().all(|p| !p.ends_with(b"no-transit")));
    }

    #[test]
    fn a_stalled_agent_reads_its_backlog_before_it_declares_links_down() {
        let mut net = transit_net();
        net.nodes[0].events.clear();
        // aws is not scheduled for 1 s; its peers' probes wait in its socket.
        net.stall(0, ms(1_000));
        net.run(ms(1_100));
        let events: Vec<Event> = std::iter::from_fn(|| net.nodes[0].poll_event()).collect();
        assert!(
            matches!(
                events.first(),
                Some(Event::Stalled { late, count: 1 }) if *late >= ms(900)
            ),
            "{events:?}"
        );
        assert!(
            !events.iter().any(|e| matches!(e, Event::LinkDown { .. })),
            "{events:?}"
        );
        assert!(net.link(0, "azure").up && net.link(0, "alibaba").up);
        assert_eq!(net.path_of(0, "alibaba").failovers, 0);
        assert_eq!(net.nodes[0].stalls, 1);
        // A link that really died during the stall goes down once its silence
        // outside the stall passes the detection time; the log tells all of it.
        net.set_cut(0, 1, true);
        net.stall(0, ms(1_000));
        net.run(ms(1_000 + 340));
        assert!(
            net.link(0, "azure").up,
            "the stall is not counted as silence"
        );
        net.run(ms(40));
        assert!(!net.link(0, "azure").up);
        let events: Vec<Event> = std::iter::from_fn(|| net.nodes[0].poll_event()).collect();
        assert!(
            events.iter().any(|e| matches!(
                e,
                Event::LinkDown { peer, cause: DownCause::Silent(d) }
                    if peer == "azure" && *d > ms(1_000) && *d < ms(1_400)
            )),
            "{events:?}"
        );
        assert!(net.link(0, "alibaba").up, "alibaba's probes were waiting");
        assert_eq!(net.path_of(0, "alibaba").active, Via::Direct);
    }

    #[test]
    fn asking_whether_a_link_check_would_fail_changes_nothing() {
        let mut net = transit_net();
        let now = net.now;
        assert!(!net.nodes[0].link_check_would_fail(now + ms(30)));
        // aws's timers do not run while azure's probes stop coming.
        net.set_cut(0, 1, true);
        net.stall(0, ms(500));
        net.run(ms(450));
        let now = net.now;
        assert!(net.nodes[0].link_check_would_fail(now));
        assert!(net.link(0, "azure").up, "only the check itself declares it");
        assert_eq!(net.path_of(0, "alibaba").failovers, 0);
        // The check that finally runs was late, so it forgives the stall: the
        // link goes down once the silence outside the stall passes 350 ms.
        net.run(ms(60));
        assert!(net.link(0, "azure").up);
        net.run(ms(400));
        assert!(!net.link(0, "azure").up);
        assert_eq!(net.path_of(0, "alibaba").failovers, 1);
    }

    #[test]
    fn a_cut_first_hop_fails_over_in_under_a_second_and_fails_back_after_the_hold() {
        let mut net = transit_net();
        net.set_cut(0, 1, true);
        net.run(ms(450));
        // aws saw its link to azure die; alibaba learned it from azure's probes.
        assert!(!net.link(0, "azure").up);
        assert_eq!(net.path_of(0, "alibaba").active, Via::Direct);
        assert_eq!(net.path_of(0, "alibaba").failovers, 1);
        net.run(ms(300));
        assert_eq!(
            net.path_of(2, "aws").active,
            Via::Direct,
            "via the down list"
        );
        assert!(net.reaches(0, 2, b"after-cut"));
        assert!(net.reaches(2, 0, b"reply-after-cut"));
        // Healed: back through azure only once it held for failback_hold.
        net.set_cut(0, 1, false);
        net.run(ms(2_000));
        assert!(net.link(0, "azure").up);
        assert_eq!(net.path_of(0, "alibaba").active, Via::Direct, "held");
        net.run(ms(4_000));
        assert_eq!(
            net.path_of(0, "alibaba").active,
            Via::Transit("azure".into())
        );
        assert_eq!(net.path_of(2, "aws").active, Via::Transit("azure".into()));
        let r = net.path_of(0, "alibaba");
        assert_eq!((r.changes, r.failovers), (2, 1));
    }

    #[test]
    fn a_cut_direct_link_moves_to_the_transit_backup() {
        let mut net = Net::new(&["aws", "azure", "alibaba"], ProbeConfig::default());
        net.apply(0, false, &[("alibaba", "direct", Some("azure"))]);
        net.apply(1, true, &[]);
        net.apply(2, false, &[("aws", "direct", Some("azure"))]);
        net.run(ms(1_000));
        net.set_cut(0, 2, true);
        net.run(ms(400));
        assert_eq!(
            net.path_of(0, "alibaba").active,
            Via::Transit("azure".into())
        );
        assert_eq!(net.path_of(2, "aws").active, Via::Transit("azure".into()));
        assert!(net.reaches(0, 2, b"around-the-cut"));
        assert!(net.reaches(2, 0, b"and-back"));
    }

    #[test]
    fn a_netmap_without_paths_keeps_the_paths_in_force() {
        let mut net = transit_net();
        // A restarted controller sends netmaps without paths until it has measured.
        net.apply(0, false, &[]);
        assert_eq!(
            net.path_of(0, "alibaba").active,
            Via::Transit("azure".into())
        );
        assert_eq!(net.path_of(0, "alibaba").changes, 0);
        // An explicit list replaces them.
        net.apply(0, false, &[("alibaba", "direct", None)]);
        assert_eq!(net.path_of(0, "alibaba").active, Via::Direct);
    }

    #[test]
    fn new_paths_from_the_controller_take_effect_and_are_counted() {
        let mut net = transit_net();
        net.apply(0, false, &[("alibaba", "direct", Some("azure"))]);
        let r = net.path_of(0, "alibaba");
        assert_eq!(r.active, Via::Direct);
        assert_eq!(r.changes, 1);
        assert_eq!(r.failovers, 0);
        // Unchanged paths change nothing.
        net.apply(0, false, &[("alibaba", "direct", Some("azure"))]);
        assert_eq!(net.path_of(0, "alibaba").changes, 1);
    }
}
