//! The lab's agents as Prometheus sees them: every agent's `/metrics` passes
//! `promtool check metrics`, and a real Prometheus server in the controller's
//! namespace scrapes every agent over the overlay and stores the same RTT the
//! agent's own `status` reports.

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use skymesh_tests::lab::build::{default_topology, with_lab, Lab, METRICS_PORT};
use skymesh_tests::metrics::http_get;
use skymesh_tests::proc::{output_with_stdin, Spawned};
use skymesh_tests::{find_in_path, require_tool, run_in_netns, wait_until};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

/// Where the test's Prometheus serves its API, inside the controller's namespace.
const PROMETHEUS_LISTEN: &str = "127.0.0.1:9090";
/// Probes need a few rounds before every link has an RTT.
const MEASURED: Duration = Duration::from_secs(30);
/// First scrape of every target, at a 1 s interval.
const SCRAPED: Duration = Duration::from_secs(30);

/// The overlay address of `node`'s agent, from its `status`.
fn overlay_ip(lab: &Lab, node: &str) -> Result<String> {
    let st = lab.agent_status(node)?;
    let addr = st.interface.address;
    Ok(addr.split('/').next().unwrap_or(&addr).to_string())
}

/// Runs every agent's `/metrics` through `promtool check metrics`; one entry per
/// agent with anything to say (promtool prints nothing and exits 0 when clean).
fn promtool_problems(lab: &Lab, promtool: &str) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for node in lab.agent_nodes() {
        let text = lab.agent_metrics(node)?.text;
        let out = output_with_stdin(
            Command::new(promtool).args(["check", "metrics"]),
            text.as_bytes(),
        )?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !said.trim().is_empty() {
            problems.push(format!(
                "{node}: `promtool check metrics` ({}):\n{}\n--- its /metrics ---\n{text}",
                out.status,
                said.trim_end()
            ));
        }
    }
    Ok(problems)
}

/// Percent-encodes a query-string value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// GET `path` from the Prometheus HTTP API in namespace `ns`; the `data` of a
/// `"status": "success"` answer.
fn prometheus_api(ns: &str, path: &str) -> Result<Value> {
    let addr: SocketAddr = PROMETHEUS_LISTEN.parse()?;
    let path = path.to_string();
    let body = run_in_netns(ns, move || http_get(addr, &path))??;
    let v: Value = serde_json::from_str(&body).with_context(|| format!("parsing {body}"))?;
    ensure!(v["status"] == "success", "Prometheus API answered: {body}");
    Ok(v["data"].clone())
}

