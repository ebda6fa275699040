//! Security identities through the API in-process over a `RedbStore`:
//! one per (namespace, labels) set, kept across re-applies, a new one on a
//! label change, unique under concurrent creates, released by the
//! collector's sweep only after its grace and never while a pod uses it;
//! and `NetworkPolicy` objects apply, list and delete.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};
use weir_proto::v1;

use super::identity::{
    FIRST_IDENTITY, IDENTITY_ANNOTATION, IDENTITY_INDEX, IDENTITY_RECORDS, IdentitySweep,
    LAST_IDENTITY,
};
use super::{ApiError, ObjectsApi};
use crate::store::{Compare, Op, RedbStore, Store};

fn api() -> (Arc<ObjectsApi<RedbStore>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
    (Arc::new(ObjectsApi::new(store)), dir)
}

fn pod(ns: &str, name: &str, labels: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

async fn apply_doc(
    api: &ObjectsApi<RedbStore>,
    doc: &Value,
) -> Result<v1::ApplyResponse, ApiError> {
    api.apply(&v1::ApplyRequest {
        manifest_json: doc.to_string(),
        field_manager: "test".into(),
    })
    .await
}

/// Applies a pod; its identity and the apply's warnings.
async fn apply_pod(api: &ObjectsApi<RedbStore>, doc: &Value) -> (u32, Vec<String>) {
    let r = apply_doc(api, doc)
        .await
        .unwrap_or_else(|e| panic!("{doc}: {e}"));
    let object: Value = serde_json::from_str(&r.object.unwrap().json).unwrap();
    let id = object["metadata"]["annotations"][IDENTITY_ANNOTATION]
        .as_str()
        .unwrap_or_else(|| panic!("no identity on {object}"))
        .parse()
        .unwrap();
    (id, r.warnings)
}

async fn namespace(api: &ObjectsApi<RedbStore>, name: &str) {
    apply_doc(
        api,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .await
    .unwrap();
}

async fn delete_pod(api: &ObjectsApi<RedbStore>, ns: &str, name: &str) {
    api.delete(&v1::DeleteRequest {
        r#ref: Some(v1::ObjectRef {
            api_version: String::new(),
            kind: "Pod".into(),
            namespace: ns.into(),
            name: name.into(),
        }),
        propagation: String::new(),
        grace_period_seconds: Some(0),
    })
    .await
    .unwrap();
}

async fn keys(api: &ObjectsApi<RedbStore>, prefix: &str) -> Vec<String> {
    let (kvs, _) = api.store().list(prefix).await.unwrap();
    kvs.into_iter().map(|kv| kv.key).collect()
}

#[tokio::test]
async fn one_identity_per_namespace_and_label_set() {
    let (api, _dir) = api();
    namespace(&api, "other").await;
    let web = json!({"app": "web", "tier": "front"});
    let (web_id, _) = apply_pod(&api, &pod("default", "a", &web)).await;
    assert!(
        (FIRST_IDENTITY..=LAST_IDENTITY).contains(&web_id),
        "{web_id}"
    );
    // Same namespace and labels (in another order): the same identity.
    let (same, _) = apply_pod(
        &api,
        &pod("default", "b", &json!({"tier": "front", "app": "web"})),
    )
    .await;
    assert_eq!(web_id, same);
    // Same labels in another namespace: another identity.
    let (other_ns, _) = apply_pod(&api, &pod("other", "a", &web)).await;
    assert_ne!(web_id, other_ns);
    // Other labels: another identity; no labels at all: one too.
    let (db, _) = apply_pod(&api, &pod("default", "d", &json!({"app": "db"}))).await;
    let (bare, _) = apply_pod(&api, &pod("default", "e", &json!({}))).await;
    assert_eq!(HashSet::from([web_id, other_ns, db, bare]).len(), 4);
    // The records agents read.
    let records = api.identities().await.unwrap();
    assert_eq!(records.len(), 4);
    let by_id: HashMap<u32, _> = records.into_iter().map(|r| (r.id, r)).collect();
    assert_eq!(by_id[&web_id].namespace, "default");
    assert_eq!(
        by_id[&web_id].labels,
        BTreeMap::from([
            ("app".into(), "web".into()),
            ("tier".into(), "front".into())
        ])
    );
    assert_eq!(by_id[&other_ns].namespace, "other");
    assert!(by_id[&bare].labels.is_empty());
    assert_eq!(keys(&api, IDENTITY_INDEX).await.len(), 4);
}

