//! Driving the real `skymesh-agent` binary: keys, config files, start/stop, `status`.
//!
//! Owns: finding the binary, writing a per-agent config and key file into the test's
//! scratch directory, and the typed view of `status --json`. It must not reimplement
//! anything the agent does; it only runs the binary as a user would.

use crate::netns::Netns;
use crate::proc::{check, output, output_with_stdin, Spawned};
use crate::TestEnv;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

/// Path of the agent binary: `$SKYMESH_AGENT_BIN`, else the build's own.
pub fn agent_bin() -> Result<PathBuf> {
    workspace_bin("skymesh-agent", "SKYMESH_AGENT_BIN")
}

/// Path of a workspace binary: `$env` if set, else beside the running binary
/// (`target/<profile>/skymesh-lab`), or one level up for test binaries
/// (`target/<profile>/deps/…`), so the lab and the tests use the binaries of their
/// own build profile; else `<workspace>/target/debug/<name>`.
pub fn workspace_bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let path = PathBuf::from(p);
        if !path.is_file() {
            bail!("{env} points at {}, which is not a file", path.display());
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the running binary")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .chain(std::iter::once(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/debug")
                .join(name),
        ))
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "{name} binary not found (looked at {}); build it first: cargo build --workspace --bins \
             (or point {env} at it)",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}

pub fn agent_command(args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(agent_bin()?);
    cmd.args(args);
    Ok(cmd)
}

/// Runs `skymesh-agent check-config --config <path>` and returns its output.
pub fn check_config(path: &Path) -> Result<Output> {
    let path = path.to_str().context("config path is not UTF-8")?;
    output(&mut agent_command(&["check-config", "--config", path])?)
}

/// A WireGuard key pair as base64 text, made by the agent's own `genkey`/`pubkey`.
#[derive(Clone, Debug)]
pub struct Keypair {
    /// Base64 private key (no newline).
    pub private: String,
    /// Base64 public key (no newline).
    pub public: String,
}

impl Keypair {
    /// Generates a key pair with `skymesh-agent genkey` and `skymesh-agent pubkey`.
    pub fn generate() -> Result<Self> {
        let private = check(&mut agent_command(&["genkey"])?)?.trim().to_string();
        let public = pubkey_of(&private)?;
        Ok(Self { private, public })
    }

    /// The raw 32 private-key bytes (for building packets in-process with boringtun).
    pub fn private_bytes(&self) -> Result<[u8; 32]> {
        skymesh_wire::key::decode_key(&self.private).map_err(|e| anyhow!("private key: {e}"))
    }

    /// The raw 32 public-key bytes.
    pub fn public_bytes(&self) -> Result<[u8; 32]> {
        skymesh_wire::key::decode_key(&self.public).map_err(|e| anyhow!("public key: {e}"))
    }
}

/// Derives a public key with `skymesh-agent pubkey` (stdin → stdout).
pub fn pubkey_of(private: &str) -> Result<String> {
    let out = output_with_stdin(
        &mut agent_command(&["pubkey"])?,
        format!("{private}\n").as_bytes(),
    )?;
    if !out.status.success() {
        bail!(
            "skymesh-agent pubkey failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One `[[peers]]` entry of an agent config.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    /// Peer name (label in status and metrics).
    pub name: String,
    /// Peer's base64 public key.
    pub public_key: String,
    /// `ip:port`, if this side knows where the peer is.
    pub endpoint: Option<String>,
    /// Prefixes routed to (and accepted from) this peer.
    pub allowed_ips: Vec<String>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

impl PeerSpec {
    /// A peer with the given name, key and allowed prefixes, no endpoint and no keepalive.
    pub fn new(name: &str, public_key: &str, allowed_ips: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            public_key: public_key.to_string(),
            endpoint: None,
            allowed_ips: allowed_ips.iter().map(|s| s.to_string()).collect(),
            persistent_keepalive: None,
        }
    }

    /// Sets the peer's endpoint.
    pub fn endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = Some(endpoint.to_string());
        self
    }
}

/// What goes into an agent's config file (paths are filled in by [`Agent::new`]).
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// TUN interface name.
    pub ifname: String,
    /// UDP listen port.
    pub listen_port: u16,
    /// Overlay address with prefix length, e.g. "100.96.0.1/32".
    pub address: String,
    /// TUN MTU.
    pub mtu: u32,
    /// Metrics listen address (inside the agent's namespace).
    pub metrics_listen: String,
    /// The peers.
    pub peers: Vec<PeerSpec>,
}

impl AgentSpec {
    /// Defaults used across the suite: `skymesh0`, port 51820, MTU 1420, metrics on 127.0.0.1:9586.
    pub fn new(address: &str) -> Self {
        Self {
            ifname: "skymesh0".to_string(),
            listen_port: 51820,
            address: address.to_string(),
            mtu: 1420,
            metrics_listen: "127.0.0.1:9586".to_string(),
            peers: Vec::new(),
        }
    }

    /// Adds a peer.
    pub fn peer(mut self, peer: PeerSpec) -> Self {
        self.peers.push(peer);
        self
    }

