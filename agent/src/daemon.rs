//! The agent daemon: wires the sans-IO [`Node`] to its IO drivers (TUN, UDP,
//! netlink, admin socket, metrics) and to the clock.
//!
//! The data plane is one dedicated OS thread that sleeps in `epoll` on the TUN
//! device and the UDP socket and moves a batch per lock of the core in each
//! direction: TUN → encrypt → UDP and UDP → decrypt → TUN. One thread per agent
//! keeps request/response traffic on one CPU: the reply the kernel produces while
//! we write a packet to the TUN is read back without another thread's wakeup.
//! Timers, the admin socket and metrics run on tokio.

use crate::admin::{
    self, ControllerStatus, InterfaceStatus, LinkStatusJson, PathStatusJson, PeerStatusJson,
    RejectedPrefixStatus, Status,
};
use crate::batch::{Transmits, TunWrites, MAX_PACKET};
use crate::config::Config;
use crate::config::ControllerMode;
use crate::control::{self, ControlEvent};
use crate::metrics;
use crate::netlink::Netlink;
use crate::node::{DropReason, Event, Node, PathCause};
use crate::notify::notify;
use crate::poller::Poller;
use crate::tun::Tun;
use crate::udp::Udp;
use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use quinn_udp::RecvMeta;
use rand::RngCore;
use skymesh_wire::control::{FullNetMap, Register};
use skymesh_wire::{JoinToken, NetMap};
use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Packets read from the TUN per lock of the core.
const TUN_BATCH: usize = 64;
/// recvmmsg slots per call; each can hold a GRO train of up to 64 KiB.
const UDP_BATCH: usize = 16;
const GRO_BUF: usize = 65_536;
/// Receive calls per batch when the timer task reads the socket's backlog
/// before declaring a link down, and at most this many batches.
const DRAIN_BATCH: usize = 4;
const DRAIN_MAX_BATCHES: usize = 64;
/// ...and for at most this long.
const DRAIN_MAX_TIME: Duration = Duration::from_millis(5);

struct Shared {
    node: Mutex<Node>,
    tun: Tun,
    udp: Udp,
    config: Config,
    /// Controller mode only.
    control: Mutex<Option<ControllerStatus>>,
}

