//! Per-pair WAN shaping, sans-IO: frames go in with `handle_frame(src, dst, frame,
//! now)` and come out of [`Shaper::poll_transmit`] once their departure time has
//! come. No sockets, no clock, a seeded RNG: tests drive it with their own `now`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// The emulated path from one port to another. The defaults are a perfect link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairShape {
    /// One-way delay.
    pub delay: Duration,
    /// Maximum extra delay, drawn uniformly from `0..=jitter` per frame. Frames of
    /// one pair never overtake each other (a real path keeps order much more
    /// often than netem's reordering jitter does).
    pub jitter: Duration,
    /// Probability of dropping a frame, 0.0..=1.0.
    pub loss: f64,
    /// Bottleneck rate in bits per second; `None` is unlimited.
    pub rate_bps: Option<u64>,
    /// Largest IP packet the path carries; bigger IPv4 packets are fragmented like
    /// a router would, or dropped when they carry DF (no ICMP comes back: the lab
    /// models paths that filter it). `None` is unlimited.
    pub mtu: Option<usize>,
    /// False while the pair is cut: every frame is dropped.
    pub up: bool,
}

impl Default for PairShape {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            mtu: None,
            up: true,
        }
    }
}

/// Why a frame did not get through, for the emulator's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    Cut,
    Loss,
    /// IPv4 with DF, or a non-fragmentable packet, larger than the path MTU.
    TooBig,
    /// More than the queue limit waiting on a rate-limited pair.
    QueueFull,
}

/// Frames waiting on one pair beyond this are dropped (tail drop), like a router
/// buffer of about 1000 packets.
const QUEUE_LIMIT: usize = 1000;
const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;

#[derive(Debug, Default)]
struct PairState {
    shape: PairShape,
    /// When the link finishes serializing the last accepted frame (rate limit).
    busy_until: Option<Instant>,
    /// Departure of the last accepted frame (keeps the pair in order).
    last_departure: Option<Instant>,
    queued: usize,
    delivered: u64,
    dropped: HashMap<Drop, u64>,
}

struct Pending {
    at: Instant,
    seq: u64,
    src: usize,
    dst: usize,
    frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Counters of one pair.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairStats {
    pub delivered: u64,
    pub dropped: HashMap<Drop, u64>,
}

pub struct Shaper {
    pairs: HashMap<(usize, usize), PairState>,
    queue: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    rng: StdRng,
    late: Lateness,
}

/// Frames that left later than their departure time because the switch did not
/// run in time (a starved thread): the emulated WAN was worse than configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lateness {
    /// Frames that left more than [`LATE`] after their departure time.
    pub frames: u64,
    /// The largest delay past a departure time.
    pub max: Duration,
}

/// How late a frame may leave before it counts in [`Lateness`].
pub const LATE: Duration = Duration::from_millis(20);

impl Shaper {
    pub fn new(seed: u64) -> Self {
        Self {
            pairs: HashMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            late: Lateness::default(),
        }
    }

    /// Sets the shape of the path `src → dst`; frames already in flight keep theirs.
    pub fn set(&mut self, src: usize, dst: usize, shape: PairShape) {
        self.pairs.entry((src, dst)).or_default().shape = shape;
    }

    pub fn shape(&self, src: usize, dst: usize) -> PairShape {
        self.pairs
            .get(&(src, dst))
            .map(|p| p.shape)
            .unwrap_or_default()
    }

    pub fn stats(&self, src: usize, dst: usize) -> PairStats {
        self.pairs
            .get(&(src, dst))
            .map(|p| PairStats {
                delivered: p.delivered,
                dropped: p.dropped.clone(),
            })
            .unwrap_or_default()
    }

