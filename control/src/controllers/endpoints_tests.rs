//! The endpoints controller in-process over a `RedbStore`: pods join and
//! leave a Service's slice as they become ready, get an IP or go;
//! `publishNotReadyAddresses`; named targetPorts; the slice goes with its
//! Service; Warning events when a slice write fails or the Service selects
//! more pods than a slice holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use tokio::sync::watch;
use weir_proto::v1;

use super::Config;
use super::endpoints::{
    FAILED_UPDATE, MANAGED_BY, MANAGED_BY_LABEL, OVER_CAPACITY, SERVICE_NAME_LABEL,
};
use crate::api::ObjectsApi;
use crate::store::{Compare, KeyValue, Op, RedbStore, Store, StoreError, TxnResult, WatchReceiver};

type Api<S = RedbStore> = Arc<ObjectsApi<S>>;

struct Harness<S: Store = RedbStore> {
    api: Api<S>,
    store: Arc<S>,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl<S: Store> Drop for Harness<S> {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn start() -> Harness {
    start_with(|s| s)
}

/// The controllers over a redb store wrapped by `wrap`.
fn start_with<S: Store>(wrap: impl FnOnce(RedbStore) -> S) -> Harness<S> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(wrap(
        RedbStore::open(dir.path().join("store.redb")).unwrap(),
    ));
    let api = Arc::new(ObjectsApi::new(Arc::clone(&store)));
    let (stop, shutdown) = watch::channel(false);
    super::spawn(Arc::clone(&api), Config::default(), shutdown);
    Harness {
        api,
        store,
        stop,
        _dir: dir,
    }
}

/// A store whose writes of `EndpointSlice`s fail while `failing` is set (an
/// unreachable etcd, a full disk).
struct FailingSlices {
    inner: RedbStore,
    failing: AtomicBool,
}

const SLICES: &str = "/discovery.k8s.io/endpointslices/";

impl Store for FailingSlices {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        self.inner.list(prefix).await
    }

    async fn txn(
        &self,
        compares: Vec<(String, Compare)>,
        ops: Vec<Op>,
    ) -> Result<TxnResult, StoreError> {
        if self.failing.load(Ordering::SeqCst) && ops.iter().any(|o| o.key().starts_with(SLICES)) {
            return Err(StoreError::Backend {
                op: "txn",
                target: "test store".into(),
                reason: "disk full".into(),
            });
        }
        self.inner.txn(compares, ops).await
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<WatchReceiver, StoreError> {
        self.inner.watch(prefix, from_revision).await
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision().await
    }
}

async fn apply<S: Store>(api: &ObjectsApi<S>, doc: &Value) {
    api.apply(&v1::ApplyRequest {
        manifest_json: doc.to_string(),
        field_manager: "test".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("apply {doc}: {e}"));
}

fn obj_ref(kind: &str, name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: String::new(),
        kind: kind.into(),
        namespace: "default".into(),
        name: name.into(),
    }
}

/// A pod labelled `app: web` with a container port `http` (unless `port_name` is empty).
async fn pod<S: Store>(api: &ObjectsApi<S>, name: &str, port_name: &str, port: i32) {
    let mut c = json!({"name": "c", "image": "busybox"});
    if !port_name.is_empty() {
        c["ports"] = json!([{"name": port_name, "containerPort": port}]);
    }
    apply(
        api,
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [c]}}),
    )
    .await;
}

async fn set_status<S: Store>(api: &ObjectsApi<S>, name: &str, ip: &str, ready: bool) {
    let status = json!({"phase": "Running", "podIP": ip,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]});
    api.update_status(&v1::UpdateStatusRequest {
        r#ref: Some(obj_ref("Pod", name)),
        status_json: status.to_string(),
        resource_version: 0,
    })
    .await
    .unwrap();
}

async fn slice<S: Store>(api: &ObjectsApi<S>, name: &str) -> Option<EndpointSlice> {
    let o = api.get(&obj_ref("EndpointSlice", name)).await.ok()?;
    Some(serde_json::from_str(&o.json).unwrap())
}

/// `(ip, ready)` of every endpoint, sorted, and the slice's port numbers.
fn summary(s: &EndpointSlice) -> (Vec<(String, bool)>, Vec<i32>) {
    let mut eps: Vec<(String, bool)> = s
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false);
            (e.addresses[0].clone(), ready)
        })
        .collect();
    eps.sort();
    let ports = s.ports.iter().flatten().filter_map(|p| p.port).collect();
    (eps, ports)
}

