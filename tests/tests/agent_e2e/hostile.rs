//! Hostile input on the listen port: garbage, replays, handshake floods.

use crate::{unix_now, FIRST_PING};
use anyhow::{bail, ensure, Context, Result};
use skymesh_tests::pcap::Capture;
use skymesh_tests::topo::{AgentPair, A_OVERLAY, A_UNDERLAY, B_OVERLAY, B_UNDERLAY, UNDERLAY_IF};
use skymesh_tests::traffic::{ping_once, ping_until};
use skymesh_tests::{e2e, require_root, require_tool, wait_until, Keypair, PeerSpec};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

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
        ensure!(
            recorded.len() >= 3,
            "captured only {} A→B data messages",
            recorded.len()
        );

        let before = p.b.metrics()?;
        let seed = unix_now();
        eprintln!("garbage seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut garbage: Vec<Vec<u8>> = Vec::new();
        for len in [
            0, 1, 2, 3, 4, 5, 16, 31, 32, 33, 64, 92, 147, 148, 149, 200, 512, 1000, 1500,
        ] {
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
        eprintln!(
            "drops after garbage + replay: {:?}",
            after.drops_by_reason()
        );

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
        let flooder = Keypair::generate()?;
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
            eprintln!(
                "round {round}: sent {} initiations in {:?}",
                flood.len(),
                started.elapsed()
            );
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
        eprintln!(
            "replies: {responses} handshake responses, {cookies} cookie replies, {other} other"
        );
        ensure!(
            cookies > 0,
            "no cookie reply (type 3, 64 bytes) under handshake load"
        );

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
