//! What goes on the wire: `tcpdump` on an interface inside a namespace, and a small reader
//! for the pcap file it writes (Ethernet, IPv4, UDP and TCP — what the lab's links carry).
//!
//! The tests use it to check properties of the traffic itself, e.g. that no media datagram is
//! larger than 512 bytes and that a known plaintext never appears in what a peer sends.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use patchbay::Device;

use crate::Error;
use crate::error::find_tool;

/// How long tcpdump may take to start listening.
const START_WAIT: Duration = Duration::from_secs(5);
/// Link type of Ethernet captures.
const LINKTYPE_ETHERNET: u32 = 1;

/// A running `tcpdump` writing a pcap file; stopped (and reaped) on [`stop`](Self::stop) or drop.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    path: PathBuf,
}

impl Capture {
    /// Captures everything on `iface` in `device`'s namespace into `path`, packet by packet,
    /// whole packets. Returns once tcpdump listens.
    pub fn start(device: &Device, iface: &str, path: &Path) -> Result<Self, Error> {
        let tcpdump = find_tool("tcpdump").ok_or(Error::MissingTool {
            tool: "tcpdump",
            package: "tcpdump",
        })?;
        let mut cmd = Command::new(tcpdump);
        // -Z root: keep writing as root (tcpdump otherwise drops to a user that may not be
        // able to write `path`). --immediate-mode: each packet reaches tcpdump (and, with -U,
        // the file) as it is captured; without it the kernel hands them over in blocks about
        // once a second, and the last block is lost when `stop` kills tcpdump.
        cmd.args(["-i", iface, "-n", "--immediate-mode", "-U", "-s", "0", "-Z", "root", "-w"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = device.spawn_command_sync(cmd).map_err(|e| Error::Command {
            command: format!("tcpdump -i {iface}"),
            stderr: format!("{e:#}"),
        })?;
        let stderr = child.stderr.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let Some(stderr) = stderr else { return };
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut capture = Self {
            child: Some(child),
            path: path.to_path_buf(),
        };
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(START_WAIT) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(line) => said.push(line),
                Err(_) => {
                    capture.kill();
                    return Err(Error::Command {
                        command: format!("tcpdump -i {iface}"),
                        stderr: format!("did not start listening within {START_WAIT:?}: {}", said.join("; ")),
                    });
                }
            }
        }
    }

    /// Stops the capture (after a moment for the last packets) and reads what it wrote.
    pub fn stop(mut self) -> Result<Vec<Packet>, Error> {
        std::thread::sleep(Duration::from_millis(300));
        self.kill();
        let bytes = std::fs::read(&self.path).map_err(Error::io(format!("reading {}", self.path.display())))?;
        parse_pcap(&bytes)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Transport of a captured packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

/// One captured IPv4 UDP or TCP packet.
#[derive(Debug, Clone)]
pub struct Packet {
    /// UDP or TCP.
    pub proto: Proto,
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// The UDP payload, or the TCP segment's data.
    pub payload: Vec<u8>,
    /// The whole captured frame.
    pub frame: Vec<u8>,
}

/// Reads a classic pcap file of Ethernet frames; keeps the IPv4 UDP and TCP packets (ARP, IPv6
/// and the rest are skipped). A record cut short at the end (a capture stopped mid-write) ends
/// the list.
pub fn parse_pcap(bytes: &[u8]) -> Result<Vec<Packet>, Error> {
    let bad = |why: &str| Error::InvalidScenario(format!("unreadable capture: {why}"));
    if bytes.len() < 24 {
        return Err(bad("shorter than a pcap header"));
    }
    let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => return Err(bad("not a pcap file")),
    };
    let u32_at = |b: &[u8], at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let linktype = u32_at(bytes, 20) & 0x0fff_ffff;
    if linktype != LINKTYPE_ETHERNET {
        return Err(bad(&format!("link type {linktype}, expected Ethernet")));
    }
    let mut packets = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32_at(bytes, at + 8) as usize;
        let start = at + 16;
        let Some(frame) = bytes.get(start..start + len) else {
            break;
        };
        at = start + len;
        if let Some(p) = parse_ethernet(frame) {
            packets.push(p);
        }
    }
    Ok(packets)
}

fn parse_ethernet(frame: &[u8]) -> Option<Packet> {
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let mut ip_at = 14;
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        ip_at = 18;
    }
    if ethertype != 0x0800 {
        return None;
    }
    let ip = frame.get(ip_at..)?;
    if ip.first()? >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let ip = ip.get(..total.min(ip.len()))?;
    let addr = |at: usize| {
        Some(Ipv4Addr::new(
            *ip.get(at)?,
            *ip.get(at + 1)?,
            *ip.get(at + 2)?,
            *ip.get(at + 3)?,
        ))
    };
    let (src_ip, dst_ip) = (addr(12)?, addr(16)?);
    let l4 = ip.get(ihl..)?;
    let port = |at: usize| Some(u16::from_be_bytes([*l4.get(at)?, *l4.get(at + 1)?]));
    let (proto, data_at) = match ip.get(9)? {
        17 => (Proto::Udp, 8),
        6 => (Proto::Tcp, usize::from(l4.get(12)? >> 4) * 4),
        _ => return None,
    };
    Some(Packet {
        proto,
        src: SocketAddrV4::new(src_ip, port(0)?),
        dst: SocketAddrV4::new(dst_ip, port(2)?),
        payload: l4.get(data_at..)?.to_vec(),
        frame: frame.to_vec(),
    })
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pcap file (little-endian, Ethernet) holding `frames`.
    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, LINKTYPE_ETHERNET] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        // (the version field is two u16s, written here as one u32: 2, 4)
        for f in frames {
            for v in [0u32, 0, f.len() as u32, f.len() as u32] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(f);
        }
        out
    }

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + l4.len()) as u16;
        f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(l4);
        f.extend_from_slice(&[0; 6]); // Ethernet padding, not part of the IP packet
        f
    }

    #[test]
    fn udp_and_tcp_payloads_are_read_and_padding_is_not() {
        let mut udp = vec![0x30, 0x39, 0x00, 0x35, 0, 13, 0, 0];
        udp.extend_from_slice(b"hello");
        let mut tcp = vec![
            0x01, 0xbb, 0x30, 0x39, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0, 0, 0, 0, 0, 0,
        ];
        tcp.extend_from_slice(b"world!");
        let bytes = pcap(&[ipv4(17, &udp), ipv4(6, &tcp), vec![0xff; 20]]);
        let got = parse_pcap(&bytes).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].proto, got[0].payload.as_slice()), (Proto::Udp, &b"hello"[..]));
        assert_eq!(got[0].src, "10.0.0.1:12345".parse().unwrap());
        assert_eq!(got[0].dst, "10.0.0.2:53".parse().unwrap());
        assert_eq!((got[1].proto, got[1].payload.as_slice()), (Proto::Tcp, &b"world!"[..]));
        assert!(contains(&got[1].frame, b"world"));
        assert!(!contains(&got[1].frame, b"worlds"));
    }

    #[test]
    fn a_truncated_last_record_ends_the_list_and_garbage_is_an_error() {
        let mut bytes = pcap(&[ipv4(17, &[0, 1, 0, 2, 0, 9, 0, 0, 7])]);
        let whole = parse_pcap(&bytes).unwrap().len();
        bytes.truncate(bytes.len() - 3);
        assert_eq!((whole, parse_pcap(&bytes).unwrap().len()), (1, 0));
        assert!(parse_pcap(b"not a capture at all, really").is_err());
    }
}
