//! Starting a `natcall-rendezvous` process and reading its resource use from `/proc`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A server process on loopback, killed on drop.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    pub addr: SocketAddr,
}

/// The binary `name` of package `package` next to this one (all are built into the same
/// target directory).
pub fn sibling_binary(name: &str, package: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating natcall-bench")?;
    let bin = me.with_file_name(name);
    if !bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p {package})",
            bin.display()
        );
    }
    Ok(bin)
}

/// A loopback port free for both TCP and UDP.
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both TCP and UDP")
}

/// Whether something listens on `addr`. A loopback connect to a port with no listener can
/// connect to itself (the kernel picks that very port as the source, TCP simultaneous open):
/// that is not a listener.
pub fn accepts(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect(addr).is_ok_and(|s| s.local_addr().ok() != Some(addr))
}

impl Spawned {
    /// Starts the server with limits opened up for load: no practical cap on connections or
    /// on a connection's relay rate (the relay engine's own policy stays as configured).
    pub fn start() -> Result<Self> {
        Self::start_with("")
    }

    /// [`Self::start`] with `relay_section` as the config file's `[relay]` table body.
    pub fn start_with(relay_section: &str) -> Result<Self> {
        Self::start_args(relay_section, &[])
    }

    /// [`Self::start_with`], with more command-line arguments (e.g. `--cluster`).
    pub fn start_args(relay_section: &str, extra: &[&str]) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = std::env::temp_dir().join(format!("natcall-bench-{}-{}.toml", std::process::id(), addr.port()));
        std::fs::write(
            &config,
            format!(
                "[limits]\nmax_connections = 1000000\nrelay_frames_per_sec = 10000000\nframes_per_sec = 100000\n\
                 max_connections_per_ip = 1000000\nregistrations_per_ip_per_min = 1000000\n\
                 new_names_per_ip_per_hour = 1000000\nrings_per_callee_per_min = 1000000\n\
                 max_names_per_key = 10000000\nlookups_per_min = 1000000\n\
                 [relay]\n{relay_section}\n"
            ),
        )
        .context("writing the bench server's config")?;
        let child = Command::new(sibling_binary("natcall-rendezvous", "natcall-rendezvous")?)
            .args([
                "--listen",
                &addr.to_string(),
                "--log-level",
                "warn",
                "--ephemeral",
                "-c",
            ])
            .arg(&config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting natcall-rendezvous")?;
        let mut s = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !accepts(addr) {
            if let Some(status) = s.child.try_wait()? {
                bail!("natcall-rendezvous exited ({status}) before listening on {addr}");
            }
            if Instant::now() > deadline {
                bail!("natcall-rendezvous did not start listening on {addr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    /// Resident set size in bytes.
    pub fn rss(&self) -> Result<u64> {
        status_kib(self.child.id(), "VmRSS:")
    }

    /// Peak resident set size (VmHWM) in bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        status_kib(self.child.id(), "VmHWM:")
    }

    /// User + system CPU seconds used so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.child.id())
    }
}

fn proc_file(pid: u32, name: &str) -> Result<String> {
    let path = format!("/proc/{pid}/{name}");
    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in bytes.
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = proc_file(pid, "status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// User + system CPU seconds a process (all its threads) has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = proc_file(pid, "stat")?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("parsing /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Ok(ticks as f64 / 100.0) // USER_HZ is 100 on Linux
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
