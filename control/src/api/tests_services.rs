//! Services through the API in-process over a `RedbStore`: allocation
//! (unique under concurrency, released on delete, clashes refused naming
//! the field), immutability and type changes, and slices deleted with
//! their Service.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Value, json};
use weir_proto::v1;

use super::{ApiError, CLUSTER_IP_RECORDS, NODE_PORT_RECORDS, ObjectsApi};
use crate::store::{RedbStore, Store};

fn api() -> (Arc<ObjectsApi<RedbStore>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path().join("store.redb")).unwrap());
    (Arc::new(ObjectsApi::new(store)), dir)
}

fn svc(name: &str, spec: &Value) -> v1::ApplyRequest {
    v1::ApplyRequest {
        manifest_json: json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec})
        .to_string(),
        ..Default::default()
    }
}

fn spec_of(object: &v1::Object) -> Value {
    let v: Value = serde_json::from_str(&object.json).unwrap();
    v["spec"].clone()
}

async fn apply(api: &ObjectsApi<RedbStore>, name: &str, spec: &Value) -> Result<Value, ApiError> {
    let r = api.apply(&svc(name, spec)).await?;
    Ok(spec_of(&r.object.unwrap()))
}

fn svc_ref(name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: String::new(),
        kind: "Service".into(),
        namespace: "default".into(),
        name: name.into(),
    }
}

async fn records(api: &ObjectsApi<RedbStore>, prefix: &str) -> Vec<String> {
    let (kvs, _) = api.store().list(prefix).await.unwrap();
    kvs.into_iter().map(|kv| kv.key).collect()
}

