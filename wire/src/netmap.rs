//! The [`NetMap`]: everything an agent needs to build its part of the mesh.
//!
//! In static mode the agent builds it from its TOML file; in controller mode the
//! controller sends it. One code path in the agent applies it, by diff. The
//! invariants checked by [`NetMap::validate`] hold whatever the source.

use crate::key::PublicKey;
use crate::path::{PathSpec, Via};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
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
    ///
    /// O(n log n) in the peers, prefixes and paths, so a mesh of thousands of
    /// peers is checked in milliseconds. The error is the one a pairwise check
    /// in list order would find first: peers in order, and for each its name
    /// and key against the peers before it, then each prefix (host bits, then
    /// overlap with the earliest-listed prefix of an earlier peer that it
    /// overlaps), then the paths in order.
    pub fn validate(&self) -> Result<(), NetMapError> {
        if self.version != PROTOCOL_VERSION {
            return Err(NetMapError::Version(self.version));
        }
        if !(1280..=9000).contains(&self.mtu) {
            return Err(NetMapError::Mtu(self.mtu));
        }
        let mut names: HashMap<&str, usize> = HashMap::with_capacity(self.peers.len());
        let mut keys: HashMap<&PublicKey, usize> = HashMap::with_capacity(self.peers.len());
        let mut seen = SeenPrefixes::default();
        for (i, peer) in self.peers.iter().enumerate() {
            // A pairwise scan meets the earlier peer first; on the same one, the
            // name is checked before the key.
            let same_name = names.get(peer.name.as_str()).copied();
            let same_key = keys.get(&peer.public_key).copied();
            match (same_name, same_key) {
                (Some(n), k) if k.is_none_or(|k| n <= k) => {
                    return Err(NetMapError::DuplicateName(peer.name.clone()));
                }
                (_, Some(k)) => {
                    return Err(NetMapError::DuplicateKey {
                        name: peer.name.clone(),
                        other: self.peers[k].name.clone(),
                    });
                }
                _ => {}
            }
            names.insert(&peer.name, i);
            keys.insert(&peer.public_key, i);
            for prefix in &peer.allowed_ips {
                if prefix.trunc() != *prefix {
                    return Err(NetMapError::HostBits {
                        name: peer.name.clone(),
                        prefix: *prefix,
                        suggestion: prefix.trunc(),
                    });
                }
                if let Some((other, other_prefix)) = seen.first_overlapping(prefix) {
                    return Err(NetMapError::Overlap {
                        name: peer.name.clone(),
                        prefix: *prefix,
                        other: self.peers[other].name.clone(),
                        other_prefix,
                    });
                }
            }
            // Only now: a peer's own prefixes may overlap each other.
            for prefix in &peer.allowed_ips {
                seen.insert(*prefix, i);
            }
        }
        let mut dests: HashSet<&str> = HashSet::with_capacity(self.paths.len());
        for path in &self.paths {
            if !names.contains_key(path.dest.as_str()) {
                return Err(NetMapError::PathDest(path.dest.clone()));
            }
            if !dests.insert(&path.dest) {
                return Err(NetMapError::DuplicatePath(path.dest.clone()));
            }
            for via in std::iter::once(&path.primary).chain(&path.backup) {
                if let Via::Transit(t) = via {
                    if t == &path.dest || !names.contains_key(t.as_str()) {
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
        let names: HashSet<&str> = self.peers.iter().map(|p| p.name.as_str()).collect();
        self.paths.retain(|p| {
            names.contains(p.dest.as_str())
                && std::iter::once(&p.primary)
                    .chain(&p.backup)
                    .all(|v| v.transit().is_none_or(|t| names.contains(t) && t != p.dest))
        });
    }
}

/// The prefixes of the peers [`NetMap::validate`] has passed, each with the
/// peer that holds it and its place in list order, so that an overlap is found
/// in O(log n) and reported against the earliest-listed prefix it overlaps.
/// Every prefix in it is a network address (host bits were refused first).
struct SeenPrefixes {
    /// Prefix -> (its place in list order, the holding peer's index); the first
    /// holder of a prefix listed twice.
    by_prefix: BTreeMap<IpNet, (usize, usize)>,
    /// Which prefix lengths occur, per family, so that looking for a prefix's
    /// supernets tries only those lengths.
    v4_lens: [bool; 33],
    v6_lens: [bool; 129],
}

impl Default for SeenPrefixes {
    fn default() -> Self {
        Self {
            by_prefix: BTreeMap::new(),
            v4_lens: [false; 33],
            v6_lens: [false; 129],
        }
    }
}

impl SeenPrefixes {
    fn insert(&mut self, prefix: IpNet, peer: usize) {
        let order = self.by_prefix.len();
        self.by_prefix.entry(prefix).or_insert((order, peer));
        let len = usize::from(prefix.prefix_len());
        match prefix {
            IpNet::V4(_) => self.v4_lens[len] = true,
            IpNet::V6(_) => self.v6_lens[len] = true,
        }
    }

    /// The earliest-listed prefix that contains `prefix` or lies inside it,
    /// with its peer's index.
    fn first_overlapping(&self, prefix: &IpNet) -> Option<(usize, IpNet)> {
        let lens: &[bool] = match prefix {
            IpNet::V4(_) => &self.v4_lens,
            IpNet::V6(_) => &self.v6_lens,
        };
        // Supernets (and the prefix itself): one lookup per length that occurs.
        let supernets = (0..=prefix.prefix_len())
            .filter(|&len| lens[usize::from(len)])
            .filter_map(|len| IpNet::new(prefix.addr(), len).ok())
            .filter_map(|net| {
                let net = net.trunc();
                self.by_prefix.get_key_value(&net)
            });
        // Subnets sort between the prefix and its last address at full length.
        let last = match prefix {
            IpNet::V4(n) => IpNet::V4(Ipv4Net::from(n.broadcast())),
            IpNet::V6(n) => IpNet::V6(Ipv6Net::from(n.broadcast())),
        };
        let subnets = self.by_prefix.range(*prefix..=last);
        supernets
            .chain(subnets)
            .min_by_key(|(_, (order, _))| *order)
            .map(|(net, (_, peer))| (*peer, *net))
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

    /// The pairwise check `validate` replaced, kept as the reference for which
    /// error a bad map gets.
    fn pairwise(m: &NetMap) -> Result<(), NetMapError> {
        let mut seen: Vec<(&str, IpNet)> = Vec::new();
        for (i, peer) in m.peers.iter().enumerate() {
            for other in &m.peers[..i] {
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
        Ok(())
    }

    /// Random small maps with clashing names, keys and prefixes (nested,
    /// equal, with host bits, v4 and v6) get the error the pairwise check
    /// gives, or none when it finds none.
    #[test]
    fn validate_finds_the_error_the_pairwise_check_finds() {
        let prefixes = [
            "10.0.0.0/8",
            "10.0.0.0/16",
            "10.0.5.0/24",
            "10.1.0.0/16",
            "10.0.5.7/32",
            "10.0.5.1/24",
            "10.255.255.255/32",
            "0.0.0.0/0",
            "192.168.0.0/24",
            "fd00::/8",
            "fd00:1::/32",
            "fd00:1::1/128",
            "::/0",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut errors, mut oks) = (0, 0);
        for _ in 0..20_000 {
            let peers = (0..1 + next(6))
                .map(|_| {
                    let ips: Vec<&str> = (0..next(3))
                        .map(|_| prefixes[next(prefixes.len())])
                        .collect();
                    let name = ["a", "b", "c", "d", "e", "f", "g"][next(7)];
                    peer(name, next(8) as u8, &ips)
                })
                .collect();
            let m = map(peers);
            let want = pairwise(&m);
            assert_eq!(m.validate(), want, "{:?}", m.peers);
            if want.is_ok() {
                oks += 1;
            } else {
                errors += 1;
            }
        }
        // Both outcomes were exercised.
        assert!(
            errors > 1_000 && oks > 1_000,
            "{errors} errors, {oks} valid"
        );
    }

    /// A mesh of a few thousand peers (an overlay /32 and a VPC /24 each) is
    /// valid, and one overlapping prefix or duplicate anywhere in it is found
    /// and named.
    #[test]
    fn thousands_of_peers_are_checked() {
        const N: usize = 4_000;
        let big: Vec<PeerSpec> = (0..N)
            .map(|i| {
                let mut p = peer(&format!("gw-{i}"), 0, &[]);
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(i as u64).to_be_bytes());
                p.public_key = PublicKey::from_bytes(k);
                let (hi, lo) = ((i >> 8) as u8, i as u8);
                p.allowed_ips = vec![
                    format!("100.96.{hi}.{lo}/32").parse().expect("cidr"),
                    format!("10.{hi}.{lo}.0/24").parse().expect("cidr"),
                ];
                p
            })
            .collect();
        let mut m = map(big.clone());
        m.paths = (1..N)
            .map(|i| PathSpec {
                dest: format!("gw-{i}"),
                primary: Via::Transit("gw-0".into()),
                backup: Some(Via::Direct),
            })
            .collect();
        assert_eq!(m.validate(), Ok(()));

        // A subnet of an early peer's VPC, late in the list.
        let mut m = map(big.clone());
        m.peers[N - 2]
            .allowed_ips
            .push("10.0.7.128/25".parse().expect("cidr"));
        assert_eq!(
            m.validate(),
            Err(NetMapError::Overlap {
                name: format!("gw-{}", N - 2),
                prefix: "10.0.7.128/25".parse().expect("cidr"),
                other: "gw-7".into(),
                other_prefix: "10.0.7.0/24".parse().expect("cidr"),
            })
        );
        // A supernet of many later VPCs: the earliest-listed one is named.
        let mut m = map(big.clone());
        m.peers[N - 1]
            .allowed_ips
            .push("10.3.0.0/16".parse().expect("cidr"));
        assert_eq!(
            m.validate(),
            Err(NetMapError::Overlap {
                name: format!("gw-{}", N - 1),
                prefix: "10.3.0.0/16".parse().expect("cidr"),
                other: "gw-768".into(),
                other_prefix: "10.3.0.0/24".parse().expect("cidr"),
            })
        );
        let mut m = map(big.clone());
        m.peers[N - 1].name = "gw-1234".into();
        assert_eq!(
            m.validate(),
            Err(NetMapError::DuplicateName("gw-1234".into()))
        );
        let mut m = map(big);
        m.peers[N - 1].public_key = m.peers[42].public_key;
        assert_eq!(
            m.validate(),
            Err(NetMapError::DuplicateKey {
                name: format!("gw-{}", N - 1),
                other: "gw-42".into(),
            })
        );
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
