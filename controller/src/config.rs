//! The controller's configuration file, validated once at load into typed
//! values. Errors name the file, the key, the value and what is expected.

use crate::paths::PathConfig;
use anyhow::{anyhow, bail, Context, Result};
use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    control: ControlFile,
    #[serde(default)]
    api: ApiFile,
    #[serde(default)]
    state: StateFile,
    #[serde(default)]
    network: NetworkFile,
    #[serde(default)]
    paths: PathsFile,
    ai_gateway: Option<crate::gateway::config::GatewayFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathsFile {
    loss_penalty_ms: Option<f64>,
    transit_penalty_ms: Option<f64>,
    switch_ratio: Option<f64>,
    switch_min: Option<String>,
    hold: Option<String>,
    stale_after: Option<String>,
    #[serde(default)]
    weights: Vec<crate::paths::LinkWeight>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlFile {
    #[serde(default = "default_control_listen")]
    listen: String,
    advertise: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiFile {
    #[serde(default = "default_api_listen")]
    listen: String,
    #[serde(default = "default_admin_token_file")]
    admin_token_file: PathBuf,
}

impl Default for ApiFile {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            admin_token_file: default_admin_token_file(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    #[serde(default = "default_data_dir")]
    data_dir: PathBuf,
}

impl Default for StateFile {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    #[serde(default = "default_pool")]
    overlay_pool: String,
    #[serde(default = "default_mtu")]
    mtu: u16,
    #[serde(default = "default_max_prefixes_per_node")]
    max_prefixes_per_node: usize,
}

impl Default for NetworkFile {
    fn default() -> Self {
        Self {
            overlay_pool: default_pool(),
            mtu: default_mtu(),
            max_prefixes_per_node: default_max_prefixes_per_node(),
        }
    }
}

fn default_control_listen() -> String {
    "0.0.0.0:7443".into()
}
fn default_api_listen() -> String {
    "127.0.0.1:7080".into()
}
fn default_admin_token_file() -> PathBuf {
    "/var/lib/skymesh-controller/admin.token".into()
}
fn default_data_dir() -> PathBuf {
    "/var/lib/skymesh-controller".into()
}
fn default_pool() -> String {
    crate::ipam::DEFAULT_OVERLAY_POOL.into()
}
fn default_mtu() -> u16 {
    1420
}
fn default_max_prefixes_per_node() -> usize {
    crate::registry::DEFAULT_MAX_PREFIXES_PER_NODE
}

/// The largest `[network] max_prefixes_per_node`: every node's prefixes are in
/// every peer's netmap, so a cap this high is already more than a mesh can carry.
const MAX_PREFIXES_PER_NODE_LIMIT: usize = 100_000;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub control_listen: SocketAddr,
    /// `host:port` endpoints agents dial; written into join tokens.
    pub control_advertise: Vec<String>,
    pub api_listen: SocketAddr,
    pub admin_token_file: PathBuf,
    pub data_dir: PathBuf,
    pub overlay_pool: IpNet,
    pub mtu: u16,
    /// Prefixes (and underlay subnets) one node may register
    /// (`[network] max_prefixes_per_node`).
    pub max_prefixes_per_node: usize,
    /// Path selection (`[paths]`).
    pub paths: PathConfig,
    /// The AI gateway (`[ai_gateway]`); off when the table is absent.
    pub ai_gateway: Option<crate::gateway::config::GatewayConfig>,
}

/// Largest config file read.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Largest token file (admin token) read.
pub const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// Reads a text file a user named, refusing one larger than `limit` bytes before holding more
/// than that in memory (a device such as `/dev/zero` never ends). `what` names the setting.
pub fn read_text_bounded(path: &Path, limit: u64, what: &str) -> Result<String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("reading {what} {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    if bytes.len() as u64 > limit {
        bail!(
            "{what} {}: larger than the limit of {} KiB; name the right file (a text file, not a \
             device or a backup)",
            path.display(),
            limit / 1024
        );
    }
    String::from_utf8(bytes).map_err(|_| {
        anyhow!(
            "{what} {}: not UTF-8 text; name the right file",
            path.display()
        )
    })
}

/// Address ranges an overlay can never use: "this network", loopback, link-local, multicast and
/// reserved (with broadcast). Documentation ranges are allowed: labs use them for underlays and
/// overlays alike.
const RESERVED_POOLS: [&str; 8] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/8",
    "fe80::/10",
    "ff00::/8",
];

