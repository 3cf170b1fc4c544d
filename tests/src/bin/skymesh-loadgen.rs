//! `skymesh-loadgen`: an open-loop HTTP/1.1 load generator for the AI gateway benchmark
//! (gateway vs nginx vs the backend called directly).
//!
//! It owns exactly `--connections` keep-alive TCP connections (one task each, driven by hyper's
//! low-level `client::conn::http1`, so the connection count is exact), a pacer thread that
//! releases open-loop requests at their scheduled times, and fixed-memory latency histograms.
//! It writes one JSON report to stdout and a one-line summary to stderr. Plain http only.
//!
//! Latency model, open loop (`--rate R > 0`): request `i` is due at `start + i/R`. A connection
//! that is free takes the next due request from a shared counter; when every connection is busy,
//! due requests queue, and their latency is measured from the *due* time, so a slow server cannot
//! hide its stalls (coordinated-omission correction, as in wrk2). One refinement: when the
//! connection was already idle and waiting at the due time, the few microseconds the generator
//! itself took to wake up are not the server's doing, so latency is measured from the actual send;
//! that wake-up lag is reported separately as `pacing_lag_us`. Closed loop (`--rate 0`): each
//! connection sends back to back and latency is send to end of body.
//!
//! Only responses with the expected status and a fully read body are `ok` and enter the
//! latency histogram. Connect and I/O failures are counted, the connection reconnects, the run
//! goes on.

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use histogram::Histogram;
use schedule::Schedule;

/// First pause after a failed connect; doubles up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(10);
const RECONNECT_MAX: Duration = Duration::from_millis(500);

#[derive(Parser, Debug)]
#[command(
    name = "skymesh-loadgen",
    about = "Open-loop HTTP/1.1 load generator: fixed keep-alive connections, latency from each \
             request's scheduled time (coordinated-omission corrected), JSON report on stdout."
)]
struct Args {
    /// Target URL, plain http only, e.g. http://127.0.0.1:8080/v1/chat/completions.
    #[arg(long, value_parser = parse_url)]
    url: Uri,
    /// HTTP method [default: POST when a body is given, GET otherwise].
    #[arg(long, value_parser = parse_method)]
    method: Option<Method>,
    /// Extra request header as 'Name: value'; repeatable. A Host header here replaces the default.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Request body.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Request body read from a file (sent byte for byte).
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Target rate in requests/s; 0 runs closed loop (every connection sends back to back).
    #[arg(long, value_parser = parse_rate, allow_negative_numbers = true)]
    rate: f64,
    /// Measured duration (after warmup), e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    duration: Duration,
    /// Load run before the measured duration and not recorded.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// Number of persistent keep-alive connections.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    connections: u32,
    /// Runtime worker threads [default: one per CPU].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// Status that counts as ok.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..=999))]
    expect_status: u16,
    /// Per-request (and per-connect) timeout; also how long an open-loop backlog may still drain
    /// after the measured duration ends before the rest is counted as `missed`.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    timeout: Duration,
}

fn parse_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected one like http://127.0.0.1:8080/path"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("https is not supported; point it at a plain http:// listener".into())
        }
        _ => {
            return Err("expected an absolute http:// URL, like http://127.0.0.1:8080/path".into())
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host; expected one like http://127.0.0.1:8080/path".into());
    }
    Ok(uri)
}

fn parse_method(text: &str) -> Result<Method, String> {
    Method::from_bytes(text.as_bytes())
        .map_err(|_| "not an HTTP method, use e.g. GET or POST".into())
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or("expected 'Name: value', e.g. 'Content-Type: application/json'")?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{:?} is not a valid header name", name.trim()))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| "the header value contains characters not allowed in HTTP headers")?;
    Ok((name, value))
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err("expected requests per second, a number >= 0 (0 = closed loop)".into()),
    }
}

/// Parses `10s`, `500ms`, `250us`, `1.5m`, `1h`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    const HINT: &str = "expected a duration like 10s, 500ms or 1m";
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| HINT.to_string())?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?}; {HINT}")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| HINT.to_string())
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be greater than zero, like 10s".into()),
        d => Ok(d),
    }
}

