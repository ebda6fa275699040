//! `spec.behavior`: Kubernetes' normalization of a metric-based
//! recommendation (`normalizeDesiredReplicasWithBehaviors`): stabilization
//! over a window of past recommendations (the highest of the scale-down
//! window, the lowest of the scale-up window), then the scale-up and
//! scale-down rate policies over the scale events of their periods, then
//! `[minReplicas, maxReplicas]`. Pure: the caller keeps the [`History`]
//! and passes the time.

use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::HPAScalingRules;

/// Which policy wins when several apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// The policy allowing the largest change (default).
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No scaling in this direction.
    Disabled,
}

/// One rate policy: at most `value` pods (or percent) per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `true`: `value` pods; `false`: `value` percent.
    pub pods: bool,
    /// The amount.
    pub value: i32,
    /// The period the amount is counted over.
    pub period: Duration,
}

/// The rules of one direction, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Stabilization window.
    pub window: Duration,
    /// How policies combine.
    pub select: Select,
    /// The rate policies.
    pub policies: Vec<Policy>,
}

impl Rules {
    /// The rules in force for `up` (or down) from the HPA's behavior, with
    /// Kubernetes' defaults for what it leaves out.
    pub fn from_spec(up: bool, given: Option<&HPAScalingRules>) -> Self {
        let rules = weir_proto::manifest::hpa_default_rules(up, given);
        let seconds = |s: i32| Duration::from_secs(u64::try_from(s).unwrap_or_default());
        Self {
            window: seconds(rules.stabilization_window_seconds.unwrap_or_default()),
            select: match rules.select_policy.as_deref() {
                Some("Min") => Select::Min,
                Some("Disabled") => Select::Disabled,
                _ => Select::Max,
            },
            policies: rules
                .policies
                .unwrap_or_default()
                .iter()
                .map(|p| Policy {
                    pods: p.type_ == "Pods",
                    value: p.value,
                    period: seconds(p.period_seconds),
                })
                .collect(),
        }
    }

    fn longest_period(&self) -> Duration {
        self.policies
            .iter()
            .map(|p| p.period)
            .max()
            .unwrap_or_default()
    }
}

/// What one HPA remembers between reconciles (in memory, as Kubernetes'
/// controller: a restart forgets it and starts stabilizing afresh).
#[derive(Debug, Default, Clone)]
pub struct History {
    recommendations: Vec<(Instant, i32)>,
    scale_up: Vec<(Instant, i32)>,
    scale_down: Vec<(Instant, i32)>,
}

impl History {
    /// Records a rescale from `from` to `to` replicas at `now`, for the
    /// rate policies; events older than the longest period are dropped.
    pub fn record_scale(&mut self, now: Instant, from: i32, to: i32, up: &Rules, down: &Rules) {
        let keep = |events: &mut Vec<(Instant, i32)>, period: Duration| {
            events.retain(|(at, _)| now.saturating_duration_since(*at) <= period);
        };
        keep(&mut self.scale_up, up.longest_period());
        keep(&mut self.scale_down, down.longest_period());
        if to > from {
            self.scale_up.push((now, to - from));
        } else if to < from {
            self.scale_down.push((now, from - to));
        }
    }
}

/// The inputs of one normalization.
#[derive(Debug, Clone, Copy)]
pub struct Args<'a> {
    /// The target's replicas now.
    pub current: i32,
    /// What the metrics ask for.
    pub recommended: i32,
    /// `spec.minReplicas`.
    pub min: i32,
    /// `spec.maxReplicas`.
    pub max: i32,
    /// Scale-up rules.
    pub up: &'a Rules,
    /// Scale-down rules.
    pub down: &'a Rules,
}

/// The normalized count and the conditions explaining it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The count to scale to.
    pub desired: i32,
    /// `AbleToScale` reason: `ScaleUpStabilized`, `ScaleDownStabilized`
    /// or `ReadyForNewScale`.
    pub able_reason: &'static str,
    /// Its message.
    pub able_message: &'static str,
    /// Whether `ScalingLimited` is true (a rate or bound cut the count).
    pub limited: bool,
    /// `ScalingLimited` reason: `ScaleUpLimit`, `ScaleDownLimit`,
    /// `TooManyReplicas`, `TooFewReplicas` or `DesiredWithinRange`.
    pub limited_reason: &'static str,
    /// Its message.
    pub limited_message: &'static str,
}

