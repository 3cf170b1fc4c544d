//! End-to-end tests of `skymesh-agent` in network namespaces, run as a user runs it:
//! real binary, real TUN, real UDP on a veth underlay, checked with ping, TCP transfers,
//! `status`, `/metrics` and packet captures.

use anyhow::{bail, ensure, Context, Result};
use skymesh_tests::pcap::{Capture, Packet};
use skymesh_tests::topo::{
    AgentPair, A_OVERLAY, A_UNDERLAY, A_VPC, B_OVERLAY, B_UNDERLAY, B_VPC, UNDERLAY_IF,
};
use skymesh_tests::traffic::{ping_once, ping_until, tcp_transfer, Payload};
use skymesh_tests::{e2e, require_root, require_tool, wait_until, PeerSpec};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Time allowed for a fresh tunnel to carry its first ping (handshake included).
const FIRST_PING: Duration = Duration::from_secs(10);

/// Seconds since the Unix epoch, for comparing with handshake timestamps.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[test]
fn overlay_ping_vpc_routes_and_50mb_transfer() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("bulk", |env| {
        let p = AgentPair::start(env)?;
        let t = ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;
        eprintln!("first ping A→B after {t:?}");
        ping_until(&p.b_ns, A_OVERLAY, FIRST_PING)?;
        // The VPC prefixes in allowed_ips are routed over the tunnel too.
        ping_until(&p.a_ns, B_VPC, FIRST_PING)?;
        ping_until(&p.b_ns, A_VPC, FIRST_PING)?;

        let size = 50 * 1000 * 1000;
        let x = tcp_transfer(&p.a_ns, &p.b_ns, B_OVERLAY, 5001, Payload::Pattern(size))?;
        eprintln!(
            "50 MB A→B over the overlay: {:?}, {:.1} MB/s",
            x.elapsed,
            x.mbytes_per_sec()
        );
        x.verify()?;
        ensure!(x.received == size as u64, "received {} of {size} bytes", x.received);
        p.a.status()?;
        Ok(())
    })
}

#[test]
fn restart_after_sigterm_and_after_kill9_recovers() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("restart", |env| {
        let mut p = AgentPair::start(env)?;
        ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;

        let status = p.a.stop()?;
        ensure!(status.success(), "agent A exited with {status} on SIGTERM");
        ensure!(
            !p.a_ns.has_link("skymesh0"),
            "skymesh0 still exists in A after SIGTERM (the agent must remove it)"
        );
        ensure!(!ping_once(&p.a_ns, B_OVERLAY), "ping worked with agent A stopped");
        p.a.start()?;
        let t = ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(20))
            .context("traffic A→B did not recover after SIGTERM + start")?;
        eprintln!("after SIGTERM + start: A→B recovered in {t:?}");
        ping_until(&p.b_ns, A_OVERLAY, Duration::from_secs(20))
            .context("traffic B→A did not recover after SIGTERM + start")?;

        p.a.kill9()?;
        if p.a_ns.has_link("skymesh0") {
            eprintln!("skymesh0 survived kill -9 (persistent TUN): the next start must replace it");
        } else {
            // The kernel removed the non-persistent TUN with its last fd. Leave behind what a
            // crashed older agent could: a persistent TUN of the same name, already addressed.
            eprintln!("skymesh0 vanished with kill -9; planting a stale persistent TUN instead");
            p.a_ns.ip(&["tuntap", "add", "dev", "skymesh0", "mode", "tun"])?;
            p.a_ns.ip(&["addr", "add", &format!("{A_OVERLAY}/32"), "dev", "skymesh0"])?;
            p.a_ns.ip(&["link", "set", "skymesh0", "up"])?;
        }
        p.a.start().context("agent did not start over a stale skymesh0")?;
        let t = ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(20))
            .context("traffic A→B did not recover after kill -9 + start")?;
        eprintln!("after kill -9 + start: A→B recovered in {t:?}");
        ping_until(&p.b_ns, A_OVERLAY, Duration::from_secs(20))
            .context("traffic B→A did not recover after kill -9 + start")?;
        let x = tcp_transfer(&p.b_ns, &p.a_ns, A_OVERLAY, 5002, Payload::Pattern(1 << 20))?;
        x.verify()?;
        Ok(())
    })
}

