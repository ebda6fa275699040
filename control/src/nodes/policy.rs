//! What every agent sees for network policy: every `NetworkPolicy` of the
//! cluster, every namespace's labels (for namespaceSelectors), the
//! security identities (number → namespace and labels), and the ipcache
//! (pod IP → identity, namespace, pod, node).
//!
//! Policies, namespaces and identities map one store key to one event.
//! The ipcache is derived from pods: a pod has an entry while it has
//! `status.podIP`, a `weir.io/identity` annotation and a phase other than
//! Succeeded or Failed. Each decision uses only the store event (the value
//! and the one before it), so a stream resumed from any revision sees the
//! same entries as one that started with a full list.

use std::collections::HashMap;

use serde_json::Value;
use weir_proto::v1;

use super::filter::{self, json_of, node_name};
use crate::api::identity::{IDENTITY_ANNOTATION, IDENTITY_RECORDS, IdentityRecord};
use crate::store::{Event, EventKind, KeyValue, Store, StoreError};

/// Key prefix of network policies in the store.
pub const POLICIES: &str = "/networking.k8s.io/networkpolicies/";
/// Key prefix of namespaces in the store.
pub const NAMESPACES: &str = "/core/namespaces/";
/// Key prefix of identity records in the store.
pub const IDENTITIES: &str = IDENTITY_RECORDS;

/// The revisions up to which the initial list already holds the state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listed {
    /// Policies were listed at this revision.
    pub policies: u64,
    /// Namespaces were listed at this revision.
    pub namespaces: u64,
    /// Identities were listed at this revision.
    pub identities: u64,
}

/// The initial state: namespaces, identities, policies, then the ipcache
/// of `pods` (listed at the stream's start revision, so it needs no skip).
pub async fn list<S: Store>(
    store: &S,
    pods: &[KeyValue],
) -> Result<(Vec<v1::node_event::Event>, Listed), StoreError> {
    use v1::node_event::Event as E;
    let added = v1::EventType::Added;
    let (namespaces, namespaces_at) = store.list(NAMESPACES).await?;
    let (identities, identities_at) = store.list(IDENTITIES).await?;
    let (policies, policies_at) = store.list(POLICIES).await?;
    let mut out: Vec<E> = namespaces
        .iter()
        .filter_map(|kv| namespace_event(added, &json_of(kv)?))
        .map(E::Namespace)
        .collect();
    out.extend(
        identities
            .iter()
            .filter_map(|kv| Some(identity_event(added, &identity_of(kv)?)))
            .map(E::Identity),
    );
    out.extend(policies.iter().filter_map(|kv| {
        let policy = filter::object(json_of(kv)?, kv.mod_revision);
        Some(E::Policy(policy_event(added, policy)))
    }));
    out.extend(
        pods.iter()
            .filter_map(|kv| entry(&json_of(kv)?))
            .map(|e| E::Ipcache(e.event(added))),
    );
    let listed = Listed {
        policies: policies_at,
        namespaces: namespaces_at,
        identities: identities_at,
    };
    Ok((out, listed))
}

/// The events for one store event, if it concerns policy (nothing for
/// other keys, and nothing the initial list already holds).
pub fn events(ev: &Event, listed: Listed) -> Vec<v1::node_event::Event> {
    use v1::node_event::Event as E;
    let key = ev.kv.key.as_str();
    let fresh = |at: u64| ev.revision() > at;
    if key.starts_with(filter::PODS) {
        ipcache_events(ev).into_iter().map(E::Ipcache).collect()
    } else if key.starts_with(POLICIES) && fresh(listed.policies) {
        policy_change(ev).map(E::Policy).into_iter().collect()
    } else if key.starts_with(NAMESPACES) && fresh(listed.namespaces) {
        namespace_change(ev).map(E::Namespace).into_iter().collect()
    } else if key.starts_with(IDENTITIES) && fresh(listed.identities) {
        identity_change(ev).map(E::Identity).into_iter().collect()
    } else {
        Vec::new()
    }
}

fn policy_event(kind: v1::EventType, policy: v1::Object) -> v1::PolicyEvent {
    v1::PolicyEvent {
        r#type: kind.into(),
        policy: Some(policy),
    }
}

/// ADDED, MODIFIED or DELETED (with the last state) for a policy key.
fn policy_change(ev: &Event) -> Option<v1::PolicyEvent> {
    let kind = match ev.kind {
        EventKind::Delete => v1::EventType::Deleted,
        EventKind::Put if ev.prev.is_none() => v1::EventType::Added,
        EventKind::Put => v1::EventType::Modified,
    };
    let policy = filter::object(json_of(&ev.kv)?, ev.revision());
    Some(policy_event(kind, policy))
}

