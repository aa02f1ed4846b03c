//! Rate caps and competing traffic on a peer's access link, for call-quality tests.
//!
//! - [`LinkCap`]: `tc tbf` on the downlink bridge of a peer's router (what the router sends
//!   to the devices behind it), so everything the peer receives — UDP media on the direct path,
//!   the relay's TCP connection, a download — shares one bottleneck, as on a slow access link;
//!   or ([`LinkCap::uplink`]) on the router's WAN side, so everything the peer sends shares one.
//!   tbf needs no netem and works on this lab's kernels. The queue holds
//!   [`LinkCap::buffer`] of traffic at the cap; what does not fit is dropped (tail drop).
//! - [`BulkDownload`]: a TCP download from a public host to the peer through that bottleneck,
//!   as a second application competing with the call. Bounded: it stops when dropped or after
//!   its time limit, whichever comes first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use patchbay::{Device, Router};

use crate::Error;

/// Bytes tbf may send at once above the rate (a few full-size packets).
const BURST_BYTES: u32 = 4_500;

/// A `tc tbf` rate cap on a router's downlink bridge or its WAN side; removed when dropped.
#[derive(Debug)]
pub struct LinkCap {
    router: Router,
    bridge: String,
    /// How much traffic the queue holds at the cap before it drops.
    pub buffer: Duration,
    /// The cap in force, kbit/s.
    pub kbit: u32,
}

impl LinkCap {
    /// Caps `router`'s downlink at `kbit` kbit/s with a queue of `buffer`.
    pub fn apply(router: &Router, kbit: u32, buffer: Duration) -> Result<Self, Error> {
        Self::on(router, 1, "downlink bridge", kbit, buffer)
    }

    /// Caps `router`'s uplink (what leaves its WAN side: everything the devices behind it
    /// send) at `kbit` kbit/s with a queue of `buffer`.
    pub fn uplink(router: &Router, kbit: u32, buffer: Duration) -> Result<Self, Error> {
        Self::on(router, 0, "WAN interface", kbit, buffer)
    }

    fn on(router: &Router, index: usize, what: &str, kbit: u32, buffer: Duration) -> Result<Self, Error> {
        let bridge = router
            .interfaces()
            .get(index)
            .map(|i| i.name().to_owned())
            .ok_or_else(|| Error::InvalidScenario(format!("router {} has no {what}", router.name())))?;
        let cap = Self {
            router: router.clone(),
            bridge,
            buffer,
            kbit,
        };
        cap.tc("replace", kbit)?;
        Ok(cap)
    }

    /// Changes the cap to `kbit` kbit/s (the queue keeps its duration).
    pub fn set(&mut self, kbit: u32) -> Result<(), Error> {
        self.tc("change", kbit)?;
        self.kbit = kbit;
        Ok(())
    }

    fn tc(&self, verb: &str, kbit: u32) -> Result<(), Error> {
        if kbit == 0 {
            return Err(Error::InvalidScenario("a rate cap of 0 kbit/s".into()));
        }
        let latency_ms = self.buffer.as_millis().max(1).to_string();
        let rate = format!("{kbit}kbit");
        let burst = BURST_BYTES.to_string();
        let args = [
            "qdisc",
            verb,
            "dev",
            &self.bridge,
            "root",
            "tbf",
            "rate",
            &rate,
            "burst",
            &burst,
            "latency",
            &latency_ms,
        ];
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let line = format!("tc {}", args.join(" "));
        let out = self
            .router
            .run_sync(move || Ok(Command::new(tc_path()).args(&args).output()?))
            .map_err(|e| Error::Command {
                command: line.clone(),
                stderr: format!("{e:#}"),
            })?;
        if !out.status.success() {
            return Err(Error::Command {
                command: line,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }
}

impl Drop for LinkCap {
    fn drop(&mut self) {
        let bridge = self.bridge.clone();
        let _ = self.router.run_sync(move || {
            Ok(Command::new(tc_path())
                .args(["qdisc", "del", "dev", &bridge, "root"])
                .output()?)
        });
    }
}

fn tc_path() -> std::path::PathBuf {
    crate::error::find_tool("tc").unwrap_or_else(|| "tc".into())
}

/// A TCP download from a public host to a peer; stops when dropped or at its time limit.
#[derive(Debug)]
pub struct BulkDownload {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    started: Instant,
    threads: Vec<JoinHandle<()>>,
}

impl BulkDownload {
    /// Listens on `from` (inside `server`'s namespace), connects from `to`'s namespace, and
    /// sends as fast as TCP allows for at most `limit`.
    pub fn start(server: &Device, to: &Device, from: SocketAddr, limit: Duration) -> Result<Self, Error> {
        let listener = server
            .run_sync(move || Ok(TcpListener::bind(from)?))
            .map_err(|e| Error::Lab(e.context(format!("binding the download server on {from}"))))?;
        let stream = to
            .run_sync(move || Ok(TcpStream::connect_timeout(&from, Duration::from_secs(5))?))
            .map_err(|e| Error::Lab(e.context(format!("connecting the download to {from}"))))?;
        let (mut sending, _) = listener.accept().map_err(Error::io("accepting the download"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + limit;
        let timeout = Some(Duration::from_millis(200));
        sending
            .set_write_timeout(timeout)
            .map_err(Error::io("a write timeout"))?;
        let mut receiving = stream;
        receiving
            .set_read_timeout(timeout)
            .map_err(Error::io("a read timeout"))?;
        let (s1, s2, count) = (stop.clone(), stop.clone(), received.clone());
        let sender = std::thread::spawn(move || {
            let chunk = [0u8; 16 * 1024];
            while !s1.load(Ordering::Relaxed) && Instant::now() < deadline {
                match sending.write(&chunk) {
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        });
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 64 * 1024];
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match receiving.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Self {
            stop,
            received,
            started,
            threads: vec![sender, receiver],
        })
    }

    /// Bytes the peer received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Its average rate so far, bit/s.
    pub fn rate_bps(&self) -> f64 {
        self.received() as f64 * 8.0 / self.started.elapsed().as_secs_f64().max(1e-3)
    }
}

impl Drop for BulkDownload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
