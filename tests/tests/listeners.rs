//! The controller's TCP listeners (the REST API and the AI gateway) against
//! clients that hold connections without asking anything, trickle a request,
//! or sit idle: each is closed on its deadline, the connection cap holds, and
//! an operator's request still succeeds while an attacker holds the maximum.
//! The real `skymesh-controller` binary on loopback.

use anyhow::{bail, ensure, Context, Result};
use skymesh_tests::agent::workspace_bin;
use skymesh_tests::ai;
use skymesh_tests::proc::Spawned;
use skymesh_tests::{e2e, wait_until, TestEnv};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

struct Controller {
    proc: Spawned,
    api: SocketAddr,
    gateway: SocketAddr,
    token: String,
    key: String,
}

/// A controller whose gateway has a small connection cap and short client
/// deadlines; the REST API keeps its built-in defaults.
fn start(env: &TestEnv) -> Result<Controller> {
    let dir = &env.dir;
    let key = ai::create_key(dir, "app", "*", 100_000)?;
    let api = SocketAddr::from(([127, 0, 0, 1], ai::free_port()?));
    let gateway = SocketAddr::from(([127, 0, 0, 1], ai::free_port()?));
    let dead = ai::free_port()?;
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            r#"[control]
listen = "127.0.0.1:0"
advertise = ["127.0.0.1:7443"]

[api]
listen = "{api}"
admin_token_file = "{token}"

[state]
data_dir = "{data}"

[ai_gateway]
listen = "{gateway}"
max_body_bytes = 65536
max_buffered_bytes = 131072
max_client_connections = 16
client_header_timeout = "2s"
client_idle_timeout = "3s"
client_body_timeout = "2s"

[[ai_gateway.upstreams]]
name = "dead"
site = "nowhere"
region = "us-west1"
base_url = "http://127.0.0.1:{dead}/v1"
public = true
models = ["gpt-4o-mini"]

[[ai_gateway.routes]]
name = "chat"
path_prefix = "/v1"
upstreams = ["dead"]

{entry}
"#,
            token = dir.join("admin.token").display(),
            data = dir.join("data").display(),
            entry = key.entry,
        ),
    )?;
    let bin = workspace_bin("skymesh-controller", "SKYMESH_CONTROLLER_BIN")?;
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config", config.to_str().context("path")?]);
    let mut proc = Spawned::start("controller", cmd, &dir.join("controller.log"))?;
    if wait_until(Duration::from_secs(15), || {
        TcpStream::connect(gateway).is_ok() && TcpStream::connect(api).is_ok()
    })
    .is_none()
    {
        proc.ensure_running()?;
        bail!("the controller did not start:\n{}", proc.log());
    }
    let token = std::fs::read_to_string(dir.join("admin.token"))?
        .trim()
        .to_string();
    Ok(Controller {
        proc,
        api,
        gateway,
        token,
        key: key.key,
    })
}

/// Raises this process's open-file limit for tests that hold many sockets.
fn more_files(n: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < n {
        ensure!(hard >= n, "the open-file limit {hard} is below {n}");
        setrlimit(Resource::RLIMIT_NOFILE, n, hard)?;
    }
    Ok(())
}

/// One HTTP/1.1 request on a fresh connection: the status line, or an error.
fn request(addr: SocketAddr, head: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(head.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e).context("reading the answer"),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.lines()
        .next()
        .map(str::to_string)
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .with_context(|| format!("no status line in {text:?}"))
}

/// How long until the server closes `s` (EOF or reset), at most `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = [0u8; 1024];
    while t0.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Ok(t0.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Ok(t0.elapsed()),
        }
    }
    bail!("still open after {limit:?}")
}

fn api_get(c: &Controller, path: &str) -> Result<String> {
    request(
        c.api,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            c.token
        ),
    )
}

