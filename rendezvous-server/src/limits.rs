//! Abuse limits that span connections: per-source connection counts and rate windows, the
//! open-file limit, and the descriptor held in reserve to answer "server full" when the
//! process is out of them.
//!
//! A **source** is an IPv4 address or an IPv6 /64 (one subscriber's prefix: counting single
//! IPv6 addresses would let one host take 2^64 of them). Every table here is bounded:
//! connection counts by the connection limit, rate windows by `limits.max_tracked_sources`.

use std::collections::HashMap;
use std::fs::File;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Limits;
use crate::metrics::{Metrics, Refusal};

/// Descriptors kept free beside peer connections: listeners, the STUN socket, the state
/// files, the metrics endpoint, the reserve, and what the runtime itself holds.
pub const FD_HEADROOM: u64 = 64;

/// Where connections come from, for per-source limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// One IPv4 address.
    V4([u8; 4]),
    /// An IPv6 /64 prefix.
    V6([u8; 8]),
}

impl Source {
    /// The source of `ip` (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.octets()),
                None => Self::v6_prefix(v6),
            },
        }
    }

    fn v6_prefix(v6: Ipv6Addr) -> Self {
        let mut p = [0u8; 8];
        p.copy_from_slice(&v6.octets()[..8]);
        Self::V6(p)
    }
}

/// What a rate window says about one more event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit (counted).
    Allowed,
    /// Over the limit of this window.
    Limited,
    /// The table is full of live windows: the key cannot be tracked, so it is refused.
    Untracked,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

/// Fixed windows of `period` counting events per key, at most `limit` per window, for at
/// most `max_keys` keys at once. Expired windows are purged when the table is full, at most
/// once a second (a purge walks the table).
#[derive(Debug)]
pub struct RateWindows<K> {
    windows: HashMap<K, Window>,
    period: Duration,
    limit: u32,
    max_keys: usize,
    last_purge: Option<Instant>,
}

impl<K: Eq + Hash + Clone> RateWindows<K> {
    /// A table allowing `limit` events per `period` per key, tracking at most `max_keys`.
    pub fn new(limit: u32, period: Duration, max_keys: usize) -> Self {
        Self {
            windows: HashMap::new(),
            period,
            limit,
            max_keys,
            last_purge: None,
        }
    }

    /// Whether `key` may have one more event at `now`; counts it if so.
    pub fn check(&mut self, key: &K, now: Instant) -> Verdict {
        if !self.windows.contains_key(key) && self.windows.len() >= self.max_keys && !self.purge(now) {
            return Verdict::Untracked;
        }
        let period = self.period;
        let w = self
            .windows
            .entry(key.clone())
            .or_insert(Window { start: now, count: 0 });
        if now.duration_since(w.start) >= period {
            *w = Window { start: now, count: 0 };
        }
        if w.count >= self.limit {
            return Verdict::Limited;
        }
        w.count += 1;
        Verdict::Allowed
    }

    /// Drops expired windows; returns whether there is room for a new key.
    fn purge(&mut self, now: Instant) -> bool {
        if self
            .last_purge
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return false;
        }
        self.last_purge = Some(now);
        let period = self.period;
        self.windows.retain(|_, w| now.duration_since(w.start) < period);
        self.windows.len() < self.max_keys
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[derive(Debug)]
struct Tables {
    connections: HashMap<Source, usize>,
    registrations: RateWindows<Source>,
    new_names: RateWindows<Source>,
}

/// Per-source limits shared by every connection of a server.
#[derive(Debug)]
pub struct SourceLimits {
    tables: Mutex<Tables>,
    max_connections_per_ip: usize,
    metrics: Metrics,
}

/// One admitted connection of a source; dropping it frees the slot.
#[derive(Debug)]
pub struct SourceSlot {
    limits: Arc<SourceLimits>,
    source: Source,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut t = self.limits.lock();
        if let Some(n) = t.connections.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                t.connections.remove(&self.source);
            }
        }
    }
}

/// Why a registration was refused by a per-source limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRefusal {
    /// Over `registrations_per_ip_per_min`.
    Registrations(u32),
    /// Over `new_names_per_ip_per_hour`.
    NewNames(u32),
    /// `max_tracked_sources` sources are being tracked.
    Untracked,
}

impl SourceLimits {
    /// Limits as `limits` configures them.
    pub fn new(limits: &Limits, metrics: Metrics) -> Arc<Self> {
        let tracked = limits.max_tracked_sources;
        Arc::new(Self {
            tables: Mutex::new(Tables {
                connections: HashMap::new(),
                registrations: RateWindows::new(limits.registrations_per_ip_per_min, Duration::from_secs(60), tracked),
                new_names: RateWindows::new(limits.new_names_per_ip_per_hour, Duration::from_secs(3600), tracked),
            }),
            max_connections_per_ip: limits.max_connections_per_ip,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // Every update is a single insert, remove or counter step: poison is harmless.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more connection from `ip`, or `None` when its source has
    /// `max_connections_per_ip` already.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let source = Source::of(ip);
        let mut t = self.lock();
        let n = t.connections.entry(source).or_default();
        if *n >= self.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            limits: self.clone(),
            source,
        })
    }

