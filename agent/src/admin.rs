//! The admin socket: a Unix socket (mode 0600) on which the running daemon answers
//! `status` with one JSON document, and the client side used by
//! `skymesh-agent status`. It reads the core's state; it must not change it.

use crate::listen::{self, Backoff, Conn, Conns, Deadlines};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub interface: InterfaceStatus,
    pub peers: Vec<PeerStatusJson>,
    /// Dropped packets by reason (every reason, zeros included).
    pub drops: BTreeMap<String, u64>,
    pub handshake_cookie_replies: u64,
    /// Link checks that ran more than 50 ms late (the agent's timers did not
    /// run); that time is not counted as probe silence.
    #[serde(default)]
    pub link_check_stalls: u64,
    /// Controller mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerStatus>,
    /// What the probes measure on each link.
    #[serde(default)]
    pub links: Vec<LinkStatusJson>,
    /// The path to each destination peer (`routes` in the JSON, as before
    /// paths had their own name).
    #[serde(default, rename = "routes")]
    pub paths: Vec<PathStatusJson>,
}

/// One link's probe measurements.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkStatusJson {
    pub peer: String,
    pub up: bool,
    /// Smoothed round-trip time; absent before the first sample.
    pub rtt_ms: Option<f64>,
    pub jitter_ms: f64,
    /// Probes lost over the window, both directions pooled (1.0 while down).
    pub loss: f64,
    pub probes_sent: u64,
    pub probes_received: u64,
}

/// The path to one destination: "direct" or a transit node's name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PathStatusJson {
    pub dest: String,
    pub primary: String,
    pub backup: Option<String>,
    /// The path in use now.
    pub active: String,
    pub changes: u64,
    pub failovers: u64,
}

/// The agent's view of its controller.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ControllerStatus {
    /// This node's name, as enrolled.
    pub node: String,
    /// The controller of the open session, if any.
    pub connected: Option<String>,
    /// Why the last session ended.
    pub last_error: Option<String>,
    /// Sequence (controller store revision) of the netmap applied last.
    pub netmap_seq: u64,
    /// Whether the applied netmap came from the on-disk cache (the controller
    /// has not been reached since start).
    pub from_cache: bool,
    /// Advertised prefixes the mesh routes here.
    pub prefixes: Vec<String>,
    /// Advertised prefixes the controller refused, with why.
    pub rejected_prefixes: Vec<RejectedPrefixStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RejectedPrefixStatus {
    pub cidr: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InterfaceStatus {
    pub name: String,
    pub public_key: String,
    pub listen_port: u16,
    pub address: Option<String>,
    pub mtu: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatusJson {
    pub name: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Unix time of the last completed handshake.
    pub latest_handshake_unix: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub persistent_keepalive: Option<u16>,
}

/// The bound admin socket and the file it created. Dropping it removes the file, but
/// only while the path still holds the very socket this process bound (same device and
/// inode): whatever another process or an operator put there since is left alone.
#[derive(Debug)]
pub struct AdminSocket {
    pub listener: UnixListener,
    file: SocketFile,
}

impl AdminSocket {
    /// Splits off the listener; the returned guard removes the socket file on drop.
    pub fn into_parts(self) -> (UnixListener, SocketFile) {
        (self.listener, self.file)
    }
}

/// Removes the admin socket file on drop, if it is still the one this process bound.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the admin socket with mode 0600, replacing a stale socket file left by a
/// killed daemon but refusing to steal one that a live daemon still answers on.
///
/// Only a socket is ever deleted: a regular file, a directory, a FIFO or a symlink at
/// the path (a typo pointing `[admin] socket` at the private key, say) is refused
/// with an error naming the path, and left as it is.
pub async fn bind(path: &Path) -> Result<AdminSocket> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    remove_stale_socket(path).await?;
    // The umask closes the window between bind() and chmod() in which the socket
    // would otherwise exist with the default mode.
    // SAFETY: umask only swaps the process file-mode mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding admin socket {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("reading the new admin socket {}", path.display()))?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(AdminSocket { listener, file })
}

/// Makes room for the socket: nothing there is fine, a socket whose connect is
/// refused (nobody listens) is deleted, anything else is refused.
async fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("inspecting admin socket path {}", path.display()))
        }
    };
    let kind = meta.file_type();
    if !kind.is_socket() {
        let what = if kind.is_symlink() {
            "a symbolic link"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_file() {
            "a regular file"
        } else {
            "a device or other special file"
        };
        bail!(
            "[admin] socket = {:?}: the path is {what}, not a socket; the agent only replaces a stale socket and will not delete it. Set [admin] socket to a path of its own (default {})",
            path.display().to_string(),
            crate::config::DEFAULT_ADMIN_SOCKET
        );
    }
    // Only ECONNREFUSED proves nobody holds the socket. A datagram socket or a
    // seqpacket listener (EPROTOTYPE), a listener with a full backlog (EAGAIN) or a
    // socket we may not open (EACCES) may all belong to a live program.
    match UnixStream::connect(path).await {
        Ok(_) => bail!(
            "admin socket {} is in use by a running agent; stop it first or set [admin] socket to another path",
            path.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(e) => bail!(
            "[admin] socket = {:?}: a socket is there and connecting to it failed with \"{e}\", not \"connection refused\"; it may belong to a live program, so the agent will not delete it. Set [admin] socket to a path of its own (default {}), or remove the socket if you know it is stale",
            path.display().to_string(),
            crate::config::DEFAULT_ADMIN_SOCKET
        ),
    }
    std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))
}

