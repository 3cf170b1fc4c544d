//! The AI gateway over the fabric, on the four-cloud lab: applications in a VPC
//! call the controller's gateway with the official `openai` package; the gateway
//! reaches backends in other clouds' VPCs through the WireGuard mesh (the agent
//! counters prove the bytes crossed it), picks the nearest by fabric RTT, and
//! holds requests to their residency when the only allowed cloud is cut off.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use skymesh_tests::ai;
use skymesh_tests::lab::build::{default_topology, port_name, with_lab, Lab, CONTROLLER_NODE};
use skymesh_tests::wait_until;
use skymesh_tests::wan::PairShape;
use std::time::Duration;

/// The gateway's upstreams as `skymeshctl ai upstreams --json` shows them.
fn upstreams(lab: &Lab) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&lab.ctl_exec(&["--json", "ai", "upstreams"])?)?;
    Ok(v.as_array().context("upstreams")?.clone())
}

fn rtt_of(ups: &[Value], name: &str) -> Option<f64> {
    ups.iter()
        .find(|u| u["name"] == name)
        .and_then(|u| u["fabric_rtt_ms"].as_f64())
}

/// The upstream `lowest-latency` ranks first by the figures the gateway shows:
/// fabric RTT plus the upstream's own time to first byte (none until it has 3
/// answers). Circuits are left out: one opened while the lab came up shows
/// `open` until a request tries it, which the next request may.
fn ranked_first(ups: &[Value]) -> Option<String> {
    ups.iter()
        .filter_map(|u| {
            let score = u["fabric_rtt_ms"].as_f64()? + u["ttfb_ms"].as_f64().unwrap_or(0.0);
            Some((score, u["name"].as_str()?.to_string()))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, name)| name)
}

/// One chat completion from `site`'s VPC host with curl; (status, upstream,
/// region, body).
fn chat(
    lab: &Lab,
    site: &str,
    path: &str,
    content: &str,
    extra: &[&str],
) -> Result<(u16, String, String, String)> {
    let base = lab.ai_base_url()?;
    let url = format!("{}{path}", base.trim_end_matches("/v1"));
    let key = lab.ai_key.clone().context("no AI key")?;
    let auth = format!("Authorization: Bearer {key}");
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]})
        .to_string();
    let body_file = lab.dir.join("chat-body.json");
    std::fs::write(&body_file, &body)?;
    let data = format!("@{}", body_file.display());
    let mut args = vec![
        "-sS",
        "-i",
        "--max-time",
        "20",
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = skymesh_tests::proc::output(&mut lab.vpc_command(site, "curl", &args)?)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = ai::http_status(&text).unwrap_or(0);
    let header = |name: &str| ai::http_header(&text, name).unwrap_or_default().to_string();
    let body = text.split("\r\n\r\n").last().unwrap_or("").to_string();
    Ok((
        status,
        header("x-skymesh-upstream"),
        header("x-skymesh-region"),
        body,
    ))
}

fn peer_bytes(lab: &Lab, node: &str, peer: &str) -> Result<(f64, f64)> {
    let m = lab.agent_metrics(node)?;
    Ok((
        m.counter("skymesh_peer_rx_bytes_total", &[("peer", peer)]),
        m.counter("skymesh_peer_tx_bytes_total", &[("peer", peer)]),
    ))
}

const CLIENT: &str = r#"
import json, time
from openai import OpenAI
c = OpenAI(max_retries=0)
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello over the mesh"}])
parts = []
for ch in c.chat.completions.create(model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "one two three"}]):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
e = c.embeddings.create(model="text-embedding-3-small", input="x")
print(json.dumps({"content": r.choices[0].message.content, "stream": "".join(parts), "dim": len(e.data[0].embedding)}))
"#;

fn set_ctl_delay(lab: &Lab, site: &str, one_way_ms: u64) -> Result<()> {
    lab.switch.set_both(
        &port_name("ctl"),
        &port_name(site),
        PairShape {
            delay: Duration::from_millis(one_way_ms),
            ..Default::default()
        },
    )
}