/// What every request looks like; built once, cloned per request.
struct RequestPlan {
    method: Method,
    /// Origin-form (`/path?query`): hyper's http1 connection sends the URI as given.
    path: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl RequestPlan {
    fn build(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.path.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// The validated run configuration.
struct Config {
    url: Uri,
    host: String,
    port: u16,
    plan: RequestPlan,
    rate: f64,
    duration: Duration,
    warmup: Duration,
    connections: u32,
    threads: usize,
    expect: StatusCode,
    timeout: Duration,
}

impl Config {
    fn from_args(args: Args) -> Result<Self> {
        let expect = StatusCode::from_u16(args.expect_status)
            .with_context(|| format!("--expect-status {} is not a status", args.expect_status))?;
        let body = match (&args.body, &args.body_file) {
            (Some(text), _) => Bytes::from(text.clone()),
            (None, Some(path)) => Bytes::from(std::fs::read(path).with_context(|| {
                format!("--body-file {}: cannot read the file", path.display())
            })?),
            (None, None) => Bytes::new(),
        };
        let has_body = args.body.is_some() || args.body_file.is_some();
        let method = args
            .method
            .unwrap_or(if has_body { Method::POST } else { Method::GET });

        // parse_url guarantees an http scheme and a host.
        let host = args.url.host().unwrap_or_default().to_string();
        let port = args.url.port_u16().unwrap_or(80);
        let path: Uri = args
            .url
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse()
            .with_context(|| format!("--url {}: bad path", args.url))?;
        let mut headers = HeaderMap::new();
        for (name, value) in args.headers {
            headers.append(name, value);
        }
        if !headers.contains_key(header::HOST) {
            let authority = match args.url.port_u16() {
                Some(p) => format!("{host}:{p}"),
                None => host.clone(),
            };
            let value = HeaderValue::from_str(&authority)
                .with_context(|| format!("--url {}: host is not a valid Host header", args.url))?;
            headers.insert(header::HOST, value);
        }
        let threads = match args.threads {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        Ok(Config {
            url: args.url,
            host,
            port,
            plan: RequestPlan {
                method,
                path,
                headers,
                body,
            },
            rate: args.rate,
            duration: args.duration,
            warmup: args.warmup,
            connections: args.connections,
            threads,
            expect,
            timeout: args.timeout,
        })
    }
}

mod histogram {
    //! A fixed-memory log-linear histogram of durations in nanoseconds (HdrHistogram's layout,
    //! written small): values below 256 ns are exact; above, each power of two is split into 128
    //! buckets, so a bucket's midpoint is within 0.4% of any value in it. It spans 1 ns to
    //! 2^36 ns (~68.7 s) in 3840 counters (30 KB) whatever the sample count; larger values fall
    //! into the top bucket, while `max` stays exact. It holds counts only, no time or IO.
    //!
    //! Counters are atomics so that all connections record into one histogram: memory stays
    //! 30 KB per histogram whatever the rate, duration or connection count (a per-connection copy
    //! would cost 30 KB per connection). Relaxed ordering suffices: it is read once, after every
    //! recorder has been joined.

    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    const SUB_BITS: u32 = 7;
    const SUB: usize = 1 << SUB_BITS;
    const MAX_BITS: u32 = 36;
    /// Largest value bucketed as itself; anything larger is counted in the top bucket.
    const MAX_TRACKABLE: u64 = (1 << MAX_BITS) - 1;
    const LEN: usize = (MAX_BITS - SUB_BITS + 1) as usize * SUB;

    pub struct Histogram {
        counts: Box<[AtomicU64]>,
        sum: AtomicU64,
        min: AtomicU64,
        max: AtomicU64,
    }

    impl Default for Histogram {
        fn default() -> Self {
            Histogram {
                counts: (0..LEN).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0),
                min: AtomicU64::new(u64::MAX),
                max: AtomicU64::new(0),
            }
        }
    }

    fn index(value: u64) -> usize {
        let v = value.min(MAX_TRACKABLE);
        if v < 2 * SUB as u64 {
            return v as usize;
        }
        // v >> shift lands in [SUB, 2*SUB): the top SUB_BITS+1 bits of v.
        let shift = 63 - v.leading_zeros() - SUB_BITS;
        shift as usize * SUB + (v >> shift) as usize
    }

    /// Smallest and largest value that map to bucket `idx`.
    fn bounds(idx: usize) -> (u64, u64) {
        if idx < 2 * SUB {
            return (idx as u64, idx as u64);
        }
        let shift = idx / SUB - 1;
        let low = ((idx - shift * SUB) as u64) << shift;
        (low, low + (1u64 << shift) - 1)
    }

    impl Histogram {
        pub fn record(&self, value: u64) {
            self.counts[index(value)].fetch_add(1, Relaxed);
            // u64 nanoseconds overflow only after 584 years of summed latency.
            self.sum.fetch_add(value, Relaxed);
            // Load first: the extremes rarely change, and a plain load keeps the line shared.
            if value < self.min.load(Relaxed) {
                self.min.fetch_min(value, Relaxed);
            }
            if value > self.max.load(Relaxed) {
                self.max.fetch_max(value, Relaxed);
            }
        }

        pub fn count(&self) -> u64 {
            self.counts.iter().map(|c| c.load(Relaxed)).sum()
        }

        pub fn max(&self) -> u64 {
            self.max.load(Relaxed)
        }

        pub fn mean(&self) -> f64 {
            match self.count() {
                0 => 0.0,
                n => self.sum.load(Relaxed) as f64 / n as f64,
            }
        }

        /// The value at quantile `q` (0..=1): the smallest recorded value with at least
        /// `ceil(q * count)` values at or below it, given as its bucket's midpoint clamped to the
        /// observed min and max. 0 when empty.
        pub fn quantile(&self, q: f64) -> u64 {
            let count = self.count();
            if count == 0 {
                return 0;
            }
            let (min, max) = (self.min.load(Relaxed), self.max());
            let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (idx, n) in self.counts.iter().enumerate() {
                seen += n.load(Relaxed);
                if seen >= rank {
                    let (low, high) = bounds(idx);
                    return (low + (high - low) / 2).clamp(min, max);
                }
            }
            max
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Exact quantile with the same rank rule as `Histogram::quantile`.
        fn exact(sorted: &[u64], q: f64) -> u64 {
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            sorted[rank - 1]
        }

        fn assert_within_1pct(h: &Histogram, sorted: &[u64]) {
            for q in [0.0, 0.001, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0] {
                let (got, want) = (h.quantile(q), exact(sorted, q));
                let err = (got as f64 - want as f64).abs() / want as f64;
                assert!(
                    err <= 0.01,
                    "q={q}: got {got}, want {want} (error {err:.4})"
                );
            }
        }

        #[test]
        fn uniform_percentiles_within_one_percent() {
            // 1 µs .. 100 ms in 1 µs steps.
            let values: Vec<u64> = (1..=100_000).map(|i| i * 1_000).collect();
            let h = Histogram::default();
            values.iter().for_each(|&v| h.record(v));
            assert_within_1pct(&h, &values);
            assert_eq!(h.count(), 100_000);
            assert_eq!(h.max(), 100_000_000);
            assert!((h.mean() - 50_000_500.0).abs() < 1e-6);
        }

        #[test]
        fn log_uniform_1us_to_60s_within_one_percent() {
            // Deterministic xorshift: exponents spread evenly from 1 µs (2^10 ns) to 60 s.
            let mut state = 0x9e37_79b9_7f4a_7c15_u64;
            let mut values: Vec<u64> = (0..1_000_000)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
                    (1_000.0 * (60e9_f64 / 1_000.0).powf(unit)) as u64
                })
                .collect();
            let h = Histogram::default();
            values.iter().for_each(|&v| h.record(v));
            values.sort_unstable();
            assert_within_1pct(&h, &values);
        }

        #[test]
        fn concurrent_recording_equals_sequential() {
            let (shared, single) = (Histogram::default(), Histogram::default());
            let values: Vec<u64> = (1..200_000u64).map(|i| i * 7_919).collect();
            std::thread::scope(|scope| {
                for chunk in values.chunks(values.len() / 4 + 1) {
                    let shared = &shared;
                    scope.spawn(move || chunk.iter().for_each(|&v| shared.record(v)));
                }
            });
            values.iter().for_each(|&v| single.record(v));
            for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
                assert_eq!(shared.quantile(q), single.quantile(q));
            }
            assert_eq!(shared.count(), single.count());
            assert_eq!(shared.mean(), single.mean());
        }

        #[test]
        fn buckets_tile_the_range_and_stay_narrow() {
            let mut previous_high = None;
            for idx in 0..LEN {
                let (low, high) = bounds(idx);
                if let Some(prev) = previous_high {
                    assert_eq!(low, prev + 1, "gap before bucket {idx}");
                }
                assert_eq!(index(low), idx);
                assert_eq!(index(high), idx);
                assert!((high - low) as f64 / 2.0 <= low as f64 * 0.004 + 0.5);
                previous_high = Some(high);
            }
            assert_eq!(previous_high, Some(MAX_TRACKABLE));
        }

        #[test]
        fn values_beyond_the_range_keep_an_exact_max() {
            let h = Histogram::default();
            h.record(100 * 1_000_000_000);
            assert_eq!(h.quantile(0.5), 100 * 1_000_000_000);
            assert_eq!(h.max(), 100 * 1_000_000_000);
            assert_eq!(Histogram::default().quantile(0.5), 0);
        }
    }
}

mod schedule {
    //! When each open-loop request is due, as an offset from the run's start: request `i` at
    //! `i / rate`. Pure arithmetic; the pacer and the connections hold the clock.

