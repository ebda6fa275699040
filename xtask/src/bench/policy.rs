//! `cargo xtask bench policy`: `NetworkPolicy` costs end to end on real
//! processes (weir-control, three weir-agents in their node netns,
//! containerd, busybox pods): propagation from the API to every node,
//! pod-to-pod throughput with a 1,000-peer policy against no policy — and,
//! in the same run, the same rules as iptables + ipset against no rules —
//! and the agent's CPU for flow records at the highest new-connection rate
//! the machine sustains.
//!
//! The body is the `policy_bench` example of weir-tests (it has the
//! cluster harness and reads the pinned maps with aya); this builds it with
//! the binaries and collects its JSON line.

use std::time::Duration;

use serde_json::{Value, json};

use super::example::{Example, all_met, num, print_bench};
use super::util::round3 as r3;

/// Target: weir's loss (requests/s and new connections/s), %.
const LOSS_PCT: f64 = 3.0;
/// Target: apply → enforced on every node, p99, ms.
const PROPAGATION_P99_MS: f64 = 100.0;
/// Target: flow export CPU, % of one core.
const FLOW_CPU_PCT: f64 = 5.0;
/// Bound on the whole run.
const LIMIT: Duration = Duration::from_hours(1);

/// Options of `cargo xtask bench policy`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PolicyArgs {
    /// Ingress peers of the policy (half ipBlock /32s, half selectors).
    #[arg(long, default_value_t = 1000)]
    pub peers: usize,
    /// Paired repetitions of the throughput and flow measurements.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Propagation repetitions.
    #[arg(long, default_value_t = 50)]
    pub prop_reps: usize,
    /// Seconds per wrk run (throughput).
    #[arg(long, default_value_t = 5)]
    pub secs: u32,
    /// Seconds per wrk run (flow export CPU).
    #[arg(long, default_value_t = 10)]
    pub cpu_secs: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 16)]
    pub conns: u32,
    /// Build in the dev profile instead of release (shared machines).
    #[arg(long)]
    pub dev: bool,
    /// Run only these parts (comma-separated: propagation, throughput,
    /// flows); the targets of the others are reported as not met.
    #[arg(long)]
    pub only: Option<String>,
}

/// Builds the binaries and the example, runs it, returns its JSON line.
fn run_example(a: &PolicyArgs) -> anyhow::Result<Value> {
    let mut args = Vec::new();
    if let Some(only) = &a.only {
        args.extend(["--only".to_owned(), only.clone()]);
    }
    for (k, v) in [
        ("--peers", a.peers.to_string()),
        ("--reps", a.reps.to_string()),
        ("--prop-reps", a.prop_reps.to_string()),
        ("--secs", a.secs.to_string()),
        ("--cpu-secs", a.cpu_secs.to_string()),
        ("--threads", a.threads.to_string()),
        ("--conns", a.conns.to_string()),
    ] {
        args.extend([k.to_owned(), v]);
    }
    let example = Example {
        name: "policy_bench",
        dev: a.dev,
        control: true,
        args,
        limit: LIMIT,
    };
    eprintln!(
        "bench policy: {} peers, {} reps × {} s, {} propagation reps ({} build)",
        a.peers,
        a.reps,
        a.secs,
        a.prop_reps,
        example.profile()
    );
    example.run()
}

/// Targets, ratios (figure / target: ≤ 1 meets it) and whether each is met.
pub(crate) fn judge(figures: &Value) -> Value {
    let ka = num(figures, "/throughput/weir/keepalive/loss_pct_median");
    let close = num(figures, "/throughput/weir/close/loss_pct_median");
    let prop = num(figures, "/propagation/probe_every_node/p99_ms");
    let prop_map = num(figures, "/propagation/map_every_node/p99_ms");
    let flow = num(figures, "/flow_export/cost_pct_of_one_core_median");
    let met = json!({
        "requests_loss_le_3pct": ka <= LOSS_PCT,
        "new_connections_loss_le_3pct": close <= LOSS_PCT,
        "propagation_p99_le_100ms": prop <= PROPAGATION_P99_MS,
        "flow_export_le_5pct_core": flow <= FLOW_CPU_PCT,
    });
    let all = all_met(&met);
    json!({
        "ratio": {
            "requests_loss_over_target": r3(ka.max(0.0) / LOSS_PCT),
            "new_connections_loss_over_target": r3(close.max(0.0) / LOSS_PCT),
            "propagation_p99_over_target": r3(prop / PROPAGATION_P99_MS),
            "propagation_map_p99_over_target": r3(prop_map / PROPAGATION_P99_MS),
            "flow_export_over_target": r3(flow.max(0.0) / FLOW_CPU_PCT),
            "weir_vs_iptables_ipset": figures.pointer("/throughput/ratio").cloned().unwrap_or(Value::Null),
        },
        "target": {
            "loss_pct": LOSS_PCT,
            "propagation_p99_ms": PROPAGATION_P99_MS,
            "flow_export_pct_of_one_core": FLOW_CPU_PCT,
        },
        "target_met_each": met,
        "target_met": all,
    })
}

/// Checks `cargo xtask bench policy`'s options, then runs it.
pub(super) fn run_args(a: &PolicyArgs) -> anyhow::Result<()> {
    anyhow::ensure!((4..=20_000).contains(&a.peers), "--peers must be 4..=20000");
    anyhow::ensure!(a.reps >= 1 && a.prop_reps >= 1, "reps must be at least 1");
    crate::setup::setup()?;
    run(a)
}

/// Runs `cargo xtask bench policy` and prints its `BENCH` line.
pub(crate) fn run(a: &PolicyArgs) -> anyhow::Result<()> {
    let figures = run_example(a)?;
    let judged = judge(&figures);
    let line = json!({
        "name": "policy",
        "peers": a.peers,
        "profile": if a.dev { "dev" } else { "release" },
        "parts": a.only.as_deref().unwrap_or("propagation,throughput,flows"),
        "figures": figures,
        "baseline": {
            "name": "the same ingress rules as iptables + ipset (one set and one --match-set/--dport rule per peer, conntrack ESTABLISHED first) vs no rules, plain netns pair, same responder and wrk",
            "figures": figures.pointer("/throughput/iptables_ipset").cloned().unwrap_or(Value::Null),
            "published": "Cilium: policy propagation < 600 ms per endpoint",
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
            "throughput": {"weir": {"keepalive": {"loss_pct_median": 1.5},
                                     "close": {"loss_pct_median": -0.5}}},
            "propagation": {"probe_every_node": {"p99_ms": 40.0},
                            "map_every_node": {"p99_ms": 30.0}},
            "flow_export": {"cost_pct_of_one_core_median": 1.0},
        });
        let j = judge(&good);
        assert_eq!(j["target_met"], true);
        assert!((j["ratio"]["requests_loss_over_target"].as_f64().unwrap() - 0.5).abs() < 1e-9);
        let mut slow = good.clone();
        slow["propagation"]["probe_every_node"]["p99_ms"] = json!(150.0);
        assert_eq!(judge(&slow)["target_met"], false);
        let j = judge(&json!({}));
        assert_eq!(j["target_met"], false);
        assert_eq!(j["target_met_each"]["flow_export_le_5pct_core"], false);
    }
}
