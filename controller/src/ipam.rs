//! IP address management: which VPC prefixes a node may advertise, where a free
//! block is, and which overlay address a new node gets.
//!
//! This module owns the overlap rules: a prefix must not overlap another node's
//! accepted prefix, the overlay pool, reserved space ([`RESERVED`]) or the
//! advertising node's own underlay subnets. It is pure: no IO, no async, no clock.
//! Callers pass a snapshot of what the store holds and persist the decisions
//! themselves (the store's CAS makes them stick); this module must not touch the
//! store, the network or the netmap.
//!
//! All prefix arithmetic is done on `u128` spans (first and last address), so IPv4
//! and IPv6 share one code path and a block search jumps past a taken range in one
//! step instead of stepping through candidates.
//!
//! Overlaps are found through ordered maps keyed by prefix (`overlapping`): the
//! blocks that hold a prefix are one lookup per shorter length, the blocks inside
//! it one contiguous range. Admitting n prefixes against m accepted ones costs
//! O((n + m) log(n + m)), so the number of prefixes a node may advertise is a
//! policy (the registry's cap), not a performance limit.

use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The overlay pool used when the controller's configuration sets none. Overlay
/// addresses of nodes come from it (100.64.0.0/10 is CGNAT space, rarely used by VPCs).
pub const DEFAULT_OVERLAY_POOL: &str = "100.96.0.0/12";

/// Address space that is never routed across the overlay, with the name shown to
/// operators. Prefixes are written without host bits (a unit test checks that).
pub const RESERVED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this-network"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("fe80::/10", "IPv6 link-local"),
    ("::1/128", "IPv6 loopback"),
    ("ff00::/8", "IPv6 multicast"),
];

/// Why a prefix cannot be accepted: what it overlaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Conflict {
    /// A prefix already accepted for `node` (for [`Ipam::admit`], possibly an
    /// earlier entry of the same node's list).
    Node { node: String, prefix: IpNet },
    /// The pool overlay addresses are taken from.
    OverlayPool { pool: IpNet },
    /// One of [`RESERVED`].
    Reserved { prefix: IpNet, name: String },
    /// A subnet of the advertising node's own underlay NICs.
    Underlay { subnet: IpNet },
}

/// The fix offered in every [`Conflict::describe`] message.
const CHOOSE_ANOTHER: &str = "choose a prefix outside it (`skymeshctl ipam suggest`)";

impl Conflict {
    /// One sentence for an operator: what `cidr` overlaps and how to fix it.
    pub fn describe(&self, cidr: IpNet) -> String {
        match self {
            Conflict::Node { node, prefix } => format!(
                "{cidr} overlaps {prefix} advertised by node {node}; \
                 {CHOOSE_ANOTHER} or withdraw it there"
            ),
            Conflict::OverlayPool { pool } => format!(
                "{cidr} overlaps the overlay pool {pool} that node overlay addresses come from; \
                 {CHOOSE_ANOTHER} or move the controller's overlay pool"
            ),
            Conflict::Reserved { prefix, name } => format!(
                "{cidr} overlaps {prefix} ({name}), which is reserved and never routed \
                 through the overlay; {CHOOSE_ANOTHER}"
            ),
            Conflict::Underlay { subnet } => format!(
                "{cidr} overlaps this node's underlay subnet {subnet}, and routing it into \
                 the tunnel would cut the tunnel itself; {CHOOSE_ANOTHER} or leave the \
                 underlay subnet out of the node's advertised prefixes"
            ),
        }
    }
}

/// Invalid input to IPAM: each message names the value and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// A prefix that is not a network address, such as 10.0.0.1/16.
    #[error("{cidr} has host bits set; did you mean {suggestion}?")]
    HostBits { cidr: IpNet, suggestion: IpNet },
    /// A block length that cannot fit inside the range searched.
    #[error(
        "prefix length /{prefix_len} does not fit inside {within}; \
         choose a length from /{} to /{}",
        .within.prefix_len(),
        .within.max_prefix_len()
    )]
    PrefixLen { within: IpNet, prefix_len: u8 },
    /// No free block (or address, `prefix_len` /32 or /128) is left: for callers to
    /// return when [`Ipam::suggest`] or [`lowest_free_address`] gives `None`.
    #[error(
        "no free /{prefix_len} is left inside {within}; choose a wider range, \
         or withdraw prefixes (or remove nodes) that are no longer used"
    )]
    Exhausted { within: IpNet, prefix_len: u8 },
}

/// How many conflicts [`Ipam::admit`] lists for one refused prefix: one is enough
/// to refuse it, and listing every accepted prefix inside an advertised /8 would
/// let one node's advertisement grow with everybody else's.
pub const MAX_CONFLICTS_LISTED: usize = 8;

/// The outcome of one node's advertisement, in the order of the advertised list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    pub accepted: Vec<IpNet>,
    /// Each refused prefix with the conflicts found for it (at most
    /// [`MAX_CONFLICTS_LISTED`], in [`Ipam::check`]'s order).
    pub refused: Vec<(IpNet, Vec<Conflict>)>,
}

/// What the controller knows when checking a prefix: the overlay pool and every
/// accepted prefix with the node that owns it.
#[derive(Debug, Clone)]
pub struct Ipam {
    pool: IpNet,
    reserved: Vec<(IpNet, &'static str)>,
    /// Every accepted prefix (host bits cleared) with its owners; ordered by
    /// prefix, then owner, so that conflicts come out in a stable order.
    prefixes: BTreeMap<IpNet, BTreeSet<String>>,
}

impl Ipam {
    /// An IPAM with no accepted prefix. Host bits of `overlay_pool` are ignored.
    pub fn new(overlay_pool: IpNet) -> Self {
        Ipam {
            pool: overlay_pool.trunc(),
            reserved: reserved(),
            prefixes: BTreeMap::new(),
        }
    }

    /// Adds accepted prefixes, each with the node that owns it.
    pub fn with_prefixes(mut self, owned: impl IntoIterator<Item = (String, IpNet)>) -> Self {
        for (owner, prefix) in owned {
            self.prefixes
                .entry(prefix.trunc())
                .or_default()
                .insert(owner);
        }
        self
    }

    /// Every conflict of `cidr` advertised by `node`, or, with `node` `None`, as an
    /// operator's what-if check that conflicts with every node's prefixes.
    ///
    /// The node's own accepted prefixes are not conflicts: an advertisement replaces
    /// the node's whole list, and overlaps inside that list are [`Ipam::admit`]'s to
    /// find. `underlay` holds the subnets of the node's NICs that carry its tunnels
    /// (not its VPC-facing NIC); host bits in them are ignored, so interface
    /// addresses such as 203.0.113.10/24 can be passed as they are.
    ///
    /// An empty list means `cidr` is acceptable. Conflicts come in a stable order:
    /// reserved space, the overlay pool, underlay subnets, then nodes' prefixes.
    pub fn check(
        &self,
        cidr: IpNet,
        node: Option<&str>,
        underlay: &[IpNet],
    ) -> Result<Vec<Conflict>, IpamError> {
        require_network(cidr)?;
        Ok(self.conflicts(cidr, node, &prefix_map(underlay)).collect())
    }

