//! `WatchNode`'s service events in process over a `RedbStore`: the full set
//! as ADDED first, then each Service change with its slice and each slice
//! change with its Service, DELETED when the Service goes, and the same
//! after a resume from a bookmark.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use weir_proto::v1;

use super::{NodeEventStream, NodesConfig, NodesService};
use crate::api::ObjectsApi;
use crate::store::RedbStore;

type Seen = (v1::EventType, String, Option<Vec<String>>);

async fn apply(api: &ObjectsApi<RedbStore>, doc: &Value) -> Value {
    let o = api
        .apply(&v1::ApplyRequest {
            manifest_json: doc.to_string(),
            field_manager: "test".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{doc}: {e}"))
        .object
        .unwrap();
    serde_json::from_str(&o.json).unwrap()
}

fn service(name: &str, port: i32) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": name}, "ports": [{"port": port}]}})
}

fn slice(name: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"port": 8080}]})
}

/// The next service event as (type, service name, slice IPs), and bookmarks
/// as (`Bookmark`, revision, None); other events are skipped.
async fn next(s: &mut NodeEventStream) -> Seen {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("an event within 5 s")
            .expect("stream open")
            .expect("not an error");
        match e.event.expect("event set") {
            v1::node_event::Event::Service(svc) => {
                let t = svc.r#type();
                let name = svc.service.unwrap().meta.unwrap().name;
                let ips = svc.endpoint_slice.map(|o| {
                    let j: Value = serde_json::from_str(&o.json).unwrap();
                    j["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| e["addresses"][0].as_str().unwrap().to_owned())
                        .collect()
                });
                return (t, name, ips);
            }
            v1::node_event::Event::Bookmark(_) => {
                return (v1::EventType::Bookmark, e.revision.to_string(), None);
            }
            _ => {}
        }
    }
}

fn seen(t: v1::EventType, name: &str, ips: Option<&[&str]>) -> Seen {
    (
        t,
        name.to_owned(),
        ips.map(|i| i.iter().map(|s| (*s).to_owned()).collect()),
    )
}

#[tokio::test]
async fn services_come_with_their_slices_and_resume() {
    use v1::EventType::{Added, Bookmark, Deleted, Modified};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
    let api = Arc::new(ObjectsApi::new(store));
    let nodes = NodesService::new(
        api.clone(),
        NodesConfig {
            bookmark_interval: Duration::from_mins(1),
            ..NodesConfig::default()
        },
    );
    apply(&api, &service("a", 80)).await;
    apply(&api, &slice("a", &["10.244.1.2"])).await;
    apply(&api, &service("b", 81)).await;
    let watch = |from| {
        nodes
            .watch_node(&v1::WatchNodeRequest {
                node_name: "n1".into(),
                from_revision: from,
            })
            .unwrap()
    };
    let mut s = watch(0);
    assert_eq!(next(&mut s).await, seen(Added, "a", Some(&["10.244.1.2"])));
    assert_eq!(next(&mut s).await, seen(Added, "b", None));
    let (t, rev, _) = next(&mut s).await;
    assert_eq!(t, Bookmark);
    let listed_at: u64 = rev.parse().unwrap();

    // A slice change comes with its Service; a Service change with its slice.
    apply(&api, &slice("b", &["10.244.2.7", "10.244.2.8"])).await;
    let b_slice = seen(Modified, "b", Some(&["10.244.2.7", "10.244.2.8"]));
    assert_eq!(next(&mut s).await, b_slice);
    apply(&api, &service("a", 90)).await;
    let a_changed = seen(Modified, "a", Some(&["10.244.1.2"]));
    assert_eq!(next(&mut s).await, a_changed);
    // A new Service is ADDED.
    apply(&api, &service("c", 82)).await;
    assert_eq!(next(&mut s).await, seen(Added, "c", None));
    // Deleted: DELETED; its slice goes with it and says nothing more.
    let a = api
        .get(&v1::ObjectRef {
            api_version: String::new(),
            kind: "Service".into(),
            namespace: "default".into(),
            name: "a".into(),
        })
        .await
        .unwrap();
    let uid = serde_json::from_str::<Value>(&a.json).unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut owned = slice("a", &["10.244.1.2"]);
    owned["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Service",
        "name": "a", "uid": uid, "controller": true}]);
    apply(&api, &owned).await; // owner set: no endpoint change, but an event
    assert_eq!(
        next(&mut s).await,
        seen(Modified, "a", Some(&["10.244.1.2"]))
    );
    api.delete(&v1::DeleteRequest {
        r#ref: Some(v1::ObjectRef {
            api_version: String::new(),
            kind: "Service".into(),
            namespace: "default".into(),
            name: "a".into(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(next(&mut s).await, seen(Deleted, "a", None));
    apply(&api, &service("d", 83)).await;
    assert_eq!(next(&mut s).await, seen(Added, "d", None));

    // Resumed from the listing's bookmark: the same changes, in order, each
    // with the other half as it is now (a's slice is gone with it, so the
    // slice's own change is not sent).
    let mut r = watch(listed_at);
    assert_eq!(next(&mut r).await, b_slice);
    assert_eq!(next(&mut r).await, seen(Modified, "a", None));
    assert_eq!(next(&mut r).await, seen(Added, "c", None));
    assert_eq!(next(&mut r).await, seen(Deleted, "a", None));
    assert_eq!(next(&mut r).await, seen(Added, "d", None));
}
