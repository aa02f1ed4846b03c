//! The real `natcall-rendezvous` binary refuses a configuration it cannot use at start: it exits
//! non-zero at once with one line on stderr saying what is wrong and what to do.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_natcall-rendezvous");

/// Longer than any start-up check takes; a server still running then has accepted the config.
const AT_ONCE: Duration = Duration::from_secs(10);

/// Runs the server with `args` (on a free port, so a server that wrongly starts binds nothing
/// in use); returns its exit status and stderr. Panics if it is still running after [`AT_ONCE`].
fn refused(args: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("NATCALL_RENDEZVOUS_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns the server binary");
    let mut stderr = child.stderr.take().expect("piped");
    // Read on the side, so a chatty server cannot block on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + AT_ONCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server accepted {args:?} and was still running after {AT_ONCE:?}; stderr:\n{}",
                reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().expect("stderr reader"))
}

/// A config file `text` in `dir`; returns its path.
fn config_file(dir: &Path, text: &str) -> String {
    let path = dir.join("rendezvous.toml");
    std::fs::write(&path, text).expect("writes the config file");
    path.to_str().expect("utf8").to_owned()
}

/// The one line of stderr that reports the error.
fn error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    errors[0]
}

#[test]
fn a_log_level_that_is_not_a_level_in_the_config_file_is_refused_with_the_choices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(dir.path(), "log_level = \"verbose\"\n");
    let (status, stderr) = refused(&["--ephemeral", "-c", &config]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        error_line(&stderr),
        format!(
            "error: config {config}: log_level = \"verbose\" is not a log level; use one of error, warn, \
             info, debug, trace (or a RUST_LOG-style filter such as \"info,natcall_rendezvous=debug\")"
        )
    );
}

#[test]
fn a_log_level_flag_that_is_not_a_level_is_refused_with_the_choices() {
    let (status, stderr) = refused(&["--ephemeral", "--log-level", "verbose"]);
    assert!(!status.success(), "{stderr}");
    let line = error_line(&stderr);
    assert!(line.contains("'--log-level <LOG_LEVEL>'"), "{line}");
    assert!(line.contains("\"verbose\" is not a log level"), "{line}");
    assert!(line.contains("use one of error, warn, info, debug, trace"), "{line}");
}

#[test]
fn an_unknown_key_in_the_config_file_is_refused_naming_it_and_the_valid_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(dir.path(), "log_level = \"info\"\n[limits]\nmax_frame_length = 4096\n");
    let (status, stderr) = refused(&["--ephemeral", "-c", &config]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = error_line(&stderr);
    assert!(
        line.starts_with(&format!(
            "error: config {config}: line 3: `max_frame_length = 4096`: unknown key `max_frame_length`; valid keys: "
        )),
        "{line}"
    );
    assert!(line.contains("`max_frame_len`"), "{line}");
}

#[test]
fn a_state_dir_that_cannot_be_created_is_refused_naming_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").expect("writes");
    let state = file.join("state");
    let state = state.to_str().expect("utf8");
    let (status, stderr) = refused(&["--state-dir", state]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let line = error_line(&stderr);
    assert!(
        line.contains(&format!("cannot use the state directory {state}: ")),
        "{line}"
    );
    assert!(line.contains("--state-dir DIR"), "says what to do: {line}");
}

#[test]
fn an_alternate_ip_without_one_listen_address_or_second_port_is_refused() {
    // `refused` listens on 127.0.0.1:0; the same address as the alternate is no alternate.
    let (status, stderr) = refused(&["--ephemeral", "--alternate-ip", "127.0.0.1"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        error_line(&stderr)
            .contains("alternate_ip = \"127.0.0.1\" needs listen on one address of the same family, other than it"),
        "{stderr}"
    );
    let (status, stderr) = refused(&["--ephemeral", "--alternate-ip", "::1"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let (status, stderr) = refused(&["--ephemeral", "--alternate-ip", "127.0.0.2", "--stun-alt-port", "0"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        error_line(&stderr).contains("alternate_ip needs the second STUN port"),
        "{stderr}"
    );
}
