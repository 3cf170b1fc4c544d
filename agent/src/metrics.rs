//! Prometheus exposition of the agent: renders a snapshot of the core's counters
//! at scrape time (no per-packet atomics) and serves it at GET /metrics.

use crate::admin::Status;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;

fn peer_label(name: &str) -> Labels {
    vec![("peer".to_string(), name.to_string())]
}

/// Renders `status` as Prometheus text. Every name starts with `skymesh_`.
pub fn render(status: &Status) -> String {
    let mut registry = Registry::with_prefix("skymesh");

    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )])
        .set(1);
    registry.register("build_info", "skymesh-agent build information", build);

    let rx_bytes = Family::<Labels, Counter>::default();
    let tx_bytes = Family::<Labels, Counter>::default();
    let rx_packets = Family::<Labels, Counter>::default();
    let tx_packets = Family::<Labels, Counter>::default();
    let handshake = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for p in &status.peers {
        let l = peer_label(&p.name);
        rx_bytes.get_or_create(&l).inc_by(p.rx_bytes);
        tx_bytes.get_or_create(&l).inc_by(p.tx_bytes);
        rx_packets.get_or_create(&l).inc_by(p.rx_packets);
        tx_packets.get_or_create(&l).inc_by(p.tx_packets);
        handshake
            .get_or_create(&l)
            .set(p.latest_handshake_unix.map(|t| t as f64).unwrap_or(0.0));
    }
    registry.register(
        "peer_rx_bytes",
        "WireGuard bytes received from the peer",
        rx_bytes,
    );
    registry.register(
        "peer_tx_bytes",
        "WireGuard bytes sent to the peer",
        tx_bytes,
    );
    registry.register(
        "peer_rx_packets",
        "WireGuard data packets received from the peer",
        rx_packets,
    );
    registry.register(
        "peer_tx_packets",
        "WireGuard data packets sent to the peer",
        tx_packets,
    );
    registry.register(
        "peer_last_handshake_timestamp_seconds",
        "Unix time of the last completed handshake with the peer (0: never)",
        handshake,
    );

    let drops = Family::<Labels, Counter>::default();
    for (reason, n) in &status.drops {
        drops
            .get_or_create(&vec![("reason".to_string(), reason.clone())])
            .inc_by(*n);
    }
    registry.register("dropped_packets", "Packets dropped, by reason", drops);

    let cookies = Counter::<u64>::default();
    cookies.inc_by(status.handshake_cookie_replies);
    registry.register(
        "handshake_cookie_replies",
        "Cookie replies sent because handshakes arrived faster than the rate limit",
        cookies,
    );

    if let Some(c) = &status.controller {
        let connected = Gauge::<i64>::default();
        connected.set(i64::from(c.connected.is_some()));
        registry.register(
            "controller_connected",
            "1 while a control session to the controller is open (controller mode)",
            connected,
        );
        let rejected = Family::<Labels, Gauge>::default();
        for r in &c.rejected_prefixes {
            rejected
                .get_or_create(&vec![("prefix".to_string(), r.cidr.clone())])
                .set(1);
        }
        registry.register(
            "advertised_prefix_rejected",
            "Advertised prefixes the controller refused (1 each; see `status` for why)",
            rejected,
        );
    }

    let mut out = String::new();
    if encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{InterfaceStatus, PeerStatusJson};
    use std::collections::BTreeMap;

    #[test]
    fn names_and_values() {
        let status = Status {
            interface: InterfaceStatus {
                name: "skymesh0".into(),
                public_key: "PUB".into(),
                listen_port: 51820,
                address: None,
                mtu: 1420,
            },
            peers: vec![PeerStatusJson {
                name: "gcp-gw".into(),
                public_key: "KEY".into(),
                endpoint: None,
                allowed_ips: vec![],
                latest_handshake_unix: Some(1_700_000_000),
                rx_bytes: 10,
                tx_bytes: 20,
                rx_packets: 1,
                tx_packets: 2,
                persistent_keepalive: None,
            }],
            drops: BTreeMap::from([("replay".to_string(), 3)]),
            handshake_cookie_replies: 4,
            controller: Some(crate::admin::ControllerStatus {
                node: "aws-gw".into(),
                connected: Some("203.0.113.2:7443".into()),
                rejected_prefixes: vec![crate::admin::RejectedPrefixStatus {
                    cidr: "10.0.5.0/24".into(),
                    reason: "overlaps".into(),
                }],
                ..Default::default()
            }),
        };
        let text = render(&status);
        for line in [
            "skymesh_peer_rx_bytes_total{peer=\"gcp-gw\"} 10",
            "skymesh_peer_tx_bytes_total{peer=\"gcp-gw\"} 20",
            "skymesh_peer_tx_packets_total{peer=\"gcp-gw\"} 2",
            "skymesh_peer_last_handshake_timestamp_seconds{peer=\"gcp-gw\"} 1700000000",
            "skymesh_dropped_packets_total{reason=\"replay\"} 3",
            "skymesh_handshake_cookie_replies_total 4",
            "skymesh_build_info{version=\"",
            "skymesh_controller_connected 1",
            "skymesh_advertised_prefix_rejected{prefix=\"10.0.5.0/24\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        for l in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(l.starts_with("skymesh_"), "{l}");
        }
    }
}
