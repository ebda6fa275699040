//! The scheduler's I/O: informers feeding the cache and queue, one loop
//! making decisions, and tasks writing binds, statuses, evictions and
//! events through the API.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use weir_proto::v1;

use super::cache::PodUpdate;
use super::decide::{Core, Decision, Preemption};
use super::model::{NodeInfo, PodInfo, node_from_object, pod_from_object};
use super::queue::Queue;
use super::{Config, SCHEDULER_NAME};
use crate::api::{ApiError, ObjectsApi};
use crate::events::{self, EventType};
use crate::store::Store;

/// Pods decided per turn of the loop before it looks at new events again.
const BATCH: usize = 512;
/// Pause before re-listing after a failed list or a broken watch.
const RELIST_DELAY: Duration = Duration::from_millis(200);
/// Attempts of a status read-modify-write that hits conflicts.
const STATUS_ATTEMPTS: usize = 5;

/// Counters the scheduler keeps (for benchmarks and logs).
#[derive(Debug, Default)]
pub struct Stats {
    /// Binds written.
    pub bound: AtomicU64,
    /// Binds that failed.
    pub bind_failures: AtomicU64,
    /// Attempts that found no node.
    pub unschedulable: AtomicU64,
    /// Pods evicted by preemption.
    pub preempted: AtomicU64,
}

enum Msg {
    NodesListed(Vec<NodeInfo>),
    Node(NodeInfo),
    NodeDeleted(String),
    PodsListed(Vec<Arc<PodInfo>>),
    Pod(Arc<PodInfo>),
    PodDeleted(Arc<str>),
}

enum BindOutcome {
    Bound,
    /// The pod is gone, another pod took its name, or it is bound or
    /// terminating: nothing to retry.
    Moot,
    /// Retry after a backoff.
    Failed,
}

struct BindDone {
    key: Arc<str>,
    outcome: BindOutcome,
}

/// Runs the scheduler until `shutdown` completes; see the module docs.
pub async fn run<S: Store>(
    api: Arc<ObjectsApi<S>>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with_stats(api, config, Arc::new(Stats::default()), shutdown).await
}

