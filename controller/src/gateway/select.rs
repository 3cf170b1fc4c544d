//! The gateway's decisions, without IO or clocks: which upstreams a request may
//! use and in what order (strategy, residency, health), each upstream's circuit
//! breaker and time-to-first-byte figure, and each client key's rate limit.
//! The proxy driver feeds in `now`, the fabric RTTs and a random number.

use super::config::{BreakerConfig, GatewayConfig, RouteConfig, Strategy};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Circuit breaker state of one upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    /// Refusing requests until `until`.
    Open {
        until: Instant,
    },
    /// One probe request is out; others wait for its outcome (or, if it never
    /// reports, for `open_for` after it started).
    HalfOpen {
        probe_since: Instant,
    },
}

/// Health of one upstream: its breaker and its observed time to first byte.
#[derive(Debug, Clone)]
pub struct Health {
    circuit: Circuit,
    consecutive_failures: u32,
    ttfb: Newest,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            circuit: Circuit::Closed,
            consecutive_failures: 0,
            ttfb: Newest::default(),
        }
    }
}

/// How many of an upstream's newest answers its time-to-first-byte figure is
/// the median of. The figure is the upstream's own part: each answer's time to
/// first byte less the fabric RTT when it was sent (the proxy subtracts it),
/// since the ranking adds the path's current RTT apart and must not count it
/// twice.
const TTFB_SAMPLES: usize = 5;
/// The figure counts from this many fresh answers on: it then takes a majority
/// of slow answers (2 of 3, 3 of 4 or 5), never a single one (a hiccup anywhere
/// on the way), to move traffic. With fewer, the fabric RTT alone ranks.
const TTFB_MIN_SAMPLES: usize = 3;
/// Older answers no longer count. An upstream that lost traffic by answering
/// slowly gets no new answers while others are chosen: after this its figure
/// is gone, the fabric RTT alone ranks it, and it is tried again.
pub const TTFB_MAX_AGE: Duration = Duration::from_secs(60);

/// The newest [`TTFB_SAMPLES`] times to first byte with when they were taken,
/// in a ring.
#[derive(Debug, Clone, Default)]
struct Newest {
    samples: [Option<(Instant, Duration)>; TTFB_SAMPLES],
    next: usize,
}

impl Newest {
    fn push(&mut self, at: Instant, sample: Duration) {
        self.samples[self.next] = Some((at, sample));
        self.next = (self.next + 1) % TTFB_SAMPLES;
    }

    /// The median of those at most [`TTFB_MAX_AGE`] old at `now`, if there are
    /// [`TTFB_MIN_SAMPLES`]; of an even count, the lower middle one.
    fn median(&self, now: Instant) -> Option<Duration> {
        let mut fresh = [Duration::ZERO; TTFB_SAMPLES];
        let mut n = 0;
        for (at, sample) in self.samples.iter().flatten() {
            if now.saturating_duration_since(*at) <= TTFB_MAX_AGE {
                fresh[n] = *sample;
                n += 1;
            }
        }
        if n < TTFB_MIN_SAMPLES {
            return None;
        }
        let fresh = &mut fresh[..n];
        fresh.sort_unstable();
        fresh.get((n - 1) / 2).copied()
    }
}

impl Health {
    pub fn circuit(&self) -> Circuit {
        self.circuit
    }

    /// Open or half-open: the metric `skymesh_ai_circuit_open`.
    pub fn is_open(&self) -> bool {
        self.circuit != Circuit::Closed
    }

    /// Closed, and the last attempt (if any) did not fail: `skymesh_ai_upstream_up`.
    pub fn is_up(&self) -> bool {
        self.circuit == Circuit::Closed && self.consecutive_failures == 0
    }

    /// The upstream's own time to first byte at `now`: the median of its newest
    /// answers (see `TTFB_SAMPLES` and `TTFB_MAX_AGE`).
    pub fn ttfb(&self, now: Instant) -> Option<Duration> {
        self.ttfb.median(now)
    }

