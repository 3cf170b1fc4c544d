//! The WAN switch driver: one AF_PACKET socket per port in the WAN namespace, a
//! learning L2 forwarder, and the [`Shaper`] in between. Runs on its own
//! real-time thread with a 1 ns timer slack so that departures are on time to
//! tens of microseconds.

use super::shaper::{Lateness, PairShape, PairStats, Shaper};
use crate::netns::run_in_netns;
use anyhow::{bail, Context, Result};
use skymesh_agent::udp::set_int_option;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const ETH_P_ALL: u16 = 0x0003;
const MAX_FRAME: usize = 65_536;
/// Longest sleep between checks of the stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// Frames read from one port before the others and the due departures get a
/// turn (more wait for the next pass).
const READ_BURST: usize = 64;

/// A running switch. Dropping it stops the thread.
pub struct SwitchHandle {
    shaper: Arc<Mutex<Shaper>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The switch thread's kernel id (for `/proc/self/task/<tid>`).
    tid: libc::pid_t,
    ports: Vec<String>,
}

/// Builder for a [`SwitchHandle`].
pub struct Switch;

impl Switch {
    /// Starts switching between `ports` (interface names inside namespace `ns`).
    /// Offloads that would hand the switch unsegmented or unchecksummed frames
    /// are switched off on those interfaces (the other veth ends must be treated
    /// by the caller with [`disable_offloads`]).
    pub fn start(ns: &str, ports: &[&str], seed: u64) -> Result<SwitchHandle> {
        let names: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        let fds = run_in_netns(ns, || -> Result<Vec<OwnedFd>> {
            names
                .iter()
                .map(|p| {
                    disable_offloads_here(p)?;
                    open_port(p)
                })
                .collect()
        })??;
        let shaper = Arc::new(Mutex::new(Shaper::new(seed)));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let (shaper, stop) = (shaper.clone(), stop.clone());
            std::thread::Builder::new()
                .name("wan-switch".into())
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    let priority = crate::machine::make_realtime(PRIORITY).map(|()| tid);
                    let ok = priority.is_ok();
                    let _ = ready.send(priority);
                    if ok {
                        forward(fds, shaper, stop);
                    }
                })
                .context("starting the switch thread")?
        };
        let tid = started
            .recv()
            .context("the switch thread ended before it started")?
            .context(
                "giving the switch thread a real-time priority (SCHED_FIFO): run the lab as \
                 root with CAP_SYS_NICE (a container may drop it) and a real-time budget \
                 in its cgroup",
            )?;
        Ok(SwitchHandle {
            shaper,
            stop,
            thread: Some(thread),
            tid,
            ports: names,
        })
    }
}

impl SwitchHandle {
    fn index(&self, port: &str) -> Result<usize> {
        self.ports
            .iter()
            .position(|p| p == port)
            .with_context(|| format!("no WAN port {port:?} (ports: {:?})", self.ports))
    }

    fn shaper(&self) -> MutexGuard<'_, Shaper> {
        self.shaper.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the one-way shape from `src` to `dst`.
    pub fn set(&self, src: &str, dst: &str, shape: PairShape) -> Result<()> {
        let (s, d) = (self.index(src)?, self.index(dst)?);
        self.shaper().set(s, d, shape);
        Ok(())
    }

    /// Sets both directions between `a` and `b`.
    pub fn set_both(&self, a: &str, b: &str, shape: PairShape) -> Result<()> {
        self.set(a, b, shape)?;
        self.set(b, a, shape)
    }

    pub fn shape(&self, src: &str, dst: &str) -> Result<PairShape> {
        let (s, d) = (self.index(src)?, self.index(dst)?);
        Ok(self.shaper().shape(s, d))
    }

    /// Cuts (`up = false`) or restores both directions, keeping the other settings.
    pub fn set_up(&self, a: &str, b: &str, up: bool) -> Result<()> {
        for (s, d) in [(a, b), (b, a)] {
            let mut shape = self.shape(s, d)?;
            shape.up = up;
            self.set(s, d, shape)?;
        }
        Ok(())
    }

    /// Frames the switch sent late (it was not scheduled in time) since the last
    /// call or its start.
    pub fn take_lateness(&self) -> Lateness {
        self.shaper().take_lateness()
    }

    /// CPU time the switch thread has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        Ok(crate::machine::thread_times(std::process::id(), self.tid)?.ran)
    }

    pub fn stats(&self, src: &str, dst: &str) -> Result<PairStats> {
        let (s, d) = (self.index(src)?, self.index(dst)?);
        Ok(self.shaper().stats(s, d))
    }
}

impl Drop for SwitchHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_port(name: &str) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        bail!("WAN port {name}: {}", io::Error::last_os_error());
    }
    let proto = ETH_P_ALL.to_be();
    // SAFETY: plain socket(2) call.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if raw < 0 {
        bail!(
            "AF_PACKET socket for {name}: {}",
            io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: binding with a live sockaddr_ll of the stated size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        bail!(
            "binding AF_PACKET to {name}: {}",
            io::Error::last_os_error()
        );
    }
    // Bursts (a TCP window, a GSO train) arrive faster than one thread reads;
    // a deep socket buffer absorbs them instead of dropping at the port.
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        set_int_option(fd.as_raw_fd(), libc::SOL_SOCKET, opt, 8 << 20)
            .with_context(|| format!("socket buffer on {name}"))?;
    }
    // Frames the switch itself sends on a port must not come back as input.
    set_int_option(
        fd.as_raw_fd(),
        libc::SOL_PACKET,
        libc::PACKET_IGNORE_OUTGOING,
        1,
    )
    .with_context(|| format!("PACKET_IGNORE_OUTGOING on {name}"))?;
    Ok(fd)
}

