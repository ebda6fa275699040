//! The Nodes service in process over a `RedbStore` in a temp dir: CIDR
//! allocation, Node objects, heartbeats, the `WatchNode` stream and status
//! reports, with the store as the observer.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use weir_proto::v1;

use super::{NodeEventStream, NodesConfig, NodesError, NodesService};
use crate::api::ObjectsApi;
use crate::store::{Compare, Op, RedbStore, Store};

struct Harness {
    nodes: NodesService<RedbStore>,
    api: Arc<ObjectsApi<RedbStore>>,
    _dir: tempfile::TempDir,
}

fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
    let api = Arc::new(ObjectsApi::new(store));
    let cfg = NodesConfig {
        bookmark_interval: Duration::from_millis(300),
        ..NodesConfig::default()
    };
    Harness {
        nodes: NodesService::new(api.clone(), cfg),
        api,
        _dir: dir,
    }
}

fn register_req(name: &str, ip: &str) -> v1::RegisterRequest {
    v1::RegisterRequest {
        node_name: name.into(),
        capacity: Some(v1::Resources {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            pods: 110,
        }),
        allocatable: Some(v1::Resources {
            cpu_millis: 1900,
            memory_bytes: 3 << 30,
            pods: 110,
        }),
        labels: [("disk".to_owned(), "ssd".to_owned())].into(),
        address: ip.into(),
        agent_version: "v0.1.0".into(),
    }
}

fn node_ref(name: &str) -> v1::ObjectRef {
    super::node_ref(name)
}

async fn node_json(h: &Harness, name: &str) -> Value {
    let o = h.api.get(&node_ref(name)).await.unwrap();
    serde_json::from_str(&o.json).unwrap()
}

