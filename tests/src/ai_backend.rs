//! A sample OpenAI-compatible backend that stands in for cloud AI services (Azure OpenAI,
//! Alibaba DashScope, Vertex, ...) in tests and benchmarks of the controller's AI gateway.
//!
//! It serves HTTP/1.1 and HTTP/2 (h2c or TLS with ALPN) and answers deterministically:
//! `/v1/models`, `/v1/chat/completions` (plain and SSE streaming) and `/v1/embeddings`;
//! every other path gets a JSON echo of what arrived (header *names* only, never values,
//! since they carry credentials). `/_lab/*` injects faults (error status, delay, a
//! connection dropped mid-body) and reports request counts.
//!
//! It owns only its listener and the connections it accepts. It must stay cheap per
//! request (benchmarks drive it at >10k req/s on two cores): no per-request logging, and
//! the fault/stat bookkeeping is one short critical section ([`LabState`]), kept free of
//! IO and clocks so it is unit-tested directly.

use crate::traffic::hex;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

/// Models served when `--models` is not given.
pub const DEFAULT_MODELS: &str = "gpt-4o-mini,text-embedding-3-small";
/// Largest request body read for the JSON routes; larger ones get 413.
const MAX_JSON_BODY: usize = 16 << 20;
/// A TLS client that has not finished its handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight connections may finish after SIGTERM before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Pause before a dropped connection is cut, so the bytes sent before it are flushed
/// (hyper discards its write buffer when a body fails).
const ABORT_FLUSH_PAUSE: Duration = Duration::from_millis(10);
/// Number of floats in every embedding.
pub const EMBEDDING_DIMS: usize = 8;

/// An API key; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key; surrounding whitespace (a trailing newline in a key file) is dropped.
    pub fn new(key: &str) -> Option<Self> {
        let key = key.trim();
        (!key.is_empty()).then(|| Self(key.to_owned()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// What one backend instance is.
#[derive(Debug, Clone)]
pub struct Config {
    /// Shown in `x-backend`, in answers (`[NAME] echo: ...`) and in ids.
    pub name: String,
    /// Model ids accepted by chat and embeddings and listed by `/v1/models`.
    pub models: Vec<String>,
    /// When set, `/v1/*` requests must carry it (`Authorization: Bearer` or `api-key`).
    pub api_key: Option<ApiKey>,
    /// Pause before each content chunk of a streamed answer.
    pub chunk_delay: Duration,
}

// ---------------------------------------------------------------------------------------
// Pure helpers

/// The content deltas of a streamed answer: one per space-separated word, each keeping
/// the space that follows it, so their concatenation is exactly `content`.
pub fn word_deltas(content: &str) -> impl Iterator<Item = &str> {
    content.split_inclusive(' ')
}

/// The lab's token count: whitespace-separated words.
pub fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The deterministic embedding of `input`: the first bytes of its SHA-256, scaled to 0..=1.
pub fn embedding(input: &str) -> [f64; EMBEDDING_DIMS] {
    let digest = Sha256::digest(input.as_bytes());
    std::array::from_fn(|i| f64::from(digest[i]) / 255.0)
}

/// Whether a request carried the backend's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthCheck {
    /// The key matched, or no key is configured.
    Ok,
    /// Neither `Authorization` nor `api-key` was sent.
    Missing,
    /// A credential was sent but it is not the key.
    Wrong,
}

impl AuthCheck {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Missing => "missing",
            Self::Wrong => "wrong",
        }
    }
}

/// Checks `Authorization: Bearer <key>` and `api-key: <key>` (Azure style) against `key`.
pub fn check_auth(key: Option<&ApiKey>, headers: &HeaderMap) -> AuthCheck {
    let Some(key) = key else {
        return AuthCheck::Ok;
    };
    let authorization = headers.get(AUTHORIZATION).map(HeaderValue::as_bytes);
    let api_key = headers.get("api-key").map(HeaderValue::as_bytes);
    if authorization.is_none() && api_key.is_none() {
        return AuthCheck::Missing;
    }
    let bearer = authorization.and_then(|v| {
        let (scheme, token) = (v.get(..7)?, v.get(7..)?);
        scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
    });
    if bearer == Some(key.0.as_bytes()) || api_key == Some(key.0.as_bytes()) {
        AuthCheck::Ok
    } else {
        AuthCheck::Wrong
    }
}

