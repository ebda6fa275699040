//! The embedded backend: one redb file holding the keys (`kv_v1`), a
//! durable event log keyed by revision (`log_v1`) that watches replay from,
//! and the store revision and compaction point (`meta_v1`). All writes go
//! through one group-committing writer thread (see `writer`); reads run on
//! tokio's blocking pool in their own read transactions.

mod codec;
#[cfg(test)]
mod tests;
mod writer;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ::redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use self::writer::{Request, Work};
use super::{
    Compare, Event, KeyValue, Op, Store, StoreError, TxnResult, WatchReceiver, check_ops,
    check_prefix,
};

/// key → (create revision, mod revision, value).
const KV: TableDefinition<&str, (u64, u64, &[u8])> = TableDefinition::new("kv_v1");
/// revision → the events of that revision (see `codec`).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log_v1");
/// Store-wide counters.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta_v1");
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// Queued writes before callers wait to enqueue; bounds memory under a flood.
const REQUEST_QUEUE: usize = 4096;
/// Committed transactions kept for live watchers; one that falls further
/// behind catches up from the event log instead.
const LIVE_EVENTS: usize = 1024;
/// Events buffered per watcher between its task and its consumer.
const WATCH_BUFFER: usize = 256;
/// Revisions read from the log per read transaction while a watch replays.
const REPLAY_CHUNK: usize = 256;

/// State the writer thread, readers and watch tasks share.
struct Shared {
    db: Database,
    path: PathBuf,
    commits: AtomicU64,
}

/// All events of one committed transaction, as fanned out to live watchers.
struct Committed {
    revision: u64,
    events: Vec<Event>,
}

/// A [`Store`] in one redb file, with group commit and a durable event log.
///
/// Dropping it stops the writer thread once queued writes are done and ends
/// every watch.
pub struct RedbStore {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
    events: broadcast::Sender<Arc<Committed>>,
}

/// Maps a backend error to [`StoreError::Backend`] naming what failed on what.
fn backend<E: Display>(op: &'static str, target: &str) -> impl FnOnce(E) -> StoreError {
    let target = target.to_owned();
    move |err| StoreError::Backend {
        op,
        target,
        reason: err.to_string(),
    }
}

impl RedbStore {
    /// Opens the store at `path`, creating the file and tables if needed, and
    /// starts its writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_owned();
        let target = path.display().to_string();
        let db = Database::create(&path).map_err(backend("open redb store", &target))?;
        let wtx = db
            .begin_write()
            .map_err(backend("begin write transaction", &target))?;
        wtx.open_table(KV)
            .map_err(backend("create kv table", &target))?;
        wtx.open_table(LOG)
            .map_err(backend("create log table", &target))?;
        wtx.open_table(META)
            .map_err(backend("create meta table", &target))?;
        wtx.commit()
            .map_err(backend("commit table creation", &target))?;

        let shared = Arc::new(Shared {
            db,
            path,
            commits: AtomicU64::new(0),
        });
        let (requests, rx) = mpsc::channel(REQUEST_QUEUE);
        let (events, _) = broadcast::channel(LIVE_EVENTS);
        let (w_shared, w_events) = (Arc::clone(&shared), events.clone());
        std::thread::Builder::new()
            .name("weir-store-writer".into())
            .spawn(move || writer::run(&w_shared, rx, &w_events))
            .map_err(backend("spawn writer thread", &target))?;
        Ok(Self {
            shared,
            requests,
            events,
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// How many write transactions have been committed since open (each one
    /// fsync); with group commit, usually fewer than the txns applied.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    fn target(&self) -> String {
        self.shared.path.display().to_string()
    }

    /// Runs `f` in a read transaction on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction, &str) -> Result<T, StoreError> + Send + 'static,
    {
        read(Arc::clone(&self.shared), f).await
    }

    /// Queues a write for the writer thread and waits for its outcome.
    async fn submit(&self, work: Work) -> Result<TxnResult, StoreError> {
        let closed = || StoreError::Closed {
            target: self.target(),
        };
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request { work, reply })
            .await
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

async fn read<T, F>(shared: Arc<Shared>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&ReadTransaction, &str) -> Result<T, StoreError> + Send + 'static,
{
    let target = shared.path.display().to_string();
    let t = target.clone();
    tokio::task::spawn_blocking(move || {
        let rtx = shared
            .db
            .begin_read()
            .map_err(backend("begin read transaction", &t))?;
        f(&rtx, &t)
    })
    .await
    .map_err(backend("join read task", &target))?
}

/// One counter from the meta table; absent means 0 (a new store).
fn meta_value(
    meta: &impl ReadableTable<&'static str, u64>,
    key: &str,
    target: &str,
) -> Result<u64, StoreError> {
    Ok(meta
        .get(key)
        .map_err(backend("read meta", target))?
        .map_or(0, |g| g.value()))
}

/// The store revision and the compacted revision.
fn read_meta(rtx: &ReadTransaction, target: &str) -> Result<(u64, u64), StoreError> {
    let meta = rtx
        .open_table(META)
        .map_err(backend("open meta table", target))?;
    Ok((
        meta_value(&meta, META_REVISION, target)?,
        meta_value(&meta, META_COMPACTED, target)?,
    ))
}

/// Builds a [`KeyValue`] from a `kv_v1` row.
fn key_value(key: &str, (create_revision, mod_revision, value): (u64, u64, &[u8])) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        mod_revision,
        create_revision,
    }
}

