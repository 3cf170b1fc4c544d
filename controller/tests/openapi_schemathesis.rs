//! The OpenAPI document against the real `skymesh-controller` binary, checked
//! by a schema-driven fuzzer: schemathesis (from PyPI) generates requests from
//! the document, valid and invalid, sends them with the admin token, and fails
//! on any difference between what the document says and what the server does
//! (an undocumented status or content type, a body off its schema, valid data
//! refused, invalid data accepted, a 5xx, auth not enforced).
//!
//! Python: `SKYMESH_PYTHON`, else the test suite's venv, with the pinned
//! schemathesis. Without it the test prints SKIPPED, or fails under CI=true.

use serde_json::{json, Value};
use skymesh_agent::control;
use skymesh_wire::control::Register;
use skymesh_wire::{JoinToken, PublicKey};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the README's test command creates the venv.
const DEFAULT_PYTHON: &str = "/opt/skymesh-venv/bin/python3";
/// The schemathesis this test was written against; its CLI flags and checks
/// change between releases.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// Examples per operation and phase: the whole run takes about 10 s here.
const MAX_EXAMPLES: &str = "40";
/// A fixed seed, so a failure reproduces.
const SEED: &str = "20261204";
/// The run is killed (and the test fails) after this long.
const RUN_DEADLINE: Duration = Duration::from_secs(150);

/// 422 is the document's answer for a body that matches its schema but whose
/// values do not fit together (a prefix with host bits set, a block length
/// that does not fit its range, a link from a node to itself): what JSON
/// Schema cannot say. For exactly these operations a schema-valid body may get
/// it; everywhere else schema-valid data must be accepted.
///
/// The enrolled nodes are offered as path parameters half of the time, so that
/// node and link routes reach existing objects, not only 404s.
const CONFIG: &str = r#"
[dictionaries.nodes]
values = ["node-a", "node-b", "node-c"]

[parameters]
"path.name" = { dictionary = "nodes", probability = 0.5 }
"path.a" = { dictionary = "nodes", probability = 0.5 }
"path.b" = { dictionary = "nodes", probability = 0.5 }

[[operations]]
include-path = ["/v1/ipam/check", "/v1/ipam/suggest", "/v1/links/{a}/{b}"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409", "422", "503"]
"#;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The Python with the pinned schemathesis, or why not.
fn python() -> Result<PathBuf, String> {
    let path =
        PathBuf::from(std::env::var("SKYMESH_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.into()));
    let out = Command::new(&path)
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('schemathesis'))",
        ])
        .output();
    let found = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(_) => "not installed".to_string(),
        Err(e) => format!("cannot run it: {e}"),
    };
    if found != SCHEMATHESIS_VERSION {
        return Err(format!(
            "{} has schemathesis {found}, not {SCHEMATHESIS_VERSION}; install it as the README's \
             test command does: python3 -m venv /opt/skymesh-venv && \
             /opt/skymesh-venv/bin/pip install schemathesis=={SCHEMATHESIS_VERSION}",
            path.display()
        ));
    }
    Ok(path)
}