// ---------------------------------------------------------------------------------------
// Lab state: faults and counters (no IO, no clock)

/// The body of `POST /_lab/fault`, as sent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Answer with this error status (400..=599) and an OpenAI error body.
    pub status: Option<u16>,
    /// Sleep this long before sending response headers.
    pub delay_ms: Option<u64>,
    /// Streaming: cut the connection after the role chunk and this many content chunks.
    /// Non-streaming: cut it after half of the body.
    pub drop_after_chunks: Option<u32>,
    /// Overrides `--chunk-delay-ms` for streamed answers.
    pub chunk_delay_ms: Option<u64>,
    /// How many requests get the fault; `None` until it is cleared.
    pub times: Option<u32>,
}

/// A validated fault, applied to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fault {
    pub status: Option<StatusCode>,
    pub delay: Duration,
    pub drop_after_chunks: Option<u32>,
    pub chunk_delay: Option<Duration>,
}

impl FaultSpec {
    /// Validates the spec into a fault and how many requests it lasts.
    pub fn validate(&self) -> Result<(Fault, Option<u32>), String> {
        let status = match self.status {
            None => None,
            Some(code @ 400..=599) => StatusCode::from_u16(code).ok(),
            Some(code) => {
                return Err(format!(
                    "fault field \"status\": {code} is not an error status; use 400..=599, \
                     or omit it to keep normal answers"
                ))
            }
        };
        if self.times == Some(0) {
            return Err(
                "fault field \"times\": 0 would apply to no request; use a count \
                        of at least 1, or null to apply until DELETE /_lab/fault"
                    .to_owned(),
            );
        }
        let fault = Fault {
            status,
            delay: Duration::from_millis(self.delay_ms.unwrap_or(0)),
            drop_after_chunks: self.drop_after_chunks,
            chunk_delay: self.chunk_delay_ms.map(Duration::from_millis),
        };
        Ok((fault, self.times))
    }
}

/// Request counters and the armed fault; one lock per request covers both.
#[derive(Debug, Default)]
pub struct LabState {
    armed: Option<(Fault, Option<u32>)>,
    by_path: BTreeMap<String, u64>,
    requests: u64,
    faults_applied: u64,
    connections: u64,
}

/// The body of `GET /_lab/stats`.
#[derive(Debug, Serialize)]
pub struct Stats<'a> {
    pub name: &'a str,
    pub requests: u64,
    pub by_path: &'a BTreeMap<String, u64>,
    pub faults_applied: u64,
    /// Connections accepted since the start (a client that reuses its
    /// connections keeps this low).
    pub connections: u64,
}

impl LabState {
    /// Replaces any armed fault; `times = None` keeps it until [`LabState::clear`].
    pub fn arm(&mut self, fault: Fault, times: Option<u32>) {
        self.armed = Some((fault, times));
    }

    pub fn clear(&mut self) {
        self.armed = None;
    }

    /// Counts a request to `path` and hands it the armed fault, if any.
    pub fn admit(&mut self, path: &str) -> Option<Fault> {
        self.requests += 1;
        match self.by_path.get_mut(path) {
            Some(n) => *n += 1,
            None => {
                self.by_path.insert(path.to_owned(), 1);
            }
        }
        let (fault, times) = self.armed.as_mut()?;
        let fault = *fault;
        if let Some(left) = times {
            *left -= 1;
            if *left == 0 {
                self.armed = None;
            }
        }
        self.faults_applied += 1;
        Some(fault)
    }

