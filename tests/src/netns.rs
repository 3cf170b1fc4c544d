//! Network namespaces and the veth links between them.
//!
//! Owns: creating uniquely named namespaces, deleting them (and killing whatever runs in
//! them) on drop, sweeping leftovers, running commands and Rust closures inside them, and
//! wiring/cutting veth links. It must not touch the root namespace's interfaces.

use crate::proc::{check, output};
use anyhow::{anyhow, bail, Context, Result};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Prefix of every namespace and scratch directory this process creates.
pub fn prefix() -> String {
    format!("smt-{}-", std::process::id())
}

/// Names of all named network namespaces (`ip netns list`).
pub fn list_namespaces() -> Vec<String> {
    let Ok(out) = output(Command::new("ip").args(["netns", "list"])) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Pids of the processes running in namespace `name`.
fn pids_in(name: &str) -> Vec<Pid> {
    let Ok(out) = output(Command::new("ip").args(["netns", "pids", name])) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok().map(Pid::from_raw))
        .collect()
}

/// Kills everything in namespace `name` (SIGTERM, then SIGKILL) and deletes it.
pub fn destroy(name: &str) {
    let pids = pids_in(name);
    for pid in &pids {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    if !pids.is_empty() {
        let start = Instant::now();
        while !pids_in(name).is_empty() && start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in pids_in(name) {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
    let _ = output(Command::new("ip").args(["netns", "del", name]));
}

/// Deletes leftovers of earlier test processes that died without cleaning up.
fn sweep_dead_processes() {
    for name in list_namespaces() {
        let Some(rest) = name.strip_prefix("smt-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            destroy(&name);
        }
    }
}

/// Deletes every namespace carrying this process's prefix (best effort, at exit).
pub fn sweep_own() {
    let own = prefix();
    for name in list_namespaces() {
        if name.starts_with(&own) {
            destroy(&name);
        }
    }
}

extern "C" fn sweep_own_at_exit() {
    sweep_own();
}

/// Runs the sweeps once per process: dead leftovers now, our own at exit.
fn install_sweeps() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        sweep_dead_processes();
        // SAFETY: registers a plain `extern "C" fn()` with no captured state; it only
        // runs `ip` commands, which is sound at exit since no Rust state is borrowed.
        unsafe {
            libc::atexit(sweep_own_at_exit);
        }
    });
}

/// Runs `f` on a thread that has joined namespace `name`, and returns its result.
///
/// Sockets created inside `f` stay in that namespace even when used from other threads,
/// so a test can open them here and use them anywhere.
pub fn run_in_netns<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> Result<T> {
    let path = PathBuf::from("/var/run/netns").join(name);
    let fd = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let joined = std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", path.display()))?;
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A named network namespace with `lo` up, deleted (with its processes) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `smt-<pid>-<n>-<role>` and brings up its loopback.
    pub fn new(role: &str) -> Result<Self> {
        install_sweeps();
        let name = format!("{}{}-{role}", prefix(), crate::next_id());
        check(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates a namespace with exactly this name (the lab's `<prefix>-<lab id>-…`
    /// names) and brings up its loopback; fails if it exists.
    pub fn named(name: &str) -> Result<Self> {
        check(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program args…` inside this namespace.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd
    }

    /// Runs a command inside the namespace, returning its output whatever the exit code.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        output(&mut self.command(program, args))
    }

    /// Runs a command inside the namespace that must succeed; returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        check(&mut self.command(program, args))
    }

    /// Starts a long-running `program args…` in the namespace, logging to `<label>.log` in
    /// the test's scratch dir; the guard stops it on drop.
    pub fn spawn(
        &self,
        env: &crate::TestEnv,
        label: &str,
        program: &str,
        args: &[&str],
    ) -> Result<crate::proc::Spawned> {
        let log = env.path(&format!("{label}.log"));
        crate::proc::Spawned::start(label, self.command(program, args), &log)
    }

    /// Runs `ip -n <ns> args…`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        check(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs a Rust closure inside the namespace (see [`run_in_netns`]).
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        run_in_netns(&self.name, f)
    }

    /// Sets a sysctl inside the namespace (`/proc/sys/net` is per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Adds `cidr` to `lo`: a stand-in for a VPC subnet behind a gateway (the kernel has no
    /// dummy module, and a local address answers pings just as well).
    pub fn add_local_address(&self, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", "lo"])?;
        Ok(())
    }

    /// Whether interface `ifname` exists in this namespace.
    pub fn has_link(&self, ifname: &str) -> bool {
        output(Command::new("ip").args(["-n", &self.name, "link", "show", "dev", ifname]))
            .is_ok_and(|o| o.status.success())
    }

    /// Loads an nft ruleset (from text) into this namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let mut cmd = self.command("nft", &["-f", "-"]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())
            .context("writing nft ruleset")?;
        let out = child.wait_with_output().context("waiting for nft")?;
        if !out.status.success() {
            bail!(
                "nft -f failed in {}: {}\nruleset:\n{ruleset}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Silently drops everything arriving on `ifname` (a WAN black hole, not an error).
    pub fn blackhole(&self, ifname: &str) -> Result<()> {
        self.nft(&format!(
            "table inet smt_cut_{ifname} {{\n  chain input {{\n    type filter hook input priority -300; policy accept;\n    iifname \"{ifname}\" drop\n  }}\n}}\n"
        ))
    }

    /// Removes the black hole set by [`Netns::blackhole`].
    pub fn unblackhole(&self, ifname: &str) -> Result<()> {
        self.exec(
            "nft",
            &["delete", "table", "inet", &format!("smt_cut_{ifname}")],
        )?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        destroy(&self.name);
    }
}

/// A veth link between two namespaces, with an underlay address on each end.
pub struct Veth {
    /// Namespace of end A.
    pub a_ns: String,
    /// Namespace of end B.
    pub b_ns: String,
    /// Interface name used on both ends.
    pub ifname: String,
    /// Address of end A (without prefix length).
    pub a_ip: String,
    /// Address of end B (without prefix length).
    pub b_ip: String,
}

impl Veth {
    /// Creates `ifname` in both `a` and `b`, assigns `a_cidr`/`b_cidr`, disables IPv6 on it
    /// (so captures hold only what the test sends) and brings both ends up.
    pub fn connect(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str, ifname: &str) -> Result<Self> {
        if ifname.len() > 15 {
            bail!("interface name {ifname:?} is longer than 15 characters");
        }
        a.ip(&[
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            ifname,
            "netns",
            b.name(),
        ])?;
        for (ns, cidr) in [(a, a_cidr), (b, b_cidr)] {
            ns.sysctl(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "1")?;
            ns.ip(&["addr", "add", cidr, "dev", ifname])?;
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        let host = |cidr: &str| -> Result<String> {
            cidr.split('/')
                .next()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("bad cidr {cidr}"))
        };
        Ok(Self {
            a_ns: a.name().to_string(),
            b_ns: b.name().to_string(),
            ifname: ifname.to_string(),
            a_ip: host(a_cidr)?,
            b_ip: host(b_cidr)?,
        })
    }

    /// Sets end A's interface down (the kernel then drops the connected route too).
    pub fn set_down(&self) -> Result<()> {
        check(Command::new("ip").args(["-n", &self.a_ns, "link", "set", &self.ifname, "down"]))?;
        Ok(())
    }

    /// Brings end A's interface back up.
    pub fn set_up(&self) -> Result<()> {
        check(Command::new("ip").args(["-n", &self.a_ns, "link", "set", &self.ifname, "up"]))?;
        Ok(())
    }
}
