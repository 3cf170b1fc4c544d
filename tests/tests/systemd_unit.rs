//! The systemd units in `systemd/`, checked as an operator would: `systemd-analyze verify`
//! and `systemd-analyze security` have nothing to say against them, they carry the sandbox
//! the agent is designed for, and the agent keeps the `Type=notify` contract the unit
//! relies on: `READY=1` only once the interface is up and every listener answers, then
//! `STOPPING=1`, a clean exit and no interface left behind on SIGTERM.
//!
//! PID 1 of the machines these tests run on is not systemd, so the units are not started
//! for real (no `systemd-run`); the notify protocol is checked against a stand-in socket.

use anyhow::{bail, ensure, Context, Result};
use skymesh_tests::agent::agent_bin;
use skymesh_tests::proc::{describe, output};
use skymesh_tests::sdnotify::NotifySocket;
use skymesh_tests::{e2e, require_root, require_tool, Agent, AgentSpec, Keypair, TestEnv};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const AGENT_UNIT: &str = "skymesh-agent.service";
const CONTROLLER_UNIT: &str = "skymesh-controller.service";
/// Where the units expect the binaries (the install path the unit comments document).
const AGENT_INSTALLED: &str = "/usr/local/bin/skymesh-agent";
const CONTROLLER_INSTALLED: &str = "/usr/local/bin/skymesh-controller";
const AGENT_CONFIG: &str = "/etc/skymesh/agent.toml";

