//! What one node's agent sees of a store change: pods bound to it (ADDED
//! when one becomes bound, MODIFIED, DELETED when it goes or is bound
//! elsewhere) and its peers (nodes with a pod CIDR and an `InternalIP`).
//!
//! Each decision uses only the event (its new value and the value before
//! it), so a stream resumed from any revision filters exactly as one that
//! started with a full list.

use std::collections::HashMap;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;
use weir_proto::v1;

use crate::store::{Event, EventKind, KeyValue};

/// Key prefix of pods in the store.
pub const PODS: &str = "/core/pods/";
/// Key prefix of nodes in the store.
pub const NODES: &str = "/core/nodes/";

/// A stored value as JSON (`None` if it is not a JSON object).
pub fn json_of(kv: &KeyValue) -> Option<Value> {
    serde_json::from_slice::<Value>(&kv.value)
        .ok()
        .filter(Value::is_object)
}

/// `spec.nodeName` of a pod.
pub fn node_name(pod: &Value) -> &str {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The API object for a stored value at `revision`, as the Objects API
/// returns it (`metadata.resourceVersion` filled in).
pub fn object(mut json: Value, revision: u64) -> v1::Object {
    let meta = json.get("metadata").cloned().unwrap_or(Value::Null);
    let text = |v: &Value, field: &str| {
        v.get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let labels: HashMap<String, String> = meta
        .get("labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let proto_meta = v1::ObjectMeta {
        api_version: text(&json, "apiVersion"),
        kind: text(&json, "kind"),
        namespace: text(&meta, "namespace"),
        name: text(&meta, "name"),
        uid: text(&meta, "uid"),
        resource_version: revision,
        generation: meta
            .get("generation")
            .and_then(Value::as_u64)
            .unwrap_or_default(),
        labels,
        creation_timestamp_unix: text(&meta, "creationTimestamp")
            .parse::<Timestamp>()
            .map(Timestamp::as_second)
            .unwrap_or_default(),
    };
    if let Some(m) = json.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(
            "resourceVersion".to_owned(),
            Value::from(revision.to_string()),
        );
    }
    v1::Object {
        meta: Some(proto_meta),
        json: json.to_string(),
    }
}

/// The pod event `node`'s agent gets for a store event on a pod key, if any.
pub fn pod_event(node: &str, event: &Event) -> Option<v1::PodEvent> {
    let bound = |kv: &KeyValue| json_of(kv).filter(|p| node_name(p) == node);
    let before = event.prev.as_ref().and_then(bound);
    let (kind, json) = match event.kind {
        EventKind::Delete => (v1::EventType::Deleted, bound(&event.kv)?),
        EventKind::Put => match bound(&event.kv) {
            Some(now) if before.is_some() => (v1::EventType::Modified, now),
            Some(now) => (v1::EventType::Added, now),
            None => (v1::EventType::Deleted, before?),
        },
    };
    Some(v1::PodEvent {
        r#type: kind.into(),
        pod: Some(object(json, event.revision())),
    })
}

/// A node as its peers route to it: (name, `InternalIP`, pod CIDR); `None`
/// while it lacks either.
pub fn peer_of(node: &Value) -> Option<(String, String, String)> {
    let name = node.pointer("/metadata/name")?.as_str()?.to_owned();
    let cidr = node.pointer("/spec/podCIDR")?.as_str()?.to_owned();
    let address = node
        .pointer("/status/addresses")?
        .as_array()?
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))?
        .get("address")?
        .as_str()?
        .to_owned();
    (!cidr.is_empty() && !address.is_empty()).then_some((name, address, cidr))
}

