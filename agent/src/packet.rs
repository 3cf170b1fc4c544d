//! Just enough IP header reading for routing decisions: the version, source and
//! destination of a packet. Never trusts a length it has not checked.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Destination address of an IPv4 or IPv6 packet, or `None` if it is not one.
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(IpAddr::V4(v4_at(packet, 16))),
        6 if packet.len() >= 40 => Some(IpAddr::V6(v6_at(packet, 24))),
        _ => None,
    }
}

/// Source address of an IPv4 or IPv6 packet, or `None` if it is not one.
pub fn source(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(IpAddr::V4(v4_at(packet, 12))),
        6 if packet.len() >= 40 => Some(IpAddr::V6(v6_at(packet, 8))),
        _ => None,
    }
}

/// Decrements the IPv4 TTL (fixing the header checksum) or the IPv6 hop limit of
/// a packet being forwarded; false if it must not be forwarded (it ran out, or it
/// is not an IP packet).
pub fn decrement_ttl(packet: &mut [u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl || packet[8] <= 1 {
                return false;
            }
            packet[8] -= 1;
            packet[10..12].fill(0);
            let sum = internet_checksum(&packet[..ihl]);
            packet[10..12].copy_from_slice(&sum.to_be_bytes());
            true
        }
        Some(6) if packet.len() >= 40 => {
            if packet[7] <= 1 {
                return false;
            }
            packet[7] -= 1;
            true
        }
        _ => false,
    }
}

/// The Internet checksum (RFC 1071) of `bytes`, an odd last byte padded with zero:
/// write it into a header whose checksum field is zero.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    // u64: no input a u32 sum would overflow on (past ~128 KiB) can be long
    // enough to overflow this.
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn v4_at(p: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[off], p[off + 1], p[off + 2], p[off + 3])
}

fn v6_at(p: &[u8], off: usize) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b.copy_from_slice(&p[off..off + 16]);
    Ipv6Addr::from(b)
}

/// Builds a minimal IPv4 header + payload; for tests of the core.
#[cfg(test)]
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v4_and_v6_addresses() {
        let p = ipv4_packet(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 10, 0, 2),
            b"x",
        );
        assert_eq!(source(&p), Some("10.0.0.1".parse().expect("ip")));
        assert_eq!(destination(&p), Some("10.10.0.2".parse().expect("ip")));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().expect("ip").octets());
        v6[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().expect("ip").octets());
        assert_eq!(source(&v6), Some("fd00::1".parse().expect("ip")));
        assert_eq!(destination(&v6), Some("fd00::2".parse().expect("ip")));
    }

    #[test]
    fn short_or_unknown_packets_have_no_addresses() {
        assert_eq!(destination(&[]), None);
        assert_eq!(destination(&[0x45; 19]), None);
        assert_eq!(destination(&[0x65; 39]), None);
        assert_eq!(source(&[0x15; 60]), None);
    }

    #[test]
    fn ttl_decrement_keeps_a_valid_checksum_and_stops_at_one() {
        let mut p = ipv4_packet(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 30, 0, 2),
            b"payload",
        );
        p[8] = 2;
        assert!(decrement_ttl(&mut p));
        assert_eq!(p[8], 1);
        let sum: u32 = p[..20]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!(folded as u16, 0xffff, "header checksums to zero");
        assert!(!decrement_ttl(&mut p), "TTL 1 is not forwarded");
        assert!(!decrement_ttl(&mut [0x45, 0, 0]), "truncated");
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[7] = 64;
        assert!(decrement_ttl(&mut v6));
        assert_eq!(v6[7], 63);
    }
}
