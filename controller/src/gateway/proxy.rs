//! The gateway's HTTP driver: authenticates the client key, applies its rate
//! limit, matches a route, asks [`select::choose`] for the upstreams, and relays
//! the request to them in order until one answers. Request bodies are read
//! (bounded) so they can be replayed on failover; responses stream through
//! unbuffered. Failover stops as soon as a response head reaches the client;
//! after that a broken upstream ends the answer with an explicit error.

use super::config::{GatewayConfig, KeyConfig, RouteConfig};
use super::metrics::{AiMetrics, PairSeries, UpstreamGauge};
use super::request;
use super::select::{self, Choice, Excluded, Health, RateLimit};
use super::shard;
use super::upstream::{self, FabricView, Lease, Pool};
use super::{lock, BoxError};
use anyhow::Result;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus_client::metrics::histogram::Histogram;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub type GwBody = BoxBody<Bytes, BoxError>;

/// The header a client restricts the regions of its request with.
pub const RESIDENCY_HEADER: &str = "x-skymesh-residency";

/// One upstream as the running gateway holds it.
pub struct Upstream {
    /// One per shard: [`Upstream::pool`] picks the calling shard's.
    pools: Vec<Pool>,
    /// Carried across reloads by name, so a reload does not close a circuit.
    pub health: Arc<Mutex<Health>>,
    /// `x-skymesh-upstream` and `x-skymesh-region` of its answers (none for a
    /// name that is not a valid header value).
    name_header: Option<HeaderValue>,
    region_header: Option<HeaderValue>,
}

impl Upstream {
    /// The connection pool of the calling thread's shard.
    pub fn pool(&self) -> &Pool {
        &self.pools[shard::current() % self.pools.len()]
    }
}

/// One upstream as the API shows it.
#[derive(Debug, serde::Serialize)]
pub struct UpstreamView {
    pub name: String,
    pub site: String,
    pub region: String,
    pub base_url: String,
    pub public: bool,
    pub models: Vec<String>,
    /// "closed", "open" or "half-open".
    pub circuit: &'static str,
    pub up: bool,
    /// RTT of the current fabric path from the gateway's node to the site.
    pub fabric_rtt_ms: Option<f64>,
    /// The upstream's own time to first byte (less the fabric RTT): the median
    /// of its newest five answers of the last minute, once there are three.
    pub ttfb_ms: Option<f64>,
}

/// One config generation. In-flight requests keep the generation they started
/// with; a reload swaps in the next.
pub struct Generation {
    pub config: GatewayConfig,
    pub upstreams: Vec<Upstream>,
    /// SHA-256 of a key → index into `config.keys`.
    keys: HashMap<[u8; 32], usize>,
    limits: Vec<Arc<Mutex<RateLimit>>>,
    /// Per (route, upstream): the metric handles, made at the pair's first
    /// answer. Indexed `route * upstreams.len() + upstream`.
    series: Vec<OnceLock<PairSeries>>,
}

/// The gateway: the current generation, the fabric view, the metrics.
pub struct Gateway {
    current: RwLock<Arc<Generation>>,
    /// Client connections open on each serving thread (shard); one entry
    /// per shard, each with its own upstream connection pools.
    load: shard::Load,
    /// The client listener's cap and deadlines.
    pub clients: Arc<crate::listen::Guard>,
    /// Request body bytes held by requests in flight.
    buffered: AtomicUsize,
    pub fabric: Arc<FabricView>,
    pub metrics: AiMetrics,
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Result<Self> {
        let fabric = Arc::new(FabricView::default());
        let shards = shard::count();
        let clients = crate::listen::Guard::new("ai_gateway", config.clients);
        let generation = Generation::build(config, &fabric, None, shards)?;
        Ok(Self {
            current: RwLock::new(Arc::new(generation)),
            load: shard::Load::new(shards),
            clients,
            buffered: AtomicUsize::new(0),
            fabric,
            metrics: AiMetrics::default(),
        })
    }

    /// How many threads serve clients ([`shard`]).
    pub fn shards(&self) -> usize {
        self.load.shards()
    }

    /// Closes the calling shard's idle upstream connections that timed out
    /// or whose upstream hung up.
    pub fn sweep_idle(&self) {
        let now = Instant::now();
        for u in &self.current().upstreams {
            u.pool().sweep(now);
        }
    }

    /// Client connections per shard.
    pub fn load(&self) -> &shard::Load {
        &self.load
    }

    pub fn current(&self) -> Arc<Generation> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in a new config; circuit, latency and rate-limit state carries over
    /// by name. Requests in flight finish on the old one.
    pub fn reload(&self, config: GatewayConfig) -> Result<()> {
        let old = self.current();
        let next = Generation::build(config, &self.fabric, Some(&old), self.shards())?;
        if next.config.listen != old.config.listen {
            tracing::warn!(
                old = %old.config.listen,
                new = %next.config.listen,
                "[ai_gateway] listen changed: restart the controller to move the listener"
            );
        }
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
        Ok(())
    }

    /// What `GET /v1/ai/upstreams` shows: config (never the credential) and state.
    pub fn upstreams_view(&self) -> Vec<UpstreamView> {
        let g = self.current();
        let fabric = self.fabric.get();
        let now = Instant::now();
        g.config
            .upstreams
            .iter()
            .zip(&g.upstreams)
            .map(|(cfg, u)| {
                let h = lock(&u.health);
                UpstreamView {
                    name: cfg.name.clone(),
                    site: cfg.site.clone(),
                    region: cfg.region.clone(),
                    base_url: cfg.base_url.to_string(),
                    public: cfg.public,
                    models: cfg.models.clone(),
                    circuit: match h.circuit() {
                        select::Circuit::Closed => "closed",
                        select::Circuit::Open { .. } => "open",
                        select::Circuit::HalfOpen { .. } => "half-open",
                    },
                    up: h.is_up(),
                    fabric_rtt_ms: fabric
                        .site_rtt
                        .get(&cfg.site)
                        .map(|d| d.as_secs_f64() * 1000.0),
                    ttfb_ms: h.ttfb(now).map(|d| d.as_secs_f64() * 1000.0),
                }
            })
            .collect()
    }

