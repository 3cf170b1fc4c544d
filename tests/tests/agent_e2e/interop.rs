//! Interoperability with stock WireGuard (`wireguard-go` configured by `wg`), with either
//! side initiating; the side without an endpoint must learn it from the first handshake.

use crate::{unix_now, FIRST_PING};
use anyhow::{ensure, Context, Result};
use skymesh_tests::netns::{Netns, Veth};
use skymesh_tests::topo::{A_OVERLAY, A_UNDERLAY, B_OVERLAY, B_UNDERLAY, UNDERLAY_IF};
use skymesh_tests::traffic::{ping_until, tcp_transfer, Payload};
use skymesh_tests::wggo::{wg_keypair, WgGo};
use skymesh_tests::{
    e2e, require_root, require_tool, Agent, AgentSpec, Keypair, PeerSpec, TestEnv,
};

/// Which side knows the other's endpoint (and so sends the first handshake).
#[derive(Clone, Copy, PartialEq)]
enum Initiator {
    Skymesh,
    WireguardGo,
}

/// Field order is drop order: processes before namespaces.
struct Interop {
    agent: Agent,
    wg: WgGo,
    _link: Veth,
    sky_ns: Netns,
    wg_ns: Netns,
}

/// skymesh in namespace A (192.0.2.1, 100.96.0.1), wireguard-go in B (192.0.2.2, 100.96.0.2).
fn setup(env: &TestEnv, initiator: Initiator) -> Result<Interop> {
    let sky_ns = env.netns("sky")?;
    let wg_ns = env.netns("wgo")?;
    let link = Veth::connect(
        &sky_ns,
        &format!("{A_UNDERLAY}/24"),
        &wg_ns,
        &format!("{B_UNDERLAY}/24"),
        UNDERLAY_IF,
    )?;
    let sky_keys = Keypair::generate()?;
    let wg_keys = wg_keypair()?;

    let mut to_wg = PeerSpec::new("wg", &wg_keys.public, &[&format!("{B_OVERLAY}/32")]);
    let mut to_sky = PeerSpec::new("sky", &sky_keys.public, &[&format!("{A_OVERLAY}/32")]);
    match initiator {
        Initiator::Skymesh => to_wg.endpoint = Some(format!("{B_UNDERLAY}:51820")),
        Initiator::WireguardGo => to_sky.endpoint = Some(format!("{A_UNDERLAY}:51820")),
    }
    let mut agent = Agent::new(
        env,
        &sky_ns,
        "sky",
        sky_keys,
        AgentSpec::new(&format!("{A_OVERLAY}/32")).peer(to_wg),
    )?;
    agent.start()?;
    let wg = WgGo::start(
        env,
        &wg_ns,
        wg_keys,
        &format!("{B_OVERLAY}/32"),
        51820,
        &to_sky,
    )?;
    Ok(Interop {
        agent,
        wg,
        _link: link,
        sky_ns,
        wg_ns,
    })
}

/// Runs the interop scenario: first ping from the initiator, then both directions, TCP
/// both ways, and handshake/endpoint checks on both sides.
fn interop(env: &TestEnv, initiator: Initiator) -> Result<()> {
    let mut x = setup(env, initiator)?;
    let t0 = unix_now();
    let (first, second) = match initiator {
        Initiator::Skymesh => ((&x.sky_ns, B_OVERLAY), (&x.wg_ns, A_OVERLAY)),
        Initiator::WireguardGo => ((&x.wg_ns, A_OVERLAY), (&x.sky_ns, B_OVERLAY)),
    };
    ping_until(first.0, first.1, FIRST_PING).context("first ping from the initiator")?;
    ping_until(second.0, second.1, FIRST_PING).context("ping back from the responder")?;

    let size = 8 * 1000 * 1000;
    let there = tcp_transfer(&x.sky_ns, &x.wg_ns, B_OVERLAY, 5101, Payload::Pattern(size))?;
    there.verify().context("skymesh → wireguard-go transfer")?;
    let back = tcp_transfer(&x.wg_ns, &x.sky_ns, A_OVERLAY, 5102, Payload::Pattern(size))?;
    back.verify().context("wireguard-go → skymesh transfer")?;
    eprintln!(
        "8 MB skymesh→wg-go {:.1} MB/s, wg-go→skymesh {:.1} MB/s",
        there.mbytes_per_sec(),
        back.mbytes_per_sec()
    );

    let sky_pub = x.agent.keys.public.clone();
    let hs = x.wg.latest_handshake(&sky_pub)?;
    ensure!(
        hs + 2 >= t0,
        "`wg show` latest handshake {hs} is older than the test ({t0})"
    );
    let wg_saw = x.wg.endpoint(&sky_pub)?;
    ensure!(
        wg_saw == format!("{A_UNDERLAY}:51820"),
        "wireguard-go sees skymesh at {wg_saw}"
    );
    let st = x.agent.status()?;
    let peer = st.peer("wg")?;
    ensure!(
        peer.endpoint.as_deref() == Some(format!("{B_UNDERLAY}:51820").as_str()),
        "skymesh's endpoint for wireguard-go is {:?}",
        peer.endpoint
    );
    ensure!(
        peer.latest_handshake_unix.is_some(),
        "skymesh status shows no handshake: {peer:?}"
    );
    x.agent.ensure_running()?;
    x.wg.ensure_running()?;
    Ok(())
}

#[test]
fn interop_skymesh_initiates_to_wireguard_go() -> Result<()> {
    if !require_root() || !require_tool("wireguard-go") || !require_tool("wg") {
        return Ok(());
    }
    e2e("wgo-out", |env| interop(env, Initiator::Skymesh))
}

#[test]
fn interop_wireguard_go_initiates_to_skymesh() -> Result<()> {
    if !require_root() || !require_tool("wireguard-go") || !require_tool("wg") {
        return Ok(());
    }
    e2e("wgo-in", |env| interop(env, Initiator::WireguardGo))
}
