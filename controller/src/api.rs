//! The REST API (axum, JSON): nodes, join tokens, prefixes, IPAM, health,
//! metrics and its own OpenAPI document. Every route needs the admin bearer
//! token. Errors are `{"error": code, "detail": sentence}`; [`ApiError`]
//! (`error.rs`) is the one place that maps failures to status codes. The range
//! of every numeric and duration field is in `limits.rs`, the document in
//! `openapi.rs`: 400 when a request does not match the document, 422 when it
//! does but its values do not fit together.

use crate::control::Hub;
use crate::control::PathsQuery;
use crate::metrics::Metrics;
use crate::paths::LinkOverride;
use crate::pki::Ca;
use crate::registry::{NewToken, Registry, RegistryError};
use crate::store::records::{self, NodeRecord, TokenRecord};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use skymesh_wire::control::RejectedPrefix;
use skymesh_wire::JoinToken;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

mod error;
pub mod limits;
mod openapi;

pub use error::{ApiError, Json, Path, Query};
use limits::{CidrText, PrefixLen, Ttl, WeightMs};
pub use openapi::{is_documented, openapi_document};

/// The largest request body the API reads; larger ones get a 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Default lifetime of a join token when the request gives none: 24 hours.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 24 * 3600;

pub struct ApiState {
    pub registry: Arc<Registry>,
    pub ca: Arc<Ca>,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    pub admin_token: String,
    pub control_advertise: Vec<String>,
    /// The AI gateway, whose `skymesh_ai_*` series /metrics appends.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// This API's listener guards, whose counters /metrics shows.
    pub api_guard: Arc<crate::listen::Guard>,
    /// The control endpoint's guard over unauthenticated connections.
    pub control_guard: Arc<crate::listen::Guard>,
}

/// Every route: method, path, summary. The router and the OpenAPI document are
/// both checked against this table by a test.
pub const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", "Liveness and store reachability"),
    ("GET", "/metrics", "Prometheus metrics of the controller"),
    ("GET", "/v1/openapi.json", "This API's OpenAPI 3 document"),
    (
        "POST",
        "/v1/backup",
        "A consistent copy of the state store (holds the CA key), for `skymesh-controller restore`",
    ),
    ("GET", "/v1/nodes", "List enrolled nodes"),
    ("GET", "/v1/nodes/{name}", "Show one node"),
    (
        "DELETE",
        "/v1/nodes/{name}",
        "Revoke a node: it leaves every netmap and its certificate is refused",
    ),
    ("POST", "/v1/join-tokens", "Create a join token"),
    (
        "GET",
        "/v1/join-tokens",
        "List join tokens (never their secrets)",
    ),
    ("DELETE", "/v1/join-tokens/{id}", "Revoke a join token"),
    (
        "GET",
        "/v1/prefixes",
        "Every advertised prefix, accepted or refused with its conflicts",
    ),
    (
        "POST",
        "/v1/ipam/check",
        "List the conflicts a prefix would have",
    ),
    (
        "POST",
        "/v1/ipam/suggest",
        "Lowest free block of a length within a range",
    ),
    (
        "GET",
        "/v1/links",
        "The measured link matrix: RTT, jitter, loss, up, cost, overrides",
    ),
    (
        "GET",
        "/v1/paths",
        "Every pair's chosen and backup path, with cost and reason",
    ),
    (
        "PUT",
        "/v1/links/{a}/{b}",
        "Operator override of a link: disable, weight, pin a path",
    ),
    (
        "GET",
        "/v1/ai/upstreams",
        "The AI gateway's upstreams: site, region, circuit, fabric RTT, time to first byte",
    ),
];

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/backup", post(backup))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(show_node).delete(revoke_node))
        .route("/v1/join-tokens", post(create_token).get(list_tokens))
        .route("/v1/join-tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/prefixes", get(list_prefixes))
        .route("/v1/ipam/check", post(ipam_check))
        .route("/v1/ipam/suggest", post(ipam_suggest))
        .route("/v1/links", get(list_links))
        .route("/v1/paths", get(list_paths))
        .route("/v1/ai/upstreams", get(list_ai_upstreams))
        .route("/v1/links/{a}/{b}", axum::routing::put(put_link))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; GET /v1/openapi.json lists them",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; GET /v1/openapi.json lists them",
    )
}

