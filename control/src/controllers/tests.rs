//! The controllers end to end over a real `RedbStore` and `ObjectsApi`,
//! without the scheduler or agents: the tests play both, binding pods
//! (`spec.nodeName` through Apply) and reporting them Running and Ready
//! (through `UpdateStatus`) after a delay, as a kubelet would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;
use weir_proto::v1;

use super::{Config, daemonset, deployment, meta};
use crate::api::ObjectsApi;
use crate::store::RedbStore;

type Api = Arc<ObjectsApi<RedbStore>>;

/// A control plane with only the controllers running; stops them on drop.
struct Harness {
    api: Api,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn start(config: Config) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
    let api = Arc::new(ObjectsApi::new(store));
    let (stop, shutdown) = watch::channel(false);
    super::spawn(Arc::clone(&api), config, shutdown);
    Harness {
        api,
        stop,
        _dir: dir,
    }
}

/// Applies `doc` after its namespace.
async fn apply(api: &Api, doc: &Value) -> v1::Object {
    if let Some(ns) = doc["metadata"]["namespace"].as_str() {
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        apply_one(api, &namespace).await;
    }
    apply_one(api, doc).await
}

/// Applies `doc` alone (as field manager `test`).
pub(super) async fn apply_one(api: &ObjectsApi<RedbStore>, doc: &Value) -> v1::Object {
    api.apply(&v1::ApplyRequest {
        manifest_json: doc.to_string(),
        field_manager: "test".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("apply {doc}: {e}"))
    .object
    .unwrap()
}

async fn list<K: DeserializeOwned>(api: &Api, kind: &str, selector: &str) -> Vec<K> {
    api.list(&v1::ListRequest {
        kind: kind.into(),
        namespace: String::new(),
        label_selector: selector.into(),
    })
    .await
    .unwrap()
    .items
    .iter()
    .map(|o| serde_json::from_str(&o.json).unwrap())
    .collect()
}

pub(super) async fn get<K: DeserializeOwned>(
    api: &ObjectsApi<RedbStore>,
    kind: &str,
    ns: &str,
    name: &str,
) -> Option<K> {
    let r = v1::ObjectRef {
        api_version: String::new(),
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
    };
    api.get(&r)
        .await
        .ok()
        .map(|o| serde_json::from_str(&o.json).unwrap())
}

/// The shortest a [`wait_for`] waits: CI runs the crate's ~170 tests in
/// parallel on two cores, where a controller step that takes milliseconds
/// alone has taken over 10 s. A longer wait only delays a failure.
const MIN_WAIT: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Some`, or panics after `timeout` (at
/// least [`MIN_WAIT`]) with `what`.
async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout.max(MIN_WAIT);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn now_string() -> String {
    meta::now().to_string()
}

/// A fake scheduler and kubelet: registers `nodes` and heartbeats them,
/// binds unbound pods (daemon pods to their pinned node, others round-robin
/// over `nodes`), reports them Running and then Ready `ready_after` later,
/// and finishes terminating pods.
async fn kubelet(api: &Api, nodes: Vec<String>, ready_after: Duration) -> watch::Sender<bool> {
    kubelet_holding(api, nodes, ready_after, Arc::new(AtomicBool::new(false))).await
}

/// [`kubelet`], but terminating pods are only finished while `hold` is false.
async fn kubelet_holding(
    api: &Api,
    nodes: Vec<String>,
    ready_after: Duration,
    hold: Arc<AtomicBool>,
) -> watch::Sender<bool> {
    for node in &nodes {
        add_node(api, node, &json!({}), &json!([])).await;
    }
    let (stop, mut stopped) = watch::channel(false);
    let api = Arc::clone(api);
    tokio::spawn(async move {
        let mut seen: HashMap<String, Instant> = HashMap::new();
        let mut next = 0usize;
        let mut last_beat = Instant::now();
        loop {
            if *stopped.borrow() {
                return;
            }
            if last_beat.elapsed() > Duration::from_secs(1) {
                last_beat = Instant::now();
                for node in &nodes {
                    heartbeat(&api, node).await;
                }
            }
            let pods = api
                .list(&v1::ListRequest {
                    kind: "Pod".into(),
                    ..Default::default()
                })
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            for pod in pods
                .iter()
                .filter_map(|o| serde_json::from_str::<Pod>(&o.json).ok())
            {
                if pod.metadata.deletion_timestamp.is_some() && hold.load(Ordering::SeqCst) {
                    continue;
                }
                step(&api, &pod, &nodes, &mut next, &mut seen, ready_after).await;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stopped.changed() => {}
            }
        }
    });
    stop
}

async fn step(
    api: &Api,
    pod: &Pod,
    nodes: &[String],
    next: &mut usize,
    seen: &mut HashMap<String, Instant>,
    ready_after: Duration,
) {
    let ns = meta::namespace(&pod.metadata).to_owned();
    let name = meta::name(&pod.metadata).to_owned();
    if pod.metadata.deletion_timestamp.is_some() {
        let _ = api
            .delete(&v1::DeleteRequest {
                r#ref: Some(pod_ref(&ns, &name)),
                propagation: String::new(),
                grace_period_seconds: Some(0),
            })
            .await;
        return;
    }
    if meta::pod_node(pod).is_empty() {
        let node = daemonset::target_node(pod).or_else(|| {
            let node = nodes.get(*next % nodes.len().max(1)).cloned();
            *next += 1;
            node
        });
        let Some(node) = node else { return };
        let mut doc = serde_json::to_value(pod).unwrap();
        doc["spec"]["nodeName"] = json!(node);
        // Another writer (a controller adopting it) may race us: retry later.
        if let Err(e) = api
            .apply(&v1::ApplyRequest {
                manifest_json: doc.to_string(),
                field_manager: "test-scheduler".into(),
            })
            .await
        {
            tracing::debug!(error = %e, "test scheduler: bind");
        }
        return;
    }
    if meta::pod_ready(pod) {
        return;
    }
    let first = *seen
        .entry(format!("{ns}/{name}"))
        .or_insert_with(Instant::now);
    let ready = first.elapsed() >= ready_after;
    let status = json!({
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
            "lastTransitionTime": now_string()}],
    });
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    if ready || !running {
        let _ = api
            .update_status(&v1::UpdateStatusRequest {
                r#ref: Some(pod_ref(&ns, &name)),
                status_json: status.to_string(),
                resource_version: 0,
            })
            .await;
    }
}

fn pod_ref(ns: &str, name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: String::new(),
        kind: "Pod".into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

fn active(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter().filter(|p| meta::pod_active(p)).collect()
}

async fn event_reasons(api: &Api, involved: &str) -> Vec<String> {
    list::<Value>(api, "Event", "")
        .await
        .into_iter()
        .filter(|e| e["involvedObject"]["name"] == involved)
        .map(|e| {
            format!(
                "{} {}",
                e["reason"].as_str().unwrap_or_default(),
                e["message"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

fn replica_set(name: &str, ns: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "tier": "web"}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1"}]},
            },
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicaset_scales_up_and_down_and_adopts_orphans() {
    let h = start(Config::default());
    let _kubelet = kubelet(
        &h.api,
        vec!["node-a".into(), "node-b".into()],
        Duration::ZERO,
    )
    .await;
    // An orphan that matches the selector is adopted, not duplicated.
    apply(
        &h.api,
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "stray", "namespace": "rs1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "busybox:1"}]}}),
    )
    .await;
    let rs = apply(&h.api, &replica_set("web", "rs1", 3)).await;
    let uid = rs.meta.unwrap().uid;
    let pods = wait_for(Duration::from_secs(10), "3 pods", || async {
        let pods = list::<Pod>(&h.api, "Pod", "app=web").await;
        (active(&pods).len() == 3).then_some(pods)
    })
    .await;
    for pod in &pods {
        let owner = meta::controller_of(&pod.metadata).expect("owned");
        assert_eq!(owner.uid, uid);
        assert_eq!(owner.kind, "ReplicaSet");
        assert_eq!(owner.block_owner_deletion, Some(true));
        assert_eq!(meta::namespace(&pod.metadata), "rs1");
        let name = meta::name(&pod.metadata);
        assert!(
            name == "stray" || (name.starts_with("web-") && name.len() == 9),
            "{name}"
        );
        if name != "stray" {
            assert_eq!(
                meta::labels(&pod.metadata).get("tier").map(String::as_str),
                Some("web")
            );
        }
    }
    let status = wait_for(Duration::from_secs(10), "status 3 ready", || async {
        let rs: ReplicaSet = get(&h.api, "ReplicaSet", "rs1", "web").await?;
        let s = rs.status?;
        (s.ready_replicas == Some(3) && s.available_replicas == Some(3)).then_some(s)
    })
    .await;
    assert_eq!(status.replicas, 3);
    assert_eq!(status.observed_generation, Some(1));
    // The stray pod has no "tier" label.
    assert_eq!(status.fully_labeled_replicas, Some(2));

    apply(&h.api, &replica_set("web", "rs1", 1)).await;
    wait_for(Duration::from_secs(10), "1 pod", || async {
        let pods = list::<Pod>(&h.api, "Pod", "app=web").await;
        (active(&pods).len() == 1).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(10), "status 1", || async {
        let rs: ReplicaSet = get(&h.api, "ReplicaSet", "rs1", "web").await?;
        let s = rs.status?;
        (s.replicas == 1 && s.observed_generation == Some(2)).then_some(())
    })
    .await;
    // Whether the stray was adopted before or after the first creates
    // depends on which informer saw what first; either way every create
    // is matched by a delete, leaving the one pod.
    let events = event_reasons(&h.api, "web").await;
    let count = |prefix: &str| events.iter().filter(|e| e.starts_with(prefix)).count();
    let created = count("SuccessfulCreate Created pod: web-");
    assert!(created >= 2, "{events:?}");
    assert_eq!(
        count("SuccessfulDelete Deleted pod: "),
        created,
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicaset_creates_a_large_scale_up_in_bursts() {
    let h = start(Config {
        burst_replicas: 7,
        ..Config::default()
    });
    apply(&h.api, &replica_set("big", "rs2", 30)).await;
    wait_for(Duration::from_secs(20), "30 pods", || async {
        let pods = list::<Pod>(&h.api, "Pod", "app=big").await;
        (pods.len() == 30).then_some(())
    })
    .await;
    // No overshoot once it settles.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(list::<Pod>(&h.api, "Pod", "app=big").await.len(), 30);
}

fn web_deployment(image: &str, replicas: i32, surge: i32, unavailable: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "dep"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": image}]},
            },
        },
    })
}

fn image_of(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

/// Waits until the Deployment has rolled out `image` on `replicas` ready pods.
async fn wait_rolled_out(api: &Api, image: &str, replicas: i32) -> Deployment {
    wait_for(
        Duration::from_secs(30),
        &format!("rollout of {image}"),
        || async {
            let d: Deployment = get(api, "Deployment", "dep", "web").await?;
            let s = d.status.clone()?;
            let pods = list::<Pod>(api, "Pod", "app=web").await;
            let pods = active(&pods);
            let done = s.updated_replicas == Some(replicas)
                && s.available_replicas == Some(replicas)
                && s.replicas == Some(replicas)
                && pods.len() == usize::try_from(replicas).unwrap()
                && pods
                    .iter()
                    .all(|p| image_of(p) == image && meta::pod_ready(p));
            done.then_some(d)
        },
    )
    .await
}

fn progressing_reason(d: &Deployment) -> Option<String> {
    d.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_.as_deref() == Some("Progressing"))?
        .reason
        .clone()
}

/// Watches the pods of the rollout and records every state outside
/// `[replicas - maxUnavailable ready, replicas + maxSurge pods]`.
fn bounds_monitor(
    api: &Api,
    min_ready: usize,
    max_pods: usize,
) -> (watch::Sender<bool>, Arc<Mutex<Vec<String>>>) {
    let (stop, mut stopped) = watch::channel(false);
    let violations = Arc::new(Mutex::new(Vec::new()));
    let api = Arc::clone(api);
    let out = Arc::clone(&violations);
    tokio::spawn(async move {
        while !*stopped.borrow() {
            let pods = list::<Pod>(&api, "Pod", "app=web").await;
            let pods = active(&pods);
            let ready = pods.iter().filter(|p| meta::pod_ready(p)).count();
            if ready < min_ready || pods.len() > max_pods {
                let images: Vec<String> = pods
                    .iter()
                    .map(|p| format!("{}:{}", image_of(p), meta::pod_ready(p)))
                    .collect();
                out.lock()
                    .unwrap()
                    .push(format!("{} pods, {ready} ready: {images:?}", pods.len()));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = stopped.changed() => {}
            }
        }
    });
    (stop, violations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rolls_out_within_bounds_and_rolls_back_to_the_old_replica_set() {
    let h = start(Config::default());
    let _kubelet = kubelet(
        &h.api,
        vec!["node-a".into(), "node-b".into()],
        Duration::from_millis(200),
    )
    .await;
    let (replicas, surge, unavailable) = (4, 1, 1);
    apply(
        &h.api,
        &web_deployment("web:v1", replicas, surge, unavailable),
    )
    .await;
    let d = wait_rolled_out(&h.api, "web:v1", replicas).await;
    assert_eq!(deployment::revision_of(&d.metadata), 1);
    let first_rs = list::<ReplicaSet>(&h.api, "ReplicaSet", "").await;
    assert_eq!(first_rs.len(), 1);
    let v1_name = meta::name(&first_rs[0].metadata).to_owned();
    let hash = &meta::labels(&first_rs[0].metadata)[meta::TEMPLATE_HASH_LABEL];
    assert_eq!(v1_name, format!("web-{hash}"));
    assert_eq!(hash.len(), 10);
    wait_for(
        Duration::from_secs(10),
        "NewReplicaSetAvailable",
        || async {
            let d: Deployment = get(&h.api, "Deployment", "dep", "web").await?;
            (progressing_reason(&d).as_deref() == Some("NewReplicaSetAvailable")).then_some(())
        },
    )
    .await;

    // v1 -> v2, checked at every observable step.
    let min_ready = usize::try_from(replicas - unavailable).unwrap();
    let max_pods = usize::try_from(replicas + surge).unwrap();
    let (stop, violations) = bounds_monitor(&h.api, min_ready, max_pods);
    apply(
        &h.api,
        &web_deployment("web:v2", replicas, surge, unavailable),
    )
    .await;
    let d = wait_rolled_out(&h.api, "web:v2", replicas).await;
    stop.send_replace(true);
    let seen = violations.lock().unwrap().clone();
    assert!(seen.is_empty(), "bounds violated: {seen:?}");
    assert_eq!(deployment::revision_of(&d.metadata), 2);
    let rss = list::<ReplicaSet>(&h.api, "ReplicaSet", "").await;
    assert_eq!(rss.len(), 2);
    let v1 = rss
        .iter()
        .find(|rs| meta::name(&rs.metadata) == v1_name)
        .unwrap();
    assert_eq!(v1.spec.replicas, Some(0));
    let v2 = rss
        .iter()
        .find(|rs| meta::name(&rs.metadata) != v1_name)
        .unwrap();
    assert_eq!(deployment::revision_of(&v2.metadata), 2);
    let events = event_reasons(&h.api, "web").await;
    let v2_name = meta::name(&v2.metadata);
    assert!(
        events.iter().any(|e| e.starts_with(&format!(
            "ScalingReplicaSet Scaled up replica set {v2_name} to "
        ))),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e == &format!("ScalingReplicaSet Scaled down replica set {v1_name} to 0")),
        "{events:?}"
    );

    // Rollback: the v1 template again reuses v1's ReplicaSet as revision 3.
    let (stop, violations) = bounds_monitor(&h.api, min_ready, max_pods);
    apply(
        &h.api,
        &web_deployment("web:v1", replicas, surge, unavailable),
    )
    .await;
    let d = wait_rolled_out(&h.api, "web:v1", replicas).await;
    stop.send_replace(true);
    let seen = violations.lock().unwrap().clone();
    assert!(seen.is_empty(), "bounds violated on rollback: {seen:?}");
    assert_eq!(deployment::revision_of(&d.metadata), 3);
    let rss = list::<ReplicaSet>(&h.api, "ReplicaSet", "").await;
    assert_eq!(rss.len(), 2, "no new ReplicaSet for a rollback");
    let v1 = rss
        .iter()
        .find(|rs| meta::name(&rs.metadata) == v1_name)
        .unwrap();
    assert_eq!(deployment::revision_of(&v1.metadata), 3);
    assert_eq!(v1.spec.replicas, Some(replicas));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_recreate_and_history_limit() {
    let h = start(Config::default());
    let _kubelet = kubelet(&h.api, vec!["node-a".into()], Duration::from_millis(50)).await;
    let manifest = |image: &str| {
        let mut d = web_deployment(image, 2, 0, 1);
        d["spec"]["strategy"] = json!({"type": "Recreate"});
        d["spec"]["revisionHistoryLimit"] = json!(1);
        d
    };
    apply(&h.api, &manifest("web:v1")).await;
    wait_rolled_out(&h.api, "web:v1", 2).await;
    // Recreate never runs old and new pods together.
    let (stop, mixed) = {
        let (stop, mut stopped) = watch::channel(false);
        let mixed = Arc::new(Mutex::new(Vec::new()));
        let (api, out) = (Arc::clone(&h.api), Arc::clone(&mixed));
        tokio::spawn(async move {
            while !*stopped.borrow() {
                let pods = list::<Pod>(&api, "Pod", "app=web").await;
                let mut images: Vec<String> = pods.iter().map(image_of).collect();
                images.sort();
                images.dedup();
                if images.len() > 1 {
                    out.lock().unwrap().push(images);
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = stopped.changed() => {}
                }
            }
        });
        (stop, mixed)
    };
    apply(&h.api, &manifest("web:v2")).await;
    wait_rolled_out(&h.api, "web:v2", 2).await;
    apply(&h.api, &manifest("web:v3")).await;
    wait_rolled_out(&h.api, "web:v3", 2).await;
    stop.send_replace(true);
    assert!(
        mixed.lock().unwrap().is_empty(),
        "{:?}",
        mixed.lock().unwrap()
    );
    // History limit 1: only the newest old ReplicaSet is kept.
    let rss = wait_for(Duration::from_secs(10), "history cleanup", || async {
        let rss = list::<ReplicaSet>(&h.api, "ReplicaSet", "").await;
        (rss.len() == 2).then_some(rss)
    })
    .await;
    let mut revisions: Vec<i64> = rss
        .iter()
        .map(|rs| deployment::revision_of(&rs.metadata))
        .collect();
    revisions.sort_unstable();
    assert_eq!(revisions, vec![2, 3]);
}

async fn add_node(api: &Api, name: &str, labels: &Value, taints: &Value) {
    apply(
        api,
        &json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints}}),
    )
    .await;
    heartbeat(api, name).await;
}

async fn heartbeat(api: &Api, name: &str) {
    let status = json!({"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
        "lastHeartbeatTime": now_string(), "lastTransitionTime": now_string()}]});
    api.update_status(&v1::UpdateStatusRequest {
        r#ref: Some(v1::ObjectRef {
            api_version: String::new(),
            kind: "Node".into(),
            namespace: String::new(),
            name: name.into(),
        }),
        status_json: status.to_string(),
        resource_version: 0,
    })
    .await
    .unwrap();
}

/// How long the `DaemonSet` test waits for each step: generous, as one CI
/// run (2 cores, every control test in parallel) timed out at 10 s once.
const DS_WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_runs_one_pod_per_eligible_node_and_follows_new_nodes() {
    let h = start(Config::default());
    let _kubelet = kubelet(&h.api, Vec::new(), Duration::ZERO).await;
    add_node(&h.api, "ds-a", &json!({"role": "worker"}), &json!([])).await;
    add_node(&h.api, "ds-b", &json!({"role": "worker"}), &json!([])).await;
    add_node(
        &h.api,
        "ds-gpu",
        &json!({"role": "worker"}),
        &json!([{"key": "gpu", "effect": "NoSchedule"}]),
    )
    .await;
    add_node(&h.api, "ds-db", &json!({"role": "db"}), &json!([])).await;
    apply(
        &h.api,
        &json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": "sys"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}},
                "spec": {"nodeSelector": {"role": "worker"},
                    "containers": [{"name": "c", "image": "agent:1"}]}},
        }}),
    )
    .await;
    let on_nodes = |pods: &[Pod]| {
        let mut nodes: Vec<String> = active(pods)
            .iter()
            .map(|p| meta::pod_node(p).to_owned())
            .collect();
        nodes.sort();
        nodes
    };
    wait_for(DS_WAIT, "pods on ds-a and ds-b", || async {
        let pods = list::<Pod>(&h.api, "Pod", "app=agent").await;
        (on_nodes(&pods) == ["ds-a", "ds-b"]).then_some(())
    })
    .await;
    add_node(&h.api, "ds-c", &json!({"role": "worker"}), &json!([])).await;
    let pods = wait_for(DS_WAIT, "a pod on the new node", || async {
        let pods = list::<Pod>(&h.api, "Pod", "app=agent").await;
        (on_nodes(&pods) == ["ds-a", "ds-b", "ds-c"]).then_some(pods)
    })
    .await;
    for pod in &pods {
        assert_eq!(
            daemonset::target_node(pod).as_deref(),
            Some(meta::pod_node(pod))
        );
        let tolerations = pod.spec.as_ref().unwrap().tolerations.as_ref().unwrap();
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("node.kubernetes.io/unreachable"))
        );
    }
    let status = wait_for(DS_WAIT, "DaemonSet status", || async {
        let ds: DaemonSet = get(&h.api, "DaemonSet", "sys", "agent").await?;
        let s = ds.status?;
        (s.number_ready == 3 && s.number_available == Some(3)).then_some(s)
    })
    .await;
    assert_eq!(status.desired_number_scheduled, 3);
    assert_eq!(status.current_number_scheduled, 3);
    assert_eq!(status.updated_number_scheduled, Some(3));
    assert_eq!(status.number_misscheduled, 0);
    assert_eq!(status.observed_generation, Some(1));
}

fn bound_pod(name: &str, node: &str, tolerations: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "life"},
        "spec": {"nodeName": node, "tolerations": tolerations,
            "containers": [{"name": "c", "image": "busybox:1"}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lifecycle_deletes_pods_of_missing_nodes() {
    let h = start(Config::default());
    add_node(&h.api, "real", &json!({}), &json!([])).await;
    apply(&h.api, &bound_pod("ghost-pod", "no-such-node", &json!([]))).await;
    apply(&h.api, &bound_pod("real-pod", "real", &json!([]))).await;
    wait_for(Duration::from_secs(5), "ghost pod deleted", || async {
        get::<Pod>(&h.api, "Pod", "life", "ghost-pod")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        get::<Pod>(&h.api, "Pod", "life", "real-pod")
            .await
            .is_some()
    );
}

/// Waits until `name` carries both unreachable taints.
async fn wait_unreachable(api: &Api, name: &str) -> Node {
    wait_for(
        Duration::from_secs(8),
        "node tainted unreachable",
        || async {
            let node: Node = get(api, "Node", "", name).await?;
            let taints = node.spec.clone()?.taints?;
            let has = |effect: &str| {
                taints
                    .iter()
                    .any(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == effect)
            };
            (has("NoSchedule") && has("NoExecute")).then_some(node)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lifecycle_taints_evicts_and_untaints() {
    let h = start(Config {
        node_monitor_grace_period: Duration::from_secs(2),
        node_monitor_period: Duration::from_millis(200),
        ..Config::default()
    });
    add_node(&h.api, "life-1", &json!({}), &json!([])).await;
    apply(&h.api, &bound_pod("plain", "life-1", &json!([]))).await;
    apply(
        &h.api,
        &bound_pod("tolerant", "life-1", &json!([{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}])),
    )
    .await;
    // Heartbeats keep the node healthy past the grace period.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        heartbeat(&h.api, "life-1").await;
    }
    let node: Node = get(&h.api, "Node", "", "life-1").await.unwrap();
    assert!(
        node.spec
            .unwrap_or_default()
            .taints
            .unwrap_or_default()
            .is_empty()
    );
    let events = event_reasons(&h.api, "plain").await;
    assert!(
        get::<Pod>(&h.api, "Pod", "life", "plain").await.is_some(),
        "{events:?} {:?}",
        event_reasons(&h.api, "life-1").await
    );

    // Heartbeats stop: Unknown, tainted, the non-tolerating pod evicted.
    let stopped = Instant::now();
    let node = wait_unreachable(&h.api, "life-1").await;
    assert!(
        stopped.elapsed() >= Duration::from_secs(1),
        "tainted before the grace period"
    );
    let ready = node
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "Unknown");
    assert_eq!(ready.reason.as_deref(), Some("NodeStatusUnknown"));
    assert_eq!(
        ready.message.as_deref(),
        Some("Kubelet stopped posting node status.")
    );
    wait_for(Duration::from_secs(5), "plain pod evicted", || async {
        let gone = get::<Pod>(&h.api, "Pod", "life", "plain")
            .await
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
        gone.then_some(())
    })
    .await;
    let tolerant: Pod = get(&h.api, "Pod", "life", "tolerant")
        .await
        .expect("tolerant pod kept");
    assert!(tolerant.metadata.deletion_timestamp.is_none());
    let events = event_reasons(&h.api, "life-1").await;
    assert!(
        events
            .iter()
            .any(|e| e == "NodeNotReady Node life-1 status is now: NodeNotReady"),
        "{events:?}"
    );
    let events = event_reasons(&h.api, "plain").await;
    assert!(
        events.iter().any(|e| e.starts_with("TaintManagerEviction")),
        "{events:?}"
    );

    // Heartbeats resume: the taints go.
    heartbeat(&h.api, "life-1").await;
    wait_for(Duration::from_secs(5), "taints removed", || async {
        let node: Node = get(&h.api, "Node", "", "life-1").await?;
        let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
        taints.is_empty().then_some(())
    })
    .await;
}

async fn delete(api: &Api, kind: &str, ns: &str, name: &str, propagation: &str) {
    api.delete(&v1::DeleteRequest {
        r#ref: Some(v1::ObjectRef {
            api_version: String::new(),
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
        }),
        propagation: propagation.into(),
        grace_period_seconds: None,
    })
    .await
    .unwrap_or_else(|e| panic!("delete {kind} {ns}/{name}: {e}"));
}

/// Pods matching `selector`: (active, terminating).
async fn pod_counts(api: &Api, selector: &str) -> (usize, usize) {
    let pods = list::<Pod>(api, "Pod", selector).await;
    let terminating = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_some())
        .count();
    (pods.len() - terminating, terminating)
}

/// While a foreground delete waits for terminating pods, the controllers
/// must leave the owner alone (no replacement pods, no new `ReplicaSet`);
/// the owner goes once the pods are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_is_left_alone_by_the_controllers() {
    let h = start(Config::default());
    let hold = Arc::new(AtomicBool::new(true));
    let _kubelet = kubelet_holding(
        &h.api,
        vec!["fg-a".into(), "fg-b".into()],
        Duration::ZERO,
        Arc::clone(&hold),
    )
    .await;
    let mut d = web_deployment("web:v1", 3, 1, 0);
    d["metadata"]["namespace"] = json!("fg");
    apply(&h.api, &d).await;
    let ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": "fg"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "c", "image": "agent:1"}]}}}});
    apply(&h.api, &ds).await;
    wait_for(
        Duration::from_secs(10),
        "3 web and 2 agent pods ready",
        || async {
            let ready = |pods: Vec<Pod>| pods.iter().filter(|p| meta::pod_ready(p)).count();
            let web = ready(list::<Pod>(&h.api, "Pod", "app=web").await);
            let agent = ready(list::<Pod>(&h.api, "Pod", "app=agent").await);
            (web == 3 && agent == 2).then_some(())
        },
    )
    .await;

    delete(&h.api, "Deployment", "fg", "web", "Foreground").await;
    delete(&h.api, "DaemonSet", "fg", "agent", "Foreground").await;
    // Everything is terminating, nothing is replaced.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pod_counts(&h.api, "app=web").await, (0, 3));
        assert_eq!(pod_counts(&h.api, "app=agent").await, (0, 2));
        let rss = list::<ReplicaSet>(&h.api, "ReplicaSet", "").await;
        assert_eq!(rss.len(), 1, "a new ReplicaSet during a foreground delete");
        assert!(rss[0].metadata.deletion_timestamp.is_some());
        let d: Deployment = get(&h.api, "Deployment", "fg", "web")
            .await
            .expect("kept until its pods are gone");
        assert!(d.metadata.deletion_timestamp.is_some());
        assert!(
            get::<DaemonSet>(&h.api, "DaemonSet", "fg", "agent")
                .await
                .is_some()
        );
    }

    hold.store(false, Ordering::SeqCst);
    wait_for(Duration::from_secs(10), "everything gone", || async {
        let pods = list::<Pod>(&h.api, "Pod", "").await;
        let rss = list::<ReplicaSet>(&h.api, "ReplicaSet", "").await;
        let d = get::<Deployment>(&h.api, "Deployment", "fg", "web").await;
        let ds = get::<DaemonSet>(&h.api, "DaemonSet", "fg", "agent").await;
        (pods.is_empty() && rss.is_empty() && d.is_none() && ds.is_none()).then_some(())
    })
    .await;
    // And nothing comes back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(list::<Pod>(&h.api, "Pod", "").await.is_empty());
}

/// `OnDelete`: a template change replaces no pod; a pod someone deletes
/// comes back from the new template (once the old one is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_on_delete_replaces_only_deleted_pods() {
    let h = start(Config::default());
    let hold = Arc::new(AtomicBool::new(false));
    let _kubelet = kubelet_holding(
        &h.api,
        vec!["od-a".into(), "od-b".into()],
        Duration::from_millis(300),
        Arc::clone(&hold),
    )
    .await;
    let ds = |image: &str| {
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": "od"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
            "updateStrategy": {"type": "OnDelete"},
            "template": {"metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "c", "image": image}]}}}})
    };
    apply(&h.api, &ds("agent:1")).await;
    let images = |pods: &[Pod]| {
        let mut out: Vec<(String, String)> = pods
            .iter()
            .map(|p| (meta::pod_node(p).to_owned(), image_of(p)))
            .collect();
        out.sort();
        out
    };
    let first = wait_for(Duration::from_secs(10), "2 agent pods ready", || async {
        let pods = list::<Pod>(&h.api, "Pod", "app=agent").await;
        (pods.len() == 2 && pods.iter().all(meta::pod_ready)).then_some(pods)
    })
    .await;
    apply(&h.api, &ds("agent:2")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pods = list::<Pod>(&h.api, "Pod", "app=agent").await;
    assert_eq!(images(&pods), images(&first), "OnDelete replaced a pod");

    // The user deletes the pod on od-a while its kubelet holds it.
    hold.store(true, Ordering::SeqCst);
    let on_a = first.iter().find(|p| meta::pod_node(p) == "od-a").unwrap();
    delete(&h.api, "Pod", "od", meta::name(&on_a.metadata), "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No second pod on od-a while the old one terminates.
    assert_eq!(pod_counts(&h.api, "app=agent").await, (1, 1));
    hold.store(false, Ordering::SeqCst);
    wait_for(Duration::from_secs(10), "a new pod on od-a", || async {
        let pods = list::<Pod>(&h.api, "Pod", "app=agent").await;
        let want = vec![
            ("od-a".to_owned(), "agent:2".to_owned()),
            ("od-b".to_owned(), "agent:1".to_owned()),
        ];
        (images(&pods) == want && pods.iter().all(meta::pod_ready)).then_some(())
    })
    .await;
    let status = wait_for(Duration::from_secs(10), "status", || async {
        let ds: DaemonSet = get(&h.api, "DaemonSet", "od", "agent").await?;
        let s = ds.status?;
        (s.observed_generation == Some(2) && s.number_ready == 2).then_some(s)
    })
    .await;
    assert_eq!(status.updated_number_scheduled, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collector_deletes_orphans_and_old_events_only() {
    let h = start(Config {
        gc_period: Duration::from_millis(200),
        ..Config::default()
    });
    // A live owner's pods stay.
    apply(&h.api, &replica_set("kept", "gc", 2)).await;
    wait_for(Duration::from_secs(10), "2 owned pods", || async {
        (list::<Pod>(&h.api, "Pod", "app=kept").await.len() == 2).then_some(())
    })
    .await;
    // A pod whose controlling owner was never there (as after a crash in
    // the middle of a cascade) goes.
    apply(
        &h.api,
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "orphan", "namespace": "gc", "labels": {"app": "lost"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "lost", "uid": "00000000-0000-4000-8000-000000000000", "controller": true}]},
            "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}),
    )
    .await;
    // An event two hours old goes; a fresh one stays.
    let event = |name: &str, at: &str| {
        json!({"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": "gc"},
            "involvedObject": {"kind": "Pod", "namespace": "gc", "name": "x"},
            "reason": "Test", "message": "m", "type": "Normal",
            "firstTimestamp": at, "lastTimestamp": at, "count": 1})
    };
    let old = (meta::now() - k8s_openapi::jiff::SignedDuration::from_hours(2)).to_string();
    apply(&h.api, &event("old", &old)).await;
    apply(&h.api, &event("fresh", &now_string())).await;
    wait_for(
        Duration::from_secs(10),
        "orphan and old event gone",
        || async {
            let orphan_gone = list::<Pod>(&h.api, "Pod", "app=lost").await.is_empty();
            let events: Vec<k8s_openapi::api::core::v1::Event> = list(&h.api, "Event", "").await;
            let old_gone = !events.iter().any(|e| meta::name(&e.metadata) == "old");
            (orphan_gone && old_gone).then_some(())
        },
    )
    .await;
    let events: Vec<k8s_openapi::api::core::v1::Event> = list(&h.api, "Event", "").await;
    assert!(events.iter().any(|e| meta::name(&e.metadata) == "fresh"));
    assert_eq!(list::<Pod>(&h.api, "Pod", "app=kept").await.len(), 2);
}
