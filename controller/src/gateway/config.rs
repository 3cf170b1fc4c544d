//! `[ai_gateway]`: the AI gateway's upstreams, routes and client keys, parsed and
//! validated once into typed values. Credentials are read here (from a file of
//! mode 0600 or an environment variable) into [`Secret`]s that never print.
//! Errors name the key, the value and the fix.

use anyhow::{anyhow, bail, Context, Result};
use http::header::HeaderName;
use http::{HeaderValue, Uri};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `[ai_gateway]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    #[serde(default = "default_listen")]
    listen: String,
    node: Option<String>,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_max_attempts")]
    max_attempts: usize,
    #[serde(default = "default_max_client_connections")]
    max_client_connections: usize,
    client_header_timeout: Option<String>,
    client_idle_timeout: Option<String>,
    client_body_timeout: Option<String>,
    client_write_stall_timeout: Option<String>,
    #[serde(default = "default_max_buffered")]
    max_buffered_bytes: usize,
    #[serde(default)]
    breaker: BreakerFile,
    #[serde(default)]
    upstreams: Vec<UpstreamFile>,
    #[serde(default)]
    routes: Vec<RouteFile>,
    #[serde(default)]
    keys: Vec<KeyFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerFile {
    failures: Option<u32>,
    open_for: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    name: String,
    #[serde(default = "default_kind")]
    kind: String,
    site: String,
    region: String,
    base_url: String,
    #[serde(default)]
    public: bool,
    credential_file: Option<PathBuf>,
    credential_env: Option<String>,
    credential_header: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    connect_timeout: Option<String>,
    first_byte_timeout: Option<String>,
    idle_timeout: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    name: String,
    path_prefix: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default = "default_strategy")]
    strategy: String,
    upstreams: Vec<String>,
    #[serde(default)]
    weights: Vec<u32>,
    allowed_regions: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    name: String,
    sha256: String,
    routes: Vec<String>,
    #[serde(default = "default_rpm")]
    rpm: u32,
}

fn default_listen() -> String {
    "0.0.0.0:7090".into()
}
fn default_max_body() -> usize {
    10 * 1024 * 1024
}
fn default_max_attempts() -> usize {
    3
}
fn default_max_buffered() -> usize {
    256 << 20
}

fn default_max_client_connections() -> usize {
    4096
}

fn default_kind() -> String {
    "openai".into()
}
fn default_strategy() -> String {
    "priority".into()
}
fn default_rpm() -> u32 {
    600
}

/// A credential: shows as `***` in every `Debug` and log.
#[derive(Clone)]
pub struct Secret(HeaderValue);

impl Secret {
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// What an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// OpenAI-compatible: chat completions, embeddings, models.
    OpenAi,
    /// Any HTTP API, passed through by path.
    Generic,
}

/// How a route orders its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// In the order listed; later ones only on failover.
    Priority,
    /// By fabric RTT to the upstream's site plus its observed time to first byte.
    LowestLatency,
    /// The first pick at random by weight; failover in descending weight.
    Weighted,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Priority => "priority",
            Strategy::LowestLatency => "lowest-latency",
            Strategy::Weighted => "weighted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// How long it stays open before one half-open probe request.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 3,
            open_for: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub kind: Kind,
    /// The mesh site whose VPC hosts it.
    pub site: String,
    pub region: String,
    /// Scheme, authority and base path; requests append their path after the
    /// route's prefix.
    pub base_url: Uri,
    /// Reached outside the fabric (the operator said so).
    pub public: bool,
    pub credential: Option<(HeaderName, Secret)>,
    /// Models it serves; empty serves any.
    pub models: Vec<String>,
    pub connect_timeout: Duration,
    /// From sending the request to the response head.
    pub first_byte_timeout: Duration,
    /// Longest silence between two body chunks of the response.
    pub idle_timeout: Duration,
    /// Extra trust anchors (PEM) for an https upstream with a private CA.
    pub ca_file: Option<PathBuf>,
}

impl UpstreamConfig {
    pub fn serves(&self, model: Option<&str>) -> bool {
        match model {
            Some(m) if !self.models.is_empty() => self.models.iter().any(|x| same_model(x, m)),
            _ => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// Matches whole path segments: "/v1" matches "/v1/chat/completions", not "/v10".
    pub path_prefix: String,
    /// Empty matches any request (with or without a model).
    pub models: Vec<String>,
    pub strategy: Strategy,
    /// Indexes into [`GatewayConfig::upstreams`], in the listed order.
    pub upstreams: Vec<usize>,
    /// Same length as `upstreams` for `weighted`, else empty.
    pub weights: Vec<u32>,
    /// `None`: any region.
    pub allowed_regions: Option<BTreeSet<String>>,
}

impl RouteConfig {
    /// Whether `path` is under this route's prefix and the model (if the route
    /// lists models) is one of them.
    pub fn matches(&self, path: &str, model: Option<&str>) -> bool {
        self.covers(path)
            && (self.models.is_empty()
                || model.is_some_and(|m| self.models.iter().any(|x| same_model(x, m))))
    }

    /// Whether `path` is under this route's prefix, whatever the model. ASCII
    /// case does not count: some upstreams (Express, ASP.NET, IIS) serve
    /// `/V1/Chat` as `/v1/chat`, so a route's rules must cover every case.
    pub fn covers(&self, path: &str) -> bool {
        let prefix = self.path_prefix.trim_end_matches('/');
        let head = path.get(..prefix.len());
        prefix.is_empty()
            || (head.is_some_and(|h| h.eq_ignore_ascii_case(prefix))
                && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
    }

    /// The part of `path` after the prefix, to append to an upstream's base path.
    pub fn suffix<'a>(&self, path: &'a str) -> &'a str {
        let prefix = self.path_prefix.trim_end_matches('/');
        &path[prefix.len().min(path.len())..]
    }
}

/// Whether two model names are the same model: ASCII case and surrounding
/// whitespace do not count, since some upstreams normalise them, so a rule
/// written for one spelling covers them all.
pub fn same_model(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// The key a model's rules are stored under (see [`same_model`]).
pub fn model_key(m: &str) -> String {
    m.trim().to_ascii_lowercase()
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub name: String,
    pub sha256: [u8; 32],
    /// Route names this key may use; "*" allows all.
    pub routes: BTreeSet<String>,
    pub rpm: u32,
}

impl KeyConfig {
    pub fn allows(&self, route: &str) -> bool {
        self.routes.contains("*") || self.routes.contains(route)
    }
}

/// The validated `[ai_gateway]`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// This host's node on the mesh: fabric RTTs are measured from it.
    pub node: Option<String>,
    pub max_body_bytes: usize,
    /// Upstreams tried per request, the first included.
    pub max_attempts: usize,
    /// The client listener's guards (taken at start; a reload keeps them).
    pub clients: crate::listen::Limits,
    /// From a request's head to the last byte of its body.
    pub client_body_timeout: Duration,
    /// Request bodies held at once across the gateway (for replay on
    /// failover); over it a request gets 503.
    pub max_buffered_bytes: usize,
    /// A model that a route restricts to regions is held to them on every
    /// route: the intersection of the `allowed_regions` of the routes that
    /// list it (by [`model_key`]).
    pub model_regions: HashMap<String, BTreeSet<String>>,
    pub breaker: BreakerConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub keys: Vec<KeyConfig>,
}

fn duration(key: &str, text: &Option<String>, default: Duration) -> Result<Duration> {
    match text {
        None => Ok(default),
        Some(t) => {
            let d = humantime::parse_duration(t).map_err(|e| {
                anyhow!("{key} = {t:?}: {e}; expected a duration like \"5s\" or \"500ms\"")
            })?;
            if d.is_zero() {
                bail!("{key} = {t:?}: must be longer than zero");
            }
            Ok(d)
        }
    }
}

fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        bail!("{what} name {name:?}: use 1-63 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl GatewayFile {
    /// Validates every table and loads the credentials.
    pub fn validate(self) -> Result<GatewayConfig> {
        let listen = self.listen.parse().map_err(|_| {
            anyhow!(
                "[ai_gateway] listen = {:?}: not an address:port; expected e.g. \"0.0.0.0:7090\"",
                self.listen
            )
        })?;
        if !(1024..=1 << 30).contains(&self.max_body_bytes) {
            bail!(
                "[ai_gateway] max_body_bytes = {}: expected 1024..=1073741824 (10485760, 10 MiB, by default)",
                self.max_body_bytes
            );
        }
        if !(1..=10).contains(&self.max_attempts) {
            bail!(
                "[ai_gateway] max_attempts = {}: expected 1..=10 (3 by default)",
                self.max_attempts
            );
        }
        if !(16..=1_000_000).contains(&self.max_client_connections) {
            bail!(
                "[ai_gateway] max_client_connections = {}: expected 16..=1000000 ({} by default)",
                self.max_client_connections,
                default_max_client_connections()
            );
        }
        let clients = crate::listen::Limits {
            max_connections: self.max_client_connections,
            header_timeout: duration(
                "[ai_gateway] client_header_timeout",
                &self.client_header_timeout,
                Duration::from_secs(10),
            )?,
            idle_timeout: duration(
                "[ai_gateway] client_idle_timeout",
                &self.client_idle_timeout,
                Duration::from_secs(60),
            )?,
            write_stall_timeout: duration(
                "[ai_gateway] client_write_stall_timeout",
                &self.client_write_stall_timeout,
                Duration::from_secs(30),
            )?,
            min_read_rate: crate::listen::Limits::API.min_read_rate,
        };
        let client_body_timeout = duration(
            "[ai_gateway] client_body_timeout",
            &self.client_body_timeout,
            Duration::from_secs(60),
        )?;
        let d = BreakerConfig::default();
        let breaker = BreakerConfig {
            failures: self.breaker.failures.unwrap_or(d.failures),
            open_for: duration(
                "[ai_gateway.breaker] open_for",
                &self.breaker.open_for,
                d.open_for,
            )?,
        };
        if !(1..=1000).contains(&breaker.failures) {
            bail!(
                "[ai_gateway.breaker] failures = {}: expected 1..=1000 (3 by default)",
                breaker.failures
            );
        }
        let mut upstreams = Vec::new();
        let mut index = HashMap::new();
        for u in self.upstreams {
            let name = u.name.clone();
            let cfg =
                upstream(u).map_err(|e| anyhow!("[[ai_gateway.upstreams]] {name:?}: {e:#}"))?;
            if index.insert(cfg.name.clone(), upstreams.len()).is_some() {
                bail!("[[ai_gateway.upstreams]] {name:?}: listed twice; upstream names must be unique");
            }
            upstreams.push(cfg);
        }
        let mut routes: Vec<RouteConfig> = Vec::new();
        for r in self.routes {
            let name = r.name.clone();
            let cfg = route(r, &index, &upstreams)
                .map_err(|e| anyhow!("[[ai_gateway.routes]] {name:?}: {e:#}"))?;
            if routes.iter().any(|x| x.name == cfg.name) {
                bail!("[[ai_gateway.routes]] {name:?}: listed twice; route names must be unique");
            }
            routes.push(cfg);
        }
        let mut model_regions: HashMap<String, BTreeSet<String>> = HashMap::new();
        for r in &routes {
            let Some(allowed) = &r.allowed_regions else {
                continue;
            };
            for m in &r.models {
                model_regions
                    .entry(model_key(m))
                    .and_modify(|have| *have = have.intersection(allowed).cloned().collect())
                    .or_insert_with(|| allowed.clone());
            }
        }
        if !(self.max_body_bytes..=1 << 34).contains(&self.max_buffered_bytes) {
            bail!(
                "[ai_gateway] max_buffered_bytes = {}: expected max_body_bytes ({})..=17179869184 ({} by default)",
                self.max_buffered_bytes,
                self.max_body_bytes,
                default_max_buffered()
            );
        }
        let mut keys: Vec<KeyConfig> = Vec::new();
        for k in self.keys {
            let name = k.name.clone();
            let cfg =
                key(k, &routes).map_err(|e| anyhow!("[[ai_gateway.keys]] {name:?}: {e:#}"))?;
            if keys.iter().any(|x| x.name == cfg.name) {
                bail!("[[ai_gateway.keys]] {name:?}: listed twice; key names must be unique");
            }
            if keys.iter().any(|x| x.sha256 == cfg.sha256) {
                bail!("[[ai_gateway.keys]] {name:?}: the same sha256 as another key; create a new key");
            }
            keys.push(cfg);
        }
        if let Some(n) = &self.node {
            check_name("[ai_gateway] node", n)?;
        }
        Ok(GatewayConfig {
            listen,
            node: self.node,
            max_body_bytes: self.max_body_bytes,
            max_attempts: self.max_attempts,
            clients,
            client_body_timeout,
            max_buffered_bytes: self.max_buffered_bytes,
            model_regions,
            breaker,
            upstreams,
            routes,
            keys,
        })
    }
}

fn upstream(u: UpstreamFile) -> Result<UpstreamConfig> {
    check_name("upstream", &u.name)?;
    let kind = match u.kind.as_str() {
        "openai" => Kind::OpenAi,
        "generic" => Kind::Generic,
        other => bail!("kind = {other:?}: expected \"openai\" or \"generic\""),
    };
    if u.site.is_empty() || u.region.is_empty() {
        bail!("site and region must not be empty: they decide the path and the residency");
    }
    let base_url: Uri = u.base_url.parse().map_err(|_| {
        anyhow!(
            "base_url = {:?}: not a URL; expected e.g. \"http://10.20.0.10:8000/v1\"",
            u.base_url
        )
    })?;
    match base_url.scheme_str() {
        Some("http") | Some("https") => {}
        _ => bail!(
            "base_url = {:?}: the scheme must be http or https",
            u.base_url
        ),
    }
    let Some(authority) = base_url.authority() else {
        bail!("base_url = {:?}: no host", u.base_url);
    };
    if authority.as_str().contains('@') {
        bail!(
            "base_url = {:?}: user info in the URL is not allowed; use credential_file",
            u.base_url
        );
    }
    if base_url.query().is_some() {
        bail!(
            "base_url = {:?}: a query string is not allowed in the base URL",
            u.base_url
        );
    }
    let header_name = u.credential_header.as_deref().unwrap_or("authorization");
    let header = HeaderName::from_bytes(header_name.as_bytes()).map_err(|_| {
        anyhow!("credential_header = {header_name:?}: not a valid HTTP header name")
    })?;
    let raw = match (&u.credential_file, &u.credential_env) {
        (Some(_), Some(_)) => bail!("set credential_file or credential_env, not both"),
        (Some(path), None) => Some(read_credential_file(path)?),
        (None, Some(var)) => Some(
            std::env::var(var)
                .map_err(|_| anyhow!("credential_env = {var:?}: the variable is not set in the controller's environment"))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let credential = match raw {
        None => None,
        Some(raw) => {
            if raw.is_empty() {
                bail!("the credential is empty");
            }
            let text = if header == http::header::AUTHORIZATION && !raw.contains(' ') {
                format!("Bearer {raw}")
            } else {
                raw
            };
            let mut value = HeaderValue::from_str(&text)
                .map_err(|_| anyhow!("the credential has characters a header cannot carry"))?;
            value.set_sensitive(true);
            Some((header, Secret(value)))
        }
    };
    let d = UpstreamConfig::defaults();
    Ok(UpstreamConfig {
        name: u.name,
        kind,
        site: u.site,
        region: u.region,
        base_url,
        public: u.public,
        credential,
        models: u.models,
        connect_timeout: duration("connect_timeout", &u.connect_timeout, d.0)?,
        first_byte_timeout: duration("first_byte_timeout", &u.first_byte_timeout, d.1)?,
        idle_timeout: duration("idle_timeout", &u.idle_timeout, d.2)?,
        ca_file: u.ca_file,
    })
}

impl UpstreamConfig {
    /// connect, first byte, idle.
    fn defaults() -> (Duration, Duration, Duration) {
        (
            Duration::from_secs(3),
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
    }
}

/// A credential file must be readable by its owner only, like every secret.
fn read_credential_file(path: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("credential_file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "credential_file {}: readable by others (mode {mode:o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(
        crate::config::read_text_bounded(path, crate::config::MAX_TOKEN_BYTES, "credential_file")?
            .trim()
            .to_string(),
    )
}

fn route(
    r: RouteFile,
    index: &HashMap<String, usize>,
    ups: &[UpstreamConfig],
) -> Result<RouteConfig> {
    check_name("route", &r.name)?;
    if !r.path_prefix.starts_with('/') {
        bail!(
            "path_prefix = {:?}: must start with '/', e.g. \"/v1\"",
            r.path_prefix
        );
    }
    match super::request::normalize_path(&r.path_prefix) {
        Ok(canonical) if canonical == r.path_prefix => {}
        Ok(canonical) => bail!(
            "path_prefix = {:?}: write it as {canonical:?}, the form requests are matched in",
            r.path_prefix
        ),
        Err(e) => bail!("path_prefix: {e}; use plain segments such as \"/v1\""),
    }
    let strategy = match r.strategy.as_str() {
        "priority" => Strategy::Priority,
        "lowest-latency" => Strategy::LowestLatency,
        "weighted" => Strategy::Weighted,
        other => {
            bail!("strategy = {other:?}: expected \"priority\", \"lowest-latency\" or \"weighted\"")
        }
    };
    if r.upstreams.is_empty() {
        bail!("upstreams = []: list at least one upstream name");
    }
    let mut upstreams = Vec::new();
    for name in &r.upstreams {
        let Some(&i) = index.get(name) else {
            let known: Vec<&str> = ups.iter().map(|u| u.name.as_str()).collect();
            bail!("upstreams: {name:?} is not an upstream; known: {known:?}");
        };
        if upstreams.contains(&i) {
            bail!("upstreams: {name:?} listed twice");
        }
        upstreams.push(i);
    }
    match strategy {
        Strategy::Weighted => {
            if r.weights.len() != upstreams.len() {
                bail!(
                    "weights = {:?}: the weighted strategy needs one weight per upstream ({} listed)",
                    r.weights,
                    upstreams.len()
                );
            }
            if r.weights.iter().all(|&w| w == 0) {
                bail!("weights = {:?}: at least one must be above 0", r.weights);
            }
        }
        _ if !r.weights.is_empty() => bail!(
            "weights = {:?}: only the \"weighted\" strategy takes weights",
            r.weights
        ),
        _ => {}
    }
    let allowed_regions = match r.allowed_regions {
        None => None,
        Some(list) if list.is_empty() => bail!(
            "allowed_regions = []: would refuse every request; remove the key to allow any region"
        ),
        Some(list) => {
            let set: BTreeSet<String> = list.into_iter().collect();
            if !upstreams.iter().any(|&i| set.contains(&ups[i].region)) {
                bail!("allowed_regions = {set:?}: none of the route's upstreams is in them");
            }
            Some(set)
        }
    };
    Ok(RouteConfig {
        name: r.name,
        path_prefix: r.path_prefix,
        models: r.models,
        strategy,
        upstreams,
        weights: r.weights,
        allowed_regions,
    })
}

fn key(k: KeyFile, routes: &[RouteConfig]) -> Result<KeyConfig> {
    check_name("key", &k.name)?;
    let hex = k.sha256.trim().to_ascii_lowercase();
    let bytes = decode_hex32(&hex).ok_or_else(|| {
        anyhow!(
            "sha256 = {:?}: expected 64 hex digits, the SHA-256 of the key (`skymesh-controller ai-key create` prints it)",
            k.sha256
        )
    })?;
    if k.routes.is_empty() {
        bail!("routes = []: list the routes this key may use, or [\"*\"] for all");
    }
    for r in &k.routes {
        if r != "*" && !routes.iter().any(|x| &x.name == r) {
            let known: Vec<&str> = routes.iter().map(|x| x.name.as_str()).collect();
            bail!("routes: {r:?} is not a route; known: {known:?}");
        }
    }
    if !(1..=1_000_000).contains(&k.rpm) {
        bail!("rpm = {}: expected 1..=1000000 requests per minute", k.rpm);
    }
    Ok(KeyConfig {
        name: k.name,
        sha256: bytes,
        routes: k.routes.into_iter().collect(),
        rpm: k.rpm,
    })
}

/// Creates a client key: 32 random bytes, written (as `sk-skymesh-` and hex)
/// to a new file of mode 0600. Returns the config entry, which holds only the
/// key's SHA-256.
pub fn create_key(name: &str, out: &Path, routes: &[String], rpm: u32) -> Result<String> {
    use rand::RngCore;
    use sha2::Digest;
    use std::os::unix::fs::OpenOptionsExt;
    check_name("key", name)?;
    if !(1..=1_000_000).contains(&rpm) {
        bail!("--rpm {rpm}: expected 1..=1000000 requests per minute");
    }
    if routes.is_empty() || routes.iter().any(|r| r.is_empty()) {
        bail!("--routes: list route names separated by commas, or \"*\" for all");
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let key = format!("sk-skymesh-{}", hex::encode(bytes));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| {
            format!(
                "--out {}: creating the key file (it must not exist)",
                out.display()
            )
        })?;
    std::io::Write::write_all(&mut f, format!("{key}\n").as_bytes())?;
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let routes: Vec<String> = routes.iter().map(|r| format!("{r:?}")).collect();
    Ok(format!(
        "[[ai_gateway.keys]]\nname = {name:?}\nsha256 = \"{hash}\"\nroutes = [{}]\nrpm = {rpm}\n",
        routes.join(", ")
    ))
}

pub fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_file_is_read_up_to_its_limit() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("big.key");
        std::fs::write(&path, vec![b'k'; 64 * 1024 + 1]).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("mode");
        let err = format!(
            "{:#}",
            read_credential_file(&path).expect_err("over the limit")
        );
        assert!(
            err.contains("credential_file") && err.contains("limit"),
            "{err}"
        );
        std::fs::write(&path, b"sk-secret\n").expect("write");
        assert_eq!(read_credential_file(&path).expect("read"), "sk-secret");
    }

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn parse(text: &str) -> Result<GatewayConfig> {
        let f: GatewayFile = toml::from_str(text).map_err(|e| anyhow!("{}", e.message()))?;
        f.validate()
    }

    fn base() -> String {
        format!(
            r#"
node = "controller"
[[upstreams]]
name = "az"
site = "azure"
region = "eastasia"
base_url = "http://10.20.0.10:8000/v1"
models = ["gpt-4o-mini"]
[[upstreams]]
name = "ali"
site = "alibaba"
region = "cn-shanghai"
base_url = "https://10.30.0.10:8443/v1"
[[routes]]
name = "chat"
path_prefix = "/v1"
strategy = "lowest-latency"
upstreams = ["az", "ali"]
[[keys]]
name = "app"
sha256 = "{HASH}"
routes = ["chat"]
"#
        )
    }

    #[test]
    fn a_full_config_parses_with_defaults() {
        let c = parse(&base()).expect("config");
        assert_eq!(c.listen.port(), 7090);
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.breaker.failures, 3);
        assert_eq!(c.routes[0].upstreams, vec![0, 1]);
        assert_eq!(c.routes[0].strategy, Strategy::LowestLatency);
        assert!(c.keys[0].allows("chat"));
        assert!(!c.keys[0].allows("other"));
        assert!(c.upstreams[0].serves(Some("gpt-4o-mini")));
        assert!(!c.upstreams[0].serves(Some("qwen")));
        assert!(c.upstreams[1].serves(Some("qwen")));
    }

    #[test]
    fn route_matching_respects_segments_and_models() {
        let c = parse(&base()).expect("config");
        let r = &c.routes[0];
        assert!(r.matches("/v1/chat/completions", Some("x")));
        assert!(r.matches("/v1", None));
        assert!(!r.matches("/v10/chat", None));
        assert_eq!(r.suffix("/v1/chat/completions"), "/chat/completions");
        let mut m = r.clone();
        m.models = vec!["gpt-4o-mini".into()];
        assert!(m.matches("/v1/chat/completions", Some("gpt-4o-mini")));
        assert!(!m.matches("/v1/chat/completions", Some("qwen")));
        assert!(!m.matches("/v1/chat/completions", None));
    }

    #[test]
    fn credentials_never_print() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("cred");
        std::fs::write(&f, "sk-very-secret\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let text = base().replace(
            "models = [\"gpt-4o-mini\"]",
            &format!(
                "models = [\"gpt-4o-mini\"]\ncredential_file = \"{}\"",
                f.display()
            ),
        );
        let c = parse(&text).expect("config");
        let (h, v) = c.upstreams[0].credential.clone().expect("credential");
        assert_eq!(h, http::header::AUTHORIZATION);
        assert_eq!(v.header_value(), "Bearer sk-very-secret");
        let shown = format!("{c:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = parse(&text).expect_err("world-readable").to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn bad_values_name_key_value_and_fix() {
        let b = base();
        for (from, to, needle) in [
            (
                "strategy = \"lowest-latency\"",
                "strategy = \"fastest\"",
                "strategy = \"fastest\"",
            ),
            (
                "upstreams = [\"az\", \"ali\"]",
                "upstreams = [\"az\", \"gcp\"]",
                "\"gcp\" is not an upstream",
            ),
            (
                "base_url = \"http://10.20.0.10:8000/v1\"",
                "base_url = \"ftp://x/\"",
                "scheme must be http or https",
            ),
            (
                "base_url = \"http://10.20.0.10:8000/v1\"",
                "base_url = \"http://u:p@10.0.0.1/\"",
                "user info",
            ),
            (
                "path_prefix = \"/v1\"",
                "path_prefix = \"v1\"",
                "must start with '/'",
            ),
            (
                &format!("sha256 = \"{HASH}\""),
                "sha256 = \"abc\"",
                "64 hex digits",
            ),
            (
                "routes = [\"chat\"]",
                "routes = [\"nope\"]",
                "\"nope\" is not a route",
            ),
            (
                "strategy = \"lowest-latency\"",
                "strategy = \"weighted\"",
                "one weight per upstream",
            ),
            (
                "strategy = \"lowest-latency\"",
                "strategy = \"priority\"\nallowed_regions = [\"mars\"]",
                "none of the route's upstreams",
            ),
            (
                "node = \"controller\"",
                "node = \"controller\"\nmax_attempts = 0",
                "max_attempts = 0",
            ),
            (
                "node = \"controller\"",
                "node = \"controller\"\nlisten = \"7090\"",
                "listen = \"7090\"",
            ),
            (
                "region = \"eastasia\"",
                "region = \"eastasia\"\ncredential_env = \"SKYMESH_TEST_UNSET_VAR\"",
                "SKYMESH_TEST_UNSET_VAR",
            ),
            (
                "region = \"eastasia\"",
                "region = \"eastasia\"\nfirst_byte_timeout = \"soon\"",
                "first_byte_timeout = \"soon\"",
            ),
        ] {
            assert!(b.contains(from), "{from}");
            let text = b.replacen(from, to, 1);
            let err = format!("{:#}", parse(&text).expect_err(to));
            assert!(err.contains(needle), "{to}: {err}");
        }
    }
}
