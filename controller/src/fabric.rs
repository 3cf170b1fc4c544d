//! The mesh as agents see it: which netmap each node gets, and what a change to
//! one node record means for the others. Sans-IO: the control server feeds it
//! the store's watch events and delivers what it returns.
//!
//! A change to node X is at most one peer change for every other node (X's
//! entry, or its removal) and one change of what X is told about itself,
//! whatever the mesh size. Each node's peer entry is encoded to JSON once, when
//! it changes, and every netmap or update that carries it copies those bytes:
//! a full netmap of N peers is a concatenation, not N encodings.

use crate::store::records::NodeRecord;
use ipnet::IpNet;
use serde::Serialize;
use serde_json::value::RawValue;
use skymesh_wire::control::{self, FrameError, SelfInfo};
use skymesh_wire::{PathSpec, PeerSpec, PROTOCOL_VERSION};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a change to a node record means for the sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The node's entry in everyone else's netmap: the new JSON, or `None`
    /// when it is no longer a peer (removed, or not registered).
    Peer {
        name: String,
        entry: Option<PeerJson>,
    },
    /// What the node is told about itself changed.
    SelfInfo(SelfInfo),
    /// The node was revoked: close its session.
    Disconnect(String),
}

/// A peer entry encoded once, shared by every message that carries it.
#[derive(Debug, Clone)]
pub struct PeerJson(Arc<RawValue>);

impl PeerJson {
    fn encode(spec: &PeerSpec) -> Result<Self, serde_json::Error> {
        let raw = serde_json::value::to_raw_value(spec)?;
        Ok(Self(Arc::from(raw)))
    }

    pub fn raw(&self) -> &RawValue {
        &self.0
    }
}

impl PartialEq for PeerJson {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for PeerJson {}

struct Member {
    record: NodeRecord,
    /// `None` until the node registered its key.
    peer: Option<PeerJson>,
}

pub struct Fabric {
    nodes: BTreeMap<String, Member>,
    mtu: u16,
}

impl Fabric {
    pub fn new(mtu: u16, nodes: impl IntoIterator<Item = NodeRecord>) -> Self {
        Self {
            nodes: nodes
                .into_iter()
                .map(|n| (n.name.clone(), Member::new(n)))
                .collect(),
            mtu,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name).map(|m| &m.record)
    }

    /// The whole netmap of `name` as one frame, tagged with store revision
    /// `seq`, with `paths` (which must name only peers) as its path list.
    pub fn full_frame(
        &self,
        name: &str,
        seq: u64,
        paths: &[PathSpec],
    ) -> Option<Result<Vec<u8>, FrameError>> {
        let me = self.nodes.get(name)?;
        let msg = FullOut {
            kind: "net_map",
            seq,
            node: self_info(&me.record),
            netmap: NetMapOut {
                version: PROTOCOL_VERSION,
                address: host_net(&me.record),
                mtu: self.mtu,
                peers: self
                    .nodes
                    .iter()
                    .filter(|(n, _)| *n != name)
                    .filter_map(|(_, m)| m.peer.as_ref().map(PeerJson::raw))
                    .collect(),
                transit: me.record.transit,
                paths,
            },
        };
        Some(control::encode(&msg))
    }

    /// Registered nodes (those with a key, so peers of the others) and whether
    /// each may transit: the path engine's membership.
    pub fn members(&self) -> Vec<(String, bool)> {
        self.nodes
            .values()
            .filter(|m| m.peer.is_some())
            .map(|m| (m.record.name.clone(), m.record.transit))
            .collect()
    }

    /// A node record was written.
    pub fn handle_put(&mut self, node: NodeRecord) -> Vec<Output> {
        let name = node.name.clone();
        let new = Member::new(node);
        let old = self.nodes.insert(name.clone(), new);
        let new = &self.nodes[&name];
        let mut out = Vec::new();
        if old.as_ref().and_then(|m| m.peer.as_ref()) != new.peer.as_ref() {
            out.push(Output::Peer {
                name: name.clone(),
                entry: new.peer.clone(),
            });
        }
        let me = self_info(&new.record);
        if old.as_ref().map(|m| self_info(&m.record)) != Some(me.clone()) {
            out.push(Output::SelfInfo(me));
        }
        out
    }

    /// A node record was deleted (revoked).
    pub fn handle_delete(&mut self, name: &str) -> Vec<Output> {
        if self.nodes.remove(name).is_none() {
            return Vec::new();
        }
        vec![
            Output::Disconnect(name.to_string()),
            Output::Peer {
                name: name.to_string(),
                entry: None,
            },
        ]
    }
}

impl Member {
    fn new(record: NodeRecord) -> Self {
        let peer = peer_spec(&record).and_then(|spec| match PeerJson::encode(&spec) {
            Ok(json) => Some(json),
            Err(e) => {
                tracing::error!(node = %record.name, error = %e, "cannot encode a peer entry; leaving the node out of netmaps");
                None
            }
        });
        Self { record, peer }
    }
}

/// `ControllerMessage::NetMap` as it goes out, with pre-encoded peers; the
/// same JSON (a test decodes it as the wire type).
#[derive(Serialize)]
struct FullOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    node: SelfInfo,
    netmap: NetMapOut<'a>,
}

