//! The control protocol (`skymesh_wire::control`) and the netmap
//! (`skymesh_wire::netmap`): what a controller or an agent decodes from the
//! other side of a QUIC stream.

use skymesh_wire::control::{
    self, AgentMessage, ControllerMessage, FrameBuffer, FrameError, NetMapUpdate,
};
use skymesh_wire::{JoinToken, NetMap, PeerSpec, PublicKey, PROTOCOL_VERSION};
use std::fmt::Debug;

/// Target `control_frame`: `data` is a frame body (the JSON envelope, without
/// its length prefix), decoded as either side's message, and the JSON inside
/// a join token.
///
/// Invariants: a decoded message encodes to a frame that decodes to the same
/// message; the same bytes read through [`FrameBuffer`], in pieces, give the
/// same result as [`control::decode`]; an update applied to a netmap leaves
/// no path that names a missing peer; a join token decodes from its encoding.
pub fn control_frame(data: &[u8]) {
    join_token(data);
    let agent = round_trip::<AgentMessage>(data);
    // The controller's fast decoder takes exactly what the general one takes.
    match (control::decode_agent(data), &agent) {
        (Ok(fast), Some(general)) => assert_eq!(&fast, general),
        (Err(_), None) => {}
        (fast, general) => panic!("decode_agent gave {fast:?}, decode {general:?}"),
    }
    let controller = round_trip::<ControllerMessage>(data);
    // The agent's fast decoder takes exactly what the general one takes.
    match (control::decode_controller(data), &controller) {
        (Ok(fast), Some(general)) => assert_eq!(&fast, general),
        (Err(_), None) => {}
        (fast, general) => panic!("decode_controller gave {fast:?}, decode {general:?}"),
    }
    reassembled::<AgentMessage>(data, agent.is_some());
    reassembled::<ControllerMessage>(data, controller.is_some());
    match controller {
        Some(ControllerMessage::Update(update)) => apply_update(&update),
        Some(ControllerMessage::NetMap(full)) => netmap_invariants(&full.netmap),
        _ => {}
    }
}