/// A unit file, parsed into `(section, key, value)` assignments in file order.
struct Unit {
    name: &'static str,
    path: PathBuf,
    text: String,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    /// Reads and parses `systemd/<name>` of the workspace.
    fn load(name: &'static str) -> Result<Self> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("systemd")
            .join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut entries = Vec::new();
        let mut section = String::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            ensure!(
                !line.ends_with('\\'),
                "{name}:{}: continuation lines are not supported by this parser",
                n + 1
            );
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                bail!("{name}:{}: not `Key=value`: {raw:?}", n + 1);
            };
            entries.push((
                section.clone(),
                key.trim().to_string(),
                value.trim().to_string(),
            ));
        }
        Ok(Self {
            name,
            path,
            text,
            entries,
        })
    }

    /// Every value assigned to `section`/`key`, in order.
    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The effective (last) value of `section`/`key`.
    fn value(&self, section: &str, key: &str) -> Option<&str> {
        self.values(section, key).last().copied()
    }

    /// The space-separated words of all assignments to a list-valued key.
    fn words(&self, section: &str, key: &str) -> BTreeSet<&str> {
        self.values(section, key)
            .into_iter()
            .flat_map(str::split_whitespace)
            .collect()
    }

    /// Checks each `(section, key, value)` is the effective value; lists every mismatch.
    fn expect(&self, required: &[(&str, &str, &str)]) -> Result<()> {
        let wrong: Vec<String> = required
            .iter()
            .filter(|(s, k, v)| self.value(s, k) != Some(v))
            .map(|(s, k, v)| {
                format!(
                    "[{s}] {k}={v} (found {:?})",
                    self.value(s, k).unwrap_or("<unset>")
                )
            })
            .collect();
        ensure!(
            wrong.is_empty(),
            "{} lacks required settings:\n  {}",
            self.name,
            wrong.join("\n  ")
        );
        Ok(())
    }

    /// Writes a copy into `dir` (same file name, so messages name the unit) with
    /// `(from, to)` replaced, and returns its path.
    fn stage(&self, dir: &Path, replace: &[(&str, &Path)]) -> Result<PathBuf> {
        let mut text = self.text.clone();
        for (from, to) in replace {
            ensure!(
                text.contains(from),
                "test bug: {from} not in {}",
                self.path.display()
            );
            text = text.replace(from, &to.display().to_string());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(self.name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// The sandbox both units share: what `systemd-analyze security` scores, kept explicit.
const COMMON_HARDENING: &[(&str, &str, &str)] = &[
    ("Unit", "Wants", "network-online.target"),
    ("Unit", "After", "network-online.target"),
    ("Service", "Restart", "on-failure"),
    ("Service", "NoNewPrivileges", "yes"),
    ("Service", "ProtectSystem", "strict"),
    ("Service", "ProtectHome", "yes"),
    ("Service", "PrivateTmp", "yes"),
    ("Service", "ProtectKernelTunables", "yes"),
    ("Service", "ProtectKernelModules", "yes"),
    ("Service", "ProtectKernelLogs", "yes"),
    ("Service", "ProtectControlGroups", "yes"),
    ("Service", "ProtectClock", "yes"),
    ("Service", "ProtectHostname", "yes"),
    ("Service", "RestrictNamespaces", "yes"),
    ("Service", "RestrictRealtime", "yes"),
    ("Service", "RestrictSUIDSGID", "yes"),
    ("Service", "LockPersonality", "yes"),
    ("Service", "MemoryDenyWriteExecute", "yes"),
    ("Service", "SystemCallArchitectures", "native"),
    ("Service", "DevicePolicy", "closed"),
    ("Service", "UMask", "0077"),
    ("Service", "StateDirectoryMode", "0700"),
    ("Service", "RuntimeDirectoryMode", "0700"),
    ("Service", "ConfigurationDirectory", "skymesh"),
    ("Install", "WantedBy", "multi-user.target"),
];

/// What the agent itself depends on: the notify protocol, its default paths
/// (`/var/lib/skymesh`, admin socket `/run/skymesh/agent.sock`) and CAP_NET_ADMIN for the TUN.
const AGENT_SETTINGS: &[(&str, &str, &str)] = &[
    ("Service", "Type", "notify"),
    ("Service", "NotifyAccess", "main"),
    (
        "Service",
        "ExecStartPre",
        "/usr/local/bin/skymesh-agent check-config --config /etc/skymesh/agent.toml",
    ),
    (
        "Service",
        "ExecStart",
        "/usr/local/bin/skymesh-agent run --config /etc/skymesh/agent.toml",
    ),
    ("Service", "StateDirectory", "skymesh"),
    ("Service", "RuntimeDirectory", "skymesh"),
    ("Service", "CapabilityBoundingSet", "CAP_NET_ADMIN"),
    ("Service", "AmbientCapabilities", "CAP_NET_ADMIN"),
    ("Service", "DeviceAllow", "/dev/net/tun rw"),
];

const CONTROLLER_SETTINGS: &[(&str, &str, &str)] = &[
    ("Service", "Type", "notify"),
    (
        "Service",
        "ExecStart",
        "/usr/local/bin/skymesh-controller run --config /etc/skymesh/controller.toml",
    ),
    ("Service", "StateDirectory", "skymesh-controller"),
    ("Service", "RuntimeDirectory", "skymesh-controller"),
    ("Service", "DynamicUser", "yes"),
    ("Service", "CapabilityBoundingSet", ""),
    ("Service", "AmbientCapabilities", ""),
    ("Service", "PrivateDevices", "yes"),
];

/// Checks the settings every sandbox needs that [`Unit::expect`] cannot express.
fn expect_common(unit: &Unit, families: &[&str]) -> Result<()> {
    unit.expect(COMMON_HARDENING)?;
    let got = unit.words("Service", "RestrictAddressFamilies");
    let want: BTreeSet<&str> = families.iter().copied().collect();
    ensure!(
        got == want,
        "{}: RestrictAddressFamilies is {got:?}, expected exactly {want:?}",
        unit.name
    );
    let filter = unit.values("Service", "SystemCallFilter");
    ensure!(
        filter.first() == Some(&"@system-service"),
        "{}: SystemCallFilter must start from the @system-service allow list, found {filter:?}",
        unit.name
    );
    let restart_sec = unit.value("Service", "RestartSec").unwrap_or("<unset>");
    ensure!(
        !matches!(restart_sec, "<unset>" | "0" | "0s" | "100ms"),
        "{}: RestartSec={restart_sec}: a crash loop would restart at systemd's 100 ms default",
        unit.name
    );
    ensure!(
        unit.value("Service", "LimitNOFILE").is_some(),
        "{}: LimitNOFILE is unset",
        unit.name
    );
    Ok(())
}

#[test]
fn agent_unit_has_the_hardening_the_agent_is_designed_for() -> Result<()> {
    let unit = Unit::load(AGENT_UNIT)?;
    expect_common(&unit, &["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"])?;
    unit.expect(AGENT_SETTINGS)?;
    // Each would take away what a TUN + netlink daemon on the host's network needs.
    for key in ["PrivateDevices", "PrivateNetwork", "PrivateUsers"] {
        ensure!(
            unit.value("Service", key) != Some("yes"),
            "{AGENT_UNIT}: {key}=yes would hide /dev/net/tun or the host network from the agent"
        );
    }
    ensure!(
        unit.value("Service", "User").is_none() && unit.value("Service", "DynamicUser").is_none(),
        "{AGENT_UNIT}: runs as root confined to CAP_NET_ADMIN; a User= needs the key file chowned"
    );
    Ok(())
}

#[test]
fn controller_unit_has_the_same_sandbox_without_network_admin() -> Result<()> {
    let unit = Unit::load(CONTROLLER_UNIT)?;
    expect_common(&unit, &["AF_UNIX", "AF_INET", "AF_INET6"])?;
    unit.expect(CONTROLLER_SETTINGS)?;
    ensure!(
        unit.value("Service", "DeviceAllow").is_none(),
        "{CONTROLLER_UNIT}: the controller needs no devices"
    );
    Ok(())
}

/// The built controller binary, or the agent binary standing in for it.
///
/// `systemd-analyze verify` only checks that `ExecStart=` names an executable; until the
/// controller binary is built, the agent binary is an executable that serves the check.
fn controller_or_stand_in() -> Result<PathBuf> {
    let agent = agent_bin()?;
    let controller = agent.with_file_name("skymesh-controller");
    Ok(if controller.is_file() {
        controller
    } else {
        agent
    })
}

/// Copies both units into `env` with the install paths pointing at the built binaries,
/// so `systemd-analyze` finds the executables it insists on.
fn staged_units(env: &TestEnv) -> Result<Vec<(&'static str, PathBuf)>> {
    let dir = env.path("units");
    let agent = Unit::load(AGENT_UNIT)?.stage(&dir, &[(AGENT_INSTALLED, &agent_bin()?)])?;
    let controller = Unit::load(CONTROLLER_UNIT)?
        .stage(&dir, &[(CONTROLLER_INSTALLED, &controller_or_stand_in()?)])?;
    Ok(vec![(AGENT_UNIT, agent), (CONTROLLER_UNIT, controller)])
}

/// stdout and stderr of a command together, with its exit status.
fn run_merged(cmd: &mut Command) -> Result<(std::process::ExitStatus, String)> {
    let out = output(cmd)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status, text))
}

#[test]
fn units_pass_systemd_analyze_verify() -> Result<()> {
    if !require_tool("systemd-analyze") {
        return Ok(());
    }
    e2e("verify", |env| {
        for (name, path) in staged_units(env)? {
            let mut cmd = Command::new("systemd-analyze");
            cmd.arg("verify").arg(&path);
            let (status, text) = run_merged(&mut cmd)?;
            // verify exits 0 on unknown keys and unparsable values; it only warns.
            let about_us: Vec<&str> = text.lines().filter(|l| l.contains(name)).collect();
            ensure!(
                status.success() && about_us.is_empty(),
                "`{}` ({status}) complains about {name}:\n{}",
                describe(&cmd),
                if about_us.is_empty() {
                    text.clone()
                } else {
                    about_us.join("\n")
                }
            );
        }
        Ok(())
    })
}

#[test]
fn units_pass_systemd_analyze_security() -> Result<()> {
    if !require_tool("systemd-analyze") {
        return Ok(());
    }
    e2e("security", |env| {
        // Exposure (0 = fully sandboxed, 10 = none): the agent pays for running as root with
        // CAP_NET_ADMIN on the host network; the controller has no such excuse.
        let limits = [(AGENT_UNIT, 3.0), (CONTROLLER_UNIT, 2.0)];
        for (name, path) in staged_units(env)? {
            let mut cmd = Command::new("systemd-analyze");
            cmd.args(["security", "--offline=yes", "--no-pager"])
                .arg(&path);
            let (status, text) = run_merged(&mut cmd)?;
            ensure!(
                status.success(),
                "`{}` failed ({status}):\n{text}",
                describe(&cmd)
            );
            let exposure: f64 = text
                .lines()
                .find_map(|l| {
                    let rest = l.split_once(&format!("exposure level for {name}: "))?.1;
                    rest.split_whitespace().next()?.parse().ok()
                })
                .with_context(|| format!("no overall exposure level for {name} in:\n{text}"))?;
            let limit = limits
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, l)| *l)
                .context("test bug: no limit for unit")?;
            ensure!(
                exposure <= limit,
                "{name}: exposure {exposure} > {limit}; a hardening line was lost:\n{text}"
            );
        }
        Ok(())
    })
}

