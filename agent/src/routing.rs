//! Longest-prefix match from an address to a value (a peer). One table per
//! address family, one hash map per prefix length in use; a lookup probes only
//! the lengths that hold routes, longest first.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Clone)]
pub struct RoutingTable<T> {
    v4: Family<T>,
    v6: Family<T>,
}

#[derive(Debug, Clone)]
struct Family<T> {
    /// Index = prefix length; key = the masked network bits.
    by_len: Vec<HashMap<u128, T>>,
    /// Prefix lengths that hold at least one route, longest first.
    lens: Vec<u8>,
    bits: u8,
}

impl<T: Copy> Family<T> {
    fn new(bits: u8) -> Self {
        Self {
            by_len: (0..=bits).map(|_| HashMap::new()).collect(),
            lens: Vec::new(),
            bits,
        }
    }

    fn mask(&self, addr: u128, len: u8) -> u128 {
        if len == 0 {
            0
        } else {
            let shift = u32::from(self.bits - len);
            (addr >> shift) << shift
        }
    }

    fn insert(&mut self, addr: u128, len: u8, value: T) -> Option<T> {
        let key = self.mask(addr, len);
        let old = self.by_len[usize::from(len)].insert(key, value);
        if !self.lens.contains(&len) {
            self.lens.push(len);
            self.lens.sort_unstable_by(|a, b| b.cmp(a));
        }
        old
    }

    fn remove(&mut self, addr: u128, len: u8) -> Option<T> {
        let key = self.mask(addr, len);
        let map = &mut self.by_len[usize::from(len)];
        let old = map.remove(&key);
        if map.is_empty() {
            self.lens.retain(|l| *l != len);
        }
        old
    }

    fn lookup(&self, addr: u128) -> Option<T> {
        self.lens.iter().find_map(|&len| {
            self.by_len[usize::from(len)]
                .get(&self.mask(addr, len))
                .copied()
        })
    }
}

impl<T: Copy> Default for RoutingTable<T> {
    fn default() -> Self {
        Self {
            v4: Family::new(32),
            v6: Family::new(128),
        }
    }
}

impl<T: Copy> RoutingTable<T> {
    /// Adds or replaces the route for `net`; returns the value it replaced.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net {
            IpNet::V4(n) => {
                self.v4
                    .insert(u128::from(u32::from(n.network())), n.prefix_len(), value)
            }
            IpNet::V6(n) => self
                .v6
                .insert(u128::from(n.network()), n.prefix_len(), value),
        }
    }

    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        match net {
            IpNet::V4(n) => self
                .v4
                .remove(u128::from(u32::from(n.network())), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.network()), n.prefix_len()),
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u128::from(u32::from(a))),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = RoutingTable::default();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.10.0.0/16"), 2);
        t.insert(net("10.10.5.0/24"), 3);
        t.insert(net("0.0.0.0/0"), 9);
        assert_eq!(t.lookup(ip("10.10.5.7")), Some(3));
        assert_eq!(t.lookup(ip("10.10.6.7")), Some(2));
        assert_eq!(t.lookup(ip("10.11.0.1")), Some(1));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(9));
        t.remove(net("10.10.5.0/24"));
        assert_eq!(t.lookup(ip("10.10.5.7")), Some(2));
        t.remove(net("0.0.0.0/0"));
        assert_eq!(t.lookup(ip("192.0.2.1")), None);
    }

    #[test]
    fn families_are_separate_and_host_routes_work() {
        let mut t = RoutingTable::default();
        t.insert(net("100.96.0.2/32"), 1);
        t.insert(net("fd00:10::/48"), 2);
        t.insert(net("::/0"), 3);
        assert_eq!(t.lookup(ip("100.96.0.2")), Some(1));
        assert_eq!(t.lookup(ip("100.96.0.3")), None);
        assert_eq!(t.lookup(ip("fd00:10::99")), Some(2));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(3));
        assert_eq!(t.insert(net("100.96.0.2/32"), 5), Some(1));
    }
}
