//! The command line's promises: each exit code the help lists, the one-line errors, accept /
//! decline / busy, one session per name, and the discoverability flags.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use natcall_e2e::{Peer, Rendezvous, bin};

const EXIT: Duration = Duration::from_secs(20);

fn setup() -> (tempfile::TempDir, Rendezvous) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Rendezvous::start(dir.path());
    (dir, server)
}

/// `natcall ARGS` with no stdin, to the end; bounded by `natcall`'s own timeouts.
fn natcall(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin("natcall"))
        .arg("--home")
        .arg(dir.join("home"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runs natcall")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A TCP server on loopback that answers whatever it is sent with `reply` (none: it never
/// answers), for `connections` connections.
fn fake_server(reply: Option<&'static [u8]>, connections: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(connections) {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 1024];
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            if let Some(reply) = reply {
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(reply);
            } else {
                held.push(conn);
            }
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    addr
}

#[test]
fn an_http_server_on_the_port_is_not_a_natcall_server_exit_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let http = fake_server(Some(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"), 4);
    let out = natcall(
        dir.path(),
        &["--name", "alice", "--server", &http.to_string(), "call", "bob"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!(
            "natcall: {http} is not a natcall rendezvous server: the TLS handshake failed"
        )),
        "{err}"
    );
    assert!(!err.contains("bytes exceeds the limit"), "{err}");
}

#[test]
fn a_server_that_never_answers_is_named_as_such_exit_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let silent = fake_server(None, 4);
    let started = Instant::now();
    let out = natcall(
        dir.path(),
        &["--name", "alice", "--server", &silent.to_string(), "call", "bob"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{silent} is not a natcall rendezvous server: it accepted the connection but did not complete the handshake within 10 s (check --server)"
        )),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
}

#[test]
fn a_refused_connection_says_its_cause_once_exit_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = natcall_e2e::free_port();
    let out = natcall(
        dir.path(),
        &[
            "--name",
            "alice",
            "--server",
            &format!("127.0.0.1:{port}"),
            "call",
            "bob",
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert!(err.contains("is it running? check --server"), "{err}");
}

#[test]
fn a_bad_name_of_ones_own_is_refused_locally_exit_4() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = natcall_e2e::free_port();
    let out = natcall(
        dir.path(),
        &["--name", "Al ice", "--server", &format!("127.0.0.1:{port}"), "listen"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("natcall: invalid name \"Al ice\": a name uses only lowercase"),
        "{err}"
    );
    assert!(err.contains("choose another with --name"), "{err}");
}

#[test]
fn usage_errors_exit_2_and_say_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A bad name to call.
    let out = natcall(dir.path(), &["--name", "alice", "call", ""]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("a name has 1 to"), "{}", stderr(&out));
    // An unknown flag.
    let out = natcall(dir.path(), &["call", "bob", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unexpected argument '--bogus'"),
        "{}",
        stderr(&out)
    );
    // Flags that do not go together.
    let out = natcall(
        dir.path(),
        &[
            "--name",
            "alice",
            "call",
            "bob",
            "--send-audio",
            "-",
            "--send-video",
            "-",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("only one of --send-audio and --send-video can read stdin"));
    // A duration that is not one.
    let out = natcall(dir.path(), &["--name", "alice", "call", "bob", "--duration", "-3"]);
    assert_eq!(out.status.code(), Some(2));
    // An --accept rule that is neither all, contacts nor names.
    let out = natcall(dir.path(), &["--name", "bob", "listen", "--accept", "Everyone"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("use all, contacts or NAME,NAME"),
        "{}",
        stderr(&out)
    );
    // The demo runs its own server and peers.
    let out = natcall(dir.path(), &["--server", "127.0.0.1:9", "demo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("demo runs its own server and peers on loopback: it takes no --server"));
}

#[test]
fn version_completions_and_man_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = natcall(dir.path(), &["--version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("natcall 0."), "{text}");
    assert!(text.contains("(protocol "), "{text}");
    for (shell, mark) in [
        ("bash", "_natcall()"),
        ("zsh", "#compdef natcall"),
        ("fish", "complete -c natcall"),
    ] {
        let out = natcall(dir.path(), &["completions", shell]);
        assert_eq!(out.status.code(), Some(0));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(mark), "{shell}: {script:.300}");
        assert!(script.contains("listen") && script.contains("policy"), "{shell}");
    }
    let out = natcall(dir.path(), &["man"]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH natcall"), "{page:.300}");
    assert!(page.contains("Exit codes"), "the man page lists the exit codes");
    // Every subcommand's help has examples.
    for sub in [
        "listen",
        "call",
        "room",
        "demo",
        "contacts",
        "verify",
        "trust-server",
        "release-name",
        "completions",
        "man",
    ] {
        let out = natcall(dir.path(), &[sub, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Example"), "natcall {sub} --help has no example:\n{help}");
    }
}

#[test]
fn a_caller_the_rule_does_not_allow_is_declined_exit_5_and_the_listener_goes_on() {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--accept", "contacts"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob"]);
    assert_eq!(alice.wait_exit(EXIT), 5);
    let err = alice.wait_event("error", EXIT, |_| true);
    assert_eq!(err["error"], "calling bob: bob declined");
    let declined = bob.wait_event("declined", EXIT, |v| v["from"] == "alice");
    assert_eq!(declined["why"], "not a contact (--accept contacts)");
    // Named callers are taken.
    bob.kill();
    let mut bob = Peer::spawn(
        dir.path(),
        server.addr,
        "bob",
        &["listen", "--once", "--accept", "carol,alice"],
    );
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob", "--no-media"]);
    alice.wait_event("connected", EXIT, |_| true);
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0);
    assert_eq!(bob.wait_exit(EXIT), 0);
}

#[test]
fn a_caller_who_reaches_a_listener_in_a_call_is_told_busy_exit_5() {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob", "--no-media"]);
    alice.wait_event("connected", EXIT, |_| true);
    let mut carol = Peer::spawn(dir.path(), server.addr, "carol", &["call", "bob"]);
    carol.wait_event("registered", EXIT, |_| true);
    let calling = Instant::now();
    assert_eq!(carol.wait_exit(EXIT), 5, "{}", carol.log_text());
    assert!(calling.elapsed() < Duration::from_secs(5), "{:?}", calling.elapsed());
    let err = carol.wait_event("error", EXIT, |_| true);
    assert!(err["error"].as_str().unwrap_or("").contains("bob is busy"), "{err}");
    bob.wait_event("busy", EXIT, |v| v["from"] == "carol");
    // What the server logs at its default level and above reads without Rust's `Some(…)`.
    let log = std::fs::read_to_string(&server.log).expect("server log");
    let shown: Vec<&str> = log
        .lines()
        .filter(|l| [" INFO ", " WARN ", " ERROR "].iter().any(|lv| l.contains(lv)))
        .collect();
    assert!(shown.len() > 3, "{log}");
    assert!(shown.iter().all(|l| !l.contains("Some(")), "{}", shown.join("\n"));
    // The first call is untouched.
    alice.say("still with you");
    bob.wait_chat("still with you");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0);
    assert_eq!(bob.wait_exit(EXIT), 0);
}

#[test]
fn policies_that_cannot_agree_exit_6() {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--policy", "relay-only"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(
        dir.path(),
        server.addr,
        "alice",
        &["call", "bob", "--policy", "direct-only"],
    );
    assert_eq!(alice.wait_exit(EXIT), 6, "{}", alice.log_text());
    let err = alice.wait_event("error", EXIT, |_| true);
    assert!(err["error"].as_str().unwrap_or("").contains("relay-only"), "{err}");
    // A caller in auto gets the listener's policy: the relay.
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob", "--no-media"]);
    let connected = alice.wait_event("connected", EXIT, |_| true);
    assert_eq!(connected["path"], "relay");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0);
    let report = alice.report();
    assert!(
        report["path_changes"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["to"] == "relay")),
        "{report}"
    );
}

#[test]
fn a_peer_killed_mid_call_is_a_lost_call_exit_7() {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--once"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob"]);
    alice.wait_event("connected", EXIT, |_| true);
    bob.wait_event("first_media", EXIT, |_| true);
    bob.kill();
    assert_eq!(alice.wait_exit(Duration::from_secs(40)), 7, "{}", alice.log_text());
    let report = alice.report();
    assert_eq!(report["exit_code"], 7);
}

#[test]
fn a_second_session_with_the_same_name_and_key_replaces_the_first_which_says_so_once() {
    let (dir, server) = setup();
    let home = dir.path().join("bob");
    let mut first = Peer::spawn_home(dir.path(), &home, server.addr, "bob", &["listen"]);
    first.wait_event("registered", EXIT, |_| true);
    let mut second = Peer::spawn_home(dir.path(), &home, server.addr, "bob", &["listen"]);
    second.wait_event("registered", EXIT, |_| true);
    assert_eq!(first.wait_exit(EXIT), 4, "{}", first.log_text());
    let err = first.wait_event("error", EXIT, |_| true);
    assert!(
        err["error"].as_str().unwrap_or("").contains("replaced this one"),
        "{err}"
    );
    // The second one keeps the name: it takes a call, and registered only once.
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob", "--no-media"]);
    alice.wait_event("connected", EXIT, |_| true);
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0);
    assert!(
        !second.seen.iter().any(|v| v["event"] == "server_lost"),
        "{:?}",
        second.seen
    );
}

