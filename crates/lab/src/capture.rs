//! What goes on the wire: `tcpdump` on an interface inside a namespace, and a reader for the
//! pcap file it writes (Ethernet, IPv4, UDP and TCP — what the lab's links carry): the file
//! format by `pcap-file`, the headers by `etherparse`.
//!
//! The tests use it to check properties of the traffic itself, e.g. that no media datagram is
//! larger than 512 bytes and that a known plaintext never appears in what a peer sends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};
use patchbay::Device;
use pcap_file::pcap::PcapParser;
use pcap_file::{DataLink, PcapError};

use crate::Error;
use crate::error::find_tool;

/// How long tcpdump may take to start listening.
const START_WAIT: Duration = Duration::from_secs(5);

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
        let child = device
            .spawn_command_sync(tcpdump(iface, path)?)
            .map_err(|e| Error::Command {
                command: format!("tcpdump -i {iface}"),
                stderr: format!("{e:#}"),
            })?;
        Self::listening(child, iface, path)
    }

    /// Takes over a started tcpdump and waits until it says it listens.
    fn listening(mut child: Child, iface: &str, path: &Path) -> Result<Self, Error> {
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

/// `tcpdump` capturing everything on `iface` into `path`, packet by packet, whole packets.
fn tcpdump(iface: &str, path: &Path) -> Result<Command, Error> {
    let tcpdump = find_tool("tcpdump").ok_or(Error::MissingTool {
        tool: "tcpdump",
        package: "tcpdump",
    })?;
    let mut cmd = Command::new(tcpdump);
    // -Z root: keep writing as root (tcpdump otherwise drops to a user that may not be able to
    // write `path`). --immediate-mode: each packet reaches tcpdump (and, with -U, the file) as
    // it is captured; without it the kernel hands them over in blocks about once a second, and
    // the last block is lost when `stop` kills tcpdump.
    cmd.args(["-i", iface, "-n", "--immediate-mode", "-U"])
        .args(["-s", "0", "-Z", "root", "-w"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(cmd)
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
    /// The TCP sequence number of the segment's first data byte (`None` for UDP).
    pub seq: Option<u32>,
    /// The whole captured frame.
    pub frame: Vec<u8>,
}

/// Reads a classic pcap file of Ethernet frames; keeps the IPv4 UDP and TCP packets (ARP, IPv6
/// and the rest are skipped). A record cut short at the end (a capture stopped mid-write) ends
/// the list.
pub fn parse_pcap(bytes: &[u8]) -> Result<Vec<Packet>, Error> {
    let bad = |why: String| Error::InvalidScenario(format!("unreadable capture: {why}"));
    let (mut rest, parser) = PcapParser::new(bytes).map_err(|e| match e {
        PcapError::IncompleteBuffer => bad("shorter than a pcap header".into()),
        e => bad(format!("not a pcap file ({e})")),
    })?;
    let datalink = parser.header().datalink;
    if datalink != DataLink::ETHERNET {
        return Err(bad(format!("link type {datalink:?}, expected Ethernet")));
    }
    let mut packets = Vec::new();
    // Raw records: their lengths are taken as written, not checked against the snap length.
    // The only error left is a record cut short, which ends the list.
    while let Ok((next, record)) = parser.next_raw_packet(rest) {
        rest = next;
        packets.extend(parse_ethernet(&record.data));
    }
    Ok(packets)
}

/// An IPv4 UDP or TCP packet in an Ethernet frame (VLAN tags skipped). Lengths are taken from
/// the IP (and UDP) headers, so Ethernet padding is not payload; a frame shorter than its IP
/// length keeps what it has.
fn parse_ethernet(frame: &[u8]) -> Option<Packet> {
    let sliced = LaxSlicedPacket::from_ethernet(frame).ok()?;
    let Some(LaxNetSlice::Ipv4(ip)) = &sliced.net else {
        return None;
    };
    let ip = ip.header();
    let (proto, ports, payload, seq) = match sliced.transport? {
        TransportSlice::Udp(udp) => (
            Proto::Udp,
            (udp.source_port(), udp.destination_port()),
            udp.payload(),
            None,
        ),
        TransportSlice::Tcp(tcp) => (
            Proto::Tcp,
            (tcp.source_port(), tcp.destination_port()),
            tcp.payload(),
            Some(tcp.sequence_number()),
        ),
        _ => return None,
    };
    Some(Packet {
        proto,
        src: SocketAddrV4::new(ip.source_addr(), ports.0),
        dst: SocketAddrV4::new(ip.destination_addr(), ports.1),
        payload: payload.to_vec(),
        seq,
        frame: frame.to_vec(),
    })
}

/// The byte streams of the TCP connections in `packets`, one per direction (`src → dst`),
/// reassembled by sequence number: retransmitted and overlapping segments are taken once. A
/// gap (a segment the capture missed) ends that stream's bytes there.
pub fn tcp_streams(packets: &[Packet]) -> std::collections::BTreeMap<(SocketAddrV4, SocketAddrV4), Vec<u8>> {
    let mut segments: std::collections::BTreeMap<_, Vec<(u32, &[u8])>> = Default::default();
    for p in packets
        .iter()
        .filter(|p| p.proto == Proto::Tcp && !p.payload.is_empty())
    {
        if let Some(seq) = p.seq {
            segments.entry((p.src, p.dst)).or_default().push((seq, &p.payload));
        }
    }
    segments
        .into_iter()
        .map(|(flow, mut segs)| {
            // Sequence numbers relative to the first data byte seen (they wrap at 2^32).
            let base = segs.iter().map(|(s, _)| *s).min().unwrap_or(0);
            segs.sort_by_key(|(s, _)| s.wrapping_sub(base));
            let mut bytes = Vec::new();
            for (seq, data) in segs {
                let at = seq.wrapping_sub(base) as usize;
                if at > bytes.len() {
                    break; // a gap: what follows cannot be placed
                }
                let skip = bytes.len() - at;
                if skip < data.len() {
                    bytes.extend_from_slice(&data[skip..]);
                }
            }
            (flow, bytes)
        })
        .collect()
}

/// Splits `stream` into TLS records (RFC 8446 §5.1: type, legacy version, 16-bit length) and
/// returns their content types in order; `Err` names the first bytes that are not a record.
/// A record cut short at the end (the capture stopped) is left out.
pub fn tls_records(stream: &[u8]) -> Result<Vec<u8>, String> {
    let mut types = Vec::new();
    let mut at = 0;
    while at + 5 <= stream.len() {
        let (kind, major, len) = (
            stream[at],
            stream[at + 1],
            usize::from(u16::from_be_bytes([stream[at + 3], stream[at + 4]])),
        );
        if !(20..=23).contains(&kind) || major != 3 || len > (1 << 14) + 256 {
            let end = (at + 16).min(stream.len());
            return Err(format!("not a TLS record at byte {at}: {:02x?}", &stream[at..end]));
        }
        if at + 5 + len > stream.len() {
            break;
        }
        types.push(kind);
        at += 5 + len;
    }
    Ok(types)
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use etherparse::{PacketBuilder, VlanId};
    use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};

    use super::*;

    /// A pcap file (pcap-file's writer, Ethernet) holding `frames`.
    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut w = PcapWriter::with_header(Vec::new(), PcapHeader::default()).unwrap();
        for (i, f) in frames.iter().enumerate() {
            let len = f.len() as u32;
            w.write_packet(&PcapPacket::new(Duration::from_millis(i as u64), len, f))
                .unwrap();
        }
        w.into_writer()
    }

    const MACS: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);

    fn ipv4() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
        PacketBuilder::ethernet2(MACS.0, MACS.1).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
    }

    /// `frame` followed by Ethernet padding (not part of the IP packet).
    fn padded(mut frame: Vec<u8>) -> Vec<u8> {
        frame.extend_from_slice(&[0; 6]);
        frame
    }

    #[test]
    fn udp_and_tcp_payloads_are_read_and_padding_is_not() {
        let mut udp = Vec::new();
        ipv4().udp(12345, 53).write(&mut udp, b"hello").unwrap();
        let mut tcp = Vec::new();
        ipv4()
            .tcp(443, 12345, 1, 1024)
            .psh()
            .write(&mut tcp, b"world!")
            .unwrap();
        let bytes = pcap(&[padded(udp), padded(tcp), vec![0xff; 20]]);
        let got = parse_pcap(&bytes).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].proto, got[0].payload.as_slice()), (Proto::Udp, &b"hello"[..]));
        assert_eq!(got[0].src, "10.0.0.1:12345".parse().unwrap());
        assert_eq!(got[0].dst, "10.0.0.2:53".parse().unwrap());
        assert_eq!((got[1].proto, got[1].payload.as_slice()), (Proto::Tcp, &b"world!"[..]));
        assert_eq!(got[1].src, "10.0.0.1:443".parse().unwrap());
        assert!(contains(&got[1].frame, b"world"));
        assert!(!contains(&got[1].frame, b"worlds"));
    }

    #[test]
    fn vlan_tagged_frames_are_read_and_other_protocols_skipped() {
        let mut tagged = Vec::new();
        PacketBuilder::ethernet2(MACS.0, MACS.1)
            .single_vlan(VlanId::try_new(7).unwrap())
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1000, 2000)
            .write(&mut tagged, b"tagged")
            .unwrap();
        let mut v6 = Vec::new();
        PacketBuilder::ethernet2(MACS.0, MACS.1)
            .ipv6([1; 16], [2; 16], 64)
            .udp(1000, 2000)
            .write(&mut v6, b"v6")
            .unwrap();
        let mut icmp = Vec::new();
        ipv4().icmpv4_echo_request(1, 1).write(&mut icmp, b"ping").unwrap();
        let got = parse_pcap(&pcap(&[v6, tagged, icmp])).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].payload, b"tagged");
        assert_eq!(got[0].dst, "10.0.0.2:2000".parse().unwrap());
    }

    #[test]
    fn a_truncated_last_record_ends_the_list_and_garbage_is_an_error() {
        let mut udp = Vec::new();
        ipv4().udp(1, 2).write(&mut udp, &[7]).unwrap();
        let mut bytes = pcap(&[udp]);
        let whole = parse_pcap(&bytes).unwrap().len();
        bytes.truncate(bytes.len() - 3);
        assert_eq!((whole, parse_pcap(&bytes).unwrap().len()), (1, 0));
        assert!(parse_pcap(b"not a capture at all, really").is_err());
        assert!(parse_pcap(b"short").is_err());
        let raw_ip = PcapHeader {
            datalink: DataLink::RAW,
            ..PcapHeader::default()
        };
        let other = PcapWriter::with_header(Vec::new(), raw_ip).unwrap().into_writer();
        let err = parse_pcap(&other).unwrap_err().to_string();
        assert!(err.contains("expected Ethernet"), "{err}");
    }

    /// A real tcpdump on the host's loopback (Ethernet link type on Linux): a UDP datagram and a
    /// TCP stream sent through it are read back. Needs root and tcpdump, like the lab's
    /// namespace tests (`tests/run-all.sh` installs it).
    #[test]
    fn what_tcpdump_writes_on_loopback_is_read_back() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lo.pcap");
        let child = tcpdump("lo", &path).unwrap().spawn().unwrap();
        let capture = Capture::listening(child, "lo", &path).unwrap();

        let nonce = std::process::id();
        let udp_text = format!("natcall-lab capture probe {nonce} over UDP");
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(udp_text.as_bytes(), rx.local_addr().unwrap()).unwrap();
        let tcp_text = format!("natcall-lab capture probe {nonce} over TCP");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(tcp_text.as_bytes()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut got = vec![0u8; tcp_text.len()];
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        server.read_exact(&mut got).unwrap();

        let packets = capture.stop().unwrap();
        let v4 = |a: std::net::SocketAddr| match a {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other} is not IPv4"),
        };
        let (udp_src, udp_dst) = (v4(tx.local_addr().unwrap()), v4(rx.local_addr().unwrap()));
        let udp = packets
            .iter()
            .find(|p| p.proto == Proto::Udp && p.src == udp_src && p.dst == udp_dst)
            .unwrap_or_else(|| panic!("no UDP {udp_src} → {udp_dst} among {} packets", packets.len()));
        assert_eq!(udp.payload, udp_text.as_bytes());
        let (tcp_src, tcp_dst) = (v4(client.local_addr().unwrap()), v4(listener.local_addr().unwrap()));
        let stream: Vec<u8> = packets
            .iter()
            .filter(|p| p.proto == Proto::Tcp && p.src == tcp_src && p.dst == tcp_dst)
            .flat_map(|p| p.payload.iter().copied())
            .collect();
        assert_eq!(stream, tcp_text.as_bytes());
        assert!(contains(&udp.frame, udp_text.as_bytes()));
    }
}
