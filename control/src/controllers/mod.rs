//! Reconcile loops in the kube-rs style: `ReplicaSet`, `Deployment`,
//! `DaemonSet`, node lifecycle and endpoints (Service → `EndpointSlice`).
//!
//! Shared informers ([`cache`]) keep typed copies of pods, `ReplicaSets`,
//! `Deployments`, `DaemonSets` and nodes from List+Watch through the same
//! [`ObjectsApi`] users go through. Each controller maps cache changes to
//! object keys on its own de-duplicating [`queue::WorkQueue`]; one worker
//! runs its idempotent `reconcile(key)`, which reads desired and actual
//! state from the caches, acts on the difference through the API, and is
//! requeued with backoff when it fails. The decisions themselves are pure
//! functions next to each controller, unit-tested without I/O.

pub mod cache;
mod client;
pub mod daemonset;
pub mod deployment;
pub mod endpoints;
#[cfg(test)]
mod endpoints_tests;
pub mod gc;
pub mod hpa;
pub mod meta;
pub mod node_lifecycle;
mod pods;
pub mod queue;
pub mod replicaset;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod parse_tests {
    use std::time::Duration;

    #[test]
    fn durations_parse_like_kubernetes_flags() {
        assert_eq!(super::parse_duration("40s"), Ok(Duration::from_secs(40)));
        assert_eq!(
            super::parse_duration("500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(super::parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(
            super::parse_duration("1.5s"),
            Ok(Duration::from_millis(1500))
        );
        assert!(super::parse_duration("40").is_err());
        assert!(super::parse_duration("4x").is_err());
        assert!(super::parse_duration("s").is_err());
    }
}

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use self::cache::{BY_NODE, BY_OWNER, Cache, Change};
use self::client::Client;
pub use self::client::Error;
use self::queue::WorkQueue;
use crate::api::{Kind, ObjectsApi};
use crate::metrics::MetricsStore;
use crate::store::Store;

/// Controller settings (weir-control flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a node may go without a heartbeat before it is marked
    /// `Ready=Unknown` and tainted unreachable (`--node-monitor-grace-period`).
    pub node_monitor_grace_period: Duration,
    /// How often every node's heartbeat is checked (`--node-monitor-period`).
    pub node_monitor_period: Duration,
    /// At most this many pods are created or deleted per reconcile of one
    /// `ReplicaSet` (Kubernetes' `burstReplicas`).
    pub burst_replicas: usize,
    /// Events are deleted this long after they last happened
    /// (`--event-ttl`).
    pub event_ttl: Duration,
    /// How often the garbage collector sweeps for orphans and old events.
    pub gc_period: Duration,
    /// How long a security identity no pod carries any more is kept
    /// before the garbage collector releases it.
    pub identity_grace: Duration,
    /// The agents' samples the autoscaler reads (`None`: an empty store,
    /// so autoscalers report missing metrics).
    pub metrics: Option<Arc<MetricsStore>>,
    /// Zero: autoscalers react to every metrics report (with a 15 s
    /// resync); otherwise they are synced at this period only, as
    /// Kubernetes' `--horizontal-pod-autoscaler-sync-period`.
    pub hpa_sync_period: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_monitor_grace_period: Duration::from_secs(40),
            node_monitor_period: Duration::from_secs(5),
            burst_replicas: 500,
            event_ttl: Duration::from_hours(1),
            gc_period: Duration::from_mins(1),
            identity_grace: Duration::from_mins(5),
            metrics: None,
            hpa_sync_period: Duration::ZERO,
        }
    }
}

/// Parses a flag duration the way Kubernetes flags are written: a number
/// with a unit `ms`, `s`, `m` or `h` (e.g. `40s`, `500ms`, `1m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{text:?}: missing unit (ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// What a reconcile asks of the queue when it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until the next change.
    Done,
    /// Reconcile again after this long (e.g. when `minReadySeconds` or a
    /// toleration expires) even without a change.
    RequeueAfter(Duration),
}

