//! Packet batches: many packets laid out back to back in one reusable buffer.
//!
//! The core writes its output (datagrams for the UDP socket, decrypted packets for
//! the TUN) into these; the drivers drain them with one batched syscall where the
//! platform allows (sendmmsg/GSO), and equal-size runs to one destination stay
//! contiguous so GSO can send them as one buffer.

use std::net::SocketAddr;
use std::ops::Range;

/// Room reserved for one packet; covers a jumbo MTU plus WireGuard overhead.
pub const MAX_PACKET: usize = 9000 + 80;

#[derive(Debug)]
pub struct Batch<M> {
    buf: Vec<u8>,
    end: usize,
    items: Vec<(M, Range<usize>)>,
}

/// Datagrams to send to the underlay.
pub type Transmits = Batch<SocketAddr>;
/// Decrypted IP packets to write to the TUN device.
pub type TunWrites = Batch<()>;

impl<M: Copy> Batch<M> {
    pub fn with_capacity(packets: usize) -> Self {
        Self {
            buf: vec![0; packets.max(1) * 2048],
            end: 0,
            items: Vec::with_capacity(packets),
        }
    }

    /// A writable region of at least `len` bytes after the last packet.
    pub fn spare(&mut self, len: usize) -> &mut [u8] {
        if self.buf.len() < self.end + len {
            self.buf.resize((self.end + len).max(self.buf.len() * 2), 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records the first `len` bytes of the last [`spare`](Self::spare) region as a packet.
    pub fn commit(&mut self, meta: M, len: usize) {
        let range = self.end..self.end + len;
        self.end += len;
        self.items.push((meta, range));
    }

    /// Copies `data` in as a packet.
    pub fn push(&mut self, meta: M, data: &[u8]) {
        self.spare(data.len())[..data.len()].copy_from_slice(data);
        self.commit(meta, data.len());
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn clear(&mut self) {
        self.end = 0;
        self.items.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = (M, &[u8])> + '_ {
        self.items.iter().map(|(m, r)| (*m, &self.buf[r.clone()]))
    }
}

impl Transmits {
    /// Groups the datagrams into runs for segmentation offload: consecutive
    /// datagrams to one destination, all of the first one's size except a shorter
    /// last one, at most `max_segments` and 64 KiB in total. Each item is
    /// (destination, contiguous bytes, segment size).
    pub fn runs(&self, max_segments: usize) -> Runs<'_> {
        Runs {
            batch: self,
            next: 0,
            max_segments: max_segments.max(1),
        }
    }
}

/// Iterator over [`Transmits::runs`].
pub struct Runs<'a> {
    batch: &'a Transmits,
    next: usize,
    max_segments: usize,
}

impl<'a> Iterator for Runs<'a> {
    type Item = (SocketAddr, &'a [u8], usize);

    fn next(&mut self) -> Option<Self::Item> {
        let items = &self.batch.items;
        let i = self.next;
        if i >= items.len() {
            return None;
        }
        let max_segments = self.max_segments;
        let (dst, first) = &items[i];
        let seg = first.len();
        let mut j = i + 1;
        let mut total = seg;
        while j < items.len() && j - i < max_segments {
            let (d, r) = &items[j];
            if d != dst || r.len() > seg || total + r.len() > 65_000 || seg == 0 {
                break;
            }
            total += r.len();
            j += 1;
            if r.len() < seg {
                break;
            }
        }
        self.next = j;
        Some((*dst, &self.batch.buf[first.start..items[j - 1].1.end], seg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn runs_group_equal_sizes_per_destination() {
        let a = addr("192.0.2.1:51820");
        let b = addr("192.0.2.2:51820");
        let mut t = Transmits::with_capacity(4);
        for _ in 0..3 {
            t.push(a, &[1u8; 100]);
        }
        t.push(a, &[2u8; 40]); // shorter tail joins the run
        t.push(a, &[3u8; 100]); // starts a new run
        t.push(b, &[4u8; 100]);
        let runs: Vec<_> = t.runs(64).collect();
        let shape: Vec<_> = runs
            .iter()
            .map(|(d, bytes, seg)| (*d, bytes.len(), *seg))
            .collect();
        assert_eq!(shape, vec![(a, 340, 100), (a, 100, 100), (b, 100, 100)]);
        assert_eq!(t.runs(2).count(), 4);
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn spare_grows_and_keeps_earlier_packets() {
        let mut t = TunWrites::with_capacity(1);
        t.push((), &[7u8; 1500]);
        t.push((), &[8u8; 3000]);
        let lens: Vec<_> = t.iter().map(|(_, p)| (p.len(), p[0])).collect();
        assert_eq!(lens, vec![(1500, 7), (3000, 8)]);
    }
}