    /// Renders the TOML config file.
    pub fn to_toml(&self, private_key_file: &Path, socket: &Path, state_dir: &Path) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "[interface]");
        let _ = writeln!(s, "name = {:?}", self.ifname);
        let _ = writeln!(
            s,
            "private_key_file = {:?}",
            private_key_file.display().to_string()
        );
        let _ = writeln!(s, "listen_port = {}", self.listen_port);
        let _ = writeln!(s, "address = {:?}", self.address);
        let _ = writeln!(s, "mtu = {}", self.mtu);
        let _ = writeln!(s, "\n[metrics]\nlisten = {:?}", self.metrics_listen);
        let _ = writeln!(s, "\n[admin]\nsocket = {:?}", socket.display().to_string());
        let _ = writeln!(s, "\n[state]\ndir = {:?}", state_dir.display().to_string());
        for p in &self.peers {
            let _ = writeln!(s, "\n[[peers]]");
            let _ = writeln!(s, "name = {:?}", p.name);
            let _ = writeln!(s, "public_key = {:?}", p.public_key);
            if let Some(ep) = &p.endpoint {
                let _ = writeln!(s, "endpoint = {ep:?}");
            }
            let ips: Vec<String> = p.allowed_ips.iter().map(|i| format!("{i:?}")).collect();
            let _ = writeln!(s, "allowed_ips = [{}]", ips.join(", "));
            if let Some(k) = p.persistent_keepalive {
                let _ = writeln!(s, "persistent_keepalive = {k}");
            }
        }
        s
    }
}

/// Writes a secret file with mode 0600 (as WireGuard tools expect for private keys).
pub fn write_secret(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))
}

/// `status --json`: the running daemon as the admin socket reports it.
///
/// Deliberately defined apart from the agent's own type: this is the JSON
/// contract as a client reads it, so a renamed or dropped field fails the tests
/// instead of silently following the agent.
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    /// The local interface.
    pub interface: InterfaceStatus,
    /// One entry per configured peer.
    pub peers: Vec<PeerStatus>,
    /// Dropped packets by reason.
    pub drops: BTreeMap<String, u64>,
    /// Link checks that ran over 50 ms late (that time is not probe silence).
    pub link_check_stalls: u64,
    /// Controller mode only.
    #[serde(default)]
    pub controller: Option<ControllerStatus>,
    /// Probe measurements per link.
    #[serde(default)]
    pub links: Vec<skymesh_agent::admin::LinkStatusJson>,
    /// The path to each destination.
    #[serde(default)]
    pub routes: Vec<skymesh_agent::admin::PathStatusJson>,
}

/// `status --json` → `controller`.
#[derive(Clone, Debug, Deserialize)]
pub struct ControllerStatus {
    /// The enrolled node name.
    pub node: String,
    /// The controller of the open session.
    pub connected: Option<String>,
    /// Whether the applied netmap came from the on-disk cache.
    pub from_cache: bool,
    /// Accepted prefixes.
    pub prefixes: Vec<String>,
    /// Refused prefixes with the reason.
    pub rejected_prefixes: Vec<RejectedPrefix>,
}

/// A refused prefix in `status --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct RejectedPrefix {
    pub cidr: String,
    pub reason: String,
}

impl Status {
    /// The peer called `name`, or an error listing the peers there are.
    pub fn peer(&self, name: &str) -> Result<&PeerStatus> {
        self.peers.iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.peers.iter().map(|p| p.name.as_str()).collect();
            anyhow!("no peer {name:?} in status (peers: {names:?})")
        })
    }
}

/// `status --json` → `interface`.
#[derive(Clone, Debug, Deserialize)]
pub struct InterfaceStatus {
    /// TUN name.
    pub name: String,
    /// Our public key (base64).
    pub public_key: String,
    /// UDP listen port.
    pub listen_port: u16,
    /// Overlay address.
    pub address: String,
}

/// `status --json` → one of `peers`.
#[derive(Clone, Debug, Deserialize)]
pub struct PeerStatus {
    /// Configured name.
    pub name: String,
    /// Peer public key (base64).
    pub public_key: String,
    /// Current endpoint "ip:port", if known.
    pub endpoint: Option<String>,
    /// Allowed prefixes.
    pub allowed_ips: Vec<String>,
    /// Unix time of the last completed handshake.
    pub latest_handshake_unix: Option<u64>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Packets received from the peer.
    pub rx_packets: u64,
    /// Packets sent to the peer.
    pub tx_packets: u64,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u64>,
}

/// One agent: its namespace, scratch files, and (while running) its process.
pub struct Agent {
    /// Label used in file names and messages (e.g. "a").
    pub label: String,
    /// Namespace the agent runs in.
    pub ns: String,
    /// Its key pair.
    pub keys: Keypair,
    /// Config file path.
    pub config: PathBuf,
    /// Private key file path.
    pub key_file: PathBuf,
    /// Admin socket path.
    pub socket: PathBuf,
    /// What the config file says.
    pub spec: AgentSpec,
    dir: PathBuf,
    starts: u32,
    process: Option<Spawned>,
}