impl Action {
    /// The sooner of two actions.
    #[must_use]
    pub fn min(self, other: Self) -> Self {
        match (self, other) {
            (Self::Done, a) | (a, Self::Done) => a,
            (Self::RequeueAfter(a), Self::RequeueAfter(b)) => Self::RequeueAfter(a.min(b)),
        }
    }

    /// Requeue after `delay` if there is one.
    pub fn after(delay: Option<Duration>) -> Self {
        delay.map_or(Self::Done, Self::RequeueAfter)
    }
}

/// The caches and API handle the controllers share.
pub(crate) struct Ctx<S> {
    client: Client<S>,
    pods: Arc<Cache<Pod>>,
    replicasets: Arc<Cache<ReplicaSet>>,
    deployments: Arc<Cache<Deployment>>,
    daemonsets: Arc<Cache<DaemonSet>>,
    nodes: Arc<Cache<Node>>,
    services: Arc<Cache<Service>>,
    endpoint_slices: Arc<Cache<EndpointSlice>>,
    hpas: Arc<Cache<HorizontalPodAutoscaler>>,
    metrics: Arc<MetricsStore>,
    config: Config,
}

impl<S: Store> Ctx<S> {
    fn new(api: Arc<ObjectsApi<S>>, config: Config) -> Arc<Self> {
        Arc::new(Self {
            client: Client::new(api),
            pods: Cache::new(
                Kind::Pod,
                vec![(BY_OWNER, meta::owner_index), (BY_NODE, meta::node_index)],
            ),
            replicasets: Cache::new(Kind::ReplicaSet, vec![(BY_OWNER, meta::owner_index)]),
            deployments: Cache::new(Kind::Deployment, Vec::new()),
            daemonsets: Cache::new(Kind::DaemonSet, Vec::new()),
            nodes: Cache::new(Kind::Node, Vec::new()),
            services: Cache::new(Kind::Service, Vec::new()),
            endpoint_slices: Cache::new(Kind::EndpointSlice, Vec::new()),
            hpas: Cache::new(Kind::HorizontalPodAutoscaler, Vec::new()),
            metrics: config.metrics.clone().unwrap_or_else(MetricsStore::new),
            config,
        })
    }

    async fn wait_synced(&self) {
        self.pods.wait_synced().await;
        self.replicasets.wait_synced().await;
        self.deployments.wait_synced().await;
        self.daemonsets.wait_synced().await;
        self.nodes.wait_synced().await;
        self.services.wait_synced().await;
        self.endpoint_slices.wait_synced().await;
        self.hpas.wait_synced().await;
    }
}

/// Starts the informers and every controller on the current runtime; they
/// stop when `shutdown` turns true.
pub fn spawn<S: Store>(
    api: Arc<ObjectsApi<S>>,
    config: Config,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(run(api, config, shutdown))
}

/// Runs the informers and every controller until `shutdown` turns true.
pub async fn run<S: Store>(
    api: Arc<ObjectsApi<S>>,
    config: Config,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctx = Ctx::new(Arc::clone(&api), config);
    let mut tasks = vec![
        tokio::spawn(Arc::clone(&ctx.pods).run(Arc::clone(&api), shutdown.clone())),
        tokio::spawn(Arc::clone(&ctx.replicasets).run(Arc::clone(&api), shutdown.clone())),
        tokio::spawn(Arc::clone(&ctx.deployments).run(Arc::clone(&api), shutdown.clone())),
        tokio::spawn(Arc::clone(&ctx.daemonsets).run(Arc::clone(&api), shutdown.clone())),
        tokio::spawn(Arc::clone(&ctx.nodes).run(Arc::clone(&api), shutdown.clone())),
        tokio::spawn(Arc::clone(&ctx.services).run(Arc::clone(&api), shutdown.clone())),
        tokio::spawn(Arc::clone(&ctx.endpoint_slices).run(Arc::clone(&api), shutdown.clone())),
        tokio::spawn(Arc::clone(&ctx.hpas).run(Arc::clone(&api), shutdown.clone())),
    ];
    tokio::select! {
        () = ctx.wait_synced() => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
    if !*shutdown.borrow() {
        tracing::info!("controllers: caches synced, starting");
        tasks.extend(replicaset::start(&ctx, &shutdown));
        tasks.extend(deployment::start(&ctx, &shutdown));
        tasks.extend(daemonset::start(&ctx, &shutdown));
        tasks.extend(node_lifecycle::start(&ctx, &shutdown));
        tasks.extend(gc::start(&ctx, &shutdown));
        tasks.extend(endpoints::start(&ctx, &shutdown));
        tasks.extend(hpa::start(&ctx, &shutdown));
    }
    for task in tasks {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "controllers: task failed");
        }
    }
}