    /// Connections from `ip`'s source now.
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.lock().connections.get(&Source::of(ip)).copied().unwrap_or(0)
    }

    /// Counts a registration attempt from `ip` at `now`.
    pub fn registration(&self, ip: IpAddr, now: Instant, limit: u32) -> Result<(), SourceRefusal> {
        let mut t = self.lock();
        let v = t.registrations.check(&Source::of(ip), now);
        self.metrics
            .set_tracked_sources(t.registrations.len().max(t.new_names.len()));
        match v {
            Verdict::Allowed => Ok(()),
            Verdict::Limited => Err(self.refused(SourceRefusal::Registrations(limit))),
            Verdict::Untracked => Err(self.refused(SourceRefusal::Untracked)),
        }
    }

    /// Counts a name bound for the first time from `ip` at `now`.
    pub fn new_name(&self, ip: IpAddr, now: Instant, limit: u32) -> Result<(), SourceRefusal> {
        let mut t = self.lock();
        let v = t.new_names.check(&Source::of(ip), now);
        self.metrics
            .set_tracked_sources(t.registrations.len().max(t.new_names.len()));
        match v {
            Verdict::Allowed => Ok(()),
            Verdict::Limited => Err(self.refused(SourceRefusal::NewNames(limit))),
            Verdict::Untracked => Err(self.refused(SourceRefusal::Untracked)),
        }
    }

    fn refused(&self, why: SourceRefusal) -> SourceRefusal {
        self.metrics.refused(match why {
            SourceRefusal::Registrations(_) => Refusal::RegistrationRate,
            SourceRefusal::NewNames(_) => Refusal::NewNameRate,
            SourceRefusal::Untracked => Refusal::TooManySources,
        });
        why
    }
}

/// `configured` connections, capped so that they and [`FD_HEADROOM`] fit in `nofile`
/// descriptors. Returns the limit in force and whether it was capped.
pub fn cap_connections(configured: usize, nofile: u64) -> (usize, bool) {
    let room = usize::try_from(nofile.saturating_sub(FD_HEADROOM))
        .unwrap_or(usize::MAX)
        .max(1);
    if configured > room {
        (room, true)
    } else {
        (configured, false)
    }
}

/// The process's soft open-file limit, if it can be read.
pub fn nofile_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft)
}

/// Whether an accept error means the process (`EMFILE`) or the system (`ENFILE`) is out of
/// descriptors. (The numbers are the same on Linux, the BSDs and macOS.)
pub fn is_out_of_fds(e: &std::io::Error) -> bool {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(e.raw_os_error(), Some(ENFILE | EMFILE))
}

/// One descriptor held open so that, when the process runs out, it can be closed to accept
/// a waiting connection and tell it "server full" (rather than leave it in the backlog, where
/// the listener stays readable and the accept loop would spin).
#[derive(Debug)]
pub struct FdReserve(Option<File>);

impl FdReserve {
    /// Opens the reserve (`/dev/null`); without one, connections wait in the backlog.
    pub fn new() -> Self {
        Self(File::open("/dev/null").ok())
    }

    /// Frees the reserved descriptor; returns whether there was one.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes a descriptor again, if one is free; returns whether the reserve is held.
    pub fn restore(&mut self) -> bool {
        if self.0.is_none() {
            self.0 = File::open("/dev/null").ok();
        }
        self.0.is_some()
    }
}

impl Default for FdReserve {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(Source::of(a), Source::of(b));
        assert_ne!(Source::of(a), Source::of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(Source::of(mapped), Source::of("192.0.2.7".parse().expect("ip")));
    }

    #[test]
    fn a_window_allows_its_limit_then_refuses_until_it_rolls_over() {
        let t0 = Instant::now();
        let mut w = RateWindows::new(2, Duration::from_secs(60), 10);
        assert_eq!(w.check(&1, t0), Verdict::Allowed);
        assert_eq!(w.check(&1, t0), Verdict::Allowed);
        assert_eq!(w.check(&1, t0 + Duration::from_secs(59)), Verdict::Limited);
        assert_eq!(w.check(&2, t0), Verdict::Allowed, "keys are independent");
        assert_eq!(w.check(&1, t0 + Duration::from_secs(60)), Verdict::Allowed);
    }

    #[test]
    fn a_full_table_refuses_new_keys_until_windows_expire() {
        let t0 = Instant::now();
        let mut w = RateWindows::new(5, Duration::from_secs(60), 2);
        w.check(&1, t0);
        w.check(&2, t0);
        assert_eq!(w.check(&3, t0), Verdict::Untracked);
        assert_eq!(w.check(&1, t0), Verdict::Allowed, "tracked keys go on");
        assert_eq!(w.check(&3, t0 + Duration::from_secs(61)), Verdict::Allowed);
        assert!(w.len() <= 2);
    }

    #[test]
    fn connections_per_source_are_counted_and_freed() {
        let limits = Limits {
            max_connections_per_ip: 2,
            ..Limits::default()
        };
        let s = SourceLimits::new(&limits, Metrics::new());
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let a = s.admit(ip).expect("first");
        let _b = s.admit(ip).expect("second");
        assert!(s.admit(ip).is_none());
        assert!(s.admit("192.0.2.2".parse().expect("ip")).is_some());
        drop(a);
        assert_eq!(s.connections_from(ip), 1);
        assert!(s.admit(ip).is_some());
    }

    #[test]
    fn connections_are_capped_below_the_descriptor_limit() {
        assert_eq!(cap_connections(100_000, 1024), (1024 - FD_HEADROOM as usize, true));
        assert_eq!(cap_connections(100, 1_048_576), (100, false));
        assert_eq!(cap_connections(100, 10), (1, true));
    }
}
