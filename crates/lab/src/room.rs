//! A room in the lab: more than two peers, each behind its own router of a given [`Kind`], in
//! one `natcall room` with the built-in test source; each member's `--json` report holds, per
//! other member, that pair's session report (path, media received and sent).
//!
//! ```text
//!   dc (public) ── server (natcall-rendezvous)
//!   m1's router(s) ── m1    m2's router(s) ── m2    …
//! ```
//!
//! The first member creates the room inviting the others, who join once it exists; once every
//! member has a session with every other, the room runs `secs`, then all leave at once
//! (SIGINT), so each pair's media is measured over the same time on both sides. With
//! departures ([`run_room_with`]), the members named leave (SIGINT) or are killed (SIGKILL)
//! halfway. [`RoomOptions`] also sets every member's `--topology` (mesh unless told) and caps
//! members' downlinks ([`LinkCap`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::capture::Capture;
use crate::process::{Binaries, Proc};
use crate::scenario::{peer_args, start_server};
use crate::shape::LinkCap;
use crate::topology::{SERVER_PORT, add_device, add_uplink, new_lab};
use crate::{Error, Kind, Path, Scenario};

/// The room's name in the lab.
pub const ROOM: &str = "lab";

/// How a member leaves before the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// It leaves (SIGINT, as Ctrl-C: it tells the server).
    Leave,
    /// Its process is killed (SIGKILL: its connection just ends).
    Kill,
}

/// What a room run produced.
#[derive(Debug)]
pub struct RoomOutcome {
    /// Each member's kind, in the order given.
    pub members: Vec<(String, Kind)>,
    /// Each member's final report (`None` if it printed none).
    pub reports: BTreeMap<String, Option<Value>>,
    /// Each member's exit code.
    pub exit_codes: BTreeMap<String, Option<i32>>,
    /// Each member's JSON events, in order.
    pub events: BTreeMap<String, Vec<Value>>,
    /// The stranger's exit code and its JSON error event, when [`RoomOptions::stranger`].
    pub stranger: Option<(Option<i32>, Option<Value>)>,
    /// What the server's interface carried, when [`RoomOptions::capture_server`].
    pub server_packets: Vec<crate::capture::Packet>,
    /// What went wrong driving the processes, if anything.
    pub error: Option<String>,
    /// Where the logs are.
    pub dir: PathBuf,
}

/// How one member received another's media on their session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Received {
    /// The session's path as the receiver's report says.
    pub path: Option<Path>,
    /// Audio frames complete and on time over those the sender sent on that session.
    pub audio_on_time: f64,
    /// Video frames complete and on time over those the sender sent.
    pub video_on_time: f64,
}

impl RoomOutcome {
    /// How `receiver` got `sender`'s media (`None` without both reports or that session).
    pub fn received(&self, receiver: &str, sender: &str) -> Option<Received> {
        let r = self.reports.get(receiver)?.as_ref()?;
        let s = self.reports.get(sender)?.as_ref()?;
        let got = &r["members"][sender];
        let sent = &s["members"][receiver]["media"];
        let on_time = |track: &str| {
            let rx = &got["media"][track]["received"];
            let complete = rx["frames_complete"].as_f64()?;
            let late = rx["frames_late"].as_f64().unwrap_or(0.0);
            let sent = sent[track]["sent"]["frames_sent"].as_f64()?;
            Some(if sent == 0.0 { 0.0 } else { (complete - late) / sent })
        };
        Some(Received {
            path: got["path"].as_str().and_then(Path::from_report),
            audio_on_time: on_time("audio")?,
            video_on_time: on_time("video")?,
        })
    }

    /// How `receiver` got `sender`'s media by fan-out, through the server (`None` without the
    /// receiver's report; `path` is `None`). Counted from the first frame the receiver could
    /// open (the sender's key reaches a member when their session connects; what the sender
    /// sent before is not the member's to read): frames complete and on time over those
    /// complete or given up (frame ids never seen included).
    pub fn received_fan_out(&self, receiver: &str, sender: &str) -> Option<Received> {
        let r = self.reports.get(receiver)?.as_ref()?;
        let got = &r["members"][sender]["fan_out"];
        let on_time = |track: &str| {
            let rx = &got[track]["received"];
            let complete = rx["frames_complete"].as_f64().unwrap_or(0.0);
            let late = rx["frames_late"].as_f64().unwrap_or(0.0);
            let incomplete = rx["frames_incomplete"].as_f64().unwrap_or(0.0);
            let all = complete + incomplete;
            Some(if all == 0.0 { 0.0 } else { (complete - late) / all })
        };
        Some(Received {
            path: None,
            audio_on_time: on_time("audio")?,
            video_on_time: on_time("video")?,
        })
    }

    /// The path the lab's oracle expects between two members' kinds.
    pub fn expected_path(&self, a: &str, b: &str) -> Option<Path> {
        let kind = |n: &str| self.members.iter().find(|(m, _)| m == n).map(|(_, k)| *k);
        Some(Scenario::pair(kind(a)?, kind(b)?).expected())
    }

