//! The autoscaler's decisions without I/O: the replica calculation with
//! its tolerance and missing/unready pods, and the behavior (rate limits,
//! stabilization, and that a noisy metric does not make it flap).

use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::{HPAScalingPolicy, HPAScalingRules};

use super::behavior::{self, Args, History, Rules};
use super::replicas::{CPU_INITIALIZATION_MS, Readiness, Sample, Target, cpu_unready, desired};

fn ready(value: f64, request: f64) -> Sample {
    Sample {
        unready: false,
        ignored: false,
        value: Some(value),
        weight: request,
    }
}

/// Utilization target of `percent`.
fn util(percent: f64) -> Target {
    Target {
        per_weight: percent / 100.0,
        missing_on_scale_down: 1.0,
    }
}

#[test]
fn desired_is_ceil_of_ready_pods_times_ratio() {
    // 4 pods at 100% of a 50% target: twice as many.
    let pods = vec![ready(0.1, 0.1); 4];
    assert_eq!(desired(&pods, util(50.0), 4).expect("metrics").replicas, 8);
    // 4 pods at 30% of 50%: ceil(0.6 × 4) = 3.
    let pods = vec![ready(0.03, 0.1); 4];
    let out = desired(&pods, util(50.0), 4).expect("metrics");
    assert_eq!(out.replicas, 3);
    assert!((out.current - 0.3).abs() < 1e-9);
    // A plain value target (connections per second): 3 pods at 25/s, target 10.
    let pods = vec![ready(25.0, 1.0); 3];
    let target = Target {
        per_weight: 10.0,
        missing_on_scale_down: 10.0,
    };
    assert_eq!(desired(&pods, target, 3).expect("metrics").replicas, 8);
}

#[test]
fn within_the_tolerance_nothing_changes() {
    for usage in [0.046, 0.05, 0.054] {
        let pods = vec![ready(usage, 0.1); 5];
        assert_eq!(
            desired(&pods, util(50.0), 5).expect("metrics").replicas,
            5,
            "{usage}"
        );
    }
    let pods = vec![ready(0.056, 0.1); 5];
    assert_eq!(desired(&pods, util(50.0), 5).expect("metrics").replicas, 6);
}

#[test]
fn missing_and_unready_pods_are_counted_conservatively() {
    let missing = Sample {
        value: None,
        ..ready(0.0, 0.1)
    };
    let unready = Sample {
        unready: true,
        ..ready(0.0, 0.1)
    };
    // Scale-up: missing pods count as idle. 2 at 150% of 50% (ratio 3)
    // and 2 missing: ratio 1.5 over 4 pods = 6.
    let pods = vec![ready(0.15, 0.1), ready(0.15, 0.1), missing, missing];
    assert_eq!(desired(&pods, util(50.0), 4).expect("metrics").replicas, 6);
    // Scale-up with unready pods: they count as idle; here that lands in
    // the tolerance, so no change.
    let pods = vec![ready(0.055, 0.1), ready(0.055, 0.1), unready, unready];
    assert_eq!(desired(&pods, util(50.0), 4).expect("metrics").replicas, 4);
    // Scale-down: missing pods count as using their whole request (100%),
    // which flips the direction: no change.
    let pods = vec![ready(0.01, 0.1), missing, missing];
    assert_eq!(desired(&pods, util(50.0), 3).expect("metrics").replicas, 3);
    // No pod with a sample: no recommendation at all.
    assert!(desired(&[missing, unready], util(50.0), 2).is_none());
    // Ignored (terminating) pods do not count.
    let gone = Sample {
        ignored: true,
        ..ready(10.0, 0.1)
    };
    assert_eq!(
        desired(&[ready(0.05, 0.1), gone], util(50.0), 1)
            .expect("m")
            .replicas,
        1
    );
}

fn rules(up: bool) -> Rules {
    Rules::from_spec(up, None)
}

fn args<'a>(current: i32, recommended: i32, up: &'a Rules, down: &'a Rules) -> Args<'a> {
    Args {
        current,
        recommended,
        min: 1,
        max: 50,
        up,
        down,
    }
}

#[test]
fn default_scale_up_is_max_of_4_pods_and_100_percent_per_15s() {
    let (up, down) = (rules(true), rules(false));
    let t0 = Instant::now();
    let mut h = History::default();
    let n = behavior::normalize(&mut h, t0, args(1, 20, &up, &down));
    assert_eq!(n.desired, 5, "1 + 4 pods beats 1 + 100%");
    assert!(n.limited);
    assert_eq!(n.limited_reason, "ScaleUpLimit");
    h.record_scale(t0, 1, 5, &up, &down);
    // Within the same 15 s the period started at 1: still at most 5.
    let n = behavior::normalize(&mut h, t0 + Duration::from_secs(5), args(5, 20, &up, &down));
    assert_eq!(n.desired, 5);
    // After the period: 100% of 5 beats 4 pods.
    let n = behavior::normalize(
        &mut h,
        t0 + Duration::from_secs(16),
        args(5, 20, &up, &down),
    );
    assert_eq!(n.desired, 10);
    // The max bound.
    let mut small = args(10, 80, &up, &down);
    small.max = 12;
    let n = behavior::normalize(&mut History::default(), t0, small);
    assert_eq!((n.desired, n.limited_reason), (12, "TooManyReplicas"));
}

