//! The AI gateway on loopback, driven by real clients (curl and the official
//! `openai` Python package) against sample backends: streaming, failover, the
//! circuit breaker, residency, client keys, the open-proxy guards, the body
//! limit, metrics and SIGHUP reload. Loopback is not on a fabric, so these
//! upstreams are `public = true`; `lab_ai.rs` runs the same gateway over the
//! WireGuard mesh.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use skymesh_tests::agent::workspace_bin;
use skymesh_tests::ai::{self, Backend, ClientKey};
use skymesh_tests::proc::Spawned;
use skymesh_tests::{e2e, wait_until, TestEnv};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

struct Fixture {
    dir: PathBuf,
    config: PathBuf,
    controller: Option<Spawned>,
    api: String,
    url: String,
    admin_token: PathBuf,
    east: Backend,
    shanghai: Backend,
    west: Backend,
    app: ClientKey,
    slow: ClientKey,
    narrow: ClientKey,
    dead_port: u16,
    /// Config text placed before the `chat` route (routes match in order).
    leading: String,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Fixture {
    fn start(env: &TestEnv) -> Result<Self> {
        Self::start_with(env, String::new())
    }

    /// With `leading` (routes, upstreams, keys) ahead of the `chat` route.
    fn start_with(env: &TestEnv, leading: String) -> Result<Self> {
        let dir = env.dir.clone();
        let east = Backend::start(
            None,
            &dir,
            "east",
            local(ai::free_port()?),
            "gpt-4o-mini,text-embedding-3-small",
            false,
        )?;
        let shanghai = Backend::start(
            None,
            &dir,
            "shanghai",
            local(ai::free_port()?),
            "gpt-4o-mini,qwen-plus,text-embedding-3-small",
            true,
        )?;
        let west = Backend::start(
            None,
            &dir,
            "west",
            local(ai::free_port()?),
            "gpt-4o-mini",
            false,
        )?;
        let app = ai::create_key(&dir, "app", "*", 100_000)?;
        let slow = ai::create_key(&dir, "slow", "chat", 3)?;
        let narrow = ai::create_key(&dir, "narrow", "dashscope", 1000)?;
        let gw_port = ai::free_port()?;
        let api_port = ai::free_port()?;
        let dead_port = ai::free_port()?;
        let mut f = Self {
            config: dir.join("controller.toml"),
            admin_token: dir.join("admin.token"),
            api: format!("http://127.0.0.1:{api_port}"),
            url: format!("http://127.0.0.1:{gw_port}"),
            controller: None,
            dir,
            east,
            shanghai,
            west,
            app,
            slow,
            narrow,
            dead_port,
            leading,
        };
        std::fs::write(&f.config, f.config_text(gw_port, api_port, "chat-priority"))?;
        let bin = workspace_bin("skymesh-controller", "SKYMESH_CONTROLLER_BIN")?;
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--config", f.config.to_str().context("path")?]);
        let mut controller = Spawned::start("controller", cmd, &f.dir.join("controller.log"))?;
        let addr = local(gw_port);
        if wait_until(Duration::from_secs(15), || {
            std::net::TcpStream::connect(addr).is_ok()
        })
        .is_none()
        {
            controller.ensure_running()?;
            bail!("the gateway did not start:\n{}", controller.log());
        }
        f.controller = Some(controller);
        Ok(f)
    }

    fn log(&self) -> String {
        self.controller
            .as_ref()
            .map(Spawned::log)
            .unwrap_or_default()
    }

    fn config_text(&self, gw_port: u16, api_port: u16, chat: &str) -> String {
        let chat_order = match chat {
            "chat-priority" => "[\"east\", \"shanghai\", \"west\"]",
            _ => "[\"shanghai\", \"east\", \"west\"]",
        };
        let mut t = format!(
            r#"[control]
listen = "127.0.0.1:0"
advertise = ["127.0.0.1:7443"]

[api]
listen = "127.0.0.1:{api_port}"
admin_token_file = "{}"

[state]
data_dir = "{}"

[ai_gateway]
listen = "127.0.0.1:{gw_port}"
max_body_bytes = 65536

[ai_gateway.breaker]
failures = 2
open_for = "2s"

"#,
            self.dir.join("admin.token").display(),
            self.dir.join("data").display(),
        );
        t.push_str(&self.east.upstream_toml(
            "east",
            "eastasia",
            true,
            "models = [\"gpt-4o-mini\", \"text-embedding-3-small\"]\nfirst_byte_timeout = \"1s\"",
        ));
        t.push_str(&self.shanghai.upstream_toml(
            "shanghai",
            "cn-shanghai",
            true,
            "models = [\"gpt-4o-mini\", \"qwen-plus\", \"text-embedding-3-small\"]",
        ));
        t.push_str(&self.west.upstream_toml("west", "us-west1", true, ""));
        let ca = self
            .shanghai
            .ca_file
            .as_ref()
            .map(|c| c.display().to_string())
            .unwrap_or_default();
        t.push_str(&format!(
            r#"[[ai_gateway.upstreams]]
name = "dead"
site = "nowhere"
region = "us-west1"
base_url = "http://127.0.0.1:{dead}/v1"
public = true
connect_timeout = "500ms"

[[ai_gateway.upstreams]]
name = "shanghai-generic"
kind = "generic"
site = "shanghai"
region = "cn-shanghai"
base_url = "https://{sh}/api"
public = true
credential_file = "{cred}"
ca_file = "{ca}"

[[ai_gateway.upstreams]]
name = "metadata"
kind = "generic"
site = "cloud"
region = "us-west1"
base_url = "http://169.254.169.254/latest"
public = true
connect_timeout = "500ms"

{leading}
[[ai_gateway.routes]]
name = "chat"
path_prefix = "/v1"
strategy = "priority"
upstreams = {chat_order}

[[ai_gateway.routes]]
name = "dead-first"
path_prefix = "/dead/v1"
upstreams = ["dead", "west"]

[[ai_gateway.routes]]
name = "cn"
path_prefix = "/cn/v1"
upstreams = ["east", "shanghai"]
allowed_regions = ["cn-shanghai"]

[[ai_gateway.routes]]
name = "dashscope"
path_prefix = "/dashscope"
upstreams = ["shanghai-generic"]

[[ai_gateway.routes]]
name = "meta"
path_prefix = "/meta"
upstreams = ["metadata"]

"#,
            dead = self.dead_port,
            leading = self.leading,
            sh = self.shanghai.addr,
            cred = self.shanghai.key_file.display(),
        ));
        for k in [&self.app, &self.slow, &self.narrow] {
            t.push_str(&k.entry);
            t.push('\n');
        }
        t
    }

    fn chat_body(content: &str, stream: bool) -> String {
        json!({"model": "gpt-4o-mini", "stream": stream,
               "messages": [{"role": "user", "content": content}]})
        .to_string()
    }

    /// curl a POST to the gateway with `key`; returns (status, headers+body text).
    fn post(&self, key: &str, path: &str, body: &str, extra: &[&str]) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.url);
        let auth = format!("Authorization: Bearer {key}");
        let mut args = vec![
            "-i",
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        let out = ai::curl(None, &args)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((status_of(&text)?, text))
    }

