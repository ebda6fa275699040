//! Kinds, bad input, update rules, graceful pod deletion and cascading
//! deletes, over loopback gRPC like `tests.rs` (whose harness they share).

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tonic::Code;
use weir_proto::v1;

use super::ObjectsApi;
use super::tests::{Harness, apply, json_of, meta, namespace, pod_ref, start};
use crate::store::Store as _;

fn object_ref(kind: &str, namespace: &str, name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: String::new(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// Applies a manifest that must be refused; returns the status.
async fn refused(h: &mut Harness, manifest: &Value) -> tonic::Status {
    h.client
        .apply(v1::ApplyRequest {
            manifest_json: manifest.to_string(),
            field_manager: "test".into(),
        })
        .await
        .expect_err("the manifest must be refused")
}

async fn get(h: &mut Harness, kind: &str, ns: &str, name: &str) -> Option<v1::Object> {
    match h.client.get(object_ref(kind, ns, name)).await {
        Ok(o) => Some(o.into_inner()),
        Err(e) if e.code() == Code::NotFound => None,
        Err(e) => panic!("get {kind} {ns}/{name}: {e:?}"),
    }
}

async fn delete(
    h: &mut Harness,
    r: v1::ObjectRef,
    propagation: &str,
    grace: Option<i64>,
) -> Result<v1::Object, tonic::Status> {
    h.client
        .delete(v1::DeleteRequest {
            r#ref: Some(r),
            propagation: propagation.into(),
            grace_period_seconds: grace,
        })
        .await
        .map(|r| r.into_inner().object.expect("a deleted object"))
}

fn deployment(name: &str, selector: &Value, labels: &Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "nginx:1"}]},
            },
        },
    })
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

/// A pod owned by `owner` (kind, name, uid), optionally bound to `node`.
fn owned_pod(name: &str, owner: (&str, &str, &str), node: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": "web"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": owner.0, "name": owner.1, "uid": owner.2,
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {"containers": [{"name": "web", "image": "nginx:1"}], "terminationGracePeriodSeconds": 20},
    });
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let mut h = start().await;
    apply(
        &mut h,
        deployment("web", &json!({"app": "web"}), &json!({"app": "web"})).to_string(),
    )
    .await;
    let before = h.store.revision().await.unwrap();
    let mut restart_never = deployment("x", &json!({"app": "x"}), &json!({"app": "x"}));
    restart_never["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
    let mut no_image = deployment("x", &json!({"app": "x"}), &json!({"app": "x"}));
    no_image["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("image");
    let mut no_selector = deployment("x", &json!({"app": "x"}), &json!({"app": "x"}));
    no_selector["spec"]
        .as_object_mut()
        .unwrap()
        .remove("selector");
    let mut in_missing_ns = deployment("x", &json!({"app": "x"}), &json!({"app": "x"}));
    in_missing_ns["metadata"]["namespace"] = json!("nowhere");
    let mut stale = deployment("web", &json!({"app": "web"}), &json!({"app": "web"}));
    stale["metadata"]["resourceVersion"] = json!("1");
    stale["spec"]["replicas"] = json!(3);
    let cases = [
        (
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "d"}}),
            Code::InvalidArgument,
            "kind StatefulSet is not supported",
        ),
        (
            deployment("Web_1", &json!({"app": "x"}), &json!({"app": "x"})),
            Code::InvalidArgument,
            "manifest: metadata.name: \"Web_1\" is not a valid DNS-1123 subdomain",
        ),
        (
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web.", "namespace": "default"},
                   "spec": {"containers": [{"name": "c", "image": "nginx"}]}}),
            Code::InvalidArgument,
            "manifest: metadata.name: \"web.\" is not a valid DNS-1123 subdomain",
        ),
        (
            node("Node_A"),
            Code::InvalidArgument,
            "manifest: metadata.name: \"Node_A\"",
        ),
        (
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team.a"}}),
            Code::InvalidArgument,
            "manifest: metadata.name: \"team.a\" must be a DNS-1123 label",
        ),
        (
            deployment("x", &json!({"app": "x"}), &json!({"app": "y"})),
            Code::InvalidArgument,
            "manifest: spec.template.metadata.labels: selector does not match template labels",
        ),
        (
            no_selector,
            Code::InvalidArgument,
            "manifest: spec.selector: required",
        ),
        (
            restart_never,
            Code::InvalidArgument,
            "manifest: spec.template.spec.restartPolicy: unsupported value \"Never\"",
        ),
        (
            no_image,
            Code::InvalidArgument,
            "manifest: spec.template.spec.containers[0].image: required",
        ),
        (
            deployment(
                "web",
                &json!({"app": "web", "v": "2"}),
                &json!({"app": "web", "v": "2"}),
            ),
            Code::InvalidArgument,
            "manifest: spec.selector: field is immutable",
        ),
        (
            in_missing_ns,
            Code::NotFound,
            "namespaces \"nowhere\" not found",
        ),
        (stale, Code::Aborted, "the object has been modified"),
    ];
    for (manifest, code, expect) in cases {
        let err = refused(&mut h, &manifest).await;
        assert_eq!(err.code(), code, "{expect}: {err:?}");
        assert!(
            err.message().contains(expect),
            "{expect:?} not in {:?}",
            err.message()
        );
        assert!(!err.message().contains('\n'), "{:?}", err.message());
        assert_eq!(
            h.store.revision().await.unwrap(),
            before,
            "{expect}: the store changed"
        );
    }
    let d = get(&mut h, "Deployment", "default", "web").await.unwrap();
    assert_eq!(json_of(&d)["spec"]["replicas"], 1);
}

