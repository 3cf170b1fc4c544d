//! The four-cloud lab with a harder underlay: a site behind a masquerading NAT, and a
//! WAN pair whose path MTU is below the tunnel's packets while ICMP is filtered.

use anyhow::{bail, ensure, Context, Result};
use skymesh_tests::lab::build::{default_topology, port_name, with_lab, LISTEN_PORT};
use skymesh_tests::lab::Lab;
use skymesh_tests::traffic::ping_once;
use skymesh_tests::{require_tool, wait_until, Netns};
use std::time::Duration;

/// alibaba behind a NAT (no endpoint for it in anyone's config): the other VPCs reach
/// alibaba's, alibaba's reaches theirs, and each peer's endpoint for alibaba is the
/// NAT's public address with the port the NAT mapped, learned from its packets. Then
/// the NAT forgets its mappings and maps to other ports (a NAT gateway replaced):
/// the peers follow within a few keepalives and traffic flows again both ways.
#[test]
fn site_behind_nat_reaches_and_is_reached() -> Result<()> {
    let natted = "alibaba";
    let mut topology = default_topology()?;
    topology
        .sites
        .iter_mut()
        .find(|s| s.name == natted)
        .context("the default topology has no alibaba site")?
        .nat = true;
    with_lab("lab-nat", "n", topology, |lab| {
        let (inbound, outbound): (Vec<_>, Vec<_>) = lab
            .ordered_pairs()
            .into_iter()
            .filter(|(a, b)| a == natted || b == natted)
            .partition(|(_, b)| b == natted);
        let others: Vec<&str> = inbound.iter().map(|(o, _)| o.as_str()).collect();
        // Inbound first: before alibaba's VPC sends anything, only its agent's own
        // keepalives can have told the others where it is.
        let took_in = lab
            .wait_vpc_pings(&inbound, Duration::from_secs(30))
            .context("towards the site behind NAT")?;
        let took_out = lab
            .wait_vpc_pings(&outbound, Duration::from_secs(30))
            .context("from the site behind NAT")?;
        eprintln!("behind NAT: reached in {took_in:?}, reaching in {took_out:?}");
        let endpoints = learned_endpoints(lab, natted, &others)?;
        eprintln!("endpoints for {natted}: {endpoints:?}");

        let site = lab.site(natted)?;
        let nat = site.nat.as_ref().context("alibaba has no NAT namespace")?;
        nat.nft(&format!(
            "flush chain ip nat postrouting\nadd rule ip nat postrouting oifname \"wan0\" meta l4proto udp masquerade to :{REMAPPED_PORTS}\n"
        ))?;
        // Removing the address makes the kernel drop every flow masqueraded with it.
        let public = format!("{}/24", site.public_ip);
        nat.ip(&["addr", "del", &public, "dev", "wan0"])?;
        nat.ip(&["addr", "add", &public, "dev", "wan0"])?;
        let followed = wait_until(Duration::from_secs(20), || {
            learned_endpoints(lab, natted, &others).is_ok_and(|e| e != endpoints)
        });
        let endpoints =
            learned_endpoints(lab, natted, &others).context("after the NAT remapped its ports")?;
        ensure!(
            followed.is_some(),
            "the peers' endpoints for {natted} stayed {endpoints:?} after the NAT remapped its ports"
        );
        lab.wait_vpc_pings(&inbound, Duration::from_secs(10))
            .context("towards the site behind NAT, after the NAT remapped")?;
        lab.wait_vpc_pings(&outbound, Duration::from_secs(10))
            .context("from the site behind NAT, after the NAT remapped")?;
        eprintln!("remapped, followed in {followed:?}: {endpoints:?}");
        Ok(())
    })
}

/// The port range the NAT masquerades to after it is "replaced" (the first NAT keeps
/// the gateway's source port, as Linux does when it is free).
const REMAPPED_PORTS: &str = "40000-40999";

/// Each of `others`' endpoint for `natted`, checked against the NAT's conntrack table:
/// the NAT's public address and the port it mapped the gateway's flow to that peer to.
fn learned_endpoints(lab: &Lab, natted: &str, others: &[&str]) -> Result<Vec<String>> {
    let site = lab.site(natted)?;
    let nat = site.nat.as_ref().context("no NAT namespace")?;
    others
        .iter()
        .map(|other| {
            let port = nat_mapped_port(nat, &lab.site(other)?.public_ip.to_string())?;
            let expected = format!("{}:{port}", site.public_ip);
            let status = lab.agent_status(other)?;
            let endpoint = &status.peer(natted)?.endpoint;
            ensure!(
                endpoint.as_deref() == Some(expected.as_str()),
                "{other} has endpoint {endpoint:?} for {natted}; its NAT maps it to {expected}"
            );
            Ok(expected)
        })
        .collect()
}