    fn metrics(&self) -> Result<String> {
        let token = std::fs::read_to_string(&self.admin_token)?;
        let auth = format!("Authorization: Bearer {}", token.trim());
        let out = ai::curl(
            None,
            &["--fail", "-H", &auth, &format!("{}/metrics", self.api)],
        )?;
        ensure!(
            out.status.success(),
            "/metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn python(&self, script: &str, key: &str) -> Result<Value> {
        ai::run_python(
            None,
            script,
            &[
                ("OPENAI_BASE_URL", &format!("{}/v1", self.url)),
                ("OPENAI_API_KEY", key),
            ],
        )
    }

    fn sighup(&self) -> Result<()> {
        let pid = self.controller.as_ref().context("no controller")?.pid();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        Ok(())
    }
}

/// The status of the last response head in `curl -i` output.
fn status_of(text: &str) -> Result<u16> {
    ai::http_status(text).with_context(|| format!("no HTTP status in {text:?}"))
}

fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    ai::http_header(text, name)
}

/// A sample of `metric{labels}` in an exposition, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0.0)
}

const CLIENT: &str = r#"
import json, os, time
from openai import OpenAI
c = OpenAI(max_retries=0)
out = {}
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
out["content"] = r.choices[0].message.content
t0 = time.monotonic(); first = None; parts = []
for ch in c.chat.completions.create(model="gpt-4o-mini", stream=True,
        messages=[{"role": "user", "content": "one two three four five six"}]):
    if ch.choices and ch.choices[0].delta.content:
        if first is None:
            first = time.monotonic() - t0
        parts.append(ch.choices[0].delta.content)
out["stream"] = "".join(parts); out["first_s"] = first; out["total_s"] = time.monotonic() - t0
e = c.embeddings.create(model="text-embedding-3-small", input="hi")
out["embedding_len"] = len(e.data[0].embedding)
out["models"] = sorted(m.id for m in c.models.list())
print(json.dumps(out))
"#;

