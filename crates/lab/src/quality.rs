//! Call quality on a slow link: one call from alice to bob whose downlink is capped (and
//! changed mid-call), lossy, or shared with a download, on the direct path or the relay, and
//! what arrived in time.
//!
//! 1. A lab with alice and bob behind port-restricted NATs (punching works) and the server;
//!    bob's router caps his downlink ([`LinkCap`]) or his uplink forwarder drops packets
//!    ([`Impairment`]);
//! 2. bob runs `natcall listen --once --no-media`, alice `natcall call bob --policy
//!    direct-only|relay-only --duration D` with the built-in test source (audio every 20 ms,
//!    video at 30 frames/s sized to her rate controller's budget);
//! 3. from alice's `connected` event the cap follows its schedule; a [`BulkDownload`] to bob
//!    may run beside the call (started 2 s before it);
//! 4. the verdict comes from the reports: audio frames on time (complete, not late for
//!    playout) over the frames alice's sender took, video frames complete and on time over the
//!    frames she sent, bob's one-way delay percentiles, and alice's `rate` events (her target and
//!    what reached bob over time).

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::impair::Impairment;
use crate::process::{Binaries, Proc};
use crate::scenario::{peer_args, start_server};
use crate::shape::{BulkDownload, LinkCap};
use crate::topology::{self, SERVER_PORT};
use crate::{Error, Kind, Scenario};

pub mod bench;

/// The queue of a capped downlink: what a modest access router buffers.
pub const CAP_BUFFER: Duration = Duration::from_millis(150);
/// Where the competing download comes from, on the server's host.
const BULK_PORT: u16 = 5001;
/// The download starts this long before the call.
const BULK_LEAD: Duration = Duration::from_secs(2);

/// Which path the call must take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QualityPath {
    /// Hole punched UDP (`--policy direct-only`).
    Direct,
    /// The server's relay (`--policy relay-only`).
    Relay,
}

impl QualityPath {
    fn policy(self) -> &'static str {
        match self {
            Self::Direct => "direct-only",
            Self::Relay => "relay-only",
        }
    }
}

impl std::fmt::Display for QualityPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
        })
    }
}

/// What bob's link does during the call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Condition {
    /// Downlink caps: from each time (since the call connected) on, kbit/s; empty for none.
    pub caps: Vec<(Duration, u32)>,
    /// Random loss on bob's link, percent each way (no cap needed).
    pub loss_pct: f64,
    /// A TCP download to bob runs beside the call (from 2 s before it: the call comes in on a
    /// link the download already fills).
    pub bulk: bool,
}

impl Condition {
    /// A fixed cap.
    pub fn cap(kbit: u32) -> Self {
        Self {
            caps: vec![(Duration::ZERO, kbit)],
            loss_pct: 0.0,
            bulk: false,
        }
    }

    /// The cap in force at `t` since the call connected.
    pub fn cap_at(&self, t: Duration) -> Option<u32> {
        self.caps.iter().rev().find(|(at, _)| *at <= t).map(|(_, k)| *k)
    }
}

/// One quality run.
#[derive(Debug, Clone, Serialize)]
pub struct QualitySpec {
    /// A short name for tables and files.
    pub name: String,
    /// The path the call must take.
    pub path: QualityPath,
    /// bob's link.
    pub condition: Condition,
    /// How long alice's call lasts.
    pub duration: Duration,
    /// The test video's ceiling, kbit/s (`--video-kbps`).
    pub video_kbps: u32,
    /// The media rate ceiling, kbit/s (`--media-kbps`).
    pub media_kbps: u32,
}

/// One of alice's `rate` events.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RateSample {
    /// Since alice's call connected.
    pub at_s: f64,
    /// Her target, bit/s.
    pub target_bps: u64,
    /// What reached bob over the last half second, bit/s.
    pub delivered_bps: Option<u64>,
}

