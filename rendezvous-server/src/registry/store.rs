//! Name → key bindings: who owns which name, since when it was last used, and the quotas.
//!
//! In memory, or durable in a [`StateDir`] as two files:
//! - `names.v2`, a snapshot: a header line, then one `name fingerprint last_used` line per
//!   binding (`last_used` in Unix seconds). It is only ever replaced whole: written to
//!   `names.v2.tmp`, fsynced, renamed over the old one, and the directory fsynced;
//! - `names.v2.journal`, the changes since the snapshot, one line each: `bind name fp t`,
//!   `free name`, `use name t`. A new binding or a release is fsynced before the peer is
//!   answered; a `use` (the last-used time, written at most once an hour per name) is written
//!   but not fsynced: after a kill -9 the kernel still has it, after a power loss the name
//!   may expire an hour early.
//!
//! Loading reads the snapshot, then replays the journal (a torn last line, which was never
//! acknowledged, is ignored), drops the expired bindings and writes a fresh snapshot. The
//! journal is folded into a new snapshot whenever it has more lines than there are bindings
//! (at least [`MIN_COMPACT_LINES`]), so each change costs O(1) amortized.
//!
//! Expiry: a binding not used for `expiry` is free. An expired name is freed when someone
//! claims it, and every expired binding when a limit (total or per key) is reached, when the
//! journal is compacted, and at load.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use natcall_proto::control::Fingerprint;
use tracing::{info, warn};

use super::RegisterError;
use crate::config::StateDir;

/// The snapshot's file name in the state directory.
pub const SNAPSHOT: &str = "names.v2";
/// The journal's file name in the state directory.
pub const JOURNAL: &str = "names.v2.journal";
const HEADER: &str = "natcall-rendezvous names v2";
/// The journal is compacted once it has more lines than this and than there are bindings.
pub const MIN_COMPACT_LINES: usize = 1024;
/// A name's last-used time is written again only when it is older than this (seconds).
pub const TOUCH_GRANULARITY_SECS: u64 = 3600;
/// The fewest seconds between two sweeps for expired bindings on reaching a limit.
const SWEEP_INTERVAL_SECS: u64 = 60;

/// One name's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// The key that owns the name.
    pub fingerprint: Fingerprint,
    /// When the name was last registered (Unix seconds).
    pub last_used: u64,
}

/// What a successful claim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The key already held the name.
    Held,
    /// The name was free (or expired) and is now the key's.
    New,
}

/// Name → key bindings with quotas and expiry, in memory or in a state directory.
#[derive(Debug)]
pub struct NameStore {
    bindings: HashMap<String, Binding>,
    per_key: HashMap<Fingerprint, usize>,
    disk: Option<Disk>,
    max: usize,
    max_per_key: usize,
    expiry_secs: u64,
    last_sweep: u64,
    expired_total: u64,
}

#[derive(Debug)]
struct Disk {
    dir: PathBuf,
    journal: File,
    journal_lines: usize,
}

/// The quotas and expiry a store enforces.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Bindings in all.
    pub max: usize,
    /// Bindings per key.
    pub max_per_key: usize,
    /// A binding unused this long (seconds) is free.
    pub expiry_secs: u64,
}

