//! `cargo xtask bench api`: p50/p99 latency of the `Objects` API (Apply,
//! Get, namespace List) on a real weir-control (release build) holding
//! 10,000 pods under 20 writes/s of background churn, with the embedded
//! redb store and with etcd in the same run. The baseline is the Kubernetes
//! API-call latency SLO (p99 ≤ 1 s for single-object mutating calls and
//! reads, ≤ 5 s for a namespace-scoped list); the ratio is our worst p99
//! over its SLO.
//!
//! `cargo xtask bench control-rss`: weir-control's resident memory with 3
//! nodes and 100 pods (a Deployment scheduled by its own scheduler and
//! controllers), against the published k3s server figure (~1.5 GB).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use tonic::transport::Channel;
use weir_proto::v1::{self, objects_client::ObjectsClient};

use super::util::{f64_of, ms, percentile, round3, status_bytes};

/// Objects stored before measuring.
const STORED: usize = 10_000;
/// Background writes per second while measuring.
const CHURN_PER_SEC: u64 = 20;
/// Measured calls of each single-object kind.
const CALLS: usize = 500;
/// Measured namespace lists (each returns `STORED` pods).
const LISTS: usize = 20;
/// Kubernetes' SLOs: mutating and single-object calls, namespace list.
const SLO_CALL: Duration = Duration::from_secs(1);
const SLO_LIST: Duration = Duration::from_secs(5);
const NAMESPACE: &str = "bench";
const NODE: &str = "bench-node";

/// A weir-control process on a free loopback port, killed on drop.
struct Control {
    child: Child,
    url: String,
}

impl Control {
    fn start(bin: &Path, store: &str, log: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--store", store])
            // No agents here: the bench node must not be declared lost
            // and its pods evicted while we measure.
            .args(["--node-monitor-grace-period", "1h"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn client(&self) -> anyhow::Result<ObjectsClient<Channel>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match ObjectsClient::connect(self.url.clone()).await {
                Ok(c) => return Ok(c.max_decoding_message_size(256 << 20)),
                Err(e) if Instant::now() > deadline => {
                    bail!("weir-control at {} not answering: {e}", self.url)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(name: &str, churn: u64) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "bench", "churn": churn.to_string()}},
        "spec": {
            "nodeName": NODE,
            "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"],
                "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}}}],
        },
    })
    .to_string()
}

async fn apply(client: &mut ObjectsClient<Channel>, manifest: String) -> anyhow::Result<()> {
    client
        .apply(v1::ApplyRequest {
            manifest_json: manifest,
            field_manager: "bench".into(),
        })
        .await
        .map(drop)
        .map_err(|s| anyhow::anyhow!("apply: {}", s.message()))
}

/// The namespace and the node the bench pods are bound to (Ready, so
/// nothing evicts them; no agent runs them).
async fn prepare(client: &mut ObjectsClient<Channel>) -> anyhow::Result<()> {
    apply(
        client,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
            .to_string(),
    )
    .await?;
    node(client, NODE).await
}

/// A Node object with room for many pods and a Ready condition.
async fn node(client: &mut ObjectsClient<Channel>, name: &str) -> anyhow::Result<()> {
    apply(
        client,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}, "spec": {}})
            .to_string(),
    )
    .await?;
    let now = k8s_now();
    let status = json!({
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "20000"},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "20000"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "lastHeartbeatTime": now, "lastTransitionTime": now}],
    });
    client
        .update_status(v1::UpdateStatusRequest {
            r#ref: Some(v1::ObjectRef {
                kind: "Node".into(),
                name: name.into(),
                ..Default::default()
            }),
            status_json: status.to_string(),
            resource_version: 0,
        })
        .await
        .map_err(|s| anyhow::anyhow!("node status: {}", s.message()))?;
    Ok(())
}

