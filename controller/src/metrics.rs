//! Prometheus exposition of the controller at GET /metrics on the API port.
//! Event counters are atomics bumped where the events happen; everything else
//! (nodes, prefixes, refusals) is read from the store at scrape time, so every
//! replica reports the same state.

use crate::store::records::NodeRecord;
use crate::store::StoreStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

type Labels = Vec<(String, String)>;

#[derive(Debug, Default)]
pub struct Metrics {
    pub enrollments_ok: AtomicU64,
    pub enrollments_refused: AtomicU64,
    pub updates_sent: AtomicU64,
    /// Bytes of netmaps and updates written to agents' streams.
    pub netmap_bytes_sent: AtomicU64,
    /// Pairs of nodes whose path was decided again (incremental recomputes).
    pub path_decisions: AtomicU64,
    pub agents_connected: AtomicI64,
    pub api_requests_unauthorized: AtomicU64,
    /// The state store's own counters (writability, write errors, corrupt records).
    pub store: Option<Arc<StoreStats>>,
}

impl Metrics {
    /// Renders the counters and the store-derived gauges.
    pub fn render(&self, nodes: &[NodeRecord]) -> String {
        let mut registry = Registry::with_prefix("skymesh_controller");

        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )])
            .set(1);
        registry.register("build_info", "skymesh-controller build information", build);

        let enroll = Family::<Labels, Counter>::default();
        enroll
            .get_or_create(&vec![("result".into(), "ok".into())])
            .inc_by(self.enrollments_ok.load(Ordering::Relaxed));
        enroll
            .get_or_create(&vec![("result".into(), "refused".into())])
            .inc_by(self.enrollments_refused.load(Ordering::Relaxed));
        registry.register("enrollments", "Enrollment attempts by result", enroll);

        let updates = Counter::<u64>::default();
        updates.inc_by(self.updates_sent.load(Ordering::Relaxed));
        registry.register(
            "netmap_frames_sent",
            "Netmaps and netmap updates written to agents (merged updates count once)",
            updates,
        );
        let bytes = Counter::<u64>::default();
        bytes.inc_by(self.netmap_bytes_sent.load(Ordering::Relaxed));
        registry.register(
            "netmap_bytes_sent",
            "Bytes of netmaps and netmap updates written to agents",
            bytes,
        );
        let decisions = Counter::<u64>::default();
        decisions.inc_by(self.path_decisions.load(Ordering::Relaxed));
        registry.register(
            "path_decisions",
            "Pairs of nodes whose path was decided again because an input changed",
            decisions,
        );

        let connected = Gauge::<i64>::default();
        connected.set(self.agents_connected.load(Ordering::Relaxed));
        registry.register(
            "agents_connected",
            "Agents with an open control session to this controller",
            connected,
        );

        let unauthorized = Counter::<u64>::default();
        unauthorized.inc_by(self.api_requests_unauthorized.load(Ordering::Relaxed));
        registry.register(
            "api_unauthorized_requests",
            "REST API requests refused for a missing or wrong bearer token",
            unauthorized,
        );

        let node_count = Gauge::<i64>::default();
        node_count.set(nodes.len() as i64);
        registry.register("nodes", "Enrolled nodes", node_count);

        let rejected = Family::<Labels, Gauge>::default();
        for n in nodes {
            for r in &n.rejected_prefixes {
                rejected
                    .get_or_create(&vec![
                        ("node".to_string(), n.name.clone()),
                        ("prefix".to_string(), r.cidr.to_string()),
                    ])
                    .set(1);
            }
        }
        registry.register(
            "rejected_prefixes",
            "Advertised prefixes refused by IPAM (1 per refused prefix)",
            rejected,
        );

        if let Some(stats) = &self.store {
            register_store(&mut registry, stats);
        }

        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// The store's series: whether it takes writes, its write failures, and its corrupt records.
fn register_store(registry: &mut Registry, stats: &StoreStats) {
    let writable = Gauge::<i64>::default();
    writable.set(i64::from(stats.is_writable()));
    registry.register(
        "store_writable",
        "1 while the state store takes writes, 0 after a failed write until one succeeds",
        writable,
    );
    let errors = Counter::<u64>::default();
    errors.inc_by(stats.write_errors());
    registry.register(
        "store_write_errors",
        "State store writes that failed in the backend (full disk, I/O error)",
        errors,
    );
    let corrupt = Counter::<u64>::default();
    corrupt.inc_by(stats.corrupt_reads());
    registry.register(
        "store_corrupt_records",
        "Reads of state store records that failed their checksum (left out of listings)",
        corrupt,
    );
    let keys = Family::<Labels, Gauge>::default();
    for key in stats.corrupt_keys() {
        keys.get_or_create(&vec![("key".to_string(), key)]).set(1);
    }
    registry.register(
        "store_corrupt_record",
        "1 for each state store key whose record failed its checksum",
        keys,
    );
}
