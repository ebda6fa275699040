//! `cargo xtask bench metrics`: what weir's metrics cost on a real node
//! (the `metrics_bench` example of weir-tests does the work; this builds it
//! with the agent and judges its figures): the agent's CPU for 1 s sampling
//! at 110 pods (sampling on vs off, same run) and the eBPF counters' and
//! tracepoint's cost in pod-to-pod requests/s (attached vs detached,
//! paired reps, same run).

use std::time::Duration;

use serde_json::{Value, json};

use super::example::{Example, all_met, num, print_bench};
use super::util::round3 as r3;

/// Target: agent CPU for 1 s sampling, % of one core.
const CPU_PCT: f64 = 2.0;
/// Target: requests/s lost to the counters, %.
const LOSS_PCT: f64 = 2.0;
/// Bound on the whole run.
const LIMIT: Duration = Duration::from_mins(40);

/// Options of `cargo xtask bench metrics`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct MetricsArgs {
    /// Pods on the node.
    #[arg(long, default_value_t = 110)]
    pub pods: usize,
    /// Length of each idle CPU window, in seconds.
    #[arg(long, default_value_t = 30)]
    pub idle_secs: u64,
    /// CPU window pairs (on, off).
    #[arg(long, default_value_t = 2)]
    pub cpu_reps: usize,
    /// Paired wrk repetitions.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    pub secs: u32,
    /// Build in the dev profile instead of release (shared machines).
    #[arg(long)]
    pub dev: bool,
}

fn run_example(a: &MetricsArgs) -> anyhow::Result<Value> {
    let mut args = Vec::new();
    for (k, v) in [
        ("--pods", a.pods.to_string()),
        ("--idle-secs", a.idle_secs.to_string()),
        ("--cpu-reps", a.cpu_reps.to_string()),
        ("--reps", a.reps.to_string()),
        ("--secs", a.secs.to_string()),
    ] {
        args.extend([k.to_owned(), v]);
    }
    let example = Example {
        name: "metrics_bench",
        dev: a.dev,
        control: false,
        args,
        limit: LIMIT,
    };
    eprintln!(
        "bench metrics: {} pods, {} × 2 idle windows of {} s, {} paired wrk reps × {} s ({} build)",
        a.pods,
        a.cpu_reps,
        a.idle_secs,
        a.reps,
        a.secs,
        example.profile()
    );
    example.run()
}

/// Ratios (figure / target: ≤ 1 meets it) and whether each target is met.
pub(crate) fn judge(figures: &Value) -> Value {
    let cpu = num(figures, "/agent_cpu/cost_pct_of_one_core_median");
    let loss = num(figures, "/requests/loss_pct_median");
    let met = json!({
        "agent_cpu_le_2pct_core": cpu <= CPU_PCT,
        "requests_loss_le_2pct": loss <= LOSS_PCT,
    });
    let all = all_met(&met);
    json!({
        "ratio": {
            "agent_cpu_over_target": r3(cpu.max(0.0) / CPU_PCT),
            "requests_loss_over_target": r3(loss.max(0.0) / LOSS_PCT),
        },
        "target": {"agent_cpu_pct_of_one_core": CPU_PCT, "requests_loss_pct": LOSS_PCT},
        "target_met_each": met,
        "target_met": all,
    })
}

/// Checks `cargo xtask bench metrics`'s options, then runs it.
pub(super) fn run_args(a: &MetricsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (3..=super::MAX_PODS).contains(&a.pods),
        "--pods must be 3..={}",
        super::MAX_PODS
    );
    anyhow::ensure!(a.reps >= 1 && a.cpu_reps >= 1, "reps must be at least 1");
    crate::setup::setup()?;
    run(a)
}

/// Runs `cargo xtask bench metrics` and prints its `BENCH` line.
pub(crate) fn run(a: &MetricsArgs) -> anyhow::Result<()> {
    let figures = run_example(a)?;
    let judged = judge(&figures);
    let line = json!({
        "name": "metrics",
        "pods": a.pods,
        "profile": if a.dev { "dev" } else { "release" },
        "figures": figures,
        "baseline": {
            "name": "same run: the agent with --metrics-interval 0 (sampling off); the node with every eBPF counter link removed (detached)",
        },
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
            "agent_cpu": {"cost_pct_of_one_core_median": 0.5},
            "requests": {"loss_pct_median": -0.4},
        });
        let j = judge(&good);
        assert_eq!(j["target_met"], true);
        assert!((j["ratio"]["agent_cpu_over_target"].as_f64().unwrap() - 0.25).abs() < 1e-9);
        let mut bad = good.clone();
        bad["requests"]["loss_pct_median"] = json!(3.0);
        assert_eq!(judge(&bad)["target_met"], false);
        assert_eq!(judge(&json!({}))["target_met"], false);
    }
}