    /// An Ethernet frame from port `src` for port `dst`.
    pub fn handle_frame(&mut self, src: usize, dst: usize, frame: &[u8], now: Instant) {
        let pair = self.pairs.entry((src, dst)).or_default();
        let shape = pair.shape;
        if !shape.up {
            *pair.dropped.entry(Drop::Cut).or_default() += 1;
            return;
        }
        let frames = match shape.mtu {
            Some(mtu) if frame.len() > ETH_HEADER + mtu => match fragment_ipv4(frame, mtu) {
                Some(parts) => parts,
                None => {
                    *pair.dropped.entry(Drop::TooBig).or_default() += 1;
                    return;
                }
            },
            _ => vec![frame.to_vec()],
        };
        for f in frames {
            if shape.loss > 0.0 && self.rng.gen::<f64>() < shape.loss {
                *pair.dropped.entry(Drop::Loss).or_default() += 1;
                continue;
            }
            if pair.queued >= QUEUE_LIMIT {
                *pair.dropped.entry(Drop::QueueFull).or_default() += 1;
                continue;
            }
            // Serialization at the bottleneck, then propagation, then jitter.
            let sent = match shape.rate_bps {
                Some(bps) if bps > 0 => {
                    let start = pair.busy_until.map_or(now, |b| b.max(now));
                    let tx = Duration::from_nanos(
                        (f.len() as u64 * 8).saturating_mul(1_000_000_000) / bps,
                    );
                    pair.busy_until = Some(start + tx);
                    start + tx
                }
                _ => now,
            };
            let jitter = if shape.jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_nanos(self.rng.gen_range(0..=shape.jitter.as_nanos() as u64))
            };
            let mut at = sent + shape.delay + jitter;
            if let Some(last) = pair.last_departure {
                at = at.max(last);
            }
            pair.last_departure = Some(at);
            pair.queued += 1;
            self.seq += 1;
            self.queue.push(Reverse(Pending {
                at,
                seq: self.seq,
                src,
                dst,
                frame: f,
            }));
        }
    }

    /// The next frame whose departure time has come: (destination port, frame).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(usize, Vec<u8>)> {
        if self.queue.peek().is_some_and(|Reverse(p)| p.at <= now) {
            let Reverse(p) = self.queue.pop()?;
            let late = now.saturating_duration_since(p.at);
            if late > LATE {
                self.late.frames += 1;
            }
            self.late.max = self.late.max.max(late);
            if let Some(pair) = self.pairs.get_mut(&(p.src, p.dst)) {
                pair.queued = pair.queued.saturating_sub(1);
                pair.delivered += 1;
            }
            return Some((p.dst, p.frame));
        }
        None
    }

    /// How late frames left since the last call (or the start), and a fresh count.
    pub fn take_lateness(&mut self) -> Lateness {
        std::mem::take(&mut self.late)
    }

    /// When the next frame is due, if any is waiting.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse(p)| p.at)
    }
}