impl NameStore {
    /// Opens the store in `dir` (creating it), or in memory when `None`. `now` is Unix seconds.
    pub fn open(dir: Option<&StateDir>, limits: StoreLimits, now: u64) -> io::Result<Self> {
        let mut store = Self {
            bindings: HashMap::new(),
            per_key: HashMap::new(),
            disk: None,
            max: limits.max,
            max_per_key: limits.max_per_key,
            expiry_secs: limits.expiry_secs,
            last_sweep: now,
            expired_total: 0,
        };
        let Some(dir) = dir else {
            return Ok(store);
        };
        // Each error names the file it concerns (the caller names the directory).
        dir.create()?;
        let snapshot = dir.file(SNAPSHOT);
        let journal = dir.file(JOURNAL);
        let mut found = false;
        if let Some(f) = open_existing(&snapshot)? {
            load_snapshot(BufReader::new(f), &snapshot, &mut store.bindings).map_err(naming(&snapshot))?;
            found = true;
        }
        if let Some(f) = open_existing(&journal)? {
            replay_journal(BufReader::new(f), &journal, &mut store.bindings).map_err(naming(&journal))?;
            found = true;
        }
        if let (false, Some(legacy)) = (found, dir.legacy_names()) {
            if let Some(f) = open_existing(legacy)? {
                load_legacy(BufReader::new(f), legacy, now, &mut store.bindings).map_err(naming(legacy))?;
                info!(file = %legacy.display(), names = store.bindings.len(), "imported the names of the old state_file");
            }
        }
        store.per_key = count_per_key(&store.bindings);
        store.sweep(now);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal)
            .map_err(naming(&journal))?;
        store.disk = Some(Disk {
            dir: dir.path().to_owned(),
            journal: file,
            journal_lines: 0,
        });
        store.compact().map_err(naming(&snapshot))?;
        Ok(store)
    }

    /// Number of bindings (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.bindings.len()
    }

    /// Whether there are no bindings.
    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// Bindings expired (and freed) since the store was opened.
    pub fn expired_total(&self) -> u64 {
        self.expired_total
    }

    /// The binding of `name`, expired or not.
    pub fn binding(&self, name: &str) -> Option<Binding> {
        self.bindings.get(name).copied()
    }

    /// Claims `name` for `fingerprint` at `now`: the owner's claim records the time; a free or
    /// expired name is bound if `allow_new` agrees (the per-source quota) and no quota is
    /// reached. A new binding is durable when this returns.
    pub fn claim(
        &mut self,
        name: &str,
        fingerprint: Fingerprint,
        now: u64,
        allow_new: impl FnOnce() -> Result<(), RegisterError>,
    ) -> Result<Claimed, RegisterError> {
        if let Some(b) = self.bindings.get(name).copied() {
            if b.fingerprint == fingerprint {
                self.touch(name, now)?;
                return Ok(Claimed::Held);
            }
            if !self.expired(&b, now) {
                return Err(RegisterError::NameTaken(name.to_owned()));
            }
            self.expire(name)?;
        }
        if self.bindings.len() >= self.max || self.keys_names(&fingerprint) >= self.max_per_key {
            self.sweep_throttled(now)?;
        }
        if self.bindings.len() >= self.max {
            return Err(RegisterError::Full(self.max));
        }
        if self.keys_names(&fingerprint) >= self.max_per_key {
            return Err(RegisterError::KeyQuota(self.max_per_key));
        }
        allow_new()?;
        self.append(&format!("bind {name} {fingerprint} {now}"), true)?;
        self.bindings.insert(
            name.to_owned(),
            Binding {
                fingerprint,
                last_used: now,
            },
        );
        *self.per_key.entry(fingerprint).or_default() += 1;
        self.compact_if_long();
        Ok(Claimed::New)
    }

    /// Frees `name` if `fingerprint` holds it; durable when this returns `Ok(true)`.
    pub fn release(&mut self, name: &str, fingerprint: Fingerprint) -> io::Result<bool> {
        if self.bindings.get(name).is_none_or(|b| b.fingerprint != fingerprint) {
            return Ok(false);
        }
        self.append(&format!("free {name}"), true)?;
        self.remove(name);
        self.compact_if_long();
        Ok(true)
    }

    fn keys_names(&self, fingerprint: &Fingerprint) -> usize {
        self.per_key.get(fingerprint).copied().unwrap_or(0)
    }

    fn expired(&self, b: &Binding, now: u64) -> bool {
        now >= b.last_used.saturating_add(self.expiry_secs)
    }

    fn touch(&mut self, name: &str, now: u64) -> io::Result<()> {
        let Some(b) = self.bindings.get(name) else {
            return Ok(());
        };
        if now < b.last_used.saturating_add(TOUCH_GRANULARITY_SECS) {
            return Ok(());
        }
        self.append(&format!("use {name} {now}"), false)?;
        if let Some(b) = self.bindings.get_mut(name) {
            b.last_used = now;
        }
        self.compact_if_long();
        Ok(())
    }

    fn remove(&mut self, name: &str) {
        if let Some(b) = self.bindings.remove(name) {
            if let Some(n) = self.per_key.get_mut(&b.fingerprint) {
                *n -= 1;
                if *n == 0 {
                    self.per_key.remove(&b.fingerprint);
                }
            }
        }
    }

    fn expire(&mut self, name: &str) -> io::Result<()> {
        self.append(&format!("free {name}"), true)?;
        info!(name, "name binding expired; the name is free again");
        self.remove(name);
        self.expired_total += 1;
        self.compact_if_long();
        Ok(())
    }

    /// Frees every expired binding, at most once per [`SWEEP_INTERVAL_SECS`].
    fn sweep_throttled(&mut self, now: u64) -> io::Result<()> {
        if now < self.last_sweep.saturating_add(SWEEP_INTERVAL_SECS) {
            return Ok(());
        }
        if self.sweep(now) > 0 {
            self.compact()?;
        }
        Ok(())
    }

    /// Frees every expired binding in memory (the caller writes a snapshot); returns how many.
    fn sweep(&mut self, now: u64) -> usize {
        self.last_sweep = now;
        let expired: Vec<String> = self
            .bindings
            .iter()
            .filter(|(_, b)| self.expired(b, now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &expired {
            self.remove(name);
        }
        self.expired_total += expired.len() as u64;
        if !expired.is_empty() {
            info!(names = expired.len(), "expired name bindings freed");
        }
        expired.len()
    }

    /// Appends a journal line (fsynced when `durable`).
    fn append(&mut self, line: &str, durable: bool) -> io::Result<()> {
        let Some(disk) = &mut self.disk else {
            return Ok(());
        };
        // One write of a whole line: a kill -9 leaves it whole or absent.
        disk.journal.write_all(format!("{line}\n").as_bytes())?;
        if durable {
            disk.journal.sync_data()?;
        }
        disk.journal_lines += 1;
        Ok(())
    }

    /// After a change is in memory and in the journal: folds a long journal into a snapshot.
    /// A failure only leaves the journal longer (it still holds every change), so it is logged.
    fn compact_if_long(&mut self) {
        let Some(disk) = &self.disk else {
            return;
        };
        if disk.journal_lines > MIN_COMPACT_LINES.max(self.bindings.len()) {
            if let Err(e) = self.compact() {
                warn!(error = %e, "cannot compact the name journal; it keeps growing");
            }
        }
    }

    /// Writes every binding to a new snapshot atomically, then empties the journal.
    fn compact(&mut self) -> io::Result<()> {
        let Some(disk) = &mut self.disk else {
            return Ok(());
        };
        let tmp = disk.dir.join(format!("{SNAPSHOT}.tmp"));
        let mut text = String::with_capacity(self.bindings.len() * 110 + HEADER.len() + 1);
        text.push_str(HEADER);
        text.push('\n');
        for (name, b) in &self.bindings {
            text.push_str(&format!("{name} {} {}\n", b.fingerprint, b.last_used));
        }
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, disk.dir.join(SNAPSHOT))?;
        File::open(&disk.dir)?.sync_all()?;
        // Only now may the journal go: until the rename, the old snapshot plus the journal is
        // the state; after it, replaying the journal onto the new snapshot changes nothing.
        disk.journal.set_len(0)?;
        disk.journal.sync_all()?;
        disk.journal_lines = 0;
        Ok(())
    }
}