    /// `skymesh_ai_*` series.
    pub fn render_metrics(&self) -> String {
        let g = self.current();
        let states: Vec<(String, bool, bool)> = g
            .config
            .upstreams
            .iter()
            .zip(&g.upstreams)
            .map(|(cfg, u)| {
                let h = lock(&u.health);
                (cfg.name.clone(), h.is_up(), h.is_open())
            })
            .collect();
        let gauges: Vec<UpstreamGauge<'_>> = states
            .iter()
            .map(|(name, up, open)| UpstreamGauge {
                name,
                up: *up,
                circuit_open: *open,
            })
            .collect();
        self.metrics.render(&gauges, &self.load.snapshot())
    }
}

impl Generation {
    fn build(
        config: GatewayConfig,
        fabric: &Arc<FabricView>,
        old: Option<&Generation>,
        shards: usize,
    ) -> Result<Self> {
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            let health = old
                .and_then(|o| {
                    o.config
                        .upstreams
                        .iter()
                        .position(|x| x.name == u.name)
                        .map(|i| o.upstreams[i].health.clone())
                })
                .unwrap_or_default();
            upstreams.push(Upstream {
                pools: upstream::pools(u, fabric.clone(), shards)?,
                health,
                name_header: HeaderValue::from_str(&u.name).ok(),
                region_header: HeaderValue::from_str(&u.region).ok(),
            });
        }
        let now = Instant::now();
        let mut keys = HashMap::new();
        let mut limits = Vec::new();
        for (i, k) in config.keys.iter().enumerate() {
            keys.insert(k.sha256, i);
            let carried = old.and_then(|o| {
                o.config
                    .keys
                    .iter()
                    .position(|x| x.name == k.name)
                    .map(|j| o.limits[j].clone())
            });
            limits
                .push(carried.unwrap_or_else(|| Arc::new(Mutex::new(RateLimit::new(k.rpm, now)))));
        }
        let series = (0..config.routes.len() * config.upstreams.len())
            .map(|_| OnceLock::new())
            .collect();
        Ok(Self {
            config,
            upstreams,
            keys,
            limits,
            series,
        })
    }

    /// The metric handles of a (route, upstream) pair.
    fn series(&self, metrics: &AiMetrics, route: usize, u: usize) -> &PairSeries {
        self.series[route * self.upstreams.len() + u].get_or_init(|| {
            metrics.pair(
                &self.config.routes[route].name,
                &self.config.upstreams[u].name,
            )
        })
    }
}

/// An error answer in the OpenAI shape, which every OpenAI client parses.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<GwBody> {
    let body =
        json!({"error": {"message": message.into(), "type": error_type(status), "code": code}});
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "upstream_error",
    }
}

fn full(bytes: Bytes) -> GwBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// The client key from `Authorization: Bearer …` or `api-key:`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        return v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim);
    }
    headers
        .get("api-key")
        .or_else(|| headers.get("x-api-key"))
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The model a request names, read as the upstream will read it, or why the
/// request is refused.
///
/// Upstreams read a model from the JSON body, from the path (Azure's
/// `deployments/{m}`, Vertex's `models/{m}:…`, see [`request::path_models`])
/// or from the query (`?model=`). Every place is read; places that disagree
/// are refused. Where the decision depends on the model (a route under this
/// path lists models, or one of its upstreams serves only some), the body
/// must be JSON declared as such (or undeclared), uncompressed and in UTF-8,
/// and a request that may carry data must name a model. Where any route
/// restricts a model's regions, form bodies are refused, since the gateway
/// does not read models from forms. Elsewhere a body that is not JSON is
/// relayed as it is (pass-through APIs).
fn request_model(
    cfg: &GatewayConfig,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Option<String>, String> {
    let decides = cfg.routes.iter().filter(|r| r.covers(path)).any(|r| {
        !r.models.is_empty()
            || r.upstreams
                .iter()
                .any(|&u| !cfg.upstreams[u].models.is_empty())
    });
    let ruled = decides || !cfg.model_regions.is_empty();
    for h in [header::CONTENT_TYPE, header::CONTENT_ENCODING] {
        if headers.get_all(&h).iter().nth(1).is_some() {
            return Err(format!("two {h} headers: send one"));
        }
    }
    let content_type = match headers.get(header::CONTENT_TYPE).map(|v| v.to_str()) {
        None => None,
        Some(Ok(t)) => Some(t.to_ascii_lowercase()),
        Some(Err(_)) => return Err("Content-Type is not text".into()),
    };
    let mut parts = content_type.as_deref().unwrap_or_default().split(';');
    let media = parts.next().unwrap_or_default().trim();
    let charset = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k.trim() == "charset").then(|| v.trim().trim_matches('"').to_string())
    });
    let declared_json = media == "application/json"
        || (media.starts_with("application/") && media.ends_with("+json"));
    let form = media == "application/x-www-form-urlencoded" || media == "multipart/form-data";
    if !body.is_empty() {
        if ruled && form {
            return Err(format!(
                "Content-Type {media}: the gateway reads models from JSON bodies only, and models here have routing or residency rules; send application/json"
            ));
        }
        if decides && content_type.is_some() && !declared_json {
            return Err(format!(
                "Content-Type {media:?}: routes under {path} choose by model, which the gateway reads from JSON bodies; send Content-Type: application/json"
            ));
        }
    }
    let expect_json = (decides || declared_json) && !body.is_empty();
    if expect_json {
        if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
            if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
                return Err(format!(
                    "Content-Encoding {:?}: the gateway reads the model from the body and takes it uncompressed; send it without Content-Encoding",
                    String::from_utf8_lossy(enc.as_bytes())
                ));
            }
        }
        if let Some(charset) = charset.filter(|c| c != "utf-8" && c != "utf8") {
            return Err(format!(
                "Content-Type charset {charset:?}: JSON bodies are read as UTF-8; send UTF-8 and say charset=utf-8 or nothing"
            ));
        }
    }
    let body_model = match request::read_model(body) {
        Ok(m) => m,
        Err(request::BodyError::NotJson(_)) if !expect_json => None,
        Err(e) => return Err(e.to_string()),
    };
    let mut named: Vec<(&str, String)> = Vec::new();
    named.extend(body_model.map(|m| ("the body", m)));
    named.extend(
        request::path_models(path)
            .into_iter()
            .map(|m| ("the path", m.to_string())),
    );
    named.extend(
        query
            .into_iter()
            .flat_map(request::query_models)
            .map(|m| ("the query", m)),
    );
    if let Some((place, m)) = named.iter().find(|(_, m)| m.chars().any(char::is_control)) {
        return Err(format!(
            "{place} names the model {m:?}, with a control character; send the plain name"
        ));
    }
    if let Some(((p1, m1), (p2, m2))) = named
        .iter()
        .zip(named.iter().skip(1))
        .find(|((_, a), (_, b))| !super::config::same_model(a, b))
    {
        return Err(format!(
            "{p1} names the model {m1:?} and {p2} names {m2:?}; name one model, once"
        ));
    }
    let model = named.into_iter().next().map(|(_, m)| m);
    let may_carry_data = !body.is_empty()
        || !matches!(
            *method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
        );
    if decides && model.is_none() && may_carry_data {
        return Err(format!(
            "the request names no model, and routes under {path} choose by model; add \"model\": \"<name>\" to the JSON body"
        ));
    }
    Ok(model)
}

