//! The control protocol between agents and the controller: messages, their
//! versioned envelope and the length-prefixed framing.
//!
//! One QUIC bidirectional stream carries a sequence of frames each way. A frame is
//! a 4-byte big-endian length and a JSON envelope `{"v": 1, "msg": {...}}`. The
//! length is checked against [`MAX_FRAME`] before a byte of the body is read, and
//! the version before the body is interpreted, so a peer speaking another version
//! gets a clear refusal instead of a parse error.
//!
//! This module is pure: the QUIC drivers in the agent and the controller own the
//! streams and call [`encode`], [`frame_len`] and [`decode`].

use crate::key::PublicKey;
use crate::netmap::{NetMap, PeerSpec, PROTOCOL_VERSION};
use crate::path::{LinkChanges, LinkReport, PathSpec};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

/// Largest frame body either side accepts. A full netmap of 10,000 peers is
/// about 2.5 MB of JSON.
pub const MAX_FRAME: usize = 8 << 20;

/// Largest first frame of a connection without a client certificate: an
/// enrollment request, whose token and P-256 certificate request make about
/// 0.7 KB (a unit test measures it). Before a peer has authenticated, the
/// controller buffers no more than this for it.
pub const MAX_ENROLL_FRAME: usize = 16 << 10;

/// What a frame of an authenticated agent may hold besides its lists: the
/// envelope, a key, a version string and a few configured endpoints.
pub const FRAME_BASE: usize = 16 << 10;

/// The longest compact JSON of one prefix in a list, with its quotes and
/// comma: `"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",` (a unit test
/// measures it).
pub const MAX_PREFIX_JSON: usize = 48;

/// The longest compact JSON of one link sample, with its comma: a peer name
/// of 63 bytes (a DNS label, as the controller names nodes) and three `u32`s
/// at their maximum (a unit test measures it).
pub const MAX_LINK_SAMPLE_JSON: usize = 160;

/// Largest `Register` frame when a node may advertise `max_prefixes` prefixes
/// and as many underlay subnets: what the controller takes as the first frame
/// of an authenticated connection. Derived from the configured prefix cap, so
/// the two cannot drift apart; at most [`MAX_FRAME`].
pub const fn max_register_frame(max_prefixes: usize) -> usize {
    let lists = max_prefixes
        .saturating_mul(2)
        .saturating_mul(MAX_PREFIX_JSON);
    let len = FRAME_BASE.saturating_add(lists);
    if len < MAX_FRAME {
        len
    } else {
        MAX_FRAME
    }
}

/// Largest `Links` frame of an agent with `peers` peers; at most [`MAX_FRAME`].
pub const fn max_links_frame(peers: usize) -> usize {
    let len = FRAME_BASE.saturating_add(peers.saturating_mul(MAX_LINK_SAMPLE_JSON));
    if len < MAX_FRAME {
        len
    } else {
        MAX_FRAME
    }
}

/// ALPN of the control protocol; a connection that does not offer it is refused
/// during the TLS handshake.
pub const ALPN: &[u8] = b"skymesh-control/1";

/// The TLS server name agents verify in the controller's certificate. Agents dial
/// controllers by address; the name, not the address, is what the controller's CA
/// vouches for, so a controller can move without reissuing certificates.
pub const SERVER_NAME: &str = "skymesh-controller";

/// What an agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// First and only message of a connection without a client certificate.
    Enroll(EnrollRequest),
    /// First message of an mTLS connection: who the agent is now.
    Register(Register),
    /// All link measurements: first after `Register`, then (from agents without
    /// [`CAPABILITY`] 1) about once a second.
    Links(LinkReport),
    /// The measurements that changed materially since the last `Links` or
    /// `LinkChanges`; sent by agents with [`CAPABILITY`] 1 instead of repeating
    /// `Links`.
    LinkChanges(LinkChanges),
}

/// What this build of the protocol can do beyond version 1's first release,
/// announced by the agent in [`Register::capability`]:
/// - 0: takes path lists whole ([`NetMapUpdate::paths`]) and repeats its whole
///   link report every second;
/// - 1: also takes path changes ([`NetMapUpdate::path_changes`]) and sends its
///   link measurements as [`LinkChanges`] after the first report.
///
/// The controller speaks to each agent at the capability the agent announced,
/// so controllers can be upgraded before their agents.
pub const CAPABILITY: u32 = 1;