#[test]
fn an_unknown_key_in_the_config_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::write(home.join("config.toml"), "nmae = \"alice\"\n").expect("config");
    let out = natcall(dir.path(), &["call", "bob"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("config.toml") && err.contains("unknown field `nmae`"),
        "{err}"
    );
    assert!(err.contains("expected `server` or `name`"), "{err}");
}

#[test]
fn server_addresses_that_are_not_one_are_usage_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (server, says) in [
        ("127.0.0.1:99999", "\"99999\" is not a port"),
        ("http://127.0.0.1:3478", "is a URL: give HOST[:PORT]"),
        ("", "no server address"),
        ("127.0.0.1:3478#SHA256:abc", "a server key is written SHA256:"),
    ] {
        let out = natcall(dir.path(), &["--name", "alice", "--server", server, "call", "bob"]);
        assert_eq!(out.status.code(), Some(2), "{server}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{server}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
    let out = natcall(
        dir.path(),
        &["--name", "alice", "--server", "nonexistent.invalid", "call", "bob"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot resolve the rendezvous server nonexistent.invalid:3478"));
    // A rule mixed with names.
    let out = natcall(dir.path(), &["--name", "bob", "listen", "--accept", "all,carol"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("all is a rule of its own"), "{}", stderr(&out));
}

#[test]
fn a_chat_line_too_long_is_not_sent_and_the_call_goes_on() {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--once", "--no-media"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob", "--no-media"]);
    alice.wait_event("connected", EXIT, |_| true);
    alice.say(&"x".repeat(5000));
    let not_sent = alice.wait_event("not_sent", EXIT, |_| true);
    assert_eq!(
        not_sent["why"],
        "not sent: a chat line is at most 4096 bytes, this one has 5000"
    );
    alice.say("after the long one");
    bob.wait_chat("after the long one");
    alice.close_stdin();
    assert_eq!(alice.wait_exit(EXIT), 0);
    assert_eq!(bob.wait_exit(EXIT), 0);
}

#[test]
fn sigterm_mid_call_hangs_up_so_the_peer_knows_at_once() {
    let (dir, server) = setup();
    let mut bob = Peer::spawn(dir.path(), server.addr, "bob", &["listen", "--once", "--no-media"]);
    bob.wait_event("registered", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "bob", "--no-media"]);
    alice.wait_event("connected", EXIT, |_| true);
    bob.wait_event("connected", EXIT, |_| true);
    let status = Command::new("kill")
        .args(["-TERM", &alice.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let terminated = Instant::now();
    assert_eq!(alice.wait_exit(EXIT), 0, "{}", alice.log_text());
    assert_eq!(alice.report()["ended"]["by"], "local");
    assert_eq!(bob.wait_exit(EXIT), 0, "{}", bob.log_text());
    assert!(
        terminated.elapsed() < Duration::from_secs(5),
        "bob learned of the end after {:?}",
        terminated.elapsed()
    );
    assert_eq!(bob.report()["ended"]["by"], "peer");
}

#[test]
fn a_caller_who_reaches_a_member_in_a_room_is_told_busy() {
    let (dir, server) = setup();
    let mut carol = Peer::spawn(
        dir.path(),
        server.addr,
        "carol",
        &["room", "team", "--create", "--no-media"],
    );
    carol.wait_event("room", EXIT, |_| true);
    let mut alice = Peer::spawn(dir.path(), server.addr, "alice", &["call", "carol"]);
    alice.wait_event("registered", EXIT, |_| true);
    let calling = Instant::now();
    assert_eq!(alice.wait_exit(EXIT), 5, "{}", alice.log_text());
    assert!(calling.elapsed() < Duration::from_secs(5), "{:?}", calling.elapsed());
    let err = alice.wait_event("error", EXIT, |_| true);
    assert!(err["error"].as_str().unwrap_or("").contains("carol is busy"), "{err}");
    carol.wait_event("busy", EXIT, |v| v["from"] == "alice");
}

/// `natcall netcheck --json` and its exit code.
fn netcheck(dir: &std::path::Path, args: &[&str]) -> (serde_json::Value, Option<i32>) {
    let mut all = vec!["--json", "netcheck"];
    all.extend_from_slice(args);
    let out = natcall(dir, &all);
    let text = String::from_utf8_lossy(&out.stdout);
    let report = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "netcheck")
        .unwrap_or_else(|| panic!("no netcheck report: {text}\n{}", stderr(&out)));
    (report, out.status.code())
}

/// On loopback nothing translates or filters: netcheck says so, against a server with only its
/// second port (the address dependence untested, and said to be) and against one with an
/// alternate IP (every RFC 5780 test); with no server on the port it exits 3.
#[test]
fn netcheck_reports_what_loopback_does_and_exit_3_without_udp() {
    let (dir, server) = setup();
    let second = server.second_port().expect("the server has a second STUN port");
    let port = second.to_string();
    let (r, code) = netcheck(
        dir.path(),
        &["--server", &server.addr.to_string(), "--second-port", &port],
    );
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["udp"], true, "{r}");
    assert!(r["public"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{r}");
    assert!(r["latency_ms"].as_f64().is_some(), "{r}");
    assert_eq!(r["other_address"], serde_json::Value::Null, "{r}");
    assert_eq!(r["second_port"], second, "{r}");
    assert_eq!(r["mapping"], "endpoint-independent", "{r}");
    assert_eq!(r["mapping_address_tested"], false, "{r}");
    // The answer from the other port came through: not port-dependent (the address untested).
    assert_eq!(r["filtering"], "address-dependent", "{r}");
    assert_eq!(r["filtering_address_tested"], false, "{r}");
    assert_eq!(r["hairpinning"], true, "{r}");

    let rfc5780 = Rendezvous::start_with(
        dir.path(),
        "127.0.0.1:0".parse().expect("addr"),
        &["--alternate-ip", "127.0.0.2"],
    );
    let (r, code) = netcheck(dir.path(), &["--server", &rfc5780.addr.to_string()]);
    assert_eq!(code, Some(0), "{r}");
    let other: SocketAddr = r["other_address"]
        .as_str()
        .expect("OTHER-ADDRESS")
        .parse()
        .expect("addr");
    assert_eq!(other.ip().to_string(), "127.0.0.2", "{r}");
    assert_eq!(Some(other.port()), rfc5780.second_port(), "{r}");
    assert_eq!(
        (r["mapping"].as_str(), r["filtering"].as_str()),
        (Some("endpoint-independent"), Some("endpoint-independent")),
        "{r}"
    );
    assert_eq!(
        (
            r["mapping_address_tested"].as_bool(),
            r["filtering_address_tested"].as_bool()
        ),
        (Some(true), Some(true)),
        "{r}"
    );

    // Nothing on the port: UDP gets no answer.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("binds");
    let addr = silent.local_addr().expect("addr").to_string();
    let (r, code) = netcheck(dir.path(), &["--server", &addr]);
    assert_eq!(code, Some(3), "{r}");
    assert_eq!(r["udp"], false, "{r}");
    assert!(r["verdict"].as_str().is_some_and(|v| v.contains("relay")), "{r}");
}