#[test]
fn agent_metrics_pass_promtool_and_a_real_prometheus_scrapes_them_over_the_overlay() -> Result<()> {
    if !require_tool("promtool") || !require_tool("prometheus") {
        return Ok(());
    }
    let promtool = find_in_path("promtool").context("promtool on PATH")?;
    let promtool = promtool.to_str().context("promtool path")?.to_string();
    let prometheus = find_in_path("prometheus").context("prometheus on PATH")?;
    let prometheus = prometheus.to_str().context("prometheus path")?.to_string();

    with_lab("lab-prom", "p", default_topology()?, |lab| {
        // Every agent has measured every link, so each exposes its full set of series.
        let nodes = lab.agent_nodes();
        let all_measured = || {
            nodes.iter().all(|n| {
                lab.agent_status(n).is_ok_and(|st| {
                    st.links.len() + 1 == nodes.len() && st.links.iter().all(|l| l.rtt_ms.is_some())
                })
            })
        };
        ensure!(
            wait_until(MEASURED, all_measured).is_some(),
            "not every agent measured all {} of its links within {MEASURED:?}",
            nodes.len() - 1
        );

        // (a) The exposition format, checked by Prometheus's own linter. Problems are
        // reported after (b), so one run shows both.
        let lint = promtool_problems(lab, &promtool)?;

        // (b) A real Prometheus in the controller's namespace scrapes every agent at
        // its overlay address, through the controller host's own agent.
        let mut targets = Vec::new();
        for node in &nodes {
            targets.push((
                node.to_string(),
                format!("{}:{METRICS_PORT}", overlay_ip(lab, node)?),
            ));
        }
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: skymesh-agents\n    static_configs:\n",
        );
        for (node, target) in &targets {
            config.push_str(&format!(
                "      - targets: [\"{target}\"]\n        labels:\n          node: \"{node}\"\n"
            ));
        }
        let config_file = lab.dir.join("prometheus.yml");
        std::fs::write(&config_file, &config).context("writing prometheus.yml")?;
        let ctl_ns = &lab
            .controller
            .as_ref()
            .context("the lab runs in controller mode")?
            .ns;
        let args = [
            format!("--config.file={}", config_file.display()),
            format!(
                "--storage.tsdb.path={}",
                lab.dir.join("prometheus-data").display()
            ),
            format!("--web.listen-address={PROMETHEUS_LISTEN}"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Dropped (SIGTERM, then SIGKILL) however this closure ends, panics included.
        let mut server = Spawned::start(
            "prometheus",
            ctl_ns.command(&prometheus, &args),
            &lab.dir.join("prometheus.log"),
        )?;

        let mut last = Value::Null;
        let all_up = wait_until(SCRAPED, || {
            if let Ok(t) = prometheus_api(ctl_ns.name(), "/api/v1/targets?state=active") {
                last = t["activeTargets"].clone();
            }
            last.as_array()
                .is_some_and(|a| a.len() == targets.len() && a.iter().all(|t| t["health"] == "up"))
        });
        if all_up.is_none() {
            let _ = server.ensure_running();
            bail!(
                "Prometheus did not scrape all {} agents within {SCRAPED:?}; targets: {last:#}\nPrometheus log:\n{}",
                targets.len(),
                skymesh_tests::tail(server.log_path(), 30)
            );
        }

        // aws's RTT to gcp as Prometheus stored it, against aws's own status.
        let instance = &targets
            .iter()
            .find(|(n, _)| n == "aws")
            .context("aws is a target")?
            .1;
        let query = format!("skymesh_link_rtt_seconds{{instance=\"{instance}\",peer=\"gcp\"}}");
        // The smoothed RTT stands for the last second or so of probes: each
        // attempt first lets 3 s of probes and scrapes pass, so that a hypervisor
        // stealing the CPU in them shows (see `skymesh_tests::machine`).
        skymesh_tests::machine::measure(
            "aws-gcp RTT in Prometheus",
            3,
            || {
                std::thread::sleep(Duration::from_secs(3));
                let data = prometheus_api(
                    ctl_ns.name(),
                    &format!("/api/v1/query?query={}", encode(&query)),
                )?;
                let status_ms = lab
                    .agent_status("aws")?
                    .links
                    .iter()
                    .find(|l| l.peer == "gcp")
                    .and_then(|l| l.rtt_ms)
                    .context("aws's status has no RTT to gcp")?;
                let result = data["result"].as_array().context("a vector result")?;
                ensure!(
                    result.len() == 1,
                    "{query}: expected one series, got {data:#}"
                );
                let scraped: f64 = result[0]["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("{query}: no value in {data:#}"))?;
                eprintln!("aws-gcp RTT: Prometheus {scraped} s, aws status {status_ms:.3} ms");
                Ok((scraped, status_ms))
            },
            |&(scraped, status_ms)| {
                let tolerance_ms = 1.0 + 0.05 * status_ms;
                ensure!(
                    (scraped * 1e3 - status_ms).abs() <= tolerance_ms,
                    "Prometheus has {query} = {scraped} s, but aws's status says \
                     {status_ms:.2} ms (tolerance ±{tolerance_ms:.2} ms)"
                );
                // The lab emulates 10 ms each way between aws and gcp; the
                // userspace WAN and tunnel add a little on a busy machine.
                ensure!(
                    (0.019..0.030).contains(&scraped),
                    "{query} = {scraped} s; the lab's aws-gcp RTT is about 0.020 s"
                );
                Ok(())
            },
        )?;

        server
            .terminate(Duration::from_secs(10))
            .context("stopping Prometheus")?;
        ensure!(
            lint.is_empty(),
            "promtool found problems in {} of {} agents' /metrics:\n{}",
            lint.len(),
            nodes.len(),
            lint.join("\n\n")
        );
        Ok(())
    })
}
