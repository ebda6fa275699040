//! The node lifecycle controller (contract item 7): a node whose `Ready`
//! heartbeat is older than the grace period becomes `Ready=Unknown` and is
//! tainted `node.kubernetes.io/unreachable` (`NoSchedule` and `NoExecute`;
//! `Ready=False` gets `node.kubernetes.io/not-ready`); pods on a node with
//! `NoExecute` taints they don't tolerate are evicted (graceful delete),
//! after their `tolerationSeconds` if they have them; the taints go when the
//! node heartbeats again. Pods bound to a node whose Node object is gone are
//! deleted at once (grace 0).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cache::BY_NODE;
use super::client::Error;
use super::queue::WorkQueue;
use super::{Action, Ctx, changed, drive, forward, meta};
use crate::api::Kind;
use crate::events::EventType;
use crate::matching;
use crate::store::Store;

/// The event source of this controller.
pub const COMPONENT: &str = "node-controller";
/// Taint key for nodes whose status is unknown (missed heartbeats).
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// Taint key for nodes that report `Ready=False`.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// Starts the controller: its queue feeders, its timer and its worker.
pub(crate) fn start<S: Store>(
    ctx: &Arc<Ctx<S>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let queue = WorkQueue::new();
    let from_nodes = forward(
        ctx.nodes.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        |change| {
            changed(change)
                .into_iter()
                .map(|n| meta::name(&n.metadata).to_owned())
                .collect()
        },
    );
    // A pod change matters when its node is gone or evicting.
    let nodes = Arc::clone(&ctx.nodes);
    let from_pods = forward(
        ctx.pods.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        move |change| {
            changed(change)
                .into_iter()
                .map(|p| meta::pod_node(p).to_owned())
                .filter(|node| {
                    !node.is_empty()
                        && nodes
                            .get(node)
                            .is_none_or(|n| !no_execute_taints(&n).is_empty())
                })
                .collect()
        },
    );
    let ticker = {
        let ctx = Arc::clone(ctx);
        let queue = Arc::clone(&queue);
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ctx.config.node_monitor_period);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                for key in all_node_keys(&ctx) {
                    queue.add(&key);
                }
            }
        })
    };
    let probes = Arc::new(Probes::default());
    let worker = drive(COMPONENT, ctx, queue, shutdown, move |ctx, key| {
        let probes = Arc::clone(&probes);
        async move { reconcile(&ctx, &probes, &key).await }
    });
    vec![from_nodes, from_pods, ticker, worker]
}

/// Every node, plus every node name pods are bound to (some may be gone).
fn all_node_keys<S: Store>(ctx: &Ctx<S>) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = ctx
        .nodes
        .list()
        .iter()
        .map(|n| meta::name(&n.metadata).to_owned())
        .collect();
    keys.extend(
        ctx.pods
            .list()
            .iter()
            .map(|p| meta::pod_node(p).to_owned())
            .filter(|n| !n.is_empty()),
    );
    keys
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// A node's `NoExecute` taints.
pub fn no_execute_taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|t| {
            t.iter()
                .filter(|t| t.effect == "NoExecute")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// What the heartbeat check concludes about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Write `Ready=Unknown`: the heartbeat is overdue and the node doesn't
    /// say so yet.
    pub mark_unknown: bool,
    /// The `Ready` status after that: `True`, `False` or `Unknown`; `None`
    /// for a new node that hasn't reported yet (its taints are left alone).
    pub ready: Option<String>,
    /// When to check again if nothing happens (the heartbeat deadline).
    pub recheck: Option<Duration>,
}

/// Checks a node's heartbeat against the grace period: the later of the
/// last `Ready.lastHeartbeatTime` (else the node's creation) and `observed`
/// (when this controller first saw that heartbeat, see [`Probes`]) plus
/// `grace`.
pub fn verdict(
    node: &Node,
    grace: Duration,
    now: Timestamp,
    observed: Option<Timestamp>,
) -> Verdict {
    let ready = ready_condition(node);
    let status = ready.map(|c| c.status.clone());
    let last = ready
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .or(node.metadata.creation_timestamp.as_ref())
        .map_or(now, |t| t.0);
    let last = observed.map_or(last, |o| o.max(last));
    let deadline = last + SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    if deadline <= now {
        return Verdict {
            mark_unknown: status.as_deref() != Some("Unknown"),
            ready: Some("Unknown".to_owned()),
            recheck: None,
        };
    }
    let left = std::time::Duration::try_from(deadline.duration_since(now)).unwrap_or_default();
    Verdict {
        mark_unknown: false,
        ready: status,
        recheck: Some(left),
    }
}