/// The file at `path`, `None` when there is none; an error names the path.
fn open_existing(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(naming(path)(e)),
    }
}

/// Turns an error about `path` into one that names it (unless it already does).
fn naming(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| {
        let shown = path.display().to_string();
        if e.to_string().contains(&shown) {
            e
        } else {
            io::Error::new(e.kind(), format!("{shown}: {e}"))
        }
    }
}

fn count_per_key(bindings: &HashMap<String, Binding>) -> HashMap<Fingerprint, usize> {
    let mut m = HashMap::new();
    for b in bindings.values() {
        *m.entry(b.fingerprint).or_default() += 1;
    }
    m
}

fn invalid(path: &Path, line: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}:{line}: expected {what}", path.display()),
    )
}

fn load_snapshot(r: impl BufRead, path: &Path, out: &mut HashMap<String, Binding>) -> io::Result<()> {
    let mut lines = r.lines();
    match lines.next().transpose()? {
        Some(h) if h == HEADER => {}
        _ => return Err(invalid(path, 1, &format!("the header `{HEADER}`"))),
    }
    for (i, line) in lines.enumerate() {
        let line = line?;
        let mut f = line.split(' ');
        let parsed = (|| {
            let name = f.next()?;
            let fingerprint = f.next()?.parse().ok()?;
            let last_used = f.next()?.parse().ok()?;
            f.next().is_none().then_some((name, Binding { fingerprint, last_used }))
        })();
        let (name, b) = parsed.ok_or_else(|| invalid(path, i + 2, "`name fingerprint last_used`"))?;
        out.insert(name.to_owned(), b);
    }
    Ok(())
}

