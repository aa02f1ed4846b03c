//! Rooms (group calls): who may join, who is in, and the fan-out of relay frames to every other
//! member — the seed's "everyone but me", through each receiver's own [`Outbox`].
//!
//! Flow:
//! 1. `RoomCreate { room, invite }` creates a room (a name like a peer's), with its creator as
//!    the first member, the invited names (each with the key it is bound to now, if any), a
//!    fresh id with [`ROOM_ID_BIT`] set (relay frames carrying it are the room's) and a random
//!    join code; the creator gets `RoomJoined` with the code;
//! 2. `RoomJoin { room, code }` is allowed to the creator (its name and key), to an invited
//!    name under the key it was invited with, and to anyone with the code (compared in
//!    constant time; `limits.room_joins_per_min` per connection bounds guessing); the joiner
//!    gets `RoomJoined` with the members already in (names and keys, which they pin for their
//!    pairwise sessions), they get `RoomMemberJoined`; the connection then sets up a pairwise
//!    session between the joiner and each of them ([`crate::calls::Calls::start_pair`]);
//! 3. an audio or video relay frame with the room's id from a member is handed, bytes
//!    untouched, to every other member's buffer (one copy each, `natcall_room_copies_total`);
//!    each buffer applies the relay engine's class policy on its own, so a slow member loses
//!    its own video frames and nobody else's. A sender whose every other member is a
//!    bottleneck gets a budget (`RelayBudget` with the room's id): the most any of them takes
//!    from one sender, so it is held to the members that can take the most, never to the
//!    slowest. Control-class frames are dropped: they are never dropped by a buffer, so one
//!    sender's could fill every member's;
//! 4. `RoomLeave`, the member's connection ending, or its name being released tells the
//!    others `RoomMemberLeft`; a room whose last member left is gone.
//!
//! Members are connections, as in calls: the same peer (name and key) joining again from a new
//! connection replaces its old membership.
//!
//! One lock guards the table (rooms by name, by id, each connection's rooms, the member
//! count); relay fan-out only reads it and clones the receivers' buffers out of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use natcall_proto::control::{Fingerprint, RoomMember, RoomRefusal, ServerMsg, validate_name};
use natcall_proto::frame::control_frame;
use natcall_proto::relay::{ROOM_ID_BIT, RelayHeader, TrafficClass};
use ring::rand::{SecureRandom, SystemRandom};
use tracing::{debug, info, warn};

use crate::calls::Member;
use crate::config::Limits;
use crate::metrics::{DropReason, Metrics, Refusal};
use crate::outbox::Outbox;

/// Characters of a join code: lowercase letters and digits without the look-alikes
/// (`i l o 0 1`).
const CODE_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
/// Characters in a join code: 12 of 31, about 59 bits.
const CODE_LEN: usize = 12;

#[derive(Debug)]
struct InRoom {
    member: Member,
    fingerprint: Fingerprint,
}

impl InRoom {
    fn public(&self) -> RoomMember {
        RoomMember {
            name: self.member.name.clone(),
            fingerprint: self.fingerprint,
        }
    }
}

#[derive(Debug)]
struct Room {
    id: u32,
    creator: String,
    /// The creator's key: a name released and taken by another key is not the creator.
    creator_key: Fingerprint,
    /// Invited names, with the key each was bound to when invited (`None`: not bound yet; the
    /// first key to register it is the one the creator meant).
    invited: HashMap<String, Option<Fingerprint>>,
    code: String,
    members: Vec<InRoom>,
}

impl Room {
    fn is_creator(&self, name: &str, key: Fingerprint) -> bool {
        name == self.creator && key == self.creator_key
    }

    fn may_join(&self, name: &str, key: Fingerprint, code: Option<&str>) -> bool {
        self.is_creator(name, key)
            || self.invited.get(name).is_some_and(|k| k.is_none_or(|k| k == key))
            || code.is_some_and(|c| same_secret(c.as_bytes(), self.code.as_bytes()))
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Default)]
struct Table {
    rooms: HashMap<String, Room>,
    /// Room id → name.
    by_id: HashMap<u32, String>,
    /// Connection id → the rooms it is in.
    by_conn: HashMap<u64, Vec<String>>,
    /// Members of all rooms (kept as they come and go: the gauge is published often).
    members: usize,
}

impl Table {
    fn rooms_of(&self, conn_id: u64) -> usize {
        self.by_conn.get(&conn_id).map_or(0, Vec::len)
    }
}