fn labels_of(json: &Value) -> HashMap<String, String> {
    json.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn namespace_event(kind: v1::EventType, json: &Value) -> Option<v1::NamespaceEvent> {
    Some(v1::NamespaceEvent {
        r#type: kind.into(),
        name: json.pointer("/metadata/name")?.as_str()?.to_owned(),
        labels: labels_of(json),
    })
}

/// ADDED, MODIFIED when its labels changed, or DELETED, for a namespace key.
fn namespace_change(ev: &Event) -> Option<v1::NamespaceEvent> {
    let now = json_of(&ev.kv)?;
    let before = ev.prev.as_ref().and_then(json_of);
    let kind = match (ev.kind, before) {
        (EventKind::Delete, _) => v1::EventType::Deleted,
        (EventKind::Put, None) => v1::EventType::Added,
        (EventKind::Put, Some(b)) if labels_of(&b) != labels_of(&now) => v1::EventType::Modified,
        (EventKind::Put, Some(_)) => return None,
    };
    namespace_event(kind, &now)
}

fn identity_of(kv: &KeyValue) -> Option<IdentityRecord> {
    serde_json::from_slice(&kv.value).ok()
}

fn identity_event(kind: v1::EventType, record: &IdentityRecord) -> v1::IdentityEvent {
    v1::IdentityEvent {
        r#type: kind.into(),
        id: record.id,
        namespace: record.namespace.clone(),
        labels: record.labels.clone().into_iter().collect(),
    }
}

/// ADDED or DELETED for an identity key (its set never changes).
fn identity_change(ev: &Event) -> Option<v1::IdentityEvent> {
    let now = identity_of(&ev.kv)?;
    let before = ev.prev.as_ref().and_then(identity_of);
    let kind = match (ev.kind, before) {
        (EventKind::Delete, _) => v1::EventType::Deleted,
        (EventKind::Put, None) => v1::EventType::Added,
        (EventKind::Put, Some(b)) if b != now => v1::EventType::Modified,
        (EventKind::Put, Some(_)) => return None,
    };
    Some(identity_event(kind, &now))
}

/// One ipcache entry: a pod's address, who it is, and its named ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The pod's IP.
    pub ip: String,
    /// Its identity.
    pub identity: u32,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub pod: String,
    /// Its node.
    pub node: String,
    /// Its named container ports: (name, port, protocol).
    pub named_ports: Vec<(String, u32, String)>,
}

impl Entry {
    fn event(&self, kind: v1::EventType) -> v1::IpCacheEvent {
        v1::IpCacheEvent {
            r#type: kind.into(),
            ip: self.ip.clone(),
            identity: self.identity,
            namespace: self.namespace.clone(),
            pod_name: self.pod.clone(),
            node_name: self.node.clone(),
            named_ports: self
                .named_ports
                .iter()
                .map(|(name, port, protocol)| v1::NamedPort {
                    name: name.clone(),
                    port: *port,
                    protocol: protocol.clone(),
                })
                .collect(),
        }
    }
}

/// A pod's ipcache entry: while it has an IP and an identity and has not
/// finished (Succeeded or Failed pods hold no address).
pub fn entry(pod: &Value) -> Option<Entry> {
    let text = |p: &str| pod.pointer(p).and_then(Value::as_str).unwrap_or_default();
    let ip = text("/status/podIP");
    if ip.is_empty() || matches!(text("/status/phase"), "Succeeded" | "Failed") {
        return None;
    }
    let identity = pod
        .pointer("/metadata/annotations")?
        .get(IDENTITY_ANNOTATION)?
        .as_str()?
        .parse()
        .ok()?;
    Some(Entry {
        ip: ip.to_owned(),
        identity,
        namespace: text("/metadata/namespace").to_owned(),
        pod: text("/metadata/name").to_owned(),
        node: node_name(pod).to_owned(),
        named_ports: named_ports(pod),
    })
}

/// The named ports of a pod's containers, in spec order.
fn named_ports(pod: &Value) -> Vec<(String, u32, String)> {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array);
    containers
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("ports")?.as_array())
        .flatten()
        .filter_map(|p| {
            let name = p.get("name")?.as_str().filter(|n| !n.is_empty())?;
            let port = u32::try_from(p.get("containerPort")?.as_u64()?).ok()?;
            let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            Some((name.to_owned(), port, protocol.to_owned()))
        })
        .collect()
}

