//! End-to-end on the four-cloud lab (`configs/lab.toml`): real agents in gateway
//! namespaces, workload hosts in VPC namespaces, the userspace WAN in between.

use anyhow::{ensure, Result};
use skymesh_tests::lab::build::{default_topology, with_lab};
use skymesh_tests::machine;
use skymesh_tests::wait_until;
use std::time::Duration;

#[test]
fn full_mesh_every_vpc_pair_pings() -> Result<()> {
    with_lab("lab-mesh", "m", default_topology()?, |lab| {
        let names: Vec<String> = lab.sites.iter().map(|s| s.site.name.clone()).collect();
        for from in &names {
            for to in names.iter().filter(|t| *t != from) {
                let ok = wait_until(Duration::from_secs(30), || {
                    lab.vpc_ping(from, to, 2).ok().flatten().is_some()
                });
                ensure!(ok.is_some(), "VPC {from} cannot reach VPC {to} within 30 s");
            }
        }
        // The emulated one-way delays show in the RTT (aws↔gcp 2×10 ms, aws↔azure 2×75 ms):
        // the lowest of 10 pings, as a delay is only ever added to it. A hypervisor
        // that steals the CPU delays pings on this machine, so a miss under steal
        // is measured again (see `skymesh_tests::machine`).
        machine::measure(
            "VPC RTTs",
            3,
            || {
                let near = lab.vpc_ping_n("aws", "gcp", 10)?.1.unwrap_or(0.0);
                let far = lab.vpc_ping_n("aws", "azure", 10)?.1.unwrap_or(0.0);
                eprintln!("aws→gcp {near} ms, aws→azure {far} ms");
                Ok((near, far))
            },
            |&(near, far)| {
                ensure!(
                    (19.0..26.0).contains(&near),
                    "aws→gcp RTT {near} ms, the WAN emulates 2×10 ms"
                );
                ensure!(
                    (149.0..160.0).contains(&far),
                    "aws→azure RTT {far} ms, the WAN emulates 2×75 ms"
                );
                Ok(())
            },
        )?;
        Ok(())
    })
}
