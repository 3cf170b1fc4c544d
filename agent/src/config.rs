//! The agent's TOML configuration: parsed strictly (unknown keys refused),
//! validated once into typed structs, and turned into the [`NetMap`] that static
//! mode applies.
//!
//! Every error names the file, the key, the bad value and what is expected. This
//! module reads the config and key files; it must not open sockets or devices.

pub mod bounded;
mod fields;
pub(crate) mod paths;

use crate::keys::PrivateKey;
use crate::probe::ProbeConfig;
use ipnet::IpNet;
use serde::Deserialize;
use skymesh_wire::{NetMap, NetMapError, PeerSpec, PublicKey, PROTOCOL_VERSION};
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_INTERFACE: &str = "skymesh0";
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
pub const DEFAULT_MTU: u16 = 1420;
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9586";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/skymesh/agent.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/skymesh";

/// A config the agent refuses, with everything an operator needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: {key} = {value}: {problem}")]
    Invalid {
        file: PathBuf,
        key: String,
        value: String,
        problem: String,
    },
}

/// Raw file shape. Numbers are wide on purpose so that out-of-range values get our
/// message ("expected 1..=65535") instead of a type error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: RawInterface,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    peers: Vec<RawPeer>,
    controller: Option<RawController>,
    node: Option<RawNode>,
    #[serde(default)]
    probe: RawProbe,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    interval: Option<String>,
    window: Option<String>,
    down_after: Option<i64>,
    failback_hold: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    join_token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    advertise: Vec<String>,
    #[serde(default)]
    endpoints: Vec<String>,
    persistent_keepalive: Option<i64>,
    #[serde(default)]
    transit: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: Option<String>,
    private_key_file: String,
    listen_port: Option<i64>,
    address: Option<String>,
    mtu: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    socket: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    public_key: String,
    endpoint: Option<String>,
    allowed_ips: Vec<String>,
    persistent_keepalive: Option<i64>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub interface: Interface,
    pub metrics_listen: SocketAddr,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub peers: Vec<PeerSpec>,
    /// Set in controller mode: the controller sends the netmap.
    pub controller: Option<ControllerMode>,
    /// Link probing (`[probe]`).
    pub probe: ProbeConfig,
}

/// Controller mode: `[controller]` and `[node]`.
#[derive(Debug, Clone, Default)]
pub struct ControllerMode {
    /// Read once, to enroll, when the state dir holds no identity yet.
    pub join_token_file: Option<PathBuf>,
    /// VPC prefixes this node routes for.
    pub advertise: Vec<IpNet>,
    /// Public endpoints peers should use (an elastic IP and the listen port).
    pub endpoints: Vec<SocketAddr>,
    /// Keepalive to every peer, for a node behind NAT.
    pub persistent_keepalive: Option<u16>,
    /// This node offers to forward traffic between other nodes.
    pub transit: bool,
}

#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    pub private_key_file: PathBuf,
    pub private_key: PrivateKey,
    pub listen_port: u16,
    /// Static mode only: in controller mode the controller assigns it.
    pub address: Option<IpNet>,
    pub mtu: u16,
}

impl Config {
    /// Reads and validates `file`, including the private key file it names.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text =
            bounded::read_file(file, bounded::CONFIG_LIMIT).map_err(|e| ConfigError::Read {
                file: file.to_path_buf(),
                reason: e.to_string(),
            })?;
        Self::parse(file, &text)
    }

    /// Validates `text` as the content of `file` (the name is used in messages and
    /// to resolve nothing else; key file paths are taken as written).
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let v = Validator { file };
        let interface = v.interface(&raw.interface)?;
        let metrics_listen = v.listen_addr(
            "metrics.listen",
            raw.metrics
                .listen
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )?;
        let admin_socket = v.abs_path(
            "admin.socket",
            raw.admin.socket.as_deref().unwrap_or(DEFAULT_ADMIN_SOCKET),
        )?;
        let state_dir = v.abs_path(
            "state.dir",
            raw.state.dir.as_deref().unwrap_or(DEFAULT_STATE_DIR),
        )?;
        let peers = raw
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| v.peer(i, p, &interface.private_key))
            .collect::<Result<Vec<_>, _>>()?;
        let controller = v.controller_mode(&raw)?;
        let probe = v.probe(&raw.probe)?;
        let config = Config {
            file: file.to_path_buf(),
            interface,
            metrics_listen,
            admin_socket,
            state_dir,
            peers,
            controller,
            probe,
        };
        if config.controller.is_none() {
            v.netmap_invariants(&config)?;
        }
        v.admin_socket_is_its_own(&config)?;
        Ok(config)
    }

    /// The netmap static mode applies: exactly the peers of the file. `None` in
    /// controller mode.
    pub fn netmap(&self) -> Option<NetMap> {
        if self.controller.is_some() {
            return None;
        }
        Some(NetMap {
            version: PROTOCOL_VERSION,
            address: self.interface.address?,
            mtu: self.interface.mtu,
            peers: self.peers.clone(),
            transit: false,
            paths: Vec::new(),
        })
    }
}

struct Validator<'a> {
    file: &'a Path,
}