#[tokio::test]
async fn reapplies_keep_the_identity_and_label_changes_get_another() {
    let (api, _dir) = api();
    let (id, warnings) = apply_pod(&api, &pod("default", "a", &json!({"app": "web"}))).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    let rv = |r: &v1::ApplyResponse| {
        r.object
            .as_ref()
            .unwrap()
            .meta
            .as_ref()
            .unwrap()
            .resource_version
    };
    // A re-apply without the annotation: kept, and no write at all.
    let before = apply_doc(&api, &pod("default", "a", &json!({"app": "web"})))
        .await
        .unwrap();
    let again = apply_doc(&api, &pod("default", "a", &json!({"app": "web"})))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(rv(&before), rv(&again));
    // One that sets another value: the stored one stays, with a warning.
    let mut forged = pod("default", "a", &json!({"app": "web"}));
    forged["metadata"]["annotations"] = json!({IDENTITY_ANNOTATION: "7"});
    let (kept, warnings) = apply_pod(&api, &forged).await;
    assert_eq!(kept, id);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&format!("metadata.annotations[{IDENTITY_ANNOTATION}]"))
            && warnings[0].contains("set by weir-control"),
        "{}",
        warnings[0]
    );
    // A create that sets one: allocated anyway.
    let mut forged_new = pod("default", "b", &json!({"app": "api"}));
    forged_new["metadata"]["annotations"] =
        json!({IDENTITY_ANNOTATION: id.to_string(), "note": "x"});
    let (other, warnings) = apply_pod(&api, &forged_new).await;
    assert_ne!(other, id);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    // A label change: another identity (the old one stays until collected).
    let (changed, _) =
        apply_pod(&api, &pod("default", "a", &json!({"app": "web", "v": "2"}))).await;
    assert_ne!(changed, id);
    assert_ne!(changed, other);
    // Back to the first labels: the first identity again.
    let (back, _) = apply_pod(&api, &pod("default", "a", &json!({"app": "web"}))).await;
    assert_eq!(back, id);
    // Other annotations of the pod are the user's.
    let got = api
        .get(&v1::ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let json: Value = serde_json::from_str(&got.json).unwrap();
    assert_eq!(json["metadata"]["annotations"]["note"], "x");
}

#[tokio::test]
async fn concurrent_creates_get_one_identity_per_set() {
    let (api, _dir) = api();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let api = Arc::clone(&api);
        // 10 sets shared by 5 pods each, plus every pod in a set of its own
        // in a second wave below.
        tasks.push(tokio::spawn(async move {
            let labels = json!({"app": format!("set-{}", i % 10)});
            (
                i % 10,
                apply_pod(&api, &pod("default", &format!("p{i}"), &labels))
                    .await
                    .0,
            )
        }));
    }
    let mut by_set: HashMap<usize, HashSet<u32>> = HashMap::new();
    for t in tasks {
        let (set, id) = t.await.unwrap();
        by_set.entry(set).or_default().insert(id);
    }
    assert_eq!(by_set.len(), 10);
    assert!(by_set.values().all(|ids| ids.len() == 1), "{by_set:?}");
    let ids: HashSet<u32> = by_set.values().flatten().copied().collect();
    assert_eq!(ids.len(), 10, "sets share no identity: {by_set:?}");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let api = Arc::clone(&api);
        tasks.push(tokio::spawn(async move {
            apply_pod(
                &api,
                &pod(
                    "default",
                    &format!("q{i}"),
                    &json!({"own": format!("q{i}")}),
                ),
            )
            .await
            .0
        }));
    }
    let mut own = HashSet::new();
    for t in tasks {
        assert!(own.insert(t.await.unwrap()), "an identity was given twice");
    }
    assert!(own.is_disjoint(&ids));
    assert_eq!(api.identities().await.unwrap().len(), 60);
    assert_eq!(keys(&api, IDENTITY_INDEX).await.len(), 60);
}

fn at(t: Timestamp, secs: i64) -> Timestamp {
    t + SignedDuration::from_secs(secs)
}

#[tokio::test]
async fn the_collector_releases_unused_identities_after_the_grace() {
    let (api, _dir) = api();
    let grace = Duration::from_mins(5);
    let t0 = Timestamp::from_second(1_000_000).unwrap();
    let web = json!({"app": "web"});
    let (id, _) = apply_pod(&api, &pod("default", "a", &web)).await;
    let (kept, _) = apply_pod(&api, &pod("default", "k", &json!({"app": "kept"}))).await;
    let sweep = |now| {
        let api = Arc::clone(&api);
        async move { api.sweep_identities(now, grace).await.unwrap() }
    };
    // In use: nothing happens.
    assert_eq!(sweep(t0).await, IdentitySweep::default());
    delete_pod(&api, "default", "a").await;
    // Unused: marked, kept through the grace.
    assert_eq!(sweep(t0).await.retiring, 1);
    assert_eq!(sweep(at(t0, 299)).await, IdentitySweep::default());
    // A pod with the set revives it: same identity, never released.
    let (again, _) = apply_pod(&api, &pod("default", "b", &web)).await;
    assert_eq!(again, id);
    assert_eq!(sweep(at(t0, 600)).await, IdentitySweep::default());
    // Gone again: marked, then released once the grace has passed.
    delete_pod(&api, "default", "b").await;
    assert_eq!(sweep(at(t0, 600)).await.retiring, 1);
    assert_eq!(sweep(at(t0, 899)).await.released, 0);
    assert_eq!(sweep(at(t0, 900)).await.released, 1);
    let left: Vec<u32> = api
        .identities()
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, [kept]);
    assert_eq!(keys(&api, IDENTITY_INDEX).await.len(), 1);
    // The set comes back later: allocated afresh.
    let (fresh, _) = apply_pod(&api, &pod("default", "c", &web)).await;
    assert!(fresh != kept && (FIRST_IDENTITY..=LAST_IDENTITY).contains(&fresh));
}

