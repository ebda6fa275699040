//! The decision logic of the service map: one node's reports kept across
//! agent restarts, and every node's edges merged under resolved names.

use std::collections::{BTreeMap, HashMap};

use weir_proto::v1;

/// One end as reported or resolved; ordered by namespace, name, kind.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EndKey {
    /// The namespace (empty for host and world).
    pub namespace: String,
    /// The name (or address).
    pub name: String,
    /// `pod`, `workload`, `service`, `host` or `world`.
    pub kind: String,
}

impl EndKey {
    /// An end of `kind`.
    #[must_use]
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            kind: kind.to_owned(),
        }
    }

    fn of(e: Option<&v1::Endpoint>) -> Self {
        e.map(|e| Self::new(&e.kind, &e.namespace, &e.name))
            .unwrap_or_default()
    }

    fn proto(&self) -> v1::Endpoint {
        v1::Endpoint {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// An edge as a node reported it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawKey {
    /// Who connected.
    pub source: EndKey,
    /// Where to.
    pub destination: EndKey,
    /// Who served a service.
    pub backend: Option<EndKey>,
    /// The (service) port.
    pub port: u32,
    /// `TCP` / `UDP`.
    pub protocol: String,
}

impl RawKey {
    fn of(e: &v1::Edge) -> Self {
        Self {
            source: EndKey::of(e.source.as_ref()),
            destination: EndKey::of(e.destination.as_ref()),
            backend: e.backend.as_ref().map(|b| EndKey::of(Some(b))),
            port: e.port,
            protocol: e.protocol.clone(),
        }
    }
}

/// Counters of an edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Connections allowed.
    pub connections: u64,
    /// Bytes.
    pub bytes: u64,
    /// Drops.
    pub drops: u64,
    /// Last seen, ms since the Unix epoch.
    pub last_seen_ms: i64,
}

impl Totals {
    fn of(e: &v1::Edge) -> Self {
        Self {
            connections: e.connections,
            bytes: e.bytes,
            drops: e.drops,
            last_seen_ms: e.last_seen_ms,
        }
    }

    fn add(&mut self, o: Totals) {
        self.connections += o.connections;
        self.bytes += o.bytes;
        self.drops += o.drops;
        self.last_seen_ms = self.last_seen_ms.max(o.last_seen_ms);
    }

    /// Whether any counter of `new` is below this one's (the agent
    /// restarted and counts from zero again).
    fn reset_by(&self, new: &Totals) -> bool {
        new.connections < self.connections || new.bytes < self.bytes || new.drops < self.drops
    }
}

/// One node's edges: the totals of its agent's earlier runs (`base`) plus
/// its newest report (`last`), so an agent restart loses no history.
#[derive(Clone, Debug, Default)]
pub struct NodeEdges {
    edges: HashMap<RawKey, (Totals, Totals)>,
}

impl NodeEdges {
    /// Takes a report: totals since the agent started. An edge that went
    /// down, or is missing, means a restarted agent: what it had counted
    /// before is kept.
    pub fn update(&mut self, report: &[v1::Edge]) {
        let mut fresh: HashMap<RawKey, Totals> = report
            .iter()
            .map(|e| (RawKey::of(e), Totals::of(e)))
            .collect();
        for (k, (base, last)) in &mut self.edges {
            let new = fresh.remove(k).unwrap_or(Totals {
                last_seen_ms: 0,
                ..Totals::default()
            });
            if last.reset_by(&new) {
                base.add(*last);
            }
            let seen = last.last_seen_ms.max(new.last_seen_ms);
            *last = new;
            last.last_seen_ms = seen;
        }
        for (k, t) in fresh {
            self.edges.insert(k, (Totals::default(), t));
        }
    }

    /// Every edge with its totals.
    pub fn totals(&self) -> impl Iterator<Item = (&RawKey, Totals)> {
        self.edges.iter().map(|(k, (base, last))| {
            let mut t = *base;
            t.add(*last);
            (k, t)
        })
    }

    /// Every end this node's edges name.
    pub fn ends(&self) -> impl Iterator<Item = &EndKey> {
        self.edges.keys().flat_map(|k| {
            [Some(&k.source), Some(&k.destination), k.backend.as_ref()]
                .into_iter()
                .flatten()
        })
    }
}

/// A merged edge's backend: the one workload every node named, or none
/// when they differ.
enum Backend {
    None,
    One(EndKey),
    Several,
}

