//! Controller mode on the four-cloud lab: every site enrolls with a join token
//! and gets its netmap from the controller (itself a mesh node); IPAM refuses an
//! overlapping prefix and says why; a used token is refused; a revoked node
//! leaves the mesh; allocations survive a controller crash; and the data plane
//! keeps forwarding through a 60 s controller outage, across an agent restart.

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use skymesh_tests::agent::agent_bin;
use skymesh_tests::lab::build::{default_topology, with_lab, Lab, CONTROLLER_NODE};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const CONVERGE: Duration = Duration::from_secs(30);

fn nodes(lab: &Lab) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&lab.ctl_exec(&["--json", "nodes", "list"])?)?;
    v.as_array().cloned().context("nodes list is an array")
}

/// name → (overlay ip, accepted prefixes)
fn allocations(lab: &Lab) -> Result<BTreeMap<String, (String, Value)>> {
    Ok(nodes(lab)?
        .into_iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_string(),
                (
                    n["overlay_ip"].as_str().unwrap_or_default().to_string(),
                    n["prefixes"].clone(),
                ),
            )
        })
        .collect())
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        match cond() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: not within {timeout:?} (last error: {last:?})")
}

#[test]
fn sites_enroll_overlaps_are_refused_tokens_work_once_and_revocation_is_prompt() -> Result<()> {
    with_lab("lab-ctl", "e", default_topology()?, |lab| {
        // Every site enrolled, online, with its VPC accepted; the controller host too.
        let all = nodes(lab)?;
        let mut names: Vec<&str> = all.iter().filter_map(|n| n["name"].as_str()).collect();
        names.sort_unstable();
        ensure!(
            names == ["alibaba", "aws", "azure", CONTROLLER_NODE, "gcp"],
            "{names:?}"
        );
        for s in &lab.sites {
            let n = all
                .iter()
                .find(|n| n["name"] == s.site.name.as_str())
                .context("node")?;
            ensure!(n["online"] == true, "{} offline: {n}", s.site.name);
            ensure!(n["cloud"] == s.site.cloud.as_str() && n["region"] == s.site.region.as_str());
            ensure!(
                n["prefixes"] == serde_json::json!([s.site.vpc.to_string()]),
                "{n}"
            );
            ensure!(n["overlay_ip"] == s.overlay_ip.to_string().as_str(), "{n}");
        }
        lab.wait_vpc_pings(&lab.ordered_pairs(), CONVERGE)?;

        // gcp also advertises a piece of aws's VPC: refused, with aws named; its
        // own VPC stays routed.
        let gcp = lab.site("gcp")?;
        let cfg = std::fs::read_to_string(&gcp.config)?;
        let cfg = cfg.replace(
            "advertise = [\"10.10.0.0/16\"]",
            "advertise = [\"10.10.0.0/16\", \"10.0.5.0/24\"]",
        );
        ensure!(cfg.contains("10.0.5.0/24"), "config rewrite failed:\n{cfg}");
        skymesh_tests::agent::write_secret(&gcp.config, &cfg)?;
        lab.kill_agent("gcp")?;
        lab.restart_agent("gcp")?;
        wait_for("gcp reports the refusal", Duration::from_secs(15), || {
            let st = lab.agent_status("gcp")?;
            let c = st.controller.context("controller status")?;
            Ok(c.rejected_prefixes
                .iter()
                .any(|r| r.cidr == "10.0.5.0/24" && r.reason.contains("aws")))
        })?;
        let prefixes = lab.ctl_exec(&["prefixes", "list"])?;
        ensure!(
            prefixes.lines().any(|l| l.starts_with("10.0.5.0/24")
                && l.contains("rejected")
                && l.contains("overlaps 10.0.0.0/16 advertised by node aws")),
            "{prefixes}"
        );
        let log = std::fs::read_to_string(lab.dir.join("gcp-agent.log"))?;
        ensure!(
            log.contains("refused an advertised prefix") && log.contains("10.0.5.0/24"),
            "agent log:\n{log}"
        );
        let shown = lab.ctl_exec(&["nodes", "show", "gcp"])?;
        ensure!(
            shown.contains("REFUSED") && shown.contains("10.0.5.0/24"),
            "{shown}"
        );
        lab.wait_vpc_pings(
            &[("aws".into(), "gcp".into()), ("gcp".into(), "aws".into())],
            CONVERGE,
        )?;

        // aws's token was used at enrollment: joining again with it is refused.
        let aws = lab.site("aws")?;
        let fresh = lab.dir.join("reuse.toml");
        let state = lab.dir.join("reuse-state");
        let cfg = std::fs::read_to_string(&aws.config)?.replace(
            &lab.dir.join("aws-state").display().to_string(),
            &state.display().to_string(),
        );
        skymesh_tests::agent::write_secret(&fresh, &cfg)?;
        let token = std::fs::read_to_string(lab.dir.join("aws.join-token"))?;
        let out = aws
            .gw
            .command(
                agent_bin()?.to_str().context("path")?,
                &[
                    "join",
                    token.trim(),
                    "--config",
                    fresh.to_str().context("path")?,
                ],
            )
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("already used"),
            "reused token: {err}"
        );

        // Revoke alibaba: it leaves every netmap within 2 s and its VPC is
        // unreachable; its agent is refused.
        let t0 = Instant::now();
        lab.ctl_exec(&["nodes", "revoke", "alibaba"])?;
        let took = wait_for(
            "alibaba leaves every netmap",
            Duration::from_secs(2),
            || {
                for s in ["aws", "gcp", "azure"] {
                    if lab
                        .agent_status(s)?
                        .peers
                        .iter()
                        .any(|p| p.name == "alibaba")
                    {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        eprintln!(
            "revocation reached every agent in {took:?} ({:?} including the CLI)",
            t0.elapsed()
        );
        ensure!(
            lab.vpc_ping("aws", "alibaba", 1)?.is_none(),
            "revoked VPC still reachable"
        );
        wait_for(
            "alibaba's agent is refused",
            Duration::from_secs(10),
            || {
                let log = std::fs::read_to_string(lab.dir.join("alibaba-agent.log"))?;
                Ok(log.contains("revoked or unknown") || log.contains("was revoked"))
            },
        )?;
        Ok(())
    })
}

#[test]
fn allocations_survive_a_crash_and_forwarding_survives_a_60s_outage() -> Result<()> {
    with_lab("lab-ctl-outage", "o", default_topology()?, |lab| {
        lab.wait_vpc_pings(&lab.ordered_pairs(), CONVERGE)?;
        let before = allocations(lab)?;

        // Controller down (kill -9) for 60 s: every pair keeps forwarding, also
        // after an agent restart during the outage (it restores its cached netmap).
        lab.kill_controller()?;
        let start = Instant::now();
        let mut restarted = false;
        let mut rounds = 0;
        while start.elapsed() < Duration::from_secs(60) {
            if !restarted && start.elapsed() > Duration::from_secs(15) {
                lab.kill_agent("aws")?;
                lab.restart_agent("aws")?;
                let st = lab.agent_status("aws")?;
                let c = st.controller.context("controller status")?;
                ensure!(
                    c.from_cache && c.connected.is_none(),
                    "aws restored from cache: {c:?}"
                );
                ensure!(
                    st.peers.len() == 4,
                    "aws restored every peer: {:?}",
                    st.peers
                );
                restarted = true;
                lab.wait_vpc_pings(
                    &[
                        ("aws".into(), "gcp".into()),
                        ("gcp".into(), "aws".into()),
                        ("aws".into(), "azure".into()),
                    ],
                    Duration::from_secs(10),
                )?;
            }
            for (a, b) in [
                ("aws", "gcp"),
                ("gcp", "azure"),
                ("azure", "aws"),
                ("azure", "alibaba"),
            ] {
                ensure!(
                    lab.vpc_ping(a, b, 3)?.is_some(),
                    "{a}→{b} stopped forwarding {:?} into the controller outage",
                    start.elapsed()
                );
            }
            rounds += 1;
            std::thread::sleep(Duration::from_secs(2));
        }
        ensure!(restarted && rounds >= 10, "outage loop ran {rounds} rounds");

        // Back: same allocations, every agent reconnects and re-syncs.
        lab.start_controller()?;
        let after = allocations(lab)?;
        ensure!(
            after == before,
            "allocations changed across the crash:\nbefore {before:?}\nafter {after:?}"
        );
        wait_for("every agent reconnects", Duration::from_secs(40), || {
            for s in ["aws", "gcp", "azure", "alibaba"] {
                let c = lab
                    .agent_status(s)?
                    .controller
                    .context("controller status")?;
                if c.connected.is_none() || c.from_cache {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        lab.wait_vpc_pings(&lab.ordered_pairs(), CONVERGE)?;
        Ok(())
    })
}
