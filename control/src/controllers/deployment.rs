//! The Deployment controller: one `ReplicaSet` per pod template (named
//! `<deployment>-<pod-template-hash>`), rolled out with `RollingUpdate`
//! (`maxSurge`/`maxUnavailable`) or `Recreate`, with revision annotations,
//! `revisionHistoryLimit` cleanup, `paused`, and status with the
//! `Available` and `Progressing` conditions.
//!
//! A rollback is a template change back to an older `ReplicaSet`'s
//! template: that `ReplicaSet` becomes the new one again and gets the next
//! revision; no `ReplicaSet` is created.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentSpec, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cache::{self, BY_OWNER, Change};
use super::client::Error;
use super::meta::{self, TEMPLATE_HASH_LABEL};
use super::queue::WorkQueue;
use super::{Action, Ctx, all_keys, changed, drive, forward, forward_own, queue_all};
use crate::api::Kind;
use crate::events::EventType;
use crate::store::Store;

/// The event source of this controller.
pub const COMPONENT: &str = "deployment-controller";
/// The revision annotation on a Deployment and its `ReplicaSets`.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

/// Starts the controller: its queue feeders and its worker.
pub(crate) fn start<S: Store>(
    ctx: &Arc<Ctx<S>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let queue = WorkQueue::new();
    let from_deployments = forward_own(&ctx.deployments, &queue, shutdown);
    let deployments = Arc::clone(&ctx.deployments);
    let from_rs = forward(
        ctx.replicasets.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        move |change| match change {
            Change::Resync => all_keys(&deployments),
            _ => changed(change)
                .into_iter()
                .filter_map(|rs| meta::controller_key(&rs.metadata, "Deployment"))
                .collect(),
        },
    );
    let rs_cache = Arc::clone(&ctx.replicasets);
    let from_pods = forward(
        ctx.pods.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        move |change| {
            changed(change)
                .into_iter()
                .filter_map(|pod| deployment_of_pod(&rs_cache, pod))
                .collect()
        },
    );
    queue_all(&ctx.deployments, &queue);
    let worker = drive(COMPONENT, ctx, queue, shutdown, |ctx, key| async move {
        reconcile(&ctx, &key).await
    });
    vec![from_deployments, from_rs, from_pods, worker]
}

/// The Deployment of the `ReplicaSet` that controls `pod`.
fn deployment_of_pod(rs_cache: &cache::Cache<ReplicaSet>, pod: &Pod) -> Option<String> {
    let rs = rs_cache.get(&meta::controller_key(&pod.metadata, "ReplicaSet")?)?;
    meta::controller_key(&rs.metadata, "Deployment")
}

/// How a Deployment replaces its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Scale the new `ReplicaSet` up and the old ones down within bounds.
    RollingUpdate {
        /// Pods allowed above `replicas` (resolved, rounded up).
        max_surge: i32,
        /// Pods allowed below `replicas` (resolved, rounded down).
        max_unavailable: i32,
    },
    /// Scale the old `ReplicaSets` to zero, wait for their pods, then scale up.
    Recreate,
}

/// A Deployment's spec with Kubernetes' defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// `spec.replicas` (default 1).
    pub replicas: i32,
    /// `spec.strategy`.
    pub strategy: Strategy,
    /// `spec.minReadySeconds` (default 0).
    pub min_ready_seconds: i32,
    /// `spec.revisionHistoryLimit` (default 10).
    pub revision_history_limit: usize,
    /// `spec.paused`.
    pub paused: bool,
    /// `spec.progressDeadlineSeconds` (default 600).
    pub progress_deadline_seconds: i64,
}

fn is_zero(value: Option<&IntOrString>) -> bool {
    match value {
        Some(IntOrString::Int(n)) => *n == 0,
        Some(IntOrString::String(s)) => s == "0%" || s == "0",
        None => false,
    }
}

