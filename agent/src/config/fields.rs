//! The rules for each kind of value a config holds, in one place: interface names,
//! the overlay address, endpoints, listen addresses and keys. Every key of the file
//! that holds such a value goes through the one function for its kind, so a rule
//! added here holds for all of them.
//!
//! Each function answers with the value or the problem, worded as the fix; the
//! caller adds the file, the key and the value. Pure functions: no IO.

use crate::keys::PrivateKey;
use boringtun::x25519::PublicKey as XPublic;
use ipnet::IpNet;
use skymesh_wire::PublicKey;
use std::net::{IpAddr, SocketAddr};

/// The shortest prefix an interface address may have: a shorter one routes a
/// large part of the internet into the overlay.
const MIN_ADDRESS_PREFIX: u8 = 8;

/// A Linux interface name: what `dev_valid_name` accepts (1 to 15 bytes, not `.` or
/// `..`, no `/`, `:` or whitespace), narrowed to the characters tools quote safely.
pub(super) fn interface_name(name: &str) -> Result<(), String> {
    let charset = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 15 || !charset {
        return Err("expected 1 to 15 characters of letters, digits, '-', '_' or '.' (a Linux interface name), like \"skymesh0\"".into());
    }
    if name == "." || name == ".." {
        return Err(
            "Linux refuses \".\" and \"..\" as interface names; use a name like \"skymesh0\""
                .into(),
        );
    }
    Ok(())
}

/// This node's overlay address: a unicast host address inside a prefix that
/// covers the overlay, not the whole internet.
pub(super) fn host_address(net: IpNet) -> Result<(), String> {
    let ip = net.addr();
    if let Some(problem) = not_unicast(ip) {
        return Err(format!(
            "{problem} cannot be this node's address; use the node's own overlay address, like \"100.96.0.1/32\""
        ));
    }
    if ip.is_loopback() {
        return Err("a loopback address cannot be the overlay address; use the node's own overlay address, like \"100.96.0.1/32\"".into());
    }
    if net.prefix_len() < MIN_ADDRESS_PREFIX {
        return Err(format!(
            "the prefix /{} covers too much of the address space (the interface would claim it all); use /{MIN_ADDRESS_PREFIX} or longer, usually the host's own /32 (IPv4) or /128 (IPv6)",
            net.prefix_len()
        ));
    }
    // In a prefix with room for a network and a broadcast address, those are not hosts.
    let hosts_only = matches!(net, IpNet::V4(_) if net.prefix_len() <= 30)
        || matches!(net, IpNet::V6(_) if net.prefix_len() <= 126);
    if hosts_only && ip == net.network() {
        return Err(format!(
            "this is the network address of {}, not a host in it; use a host address like \"{}/{}\"",
            net.trunc(),
            first_host(net),
            net.prefix_len()
        ));
    }
    if hosts_only && matches!(net, IpNet::V4(_)) && ip == net.broadcast() {
        return Err(format!(
            "this is the broadcast address of {}, not a host in it; use a host address like \"{}/{}\"",
            net.trunc(),
            first_host(net),
            net.prefix_len()
        ));
    }
    Ok(())
}

fn first_host(net: IpNet) -> IpAddr {
    net.hosts().next().unwrap_or(net.addr())
}

/// The longest peer name: a DNS label's length, ample for a name and short enough
/// for a metric label and a status line.
pub(super) const MAX_PEER_NAME: usize = 63;

/// A peer's name: 1 to [`MAX_PEER_NAME`] letters, digits, '-', '_' or '.'.
pub(super) fn peer_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_PEER_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "expected a name of 1 to {MAX_PEER_NAME} letters, digits, '-', '_' or '.' (it is a metric label and a status line), like \"gcp-gw\""
        ));
    }
    Ok(())
}

/// Address ranges no VPC or overlay prefix may touch, each with what it is.
const NOT_ROUTABLE: &[(&str, &str)] = &[
    (
        "0.0.0.0/8",
        "\"this network\" (0.0.0.0/8, never a destination)",
    ),
    (
        "127.0.0.0/8",
        "loopback (127.0.0.0/8, never leaves the host)",
    ),
    (
        "169.254.0.0/16",
        "link-local (169.254.0.0/16, never routed)",
    ),
    ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
    ("240.0.0.0/4", "reserved and broadcast (240.0.0.0/4)"),
    (
        "::/127",
        "the unspecified and loopback addresses (::/128, ::1/128)",
    ),
    (
        "::ffff:0:0/96",
        "IPv4-mapped addresses (write the IPv4 prefix instead)",
    ),
    ("fe80::/10", "link-local (fe80::/10, never routed)"),
    ("ff00::/8", "multicast (ff00::/8)"),
];

