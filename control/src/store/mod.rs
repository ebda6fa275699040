//! The store owns weir-control's persistent state: a flat key space of
//! objects (JSON under `/<group>/<kind>/…` keys), one store-wide revision
//! bumped by every write, compare-and-swap transactions on a key's mod
//! revision, and watches that resume from a revision.
//!
//! The trait is shaped after etcd's KV/Watch model (mod and create
//! revisions, compaction) so that the embedded redb backend and the etcd
//! backend behave the same under one shared test suite.

pub mod etcd;
mod redb;
#[cfg(test)]
mod tests;

use std::future::Future;

use tokio::sync::mpsc;

pub use self::etcd::EtcdStore;
pub use self::redb::RedbStore;

/// A key with its value and the revisions that created and last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The full key, e.g. `/core/pods/default/web-0`.
    pub key: String,
    /// The stored bytes (JSON for objects).
    pub value: Vec<u8>,
    /// Revision of the last write to this key (its `resourceVersion`).
    pub mod_revision: u64,
    /// Revision of the write that created this key.
    pub create_revision: u64,
}

/// What a watch event did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or overwritten.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change to one key, as delivered by [`Store::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// For a put, the new key-value; for a delete, the last value with the
    /// delete's revision as `mod_revision`.
    pub kv: KeyValue,
    /// The key-value before this change, if the key existed.
    pub prev: Option<KeyValue>,
}

impl Event {
    /// The store revision of the transaction that made this change.
    pub fn revision(&self) -> u64 {
        self.kv.mod_revision
    }
}

/// A condition on one key that must hold for a transaction to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// The key must not exist (create).
    Absent,
    /// The key must exist with exactly this mod revision (update/delete).
    ModRevision(u64),
    /// No condition.
    Any,
}

/// One write in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or overwrite `key`.
    Put {
        /// Key to write.
        key: String,
        /// Bytes to store.
        value: Vec<u8>,
    },
    /// Delete `key`; a no-op if it is absent.
    Delete {
        /// Key to delete.
        key: String,
    },
}

impl Op {
    /// The key this op writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// Outcome of [`Store::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every compare held and the ops were applied.
    pub succeeded: bool,
    /// The store revision after the transaction (the current one if it
    /// failed or changed nothing).
    pub revision: u64,
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The events a watch asked for are gone; the client must re-list.
    #[error("watch from revision {requested}: compacted up to revision {compacted}, re-list")]
    Compacted {
        /// The revision the watch started from.
        requested: u64,
        /// The revision up to which the event log was compacted.
        compacted: u64,
    },
    /// A compaction asked for a revision the store has not reached.
    #[error("compact to revision {requested}: store is only at revision {current}")]
    FutureRevision {
        /// The revision asked for.
        requested: u64,
        /// The store's current revision.
        current: u64,
    },
    /// A transaction wrote the same key twice (etcd refuses this too).
    #[error("txn writes key {key} more than once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// A prefix scan must end in `/` so `default/` never matches `default2/`.
    #[error("prefix {prefix:?} does not end in '/'")]
    InvalidPrefix {
        /// The refused prefix.
        prefix: String,
    },
    /// The backend failed.
    #[error("{op} on {target}: {reason}")]
    Backend {
        /// What the store was doing.
        op: &'static str,
        /// What it was doing it on (a file, a key, a revision).
        target: String,
        /// The backend's error.
        reason: String,
    },
    /// Stored bytes could not be decoded.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// Which record.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store was shut down while the operation was in flight.
    #[error("store {target} is closed")]
    Closed {
        /// The store (its path or endpoints).
        target: String,
    },
}

/// Checks that a prefix scan cannot match a sibling with a longer name.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() || prefix.ends_with('/') {
        Ok(())
    } else {
        Err(StoreError::InvalidPrefix {
            prefix: prefix.to_owned(),
        })
    }
}

/// Checks that no key is written twice in one transaction.
pub(crate) fn check_ops(ops: &[Op]) -> Result<(), StoreError> {
    let mut keys: Vec<&str> = ops.iter().map(Op::key).collect();
    keys.sort_unstable();
    match keys.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(StoreError::DuplicateKey {
            key: w[0].to_owned(),
        }),
        None => Ok(()),
    }
}

/// The receiving end of a watch: events in revision order, or one error
/// (e.g. [`StoreError::Compacted`]) after which the stream ends.
pub type WatchReceiver = mpsc::Receiver<Result<Event, StoreError>>;

/// Versioned key-value storage for the control plane's objects.
///
/// Every transaction that changes something bumps one store-wide revision;
/// all events of a transaction carry that revision.
pub trait Store: Send + Sync + 'static {
    /// The current value of `key`, if any.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Keys under `prefix` (which must end in `/`, or be empty for all keys)
    /// in key order, with the revision the read was at.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<KeyValue>, u64), StoreError>> + Send;

    /// Applies `ops` atomically, at one new revision, if every compare holds
    /// (each on its own key); otherwise changes nothing.
    fn txn(
        &self,
        compares: Vec<(String, Compare)>,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<TxnResult, StoreError>> + Send;

    /// Events with revision > `from_revision` for keys under `prefix`:
    /// first those already stored, then live ones, without gaps or
    /// duplicates. Fails with [`StoreError::Compacted`] if the log no longer
    /// holds the events after `from_revision`.
    fn watch(
        &self,
        prefix: &str,
        from_revision: u64,
    ) -> impl Future<Output = Result<WatchReceiver, StoreError>> + Send;

    /// Drops the event history up to and including `revision`; watches from
    /// earlier revisions then fail with [`StoreError::Compacted`].
    fn compact(&self, revision: u64) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The store's current revision.
    fn revision(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
