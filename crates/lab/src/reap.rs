//! What `natcall-lab` started stops with it. Its processes (servers, peers, daemons in the
//! routers' namespaces) are its children; the namespaces live as long as a process is in
//! them. Ctrl-C in a terminal reaches the whole foreground group, but a `kill` or a `timeout`
//! reaches the lab alone, and its children would run on, orphaned, in namespaces no one can
//! name any more. [`stop_children_on_signal`] answers SIGINT, SIGTERM and SIGHUP by stopping
//! every child (SIGTERM, then SIGKILL after a grace period) and exiting with 128 + the signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long children have to exit after SIGTERM before they are killed.
pub const GRACE: Duration = Duration::from_secs(2);

/// A signal arrived: its thread is stopping the children and will exit.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// If a signal arrived, waits for its thread to exit the process (never returns then). The
/// lab's work fails as its processes are stopped; `main` calls this before it returns, so the
/// exit status is the signal's, not the failure's.
pub fn wait_if_signalled() {
    if SIGNALLED.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

/// The live children of this process (from `/proc`; exited ones awaiting their reaping are
/// not counted).
pub fn children() -> Vec<i32> {
    children_of(std::process::id() as i32)
}

/// The live children of process `parent` (from `/proc`, as [`children`]).
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| parent_and_state(*pid).is_some_and(|(ppid, state)| ppid == parent && state != 'Z'))
        .collect()
}

/// The parent and state of process `pid`, from `/proc/PID/stat` (`pid (comm) state ppid …`;
/// `comm` may hold spaces and parentheses, so the fields start after the last `)`).
pub fn parent_and_state(pid: i32) -> Option<(i32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<(i32, char)> {
    let rest = stat.get(stat.rfind(')')? + 1..)?.trim_start();
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Sends SIGTERM to every child, waits up to `grace` for them to exit, then kills the rest.
/// How many there were.
pub fn stop_children(grace: Duration) -> usize {
    let pids = children();
    stop(&pids, grace);
    pids.len()
}

/// Sends SIGTERM to the children `pids`, waits up to `grace` for them to exit, then kills
/// those still running.
pub fn stop(pids: &[i32], grace: Duration) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let running = || -> Vec<i32> {
        let now = children();
        pids.iter().copied().filter(|p| now.contains(p)).collect()
    };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !running().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in running() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Starts a thread that, on the first SIGINT, SIGTERM or SIGHUP, stops this process's
/// children ([`stop_children`] with [`GRACE`]) and exits with 128 + the signal's number. Call
/// it once, after entering the lab's user namespace (it starts a thread).
pub fn stop_children_on_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Registered here, before the thread starts: from now on these signals are ours.
    let mut streams = rt.block_on(async {
        Ok::<_, std::io::Error>([
            (signal(SignalKind::interrupt())?, Signal::SIGINT),
            (signal(SignalKind::terminate())?, Signal::SIGTERM),
            (signal(SignalKind::hangup())?, Signal::SIGHUP),
        ])
    })?;
    std::thread::Builder::new()
        .name("natcall-lab-signals".into())
        .spawn(move || {
            let sig = rt.block_on(async {
                let [(a, sa), (b, sb), (c, sc)] = &mut streams;
                tokio::select! {
                    _ = a.recv() => *sa,
                    _ = b.recv() => *sb,
                    _ = c.recv() => *sc,
                }
            });
            SIGNALLED.store(true, Ordering::SeqCst);
            let n = stop_children(GRACE);
            eprintln!("natcall-lab: {sig}: stopped the {n} processes it had started");
            std::process::exit(128 + sig as i32);
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        assert_eq!(parse_stat("42 (natcall) S 7 42 42 0 -1"), Some((7, 'S')));
        assert_eq!(parse_stat("42 (a b) (c)) Z 1 0"), Some((1, 'Z')));
        assert_eq!(parse_stat("42 (cut"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn children_are_found_and_stopped() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let pid = child.id() as i32;
        assert!(children().contains(&pid));
        // Only this test's child: the other tests of this binary run theirs meanwhile.
        stop(&[pid], Duration::from_secs(2));
        let mut child = child;
        let status = child.wait().expect("reaped");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
        assert!(!children().contains(&pid));
    }
}
