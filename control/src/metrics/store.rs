//! The in-memory metrics store: the newest sample of every node and of
//! every pod the nodes report, nothing older and nothing on disk.
//!
//! A node's report replaces everything it reported before (a pod missing
//! from it has no metrics any more). Samples go stale 3 windows after they
//! were received, and a node's samples go as soon as its report stream ends
//! (unless a newer stream of the same node has already replaced them).
//! Every accepted report is announced to subscribers ([`MetricsStore::subscribe`])
//! with the pods it concerns, which is what lets the autoscaler react to
//! a metric change within one sampling period.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use weir_proto::v1::{MetricsReport, NodeMetrics, PodMetrics};

/// A sample is stale this many windows after it was received.
pub const STALE_WINDOWS: u32 = 3;
/// The window assumed when a report does not say (the agents' default).
const DEFAULT_WINDOW: Duration = Duration::from_secs(1);
/// How many updates a slow subscriber may fall behind before it lags.
const UPDATES_CAPACITY: usize = 1024;

/// One accepted report, as announced to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The reporting node.
    pub node: String,
    /// `<namespace>/<name>` of every pod the report concerns: those it
    /// carries and those the node reported before but not any more.
    pub pods: Vec<String>,
}

/// Which report stream a node's samples came from, so that the end of an
/// old stream does not drop the samples of the node's newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Session(u64);

#[derive(Debug)]
struct NodeEntry {
    session: Session,
    received: Instant,
    window: Duration,
    node: NodeMetrics,
    /// Keys of the pods of the node's last report.
    pods: Vec<String>,
}

#[derive(Debug)]
struct PodEntry {
    node: String,
    sample: PodMetrics,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<String, NodeEntry>,
    pods: HashMap<String, PodEntry>,
    /// Reports received per node since start (for `/metrics`).
    reports: BTreeMap<String, u64>,
}

/// The store; share it as `Arc<MetricsStore>`.
#[derive(Debug)]
pub struct MetricsStore {
    inner: Mutex<Inner>,
    sessions: AtomicU64,
    updates: broadcast::Sender<Arc<Update>>,
}

/// The key of a pod's sample: `<namespace>/<name>`, as the controllers'
/// caches key pods.
pub fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn window_of(window_ms: i64) -> Duration {
    u64::try_from(window_ms)
        .ok()
        .filter(|&ms| ms > 0)
        .map_or(DEFAULT_WINDOW, Duration::from_millis)
}

impl NodeEntry {
    fn fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.received) <= self.window * STALE_WINDOWS
    }
}

impl MetricsStore {
    /// An empty store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            sessions: AtomicU64::new(0),
            updates: broadcast::channel(UPDATES_CAPACITY).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new report stream's identity.
    pub fn session(&self) -> Session {
        Session(self.sessions.fetch_add(1, Ordering::Relaxed))
    }

    /// Takes a node's report, replacing everything the node reported
    /// before, and announces it. A report without a node name is ignored.
    pub fn report(&self, session: Session, report: MetricsReport) {
        let name = report.node_name.clone();
        if name.is_empty() {
            return;
        }
        let mut node = report.node.unwrap_or_default();
        if node.name.is_empty() {
            node.name.clone_from(&name);
        }
        let window = window_of(node.window_ms);
        let mut keys = Vec::with_capacity(report.pods.len());
        let mut inner = self.lock();
        let previous = inner
            .nodes
            .remove(&name)
            .map(|e| e.pods)
            .unwrap_or_default();
        for old in &previous {
            // A pod that moved to another node keeps that node's sample.
            if inner.pods.get(old).is_some_and(|p| p.node == name) {
                inner.pods.remove(old);
            }
        }
        for mut sample in report.pods {
            if sample.node_name.is_empty() {
                sample.node_name.clone_from(&name);
            }
            let key = pod_key(&sample.namespace, &sample.name);
            keys.push(key.clone());
            inner.pods.insert(
                key,
                PodEntry {
                    node: name.clone(),
                    sample,
                },
            );
        }
        *inner.reports.entry(name.clone()).or_default() += 1;
        let mut concerned = keys.clone();
        concerned.extend(previous.into_iter().filter(|k| !keys.contains(k)));
        inner.nodes.insert(
            name.clone(),
            NodeEntry {
                session,
                received: Instant::now(),
                window,
                node,
                pods: keys,
            },
        );
        drop(inner);
        // No subscriber is fine: nothing is waiting for metrics.
        let _ = self.updates.send(Arc::new(Update {
            node: name,
            pods: concerned,
        }));
    }