/// The overlay pool must be a routable unicast range of a sane size: at least /8 (IPv4) or /16
/// (IPv6) long, and overlapping none of [`RESERVED_POOLS`].
fn check_overlay_pool(text: &str, pool: IpNet) -> Result<()> {
    let min = if pool.addr().is_ipv4() { 8 } else { 16 };
    if pool.prefix_len() < min {
        bail!(
            "[network] overlay_pool = {text:?}: wider than /{min}, so it overlaps loopback, \
             multicast or the underlays; use a private range such as \"100.96.0.0/12\" or \
             \"fd00:1::/48\""
        );
    }
    for reserved in RESERVED_POOLS {
        let reserved: IpNet = reserved.parse().expect("a valid built-in prefix");
        if reserved.contains(&pool) || pool.contains(&reserved) {
            bail!(
                "[network] overlay_pool = {text:?}: overlaps {reserved} (loopback, link-local, \
                 multicast or reserved addresses), which cannot carry overlay traffic; use a \
                 private range such as \"100.96.0.0/12\" or \"fd00:1::/48\""
            );
        }
    }
    Ok(())
}

/// An advertised address agents dial must be one host: not unspecified, multicast or broadcast.
/// Host names are left to the agents' resolver.
fn check_advertise(entry: &str) -> Result<()> {
    let Ok(addr) = entry.parse::<SocketAddr>() else {
        return Ok(());
    };
    let ip = addr.ip();
    let broadcast = matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast {
        bail!(
            "[control] advertise entry {entry:?}: an unspecified, multicast or broadcast address \
             cannot be dialled; advertise the address agents reach this controller at, e.g. \
             \"203.0.113.2:7443\""
        );
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_text_bounded(path, MAX_CONFIG_BYTES, "config file")?;
        Self::parse(&text).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let f: File = toml::from_str(text).map_err(|e| anyhow!("{}", e.message()))?;
        let control_listen = f.control.listen.parse().map_err(|_| {
            anyhow!(
                "[control] listen = {:?}: not an address:port; expected e.g. \"0.0.0.0:7443\"",
                f.control.listen
            )
        })?;
        if f.control.advertise.is_empty() {
            bail!("[control] advertise = []: list at least one host:port agents can reach, e.g. [\"203.0.113.2:7443\"]");
        }
        let mut seen = std::collections::HashSet::new();
        for a in &f.control.advertise {
            let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                bail!("[control] advertise entry {a:?}: expected host:port, e.g. \"203.0.113.2:7443\"");
            }
            check_advertise(a)?;
            if !seen.insert(a.to_ascii_lowercase()) {
                bail!("[control] advertise entry {a:?}: listed more than once; list each address once");
            }
        }
        let api_listen = f.api.listen.parse().map_err(|_| {
            anyhow!(
                "[api] listen = {:?}: not an address:port; expected e.g. \"127.0.0.1:7080\"",
                f.api.listen
            )
        })?;
        let overlay_pool: IpNet = f.network.overlay_pool.parse().map_err(|_| {
            anyhow!(
                "[network] overlay_pool = {:?}: not a CIDR prefix; expected e.g. \"100.96.0.0/12\"",
                f.network.overlay_pool
            )
        })?;
        if overlay_pool.trunc() != overlay_pool {
            bail!(
                "[network] overlay_pool = {:?}: host bits are set; did you mean \"{}\"?",
                f.network.overlay_pool,
                overlay_pool.trunc()
            );
        }
        check_overlay_pool(&f.network.overlay_pool, overlay_pool)?;
        let max = if overlay_pool.addr().is_ipv4() {
            30
        } else {
            126
        };
        if overlay_pool.prefix_len() > max {
            bail!(
                "[network] overlay_pool = {:?}: too small for a mesh; use a prefix of /{max} or shorter",
                f.network.overlay_pool
            );
        }
        if !(1280..=9000).contains(&f.network.mtu) {
            bail!(
                "[network] mtu = {}: expected 1280..=9000 (1420 suits most clouds)",
                f.network.mtu
            );
        }
        if !(1..=MAX_PREFIXES_PER_NODE_LIMIT).contains(&f.network.max_prefixes_per_node) {
            bail!(
                "[network] max_prefixes_per_node = {}: expected 1..={MAX_PREFIXES_PER_NODE_LIMIT} \
                 (the default, {}, suits most meshes)",
                f.network.max_prefixes_per_node,
                default_max_prefixes_per_node()
            );
        }
        let paths = paths_config(&f.paths)?;
        let ai_gateway = f.ai_gateway.map(|g| g.validate()).transpose()?;
        Ok(Self {
            control_listen,
            control_advertise: f.control.advertise,
            api_listen,
            admin_token_file: f.api.admin_token_file,
            data_dir: f.state.data_dir,
            overlay_pool,
            mtu: f.network.mtu,
            max_prefixes_per_node: f.network.max_prefixes_per_node,
            paths,
            ai_gateway,
        })
    }
}

