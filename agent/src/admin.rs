//! The admin socket: a Unix socket (mode 0600) on which the running daemon answers
//! `status` with one JSON document, and the client side used by
//! `skymesh-agent status`. It reads the core's state; it must not change it.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

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
    /// The path to each destination peer.
    #[serde(default)]
    pub routes: Vec<RouteStatusJson>,
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
pub struct RouteStatusJson {
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

/// Binds the admin socket with mode 0600, replacing a stale socket file left by a
/// killed daemon but refusing to steal one that a live daemon still answers on.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "admin socket {} is in use by a running agent; stop it first or set [admin] socket to another path",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    // The umask closes the window between bind() and chmod() in which the socket
    // would otherwise exist with the default mode.
    // SAFETY: umask only swaps the process file-mode mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until the listener fails; `status` builds the answer.
pub async fn serve(listener: UnixListener, status: impl Fn() -> Status + Send + Sync + 'static) {
    let status = std::sync::Arc::new(status);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read).take(1024);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let body = match line.trim() {
                "status" => serde_json::to_string(&status()).unwrap_or_default(),
                other => serde_json::json!({
                    "error": format!("unknown admin command {other:?}; the only command is \"status\"")
                })
                .to_string(),
            };
            let _ = write.write_all(body.as_bytes()).await;
            let _ = write.write_all(b"\n").await;
        });
    }
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
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
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
        if let Some(r) = s.routes.iter().find(|r| r.dest == p.name) {
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
            routes: vec![RouteStatusJson {
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
    }
}
