//! [`Contacts`]: the keys this peer has met, trust on first use (like SSH's `known_hosts` and
//! Signal's safety numbers). A server vouches for the other side's key on every call; once a
//! name's key is stored here, a call where the server vouches for another key is refused
//! ([`Error::KeyChanged`](crate::Error::KeyChanged)) until the user accepts the new key. A
//! malicious server can then fake only a first contact.
//!
//! Flow, for an endpoint configured with contacts ([`crate::EndpointConfig::contacts`]):
//! 1. the callee, when the application accepts an offer, and the caller, when the server's
//!    `Start` arrives, compare the key the server vouched for with the stored one
//!    ([`Contacts::check`]); a different key refuses the call before any QUIC or media (the
//!    callee declines the offer, the caller hangs up);
//! 2. once QUIC connected (the peer proved it holds that key), the key is recorded
//!    ([`Contacts::record`]): stored on first contact, `last_seen` updated otherwise.
//!
//! # The file
//! `contacts.toml` in the peer's home directory (TOML: the peer's `config.toml` is TOML too,
//! and a user can read, diff and hand-edit it), mode 0600:
//!
//! ```toml
//! version = 1
//!
//! [[contact]]
//! server = "rendezvous.example.net:3478"
//! name = "bob"
//! fingerprint = "5e6f7a8b…"  # 64 hex digits: SHA-256 of bob's certificate
//! first_seen = "2026-12-02T06:30:00Z"
//! last_seen = "2026-12-02T07:10:12Z"
//! trust = "first-use"        # or "accepted": the user accepted a changed key
//! ```
//!
//! Names belong to a server (a `bob` on another server is another person), so each entry
//! carries the server as the application names it ([`Contacts::new`]'s `server`).
//!
//! # Concurrency
//! Several `natcall` processes may share one home. Every change takes an exclusive `flock` on
//! `contacts.lock` (released by the kernel if the process dies), re-reads the file, changes it,
//! and replaces it atomically (a temporary file, `fsync`, `rename`): a reader never sees half a
//! file and no process's change is lost. Reads take no lock.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use natcall_proto::control::Fingerprint;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::info;

use crate::Error;

/// The contacts file's name in the home directory.
pub const CONTACTS_FILE: &str = "contacts.toml";
/// Held (flock) while the contacts file is rewritten.
const LOCK_FILE: &str = "contacts.lock";
/// The file format's version.
const VERSION: u32 = 1;

/// How a contact's key came to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Trust {
    /// Stored on the first call with that name.
    FirstUse,
    /// The user accepted it (`natcall contacts accept`), replacing or before any call.
    Accepted,
}

impl std::fmt::Display for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trust::FirstUse => "first-use",
            Trust::Accepted => "accepted",
        })
    }
}

/// A peer this peer has met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The server the name belongs to.
    pub server: String,
    /// The peer's name on that server.
    pub name: String,
    /// The peer's key.
    pub fingerprint: Fingerprint,
    /// When this key was first met (or accepted); whole seconds.
    pub first_seen: SystemTime,
    /// When a call with this key last connected (or it was accepted); whole seconds.
    pub last_seen: SystemTime,
    /// How the key came to be trusted.
    pub trust: Trust,
}

/// What the contacts say about a name and a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Never met under this name on this server.
    First,
    /// Met before with this key.
    Known(Contact),
    /// Met before with another key (the stored contact).
    Changed(Contact),
}

/// The contacts file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContactsError {
    /// Reading, writing or locking failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a contacts file this version understands.
    #[error(
        "{} is not a valid contacts file: {reason}; fix it, or move it away to meet every contact anew",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// A name's key changed: what [`Error::KeyChanged`](crate::Error::KeyChanged) carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The stored contact (its key is the one met before).
    pub known: Contact,
    /// The key the server vouches for now.
    pub offered: Fingerprint,
}

impl std::fmt::Display for KeyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = &self.known.name;
        write!(
            f,
            "WARNING: the key of {name} changed. The server {} vouches for key {}…, but you met {name} \
             with key {}… (first seen {}). The call was refused: it may be a new device, or someone \
             posing as {name}. Compare safety numbers with {name} in person or by phone \
             (`natcall verify {name} --key {}`); to accept the new key: \
             `natcall contacts accept {name} {}`",
            self.known.server,
            self.offered.short(),
            self.known.fingerprint.short(),
            format_time(self.known.first_seen),
            self.offered,
            self.offered,
        )
    }
}