/// Resolves a spec's defaults; `Err((field, reason))` if it can't be acted on.
pub fn params(spec: &DeploymentSpec) -> Result<Params, (&'static str, String)> {
    let replicas = spec.replicas.unwrap_or(1);
    if replicas < 0 {
        return Err(("spec.replicas", format!("{replicas} must be non-negative")));
    }
    let strategy = spec.strategy.clone().unwrap_or_default();
    let strategy = match strategy.type_.as_deref().unwrap_or("RollingUpdate") {
        "Recreate" => Strategy::Recreate,
        "RollingUpdate" => {
            let ru = strategy.rolling_update.unwrap_or_default();
            if is_zero(ru.max_surge.as_ref()) && is_zero(ru.max_unavailable.as_ref()) {
                return Err((
                    "spec.strategy.rollingUpdate",
                    "maxSurge and maxUnavailable may not both be 0".to_owned(),
                ));
            }
            let max_surge = meta::scaled_value(ru.max_surge.as_ref(), "25%", replicas, true)
                .map_err(|r| ("spec.strategy.rollingUpdate.maxSurge", r))?;
            let mut max_unavailable =
                meta::scaled_value(ru.max_unavailable.as_ref(), "25%", replicas, false)
                    .map_err(|r| ("spec.strategy.rollingUpdate.maxUnavailable", r))?;
            // Kubernetes' ResolveFenceposts: percentages that both round to
            // zero would never make progress.
            if max_surge == 0 && max_unavailable == 0 {
                max_unavailable = 1;
            }
            Strategy::RollingUpdate {
                max_surge,
                max_unavailable: max_unavailable.min(replicas),
            }
        }
        other => {
            return Err((
                "spec.strategy.type",
                format!("{other:?} is not one of RollingUpdate, Recreate"),
            ));
        }
    };
    Ok(Params {
        replicas,
        strategy,
        min_ready_seconds: spec.min_ready_seconds.unwrap_or(0),
        revision_history_limit: usize::try_from(spec.revision_history_limit.unwrap_or(10))
            .unwrap_or_default(),
        paused: spec.paused.unwrap_or(false),
        progress_deadline_seconds: i64::from(spec.progress_deadline_seconds.unwrap_or(600)),
    })
}

/// One `ReplicaSet` as the rollout sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `spec.replicas`.
    pub replicas: i32,
    /// Active pods it has now (may lag `replicas` until its controller acts).
    pub pods: i32,
    /// Of those, available ones.
    pub available: i32,
}

impl Counts {
    /// Pods this RS has or will have: what counts against `maxSurge`.
    fn footprint(self) -> i32 {
        self.replicas.max(self.pods)
    }

    /// Available pods it keeps once its controller matches `replicas`
    /// (it deletes unavailable pods first).
    fn kept_available(self) -> i32 {
        self.available.min(self.replicas)
    }
}

/// The replica counts one rolling-update step sets: the new `ReplicaSet`'s
/// and each old one's (oldest first), as Kubernetes' `rolloutRolling` does:
/// first scale the new one up within `replicas + maxSurge`, and only when it
/// cannot grow, scale old ones down (unhealthy pods first) while at least
/// `replicas - maxUnavailable` pods stay available.
pub fn rolling_step(
    replicas: i32,
    max_surge: i32,
    max_unavailable: i32,
    new: Counts,
    old: &[Counts],
) -> (i32, Vec<i32>) {
    let mut old_targets: Vec<i32> = old.iter().map(|c| c.replicas).collect();
    let new_target = if new.replicas >= replicas {
        replicas
    } else {
        let max_total = replicas + max_surge;
        let current: i32 = new.footprint() + old.iter().map(|c| c.footprint()).sum::<i32>();
        if current >= max_total {
            new.replicas
        } else {
            new.replicas + (max_total - current).min(replicas - new.replicas)
        }
    };
    if new_target != new.replicas {
        return (new_target, old_targets);
    }
    let old_total: i32 = old.iter().map(|c| c.replicas).sum();
    if old_total == 0 {
        return (new_target, old_targets);
    }
    let min_available = replicas - max_unavailable;
    // Old pods beyond what would keep minAvailable, counting the new RS's
    // not-yet-available pods as unavailable.
    let all_total = new.replicas + old_total;
    let new_unavailable = (new.replicas - new.kept_available()).max(0);
    let max_scaled_down = all_total - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return (new_target, old_targets);
    }
    // Unhealthy old pods go first: removing them costs no availability.
    let mut cleaned = 0;
    for (target, c) in old_targets.iter_mut().zip(old) {
        if cleaned >= max_scaled_down {
            break;
        }
        let unhealthy = *target - c.kept_available();
        if unhealthy <= 0 {
            continue;
        }
        let n = unhealthy.min(max_scaled_down - cleaned);
        *target -= n;
        cleaned += n;
    }
    let available: i32 = new.kept_available() + old.iter().map(|c| c.kept_available()).sum::<i32>();
    if available <= min_available {
        return (new_target, old_targets);
    }
    let mut budget = available - min_available;
    for target in &mut old_targets {
        if budget == 0 {
            break;
        }
        let n = (*target).min(budget);
        *target -= n;
        budget -= n;
    }
    (new_target, old_targets)
}

