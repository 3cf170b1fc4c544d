use anyhow::Result;
use skymesh_tests::lab::{Lab, Topology};
use skymesh_tests::traffic::{tcp_transfer, Payload};
use skymesh_tests::{e2e, require_root, wait_until};
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn measure() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("measure", |env| {
        let t = Topology::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/lab.toml"
        )))?;
        let start = Instant::now();
        let lab = Lab::up(
            &format!("t{}z", std::process::id() % 100_000),
            t,
            &env.path("lab"),
        )?;
        eprintln!("up {:?}", start.elapsed());
        for (a, b) in [
            ("aws", "gcp"),
            ("gcp", "aws"),
            ("aws", "alibaba"),
            ("alibaba", "aws"),
            ("aws", "azure"),
            ("azure", "alibaba"),
        ] {
            let w = wait_until(Duration::from_secs(30), || {
                lab.vpc_ping(a, b, 2).ok().flatten().is_some()
            });
            eprintln!("{a}->{b} ping after {w:?}");
        }
        for (a, b, mb) in [
            ("aws", "gcp", 20),
            ("aws", "azure", 20),
            ("azure", "alibaba", 20),
            ("aws", "alibaba", 2),
            ("alibaba", "aws", 2),
        ] {
            let (sa, sb) = (lab.site(a)?, lab.site(b)?);
            let t = tcp_transfer(
                &sa.vpc,
                &sb.vpc,
                &sb.vpc_host_ip.to_string(),
                5001,
                Payload::Pattern(mb << 20),
            )?;
            t.verify()?;
            eprintln!(
                "{a}->{b} {mb} MiB in {:?} ({:.1} MB/s)",
                t.elapsed,
                t.mbytes_per_sec()
            );
        }
        Ok(())
    })
}
