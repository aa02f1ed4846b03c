//! Where name → key bindings live: one trait, [`NameBackend`], with two implementations.
//!
//! - [`Embedded`] (the default): the [`NameStore`] in this process, durable in the state
//!   directory. A single server needs nothing else.
//! - `cluster::RedisNames` (`natcall-rendezvous --cluster redis://…`): the same bindings,
//!   quotas and expiry in Redis, shared by every node of a cluster, so a name bound through one
//!   node is refused to another key on every other node.
//!
//! Both enforce the same rules: a name belongs to the first key that registers it until it is
//! released or unused for `name_expiry_days`; a key holds at most `max_names_per_key`; the
//! backend holds at most `max_names`; a new binding needs the source's consent (its hourly
//! quota), asked only when the name is in fact new.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use natcall_proto::control::Fingerprint;

use super::store::{Claimed, NameStore};
use super::{RegisterError, lock};

/// A boxed future borrowing the backend (the trait is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Asked once a name turns out to be new: whether its source may bind one more (the per-source
/// hourly quota; counting it is the answer's side effect).
pub type AllowNew<'a> = &'a (dyn Fn() -> Result<(), RegisterError> + Send + Sync);

/// Name bindings, as one server or a cluster keeps them.
pub trait NameBackend: Send + Sync + std::fmt::Debug {
    /// Binds `name` to `fingerprint` at `now` (Unix seconds), or records that its owner used
    /// it. Refused when another key holds it, a quota is reached, or `allow_new` says no for
    /// a new name.
    fn claim<'a>(
        &'a self,
        name: &'a str,
        fingerprint: Fingerprint,
        now: u64,
        allow_new: AllowNew<'a>,
    ) -> BoxFuture<'a, Result<Claimed, RegisterError>>;

    /// Frees `name` if `fingerprint` holds it. Returns whether it did.
    fn release<'a>(&'a self, name: &'a str, fingerprint: Fingerprint) -> BoxFuture<'a, Result<bool, RegisterError>>;

    /// The key `name` is bound to, if any.
    fn owner<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Fingerprint>, RegisterError>>;

    /// Bindings held, and bindings expired since start, as last known (for the metrics).
    fn counts(&self) -> (usize, u64);
}

/// The embedded backend: a [`NameStore`] in this process.
#[derive(Debug)]
pub struct Embedded(Mutex<NameStore>);

impl Embedded {
    /// Wraps an opened store.
    pub fn new(store: NameStore) -> Self {
        Self(Mutex::new(store))
    }
}

impl NameBackend for Embedded {
    fn claim<'a>(
        &'a self,
        name: &'a str,
        fingerprint: Fingerprint,
        now: u64,
        allow_new: AllowNew<'a>,
    ) -> BoxFuture<'a, Result<Claimed, RegisterError>> {
        let claimed = lock(&self.0).claim(name, fingerprint, now, allow_new);
        Box::pin(std::future::ready(claimed))
    }

    fn release<'a>(&'a self, name: &'a str, fingerprint: Fingerprint) -> BoxFuture<'a, Result<bool, RegisterError>> {
        let freed = lock(&self.0).release(name, fingerprint).map_err(RegisterError::from);
        Box::pin(std::future::ready(freed))
    }

    fn owner<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Fingerprint>, RegisterError>> {
        let owner = lock(&self.0).binding(name).map(|b| b.fingerprint);
        Box::pin(std::future::ready(Ok(owner)))
    }

    fn counts(&self) -> (usize, u64) {
        let store = lock(&self.0);
        (store.len(), store.expired_total())
    }
}