#[test]
fn ai_gateway_over_the_fabric() -> Result<()> {
    ai::python()?;
    with_lab("lab-ai", "ai", default_topology()?, |lab| {
        // The gateway answers once the mesh and its fabric view are up.
        ensure!(
            wait_until(Duration::from_secs(30), || {
                chat(lab, "aws", "/v1/chat/completions", "ping", &[]).is_ok_and(|r| r.0 == 200)
            })
            .is_some(),
            "no chat completion through the gateway within 30 s: {:?}",
            chat(lab, "aws", "/v1/chat/completions", "ping", &[])
        );

        // The openai package, from the aws VPC host, with `skymesh-lab env`'s values.
        let base = lab.ai_base_url()?;
        let key = lab.ai_key.clone().context("key")?;
        let v = ai::run_python(
            Some(&skymesh_tests::lab::build::ns_name(&lab.id, "aws-vpc")),
            CLIENT,
            &[("OPENAI_BASE_URL", &base), ("OPENAI_API_KEY", &key)],
        )?;
        eprintln!("openai client in aws's VPC: {v}");
        let content = v["content"].as_str().unwrap_or("");
        ensure!(content.ends_with("echo: hello over the mesh"), "{v}");
        ensure!(
            v["stream"]
                .as_str()
                .unwrap_or("")
                .ends_with("echo: one two three"),
            "{v}"
        );
        ensure!(v["dim"] == 8, "{v}");

        // Latency-aware: the nearest cloud by fabric RTT wins. Its answers so far
        // count too: on this machine a stall can make an instant backend's
        // answers slow (47 and 302 ms of 3 in one run), and such figures expire
        // after a minute (`TTFB_MAX_AGE`), hence the wait of 90 s at most.
        set_ctl_delay(lab, "gcp", 30)?;
        set_ctl_delay(lab, "azure", 3)?;
        set_ctl_delay(lab, "alibaba", 60)?;
        let converged = |near: &str, far: &[&str]| {
            upstreams(lab).is_ok_and(|u| {
                rtt_of(&u, near).is_some_and(|n| {
                    far.iter()
                        .all(|f| rtt_of(&u, f).is_some_and(|x| x > n + 20.0))
                }) && ranked_first(&u).as_deref() == Some(near)
            })
        };
        ensure!(
            wait_until(Duration::from_secs(90), || converged(
                "azure-openai",
                &["vertex-openai", "dashscope"]
            ))
            .is_some(),
            "the gateway's fabric RTTs did not follow the WAN: {:?}",
            upstreams(lab)
        );
        for _ in 0..5 {
            let (status, upstream, region, body) =
                chat(lab, "aws", "/v1/chat/completions", "near", &[])?;
            ensure!(
                status == 200 && upstream == "azure-openai" && region == "eastasia",
                "{status} {upstream} {body}"
            );
        }
        set_ctl_delay(lab, "azure", 80)?;
        ensure!(
            wait_until(Duration::from_secs(90), || converged(
                "vertex-openai",
                &["azure-openai", "dashscope"]
            ))
            .is_some(),
            "RTTs did not follow: {:?}",
            upstreams(lab)
        );
        // A request may still be on its way to azure; then gcp wins.
        let mut last = String::new();
        let moved = wait_until(Duration::from_secs(10), || {
            chat(lab, "aws", "/v1/chat/completions", "moved", &[]).is_ok_and(|r| {
                last = r.1.clone();
                r.0 == 200 && r.1 == "vertex-openai"
            })
        });
        ensure!(
            moved.is_some(),
            "still served by {last} after azure moved away"
        );
        eprintln!("gateway upstreams: {:?}", upstreams(lab)?);

        // The bytes cross the fabric: a 200 kB prompt to the cn-shanghai backend
        // leaves the controller's agent towards alibaba and its 200 kB answer
        // comes back from it, through WireGuard.
        let big = "z".repeat(200_000);
        let (rx0, tx0) = peer_bytes(lab, CONTROLLER_NODE, "alibaba")?;
        let (status, upstream, _, body) = chat(
            lab,
            "aws",
            "/v1/chat/completions",
            &big,
            &["-H", "x-skymesh-residency: cn-shanghai"],
        )?;
        ensure!(
            status == 200 && upstream == "dashscope" && body.len() > 200_000,
            "{status} {upstream} {}",
            body.len()
        );
        let (rx1, tx1) = peer_bytes(lab, CONTROLLER_NODE, "alibaba")?;
        eprintln!(
            "controller agent ↔ alibaba: rx +{} B, tx +{} B",
            rx1 - rx0,
            tx1 - tx0
        );
        ensure!(
            tx1 - tx0 >= 200_000.0,
            "the request did not cross the tunnel to alibaba: tx +{}",
            tx1 - tx0
        );
        ensure!(
            rx1 - rx0 >= 200_000.0,
            "the answer did not come back through the tunnel: rx +{}",
            rx1 - rx0
        );

        // Residency: the cn-shanghai service fails until its circuit opens;
        // requests held to that region are refused (403), never sent elsewhere.
        let others: Vec<u64> = ["vertex-openai", "azure-openai"]
            .iter()
            .map(|n| backend_requests(lab, n))
            .collect::<Result<_>>()?;
        backend(lab, "dashscope")?.fault(json!({"status": 503}))?;
        let mut refusal = None;
        for _ in 0..8 {
            let r = chat(lab, "aws", "/cn/v1/chat/completions", "stay in china", &[])?;
            if r.0 == 403 {
                refusal = Some(r);
                break;
            }
            ensure!(r.0 == 503, "a request to the failing region: {r:?}");
        }
        let (_, _, _, body) = refusal.context("no 403 while cn-shanghai's service was failing")?;
        ensure!(
            body.contains("residency") && body.contains("dashscope: circuit open"),
            "{body}"
        );
        let after: Vec<u64> = ["vertex-openai", "azure-openai"]
            .iter()
            .map(|n| backend_requests(lab, n))
            .collect::<Result<_>>()?;
        ensure!(
            after == others,
            "data left its region: {others:?} → {after:?}"
        );
        backend(lab, "dashscope")?.clear_fault()?;
        Ok(())
    })
}

fn backend<'a>(lab: &'a Lab, name: &str) -> Result<&'a ai::Backend> {
    lab.sites
        .iter()
        .find_map(|s| s.ai_backend.as_ref().filter(|b| b.name == name))
        .with_context(|| format!("no backend {name}"))
}

fn backend_requests(lab: &Lab, name: &str) -> Result<u64> {
    backend(lab, name)?.requests()
}