/// `deployment.kubernetes.io/revision` of an object (0 if unset).
pub fn revision_of(object: &ObjectMeta) -> i64 {
    object
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Which old `ReplicaSets` (given as `(revision, deletable)`) to delete so
/// at most `limit` remain: the oldest deletable ones (no replicas, no pods).
pub fn history_to_delete(old: &[(i64, bool)], limit: usize) -> Vec<usize> {
    let excess = old.len().saturating_sub(limit);
    let mut deletable: Vec<usize> = (0..old.len()).filter(|&i| old[i].1).collect();
    deletable.sort_by_key(|&i| old[i].0);
    deletable.truncate(excess);
    deletable
}

/// The `ReplicaSet` a Deployment creates for its template.
fn new_replica_set(d: &Deployment, hash: &str, revision: i64, replicas: i32) -> ReplicaSet {
    let mut template = d.spec.template.clone();
    let tmeta = template.metadata.get_or_insert_with(ObjectMeta::default);
    tmeta
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(TEMPLATE_HASH_LABEL.to_owned(), hash.to_owned());
    let labels = tmeta.labels.clone();
    let mut selector = d.spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(TEMPLATE_HASH_LABEL.to_owned(), hash.to_owned());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}", meta::name(&d.metadata))),
            namespace: Some(meta::namespace(&d.metadata).to_owned()),
            labels,
            annotations: Some(BTreeMap::from([(
                REVISION_ANNOTATION.to_owned(),
                revision.to_string(),
            )])),
            owner_references: Some(vec![meta::owner_ref(
                Kind::Deployment.api_version(),
                Kind::Deployment.name(),
                &d.metadata,
            )]),
            ..ObjectMeta::default()
        },
        spec: ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: d.spec.min_ready_seconds,
            selector,
            template: Some(template),
        },
        status: None,
    }
}

