//! The scheduler's view of the cluster: nodes with what their pods request,
//! and every pod it knows. Pods count against a node from the moment the
//! scheduler assumes them (before the bind write returns), as
//! kube-scheduler's cache does, so back-to-back decisions never overcommit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::model::{HostPort, NodeInfo, PodInfo, Resources};

/// One node slot: its object (absent for a node that is gone but still has
/// pods bound to it) and the pods placed on it.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    /// The Node object, if it exists.
    pub info: Option<Arc<NodeInfo>>,
    /// Sum of the placed pods' requests.
    pub requested: Resources,
    /// As `requested`, with the scoring defaults for unset cpu/memory.
    pub nonzero: Resources,
    /// Placed pods (bound or assumed) by key.
    pub pods: HashMap<Arc<str>, Arc<PodInfo>>,
    /// Host ports in use (one entry per pod port).
    pub ports: Vec<HostPort>,
    /// Placed pods per controlling owner uid.
    pub owners: HashMap<String, u32>,
}

impl NodeState {
    /// Counts `pod` against this node.
    pub fn add_pod(&mut self, pod: &Arc<PodInfo>) {
        self.requested.add(&pod.requests);
        self.nonzero.add(&pod.nonzero);
        self.ports.extend(pod.host_ports.iter().cloned());
        if let Some(owner) = &pod.owner {
            *self.owners.entry(owner.clone()).or_default() += 1;
        }
        self.pods.insert(Arc::clone(&pod.key), Arc::clone(pod));
    }

    /// Stops counting the pod with `key` against this node.
    pub fn remove_pod(&mut self, key: &str) -> Option<Arc<PodInfo>> {
        let pod = self.pods.remove(key)?;
        self.requested.sub(&pod.requests);
        self.nonzero.sub(&pod.nonzero);
        for port in &pod.host_ports {
            if let Some(i) = self.ports.iter().position(|p| p == port) {
                self.ports.swap_remove(i);
            }
        }
        if let Some(owner) = &pod.owner
            && let Some(count) = self.owners.get_mut(owner)
        {
            *count -= 1;
            if *count == 0 {
                self.owners.remove(owner);
            }
        }
        Some(pod)
    }

    /// The node's name (empty for a slot without a Node object).
    pub fn name(&self) -> &str {
        self.info.as_ref().map_or("", |i| i.name.as_str())
    }
}

/// A pod the cache knows and where it is.
#[derive(Debug, Clone)]
pub struct PodEntry {
    /// The pod.
    pub info: Arc<PodInfo>,
    /// The node slot it is placed on (bound or assumed).
    pub node: Option<usize>,
    /// Placed by this scheduler and not yet seen bound in a watch event.
    pub assumed: bool,
}

/// What an update of a pod means for the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodUpdate {
    /// Unbound and waiting to be scheduled.
    Pending,
    /// Bound (or being bound by us): not the queue's business.
    Placed,
    /// Gone from the scheduler's view (terminal, deleted while unbound).
    Gone {
        /// Whether it released resources on a node.
        freed: bool,
    },
}

/// Nodes and pods.
#[derive(Debug, Default)]
pub struct Cache {
    nodes: Vec<NodeState>,
    index: HashMap<String, usize>,
    pods: HashMap<Arc<str>, PodEntry>,
    /// Placed pods that have required anti-affinity terms.
    anti_affinity: HashSet<Arc<str>>,
    live: usize,
}