    /// Everything needed to see why a run failed.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("error: {:?}\nexit codes: {:?}\n", self.error, self.exit_codes);
        for (name, r) in &self.reports {
            out.push_str(&format!("\n--- {name}'s report ---\n"));
            out.push_str(&r.as_ref().map_or("(none)".into(), Value::to_string));
        }
        out.push_str(&format!("\n(logs in {})", self.dir.display()));
        out
    }
}

/// How a room run goes beyond its members and length.
#[derive(Debug, Clone)]
pub struct RoomOptions {
    /// Members leaving halfway: each by its index in the members, and how.
    pub departures: Vec<(usize, Departure)>,
    /// Every member's `--topology` (`auto`, `mesh`, `fan-out`).
    pub topology: String,
    /// Downlink caps: a member's index and its router's downlink cap, kbit/s (`tc tbf`, a queue
    /// of 200 ms), in force from before the members start.
    pub caps: Vec<(usize, u32)>,
    /// Uplink caps, the same way on the router's WAN side.
    pub uplink_caps: Vec<(usize, u32)>,
    /// A peer nobody invited (`stranger`, public) tries to join once everyone is connected;
    /// its exit code and error are in the outcome.
    pub stranger: bool,
    /// Capture the server's traffic (tcpdump in its namespace) for the whole room; the packets
    /// are in the outcome.
    pub capture_server: bool,
}

impl Default for RoomOptions {
    fn default() -> Self {
        Self {
            departures: Vec::new(),
            topology: "mesh".into(),
            caps: Vec::new(),
            uplink_caps: Vec::new(),
            stranger: false,
            capture_server: false,
        }
    }
}

/// Builds a lab with one router per member, runs the room for `secs` with every member in mesh,
/// tears the lab down. Logs go to `dir`.
pub async fn run_room(
    bins: &Binaries,
    members: &[(&str, Kind)],
    secs: f64,
    dir: &FsPath,
) -> Result<RoomOutcome, Error> {
    run_room_with(bins, members, secs, &RoomOptions::default(), dir).await
}