    /// [`Ipam::check`] of a network address against `underlay` as a
    /// [`prefix_map`], lazily: a caller that needs a few conflicts pays for a few.
    fn conflicts<'a>(
        &'a self,
        cidr: IpNet,
        node: Option<&'a str>,
        underlay: &'a BTreeMap<IpNet, ()>,
    ) -> impl Iterator<Item = Conflict> + 'a {
        let reserved = self
            .reserved
            .iter()
            .filter(move |(prefix, _)| overlaps(cidr, *prefix))
            .map(|(prefix, name)| Conflict::Reserved {
                prefix: *prefix,
                name: (*name).to_string(),
            });
        let pool = overlaps(cidr, self.pool).then_some(Conflict::OverlayPool { pool: self.pool });
        let underlay =
            overlapping(underlay, cidr).map(|(subnet, ())| Conflict::Underlay { subnet: *subnet });
        let nodes = overlapping(&self.prefixes, cidr).flat_map(move |(prefix, owners)| {
            owners
                .iter()
                .filter(move |owner| node != Some(owner.as_str()))
                .map(move |owner| Conflict::Node {
                    node: owner.clone(),
                    prefix: *prefix,
                })
        });
        reserved.chain(pool).chain(underlay).chain(nodes)
    }

    /// Splits `node`'s advertised list into accepted and refused prefixes, in list
    /// order. Besides [`Ipam::check`], each prefix is checked against the entries of
    /// the same list accepted before it: of two overlapping prefixes, the second is
    /// refused as a [`Conflict::Node`] owned by `node` itself (listed after the
    /// conflicts [`Ipam::check`] finds, in address order). At most
    /// [`MAX_CONFLICTS_LISTED`] conflicts are listed per refused prefix.
    ///
    /// A prefix with host bits set is malformed input rather than a conflict, and
    /// fails the whole advertisement with [`IpamError::HostBits`].
    pub fn admit(
        &self,
        node: &str,
        advertised: &[IpNet],
        underlay: &[IpNet],
    ) -> Result<Admission, IpamError> {
        for &cidr in advertised {
            require_network(cidr)?;
        }
        let underlay = prefix_map(underlay);
        // The list's prefixes accepted so far.
        let mut earlier: BTreeMap<IpNet, ()> = BTreeMap::new();
        let mut admission = Admission::default();
        for &cidr in advertised {
            let mut conflicts: Vec<Conflict> = self
                .conflicts(cidr, Some(node), &underlay)
                .take(MAX_CONFLICTS_LISTED)
                .collect();
            conflicts.extend(
                overlapping(&earlier, cidr)
                    .take(MAX_CONFLICTS_LISTED - conflicts.len())
                    .map(|(prefix, ())| Conflict::Node {
                        node: node.to_string(),
                        prefix: *prefix,
                    }),
            );
            if conflicts.is_empty() {
                earlier.insert(cidr, ());
                admission.accepted.push(cidr);
            } else {
                admission.refused.push((cidr, conflicts));
            }
        }
        Ok(admission)
    }

    /// The lowest block of length `prefix_len` inside `within` that overlaps no
    /// accepted prefix, the overlay pool nor reserved space; `None` when there is
    /// none. Runs in O(n log n) of the number of taken prefixes whatever the size of
    /// `within`, for IPv4 and IPv6 alike.
    pub fn suggest(&self, within: IpNet, prefix_len: u8) -> Result<Option<IpNet>, IpamError> {
        require_network(within)?;
        if prefix_len < within.prefix_len() || prefix_len > within.max_prefix_len() {
            return Err(IpamError::PrefixLen { within, prefix_len });
        }
        let host_mask = host_mask(within.max_prefix_len(), prefix_len);
        let (first, last) = span(within);
        let mut taken: Vec<(u128, u128)> = self
            .reserved
            .iter()
            .map(|(prefix, _)| *prefix)
            .chain([self.pool])
            .chain(self.prefixes.keys().copied())
            .filter(|prefix| overlaps(within, *prefix))
            .map(span)
            .collect();
        taken.sort_unstable();

        // `candidate` is always aligned to the block size and inside `within`, which
        // is aligned to a block at least as large, so `candidate + host_mask` stays
        // inside `within` too.
        let mut candidate = first;
        for (start, end) in taken {
            if end < candidate {
                continue;
            }
            if start > candidate + host_mask {
                // Spans are sorted by start: none of the rest reaches back here.
                break;
            }
            // Jump to the first aligned block after this taken span.
            match (end | host_mask).checked_add(1) {
                Some(next) if next <= last => candidate = next,
                _ => return Ok(None),
            }
        }
        IpNet::new(address(within, candidate), prefix_len)
            .map(Some)
            .map_err(|_| IpamError::PrefixLen { within, prefix_len })
    }
}

/// The lowest address of `pool` not in `taken`, for a new node's overlay address;
/// `None` when the pool is exhausted. The pool's network address is never given
/// out, nor for IPv4 its broadcast address (so an IPv4 /31 or /32 pool has none).
/// Walks `taken` in order from the start of the pool, stopping at the first gap.
pub fn lowest_free_address(pool: IpNet, taken: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let (network, broadcast) = span(pool);
    let first = network.checked_add(1)?;
    let last = match pool {
        IpNet::V4(_) => broadcast.checked_sub(1)?,
        IpNet::V6(_) => broadcast,
    };
    if first > last {
        return None;
    }
    let mut candidate = first;
    for taken in taken.range(address(pool, first)..=address(pool, last)) {
        let taken = to_u128(*taken);
        if taken != candidate {
            break;
        }
        candidate = taken.checked_add(1)?;
    }
    (candidate <= last).then(|| address(pool, candidate))
}

/// `prefixes` with host bits cleared, as the map [`overlapping`] searches.
fn prefix_map(prefixes: &[IpNet]) -> BTreeMap<IpNet, ()> {
    prefixes.iter().map(|p| (p.trunc(), ())).collect()
}

/// The entries of `map` (keys without host bits) that overlap `cidr` (a network
/// address), in key order.
///
/// A CIDR block overlaps another only by holding it or lying inside it. The
/// blocks holding `cidr` have its address cut to a shorter length: one lookup per
/// length. The blocks inside it (and `cidr` itself) are exactly the keys from
/// `cidr` to its last address at full length, because a block that starts inside
/// `cidr` and is not inside it would have to start at `cidr`'s own address with a
/// shorter length, which sorts before `cidr`. So a query costs O(bits * log m)
/// plus what it returns.
fn overlapping<'a, V>(
    map: &'a BTreeMap<IpNet, V>,
    cidr: IpNet,
) -> impl Iterator<Item = (&'a IpNet, &'a V)> + 'a {
    let holders = (0..cidr.prefix_len()).filter_map(move |len| {
        let holder = IpNet::new(cidr.addr(), len).ok()?.trunc();
        map.get_key_value(&holder)
    });
    let last = IpNet::new(cidr.broadcast(), cidr.max_prefix_len()).unwrap_or(cidr);
    let inside = map.range(cidr..=last);
    holders.chain(inside)
}

