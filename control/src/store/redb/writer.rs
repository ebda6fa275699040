//! The single writer: every txn and compaction goes through one thread that
//! takes whatever requests are queued and applies them in ONE redb write
//! transaction, so a burst of writes costs one fsync instead of one each.
//! Requests of a batch are evaluated in order, each seeing the writes of
//! the ones before it, exactly as if they had committed one by one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ::redb::{ReadableTable, Table, WriteTransaction};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    Committed, KV, LOG, META, META_COMPACTED, META_REVISION, Shared, backend, codec, key_value,
    meta_value,
};
use crate::store::{Compare, Event, EventKind, KeyValue, Op, StoreError, TxnResult};

/// Upper bound on requests per write transaction, so one batch cannot hold
/// the write lock (and everyone's replies) for long.
const MAX_BATCH: usize = 1024;

/// A write waiting for the writer thread, with where its outcome goes.
pub(super) struct Request {
    pub(super) work: Work,
    /// A compaction replies with the store revision it ran at.
    pub(super) reply: oneshot::Sender<Result<TxnResult, StoreError>>,
}

/// What a request asks the writer to do.
pub(super) enum Work {
    Txn {
        compares: Vec<(String, Compare)>,
        ops: Vec<Op>,
    },
    Compact(u64),
}

/// Runs until every sender of `requests` is gone.
pub(super) fn run(
    shared: &Shared,
    mut requests: mpsc::Receiver<Request>,
    events: &broadcast::Sender<Arc<Committed>>,
) {
    while let Some(first) = requests.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match requests.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        write_batch(shared, batch, events);
    }
}

fn write_batch(shared: &Shared, batch: Vec<Request>, events: &broadcast::Sender<Arc<Committed>>) {
    let size = batch.len();
    let (work, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|r| (r.work, r.reply)).unzip();
    match apply(shared, work) {
        Ok((outcomes, committed)) => {
            for c in committed {
                // No receivers is fine: nobody is watching.
                let _ = events.send(Arc::new(c));
            }
            // A caller that gave up waiting does not undo its write.
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(err) => {
            tracing::error!(%err, size, "store write batch failed");
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// Each request's outcome, in request order.
type Outcomes = Vec<Result<TxnResult, StoreError>>;

/// Applies a batch in one write transaction and commits it if anything
/// changed. An error here is a storage failure and fails the whole batch.
fn apply(shared: &Shared, work: Vec<Work>) -> Result<(Outcomes, Vec<Committed>), StoreError> {
    let target = shared.path.display().to_string();
    let wtx = shared
        .db
        .begin_write()
        .map_err(backend("begin write transaction", &target))?;
    let (outcomes, committed, changed) = apply_in(&wtx, work, &target)?;
    if changed {
        wtx.commit()
            .map_err(backend("commit write transaction", &target))?;
        shared.commits.fetch_add(1, Ordering::Relaxed);
    } else {
        wtx.abort()
            .map_err(backend("abort unchanged write transaction", &target))?;
    }
    Ok((outcomes, committed))
}

type Applied = (Outcomes, Vec<Committed>, bool);

fn apply_in(wtx: &WriteTransaction, work: Vec<Work>, target: &str) -> Result<Applied, StoreError> {
    let mut kv = wtx
        .open_table(KV)
        .map_err(backend("open kv table", target))?;
    let mut log = wtx
        .open_table(LOG)
        .map_err(backend("open log table", target))?;
    let mut meta = wtx
        .open_table(META)
        .map_err(backend("open meta table", target))?;
    let start = meta_value(&meta, META_REVISION, target)?;
    let mut revision = start;
    let mut compacted = meta_value(&meta, META_COMPACTED, target)?;
    let mut changed = false;
    let mut outcomes = Vec::with_capacity(work.len());
    let mut committed = Vec::new();
    for w in work {
        match w {
            Work::Txn { compares, ops } => {
                let (result, c) = apply_txn(&mut kv, &mut log, &mut revision, &compares, ops)?;
                committed.extend(c);
                outcomes.push(Ok(result));
            }
            Work::Compact(to) => {
                let result = if to > revision {
                    Err(StoreError::FutureRevision {
                        requested: to,
                        current: revision,
                    })
                } else {
                    if to > compacted {
                        log.retain_in(..=to, |_, _| false)
                            .map_err(backend("compact event log", target))?;
                        meta.insert(META_COMPACTED, to)
                            .map_err(backend("record compacted revision", target))?;
                        compacted = to;
                        changed = true;
                    }
                    Ok(TxnResult {
                        succeeded: true,
                        revision,
                    })
                };
                outcomes.push(result);
            }
        }
    }
    if revision != start {
        meta.insert(META_REVISION, revision)
            .map_err(backend("record store revision", target))?;
        changed = true;
    }
    Ok((outcomes, committed, changed))
}

type KvTable<'t> = Table<'t, &'static str, (u64, u64, &'static [u8])>;

fn read_kv(kv: &KvTable<'_>, key: &str) -> Result<Option<KeyValue>, StoreError> {
    Ok(kv
        .get(key)
        .map_err(backend("read key", key))?
        .map(|g| key_value(key, g.value())))
}

fn apply_txn(
    kv: &mut KvTable<'_>,
    log: &mut Table<'_, u64, &'static [u8]>,
    revision: &mut u64,
    compares: &[(String, Compare)],
    ops: Vec<Op>,
) -> Result<(TxnResult, Option<Committed>), StoreError> {
    for (key, cmp) in compares {
        let current = kv
            .get(key.as_str())
            .map_err(backend("read key", key))?
            .map(|g| g.value().1);
        let holds = match cmp {
            Compare::Absent => current.is_none(),
            Compare::ModRevision(r) => current == Some(*r),
            Compare::Any => true,
        };
        if !holds {
            let result = TxnResult {
                succeeded: false,
                revision: *revision,
            };
            return Ok((result, None));
        }
    }
    let rev = *revision + 1;
    let mut events = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put { key, value } => {
                let prev = read_kv(kv, &key)?;
                let create_revision = prev.as_ref().map_or(rev, |p| p.create_revision);
                kv.insert(key.as_str(), (create_revision, rev, value.as_slice()))
                    .map_err(backend("write key", &key))?;
                events.push(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key,
                        value,
                        mod_revision: rev,
                        create_revision,
                    },
                    prev,
                });
            }
            Op::Delete { key } => {
                let Some(prev) = read_kv(kv, &key)? else {
                    continue;
                };
                kv.remove(key.as_str())
                    .map_err(backend("delete key", &key))?;
                events.push(Event {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        mod_revision: rev,
                        ..prev.clone()
                    },
                    prev: Some(prev),
                });
            }
        }
    }
    // Like etcd, a txn that changed nothing (deletes of absent keys) takes
    // no revision.
    if events.is_empty() {
        let result = TxnResult {
            succeeded: true,
            revision: *revision,
        };
        return Ok((result, None));
    }
    log.insert(rev, codec::encode_events(&events).as_slice())
        .map_err(backend("append event log", &format!("revision {rev}")))?;
    *revision = rev;
    let result = TxnResult {
        succeeded: true,
        revision: rev,
    };
    Ok((
        result,
        Some(Committed {
            revision: rev,
            events,
        }),
    ))
}