/// [`run`], counting into `stats`.
pub async fn run_with_stats<S: Store>(
    api: Arc<ObjectsApi<S>>,
    config: Config,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    config.check()?;
    let (tx, mut rx) = mpsc::channel(8192);
    let informers = [
        tokio::spawn(inform(
            Arc::clone(&api),
            "Node",
            tx.clone(),
            nodes_listed,
            node_event,
        )),
        tokio::spawn(inform(Arc::clone(&api), "Pod", tx, pods_listed, pod_event)),
    ];
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let flush_every = Duration::from_secs(config.unschedulable_flush_seconds);
    let mut d = Driver {
        binds: Arc::new(Semaphore::new(config.bind_concurrency)),
        core: Core::new(config),
        queue: Queue::new(),
        api,
        stats,
        done_tx,
        nodes_synced: false,
        pods_synced: false,
        changed: false,
    };
    tracing::info!("scheduler started");
    let mut flush = tokio::time::interval(flush_every);
    flush.tick().await;
    tokio::pin!(shutdown);
    let result = loop {
        while let Ok(m) = rx.try_recv() {
            d.handle(m);
        }
        while let Ok(done) = done_rx.try_recv() {
            d.bind_done(&done);
        }
        if d.changed {
            d.changed = false;
            d.queue.move_all_unschedulable(Instant::now());
        }
        if d.nodes_synced && d.pods_synced && d.schedule_batch() {
            tokio::task::yield_now().await;
            continue;
        }
        let wake = d.queue.next_backoff().map_or_else(
            || tokio::time::Instant::now() + flush_every,
            tokio::time::Instant::from_std,
        );
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            m = rx.recv() => match m {
                Some(m) => d.handle(m),
                None => break Err(anyhow::anyhow!("scheduler: informers ended")),
            },
            Some(done) = done_rx.recv() => d.bind_done(&done),
            _ = flush.tick() => {
                d.queue.flush_unschedulable(Instant::now(), flush_every);
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    };
    for informer in informers {
        informer.abort();
    }
    tracing::info!("scheduler stopped");
    result
}

struct Driver<S> {
    api: Arc<ObjectsApi<S>>,
    core: Core,
    queue: Queue,
    stats: Arc<Stats>,
    binds: Arc<Semaphore>,
    done_tx: mpsc::UnboundedSender<BindDone>,
    nodes_synced: bool,
    pods_synced: bool,
    /// The cluster changed since unschedulable pods were last moved.
    changed: bool,
}

impl<S: Store> Driver<S> {
    fn ours(&self, pod: &PodInfo) -> bool {
        pod.scheduler_name.is_empty() || pod.scheduler_name == self.core.config.scheduler_name
    }

    fn handle(&mut self, m: Msg) {
        let cache = &mut self.core.cache;
        match m {
            Msg::NodesListed(nodes) => {
                cache.replace_nodes(nodes);
                self.nodes_synced = true;
                self.changed = true;
            }
            Msg::Node(node) => {
                if cache.upsert_node(node) != super::cache::NodeUpdate::Unchanged {
                    self.changed = true;
                }
            }
            Msg::NodeDeleted(name) => {
                cache.remove_node(&name);
            }
            Msg::PodsListed(pods) => {
                let pending = cache.replace_pods(pods);
                let pending_keys: std::collections::HashSet<Arc<str>> =
                    pending.iter().map(|p| Arc::clone(&p.key)).collect();
                for key in self.queue.keys() {
                    let assumed = cache.pod(&key).is_some_and(|e| e.assumed);
                    if !pending_keys.contains(&key) && !assumed {
                        self.queue.remove(&key);
                    }
                }
                for pod in pending {
                    if self.ours(&pod) {
                        self.queue.add_or_update(pod);
                    }
                }
                self.pods_synced = true;
                self.changed = true;
            }
            Msg::Pod(pod) => self.pod_changed(pod),
            Msg::PodDeleted(key) => {
                if self.core.cache.remove_pod(&key) {
                    self.changed = true;
                }
                self.queue.remove(&key);
            }
        }
    }

    fn pod_changed(&mut self, pod: Arc<PodInfo>) {
        let key = Arc::clone(&pod.key);
        let ours = self.ours(&pod);
        match self.core.cache.upsert_pod(Arc::clone(&pod)) {
            PodUpdate::Pending if ours => self.queue.add_or_update(pod),
            PodUpdate::Pending => {}
            PodUpdate::Placed => {
                if !self.core.cache.pod(&key).is_some_and(|e| e.assumed) {
                    self.queue.remove(&key);
                }
            }
            PodUpdate::Gone { freed } => {
                self.queue.remove(&key);
                self.changed |= freed;
            }
        }
    }

    /// Decides up to [`BATCH`] pods; true if more may be ready.
    fn schedule_batch(&mut self) -> bool {
        let now = Instant::now();
        for _ in 0..BATCH {
            let Ok(permit) = Arc::clone(&self.binds).try_acquire_owned() else {
                return false;
            };
            let Some(pod) = self.queue.pop(now) else {
                return false;
            };
            // The cache has the freshest copy (the queue's may predate a status write).
            let pod = self
                .core
                .cache
                .pod(&pod.key)
                .map_or(pod, |e| Arc::clone(&e.info));
            match self.core.schedule(&pod) {
                Decision::Bind(node) => {
                    self.core.cache.assume(&pod.key, node);
                    let node_name = self.core.cache.nodes()[node].name().to_owned();
                    self.spawn_bind(pod, node_name, permit);
                }
                Decision::Unschedulable {
                    message,
                    preemption,
                } => {
                    drop(permit);
                    self.unschedulable(&pod, message, preemption, now);
                }
            }
        }
        true
    }

    fn spawn_bind(
        &self,
        pod: Arc<PodInfo>,
        node: String,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let api = Arc::clone(&self.api);
        let done = self.done_tx.clone();
        let stats = Arc::clone(&self.stats);
        let record = self.core.config.record_scheduled_events;
        tokio::spawn(async move {
            let outcome = match api.bind(&pod.namespace, &pod.name, &pod.uid, &node).await {
                Ok(_) => {
                    stats.bound.fetch_add(1, Ordering::Relaxed);
                    if record {
                        let message = format!("Successfully assigned {} to {node}", pod.key);
                        events::record(
                            &api,
                            &pod.meta,
                            EventType::Normal,
                            "Scheduled",
                            &message,
                            SCHEDULER_NAME,
                        )
                        .await;
                    }
                    BindOutcome::Bound
                }
                Err(ApiError::NotFound { .. } | ApiError::Invalid(_)) => BindOutcome::Moot,
                Err(ApiError::Conflict { .. }) if !pod.uid.is_empty() => {
                    stats.bind_failures.fetch_add(1, Ordering::Relaxed);
                    BindOutcome::Failed
                }
                Err(e) => {
                    stats.bind_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(pod = %pod.key, node, error = %e, "bind");
                    BindOutcome::Failed
                }
            };
            drop(permit);
            let _ = done.send(BindDone {
                key: Arc::clone(&pod.key),
                outcome,
            });
        });
    }

    fn bind_done(&mut self, done: &BindDone) {
        match done.outcome {
            BindOutcome::Bound => {
                self.queue.remove(&done.key);
            }
            BindOutcome::Moot => {
                if self.core.cache.forget(&done.key) {
                    self.changed = true;
                }
                self.queue.remove(&done.key);
            }
            BindOutcome::Failed => {
                if self.core.cache.forget(&done.key) {
                    self.changed = true;
                }
                self.queue.retry_later(&done.key, Instant::now());
            }
        }
    }

    fn unschedulable(
        &mut self,
        pod: &Arc<PodInfo>,
        message: String,
        preemption: Option<Preemption>,
        now: Instant,
    ) {
        self.stats.unschedulable.fetch_add(1, Ordering::Relaxed);
        let changed = self.queue.unschedulable(&pod.key, &message, now);
        let nominated = preemption.as_ref().map(|p| p.node_name.clone());
        if let Some(p) = preemption {
            self.preempt(pod, p);
        }
        if changed || nominated.is_some() {
            tracing::debug!(pod = %pod.key, %message, "unschedulable");
            let api = Arc::clone(&self.api);
            let pod = Arc::clone(pod);
            tokio::spawn(async move {
                report_unschedulable(&api, &pod, &message, nominated.as_deref()).await;
                if changed {
                    events::record(
                        &api,
                        &pod.meta,
                        EventType::Warning,
                        "FailedScheduling",
                        &message,
                        SCHEDULER_NAME,
                    )
                    .await;
                }
            });
        }
    }

    /// Marks the victims terminating in the cache (so the next attempt
    /// waits for them) and evicts them.
    fn preempt(&mut self, pod: &Arc<PodInfo>, p: Preemption) {
        let mut nominated = (**pod).clone();
        nominated.nominated_node = Some(p.node_name.clone());
        let nominated = Arc::new(nominated);
        self.core.cache.upsert_pod(Arc::clone(&nominated));
        self.queue.add_or_update(nominated);
        for victim in &p.victims {
            let mut terminating = (**victim).clone();
            terminating.deleting = true;
            self.core.cache.upsert_pod(Arc::new(terminating));
        }
        self.stats
            .preempted
            .fetch_add(p.victims.len() as u64, Ordering::Relaxed);
        tracing::info!(pod = %pod.key, node = p.node_name, victims = p.victims.len(), "preempting");
        let api = Arc::clone(&self.api);
        let preemptor = Arc::clone(pod);
        tokio::spawn(async move {
            for victim in &p.victims {
                evict(&api, victim, &preemptor, &p.node_name).await;
            }
        });
    }
}

fn pod_ref(pod: &PodInfo) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: "v1".to_owned(),
        kind: "Pod".to_owned(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
    }
}

