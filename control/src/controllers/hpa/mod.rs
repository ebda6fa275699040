//! The `HorizontalPodAutoscaler` controller: scales a Deployment or
//! `ReplicaSet` to what its pods' metrics ask for, with Kubernetes'
//! algorithm ([`replicas`]: per metric `ceil(ready pods × current /
//! target)`, 10 % tolerance, the highest over the metrics) and behavior
//! ([`behavior`]: stabilization windows, rate policies, min/max).
//!
//! Unlike Kubernetes' fixed 15 s sync, an HPA is reconciled as soon as
//! the agents report new samples of its target's pods (and when the HPA
//! or its target changes), with a 15 s resync as a safety net; the
//! stabilization window is what keeps it from flapping. With
//! `Config::hpa_sync_period` non-zero it instead ticks at that period, as
//! Kubernetes does (the benchmark's baseline).
//!
//! Warning events (`FailedGetScale`, `FailedGetResourceMetric`, ...) are
//! recorded when a condition turns to that reason, not on every reconcile,
//! since reconciles come every sampling period.

pub mod behavior;
pub mod replicas;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_e2e;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerCondition,
    HorizontalPodAutoscalerStatus, MetricIdentifier, MetricSpec, MetricStatus, MetricValueStatus,
    PodsMetricSource, PodsMetricStatus, ResourceMetricSource, ResourceMetricStatus,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use weir_proto::manifest::{parse_cpu_millis, parse_memory_bytes};

use self::behavior::{History, Rules};
use self::replicas::{Readiness, Sample, Target};
use super::cache::{self, Cache, Change};
use super::client::Error;
use super::queue::WorkQueue;
use super::{Action, Ctx, changed, drive, forward, forward_own, meta, queue_all};
use crate::api::Kind;
use crate::events::EventType;
use crate::matching;
use crate::metrics::Update;
use crate::store::Store;

/// The event source of this controller.
pub const COMPONENT: &str = "horizontal-pod-autoscaler";
/// The safety-net resync when reacting to metric changes.
pub const RESYNC: Duration = Duration::from_secs(15);
/// Status writes that only refresh `currentMetrics` come at most this often.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

/// What the controller remembers per HPA (in memory).
#[derive(Default)]
struct State {
    histories: Mutex<HashMap<String, History>>,
    status_written: Mutex<HashMap<String, Instant>>,
}

impl State {
    fn history(&self, key: &str) -> History {
        self.histories
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    fn set_history(&self, key: &str, history: History) {
        self.histories
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned(), history);
    }