/// What a quality run measured.
#[derive(Debug, Clone, Serialize)]
pub struct QualityOutcome {
    /// What ran.
    pub spec: QualitySpec,
    /// The path alice's report ended on.
    pub path: Option<String>,
    /// Audio frames alice's sender took (sent and dropped there).
    pub audio_frames: u64,
    /// Of those, complete at bob before their playout time.
    pub audio_on_time: u64,
    /// Video frames alice sent.
    pub video_frames: u64,
    /// Of those, complete at bob before their playout time.
    pub video_on_time: u64,
    /// bob's relative one-way delay of audio packets, p50 and p95, ms (`None`: the binaries
    /// do not report it).
    pub audio_delay_ms: Option<(f64, f64)>,
    /// Alice's target and delivered rate over time (empty when the binaries emit no `rate`
    /// events).
    pub rates: Vec<RateSample>,
    /// Alice's final target, bit/s.
    pub final_target_bps: Option<u64>,
    /// What the competing download got, bit/s.
    pub bulk_bps: Option<f64>,
    /// The call's rate at bob over the whole call (media bytes received / duration), bit/s.
    pub media_bps: f64,
    /// The first thing that went wrong.
    pub error: Option<String>,
    /// The logs.
    pub dir: PathBuf,
    /// alice's and bob's reports.
    #[serde(skip)]
    pub reports: [Option<Value>; 2],
}

impl QualityOutcome {
    /// Audio frames on time, 0–1.
    pub fn audio_on_time_share(&self) -> f64 {
        share(self.audio_on_time, self.audio_frames)
    }

    /// Video frames complete and on time, 0–1.
    pub fn video_on_time_share(&self) -> f64 {
        share(self.video_on_time, self.video_frames)
    }

    /// Alice's target from `from` to `to` (seconds since connected), averaged over each whole
    /// second, as a share of the cap in force then: one value a second. (The rate events come
    /// every 250 ms; a second's mean keeps a probe's single step over the cap, which the delay
    /// detector undoes within a feedback round, from reading as the target's level.)
    pub fn target_over_cap(&self, from: f64, to: f64) -> Vec<f64> {
        self.per_second(from, to)
            .into_iter()
            .filter_map(|(second, mean)| {
                let cap = self.spec.condition.cap_at(Duration::from_secs_f64(second))?;
                Some(mean / (f64::from(cap) * 1000.0))
            })
            .collect()
    }

    /// Alice's target from `from` to `to` (seconds since connected), averaged over each whole
    /// second, bit/s.
    pub fn targets(&self, from: f64, to: f64) -> Vec<f64> {
        self.per_second(from, to).into_iter().map(|(_, mean)| mean).collect()
    }

    /// (second, mean target in it) for each whole second from `from` to `to` with events.
    fn per_second(&self, from: f64, to: f64) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        let mut second = from.floor();
        while second + 1.0 <= to {
            let in_second: Vec<f64> = self
                .rates
                .iter()
                .filter(|r| r.at_s >= second && r.at_s < second + 1.0)
                .map(|r| r.target_bps as f64)
                .collect();
            if !in_second.is_empty() {
                out.push((second, in_second.iter().sum::<f64>() / in_second.len() as f64));
            }
            second += 1.0;
        }
        out
    }

    /// The verdict line, the reports and the logs, for a failed assertion.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "{} ({}): audio {}/{} on time, video {}/{} on time, delay {:?}, error {:?}\nrates: {:?}",
            self.spec.name,
            self.spec.path,
            self.audio_on_time,
            self.audio_frames,
            self.video_on_time,
            self.video_frames,
            self.audio_delay_ms,
            self.error,
            self.rates
                .iter()
                .map(|r| (r.at_s as u32, r.target_bps / 1000, r.delivered_bps.map(|d| d / 1000)))
                .collect::<Vec<_>>()
        );
        for (who, r) in ["alice", "bob"].iter().zip(&self.reports) {
            out.push_str(&format!("\n--- {who}'s report ---\n"));
            out.push_str(&r.as_ref().map_or("(none)".into(), Value::to_string));
        }
        out.push_str(&format!("\n(logs in {})", self.dir.display()));
        out
    }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

