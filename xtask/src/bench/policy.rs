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

use std::{
    io::Read as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use super::util::signal;

/// Target: weir's loss (requests/s and new connections/s), %.
const LOSS_PCT: f64 = 3.0;
/// Target: apply → enforced on every node, p99, ms.
const PROPAGATION_P99_MS: f64 = 100.0;
/// Target: flow export CPU, % of one core.
const FLOW_CPU_PCT: f64 = 5.0;
/// Bound on the whole run.
const LIMIT: Duration = Duration::from_hours(1);
/// How long the example gets to clean up after SIGTERM.
const CLEANUP: Duration = Duration::from_mins(2);

/// Options of `cargo xtask bench policy`.
#[derive(Debug, Clone)]
pub(crate) struct PolicyArgs {
    pub peers: usize,
    pub reps: usize,
    pub prop_reps: usize,
    pub secs: u32,
    pub cpu_secs: u32,
    pub threads: u32,
    pub conns: u32,
    pub dev: bool,
    /// Parts to run (`propagation,throughput,flows`); `None`: all.
    pub only: Option<String>,
}

/// The example process; SIGTERM (so it cleans up) if still running when
/// dropped, SIGKILL if it does not end within [`CLEANUP`].
struct Example(Option<Child>);

impl Example {
    fn wait(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.0.as_mut().context("example already reaped")?;
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.0 = None;
                return Ok(status);
            }
            if t0.elapsed() > limit {
                bail!("policy_bench ran over {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

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

/// Builds the binaries and the example, runs it, returns its JSON line.
fn run_example(a: &PolicyArgs) -> anyhow::Result<Value> {
    let release: &[&str] = if a.dev { &[] } else { &["--release"] };
    let build = |extra: &[&str]| {
        let mut args = vec!["build"];
        args.extend_from_slice(extra);
        args.extend_from_slice(release);
        crate::cargo(&args)
    };
    build(&["-p", "weir-agent", "-p", "weir-control"])?;
    build(&["-p", "weir-tests", "--example", "policy_bench"])?;
    crate::image::build_busybox_image(&crate::image::default_out_dir())?;
    let dir: PathBuf =
        crate::workspace_root()
            .join("target")
            .join(if a.dev { "debug" } else { "release" });
    eprintln!(
        "bench policy: {} peers, {} reps × {} s, {} propagation reps ({} build)",
        a.peers,
        a.reps,
        a.secs,
        a.prop_reps,
        if a.dev { "dev" } else { "release" }
    );
    let mut cmd = Command::new(dir.join("examples/policy_bench"));
    if let Some(only) = &a.only {
        cmd.args(["--only", only]);
    }
    let child = cmd
        .args(["--peers", &a.peers.to_string()])
        .args(["--reps", &a.reps.to_string()])
        .args(["--prop-reps", &a.prop_reps.to_string()])
        .args(["--secs", &a.secs.to_string()])
        .args(["--cpu-secs", &a.cpu_secs.to_string()])
        .args(["--threads", &a.threads.to_string()])
        .args(["--conns", &a.conns.to_string()])
        .env("WEIR_AGENT_BIN", dir.join("weir-agent"))
        .env("WEIR_CONTROL_BIN", dir.join("weir-control"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("run the policy_bench example")?;
    let mut example = Example(Some(child));
    let stdout = example
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .context("example stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let mut stdout = stdout;
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let status = example.wait(LIMIT)?;
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the stdout reader panicked"))?
        .context("read the example's stdout")?;
    if !status.success() {
        bail!("policy_bench failed ({status}); its log is above");
    }
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("policy_bench printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parse policy_bench output {line:?}"))
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or(f64::INFINITY)
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
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
    let all = met
        .as_object()
        .is_some_and(|m| m.values().all(|v| v.as_bool() == Some(true)));
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
