//! `cargo xtask bench pod-start`: N pods (default 50) handed to weir-agent
//! at once, each a busybox httpd. t0 is the instant before the first of the
//! N manifests (written beforehand into a staging dir) is renamed into the
//! watched dir; a pod's t1 is its first successful TCP connect from the
//! node's netns to podIP:8080. Reported: p50/p90/p99/max of t1 - t0, and the
//! burst's wall time. The baseline, in the same run: the same N servers
//! through containerd + CNI bridge directly ([`super::baseline`]).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{
    baseline::{self, Baseline},
    env::{Env, NODE, netns_path},
    probe::{API_POLL_EVERY, IpWatcher, Prober},
    util::{latency_summary, ms, percentile, round3},
};

/// Port every benchmark pod serves on.
pub(crate) const PORT: u16 = 8080;
/// Bound of one burst, from t0 to the last pod's first connect.
const BURST_LIMIT: Duration = Duration::from_mins(2);
/// Bound of one teardown.
const TEARDOWN_LIMIT: Duration = Duration::from_mins(5);
/// weir's stated goal for a burst's p99.
const GOAL_P99: Duration = Duration::from_secs(1);

/// One burst's results.
pub(crate) struct Burst {
    /// t1 - t0 of every pod.
    pub up: Vec<Duration>,
    /// From "remove them all" to "all gone".
    pub teardown: Duration,
}

/// The manifest of benchmark pod `name`: busybox httpd on [`PORT`], with a
/// short grace period (busybox as PID 1 ignores SIGTERM).
pub(crate) fn manifest(name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels:
    app: weir-bench
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: busybox
    command: ["httpd", "-f", "-p", "{PORT}", "-h", "/"]
    ports:
    - containerPort: {PORT}
"#
    )
}

/// `t1 - t0` of each pod, failing if any pod never answered.
pub(crate) fn first_connects(t0: Instant, up: &[Option<Instant>]) -> anyhow::Result<Vec<Duration>> {
    let missing = up.iter().filter(|t| t.is_none()).count();
    if missing > 0 {
        bail!("{missing} of {} pods never accepted a connection", up.len());
    }
    Ok(up
        .iter()
        .flatten()
        .map(|t| t.saturating_duration_since(t0))
        .collect())
}

/// How the agent's API showed a burst's pods.
pub(crate) struct ApiView {
    /// t0 to the pod's IP first showing in the pod list.
    pub ip_seen: Vec<Duration>,
    /// From the IP showing (the agent publishes it once the containers
    /// started) to the first successful connect.
    pub connect_after_ip: Vec<Duration>,
}

/// One weir burst and its teardown, and what the agent's API showed.
pub(crate) fn weir_burst(
    env: &Env,
    prefix: &'static str,
    n: usize,
    limit: Duration,
) -> anyhow::Result<(Burst, ApiView)> {
    let agent = &env.agent;
    let files: Vec<String> = (0..n).map(|i| format!("{prefix}{i:03}.yaml")).collect();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(agent.staging.join(f), manifest(&format!("{prefix}{i:03}")))?;
    }
    let deadline = Instant::now() + limit;
    let prober = Prober::start(&netns_path(NODE), n, deadline)?;
    let watcher = IpWatcher::start(agent, prefix, n, PORT, prober.sender(), deadline)?;
    let t0 = Instant::now();
    for f in &files {
        std::fs::rename(agent.staging.join(f), agent.manifests.join(f))
            .with_context(|| format!("hand {f} to the agent"))?;
    }
    let handed = t0.elapsed();
    let up = prober.finish()?;
    let seen = watcher.stop();
    let up = first_connects(t0, &up)
        .with_context(|| format!("agent log tail:\n{}", agent.log_tail(20)))?;
    let ip_seen: Vec<Duration> = seen
        .iter()
        .map(|t| t.map_or(Duration::ZERO, |t| t.saturating_duration_since(t0)))
        .collect();
    let connect_after_ip = up
        .iter()
        .zip(&ip_seen)
        .map(|(up, seen)| up.saturating_sub(*seen))
        .collect();
    if n > 1 {
        eprintln!(
            "bench: {n} manifests renamed in {:.1} ms; all {n} pods answered after {:.0} ms",
            ms(handed),
            ms(up.iter().max().copied().unwrap_or_default())
        );
    }
    let teardown = agent.remove_all_pods(TEARDOWN_LIMIT)?;
    Ok((
        Burst { up, teardown },
        ApiView {
            ip_seen,
            connect_after_ip,
        },
    ))
}