/// Why a request body was not read.
enum BodyRead {
    TooLarge,
    /// The gateway holds `max_buffered_bytes` of bodies already.
    OverBudget,
    Failed(String),
}

/// Request body bytes held by one request, counted in the gateway's total
/// until it drops.
struct Held<'a> {
    total: &'a AtomicUsize,
    bytes: usize,
}

impl Held<'_> {
    fn grow(&mut self, add: usize, limit: usize) -> bool {
        let before = self.total.fetch_add(add, Ordering::Relaxed);
        if before + add > limit {
            self.total.fetch_sub(add, Ordering::Relaxed);
            return false;
        }
        self.bytes += add;
        true
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Reads a whole request body (kept for replay on failover), at most `max`
/// bytes, within the gateway's budget for all bodies held at once.
async fn read_body<'a>(
    mut body: Incoming,
    max: usize,
    total: &'a AtomicUsize,
    limit: usize,
) -> Result<(Bytes, Held<'a>), BodyRead> {
    if body.size_hint().lower() > max as u64 {
        return Err(BodyRead::TooLarge);
    }
    let mut held = Held { total, bytes: 0 };
    let mut first: Option<Bytes> = None;
    let mut more: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyRead::Failed(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if held.bytes + data.len() > max {
            return Err(BodyRead::TooLarge);
        }
        if !held.grow(data.len(), limit) {
            return Err(BodyRead::OverBudget);
        }
        match (&mut first, &mut more) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut m = bytes::BytesMut::with_capacity(f.len() + data.len());
                m.extend_from_slice(f);
                m.extend_from_slice(&data);
                more = Some(m);
            }
            (Some(_), Some(m)) => m.extend_from_slice(&data),
        }
    }
    let bytes = match more {
        Some(m) => m.freeze(),
        None => first.unwrap_or_default(),
    };
    Ok((bytes, held))
}

/// `x-skymesh-residency: cn-shanghai, eastasia` → the set of regions.
fn residency(headers: &HeaderMap) -> Result<Option<BTreeSet<String>>, String> {
    let Some(v) = headers.get(RESIDENCY_HEADER) else {
        return Ok(None);
    };
    let text = v
        .to_str()
        .map_err(|_| format!("{RESIDENCY_HEADER}: not text"))?;
    let mut set = BTreeSet::new();
    for r in text.split(',').map(str::trim) {
        let ok = !r.is_empty()
            && r.len() <= 64
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(format!(
                "{RESIDENCY_HEADER}: {r:?} is not a region; send a comma-separated list such as \"cn-shanghai,eastasia\""
            ));
        }
        set.insert(r.to_string());
    }
    Ok(Some(set))
}

/// Headers a proxy must not forward (RFC 9110 §7.6.1), and the client's own
/// credentials and gateway controls, which stay here.
fn strip_request_headers(headers: &mut HeaderMap) {
    // Found by one pass over the (few) names present rather than a lookup of
    // every name that must go.
    let mut doomed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    doomed.extend(
        headers
            .keys()
            .filter(|n| NOT_FORWARDED.contains(n))
            .cloned(),
    );
    for n in doomed {
        headers.remove(n);
    }
}

const NOT_FORWARDED: [HeaderName; 14] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::HOST,
    header::CONTENT_LENGTH,
    header::AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static(RESIDENCY_HEADER),
];

/// The upstream's framing goes too: the answer's length is what its body
/// holds, set by hyper from the relayed body's exact size (a `Content-Length`
/// beside `Transfer-Encoding`, or on a 204/304, would misframe the answer).
fn strip_response_headers(headers: &mut HeaderMap) {
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
        header::UPGRADE,
        header::TRAILER,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
}