/// Connections the admin socket serves at once; at the cap the one that has waited
/// longest for its command makes room.
pub const MAX_CONNECTIONS: usize = 64;
/// How long one exchange (the command line in, the answer out) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest command line read; the only command is `status`.
const MAX_COMMAND: u64 = 1024;

/// Serves requests for ever; `status` builds the answer. Accept errors (out of
/// descriptors) pause the loop with back-off instead of spinning.
pub async fn serve(listener: UnixListener, status: impl Fn() -> Status + Send + Sync + 'static) {
    let status = Arc::new(status);
    let conns = Conns::new(MAX_CONNECTIONS);
    let mut backoff = Backoff::default();
    loop {
        let stream = listen::accept(&listener, &mut backoff, "admin").await;
        let (admission, conn) = conns.admit(Instant::now());
        let Some(conn) = conn else {
            tracing::debug!(
                ?admission,
                "admin socket: every connection is busy; closing a new one"
            );
            continue;
        };
        let status = status.clone();
        let limits = Deadlines {
            header: REQUEST_TIMEOUT,
            idle: None,
            write_stall: REQUEST_TIMEOUT,
        };
        tokio::spawn(async move {
            let exchange = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &conn, &*status));
            conn.supervise(&limits, exchange).await;
        });
    }
}

/// One exchange: a command line in, one JSON line out.
async fn answer(stream: UnixStream, conn: &Conn, status: &(dyn Fn() -> Status + Send + Sync)) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::with_capacity(MAX_COMMAND as usize, read).take(MAX_COMMAND);
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    conn.busy();
    let body = match line.trim() {
        "status" => serde_json::to_string(&status()).unwrap_or_default(),
        other => serde_json::json!({
            "error": format!("unknown admin command {other:?}; the only command is \"status\"")
        })
        .to_string(),
    };
    let _ = write.write_all(body.as_bytes()).await;
    let _ = write.write_all(b"\n").await;
}

/// Asks the daemon behind `path` for its status.
pub async fn query(path: &Path) -> Result<Status> {
    let mut stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach the agent's admin socket {} (is `skymesh-agent run` running with this config, and are you root?)",
            path.display()
        )
    })?;
    stream.write_all(b"status\n").await?;
    let mut bytes = Vec::new();
    (&mut stream)
        .take(crate::config::bounded::STATUS_LIMIT + 1)
        .read_to_end(&mut bytes)
        .await?;
    let body = crate::config::bounded::into_string(bytes, crate::config::bounded::STATUS_LIMIT)
        .with_context(|| format!("reading the answer on admin socket {}", path.display()))?;
    serde_json::from_str(&body).with_context(|| format!("unexpected answer from the agent: {body}"))
}