fn ready(node: &Value) -> Value {
    node["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn register_allocates_distinct_stable_cidrs_and_writes_a_ready_node() {
    let h = start();
    let r1 = h
        .nodes
        .register(&register_req("n1", "10.0.0.2"))
        .await
        .unwrap();
    let r2 = h
        .nodes
        .register(&register_req("n2", "10.0.0.3"))
        .await
        .unwrap();
    assert_eq!(r1.pod_cidr, "10.244.1.0/24");
    assert_eq!(r2.pod_cidr, "10.244.2.0/24");
    assert_eq!(r1.cluster_cidr, "10.244.0.0/16");
    assert_eq!(r1.service_cidr, "10.96.0.0/16");
    assert_eq!(r1.heartbeat_interval_ms, 5000);
    // A re-register keeps the CIDR, and a cordon survives it.
    let mut n1 = node_json(&h, "n1").await;
    n1["spec"]["unschedulable"] = json!(true);
    n1["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    h.api
        .apply(&v1::ApplyRequest {
            manifest_json: n1.to_string(),
            field_manager: "test".into(),
        })
        .await
        .unwrap();
    let again = h
        .nodes
        .register(&register_req("n1", "10.0.0.2"))
        .await
        .unwrap();
    assert_eq!(again.pod_cidr, "10.244.1.0/24");
    let n1 = node_json(&h, "n1").await;
    assert_eq!(n1["spec"]["unschedulable"], true);
    assert_eq!(n1["spec"]["podCIDR"], "10.244.1.0/24");
    assert_eq!(n1["spec"]["podCIDRs"], json!(["10.244.1.0/24"]));
    assert_eq!(n1["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
    assert_eq!(n1["metadata"]["labels"]["disk"], "ssd");
    assert_eq!(n1["status"]["capacity"]["cpu"], "2");
    assert_eq!(n1["status"]["allocatable"]["cpu"], "1900m");
    assert_eq!(n1["status"]["addresses"][0]["type"], "InternalIP");
    assert_eq!(n1["status"]["addresses"][0]["address"], "10.0.0.2");
    assert_eq!(n1["status"]["nodeInfo"]["kubeletVersion"], "v0.1.0");
    assert_eq!(ready(&n1)["status"], "True");
    // A removed node frees its CIDR for the next new node.
    h.api
        .delete(&v1::DeleteRequest {
            r#ref: Some(node_ref("n1")),
            ..Default::default()
        })
        .await
        .unwrap();
    let r3 = h
        .nodes
        .register(&register_req("n3", "10.0.0.4"))
        .await
        .unwrap();
    assert_eq!(r3.pod_cidr, "10.244.1.0/24");
    // Bad requests say what is wrong.
    let bad = h.nodes.register(&register_req("N_1", "10.0.0.5")).await;
    assert!(
        matches!(&bad, Err(NodesError::Invalid(m)) if m.contains("node_name")),
        "{bad:?}"
    );
    let bad = h.nodes.register(&register_req("n4", "not-an-ip")).await;
    assert!(
        matches!(&bad, Err(NodesError::Invalid(m)) if m.contains("address")),
        "{bad:?}"
    );
}

#[tokio::test]
async fn heartbeats_keep_the_node_ready_and_unknown_nodes_must_register() {
    let h = start();
    let beat = |name: &str| v1::HeartbeatRequest {
        node_name: name.into(),
        ..Default::default()
    };
    let unknown = h.nodes.heartbeat(&beat("n1")).await;
    assert!(
        matches!(unknown, Err(NodesError::NotFound(_))),
        "{unknown:?}"
    );
    let status: tonic::Status = unknown.unwrap_err().into();
    assert_eq!(status.code(), tonic::Code::NotFound);
    h.nodes
        .register(&register_req("n1", "10.0.0.2"))
        .await
        .unwrap();
    // The node controller marks it Unknown; a heartbeat brings it back.
    let mut n1 = node_json(&h, "n1").await;
    let mut st = n1["status"].take();
    for c in st["conditions"].as_array_mut().unwrap() {
        if c["type"] == "Ready" {
            c["status"] = json!("Unknown");
            c["lastHeartbeatTime"] = json!("2020-01-01T00:00:00Z");
        }
    }
    h.api
        .update_status(&v1::UpdateStatusRequest {
            r#ref: Some(node_ref("n1")),
            status_json: st.to_string(),
            resource_version: 0,
        })
        .await
        .unwrap();
    h.nodes.heartbeat(&beat("n1")).await.unwrap();
    let n1 = node_json(&h, "n1").await;
    let r = ready(&n1);
    assert_eq!(r["status"], "True");
    assert_ne!(r["lastHeartbeatTime"], "2020-01-01T00:00:00Z");
    assert_eq!(
        n1["status"]["addresses"][0]["address"], "10.0.0.2",
        "heartbeat kept the addresses"
    );
}

fn pod_manifest(name: &str, node: &str) -> String {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    if !node.is_empty() {
        p["spec"]["nodeName"] = json!(node);
    }
    p.to_string()
}

async fn apply(h: &Harness, manifest: String) -> v1::Object {
    h.api
        .apply(&v1::ApplyRequest {
            manifest_json: manifest,
            field_manager: "test".into(),
        })
        .await
        .unwrap()
        .object
        .unwrap()
}

/// The next pod, peer, bookmark or resync event, as (kind, what, name,
/// revision); the policy events (`policy_tests.rs`) are skipped.
async fn next(s: &mut NodeEventStream) -> (String, v1::EventType, String, u64) {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("an event within 5 s")
            .expect("stream open")
            .expect("not an error");
        return match e.event.expect("event set") {
            v1::node_event::Event::Pod(p) => {
                let t = p.r#type();
                let name = p.pod.unwrap().meta.unwrap().name;
                ("pod".into(), t, name, e.revision)
            }
            v1::node_event::Event::Peer(p) => {
                let t = p.r#type();
                (
                    "peer".into(),
                    t,
                    format!("{}={}@{}", p.node_name, p.pod_cidr, p.address),
                    e.revision,
                )
            }
            v1::node_event::Event::Bookmark(_) => (
                "bookmark".into(),
                v1::EventType::Bookmark,
                String::new(),
                e.revision,
            ),
            v1::node_event::Event::Resync(r) => {
                ("resync".into(), v1::EventType::Error, r.reason, e.revision)
            }
            v1::node_event::Event::Namespace(_)
            | v1::node_event::Event::Identity(_)
            | v1::node_event::Event::Ipcache(_)
            | v1::node_event::Event::Policy(_)
            | v1::node_event::Event::Service(_) => continue,
        };
    }
}

/// Events up to (not including) the next bookmark.
async fn until_bookmark(s: &mut NodeEventStream) -> (Vec<(String, v1::EventType, String)>, u64) {
    let mut out = Vec::new();
    loop {
        let (k, t, n, rev) = next(s).await;
        if k == "bookmark" {
            return (out, rev);
        }
        out.push((k, t, n));
    }
}

#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one stream's story, top to bottom")]
#[expect(clippy::many_single_char_names, reason = "h = harness, s/r = streams")]
async fn watch_node_lists_then_follows_its_pods_and_peers_and_resumes() {
    use v1::EventType::{Added, Deleted, Modified};
    let h = start();
    h.nodes
        .register(&register_req("n1", "10.0.0.2"))
        .await
        .unwrap();
    h.nodes
        .register(&register_req("n2", "10.0.0.3"))
        .await
        .unwrap();
    apply(&h, pod_manifest("a", "n1")).await;
    apply(&h, pod_manifest("b", "n2")).await;
    apply(&h, pod_manifest("c", "")).await;
    let mut s = h
        .nodes
        .watch_node(&v1::WatchNodeRequest {
            node_name: "n1".into(),
            from_revision: 0,
        })
        .unwrap();
    let (initial, listed_at) = until_bookmark(&mut s).await;
    let s_ = |k: &str, t, n: &str| (k.to_owned(), t, n.to_owned());
    assert_eq!(
        initial,
        vec![
            s_("pod", Added, "a"),
            s_("peer", Added, "n1=10.244.1.0/24@10.0.0.2"),
            s_("peer", Added, "n2=10.244.2.0/24@10.0.0.3"),
        ]
    );
    // Heartbeats are no peer change; binding c to n1 adds it.
    h.nodes
        .heartbeat(&v1::HeartbeatRequest {
            node_name: "n2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let c = apply(&h, pod_manifest("c", "n1")).await;
    let (k, t, n, rev_c) = next(&mut s).await;
    assert_eq!((k.as_str(), t, n.as_str()), ("pod", Added, "c"));
    assert_eq!(rev_c, c.meta.unwrap().resource_version);
    // A status report: MODIFIED.
    let a = h
        .api
        .get(&v1::ObjectRef {
            kind: "Pod".into(),
            namespace: "default".into(),
            name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    h.nodes
        .report_pod_status(&v1::ReportPodStatusRequest {
            node_name: "n1".into(),
            pod: Some(v1::ObjectRef {
                kind: "Pod".into(),
                namespace: "default".into(),
                name: "a".into(),
                ..Default::default()
            }),
            uid: a.meta.unwrap().uid,
            status_json: json!({"phase": "Running", "podIP": "10.244.1.5"}).to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (k, t, n, _) = next(&mut s).await;
    assert_eq!((k.as_str(), t, n.as_str()), ("pod", Modified, "a"));
    // A third node joins: peer ADDED.
    h.nodes
        .register(&register_req("n3", "10.0.0.4"))
        .await
        .unwrap();
    let (k, t, n, _) = next(&mut s).await;
    assert_eq!(
        (k.as_str(), t, n.as_str()),
        ("peer", Added, "n3=10.244.3.0/24@10.0.0.4")
    );
    // Pod c goes: DELETED. b's changes never show.
    h.api
        .delete(&v1::DeleteRequest {
            r#ref: Some(v1::ObjectRef {
                kind: "Pod".into(),
                namespace: "default".into(),
                name: "c".into(),
                ..Default::default()
            }),
            // Removed at once (a graceful delete would be MODIFIED first).
            grace_period_seconds: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    apply(&h, pod_manifest("b2", "n2")).await;
    let (k, t, n, rev_del) = next(&mut s).await;
    assert_eq!((k.as_str(), t, n.as_str()), ("pod", Deleted, "c"));
    // Bookmarks carry the last revision processed (b2's, which n1 never saw).
    let (_, bm) = until_bookmark(&mut s).await;
    assert!(bm > rev_del, "bookmark {bm} after deletion at {rev_del}");
    drop(s);

    // Resuming from the revision after c was added replays the rest, the
    // same way the live stream had them.
    let mut r = h
        .nodes
        .watch_node(&v1::WatchNodeRequest {
            node_name: "n1".into(),
            from_revision: rev_c,
        })
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (k, t, n, _) = next(&mut r).await;
        if k != "bookmark" {
            seen.push((k, t, n));
        }
    }
    assert_eq!(
        seen,
        vec![
            s_("pod", Modified, "a"),
            s_("peer", Added, "n3=10.244.3.0/24@10.0.0.4"),
            s_("pod", Deleted, "c"),
        ]
    );
    assert!(listed_at < rev_c);

    // A compacted revision: Resync, then the stream ends.
    let now = h.api.store().revision().await.unwrap();
    h.api.store().compact(now).await.unwrap();
    let mut old = h
        .nodes
        .watch_node(&v1::WatchNodeRequest {
            node_name: "n1".into(),
            from_revision: rev_c,
        })
        .unwrap();
    let (k, _, reason, _) = next(&mut old).await;
    assert_eq!(k, "resync");
    assert!(reason.contains("compacted"), "{reason}");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), old.next())
            .await
            .unwrap()
            .is_none()
    );
}

fn pod_ref(name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: "v1".into(),
        kind: "Pod".into(),
        namespace: "default".into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn pod_status_reports_check_uid_and_node_and_terminated_pods_are_removed() {
    let h = start();
    h.nodes
        .register(&register_req("n1", "10.0.0.2"))
        .await
        .unwrap();
    let created = apply(&h, pod_manifest("a", "n1")).await;
    let uid = created.meta.unwrap().uid;
    // The scheduler's condition survives the agent's report.
    h.api
        .update_status(&v1::UpdateStatusRequest {
            r#ref: Some(pod_ref("a")),
            status_json: json!({"conditions": [{"type": "PodScheduled", "status": "True"}]})
                .to_string(),
            resource_version: 0,
        })
        .await
        .unwrap();
    let report = |node: &str, uid: &str, terminated: bool| v1::ReportPodStatusRequest {
        node_name: node.into(),
        pod: Some(pod_ref("a")),
        uid: uid.into(),
        status_json: json!({"phase": "Running", "podIP": "10.244.1.7", "hostIP": "10.0.0.2",
                            "conditions": [{"type": "Ready", "status": "True"}]})
        .to_string(),
        observed_resource_version: 0,
        terminated,
    };
    h.nodes
        .report_pod_status(&report("n1", &uid, false))
        .await
        .unwrap();
    let a: Value = serde_json::from_str(&h.api.get(&pod_ref("a")).await.unwrap().json).unwrap();
    assert_eq!(a["status"]["phase"], "Running");
    assert_eq!(a["status"]["podIP"], "10.244.1.7");
    let types: Vec<&str> = a["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert_eq!(types, ["Ready", "PodScheduled"]);
    // Another uid or another node: refused, nothing written.
    let wrong = h
        .nodes
        .report_pod_status(&report("n1", "other-uid", false))
        .await;
    assert!(
        matches!(&wrong, Err(NodesError::FailedPrecondition(m)) if m.contains("uid")),
        "{wrong:?}"
    );
    let wrong = h.nodes.report_pod_status(&report("n2", &uid, false)).await;
    assert!(
        matches!(&wrong, Err(NodesError::FailedPrecondition(m)) if m.contains("bound to")),
        "{wrong:?}"
    );
    // Terminated without a deletion mark: the object stays.
    h.nodes
        .report_pod_status(&report("n1", &uid, true))
        .await
        .unwrap();
    assert!(h.api.get(&pod_ref("a")).await.is_ok());
    // Marked for deletion (as graceful Delete does), then terminated: gone.
    let key = "/core/pods/default/a";
    let kv = h.api.store().get(key).await.unwrap().unwrap();
    let mut j: Value = serde_json::from_slice(&kv.value).unwrap();
    j["metadata"]["deletionTimestamp"] = json!("2030-01-01T00:00:00Z");
    j["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    let put = h
        .api
        .store()
        .txn(
            vec![(key.into(), Compare::ModRevision(kv.mod_revision))],
            vec![Op::Put {
                key: key.into(),
                value: serde_json::to_vec(&j).unwrap(),
            }],
        )
        .await
        .unwrap();
    assert!(put.succeeded);
    // A stale uid cannot remove it.
    assert!(
        h.nodes
            .report_pod_status(&report("n1", "other-uid", true))
            .await
            .is_err()
    );
    assert!(h.api.get(&pod_ref("a")).await.is_ok());
    h.nodes
        .report_pod_status(&report("n1", &uid, true))
        .await
        .unwrap();
    assert!(
        h.api.store().get(key).await.unwrap().is_none(),
        "pod removed"
    );
    // Reporting again is fine (already gone); a non-terminal report is NotFound.
    h.nodes
        .report_pod_status(&report("n1", &uid, true))
        .await
        .unwrap();
    let gone = h.nodes.report_pod_status(&report("n1", &uid, false)).await;
    assert!(matches!(gone, Err(NodesError::NotFound(_))), "{gone:?}");
}
