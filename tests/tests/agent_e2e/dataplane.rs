//! The data plane carries traffic: overlay and VPC pings, a 50 MB transfer, and what the
//! underlay sees of it (only WireGuard UDP, never the plaintext).

use crate::FIRST_PING;
use anyhow::{bail, ensure, Result};
use skymesh_tests::pcap::{Capture, Packet};
use skymesh_tests::topo::{
    AgentPair, A_OVERLAY, A_UNDERLAY, A_VPC, B_OVERLAY, B_UNDERLAY, B_VPC, UNDERLAY_IF,
};
use skymesh_tests::traffic::{ping_once, ping_until, tcp_transfer, Payload};
use skymesh_tests::{e2e, require_root, require_tool};

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
        ensure!(
            x.received == size as u64,
            "received {} of {size} bytes",
            x.received
        );
        p.a.status()?;
        Ok(())
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
                    ensure!(
                        ok,
                        "frame {i}: UDP {} → {} is not agent-to-agent",
                        d.src,
                        d.dst
                    );
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