/// Reconciles one Deployment: picks or creates its new `ReplicaSet`, takes
/// one rollout step, cleans up history and reports status.
async fn reconcile<S: Store>(ctx: &Ctx<S>, key: &str) -> Result<Action, Error> {
    let Some(d) = ctx.deployments.get(key) else {
        return Ok(Action::Done);
    };
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::Done);
    }
    let params = params(&d.spec).map_err(|(field, reason)| Error::Spec {
        kind: "Deployment",
        key: key.to_owned(),
        field,
        reason,
    })?;
    let mut rss = ctx.replicasets.by_index(BY_OWNER, meta::uid(&d.metadata));
    rss.sort_by(|a, b| {
        let created = |rs: &ReplicaSet| rs.metadata.creation_timestamp.clone();
        created(a)
            .cmp(&created(b))
            .then_with(|| meta::name(&a.metadata).cmp(meta::name(&b.metadata)))
    });
    let new_pos = rss.iter().position(|rs| {
        rs.spec
            .template
            .as_ref()
            .is_some_and(|t| meta::templates_equal(t, &d.spec.template))
    });
    let mut new = new_pos.map(|i| rss.remove(i));
    // ReplicaSets being deleted (in the foreground) are left alone; their
    // pods still count as old pods for Recreate.
    let (terminating, olds): (Vec<_>, Vec<_>) = rss
        .into_iter()
        .partition(|rs| rs.metadata.deletion_timestamp.is_some());
    let rollout = Rollout {
        ctx,
        d: &d,
        params: &params,
        terminating: &terminating,
    };
    if !params.paused {
        let max_old = olds
            .iter()
            .map(|rs| revision_of(&rs.metadata))
            .max()
            .unwrap_or(0);
        new = Some(match new {
            Some(rs) if rs.metadata.deletion_timestamp.is_some() => {
                // The new ReplicaSet is being deleted: wait until it is
                // gone (its removal requeues us), then make it again.
                return rollout.sync_status().await;
            }
            Some(rs) => rollout.ensure_revision(&rs, max_old + 1).await?,
            None => match rollout.create_new(&olds, max_old + 1).await? {
                NewReplicaSet::Created(rs) => rs,
                // A hash collision bumped collisionCount: retry with it.
                NewReplicaSet::Collision => return Ok(Action::RequeueAfter(Duration::ZERO)),
                NewReplicaSet::Wait => return rollout.sync_status().await,
            },
        });
        if let Some(new) = &new {
            rollout
                .annotate_deployment(revision_of(&new.metadata))
                .await?;
            match params.strategy {
                Strategy::Recreate => rollout.recreate(new, &olds).await?,
                Strategy::RollingUpdate {
                    max_surge,
                    max_unavailable,
                } => {
                    rollout
                        .rolling(new, &olds, max_surge, max_unavailable)
                        .await?;
                }
            }
        }
        rollout.cleanup(&olds).await?;
    } else if let Some(new) = &new
        && olds.iter().all(|rs| rs.spec.replicas.unwrap_or(1) == 0)
        && new.spec.replicas.unwrap_or(1) != params.replicas
    {
        // Paused: scaling still applies, rollouts don't.
        rollout.scale(new, params.replicas).await?;
    }
    rollout.sync_status().await
}

/// One reconcile's context for a Deployment.
struct Rollout<'a, S> {
    ctx: &'a Ctx<S>,
    d: &'a Deployment,
    params: &'a Params,
    /// Its `ReplicaSets` that are being deleted.
    terminating: &'a [Arc<ReplicaSet>],
}

/// What [`Rollout::create_new`] did.
enum NewReplicaSet {
    /// Created it (or it exists).
    Created(Arc<ReplicaSet>),
    /// Its name is taken by a different template: `collisionCount` was bumped.
    Collision,
    /// Nothing to do now: its name is taken by a `ReplicaSet` being
    /// deleted, or the Deployment went away meanwhile.
    Wait,
}

