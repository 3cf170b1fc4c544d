//! Resilience on the four-cloud lab (`configs/lab.toml`, controller mode): bulk data over
//! every VPC pair, a WAN pair cut and restored, and an agent killed and restarted. Each
//! test builds its own lab; the lab's guards remove every namespace even on failure.

use anyhow::{ensure, Context, Result};
use skymesh_tests::lab::build::{default_topology, port_name, with_lab};
use std::time::{Duration, Instant};

/// How long a freshly built lab gets until every VPC pair answers pings.
const CONVERGE: Duration = Duration::from_secs(30);

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn show(pairs: &[(String, String)], took: &[Duration]) -> String {
    pairs
        .iter()
        .zip(took)
        .map(|((a, b), t)| format!("{a}→{b} {:.1} s", t.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every unordered VPC pair moves 20 MiB over TCP with the bytes intact, on the
/// default WAN including the 3 % loss and ~220 ms RTT of the direct paths to alibaba
/// (measured at 8-18 s per 20 MiB there, so the loss stays in). One direction per
/// pair, chosen so that every site both sends and receives; TCP's ACKs load the
/// other direction.
#[test]
fn every_vpc_pair_moves_20_mib_intact() -> Result<()> {
    with_lab("lab-bulk", "b", default_topology()?, |lab| {
        let transfers = pairs(&[
            ("aws", "gcp"),
            ("gcp", "azure"),
            ("azure", "alibaba"),
            ("alibaba", "aws"),
            ("azure", "aws"),
            ("alibaba", "gcp"),
        ]);
        lab.wait_vpc_pings(&lab.ordered_pairs(), CONVERGE)?;
        // Bytes that arrive changed fail at once; a transfer over the time bound
        // while the hypervisor stole the CPU (0.1 MB/s under 50–60% steal in one
        // run) is made again, once (see `skymesh_tests::machine`).
        for (i, (from, to)) in transfers.iter().enumerate() {
            skymesh_tests::machine::measure(
                &format!("{from}→{to} transfer"),
                2,
                || {
                    let t = lab.vpc_transfer(from, to, 5001 + i as u16, 20 << 20)?;
                    eprintln!(
                        "{from}→{to}: 20 MiB in {:.1} s ({:.1} MB/s)",
                        t.elapsed.as_secs_f64(),
                        t.mbytes_per_sec()
                    );
                    Ok(t.elapsed)
                },
                |&elapsed| {
                    ensure!(
                        elapsed < Duration::from_secs(90),
                        "{from}→{to}: 20 MiB took {elapsed:?}, the bound is 90 s"
                    );
                    Ok(())
                },
            )?;
        }
        Ok(())
    })
}

/// aws cut off the WAN (its links to every other site) for 10 s: aws's VPC cannot
/// reach any other VPC, while every pair of the other sites keeps working (pairs
/// whose path went through aws, if any, fail over); after the restore aws's pairs
/// recover within 30 s.
#[test]
fn site_cut_off_the_wan_fails_only_its_pairs_and_recovers() -> Result<()> {
    with_lab("lab-cut", "c", default_topology()?, |lab| {
        let all = lab.ordered_pairs();
        lab.wait_vpc_pings(&all, CONVERGE)?;
        let victim = "aws";
        let (cut, others): (Vec<_>, Vec<_>) = all
            .into_iter()
            .partition(|(a, b)| a == victim || b == victim);
        let neighbours: Vec<String> = lab
            .sites
            .iter()
            .map(|s| s.site.name.clone())
            .filter(|n| n != victim)
            .collect();
        for n in &neighbours {
            lab.switch
                .set_up(&port_name(victim), &port_name(n), false)?;
        }
        let cut_at = Instant::now();
        let mut rounds = 0;
        while cut_at.elapsed() < Duration::from_secs(10) {
            for (from, to) in cut.iter().take(2) {
                ensure!(
                    lab.vpc_ping(from, to, 1)?.is_none(),
                    "VPC {from} reached VPC {to} {:?} into the WAN cut",
                    cut_at.elapsed()
                );
            }
            // A few seconds each: the direct paths to alibaba lose 3 % per direction.
            lab.wait_vpc_pings(&others, Duration::from_secs(5))
                .with_context(|| format!("{:?} into the {victim} cut", cut_at.elapsed()))?;
            rounds += 1;
        }
        for n in &neighbours {
            lab.switch.set_up(&port_name(victim), &port_name(n), true)?;
        }
        let cut_for = cut_at.elapsed();

        let took = lab
            .wait_vpc_pings(&cut, Duration::from_secs(30))
            .context("after restoring the WAN")?;
        eprintln!(
            "{victim} cut off for {:.1} s ({rounds} rounds, other pairs fine); recovered: {}",
            cut_for.as_secs_f64(),
            show(&cut, &took)
        );
        Ok(())
    })
}

/// gcp's agent killed with SIGKILL (no cleanup) and started again: gcp's VPC reaches
/// every other VPC and every other VPC reaches gcp's, within 30 s. The others still
/// hold sessions the new process does not know, so their direction waits on their
/// own handshake timers.
#[test]
fn agent_killed_with_sigkill_recovers_after_restart() -> Result<()> {
    with_lab("lab-kill", "k", default_topology()?, |lab| {
        lab.wait_vpc_pings(&lab.ordered_pairs(), CONVERGE)?;
        let victim = "gcp";
        let (to_victim, from_victim): (Vec<_>, Vec<_>) = lab
            .ordered_pairs()
            .into_iter()
            .filter(|(a, b)| a == victim || b == victim)
            .partition(|(_, b)| b == victim);

        lab.kill_agent(victim)?;
        ensure!(
            lab.vpc_ping("aws", victim, 1)?.is_none(),
            "VPC {victim} still answers with its agent killed"
        );
        lab.restart_agent(victim)?;
        // Towards the victim first: nothing has made the new process send yet, so
        // this is the direction that depends on the peers noticing the restart.
        let inbound = lab
            .wait_vpc_pings(&to_victim, Duration::from_secs(30))
            .context("towards the restarted site")?;
        let outbound = lab
            .wait_vpc_pings(&from_victim, Duration::from_secs(30))
            .context("from the restarted site")?;
        eprintln!(
            "after restarting {victim}: {}; {}",
            show(&to_victim, &inbound),
            show(&from_victim, &outbound)
        );
        Ok(())
    })
}