/// A prefix routed to a peer (`allowed_ips`, `[node] advertise`): one a VPC or the
/// overlay can hold. Not a default route (/0), which would pull every packet,
/// the tunnel's own included, into the tunnel (skymesh routes VPC prefixes, it is
/// not an exit node), and nothing that overlaps loopback, multicast, link-local,
/// broadcast or unspecified addresses, which are never a remote destination.
pub(super) fn routed_prefix(net: IpNet) -> Result<(), String> {
    if net.prefix_len() == 0 {
        return Err("a default route would send every packet, the tunnel's own included, into the tunnel; skymesh routes VPC and overlay prefixes: list those, like \"10.10.0.0/16\"".into());
    }
    for (range, what) in NOT_ROUTABLE {
        let Ok(range) = range.parse::<IpNet>() else {
            continue;
        };
        if range.contains(&net) || net.contains(&range) {
            return Err(format!(
                "overlaps {what}, which is never a remote network; list the VPC or overlay prefixes behind the peer, like \"10.10.0.0/16\""
            ));
        }
    }
    Ok(())
}

/// Where packets are sent: a peer's endpoint, or an endpoint this node advertises.
/// An IPv4-mapped IPv6 address is judged as the IPv4 address it reaches.
pub(super) fn endpoint(addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() == 0 {
        return Err("port 0 cannot be sent to; use the UDP port the peer listens on (default 51820), like \"198.51.100.7:51820\"".into());
    }
    if let Some(problem) = not_unicast(addr.ip()) {
        return Err(format!(
            "{problem} cannot be a WireGuard endpoint; use the peer's reachable unicast address, like \"198.51.100.7:51820\""
        ));
    }
    Ok(addr)
}

/// Where a local listener binds: unspecified (all addresses) is fine, a port chosen
/// by the kernel or a group address is not.
pub(super) fn listen_addr(addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() == 0 {
        return Err("port 0 would listen on a random port nobody can find; use a fixed port, like \"127.0.0.1:9586\"".into());
    }
    if !addr.ip().to_canonical().is_unspecified() {
        if let Some(problem) = not_unicast(addr.ip()) {
            return Err(format!(
                "{problem} cannot be listened on; use a local unicast address, like \"127.0.0.1:9586\""
            ));
        }
    }
    Ok(addr)
}