impl<S: Store> Rollout<'_, S> {
    fn key(&self) -> String {
        cache::key_of(&self.d.metadata)
    }

    /// The current cached state of a `ReplicaSet` (after our own writes).
    fn fresh(&self, rs: &ReplicaSet) -> Arc<ReplicaSet> {
        self.ctx
            .replicasets
            .get(&cache::key_of(&rs.metadata))
            .unwrap_or_else(|| Arc::new(rs.clone()))
    }

    fn counts(&self, rs: &ReplicaSet) -> Counts {
        let now = meta::now();
        let pods: Vec<Arc<Pod>> = self
            .ctx
            .pods
            .by_index(BY_OWNER, meta::uid(&rs.metadata))
            .into_iter()
            .filter(|p| meta::pod_active(p))
            .collect();
        let available = pods
            .iter()
            .filter(|p| meta::pod_available(p, self.params.min_ready_seconds, now) == Ok(true))
            .count();
        Counts {
            replicas: rs.spec.replicas.unwrap_or(1),
            pods: i32::try_from(pods.len()).unwrap_or(i32::MAX),
            available: i32::try_from(available).unwrap_or(i32::MAX),
        }
    }

    /// Pods (active or terminating) a `ReplicaSet` still has.
    fn any_pods(&self, rs: &ReplicaSet) -> bool {
        !self
            .ctx
            .pods
            .by_index(BY_OWNER, meta::uid(&rs.metadata))
            .is_empty()
    }

    async fn event(&self, reason: &str, message: &str) {
        self.ctx
            .client
            .event(
                Kind::Deployment,
                &self.d.metadata,
                EventType::Normal,
                reason,
                message,
                COMPONENT,
            )
            .await;
    }

    /// Sets a `ReplicaSet`'s replicas (compare-and-swap, retried on the
    /// stored state on conflict), with a `ScalingReplicaSet` event.
    async fn scale(&self, rs: &ReplicaSet, to: i32) -> Result<Arc<ReplicaSet>, Error> {
        let rs = self.fresh(rs);
        let mut from = rs.spec.replicas.unwrap_or(1);
        if from == to {
            return Ok(rs);
        }
        let scaled = self
            .ctx
            .client
            .update(&self.ctx.replicasets, "scale", &rs, COMPONENT, |rs| {
                from = rs.spec.replicas.unwrap_or(1);
                rs.spec.replicas = Some(to);
                from != to
            })
            .await?;
        if from != to {
            let direction = if to > from { "up" } else { "down" };
            let message = format!(
                "Scaled {direction} replica set {} to {to}",
                meta::name(&rs.metadata)
            );
            self.event("ScalingReplicaSet", &message).await;
        }
        Ok(scaled)
    }

    /// Gives a reused (rolled-back-to) `ReplicaSet` the newest revision.
    async fn ensure_revision(
        &self,
        rs: &ReplicaSet,
        revision: i64,
    ) -> Result<Arc<ReplicaSet>, Error> {
        let rs = self.fresh(rs);
        if revision_of(&rs.metadata) >= revision {
            return Ok(rs);
        }
        self.ctx
            .client
            .update(&self.ctx.replicasets, "annotate", &rs, COMPONENT, |rs| {
                if revision_of(&rs.metadata) >= revision {
                    return false;
                }
                rs.metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(REVISION_ANNOTATION.to_owned(), revision.to_string());
                true
            })
            .await
    }

    /// Creates the `ReplicaSet` for the current template; `None` if its
    /// name is taken by a different template (collisionCount was bumped).
    async fn create_new(
        &self,
        olds: &[Arc<ReplicaSet>],
        revision: i64,
    ) -> Result<NewReplicaSet, Error> {
        let collisions_of = |d: &Deployment| {
            d.status
                .as_ref()
                .and_then(|s| s.collision_count)
                .unwrap_or(0)
        };
        let collisions = collisions_of(self.d);
        let hash = meta::template_hash(&self.d.spec.template, collisions);
        let name = format!("{}-{hash}", meta::name(&self.d.metadata));
        let rs_key = format!("{}/{name}", meta::namespace(&self.d.metadata));
        if let Some(taken) = self.ctx.replicasets.get(&rs_key) {
            if taken.metadata.deletion_timestamp.is_some() {
                return Ok(NewReplicaSet::Wait);
            }
            let d = self.latest();
            self.ctx
                .client
                .update_status(&self.ctx.deployments, &d, |d: &Deployment| {
                    // Someone else bumped it already: nothing to do.
                    (collisions_of(d) == collisions).then(|| {
                        let mut status = d.status.clone().unwrap_or_default();
                        status.collision_count = Some(collisions + 1);
                        status
                    })
                })
                .await?;
            return Ok(NewReplicaSet::Collision);
        }
        let replicas = match self.params.strategy {
            Strategy::Recreate => {
                if olds
                    .iter()
                    .any(|rs| self.any_pods(rs) || rs.spec.replicas != Some(0))
                    || self.terminating.iter().any(|rs| self.any_pods(rs))
                {
                    0
                } else {
                    self.params.replicas
                }
            }
            Strategy::RollingUpdate {
                max_surge,
                max_unavailable,
            } => {
                let old: Vec<Counts> = olds.iter().map(|rs| self.counts(rs)).collect();
                rolling_step(
                    self.params.replicas,
                    max_surge,
                    max_unavailable,
                    Counts::default(),
                    &old,
                )
                .0
            }
        };
        let rs = new_replica_set(self.d, &hash, revision, replicas);
        let created = self
            .ctx
            .client
            .apply(&self.ctx.replicasets, "create", &rs, COMPONENT)
            .await?;
        // A (foreground) delete of the Deployment may have listed its
        // dependents before this one existed: don't let it outlive it.
        if !self
            .ctx
            .client
            .alive(Kind::Deployment, &self.d.metadata)
            .await?
        {
            tracing::info!(deployment = %self.key(), rs = %name, "deployment went away while creating its replica set: deleting it");
            self.ctx
                .client
                .delete(&self.ctx.replicasets, &created.metadata, None)
                .await?;
            return Ok(NewReplicaSet::Wait);
        }
        if replicas > 0 {
            let message = format!("Scaled up replica set {name} to {replicas}");
            self.event("ScalingReplicaSet", &message).await;
        }
        Ok(NewReplicaSet::Created(self.fresh(&created)))
    }

    /// The Deployment as cached now (after our own writes).
    fn latest(&self) -> Arc<Deployment> {
        self.ctx
            .deployments
            .get(&self.key())
            .unwrap_or_else(|| Arc::new(self.d.clone()))
    }

    /// Sets the Deployment's revision annotation to its new RS's
    /// (compare-and-swap: a concurrent change of the Deployment is kept).
    async fn annotate_deployment(&self, revision: i64) -> Result<(), Error> {
        if revision_of(&self.d.metadata) == revision {
            return Ok(());
        }
        self.ctx
            .client
            .update(&self.ctx.deployments, "annotate", self.d, COMPONENT, |d| {
                if revision_of(&d.metadata) == revision {
                    return false;
                }
                d.metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(REVISION_ANNOTATION.to_owned(), revision.to_string());
                true
            })
            .await
            .map(drop)
    }

    async fn recreate(&self, new: &ReplicaSet, olds: &[Arc<ReplicaSet>]) -> Result<(), Error> {
        let mut scaled_down = false;
        for rs in olds {
            if rs.spec.replicas.unwrap_or(1) != 0 {
                self.scale(rs, 0).await?;
                scaled_down = true;
            }
        }
        // Kubernetes waits until no old pod exists, terminating ones
        // included, so old and new pods never run side by side.
        let old_pods = olds
            .iter()
            .chain(self.terminating)
            .any(|rs| self.any_pods(rs));
        if scaled_down || old_pods {
            return Ok(());
        }
        self.scale(new, self.params.replicas).await.map(drop)
    }

    async fn rolling(
        &self,
        new: &ReplicaSet,
        olds: &[Arc<ReplicaSet>],
        max_surge: i32,
        max_unavailable: i32,
    ) -> Result<(), Error> {
        let old_counts: Vec<Counts> = olds.iter().map(|rs| self.counts(rs)).collect();
        let (new_target, old_targets) = rolling_step(
            self.params.replicas,
            max_surge,
            max_unavailable,
            self.counts(new),
            &old_counts,
        );
        self.scale(new, new_target).await?;
        for (rs, target) in olds.iter().zip(old_targets) {
            self.scale(rs, target).await?;
        }
        Ok(())
    }

    /// Deletes old, empty `ReplicaSets` beyond `revisionHistoryLimit`.
    async fn cleanup(&self, olds: &[Arc<ReplicaSet>]) -> Result<(), Error> {
        let olds: Vec<Arc<ReplicaSet>> = olds.iter().map(|rs| self.fresh(rs)).collect();
        let view: Vec<(i64, bool)> = olds
            .iter()
            .map(|rs| {
                let empty = rs.spec.replicas == Some(0)
                    && rs.status.as_ref().is_none_or(|s| s.replicas == 0)
                    && !self.any_pods(rs);
                (revision_of(&rs.metadata), empty)
            })
            .collect();
        for i in history_to_delete(&view, self.params.revision_history_limit) {
            tracing::info!(deployment = %self.key(), rs = meta::name(&olds[i].metadata), "deleting old replica set");
            self.ctx
                .client
                .delete(&self.ctx.replicasets, &olds[i].metadata, None)
                .await?;
        }
        Ok(())
    }

    /// Writes the status computed from the `ReplicaSets` if it changed
    /// (compare-and-swap on the cached Deployment, recomputed on conflict;
    /// skipped if the spec changed meanwhile, whose change requeues us).
    async fn sync_status(&self) -> Result<Action, Error> {
        let mut rss = self
            .ctx
            .replicasets
            .by_index(BY_OWNER, meta::uid(&self.d.metadata));
        rss.sort_by_key(|rs| std::cmp::Reverse(revision_of(&rs.metadata)));
        let new = rss.iter().find(|rs| {
            rs.metadata.deletion_timestamp.is_none()
                && rs
                    .spec
                    .template
                    .as_ref()
                    .is_some_and(|t| meta::templates_equal(t, &self.d.spec.template))
        });
        let now = meta::now();
        let mut recheck = None;
        self.ctx
            .client
            .update_status(&self.ctx.deployments, &self.latest(), |d: &Deployment| {
                if d.metadata.generation != self.d.metadata.generation {
                    return None;
                }
                let (status, after) = status_of(d, self.params, new.map(AsRef::as_ref), &rss, now);
                recheck = after;
                (d.status.as_ref() != Some(&status)).then_some(status)
            })
            .await?;
        Ok(Action::after(recheck))
    }
}

