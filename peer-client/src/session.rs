//! A call session: chat from stdin to the peer and back, a live status line, path changes, and
//! the report at the end. Shared by `natcall call` and `natcall listen`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use natcall::{Call, EndReason, Endpoint, EndpointConfig, Frame, Policy, ServerState, Track};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::config::Settings;
use crate::output::{self, Exit};
use crate::stream;
use crate::{MediaOpts, TestHooks};

/// Lines typed on stdin, read by one task for the whole process.
pub struct Stdin {
    rx: mpsc::Receiver<String>,
    closed: bool,
}

impl Stdin {
    /// Chat from stdin, unless a media input reads it.
    pub(crate) fn for_chat(media: &MediaOpts) -> Self {
        if media.reads_stdin() {
            let (_, rx) = mpsc::channel(1);
            return Self { rx, closed: true };
        }
        Self::spawn()
    }

    fn spawn() -> Self {
        // Typed into the terminal view: lines come from its key reader.
        if let Some(rx) = crate::view::read_lines() {
            return Self { rx, closed: false };
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        });
        Self { rx, closed: false }
    }

    /// Drops the lines typed so far and not read (typed while nothing was asked: they must
    /// not answer the next question or go to the next caller).
    pub(crate) fn discard_pending(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Whether stdin has ended.
    pub(crate) fn closed(&self) -> bool {
        self.closed
    }

    pub(crate) async fn next(&mut self) -> Option<String> {
        let line = self.rx.recv().await;
        self.closed = line.is_none();
        line
    }
}

pub(crate) async fn bind(settings: &Settings, json: bool) -> Result<Endpoint> {
    let server = settings.server;
    output::status(&format!("connecting to the rendezvous server at {server}…"));
    let name = settings.name.clone();
    let mut config = EndpointConfig::new(server, &settings.name, settings.identity.clone());
    config.server_trust = settings.trust.clone();
    config.contacts = Some(settings.contacts.clone());
    config.portmap = settings.portmap;
    config.fallback_servers = settings.fallbacks.clone();
    let ep = Endpoint::bind(config).await?;
    // The first server may not have answered: one of the others is home then.
    let server = ep.server();
    let public = ep
        .public_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown (UDP blocked?)".into());
    let mapping = ep.nat_mapping();
    let nat = match mapping {
        natcall::Mapping::Unknown => String::new(),
        m => format!(" (NAT mapping {m})"),
    };
    output::notice(
        json,
        json!({"event": "registered", "name": name, "server": server.to_string(), "public_addr": ep.public_addr(), "nat_mapping": mapping.to_string()}),
        &format!("registered as {name} at {server}; public UDP address {public}{nat}"),
    );
    tokio::spawn(report_server(ep.clone(), name, json));
    Ok(ep)
}

/// [`bind`], or `None` when Ctrl-C (or SIGTERM) comes first.
pub(crate) async fn bind_or_interrupted(settings: &Settings, json: bool) -> Result<Option<Endpoint>> {
    tokio::select! {
        ep = bind(settings, json) => ep.map(Some),
        _ = tokio::signal::ctrl_c() => Ok(None),
    }
}

/// Says when the server is lost and when the endpoint is registered again (calls go on
/// meanwhile: direct ones untouched, relayed ones resume when the server is back).
async fn report_server(ep: Endpoint, name: String, json: bool) {
    let mut seen = ServerState::Up;
    loop {
        seen = ep.server_changed(&seen).await;
        let server = ep.server();
        match &seen {
            ServerState::Up => output::notice(
                json,
                json!({"event": "registered", "name": name, "server": server.to_string(), "public_addr": ep.public_addr(), "again": true}),
                &format!("registered as {name} at {server} again"),
            ),
            ServerState::Reconnecting(reason) => output::notice(
                json,
                json!({"event": "server_lost", "reason": reason}),
                &format!("lost the server: {reason}; reconnecting (calls go on)"),
            ),
            _ => return,
        }
    }
}