async fn wait_slice<S: Store>(
    api: &ObjectsApi<S>,
    name: &str,
    what: &str,
    want: impl Fn(&EndpointSlice) -> bool,
) -> EndpointSlice {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = slice(api, name).await;
        if let Some(s) = got.as_ref().filter(|s| want(s)) {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; slice is {:?}",
            got.as_ref().map(summary)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn service(name: &str, target: &Value, publish: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "publishNotReadyAddresses": publish,
            "ports": [{"name": "web", "port": 80, "targetPort": target}]}})
}

fn ready(ip: &str, r: bool) -> (String, bool) {
    (ip.to_owned(), r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_join_and_leave_as_they_become_ready_and_go() {
    let h = start();
    let api = &h.api;
    apply(api, &service("web", &json!(8080), false)).await;
    let s = wait_slice(api, "web", "an empty slice", |s| summary(s).1 == [8080]).await;
    assert!(summary(&s).0.is_empty());
    let labels = s.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(SERVICE_NAME_LABEL).map(String::as_str),
        Some("web")
    );
    assert_eq!(
        labels.get(MANAGED_BY_LABEL).map(String::as_str),
        Some(MANAGED_BY)
    );
    let owner = &s.metadata.owner_references.clone().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Service", Some(true))
    );

    pod(api, "web-a", "", 0).await;
    pod(api, "web-b", "", 0).await;
    // No IP yet: not listed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(summary(&slice(api, "web").await.unwrap()).0.is_empty());
    set_status(api, "web-a", "10.244.1.2", true).await;
    set_status(api, "web-b", "10.244.1.3", false).await;
    wait_slice(api, "web", "a ready, b not ready", |s| {
        summary(s).0 == [ready("10.244.1.2", true), ready("10.244.1.3", false)]
    })
    .await;
    set_status(api, "web-b", "10.244.1.3", true).await;
    set_status(api, "web-a", "10.244.1.2", false).await;
    wait_slice(api, "web", "b ready, a not", |s| {
        summary(s).0 == [ready("10.244.1.2", false), ready("10.244.1.3", true)]
    })
    .await;
    api.delete(&v1::DeleteRequest {
        r#ref: Some(obj_ref("Pod", "web-a")),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_slice(api, "web", "a gone", |s| {
        summary(s).0 == [ready("10.244.1.3", true)]
    })
    .await;
    api.delete(&v1::DeleteRequest {
        r#ref: Some(obj_ref("Service", "web")),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while slice(api, "web").await.is_some() {
        assert!(Instant::now() < deadline, "slice outlived its service");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // And the controller does not bring it back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(slice(api, "web").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_not_ready_and_named_target_ports() {
    let h = start();
    let api = &h.api;
    pod(api, "web-a", "http", 8080).await;
    pod(api, "web-b", "http", 8080).await;
    pod(api, "web-c", "other", 9090).await;
    set_status(api, "web-a", "10.244.1.2", true).await;
    set_status(api, "web-b", "10.244.1.3", false).await;
    set_status(api, "web-c", "10.244.1.4", true).await;
    apply(api, &service("named", &json!("http"), false)).await;
    // c lacks the port name: left out; the port resolves to 8080.
    wait_slice(api, "named", "a and b on 8080", |s| {
        summary(s)
            == (
                vec![ready("10.244.1.2", true), ready("10.244.1.3", false)],
                vec![8080],
            )
    })
    .await;
    apply(api, &service("all", &json!(7000), true)).await;
    wait_slice(api, "all", "every pod ready", |s| {
        summary(s)
            == (
                vec![
                    ready("10.244.1.2", true),
                    ready("10.244.1.3", true),
                    ready("10.244.1.4", true),
                ],
                vec![7000],
            )
    })
    .await;
    // A terminating pod: not ready, serving while it is, terminating.
    apply(
        api,
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
    )
    .await;
    let doc = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-t", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox",
            "ports": [{"name": "http", "containerPort": 8080}]}]}});
    apply(api, &doc).await;
    set_status(api, "web-t", "10.244.1.9", true).await;
    wait_slice(api, "named", "t listed", |s| summary(s).0.len() == 3).await;
    api.delete(&v1::DeleteRequest {
        r#ref: Some(obj_ref("Pod", "web-t")),
        grace_period_seconds: Some(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let s = wait_slice(api, "named", "t terminating", |s| {
        summary(s).0.contains(&ready("10.244.1.9", false))
    })
    .await;
    let t = s
        .endpoints
        .iter()
        .flatten()
        .find(|e| e.addresses[0] == "10.244.1.9")
        .unwrap();
    let c = t.conditions.clone().unwrap();
    assert_eq!((c.serving, c.terminating), (Some(true), Some(true)));
    assert_eq!(t.node_name.as_deref(), Some("n1"));
}

/// `(type, reason, message)` of the events about Service `name`.
async fn service_events<S: Store>(
    api: &ObjectsApi<S>,
    name: &str,
) -> Vec<(String, String, String)> {
    let list = api
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
        .filter(|e| e["involvedObject"]["kind"] == "Service" && e["involvedObject"]["name"] == name)
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (text("type"), text("reason"), text("message"))
        })
        .collect()
}

