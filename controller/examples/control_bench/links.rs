//! The simulated links: one compact table holding the state of every pair of
//! nodes, moved once a second by [`LinkModel::tick`], and what each simulated
//! agent reports of it ([`LinkModel::report`]).
//!
//! Owns only simulated link state. No IO and no clock: the driver passes `now`
//! and the random source, so the model is deterministic under a seed.
//!
//! The model (the bench's doc comment says why it looks like this):
//! - every unordered pair has a base RTT in [`RTT_MIN_US`, `RTT_MAX_US`),
//!   drawn from a hash of the two indices and the seed, and loss 0;
//! - each second, [`JITTER_SHARE`] of each active node's links get a new RTT,
//!   base × (1 ± up to [`JITTER_MAX_PERCENT`]%);
//! - each second, each active node takes one random link down with probability
//!   [`DOWN_PROBABILITY`], for [`DOWN_MIN`] to [`DOWN_MAX`];
//! - a pair's state is one byte (the jitter, or [`DOWN`]), shared by both ends,
//!   so both report the same change.

use rand::Rng;
use skymesh_wire::{LinkReport, LinkSample};
use std::sync::atomic::{AtomicI8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Share of a node's links whose RTT moves each second.
pub(crate) const JITTER_SHARE: f64 = 0.02;
/// Largest RTT move, either way, in percent of the base RTT.
pub(crate) const JITTER_MAX_PERCENT: u32 = 4;
/// Probability per node per second of taking one of its links down.
pub(crate) const DOWN_PROBABILITY: f64 = 0.002;
/// How long a link stays down.
pub(crate) const DOWN_MIN: Duration = Duration::from_secs(3);
pub(crate) const DOWN_MAX: Duration = Duration::from_secs(10);
/// Base RTTs are drawn from [RTT_MIN_US, RTT_MAX_US).
pub(crate) const RTT_MIN_US: u32 = 5_000;
pub(crate) const RTT_MAX_US: u32 = 250_000;

/// Jitter is stored in steps of 1/JITTER_STEPS of the base RTT...
const JITTER_STEPS: i64 = 2_000;
/// ...so ±4% is ±80 steps, which fits the state byte.
const JITTER_MAX: i8 = (JITTER_MAX_PERCENT as i64 * JITTER_STEPS / 100) as i8;
/// The state byte of a pair whose link is down.
const DOWN: i8 = i8::MIN;

/// A fixed-size set of node indices.
#[derive(Clone)]
pub(crate) struct BitSet {
    words: Vec<u64>,
    len: usize,
}

impl BitSet {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            words: vec![0; capacity.div_ceil(64)],
            len: 0,
        }
    }

    pub(crate) fn contains(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Adds `i`; true if it was not there.
    pub(crate) fn insert(&mut self, i: usize) -> bool {
        let Some(w) = self.words.get_mut(i / 64) else {
            return false;
        };
        let fresh = *w & (1 << (i % 64)) == 0;
        *w |= 1 << (i % 64);
        self.len += usize::from(fresh);
        fresh
    }

    pub(crate) fn remove(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            if *w & (1 << (i % 64)) != 0 {
                *w &= !(1 << (i % 64));
                self.len -= 1;
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// What one simulated agent has yet to report.
struct Pending {
    /// Peers this agent has sent a sample of: only their changes are reported.
    reported: BitSet,
    /// Peers that appeared in its netmap since its last report.
    appeared: Vec<u32>,
    /// Peers whose link changed since its last report (may repeat).
    changed: Vec<u32>,
}

struct Down {
    a: usize,
    b: usize,
    until: Instant,
}

/// Every pair's link state, and each agent's pending report.
pub(crate) struct LinkModel {
    seed: u64,
    names: Vec<String>,
    /// Nodes 0..active have sessions and move their links.
    active: AtomicUsize,
    /// Per unordered pair ([`pair_index`]): jitter in steps, or [`DOWN`].
    pairs: Vec<AtomicI8>,
    pending: Vec<Mutex<Pending>>,
    downs: Mutex<Vec<Down>>,
    /// Samples handed to the agents so far.
    samples: AtomicU64,
}

impl LinkModel {
    /// A model of the links between `names.len()` nodes, all up at their base RTT.
    pub(crate) fn new(names: Vec<String>, seed: u64) -> Self {
        let n = names.len();
        Self {
            seed,
            active: AtomicUsize::new(0),
            pairs: (0..n * n.saturating_sub(1) / 2)
                .map(|_| AtomicI8::new(0))
                .collect(),
            pending: (0..n)
                .map(|_| {
                    Mutex::new(Pending {
                        reported: BitSet::new(n),
                        appeared: Vec::new(),
                        changed: Vec::new(),
                    })
                })
                .collect(),
            downs: Mutex::new(Vec::new()),
            samples: AtomicU64::new(0),
            names,
        }
    }

    pub(crate) fn nodes(&self) -> usize {
        self.names.len()
    }

    /// Nodes 0..active have sessions; only their links move.
    pub(crate) fn set_active(&self, active: usize) {
        self.active
            .store(active.min(self.names.len()), Ordering::Relaxed);
    }

    /// Link samples handed to the agents so far.
    pub(crate) fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    /// Links currently down.
    pub(crate) fn down(&self) -> usize {
        lock(&self.downs).len()
    }

    /// One second of simulated time: brings back the links whose time is up,
    /// moves the RTT of a share of each active node's links and takes the odd
    /// link down.
    pub(crate) fn tick(&self, now: Instant, rng: &mut impl Rng) {
        let mut downs = lock(&self.downs);
        downs.retain(|d| {
            if d.until > now {
                return true;
            }
            self.pairs[pair_index(d.a, d.b)].store(0, Ordering::Relaxed);
            self.changed(d.a, d.b);
            false
        });
        let active = self.active.load(Ordering::Relaxed);
        if active < 2 {
            return;
        }
        let expected = (active - 1) as f64 * JITTER_SHARE;
        for a in 0..active {
            // A whole number of links on average `expected`, even when it is below 1.
            let count = expected as usize + usize::from(rng.gen::<f64>() < expected.fract());
            for _ in 0..count {
                let b = other(rng, a, active);
                let pair = &self.pairs[pair_index(a, b)];
                if pair.load(Ordering::Relaxed) != DOWN {
                    pair.store(rng.gen_range(-JITTER_MAX..=JITTER_MAX), Ordering::Relaxed);
                    self.changed(a, b);
                }
            }
            if rng.gen_bool(DOWN_PROBABILITY) {
                let b = other(rng, a, active);
                let pair = &self.pairs[pair_index(a, b)];
                if pair.load(Ordering::Relaxed) != DOWN {
                    pair.store(DOWN, Ordering::Relaxed);
                    let until = now + rng.gen_range(DOWN_MIN..=DOWN_MAX);
                    downs.push(Down { a, b, until });
                    self.changed(a, b);
                }
            }
        }
    }

    /// Peers that appeared in `agent`'s netmap: its next report carries them.
    pub(crate) fn appeared(&self, agent: usize, peers: &[u32]) {
        if let Some(p) = self.pending.get(agent) {
            lock(p).appeared.extend_from_slice(peers);
        }
    }

    /// What `agent` reports now: a sample of each peer that appeared in its
    /// netmap, and of each reported link that changed, since its last report.
    /// Links left out keep the sample the agent sent last.
    pub(crate) fn report(&self, agent: usize) -> LinkReport {
        let Some(pending) = self.pending.get(agent) else {
            return LinkReport { links: Vec::new() };
        };
        let mut ids = {
            let mut p = lock(pending);
            let mut ids = std::mem::take(&mut p.appeared);
            for &b in &ids {
                p.reported.insert(b as usize);
            }
            let changed = std::mem::take(&mut p.changed);
            ids.extend(
                changed
                    .into_iter()
                    .filter(|&b| p.reported.contains(b as usize)),
            );
            ids
        };
        ids.sort_unstable();
        ids.dedup();
        let links: Vec<LinkSample> = ids
            .into_iter()
            .filter(|&b| b as usize != agent)
            .map(|b| self.sample(agent, b as usize))
            .collect();
        self.samples
            .fetch_add(links.len() as u64, Ordering::Relaxed);
        LinkReport { links }
    }

    /// What `a` measures on its link to `b` now.
    fn sample(&self, a: usize, b: usize) -> LinkSample {
        let base = self.base_rtt_us(a, b);
        let state = self.pairs[pair_index(a, b)].load(Ordering::Relaxed);
        let peer = self.names[b].clone();
        if state == DOWN {
            return LinkSample {
                peer,
                up: false,
                rtt_us: base,
                jitter_us: 0,
                loss_ppm: 1_000_000,
            };
        }
        let rtt_us = (i64::from(base) * (JITTER_STEPS + i64::from(state)) / JITTER_STEPS) as u32;
        LinkSample {
            peer,
            up: true,
            rtt_us,
            jitter_us: rtt_us / 50,
            loss_ppm: 0,
        }
    }

    /// The pair's base RTT: a hash of the two indices, the same from both ends.
    pub(crate) fn base_rtt_us(&self, a: usize, b: usize) -> u32 {
        let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
        let h = splitmix64(self.seed ^ (hi << 32 | lo));
        RTT_MIN_US + (h % u64::from(RTT_MAX_US - RTT_MIN_US)) as u32
    }

    /// Both ends of the pair report its new state.
    fn changed(&self, a: usize, b: usize) {
        let cap = self.names.len();
        for (me, peer) in [(a, b), (b, a)] {
            let mut p = lock(&self.pending[me]);
            p.changed.push(peer as u32);
            // A node without a session is not drained; keep it bounded.
            if p.changed.len() > cap {
                p.changed.sort_unstable();
                p.changed.dedup();
            }
        }
    }
}

/// The index of the unordered pair {a, b}, a ≠ b, in a triangular table.
fn pair_index(a: usize, b: usize) -> usize {
    let (lo, hi) = (a.min(b), a.max(b));
    hi * (hi - 1) / 2 + lo
}

/// A random node in 0..active other than `a` (active ≥ 2).
fn other(rng: &mut impl Rng, a: usize, active: usize) -> usize {
    let b = rng.gen_range(0..active - 1);
    if b >= a {
        b + 1
    } else {
        b
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn model(n: usize) -> LinkModel {
        let m = LinkModel::new((0..n).map(|i| format!("n{i}")).collect(), 7);
        m.set_active(n);
        m
    }

    #[test]
    fn a_peer_is_reported_once_when_it_appears_then_only_when_it_changes() {
        let m = model(4);
        m.appeared(0, &[1, 2, 3]);
        let first = m.report(0);
        assert_eq!(first.links.len(), 3);
        assert!(first.links.iter().all(|l| l.up && l.loss_ppm == 0));
        assert!(m.report(0).links.is_empty(), "nothing changed");
        // A change of a link the agent never reported is not sent.
        m.changed(0, 1);
        m.changed(2, 1);
        assert_eq!(m.report(0).links.len(), 1);
        assert!(m.report(1).links.is_empty(), "1 reported no peer yet");
    }

    #[test]
    fn base_rtts_are_in_range_and_the_same_from_both_ends() {
        let m = model(50);
        for a in 0..50 {
            for b in 0..50 {
                if a != b {
                    let rtt = m.base_rtt_us(a, b);
                    assert!((RTT_MIN_US..RTT_MAX_US).contains(&rtt));
                    assert_eq!(rtt, m.base_rtt_us(b, a));
                }
            }
        }
    }

    #[test]
    fn about_two_percent_move_each_second_and_downs_come_back() {
        let n = 500;
        let m = model(n);
        for a in 0..n {
            m.appeared(a, &(0..n as u32).collect::<Vec<_>>());
            m.report(a);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        m.tick(t0, &mut rng);
        let moved: usize = (0..n).map(|a| m.report(a).links.len()).sum();
        // Each node moves ~2% of its 499 links; each move is reported by both ends.
        let expected = n as f64 * 499.0 * JITTER_SHARE * 2.0;
        assert!(
            (moved as f64) > expected * 0.8 && (moved as f64) < expected * 1.1,
            "{moved} samples for an expected {expected}"
        );
        let mut downs_seen = 0;
        for s in 1..=20u64 {
            m.tick(t0 + Duration::from_secs(s), &mut rng);
            for a in 0..n {
                downs_seen += m.report(a).links.iter().filter(|l| !l.up).count();
            }
        }
        assert!(downs_seen >= 2, "both ends report a link down");
        m.set_active(0);
        m.tick(t0 + Duration::from_secs(60), &mut rng);
        assert_eq!(m.down(), 0, "every link is back after {DOWN_MAX:?}");
    }
}
