//! The `ReplicaSet` controller: keeps `spec.replicas` active pods from the
//! template, adopting matching orphans, deleting surplus pods in
//! Kubernetes' order, and reporting status (replicas, fully labeled, ready,
//! available after `minReadySeconds`, observed generation).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cache::{self, Change};
use super::client::Error;
use super::pods::{self, Owner};
use super::queue::WorkQueue;
use super::{Action, Ctx, changed, drive, forward, forward_own, meta, queue_all};
use crate::api::Kind;
use crate::matching;
use crate::store::Store;

/// The event source of this controller.
pub const COMPONENT: &str = "replicaset-controller";

/// Starts the controller: its queue feeders and its worker.
pub(crate) fn start<S: Store>(
    ctx: &Arc<Ctx<S>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let queue = WorkQueue::new();
    let from_rs = forward_own(&ctx.replicasets, &queue, shutdown);
    let rs_cache = Arc::clone(&ctx.replicasets);
    let from_pods = forward(
        ctx.pods.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        move |change| match change {
            Change::Resync => Vec::new(),
            _ => changed(change)
                .into_iter()
                .flat_map(|pod| owners_of_pod(&rs_cache, pod))
                .collect(),
        },
    );
    queue_all(&ctx.replicasets, &queue);
    let worker = drive(COMPONENT, ctx, queue, shutdown, |ctx, key| async move {
        reconcile(&ctx, &key).await
    });
    vec![from_rs, from_pods, worker]
}

/// The `ReplicaSets` a pod change concerns: its controller if that is a
/// `ReplicaSet`, else (an orphan) those in its namespace that select it.
fn owners_of_pod(rs_cache: &cache::Cache<ReplicaSet>, pod: &Pod) -> Vec<String> {
    let ns = meta::namespace(&pod.metadata);
    match meta::controller_of(&pod.metadata) {
        Some(owner) if owner.kind == "ReplicaSet" => vec![format!("{ns}/{}", owner.name)],
        Some(_) => Vec::new(),
        None => rs_cache
            .list_namespace(ns)
            .iter()
            .filter(|rs| {
                !meta::selector_is_empty(&rs.spec.selector)
                    && matching::selector_matches(&rs.spec.selector, meta::labels(&pod.metadata))
            })
            .map(|rs| cache::key_of(&rs.metadata))
            .collect(),
    }
}

/// Brings one `ReplicaSet`'s pods to its replica count and updates its status.
async fn reconcile<S: Store>(ctx: &Ctx<S>, key: &str) -> Result<Action, Error> {
    let Some(rs) = ctx.replicasets.get(key) else {
        return Ok(Action::Done);
    };
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::Done);
    }
    let spec = rs.spec.clone();
    let owner = Owner {
        kind: Kind::ReplicaSet,
        meta: &rs.metadata,
        component: COMPONENT,
    };
    let pods = pods::claim_pods(ctx, &owner, &spec.selector).await?;
    let active: Vec<Arc<Pod>> = pods.into_iter().filter(|p| meta::pod_active(p)).collect();
    let want = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or_default();
    let burst = ctx.config.burst_replicas;
    let managed = match active.len().cmp(&want) {
        std::cmp::Ordering::Less => {
            let Some(template) = &spec.template else {
                return Err(Error::Spec {
                    kind: "ReplicaSet",
                    key: key.to_owned(),
                    field: "spec.template",
                    reason: "required to create pods".to_owned(),
                });
            };
            let count = (want - active.len()).min(burst);
            let new: Vec<Pod> = (0..count)
                .map(|_| pods::pod_from_template(Kind::ReplicaSet, &rs.metadata, template))
                .collect();
            pods::create_pods(ctx, &owner, new).await.map(drop)
        }
        std::cmp::Ordering::Greater => {
            let count = (active.len() - want).min(burst);
            let doomed = pods_to_delete(&active, count);
            pods::delete_pods(ctx, &owner, &doomed).await
        }
        std::cmp::Ordering::Equal => Ok(()),
    };
    let now = meta::now();
    let current: Vec<Arc<Pod>> = ctx
        .pods
        .by_index(cache::BY_OWNER, meta::uid(&rs.metadata))
        .into_iter()
        .filter(|p| meta::pod_active(p))
        .collect();
    let mut recheck = None;
    let generation = rs.metadata.generation;
    ctx.client
        .update_status(&ctx.replicasets, &rs, |rs: &ReplicaSet| {
            // A spec change since our read requeues us; don't claim to
            // have observed it.
            if rs.metadata.generation != generation {
                return None;
            }
            let (status, after) = status_of(rs, &current, now);
            recheck = after;
            (rs.status.as_ref() != Some(&status)).then_some(status)
        })
        .await?;
    managed?;
    // More to do than one burst allowed: come back at once.
    let more = (active.len() < want && want - active.len() > burst)
        || (active.len() > want && active.len() - want > burst);
    if more {
        return Ok(Action::RequeueAfter(Duration::ZERO));
    }
    Ok(Action::after(recheck))
}