/// A join token's secret and a certificate signing request.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token_id: String,
    pub secret: String,
    /// PKCS#10 request for the agent's control-channel key. Only its public key is
    /// used: the controller decides the certificate's name.
    pub csr_pem: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("token_id", &self.token_id)
            .field("secret", &"***")
            .finish_non_exhaustive()
    }
}

/// The agent's data-plane identity and what it offers to the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub public_key: PublicKey,
    /// The WireGuard UDP port; with the address the controller observes it makes
    /// the observed endpoint.
    pub listen_port: u16,
    /// Configured public endpoints (an elastic IP, a load balancer), preferred
    /// over the observed one.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// VPC prefixes the node routes for.
    #[serde(default)]
    pub advertise: Vec<IpNet>,
    /// Subnets of the node's own network interfaces: a prefix overlapping them
    /// would route the tunnel's own packets into the tunnel.
    #[serde(default)]
    pub underlay: Vec<IpNet>,
    /// Agent version, for the operator.
    pub agent_version: String,
    /// The node offers to forward traffic between other nodes (`[node] transit`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transit: bool,
    /// The agent's [`CAPABILITY`]; 0 (absent) for agents that predate it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub capability: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What the controller sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControllerMessage {
    Enrolled(Enrolled),
    /// The whole netmap; sent first after `Register`, and whenever the
    /// controller cannot express a change as an update.
    NetMap(FullNetMap),
    /// A change relative to the previous netmap or update (`seq` one higher).
    Update(NetMapUpdate),
    /// The request was refused; the connection closes after this.
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    /// The node's name, as the controller recorded it.
    pub node: String,
    pub certificate_pem: String,
    pub ca_pem: String,
}

/// What the controller decided about this node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfInfo {
    pub name: String,
    pub overlay_ip: IpAddr,
    /// Advertised prefixes the mesh routes to this node.
    pub prefixes: Vec<IpNet>,
    /// Advertised prefixes the controller refused, each with why.
    pub rejected_prefixes: Vec<RejectedPrefix>,
    /// The mesh may route other nodes' traffic through this node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectedPrefix {
    pub cidr: IpNet,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullNetMap {
    pub seq: u64,
    pub node: SelfInfo,
    pub netmap: NetMap,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetMapUpdate {
    pub seq: u64,
    /// Present when something about this node itself changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<SelfInfo>,
    /// Peers added or changed, replacing any peer of the same name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<PeerSpec>,
    /// Names of peers that left the mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// When present, replaces the node's whole path list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<PathSpec>>,
    /// Paths that changed, each replacing the path to the same destination;
    /// applied after `paths`. Sent only to agents of [`CAPABILITY`] 1 or more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_changes: Vec<PathSpec>,
}

impl NetMapUpdate {
    /// Applies the update to `map` in place: removals, then upserts by name,
    /// then `paths`, then `path_changes`. Peers and paths stay sorted by name.
    /// O((n + m) log n) for n peers and m changes, so a merged update of the
    /// whole mesh costs no more than a full netmap.
    pub fn apply_to(&self, map: &mut NetMap) {
        let changed: HashSet<&str> = self
            .remove
            .iter()
            .map(String::as_str)
            .chain(self.upsert.iter().map(|p| p.name.as_str()))
            .collect();
        if !changed.is_empty() {
            map.peers.retain(|p| !changed.contains(p.name.as_str()));
            map.peers.extend(self.upsert.iter().cloned());
            map.peers.sort_by(|a, b| a.name.cmp(&b.name));
            keep_last(&mut map.peers, |p| &p.name);
        }
        if let Some(node) = &self.node {
            map.address = IpNet::from(node.overlay_ip);
            map.transit = node.transit;
        }
        if let Some(paths) = &self.paths {
            map.paths = paths.clone();
        }
        if !self.path_changes.is_empty() {
            let changed: HashSet<&str> =
                self.path_changes.iter().map(|p| p.dest.as_str()).collect();
            map.paths.retain(|p| !changed.contains(p.dest.as_str()));
            map.paths.extend(self.path_changes.iter().cloned());
            map.paths.sort_by(|a, b| a.dest.cmp(&b.dest));
            keep_last(&mut map.paths, |p| &p.dest);
        }
        map.prune_paths();
    }
}

/// Of neighbours with the same key in a list sorted stably by that key, keeps
/// the last: a later change to the same name wins.
fn keep_last<T>(list: &mut Vec<T>, key: impl Fn(&T) -> &String) {
    let mut kept: Vec<T> = Vec::with_capacity(list.len());
    for item in list.drain(..) {
        match kept.last_mut() {
            Some(last) if key(last) == key(&item) => *last = item,
            _ => kept.push(item),
        }
    }
    *list = kept;
}

/// Why the controller refused; the agent logs `message` and acts on `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The token is unknown, wrong, expired, revoked or used up. Retrying will not help.
    InvalidToken,
    /// The client certificate is unknown or revoked. Enroll again with a new token.
    InvalidCertificate,
    /// The message was malformed or out of order.
    Protocol,
    /// The peer speaks another protocol version.
    Version,
    /// A node of that name is enrolled already.
    NameTaken,
    /// A temporary problem on the controller: retry later.
    Unavailable,
}