/// The `wg show`-like text rendering of a status.
pub fn render_table(s: &Status, now_unix: u64) -> String {
    let mut out = String::new();
    out.push_str(&format!("interface: {}\n", s.interface.name));
    out.push_str(&format!("  public key: {}\n", s.interface.public_key));
    out.push_str(&format!("  listening port: {}\n", s.interface.listen_port));
    if let Some(a) = &s.interface.address {
        out.push_str(&format!("  address: {a}\n"));
    }
    out.push_str(&format!("  mtu: {}\n", s.interface.mtu));
    if let Some(c) = &s.controller {
        out.push_str(&format!(
            "\ncontroller: {}\n",
            match &c.connected {
                Some(addr) => format!("connected to {addr}"),
                None => format!(
                    "not connected ({})",
                    c.last_error.as_deref().unwrap_or("connecting")
                ),
            }
        ));
        out.push_str(&format!("  node: {}\n", c.node));
        out.push_str(&format!(
            "  netmap: seq {}{}\n",
            c.netmap_seq,
            if c.from_cache { " (from cache)" } else { "" }
        ));
        if !c.prefixes.is_empty() {
            out.push_str(&format!("  prefixes: {}\n", c.prefixes.join(", ")));
        }
        for r in &c.rejected_prefixes {
            out.push_str(&format!("  REFUSED prefix {}: {}\n", r.cidr, r.reason));
        }
    }
    for p in &s.peers {
        out.push_str(&format!("\npeer: {} ({})\n", p.name, p.public_key));
        out.push_str(&format!(
            "  endpoint: {}\n",
            p.endpoint.as_deref().unwrap_or("(none)")
        ));
        out.push_str(&format!("  allowed ips: {}\n", p.allowed_ips.join(", ")));
        let hs = match p.latest_handshake_unix {
            Some(t) => format!("{} ago", human_duration(now_unix.saturating_sub(t))),
            None => "(none)".to_string(),
        };
        out.push_str(&format!("  latest handshake: {hs}\n"));
        out.push_str(&format!(
            "  transfer: {} received, {} sent\n",
            human_bytes(p.rx_bytes),
            human_bytes(p.tx_bytes)
        ));
        if let Some(l) = s.links.iter().find(|l| l.peer == p.name) {
            out.push_str(&format!(
                "  link: {}, rtt {}, jitter {:.1} ms, loss {:.1}%\n",
                if l.up { "up" } else { "DOWN" },
                l.rtt_ms
                    .map(|r| format!("{r:.1} ms"))
                    .unwrap_or_else(|| "-".into()),
                l.jitter_ms,
                l.loss * 100.0
            ));
        }
        if let Some(r) = s.paths.iter().find(|r| r.dest == p.name) {
            let backup = r.backup.as_deref().unwrap_or("none");
            out.push_str(&format!(
                "  path: via {} (primary {}, backup {backup}; {} failovers)\n",
                r.active, r.primary, r.failovers
            ));
        }
        if let Some(k) = p.persistent_keepalive {
            out.push_str(&format!("  persistent keepalive: every {k} seconds\n"));
        }
    }
    let dropped: Vec<String> = s
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    if !dropped.is_empty() {
        out.push_str(&format!("\ndropped packets: {}\n", dropped.join(" ")));
    }
    out
}

