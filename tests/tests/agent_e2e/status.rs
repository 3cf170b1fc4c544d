//! What an operator reads: `status`, `status --json`, `/metrics`, the admin socket.

use crate::{unix_now, FIRST_PING};
use anyhow::{ensure, Context, Result};
use skymesh_tests::topo::{AgentPair, A_OVERLAY, B_OVERLAY, B_UNDERLAY};
use skymesh_tests::traffic::{ping_until, tcp_transfer, Payload};
use skymesh_tests::{e2e, require_root};

#[test]
fn status_table_json_metrics_and_admin_socket_mode() -> Result<()> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if !require_root() {
        return Ok(());
    }
    e2e("status", |env| {
        let p = AgentPair::start(env)?;
        let t0 = unix_now();
        ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;
        let size = 1 << 20;
        tcp_transfer(&p.a_ns, &p.b_ns, B_OVERLAY, 5004, Payload::Pattern(size))?.verify()?;
        let t1 = unix_now();

        let meta = std::fs::symlink_metadata(&p.a.socket)
            .with_context(|| format!("admin socket {}", p.a.socket.display()))?;
        ensure!(
            meta.file_type().is_socket(),
            "{} is not a socket",
            p.a.socket.display()
        );
        let mode = meta.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "admin socket mode is {mode:o}, want 600");

        let st = p.a.status()?;
        ensure!(
            st.interface.name == "skymesh0",
            "interface {:?}",
            st.interface
        );
        ensure!(
            st.interface.public_key == p.a.keys.public,
            "interface {:?}",
            st.interface
        );
        ensure!(
            st.interface.listen_port == 51820,
            "interface {:?}",
            st.interface
        );
        ensure!(
            st.interface.address == format!("{A_OVERLAY}/32"),
            "interface {:?}",
            st.interface
        );
        let peer = st.peer("b")?;
        ensure!(peer.public_key == p.b.keys.public, "peer {peer:?}");
        ensure!(
            peer.endpoint.as_deref() == Some(p.b.endpoint_on(B_UNDERLAY).as_str()),
            "peer {peer:?}"
        );
        for ip in [format!("{B_OVERLAY}/32"), "10.20.0.0/16".to_string()] {
            ensure!(peer.allowed_ips.contains(&ip), "{ip} missing from {peer:?}");
        }
        let hs = peer
            .latest_handshake_unix
            .context("no latest handshake after traffic")?;
        ensure!(
            hs + 2 >= t0 && hs <= t1 + 2,
            "latest_handshake_unix {hs} not within [{t0}, {t1}]"
        );
        ensure!(
            peer.tx_bytes >= size as u64,
            "tx_bytes {} < {size}",
            peer.tx_bytes
        );
        ensure!(
            peer.rx_bytes > 0 && peer.rx_packets > 0 && peer.tx_packets > 0,
            "{peer:?}"
        );
        let b_peer = p.b.status()?.peer("a")?.clone();
        ensure!(
            b_peer.rx_bytes >= size as u64,
            "B rx_bytes {} < {size}",
            b_peer.rx_bytes
        );

        let table = p.a.status_table()?;
        eprintln!("status table:\n{table}");
        for needle in ["b", p.b.keys.public.as_str(), &p.b.endpoint_on(B_UNDERLAY)] {
            ensure!(
                table.contains(needle),
                "status table lacks {needle:?}:\n{table}"
            );
        }
        ensure!(
            table.to_lowercase().contains("handshake"),
            "status table shows no handshake column/line:\n{table}"
        );

        let m = p.a.metrics()?;
        let peer_label = [("peer", "b")];
        for (name, at_least) in [
            ("skymesh_peer_tx_bytes_total", peer.tx_bytes as f64),
            ("skymesh_peer_rx_bytes_total", peer.rx_bytes as f64),
            ("skymesh_peer_tx_packets_total", peer.tx_packets as f64),
            ("skymesh_peer_rx_packets_total", peer.rx_packets as f64),
        ] {
            let v = m
                .get(name, &peer_label)
                .with_context(|| format!("{name}{{peer=\"b\"}} missing:\n{}", m.text))?;
            ensure!(
                v >= at_least && v > 0.0,
                "{name} = {v}, status said {at_least}"
            );
        }
        let hs_metric = m
            .get("skymesh_peer_last_handshake_timestamp_seconds", &peer_label)
            .context("skymesh_peer_last_handshake_timestamp_seconds{peer=\"b\"} missing")?;
        ensure!(
            (hs_metric - hs as f64).abs() <= 2.0 || hs_metric >= hs as f64,
            "last handshake metric {hs_metric} vs status {hs}"
        );
        let build = m
            .samples
            .iter()
            .find(|s| s.name == "skymesh_build_info")
            .context("skymesh_build_info missing")?;
        ensure!(
            build.value == 1.0 && build.labels.iter().any(|(k, _)| k == "version"),
            "skymesh_build_info: {build:?}"
        );
        Ok(())
    })
}
