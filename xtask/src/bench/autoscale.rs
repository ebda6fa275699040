//! `cargo xtask bench autoscale`: how fast a load step through a Service
//! brings a new replica Ready and into the endpoints, on real processes —
//! weir (1 s metrics, HPA on metric change) against the same loop with
//! Kubernetes' defaults (15 s metric resolution, 15 s HPA sync) in the
//! same run. The body is the `autoscale_bench` example of weir-tests.

use std::time::Duration;

use serde_json::{Value, json};

use super::example::{Example, all_met, num, print_bench};
use super::util::round3;

/// Target: load step → new replica Ready and in the endpoints, p50, ms.
const P50_MS: f64 = 5_000.0;
/// Target: the same, p99, ms.
const P99_MS: f64 = 10_000.0;
/// Bound on the whole run.
const LIMIT: Duration = Duration::from_hours(1);

/// Targets, ratios and whether each is met.
pub(crate) fn judge(figures: &Value) -> Value {
    let p50 = num(figures, "/weir/reaction/p50_ms");
    let p99 = num(figures, "/weir/reaction/p99_ms");
    let base_p50 = figures
        .pointer("/baseline/reaction/p50_ms")
        .and_then(Value::as_f64);
    let met = json!({
        "reaction_p50_le_5s": p50 <= P50_MS,
        "reaction_p99_le_10s": p99 <= P99_MS,
    });
    json!({
        "ratio": {
            "p50_over_target": round3(p50 / P50_MS),
            "p99_over_target": round3(p99 / P99_MS),
            "baseline_p50_over_weir_p50": base_p50.map(|b| round3(b / p50)),
        },
        "target": {"reaction_p50_ms": P50_MS, "reaction_p99_ms": P99_MS},
        "target_met": all_met(&met),
        "target_met_each": met,
    })
}

/// Runs `cargo xtask bench autoscale` and prints its `BENCH` line.
pub(crate) fn run(reps: usize, baseline_reps: usize, dev: bool) -> anyhow::Result<()> {
    anyhow::ensure!(reps >= 1, "--reps must be at least 1");
    let example = Example {
        name: "autoscale_bench",
        dev,
        control: true,
        args: vec![
            "--reps".into(),
            reps.to_string(),
            "--baseline-reps".into(),
            baseline_reps.to_string(),
        ],
        limit: LIMIT,
    };
    eprintln!(
        "bench autoscale: {reps} reps weir, {baseline_reps} reps baseline ({} build)",
        example.profile()
    );
    let figures = example.run()?;
    let judged = judge(&figures);
    let line = json!({
        "name": "autoscale",
        "profile": example.profile(),
        "weir": figures["weir"],
        "baseline": {
            "name": "same loop, Kubernetes' defaults: agents --metrics-interval 15s (metrics-server resolution), weir-control --hpa-sync-period 15s",
            "figures": figures["baseline"],
        },
        "load": figures["load"],
    });
    print_bench(line, &judged);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_judged_from_the_figures() {
        let good = json!({
            "weir": {"reaction": {"p50_ms": 2500.0, "p99_ms": 4000.0}},
            "baseline": {"reaction": {"p50_ms": 25000.0}},
        });
        let j = judge(&good);
        assert_eq!(j["target_met"], true);
        assert!((j["ratio"]["baseline_p50_over_weir_p50"].as_f64().unwrap() - 10.0).abs() < 1e-9);
        let mut slow = good.clone();
        slow["weir"]["reaction"]["p99_ms"] = json!(12000.0);
        assert_eq!(judge(&slow)["target_met"], false);
        assert_eq!(judge(&json!({}))["target_met"], false);
    }
}