    /// Drops a node's samples when its report stream `session` ended,
    /// unless a newer stream has reported since.
    pub fn forget(&self, session: Session, node: &str) {
        let mut inner = self.lock();
        if inner.nodes.get(node).is_none_or(|e| e.session != session) {
            return;
        }
        let pods = inner.nodes.remove(node).map(|e| e.pods).unwrap_or_default();
        for key in &pods {
            if inner.pods.get(key).is_some_and(|p| p.node == node) {
                inner.pods.remove(key);
            }
        }
        drop(inner);
        let _ = self.updates.send(Arc::new(Update {
            node: node.to_owned(),
            pods,
        }));
    }

    /// The newest fresh sample of one pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodMetrics> {
        let now = Instant::now();
        let inner = self.lock();
        let entry = inner.pods.get(&pod_key(namespace, name))?;
        let fresh = inner.nodes.get(&entry.node).is_some_and(|n| n.fresh(now));
        fresh.then(|| entry.sample.clone())
    }

    /// The fresh samples of every pod in `namespace` (empty: all), sorted
    /// by namespace and name.
    pub fn pods(&self, namespace: &str) -> Vec<PodMetrics> {
        let now = Instant::now();
        let inner = self.lock();
        let mut pods: Vec<PodMetrics> = inner
            .pods
            .values()
            .filter(|p| namespace.is_empty() || p.sample.namespace == namespace)
            .filter(|p| inner.nodes.get(&p.node).is_some_and(|n| n.fresh(now)))
            .map(|p| p.sample.clone())
            .collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        pods
    }

    /// The fresh samples of every node, sorted by name.
    pub fn nodes(&self) -> Vec<NodeMetrics> {
        let now = Instant::now();
        let inner = self.lock();
        let mut nodes: Vec<NodeMetrics> = inner
            .nodes
            .values()
            .filter(|n| n.fresh(now))
            .map(|n| n.node.clone())
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// How many reports each node sent since this control started.
    pub fn reports_received(&self) -> Vec<(String, u64)> {
        self.lock()
            .reports
            .iter()
            .map(|(node, n)| (node.clone(), *n))
            .collect()
    }

    /// Announcements of every accepted report (and of dropped nodes).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Update>> {
        self.updates.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, cpu: f64) -> PodMetrics {
        PodMetrics {
            namespace: ns.into(),
            name: name.into(),
            cpu_cores: cpu,
            window_ms: 1000,
            ..PodMetrics::default()
        }
    }

    fn report(node: &str, window_ms: i64, pods: Vec<PodMetrics>) -> MetricsReport {
        MetricsReport {
            node_name: node.into(),
            node: Some(NodeMetrics {
                name: node.into(),
                window_ms,
                cpu_cores: 0.5,
                ..NodeMetrics::default()
            }),
            pods,
        }
    }

    #[test]
    fn a_report_replaces_the_nodes_previous_pods_and_is_announced() {
        let store = MetricsStore::new();
        let mut updates = store.subscribe();
        let s = store.session();
        store.report(
            s,
            report("n1", 1000, vec![pod("a", "x", 0.1), pod("a", "y", 0.2)]),
        );
        store.report(s, report("n2", 1000, vec![pod("b", "z", 0.3)]));
        store.report(s, report("n1", 1000, vec![pod("a", "y", 0.4)]));
        assert!(store.pod("a", "x").is_none(), "x left n1's report");
        assert!((store.pod("a", "y").expect("y").cpu_cores - 0.4).abs() < 1e-9);
        assert_eq!(store.pods("").len(), 2);
        assert_eq!(store.pods("b").len(), 1);
        assert_eq!(store.nodes().len(), 2);
        let first = updates.try_recv().expect("first update");
        assert_eq!(first.pods, vec!["a/x".to_owned(), "a/y".to_owned()]);
        updates.try_recv().expect("second update");
        let third = updates.try_recv().expect("third update");
        assert_eq!(third.pods, vec!["a/y".to_owned(), "a/x".to_owned()]);
        assert_eq!(
            store.reports_received(),
            vec![("n1".to_owned(), 2), ("n2".to_owned(), 1)]
        );
    }

    #[test]
    fn samples_go_stale_after_three_windows() {
        let store = MetricsStore::new();
        store.report(store.session(), report("n1", 5, vec![pod("a", "x", 0.1)]));
        assert!(store.pod("a", "x").is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(store.pod("a", "x").is_none());
        assert!(store.nodes().is_empty());
    }

    #[test]
    fn the_end_of_an_old_stream_keeps_the_newer_streams_samples() {
        let store = MetricsStore::new();
        let (old, new) = (store.session(), store.session());
        store.report(old, report("n1", 1000, vec![pod("a", "x", 0.1)]));
        store.report(new, report("n1", 1000, vec![pod("a", "x", 0.2)]));
        store.forget(old, "n1");
        assert!(store.pod("a", "x").is_some());
        store.forget(new, "n1");
        assert!(store.pod("a", "x").is_none());
        assert!(store.nodes().is_empty());
    }
}