/// Runs one quality call in its own lab; logs go to `dir`.
pub async fn run_quality(bins: &Binaries, spec: &QualitySpec, dir: &FsPath) -> Result<QualityOutcome, Error> {
    let scenario = Scenario::pair(Kind::PortRestricted, Kind::PortRestricted);
    let net = topology::build(scenario).await?;
    let bob_router = net
        .routers
        .last()
        .cloned()
        .ok_or_else(|| Error::InvalidScenario("bob has no router".into()))?;
    let loss = (spec.condition.loss_pct > 0.0).then_some(Impairment {
        loss_pct: spec.condition.loss_pct,
        seed: 7,
        ..Impairment::default()
    });
    let guard = match loss {
        Some(imp) => Some(imp.apply(&net.b).await?),
        None => None,
    };
    let ip = net
        .server
        .ip()
        .ok_or_else(|| Error::InvalidScenario("the server has no IPv4 address".into()))?;
    let server = SocketAddr::from((ip, SERVER_PORT));
    let (bins, spec2, dir2) = (bins.clone(), spec.clone(), dir.to_path_buf());
    let devices = (net.server.clone(), net.a.clone(), net.b.clone());
    let outcome = tokio::task::spawn_blocking(move || {
        let mut driver = Driver {
            bins: &bins,
            spec: &spec2,
            dir: &dir2,
            server,
            bob_router,
            procs: Vec::new(),
        };
        let mut bulk_bps = None;
        let error = driver.run(&devices, &mut bulk_bps).err();
        driver.outcome(error, bulk_bps)
    })
    .await
    .map_err(|e| Error::InvalidScenario(format!("the quality driver panicked: {e}")))?;
    drop(guard);
    drop(net);
    Ok(outcome)
}

struct Driver<'a> {
    bins: &'a Binaries,
    spec: &'a QualitySpec,
    dir: &'a FsPath,
    server: SocketAddr,
    bob_router: patchbay::Router,
    procs: Vec<Proc>,
}

