//! The agent daemon: wires the sans-IO [`Node`] to its IO drivers (TUN, UDP,
//! netlink, admin socket, metrics) and to the clock.
//!
//! The data plane is one dedicated OS thread that sleeps in `epoll` on the TUN
//! device and the UDP socket and moves a batch per lock of the core in each
//! direction: TUN → encrypt → UDP and UDP → decrypt → TUN. One thread per agent
//! keeps request/response traffic on one CPU: the reply the kernel produces while
//! we write a packet to the TUN is read back without another thread's wakeup.
//! Timers, the admin socket and metrics run on tokio.

use crate::admin::{self, InterfaceStatus, PeerStatusJson, Status};
use crate::batch::{Transmits, TunWrites, MAX_PACKET};
use crate::config::Config;
use crate::metrics;
use crate::netlink::Netlink;
use crate::node::{DropReason, Event, Node};
use crate::notify::notify;
use crate::poller::Poller;
use crate::tun::Tun;
use crate::udp::Udp;
use anyhow::{bail, Context, Result};
use quinn_udp::RecvMeta;
use rand::RngCore;
use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Packets read from the TUN per lock of the core.
const TUN_BATCH: usize = 64;
/// recvmmsg slots per call; each can hold a GRO train of up to 64 KiB.
const UDP_BATCH: usize = 16;
const GRO_BUF: usize = 65_536;

struct Shared {
    node: Mutex<Node>,
    tun: Tun,
    udp: Udp,
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
            drops: node
                .drops()
                .map(|(r, n)| (r.label().to_string(), n))
                .collect(),
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
            self.node()
                .count_drops(DropReason::SendFailed, failed as u64);
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    // First, so that a stop request during start-up is not fatal by default: it is
    // honoured once start-up finished, with the normal cleanup.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
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
    // Removes the socket file however this function returns.
    let _admin_file = RemoveOnDrop(config.admin_socket.clone());
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "binding metrics listener {} ([metrics] listen)",
                config.metrics_listen
            )
        })?;

    let shared = Arc::new(Shared {
        node: Mutex::new(node),
        tun,
        udp,
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
    {
        let name = "skymesh-dataplane";
        let s = shared.clone();
        let fatal = fatal_tx.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let err = match dataplane(&s) {
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
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics::render(&s.status()),
                    )
                }
            }),
        );
        tasks.spawn(async move {
            axum::serve(metrics_listener, app)
                .await
                .context("metrics server")
        });
    }
    notify("READY=1");

    let outcome = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
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
    outcome
}

/// Deletes a file when dropped (the admin socket, on every exit path).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Buffers of the data-plane thread, allocated once.
struct Buffers {
    tun_in: Vec<Vec<u8>>,
    tun_lens: [usize; TUN_BATCH],
    udp_in: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    tun_out: TunWrites,
    tx: Transmits,
}

fn dataplane(s: &Shared) -> Result<()> {
    let mut b = Buffers {
        tun_in: vec![vec![0u8; MAX_PACKET]; TUN_BATCH],
        tun_lens: [0; TUN_BATCH],
        udp_in: vec![vec![0u8; GRO_BUF]; UDP_BATCH],
        meta: vec![RecvMeta::default(); UDP_BATCH],
        tun_out: TunWrites::with_capacity(UDP_BATCH * 4),
        tx: Transmits::with_capacity(TUN_BATCH),
    };
    let poller =
        Poller::new(s.tun.as_raw_fd(), s.udp.as_raw_fd()).context("creating the epoll set")?;
    loop {
        // The epoll set is level-triggered: it reports a side again at once while
        // packets remain, so one batch per ready side and back to the wait costs
        // fewer syscalls than probing each side until it would block. Syscalls
        // are the dominant per-packet cost here, and on a busy machine time
        // spent after a send delays the peer's wakeup on the same CPU.
        let ready = poller.wait().context("waiting for packets")?;
        let from_udp = ready.udp && udp_batch(s, &mut b)?;
        // After writing to the TUN, look at it at once: the kernel often answers
        // right away (an echo reply, a TCP ACK) and that answer is latency-critical.
        if ready.tun || from_udp {
            tun_batch(s, &mut b)?;
        }
    }
}

/// Moves one batch TUN → encrypt → UDP; false when the TUN had nothing.
///
/// The first packet leaves at once, before we learn (by a read that would
/// block) whether more are queued: a lone packet is latency-bound, and under
/// load the rest of the batch still goes out together.
fn tun_batch(s: &Shared, b: &mut Buffers) -> Result<bool> {
    match read_tun(s, &mut b.tun_in[0])? {
        None => return Ok(false),
        Some(len) => {
            s.node()
                .handle_tun_packet(&b.tun_in[0][..len], &mut b.tx, Instant::now());
            s.send(&b.tx);
            b.tx.clear();
        }
    }
    let mut n = 0;
    while n < TUN_BATCH {
        match read_tun(s, &mut b.tun_in[n])? {
            Some(len) => {
                b.tun_lens[n] = len;
                n += 1;
            }
            None => break,
        }
    }
    if n == 0 {
        return Ok(true);
    }
    {
        let mut node = s.node();
        let now = Instant::now();
        for i in 0..n {
            node.handle_tun_packet(&b.tun_in[i][..b.tun_lens[i]], &mut b.tx, now);
        }
    }
    s.send(&b.tx);
    b.tx.clear();
    Ok(true)
}

fn read_tun(s: &Shared, buf: &mut [u8]) -> Result<Option<usize>> {
    loop {
        match s.tun.read(buf) {
            Ok(len) => return Ok(Some(len)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e).context("reading from the TUN device"),
        }
    }
}

/// Moves one batch UDP → decrypt → TUN; false when the socket had nothing.
fn udp_batch(s: &Shared, b: &mut Buffers) -> Result<bool> {
    let n = {
        let mut slices: [IoSliceMut<'_>; UDP_BATCH] = {
            let mut it = b.udp_in.iter_mut();
            std::array::from_fn(|_| {
                IoSliceMut::new(it.next().map(|v| v.as_mut_slice()).unwrap_or(&mut []))
            })
        };
        match s.udp.try_recv(&mut slices, &mut b.meta) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e).context("receiving from the UDP socket"),
        }
    };
    {
        let mut node = s.node();
        let now = Instant::now();
        for (m, buf) in b.meta[..n].iter().zip(&b.udp_in) {
            let stride = if m.stride == 0 { m.len } else { m.stride };
            for datagram in buf[..m.len].chunks(stride.max(1)) {
                node.handle_datagram(m.addr, datagram, &mut b.tun_out, &mut b.tx, now);
            }
        }
        while let Some(event) = node.poll_event() {
            log_event(&event);
        }
    }
    let mut tun_failed = 0;
    for ((), packet) in b.tun_out.iter() {
        if let Err(e) = s.tun.write(packet) {
            tracing::debug!(error = %e, "tun write failed");
            tun_failed += 1;
        }
    }
    if tun_failed > 0 {
        s.node().count_drops(DropReason::TunWriteFailed, tun_failed);
    }
    b.tun_out.clear();
    if !b.tx.is_empty() {
        s.send(&b.tx);
        b.tx.clear();
    }
    Ok(true)
}

async fn timers(s: Arc<Shared>) -> Result<()> {
    let mut tx = Transmits::with_capacity(8);
    loop {
        let deadline = s.node().poll_timeout();
        tokio::time::sleep_until(deadline.into()).await;
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