/// The status a Deployment should report, and when to look again (for the
/// progress deadline).
pub fn status_of(
    d: &Deployment,
    params: &Params,
    new: Option<&ReplicaSet>,
    all: &[Arc<ReplicaSet>],
    now: Timestamp,
) -> (DeploymentStatus, Option<Duration>) {
    let rs_status = |rs: &ReplicaSet| rs.status.clone().unwrap_or_default();
    let replicas: i32 = all.iter().map(|rs| rs_status(rs).replicas).sum();
    let ready: i32 = all
        .iter()
        .map(|rs| rs_status(rs).ready_replicas.unwrap_or(0))
        .sum();
    let available: i32 = all
        .iter()
        .map(|rs| rs_status(rs).available_replicas.unwrap_or(0))
        .sum();
    let spec_total: i32 = all.iter().map(|rs| rs.spec.replicas.unwrap_or(1)).sum();
    let updated = new.map_or(0, |rs| rs_status(rs).replicas);
    let previous = d.status.clone().unwrap_or_default();
    let mut conditions = previous.conditions.clone().unwrap_or_default();
    let max_unavailable = match params.strategy {
        Strategy::RollingUpdate {
            max_unavailable, ..
        } => max_unavailable,
        Strategy::Recreate => 0,
    };
    let stamp = Time(now);
    let (status, reason, message) = if available >= params.replicas - max_unavailable {
        (
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
        )
    } else {
        (
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
        )
    };
    let available_condition = Condition {
        type_: "Available",
        status,
        reason,
        message: message.to_owned(),
    };
    set_condition(&mut conditions, available_condition, &stamp, false);
    let new_name = new
        .map(|rs| meta::name(&rs.metadata).to_owned())
        .unwrap_or_default();
    let complete = new.is_some()
        && updated == params.replicas
        && replicas == params.replicas
        && available >= params.replicas;
    let progressed = previous.updated_replicas != Some(updated)
        || previous.ready_replicas != Some(ready)
        || previous.available_replicas != Some(available)
        || previous.replicas != Some(replicas)
        || previous.observed_generation != d.metadata.generation;
    let progress = Progress {
        paused: params.paused,
        complete,
        progressed,
        deadline_seconds: params.progress_deadline_seconds,
    };
    let recheck = set_progressing(&mut conditions, &progress, &new_name, now);
    let status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((spec_total.max(params.replicas) - available).max(0)),
        conditions: Some(conditions),
        collision_count: previous.collision_count,
        terminating_replicas: None,
    };
    (status, recheck)
}

