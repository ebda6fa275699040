//! The Objects service end to end: a real tonic server on loopback over a
//! `RedbStore` in a temp dir, driven through the generated client.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::{Channel, Server};
use weir_proto::v1;
use weir_proto::v1::objects_client::ObjectsClient;

use crate::store::RedbStore;

pub(super) struct Harness {
    pub client: ObjectsClient<Channel>,
    pub store: Arc<RedbStore>,
    _dir: tempfile::TempDir,
}

pub(super) async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(super::service(Arc::clone(&store)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = ObjectsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness {
        client,
        store,
        _dir: dir,
    }
}

pub(super) fn pod(name: &str, ns: &str, labels: &Value, image: &str) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": image}]},
    })
    .to_string()
}

pub(super) fn pod_ref(name: &str, ns: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: String::new(),
        kind: "Pod".into(),
        namespace: ns.into(),
        name: name.into(),
    }
}

pub(super) async fn apply(h: &mut Harness, manifest: String) -> v1::ApplyResponse {
    h.client
        .apply(v1::ApplyRequest {
            manifest_json: manifest,
            field_manager: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub(super) async fn namespace(h: &mut Harness, name: &str) {
    apply(
        h,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}).to_string(),
    )
    .await;
}

pub(super) fn json_of(object: &v1::Object) -> Value {
    serde_json::from_str(&object.json).unwrap()
}

pub(super) fn meta(object: &v1::Object) -> &v1::ObjectMeta {
    object.meta.as_ref().unwrap()
}

#[tokio::test]
async fn apply_creates_then_updates_with_generation() {
    let mut h = start().await;
    let created = apply(
        &mut h,
        pod("web", "default", &json!({"app": "web"}), "nginx:1"),
    )
    .await;
    assert!(created.created);
    let obj = created.object.unwrap();
    let m = meta(&obj).clone();
    assert_eq!((m.kind.as_str(), m.api_version.as_str()), ("Pod", "v1"));
    assert_eq!((m.namespace.as_str(), m.name.as_str()), ("default", "web"));
    assert_eq!(m.uid.len(), 36, "uid {:?}", m.uid);
    assert_eq!(&m.uid[14..15], "4");
    assert!(m.resource_version > 0);
    assert_eq!(m.generation, 1);
    assert!(m.creation_timestamp_unix > 1_600_000_000);
    assert_eq!(m.labels.get("app").map(String::as_str), Some("web"));
    let j = json_of(&obj);
    assert_eq!(j["spec"]["restartPolicy"], "Always");
    assert_eq!(
        j["metadata"]["resourceVersion"],
        m.resource_version.to_string()
    );
    assert_eq!(j["metadata"]["uid"], m.uid.as_str());
    assert_eq!(j["metadata"]["generation"], 1);

    // The same spec again: same uid and generation, not a create.
    let again = apply(
        &mut h,
        pod("web", "default", &json!({"app": "web"}), "nginx:1"),
    )
    .await;
    assert!(!again.created);
    let m2 = meta(again.object.as_ref().unwrap());
    assert_eq!((m2.uid.as_str(), m2.generation), (m.uid.as_str(), 1));

    // A label change is a metadata change: new revision, same generation.
    let relabel = apply(
        &mut h,
        pod(
            "web",
            "default",
            &json!({"app": "web", "x": "y"}),
            "nginx:1",
        ),
    )
    .await;
    let m3 = meta(relabel.object.as_ref().unwrap()).clone();
    assert_eq!((m3.uid.as_str(), m3.generation), (m.uid.as_str(), 1));
    assert!(m3.resource_version > m.resource_version);
    assert_eq!(m3.labels.len(), 2);

    // A spec change bumps the generation.
    let changed = apply(
        &mut h,
        pod("web", "default", &json!({"app": "web"}), "nginx:2"),
    )
    .await;
    assert!(!changed.created);
    let m4 = meta(changed.object.as_ref().unwrap());
    assert_eq!((m4.uid.as_str(), m4.generation), (m.uid.as_str(), 2));
    assert!(m4.resource_version > m3.resource_version);
    assert_eq!(
        json_of(changed.object.as_ref().unwrap())["spec"]["containers"][0]["image"],
        "nginx:2"
    );
}

#[tokio::test]
async fn status_survives_apply_and_stale_versions_abort() {
    let mut h = start().await;
    namespace(&mut h, "ns1").await;
    let created = apply(&mut h, pod("web", "ns1", &json!({}), "nginx:1")).await;
    let rv = meta(created.object.as_ref().unwrap()).resource_version;

    let updated = h
        .client
        .update_status(v1::UpdateStatusRequest {
            r#ref: Some(pod_ref("web", "ns1")),
            status_json: json!({"phase": "Running", "podIP": "10.244.1.5"}).to_string(),
            resource_version: rv,
        })
        .await
        .unwrap()
        .into_inner();
    let status_rv = meta(&updated).resource_version;
    assert!(status_rv > rv);
    assert_eq!(meta(&updated).generation, 1);
    let j = json_of(&updated);
    assert_eq!(j["status"]["phase"], "Running");
    assert_eq!(j["spec"]["containers"][0]["image"], "nginx:1");

    // The same resource version again is stale now.
    let err = h
        .client
        .update_status(v1::UpdateStatusRequest {
            r#ref: Some(pod_ref("web", "ns1")),
            status_json: json!({"phase": "Failed"}).to_string(),
            resource_version: rv,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(
        err.message().contains(
            "the object has been modified; please apply your changes to the latest version"
        ),
        "{}",
        err.message()
    );

    // A user's apply (with a status of its own, even) keeps the reported status.
    let mut manifest: Value =
        serde_json::from_str(&pod("web", "ns1", &json!({}), "nginx:2")).unwrap();
    manifest["status"] = json!({"phase": "Pending"});
    let reapplied = apply(&mut h, manifest.to_string()).await;
    let j = json_of(reapplied.object.as_ref().unwrap());
    assert_eq!(j["status"]["phase"], "Running");
    assert_eq!(j["status"]["podIP"], "10.244.1.5");
    assert_eq!(j["spec"]["containers"][0]["image"], "nginx:2");
    assert_eq!(meta(reapplied.object.as_ref().unwrap()).generation, 2);

    // Status of a missing object, and a status of the wrong shape.
    let err = h
        .client
        .update_status(v1::UpdateStatusRequest {
            r#ref: Some(pod_ref("nope", "ns1")),
            status_json: "{}".into(),
            resource_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = h
        .client
        .update_status(v1::UpdateStatusRequest {
            r#ref: Some(pod_ref("web", "ns1")),
            status_json: json!({"phase": 3}).to_string(),
            resource_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() {
    let mut h = start().await;
    let bad = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 70000}]}]},
    });
    let err = h
        .client
        .apply(v1::ApplyRequest {
            manifest_json: bad.to_string(),
            field_manager: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("spec.containers[0].ports[0].containerPort"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains('\n'));

    for (manifest, expect) in [
        (
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "d"}}),
            "kind StatefulSet is not supported",
        ),
        (
            json!({"apiVersion": "v1", "metadata": {"name": "d"}}),
            "kind: required",
        ),
        (
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "Bad_Name"}}),
            "metadata.name",
        ),
    ] {
        let err = h
            .client
            .apply(v1::ApplyRequest {
                manifest_json: manifest.to_string(),
                field_manager: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(expect), "{}", err.message());
    }
    let err = h
        .client
        .apply(v1::ApplyRequest {
            manifest_json: "{not json".into(),
            field_manager: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn get_and_delete() {
    let mut h = start().await;
    let err = h.client.get(pod_ref("web", "default")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "pods \"web\" not found");

    let ns = apply(
        &mut h,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
            .to_string(),
    )
    .await;
    assert!(ns.created);
    assert_eq!(meta(ns.object.as_ref().unwrap()).namespace, "");
    let created = apply(&mut h, pod("web", "team-a", &json!({}), "nginx")).await;
    let got = h
        .client
        .get(pod_ref("web", "team-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Some(&got), created.object.as_ref());
    let ns_ref = v1::ObjectRef {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        namespace: String::new(),
        name: "team-a".into(),
    };
    assert_eq!(
        meta(&h.client.get(ns_ref.clone()).await.unwrap().into_inner()).name,
        "team-a"
    );
    let err = h
        .client
        .get(v1::ObjectRef {
            name: "nope".into(),
            ..ns_ref
        })
        .await
        .unwrap_err();
    assert_eq!(err.message(), "namespaces \"nope\" not found");

    let deleted = h
        .client
        .delete(v1::DeleteRequest {
            r#ref: Some(pod_ref("web", "team-a")),
            propagation: String::new(),
            grace_period_seconds: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.object, created.object);
    let err = h.client.get(pod_ref("web", "team-a")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = h
        .client
        .delete(v1::DeleteRequest {
            r#ref: Some(pod_ref("web", "team-a")),
            propagation: String::new(),
            grace_period_seconds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = h
        .client
        .get(v1::ObjectRef {
            kind: "ConfigMap".into(),
            ..pod_ref("web", "team-a")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "kind ConfigMap is not supported");
}

async fn list_names(h: &mut Harness, namespace: &str, selector: &str) -> (Vec<String>, u64) {
    let resp = h
        .client
        .list(v1::ListRequest {
            kind: "Pod".into(),
            namespace: namespace.into(),
            label_selector: selector.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let names = resp
        .items
        .iter()
        .map(|o| format!("{}/{}", meta(o).namespace, meta(o).name))
        .collect();
    (names, resp.revision)
}

#[tokio::test]
async fn list_by_namespace_and_selector() {
    let mut h = start().await;
    for ns in ["a", "a2", "b"] {
        namespace(&mut h, ns).await;
    }
    apply(
        &mut h,
        pod("web", "a", &json!({"app": "web", "tier": "front"}), "nginx"),
    )
    .await;
    apply(
        &mut h,
        pod("db", "a", &json!({"app": "db", "tier": "back"}), "pg"),
    )
    .await;
    apply(&mut h, pod("web", "a2", &json!({"app": "web"}), "nginx")).await;
    let last = apply(
        &mut h,
        pod(
            "cache",
            "b",
            &json!({"app": "cache", "tier": "back"}),
            "redis",
        ),
    )
    .await;
    let last_rv = meta(last.object.as_ref().unwrap()).resource_version;

    let (all, revision) = list_names(&mut h, "", "").await;
    assert_eq!(all, ["a/db", "a/web", "a2/web", "b/cache"]);
    assert_eq!(revision, last_rv);
    // `a/` never matches `a2/`.
    assert_eq!(list_names(&mut h, "a", "").await.0, ["a/db", "a/web"]);
    assert_eq!(
        list_names(&mut h, "", "app=web").await.0,
        ["a/web", "a2/web"]
    );
    assert_eq!(list_names(&mut h, "", "app==web,tier").await.0, ["a/web"]);
    assert_eq!(
        list_names(&mut h, "", "tier!=back").await.0,
        ["a/web", "a2/web"]
    );
    assert_eq!(list_names(&mut h, "", "!tier").await.0, ["a2/web"]);
    assert_eq!(
        list_names(&mut h, "", "app in (db,cache)").await.0,
        ["a/db", "b/cache"]
    );
    assert_eq!(
        list_names(&mut h, "", "app notin (web),tier in (back)")
            .await
            .0,
        ["a/db", "b/cache"]
    );
    assert_eq!(
        list_names(&mut h, "b", "app notin (cache)").await.0,
        Vec::<String>::new()
    );

    let err = h
        .client
        .list(v1::ListRequest {
            kind: "Pod".into(),
            namespace: String::new(),
            label_selector: "app in (web".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("\"app in (web\""),
        "{}",
        err.message()
    );
}

async fn next_event(stream: &mut tonic::Streaming<v1::WatchEvent>) -> v1::WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watch event within 10s")
        .expect("the stream is open")
        .expect("not an error")
}

#[tokio::test]
async fn list_then_watch_sees_exactly_later_changes() {
    let mut h = start().await;
    namespace(&mut h, "kube").await;
    apply(
        &mut h,
        pod("old", "default", &json!({"app": "web"}), "nginx"),
    )
    .await;
    let (_, revision) = list_names(&mut h, "default", "app=web").await;

    // Changes after the list, some outside the watch's namespace or selector.
    let created = apply(
        &mut h,
        pod("new", "default", &json!({"app": "web"}), "nginx"),
    )
    .await;
    apply(&mut h, pod("other", "default", &json!({"app": "db"}), "pg")).await;
    apply(
        &mut h,
        pod("elsewhere", "kube", &json!({"app": "web"}), "nginx"),
    )
    .await;
    let status = h
        .client
        .update_status(v1::UpdateStatusRequest {
            r#ref: Some(pod_ref("new", "default")),
            status_json: json!({"phase": "Running"}).to_string(),
            resource_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    h.client
        .delete(v1::DeleteRequest {
            r#ref: Some(pod_ref("old", "default")),
            propagation: String::new(),
            grace_period_seconds: None,
        })
        .await
        .unwrap();

    let mut stream = h
        .client
        .watch(v1::WatchRequest {
            kind: "Pod".into(),
            namespace: "default".into(),
            label_selector: "app=web".into(),
            from_revision: revision,
        })
        .await
        .unwrap()
        .into_inner();

    let e = next_event(&mut stream).await;
    assert_eq!(e.r#type(), v1::EventType::Added);
    assert_eq!(e.object.as_ref(), created.object.as_ref());
    let e = next_event(&mut stream).await;
    assert_eq!(e.r#type(), v1::EventType::Modified);
    assert_eq!(e.object.as_ref(), Some(&status));
    assert_eq!(e.revision, meta(&status).resource_version);
    let e = next_event(&mut stream).await;
    assert_eq!(e.r#type(), v1::EventType::Deleted);
    assert_eq!(meta(e.object.as_ref().unwrap()).name, "old");
    assert!(e.revision > meta(&status).resource_version);

    // Live: a later change arrives too, and nothing before it was skipped.
    apply(
        &mut h,
        pod("new", "default", &json!({"app": "web"}), "nginx:2"),
    )
    .await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.r#type(), v1::EventType::Modified);
    assert_eq!(meta(e.object.as_ref().unwrap()).generation, 2);
    // Relabelled out of the selector: DELETED for this watcher.
    apply(
        &mut h,
        pod("new", "default", &json!({"app": "db"}), "nginx:2"),
    )
    .await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.r#type(), v1::EventType::Deleted);
    assert_eq!(meta(e.object.as_ref().unwrap()).name, "new");
}

#[tokio::test]
async fn watch_from_now_sees_only_new_changes() {
    let mut h = start().await;
    apply(&mut h, pod("before", "default", &json!({}), "nginx")).await;
    let mut stream = h
        .client
        .watch(v1::WatchRequest {
            kind: "Pod".into(),
            namespace: String::new(),
            label_selector: String::new(),
            from_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    apply(&mut h, pod("after", "default", &json!({}), "nginx")).await;
    let e = next_event(&mut stream).await;
    assert_eq!(e.r#type(), v1::EventType::Added);
    assert_eq!(meta(e.object.as_ref().unwrap()).name, "after");
}

#[tokio::test]
async fn watch_from_a_compacted_revision_sends_one_error_and_ends() {
    use crate::store::Store as _;
    let mut h = start().await;
    let first = apply(&mut h, pod("a", "default", &json!({}), "nginx")).await;
    let from = meta(first.object.as_ref().unwrap()).resource_version;
    apply(&mut h, pod("b", "default", &json!({}), "nginx")).await;
    let last = apply(&mut h, pod("c", "default", &json!({}), "nginx")).await;
    let compacted = meta(last.object.as_ref().unwrap()).resource_version;
    h.store.compact(compacted).await.unwrap();
    let mut stream = h
        .client
        .watch(v1::WatchRequest {
            kind: "Pod".into(),
            namespace: String::new(),
            label_selector: String::new(),
            from_revision: from,
        })
        .await
        .unwrap()
        .into_inner();
    let e = next_event(&mut stream).await;
    assert_eq!(e.r#type(), v1::EventType::Error);
    assert_eq!(
        e.error,
        format!("compacted: relist from revision {compacted}")
    );
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap();
    assert!(end.is_none(), "{end:?}");
}
