//! `natcall-lab` killed (SIGTERM, as `kill` and `timeout` send) stops the server and peers it
//! started, and exits with 128 + 15.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use natcall_lab::reap::{children_of, parent_and_state};

/// The children of `pid` whose command name starts with `natcall` (the server and the peers).
fn natcall_children(pid: i32) -> Vec<(i32, String)> {
    children_of(pid)
        .into_iter()
        .filter_map(|c| {
            let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).ok()?;
            comm.starts_with("natcall").then(|| (c, comm.trim().to_owned()))
        })
        .collect()
}

#[test]
fn a_lab_killed_with_sigterm_stops_what_it_started() {
    if let Err(e) = natcall_lab::preflight() {
        panic!("{e}");
    }
    let mut lab = Command::new(env!("CARGO_BIN_EXE_natcall-lab"))
        .args(["quality", "--scenarios", "lossless", "--paths", "direct"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("natcall-lab starts");
    let lab_pid = lab.id() as i32;
    // Read as it comes: a full pipe would block the lab's writes.
    let mut pipe = lab.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });

    // The server and both peers running (a 12 s call follows).
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        let kids = natcall_children(lab_pid);
        if kids.len() >= 3 {
            break kids;
        }
        if let Some(status) = lab.try_wait().expect("wait") {
            panic!("natcall-lab exited ({status}) before starting its peers");
        }
        assert!(
            Instant::now() < deadline,
            "natcall-lab started {kids:?} within 60 s, not a server and two peers"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(lab_pid), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM sent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = lab.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "natcall-lab still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = stderr.join().expect("stderr read");
    assert_eq!(status.code(), Some(128 + 15), "exit status {status}; stderr: {stderr}");
    assert!(stderr.contains("stopped the"), "stderr: {stderr}");

    // What it started is gone: exited (a zombie until its new parent reaps it) or reaped.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> = started
            .iter()
            .filter(|(pid, _)| parent_and_state(*pid).is_some_and(|(_, state)| state != 'Z'))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 5 s after the lab exited: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