fn k8s_now() -> String {
    // RFC 3339 in whole seconds, as Kubernetes writes times.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    i64::try_from(secs)
        .ok()
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Stores `STORED` pods, 32 writers at a time.
async fn preload(control: &Control) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut client = control.client().await?;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= STORED as u64 {
                    return anyhow::Ok(());
                }
                apply(&mut client, pod(&format!("stored-{i}"), 0)).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(t0.elapsed())
}

/// 20 writes/s (label changes on stored pods) until `stop`; the count.
async fn churn(mut client: ObjectsClient<Channel>, stop: Arc<AtomicBool>) -> anyhow::Result<u64> {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / CHURN_PER_SEC));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let i = n.wrapping_mul(7919) % STORED as u64;
        apply(&mut client, pod(&format!("stored-{i}"), n)).await?;
    }
    Ok(n)
}

fn summary(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    json!({
        "p50_ms": ms(percentile(&v, 50)),
        "p99_ms": ms(percentile(&v, 99)),
        "max_ms": ms(v.last().copied().unwrap_or_default()),
    })
}

/// Measures one store; the figures as JSON and the worst p99/SLO ratio.
async fn measure(bin: &Path, store: &str, dir: &Path) -> anyhow::Result<(serde_json::Value, f64)> {
    let control = Control::start(bin, store, &dir.join("control.log"))?;
    let mut client = control.client().await?;
    prepare(&mut client).await?;
    let preload_time = preload(&control).await?;
    eprintln!(
        "  {STORED} pods stored in {:.1} s",
        preload_time.as_secs_f64()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let churner = tokio::spawn(churn(control.client().await?, stop.clone()));
    let (mut applies, mut gets, mut lists) = (Vec::new(), Vec::new(), Vec::new());
    let t0 = Instant::now();
    for i in 0..CALLS {
        let t = Instant::now();
        apply(&mut client, pod(&format!("measured-{i}"), 0)).await?;
        applies.push(t.elapsed());
        let t = Instant::now();
        client
            .get(v1::ObjectRef {
                kind: "Pod".into(),
                namespace: NAMESPACE.into(),
                name: format!("stored-{}", i * 13 % STORED),
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("get: {}", s.message()))?;
        gets.push(t.elapsed());
    }
    for _ in 0..LISTS {
        let t = Instant::now();
        let list = client
            .list(v1::ListRequest {
                kind: "Pod".into(),
                namespace: NAMESPACE.into(),
                label_selector: String::new(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("list: {}", s.message()))?
            .into_inner();
        lists.push(t.elapsed());
        if list.items.len() < STORED {
            bail!("list returned {} pods, stored {STORED}", list.items.len());
        }
    }
    let window = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let churn_count = churner.await??;
    let rss = status_bytes(control.pid(), "VmRSS")?;
    let mut sorted = applies.clone();
    sorted.sort();
    let apply_p99 = percentile(&sorted, 99);
    let mut sorted_gets = gets.clone();
    sorted_gets.sort();
    let get_p99 = percentile(&sorted_gets, 99);
    let mut sorted_lists = lists.clone();
    sorted_lists.sort();
    let list_p99 = percentile(&sorted_lists, 99);
    let ratio = [
        apply_p99.as_secs_f64() / SLO_CALL.as_secs_f64(),
        get_p99.as_secs_f64() / SLO_CALL.as_secs_f64(),
        list_p99.as_secs_f64() / SLO_LIST.as_secs_f64(),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    let figures = json!({
        "apply": summary(applies),
        "get": summary(gets),
        "list_namespace_10k": summary(lists),
        "churn_writes": churn_count,
        "churn_per_s": round3(f64_of(churn_count) / window.as_secs_f64()),
        "preload_s": round3(preload_time.as_secs_f64()),
        "control_rss_mb": round3(f64_of(rss) / 1e6),
        "worst_p99_over_slo": round3(ratio),
    });
    Ok((figures, ratio))
}

/// Runs `cargo xtask bench api`.
pub fn run(control: &Path) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("weir-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        eprintln!("redb store:");
        let redb_dir = dir.join("redb");
        std::fs::create_dir_all(&redb_dir)?;
        let redb = measure(
            control,
            &redb_dir.join("weir.redb").to_string_lossy(),
            &redb_dir,
        )
        .await?;
        eprintln!("etcd store:");
        let etcd = weir_tests::etcd::Etcd::start(&dir.join("etcd"))?;
        let etcd_dir = dir.join("etcd-control");
        std::fs::create_dir_all(&etcd_dir)?;
        let on_etcd = measure(control, &etcd.store_url(), &etcd_dir).await?;
        drop(etcd);
        anyhow::Ok((redb, on_etcd))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let ((redb, redb_ratio), (etcd, etcd_ratio)) = result?;
    let ratio = redb_ratio.max(etcd_ratio);
    let line = json!({
        "name": "api",
        "stored_objects": STORED,
        "churn_writes_per_s": CHURN_PER_SEC,
        "redb": redb,
        "etcd": etcd,
        "baseline": {"name": "Kubernetes API call latency SLO", "mutating_or_get_p99_ms": ms(SLO_CALL), "namespace_list_p99_ms": ms(SLO_LIST)},
        "ratio": round3(ratio),
        "target": "p99 within the SLO on both stores (ratio <= 1)",
        "target_met": ratio <= 1.0,
    });
    println!("BENCH {line}");
    Ok(())
}

/// Runs `cargo xtask bench control-rss`.
pub fn run_rss(control: &Path) -> anyhow::Result<()> {
    const PODS: u64 = 100;
    const TARGET_MB: f64 = 50.0;
    const K3S_SERVER_MB: f64 = 1500.0;
    let dir = std::env::temp_dir().join(format!("weir-bench-rss-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let c = Control::start(
            control,
            &dir.join("weir.redb").to_string_lossy(),
            &dir.join("control.log"),
        )?;
        let mut client = c.client().await?;
        for i in 1..=3 {
            node(&mut client, &format!("rss-node-{i}")).await?;
        }
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "rss", "namespace": "default"},
            "spec": {"replicas": PODS, "selector": {"matchLabels": {"app": "rss"}},
                "template": {"metadata": {"labels": {"app": "rss"}}, "spec": {"containers": [
                    {"name": "c", "image": "busybox", "command": ["sleep", "3600"],
                     "resources": {"requests": {"cpu": "10m", "memory": "8Mi"}}}]}}},
        });
        apply(&mut client, deployment.to_string()).await?;
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let pods = client
                .list(v1::ListRequest {
                    kind: "Pod".into(),
                    namespace: "default".into(),
                    label_selector: "app=rss".into(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("list: {}", s.message()))?
                .into_inner()
                .items;
            let bound = pods
                .iter()
                .filter(|p| {
                    serde_json::from_str::<serde_json::Value>(&p.json)
                        .is_ok_and(|v| v["spec"]["nodeName"].is_string())
                })
                .count() as u64;
            if bound >= PODS {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {bound} of {PODS} pods created and bound in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Let controllers and caches settle, then read.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss = status_bytes(c.pid(), "VmRSS")?;
        let hwm = status_bytes(c.pid(), "VmHWM")?;
        anyhow::Ok((rss, hwm))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let (rss, hwm) = result?;
    let rss_mb = round3(f64_of(rss) / 1e6);
    let line = json!({
        "name": "control-rss",
        "nodes": 3,
        "pods": PODS,
        "rss_mb": rss_mb,
        "peak_rss_mb": round3(f64_of(hwm) / 1e6),
        "baseline": {"name": "k3s server (published)", "rss_mb": K3S_SERVER_MB},
        "ratio": round3(rss_mb / K3S_SERVER_MB),
        "target": format!("rss <= {TARGET_MB} MB"),
        "target_met": rss_mb <= TARGET_MB,
    });
    println!("BENCH {line}");
    Ok(())
}
