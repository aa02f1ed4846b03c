//! Link impairment on a peer's uplink that works on kernels without `netem`.
//!
//! Where the kernel has `netem`, patchbay's link condition on the device's interface carries
//! all three (both directions). Elsewhere (no `CONFIG_NET_SCH_NETEM`), a forwarder between two
//! TAP devices in the device's namespace does:
//!
//!   ```text
//!   app ── IP on nltap0 ══ forwarder (tokio task, per-frame delay) ══ nltap1 ─┐
//!                                                                 nlbr0 (bridge)
//!                                                     router ── eth0 ─────────┘
//!   ```
//!
//!   The device's address and its MAC move from `eth0` to `nltap0`; `eth0` and `nltap1` are
//!   bridged. Every frame read from one TAP is dropped with probability `loss_pct` or written
//!   to the other after `delay ± jitter` (uniform; both from a seeded RNG), through a bounded
//!   queue ([`QUEUE_FRAMES`]; a full queue drops the frame, like a full router buffer). By
//!   default frames stay in order (a frame never overtakes the previous one, as netem without
//!   reordering); with [`Impairment::reorder`] each frame keeps its own draw, so a frame drawn
//!   shorter overtakes earlier ones (as netem's jitter does). Both directions are impaired: a
//!   round trip grows by about `2 × delay`.
//!
//! Loss is not done with an nftables `drop` in the device's output hook: a local drop there
//! makes the sender's `sendmsg` fail with `EPERM`, which a real lossy link never does (natcall
//! logged "Operation not permitted" and its chat stalled). Frames the forwarder drops vanish
//! silently, as on a wire.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use patchbay::{Device, LinkCondition, LinkDirection};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tun_rs::{AsyncDevice, DeviceBuilder, Layer};

use crate::Error;
use crate::process::{run_in, run_in_output};

/// Frames waiting in one direction of the forwarder before new ones are dropped: this many in
/// the hand-over from the reader, and this many more held by the writer until they are due.
pub const QUEUE_FRAMES: usize = 4096;
pub(crate) const HOST_TAP: &str = "nltap0";
const WIRE_TAP: &str = "nltap1";
const BRIDGE: &str = "nlbr0";

/// Delay, jitter and loss for one peer's uplink (each direction).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// Added one-way delay, each direction.
    pub delay: Duration,
    /// The delay varies uniformly within `delay ± jitter`.
    pub jitter: Duration,
    /// Percentage of packets dropped, each direction (0–100).
    pub loss_pct: f64,
    /// Seed of the forwarder's delay draws.
    pub seed: u64,
    /// Each frame is delayed by its own draw, so frames overtake each other (TAP forwarder
    /// only; without it the order is kept).
    pub reorder: bool,
}

/// Which mechanism carries the delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayBackend {
    /// No delay asked.
    None,
    /// The kernel's netem qdisc (through patchbay).
    Netem,
    /// The TAP forwarder of this module.
    TapForwarder,
}

/// Keeps an impairment in force; dropping it stops the forwarder.
#[derive(Debug)]
pub struct ImpairGuard {
    forwarder: Option<tokio::task::JoinHandle<()>>,
    /// How the delay is applied.
    pub backend: DelayBackend,
}

impl Drop for ImpairGuard {
    fn drop(&mut self) {
        if let Some(task) = self.forwarder.take() {
            task.abort();
        }
    }
}

impl Impairment {
    /// No delay, jitter or loss.
    pub fn is_none(&self) -> bool {
        self.delay.is_zero() && self.jitter.is_zero() && self.loss_pct <= 0.0
    }

