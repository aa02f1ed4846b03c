//! `natcall room ROOM`: a group call. Creates the room (`--create`, or `--invite NAMES`) or
//! joins it (invited, or `--code CODE`), then, with every other member, keeps a pairwise
//! session: chat from stdin to everyone and from each member to the screen, the room's keys,
//! and, in mesh, the built-in test source (or nothing with `--no-media`). In fan-out the test
//! source goes once to the server, which forwards it to everyone, sealed with this member's
//! sender key. `--topology auto` (the default) starts in mesh and moves by
//! [`natcall::TopologyChooser`] (see docs/rooms.md); each change and why is in the report.
//! The report holds each member's session report in the shape of a 1:1 call's
//! (`members.NAME.media.audio.received` …: what came over the session), what came from it
//! by fan-out (`members.NAME.fan_out`, the same shape), this member's topology changes
//! (`topology`: mode and why) and each session's path changes (`paths`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use natcall::{
    Call, EndReason, FanOutSender, Frame, RateReason, RoomEvent, Topology, TopologyChooser, TopologyRule, Track,
    UplinkMeter,
};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::config::Settings;
use crate::output::{self, Exit};
use crate::session::{self, Opts, Stdin};

/// The uplink is measured over this many status ticks (half a second each: 4 s)…
const UPLINK_TICKS: usize = 8;
/// …in at least this many of which a pair's path showed congestion ([`UplinkMeter`])…
const UPLINK_BACKING_OFF: usize = 1;
/// …a queue at least this long (ms above the path's base delay), among other signs.
const QUEUE_DELAY_MS: f64 = 20.0;
/// The built-in test source's audio rate, kbit/s (80-byte frames every 20 ms, and headers).
const AUDIO_KBPS: u64 = 40;

/// How this peer enters the room.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Create it, inviting these names.
    Create { invite: Vec<String> },
    /// Join it, invited or with a join code.
    Join { code: Option<String> },
}

/// `--topology`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyArg {
    /// Mesh while the room is small and the uplink carries a copy for everyone; else fan-out.
    Auto,
    /// Always to each member on its own session.
    Mesh,
    /// Always one copy through the server.
    FanOut,
}

/// What a member's session task reports to the room loop.
#[derive(Debug)]
enum FromMember {
    Chat { from: String, line: String },
    Path { peer: String, to: natcall::Path },
    Ended { peer: String, reason: EndReason },
}

/// A member with a session.
struct Member {
    call: Arc<Call>,
    task: tokio::task::JoinHandle<()>,
    /// Its session's end, once known.
    ended: Option<EndReason>,
}

