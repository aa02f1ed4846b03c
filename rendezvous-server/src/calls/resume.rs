//! Resuming calls: `Resume` messages waiting for the other member's, and the match.
//!
//! Flow (see `docs/protocol.md`, "Resuming a call"):
//! 1. a registered peer X sends `Resume { call, peer: Y, proof }`; names that cannot be
//!    registered, and X = Y, are refused at once (`ResumeFailed`);
//! 2. if Y's connection is waiting with a `Resume` that names X with the same proof, the two
//!    are a match: a new **active** call between the two current connections, under a fresh id
//!    (never the `call` either sent: ids of another server instance may collide with this one's),
//!    and each member gets `Resumed { call: <the id it sent>, id }`;
//! 3. otherwise X's `Resume` waits, counted against X's `max_calls_per_peer`, until Y's comes,
//!    `limits.resume_timeout_ms` passes (`ResumeFailed`), X withdraws it (`Hangup` with its
//!    `call`), or X's connection ends (dropped silently).
//!
//! A waiting `Resume` is keyed by (proof, its sender's name, the name it names), so the match is
//! one lookup, and nobody can disturb someone else's: a registered peer that sends a wrong proof,
//! or names the wrong peer, only makes a `Resume` of its own that waits and fails alone.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::time::Duration;

use natcall_proto::control::{Policy, ServerMsg, validate_name};
use tracing::{debug, info};

use super::{Call, Calls, Member, State, Table, current, deliver, write};
use crate::registry::Registry;

/// What a waiting `Resume` is found by: its proof, who sent it, and whom it names.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct ResumeKey {
    proof: [u8; 32],
    from: String,
    to: String,
}

impl ResumeKey {
    fn new(proof: [u8; 32], from: &str, to: &str) -> Self {
        Self {
            proof,
            from: from.to_owned(),
            to: to.to_owned(),
        }
    }
}

impl fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The proof is a secret of the two members: never logged.
        write!(f, "ResumeKey({} → {})", self.from, self.to)
    }
}

/// A `Resume` waiting for the other member's.
#[derive(Debug)]
pub(super) struct Waiting {
    /// Its sender, on the connection that sent it.
    member: Member,
    /// The `call` it carried (echoed back, never used as an id here).
    call: u32,
    /// Tells this entry from a later one with the same key (for its timer).
    serial: u64,
}

impl Waiting {
    /// Its sender.
    pub(super) fn member(&self) -> &Member {
        &self.member
    }
}

/// The waiting `Resume`s, by key and by connection.
#[derive(Debug, Default)]
pub(super) struct Pending {
    waiting: HashMap<ResumeKey, Waiting>,
    /// connection id → keys of its waiting `Resume`s (at most `max_calls_per_peer`).
    by_conn: HashMap<u64, Vec<ResumeKey>>,
}

impl Pending {
    /// How many `Resume`s are waiting.
    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// How many of them connection `conn_id` sent.
    pub(super) fn count(&self, conn_id: u64) -> usize {
        self.by_conn.get(&conn_id).map_or(0, Vec::len)
    }

    fn get(&self, key: &ResumeKey) -> Option<&Waiting> {
        self.waiting.get(key)
    }

    /// Adds `waiting` under `key`, replacing (and returning) what was there.
    fn insert(&mut self, key: ResumeKey, waiting: Waiting) -> Option<Waiting> {
        let old = self.remove(&key);
        self.by_conn
            .entry(waiting.member.conn_id)
            .or_default()
            .push(key.clone());
        self.waiting.insert(key, waiting);
        old
    }

    fn remove(&mut self, key: &ResumeKey) -> Option<Waiting> {
        let waiting = self.waiting.remove(key)?;
        if let Entry::Occupied(mut e) = self.by_conn.entry(waiting.member.conn_id) {
            e.get_mut().retain(|k| k != key);
            if e.get().is_empty() {
                e.remove();
            }
        }
        Some(waiting)
    }

    /// Removes every `Resume` connection `conn_id` sent.
    pub(super) fn remove_conn(&mut self, conn_id: u64) -> Vec<Waiting> {
        let keys = self.by_conn.remove(&conn_id).unwrap_or_default();
        keys.iter().filter_map(|k| self.waiting.remove(k)).collect()
    }