/// What the `Progressing` condition is decided from.
struct Progress {
    paused: bool,
    complete: bool,
    progressed: bool,
    deadline_seconds: i64,
}

/// Sets `Progressing` (paused, complete, progressing or past its deadline);
/// returns when the deadline would pass.
fn set_progressing(
    conditions: &mut Vec<DeploymentCondition>,
    p: &Progress,
    new_name: &str,
    now: Timestamp,
) -> Option<Duration> {
    let stamp = Time(now);
    let progressing = |status, reason, message: String| Condition {
        type_: "Progressing",
        status,
        reason,
        message,
    };
    if p.paused {
        let c = progressing(
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".to_owned(),
        );
        set_condition(conditions, c, &stamp, false);
        return None;
    }
    if p.complete {
        let message = format!("ReplicaSet \"{new_name}\" has successfully progressed.");
        let c = progressing("True", "NewReplicaSetAvailable", message);
        set_condition(conditions, c, &stamp, p.progressed);
        return None;
    }
    let last = conditions
        .iter()
        .find(|c| c.type_.as_deref() == Some("Progressing"))
        .and_then(|c| c.last_update_time.as_ref().map(|t| t.0));
    let waited = last.map_or(0, |t| meta::seconds_between(t, now));
    if p.deadline_seconds > 0 && !p.progressed && waited >= p.deadline_seconds {
        let message = format!("ReplicaSet \"{new_name}\" has timed out progressing.");
        let c = progressing("False", "ProgressDeadlineExceeded", message);
        set_condition(conditions, c, &stamp, false);
        return None;
    }
    let message = format!("ReplicaSet \"{new_name}\" is progressing.");
    set_condition(
        conditions,
        progressing("True", "ReplicaSetUpdated", message),
        &stamp,
        p.progressed,
    );
    if p.deadline_seconds <= 0 {
        return None;
    }
    let left = if p.progressed {
        p.deadline_seconds
    } else {
        p.deadline_seconds - waited
    };
    Some(Duration::from_secs(u64::try_from(left.max(1)).unwrap_or(1)))
}