/// A refusal, as the peer is told it.
struct Refused(RoomRefusal, String);

/// The room table.
#[derive(Debug)]
pub struct Rooms {
    table: RwLock<Table>,
    max_rooms: usize,
    max_members: usize,
    max_per_peer: usize,
    rng: SystemRandom,
    metrics: Metrics,
    /// Per room, what its limited receivers drain and when each sender was last told.
    budgets: Mutex<HashMap<u32, RoomBudgets>>,
}

/// A receiver's budget for a room is recent for this long (its buffer gives one every budget
/// interval, 100 ms by default, while it is the bottleneck).
const GRANT_FRESH: Duration = Duration::from_secs(1);
/// A sender is told its fan-out budget at most this often.
const FAN_OUT_BUDGET_EVERY: Duration = Duration::from_millis(250);
/// A sender's fan-out budget is at least this (bit/s): its audio with the relay's framing.
const FAN_OUT_BUDGET_FLOOR: u64 = 48_000;

/// What a room's receivers drain while they are the bottleneck, for its senders' budgets.
#[derive(Debug, Default)]
struct RoomBudgets {
    /// Receiver connection → the room's budget at its buffer (bit/s, for all senders) and when.
    grants: HashMap<u64, (u64, Instant)>,
    /// Sender connection → when it was last told.
    told: HashMap<u64, Instant>,
    /// Sender connection → when it last sent to the room.
    sent: HashMap<u64, Instant>,
}

impl RoomBudgets {
    /// The fan-out budget of the sender whose receivers are `receivers` (the other members),
    /// if every one of them is the bottleneck now: the most any of them takes from one sender
    /// (its budget shared among the members sending to it lately, silent ones not counted). A
    /// sender is held to the members that can take the most, not to the slowest; while any
    /// member takes everything, there is no budget.
    fn budget(&self, receivers: &[u64], now: Instant) -> Option<u64> {
        let mut best = 0;
        for r in receivers {
            let (bps, at) = self.grants.get(r)?;
            if now.duration_since(*at) > GRANT_FRESH {
                return None;
            }
            let senders = self
                .sent
                .iter()
                .filter(|(c, t)| *c != r && now.duration_since(**t) <= GRANT_FRESH)
                .count()
                .max(1) as u64;
            best = best.max(bps / senders);
        }
        (best > 0).then_some(best.max(FAN_OUT_BUDGET_FLOOR))
    }
}

/// A room as `/rooms` lists it: name, id, and each member's name and buffer.
type ListedRoom = (String, u32, Vec<(String, Arc<Outbox>)>);

/// Rooms listed by `/rooms` at most (the first by name; `rooms_total` says how many there are).
pub const MAX_ROOMS_LISTED: usize = 1_000;

fn read(t: &RwLock<Table>) -> RwLockReadGuard<'_, Table> {
    // Every update keeps the three maps consistent before it can panic.
    t.read().unwrap_or_else(|p| p.into_inner())
}

fn write(t: &RwLock<Table>) -> RwLockWriteGuard<'_, Table> {
    t.write().unwrap_or_else(|p| p.into_inner())
}

/// Queues a control message to a member; a full or closed queue drops it (logged).
fn deliver(to: &Member, msg: &ServerMsg) {
    match control_frame(msg) {
        Ok(frame) => {
            if !to.outbox.push_server(frame) {
                debug!(peer = %to.name, "room message not queued: the peer is not reading");
            }
        }
        Err(e) => warn!(error = %e, "cannot encode a room message"),
    }
}