/// The node's taints with the lifecycle taints matching `ready` (unreachable
/// for `Unknown`, not-ready for `False`, none for `True`), keeping each
/// kept taint's `timeAdded`; `None` if nothing changes.
pub fn desired_taints(current: &[Taint], ready: &str, now: Timestamp) -> Option<Vec<Taint>> {
    let want_key = match ready {
        "Unknown" => Some(UNREACHABLE),
        "False" => Some(NOT_READY),
        _ => None,
    };
    let managed = |t: &Taint| t.key == UNREACHABLE || t.key == NOT_READY;
    let mut out: Vec<Taint> = current
        .iter()
        .filter(|t| !managed(t) || Some(t.key.as_str()) == want_key)
        .cloned()
        .collect();
    if let Some(key) = want_key {
        for effect in ["NoSchedule", "NoExecute"] {
            if !out.iter().any(|t| t.key == key && t.effect == effect) {
                out.push(Taint {
                    key: key.to_owned(),
                    effect: effect.to_owned(),
                    value: None,
                    time_added: Some(Time(now)),
                });
            }
        }
    }
    (out != current).then_some(out)
}

/// When a pod on a node with `taints` (its `NoExecute` ones) must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Tolerates them all forever.
    Never,
    /// Now: a taint is not tolerated, or its tolerationSeconds are over.
    Now,
    /// After this long (the shortest `tolerationSeconds` left).
    After(Duration),
}

/// Kubernetes' taint manager decision for one pod.
pub fn eviction(pod: &Pod, taints: &[Taint], now: Timestamp) -> Eviction {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let mut due: Option<Timestamp> = None;
    for taint in taints.iter().filter(|t| t.effect == "NoExecute") {
        let matching: Vec<_> = tolerations
            .iter()
            .filter(|t| matching::tolerates_taint(t, taint))
            .collect();
        if matching.is_empty() {
            return Eviction::Now;
        }
        let Some(seconds) = matching.iter().filter_map(|t| t.toleration_seconds).min() else {
            continue;
        };
        let since = taint.time_added.as_ref().map_or(now, |t| t.0);
        let at = since + SignedDuration::from_secs(seconds.max(0));
        due = Some(due.map_or(at, |d| d.min(at)));
    }
    match due {
        None => Eviction::Never,
        Some(at) if at <= now => Eviction::Now,
        Some(at) => Eviction::After(
            std::time::Duration::try_from(at.duration_since(now)).unwrap_or_default(),
        ),
    }
}

/// When this controller first saw each node's current heartbeat, by its own
/// clock (kube-controller-manager's probe timestamps). A control plane that
/// was down, or has just started, gives every node a full grace period from
/// the moment it sees it, instead of judging heartbeats that had nowhere to
/// go; a node whose heartbeat stops changing runs out of grace as before.
#[derive(Debug, Default)]
pub struct Probes(Mutex<HashMap<String, (Option<Timestamp>, Timestamp)>>);

impl Probes {
    /// Records `node`'s heartbeat as seen `now`; when it was first seen.
    pub fn observe(&self, node: &Node, now: Timestamp) -> Timestamp {
        let heartbeat = ready_condition(node)
            .and_then(|c| c.last_heartbeat_time.as_ref())
            .map(|t| t.0);
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = seen
            .entry(meta::name(&node.metadata).to_owned())
            .or_insert((heartbeat, now));
        if entry.0 != heartbeat {
            *entry = (heartbeat, now);
        }
        entry.1
    }

    fn forget(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }
}

/// Checks one node: heartbeat, taints, evictions; or, if the node is gone,
/// force-deletes the pods still bound to it.
async fn reconcile<S: Store>(ctx: &Ctx<S>, probes: &Probes, name: &str) -> Result<Action, Error> {
    let Some(node) = ctx.nodes.get(name) else {
        probes.forget(name);
        return delete_orphans(ctx, name).await;
    };
    let now = meta::now();
    let grace = ctx.config.node_monitor_grace_period;
    let observed = Some(probes.observe(&node, now));
    let first = verdict(&node, grace, now, observed);
    if first.mark_unknown {
        mark_unknown(ctx, &node, now, observed).await?;
    }
    let node = ctx.nodes.get(name).unwrap_or(node);
    // Compare-and-swap on the node as read; on a conflict (a heartbeat, a
    // cordon) the taints are recomputed from the node as stored.
    let node = ctx
        .client
        .update(&ctx.nodes, "taint", &node, COMPONENT, |node| {
            let Some(ready) = verdict(node, grace, now, observed).ready else {
                return false;
            };
            let taints = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            let Some(taints) = desired_taints(&taints, &ready, now) else {
                return false;
            };
            tracing::info!(node = name, ready, "node-controller: updating taints");
            node.spec.get_or_insert_with(Default::default).taints =
                (!taints.is_empty()).then_some(taints);
            true
        })
        .await?;
    let evict_after = evict(ctx, &node, now).await?;
    Ok(Action::after(first.recheck).min(Action::after(evict_after)))
}