/// `json` as the body of a join token (`skymesh-join-1.` and base64url).
fn join_token(json: &[u8]) {
    use base64::Engine;
    let text = format!(
        "skymesh-join-1.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    );
    match JoinToken::decode(&text) {
        Ok(token) => {
            assert!(!token.controllers.is_empty());
            assert_eq!(JoinToken::decode(&token.encode()), Ok(token));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Decodes `body` as `T`; a message must survive encode and decode unchanged.
fn round_trip<T>(body: &[u8]) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + Debug,
{
    let msg = match control::decode::<T>(body) {
        Ok(msg) => msg,
        Err(e) => {
            // Every refusal must be printable for the log line it ends up in.
            let _ = e.to_string();
            return None;
        }
    };
    let frame = control::encode(&msg).expect("a decoded message encodes");
    let len = control::frame_len(frame[..4].try_into().expect("4-byte header"))
        .expect("an encoded frame's length is within MAX_FRAME");
    assert_eq!(len, frame.len() - 4, "the header announces the body");
    let again: T = control::decode(&frame[4..]).expect("an encoded message decodes");
    assert_eq!(again, msg, "decode(encode(m)) == m");
    Some(msg)
}

/// `body` behind a length prefix, fed to a [`FrameBuffer`] a few bytes at a
/// time: one message (as [`control::decode`] read it) or one error, then
/// nothing left over.
fn reassembled<T: serde::de::DeserializeOwned + Debug>(body: &[u8], decodes: bool) {
    let Ok(len) = u32::try_from(body.len()) else {
        return;
    };
    let mut stream = len.to_be_bytes().to_vec();
    stream.extend_from_slice(body);
    let step = body.len() % 7 + 1;
    let mut fb = FrameBuffer::new();
    let mut got = Vec::new();
    for piece in stream.chunks(step) {
        fb.extend(piece);
        loop {
            match fb.next_message::<T>() {
                Ok(Some(m)) => got.push(Ok(m)),
                Ok(None) => break,
                Err(e) => {
                    assert!(!matches!(e, FrameError::TooLarge(_)), "{e}");
                    got.push(Err(e));
                    break;
                }
            }
        }
    }
    assert_eq!(got.len(), 1, "one frame in, one result out: {got:?}");
    assert_eq!(got[0].is_ok(), decodes, "FrameBuffer and decode agree");
    assert_eq!(fb.pending(), 0, "the whole frame was consumed");
}

/// An update applied to a small valid netmap: upserted peers are present,
/// removed ones gone, peers sorted, and paths name present peers only.
fn apply_update(update: &NetMapUpdate) {
    let mut map = sample_netmap();
    update.apply_to(&mut map);
    for p in &update.upsert {
        assert!(
            map.peers.iter().any(|q| q.name == p.name),
            "upserted {:?}",
            p.name
        );
    }
    for name in &update.remove {
        if !update.upsert.iter().any(|p| &p.name == name) {
            assert!(
                !map.peers.iter().any(|q| &q.name == name),
                "removed {name:?}"
            );
        }
    }
    assert!(
        map.peers.windows(2).all(|w| w[0].name <= w[1].name),
        "peers stay sorted by name"
    );
    paths_name_peers(&map);
}

/// Target `netmap`: `data` is the JSON of a [`NetMap`], as a controller sends
/// it and an agent stores it.
///
/// Invariants: it re-encodes to itself; [`NetMap::validate`] never panics, and a
/// map it accepts has unique names and keys, no overlapping prefixes, and
/// paths that [`NetMap::prune_paths`] keeps as they are.
pub fn netmap(data: &[u8]) {
    let Ok(map) = serde_json::from_slice::<NetMap>(data) else {
        return;
    };
    let json = serde_json::to_vec(&map).expect("a decoded netmap encodes");
    let again: NetMap = serde_json::from_slice(&json).expect("an encoded netmap decodes");
    assert_eq!(again, map, "decode(encode(m)) == m");
    netmap_invariants(&map);
}

/// What [`NetMap::validate`] promises about a map it accepts, checked from
/// first principles.
pub fn netmap_invariants(map: &NetMap) {
    let verdict = map.validate();
    if let Err(e) = &verdict {
        let _ = e.to_string();
    }
    let mut pruned = map.clone();
    pruned.prune_paths();
    paths_name_peers(&pruned);
    if verdict.is_err() {
        return;
    }
    assert_eq!(map.version, PROTOCOL_VERSION);
    assert!((1280..=9000).contains(&map.mtu));
    for (i, p) in map.peers.iter().enumerate() {
        for q in &map.peers[..i] {
            assert_ne!(p.name, q.name, "validate accepted a duplicate name");
            assert_ne!(
                p.public_key, q.public_key,
                "validate accepted a duplicate key"
            );
            for a in &p.allowed_ips {
                for b in &q.allowed_ips {
                    assert!(
                        !a.contains(b) && !b.contains(a),
                        "validate accepted overlapping {a} and {b}"
                    );
                }
            }
        }
        for a in &p.allowed_ips {
            assert_eq!(a.trunc(), *a, "validate accepted host bits in {a}");
        }
    }
    assert_eq!(
        pruned.paths, map.paths,
        "a valid map's paths survive pruning"
    );
}

fn paths_name_peers(map: &NetMap) {
    let is_peer = |n: &str| map.peers.iter().any(|p| p.name == n);
    for path in &map.paths {
        assert!(is_peer(&path.dest), "path to missing peer {:?}", path.dest);
        for via in std::iter::once(&path.primary).chain(&path.backup) {
            if let Some(t) = via.transit() {
                assert!(is_peer(t) && t != path.dest, "path {path:?} via {t:?}");
            }
        }
    }
}

/// A valid two-peer netmap (also the base of the seeds).
pub fn sample_netmap() -> NetMap {
    let peer = |name: &str, k: u8, ips: &[&str]| PeerSpec {
        name: name.into(),
        public_key: PublicKey::from_bytes([k; 32]),
        endpoint: Some(format!("198.51.100.{k}:51820").parse().expect("addr")),
        allowed_ips: ips.iter().map(|s| s.parse().expect("cidr")).collect(),
        persistent_keepalive: None,
    };
    NetMap {
        version: PROTOCOL_VERSION,
        address: "100.96.0.1/32".parse().expect("cidr"),
        mtu: 1420,
        peers: vec![
            peer("aws-gw", 2, &["100.96.0.2/32", "10.10.0.0/16"]),
            peer(
                "gcp-gw",
                3,
                &["100.96.0.3/32", "10.20.0.0/16", "fd00:20::/48"],
            ),
        ],
        transit: false,
        paths: Vec::new(),
    }
}