/// Deletes a victim gracefully and records `Preempted` on it.
async fn evict<S: Store>(api: &ObjectsApi<S>, victim: &PodInfo, preemptor: &PodInfo, node: &str) {
    let request = v1::DeleteRequest {
        r#ref: Some(pod_ref(victim)),
        propagation: String::new(),
        grace_period_seconds: None,
    };
    match api.delete(&request).await {
        Ok(_) | Err(ApiError::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(pod = %victim.key, error = %e, "preemption: delete victim");
            return;
        }
    }
    let message = format!("Preempted by pod {} on node {node}", preemptor.uid);
    events::record(
        api,
        &victim.meta,
        EventType::Normal,
        "Preempted",
        &message,
        SCHEDULER_NAME,
    )
    .await;
}

/// Sets `PodScheduled=False/Unschedulable` with `message` (and
/// `nominatedNodeName`), read-modify-write with the resource version.
async fn report_unschedulable<S: Store>(
    api: &ObjectsApi<S>,
    pod: &PodInfo,
    message: &str,
    nominated: Option<&str>,
) {
    let r = pod_ref(pod);
    for _ in 0..STATUS_ATTEMPTS {
        let object = match api.get(&r).await {
            Ok(o) => o,
            Err(ApiError::NotFound { .. }) => return,
            Err(e) => {
                tracing::warn!(pod = %pod.key, error = %e, "unschedulable status: read");
                return;
            }
        };
        let Ok(doc) = serde_json::from_str::<Value>(&object.json) else {
            return;
        };
        let meta = object.meta.unwrap_or_default();
        let bound = doc["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        if meta.uid != pod.uid || bound {
            return;
        }
        let status = unschedulable_status(doc.get("status"), message, nominated);
        let request = v1::UpdateStatusRequest {
            r#ref: Some(r.clone()),
            status_json: status.to_string(),
            resource_version: meta.resource_version,
        };
        match api.update_status(&request).await {
            Ok(_) | Err(ApiError::NotFound { .. }) => return,
            Err(ApiError::Conflict { .. }) => {}
            Err(e) => {
                tracing::warn!(pod = %pod.key, error = %e, "unschedulable status: write");
                return;
            }
        }
    }
}

