//! The behaviour every [`Store`] backend must have, as generic test bodies.
//! A backend instantiates them with `store_suite!(open-expression)`, where
//! the expression yields `(guard, store)` for a fresh store (the guard keeps
//! its temp dir or server alive). Bodies use their own key prefixes and
//! relative revisions so they also run against a shared etcd.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use tokio::time::timeout;

use super::{Compare, Event, EventKind, Op, Store, StoreError, WatchReceiver};

const WAIT: Duration = Duration::from_secs(5);

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
    }
}

fn del(key: &str) -> Op {
    Op::Delete {
        key: key.to_owned(),
    }
}

/// Unconditional put; returns its revision.
pub(crate) async fn put_any<S: Store>(s: &S, key: &str, value: &str) -> u64 {
    let r = s.txn(vec![], vec![put(key, value)]).await.unwrap();
    assert!(r.succeeded);
    r.revision
}

pub(crate) async fn next_event(rx: &mut WatchReceiver) -> Event {
    timeout(WAIT, rx.recv())
        .await
        .expect("watch event within 5 s")
        .expect("watch stream still open")
        .expect("watch event, not an error")
}

/// Asserts that nothing more arrives for a short while.
async fn assert_quiet(rx: &mut WatchReceiver) {
    if let Ok(got) = timeout(Duration::from_millis(100), rx.recv()).await {
        panic!("unexpected watch item {got:?}");
    }
}

pub(crate) async fn cas_on_mod_revision<S: Store>(s: &S) {
    let k = "/t/cas/a";
    let created = s
        .txn(vec![(k.into(), Compare::Absent)], vec![put(k, "1")])
        .await
        .unwrap();
    assert!(created.succeeded);
    let kv = s.get(k).await.unwrap().unwrap();
    assert_eq!(kv.value, b"1");
    assert_eq!(kv.mod_revision, created.revision);
    assert_eq!(kv.create_revision, created.revision);

    // Creating again fails and reports the current revision.
    let again = s
        .txn(vec![(k.into(), Compare::Absent)], vec![put(k, "x")])
        .await
        .unwrap();
    assert!(!again.succeeded);
    assert_eq!(again.revision, created.revision);

    // A stale revision is refused, the right one applies.
    let stale = s
        .txn(
            vec![(k.into(), Compare::ModRevision(created.revision - 1))],
            vec![put(k, "x")],
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    let updated = s
        .txn(
            vec![(k.into(), Compare::ModRevision(created.revision))],
            vec![put(k, "2")],
        )
        .await
        .unwrap();
    assert!(updated.succeeded);
    assert_eq!(updated.revision, created.revision + 1);
    let kv = s.get(k).await.unwrap().unwrap();
    assert_eq!(kv.value, b"2");
    assert_eq!(kv.mod_revision, updated.revision);
    assert_eq!(kv.create_revision, created.revision);

    // ModRevision on an absent key never holds.
    let absent = s
        .txn(
            vec![("/t/cas/none".into(), Compare::ModRevision(0))],
            vec![put("/t/cas/none", "x")],
        )
        .await
        .unwrap();
    assert!(!absent.succeeded);
    assert_eq!(s.get("/t/cas/none").await.unwrap(), None);
    assert_eq!(s.revision().await.unwrap(), updated.revision);
}

pub(crate) async fn list_by_prefix<S: Store>(s: &S) {
    put_any(s, "/t/list/default/a", "1").await;
    put_any(s, "/t/list/default2/b", "2").await;
    put_any(s, "/t/list/default/c", "3").await;
    let last = put_any(s, "/t/list/defaul", "4").await;
    let (items, rev) = s.list("/t/list/default/").await.unwrap();
    let keys: Vec<_> = items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/list/default/a", "/t/list/default/c"]);
    assert_eq!(items[1].value, b"3");
    assert_eq!(rev, last);
    let (all, _) = s.list("/t/list/").await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(s.list("/t/list/none/").await.unwrap().0.is_empty());
    assert!(matches!(
        s.list("/t/list/default").await,
        Err(StoreError::InvalidPrefix { .. })
    ));
}

pub(crate) async fn list_then_watch_misses_nothing<S: Store>(s: &S) {
    for i in 0..20 {
        put_any(s, &format!("/t/lw/k{i}"), "v0").await;
    }
    // Writers run while we list and then start watching.
    let writes = async {
        for i in 0..100 {
            put_any(s, &format!("/t/lw/k{}", i % 20), &format!("v{}", i + 1)).await;
        }
    };
    let observe = async {
        tokio::task::yield_now().await;
        let (items, rev) = s.list("/t/lw/").await.unwrap();
        let rx = s.watch("/t/lw/", rev).await.unwrap();
        (items, rev, rx)
    };
    let ((), (items, list_rev, mut rx)) = tokio::join!(writes, observe);
    assert_eq!(items.len(), 20);
    let mut state: BTreeMap<String, (Vec<u8>, u64)> = items
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
        .collect();
    let head = s.revision().await.unwrap();
    let mut last = list_rev;
    while last < head {
        let ev = next_event(&mut rx).await;
        assert!(ev.revision() > last, "events in order, no duplicates");
        last = ev.revision();
        state.insert(ev.kv.key, (ev.kv.value, ev.kv.mod_revision));
    }
    // list + watch rebuilt exactly what a fresh list shows.
    let (fresh, rev) = s.list("/t/lw/").await.unwrap();
    assert_eq!(rev, head);
    let fresh: BTreeMap<_, _> = fresh
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
        .collect();
    assert_eq!(state, fresh);
    assert_quiet(&mut rx).await;
}

pub(crate) async fn watch_replays_in_order<S: Store>(s: &S) {
    let start = s.revision().await.unwrap();
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(put_any(s, &format!("/t/replay/k{i}"), &i.to_string()).await);
        put_any(s, &format!("/t/other/k{i}"), "x").await;
    }
    let mut rx = s.watch("/t/replay/", start).await.unwrap();
    for (i, rev) in revs.iter().enumerate() {
        let ev = next_event(&mut rx).await;
        assert_eq!(ev.kind, EventKind::Put);
        assert_eq!(ev.kv.key, format!("/t/replay/k{i}"));
        assert_eq!(ev.revision(), *rev);
        assert_eq!(ev.prev, None);
    }
    // From the middle: only later events; then live ones follow.
    let mut rx2 = s.watch("/t/replay/", revs[7]).await.unwrap();
    assert_eq!(next_event(&mut rx2).await.revision(), revs[8]);
    assert_eq!(next_event(&mut rx2).await.revision(), revs[9]);
    let live = put_any(s, "/t/replay/k0", "again").await;
    let ev = next_event(&mut rx2).await;
    assert_eq!(ev.revision(), live);
    assert_eq!(ev.prev.unwrap().value, b"0");
    assert_eq!(next_event(&mut rx).await.revision(), live);
    assert_quiet(&mut rx2).await;
}