fn metrics(c: &Controller) -> Result<String> {
    let out = ai::curl(
        None,
        &[
            "--fail",
            "-H",
            &format!("Authorization: Bearer {}", c.token),
            &format!("http://{}/metrics", c.api),
        ],
    )?;
    ensure!(out.status.success(), "/metrics failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Silent, half-sent and idle connections are closed on their deadlines.
#[test]
fn silent_half_sent_and_idle_connections_are_closed() -> Result<()> {
    e2e("listen-deadlines", |env| {
        let mut c = start(env)?;
        // REST API: a connection that sends nothing, and one that sends half a
        // head, are closed by the 10 s head deadline.
        let mut silent = TcpStream::connect(c.api)?;
        let mut half = TcpStream::connect(c.api)?;
        half.write_all(b"GET /v1/nodes HTTP/1.1\r\nHost: x\r\n")?;
        let t = closed_within(&mut silent, Duration::from_secs(20))?;
        ensure!(
            t >= Duration::from_secs(8),
            "closed after {t:?}, before the head deadline"
        );
        closed_within(&mut half, Duration::from_secs(5))?;
        // Gateway (2 s head deadline, 3 s idle): silent, trickled head, idle
        // keep-alive after a request.
        let mut silent = TcpStream::connect(c.gateway)?;
        closed_within(&mut silent, Duration::from_secs(10))?;
        let mut trickle = TcpStream::connect(c.gateway)?;
        let t0 = Instant::now();
        let head =
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        let mut closed = false;
        for b in head {
            if trickle.write_all(&[*b]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        ensure!(
            closed || closed_within(&mut trickle, Duration::from_secs(5)).is_ok(),
            "a head trickled 1 byte per 200 ms was not cut off"
        );
        ensure!(
            t0.elapsed() < Duration::from_secs(8),
            "the trickled head held its connection for {:?}",
            t0.elapsed()
        );
        let mut idle = TcpStream::connect(c.gateway)?;
        idle.write_all(
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
                c.key
            )
            .as_bytes(),
        )?;
        let mut buf = [0u8; 4096];
        let n = idle.read(&mut buf)?;
        ensure!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        let t = closed_within(&mut idle, Duration::from_secs(10))?;
        ensure!(
            t >= Duration::from_secs(2),
            "an idle keep-alive connection was closed after {t:?}"
        );
        // A request body trickled slower than the body deadline: 408.
        let mut slow = TcpStream::connect(c.gateway)?;
        slow.write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
                c.key
            )
            .as_bytes(),
        )?;
        slow.set_read_timeout(Some(Duration::from_secs(1)))?;
        let t0 = Instant::now();
        let mut got = Vec::new();
        while t0.elapsed() < Duration::from_secs(10) && !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let _ = slow.write_all(b" ");
            match slow.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        let text = String::from_utf8_lossy(&got);
        ensure!(
            text.starts_with("HTTP/1.1 408"),
            "a trickled body got {text:?}"
        );
        let m = metrics(&c)?;
        for series in [
            "skymesh_controller_listener_connections_closed_total{listener=\"api\",reason=\"header_timeout\"}",
            "skymesh_controller_listener_connections_closed_total{listener=\"ai_gateway\",reason=\"header_timeout\"}",
            "skymesh_controller_listener_connections_closed_total{listener=\"ai_gateway\",reason=\"idle_timeout\"}",
        ] {
            ensure!(sample(&m, series) >= 1.0, "{series} did not count:\n{m}");
        }
        c.proc.ensure_running()?;
        Ok(())
    })
}

/// An attacker holding more connections than the cap, silent or half-sent,
/// neither exhausts the controller's descriptors nor locks out an operator.
#[test]
fn an_operator_gets_in_while_an_attacker_holds_the_cap() -> Result<()> {
    e2e("listen-cap", |env| {
        let mut c = start(env)?;
        more_files(8192)?;
        let mut held = Vec::new();
        // Over the REST API's cap of 512, and 4× the gateway's 16.
        for i in 0..700 {
            let mut s = TcpStream::connect(c.api)?;
            if i % 2 == 0 {
                s.write_all(b"GET /v1/nodes HTTP/1.1\r\n")?;
            }
            held.push(s);
        }
        for _ in 0..64 {
            held.push(TcpStream::connect(c.gateway)?);
        }
        let status = api_get(&c, "/v1/nodes")?;
        ensure!(
            status.starts_with("HTTP/1.1 200"),
            "the operator got {status:?}"
        );
        let status = request(
            c.gateway,
            &format!(
                "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                c.key
            ),
        )?;
        ensure!(
            status.starts_with("HTTP/1.1 200"),
            "the gateway's client got {status:?}"
        );
        let m = metrics(&c)?;
        ensure!(
            m.contains("skymesh_controller_listener_connections{listener=\"control\"}"),
            "the control endpoint's guard is not in /metrics"
        );
        let open_api = sample(
            &m,
            "skymesh_controller_listener_connections{listener=\"api\"}",
        );
        let open_gw = sample(
            &m,
            "skymesh_controller_listener_connections{listener=\"ai_gateway\"}",
        );
        ensure!(
            open_api <= 512.0 && open_gw <= 16.0,
            "over the cap: api {open_api}, gateway {open_gw}"
        );
        ensure!(
            sample(&m, "skymesh_controller_listener_connections_closed_total{listener=\"api\",reason=\"evicted\"}") >= 188.0,
            "the API did not make room:\n{m}"
        );
        // The controller's own descriptors stay bounded by the caps.
        let fds = std::fs::read_dir(format!("/proc/{}/fd", c.proc.pid()))?.count();
        ensure!(
            fds < 512 + 16 + 200,
            "the controller holds {fds} descriptors"
        );
        drop(held);
        c.proc.ensure_running()?;
        Ok(())
    })
}

/// h2 clients that shut their flow-control window (the server's answer can
/// never be sent) are no longer doing work: at the cap they make room for an
/// operator instead of holding the listener.
#[test]
fn h2_clients_that_never_read_cannot_hold_the_cap() -> Result<()> {
    e2e("listen-h2", |env| {
        let mut c = start(env)?;
        more_files(8192)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let hold = |addr: SocketAddr, path: &'static str, n: usize| {
            rt.block_on(async move {
                let mut held = Vec::new();
                for _ in 0..n {
                    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                        continue;
                    };
                    let Ok((mut client, conn)) = h2::client::Builder::new()
                        .initial_window_size(0)
                        .handshake::<_, bytes::Bytes>(tcp)
                        .await
                    else {
                        continue;
                    };
                    tokio::spawn(conn);
                    let req = http::Request::get(format!("http://{addr}{path}")).body(())?;
                    if let Ok((resp, _)) = client.send_request(req, true) {
                        held.push((client, resp));
                    }
                }
                Ok::<_, anyhow::Error>(held)
            })
        };
        let api_held = hold(c.api, "/v1/nodes", 530)?;
        let gw_held = hold(c.gateway, "/v1/models", 40)?;
        ensure!(
            api_held.len() >= 512,
            "only {} h2 connections got in",
            api_held.len()
        );
        // Let the untaken answers count as stalls.
        std::thread::sleep(Duration::from_secs(2));
        let status = api_get(&c, "/v1/nodes")?;
        ensure!(
            status.starts_with("HTTP/1.1 200"),
            "the operator got {status:?}"
        );
        let status = request(
            c.gateway,
            &format!(
                "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                c.key
            ),
        )?;
        ensure!(
            status.starts_with("HTTP/1.1 200"),
            "the gateway's client got {status:?}"
        );
        drop((api_held, gw_held));
        c.proc.ensure_running()?;
        Ok(())
    })
}