/// Cuts the underlay for 10 s with `cut`, restores it with `restore`, and checks that the
/// overlay works again within 30 s.
fn underlay_cut_recovers(
    p: &AgentPair,
    cut: impl FnOnce() -> Result<()>,
    restore: impl FnOnce() -> Result<()>,
) -> Result<()> {
    ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;
    let started = Instant::now();
    cut()?;
    ensure!(!ping_once(&p.a_ns, B_OVERLAY), "ping still works with the underlay cut");
    // Keep offering traffic during the cut, as applications would.
    while started.elapsed() < Duration::from_secs(10) {
        ping_once(&p.a_ns, B_OVERLAY);
    }
    restore()?;
    let t = ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(30))
        .context("A→B did not recover within 30 s of restoring the underlay")?;
    eprintln!("underlay restored; A→B recovered in {t:?}");
    ping_until(&p.b_ns, A_OVERLAY, Duration::from_secs(30))
        .context("B→A did not recover within 30 s of restoring the underlay")?;
    Ok(())
}

#[test]
fn underlay_blackhole_for_10s_then_recovers() -> Result<()> {
    if !require_root() || !require_tool("nft") {
        return Ok(());
    }
    e2e("blackhole", |env| {
        let p = AgentPair::start(env)?;
        underlay_cut_recovers(
            &p,
            || {
                p.a_ns.blackhole(UNDERLAY_IF)?;
                p.b_ns.blackhole(UNDERLAY_IF)
            },
            || {
                p.a_ns.unblackhole(UNDERLAY_IF)?;
                p.b_ns.unblackhole(UNDERLAY_IF)
            },
        )
    })
}

#[test]
fn underlay_link_down_for_10s_then_recovers() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("linkdown", |env| {
        let mut p = AgentPair::start(env)?;
        underlay_cut_recovers(&p, || p.link.set_down(), || p.link.set_up())?;
        p.a.ensure_running()?;
        p.b.ensure_running()
    })
}

#[test]
fn underlay_capture_shows_only_encrypted_udp() -> Result<()> {
    if !require_root() || !require_tool("tcpdump") {
        return Ok(());
    }
    e2e("capture", |env| {
        let p = AgentPair::start(env)?;
        ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;
        let underlay = Capture::start(env, &p.a_ns, UNDERLAY_IF, "underlay")?;
        // Positive control: inside B's TUN the marker is visible, so the search can find it.
        let inner = Capture::start(env, &p.b_ns, "skymesh0", "inner")?;

        let unit = b"SKYMESH-MARKER-7f3a9c-";
        let marker: Vec<u8> = unit.iter().copied().cycle().take(64 * 1024).collect();
        let x = tcp_transfer(&p.a_ns, &p.b_ns, B_OVERLAY, 5003, Payload::Bytes(marker))?;
        x.verify()?;
        ping_once(&p.a_ns, B_OVERLAY);

        let underlay = underlay.finish()?;
        let inner = inner.finish()?;
        ensure!(
            inner.contains(unit),
            "control failed: the marker is not visible even on B's TUN ({} frames)",
            inner.frames.len()
        );
        ensure!(
            !underlay.contains(b"SKYMESH-MARKER"),
            "the marker appears in clear on the underlay"
        );
        let ports: [u16; 2] = [p.a.spec.listen_port, p.b.spec.listen_port];
        let ips = [A_UNDERLAY, B_UNDERLAY];
        let mut udp_bytes = 0usize;
        for (i, packet) in underlay.packets().into_iter().enumerate() {
            match packet {
                Packet::Arp => {}
                Packet::Udp(d) => {
                    let ok = ports.contains(&d.src.port())
                        && ports.contains(&d.dst.port())
                        && ips.contains(&d.src.ip().to_string().as_str())
                        && ips.contains(&d.dst.ip().to_string().as_str());
                    ensure!(ok, "frame {i}: UDP {} → {} is not agent-to-agent", d.src, d.dst);
                    let kind = d.payload.first().copied().unwrap_or(0);
                    ensure!(
                        (1..=4).contains(&kind) && d.payload.get(1..4) == Some(&[0, 0, 0][..]),
                        "frame {i}: UDP payload is not a WireGuard message (starts {:02x?})",
                        &d.payload[..d.payload.len().min(4)]
                    );
                    udp_bytes += d.payload.len();
                }
                other => bail!("frame {i}: unexpected non-UDP traffic on the underlay: {other:?}"),
            }
        }
        ensure!(
            udp_bytes >= 64 * 1024,
            "only {udp_bytes} bytes of UDP captured; the transfer did not cross the underlay"
        );
        Ok(())
    })
}

/// Random bytes of length `len`, first bytes replaced by `prefix`.
fn random_datagram(rng: &mut impl rand::RngCore, prefix: &[u8], len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    rng.fill_bytes(&mut d);
    let n = prefix.len().min(len);
    d[..n].copy_from_slice(&prefix[..n]);
    d
}

