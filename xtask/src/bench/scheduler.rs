//! `cargo xtask bench scheduler`: the scheduler over the real store and API,
//! in process, built in release: 5,000 Node objects (no agents), then
//! 10,000 and 50,000 pods created while it runs; pods bound per second,
//! with the redb and the etcd store in the same run, with and without the
//! `Scheduled` event per pod, and once more working off a backlog (all
//! pods created before the scheduler starts, which takes pod creation out
//! of the figure). The body is the ignored test
//! `scheduler::bench::bench_scheduler` in weir-control (it starts its own
//! etcd on free loopback ports in a temp dir and kills it afterwards);
//! this collects its `SCHED-BENCH` lines into one `BENCH` line.
//!
//! Baseline: the published kube-scheduler CI floors for the same
//! workloads (`SchedulingBasic` `5000Nodes_10000Pods`: 680 pods/s,
//! `5000Nodes_50000Pods`: 810 pods/s, on larger machines); no kube-scheduler
//! runs here, so the comparison is to the published figure.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Target on this machine, pods/s, for every workload and store.
const TARGET: f64 = 1000.0;
/// Published kube-scheduler floor for 5,000 nodes and `pods` pods.
fn baseline(pods: u64) -> f64 {
    if pods >= 50_000 { 810.0 } else { 680.0 }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs the benchmark and prints its `BENCH` line.
pub(crate) fn run(nodes: usize, pods: &str, stores: &str, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "bench scheduler: building weir-control's tests in release (first time: several minutes)"
    );
    let mut child = Command::new(cargo)
        .args([
            "test",
            "--release",
            "-p",
            "weir-control",
            "--lib",
            "scheduler::bench::bench_scheduler",
            "--",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .current_dir(crate::workspace_root())
        .env("WEIR_BENCH_NODES", nodes.to_string())
        .env("WEIR_BENCH_PODS", pods)
        .env("WEIR_BENCH_STORES", stores)
        .env("WEIR_BENCH_MODES", "events,no-events,backlog")
        .env("WEIR_BENCH_LIMIT_S", limit.as_secs().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .context("run cargo test --release -p weir-control")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut runs = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read cargo test output")?;
        // libtest may print "test … ... " before the test's first line.
        if let Some((_, json)) = line.split_once("SCHED-BENCH ") {
            let run: Value = serde_json::from_str(json).with_context(|| format!("parse {json}"))?;
            runs.push(run);
        }
    }
    let status = child.wait().context("wait for cargo test")?;
    if !status.success() {
        bail!("the scheduler bench failed: {status}");
    }
    if runs.is_empty() {
        bail!("the scheduler bench printed no results");
    }
    let mut ratios = serde_json::Map::new();
    let mut met = true;
    let mut figures = Vec::new();
    for r in &runs {
        let rate = r["pods_per_s"].as_f64().unwrap_or(0.0);
        let n = r["pods"].as_u64().unwrap_or(0);
        let store = r["store"].as_str().unwrap_or("?");
        let events = r["scheduled_events"].as_bool().unwrap_or(true);
        let backlog = r["mode"] == "backlog";
        let key = format!(
            "{store}_{n}_pods{}{}",
            if events { "" } else { "_no_events" },
            if backlog { "_backlog" } else { "" }
        );
        ratios.insert(key.clone(), json!(round3(rate / baseline(n))));
        if events && !backlog {
            met &= rate >= TARGET && r["complete"].as_bool().unwrap_or(false);
        }
        figures.push(
            json!({"run": key, "pods_per_s": rate, "seconds": r["seconds"],
            "complete": r["complete"], "created_per_s": r["created_per_s"]}),
        );
    }
    let line = json!({
        "name": "scheduler",
        "nodes": nodes,
        "runs": runs,
        "figures": figures,
        "baseline": {
            "source": "kube-scheduler CI floors (scheduler_perf SchedulingBasic), published, not run here",
            "5000Nodes_10000Pods_pods_per_s": 680,
            "5000Nodes_50000Pods_pods_per_s": 810,
        },
        "ratio": ratios,
        "target": format!("pods_per_s >= {TARGET} for every workload and store with the default config (Scheduled events on, pods created while it runs), every pod bound"),
        "target_met": met,
        "wall_s": started.elapsed().as_secs(),
    });
    println!("BENCH {line}");
    Ok(())
}
