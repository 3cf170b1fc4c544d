//! The agent daemon: wires the sans-IO [`Node`] to its IO drivers (TUN, UDP,
//! netlink, admin socket, metrics) and to the clock.
//!
//! Two pipelines run on dedicated OS threads, each moving a batch per lock of the
//! core: TUN → encrypt → UDP and UDP → decrypt → TUN. They sleep in `poll(2)`, so
//! a packet costs one wakeup per hop (no async-runtime hand-off on the hot path).
//! Timers, the admin socket and metrics run on tokio.

use crate::admin::{self, InterfaceStatus, PeerStatusJson, Status};
use crate::batch::{Transmits, TunWrites, MAX_PACKET};
use crate::config::Config;
use crate::metrics;
use crate::netlink::Netlink;
use crate::node::{DropReason, Event, Node};
use crate::notify::notify;
use crate::tun::Tun;
use crate::udp::Udp;
use anyhow::{bail, Context, Result};
use quinn_udp::RecvMeta;
use rand::RngCore;
use skymesh_wire::NetMap;
use std::io::{self, IoSliceMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Packets read from the TUN per lock of the core.
const TUN_BATCH: usize = 64;
/// recvmmsg slots per call; each can hold a GRO train of up to 64 KiB.
const UDP_BATCH: usize = 16;
const GRO_BUF: usize = 65_536;

struct Shared {
    node: Mutex<Node>,
    tun: Tun,
    udp: Udp,
    timer_wake: Notify,
    config: Config,
}

impl Shared {
    fn node(&self) -> MutexGuard<'_, Node> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.node.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> Status {
        let node = self.node();
        let now = SystemTime::now();
        let peers = node
            .peers()
            .into_iter()
            .map(|p| PeerStatusJson {
                name: p.name,
                public_key: p.public_key.to_string(),
                endpoint: p.endpoint.map(|e| e.to_string()),
                allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                latest_handshake_unix: p
                    .since_handshake
                    .and_then(|d| now.checked_sub(d))
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                rx_bytes: p.counters.rx_bytes,
                tx_bytes: p.counters.tx_bytes,
                rx_packets: p.counters.rx_packets,
                tx_packets: p.counters.tx_packets,
                persistent_keepalive: p.persistent_keepalive,
            })
            .collect();
        Status {
            interface: InterfaceStatus {
                name: self.config.interface.name.clone(),
                public_key: node.public_key().to_string(),
                listen_port: self.config.interface.listen_port,
                address: node.address().map(|a| a.to_string()),
                mtu: self.config.interface.mtu,
            },
            peers,
            drops: node.drops().map(|(r, n)| (r.label().to_string(), n)).collect(),
            handshake_cookie_replies: node.cookie_replies(),
        }
    }

    fn send(&self, tx: &Transmits) {
        let mut failed = 0;
        for (dst, bytes, seg) in tx.runs(self.udp.max_gso_segments()) {
            if let Err(e) = self.udp.send_blocking(dst, bytes, seg) {
                tracing::debug!(%dst, error = %e, "udp send failed");
                failed += bytes.len().div_ceil(seg.max(1));
            }
        }
        if failed > 0 {
            let mut node = self.node();
            for _ in 0..failed {
                node.count_drop(DropReason::SendFailed);
            }
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    let name = config.interface.name.clone();
    let netmap = config.netmap();

    let netlink = Netlink::connect()?;
    let tun = Tun::open(&name).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => anyhow::anyhow!(
            "interface {name} is held by another process (is another skymesh-agent running with this [interface] name?)"
        ),
        Some(libc::EINVAL) => anyhow::anyhow!(
            "interface {name} exists and is not a TUN device; choose another [interface] name or remove it"
        ),
        Some(libc::EPERM) | Some(libc::EACCES) => anyhow::anyhow!(
            "creating TUN interface {name} needs CAP_NET_ADMIN (run as root or via the systemd unit)"
        ),
        _ => anyhow::Error::new(e).context(format!("creating TUN interface {name}")),
    })?;
    let Some(index) = netlink.link_index(&name).await? else {
        bail!("TUN interface {name} vanished right after creation");
    };
    netlink
        .configure(index, netmap.address, netmap.mtu)
        .await
        .with_context(|| format!("configuring interface {name}"))?;

    let udp = Udp::bind(config.interface.listen_port).map_err(|e| {
        anyhow::anyhow!(
            "cannot bind UDP port {} ({e}); is another WireGuard listening there? Set [interface] listen_port",
            config.interface.listen_port
        )
    })?;
    let key = config.interface.private_key.clone();
    let mut node = Node::new(key, rand::rngs::OsRng.next_u64(), Instant::now());
    let diff = node.apply(&netmap, Instant::now())?;
    for net in &diff.routes_added {
        netlink.add_route(index, *net).await?;
    }

    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let admin_listener = admin::bind(&config.admin_socket).await?;
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding metrics listener {} ([metrics] listen)", config.metrics_listen))?;

    let shared = Arc::new(Shared {
        node: Mutex::new(node),
        tun,
        udp,
        timer_wake: Notify::new(),
        config: config.clone(),
    });

    tracing::info!(
        interface = %name,
        public_key = %shared.node().public_key(),
        listen_port = config.interface.listen_port,
        address = %netmap.address,
        peers = netmap.peers.len(),
        "skymesh-agent up"
    );

    let mut tasks = tokio::task::JoinSet::new();
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Error>();
    for (name, pipeline) in [("skymesh-tun-rx", tun_to_udp as fn(&Shared) -> Result<()>), ("skymesh-udp-rx", udp_to_tun)] {
        let s = shared.clone();
        let fatal = fatal_tx.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let err = match pipeline(&s) {
                    Ok(()) => anyhow::anyhow!("{name} stopped"),
                    Err(e) => e,
                };
                let _ = fatal.send(err);
            })
            .context("starting a data-plane thread")?;
    }
    tasks.spawn(timers(shared.clone()));
    {
        let s = shared.clone();
        tasks.spawn(async move {
            admin::serve(admin_listener, move || s.status()).await;
            Ok(())
        });
    }
    {
        let s = shared.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let s = s.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        metrics::render(&s.status()),
                    )
                }
            }),
        );
        tasks.spawn(async move {
            axum::serve(metrics_listener, app).await.context("metrics server")
        });
    }
    notify("READY=1");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
        Some(err) = fatal_rx.recv() => Err(err),
        Some(res) = tasks.join_next() => match res {
            Ok(Ok(())) => Err(anyhow::anyhow!("a pipeline stopped unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("a pipeline panicked: {e}")),
        },
    };
    notify("STOPPING=1");
    tasks.abort_all();
    if let Err(e) = netlink.delete_link(index).await {
        tracing::warn!(error = %e, "could not delete the interface; it goes away with this process");
    }
    let _ = std::fs::remove_file(&config.admin_socket);
    outcome
}

