//! Rooms on the peer side: creating or joining one, its news, and the pairwise sessions the
//! server sets up with each other member (see `docs/rooms.md`).
//!
//! Data flow: [`Endpoint::create_room`] / [`Endpoint::join_room`] register the room's name
//! with the endpoint's router and send the request; the core turns the server's answers and
//! news into `Event::Room` and each pairwise session into `Event::RoomPeer`, which the driver
//! hands to [`route`]. The router passes news to the room's handle and, for a session, checks
//! the peer's key against the contacts and connects the call as any accepted call
//! ([`crate::call::establish`]), then hands the connected [`Call`] to the handle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use natcall_proto::control::{ClientMsg, RoomMember, RoomRefusal, ServerMsg};
use tokio::sync::mpsc;
use tracing::debug;

use natcall_media::{Frame, Track};

use crate::call::{self, Call, Role};
use crate::contacts;
use crate::core::CallId;
use crate::endpoint::{Endpoint, Inner};
use crate::error::Error;
use crate::room_media::{self, FanOutReport, RoomMedia};

/// What a member sends at in fan-out unless told otherwise ([`Room::set_fan_out_rate`]), bit/s.
pub const FAN_OUT_RATE_BPS: u64 = 800_000;
/// How long a create or join waits for the server's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// News and sessions queued for a room's handle at most; beyond, news is dropped (logged) and
/// sessions hung up.
const QUEUE: usize = 64;

/// What the driver hands the router.
#[derive(Debug)]
pub(crate) enum RoomInput {
    /// `RoomJoined`, `RoomRefused`, `RoomMemberJoined` or `RoomMemberLeft`.
    Msg(ServerMsg),
    /// A pairwise session with `peer` in `room`: call `id` of the core, in `role`.
    Peer {
        room: String,
        peer: String,
        id: CallId,
        role: Role,
    },
}

/// What happens in a room, as its handle reports it.
#[derive(Debug)]
pub enum RoomEvent {
    /// `member` joined.
    MemberJoined(RoomMember),
    /// `name` left (`reason`: "left", or "connection ended").
    MemberLeft {
        /// Who left.
        name: String,
        /// Why, as the server says it.
        reason: String,
    },
    /// The pairwise session with `peer` is connected: an end-to-end encrypted call (pinned
    /// keys, the best path that pair has) for chat, media and the room's keys.
    Session {
        /// The other member.
        peer: String,
        /// The session (boxed: a call is large, the other events small).
        call: Box<Call>,
    },
    /// The pairwise session with `peer` did not connect.
    SessionFailed {
        /// The other member.
        peer: String,
        /// Why.
        error: Error,
    },
}

/// What the router passes to one room's handle.
#[derive(Debug)]
enum Delivery {
    Joined {
        id: u32,
        code: Option<String>,
        members: Vec<RoomMember>,
    },
    Refused {
        refusal: RoomRefusal,
        reason: String,
    },
    Event(RoomEvent),
}

/// The rooms this endpoint asked for, by name: where their news goes.
#[derive(Debug, Default)]
pub(crate) struct Router {
    rooms: Mutex<HashMap<String, mpsc::Sender<Delivery>>>,
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Delivery>>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sender(&self, room: &str) -> Option<mpsc::Sender<Delivery>> {
        self.lock().get(room).cloned()
    }
}

/// The router task: hands the core's room news and sessions to the rooms' handles until the
/// endpoint is gone.
pub(crate) async fn route(inner: Weak<Inner>, mut rx: mpsc::Receiver<RoomInput>) {
    while let Some(input) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        match input {
            RoomInput::Msg(msg) => {
                let (room, delivery) = match msg {
                    ServerMsg::RoomJoined {
                        room,
                        id,
                        code,
                        members,
                    } => (room, Delivery::Joined { id, code, members }),
                    ServerMsg::RoomRefused { room, refusal, reason } => (room, Delivery::Refused { refusal, reason }),
                    ServerMsg::RoomMemberJoined { room, member } => {
                        (room, Delivery::Event(RoomEvent::MemberJoined(member)))
                    }
                    ServerMsg::RoomMemberLeft { room, name, reason } => {
                        (room, Delivery::Event(RoomEvent::MemberLeft { name, reason }))
                    }
                    other => {
                        debug!(?other, "not room news");
                        continue;
                    }
                };
                match inner.rooms.sender(&room) {
                    Some(tx) => {
                        if tx.try_send(delivery).is_err() {
                            debug!(%room, "room news dropped: its handle is not reading");
                        }
                    }
                    None => debug!(%room, "news of a room this endpoint is not in"),
                }
            }
            RoomInput::Peer { room, peer, id, role } => {
                let Some(tx) = inner.rooms.sender(&room) else {
                    debug!(%room, %peer, "session of a room this endpoint is not in: hung up");
                    inner.shared.with(|core, now| core.release(now, id, "not in that room"));
                    continue;
                };
                tokio::spawn(connect(inner, tx, peer, id, role));
            }
        }
    }
}