fn refusal(r: Result<Value, ApiError>) -> String {
    match r {
        Err(ApiError::Invalid(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn cluster_ip_is_allocated_kept_and_immutable() {
    let (api, _dir) = api();
    let spec = json!({"selector": {"app": "web"}, "ports": [{"port": 80}]});
    let got = apply(&api, "web", &spec).await.unwrap();
    let ip: std::net::Ipv4Addr = got["clusterIP"].as_str().unwrap().parse().unwrap();
    let o = ip.octets();
    assert_eq!((o[0], o[1]), (10, 96), "{ip} is in 10.96.0.0/16");
    assert!(
        ![
            [10, 96, 0, 0],
            [10, 96, 0, 1],
            [10, 96, 0, 10],
            [10, 96, 255, 255]
        ]
        .contains(&o),
        "{ip} is reserved"
    );
    assert_eq!(got["clusterIPs"], json!([ip.to_string()]));
    // Re-applied without it: kept.
    let again = apply(&api, "web", &spec).await.unwrap();
    assert_eq!(again["clusterIP"], got["clusterIP"]);
    // Changed: refused.
    let mut other = spec.clone();
    other["clusterIP"] = json!(if o[3] == 77 {
        "10.96.3.78"
    } else {
        "10.96.3.77"
    });
    let m = refusal(apply(&api, "web", &other).await);
    assert!(m.contains("spec.clusterIP: field is immutable"), "{m}");
    // Headless to allocated is a change of cluster IP too.
    apply(&api, "headless", &json!({"clusterIP": "None"}))
        .await
        .unwrap();
    let m = refusal(
        apply(
            &api,
            "headless",
            &json!({"clusterIP": "10.96.9.9", "ports": [{"port": 80}]}),
        )
        .await,
    );
    assert!(m.contains("spec.clusterIP: field is immutable"), "{m}");
    assert_eq!(records(&api, CLUSTER_IP_RECORDS).await.len(), 1);
}

#[tokio::test]
async fn concurrent_creates_never_share_an_ip_or_port() {
    let (api, _dir) = api();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let api = Arc::clone(&api);
        tasks.push(tokio::spawn(async move {
            apply(
                &api,
                &format!("s{i}"),
                &json!({"type": "NodePort", "ports": [{"port": 80}]}),
            )
            .await
        }));
    }
    let mut ips = HashSet::new();
    let mut ports = HashSet::new();
    for t in tasks {
        let spec = t.await.unwrap().unwrap();
        assert!(
            ips.insert(spec["clusterIP"].as_str().unwrap().to_owned()),
            "duplicate IP {spec}"
        );
        let port = spec["ports"][0]["nodePort"].as_i64().unwrap();
        assert!((30000..=32767).contains(&port), "{port}");
        assert!(ports.insert(port), "duplicate node port {port}");
    }
    assert_eq!(records(&api, CLUSTER_IP_RECORDS).await.len(), 50);
    assert_eq!(records(&api, NODE_PORT_RECORDS).await.len(), 50);
}

#[tokio::test]
async fn clashes_are_refused_and_delete_releases() {
    let (api, _dir) = api();
    let spec = json!({"type": "NodePort", "clusterIP": "10.96.7.7",
        "ports": [{"port": 80, "nodePort": 30080}]});
    apply(&api, "a", &spec).await.unwrap();
    let m = refusal(
        apply(
            &api,
            "b",
            &json!({"clusterIP": "10.96.7.7", "ports": [{"port": 80}]}),
        )
        .await,
    );
    assert!(
        m.contains("spec.clusterIP: 10.96.7.7: provided IP is already allocated"),
        "{m}"
    );
    let m = refusal(
        apply(
            &api,
            "b",
            &json!({"type": "NodePort",
        "ports": [{"port": 80, "nodePort": 30080}]}),
        )
        .await,
    );
    assert!(
        m.contains("spec.ports[0].nodePort: 30080: provided port is already allocated"),
        "{m}"
    );
    let m = refusal(
        apply(
            &api,
            "b",
            &json!({"clusterIP": "10.97.0.5", "ports": [{"port": 80}]}),
        )
        .await,
    );
    assert!(
        m.contains("spec.clusterIP: 10.97.0.5: provided IP is not in the valid range"),
        "{m}"
    );
    // A refused create allocated nothing.
    assert!(api.get(&svc_ref("b")).await.is_err());
    assert_eq!(records(&api, CLUSTER_IP_RECORDS).await.len(), 1);
    api.delete(&v1::DeleteRequest {
        r#ref: Some(svc_ref("a")),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(records(&api, CLUSTER_IP_RECORDS).await.is_empty());
    assert!(records(&api, NODE_PORT_RECORDS).await.is_empty());
    // Released: now b may have them.
    apply(&api, "b", &spec).await.unwrap();
}

#[tokio::test]
async fn type_changes_allocate_and_release_node_ports() {
    let (api, _dir) = api();
    let got = apply(&api, "s", &json!({"ports": [{"port": 80}]}))
        .await
        .unwrap();
    assert!(got["ports"][0].get("nodePort").is_none());
    let np = apply(
        &api,
        "s",
        &json!({"type": "NodePort", "ports": [{"port": 80}]}),
    )
    .await
    .unwrap();
    let port = np["ports"][0]["nodePort"].as_i64().unwrap();
    assert_eq!(np["clusterIP"], got["clusterIP"]);
    assert_eq!(np["externalTrafficPolicy"], "Cluster");
    // Re-applied without the node port: kept.
    let again = apply(
        &api,
        "s",
        &json!({"type": "NodePort", "ports": [{"port": 80}]}),
    )
    .await
    .unwrap();
    assert_eq!(again["ports"][0]["nodePort"].as_i64(), Some(port));
    assert_eq!(
        records(&api, NODE_PORT_RECORDS).await,
        vec![format!("{NODE_PORT_RECORDS}{port}")]
    );
    // Back to ClusterIP: released.
    apply(&api, "s", &json!({"ports": [{"port": 80}]}))
        .await
        .unwrap();
    assert!(records(&api, NODE_PORT_RECORDS).await.is_empty());
    let m = refusal(
        apply(
            &api,
            "s",
            &json!({"type": "LoadBalancer", "ports": [{"port": 80}]}),
        )
        .await,
    );
    assert!(
        m.contains("spec.type") && m.contains("not supported by weir"),
        "{m}"
    );
}

#[tokio::test]
async fn slices_are_deleted_with_their_service() {
    let (api, _dir) = api();
    let r = api
        .apply(&svc("web", &json!({"ports": [{"port": 80}]})))
        .await
        .unwrap();
    let object: Value = serde_json::from_str(&r.object.unwrap().json).unwrap();
    let uid = object["metadata"]["uid"].as_str().unwrap();
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": true}}],
        "ports": [{"port": 80, "protocol": "TCP"}]});
    api.apply(&v1::ApplyRequest {
        manifest_json: slice.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    let slice_ref = v1::ObjectRef {
        api_version: "discovery.k8s.io/v1".into(),
        kind: "EndpointSlice".into(),
        namespace: "default".into(),
        name: "web".into(),
    };
    assert!(api.get(&slice_ref).await.is_ok());
    api.delete(&v1::DeleteRequest {
        r#ref: Some(svc_ref("web")),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(matches!(
        api.get(&slice_ref).await,
        Err(ApiError::NotFound { .. })
    ));
}