#[derive(Serialize)]
struct NetMapOut<'a> {
    version: u32,
    address: IpNet,
    mtu: u16,
    peers: Vec<&'a RawValue>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    transit: bool,
    #[serde(skip_serializing_if = "<[PathSpec]>::is_empty")]
    paths: &'a [PathSpec],
}

fn host_net(node: &NodeRecord) -> IpNet {
    IpNet::from(node.overlay_ip)
}

/// How other nodes see `node`; `None` until it registered its key.
pub fn peer_spec(node: &NodeRecord) -> Option<PeerSpec> {
    let public_key = node.public_key?;
    let mut allowed_ips = vec![host_net(node)];
    allowed_ips.extend(node.prefixes.iter().copied());
    Some(PeerSpec {
        name: node.name.clone(),
        public_key,
        endpoint: node.endpoint(),
        allowed_ips,
        persistent_keepalive: None,
    })
}

pub fn self_info(node: &NodeRecord) -> SelfInfo {
    SelfInfo {
        name: node.name.clone(),
        overlay_ip: node.overlay_ip,
        prefixes: node.prefixes.clone(),
        rejected_prefixes: node.rejected_prefixes.clone(),
        transit: node.transit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_wire::control::{ControllerMessage, FrameBuffer};
    use skymesh_wire::{PublicKey, Via};

    fn node(name: &str, i: u8) -> NodeRecord {
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
            listen_port: 51820,
            endpoints: vec![format!("203.0.113.{i}:51820").parse().expect("addr")],
            observed_endpoint: None,
            advertised: Vec::new(),
            prefixes: vec![format!("10.{i}.0.0/16").parse().expect("cidr")],
            rejected_prefixes: Vec::new(),
            underlay: Vec::new(),
            agent_version: String::new(),
            last_seen: 0,
            transit: false,
        }
    }

    fn decode(frame: &[u8]) -> ControllerMessage {
        let mut buf = FrameBuffer::new();
        buf.extend(frame);
        buf.next_message().expect("frame").expect("one message")
    }

    #[test]
    fn full_netmap_has_every_other_registered_node_as_the_wire_type_reads_it() {
        let mut pending = node("c", 3);
        pending.public_key = None;
        let mut t = node("t", 4);
        t.transit = true;
        let f = Fabric::new(1420, [node("a", 1), node("b", 2), pending, t]);
        let paths = vec![PathSpec {
            dest: "b".into(),
            primary: Via::Transit("t".into()),
            backup: Some(Via::Direct),
        }];
        let frame = f
            .full_frame("a", 9, &paths)
            .expect("a exists")
            .expect("encodes");
        let ControllerMessage::NetMap(full) = decode(&frame) else {
            panic!("not a netmap");
        };
        assert_eq!(full.seq, 9);
        assert_eq!(full.node, self_info(&node("a", 1)));
        assert_eq!(full.netmap.address.to_string(), "100.96.0.1/32");
        let names: Vec<_> = full.netmap.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["b", "t"], "c has no key yet");
        assert_eq!(full.netmap.peers[0], peer_spec(&node("b", 2)).expect("b"));
        assert_eq!(full.netmap.paths, paths);
        full.netmap.validate().expect("valid");
        assert!(f.full_frame("nobody", 1, &[]).is_none());
    }

    #[test]
    fn a_new_node_is_one_peer_change_and_one_self_change() {
        let mut f = Fabric::new(1420, [node("a", 1)]);
        let out = f.handle_put(node("b", 2));
        assert_eq!(out.len(), 2);
        match &out[0] {
            Output::Peer {
                name,
                entry: Some(json),
            } => {
                assert_eq!(name, "b");
                let spec: PeerSpec = serde_json::from_str(json.raw().get()).expect("peer");
                assert_eq!(Some(spec), peer_spec(&node("b", 2)));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(&out[1], Output::SelfInfo(me) if me.name == "b"));
    }

    #[test]
    fn unchanged_peer_view_sends_nothing() {
        let mut f = Fabric::new(1420, [node("a", 1)]);
        let mut again = node("a", 1);
        again.last_seen = 99;
        again.agent_version = "x".into();
        assert!(f.handle_put(again).is_empty());
    }

    #[test]
    fn revocation_disconnects_and_removes() {
        let mut f = Fabric::new(1420, [node("a", 1), node("b", 2)]);
        let out = f.handle_delete("b");
        assert_eq!(out[0], Output::Disconnect("b".into()));
        assert_eq!(
            out[1],
            Output::Peer {
                name: "b".into(),
                entry: None
            }
        );
        assert!(f.handle_delete("b").is_empty());
        let frame = f.full_frame("a", 8, &[]).expect("a").expect("encodes");
        let ControllerMessage::NetMap(full) = decode(&frame) else {
            panic!("not a netmap");
        };
        assert!(full.netmap.peers.is_empty());
    }
}
