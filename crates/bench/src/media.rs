//! CPU cost of sealing and opening media packets (full 512-byte packets: 478 bytes of payload),
//! measured with the process's own CPU time over a bounded number of packets.

use std::time::Instant;

use anyhow::Result;
use natcall_media::{Flags, Header, MAX_FRAGMENT_PAYLOAD, Role, Track, derive_keys};

/// What one run measured.
#[derive(Debug)]
pub struct CryptoOutcome {
    pub packets: u64,
    pub seal_cpu_s: f64,
    pub open_cpu_s: f64,
}

impl CryptoOutcome {
    fn mbit(&self) -> f64 {
        (self.packets * MAX_FRAGMENT_PAYLOAD as u64 * 8) as f64 / 1e6
    }

    /// CPU microseconds per Mbit of payload sealed.
    pub fn seal_us_per_mbit(&self) -> f64 {
        self.seal_cpu_s * 1e6 / self.mbit()
    }

    /// CPU microseconds per Mbit of payload opened.
    pub fn open_us_per_mbit(&self) -> f64 {
        self.open_cpu_s * 1e6 / self.mbit()
    }

    /// Payload Mbit/s one core seals.
    pub fn seal_mbit_per_s(&self) -> f64 {
        self.mbit() / self.seal_cpu_s
    }

    /// Payload Mbit/s one core opens.
    pub fn open_mbit_per_s(&self) -> f64 {
        self.mbit() / self.open_cpu_s
    }
}

/// This thread's CPU time in seconds (user + system, from /proc).
fn thread_cpu() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Ok(ticks as f64 / 100.0)
}

/// Seals `packets` full packets, then opens them all.
pub fn run(packets: u64) -> Result<CryptoOutcome> {
    let secret = [7u8; 32];
    let (mut sealer, _) = derive_keys(&secret, Role::Caller);
    let (_, opener) = derive_keys(&secret, Role::Callee);
    let payload = vec![0x5a; MAX_FRAGMENT_PAYLOAD];
    let mut sealed = Vec::with_capacity(packets as usize);
    let wall = Instant::now();
    let t0 = thread_cpu()?;
    for i in 0..packets {
        let header = Header {
            track: Track::VIDEO,
            sequence: 0,
            timestamp: i as u32,
            frame_id: i as u32,
            fragment_index: 0,
            fragment_count: 1,
            flags: Flags(Flags::FRAME_START | Flags::FRAME_END),
        };
        sealed.push(sealer.seal(header, &payload)?);
    }
    let t1 = thread_cpu()?;
    let mut opened = 0u64;
    for p in &sealed {
        if opener.open(p).is_ok() {
            opened += 1;
        }
    }
    let t2 = thread_cpu()?;
    anyhow::ensure!(opened == packets, "only {opened} of {packets} packets opened");
    // /proc ticks are 10 ms: fall back to wall time for runs too short to measure.
    let (seal, open) = if t2 - t0 < 0.5 {
        (wall.elapsed().as_secs_f64() / 2.0, wall.elapsed().as_secs_f64() / 2.0)
    } else {
        (t1 - t0, t2 - t1)
    };
    Ok(CryptoOutcome {
        packets,
        seal_cpu_s: seal,
        open_cpu_s: open,
    })
}