impl Driver<'_> {
    fn run(
        &mut self,
        (srv, a, b): &(patchbay::Device, patchbay::Device, patchbay::Device),
        bulk_bps: &mut Option<f64>,
    ) -> Result<(), String> {
        let spec = self.spec;
        self.procs.push(start_server(self.bins, self.dir, srv, self.server)?);
        let mut cap = match spec.condition.cap_at(Duration::ZERO) {
            Some(kbit) => Some(LinkCap::apply(&self.bob_router, kbit, CAP_BUFFER).map_err(|e| e.to_string())?),
            None => None,
        };
        let bob_cmd = ["listen", "--once", "--no-media"].map(String::from);
        let bob_args = peer_args(self.server, self.dir, "bob", &bob_cmd);
        self.procs
            .push(Proc::spawn(b, self.dir, "bob", &self.bins.natcall, &bob_args).map_err(|e| e.to_string())?);
        self.procs[1].wait_event("registered", Duration::from_secs(20), |_| true)?;
        let alice_cmd: Vec<String> = [
            "call",
            "bob",
            "--policy",
            spec.path.policy(),
            "--duration",
            &spec.duration.as_secs_f64().to_string(),
            "--video-kbps",
            &spec.video_kbps.to_string(),
            "--media-kbps",
            &spec.media_kbps.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let alice_args = peer_args(self.server, self.dir, "alice", &alice_cmd);
        // The download is under way (past its slow start) when the call comes in.
        let bulk = if spec.condition.bulk {
            let from = SocketAddr::from((self.server.ip(), BULK_PORT));
            let limit = BULK_LEAD + spec.duration + Duration::from_secs(5);
            let bulk = BulkDownload::start(srv, b, from, limit).map_err(|e| e.to_string())?;
            std::thread::sleep(BULK_LEAD);
            Some(bulk)
        } else {
            None
        };
        let bulk_before = bulk.as_ref().map_or(0, BulkDownload::received);
        self.procs
            .push(Proc::spawn(a, self.dir, "alice", &self.bins.natcall, &alice_args).map_err(|e| e.to_string())?);
        self.procs[2].wait_event("connected", Duration::from_secs(20), |_| true)?;
        let connected = Instant::now();
        // The cap's schedule, then alice's end.
        for &(at, kbit) in spec.condition.caps.iter().filter(|(at, _)| !at.is_zero()) {
            std::thread::sleep((connected + at).saturating_duration_since(Instant::now()));
            if let Some(c) = cap.as_mut() {
                c.set(kbit).map_err(|e| e.to_string())?;
            }
        }
        let left = (connected + spec.duration + Duration::from_secs(15)).saturating_duration_since(Instant::now());
        let alice_exit = self.procs[2].wait_exit(left)?;
        // What the download got while the call ran.
        *bulk_bps = bulk
            .as_ref()
            .map(|b| (b.received() - bulk_before) as f64 * 8.0 / connected.elapsed().as_secs_f64().max(1e-3));
        drop(bulk);
        let bob_exit = self.procs[1].wait_exit(Duration::from_secs(10))?;
        drop(cap.take());
        if (alice_exit, bob_exit) != (0, 0) {
            return Err(format!("exit codes: alice {alice_exit}, bob {bob_exit}"));
        }
        Ok(())
    }

    fn outcome(mut self, error: Option<String>, bulk_bps: Option<f64>) -> QualityOutcome {
        for p in &mut self.procs {
            p.kill();
            p.drain();
        }
        let report = |name: &str| self.procs.iter().find(|p| p.name == name).and_then(Proc::report);
        let reports = [report("alice"), report("bob")];
        let rates = self
            .procs
            .iter()
            .find(|p| p.name == "alice")
            .map(|p| rate_samples(&p.seen))
            .unwrap_or_default();
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let (a, b) = (
            reports[0].clone().unwrap_or_default(),
            reports[1].clone().unwrap_or_default(),
        );
        let (a_media, b_media) = (&a["media"], &b["media"]);
        let audio_sent = &a_media["audio"]["sent"];
        let (audio_in, video_in) = (&b_media["audio"]["received"], &b_media["video"]["received"]);
        let on_time = |r: &Value| n(&r["frames_complete"]).saturating_sub(n(&r["frames_late"]));
        let delay = match (audio_in["delay_p50_ms"].as_f64(), audio_in["delay_p95_ms"].as_f64()) {
            (Some(p50), Some(p95)) => Some((p50, p95)),
            _ => None,
        };
        let media_bytes = n(&audio_in["bytes_received"]) + n(&video_in["bytes_received"]);
        QualityOutcome {
            spec: self.spec.clone(),
            path: a["path"].as_str().map(str::to_owned),
            audio_frames: n(&audio_sent["frames_sent"]) + n(&audio_sent["frames_dropped"]),
            audio_on_time: on_time(audio_in),
            video_frames: n(&a_media["video"]["sent"]["frames_sent"]),
            video_on_time: on_time(video_in),
            audio_delay_ms: delay,
            rates,
            final_target_bps: a_media["send_rate_bps"].as_u64(),
            bulk_bps,
            media_bps: media_bytes as f64 * 8.0 / self.spec.duration.as_secs_f64(),
            error,
            dir: self.dir.to_path_buf(),
            reports,
        }
    }
}

/// alice's `rate` events, timed from her call's start (her `at_ms`).
fn rate_samples(lines: &[Value]) -> Vec<RateSample> {
    lines
        .iter()
        .filter(|v| v["event"] == "rate")
        .filter_map(|v| {
            Some(RateSample {
                at_s: v["at_ms"].as_f64()? / 1000.0,
                target_bps: v["target_bps"].as_u64()?,
                delivered_bps: v["delivered_bps"].as_u64(),
            })
        })
        .collect()
}