/// Turns off checksum offload, TSO, GSO and GRO on `ifname` in namespace `ns`,
/// so that every frame on it is a complete, checksummed, MTU-sized frame.
pub fn disable_offloads(ns: &str, ifname: &str) -> Result<()> {
    let name = ifname.to_string();
    run_in_netns(ns, move || disable_offloads_here(&name))?
}

fn disable_offloads_here(ifname: &str) -> Result<()> {
    // Legacy ethtool "set" commands, each taking a struct ethtool_value.
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const ETHTOOL_STSO: u32 = 0x1f;
    const ETHTOOL_SGSO: u32 = 0x24;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    // SAFETY: plain socket(2) call; the descriptor is wrapped at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        bail!("socket for ethtool: {}", io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    for cmd in [ETHTOOL_STXCSUM, ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_SGRO] {
        let mut value = EthtoolValue { cmd, data: 0 };
        // SAFETY: ifreq is plain data; zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to,
        // both alive for the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) } < 0 {
            let err = io::Error::last_os_error();
            // A device without the feature refuses to change it; that is fine.
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                bail!("ethtool command {cmd:#x} on {ifname}: {err}");
            }
        }
    }
    Ok(())
}

/// Real-time priority of the switch thread (SCHED_FIFO, above every process of
/// the lab, which all run SCHED_OTHER). The switch plays the network, which in
/// a real WAN is not delayed by the gateways' CPU load, and the kernel's own
/// forwarding (or netem) runs in softirq, ahead of every process: so must the
/// switch, or the emulated WAN stalls whenever the agents keep the CPUs busy.
/// It only runs when frames arrive or are due (it sleeps in `ppoll`) and reads
/// at most [`READ_BURST`] frames per port per pass. Should it ever spin, the
/// kernel's real-time throttling still leaves 5% of that CPU to the rest.
const PRIORITY: libc::c_int = 20;

/// Reads and clears a socket's pending error (`SO_ERROR`).
fn take_socket_error(fd: libc::c_int) -> io::Result<libc::c_int> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are live and sized for SO_ERROR's int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(err)
}

fn forward(fds: Vec<OwnedFd>, shaper: Arc<Mutex<Shaper>>, stop: Arc<AtomicBool>) {
    // SAFETY: PR_SET_TIMERSLACK takes an integer; 1 ns slack makes ppoll precise.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut macs: HashMap<[u8; 6], usize> = HashMap::new();
    let mut buf = vec![0u8; MAX_FRAME];
    let lock = || shaper.lock().unwrap_or_else(|e| e.into_inner());
    while !stop.load(Ordering::Relaxed) {
        let wait = lock()
            .poll_timeout()
            .map(|due| due.saturating_duration_since(Instant::now()))
            .unwrap_or(IDLE_WAIT)
            .min(IDLE_WAIT);
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        // SAFETY: `pfds` is a live array of pfds.len() pollfds; `ts` lives across the call.
        unsafe {
            libc::ppoll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        let ports = pfds.len();
        for (i, pfd) in pfds.iter_mut().enumerate() {
            // A port that went down or away (ENETDOWN): reading SO_ERROR clears
            // it, or ppoll would report it at once forever and this real-time
            // thread would spin. A port whose error cannot be read is dropped.
            if pfd.revents & libc::POLLERR != 0 && take_socket_error(pfd.fd).is_err() {
                pfd.fd = -1; // ppoll ignores negative fds
                continue;
            }
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            for _ in 0..READ_BURST {
                // SAFETY: `buf` is valid for writes of buf.len() bytes.
                let n = unsafe {
                    libc::recv(
                        pfd.fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n <= 0 {
                    break;
                }
                let frame = &buf[..n as usize];
                if frame.len() < 14 {
                    continue;
                }
                let mut src = [0u8; 6];
                src.copy_from_slice(&frame[6..12]);
                macs.insert(src, i);
                let mut dst = [0u8; 6];
                dst.copy_from_slice(&frame[..6]);
                let now = Instant::now();
                let mut s = lock();
                match macs.get(&dst) {
                    Some(&d) if dst[0] & 1 == 0 => {
                        if d != i {
                            s.handle_frame(i, d, frame, now);
                        }
                    }
                    _ => {
                        for d in (0..ports).filter(|&d| d != i) {
                            s.handle_frame(i, d, frame, now);
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        let mut s = lock();
        while let Some((d, frame)) = s.poll_transmit(now) {
            // SAFETY: `frame` is valid for reads of its length. A full socket
            // buffer drops the frame, as a congested link would.
            unsafe {
                libc::send(
                    pfds[d].fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT,
                )
            };
        }
    }
}
