//! The agent's IP header reading (`skymesh_agent::packet`) and its link probes
//! (`skymesh_agent::probe`): what it reads from every decrypted packet.

use skymesh_agent::packet;
use skymesh_agent::probe::{Probe, MAX_DOWN};
use std::net::IpAddr;

/// Target `packet`: `data` is an IP packet as it comes out of a tunnel or the
/// TUN device.
///
/// Invariants: addresses are read from where the header keeps them, and only
/// from a long enough packet of version 4 or 6; a TTL decrement changes the
/// TTL (or hop limit) by one, keeps the IPv4 header checksum valid and touches
/// nothing else, and a refused one touches nothing; a decoded probe encodes
/// back to a probe that decodes to itself.
pub fn packet(data: &[u8]) {
    let version = data.first().map(|b| b >> 4);
    for (addr, v4_at, v6_at) in [
        (packet::source(data), 12, 8),
        (packet::destination(data), 16, 24),
    ] {
        match addr {
            None => {}
            Some(IpAddr::V4(a)) => {
                assert_eq!(version, Some(4));
                assert_eq!(a.octets()[..], data[v4_at..v4_at + 4]);
            }
            Some(IpAddr::V6(a)) => {
                assert_eq!(version, Some(6));
                assert_eq!(a.octets()[..], data[v6_at..v6_at + 16]);
            }
        }
    }
    if matches!(version, Some(4)) && data.len() >= 20
        || matches!(version, Some(6)) && data.len() >= 40
    {
        assert!(packet::source(data).is_some() && packet::destination(data).is_some());
    }

    let mut p = data.to_vec();
    if packet::decrement_ttl(&mut p) {
        match version {
            Some(4) => {
                let ihl = usize::from(data[0] & 0x0f) * 4;
                assert_eq!(p[8], data[8] - 1, "TTL decremented");
                assert_eq!(packet::internet_checksum(&p[..ihl]), 0, "checksum valid");
                assert_eq!(p[..8], data[..8]);
                assert_eq!(p[9], data[9]);
                assert_eq!(p[12..], data[12..], "only TTL and checksum change");
            }
            Some(6) => {
                assert_eq!(p[7], data[7] - 1, "hop limit decremented");
                assert_eq!(p[..7], data[..7]);
                assert_eq!(p[8..], data[8..], "only the hop limit changes");
            }
            v => panic!("decremented the TTL of a version {v:?} packet"),
        }
    } else {
        assert_eq!(p, data, "a refused decrement leaves the packet alone");
    }

    if let Some(probe) = Probe::decode(data) {
        assert!(Probe::is_probe(data));
        let (src, dst) = match (packet::source(data), packet::destination(data)) {
            (Some(IpAddr::V4(s)), Some(IpAddr::V4(d))) => (s, d),
            other => panic!("a probe without IPv4 addresses: {other:?}"),
        };
        let mut out = vec![0u8; 20 + 12 + 4 * probe.down.len()];
        let len = probe.encode(src, dst, &mut out);
        // A probe lists at most MAX_DOWN peers; encode drops the rest.
        let mut sent = probe;
        sent.down.truncate(MAX_DOWN);
        assert_eq!(
            Probe::decode(&out[..len]),
            Some(sent),
            "decode(encode(p)) == p"
        );
    }
}