#[tokio::test]
async fn workloads_and_nodes_are_defaulted_as_kubernetes_does() {
    let mut h = start().await;
    let d = apply(
        &mut h,
        deployment("web", &json!({"app": "web"}), &json!({"app": "web"})).to_string(),
    )
    .await;
    let j = json_of(d.object.as_ref().unwrap());
    assert_eq!(j["spec"]["replicas"], 1);
    assert_eq!(j["spec"]["revisionHistoryLimit"], 10);
    assert_eq!(j["spec"]["progressDeadlineSeconds"], 600);
    assert_eq!(j["spec"]["minReadySeconds"], 0);
    assert_eq!(
        j["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    );
    let template = &j["spec"]["template"]["spec"];
    assert_eq!(template["restartPolicy"], "Always");
    assert_eq!(template["terminationGracePeriodSeconds"], 30);
    assert_eq!(template["priority"], 0);

    let mut rs = deployment("web-abc", &json!({"app": "web"}), &json!({"app": "web"}));
    rs["kind"] = json!("ReplicaSet");
    rs["spec"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| k == "selector" || k == "template");
    let j = json_of(apply(&mut h, rs.to_string()).await.object.as_ref().unwrap());
    assert_eq!(
        (
            j["spec"]["replicas"].clone(),
            j["spec"]["minReadySeconds"].clone()
        ),
        (json!(1), json!(0))
    );

    let mut ds = rs.clone();
    ds["kind"] = json!("DaemonSet");
    ds["metadata"]["name"] = json!("agent");
    let j = json_of(apply(&mut h, ds.to_string()).await.object.as_ref().unwrap());
    assert_eq!(j["spec"]["revisionHistoryLimit"], 10);
    assert_eq!(
        j["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    );

    let mut n = node("node-1");
    n["spec"] = json!({"podCIDR": "10.244.1.0/24", "taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]});
    let created = apply(&mut h, n.to_string()).await;
    let j = json_of(created.object.as_ref().unwrap());
    assert_eq!(meta(created.object.as_ref().unwrap()).namespace, "");
    assert_eq!(j["spec"]["podCIDRs"], json!(["10.244.1.0/24"]));
    // A re-apply without the CIDR (a label change) keeps it; changing it is refused.
    let mut relabel = node("node-1");
    relabel["metadata"]["labels"] = json!({"zone": "a"});
    let j = json_of(
        apply(&mut h, relabel.to_string())
            .await
            .object
            .as_ref()
            .unwrap(),
    );
    assert_eq!(j["spec"]["podCIDR"], "10.244.1.0/24");
    let mut moved = node("node-1");
    moved["spec"] = json!({"podCIDR": "10.244.2.0/24"});
    let err = refused(&mut h, &moved).await;
    assert!(
        err.message().contains("spec.podCIDR: field is immutable"),
        "{}",
        err.message()
    );
    let mut namespaced = node("node-2");
    namespaced["metadata"]["namespace"] = json!("default");
    let err = refused(&mut h, &namespaced).await;
    assert!(
        err.message().contains("metadata.namespace"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn resource_version_in_a_manifest_is_compare_and_swap() {
    let mut h = start().await;
    let first = apply(
        &mut h,
        deployment("web", &json!({"app": "web"}), &json!({"app": "web"})).to_string(),
    )
    .await;
    let rv = meta(first.object.as_ref().unwrap()).resource_version;
    // Read-modify-write with the version read: accepted.
    let mut scaled = json_of(first.object.as_ref().unwrap());
    scaled["spec"]["replicas"] = json!(3);
    let second = apply(&mut h, scaled.to_string()).await;
    let rv2 = meta(second.object.as_ref().unwrap()).resource_version;
    assert!(rv2 > rv);
    assert_eq!(
        json_of(second.object.as_ref().unwrap())["spec"]["replicas"],
        3
    );
    // The same write again is stale now, even though it changes nothing new.
    let err = refused(&mut h, &scaled).await;
    assert_eq!(err.code(), Code::Aborted);
    assert!(
        err.message().contains("deployments \"web\""),
        "{}",
        err.message()
    );
    // A version of an object that is gone.
    let mut gone = scaled.clone();
    gone["metadata"]["name"] = json!("other");
    assert_eq!(refused(&mut h, &gone).await.code(), Code::NotFound);
    let mut garbage = scaled.clone();
    garbage["metadata"]["resourceVersion"] = json!("abc");
    let err = refused(&mut h, &garbage).await;
    assert!(
        err.message().contains("metadata.resourceVersion"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn namespaces_must_exist_and_system_ones_always_do() {
    let mut h = start().await;
    let api = ObjectsApi::new(Arc::clone(&h.store));
    api.ensure_default_namespaces().await.unwrap();
    let rev = h.store.revision().await.unwrap();
    api.ensure_default_namespaces().await.unwrap();
    assert_eq!(h.store.revision().await.unwrap(), rev, "idempotent");
    for ns in ["default", "kube-system"] {
        let got = get(&mut h, "Namespace", "", ns).await.expect("exists");
        assert_eq!(json_of(&got)["status"]["phase"], "Active");
        let err = delete(&mut h, object_ref("Namespace", "", ns), "", None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(
            err.message().contains("may not be deleted"),
            "{}",
            err.message()
        );
    }
    let err = refused(
        &mut h,
        &serde_json::from_str(&super::tests::pod("p", "team", &json!({}), "nginx")).unwrap(),
    )
    .await;
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "namespaces \"team\" not found");
    namespace(&mut h, "team").await;
    apply(&mut h, super::tests::pod("p", "team", &json!({}), "nginx")).await;
}

#[tokio::test]
async fn pod_updates_keep_the_node_and_refuse_immutable_fields() {
    let mut h = start().await;
    let base = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "c", "image": "nginx:1", "command": ["nginx"]}],
                 "tolerations": [{"key": "a", "operator": "Exists"}]},
    });
    apply(&mut h, base.to_string()).await;
    let mut bound = base.clone();
    bound["spec"]["nodeName"] = json!("node-1");
    apply(&mut h, bound.to_string()).await;
    // The user's manifest again, without nodeName: the node stays.
    let again = apply(&mut h, base.to_string()).await;
    assert_eq!(
        json_of(again.object.as_ref().unwrap())["spec"]["nodeName"],
        "node-1"
    );
    let mut image = base.clone();
    image["spec"]["containers"][0]["image"] = json!("nginx:2");
    image["spec"]["tolerations"] =
        json!([{"key": "a", "operator": "Exists"}, {"key": "b", "operator": "Exists"}]);
    let changed = apply(&mut h, image.to_string()).await;
    let j = json_of(changed.object.as_ref().unwrap());
    assert_eq!(
        (
            j["spec"]["containers"][0]["image"].clone(),
            j["spec"]["nodeName"].clone()
        ),
        (json!("nginx:2"), json!("node-1"))
    );
    let before = h.store.revision().await.unwrap();

    let mut moved = image.clone();
    moved["spec"]["nodeName"] = json!("node-2");
    let mut command = image.clone();
    command["spec"]["containers"][0]["command"] = json!(["httpd"]);
    let mut grace = image.clone();
    grace["spec"]["restartPolicy"] = json!("Never");
    let mut fewer = image.clone();
    fewer["spec"]["tolerations"] = json!([{"key": "b", "operator": "Exists"}]);
    for (manifest, field) in [
        (
            moved,
            "spec.nodeName: field is immutable: the pod is bound to node \"node-1\"",
        ),
        (command, "spec.containers[0].command: field is immutable"),
        (grace, "spec.restartPolicy: field is immutable"),
        (fewer, "spec.tolerations[0]: field is immutable"),
    ] {
        let err = refused(&mut h, &manifest).await;
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains(field),
            "{field:?} not in {:?}",
            err.message()
        );
    }
    assert_eq!(h.store.revision().await.unwrap(), before);
}

fn deletion(object: &v1::Object) -> (Option<Timestamp>, Option<i64>) {
    let j = json_of(object);
    (
        j["metadata"]["deletionTimestamp"]
            .as_str()
            .map(|t| t.parse().unwrap()),
        j["metadata"]["deletionGracePeriodSeconds"].as_i64(),
    )
}

#[tokio::test]
async fn pods_are_deleted_gracefully_only_when_bound_to_a_node() {
    let mut h = start().await;
    let api = ObjectsApi::new(Arc::clone(&h.store));
    apply(&mut h, node("node-1").to_string()).await;
    let no_owner = ("ReplicaSet", "none", "0");
    let created = apply(
        &mut h,
        owned_pod("bound", no_owner, Some("node-1")).to_string(),
    )
    .await;
    let uid = meta(created.object.as_ref().unwrap()).uid.clone();
    let now = super::object::now().as_second();
    let marked = delete(&mut h, pod_ref("bound", "default"), "", None)
        .await
        .unwrap();
    let (at, grace) = deletion(&marked);
    assert_eq!(grace, Some(20), "the pod's terminationGracePeriodSeconds");
    let at = at.expect("deletionTimestamp").as_second();
    assert!((now + 19..=now + 22).contains(&at), "{at} vs {now}");
    // Still there; a re-apply keeps the deletion.
    let kept = get(&mut h, "Pod", "default", "bound")
        .await
        .expect("kept until stopped");
    assert_eq!(deletion(&kept), deletion(&marked));
    let reapplied = apply(&mut h, owned_pod("bound", no_owner, None).to_string()).await;
    assert_eq!(
        deletion(reapplied.object.as_ref().unwrap()),
        deletion(&marked)
    );
    // A longer grace changes nothing; a shorter one shortens.
    let longer = delete(&mut h, pod_ref("bound", "default"), "", Some(600))
        .await
        .unwrap();
    assert_eq!(deletion(&longer), deletion(&marked));
    let shorter = delete(&mut h, pod_ref("bound", "default"), "", Some(5))
        .await
        .unwrap();
    assert_eq!(deletion(&shorter).1, Some(5));
    assert!(deletion(&shorter).0 < deletion(&marked).0);
    // The agent reports it stopped: removed, but only if the uid matches.
    assert!(
        api.remove_pod("default", "bound", "another-uid")
            .await
            .unwrap()
            .is_none()
    );
    assert!(get(&mut h, "Pod", "default", "bound").await.is_some());
    assert!(
        api.remove_pod("default", "bound", &uid)
            .await
            .unwrap()
            .is_some()
    );
    assert!(get(&mut h, "Pod", "default", "bound").await.is_none());

    // Unbound, grace 0, or bound to a node that does not exist: at once.
    for (name, node, grace) in [
        ("unbound", None, None),
        ("forced", Some("node-1"), Some(0)),
        ("lost", Some("gone"), None),
    ] {
        apply(&mut h, owned_pod(name, no_owner, node).to_string()).await;
        let last = delete(&mut h, pod_ref(name, "default"), "", grace)
            .await
            .unwrap();
        assert_eq!(deletion(&last).0, None, "{name}");
        assert!(
            get(&mut h, "Pod", "default", name).await.is_none(),
            "{name}"
        );
    }
    let err = delete(&mut h, pod_ref("x", "default"), "", Some(-1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A Deployment owning a `ReplicaSet` owning a bound and an unbound pod.
async fn family(h: &mut Harness) -> (String, String) {
    apply(h, node("node-1").to_string()).await;
    let d = apply(
        h,
        deployment("web", &json!({"app": "web"}), &json!({"app": "web"})).to_string(),
    )
    .await;
    let d_uid = meta(d.object.as_ref().unwrap()).uid.clone();
    let mut rs = deployment("web-1", &json!({"app": "web"}), &json!({"app": "web"}));
    rs["kind"] = json!("ReplicaSet");
    rs["spec"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| k == "selector" || k == "template");
    rs["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": d_uid, "controller": true}]);
    let rs = apply(h, rs.to_string()).await;
    let rs_uid = meta(rs.object.as_ref().unwrap()).uid.clone();
    apply(
        h,
        owned_pod("web-1-a", ("ReplicaSet", "web-1", &rs_uid), Some("node-1")).to_string(),
    )
    .await;
    apply(
        h,
        owned_pod("web-1-b", ("ReplicaSet", "web-1", &rs_uid), None).to_string(),
    )
    .await;
    (d_uid, rs_uid)
}

#[tokio::test]
async fn background_delete_removes_the_owner_then_its_dependents() {
    let mut h = start().await;
    family(&mut h).await;
    let last = delete(&mut h, object_ref("Deployment", "default", "web"), "", None)
        .await
        .unwrap();
    assert_eq!(meta(&last).name, "web");
    assert!(get(&mut h, "Deployment", "default", "web").await.is_none());
    assert!(
        get(&mut h, "ReplicaSet", "default", "web-1")
            .await
            .is_none()
    );
    assert!(
        get(&mut h, "Pod", "default", "web-1-b").await.is_none(),
        "unbound: at once"
    );
    let bound = get(&mut h, "Pod", "default", "web-1-a")
        .await
        .expect("bound: gracefully");
    assert!(deletion(&bound).0.is_some());
}

#[tokio::test]
async fn foreground_delete_removes_the_owner_after_its_dependents() {
    let mut h = start().await;
    let api = ObjectsApi::new(Arc::clone(&h.store));
    family(&mut h).await;
    let last = delete(
        &mut h,
        object_ref("Deployment", "default", "web"),
        "Foreground",
        None,
    )
    .await
    .unwrap();
    assert!(deletion(&last).0.is_some());
    assert_eq!(
        json_of(&last)["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );
    let rs = get(&mut h, "ReplicaSet", "default", "web-1")
        .await
        .expect("waits for its pod");
    assert!(deletion(&rs).0.is_some());
    assert!(get(&mut h, "Pod", "default", "web-1-b").await.is_none());
    let pod = get(&mut h, "Pod", "default", "web-1-a")
        .await
        .expect("terminating");
    assert!(deletion(&pod).0.is_some());
    // The last pod stops: the ReplicaSet goes, then the Deployment.
    api.remove_pod("default", "web-1-a", &meta(&pod).uid)
        .await
        .unwrap()
        .unwrap();
    assert!(
        get(&mut h, "ReplicaSet", "default", "web-1")
            .await
            .is_none()
    );
    assert!(get(&mut h, "Deployment", "default", "web").await.is_none());
}

#[tokio::test]
async fn orphan_delete_releases_the_dependents() {
    let mut h = start().await;
    let (_, rs_uid) = family(&mut h).await;
    delete(
        &mut h,
        object_ref("Deployment", "default", "web"),
        "Orphan",
        None,
    )
    .await
    .unwrap();
    assert!(get(&mut h, "Deployment", "default", "web").await.is_none());
    let rs = get(&mut h, "ReplicaSet", "default", "web-1")
        .await
        .expect("orphaned, not deleted");
    assert_eq!(json_of(&rs)["metadata"].get("ownerReferences"), None);
    for pod in ["web-1-a", "web-1-b"] {
        let p = get(&mut h, "Pod", "default", pod).await.expect("untouched");
        assert_eq!(deletion(&p).0, None);
        assert_eq!(
            json_of(&p)["metadata"]["ownerReferences"][0]["uid"],
            rs_uid.as_str()
        );
    }
    let err = delete(
        &mut h,
        object_ref("Deployment", "default", "web"),
        "Sideways",
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn deleting_a_namespace_deletes_everything_in_it() {
    let mut h = start().await;
    let api = ObjectsApi::new(Arc::clone(&h.store));
    apply(&mut h, node("node-1").to_string()).await;
    namespace(&mut h, "shop").await;
    let mut d = deployment("web", &json!({"app": "web"}), &json!({"app": "web"}));
    d["metadata"]["namespace"] = json!("shop");
    apply(&mut h, d.to_string()).await;
    let mut bound = owned_pod("bound", ("ReplicaSet", "none", "0"), Some("node-1"));
    bound["metadata"]["namespace"] = json!("shop");
    let bound = apply(&mut h, bound.to_string()).await;
    let last = delete(&mut h, object_ref("Namespace", "", "shop"), "", None)
        .await
        .unwrap();
    assert_eq!(json_of(&last)["status"]["phase"], "Terminating");
    assert!(get(&mut h, "Deployment", "shop", "web").await.is_none());
    // Nothing new goes into a terminating namespace.
    let mut late = deployment("late", &json!({"app": "web"}), &json!({"app": "web"}));
    late["metadata"]["namespace"] = json!("shop");
    let err = refused(&mut h, &late).await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("being terminated"),
        "{}",
        err.message()
    );
    // The last pod stops: the namespace goes.
    let uid = meta(bound.object.as_ref().unwrap()).uid.clone();
    api.remove_pod("shop", "bound", &uid)
        .await
        .unwrap()
        .unwrap();
    assert!(get(&mut h, "Namespace", "", "shop").await.is_none());
}