/// `[paths]`, on top of the defaults, checked as a whole.
fn paths_config(f: &PathsFile) -> Result<PathConfig> {
    let d = PathConfig::default();
    let duration = |key: &str, text: &Option<String>, default| -> Result<std::time::Duration> {
        match text {
            None => Ok(default),
            Some(t) => humantime::parse_duration(t).map_err(|e| {
                anyhow!("[paths] {key} = {t:?}: {e}; expected a duration like \"5s\" or \"5ms\"")
            }),
        }
    };
    let config = PathConfig {
        loss_penalty_ms: f.loss_penalty_ms.unwrap_or(d.loss_penalty_ms),
        transit_penalty_ms: f.transit_penalty_ms.unwrap_or(d.transit_penalty_ms),
        switch_ratio: f.switch_ratio.unwrap_or(d.switch_ratio),
        switch_min: duration("switch_min", &f.switch_min, d.switch_min)?,
        hold: duration("hold", &f.hold, d.hold)?,
        stale_after: duration("stale_after", &f.stale_after, d.stale_after)?,
        weights: f.weights.clone(),
    };
    config.validate().map_err(|e| anyhow!("[paths] {e}"))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_pools_and_advertise_addresses_that_cannot_work_are_refused() {
        for pool in [
            "0.0.0.0/0",
            "0.0.0.0/8",
            "127.0.0.0/8",
            "127.1.0.0/16",
            "224.0.0.0/4",
            "239.1.0.0/16",
            "169.254.0.0/16",
            "168.0.0.0/6",
            "240.0.0.0/8",
            "::/0",
            "::1/128",
            "::/96",
            "fe80::/10",
            "fe80::/64",
            "ff00::/8",
            "ff02::/16",
            "fc00::/7",
        ] {
            let text =
                format!("[control]\nadvertise = [\"a:1\"]\n[network]\noverlay_pool = \"{pool}\"\n");
            let e = format!("{:#}", Config::parse(&text).expect_err(pool));
            assert!(
                e.contains(&format!("[network] overlay_pool = \"{pool}\"")) && e.contains("use"),
                "{pool}: {e}"
            );
        }
        for pool in ["100.96.0.0/12", "10.0.0.0/8", "192.0.2.0/24", "fd00:1::/48"] {
            let text =
                format!("[control]\nadvertise = [\"a:1\"]\n[network]\noverlay_pool = \"{pool}\"\n");
            Config::parse(&text).unwrap_or_else(|e| panic!("{pool}: {e:#}"));
        }
        for (advertise, needle) in [
            (r#"["0.0.0.0:7443"]"#, "\"0.0.0.0:7443\""),
            (r#"["[::]:7443"]"#, "\"[::]:7443\""),
            (r#"["224.0.0.1:7443"]"#, "\"224.0.0.1:7443\""),
            (r#"["[ff02::1]:7443"]"#, "\"[ff02::1]:7443\""),
            (r#"["255.255.255.255:7443"]"#, "\"255.255.255.255:7443\""),
            (r#"["a.example:7443", "A.example:7443"]"#, "more than once"),
            (r#"["[::1]:7443", "[::1]:7443"]"#, "more than once"),
        ] {
            let text = format!("[control]\nadvertise = {advertise}\n");
            let e = format!("{:#}", Config::parse(&text).expect_err(advertise));
            assert!(
                e.contains("[control] advertise") && e.contains(needle),
                "{advertise}: {e}"
            );
        }
        let advertise = r#"["203.0.113.2:7443", "[2001:db8::1]:7443", "ctl.example:7443"]"#;
        let text = format!("[control]\nadvertise = {advertise}\n");
        Config::parse(&text).unwrap_or_else(|e| panic!("{advertise}: {e:#}"));
    }

    #[test]
    fn config_and_admin_token_files_are_read_up_to_their_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("big.toml");
        std::fs::write(&config, vec![b'#'; 2 * 1024 * 1024]).expect("write");
        let e = format!("{:#}", Config::load(&config).expect_err("refused"));
        assert!(e.contains("big.toml") && e.contains("1024 KiB"), "{e}");
        let e = format!(
            "{:#}",
            Config::load(Path::new("/dev/zero")).expect_err("refused")
        );
        assert!(e.contains("/dev/zero") && e.contains("1024 KiB"), "{e}");

        let token = dir.path().join("admin.token");
        std::fs::write(&token, vec![b'a'; 100 * 1024]).expect("write");
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let e = format!(
            "{:#}",
            crate::server::load_or_create_admin_token(&token).expect_err("refused")
        );
        assert!(
            e.contains("admin_token_file") && e.contains("64 KiB"),
            "{e}"
        );
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../configs/controller.example.toml");
        let c = Config::parse(text).expect("example config");
        assert_eq!(c.overlay_pool.to_string(), "100.96.0.0/12");
        assert_eq!(c.control_listen.port(), 7443);
        assert_eq!(c.api_listen.port(), 7080);
    }

    #[test]
    fn example_ai_gateway_block_is_valid() {
        let text = include_str!("../../configs/controller.example.toml");
        let start = text
            .find("# --- ai_gateway example ---")
            .expect("start marker");
        let end = text
            .find("# --- end ai_gateway example ---")
            .expect("end marker");
        let block: String = text[start..end]
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
            .collect::<Vec<_>>()
            .join("\n");
        let full = format!("[control]\nadvertise = [\"203.0.113.2:7443\"]\n{block}\n");
        let c = Config::parse(&full).expect("the example [ai_gateway]");
        let g = c.ai_gateway.expect("gateway");
        assert_eq!(g.upstreams.len(), 2);
        assert_eq!(g.routes.len(), 2);
        assert_eq!(g.keys[0].rpm, 600);
        assert_eq!(g.listen.port(), 7090);
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::parse("[control]\nadvertise = [\"203.0.113.2:7443\"]\n").expect("minimal");
        assert_eq!(c.mtu, 1420);
        assert_eq!(c.max_prefixes_per_node, 1000);
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:7080");
    }

    #[test]
    fn bad_values_name_key_value_and_fix() {
        for (text, needle) in [
            ("[control]\nadvertise = []\n", "[control] advertise = []"),
            (
                "[control]\nadvertise = [\"nohost\"]\n",
                "\"nohost\": expected host:port",
            ),
            (
                "[control]\nadvertise = [\"a:1\"]\nlisten = \"x\"\n",
                "[control] listen = \"x\"",
            ),
            (
                "[control]\nadvertise = [\"a:1\"]\n[network]\noverlay_pool = \"100.96.0.1/12\"\n",
                "did you mean \"100.96.0.0/12\"",
            ),
            (
                "[control]\nadvertise = [\"a:1\"]\n[network]\nmtu = 100\n",
                "mtu = 100",
            ),
            (
                "[control]\nadvertise = [\"a:1\"]\n[network]\nmax_prefixes_per_node = 0\n",
                "[network] max_prefixes_per_node = 0: expected 1..=100000",
            ),
            (
                "[control]\nadvertise = [\"a:1\"]\nbogus = 1\n",
                "unknown field `bogus`",
            ),
            (
                "[control]\nadvertise = [\"a:1\"]\n[paths]\nhold = \"soon\"\n",
                "[paths] hold = \"soon\"",
            ),
            (
                "[control]\nadvertise = [\"a:1\"]\n[paths]\nswitch_ratio = 1.5\n",
                "switch_ratio = 1.5",
            ),
            (
                "[control]\nadvertise = [\"a:1\"]\n[[paths.weights]]\na = \"aws\"\nb = \"aws\"\nweight_ms = 3.0\n",
                "aws-aws",
            ),
        ] {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
