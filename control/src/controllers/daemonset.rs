//! The `DaemonSet` controller: one pod per eligible node (`nodeSelector`,
//! required node affinity, taints against the pod's tolerations plus the
//! ones Kubernetes adds to daemon pods), each pinned to its node by a
//! required `matchFields metadata.name In [node]` affinity (the scheduler
//! binds it); rolling update bounded by `maxUnavailable`; status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodTemplateSpec, Toleration,
};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cache::BY_OWNER;
use super::client::Error;
use super::pods::{self, Owner};
use super::queue::WorkQueue;
use super::{Action, Ctx, all_keys, changed, drive, forward, forward_own, meta, queue_all};
use crate::api::Kind;
use crate::store::Store;

/// The event source of this controller.
pub const COMPONENT: &str = "daemonset-controller";
/// The label carrying the hash of the template a daemon pod was made from.
pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";

/// Starts the controller: its queue feeders and its worker.
pub(crate) fn start<S: Store>(
    ctx: &Arc<Ctx<S>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let queue = WorkQueue::new();
    let from_ds = forward_own(&ctx.daemonsets, &queue, shutdown);
    let daemonsets = Arc::clone(&ctx.daemonsets);
    let from_nodes = forward(
        ctx.nodes.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        move |_| all_keys(&daemonsets),
    );
    let from_pods = forward(
        ctx.pods.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        move |change| {
            changed(change)
                .into_iter()
                .filter_map(|pod| meta::controller_key(&pod.metadata, "DaemonSet"))
                .collect()
        },
    );
    queue_all(&ctx.daemonsets, &queue);
    let worker = drive(COMPONENT, ctx, queue, shutdown, |ctx, key| async move {
        reconcile(&ctx, &key).await
    });
    vec![from_ds, from_nodes, from_pods, worker]
}

/// The tolerations Kubernetes adds to every daemon pod.
pub fn daemon_tolerations() -> Vec<Toleration> {
    let exists = |key: &str, effect: &str| Toleration {
        key: Some(key.to_owned()),
        operator: Some("Exists".to_owned()),
        effect: Some(effect.to_owned()),
        ..Toleration::default()
    };
    vec![
        exists("node.kubernetes.io/not-ready", "NoExecute"),
        exists("node.kubernetes.io/unreachable", "NoExecute"),
        exists("node.kubernetes.io/disk-pressure", "NoSchedule"),
        exists("node.kubernetes.io/memory-pressure", "NoSchedule"),
        exists("node.kubernetes.io/pid-pressure", "NoSchedule"),
        exists("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

/// The template daemon pods are made from: the `DaemonSet`'s plus the
/// standard tolerations (not duplicated) and the revision hash label.
pub fn daemon_template(ds: &DaemonSet) -> PodTemplateSpec {
    let mut template = ds.spec.template.clone();
    let hash = meta::template_hash(&ds.spec.template, 0);
    let spec = template.spec.get_or_insert_with(Default::default);
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for t in daemon_tolerations() {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(REVISION_HASH_LABEL.to_owned(), hash);
    template
}

/// Whether a daemon pod should run on a node, and whether one already
/// there may keep running, as Kubernetes' `NodeShouldRunDaemonPod`: the
/// node must be selected, with no untolerated `NoSchedule`/`NoExecute` taint
/// to start and no untolerated `NoExecute` taint to continue.
pub fn should_run(template: &PodTemplateSpec, node: &Node) -> (bool, bool) {
    if !meta::node_selected(template, node) {
        return (false, false);
    }
    let tolerations = template
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let untolerated = |effect: &str| {
        taints
            .iter()
            .any(|t| t.effect == effect && meta::toleration_for(&tolerations, t).is_none())
    };
    let no_execute = untolerated("NoExecute");
    (!no_execute && !untolerated("NoSchedule"), !no_execute)
}

/// A daemon pod for `node`: the template pinned to the node by a required
/// node affinity on `metadata.name` (replacing any other required terms,
/// which the node already satisfies).
pub fn pod_for_node(ds: &DaemonSet, template: &PodTemplateSpec, node: &str) -> Pod {
    let mut pod = pods::pod_from_template(Kind::DaemonSet, &ds.metadata, template);
    let spec = pod.spec.get_or_insert_with(Default::default);
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    node_affinity.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_expressions: None,
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".to_owned(),
                operator: "In".to_owned(),
                values: Some(vec![node.to_owned()]),
            }]),
        }],
    });
    pod
}

/// The node a daemon pod is for: where it is bound, else its pinned node.
pub fn target_node(pod: &Pod) -> Option<String> {
    let bound = meta::pod_node(pod);
    if !bound.is_empty() {
        return Some(bound.to_owned());
    }
    let terms = &pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|r| r.key == "metadata.name" && r.operator == "In")
        .and_then(|r| r.values.as_ref()?.first().cloned())
}