/// Connects a room's pairwise session and hands it (or why it failed) to the room's handle.
async fn connect(inner: Arc<Inner>, tx: mpsc::Sender<Delivery>, peer: String, id: CallId, role: Role) {
    let key = inner
        .shared
        .lock()
        .call(id)
        .and_then(|v| v.start.as_ref().map(|s| s.fingerprint));
    let screened = match key {
        Some(key) => contacts::screen(inner.contacts.as_ref(), &peer, key).await,
        None => Err(Error::Ended(format!("the session with {peer} is gone"))),
    };
    let event = match screened {
        Err(error) => {
            inner.shared.with(|core, now| core.release(now, id, "key refused"));
            RoomEvent::SessionFailed { peer, error }
        }
        Ok(()) => match call::establish(inner, id, role).await {
            Ok(call) => RoomEvent::Session {
                peer,
                call: Box::new(call),
            },
            Err(error) => RoomEvent::SessionFailed { peer, error },
        },
    };
    if let Err(e) = tx.try_send(Delivery::Event(event)) {
        // The handle is gone or not reading: a session nobody takes is hung up (dropped).
        debug!(error = %e, "room session not taken");
    }
}

/// Sends frames in a room's fan-out ([`Room::fan_out_sender`]); cloneable.
#[derive(Debug, Clone)]
pub struct FanOutSender {
    ctl: mpsc::Sender<room_media::Ctl>,
}

impl FanOutSender {
    /// As [`Room::send_fan_out_frame`].
    pub async fn send_frame(&self, track: Track, frame: Frame) -> Result<(), Error> {
        self.ctl
            .send(room_media::Ctl::Frame(track, frame))
            .await
            .map_err(|_| Error::Ended("the room's media ended".into()))
    }
}

/// How one member's media travels to the others (see `docs/rooms.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    /// To each other member over that pair's session.
    Mesh,
    /// One copy to the server, which forwards it to every other member.
    FanOut,
}

/// When a member moves between mesh and fan-out: to fan-out when the room has more than
/// `max_mesh_members`, or when sending its rate to every other member needs more than its
/// uplink was measured to carry; back to mesh when neither holds, with `margin` to spare, for
/// `hold`.
#[derive(Debug, Clone)]
pub struct TopologyRule {
    /// Rooms larger than this use fan-out.
    pub max_mesh_members: usize,
    /// Back to mesh only with this share of the uplink to spare.
    pub margin: f64,
    /// ... for this long.
    pub hold: Duration,
}

impl Default for TopologyRule {
    fn default() -> Self {
        Self {
            max_mesh_members: 4,
            margin: 0.2,
            hold: Duration::from_secs(10),
        }
    }
}

/// What a member's uplink carries, measured from its mesh pairs' rate controllers, one sample
/// per tick (the CLI's is half a second): when the copies share a short uplink, the pairs back
/// off together and their targets stop growing. Measured once, over the last `ticks` samples,
/// at least `congested` had a pair backing off for delay or loss and the sum of the targets did
/// not grow (the window's second half not 10 % above its first on average; a free link's pairs
/// ramp up instead); the uplink then carries the largest sum seen in the window.
#[derive(Debug, Clone)]
pub struct UplinkMeter {
    window: std::collections::VecDeque<(bool, u64)>,
    ticks: usize,
    congested: usize,
}

impl UplinkMeter {
    /// A meter over `ticks` samples needing `congested` of them backing off.
    pub fn new(ticks: usize, congested: usize) -> Self {
        Self {
            window: std::collections::VecDeque::with_capacity(ticks),
            ticks: ticks.max(1),
            congested,
        }
    }