    /// Whether a request could be sent now (without taking the probe slot).
    pub fn available(&self, now: Instant, cfg: &BreakerConfig) -> bool {
        match self.circuit {
            Circuit::Closed => true,
            Circuit::Open { until } => now >= until,
            Circuit::HalfOpen { probe_since } => now >= probe_since + cfg.open_for,
        }
    }

    /// Takes permission to send a request now; an expired open circuit turns
    /// half-open and this request is its probe.
    pub fn acquire(&mut self, now: Instant, cfg: &BreakerConfig) -> bool {
        if !self.available(now, cfg) {
            return false;
        }
        if self.circuit != Circuit::Closed {
            self.circuit = Circuit::HalfOpen { probe_since: now };
        }
        true
    }

    /// An answer that is no failure, at `now`: `ttfb` is the upstream's own
    /// time to first byte (the wait less the fabric RTT).
    pub fn on_success(&mut self, now: Instant, ttfb: Duration) {
        self.circuit = Circuit::Closed;
        self.consecutive_failures = 0;
        self.ttfb.push(now, ttfb);
    }

    /// Returns true when this failure opened the circuit.
    pub fn on_failure(&mut self, now: Instant, cfg: &BreakerConfig) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let open = match self.circuit {
            Circuit::HalfOpen { .. } => true,
            Circuit::Closed => self.consecutive_failures >= cfg.failures,
            Circuit::Open { .. } => false,
        };
        if open {
            self.circuit = Circuit::Open {
                until: now + cfg.open_for,
            };
        }
        open
    }
}

/// A token bucket per client key: `rpm` tokens, refilled continuously.
#[derive(Debug, Clone)]
pub struct RateLimit {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub fn new(rpm: u32, now: Instant) -> Self {
        Self {
            tokens: rpm as f64,
            at: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, rpm: u32, now: Instant) -> Result<(), Duration> {
        let per_sec = rpm as f64 / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(rpm as f64);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_sec))
        }
    }
}

/// Why an upstream of the route was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excluded {
    Region { allowed: BTreeSet<String> },
    Model,
    CircuitOpen,
}

/// The outcome of choosing upstreams for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// Upstream indexes to try, in order.
    Try(Vec<usize>),
    /// Nothing is both allowed and healthy: refuse, with the reason per upstream.
    Refuse {
        /// A residency restriction was in force: the gateway answers 403.
        residency: bool,
        /// (upstream, why) for every upstream of the route.
        excluded: Vec<(usize, Excluded)>,
    },
}

/// The inputs of one choice besides the config.
pub struct Request<'a> {
    pub route: &'a RouteConfig,
    pub model: Option<&'a str>,
    /// Regions the client's `x-skymesh-residency` header allows.
    pub residency: Option<&'a BTreeSet<String>>,
    /// Per upstream index: fabric RTT from this host to the upstream's site.
    pub fabric_rtt: &'a dyn Fn(usize) -> Option<Duration>,
    /// Uniform in [0, 1): the weighted strategy's draw.
    pub draw: f64,
    pub now: Instant,
}