    fn forget(&self, key: &str) {
        self.histories
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
        self.status_written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Whether a metrics-only status refresh is due, and if so notes it.
    fn refresh_due(&self, key: &str, now: Instant) -> bool {
        let mut written = self
            .status_written
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let due = written
            .get(key)
            .is_none_or(|&at| now.saturating_duration_since(at) >= STATUS_REFRESH);
        if due {
            written.insert(key.to_owned(), now);
        }
        due
    }
}

/// Starts the controller: its queue feeders and its worker.
pub(crate) fn start<S: Store>(
    ctx: &Arc<Ctx<S>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let queue = WorkQueue::new();
    let period = ctx.config.hpa_sync_period;
    let mut tasks = vec![forward_own(&ctx.hpas, &queue, shutdown)];
    if period.is_zero() {
        tasks.push(forward_targets(ctx, &ctx.deployments, &queue, shutdown));
        tasks.push(forward_targets(ctx, &ctx.replicasets, &queue, shutdown));
        tasks.push(forward_metrics(ctx, &queue, shutdown));
    }
    queue_all(&ctx.hpas, &queue);
    let state = Arc::new(State::default());
    let resync = if period.is_zero() { RESYNC } else { period };
    tasks.push(drive(COMPONENT, ctx, queue, shutdown, move |ctx, key| {
        let state = Arc::clone(&state);
        async move {
            reconcile(&ctx, &state, &key).await?;
            Ok(Action::RequeueAfter(resync))
        }
    }));
    tasks
}

/// Queues the HPAs whose target is a changed Deployment or `ReplicaSet`.
fn forward_targets<S: Store, K: cache::Object>(
    ctx: &Arc<Ctx<S>>,
    cache: &Arc<Cache<K>>,
    queue: &Arc<WorkQueue>,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let hpas = Arc::clone(&ctx.hpas);
    let kind = cache.kind().name();
    forward(
        cache.subscribe(),
        Arc::clone(queue),
        shutdown.clone(),
        move |change| match change {
            Change::Resync => super::all_keys(&hpas),
            _ => changed(change)
                .into_iter()
                .flat_map(|o| hpas_targeting(&hpas, kind, o.metadata()))
                .collect(),
        },
    )
}

fn hpas_targeting(
    hpas: &Cache<HorizontalPodAutoscaler>,
    kind: &str,
    target: &ObjectMeta,
) -> Vec<String> {
    hpas.list_namespace(meta::namespace(target))
        .iter()
        .filter(|h| {
            let r = &h.spec.scale_target_ref;
            r.kind == kind && r.name == meta::name(target)
        })
        .map(|h| cache::key_of(&h.metadata))
        .collect()
}

/// Queues the HPAs whose target's pods are in a metrics report.
fn forward_metrics<S: Store>(
    ctx: &Arc<Ctx<S>>,
    queue: &Arc<WorkQueue>,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let ctx = Arc::clone(ctx);
    let queue = Arc::clone(queue);
    let mut updates = ctx.metrics.subscribe();
    let mut shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let update = tokio::select! {
                u = updates.recv() => u,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match update {
                Ok(update) => {
                    for key in hpas_of_update(&ctx, &update) {
                        queue.add(&key);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => queue_all(&ctx.hpas, &queue),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

fn hpas_of_update<S: Store>(ctx: &Ctx<S>, update: &Update) -> HashSet<String> {
    let mut keys = HashSet::new();
    let mut namespaces: HashMap<&str, Vec<Arc<Pod>>> = HashMap::new();
    for key in &update.pods {
        if let (Some((ns, _)), Some(pod)) = (key.split_once('/'), ctx.pods.get(key)) {
            namespaces.entry(ns).or_default().push(pod);
        }
    }
    for (ns, pods) in namespaces {
        for hpa in ctx.hpas.list_namespace(ns) {
            let Some(target) = find_target(ctx, ns, &hpa.spec.scale_target_ref) else {
                continue;
            };
            if pods
                .iter()
                .any(|p| matching::selector_matches(&target.selector, meta::labels(&p.metadata)))
            {
                keys.insert(cache::key_of(&hpa.metadata));
            }
        }
    }
    keys
}

/// The scale subresource of a target, as the controller needs it.
struct ScaleTarget {
    kind: Kind,
    name: String,
    /// `spec.replicas`.
    replicas: i32,
    /// `status.replicas`.
    status_replicas: i32,
    selector: LabelSelector,
}

fn find_target<S: Store>(
    ctx: &Ctx<S>,
    ns: &str,
    r: &CrossVersionObjectReference,
) -> Option<ScaleTarget> {
    let key = format!("{ns}/{}", r.name);
    match r.kind.as_str() {
        "Deployment" => {
            let d = ctx.deployments.get(&key)?;
            let spec = &d.spec;
            Some(ScaleTarget {
                kind: Kind::Deployment,
                name: r.name.clone(),
                replicas: spec.replicas.unwrap_or(1),
                status_replicas: d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0),
                selector: spec.selector.clone(),
            })
        }
        "ReplicaSet" => {
            let rs = ctx.replicasets.get(&key)?;
            let spec = &rs.spec;
            Some(ScaleTarget {
                kind: Kind::ReplicaSet,
                name: r.name.clone(),
                replicas: spec.replicas.unwrap_or(1),
                status_replicas: rs.status.as_ref().map_or(0, |s| s.replicas),
                selector: spec.selector.clone(),
            })
        }
        _ => None,
    }
}

/// The conditions and events of one reconcile.
struct Report {
    conditions: Vec<HorizontalPodAutoscalerCondition>,
    events: Vec<(EventType, &'static str, String)>,
    old: Vec<HorizontalPodAutoscalerCondition>,
}

impl Report {
    fn new(hpa: &HorizontalPodAutoscaler) -> Self {
        let old = hpa
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        Self {
            conditions: old.clone(),
            events: Vec::new(),
            old,
        }
    }

    fn set(&mut self, type_: &str, status: bool, reason: &str, message: String) {
        let status = if status { "True" } else { "False" };
        let now = Time(meta::now());
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = Some(now);
                }
                status.clone_into(&mut c.status);
                c.reason = Some(reason.to_owned());
                c.message = Some(message);
            }
            None => self.conditions.push(HorizontalPodAutoscalerCondition {
                type_: type_.to_owned(),
                status: status.to_owned(),
                reason: Some(reason.to_owned()),
                message: Some(message),
                last_transition_time: Some(now),
                observed_generation: None,
            }),
        }
    }

    /// A warning event, only when `type_`'s reason turns to `reason`.
    fn warn_on_change(&mut self, type_: &str, reason: &'static str, message: String) {
        let was = self
            .old
            .iter()
            .find(|c| c.type_ == type_)
            .and_then(|c| c.reason.as_deref());
        if was != Some(reason) {
            self.events.push((EventType::Warning, reason, message));
        }
    }
}

/// One reconcile of the HPA at `key`.
async fn reconcile<S: Store>(ctx: &Ctx<S>, state: &State, key: &str) -> Result<(), Error> {
    let Some(hpa) = ctx.hpas.get(key) else {
        state.forget(key);
        return Ok(());
    };
    if hpa.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let ns = meta::namespace(&hpa.metadata).to_owned();
    let spec = &hpa.spec;
    let mut report = Report::new(&hpa);
    let old_status = hpa.status.clone().unwrap_or_default();
    let mut status = HorizontalPodAutoscalerStatus {
        current_metrics: old_status.current_metrics.clone(),
        current_replicas: old_status.current_replicas,
        desired_replicas: old_status.desired_replicas,
        last_scale_time: old_status.last_scale_time.clone(),
        observed_generation: hpa.metadata.generation,
        conditions: None,
    };
    let Some(target) = find_target(ctx, &ns, &spec.scale_target_ref) else {
        let r = &spec.scale_target_ref;
        let plural = if r.kind == "ReplicaSet" {
            "replicasets.apps"
        } else {
            "deployments.apps"
        };
        let message = format!(
            "the HPA controller was unable to get the target's current scale: {plural} {:?} not found",
            r.name
        );
        report.set("AbleToScale", false, "FailedGetScale", message.clone());
        report.warn_on_change("AbleToScale", "FailedGetScale", message);
        return finish(ctx, state, &hpa, report, status).await;
    };
    report.set(
        "AbleToScale",
        true,
        "SucceededGetScale",
        "the HPA controller was able to get the target's current scale".to_owned(),
    );
    let current = target.replicas;
    status.current_replicas = Some(target.status_replicas);
    let min = spec.min_replicas.unwrap_or(1);
    let (desired, reason) = if current == 0 && min != 0 {
        report.set(
            "ScalingActive",
            false,
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero".to_owned(),
        );
        (0, String::new())
    } else if current > spec.max_replicas {
        report.set(
            "ScalingLimited",
            true,
            "TooManyReplicas",
            "the desired replica count is more than the maximum replica count".to_owned(),
        );
        (
            spec.max_replicas,
            "Current number of replicas above Spec.MaxReplicas".to_owned(),
        )
    } else if current < min {
        report.set(
            "ScalingLimited",
            true,
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count".to_owned(),
        );
        (
            min,
            "Current number of replicas below Spec.MinReplicas".to_owned(),
        )
    } else {
        match recommend(ctx, state, key, &hpa, &target, &mut report, &mut status) {
            Some(decision) => decision,
            None => return finish(ctx, state, &hpa, report, status).await,
        }
    };
    if desired != current && !(current == 0 && min != 0) {
        scale(ctx, &hpa, &target, desired, &reason, &mut report).await?;
        status.last_scale_time = Some(Time(meta::now()));
        let mut history = state.history(key);
        let up = Rules::from_spec(
            true,
            spec.behavior.as_ref().and_then(|b| b.scale_up.as_ref()),
        );
        let down = Rules::from_spec(
            false,
            spec.behavior.as_ref().and_then(|b| b.scale_down.as_ref()),
        );
        history.record_scale(Instant::now(), current, desired, &up, &down);
        state.set_history(key, history);
    }
    status.desired_replicas = desired;
    finish(ctx, state, &hpa, report, status).await
}

/// The metric-based recommendation, normalized by the behavior: the
/// desired count and the rescale reason, or `None` when no metric could
/// be computed (conditions and events are then in `report`).
fn recommend<S: Store>(
    ctx: &Ctx<S>,
    state: &State,
    key: &str,
    hpa: &HorizontalPodAutoscaler,
    target: &ScaleTarget,
    report: &mut Report,
    status: &mut HorizontalPodAutoscalerStatus,
) -> Option<(i32, String)> {
    let spec = &hpa.spec;
    let current = target.replicas;
    let pods = target_pods(ctx, meta::namespace(&hpa.metadata), &target.selector);
    let metrics = spec.metrics.clone().unwrap_or_default();
    let mut best: Option<(i32, String)> = None;
    let mut statuses = Vec::new();
    let mut invalid: Vec<(&'static str, String)> = Vec::new();
    for m in &metrics {
        match evaluate(ctx, m, &pods, current) {
            Ok(e) => {
                statuses.push(e.status);
                if best.as_ref().is_none_or(|(r, _)| e.replicas > *r) {
                    best = Some((e.replicas, e.description));
                }
            }
            Err(failure) => invalid.push(failure),
        }
    }
    status.current_metrics = Some(statuses);
    let proposal = best.as_ref().map_or(0, |(r, _)| *r);
    if !invalid.is_empty() && (invalid.len() >= metrics.len() || proposal < current) {
        let (reason, message) = invalid.swap_remove(0);
        report.set("ScalingActive", false, reason, message.clone());
        report.warn_on_change("ScalingActive", reason, message.clone());
        if report.events.iter().any(|(_, r, _)| *r == reason) {
            report.events.push((
                EventType::Warning,
                "FailedComputeMetricsReplicas",
                format!(
                    "invalid metrics ({} invalid out of {}), first error is: {message}",
                    invalid.len() + 1,
                    metrics.len()
                ),
            ));
        }
        return None;
    }
    let (proposal, description) = best?;
    report.set(
        "ScalingActive",
        true,
        "ValidMetricFound",
        format!("the HPA was able to successfully calculate a replica count from {description}"),
    );
    let reason = if proposal > current {
        format!("{description} above target")
    } else {
        "All metrics below target".to_owned()
    };
    let up = Rules::from_spec(
        true,
        spec.behavior.as_ref().and_then(|b| b.scale_up.as_ref()),
    );
    let down = Rules::from_spec(
        false,
        spec.behavior.as_ref().and_then(|b| b.scale_down.as_ref()),
    );
    let mut history = state.history(key);
    let n = behavior::normalize(
        &mut history,
        Instant::now(),
        behavior::Args {
            current,
            recommended: proposal,
            min: spec.min_replicas.unwrap_or(1),
            max: spec.max_replicas,
            up: &up,
            down: &down,
        },
    );
    state.set_history(key, history);
    report.set(
        "AbleToScale",
        true,
        n.able_reason,
        n.able_message.to_owned(),
    );
    report.set(
        "ScalingLimited",
        n.limited,
        n.limited_reason,
        n.limited_message.to_owned(),
    );
    Some((n.desired, reason))
}

/// The target's pods: those in the namespace its selector matches.
fn target_pods<S: Store>(ctx: &Ctx<S>, ns: &str, selector: &LabelSelector) -> Vec<Arc<Pod>> {
    if meta::selector_is_empty(selector) {
        return Vec::new();
    }
    ctx.pods
        .list_namespace(ns)
        .into_iter()
        .filter(|p| matching::selector_matches(selector, meta::labels(&p.metadata)))
        .collect()
}

/// One metric's evaluation.
struct Evaluation {
    replicas: i32,
    description: String,
    status: MetricStatus,
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn ignored(pod: &Pod) -> bool {
    !meta::pod_active(pod)
}

/// Evaluates one metric over the target's pods.
fn evaluate<S: Store>(
    ctx: &Ctx<S>,
    m: &MetricSpec,
    pods: &[Arc<Pod>],
    current: i32,
) -> Result<Evaluation, (&'static str, String)> {
    match (m.type_.as_str(), &m.resource, &m.pods) {
        ("Resource", Some(r), _) => resource_metric(ctx, r, pods, current),
        ("Pods", _, Some(p)) => pods_metric(ctx, p, pods, current),
        (other, _, _) => Err((
            "InvalidMetricSourceType",
            format!(
                "the HPA was unable to compute the replica count: unsupported metric source type {other:?}"
            ),
        )),
    }
}

/// A `Resource` metric: cpu or memory, as a utilization of the requests
/// or an average value.
fn resource_metric<S: Store>(
    ctx: &Ctx<S>,
    r: &ResourceMetricSource,
    pods: &[Arc<Pod>],
    current: i32,
) -> Result<Evaluation, (&'static str, String)> {
    let name = r.name.as_str();
    let utilization = r.target.average_utilization;
    let mut samples = Vec::with_capacity(pods.len());
    let now_ms = meta::now().as_millisecond();
    for pod in pods {
        let weight = match utilization {
            Some(_) if !ignored(pod) => pod_request(pod, name).map_err(|e| {
                (
                    "FailedGetResourceMetric",
                    format!("failed to get {name} utilization: {e}"),
                )
            })?,
            _ => 1.0,
        };
        let sample = ctx
            .metrics
            .pod(meta::namespace(&pod.metadata), meta::name(&pod.metadata));
        let value = sample.as_ref().map(|p| {
            if name == "cpu" {
                p.cpu_cores
            } else {
                u64_f64(p.memory_working_set_bytes)
            }
        });
        // Kubernetes' order: pending is unready; then no sample is missing;
        // then, for cpu, the readiness rule on the sample.
        let cpu_unready = name == "cpu"
            && sample.as_ref().is_some_and(|p| {
                let readiness = Readiness {
                    ready: meta::pod_ready_transition(pod),
                    started: meta::pod_started_ms(pod),
                };
                replicas::cpu_unready(readiness, p.timestamp_ms, p.window_ms, now_ms)
            });
        samples.push(Sample {
            unready: phase(pod) == "Pending" || cpu_unready,
            ignored: ignored(pod),
            value,
            weight,
        });
    }
    let (per_weight, missing, description) = if let Some(u) = utilization {
        let t = f64::from(u) / 100.0;
        (
            t,
            1.0,
            format!("{name} resource utilization (percentage of request)"),
        )
    } else {
        let q = r
            .target
            .average_value
            .as_ref()
            .map_or(0.0, |q| quantity_value(name, q));
        (q, q, format!("{name} resource"))
    };
    let outcome = replicas::desired(&samples, Target { per_weight, missing_on_scale_down: missing }, current)
                .ok_or_else(|| {
                    (
                        "FailedGetResourceMetric",
                        format!("failed to get {name} utilization: did not receive metrics for targeted pods (pods might be unready)"),
                    )
                })?;
    let average = average_reading(&samples);
    let current_status = MetricValueStatus {
        average_utilization: utilization.map(|_| percent(outcome.current)),
        average_value: Some(quantity(average)),
        value: None,
    };
    Ok(Evaluation {
        replicas: outcome.replicas,
        description,
        status: MetricStatus {
            type_: "Resource".to_owned(),
            resource: Some(ResourceMetricStatus {
                name: name.to_owned(),
                current: current_status,
            }),
            ..MetricStatus::default()
        },
    })
}

/// A `Pods` metric: one of the agents' per-pod readings by name.
fn pods_metric<S: Store>(
    ctx: &Ctx<S>,
    p: &PodsMetricSource,
    pods: &[Arc<Pod>],
    current: i32,
) -> Result<Evaluation, (&'static str, String)> {
    let name = p.metric.name.as_str();
    let samples: Vec<Sample> = pods
        .iter()
        .map(|pod| Sample {
            unready: phase(pod) == "Pending",
            ignored: ignored(pod),
            value: ctx
                .metrics
                .pod(meta::namespace(&pod.metadata), meta::name(&pod.metadata))
                .and_then(|m| m.values.get(name).copied()),
            weight: 1.0,
        })
        .collect();
    let t = p
        .target
        .average_value
        .as_ref()
        .map_or(0.0, |q| quantity_value("", q));
    let outcome = replicas::desired(&samples, Target { per_weight: t, missing_on_scale_down: t }, current)
                .ok_or_else(|| {
                    (
                        "FailedGetPodsMetric",
                        format!("failed to get pods metric value: unable to get metric {name}: no pod of the target reported it (pods might be unready, or the agents do not report this metric)"),
                    )
                })?;
    Ok(Evaluation {
        replicas: outcome.replicas,
        description: format!("pods metric {name}"),
        status: MetricStatus {
            type_: "Pods".to_owned(),
            pods: Some(PodsMetricStatus {
                metric: MetricIdentifier {
                    name: name.to_owned(),
                    selector: None,
                },
                current: MetricValueStatus {
                    average_value: Some(quantity(outcome.current)),
                    ..MetricValueStatus::default()
                },
            }),
            ..MetricStatus::default()
        },
    })
}

/// The sum of a pod's containers' requests of `resource` (cores or bytes),
/// or which container has none.
fn pod_request(pod: &Pod, resource: &str) -> Result<f64, String> {
    let mut total = 0.0;
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let q = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get(resource))
            .ok_or_else(|| {
                format!(
                    "missing request for {resource} in container {} of Pod {}",
                    c.name,
                    meta::name(&pod.metadata)
                )
            })?;
        total += quantity_value(resource, q);
    }
    Ok(total)
}

/// A quantity as a number: cores for cpu, bytes for memory, else the
/// plain value (`500m` = 0.5).
fn quantity_value(resource: &str, q: &Quantity) -> f64 {
    if resource == "memory" {
        return parse_memory_bytes(&q.0).map_or(0.0, u64_f64);
    }
    parse_cpu_millis(&q.0).map_or(0.0, |m| u64_f64(m) / 1000.0)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "byte counts and millis far below 2^52 in practice"
)]
fn u64_f64(n: u64) -> f64 {
    n as f64
}

/// The average reading of the pods that reported.
fn average_reading(samples: &[Sample]) -> f64 {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| !s.ignored && !s.unready)
        .filter_map(|s| s.value)
        .collect();
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<f64>() / u64_f64(values.len() as u64)
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "a utilization percentage is small"
)]
fn percent(fraction: f64) -> i32 {
    (fraction * 100.0).round() as i32
}

