//! The async layer around the [`PeerCore`]: [`Shared`] holds the core under its one lock with
//! what moves bytes (the UDP socket, the control connection's two lanes, the relay's inbound
//! queue), and one driver task keeps the drive contract: run the core's timers, send its
//! datagrams and control messages, hand incoming offers to the application, and tell waiters
//! that something changed.
//!
//! Data flow:
//! - any task that feeds the core (the socket adapter, the control reader, the API) locks it,
//!   calls a `handle_*`, unlocks, and wakes the driver ([`Shared::wake`]);
//! - the driver locks it, drains every `poll_*`, unlocks, then does the I/O;
//! - waiters ([`Shared::wait`]) re-read the core each time the driver says it changed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use natcall_proto::control::{ClientMsg, Decline};
use natcall_proto::frame;
use natcall_proto::relay::{RelayFlags, RelayHeader, TrafficClass};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, trace, warn};

use crate::control::{Lanes, Outgoing};
use crate::core::{CallId, Event, FakeAddr, Lane, Offer, PeerCore, Route};
use crate::room::RoomInput;

/// What reaches a call's media session from the socket and the server.
#[derive(Debug)]
pub(crate) enum MediaIn {
    /// A sealed media packet (a UDP datagram or a relay frame's payload).
    Packet(Bytes),
    /// The relay's budget for what this side sends, and this call's frames it dropped.
    Budget { bps: u64, dropped: u32 },
}

/// What the async layer keeps per call, inside the core's call entry (dropped with it).
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// The call's media session's input.
    pub(crate) media: Option<mpsc::Sender<MediaIn>>,
    /// The QUIC connection the acceptor took for this call, until the call takes it.
    pub(crate) accepted: Option<quinn::Connection>,
    /// Birthday traversal's sockets, on the side behind the symmetric NAT.
    pub(crate) spray: Option<crate::spray::Spray>,
}

pub(crate) type Core = PeerCore<Link>;

/// Queues `what` for room `id`'s media without waiting: a full input loses it (logged), as does
/// a room this endpoint is not in.
fn hand_over<T>(id: u32, to: Option<mpsc::Sender<T>>, item: T, what: &str) {
    match to {
        Some(tx) => {
            if tx.try_send(item).is_err() {
                trace!(room = id, what, "room media input full: dropped");
            }
        }
        None => trace!(room = id, what, "for a room this endpoint is not in: dropped"),
    }
}

/// Where a room's fan-out packets and budgets go.
#[derive(Debug)]
pub(crate) struct RoomInputs {
    packets: mpsc::Sender<Bytes>,
    ctl: mpsc::Sender<crate::room_media::Ctl>,
}

/// The core and the I/O around it, shared by every task of an endpoint.
#[derive(Debug)]
pub(crate) struct Shared {
    core: Mutex<Core>,
    pub(crate) udp: Arc<UdpSocket>,
    /// The server's UDP address: never blackholed.
    pub(crate) server: SocketAddr,
    wake: Notify,
    changed: watch::Sender<u64>,
    pub(crate) lanes: Lanes,
    /// Relayed QUIC packets, with the call's fake address, for quinn.
    pub(crate) relay_quic: mpsc::Sender<(FakeAddr, Bytes)>,
    offers: mpsc::Sender<Offer>,
    /// Room news and sessions, for the endpoint's room router ([`crate::room::route`]).
    rooms: mpsc::Sender<RoomInput>,
    /// Fan-out packets of each room this endpoint is in, by room id
    /// ([`crate::room_media`]).
    room_packets: Mutex<std::collections::HashMap<u32, RoomInputs>>,
    /// [`crate::Endpoint::close`] was called, or the endpoint is gone: every task ends.
    closing: AtomicBool,
    /// A `GoingAway` asked to come back after this many milliseconds (`u64::MAX`: none).
    pub(crate) come_back_ms: AtomicU64,
    /// Test hook: drop all UDP to and from everyone but the server (a dead direct path).
    blackhole: AtomicBool,
    /// Addresses reached from a birthday traversal socket rather than `udp`.
    pub(crate) routes: Arc<crate::spray::Routes>,
    /// `udp` is an IPv6 socket: IPv4 destinations are sent as `::ffff:a.b.c.d` (dual stack).
    udp_is_v6: bool,
}

impl Shared {
    pub(crate) fn new(
        core: Core,
        udp: Arc<UdpSocket>,
        server: SocketAddr,
        lanes: Lanes,
        relay_quic: mpsc::Sender<(FakeAddr, Bytes)>,
        offers: mpsc::Sender<Offer>,
        rooms: mpsc::Sender<RoomInput>,
    ) -> Self {
        let udp_is_v6 = udp.local_addr().is_ok_and(|a| a.is_ipv6());
        Self {
            core: Mutex::new(core),
            udp,
            server,
            wake: Notify::new(),
            changed: watch::channel(0).0,
            lanes,
            relay_quic,
            offers,
            rooms,
            room_packets: Mutex::default(),
            closing: AtomicBool::new(false),
            come_back_ms: AtomicU64::new(u64::MAX),
            blackhole: AtomicBool::new(false),
            routes: Arc::default(),
            udp_is_v6,
        }
    }