/// Runs the benchmark and prints its `BENCH` line.
pub(crate) fn run(agent_bin: &Path, image_tar: &Path, pods: usize) -> anyhow::Result<()> {
    baseline::ensure_cni_plugins()?;
    let image_dir = image_tar.parent().context("image directory")?;
    let env = Env::start(
        agent_bin,
        image_dir,
        true,
        crate::workspace_root().join("target/bench/pod-start.agent.log"),
    )?;
    let base = Baseline::new(&env.containerd, image_tar)?;

    eprintln!("bench pod-start: warm-up: one weir pod, one baseline container");
    weir_burst(&env, "wbw-", 1, BURST_LIMIT).context("weir warm-up pod")?;
    base.burst("wbench-w", 1, BURST_LIMIT)
        .context("baseline warm-up container")?;

    eprintln!("bench pod-start: weir: {pods} pods at once");
    let (weir, api) = weir_burst(&env, "wb-", pods, BURST_LIMIT)?;
    eprintln!(
        "bench pod-start: weir: all pods gone {:.0} ms after their manifests were removed",
        ms(weir.teardown)
    );

    eprintln!("bench pod-start: baseline: {pods} containers at once (ctr + CNI bridge)");
    let baseline = base.burst("wbench-c", pods, BURST_LIMIT)?;
    eprintln!(
        "bench pod-start: baseline: all {pods} answered after {:.0} ms; teardown {:.0} ms",
        ms(baseline.up.iter().max().copied().unwrap_or_default()),
        ms(baseline.teardown)
    );
    drop(base);
    drop(env);

    let p99 = |b: &Burst| {
        let mut v = b.up.clone();
        v.sort();
        percentile(&v, 99)
    };
    let (weir_p99, base_p99) = (p99(&weir), p99(&baseline));
    let ratio = weir_p99.as_secs_f64() / base_p99.as_secs_f64().max(1e-9);
    let mut weir_json = latency_summary(&weir.up);
    weir_json["teardown_ms"] = json!(ms(weir.teardown));
    let ip = latency_summary(&api.ip_seen);
    weir_json["ip_in_api_p50_ms"] = ip["p50_ms"].clone();
    weir_json["ip_in_api_p99_ms"] = ip["p99_ms"].clone();
    let after = latency_summary(&api.connect_after_ip);
    weir_json["connect_after_ip_p50_ms"] = after["p50_ms"].clone();
    weir_json["connect_after_ip_max_ms"] = after["max_ms"].clone();
    let mut base_json = latency_summary(&baseline.up);
    base_json["what"] =
        json!("ip netns add + CNI bridge/host-local ADD + ctr run -d, same containerd");
    base_json["teardown_ms"] = json!(ms(baseline.teardown));
    let line = json!({
        "name": "pod-start",
        "pods": pods,
        "weir": weir_json,
        "baseline": base_json,
        "ratio": round3(ratio),
        "target": "weir p99 < baseline p99 (ratio = weir_p99 / baseline_p99 < 1)",
        "target_met": ratio < 1.0,
        "goal": format!("weir p99 <= {} ms", GOAL_P99.as_millis()),
        "goal_met": weir_p99 <= GOAL_P99,
        "api_poll_ms": ms(API_POLL_EVERY),
    });
    println!("BENCH {line}");
    Ok(())
}