/// The ipcache events of a store event on a pod key: ADDED when a pod gets
/// an entry, MODIFIED when its identity (or node) changes, DELETED when it
/// loses it or goes; a new IP is DELETED for the old one then ADDED.
pub fn ipcache_events(ev: &Event) -> Vec<v1::IpCacheEvent> {
    let of = |kv: &KeyValue| json_of(kv).as_ref().and_then(entry);
    let (before, after) = match ev.kind {
        EventKind::Delete => (of(&ev.kv), None),
        EventKind::Put => (ev.prev.as_ref().and_then(of), of(&ev.kv)),
    };
    let (added, modified, deleted) = (
        v1::EventType::Added,
        v1::EventType::Modified,
        v1::EventType::Deleted,
    );
    match (before, after) {
        (None, Some(a)) => vec![a.event(added)],
        (Some(b), None) => vec![b.event(deleted)],
        (Some(b), Some(a)) if b.ip != a.ip => vec![b.event(deleted), a.event(added)],
        (Some(b), Some(a)) if b != a => vec![a.event(modified)],
        (None, None) | (Some(_), Some(_)) => Vec::new(),
    }
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

    fn pod(ip: Option<&str>, identity: Option<&str>, phase: &str) -> Value {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox",
                "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090},
                          {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": phase}});
        if let Some(ip) = ip {
            p["status"]["podIP"] = json!(ip);
        }
        if let Some(id) = identity {
            p["metadata"]["annotations"] = json!({IDENTITY_ANNOTATION: id});
        }
        p
    }

    fn put(prev: Option<&Value>, now: &Value) -> Event {
        let key = "/core/pods/shop/web";
        Event {
            kind: EventKind::Put,
            kv: kv(key, now, 9),
            prev: prev.map(|p| kv(key, p, 8)),
        }
    }

    fn seen(events: &[v1::IpCacheEvent]) -> Vec<(v1::EventType, &str, u32)> {
        events
            .iter()
            .map(|e| (e.r#type(), e.ip.as_str(), e.identity))
            .collect()
    }

    #[test]
    fn ipcache_follows_the_pods_address_identity_and_phase() {
        use v1::EventType::{Added, Deleted, Modified};
        let pending = pod(None, Some("300"), "Pending");
        let running = pod(Some("10.244.1.5"), Some("300"), "Running");
        assert!(ipcache_events(&put(None, &pending)).is_empty());
        let e = ipcache_events(&put(Some(&pending), &running));
        assert_eq!(seen(&e), [(Added, "10.244.1.5", 300)]);
        assert_eq!(
            (
                e[0].namespace.as_str(),
                e[0].pod_name.as_str(),
                e[0].node_name.as_str()
            ),
            ("shop", "web", "n1")
        );
        let ports: Vec<(&str, u32, &str)> = e[0]
            .named_ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol.as_str()))
            .collect();
        assert_eq!(ports, [("http", 8080, "TCP"), ("dns", 53, "UDP")]);
        // A status write that changes neither: nothing.
        let mut ready = running.clone();
        ready["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        assert!(ipcache_events(&put(Some(&running), &ready)).is_empty());
        // A label change gave it another identity.
        let relabelled = pod(Some("10.244.1.5"), Some("301"), "Running");
        assert_eq!(
            seen(&ipcache_events(&put(Some(&running), &relabelled))),
            [(Modified, "10.244.1.5", 301)]
        );
        // A new address: the old one goes first.
        let moved = pod(Some("10.244.1.9"), Some("301"), "Running");
        assert_eq!(
            seen(&ipcache_events(&put(Some(&relabelled), &moved))),
            [(Deleted, "10.244.1.5", 301), (Added, "10.244.1.9", 301)]
        );
        // Finished: its address is released.
        let done = pod(Some("10.244.1.9"), Some("301"), "Succeeded");
        assert_eq!(
            seen(&ipcache_events(&put(Some(&moved), &done))),
            [(Deleted, "10.244.1.9", 301)]
        );
        // Removed while running.
        let gone = Event {
            kind: EventKind::Delete,
            kv: kv("/core/pods/shop/web", &moved, 10),
            prev: Some(kv("/core/pods/shop/web", &moved, 9)),
        };
        assert_eq!(seen(&ipcache_events(&gone)), [(Deleted, "10.244.1.9", 301)]);
        // Without an identity (written before identities existed): no entry.
        assert!(entry(&pod(Some("10.244.1.5"), None, "Running")).is_none());
    }

    #[test]
    fn namespaces_change_only_with_their_labels() {
        let ns = |labels: Value, phase: &str| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "labels": labels}, "status": {"phase": phase}})
        };
        let key = "/core/namespaces/shop";
        let a = ns(json!({"team": "a"}), "Active");
        let ev = |kind, prev: Option<&Value>, now: &Value| Event {
            kind,
            kv: kv(key, now, 5),
            prev: prev.map(|p| kv(key, p, 4)),
        };
        let e = namespace_change(&ev(EventKind::Put, None, &a)).expect("added");
        assert_eq!(e.r#type(), v1::EventType::Added);
        assert_eq!(e.labels["team"], "a");
        let terminating = ns(json!({"team": "a"}), "Terminating");
        assert!(namespace_change(&ev(EventKind::Put, Some(&a), &terminating)).is_none());
        let b = ns(json!({"team": "b"}), "Active");
        let e = namespace_change(&ev(EventKind::Put, Some(&a), &b)).expect("modified");
        assert_eq!(
            (e.r#type(), e.labels["team"].as_str()),
            (v1::EventType::Modified, "b")
        );
        let e = namespace_change(&ev(EventKind::Delete, Some(&b), &b)).expect("deleted");
        assert_eq!(
            (e.r#type(), e.name.as_str()),
            (v1::EventType::Deleted, "shop")
        );
    }
}
