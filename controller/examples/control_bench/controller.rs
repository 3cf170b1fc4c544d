//! The controller under test: the real `skymesh-controller` binary as its own
//! process on loopback, its admin API, its /metrics and its log.
//!
//! Owns the controller's process and config; it must not touch the simulated
//! agents.

use crate::measure::{cpu_seconds, memory, Memory};
use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use skymesh_wire::JoinToken;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct ControllerProc {
    child: Child,
    pub(crate) log: PathBuf,
    pub(crate) api: Api,
    pub(crate) started: Duration,
}

#[derive(Clone)]
pub(crate) struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ControllerProc {
    pub(crate) fn start(bin: &Path, dir: &Path) -> Result<Self> {
        if !bin.is_file() {
            bail!(
                "controller binary {} not found; build it (cargo build --release -p skymesh-controller) or pass --controller",
                bin.display()
            );
        }
        let control_port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let api_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let token_file = dir.join("admin.token");
        let config = dir.join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "[control]\nlisten = \"127.0.0.1:{control_port}\"\nadvertise = [\"127.0.0.1:{control_port}\"]\n\
                 [api]\nlisten = \"127.0.0.1:{api_port}\"\nadmin_token_file = {:?}\n[state]\ndata_dir = {:?}\n",
                token_file,
                dir.join("data")
            ),
        )?;
        let log = dir.join("controller.log");
        let log_file = std::fs::File::create(&log)?;
        let started = Instant::now();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut proc = Self {
            child,
            log,
            api: Api {
                base: format!("http://127.0.0.1:{api_port}"),
                token: String::new(),
                agent: ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build(),
            },
            started: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            proc.alive()?;
            if proc.api.token.is_empty() {
                if let Ok(t) = std::fs::read_to_string(&token_file) {
                    proc.api.token = t.trim().to_string();
                }
            }
            if !proc.api.token.is_empty() && proc.api.call("GET", "/healthz", None).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller's /healthz did not answer within 30 s:\n{}",
                    proc.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        proc.started = started.elapsed();
        Ok(proc)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the log's tail if the controller has exited.
    pub(crate) fn alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the controller exited ({status}):\n{}", self.log_tail()),
            None => Ok(()),
        }
    }

    pub(crate) fn memory(&self) -> Result<Memory> {
        memory(&PathBuf::from(format!("/proc/{}/status", self.pid())))
    }

    /// User + system CPU time of every controller thread so far.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&format!("/proc/{}/stat", self.pid()))
    }

    /// The controller's unlabelled samples from /metrics, and each labelled
    /// family summed over its labels (under its bare name).
    pub(crate) fn metrics(&self) -> Result<serde_json::Map<String, Value>> {
        let text = self
            .api
            .agent
            .get(&format!("{}/metrics", self.api.base))
            .set("Authorization", &format!("Bearer {}", self.api.token))
            .call()?
            .into_string()?;
        let mut out = serde_json::Map::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            let sum = out.get(name).and_then(Value::as_f64).unwrap_or(0.0) + v;
            out.insert(name.to_string(), json!(sum));
        }
        Ok(out)
    }

    pub(crate) fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Api {
    /// One blocking API call; errors carry the API's error code and detail.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => Err(anyhow!(
                "{method} {path}: HTTP {code}: {}",
                r.into_string().unwrap_or_default()
            )),
            Err(e) => Err(anyhow!("{method} {path}: {e}")),
        }
    }
}

/// One join token per name, `parallel` API calls at a time. One token per
/// node, so each enrollment is one lookup (a reusable token makes the
/// controller probe name, name-2, ... one by one).
pub(crate) async fn create_tokens(
    api: &Api,
    names: &[String],
    parallel: usize,
) -> Result<Vec<(String, JoinToken)>> {
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            tokio::task::spawn_blocking(move || {
                let reply = api.call(
                    "POST",
                    "/v1/join-tokens",
                    Some(json!({"name": name, "site": "bench", "cloud": "sim", "region": "loopback"})),
                )?;
                let text = reply["token"]
                    .as_str()
                    .ok_or_else(|| anyhow!("no token in the reply {reply}"))?;
                Ok::<_, anyhow::Error>((name, JoinToken::decode(text)?))
            })
        })
        .buffered(parallel.max(1))
        .map(|r| r.map_err(|e| anyhow!("token task: {e}")).and_then(|r| r))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}
