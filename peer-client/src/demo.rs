//! `natcall demo`: a rendezvous server and two peers, alice and bob, in this process on
//! loopback; alice calls bob, they chat both ways, alice hangs up, both reports are printed.
//! Needs no configuration and touches no files (identities are generated in memory).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use natcall::{Endpoint, EndpointConfig, Frame, Identity, Policy, Track};
use natcall_rendezvous::{Config, Server, Sockets};
use serde_json::json;

use crate::output::{self, Exit};

pub async fn run(json: bool) -> Result<Exit> {
    let sockets = Sockets::bind("127.0.0.1:0".parse()?).context("binding the demo server on loopback")?;
    let server_addr = sockets.local_addr()?;
    let server = Server::new(Config::default())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let srv = server.clone();
    let server_task = tokio::spawn(async move {
        srv.run(sockets, async {
            let _ = stop_rx.await;
        })
        .await
    });
    say(json, &format!("rendezvous server on {server_addr} (TCP + UDP)"));

    let alice = Endpoint::bind(EndpointConfig::new(server_addr, "alice", Identity::generate()?)).await?;
    let bob = Endpoint::bind(EndpointConfig::new(server_addr, "bob", Identity::generate()?)).await?;
    say(
        json,
        &format!(
            "alice registered, public UDP address {}",
            output::addr_text(alice.public_addr())
        ),
    );
    say(
        json,
        &format!(
            "bob registered, public UDP address {}",
            output::addr_text(bob.public_addr())
        ),
    );

    let bob_side = tokio::spawn(async move {
        let incoming = bob.accept().await?;
        let call = incoming.accept().await?;
        let line = call.recv_chat().await?.context("alice sent nothing")?;
        call.send_chat("hello alice, bob here").await?;
        // Count the media alice sends (the statistics land in the report).
        let end = tokio::select! {
            end = call.ended() => end,
            end = async {
                while call.recv_frame().await.is_some() {}
                std::future::pending::<natcall::EndReason>().await
            } => end,
        };
        let report = call.report();
        drop(call);
        anyhow::Ok((line, report, end, bob))
    });
    say(json, "alice calls bob (policy auto)…");
    let call = alice.call("bob", Policy::Auto).await?;
    say(
        json,
        &format!(
            "connected via {} in {:.1} ms",
            call.path(),
            call.report().time_to_connected_ms
        ),
    );
    call.send_chat("hello bob, alice here").await?;
    let reply = tokio::time::timeout(Duration::from_secs(10), call.recv_chat())
        .await??
        .context("no reply")?;
    call.finish_chat().await?;
    // A second of media (50 audio frames of 80 bytes, 30 video frames sized as an encoder
    // would, to what the call's rate controller gives video; the first a key frame), sealed in
    // packets of at most 512 bytes on the call's path.
    say(json, "alice sends a second of test audio and video…");
    let rate = call.watch_rate();
    for i in 0..50u32 {
        call.send_frame(Track::AUDIO, Frame::new(i * 20, vec![0x41; 80]))
            .await?;
        if i % 5 < 3 {
            let n = i / 5 * 3 + i % 5;
            let data = vec![0x56; (rate.borrow().video_bps / 8 / 30).max(1) as usize];
            call.send_frame(
                Track::VIDEO,
                if n == 0 {
                    Frame::key(i * 20, data)
                } else {
                    Frame::new(i * 20, data)
                },
            )
            .await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the statistics report (every 500 ms) catch up before the reports.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let alice_report = call.report();
    call.hangup("demo done");
    let (heard, bob_report, bob_end, bob) = bob_side.await??;
    drop(call);
    // Both peers leave before the server stops (else they would see it go away and say so).
    alice.close().await;
    bob.close().await;
    drop((alice, bob));
    say(json, &format!("bob heard:   {heard:?}"));
    say(json, &format!("alice heard: {reply:?}"));
    say(json, &format!("bob saw the call end: {bob_end}"));
    if json {
        output::line(&json!({"event": "report", "alice": alice_report, "bob": bob_report}));
    } else {
        println!("alice's report:\n{}", serde_json::to_string_pretty(&alice_report)?);
        println!("bob's report:\n{}", serde_json::to_string_pretty(&bob_report)?);
    }
    let _ = stop_tx.send(());
    server_task.await??;
    if heard != "hello bob, alice here" || reply != "hello alice, bob here" {
        bail!("the chat did not arrive intact");
    }
    Ok(Exit::Ok)
}

fn say(json: bool, text: &str) {
    if json {
        output::line(&json!({"event": "demo", "text": text}));
    } else {
        println!("{text}");
    }
}