/// `natcall call PEER`.
pub async fn call(settings: Settings, opts: Opts, peer: &str, policy: Policy) -> Result<Exit> {
    let json = opts.json;
    let mut stdin = Stdin::for_chat(&opts.media);
    let Some(ep) = bind_or_interrupted(&settings, json).await? else {
        return Ok(Exit::Ok);
    };
    output::status(&format!("calling {peer} ({policy})…"));
    let call = tokio::select! {
        c = ep.call(peer, policy) => match c {
            Ok(c) => c,
            Err(e) => {
                // Flush first: the hang-up (a callee whose key changed) must reach the server, or
                // the callee waits for this side to come back.
                ep.close().await;
                return Err(anyhow::Error::from(e).context(format!("calling {peer}")));
            }
        },
        _ = tokio::signal::ctrl_c() => return Ok(Exit::Ok),
    };
    let exit = run(&ep, call, opts, &mut stdin, true).await;
    ep.close().await;
    exit
}

/// Which calls `natcall listen --accept` takes without asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accept {
    /// Every caller.
    All,
    /// Callers whose key is a contact (met before, or accepted).
    Contacts,
    /// These names (with the key met before, when there is one).
    Names(Vec<String>),
}

impl std::str::FromStr for Accept {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Self::All),
            "contacts" => Ok(Self::Contacts),
            _ => {
                let names: Vec<String> = s.split(',').map(|n| n.trim().to_owned()).collect();
                if let Some(word) = names.iter().find(|n| *n == "all" || *n == "contacts") {
                    return Err(format!("{word} is a rule of its own: use it alone, or list names only"));
                }
                for n in &names {
                    natcall::validate_name(n).map_err(|e| {
                        format!("{n:?} is neither all, contacts nor a name ({e}); use all, contacts or NAME,NAME…")
                    })?;
                }
                Ok(Self::Names(names))
            }
        }
    }
}

/// What this peer's contacts say of a caller's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// The key met before under this name.
    Contact,
    /// No key was met under this name.
    New,
    /// Another key was met under this name: the call is refused whatever the answer.
    Changed,
}

impl Known {
    fn of(contacts: &natcall::Contacts, caller: &str, key: natcall::Fingerprint) -> Self {
        match contacts.get(caller) {
            Ok(Some(c)) if c.fingerprint == key => Self::Contact,
            Ok(Some(_)) => Self::Changed,
            _ => Self::New,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Self::Contact => "a contact: the key you met before",
            Self::New => "new: you have not met this name before",
            Self::Changed => "KEY CHANGED since you last met: the call will be refused",
        }
    }

    fn json(self) -> &'static str {
        match self {
            Self::Contact => "contact",
            Self::New => "new",
            Self::Changed => "changed",
        }
    }
}

impl Accept {
    /// Whether a caller is taken; else why not.
    fn allows(&self, caller: &str, known: Known) -> Result<(), &'static str> {
        match self {
            Self::All => Ok(()),
            Self::Contacts if known == Known::Contact => Ok(()),
            Self::Contacts => Err("not a contact (--accept contacts)"),
            Self::Names(names) if names.iter().any(|n| n == caller) => Ok(()),
            Self::Names(_) => Err("not among the names --accept allows"),
        }
    }
}

/// Why a chat line cannot be sent as it is (one line of at most [`natcall::MAX_CHAT_LINE`]
/// bytes), said to the person; the call goes on.
pub(crate) fn too_long(line: &str) -> Option<String> {
    (line.len() > natcall::MAX_CHAT_LINE).then(|| {
        format!(
            "not sent: a chat line is at most {} bytes, this one has {}",
            natcall::MAX_CHAT_LINE,
            line.len()
        )
    })
}

/// How long a person has to answer a call.
const ANSWER_TIME: Duration = Duration::from_secs(30);

/// Asks the person at the terminal whether to take the call; `Err` says why not.
async fn ask(stdin: &mut Stdin, caller: &str) -> Result<(), &'static str> {
    output::status(&format!("accept the call from {caller}? type y or n, then Enter"));
    crate::view::asking(true);
    let answer = answer(stdin, caller).await;
    crate::view::asking(false);
    answer
}

