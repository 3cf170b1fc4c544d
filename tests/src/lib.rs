//! The skymesh network-namespace lab: a harness that builds throw-away topologies out of
//! network namespaces and veth links, runs the real binaries inside them, and reads
//! what a user would read (ping, TCP transfers, `status`, `/metrics`, packet captures).
//!
//! Everything a test creates (namespaces, processes, files) is owned by a guard that
//! removes it on drop, so a failing or panicking test leaves nothing behind. This crate
//! must not touch anything outside the namespaces and scratch directories it creates.

pub mod agent;
pub mod ai;
pub mod ai_backend;
pub mod lab;
pub mod machine;
pub mod metrics;
pub mod netns;
pub mod pcap;
pub mod proc;
pub mod sdnotify;
pub mod topo;
pub mod traffic;
pub mod wan;
pub mod wggo;

pub use agent::{agent_bin, Agent, AgentSpec, Keypair, PeerSpec, Status};
pub use netns::{run_in_netns, Netns, Veth};
pub use proc::Spawned;

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Workspace-unique counter, so parallel tests in one process never pick the same name.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Returns a fresh number for naming namespaces, directories and interfaces.
pub fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// True when running under CI, where a missing prerequisite must fail, not skip.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Reports a missing prerequisite: a panic in CI, a visible "SKIPPED" line elsewhere.
fn missing(what: &str) -> bool {
    if in_ci() {
        panic!("CI is set but {what}: the end-to-end tests cannot run");
    }
    // Straight to the stderr handle: libtest captures `eprintln!`, and a skip must be seen.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}");
    false
}

/// Checks the tests can create namespaces (they need root). When they cannot:
/// a panic in CI (`CI` set), elsewhere a visible "SKIPPED" line and `false`.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        missing("not running as root (network namespaces need root)")
    }
}

/// Checks an external tool is on `PATH`; when it is not, the same as
/// [`require_root`]: a panic in CI, else a "SKIPPED" line and `false`.
pub fn require_tool(tool: &str) -> bool {
    if find_in_path(tool).is_some() {
        true
    } else {
        missing(&format!("`{tool}` is not installed (not found on PATH)"))
    }
}

/// Locates an executable on `PATH`, like `which`.
pub fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes; returns how long it took.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Per-test context: a scratch directory for configs, keys, logs and captures.
///
/// Exists so a failed test keeps its evidence: on failure the directory is kept and the
/// tail of every log in it is printed; on success it is removed.
pub struct TestEnv {
    /// Short test name, used in namespace and file names.
    pub name: String,
    /// Scratch directory, unique to this test in this process.
    pub dir: PathBuf,
}

impl TestEnv {
    /// Creates the scratch directory for test `name`.
    pub fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}{}-{name}", netns::prefix(), next_id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            name: name.to_string(),
            dir,
        })
    }

    /// A path inside the scratch directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Creates a namespace for role `role` (e.g. "a", "gw"), removed when dropped.
    pub fn netns(&self, role: &str) -> Result<Netns> {
        Netns::new(role)
    }

    /// Prints the tail of each `*.log` in the scratch directory, for post-mortems.
    pub fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            eprintln!("----- {} (last 40 lines) -----", log.display());
            eprintln!("{}", tail(&log, 40));
        }
    }
}

/// Returns the last `lines` lines of a text file (or a note that it can't be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Whether a passing test keeps its scratch directory too (`SKYMESH_KEEP_SCRATCH=1`),
/// to read the logs of a run that passed.
fn keep_scratch() -> bool {
    std::env::var("SKYMESH_KEEP_SCRATCH").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Runs one end-to-end test body with a [`TestEnv`]; keeps the evidence if it fails.
///
/// Guards created inside `body` (namespaces, processes) are dropped before this returns,
/// so processes are gone, but their logs in the scratch directory survive a failure.
pub fn e2e(name: &str, body: impl FnOnce(&TestEnv) -> Result<()>) -> Result<()> {
    let env = TestEnv::new(name)?;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&env)));
    match outcome {
        Ok(Ok(())) if keep_scratch() => {
            eprintln!(
                "kept scratch dir {} (SKYMESH_KEEP_SCRATCH)",
                env.dir.display()
            );
            Ok(())
        }
        Ok(Ok(())) => {
            let _ = std::fs::remove_dir_all(&env.dir);
            Ok(())
        }
        Ok(Err(e)) => {
            env.dump_logs();
            eprintln!("kept scratch dir {}", env.dir.display());
            Err(e)
        }
        Err(panic) => {
            env.dump_logs();
            eprintln!("kept scratch dir {}", env.dir.display());
            std::panic::resume_unwind(panic)
        }
    }
}