/// Everything one request's audit line and metrics need besides its
/// generation: indexes into it, not copies of its names.
struct Ledger {
    key: usize,
    route: usize,
    model: Option<String>,
    status: u16,
    attempts: usize,
    started: Instant,
    ttfb: Duration,
    duration: Histogram,
}

impl Ledger {
    /// Writes the audit line and the duration once the answer is over.
    fn finish(&self, g: &Generation, u: usize, outcome: &str, detail: Option<&str>) {
        let elapsed = self.started.elapsed();
        self.duration.observe(elapsed.as_secs_f64());
        let up = &g.config.upstreams[u];
        tracing::info!(
            target: "skymesh_ai_audit",
            key = %g.config.keys[self.key].name,
            route = %g.config.routes[self.route].name,
            model = %self.model.as_deref().unwrap_or_default(),
            upstream = %up.name,
            site = %up.site,
            region = %up.region,
            status = self.status,
            attempts = self.attempts,
            ttfb_ms = self.ttfb.as_millis() as u64,
            duration_ms = elapsed.as_millis() as u64,
            outcome,
            detail = detail.unwrap_or(""),
            "ai request"
        );
    }
}

/// The upstream's body on its way to the client: unbuffered, with an idle
/// timeout, and an explicit error at the end if the upstream breaks off.
struct Relay<B = Incoming> {
    inner: B,
    /// The generation the request started with, and the upstream answering.
    generation: Arc<Generation>,
    upstream: usize,
    idle: Duration,
    /// When the upstream last sent something (or its response head came).
    last_data: tokio::time::Instant,
    /// Armed the first time the upstream makes the client wait, and moved only
    /// when it fires early (data came since it was armed): a frame costs a
    /// clock read, not a timer-wheel update.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// An SSE stream ends with an `event: error` the client's SDK raises on.
    sse: bool,
    state: RelayState,
    ledger: Option<Ledger>,
    /// The upstream connection, back to its pool once the answer is read to
    /// its end; closed with the relay otherwise.
    lease: Option<Lease>,
}

enum RelayState {
    Streaming,
    /// The error event is on its way; once it has had time to leave, the
    /// stream ends in error, not cleanly (an aborted body makes the server drop
    /// what it has not written yet).
    Failing(String, Pin<Box<tokio::time::Sleep>>),
    Done,
}

/// How long the error event gets to reach the client before the abort.
const ERROR_EVENT_FLUSH: Duration = Duration::from_millis(100);

impl<B> Relay<B> {
    fn fail(&mut self, reason: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let g = &*self.generation;
        let u = self.upstream;
        if let Some(l) = self.ledger.take() {
            tracing::warn!(
                upstream = %g.config.upstreams[u].name,
                route = %g.config.routes[l.route].name,
                reason = %reason,
                "upstream failed mid-answer"
            );
            l.finish(g, u, "upstream_broke_off", Some(&reason));
        }
        // Count it against the upstream, but the answer is already committed.
        lock(&g.upstreams[u].health).on_failure(Instant::now(), &g.config.breaker);
        if self.sse {
            let event = json!({"error": {
                "message": format!("the upstream failed mid-stream: {reason}"),
                "type": "upstream_error",
                "code": "upstream_stream_broken",
            }});
            self.state =
                RelayState::Failing(reason, Box::pin(tokio::time::sleep(ERROR_EVENT_FLUSH)));
            let frame = format!("event: error\ndata: {event}\n\n");
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(frame)))))
        } else {
            self.state = RelayState::Done;
            Poll::Ready(Some(Err(reason.into())))
        }
    }

    fn complete(&mut self) {
        self.state = RelayState::Done;
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
        if let Some(l) = self.ledger.take() {
            l.finish(&self.generation, self.upstream, "complete", None);
        }
    }

    /// Whether the upstream has now been silent for `idle`; otherwise the
    /// timer is armed to wake the task when it will have been.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last_data + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if timer.deadline() >= deadline {
                return true;
            }
            // Data came after it was armed: wait for the rest of the period.
            timer.as_mut().reset(deadline);
        }
    }
}

