//! The etcd backend: the store's keys live in an etcd v3 cluster under one
//! key prefix (so several weir clusters, or several tests, can share an
//! etcd), revisions are etcd's store-wide revisions, and watches are etcd
//! watches.
//!
//! Where etcd's semantics differ from the [`Store`] contract, this backend
//! maps them:
//! - **`ModRevision(0)`**: etcd's `mod_revision == 0` holds on an absent
//!   key; the trait's `ModRevision` never holds on one. `ModRevision(r)` with
//!   `r == 0` (or `r` beyond `i64`) becomes a compare that can never hold
//!   (`version < 0`), so the txn fails atomically inside etcd.
//! - **No-op writes**: a txn whose ops change nothing (deleting absent keys,
//!   or no ops) takes no revision in etcd either (its MVCC store bumps the
//!   revision only when a txn recorded changes), and the response header
//!   carries the unchanged revision, as the trait asks.
//! - **Compaction boundary**: etcd's `compact(R)` keeps revision `R` itself
//!   watchable (a watch may start at `R`); the trait drops history "up to
//!   and including" `R`, so that a watch *from* `R` (events `> R`) works and
//!   one from `R - 1` fails. Watches therefore start etcd's watch at
//!   `start_revision = from_revision` (not `+ 1`) and drop the events of
//!   `from_revision` itself: etcd refuses exactly when `from_revision <
//!   compacted`, which is the trait's rule, and reports the compaction
//!   revision. Compacting behind the current compaction is a no-op (etcd
//!   says "compacted"), compacting ahead of the store is
//!   [`StoreError::FutureRevision`].
//! - **Compacted watches**: etcd reports a compacted start revision
//!   asynchronously on the watch stream (its unsynced-watcher loop runs every
//!   100 ms), not in the create response. [`EtcdStore::watch`] probes with a
//!   read at `from_revision` (which etcd refuses synchronously once
//!   compacted) and, if refused, waits for the watch's compaction response
//!   to return [`StoreError::Compacted`] with etcd's compaction revision from
//!   the call itself, as the redb backend does.
//! - **Delete events**: etcd's delete event carries only the key and the
//!   delete's revision; the trait wants the last value. Watches ask for
//!   `prev_kv` and build the event's key-value from it with the delete's
//!   revision as `mod_revision`. Should etcd not have the previous value
//!   (compacted between the write and the watch reading it), the event
//!   carries an empty value and create revision 0.
//! - **Large lists** are read in pages at one pinned revision, so a list is
//!   one consistent snapshot no matter its size.
//!
//! Keys are stored as `<key_prefix><key>`; weir's keys start with `/`, and
//! a list or watch of the empty prefix covers `<key_prefix>/`.

use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, Error as EtcdError, EventType,
    GetOptions, KvClient, ResponseHeader, Txn, TxnOp, WatchOptions, WatchResponse, WatchStream,
};
use tokio::sync::mpsc;

use super::{
    Compare, Event, EventKind, KeyValue, Op, Store, StoreError, TxnResult, WatchReceiver,
    check_ops, check_prefix,
};

/// How long [`EtcdStore::connect`] waits for the cluster to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a watch from a compacted revision waits for etcd to report the
/// compaction revision on the stream (its watcher sync loop runs every
/// 100 ms).
const COMPACTED_REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys read per range request while listing.
const LIST_PAGE: i64 = 1000;
/// Events buffered per watcher between its task and its consumer.
const WATCH_BUFFER: usize = 256;
/// gRPC responses may be this large (etcd allows 1.5 MiB values; a watch
/// response can batch several).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// A [`Store`] in an etcd v3 cluster, all keys under one prefix.
///
/// Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// Prepended to every key.
    prefix: String,
    /// The endpoints, for error messages.
    target: String,
}

/// Maps an etcd error to [`StoreError::Backend`] naming what failed on what.
fn backend<E: std::fmt::Display>(op: &'static str, target: &str) -> impl FnOnce(E) -> StoreError {
    let target = target.to_owned();
    move |err| StoreError::Backend {
        op,
        target,
        reason: err.to_string(),
    }
}