async fn auth(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = presented.is_some_and(|p| {
        p.len() == state.admin_token.len()
            && p.bytes()
                .zip(state.admin_token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !ok {
        state
            .metrics
            .api_requests_unauthorized
            .fetch_add(1, Ordering::Relaxed);
        let mut resp = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the admin token as `Authorization: Bearer <token>` (the controller's [api] admin_token_file)",
        )
        .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    next.run(req).await
}

// ---- views ----

/// A node as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub site: String,
    pub cloud: String,
    pub region: String,
    pub overlay_ip: IpAddr,
    pub public_key: Option<String>,
    pub endpoints: Vec<SocketAddr>,
    pub advertised: Vec<IpNet>,
    pub prefixes: Vec<IpNet>,
    pub rejected_prefixes: Vec<RejectedPrefix>,
    pub online: bool,
    pub last_seen: u64,
    pub enrolled_at: u64,
    pub agent_version: String,
    /// Other nodes' traffic may be routed through this node.
    #[serde(default)]
    pub transit: bool,
}

fn node_view(n: NodeRecord, online: bool) -> NodeView {
    NodeView {
        endpoints: n.all_endpoints(),
        public_key: n.public_key.map(|k| k.to_string()),
        last_seen: if online {
            records::unix_now()
        } else {
            n.last_seen
        },
        name: n.name,
        site: n.site,
        cloud: n.cloud,
        region: n.region,
        overlay_ip: n.overlay_ip,
        advertised: n.advertised,
        prefixes: n.prefixes,
        rejected_prefixes: n.rejected_prefixes,
        online,
        enrolled_at: n.enrolled_at,
        agent_version: n.agent_version,
        transit: n.transit,
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub site: String,
    pub cloud: String,
    pub region: String,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub reusable: bool,
    pub revoked: bool,
    pub used_by: Vec<String>,
    /// valid, used, expired or revoked.
    pub state: String,
}

fn token_view(t: TokenRecord) -> TokenView {
    let state = match t.usable(records::unix_now()) {
        Ok(()) => "valid",
        Err(_) if t.revoked => "revoked",
        Err(_) if !t.used_by.is_empty() && !t.reusable => "used",
        Err(_) => "expired",
    };
    TokenView {
        state: state.to_string(),
        id: t.id,
        name: t.name,
        site: t.site,
        cloud: t.cloud,
        region: t.region,
        created_at: t.created_at,
        expires_at: t.expires_at,
        reusable: t.reusable,
        revoked: t.revoked,
        used_by: t.used_by,
    }
}

// ---- handlers ----

async fn healthz(State(s): State<Arc<ApiState>>) -> Result<axum::Json<Value>, ApiError> {
    if let crate::store::StoreHealth::NotWritable { reason } =
        s.registry.store().check_writable().await
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_not_writable",
            format!(
                "the state store cannot take writes: {reason}; if the data_dir's file system is \
                 full, free space there: the store retries by itself"
            ),
        ));
    }
    let revision = s.registry.store().revision().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    })?;
    Ok(axum::Json(json!({"status": "ok", "revision": revision})))
}

/// The store file `skymesh-controller backup` asks for: taken here, by the process that holds
/// the store open, so a running controller is backed up without stopping it.
async fn backup(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let bytes =
        s.registry.store().backup().await.map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
    tracing::info!(
        bytes = bytes.len(),
        "state store backup taken through the API"
    );
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let nodes = s.registry.nodes().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = s.metrics.render(&nodes);
            let mut listeners = vec![("api", &*s.api_guard), ("control", &*s.control_guard)];
            if let Some(gw) = &s.gateway {
                text.push_str(&gw.render_metrics());
                listeners.push(("ai_gateway", &*gw.clients));
            }
            crate::listen::render(&mut text, &listeners);
            skymesh_wire::prom::classic_text(&text)
        },
    )
        .into_response())
}

async fn openapi() -> axum::Json<Value> {
    axum::Json(openapi_document())
}

async fn list_nodes(State(s): State<Arc<ApiState>>) -> Result<axum::Json<Vec<NodeView>>, ApiError> {
    let online = s.hub.online();
    let nodes = s.registry.nodes().await?;
    Ok(axum::Json(
        nodes
            .into_iter()
            .map(|n| {
                let on = online.contains_key(&n.name);
                node_view(n, on)
            })
            .collect(),
    ))
}