/// Runs the agent unit's `ExecStartPre=` as systemd would, on the test's config file.
fn exec_start_pre(config: &Path) -> Result<std::process::Output> {
    let unit = Unit::load(AGENT_UNIT)?;
    let line = unit
        .value("Service", "ExecStartPre")
        .context("no ExecStartPre")?;
    let bin = agent_bin()?;
    let config = config.to_str().context("config path is not UTF-8")?;
    let bin = bin.to_str().context("agent path is not UTF-8")?;
    let argv: Vec<&str> = line
        .split_whitespace()
        .map(|w| match w {
            AGENT_INSTALLED => bin,
            AGENT_CONFIG => config,
            other => other,
        })
        .collect();
    output(Command::new(argv[0]).args(&argv[1..]))
}

#[test]
fn agent_reports_ready_only_when_up_and_stopping_on_sigterm() -> Result<()> {
    if !require_root() || !require_tool("ip") || !require_tool("ss") {
        return Ok(());
    }
    e2e("sd-ready", |env| {
        let ns = env.netns("n")?;
        let spec = AgentSpec::new("100.96.0.1/32");
        let (ifname, port) = (spec.ifname.clone(), spec.listen_port);
        let mut agent = Agent::new(env, &ns, "a", Keypair::generate()?, spec)?;

        let pre = exec_start_pre(&agent.config)?;
        ensure!(
            pre.status.success(),
            "the unit's ExecStartPre refuses a valid config: {}",
            String::from_utf8_lossy(&pre.stderr)
        );

        let notify = NotifySocket::bind(&env.path("notify.sock"))?;
        let socket = notify.path().to_str().context("socket path is not UTF-8")?;
        agent.spawn_with_env(&[("NOTIFY_SOCKET", socket)])?;
        let (ready, before) = notify.wait_for("READY=1", Duration::from_secs(15), || {
            agent.ensure_running()
        })?;

        // Right now, as READY=1 lands, systemd starts the units ordered after this one.
        let link = ns
            .ip(&["link", "show", "dev", &ifname])
            .with_context(|| format!("READY=1 came before {ifname} existed"))?;
        let flags = link
            .split_once('<')
            .and_then(|(_, r)| r.split_once('>'))
            .map(|(f, _)| f.split(',').collect::<Vec<_>>())
            .unwrap_or_default();
        ensure!(
            flags.contains(&"UP"),
            "READY=1 came before {ifname} was up:\n{link}"
        );
        let addr = ns.ip(&["addr", "show", "dev", &ifname])?;
        ensure!(
            addr.contains("100.96.0.1/32"),
            "READY=1 came before {ifname} had its address:\n{addr}"
        );
        let udp = ns.exec("ss", &["-H", "-uln", &format!("sport = :{port}")])?;
        ensure!(
            !udp.trim().is_empty(),
            "READY=1 came before UDP port {port} was bound"
        );
        let status = agent
            .status()
            .context("READY=1 came before the admin socket answered")?;
        ensure!(status.interface.name == ifname, "status names {status:?}");
        agent
            .metrics()
            .context("READY=1 came before /metrics answered")?;

        let pid = agent.pid().context("agent not running")?.as_raw();
        ensure!(
            ready.pid == pid,
            "READY=1 came from pid {}, not the main process {pid}: NotifyAccess=main drops it",
            ready.pid
        );
        ensure!(before.is_empty(), "messages before READY=1: {before:?}");

        let exit = agent.stop()?;
        ensure!(exit.success(), "agent exited with {exit} on SIGTERM");
        let (stopping, _) = notify.wait_for("STOPPING=1", Duration::from_secs(2), || Ok(()))?;
        ensure!(
            stopping.pid == pid,
            "STOPPING=1 came from pid {}, not {pid}",
            stopping.pid
        );
        ensure!(
            !ns.has_link(&ifname),
            "{ifname} survived the agent's clean exit"
        );
        ensure!(
            !agent.socket.exists(),
            "admin socket {} left behind",
            agent.socket.display()
        );
        Ok(())
    })
}