/// Whether etcd refused a request because its revision is compacted.
fn is_compacted(err: &EtcdError) -> bool {
    matches!(err, EtcdError::GRpcStatus(s) if s.message().contains("required revision has been compacted"))
}

/// Whether etcd refused a request because its revision is in the future.
fn is_future(err: &EtcdError) -> bool {
    matches!(err, EtcdError::GRpcStatus(s) if s.message().contains("required revision is a future revision"))
}

/// etcd's revisions are positive `i64`s.
fn to_u64(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

/// The revision a response was served at.
fn header_revision(
    header: Option<&ResponseHeader>,
    op: &'static str,
    target: &str,
) -> Result<u64, StoreError> {
    header
        .map(|h| to_u64(h.revision()))
        .ok_or_else(|| StoreError::Backend {
            op,
            target: target.to_owned(),
            reason: "etcd response without a header".into(),
        })
}

/// The first key after every key that starts with `prefix` (etcd's
/// `range_end` for a prefix); `[0]` (no end) if there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port` or
    /// `host:port`), keeping every key under `key_prefix` (e.g. `/weir`;
    /// empty for none), and checks that the cluster answers.
    pub async fn connect(endpoints: &[String], key_prefix: &str) -> Result<Self, StoreError> {
        let target = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            // Refuse service from a member cut off from the leader rather
            // than answer or watch with stale data.
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(backend("connect to etcd", &target))?;
        let store = Self {
            client,
            prefix: key_prefix.trim_end_matches('/').to_owned(),
            target,
        };
        tokio::time::timeout(CONNECT_TIMEOUT, store.revision())
            .await
            .map_err(|_| StoreError::Backend {
                op: "connect to etcd",
                target: store.target.clone(),
                reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })??;
        Ok(store)
    }

    /// The prefix every key is stored under.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The etcd client (a cheap clone sharing the connection), for what is
    /// not a [`Store`] operation: leases for leader election.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The endpoints, `host:port,...`, for error messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    }

    /// The etcd key of a store key.
    fn full_key(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.prefix).into_bytes()
    }

    /// The etcd key range `[start, end)` of a store prefix.
    fn range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let start = if prefix.is_empty() && !self.prefix.is_empty() {
            format!("{}/", self.prefix).into_bytes()
        } else {
            self.full_key(prefix)
        };
        if start.is_empty() {
            // Every key: from "\0" with no end.
            (vec![0], vec![0])
        } else {
            let end = prefix_end(&start);
            (start, end)
        }
    }

    /// Builds a store [`KeyValue`] from an etcd one.
    fn key_value(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let full = kv.key_str().map_err(|err| StoreError::Corrupt {
            what: format!("etcd key {:?}", String::from_utf8_lossy(kv.key())),
            reason: err.to_string(),
        })?;
        let key = full
            .strip_prefix(self.prefix.as_str())
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("etcd key {full:?}"),
                reason: format!("not under the store's prefix {:?}", self.prefix),
            })?;
        Ok(KeyValue {
            key: key.to_owned(),
            value: kv.value().to_vec(),
            mod_revision: to_u64(kv.mod_revision()),
            create_revision: to_u64(kv.create_revision()),
        })
    }

    /// The etcd compares for one store compare.
    fn compare(&self, key: &str, compare: Compare) -> Option<EtcdCompare> {
        let full = self.full_key(key);
        match compare {
            Compare::Any => None,
            Compare::Absent => Some(EtcdCompare::create_revision(full, CompareOp::Equal, 0)),
            Compare::ModRevision(rev) => Some(match i64::try_from(rev) {
                Ok(rev) if rev > 0 => EtcdCompare::mod_revision(full, CompareOp::Equal, rev),
                // No existing key has this mod revision, and unlike etcd's
                // `mod_revision == 0` this must not hold on an absent key:
                // a compare that never holds.
                _ => EtcdCompare::version(full, CompareOp::Less, 0),
            }),
        }
    }

    /// Whether etcd has compacted away the revisions after `from` (i.e.
    /// `from < compacted`): a read at `from` is refused then.
    async fn compacted_since(&self, start_key: &[u8], from: i64) -> Result<bool, StoreError> {
        let options = GetOptions::new()
            .with_revision(from)
            .with_keys_only()
            .with_limit(1);
        match self.kv().get(start_key.to_vec(), Some(options)).await {
            Ok(_) => Ok(false),
            Err(err) if is_compacted(&err) => Ok(true),
            Err(err) if is_future(&err) => Ok(false),
            Err(err) => Err(backend("check compaction of revision", &from.to_string())(
                err,
            )),
        }
    }
}

