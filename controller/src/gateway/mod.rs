//! The AI API gateway: one endpoint for applications' AI calls, sent over the
//! WireGuard fabric to the best healthy upstream (the controller host is a mesh
//! node, so a connection to a VPC address of another cloud rides the tunnel).
//!
//! - [`config`]: `[ai_gateway]`, validated; credentials as [`config::Secret`]s.
//! - [`select`]: the decisions (strategy, residency, breakers, rate limits), sans-IO.
//! - [`upstream`]: guarded connections and the per-upstream HTTP clients.
//! - [`request`]: the path and the model of a request, read as the upstream reads them.
//! - [`proxy`]: the HTTP driver, streaming relay and failover.
//! - [`shard`]: the serving threads, one single-threaded runtime per core.
//! - [`metrics`]: the `skymesh_ai_*` series.
//!
//! It must not touch the store or the netmap: it reads the registry and the
//! path engine's measurements only, to learn which prefixes each site routes
//! and how far each site is.

pub mod config;
pub mod metrics;
pub mod proxy;
pub mod request;
pub mod select;
pub mod shard;
pub mod upstream;

use crate::control::Hub;
use crate::registry::Registry;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use upstream::FabricSnapshot;

pub use proxy::Gateway;

/// An error of the HTTP stack, from either side of the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Locks a gateway mutex; a panic while holding one leaves consistent state
/// (counters, idle lists), so a poisoned lock is taken as is. Here, not in
/// [`proxy`], so that [`upstream`] does not depend on the module that uses it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// How often the gateway refreshes its view of the fabric.
const FABRIC_REFRESH: Duration = Duration::from_secs(2);

/// Binds the listener and starts the gateway and its fabric follower.
pub async fn start(
    config: config::GatewayConfig,
    registry: Arc<Registry>,
    hub: Hub,
    tasks: &mut tokio::task::JoinSet<Result<()>>,
) -> Result<(Arc<Gateway>, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "binding the AI gateway {} ([ai_gateway] listen)",
                config.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let gw = Arc::new(Gateway::new(config)?);
    refresh_fabric(&gw, &registry, &hub).await;
    {
        let gw = gw.clone();
        tasks.spawn(shard::run(listener, gw));
    }
    {
        let gw = gw.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(FABRIC_REFRESH);
            loop {
                tick.tick().await;
                refresh_fabric(&gw, &registry, &hub).await;
            }
        });
    }
    tracing::info!(listen = %addr, "AI gateway up");
    Ok((gw, addr))
}

/// Reads the sites' prefixes from the registry and, from the path engine, the
/// RTT of the current path from this host's node to each site.
async fn refresh_fabric(gw: &Gateway, registry: &Registry, hub: &Hub) {
    let nodes = match registry.nodes().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "AI gateway: reading the nodes failed; keeping the last fabric view");
            return;
        }
    };
    let mut view = FabricSnapshot::default();
    for n in &nodes {
        let p = view.site_prefixes.entry(n.site.clone()).or_default();
        p.extend(n.prefixes.iter().copied());
        p.push(ipnet::IpNet::from(n.overlay_ip));
    }
    let me = gw.current().config.node.clone();
    let snapshot = match &me {
        Some(me) => hub
            .paths(crate::control::PathsQuery {
                refresh: false,
                node: Some(me.clone()),
            })
            .await
            .ok(),
        None => None,
    };
    if let (Some(me), Some(snapshot)) = (me, snapshot) {
        let link_rtt: HashMap<(&str, &str), f64> = snapshot
            .links
            .iter()
            .filter_map(|l| {
                l.rtt_ms
                    .filter(|_| l.usable)
                    .map(|r| ((l.a.as_str(), l.b.as_str()), r))
            })
            .collect();
        let rtt = |x: &str, y: &str| {
            let key = if x < y { (x, y) } else { (y, x) };
            link_rtt.get(&key).copied()
        };
        for pair in &snapshot.pairs {
            let other = if pair.a == me {
                &pair.b
            } else if pair.b == me {
                &pair.a
            } else {
                continue;
            };
            let ms = if pair.primary == skymesh_wire::path::DIRECT {
                rtt(&me, other)
            } else {
                rtt(&me, &pair.primary)
                    .zip(rtt(&pair.primary, other))
                    .map(|(a, b)| a + b)
            };
            let Some(ms) = ms else { continue };
            if let Some(site) = nodes.iter().find(|n| &n.name == other).map(|n| &n.site) {
                view.site_rtt
                    .insert(site.clone(), Duration::from_secs_f64(ms / 1000.0));
            }
        }
    }
    gw.fabric.set(view);
}