    /// Removes the `Resume` of call `call` that connection `conn_id` sent, if any.
    pub(super) fn remove_call(&mut self, conn_id: u64, call: u32) -> Option<Waiting> {
        let key = self
            .by_conn
            .get(&conn_id)?
            .iter()
            .find(|k| self.waiting.get(*k).is_some_and(|w| w.call == call))?
            .clone();
        self.remove(&key)
    }
}

/// `d` in seconds, for people: "30 s", "0.3 s".
fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

impl Calls {
    /// Handles `Resume { call, peer, proof }` from `me`: a match with `peer`'s waiting `Resume`
    /// resumes the call, anything else waits or is refused (see the module docs).
    pub(crate) fn resume(&self, registry: &Registry, me: Member, call: u32, peer: &str, proof: [u8; 32]) {
        if let Err(e) = validate_name(peer) {
            return self.resume_failed(&me, call, format!("no peer can have that name: {e}"));
        }
        if peer == me.name {
            return self.resume_failed(&me, call, "a call cannot be resumed with yourself".into());
        }
        let mut table = write(&self.table);
        if current(registry, &me).is_none() {
            return; // replaced meanwhile: its calls and resumes are being dropped
        }
        let theirs = ResumeKey::new(proof, peer, &me.name);
        // A waiting entry whose connection is no longer registered is on its way out.
        let other_waits = table
            .resumes
            .get(&theirs)
            .map(|w| current(registry, &w.member).is_some());
        match other_waits {
            Some(true) if table.count(me.conn_id) >= self.max_per_peer => {
                self.refuse_over_limit(&me, call);
            }
            Some(true) => {
                if let Some(first) = table.resumes.remove(&theirs) {
                    self.rejoin(&mut table, first, me, call);
                }
            }
            Some(false) | None => {
                table.resumes.remove(&theirs);
                self.wait_for(&mut table, me, call, peer, proof);
            }
        }
        self.publish(&table);
    }

    /// Makes the call of `first` and `second` active again under a fresh id.
    fn rejoin(&self, table: &mut Table, first: Waiting, second: Member, second_call: u32) {
        let id = self.fresh_id(table);
        table.next_serial += 1;
        deliver(&first.member, &ServerMsg::Resumed { call: first.call, id });
        deliver(&second, &ServerMsg::Resumed { call: second_call, id });
        info!(call = id, first = %first.member.name, second = %second.name, "call resumed");
        self.metrics.call_resumed();
        let call = Call {
            caller: first.member,
            callee: second,
            state: State::Active,
            // The members keep the policy their call started with; the server, which does not
            // know it, must let the relay carry the call.
            policy: Policy::Auto,
            serial: table.next_serial,
            path: None,
            room: None,
        };
        table.insert(id, call);
    }

    /// Keeps `me`'s `Resume` until `peer` sends the matching one, or the timeout.
    fn wait_for(&self, table: &mut Table, me: Member, call: u32, peer: &str, proof: [u8; 32]) {
        let mine = ResumeKey::new(proof, &me.name, peer);
        match table.resumes.get(&mine) {
            Some(w) if w.member.conn_id == me.conn_id => {
                let reason = format!("this call is already waiting for {peer} to resume it");
                return self.resume_failed(&me, call, reason);
            }
            // Left by an earlier connection of the same peer that is on its way out.
            Some(_) => drop(table.resumes.remove(&mine)),
            None => {}
        }
        if table.count(me.conn_id) >= self.max_per_peer {
            return self.refuse_over_limit(&me, call);
        }
        table.next_serial += 1;
        let serial = table.next_serial;
        debug!(call, peer = %me.name, other = %peer, "resume waiting for the other member");
        table.resumes.insert(
            mine.clone(),
            Waiting {
                member: me,
                call,
                serial,
            },
        );
        self.arm(self.resume_timeout, move |calls| calls.expire_resume(&mine, serial));
    }

    /// Fails the `Resume` under `key` if it is the same one (`serial`) and still waiting.
    fn expire_resume(&self, key: &ResumeKey, serial: u64) {
        let mut table = write(&self.table);
        if table.resumes.get(key).is_none_or(|w| w.serial != serial) {
            return; // matched, withdrawn or dropped; or a later Resume with the same key
        }
        if let Some(w) = table.resumes.remove(key) {
            info!(call = w.call, peer = %key.from, other = %key.to, "resume not matched in time");
            let reason = format!(
                "{} did not resume the call within {}",
                key.to,
                seconds(self.resume_timeout)
            );
            self.resume_failed(&w.member, w.call, reason);
        }
        self.publish(&table);
    }

