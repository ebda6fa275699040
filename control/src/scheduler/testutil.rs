//! Builders for the unit tests.

use std::collections::BTreeMap;

use serde_json::json;
use weir_proto::v1;

use super::model::{NodeInfo, PodInfo, Readiness, Resources};
use super::plugins::HOSTNAME_LABEL;
use crate::api::ObjectsApi;
use crate::store::Store;

/// Writes node `name`'s status as its agent would: Ready, with `cpu`
/// cores, `memory` and 110 pods as capacity and allocatable.
pub async fn set_node_ready<S: Store>(api: &ObjectsApi<S>, name: &str, cpu: &str, memory: &str) {
    let resources = json!({"cpu": cpu, "memory": memory, "pods": "110"});
    api.update_status(&v1::UpdateStatusRequest {
        r#ref: Some(v1::ObjectRef {
            api_version: "v1".into(),
            kind: "Node".into(),
            namespace: String::new(),
            name: name.into(),
        }),
        status_json: json!({"capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True"}]})
        .to_string(),
        resource_version: 0,
    })
    .await
    .unwrap();
}

/// A Ready node with `cpu` millicores, `memory` bytes, 110 pods and the
/// hostname label.
pub fn node(name: &str, cpu: i64, memory: i64) -> NodeInfo {
    NodeInfo {
        name: name.to_owned(),
        labels: BTreeMap::from([(HOSTNAME_LABEL.to_owned(), name.to_owned())]),
        taints: Vec::new(),
        unschedulable: false,
        readiness: Readiness::Ready,
        allocatable: Resources {
            milli_cpu: cpu,
            memory,
            pods: 110,
        },
    }
}

/// An unbound pod in `default` requesting `cpu` millicores and `memory` bytes.
pub fn pod(name: &str, cpu: i64, memory: i64) -> PodInfo {
    let requests = Resources {
        milli_cpu: cpu,
        memory,
        pods: 1,
    };
    PodInfo {
        key: format!("default/{name}").into(),
        namespace: "default".to_owned(),
        name: name.to_owned(),
        uid: format!("uid-{name}"),
        requests,
        nonzero: Resources {
            milli_cpu: if cpu == 0 { 100 } else { cpu },
            memory: if memory == 0 { 200 << 20 } else { memory },
            pods: 1,
        },
        ..PodInfo::default()
    }
}