    /// One sample: whether a pair's controller is backing off for delay or loss, and the sum of
    /// the pairs' targets (bit/s). Returns what the uplink carries once it is measured.
    pub fn sample(&mut self, backing_off: bool, sum_bps: u64) -> Option<u64> {
        if self.window.len() == self.ticks {
            self.window.pop_front();
        }
        self.window.push_back((backing_off, sum_bps));
        if self.window.len() < self.ticks {
            return None;
        }
        let backed = self.window.iter().filter(|(b, _)| *b).count();
        // Growing: the window's second half is on average 10 % above its first (a single
        // sample would read a controller's probing saw-tooth as growth or as none).
        let half = self.ticks / 2;
        let mean = |it: &mut dyn Iterator<Item = u64>, n: usize| it.sum::<u64>() as f64 / n.max(1) as f64;
        let first = mean(&mut self.window.iter().take(half).map(|(_, s)| *s), half);
        let second = mean(&mut self.window.iter().skip(half).map(|(_, s)| *s), self.ticks - half);
        let grew = second > first * 1.1;
        (backed >= self.congested && !grew).then(|| self.window.iter().map(|(_, s)| *s).max().unwrap_or(0))
    }
}

/// Applies a [`TopologyRule`] over time (sans-IO: time comes in).
#[derive(Debug, Clone)]
pub struct TopologyChooser {
    rule: TopologyRule,
    current: Topology,
    /// Since when mesh would do, while in fan-out.
    mesh_ok_since: Option<std::time::Instant>,
}

impl TopologyChooser {
    /// Starts in mesh.
    pub fn new(rule: TopologyRule) -> Self {
        Self {
            rule,
            current: Topology::Mesh,
            mesh_ok_since: None,
        }
    }

    /// The current topology.
    pub fn current(&self) -> Topology {
        self.current
    }

    /// Re-decides with the room's size (`members`, this one included), the rate this member
    /// wants to send to each other member, and what its uplink was measured to carry to all of
    /// them together (`None`: not measured yet). Returns the new topology and why, on a change.
    pub fn update(
        &mut self,
        now: std::time::Instant,
        members: usize,
        want_bps: u64,
        uplink_bps: Option<u64>,
    ) -> Option<(Topology, String)> {
        let others = members.saturating_sub(1) as u64;
        let need = others * want_bps;
        let too_many = members > self.rule.max_mesh_members;
        let too_much = uplink_bps.filter(|&up| others > 1 && need > up);
        match self.current {
            Topology::Mesh => {
                let why = if too_many {
                    format!(
                        "the room has {members} members, more than {} for mesh",
                        self.rule.max_mesh_members
                    )
                } else if let Some(up) = too_much {
                    format!(
                        "sending {} kbit/s to each of {others} members needs {} kbit/s; the uplink carries {} kbit/s",
                        want_bps / 1000,
                        need / 1000,
                        up / 1000
                    )
                } else {
                    return None;
                };
                self.current = Topology::FanOut;
                self.mesh_ok_since = None;
                Some((Topology::FanOut, why))
            }
            Topology::FanOut => {
                // A pair's one copy always fits (as on the way to fan-out).
                let fits =
                    others <= 1 || uplink_bps.is_none_or(|up| need as f64 <= up as f64 * (1.0 - self.rule.margin));
                if too_many || !fits {
                    self.mesh_ok_since = None;
                    return None;
                }
                let since = *self.mesh_ok_since.get_or_insert(now);
                if now.saturating_duration_since(since) < self.rule.hold {
                    return None;
                }
                self.current = Topology::Mesh;
                self.mesh_ok_since = None;
                Some((
                    Topology::Mesh,
                    format!(
                        "{members} members and the uplink carries what mesh needs ({} kbit/s) with room to spare for {} s",
                        need / 1000,
                        self.rule.hold.as_secs()
                    ),
                ))
            }
        }
    }
}

/// A room this endpoint is in. Dropping it (or [`Room::leave`]) leaves the room: the server
/// tells the others, and every pairwise session ends.
#[derive(Debug)]
pub struct Room {
    endpoint: Endpoint,
    name: String,
    id: u32,
    code: Option<String>,
    members: Vec<RoomMember>,
    events: mpsc::Receiver<Delivery>,
    left: bool,
    /// The room's fan-out media: keys, what this member sends to everyone through the server,
    /// what arrives from the others that way.
    media: Option<RoomMedia>,
}