#[test]
fn openai_python_client_streams_through_the_gateway() -> Result<()> {
    e2e("ai-openai", |env| {
        let f = Fixture::start(env)?;
        // Slow the stream so "first chunk before the upstream finishes" is visible:
        // 6 words × 250 ms.
        f.east.fault(json!({"chunk_delay_ms": 250}))?;
        let v = f.python(CLIENT, &f.app.key)?;
        eprintln!("openai client: {v}");
        ensure!(v["content"] == "[east] echo: hello there", "{v}");
        ensure!(
            v["stream"] == "[east] echo: one two three four five six",
            "{v}"
        );
        let first = v["first_s"].as_f64().context("no first chunk")?;
        let total = v["total_s"].as_f64().context("no total")?;
        ensure!(
            total >= 1.5,
            "the stream took {total} s; the backend paces it over 2 s"
        );
        ensure!(
            first < total - 1.0,
            "first chunk after {first} s of {total} s: the gateway buffered the stream"
        );
        ensure!(v["embedding_len"] == 8, "{v}");
        let models: Vec<&str> = v["models"]
            .as_array()
            .context("models")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for m in ["gpt-4o-mini", "qwen-plus", "text-embedding-3-small"] {
            ensure!(models.contains(&m), "{m} missing from {models:?}");
        }
        // HTTP/2 (prior knowledge) works too.
        let out = ai::curl(
            None,
            &[
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                "-H",
                &format!("Authorization: Bearer {}", f.app.key),
                "-H",
                "content-type: application/json",
                "-d",
                &Fixture::chat_body("h2", false),
                &format!("{}/v1/chat/completions", f.url),
            ],
        )?;
        ensure!(
            String::from_utf8_lossy(&out.stdout) == "2 200",
            "h2: {:?} {}",
            out.stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
}

#[test]
fn failover_on_5xx_429_timeout_and_connect_error() -> Result<()> {
    e2e("ai-failover", |env| {
        let f = Fixture::start(env)?;
        let body = Fixture::chat_body("hi", false);
        for (fault, what) in [
            (json!({"status": 503, "times": 1}), "503"),
            (json!({"status": 429, "times": 1}), "429"),
            (
                json!({"delay_ms": 2500, "times": 1}),
                "no head within first_byte_timeout (1s)",
            ),
        ] {
            f.east.fault(fault)?;
            let (status, text) = f.post(&f.app.key, "/v1/chat/completions", &body, &[])?;
            ensure!(status == 200, "{what}: {text}");
            ensure!(
                header(&text, "x-skymesh-upstream") == Some("shanghai"),
                "{what}: {text}"
            );
            ensure!(text.contains("[shanghai] echo: hi"), "{what}: {text}");
            f.east.clear_fault()?;
            // A success closes the count again, so the breaker stays shut.
            let (status, text) = f.post(&f.app.key, "/v1/chat/completions", &body, &[])?;
            ensure!(
                status == 200 && header(&text, "x-skymesh-upstream") == Some("east"),
                "{text}"
            );
        }
        // Nothing listens on dead's port: connection refused → next upstream.
        let (status, text) = f.post(&f.app.key, "/dead/v1/chat/completions", &body, &[])?;
        ensure!(
            status == 200 && header(&text, "x-skymesh-upstream") == Some("west"),
            "{text}"
        );
        let m = f.metrics()?;
        ensure!(
            sample(&m, "skymesh_ai_failovers_total{route=\"chat\"}") == 3.0,
            "{m}"
        );
        ensure!(
            sample(&m, "skymesh_ai_failovers_total{route=\"dead-first\"}") == 1.0,
            "{m}"
        );
        ensure!(
            sample(
                &m,
                "skymesh_ai_requests_total{route=\"chat\",upstream=\"shanghai\",code=\"200\"}"
            ) == 3.0,
            "{m}"
        );
        // Every upstream failing: the client gets the last one's answer, not a hang.
        for b in [&f.east, &f.shanghai, &f.west] {
            b.fault(json!({"status": 500, "times": 1}))?;
        }
        let (status, text) = f.post(&f.app.key, "/v1/chat/completions", &body, &[])?;
        ensure!(status == 500, "{text}");
        Ok(())
    })
}

#[test]
fn circuit_breaker_opens_and_a_half_open_probe_closes_it() -> Result<()> {
    e2e("ai-breaker", |env| {
        let f = Fixture::start(env)?;
        let body = Fixture::chat_body("hi", false);
        f.east.fault(json!({"status": 502}))?;
        // failures = 2: two failed attempts open east's circuit.
        for _ in 0..2 {
            let (status, text) = f.post(&f.app.key, "/v1/chat/completions", &body, &[])?;
            ensure!(
                status == 200 && header(&text, "x-skymesh-upstream") == Some("shanghai"),
                "{text}"
            );
        }
        let m = f.metrics()?;
        ensure!(
            sample(&m, "skymesh_ai_circuit_open{upstream=\"east\"}") == 1.0,
            "{m}"
        );
        ensure!(
            sample(&m, "skymesh_ai_upstream_up{upstream=\"east\"}") == 0.0,
            "{m}"
        );
        let seen = f.east.requests()?;
        // While open, east gets nothing and no request pays for trying it.
        for _ in 0..5 {
            let (status, text) = f.post(&f.app.key, "/v1/chat/completions", &body, &[])?;
            ensure!(
                status == 200 && header(&text, "x-skymesh-upstream") == Some("shanghai"),
                "{text}"
            );
        }
        ensure!(
            f.east.requests()? == seen,
            "east was tried while its circuit was open"
        );
        // After open_for (2 s) one request probes east; it has recovered.
        f.east.clear_fault()?;
        std::thread::sleep(Duration::from_millis(2200));
        let (status, text) = f.post(&f.app.key, "/v1/chat/completions", &body, &[])?;
        ensure!(
            status == 200 && header(&text, "x-skymesh-upstream") == Some("east"),
            "{text}"
        );
        ensure!(
            f.east.requests()? == seen + 1,
            "the probe did not reach east"
        );
        let m = f.metrics()?;
        ensure!(
            sample(&m, "skymesh_ai_circuit_open{upstream=\"east\"}") == 0.0,
            "{m}"
        );
        ensure!(
            sample(&m, "skymesh_ai_upstream_up{upstream=\"east\"}") == 1.0,
            "{m}"
        );
        Ok(())
    })
}

const BROKEN_STREAM: &str = r#"
import json
from openai import OpenAI
c = OpenAI(max_retries=0)
n = 0; text = ""
try:
    for ch in c.chat.completions.create(model="gpt-4o-mini", stream=True,
            messages=[{"role": "user", "content": "one two three four five six"}]):
        if ch.choices and ch.choices[0].delta.content:
            n += 1; text += ch.choices[0].delta.content
    print(json.dumps({"raised": None, "chunks": n, "text": text}))
except Exception as e:
    print(json.dumps({"raised": type(e).__name__, "message": str(e), "chunks": n}))
"#;

#[test]
fn a_mid_stream_failure_reaches_the_client_as_an_error() -> Result<()> {
    e2e("ai-midstream", |env| {
        let f = Fixture::start(env)?;
        let before = f.shanghai.requests()?;
        f.east.fault(json!({"drop_after_chunks": 2}))?;
        let v = f.python(BROKEN_STREAM, &f.app.key)?;
        eprintln!("openai client on a broken stream: {v}");
        ensure!(
            v["raised"].as_str().is_some(),
            "the stream ended as if complete: {v}"
        );
        ensure!(
            v["message"].as_str().unwrap_or("").contains("mid-stream"),
            "{v}"
        );
        ensure!(v["chunks"] == 2, "{v}");
        // curl sees the SSE error event and a transfer that did not end cleanly.
        let out = ai::curl(
            None,
            &[
                "-N",
                "-H",
                &format!("Authorization: Bearer {}", f.app.key),
                "-H",
                "content-type: application/json",
                "-d",
                &Fixture::chat_body("one two three four", true),
                &format!("{}/v1/chat/completions", f.url),
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(!out.status.success(), "curl saw a clean end: {text}");
        ensure!(
            text.contains("event: error") && !text.contains("[DONE]"),
            "{text}"
        );
        // Non-streaming: the body is cut, and curl says so.
        let out = ai::curl(
            None,
            &[
                "-H",
                &format!("Authorization: Bearer {}", f.app.key),
                "-H",
                "content-type: application/json",
                "-d",
                &Fixture::chat_body("one two three four", false),
                &format!("{}/v1/chat/completions", f.url),
            ],
        )?;
        ensure!(
            !out.status.success(),
            "a cut JSON body looked complete: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Bytes had reached the client: no failover may replay the request.
        ensure!(
            f.shanghai.requests()? == before,
            "a request was replayed after bytes reached the client"
        );
        Ok(())
    })
}

#[test]
fn residency_refuses_rather_than_sending_data_elsewhere() -> Result<()> {
    e2e("ai-residency", |env| {
        let f = Fixture::start(env)?;
        let body = Fixture::chat_body("secret data", false);
        // The header narrows the route to one region.
        let (status, text) = f.post(
            &f.app.key,
            "/v1/chat/completions",
            &body,
            &["-H", "x-skymesh-residency: cn-shanghai"],
        )?;
        ensure!(
            status == 200 && header(&text, "x-skymesh-upstream") == Some("shanghai"),
            "{text}"
        );
        // The route `cn` allows cn-shanghai only, though east comes first.
        let (status, text) = f.post(&f.app.key, "/cn/v1/chat/completions", &body, &[])?;
        ensure!(
            status == 200 && header(&text, "x-skymesh-region") == Some("cn-shanghai"),
            "{text}"
        );
        // The only allowed upstream fails until its circuit opens: 403, not east.
        f.shanghai.fault(json!({"status": 503}))?;
        for _ in 0..2 {
            f.post(&f.app.key, "/cn/v1/chat/completions", &body, &[])?;
        }
        let east_before = f.east.requests()?;
        let (status, text) = f.post(&f.app.key, "/cn/v1/chat/completions", &body, &[])?;
        ensure!(status == 403, "{text}");
        ensure!(
            text.contains("residency")
                && text.contains("shanghai: circuit open")
                && text.contains("east: region eastasia is not allowed"),
            "{text}"
        );
        let (status, text) = f.post(
            &f.app.key,
            "/v1/chat/completions",
            &body,
            &["-H", "x-skymesh-residency: cn-shanghai"],
        )?;
        ensure!(status == 403, "{text}");
        ensure!(
            f.east.requests()? == east_before,
            "data went to a region the client excluded"
        );
        // A malformed header is a 400 that names it.
        let (status, text) = f.post(
            &f.app.key,
            "/v1/chat/completions",
            &body,
            &["-H", "x-skymesh-residency: eu;drop"],
        )?;
        ensure!(
            status == 400 && text.contains("x-skymesh-residency"),
            "{text}"
        );
        // The refusal is audited.
        ensure!(
            wait_until(Duration::from_secs(2), || f
                .log()
                .contains("residency_unavailable")
                || f.log().contains("no upstream is both allowed"))
            .is_some(),
            "no audit line for the refusal"
        );
        Ok(())
    })
}

#[test]
fn upstream_connections_are_pooled_and_reused() -> Result<()> {
    e2e("ai-pool", |env| {
        let f = Fixture::start(env)?;
        // The gateway serves on one thread per core, each with its own pools.
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get().min(8)) as u64;
        let (east0, shanghai0) = (f.east.connections()?, f.shanghai.connections()?);
        for i in 0..30 {
            // east over HTTP/1.1, shanghai (the cn route) over TLS with h2;
            // every third request streams.
            let path = if i % 2 == 0 {
                "/v1/chat/completions"
            } else {
                "/cn/v1/chat/completions"
            };
            let stream = i % 3 == 0;
            let body = Fixture::chat_body(&format!("pool {i}"), stream);
            let (status, text) = f.post(&f.app.key, path, &body, &[])?;
            let whole = if stream {
                text.contains("data: [DONE]")
            } else {
                text.contains(&format!("pool {i}"))
            };
            ensure!(status == 200 && whole, "request {i} to {path}: {text}");
        }
        // Each stats call is a connection of its own; the second one counts.
        let east = f.east.connections()? - east0 - 1;
        let shanghai = f.shanghai.connections()? - shanghai0 - 1;
        ensure!(
            (1..=shards).contains(&east) && (1..=shards).contains(&shanghai),
            "30 requests over {shards} shard(s) opened {east} connection(s) to east and {shanghai} to shanghai; \
             expected 1 to {shards} each (one pool per shard)"
        );
        eprintln!("30 requests: {east} connection(s) to east (HTTP/1.1), {shanghai} to shanghai (h2), {shards} shard(s)");
        Ok(())
    })
}

/// The open client connections of each gateway shard, from the gauge.
fn shard_connections(metrics: &str) -> Vec<f64> {
    (0..)
        .map(|i| format!("skymesh_ai_client_connections{{shard=\"{i}\"}}"))
        .map_while(|series| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|r| r.trim().parse().ok())
        })
        .collect()
}

#[test]
fn client_connections_are_spread_over_the_shards() -> Result<()> {
    e2e("ai-shards", |env| {
        let f = Fixture::start(env)?;
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        // One connection after another, each kept open after its answer, as a
        // pool of keep-alive clients holds them. Whichever shard wakes first
        // accepts; the balancer must still give every shard its share.
        let n = 4 * shards;
        let addr: SocketAddr = f.url.trim_start_matches("http://").parse()?;
        let mut open = Vec::new();
        for i in 0..n {
            let mut c = std::net::TcpStream::connect(addr)?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                c,
                "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\r\n",
                f.app.key
            )?;
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("gpt-4o-mini") {
                let k = c.read(&mut buf)?;
                ensure!(
                    k > 0,
                    "connection {i} closed before its answer: {:?}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&buf[..k]);
            }
            ensure!(
                got.starts_with(b"HTTP/1.1 200"),
                "connection {i}: {}",
                String::from_utf8_lossy(&got)
            );
            open.push(c);
        }
        let per_shard = shard_connections(&f.metrics()?);
        eprintln!("{n} keep-alive connections over {shards} shard(s): {per_shard:?}");
        ensure!(
            per_shard.len() == shards,
            "expected the gauge for {shards} shard(s), got {per_shard:?}"
        );
        let (lo, hi) = per_shard
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        ensure!(
            per_shard.iter().sum::<f64>() == n as f64 && hi - lo <= 1.0,
            "{n} connections should be spread evenly over {shards} shard(s), got {per_shard:?}"
        );
        // Closed connections leave the count.
        drop(open);
        let drained = wait_until(Duration::from_secs(10), || {
            f.metrics()
                .ok()
                .map(|m| shard_connections(&m))
                .is_some_and(|v| v.iter().all(|&x| x == 0.0))
        });
        ensure!(
            drained.is_some(),
            "the gauge did not return to 0 after the clients left"
        );
        Ok(())
    })
}

/// curl a POST of exactly `body` (no newline stripped) with `headers`.
fn post_raw(
    f: &Fixture,
    key: &str,
    path: &str,
    body: &[u8],
    headers: &[&str],
) -> Result<(u16, String)> {
    let file = f.dir.join("body.bin");
    std::fs::write(&file, body)?;
    let auth = format!("Authorization: Bearer {key}");
    let data = format!("@{}", file.display());
    let url = format!("{}{path}", f.url);
    let mut args = vec!["-i", "-H", &auth, "--data-binary", &data];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let out = ai::curl(None, &args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok((status_of(&text)?, text))
}

/// A model whose route allows only cn-shanghai must never reach another
/// region, nor a route the key may not use, whatever the body's spelling:
/// the gateway routes on exactly the model the upstream reads, and refuses
/// a body it cannot read one way.
#[test]
fn the_model_is_read_exactly_as_the_upstream_reads_it() -> Result<()> {
    e2e("ai-model", |env| {
        let chat_only = ai::create_key(&env.dir, "chatonly", "chat", 100_000)?;
        let leading = format!(
            r#"[[ai_gateway.routes]]
name = "qwen-cn"
path_prefix = "/v1"
models = ["qwen-plus"]
upstreams = ["shanghai"]
allowed_regions = ["cn-shanghai"]

{}
"#,
            chat_only.entry
        );
        let f = Fixture::start_with(env, leading)?;
        let json = ["content-type: application/json"];
        let read: &[(&str, &[u8])] = &[
            ("plain", br#"{"model":"qwen-plus","messages":[{"role":"user","content":"secret"}]}"#),
            ("leading space", br#" {"model":"qwen-plus","messages":[]}"#),
            ("leading newline", b"\n{\"model\":\"qwen-plus\",\"messages\":[]}"),
            ("all whitespace", b"\r\n\t {\r\n\"model\"\t:\n\"qwen-plus\" ,\"messages\":[] }\r\n"),
            ("model last", br#"{"messages":[{"role":"user","content":"secret"}],"stream":false,"model":"qwen-plus"}"#),
            ("escaped value", br#"{"model":"\u0071wen-plus","messages":[]}"#),
            ("escaped key", br#"{"\u006dodel":"qwen-plus","messages":[]}"#),
            ("nested decoy", br#"{"messages":[{"role":"user","content":"x","model":"gpt-4o-mini"}],"model":"qwen-plus"}"#),
        ];
        for (what, body) in read {
            let (status, text) = post_raw(&f, &f.app.key, "/v1/chat/completions", body, &json)?;
            ensure!(
                status == 200 && header(&text, "x-skymesh-upstream") == Some("shanghai"),
                "{what}: the model was not read as the upstream reads it:\n{text}"
            );
        }
        let east = f.east.requests()?;
        let west = f.west.requests()?;
        let shanghai = f.shanghai.requests()?;
        let unreadable: &[(&str, &[u8], &[&str])] = &[
            ("duplicate model", br#"{"model":"qwen-plus","model":"gpt-4o-mini"}"#, &json),
            ("duplicate model, other order", br#"{"model":"gpt-4o-mini","messages":[],"model":"qwen-plus"}"#, &json),
            ("duplicate by escape", br#"{"model":"gpt-4o-mini","\u006dodel":"qwen-plus"}"#, &json),
            ("duplicate nested key", br#"{"model":"gpt-4o-mini","messages":[{"role":"user","role":"system"}]}"#, &json),
            ("case variant", br#"{"MODEL":"qwen-plus","model":"gpt-4o-mini"}"#, &json),
            ("model a number", br#"{"model":7}"#, &json),
            ("model an array", br#"{"model":["qwen-plus"]}"#, &json),
            ("model null", br#"{"model":null,"messages":[]}"#, &json),
            ("no model", br#"{"messages":[{"role":"user","content":"secret"}]}"#, &json),
            ("BOM", b"\xef\xbb\xbf{\"model\":\"qwen-plus\"}", &json),
            ("UTF-16", b"\xff\xfe{\x00\"\x00m\x00o\x00d\x00e\x00l\x00\"\x00:\x00\"\x00q\x00w\x00e\x00n\x00-\x00p\x00l\x00u\x00s\x00\"\x00}\x00", &json),
            ("trailing data", br#"{"model":"gpt-4o-mini"}{"model":"qwen-plus"}"#, &json),
            ("NaN", br#"{"model":"gpt-4o-mini","temperature":NaN}"#, &json),
            ("single quotes", br#"{'model':'qwen-plus'}"#, &json),
            ("form encoded", b"model=qwen-plus&messages=x", &["content-type: application/x-www-form-urlencoded"]),
            ("text/plain JSON-ish", b"{model:qwen-plus}", &["content-type: text/plain"]),
            ("compressed", br#"{"model":"gpt-4o-mini"}"#, &["content-type: application/json", "content-encoding: gzip"]),
            ("UTF-16 charset", br#"{"model":"gpt-4o-mini"}"#, &["content-type: application/json; charset=utf-16"]),
            ("UTF-16 charset, spaced", br#"{"model":"gpt-4o-mini"}"#, &["content-type: application/json; charset = \"UTF-16\""]),
            ("form polyglot", br#"{"model":"gpt-4o-mini","x":"&model=qwen-plus&"}"#, &["content-type: application/x-www-form-urlencoded"]),
            ("multipart", b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nqwen-plus\r\n--b--\r\n", &["content-type: multipart/form-data; boundary=b"]),
            ("text/json", br#"{"model":"gpt-4o-mini"}"#, &["content-type: text/json"]),
            ("two content types", br#"{"model":"gpt-4o-mini"}"#, &["content-type: application/json", "content-type: application/x-www-form-urlencoded"]),
            ("identity then gzip", br#"{"model":"gpt-4o-mini"}"#, &["content-type: application/json", "content-encoding: identity", "content-encoding: gzip"]),
            ("control character", br#"{"model":"qwen-plus\u0000"}"#, &json),
        ];
        for (what, body, headers) in unreadable {
            let (status, text) = post_raw(&f, &f.app.key, "/v1/chat/completions", body, headers)?;
            ensure!(
                status == 400 && text.contains("unreadable_body"),
                "{what}: an ambiguous body was not refused with 400:\n{text}"
            );
        }
        // The model also travels in the query and the path; every place is
        // read, and places that disagree are refused.
        for (what, path, body) in [
            (
                "query disagrees",
                "/v1/chat/completions?model=qwen-plus",
                &br#"{"model":"gpt-4o-mini"}"#[..],
            ),
            (
                "two query models",
                "/v1/chat/completions?model=gpt-4o-mini&MODEL=qwen-plus",
                br#"{"model":"gpt-4o-mini"}"#,
            ),
            (
                "deployment disagrees",
                "/v1/openai/deployments/qwen-plus/chat/completions",
                br#"{"model":"gpt-4o-mini"}"#,
            ),
            (
                "engine disagrees",
                "/v1/engines/qwen-plus/chat/completions",
                br#"{"model":"gpt-4o-mini"}"#,
            ),
            (
                "Vertex model disagrees",
                "/v1/models/qwen-plus:generateContent",
                br#"{"model":"gpt-4o-mini"}"#,
            ),
            ("no model, empty body", "/v1/chat/completions", b""),
        ] {
            let (status, text) = post_raw(&f, &f.app.key, path, body, &json)?;
            ensure!(
                status == 400 && text.contains("unreadable_body"),
                "{what}: not refused with 400:\n{text}"
            );
        }
        ensure!(
            f.east.requests()? == east
                && f.west.requests()? == west
                && f.shanghai.requests()? == shanghai,
            "a refused body reached an upstream"
        );
        // A model named only in the query or the path is routed by it.
        for path in [
            "/v1/chat/completions?model=qwen-plus",
            "/v1/engines/qwen-plus/chat/completions",
            "/V1/chat/completions?model=qwen-plus",
        ] {
            let (_, text) = post_raw(&f, &f.app.key, path, b"", &json)?;
            ensure!(
                header(&text, "x-skymesh-upstream") == Some("shanghai"),
                "{path}: not routed by its model:\n{text}"
            );
        }
        // Case in the path and the model does not move it off its route.
        for (path, body) in [
            (
                "/V1/chat/completions",
                &br#"{"model":"qwen-plus","messages":[]}"#[..],
            ),
            (
                "/v1/chat/completions",
                br#"{"model":"QWEN-PLUS","messages":[]}"#,
            ),
            (
                "/v1/chat/completions",
                br#"{"model":" qwen-plus ","messages":[]}"#,
            ),
        ] {
            let (_, text) = post_raw(&f, &f.app.key, path, body, &json)?;
            ensure!(
                header(&text, "x-skymesh-upstream") == Some("shanghai"),
                "{path} {}: left its route:\n{text}",
                String::from_utf8_lossy(body)
            );
        }
        // A model a route holds to cn-shanghai is held there on every route:
        // `dead-first` (us-west1) refuses it rather than send it west.
        let (status, text) = post_raw(
            &f,
            &f.app.key,
            "/dead/v1/chat/completions",
            br#"{"model":"qwen-plus","messages":[]}"#,
            &json,
        )?;
        ensure!(status == 403 && text.contains("residency"), "{text}");
        ensure!(
            f.east.requests()? == east && f.west.requests()? == west,
            "qwen-plus data left cn-shanghai"
        );
        // A key that may use only `chat` cannot reach qwen-cn's upstream, nor
        // get a qwen-plus request served by chat's upstreams.
        for body in [
            &br#" {"model":"qwen-plus","messages":[]}"#[..],
            br#"{"model":"qwen-plus","messages":[]}"#,
        ] {
            let (status, text) = post_raw(&f, &chat_only.key, "/v1/chat/completions", body, &json)?;
            ensure!(
                status == 403 && text.contains("route_not_allowed"),
                "a chat-only key got past its routes:\n{text}"
            );
        }
        ensure!(
            f.east.requests()? == east,
            "qwen-plus data reached eastasia"
        );
        let (status, text) = post_raw(
            &f,
            &chat_only.key,
            "/v1/chat/completions",
            br#" {"model":"gpt-4o-mini","messages":[]}"#,
            &json,
        )?;
        ensure!(
            status == 200 && header(&text, "x-skymesh-upstream") == Some("east"),
            "{text}"
        );
        Ok(())
    })
}

/// An upstream that answers 101 (a protocol switch the gateway does not
/// relay) gets the client a 502 that says so, not an empty reply.
#[test]
fn an_upstream_protocol_switch_is_a_502() -> Result<()> {
    e2e("ai-101", |env| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&seen).into_owned();
                let answer: &[u8] = if head.contains(" /x/nocontent") {
                    b"HTTP/1.1 204 No Content\r\nContent-Length: 120\r\n\r\n"
                } else if head.contains(" /x/both") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{\"answer\":1}\r\n0\r\n\r\n"
                } else {
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                };
                let _ = conn.write_all(answer);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let leading = format!(
            r#"[[ai_gateway.upstreams]]
name = "switcher"
kind = "generic"
site = "lab"
region = "us-west1"
base_url = "http://127.0.0.1:{port}/x"
public = true

[[ai_gateway.routes]]
name = "switch"
path_prefix = "/switch"
upstreams = ["switcher"]
"#
        );
        let f = Fixture::start_with(env, leading)?;
        let (status, text) = post_raw(
            &f,
            &f.app.key,
            "/switch/ws",
            b"{}",
            &["upgrade: websocket", "connection: upgrade"],
        )?;
        ensure!(
            status == 502 && text.contains("101") && text.contains("switcher"),
            "{text}"
        );
        // The upstream's framing is not relayed: a 204 with a length, and a
        // length beside chunking, reach the client whole and well framed.
        let (status, text) = post_raw(&f, &f.app.key, "/switch/nocontent", b"{}", &[])?;
        ensure!(status == 204, "{text}");
        let (status, text) = post_raw(&f, &f.app.key, "/switch/both", b"{}", &[])?;
        ensure!(
            status == 200 && text.ends_with("{\"answer\":1}"),
            "{text:?}"
        );
        Ok(())
    })
}

#[test]
fn keys_are_checked_limited_and_scoped() -> Result<()> {
    e2e("ai-keys", |env| {
        let f = Fixture::start(env)?;
        let body = Fixture::chat_body("hi", false);
        let url = format!("{}/v1/chat/completions", f.url);
        let out = ai::curl(
            None,
            &[
                "-i",
                "-H",
                "content-type: application/json",
                "-d",
                &body,
                &url,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            status_of(&text)? == 401 && text.contains("missing_api_key"),
            "{text}"
        );
        let (status, text) = f.post("sk-skymesh-not-a-key", "/v1/chat/completions", &body, &[])?;
        ensure!(status == 401 && text.contains("invalid_api_key"), "{text}");
        // `slow` may send 3 requests a minute.
        for i in 0..3 {
            let (status, text) = f.post(&f.slow.key, "/v1/chat/completions", &body, &[])?;
            ensure!(status == 200, "request {i}: {text}");
        }
        let (status, text) = f.post(&f.slow.key, "/v1/chat/completions", &body, &[])?;
        ensure!(
            status == 429 && header(&text, "retry-after").is_some(),
            "{text}"
        );
        // The openai package surfaces both as its typed errors.
        let script = r#"
import json, openai
c = openai.OpenAI(max_retries=0)
try:
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    print(json.dumps({"error": None}))
except openai.APIStatusError as e:
    print(json.dumps({"error": type(e).__name__, "status": e.status_code}))
"#;
        let v = f.python(script, &f.slow.key)?;
        ensure!(v["error"] == "RateLimitError" && v["status"] == 429, "{v}");
        let v = f.python(script, "sk-wrong")?;
        ensure!(
            v["error"] == "AuthenticationError" && v["status"] == 401,
            "{v}"
        );
        // `narrow` may use dashscope only.
        let (status, text) = f.post(&f.narrow.key, "/v1/chat/completions", &body, &[])?;
        ensure!(
            status == 403 && text.contains("may not use route chat"),
            "{text}"
        );
        Ok(())
    })
}

#[test]
fn no_open_proxy_and_credentials_stay_secret() -> Result<()> {
    e2e("ai-guard", |env| {
        let f = Fixture::start(env)?;
        let auth = format!("Authorization: Bearer {}", f.narrow.key);
        // Generic pass-through: the path after the prefix lands under the base
        // path; the upstream's credential replaces the client's key.
        let out = ai::curl(
            None,
            &[
                "-H",
                &auth,
                "-H",
                "Host: 169.254.169.254",
                "-d",
                "{\"input\":1}",
                &format!(
                    "{}/dashscope/services/aigc/text-generation/generation?x=1",
                    f.url
                ),
            ],
        )?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
        ensure!(
            v["backend"] == "shanghai"
                && v["path"] == "/api/services/aigc/text-generation/generation",
            "{v}"
        );
        ensure!(
            v["auth"] == "ok",
            "the upstream credential was not injected: {v}"
        );
        // An absolute-form target cannot pick the host either.
        let out = ai::curl(
            None,
            &[
                "-H",
                &auth,
                "--request-target",
                "http://169.254.169.254/dashscope/x",
                &format!("{}/dashscope/x", f.url),
            ],
        )?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
        ensure!(v["backend"] == "shanghai" && v["path"] == "/api/x", "{v}");
        // Dot segments and encoded separators are refused.
        let before = f.shanghai.requests()?;
        for path in [
            "/dashscope/../v1/models",
            "/dashscope/%2e%2e/x",
            "/dashscope//x",
            "/dashscope/..;/v1/models",
            "/dashscope/..;x=1/v1",
            "/dashscope/%252e%252e/x",
            "/dashscope/%25252e%25252e/x",
            "/dashscope/%c0%ae%c0%ae/x",
            "/dashscope/%e0%80%ae%e0%80%ae/x",
            "/dashscope/%ef%bc%8e%ef%bc%8e/x",
            "/dashscope/x%00",
            "/dashscope/%00/../x",
            "/dashscope/%2e%2e%2fx",
            "/dashscope/.%2e/x",
            "/dashscope/%5c..%5cx",
            "/dashscope/..%20/x",
            "/dashscope/x%0d%0aHost:%20evil",
            "/dashscope/x%3f/y",
            "/dashscope/%zz",
        ] {
            let out = ai::curl(
                None,
                &[
                    "-i",
                    "--path-as-is",
                    "-H",
                    &auth,
                    &format!("{}{path}", f.url),
                ],
            )?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(status_of(&text)? == 400, "{path}: {text}");
        }
        ensure!(
            f.shanghai.requests()? == before,
            "a refused path reached the upstream"
        );
        // What is forwarded is the one decoded, canonical spelling.
        let out = ai::curl(
            None,
            &[
                "--path-as-is",
                "-H",
                &auth,
                "-d",
                "{}",
                &format!("{}/dashscope/models/qwen%2dplus/%7bx%7d", f.url),
            ],
        )?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
        ensure!(v["path"] == "/api/models/qwen-plus/%7Bx%7D", "{v}");
        // Even an operator's upstream cannot point at the metadata service.
        let app = format!("Authorization: Bearer {}", f.app.key);
        let out = ai::curl(
            None,
            &["-i", "-H", &app, &format!("{}/meta/meta-data/iam", f.url)],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            status_of(&text)? == 502
                && text.contains("169.254.169.254")
                && text.contains("metadata"),
            "{text}"
        );
        // The body limit.
        let big = format!(
            "{{\"model\":\"gpt-4o-mini\",\"pad\":\"{}\"}}",
            "x".repeat(70_000)
        );
        let (status, text) = f.post(&f.app.key, "/v1/chat/completions", &big, &[])?;
        ensure!(status == 413 && text.contains("max_body_bytes"), "{text}");
        // Neither the upstream credentials nor client keys reach the log.
        let log = f.log();
        for secret in [
            std::fs::read_to_string(&f.shanghai.key_file)?,
            std::fs::read_to_string(&f.east.key_file)?,
        ] {
            ensure!(!log.contains(secret.trim()), "a credential is in the log");
        }
        for k in [&f.app.key, &f.narrow.key] {
            ensure!(!log.contains(k.as_str()), "a client key is in the log");
        }
        ensure!(log.contains("skymesh_ai_audit"), "no audit lines:\n{log}");
        Ok(())
    })
}

#[test]
fn sighup_reloads_without_dropping_in_flight_requests() -> Result<()> {
    e2e("ai-reload", |env| {
        let f = Fixture::start(env)?;
        // A 3-second stream is in flight during the reload.
        f.east.fault(json!({"chunk_delay_ms": 500, "times": 1}))?;
        let url = format!("{}/v1/chat/completions", f.url);
        let auth = format!("Authorization: Bearer {}", f.app.key);
        let body = Fixture::chat_body("one two three four five", true);
        let child = ai::command(
            None,
            "curl",
            &[
                "-sS",
                "-N",
                "-H",
                &auth,
                "-H",
                "content-type: application/json",
                "-d",
                &body,
                &url,
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
        std::thread::sleep(Duration::from_millis(800));
        // Reload: shanghai now comes first on `chat`.
        let (gw_port, api_port) = (port_of(&f.url)?, port_of(&f.api)?);
        std::fs::write(
            &f.config,
            f.config_text(gw_port, api_port, "chat-shanghai-first"),
        )?;
        f.sighup()?;
        ensure!(
            wait_until(Duration::from_secs(5), || f
                .log()
                .contains("[ai_gateway] reloaded"))
            .is_some(),
            "no reload logged:\n{}",
            f.log()
        );
        let (status, text) = f.post(
            &f.app.key,
            "/v1/chat/completions",
            &Fixture::chat_body("after", false),
            &[],
        )?;
        ensure!(
            status == 200 && header(&text, "x-skymesh-upstream") == Some("shanghai"),
            "{text}"
        );
        let started = Instant::now();
        let out = child.wait_with_output()?;
        let streamed = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && streamed.contains("[DONE]"),
            "the in-flight stream broke on reload: {streamed}"
        );
        ensure!(streamed.contains("five"), "{streamed}");
        eprintln!(
            "in-flight stream finished {:?} after the reload",
            started.elapsed()
        );
        // A broken file is refused; the gateway keeps serving the last config.
        std::fs::write(&f.config, "[control]\nadvertise = []\n")?;
        f.sighup()?;
        ensure!(
            wait_until(Duration::from_secs(5), || f
                .log()
                .contains("keeping the running config"))
            .is_some(),
            "{}",
            f.log()
        );
        let (status, _) = f.post(
            &f.app.key,
            "/v1/chat/completions",
            &Fixture::chat_body("still", false),
            &[],
        )?;
        ensure!(
            status == 200,
            "the gateway stopped serving after a bad reload"
        );
        Ok(())
    })
}

fn port_of(url: &str) -> Result<u16> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("port")
}

#[test]
fn metrics_pass_promtool() -> Result<()> {
    if !skymesh_tests::require_tool("promtool") {
        return Ok(());
    }
    e2e("ai-metrics", |env| {
        let f = Fixture::start(env)?;
        let (status, _) = f.post(
            &f.app.key,
            "/v1/chat/completions",
            &Fixture::chat_body("hi", false),
            &[],
        )?;
        ensure!(status == 200);
        let m = f.metrics()?;
        for series in [
            "skymesh_ai_requests_total{route=\"chat\",upstream=\"east\",code=\"200\"} 1",
            "skymesh_ai_request_duration_seconds_count{route=\"chat\",upstream=\"east\"} 1",
            "skymesh_ai_ttfb_seconds_count{route=\"chat\",upstream=\"east\"} 1",
            "skymesh_ai_upstream_up{upstream=\"east\"} 1",
            "skymesh_ai_circuit_open{upstream=\"shanghai\"} 0",
            "skymesh_controller_nodes 0",
        ] {
            ensure!(m.contains(series), "{series} missing:\n{m}");
        }
        let out = skymesh_tests::proc::output_with_stdin(
            Command::new("promtool").args(["check", "metrics"]),
            m.as_bytes(),
        )?;
        ensure!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
}
