//! `natcall-bench`: load generators that drive a real `natcall-rendezvous` process from a
//! separate process over loopback. Every run is bounded in count and time.
//!
//! - `stun`: Binding requests answered per second, one in flight and saturated;
//! - `idle-peers`: server memory (RSS) per registered idle peer.

mod peers;
mod server;
mod stun;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "natcall load generators (loopback only, bounded in count and time)")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// STUN Binding requests per second the server answers.
    Stun {
        /// Server to load; without it a `natcall-rendezvous` is started on loopback.
        #[arg(long)]
        server: Option<SocketAddr>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Client sockets for the saturated measurement.
        #[arg(long, default_value_t = 8)]
        sockets: usize,
        /// Requests in flight per socket for the saturated measurement.
        #[arg(long, default_value_t = 32)]
        window: usize,
    },
    /// Server RSS per registered idle peer.
    IdlePeers {
        /// Peers to register (each a TCP connection).
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match args.cmd {
            Cmd::Stun {
                server: addr,
                seconds,
                sockets,
                window,
            } => {
                let spawned = match addr {
                    Some(_) => None,
                    None => Some(server::Spawned::start()?),
                };
                let target = addr
                    .or(spawned.as_ref().map(|s| s.addr))
                    .expect("one of the two is set");
                let d = Duration::from_secs(seconds);
                let one = stun::load(target, 1, 1, d).await?;
                println!(
                    "stun 1-in-flight: {:.0} bindings/s, median RTT {:?}",
                    one.rate(),
                    one.median_rtt()
                );
                let sat = stun::load(target, sockets, window, d).await?;
                println!(
                    "stun saturated ({sockets} sockets x {window} in flight): {:.0} bindings/s, lost {}",
                    sat.rate(),
                    sat.lost
                );
                if let Some(s) = spawned {
                    println!("server CPU: {:.2} s", s.cpu_seconds()?);
                }
            }
            Cmd::IdlePeers { count } => {
                let s = server::Spawned::start()?;
                let r = peers::idle(&s, count).await?;
                println!(
                    "idle peers: {} registered; server RSS {} KiB before, {} KiB after; {:.0} bytes per peer",
                    r.count,
                    r.rss_before / 1024,
                    r.rss_after / 1024,
                    r.per_peer()
                );
            }
        }
        Ok(())
    })
}
