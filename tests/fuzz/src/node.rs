//! The agent's sans-IO core (`skymesh_agent::node::Node`) on its datagram path.
//!
//! A [`Mesh`] is one `Node` under test ("a", 100.96.0.1) and two peers, "b" and
//! "c", played by bare boringtun sessions so that the fuzzer decides exactly
//! what they send. Datagrams between them are delivered in-process until the
//! mesh is quiet, on injected time. Each chunk of an input is one step: a peer
//! encrypts a plaintext of the fuzzer's choosing to the node (the inner-packet
//! checks after decryption: probes, cryptokey routing, transit forwarding),
//! the node reads a packet from its TUN, time passes, or raw bytes arrive from
//! the underlay. A peer's first packet makes it handshake with the node first,
//! as WireGuard does; [`Mesh::establish`] completes both handshakes up front.
//!
//! What the node writes to its TUN and what the peers decrypt from it is
//! checked against the mesh's own model of who may send what.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as XPublic, StaticSecret};
use ipnet::IpNet;
use skymesh_agent::batch::{Transmits, TunWrites};
use skymesh_agent::keys::PrivateKey;
use skymesh_agent::node::{Event, Node};
use skymesh_agent::packet;
use skymesh_agent::probe::Probe;
use skymesh_wire::{NetMap, PathSpec, PeerSpec, Via, PROTOCOL_VERSION};
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The peers, by index: 0 is "b", 1 is "c".
const PEERS: [&str; 2] = ["b", "c"];
/// Most datagrams one step may cause, so that no input loops forever.
const MAX_DATAGRAMS_PER_STEP: usize = 256;

fn underlay(i: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i], 51820))
}
/// The node's own overlay address.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
const NODE_UNDERLAY: u8 = 1;

/// Peer `i`'s prefixes: its overlay address, a VPC and an IPv6 VPC.
fn prefixes(i: usize) -> Vec<IpNet> {
    let n = i + 2;
    [
        format!("100.96.0.{n}/32"),
        format!("10.{n}.0.0/16"),
        format!("fd00:{n}::/48"),
    ]
    .iter()
    .map(|s| s.parse().expect("cidr"))
    .collect()
}

/// Which peer's prefixes hold `addr` (the node's routing decision, modelled).
fn owner(addr: Option<IpAddr>) -> Option<usize> {
    let addr = addr?;
    (0..PEERS.len()).find(|&i| prefixes(i).iter().any(|p| p.contains(&addr)))
}

/// How the node's netmap is set up, from the first byte of an input.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub transit: bool,
    /// Per destination peer: 0 none, 1 primary via the other peer (backup
    /// direct), 2 primary direct (backup via the other), 3 only via the other.
    pub path: [u8; 2],
}

impl Setup {
    pub fn from_byte(b: u8) -> Self {
        Self {
            transit: b & 1 != 0,
            path: [(b >> 1) & 3, (b >> 3) & 3],
        }
    }

    pub fn to_byte(self) -> u8 {
        u8::from(self.transit) | self.path[0] << 1 | self.path[1] << 3
    }

    /// Whether `sender` may relay for destination peer `dest` (is its primary
    /// or backup transit).
    fn relays(self, dest: usize, sender: usize) -> bool {
        dest != sender && self.path[dest] != 0
    }

    fn netmap(self) -> NetMap {
        let peers = (0..PEERS.len())
            .map(|i| PeerSpec {
                name: PEERS[i].into(),
                public_key: peer_key(i).public_key(),
                endpoint: Some(underlay(i as u8 + 2)),
                allowed_ips: prefixes(i),
                persistent_keepalive: None,
            })
            .collect();
        let other = |i: usize| Via::Transit(PEERS[1 - i].into());
        let paths = (0..PEERS.len())
            .filter_map(|i| {
                let (primary, backup) = match self.path[i] {
                    1 => (other(i), Some(Via::Direct)),
                    2 => (Via::Direct, Some(other(i))),
                    3 => (other(i), None),
                    _ => return None,
                };
                Some(PathSpec {
                    dest: PEERS[i].into(),
                    primary,
                    backup,
                })
            })
            .collect();
        NetMap {
            version: PROTOCOL_VERSION,
            address: IpNet::from(IpAddr::V4(NODE_ADDR)),
            mtu: 1420,
            peers,
            transit: self.transit,
            paths,
        }
    }
}