/// The status a `ReplicaSet` should report for its active pods, and when
/// to look again (a pod that becomes available after `minReadySeconds`).
pub fn status_of(
    rs: &ReplicaSet,
    active: &[Arc<Pod>],
    now: Timestamp,
) -> (ReplicaSetStatus, Option<Duration>) {
    let spec = &rs.spec;
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .map(|m| meta::labels(m).clone())
        .unwrap_or_default();
    let mut ready = 0;
    let mut available = 0;
    let mut fully_labeled = 0;
    let mut recheck: Option<Duration> = None;
    for pod in active {
        let labels = meta::labels(&pod.metadata);
        if template_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
        {
            fully_labeled += 1;
        }
        if meta::pod_ready(pod) {
            ready += 1;
        }
        match meta::pod_available(pod, min_ready, now) {
            Ok(true) => available += 1,
            Ok(false) => {}
            Err(wait) => recheck = Some(recheck.map_or(wait, |r| r.min(wait))),
        }
    }
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let status = ReplicaSetStatus {
        replicas: count(active.len()),
        fully_labeled_replicas: Some(fully_labeled),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        observed_generation: rs.metadata.generation,
        conditions: rs.status.as_ref().and_then(|s| s.conditions.clone()),
        terminating_replicas: None,
    };
    (status, recheck)
}

/// Which `count` of `pods` to delete first, as Kubernetes ranks them:
/// unscheduled before scheduled, pending before unknown before running,
/// not ready before ready, pods sharing a node with more siblings first,
/// ready for less time first, more restarts first, newer first.
pub fn pods_to_delete(pods: &[Arc<Pod>], count: usize) -> Vec<Arc<Pod>> {
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for pod in pods {
        let node = meta::pod_node(pod);
        if !node.is_empty() {
            *per_node.entry(node).or_default() += 1;
        }
    }
    let rank = |pod: &Pod| per_node.get(meta::pod_node(pod)).copied().unwrap_or(0);
    let mut ranked: Vec<&Arc<Pod>> = pods.iter().collect();
    ranked.sort_by(|a, b| delete_order(a, b, rank(a), rank(b)));
    ranked.into_iter().take(count).cloned().collect()
}

/// `Less` if `a` should be deleted before `b`.
fn delete_order(a: &Pod, b: &Pod, rank_a: usize, rank_b: usize) -> Ordering {
    let unscheduled = |p: &Pod| meta::pod_node(p).is_empty();
    let phase = |p: &Pod| match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Running") => 2,
        Some("Unknown") => 1,
        _ => 0,
    };
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |cs| {
                cs.iter().map(|c| c.restart_count).max().unwrap_or(0)
            })
    };
    let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    unscheduled(b)
        .cmp(&unscheduled(a))
        .then_with(|| phase(a).cmp(&phase(b)))
        .then_with(|| meta::pod_ready(a).cmp(&meta::pod_ready(b)))
        .then_with(|| rank_b.cmp(&rank_a))
        .then_with(|| {
            // Both ready: the more recently ready goes first.
            match (meta::pod_ready_since(a), meta::pod_ready_since(b)) {
                (Some(x), Some(y)) => y.cmp(&x),
                _ => Ordering::Equal,
            }
        })
        .then_with(|| restarts(b).cmp(&restarts(a)))
        .then_with(|| created(b).cmp(&created(a)))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, node: &str, phase: &str, ready_at: Option<i64>, created: i64) -> Arc<Pod> {
        let mut status = json!({"phase": phase});
        if let Some(at) = ready_at {
            let t = Timestamp::from_second(at).unwrap().to_string();
            status["conditions"] =
                json!([{"type": "Ready", "status": "True", "lastTransitionTime": t}]);
        }
        let created = Timestamp::from_second(created).unwrap().to_string();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": created},
                "spec": {"nodeName": node, "containers": []},
                "status": status,
            }))
            .unwrap(),
        )
    }

    fn names(pods: &[Arc<Pod>]) -> Vec<&str> {
        pods.iter().map(|p| meta::name(&p.metadata)).collect()
    }

    #[test]
    fn deletes_unscheduled_then_pending_then_unready_then_newest() {
        let pods = vec![
            pod("ready-old", "n1", "Running", Some(100), 10),
            pod("ready-new", "n2", "Running", Some(200), 20),
            pod("running-unready", "n3", "Running", None, 5),
            pod("pending", "n4", "Pending", None, 1),
            pod("unscheduled", "", "Pending", None, 0),
        ];
        assert_eq!(
            names(&pods_to_delete(&pods, 5)),
            [
                "unscheduled",
                "pending",
                "running-unready",
                "ready-new",
                "ready-old"
            ]
        );
        assert_eq!(names(&pods_to_delete(&pods, 2)), ["unscheduled", "pending"]);
    }

    #[test]
    fn prefers_pods_doubled_up_on_a_node_and_newer_ones() {
        let pods = vec![
            pod("alone", "n1", "Running", Some(100), 1),
            pod("shared-a", "n2", "Running", Some(100), 1),
            pod("shared-b", "n2", "Running", Some(100), 2),
        ];
        assert_eq!(names(&pods_to_delete(&pods, 1)), ["shared-b"]);
    }

    #[test]
    fn status_counts_availability_after_min_ready_seconds() {
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "rs", "generation": 3},
            "spec": {"replicas": 3, "minReadySeconds": 10, "selector": {"matchLabels": {"app": "a"}},
                "template": {"metadata": {"labels": {"app": "a"}}}}
        }))
        .unwrap();
        let now = Timestamp::from_second(1_000).unwrap();
        let pods = vec![
            pod("long-ready", "n1", "Running", Some(900), 1),
            pod("just-ready", "n1", "Running", Some(996), 1),
            pod("unready", "n1", "Running", None, 1),
        ];
        let (status, recheck) = status_of(&rs, &pods, now);
        assert_eq!(status.replicas, 3);
        assert_eq!(status.ready_replicas, Some(2));
        assert_eq!(status.available_replicas, Some(1));
        assert_eq!(status.fully_labeled_replicas, Some(0));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(recheck, Some(Duration::from_secs(6)));
    }
}
