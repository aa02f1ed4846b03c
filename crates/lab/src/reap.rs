//! What `natcall-lab` started stops with it. Its processes (servers, peers, daemons in the
//! routers' namespaces) are its children; the namespaces live as long as a process is in
//! them. Ctrl-C in a terminal reaches the whole foreground group, but a `kill` or a `timeout`
//! reaches the lab alone, and its children would run on, orphaned, in namespaces no one can
//! name any more. [`stop_children_on_signal`] answers SIGINT, SIGTERM and SIGHUP by stopping
//! every child (SIGTERM, then SIGKILL after a grace period) and exiting with 128 + the signal.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long children have to exit after SIGTERM before they are killed.
pub const GRACE: Duration = Duration::from_secs(2);

/// The signal that arrived (0: none yet), set in the signal handler itself.
static SIGNALLED: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();

/// The signal being answered, if one arrived.
pub fn signalled() -> Option<i32> {
    let n = SIGNALLED.get()?.load(Ordering::SeqCst);
    (n != 0).then_some(n as i32)
}

/// If a signal arrived, waits for its thread to stop the children and exit the process, and
/// exits with 128 + the signal itself should that thread not (never returns then). The lab's
/// work fails as its processes are stopped; `main` calls this before it returns, so the exit
/// status is the signal's, not the failure's.
pub fn wait_if_signalled() {
    if let Some(sig) = signalled() {
        std::thread::sleep(GRACE + Duration::from_secs(3));
        std::process::exit(128 + sig);
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

/// Stops every child: SIGTERM, up to `grace` to exit, then SIGKILL; and goes on killing any
/// child that appears (the lab's work may start its next scenario meanwhile) until none is
/// left or another `grace` has passed. How many there were at first.
pub fn stop_children(grace: Duration) -> usize {
    let pids = children();
    stop(&pids, grace);
    let deadline = Instant::now() + grace;
    loop {
        let left = children();
        if left.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// The signals this process ignores (`SigIgn` in `/proc/self/status`): under `nohup`, SIGHUP.
fn ignored() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigIgn:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .unwrap_or(0)
}

/// Starts a thread that, on the first SIGINT, SIGTERM or SIGHUP (those not ignored, as
/// `nohup` ignores SIGHUP), stops this process's children ([`stop_children`] with [`GRACE`])
/// and exits with 128 + the signal's number. Call it once, after entering the lab's user
/// namespace (it starts a thread).
pub fn stop_children_on_signal() -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let ignored = ignored();
    let wanted: Vec<i32> = [SIGINT, SIGTERM, SIGHUP]
        .into_iter()
        .filter(|s| ignored & (1 << (s - 1)) == 0)
        .collect();
    let flag = SIGNALLED.get_or_init(|| Arc::new(AtomicUsize::new(0)));
    for sig in &wanted {
        // Set in the handler itself: `main` sees it even if the work ends first.
        signal_hook::flag::register_usize(*sig, flag.clone(), *sig as usize)?;
    }
    let mut signals = signal_hook::iterator::Signals::new(&wanted)?;
    std::thread::Builder::new()
        .name("natcall-lab-signals".into())
        .spawn(move || {
            let Some(sig) = signals.forever().next() else {
                return;
            };
            let n = stop_children(GRACE);
            let name = Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string());
            // stderr may be gone (a closed terminal, a pipe's reader stopped): exit regardless.
            let _ = writeln!(
                std::io::stderr(),
                "natcall-lab: {name}: stopped the {n} processes it had started"
            );
            std::process::exit(128 + sig);
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