fn node_key() -> PrivateKey {
    PrivateKey::from_bytes([0x21; 32])
}
fn peer_key(i: usize) -> PrivateKey {
    PrivateKey::from_bytes([0x22 + i as u8; 32])
}

/// The node under test and its two scripted peers.
pub struct Mesh {
    pub node: Node,
    pub setup: Setup,
    peers: [Tunn; 2],
    pub now: Instant,
    /// Packets the node read from its TUN: any peer may decrypt them.
    from_tun: Vec<Vec<u8>>,
    /// Per peer, every plaintext it encrypted to the node.
    sent_by: [Vec<Vec<u8>>; 2],
    /// Per peer, what the other peer sent, TTL one less: what the node may
    /// forward to it as a transit.
    forwardable: [Vec<Vec<u8>>; 2],
    /// Datagrams the peers sent to the node, for the seed generator.
    pub wire_log: Vec<Vec<u8>>,
}

impl Mesh {
    pub fn new(setup: Setup) -> Self {
        let now = Instant::now();
        let mut node = Node::new(node_key(), 7, now);
        node.apply(&setup.netmap(), now)
            .expect("the fixture's netmap applies");
        let a_public = XPublic::from(*node_key().public_key().as_bytes());
        let peer = |i: usize| {
            Tunn::new(
                StaticSecret::from(peer_key(i).secret().to_bytes()),
                a_public,
                None,
                None,
                i as u32 + 1,
                None,
            )
        };
        Self {
            node,
            setup,
            peers: [peer(0), peer(1)],
            now,
            from_tun: Vec::new(),
            sent_by: [Vec::new(), Vec::new()],
            forwardable: [Vec::new(), Vec::new()],
            wire_log: Vec::new(),
        }
    }

    /// Completes the node's handshake with both peers: the node starts them
    /// at its first timeout, for every peer it has an endpoint for.
    pub fn establish(&mut self) {
        self.tick(Duration::ZERO);
        for (i, p) in self.peers.iter().enumerate() {
            assert!(
                p.stats().0.is_some(),
                "fixture: no session with {}",
                PEERS[i]
            );
        }
    }

    /// Runs one step of a fuzz input: the first byte picks what happens.
    pub fn step(&mut self, chunk: &[u8]) {
        let Some((&op, rest)) = chunk.split_first() else {
            return;
        };
        match op % 5 {
            0 | 1 => self.peer_sends(usize::from(op % 5), rest),
            2 => self.from_tun(rest),
            3 => self.tick(Duration::from_millis(u64::from(op / 5) * 10)),
            _ => self.raw_datagram(op / 5, rest),
        }
    }

    /// Peer `i` encrypts `plaintext` to the node (without a session, it
    /// queues it and sends a handshake initiation instead).
    pub fn peer_sends(&mut self, i: usize, plaintext: &[u8]) {
        self.sent_by[i].push(plaintext.to_vec());
        let mut forwarded = plaintext.to_vec();
        if packet::decrement_ttl(&mut forwarded) {
            self.forwardable[1 - i].push(forwarded);
        }
        let mut buf = vec![0u8; plaintext.len().max(148) + 64];
        let datagram = match self.peers[i].encapsulate(plaintext, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            TunnResult::Done => return, // queued behind a handshake in progress
            other => panic!("fixture: peer {} cannot send: {other:?}", PEERS[i]),
        };
        self.pump(VecDeque::from([(i, datagram)]));
    }

    /// The node reads `packet` from its TUN.
    pub fn from_tun(&mut self, packet: &[u8]) {
        let mut out = Transmits::with_capacity(4);
        let now = self.now;
        self.node.handle_tun_packet(packet, &mut out, now);
        self.from_tun.push(packet.to_vec());
        let answers = self.deliver_to_peers(&out);
        self.pump(answers.into());
    }