/// What a node update changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeUpdate {
    /// A new node.
    Added,
    /// Labels, taints, cordon, readiness or allocatable changed.
    Changed,
    /// Only fields the scheduler ignores changed (e.g. heartbeats).
    Unchanged,
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Node slots (some without a Node object; see [`NodeState::info`]).
    pub fn nodes(&self) -> &[NodeState] {
        &self.nodes
    }

    /// The number of existing nodes.
    pub fn live_nodes(&self) -> usize {
        self.live
    }

    /// The slot of the node named `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Every known pod.
    pub fn pods(&self) -> impl Iterator<Item = &PodEntry> {
        self.pods.values()
    }

    /// One known pod.
    pub fn pod(&self, key: &str) -> Option<&PodEntry> {
        self.pods.get(key)
    }

    /// Placed pods with required anti-affinity terms.
    pub fn anti_affinity_pods(&self) -> impl Iterator<Item = (&Arc<PodInfo>, usize)> {
        self.anti_affinity.iter().filter_map(|k| {
            let e = self.pods.get(k)?;
            Some((&e.info, e.node?))
        })
    }

    fn slot(&mut self, name: &str) -> usize {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        self.nodes.push(NodeState::default());
        let i = self.nodes.len() - 1;
        self.index.insert(name.to_owned(), i);
        i
    }

    /// Adds or replaces a node.
    pub fn upsert_node(&mut self, info: NodeInfo) -> NodeUpdate {
        let i = self.slot(&info.name.clone());
        let slot = &mut self.nodes[i];
        let update = match &slot.info {
            None => {
                self.live += 1;
                NodeUpdate::Added
            }
            Some(old) if old.same_for_scheduling(&info) => NodeUpdate::Unchanged,
            Some(_) => NodeUpdate::Changed,
        };
        slot.info = Some(Arc::new(info));
        update
    }

    /// Removes a node (its pods stay counted on the slot until they go).
    pub fn remove_node(&mut self, name: &str) -> bool {
        let Some(i) = self.index.get(name).copied() else {
            return false;
        };
        let existed = self.nodes[i].info.take().is_some();
        if existed {
            self.live -= 1;
        }
        existed
    }

    fn unplace(&mut self, key: &str) -> bool {
        let Some(entry) = self.pods.get_mut(key) else {
            return false;
        };
        let Some(node) = entry.node.take() else {
            return false;
        };
        entry.assumed = false;
        self.anti_affinity.remove(key);
        self.nodes[node].remove_pod(key).is_some()
    }

    fn place(&mut self, key: &Arc<str>, node: usize, assumed: bool) {
        let Some(entry) = self.pods.get_mut(key) else {
            return;
        };
        entry.node = Some(node);
        entry.assumed = assumed;
        if entry.info.has_required_anti_affinity() {
            self.anti_affinity.insert(Arc::clone(key));
        }
        let info = Arc::clone(&entry.info);
        self.nodes[node].add_pod(&info);
    }

    /// Records a pod from a list or watch event.
    pub fn upsert_pod(&mut self, info: Arc<PodInfo>) -> PodUpdate {
        let key = Arc::clone(&info.key);
        if info.terminal || (info.deleting && info.node_name.is_none()) {
            return PodUpdate::Gone {
                freed: self.remove_pod(&key),
            };
        }
        let previous = self
            .pods
            .get(&key)
            .map(|e| (e.node, e.assumed, e.info.uid.clone()));
        if let Some((_, _, uid)) = &previous
            && *uid != info.uid
        {
            // A new pod under an old name.
            self.remove_pod(&key);
        }
        let (node, assumed) = match self.pods.get(&key) {
            Some(e) => (e.node, e.assumed),
            None => (None, false),
        };
        match &info.node_name {
            Some(name) => {
                self.unplace(&key);
                let target = self.slot(name);
                self.pods.insert(
                    Arc::clone(&key),
                    PodEntry {
                        info,
                        node: None,
                        assumed: false,
                    },
                );
                self.place(&key, target, false);
                PodUpdate::Placed
            }
            None if assumed => {
                // Our bind is in flight; keep the assumption with fresh info.
                self.unplace(&key);
                self.pods.insert(
                    Arc::clone(&key),
                    PodEntry {
                        info,
                        node: None,
                        assumed: false,
                    },
                );
                if let Some(node) = node {
                    self.place(&key, node, true);
                }
                PodUpdate::Placed
            }
            None => {
                self.unplace(&key);
                self.pods.insert(
                    key,
                    PodEntry {
                        info,
                        node: None,
                        assumed: false,
                    },
                );
                PodUpdate::Pending
            }
        }
    }

    /// Forgets a pod; true if it released resources on a node.
    pub fn remove_pod(&mut self, key: &str) -> bool {
        let freed = self.unplace(key);
        self.pods.remove(key);
        freed
    }

    /// Counts a pod against `node` before its bind is written.
    pub fn assume(&mut self, key: &Arc<str>, node: usize) {
        self.unplace(key);
        self.place(key, node, true);
    }

    /// Undoes [`Cache::assume`] after a failed bind (if still assumed).
    pub fn forget(&mut self, key: &str) -> bool {
        match self.pods.get(key) {
            Some(e) if e.assumed => self.unplace(key),
            _ => false,
        }
    }

    /// Replaces every pod by a fresh list (after a compacted watch), keeping
    /// in-flight assumptions for pods still unbound. Returns the pods to
    /// queue.
    pub fn replace_pods(&mut self, pods: Vec<Arc<PodInfo>>) -> Vec<Arc<PodInfo>> {
        let fresh: HashSet<Arc<str>> = pods.iter().map(|p| Arc::clone(&p.key)).collect();
        let stale: Vec<Arc<str>> = self
            .pods
            .keys()
            .filter(|k| !fresh.contains(*k))
            .cloned()
            .collect();
        for key in stale {
            self.remove_pod(&key);
        }
        pods.into_iter()
            .filter(|p| self.upsert_pod(Arc::clone(p)) == PodUpdate::Pending)
            .collect()
    }

    /// Replaces every node by a fresh list.
    pub fn replace_nodes(&mut self, nodes: Vec<NodeInfo>) {
        let fresh: HashSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let stale: Vec<String> = self
            .index
            .keys()
            .filter(|k| !fresh.contains(*k))
            .cloned()
            .collect();
        for name in stale {
            self.remove_node(&name);
        }
        for node in nodes {
            self.upsert_node(node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::testutil::{node, pod};

    #[test]
    fn assumed_pods_count_until_forgotten_and_bound_pods_move() {
        let mut cache = Cache::new();
        cache.upsert_node(node("n1", 1000, 1 << 30));
        cache.upsert_node(node("n2", 1000, 1 << 30));
        let p = Arc::new(pod("p", 300, 0));
        assert_eq!(cache.upsert_pod(Arc::clone(&p)), PodUpdate::Pending);
        cache.assume(&p.key, 0);
        assert_eq!(cache.nodes()[0].requested.milli_cpu, 300);
        // The watch event of our own status write keeps the assumption.
        assert_eq!(cache.upsert_pod(Arc::clone(&p)), PodUpdate::Placed);
        assert_eq!(cache.nodes()[0].requested.milli_cpu, 300);
        assert!(cache.forget(&p.key));
        assert_eq!(cache.nodes()[0].requested.milli_cpu, 0);
        // Someone else bound it to n2.
        let mut bound = pod("p", 300, 0);
        bound.node_name = Some("n2".into());
        assert_eq!(cache.upsert_pod(Arc::new(bound)), PodUpdate::Placed);
        assert_eq!(cache.nodes()[1].requested.milli_cpu, 300);
        assert!(cache.remove_pod("default/p"));
        assert_eq!(cache.nodes()[1].requested, Resources::default());
    }

    #[test]
    fn node_updates_tell_relevant_changes_from_heartbeats() {
        let mut cache = Cache::new();
        assert_eq!(cache.upsert_node(node("n1", 1000, 1)), NodeUpdate::Added);
        assert_eq!(
            cache.upsert_node(node("n1", 1000, 1)),
            NodeUpdate::Unchanged
        );
        assert_eq!(cache.upsert_node(node("n1", 2000, 1)), NodeUpdate::Changed);
        assert_eq!(cache.live_nodes(), 1);
        assert!(cache.remove_node("n1"));
        assert_eq!(cache.live_nodes(), 0);
    }
}