/// `natcall room ROOM`.
pub async fn run(settings: Settings, opts: Opts, room: &str, entry: Entry, topology_arg: TopologyArg) -> Result<Exit> {
    let json = opts.json;
    let mut stdin = Stdin::for_chat(&opts.media);
    let Some(ep) = session::bind_or_interrupted(&settings, json).await? else {
        return Ok(Exit::Ok);
    };
    let opened = match &entry {
        Entry::Create { invite } => {
            let names: Vec<&str> = invite.iter().map(String::as_str).collect();
            ep.create_room(room, &names).await
        }
        Entry::Join { code } => ep.join_room(room, code.as_deref()).await,
    };
    let mut r = match opened {
        Ok(r) => r,
        Err(e) => {
            ep.close().await;
            let what = if matches!(entry, Entry::Create { .. }) {
                "creating"
            } else {
                "joining"
            };
            return Err(anyhow::Error::from(e).context(format!("{what} room {room}")));
        }
    };
    let since = Instant::now();
    let members: Vec<&str> = r.members().iter().map(|m| m.name.as_str()).collect();
    let others = if members.is_empty() {
        "nobody else is in it yet".to_owned()
    } else {
        format!("in it: {}", members.join(", "))
    };
    let code_text = r
        .code()
        .map(|c| format!("; others may join with: natcall room {room} --code {c}"))
        .unwrap_or_default();
    output::notice(
        json,
        json!({"event": "room", "room": room, "id": r.id(), "code": r.code(), "members": members}),
        &format!("in room {room} ({others}){code_text}"),
    );
    let deadline = opts.duration.map(|d| since + d);
    let (tx, mut rx) = mpsc::channel::<FromMember>(256);
    let mut sessions: BTreeMap<String, Member> = BTreeMap::new();
    let mut topology: Vec<serde_json::Value> = Vec::new();
    let mut paths: Vec<serde_json::Value> = Vec::new();
    // How this member's media travels, and the rule that moves it.
    let mut chooser = TopologyChooser::new(TopologyRule::default());
    let first = match topology_arg {
        TopologyArg::FanOut => Topology::FanOut,
        _ => Topology::Mesh,
    };
    let (mode_tx, mode) = watch::channel(first);
    // The others in the room, by name (a member joining again from a newer connection is
    // announced again without having left).
    let mut others: std::collections::BTreeSet<String> = r.members().iter().map(|m| m.name.clone()).collect();
    let want_bps = opts
        .media
        .media_kbps
        .min(u64::from(opts.media.video_kbps) + AUDIO_KBPS)
        .saturating_mul(1000);
    // The pacer needs room above the media for headers and tags (about 8 %) and bursts; a
    // measured uplink bounds it (below what it carries, so the link's queue stays short).
    let fan_out_rate = |uplink: Option<u64>| {
        let full = (want_bps * 5 / 4).max(100_000);
        uplink.map_or(full, |up| full.min(up * 9 / 10)).max(1)
    };
    r.set_fan_out_rate(fan_out_rate(None)).await;
    let mut uplink_bps: Option<u64> = None;
    let mut uplink = UplinkMeter::new(UPLINK_TICKS, UPLINK_BACKING_OFF);
    let mode_event = |topology: &mut Vec<serde_json::Value>, to: Topology, why: &str| {
        topology.push(json!({
            "at_ms": since.elapsed().as_secs_f64() * 1000.0,
            "mode": to,
            "why": why,
        }));
        output::notice(
            json,
            json!({"event": "topology", "mode": to, "why": why, "at_ms": since.elapsed().as_secs_f64() * 1000.0}),
            &format!(
                "sending {}: {why}",
                match to {
                    Topology::Mesh => "to each member (mesh)",
                    Topology::FanOut => "one copy through the server (fan-out)",
                }
            ),
        );
    };
    match topology_arg {
        TopologyArg::FanOut => mode_event(&mut topology, Topology::FanOut, "--topology fan-out"),
        TopologyArg::Mesh => mode_event(&mut topology, Topology::Mesh, "--topology mesh"),
        TopologyArg::Auto => mode_event(&mut topology, Topology::Mesh, "a small room starts in mesh"),
    }
    // The fan-out rate as the room paces it: the rate set here, or less under the server's
    // budget (when every other member drains less).
    let fan_out_source = match (r.fan_out_sender(), r.watch_fan_out_rate(), opts.media.no_media) {
        (Some(sender), Some(rate), false) => Some(tokio::spawn(fan_out_source(
            sender,
            opts.media.video_kbps,
            rate,
            mode.clone(),
        ))),
        _ => None,
    };
    let mut chat_sent = 0u64;
    let mut chat_received = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // One listener for the whole room: a `ctrl_c()` made anew in each turn of the loop misses a
    // SIGINT that lands between two turns.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut accepting = true;
    let exit = loop {
        tokio::select! {
            // A call to a member in a room is told busy at once.
            incoming = ep.accept(), if accepting => match incoming {
                Ok(other) => {
                    let from = other.caller().to_owned();
                    other.busy();
                    output::notice(json, json!({"event": "busy", "from": from}), &format!("{from} tried to call (busy: in room {room})"));
                }
                Err(_) => accepting = false,
            },
            ev = r.next_event() => match ev {
                Some(RoomEvent::MemberJoined(m)) => {
                    others.insert(m.name.clone());
                    output::notice(
                        json,
                        json!({"event": "member_joined", "room": room, "name": m.name, "fingerprint": m.fingerprint.to_string()}),
                        &format!("{} joined", m.name),
                    );
                }
                Some(RoomEvent::MemberLeft { name, reason }) => {
                    others.remove(&name);
                    output::notice(
                        json,
                        json!({"event": "member_left", "room": room, "name": name, "reason": reason}),
                        &format!("{name} left ({reason})"),
                    );
                }
                Some(RoomEvent::Session { peer, call }) => {
                    let call = Arc::new(*call);
                    let report = call.report();
                    paths.push(json!({
                        "at_ms": since.elapsed().as_secs_f64() * 1000.0,
                        "member": peer,
                        "path": report.path,
                        "why": "the pair's session connected",
                    }));
                    output::notice(
                        json,
                        json!({"event": "connected", "peer": peer, "path": report.path, "time_to_connected_ms": report.time_to_connected_ms}),
                        &format!("connected to {peer} via {} in {:.1} ms", report.path, report.time_to_connected_ms),
                    );
                    let task = tokio::spawn(member_task(call.clone(), opts.clone(), tx.clone(), mode.clone()));
                    if let Some(old) = sessions.insert(peer, Member { call, task, ended: None }) {
                        old.call.hangup("replaced");
                        old.task.abort();
                    }
                }
                Some(RoomEvent::SessionFailed { peer, error }) => output::notice(
                    json,
                    json!({"event": "session_failed", "peer": peer, "error": error.to_string()}),
                    &format!("no session with {peer}: {error}"),
                ),
                None => break Exit::Server,
            },
            m = rx.recv() => match m {
                Some(FromMember::Chat { from, line }) => {
                    chat_received += 1;
                    output::chat(json, &from, &line);
                }
                Some(FromMember::Path { peer, to }) => {
                    paths.push(json!({
                        "at_ms": since.elapsed().as_secs_f64() * 1000.0,
                        "member": peer,
                        "path": to,
                        "why": "the pair's path changed",
                    }));
                    output::notice(
                        json,
                        json!({"event": "path", "peer": peer, "to": to, "at_ms": since.elapsed().as_secs_f64() * 1000.0}),
                        &format!("path to {peer} changed to {to}"),
                    );
                }
                Some(FromMember::Ended { peer, reason }) => {
                    if let Some(s) = sessions.get_mut(&peer) {
                        s.ended = Some(reason);
                    }
                }
                None => {}
            },
            // stdin closing changes nothing: the member stays until --duration, Ctrl-C or the end.
            Some(line) = stdin.next(), if !stdin.closed() => {
                if let Some(why) = crate::session::too_long(&line) {
                    output::notice(json, json!({"event": "not_sent", "why": why}), &why);
                    continue;
                }
                for (peer, s) in sessions.iter().filter(|(_, s)| s.ended.is_none()) {
                    if let Err(e) = s.call.send_chat(&line).await {
                        tracing::debug!(%peer, error = %e, "chat not sent");
                    }
                }
                chat_sent += 1;
            }
            _ = tick.tick() => {
                if topology_arg == TopologyArg::Auto {
                    // In mesh, the pairs' controllers measure the uplink: when one backs off
                    // for delay or loss, the sum of their targets is what it carries.
                    // In mesh, the pairs' controllers measure the uplink (`UplinkMeter`).
                    if *mode.borrow() == Topology::Mesh {
                        let live: Vec<_> = sessions
                            .values()
                            .filter(|s| s.ended.is_none())
                            .map(|s| *s.call.watch_rate().borrow())
                            .collect();
                        if !live.is_empty() {
                            // A queue building, or loss, on a pair's path (or its controller just
                            // backed off for either).
                            let backing_off = live.iter().any(|r| {
                                matches!(r.reason, RateReason::Delay | RateReason::Loss)
                                    || r.usage == natcall::Usage::Over
                                    || r.queue_delay_ms >= QUEUE_DELAY_MS
                                    || r.loss >= 0.02
                            });
                            let sum = live.iter().map(|r| r.target_bps).sum();
                            if let Some(up) = uplink.sample(backing_off, sum) {
                                uplink_bps = Some(up);
                            }
                        }
                    }
                    if let Some((to, why)) = chooser.update(std::time::Instant::now(), others.len() + 1, want_bps, uplink_bps) {
                        if to == Topology::FanOut {
                            let rate = fan_out_rate(uplink_bps);
                            r.set_fan_out_rate(rate).await;
                        }
                        // Samples from before the change say nothing of the new mode.
                        uplink = UplinkMeter::new(UPLINK_TICKS, UPLINK_BACKING_OFF);
                        mode_event(&mut topology, to, &why);
                        mode_tx.send_replace(to);
                    }
                }
                output::status(&status_text(room, &sessions, since, *mode.borrow(), &r.fan_out_report()));
            }
            _ = sleep_until_opt(deadline) => break Exit::Ok,
            _ = &mut ctrl_c => break Exit::Ok,
        }
    };
    if let Some(t) = fan_out_source {
        t.abort();
    }
    let fan_out = r.fan_out_report();
    let fan_out_rate = r.watch_fan_out_rate().map(|w| *w.borrow());
    r.leave();
    for s in sessions.values() {
        s.call.hangup("left the room");
    }
    // The sessions' last statistics, then their reports.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut reports = serde_json::Map::new();
    for (peer, s) in &sessions {
        s.task.abort();
        let mut v = serde_json::to_value(s.call.report())?;
        if let (Some(o), Some(end)) = (v.as_object_mut(), &s.ended) {
            o.insert("ended".into(), serde_json::to_value(end)?);
        }
        if let (Some(o), Some(f)) = (v.as_object_mut(), fan_out.received.get(peer)) {
            o.insert("fan_out".into(), serde_json::to_value(f)?);
        }
        reports.insert(peer.clone(), v);
    }
    if json {
        output::line(&json!({
            "event": "report",
            "room": room,
            "name": ep.name(),
            "members": reports,
            "topology": topology,
            "paths": paths,
            "fan_out": {
                "sent": {"audio": fan_out.sent[0], "video": fan_out.sent[1]},
                "keys_made": fan_out.keys_made,
                "unknown_key_packets": fan_out.unknown_key_packets,
                // The rate sent at when the room ended (under the server's budget, if any).
                "rate_bps": fan_out_rate,
            },
            "chat_sent": chat_sent,
            "chat_received": chat_received,
            "exit_code": exit as u8,
        }));
    } else {
        let mut text = format!(
            "left room {room} after {:.0} s; {chat_sent} lines sent, {chat_received} received",
            since.elapsed().as_secs_f64()
        );
        for (peer, s) in &sessions {
            let rep = s.call.report();
            let got = |t: &natcall::TrackReport| t.received.as_ref().map_or(0, |s| s.frames_complete);
            let m = s.call.media_report();
            let f = fan_out.received.get(peer).cloned().unwrap_or_default();
            let to = s.call.remote_addr().map(|a| format!(" to {a}")).unwrap_or_default();
            text.push_str(&format!(
                "\n  {peer}: path {}{to}, rtt {:.1} ms, received {} audio and {} video frames on the session, {} and {} by fan-out",
                rep.path,
                rep.rtt_ms,
                got(&m.audio),
                got(&m.video),
                got(&f.audio),
                got(&f.video)
            ));
        }
        output::say(&text);
    }
    ep.close().await;
    Ok(exit)
}