/// The public port the NAT in `nat` gave the gateway's WireGuard flow towards `peer`:
/// the destination port of the flow's reply direction in the conntrack table.
fn nat_mapped_port(nat: &Netns, peer: &str) -> Result<u16> {
    let table = nat.exec("cat", &["/proc/net/nf_conntrack"])?;
    let original = format!("dst={peer} sport={LISTEN_PORT} dport={LISTEN_PORT}");
    let reply_src = format!("src={peer} ");
    for line in table.lines().filter(|l| l.contains(" udp ")) {
        let Some(start) = line.find(&original) else {
            continue;
        };
        // The reply tuple follows the original one: src=peer dst=nat sport=… dport=mapped.
        let reply = &line[start + original.len()..];
        let Some(at) = reply.find(&reply_src) else {
            continue;
        };
        let port = reply[at..]
            .split_whitespace()
            .find_map(|f| f.strip_prefix("dport="))
            .and_then(|p| p.parse().ok());
        if let Some(port) = port {
            return Ok(port);
        }
    }
    bail!(
        "no conntrack entry for the gateway's flow to {peer}:{LISTEN_PORT} in {}:\n{table}",
        nat.name()
    )
}

/// One kernel SNMP counter of the namespace, e.g. ("Ip", "ReasmOKs").
fn snmp_counter(ns: &Netns, group: &str, name: &str) -> Result<u64> {
    let text = ns.exec("cat", &["/proc/net/snmp"])?;
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        bail!("no {group} rows in /proc/net/snmp of {}", ns.name());
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no {group} {name} in /proc/net/snmp of {}", ns.name()))
}

/// Drops every ICMP packet in or out of `wan0`, as paths that filter "fragmentation
/// needed" do; the WAN switch itself never sends ICMP.
const NO_ICMP_ON_WAN: &str = "table inet no_wan_icmp {
  chain input { type filter hook input priority -300; policy accept; iifname \"wan0\" meta l4proto icmp drop; }
  chain output { type filter hook output priority -300; policy accept; oifname \"wan0\" meta l4proto icmp drop; }
  chain forward { type filter hook forward priority -300; policy accept; iifname \"wan0\" meta l4proto icmp drop; oifname \"wan0\" meta l4proto icmp drop; }
}
";

/// aws↔gcp with a 1280-byte path MTU (below the tunnel's ~1480-byte packets) and all
/// ICMP dropped on both gateways' WAN legs: 1 MiB over TCP still arrives intact both
/// ways within 30 s, through fragments the receiving gateway reassembles, not a
/// blackhole.
#[test]
fn low_path_mtu_with_icmp_filtered_is_no_blackhole() -> Result<()> {
    // The test filters ICMP with nft on the gateways.
    if !require_tool("nft") {
        return Ok(());
    }
    with_lab("lab-mtu", "u", default_topology()?, |lab| {
        let (a, b) = ("aws", "gcp");
        let (sa, sb) = (lab.site(a)?, lab.site(b)?);
        for (from, to) in [(a, b), (b, a)] {
            let (src, dst) = (port_name(from), port_name(to));
            let mut shape = lab.switch.shape(&src, &dst)?;
            shape.mtu = Some(1280);
            lab.switch.set(&src, &dst, shape)?;
        }
        for s in [sa, sb] {
            s.gw.nft(NO_ICMP_ON_WAN)?;
        }
        ensure!(
            !ping_once(&sa.gw, &sb.public_ip.to_string()),
            "the {a} gateway still pings {b}'s over the WAN: ICMP is not filtered"
        );
        lab.wait_vpc_pings(
            &[
                (a.to_string(), b.to_string()),
                (b.to_string(), a.to_string()),
            ],
            Duration::from_secs(30),
        )?;

        for (i, (from, to)) in [(sa, sb), (sb, sa)].into_iter().enumerate() {
            let (f, t) = (&from.site.name, &to.site.name);
            let reassembled = snmp_counter(&to.gw, "Ip", "ReasmOKs")?;
            let x = lab
                .vpc_transfer(f, t, 5001 + i as u16, 1 << 20)
                .context("over a 1280-byte path MTU with ICMP filtered")?;
            let reassembled = snmp_counter(&to.gw, "Ip", "ReasmOKs")? - reassembled;
            eprintln!(
                "{f}→{t}: 1 MiB in {:.2} s, {reassembled} packets reassembled at {t}'s gateway",
                x.elapsed.as_secs_f64()
            );
            ensure!(
                x.elapsed < Duration::from_secs(30),
                "{f}→{t}: 1 MiB took {:?}, the bound is 30 s",
                x.elapsed
            );
            // ~750 full-size segments; fewer would mean the lowered MTU was not in play.
            ensure!(
                reassembled >= 500,
                "only {reassembled} fragmented packets reached {t}'s gateway: the path MTU was not in effect"
            );
        }
        Ok(())
    })
}