    use std::time::Duration;

    #[derive(Clone, Copy, Debug)]
    pub struct Schedule {
        rate: f64,
        warmup: Duration,
        duration: Duration,
    }

    impl Schedule {
        /// `rate` must be > 0.
        pub fn new(rate: f64, warmup: Duration, duration: Duration) -> Self {
            Schedule {
                rate,
                warmup,
                duration,
            }
        }

        pub fn due(&self, i: u64) -> Duration {
            Duration::from_secs_f64(i as f64 / self.rate)
        }

        /// Number of requests due strictly before `t`.
        fn count_before(&self, t: Duration) -> u64 {
            (t.as_secs_f64() * self.rate).ceil() as u64
        }

        /// Requests due during warmup: indices below this are not recorded.
        pub fn warmup_count(&self) -> u64 {
            self.count_before(self.warmup)
        }

        /// All requests of the run, warmup included.
        pub fn total(&self) -> u64 {
            self.count_before(self.warmup + self.duration)
        }

        /// Number of requests due at or before `elapsed`.
        pub fn released_by(&self, elapsed: Duration) -> u64 {
            ((elapsed.as_secs_f64() * self.rate).floor() as u64 + 1).min(self.total())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn counts_and_release_times_agree() {
            let s = Schedule::new(2000.0, Duration::from_secs(2), Duration::from_secs(10));
            assert_eq!(s.warmup_count(), 4_000);
            assert_eq!(s.total(), 24_000);
            assert_eq!(s.due(4_000), Duration::from_secs(2));
            assert_eq!(s.released_by(Duration::ZERO), 1);
            assert_eq!(s.released_by(Duration::from_micros(499)), 1);
            assert_eq!(s.released_by(Duration::from_micros(500)), 2);
            assert_eq!(s.released_by(Duration::from_secs(100)), 24_000);
            for i in [0, 1, 1_999, 23_999] {
                assert!(
                    s.released_by(s.due(i)) > i,
                    "request {i} not released at its due time"
                );
            }
        }

        #[test]
        fn fractional_rates() {
            let s = Schedule::new(0.5, Duration::ZERO, Duration::from_secs(5));
            assert_eq!(s.total(), 3); // due at 0 s, 2 s, 4 s
            assert_eq!(s.due(2), Duration::from_secs(4));
        }
    }
}

/// Why a request or connect attempt failed.
#[derive(Clone, Copy, Debug)]
enum ErrorKind {
    Connect,
    Io,
    Timeout,
}

#[derive(Default, Serialize, Clone, Copy)]
struct ErrorCounts {
    connect: u64,
    io: u64,
    timeout: u64,
}

impl ErrorKind {
    fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Io => "io",
            ErrorKind::Timeout => "timeout",
        }
    }
}