#[test]
fn agent_never_reports_ready_when_start_up_fails() -> Result<()> {
    if !require_root() || !require_tool("ip") {
        return Ok(());
    }
    e2e("sd-fail", |env| {
        let ns = env.netns("n")?;
        let spec = AgentSpec::new("100.96.0.1/32");
        let (ifname, metrics) = (spec.ifname.clone(), spec.metrics_listen.clone());
        let mut agent = Agent::new(env, &ns, "a", Keypair::generate()?, spec)?;
        // The metrics port is the last listener bound, after the interface is configured.
        let _taken = ns.run(|| std::net::TcpListener::bind(&metrics))??;

        let notify = NotifySocket::bind(&env.path("notify.sock"))?;
        let socket = notify.path().to_str().context("socket path is not UTF-8")?;
        agent.spawn_with_env(&[("NOTIFY_SOCKET", socket)])?;
        let exit = agent
            .wait_exit(Duration::from_secs(15))?
            .context("agent kept running with its metrics port taken")?;
        ensure!(
            !exit.success(),
            "agent exited 0 though it could not start; Restart=on-failure would not retry"
        );
        let mut received = Vec::new();
        while let Some(n) = notify.recv(Duration::from_millis(200))? {
            received.push(n);
        }
        ensure!(
            !received.iter().any(|n| n.has("READY=1")),
            "READY=1 sent by an agent that failed to start: {received:?}"
        );
        ensure!(
            agent.log().contains("[metrics] listen"),
            "the failure does not name the setting to fix:\n{}",
            agent.log()
        );
        ensure!(
            !ns.has_link(&ifname),
            "{ifname} left behind by the failed start"
        );
        ensure!(
            !agent.socket.exists(),
            "admin socket {} left behind by the failed start",
            agent.socket.display()
        );
        Ok(())
    })
}