/// A frame that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Within [`MAX_FRAME`], but larger than the reader takes at this point of
    /// the protocol ([`FrameBuffer::with_limit`]).
    #[error("frame of {len} bytes exceeds the {limit}-byte limit of {what}")]
    OverLimit {
        len: usize,
        limit: usize,
        what: &'static str,
    },
    #[error(
        "protocol version {0} is not supported (this build speaks version {PROTOCOL_VERSION})"
    )]
    Version(u32),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u32,
    msg: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    v: u32,
    msg: Box<serde_json::value::RawValue>,
}

/// Encodes `msg` as one frame: length prefix and envelope.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(
        &mut out,
        &EnvelopeOut {
            v: PROTOCOL_VERSION,
            msg,
        },
    )
    .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The body length announced by a frame header, checked against [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let env: EnvelopeIn =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if env.v != PROTOCOL_VERSION {
        return Err(FrameError::Version(env.v));
    }
    serde_json::from_str(env.msg.get()).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes a frame body from the controller. The same as [`decode`] for
/// [`ControllerMessage`], faster for the messages an agent takes most and
/// largest (updates and whole netmaps): an internally tagged enum is buffered
/// whole before its variant is read, so a message whose tag comes first, as
/// every encoder here writes it, is read straight as its variant's struct.
/// Anything else, and anything that struct refuses, goes through the enum,
/// so the result and the errors are those of [`decode`].
pub fn decode_controller(body: &[u8]) -> Result<ControllerMessage, FrameError> {
    let env: EnvelopeIn =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if env.v != PROTOCOL_VERSION {
        return Err(FrameError::Version(env.v));
    }
    let msg = env.msg.get();
    if let Some(fields) = variant_fields(msg, "update") {
        if let Ok(u) = serde_json::from_str(&fields) {
            return Ok(ControllerMessage::Update(u));
        }
    } else if let Some(fields) = variant_fields(msg, "net_map") {
        if let Ok(m) = serde_json::from_str(&fields) {
            return Ok(ControllerMessage::NetMap(m));
        }
    }
    serde_json::from_str(msg).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// `{"type":"TAG",REST` as the object `{REST` (the variant's own fields),
/// when the tag is written first and nothing else stands between.
fn variant_fields(msg: &str, tag: &str) -> Option<String> {
    let rest = msg
        .strip_prefix("{\"type\":\"")?
        .strip_prefix(tag)?
        .strip_prefix("\",")?;
    let mut fields = String::with_capacity(rest.len() + 1);
    fields.push('{');
    fields.push_str(rest);
    Some(fields)
}

/// Decodes a frame body from an agent. The same as [`decode`] for
/// [`AgentMessage`], faster for the message a controller takes thousands of
/// times a second: an internally tagged enum is buffered whole before its
/// variant is read, so a [`LinkChanges`] is first tried as a plain struct,
/// which accepts exactly what the enum would take as that variant.
pub fn decode_agent(body: &[u8]) -> Result<AgentMessage, FrameError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Tag {
        LinkChanges,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LinkChangesMsg {
        #[serde(rename = "type")]
        _tag: Tag,
        changed: Vec<crate::path::LinkSample>,
    }
    let env: EnvelopeIn =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if env.v != PROTOCOL_VERSION {
        return Err(FrameError::Version(env.v));
    }
    if let Ok(m) = serde_json::from_str::<LinkChangesMsg>(env.msg.get()) {
        return Ok(AgentMessage::LinkChanges(LinkChanges {
            changed: m.changed,
        }));
    }
    serde_json::from_str(env.msg.get()).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reassembles frames from a byte stream read in arbitrary pieces: the reading
/// side of the framing, without IO. The length is checked as soon as the header
/// is in, so an oversized frame is refused before its body is buffered.
#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    /// The largest frame body taken, and what sets it (for the error).
    limit: (usize, &'static str),
}

impl Default for FrameBuffer {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            limit: (MAX_FRAME, "the control protocol"),
        }
    }
}

/// What a [`FrameBuffer`] keeps allocated between frames.
const KEEP_CAPACITY: usize = 8 << 10;

impl FrameBuffer {
    /// A reader of frames up to [`MAX_FRAME`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader of frames up to `limit` bytes (at most [`MAX_FRAME`]), for a
    /// point of the protocol that needs less, such as [`MAX_ENROLL_FRAME`]; `what`
    /// names it in the error. The caller reads at most a chunk past a frame
    /// before asking for it, so the buffer stays within `limit` plus a chunk.
    pub fn with_limit(limit: usize, what: &'static str) -> Self {
        Self {
            buf: Vec::new(),
            limit: (limit.min(MAX_FRAME), what),
        }
    }

    /// Changes the limit for the frames still to come (bytes already received
    /// stay), for a protocol whose later frames need another bound than its
    /// first one; `limit` is capped at [`MAX_FRAME`] as in [`Self::with_limit`].
    pub fn set_limit(&mut self, limit: usize, what: &'static str) {
        self.limit = (limit.min(MAX_FRAME), what);
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        self.next_message_with(decode::<T>)
    }

    /// [`next_message`](Self::next_message) with its own decoder of a frame
    /// body, such as [`decode_agent`].
    pub fn next_message_with<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<T, FrameError>,
    ) -> Result<Option<T>, FrameError> {
        let Some(header) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = frame_len([header[0], header[1], header[2], header[3]])?;
        let (limit, what) = self.limit;
        if len > limit {
            return Err(FrameError::OverLimit { len, limit, what });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        if self.buf.is_empty() {
            // Thousands of sessions are open at once on a controller, each
            // idle between messages most of the time: hold nothing then.
            self.buf = Vec::new();
        } else if self.buf.capacity() > KEEP_CAPACITY && self.buf.len() <= KEEP_CAPACITY {
            // One large frame (a whole netmap, a whole link report) must not
            // pin its size for the rest of a long session: thousands of them
            // are open at once on a controller.
            self.buf.shrink_to(KEEP_CAPACITY);
        }
        msg.map(Some)
    }

    /// Bytes received but not yet part of a returned message.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, k: u8) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            public_key: PublicKey::from_bytes([k; 32]),
            endpoint: None,
            allowed_ips: vec![format!("100.96.0.{k}/32").parse().expect("cidr")],
            persistent_keepalive: None,
        }
    }

    /// Golden encoding: changing it breaks agents of the previous release.
    #[test]
    fn golden_register_frame() {
        let msg = AgentMessage::Register(Register {
            public_key: PublicKey::from_bytes([1; 32]),
            listen_port: 51820,
            endpoints: vec!["203.0.113.10:51820".parse().expect("addr")],
            advertise: vec!["10.0.0.0/16".parse().expect("cidr")],
            underlay: vec!["203.0.113.0/24".parse().expect("cidr")],
            agent_version: "0.1.0".into(),
            transit: false,
            capability: 0,
        });
        let frame = encode(&msg).expect("encode");
        let body = &frame[4..];
        assert_eq!(
            std::str::from_utf8(body).expect("utf8"),
            r#"{"v":1,"msg":{"type":"register","public_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","listen_port":51820,"endpoints":["203.0.113.10:51820"],"advertise":["10.0.0.0/16"],"underlay":["203.0.113.0/24"],"agent_version":"0.1.0"}}"#
        );
        assert_eq!(
            frame_len(frame[..4].try_into().expect("4")).expect("len"),
            body.len()
        );
        assert_eq!(decode::<AgentMessage>(body).expect("decode"), msg);
    }

    #[test]
    fn golden_update_frame() {
        let msg = ControllerMessage::Update(NetMapUpdate {
            seq: 7,
            node: None,
            upsert: vec![peer("gcp-gw", 2)],
            remove: vec!["old-gw".into()],
            paths: None,
            path_changes: Vec::new(),
        });
        let frame = encode(&msg).expect("encode");
        assert_eq!(
            std::str::from_utf8(&frame[4..]).expect("utf8"),
            r#"{"v":1,"msg":{"type":"update","seq":7,"upsert":[{"name":"gcp-gw","public_key":"AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=","allowed_ips":["100.96.0.2/32"]}],"remove":["old-gw"]}}"#
        );
    }

    #[test]
    fn oversized_and_foreign_frames_are_refused() {
        assert!(matches!(
            frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        let err = decode::<AgentMessage>(br#"{"v":2,"msg":{"type":"hello"}}"#).expect_err("v2");
        assert!(matches!(err, FrameError::Version(2)), "{err}");
        let err = decode::<AgentMessage>(br#"{"v":1,"msg":{"type":"hello"}}"#).expect_err("type");
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        assert!(decode::<AgentMessage>(b"\x00\xff garbage").is_err());
    }

    #[test]
    fn frame_buffer_reassembles_split_frames() {
        let a = encode(&ControllerMessage::Refused(Refusal {
            code: RefusalCode::Protocol,
            message: "x".into(),
        }))
        .expect("a");
        let b = encode(&ControllerMessage::Update(NetMapUpdate {
            seq: 1,
            node: None,
            upsert: vec![],
            remove: vec!["z".into()],
            paths: None,
            path_changes: Vec::new(),
        }))
        .expect("b");
        let stream: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut fb = FrameBuffer::new();
        let mut got = Vec::new();
        for chunk in stream.chunks(3) {
            fb.extend(chunk);
            while let Some(m) = fb.next_message::<ControllerMessage>().expect("decode") {
                got.push(m);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(fb.pending(), 0);
        let mut fb = FrameBuffer::new();
        fb.extend(&u32::MAX.to_be_bytes());
        assert!(matches!(
            fb.next_message::<ControllerMessage>(),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_limited_reader_refuses_a_larger_frame_at_its_header() {
        let mut fb = FrameBuffer::with_limit(MAX_ENROLL_FRAME, "an enrollment");
        fb.extend(&((MAX_ENROLL_FRAME + 1) as u32).to_be_bytes());
        let err = fb
            .next_message::<AgentMessage>()
            .expect_err("over the limit");
        assert!(
            matches!(
                err,
                FrameError::OverLimit {
                    len,
                    limit: MAX_ENROLL_FRAME,
                    what: "an enrollment"
                } if len == MAX_ENROLL_FRAME + 1
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "frame of 16385 bytes exceeds the 16384-byte limit of an enrollment"
        );
        // A frame at the limit is read.
        let msg = AgentMessage::Links(LinkReport { links: Vec::new() });
        let frame = encode(&msg).expect("encode");
        let mut fb = FrameBuffer::with_limit(frame.len() - 4, "a test");
        fb.extend(&frame);
        assert_eq!(fb.next_message::<AgentMessage>().expect("fits"), Some(msg));
    }

    /// What an enrollment request weighs, with a 64-hex-digit secret and a
    /// P-256 CSR as the agent sends (about 0.7 KB): far below the limit for the
    /// first frame of a connection that has not authenticated.
    #[test]
    fn an_enrollment_request_fits_the_enrollment_limit_many_times_over() {
        let csr = "-----BEGIN CERTIFICATE REQUEST-----\n".to_string()
            + &"A".repeat(64 * 7)
            + "\n-----END CERTIFICATE REQUEST-----\n";
        let frame = encode(&AgentMessage::Enroll(EnrollRequest {
            token_id: "jt-0123456789ab".into(),
            secret: "f".repeat(64),
            csr_pem: csr,
        }))
        .expect("encode");
        assert!(frame.len() < 1024, "{}", frame.len());
        assert!(frame.len() * 8 < MAX_ENROLL_FRAME);
    }

    /// The bounds an authenticated agent's frames are held to fit the largest
    /// frame an agent can legitimately send: every prefix the longest IPv6
    /// text, every link sample the longest name and numbers.
    #[test]
    fn a_worst_case_registration_and_link_report_fit_their_bounds() {
        let longest: IpNet = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"
            .parse()
            .expect("cidr");
        assert!(serde_json::to_string(&longest).expect("json").len() < MAX_PREFIX_JSON);
        for cap in [1, 10, 1000, 5000] {
            let msg = AgentMessage::Register(Register {
                public_key: PublicKey::from_bytes([0xff; 32]),
                listen_port: u16::MAX,
                endpoints: vec![
                    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                        .parse()
                        .expect("addr");
                    16
                ],
                advertise: vec![longest; cap],
                underlay: vec![longest; cap],
                agent_version: "v".repeat(256),
                transit: true,
                capability: 0,
            });
            let len = encode(&msg).expect("encode").len() - 4;
            assert!(len <= max_register_frame(cap), "{cap}: {len}");
        }
        assert_eq!(max_register_frame(1000), 16384 + 96_000);
        assert_eq!(max_register_frame(usize::MAX), MAX_FRAME);

        let sample = crate::path::LinkSample {
            peer: "p".repeat(63),
            up: false,
            rtt_us: u32::MAX,
            jitter_us: u32::MAX,
            loss_ppm: u32::MAX,
        };
        assert!(serde_json::to_string(&sample).expect("json").len() < MAX_LINK_SAMPLE_JSON);
        for peers in [0, 1, 100, 10_000] {
            let msg = AgentMessage::Links(LinkReport {
                links: vec![sample.clone(); peers],
            });
            let len = encode(&msg).expect("encode").len() - 4;
            assert!(len <= max_links_frame(peers), "{peers}: {len}");
        }
        assert_eq!(max_links_frame(usize::MAX), MAX_FRAME);
    }

    #[test]
    fn enroll_request_never_prints_its_secret() {
        let req = EnrollRequest {
            token_id: "tok1".into(),
            secret: "s3cr3t-value".into(),
            csr_pem: String::new(),
        };
        assert!(!format!("{req:?}").contains("s3cr3t"));
    }

    #[test]
    fn update_applies_by_name() {
        let mut map = NetMap {
            version: PROTOCOL_VERSION,
            address: "100.96.0.1/32".parse().expect("cidr"),
            mtu: 1420,
            peers: vec![peer("a", 2), peer("b", 3)],
            transit: false,
            paths: Vec::new(),
        };
        let mut b2 = peer("b", 9);
        b2.persistent_keepalive = Some(25);
        NetMapUpdate {
            seq: 2,
            node: None,
            upsert: vec![b2.clone(), peer("c", 4)],
            remove: vec!["a".into()],
            paths: None,
            path_changes: Vec::new(),
        }
        .apply_to(&mut map);
        assert_eq!(map.peers, vec![b2, peer("c", 4)]);
    }

    #[test]
    fn golden_links_frame() {
        let msg = AgentMessage::Links(LinkReport {
            links: vec![crate::path::LinkSample {
                peer: "gcp".into(),
                up: true,
                rtt_us: 20_150,
                jitter_us: 310,
                loss_ppm: 30_000,
            }],
        });
        let frame = encode(&msg).expect("encode");
        assert_eq!(
            std::str::from_utf8(&frame[4..]).expect("utf8"),
            r#"{"v":1,"msg":{"type":"links","links":[{"peer":"gcp","up":true,"rtt_us":20150,"jitter_us":310,"loss_ppm":30000}]}}"#
        );
        assert_eq!(decode::<AgentMessage>(&frame[4..]).expect("decode"), msg);
    }

    #[test]
    fn update_replaces_paths_and_prunes_removed_peers() {
        use crate::path::Via;
        let mut map = NetMap {
            version: PROTOCOL_VERSION,
            address: "100.96.0.1/32".parse().expect("cidr"),
            mtu: 1420,
            peers: vec![peer("a", 2), peer("b", 3), peer("c", 4)],
            transit: false,
            paths: Vec::new(),
        };
        let via_a = PathSpec {
            dest: "b".into(),
            primary: Via::Transit("a".into()),
            backup: Some(Via::Direct),
        };
        let update = |remove: Vec<String>, paths: Option<Vec<PathSpec>>| NetMapUpdate {
            seq: 3,
            node: None,
            upsert: Vec::new(),
            remove,
            paths,
            path_changes: Vec::new(),
        };
        update(Vec::new(), Some(vec![via_a.clone()])).apply_to(&mut map);
        assert_eq!(map.paths, vec![via_a.clone()]);
        // An update without paths keeps them.
        update(vec!["c".into()], None).apply_to(&mut map);
        assert_eq!(map.paths, vec![via_a]);
        // Removing the transit drops the path that went through it.
        update(vec!["a".into()], None).apply_to(&mut map);
        assert!(map.paths.is_empty());
        assert_eq!(map.validate(), Ok(()));
    }

    #[test]
    fn golden_link_changes_frame_and_capability() {
        let msg = AgentMessage::LinkChanges(LinkChanges {
            changed: vec![crate::path::LinkSample {
                peer: "gcp".into(),
                up: false,
                rtt_us: 20_150,
                jitter_us: 310,
                loss_ppm: 0,
            }],
        });
        let frame = encode(&msg).expect("encode");
        assert_eq!(
            std::str::from_utf8(&frame[4..]).expect("utf8"),
            r#"{"v":1,"msg":{"type":"link_changes","changed":[{"peer":"gcp","up":false,"rtt_us":20150,"jitter_us":310,"loss_ppm":0}]}}"#
        );
        assert_eq!(decode::<AgentMessage>(&frame[4..]).expect("decode"), msg);
        // An agent that predates the capability sends none and is read as 0.
        let old = r#"{"v":1,"msg":{"type":"register","public_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","listen_port":51820,"agent_version":"0.1.0"}}"#;
        match decode::<AgentMessage>(old.as_bytes()).expect("decode") {
            AgentMessage::Register(r) => assert_eq!(r.capability, 0),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_agent_decoder_agrees_with_the_general_one() {
        let sample = r#"{"peer":"gcp","up":true,"rtt_us":20150,"jitter_us":310,"loss_ppm":0}"#;
        let bodies = [
            format!(r#"{{"v":1,"msg":{{"type":"link_changes","changed":[{sample}]}}}}"#),
            // The tag need not come first.
            format!(r#"{{"v":1,"msg":{{"changed":[{sample},{sample}],"type":"link_changes"}}}}"#),
            r#"{"v":1,"msg":{"type":"link_changes","changed":[]}}"#.to_string(),
            // Refused by both: an unknown field, a missing one, a bad sample,
            // two tags, another version.
            format!(r#"{{"v":1,"msg":{{"type":"link_changes","changed":[{sample}],"x":1}}}}"#),
            r#"{"v":1,"msg":{"type":"link_changes"}}"#.to_string(),
            r#"{"v":1,"msg":{"type":"link_changes","changed":[{"peer":"gcp"}]}}"#.to_string(),
            r#"{"v":1,"msg":{"type":"link_changes","type":"links","changed":[]}}"#.to_string(),
            r#"{"v":2,"msg":{"type":"link_changes","changed":[]}}"#.to_string(),
            // Other messages go the general way.
            format!(r#"{{"v":1,"msg":{{"type":"links","links":[{sample}]}}}}"#),
            r#"{"v":1,"msg":{"type":"links","changed":[]}}"#.to_string(),
            r#"{"v":1,"msg":{"type":"hello"}}"#.to_string(),
            "not json".to_string(),
        ];
        for body in &bodies {
            let fast = decode_agent(body.as_bytes());
            let general = decode::<AgentMessage>(body.as_bytes());
            match (&fast, &general) {
                (Ok(f), Ok(g)) => assert_eq!(f, g, "{body}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{body}: the agent decoder gave {fast:?}, the general one {general:?}"),
            }
        }
        assert!(
            matches!(decode_agent(bodies[1].as_bytes()), Ok(AgentMessage::LinkChanges(c)) if c.changed.len() == 2)
        );
    }

    #[test]
    fn the_controller_decoder_agrees_with_the_general_one() {
        let peer = r#"{"name":"gcp","public_key":"AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=","allowed_ips":["100.96.0.2/32"]}"#;
        let node =
            r#"{"name":"aws","overlay_ip":"100.96.0.1","prefixes":[],"rejected_prefixes":[]}"#;
        let map = format!(
            r#"{{"version":1,"address":"100.96.0.1/32","mtu":1420,"peers":[{peer}],"transit":false,"paths":[]}}"#
        );
        let encoded = encode(&ControllerMessage::Update(NetMapUpdate {
            seq: 3,
            node: None,
            upsert: vec![],
            remove: vec!["z".into()],
            paths: None,
            path_changes: Vec::new(),
        }))
        .expect("encode");
        let bodies = [
            String::from_utf8(encoded[4..].to_vec()).expect("utf8"),
            format!(
                r#"{{"v":1,"msg":{{"type":"update","seq":7,"upsert":[{peer}],"remove":["old"]}}}}"#
            ),
            format!(r#"{{"v":1,"msg":{{"type":"net_map","seq":1,"node":{node},"netmap":{map}}}}}"#),
            // The tag need not come first, nor be written as this encoder does.
            format!(r#"{{"v":1,"msg":{{"seq":7,"type":"update","upsert":[{peer}]}}}}"#),
            r#"{"v":1,"msg":{ "type" : "update","seq":7}}"#.to_string(),
            // Refused by both: an unknown field, a missing one, two tags, a
            // tag of the other variant, a bad peer, another version.
            r#"{"v":1,"msg":{"type":"update","seq":7,"x":1}}"#.to_string(),
            r#"{"v":1,"msg":{"type":"update"}}"#.to_string(),
            r#"{"v":1,"msg":{"type":"update","type":"net_map","seq":7}}"#.to_string(),
            r#"{"v":1,"msg":{"type":"net_map","seq":7}}"#.to_string(),
            r#"{"v":1,"msg":{"type":"update","seq":7,"upsert":[{"name":"x"}]}}"#.to_string(),
            r#"{"v":2,"msg":{"type":"update","seq":7}}"#.to_string(),
            // Other messages go the general way.
            r#"{"v":1,"msg":{"type":"refused","code":"protocol","message":"x"}}"#.to_string(),
            r#"{"v":1,"msg":{"type":"hello"}}"#.to_string(),
            "not json".to_string(),
        ];
        let mut decoded = 0;
        for body in &bodies {
            let fast = decode_controller(body.as_bytes());
            let general = decode::<ControllerMessage>(body.as_bytes());
            match (&fast, &general) {
                (Ok(f), Ok(g)) => {
                    assert_eq!(f, g, "{body}");
                    decoded += 1;
                }
                (Err(_), Err(_)) => {}
                _ => panic!(
                    "{body}: the controller decoder gave {fast:?}, the general one {general:?}"
                ),
            }
        }
        assert_eq!(decoded, 6, "the well-formed messages decode");
        // What this encoder writes takes the direct way.
        let msg = r#"{"type":"update","seq":7}"#;
        assert_eq!(
            variant_fields(msg, "update").as_deref(),
            Some(r#"{"seq":7}"#)
        );
        assert_eq!(variant_fields(msg, "net_map"), None);
    }

    #[test]
    fn path_changes_replace_one_destination_each_after_a_whole_list() {
        use crate::path::Via;
        let mut map = NetMap {
            version: PROTOCOL_VERSION,
            address: "100.96.0.1/32".parse().expect("cidr"),
            mtu: 1420,
            peers: vec![peer("a", 2), peer("b", 3), peer("c", 4)],
            transit: false,
            paths: Vec::new(),
        };
        let path = |dest: &str, via: Via| PathSpec {
            dest: dest.into(),
            primary: via,
            backup: None,
        };
        let mut u = NetMapUpdate {
            seq: 4,
            node: None,
            upsert: Vec::new(),
            remove: Vec::new(),
            paths: Some(vec![path("b", Via::Direct), path("c", Via::Direct)]),
            path_changes: vec![
                path("c", Via::Transit("a".into())),
                path("a", Via::Direct),
                path("c", Via::Transit("b".into())),
            ],
        };
        u.apply_to(&mut map);
        assert_eq!(
            map.paths,
            vec![
                path("a", Via::Direct),
                path("b", Via::Direct),
                path("c", Via::Transit("b".into())),
            ],
            "changes apply after the list, sorted, the later change to a destination wins"
        );
        // A change through a peer the same update removes is pruned with it.
        u.paths = None;
        u.remove = vec!["b".into()];
        u.path_changes = vec![path("a", Via::Transit("b".into()))];
        u.apply_to(&mut map);
        assert_eq!(map.paths, Vec::<PathSpec>::new());
        assert_eq!(map.validate(), Ok(()));
    }

    #[test]
    fn upserts_of_a_merged_update_keep_peers_sorted_and_unique() {
        let mut map = NetMap {
            version: PROTOCOL_VERSION,
            address: "100.96.0.1/32".parse().expect("cidr"),
            mtu: 1420,
            peers: vec![peer("b", 3)],
            transit: false,
            paths: Vec::new(),
        };
        let mut later = peer("a", 9);
        later.endpoint = Some("203.0.113.9:51820".parse().expect("addr"));
        NetMapUpdate {
            seq: 2,
            node: None,
            upsert: vec![peer("c", 4), peer("a", 2), later.clone()],
            remove: vec!["b".into()],
            paths: None,
            path_changes: Vec::new(),
        }
        .apply_to(&mut map);
        assert_eq!(map.peers, vec![later, peer("c", 4)]);
    }
}