async fn answer(stdin: &mut Stdin, caller: &str) -> Result<(), &'static str> {
    let answer = async {
        loop {
            match stdin.next().await.map(|l| l.trim().to_ascii_lowercase()) {
                Some(l) if l == "y" || l == "yes" => return Ok(()),
                Some(l) if l == "n" || l == "no" => return Err("you declined"),
                Some(_) => output::say(&format!("answer y or n: accept the call from {caller}?")),
                None => return Err("input ended"),
            }
        }
    };
    tokio::time::timeout(ANSWER_TIME, answer)
        .await
        .unwrap_or(Err("no answer in 30 s"))
}

/// `natcall listen`: takes calls one at a time, as `accept` allows or the person answers.
pub async fn listen(
    settings: Settings,
    opts: Opts,
    once: bool,
    accept: Option<Accept>,
    policy: Policy,
) -> Result<Exit> {
    let json = opts.json;
    let mut stdin = Stdin::for_chat(&opts.media);
    // A person at a terminal is asked, unless a rule was given; anything else takes what the
    // rule allows, every caller by default (a listener started without a terminal is a service
    // set up to take calls; keys that changed are refused whatever the rule).
    let asking = accept.is_none() && !json && crate::view::foreground(&std::io::stdin()) && !opts.media.reads_stdin();
    let accept = accept.unwrap_or(Accept::All);
    let Some(ep) = bind_or_interrupted(&settings, json).await? else {
        return Ok(Exit::Ok);
    };
    loop {
        output::status("waiting for calls…");
        // The endpoint registers again by itself when the server goes away (restart, network);
        // `accept` fails only when it cannot (its name went to another key or session).
        let incoming = tokio::select! {
            c = ep.accept() => c.context("waiting for calls")?,
            _ = tokio::signal::ctrl_c() => return Ok(Exit::Ok),
        };
        let caller = incoming.caller().to_owned();
        let key = incoming.fingerprint();
        let known = Known::of(&settings.contacts, &caller, key);
        output::notice(
            json,
            json!({"event": "incoming", "from": caller, "policy": incoming.policy().to_string(), "key": key.to_string(), "known": known.json()}),
            &format!("{caller} is calling ({})\n  key {key}", known.text()),
        );
        let decision = if incoming.policy().combine(policy).is_none() {
            // Cannot agree: no question to ask; `accept_with` declines it with the reason.
            Ok(())
        } else if asking {
            stdin.discard_pending();
            let answer = ask(&mut stdin, &caller);
            tokio::pin!(answer);
            loop {
                tokio::select! {
                    d = &mut answer => break d,
                    // Another caller while this one rings: busy, at once.
                    other = ep.accept() => {
                        if let Ok(other) = other {
                            let from = other.caller().to_owned();
                            other.busy();
                            output::notice(json, json!({"event": "busy", "from": from}), &format!("{from} tried to call (busy)"));
                        }
                    }
                    _ = tokio::signal::ctrl_c() => {
                        let _ = incoming.reject();
                        return Ok(Exit::Ok);
                    }
                }
            }
        } else {
            accept.allows(&caller, known)
        };
        if let Err(why) = decision {
            let _ = incoming.reject();
            output::notice(
                json,
                json!({"event": "declined", "from": caller, "why": why}),
                &format!("declined the call from {caller}: {why}"),
            );
            continue;
        }
        let accepted = tokio::select! {
            a = incoming.accept_with(policy) => a,
            // Connecting can take seconds: Ctrl-C meanwhile stops the listener.
            _ = tokio::signal::ctrl_c() => return Ok(Exit::Ok),
        };
        let exit = match accepted {
            // A listener ends a call when its stdin closes only after it typed something in
            // that call: a listener with nothing to say (stdin /dev/null, a service) keeps its
            // calls up until the peer, --duration or Ctrl-C ends them.
            Ok(call) => run(&ep, call, opts.clone(), &mut stdin, false).await?,
            Err(e) => {
                let e = anyhow::Error::from(e).context(format!("accepting the call from {caller}"));
                if once {
                    // Flush first: a decline (a caller whose key changed) must reach the server.
                    ep.close().await;
                    return Err(e);
                }
                let exit = output::classify(&e);
                output::fail(json, exit, &e);
                continue;
            }
        };
        if once {
            ep.close().await;
            return Ok(exit);
        }
    }
}