/// One member's session: the test source (unless `--no-media`), received media drained (the
/// statistics count it), and its chat lines passed to the room loop; until the session ends.
async fn member_task(call: Arc<Call>, opts: Opts, tx: mpsc::Sender<FromMember>, mut mode: watch::Receiver<Topology>) {
    let peer = call.peer().to_owned();
    if let Err(e) = call.set_media_rate(opts.media.media_kbps.saturating_mul(1000)).await {
        tracing::warn!(error = %e, "cannot set the media rate");
    }
    // The test source runs on the session while this member is in mesh.
    let source = async {
        loop {
            let on = mode.wait_for(|m| *m == Topology::Mesh).await.is_ok();
            if !on || opts.media.no_media {
                return std::future::pending::<()>().await;
            }
            tokio::select! {
                () = session::test_source(&call, opts.media.video_kbps) => {}
                () = left(&mut mode, Topology::Mesh) => {}
            }
        }
    };
    // Received frames are counted in the session's statistics.
    let sink = async {
        while call.recv_frame().await.is_some() {}
        std::future::pending::<()>().await
    };
    let paths = async {
        let mut rx = call.watch_path();
        while let Some(to) = rx.changed().await {
            let _ = tx.send(FromMember::Path { peer: peer.clone(), to }).await;
        }
        std::future::pending::<()>().await
    };
    let chat = async {
        while let Ok(Some(line)) = call.recv_chat().await {
            let _ = tx
                .send(FromMember::Chat {
                    from: peer.clone(),
                    line,
                })
                .await;
        }
        std::future::pending::<()>().await
    };
    let reason = tokio::select! {
        r = call.ended() => r,
        () = source => unreachable!("the source runs until the session ends"),
        () = sink => unreachable!("pending"),
        () = chat => unreachable!("pending"),
        () = paths => unreachable!("pending"),
    };
    let _ = tx.send(FromMember::Ended { peer, reason }).await;
}

