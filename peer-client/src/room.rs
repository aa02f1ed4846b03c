//! `natcall room ROOM`: a group call. Creates the room (`--create`, or `--invite NAMES`) or
//! joins it (invited, or `--code CODE`), then, with every other member, runs what a 1:1 call
//! runs on their pairwise session: the built-in test source (or nothing with `--no-media`),
//! received media counted, chat from stdin to everyone and from each member to the screen. Each
//! member's media goes to each other member on that pair's session (mesh; see docs/rooms.md).
//! The report holds each member's session report in the shape of a 1:1 call's
//! (`members.NAME.media.audio.received` …) and the topology changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use natcall::{Call, EndReason, RoomEvent};
use serde_json::json;
use tokio::sync::mpsc;

use crate::config::Settings;
use crate::output::{self, Exit};
use crate::session::{self, Opts, Stdin};

/// How this peer enters the room.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Create it, inviting these names.
    Create { invite: Vec<String> },
    /// Join it, invited or with a join code.
    Join { code: Option<String> },
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
pub async fn run(settings: Settings, opts: Opts, room: &str, entry: Entry) -> Result<Exit> {
    let json = opts.json;
    let mut stdin = Stdin::for_chat(&opts.media);
    let ep = session::bind(&settings, json).await?;
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
    let mut chat_sent = 0u64;
    let mut chat_received = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // One listener for the whole room: a `ctrl_c()` made anew in each turn of the loop misses a
    // SIGINT that lands between two turns.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let exit = loop {
        tokio::select! {
            ev = r.next_event() => match ev {
                Some(RoomEvent::MemberJoined(m)) => output::notice(
                    json,
                    json!({"event": "member_joined", "room": room, "name": m.name, "fingerprint": m.fingerprint.to_string()}),
                    &format!("{} joined", m.name),
                ),
                Some(RoomEvent::MemberLeft { name, reason }) => {
                    output::notice(
                        json,
                        json!({"event": "member_left", "room": room, "name": name, "reason": reason}),
                        &format!("{name} left ({reason})"),
                    );
                }
                Some(RoomEvent::Session { peer, call }) => {
                    let call = Arc::new(*call);
                    let report = call.report();
                    topology.push(json!({
                        "at_ms": since.elapsed().as_secs_f64() * 1000.0,
                        "member": peer,
                        "mode": "mesh",
                        "path": report.path,
                        "why": "a session per pair: media goes to each member on its own path",
                    }));
                    output::notice(
                        json,
                        json!({"event": "connected", "peer": peer, "path": report.path, "time_to_connected_ms": report.time_to_connected_ms}),
                        &format!("connected to {peer} via {} in {:.1} ms", report.path, report.time_to_connected_ms),
                    );
                    let task = tokio::spawn(member_task(call.clone(), opts.clone(), tx.clone()));
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
                    topology.push(json!({
                        "at_ms": since.elapsed().as_secs_f64() * 1000.0,
                        "member": peer,
                        "mode": "mesh",
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
                for (peer, s) in sessions.iter().filter(|(_, s)| s.ended.is_none()) {
                    if let Err(e) = s.call.send_chat(&line).await {
                        tracing::debug!(%peer, error = %e, "chat not sent");
                    }
                }
                chat_sent += 1;
            }
            _ = tick.tick() => output::status(&status_text(room, &sessions, since)),
            _ = sleep_until_opt(deadline) => break Exit::Ok,
            _ = &mut ctrl_c => break Exit::Ok,
        }
    };
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
        reports.insert(peer.clone(), v);
    }
    if json {
        output::line(&json!({
            "event": "report",
            "room": room,
            "name": ep.name(),
            "members": reports,
            "topology": topology,
            "chat_sent": chat_sent,
            "chat_received": chat_received,
            "exit_code": exit as u8,
        }));
    } else {
        output::status("");
        eprintln!(
            "left room {room} after {:.0} s; {chat_sent} lines sent, {chat_received} received",
            since.elapsed().as_secs_f64()
        );
        for (peer, s) in &sessions {
            let rep = s.call.report();
            let got = |t: &natcall::TrackReport| t.received.as_ref().map_or(0, |s| s.frames_complete);
            let m = s.call.media_report();
            eprintln!(
                "  {peer}: path {}, rtt {:.1} ms, received {} audio and {} video frames",
                rep.path,
                rep.rtt_ms,
                got(&m.audio),
                got(&m.video)
            );
        }
    }
    ep.close().await;
    Ok(exit)
}

/// One member's session: the test source (unless `--no-media`), received media drained (the
/// statistics count it), and its chat lines passed to the room loop; until the session ends.
async fn member_task(call: Arc<Call>, opts: Opts, tx: mpsc::Sender<FromMember>) {
    let peer = call.peer().to_owned();
    if let Err(e) = call.set_media_rate(opts.media.media_kbps.saturating_mul(1000)).await {
        tracing::warn!(error = %e, "cannot set the media rate");
    }
    let source = async {
        if !opts.media.no_media {
            session::test_source(&call, opts.media.video_kbps).await;
        }
        std::future::pending::<()>().await
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

fn status_text(room: &str, sessions: &BTreeMap<String, Member>, since: Instant) -> String {
    let mut parts = vec![format!("[{room}] {:.0} s", since.elapsed().as_secs_f64())];
    for (peer, s) in sessions {
        if s.ended.is_some() {
            continue;
        }
        let m = s.call.media_report();
        let loss = |t: &natcall::TrackReport| t.received.as_ref().map_or(0, |r| r.packets_lost);
        parts.push(format!(
            "{peer} {} {:.0} ms loss a{} v{}",
            s.call.path(),
            s.call.rtt().as_secs_f64() * 1000.0,
            loss(&m.audio),
            loss(&m.video)
        ));
    }
    parts.join("  ")
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