/// Normalizes `args.recommended` at `now`, recording it in `history`.
pub fn normalize(history: &mut History, now: Instant, args: Args<'_>) -> Normalized {
    let stabilized = stabilize(history, now, &args);
    let (able_reason, able_message) = match stabilized.cmp(&args.recommended) {
        std::cmp::Ordering::Equal => ("ReadyForNewScale", "recommended size matches current size"),
        std::cmp::Ordering::Less => (
            "ScaleUpStabilized",
            "recent recommendations were lower than current one, applying the lowest recent recommendation",
        ),
        std::cmp::Ordering::Greater => (
            "ScaleDownStabilized",
            "recent recommendations were higher than current one, applying the highest recent recommendation",
        ),
    };
    let (desired, limited_reason, limited_message) = rate_limit(history, now, stabilized, &args);
    Normalized {
        desired,
        able_reason,
        able_message,
        limited: desired != stabilized,
        limited_reason,
        limited_message,
    }
}

/// Kubernetes' `stabilizeRecommendationWithBehaviors`.
fn stabilize(history: &mut History, now: Instant, args: &Args<'_>) -> i32 {
    let within = |at: Instant, window: Duration| now.saturating_duration_since(at) < window;
    let mut up = args.recommended;
    let mut down = args.recommended;
    for &(at, r) in &history.recommendations {
        if within(at, args.up.window) {
            up = up.min(r);
        }
        if within(at, args.down.window) {
            down = down.max(r);
        }
    }
    let longest = args.up.window.max(args.down.window);
    history
        .recommendations
        .retain(|&(at, _)| within(at, longest));
    history.recommendations.push((now, args.recommended));
    args.current.max(up).min(down)
}

/// Kubernetes' `convertDesiredReplicasWithBehaviorRate`.
fn rate_limit(
    history: &History,
    now: Instant,
    desired: i32,
    args: &Args<'_>,
) -> (i32, &'static str, &'static str) {
    let current = args.current;
    if desired > current {
        let limit = scale_limit(current, history, now, args.up, true).max(current);
        let (allowed, reason, message) = if args.max > limit {
            (
                limit,
                "ScaleUpLimit",
                "the desired replica count is increasing faster than the maximum scale rate",
            )
        } else {
            (
                args.max,
                "TooManyReplicas",
                "the desired replica count is more than the maximum replica count",
            )
        };
        if desired > allowed {
            return (allowed, reason, message);
        }
    } else if desired < current {
        let limit = scale_limit(current, history, now, args.down, false).min(current);
        let (allowed, reason, message) = if args.min < limit {
            (
                limit,
                "ScaleDownLimit",
                "the desired replica count is decreasing faster than the maximum scale rate",
            )
        } else {
            (
                args.min,
                "TooFewReplicas",
                "the desired replica count is less than the minimum replica count",
            )
        };
        if desired < allowed {
            return (allowed, reason, message);
        }
    }
    (
        desired,
        "DesiredWithinRange",
        "the desired count is within the acceptable range",
    )
}

/// The most (up) or fewest (down) replicas the policies allow now, from
/// the count at the start of each policy's period.
fn scale_limit(current: i32, history: &History, now: Instant, rules: &Rules, up: bool) -> i32 {
    if rules.select == Select::Disabled {
        return current;
    }
    let changed = |events: &[(Instant, i32)], period: Duration| -> i32 {
        events
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) < period)
            .map(|(_, n)| n)
            .sum()
    };
    // Max picks the largest change: the highest limit up, the lowest down.
    let widest = (rules.select == Select::Max) == up;
    let mut result: Option<i32> = None;
    for p in &rules.policies {
        let start =
            current - changed(&history.scale_up, p.period) + changed(&history.scale_down, p.period);
        let proposed = match (p.pods, up) {
            (true, true) => start.saturating_add(p.value),
            (true, false) => start - p.value,
            (false, true) => ceil_i32(f64::from(start) * (1.0 + f64::from(p.value) / 100.0)),
            (false, false) => floor_i32(f64::from(start) * (1.0 - f64::from(p.value) / 100.0)),
        };
        result = Some(match result {
            None => proposed,
            Some(r) if widest => r.max(proposed),
            Some(r) => r.min(proposed),
        });
    }
    result.unwrap_or(current)
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "replica counts are small; saturating cast"
)]
pub(super) fn ceil_i32(x: f64) -> i32 {
    x.ceil() as i32
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "replica counts are small; saturating cast"
)]
fn floor_i32(x: f64) -> i32 {
    x.floor() as i32
}