impl Shared {
    fn node(&self) -> MutexGuard<'_, Node> {
        // A panic while holding the lock is a bug; the state is still the best we have.
        self.node.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_control(&self, f: impl FnOnce(&mut ControllerStatus)) {
        let mut guard = self.control.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = guard.as_mut() {
            f(c);
        }
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
            link_check_stalls: node.stalls(),
            controller: self
                .control
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            links: node
                .links()
                .into_iter()
                .map(|l| LinkStatusJson {
                    peer: l.peer,
                    up: l.up,
                    rtt_ms: l.rtt.map(|d| d.as_secs_f64() * 1e3),
                    jitter_ms: l.jitter.as_secs_f64() * 1e3,
                    loss: l.loss,
                    probes_sent: l.probes_sent,
                    probes_received: l.probes_received,
                })
                .collect(),
            paths: node
                .paths()
                .into_iter()
                .map(|r| PathStatusJson {
                    dest: r.dest,
                    primary: r.primary.to_string(),
                    backup: r.backup.map(|b| b.to_string()),
                    active: r.active.to_string(),
                    changes: r.changes,
                    failovers: r.failovers,
                })
                .collect(),
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

    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let identity = match &config.controller {
        Some(mode) => Some(ensure_identity(&config, mode).await?),
        None => None,
    };

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
        .configure(index, config.interface.mtu)
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
    node.set_probe_config(config.probe);
    // `_admin_file` removes the socket file however this function returns.
    let (admin_listener, _admin_file) = admin::bind(&config.admin_socket).await?.into_parts();
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
        control: Mutex::new(identity.as_ref().map(|id| ControllerStatus {
            node: id.node.clone(),
            ..Default::default()
        })),
    });
    let mut iface = Interface {
        netlink: netlink.clone(),
        index,
        address: None,
    };

    // The first netmap: the file's, or in controller mode the cached one, so a
    // restart while the controller is unreachable keeps forwarding.
    match (&config.netmap(), &config.controller) {
        (Some(map), _) => iface.apply(&shared, map).await?,
        (None, Some(mode)) => match control::load_cache(&config.state_dir) {
            Ok(Some(full)) => {
                let map = localize(&full.netmap, &config, mode);
                match iface.apply(&shared, &map).await {
                    Ok(()) => {
                        shared.set_control(|c| {
                            c.from_cache = true;
                            set_self(c, &full);
                        });
                        tracing::info!(seq = full.seq, peers = map.peers.len(), "restored the cached netmap; forwarding while the controller is reached");
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "the cached netmap cannot be applied; waiting for the controller")
                    }
                }
            }
            Ok(None) => tracing::info!("no cached netmap; waiting for the controller"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "ignoring the cached netmap"),
        },
        (None, None) => {
            bail!("no netmap source: neither [[peers]] with an address nor [controller]")
        }
    }

    tracing::info!(
        interface = %name,
        public_key = %shared.node().public_key(),
        listen_port = config.interface.listen_port,
        address = ?iface.address,
        mode = if config.controller.is_some() { "controller" } else { "static" },
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
    if let (Some(identity), Some(mode)) = (identity, &config.controller) {
        let register = Register {
            public_key: shared.node().public_key(),
            listen_port: config.interface.listen_port,
            endpoints: mode.endpoints.clone(),
            advertise: mode.advertise.clone(),
            underlay: underlay_subnets(&identity.controllers),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            transit: mode.transit,
            capability: skymesh_wire::control::CAPABILITY,
        };
        let (events_tx, events) = tokio::sync::mpsc::channel(64);
        let s = shared.clone();
        let reports: control::ReportSource = Arc::new(move || s.node().link_report());
        tasks.spawn(async move {
            control::run_session_reporting(identity, register, events_tx, Some(reports)).await?;
            Ok(())
        });
        tasks.spawn(follow_controller(shared.clone(), iface, events));
    }
    {
        let s = shared.clone();
        tasks.spawn(async move {
            admin::serve(admin_listener, move || s.status()).await;
            Ok(())
        });
    }
    {
        let s = shared.clone();
        tasks.spawn(async move {
            metrics::serve(metrics_listener, move || s.status()).await;
            Ok(())
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

/// The kernel side of the interface: its address and routes, kept in step with
/// the applied netmap.
struct Interface {
    netlink: Netlink,
    index: u32,
    address: Option<IpNet>,
}

impl Interface {
    /// Applies `map` to the core and the kernel, by diff: sessions of unchanged
    /// peers stay up and the interface never flaps.
    async fn apply(&mut self, shared: &Shared, map: &NetMap) -> Result<()> {
        let diff = shared.node().apply(map, Instant::now())?;
        if self.address != Some(map.address) {
            self.netlink.add_address(self.index, map.address).await?;
            if let Some(old) = self.address.replace(map.address) {
                self.netlink.del_address(self.index, old).await?;
            }
        }
        for net in &diff.routes_removed {
            self.netlink.del_route(self.index, *net).await?;
        }
        for net in &diff.routes_added {
            self.netlink.add_route(self.index, *net).await?;
        }
        if !(diff.peers_added.is_empty()
            && diff.peers_removed.is_empty()
            && diff.peers_updated.is_empty())
        {
            tracing::info!(
                added = ?diff.peers_added,
                removed = ?diff.peers_removed,
                updated = ?diff.peers_updated,
                "netmap applied"
            );
        }
        Ok(())
    }
}

/// The controller's netmap with this node's local settings: the interface MTU
/// and, behind NAT, keepalives to every peer.
fn localize(map: &NetMap, config: &Config, mode: &ControllerMode) -> NetMap {
    let mut map = map.clone();
    map.mtu = config.interface.mtu;
    for p in &mut map.peers {
        p.persistent_keepalive = mode.persistent_keepalive;
    }
    map
}

fn set_self(c: &mut ControllerStatus, full: &FullNetMap) {
    c.netmap_seq = full.seq;
    c.prefixes = full.node.prefixes.iter().map(ToString::to_string).collect();
    c.rejected_prefixes = full
        .node
        .rejected_prefixes
        .iter()
        .map(|r| RejectedPrefixStatus {
            cidr: r.cidr.to_string(),
            reason: r.reason.clone(),
        })
        .collect();
}

/// Applies what the controller sends, and caches it for restarts during an
/// outage. A netmap that cannot be applied is logged and skipped: the previous
/// one stays in force.
async fn follow_controller(
    shared: Arc<Shared>,
    mut iface: Interface,
    mut events: tokio::sync::mpsc::Receiver<ControlEvent>,
) -> Result<()> {
    let config = shared.config.clone();
    let Some(mode) = config.controller.clone() else {
        return Ok(());
    };
    let mut current: Option<FullNetMap> = None;
    while let Some(event) = events.recv().await {
        let next = match event {
            ControlEvent::Connected { controller } => {
                shared.set_control(|c| {
                    c.connected = Some(controller);
                    c.last_error = None;
                });
                continue;
            }
            ControlEvent::Disconnected { reason } => {
                shared.set_control(|c| {
                    c.connected = None;
                    c.last_error = Some(reason);
                });
                // A new session starts with a full netmap.
                current = None;
                continue;
            }
            ControlEvent::NetMap(full) => *full,
            ControlEvent::Update(update) => {
                let Some(mut full) = current.clone() else {
                    tracing::warn!(seq = update.seq, "update before any netmap; ignored");
                    continue;
                };
                if update.seq < full.seq {
                    continue;
                }
                update.apply_to(&mut full.netmap);
                if let Some(me) = update.node {
                    full.node = me;
                }
                full.seq = update.seq;
                full
            }
        };
        let map = localize(&next.netmap, &config, &mode);
        match iface.apply(&shared, &map).await {
            Ok(()) => {
                for r in &next.node.rejected_prefixes {
                    if !current
                        .as_ref()
                        .is_some_and(|c| c.node.rejected_prefixes.contains(r))
                    {
                        tracing::error!(prefix = %r.cidr, reason = %r.reason, "the controller refused an advertised prefix");
                    }
                }
                shared.set_control(|c| {
                    c.from_cache = false;
                    set_self(c, &next);
                });
                if let Err(e) = control::save_cache(&config.state_dir, &next) {
                    tracing::warn!(error = %format!("{e:#}"), "could not cache the netmap");
                }
                current = Some(next);
            }
            Err(e) => {
                tracing::error!(seq = next.seq, error = %format!("{e:#}"), "cannot apply the controller's netmap; keeping the previous one");
            }
        }
    }
    Ok(())
}

/// The identity from the state dir, or a new one from the join token.
async fn ensure_identity(config: &Config, mode: &ControllerMode) -> Result<control::Identity> {
    if let Some(id) = control::Identity::load(&config.state_dir)? {
        return Ok(id);
    }
    let Some(path) = &mode.join_token_file else {
        bail!(
            "this agent has not enrolled yet: set [controller] join_token_file, or run `skymesh-agent join TOKEN --config {}`",
            config.file.display()
        );
    };
    let text = crate::config::bounded::read_file(path, crate::config::bounded::SECRET_LIMIT).with_context(|| {
        format!(
            "reading [controller] join_token_file {} (create it with the token `skymeshctl join-token create` printed)",
            path.display()
        )
    })?;
    let token = JoinToken::decode(&text)
        .with_context(|| format!("[controller] join_token_file {}", path.display()))?;
    enroll_with_retry(&token, &config.state_dir).await
}

/// Enrolls, retrying with backoff while the controller is unreachable or busy;
/// a permanent error ([`control::is_permanent`]: a CA pin mismatch, a bad, used
/// or expired token, another protocol version) is final.
pub async fn enroll_with_retry(
    token: &JoinToken,
    state_dir: &std::path::Path,
) -> Result<control::Identity> {
    let mut backoff = control::BACKOFF_MIN;
    loop {
        match control::enroll(token, state_dir).await {
            Ok(id) => return Ok(id),
            Err(e) if control::is_permanent(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "enrollment failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(control::BACKOFF_MAX);
            }
        }
    }
}

/// Subnets of the interfaces that carry this node's tunnels: those holding the
/// local address the kernel picks towards each controller. A prefix overlapping
/// them would pull the tunnel's own packets into it. (The VPC-facing interface is
/// not among them: its subnet is exactly what a gateway advertises.)
fn underlay_subnets(controllers: &[String]) -> Vec<IpNet> {
    let local_ips: Vec<std::net::IpAddr> = controllers
        .iter()
        .filter_map(|c| std::net::ToSocketAddrs::to_socket_addrs(c).ok()?.next())
        .filter_map(|target| {
            let bind = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = std::net::UdpSocket::bind(bind).ok()?;
            sock.connect(target).ok()?;
            Some(sock.local_addr().ok()?.ip())
        })
        .collect();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let net = if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            let len = u32::from(m.ip()).count_ones() as u8;
            IpNet::new(std::net::IpAddr::V4(ip.ip()), len).ok()
        } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            let len = u128::from(m.ip()).count_ones() as u8;
            IpNet::new(std::net::IpAddr::V6(ip.ip()), len).ok()
        } else {
            None
        };
        let Some(net) = net else { continue };
        if !local_ips.contains(&net.addr()) {
            continue;
        }
        let net = net.trunc();
        if !out.contains(&net) {
            out.push(net);
        }
    }
    out
}

/// Buffers of the data-plane thread, allocated once.
struct Buffers {
    tun_in: Vec<Vec<u8>>,
    tun_lens: [usize; TUN_BATCH],
    tx: Transmits,
    udp: UdpBuffers,
}

/// Buffers for one batch from the UDP socket and what it produces.
struct UdpBuffers {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    tun_out: TunWrites,
    tx: Transmits,
}

impl UdpBuffers {
    /// Room for `batch` receive calls' worth (each up to a GRO train).
    fn new(batch: usize) -> Self {
        let batch = batch.clamp(1, UDP_BATCH);
        Self {
            bufs: vec![vec![0u8; GRO_BUF]; batch],
            meta: vec![RecvMeta::default(); batch],
            tun_out: TunWrites::with_capacity(batch * 4),
            tx: Transmits::with_capacity(batch),
        }
    }
}

fn dataplane(s: &Shared) -> Result<()> {
    let mut b = Buffers {
        tun_in: vec![vec![0u8; MAX_PACKET]; TUN_BATCH],
        tun_lens: [0; TUN_BATCH],
        tx: Transmits::with_capacity(TUN_BATCH),
        udp: UdpBuffers::new(UDP_BATCH),
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
        let from_udp = ready.udp && udp_batch(s, &mut b.udp)?;
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
fn udp_batch(s: &Shared, b: &mut UdpBuffers) -> Result<bool> {
    let batch = b.bufs.len();
    let n = {
        let mut slices: [IoSliceMut<'_>; UDP_BATCH] = {
            let mut it = b.bufs.iter_mut();
            std::array::from_fn(|_| {
                IoSliceMut::new(it.next().map(|v| v.as_mut_slice()).unwrap_or(&mut []))
            })
        };
        match s.udp.try_recv(&mut slices[..batch], &mut b.meta) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e).context("receiving from the UDP socket"),
        }
    };
    {
        let mut node = s.node();
        let now = Instant::now();
        for (m, buf) in b.meta[..n].iter().zip(&b.bufs) {
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
        // The reading below is not a stall: lateness is the wake-up's.
        let woke = Instant::now();
        // A link about to be declared down may only look silent because its
        // probes wait unread behind a data-plane thread that did not get a CPU
        // (a busy or stolen vCPU): read what is queued before judging. Rare
        // (only with a link at its detection time), so the buffers are not kept.
        if s.node().link_check_would_fail(woke) {
            let mut b = UdpBuffers::new(DRAIN_BATCH);
            let mut batches = 0;
            while batches < DRAIN_MAX_BATCHES
                && woke.elapsed() < DRAIN_MAX_TIME
                && udp_batch(&s, &mut b)?
            {
                batches += 1;
            }
            if batches > 0 {
                tracing::debug!(batches, "read the socket's backlog before a link check");
            }
        }
        {
            let mut node = s.node();
            node.handle_timeout_woken(woke, Instant::now(), &mut tx);
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
        Event::LinkDown { peer, cause } => {
            tracing::warn!(peer = %peer, "link down: {cause}")
        }
        Event::Stalled { late, count } => tracing::warn!(
            late_ms = late.as_millis() as u64,
            count,
            "link checks ran late: the agent's timers did not run (CPU starvation, \
             a paused VM); that time is not counted as probe silence"
        ),
        Event::LinkUp { peer } => tracing::info!(peer = %peer, "link up"),
        Event::PathChanged {
            dest,
            from,
            to,
            cause,
        } => match cause {
            PathCause::Failover => {
                tracing::warn!(dest = %dest, from = %from, to = %to, "failover: first hop down, using the backup path")
            }
            PathCause::Failback => {
                tracing::info!(dest = %dest, from = %from, to = %to, "failback: primary path healthy again")
            }
            PathCause::Controller => {
                tracing::info!(dest = %dest, from = %from, to = %to, "path changed by the controller")
            }
        },
    }
}
