//! Packet captures on lab interfaces: `tcpdump -w` inside a namespace, and a small reader
//! for the classic pcap file format that pulls out what the tests inspect (UDP datagrams).

use crate::netns::Netns;
use crate::proc::Spawned;
use crate::{wait_until, TestEnv};
use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

/// Link type of an Ethernet capture (veth).
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Link type of a raw-IP capture (TUN).
pub const LINKTYPE_RAW: u32 = 101;

/// A running `tcpdump -w`, stopped by [`Capture::finish`] (or on drop).
pub struct Capture {
    process: Spawned,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing full packets on `ifname` in `ns` and waits until tcpdump listens.
    pub fn start(env: &TestEnv, ns: &Netns, ifname: &str, label: &str) -> Result<Self> {
        let file = env.path(&format!("{label}.pcap"));
        let file_arg = file.to_str().context("capture path is not UTF-8")?;
        // --immediate-mode: hand over each packet at once (else a partly filled ring block
        // is still pending when SIGTERM arrives and never reaches the file).
        // -Z root: do not drop to the tcpdump user, which could not write into the scratch dir.
        let mut process = ns.spawn(
            env,
            &format!("tcpdump-{label}"),
            "tcpdump",
            &[
                "-i",
                ifname,
                "-n",
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-Z",
                "root",
                "-w",
                file_arg,
            ],
        )?;
        let listening = wait_until(Duration::from_secs(10), || {
            process.log().contains("listening on") || !matches!(process.try_status(), Ok(None))
        });
        process.ensure_running()?;
        if listening.is_none() {
            bail!(
                "tcpdump on {ifname} did not start listening: {}",
                process.log()
            );
        }
        Ok(Self { process, file })
    }

    /// Stops tcpdump (SIGTERM flushes the file) and reads the capture.
    pub fn finish(mut self) -> Result<Pcap> {
        // Give the last packets a moment to pass through the capture buffer.
        std::thread::sleep(Duration::from_millis(300));
        self.process.terminate(Duration::from_secs(5))?;
        Pcap::read(&self.file)
    }
}

/// One captured frame.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Bytes as captured.
    pub data: Vec<u8>,
}

/// A UDP/IPv4 datagram found in a capture.
#[derive(Clone, Debug)]
pub struct UdpDatagram {
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// UDP payload.
    pub payload: Vec<u8>,
}

/// What one frame is, as far as the tests care.
#[derive(Clone, Debug)]
pub enum Packet {
    /// ARP (harmless underlay chatter).
    Arp,
    /// UDP over IPv4.
    Udp(UdpDatagram),
    /// Anything else: (ethertype or 0, IP protocol or 0, frame length).
    Other {
        /// Ethertype (0 for raw IP captures).
        ethertype: u16,
        /// IP protocol number (0 when not IPv4).
        protocol: u8,
        /// Frame length.
        len: usize,
    },
}

/// A whole capture file.
#[derive(Clone, Debug)]
pub struct Pcap {
    /// Link type from the file header.
    pub linktype: u32,
    /// Frames in order.
    pub frames: Vec<Frame>,
    /// The raw file (for searching for plaintext).
    pub raw: Vec<u8>,
}

impl Pcap {
    /// Reads a classic pcap file (either byte order, micro- or nanosecond timestamps).
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(raw)
    }

    /// Parses classic pcap bytes.
    pub fn parse(raw: Vec<u8>) -> Result<Self> {
        if raw.len() < 24 {
            bail!("pcap too short ({} bytes)", raw.len());
        }
        let magic = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let le = match magic {
            0xa1b2c3d4 | 0xa1b23c4d => true,
            0xd4c3b2a1 | 0x4d3cb2a1 => false,
            m => bail!("not a pcap file (magic {m:#x})"),
        };
        let u32_at = |b: &[u8], i: usize| {
            let w = [b[i], b[i + 1], b[i + 2], b[i + 3]];
            if le {
                u32::from_le_bytes(w)
            } else {
                u32::from_be_bytes(w)
            }
        };
        let linktype = u32_at(&raw, 20);
        let mut frames = Vec::new();
        let mut at = 24;
        while at + 16 <= raw.len() {
            let incl = u32_at(&raw, at + 8) as usize;
            let start = at + 16;
            let end = start + incl;
            if end > raw.len() {
                break; // truncated last record (capture stopped mid-write)
            }
            frames.push(Frame {
                data: raw[start..end].to_vec(),
            });
            at = end;
        }
        Ok(Self {
            linktype,
            frames,
            raw,
        })
    }

    /// Classifies every frame.
    pub fn packets(&self) -> Vec<Packet> {
        self.frames
            .iter()
            .map(|f| classify(self.linktype, &f.data))
            .collect()
    }

    /// All UDP/IPv4 datagrams in the capture.
    pub fn udp(&self) -> Vec<UdpDatagram> {
        self.packets()
            .into_iter()
            .filter_map(|p| match p {
                Packet::Udp(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    /// Whether `needle` occurs anywhere in the file's bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.raw.windows(needle.len()).any(|w| w == needle)
    }
}

/// Decodes one frame far enough to tell ARP, UDP/IPv4 and everything else apart.
fn classify(linktype: u32, data: &[u8]) -> Packet {
    let other = |ethertype, protocol| Packet::Other {
        ethertype,
        protocol,
        len: data.len(),
    };
    let (ethertype, ip) = match linktype {
        LINKTYPE_ETHERNET if data.len() >= 14 => {
            (u16::from_be_bytes([data[12], data[13]]), &data[14..])
        }
        LINKTYPE_RAW => (0x0800, data),
        _ => return other(0, 0),
    };
    match ethertype {
        0x0806 => return Packet::Arp,
        0x0800 => {}
        t => return other(t, 0),
    }
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return other(ethertype, 0);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let protocol = ip[9];
    if protocol != 17 || total < ihl + 8 {
        return other(ethertype, protocol);
    }
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let udp = &ip[ihl..total];
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    Packet::Udp(UdpDatagram {
        src: SocketAddrV4::new(src_ip, sport),
        dst: SocketAddrV4::new(dst_ip, dport),
        payload: udp[8..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_ethernet_udp_frame() {
        let mut file = Vec::new();
        file.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        file.extend_from_slice(&[2, 0, 4, 0]);
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&65535u32.to_le_bytes());
        file.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let payload = b"hello";
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            17,
            0,
            0,
        ];
        ip.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 2]);
        ip.extend_from_slice(&51820u16.to_be_bytes());
        ip.extend_from_slice(&4000u16.to_be_bytes());
        ip.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(payload);
        frame.extend_from_slice(&ip);
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        file.extend_from_slice(&frame);
        let pcap = Pcap::parse(file).expect("valid pcap");
        let udp = pcap.udp();
        assert_eq!(udp.len(), 1);
        assert_eq!(udp[0].src, "192.0.2.1:51820".parse().expect("addr"));
        assert_eq!(udp[0].dst.port(), 4000);
        assert_eq!(udp[0].payload, payload);
        assert!(pcap.contains(b"hello"));
        assert!(!pcap.contains(b"absent"));
    }
}
