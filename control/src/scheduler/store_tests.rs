//! The scheduler in process over a real `RedbStore` (temp dir) and
//! `ObjectsApi`: Node objects applied with a Ready status, pods applied,
//! bindings and reports read back through the API.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;
use weir_proto::v1;

use super::testutil::set_node_ready;
use super::{Config, run};
use crate::api::ObjectsApi;
use crate::store::RedbStore;

const LIMIT: Duration = Duration::from_secs(20);

struct Cluster {
    api: Arc<ObjectsApi<RedbStore>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn pod_ref(name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: "v1".into(),
        kind: "Pod".into(),
        namespace: "default".into(),
        name: name.into(),
    }
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
        let api = Arc::new(ObjectsApi::new(store));
        Self {
            api,
            stop: None,
            task: None,
            _dir: dir,
        }
    }

    /// Starts the scheduler (tests add their nodes first, so that no pod
    /// is tried before the nodes are known).
    fn run(&mut self) {
        let (stop, stopped) = oneshot::channel::<()>();
        let config = Config {
            unschedulable_flush_seconds: 2,
            ..Config::default()
        };
        self.task = Some(tokio::spawn(run(
            Arc::clone(&self.api),
            config,
            async move {
                let _ = stopped.await;
            },
        )));
        self.stop = Some(stop);
    }

    async fn apply(&self, doc: &Value) {
        self.api
            .apply(&v1::ApplyRequest {
                manifest_json: doc.to_string(),
                field_manager: "test".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("apply {doc}: {e}"));
    }

    /// A Ready node with `cpu` cores; `spec` and `labels` as given.
    async fn node(&self, name: &str, cpu: &str, labels: &Value, spec: &Value) {
        let mut all_labels = json!({"kubernetes.io/hostname": name});
        for (k, v) in labels.as_object().into_iter().flatten() {
            all_labels[k] = v.clone();
        }
        self.apply(&json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": all_labels}, "spec": spec}))
            .await;
        set_node_ready(&self.api, name, cpu, "8Gi").await;
    }

    /// A pod asking for `cpu`; `meta` and `spec` merged into the manifest.
    async fn pod(&self, name: &str, cpu: &str, meta: &Value, spec: &Value) {
        let mut doc = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "busybox",
                "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]}});
        for (k, v) in meta.as_object().into_iter().flatten() {
            doc["metadata"][k] = v.clone();
        }
        for (k, v) in spec.as_object().into_iter().flatten() {
            doc["spec"][k] = v.clone();
        }
        self.apply(&doc).await;
    }

    async fn get(&self, name: &str) -> Option<Value> {
        let o = self.api.get(&pod_ref(name)).await.ok()?;
        Some(serde_json::from_str(&o.json).unwrap())
    }

    async fn wait<T>(&self, what: &str, mut f: impl AsyncFnMut(&Self) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Some(v) = f(self).await {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_bound(&self, name: &str) -> String {
        self.wait(&format!("{name} bound"), async |c| {
            let pod = c.get(name).await?;
            pod["spec"]["nodeName"]
                .as_str()
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        })
        .await
    }

    async fn events(&self, name: &str) -> Vec<(String, String, String)> {
        let list = self
            .api
            .list(&v1::ListRequest {
                kind: "Event".into(),
                namespace: "default".into(),
                label_selector: String::new(),
            })
            .await
            .unwrap();
        list.items
            .iter()
            .map(|o| serde_json::from_str::<Value>(&o.json).unwrap())
            .filter(|e| e["involvedObject"]["name"] == name)
            .map(|e| {
                let s = |f: &str| e[f].as_str().unwrap_or_default().to_owned();
                (s("type"), s("reason"), s("message"))
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_replicas_over_nodes_and_records_scheduled() {
    let mut c = Cluster::start();
    for n in ["n1", "n2", "n3"] {
        c.node(n, "4", &json!({}), &json!({})).await;
    }
    c.run();
    let owner = json!({"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": "web", "uid": "rs-uid-1", "controller": true, "blockOwnerDeletion": true}]});
    for i in 0..6 {
        c.pod(&format!("web-{i}"), "100m", &owner, &json!({})).await;
    }
    let mut per_node = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..6 {
        *per_node
            .entry(c.wait_bound(&format!("web-{i}")).await)
            .or_default() += 1;
    }
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{per_node:?}"
    );
    let pod = c.get("web-0").await.unwrap();
    let node = pod["spec"]["nodeName"].as_str().unwrap().to_owned();
    let conditions = pod["status"]["conditions"].as_array().unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "PodScheduled" && c["status"] == "True"),
        "{conditions:?}"
    );
    let events = c
        .wait("Scheduled event", async |c| {
            let e = c.events("web-0").await;
            (!e.is_empty()).then_some(e)
        })
        .await;
    assert_eq!(
        events,
        [(
            "Normal".into(),
            "Scheduled".into(),
            format!("Successfully assigned default/web-0 to {node}")
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taints_selectors_and_affinity_place_pods_where_manifests_say() {
    let mut c = Cluster::start();
    c.node(
        "tainted",
        "4",
        &json!({}),
        &json!({"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}),
    )
    .await;
    c.node("ssd", "4", &json!({"disk": "ssd"}), &json!({}))
        .await;
    c.node("plain", "4", &json!({}), &json!({})).await;
    c.run();
    c.pod(
        "wants-ssd",
        "100m",
        &json!({}),
        &json!({"nodeSelector": {"disk": "ssd"}}),
    )
    .await;
    c.pod("pinned", "100m", &json!({}), &json!({
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["tainted"]}]}]}}}}))
    .await;
    c.pod(
        "db",
        "100m",
        &json!({"labels": {"app": "db"}}),
        &json!({"nodeSelector": {"disk": "ssd"}}),
    )
    .await;
    assert_eq!(c.wait_bound("db").await, "ssd");
    c.pod("near-db", "100m", &json!({}), &json!({"affinity": {"podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "db"}},
            "topologyKey": "kubernetes.io/hostname"}]}}}))
    .await;
    c.pod("away-from-db", "100m", &json!({}), &json!({
        "nodeSelector": {"kubernetes.io/hostname": "ssd"},
        "affinity": {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "db"}},
            "topologyKey": "kubernetes.io/hostname"}]}}}))
    .await;
    for i in 0..4 {
        c.pod(&format!("plain-{i}"), "100m", &json!({}), &json!({}))
            .await;
    }
    assert_eq!(c.wait_bound("wants-ssd").await, "ssd");
    assert_eq!(c.wait_bound("pinned").await, "tainted");
    assert_eq!(c.wait_bound("db").await, "ssd");
    assert_eq!(c.wait_bound("near-db").await, "ssd");
    for i in 0..4 {
        assert_ne!(
            c.wait_bound(&format!("plain-{i}")).await,
            "tainted",
            "plain-{i} ignored the taint"
        );
    }
    let message = c
        .wait("away-from-db unschedulable", async |c| {
            let pod = c.get("away-from-db").await?;
            let cond = pod["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "PodScheduled")?
                .clone();
            assert_eq!(cond["status"], "False");
            assert_eq!(cond["reason"], "Unschedulable");
            cond["message"].as_str().map(str::to_owned)
        })
        .await;
    assert_eq!(
        message,
        "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, \
         1 node(s) didn't match pod anti-affinity rules, 1 node(s) had untolerated taint {dedicated: db}. \
         preemption: 0/3 nodes are available: 1 No preemption victims found for incoming pod, \
         2 Preemption is not helpful for scheduling."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_cpu_is_reported_then_bound_when_a_node_is_added() {
    let mut c = Cluster::start();
    c.node("small-1", "1", &json!({}), &json!({})).await;
    c.node("small-2", "1", &json!({}), &json!({})).await;
    c.run();
    c.pod("big", "3", &json!({}), &json!({})).await;
    let expected = "0/2 nodes are available: 2 Insufficient cpu. \
        preemption: 0/2 nodes are available: 2 No preemption victims found for incoming pod.";
    c.wait("Unschedulable condition", async |c| {
        let pod = c.get("big").await?;
        let conds = pod["status"]["conditions"].as_array()?.clone();
        conds
            .iter()
            .any(|x| {
                x["type"] == "PodScheduled" && x["status"] == "False" && x["message"] == expected
            })
            .then_some(())
    })
    .await;
    let events = c
        .wait("FailedScheduling", async |c| {
            let e = c.events("big").await;
            (!e.is_empty()).then_some(e)
        })
        .await;
    assert_eq!(
        events,
        [(
            "Warning".into(),
            "FailedScheduling".into(),
            expected.to_owned()
        )]
    );
    // Retried when the cluster changes, not before: still pending a bit later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.get("big").await.unwrap()["spec"]["nodeName"].is_null());
    c.node("big-node", "4", &json!({}), &json!({})).await;
    assert_eq!(c.wait_bound("big").await, "big-node");
    // Still only one FailedScheduling: the message never changed.
    let failed = c
        .events("big")
        .await
        .iter()
        .filter(|e| e.1 == "FailedScheduling")
        .count();
    assert_eq!(failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_evicts_a_lower_priority_pod_for_a_higher_one() {
    let mut c = Cluster::start();
    c.node("only", "1", &json!({}), &json!({})).await;
    c.run();
    c.pod("low", "800m", &json!({}), &json!({"priority": 1}))
        .await;
    assert_eq!(c.wait_bound("low").await, "only");
    c.pod("high", "800m", &json!({}), &json!({"priority": 1000}))
        .await;
    // The victim is deleted (or marked terminating by a graceful delete;
    // no agent runs here, so finish that delete as the agent would).
    c.wait("low evicted", async |c| match c.get("low").await {
        None => Some(()),
        Some(pod) if !pod["metadata"]["deletionTimestamp"].is_null() => {
            let _ = c
                .api
                .delete(&v1::DeleteRequest {
                    r#ref: Some(pod_ref("low")),
                    propagation: String::new(),
                    grace_period_seconds: Some(0),
                })
                .await;
            None
        }
        Some(_) => None,
    })
    .await;
    assert_eq!(c.wait_bound("high").await, "only");
    let events = c.events("low").await;
    let uid = c.get("high").await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        events.contains(&(
            "Normal".into(),
            "Preempted".into(),
            format!("Preempted by pod {uid} on node only")
        )),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_writes_node_name_once_and_refuses_other_uids_and_bound_pods() {
    let c = Cluster::start();
    c.pod("p", "100m", &json!({}), &json!({})).await;
    let uid = c.get("p").await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = c
        .api
        .bind("default", "p", "not-the-uid", "n1")
        .await
        .unwrap_err();
    assert!(
        matches!(other, crate::api::ApiError::Conflict { .. }),
        "{other}"
    );
    let bound = c.api.bind("default", "p", &uid, "n1").await.unwrap();
    let doc: Value = serde_json::from_str(&bound.json).unwrap();
    assert_eq!(doc["spec"]["nodeName"], "n1");
    assert_eq!(
        doc["metadata"]["resourceVersion"],
        bound.meta.unwrap().resource_version.to_string()
    );
    let again = c.api.bind("default", "p", &uid, "n2").await.unwrap_err();
    assert_eq!(
        again.to_string(),
        "pod default/p is already assigned to node \"n1\""
    );
    assert_eq!(c.get("p").await.unwrap()["spec"]["nodeName"], "n1");
    let missing = c.api.bind("default", "nope", "", "n1").await.unwrap_err();
    assert!(
        matches!(missing, crate::api::ApiError::NotFound { .. }),
        "{missing}"
    );
}
