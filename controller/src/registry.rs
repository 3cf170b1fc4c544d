//! The controller's operations on its state: join tokens, enrollment, node
//! registration with prefix admission, revocation.
//!
//! Every invariant (a token used once, an address or a prefix given to one node)
//! is enforced by a store transaction whose compares fail when another writer got
//! there first; the operation then re-reads and retries. The local locks only
//! spare one controller's own requests from racing each other into retries;
//! correctness never depends on them (several controller replicas share one etcd).
//! Enrollments and prefix admissions have a lock each, so that however many
//! prefixes a node registers, no enrollment waits for them; an admission's work
//! is bounded by the per-node prefix cap ([`Registry::with_max_prefixes`]) and
//! runs off the async workers. A revocation takes neither lock (the prefix
//! fence orders it against admissions), and a reconnect whose prefix set has
//! not changed takes the admission lock only when a prefix it was refused may
//! have been freed since (the fence moved): a node reconnecting in a loop with
//! refused prefixes redoes no admission and makes nobody wait.
//!
//! An enrollment also stores a receipt, `/skymesh/enrollments/<token id>/<key
//! sha256>`: the answer it gave, for the token and the agent's control key. An
//! agent whose answer was lost (a timeout, a dropped connection, a controller
//! crash right after the commit) enrolls again with the same token and key and
//! gets the same node and certificate instead of "already used", until the
//! token expires (at least [`RETRY_WINDOW_MIN`] after the enrollment, a day for
//! a token that never expires). So a token is never spent on an answer the
//! agent could not receive.

use crate::ipam::{self, Ipam};
use crate::pki::{self, Ca};
use crate::store::records::{self, NodeRecord, TokenRecord};
use crate::store::{Store, StoreError, Txn, TxnOutcome};
use ipnet::IpNet;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use skymesh_wire::control::{Register, RejectedPrefix};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

/// Attempts of one read-check-commit cycle before giving up with `Busy`.
const MAX_ATTEMPTS: usize = 1000;

/// Prefixes a node may advertise when the config sets no cap
/// (`[network] max_prefixes_per_node`).
pub const DEFAULT_MAX_PREFIXES_PER_NODE: usize = 1000;

/// Where enrollment receipts live (see the module doc).
const RECEIPTS: &str = "/skymesh/enrollments/";

/// The shortest time an agent has to ask again for an enrollment's answer, even
/// when the token expires sooner.
pub const RETRY_WINDOW_MIN: u64 = 10 * 60;

/// How long an agent may ask again for an enrollment's answer when its token
/// never expires.
const RETRY_WINDOW_NO_EXPIRY: u64 = 24 * 60 * 60;

/// What an enrollment answered, kept for the agent to ask again.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Receipt {
    node: String,
    certificate_pem: String,
    cert_sha256: String,
    /// Unix seconds until which the same token and key get this answer again.
    retry_until: u64,
}

fn receipt_key(token_id: &str, key_sha256: &str) -> String {
    format!("{RECEIPTS}{token_id}/{key_sha256}")
}

/// Why an operation failed. The API maps these to status codes, the control
/// channel to refusal codes.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what} {name:?} does not exist")]
    NotFound { what: &'static str, name: String },
    #[error("{field} = {value:?}: {problem}")]
    Invalid {
        field: &'static str,
        value: String,
        problem: String,
    },
    #[error("{0}")]
    TokenRefused(String),
    #[error("node {0:?} is already enrolled; revoke it first (`skymeshctl nodes revoke {0}`) to enroll it again")]
    NameTaken(String),
    #[error("the overlay pool {0} has no free address left; configure a larger overlay_pool")]
    PoolExhausted(IpNet),
    #[error("the store is too busy (too many concurrent writers); retry")]
    Busy,
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<anyhow::Error> for RegistryError {
    fn from(e: anyhow::Error) -> Self {
        RegistryError::Internal(format!("{e:#}"))
    }
}

type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// A join token to create.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub name: String,
    pub site: String,
    pub cloud: String,
    pub region: String,
    /// Seconds; `None` never expires.
    pub ttl: Option<u64>,
    pub reusable: bool,
}