/// The contacts of one peer, for one server: a handle to the file (no I/O until used).
#[derive(Debug, Clone)]
pub struct Contacts {
    path: PathBuf,
    server: String,
}

/// The file as stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Book {
    version: u32,
    #[serde(default, rename = "contact")]
    contacts: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    server: String,
    name: String,
    fingerprint: String,
    first_seen: String,
    last_seen: String,
    trust: Trust,
}

impl Contacts {
    /// The contacts kept in `path`, for names on `server` (as the application names the server,
    /// the same string every time: the CLI gives its `HOST:PORT` label).
    pub fn new(path: impl Into<PathBuf>, server: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            server: server.into(),
        }
    }

    /// The contacts file in the home directory `dir` ([`CONTACTS_FILE`]).
    pub fn in_dir(dir: &Path, server: impl Into<String>) -> Self {
        Self::new(dir.join(CONTACTS_FILE), server)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The server whose names these are.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Every contact in the file, of every server, ordered by server then name.
    pub fn list(&self) -> Result<Vec<Contact>, ContactsError> {
        let mut all = self.load()?;
        all.sort_by(|a, b| (&a.server, &a.name).cmp(&(&b.server, &b.name)));
        Ok(all)
    }

    /// The contact `name` on this server, if met.
    pub fn get(&self, name: &str) -> Result<Option<Contact>, ContactsError> {
        Ok(self.load()?.into_iter().find(|c| self.is(c, name)))
    }

    /// Compares `key` with the one stored for `name`; changes nothing.
    pub fn check(&self, name: &str, key: Fingerprint) -> Result<Seen, ContactsError> {
        Ok(seen(self.get(name)?, key))
    }

    /// A call with `name` holding `key` connected at `now`: a first contact is stored, a known
    /// one's `last_seen` updated; a changed key is left as it was (and reported).
    pub fn record(&self, name: &str, key: Fingerprint, now: SystemTime) -> Result<Seen, ContactsError> {
        let now = whole_seconds(now);
        self.change(|all| {
            let i = all.iter().position(|c| self.is(c, name));
            let before = seen(i.map(|i| all[i].clone()), key);
            match (&before, i) {
                (Seen::First, _) => all.push(Contact {
                    server: self.server.clone(),
                    name: name.to_owned(),
                    fingerprint: key,
                    first_seen: now,
                    last_seen: now,
                    trust: Trust::FirstUse,
                }),
                (Seen::Known(_), Some(i)) => all[i].last_seen = now,
                _ => return (before, false),
            }
            (before, true)
        })
    }

    /// The user accepts `key` for `name` (a changed key, or one compared out of band before a
    /// first call); returns the contact it replaced, if any. Accepting the stored key keeps
    /// its first and last seen and marks it accepted.
    pub fn accept(&self, name: &str, key: Fingerprint, now: SystemTime) -> Result<Option<Contact>, ContactsError> {
        let now = whole_seconds(now);
        self.change(|all| {
            let i = all.iter().position(|c| self.is(c, name));
            if let Some(same) = i.map(|i| &mut all[i]).filter(|c| c.fingerprint == key) {
                let before = same.clone();
                same.trust = Trust::Accepted;
                return (Some(before), true);
            }
            let old = i.map(|i| all.remove(i));
            all.push(Contact {
                server: self.server.clone(),
                name: name.to_owned(),
                fingerprint: key,
                first_seen: now,
                last_seen: now,
                trust: Trust::Accepted,
            });
            (old, true)
        })
    }

    /// Forgets `name` (its next call is a first contact again); returns what was stored.
    pub fn forget(&self, name: &str) -> Result<Option<Contact>, ContactsError> {
        self.change(|all| {
            let old = all.iter().position(|c| self.is(c, name)).map(|i| all.remove(i));
            let changed = old.is_some();
            (old, changed)
        })
    }

    fn is(&self, c: &Contact, name: &str) -> bool {
        c.server == self.server && c.name == name
    }

    /// Under the lock: re-reads the file, lets `f` change the contacts (it says whether it did),
    /// and writes them back if so.
    fn change<T>(&self, f: impl FnOnce(&mut Vec<Contact>) -> (T, bool)) -> Result<T, ContactsError> {
        let _lock = self.lock()?;
        let mut all = self.load()?;
        let (out, changed) = f(&mut all);
        if changed {
            self.store(&all)?;
        }
        Ok(out)
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    fn io(&self, action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ContactsError {
        let path = path.to_owned();
        move |source| ContactsError::Io { action, path, source }
    }

    /// An exclusive lock on the lock file, held until the returned file is dropped.
    fn lock(&self) -> Result<std::fs::File, ContactsError> {
        std::fs::create_dir_all(self.dir()).map_err(self.io("create the directory of", &self.path))?;
        let path = self.dir().join(LOCK_FILE);
        let file = crate::file::open_private(&path, false).map_err(self.io("open the lock file", &path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| (self.io("lock", &path))(e.into()))?;
        Ok(file)
    }

    fn load(&self) -> Result<Vec<Contact>, ContactsError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err((self.io("read", &self.path))(e)),
        };
        let corrupt = |reason: String| ContactsError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let book: Book = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            corrupt(match line {
                Some(l) => format!("line {l}: {}", e.message()),
                None => e.message().to_owned(),
            })
        })?;
        if book.version != VERSION {
            return Err(corrupt(format!(
                "version {} (this natcall reads version {VERSION})",
                book.version
            )));
        }
        book.contacts
            .into_iter()
            .map(|e| {
                e.parse()
                    .map_err(|why| corrupt(format!("{} on {}: {why}", e.name, e.server)))
            })
            .collect()
    }

    /// Writes `all` to a temporary file beside the contacts file, syncs it, and renames it over.
    fn store(&self, all: &[Contact]) -> Result<(), ContactsError> {
        let book = Book {
            version: VERSION,
            contacts: all.iter().map(Entry::from).collect(),
        };
        let text = toml::to_string(&book).map_err(|e| ContactsError::Corrupt {
            path: self.path.clone(),
            reason: format!("cannot be encoded: {e}"),
        })?;
        crate::file::replace_private(&self.path, text.as_bytes()).map_err(self.io("write", &self.path))
    }
}