/// A reading as Kubernetes prints quantities: whole numbers plain,
/// others in milli-units (`12`, `12500m`).
pub fn quantity(value: f64) -> Quantity {
    let value = value.max(0.0);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "non-negative readings, rounded"
    )]
    let millis = (value * 1000.0).round() as u64;
    if millis.is_multiple_of(1000) {
        Quantity((millis / 1000).to_string())
    } else {
        Quantity(format!("{millis}m"))
    }
}

/// Writes the target's `spec.replicas` (compare-and-swap, retried on a
/// conflict) and records the outcome.
async fn scale<S: Store>(
    ctx: &Ctx<S>,
    hpa: &HorizontalPodAutoscaler,
    target: &ScaleTarget,
    desired: i32,
    reason: &str,
    report: &mut Report,
) -> Result<(), Error> {
    let ns = meta::namespace(&hpa.metadata);
    let key = format!("{ns}/{}", target.name);
    let written = match target.kind {
        Kind::ReplicaSet => match ctx.replicasets.get(&key) {
            Some(rs) => ctx
                .client
                .update(
                    &ctx.replicasets,
                    "scale",
                    &rs,
                    COMPONENT,
                    |rs: &mut ReplicaSet| set_replicas(&mut rs.spec.replicas, desired),
                )
                .await
                .map(drop),
            None => Ok(()),
        },
        _ => match ctx.deployments.get(&key) {
            Some(d) => ctx
                .client
                .update(
                    &ctx.deployments,
                    "scale",
                    &d,
                    COMPONENT,
                    |d: &mut Deployment| set_replicas(&mut d.spec.replicas, desired),
                )
                .await
                .map(drop),
            None => Ok(()),
        },
    };
    if let Err(e) = written {
        let message = format!("New size: {desired}; reason: {reason}; error: {e}");
        report.set(
            "AbleToScale",
            false,
            "FailedUpdateScale",
            format!("the HPA controller was unable to update the target scale: {e}"),
        );
        ctx.client
            .event(
                Kind::HorizontalPodAutoscaler,
                &hpa.metadata,
                EventType::Warning,
                "FailedRescale",
                &message,
                COMPONENT,
            )
            .await;
        return Err(e);
    }
    report.set(
        "AbleToScale",
        true,
        "SucceededRescale",
        format!("the HPA controller was able to update the target scale to {desired}"),
    );
    report.events.push((
        EventType::Normal,
        "SuccessfulRescale",
        format!("New size: {desired}; reason: {reason}"),
    ));
    Ok(())
}