/// Request bodies held for replay have a gateway-wide budget: clients that
/// send most of a large body and stall get the others a 503, not the
/// controller's memory.
#[test]
fn buffered_request_bodies_have_a_budget() -> Result<()> {
    e2e("listen-budget", |env| {
        let mut c = start(env)?;
        let head = |len: usize| {
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
                c.key
            )
        };
        let mut stalled = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(c.gateway)?;
            s.write_all(head(65_000).as_bytes())?;
            s.write_all(&vec![b' '; 60_000])?;
            stalled.push(s);
        }
        std::thread::sleep(Duration::from_millis(500));
        let mut third = TcpStream::connect(c.gateway)?;
        third.set_read_timeout(Some(Duration::from_secs(10)))?;
        third.write_all(head(65_000).as_bytes())?;
        let _ = third.write_all(&vec![b' '; 65_000]);
        let mut buf = vec![0u8; 4096];
        let n = third.read(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        ensure!(
            text.starts_with("HTTP/1.1 503")
                && text.contains("gateway_busy")
                && text.contains("max_buffered_bytes"),
            "over the budget: {text}"
        );
        drop(stalled);
        std::thread::sleep(Duration::from_millis(500));
        let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
        let status = request(c.gateway, &format!("{}{body}", head(body.len())))?;
        ensure!(
            !status.contains(" 503"),
            "the budget was not given back: {status}"
        );
        c.proc.ensure_running()?;
        Ok(())
    })
}