/// `status` with the `PodScheduled=False` condition set (its transition
/// time kept if it was already False) and `nominatedNodeName`.
pub(super) fn unschedulable_status(
    status: Option<&Value>,
    message: &str,
    nominated: Option<&str>,
) -> Value {
    let mut status = status
        .filter(|s| s.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    let now = crate::api::now().to_string();
    let mut conditions: Vec<Value> = status["conditions"].as_array().cloned().unwrap_or_default();
    let previous = conditions
        .iter()
        .position(|c| c["type"] == "PodScheduled")
        .map(|i| conditions.remove(i));
    let since = previous
        .filter(|c| c["status"] == "False")
        .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_owned))
        .unwrap_or_else(|| now.clone());
    conditions.push(json!({
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
        "lastProbeTime": null,
        "lastTransitionTime": since,
    }));
    status["conditions"] = Value::Array(conditions);
    if status.get("phase").is_none() {
        status["phase"] = json!("Pending");
    }
    if let Some(node) = nominated {
        status["nominatedNodeName"] = json!(node);
    }
    status
}

type ListFn = fn(&[v1::Object]) -> Msg;
type EventFn = fn(v1::EventType, &v1::Object) -> Option<Msg>;

fn nodes_listed(items: &[v1::Object]) -> Msg {
    Msg::NodesListed(
        items
            .iter()
            .filter_map(|o| decoded(node_from_object(o)))
            .collect(),
    )
}

fn pods_listed(items: &[v1::Object]) -> Msg {
    Msg::PodsListed(
        items
            .iter()
            .filter_map(|o| decoded(pod_from_object(o)).map(Arc::new))
            .collect(),
    )
}

fn node_event(kind: v1::EventType, object: &v1::Object) -> Option<Msg> {
    match kind {
        v1::EventType::Deleted => Some(Msg::NodeDeleted(object.meta.as_ref()?.name.clone())),
        _ => decoded(node_from_object(object)).map(Msg::Node),
    }
}

fn pod_event(kind: v1::EventType, object: &v1::Object) -> Option<Msg> {
    match kind {
        v1::EventType::Deleted => {
            let meta = object.meta.as_ref()?;
            let ns = if meta.namespace.is_empty() {
                "default"
            } else {
                &meta.namespace
            };
            Some(Msg::PodDeleted(format!("{ns}/{}", meta.name).into()))
        }
        _ => decoded(pod_from_object(object)).map(|p| Msg::Pod(Arc::new(p))),
    }
}

fn decoded<T>(r: Result<T, super::model::DecodeError>) -> Option<T> {
    r.map_err(|e| tracing::warn!(error = %e, "scheduler: skipping object"))
        .ok()
}

/// List then watch `kind` for ever, re-listing when the watch breaks or is
/// compacted; stops when the loop is gone.
async fn inform<S: Store>(
    api: Arc<ObjectsApi<S>>,
    kind: &'static str,
    tx: mpsc::Sender<Msg>,
    on_list: ListFn,
    on_event: EventFn,
) {
    loop {
        let list = match api
            .list(&v1::ListRequest {
                kind: kind.to_owned(),
                ..Default::default()
            })
            .await
        {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(kind, error = %e, "scheduler: list");
                tokio::time::sleep(RELIST_DELAY).await;
                continue;
            }
        };
        if tx.send(on_list(&list.items)).await.is_err() {
            return;
        }
        if list.revision == 0 {
            // An empty store: a watch "from 0" means "from now", which
            // could miss writes made since the list; list again instead.
            tokio::time::sleep(RELIST_DELAY / 4).await;
            continue;
        }
        let mut stream = match api
            .watch(&v1::WatchRequest {
                kind: kind.to_owned(),
                from_revision: list.revision,
                ..Default::default()
            })
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(kind, error = %e, "scheduler: watch");
                tokio::time::sleep(RELIST_DELAY).await;
                continue;
            }
        };
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(e) => e,
                Err(status) => {
                    tracing::warn!(kind, error = %status.message(), "scheduler: watch broke, re-listing");
                    break;
                }
            };
            let Ok(t) = v1::EventType::try_from(event.r#type) else {
                continue;
            };
            if t == v1::EventType::Error {
                tracing::info!(
                    kind,
                    error = event.error,
                    "scheduler: watch compacted, re-listing"
                );
                break;
            }
            let Some(object) = &event.object else {
                continue;
            };
            if let Some(m) = on_event(t, object)
                && tx.send(m).await.is_err()
            {
                return;
            }
        }
        tokio::time::sleep(RELIST_DELAY).await;
    }
}
