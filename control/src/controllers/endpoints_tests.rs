//! The endpoints controller in-process over a `RedbStore`: pods join and
//! leave a Service's slice as they become ready, get an IP or go;
//! `publishNotReadyAddresses`; named targetPorts; the slice goes with its Service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};
use tokio::sync::watch;
use weir_proto::v1;

use super::Config;
use super::endpoints::{MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL};
use crate::api::ObjectsApi;
use crate::store::RedbStore;

type Api = Arc<ObjectsApi<RedbStore>>;

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

fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
    let api = Arc::new(ObjectsApi::new(store));
    let (stop, shutdown) = watch::channel(false);
    super::spawn(Arc::clone(&api), Config::default(), shutdown);
    Harness {
        api,
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

fn obj_ref(kind: &str, name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: String::new(),
        kind: kind.into(),
        namespace: "default".into(),
        name: name.into(),
    }
}

/// A pod labelled `app: web` with a container port `http` (unless `port_name` is empty).
async fn pod(api: &Api, name: &str, port_name: &str, port: i32) {
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

async fn set_status(api: &Api, name: &str, ip: &str, ready: bool) {
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

async fn slice(api: &Api, name: &str) -> Option<EndpointSlice> {
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

async fn wait_slice(
    api: &Api,
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
