//! `cargo xtask bench metrics`: what weir's metrics cost on a real node
//! (the `metrics_bench` example of weir-tests does the work; this builds it
//! with the agent and judges its figures): the agent's CPU for 1 s sampling
//! at 110 pods (sampling on vs off, same run) and the eBPF counters' and
//! tracepoint's cost in pod-to-pod requests/s (attached vs detached,
//! paired reps, same run).

use std::{
    io::Read as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::util::signal;

/// Target: agent CPU for 1 s sampling, % of one core.
const CPU_PCT: f64 = 2.0;
/// Target: requests/s lost to the counters, %.
const LOSS_PCT: f64 = 2.0;
/// Bound on the whole run.
const LIMIT: Duration = Duration::from_mins(40);
/// How long the example gets to clean up after SIGTERM.
const CLEANUP: Duration = Duration::from_mins(2);

/// Options of `cargo xtask bench metrics`.
#[derive(Debug, Clone)]
pub(crate) struct MetricsArgs {
    pub pods: usize,
    pub idle_secs: u64,
    pub cpu_reps: usize,
    pub reps: usize,
    pub secs: u32,
    pub dev: bool,
}

/// The example process: SIGTERM (so it cleans up) if still running when
/// dropped, SIGKILL if it does not end within [`CLEANUP`].
struct Example(Option<Child>);

impl Drop for Example {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        signal(child.id(), Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < CLEANUP {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn run_example(a: &MetricsArgs) -> anyhow::Result<Value> {
    let profile: &[&str] = if a.dev { &[] } else { &["--release"] };
    let build = |extra: &[&str]| {
        let mut args = vec!["build"];
        args.extend_from_slice(extra);
        args.extend_from_slice(profile);
        crate::cargo(&args)
    };
    build(&["-p", "weir-agent"])?;
    build(&["-p", "weir-tests", "--example", "metrics_bench"])?;
    crate::image::build_busybox_image(&crate::image::default_out_dir())?;
    let dir = crate::workspace_root()
        .join("target")
        .join(if a.dev { "debug" } else { "release" });
    eprintln!(
        "bench metrics: {} pods, {} × 2 idle windows of {} s, {} paired wrk reps × {} s ({} build)",
        a.pods,
        a.cpu_reps,
        a.idle_secs,
        a.reps,
        a.secs,
        if a.dev { "dev" } else { "release" }
    );
    let child = Command::new(dir.join("examples/metrics_bench"))
        .args(["--pods", &a.pods.to_string()])
        .args(["--idle-secs", &a.idle_secs.to_string()])
        .args(["--cpu-reps", &a.cpu_reps.to_string()])
        .args(["--reps", &a.reps.to_string()])
        .args(["--secs", &a.secs.to_string()])
        .env("WEIR_AGENT_BIN", dir.join("weir-agent"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("run the metrics_bench example")?;
    let mut example = Example(Some(child));
    let mut stdout = example
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .context("example stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let t0 = Instant::now();
    let status = loop {
        let child = example.0.as_mut().context("example already reaped")?;
        if let Some(s) = child.try_wait()? {
            example.0 = None;
            break s;
        }
        if t0.elapsed() > LIMIT {
            bail!("metrics_bench ran over {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the stdout reader panicked"))?
        .context("read the example's stdout")?;
    if !status.success() {
        bail!("metrics_bench failed ({status}); its log is above");
    }
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("metrics_bench printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parse metrics_bench output {line:?}"))
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or(f64::INFINITY)
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Ratios (figure / target: ≤ 1 meets it) and whether each target is met.
pub(crate) fn judge(figures: &Value) -> Value {
    let cpu = num(figures, "/agent_cpu/cost_pct_of_one_core_median");
    let loss = num(figures, "/requests/loss_pct_median");
    let met = json!({
        "agent_cpu_le_2pct_core": cpu <= CPU_PCT,
        "requests_loss_le_2pct": loss <= LOSS_PCT,
    });
    let all = met
        .as_object()
        .is_some_and(|m| m.values().all(|v| v.as_bool() == Some(true)));
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
pub(super) fn run_args(which: &super::Which) -> anyhow::Result<()> {
    let super::Which::Metrics {
        pods,
        idle_secs,
        cpu_reps,
        reps,
        secs,
        dev,
    } = *which
    else {
        bail!("internal: not the metrics bench");
    };
    anyhow::ensure!(
        (3..=super::MAX_PODS).contains(&pods),
        "--pods must be 3..={}",
        super::MAX_PODS
    );
    anyhow::ensure!(reps >= 1 && cpu_reps >= 1, "reps must be at least 1");
    crate::setup::setup()?;
    run(&MetricsArgs {
        pods,
        idle_secs,
        cpu_reps,
        reps,
        secs,
        dev,
    })
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
        "ratio": judged["ratio"],
        "target": judged["target"],
        "target_met_each": judged["target_met_each"],
        "target_met": judged["target_met"],
    });
    println!("BENCH {line}");
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
