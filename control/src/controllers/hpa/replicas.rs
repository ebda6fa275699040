//! Kubernetes' replica calculator (`replica_calculator.go`) for one
//! metric: `desired = ceil(ratio × ready pods)` where `ratio` is the
//! current value over the target, within a 10 % tolerance nothing changes.
//!
//! Pods are grouped as Kubernetes does: terminating and failed pods are
//! ignored; pending pods (and, for cpu, the pods [`cpu_unready`] sets
//! aside) are unready and their samples dropped; pods without a sample are
//! missing.
//! When some pods are unready or missing the calculation is redone
//! conservatively: on a scale-up missing and unready pods count as using
//! nothing, on a scale-down missing pods count as using their whole
//! request (utilization) or exactly the target (values), and if that flips
//! the direction or lands within the tolerance, nothing changes.

use super::behavior::ceil_i32;

/// Kubernetes' default tolerance (`--horizontal-pod-autoscaler-tolerance`).
pub const TOLERANCE: f64 = 0.1;

/// Kubernetes' `--horizontal-pod-autoscaler-cpu-initialization-period`
/// default, ms: a pod this young has its cpu sample used only when it is
/// Ready and the sample's window lies wholly after it became Ready.
pub const CPU_INITIALIZATION_MS: i64 = 5 * 60 * 1000;
/// Kubernetes' `--horizontal-pod-autoscaler-initial-readiness-delay`
/// default, ms: an older pod not Ready whose readiness last changed within
/// this of its start has never been ready.
pub const INITIAL_READINESS_DELAY_MS: i64 = 30 * 1000;

/// A pod's readiness and start, as [`cpu_unready`] needs them (ms since
/// the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Its `Ready` condition: (status is True, last transition), if any.
    pub ready: Option<(bool, i64)>,
    /// `status.startTime`, if set.
    pub started: Option<i64>,
}

/// Whether a pod's cpu sample (taken at `sample_ms` over `window_ms`) is set
/// aside as unready, by Kubernetes' rule (`groupPods`): with no `Ready`
/// condition or start time, yes; within [`CPU_INITIALIZATION_MS`] of its
/// start, when it is not Ready or the sample's window began before it
/// became Ready (start-up CPU is not load); later, only when it is not
/// Ready and has never been ready (its readiness last changed within
/// [`INITIAL_READINESS_DELAY_MS`] of its start). A pod that was ready and
/// has turned unready since is counted with its sample.
#[must_use]
pub fn cpu_unready(pod: Readiness, sample_ms: i64, window_ms: i64, now_ms: i64) -> bool {
    let (Some((ready, since)), Some(started)) = (pod.ready, pod.started) else {
        return true;
    };
    if started.saturating_add(CPU_INITIALIZATION_MS) > now_ms {
        !ready || sample_ms < since.saturating_add(window_ms)
    } else {
        !ready && started.saturating_add(INITIAL_READINESS_DELAY_MS) > since
    }
}

/// One pod of the target, as the calculation sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Counts as unready (pending; for cpu also [`cpu_unready`]).
    pub unready: bool,
    /// Terminating or failed: left out entirely.
    pub ignored: bool,
    /// Its reading, if it has a fresh one.
    pub value: Option<f64>,
    /// Its weight: the pod's request for utilization, 1 for plain values.
    pub weight: f64,
}

/// A metric's target in the samples' units: a fraction of the request
/// (utilization 50 % = 0.5) or a value per pod.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    /// The target per unit of weight.
    pub per_weight: f64,
    /// What a missing pod is assumed to read per unit of weight on a
    /// scale-down: 1.0 (its whole request) for utilization, the target for
    /// plain values.
    pub missing_on_scale_down: f64,
}

/// The outcome for one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// The replica count this metric asks for.
    pub replicas: i32,
    /// The current value per unit of weight over the pods that reported
    /// (utilization as a fraction, or the average value).
    pub current: f64,
}

fn ratio(samples: &[(f64, f64)], target: f64) -> f64 {
    let (value, weight) = samples
        .iter()
        .fold((0.0, 0.0), |(v, w), (sv, sw)| (v + sv, w + sw));
    if weight <= 0.0 || target <= 0.0 {
        return 1.0;
    }
    value / weight / target
}

#[expect(clippy::cast_precision_loss, reason = "pod counts are far below 2^52")]
fn count(n: usize) -> f64 {
    n as f64
}

/// The replicas one metric asks for with `current` replicas, or `None` if
/// no pod has a usable sample (Kubernetes: "did not receive metrics for
/// targeted pods (pods might be unready)").
pub fn desired(samples: &[Sample], target: Target, current: i32) -> Option<Outcome> {
    let mut reported: Vec<(f64, f64)> = Vec::new();
    let mut unready = Vec::new();
    let mut missing = Vec::new();
    for s in samples.iter().filter(|s| !s.ignored) {
        match (s.unready, s.value) {
            (true, _) => unready.push(s.weight),
            (false, None) => missing.push(s.weight),
            (false, Some(v)) => reported.push((v, s.weight)),
        }
    }
    if reported.is_empty() {
        return None;
    }
    let first = ratio(&reported, target.per_weight);
    let current_value = first * target.per_weight;
    let outcome = |replicas| {
        Some(Outcome {
            replicas,
            current: current_value,
        })
    };
    let scale_up_with_unready = !unready.is_empty() && first > 1.0;
    if !scale_up_with_unready && missing.is_empty() {
        if (1.0 - first).abs() <= TOLERANCE {
            return outcome(current);
        }
        return outcome(ceil_i32(first * count(reported.len())));
    }
    let mut all = reported;
    let fill = if first < 1.0 {
        target.missing_on_scale_down
    } else {
        0.0
    };
    all.extend(missing.iter().map(|&w| (fill * w, w)));
    if scale_up_with_unready {
        all.extend(unready.iter().map(|&w| (0.0, w)));
    }
    let second = ratio(&all, target.per_weight);
    if (1.0 - second).abs() <= TOLERANCE
        || (first < 1.0 && second > 1.0)
        || (first > 1.0 && second < 1.0)
    {
        return outcome(current);
    }
    let replicas = ceil_i32(second * count(all.len()));
    if (second < 1.0 && replicas > current) || (second > 1.0 && replicas < current) {
        return outcome(current);
    }
    outcome(replicas)
}