fn seen(stored: Option<Contact>, key: Fingerprint) -> Seen {
    match stored {
        None => Seen::First,
        Some(c) if c.fingerprint == key => Seen::Known(c),
        Some(c) => Seen::Changed(c),
    }
}

impl Entry {
    fn parse(&self) -> Result<Contact, String> {
        let time = |what: &str, s: &str| {
            OffsetDateTime::parse(s, &Rfc3339)
                .map(SystemTime::from)
                .map_err(|e| format!("{what} {s:?} is not an RFC 3339 time: {e}"))
        };
        Ok(Contact {
            server: self.server.clone(),
            name: self.name.clone(),
            fingerprint: self
                .fingerprint
                .parse()
                .map_err(|e| format!("fingerprint {:?}: {e}", self.fingerprint))?,
            first_seen: time("first_seen", &self.first_seen)?,
            last_seen: time("last_seen", &self.last_seen)?,
            trust: self.trust,
        })
    }
}

/// As in the file: `server`, `name`, `fingerprint` (hex), `first_seen` and `last_seen` (RFC 3339),
/// `trust`.
impl Serialize for Contact {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Entry::from(self).serialize(s)
    }
}

impl From<&Contact> for Entry {
    fn from(c: &Contact) -> Self {
        Self {
            server: c.server.clone(),
            name: c.name.clone(),
            fingerprint: c.fingerprint.to_string(),
            first_seen: format_rfc3339(c.first_seen),
            last_seen: format_rfc3339(c.last_seen),
            trust: c.trust,
        }
    }
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

/// `2026-12-02T06:30:00Z`.
fn format_rfc3339(t: SystemTime) -> String {
    // RFC 3339 has four-digit years only: a clock past 9999 is written as the epoch.
    OffsetDateTime::from(whole_seconds(t))
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// `2026-12-02 06:30:00 UTC`, for people.
pub fn format_time(t: SystemTime) -> String {
    format_rfc3339(t).replace('T', " ").replace('Z', " UTC")
}

/// Before a call with `peer` goes on: refuses it if the server vouches for another `key` than
/// the one met before. File I/O runs off the async workers.
pub(crate) async fn screen(contacts: Option<&Contacts>, peer: &str, key: Fingerprint) -> Result<(), Error> {
    let Some(contacts) = contacts.cloned() else {
        return Ok(());
    };
    let name = peer.to_owned();
    match blocking(&contacts.path.clone(), move || contacts.check(&name, key)).await? {
        Seen::Changed(known) => {
            let (known_key, offered) = (known.fingerprint.short(), key.short());
            info!(peer, known = %known_key, offered = %offered, "the peer's key changed: call refused");
            Err(Error::KeyChanged(Box::new(KeyChange { known, offered: key })))
        }
        Seen::First | Seen::Known(_) => Ok(()),
    }
}

/// A call with `peer` connected (QUIC proved it holds `key`): stores a first contact, updates a
/// known one. Refuses the call if meanwhile (another process) another key was stored.
pub(crate) async fn remember(contacts: Option<&Contacts>, peer: &str, key: Fingerprint) -> Result<(), Error> {
    let Some(contacts) = contacts.cloned() else {
        return Ok(());
    };
    let name = peer.to_owned();
    match blocking(&contacts.path.clone(), move || {
        contacts.record(&name, key, SystemTime::now())
    })
    .await?
    {
        Seen::Changed(known) => Err(Error::KeyChanged(Box::new(KeyChange { known, offered: key }))),
        Seen::First => {
            info!(peer, key = %key.short(), "first contact: key stored");
            Ok(())
        }
        Seen::Known(_) => Ok(()),
    }
}

/// Runs `f` (file I/O, perhaps waiting for another process's lock) off the async workers.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, ContactsError> + Send + 'static,
) -> Result<T, Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Error::from),
        // The task panicked or the runtime is shutting down.
        Err(e) => Err(Error::Contacts(ContactsError::Io {
            action: "use",
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(b: u8) -> Fingerprint {
        Fingerprint([b; 32])
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn book(dir: &tempfile::TempDir) -> Contacts {
        Contacts::in_dir(dir.path(), "rendezvous.test:3478")
    }

    #[test]
    fn a_first_contact_is_stored_and_a_matching_key_updates_last_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = book(&dir);
        assert_eq!(c.check("bob", key(1)).expect("reads"), Seen::First);
        assert!(!c.path().exists(), "checking writes nothing");
        assert_eq!(c.record("bob", key(1), at(0)).expect("stores"), Seen::First);
        let Seen::Known(known) = c.record("bob", key(1), at(60)).expect("updates") else {
            panic!("bob is known now");
        };
        assert_eq!(known.first_seen, at(0));
        let bob = c.get("bob").expect("reads").expect("bob");
        assert_eq!(
            (bob.first_seen, bob.last_seen, bob.trust),
            (at(0), at(60), Trust::FirstUse)
        );
        let text = std::fs::read_to_string(c.path()).expect("file");
        assert!(text.contains(&key(1).to_string()), "{text}");
        assert!(text.contains(r#"last_seen = "2027-01-15T08:01:00Z""#), "{text}");
        let mode = std::fs::metadata(c.path()).expect("file").permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }

    #[test]
    fn a_changed_key_is_reported_and_not_stored_until_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = book(&dir);
        c.record("bob", key(1), at(0)).expect("stores");
        let Seen::Changed(known) = c.check("bob", key(2)).expect("reads") else {
            panic!("another key");
        };
        assert_eq!(known.fingerprint, key(1));
        assert!(matches!(
            c.record("bob", key(2), at(5)).expect("reads"),
            Seen::Changed(_)
        ));
        assert_eq!(
            c.get("bob").expect("reads").expect("bob").fingerprint,
            key(1),
            "unchanged"
        );
        let old = c.accept("bob", key(2), at(10)).expect("accepts").expect("replaced");
        assert_eq!(old.fingerprint, key(1));
        let bob = c.get("bob").expect("reads").expect("bob");
        assert_eq!(
            (bob.fingerprint, bob.trust, bob.first_seen),
            (key(2), Trust::Accepted, at(10))
        );
        assert!(matches!(c.check("bob", key(2)).expect("reads"), Seen::Known(_)));
        // Accepting the stored key again keeps when it was first seen.
        c.accept("bob", key(2), at(20)).expect("accepts");
        assert_eq!(c.get("bob").expect("reads").expect("bob").first_seen, at(10));
        assert_eq!(c.forget("bob").expect("forgets").map(|b| b.fingerprint), Some(key(2)));
        assert_eq!(c.check("bob", key(3)).expect("reads"), Seen::First);
        assert_eq!(c.forget("bob").expect("nothing to forget"), None);
    }

    #[test]
    fn the_key_change_message_names_the_peer_both_keys_and_the_command_to_accept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = book(&dir);
        c.record("bob", key(0xaa), at(0)).expect("stores");
        let Seen::Changed(known) = c.check("bob", key(0xbb)).expect("reads") else {
            panic!("another key");
        };
        let text = KeyChange {
            known,
            offered: key(0xbb),
        }
        .to_string();
        assert!(text.contains("the key of bob changed"), "{text}");
        assert!(text.contains("aaaaaaaa") && text.contains("bbbbbbbb"), "{text}");
        assert!(
            text.contains(&format!("natcall contacts accept bob {}", key(0xbb))),
            "{text}"
        );
        assert!(text.contains("rendezvous.test:3478"), "{text}");
    }

    #[test]
    fn a_name_on_another_server_is_another_contact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let here = book(&dir);
        let there = Contacts::in_dir(dir.path(), "elsewhere:3478");
        here.record("bob", key(1), at(0)).expect("stores");
        assert_eq!(there.check("bob", key(2)).expect("reads"), Seen::First);
        there.record("bob", key(2), at(1)).expect("stores");
        let all = here.list().expect("lists");
        let servers: Vec<(&str, Fingerprint)> = all.iter().map(|c| (c.server.as_str(), c.fingerprint)).collect();
        assert_eq!(servers, [("elsewhere:3478", key(2)), ("rendezvous.test:3478", key(1))]);
    }

    #[test]
    fn a_rewrite_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = book(&dir);
        c.record("bob", key(1), at(0)).expect("stores");
        // A reader that opened the file before a rewrite still reads the complete old file.
        let mut old = std::fs::File::open(c.path()).expect("opens");
        c.record("carol", key(2), at(1)).expect("stores");
        let mut before = String::new();
        std::io::Read::read_to_string(&mut old, &mut before).expect("reads");
        let parsed: Book = toml::from_str(&before).expect("the old version is whole");
        assert_eq!(parsed.contacts.len(), 1);
        assert_eq!(c.list().expect("lists").len(), 2);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn concurrent_writers_lose_no_contact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONTACTS_FILE);
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                // Each thread has its own handle and its own lock file descriptor, as processes do.
                let c = Contacts::new(path.clone(), "rendezvous.test:3478");
                std::thread::spawn(move || {
                    for round in 0..5u8 {
                        c.record(&format!("peer{i}-{round}"), key(i), at(u64::from(round)))
                            .expect("stores");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        assert_eq!(book(&dir).list().expect("lists").len(), 40);
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = book(&dir);
        std::fs::write(c.path(), "version = 1\n[[contact]]\nname = 3\n").expect("writes");
        let e = c.check("bob", key(1)).expect_err("corrupt");
        let text = e.to_string();
        assert!(text.contains(&c.path().display().to_string()), "{text}");
        assert!(
            text.contains("is not a valid contacts file") && text.contains("line 3"),
            "{text}"
        );
        // A change does not overwrite what it cannot read.
        assert!(c.record("bob", key(1), at(0)).is_err());
        assert_eq!(
            std::fs::read_to_string(c.path()).expect("file"),
            "version = 1\n[[contact]]\nname = 3\n"
        );

        let bad_key = "version = 1\n[[contact]]\nserver = \"s\"\nname = \"bob\"\nfingerprint = \"abc\"\n\
                       first_seen = \"2026-12-02T06:30:00Z\"\nlast_seen = \"2026-12-02T06:30:00Z\"\ntrust = \"first-use\"\n";
        std::fs::write(c.path(), bad_key).expect("writes");
        let text = c.list().expect_err("bad key").to_string();
        assert!(text.contains("bob on s: fingerprint \"abc\""), "{text}");
        std::fs::write(c.path(), "version = 2\n").expect("writes");
        let text = c.list().expect_err("newer").to_string();
        assert!(text.contains("version 2"), "{text}");
    }
}