/// Events read from the log after some revision.
struct Replay {
    events: Vec<Event>,
    /// Every revision up to here has been read.
    through: u64,
    /// Whether `through` is the store's revision at the time of the read.
    caught_up: bool,
}

/// Reads up to `REPLAY_CHUNK` revisions after `after`, keeping the events
/// under `prefix`.
fn replay_chunk(
    rtx: &ReadTransaction,
    target: &str,
    prefix: &str,
    after: u64,
) -> Result<Replay, StoreError> {
    let (head, compacted) = read_meta(rtx, target)?;
    if after < compacted {
        return Err(StoreError::Compacted {
            requested: after,
            compacted,
        });
    }
    let log = rtx
        .open_table(LOG)
        .map_err(backend("open log table", target))?;
    let mut events = Vec::new();
    let mut through = after;
    let entries = log
        .range(after + 1..)
        .map_err(backend("read event log", target))?;
    for (read, entry) in entries.enumerate() {
        if read == REPLAY_CHUNK {
            return Ok(Replay {
                events,
                through,
                caught_up: false,
            });
        }
        let (rev, bytes) = entry.map_err(backend("read event log", target))?;
        let rev = rev.value();
        events.extend(
            codec::decode_events(rev, bytes.value())?
                .into_iter()
                .filter(|e| e.kv.key.starts_with(prefix)),
        );
        through = rev;
    }
    Ok(Replay {
        events,
        through: through.max(head),
        caught_up: true,
    })
}

/// Feeds one watcher: replays the log after `from`, then follows live
/// commits; on falling behind the live feed, replays again from the log.
/// `live` must have been subscribed before the first log read so no commit
/// falls between the two; revisions already delivered are skipped.
async fn watch_task(
    shared: Arc<Shared>,
    prefix: String,
    from: u64,
    mut live: broadcast::Receiver<Arc<Committed>>,
    tx: mpsc::Sender<Result<Event, StoreError>>,
) {
    let mut last = from;
    loop {
        loop {
            let p = prefix.clone();
            let chunk = read(Arc::clone(&shared), move |rtx, t| {
                replay_chunk(rtx, t, &p, last)
            })
            .await;
            let chunk = match chunk {
                Ok(c) => c,
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            };
            for ev in chunk.events {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            last = chunk.through;
            if chunk.caught_up {
                break;
            }
        }
        loop {
            let committed = tokio::select! {
                r = live.recv() => r,
                () = tx.closed() => return,
            };
            match committed {
                Ok(c) if c.revision <= last => {}
                Ok(c) => {
                    for ev in c.events.iter().filter(|e| e.kv.key.starts_with(&prefix)) {
                        if tx.send(Ok(ev.clone())).await.is_err() {
                            return;
                        }
                    }
                    last = c.revision;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Subscribe afresh before reading the log again.
                    live = live.resubscribe();
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.read(move |rtx, target| {
            let kv = rtx
                .open_table(KV)
                .map_err(backend("open kv table", target))?;
            let found = kv.get(key.as_str()).map_err(backend("read key", &key))?;
            Ok(found.map(|g| key_value(&key, g.value())))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        check_prefix(prefix)?;
        let prefix = prefix.to_owned();
        self.read(move |rtx, target| {
            let (revision, _) = read_meta(rtx, target)?;
            let kv = rtx
                .open_table(KV)
                .map_err(backend("open kv table", target))?;
            let mut items = Vec::new();
            for entry in kv
                .range(prefix.as_str()..)
                .map_err(backend("list prefix", &prefix))?
            {
                let (key, value) = entry.map_err(backend("list prefix", &prefix))?;
                let key = key.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                items.push(key_value(key, value.value()));
            }
            Ok((items, revision))
        })
        .await
    }

    async fn txn(
        &self,
        compares: Vec<(String, Compare)>,
        ops: Vec<Op>,
    ) -> Result<TxnResult, StoreError> {
        check_ops(&ops)?;
        self.submit(Work::Txn { compares, ops }).await
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchReceiver, StoreError> {
        check_prefix(prefix)?;
        // Subscribe before any read of the log: see `watch_task`.
        let live = self.events.subscribe();
        let (_, compacted) = self.read(read_meta).await?;
        if from_revision < compacted {
            return Err(StoreError::Compacted {
                requested: from_revision,
                compacted,
            });
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch_task(
            Arc::clone(&self.shared),
            prefix.to_owned(),
            from_revision,
            live,
            tx,
        ));
        Ok(rx)
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.submit(Work::Compact(revision)).await.map(|_| ())
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        self.read(|rtx, target| Ok(read_meta(rtx, target)?.0)).await
    }
}
