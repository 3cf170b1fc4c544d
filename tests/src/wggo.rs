//! A stock WireGuard peer for interop tests: `wireguard-go` configured with `wg` and `ip`,
//! exactly as an operator would set it up.

use crate::agent::{write_secret, Keypair, PeerSpec};
use crate::netns::Netns;
use crate::proc::Spawned;
use crate::{next_id, wait_until, TestEnv};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;

/// A running `wireguard-go -f` in a namespace; SIGTERM on drop removes its interface.
pub struct WgGo {
    /// Interface name (unique per host: wireguard-go's UAPI socket path is not per namespace).
    pub ifname: String,
    /// Its key pair.
    pub keys: Keypair,
    ns: String,
    process: Spawned,
}

impl WgGo {
    /// Starts wireguard-go in `ns` with `address` (CIDR), `listen_port` and one peer.
    pub fn start(
        env: &TestEnv,
        ns: &Netns,
        keys: Keypair,
        address: &str,
        listen_port: u16,
        peer: &PeerSpec,
    ) -> Result<Self> {
        let ifname = format!("wg{}x{}", std::process::id() % 100_000, next_id());
        let log = env.path(&format!("wireguard-go-{ifname}.log"));
        let mut cmd = ns.command("wireguard-go", &["-f", &ifname]);
        cmd.env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .env("LOG_LEVEL", "debug");
        let mut process = Spawned::start(&format!("wireguard-go {ifname}"), cmd, &log)?;
        let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
        let up = wait_until(Duration::from_secs(10), || {
            sock.exists() || !matches!(process.try_status(), Ok(None))
        });
        process.ensure_running()?;
        if up.is_none() {
            bail!("wireguard-go did not create {}", sock.display());
        }
        let node = Self {
            ifname,
            keys,
            ns: ns.name().to_string(),
            process,
        };

        let key_file = env.path(&format!("{}.key", node.ifname));
        write_secret(&key_file, &format!("{}\n", node.keys.private))?;
        let key_arg = key_file
            .to_str()
            .context("key path is not UTF-8")?
            .to_string();
        let port = listen_port.to_string();
        let allowed = peer.allowed_ips.join(",");
        let mut args = vec![
            "set",
            node.ifname.as_str(),
            "private-key",
            key_arg.as_str(),
            "listen-port",
            port.as_str(),
            "peer",
            peer.public_key.as_str(),
            "allowed-ips",
            allowed.as_str(),
        ];
        if let Some(ep) = &peer.endpoint {
            args.extend(["endpoint", ep.as_str()]);
        }
        let keepalive = peer.persistent_keepalive.map(|k| k.to_string());
        if let Some(k) = &keepalive {
            args.extend(["persistent-keepalive", k.as_str()]);
        }
        ns.exec("wg", &args)?;
        ns.ip(&["addr", "add", address, "dev", &node.ifname])?;
        ns.ip(&["link", "set", &node.ifname, "up"])?;
        for prefix in &peer.allowed_ips {
            // The address is a /32, so the peer's prefixes need explicit routes (wg-quick's job).
            ns.ip(&["route", "replace", prefix, "dev", &node.ifname])?;
        }
        Ok(node)
    }

    /// `wg show <if> <what>` output.
    pub fn show(&self, what: &str) -> Result<String> {
        crate::proc::check(std::process::Command::new("ip").args([
            "netns",
            "exec",
            &self.ns,
            "wg",
            "show",
            &self.ifname,
            what,
        ]))
    }

    /// Latest handshake (unix seconds) with the peer `public_key`, per `wg show latest-handshakes`.
    pub fn latest_handshake(&self, public_key: &str) -> Result<u64> {
        let out = self.show("latest-handshakes")?;
        for line in out.lines() {
            let mut parts = line.split_whitespace();
            if parts.next() == Some(public_key) {
                return parts
                    .next()
                    .context("no timestamp column")?
                    .parse()
                    .with_context(|| format!("bad latest-handshakes line {line:?}"));
            }
        }
        bail!("peer {public_key} not in `wg show latest-handshakes`: {out}")
    }

    /// The endpoint `wg show endpoints` reports for `public_key` ("(none)" if unknown).
    pub fn endpoint(&self, public_key: &str) -> Result<String> {
        let out = self.show("endpoints")?;
        out.lines()
            .find_map(|l| {
                let mut parts = l.split_whitespace();
                (parts.next() == Some(public_key)).then(|| parts.next().unwrap_or("").to_string())
            })
            .with_context(|| format!("peer {public_key} not in `wg show endpoints`: {out}"))
    }

    /// Fails (with the log tail) if wireguard-go has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.process.ensure_running()
    }
}

/// A key pair made by the stock tools (`wg genkey` | `wg pubkey`), independent of skymesh.
pub fn wg_keypair() -> Result<Keypair> {
    let private = crate::proc::check(std::process::Command::new("wg").arg("genkey"))?
        .trim()
        .to_string();
    let out = crate::proc::output_with_stdin(
        std::process::Command::new("wg").arg("pubkey"),
        format!("{private}\n").as_bytes(),
    )?;
    if !out.status.success() {
        bail!("wg pubkey failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(Keypair { private, public })
}