/// A node just enrolled, with the certificate it was issued (not stored: the
/// store keeps only its fingerprint).
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub node: NodeRecord,
    pub certificate_pem: String,
}

/// Each node's held prefixes, by node name.
type Held = BTreeMap<String, Vec<IpNet>>;

pub struct Registry {
    store: Arc<dyn Store>,
    pool: IpNet,
    max_prefixes: usize,
    /// Serializes this controller's enrollments (they compete for the lowest free
    /// overlay address). Held only across work bounded by one enrollment request.
    enroll_lock: tokio::sync::Mutex<()>,
    /// Serializes this controller's prefix admissions (they compete for the
    /// prefix fence); never taken by an enrollment or a revocation.
    admission_lock: tokio::sync::Mutex<()>,
    /// For each node with refused prefixes, the prefix fence's revision its
    /// stored admission was computed at: while the fence has not moved, no
    /// prefix anywhere was freed, so admitting its unchanged set again would
    /// refuse the same prefixes, and a reconnect skips it. A cache: without an
    /// entry (a restart, another replica) the admission runs once more.
    settled: std::sync::Mutex<HashMap<String, u64>>,
    /// Every node's held prefixes as of a prefix fence revision. Any change of
    /// what a node holds moves the fence (an admission that claims, a
    /// release), so while the fence stands at the same revision the map is
    /// current; this controller updates it with its own admissions, and reads
    /// every node again only when someone else moved the fence. Without it,
    /// each registration decoded every node record: quadratic in a mesh
    /// starting up.
    held: std::sync::Mutex<Option<(u64, Held)>>,
}

impl Registry {
    pub fn new(store: Arc<dyn Store>, pool: IpNet) -> Self {
        Self {
            store,
            pool,
            max_prefixes: DEFAULT_MAX_PREFIXES_PER_NODE,
            enroll_lock: tokio::sync::Mutex::new(()),
            admission_lock: tokio::sync::Mutex::new(()),
            settled: std::sync::Mutex::new(HashMap::new()),
            held: std::sync::Mutex::new(None),
        }
    }

    /// Caps the prefixes one node may advertise (`[network]
    /// max_prefixes_per_node`); a registration over the cap is refused whole.
    pub fn with_max_prefixes(mut self, max_prefixes: usize) -> Self {
        self.max_prefixes = max_prefixes;
        self
    }

    /// The most prefixes one node may advertise (and underlay subnets it may
    /// list): what bounds a registration's size on the wire.
    pub fn max_prefixes(&self) -> usize {
        self.max_prefixes
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The CA from the store, or a new one stored for every later start (and every
    /// other replica): whoever commits first wins, the others load it.
    pub async fn load_or_create_ca(&self) -> Result<Ca> {
        loop {
            if let Some(kv) = self.store.get(records::CA_KEY).await? {
                let rec: records::CaRecord = records::decode(&kv.key, &kv.value)?;
                return Ok(Ca::from_pem(&rec.cert_pem, &rec.key_pem)?);
            }
            let ca = Ca::generate(SystemTime::now())?;
            let rec = records::CaRecord {
                cert_pem: ca.cert_pem().to_string(),
                key_pem: ca.key_pem(),
            };
            let txn = Txn::new()
                .when_absent(records::CA_KEY)
                .put(records::CA_KEY, records::encode(&rec));
            if let TxnOutcome::Committed { .. } = self.store.txn(txn).await? {
                tracing::info!(fingerprint = %ca.fingerprint(), "created the controller CA");
                return Ok(ca);
            }
        }
    }

    // ---- join tokens ----

    /// Creates a token; returns its record and the secret (shown once, never stored).
    pub async fn create_token(&self, req: NewToken, now: u64) -> Result<(TokenRecord, String)> {
        validate_name("name", &req.name)?;
        for (field, value) in [
            ("site", &req.site),
            ("cloud", &req.cloud),
            ("region", &req.region),
        ] {
            validate_label(field, value)?;
        }
        let mut id_bytes = [0u8; 6];
        rand::rngs::OsRng.fill_bytes(&mut id_bytes);
        let id = format!("jt-{}", hex::encode(id_bytes));
        let mut secret_bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret_bytes);
        let secret = hex::encode(secret_bytes);
        let rec = TokenRecord {
            id: id.clone(),
            secret_sha256: pki::sha256_hex(secret.as_bytes()),
            name: req.name,
            site: req.site,
            cloud: req.cloud,
            region: req.region,
            created_at: now,
            expires_at: req.ttl.map(|t| now.saturating_add(t)),
            reusable: req.reusable,
            revoked: false,
            used_by: Vec::new(),
        };
        let key = records::token_key(&id);
        let txn = Txn::new()
            .when_absent(&key)
            .put(&key, records::encode(&rec));
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { .. } => Ok((rec, secret)),
            TxnOutcome::Conflict => Err(RegistryError::Busy),
        }
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let (kvs, _) = self.store.range(records::TOKENS).await?;
        kvs.iter()
            .map(|kv| records::decode(&kv.key, &kv.value).map_err(Into::into))
            .collect()
    }