/// The peer event every agent gets for a store event on a node key, if the
/// node's routing (address, pod CIDR) changed; heartbeats change nothing.
pub fn peer_event(event: &Event) -> Option<v1::PeerEvent> {
    let peer = |kv: &KeyValue| json_of(kv).as_ref().and_then(peer_of);
    let before = event.prev.as_ref().and_then(peer);
    let (kind, (node_name, address, pod_cidr)) = match event.kind {
        EventKind::Delete => (v1::EventType::Deleted, peer(&event.kv)?),
        EventKind::Put => match (before, peer(&event.kv)) {
            (None, Some(now)) => (v1::EventType::Added, now),
            (Some(before), Some(now)) if before != now => (v1::EventType::Modified, now),
            (Some(before), None) => (v1::EventType::Deleted, before),
            _ => return None,
        },
    };
    Some(v1::PeerEvent {
        r#type: kind.into(),
        node_name,
        address,
        pod_cidr,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn kv(key: &str, value: &Value, revision: u64) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: serde_json::to_vec(value).expect("json"),
            mod_revision: revision,
            create_revision: 1,
        }
    }

    fn pod(node: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "namespace": "default", "uid": "u1", "labels": {"app": "web"}},
               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
    }

    fn put(prev: Option<Value>, now: &Value, revision: u64) -> Event {
        Event {
            kind: EventKind::Put,
            kv: kv("/core/pods/default/web", now, revision),
            prev: prev.map(|p| kv("/core/pods/default/web", &p, revision - 1)),
        }
    }

    fn kind(e: Option<v1::PodEvent>) -> Option<v1::EventType> {
        e.map(|e| e.r#type())
    }

    #[test]
    fn pods_are_added_when_bound_modified_then_deleted_when_gone_or_rebound() {
        let unbound = pod("");
        // Created unbound: nobody sees it.
        assert_eq!(kind(pod_event("n1", &put(None, &unbound, 5))), None);
        // Bound to n1: ADDED for n1 only.
        let bound = put(Some(unbound.clone()), &pod("n1"), 6);
        assert_eq!(kind(pod_event("n1", &bound)), Some(v1::EventType::Added));
        assert_eq!(kind(pod_event("n2", &bound)), None);
        // Created already bound: ADDED.
        assert_eq!(
            kind(pod_event("n1", &put(None, &pod("n1"), 6))),
            Some(v1::EventType::Added)
        );
        // A status write: MODIFIED, with the object at the event's revision.
        let mut with_status = pod("n1");
        with_status["status"] = json!({"phase": "Running"});
        let e = pod_event("n1", &put(Some(pod("n1")), &with_status, 7)).expect("event");
        assert_eq!(e.r#type(), v1::EventType::Modified);
        let obj = e.pod.expect("pod");
        let meta = obj.meta.expect("meta");
        assert_eq!((meta.name.as_str(), meta.uid.as_str()), ("web", "u1"));
        assert_eq!(meta.resource_version, 7);
        assert_eq!(meta.labels["app"], "web");
        let j: Value = serde_json::from_str(&obj.json).expect("json");
        assert_eq!(j["metadata"]["resourceVersion"], "7");
        assert_eq!(j["status"]["phase"], "Running");
        // Re-bound elsewhere: DELETED for n1 (its last state), ADDED for n2.
        let moved = put(Some(pod("n1")), &pod("n2"), 8);
        let e = pod_event("n1", &moved).expect("event");
        assert_eq!(e.r#type(), v1::EventType::Deleted);
        assert!(e.pod.expect("pod").json.contains("\"nodeName\":\"n1\""));
        assert_eq!(kind(pod_event("n2", &moved)), Some(v1::EventType::Added));
        // Removed: DELETED for its node only.
        let gone = Event {
            kind: EventKind::Delete,
            kv: kv("/core/pods/default/web", &pod("n1"), 9),
            prev: Some(kv("/core/pods/default/web", &pod("n1"), 8)),
        };
        assert_eq!(kind(pod_event("n1", &gone)), Some(v1::EventType::Deleted));
        assert_eq!(kind(pod_event("n2", &gone)), None);
    }

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>, beat: &str) -> Value {
        let mut n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                           "spec": {}, "status": {"addresses": [{"type": "Hostname", "address": name}],
                           "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": beat}]}});
        if let Some(c) = cidr {
            n["spec"]["podCIDR"] = json!(c);
        }
        if let Some(ip) = ip {
            n["status"]["addresses"]
                .as_array_mut()
                .expect("array")
                .push(json!({"type": "InternalIP", "address": ip}));
        }
        n
    }

    fn node_put(prev: Option<&Value>, now: &Value) -> Event {
        Event {
            kind: EventKind::Put,
            kv: kv("/core/nodes/n2", now, 10),
            prev: prev.map(|p| kv("/core/nodes/n2", p, 9)),
        }
    }

    #[test]
    fn peers_change_only_with_their_address_or_cidr() {
        let bare = node("n2", None, Some("10.0.0.3"), "t1");
        let full = node("n2", Some("10.244.2.0/24"), Some("10.0.0.3"), "t1");
        assert!(peer_event(&node_put(None, &bare)).is_none());
        let e = peer_event(&node_put(Some(&bare), &full)).expect("added");
        assert_eq!(e.r#type(), v1::EventType::Added);
        assert_eq!(
            (
                e.node_name.as_str(),
                e.address.as_str(),
                e.pod_cidr.as_str()
            ),
            ("n2", "10.0.0.3", "10.244.2.0/24")
        );
        // A heartbeat is no peer change.
        let beat = node("n2", Some("10.244.2.0/24"), Some("10.0.0.3"), "t2");
        assert!(peer_event(&node_put(Some(&full), &beat)).is_none());
        let moved = node("n2", Some("10.244.2.0/24"), Some("10.0.0.9"), "t2");
        let e = peer_event(&node_put(Some(&beat), &moved)).expect("modified");
        assert_eq!(e.r#type(), v1::EventType::Modified);
        assert_eq!(e.address, "10.0.0.9");
        let gone = Event {
            kind: EventKind::Delete,
            kv: kv("/core/nodes/n2", &moved, 11),
            prev: Some(kv("/core/nodes/n2", &moved, 10)),
        };
        let e = peer_event(&gone).expect("deleted");
        assert_eq!(e.r#type(), v1::EventType::Deleted);
        assert_eq!(e.pod_cidr, "10.244.2.0/24");
    }
}