impl ErrorCounts {
    fn total(&self) -> u64 {
        self.connect + self.io + self.timeout
    }
}

/// What one connection (then the whole run, merged) saw during the measured window.
#[derive(Default)]
struct Stats {
    sent: u64,
    ok: u64,
    unexpected_status: u64,
    errors: ErrorCounts,
    first_error: Option<String>,
    /// When the last recorded request was sent (an open-loop backlog drains past the window).
    last_send: Option<Instant>,
}

impl Stats {
    fn error(&mut self, kind: ErrorKind, detail: &dyn std::fmt::Display) {
        let counter = match kind {
            ErrorKind::Connect => &mut self.errors.connect,
            ErrorKind::Io => &mut self.errors.io,
            ErrorKind::Timeout => &mut self.errors.timeout,
        };
        *counter += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{}: {detail}", kind.name()));
        }
    }

    fn merge(&mut self, other: Stats) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.unexpected_status += other.unexpected_status;
        self.errors.connect += other.errors.connect;
        self.errors.io += other.errors.io;
        self.errors.timeout += other.errors.timeout;
        self.first_error = self.first_error.take().or(other.first_error);
        self.last_send = self.last_send.max(other.last_send);
    }
}

/// How requests are handed to connections.
enum Mode {
    Open {
        schedule: Schedule,
        /// One permit per request that has come due; the pacer adds them.
        permits: Arc<Semaphore>,
        /// Index of the next request to take.
        next: AtomicU64,
    },
    Closed,
}