/// Every node's edges merged by (source, destination, port, protocol) with
/// each end renamed by `names` (pods → workloads, addresses → names; an
/// end not in it stays as reported), keeping those with an end (backend
/// included) in `namespace` (empty: all), sorted by source, destination,
/// port.
pub fn merge<'a, H: std::hash::BuildHasher>(
    nodes: impl IntoIterator<Item = &'a NodeEdges>,
    names: &HashMap<EndKey, EndKey, H>,
    namespace: &str,
) -> Vec<v1::Edge> {
    let name = |e: &EndKey| names.get(e).cloned().unwrap_or_else(|| e.clone());
    let mut merged: BTreeMap<(EndKey, EndKey, u32, String), (Totals, Backend)> = BTreeMap::new();
    for node in nodes {
        for (k, t) in node.totals() {
            let (source, destination) = (name(&k.source), name(&k.destination));
            let backend = k.backend.as_ref().map(name);
            let in_ns = namespace.is_empty()
                || [Some(&source), Some(&destination), backend.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|e| e.namespace == namespace);
            if !in_ns {
                continue;
            }
            let entry = merged
                .entry((source, destination, k.port, k.protocol.clone()))
                .or_insert((Totals::default(), Backend::None));
            entry.0.add(t);
            entry.1 = match (std::mem::replace(&mut entry.1, Backend::None), backend) {
                (b, None) => b,
                (Backend::None, Some(b)) => Backend::One(b),
                (Backend::One(a), Some(b)) if a == b => Backend::One(a),
                _ => Backend::Several,
            };
        }
    }
    merged
        .into_iter()
        .map(
            |((source, destination, port, protocol), (t, backend))| v1::Edge {
                source: Some(source.proto()),
                destination: Some(destination.proto()),
                backend: match backend {
                    Backend::One(b) => Some(b.proto()),
                    Backend::None | Backend::Several => None,
                },
                port,
                protocol,
                connections: t.connections,
                bytes: t.bytes,
                drops: t.drops,
                last_seen_ms: t.last_seen_ms,
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(clippy::unnecessary_wraps, reason = "the proto fields are options")]
    fn ep(kind: &str, ns: &str, name: &str) -> Option<v1::Endpoint> {
        Some(v1::Endpoint {
            kind: kind.into(),
            namespace: ns.into(),
            name: name.into(),
        })
    }

    fn edge(src: &str, backend: &str, connections: u64, bytes: u64, drops: u64) -> v1::Edge {
        v1::Edge {
            source: ep("pod", "x", src),
            destination: ep("service", "x", "web"),
            backend: ep("pod", "x", backend),
            port: 80,
            protocol: "TCP".into(),
            connections,
            bytes,
            drops,
            last_seen_ms: 7,
        }
    }

    fn names() -> HashMap<EndKey, EndKey> {
        [
            ("client-aaaaa", "client"),
            ("client-bbbbb", "client"),
            ("server-ccccc", "server"),
            ("server-ddddd", "server"),
        ]
        .into_iter()
        .map(|(pod, w)| {
            (
                EndKey::new("pod", "x", pod),
                EndKey::new("workload", "x", w),
            )
        })
        .collect()
    }

    #[test]
    fn nodes_merge_into_workload_edges() {
        let mut n1 = NodeEdges::default();
        n1.update(&[edge("client-aaaaa", "server-ccccc", 3, 300, 0)]);
        let mut n2 = NodeEdges::default();
        n2.update(&[
            edge("client-bbbbb", "server-ddddd", 4, 400, 1),
            edge("stray-zzzzz", "server-ddddd", 1, 0, 0),
        ]);
        let out = merge([&n1, &n2], &names(), "");
        assert_eq!(out.len(), 2, "{out:?}");
        let e = &out[0];
        assert_eq!(e.source, ep("workload", "x", "client"));
        assert_eq!(e.destination, ep("service", "x", "web"));
        assert_eq!(e.backend, ep("workload", "x", "server"));
        assert_eq!((e.connections, e.bytes, e.drops), (7, 700, 1));
        // Unresolved: stays a pod.
        assert_eq!(out[1].source, ep("pod", "x", "stray-zzzzz"));
        assert!(merge([&n1, &n2], &names(), "y").is_empty());
        assert_eq!(merge([&n1, &n2], &names(), "x").len(), 2);
    }

    #[test]
    fn backends_that_differ_are_not_named() {
        let mut n1 = NodeEdges::default();
        n1.update(&[
            edge("client-aaaaa", "server-ccccc", 1, 0, 0),
            edge("client-aaaaa", "other-eeeee", 1, 0, 0),
        ]);
        let out = merge([&n1], &names(), "");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].connections, 2);
        assert_eq!(out[0].backend, None);
    }

    #[test]
    fn an_agent_restart_keeps_what_it_counted() {
        let mut n = NodeEdges::default();
        n.update(&[edge("client-aaaaa", "server-ccccc", 5, 500, 2)]);
        n.update(&[edge("client-aaaaa", "server-ccccc", 6, 600, 2)]);
        let total = |n: &NodeEdges| n.totals().map(|(_, t)| t).next().unwrap();
        assert_eq!(total(&n).connections, 6);
        // Restarted: counts from zero; the old run's 6 stay.
        n.update(&[edge("client-aaaaa", "server-ccccc", 1, 50, 0)]);
        let t = total(&n);
        assert_eq!((t.connections, t.bytes, t.drops), (7, 650, 2));
        // Restarted and not seen yet: nothing is lost.
        n.update(&[]);
        let t = total(&n);
        assert_eq!((t.connections, t.bytes, t.drops), (7, 650, 2));
        assert_eq!(t.last_seen_ms, 7);
        n.update(&[edge("client-aaaaa", "server-ccccc", 2, 60, 0)]);
        assert_eq!(total(&n).connections, 9);
    }
}
