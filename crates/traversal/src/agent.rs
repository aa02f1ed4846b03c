//! The traversal [`Agent`]: check list driving, nomination, selection and fallback.
//!
//! Data flow of one run:
//! 1. `new`/`restart`: pair every remote candidate; LAN pairs start at once (when tried),
//!    public pairs `lan_head_start` later.
//! 2. `handle_timeout`: retransmit outstanding checks (doubling timeout), start at most one
//!    new check per `ta`, give up after `budget` (→ `UseRelay`).
//! 3. `handle_input`, request: answer it, and send a triggered check back to its source
//!    (adding a peer-reflexive pair for an unknown source).
//! 4. `handle_input`, response: authenticated, known transaction, from the probed
//!    address → the pair is valid (`PairValidated`).
//! 5. Controlling: nominate the best valid pair with USE-CANDIDATE; its success is
//!    `Selected`. Controlled: USE-CANDIDATE on a valid pair is `Selected`.
//! 6. Selected: keepalives and liveness probes (`liveness.rs`) until `PathLost`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_rs::TransactionId;
use tracing::{debug, info, trace};

use crate::check::{self, CheckRequest, Decoded};
use crate::config::{Candidate, CandidateKind, Config, Credentials, Role};
use crate::liveness::{self, Liveness};
use crate::pair::{CandidatePair, CheckList, PairState, Retransmit};
use crate::rng::SplitMix64;
use crate::{Event, RelayReason, Transmit};

/// Outstanding transactions kept at most (older ones are forgotten first).
const MAX_TRANSACTIONS: usize = 128;
/// Remote candidates kept at most (peer-reflexive discovery is bounded by this).
const MAX_PAIRS: usize = 32;

/// A sans-IO NAT traversal agent for one call.
///
/// # Drive contract
/// The agent does nothing on its own. After **every** call to a `handle_*` method, to
/// [`Agent::new`] and to [`Agent::restart`], the caller must:
/// 1. drain [`Agent::poll_transmit`] and send each datagram from its UDP socket;
/// 2. drain [`Agent::poll_event`] and act on it;
/// 3. re-read [`Agent::poll_timeout`] and call [`Agent::handle_timeout`] at that instant
///    (`None`: no timer; only input or `restart` can wake the agent).
///
/// All methods take the caller's `now`; it must never go backwards.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    role: Role,
    credentials: Credentials,
    try_lan: bool,
    tie_breaker: u64,
    rng: SplitMix64,
    checks: CheckList,
    transactions: HashMap<TransactionId, Transaction>,
    phase: Phase,
    started_at: Instant,
    first_valid_at: Option<Instant>,
    last_check_at: Option<Instant>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    probes: Probes,
}

/// Birthday probes to a peer behind a NAT that maps per destination (see [`Agent::probe`]).
#[derive(Debug, Default)]
struct Probes {
    targets: Vec<SocketAddr>,
    next: usize,
    interval: Duration,
    delay: Duration,
    at: Option<Instant>,
    /// Runs started (the first, then one per restart), at most [`MAX_PROBE_RUNS`].
    runs: u32,
}

/// Probes sent at most per `handle_timeout` when the caller was late (no burst after a stall).
const MAX_PROBE_CATCH_UP: usize = 4;
/// Runs of birthday probes per agent: the first attempt and two retries (each restart after
/// falling back to the relay probes again), so a peer cannot have another probe all call long.
pub const MAX_PROBE_RUNS: u32 = 3;

#[derive(Debug, Clone, Copy)]
struct Transaction {
    pair: usize,
    sent_at: Instant,
    purpose: Purpose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Check,
    Nominate,
    Liveness,
}

#[derive(Debug)]
enum Phase {
    /// Checking pairs; nothing nominated yet.
    Checking,
    /// Controlling side: USE-CANDIDATE outstanding on `pair`.
    Nominating { pair: usize, retransmit: Retransmit },
    /// `Selected` was emitted for `pair`.
    Connected { pair: usize, liveness: Liveness },
    /// `UseRelay` was emitted; idle until `restart`.
    Relay,
    /// `PathLost` was emitted; idle until `restart`.
    Lost,
}