/// [`run_room`] as `options` say: departures halfway, a topology, downlink caps.
pub async fn run_room_with(
    bins: &Binaries,
    members: &[(&str, Kind)],
    secs: f64,
    options: &RoomOptions,
    dir: &FsPath,
) -> Result<RoomOutcome, Error> {
    if members.len() < 2 {
        return Err(Error::InvalidScenario("a room needs at least two members".into()));
    }
    let lab = new_lab().await?;
    let dc = lab.add_router("dc").build().await.map_err(Error::Lab)?;
    let server_dev = add_device(&lab, "server", &dc).await?;
    let mut devices = Vec::new();
    let mut routers = Vec::new();
    let mut caps = Vec::new();
    for (i, (name, kind)) in members.iter().enumerate() {
        let index = u8::try_from(i + 1).map_err(|_| Error::InvalidScenario("too many members".into()))?;
        let r = add_uplink(&lab, *kind, &format!("m{index}"), index).await?;
        let last = r
            .last()
            .ok_or_else(|| Error::InvalidScenario("a kind without a router".into()))?;
        devices.push(add_device(&lab, name, last).await?);
        for (_, kbit) in options.caps.iter().filter(|(m, _)| *m == i) {
            caps.push(LinkCap::apply(last, *kbit, Duration::from_millis(200))?);
        }
        for (_, kbit) in options.uplink_caps.iter().filter(|(m, _)| *m == i) {
            caps.push(LinkCap::uplink(last, *kbit, Duration::from_millis(200))?);
        }
        routers.push(r);
    }
    if options
        .caps
        .iter()
        .chain(&options.uplink_caps)
        .any(|(i, _)| *i >= members.len())
    {
        return Err(Error::InvalidScenario("a cap names no member".into()));
    }
    let stranger_dev = if options.stranger {
        Some(add_device(&lab, "stranger", &dc).await?)
    } else {
        None
    };
    let server_iface = server_dev
        .default_iface()
        .map(|i| i.name().to_owned())
        .ok_or_else(|| Error::InvalidScenario("the server has no interface".into()))?;
    let capture_server = options.capture_server;
    let ip = server_dev
        .ip()
        .ok_or_else(|| Error::InvalidScenario("the server has no IPv4 address".into()))?;
    let server = SocketAddr::from((ip, SERVER_PORT));
    let names: Vec<String> = members.iter().map(|(n, _)| (*n).to_owned()).collect();
    let kinds: Vec<(String, Kind)> = members.iter().map(|(n, k)| ((*n).to_owned(), *k)).collect();
    let (bins, dir) = (bins.clone(), dir.to_path_buf());
    let departures = options.departures.clone();
    let topology = options.topology.clone();
    if departures.iter().any(|(i, _)| *i >= members.len()) {
        return Err(Error::InvalidScenario("a departure names no member".into()));
    }
    let outcome = tokio::task::spawn_blocking(move || {
        let mut out = RoomOutcome {
            members: kinds,
            reports: BTreeMap::new(),
            exit_codes: BTreeMap::new(),
            events: BTreeMap::new(),
            stranger: None,
            server_packets: Vec::new(),
            error: None,
            dir: dir.clone(),
        };
        let mut procs: Vec<Proc> = Vec::new();
        let mut capture = None;
        let result = (|| -> Result<(), String> {
            if capture_server {
                let pcap = dir.join("server.pcap");
                capture = Some(Capture::start(&server_dev, &server_iface, &pcap).map_err(|e| e.to_string())?);
            }
            procs.push(start_server(&bins, &dir, &server_dev, server)?);
            // Members stay until interrupted (with a bound in case that fails).
            let bound = format!("{:.0}", secs + 60.0);
            let first = vec![
                "room".to_string(),
                ROOM.to_string(),
                "--invite".to_string(),
                names[1..].join(","),
                "--duration".to_string(),
                bound.clone(),
                "--topology".to_string(),
                topology.clone(),
            ];
            let args = peer_args(server, &dir, &names[0], &first);
            procs.push(Proc::spawn(&devices[0], &dir, &names[0], &bins.natcall, &args).map_err(|e| e.to_string())?);
            procs[1].wait_event("room", Duration::from_secs(20), |_| true)?;
            for (i, name) in names.iter().enumerate().skip(1) {
                let cmd = vec![
                    "room".to_string(),
                    ROOM.to_string(),
                    "--duration".to_string(),
                    bound.clone(),
                    "--topology".to_string(),
                    topology.clone(),
                ];
                let args = peer_args(server, &dir, name, &cmd);
                procs.push(Proc::spawn(&devices[i], &dir, name, &bins.natcall, &args).map_err(|e| e.to_string())?);
            }
            // Once every member has a session with every other, the room runs `secs`; then all
            // leave at once (SIGINT, as Ctrl-C), so each pair's media is measured over the
            // same time on both sides.
            for p in procs.iter_mut().skip(1) {
                p.wait_nth("connected", names.len() - 1, Duration::from_secs(30))
                    .map_err(|e| e.to_string())?;
            }
            let signal = |p: &Proc, sig: &str| -> Result<(), String> {
                let pid = p.id().to_string();
                let status = std::process::Command::new("kill")
                    .args([sig, &pid])
                    .status()
                    .map_err(|e| format!("kill {sig} {pid}: {e}"))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("kill {sig} {pid} failed"))
                }
            };
            if let Some(dev) = &stranger_dev {
                // Not invited, no code: refused with the server's reason (exit 4).
                let cmd = vec!["room".to_string(), ROOM.to_string()];
                let args = peer_args(server, &dir, "stranger", &cmd);
                let mut p = Proc::spawn(dev, &dir, "stranger", &bins.natcall, &args).map_err(|e| e.to_string())?;
                let code = p.wait_exit(Duration::from_secs(20)).ok();
                p.drain();
                let error = p.seen.iter().find(|e| e["event"] == "error").cloned();
                out.stranger = Some((code, error));
            }
            if departures.is_empty() {
                std::thread::sleep(Duration::from_secs_f64(secs));
            } else {
                std::thread::sleep(Duration::from_secs_f64(secs / 2.0));
                for (i, how) in &departures {
                    let sig = match how {
                        Departure::Leave => "-INT",
                        Departure::Kill => "-KILL",
                    };
                    signal(&procs[i + 1], sig)?;
                }
                std::thread::sleep(Duration::from_secs_f64(secs / 2.0));
            }
            for (i, p) in procs.iter().enumerate().skip(1) {
                if !departures.iter().any(|(d, _)| *d == i - 1) {
                    signal(p, "-INT")?;
                }
            }
            for (i, name) in names.iter().enumerate() {
                let code = procs[i + 1].wait_exit(Duration::from_secs(20))?;
                out.exit_codes.insert(name.clone(), Some(code));
            }
            Ok(())
        })();
        out.error = result.err();
        for p in &mut procs {
            p.kill();
            p.drain();
        }
        if let Some(c) = capture {
            match c.stop() {
                Ok(packets) => out.server_packets = packets,
                Err(e) => out.error = out.error.take().or(Some(format!("server capture: {e}"))),
            }
        }
        for name in &names {
            let r = procs.iter().find(|p| &p.name == name).and_then(Proc::report);
            if let Some(r) = &r {
                // Beside the logs, for a person reading them.
                let _ = std::fs::write(dir.join(format!("{name}.report.json")), r.to_string());
            }
            out.reports.insert(name.clone(), r);
            let seen = procs.iter().find(|p| &p.name == name).map(|p| p.seen.clone());
            out.events.insert(name.clone(), seen.unwrap_or_default());
            out.exit_codes.entry(name.clone()).or_insert(None);
        }
        out
    })
    .await
    .map_err(|e| Error::InvalidScenario(format!("the room driver panicked: {e}")))?;
    drop(caps);
    drop(routers);
    drop(lab);
    Ok(outcome)
}
