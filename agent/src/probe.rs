//! Link probing, sans-IO: the probe packet's encoding and the per-link state that
//! turns probes into RTT, jitter, loss and up/down.
//!
//! Each side of a link sends one probe per interval *inside the tunnel* (so
//! probes are authenticated by WireGuard and measure the path data takes). A
//! probe also echoes the last probe received from the other side, with how long
//! it was held, and how many of the other side's probes have arrived. One packet
//! per interval in each direction thus gives both sides an RTT sample and the
//! loss of both directions, like BFD's asynchronous mode with an echo.
//!
//! The probe is an IPv4 packet of protocol 253 (RFC 3692, for experiments) with
//! a 12-byte payload, 32 bytes in all: the smallest inner packet boringtun pads
//! to, so a probe is a 64-byte WireGuard message (92 bytes with IPv4 and UDP
//! headers, 920 B/s per link and direction at the default 100 ms).
//!
//! A probe may also list peers the sender cannot reach right now (their
//! addresses): a node whose path to X goes through the sender then fails over
//! without waiting for the controller.

use crate::packet::internet_checksum;
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// IP protocol number of probe packets (RFC 3692: experimentation and testing).
pub const PROTOCOL: u8 = 253;
const MAGIC: [u8; 2] = *b"SP";
const VERSION: u8 = 1;
const HEADER: usize = 20;
const PAYLOAD: usize = 12;
/// Largest number of unreachable peers one probe lists.
pub const MAX_DOWN: usize = 64;
/// Sent probes remembered for matching echoes.
const SENT_RING: usize = 64;
/// `hold` of a probe that echoes nothing.
const NO_ECHO: u16 = u16::MAX;
/// Unit of the `hold` field.
const HOLD_UNIT: Duration = Duration::from_micros(10);

/// Probe settings (`[probe]` in the agent config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    /// One probe per link and direction per interval.
    pub interval: Duration,
    /// Loss is computed over this much history.
    pub window: Duration,
    /// A link is down after this many intervals without a probe from the peer
    /// (or without an echo of ours).
    pub down_after: u32,
    /// A link that was down must stay up this long before traffic moves back to it.
    pub failback_hold: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            window: Duration::from_secs(30),
            down_after: 3,
            failback_hold: Duration::from_secs(5),
        }
    }
}

impl ProbeConfig {
    /// How long without a probe before the link is declared down: `down_after`
    /// intervals, plus half an interval for scheduling noise.
    pub fn detect_time(&self) -> Duration {
        self.interval * self.down_after + self.interval / 2
    }
}

/// A decoded probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub seq: u16,
    /// The last of the receiver's probes the sender got, and how long it held it.
    pub echo: Option<(u16, Duration)>,
    /// How many of the receiver's probes the sender has received (wrapping).
    pub rx_count: u16,
    /// Peers the sender cannot reach (their node addresses).
    pub down: Vec<Ipv4Addr>,
}

impl Probe {
    /// The probe as an IPv4 packet from `src` to `dst`, written to `out`; returns its length.
    pub fn encode(&self, src: Ipv4Addr, dst: Ipv4Addr, out: &mut [u8]) -> usize {
        let down = &self.down[..self.down.len().min(MAX_DOWN)];
        let total = HEADER + PAYLOAD + 4 * down.len();
        let p = &mut out[..total];
        p.fill(0);
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 1; // TTL 1: a probe is never routed
        p[9] = PROTOCOL;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let sum = internet_checksum(&p[..HEADER]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        let b = &mut p[HEADER..];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = down.len() as u8;
        b[4..6].copy_from_slice(&self.seq.to_be_bytes());
        let (echo_seq, hold) = match self.echo {
            Some((seq, held)) => {
                let units = held.as_micros() / HOLD_UNIT.as_micros();
                (seq, units.min(u128::from(NO_ECHO - 1)) as u16)
            }
            None => (0, NO_ECHO),
        };
        b[6..8].copy_from_slice(&echo_seq.to_be_bytes());
        b[8..10].copy_from_slice(&hold.to_be_bytes());
        b[10..12].copy_from_slice(&self.rx_count.to_be_bytes());
        for (i, ip) in down.iter().enumerate() {
            b[PAYLOAD + 4 * i..PAYLOAD + 4 * i + 4].copy_from_slice(&ip.octets());
        }
        total
    }

    /// Whether a decrypted packet is a probe (it is then never delivered).
    pub fn is_probe(packet: &[u8]) -> bool {
        packet.len() >= HEADER + PAYLOAD
            && packet[0] == 0x45
            && packet[9] == PROTOCOL
            && packet[HEADER..HEADER + 2] == MAGIC
    }

    /// Decodes a probe packet; `None` if it is malformed or of another version.
    pub fn decode(packet: &[u8]) -> Option<Probe> {
        if !Self::is_probe(packet) {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        let p = packet.get(..total)?;
        // The IPv4 total length may end inside the probe's fixed part.
        let b = p.get(HEADER..).filter(|b| b.len() >= PAYLOAD)?;
        if b[2] != VERSION {
            return None;
        }
        let n = usize::from(b[3]);
        if n > MAX_DOWN || b.len() != PAYLOAD + 4 * n {
            return None;
        }
        let be = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let hold = be(8);
        Some(Probe {
            seq: be(4),
            echo: (hold != NO_ECHO).then(|| (be(6), HOLD_UNIT * u32::from(hold))),
            rx_count: be(10),
            down: (0..n)
                .map(|i| {
                    let o = PAYLOAD + 4 * i;
                    Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3])
                })
                .collect(),
        })
    }
}

