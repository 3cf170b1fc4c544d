//! Readiness wait for the data-plane thread: an epoll set registered once with
//! the TUN device and the UDP socket (level-triggered), so sleeping costs one
//! syscall and waking tells which side has packets.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct Poller {
    epfd: OwnedFd,
}

/// Which registered sources are readable after a wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    pub tun: bool,
    pub udp: bool,
}

const TUN_TOKEN: u64 = 1;
const UDP_TOKEN: u64 = 2;

impl Poller {
    pub fn new(tun: RawFd, udp: RawFd) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes a flag and returns a new descriptor or -1.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        let epfd = unsafe { OwnedFd::from_raw_fd(raw) };
        for (fd, token) in [(tun, TUN_TOKEN), (udp, UDP_TOKEN)] {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: token,
            };
            // SAFETY: valid epoll fd, valid target fd, pointer to a live epoll_event.
            if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { epfd })
    }

    /// Sleeps until the TUN device or the socket is readable.
    pub fn wait(&self) -> io::Result<Ready> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        loop {
            // SAFETY: `events` is a live array of 2 epoll_events; infinite timeout.
            let n = unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), events.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let mut ready = Ready::default();
            for ev in &events[..n as usize] {
                match ev.u64 {
                    TUN_TOKEN => ready.tun = true,
                    UDP_TOKEN => ready.udp = true,
                    _ => {}
                }
            }
            return Ok(ready);
        }
    }
}