/// A request a connection is about to send.
struct Job {
    /// Open loop: when it was due.
    due: Option<Instant>,
    /// False during warmup.
    recorded: bool,
}

/// State every connection task shares.
struct Shared {
    addr: SocketAddr,
    plan: RequestPlan,
    expect: StatusCode,
    timeout: Duration,
    start: Instant,
    warm_end: Instant,
    end: Instant,
    mode: Mode,
    /// Set `timeout` after `end`: no new requests, whatever is still queued is missed.
    stop: AtomicBool,
    /// Due (or send) time to end of body, ns, recorded ok responses only.
    latency: Histogram,
    /// Open loop: how late the generator sent requests a connection was idle and waiting for.
    pacing_lag: Histogram,
}

impl Shared {
    fn recording_at(&self, t: Instant) -> bool {
        t >= self.warm_end && t < self.end
    }

    /// True once this connection has nothing left to send.
    fn finished(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return true;
        }
        match &self.mode {
            Mode::Open { schedule, next, .. } => next.load(Ordering::Relaxed) >= schedule.total(),
            Mode::Closed => Instant::now() >= self.end,
        }
    }

    /// The next request to send, or None when the run is over. Cancel-safe: an index is taken
    /// only in the same poll in which the permit is acquired.
    async fn next_job(&self) -> Option<Job> {
        match &self.mode {
            Mode::Open {
                schedule,
                permits,
                next,
            } => {
                permits.acquire().await.ok()?.forget();
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= schedule.total() || self.stop.load(Ordering::Relaxed) {
                    return None;
                }
                Some(Job {
                    due: Some(self.start + schedule.due(i)),
                    recorded: i >= schedule.warmup_count(),
                })
            }
            Mode::Closed => {
                let now = Instant::now();
                if now >= self.end || self.stop.load(Ordering::Relaxed) {
                    return None;
                }
                Some(Job {
                    due: None,
                    recorded: now >= self.warm_end,
                })
            }
        }
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;
type Connection = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<(Sender, Connection)> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out after {timeout:?}"))?
}