    fn refuse_over_limit(&self, me: &Member, call: u32) {
        let reason = format!(
            "{} is already in {} calls (ringing, active or waiting to resume), the most this server allows",
            me.name, self.max_per_peer
        );
        self.resume_failed(me, call, reason);
    }

    fn resume_failed(&self, to: &Member, call: u32, reason: String) {
        debug!(call, peer = %to.name, %reason, "resume failed");
        self.metrics.resume_failed();
        deliver(to, &ServerMsg::ResumeFailed { call, reason });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::RelayConfig;
    use crate::metrics::Metrics;
    use crate::outbox::Outbox;

    fn member(name: &str, conn_id: u64) -> Member {
        Member {
            name: name.into(),
            conn_id,
            outbox: Arc::new(Outbox::new(RelayConfig::default(), Metrics::new(), 8)),
        }
    }

    fn waiting(name: &str, conn_id: u64, call: u32) -> Waiting {
        Waiting {
            member: member(name, conn_id),
            call,
            serial: 0,
        }
    }

    #[test]
    fn a_waiting_resume_is_found_only_by_its_proof_and_both_names() {
        let mut p = Pending::default();
        p.insert(ResumeKey::new([1; 32], "alice", "bob"), waiting("alice", 1, 7));
        assert!(p.get(&ResumeKey::new([1; 32], "alice", "bob")).is_some());
        assert!(
            p.get(&ResumeKey::new([2; 32], "alice", "bob")).is_none(),
            "another proof"
        );
        assert!(
            p.get(&ResumeKey::new([1; 32], "bob", "alice")).is_none(),
            "the other direction"
        );
        assert!(
            p.get(&ResumeKey::new([1; 32], "alice", "carol")).is_none(),
            "another peer"
        );
        // Someone else's entry under the same proof lives beside it.
        p.insert(ResumeKey::new([1; 32], "mallory", "bob"), waiting("mallory", 2, 7));
        assert_eq!(p.len(), 2);
        assert_eq!((p.count(1), p.count(2)), (1, 1));
    }

    #[test]
    fn entries_leave_with_their_connection_or_by_call_id() {
        let mut p = Pending::default();
        p.insert(ResumeKey::new([1; 32], "alice", "bob"), waiting("alice", 1, 7));
        p.insert(ResumeKey::new([2; 32], "alice", "carol"), waiting("alice", 1, 8));
        p.insert(ResumeKey::new([3; 32], "dave", "alice"), waiting("dave", 2, 9));
        assert!(p.remove_call(1, 9).is_none(), "call 9 is dave's");
        assert_eq!(p.remove_call(1, 8).map(|w| w.call), Some(8));
        assert_eq!(p.count(1), 1);
        assert_eq!(p.remove_conn(1).len(), 1);
        assert_eq!((p.count(1), p.len()), (0, 1));
        assert!(p.remove(&ResumeKey::new([3; 32], "dave", "alice")).is_some());
        assert!(p.by_conn.is_empty() && p.waiting.is_empty());
    }

    #[test]
    fn the_same_key_again_replaces_the_entry_and_its_connection_index() {
        let mut p = Pending::default();
        let key = ResumeKey::new([1; 32], "alice", "bob");
        p.insert(key.clone(), waiting("alice", 1, 7));
        let old = p.insert(key.clone(), waiting("alice", 2, 7));
        assert_eq!(old.map(|w| w.member.conn_id), Some(1));
        assert_eq!((p.count(1), p.count(2), p.len()), (0, 1, 1));
    }

    #[test]
    fn keys_never_show_the_proof() {
        let key = ResumeKey::new([0xab; 32], "alice", "bob");
        let shown = format!("{key:?}");
        assert_eq!(shown, "ResumeKey(alice → bob)");
    }

    #[test]
    fn timeouts_read_in_seconds() {
        assert_eq!(seconds(Duration::from_secs(30)), "30 s");
        assert_eq!(seconds(Duration::from_millis(300)), "0.3 s");
    }
}