/// Waits for etcd to report the compaction that cancels a watch.
async fn compaction_report(stream: &mut WatchStream, target: &str) -> Result<u64, StoreError> {
    let wait = async {
        loop {
            match stream.message().await {
                Ok(Some(resp)) if resp.canceled() && resp.compact_revision() > 0 => {
                    return Ok(to_u64(resp.compact_revision()));
                }
                Ok(Some(resp)) if resp.canceled() => {
                    return Err(StoreError::Backend {
                        op: "watch",
                        target: target.to_owned(),
                        reason: format!("etcd canceled the watch: {}", resp.cancel_reason()),
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(StoreError::Backend {
                        op: "watch",
                        target: target.to_owned(),
                        reason: "etcd closed the watch stream".into(),
                    });
                }
                Err(err) => return Err(backend("watch", target)(err)),
            }
        }
    };
    tokio::time::timeout(COMPACTED_REPORT_TIMEOUT, wait)
        .await
        .map_err(|_| StoreError::Backend {
            op: "watch",
            target: target.to_owned(),
            reason: format!(
                "start revision is compacted but etcd reported no compaction revision within {COMPACTED_REPORT_TIMEOUT:?}"
            ),
        })?
}

/// Turns the events of one etcd watch response into store events after
/// `from`.
fn events_after(
    store: &EtcdStore,
    resp: &WatchResponse,
    from: u64,
) -> Result<Vec<Event>, StoreError> {
    let mut events = Vec::with_capacity(resp.events().len());
    for ev in resp.events() {
        let Some(kv) = ev.kv() else {
            continue;
        };
        let revision = to_u64(kv.mod_revision());
        if revision <= from {
            continue;
        }
        let prev = ev.prev_kv().map(|p| store.key_value(p)).transpose()?;
        let event = match ev.event_type() {
            EventType::Put => Event {
                kind: EventKind::Put,
                kv: store.key_value(kv)?,
                prev,
            },
            EventType::Delete => {
                let kv = match &prev {
                    Some(p) => KeyValue {
                        mod_revision: revision,
                        ..p.clone()
                    },
                    None => KeyValue {
                        value: Vec::new(),
                        create_revision: 0,
                        ..store.key_value(kv)?
                    },
                };
                Event {
                    kind: EventKind::Delete,
                    kv,
                    prev,
                }
            }
        };
        events.push(event);
    }
    Ok(events)
}

/// Feeds one watcher from its etcd watch until either side ends; an error
/// (compaction, a lost connection) is sent once and ends the stream.
async fn watch_task(
    store: EtcdStore,
    mut stream: WatchStream,
    from: u64,
    tx: mpsc::Sender<Result<Event, StoreError>>,
) {
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            () = tx.closed() => return,
        };
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                let _ = tx
                    .send(Err(StoreError::Backend {
                        op: "watch",
                        target: store.target.clone(),
                        reason: "etcd closed the watch stream".into(),
                    }))
                    .await;
                return;
            }
            Err(err) => {
                let _ = tx.send(Err(backend("watch", &store.target)(err))).await;
                return;
            }
        };
        if resp.canceled() {
            let err = if resp.compact_revision() > 0 {
                StoreError::Compacted {
                    requested: from,
                    compacted: to_u64(resp.compact_revision()),
                }
            } else {
                StoreError::Backend {
                    op: "watch",
                    target: store.target.clone(),
                    reason: format!("etcd canceled the watch: {}", resp.cancel_reason()),
                }
            };
            let _ = tx.send(Err(err)).await;
            return;
        }
        let events = match events_after(&store, &resp, from) {
            Ok(events) => events,
            Err(err) => {
                let _ = tx.send(Err(err)).await;
                return;
            }
        };
        for ev in events {
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .kv()
            .get(self.full_key(key), None)
            .await
            .map_err(backend("get key", key))?;
        resp.kvs().first().map(|kv| self.key_value(kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        check_prefix(prefix)?;
        let (mut from, end) = self.range(prefix);
        let mut kv = self.kv();
        let mut items = Vec::new();
        // The first page fixes the revision; later pages read at it.
        let mut revision = None;
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if let Some(rev) = revision {
                options = options.with_revision(rev);
            }
            let resp = kv
                .get(from, Some(options))
                .await
                .map_err(backend("list prefix", prefix))?;
            if revision.is_none() {
                let rev = resp.header().map(ResponseHeader::revision).ok_or_else(|| {
                    StoreError::Backend {
                        op: "list prefix",
                        target: prefix.to_owned(),
                        reason: "etcd response without a header".into(),
                    }
                })?;
                revision = Some(rev);
            }
            for item in resp.kvs() {
                items.push(self.key_value(item)?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((items, to_u64(revision.unwrap_or_default()))),
            }
        }
    }

    async fn txn(
        &self,
        compares: Vec<(String, Compare)>,
        ops: Vec<Op>,
    ) -> Result<TxnResult, StoreError> {
        check_ops(&ops)?;
        let target = ops
            .first()
            .map(Op::key)
            .or_else(|| compares.first().map(|(k, _)| k.as_str()))
            .unwrap_or("no key")
            .to_owned();
        let when: Vec<EtcdCompare> = compares
            .iter()
            .filter_map(|(key, c)| self.compare(key, *c))
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.full_key(&key), value, None),
                Op::Delete { key } => TxnOp::delete(self.full_key(&key), None),
            })
            .collect();
        let resp = self
            .kv()
            .txn(Txn::new().when(when).and_then(then))
            .await
            .map_err(backend("txn", &target))?;
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header(), "txn", &target)?,
        })
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchReceiver, StoreError> {
        check_prefix(prefix)?;
        // Start at `from_revision` itself (its events are dropped): etcd then
        // refuses exactly the compacted starts the trait refuses. Revision 0
        // would mean "now" to etcd; 1 is its first revision.
        let start = i64::try_from(from_revision.max(1)).map_err(|_| StoreError::Backend {
            op: "watch",
            target: prefix.to_owned(),
            reason: format!("revision {from_revision} is beyond etcd's range"),
        })?;
        let (key, end) = self.range(prefix);
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(start)
            .with_prev_key();
        let mut stream = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(key.clone(), Some(options))
            .await
            .map_err(backend("watch", prefix))?;
        if from_revision > 0 && self.compacted_since(&key, start).await? {
            let compacted = compaction_report(&mut stream, &self.target).await?;
            return Err(StoreError::Compacted {
                requested: from_revision,
                compacted,
            });
        }
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch_task(self.clone(), stream, from_revision, tx));
        Ok(rx)
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        if revision == 0 {
            return Ok(());
        }
        let current = self.revision().await?;
        let future = |current| StoreError::FutureRevision {
            requested: revision,
            current,
        };
        let Ok(rev) = i64::try_from(revision) else {
            return Err(future(current));
        };
        if revision > current {
            return Err(future(current));
        }
        match self.kv().compact(rev, None).await {
            Ok(_) => Ok(()),
            // Already compacted at or beyond `revision`: nothing to drop.
            Err(err) if is_compacted(&err) => Ok(()),
            Err(err) if is_future(&err) => Err(future(self.revision().await?)),
            Err(err) => Err(backend("compact to revision", &revision.to_string())(err)),
        }
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        let resp = self
            .kv()
            .get(
                self.full_key("/"),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(backend("read revision", &self.target))?;
        header_revision(resp.header(), "read revision", &self.target)
    }
}

#[cfg(test)]
pub(crate) mod tests;