/// Runs one controller's worker: takes keys off `queue` and reconciles
/// them one at a time until shutdown.
fn drive<S, F, Fut>(
    name: &'static str,
    ctx: &Arc<Ctx<S>>,
    queue: Arc<WorkQueue>,
    shutdown: &watch::Receiver<bool>,
    reconcile: F,
) -> JoinHandle<()>
where
    S: Store,
    F: Fn(Arc<Ctx<S>>, String) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send,
{
    let ctx = Arc::clone(ctx);
    let mut shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let key = tokio::select! {
                key = queue.next() => key,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let result = reconcile(Arc::clone(&ctx), key.clone()).await;
            queue.done(&key);
            match result {
                Ok(action) => {
                    queue.forget(&key);
                    if let Action::RequeueAfter(delay) = action {
                        queue.add_after(&key, delay);
                    }
                }
                Err(e) => {
                    tracing::warn!(controller = name, %key, error = %e, "reconcile failed, retrying");
                    queue.add_rate_limited(&key);
                }
            }
        }
    })
}

/// Feeds a cache's changes to a queue: `map` turns one change into keys
/// (a [`Change::Resync`] is also sent when the subscriber lagged).
fn forward<K, F>(
    mut changes: broadcast::Receiver<Change<K>>,
    queue: Arc<WorkQueue>,
    mut shutdown: watch::Receiver<bool>,
    map: F,
) -> JoinHandle<()>
where
    K: Send + Sync + 'static,
    F: Fn(&Change<K>) -> Vec<String> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let change = match change {
                Ok(change) => change,
                Err(broadcast::error::RecvError::Lagged(_)) => Change::Resync,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            for key in map(&change) {
                queue.add(&key);
            }
        }
    })
}

/// The objects a change is about (old and new state).
fn changed<K>(change: &Change<K>) -> Vec<&Arc<K>> {
    match change {
        Change::Upsert { old, new } => old.iter().chain(std::iter::once(new)).collect(),
        Change::Delete(object) => vec![object],
        Change::Resync => Vec::new(),
    }
}

/// The keys of every object in `cache`.
fn all_keys<K: cache::Object>(cache: &Cache<K>) -> Vec<String> {
    cache
        .list()
        .iter()
        .map(|object| cache::key_of(object.metadata()))
        .collect()
}

/// Queues every object in `cache`.
fn queue_all<K: cache::Object>(cache: &Cache<K>, queue: &WorkQueue) {
    for key in all_keys(cache) {
        queue.add(&key);
    }
}

/// Feeds a controller's own kind to its queue: the key of each object that
/// changes, every key on a resync.
fn forward_own<K: cache::Object>(
    cache: &Arc<Cache<K>>,
    queue: &Arc<WorkQueue>,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let all = Arc::clone(cache);
    forward(
        cache.subscribe(),
        Arc::clone(queue),
        shutdown.clone(),
        move |change| match change {
            Change::Resync => all_keys(&all),
            _ => changed(change)
                .into_iter()
                .map(|object| cache::key_of(object.metadata()))
                .collect(),
        },
    )
}
