//! Names for what agents report by pod or address: a pod becomes its
//! workload (Pod → controller `ReplicaSet` → `Deployment`; a `DaemonSet`'s
//! or bare `ReplicaSet`'s pods → it; a bare pod → the pod), a service VIP
//! its Service, a node address its Node. Pod mappings are remembered for
//! [`REMEMBER`] after their last use, so the edges of pods that are gone
//! keep their workload's name.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, Instant},
};

use serde_json::Value;
use weir_proto::v1;

use super::merge::EndKey;
use crate::api::ObjectsApi;
use crate::store::Store;

/// How long a pod's workload is remembered after it was last needed.
pub const REMEMBER: Duration = Duration::from_mins(10);

/// The kind of a pod end as agents report it.
pub const KIND_POD: &str = "pod";
/// The kind of a resolved pod end.
pub const KIND_WORKLOAD: &str = "workload";

/// Remembered pod → workload names.
#[derive(Default)]
pub struct Resolver {
    pods: HashMap<(String, String), (String, Instant)>,
}

async fn object<S: Store>(api: &ObjectsApi<S>, kind: &str, ns: &str, name: &str) -> Option<Value> {
    let r = v1::ObjectRef {
        api_version: String::new(),
        kind: kind.to_owned(),
        namespace: ns.to_owned(),
        name: name.to_owned(),
    };
    let o = api.get(&r).await.ok()?;
    serde_json::from_str(&o.json).ok()
}

async fn list<S: Store>(api: &ObjectsApi<S>, kind: &str) -> Vec<Value> {
    let req = v1::ListRequest {
        kind: kind.to_owned(),
        namespace: String::new(),
        label_selector: String::new(),
    };
    match api.list(&req).await {
        Ok(r) => r
            .items
            .iter()
            .filter_map(|o| serde_json::from_str(&o.json).ok())
            .collect(),
        Err(e) => {
            tracing::debug!(kind, error = %e, "service map: cannot list");
            Vec::new()
        }
    }
}

/// The controlling owner's (kind, name) of object `o`.
#[must_use]
pub fn controller(o: &Value) -> Option<(String, String)> {
    let owners = o.pointer("/metadata/ownerReferences")?.as_array()?;
    let c = owners
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))?;
    Some((
        c.get("kind")?.as_str()?.to_owned(),
        c.get("name")?.as_str()?.to_owned(),
    ))
}

/// The Deployment a `ReplicaSet` named `rs` belongs to judging by the pod's
/// `pod-template-hash` label (`<deployment>-<hash>`), when the
/// `ReplicaSet` itself is gone.
fn deployment_by_hash(pod: &Value, rs: &str) -> Option<String> {
    let hash = pod
        .pointer("/metadata/labels/pod-template-hash")?
        .as_str()?;
    rs.strip_suffix(hash)?
        .strip_suffix('-')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
}

async fn workload_of<S: Store>(api: &ObjectsApi<S>, ns: &str, pod: &str) -> Option<String> {
    let p = object(api, "Pod", ns, pod).await?;
    Some(match controller(&p) {
        None => pod.to_owned(),
        Some((kind, rs)) if kind == "ReplicaSet" => {
            match object(api, "ReplicaSet", ns, &rs).await {
                Some(o) => match controller(&o) {
                    Some((k, d)) if k == "Deployment" => d,
                    _ => rs,
                },
                None => deployment_by_hash(&p, &rs).unwrap_or(rs),
            }
        }
        Some((_, name)) => name,
    })
}

impl Resolver {
    /// New names for those of `ends` that can be named better (see the
    /// module docs).
    pub async fn names<S: Store>(
        &mut self,
        api: &ObjectsApi<S>,
        ends: &BTreeSet<EndKey>,
    ) -> HashMap<EndKey, EndKey> {
        let now = Instant::now();
        self.pods
            .retain(|_, (_, used)| now.duration_since(*used) < REMEMBER);
        let mut out = HashMap::new();
        for e in ends.iter().filter(|e| e.kind == KIND_POD) {
            let key = (e.namespace.clone(), e.name.clone());
            let workload = match self.pods.get(&key) {
                Some((w, _)) => Some(w.clone()),
                None if e.namespace.is_empty() => None,
                None => workload_of(api, &e.namespace, &e.name).await,
            };
            if let Some(w) = workload {
                out.insert(e.clone(), EndKey::new(KIND_WORKLOAD, &e.namespace, &w));
                self.pods.insert(key, (w, now));
            }
        }
        if ends
            .iter()
            .any(|e| e.kind == "service" && e.namespace.is_empty())
        {
            name_by_address(&mut out, ends, "service", &services(api).await);
        }
        if ends.iter().any(|e| e.kind == "host") {
            name_by_address(&mut out, ends, "host", &nodes(api).await);
        }
        out
    }
}

/// Names the ends of `kind` whose name is an address in `by_ip`.
fn name_by_address(
    out: &mut HashMap<EndKey, EndKey>,
    ends: &BTreeSet<EndKey>,
    kind: &str,
    by_ip: &HashMap<String, (String, String)>,
) {
    for e in ends.iter().filter(|e| e.kind == kind) {
        if let Some((ns, name)) = by_ip.get(&e.name) {
            out.insert(e.clone(), EndKey::new(kind, ns, name));
        }
    }
}

/// Cluster IP → (namespace, name) of every Service.
async fn services<S: Store>(api: &ObjectsApi<S>) -> HashMap<String, (String, String)> {
    list(api, "Service")
        .await
        .iter()
        .filter_map(|s| {
            let ip = s.pointer("/spec/clusterIP")?.as_str()?;
            let ns = s.pointer("/metadata/namespace")?.as_str()?;
            let name = s.pointer("/metadata/name")?.as_str()?;
            Some((ip.to_owned(), (ns.to_owned(), name.to_owned())))
        })
        .collect()
}

/// `InternalIP` → ("", name) of every Node.
async fn nodes<S: Store>(api: &ObjectsApi<S>) -> HashMap<String, (String, String)> {
    let mut out = HashMap::new();
    for n in list(api, "Node").await {
        let Some(name) = n.pointer("/metadata/name").and_then(Value::as_str) else {
            continue;
        };
        let addrs = n
            .pointer("/status/addresses")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for a in addrs {
            if a.get("type").and_then(Value::as_str) == Some("InternalIP")
                && let Some(ip) = a.get("address").and_then(Value::as_str)
            {
                out.insert(ip.to_owned(), (String::new(), name.to_owned()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn owners_and_template_hashes_name_workloads() {
        let pod = json!({"metadata": {
        "labels": {"pod-template-hash": "b5c7d9f2kx"},
        "ownerReferences": [
            {"kind": "Other", "name": "no", "controller": false},
            {"kind": "ReplicaSet", "name": "web-b5c7d9f2kx", "controller": true}
        ]}});
        assert_eq!(
            controller(&pod),
            Some(("ReplicaSet".to_owned(), "web-b5c7d9f2kx".to_owned()))
        );
        assert_eq!(
            deployment_by_hash(&pod, "web-b5c7d9f2kx").as_deref(),
            Some("web")
        );
        assert_eq!(deployment_by_hash(&pod, "web-other"), None);
        assert_eq!(controller(&json!({"metadata": {}})), None);
    }
}