    pub fn stats<'a>(&'a self, name: &'a str) -> Stats<'a> {
        Stats {
            name,
            requests: self.requests,
            by_path: &self.by_path,
            faults_applied: self.faults_applied,
            connections: self.connections,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Wire types (OpenAI API)

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl MessageContent {
    /// The message text; the text parts of a multi-part message, joined by a space.
    fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => {
                let texts: Vec<&str> = parts.iter().filter_map(|p| p.text.as_deref()).collect();
                texts.join(" ")
            }
        }
    }
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: EmbeddingInput,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingItem>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingItem {
    object: &'static str,
    index: usize,
    embedding: [f64; EMBEDDING_DIMS],
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelItem<'a>>,
}

#[derive(Serialize)]
struct ModelItem<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<()>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct Echo<'a> {
    backend: &'a str,
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    header_names: Vec<&'a str>,
    auth: &'static str,
    body_len: u64,
    body_sha256: String,
}

// ---------------------------------------------------------------------------------------
// Response body

/// A response body: whole, or frames released on a schedule that may end in a cut
/// connection (the body fails, so hyper resets the stream instead of ending it cleanly).
pub enum ResBody {
    Full(Option<Bytes>),
    Paced(Paced),
}

/// One step of a [`Paced`] body, sent after its delay.
pub enum Step {
    Data(Bytes),
    Abort,
}

/// Frames sent one by one, each after its own delay.
pub struct Paced {
    steps: std::vec::IntoIter<(Duration, Step)>,
    waiting: Option<Step>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The full length promised to the client (content-length), if known.
    len: Option<u64>,
}

impl Paced {
    pub fn new(steps: Vec<(Duration, Step)>, len: Option<u64>) -> Self {
        Self {
            steps: steps.into_iter(),
            waiting: None,
            sleep: None,
            len,
        }
    }
}

impl ResBody {
    fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }

    fn empty() -> Self {
        Self::Full(None)
    }
}

