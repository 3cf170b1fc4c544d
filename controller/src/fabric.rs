//! The mesh as agents see it: which netmap each node gets, and which messages a
//! change to one node record turns into. Sans-IO: the control server feeds it the
//! store's watch events and delivers what it returns.
//!
//! A change to node X becomes at most two messages, whatever the mesh size: one
//! update for every other node (X's peer entry, or its removal), encoded once and
//! shared, and one for X itself when what it was told about itself changed. So a
//! change costs O(N) bytes sent and O(1) work to compute, unlike systems that
//! recompute every node's full map on each change.

use crate::model::NodeRecord;
use ipnet::IpNet;
use skymesh_wire::control::{ControllerMessage, FullNetMap, NetMapUpdate, SelfInfo};
use skymesh_wire::{NetMap, PathSpec, PeerSpec, PROTOCOL_VERSION};
use std::collections::BTreeMap;

/// Who a message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every connected node except this one.
    AllBut(String),
    Only(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Send(Audience, ControllerMessage),
    /// The node was revoked: close its session.
    Disconnect(String),
}

pub struct Fabric {
    nodes: BTreeMap<String, NodeRecord>,
    mtu: u16,
}

impl Fabric {
    pub fn new(mtu: u16, nodes: impl IntoIterator<Item = NodeRecord>) -> Self {
        Self {
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            mtu,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// The whole netmap of `name`, tagged with store revision `seq`, with the
    /// paths the path engine chose for it.
    pub fn full(&self, name: &str, seq: u64, paths: Vec<PathSpec>) -> Option<FullNetMap> {
        let me = self.nodes.get(name)?;
        let mut netmap = NetMap {
            version: PROTOCOL_VERSION,
            address: host_net(me),
            mtu: self.mtu,
            peers: self
                .nodes
                .values()
                .filter(|n| n.name != name)
                .filter_map(peer_spec)
                .collect(),
            transit: me.transit,
            paths,
        };
        netmap.prune_paths();
        Some(FullNetMap {
            seq,
            node: self_info(me),
            netmap,
        })
    }

    /// Registered nodes (those with a key, so peers of the others) and whether
    /// each may transit: the path engine's membership.
    pub fn members(&self) -> Vec<(String, bool)> {
        self.nodes
            .values()
            .filter(|n| n.public_key.is_some())
            .map(|n| (n.name.clone(), n.transit))
            .collect()
    }

    /// A node record was written at revision `seq`.
    pub fn handle_put(&mut self, node: NodeRecord, seq: u64) -> Vec<Output> {
        let old = self.nodes.insert(node.name.clone(), node.clone());
        let mut out = Vec::new();
        let new_peer = peer_spec(&node);
        if old.as_ref().and_then(peer_spec) != new_peer {
            let update = match new_peer {
                Some(p) => NetMapUpdate {
                    seq,
                    node: None,
                    upsert: vec![p],
                    remove: Vec::new(),
                    paths: None,
                    path_changes: Vec::new(),
                },
                None => NetMapUpdate {
                    seq,
                    node: None,
                    upsert: Vec::new(),
                    remove: vec![node.name.clone()],
                    paths: None,
                    path_changes: Vec::new(),
                },
            };
            out.push(Output::Send(
                Audience::AllBut(node.name.clone()),
                ControllerMessage::Update(update),
            ));
        }
        let me = self_info(&node);
        if old.as_ref().map(self_info) != Some(me.clone()) {
            out.push(Output::Send(
                Audience::Only(node.name.clone()),
                ControllerMessage::Update(NetMapUpdate {
                    seq,
                    node: Some(me),
                    upsert: Vec::new(),
                    remove: Vec::new(),
                    paths: None,
                    path_changes: Vec::new(),
                }),
            ));
        }
        out
    }

    /// A node record was deleted (revoked) at revision `seq`.
    pub fn handle_delete(&mut self, name: &str, seq: u64) -> Vec<Output> {
        if self.nodes.remove(name).is_none() {
            return Vec::new();
        }
        vec![
            Output::Disconnect(name.to_string()),
            Output::Send(
                Audience::AllBut(name.to_string()),
                ControllerMessage::Update(NetMapUpdate {
                    seq,
                    node: None,
                    upsert: Vec::new(),
                    remove: vec![name.to_string()],
                    paths: None,
                    path_changes: Vec::new(),
                }),
            ),
        ]
    }
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
    use skymesh_wire::PublicKey;

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

    #[test]
    fn full_netmap_has_every_other_registered_node() {
        let mut pending = node("c", 3);
        pending.public_key = None;
        let f = Fabric::new(1420, [node("a", 1), node("b", 2), pending]);
        let full = f.full("a", 9, Vec::new()).expect("a exists");
        assert_eq!(full.seq, 9);
        assert_eq!(full.netmap.address.to_string(), "100.96.0.1/32");
        let names: Vec<_> = full.netmap.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["b"], "c has no key yet");
        assert_eq!(
            full.netmap.peers[0].allowed_ips,
            vec![
                "100.96.0.2/32".parse::<IpNet>().expect("cidr"),
                "10.2.0.0/16".parse().expect("cidr")
            ]
        );
        full.netmap.validate().expect("valid");
        assert!(f.full("nobody", 1, Vec::new()).is_none());
    }

    #[test]
    fn a_new_node_is_one_shared_upsert_and_one_self_update() {
        let mut f = Fabric::new(1420, [node("a", 1)]);
        let out = f.handle_put(node("b", 2), 5);
        assert_eq!(out.len(), 2);
        match &out[0] {
            Output::Send(Audience::AllBut(n), ControllerMessage::Update(u)) => {
                assert_eq!(n, "b");
                assert_eq!(u.upsert.len(), 1);
                assert_eq!(u.seq, 5);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(&out[1], Output::Send(Audience::Only(n), _) if n == "b"));
    }

    #[test]
    fn unchanged_peer_view_sends_nothing() {
        let mut f = Fabric::new(1420, [node("a", 1)]);
        let mut again = node("a", 1);
        again.last_seen = 99;
        again.agent_version = "x".into();
        assert!(f.handle_put(again, 6).is_empty());
    }

    #[test]
    fn revocation_disconnects_and_removes() {
        let mut f = Fabric::new(1420, [node("a", 1), node("b", 2)]);
        let out = f.handle_delete("b", 7);
        assert_eq!(out[0], Output::Disconnect("b".into()));
        assert!(
            matches!(&out[1], Output::Send(Audience::AllBut(n), ControllerMessage::Update(u)) if n == "b" && u.remove == ["b"])
        );
        assert!(f.handle_delete("b", 8).is_empty());
        assert_eq!(f.full("a", 8, Vec::new()).expect("a").netmap.peers.len(), 0);
    }
}