impl Agent {
    /// Starts checking `remote_candidates` at `now`.
    ///
    /// `try_lan`: the caller saw both peers' public IPs equal, so LAN candidates are
    /// checked first; without it LAN candidates are ignored.
    pub fn new(
        config: Config,
        role: Role,
        credentials: Credentials,
        remote_candidates: Vec<Candidate>,
        try_lan: bool,
        now: Instant,
    ) -> Self {
        let mut rng = SplitMix64::new(config.rng_seed);
        let tie_breaker = rng.next_u64();
        let remotes: Vec<_> = remote_candidates
            .iter()
            .take(MAX_PAIRS)
            .map(|c| (c.addr, c.kind))
            .collect();
        let checks = CheckList::new(&config, &remotes, try_lan, now);
        debug!(?role, pairs = checks.len(), try_lan, "traversal agent started");
        Self {
            config,
            role,
            credentials,
            try_lan,
            tie_breaker,
            rng,
            checks,
            transactions: HashMap::new(),
            phase: Phase::Checking,
            started_at: now,
            first_valid_at: None,
            last_check_at: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            probes: Probes::default(),
        }
    }

    /// Birthday probing: while checking, sends one check to each of `targets`, in order, one
    /// every `interval`, starting `delay` from `now` — the guessed public ports of a peer whose
    /// NAT gives every destination a new port (a symmetric NAT) and which opened many of them
    /// towards this peer. Each probe opens this side's NAT to its target; the probe that hits
    /// one of the peer's open ports reaches it, and the peer's triggered check back validates
    /// the pair as any other (probes themselves are never retransmitted and their answers
    /// validate nothing). Probing stops when a pair is nominated or the budget runs out, and
    /// starts over from the first target on [`Agent::restart`].
    pub fn probe(&mut self, now: Instant, targets: Vec<SocketAddr>, interval: Duration, delay: Duration) {
        debug!(targets = targets.len(), ?interval, "birthday probing");
        self.probes = Probes {
            targets,
            next: 0,
            interval,
            delay,
            at: Some(now + delay),
            runs: 1,
        };
    }

    /// Probes sent in this run so far.
    pub fn probes_sent(&self) -> usize {
        self.probes.next
    }

    /// The remote candidates checked (those the caller gave and those learned), in check
    /// order.
    pub fn candidates(&self) -> Vec<Candidate> {
        (0..self.checks.len())
            .map(|i| {
                let p = self.checks.get(i);
                Candidate {
                    addr: p.remote,
                    kind: p.kind,
                }
            })
            .collect()
    }

    /// The remote candidate of the selected pair, while one is selected.
    pub fn selected(&self) -> Option<Candidate> {
        let Phase::Connected { pair, .. } = &self.phase else {
            return None;
        };
        let p = self.checks.get(*pair);
        Some(Candidate {
            addr: p.remote,
            kind: p.kind,
        })
    }

    /// Whether the agent is still looking for a first path: checking, nothing validated yet
    /// (when birthday traversal is worth its traffic).
    pub fn is_searching(&self) -> bool {
        matches!(self.phase, Phase::Checking) && self.first_valid_at.is_none()
    }

    fn send_probes(&mut self, now: Instant) {
        if !self.is_searching() {
            self.probes.at = None;
            return;
        }
        for _ in 0..MAX_PROBE_CATCH_UP {
            let Some(at) = self.probes.at.filter(|at| now >= *at) else {
                return;
            };
            let Some(&target) = self.probes.targets.get(self.probes.next) else {
                self.probes.at = None;
                return;
            };
            self.probes.next += 1;
            self.probes.at = Some(at + self.probes.interval);
            let Some((_, contents)) = self.encode_check(false) else {
                return;
            };
            self.transmits.push_back(Transmit {
                destination: target,
                contents,
                probe: true,
            });
        }
        // Still late after the catch-up: go on from now, not in a burst.
        if self.probes.at.is_some_and(|at| at <= now) {
            self.probes.at = Some(now + self.probes.interval);
        }
    }