/// Sends one request and reads the whole response body; returns the status.
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> hyper::Result<StatusCode> {
    sender.ready().await?;
    let response = sender.send_request(req).await?;
    let status = response.status();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(status)
}

/// One connection: connect, send jobs one at a time, reconnect when the connection ends.
/// The hyper connection is driven in this same task (no extra task and wake-up per request).
async fn run_connection(shared: Arc<Shared>) -> Stats {
    let mut stats = Stats::default();
    let mut backoff = RECONNECT_MIN;
    while !shared.finished() {
        let attempt_at = Instant::now();
        let (mut sender, conn) = match connect(shared.addr, shared.timeout).await {
            Ok(pair) => {
                backoff = RECONNECT_MIN;
                pair
            }
            Err(e) => {
                if shared.recording_at(attempt_at) {
                    stats.error(ErrorKind::Connect, &format_args!("{e:#}"));
                }
                // Past the window, a connection that cannot connect has nothing left to
                // measure (only live connections can drain an open-loop backlog).
                if Instant::now() >= shared.end {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        let mut conn = std::pin::pin!(conn);
        loop {
            let idle_since = Instant::now();
            // The connection goes first so a close (e.g. the server's keep-alive limit) is seen
            // before a job is taken, and the job goes to a live connection.
            let job = tokio::select! {
                biased;
                _ = &mut conn => break,
                job = shared.next_job() => job,
            };
            let Some(job) = job else {
                return stats;
            };
            let send_at = Instant::now();
            let base = match job.due {
                // Busy when it came due: the queueing is part of its latency.
                Some(due) if idle_since > due => due,
                Some(due) => {
                    if job.recorded {
                        let lag = send_at.saturating_duration_since(due);
                        shared.pacing_lag.record(lag.as_nanos() as u64);
                    }
                    send_at
                }
                None => send_at,
            };
            if job.recorded {
                stats.sent += 1;
                stats.last_send = Some(send_at);
            }
            let mut conn_done = false;
            let outcome = {
                let request = exchange(&mut sender, shared.plan.build());
                let mut request = std::pin::pin!(tokio::time::timeout(shared.timeout, request));
                loop {
                    tokio::select! {
                        biased;
                        outcome = &mut request => break outcome,
                        _ = &mut conn, if !conn_done => conn_done = true,
                    }
                }
            };
            let done = Instant::now();
            let mut reconnect = conn_done || sender.is_closed();
            match outcome {
                Ok(Ok(status)) if status == shared.expect => {
                    if job.recorded {
                        stats.ok += 1;
                        shared.latency.record((done - base).as_nanos() as u64);
                    }
                }
                Ok(Ok(_)) => {
                    if job.recorded {
                        stats.unexpected_status += 1;
                    }
                }
                Ok(Err(e)) => {
                    if job.recorded {
                        stats.error(ErrorKind::Io, &format_args!("{:#}", anyhow!(e)));
                    }
                    reconnect = true;
                }
                Err(_) => {
                    if job.recorded {
                        let detail = format!("no full response within {:?}", shared.timeout);
                        stats.error(ErrorKind::Timeout, &detail);
                    }
                    reconnect = true;
                }
            }
            if reconnect {
                break;
            }
        }
    }
    stats
}

/// Releases one permit per request as it comes due, then one per connection so that every idle
/// connection wakes up and sees the run is over. Runs on its own OS thread: tokio's timers tick
/// in whole milliseconds, which would release requests in bursts up to 1 ms late.
fn run_pacer(start: Instant, schedule: Schedule, permits: &Semaphore, connections: usize) {
    // Best effort: the default 50 µs timer slack would make every release that much later.
    let _ = nix::sys::prctl::set_timerslack(1_000);
    let total = schedule.total();
    let mut released = 0;
    loop {
        let due_now = schedule.released_by(start.elapsed());
        if due_now > released {
            permits.add_permits((due_now - released) as usize);
            released = due_now;
        }
        if released >= total {
            break;
        }
        let next = start + schedule.due(released);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    permits.add_permits(connections);
}

#[derive(Serialize)]
struct LatencySummary {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    mean: f64,
}

fn micros(ns: f64) -> f64 {
    (ns / 100.0).round() / 10.0
}

impl LatencySummary {
    fn of(h: &Histogram) -> Option<Self> {
        (h.count() > 0).then(|| LatencySummary {
            p50: micros(h.quantile(0.50) as f64),
            p90: micros(h.quantile(0.90) as f64),
            p99: micros(h.quantile(0.99) as f64),
            p999: micros(h.quantile(0.999) as f64),
            max: micros(h.max() as f64),
            mean: micros(h.mean()),
        })
    }
}

#[derive(Serialize)]
struct Report {
    url: String,
    rate_target: f64,
    duration_s: f64,
    warmup_s: f64,
    connections: u32,
    threads: usize,
    /// Requests sent in the measured window (errors included).
    sent: u64,
    ok: u64,
    /// Connect, I/O and timeout failures; `error_kinds` splits them.
    errors: u64,
    unexpected_status: u64,
    /// Open loop: requests due in the measured window that were never sent (the backlog left
    /// when the drain grace ran out). Non-zero means the target rate was not sustained.
    missed: u64,
    /// Complete responses (any status) per second, over the measured duration or, if an
    /// open-loop backlog was still draining after it, until the last send.
    achieved_rps: f64,
    latency_us: Option<LatencySummary>,
    /// Open loop: generator wake-up lag for requests a connection was idle and waiting for.
    pacing_lag_us: Option<LatencySummary>,
    error_kinds: ErrorCounts,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

async fn run(config: Config) -> Result<Report> {
    let addr = tokio::net::lookup_host((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("--url {}: cannot resolve {}", config.url, config.host))?
        .next()
        .with_context(|| format!("--url {}: {} has no address", config.url, config.host))?;

    let start = Instant::now();
    let warm_end = start + config.warmup;
    let end = warm_end + config.duration;
    let connections = config.connections as usize;
    let mode = if config.rate > 0.0 {
        Mode::Open {
            schedule: Schedule::new(config.rate, config.warmup, config.duration),
            permits: Arc::new(Semaphore::new(0)),
            next: AtomicU64::new(0),
        }
    } else {
        Mode::Closed
    };
    let shared = Arc::new(Shared {
        addr,
        plan: config.plan,
        expect: config.expect,
        timeout: config.timeout,
        start,
        warm_end,
        end,
        mode,
        stop: AtomicBool::new(false),
        latency: Histogram::default(),
        pacing_lag: Histogram::default(),
    });

    let pacer = match &shared.mode {
        Mode::Open {
            schedule, permits, ..
        } => {
            let (schedule, permits) = (*schedule, Arc::clone(permits));
            let handle = std::thread::Builder::new()
                .name("loadgen-pacer".into())
                .spawn(move || run_pacer(start, schedule, &permits, connections))
                .context("spawn the pacer thread")?;
            Some(handle)
        }
        Mode::Closed => None,
    };
    let stopper = {
        let shared = Arc::clone(&shared);
        let deadline = end + config.timeout;
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            shared.stop.store(true, Ordering::Relaxed);
        })
    };
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(run_connection(Arc::clone(&shared))))
        .collect();

    let mut stats = Stats::default();
    for task in tasks {
        stats.merge(task.await.context("a connection task panicked")?);
    }
    stopper.abort();
    if let Some(pacer) = pacer {
        pacer
            .join()
            .map_err(|_| anyhow!("the pacer thread panicked"))?;
    }

    let missed = match &shared.mode {
        Mode::Open { schedule, .. } => {
            (schedule.total() - schedule.warmup_count()).saturating_sub(stats.sent)
        }
        Mode::Closed => 0,
    };
    let duration_s = config.duration.as_secs_f64();
    // Over the window, or longer if requests were still being sent while a backlog drained.
    let elapsed_s = stats
        .last_send
        .map_or(duration_s, |t| (t - warm_end).as_secs_f64().max(duration_s));
    Ok(Report {
        url: config.url.to_string(),
        rate_target: config.rate,
        duration_s,
        warmup_s: config.warmup.as_secs_f64(),
        connections: config.connections,
        threads: config.threads,
        sent: stats.sent,
        ok: stats.ok,
        errors: stats.errors.total(),
        unexpected_status: stats.unexpected_status,
        missed,
        achieved_rps: ((stats.ok + stats.unexpected_status) as f64 / elapsed_s * 10.0).round()
            / 10.0,
        latency_us: LatencySummary::of(&shared.latency),
        pacing_lag_us: matches!(shared.mode, Mode::Open { .. })
            .then(|| LatencySummary::of(&shared.pacing_lag))
            .flatten(),
        error_kinds: stats.errors,
        first_error: stats.first_error,
    })
}

fn summary_line(r: &Report) -> String {
    let target = if r.rate_target > 0.0 {
        format!("open loop {} req/s", r.rate_target)
    } else {
        "closed loop".to_string()
    };
    let mut line = format!(
        "skymesh-loadgen: {} {target}, {} conns, {}s: {} req/s, sent {} ok {} errors {} \
         bad-status {} missed {}",
        r.url,
        r.connections,
        r.duration_s,
        r.achieved_rps,
        r.sent,
        r.ok,
        r.errors,
        r.unexpected_status,
        r.missed
    );
    if let Some(l) = &r.latency_us {
        line += &format!(
            " | latency us p50 {} p90 {} p99 {} p99.9 {} max {} mean {}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
    }
    if let Some(e) = &r.first_error {
        line += &format!(" | first error: {e}");
    }
    line
}

fn main() -> ExitCode {
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("skymesh-loadgen: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run_and_report(config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skymesh-loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the load, prints the report; fails only when the run could not start.
fn run_and_report(config: Config) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .enable_all()
        .build()
        .context("build the tokio runtime")?;
    let report = runtime.block_on(run(config))?;
    println!(
        "{}",
        serde_json::to_string(&report).context("serialize the report")?
    );
    eprintln!("{}", summary_line(&report));
    if report.rate_target > 0.0 && report.achieved_rps < 0.99 * report.rate_target {
        eprintln!(
            "skymesh-loadgen: warning: achieved {} of the {} req/s target; requests queued in the \
             generator and their latency includes that wait",
            report.achieved_rps, report.rate_target
        );
    }
    if report.missed > 0 {
        eprintln!(
            "skymesh-loadgen: warning: {} requests due in the window were never sent; the target \
             rate was not sustained and latencies understate the queueing",
            report.missed
        );
    }
    if report.ok == 0 {
        eprintln!("skymesh-loadgen: no request succeeded");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn headers_and_urls() {
        let (name, value) = parse_header("Content-Type: application/json").expect("valid header");
        assert_eq!(name, header::CONTENT_TYPE);
        assert_eq!(value, "application/json");
        assert!(parse_header("no colon").is_err());
        assert!(parse_url("http://127.0.0.1:8080/v1/models?x=1").is_ok());
        assert!(parse_url("https://127.0.0.1/").is_err());
        assert!(parse_url("/just/a/path").is_err());
        assert!(parse_rate("-5").is_err());
        assert_eq!(parse_rate("0"), Ok(0.0));
    }

    #[test]
    fn config_defaults_method_and_host() {
        let args = Args::try_parse_from([
            "skymesh-loadgen",
            "--url",
            "http://localhost:9000/v1/chat?stream=false",
            "--rate",
            "100",
            "--body",
            "{}",
        ])
        .expect("valid args");
        let config = Config::from_args(args).expect("valid config");
        assert_eq!(config.plan.method, Method::POST);
        assert_eq!(config.plan.path, "/v1/chat?stream=false");
        assert_eq!(config.plan.headers[header::HOST], "localhost:9000");
        assert_eq!((config.host.as_str(), config.port), ("localhost", 9000));
        assert_eq!(config.connections, 32);
    }
}