/// Splits an Ethernet+IPv4 frame whose IP packet exceeds `mtu` into fragments, as a
/// router does. `None` when it must be dropped instead: DF set, not IPv4, or a
/// header that does not parse.
fn fragment_ipv4(frame: &[u8], mtu: usize) -> Option<Vec<Vec<u8>>> {
    if frame.len() < ETH_HEADER + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4
    {
        return None;
    }
    let ip = &frame[ETH_HEADER..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || total > ip.len() || total < ihl {
        return None;
    }
    let flags_frag = u16::from_be_bytes([ip[6], ip[7]]);
    if flags_frag & 0x4000 != 0 {
        return None; // DF
    }
    let more_after = flags_frag & 0x2000 != 0;
    let base_offset = usize::from(flags_frag & 0x1fff) * 8;
    let chunk = (mtu.checked_sub(ihl)?) & !7;
    if chunk == 0 {
        return None;
    }
    let payload = &ip[ihl..total];
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + chunk).min(payload.len());
        let last = end == payload.len();
        let mut f = Vec::with_capacity(ETH_HEADER + ihl + end - off);
        f.extend_from_slice(&frame[..ETH_HEADER]);
        f.extend_from_slice(&ip[..ihl]);
        f.extend_from_slice(&payload[off..end]);
        let h = &mut f[ETH_HEADER..ETH_HEADER + ihl];
        h[2..4].copy_from_slice(&((ihl + end - off) as u16).to_be_bytes());
        let mf = if last && !more_after { 0 } else { 0x2000 };
        let field = mf | (((base_offset + off) / 8) as u16 & 0x1fff);
        h[6..8].copy_from_slice(&field.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        out.push(f);
        off = end;
    }
    Some(out)
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_frame(payload_len: usize, df: bool) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HEADER + 20 + payload_len];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut f[ETH_HEADER..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&(if df { 0x4000u16 } else { 0 }).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        for (i, b) in ip[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    fn drain(s: &mut Shaper, now: Instant) -> Vec<(usize, Vec<u8>)> {
        std::iter::from_fn(|| s.poll_transmit(now)).collect()
    }

    #[test]
    fn delay_holds_frames_until_due() {
        let t0 = Instant::now();
        let mut s = Shaper::new(1);
        s.set(
            0,
            1,
            PairShape {
                delay: Duration::from_millis(30),
                ..Default::default()
            },
        );
        s.handle_frame(0, 1, b"hello", t0);
        s.handle_frame(1, 0, b"back", t0); // the reverse pair is its own, undelayed
        assert_eq!(drain(&mut s, t0), vec![(0, b"back".to_vec())]);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_millis(30)));
        assert!(drain(&mut s, t0 + Duration::from_millis(29)).is_empty());
        assert_eq!(
            drain(&mut s, t0 + Duration::from_millis(30)),
            vec![(1, b"hello".to_vec())]
        );
    }

    #[test]
    fn frames_sent_after_their_time_are_counted_late() {
        let t0 = Instant::now();
        let mut s = Shaper::new(1);
        let ms = Duration::from_millis;
        s.set(
            0,
            1,
            PairShape {
                delay: ms(30),
                ..Default::default()
            },
        );
        s.handle_frame(0, 1, b"on-time", t0);
        s.handle_frame(0, 1, b"late", t0 + ms(1));
        assert!(s.poll_transmit(t0 + ms(31)).is_some());
        assert_eq!(
            s.take_lateness(),
            Lateness {
                frames: 0,
                max: ms(1)
            },
            "1 ms is within the limit"
        );
        // The driver did not run until 100 ms after the second frame was due.
        assert!(s.poll_transmit(t0 + ms(131)).is_some());
        assert_eq!(
            s.take_lateness(),
            Lateness {
                frames: 1,
                max: ms(100)
            }
        );
        assert_eq!(s.take_lateness(), Lateness::default(), "taken");
    }

    #[test]
    fn loss_rate_matches_over_many_frames() {
        let t0 = Instant::now();
        let mut s = Shaper::new(42);
        s.set(
            0,
            1,
            PairShape {
                loss: 0.05,
                ..Default::default()
            },
        );
        let mut delivered = 0;
        for _ in 0..20_000 {
            s.handle_frame(0, 1, b"x", t0);
            delivered += drain(&mut s, t0).len() as u64;
        }
        let ratio = delivered as f64 / 20_000.0;
        assert!((ratio - 0.95).abs() < 0.005, "delivered {ratio}");
        let lost = s.stats(0, 1).dropped.get(&Drop::Loss).copied().unwrap_or(0);
        assert_eq!(delivered + lost, 20_000);
    }

    #[test]
    fn rate_serializes_and_jitter_never_reorders() {
        let t0 = Instant::now();
        let mut s = Shaper::new(7);
        // 1 Mbit/s: a 1250-byte frame takes 10 ms on the wire.
        s.set(
            0,
            1,
            PairShape {
                rate_bps: Some(1_000_000),
                jitter: Duration::from_millis(5),
                ..Default::default()
            },
        );
        for i in 0..10u8 {
            s.handle_frame(0, 1, &[i; 1250], t0);
        }
        let mut order = Vec::new();
        let mut now = t0;
        while let Some(next) = s.poll_timeout() {
            now = next;
            order.extend(drain(&mut s, now).into_iter().map(|(_, f)| f[0]));
        }
        assert_eq!(order, (0..10).collect::<Vec<_>>());
        let elapsed = now - t0;
        assert!(
            elapsed >= Duration::from_millis(100) && elapsed <= Duration::from_millis(105),
            "{elapsed:?}"
        );
    }

    #[test]
    fn cut_drops_and_restore_resumes() {
        let t0 = Instant::now();
        let mut s = Shaper::new(1);
        s.set(
            0,
            1,
            PairShape {
                up: false,
                ..Default::default()
            },
        );
        s.handle_frame(0, 1, b"lost", t0);
        assert!(drain(&mut s, t0).is_empty());
        assert_eq!(s.stats(0, 1).dropped.get(&Drop::Cut), Some(&1));
        s.set(0, 1, PairShape::default());
        s.handle_frame(0, 1, b"back", t0);
        assert_eq!(drain(&mut s, t0).len(), 1);
    }

    #[test]
    fn mtu_fragments_without_df_and_drops_with_df() {
        let t0 = Instant::now();
        let mut s = Shaper::new(1);
        s.set(
            0,
            1,
            PairShape {
                mtu: Some(1280),
                ..Default::default()
            },
        );
        let big = ipv4_frame(1480, false);
        s.handle_frame(0, 1, &big, t0);
        let parts = drain(&mut s, t0);
        assert_eq!(parts.len(), 2);
        // Reassemble and compare the payload; check offsets, MF and checksums.
        let mut payload = Vec::new();
        for (i, (_, f)) in parts.iter().enumerate() {
            let ip = &f[ETH_HEADER..];
            assert!(ip.len() <= 1280);
            assert_eq!(checksum(&ip[..20]), 0, "header checksum of fragment {i}");
            let field = u16::from_be_bytes([ip[6], ip[7]]);
            assert_eq!(usize::from(field & 0x1fff) * 8, payload.len());
            assert_eq!(field & 0x2000 != 0, i == 0);
            payload.extend_from_slice(&ip[20..]);
        }
        assert_eq!(payload, big[ETH_HEADER + 20..].to_vec());

        s.handle_frame(0, 1, &ipv4_frame(1480, true), t0);
        assert!(drain(&mut s, t0).is_empty());
        assert_eq!(s.stats(0, 1).dropped.get(&Drop::TooBig), Some(&1));
        // Small packets pass untouched.
        let small = ipv4_frame(100, true);
        s.handle_frame(0, 1, &small, t0);
        assert_eq!(drain(&mut s, t0), vec![(1, small)]);
    }
}