fn human_duration(secs: u64) -> String {
    let (m, s) = (secs / 60, secs % 60);
    let (h, m) = (m / 60, m % 60);
    match (h, m) {
        (0, 0) => format!("{s} seconds"),
        (0, _) => format!("{m} minutes, {s} seconds"),
        _ => format!("{h} hours, {m} minutes, {s} seconds"),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_peers_like_wg_show() {
        let s = Status {
            interface: InterfaceStatus {
                name: "skymesh0".into(),
                public_key: "PUB".into(),
                listen_port: 51820,
                address: Some("100.96.0.1/32".into()),
                mtu: 1420,
            },
            peers: vec![PeerStatusJson {
                name: "gcp-gw".into(),
                public_key: "KEY".into(),
                endpoint: Some("198.51.100.7:51820".into()),
                allowed_ips: vec!["100.96.0.2/32".into(), "10.10.0.0/16".into()],
                latest_handshake_unix: Some(1000),
                rx_bytes: 3 * 1024 * 1024,
                tx_bytes: 500,
                rx_packets: 1,
                tx_packets: 1,
                persistent_keepalive: Some(25),
            }],
            drops: BTreeMap::from([("replay".to_string(), 2), ("malformed".to_string(), 0)]),
            handshake_cookie_replies: 0,
            link_check_stalls: 0,
            controller: None,
            links: vec![LinkStatusJson {
                peer: "gcp-gw".into(),
                up: true,
                rtt_ms: Some(20.25),
                jitter_ms: 0.5,
                loss: 0.031,
                probes_sent: 10,
                probes_received: 9,
            }],
            paths: vec![PathStatusJson {
                dest: "gcp-gw".into(),
                primary: "azure".into(),
                backup: Some("direct".into()),
                active: "direct".into(),
                changes: 1,
                failovers: 1,
            }],
        };
        let t = render_table(&s, 1075);
        assert!(
            t.contains("link: up, rtt 20.2 ms, jitter 0.5 ms, loss 3.1%"),
            "{t}"
        );
        assert!(
            t.contains("path: via direct (primary azure, backup direct; 1 failovers)"),
            "{t}"
        );
        assert!(t.contains("peer: gcp-gw (KEY)"), "{t}");
        assert!(
            t.contains("latest handshake: 1 minutes, 15 seconds ago"),
            "{t}"
        );
        assert!(t.contains("transfer: 3.00 MiB received, 500 B sent"), "{t}");
        assert!(t.contains("dropped packets: replay=2\n"), "{t}");
        // The JSON keeps its field name from before paths were named apart
        // from routes: scripts read `status --json`.
        let json = serde_json::to_value(&s).expect("status json");
        assert_eq!(json["routes"][0]["primary"], "azure");
        assert!(json.get("paths").is_none());
    }
}

#[cfg(test)]
mod bind_tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("skymesh-admin-bind-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// What is at the socket path before `bind`, and how to check it is still there after.
    enum Before {
        File,
        Dir,
        Fifo,
        SymlinkToFile,
        DanglingSymlink,
    }

    #[tokio::test]
    async fn bind_never_deletes_what_is_not_a_socket() {
        let dir = scratch("not-socket");
        for (i, before) in [
            Before::File,
            Before::Dir,
            Before::Fifo,
            Before::SymlinkToFile,
            Before::DanglingSymlink,
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.join(format!("case{i}.sock"));
            let target = dir.join(format!("case{i}.key"));
            std::fs::write(&target, "secret\n").expect("target");
            match before {
                Before::File => std::fs::write(&path, "private key\n").expect("file"),
                Before::Dir => std::fs::create_dir(&path).expect("dir"),
                Before::Fifo => {
                    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("fifo")
                }
                Before::SymlinkToFile => {
                    std::os::unix::fs::symlink(&target, &path).expect("symlink")
                }
                Before::DanglingSymlink => {
                    std::os::unix::fs::symlink(dir.join("nowhere"), &path).expect("symlink")
                }
            }
            let kind = std::fs::symlink_metadata(&path).expect("meta").file_type();
            let err = bind(&path).await.map(|_| ()).expect_err("must refuse");
            let msg = format!("{err:#}");
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains("[admin] socket"),
                "case {i}: {msg}"
            );
            let after = std::fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("case {i}: {} was deleted: {e}", path.display()))
                .file_type();
            assert_eq!(after, kind, "case {i}: the file type changed");
            assert_eq!(
                std::fs::read_to_string(&target).expect("target survives"),
                "secret\n"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_not_a_live_one() {
        let dir = scratch("sockets");
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("stale"));
        assert!(std::fs::symlink_metadata(&stale)
            .expect("left behind")
            .file_type()
            .is_socket());
        let bound = bind(&stale).await.expect("a stale socket is replaced");
        drop(bound);

        let live = dir.join("live.sock");
        let _other = std::os::unix::net::UnixListener::bind(&live).expect("live");
        let err = bind(&live).await.map(|_| ()).expect_err("live socket");
        assert!(format!("{err:#}").contains("in use"), "{err:#}");
        assert!(
            std::fs::symlink_metadata(&live).is_ok(),
            "live socket deleted"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
