//! What the scheduler keeps of a Pod and a Node: the fields its plugins
//! read, decoded once per watch event from the object's JSON (serde skips
//! everything else).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Affinity, Taint, Toleration};
use serde::Deserialize;
use serde_json::Value;
use weir_proto::v1;

use super::quantity::{parse_milli, parse_units};

/// Requests used for scoring when a container asks for no cpu (as
/// kube-scheduler's `DefaultMilliCPURequest`).
pub const DEFAULT_MILLI_CPU_REQUEST: i64 = 100;
/// Requests used for scoring when a container asks for no memory (200 MiB,
/// kube-scheduler's `DefaultMemoryRequest`).
pub const DEFAULT_MEMORY_REQUEST: i64 = 200 << 20;

/// Cpu, memory and pod count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Millicores.
    pub milli_cpu: i64,
    /// Bytes.
    pub memory: i64,
    /// Pods.
    pub pods: i64,
}

impl Resources {
    /// Adds `other` in place.
    pub fn add(&mut self, other: &Resources) {
        self.milli_cpu += other.milli_cpu;
        self.memory += other.memory;
        self.pods += other.pods;
    }

    /// Subtracts `other` in place.
    pub fn sub(&mut self, other: &Resources) {
        self.milli_cpu -= other.milli_cpu;
        self.memory -= other.memory;
        self.pods -= other.pods;
    }
}

/// A host port a container asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// Host IP (`0.0.0.0` when unset).
    pub ip: String,
    /// The port.
    pub port: i32,
}

impl HostPort {
    /// Whether the two ports clash (same protocol and port, and the same
    /// IP or either binds all addresses).
    pub fn conflicts(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || self.ip == "0.0.0.0" || other.ip == "0.0.0.0")
    }
}

/// A pod as the scheduler sees it.
#[derive(Debug, Clone, Default)]
pub struct PodInfo {
    /// `namespace/name`.
    pub key: Arc<str>,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.creationTimestamp` in Unix seconds.
    pub created: i64,
    /// Whether `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// The uid of the controlling owner (`ownerReferences[controller=true]`).
    pub owner: Option<String>,
    /// `spec.nodeName` (`None` when empty).
    pub node_name: Option<String>,
    /// `spec.schedulerName` (empty: the default scheduler).
    pub scheduler_name: String,
    /// `spec.priority` (0 when unset).
    pub priority: i32,
    /// Whether `spec.preemptionPolicy` is `Never`.
    pub never_preempt: bool,
    /// `spec.nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    /// `spec.affinity`.
    pub affinity: Option<Affinity>,
    /// `spec.tolerations`.
    pub tolerations: Vec<Toleration>,
    /// Sum of the containers' requests (pods: 1).
    pub requests: Resources,
    /// As `requests`, with the scoring defaults for cpu/memory left unset.
    pub nonzero: Resources,
    /// Host ports of all containers.
    pub host_ports: Vec<HostPort>,
    /// `status.nominatedNodeName`.
    pub nominated_node: Option<String>,
    /// Whether `status.phase` is `Succeeded` or `Failed` (holds nothing).
    pub terminal: bool,
    /// The typed metadata the API returned, for events.
    pub meta: v1::ObjectMeta,
}

impl PodInfo {
    /// Whether the pod has required anti-affinity terms (other pods must
    /// respect them).
    pub fn has_required_anti_affinity(&self) -> bool {
        self.affinity.as_ref().is_some_and(|a| {
            a.pod_anti_affinity.as_ref().is_some_and(|p| {
                p.required_during_scheduling_ignored_during_execution
                    .as_ref()
                    .is_some_and(|t| !t.is_empty())
            })
        })
    }
}