impl<B> Body for Relay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.state {
            RelayState::Done => return Poll::Ready(None),
            RelayState::Failing(reason, flush) => {
                if flush.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let reason = std::mem::take(reason);
                this.state = RelayState::Done;
                return Poll::Ready(Some(Err(reason.into())));
            }
            RelayState::Streaming => {}
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_data = tokio::time::Instant::now();
                // A body of known length is over with its last byte: the
                // server stops polling then, so this is where it completes.
                if this.inner.is_end_stream() {
                    this.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let reason = format!("{}: {}", e, upstream::describe(&e));
                this.fail(reason)
            }
            Poll::Ready(None) => {
                this.complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle_expired(cx) {
                    let reason = format!("no data from the upstream for {:?}", this.idle);
                    this.fail(reason)
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, RelayState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Relay<B> {
    fn drop(&mut self) {
        if let Some(l) = self.ledger.take() {
            l.finish(&self.generation, self.upstream, "client_gone", None);
        }
    }
}

/// Serves one client request. Never fails: every problem is an HTTP answer.
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<GwBody> {
    let started = Instant::now();
    let g = gw.current();
    let m = &gw.metrics;
    let refuse = |route: &str, status: StatusCode, code: &str, msg: String, key: &str| {
        m.request(route, "none", status.as_u16());
        tracing::info!(
            target: "skymesh_ai_audit",
            key,
            route,
            upstream = "none",
            status = status.as_u16(),
            outcome = "refused",
            detail = %msg,
            "ai request"
        );
        error(status, code, msg)
    };
    let (mut parts, body) = req.into_parts();

    // Who is asking.
    let Some(presented) = presented_key(&parts.headers) else {
        return refuse(
            "none",
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "no API key: send `Authorization: Bearer <key>`".into(),
            "none",
        );
    };
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let Some(&ki) = g.keys.get(&digest) else {
        return refuse(
            "none",
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "the API key is not valid for this gateway".into(),
            "unknown",
        );
    };
    let key: &KeyConfig = &g.config.keys[ki];
    if let Err(wait) = lock(&g.limits[ki]).take(key.rpm, started) {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = refuse(
            "none",
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            format!(
                "key {} is over its limit of {} requests per minute; retry in {secs} s",
                key.name, key.rpm
            ),
            &key.name,
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }

    // What is asked: the path as the upstream will read it, decoded once.
    let path = match request::normalize_path(parts.uri.path()) {
        Ok(p) => p,
        Err(e) => {
            return refuse(
                "none",
                StatusCode::BAD_REQUEST,
                "invalid_path",
                e.to_string(),
                &key.name,
            )
        }
    };
    let path = path.as_str();
    if let Err(e) = parts.uri.query().map_or(Ok(()), request::check_query) {
        return refuse(
            "none",
            StatusCode::BAD_REQUEST,
            "invalid_path",
            e.to_string(),
            &key.name,
        );
    }
    if parts.method == Method::CONNECT {
        return refuse(
            "none",
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "CONNECT is not supported: this is not an open proxy".into(),
            &key.name,
        );
    }
    if path == "/v1/models" && parts.method == Method::GET {
        m.request("models", "none", 200);
        return models(&g, key);
    }
    let regions = match residency(&parts.headers) {
        Ok(r) => r,
        Err(msg) => {
            return refuse(
                "none",
                StatusCode::BAD_REQUEST,
                "invalid_residency",
                msg,
                &key.name,
            )
        }
    };
    let read = read_body(
        body,
        g.config.max_body_bytes,
        &gw.buffered,
        g.config.max_buffered_bytes,
    );
    let Ok(read) = tokio::time::timeout(g.config.client_body_timeout, read).await else {
        return refuse(
            "none",
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {:?} ([ai_gateway] client_body_timeout)",
                g.config.client_body_timeout
            ),
            &key.name,
        );
    };
    let (body, _held) = match read {
        Ok(b) => b,
        Err(BodyRead::TooLarge) => {
            return refuse(
                "none",
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!(
                    "the request body is over the gateway's limit of {} bytes ([ai_gateway] max_body_bytes)",
                    g.config.max_body_bytes
                ),
                &key.name,
            )
        }
        Err(BodyRead::OverBudget) => {
            let mut resp = refuse(
                "none",
                StatusCode::SERVICE_UNAVAILABLE,
                "gateway_busy",
                format!(
                    "the gateway holds {} bytes of request bodies already ([ai_gateway] max_buffered_bytes); retry in a second",
                    g.config.max_buffered_bytes
                ),
                &key.name,
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1));
            return resp;
        }
        Err(BodyRead::Failed(e)) => {
            return refuse(
                "none",
                StatusCode::BAD_REQUEST,
                "body_read_failed",
                format!("reading the request body: {e}"),
                &key.name,
            )
        }
    };
    let model = match request_model(
        &g.config,
        &parts.method,
        path,
        parts.uri.query(),
        &parts.headers,
        &body,
    ) {
        Ok(m) => m,
        Err(msg) => {
            return refuse(
                "none",
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                msg,
                &key.name,
            )
        }
    };
    // A model some route holds to regions is held to them on every route.
    let regions = match (
        regions,
        model
            .as_deref()
            .and_then(|m| g.config.model_regions.get(&super::config::model_key(m))),
    ) {
        (Some(asked), Some(rule)) => Some(asked.intersection(rule).cloned().collect()),
        (None, Some(rule)) => Some(rule.clone()),
        (asked, None) => asked,
    };
    let Some(ri) = g
        .config
        .routes
        .iter()
        .position(|r| r.matches(path, model.as_deref()))
    else {
        return refuse(
            "none",
            StatusCode::NOT_FOUND,
            "no_route",
            format!(
                "no route serves {path}{}",
                model
                    .as_deref()
                    .map(|m| format!(" for model {m:?}"))
                    .unwrap_or_default()
            ),
            &key.name,
        );
    };
    let route = &g.config.routes[ri];
    if !key.allows(&route.name) {
        return refuse(
            &route.name,
            StatusCode::FORBIDDEN,
            "route_not_allowed",
            format!("key {} may not use route {}", key.name, route.name),
            &key.name,
        );
    }

    // Where it may go.
    let health: Vec<Health> = g
        .upstreams
        .iter()
        .map(|u| lock(&u.health).clone())
        .collect();
    let fabric = gw.fabric.get();
    let rtt = |u: usize| fabric.site_rtt.get(&g.config.upstreams[u].site).copied();
    let choice = select::choose(
        &g.config,
        &health,
        &select::Request {
            route,
            model: model.as_deref(),
            residency: regions.as_ref(),
            fabric_rtt: &rtt,
            draw: rand::random::<f64>(),
            now: Instant::now(),
        },
    );
    let order = match choice {
        Choice::Try(order) => order,
        Choice::Refuse {
            residency,
            excluded,
        } => {
            let reasons = describe_exclusions(&g.config, &excluded);
            let (status, code, what) = if residency {
                (
                    StatusCode::FORBIDDEN,
                    "residency_unavailable",
                    "no upstream is both allowed by the residency rules and healthy",
                )
            } else if excluded.iter().all(|(_, e)| *e == Excluded::Model) {
                (
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    "no upstream of the route serves this model",
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_healthy_upstream",
                    "no upstream of the route is healthy",
                )
            };
            return refuse(
                &route.name,
                status,
                code,
                format!(
                    "route {}: {what} ({reasons}); the request was not sent anywhere",
                    route.name
                ),
                &key.name,
            );
        }
    };

    // Try them in order. The client's headers are stripped once; each attempt
    // but the last sends a copy.
    strip_request_headers(&mut parts.headers);
    let tries = &order[..order.len().min(g.config.max_attempts)];
    let mut headers = Some(parts.headers);
    let mut failures: Vec<String> = Vec::new();
    let mut last_answer: Option<(usize, Response<Incoming>, Option<Lease>)> = None;
    let mut attempts = 0;
    let mut timed_out = false;
    for (i, &u) in tries.iter().enumerate() {
        let up = &g.config.upstreams[u];
        let sent = Instant::now();
        if !lock(&g.upstreams[u].health).acquire(sent, &g.config.breaker) {
            continue;
        }
        if attempts > 0 {
            m.failover(&route.name);
        }
        attempts += 1;
        let attempt_headers = if i + 1 == tries.len() {
            headers.take().unwrap_or_default()
        } else {
            headers.clone().unwrap_or_default()
        };
        let upstream_req = match build_request(
            &parts.method,
            path,
            parts.uri.query(),
            attempt_headers,
            route,
            up,
            body.clone(),
        ) {
            Ok(r) => r,
            Err(msg) => {
                failures.push(format!("{}: {msg}", up.name));
                continue;
            }
        };
        let result = tokio::time::timeout(
            up.first_byte_timeout,
            g.upstreams[u].pool().send(upstream_req),
        )
        .await;
        let failure = match result {
            Ok(Ok((resp, _))) if resp.status().is_informational() => {
                // A 101 (or any 1xx as a final answer) would switch the
                // client's connection to a protocol the gateway does not
                // relay: an empty reply at best. It is the upstream's fault.
                last_answer = None;
                format!(
                    "{} answered {} as its final status; the gateway relays HTTP answers only, not protocol switches",
                    up.name,
                    resp.status()
                )
            }
            Ok(Ok((resp, lease))) => {
                let status = resp.status();
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    let why = format!("{} answered {}", up.name, status.as_u16());
                    last_answer = Some((u, resp, lease));
                    why
                } else {
                    // The upstream's own part of the wait: the path's round
                    // trip is counted apart, from the fabric's current RTT.
                    let own = sent.elapsed().saturating_sub(rtt(u).unwrap_or_default());
                    lock(&g.upstreams[u].health).on_success(Instant::now(), own);
                    return relay(&gw, &g, ki, ri, model, u, resp, lease, started, attempts);
                }
            }
            Ok(Err(e)) => {
                last_answer = None;
                format!("{}: {}", up.name, upstream::describe(&*e))
            }
            Err(_) => {
                last_answer = None;
                timed_out = true;
                format!(
                    "{}: no response head within {:?} (first_byte_timeout)",
                    up.name, up.first_byte_timeout
                )
            }
        };
        if lock(&g.upstreams[u].health).on_failure(Instant::now(), &g.config.breaker) {
            tracing::warn!(upstream = %up.name, reason = %failure, "circuit opened");
        }
        tracing::debug!(upstream = %up.name, route = %route.name, reason = %failure, "attempt failed");
        failures.push(failure);
    }
    // Every attempt failed. The last upstream's own error answer (a 5xx or a
    // 429 with its Retry-After) is more useful to the client than ours.
    if let Some((u, resp, lease)) = last_answer {
        return relay(&gw, &g, ki, ri, model, u, resp, lease, started, attempts);
    }
    let status = if timed_out {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    refuse(
        &route.name,
        status,
        "upstreams_failed",
        format!(
            "route {}: every upstream failed: {}",
            route.name,
            if failures.is_empty() {
                "none could take the request".to_string()
            } else {
                failures.join("; ")
            }
        ),
        &key.name,
    )
}

fn describe_exclusions(cfg: &GatewayConfig, excluded: &[(usize, Excluded)]) -> String {
    excluded
        .iter()
        .map(|(u, why)| {
            let up = &cfg.upstreams[*u];
            let why = match why {
                Excluded::Region { allowed } => format!(
                    "region {} is not allowed ({})",
                    up.region,
                    allowed.iter().cloned().collect::<Vec<_>>().join(",")
                ),
                Excluded::Model => "does not serve the model".to_string(),
                Excluded::CircuitOpen => format!("circuit open (region {})", up.region),
            };
            format!("{}: {why}", up.name)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The upstream request: the configured base URL, the client's normalised
/// path after the route's prefix and its query; the client's headers (already stripped of its
/// credentials and hop-by-hop headers); the upstream's credential.
fn build_request(
    method: &Method,
    client_path: &str,
    query: Option<&str>,
    mut headers: HeaderMap,
    route: &RouteConfig,
    up: &super::config::UpstreamConfig,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, String> {
    let base = &up.base_url;
    let prefix = base.path().trim_end_matches('/');
    let suffix = route.suffix(client_path);
    let mut path =
        String::with_capacity(prefix.len() + suffix.len() + query.map_or(0, |q| q.len() + 1) + 1);
    path.push_str(prefix);
    path.push_str(suffix);
    if path.is_empty() {
        path.push('/');
    }
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    // Origin form: the pool sends `Host` with HTTP/1.1 and puts the scheme
    // and authority back for HTTP/2.
    let uri = Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|e| format!("building the upstream URL: {e}"))?;
    if let Some((name, secret)) = &up.credential {
        headers.insert(name.clone(), secret.header_value().clone());
    }
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

const UPSTREAM_HEADER: HeaderName = HeaderName::from_static("x-skymesh-upstream");
const REGION_HEADER: HeaderName = HeaderName::from_static("x-skymesh-region");

#[allow(clippy::too_many_arguments)]
fn relay(
    gw: &Gateway,
    g: &Arc<Generation>,
    key: usize,
    route: usize,
    model: Option<String>,
    u: usize,
    resp: Response<Incoming>,
    lease: Option<Lease>,
    started: Instant,
    attempts: usize,
) -> Response<GwBody> {
    let up = &g.config.upstreams[u];
    let ttfb = started.elapsed();
    let status = resp.status();
    let series = g.series(&gw.metrics, route, u);
    series.request(status.as_u16());
    series.ttfb(ttfb.as_secs_f64());
    let (mut parts, inner) = resp.into_parts();
    strip_response_headers(&mut parts.headers);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let tags = &g.upstreams[u];
    for (name, value) in [
        (UPSTREAM_HEADER, &tags.name_header),
        (REGION_HEADER, &tags.region_header),
    ] {
        if let Some(v) = value {
            parts.headers.insert(name, v.clone());
        }
    }
    let ledger = Ledger {
        key,
        route,
        model,
        status: status.as_u16(),
        attempts,
        started,
        ttfb,
        duration: series.duration().clone(),
    };
    let body = Relay {
        inner,
        generation: g.clone(),
        upstream: u,
        idle: up.idle_timeout,
        last_data: tokio::time::Instant::now(),
        timer: None,
        sse,
        state: RelayState::Streaming,
        ledger: Some(ledger),
        lease,
    };
    Response::from_parts(parts, body.boxed())
}

/// `GET /v1/models`: the models of the upstreams this key can reach.
fn models(g: &Generation, key: &KeyConfig) -> Response<GwBody> {
    let mut seen = BTreeSet::new();
    for r in g.config.routes.iter().filter(|r| key.allows(&r.name)) {
        if !r.models.is_empty() {
            seen.extend(r.models.iter().cloned());
            continue;
        }
        for &u in &r.upstreams {
            seen.extend(g.config.upstreams[u].models.iter().cloned());
        }
    }
    let data: Vec<_> = seen
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "skymesh"}))
        .collect();
    let mut resp = Response::new(full(Bytes::from(
        json!({"object": "list", "data": data}).to_string(),
    )));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Serves one client connection (HTTP/1.1 or h2) until it closes; run by a
/// [`shard`] on its thread, under the listener's guards (each request is in
/// flight from its head to the end of its answer).
pub async fn serve_connection(
    stream: crate::listen::Watched<tokio::net::TcpStream>,
    conn: Arc<crate::listen::Conn>,
    gw: Arc<Gateway>,
) {
    let _ = stream.get_ref().set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let gw = gw.clone();
        let in_flight = conn.begin();
        async move {
            let resp = handle(gw, req).await;
            Ok::<_, std::convert::Infallible>(
                resp.map(|body| crate::listen::Tracked::new(body, in_flight).boxed()),
            )
        }
    });
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(crate::listen::Limits::H2_STREAMS);
    if let Err(e) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "AI gateway connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_requests_take_the_base_path_in_origin_form() {
        let cfg = one_upstream(Duration::from_secs(1));
        let mut up = cfg.upstreams[0].clone();
        up.base_url = "https://api.example.test:8443/openai/v1"
            .parse()
            .expect("url");
        let req = build_request(
            &Method::POST,
            "/v1/chat/completions",
            Some("x=1"),
            HeaderMap::new(),
            &cfg.routes[0],
            &up,
            Bytes::new(),
        )
        .expect("request");
        assert_eq!(req.uri().to_string(), "/openai/v1/chat/completions?x=1");
        assert!(req.uri().scheme().is_none() && req.uri().authority().is_none());
    }

    #[test]
    fn residency_header_parses_and_rejects_garbage() {
        let mut h = HeaderMap::new();
        assert_eq!(residency(&h), Ok(None));
        h.insert(
            RESIDENCY_HEADER,
            HeaderValue::from_static("cn-shanghai, eastasia"),
        );
        assert_eq!(
            residency(&h)
                .expect("ok")
                .expect("some")
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["cn-shanghai".to_string(), "eastasia".to_string()]
        );
        h.insert(RESIDENCY_HEADER, HeaderValue::from_static("eu;drop"));
        let err = residency(&h).expect_err("bad");
        assert!(
            err.contains("\"eu;drop\"") && err.contains(RESIDENCY_HEADER),
            "{err}"
        );
    }

    #[test]
    fn client_credentials_and_hop_headers_stay_here() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("authorization", "Bearer client-key"),
            ("api-key", "client-key"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("host", "169.254.169.254"),
            (RESIDENCY_HEADER, "eastasia"),
            ("content-type", "application/json"),
            ("openai-beta", "assistants=v2"),
            ("x-api-key", "k1"),
            ("x-api-key", "k2"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("content-length", "12"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        strip_request_headers(&mut h);
        let left: BTreeSet<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, BTreeSet::from(["content-type", "openai-beta"]));
    }

    /// A gateway config with one upstream, for driving a [`Relay`].
    fn one_upstream(idle: Duration) -> GatewayConfig {
        use super::super::config::{BreakerConfig, Kind, Strategy, UpstreamConfig};
        GatewayConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            node: None,
            max_body_bytes: 1 << 20,
            max_attempts: 3,
            clients: crate::listen::Limits::API,
            client_body_timeout: Duration::from_secs(60),
            max_buffered_bytes: 1 << 30,
            model_regions: Default::default(),
            breaker: BreakerConfig {
                failures: 3,
                open_for: Duration::from_secs(10),
            },
            upstreams: vec![UpstreamConfig {
                name: "az".into(),
                kind: Kind::OpenAi,
                site: "az".into(),
                region: "eastasia".into(),
                base_url: "http://10.0.0.1/v1".parse().expect("uri"),
                public: false,
                credential: None,
                models: vec![],
                connect_timeout: Duration::from_secs(1),
                first_byte_timeout: Duration::from_secs(1),
                idle_timeout: idle,
                ca_file: None,
            }],
            routes: vec![RouteConfig {
                name: "chat".into(),
                path_prefix: "/v1".into(),
                models: vec![],
                strategy: Strategy::Priority,
                upstreams: vec![0],
                weights: vec![],
                allowed_regions: None,
            }],
            keys: vec![],
        }
    }

    /// An upstream body fed by the test: each message is a data frame; the
    /// end of the channel is the end of the body.
    struct Fed(tokio::sync::mpsc::Receiver<&'static str>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|m| m.map(|s| Ok(Frame::data(Bytes::from_static(s.as_bytes())))))
        }
    }

