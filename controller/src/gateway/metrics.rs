//! The gateway's Prometheus series (`skymesh_ai_*`), served with the
//! controller's on the API port at /metrics. Counters and histograms are bumped
//! by the proxy; the per-upstream gauges are read from the breakers at scrape
//! time.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::RwLock;

type Labels = Vec<(String, String)>;

/// LLM calls run from milliseconds (embeddings) to minutes (long generations).
const DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

fn histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

#[derive(Clone)]
pub struct AiMetrics {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    ttfb: Family<Labels, Histogram, fn() -> Histogram>,
    failovers: Family<Labels, Counter>,
}

impl Default for AiMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            ttfb: Family::new_with_constructor(histogram),
            failovers: Family::default(),
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Handles on the series of one (route, upstream) pair. They share their
/// values with the families: a bump is a bump of the labelled series, without
/// building and hashing its labels.
pub struct PairSeries {
    route: String,
    upstream: String,
    requests: Family<Labels, Counter>,
    /// Status code → its counter, filled as codes are first seen (a handful).
    by_code: RwLock<Vec<(u16, Counter)>>,
    duration: Histogram,
    ttfb: Histogram,
}

impl PairSeries {
    /// A request answered by this pair's upstream with `code`.
    pub fn request(&self, code: u16) {
        if let Ok(v) = self.by_code.read() {
            if let Some((_, n)) = v.iter().find(|(c, _)| *c == code) {
                n.inc();
                return;
            }
        }
        let n = self
            .requests
            .get_or_create(&labels(&[
                ("route", &self.route),
                ("upstream", &self.upstream),
                ("code", &code.to_string()),
            ]))
            .clone();
        n.inc();
        if let Ok(mut v) = self.by_code.write() {
            if !v.iter().any(|(c, _)| *c == code) {
                v.push((code, n));
            }
        }
    }

    /// From the request's arrival to the last byte of the answer (or its
    /// failure): kept by a request until its answer is over.
    pub fn duration(&self) -> &Histogram {
        &self.duration
    }

    /// From the request's arrival to the response head, failovers included.
    pub fn ttfb(&self, seconds: f64) {
        self.ttfb.observe(seconds);
    }
}

/// One upstream's state for the gauges.
pub struct UpstreamGauge<'a> {
    pub name: &'a str,
    pub up: bool,
    pub circuit_open: bool,
}

impl AiMetrics {
    /// A client request's final status; `upstream` is "none" when refused.
    pub fn request(&self, route: &str, upstream: &str, code: u16) {
        self.requests
            .get_or_create(&labels(&[
                ("route", route),
                ("upstream", upstream),
                ("code", &code.to_string()),
            ]))
            .inc();
    }

    /// The series of one (route, upstream) pair, looked up once so that a
    /// request bumps them without building label sets. The duration and TTFB
    /// series appear in the exposition from here on.
    pub fn pair(&self, route: &str, upstream: &str) -> PairSeries {
        let l = labels(&[("route", route), ("upstream", upstream)]);
        PairSeries {
            route: route.to_string(),
            upstream: upstream.to_string(),
            requests: self.requests.clone(),
            by_code: RwLock::new(Vec::new()),
            duration: self.duration.get_or_create(&l).clone(),
            ttfb: self.ttfb.get_or_create(&l).clone(),
        }
    }

    pub fn failover(&self, route: &str) {
        self.failovers
            .get_or_create(&labels(&[("route", route)]))
            .inc();
    }

    /// The exposition (OpenMetrics, as the encoder writes it).
    /// `connections` holds the open client connections of each shard.
    pub fn render(&self, upstreams: &[UpstreamGauge<'_>], connections: &[usize]) -> String {
        let mut registry = Registry::with_prefix("skymesh_ai");
        registry.register(
            "requests",
            "AI gateway requests by route, the upstream that answered (none: refused) and status code",
            self.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "AI gateway requests from arrival to the last byte of the answer",
            self.duration.clone(),
        );
        registry.register(
            "ttfb_seconds",
            "AI gateway requests from arrival to the response head (failovers included)",
            self.ttfb.clone(),
        );
        registry.register(
            "failovers",
            "Requests moved to the next upstream after a connect error, timeout, 5xx or 429",
            self.failovers.clone(),
        );
        let up = Family::<Labels, Gauge>::default();
        let open = Family::<Labels, Gauge>::default();
        for u in upstreams {
            let l = labels(&[("upstream", u.name)]);
            up.get_or_create(&l).set(i64::from(u.up));
            open.get_or_create(&l).set(i64::from(u.circuit_open));
        }
        registry.register(
            "upstream_up",
            "1 while the upstream's last attempt succeeded (or none failed yet) and its circuit is closed",
            up,
        );
        registry.register(
            "circuit_open",
            "1 while the upstream's circuit breaker is open or half-open",
            open,
        );
        let conns = Family::<Labels, Gauge>::default();
        for (shard, n) in connections.iter().enumerate() {
            conns
                .get_or_create(&labels(&[("shard", &shard.to_string())]))
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        registry.register(
            "client_connections",
            "Client connections open on each serving thread (shard) of the gateway",
            conns,
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_named_as_the_issue_lists_them() {
        let m = AiMetrics::default();
        let p = m.pair("chat", "az");
        p.request(200);
        p.duration().observe(0.2);
        p.ttfb(0.05);
        m.failover("chat");
        let text = skymesh_wire::prom::classic_text(&m.render(
            &[UpstreamGauge {
                name: "az",
                up: true,
                circuit_open: false,
            }],
            &[3, 4],
        ));
        for needle in [
            "skymesh_ai_requests_total{route=\"chat\",upstream=\"az\",code=\"200\"} 1",
            "skymesh_ai_request_duration_seconds_bucket{le=\"0.25\",route=\"chat\",upstream=\"az\"} 1",
            "skymesh_ai_ttfb_seconds_count{route=\"chat\",upstream=\"az\"} 1",
            "skymesh_ai_failovers_total{route=\"chat\"} 1",
            "skymesh_ai_upstream_up{upstream=\"az\"} 1",
            "skymesh_ai_circuit_open{upstream=\"az\"} 0",
            "skymesh_ai_client_connections{shard=\"1\"} 4",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn pair_handles_bump_the_labelled_series() {
        let m = AiMetrics::default();
        let p = m.pair("chat", "az");
        p.request(200);
        p.request(200);
        m.request("chat", "az", 200);
        p.request(503);
        p.ttfb(0.05);
        // Another handle on the same pair (a reload's) shares the values.
        m.pair("chat", "az").ttfb(0.05);
        p.duration().observe(0.2);
        let text = skymesh_wire::prom::classic_text(&m.render(&[], &[]));
        for needle in [
            "skymesh_ai_requests_total{route=\"chat\",upstream=\"az\",code=\"200\"} 3",
            "skymesh_ai_requests_total{route=\"chat\",upstream=\"az\",code=\"503\"} 1",
            "skymesh_ai_ttfb_seconds_count{route=\"chat\",upstream=\"az\"} 2",
            "skymesh_ai_request_duration_seconds_count{route=\"chat\",upstream=\"az\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
