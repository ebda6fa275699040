//! The shared suite against `RedbStore`, plus what only this backend has:
//! group commit, a watcher falling behind the live feed, and surviving a
//! SIGKILL of the writing process.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use futures::future::join_all;
use tempfile::TempDir;

use super::RedbStore;
use crate::store::tests::{next_event, put_any, store_suite};
use crate::store::{Compare, Op, Store};

fn open_temp() -> (TempDir, RedbStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("weir.redb")).unwrap();
    (dir, store)
}

store_suite!(open_temp());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_batches_concurrent_txns() {
    let (_dir, s) = open_temp();
    let before = s.commits();
    let results = join_all((0..200).map(|i| {
        let key = format!("/t/group/k{i}");
        let s = &s;
        async move {
            s.txn(
                vec![(key.clone(), Compare::Absent)],
                vec![Op::Put {
                    key,
                    value: b"v".to_vec(),
                }],
            )
            .await
            .unwrap()
        }
    }))
    .await;
    let commits = s.commits() - before;
    let mut revs: Vec<u64> = results
        .iter()
        .inspect(|r| assert!(r.succeeded))
        .map(|r| r.revision)
        .collect();
    revs.sort_unstable();
    assert_eq!(revs, (1..=200).collect::<Vec<_>>(), "one revision per txn");
    assert!(commits < 50, "200 txns took {commits} commits");
    assert_eq!(s.list("/t/group/").await.unwrap().0.len(), 200);
}

/// A watcher that does not read while more commits happen than the live
/// feed holds must still see every event, in order, from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_catches_up_from_log() {
    let (_dir, s) = open_temp();
    let mut rx = s.watch("/t/lag/", 0).await.unwrap();
    let total = 3 * super::LIVE_EVENTS as u64;
    join_all((0..64).map(|w| {
        let s = &s;
        async move {
            for i in (w..total).step_by(64) {
                put_any(s, &format!("/t/lag/k{i}"), "v").await;
            }
        }
    }))
    .await;
    for rev in 1..=total {
        assert_eq!(next_event(&mut rx).await.revision(), rev);
    }
}

const CRASH_ENV: &str = "WEIR_STORE_CRASH_CHILD";

/// Child half of `acknowledged_writes_survive_sigkill` (a no-op in a normal
/// run): writes from four tasks and prints each acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_writer_child() {
    let Ok(path) = std::env::var(CRASH_ENV) else {
        return;
    };
    let s = RedbStore::open(path).unwrap();
    join_all((0..4).map(|w| {
        let s = &s;
        async move {
            for i in 0..100_000 {
                let key = format!("/t/crash/w{w}/{i}");
                let rev = put_any(s, &key, &i.to_string()).await;
                let mut out = std::io::stdout().lock();
                writeln!(out, "ack {key} {rev}").unwrap();
                out.flush().unwrap();
            }
        }
    }))
    .await;
}

/// Kills the writer child however the test ends, so a failed assertion
/// never leaves it writing in the background.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.redb");
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::redb::tests::crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let parse = |line: &str| {
        let (key, rev) = line.strip_prefix("ack ")?.split_once(' ')?;
        Some((key.to_owned(), rev.parse::<u64>().unwrap()))
    };
    let mut acks = Vec::new();
    for line in lines.by_ref() {
        acks.extend(parse(&line.unwrap()));
        if acks.len() >= 400 {
            break;
        }
    }
    child.0.kill().unwrap(); // SIGKILL on Unix
    // Acks printed before the kill are still in the pipe.
    for line in lines {
        match line {
            Ok(line) => acks.extend(parse(&line)),
            Err(_) => break,
        }
    }
    child.0.wait().unwrap();
    assert!(acks.len() >= 400, "child acknowledged only {}", acks.len());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = RedbStore::open(&path).unwrap();
        let head = s.revision().await.unwrap();
        for (key, rev) in &acks {
            let kv = s.get(key).await.unwrap();
            assert_eq!(kv.map(|kv| kv.mod_revision), Some(*rev), "{key} lost");
            assert!(*rev <= head);
        }
        // The log survived with the data: a watch from 0 replays it all.
        let mut rx = s.watch("/t/crash/", 0).await.unwrap();
        for rev in 1..=head {
            assert_eq!(next_event(&mut rx).await.revision(), rev);
        }
        // And the store takes new writes after the crash.
        assert_eq!(put_any(&s, "/t/crash/after", "x").await, head + 1);
    });
}

/// Throughput of sequential vs concurrent txns and commits per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: cargo test -p weir-control -- --ignored --nocapture bench"]
async fn bench_txn_throughput() {
    let (_dir, s) = open_temp();
    let n = 500u32;
    let t = Instant::now();
    for i in 0..n {
        put_any(&s, &format!("/t/bench/seq/{i}"), "v").await;
    }
    let seq = f64::from(n) / t.elapsed().as_secs_f64();
    println!(
        "sequential: {seq:.0} txns/s ({} commits for {n} txns)",
        s.commits()
    );

    for workers in [8u32, 64, 256] {
        let per = 40u32;
        let before = s.commits();
        let t = Instant::now();
        join_all((0..workers).map(|w| {
            let s = &s;
            async move {
                for i in 0..per {
                    put_any(s, &format!("/t/bench/c{workers}/{w}/{i}"), "v").await;
                }
            }
        }))
        .await;
        let total = workers * per;
        let rate = f64::from(total) / t.elapsed().as_secs_f64();
        let commits = s.commits() - before;
        #[expect(clippy::cast_precision_loss, reason = "a printed ratio")]
        let per_commit = f64::from(total) / commits as f64;
        println!(
            "{workers} concurrent: {rate:.0} txns/s, {commits} commits for {total} txns ({per_commit:.1} txns/commit)"
        );
    }
}