fn set_replicas(replicas: &mut Option<i32>, desired: i32) -> bool {
    if *replicas == Some(desired) {
        return false;
    }
    *replicas = Some(desired);
    true
}

/// Records the events and writes the status (a change of anything but the
/// current metrics at once; a metrics refresh at most every second).
async fn finish<S: Store>(
    ctx: &Ctx<S>,
    state: &State,
    hpa: &Arc<HorizontalPodAutoscaler>,
    report: Report,
    mut status: HorizontalPodAutoscalerStatus,
) -> Result<(), Error> {
    for (type_, reason, message) in &report.events {
        ctx.client
            .event(
                Kind::HorizontalPodAutoscaler,
                &hpa.metadata,
                *type_,
                reason,
                message,
                COMPONENT,
            )
            .await;
    }
    status.conditions = Some(report.conditions);
    let old = hpa.status.clone().unwrap_or_default();
    let same_but_metrics = HorizontalPodAutoscalerStatus {
        current_metrics: old.current_metrics.clone(),
        ..status.clone()
    } == old;
    if same_but_metrics
        && (old.current_metrics == status.current_metrics
            || !state.refresh_due(&cache::key_of(&hpa.metadata), Instant::now()))
    {
        return Ok(());
    }
    ctx.client
        .update_status(&ctx.hpas, hpa, |_| Some(status.clone()))
        .await
}