    /// Feeds a datagram received from `from`.
    ///
    /// Returns `true` if it was a STUN check or response authenticated with this call's
    /// credentials (consumed, even when it changes nothing); `false` for anything else,
    /// which is dropped with a `trace!` — network input never panics.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> bool {
        match check::decode(&self.credentials.key, data) {
            Err(error) => {
                trace!(%from, %error, len = data.len(), "dropping datagram");
                false
            }
            Ok(Decoded::Request {
                transaction_id,
                username,
                use_candidate,
            }) => {
                if username != self.credentials.incoming_username() {
                    trace!(%from, %username, "dropping check with a foreign username");
                    return false;
                }
                self.on_request(now, from, transaction_id, use_candidate);
                true
            }
            Ok(Decoded::Response { transaction_id, mapped }) => {
                self.on_response(now, from, transaction_id, mapped);
                true
            }
        }
    }

    /// Reports other authenticated traffic (e.g. QUIC) from `from`: it proves the
    /// selected path alive, so no keepalive or probe is needed for a while.
    pub fn handle_activity(&mut self, now: Instant, from: SocketAddr) {
        if let Phase::Connected { pair, liveness } = &mut self.phase {
            if self.checks.get(*pair).remote == from {
                liveness.on_receive(now);
            }
        }
    }

    /// Runs the timers due at `now` (see [`Agent::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Checking | Phase::Nominating { .. } => {
                if now >= self.started_at + self.config.budget {
                    let after = self.config.budget;
                    return self.use_relay(RelayReason::NoValidPair { after });
                }
                self.retransmit_checks(now);
                self.retransmit_nomination(now);
                self.start_paced_check(now);
                self.send_probes(now);
                self.maybe_nominate(now);
            }
            Phase::Connected { .. } => self.drive_liveness(now),
            Phase::Relay | Phase::Lost => {}
        }
        self.prune_transactions(now);
    }

    /// The caller knows UDP is unusable (no STUN reply from the server): fall back to the
    /// relay at once. Ignored once a path is selected or a decision was made.
    pub fn handle_udp_unusable(&mut self, _now: Instant) {
        if matches!(self.phase, Phase::Checking | Phase::Nominating { .. }) {
            self.use_relay(RelayReason::UdpUnusable);
        }
    }

    /// Starts a fresh run (after `UseRelay` or `PathLost`; the caller backs off between
    /// attempts). Keeps the remote candidates, including peer-reflexive ones.
    pub fn restart(&mut self, now: Instant) {
        info!(role = ?self.role, "restarting traversal");
        self.checks.reset(&self.config, self.try_lan, now);
        self.transactions.clear();
        self.phase = Phase::Checking;
        self.started_at = now;
        self.first_valid_at = None;
        self.last_check_at = None;
        if !self.probes.targets.is_empty() && self.probes.runs < MAX_PROBE_RUNS {
            self.probes.runs += 1;
            self.probes.next = 0;
            self.probes.at = Some(now + self.probes.delay);
        } else {
            self.probes.at = None;
        }
    }

    /// The next datagram to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Agent::handle_timeout`] must next be called; `None` when idle.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Checking => {
                let paced = self.checks.next_start().map(|start| match self.last_check_at {
                    Some(last) => start.max(last + self.config.ta),
                    None => start,
                });
                let nominate = match (self.role, self.first_valid_at) {
                    (Role::Controlling, Some(first)) => Some(first + self.config.nomination_delay),
                    _ => None,
                };
                let probe = self
                    .probes
                    .at
                    .filter(|_| self.probes.next < self.probes.targets.len() && self.first_valid_at.is_none());
                [
                    Some(self.deadline()),
                    self.checks.next_retransmit(),
                    paced,
                    nominate,
                    probe,
                ]
                .into_iter()
                .flatten()
                .min()
            }
            Phase::Nominating { retransmit, .. } => {
                let checks = self.checks.next_retransmit();
                [Some(self.deadline()), Some(retransmit.next_at), checks]
                    .into_iter()
                    .flatten()
                    .min()
            }
            Phase::Connected { liveness, .. } => Some(liveness.poll_timeout(&self.config)),
            Phase::Relay | Phase::Lost => None,
        }
    }

    fn deadline(&self) -> Instant {
        self.started_at + self.config.budget
    }

    fn is_checking(&self) -> bool {
        matches!(self.phase, Phase::Checking | Phase::Nominating { .. })
    }

    fn on_request(&mut self, now: Instant, from: SocketAddr, transaction_id: TransactionId, use_candidate: bool) {
        trace!(%from, use_candidate, "check received");
        match check::encode_response(&self.credentials.key, transaction_id, from) {
            Ok(contents) => self.transmits.push_back(Transmit {
                destination: from,
                contents,
                probe: false,
            }),
            Err(error) => debug!(%error, "cannot encode check response"),
        }
        if let Phase::Connected { pair, liveness } = &mut self.phase {
            if self.checks.get(*pair).remote == from {
                liveness.on_receive(now);
            }
            return;
        }
        if !self.is_checking() {
            return;
        }
        let Some(index) = self.pair_for_source(now, from) else {
            return;
        };
        if use_candidate && self.role == Role::Controlled {
            self.checks.get_mut(index).peer_nominated = true;
        }
        if self.checks.get(index).is_valid() {
            if self.checks.get(index).peer_nominated {
                self.select(now, index);
            }
        } else {
            self.triggered_check(now, index);
        }
    }

    /// The pair whose remote is `from`, adding a peer-reflexive one if there is none.
    fn pair_for_source(&mut self, now: Instant, from: SocketAddr) -> Option<usize> {
        if let Some(index) = self.checks.find(from) {
            return Some(index);
        }
        if self.checks.len() >= MAX_PAIRS {
            trace!(%from, "too many pairs; not adding a peer-reflexive candidate");
            return None;
        }
        let kind = if self.probes.targets.contains(&from) {
            CandidateKind::Predicted
        } else {
            CandidateKind::PeerReflexive
        };
        debug!(%from, ?kind, "peer-reflexive candidate discovered");
        let pair = CandidatePair::new(from, kind, now);
        Some(self.checks.push(pair))
    }

    fn on_response(&mut self, now: Instant, from: SocketAddr, transaction_id: TransactionId, mapped: SocketAddr) {
        let Some(transaction) = self.transactions.get(&transaction_id).copied() else {
            trace!(%from, "dropping response to an unknown transaction");
            return;
        };
        if self.checks.get(transaction.pair).remote != from {
            trace!(%from, "dropping response from an address that was not probed");
            return;
        }
        self.transactions.remove(&transaction_id);
        trace!(%from, %mapped, purpose = ?transaction.purpose, "check succeeded");
        let rtt = now.saturating_duration_since(transaction.sent_at);
        match &mut self.phase {
            Phase::Connected { pair, liveness } => {
                if *pair == transaction.pair {
                    liveness.on_receive(now);
                }
            }
            Phase::Nominating { pair, .. } if *pair == transaction.pair => {
                let nominated = transaction.purpose == Purpose::Nominate;
                self.mark_valid(now, transaction.pair, rtt);
                if nominated {
                    self.select(now, transaction.pair);
                }
            }
            Phase::Checking | Phase::Nominating { .. } => self.mark_valid(now, transaction.pair, rtt),
            Phase::Relay | Phase::Lost => {}
        }
    }

    fn mark_valid(&mut self, now: Instant, index: usize, rtt: Duration) {
        let pair = self.checks.get_mut(index);
        if pair.is_valid() {
            return;
        }
        pair.state = PairState::Succeeded;
        pair.rtt = Some(rtt);
        let (remote, kind, peer_nominated) = (pair.remote, pair.path_kind(), pair.peer_nominated);
        debug!(%remote, ?kind, ?rtt, "pair validated");
        self.events.push_back(Event::PairValidated { remote, kind, rtt });
        self.first_valid_at.get_or_insert(now);
        match self.role {
            Role::Controlled if peer_nominated => self.select(now, index),
            Role::Controlled => {}
            Role::Controlling => self.maybe_nominate(now),
        }
    }

    /// Controlling side: nominate the best valid pair once nothing better can come.
    fn maybe_nominate(&mut self, now: Instant) {
        if self.role != Role::Controlling || !matches!(self.phase, Phase::Checking) {
            return;
        }
        let Some(best) = self.checks.best_valid() else {
            return;
        };
        let kind = self.checks.get(best).path_kind();
        let waited_enough = self
            .first_valid_at
            .is_some_and(|first| now >= first + self.config.nomination_delay);
        let nothing_better = kind == crate::PathKind::Lan || !self.checks.better_pending(best);
        if waited_enough || nothing_better {
            self.start_nomination(now, best);
        }
    }

    fn start_nomination(&mut self, now: Instant, index: usize) {
        debug!(remote = %self.checks.get(index).remote, "nominating pair");
        self.send_check(now, index, Purpose::Nominate);
        let retransmit = Retransmit::first(&self.config, now);
        self.phase = Phase::Nominating {
            pair: index,
            retransmit,
        };
    }

    fn retransmit_nomination(&mut self, now: Instant) {
        let Phase::Nominating { pair, mut retransmit } = self.phase else {
            return;
        };
        if now < retransmit.next_at {
            return;
        }
        if retransmit.attempts >= self.config.max_attempts {
            debug!(remote = %self.checks.get(pair).remote, "nomination unanswered; pair failed");
            self.checks.get_mut(pair).state = PairState::Failed;
            self.phase = Phase::Checking;
            return;
        }
        retransmit.again(&self.config, now);
        self.phase = Phase::Nominating { pair, retransmit };
        self.send_check(now, pair, Purpose::Nominate);
    }

    fn select(&mut self, now: Instant, index: usize) {
        if !self.is_checking() {
            return;
        }
        let pair = self.checks.get(index);
        let (remote, kind) = (pair.remote, pair.path_kind());
        let rtt = pair.rtt.unwrap_or_default();
        info!(%remote, ?kind, ?rtt, role = ?self.role, "path selected");
        self.events.push_back(Event::Selected { remote, kind, rtt });
        self.phase = Phase::Connected {
            pair: index,
            liveness: Liveness::new(now),
        };
    }

    fn use_relay(&mut self, reason: RelayReason) {
        info!(?reason, role = ?self.role, "no direct path; use the relay");
        self.events.push_back(Event::UseRelay { reason });
        self.phase = Phase::Relay;
    }

    fn retransmit_checks(&mut self, now: Instant) {
        for index in 0..self.checks.len() {
            let PairState::InProgress(mut retransmit) = self.checks.get(index).state else {
                continue;
            };
            if now < retransmit.next_at {
                continue;
            }
            let pair = self.checks.get_mut(index);
            if retransmit.attempts >= self.config.max_attempts {
                trace!(remote = %pair.remote, "check unanswered; pair failed");
                pair.state = PairState::Failed;
                continue;
            }
            retransmit.again(&self.config, now);
            pair.state = PairState::InProgress(retransmit);
            self.send_check(now, index, Purpose::Check);
        }
    }

    /// At most one new ordinary check per `ta`.
    fn start_paced_check(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Checking) {
            return;
        }
        if self.last_check_at.is_some_and(|last| now < last + self.config.ta) {
            return;
        }
        let Some(index) = self.checks.next_waiting(now) else {
            return;
        };
        self.last_check_at = Some(now);
        self.checks.get_mut(index).state = PairState::InProgress(Retransmit::first(&self.config, now));
        self.send_check(now, index, Purpose::Check);
    }

    /// A check straight back to the source of a request: opens our NAT towards it.
    fn triggered_check(&mut self, now: Instant, index: usize) {
        let pair = self.checks.get_mut(index);
        if pair.last_sent.is_some_and(|last| now < last + self.config.ta) {
            return; // rate limit: a flood of requests does not become a flood of checks
        }
        pair.state = PairState::InProgress(Retransmit::first(&self.config, now));
        self.send_check(now, index, Purpose::Check);
    }

    /// A check with a fresh transaction id (USE-CANDIDATE when nominating): the id and the
    /// encoded request.
    fn encode_check(&mut self, use_candidate: bool) -> Option<(TransactionId, Vec<u8>)> {
        let transaction_id = self.rng.transaction_id();
        let username = self.credentials.outgoing_username();
        let request = CheckRequest {
            username: &username,
            role: self.role,
            tie_breaker: self.tie_breaker,
            priority: CandidateKind::PeerReflexive.priority(),
            use_candidate,
        };
        match check::encode_request(&self.credentials.key, transaction_id, &request) {
            Ok(contents) => Some((transaction_id, contents)),
            Err(error) => {
                debug!(%error, "cannot encode check");
                None
            }
        }
    }

    fn send_check(&mut self, now: Instant, index: usize, purpose: Purpose) {
        let Some((transaction_id, contents)) = self.encode_check(purpose == Purpose::Nominate) else {
            return;
        };
        let pair = self.checks.get_mut(index);
        pair.last_sent = Some(now);
        trace!(remote = %pair.remote, ?purpose, "sending check");
        self.transmits.push_back(Transmit {
            destination: pair.remote,
            contents,
            probe: false,
        });
        let transaction = Transaction {
            pair: index,
            sent_at: now,
            purpose,
        };
        self.transactions.insert(transaction_id, transaction);
    }

    fn drive_liveness(&mut self, now: Instant) {
        let Phase::Connected { pair, liveness } = &mut self.phase else {
            return;
        };
        let index = *pair;
        match liveness.handle_timeout(&self.config, now) {
            liveness::Action::Nothing => {}
            liveness::Action::SendKeepalive | liveness::Action::SendProbe => {
                self.send_check(now, index, Purpose::Liveness);
            }
            liveness::Action::Lost => {
                let remote = self.checks.get(index).remote;
                info!(%remote, "selected path lost");
                self.events.push_back(Event::PathLost { remote });
                self.phase = Phase::Lost;
            }
        }
    }

    /// Forgets transactions that can no longer matter, and bounds the table.
    fn prune_transactions(&mut self, now: Instant) {
        let horizon = self.config.rto_max * 2;
        self.transactions
            .retain(|_, t| now.saturating_duration_since(t.sent_at) <= horizon);
        while self.transactions.len() > MAX_TRANSACTIONS {
            let oldest = self
                .transactions
                .iter()
                .min_by_key(|(_, t)| t.sent_at)
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => self.transactions.remove(&id),
                None => break,
            };
        }
    }
}
