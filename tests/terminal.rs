//! What a person sees: `natcall listen` on a real 80-column terminal (tmux), answering with y
//! or n, a call in progress with chat and half-typed input, and its end.

use std::time::{Duration, Instant};

use natcall_e2e::{Peer, Rendezvous, Tmux, bin};

const EXIT: Duration = Duration::from_secs(20);

/// `natcall listen --once` as bob on the terminal `tmux`, session "bob".
fn bob_listens(tmux: &Tmux, dir: &std::path::Path, server: std::net::SocketAddr) {
    let cmd = format!(
        "{} --server {server} --name bob --home {} listen --once",
        bin("natcall").display(),
        dir.join("bob").display()
    );
    tmux.spawn("bob", &cmd);
    tmux.wait_for("bob", "registered as bob", EXIT);
}

#[test]
fn a_call_on_an_80_column_terminal_keeps_one_status_line_chat_and_the_typed_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start(dir.path());
    let tmux = Tmux::new(dir.path(), 80, 24);
    bob_listens(&tmux, dir.path(), server.addr);

    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob"]);
    // bob is asked, with alice's key and that she is new to him.
    let screen = tmux.wait_for("bob", "accept the call from alice? type y or n", EXIT);
    assert!(
        screen.iter().any(|l| l.contains("alice is calling (new")),
        "{}",
        screen.join("\n")
    );
    tmux.keys("bob", &["y", "Enter"]);
    alice.wait_event("connected", EXIT, |_| true);
    let connected = Instant::now();
    tmux.wait_for("bob", "answer: y", EXIT);
    alice.say("hello bob");
    alice.say("a second line, to see that chat is never glued to the status line");
    tmux.wait_for("bob", "alice: a second line", EXIT);
    tmux.keys("bob", &["half typed"]);

    // After 10 s of the call (20 refreshes of the status line), the screen holds one status
    // line, each chat line on its own row, and the line being typed, intact, at the bottom.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(connected.elapsed()));
    let screen = tmux.capture("bob");
    let text = screen.join("\n");
    let status: Vec<&String> = screen.iter().filter(|l| l.contains("[alice]")).collect();
    assert_eq!(status.len(), 1, "one status line:\n{text}");
    assert!(status[0].starts_with("[alice] "), "{text}");
    assert!(status[0].contains(" lan rtt "), "{text}");
    assert!(screen.iter().all(|l| l.chars().count() <= 80), "{text}");
    assert!(screen.iter().any(|l| l == "alice: hello bob"), "{text}");
    assert!(
        screen
            .iter()
            .any(|l| l == "alice: a second line, to see that chat is never glued to the status line"),
        "{text}"
    );
    let rows: Vec<&String> = screen.iter().filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.last().map(|l| l.as_str()), Some("> half typed"), "{text}");
    assert_eq!(
        rows[rows.len() - 2],
        status[0],
        "the status line is just above the input:\n{text}"
    );

    // Ctrl-C hangs up: the summary counts each track's frames and bytes, names the path's
    // address, and bob exits 0; alice sees bob hang up.
    tmux.keys("bob", &["C-c"]);
    let screen = tmux.wait_for("bob", "TTY=", EXIT);
    let text = screen.join("\n");
    assert!(screen.iter().any(|l| l == "EXIT=0"), "{text}");
    assert!(
        screen.iter().any(|l| l == "TTY=icanon echo"),
        "the terminal is given back:\n{text}"
    );
    assert!(
        screen
            .iter()
            .any(|l| l.starts_with("call with alice ended") && l.contains("path lan to 127.0.0.1:")),
        "{text}"
    );
    assert!(
        screen
            .iter()
            .any(|l| l.trim_start().starts_with("video: ") && l.contains("frames (")),
        "{text}"
    );
    assert!(!text.contains("Some("), "{text}");
    assert_eq!(alice.wait_exit(EXIT), 0, "{}", alice.log_text());
}

#[test]
fn a_caller_declined_at_the_terminal_is_told_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start(dir.path());
    let tmux = Tmux::new(dir.path(), 80, 24);
    bob_listens(&tmux, dir.path(), server.addr);

    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob"]);
    tmux.wait_for("bob", "accept the call from alice?", EXIT);
    tmux.keys("bob", &["n", "Enter"]);
    let answered = Instant::now();
    assert_eq!(alice.wait_exit(EXIT), 5, "{}", alice.log_text());
    assert!(
        answered.elapsed() < Duration::from_secs(3),
        "the decline took {:?}",
        answered.elapsed()
    );
    let err = alice.wait_event("error", EXIT, |_| true);
    assert_eq!(err["error"], "calling bob: bob declined");
    tmux.wait_for("bob", "declined the call from alice: you declined", EXIT);
}

#[test]
fn a_peer_cannot_drive_the_terminal_and_ctrl_d_hangs_up_with_the_keyboard_still_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start(dir.path());
    let tmux = Tmux::new(dir.path(), 80, 24);
    let cmd = format!(
        "{} --server {} --name bob --home {} listen",
        bin("natcall").display(),
        server.addr,
        dir.path().join("bob").display()
    );
    tmux.spawn("bob", &cmd);
    tmux.wait_for("bob", "registered as bob", EXIT);
    // Typed while no call rings: not an answer to the next one, not chat for it.
    tmux.keys("bob", &["y", "Enter", "note to self", "Enter"]);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob", "--no-media"]);
    tmux.wait_for("bob", "accept the call from alice?", EXIT);
    tmux.keys("bob", &["y", "Enter"]);
    alice.wait_event("connected", EXIT, |_| true);
    // Escape sequences in chat: a title, a screen clear, a bell, a carriage return.
    alice.say("\u{1b}]0;pwned\u{7}evil\u{1b}[2J\rline");
    let screen = tmux.wait_for("bob", "evil", EXIT);
    let text = screen.join("\n");
    assert!(
        screen
            .iter()
            .any(|l| l == "alice: \u{fffd}]0;pwned\u{fffd}evil\u{fffd}[2J\u{fffd}line"),
        "{text}"
    );
    assert!(
        screen.iter().any(|l| l.starts_with("registered as bob")),
        "the screen was not cleared:\n{text}"
    );
    assert!(
        !alice
            .seen
            .iter()
            .any(|v| v["event"] == "chat" && v["text"] == "note to self"),
        "{:?}",
        alice.seen
    );
    // Ctrl-D on the empty line hangs up; bob goes on listening, and the keyboard still works:
    // a second Ctrl-D stops him, and the terminal is given back.
    tmux.keys("bob", &["C-d"]);
    assert_eq!(alice.wait_exit(EXIT), 0, "{}", alice.log_text());
    tmux.wait_for("bob", "call with alice ended", EXIT);
    tmux.wait_for("bob", "waiting for calls", EXIT);
    tmux.keys("bob", &["C-d"]);
    let screen = tmux.wait_for("bob", "TTY=", EXIT);
    let text = screen.join("\n");
    assert!(screen.iter().any(|l| l == "EXIT=0"), "{text}");
    assert!(screen.iter().any(|l| l == "TTY=icanon echo"), "{text}");
}