#[tokio::test]
async fn a_marked_identity_a_pod_took_meanwhile_is_unmarked_not_released() {
    let (api, _dir) = api();
    let grace = Duration::from_secs(1);
    let t0 = Timestamp::from_second(1_000_000).unwrap();
    let (id, _) = apply_pod(&api, &pod("default", "a", &json!({"app": "web"}))).await;
    // A mark written as if the collector had read the pods just before
    // this pod's create committed.
    let (index, _) = api.store().list(IDENTITY_INDEX).await.unwrap();
    let kv = &index[0];
    let marked = json!({"id": id, "retiringSince": t0.to_string()}).to_string();
    let txn = api
        .store()
        .txn(
            vec![(kv.key.clone(), Compare::ModRevision(kv.mod_revision))],
            vec![Op::Put {
                key: kv.key.clone(),
                value: marked.into_bytes(),
            }],
        )
        .await
        .unwrap();
    assert!(txn.succeeded);
    let s = api.sweep_identities(at(t0, 60), grace).await.unwrap();
    assert_eq!((s.revived, s.released), (1, 0));
    assert_eq!(keys(&api, IDENTITY_RECORDS).await.len(), 1);
}

#[tokio::test]
async fn exhaustion_is_refused_clearly() {
    let (api, _dir) = api();
    let ops: Vec<Op> = (FIRST_IDENTITY..=LAST_IDENTITY)
        .map(|id| Op::Put {
            key: format!("{IDENTITY_RECORDS}{id}"),
            value: json!({"id": id, "namespace": "default", "labels": {}})
                .to_string()
                .into_bytes(),
        })
        .collect();
    assert!(api.store().txn(Vec::new(), ops).await.unwrap().succeeded);
    let err = apply_doc(&api, &pod("default", "a", &json!({"app": "web"})))
        .await
        .expect_err("no identity left");
    assert!(matches!(err, ApiError::Exhausted(_)), "{err:?}");
    assert!(
        err.to_string().contains("no free security identity"),
        "{err}"
    );
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
}

fn policy(name: &str, spec: &Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

#[tokio::test]
async fn network_policies_apply_list_and_delete() {
    let (api, _dir) = api();
    let r = apply_doc(&api, &policy("deny", &json!({"podSelector": {}})))
        .await
        .unwrap();
    assert!(r.created);
    let object = r.object.unwrap();
    let meta = object.meta.as_ref().unwrap();
    assert_eq!(
        (meta.api_version.as_str(), meta.kind.as_str()),
        ("networking.k8s.io/v1", "NetworkPolicy")
    );
    let json: Value = serde_json::from_str(&object.json).unwrap();
    assert_eq!(json["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        keys(&api, "/networking.k8s.io/networkpolicies/default/").await,
        ["/networking.k8s.io/networkpolicies/default/deny"]
    );
    let err = apply_doc(&api, &policy("bad", &json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}]})))
        .await
        .expect_err("except outside cidr");
    assert!(
        err.to_string().starts_with("manifest: spec.ingress[0].from[0].ipBlock.except[0]: \"10.1.0.0/24\" must be a strict subset of cidr"),
        "{err}"
    );
    let list = api
        .list(&v1::ListRequest {
            kind: "NetworkPolicy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
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
    assert!(
        keys(&api, "/networking.k8s.io/networkpolicies/")
            .await
            .is_empty()
    );
    // A policy has no status to write.
    apply_doc(&api, &policy("deny", &json!({}))).await.unwrap();
    let err = api
        .update_status(&v1::UpdateStatusRequest {
            r#ref: Some(v1::ObjectRef {
                kind: "NetworkPolicy".into(),
                namespace: "default".into(),
                name: "deny".into(),
                ..Default::default()
            }),
            status_json: "{}".into(),
            resource_version: 0,
        })
        .await
        .expect_err("no status");
    assert!(err.to_string().contains("has no status"), "{err}");
}

#[tokio::test]
async fn namespaces_carry_their_name_label() {
    let (api, _dir) = api();
    let r = apply_doc(
        &api,
        &json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"team": "a", "kubernetes.io/metadata.name": "forged"}}}),
    )
    .await
    .unwrap();
    let labels = r.object.unwrap().meta.unwrap().labels;
    assert_eq!(labels["kubernetes.io/metadata.name"], "shop");
    assert_eq!(labels["team"], "a");
    api.ensure_default_namespaces().await.unwrap();
    let got = api
        .get(&v1::ObjectRef {
            kind: "Namespace".into(),
            name: "kube-system".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        got.meta.unwrap().labels["kubernetes.io/metadata.name"],
        "kube-system"
    );
}