pub(crate) async fn compaction<S: Store>(s: &S) {
    let first = put_any(s, "/t/compact/a", "1").await;
    let second = put_any(s, "/t/compact/a", "2").await;
    let third = put_any(s, "/t/compact/a", "3").await;
    s.compact(second).await.unwrap();
    // Compacting again, or behind, is a no-op.
    s.compact(first).await.unwrap();
    match s.watch("/t/compact/", first).await {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            assert_eq!(requested, first);
            assert_eq!(compacted, second);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut rx = s.watch("/t/compact/", second).await.unwrap();
    assert_eq!(next_event(&mut rx).await.revision(), third);
    // The data itself survives compaction.
    assert_eq!(s.get("/t/compact/a").await.unwrap().unwrap().value, b"3");
    assert!(matches!(
        s.compact(third + 10).await,
        Err(StoreError::FutureRevision { .. })
    ));
}

pub(crate) async fn delete_events<S: Store>(s: &S) {
    let created = put_any(s, "/t/del/a", "1").await;
    let updated = put_any(s, "/t/del/a", "2").await;
    let mut rx = s.watch("/t/del/", updated).await.unwrap();
    let wrong = s
        .txn(
            vec![("/t/del/a".into(), Compare::ModRevision(created))],
            vec![del("/t/del/a")],
        )
        .await
        .unwrap();
    assert!(!wrong.succeeded);
    let deleted = s
        .txn(
            vec![("/t/del/a".into(), Compare::ModRevision(updated))],
            vec![del("/t/del/a")],
        )
        .await
        .unwrap();
    assert!(deleted.succeeded);
    assert_eq!(s.get("/t/del/a").await.unwrap(), None);
    let ev = next_event(&mut rx).await;
    assert_eq!(ev.kind, EventKind::Delete);
    assert_eq!(ev.kv.key, "/t/del/a");
    assert_eq!(ev.kv.value, b"2");
    assert_eq!(ev.kv.mod_revision, deleted.revision);
    assert_eq!(ev.kv.create_revision, created);
    let prev = ev.prev.unwrap();
    assert_eq!(prev.mod_revision, updated);
    assert_eq!(prev.value, b"2");

    // Deleting an absent key succeeds, changes nothing and takes no revision.
    let noop = s.txn(vec![], vec![del("/t/del/a")]).await.unwrap();
    assert!(noop.succeeded);
    assert_eq!(noop.revision, deleted.revision);
    // Recreating starts a new life: a new create revision.
    let again = put_any(s, "/t/del/a", "3").await;
    let kv = s.get("/t/del/a").await.unwrap().unwrap();
    assert_eq!(kv.create_revision, again);
    let ev = next_event(&mut rx).await;
    assert_eq!((ev.kind, ev.prev), (EventKind::Put, None));
}

pub(crate) async fn multi_op_txn_is_atomic<S: Store>(s: &S) {
    let a = put_any(s, "/t/multi/a", "1").await;
    let mut rx = s.watch("/t/multi/", a).await.unwrap();
    // One compare fails: nothing applies.
    let failed = s
        .txn(
            vec![
                ("/t/multi/a".into(), Compare::ModRevision(a)),
                ("/t/multi/b".into(), Compare::ModRevision(1)),
            ],
            vec![put("/t/multi/b", "2"), del("/t/multi/a")],
        )
        .await
        .unwrap();
    assert!(!failed.succeeded);
    assert_eq!(s.get("/t/multi/a").await.unwrap().unwrap().mod_revision, a);
    assert_eq!(s.get("/t/multi/b").await.unwrap(), None);
    // All compares hold: every op applies at one revision.
    let ok = s
        .txn(
            vec![
                ("/t/multi/a".into(), Compare::ModRevision(a)),
                ("/t/multi/b".into(), Compare::Absent),
                ("/t/multi/z".into(), Compare::Any),
            ],
            vec![
                put("/t/multi/b", "2"),
                put("/t/multi/c", "3"),
                del("/t/multi/a"),
            ],
        )
        .await
        .unwrap();
    assert!(ok.succeeded);
    assert_eq!(ok.revision, a + 1);
    let (items, rev) = s.list("/t/multi/").await.unwrap();
    assert_eq!(rev, ok.revision);
    assert!(items.iter().all(|kv| kv.mod_revision == ok.revision));
    assert_eq!(items.len(), 2);
    let evs = [
        next_event(&mut rx).await,
        next_event(&mut rx).await,
        next_event(&mut rx).await,
    ];
    assert!(evs.iter().all(|e| e.revision() == ok.revision));
    let kinds: Vec<_> = evs.iter().map(|e| (e.kind, e.kv.key.as_str())).collect();
    assert!(kinds.contains(&(EventKind::Delete, "/t/multi/a")));
    assert!(kinds.contains(&(EventKind::Put, "/t/multi/b")));
    assert!(kinds.contains(&(EventKind::Put, "/t/multi/c")));
    assert_quiet(&mut rx).await;
    // The same key twice in one txn is refused outright.
    assert_eq!(
        s.txn(vec![], vec![put("/t/multi/d", "1"), del("/t/multi/d")])
            .await,
        Err(StoreError::DuplicateKey {
            key: "/t/multi/d".into()
        })
    );
}

/// Concurrent CAS increments of one counter: each success is visible, no
/// update is lost, and revisions are unique.
pub(crate) async fn concurrent_cas_loses_nothing<S: Store>(s: &S) {
    let k = "/t/counter/n";
    put_any(s, k, "0").await;
    let worker = || async {
        let mut revs = Vec::new();
        for _ in 0..10 {
            loop {
                let cur = s.get(k).await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                let r = s
                    .txn(
                        vec![(k.into(), Compare::ModRevision(cur.mod_revision))],
                        vec![put(k, &(n + 1).to_string())],
                    )
                    .await
                    .unwrap();
                if r.succeeded {
                    revs.push(r.revision);
                    break;
                }
            }
        }
        revs
    };
    let results = join_all((0..8).map(|_| worker())).await;
    let mut revs: Vec<u64> = results.into_iter().flatten().collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 80);
    assert_eq!(s.get(k).await.unwrap().unwrap().value, b"80");
}

/// Instantiates the suite for one backend; `$open` yields `(guard, store)`.
macro_rules! store_suite {
    ($open:expr) => {
        $crate::store::tests::store_suite!(@each $open;
            cas_on_mod_revision,
            list_by_prefix,
            list_then_watch_misses_nothing,
            watch_replays_in_order,
            compaction,
            delete_events,
            multi_op_txn_is_atomic,
            concurrent_cas_loses_nothing,
        );
    };
    (@each $open:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (_guard, store) = $open;
                $crate::store::tests::$name(&store).await;
            }
        )*
    };
}
pub(crate) use store_suite;