/// Applies a netmap to a running node and mirrors route changes in the kernel.
/// (Static mode applies once at start; the controller client calls this later.)
pub async fn apply(node: &Mutex<Node>, netlink: &Netlink, index: u32, map: &NetMap) -> Result<()> {
    let diff = {
        let mut n = node.lock().unwrap_or_else(|e| e.into_inner());
        n.apply(map, Instant::now())?
    };
    for net in &diff.routes_removed {
        netlink.del_route(index, *net).await?;
    }
    for net in &diff.routes_added {
        netlink.add_route(index, *net).await?;
    }
    Ok(())
}

fn tun_to_udp(s: &Shared) -> Result<()> {
    let mut bufs = vec![vec![0u8; MAX_PACKET]; TUN_BATCH];
    let mut lens = [0usize; TUN_BATCH];
    let mut tx = Transmits::with_capacity(TUN_BATCH);
    loop {
        let mut n = 0;
        while n < TUN_BATCH {
            match s.tun.read(&mut bufs[n]) {
                Ok(len) => {
                    lens[n] = len;
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading from the TUN device"),
            }
        }
        if n == 0 {
            crate::udp::wait(&s.tun, libc::POLLIN).context("waiting on the TUN device")?;
            continue;
        }
        {
            let mut node = s.node();
            let now = Instant::now();
            for i in 0..n {
                node.handle_tun_packet(&bufs[i][..lens[i]], &mut tx, now);
            }
        }
        s.send(&tx);
        tx.clear();
    }
}

fn udp_to_tun(s: &Shared) -> Result<()> {
    let mut storage = vec![vec![0u8; GRO_BUF]; UDP_BATCH];
    let mut meta = vec![RecvMeta::default(); UDP_BATCH];
    let mut tun_out = TunWrites::with_capacity(UDP_BATCH * 4);
    let mut tx = Transmits::with_capacity(8);
    loop {
        let n = {
            let mut slices: [IoSliceMut<'_>; UDP_BATCH] = {
                let mut it = storage.iter_mut();
                std::array::from_fn(|_| IoSliceMut::new(it.next().map(|b| b.as_mut_slice()).unwrap_or(&mut [])))
            };
            s.udp.recv_blocking(&mut slices, &mut meta).context("receiving from the UDP socket")?
        };
        {
            let mut node = s.node();
            let now = Instant::now();
            for (m, buf) in meta[..n].iter().zip(&storage) {
                let stride = if m.stride == 0 { m.len } else { m.stride };
                for datagram in buf[..m.len].chunks(stride.max(1)) {
                    node.handle_datagram(m.addr, datagram, &mut tun_out, &mut tx, now);
                }
            }
            while let Some(event) = node.poll_event() {
                log_event(&event);
            }
        }
        let mut tun_failed = 0;
        for ((), packet) in tun_out.iter() {
            if let Err(e) = s.tun.write(packet) {
                tracing::debug!(error = %e, "tun write failed");
                tun_failed += 1;
            }
        }
        if tun_failed > 0 {
            let mut node = s.node();
            for _ in 0..tun_failed {
                node.count_drop(DropReason::TunWriteFailed);
            }
        }
        tun_out.clear();
        if !tx.is_empty() {
            s.send(&tx);
            tx.clear();
        }
    }
}

async fn timers(s: Arc<Shared>) -> Result<()> {
    let mut tx = Transmits::with_capacity(8);
    loop {
        let deadline = s.node().poll_timeout();
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = s.timer_wake.notified() => {}
        }
        {
            let mut node = s.node();
            node.handle_timeout(Instant::now(), &mut tx);
            while let Some(event) = node.poll_event() {
                log_event(&event);
            }
        }
        if !tx.is_empty() {
            s.send(&tx);
            tx.clear();
        }
    }
}

fn log_event(event: &Event) {
    match event {
        Event::EndpointChanged { peer, from, to } => {
            tracing::info!(peer = %peer, from = ?from, to = %to, "peer endpoint changed")
        }
        Event::SessionExpired { peer } => tracing::info!(peer = %peer, "session expired"),
    }
}
