//! `WatchNode`'s policy events in process over a `RedbStore`: namespaces,
//! identities, policies and the ipcache as ADDED first, then each change
//! (an identity before the pod that carries it, ipcache entries as pods get
//! and lose addresses, identities released by the collector), and the same
//! after a resume from the listing's bookmark.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use weir_proto::v1;

use super::{NodeEventStream, NodesConfig, NodesService};
use crate::api::ObjectsApi;
use crate::store::RedbStore;

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

fn pod(name: &str, labels: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "busybox"}]}})
}

fn identity(pod: &Value) -> String {
    pod["metadata"]["annotations"]["weir.io/identity"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn policy(name: &str, app: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": app}}}})
}

fn namespace(labels: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": labels}})
}

async fn report_ip(api: &ObjectsApi<RedbStore>, name: &str, ip: &str) {
    api.update_status(&v1::UpdateStatusRequest {
        r#ref: Some(pod_ref(name)),
        status_json: json!({"phase": "Running", "podIP": ip}).to_string(),
        resource_version: 0,
    })
    .await
    .unwrap();
}

fn pod_ref(name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        kind: "Pod".into(),
        namespace: "default".into(),
        name: name.into(),
        ..Default::default()
    }
}

fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    l.join(",")
}

fn kind(t: i32) -> String {
    v1::EventType::try_from(t)
        .map(|t| t.as_str_name().trim_start_matches("EVENT_TYPE_").to_owned())
        .unwrap_or_default()
}

/// The next policy-related event as one line (`bookmark <rev>` for
/// bookmarks); pod, peer and service events are skipped.
async fn next(stream: &mut NodeEventStream) -> String {
    use v1::node_event::Event as E;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event within 5 s")
            .expect("stream open")
            .expect("not an error");
        return match event.event.expect("event set") {
            E::Bookmark(_) => format!("bookmark {}", event.revision),
            E::Policy(policy) => {
                let meta = policy.policy.unwrap().meta.unwrap();
                let what = kind(policy.r#type);
                format!("policy {what} {}/{}", meta.namespace, meta.name)
            }
            E::Namespace(ns) => {
                let what = kind(ns.r#type);
                format!("namespace {what} {} {}", ns.name, labels_text(&ns.labels))
            }
            E::Identity(id) => {
                let (what, labels) = (kind(id.r#type), labels_text(&id.labels));
                format!("identity {what} {} {} {labels}", id.id, id.namespace)
            }
            E::Ipcache(entry) => format!(
                "ipcache {} {} {} {}/{} {}",
                kind(entry.r#type),
                entry.ip,
                entry.identity,
                entry.namespace,
                entry.pod_name,
                entry.node_name
            ),
            E::Pod(_) | E::Peer(_) | E::Service(_) => continue,
            E::Resync(r) => panic!("resync: {}", r.reason),
        };
    }
}

const NS_LABEL: &str = "kubernetes.io/metadata.name";

/// Makes the changes the test follows; the lines they should produce in
/// order, and the (unordered) identity releases that end them.
async fn make_changes(api: &ObjectsApi<RedbStore>, web: &str) -> (Vec<String>, Vec<String>) {
    // A new label set: its identity comes before the pod.
    let mut changes = Vec::new();
    let api_pod = identity(&apply(api, &pod("api", &json!({"app": "api"}))).await);
    changes.push(format!("identity ADDED {api_pod} default app=api"));
    report_ip(api, "api", "10.244.2.6").await;
    changes.push(format!("ipcache ADDED 10.244.2.6 {api_pod} default/api n2"));
    // A label change: a new identity, and the entry follows.
    let relabelled = identity(&apply(api, &pod("web", &json!({"app": "web", "v": "2"}))).await);
    changes.push(format!("identity ADDED {relabelled} default app=web,v=2"));
    changes.push(format!(
        "ipcache MODIFIED 10.244.2.5 {relabelled} default/web n2"
    ));
    apply(api, &policy("deny", "api")).await;
    changes.push("policy MODIFIED default/deny".to_owned());
    apply(api, &namespace(&json!({"team": "b"}))).await;
    changes.push(format!("namespace MODIFIED shop {NS_LABEL}=shop,team=b"));
    api.delete(&v1::DeleteRequest {
        r#ref: Some(pod_ref("api")),
        grace_period_seconds: Some(0),
        ..Default::default()
    })
    .await
    .unwrap();
    changes.push(format!(
        "ipcache DELETED 10.244.2.6 {api_pod} default/api n2"
    ));
    api.delete(&v1::DeleteRequest {
        r#ref: Some(v1::ObjectRef {
            kind: "NetworkPolicy".into(),
            namespace: "default".into(),
            name: "deny".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    changes.push("policy DELETED default/deny".to_owned());
    // The collector releases the identities no pod carries any more.
    let now = crate::api::now();
    api.sweep_identities(now, Duration::ZERO).await.unwrap();
    let swept = api.sweep_identities(now, Duration::ZERO).await.unwrap();
    assert_eq!(swept.released, 2);
    let mut released = vec![
        format!("identity DELETED {web} default app=web"),
        format!("identity DELETED {api_pod} default app=api"),
    ];
    released.sort();
    (changes, released)
}

/// Checks `stream` brings `changes` in order, then `released` in any order.
async fn expect_changes(stream: &mut NodeEventStream, changes: &[String], released: &[String]) {
    for want in changes {
        assert_eq!(&next(stream).await, want);
    }
    let mut got = vec![next(stream).await, next(stream).await];
    got.sort();
    assert_eq!(got, released);
}

#[tokio::test]
async fn policy_state_is_listed_then_followed_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
    let api = Arc::new(ObjectsApi::new(store));
    api.ensure_default_namespaces().await.unwrap();
    let nodes = NodesService::new(
        api.clone(),
        NodesConfig {
            bookmark_interval: Duration::from_mins(1),
            ..NodesConfig::default()
        },
    );
    apply(&api, &namespace(&json!({"team": "a"}))).await;
    let web = identity(&apply(&api, &pod("web", &json!({"app": "web"}))).await);
    report_ip(&api, "web", "10.244.2.5").await;
    apply(&api, &policy("deny", "web")).await;
    let watch = |from| {
        nodes
            .watch_node(&v1::WatchNodeRequest {
                node_name: "n1".into(),
                from_revision: from,
            })
            .unwrap()
    };

    // The full state first, whatever node asks.
    let mut s = watch(0);
    let mut listed = Vec::new();
    let listed_at: u64 = loop {
        let line = next(&mut s).await;
        if let Some(rev) = line.strip_prefix("bookmark ") {
            listed.push("bookmark".to_owned());
            break rev.parse().unwrap();
        }
        listed.push(line);
    };
    assert_eq!(
        listed,
        [
            format!("namespace ADDED default {NS_LABEL}=default"),
            format!("namespace ADDED kube-system {NS_LABEL}=kube-system"),
            format!("namespace ADDED shop {NS_LABEL}=shop,team=a"),
            format!("identity ADDED {web} default app=web"),
            "policy ADDED default/deny".to_owned(),
            format!("ipcache ADDED 10.244.2.5 {web} default/web n2"),
            "bookmark".to_owned(),
        ]
    );

    // Then each change.
    let (changes, released) = make_changes(&api, &web).await;
    expect_changes(&mut s, &changes, &released).await;

    // Resumed from the listing's bookmark: the same changes in order.
    let mut r = watch(listed_at);
    expect_changes(&mut r, &changes, &released).await;
}