/// Orders the route's upstreams for a request. See the module docs.
pub fn choose(cfg: &GatewayConfig, health: &[Health], req: &Request<'_>) -> Choice {
    let route = req.route;
    let allowed: Option<BTreeSet<String>> = match (&route.allowed_regions, req.residency) {
        (None, None) => None,
        (Some(r), None) => Some(r.clone()),
        (None, Some(h)) => Some(h.clone()),
        (Some(r), Some(h)) => Some(r.intersection(h).cloned().collect()),
    };
    let mut ok: Vec<(usize, u32)> = Vec::new();
    let mut excluded = Vec::new();
    for (pos, &u) in route.upstreams.iter().enumerate() {
        let up = &cfg.upstreams[u];
        let weight = route.weights.get(pos).copied().unwrap_or(1);
        if let Some(a) = &allowed {
            if !a.contains(&up.region) {
                excluded.push((u, Excluded::Region { allowed: a.clone() }));
                continue;
            }
        }
        if !up.serves(req.model) {
            excluded.push((u, Excluded::Model));
            continue;
        }
        if !health[u].available(req.now, &cfg.breaker) {
            excluded.push((u, Excluded::CircuitOpen));
            continue;
        }
        if route.strategy == Strategy::Weighted && weight == 0 {
            continue;
        }
        ok.push((u, weight));
    }
    if ok.is_empty() {
        return Choice::Refuse {
            residency: allowed.is_some(),
            excluded,
        };
    }
    let order = match route.strategy {
        Strategy::Priority => ok.into_iter().map(|(u, _)| u).collect(),
        Strategy::LowestLatency => {
            let score = |u: usize| {
                (req.fabric_rtt)(u).unwrap_or_default()
                    + health[u].ttfb(req.now).unwrap_or_default()
            };
            // Stable: equal scores keep the listed order.
            ok.sort_by_key(|&(u, _)| score(u));
            ok.into_iter().map(|(u, _)| u).collect()
        }
        Strategy::Weighted => {
            let total: u64 = ok.iter().map(|&(_, w)| w as u64).sum();
            let mut point = req.draw.clamp(0.0, 1.0) * total as f64;
            let mut first = ok.len() - 1;
            for (i, &(_, w)) in ok.iter().enumerate() {
                if point < w as f64 {
                    first = i;
                    break;
                }
                point -= w as f64;
            }
            let head = ok.remove(first);
            ok.sort_by_key(|&(_, w)| std::cmp::Reverse(w));
            std::iter::once(head.0)
                .chain(ok.into_iter().map(|(u, _)| u))
                .collect()
        }
    };
    Choice::Try(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::config::{Kind, UpstreamConfig};

    fn up(name: &str, region: &str, models: &[&str]) -> UpstreamConfig {
        UpstreamConfig {
            name: name.into(),
            kind: Kind::OpenAi,
            site: name.into(),
            region: region.into(),
            base_url: "http://10.0.0.1/v1".parse().expect("uri"),
            public: false,
            credential: None,
            models: models.iter().map(|s| s.to_string()).collect(),
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            ca_file: None,
        }
    }

    fn config(strategy: Strategy, weights: Vec<u32>) -> GatewayConfig {
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
                failures: 2,
                open_for: Duration::from_secs(10),
            },
            upstreams: vec![
                up("az", "eastasia", &[]),
                up("ali", "cn-shanghai", &["qwen"]),
                up("gcp", "us-west1", &[]),
            ],
            routes: vec![RouteConfig {
                name: "chat".into(),
                path_prefix: "/v1".into(),
                models: vec![],
                strategy,
                upstreams: vec![0, 1, 2],
                weights,
                allowed_regions: None,
            }],
            keys: vec![],
        }
    }

    fn pick(
        cfg: &GatewayConfig,
        health: &[Health],
        model: Option<&str>,
        residency: Option<&BTreeSet<String>>,
        rtt: &dyn Fn(usize) -> Option<Duration>,
        draw: f64,
        now: Instant,
    ) -> Choice {
        choose(
            cfg,
            health,
            &Request {
                route: &cfg.routes[0],
                model,
                residency,
                fabric_rtt: rtt,
                draw,
                now,
            },
        )
    }

    fn none(_: usize) -> Option<Duration> {
        None
    }

    #[test]
    fn priority_keeps_order_and_skips_models_and_open_circuits() {
        let cfg = config(Strategy::Priority, vec![]);
        let now = Instant::now();
        let mut h = vec![Health::default(); 3];
        assert_eq!(
            pick(&cfg, &h, Some("gpt"), None, &none, 0.0, now),
            Choice::Try(vec![0, 2])
        );
        assert_eq!(
            pick(&cfg, &h, Some("qwen"), None, &none, 0.0, now),
            Choice::Try(vec![0, 1, 2])
        );
        assert!(!h[0].on_failure(now, &cfg.breaker));
        assert!(h[0].on_failure(now, &cfg.breaker));
        assert_eq!(
            pick(&cfg, &h, Some("qwen"), None, &none, 0.0, now),
            Choice::Try(vec![1, 2])
        );
    }

    #[test]
    fn lowest_latency_adds_fabric_rtt_and_ttfb() {
        let cfg = config(Strategy::LowestLatency, vec![]);
        let now = Instant::now();
        let mut h = vec![Health::default(); 3];
        let rtt = |u: usize| Some(Duration::from_millis([150, 30, 20][u]));
        assert_eq!(
            pick(&cfg, &h, None, None, &rtt, 0.0, now),
            Choice::Try(vec![2, 1, 0])
        );
        let ms = Duration::from_millis;
        // gcp answers slowly, but two answers are too few to count yet.
        h[2].on_success(now, ms(200));
        h[2].on_success(now, ms(200));
        assert_eq!(h[2].ttfb(now), None);
        assert_eq!(
            pick(&cfg, &h, None, None, &rtt, 0.0, now),
            Choice::Try(vec![2, 1, 0])
        );
        // A third: 200 ms to first byte outweighs its short path.
        h[2].on_success(now, ms(200));
        for _ in 0..3 {
            h[1].on_success(now, ms(40));
        }
        assert_eq!(h[2].ttfb(now), Some(ms(200)));
        assert_eq!(
            pick(&cfg, &h, None, None, &rtt, 0.0, now),
            Choice::Try(vec![1, 0, 2])
        );
        // Fast again: the median follows once fast answers are the majority of
        // the newest five ([200, 200, 200, 10] and [.., 12] are still slow).
        h[2].on_success(now, ms(10));
        h[2].on_success(now, ms(12));
        assert_eq!(h[2].ttfb(now), Some(ms(200)));
        h[2].on_success(now, ms(11));
        assert_eq!(h[2].ttfb(now), Some(ms(12)));
        assert_eq!(
            pick(&cfg, &h, None, None, &rtt, 0.0, now),
            Choice::Try(vec![2, 1, 0])
        );
        // One slow answer among fast ones moves nothing: [11, 350, 200, 10, 12],
        // then [11, 350, 9, 10, 12].
        h[2].on_success(now, ms(350));
        h[2].on_success(now, ms(9));
        assert_eq!(
            h[2].ttfb(now),
            Some(ms(11)),
            "one slow answer among fast ones"
        );
        // Slow again, and then chosen no more: a minute on, its answers no
        // longer count, the fabric RTT alone ranks it, and it leads again.
        for _ in 0..3 {
            h[2].on_success(now, ms(300));
        }
        assert_eq!(
            pick(&cfg, &h, None, None, &rtt, 0.0, now),
            Choice::Try(vec![1, 0, 2])
        );
        let later = now + TTFB_MAX_AGE + ms(1);
        assert_eq!(h[2].ttfb(later), None);
        assert_eq!(
            pick(&cfg, &h, None, None, &rtt, 0.0, later),
            Choice::Try(vec![2, 1, 0])
        );
    }

    #[test]
    fn weighted_draws_the_first_and_fails_over_by_weight() {
        let cfg = config(Strategy::Weighted, vec![1, 3, 0]);
        let now = Instant::now();
        let h = vec![Health::default(); 3];
        let q = Some("qwen");
        assert_eq!(
            pick(&cfg, &h, q, None, &none, 0.1, now),
            Choice::Try(vec![0, 1])
        );
        assert_eq!(
            pick(&cfg, &h, q, None, &none, 0.3, now),
            Choice::Try(vec![1, 0])
        );
        assert_eq!(
            pick(&cfg, &h, q, None, &none, 0.99, now),
            Choice::Try(vec![1, 0])
        );
        // Over many draws the split is 1:3.
        let firsts: usize = (0..1000)
            .filter(|i| {
                pick(&cfg, &h, q, None, &none, *i as f64 / 1000.0, now) == Choice::Try(vec![1, 0])
            })
            .count();
        assert_eq!(firsts, 750);
    }

    #[test]
    fn residency_intersects_route_and_header_and_refuses_with_reasons() {
        let mut cfg = config(Strategy::Priority, vec![]);
        cfg.routes[0].allowed_regions = Some(["eastasia", "cn-shanghai"].map(String::from).into());
        let now = Instant::now();
        let mut h = vec![Health::default(); 3];
        assert_eq!(
            pick(&cfg, &h, Some("qwen"), None, &none, 0.0, now),
            Choice::Try(vec![0, 1])
        );
        let header: BTreeSet<String> = ["cn-shanghai".to_string()].into();
        assert_eq!(
            pick(&cfg, &h, Some("qwen"), Some(&header), &none, 0.0, now),
            Choice::Try(vec![1])
        );
        // The only allowed upstream is down: refuse rather than leave the region.
        h[1].on_failure(now, &cfg.breaker);
        h[1].on_failure(now, &cfg.breaker);
        match pick(&cfg, &h, Some("qwen"), Some(&header), &none, 0.0, now) {
            Choice::Refuse {
                residency,
                excluded,
            } => {
                assert!(residency);
                assert_eq!(excluded[1], (1, Excluded::CircuitOpen));
                assert!(matches!(excluded[0], (0, Excluded::Region { .. })));
                assert!(matches!(excluded[2], (2, Excluded::Region { .. })));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn breaker_opens_then_lets_one_probe_through() {
        let cfg = BreakerConfig {
            failures: 3,
            open_for: Duration::from_secs(10),
        };
        let mut now = Instant::now();
        let mut h = Health::default();
        assert!(!h.on_failure(now, &cfg));
        h.on_success(now, Duration::from_millis(5));
        assert!(!h.on_failure(now, &cfg));
        assert!(!h.on_failure(now, &cfg));
        assert!(h.on_failure(now, &cfg), "third consecutive failure opens");
        assert!(h.is_open());
        assert!(!h.acquire(now, &cfg));
        now += Duration::from_secs(10);
        assert!(h.acquire(now, &cfg), "the half-open probe");
        assert!(!h.acquire(now, &cfg), "only one probe at a time");
        assert!(h.on_failure(now, &cfg), "a failed probe reopens at once");
        assert!(!h.acquire(now + Duration::from_secs(9), &cfg));
        now += Duration::from_secs(10);
        assert!(h.acquire(now, &cfg));
        h.on_success(now, Duration::from_millis(5));
        assert_eq!(h.circuit(), Circuit::Closed);
        assert!(h.acquire(now, &cfg) && h.acquire(now, &cfg));
        // A probe that never reports frees the slot after open_for.
        for _ in 0..3 {
            h.on_failure(now, &cfg);
        }
        now += Duration::from_secs(10);
        assert!(h.acquire(now, &cfg));
        assert!(!h.acquire(now + Duration::from_secs(5), &cfg));
        assert!(h.acquire(now + Duration::from_secs(10), &cfg));
    }

    #[test]
    fn rate_limit_allows_rpm_then_refills() {
        let now = Instant::now();
        let mut r = RateLimit::new(60, now);
        for _ in 0..60 {
            assert!(r.take(60, now).is_ok());
        }
        let wait = r.take(60, now).expect_err("61st in the same instant");
        assert!(wait <= Duration::from_secs(1) && wait > Duration::from_millis(900));
        assert!(r.take(60, now + Duration::from_secs(1)).is_ok());
        assert!(r.take(60, now + Duration::from_secs(1)).is_err());
    }
}