impl Room {
    /// Sends `msg` (a create or a join of `name`) and waits for the server's answer.
    pub(crate) async fn open(endpoint: &Endpoint, name: &str, msg: ClientMsg) -> Result<Self, Error> {
        let inner = &endpoint.inner;
        let (tx, mut events) = mpsc::channel(QUEUE);
        {
            let mut rooms = inner.rooms.lock();
            if rooms.contains_key(name) {
                return Err(Error::Room {
                    refusal: RoomRefusal::AlreadyMember,
                    reason: format!("this endpoint is in room {name} already, or joining it"),
                });
            }
            rooms.insert(name.to_owned(), tx);
        }
        let mut room = Self {
            endpoint: endpoint.clone(),
            name: name.to_owned(),
            id: 0,
            code: None,
            members: Vec::new(),
            events: mpsc::channel(1).1,
            left: true, // until the server says we are in
            media: None,
        };
        inner.shared.with(|core, _| core.room_request(msg));
        let answer = tokio::time::timeout(ANSWER_WAIT, async {
            loop {
                match events.recv().await {
                    Some(Delivery::Event(e)) => debug!(?e, "room news before the answer: ignored"),
                    other => return other,
                }
            }
        })
        .await;
        match answer {
            Ok(Some(Delivery::Joined { id, code, members })) => {
                room.id = id;
                room.code = code;
                room.members = members;
                room.events = events;
                room.left = false;
                room.media = Some(RoomMedia::start(inner.shared.clone(), id, FAN_OUT_RATE_BPS));
                Ok(room)
            }
            Ok(Some(Delivery::Refused { refusal, reason })) => Err(Error::Room { refusal, reason }),
            Ok(Some(Delivery::Event(_))) => unreachable!("events are skipped above"),
            Ok(None) => Err(Error::ServerLost("the endpoint closed".into())),
            Err(_) => {
                // It may still answer: leaving makes sure the server does not keep us in.
                room.left = false;
                Err(Error::Timeout(format!("the server did not answer about room {name}")))
            }
        }
    }

    /// The room's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The room's id on the server (relay frames with it fan out to every other member).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The join code (to its creator only): whoever has it may join.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The members who were in the room when this endpoint joined (later changes come as
    /// [`RoomEvent`]s).
    pub fn members(&self) -> &[RoomMember] {
        &self.members
    }

    /// The next thing that happens in the room; `None` once the endpoint is closed.
    ///
    /// A connected session is first given to the room's keys (this member's sender key goes to
    /// the member over it, and the member's keys are read from it); a member who leaves makes
    /// this member rekey, so it cannot open what this member sends after.
    pub async fn next_event(&mut self) -> Option<RoomEvent> {
        loop {
            match self.events.recv().await? {
                Delivery::Event(e) => {
                    self.to_media(&e).await;
                    return Some(e);
                }
                other => debug!(?other, "a second answer for the room: ignored"),
            }
        }
    }

    async fn to_media(&self, e: &RoomEvent) {
        let Some(media) = &self.media else { return };
        let ctl = match e {
            RoomEvent::Session { peer, call } => room_media::Ctl::Session {
                peer: peer.clone(),
                conn: call.connection().clone(),
            },
            RoomEvent::MemberLeft { name, .. } => room_media::Ctl::Left(name.clone()),
            RoomEvent::MemberJoined(m) => room_media::Ctl::Joined(m.name.clone()),
            _ => return,
        };
        let _ = media.ctl.send(ctl).await;
    }

    /// Sends a frame in fan-out: one copy to the server, which forwards it to every other
    /// member; sealed with this member's sender key, paced at the fan-out rate. Frames beyond
    /// what the pacer holds are dropped (video) as in a call.
    pub async fn send_fan_out_frame(&self, track: Track, frame: Frame) -> Result<(), Error> {
        let media = self
            .media
            .as_ref()
            .ok_or_else(|| Error::Ended("not in the room".into()))?;
        media
            .ctl
            .send(room_media::Ctl::Frame(track, frame))
            .await
            .map_err(|_| Error::Ended("the room's media ended".into()))
    }

    /// A handle that sends frames in fan-out, for a source task that runs beside the room's
    /// event loop.
    pub fn fan_out_sender(&self) -> Option<FanOutSender> {
        self.media.as_ref().map(|m| FanOutSender { ctl: m.ctl.clone() })
    }

    /// Sets what this member sends at in fan-out, bit/s (default [`FAN_OUT_RATE_BPS`]).
    pub async fn set_fan_out_rate(&self, bps: u64) {
        if let Some(media) = &self.media {
            let _ = media.ctl.send(room_media::Ctl::Rate(bps)).await;
        }
    }