#[test]
fn garbage_and_replayed_datagrams_are_dropped_and_counted() -> Result<()> {
    if !require_root() || !require_tool("tcpdump") {
        return Ok(());
    }
    e2e("garbage", |env| {
        use rand::SeedableRng as _;
        let mut p = AgentPair::start(env)?;
        ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;

        // Record genuine A→B data messages off the wire.
        let cap = Capture::start(env, &p.a_ns, UNDERLAY_IF, "replay-source")?;
        for _ in 0..5 {
            ping_once(&p.a_ns, B_OVERLAY);
        }
        let cap = cap.finish()?;
        let a_ep: SocketAddr = p.a.endpoint_on(A_UNDERLAY).parse()?;
        let b_ep: SocketAddr = p.b.endpoint_on(B_UNDERLAY).parse()?;
        let recorded: Vec<Vec<u8>> = cap
            .udp()
            .into_iter()
            .filter(|d| SocketAddr::V4(d.src) == a_ep && SocketAddr::V4(d.dst) == b_ep)
            .filter(|d| d.payload.len() >= 32 && d.payload[..4] == [4, 0, 0, 0])
            .map(|d| d.payload)
            .collect();
        ensure!(recorded.len() >= 3, "captured only {} A→B data messages", recorded.len());

        let before = p.b.metrics()?;
        let seed = unix_now();
        eprintln!("garbage seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut garbage: Vec<Vec<u8>> = Vec::new();
        for len in [0, 1, 2, 3, 4, 5, 16, 31, 32, 33, 64, 92, 147, 148, 149, 200, 512, 1000, 1500] {
            // First byte outside 1..=4: never a WireGuard message.
            garbage.push(random_datagram(&mut rng, &[0xee], len));
        }
        for (kind, lens) in [
            (1u8, &[4usize, 100, 148, 149][..]),
            (2, &[92, 91, 200]),
            (3, &[64, 63, 65]),
            (4, &[4, 16, 31, 32, 48, 148, 1500]),
        ] {
            for &len in lens {
                garbage.push(random_datagram(&mut rng, &[kind, 0, 0, 0], len));
            }
        }
        let sender = p.a_ns.run(|| UdpSocket::bind((A_UNDERLAY, 0)))??;
        for d in &garbage {
            sender.send_to(d, b_ep).context("sending garbage")?;
        }
        for d in recorded.iter().chain(recorded.iter()) {
            sender.send_to(d, b_ep).context("sending replay")?;
        }

        let reasons = ["malformed", "replay", "unknown_peer"];
        let mut after = p.b.metrics()?;
        wait_until(Duration::from_secs(5), || {
            if let Ok(m) = p.b.metrics() {
                after = m;
            }
            reasons.iter().all(|r| after.drops(r) > before.drops(r))
        });
        for reason in reasons {
            ensure!(
                after.drops(reason) > before.drops(reason),
                "skymesh_dropped_packets_total{{reason=\"{reason}\"}} did not increase \
                 ({} → {}); all drops now: {:?}",
                before.drops(reason),
                after.drops(reason),
                after.drops_by_reason()
            );
        }
        eprintln!("drops after garbage + replay: {:?}", after.drops_by_reason());

        p.b.ensure_running()?;
        ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(5))
            .context("tunnel broken after garbage/replays")?;
        ping_until(&p.b_ns, A_OVERLAY, Duration::from_secs(5))
            .context("tunnel broken after garbage/replays")?;
        // Unauthenticated datagrams from another port must not move the peer's endpoint.
        let st = p.b.status()?;
        let ep = st.peer("a")?.endpoint.clone();
        ensure!(
            ep.as_deref() == Some(a_ep.to_string().as_str()),
            "B's endpoint for A moved to {ep:?} after garbage/replays from another port"
        );
        ensure!(
            st.drops.values().sum::<u64>() > 0,
            "status --json drops are all zero: {:?}",
            st.drops
        );
        Ok(())
    })
}

