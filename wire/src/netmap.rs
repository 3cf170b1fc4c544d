//! The [`NetMap`]: everything an agent needs to build its part of the mesh.
//!
//! In static mode the agent builds it from its TOML file; in controller mode the
//! controller sends it. One code path in the agent applies it, by diff. The
//! invariants checked by [`NetMap::validate`] hold whatever the source.

use crate::key::PublicKey;
use crate::path::{PathSpec, Via};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Version of the control-protocol encoding. Bumped on incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// One peer of this node: a WireGuard key, where to reach it, what it may send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    /// Operator-facing name (metrics label, status output). Unique in a netmap.
    pub name: String,
    pub public_key: PublicKey,
    /// Where to send the first handshake. Optional: a peer behind NAT is learned
    /// from its authenticated packets (roaming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// Prefixes routed to this peer and accepted as inner source addresses from it.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when idle; `None` disables them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
}

/// What an agent applies: its own overlay address and interface settings, and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetMap {
    pub version: u32,
    /// Overlay address of this node, with its prefix length (for example 100.96.0.1/32).
    pub address: IpNet,
    pub mtu: u16,
    pub peers: Vec<PeerSpec>,
    /// Whether this node forwards traffic between other nodes (a transit gateway).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transit: bool,
    /// The path to each destination peer; a peer without one is reached directly.
    /// An empty list means "no decision yet" (a controller that just started): the
    /// agent keeps the paths it has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathSpec>,
}

/// Why a netmap cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetMapError {
    #[error("netmap version {0} is not supported (this build speaks version {PROTOCOL_VERSION})")]
    Version(u32),
    #[error("peer name {0:?} appears more than once; names must be unique")]
    DuplicateName(String),
    #[error(
        "peer {name:?} has the same public key as peer {other:?}; each peer needs its own key"
    )]
    DuplicateKey { name: String, other: String },
    #[error("allowed_ips {prefix} of peer {name:?} overlaps {other_prefix} of peer {other:?}; a prefix can route to one peer only")]
    Overlap {
        name: String,
        prefix: IpNet,
        other: String,
        other_prefix: IpNet,
    },
    #[error("allowed_ips {prefix} of peer {name:?} is not a network address; did you mean {suggestion}?")]
    HostBits {
        name: String,
        prefix: IpNet,
        suggestion: IpNet,
    },
    #[error("mtu {0} is outside 1280..=9000")]
    Mtu(u16),
    #[error("paths: destination {0:?} is not a peer")]
    PathDest(String),
    #[error("paths: destination {0:?} is listed more than once")]
    DuplicatePath(String),
    #[error("paths: {dest:?} goes via {via:?}, which is not another peer; a transit must be a peer other than the destination")]
    PathVia { dest: String, via: String },
}

