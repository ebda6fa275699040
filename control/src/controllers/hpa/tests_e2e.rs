//! The autoscaler over a real `RedbStore`, `ObjectsApi` and the other
//! controllers, with the tests playing the agents: pods are reported Ready
//! and `MetricsReport`s fed into the metrics store as a node would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Event, Pod};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;
use weir_proto::v1;

use super::super::{Config, meta};
use crate::api::ObjectsApi;
use crate::metrics::MetricsStore;
use crate::store::RedbStore;

type Api = Arc<ObjectsApi<RedbStore>>;

struct Harness {
    api: Api,
    metrics: Arc<MetricsStore>,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn start() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).expect("store"));
    let api = Arc::new(ObjectsApi::new(store));
    let metrics = MetricsStore::new();
    let (stop, shutdown) = watch::channel(false);
    let config = Config {
        metrics: Some(Arc::clone(&metrics)),
        ..Config::default()
    };
    super::super::spawn(Arc::clone(&api), config, shutdown);
    Harness {
        api,
        metrics,
        stop,
        _dir: dir,
    }
}

async fn apply(api: &Api, doc: &Value) {
    api.apply(&v1::ApplyRequest {
        manifest_json: doc.to_string(),
        field_manager: "test".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("apply {doc}: {e}"));
}

async fn list<K: DeserializeOwned>(api: &Api, kind: &str, ns: &str) -> Vec<K> {
    api.list(&v1::ListRequest {
        kind: kind.into(),
        namespace: ns.into(),
        label_selector: String::new(),
    })
    .await
    .expect("list")
    .items
    .iter()
    .map(|o| serde_json::from_str(&o.json).expect("decode"))
    .collect()
}

async fn get<K: DeserializeOwned>(api: &Api, kind: &str, ns: &str, name: &str) -> K {
    let o = api
        .get(&v1::ObjectRef {
            api_version: String::new(),
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
        })
        .await
        .expect("get");
    serde_json::from_str(&o.json).expect("decode")
}

async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Plays a node: reports every pod of `ns` Running and Ready, and every
/// 100 ms sends a report in which the pods share `load()` cores evenly.
fn agent(
    api: &Api,
    metrics: &Arc<MetricsStore>,
    ns: &'static str,
    load: watch::Receiver<f64>,
) -> watch::Sender<bool> {
    let (stop, stopped) = watch::channel(false);
    let api = Arc::clone(api);
    let metrics = Arc::clone(metrics);
    tokio::spawn(async move {
        let session = metrics.session();
        while !*stopped.borrow() {
            let pods: Vec<Pod> = list(&api, "Pod", ns).await;
            let active: Vec<&Pod> = pods.iter().filter(|p| meta::pod_active(p)).collect();
            for pod in active.iter().filter(|p| !meta::pod_ready(p)) {
                // Started and Ready now, as an agent reports it: the HPA
                // counts its cpu from the first sample after that.
                let now = meta::now().to_string();
                let status = json!({"phase": "Running", "startTime": now,
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]});
                let _ = api
                    .update_status(&v1::UpdateStatusRequest {
                        r#ref: Some(v1::ObjectRef {
                            api_version: String::new(),
                            kind: "Pod".into(),
                            namespace: ns.into(),
                            name: meta::name(&pod.metadata).into(),
                        }),
                        status_json: status.to_string(),
                        resource_version: 0,
                    })
                    .await;
            }
            let share = *load.borrow() / f64::from(u32::try_from(active.len().max(1)).unwrap_or(1));
            let samples = active
                .iter()
                .map(|p| v1::PodMetrics {
                    namespace: ns.into(),
                    name: meta::name(&p.metadata).into(),
                    cpu_cores: share,
                    timestamp_ms: meta::now().as_millisecond(),
                    window_ms: 100,
                    ..v1::PodMetrics::default()
                })
                .collect();
            metrics.report(
                session,
                v1::MetricsReport {
                    node_name: "node-a".into(),
                    node: Some(v1::NodeMetrics {
                        name: "node-a".into(),
                        window_ms: 100,
                        ..v1::NodeMetrics::default()
                    }),
                    pods: samples,
                },
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stop
}

fn deployment(ns: &str, requests: bool) -> Value {
    let resources = if requests {
        json!({"requests": {"cpu": "100m"}})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "busybox:1", "resources": resources}]},
            },
        },
    })
}

fn hpa(ns: &str, target: &str) -> Value {
    json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": 1, "maxReplicas": 6,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 3}},
        },
    })
}

