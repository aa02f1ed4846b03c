//! The sockets of birthday traversal on the side behind a symmetric NAT
//! (`natcall_traversal::birthday`): [`start`] opens them for a call and sends one packet from
//! each to the peer's public address; the first authenticated check that comes back on one of
//! them makes it the socket traffic to that address leaves from ([`Routes`]). Dropping the
//! [`Spray`] (with the call, or when the call sprays again) closes them all and forgets their
//! routes.
//!
//! Bounds: `sockets` per call and attempt, one packet each, and at most [`MAX_OPEN`] open per
//! endpoint at once; a socket nobody answered closes after `lifetime`; only datagrams from the
//! peer's IP are read, only an authenticated check (or what follows it on the validated path)
//! is acted on, and the first socket a check from an address came through keeps that address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tracing::{debug, trace};

use crate::core::Datagram;
use crate::driver::Shared;

/// Birthday sockets open at once per endpoint, at most (four calls' worth).
pub(crate) const MAX_OPEN: usize = 1024;

/// Which socket traffic to an address leaves from, when it is not the main one.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    any: AtomicBool,
    map: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
    /// Birthday sockets open now, over every call.
    open: std::sync::atomic::AtomicUsize,
}

/// A socket's identity (its address in memory), to forget its routes without holding it.
fn id(socket: &Arc<UdpSocket>) -> usize {
    Arc::as_ptr(socket) as usize
}

impl Routes {
    /// The socket learned for `to`, if any (no lock while no call sprays).
    pub(crate) fn get(&self, to: SocketAddr) -> Option<Arc<UdpSocket>> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.lock().get(&to).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<UdpSocket>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `to` is reached through `socket` from now on, unless another socket already has it
    /// (a replayed check cannot move a working route). Returns whether this one did.
    fn learn(&self, to: SocketAddr, socket: &Arc<UdpSocket>) -> bool {
        let mut map = self.lock();
        if map.contains_key(&to) {
            return false;
        }
        map.insert(to, socket.clone());
        self.any.store(true, Ordering::Relaxed);
        true
    }

    fn forget(&self, ids: &[usize]) {
        let mut map = self.lock();
        map.retain(|_, s| !ids.contains(&id(s)));
        self.any.store(!map.is_empty(), Ordering::Relaxed);
    }
}

/// Counts a birthday socket as open while it lives.
struct OpenGuard(Arc<Routes>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One call's spray: its sockets' tasks (each owns its socket: one nobody answered is closed
/// when its task ends) and their identities, to forget their routes.
#[derive(Debug)]
pub(crate) struct Spray {
    ids: Vec<usize>,
    tasks: Vec<AbortHandle>,
    routes: Arc<Routes>,
}

impl Drop for Spray {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.routes.forget(&self.ids);
    }
}

/// Opens `count` sockets in the family of `to` and sends one packet from each to `to`.
/// Sockets the system refuses (file limits) are skipped, with a note in the log.
pub(crate) fn start(shared: &Arc<Shared>, to: SocketAddr, count: usize, lifetime: Duration) -> Spray {
    let any: SocketAddr = if to.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut punch = [0u8; 64];
    let mut tid = [0u8; 12];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tid);
    // A plain Binding request: a peer drops it (no USERNAME), it only opens the NAT.
    let n = natcall_proto::stun::encode_binding_request(&tid, None, &mut punch).unwrap_or(0);
    let punch = Bytes::copy_from_slice(&punch[..n]);
    let mut ids = Vec::with_capacity(count);
    let mut tasks = Vec::with_capacity(count);
    let mut refused = None;
    let routes = shared.routes.clone();
    let room = MAX_OPEN.saturating_sub(routes.open.load(Ordering::Relaxed));
    for _ in 0..count.min(room) {
        let socket = match std::net::UdpSocket::bind(any)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UdpSocket::from_std)
        {
            Ok(s) => Arc::new(s),
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        routes.open.fetch_add(1, Ordering::Relaxed);
        let guard = OpenGuard(routes.clone());
        ids.push(id(&socket));
        let task = tokio::spawn(run(Arc::downgrade(shared), socket, to, punch.clone(), lifetime, guard));
        tasks.push(task.abort_handle());
    }
    match refused {
        Some(e) => debug!(%to, opened = ids.len(), error = %e, "birthday traversal: fewer sockets than asked"),
        None => debug!(%to, opened = ids.len(), "birthday traversal: ports opened"),
    }
    Spray { ids, tasks, routes }
}

async fn run(
    shared: Weak<Shared>,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    punch: Bytes,
    lifetime: Duration,
    guard: OpenGuard,
) {
    let routes = guard.0.clone();
    if let Err(e) = socket.send_to(&punch, to).await {
        return trace!(%to, error = %e, "birthday punch not sent");
    }
    let deadline = tokio::time::Instant::now() + lifetime;
    let mut learned = false;
    let mut buf = vec![0u8; 2048];
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = tokio::time::sleep_until(deadline), if !learned => return,
        };
        let (n, src) = match received {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors and the like: the port may still be hit later.
                trace!(error = %e, "birthday socket recv error ignored");
                continue;
            }
        };
        // The peer's IP: its probes may come from another port than the server saw, when its
        // NAT maps per destination address (which two server ports on one IP cannot tell).
        if src.ip() != to.ip() {
            continue;
        }
        let Some(shared) = shared.upgrade() else { return };
        if shared.blackholed(src) {
            continue;
        }
        let data = &buf[..n];
        let what = {
            let mut core = shared.lock();
            let what = core.handle_datagram(Instant::now(), src, data);
            if let Datagram::Media(id) = what {
                Shared::deliver_media(&mut core, id, data);
            }
            what
        };
        match what {
            Datagram::Quic(fake) => {
                let _ = shared.relay_quic.try_send((fake, Bytes::copy_from_slice(data)));
            }
            Datagram::Consumed => {
                if !learned && routes.learn(src, &socket) {
                    debug!(%src, local = ?socket.local_addr().ok(), "birthday traversal: a probe came through");
                    learned = true;
                }
                shared.wake();
            }
            Datagram::Media(_) | Datagram::Dropped => {}
        }
    }
}