async fn show_node(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<axum::Json<NodeView>, ApiError> {
    let Some((node, _)) = s.registry.node(&name).await? else {
        return Err(RegistryError::NotFound { what: "node", name }.into());
    };
    let online = s.hub.online().contains_key(&node.name);
    Ok(axum::Json(node_view(node, online)))
}

async fn revoke_node(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    if !s.registry.revoke_node(&name).await? {
        return Err(RegistryError::NotFound { what: "node", name }.into());
    }
    Ok(axum::Json(json!({"revoked": name})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    site: String,
    cloud: String,
    region: String,
    /// Like "24h", "30m", "7d", or "never"; see [`limits::parse_ttl`].
    #[serde(default)]
    ttl: Option<Ttl>,
    #[serde(default)]
    reusable: bool,
}

async fn create_token(
    State(s): State<Arc<ApiState>>,
    Json(req): Json<CreateToken>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    let ttl = req.ttl.map_or(Some(DEFAULT_TOKEN_TTL_SECS), |Ttl(t)| t);
    let (rec, secret) = s
        .registry
        .create_token(
            NewToken {
                name: req.name,
                site: req.site,
                cloud: req.cloud,
                region: req.region,
                ttl,
                reusable: req.reusable,
            },
            records::unix_now(),
        )
        .await?;
    let token = JoinToken {
        controllers: s.control_advertise.clone(),
        ca_sha256: s.ca.fingerprint(),
        id: rec.id.clone(),
        secret,
    };
    let mut body = serde_json::to_value(token_view(rec)).unwrap_or_default();
    body["token"] = Value::String(token.encode());
    Ok((StatusCode::CREATED, axum::Json(body)))
}

async fn list_tokens(
    State(s): State<Arc<ApiState>>,
) -> Result<axum::Json<Vec<TokenView>>, ApiError> {
    Ok(axum::Json(
        s.registry
            .tokens()
            .await?
            .into_iter()
            .map(token_view)
            .collect(),
    ))
}

async fn revoke_token(
    State(s): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    if !s.registry.revoke_token(&id).await? {
        return Err(RegistryError::NotFound {
            what: "join token",
            name: id,
        }
        .into());
    }
    Ok(axum::Json(json!({"revoked": id})))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PrefixView {
    pub cidr: IpNet,
    pub node: String,
    /// accepted or rejected.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

async fn list_prefixes(
    State(s): State<Arc<ApiState>>,
) -> Result<axum::Json<Vec<PrefixView>>, ApiError> {
    let mut out = Vec::new();
    for n in s.registry.nodes().await? {
        for p in &n.prefixes {
            out.push(PrefixView {
                cidr: *p,
                node: n.name.clone(),
                status: "accepted".into(),
                reason: None,
            });
        }
        for r in &n.rejected_prefixes {
            out.push(PrefixView {
                cidr: r.cidr,
                node: n.name.clone(),
                status: "rejected".into(),
                reason: Some(r.reason.clone()),
            });
        }
    }
    Ok(axum::Json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    cidr: CidrText,
}

/// A prefix of the right shape that still may not be one (a 422).
fn parse_cidr(field: &str, CidrText(value): &CidrText) -> Result<IpNet, ApiError> {
    value.parse().map_err(|_| {
        ApiError::unprocessable(format!(
            "{field} = {value:?}: not a CIDR prefix; expected e.g. \"10.0.0.0/16\" or \"fd00:1::/48\""
        ))
    })
}

async fn ipam_check(
    State(s): State<Arc<ApiState>>,
    Json(req): Json<CheckRequest>,
) -> Result<axum::Json<Value>, ApiError> {
    let cidr = parse_cidr("cidr", &req.cidr)?;
    let ipam = s.registry.ipam().await?;
    let conflicts = ipam.check(cidr, None, &[])?;
    let list: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            let mut v = serde_json::to_value(c).unwrap_or_default();
            v["message"] = Value::String(c.describe(cidr));
            v
        })
        .collect();
    Ok(axum::Json(
        json!({"cidr": cidr, "ok": list.is_empty(), "conflicts": list}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuggestRequest {
    within: CidrText,
    prefix_len: PrefixLen,
}

async fn ipam_suggest(
    State(s): State<Arc<ApiState>>,
    Json(req): Json<SuggestRequest>,
) -> Result<axum::Json<Value>, ApiError> {
    let within = parse_cidr("within", &req.within)?;
    let PrefixLen(prefix_len) = req.prefix_len;
    let ipam = s.registry.ipam().await?;
    match ipam.suggest(within, prefix_len)? {
        Some(cidr) => Ok(axum::Json(json!({"cidr": cidr}))),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_free_block",
            format!(
                "no free /{prefix_len} is left within {within}; try a larger range or a longer prefix"
            ),
        )),
    }
}

/// `?node=NAME` of `GET /v1/links` and `GET /v1/paths`: only what has that
/// node as an end. At 1,000 nodes the whole list holds 500,000 pairs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFilter {
    node: Option<String>,
}

impl NodeFilter {
    /// The hub's query, after checking that the node exists (a name that
    /// does not is a 404, not an empty list that looks like a quiet node).
    async fn query(self, s: &ApiState) -> Result<PathsQuery, ApiError> {
        if let Some(name) = &self.node {
            if s.registry.node(name).await?.is_none() {
                return Err(RegistryError::NotFound {
                    what: "node",
                    name: name.clone(),
                }
                .into());
            }
        }
        Ok(PathsQuery {
            refresh: false,
            node: self.node,
        })
    }
}

/// `GET /v1/links[?node=NAME]`.
async fn list_links(
    State(s): State<Arc<ApiState>>,
    Query(filter): Query<NodeFilter>,
) -> Result<axum::Json<Value>, ApiError> {
    let query = filter.query(&s).await?;
    let node = query.node.clone();
    let mut snap = s.hub.paths(query).await.map_err(unavailable)?;
    // The hub adds the legs of the transits the node's paths cross (what the
    // AI gateway needs); the operator asked for the node's own links.
    if let Some(node) = node {
        snap.links.retain(|l| l.a == node || l.b == node);
    }
    Ok(axum::Json(json!(snap.links)))
}

/// `GET /v1/paths[?node=NAME]`.
async fn list_paths(
    State(s): State<Arc<ApiState>>,
    Query(filter): Query<NodeFilter>,
) -> Result<axum::Json<Value>, ApiError> {
    let query = filter.query(&s).await?;
    let snap = s.hub.paths(query).await.map_err(unavailable)?;
    Ok(axum::Json(json!(snap.pairs)))
}

async fn list_ai_upstreams(State(s): State<Arc<ApiState>>) -> Result<axum::Json<Value>, ApiError> {
    let gw = s.gateway.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "ai_gateway_off",
            "the AI gateway is not configured: add an [ai_gateway] table to the controller's config".to_string(),
        )
    })?;
    Ok(axum::Json(json!(gw.upstreams_view())))
}

fn unavailable(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("{e:#}"),
    )
}

/// The body of `PUT /v1/links/{a}/{b}`; the default clears the override.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutLink {
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    weight_ms: Option<WeightMs>,
    /// "direct" or a transit node's name.
    #[serde(default)]
    pin: Option<String>,
}

