//! `cargo xtask bench density`: N pods (default 250) on one node, all
//! Running and each reachable from the node's netns; then the agent's RSS
//! (`VmRSS`, target <= 30 MB) and its CPU while idle (utime + stime over
//! 30 s with the pods running and nothing changing, target <= 1 % of one
//! core). No baseline: the issue names none.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{
    env::{Env, NODE, netns_path},
    pod_start::{PORT, first_connects, manifest},
    probe::{IpWatcher, Prober},
    util::{clock_ticks_per_sec, cpu_ticks, f64_of, ms, percentile, round1, round3, status_bytes},
};

const RSS_TARGET_MB: f64 = 30.0;
const IDLE_CPU_TARGET_PCT: f64 = 1.0;
/// Bound for all pods to be up, and for all to be gone.
const LIMIT: Duration = Duration::from_mins(5);
/// Quiet time after the last pod answered, before the idle window opens.
const SETTLE: Duration = Duration::from_secs(5);

/// Bytes as decimal megabytes (the stricter reading of "30 MB").
fn mb(bytes: u64) -> f64 {
    round1(f64_of(bytes) / 1e6)
}

/// Runs the benchmark and prints its `BENCH` line.
pub(crate) fn run(
    agent_bin: &Path,
    image_tar: &Path,
    pods: usize,
    idle: Duration,
) -> anyhow::Result<()> {
    let image_dir = image_tar.parent().context("image directory")?;
    let env = Env::start(
        agent_bin,
        image_dir,
        false,
        crate::workspace_root().join("target/bench/density.agent.log"),
    )?;
    let agent = &env.agent;
    let pid = agent.pid;
    let rss_before = status_bytes(pid, "VmRSS")?;

    let prefix = "wd-";
    let files: Vec<String> = (0..pods).map(|i| format!("{prefix}{i:03}.yaml")).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(agent.staging.join(f), manifest(&format!("{prefix}{i:03}")))?;
    }
    eprintln!("bench density: {pods} pods at once");
    let deadline = Instant::now() + LIMIT;
    let prober = Prober::start(&netns_path(NODE), pods, deadline)?;
    let watcher = IpWatcher::start(agent, prefix, pods, PORT, prober.sender(), deadline)?;
    let t0 = Instant::now();
    for f in &files {
        std::fs::rename(agent.staging.join(f), agent.manifests.join(f))?;
    }
    let up = prober.finish()?;
    watcher.stop();
    let up = first_connects(t0, &up)
        .with_context(|| format!("agent log tail:\n{}", agent.log_tail(20)))?;
    let all_up = up.iter().max().copied().unwrap_or_default();
    eprintln!(
        "bench density: all {pods} pods answered from the node after {:.1} s",
        all_up.as_secs_f64()
    );
    let listed = agent.pods()?;
    let running = listed
        .iter()
        .filter(|p| p["status"]["phase"] == "Running")
        .count();
    if running != pods {
        bail!("{running} of {pods} pods are Running after all answered");
    }
    let rss_up = status_bytes(pid, "VmRSS")?;

    // Nothing may touch the agent now: no API calls, no manifest changes.
    std::thread::sleep(SETTLE);
    let hz = clock_ticks_per_sec()?;
    eprintln!(
        "bench density: idle window: {} s of the agent's CPU time",
        idle.as_secs()
    );
    let (c0, w0) = (cpu_ticks(pid)?, Instant::now());
    std::thread::sleep(idle);
    let (c1, window) = (cpu_ticks(pid)?, w0.elapsed());
    let rss_idle = status_bytes(pid, "VmRSS")?;
    let hwm = status_bytes(pid, "VmHWM")?;
    let cpu_secs = f64_of(c1.saturating_sub(c0)) / f64_of(hz);
    let idle_cpu_pct = cpu_secs / window.as_secs_f64() * 100.0;
    // The target is the RSS *at* 250 pods: what the agent holds with them
    // running, read after the idle window. The start burst's transient
    // (in-flight steps, blocking threads) is reported beside it: `rss_up_mb`
    // right after the last pod answered, `rss_peak_mb` the high-water mark.
    let rss = rss_idle;
    eprintln!(
        "bench density: RSS {:.1} MB (peak {:.1} MB), idle CPU {idle_cpu_pct:.2} % of a core",
        mb(rss),
        mb(hwm)
    );

    eprintln!("bench density: removing all {pods} manifests at once");
    let teardown = agent.remove_all_pods(LIMIT)?;
    eprintln!(
        "bench density: all pods gone after {:.1} s",
        teardown.as_secs_f64()
    );
    drop(env);

    let mut sorted_up = up.clone();
    sorted_up.sort();
    let rss_mb = mb(rss);
    let rss_met = rss_mb <= RSS_TARGET_MB;
    let cpu_met = idle_cpu_pct <= IDLE_CPU_TARGET_PCT;
    let line = json!({
        "name": "density",
        "pods": pods,
        "pods_running": running,
        "pods_reachable": up.len(),
        "all_reachable_s": round1(all_up.as_secs_f64()),
        "rss_mb": rss_mb,
        "rss_mib": round1(f64_of(rss) / f64::from(1u32 << 20)),
        "rss_at_start_mb": mb(rss_before),
        "rss_up_mb": mb(rss_up),
        "rss_peak_mb": mb(hwm),
        "idle_cpu_pct": round3(idle_cpu_pct),
        "idle_window_s": round1(window.as_secs_f64()),
        "teardown_s": round1(teardown.as_secs_f64()),
        "ratio": {
            "rss": round3(rss_mb / RSS_TARGET_MB),
            "idle_cpu": round3(idle_cpu_pct / IDLE_CPU_TARGET_PCT),
        },
        "target": format!(
            "rss_mb <= {RSS_TARGET_MB} (VmRSS with the pods running, after the idle window; 1 MB = 10^6 B) and idle_cpu_pct <= {IDLE_CPU_TARGET_PCT} (% of one core)"
        ),
        "rss_target_met": rss_met,
        "idle_cpu_target_met": cpu_met,
        "target_met": rss_met && cpu_met,
        "first_connect_p50_ms": ms(percentile(&sorted_up, 50)),
    });
    println!("BENCH {line}");
    Ok(())
}