/// One condition to set.
struct Condition<'a> {
    type_: &'a str,
    status: &'a str,
    reason: &'a str,
    message: String,
}

/// Sets a condition, keeping `lastTransitionTime` while its status holds
/// and `lastUpdateTime` unless something about it changed (or `touch`).
fn set_condition(
    conditions: &mut Vec<DeploymentCondition>,
    new: Condition<'_>,
    now: &Time,
    touch: bool,
) {
    let existing = conditions
        .iter_mut()
        .find(|c| c.type_.as_deref() == Some(new.type_));
    match existing {
        Some(c) => {
            let same_status = c.status.as_deref() == Some(new.status);
            let same = same_status
                && c.reason.as_deref() == Some(new.reason)
                && c.message.as_deref() == Some(new.message.as_str());
            if !same_status {
                c.last_transition_time = Some(now.clone());
            }
            if !same || touch {
                c.last_update_time = Some(now.clone());
            }
            c.status = Some(new.status.to_owned());
            c.reason = Some(new.reason.to_owned());
            c.message = Some(new.message);
        }
        None => conditions.push(DeploymentCondition {
            type_: Some(new.type_.to_owned()),
            status: Some(new.status.to_owned()),
            reason: Some(new.reason.to_owned()),
            message: Some(new.message),
            last_transition_time: Some(now.clone()),
            last_update_time: Some(now.clone()),
        }),
    }
}

#[cfg(test)]
mod tests;