/// The built-in test source in fan-out, while this member is in fan-out: audio as
/// [`session::test_source`]'s, video at `video_kbps` (30 frames/s, a key frame every 2 s and
/// after each move to fan-out). Nothing comes back to adapt it: the server thins a slow
/// receiver's video in its own buffer.
async fn fan_out_source(
    sender: FanOutSender,
    video_kbps: u32,
    rate: watch::Receiver<u64>,
    mut mode: watch::Receiver<Topology>,
) {
    let start = Instant::now();
    let stamp = || start.elapsed().as_millis() as u32;
    // Video gets what the fan-out rate leaves after audio and the packets' overhead, at most
    // `video_kbps`: frames sized as an encoder would, the frame rate kept.
    let video_bytes = || {
        let bps = (*rate.borrow() * 4 / 5)
            .saturating_sub(AUDIO_KBPS * 1000)
            .min(u64::from(video_kbps) * 1000);
        (bps / 8 / 30).max(1) as usize
    };
    let (mut n, mut a) = (0u32, 0u32);
    loop {
        let on = mode.wait_for(|m| *m == Topology::FanOut).await.is_ok();
        if !on {
            return;
        }
        let mut audio = tokio::time::interval(Duration::from_millis(20));
        let mut video = tokio::time::interval(Duration::from_millis(33));
        let mut first = true;
        loop {
            let sent = tokio::select! {
                () = left(&mut mode, Topology::FanOut) => break,
                _ = audio.tick() => {
                    let mut frame = vec![0x41; 80];
                    frame[..4].copy_from_slice(&a.to_be_bytes());
                    a = a.wrapping_add(1);
                    sender.send_frame(Track::AUDIO, Frame::new(stamp(), frame)).await
                }
                _ = video.tick() => {
                    let key = first || n % 60 == 0;
                    first = false;
                    n += 1;
                    let frame = if key { Frame::key(stamp(), vec![0x4b; video_bytes()]) } else { Frame::new(stamp(), vec![0x56; video_bytes()]) };
                    sender.send_frame(Track::VIDEO, frame).await
                }
            };
            if sent.is_err() {
                return;
            }
        }
    }
}