    /// Time passes; the node's timers run (probes, link checks, boringtun's).
    pub fn tick(&mut self, d: Duration) {
        self.now += d;
        let mut out = Transmits::with_capacity(4);
        let now = self.now;
        self.node.handle_timeout(now, &mut out);
        let answers = self.deliver_to_peers(&out);
        self.pump(answers.into());
    }

    /// Bytes no peer encrypted arrive from a peer's or a stranger's address:
    /// nothing may reach the TUN, move an endpoint or get an answer but a cookie.
    /// `source` picks the address: b's, c's, a stranger's, an IPv6 one.
    pub fn raw_datagram(&mut self, source: u8, datagram: &[u8]) {
        let from = match source % 4 {
            0 => underlay(2),
            1 => underlay(3),
            2 => SocketAddr::from(([203, 0, 113, 9], 4444)),
            _ => "[2001:db8::9]:51820".parse().expect("addr"),
        };
        let mut tun = TunWrites::with_capacity(2);
        let mut out = Transmits::with_capacity(2);
        let now = self.now;
        self.node
            .handle_datagram(from, datagram, &mut tun, &mut out, now);
        assert!(tun.is_empty(), "unauthenticated bytes reached the TUN");
        for (to, d) in out.iter() {
            assert_eq!(to, from, "an answer to someone else");
            assert_eq!(d.first(), Some(&3), "an answer but a cookie reply: {d:?}");
        }
        while let Some(ev) = self.node.poll_event() {
            assert!(
                !matches!(ev, Event::EndpointChanged { .. }),
                "unauthenticated bytes moved an endpoint: {ev:?}"
            );
        }
    }

    /// Datagrams from peers to the node, and the peers' answers to what the
    /// node sends back, until quiet.
    fn pump(&mut self, mut to_node: VecDeque<(usize, Vec<u8>)>) {
        let mut budget = MAX_DATAGRAMS_PER_STEP;
        while let Some((from, datagram)) = to_node.pop_front() {
            budget = budget.checked_sub(1).expect("a step that never ends");
            self.wire_log.push(datagram.clone());
            let mut tun = TunWrites::with_capacity(2);
            let mut out = Transmits::with_capacity(4);
            let now = self.now;
            self.node
                .handle_datagram(underlay(from as u8 + 2), &datagram, &mut tun, &mut out, now);
            for (_, inner) in tun.iter() {
                self.check_tun(from, inner);
            }
            to_node.extend(self.deliver_to_peers(&out));
        }
        while self.node.poll_event().is_some() {}
    }

    /// Hands the node's datagrams to the peers, checks what they decrypt, and
    /// returns what they answer (handshake responses, keepalives).
    fn deliver_to_peers(&mut self, out: &Transmits) -> Vec<(usize, Vec<u8>)> {
        let mut answers = Vec::new();
        let node_ip = Some(underlay(NODE_UNDERLAY).ip());
        for (to, datagram) in out.iter() {
            let i = match to {
                t if t == underlay(2) => 0,
                t if t == underlay(3) => 1,
                other => panic!("the node sent to {other}, no peer's endpoint"),
            };
            let mut inners = Vec::new();
            let mut buf = vec![0u8; datagram.len().max(9200)];
            let mut result = self.peers[i].decapsulate(node_ip, datagram, &mut buf);
            loop {
                match result {
                    TunnResult::WriteToNetwork(d) => answers.push((i, d.to_vec())),
                    TunnResult::WriteToTunnelV4(inner, _)
                    | TunnResult::WriteToTunnelV6(inner, _) => {
                        inners.push(inner.to_vec());
                        break;
                    }
                    TunnResult::Done | TunnResult::Err(_) => break,
                }
                // boringtun's contract: after a write, call again with nothing
                // until it is done (queued packets leave this way).
                result = self.peers[i].decapsulate(None, &[], &mut buf);
            }
            for inner in inners {
                self.check_peer_received(i, &inner);
            }
        }
        answers
    }