/// Why `ip` is not one host's address, if it is not.
fn not_unicast(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// This node's private key: not the all-zero placeholder.
pub(super) fn private_key(key: &PrivateKey) -> Result<(), String> {
    if key.secret().to_bytes() == [0; 32] {
        return Err("the file holds the all-zero key, a placeholder and no secret; create a real key with `umask 077; skymesh-agent genkey > FILE`".into());
    }
    Ok(())
}

/// A peer's public key as the handshake will use it: not this node's own key, and
/// not a key with which every shared secret is zero (the all-zero key and the other
/// low-order points), which WireGuard cannot form a session with.
pub(super) fn peer_key(key: &PublicKey, own: &PrivateKey) -> Result<(), String> {
    if *key == own.public_key() {
        return Err("this is this node's own public key; use the peer's key (`skymesh-agent pubkey < private.key` on the peer)".into());
    }
    let shared = own.secret().diffie_hellman(&XPublic::from(*key.as_bytes()));
    if shared.as_bytes() == &[0; 32] {
        let what = if key.as_bytes() == &[0; 32] {
            "the all-zero key"
        } else {
            "a low-order point"
        };
        return Err(format!(
            "{what} is no peer's key (every shared secret with it is zero); use the peer's key (`skymesh-agent pubkey < private.key` on the peer)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The X25519 points of small order, as 32 little-endian bytes.
    const LOW_ORDER: [&str; 7] = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];

    fn bytes(hex: &str) -> [u8; 32] {
        let mut out = [0; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
        }
        out
    }

    #[test]
    fn peer_keys_that_cannot_form_a_session_are_refused() {
        let own = PrivateKey::generate();
        for hex in LOW_ORDER {
            let e = peer_key(&PublicKey::from_bytes(bytes(hex)), &own).expect_err(hex);
            assert!(e.contains("shared secret"), "{hex}: {e}");
        }
        let e = peer_key(&own.public_key(), &own).expect_err("own key");
        assert!(e.contains("own public key"), "{e}");
        peer_key(&PrivateKey::generate().public_key(), &own).expect("a real peer key");
        private_key(&PrivateKey::from_bytes([0; 32])).expect_err("all-zero private key");
        private_key(&own).expect("a real private key");
    }

    /// Issue 14.12 re-review: prefixes that can never be a VPC or overlay
    /// destination are refused; real ones pass.
    #[test]
    fn routed_prefixes_by_kind() {
        for bad in [
            "127.0.0.0/8",
            "127.0.0.1/32",
            "224.0.0.0/4",
            "239.1.0.0/16",
            "0.0.0.0/32",
            "0.0.0.0/0",
            "0.0.0.0/1",
            "255.255.255.255/32",
            "169.254.0.0/16",
            "::/0",
            "::1/128",
            "::/128",
            "fe80::/64",
            "ff02::/16",
            "::ffff:10.0.0.0/104",
        ] {
            let net: IpNet = bad.parse().expect(bad);
            assert!(routed_prefix(net).is_err(), "{bad}");
        }
        for good in [
            "10.0.0.0/8",
            "100.96.0.2/32",
            "192.0.2.0/24",
            "172.16.0.0/12",
            "8.8.8.0/24",
            "fd00:10::/48",
            "2001:db8::/32",
        ] {
            let net: IpNet = good.parse().expect(good);
            assert_eq!(routed_prefix(net), Ok(()), "{good}");
        }
        assert!(peer_name(&"a".repeat(MAX_PEER_NAME)).is_ok());
        assert!(peer_name(&"a".repeat(MAX_PEER_NAME + 1)).is_err());
        assert!(peer_name("").is_err());
    }

    #[test]
    fn addresses_by_kind() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        for ok in [
            "100.96.0.1/32",
            "100.96.0.1/10",
            "10.0.0.1/8",
            "100.96.0.0/31",
            "fd00::1/128",
            "fd00::1/64",
        ] {
            host_address(net(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, needle) in [
            ("0.0.0.0/0", "unspecified"),
            ("0.0.0.0/32", "unspecified"),
            ("1.2.3.4/0", "covers too much"),
            ("100.96.0.1/7", "covers too much"),
            ("::/0", "unspecified"),
            ("fd00::1/0", "covers too much"),
            ("224.0.0.1/32", "multicast"),
            ("ff02::1/128", "multicast"),
            ("255.255.255.255/32", "broadcast"),
            ("100.96.0.255/24", "broadcast address of 100.96.0.0/24"),
            ("100.96.0.0/24", "network address of 100.96.0.0/24"),
            ("127.0.0.1/32", "loopback"),
            ("::ffff:0.0.0.0/128", "unspecified"),
        ] {
            let e = host_address(net(bad)).expect_err(bad);
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let sa = |s: &str| s.parse::<SocketAddr>().expect("addr");
        for (bad, needle) in [
            ("198.51.100.7:0", "port 0"),
            ("0.0.0.0:51820", "unspecified"),
            ("[::]:51820", "unspecified"),
            ("[::ffff:0.0.0.0]:51820", "unspecified"),
            ("255.255.255.255:51820", "broadcast"),
            ("[::ffff:255.255.255.255]:51820", "broadcast"),
            ("239.1.2.3:51820", "multicast"),
            ("[ff02::1]:51820", "multicast"),
        ] {
            let e = endpoint(sa(bad)).expect_err(bad);
            assert!(e.contains(needle), "{bad}: {e}");
        }
        endpoint(sa("[::ffff:198.51.100.7]:51820")).expect("a mapped unicast address");
        listen_addr(sa("0.0.0.0:9586")).expect("all addresses");
        listen_addr(sa("[::]:9586")).expect("all addresses");
        for bad in ["127.0.0.1:0", "224.0.0.1:9586", "255.255.255.255:9586"] {
            listen_addr(sa(bad)).expect_err(bad);
        }
    }

    #[test]
    fn interface_names_linux_refuses() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a:1",
            "tab\tname",
            "sixteen-chars-xx",
        ] {
            interface_name(bad).expect_err(bad);
        }
        for ok in ["skymesh0", "wg-a.1", "a", "fifteen-chars-x"] {
            interface_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }
}
