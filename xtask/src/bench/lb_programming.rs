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

/// Target: a single change's p99, store → maps, ms.
const CHANGE_P99_MS: f64 = 50.0;
/// Target: an agent restart's resync, process start → maps current, ms.
const RESYNC_MS: f64 = 2000.0;
/// Bound on the whole run (the example bounds each of its phases too).
const LIMIT: Duration = Duration::from_hours(1);
/// How long the example gets to clean up after SIGTERM.
const CLEANUP: Duration = Duration::from_mins(2);

/// The example process; sent SIGTERM (so it cleans up) if still running
/// when dropped, SIGKILL if it does not end within [`CLEANUP`].
struct Example(Option<Child>);

impl Example {
    /// Waits up to `limit` for it to exit on its own.
    fn wait(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let child = self.0.as_mut().context("example already reaped")?;
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.0 = None;
                return Ok(status);
            }
            if t0.elapsed() > limit {
                bail!("lb_programming ran over {limit:?}");
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

/// Builds the binaries and the example (release unless `dev`), runs it
/// with `services` services and `changes` single changes, and returns its
/// figures (the example's JSON line).
pub(crate) fn run_e2e(services: usize, changes: usize, dev: bool) -> anyhow::Result<Value> {
    let release: &[&str] = if dev { &[] } else { &["--release"] };
    let build = |extra: &[&str]| {
        let mut args = vec!["build"];
        args.extend_from_slice(extra);
        args.extend_from_slice(release);
        crate::cargo(&args)
    };
    build(&["-p", "weir-agent", "-p", "weir-control"])?;
    build(&["-p", "weir-tests", "--example", "lb_programming"])?;
    crate::image::build_busybox_image(&crate::image::default_out_dir())?;
    let dir: PathBuf =
        crate::workspace_root()
            .join("target")
            .join(if dev { "debug" } else { "release" });
    eprintln!(
        "bench lb-programming: {services} services, {changes} changes ({} build)",
        if dev { "dev" } else { "release" }
    );
    let child = Command::new(dir.join("examples/lb_programming"))
        .args(["--services", &services.to_string()])
        .args(["--changes", &changes.to_string()])
        .env("WEIR_AGENT_BIN", dir.join("weir-agent"))
        .env("WEIR_CONTROL_BIN", dir.join("weir-control"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("run the lb_programming example")?;
    let mut example = Example(Some(child));
    let stdout = example
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .context("example stdout")?;
    // The example prints one line at its end: read it on a thread so the
    // wait below stays bounded.
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
        bail!("lb_programming failed ({status}); its log is above");
    }
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("lb_programming printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parse lb_programming output {line:?}"))
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or(f64::INFINITY)
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
    let all = met
        .as_object()
        .is_some_and(|m| m.values().all(|v| v.as_bool() == Some(true)));
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