    /// A packet the node wrote to its TUN after decrypting peer `from`'s
    /// datagram: the peer may use its source (its own prefixes, or a node it
    /// relays for), it is for no other peer when the node is a transit, it
    /// is no probe, and it is (the IP length of) what the peer sent.
    fn check_tun(&self, from: usize, inner: &[u8]) {
        let src = owner(packet::source(inner));
        let allowed = src == Some(from) || src.is_some_and(|o| self.setup.relays(o, from));
        assert!(
            allowed,
            "cryptokey routing: {} put source {:?} on the TUN",
            PEERS[from],
            packet::source(inner)
        );
        if self.setup.transit {
            let dst = owner(packet::destination(inner));
            assert!(
                dst.is_none() || dst == Some(from),
                "a transit delivered locally a packet for peer {dst:?}"
            );
        }
        assert!(!Probe::is_probe(inner), "a probe reached the TUN");
        assert!(
            self.sent_by[from].iter().any(|p| p.starts_with(inner)),
            "the TUN got other bytes than {} sent",
            PEERS[from]
        );
    }

    /// A packet peer `i` decrypted from the node: the node's own probe, one
    /// the node read from its TUN and routed to `i`, or one the other peer
    /// sent that the node may forward (a transit, the sender's own source,
    /// `i`'s destination). boringtun cuts a decrypted packet to its IP length,
    /// so `inner` may be a prefix of what the node sent, even shorter than an
    /// IP header: the rules apply to the packet the node sent.
    fn check_peer_received(&self, i: usize, inner: &[u8]) {
        if Probe::is_probe(inner) && packet::source(inner) == Some(IpAddr::V4(NODE_ADDR)) {
            return;
        }
        let is_prefix = |p: &&Vec<u8>| p.len() >= inner.len() && p[..inner.len()] == *inner;
        let dst = |p: &[u8]| owner(packet::destination(p));
        let mut from_tun = self.from_tun.iter().filter(is_prefix).peekable();
        if from_tun.peek().is_some() {
            assert!(
                from_tun
                    .any(|p| dst(p) == Some(i) || dst(p).is_some_and(|d| self.setup.relays(d, i))),
                "the node routed a packet for {:?} to {}",
                dst(inner),
                PEERS[i]
            );
            return;
        }
        let mut forwarded = self.forwardable[i].iter().filter(is_prefix).peekable();
        if forwarded.peek().is_some() {
            assert!(self.setup.transit, "a node that is no transit forwarded");
            assert!(
                forwarded.any(|p| owner(packet::source(p)) == Some(1 - i) && dst(p) == Some(i)),
                "a transit forwarded to {} a packet from {:?} to {:?}",
                PEERS[i],
                packet::source(inner),
                packet::destination(inner)
            );
            return;
        }
        panic!(
            "peer {} got a packet the node had no reason to send: {inner:?}",
            PEERS[i]
        );
    }
}

/// Target `node_inner`: byte 0 sets up the netmap ([`Setup::from_byte`]), the
/// rest is a sequence of steps ([`crate::chunks`], see [`Mesh::step`]).
pub fn node_inner(data: &[u8]) {
    let Some((&setup, steps)) = data.split_first() else {
        return;
    };
    let mut mesh = Mesh::new(Setup::from_byte(setup));
    for chunk in crate::chunks(steps).take(64) {
        mesh.step(chunk);
    }
}

/// Target `node_datagram`: raw underlay datagrams at a node with established
/// sessions (byte 0 sets the netmap up; each chunk's first byte picks the
/// source address, see [`Mesh::raw_datagram`]). Nothing in them is
/// authentic, so nothing may pass.
pub fn node_datagram(data: &[u8]) {
    let Some((&setup, steps)) = data.split_first() else {
        return;
    };
    let mut mesh = Mesh::new(Setup::from_byte(setup));
    mesh.establish();
    for chunk in crate::chunks(steps).take(64) {
        let Some((&op, rest)) = chunk.split_first() else {
            continue;
        };
        mesh.raw_datagram(op, rest);
    }
}