impl NetMap {
    /// Checks the invariants every applied netmap must hold, wherever it came from.
    pub fn validate(&self) -> Result<(), NetMapError> {
        if self.version != PROTOCOL_VERSION {
            return Err(NetMapError::Version(self.version));
        }
        if !(1280..=9000).contains(&self.mtu) {
            return Err(NetMapError::Mtu(self.mtu));
        }
        let mut seen: Vec<(&str, IpNet)> = Vec::new();
        for (i, peer) in self.peers.iter().enumerate() {
            for other in &self.peers[..i] {
                if other.name == peer.name {
                    return Err(NetMapError::DuplicateName(peer.name.clone()));
                }
                if other.public_key == peer.public_key {
                    return Err(NetMapError::DuplicateKey {
                        name: peer.name.clone(),
                        other: other.name.clone(),
                    });
                }
            }
            for prefix in &peer.allowed_ips {
                if prefix.trunc() != *prefix {
                    return Err(NetMapError::HostBits {
                        name: peer.name.clone(),
                        prefix: *prefix,
                        suggestion: prefix.trunc(),
                    });
                }
                if let Some((other, other_prefix)) = seen
                    .iter()
                    .find(|(_, p)| p.contains(prefix) || prefix.contains(p))
                {
                    return Err(NetMapError::Overlap {
                        name: peer.name.clone(),
                        prefix: *prefix,
                        other: (*other).to_string(),
                        other_prefix: *other_prefix,
                    });
                }
            }
            seen.extend(peer.allowed_ips.iter().map(|p| (peer.name.as_str(), *p)));
        }
        let is_peer = |name: &str| self.peers.iter().any(|p| p.name == name);
        for (i, path) in self.paths.iter().enumerate() {
            if !is_peer(&path.dest) {
                return Err(NetMapError::PathDest(path.dest.clone()));
            }
            if self.paths[..i].iter().any(|o| o.dest == path.dest) {
                return Err(NetMapError::DuplicatePath(path.dest.clone()));
            }
            for via in std::iter::once(&path.primary).chain(&path.backup) {
                if let Via::Transit(t) = via {
                    if t == &path.dest || !is_peer(t) {
                        return Err(NetMapError::PathVia {
                            dest: path.dest.clone(),
                            via: t.clone(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops paths that name a peer no longer in the map (after a removal).
    pub fn prune_paths(&mut self) {
        let names: std::collections::HashSet<&str> =
            self.peers.iter().map(|p| p.name.as_str()).collect();
        self.paths.retain(|p| {
            names.contains(p.dest.as_str())
                && std::iter::once(&p.primary)
                    .chain(&p.backup)
                    .all(|v| v.transit().is_none_or(|t| names.contains(t) && t != p.dest))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32])
    }

    fn peer(name: &str, k: u8, ips: &[&str]) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            public_key: key(k),
            endpoint: None,
            allowed_ips: ips.iter().map(|s| s.parse().expect("cidr")).collect(),
            persistent_keepalive: None,
        }
    }

    fn map(peers: Vec<PeerSpec>) -> NetMap {
        NetMap {
            version: PROTOCOL_VERSION,
            address: "100.96.0.1/32".parse().expect("cidr"),
            mtu: 1420,
            peers,
            transit: false,
            paths: Vec::new(),
        }
    }

    /// Golden encoding: the JSON form is part of the control protocol.
    #[test]
    fn golden_json() {
        let mut m = map(vec![peer("gcp-gw", 7, &["100.96.0.2/32", "10.10.0.0/16"])]);
        m.peers[0].endpoint = Some("198.51.100.7:51820".parse().expect("addr"));
        m.peers[0].persistent_keepalive = Some(25);
        let json = serde_json::to_string(&m).expect("encode");
        assert_eq!(
            json,
            r#"{"version":1,"address":"100.96.0.1/32","mtu":1420,"peers":[{"name":"gcp-gw","public_key":"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=","endpoint":"198.51.100.7:51820","allowed_ips":["100.96.0.2/32","10.10.0.0/16"],"persistent_keepalive":25}]}"#
        );
        let back: NetMap = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, m);
    }

    #[test]
    fn overlap_is_refused_both_ways() {
        let m = map(vec![
            peer("a", 1, &["10.0.0.0/16"]),
            peer("b", 2, &["10.0.5.0/24"]),
        ]);
        assert!(matches!(m.validate(), Err(NetMapError::Overlap { .. })));
        let m = map(vec![
            peer("a", 1, &["10.0.5.0/24"]),
            peer("b", 2, &["10.0.0.0/8"]),
        ]);
        assert!(matches!(m.validate(), Err(NetMapError::Overlap { .. })));
        let m = map(vec![
            peer("a", 1, &["fd00::/64"]),
            peer("b", 2, &["fd00::/8"]),
        ]);
        assert!(matches!(m.validate(), Err(NetMapError::Overlap { .. })));
    }

    #[test]
    fn duplicates_and_host_bits_are_refused() {
        let m = map(vec![peer("a", 1, &[]), peer("a", 2, &[])]);
        assert_eq!(m.validate(), Err(NetMapError::DuplicateName("a".into())));
        let m = map(vec![peer("a", 1, &[]), peer("b", 1, &[])]);
        assert!(matches!(
            m.validate(),
            Err(NetMapError::DuplicateKey { .. })
        ));
        let m = map(vec![peer("a", 1, &["10.0.0.1/16"])]);
        let err = m.validate().expect_err("host bits");
        assert!(
            err.to_string().contains("did you mean 10.0.0.0/16"),
            "{err}"
        );
    }

    #[test]
    fn paths_must_name_peers_and_a_distinct_transit() {
        let mut m = map(vec![peer("a", 1, &[]), peer("b", 2, &[])]);
        m.paths = vec![PathSpec {
            dest: "b".into(),
            primary: Via::Transit("a".into()),
            backup: Some(Via::Direct),
        }];
        assert_eq!(m.validate(), Ok(()));
        m.paths[0].primary = Via::Transit("b".into());
        assert!(matches!(m.validate(), Err(NetMapError::PathVia { .. })));
        m.paths[0].primary = Via::Direct;
        m.paths[0].backup = Some(Via::Transit("zz".into()));
        let err = m.validate().expect_err("unknown transit");
        assert!(err.to_string().contains("\"zz\""), "{err}");
        m.paths[0].backup = None;
        m.paths.push(m.paths[0].clone());
        assert_eq!(m.validate(), Err(NetMapError::DuplicatePath("b".into())));
        m.paths = vec![PathSpec {
            dest: "c".into(),
            primary: Via::Direct,
            backup: None,
        }];
        assert_eq!(m.validate(), Err(NetMapError::PathDest("c".into())));
    }

    #[test]
    fn prune_drops_paths_through_removed_peers() {
        let mut m = map(vec![peer("a", 1, &[]), peer("b", 2, &[])]);
        m.paths = vec![
            PathSpec {
                dest: "b".into(),
                primary: Via::Transit("a".into()),
                backup: Some(Via::Direct),
            },
            PathSpec {
                dest: "a".into(),
                primary: Via::Direct,
                backup: None,
            },
        ];
        m.peers.retain(|p| p.name == "b");
        m.prune_paths();
        assert!(m.paths.is_empty(), "{:?}", m.paths);
        assert_eq!(m.validate(), Ok(()));
    }

    /// Golden encoding of a transit node's map with paths.
    #[test]
    fn golden_json_with_paths() {
        let mut m = map(vec![peer("a", 1, &[]), peer("b", 2, &[])]);
        m.transit = true;
        m.paths = vec![PathSpec {
            dest: "b".into(),
            primary: Via::Transit("a".into()),
            backup: Some(Via::Direct),
        }];
        let json = serde_json::to_string(&m).expect("encode");
        assert!(
            json.ends_with(r#""transit":true,"paths":[{"dest":"b","primary":{"transit":"a"},"backup":"direct"}]}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<NetMap>(&json).expect("decode"), m);
    }

    #[test]
    fn valid_map_passes() {
        let m = map(vec![
            peer("a", 1, &["100.96.0.2/32", "10.10.0.0/16"]),
            peer("b", 2, &["100.96.0.3/32", "10.20.0.0/16", "fd00:20::/48"]),
        ]);
        assert_eq!(m.validate(), Ok(()));
    }
}
