//! `cargo xtask bench scheduler` runs this (release build, `--ignored`):
//! 5,000 Node objects (no agents), then N pods (10,000 and 50,000) created
//! through `ObjectsApi` while the scheduler runs on the same store; the
//! figure is pods bound per second from the first pod's creation to the
//! last bind (kube-scheduler_perf's `SchedulingThroughput` is measured the
//! same way, with pods created while the scheduler runs). Each run gets a
//! fresh store: redb in a temp dir, or a private etcd (a temp dir, free
//! loopback ports, killed afterwards). One `SCHED-BENCH {json}` line per run.
//!
//! Environment: `WEIR_BENCH_NODES` (5000), `WEIR_BENCH_PODS` (`10000,50000`),
//! `WEIR_BENCH_STORES` (`redb,etcd`), `WEIR_BENCH_MODES`
//! (`events,no-events,backlog`: pods created while the scheduler runs,
//! with and without the `Scheduled` event per pod; and all pods created
//! before it starts), `WEIR_BENCH_LIMIT_S`
//! (600, per run).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::json;
use tokio::sync::oneshot;
use weir_proto::v1;

use super::testutil::set_node_ready;
use super::{Config, Stats, run_with_stats};
use crate::api::ObjectsApi;
use crate::store::etcd::tests::Etcd;
use crate::store::{EtcdStore, RedbStore, Store};

/// Writes in flight while creating nodes and pods.
const CLIENTS: usize = 128;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A store under `prefix` on the etcd at `endpoint`, once it answers.
async fn connect_etcd(endpoint: &str, prefix: &str) -> EtcdStore {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = EtcdStore::connect(&[endpoint.to_owned()], prefix).await
            && s.revision().await.is_ok()
        {
            return s;
        }
        assert!(Instant::now() < deadline, "etcd did not come up in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `SchedulingBasic`'s node: 4 cpu, 32 GiB, 110 pods.
async fn create_nodes<S: Store>(api: &ObjectsApi<S>, nodes: usize) {
    futures::stream::iter(0..nodes)
        .map(|i| async move {
            let name = format!("node-{i:05}");
            let manifest = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name,
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}}, "spec": {}});
            api.apply(&v1::ApplyRequest {
                manifest_json: manifest.to_string(),
                field_manager: "bench".into(),
            })
            .await
            .unwrap();
            set_node_ready(api, &name, "4", "32Gi").await;
        })
        .buffer_unordered(CLIENTS)
        .collect::<Vec<()>>()
        .await;
}

/// `SchedulingBasic`'s pod: one container asking for 100m cpu and 500 MiB.
fn pod_manifest(i: usize) -> String {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{i:06}"), "namespace": "default"},
        "spec": {"containers": [{"name": "pause", "image": "registry.k8s.io/pause:3.10",
            "resources": {"requests": {"cpu": "100m", "memory": "500Mi"}}}]}})
    .to_string()
}

/// Creates `pods` pods, [`CLIENTS`] at a time; returns how long it took.
async fn create_pods<S: Store>(api: Arc<ObjectsApi<S>>, pods: usize) -> Duration {
    let t = Instant::now();
    futures::stream::iter(0..pods)
        .map(|i| {
            let api = Arc::clone(&api);
            async move {
                api.apply(&v1::ApplyRequest {
                    manifest_json: pod_manifest(i),
                    field_manager: "bench".into(),
                })
                .await
                .unwrap();
            }
        })
        .buffer_unordered(CLIENTS)
        .collect::<Vec<()>>()
        .await;
    t.elapsed()
}

