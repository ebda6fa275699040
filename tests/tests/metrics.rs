//! Kernel-level pod metrics end to end: a real node (containerd, runc,
//! veths, eBPF) whose agent samples every second. A pod burning one core
//! reads about the CPU the kernel charged its busy process (read from
//! `/proc/<pid>/stat` as an independent observer), and N TCP connections to
//! a pod count as N accepted connections (eBPF `sock_ops`) and show in the
//! per-second gauge. Needs root.
//!
//! TODO(lead): once the control's `Metrics` service is on main, also check
//! the same pod's `cpu_cores` through `Metrics.ListPods` (the agent pushes
//! every sample on `Metrics.Report`).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use weir_tests::{Cluster, http_get, wait_for, web_pod};

const START: Duration = Duration::from_mins(1);
/// Connections made to the web pod.
const N: u64 = 30;

const BURN: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: burn
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: burn
    image: busybox
    command: ["sh", "-c", "while :; do :; done"]
"#;

/// The value of the series `name{...pod="<pod>"...}` in a metrics text.
fn value(metrics: &str, name: &str, pod: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| {
            l.strip_prefix(name).is_some_and(|r| r.starts_with('{'))
                && l.contains(&format!("pod=\"{pod}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// utime + stime of every process in the cgroup `dir` (v1 `cpuacct` or
/// v2), in seconds.
fn procs_cpu_seconds(dir: &Path) -> anyhow::Result<f64> {
    // USER_HZ: what /proc/<pid>/stat counts in on Linux.
    let hz = 100.0;
    let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
        .with_context(|| format!("read {}", dir.display()))?;
    let mut ticks = 0u64;
    for pid in procs.split_whitespace() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis; utime and stime
        // are the 14th and 15th fields of the whole line.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            ticks += f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "seconds as a float")]
    Ok(ticks as f64 / hz)
}

#[test]
fn pod_cpu_and_connections_read_what_the_kernel_did() -> anyhow::Result<()> {
    let mut c = Cluster::new("mx", 61, 1)?;
    let n = c.node(0);
    n.start_agent()?;
    n.apply("burn.yaml", BURN)?;
    n.apply("web.yaml", &web_pod("web", 8080, "hi"))?;
    n.wait_running("burn", START)?;
    let web_ip = n.wait_running("web", START)?;
    let burn = n.pod("burn").context("burn pod")?;
    let uid = burn["metadata"]["uid"].as_str().context("uid")?;
    let cg = ["/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup"]
        .iter()
        .map(|r| Path::new(r).join(n.containerd_ns()).join(uid).join("burn"))
        .find(|d| d.join("cgroup.procs").exists())
        .context("burn container's cgroup")?;

    // CPU: the agent's counter and gauge against the processes' own time.
    let m0 = wait_for("burn's cpu gauge", Duration::from_secs(10), || {
        n.metrics()
            .ok()
            .filter(|m| value(m, "weir_pod_cpu_cores", "burn").is_some())
    })?;
    let (t0, p0) = (Instant::now(), procs_cpu_seconds(&cg)?);
    let c0 = value(&m0, "weir_pod_cpu_usage_seconds_total", "burn").context("cpu counter")?;
    let mut gauges = Vec::new();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(1));
        gauges.push(value(&n.metrics()?, "weir_pod_cpu_cores", "burn").context("cpu gauge")?);
    }
    let m1 = n.metrics()?;
    let (secs, p1) = (t0.elapsed().as_secs_f64(), procs_cpu_seconds(&cg)?);
    let c1 = value(&m1, "weir_pod_cpu_usage_seconds_total", "burn").context("cpu counter")?;
    let kernel = (p1 - p0) / secs;
    let counter = (c1 - c0) / secs;
    #[expect(clippy::cast_precision_loss, reason = "a handful of readings")]
    let gauge = gauges.iter().sum::<f64>() / gauges.len() as f64;
    eprintln!("burn: /proc {kernel:.3} cores, counter {counter:.3}, gauge {gauge:.3} ({gauges:?})");
    ensure!(
        kernel > 0.5,
        "a busy loop gets at least half a core on an idle-enough machine; it got {kernel} (load {})",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    ensure!(
        (0.85..=1.15).contains(&(counter / kernel)),
        "weir_pod_cpu_usage_seconds_total rate {counter} vs the kernel's {kernel}"
    );
    // About one core: as much as the kernel gave the loop (less when the
    // machine's other work competes for its two cores).
    ensure!(
        (0.85..=1.15).contains(&(gauge / kernel)) && (0.5..=1.3).contains(&gauge),
        "weir_pod_cpu_cores {gauge} vs the kernel's {kernel}: about one core"
    );
    ensure!(value(&m1, "weir_pod_memory_working_set_bytes", "burn").is_some_and(|v| v > 0.0));
    ensure!(
        value(&m1, "weir_pod_cpu_throttled_seconds_total", "burn") == Some(0.0),
        "no CPU limit, no throttling"
    );

    // Connections: N requests from the host, each its own connection.
    let accepted = |m: &str| value(m, "weir_pod_tcp_connections_accepted_total", "web");
    let before = accepted(&n.metrics()?).context("accepted counter of web")?;
    let addr = SocketAddr::from((web_ip, 8080));
    for _ in 0..N {
        let (code, _) = http_get(addr, "/", Duration::from_secs(5))?;
        ensure!(code == 200, "web answers");
    }
    // The burst lands in one or two 1 s windows: the per-second gauge of
    // one of them shows at least half of it.
    let mut peak = 0.0f64;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if let Some(v) = value(&n.metrics()?, "weir_pod_new_connections_per_second", "web") {
            peak = peak.max(v);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    #[expect(clippy::cast_precision_loss, reason = "a small count")]
    let want = N as f64;
    let m = wait_for("connections counted", Duration::from_secs(10), || {
        n.metrics()
            .ok()
            .filter(|m| accepted(m).is_some_and(|a| a >= before + want - 2.0))
    })
    .with_context(|| {
        let m = n.metrics().unwrap_or_default();
        let web: Vec<&str> = m.lines().filter(|l| l.contains("pod=\"web\"")).collect();
        format!(
            "web's series:\n{}\nagent log:\n{}",
            web.join("\n"),
            weir_tests::tail(&n.agent_log_text(), 40)
        )
    })?;
    let got = accepted(&m).context("accepted")? - before;
    ensure!(
        (got - want).abs() <= 2.0,
        "{N} connections to web counted as {got}"
    );
    ensure!(
        value(&m, "weir_pod_network_receive_bytes_total", "web").is_some_and(|v| v > 0.0),
        "bytes delivered to web are counted"
    );
    ensure!(
        peak >= want / 2.0 * 0.8,
        "weir_pod_new_connections_per_second peaked at {peak} for a burst of {N}"
    );
    Ok(())
}