impl Rooms {
    /// An empty table with the room limits of `limits`.
    pub fn new(limits: &Limits, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            table: RwLock::new(Table::default()),
            max_rooms: limits.max_rooms,
            max_members: limits.max_room_members,
            max_per_peer: limits.max_rooms_per_peer,
            rng: SystemRandom::new(),
            metrics,
            budgets: Mutex::new(HashMap::new()),
        })
    }

    /// The `/rooms` document: each room (by name, at most [`MAX_ROOMS_LISTED`]) with its id
    /// and members, and per member the relay frames dropped for it (audio, video; for all its
    /// calls and rooms) and the frames waiting in its buffer: which receivers a room's fan-out
    /// is thinning. One JSON line.
    pub fn status_json(&self) -> String {
        // Names, ids and buffer handles are copied under the table's lock; the buffers are read
        // after it is released (joins and leaves, which forwarding waits behind, never wait
        // for this document).
        let (total, rooms) = {
            let table = read(&self.table);
            let mut names: Vec<&String> = table.rooms.keys().collect();
            names.sort_unstable();
            names.truncate(MAX_ROOMS_LISTED);
            let rooms: Vec<ListedRoom> = names
                .into_iter()
                .filter_map(|name| table.rooms.get(name).map(|r| (name, r)))
                .map(|(name, r)| {
                    let members = r
                        .members
                        .iter()
                        .map(|m| (m.member.name.clone(), m.member.outbox.clone()))
                        .collect();
                    (name.clone(), r.id, members)
                })
                .collect();
            (table.rooms.len(), rooms)
        };
        let rooms: Vec<String> = rooms
            .iter()
            .map(|(name, id, members)| {
                let members: Vec<String> = members
                    .iter()
                    .map(|(member, outbox)| {
                        let (audio, video) = outbox.dropped_frames();
                        // Names are validated (a-z 0-9 . _ -): nothing to escape.
                        format!(
                            "{{\"name\":\"{member}\",\"dropped\":{{\"audio\":{audio},\"video\":{video}}},\"waiting\":{}}}",
                            outbox.waiting()
                        )
                    })
                    .collect();
                format!("{{\"room\":\"{name}\",\"id\":{id},\"members\":[{}]}}", members.join(","))
            })
            .collect();
        format!("{{\"rooms_total\":{total},\"rooms\":[{}]}}\n", rooms.join(","))
    }

    /// Rooms now.
    pub fn len(&self) -> usize {
        read(&self.table).rooms.len()
    }

    /// Whether there are no rooms.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn publish(&self, table: &Table) {
        self.metrics.set_rooms(table.rooms.len(), table.members);
    }

    fn refuse(&self, to: &Member, room: &str, Refused(refusal, reason): Refused) {
        let counted = match refusal {
            RoomRefusal::TooManyRooms => Some(Refusal::Rooms),
            RoomRefusal::Full => Some(Refusal::RoomFull),
            RoomRefusal::PeerRoomLimit => Some(Refusal::PeerRooms),
            RoomRefusal::RateLimited => Some(Refusal::RoomJoinRate),
            RoomRefusal::NotInvited => Some(Refusal::RoomNotInvited),
            _ => None,
        };
        if let Some(r) = counted {
            self.metrics.refused(r);
        }
        debug!(peer = %to.name, %room, ?refusal, "room refused");
        deliver(
            to,
            &ServerMsg::RoomRefused {
                room: room.to_owned(),
                refusal,
                reason,
            },
        );
    }

    /// Refuses a create or join over `limits.room_joins_per_min`.
    pub(crate) fn refuse_rate(&self, to: &Member, room: &str, per_min: u32) {
        let reason = format!("too many room requests: at most {per_min} a minute; try later");
        self.refuse(to, room, Refused(RoomRefusal::RateLimited, reason));
    }

    /// Refuses a create of `room`, which another node of the cluster holds.
    pub(crate) fn refuse_elsewhere(&self, to: &Member, room: &str) {
        let reason =
            format!("a room named {room} exists on another server of this cluster; join it, or pick another name");
        self.refuse(to, room, Refused(RoomRefusal::Exists, reason));
    }

    /// Whether room `room` is on this server.
    pub(crate) fn contains(&self, room: &str) -> bool {
        read(&self.table).rooms.contains_key(room)
    }

    /// The names of the rooms on this server.
    pub fn names(&self) -> Vec<String> {
        read(&self.table).rooms.keys().cloned().collect()
    }

    /// The most members a room holds at once (and names a creation may invite).
    pub(crate) fn max_members(&self) -> usize {
        self.max_members
    }

    /// Handles `RoomCreate { room, invite }` from `me` (key `fingerprint`); `invited` are the
    /// invited names (sorted, distinct, not `me`), each with the key it is bound to.
    pub(crate) fn create(
        &self,
        me: Member,
        fingerprint: Fingerprint,
        room: &str,
        invited: Vec<(String, Option<Fingerprint>)>,
    ) {
        let invite: Vec<String> = invited.iter().map(|(n, _)| n.clone()).collect();
        let mut table = write(&self.table);
        match self.check_create(&table, &me, room, &invite) {
            Err(refused) => {
                drop(table);
                self.refuse(&me, room, refused);
            }
            Ok(()) => {
                let id = self.fresh_id(&table);
                let code = self.fresh_code();
                let invited: HashMap<String, Option<Fingerprint>> = invited.into_iter().collect();
                info!(%room, id, creator = %me.name, invited = invited.len(), "room created");
                deliver(
                    &me,
                    &ServerMsg::RoomJoined {
                        room: room.to_owned(),
                        id,
                        code: Some(code.clone()),
                        members: Vec::new(),
                    },
                );
                table.by_id.insert(id, room.to_owned());
                table.by_conn.entry(me.conn_id).or_default().push(room.to_owned());
                table.rooms.insert(
                    room.to_owned(),
                    Room {
                        id,
                        creator: me.name.clone(),
                        creator_key: fingerprint,
                        invited,
                        code,
                        members: vec![InRoom {
                            member: me,
                            fingerprint,
                        }],
                    },
                );
                table.members += 1;
                self.publish(&table);
            }
        }
    }

    fn check_create(&self, table: &Table, me: &Member, room: &str, invite: &[String]) -> Result<(), Refused> {
        validate_name(room).map_err(|e| Refused(RoomRefusal::InvalidName, format!("room name: {e}")))?;
        for name in invite {
            validate_name(name)
                .map_err(|e| Refused(RoomRefusal::InvalidName, format!("invited name {name:?}: {e}")))?;
        }
        // Invitations are bounded by the room's size (members come and go, so up to that many
        // may be invited besides the creator), which bounds what a room holds.
        if invite.len() > self.max_members {
            return Err(Refused(
                RoomRefusal::Full,
                format!(
                    "{} invited, but at most {} may be (a room holds {} members at once)",
                    invite.len(),
                    self.max_members,
                    self.max_members
                ),
            ));
        }
        if table.rooms.contains_key(room) {
            return Err(Refused(
                RoomRefusal::Exists,
                format!("a room named {room} exists; join it, or pick another name"),
            ));
        }
        if table.rooms.len() >= self.max_rooms {
            return Err(Refused(
                RoomRefusal::TooManyRooms,
                "the server holds as many rooms as it allows; try later".into(),
            ));
        }
        self.check_peer_rooms(table, me)
    }

    fn check_peer_rooms(&self, table: &Table, me: &Member) -> Result<(), Refused> {
        if table.rooms_of(me.conn_id) >= self.max_per_peer {
            return Err(Refused(
                RoomRefusal::PeerRoomLimit,
                format!(
                    "you are in {} rooms, the most allowed; leave one first",
                    self.max_per_peer
                ),
            ));
        }
        Ok(())
    }

    /// Handles `RoomJoin { room, code }` from `me` (key `fingerprint`). When `me` joined,
    /// returns the room's id and the members already in it, each of whom needs a pairwise
    /// session with `me` ([`crate::calls::Calls::start_pair`]).
    pub(crate) fn join(
        &self,
        me: Member,
        fingerprint: Fingerprint,
        room: &str,
        code: Option<&str>,
    ) -> Option<(u32, Vec<Member>)> {
        let mut table = write(&self.table);
        let checked = self.check_join(&table, &me, fingerprint, room, code);
        let replaced = match checked {
            Err(refused) => {
                drop(table);
                self.refuse(&me, room, refused);
                return None;
            }
            Ok(replaced) => replaced,
        };
        // The same name from an older connection (it registered again): that membership ends.
        if let Some(old_conn) = replaced {
            if let Some(list) = table.by_conn.get_mut(&old_conn) {
                list.retain(|r| r != room);
                if list.is_empty() {
                    table.by_conn.remove(&old_conn);
                }
            }
            table.members -= 1;
        }
        let r = table.rooms.get_mut(room)?;
        r.members.retain(|m| m.member.name != me.name);
        let others: Vec<RoomMember> = r.members.iter().map(InRoom::public).collect();
        let joined = RoomMember {
            name: me.name.clone(),
            fingerprint,
        };
        for m in &r.members {
            deliver(
                &m.member,
                &ServerMsg::RoomMemberJoined {
                    room: room.to_owned(),
                    member: joined.clone(),
                },
            );
        }
        deliver(
            &me,
            &ServerMsg::RoomJoined {
                room: room.to_owned(),
                id: r.id,
                code: r.is_creator(&me.name, fingerprint).then(|| r.code.clone()),
                members: others,
            },
        );
        info!(%room, peer = %me.name, members = r.members.len() + 1, "joined room");
        let conn_id = me.conn_id;
        let id = r.id;
        let pairs = r.members.iter().map(|m| m.member.clone()).collect();
        r.members.push(InRoom {
            member: me,
            fingerprint,
        });
        table.by_conn.entry(conn_id).or_default().push(room.to_owned());
        table.members += 1;
        self.publish(&table);
        Some((id, pairs))
    }

    /// Whether `me` may join `room`: `Ok(Some(conn))` when its name is in it from an older
    /// connection `conn`.
    fn check_join(
        &self,
        table: &Table,
        me: &Member,
        key: Fingerprint,
        room: &str,
        code: Option<&str>,
    ) -> Result<Option<u64>, Refused> {
        let Some(r) = table.rooms.get(room) else {
            return Err(Refused(
                RoomRefusal::NoSuchRoom,
                format!("there is no room named {room} on this server"),
            ));
        };
        let existing = r.members.iter().find(|m| m.member.name == me.name);
        if let Some(m) = existing {
            if m.member.conn_id == me.conn_id || m.fingerprint != key {
                return Err(Refused(
                    RoomRefusal::AlreadyMember,
                    format!("{} is in room {room} already", me.name),
                ));
            }
            // The same peer from a newer connection: it takes over its membership.
            self.check_peer_rooms(table, me)?;
            return Ok(Some(m.member.conn_id));
        }
        if !r.may_join(&me.name, key, code) {
            let why = if code.is_some() {
                format!("wrong join code for room {room}")
            } else {
                format!(
                    "{} is not invited to room {room}; ask its creator for an invitation or the join code",
                    me.name
                )
            };
            return Err(Refused(RoomRefusal::NotInvited, why));
        }
        if r.members.len() >= self.max_members {
            return Err(Refused(
                RoomRefusal::Full,
                format!("room {room} is full ({} members)", self.max_members),
            ));
        }
        self.check_peer_rooms(table, me)?;
        Ok(None)
    }

    /// Handles `RoomLeave { room }` from connection `conn_id`; returns the room's id if it
    /// was in it (its pairwise sessions there end: [`crate::calls::Calls::end_pairs`]).
    pub(crate) fn leave(&self, conn_id: u64, room: &str) -> Option<u32> {
        let mut table = write(&self.table);
        let id = table.rooms.get(room).map(|r| r.id)?;
        let name = remove_conn_room(&mut table, conn_id, room)?;
        notify_left(&table, room, &name, "left");
        self.forget_budgets(&table);
        self.publish(&table);
        Some(id)
    }

    /// Connection `conn_id` ended: it leaves every room it was in.
    pub(crate) fn leave_all(&self, conn_id: u64) {
        let mut table = write(&self.table);
        let rooms = table.by_conn.get(&conn_id).cloned().unwrap_or_default();
        for room in rooms {
            if let Some(name) = remove_conn_room(&mut table, conn_id, &room) {
                notify_left(&table, &room, &name, "connection ended");
            }
        }
        self.forget_budgets(&table);
        self.publish(&table);
    }

    /// Forwards relay frame `wire` (with its parsed `header`, whose id is a room's) from
    /// connection `conn_id` to every other member of that room; drops and counts it when the
    /// sender is not a member. Never blocks.
    pub(crate) fn relay(&self, conn_id: u64, header: &RelayHeader, wire: Bytes, now: Instant) {
        if header.class == TrafficClass::Control {
            // Rooms carry media; control frames are never dropped, so one sender's could fill
            // every member's buffer until the server closed their connections.
            self.metrics
                .dropped(header.class, DropReason::RoomControl, 1, wire.len());
            debug!(
                room = header.call,
                conn = conn_id,
                "control-class frame to a room dropped"
            );
            return;
        }
        let table = read(&self.table);
        let found = table
            .by_id
            .get(&header.call)
            .and_then(|name| table.rooms.get(name))
            .and_then(|r| {
                let me = r.members.iter().find(|m| m.member.conn_id == conn_id)?;
                let others: Vec<(u64, Arc<Outbox>)> = r
                    .members
                    .iter()
                    .filter(|m| m.member.conn_id != conn_id)
                    .map(|m| (m.member.conn_id, m.member.outbox.clone()))
                    .collect();
                Some((me.member.outbox.clone(), others))
            });
        drop(table);
        let Some((mine, receivers)) = found else {
            self.metrics.dropped(header.class, DropReason::NotInCall, 1, wire.len());
            debug!(
                room = header.call,
                conn = conn_id,
                "relay frame for a room this peer is not in dropped"
            );
            return;
        };
        self.metrics.room_copies(header.class, receivers.len() as u64);
        let mut grants = Vec::new();
        for (conn, outbox) in &receivers {
            // A receiver's buffer gives a budget for the room (all its senders together)
            // while it is the bottleneck; it goes to whichever sender's frame comes next.
            if let Some(g) = outbox.push_relay(conn_id, wire.clone(), header, now) {
                grants.push((*conn, g.bps));
            }
        }
        self.fan_out_budget(header.call, conn_id, &mine, &receivers, &grants, now);
    }

    /// Forgets the budgets of rooms that closed.
    fn forget_budgets(&self, table: &Table) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        budgets.retain(|id, _| table.by_id.contains_key(id));
    }

    /// Records the receivers' budgets, and tells this sender its fan-out budget when every
    /// other member is a bottleneck (at most every [`FAN_OUT_BUDGET_EVERY`]).
    fn fan_out_budget(
        &self,
        room: u32,
        sender: u64,
        mine: &Outbox,
        receivers: &[(u64, Arc<Outbox>)],
        grants: &[(u64, u64)],
        now: Instant,
    ) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let entry = budgets.entry(room).or_default();
        entry.sent.insert(sender, now);
        for &(conn, bps) in grants {
            entry.grants.insert(conn, (bps, now));
        }
        if entry
            .told
            .get(&sender)
            .is_some_and(|at| now.duration_since(*at) < FAN_OUT_BUDGET_EVERY)
        {
            return;
        }
        let conns: Vec<u64> = receivers.iter().map(|(c, _)| *c).collect();
        // Members that left are forgotten (the lists stay as small as the room).
        entry.grants.retain(|c, _| conns.contains(c) || *c == sender);
        entry.sent.retain(|c, _| conns.contains(c) || *c == sender);
        let Some(bps) = entry.budget(&conns, now) else { return };
        entry.told.retain(|c, _| conns.contains(c) || *c == sender);
        entry.told.insert(sender, now);
        drop(budgets);
        self.metrics.budget_sent();
        let msg = ServerMsg::RelayBudget {
            call: room,
            bps,
            dropped: 0,
        };
        match control_frame(&msg) {
            Ok(f) => {
                let _ = mine.push_server(f);
            }
            Err(e) => warn!(error = %e, "cannot encode a fan-out budget"),
        }
    }

    fn fresh_id(&self, table: &Table) -> u32 {
        loop {
            let mut b = [0u8; 4];
            // SystemRandom only fails when the OS has no randomness at all.
            self.rng.fill(&mut b).expect("the OS random source works");
            let id = u32::from_be_bytes(b) | ROOM_ID_BIT;
            if !table.by_id.contains_key(&id) {
                return id;
            }
        }
    }

    fn fresh_code(&self) -> String {
        let mut b = [0u8; CODE_LEN];
        self.rng.fill(&mut b).expect("the OS random source works");
        // 256 is not a multiple of 31: the first 8 characters are a little more likely
        // (9 ways against 8), which costs well under a bit of the code's ~59.
        b.iter()
            .map(|x| char::from(CODE_ALPHABET[usize::from(*x) % CODE_ALPHABET.len()]))
            .collect()
    }
}