    /// Marks a token revoked; false when there is no such token.
    pub async fn revoke_token(&self, id: &str) -> Result<bool> {
        let key = records::token_key(id);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(false);
            };
            let mut rec: TokenRecord = records::decode(&kv.key, &kv.value)?;
            rec.revoked = true;
            let txn = Txn::new()
                .when_revision(&key, kv.mod_revision)
                .put(&key, records::encode(&rec));
            if let TxnOutcome::Committed { .. } = self.store.txn(txn).await? {
                return Ok(true);
            }
        }
        Err(RegistryError::Busy)
    }

    // ---- enrollment ----

    /// Checks the token, signs the CSR and records the node with a fresh (or its
    /// earlier) overlay address, all in one transaction that also consumes the
    /// token. Token problems come back as `TokenRefused` before anything else
    /// is looked at.
    pub async fn enroll(
        &self,
        ca: &Ca,
        token_id: &str,
        secret: &str,
        csr_pem: &str,
        now: u64,
    ) -> Result<Enrollment> {
        let key_sha256 = csr_key_sha256(csr_pem)?;
        let token_key = records::token_key(token_id);
        // Requests with an unknown token or a wrong secret never queue for the
        // lock, so a flood of them cannot delay a real enrollment.
        let Some(tkv) = self.store.get(&token_key).await? else {
            return Err(RegistryError::TokenRefused(
                "the join token is not valid".to_string(),
            ));
        };
        let token: TokenRecord = records::decode(&tkv.key, &tkv.value)?;
        if !constant_time_eq(
            pki::sha256_hex(secret.as_bytes()).as_bytes(),
            token.secret_sha256.as_bytes(),
        ) {
            return Err(RegistryError::TokenRefused(
                "the join token is not valid".to_string(),
            ));
        }
        let _guard = self.enroll_lock.lock().await;
        let receipt_key = receipt_key(token_id, &key_sha256);
        for _ in 0..MAX_ATTEMPTS {
            let refused = || RegistryError::TokenRefused("the join token is not valid".to_string());
            let Some(tkv) = self.store.get(&token_key).await? else {
                return Err(refused());
            };
            let mut token: TokenRecord = records::decode(&tkv.key, &tkv.value)?;
            if !constant_time_eq(
                pki::sha256_hex(secret.as_bytes()).as_bytes(),
                token.secret_sha256.as_bytes(),
            ) {
                return Err(refused());
            }
            if let Some(again) = self.earlier_answer(&token, &receipt_key, now).await? {
                tracing::info!(node = %again.node.name, token = %token.id, "enrollment asked again with the same token and key; answering as before");
                return Ok(again);
            }
            token
                .usable(now)
                .map_err(|why| RegistryError::TokenRefused(why.to_string()))?;

            // The node's name: the token's, or for a reusable token the first free
            // of name, name-2, name-3, ...
            let (name, node_key) = {
                let mut n = 1;
                loop {
                    let name = if n == 1 {
                        token.name.clone()
                    } else {
                        format!("{}-{n}", token.name)
                    };
                    let key = records::node_key(&name);
                    if self.store.get(&key).await?.is_none() {
                        break (name, key);
                    }
                    if !token.reusable {
                        return Err(RegistryError::NameTaken(name));
                    }
                    n += 1;
                }
            };

            let (overlay_kvs, _) = self.store.range(records::OVERLAY).await?;
            let mut taken = BTreeSet::new();
            let mut mine = None;
            for kv in &overlay_kvs {
                let Ok(ip) = kv.key[records::OVERLAY.len()..].parse::<IpAddr>() else {
                    continue;
                };
                taken.insert(ip);
                if kv.value == name.as_bytes() {
                    mine = Some((ip, kv.mod_revision));
                }
            }
            let (overlay_ip, overlay_rev) = match mine {
                Some(found) => found,
                None => (
                    ipam::lowest_free_address(self.pool, &taken)
                        .ok_or(RegistryError::PoolExhausted(self.pool))?,
                    0,
                ),
            };
            let issued = ca
                .sign_client(csr_pem, &name, SystemTime::now())
                .map_err(|e| RegistryError::Invalid {
                    field: "csr_pem",
                    value: "(certificate request)".into(),
                    problem: format!("{e:#}"),
                })?;
            token.used_by.push(name.clone());
            let node = NodeRecord {
                name: name.clone(),
                site: token.site.clone(),
                cloud: token.cloud.clone(),
                region: token.region.clone(),
                overlay_ip,
                cert_sha256: issued.sha256.clone(),
                token_id: token.id.clone(),
                enrolled_at: now,
                public_key: None,
                listen_port: 0,
                endpoints: Vec::new(),
                observed_endpoint: None,
                advertised: Vec::new(),
                prefixes: Vec::new(),
                rejected_prefixes: Vec::new(),
                underlay: Vec::new(),
                agent_version: String::new(),
                last_seen: now,
                transit: false,
            };
            let okey = records::overlay_key(overlay_ip);
            let receipt = Receipt {
                node: name.clone(),
                certificate_pem: issued.pem.clone(),
                cert_sha256: issued.sha256.clone(),
                retry_until: token
                    .expires_at
                    .unwrap_or(now.saturating_add(RETRY_WINDOW_NO_EXPIRY))
                    .max(now.saturating_add(RETRY_WINDOW_MIN)),
            };
            let txn = Txn::new()
                .when_revision(&token_key, tkv.mod_revision)
                .when_absent(&node_key)
                .when_revision(&okey, overlay_rev)
                .put(&token_key, records::encode(&token))
                .put(&node_key, records::encode(&node))
                .put(&okey, name.as_bytes().to_vec())
                .put(&receipt_key, records::encode(&receipt));
            if let TxnOutcome::Committed { .. } = self.store.txn(txn).await? {
                tracing::info!(node = %name, %overlay_ip, token = %token.id, "node enrolled");
                return Ok(Enrollment {
                    node,
                    certificate_pem: issued.pem,
                });
            }
        }
        Err(RegistryError::Busy)
    }

    /// The answer an earlier enrollment with this token and key gave, if the
    /// agent may still ask for it: the token is not revoked, the retry window is
    /// open and the node is still enrolled with that certificate.
    async fn earlier_answer(
        &self,
        token: &TokenRecord,
        receipt_key: &str,
        now: u64,
    ) -> Result<Option<Enrollment>> {
        if token.revoked {
            return Ok(None);
        }
        let Some(kv) = self.store.get(receipt_key).await? else {
            return Ok(None);
        };
        let receipt: Receipt = records::decode(&kv.key, &kv.value)?;
        if now >= receipt.retry_until {
            return Ok(None);
        }
        let Some((node, _)) = self.node(&receipt.node).await? else {
            return Ok(None);
        };
        if node.token_id != token.id
            || !constant_time_eq(node.cert_sha256.as_bytes(), receipt.cert_sha256.as_bytes())
        {
            return Ok(None);
        }
        Ok(Some(Enrollment {
            node,
            certificate_pem: receipt.certificate_pem,
        }))
    }

    // ---- nodes ----

    pub async fn node(&self, name: &str) -> Result<Option<(NodeRecord, u64)>> {
        match self.store.get(&records::node_key(name)).await? {
            Some(kv) => Ok(Some((
                records::decode(&kv.key, &kv.value)?,
                kv.mod_revision,
            ))),
            None => Ok(None),
        }
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let (kvs, _) = self.store.range(records::NODES).await?;
        kvs.iter()
            .map(|kv| records::decode(&kv.key, &kv.value).map_err(Into::into))
            .collect()
    }

    /// The node a client certificate belongs to, if it is that node's current
    /// certificate; `None` for an unknown, revoked or superseded certificate.
    pub async fn node_for_cert(&self, name: &str, sha256: &str) -> Result<Option<NodeRecord>> {
        Ok(self.node(name).await?.and_then(|(node, _)| {
            constant_time_eq(node.cert_sha256.as_bytes(), sha256.as_bytes()).then_some(node)
        }))
    }

    /// IPAM over every accepted prefix, for checks and suggestions.
    pub async fn ipam(&self) -> Result<Ipam> {
        let nodes = self.nodes().await?;
        Ok(Ipam::new(self.pool).with_prefixes(
            nodes
                .into_iter()
                .flat_map(|n| n.prefixes.into_iter().map(move |p| (n.name.clone(), p))),
        ))
    }

    /// Records what a node registered: its key, endpoints and advertised prefixes,
    /// admitting each prefix that conflicts with nothing. Prefixes it already holds
    /// stay its own.
    pub async fn register(
        &self,
        name: &str,
        reg: &Register,
        observed: SocketAddr,
        now: u64,
    ) -> Result<NodeRecord> {
        self.check_prefix_cap(name, reg)?;
        // Taken only by a registration that changes prefixes: a reconnect that
        // changes nothing never waits for another node's admission.
        let mut admitting = None;
        let key = records::node_key(name);
        let advertised: BTreeSet<IpNet> = reg.advertise.iter().copied().collect();
        for _ in 0..MAX_ATTEMPTS {
            let Some((mut node, rev)) = self.node(name).await? else {
                return Err(RegistryError::NotFound {
                    what: "node",
                    name: name.to_string(),
                });
            };
            node.public_key = Some(reg.public_key);
            node.listen_port = reg.listen_port;
            node.endpoints = reg.endpoints.clone();
            node.observed_endpoint = Some(SocketAddr::new(observed.ip(), reg.listen_port));
            node.underlay = reg.underlay.clone();
            node.agent_version = reg.agent_version.clone();
            node.transit = reg.transit;
            node.last_seen = now;
            let fence = self.store.get(records::PREFIX_FENCE).await?;
            let fence_rev = fence.as_ref().map_or(0, |kv| kv.mod_revision);
            let set_changed = node.advertised != reg.advertise
                || node.prefixes.iter().any(|p| !advertised.contains(p));
            // A refused prefix may be free now, but only if the fence moved
            // since the node's admission (a release bumps it).
            let recheck =
                !node.rejected_prefixes.is_empty() && self.settled_at(name) != Some(fence_rev);
            let prefixes_changed = set_changed || recheck;
            if prefixes_changed && admitting.is_none() {
                admitting = Some(self.admission_lock.lock().await);
                // Read again: another admission may have committed meanwhile.
                continue;
            }
            let mut txn = Txn::new().when_revision(&key, rev);
            let mut claims = false;
            if prefixes_changed {
                let admission = self.admit(name, reg, fence_rev).await?;
                // Only a change of what the node holds moves the fence: an
                // admission that refuses what it refused before claims and
                // frees nothing, and must not make every other node with
                // refused prefixes admit again.
                claims = admission.accepted != node.prefixes;
                node.advertised = reg.advertise.clone();
                node.prefixes = admission.accepted;
                node.rejected_prefixes = admission
                    .refused
                    .iter()
                    .map(|(cidr, conflicts)| RejectedPrefix {
                        cidr: *cidr,
                        reason: conflicts
                            .iter()
                            .map(|c| c.describe(*cidr))
                            .collect::<Vec<_>>()
                            .join("; "),
                    })
                    .collect();
                for r in &node.rejected_prefixes {
                    tracing::warn!(node = %name, prefix = %r.cidr, reason = %r.reason, "advertised prefix refused");
                }
                txn = txn.when_revision(records::PREFIX_FENCE, fence_rev);
                if claims {
                    txn = txn.put(records::PREFIX_FENCE, now.to_string().into_bytes());
                }
            }
            let txn = txn.put(&key, records::encode(&node));
            if let TxnOutcome::Committed { revision } = self.store.txn(txn).await? {
                if prefixes_changed {
                    self.note_held(name, &node.prefixes, fence_rev, claims.then_some(revision));
                    self.settle(
                        name,
                        (!node.rejected_prefixes.is_empty()).then_some(if claims {
                            revision
                        } else {
                            fence_rev
                        }),
                    );
                }
                return Ok(node);
            }
        }
        Err(RegistryError::Busy)
    }

    /// The fence revision `name`'s stored admission is current with, if known.
    fn settled_at(&self, name: &str) -> Option<u64> {
        self.settled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    /// Records (or with `None` forgets) the fence revision `name`'s stored
    /// admission is current with.
    fn settle(&self, name: &str, fence_rev: Option<u64>) {
        let mut settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
        match fence_rev {
            Some(rev) => settled.insert(name.to_string(), rev),
            None => settled.remove(name),
        };
    }

    /// Refuses a registration with more prefixes (or underlay subnets) than the
    /// cap, before anything is read or computed.
    fn check_prefix_cap(&self, name: &str, reg: &Register) -> Result<()> {
        for (field, count) in [
            ("advertise", reg.advertise.len()),
            ("underlay", reg.underlay.len()),
        ] {
            if count > self.max_prefixes {
                return Err(RegistryError::Invalid {
                    field,
                    value: format!("{count} prefixes"),
                    problem: format!(
                        "node {name:?} sent {count} prefixes, more than the cap of {} per node \
                         (`max_prefixes_per_node` in the controller config's [network] table); \
                         aggregate them into fewer, larger prefixes, or raise the cap",
                        self.max_prefixes
                    ),
                });
            }
        }
        Ok(())
    }

    /// Admits `reg`'s advertised prefixes against every other node's, on a
    /// blocking thread: the work grows with the mesh, and the async workers
    /// serve every other agent meanwhile.
    async fn admit(&self, name: &str, reg: &Register, fence_rev: u64) -> Result<ipam::Admission> {
        let held = self.held_at(fence_rev).await?;
        let (pool, name, advertise, underlay) = (
            self.pool,
            name.to_string(),
            reg.advertise.clone(),
            reg.underlay.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let others = held
                .iter()
                .filter(|(n, _)| **n != name)
                .flat_map(|(n, prefixes)| prefixes.iter().map(move |p| (n.clone(), *p)));
            Ipam::new(pool)
                .with_prefixes(others)
                .admit(&name, &advertise, &underlay)
        })
        .await
        .map_err(|e| RegistryError::Internal(format!("prefix admission stopped: {e}")))?
        .map_err(|e| RegistryError::Invalid {
            field: "advertise",
            value: match &e {
                ipam::IpamError::HostBits { cidr, .. } => cidr.to_string(),
                _ => String::new(),
            },
            problem: e.to_string(),
        })
    }

    /// Every node's held prefixes with the prefix fence at `fence_rev`.
    async fn held_at(&self, fence_rev: u64) -> Result<Held> {
        if let Some((rev, held)) = self.held.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if *rev == fence_rev {
                return Ok(held.clone());
            }
        }
        let held: Held = self
            .nodes()
            .await?
            .into_iter()
            .map(|n| (n.name, n.prefixes))
            .collect();
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some((fence_rev, held.clone()));
        Ok(held)
    }

    /// After this controller committed `name`'s admission read at fence
    /// `fence_rev`: the map follows, at the fence's new revision if it moved.
    fn note_held(&self, name: &str, prefixes: &[IpNet], fence_rev: u64, moved_to: Option<u64>) {
        let mut slot = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some((rev, held)) = slot.as_mut() else {
            return;
        };
        if *rev != fence_rev {
            *slot = None;
            return;
        }
        held.insert(name.to_string(), prefixes.to_vec());
        if let Some(new) = moved_to {
            *rev = new;
        }
    }

    /// Records when a node was last connected.
    pub async fn touch(&self, name: &str, now: u64) -> Result<()> {
        let key = records::node_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let Some((mut node, rev)) = self.node(name).await? else {
                return Ok(());
            };
            node.last_seen = now;
            let txn = Txn::new()
                .when_revision(&key, rev)
                .put(&key, records::encode(&node));
            if let TxnOutcome::Committed { .. } = self.store.txn(txn).await? {
                return Ok(());
            }
        }
        Err(RegistryError::Busy)
    }

    /// Removes a node: it leaves every netmap (the watch sees the delete), its
    /// prefixes are freed and its certificate no longer matches any node. Its
    /// overlay address stays reserved for its name. False if there was no node.
    ///
    /// It takes no lock: the fence compare orders it against admissions, so it
    /// never waits for one to be computed.
    pub async fn revoke_node(&self, name: &str) -> Result<bool> {
        self.settle(name, None);
        let key = records::node_key(name);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(false);
            };
            let fence = self.store.get(records::PREFIX_FENCE).await?;
            let txn = Txn::new()
                .when_revision(&key, kv.mod_revision)
                .when_revision(records::PREFIX_FENCE, fence.map_or(0, |f| f.mod_revision))
                .delete(&key)
                .put(
                    records::PREFIX_FENCE,
                    records::unix_now().to_string().into_bytes(),
                );
            if let TxnOutcome::Committed { .. } = self.store.txn(txn).await? {
                tracing::info!(node = %name, "node revoked");
                return Ok(true);
            }
        }
        Err(RegistryError::Busy)
    }
}