#[test]
fn scale_down_waits_for_the_stabilization_window() {
    let (up, down) = (rules(true), rules(false));
    assert_eq!(down.window, Duration::from_mins(5));
    let t0 = Instant::now();
    let mut h = History::default();
    let n = behavior::normalize(&mut h, t0, args(10, 10, &up, &down));
    assert_eq!(n.able_reason, "ReadyForNewScale");
    let n = behavior::normalize(&mut h, t0 + Duration::from_mins(1), args(10, 3, &up, &down));
    assert_eq!((n.desired, n.able_reason), (10, "ScaleDownStabilized"));
    let later = t0 + Duration::from_secs(301);
    let n = behavior::normalize(&mut h, later, args(10, 3, &up, &down));
    assert_eq!((n.desired, n.able_reason), (3, "ReadyForNewScale"));
    // A user's rule: at most 1 pod per 60 s down, Disabled up.
    let custom_down = Rules::from_spec(
        false,
        Some(&HPAScalingRules {
            stabilization_window_seconds: Some(0),
            policies: Some(vec![HPAScalingPolicy {
                type_: "Pods".into(),
                value: 1,
                period_seconds: 60,
            }]),
            ..HPAScalingRules::default()
        }),
    );
    let disabled_up = Rules::from_spec(
        true,
        Some(&HPAScalingRules {
            select_policy: Some("Disabled".into()),
            ..HPAScalingRules::default()
        }),
    );
    let mut h = History::default();
    let n = behavior::normalize(&mut h, t0, args(10, 3, &disabled_up, &custom_down));
    assert_eq!((n.desired, n.limited_reason), (9, "ScaleDownLimit"));
    let n = behavior::normalize(&mut h, t0, args(10, 30, &disabled_up, &custom_down));
    assert_eq!(n.desired, 10, "scale-up disabled");
}

/// A metric that wobbles ±30 % around the target every second for ten
/// minutes, fed through the calculation and the default behavior with
/// the replicas following the decisions: the replica count may go up,
/// and it may come down once, but never back and forth.
#[test]
fn a_noisy_metric_around_the_target_does_not_flap() {
    let (up, down) = (rules(true), rules(false));
    let t0 = Instant::now();
    let mut h = History::default();
    let mut replicas = 4;
    let total_load = 0.2; // cores; at 50% of 100m requests: 4 pods exactly
    let mut directions = Vec::new();
    for second in 0..600u32 {
        let wobble = match second % 4 {
            0 => 1.3,
            1 => 0.7,
            2 => 1.15,
            _ => 0.8,
        };
        let per_pod = total_load * wobble / f64::from(replicas);
        let pods = vec![ready(per_pod, 0.1); usize::try_from(replicas).expect("small")];
        let proposal = desired(&pods, util(50.0), replicas)
            .expect("metrics")
            .replicas;
        let now = t0 + Duration::from_secs(u64::from(second));
        let n = behavior::normalize(&mut h, now, args(replicas, proposal, &up, &down));
        if n.desired != replicas {
            directions.push(n.desired > replicas);
            h.record_scale(now, replicas, n.desired, &up, &down);
            replicas = n.desired;
        }
    }
    let reversals = directions.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        reversals <= 1,
        "{reversals} reversals: {directions:?} (ended at {replicas})"
    );
    assert!((4..=6).contains(&replicas), "ended at {replicas}");
}

#[test]
fn cpu_readiness_follows_kubernetes_group_pods() {
    let (s, min) = (1000, 60_000);
    let pod = |ready: Option<(bool, i64)>, started: Option<i64>| Readiness { ready, started };
    let now = 1_000_000;
    // No condition or no start time: unready.
    assert!(cpu_unready(pod(None, Some(now - min)), now, s, now));
    assert!(cpu_unready(pod(Some((true, now - min)), None), now, s, now));
    // Young pod (inside the initialization period).
    let young = now - min;
    assert!(
        cpu_unready(pod(Some((false, young)), Some(young)), now, s, now),
        "not Ready"
    );
    let became_ready = now - 500;
    assert!(
        cpu_unready(pod(Some((true, became_ready)), Some(young)), now, s, now),
        "sample window began before it became Ready: start-up CPU"
    );
    assert!(
        !cpu_unready(pod(Some((true, now - 2 * s)), Some(young)), now, s, now),
        "a whole window after it became Ready"
    );
    // Older pod.
    let old = now - CPU_INITIALIZATION_MS - min;
    assert!(
        !cpu_unready(pod(Some((false, now - min)), Some(old)), now, s, now),
        "was ready, turned unready since: counted"
    );
    assert!(
        cpu_unready(pod(Some((false, old + 10 * s)), Some(old)), now, s, now),
        "never ready (last change within 30 s of its start)"
    );
    assert!(!cpu_unready(
        pod(Some((true, old + 10 * s)), Some(old)),
        now,
        s,
        now
    ));
}
