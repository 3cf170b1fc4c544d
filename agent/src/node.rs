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
use crate::routing::RoutingTable;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::PublicKey as XPublic;
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skymesh_wire::{NetMap, NetMapError, PeerSpec, PublicKey};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
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
}

impl DropReason {
    pub const ALL: [DropReason; 13] = [
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
    SessionExpired { peer: String },
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

struct Peer {
    spec: PeerSpec,
    tunn: Tunn,
    /// Our 24-bit session index base for this peer (boringtun shifts it left by 8).
    index: u32,
    endpoint: Option<SocketAddr>,
    counters: PeerCounters,
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
        }
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
        self.next_tick = self.next_tick.min(now);
        Ok(diff)
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
        let Some(id) = self.routes.lookup(dst) else {
            self.count_drop(DropReason::NoRoute);
            return;
        };
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
        _now: Instant,
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
            TunnResult::WriteToTunnelV4(inner, _) | TunnResult::WriteToTunnelV6(inner, _) => {
                let len = inner.len();
                // Cryptokey routing: the inner source must route back to this peer.
                let allowed =
                    packet::source(inner).and_then(|src| self.routes.lookup(src)) == Some(id);
                if allowed {
                    tun.commit((), len);
                } else {
                    drop = Some(DropReason::SourceNotAllowed);
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
        if now >= self.next_limiter_reset {
            self.limiter.reset_count();
            self.next_limiter_reset = now + LIMITER_RESET;
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
        self.next_tick.min(self.next_limiter_reset)
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
        assert_eq!(a.poll_timeout(), now + TIMER_TICK);
        out.clear();
        a.handle_timeout(now + Duration::from_millis(100), &mut out);
        assert!(out.is_empty(), "nothing before the tick");
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
}
