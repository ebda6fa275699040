//! `cargo xtask bench lb-programming`: service programming latency end to
//! end, on real processes: a Service/EndpointSlice change written through
//! weir-control's API → `WatchNode` → weir-agent (control mode, own node
//! netns, private containerd) → the node's pinned eBPF maps, read from
//! outside. 10k selectorless Services × 4 user-written endpoints loaded
//! through the API, then single endpoint changes and Service
//! creates/deletes timed from the API call to the maps, an agent SIGKILL
//! with changes made while it is down timed from its restart, and a new
//! node programming the whole table from the store.
//!
//! The body is the `lb_programming` example of weir-tests (xtask does not
//! link the agent or the control; the example has the harness and reads
//! the pinned maps with aya); this builds it with the binaries and collects
//! its JSON line. `cargo xtask bench lb` measures `iptables-restore` of the
//! same table (kube-proxy's programming step), to put beside these figures.

use std::time::Duration;

use serde_json::{Value, json};

use super::example::{Example, all_met, num, print_bench};

/// Target: a single change's p99, store → maps, ms.
const CHANGE_P99_MS: f64 = 50.0;
/// Target: an agent restart's resync, process start → maps current, ms.
const RESYNC_MS: f64 = 2000.0;
/// Bound on the whole run (the example bounds each of its phases too).
const LIMIT: Duration = Duration::from_hours(1);

/// Builds the binaries and the example (release unless `dev`), runs it
/// with `services` services and `changes` single changes, and returns its
/// figures (the example's JSON line).
pub(crate) fn run_e2e(services: usize, changes: usize, dev: bool) -> anyhow::Result<Value> {
    let example = Example {
        name: "lb_programming",
        dev,
        control: true,
        args: vec![
            "--services".into(),
            services.to_string(),
            "--changes".into(),
            changes.to_string(),
        ],
        limit: LIMIT,
    };
    eprintln!(
        "bench lb-programming: {services} services, {changes} changes ({} build)",
        example.profile()
    );
    example.run()
}

/// The `BENCH` line's fields for the figures of [`run_e2e`]: targets,
/// ratios (figure / target: ≤ 1 meets it) and whether each is met.
pub(crate) fn judge(figures: &Value) -> Value {
    let change_p99 = num(figures, "/endpoint_change/p99_ms");
    let restart = num(figures, "/restart/process_start_to_changes_visible_ms");
    let flushed = figures
        .pointer("/restart/flushed")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let met = json!({
        "change_p99_le_50ms": change_p99 <= CHANGE_P99_MS,
        "restart_resync_le_2s": restart <= RESYNC_MS,
        "restart_without_flush": !flushed,
    });
    let all = all_met(&met);
    json!({
        "ratio": {
            "change_p99_over_target": ((change_p99 / CHANGE_P99_MS) * 1000.0).round() / 1000.0,
            "restart_over_target": ((restart / RESYNC_MS) * 1000.0).round() / 1000.0,
        },
        "target": {
            "single_change_p99_ms": CHANGE_P99_MS,
            "restart_resync_ms": RESYNC_MS,
            "restart": "process start → maps reflect changes made while the agent was down, never flushed",
        },
        "target_met_each": met,
        "target_met": all,
    })
}

/// Runs `cargo xtask bench lb-programming` and prints its `BENCH` line.
pub(crate) fn run(services: usize, changes: usize, dev: bool) -> anyhow::Result<()> {
    let figures = run_e2e(services, changes, dev)?;
    let judged = judge(&figures);
    let line = json!({
        "name": "lb-programming",
        "services": services,
        "endpoints": 4 * services,
        "changes": changes,
        "profile": if dev { "dev" } else { "release" },
        "figures": figures,
        "baseline": {
            "name": "iptables-restore of the equivalent kube-proxy ruleset",
            "where": "cargo xtask bench lb: baselines.kube_proxy_iptables_restore (same table, 10k services × 4 endpoints)",
            "published": "kube-proxy (iptables mode) programming latency 5–27 s p50 at 5,000 nodes",
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
            "endpoint_change": {"p99_ms": 12.5},
            "restart": {"process_start_to_changes_visible_ms": 900.0, "flushed": false},
        });
        let j = judge(&good);
        assert_eq!(j["target_met"], true);
        assert!((j["ratio"]["change_p99_over_target"].as_f64().unwrap() - 0.25).abs() < 1e-9);
        let flushed = json!({
            "endpoint_change": {"p99_ms": 12.5},
            "restart": {"process_start_to_changes_visible_ms": 900.0, "flushed": true},
        });
        assert_eq!(judge(&flushed)["target_met"], false);
        let missing = json!({});
        let j = judge(&missing);
        assert_eq!(j["target_met"], false);
        assert_eq!(j["target_met_each"]["change_p99_le_50ms"], false);
    }
}