    /// Applies the impairment to `device`'s uplink.
    pub async fn apply(&self, device: &Device) -> Result<ImpairGuard, Error> {
        if !(0.0..=100.0).contains(&self.loss_pct) {
            return Err(Error::InvalidScenario(format!(
                "loss {}% is not within 0–100",
                self.loss_pct
            )));
        }
        if self.is_none() {
            return Ok(ImpairGuard {
                forwarder: None,
                backend: DelayBackend::None,
            });
        }
        if blocking(device, |d| Ok(netem_available(&d))).await? {
            let cond = LinkCondition::new()
                .latency_ms(ms(self.delay))
                .jitter_ms(ms(self.jitter));
            let iface = device
                .default_iface()
                .ok_or_else(|| Error::InvalidScenario("device without interface".into()))?;
            iface
                .set_condition(cond, LinkDirection::Both)
                .await
                .map_err(Error::Lab)?;
            return Ok(ImpairGuard {
                forwarder: None,
                backend: DelayBackend::Netem,
            });
        }
        let forwarder = self.start_forwarder(device).await?;
        Ok(ImpairGuard {
            forwarder: Some(forwarder),
            backend: DelayBackend::TapForwarder,
        })
    }

    async fn start_forwarder(&self, device: &Device) -> Result<tokio::task::JoinHandle<()>, Error> {
        let iface = device
            .default_iface()
            .ok_or_else(|| Error::InvalidScenario("device without interface".into()))?
            .name()
            .to_owned();
        let (ready_tx, ready_rx) = oneshot::channel();
        let shape = Shape {
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss_pct / 100.0,
            reorder: self.reorder,
        };
        let seed = self.seed;
        let task = device
            .spawn(async move |_| {
                let taps = (open_tap(HOST_TAP), open_tap(WIRE_TAP));
                let (host, wire) = match taps {
                    (Ok(h), Ok(w)) => (Arc::new(h), Arc::new(w)),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let up = pump(host.clone(), wire.clone(), shape, seed);
                let down = pump(wire, host, shape, seed.wrapping_add(1));
                tokio::join!(up, down);
            })
            .map_err(Error::Lab)?;
        let guard = AbortOnDrop(Some(task));
        ready_rx
            .await
            .map_err(|_| Error::InvalidScenario("the TAP forwarder stopped".into()))?
            .map_err(Error::io("creating TAP devices (needs /dev/net/tun)"))?;
        blocking(device, move |d| rewire(&d, &iface)).await?;
        Ok(guard.disarm())
    }
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    fn disarm(mut self) -> tokio::task::JoinHandle<()> {
        // Invariant: the handle is set at construction and taken only here.
        self.0.take().expect("handle present until disarmed")
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Runs blocking namespace work off the async threads.
async fn blocking<T: Send + 'static>(
    device: &Device,
    f: impl FnOnce(Device) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let d = device.clone();
    tokio::task::spawn_blocking(move || f(d))
        .await
        .map_err(|e| Error::InvalidScenario(format!("a namespace task panicked: {e}")))?
}

/// Whether the kernel has netem: try it on the namespace's own loopback.
fn netem_available(device: &Device) -> bool {
    let ok = run_in(
        device,
        "tc",
        &["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        None,
    )
    .is_ok();
    if ok {
        let _ = run_in(device, "tc", &["qdisc", "del", "dev", "lo", "root"], None);
    }
    ok
}

fn open_tap(name: &str) -> std::io::Result<AsyncDevice> {
    DeviceBuilder::new().name(name).layer(Layer::L2).build_async()
}

/// Moves the device's address and MAC from `iface` to the host TAP and bridges `iface` with
/// the wire TAP.
fn rewire(device: &Device, iface: &str) -> Result<(), Error> {
    let addr = run_in_output(device, "ip", &["-4", "-o", "addr", "show", "dev", iface])?;
    let cidr = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .ok_or_else(|| Error::InvalidScenario(format!("no IPv4 address on {iface}: {addr}")))?
        .to_owned();
    let route = run_in_output(device, "ip", &["-4", "route", "show", "default"])?;
    let gw = route
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .ok_or_else(|| Error::InvalidScenario(format!("no default route: {route}")))?
        .to_owned();
    let link = run_in_output(device, "ip", &["-o", "link", "show", "dev", iface])?;
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| Error::InvalidScenario(format!("no MAC on {iface}: {link}")))?
        .to_owned();
    let steps: [&[&str]; 13] = [
        &["link", "add", BRIDGE, "type", "bridge"],
        &["link", "set", BRIDGE, "up"],
        &["addr", "flush", "dev", iface],
        &["link", "set", iface, "down"],
        &["link", "set", iface, "address", "02:6e:6c:00:00:01"],
        &["link", "set", iface, "master", BRIDGE],
        &["link", "set", iface, "up"],
        &["link", "set", WIRE_TAP, "master", BRIDGE],
        &["link", "set", WIRE_TAP, "up"],
        &["link", "set", HOST_TAP, "address", &mac],
        &["link", "set", HOST_TAP, "up"],
        &["addr", "add", &cidr, "dev", HOST_TAP],
        &["route", "replace", "default", "via", &gw, "dev", HOST_TAP],
    ];
    for args in steps {
        run_in(device, "ip", args, None)?;
    }
    Ok(())
}

/// What one direction of the forwarder does to frames.
#[derive(Debug, Clone, Copy)]
struct Shape {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    reorder: bool,
}

/// Moves frames `from` → `to`: each dropped with probability `loss`, or sent after its own
/// delay (in order unless `reorder`), through a bounded queue.
async fn pump(from: Arc<AsyncDevice>, to: Arc<AsyncDevice>, shape: Shape, seed: u64) {
    let Shape {
        delay,
        jitter,
        loss,
        reorder,
    } = shape;
    // The hand-over to the writer absorbs scheduling stalls (a short one lost frames under
    // load); the writer holds up to QUEUE_FRAMES more by due time.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE_FRAMES);
    let writer = async move {
        // Frames by due time (then arrival): in order they are due in arrival order anyway.
        let mut due: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
        let mut n = 0u64;
        let mut open = true;
        while open || !due.is_empty() {
            let next = due.peek().map(|Reverse((at, _, _))| *at);
            tokio::select! {
                f = rx.recv(), if open && due.len() < QUEUE_FRAMES => match f {
                    Some((at, frame)) => {
                        due.push(Reverse((at, n, frame)));
                        n += 1;
                    }
                    None => open = false,
                },
                () = sleep_until_opt(next) => {
                    if let Some(Reverse((_, _, frame))) = due.pop()
                        && let Err(e) = to.send(&frame).await
                    {
                        tracing::debug!(error = %e, "TAP forwarder: write failed");
                    }
                }
            }
        }
    };
    let reader = async move {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut buf = vec![0u8; 65536];
        let mut last = Instant::now();
        loop {
            let n = match from.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "TAP forwarder: read failed");
                    return;
                }
            };
            if loss > 0.0 && rng.random_bool(loss.min(1.0)) {
                continue;
            }
            let mut at = Instant::now() + draw(&mut rng, delay, jitter);
            if !reorder {
                at = at.max(last);
            }
            last = at;
            if tx.try_send((at, buf[..n].to_vec())).is_err() {
                tracing::trace!("TAP forwarder: queue full, frame dropped");
            }
        }
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One delay from `delay ± jitter`, uniform, never negative.
fn draw(rng: &mut SmallRng, delay: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return delay;
    }
    let (d, j) = (delay.as_secs_f64(), jitter.as_secs_f64());
    Duration::from_secs_f64(rng.random_range((d - j)..=(d + j)).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_the_jitter_band_and_average_to_the_delay() {
        let mut rng = SmallRng::seed_from_u64(7);
        let (d, j) = (Duration::from_millis(40), Duration::from_millis(10));
        let draws: Vec<f64> = (0..10_000)
            .map(|_| draw(&mut rng, d, j).as_secs_f64() * 1000.0)
            .collect();
        assert!(draws.iter().all(|x| (30.0..=50.0).contains(x)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 40.0).abs() < 0.5, "{mean}");
    }
}