/// Takes connection `conn_id` out of `room`; returns its name if it was in it. Removes the room
/// when it is empty.
fn remove_conn_room(table: &mut Table, conn_id: u64, room: &str) -> Option<String> {
    if let Some(list) = table.by_conn.get_mut(&conn_id) {
        list.retain(|r| r != room);
        if list.is_empty() {
            table.by_conn.remove(&conn_id);
        }
    }
    let r = table.rooms.get_mut(room)?;
    let i = r.members.iter().position(|m| m.member.conn_id == conn_id)?;
    let gone = r.members.swap_remove(i);
    let empty = r.members.is_empty();
    let id = r.id;
    table.members -= 1;
    if empty {
        table.rooms.remove(room);
        table.by_id.remove(&id);
        info!(%room, "room closed: its last member left");
    }
    Some(gone.member.name)
}

fn notify_left(table: &Table, room: &str, name: &str, reason: &str) {
    let Some(r) = table.rooms.get(room) else { return };
    info!(%room, peer = %name, reason, members = r.members.len(), "left room");
    for m in &r.members {
        deliver(
            &m.member,
            &ServerMsg::RoomMemberLeft {
                room: room.to_owned(),
                name: name.to_owned(),
                reason: reason.to_owned(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(!same_secret(b"", b"a"));
    }
}
