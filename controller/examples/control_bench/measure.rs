//! Measurement helpers: CPU time and memory from /proc, percentiles, the
//! open-files limit, temp dirs and formatting.

use anyhow::{anyhow, Context, Result};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Linux reports utime/stime in USER_HZ ticks, 100 per second on every
/// architecture the kernel exposes to user space.
const USER_HZ: f64 = 100.0;

/// User + system CPU time of every thread of a process so far, from its
/// /proc/PID/stat.
pub(crate) fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the command name, which ends with the last ')'; utime and
    // stime are fields 14 and 15, i.e. the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ticks: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    ticks.iter().sum::<f64>() / USER_HZ
}

/// CPU seconds of the controller and of this process.
#[derive(Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) controller: f64,
    pub(crate) bench: f64,
}

impl Cpu {
    pub(crate) fn now(controller_seconds: f64) -> Self {
        Self {
            controller: controller_seconds,
            bench: cpu_seconds("/proc/self/stat"),
        }
    }

    /// CPU used from `self` to `later`, divided by `per` (1.0 for seconds,
    /// the wall time for a share of a core).
    pub(crate) fn to(self, later: Cpu, per: f64) -> Self {
        Self {
            controller: (later.controller - self.controller) / per,
            bench: (later.bench - self.bench) / per,
        }
    }
}

#[derive(Clone, Copy, Default)]
pub(crate) struct Memory {
    pub(crate) rss: u64,
    pub(crate) hwm: u64,
}

/// VmRSS and VmHWM of a /proc/PID/status file, in bytes.
pub(crate) fn memory(status: &Path) -> Result<Memory> {
    let text =
        std::fs::read_to_string(status).with_context(|| format!("reading {}", status.display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| anyhow!("{name} missing in {}", status.display()))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

#[derive(Default)]
pub(crate) struct Percentiles {
    pub(crate) p50: Duration,
    pub(crate) p90: Duration,
    pub(crate) p99: Duration,
    pub(crate) max: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles of sorted samples.
    pub(crate) fn of(sorted: &[Duration]) -> Self {
        let rank = |q: f64| {
            let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
            sorted.get(i).copied().unwrap_or_default()
        };
        Self {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

/// Raises the soft open-files limit to the hard one; returns the new soft limit.
pub(crate) fn raise_nofile_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the rlimit struct we pass,
    // which lives on this stack frame for the duration of the call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
            }
        }
    }
    Ok(lim.rlim_cur)
}

pub(crate) fn tempdir_in(parent: Option<&Path>, prefix: &str) -> Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    match parent {
        Some(p) => b.tempdir_in(p),
        None => b.tempdir(),
    }
    .with_context(|| format!("creating a {prefix}* temp dir"))
}

pub(crate) fn progress(msg: String) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "== {msg}");
}

pub(crate) fn fmt_dur(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