fn path_text(call: &Call, since: Instant) -> String {
    let m = call.media_report();
    // Most telling first, the path's address last: the line is cut to the terminal's width.
    let track = |name: &str, r: &natcall::TrackReport| match &r.received {
        Some(s) => format!(
            " | {name} {:.0}k lost {} jit {:.0}ms",
            s.bitrate_bps as f64 / 1000.0,
            s.packets_lost,
            s.jitter_ms
        ),
        None => String::new(),
    };
    let to = call.remote_addr().map(|a| format!(" | {a}")).unwrap_or_default();
    format!(
        "[{}] {:.0}s {} rtt {:.0}ms send {:.0}k{}{}{to}",
        call.peer(),
        since.elapsed().as_secs_f64(),
        call.path(),
        call.rtt().as_secs_f64() * 1000.0,
        m.send_rate_bps as f64 / 1000.0,
        track("audio", &m.audio),
        track("video", &m.video),
    )
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs a connected call until it ends; prints the report; returns the exit code.
/// How a session runs.
#[derive(Debug, Clone)]
pub struct Opts {
    pub json: bool,
    pub duration: Option<Duration>,
    pub test: TestHooks,
    pub media: MediaOpts,
}

/// The built-in test source: audio (80-byte frames every 20 ms, 32 kbit/s, each starting with
/// its number, big-endian u32, so a `--recv-audio` file shows order and gaps) and video (30
/// frames/s, a key frame every 2 s and whenever frames are skipped until one). Video frames are
/// sized as an encoder would: to what the
/// call's rate controller gives video now ([`natcall::MediaRate::video_bps`]), at most
/// `video_kbps`; the frame rate stays. Runs until the call ends.
pub(crate) async fn test_source(call: &Call, video_kbps: u32) {
    let start = Instant::now();
    let rate = call.watch_rate();
    let mut audio = tokio::time::interval(Duration::from_millis(20));
    let mut video = tokio::time::interval(Duration::from_millis(33));
    let ceiling = u64::from(video_kbps) * 1000;
    let (mut n, mut a) = (0u32, 0u32);
    // Each frame is stamped when its tick fires (not before waiting for it), so the
    // timestamps carry no scheduling skew into the peer's jitter and delay estimates.
    let stamp = || start.elapsed().as_millis() as u32;
    loop {
        let sent = tokio::select! {
            _ = audio.tick() => {
                let ts = stamp();
                let mut frame = vec![0x41; 80];
                frame[..4].copy_from_slice(&a.to_be_bytes());
                a = a.wrapping_add(1);
                call.send_frame(Track::AUDIO, Frame::new(ts, frame)).await
            }
            _ = video.tick() => {
                let ts = stamp();
                let (bps, key_wanted) = {
                    let r = rate.borrow();
                    (r.video_bps.min(ceiling), r.key_frame_wanted)
                };
                let video_bytes = (bps / 8 / 30).max(1) as usize;
                // A key frame every 2 s, or at once when frames are being skipped until one.
                let key = n % 60 == 0 || key_wanted;
                let frame = if key { Frame::key(ts, vec![0x4b; video_bytes]) } else { Frame::new(ts, vec![0x56; video_bytes]) };
                n += 1;
                call.send_frame(Track::VIDEO, frame).await
            }
        };
        if sent.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The `rate` event: the sender's target and what it is based on.
fn rate_event(rate: &natcall::MediaRate, since: Instant) -> serde_json::Value {
    json!({
        "event": "rate",
        "at_ms": since.elapsed().as_secs_f64() * 1000.0,
        "target_bps": rate.target_bps,
        "video_bps": rate.video_bps,
        "delivered_bps": rate.delivered_bps,
        "loss": rate.loss,
        "usage": rate.usage,
        "reason": rate.reason,
        "relay_budget_bps": rate.relay_budget_bps,
        "queue_delay_ms": rate.queue_delay_ms,
        "competing": rate.competing,
    })
}

/// What the user is told once when the media session notices something.
fn notice_text(n: &natcall::MediaNotice, media: &MediaOpts) -> String {
    match n {
        natcall::MediaNotice::StreamTooFast { track, target_bps } => {
            let flag = if *track == 0 { "--send-audio" } else { "--send-video" };
            let what = if *track == 0 {
                &media.send_audio
            } else {
                &media.send_video
            };
            format!(
                "{flag} {} is faster than the path carries (about {} kbit/s now): it is sent at that pace and falls behind real time; lower its bitrate (e.g. ffmpeg -b:v {}k)",
                what.as_deref().unwrap_or("-"),
                target_bps / 1000,
                (target_bps * 8 / 10 / 1000).max(1),
            )
        }
    }
}

/// After the last media input was handed to the socket or the relay, how long the call stays up
/// so the tail reaches the peer, on top of two round trips (what the peer's jitter buffer still
/// holds when the call ends is delivered to its outputs then).
const LINGER: Duration = Duration::from_millis(500);

/// Sends every `--send-*` input until it ends, then waits until it was sent and delivered.
async fn send_inputs(call: &Call, media: &MediaOpts, sent_bytes: &AtomicU64) -> Result<()> {
    let one = |spec: Option<String>, track: Track, flag: &'static str| async move {
        let Some(spec) = spec else { return Ok(0) };
        let what = format!("{flag} {spec}");
        let n = if spec == "-" {
            stream::send(call, track, tokio::io::stdin(), &what, sent_bytes).await?
        } else {
            let f = tokio::fs::File::open(&spec)
                .await
                .with_context(|| format!("opening {spec}"))?;
            stream::send(call, track, f, &what, sent_bytes).await?
        };
        anyhow::Ok(n)
    };
    tokio::try_join!(
        one(media.send_audio.clone(), Track::AUDIO, "--send-audio"),
        one(media.send_video.clone(), Track::VIDEO, "--send-video"),
    )?;
    call.flush_media().await.context("sending the last media")?;
    tokio::time::sleep(LINGER + call.rtt() * 2).await;
    Ok(())
}

/// Whether `e` comes from the call having ended (not from the input itself).
fn ended_under(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<natcall::Error>(), Some(natcall::Error::Ended(_))))
}