/// Resolves when the topology is no longer `from` (or its sender is gone).
async fn left(mode: &mut watch::Receiver<Topology>, from: Topology) {
    let _ = mode.wait_for(|m| *m != from).await.map(|_| ());
}

/// The status line: the room, this member's topology, and per member its session's path and
/// RTT, and how its media arrives (on the session, or by fan-out through the server) with
/// audio/video loss and audio delay.
fn status_text(
    room: &str,
    sessions: &BTreeMap<String, Member>,
    since: Instant,
    mode: Topology,
    fan_out: &natcall::FanOutReport,
) -> String {
    let how = match mode {
        Topology::Mesh => "mesh",
        Topology::FanOut => "fan-out",
    };
    let mut parts = vec![format!("[{room}] {:.0}s {how}", since.elapsed().as_secs_f64())];
    for (peer, s) in sessions {
        if s.ended.is_some() {
            continue;
        }
        let on_session = s.call.media_report();
        let by_server = fan_out.received.get(peer);
        let packets = |m: &natcall::MediaReport| {
            m.audio.received.as_ref().map_or(0, |r| r.packets_received)
                + m.video.received.as_ref().map_or(0, |r| r.packets_received)
        };
        // The member's media comes one way or the other (or both, around a move).
        let (via, m) = match by_server {
            Some(f) if packets(f) > packets(&on_session) => ("server", f),
            _ => ("session", &on_session),
        };
        let loss = |t: &natcall::TrackReport| {
            t.received.as_ref().map_or(0.0, |r| {
                let all = r.packets_received + r.packets_lost;
                if all == 0 {
                    0.0
                } else {
                    r.packets_lost as f64 * 100.0 / all as f64
                }
            })
        };
        let delay = m.audio.received.as_ref().map_or(0.0, |r| r.delay_ms);
        // Short: a room's line holds every member (cut to the terminal's width).
        let via = if via == "server" { "srv" } else { "ses" };
        parts.push(format!(
            "{peer} {}/{via} {:.0}ms a{:.0}% v{:.0}% {:.0}ms",
            s.call.path(),
            s.call.rtt().as_secs_f64() * 1000.0,
            loss(&m.audio),
            loss(&m.video),
            delay
        ));
    }
    parts.join(" | ")
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The members a `--invite` list names, checked locally (the server checks them too).
pub fn parse_invite(list: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for name in list
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        natcall::validate_name(name).with_context(|| format!("--invite {name:?}"))?;
        out.push(name.to_owned());
    }
    Ok(out)
}
