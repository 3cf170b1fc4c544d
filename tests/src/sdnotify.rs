//! A stand-in for systemd's notification socket (`$NOTIFY_SOCKET`), so a test can watch
//! what a `Type=notify` daemon tells its service manager, and which process sent it.
//!
//! Owns: binding the datagram socket in the test's scratch directory and decoding each
//! message with the sender's credentials. It must not interpret the states; tests do.

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use std::io::{ErrorKind, IoSliceMut};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One notification datagram: its `KEY=VALUE` lines and the sending process.
#[derive(Clone, Debug)]
pub struct Notification {
    /// Pid of the sender (from `SCM_CREDENTIALS`, as systemd checks for `NotifyAccess=`).
    pub pid: i32,
    /// The assignments, in order (`READY=1`, `STOPPING=1`, `STATUS=…`).
    pub lines: Vec<String>,
}

impl Notification {
    /// Whether the message carries exactly the assignment `line` (e.g. `"READY=1"`).
    pub fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
}

/// A bound notification socket; its file is removed on drop.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds a datagram socket at `path` that reports each sender's credentials.
    pub fn bind(path: &Path) -> Result<Self> {
        let sock =
            UnixDatagram::bind(path).with_context(|| format!("binding {}", path.display()))?;
        setsockopt(&sock, sockopt::PassCred, &true).context("setting SO_PASSCRED")?;
        Ok(Self {
            sock,
            path: path.to_path_buf(),
        })
    }

    /// The path to put in `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for the next message; `None` if none came.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Notification>> {
        // SO_RCVTIMEO rejects a zero duration (it means "block forever").
        let timeout = timeout.max(Duration::from_millis(1));
        self.sock
            .set_read_timeout(Some(timeout))
            .context("setting SO_RCVTIMEO")?;
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(cmsg.as_mut_slice()),
            MsgFlags::empty(),
        ) {
            Ok(msg) => msg,
            Err(e) if matches!(std::io::Error::from(e).kind(), ErrorKind::WouldBlock) => {
                return Ok(None)
            }
            Err(e) => return Err(e).context("receiving a notification"),
        };
        let mut pid = None;
        for c in msg.cmsgs().context("reading control messages")? {
            if let ControlMessageOwned::ScmCredentials(creds) = c {
                pid = Some(creds.pid());
            }
        }
        let len = msg.bytes;
        let Some(pid) = pid else {
            bail!("notification without sender credentials (SO_PASSCRED is set)");
        };
        let text = String::from_utf8_lossy(&buf[..len]);
        Ok(Some(Notification {
            pid,
            lines: text.lines().map(str::to_string).collect(),
        }))
    }

    /// Waits up to `timeout` for a message carrying `line`, returning it and every message
    /// received before it; fails early (with the messages so far) if `give_up` says so.
    pub fn wait_for(
        &self,
        line: &str,
        timeout: Duration,
        mut give_up: impl FnMut() -> Result<()>,
    ) -> Result<(Notification, Vec<Notification>)> {
        let start = Instant::now();
        let mut before = Vec::new();
        while start.elapsed() < timeout {
            match self.recv(Duration::from_millis(100))? {
                Some(n) if n.has(line) => return Ok((n, before)),
                Some(n) => before.push(n),
                None => give_up()
                    .with_context(|| format!("waiting for {line}; received before: {before:?}"))?,
            }
        }
        bail!("no {line} within {timeout:?}; received before: {before:?}")
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
