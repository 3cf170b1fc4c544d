//! Traffic a user would send across the overlay: pings, and TCP transfers whose SHA-256 is
//! compared end to end.

use crate::netns::Netns;
use crate::wait_until;
use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// One `ping -c 1 -W 1` from `ns` to `dst`; true if a reply came back.
pub fn ping_once(ns: &Netns, dst: &str) -> bool {
    ns.output("ping", &["-n", "-q", "-c", "1", "-W", "1", dst])
        .is_ok_and(|o| o.status.success())
}

/// Pings until one succeeds or `timeout` passes; returns how long it took.
pub fn ping_until(ns: &Netns, dst: &str, timeout: Duration) -> Result<Duration> {
    wait_until(timeout, || ping_once(ns, dst)).with_context(|| {
        format!(
            "no ping reply from {dst} in {} within {timeout:?}",
            ns.name()
        )
    })
}

/// What to send in a [`tcp_transfer`].
pub enum Payload {
    /// `n` bytes of a deterministic, non-repeating-looking pattern.
    Pattern(usize),
    /// Exactly these bytes.
    Bytes(Vec<u8>),
}

/// Outcome of a [`tcp_transfer`].
#[derive(Debug)]
pub struct Transfer {
    /// Bytes the sender wrote.
    pub sent: u64,
    /// Bytes the receiver read.
    pub received: u64,
    /// SHA-256 of what was sent.
    pub sent_sha256: [u8; 32],
    /// SHA-256 of what was received.
    pub received_sha256: [u8; 32],
    /// Wall time from connect to the receiver's EOF.
    pub elapsed: Duration,
}

impl Transfer {
    /// Fails unless the bytes arrived complete and unchanged.
    pub fn verify(&self) -> Result<()> {
        if self.sent != self.received || self.sent_sha256 != self.received_sha256 {
            bail!(
                "transfer corrupted: sent {} bytes sha256 {}, received {} bytes sha256 {}",
                self.sent,
                hex(&self.sent_sha256),
                self.received,
                hex(&self.received_sha256)
            );
        }
        Ok(())
    }

    /// Throughput in MB/s (decimal megabytes).
    pub fn mbytes_per_sec(&self) -> f64 {
        self.received as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Lowercase hex of a byte slice (for digests in messages).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills chunk number `index` of the pattern payload: a 64-bit LCG stream seeded per chunk.
fn fill_pattern(index: u64, buf: &mut [u8]) {
    let mut x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in buf.chunks_mut(8) {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let bytes = x.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

/// Sends `payload` over TCP from `from` to `dst:port`, received by a listener in `to`,
/// and returns sizes and SHA-256 digests of both sides.
pub fn tcp_transfer(
    from: &Netns,
    to: &Netns,
    dst: &str,
    port: u16,
    payload: Payload,
) -> Result<Transfer> {
    let dst_ip: IpAddr = dst.parse().with_context(|| format!("bad address {dst}"))?;
    let listener = to
        .run(move || TcpListener::bind(SocketAddr::new(dst_ip, port)))?
        .with_context(|| format!("binding {dst}:{port} in {}", to.name()))?;
    listener.set_nonblocking(true)?;

    std::thread::scope(|s| -> Result<Transfer> {
        let receiver = s.spawn(move || -> Result<(u64, [u8; 32])> {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            bail!("no TCP connection arrived at {dst}:{port} within 20 s");
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e).context("accept"),
                }
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = stream.read(&mut buf).context("receiving")?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Ok((total, hasher.finalize().into()))
        });

        let addr = SocketAddr::new(dst_ip, port);
        let start = Instant::now();
        let sent = from.run(move || -> Result<(u64, [u8; 32])> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_write_timeout(Some(Duration::from_secs(30)))?;
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            match payload {
                Payload::Bytes(bytes) => {
                    stream.write_all(&bytes).context("sending")?;
                    hasher.update(&bytes);
                    total = bytes.len() as u64;
                }
                Payload::Pattern(len) => {
                    let mut chunk = vec![0u8; 256 * 1024];
                    let mut index = 0u64;
                    while (total as usize) < len {
                        let n = chunk.len().min(len - total as usize);
                        fill_pattern(index, &mut chunk[..n]);
                        stream.write_all(&chunk[..n]).context("sending")?;
                        hasher.update(&chunk[..n]);
                        total += n as u64;
                        index += 1;
                    }
                }
            }
            stream
                .shutdown(std::net::Shutdown::Write)
                .context("shutdown")?;
            Ok((total, hasher.finalize().into()))
        })?;
        let received = match receiver.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // Report both sides: a sender's "broken pipe" is only the echo of what
        // went wrong at the receiver.
        let (sent, received) = match (sent, received) {
            (Ok(s), Ok(r)) => (s, r),
            (Err(s), Err(r)) => bail!("sender: {s:#}; receiver: {r:#}"),
            (Err(s), Ok(r)) => bail!("sender: {s:#} (the receiver got {} bytes)", r.0),
            (Ok(s), Err(r)) => bail!("receiver: {r:#} (the sender sent {} bytes)", s.0),
        };
        Ok(Transfer {
            sent: sent.0,
            received: received.0,
            sent_sha256: sent.1,
            received_sha256: received.1,
            elapsed: start.elapsed(),
        })
    })
}