/// One node's daemon pods and what the `DaemonSet` wants there.
#[derive(Debug, Clone)]
pub struct NodeState {
    /// The node's name.
    pub node: String,
    /// A daemon pod should be started here.
    pub should_run: bool,
    /// A daemon pod here may keep running.
    pub should_continue: bool,
    /// Its active daemon pods.
    pub pods: Vec<Arc<Pod>>,
    /// Whether a daemon pod here is terminating.
    pub terminating: bool,
}

/// What one reconcile does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Nodes that need a pod.
    pub create_on: Vec<String>,
    /// Pods to delete (by name).
    pub delete: Vec<String>,
}

/// Decides creates and deletes, rolling update included: on nodes that
/// should run the daemon, a missing pod is created (unless one is still
/// terminating), extra pods go, failed pods go; on nodes that must not,
/// every pod goes. With `RollingUpdate` (`max_unavailable` is `Some`), pods
/// from an old template are replaced while at most `max_unavailable` of the
/// nodes lack an available daemon pod; with `OnDelete` (`None`) they stay
/// until someone deletes them, and their replacements get the new template.
pub fn plan(
    nodes: &[NodeState],
    hash: &str,
    max_unavailable: Option<i32>,
    min_ready_seconds: i32,
    now: Timestamp,
) -> Plan {
    let replace_old = max_unavailable.is_some();
    let mut plan = Plan::default();
    let name = |p: &Pod| meta::name(&p.metadata).to_owned();
    let failed = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed");
    let available = |p: &Pod| meta::pod_available(p, min_ready_seconds, now) == Ok(true);
    let current = |p: &Pod| {
        meta::labels(&p.metadata)
            .get(REVISION_HASH_LABEL)
            .map(String::as_str)
            == Some(hash)
    };
    let mut unavailable = 0;
    let mut old_available = Vec::new();
    for n in nodes {
        if !n.should_continue {
            plan.delete.extend(n.pods.iter().map(|p| name(p)));
            continue;
        }
        if !n.should_run {
            continue;
        }
        let (failed_pods, mut running): (Vec<_>, Vec<_>) = n.pods.iter().partition(|p| failed(p));
        plan.delete.extend(failed_pods.iter().map(|p| name(p)));
        if running.is_empty() {
            if !n.terminating {
                plan.create_on.push(n.node.clone());
            }
            unavailable += 1;
            continue;
        }
        // Keep the oldest; the rest are duplicates.
        running.sort_by_key(|p| p.metadata.creation_timestamp.clone());
        plan.delete.extend(running[1..].iter().map(|p| name(p)));
        let kept = running[0];
        if current(kept) || !replace_old {
            if !available(kept) {
                unavailable += 1;
            }
        } else if !available(kept) {
            // Old and not serving anyway: replace it at no cost.
            unavailable += 1;
            plan.delete.push(name(kept));
        } else {
            old_available.push(name(kept));
        }
    }
    let budget = usize::try_from(max_unavailable.unwrap_or(0) - unavailable).unwrap_or(0);
    plan.delete.extend(old_available.into_iter().take(budget));
    plan
}

/// The status for a `DaemonSet` given its per-node state.
pub fn status_of(
    ds: &DaemonSet,
    nodes: &[NodeState],
    hash: &str,
    now: Timestamp,
) -> DaemonSetStatus {
    let min_ready = ds.spec.min_ready_seconds.unwrap_or(0);
    let (mut desired, mut current, mut misscheduled, mut ready, mut updated, mut available) =
        (0, 0, 0, 0, 0, 0);
    for n in nodes {
        if !n.should_run {
            if !n.pods.is_empty() {
                misscheduled += 1;
            }
            continue;
        }
        desired += 1;
        let Some(pod) = n.pods.first() else { continue };
        current += 1;
        if meta::pod_ready(pod) {
            ready += 1;
        }
        if meta::pod_available(pod, min_ready, now) == Ok(true) {
            available += 1;
        }
        if meta::labels(&pod.metadata)
            .get(REVISION_HASH_LABEL)
            .map(String::as_str)
            == Some(hash)
        {
            updated += 1;
        }
    }
    DaemonSetStatus {
        desired_number_scheduled: desired,
        current_number_scheduled: current,
        number_misscheduled: misscheduled,
        number_ready: ready,
        updated_number_scheduled: Some(updated),
        number_available: Some(available),
        number_unavailable: Some(desired - available),
        observed_generation: ds.metadata.generation,
        collision_count: ds.status.as_ref().and_then(|s| s.collision_count),
        conditions: ds.status.as_ref().and_then(|s| s.conditions.clone()),
    }
}