/// [`RESERVED`], parsed. An entry that does not parse is a bug the unit tests catch.
fn reserved() -> Vec<(IpNet, &'static str)> {
    RESERVED
        .iter()
        .filter_map(|(cidr, name)| cidr.parse().ok().map(|prefix| (prefix, *name)))
        .collect()
}

fn require_network(cidr: IpNet) -> Result<(), IpamError> {
    let suggestion = cidr.trunc();
    if suggestion == cidr {
        Ok(())
    } else {
        Err(IpamError::HostBits { cidr, suggestion })
    }
}

/// Two prefixes share an address. For CIDR blocks that means one contains the
/// other; prefixes of different families never overlap.
fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b) || b.contains(&a)
}

/// First and last address of `net`, as integers.
fn span(net: IpNet) -> (u128, u128) {
    (to_u128(net.network()), to_u128(net.broadcast()))
}

/// The mask of the host bits of a block of `prefix_len` in a family of `bits` bits.
fn host_mask(bits: u8, prefix_len: u8) -> u128 {
    match u32::from(bits.saturating_sub(prefix_len)) {
        0 => 0,
        host_bits => u128::MAX >> (128 - host_bits),
    }
}

fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address `value` in the family of `like`; `value` comes from a span of that
/// family, so for IPv4 it fits in 32 bits.
fn address(like: IpNet, value: u128) -> IpAddr {
    match like {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(value as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn pool() -> IpNet {
        net(DEFAULT_OVERLAY_POOL)
    }

    fn owned(node: &str, prefix: &str) -> (String, IpNet) {
        (node.to_string(), net(prefix))
    }

    /// aws holds 10.0.0.0/16 and fd00:a::/48, gcp holds 10.10.0.0/16.
    fn ipam() -> Ipam {
        Ipam::new(pool()).with_prefixes([
            owned("aws", "10.0.0.0/16"),
            owned("aws", "fd00:a::/48"),
            owned("gcp", "10.10.0.0/16"),
        ])
    }

    fn node_conflict(node: &str, prefix: &str) -> Conflict {
        Conflict::Node {
            node: node.to_string(),
            prefix: net(prefix),
        }
    }

    fn check(ipam: &Ipam, cidr: &str, node: Option<&str>) -> Vec<Conflict> {
        ipam.check(net(cidr), node, &[]).expect("valid input")
    }

    // --- check -------------------------------------------------------------

    #[test]
    fn free_prefix_is_acceptable() {
        assert_eq!(check(&ipam(), "10.20.0.0/16", Some("azure")), vec![]);
        assert_eq!(check(&ipam(), "fd00:b::/48", Some("azure")), vec![]);
        assert_eq!(check(&ipam(), "10.20.0.0/16", None), vec![]);
    }

    #[test]
    fn prefix_inside_another_nodes_prefix_conflicts() {
        assert_eq!(
            check(&ipam(), "10.0.5.0/24", Some("azure")),
            vec![node_conflict("aws", "10.0.0.0/16")]
        );
    }

    #[test]
    fn prefix_containing_another_nodes_prefix_conflicts() {
        assert_eq!(
            check(&ipam(), "10.0.0.0/12", Some("azure")),
            vec![
                node_conflict("aws", "10.0.0.0/16"),
                node_conflict("gcp", "10.10.0.0/16")
            ]
        );
    }

    #[test]
    fn identical_prefix_of_another_node_conflicts() {
        assert_eq!(
            check(&ipam(), "10.10.0.0/16", Some("aws")),
            vec![node_conflict("gcp", "10.10.0.0/16")]
        );
    }

    #[test]
    fn ipv6_overlap_with_another_node_conflicts_both_ways() {
        assert_eq!(
            check(&ipam(), "fd00:a:0:1::/64", Some("gcp")),
            vec![node_conflict("aws", "fd00:a::/48")]
        );
        assert_eq!(
            check(&ipam(), "fd00::/16", Some("gcp")),
            vec![node_conflict("aws", "fd00:a::/48")]
        );
    }

    #[test]
    fn adjacent_prefixes_do_not_overlap() {
        let ipam = Ipam::new(pool()).with_prefixes([owned("aws", "10.0.0.0/16")]);
        assert_eq!(check(&ipam, "10.1.0.0/16", Some("gcp")), vec![]);
        // The block just below is adjacent too.
        let ipam = Ipam::new(pool()).with_prefixes([owned("aws", "10.1.0.0/16")]);
        assert_eq!(check(&ipam, "10.0.0.0/16", Some("gcp")), vec![]);
        let ipam = Ipam::new(pool()).with_prefixes([owned("aws", "fd00:a::/48")]);
        assert_eq!(check(&ipam, "fd00:b::/48", Some("gcp")), vec![]);
    }

    #[test]
    fn other_family_never_overlaps() {
        // ::/0 covers all of IPv6 and nothing of IPv4.
        let ipam = Ipam::new(pool()).with_prefixes([owned("aws", "::/0")]);
        assert_eq!(check(&ipam, "10.0.0.0/8", Some("gcp")), vec![]);
    }

    #[test]
    fn nodes_own_prefix_is_not_a_conflict() {
        assert_eq!(check(&ipam(), "10.0.0.0/16", Some("aws")), vec![]);
        assert_eq!(check(&ipam(), "fd00:a::/48", Some("aws")), vec![]);
        // An advertisement replaces the node's list: it may shrink its prefix.
        assert_eq!(check(&ipam(), "10.0.0.0/20", Some("aws")), vec![]);
    }

    #[test]
    fn what_if_check_conflicts_with_every_node() {
        assert_eq!(
            check(&ipam(), "10.0.0.0/16", None),
            vec![node_conflict("aws", "10.0.0.0/16")]
        );
    }

    #[test]
    fn overlay_pool_conflicts_both_ways() {
        let want = vec![Conflict::OverlayPool { pool: pool() }];
        assert_eq!(check(&ipam(), "100.100.0.0/16", Some("aws")), want);
        assert_eq!(check(&ipam(), "100.64.0.0/10", Some("aws")), want);
        assert_eq!(check(&ipam(), "100.96.0.0/12", Some("aws")), want);
        // Next to the pool is fine.
        assert_eq!(check(&ipam(), "100.112.0.0/12", Some("aws")), vec![]);
    }

    #[test]
    fn ipv6_overlay_pool_conflicts() {
        let v6_pool = net("fd7a:115c:a1e0::/48");
        let ipam = Ipam::new(v6_pool);
        assert_eq!(
            check(&ipam, "fd7a:115c:a1e0:ab12::/64", Some("aws")),
            vec![Conflict::OverlayPool { pool: v6_pool }]
        );
        assert_eq!(check(&ipam, "fd7a:115c:a1e1::/48", Some("aws")), vec![]);
    }

    #[test]
    fn every_reserved_range_conflicts_both_ways() {
        let ipam = Ipam::new(pool());
        for &(cidr, name) in RESERVED {
            let prefix = net(cidr);
            let want = vec![Conflict::Reserved {
                prefix,
                name: name.to_string(),
            }];
            // The range itself, and one host inside it.
            assert_eq!(
                ipam.check(prefix, Some("aws"), &[]).expect("valid input"),
                want,
                "{cidr}"
            );
            let host = IpNet::new(prefix.network(), prefix.max_prefix_len()).expect("cidr");
            assert_eq!(
                ipam.check(host, Some("aws"), &[]).expect("valid input"),
                want,
                "{cidr}"
            );
            // A supernet that contains the range (and nothing else reserved nor the pool).
            let supernet = prefix.supernet().expect("supernet");
            let conflicts = ipam.check(supernet, Some("aws"), &[]).expect("valid input");
            assert!(conflicts.contains(&want[0]), "{supernet}: {conflicts:?}");
        }
    }

    #[test]
    fn reserved_table_is_well_formed() {
        assert_eq!(reserved().len(), RESERVED.len());
        for (prefix, name) in reserved() {
            assert_eq!(prefix, prefix.trunc(), "{name}");
        }
        let names: Vec<&str> = RESERVED.iter().map(|(_, name)| *name).collect();
        for name in [
            "this-network",
            "loopback",
            "link-local",
            "multicast",
            "IPv6 link-local",
            "IPv6 loopback",
            "IPv6 multicast",
        ] {
            assert!(names.contains(&name), "{name}");
        }
    }

    #[test]
    fn default_routes_conflict_with_reserved_space_and_the_pool() {
        let conflicts = check(&ipam(), "0.0.0.0/0", None);
        let reserved_v4 = RESERVED.iter().filter(|(c, _)| !c.contains(':')).count();
        // Every IPv4 reserved range, the pool, aws and gcp.
        assert_eq!(conflicts.len(), reserved_v4 + 1 + 2, "{conflicts:?}");
        let conflicts = check(&ipam(), "::/0", None);
        let reserved_v6 = RESERVED.len() - reserved_v4;
        assert_eq!(conflicts.len(), reserved_v6 + 1, "{conflicts:?}");
    }

    #[test]
    fn underlay_subnet_conflicts_both_ways() {
        let underlay = [net("203.0.113.0/24"), net("2001:db8:1::/64")];
        let check = |cidr: &str| {
            ipam()
                .check(net(cidr), Some("aws"), &underlay)
                .expect("valid input")
        };
        assert_eq!(
            check("203.0.113.128/25"),
            vec![Conflict::Underlay {
                subnet: net("203.0.113.0/24")
            }]
        );
        assert_eq!(
            check("203.0.0.0/16"),
            vec![Conflict::Underlay {
                subnet: net("203.0.113.0/24")
            }]
        );
        assert_eq!(
            check("2001:db8::/32"),
            vec![Conflict::Underlay {
                subnet: net("2001:db8:1::/64")
            }]
        );
        assert_eq!(check("203.0.114.0/24"), vec![]);
    }

    #[test]
    fn underlay_given_as_interface_addresses_is_truncated_and_deduplicated() {
        let underlay = [net("203.0.113.10/24"), net("203.0.113.11/24")];
        assert_eq!(
            ipam()
                .check(net("203.0.113.0/28"), Some("aws"), &underlay)
                .expect("valid input"),
            vec![Conflict::Underlay {
                subnet: net("203.0.113.0/24")
            }]
        );
    }

    #[test]
    fn all_conflicts_are_listed_in_a_stable_order() {
        let ipam = Ipam::new(pool()).with_prefixes([
            owned("zeta", "96.0.0.0/8"),
            owned("alpha", "98.0.0.0/8"),
            owned("beta", "97.0.0.0/8"),
        ]);
        let got = ipam
            .check(net("96.0.0.0/3"), Some("aws"), &[net("100.64.0.1/30")])
            .expect("valid input");
        assert_eq!(
            got,
            vec![
                Conflict::Reserved {
                    prefix: net("127.0.0.0/8"),
                    name: "loopback".to_string()
                },
                Conflict::OverlayPool { pool: pool() },
                Conflict::Underlay {
                    subnet: net("100.64.0.0/30")
                },
                node_conflict("zeta", "96.0.0.0/8"),
                node_conflict("beta", "97.0.0.0/8"),
                node_conflict("alpha", "98.0.0.0/8"),
            ]
        );
    }

    #[test]
    fn host_bits_are_refused_with_the_network_as_suggestion() {
        let err = ipam()
            .check(net("10.0.0.1/16"), Some("aws"), &[])
            .expect_err("invalid input");
        assert_eq!(
            err,
            IpamError::HostBits {
                cidr: net("10.0.0.1/16"),
                suggestion: net("10.0.0.0/16")
            }
        );
        assert_eq!(
            err.to_string(),
            "10.0.0.1/16 has host bits set; did you mean 10.0.0.0/16?"
        );
        let err = ipam()
            .check(net("fd00:a::1/48"), None, &[])
            .expect_err("invalid input");
        assert_eq!(
            err.to_string(),
            "fd00:a::1/48 has host bits set; did you mean fd00:a::/48?"
        );
    }

    // --- describe and serialization -----------------------------------------

    #[test]
    fn describe_names_the_values_and_the_fix() {
        let cidr = net("10.0.5.0/24");
        assert_eq!(
            node_conflict("gcp-gw", "10.0.0.0/16").describe(cidr),
            "10.0.5.0/24 overlaps 10.0.0.0/16 advertised by node gcp-gw; choose a prefix \
             outside it (`skymeshctl ipam suggest`) or withdraw it there"
        );
        let pool_msg = Conflict::OverlayPool { pool: pool() }.describe(net("100.100.0.0/16"));
        assert!(pool_msg.starts_with("100.100.0.0/16 overlaps the overlay pool 100.96.0.0/12"));
        assert!(pool_msg.contains("skymeshctl ipam suggest"), "{pool_msg}");
        assert!(
            pool_msg.contains("move the controller's overlay pool"),
            "{pool_msg}"
        );

        let reserved_msg = Conflict::Reserved {
            prefix: net("169.254.0.0/16"),
            name: "link-local".to_string(),
        }
        .describe(net("169.254.169.254/32"));
        assert!(
            reserved_msg.starts_with("169.254.169.254/32 overlaps 169.254.0.0/16 (link-local)"),
            "{reserved_msg}"
        );
        assert!(reserved_msg.contains("reserved"), "{reserved_msg}");
        assert!(
            reserved_msg.contains("skymeshctl ipam suggest"),
            "{reserved_msg}"
        );

        let underlay_msg = Conflict::Underlay {
            subnet: net("203.0.113.0/24"),
        }
        .describe(net("203.0.0.0/16"));
        assert!(
            underlay_msg
                .starts_with("203.0.0.0/16 overlaps this node's underlay subnet 203.0.113.0/24"),
            "{underlay_msg}"
        );
        assert!(underlay_msg.contains("cut the tunnel"), "{underlay_msg}");
        assert!(
            underlay_msg.contains("leave the underlay subnet out"),
            "{underlay_msg}"
        );
    }

    #[test]
    fn describe_is_one_sentence() {
        let cidr = net("10.0.0.0/8");
        for conflict in [
            node_conflict("aws", "10.0.0.0/16"),
            Conflict::OverlayPool { pool: pool() },
            Conflict::Reserved {
                prefix: net("0.0.0.0/8"),
                name: "this-network".to_string(),
            },
            Conflict::Underlay {
                subnet: net("10.1.0.0/24"),
            },
        ] {
            let text = conflict.describe(cidr);
            assert!(!text.contains('\n') && !text.contains("  "), "{text}");
            assert!(text.starts_with("10.0.0.0/8 overlaps "), "{text}");
        }
    }

    #[test]
    fn conflicts_serialize_with_a_kind_tag() {
        let json = |c: &Conflict| serde_json::to_value(c).expect("encode");
        assert_eq!(
            json(&node_conflict("aws", "10.0.0.0/16")),
            serde_json::json!({"kind": "node", "node": "aws", "prefix": "10.0.0.0/16"})
        );
        assert_eq!(
            json(&Conflict::OverlayPool { pool: pool() }),
            serde_json::json!({"kind": "overlay_pool", "pool": "100.96.0.0/12"})
        );
        assert_eq!(
            json(&Conflict::Reserved {
                prefix: net("ff00::/8"),
                name: "IPv6 multicast".to_string()
            }),
            serde_json::json!({"kind": "reserved", "prefix": "ff00::/8", "name": "IPv6 multicast"})
        );
        assert_eq!(
            json(&Conflict::Underlay {
                subnet: net("203.0.113.0/24")
            }),
            serde_json::json!({"kind": "underlay", "subnet": "203.0.113.0/24"})
        );
    }

    // --- admit --------------------------------------------------------------

    #[test]
    fn admit_keeps_good_prefixes_and_refuses_bad_ones() {
        let underlay = [net("203.0.113.0/24")];
        let advertised = [
            net("10.20.0.0/16"),    // free
            net("10.0.128.0/17"),   // inside aws
            net("fd00:b::/48"),     // free
            net("127.0.0.0/16"),    // loopback
            net("203.0.113.0/25"),  // own underlay
            net("100.97.0.0/16"),   // overlay pool
            net("192.168.10.0/24"), // free
        ];
        let got = ipam()
            .admit("azure", &advertised, &underlay)
            .expect("valid input");
        assert_eq!(
            got.accepted,
            vec![
                net("10.20.0.0/16"),
                net("fd00:b::/48"),
                net("192.168.10.0/24")
            ]
        );
        assert_eq!(
            got.refused,
            vec![
                (
                    net("10.0.128.0/17"),
                    vec![node_conflict("aws", "10.0.0.0/16")]
                ),
                (
                    net("127.0.0.0/16"),
                    vec![Conflict::Reserved {
                        prefix: net("127.0.0.0/8"),
                        name: "loopback".to_string()
                    }]
                ),
                (
                    net("203.0.113.0/25"),
                    vec![Conflict::Underlay {
                        subnet: net("203.0.113.0/24")
                    }]
                ),
                (
                    net("100.97.0.0/16"),
                    vec![Conflict::OverlayPool { pool: pool() }]
                ),
            ]
        );
    }

    #[test]
    fn admit_refuses_the_second_of_two_overlapping_prefixes_of_one_node() {
        let advertised = [
            net("10.20.0.0/16"),
            net("10.20.5.0/24"),
            net("10.30.0.0/24"),
            net("10.30.0.0/16"),
            net("fd00:c::/48"),
            net("fd00:c::/48"),
        ];
        let got = ipam()
            .admit("azure", &advertised, &[])
            .expect("valid input");
        assert_eq!(
            got.accepted,
            vec![net("10.20.0.0/16"), net("10.30.0.0/24"), net("fd00:c::/48")]
        );
        assert_eq!(
            got.refused,
            vec![
                (
                    net("10.20.5.0/24"),
                    vec![node_conflict("azure", "10.20.0.0/16")]
                ),
                (
                    net("10.30.0.0/16"),
                    vec![node_conflict("azure", "10.30.0.0/24")]
                ),
                (
                    net("fd00:c::/48"),
                    vec![node_conflict("azure", "fd00:c::/48")]
                ),
            ]
        );
    }

    #[test]
    fn admit_checks_later_entries_only_against_accepted_earlier_ones() {
        // 10.0.0.0/8 is refused (it holds aws's prefix), so it does not block 10.20.0.0/16.
        let got = ipam()
            .admit("azure", &[net("10.0.0.0/8"), net("10.20.0.0/16")], &[])
            .expect("valid input");
        assert_eq!(got.accepted, vec![net("10.20.0.0/16")]);
        assert_eq!(got.refused.len(), 1);
        assert_eq!(got.refused[0].0, net("10.0.0.0/8"));
    }

    #[test]
    fn admit_of_a_nodes_own_prefixes_accepts_them_again() {
        let advertised = [net("10.0.0.0/16"), net("fd00:a::/48")];
        let got = ipam().admit("aws", &advertised, &[]).expect("valid input");
        assert_eq!(got.accepted, advertised.to_vec());
        assert_eq!(got.refused, vec![]);
    }

    #[test]
    fn admit_fails_on_host_bits() {
        let err = ipam()
            .admit("azure", &[net("10.20.0.0/16"), net("10.30.0.1/16")], &[])
            .expect_err("invalid input");
        assert_eq!(
            err,
            IpamError::HostBits {
                cidr: net("10.30.0.1/16"),
                suggestion: net("10.30.0.0/16")
            }
        );
    }

    #[test]
    fn admit_of_nothing_is_empty() {
        assert_eq!(
            ipam().admit("aws", &[], &[]).expect("valid input"),
            Admission::default()
        );
    }

    // --- admission at scale -------------------------------------------------

    /// The definition of [`Ipam::admit`], checked pair by pair: the oracle the
    /// ordered-map search is compared with.
    fn admit_brute_force(
        owned: &[(String, IpNet)],
        node: &str,
        advertised: &[IpNet],
        underlay: &[IpNet],
    ) -> Admission {
        let ipam = Ipam::new(pool());
        let mut others: Vec<(IpNet, &str)> = owned
            .iter()
            .filter(|(owner, _)| owner != node)
            .map(|(owner, prefix)| (prefix.trunc(), owner.as_str()))
            .collect();
        others.sort_unstable();
        others.dedup();
        let mut underlay: Vec<IpNet> = underlay.iter().map(IpNet::trunc).collect();
        underlay.sort_unstable();
        underlay.dedup();
        let mut admission = Admission::default();
        for &cidr in advertised {
            let mut conflicts: Vec<Conflict> = ipam
                .reserved
                .iter()
                .filter(|(prefix, _)| overlaps(cidr, *prefix))
                .map(|(prefix, name)| Conflict::Reserved {
                    prefix: *prefix,
                    name: (*name).to_string(),
                })
                .collect();
            if overlaps(cidr, ipam.pool) {
                conflicts.push(Conflict::OverlayPool { pool: ipam.pool });
            }
            conflicts.extend(
                underlay
                    .iter()
                    .filter(|subnet| overlaps(cidr, **subnet))
                    .map(|subnet| Conflict::Underlay { subnet: *subnet }),
            );
            conflicts.extend(
                others
                    .iter()
                    .filter(|(prefix, _)| overlaps(cidr, *prefix))
                    .map(|(prefix, owner)| node_conflict(owner, &prefix.to_string())),
            );
            let mut earlier: Vec<IpNet> = admission
                .accepted
                .iter()
                .copied()
                .filter(|earlier| overlaps(cidr, *earlier))
                .collect();
            earlier.sort_unstable();
            conflicts.extend(
                earlier
                    .iter()
                    .map(|earlier| node_conflict(node, &earlier.to_string())),
            );
            conflicts.truncate(MAX_CONFLICTS_LISTED);
            if conflicts.is_empty() {
                admission.accepted.push(cidr);
            } else {
                admission.refused.push((cidr, conflicts));
            }
        }
        admission
    }

    /// A random prefix of a few families and lengths, dense enough in a small
    /// space that overlaps of every kind (holding, inside, equal) are common.
    fn random_prefix(rng: &mut impl rand::Rng) -> IpNet {
        if rng.gen_bool(0.8) {
            let len = rng.gen_range(4..=20);
            let addr = Ipv4Addr::from(0x0a00_0000 | (rng.gen::<u32>() & 0x000f_ff00));
            let addr = if rng.gen_bool(0.1) {
                Ipv4Addr::from(rng.gen::<u32>())
            } else {
                addr
            };
            IpNet::new(IpAddr::V4(addr), len + 12).expect("len").trunc()
        } else {
            let addr = Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(rng.gen::<u16>()) << 96);
            IpNet::new(IpAddr::V6(addr), rng.gen_range(8..=40))
                .expect("len")
                .trunc()
        }
    }

    #[test]
    fn admit_agrees_with_a_brute_force_oracle_on_random_prefixes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for round in 0..300 {
            let owners = ["aws", "gcp", "azure", "me"];
            let owned: Vec<(String, IpNet)> = (0..rng.gen_range(0..40))
                .map(|_| {
                    let owner = owners[rng.gen_range(0..owners.len())].to_string();
                    (owner, random_prefix(&mut rng))
                })
                .collect();
            let advertised: Vec<IpNet> = (0..rng.gen_range(0..40))
                .map(|_| random_prefix(&mut rng))
                .collect();
            let underlay: Vec<IpNet> = (0..rng.gen_range(0..3))
                .map(|_| random_prefix(&mut rng))
                .collect();
            let ipam = Ipam::new(pool()).with_prefixes(owned.clone());
            let got = ipam.admit("me", &advertised, &underlay).expect("valid");
            let want = admit_brute_force(&owned, "me", &advertised, &underlay);
            assert_eq!(got, want, "round {round}: {owned:?} / {advertised:?}");
            for &cidr in &advertised {
                let mut want = ipam.check(cidr, Some("me"), &underlay).expect("valid");
                let mut brute = admit_brute_force(&owned, "me", &[cidr], &underlay);
                let brute = brute.refused.pop().map(|(_, c)| c).unwrap_or_default();
                want.truncate(MAX_CONFLICTS_LISTED);
                assert_eq!(want, brute, "round {round}: check {cidr}");
            }
        }
    }

    #[test]
    fn admit_lists_at_most_a_few_conflicts_per_prefix() {
        let owned: Vec<(String, IpNet)> = (0..100u32)
            .map(|i| {
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i << 8));
                (
                    format!("n{i}"),
                    IpNet::new(IpAddr::V4(addr), 24).expect("cidr"),
                )
            })
            .collect();
        let ipam = Ipam::new(pool()).with_prefixes(owned);
        let got = ipam.admit("me", &[net("10.0.0.0/8")], &[]).expect("valid");
        assert_eq!(got.refused[0].1.len(), MAX_CONFLICTS_LISTED);
        assert_eq!(got.refused[0].1[0], node_conflict("n0", "10.0.0.0/24"));
        // The what-if check of one prefix still lists them all.
        assert_eq!(check(&ipam, "10.0.0.0/8", None).len(), 100);
    }

    /// The controller's 150k-prefix stall: admission compared every advertised
    /// prefix with every accepted one (50k x 150k pairs here, minutes of CPU). The
    /// bound is two orders of magnitude above what the ordered-map search takes.
    #[test]
    fn admit_of_fifty_thousand_prefixes_against_a_hundred_thousand_is_fast() {
        let slash24 = |base: Ipv4Addr, i: u32| {
            IpNet::new(IpAddr::V4(Ipv4Addr::from(u32::from(base) + (i << 8))), 24).expect("cidr")
        };
        let owned = (0..100_000u32).map(|i| {
            (
                format!("node-{}", i % 5_000),
                slash24(Ipv4Addr::new(20, 0, 0, 0), i),
            )
        });
        let ipam = Ipam::new(pool()).with_prefixes(owned);
        // 49,000 free /24s in 11.0.0.0/8 and every 50th one taken (100,000 /24s from 20.0.0.0).
        let advertised: Vec<IpNet> = (0..50_000u32)
            .map(|i| {
                if i % 50 == 0 {
                    slash24(Ipv4Addr::new(20, 0, 0, 0), i)
                } else {
                    slash24(Ipv4Addr::new(11, 0, 0, 0), i)
                }
            })
            .collect();
        let started = Instant::now();
        let got = ipam.admit("me", &advertised, &[]).expect("valid");
        let took = started.elapsed();
        let refused: Vec<_> = got.refused.iter().take(3).collect();
        assert_eq!(got.accepted.len(), 49_000, "{refused:?}");
        assert_eq!(got.refused.len(), 1_000);
        assert_eq!(
            got.refused[1].1,
            vec![node_conflict("node-50", "20.0.50.0/24")]
        );
        assert!(took < Duration::from_secs(10), "admission took {took:?}");
    }

    // --- suggest ------------------------------------------------------------

    fn suggest(ipam: &Ipam, within: &str, prefix_len: u8) -> Option<IpNet> {
        ipam.suggest(net(within), prefix_len).expect("valid input")
    }

    #[test]
    fn suggest_gives_the_lowest_block() {
        let ipam = Ipam::new(pool());
        assert_eq!(suggest(&ipam, "10.0.0.0/8", 16), Some(net("10.0.0.0/16")));
        assert_eq!(suggest(&ipam, "10.0.0.0/8", 8), Some(net("10.0.0.0/8")));
        assert_eq!(suggest(&ipam, "10.0.0.0/8", 32), Some(net("10.0.0.0/32")));
    }

    #[test]
    fn suggest_skips_taken_prefixes() {
        // aws 10.0.0.0/16 and gcp 10.10.0.0/16.
        assert_eq!(suggest(&ipam(), "10.0.0.0/8", 16), Some(net("10.1.0.0/16")));
        let ipam = ipam().with_prefixes([owned("azure", "10.1.0.0/16")]);
        assert_eq!(suggest(&ipam, "10.0.0.0/8", 16), Some(net("10.2.0.0/16")));
        // A /12 must skip 10.0.0.0/12 entirely (it holds aws and gcp).
        assert_eq!(suggest(&ipam, "10.0.0.0/8", 12), Some(net("10.16.0.0/12")));
    }

    #[test]
    fn suggest_fills_a_gap_between_taken_prefixes() {
        let ipam = Ipam::new(pool()).with_prefixes([
            owned("a", "10.0.0.0/24"),
            owned("b", "10.0.2.0/24"),
            owned("c", "10.0.1.128/25"),
        ]);
        assert_eq!(suggest(&ipam, "10.0.0.0/16", 25), Some(net("10.0.1.0/25")));
        assert_eq!(suggest(&ipam, "10.0.0.0/16", 24), Some(net("10.0.3.0/24")));
    }

    #[test]
    fn suggest_aligns_blocks() {
        // 10.0.0.0/24 taken: the next free /23 starts at 10.0.2.0, not 10.0.1.0.
        let ipam = Ipam::new(pool()).with_prefixes([owned("a", "10.0.0.0/24")]);
        assert_eq!(suggest(&ipam, "10.0.0.0/16", 23), Some(net("10.0.2.0/23")));
        // A taken /32 in the middle of the first /30.
        let ipam = Ipam::new(pool()).with_prefixes([owned("a", "10.0.0.2/32")]);
        assert_eq!(suggest(&ipam, "10.0.0.0/24", 30), Some(net("10.0.0.4/30")));
        assert_eq!(suggest(&ipam, "10.0.0.0/24", 31), Some(net("10.0.0.0/31")));
    }

    #[test]
    fn suggest_handles_a_taken_prefix_larger_than_the_range() {
        let ipam = Ipam::new(pool()).with_prefixes([owned("a", "10.0.0.0/8")]);
        assert_eq!(suggest(&ipam, "10.1.0.0/16", 24), None);
        assert_eq!(suggest(&ipam, "11.0.0.0/8", 24), Some(net("11.0.0.0/24")));
    }

    #[test]
    fn suggest_avoids_the_overlay_pool() {
        let ipam = Ipam::new(pool());
        assert_eq!(
            suggest(&ipam, "100.64.0.0/10", 12),
            Some(net("100.64.0.0/12"))
        );
        let ipam = ipam.with_prefixes([owned("a", "100.64.0.0/12"), owned("b", "100.80.0.0/12")]);
        assert_eq!(
            suggest(&ipam, "100.64.0.0/10", 12),
            Some(net("100.112.0.0/12"))
        );
        assert_eq!(suggest(&ipam, "100.96.0.0/12", 24), None);
    }

    #[test]
    fn suggest_avoids_reserved_space() {
        let ipam = Ipam::new(pool());
        assert_eq!(suggest(&ipam, "0.0.0.0/0", 8), Some(net("1.0.0.0/8")));
        assert_eq!(suggest(&ipam, "127.0.0.0/8", 24), None);
        assert_eq!(
            suggest(&ipam, "169.254.0.0/15", 16),
            Some(net("169.255.0.0/16"))
        );
        // 224.0.0.0/4 is multicast; 240.0.0.0/4 is free as far as IPAM knows.
        assert_eq!(suggest(&ipam, "224.0.0.0/3", 4), Some(net("240.0.0.0/4")));
        assert_eq!(suggest(&ipam, "::/0", 8), Some(net("100::/8")));
        assert_eq!(suggest(&ipam, "::/120", 128), Some(net("::/128")));
        assert_eq!(suggest(&ipam, "::/127", 128), Some(net("::/128")));
        assert_eq!(suggest(&ipam, "::1/128", 128), None);
        assert_eq!(suggest(&ipam, "fe80::/9", 10), Some(net("fec0::/10")));
        assert_eq!(suggest(&ipam, "ff00::/8", 64), None);
        assert_eq!(suggest(&ipam, "fe00::/7", 9), Some(net("fe00::/9")));
    }

    #[test]
    fn suggest_returns_none_when_full() {
        let ipam = Ipam::new(pool()).with_prefixes([
            owned("a", "10.0.0.0/25"),
            owned("b", "10.0.0.128/26"),
            owned("c", "10.0.0.192/26"),
        ]);
        assert_eq!(suggest(&ipam, "10.0.0.0/24", 24), None);
        assert_eq!(suggest(&ipam, "10.0.0.0/24", 32), None);
        // Full up to the very top of the address space.
        let ipam = Ipam::new(pool()).with_prefixes([owned("a", "255.255.255.0/24")]);
        assert_eq!(suggest(&ipam, "255.255.255.0/24", 30), None);
        let ipam = Ipam::new(pool()).with_prefixes([owned("a", "ffff::/16")]);
        assert_eq!(suggest(&ipam, "ffff::/16", 64), None);
        // Only the top block left.
        let ipam = Ipam::new(pool()).with_prefixes([owned("a", "255.255.255.0/25")]);
        assert_eq!(
            suggest(&ipam, "255.255.255.0/24", 25),
            Some(net("255.255.255.128/25"))
        );
    }

    #[test]
    fn suggest_refuses_bad_prefix_lengths() {
        let ipam = Ipam::new(pool());
        for (within, prefix_len) in [("10.0.0.0/16", 8), ("10.0.0.0/16", 33), ("fd00::/48", 129)] {
            assert_eq!(
                ipam.suggest(net(within), prefix_len),
                Err(IpamError::PrefixLen {
                    within: net(within),
                    prefix_len
                })
            );
        }
        assert_eq!(
            ipam.suggest(net("10.0.0.0/16"), 8)
                .expect_err("invalid input")
                .to_string(),
            "prefix length /8 does not fit inside 10.0.0.0/16; choose a length from /16 to /32"
        );
        assert_eq!(
            ipam.suggest(net("fd00::/48"), 129)
                .expect_err("invalid input")
                .to_string(),
            "prefix length /129 does not fit inside fd00::/48; choose a length from /48 to /128"
        );
    }

    #[test]
    fn suggest_refuses_a_range_with_host_bits() {
        assert_eq!(
            Ipam::new(pool()).suggest(net("10.0.0.1/8"), 24),
            Err(IpamError::HostBits {
                cidr: net("10.0.0.1/8"),
                suggestion: net("10.0.0.0/8")
            })
        );
    }

    #[test]
    fn suggest_in_ipv6() {
        let ipam = Ipam::new(pool()).with_prefixes([
            owned("aws", "fd00::/32"),
            owned("gcp", "fd00:1::/32"),
            owned("azure", "fd00:2:0:1::/64"),
        ]);
        assert_eq!(suggest(&ipam, "fd00::/16", 32), Some(net("fd00:3::/32")));
        assert_eq!(suggest(&ipam, "fd00:2::/32", 64), Some(net("fd00:2::/64")));
        assert_eq!(
            suggest(&ipam, "fd00:2::/32", 63),
            Some(net("fd00:2:0:2::/63"))
        );
        // ::/8 holds ::1 (IPv6 loopback); IPv4 prefixes and the IPv4 pool do not matter.
        assert_eq!(suggest(&ipam, "::/0", 8), Some(net("100::/8")));
    }

    #[test]
    fn suggest_ignores_the_ipv4_pool_in_ipv6_and_vice_versa() {
        let ipam = Ipam::new(net("fd7a::/16"));
        assert_eq!(suggest(&ipam, "fd00::/8", 16), Some(net("fd00::/16")));
        assert_eq!(suggest(&ipam, "fd7a::/15", 16), Some(net("fd7b::/16")));
        assert_eq!(
            suggest(&ipam, "100.96.0.0/12", 24),
            Some(net("100.96.0.0/24"))
        );
    }

    #[test]
    fn suggest_is_fast_with_thousands_of_taken_prefixes() {
        // 5,000 /24s taken from the bottom of 10.0.0.0/8, plus scattered /30s above.
        let mut owned_prefixes: Vec<(String, IpNet)> = (0..5_000u32)
            .map(|i| {
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + (i << 8));
                (
                    format!("node-{i}"),
                    IpNet::new(IpAddr::V4(addr), 24).expect("cidr"),
                )
            })
            .collect();
        owned_prefixes.extend((0..5_000u32).map(|i| {
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i << 2));
            (
                format!("small-{i}"),
                IpNet::new(IpAddr::V4(addr), 30).expect("cidr"),
            )
        }));
        let ipam = Ipam::new(pool()).with_prefixes(owned_prefixes);
        let started = Instant::now();
        // 5,000 /24s = 10.0.0.0 .. 10.19.135.0.
        assert_eq!(
            suggest(&ipam, "10.0.0.0/8", 24),
            Some(net("10.19.136.0/24"))
        );
        assert_eq!(suggest(&ipam, "10.0.0.0/8", 16), Some(net("10.20.0.0/16")));
        assert_eq!(
            suggest(&ipam, "10.128.0.0/9", 30),
            Some(net("10.128.78.32/30"))
        );
        assert_eq!(
            suggest(&ipam, "10.0.0.0/8", 30),
            Some(net("10.19.136.0/30"))
        );
        assert_eq!(suggest(&ipam, "fd00::/8", 64), Some(net("fd00::/64")));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    // --- lowest_free_address ------------------------------------------------

    fn taken(addrs: &[&str]) -> BTreeSet<IpAddr> {
        addrs.iter().map(|a| ip(a)).collect()
    }

    #[test]
    fn lowest_free_address_skips_the_network_address() {
        assert_eq!(
            lowest_free_address(pool(), &taken(&[])),
            Some(ip("100.96.0.1"))
        );
        assert_eq!(
            lowest_free_address(net("fd7a::/48"), &taken(&[])),
            Some(ip("fd7a::1"))
        );
    }

    #[test]
    fn lowest_free_address_fills_gaps() {
        assert_eq!(
            lowest_free_address(pool(), &taken(&["100.96.0.1", "100.96.0.2", "100.96.0.4"])),
            Some(ip("100.96.0.3"))
        );
        assert_eq!(
            lowest_free_address(pool(), &taken(&["100.96.0.2"])),
            Some(ip("100.96.0.1"))
        );
        assert_eq!(
            lowest_free_address(net("fd7a::/120"), &taken(&["fd7a::1", "fd7a::3"])),
            Some(ip("fd7a::2"))
        );
    }

    #[test]
    fn lowest_free_address_ignores_addresses_outside_the_pool() {
        let taken = taken(&["100.95.255.255", "100.96.0.0", "fd7a::1", "10.0.0.1"]);
        assert_eq!(lowest_free_address(pool(), &taken), Some(ip("100.96.0.1")));
        assert_eq!(
            lowest_free_address(net("fd7a::/64"), &taken),
            Some(ip("fd7a::2"))
        );
    }

    #[test]
    fn lowest_free_address_is_none_when_exhausted() {
        let pool = net("100.96.0.0/30");
        assert_eq!(
            lowest_free_address(pool, &taken(&["100.96.0.1"])),
            Some(ip("100.96.0.2"))
        );
        // .0 is the network address and .3 the broadcast address.
        assert_eq!(
            lowest_free_address(pool, &taken(&["100.96.0.1", "100.96.0.2"])),
            None
        );
        assert_eq!(lowest_free_address(net("100.96.0.0/31"), &taken(&[])), None);
        assert_eq!(lowest_free_address(net("100.96.0.0/32"), &taken(&[])), None);
        assert_eq!(lowest_free_address(net("0.0.0.0/32"), &taken(&[])), None);
        // IPv6 has no broadcast address: the last one is given out.
        assert_eq!(
            lowest_free_address(net("fd7a::/126"), &taken(&["fd7a::1", "fd7a::2"])),
            Some(ip("fd7a::3"))
        );
        assert_eq!(
            lowest_free_address(
                net("fd7a::/126"),
                &taken(&["fd7a::1", "fd7a::2", "fd7a::3"])
            ),
            None
        );
        assert_eq!(lowest_free_address(net("fd7a::/128"), &taken(&[])), None);
        let top = net("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffc/126");
        let all = taken(&[
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffd",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ]);
        assert_eq!(lowest_free_address(top, &all), None);
    }

    #[test]
    fn lowest_free_address_is_fast_in_a_large_pool() {
        let base = u32::from(Ipv4Addr::new(100, 96, 0, 1));
        let mut taken: BTreeSet<IpAddr> = (0..20_000u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(base + i)))
            .collect();
        let started = Instant::now();
        assert_eq!(
            lowest_free_address(pool(), &taken),
            Some(IpAddr::V4(Ipv4Addr::from(base + 20_000)))
        );
        taken.remove(&IpAddr::V4(Ipv4Addr::from(base + 12_345)));
        assert_eq!(
            lowest_free_address(pool(), &taken),
            Some(IpAddr::V4(Ipv4Addr::from(base + 12_345)))
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn exhausted_message_names_the_range_and_the_fix() {
        let err = IpamError::Exhausted {
            within: net("10.0.0.0/24"),
            prefix_len: 26,
        };
        assert_eq!(
            err.to_string(),
            "no free /26 is left inside 10.0.0.0/24; choose a wider range, or withdraw \
             prefixes (or remove nodes) that are no longer used"
        );
    }

    #[test]
    fn default_overlay_pool_parses() {
        assert_eq!(pool(), pool().trunc());
        assert_eq!(pool().prefix_len(), 12);
    }
}