fn replay_journal(mut r: impl BufRead, path: &Path, out: &mut HashMap<String, Binding>) -> io::Result<()> {
    let mut n = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        n += 1;
        let Some(text) = line.strip_suffix('\n') else {
            // Torn by a crash mid-write: never acknowledged, so never relied upon.
            warn!(file = %path.display(), line = n, "ignoring a torn last journal line");
            return Ok(());
        };
        let f: Vec<&str> = text.split(' ').collect();
        let ok = match f.as_slice() {
            ["bind", name, fp, t] => match (fp.parse(), t.parse()) {
                (Ok(fingerprint), Ok(last_used)) => {
                    out.insert((*name).to_owned(), Binding { fingerprint, last_used });
                    true
                }
                _ => false,
            },
            ["use", name, t] => match (out.get_mut(*name), t.parse()) {
                (Some(b), Ok(t)) => {
                    b.last_used = t;
                    true
                }
                (None, Ok(_)) => true,
                _ => false,
            },
            ["free", name] => {
                out.remove(*name);
                true
            }
            [""] => true,
            _ => false,
        };
        if !ok {
            return Err(invalid(path, n, "`bind name fp t`, `use name t` or `free name`"));
        }
    }
}

/// The old `state_file`: `name fingerprint` lines, the first binding of a name winning.
fn load_legacy(r: impl BufRead, path: &Path, now: u64, out: &mut HashMap<String, Binding>) -> io::Result<()> {
    for (i, line) in r.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let (name, fp) = line
            .split_once(' ')
            .and_then(|(n, fp)| Some((n, fp.trim().parse::<Fingerprint>().ok()?)))
            .ok_or_else(|| invalid(path, i + 1, "`name fingerprint`"))?;
        out.entry(name.to_owned()).or_insert(Binding {
            fingerprint: fp,
            last_used: now,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;
    const T0: u64 = 1_800_000_000;

    fn limits() -> StoreLimits {
        StoreLimits {
            max: 100,
            max_per_key: 3,
            expiry_secs: 180 * DAY,
        }
    }

    fn fp(b: u8) -> Fingerprint {
        Fingerprint([b; 32])
    }

    fn ok() -> Result<(), RegisterError> {
        Ok(())
    }

    fn claim(s: &mut NameStore, name: &str, key: u8, now: u64) -> Result<Claimed, RegisterError> {
        s.claim(name, fp(key), now, ok)
    }

    #[test]
    fn bindings_and_last_used_times_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("state"));
        let mut s = NameStore::open(Some(&state), limits(), T0).expect("opens");
        assert_eq!(claim(&mut s, "alice", 1, T0).expect("new"), Claimed::New);
        assert_eq!(claim(&mut s, "alice", 1, T0 + 2 * 3600).expect("held"), Claimed::Held);
        drop(s); // no compaction on drop: the journal carries both lines
        let s = NameStore::open(Some(&state), limits(), T0 + 3 * 3600).expect("reopens");
        assert_eq!(
            s.binding("alice"),
            Some(Binding {
                fingerprint: fp(1),
                last_used: T0 + 2 * 3600
            })
        );
    }

    #[test]
    fn a_torn_last_journal_line_is_ignored_and_earlier_lines_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        drop(NameStore::open(Some(&state), limits(), T0).expect("opens"));
        let journal = format!("bind alice {} {T0}\nbind bob {}", fp(1), fp(2));
        std::fs::write(state.file(JOURNAL), journal).expect("writes");
        let s = NameStore::open(Some(&state), limits(), T0).expect("reopens");
        assert_eq!(s.binding("alice").map(|b| b.fingerprint), Some(fp(1)));
        assert_eq!(s.binding("bob"), None);
        assert_eq!(
            std::fs::read_to_string(state.file(JOURNAL)).expect("reads"),
            "",
            "compacted at open"
        );
    }

    #[test]
    fn an_unused_name_expires_and_another_key_may_take_it() {
        let mut s = NameStore::open(None, limits(), T0).expect("opens");
        claim(&mut s, "frank", 1, T0).expect("new");
        let e = claim(&mut s, "frank", 2, T0 + 179 * DAY).expect_err("still frank's");
        assert!(matches!(e, RegisterError::NameTaken(_)), "{e}");
        assert_eq!(
            claim(&mut s, "frank", 2, T0 + 180 * DAY).expect("expired"),
            Claimed::New
        );
        assert_eq!(s.expired_total(), 1);
        assert_eq!(s.binding("frank").map(|b| b.fingerprint), Some(fp(2)));
    }

    #[test]
    fn registering_again_postpones_expiry() {
        let mut s = NameStore::open(None, limits(), T0).expect("opens");
        claim(&mut s, "frank", 1, T0).expect("new");
        claim(&mut s, "frank", 1, T0 + 100 * DAY).expect("held");
        let e = claim(&mut s, "frank", 2, T0 + 200 * DAY).expect_err("used 100 days ago");
        assert!(matches!(e, RegisterError::NameTaken(_)), "{e}");
    }

    #[test]
    fn a_key_holds_at_most_its_quota_until_one_is_released_or_expires() {
        let mut s = NameStore::open(None, limits(), T0).expect("opens");
        for n in ["a", "b", "c"] {
            claim(&mut s, n, 1, T0).expect("within quota");
        }
        let e = claim(&mut s, "d", 1, T0).expect_err("over quota");
        assert!(matches!(e, RegisterError::KeyQuota(3)), "{e}");
        claim(&mut s, "d", 2, T0).expect("another key is not limited by it");
        assert!(s.release("a", fp(1)).expect("releases"));
        assert!(!s.release("b", fp(2)).expect("not its name"));
        claim(&mut s, "d2", 1, T0).expect("a slot was freed");
        let later = T0 + 181 * DAY;
        claim(&mut s, "e", 1, later).expect("its old names expired");
    }

    #[test]
    fn the_source_quota_is_asked_only_for_new_names() {
        let mut s = NameStore::open(None, limits(), T0).expect("opens");
        claim(&mut s, "alice", 1, T0).expect("new");
        let refuse = || Err(RegisterError::SourceQuota(0));
        assert_eq!(s.claim("alice", fp(1), T0, refuse).expect("held"), Claimed::Held);
        let e = s.claim("bob", fp(1), T0, refuse).expect_err("new name");
        assert!(matches!(e, RegisterError::SourceQuota(0)), "{e}");
        assert_eq!(s.binding("bob"), None);
    }

    #[test]
    fn the_old_state_file_is_imported_once_into_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let legacy = dir.path().join("names");
        std::fs::write(&legacy, format!("alice {}\nalice {}\n", fp(1), fp(2))).expect("writes");
        let state = crate::Config {
            state_file: Some(legacy.clone()),
            ..crate::Config::default()
        }
        .state_dir()
        .expect("a state dir");
        assert_eq!(state.path(), dir.path());
        let mut s = NameStore::open(Some(&state), limits(), T0).expect("imports");
        assert_eq!(s.binding("alice").map(|b| b.fingerprint), Some(fp(1)));
        assert!(s.release("alice", fp(1)).expect("releases"));
        drop(s);
        let s = NameStore::open(Some(&state), limits(), T0).expect("reopens");
        assert_eq!(s.binding("alice"), None, "the old file is not imported again");
    }

    #[test]
    fn a_corrupt_snapshot_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        std::fs::write(state.file(SNAPSHOT), format!("{HEADER}\nalice not-a-key 5\n")).expect("writes");
        let e = NameStore::open(Some(&state), limits(), T0).expect_err("corrupt");
        assert!(
            e.to_string()
                .contains("names.v2:2: expected `name fingerprint last_used`"),
            "{e}"
        );
    }

    #[test]
    fn the_journal_is_folded_into_the_snapshot_when_it_grows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        let mut s = NameStore::open(
            Some(&state),
            StoreLimits {
                max: 10_000,
                max_per_key: 10_000,
                expiry_secs: 180 * DAY,
            },
            T0,
        )
        .expect("opens");
        for i in 0..10 {
            claim(&mut s, &format!("n{i}"), 1, T0).expect("new");
        }
        for h in 1..=MIN_COMPACT_LINES as u64 {
            claim(&mut s, "n0", 1, T0 + h * TOUCH_GRANULARITY_SECS).expect("held");
        }
        let journal = std::fs::read_to_string(state.file(JOURNAL)).expect("reads");
        assert!(
            journal.lines().count() < 10,
            "compacted: {} lines",
            journal.lines().count()
        );
        drop(s);
        let s = NameStore::open(Some(&state), limits(), T0).expect("reopens");
        let last = T0 + MIN_COMPACT_LINES as u64 * TOUCH_GRANULARITY_SECS;
        assert_eq!(s.binding("n0").map(|b| b.last_used), Some(last));
        assert_eq!(s.len(), 10);
    }
}