/// Writes `Ready=Unknown` (heartbeat kept), compare-and-swap so a fresh
/// heartbeat wins (the verdict is taken again on the node as stored), and
/// records `NodeNotReady`.
async fn mark_unknown<S: Store>(
    ctx: &Ctx<S>,
    node: &Arc<Node>,
    now: Timestamp,
    observed: Option<Timestamp>,
) -> Result<(), Error> {
    let grace = ctx.config.node_monitor_grace_period;
    let mut marked = false;
    ctx.client
        .update_status(&ctx.nodes, node, |node: &Node| {
            marked = verdict(node, grace, now, observed).mark_unknown;
            marked.then(|| unknown_status(node, now))
        })
        .await?;
    if !marked {
        return Ok(());
    }
    let name = meta::name(&node.metadata);
    tracing::warn!(
        node = name,
        "node-controller: heartbeat overdue, marked Ready=Unknown"
    );
    let message = format!("Node {name} status is now: NodeNotReady");
    ctx.client
        .event(
            Kind::Node,
            &node.metadata,
            EventType::Normal,
            "NodeNotReady",
            &message,
            COMPONENT,
        )
        .await;
    Ok(())
}

/// A node's status with `Ready=Unknown` (its last heartbeat time kept).
fn unknown_status(node: &Node, now: Timestamp) -> NodeStatus {
    let mut status = node.status.clone().unwrap_or_default();
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    let unknown = NodeCondition {
        type_: "Ready".to_owned(),
        status: "Unknown".to_owned(),
        reason: Some("NodeStatusUnknown".to_owned()),
        message: Some("Kubelet stopped posting node status.".to_owned()),
        last_transition_time: Some(Time(now)),
        last_heartbeat_time: None,
    };
    match conditions.iter_mut().find(|c| c.type_ == "Ready") {
        Some(c) => {
            *c = NodeCondition {
                last_heartbeat_time: c.last_heartbeat_time.clone(),
                ..unknown
            };
        }
        None => conditions.push(unknown),
    }
    status
}

/// Evicts the node's pods that don't tolerate its `NoExecute` taints;
/// returns when the next toleration runs out.
async fn evict<S: Store>(
    ctx: &Ctx<S>,
    node: &Node,
    now: Timestamp,
) -> Result<Option<Duration>, Error> {
    let taints = no_execute_taints(node);
    if taints.is_empty() {
        return Ok(None);
    }
    let mut next: Option<Duration> = None;
    let mut first_error = None;
    for pod in ctx.pods.by_index(BY_NODE, meta::name(&node.metadata)) {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match eviction(&pod, &taints, now) {
            Eviction::Never => {}
            Eviction::After(d) => next = Some(next.map_or(d, |n| n.min(d))),
            Eviction::Now => {
                let message = format!(
                    "Marking for deletion Pod {}/{}",
                    meta::namespace(&pod.metadata),
                    meta::name(&pod.metadata)
                );
                ctx.client
                    .event(
                        Kind::Pod,
                        &pod.metadata,
                        EventType::Normal,
                        "TaintManagerEviction",
                        &message,
                        COMPONENT,
                    )
                    .await;
                if let Err(e) = ctx.client.delete(&ctx.pods, &pod.metadata, None).await {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(next),
    }
}

/// Force-deletes pods bound to a node that has no Node object.
async fn delete_orphans<S: Store>(ctx: &Ctx<S>, node: &str) -> Result<Action, Error> {
    let pods = ctx.pods.by_index(BY_NODE, node);
    // The pod cache may be ahead of the node cache: ask the store.
    if pods.is_empty() || ctx.client.exists(Kind::Node, "", node).await? {
        return Ok(Action::Done);
    }
    let mut first_error = None;
    for pod in ctx.pods.by_index(BY_NODE, node) {
        tracing::info!(
            node,
            pod = meta::name(&pod.metadata),
            "node-controller: deleting pod of a deleted node"
        );
        ctx.client
            .event(
                Kind::Pod,
                &pod.metadata,
                EventType::Normal,
                "NodeNotFound",
                &format!("Deleting pod: node {node} no longer exists"),
                COMPONENT,
            )
            .await;
        if let Err(e) = ctx.client.delete(&ctx.pods, &pod.metadata, Some(0)).await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(Action::Done), Err)
}

#[cfg(test)]
mod tests;