/// One run: nodes, scheduler, pods; prints its `SCHED-BENCH` line.
async fn measure<S: Store>(
    store: Arc<S>,
    label: &str,
    nodes: usize,
    pods: usize,
    events: bool,
    backlog: bool,
    limit: Duration,
) {
    let api = Arc::new(ObjectsApi::new(store));
    let t = Instant::now();
    create_nodes(&api, nodes).await;
    let nodes_s = t.elapsed().as_secs_f64();
    eprintln!("bench scheduler: {label}: {nodes} nodes in {nodes_s:.1} s");
    let stats = Arc::new(Stats::default());
    let config = Config {
        record_scheduled_events: events,
        ..Config::default()
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let start_scheduler = || {
        tokio::spawn(run_with_stats(
            Arc::clone(&api),
            config.clone(),
            Arc::clone(&stats),
            async move {
                let _ = stopped.await;
            },
        ))
    };
    let (scheduler, creator, t0) = if backlog {
        // All pods first; the clock runs from the scheduler's start (its
        // initial List of nodes and pods included) to the last bind.
        let created_in = create_pods(Arc::clone(&api), pods).await;
        let t0 = Instant::now();
        let scheduler = start_scheduler();
        (scheduler, tokio::spawn(async move { created_in }), t0)
    } else {
        let scheduler = start_scheduler();
        // Let it list the nodes before the clock starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t0 = Instant::now();
        (
            scheduler,
            tokio::spawn(create_pods(Arc::clone(&api), pods)),
            t0,
        )
    };
    let deadline = t0 + limit;
    let mut last_report = Instant::now();
    let target = u64::try_from(pods).unwrap_or(u64::MAX);
    while stats.bound.load(Ordering::Relaxed) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if last_report.elapsed() > Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "bench scheduler: {label}: {} / {pods} bound after {:.1} s",
                stats.bound.load(Ordering::Relaxed),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = t0.elapsed();
    let bound = stats.bound.load(Ordering::Relaxed);
    let created_in = if creator.is_finished() {
        creator.await.unwrap()
    } else {
        creator.abort();
        limit
    };
    let _ = stop.send(());
    let _ = scheduler.await;
    let per_node = bound_per_node(&api).await;
    let stored_bound: usize = per_node.values().sum();
    let max_per_node = per_node.values().copied().max().unwrap_or(0);
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let rate = bound as f64 / elapsed.as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let create_rate = pods as f64 / created_in.as_secs_f64();
    let line = json!({
        "store": label,
        "nodes": nodes,
        "pods": pods,
        "scheduled_events": events,
        "mode": if backlog { "backlog" } else { "concurrent" },
        "bound": bound,
        "bound_in_store": stored_bound,
        "max_pods_per_node": max_per_node,
        "nodes_used": per_node.len(),
        "seconds": (elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "pods_per_s": rate.round(),
        "created_per_s": create_rate.round(),
        "bind_failures": stats.bind_failures.load(Ordering::Relaxed),
        "unschedulable_attempts": stats.unschedulable.load(Ordering::Relaxed),
        "complete": bound >= target && stored_bound == pods,
    });
    eprintln!(
        "bench scheduler: {label}: {bound} pods bound in {:.1} s: {rate:.0} pods/s",
        elapsed.as_secs_f64()
    );
    println!("SCHED-BENCH {line}");
}

/// Pods per node as stored (the check is the store, not the counters).
async fn bound_per_node<S: Store>(api: &ObjectsApi<S>) -> std::collections::HashMap<String, usize> {
    let list = api
        .list(&v1::ListRequest {
            kind: "Pod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut per_node = std::collections::HashMap::<String, usize>::new();
    for item in &list.items {
        let doc: serde_json::Value = serde_json::from_str(&item.json).unwrap();
        if let Some(n) = doc["spec"]["nodeName"].as_str() {
            *per_node.entry(n.to_owned()).or_default() += 1;
        }
    }
    per_node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo xtask bench scheduler"]
async fn bench_scheduler() {
    let nodes: usize = env_or("WEIR_BENCH_NODES", "5000").parse().unwrap();
    let pods: Vec<usize> = env_or("WEIR_BENCH_PODS", "10000,50000")
        .split(',')
        .map(|p| p.trim().parse().unwrap())
        .collect();
    let stores = env_or("WEIR_BENCH_STORES", "redb,etcd");
    // (Scheduled events, backlog): the default config with pods created
    // while it runs, the same without events, and the default config
    // working off a backlog of pods created before it started.
    let modes: Vec<(bool, bool)> = env_or("WEIR_BENCH_MODES", "events,no-events,backlog")
        .split(',')
        .map(|m| match m.trim() {
            "no-events" => (false, false),
            "backlog" => (true, true),
            _ => (true, false),
        })
        .collect();
    let limit = Duration::from_secs(env_or("WEIR_BENCH_LIMIT_S", "600").parse().unwrap());
    for store in stores.split(',').map(str::trim) {
        // A private etcd, killed and removed on drop.
        let etcd = if store == "etcd" {
            let start = || Etcd::start_with("bench", &["--quota-backend-bytes=8589934592"]);
            Some(tokio::task::spawn_blocking(start).await.unwrap())
        } else {
            None
        };
        for &n in &pods {
            for &(ev, backlog) in &modes {
                let label = store.to_owned();
                if let Some(etcd) = &etcd {
                    let prefix = format!("/bench-{n}-{ev}-{backlog}");
                    let s = Arc::new(connect_etcd(&etcd.endpoint(), &prefix).await);
                    measure(s, &label, nodes, n, ev, backlog, limit).await;
                } else {
                    let dir: PathBuf = tempfile::tempdir().unwrap().keep();
                    let s = Arc::new(RedbStore::open(dir.join("bench.redb")).unwrap());
                    measure(s, &label, nodes, n, ev, backlog, limit).await;
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
    }
}