/// `maxUnavailable` of a `DaemonSet`'s rolling update resolved against the
/// nodes that should run it (rounded up, default 1); `None` for `OnDelete`.
fn max_unavailable(ds: &DaemonSet, desired: i32) -> Result<Option<i32>, String> {
    let strategy = ds.spec.update_strategy.clone().unwrap_or_default();
    match strategy.type_.as_deref().unwrap_or("RollingUpdate") {
        "OnDelete" => Ok(None),
        "RollingUpdate" => {
            let ru = strategy.rolling_update.unwrap_or_default();
            let n = match &ru.max_unavailable {
                None => 1,
                Some(v) => meta::scaled_value(Some(v), "", desired, true)?,
            };
            // maxSurge is not supported: a zero budget would never progress.
            Ok(Some(n.max(1)))
        }
        other => Err(format!("{other:?} is not one of RollingUpdate, OnDelete")),
    }
}

/// Reconciles one `DaemonSet` against every node.
async fn reconcile<S: Store>(ctx: &Ctx<S>, key: &str) -> Result<Action, Error> {
    let Some(ds) = ctx.daemonsets.get(key) else {
        return Ok(Action::Done);
    };
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::Done);
    }
    let owner = Owner {
        kind: Kind::DaemonSet,
        meta: &ds.metadata,
        component: COMPONENT,
    };
    pods::claim_pods(ctx, &owner, &ds.spec.selector).await?;
    let template = daemon_template(&ds);
    let hash = meta::template_hash(&ds.spec.template, 0);
    let nodes = node_states(ctx, &ds, &template);
    let desired = i32::try_from(nodes.iter().filter(|n| n.should_run).count()).unwrap_or(i32::MAX);
    let now = meta::now();
    let max_unavailable = max_unavailable(&ds, desired).map_err(|reason| Error::Spec {
        kind: "DaemonSet",
        key: key.to_owned(),
        field: "spec.updateStrategy",
        reason,
    })?;
    let plan = plan(
        &nodes,
        &hash,
        max_unavailable,
        ds.spec.min_ready_seconds.unwrap_or(0),
        now,
    );
    let doomed: Vec<Arc<Pod>> = nodes
        .iter()
        .flat_map(|n| n.pods.iter())
        .filter(|p| plan.delete.iter().any(|d| d == meta::name(&p.metadata)))
        .cloned()
        .collect();
    let deleted = pods::delete_pods(ctx, &owner, &doomed).await;
    let new: Vec<Pod> = plan
        .create_on
        .iter()
        .map(|node| pod_for_node(&ds, &template, node))
        .collect();
    let created = pods::create_pods(ctx, &owner, new).await;
    let nodes = node_states(ctx, &ds, &template);
    let generation = ds.metadata.generation;
    ctx.client
        .update_status(&ctx.daemonsets, &ds, |ds: &DaemonSet| {
            // A spec change since our read requeues us; don't claim to
            // have observed it.
            if ds.metadata.generation != generation {
                return None;
            }
            let status = status_of(ds, &nodes, &hash, now);
            (ds.status.as_ref() != Some(&status)).then_some(status)
        })
        .await?;
    deleted?;
    created?;
    Ok(Action::Done)
}

/// Every node with the `DaemonSet`'s pods on (or pinned to) it; pods for
/// nodes that no longer exist are listed under their node as ineligible.
fn node_states<S: Store>(
    ctx: &Ctx<S>,
    ds: &DaemonSet,
    template: &PodTemplateSpec,
) -> Vec<NodeState> {
    let mut by_node: HashMap<String, (Vec<Arc<Pod>>, bool)> = HashMap::new();
    for pod in ctx.pods.by_index(BY_OWNER, meta::uid(&ds.metadata)) {
        let Some(node) = target_node(&pod) else {
            continue;
        };
        let entry = by_node.entry(node).or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            entry.1 = true;
        } else if meta::pod_active(&pod)
            || pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
        {
            entry.0.push(pod);
        }
    }
    let mut states: Vec<NodeState> = ctx
        .nodes
        .list()
        .iter()
        .map(|node| {
            let name = meta::name(&node.metadata).to_owned();
            let (should_run, should_continue) = should_run(template, node);
            let (pods, terminating) = by_node.remove(&name).unwrap_or_default();
            NodeState {
                node: name,
                should_run,
                should_continue,
                pods,
                terminating,
            }
        })
        .collect();
    states.extend(
        by_node
            .into_iter()
            .map(|(node, (pods, terminating))| NodeState {
                node,
                should_run: false,
                should_continue: false,
                pods,
                terminating,
            }),
    );
    states
}

#[cfg(test)]
mod tests;
