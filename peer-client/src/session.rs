//! A call session: chat from stdin to the peer and back, a live status line, path changes, and
//! the report at the end. Shared by `natcall call` and `natcall listen`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use natcall::{Call, EndReason, Endpoint, EndpointConfig, Policy};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::TestHooks;
use crate::config::Settings;
use crate::output::{self, Exit};

/// Lines typed on stdin, read by one task for the whole process.
pub struct Stdin {
    rx: mpsc::Receiver<String>,
    closed: bool,
}

impl Stdin {
    fn spawn() -> Self {
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

    async fn next(&mut self) -> Option<String> {
        let line = self.rx.recv().await;
        self.closed = line.is_none();
        line
    }
}

async fn bind(settings: &Settings, json: bool) -> Result<Endpoint> {
    let server = settings.server;
    let name = settings.name.clone();
    let ep = Endpoint::bind(EndpointConfig::new(server, &settings.name, settings.identity.clone())).await?;
    let public = ep
        .public_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown (UDP blocked?)".into());
    output::notice(
        json,
        json!({"event": "registered", "name": name, "server": server.to_string(), "public_addr": ep.public_addr()}),
        &format!("registered as {name} at {server}; public UDP address {public}"),
    );
    Ok(ep)
}

/// `natcall call PEER`.
pub async fn call(
    settings: Settings,
    json: bool,
    peer: &str,
    policy: Policy,
    duration: Option<Duration>,
    test: TestHooks,
) -> Result<Exit> {
    let mut stdin = Stdin::spawn();
    let ep = bind(&settings, json).await?;
    output::status(&format!("calling {peer} ({policy})…"));
    let call = tokio::select! {
        c = ep.call(peer, policy) => c.with_context(|| format!("calling {peer}"))?,
        _ = tokio::signal::ctrl_c() => return Ok(Exit::Ok),
    };
    let exit = run(&ep, call, json, duration, test, &mut stdin, true).await;
    ep.close().await;
    exit
}

/// `natcall listen`.
pub async fn listen(
    settings: Settings,
    json: bool,
    once: bool,
    duration: Option<Duration>,
    test: TestHooks,
) -> Result<Exit> {
    let mut stdin = Stdin::spawn();
    let mut ep = bind(&settings, json).await?;
    loop {
        output::status("waiting for calls…");
        let incoming = tokio::select! {
            c = ep.accept() => match c {
                Ok(c) => c,
                // The server went away (restart, network): register again, backing off.
                Err(natcall::Error::ServerLost(reason)) => {
                    output::notice(json, json!({"event": "server_lost", "reason": reason}), &format!("lost the server: {reason}; reconnecting"));
                    ep = tokio::select! {
                        ep = reconnect(&settings, json) => ep,
                        _ = tokio::signal::ctrl_c() => return Ok(Exit::Ok),
                    };
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(Exit::Ok),
        };
        let caller = incoming.caller().to_owned();
        let policy = incoming.policy();
        output::notice(
            json,
            json!({"event": "incoming", "from": caller, "policy": policy.to_string()}),
            &format!("incoming call from {caller} ({policy}): accepting"),
        );
        let exit = match incoming.accept().await {
            // A listener whose stdin is already closed (e.g. /dev/null) has nothing to say:
            // its calls stay up until the peer, --duration or Ctrl-C ends them.
            Ok(call) => {
                let end_on_eof = !stdin.closed;
                run(&ep, call, json, duration, test, &mut stdin, end_on_eof).await?
            }
            Err(e) => {
                let e = anyhow::Error::from(e).context(format!("accepting the call from {caller}"));
                if once {
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

/// Registers again after losing the server: 1 s, doubling to 30 s between attempts.
async fn reconnect(settings: &Settings, json: bool) -> Endpoint {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::time::sleep(wait).await;
        match bind(settings, json).await {
            Ok(ep) => return ep,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?wait, "reconnecting failed");
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn path_text(call: &Call, since: Instant) -> String {
    format!(
        "[{}] path {}  rtt {:.1} ms  {:.0} s",
        call.peer(),
        call.path(),
        call.rtt().as_secs_f64() * 1000.0,
        since.elapsed().as_secs_f64()
    )
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs a connected call until it ends; prints the report; returns the exit code.
async fn run(
    ep: &Endpoint,
    call: Call,
    json: bool,
    duration: Option<Duration>,
    test: TestHooks,
    stdin: &mut Stdin,
    end_on_eof: bool,
) -> Result<Exit> {
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
    let mut path_rx = call.watch_path();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let chat_in = async {
        loop {
            match call.recv_chat().await {
                Ok(Some(line)) => {
                    received.fetch_add(1, Ordering::Relaxed);
                    output::chat(json, &peer, &line);
                }
                // The peer finished talking, or the stream broke: the call's end says why.
                Ok(None) | Err(_) => std::future::pending::<()>().await,
            }
        }
    };
    tokio::pin!(chat_in);
    let ended = loop {
        tokio::select! {
            line = stdin.next(), if !stdin.closed => match line {
                Some(line) => {
                    call.send_chat(&line).await?;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                None if end_on_eof => {
                    if let Err(e) = call.finish_chat().await {
                        tracing::warn!(error = %e, "not every chat line was acknowledged");
                    }
                    call.hangup("done");
                    break EndReason::Local;
                }
                None => {}
            },
            reason = call.ended() => break reason,
            _ = tokio::signal::ctrl_c() => {
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
            Ok(()) = path_rx.changed() => {
                let to = *path_rx.borrow_and_update();
                output::notice(json, json!({"event": "path", "to": to, "at_s": since.elapsed().as_secs_f64()}), &format!("path changed to {to}"));
            }
            _ = tick.tick() => output::status(&path_text(&call, since)),
            _ = &mut chat_in => {}
        }
    };
    // Lines the peer sent before hanging up may still be in our receive buffer.
    let _ = tokio::time::timeout(Duration::from_millis(300), &mut chat_in).await;
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
            o.insert("exit_code".into(), json!(exit as u8));
        }
        output::line(&v);
    } else {
        output::status("");
        let changes: Vec<String> = report
            .path_changes
            .iter()
            .map(|c| format!("{} → {} at {:.0} ms", c.from, c.to, c.at_ms))
            .collect();
        eprintln!(
            "call with {peer} ended ({ended}): path {} [{}], connected in {:.1} ms, rtt {:.1} ms, {} B sent, {} B received, {sent} lines sent, {received} received",
            report.path,
            changes.join(", "),
            report.time_to_connected_ms,
            report.rtt_ms,
            report.bytes_sent,
            report.bytes_received,
        );
    }
    Ok(exit)
}