/// What a link's state change means for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down(DownCause),
}

/// Why a link was declared down, with how long the condition had lasted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownCause {
    /// No probe from the peer for this long.
    Silent(Duration),
    /// The peer's probes arrive but have echoed none of ours for this long (a
    /// one-way cut).
    Unanswered(Duration),
}

impl std::fmt::Display for DownCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent(d) => write!(f, "no probe from the peer for {} ms", d.as_millis()),
            Self::Unanswered(d) => {
                write!(
                    f,
                    "the peer echoed none of our probes for {} ms",
                    d.as_millis()
                )
            }
        }
    }
}

/// The measured state of one link (this node to one peer).
#[derive(Debug, Clone)]
pub struct Link {
    next_seq: u16,
    sent: [Option<(u16, Instant)>; SENT_RING],
    probes_sent: u64,
    probes_received: u64,
    /// The last probe received: its seq and when.
    last_rx: Option<(u16, Instant)>,
    /// The peer's probes received so far (wrapping, as sent in probes).
    rx_count: u16,
    /// The newest echo of our probes seen, and when it arrived.
    last_ack: Option<(u16, Instant)>,
    srtt: Option<Duration>,
    last_rtt: Option<Duration>,
    jitter: Duration,
    /// (time, our seq the peer echoed, peer's count of our probes).
    forward: VecDeque<(Instant, u16, u16)>,
    /// (time, the peer's seq, our count of its probes).
    reverse: VecDeque<(Instant, u16, u16)>,
    up: bool,
    /// When the link last changed state (or was created).
    changed: Instant,
    /// Whether it ever went down after being up (only then is failback held).
    flapped: bool,
    /// What the peer says it cannot reach.
    peer_down: Vec<Ipv4Addr>,
    /// History kept for loss.
    window: Duration,
    /// Time the agent stood still (see [`Link::stood_still`]) since the last
    /// probe from the peer, and since the newest echo of ours: not silence.
    still_rx: Duration,
    still_ack: Duration,
}

impl Link {
    pub fn new(window: Duration, now: Instant) -> Self {
        Self {
            next_seq: 1,
            sent: [None; SENT_RING],
            probes_sent: 0,
            probes_received: 0,
            last_rx: None,
            rx_count: 0,
            last_ack: None,
            srtt: None,
            last_rtt: None,
            jitter: Duration::ZERO,
            forward: VecDeque::new(),
            reverse: VecDeque::new(),
            up: false,
            changed: now,
            flapped: false,
            peer_down: Vec::new(),
            window,
            still_rx: Duration::ZERO,
            still_ack: Duration::ZERO,
        }
    }

    /// The next probe to send now, with the echo of the peer's last one.
    pub fn next_probe(&mut self, down: Vec<Ipv4Addr>, now: Instant) -> Probe {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.sent[usize::from(seq) % SENT_RING] = Some((seq, now));
        self.probes_sent += 1;
        Probe {
            seq,
            echo: self
                .last_rx
                .map(|(s, at)| (s, now.saturating_duration_since(at))),
            rx_count: self.rx_count,
            down,
        }
    }

