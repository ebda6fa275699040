//! The Node object as `Register` and `Heartbeat` write it (contract item 6):
//! pure functions from the stored JSON and the agent's request to the new
//! manifest and status.

use serde_json::{Map, Value, json};
use weir_proto::v1;

/// The `Ready` condition's reason while the agent heartbeats.
pub const READY_REASON: &str = "KubeletReady";
/// Its message.
pub const READY_MESSAGE: &str = "kubelet is posting ready status";

/// A CPU amount as Kubernetes writes it: whole cores (`"2"`) or millicores
/// (`"1500m"`).
pub fn cpu_quantity(millis: i64) -> String {
    if millis % 1000 == 0 {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

/// `capacity`/`allocatable` of a node status.
pub fn resources(r: &v1::Resources) -> Value {
    json!({
        "cpu": cpu_quantity(r.cpu_millis),
        "memory": r.memory_bytes.to_string(),
        "pods": r.pods.to_string(),
    })
}

/// The Node manifest a registration applies: the stored node's metadata
/// and spec (cordon, taints, annotations, extra labels survive a
/// re-register) with the standard labels, the agent's labels and the pod
/// CIDR on top.
pub fn manifest(req: &v1::RegisterRequest, stored: Option<&Value>, pod_cidr: &str) -> Value {
    let stored_field = |path: &str| {
        stored
            .and_then(|s| s.pointer(path))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let mut labels = stored_field("/metadata/labels");
    for (k, v) in [
        ("kubernetes.io/hostname", req.node_name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
    ] {
        labels.insert(k.to_owned(), Value::from(v));
    }
    for (k, v) in &req.labels {
        labels.insert(k.clone(), Value::from(v.as_str()));
    }
    let mut metadata = Map::new();
    metadata.insert("name".to_owned(), Value::from(req.node_name.as_str()));
    metadata.insert("labels".to_owned(), Value::Object(labels));
    let annotations = stored_field("/metadata/annotations");
    if !annotations.is_empty() {
        metadata.insert("annotations".to_owned(), Value::Object(annotations));
    }
    let mut spec = stored_field("/spec");
    spec.insert("podCIDR".to_owned(), Value::from(pod_cidr));
    spec.insert("podCIDRs".to_owned(), json!([pod_cidr]));
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": metadata,
        "spec": spec,
    })
}

/// The status a registration writes: resources, addresses, `Ready=True`
/// and node info. `stored` is the status before (for lastTransitionTime).
pub fn registered_status(req: &v1::RegisterRequest, stored: Option<&Value>, now: &str) -> Value {
    let mut status = json!({
        "addresses": [
            {"type": "InternalIP", "address": req.address},
            {"type": "Hostname", "address": req.node_name},
        ],
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "kubeletVersion": req.agent_version,
            "kubeProxyVersion": "",
            "containerRuntimeVersion": "containerd",
            "kernelVersion": "",
            "osImage": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    });
    if let Some(c) = &req.capacity {
        status["capacity"] = resources(c);
    }
    if let Some(a) = &req.allocatable {
        status["allocatable"] = resources(a);
    }
    let conditions = stored
        .and_then(|s| s.get("conditions"))
        .cloned()
        .unwrap_or_else(|| json!([]));
    status["conditions"] = conditions;
    set_ready(&mut status, now);
    status
}

/// Marks a status `Ready=True` with `lastHeartbeatTime` now (the
/// transition time moves only if Ready was not already True), keeping
/// every other field and condition.
pub fn set_ready(status: &mut Value, now: &str) {
    if !status.is_object() {
        *status = json!({});
    }
    if !status.get("conditions").is_some_and(Value::is_array) {
        status["conditions"] = json!([]);
    }
    let Some(conditions) = status["conditions"].as_array_mut() else {
        return;
    };
    let was_true = conditions
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True");
    let transition = if was_true {
        conditions
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
            .and_then(|c| c.get("lastTransitionTime"))
            .cloned()
            .unwrap_or_else(|| Value::from(now))
    } else {
        Value::from(now)
    };
    conditions.retain(|c| c.get("type").and_then(Value::as_str) != Some("Ready"));
    conditions.push(json!({
        "type": "Ready",
        "status": "True",
        "reason": READY_REASON,
        "message": READY_MESSAGE,
        "lastHeartbeatTime": now,
        "lastTransitionTime": transition,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> v1::RegisterRequest {
        v1::RegisterRequest {
            node_name: "n1".into(),
            capacity: Some(v1::Resources {
                cpu_millis: 2000,
                memory_bytes: 8 << 30,
                pods: 110,
            }),
            allocatable: Some(v1::Resources {
                cpu_millis: 1900,
                memory_bytes: 7 << 30,
                pods: 110,
            }),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            address: "10.0.0.2".into(),
            agent_version: "v0.1.0".into(),
        }
    }

    #[test]
    fn manifest_keeps_cordon_taints_and_extra_labels() {
        let stored = json!({"metadata": {"name": "n1", "labels": {"team": "x", "zone": "old"},
                                         "annotations": {"a": "b"}},
                            "spec": {"unschedulable": true, "taints": [{"key": "k", "effect": "NoSchedule"}],
                                     "podCIDR": "10.244.3.0/24"}});
        let m = manifest(&req(), Some(&stored), "10.244.3.0/24");
        assert_eq!(m["metadata"]["labels"]["team"], "x");
        assert_eq!(m["metadata"]["labels"]["zone"], "a");
        assert_eq!(m["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        assert_eq!(m["metadata"]["labels"]["kubernetes.io/os"], "linux");
        assert_eq!(m["metadata"]["annotations"]["a"], "b");
        assert_eq!(m["spec"]["unschedulable"], true);
        assert_eq!(m["spec"]["taints"][0]["key"], "k");
        assert_eq!(m["spec"]["podCIDRs"], json!(["10.244.3.0/24"]));
        // It parses as a Node.
        serde_json::from_value::<k8s_openapi::api::core::v1::Node>(m).expect("a Node");
    }

    #[test]
    fn status_is_ready_with_resources_and_keeps_transition_while_ready() {
        let s = registered_status(&req(), None, "2025-01-01T00:00:00Z");
        assert_eq!(s["capacity"]["cpu"], "2");
        assert_eq!(s["allocatable"]["cpu"], "1900m");
        assert_eq!(s["capacity"]["memory"], (8u64 << 30).to_string());
        assert_eq!(s["capacity"]["pods"], "110");
        assert_eq!(s["addresses"][0]["address"], "10.0.0.2");
        assert_eq!(s["nodeInfo"]["kubeletVersion"], "v0.1.0");
        serde_json::from_value::<k8s_openapi::api::core::v1::NodeStatus>(s.clone())
            .expect("a NodeStatus");
        let mut beat = s.clone();
        set_ready(&mut beat, "2025-01-01T00:00:05Z");
        let ready = &beat["conditions"][0];
        assert_eq!(ready["lastHeartbeatTime"], "2025-01-01T00:00:05Z");
        assert_eq!(ready["lastTransitionTime"], "2025-01-01T00:00:00Z");
        // From Unknown (node controller) back to True: the transition moves.
        let mut lost = beat.clone();
        lost["conditions"][0]["status"] = json!("Unknown");
        lost["conditions"]
            .as_array_mut()
            .expect("array")
            .push(json!({"type": "MemoryPressure", "status": "False"}));
        set_ready(&mut lost, "2025-01-01T00:01:00Z");
        let conds = lost["conditions"].as_array().expect("array");
        assert_eq!(conds.len(), 2);
        let ready = conds.iter().find(|c| c["type"] == "Ready").expect("ready");
        assert_eq!(ready["status"], "True");
        assert_eq!(ready["lastTransitionTime"], "2025-01-01T00:01:00Z");
    }
}