/// Quotes a value the way it appears in TOML, for messages.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Validator<'_> {
    fn invalid(
        &self,
        key: &str,
        value: impl fmt::Display,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.to_string(),
            value: value.to_string(),
            problem: problem.into(),
        }
    }

    fn interface(&self, raw: &RawInterface) -> Result<Interface, ConfigError> {
        let name = raw
            .name
            .clone()
            .unwrap_or_else(|| DEFAULT_INTERFACE.to_string());
        fields::interface_name(&name)
            .map_err(|problem| self.invalid("interface.name", Quoted(&name), problem))?;
        let listen_port = self.port("interface.listen_port", raw.listen_port)?;
        let mtu = match raw.mtu {
            None => DEFAULT_MTU,
            Some(m) if (1280..=9000).contains(&m) => m as u16,
            Some(m) => return Err(self.invalid(
                "interface.mtu",
                m,
                "expected 1280..=9000 (1420 fits a 1500-byte underlay; IPv6 needs at least 1280)",
            )),
        };
        let address = raw
            .address
            .as_deref()
            .map(|a| {
                let net = self.cidr("interface.address", a)?;
                fields::host_address(net)
                    .map_err(|problem| self.invalid("interface.address", Quoted(a), problem))?;
                Ok(net)
            })
            .transpose()?;
        let private_key_file = PathBuf::from(&raw.private_key_file);
        let private_key = self.private_key(&private_key_file)?;
        fields::private_key(&private_key).map_err(|problem| {
            self.invalid(
                "interface.private_key_file",
                Quoted(&raw.private_key_file),
                problem,
            )
        })?;
        Ok(Interface {
            name,
            private_key_file,
            private_key,
            listen_port,
            address,
            mtu,
        })
    }

    fn port(&self, key: &str, value: Option<i64>) -> Result<u16, ConfigError> {
        match value {
            None => Ok(DEFAULT_LISTEN_PORT),
            Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
            Some(p) => {
                Err(self.invalid(key, p, "expected a UDP port in 1..=65535 (default 51820)"))
            }
        }
    }

    fn private_key(&self, path: &Path) -> Result<PrivateKey, ConfigError> {
        let key = "interface.private_key_file";
        let shown = Quoted(&path.to_string_lossy()).to_string();
        let meta = std::fs::metadata(path).map_err(|e| {
            self.invalid(
                key,
                &shown,
                format!("cannot read the key file ({e}); create it with `umask 077; skymesh-agent genkey > {}`", path.display()),
            )
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(self.invalid(
                key,
                &shown,
                format!(
                    "the private key file is readable by others (mode {:o}); run `chmod 600 {}`",
                    meta.permissions().mode() & 0o777,
                    path.display()
                ),
            ));
        }
        let text = bounded::read_file(path, bounded::SECRET_LIMIT)
            .map_err(|e| self.invalid(key, &shown, format!("cannot read the key file: {e}")))?;
        PrivateKey::from_base64(&text).map_err(|e| {
            self.invalid(
                key,
                &shown,
                format!("the file does not hold a WireGuard private key: {e}"),
            )
        })
    }

    fn cidr(&self, key: &str, text: &str) -> Result<IpNet, ConfigError> {
        text.parse::<IpNet>().map_err(|_| {
            self.invalid(
                key,
                Quoted(text),
                "not a valid CIDR; expected an address and a prefix length, like \"10.10.0.0/16\" or \"fd00:10::/48\" (IPv4 /0-/32, IPv6 /0-/128)",
            )
        })
    }

    /// A prefix routed to a peer (see [`fields::routed_prefix`]).
    fn routed_cidr(&self, key: &str, text: &str) -> Result<IpNet, ConfigError> {
        let net = self.cidr(key, text)?;
        fields::routed_prefix(net).map_err(|problem| self.invalid(key, Quoted(text), problem))?;
        Ok(net)
    }

    fn socket_addr(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        text.parse::<SocketAddr>().map_err(|_| {
            self.invalid(
                key,
                Quoted(text),
                "expected IP:PORT, like \"198.51.100.7:51820\" or \"[2001:db8::7]:51820\"",
            )
        })
    }

    /// An address packets are sent to (see [`fields::endpoint`]).
    fn endpoint(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        fields::endpoint(self.socket_addr(key, text)?)
            .map_err(|problem| self.invalid(key, Quoted(text), problem))
    }

    /// An address a local listener binds (see [`fields::listen_addr`]).
    fn listen_addr(&self, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
        fields::listen_addr(self.socket_addr(key, text)?)
            .map_err(|problem| self.invalid(key, Quoted(text), problem))
    }

    fn abs_path(&self, key: &str, text: &str) -> Result<PathBuf, ConfigError> {
        let path = PathBuf::from(text);
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(self.invalid(key, Quoted(text), "expected an absolute path"))
        }
    }

    fn peer(&self, i: usize, raw: &RawPeer, own: &PrivateKey) -> Result<PeerSpec, ConfigError> {
        fields::peer_name(&raw.name).map_err(|problem| {
            self.invalid(&format!("peers[{i}].name"), Quoted(&raw.name), problem)
        })?;
        let at = format!("peers[{i}] ({:?})", raw.name);
        let public_key: PublicKey = raw.public_key.parse().map_err(|e| {
            self.invalid(
                &format!("{at}.public_key"),
                Quoted(&raw.public_key),
                format!("{e}; get it with `skymesh-agent pubkey < private.key` on the peer"),
            )
        })?;
        fields::peer_key(&public_key, own).map_err(|problem| {
            self.invalid(
                &format!("{at}.public_key"),
                Quoted(&raw.public_key),
                problem,
            )
        })?;
        let endpoint = raw
            .endpoint
            .as_deref()
            .map(|e| self.endpoint(&format!("{at}.endpoint"), e))
            .transpose()?;
        let allowed_ips = raw
            .allowed_ips
            .iter()
            .enumerate()
            .map(|(j, c)| self.routed_cidr(&format!("{at}.allowed_ips[{j}]"), c))
            .collect::<Result<Vec<_>, _>>()?;
        let persistent_keepalive = match raw.persistent_keepalive {
            None | Some(0) => None,
            Some(s) if (1..=65535).contains(&s) => Some(s as u16),
            Some(s) => return Err(self.invalid(
                &format!("{at}.persistent_keepalive"),
                s,
                "expected seconds in 0..=65535 (0 or absent disables; 25 keeps NAT mappings alive)",
            )),
        };
        Ok(PeerSpec {
            name: raw.name.clone(),
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive,
        })
    }

    /// `[controller]` and `[node]`, and what they exclude.
    fn controller_mode(&self, raw: &RawConfig) -> Result<Option<ControllerMode>, ConfigError> {
        let Some(ctl) = &raw.controller else {
            if raw.node.is_some() {
                return Err(self.invalid(
                    "node",
                    "(table)",
                    "[node] is for controller mode; add a [controller] table (with join_token_file) or remove [node]",
                ));
            }
            if raw.interface.address.is_none() {
                return Err(self.invalid(
                    "interface.address",
                    "(missing)",
                    "static mode needs this node's overlay address, like \"100.96.0.1/32\"; or add a [controller] table to have the controller assign it",
                ));
            }
            return Ok(None);
        };
        if let Some(a) = &raw.interface.address {
            return Err(self.invalid(
                "interface.address",
                Quoted(a),
                "in controller mode the controller assigns the overlay address; remove this key",
            ));
        }
        if !raw.peers.is_empty() {
            return Err(self.invalid(
                "peers",
                format!("({} entries)", raw.peers.len()),
                "in controller mode the controller sends the peers; remove the [[peers]] tables",
            ));
        }
        let node = raw.node.as_ref();
        let empty = RawNode::default();
        let node = node.unwrap_or(&empty);
        let advertise = node
            .advertise
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let key = format!("node.advertise[{i}]");
                let net = self.routed_cidr(&key, c)?;
                if net.trunc() != net {
                    return Err(self.invalid(
                        &key,
                        Quoted(c),
                        format!("host bits are set; did you mean \"{}\"?", net.trunc()),
                    ));
                }
                Ok(net)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = node
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| self.endpoint(&format!("node.endpoints[{i}]"), e))
            .collect::<Result<Vec<_>, _>>()?;
        // As for static peers: a prefix routed to this node must not hold the
        // address the other nodes send its handshakes to.
        for (i, e) in endpoints.iter().enumerate() {
            if let Some(prefix) = advertise
                .iter()
                .find(|a| a.contains(&e.ip().to_canonical()))
            {
                return Err(self.invalid(
                    &format!("node.endpoints[{i}]"),
                    Quoted(&e.to_string()),
                    format!("lies inside {prefix} of [node] advertise; the other nodes would route this node's handshakes into the tunnel. Advertise the VPC prefixes only, not the underlay address"),
                ));
            }
            if endpoints[..i].contains(e) {
                return Err(self.invalid(
                    &format!("node.endpoints[{i}]"),
                    Quoted(&e.to_string()),
                    "is listed twice; remove the repeated entry",
                ));
            }
        }
        let persistent_keepalive = match node.persistent_keepalive {
            None | Some(0) => None,
            Some(s) if (1..=65535).contains(&s) => Some(s as u16),
            Some(s) => return Err(self.invalid(
                "node.persistent_keepalive",
                s,
                "expected seconds in 0..=65535 (0 or absent disables; 25 keeps NAT mappings alive)",
            )),
        };
        let join_token_file = ctl
            .join_token_file
            .as_deref()
            .map(|p| self.abs_path("controller.join_token_file", p))
            .transpose()?;
        Ok(Some(ControllerMode {
            join_token_file,
            advertise,
            endpoints,
            persistent_keepalive,
            transit: node.transit,
        }))
    }

    /// `[probe]`: every value bounded so a typo cannot flood links or blind failover.
    fn probe(&self, raw: &RawProbe) -> Result<ProbeConfig, ConfigError> {
        let d = ProbeConfig::default();
        let duration = |key: &str,
                        text: Option<&str>,
                        default,
                        min,
                        max,
                        why: &str|
         -> Result<std::time::Duration, ConfigError> {
            let Some(text) = text else { return Ok(default) };
            let value = humantime::parse_duration(text).map_err(|e| {
                self.invalid(
                    key,
                    Quoted(text),
                    format!("{e}; expected a duration like \"100ms\" or \"30s\""),
                )
            })?;
            if value < min || value > max {
                return Err(self.invalid(
                    key,
                    Quoted(text),
                    format!(
                        "expected {} to {} ({why})",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ));
            }
            Ok(value)
        };
        let ms = std::time::Duration::from_millis;
        let interval = duration(
            "probe.interval",
            raw.interval.as_deref(),
            d.interval,
            ms(10),
            ms(10_000),
            "shorter floods links with probes, longer makes failover slow; default 100ms",
        )?;
        let window = duration(
            "probe.window",
            raw.window.as_deref(),
            d.window,
            interval * 10,
            ms(600_000),
            "the loss window must hold at least 10 probes; default 30s",
        )?;
        let failback_hold = duration(
            "probe.failback_hold",
            raw.failback_hold.as_deref(),
            d.failback_hold,
            std::time::Duration::ZERO,
            ms(600_000),
            "how long a recovered link must stay up before traffic returns; default 5s",
        )?;
        let down_after = match raw.down_after {
            None => d.down_after,
            Some(n) if (1..=20).contains(&n) => n as u32,
            Some(n) => {
                return Err(self.invalid(
                    "probe.down_after",
                    n,
                    "expected 1..=20 lost probes in a row before a link is down (default 3)",
                ))
            }
        };
        Ok(ProbeConfig {
            interval,
            window,
            down_after,
            failback_hold,
        })
    }

    /// The admin socket replaces a stale socket at its path on start: refuse a path
    /// that is also the key, the config, the join token or inside the state dir.
    fn admin_socket_is_its_own(&self, config: &Config) -> Result<(), ConfigError> {
        let token = config
            .controller
            .as_ref()
            .and_then(|m| m.join_token_file.as_deref());
        let mut claimed = vec![
            paths::Claimed {
                key: "interface.private_key_file",
                path: &config.interface.private_key_file,
                is_dir: false,
            },
            paths::Claimed {
                key: "state.dir",
                path: &config.state_dir,
                is_dir: true,
            },
            paths::Claimed {
                key: "the config file itself",
                path: self.file,
                is_dir: false,
            },
        ];
        if let Some(token) = token {
            claimed.push(paths::Claimed {
                key: "controller.join_token_file",
                path: token,
                is_dir: false,
            });
        }
        // Files the agent writes in its state dir would be overwritten.
        for c in claimed.iter().filter(|c| !c.is_dir) {
            if let Some(file) = paths::agent_file_collision(c.path, &config.state_dir) {
                return Err(self.invalid(
                    c.key,
                    Quoted(&c.path.to_string_lossy()),
                    format!(
                        "the agent writes its own {file:?} there (in state.dir) and would overwrite it; keep this file at a path of its own, like {:?}",
                        config.state_dir.join("private.key").display().to_string()
                    ),
                ));
            }
        }
        match paths::socket_collision(&config.admin_socket, &claimed) {
            None => Ok(()),
            Some(c) => Err(self.invalid(
                "admin.socket",
                Quoted(&config.admin_socket.to_string_lossy()),
                format!(
                    "this is {} {} ({:?}); the agent replaces a stale socket at this path on start, so give the admin socket a path of its own, like {DEFAULT_ADMIN_SOCKET:?}",
                    if c.is_dir { "inside" } else { "the same file as" },
                    c.key,
                    c.path.display().to_string()
                ),
            )),
        }
    }

    /// The cross-field rules, shared with controller-provided netmaps.
    fn netmap_invariants(&self, config: &Config) -> Result<(), ConfigError> {
        let at = |name: &str| {
            let i = config
                .peers
                .iter()
                .position(|p| p.name == name)
                .unwrap_or(0);
            format!("peers[{i}] ({name:?})")
        };
        let Some(netmap) = config.netmap() else {
            return Ok(());
        };
        if let Err(e) = netmap.validate() {
            return Err(match e {
                NetMapError::DuplicateName(name) => {
                    let i = config.peers.iter().rposition(|p| p.name == name).unwrap_or(0);
                    self.invalid(&format!("peers[{i}].name"), Quoted(&name), "another peer has this name; names must be unique")
                }
                NetMapError::DuplicateKey { name, other } => {
                    let key = config.peers.iter().find(|p| p.name == name).map(|p| p.public_key.to_string()).unwrap_or_default();
                    self.invalid(&format!("{}.public_key", at(&name)), Quoted(&key), format!("peer {other:?} has the same public key; each peer needs its own"))
                }
                NetMapError::Overlap { name, prefix, other, other_prefix } => self.invalid(
                    &format!("{}.allowed_ips", at(&name)),
                    Quoted(&prefix.to_string()),
                    format!("overlaps {other_prefix} of peer {other:?}; a prefix can route to one peer only, remove or split one of them"),
                ),
                NetMapError::HostBits { name, prefix, suggestion } => self.invalid(
                    &format!("{}.allowed_ips", at(&name)),
                    Quoted(&prefix.to_string()),
                    format!("host bits are set; did you mean \"{suggestion}\"?"),
                ),
                other @ (NetMapError::Version(_)
                | NetMapError::Mtu(_)
                | NetMapError::PathDest(_)
                | NetMapError::DuplicatePath(_)
                | NetMapError::PathVia { .. }) => {
                    self.invalid("interface", "", other.to_string())
                }
            });
        }
        let own = netmap.address;
        if let Some((peer, prefix)) = config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |a| (p, a)))
            .find(|(_, a)| a.contains(&own.addr()))
        {
            return Err(self.invalid(
                "interface.address",
                Quoted(&own.to_string()),
                format!("this node's own address lies inside {prefix}, an allowed_ips entry of peer {:?}; traffic to it would loop", peer.name),
            ));
        }
        for (i, peer) in config.peers.iter().enumerate() {
            let at = format!("peers[{i}] ({:?})", peer.name);
            // Across peers, NetMap::validate refuses overlaps; within one peer a
            // repeated or nested entry is a typo the kernel would silently merge.
            for (j, prefix) in peer.allowed_ips.iter().enumerate() {
                if let Some(other) = peer.allowed_ips[..j]
                    .iter()
                    .find(|o| o.contains(prefix) || prefix.contains(*o))
                {
                    let problem = if other == prefix {
                        "is listed twice; remove the repeated entry".to_string()
                    } else {
                        format!("overlaps {other}, another entry of this peer; keep only the one you mean")
                    };
                    return Err(self.invalid(
                        &format!("{at}.allowed_ips[{j}]"),
                        Quoted(&prefix.to_string()),
                        problem,
                    ));
                }
            }
            let Some(endpoint) = peer.endpoint else {
                continue;
            };
            // Handshakes to a peer whose endpoint is routed into the tunnel would
            // themselves be tunnelled: the link could never come up.
            if let Some((owner, prefix)) = config
                .peers
                .iter()
                .flat_map(|p| p.allowed_ips.iter().map(move |a| (p, a)))
                .find(|(_, a)| a.contains(&endpoint.ip().to_canonical()))
            {
                return Err(self.invalid(
                    &format!("{at}.endpoint"),
                    Quoted(&endpoint.to_string()),
                    format!("lies inside {prefix}, an allowed_ips entry of peer {:?}; the handshakes would be routed into the tunnel. Use the peer's underlay address, outside every allowed_ips", owner.name),
                ));
            }
            if let Some(other) = config.peers[..i]
                .iter()
                .find(|p| p.endpoint == Some(endpoint))
            {
                return Err(self.invalid(
                    &format!("{at}.endpoint"),
                    Quoted(&endpoint.to_string()),
                    format!("peer {:?} has the same endpoint; one address and port is one WireGuard peer, so one of them is a typo", other.name),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Fixture {
        dir: PathBuf,
        key: PathBuf,
    }

    fn fixture(tag: &str) -> Fixture {
        let dir =
            std::env::temp_dir().join(format!("skymesh-config-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let key = dir.join("private.key");
        let mut f = std::fs::File::create(&key).expect("key file");
        writeln!(f, "{}", PrivateKey::generate().to_base64()).expect("write key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Fixture { dir, key }
    }

    const PEER_KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

    fn text(fx: &Fixture, extra_iface: &str, peers: &str) -> String {
        format!(
            "[interface]\nprivate_key_file = {:?}\naddress = \"100.96.0.1/32\"\n{extra_iface}\n{peers}",
            fx.key.display()
        )
    }

    fn err(fx: &Fixture, extra_iface: &str, peers: &str) -> String {
        let file = fx.dir.join("agent.toml");
        Config::parse(&file, &text(fx, extra_iface, peers))
            .expect_err("config should be refused")
            .to_string()
    }

    fn peer(allowed: &str) -> String {
        format!("[[peers]]\nname = \"gcp-gw\"\npublic_key = \"{PEER_KEY}\"\nallowed_ips = [{allowed}]\n")
    }

    #[test]
    fn valid_config_gives_netmap_with_defaults() {
        let fx = fixture("valid");
        let cfg = Config::parse(
            &fx.dir.join("a.toml"),
            &text(
                &fx,
                "",
                &(peer("\"100.96.0.2/32\", \"10.10.0.0/16\"")
                    + "endpoint = \"198.51.100.7:51820\"\npersistent_keepalive = 25\n"),
            ),
        )
        .expect("valid");
        assert_eq!(cfg.interface.name, "skymesh0");
        assert_eq!(cfg.interface.listen_port, 51820);
        assert_eq!(cfg.interface.mtu, 1420);
        assert_eq!(cfg.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        let map = cfg.netmap().expect("static mode");
        assert_eq!(map.peers.len(), 1);
        assert_eq!(map.peers[0].persistent_keepalive, Some(25));
        assert_eq!(
            map.peers[0].endpoint,
            Some("198.51.100.7:51820".parse().expect("addr"))
        );
        assert!(!format!("{cfg:?}").contains(&cfg.interface.private_key.to_base64()));
    }

    #[test]
    fn each_bad_class_names_file_key_value_and_fix() {
        let fx = fixture("bad");
        let file = fx.dir.join("agent.toml").display().to_string();
        let cases: Vec<(String, &[&str])> = vec![
            (
                err(&fx, "colour = \"blue\"", ""),
                &["unknown field `colour`", "colour = \"blue\""],
            ),
            (
                err(&fx, "listen_port = 70000", ""),
                &["interface.listen_port = 70000", "1..=65535"],
            ),
            (
                err(&fx, "listen_port = 0", ""),
                &["interface.listen_port = 0"],
            ),
            (
                err(&fx, "", &peer("\"10.0.0.0/33\"")),
                &["allowed_ips[0] = \"10.0.0.0/33\"", "not a valid CIDR"],
            ),
            (
                err(&fx, "", &peer("\"nonsense\"")),
                &["allowed_ips[0] = \"nonsense\""],
            ),
            (
                err(&fx, "", &peer("\"10.0.0.1/16\"")),
                &["\"10.0.0.1/16\"", "did you mean \"10.0.0.0/16\""],
            ),
            (
                err(&fx, "", &peer("\"10.0.0.0/16\"").replace(PEER_KEY, "short")),
                &["public_key = \"short\"", "base64"],
            ),
            (
                err(
                    &fx,
                    "",
                    &(peer("\"10.0.0.0/16\"") + "endpoint = \"example\"\n"),
                ),
                &["endpoint = \"example\"", "IP:PORT"],
            ),
            (
                err(&fx, "", &(peer("\"10.0.0.0/16\"") + "mystery = 1\n")),
                &["unknown field `mystery`"],
            ),
            (
                err(
                    &fx,
                    "",
                    &(peer("\"10.0.0.0/16\"")
                        + &peer("\"10.0.128.0/17\"")
                            .replace("gcp-gw", "az-gw")
                            .replace(PEER_KEY, "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=")),
                ),
                &[
                    "peers[1] (\"az-gw\").allowed_ips = \"10.0.128.0/17\"",
                    "overlaps 10.0.0.0/16 of peer \"gcp-gw\"",
                ],
            ),
            (
                err(&fx, "", &peer("\"100.96.0.0/24\"")),
                &["interface.address", "inside 100.96.0.0/24"],
            ),
            (err(&fx, "mtu = 100", ""), &["interface.mtu = 100"]),
            (
                err(&fx, "name = \"much-too-long-name0\"", ""),
                &["interface.name"],
            ),
        ];
        for (msg, needles) in cases {
            assert!(msg.starts_with(&file), "message must name the file: {msg}");
            for n in needles {
                assert!(msg.contains(n), "{msg:?} should contain {n:?}");
            }
        }
    }

    /// The documented example must stay valid (only its key path is local).
    #[test]
    fn example_config_is_valid() {
        let fx = fixture("example");
        let example = include_str!("../../configs/agent.example.toml").replace(
            "/var/lib/skymesh/private.key",
            &fx.key.display().to_string(),
        );
        let cfg = Config::parse(Path::new("configs/agent.example.toml"), &example)
            .expect("example config");
        assert_eq!(cfg.peers[0].name, "gcp-gw");
        assert_eq!(cfg.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
    }

    /// The controller-mode example too.
    #[test]
    fn controller_example_config_is_valid() {
        let fx = fixture("ctl-example");
        let example = include_str!("../../configs/agent.controller.example.toml").replace(
            "/var/lib/skymesh/private.key",
            &fx.key.display().to_string(),
        );
        let cfg = Config::parse(Path::new("configs/agent.controller.example.toml"), &example)
            .expect("controller example config");
        let mode = cfg.controller.as_ref().expect("controller mode");
        assert_eq!(mode.advertise[0].to_string(), "10.0.0.0/16");
        assert!(cfg.netmap().is_none(), "the controller sends the netmap");
    }

    #[test]
    fn controller_mode_excludes_static_keys() {
        let fx = fixture("ctl-rules");
        let file = fx.dir.join("agent.toml");
        let base = format!("[interface]\nprivate_key_file = {:?}\n", fx.key.display());
        for (extra, needle) in [
            (
                "address = \"100.96.0.1/32\"\n[controller]\n",
                "interface.address = \"100.96.0.1/32\": in controller mode",
            ),
            (
                &format!("[controller]\n{}", peer("\"10.1.0.0/16\"")) as &str,
                "remove the [[peers]] tables",
            ),
            (
                "[node]\nadvertise = [\"10.0.0.0/16\"]\n",
                "add a [controller] table",
            ),
            (
                "[controller]\n[node]\nadvertise = [\"10.0.0.1/16\"]\n",
                "did you mean \"10.0.0.0/16\"",
            ),
            (
                "[controller]\n[node]\nadvertise = [\"10.0.0.0/16\"]\nendpoints = [\"10.0.0.5:51820\"]\n",
                "node.endpoints[0] = \"10.0.0.5:51820\": lies inside 10.0.0.0/16",
            ),
            (
                "[controller]\n[node]\nadvertise = [\"127.0.0.0/8\"]\n",
                "node.advertise[0] = \"127.0.0.0/8\": overlaps loopback",
            ),
            (
                "[controller]\njoin_token_file = \"rel/token\"\n",
                "controller.join_token_file = \"rel/token\": expected an absolute path",
            ),
            ("", "interface.address = (missing)"),
        ] {
            let e = Config::parse(&file, &format!("{base}{extra}"))
                .expect_err(extra)
                .to_string();
            assert!(e.contains(needle), "{extra:?}: {e}");
        }
    }

    /// Issue 14.12: every address, endpoint, key and name field refuses nonsense,
    /// naming the key, the value and the fix.
    #[test]
    fn nonsense_values_are_refused_by_kind() {
        let fx = fixture("nonsense");
        let file = fx.dir.join("agent.toml");
        let own = PrivateKey::from_base64(&std::fs::read_to_string(&fx.key).expect("key"))
            .expect("key")
            .public_key()
            .to_string();
        let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let with_address =
            |a: &str| text(&fx, "", "").replace("\"100.96.0.1/32\"", &format!("{a:?}"));
        let with_peer = |extra: &str| text(&fx, "", &(peer("\"10.0.0.0/16\"") + extra));
        let with_key = |k: &str| text(&fx, "", &peer("\"10.0.0.0/16\"").replace(PEER_KEY, k));
        let ctl = |node: &str| {
            format!(
                "[interface]\nprivate_key_file = {:?}\n[controller]\n[node]\n{node}\n",
                fx.key.display()
            )
        };
        let cases: Vec<(String, &str, &str)> = vec![
            (
                with_address("0.0.0.0/0"),
                "interface.address = \"0.0.0.0/0\"",
                "unspecified",
            ),
            (
                with_address("::/0"),
                "interface.address = \"::/0\"",
                "unspecified",
            ),
            (
                with_address("100.96.0.1/0"),
                "interface.address = \"100.96.0.1/0\"",
                "/8 or longer",
            ),
            (
                with_address("224.0.0.5/32"),
                "interface.address = \"224.0.0.5/32\"",
                "multicast",
            ),
            (
                with_address("255.255.255.255/32"),
                "interface.address = \"255.255.255.255/32\"",
                "broadcast",
            ),
            (
                with_address("100.96.0.255/24"),
                "interface.address = \"100.96.0.255/24\"",
                "host address",
            ),
            (
                text(&fx, "name = \".\"", ""),
                "interface.name = \".\"",
                "skymesh0",
            ),
            (
                text(&fx, "name = \"..\"", ""),
                "interface.name = \"..\"",
                "skymesh0",
            ),
            (
                text(&fx, "name = \"a/b\"", ""),
                "interface.name = \"a/b\"",
                "skymesh0",
            ),
            (
                text(&fx, "name = \"a b\"", ""),
                "interface.name = \"a b\"",
                "skymesh0",
            ),
            (
                text(&fx, "name = \"a:0\"", ""),
                "interface.name = \"a:0\"",
                "skymesh0",
            ),
            (
                text(&fx, "name = \"\"", ""),
                "interface.name = \"\"",
                "skymesh0",
            ),
            (with_key(&own), ".public_key = ", "own public key"),
            (with_key(zero), ".public_key = \"AAAA", "all-zero key"),
            (
                with_peer("endpoint = \"198.51.100.7:0\"\n"),
                ".endpoint = \"198.51.100.7:0\"",
                "port 0",
            ),
            (
                with_peer("endpoint = \"0.0.0.0:51820\"\n"),
                ".endpoint = \"0.0.0.0:51820\"",
                "unspecified",
            ),
            (
                with_peer("endpoint = \"[::]:51820\"\n"),
                ".endpoint = \"[::]:51820\"",
                "unspecified",
            ),
            (
                with_peer("endpoint = \"255.255.255.255:51820\"\n"),
                ".endpoint = \"255.255.255.255:51820\"",
                "broadcast",
            ),
            (
                with_peer("endpoint = \"239.0.0.1:51820\"\n"),
                ".endpoint = \"239.0.0.1:51820\"",
                "multicast",
            ),
            (
                with_peer("endpoint = \"[ff02::1]:51820\"\n"),
                ".endpoint = \"[ff02::1]:51820\"",
                "multicast",
            ),
            (
                ctl("endpoints = [\"0.0.0.0:51820\"]"),
                "node.endpoints[0] = \"0.0.0.0:51820\"",
                "unspecified",
            ),
            (
                ctl("endpoints = [\"203.0.113.7:0\"]"),
                "node.endpoints[0] = \"203.0.113.7:0\"",
                "port 0",
            ),
            (
                text(&fx, "", "[metrics]\nlisten = \"127.0.0.1:0\"\n"),
                "metrics.listen = \"127.0.0.1:0\"",
                "port 0",
            ),
            (
                text(&fx, "", "[metrics]\nlisten = \"224.0.0.1:9586\"\n"),
                "metrics.listen = \"224.0.0.1:9586\"",
                "multicast",
            ),
        ];
        for (text, key_value, fix) in cases {
            let e = Config::parse(&file, &text).expect_err(&text).to_string();
            assert!(e.contains(key_value) && e.contains(fix), "{text}\n=> {e}");
        }
        std::fs::write(&fx.key, format!("{zero}\n")).expect("zero key");
        let e = Config::parse(&file, &text(&fx, "", ""))
            .expect_err("zero private key")
            .to_string();
        assert!(
            e.contains("interface.private_key_file")
                && e.contains("all-zero key")
                && e.contains("genkey"),
            "{e}"
        );
        // Still accepted: a listener on all addresses, a mapped unicast endpoint.
        std::fs::write(&fx.key, format!("{}\n", PrivateKey::generate().to_base64())).expect("key");
        Config::parse(&file, &with_peer("endpoint = \"[::ffff:198.51.100.7]:51820\"\n[metrics]\nlisten = \"0.0.0.0:9586\"\n")).expect("valid");
    }

    /// A configured file may not be one the agent writes in its state dir
    /// (enrollment and the netmap cache would overwrite it), however spelt.
    #[test]
    fn configured_files_are_not_the_agents_own_state_files() {
        let fx = fixture("state-files");
        let d = fx.dir.display().to_string();
        std::fs::create_dir_all(fx.dir.join("state")).expect("state dir");
        let mode = |key: &str, token: &str| {
            format!(
                "[interface]\nprivate_key_file = {key:?}\n[state]\ndir = \"{d}/state\"\n[controller]\njoin_token_file = {token:?}\n"
            )
        };
        let plain_token = format!("{d}/token");
        for (key, token, field) in [
            (
                format!("{d}/state/control.key"),
                plain_token.clone(),
                "interface.private_key_file",
            ),
            (
                format!("{d}/state/./netmap.json"),
                plain_token.clone(),
                "interface.private_key_file",
            ),
            (
                format!("{d}/state//ca.crt"),
                plain_token.clone(),
                "interface.private_key_file",
            ),
            (
                format!("{d}/state/.control.key.skymesh-tmp"),
                plain_token.clone(),
                "interface.private_key_file",
            ),
            (
                fx.key.display().to_string(),
                format!("{d}/state/controller.json"),
                "controller.join_token_file",
            ),
            (
                fx.key.display().to_string(),
                format!("{d}/state/x/../control.crt"),
                "controller.join_token_file",
            ),
        ] {
            if key.contains("/state/") {
                std::fs::copy(&fx.key, &key).ok();
                let mut perms = std::fs::metadata(&key).map(|m| m.permissions()).ok();
                if let Some(p) = perms.as_mut() {
                    use std::os::unix::fs::PermissionsExt;
                    p.set_mode(0o600);
                    std::fs::set_permissions(&key, p.clone()).ok();
                }
            }
            let err = Config::parse(&fx.dir.join("agent.toml"), &mode(&key, &token))
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains(field) && err.contains("would overwrite"),
                "{key} {token}: {err}"
            );
        }
        // A key of its own in the state dir is fine.
        let own = format!("{d}/state/private.key");
        std::fs::copy(&fx.key, &own).expect("copy");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o600)).expect("mode");
        }
        Config::parse(&fx.dir.join("agent.toml"), &mode(&own, &plain_token)).expect("valid");
    }

    /// The admin socket may not be any other configured path, however it is spelt.
    #[test]
    fn admin_socket_must_not_be_another_configured_path() {
        let fx = fixture("socket-paths");
        let d = fx.dir.display().to_string();
        std::fs::create_dir_all(fx.dir.join("state/sub")).expect("state dir");
        std::fs::write(fx.dir.join("token"), "t").expect("token");
        let link = fx.dir.join("key-link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&fx.key, &link).expect("symlink");
        let file = fx.dir.join("agent.toml");
        std::fs::write(&file, "").expect("config file");
        let static_mode = |socket: &str| {
            format!(
                "[interface]\nprivate_key_file = {:?}\naddress = \"100.96.0.1/32\"\n[admin]\nsocket = {socket:?}\n[state]\ndir = \"{d}/state\"\n",
                fx.key.display()
            )
        };
        let controller_mode = |socket: &str| {
            format!(
                "[interface]\nprivate_key_file = {:?}\n[admin]\nsocket = {socket:?}\n[state]\ndir = \"{d}/state\"\n[controller]\njoin_token_file = \"{d}/token\"\n",
                fx.key.display()
            )
        };
        let cases: Vec<(String, &str)> = vec![
            (
                static_mode(&fx.key.display().to_string()),
                "interface.private_key_file",
            ),
            (
                static_mode(&format!("{d}/./private.key")),
                "interface.private_key_file",
            ),
            (
                static_mode(&format!("{d}//private.key")),
                "interface.private_key_file",
            ),
            (
                static_mode(&format!("{d}/state/../private.key")),
                "interface.private_key_file",
            ),
            (
                static_mode(&link.display().to_string()),
                "interface.private_key_file",
            ),
            (static_mode(&format!("{d}/state")), "state.dir"),
            (static_mode(&format!("{d}/state/")), "state.dir"),
            (static_mode(&format!("{d}/state/agent.sock")), "state.dir"),
            (
                static_mode(&format!("{d}/state/sub/../netmap.json")),
                "state.dir",
            ),
            (
                static_mode(&format!("{d}/agent.toml")),
                "the config file itself",
            ),
            (
                controller_mode(&format!("{d}/token")),
                "controller.join_token_file",
            ),
            (
                controller_mode(&format!("{d}/./token")),
                "controller.join_token_file",
            ),
        ];
        for (text, names) in cases {
            let e = Config::parse(&file, &text).expect_err(&text).to_string();
            assert!(
                e.contains("admin.socket = ")
                    && e.contains(names)
                    && e.contains("a path of its own"),
                "{text}\n=> {e}"
            );
        }
        for ok in [format!("{d}/agent.sock"), format!("{d}/run/agent.sock")] {
            Config::parse(&file, &static_mode(&ok)).expect("a socket path of its own");
        }
        let _ = std::fs::remove_dir_all(&fx.dir);
    }

    #[test]
    fn key_file_problems_are_named() {
        let fx = fixture("keys");
        let file = fx.dir.join("agent.toml");
        let missing = text(&fx, "", "").replace("private.key", "missing.key");
        let e = Config::parse(&file, &missing)
            .expect_err("missing key")
            .to_string();
        assert!(
            e.contains("interface.private_key_file")
                && e.contains("missing.key")
                && e.contains("genkey"),
            "{e}"
        );

        std::fs::write(&fx.key, "not a key\n").expect("write");
        let e = Config::parse(&file, &text(&fx, "", ""))
            .expect_err("bad key")
            .to_string();
        assert!(e.contains("does not hold a WireGuard private key"), "{e}");

        std::fs::set_permissions(&fx.key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Config::parse(&file, &text(&fx, "", ""))
            .expect_err("open key")
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn probe_settings_are_bounded_and_named_in_errors() {
        let fx = fixture("probe");
        let file = fx.dir.join("agent.toml");
        let ok = Config::parse(
            &file,
            &text(&fx, "", "[probe]\ninterval = \"50ms\"\nwindow = \"10s\"\ndown_after = 4\nfailback_hold = \"2s\"\n"),
        )
        .expect("valid probe table");
        assert_eq!(ok.probe.interval, std::time::Duration::from_millis(50));
        assert_eq!(
            ok.probe.detect_time(),
            std::time::Duration::from_millis(225)
        );
        let defaults = Config::parse(&file, &text(&fx, "", "")).expect("no probe table");
        assert_eq!(defaults.probe, ProbeConfig::default());
        for (table, needle) in [
            (
                "interval = \"1ms\"",
                "probe.interval = \"1ms\": expected 10ms to 10s",
            ),
            ("interval = \"fast\"", "probe.interval = \"fast\""),
            (
                "window = \"500ms\"",
                "probe.window = \"500ms\": expected 1s to 10m",
            ),
            ("down_after = 0", "probe.down_after = 0: expected 1..=20"),
            ("failback_hold = \"2h\"", "probe.failback_hold = \"2h\""),
            ("bogus = 1", "unknown field `bogus`"),
        ] {
            let e = err(&fx, "", &format!("[probe]\n{table}\n"));
            assert!(e.contains(needle), "{table}: {e}");
        }
    }
}