impl Agent {
    /// Writes config and key file for an agent called `label` into the test's scratch dir.
    pub fn new(
        env: &TestEnv,
        ns: &Netns,
        label: &str,
        keys: Keypair,
        spec: AgentSpec,
    ) -> Result<Self> {
        let dir = env.path(&format!("agent-{label}"));
        std::fs::create_dir_all(dir.join("state")).context("creating agent dir")?;
        let key_file = dir.join("private.key");
        write_secret(&key_file, &format!("{}\n", keys.private))?;
        let mut agent = Self {
            label: label.to_string(),
            ns: ns.name().to_string(),
            keys,
            config: dir.join("agent.toml"),
            socket: dir.join("agent.sock"),
            key_file,
            spec,
            dir,
            starts: 0,
            process: None,
        };
        agent.write_config()?;
        Ok(agent)
    }

    /// (Re)writes the config file from `self.spec`.
    pub fn write_config(&mut self) -> Result<()> {
        let text = self
            .spec
            .to_toml(&self.key_file, &self.socket, &self.dir.join("state"));
        std::fs::write(&self.config, text)
            .with_context(|| format!("writing {}", self.config.display()))
    }

    /// Path of the config file as a string (for command lines).
    pub fn config_arg(&self) -> Result<&str> {
        self.config.to_str().context("config path is not UTF-8")
    }

    /// Starts `skymesh-agent run` in the namespace and waits until `status` answers.
    pub fn start(&mut self) -> Result<()> {
        self.spawn_with_env(&[])?;
        self.wait_ready(Duration::from_secs(15))
    }

    /// Starts `skymesh-agent run` in the namespace with extra environment variables and
    /// returns at once, for tests that watch the start-up itself (e.g. `NOTIFY_SOCKET`).
    pub fn spawn_with_env(&mut self, vars: &[(&str, &str)]) -> Result<()> {
        if let Some(process) = self.process.as_mut() {
            if process.try_status()?.is_none() {
                bail!("agent {} is already running", self.label);
            }
        }
        self.starts += 1;
        let log = self
            .dir
            .parent()
            .context("agent dir has a parent")?
            .join(format!("agent-{}.{}.log", self.label, self.starts));
        let bin = agent_bin()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(&bin)
            .args(["run", "--config", self.config_arg()?])
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("SKYMESH_TEST_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .envs(vars.iter().copied());
        let process = Spawned::start(&format!("agent {}", self.label), cmd, &log)?;
        self.process = Some(process);
        Ok(())
    }

    /// The process id of the running agent (`ip netns exec` execs it in place).
    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        self.process.as_ref().map(Spawned::pid)
    }

    /// Waits up to `timeout` for the agent to exit on its own; `None` if it is still running.
    /// An exited agent keeps its [`Agent::log`] until the next start.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.process_mut()?.wait_timeout(timeout)
    }

    /// Waits until `status --json` answers, failing early if the process dies.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let start = std::time::Instant::now();
        let mut last_err = anyhow!("never asked");
        while start.elapsed() < timeout {
            self.process_mut()?.ensure_running()?;
            match self.status() {
                Ok(_) => return Ok(()),
                Err(e) => last_err = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last_err.context(format!(
            "agent {} did not answer `status --json` within {timeout:?}",
            self.label
        )))
    }

    fn process_mut(&mut self) -> Result<&mut Spawned> {
        self.process
            .as_mut()
            .ok_or_else(|| anyhow!("agent {} is not running", self.label))
    }

    /// Fails (with the log tail) if the agent process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.process_mut()?.ensure_running()
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Spawned::log).unwrap_or_default()
    }

    /// SIGTERM and wait for exit (10 s); returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let status = self.process_mut()?.terminate(Duration::from_secs(10))?;
        self.process = None;
        Ok(status)
    }

    /// SIGKILL (no cleanup by the agent).
    pub fn kill9(&mut self) -> Result<()> {
        self.process_mut()?.kill9()?;
        self.process = None;
        Ok(())
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> Result<Status> {
        let out = check(&mut agent_command(&[
            "status",
            "--config",
            self.config_arg()?,
            "--json",
        ])?)?;
        serde_json::from_str(&out).with_context(|| format!("parsing `status --json` output: {out}"))
    }

    /// `status` (the human table), as text.
    pub fn status_table(&self) -> Result<String> {
        check(&mut agent_command(&[
            "status",
            "--config",
            self.config_arg()?,
        ])?)
    }

    /// Scrapes `/metrics` from inside the agent's namespace.
    pub fn metrics(&self) -> Result<crate::metrics::Metrics> {
        crate::metrics::scrape(&self.ns, &self.spec.metrics_listen)
    }

    /// This agent's underlay endpoint as a peer would configure it.
    pub fn endpoint_on(&self, underlay_ip: &str) -> String {
        format!("{underlay_ip}:{}", self.spec.listen_port)
    }

    /// The overlay address without prefix length.
    pub fn overlay_ip(&self) -> &str {
        self.spec
            .address
            .split('/')
            .next()
            .unwrap_or(&self.spec.address)
    }
}