async fn wait_events<S: Store>(
    api: &ObjectsApi<S>,
    name: &str,
    what: &str,
    want: impl Fn(&[(String, String, String)]) -> bool,
) -> Vec<(String, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = service_events(api, name).await;
        if want(&got) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; events: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_slice_write_is_a_warning_on_the_service_and_is_retried() {
    let h = start_with(|inner| FailingSlices {
        inner,
        failing: AtomicBool::new(true),
    });
    let api = &h.api;
    pod(api, "web-a", "", 0).await;
    set_status(api, "web-a", "10.244.1.2", true).await;
    apply(api, &service("web", &json!(8080), false)).await;
    let events = wait_events(api, "web", "a FailedToUpdateEndpointSlices warning", |e| {
        e.iter().any(|(_, r, _)| r == FAILED_UPDATE)
    })
    .await;
    let (kind, _, message) = events.iter().find(|(_, r, _)| r == FAILED_UPDATE).unwrap();
    assert_eq!(kind, "Warning");
    assert!(
        message.starts_with("Error updating Endpoint Slices for Service default/web: ")
            && message.contains("disk full"),
        "{message}"
    );
    assert!(slice(api, "web").await.is_none());
    // Once the store takes writes again, the retry writes the slice.
    h.store.failing.store(false, Ordering::SeqCst);
    wait_slice(api, "web", "the slice after the store recovered", |s| {
        summary(s).0 == [ready("10.244.1.2", true)]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_over_a_slices_capacity_is_warned_about_once() {
    let h = start();
    let api = &h.api;
    let max = weir_proto::manifest::MAX_ENDPOINTS;
    let extra = 3;
    for i in 0..max + extra {
        let name = format!("web-{i:04}");
        pod(api, &name, "", 0).await;
        let ip = format!("10.244.{}.{}", 10 + i / 250, 1 + i % 250);
        set_status(api, &name, &ip, true).await;
    }
    apply(api, &service("big", &json!(8080), false)).await;
    let s = wait_slice(api, "big", "a full slice", |s| summary(s).0.len() == max).await;
    assert_eq!(s.endpoints.as_ref().map(Vec::len), Some(max));
    let events = wait_events(api, "big", "an over-capacity warning", |e| {
        e.iter().any(|(_, r, _)| r == OVER_CAPACITY)
    })
    .await;
    let (kind, _, message) = events.iter().find(|(_, r, _)| r == OVER_CAPACITY).unwrap();
    assert_eq!(kind, "Warning");
    assert_eq!(
        message,
        &format!(
            "Service default/big selects {} pods; its EndpointSlice holds at most {max} endpoints, {extra} are left out",
            max + extra
        )
    );
    // More pod changes while still over: no new warning.
    for i in 0..5 {
        set_status(
            api,
            &format!("web-{i:04}"),
            &format!("10.244.9.{}", i + 1),
            true,
        )
        .await;
    }
    wait_slice(api, "big", "the changed IPs listed", |s| {
        summary(s).0.iter().any(|(ip, _)| ip == "10.244.9.5")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warnings = service_events(api, "big")
        .await
        .into_iter()
        .filter(|(_, r, _)| r == OVER_CAPACITY)
        .count();
    assert_eq!(warnings, 1, "warned again while still over capacity");
    // No warning for a Service under the limit.
    assert!(service_events(api, "web").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_without_an_ipv4_address_are_not_listed() {
    let h = start();
    let api = &h.api;
    pod(api, "web-a", "", 0).await;
    pod(api, "web-b", "", 0).await;
    set_status(api, "web-a", "10.244.1.2", true).await;
    set_status(api, "web-b", "fd00::5", true).await;
    apply(api, &service("web", &json!(8080), false)).await;
    wait_slice(api, "web", "only the IPv4 pod", |s| {
        summary(s).0 == [ready("10.244.1.2", true)]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        service_events(api, "web").await.is_empty(),
        "{:?}",
        service_events(api, "web").await
    );
}