    /// The rate this member sends at in fan-out, bit/s, as it changes: the rate set
    /// ([`Room::set_fan_out_rate`]), or less while the server says every other member drains
    /// less (its budget: what the members that take the most can take from this sender), then
    /// growing back by 8 % a second. Size the media to it. `None` before fan-out media starts.
    pub fn watch_fan_out_rate(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.media.as_ref().map(|m| m.rate.clone())
    }

    /// Fan-out statistics: what this member sent to the room, and what arrived from each other
    /// member through the server.
    pub fn fan_out_report(&self) -> FanOutReport {
        self.media.as_ref().map(RoomMedia::report).unwrap_or_default()
    }

    /// Leaves the room: the others are told, the pairwise sessions end.
    pub fn leave(mut self) {
        self.leave_now();
    }

    fn leave_now(&mut self) {
        let inner = &self.endpoint.inner;
        inner.rooms.lock().remove(&self.name);
        if !self.left {
            self.left = true;
            let room = self.name.clone();
            inner
                .shared
                .with(|core, _| core.room_request(ClientMsg::RoomLeave { room }));
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.leave_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uplink_is_measured_only_when_the_pairs_back_off_and_stop_growing() {
        let mut m = UplinkMeter::new(4, 2);
        // A free link ramping up: a lone back-off on the way does not count.
        let ramp = [600_000, 700_000, 800_000, 900_000, 1_000_000, 1_100_000];
        for (i, sum) in ramp.into_iter().enumerate() {
            assert_eq!(m.sample(i == 3, sum), None, "ramping, sample {i}");
        }
        // A short uplink: backing off now and then, the sum flat around 1.1 Mbit/s.
        let mut m = UplinkMeter::new(4, 2);
        let flat = [
            (true, 1_150_000),
            (false, 1_100_000),
            (true, 1_180_000),
            (false, 1_120_000),
        ];
        let got: Vec<Option<u64>> = flat.into_iter().map(|(b, s)| m.sample(b, s)).collect();
        assert_eq!(got, [None, None, None, Some(1_180_000)]);
        // Backing off once in the window is not enough.
        let mut m = UplinkMeter::new(4, 2);
        for (b, s) in [
            (true, 1_000_000),
            (false, 1_000_000),
            (false, 1_000_000),
            (false, 1_000_000),
        ] {
            assert_eq!(m.sample(b, s), None);
        }
    }

    #[test]
    fn a_member_moves_to_fan_out_when_the_room_grows_or_the_uplink_is_short_and_back_after_a_hold() {
        let t0 = std::time::Instant::now();
        let mut c = TopologyChooser::new(TopologyRule::default());
        // Three members, 500 kbit/s each, uplink 2 Mbit/s: mesh.
        assert_eq!(c.update(t0, 3, 500_000, Some(2_000_000)), None);
        assert_eq!(c.current(), Topology::Mesh);
        // The uplink measures 800 kbit/s: two copies of 500 do not fit.
        let (to, why) = c.update(t0, 3, 500_000, Some(800_000)).expect("a change");
        assert_eq!(to, Topology::FanOut);
        assert!(
            why.contains("needs 1000 kbit/s") && why.contains("carries 800"),
            "{why}"
        );
        // It fits again, but only with the margin for the hold: back to mesh after 10 s.
        assert_eq!(c.update(t0, 3, 500_000, Some(1_300_000)), None);
        assert_eq!(c.update(t0 + Duration::from_secs(9), 3, 500_000, Some(1_300_000)), None);
        let (to, _) = c
            .update(t0 + Duration::from_secs(10), 3, 500_000, Some(1_300_000))
            .expect("back to mesh");
        assert_eq!(to, Topology::Mesh);
        // A fifth member: fan-out whatever the uplink.
        let (to, why) = c.update(t0, 5, 100_000, None).expect("a change");
        assert_eq!(to, Topology::FanOut);
        assert!(why.contains("5 members"), "{why}");
        // Near the line (within the margin) it stays in fan-out.
        let mut c = TopologyChooser::new(TopologyRule::default());
        c.update(t0, 3, 500_000, Some(900_000)).expect("fan-out");
        for s in 0..30 {
            assert_eq!(c.update(t0 + Duration::from_secs(s), 3, 500_000, Some(1_100_000)), None);
        }
        // A pair (one other member) never needs fan-out for its uplink. (Keep this last.)
        let mut c = TopologyChooser::new(TopologyRule::default());
        assert_eq!(c.update(t0, 2, 500_000, Some(100_000)), None);
    }
}
