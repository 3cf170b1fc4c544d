//! Child processes for the lab: one-shot commands with captured output, and long-running
//! ones behind a guard that stops them on drop and keeps their output in a log file.

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Renders a command line for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs a command to completion with stdin closed and returns its output, whatever its exit code.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning `{}`", describe(cmd)))
}

/// Runs a command that must succeed; returns its stdout, or an error quoting its stderr.
pub fn check(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command feeding `input` on stdin; returns its output whatever its exit code.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<Output> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{}`", describe(cmd)))?;
    {
        let mut stdin = child.stdin.take().context("child stdin was not piped")?;
        stdin.write_all(input).context("writing child stdin")?;
    }
    child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", describe(cmd)))
}

/// A long-running child process, stopped (SIGTERM, then SIGKILL) when dropped.
///
/// Its stdout and stderr go to a log file so a test can wait for a line or show the
/// log after a failure.
pub struct Spawned {
    label: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Spawned {
    /// Starts `cmd` with its output appended to `log`.
    pub fn start(label: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = file.try_clone().context("cloning log file handle")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning `{}`", describe(&cmd)))?;
        Ok(Self {
            label: label.to_string(),
            child,
            log: log.to_path_buf(),
            status: None,
        })
    }

    /// The process id (the program itself: `ip netns exec` execs it in place).
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Path of the log file holding its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("polling {}", self.label))?;
        }
        Ok(self.status)
    }

    /// Fails with the log tail if the process has already exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.try_status()? {
            bail!(
                "{} exited unexpectedly ({status}); log tail:\n{}",
                self.label,
                crate::tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Sends a signal (if the process is still there).
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_status()?.is_none() {
            kill(self.pid(), sig).with_context(|| format!("sending {sig} to {}", self.label))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for a clean exit; an error if it does not exit in `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "{} did not exit within {timeout:?} of SIGTERM; log tail:\n{}",
                self.label,
                crate::tail(&self.log, 30)
            ),
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        match self.wait_timeout(Duration::from_secs(10))? {
            Some(status) => Ok(status),
            None => bail!("{} survived SIGKILL for 10 s", self.label),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.try_status(), Ok(Some(_))) {
            return;
        }
        let _ = self.signal(Signal::SIGTERM);
        if !matches!(self.wait_timeout(Duration::from_secs(3)), Ok(Some(_))) {
            let _ = self.signal(Signal::SIGKILL);
            let _ = self.wait_timeout(Duration::from_secs(3));
        }
    }
}