/// The controller binary, killed when dropped.
struct Controller(std::process::Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The binary on loopback: (process, API base URL, admin token, control address).
fn start_controller(dir: &Path) -> (Controller, String, String, String) {
    let port = free_port();
    let control = format!("127.0.0.1:{}", free_port());
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nlisten = \"{control}\"\nadvertise = [\"{control}\"]\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\nadmin_token_file = {:?}\n\
             [state]\ndata_dir = {:?}\n",
            dir.join("admin.token"),
            dir.join("data")
        ),
    )
    .expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_skymesh-controller"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("controller.log")).expect("log file"))
        .spawn()
        .expect("start skymesh-controller");
    let ctl = Controller(child);
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let token = std::fs::read_to_string(dir.join("admin.token")).unwrap_or_default();
        let token = token.trim().to_string();
        if !token.is_empty() {
            let ready = ureq::get(&format!("{base}/v1/openapi.json"))
                .set("Authorization", &format!("Bearer {token}"))
                .call()
                .is_ok();
            if ready {
                return (ctl, base, token, control);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the controller did not answer on {base}: {}",
            std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Enrolls a node over the real control channel and keeps its session up.
async fn enroll(base: &str, token: &str, dir: &Path, name: &str, n: u8) {
    let (base, token, name_owned) = (base.to_string(), token.to_string(), name.to_string());
    let created: Value = tokio::task::spawn_blocking(move || {
        ureq::post(&format!("{base}/v1/join-tokens"))
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(json!({"name": name_owned, "site": "lab", "cloud": "aws", "region": "r"}))
            .expect("create a join token")
            .into_json()
            .expect("json")
    })
    .await
    .expect("blocking");
    let join = JoinToken::decode(created["token"].as_str().expect("token")).expect("decode");
    let identity = control::enroll(&join, &dir.join(name))
        .await
        .expect("enroll");
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(control::run_session(
        identity,
        Register {
            public_key: PublicKey::from_bytes([n; 32]),
            listen_port: 51820,
            endpoints: vec![format!("203.0.113.{n}:51820").parse().expect("addr")],
            advertise: vec![format!("10.{n}.0.0/16").parse().expect("cidr")],
            underlay: vec![],
            agent_version: "test".into(),
            transit: true,
            capability: 0,
        },
        tx,
    ));
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a netmap")
        {
            Some(control::ControlEvent::NetMap(_)) => break,
            Some(_) => continue,
            None => panic!("{name}: the session ended"),
        }
    }
    // Keep draining, so the session never blocks on a full channel.
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_difference_between_document_and_server() {
    let python = match python() {
        Ok(p) => p,
        Err(why) if in_ci() => panic!("CI is set but {why}"),
        Err(why) => {
            // Straight to the stderr handle: libtest captures `eprintln!`.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (_ctl, base, token, _control) = start_controller(dir.path());
    for (n, name) in ["node-a", "node-b", "node-c"].into_iter().enumerate() {
        enroll(&base, &token, dir.path(), name, n as u8 + 1).await;
    }
    std::fs::write(dir.path().join("schemathesis.toml"), CONFIG).expect("config");
    let dir_path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run_schemathesis(&python, &dir_path, &base, &token))
        .await
        .expect("schemathesis run");
}

fn run_schemathesis(python: &Path, dir: &Path, base: &str, token: &str) {
    let started = Instant::now();
    let mut child = Command::new(python)
        .args(["-m", "schemathesis.cli", "--no-color", "--config-file"])
        .arg(dir.join("schemathesis.toml"))
        .arg("run")
        .arg(format!("{base}/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all"])
        .args(["--seed", SEED, "--max-examples", MAX_EXAMPLES])
        .args(["--workers", "1", "--generation-database", "none"])
        .args(["--request-timeout", "10"])
        // Reports and caches go to the temporary directory, not the source tree.
        .current_dir(dir)
        .env("SCHEMATHESIS_HOOKS", "")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run schemathesis");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let output = reader.join().unwrap_or_default();
    let took = started.elapsed();
    {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "schemathesis {SCHEMATHESIS_VERSION} ran for {:.1} s",
            took.as_secs_f64()
        );
    }
    let Some(status) = status else {
        panic!("schemathesis ran past {RUN_DEADLINE:?}:\n{output}\n{stderr}");
    };
    assert!(
        status.success(),
        "schemathesis found differences between the OpenAPI document and the server \
         ({status}):\n{output}\n{stderr}"
    );
    // The summary (operations, phases, cases, warnings) in the test log.
    let summary: Vec<&str> = output
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect();
    {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "{}", summary.join("\n"));
    }
    assert!(
        output.contains("Operations:") && !output.contains("No operations"),
        "schemathesis tested nothing:\n{output}\n{stderr}"
    );
}
