//! The underlay UDP driver: one dual-stack socket, batched receive (recvmmsg +
//! GRO) and segmented send (GSO) through `quinn-udp`, for blocking data-plane threads.
//!
//! Addresses cross this boundary in canonical form (IPv4 as IPv4, never as
//! `::ffff:a.b.c.d`); the mapping for the dual-stack socket happens here only.

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub struct Udp {
    sock: std::net::UdpSocket,
    state: UdpSocketState,
    dual_stack: bool,
}

const SOCKET_BUFFER: usize = 4 << 20;

impl std::os::fd::AsRawFd for Udp {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

impl Udp {
    /// Binds `[::]:port` dual-stack, or `0.0.0.0:port` where IPv6 is unavailable.
    /// The socket is non-blocking; the `*_blocking` calls wait with `poll(2)`, so
    /// the data-plane threads sleep in the kernel, one wakeup per batch.
    pub fn bind(port: u16) -> io::Result<Self> {
        let (sock, dual_stack) = match Self::socket(Domain::IPV6, port) {
            Ok(s) => (s, true),
            Err(_) => (Self::socket(Domain::IPV4, port)?, false),
        };
        // Large buffers absorb bursts between batches; the *FORCE variants work
        // with CAP_NET_ADMIN, the plain ones are the fallback.
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        {
            use std::os::fd::AsRawFd;
            let size = SOCKET_BUFFER as libc::c_int;
            let _ = set_int_option(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                size,
            );
            let _ = set_int_option(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                size,
            );
        }
        let sock: std::net::UdpSocket = sock.into();
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        tune_for_wireguard(&sock, dual_stack);
        Ok(Self {
            sock,
            state,
            dual_stack,
        })
    }

    fn socket(domain: Domain, port: u16) -> io::Result<Socket> {
        let sock = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        let addr: SocketAddr = if domain == Domain::IPV6 {
            sock.set_only_v6(false)?;
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        sock.set_nonblocking(true)?;
        sock.bind(&addr.into())?;
        Ok(sock)
    }

    /// Largest number of datagrams one GSO send may carry.
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Receives a batch without waiting (`WouldBlock` when none is queued);
    /// returns how many `meta` entries were filled. Each entry may hold several
    /// datagrams of `meta.stride` bytes (GRO).
    pub fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            match self.state.recv(UdpSockRef::from(&self.sock), bufs, meta) {
                Ok(n) => {
                    for m in meta[..n].iter_mut() {
                        m.addr = canonical(m.addr);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `contents` to `dst` as datagrams of `segment` bytes (the last may be
    /// shorter) in one syscall where GSO is available; waits while the socket
    /// buffer is full.
    pub fn send_blocking(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: self.wire_addr(dst),
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        loop {
            match self.state.try_send(UdpSockRef::from(&self.sock), &transmit) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(&self.sock, libc::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn wire_addr(&self, addr: SocketAddr) -> SocketAddr {
        match (self.dual_stack, addr.ip()) {
            (true, IpAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
            _ => addr,
        }
    }
}

/// Sleeps in `poll(2)` until `fd` has `events`.
fn wait(fd: &impl std::os::fd::AsRawFd, events: libc::c_short) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one live pollfd, count 1, infinite timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Sets an integer socket option.
pub fn set_int_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Best effort throughout: an option the kernel refuses leaves the default in
/// place, which only costs performance.
///
/// Undoes the QUIC-specific options `quinn-udp` sets. Unlike QUIC, WireGuard lets
/// the underlay fragment (as the kernel module does): an inner MTU too large for a
/// path degrades into fragments instead of a blackhole. And the data plane needs
/// no receive timestamps, TOS or packet-info control messages, which cost time on
/// every datagram.
fn tune_for_wireguard(sock: &std::net::UdpSocket, dual_stack: bool) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let _ = set_int_option(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    );
    let _ = set_int_option(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0);
    let _ = set_int_option(fd, libc::IPPROTO_IP, libc::IP_RECVTOS, 0);
    let _ = set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 0);
    if dual_stack {
        let _ = set_int_option(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        );
        let _ = set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 0);
        let _ = set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 0);
    }
}