    /// Sends a datagram to `to` from the socket that reaches it: a birthday traversal socket
    /// learned for it, or the main one.
    pub(crate) fn send_udp(&self, contents: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        match self.routes.get(to) {
            Some(socket) => socket.try_send_to(contents, to),
            None => self.udp.try_send_to(contents, self.on_socket(to)),
        }
    }

    /// `to` as the main socket takes it: on a dual-stack socket an IPv4 address is `::ffff:…`.
    fn on_socket(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.udp_is_v6 => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            other => other,
        }
    }

    /// The core. Critical sections never await and never call back into this lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic inside the core would be a bug; the state it leaves is still the best we have.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the core at the current instant, then wakes the driver.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Core, Instant) -> T) -> T {
        let out = f(&mut self.lock(), Instant::now());
        self.wake();
        out
    }

    /// Asks the driver to drain the core.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Tells waiters something changed outside the core (an accepted connection).
    pub(crate) fn touch(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Waits until `f` gives a value, re-reading the core after every change.
    pub(crate) async fn wait<T>(&self, mut f: impl FnMut(&mut Core) -> Option<T>) -> T {
        let mut rx = self.changed.subscribe();
        loop {
            if let Some(v) = f(&mut self.lock()) {
                return v;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`: unreachable, but never spin.
                return std::future::pending().await;
            }
        }
    }

    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.wake();
        self.touch();
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    pub(crate) fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
    }

    pub(crate) fn blackholed(&self, addr: SocketAddr) -> bool {
        self.blackhole.load(Ordering::Relaxed) && addr != self.server
    }

    /// Queues a control message in `lane`. A full control lane means the connection is stuck:
    /// the message is not silently lost, the connection is closed (and re-established).
    fn queue_control(&self, msg: &ClientMsg, lane: Lane) {
        let frame = match frame::control_frame(msg) {
            Ok(f) => f,
            Err(e) => return warn!(error = %e, ?msg, "control message does not encode"),
        };
        if lane == Lane::AfterRelay {
            match self.lanes.relay.try_send(frame) {
                Ok(()) => return,
                Err(e) => return self.queue_frame(e.into_inner()),
            }
        }
        self.queue_frame(frame);
    }

    fn queue_frame(&self, frame: Bytes) {
        if self.lanes.control.try_send(Outgoing::Frame(frame)).is_err() {
            if self.is_closing() {
                // The connection is being closed (or already is): nothing to reconnect.
                return debug!("control message not sent: the endpoint is closing");
            }
            warn!("the control connection's queue is full: the connection is stuck; reconnecting");
            let _ = self.lanes.control.try_send(Outgoing::Abort);
        }
    }

    /// Sends a sealed media packet of `track` to the peer at `fake` on the current path: a UDP
    /// datagram, or a relay frame of class audio (track 0) or video whose flags the server sees.
    /// Never blocks: a full socket or queue drops the packet, as a congested link would.
    pub(crate) fn send_media(&self, fake: FakeAddr, contents: &[u8], track: u8, flags: u8) {
        let route = self.lock().route(fake);
        let class = if track == 0 {
            TrafficClass::Audio
        } else {
            TrafficClass::Video
        };
        self.send_routed(route, contents, class, RelayFlags(flags));
    }

    /// Sends `contents` along `route`.
    pub(crate) fn send_routed(&self, route: Route, contents: &[u8], class: TrafficClass, flags: RelayFlags) {
        match route {
            Route::Udp(real) if !self.blackholed(real) => {
                let _ = self.send_udp(contents, real);
            }
            Route::Relay(call) => {
                let header = RelayHeader { call, class, flags };
                let mut b = BytesMut::with_capacity(contents.len() + 16);
                if frame::encode_relay(&header, contents, &mut b).is_ok()
                    && self.lanes.relay.try_send(b.freeze()).is_err()
                {
                    // A full queue drops the packet like a congested link would; QUIC recovers.
                    trace!(call, "relay queue full: packet dropped");
                }
            }
            _ => {}
        }
    }

    /// Hands a media packet of call `id` to its session; a session that cannot keep up loses
    /// packets, like a congested link.
    pub(crate) fn deliver_media(core: &mut Core, id: CallId, packet: &[u8]) {
        if let Some(tx) = core.link_mut(id).and_then(|l| l.media.as_ref()) {
            let _ = tx.try_send(MediaIn::Packet(Bytes::copy_from_slice(packet)));
        }
    }

    /// Fan-out packets to room `id` go to `packets` from now on, its budgets to `ctl`.
    pub(crate) fn register_room(
        &self,
        id: u32,
        packets: mpsc::Sender<Bytes>,
        ctl: mpsc::Sender<crate::room_media::Ctl>,
    ) {
        self.room_packets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, RoomInputs { packets, ctl });
    }

    /// Hands the server's fan-out budget for room `id` to the room's media (a full input
    /// loses it: the server sends the next one a quarter second later).
    pub(crate) fn deliver_room_budget(&self, id: u32, bps: u64) {
        let ctl = self.room_input(id, |r| r.ctl.clone());
        hand_over(id, ctl, crate::room_media::Ctl::Budget(bps), "fan-out budget");
    }

    /// Forgets room `id`: its packets are dropped from now on.
    pub(crate) fn unregister_room(&self, id: u32) {
        self.room_packets.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    /// Hands a fan-out packet of room `id` to the room's media; a room that cannot keep up
    /// loses packets, like a congested link.
    pub(crate) fn deliver_room(&self, id: u32, payload: Bytes) {
        let packets = self.room_input(id, |r| r.packets.clone());
        hand_over(id, packets, payload, "fan-out packet");
    }

    /// One of room `id`'s inputs, if this endpoint is in it (cloned out of the lock).
    fn room_input<T>(&self, id: u32, pick: impl FnOnce(&RoomInputs) -> T) -> Option<T> {
        self.room_packets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(pick)
    }

    /// Hands the relay's budget for server call `server_call` to its media session. A session
    /// whose input is full loses it: the server sends the next one an interval later.
    pub(crate) fn deliver_budget(&self, server_call: u32, bps: u64, dropped: u32) {
        let mut core = self.lock();
        let Some(id) = core.call_of_server(server_call) else {
            return trace!(server_call, "budget for no live call ignored");
        };
        if let Some(tx) = core.link_mut(id).and_then(|l| l.media.as_ref())
            && tx.try_send(MediaIn::Budget { bps, dropped }).is_err()
        {
            trace!(server_call, "media input full: relay budget dropped");
        }
    }

    /// One turn of the drive contract; returns when the core next wants its timers run.
    pub(crate) fn step(self: &Arc<Self>) -> Option<Instant> {
        let now = Instant::now();
        let mut core = self.lock();
        if core.poll_timeout().is_some_and(|t| t <= now) {
            core.handle_timeout(now);
        }
        let mut transmits = Vec::new();
        while let Some(t) = core.poll_transmit() {
            transmits.push(t);
        }
        while let Some((msg, lane)) = core.poll_control() {
            self.queue_control(&msg, lane);
        }
        let mut events = Vec::new();
        while let Some(e) = core.poll_event() {
            events.push(e);
        }
        let changed = core.poll_changed();
        drop(core);
        for t in transmits {
            if self.blackholed(t.destination) {
                continue;
            }
            if let Err(e) = self.send_udp(&t.contents, t.destination) {
                debug!(to = %t.destination, error = %e, "datagram not sent");
            }
        }
        for e in events {
            self.handle_event(e);
        }
        if changed {
            self.touch();
        }
        self.lock().poll_timeout()
    }

    fn handle_event(self: &Arc<Self>, event: Event) {
        match event {
            Event::Spray { id, to, sockets } => {
                let lifetime = self.lock().spray_lifetime();
                let spray = crate::spray::start(self, to, sockets, lifetime);
                if let Some(link) = self.lock().link_mut(id) {
                    link.spray = Some(spray); // the call's previous spray closes
                }
            }
            Event::Incoming(offer) => {
                if let Err(e) = self.offers.try_send(offer) {
                    // Nobody takes calls now (or too many wait): decline rather than leave it ringing.
                    let offer = match e {
                        mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => o,
                    };
                    debug!(caller = %offer.caller, "offer declined: nobody is accepting calls");
                    self.with(|core, _| core.decline(&offer, Decline::Declined));
                }
            }
            Event::Room(msg) => {
                if self.rooms.try_send(RoomInput::Msg(msg)).is_err() {
                    debug!("room news dropped: the room router is not keeping up");
                }
            }
            Event::RoomPeer { room, peer, id, role } => {
                if self.rooms.try_send(RoomInput::Peer { room, peer, id, role }).is_err() {
                    debug!(call = %id, "room session hung up: the room router is not keeping up");
                    self.with(|core, now| core.release(now, id, "not taken"));
                }
            }
            Event::GoingAway { reason, after } => {
                tracing::info!(%reason, ?after, "the rendezvous server is going away: closing our side");
                self.come_back_ms.store(
                    after.as_millis().min(u128::from(u64::MAX - 1)) as u64,
                    Ordering::Relaxed,
                );
                let _ = self.lanes.control.try_send(Outgoing::Close);
            }
        }
    }
}

/// The driver task: keeps the drive contract until the endpoint closes.
pub(crate) async fn drive(shared: Arc<Shared>) {
    loop {
        let wake = shared.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let next = shared.step();
        if shared.is_closing() && shared.lock().len() == 0 {
            return;
        }
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                // Nothing timed: wake at least once a second to notice a close.
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        tokio::select! {
            _ = wake => {}
            _ = sleep => {}
        }
    }
}
