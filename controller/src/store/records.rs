//! What the controller stores, and where: the records and the key layout.
//!
//! Keys map one-to-one onto etcd. Every value is JSON, so an operator can read
//! them with `etcdctl get --prefix /skymesh/`.
//!
//! | key | value |
//! |---|---|
//! | `/skymesh/ca` | [`CaRecord`]: the CA certificate and key |
//! | `/skymesh/tokens/<id>` | [`TokenRecord`] |
//! | `/skymesh/nodes/<name>` | [`NodeRecord`] |
//! | `/skymesh/ipam/overlay/<ip>` | the name of the node the address belongs to; never reused by another name |
//! | `/skymesh/ipam/prefix-fence` | bumped by every write that changes accepted prefixes, so two conflicting admissions cannot both commit |

use ipnet::IpNet;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use skymesh_wire::control::RejectedPrefix;
use skymesh_wire::PublicKey;
use std::net::{IpAddr, SocketAddr};

pub const CA_KEY: &str = "/skymesh/ca";
pub const TOKENS: &str = "/skymesh/tokens/";
pub const NODES: &str = "/skymesh/nodes/";
pub const OVERLAY: &str = "/skymesh/ipam/overlay/";
pub const PREFIX_FENCE: &str = "/skymesh/ipam/prefix-fence";

pub fn token_key(id: &str) -> String {
    format!("{TOKENS}{id}")
}

pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

pub fn overlay_key(ip: IpAddr) -> String {
    format!("{OVERLAY}{ip}")
}

#[derive(Clone, Serialize, Deserialize)]
pub struct CaRecord {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// Hex SHA-256 of the secret; the secret itself is only in the token text.
    pub secret_sha256: String,
    /// Name of the node that enrolls with it (with a suffix for reusable tokens).
    pub name: String,
    pub site: String,
    pub cloud: String,
    pub region: String,
    pub created_at: u64,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<u64>,
    pub reusable: bool,
    pub revoked: bool,
    /// Nodes that enrolled with it, in order.
    pub used_by: Vec<String>,
}

impl TokenRecord {
    /// Whether the token can enroll another node at `now` (unix seconds); the
    /// reason why not otherwise.
    pub fn usable(&self, now: u64) -> Result<(), &'static str> {
        if self.revoked {
            return Err("the join token was revoked");
        }
        if self.expires_at.is_some_and(|t| now >= t) {
            return Err("the join token has expired");
        }
        if !self.reusable && !self.used_by.is_empty() {
            return Err("the join token was already used (it is single-use)");
        }
        Ok(())
    }
}

/// Prefix of the operator's link overrides: `/skymesh/links/<a>/<b>` with `a < b`,
/// a JSON [`crate::paths::LinkOverride`].
pub const LINKS: &str = "/skymesh/links/";

/// The key of link `a`-`b`'s override, in either order.
pub fn link_key(a: &str, b: &str) -> String {
    let (a, b) = if a <= b { (a, b) } else { (b, a) };
    format!("{LINKS}{a}/{b}")
}

/// The two ends named by a link override's key.
pub fn link_from_key(key: &str) -> Option<(String, String)> {
    let (a, b) = key.strip_prefix(LINKS)?.split_once('/')?;
    (!a.is_empty() && !b.is_empty() && !b.contains('/')).then(|| (a.to_string(), b.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub site: String,
    pub cloud: String,
    pub region: String,
    pub overlay_ip: IpAddr,
    /// Fingerprint of the one client certificate this node may use.
    pub cert_sha256: String,
    pub token_id: String,
    pub enrolled_at: u64,
    /// Set by the node's first `Register`.
    pub public_key: Option<PublicKey>,
    #[serde(default)]
    pub listen_port: u16,
    /// Configured public endpoints, preferred.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Address the control connection came from, with the WireGuard port.
    #[serde(default)]
    pub observed_endpoint: Option<SocketAddr>,
    /// What the node asked for.
    #[serde(default)]
    pub advertised: Vec<IpNet>,
    /// What IPAM accepted: the mesh routes these to the node.
    #[serde(default)]
    pub prefixes: Vec<IpNet>,
    #[serde(default)]
    pub rejected_prefixes: Vec<RejectedPrefix>,
    #[serde(default)]
    pub underlay: Vec<IpNet>,
    #[serde(default)]
    pub agent_version: String,
    /// Unix seconds of the last register or disconnect.
    #[serde(default)]
    pub last_seen: u64,
    /// The node offers to forward between other nodes (its `[node] transit`).
    #[serde(default)]
    pub transit: bool,
}

impl NodeRecord {
    /// Where peers should send this node's first handshake.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoints.first().copied().or(self.observed_endpoint)
    }

    /// Every endpoint known for the node, configured first.
    pub fn all_endpoints(&self) -> Vec<SocketAddr> {
        let mut all = self.endpoints.clone();
        if let Some(o) = self.observed_endpoint {
            if !all.contains(&o) {
                all.push(o);
            }
        }
        all
    }
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Records are plain data: serializing them cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> anyhow::Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| anyhow::anyhow!("store value at {key} is not valid: {e}"))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