    /// A probe arrived from the peer. Returns `Some(Up)` if the link came up.
    pub fn handle_probe(&mut self, probe: &Probe, now: Instant) -> Option<Transition> {
        self.probes_received += 1;
        self.rx_count = self.rx_count.wrapping_add(1);
        self.last_rx = Some((probe.seq, now));
        self.still_rx = Duration::ZERO;
        self.reverse.push_back((now, probe.seq, self.rx_count));
        self.peer_down.clone_from(&probe.down);
        if let Some((echo_seq, held)) = probe.echo {
            let fresh = self.last_ack.is_none_or(|(s, _)| seq_after(echo_seq, s));
            if fresh {
                self.forward.push_back((now, echo_seq, probe.rx_count));
                self.last_ack = Some((echo_seq, now));
                self.still_ack = Duration::ZERO;
                if let Some(Some((s, sent_at))) = self.sent.get(usize::from(echo_seq) % SENT_RING) {
                    if *s == echo_seq {
                        let rtt = now.saturating_duration_since(*sent_at).saturating_sub(held);
                        self.sample_rtt(rtt);
                    }
                }
            }
        }
        self.trim(now);
        if !self.up {
            self.up = true;
            self.changed = now;
            return Some(Transition::Up);
        }
        None
    }

    fn sample_rtt(&mut self, rtt: Duration) {
        // RFC 6298 smoothing for the RTT, RFC 3550's estimator for the jitter
        // (mean deviation between consecutive samples).
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => (s * 7 + rtt) / 8,
        });
        if let Some(last) = self.last_rtt {
            let d = rtt.abs_diff(last);
            self.jitter = if d > self.jitter {
                self.jitter + (d - self.jitter) / 16
            } else {
                self.jitter - (self.jitter - d) / 16
            };
        }
        self.last_rtt = Some(rtt);
    }

    fn trim(&mut self, now: Instant) {
        // Keep the newest entry older than the window as the baseline.
        let window = self.window;
        for hist in [&mut self.forward, &mut self.reverse] {
            while hist.len() > 2 && now.saturating_duration_since(hist[1].0) > window {
                hist.pop_front();
            }
        }
    }

    /// Checks the timers; returns `Some(Down)` when the link just failed.
    pub fn check(&mut self, config: &ProbeConfig, now: Instant) -> Option<Transition> {
        let cause = self.failing(config, now)?;
        self.still_rx = Duration::ZERO;
        self.still_ack = Duration::ZERO;
        self.up = false;
        self.flapped = true;
        self.changed = now;
        Some(Transition::Down(cause))
    }

    /// The agent's timers did not run from `from` to `to` (see
    /// `Node::handle_timeout`): the peer's probes of that time may be waiting
    /// unread or, if the whole machine stood still, were never sent. The part
    /// of it after the last probe (or echo) is not counted as silence.
    pub fn stood_still(&mut self, from: Instant, to: Instant) {
        let part = |last: Option<(u16, Instant)>| {
            to.saturating_duration_since(last.map_or(from, |(_, at)| at.max(from)))
        };
        self.still_rx += part(self.last_rx);
        self.still_ack += part(self.last_ack);
    }

    /// Why [`check`](Self::check) would declare this link down at `now`, if it would.
    pub fn failing(&self, config: &ProbeConfig, now: Instant) -> Option<DownCause> {
        if !self.up {
            return None;
        }
        let detect = config.detect_time();
        let since = |at: Instant| now.saturating_duration_since(at);
        // Up means a probe arrived. Silence is judged without the time the
        // agent stood still; the cause reports the whole of it.
        let silent = since(self.last_rx?.1);
        if silent.saturating_sub(self.still_rx) > detect {
            return Some(DownCause::Silent(silent));
        }
        // Our probes stopped getting through (a one-way cut): the newest echo is
        // older than the detection time plus the round trip.
        let unanswered = self.last_ack.map(|(_, at)| since(at))?;
        (unanswered.saturating_sub(self.still_ack) > detect + self.srtt.unwrap_or_default())
            .then_some(DownCause::Unanswered(unanswered))
    }

    pub fn up(&self) -> bool {
        self.up
    }

    /// Whether the link ever worked (it is measured).
    pub fn known(&self) -> bool {
        self.up || self.flapped
    }

    /// This link failed after working: it goes in the down list of our probes.
    pub fn reports_down_self(&self) -> bool {
        self.flapped && !self.up
    }

    /// The peer listed unreachable nodes in its last probe.
    pub fn reports_down(&self) -> bool {
        !self.peer_down.is_empty()
    }

    /// Up, and (if it failed before) up for at least `hold`: traffic may return.
    pub fn settled(&self, hold: Duration, now: Instant) -> bool {
        self.up && (!self.flapped || now.saturating_duration_since(self.changed) >= hold)
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    pub fn jitter(&self) -> Duration {
        self.jitter
    }

    /// Probes lost over the window, both directions pooled; 1.0 while down.
    pub fn loss(&self) -> f64 {
        if !self.up {
            return if self.probes_received == 0 && self.probes_sent == 0 {
                0.0
            } else {
                1.0
            };
        }
        let span = |h: &VecDeque<(Instant, u16, u16)>| match (h.front(), h.back()) {
            (Some(a), Some(b)) => (
                u64::from(b.1.wrapping_sub(a.1)),
                u64::from(b.2.wrapping_sub(a.2)),
            ),
            _ => (0, 0),
        };
        let (fs, fr) = span(&self.forward);
        let (rs, rr) = span(&self.reverse);
        let expected = fs + rs;
        if expected == 0 {
            return 0.0;
        }
        let got = (fr + rr).min(expected);
        1.0 - got as f64 / expected as f64
    }

    pub fn probes_sent(&self) -> u64 {
        self.probes_sent
    }

    pub fn probes_received(&self) -> u64 {
        self.probes_received
    }

    /// Whether the peer reported that it cannot reach `addr`.
    pub fn peer_cannot_reach(&self, addr: Ipv4Addr) -> bool {
        self.peer_down.contains(&addr)
    }
}