async fn namespace(api: &Api, ns: &str) {
    apply(
        api,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
}

fn condition(h: &HorizontalPodAutoscaler, type_: &str) -> Option<(String, String, String)> {
    h.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

async fn events(api: &Api, ns: &str) -> Vec<(String, String)> {
    list::<Event>(api, "Event", ns)
        .await
        .into_iter()
        .filter(|e| e.involved_object.kind.as_deref() == Some("HorizontalPodAutoscaler"))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

async fn replicas(api: &Api, ns: &str) -> i32 {
    get::<Deployment>(api, "Deployment", ns, "web")
        .await
        .spec
        .replicas
        .unwrap_or(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_up_on_load_and_down_after_the_stabilization_window() {
    let h = start();
    let ns = "hpa-up-down";
    namespace(&h.api, ns).await;
    apply(&h.api, &deployment(ns, true)).await;
    // 0.2 cores over 100m requests at a 50% target: 4 replicas.
    let (load, load_rx) = watch::channel(0.2);
    let _agent = agent(&h.api, &h.metrics, ns, load_rx);
    apply(&h.api, &hpa(ns, "web")).await;
    let started = Instant::now();
    wait_for(Duration::from_secs(20), "scale up to 4", || async {
        (replicas(&h.api, ns).await == 4).then_some(())
    })
    .await;
    let reacted = started.elapsed();
    assert!(reacted < Duration::from_secs(5), "took {reacted:?}");
    let got: HorizontalPodAutoscaler = wait_for(Duration::from_secs(10), "status", || async {
        let got: HorizontalPodAutoscaler = get(&h.api, "HorizontalPodAutoscaler", ns, "web").await;
        (got.status.as_ref().map(|s| s.desired_replicas) == Some(4)).then_some(got)
    })
    .await;
    let active = condition(&got, "ScalingActive").expect("ScalingActive");
    assert_eq!(
        (active.0.as_str(), active.1.as_str()),
        ("True", "ValidMetricFound")
    );
    assert!(
        got.status
            .as_ref()
            .and_then(|s| s.last_scale_time.as_ref())
            .is_some()
    );
    let ev = events(&h.api, ns).await;
    assert!(
        ev.iter().any(|(r, m)| r == "SuccessfulRescale"
            && m == "New size: 4; reason: cpu resource utilization (percentage of request) above target"),
        "{ev:?}"
    );
    // Load gone: down to 1, but only after the 3 s window.
    load.send_replace(0.01);
    let dropped = Instant::now();
    let stabilized: HorizontalPodAutoscaler =
        wait_for(Duration::from_secs(10), "ScaleDownStabilized", || async {
            let got: HorizontalPodAutoscaler =
                get(&h.api, "HorizontalPodAutoscaler", ns, "web").await;
            (condition(&got, "AbleToScale").map(|c| c.1) == Some("ScaleDownStabilized".into()))
                .then_some(got)
        })
        .await;
    assert_eq!(stabilized.spec.max_replicas, 6);
    assert_eq!(replicas(&h.api, ns).await, 4, "still within the window");
    wait_for(Duration::from_secs(20), "scale down to 1", || async {
        (replicas(&h.api, ns).await == 1).then_some(())
    })
    .await;
    let waited = dropped.elapsed();
    assert!(
        waited >= Duration::from_secs(3),
        "scaled down after {waited:?}"
    );
    let ev = events(&h.api, ns).await;
    assert!(
        ev.iter().any(|(r, m)| r == "SuccessfulRescale"
            && m == "New size: 1; reason: All metrics below target"),
        "{ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_and_missing_requests_are_reported_in_conditions() {
    let h = start();
    let ns = "hpa-bad";
    namespace(&h.api, ns).await;
    apply(&h.api, &deployment(ns, false)).await;
    let (_load, load_rx) = watch::channel(0.2);
    let _agent = agent(&h.api, &h.metrics, ns, load_rx);
    apply(&h.api, &hpa(ns, "nowhere")).await;
    let got: HorizontalPodAutoscaler =
        wait_for(Duration::from_secs(10), "FailedGetScale", || async {
            let got: HorizontalPodAutoscaler =
                get(&h.api, "HorizontalPodAutoscaler", ns, "web").await;
            condition(&got, "AbleToScale").is_some().then_some(got)
        })
        .await;
    let able = condition(&got, "AbleToScale").expect("AbleToScale");
    assert_eq!(
        (able.0.as_str(), able.1.as_str()),
        ("False", "FailedGetScale")
    );
    assert!(
        able.2.contains("deployments.apps \"nowhere\" not found"),
        "{able:?}"
    );
    // Pointed at the deployment without cpu requests.
    apply(&h.api, &hpa(ns, "web")).await;
    let got: HorizontalPodAutoscaler = wait_for(
        Duration::from_secs(10),
        "FailedGetResourceMetric",
        || async {
            let got: HorizontalPodAutoscaler =
                get(&h.api, "HorizontalPodAutoscaler", ns, "web").await;
            (condition(&got, "ScalingActive").map(|c| c.1)
                == Some("FailedGetResourceMetric".into()))
            .then_some(got)
        },
    )
    .await;
    let active = condition(&got, "ScalingActive").expect("ScalingActive");
    assert_eq!(active.0, "False");
    assert!(
        active
            .2
            .contains("missing request for cpu in container app of Pod web-"),
        "{active:?}"
    );
    let ev = wait_for(Duration::from_secs(5), "warning events", || async {
        let ev = events(&h.api, ns).await;
        let reasons: Vec<&str> = ev.iter().map(|(r, _)| r.as_str()).collect();
        (reasons.contains(&"FailedGetScale") && reasons.contains(&"FailedComputeMetricsReplicas"))
            .then_some(ev)
    })
    .await;
    assert!(
        ev.iter().any(|(r, _)| r == "FailedGetResourceMetric"),
        "{ev:?}"
    );
    assert_eq!(replicas(&h.api, ns).await, 1, "never scaled");
}