/// `PUT /v1/links/{a}/{b}`: stores the override (the store is the truth for
/// every replica), recomputes, and answers with the link and the pair's path.
async fn put_link(
    State(s): State<Arc<ApiState>>,
    Path((a, b)): Path<(String, String)>,
    Json(req): Json<PutLink>,
) -> Result<axum::Json<Value>, ApiError> {
    if a == b {
        return Err(ApiError::unprocessable(format!(
            "link {a:?}-{b:?}: a link joins two different nodes; name two nodes"
        )));
    }
    let names: Vec<String> = s
        .registry
        .nodes()
        .await?
        .into_iter()
        .map(|n| n.name)
        .collect();
    for end in [&a, &b] {
        if !names.contains(end) {
            return Err(RegistryError::NotFound {
                what: "node",
                name: end.clone(),
            }
            .into());
        }
    }
    let pin = match req.pin.as_deref() {
        None => None,
        Some(label) => {
            let via = skymesh_wire::Via::from_label(label);
            if let Some(t) = via.transit() {
                if t == a || t == b || !names.iter().any(|n| n == t) {
                    return Err(ApiError::unprocessable(format!(
                        "pin = {label:?}: expected \"direct\" or the name of a third enrolled node to transit through"
                    )));
                }
            }
            Some(via)
        }
    };
    let o = LinkOverride {
        disabled: req.disabled,
        weight_ms: req.weight_ms.map(|WeightMs(w)| w),
        pin,
    };
    let key = records::link_key(&a, &b);
    let store = s.registry.store();
    let result = if o == LinkOverride::default() {
        store.delete(&key).await.map(|_| ())
    } else {
        let value = serde_json::to_vec(&o).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        store.put(&key, value).await.map(|_| ())
    };
    result.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    })?;
    tracing::info!(a = %a, b = %b, override = ?o, "link override set");
    let snap = s
        .hub
        .paths(PathsQuery {
            refresh: true,
            node: Some(a.clone()),
        })
        .await
        .map_err(unavailable)?;
    let (x, y) = if a <= b { (&a, &b) } else { (&b, &a) };
    Ok(axum::Json(json!({
        "override": o,
        "link": snap.links.iter().find(|l| &l.a == x && &l.b == y),
        "path": snap.pairs.iter().find(|p| &p.a == x && &p.b == y),
    })))
}