fn step_frame(step: Step) -> Result<Frame<Bytes>, std::io::Error> {
    match step {
        Step::Data(bytes) => Ok(Frame::data(bytes)),
        Step::Abort => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "lab fault: connection dropped mid-body",
        )),
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let paced = match self.get_mut() {
            Self::Full(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Paced(paced) => paced,
        };
        if let Some(step) = paced.waiting.take() {
            if let Some(sleep) = paced.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    paced.waiting = Some(step);
                    return Poll::Pending;
                }
            }
            return Poll::Ready(Some(step_frame(step)));
        }
        let Some((delay, step)) = paced.steps.next() else {
            return Poll::Ready(None);
        };
        if delay.is_zero() {
            return Poll::Ready(Some(step_frame(step)));
        }
        let deadline = Instant::now() + delay;
        let sleep = match paced.sleep.as_mut() {
            Some(sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => paced
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if sleep.as_mut().poll(cx).is_pending() {
            paced.waiting = Some(step);
            return Poll::Pending;
        }
        Poll::Ready(Some(step_frame(step)))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Self::Paced(Paced { len: Some(len), .. }) => SizeHint::with_exact(*len),
            Self::Paced(_) => SizeHint::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The service

/// One backend: configuration, the lab state, and responses computed once at start.
pub struct Backend {
    config: Config,
    x_backend: HeaderValue,
    models_body: Bytes,
    next_id: AtomicU64,
    lab: Mutex<LabState>,
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<ResBody> {
    let mut resp = Response::new(ResBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// An error in OpenAI's shape: `{"error":{"message","type","param","code"}}`.
fn openai_error(status: StatusCode, message: &str, code: Option<&str>) -> Response<ResBody> {
    let kind = match status.as_u16() {
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind,
            param: None,
            code,
        },
    };
    let mut resp = json(status, to_json(&body));
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn bad_json(err: &serde_json::Error) -> Response<ResBody> {
    let message = format!("We could not parse the JSON body of your request: {err}");
    openai_error(StatusCode::BAD_REQUEST, &message, Some("invalid_json"))
}

/// One SSE event: `data: <json>\n\n`.
fn sse_event(value: &impl Serialize) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"data: ");
    // Writing plain structs into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut buf, value);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

impl Backend {
    /// Fails when `name` cannot be an HTTP header value.
    pub fn new(config: Config) -> Result<Self> {
        let x_backend = HeaderValue::from_str(&config.name).with_context(|| {
            format!(
                "backend name {:?} cannot go into the x-backend header; use printable ASCII",
                config.name
            )
        })?;
        let models = ModelList {
            object: "list",
            data: config
                .models
                .iter()
                .map(|id| ModelItem {
                    id,
                    object: "model",
                    created: 0,
                    owned_by: &config.name,
                })
                .collect(),
        };
        let models_body = Bytes::from(to_json(&models));
        Ok(Self {
            x_backend,
            models_body,
            next_id: AtomicU64::new(1),
            lab: Mutex::new(LabState::default()),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn lab(&self) -> std::sync::MutexGuard<'_, LabState> {
        // A panic while holding the lock leaves consistent counters; keep serving.
        self.lab.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers one request; never fails (errors become OpenAI error responses).
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ResBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut resp = if req.uri().path().starts_with("/_lab/") {
            self.lab_control(req).await
        } else {
            let fault = self.lab().admit(req.uri().path());
            match fault {
                None => self.route(req, None).await,
                Some(fault) => self.route_with_fault(req, fault).await,
            }
        };
        resp.headers_mut()
            .insert("x-backend", self.x_backend.clone());
        resp
    }

    async fn route_with_fault<B>(&self, req: Request<B>, fault: Fault) -> Response<ResBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if !fault.delay.is_zero() {
            tokio::time::sleep(fault.delay).await;
        }
        let resp = match fault.status {
            Some(status) => {
                // Read the request so an HTTP/1.1 connection stays reusable.
                let _ = Limited::new(req.into_body(), MAX_JSON_BODY).collect().await;
                let message = format!("lab fault: injected {status}");
                openai_error(status, &message, Some("lab_fault"))
            }
            None => self.route(req, Some(fault)).await,
        };
        match (fault.drop_after_chunks, resp.into_parts()) {
            (Some(_), (parts, ResBody::Full(Some(body)))) => {
                let half = body.slice(..body.len() / 2);
                let steps = vec![
                    (Duration::ZERO, Step::Data(half)),
                    (ABORT_FLUSH_PAUSE, Step::Abort),
                ];
                let paced = Paced::new(steps, Some(body.len() as u64));
                Response::from_parts(parts, ResBody::Paced(paced))
            }
            (_, (parts, body)) => Response::from_parts(parts, body),
        }
    }

    async fn route<B>(&self, req: Request<B>, fault: Option<Fault>) -> Response<ResBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path();
        let known = matches!(
            path,
            "/v1/models" | "/v1/chat/completions" | "/v1/embeddings"
        );
        if !known {
            return self.echo(req).await;
        }
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_JSON_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                let message = format!("could not read the request body: {err}");
                let status = if err.is::<http_body_util::LengthLimitError>() {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                };
                return openai_error(status, &message, None);
            }
        };
        match check_auth(self.config.api_key.as_ref(), &parts.headers) {
            AuthCheck::Ok => {}
            AuthCheck::Missing => {
                return openai_error(
                    StatusCode::UNAUTHORIZED,
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>` \
                     or `api-key: <key>`.",
                    Some("invalid_api_key"),
                )
            }
            AuthCheck::Wrong => {
                return openai_error(
                    StatusCode::UNAUTHORIZED,
                    "Incorrect API key provided.",
                    Some("invalid_api_key"),
                )
            }
        }
        match (&parts.method, parts.uri.path()) {
            (&Method::GET, "/v1/models") => json(StatusCode::OK, self.models_body.clone()),
            (&Method::POST, "/v1/chat/completions") => self.chat(&body, fault),
            (&Method::POST, "/v1/embeddings") => self.embeddings(&body),
            (method, path) => {
                let message = format!("{method} is not supported on {path}");
                openai_error(StatusCode::METHOD_NOT_ALLOWED, &message, None)
            }
        }
    }

    fn unknown_model(&self, model: &str) -> Response<ResBody> {
        let message = format!(
            "The model `{model}` does not exist on backend {}; it serves: {}",
            self.config.name,
            self.config.models.join(", ")
        );
        openai_error(StatusCode::NOT_FOUND, &message, Some("model_not_found"))
    }

    fn chat(&self, body: &[u8], fault: Option<Fault>) -> Response<ResBody> {
        let req: ChatRequest = match serde_json::from_slice(body) {
            Ok(req) => req,
            Err(err) => return bad_json(&err),
        };
        if !self.config.models.contains(&req.model) {
            return self.unknown_model(&req.model);
        }
        let last_user = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .and_then(|m| m.content.as_ref())
            .map(MessageContent::text)
            .unwrap_or_default();
        let content = format!("[{}] echo: {last_user}", self.config.name);
        let prompt_tokens = req
            .messages
            .iter()
            .filter_map(|m| m.content.as_ref())
            .map(|c| word_count(&c.text()))
            .sum();
        let completion_tokens = word_count(&content);
        let usage = Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        };
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("chatcmpl-{}-{n}", self.config.name);
        if req.stream != Some(true) {
            let completion = Completion {
                id: &id,
                object: "chat.completion",
                created: 0,
                model: &req.model,
                choices: [CompletionChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: &content,
                    },
                    logprobs: None,
                    finish_reason: "stop",
                }],
                usage,
            };
            return json(StatusCode::OK, to_json(&completion));
        }
        let include_usage = req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let stream = ChatStream {
            id: &id,
            model: &req.model,
            content: &content,
            usage: include_usage.then_some(usage),
            chunk_delay: fault
                .and_then(|f| f.chunk_delay)
                .unwrap_or(self.config.chunk_delay),
            drop_after_chunks: fault.and_then(|f| f.drop_after_chunks),
        };
        let mut resp = Response::new(ResBody::Paced(Paced::new(stream.steps(), None)));
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    fn embeddings(&self, body: &[u8]) -> Response<ResBody> {
        let req: EmbeddingRequest = match serde_json::from_slice(body) {
            Ok(req) => req,
            Err(err) => return bad_json(&err),
        };
        if !self.config.models.contains(&req.model) {
            return self.unknown_model(&req.model);
        }
        let inputs = match &req.input {
            EmbeddingInput::One(one) => std::slice::from_ref(one),
            EmbeddingInput::Many(many) if many.is_empty() => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    "`input` is an empty array; send a string or a non-empty array of strings",
                    None,
                )
            }
            EmbeddingInput::Many(many) => many.as_slice(),
        };
        let tokens = inputs.iter().map(|s| word_count(s)).sum();
        let list = EmbeddingList {
            object: "list",
            data: inputs
                .iter()
                .enumerate()
                .map(|(index, input)| EmbeddingItem {
                    object: "embedding",
                    index,
                    embedding: embedding(input),
                })
                .collect(),
            model: &req.model,
            usage: EmbeddingUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        };
        json(StatusCode::OK, to_json(&list))
    }

    /// Any other path: report what arrived, hashing the body as it streams in.
    async fn echo<B>(&self, req: Request<B>) -> Response<ResBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let mut body = std::pin::pin!(body);
        let (mut hasher, mut body_len) = (Sha256::new(), 0u64);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        body_len += data.len() as u64;
                        hasher.update(data);
                    }
                }
                Err(err) => {
                    let message = format!("could not read the request body: {}", err.into());
                    return openai_error(StatusCode::BAD_REQUEST, &message, None);
                }
            }
        }
        let mut header_names: Vec<&str> = parts.headers.keys().map(|k| k.as_str()).collect();
        header_names.sort_unstable();
        let echo = Echo {
            backend: &self.config.name,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            header_names,
            auth: check_auth(self.config.api_key.as_ref(), &parts.headers).as_str(),
            body_len,
            body_sha256: hex(&hasher.finalize()),
        };
        json(StatusCode::OK, to_json(&echo))
    }

    async fn lab_control<B>(&self, req: Request<B>) -> Response<ResBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, MAX_JSON_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                let message = format!("could not read the request body: {err}");
                return openai_error(StatusCode::BAD_REQUEST, &message, None);
            }
        };
        match (&parts.method, parts.uri.path()) {
            (&Method::POST, "/_lab/fault") => {
                let spec: FaultSpec = if body.iter().all(u8::is_ascii_whitespace) {
                    FaultSpec::default()
                } else {
                    match serde_json::from_slice(&body) {
                        Ok(spec) => spec,
                        Err(err) => return bad_json(&err),
                    }
                };
                match spec.validate() {
                    Ok((fault, times)) => {
                        self.lab().arm(fault, times);
                        no_content()
                    }
                    Err(message) => openai_error(StatusCode::BAD_REQUEST, &message, None),
                }
            }
            (&Method::DELETE, "/_lab/fault") => {
                self.lab().clear();
                no_content()
            }
            (&Method::GET, "/_lab/stats") => {
                let body = to_json(&self.lab().stats(&self.config.name));
                json(StatusCode::OK, body)
            }
            (method, path) => {
                let message = format!(
                    "no lab route {method} {path}; use POST|DELETE /_lab/fault or GET /_lab/stats"
                );
                openai_error(StatusCode::NOT_FOUND, &message, None)
            }
        }
    }
}

fn no_content() -> Response<ResBody> {
    let mut resp = Response::new(ResBody::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

/// The SSE events of one streamed answer.
struct ChatStream<'a> {
    id: &'a str,
    model: &'a str,
    content: &'a str,
    /// Sent in a last usage-only chunk when the client asked (`stream_options`).
    usage: Option<Usage>,
    chunk_delay: Duration,
    drop_after_chunks: Option<u32>,
}

impl ChatStream<'_> {
    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&'static str>) -> Bytes {
        let choices = [ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }];
        sse_event(&Chunk {
            id: self.id,
            object: "chat.completion.chunk",
            created: 0,
            model: self.model,
            choices: &choices,
            usage: None,
        })
    }

    /// Role chunk, one chunk per word (each after the chunk delay), the stop chunk,
    /// the usage chunk if asked, `[DONE]`; or a cut after `drop_after_chunks` words.
    fn steps(&self) -> Vec<(Duration, Step)> {
        let mut steps = Vec::with_capacity(self.content.len() / 4 + 5);
        let role = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        steps.push((Duration::ZERO, Step::Data(self.chunk(role, None))));
        for (i, word) in word_deltas(self.content).enumerate() {
            if self
                .drop_after_chunks
                .is_some_and(|k| i as u64 >= u64::from(k))
            {
                break;
            }
            let delta = Delta {
                role: None,
                content: Some(word),
            };
            steps.push((self.chunk_delay, Step::Data(self.chunk(delta, None))));
        }
        if self.drop_after_chunks.is_some() {
            steps.push((self.chunk_delay.max(ABORT_FLUSH_PAUSE), Step::Abort));
            return steps;
        }
        steps.push((
            Duration::ZERO,
            Step::Data(self.chunk(Delta::default(), Some("stop"))),
        ));
        if let Some(usage) = self.usage {
            let event = sse_event(&Chunk {
                id: self.id,
                object: "chat.completion.chunk",
                created: 0,
                model: self.model,
                choices: &[],
                usage: Some(usage),
            });
            steps.push((Duration::ZERO, Step::Data(event)));
        }
        steps.push((
            Duration::ZERO,
            Step::Data(Bytes::from_static(b"data: [DONE]\n\n")),
        ));
        steps
    }
}

// ---------------------------------------------------------------------------------------
// Driver

/// Loads a PEM certificate chain and key (PKCS#8, RSA or SEC1) into a TLS acceptor that
/// offers ALPN h2 and http/1.1.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let read = |path: &Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let cert_pem = read(cert)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a valid PEM file", cert.display()))?;
    if certs.is_empty() {
        bail!(
            "{}: no CERTIFICATE block; give a PEM file holding the server certificate",
            cert.display()
        );
    }
    let key_pem = read(key)?;
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("{}: not a valid PEM file", key.display()))?
        .with_context(|| {
            format!(
                "{}: no private key; give a PEM file with a PKCS#8, RSA or EC private key",
                key.display()
            )
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| {
            format!(
                "{} does not go with {}: give the key of that certificate",
                key.display(),
                cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `listener` until `shutdown` completes, then lets open connections finish for
/// a short grace period.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    backend: Arc<Backend>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        backend.lab().connections += 1;
        let (builder, backend, tls) = (builder.clone(), backend.clone(), tls.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let backend = backend.clone();
                async move { Ok::<_, Infallible>(backend.handle(req).await) }
            });
            match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
                    let Ok(Ok(stream)) = handshake.await else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn).await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn backend(api_key: Option<&str>) -> Backend {
        let config = Config {
            name: "b1".to_owned(),
            models: vec![
                "gpt-4o-mini".to_owned(),
                "text-embedding-3-small".to_owned(),
            ],
            api_key: api_key.and_then(ApiKey::new),
            chunk_delay: Duration::ZERO,
        };
        Backend::new(config).expect("valid config")
    }

    fn request(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .expect("valid request")
    }

    /// The frames of a response body, and whether it ended in an error.
    async fn collect_frames(resp: Response<ResBody>) -> (Vec<Bytes>, bool) {
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => out.extend(frame.into_data().ok()),
                Err(_) => return (out, true),
            }
        }
        (out, false)
    }

    async fn body_json(resp: Response<ResBody>) -> serde_json::Value {
        let (frames, aborted) = collect_frames(resp).await;
        assert!(!aborted);
        serde_json::from_slice(&frames.concat()).expect("JSON body")
    }

    const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[
        {"role":"system","content":"be brief"},{"role":"user","content":"hello big world"}]}"#;

    #[test]
    fn word_deltas_concatenate_to_the_content() {
        for content in ["[b1] echo: hello  world ", "", "one", " lead", "a\nb c"] {
            assert_eq!(word_deltas(content).collect::<String>(), content);
        }
        let deltas: Vec<_> = word_deltas("[b1] echo: hi there").collect();
        assert_eq!(deltas, ["[b1] ", "echo: ", "hi ", "there"]);
    }

    #[test]
    fn embeddings_are_deterministic_and_distinct() {
        assert_eq!(embedding("abc"), embedding("abc"));
        assert_ne!(embedding("abc"), embedding("abd"));
        // sha256("abc") starts ba 78 16 bf.
        assert_eq!(embedding("abc")[0], f64::from(0xbau8) / 255.0);
        assert!(embedding("x").iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn auth_accepts_bearer_and_api_key_only_with_the_key() {
        let key = ApiKey::new(" sk-1\n");
        let mut headers = HeaderMap::new();
        assert_eq!(check_auth(key.as_ref(), &headers), AuthCheck::Missing);
        assert_eq!(check_auth(None, &headers), AuthCheck::Ok);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer sk-2"));
        assert_eq!(check_auth(key.as_ref(), &headers), AuthCheck::Wrong);
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer sk-1"));
        assert_eq!(check_auth(key.as_ref(), &headers), AuthCheck::Ok);
        headers.clear();
        headers.insert("api-key", HeaderValue::from_static("sk-1"));
        assert_eq!(check_auth(key.as_ref(), &headers), AuthCheck::Ok);
        assert_eq!(format!("{key:?}"), "Some(ApiKey(***))");
    }

    #[test]
    fn a_fault_lasts_its_times_and_is_counted() {
        let spec = FaultSpec {
            status: Some(503),
            times: Some(2),
            ..FaultSpec::default()
        };
        let (fault, times) = spec.validate().expect("valid");
        let mut lab = LabState::default();
        lab.arm(fault, times);
        assert_eq!(
            lab.admit("/v1/x").and_then(|f| f.status),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!(lab.admit("/v1/x").is_some());
        assert!(lab.admit("/v1/y").is_none());
        let stats = lab.stats("b1");
        assert_eq!((stats.requests, stats.faults_applied), (3, 2));
        assert_eq!(stats.by_path.get("/v1/x"), Some(&2));

        lab.arm(Fault::default(), None);
        for _ in 0..5 {
            assert!(lab.admit("/v1/x").is_some());
        }
        lab.clear();
        assert!(lab.admit("/v1/x").is_none());
    }

    #[test]
    fn fault_specs_are_validated() {
        let bad_status = FaultSpec {
            status: Some(200),
            ..FaultSpec::default()
        };
        assert!(bad_status.validate().is_err());
        let zero_times = FaultSpec {
            times: Some(0),
            ..FaultSpec::default()
        };
        assert!(zero_times.validate().is_err());
        let unknown: Result<FaultSpec, _> = serde_json::from_str(r#"{"stauts":503}"#);
        assert!(unknown.is_err());
    }

    #[tokio::test]
    async fn chat_answers_with_the_last_user_message() {
        let b = backend(None);
        let resp = b
            .handle(request("POST", "/v1/chat/completions", &[], CHAT))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-backend"], "b1");
        let v = body_json(resp).await;
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "[b1] echo: hello big world"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 10);
    }

    #[tokio::test]
    async fn chat_rejects_unknown_models_bad_json_and_bad_keys() {
        let b = backend(Some("sk-1"));
        let auth = [("authorization", "Bearer sk-1")];
        let other = CHAT.replace("gpt-4o-mini", "gpt-5");
        let resp = b
            .handle(request("POST", "/v1/chat/completions", &auth, &other))
            .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_json(resp).await["error"]["code"], "model_not_found");
        let resp = b
            .handle(request("POST", "/v1/chat/completions", &auth, "{"))
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let resp = b
            .handle(request("POST", "/v1/chat/completions", &[], CHAT))
            .await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(body_json(resp).await["error"]["code"], "invalid_api_key");
    }

    #[tokio::test]
    async fn streamed_chat_deltas_rebuild_the_answer() {
        let b = backend(None);
        let body = CHAT.replace(
            "\"model\"",
            "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"model\"",
        );
        let resp = b
            .handle(request("POST", "/v1/chat/completions", &[], &body))
            .await;
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
        let (frames, aborted) = collect_frames(resp).await;
        assert!(!aborted);
        let events: Vec<&[u8]> = frames.iter().map(|f| f.as_ref()).collect();
        assert_eq!(events.last(), Some(&&b"data: [DONE]\n\n"[..]));
        let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_slice(&e[6..]).expect("chunk JSON"))
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "[b1] echo: hello big world");
        let stop = &chunks[chunks.len() - 2];
        assert_eq!(stop["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[chunks.len() - 1]["usage"]["total_tokens"], 10);
    }

    #[tokio::test]
    async fn drop_after_chunks_cuts_streams_and_bodies() {
        let b = backend(None);
        b.lab().arm(
            Fault {
                drop_after_chunks: Some(2),
                ..Fault::default()
            },
            Some(2),
        );
        let stream = CHAT.replace("\"model\"", "\"stream\":true,\"model\"");
        let resp = b
            .handle(request("POST", "/v1/chat/completions", &[], &stream))
            .await;
        let (frames, aborted) = collect_frames(resp).await;
        assert!(aborted);
        assert_eq!(frames.len(), 3, "role chunk plus two words");

        let resp = b
            .handle(request("POST", "/v1/chat/completions", &[], CHAT))
            .await;
        let promised = resp.body().size_hint().exact().expect("exact length");
        let (frames, aborted) = collect_frames(resp).await;
        assert!(aborted);
        assert_eq!(frames.concat().len() as u64, promised / 2);
    }

    #[tokio::test]
    async fn chunks_are_paced_by_the_chunk_delay() {
        let mut b = backend(None);
        b.config.chunk_delay = Duration::from_millis(15);
        let stream = CHAT.replace("\"model\"", "\"stream\":true,\"model\"");
        let start = Instant::now();
        let resp = b
            .handle(request("POST", "/v1/chat/completions", &[], &stream))
            .await;
        let (frames, _) = collect_frames(resp).await;
        // Five words, each after one delay.
        assert_eq!(frames.len(), 1 + 5 + 2);
        assert!(start.elapsed() >= Duration::from_millis(75));
    }

    #[tokio::test]
    async fn echo_reports_names_not_values_and_never_rejects() {
        let b = backend(Some("sk-1"));
        let headers = [("api-key", "sk-wrong"), ("x-custom", "secret-value")];
        let path = "/api/v1/services/aigc/text-generation/generation?x=1";
        let resp = b.handle(request("PUT", path, &headers, "abc")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let v = body_json(resp).await;
        assert_eq!(v["auth"], "wrong");
        assert_eq!(v["method"], "PUT");
        assert_eq!(v["query"], "x=1");
        assert_eq!(
            v["header_names"],
            serde_json::json!(["api-key", "x-custom"])
        );
        assert_eq!(v["body_len"], 3);
        assert_eq!(
            v["body_sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!v.to_string().contains("secret-value"));
    }

    #[tokio::test]
    async fn lab_routes_arm_faults_and_report_stats() {
        let b = backend(None);
        let fault = r#"{"status":429,"times":1}"#;
        let resp = b.handle(request("POST", "/_lab/fault", &[], fault)).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let resp = b.handle(request("GET", "/v1/models", &[], "")).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
        let resp = b.handle(request("GET", "/v1/models", &[], "")).await;
        assert_eq!(
            body_json(resp).await["data"][1]["id"],
            "text-embedding-3-small"
        );
        let resp = b
            .handle(request("POST", "/_lab/fault", &[], r#"{"status":99}"#))
            .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let v = body_json(b.handle(request("GET", "/_lab/stats", &[], "")).await).await;
        assert_eq!(v["requests"], 2);
        assert_eq!(v["by_path"]["/v1/models"], 2);
        assert_eq!(v["faults_applied"], 1);
    }

    #[tokio::test]
    async fn embeddings_follow_the_inputs() {
        let b = backend(None);
        let body = r#"{"model":"text-embedding-3-small","input":["a b","c"]}"#;
        let v = body_json(b.handle(request("POST", "/v1/embeddings", &[], body)).await).await;
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(
            v["data"][1]["embedding"].as_array().map(Vec::len),
            Some(EMBEDDING_DIMS)
        );
        assert_eq!(v["usage"]["prompt_tokens"], 3);
    }
}