/// `caller`: stdin closing ends the call (after the lines typed so far are delivered); for a
/// listener only once it has typed a line in this call.
async fn run(ep: &Endpoint, call: Call, opts: Opts, stdin: &mut Stdin, caller: bool) -> Result<Exit> {
    let Opts {
        json,
        duration,
        test,
        media,
    } = opts;
    let peer = call.peer().to_owned();
    let report = call.report();
    output::notice(
        json,
        json!({"event": "connected", "peer": peer, "path": report.path, "time_to_connected_ms": report.time_to_connected_ms}),
        &format!(
            "connected to {peer} via {} in {:.1} ms",
            report.path, report.time_to_connected_ms
        ),
    );
    let since = Instant::now();
    let deadline = duration.map(|d| since + d);
    let mut kill_at = test.test_kill_udp_after.map(|s| since + Duration::from_secs_f64(s));
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let (media_in, media_out) = (AtomicU64::new(0), AtomicU64::new(0));
    if let Err(e) = call.set_media_rate(media.media_kbps.saturating_mul(1000)).await {
        tracing::warn!(error = %e, "cannot set the media rate");
    }
    let mut path_rx = call.watch_path();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // The target as it changes, at most every 250 ms (`rate` events with --json).
    let mut rate_rx = call.watch_rate();
    let mut rate_tick = tokio::time::interval(Duration::from_millis(250));
    rate_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut notices_open = true;
    let mut accepting = true;
    // Ends when the peer finished talking or the stream broke (the call's end says why).
    let chat_in = async {
        while let Ok(Some(line)) = call.recv_chat().await {
            received.fetch_add(1, Ordering::Relaxed);
            output::chat(json, &peer, &line);
        }
    };
    tokio::pin!(chat_in);
    let mut chat_open = true;
    // The media inputs, sent until they end (then the call ends); else the test source.
    let source = async {
        if media.has_inputs() {
            return send_inputs(&call, &media, &media_in).await;
        }
        if !media.no_media {
            test_source(&call, media.video_kbps).await;
        }
        std::future::pending().await
    };
    tokio::pin!(source);
    // Each side tells the other whether its inputs end (files, pipes): a call with inputs on both
    // sides ends once both ended and were delivered, so neither direction is cut short.
    let mut signal = match call.announce_inputs(media.has_inputs()).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell the peer about this side's inputs");
            None
        }
    };
    let peer_inputs = call.peer_inputs_done();
    tokio::pin!(peer_inputs);
    let (mut mine_done, mut peer_done) = (false, false);
    // Received media frames go to the --recv-* outputs (else they are only counted in the
    // statistics). The first frame of each track is announced (`first_media`, ms since the call
    // was placed). Ends when the call's media ends.
    let placed_ms = report.time_to_connected_ms;
    let sink = async {
        let mut outs = [None, None];
        for (slot, (spec, what)) in outs.iter_mut().zip([
            (&media.recv_audio, "received audio"),
            (&media.recv_video, "received video"),
        ]) {
            if let Some(spec) = spec {
                *slot = Some(stream::Output::open(spec, what).await?);
            }
        }
        let mut seen = [false; 2];
        while let Some(f) = call.recv_frame().await {
            let i = usize::from(f.track == Track::VIDEO);
            if !seen[i] {
                seen[i] = true;
                let name = if i == 0 { "audio" } else { "video" };
                let at_ms = placed_ms + since.elapsed().as_secs_f64() * 1000.0;
                output::notice(
                    json,
                    json!({"event": "first_media", "track": name, "at_ms": at_ms}),
                    &format!("first {name} frame {at_ms:.1} ms after the call was placed"),
                );
            }
            if let Some(out) = outs.get_mut(i).and_then(Option::as_mut) {
                out.write(&f.data).await?;
                out.flush().await?;
                media_out.fetch_add(f.data.len() as u64, Ordering::Relaxed);
            }
        }
        anyhow::Ok(())
    };
    tokio::pin!(sink);
    let mut sink_done = false;
    let mut failure: Option<anyhow::Error> = None;
    // One listener for the whole call: a `ctrl_c()` made anew in each turn of the loop misses
    // a SIGINT that lands between two turns (the loop turns for every chat line, tick and
    // notice).
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let ended = loop {
        tokio::select! {
            line = stdin.next(), if !stdin.closed => match line {
                Some(line) => {
                    if let Some(why) = too_long(&line) {
                        output::notice(json, json!({"event": "not_sent", "why": why}), &why);
                    } else {
                        call.send_chat(&line).await?;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None if (caller && !media.has_inputs()) || sent.load(Ordering::Relaxed) > 0 => {
                    if let Err(e) = call.finish_chat().await {
                        tracing::warn!(error = %e, "not every chat line was acknowledged");
                    }
                    call.hangup("done");
                    break EndReason::Local;
                }
                None => {}
            },
            reason = call.ended() => break reason,
            // Calls that come during this one are told busy at once.
            incoming = ep.accept(), if accepting => match incoming {
                Ok(other) => {
                    let from = other.caller().to_owned();
                    other.busy();
                    output::notice(json, json!({"event": "busy", "from": from}), &format!("{from} tried to call (busy)"));
                }
                Err(_) => accepting = false,
            },
            _ = &mut ctrl_c => {
                call.hangup("interrupted");
                break EndReason::Local;
            }
            _ = sleep_until_opt(deadline) => {
                call.hangup("duration reached");
                break EndReason::Local;
            }
            _ = sleep_until_opt(kill_at) => {
                tracing::info!("test hook: dropping all UDP to and from the peer");
                ep.simulate_dead_udp(true);
                kill_at = None;
            }
            Some(to) = path_rx.changed() => {
                output::notice(json, json!({"event": "path", "to": to, "remote_addr": call.remote_addr(), "at_ms": since.elapsed().as_secs_f64() * 1000.0}), &format!("path changed to {to}{}", call.remote_addr().map(|a| format!(" ({a})")).unwrap_or_default()));
            }
            _ = tick.tick() => output::status(&path_text(&call, since)),
            _ = rate_tick.tick(), if json => {
                if rate_rx.has_changed().unwrap_or(false) {
                    let rate = *rate_rx.borrow_and_update();
                    output::line(&rate_event(&rate, since));
                }
            }
            n = call.media_notice(), if notices_open => match n {
                Some(n) => {
                    let mut v = serde_json::to_value(&n)?;
                    if let Some(o) = v.as_object_mut() {
                        o.insert("event".into(), json!("media_notice"));
                    }
                    output::notice(json, v, &notice_text(&n, &media));
                }
                None => notices_open = false,
            },
            _ = &mut chat_in, if chat_open => chat_open = false,
            r = &mut source, if !mine_done => match r {
                Ok(()) => {
                    mine_done = true;
                    if let Some(s) = signal.take() {
                        if let Err(e) = s.ended().await {
                            tracing::warn!(error = %e, "cannot tell the peer this side's inputs ended");
                        }
                    }
                    if peer_done {
                        call.hangup("sent everything");
                        break EndReason::Local;
                    }
                    output::notice(
                        json,
                        json!({"event": "inputs_ended", "waiting_for": peer}),
                        &format!("your inputs were sent; the call goes on until {peer}'s end too (Ctrl-C hangs up)"),
                    );
                }
                // The call ended under the input (the peer hung up, the path died): say why.
                Err(e) if ended_under(&e) => break call.ended().await,
                Err(e) => {
                    failure = Some(e);
                    call.hangup("media input failed");
                    break EndReason::Local;
                }
            },
            r = &mut peer_inputs, if !peer_done => {
                peer_done = true;
                if r.is_ok() && mine_done {
                    call.hangup("sent everything");
                    break EndReason::Local;
                }
            }
            r = &mut sink, if !sink_done => {
                sink_done = true;
                if let Err(e) = r {
                    failure = Some(e);
                    call.hangup("media output failed");
                    break EndReason::Local;
                }
            }
        }
    };
    // Frames still on their way to the outputs: the media ends shortly after the call.
    if !sink_done {
        match tokio::time::timeout(Duration::from_secs(2), &mut sink).await {
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Ok(Ok(())) => {}
            Err(_) => tracing::warn!("received media still arriving 2 s after the call ended"),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    // Lines the peer sent before hanging up may still be in our receive buffer: read on until
    // its stream ends (at once after a graceful hang-up), for at most 300 ms. Waiting the full
    // 300 ms every time kept a listener from taking its next call for that long.
    if chat_open {
        let _ = tokio::time::timeout(Duration::from_millis(300), &mut chat_in).await;
    }
    let exit = match &ended {
        EndReason::Local | EndReason::Peer(_) | EndReason::Server(_) => Exit::Ok,
        EndReason::Lost(_) | EndReason::Failed(_) => Exit::Dropped,
    };
    let report = call.report();
    let (sent, received) = (sent.load(Ordering::Relaxed), received.load(Ordering::Relaxed));
    if json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("event".into(), json!("report"));
            o.insert("name".into(), json!(ep.name()));
            o.insert("ended".into(), serde_json::to_value(&ended)?);
            o.insert("chat_sent".into(), json!(sent));
            o.insert("chat_received".into(), json!(received));
            o.insert("media_input_bytes".into(), json!(media_in.load(Ordering::Relaxed)));
            o.insert("media_output_bytes".into(), json!(media_out.load(Ordering::Relaxed)));
            o.insert("remote_addr".into(), json!(call.remote_addr()));
            o.insert("exit_code".into(), json!(exit as u8));
        }
        output::line(&v);
    } else {
        let changes: Vec<String> = report
            .path_changes
            .iter()
            .map(|c| format!("{} → {} at {:.0} ms", c.from, c.to, c.at_ms))
            .collect();
        let to = call.remote_addr().map(|a| format!(" to {a}")).unwrap_or_default();
        output::say(&format!(
            "call with {peer} ended ({ended}): path {}{to} [{}], connected in {:.1} ms, rtt {:.1} ms\n  {}\n  {}\n  chat: {sent} sent, {received} received; chat and call control over QUIC: {} sent, {} received\n  {}",
            report.path,
            changes.join(", "),
            report.time_to_connected_ms,
            report.rtt_ms,
            output::track_text("audio", &report.media.audio),
            output::track_text("video", &report.media.video),
            output::bytes_text(report.bytes_sent),
            output::bytes_text(report.bytes_received),
            output::traversal_text(&report.traversal),
        ));
    }
    Ok(exit)
}