#[test]
fn handshake_flood_gets_cookie_replies_and_tunnel_survives() -> Result<()> {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};
    if !require_root() {
        return Ok(());
    }
    e2e("cookie", |env| {
        let flooder = skymesh_tests::Keypair::generate()?;
        let mut p = AgentPair::start_with(env, |a, _| {
            a.peers
                .push(PeerSpec::new("flood", &flooder.public, &["100.96.0.99/32"]));
        })?;
        ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;

        let mut tunn = Tunn::new(
            StaticSecret::from(flooder.private_bytes()?),
            PublicKey::from(p.a.keys.public_bytes()?),
            None,
            None,
            0x00c0_ffee,
            None,
        );
        // Build the initiations first (x25519 is slow in a debug build), then fire them
        // back to back so the agent sees hundreds within well under a second.
        let mut flood = Vec::new();
        let mut buf = vec![0u8; 2048];
        for _ in 0..400 {
            match tunn.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(pkt) => flood.push(pkt.to_vec()),
                _ => bail!("boringtun did not produce a handshake initiation"),
            }
        }
        let target: SocketAddr = p.a.endpoint_on(A_UNDERLAY).parse()?;
        let sock = p.b_ns.run(|| UdpSocket::bind((B_UNDERLAY, 0)))??;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let (mut responses, mut cookies, mut other) = (0usize, 0usize, 0usize);
        let mut rbuf = [0u8; 2048];
        for round in 0..3 {
            let started = Instant::now();
            for pkt in &flood {
                sock.send_to(pkt, target).context("sending initiation")?;
            }
            eprintln!("round {round}: sent {} initiations in {:?}", flood.len(), started.elapsed());
            let mut quiet_since = Instant::now();
            while quiet_since.elapsed() < Duration::from_millis(1500) {
                match sock.recv_from(&mut rbuf) {
                    Ok((n, _)) => {
                        quiet_since = Instant::now();
                        match (rbuf[0], n) {
                            (2, 92) => responses += 1,
                            (3, 64) => cookies += 1,
                            _ => other += 1,
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e).context("receiving replies"),
                }
            }
            if cookies > 0 {
                break;
            }
        }
        eprintln!("replies: {responses} handshake responses, {cookies} cookie replies, {other} other");
        ensure!(cookies > 0, "no cookie reply (type 3, 64 bytes) under handshake load");

        let m = p.a.metrics()?;
        let counted = m.counter("skymesh_handshake_cookie_replies_total", &[]);
        ensure!(
            counted > 0.0,
            "skymesh_handshake_cookie_replies_total is {counted} after {cookies} cookie replies"
        );
        p.a.ensure_running()?;
        ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(10))
            .context("tunnel A→B broken after the handshake flood")?;
        ping_until(&p.b_ns, A_OVERLAY, Duration::from_secs(10))
            .context("tunnel B→A broken after the handshake flood")?;
        Ok(())
    })
}

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
        ensure!(meta.file_type().is_socket(), "{} is not a socket", p.a.socket.display());
        let mode = meta.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "admin socket mode is {mode:o}, want 600");

        let st = p.a.status()?;
        ensure!(st.interface.name == "skymesh0", "interface {:?}", st.interface);
        ensure!(st.interface.public_key == p.a.keys.public, "interface {:?}", st.interface);
        ensure!(st.interface.listen_port == 51820, "interface {:?}", st.interface);
        ensure!(st.interface.address == format!("{A_OVERLAY}/32"), "interface {:?}", st.interface);
        let peer = st.peer("b")?;
        ensure!(peer.public_key == p.b.keys.public, "peer {peer:?}");
        ensure!(
            peer.endpoint.as_deref() == Some(p.b.endpoint_on(B_UNDERLAY).as_str()),
            "peer {peer:?}"
        );
        for ip in [format!("{B_OVERLAY}/32"), "10.20.0.0/16".to_string()] {
            ensure!(peer.allowed_ips.contains(&ip), "{ip} missing from {peer:?}");
        }
        let hs = peer.latest_handshake_unix.context("no latest handshake after traffic")?;
        ensure!(
            hs + 2 >= t0 && hs <= t1 + 2,
            "latest_handshake_unix {hs} not within [{t0}, {t1}]"
        );
        ensure!(peer.tx_bytes >= size as u64, "tx_bytes {} < {size}", peer.tx_bytes);
        ensure!(peer.rx_bytes > 0 && peer.rx_packets > 0 && peer.tx_packets > 0, "{peer:?}");
        let b_peer = p.b.status()?.peer("a")?.clone();
        ensure!(b_peer.rx_bytes >= size as u64, "B rx_bytes {} < {size}", b_peer.rx_bytes);

        let table = p.a.status_table()?;
        eprintln!("status table:\n{table}");
        for needle in ["b", p.b.keys.public.as_str(), &p.b.endpoint_on(B_UNDERLAY)] {
            ensure!(table.contains(needle), "status table lacks {needle:?}:\n{table}");
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
            ensure!(v >= at_least && v > 0.0, "{name} = {v}, status said {at_least}");
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