/// `a` is newer than `b` in 16-bit serial-number arithmetic (RFC 1982).
fn seq_after(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Carries a probe through its encoding, as the tunnel would.
    fn wire(p: &Probe) -> Probe {
        let mut buf = [0u8; 512];
        let n = p.encode(A, B, &mut buf);
        assert!(Probe::is_probe(&buf[..n]));
        Probe::decode(&buf[..n]).expect("decodes")
    }

    #[test]
    fn encoding_round_trips_and_is_32_bytes_without_a_down_list() {
        let p = Probe {
            seq: 65535,
            echo: Some((7, Duration::from_micros(98_760))),
            rx_count: 12,
            down: Vec::new(),
        };
        let mut buf = [0u8; 64];
        assert_eq!(p.encode(A, B, &mut buf), 32);
        assert_eq!(
            internet_checksum(&buf[..20]),
            0,
            "valid IPv4 header checksum"
        );
        assert_eq!(crate::packet::source(&buf), Some(A.into()));
        assert_eq!(Probe::decode(&buf[..32]), Some(p));
        let q = Probe {
            seq: 1,
            echo: None,
            rx_count: 0,
            down: vec![B, A],
        };
        assert_eq!(wire(&q), q);
    }

    /// Found by the `packet` fuzz target: an IPv4 total length that ends
    /// inside the probe's fixed part panicked; a down list longer than any
    /// encoder writes is refused too.
    #[test]
    fn a_total_length_inside_the_probe_or_a_long_down_list_is_refused() {
        let p = Probe {
            seq: 1,
            echo: None,
            rx_count: 0,
            down: Vec::new(),
        };
        let mut buf = [0u8; 600];
        let len = p.encode(A, B, &mut buf);
        for total in [20u16, 21, 22, 23, 31] {
            let mut b = buf;
            b[2..4].copy_from_slice(&total.to_be_bytes());
            assert_eq!(Probe::decode(&b[..len]), None, "total {total}");
        }
        let long = Probe {
            down: vec![A; MAX_DOWN + 1],
            ..p
        };
        // encode caps the list; forge a longer one by hand.
        let len = long.encode(A, B, &mut buf);
        let mut forged = buf[..len].to_vec();
        forged.extend(std::iter::repeat_n(0u8, 4));
        let total = u16::try_from(forged.len()).expect("len");
        forged[2..4].copy_from_slice(&total.to_be_bytes());
        forged[HEADER + 3] = u8::try_from(MAX_DOWN + 1).expect("n");
        assert_eq!(Probe::decode(&forged), None);
    }

    #[test]
    fn malformed_probes_are_rejected() {
        let p = Probe {
            seq: 1,
            echo: None,
            rx_count: 0,
            down: vec![B],
        };
        let mut buf = [0u8; 64];
        let n = p.encode(A, B, &mut buf);
        assert!(Probe::decode(&buf[..n - 1]).is_none(), "truncated");
        let mut bad = buf;
        bad[20 + 3] = 9; // claims 9 entries
        assert!(Probe::decode(&bad[..n]).is_none());
        let mut other = buf;
        other[20 + 2] = 2; // another version
        assert!(Probe::decode(&other[..n]).is_none());
        let mut udp = buf;
        udp[9] = 17;
        assert!(!Probe::is_probe(&udp[..n]));
    }

    /// Two links exchanging probes every `interval` over a path of one-way
    /// `delay`; `lost(i, dir)` drops the i-th probe of a direction (0: a to b).
    fn exchange(
        a: &mut Link,
        b: &mut Link,
        start: Instant,
        rounds: u32,
        interval: Duration,
        delay: impl Fn(u32) -> Duration,
        lost: impl Fn(u32, u8) -> bool,
    ) -> Instant {
        let mut now = start;
        for i in 0..rounds {
            // a sends at now; b sends half an interval later.
            let pa = wire(&a.next_probe(Vec::new(), now));
            if !lost(i, 0) {
                b.handle_probe(&pa, now + delay(i));
            }
            let tb = now + interval / 2;
            let pb = wire(&b.next_probe(Vec::new(), tb));
            if !lost(i, 1) {
                a.handle_probe(&pb, tb + delay(i));
            }
            now += interval;
        }
        now
    }

    #[test]
    fn rtt_subtracts_the_hold_time() {
        let t = Instant::now();
        let (mut a, mut b) = (Link::new(ms(30_000), t), Link::new(ms(30_000), t));
        exchange(&mut a, &mut b, t, 50, ms(100), |_| ms(40), |_, _| false);
        let rtt = a.rtt().expect("a has samples");
        assert!(rtt.abs_diff(ms(80)) < ms(1), "{rtt:?}");
        let rtt = b.rtt().expect("b has samples");
        assert!(rtt.abs_diff(ms(80)) < ms(1), "{rtt:?}");
        assert!(a.jitter() < ms(1));
        assert_eq!(a.loss(), 0.0);
        assert!(a.up() && b.up());
    }

    #[test]
    fn jitter_follows_delay_variation() {
        let t = Instant::now();
        let (mut a, mut b) = (Link::new(ms(30_000), t), Link::new(ms(30_000), t));
        // Delay alternates 40 and 50 ms: consecutive RTT samples differ by ~10-20 ms.
        exchange(
            &mut a,
            &mut b,
            t,
            200,
            ms(100),
            |i| if i % 2 == 0 { ms(40) } else { ms(50) },
            |_, _| false,
        );
        let j = a.jitter();
        assert!(j > ms(5) && j < ms(20), "{j:?}");
        let rtt = a.rtt().expect("rtt");
        assert!(rtt > ms(80) && rtt < ms(100), "{rtt:?}");
    }

    #[test]
    fn loss_pools_both_directions() {
        let t = Instant::now();
        let (mut a, mut b) = (Link::new(ms(30_000), t), Link::new(ms(30_000), t));
        // Every 10th probe lost a to b; every 20th b to a: (10% + 5%) / 2 pooled.
        exchange(
            &mut a,
            &mut b,
            t,
            200,
            ms(100),
            |_| ms(10),
            |i, dir| (dir == 0 && i % 10 == 3) || (dir == 1 && i % 20 == 7),
        );
        let loss = a.loss();
        assert!((loss - 0.075).abs() < 0.01, "{loss}");
        let loss = b.loss();
        assert!((loss - 0.075).abs() < 0.01, "{loss}");
    }

    #[test]
    fn loss_forgets_history_older_than_the_window() {
        let t = Instant::now();
        let (mut a, mut b) = (Link::new(ms(5_000), t), Link::new(ms(5_000), t));
        // 10 s of 50% loss, then 10 s clean: a 5 s window sees only the clean part.
        let now = exchange(
            &mut a,
            &mut b,
            t,
            100,
            ms(100),
            |_| ms(5),
            |i, _| i % 2 == 0,
        );
        assert!(a.loss() > 0.3, "{}", a.loss());
        exchange(&mut a, &mut b, now, 100, ms(100), |_| ms(5), |_, _| false);
        assert!(a.loss() < 0.03, "{}", a.loss());
    }

    #[test]
    fn silence_takes_the_link_down_after_the_detect_time_and_failback_is_held() {
        let config = ProbeConfig::default();
        let t = Instant::now();
        let (mut a, mut b) = (Link::new(config.window, t), Link::new(config.window, t));
        let now = exchange(&mut a, &mut b, t, 20, ms(100), |_| ms(10), |_, _| false);
        let last = now - ms(50) + ms(10); // b's last probe arrived here
        assert_eq!(a.check(&config, last + ms(340)), None);
        assert_eq!(
            a.check(&config, last + ms(351)),
            Some(Transition::Down(DownCause::Silent(ms(351))))
        );
        assert!(!a.up());
        assert_eq!(a.loss(), 1.0);
        assert_eq!(a.check(&config, last + ms(400)), None, "reported once");
        // Probes come back: up at once, but not settled for failback_hold.
        let back = last + ms(2_000);
        let r = exchange(&mut a, &mut b, back, 1, ms(100), |_| ms(10), |_, _| false);
        assert!(a.up());
        assert!(!a.settled(config.failback_hold, r));
        let later = exchange(&mut a, &mut b, r, 60, ms(100), |_| ms(10), |_, _| false);
        assert!(a.settled(config.failback_hold, later));
    }

    #[test]
    fn time_the_agent_stood_still_is_not_silence_but_a_dead_link_still_goes_down() {
        let config = ProbeConfig::default();
        let t = Instant::now();
        let (mut a, mut b) = (Link::new(config.window, t), Link::new(config.window, t));
        let now = exchange(&mut a, &mut b, t, 20, ms(100), |_| ms(10), |_, _| false);
        let last = now - ms(50) + ms(10); // b's last probe arrived here

        // Asking does not change the link; the check then says the same.
        assert_eq!(a.failing(&config, last + ms(340)), None);
        let cause = a.failing(&config, last + ms(351));
        assert_eq!(cause, Some(DownCause::Silent(ms(351))));
        assert!(a.up());
        // Every check from here runs 60 ms late: only 25 ms of each 85 counts,
        // so 350 ms of silence takes 15 checks, and the cause tells all of it.
        let mut a2 = a.clone();
        let mut at = last;
        let down = loop {
            at += ms(85);
            a2.stood_still(at - ms(60), at);
            if let Some(t) = a2.check(&config, at) {
                break t;
            }
            assert!(at < last + ms(5_000), "never declared down");
        };
        assert_eq!(at - last, ms(85 * 15));
        assert_eq!(down, Transition::Down(DownCause::Silent(ms(85 * 15))));
        // A probe ends the silence and what was forgiven with it.
        let mut a3 = a.clone();
        a3.stood_still(last, last + ms(200));
        let p = wire(&b.next_probe(Vec::new(), last + ms(200)));
        a3.handle_probe(&p, last + ms(210));
        assert_eq!(a3.failing(&config, last + ms(210 + 340)), None);
        assert!(a3.failing(&config, last + ms(210 + 351)).is_some());
        assert_eq!(
            a.check(&config, last + ms(351)),
            Some(Transition::Down(DownCause::Silent(ms(351))))
        );
    }

    #[test]
    fn a_one_way_cut_is_seen_by_the_side_whose_probes_vanish() {
        let config = ProbeConfig::default();
        let t = Instant::now();
        let (mut a, mut b) = (Link::new(config.window, t), Link::new(config.window, t));
        let now = exchange(&mut a, &mut b, t, 20, ms(100), |_| ms(10), |_, _| false);
        // a's probes stop reaching b; b's still reach a.
        let end = exchange(
            &mut a,
            &mut b,
            now,
            6,
            ms(100),
            |_| ms(10),
            |_, dir| dir == 0,
        );
        // a hears b but gets no echo of its own probes; b hears nothing.
        assert!(matches!(
            a.check(&config, end),
            Some(Transition::Down(DownCause::Unanswered(d))) if d > config.detect_time()
        ));
        assert!(matches!(
            b.check(&config, end),
            Some(Transition::Down(DownCause::Silent(d))) if d > config.detect_time()
        ));
    }

    #[test]
    fn the_down_list_reaches_the_peer() {
        let t = Instant::now();
        let (mut a, mut b) = (Link::new(ms(1000), t), Link::new(ms(1000), t));
        let p = wire(&a.next_probe(vec![Ipv4Addr::new(100, 96, 0, 9)], t));
        b.handle_probe(&p, t + ms(1));
        assert!(b.peer_cannot_reach(Ipv4Addr::new(100, 96, 0, 9)));
        let p = wire(&a.next_probe(Vec::new(), t + ms(100)));
        b.handle_probe(&p, t + ms(101));
        assert!(!b.peer_cannot_reach(Ipv4Addr::new(100, 96, 0, 9)));
    }

    #[test]
    fn sequence_numbers_wrap() {
        assert!(seq_after(0, 65535));
        assert!(seq_after(5, 3));
        assert!(!seq_after(3, 5));
        assert!(!seq_after(3, 3));
    }
}