/// Readiness from the `Ready` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `Ready=True`.
    Ready,
    /// `Ready=False`.
    NotReady,
    /// `Ready=Unknown` or no condition.
    Unknown,
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.taints`.
    pub taints: Vec<Taint>,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// The `Ready` condition.
    pub readiness: Readiness,
    /// `status.allocatable` (falls back to `status.capacity`).
    pub allocatable: Resources,
}

impl NodeInfo {
    /// Whether the scheduling-relevant fields differ (heartbeats change
    /// only timestamps, which must not retry every unschedulable pod).
    pub fn same_for_scheduling(&self, other: &NodeInfo) -> bool {
        self.labels == other.labels
            && self.taints == other.taints
            && self.unschedulable == other.unschedulable
            && self.readiness == other.readiness
            && self.allocatable == other.allocatable
    }
}

/// Why an object could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("decode {kind} {name}: {reason}")]
pub struct DecodeError {
    kind: &'static str,
    name: String,
    reason: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct MetaDoc {
    name: String,
    namespace: String,
    uid: String,
    labels: BTreeMap<String, String>,
    creation_timestamp: Option<String>,
    deletion_timestamp: Option<String>,
    owner_references: Vec<OwnerDoc>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct OwnerDoc {
    uid: String,
    controller: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodDoc {
    metadata: MetaDoc,
    spec: PodSpecDoc,
    status: PodStatusDoc,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct PodSpecDoc {
    node_name: Option<String>,
    scheduler_name: Option<String>,
    priority: Option<i32>,
    preemption_policy: Option<String>,
    node_selector: BTreeMap<String, String>,
    affinity: Option<Affinity>,
    tolerations: Vec<Toleration>,
    containers: Vec<ContainerDoc>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ContainerDoc {
    resources: ResourcesDoc,
    ports: Vec<PortDoc>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResourcesDoc {
    requests: BTreeMap<String, Value>,
    limits: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct PortDoc {
    host_port: Option<i32>,
    #[serde(rename = "hostIP")]
    host_ip: Option<String>,
    protocol: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct PodStatusDoc {
    nominated_node_name: Option<String>,
    phase: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeDoc {
    metadata: MetaDoc,
    spec: NodeSpecDoc,
    status: NodeStatusDoc,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeSpecDoc {
    unschedulable: bool,
    taints: Vec<Taint>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NodeStatusDoc {
    allocatable: BTreeMap<String, Value>,
    capacity: BTreeMap<String, Value>,
    conditions: Vec<ConditionDoc>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConditionDoc {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

fn quantity_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn milli_of(map: &BTreeMap<String, Value>, name: &str) -> Option<i64> {
    map.get(name)
        .and_then(quantity_text)
        .and_then(|t| parse_milli(&t))
}

fn units_of(map: &BTreeMap<String, Value>, name: &str) -> Option<i64> {
    map.get(name)
        .and_then(quantity_text)
        .and_then(|t| parse_units(&t))
}

fn unix_seconds(stamp: Option<&str>) -> i64 {
    stamp
        .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map_or(0, k8s_openapi::jiff::Timestamp::as_second)
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// Decodes a pod from the API's object.
pub fn pod_from_object(object: &v1::Object) -> Result<PodInfo, DecodeError> {
    let meta = object.meta.clone().unwrap_or_default();
    let doc: PodDoc = serde_json::from_str(&object.json).map_err(|e| DecodeError {
        kind: "pod",
        name: format!("{}/{}", meta.namespace, meta.name),
        reason: e.to_string(),
    })?;
    Ok(pod_from_doc(doc, meta))
}

fn pod_from_doc(doc: PodDoc, meta: v1::ObjectMeta) -> PodInfo {
    let mut requests = Resources {
        pods: 1,
        ..Resources::default()
    };
    let mut nonzero = requests;
    let mut host_ports = Vec::new();
    for c in &doc.spec.containers {
        // Validation defaults requests from limits; do it here too for
        // objects written around it.
        let r = &c.resources;
        let cpu = milli_of(&r.requests, "cpu").or_else(|| milli_of(&r.limits, "cpu"));
        let mem = units_of(&r.requests, "memory").or_else(|| units_of(&r.limits, "memory"));
        requests.milli_cpu += cpu.unwrap_or(0);
        requests.memory += mem.unwrap_or(0);
        nonzero.milli_cpu += cpu.unwrap_or(DEFAULT_MILLI_CPU_REQUEST);
        nonzero.memory += mem.unwrap_or(DEFAULT_MEMORY_REQUEST);
        for p in &c.ports {
            if let Some(port) = p.host_port.filter(|p| *p > 0) {
                host_ports.push(HostPort {
                    protocol: non_empty(p.protocol.clone()).unwrap_or_else(|| "TCP".to_owned()),
                    ip: non_empty(p.host_ip.clone()).unwrap_or_else(|| "0.0.0.0".to_owned()),
                    port,
                });
            }
        }
    }
    let m = doc.metadata;
    let namespace = if m.namespace.is_empty() {
        "default".to_owned()
    } else {
        m.namespace
    };
    let owner = m
        .owner_references
        .into_iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid);
    PodInfo {
        key: format!("{namespace}/{}", m.name).into(),
        namespace,
        name: m.name,
        uid: m.uid,
        labels: m.labels,
        created: unix_seconds(m.creation_timestamp.as_deref()),
        deleting: m.deletion_timestamp.is_some(),
        owner,
        node_name: non_empty(doc.spec.node_name),
        scheduler_name: doc.spec.scheduler_name.unwrap_or_default(),
        priority: doc.spec.priority.unwrap_or(0),
        never_preempt: doc.spec.preemption_policy.as_deref() == Some("Never"),
        node_selector: doc.spec.node_selector,
        affinity: doc.spec.affinity,
        tolerations: doc.spec.tolerations,
        requests,
        nonzero,
        host_ports,
        nominated_node: non_empty(doc.status.nominated_node_name),
        terminal: matches!(doc.status.phase.as_deref(), Some("Succeeded" | "Failed")),
        meta,
    }
}

/// Decodes a node from the API's object.
pub fn node_from_object(object: &v1::Object) -> Result<NodeInfo, DecodeError> {
    let doc: NodeDoc = serde_json::from_str(&object.json).map_err(|e| DecodeError {
        kind: "node",
        name: object
            .meta
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        reason: e.to_string(),
    })?;
    let s = &doc.status;
    let pick_milli =
        |name: &str| milli_of(&s.allocatable, name).or_else(|| milli_of(&s.capacity, name));
    let pick_units =
        |name: &str| units_of(&s.allocatable, name).or_else(|| units_of(&s.capacity, name));
    let readiness = match s
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
    {
        Some("True") => Readiness::Ready,
        Some("False") => Readiness::NotReady,
        _ => Readiness::Unknown,
    };
    Ok(NodeInfo {
        name: doc.metadata.name,
        labels: doc.metadata.labels,
        taints: doc.spec.taints,
        unschedulable: doc.spec.unschedulable,
        readiness,
        allocatable: Resources {
            milli_cpu: pick_milli("cpu").unwrap_or(0),
            memory: pick_units("memory").unwrap_or(0),
            pods: pick_units("pods").unwrap_or(0),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(json: &Value) -> v1::Object {
        v1::Object {
            meta: Some(v1::ObjectMeta {
                name: json["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                ..Default::default()
            }),
            json: json.to_string(),
        }
    }

    #[test]
    fn pod_requests_sum_containers_and_default_for_scoring() {
        let pod = pod_from_object(&object(&json!({
            "metadata": {"name": "p", "namespace": "ns", "ownerReferences": [
                {"uid": "o1", "controller": true, "kind": "ReplicaSet", "name": "rs", "apiVersion": "apps/v1"}]},
            "spec": {"priority": 7, "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}},
                 "ports": [{"containerPort": 80, "hostPort": 8080}]},
                {"name": "b", "resources": {"limits": {"cpu": "1"}}},
            ]},
        })))
        .unwrap();
        assert_eq!(&*pod.key, "ns/p");
        assert_eq!(
            pod.requests,
            Resources {
                milli_cpu: 1250,
                memory: 64 << 20,
                pods: 1
            }
        );
        assert_eq!(pod.nonzero.memory, (64 << 20) + DEFAULT_MEMORY_REQUEST);
        assert_eq!(pod.priority, 7);
        assert_eq!(pod.owner.as_deref(), Some("o1"));
        assert_eq!(
            pod.host_ports,
            vec![HostPort {
                protocol: "TCP".into(),
                ip: "0.0.0.0".into(),
                port: 8080
            }]
        );
    }

    #[test]
    fn node_allocatable_taints_and_readiness() {
        let node = node_from_object(&object(&json!({
            "metadata": {"name": "n1", "labels": {"a": "b"}},
            "spec": {"unschedulable": true, "taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"cpu": "1500m", "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]},
        })))
        .unwrap();
        assert_eq!(
            node.allocatable,
            Resources {
                milli_cpu: 1500,
                memory: 8 << 30,
                pods: 110
            }
        );
        assert!(node.unschedulable);
        assert_eq!(node.readiness, Readiness::Ready);
        assert_eq!(node.taints.len(), 1);
    }
}