/// A node name becomes a certificate's DNS name: a DNS label.
fn validate_name(field: &'static str, value: &str) -> Result<()> {
    if value == skymesh_wire::path::DIRECT {
        return Err(RegistryError::Invalid {
            field,
            value: value.to_string(),
            problem: "\"direct\" is reserved (it names a path without transit); pick another name"
                .into(),
        });
    }
    validate(
        field,
        value,
        |b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
        !value.starts_with('-') && !value.ends_with('-'),
        "use 1-63 lower-case letters, digits and inner dashes (a DNS label), e.g. aws-gw",
    )
}

fn validate_label(field: &'static str, value: &str) -> Result<()> {
    validate(
        field,
        value,
        |b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.',
        true,
        "use 1-63 letters, digits, '-', '_' or '.', e.g. us-west-2",
    )
}

fn validate(
    field: &'static str,
    value: &str,
    allowed: impl Fn(u8) -> bool,
    extra: bool,
    problem: &str,
) -> Result<()> {
    if !value.is_empty() && value.len() <= 63 && value.bytes().all(allowed) && extra {
        Ok(())
    } else {
        Err(RegistryError::Invalid {
            field,
            value: value.to_string(),
            problem: problem.into(),
        })
    }
}

/// Hex SHA-256 of the public key in a certificate signing request: what makes
/// two enrollments "the same agent".
fn csr_key_sha256(csr_pem: &str) -> Result<String> {
    use rcgen::PublicKeyData;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        RegistryError::Invalid {
            field: "csr_pem",
            value: "(certificate request)".into(),
            problem: format!("the certificate signing request is invalid: {e}"),
        }
    })?;
    Ok(pki::sha256_hex(csr.public_key.der_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