    /// A relay of `inner` with a ledger whose duration histogram is returned.
    fn relay_over<B>(inner: B, idle: Duration, sse: bool) -> (Relay<B>, Histogram) {
        let generation = Generation::build(
            one_upstream(idle),
            &Arc::new(FabricView::default()),
            None,
            1,
        )
        .expect("generation");
        let duration = Histogram::new([1.0]);
        let relay = Relay {
            inner,
            generation: Arc::new(generation),
            upstream: 0,
            idle,
            last_data: tokio::time::Instant::now(),
            timer: None,
            sse,
            state: RelayState::Streaming,
            ledger: Some(Ledger {
                key: 0,
                route: 0,
                model: None,
                status: 200,
                attempts: 1,
                started: Instant::now(),
                ttfb: Duration::ZERO,
                duration: duration.clone(),
            }),
            lease: None,
        };
        (relay, duration)
    }

    fn relay_of(
        rx: tokio::sync::mpsc::Receiver<&'static str>,
        idle: Duration,
        sse: bool,
    ) -> Relay<Fed> {
        relay_over(Fed(rx), idle, sse).0
    }

    /// How many requests a duration histogram has seen.
    fn observed(h: &Histogram) -> u64 {
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("d", "d", h.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text.lines()
            .find_map(|l| l.strip_prefix("d_count "))
            .and_then(|n| n.trim().parse().ok())
            .expect("d_count")
    }

    #[tokio::test]
    async fn a_body_of_known_length_completes_with_its_last_byte() {
        // The server stops polling a body once its length is written, so the
        // answer must be complete (audit line, duration) by then.
        let (mut relay, duration) = relay_over(
            Full::new(Bytes::from_static(b"{}")),
            Duration::from_secs(5),
            false,
        );
        assert!(relay.ledger.is_some());
        relay.frame().await.expect("frame").expect("data");
        assert!(relay.is_end_stream());
        assert!(
            relay.ledger.is_none(),
            "finished as complete, not client_gone"
        );
        assert_eq!(observed(&duration), 1);
        drop(relay);
        assert_eq!(observed(&duration), 1, "finished once");
    }

    // Real time, short periods: the controller's tokio has no `test-util`
    // (paused time). The bounds leave a scheduling margin.
    #[tokio::test]
    async fn the_idle_timeout_counts_from_the_last_frame() {
        let ms = Duration::from_millis;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut relay = relay_of(rx, ms(400), false);
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(ms(250)).await;
                tx.send("chunk").await.expect("send");
            }
            tokio::time::sleep(ms(5000)).await;
        });
        for _ in 0..3 {
            let frame = relay.frame().await.expect("frame").expect("data");
            assert_eq!(frame.into_data().expect("data"), "chunk");
        }
        let last = start.elapsed();
        assert!(last >= ms(750), "{last:?}");
        // Each gap was under the timeout; the silence after the last frame is not.
        let err = relay.frame().await.expect("end").expect_err("idle");
        let silent = start.elapsed() - last;
        assert!(silent >= ms(400) && silent < ms(700), "{silent:?}");
        assert!(
            err.to_string()
                .contains("no data from the upstream for 400ms"),
            "{err}"
        );
        assert!(relay.frame().await.is_none());
        assert!(!lock(&relay.generation.upstreams[0].health).is_up());
    }

    #[tokio::test]
    async fn an_idle_sse_stream_ends_with_an_error_event_then_an_error() {
        let ms = Duration::from_millis;
        let (_tx, rx) = tokio::sync::mpsc::channel(4);
        let mut relay = relay_of(rx, ms(200), true);
        let start = tokio::time::Instant::now();
        let event = relay.frame().await.expect("event").expect("data");
        assert!(start.elapsed() >= ms(200));
        let text = event.into_data().expect("data");
        assert!(text.starts_with(b"event: error\ndata: "), "{text:?}");
        relay.frame().await.expect("end").expect_err("abort");
        assert!(start.elapsed() >= ms(200) + ERROR_EVENT_FLUSH);
        assert!(relay.is_end_stream());
    }

    #[tokio::test]
    async fn a_complete_body_ends_cleanly() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (relay, duration) = relay_over(Fed(rx), Duration::from_secs(5), false);
        tx.send("all").await.expect("send");
        drop(tx);
        let body = relay.collect().await.expect("body").to_bytes();
        assert_eq!(body, "all");
        assert_eq!(observed(&duration), 1);
    }

    #[test]
    fn keys_come_from_bearer_or_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("api-key", HeaderValue::from_static("k1"));
        assert_eq!(presented_key(&h), Some("k1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k2"));
        assert_eq!(presented_key(&h), Some("k2"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_key(&h), None);
    }
}
