//! The body of `cargo xtask bench autoscale`: how fast an HPA reacts to a
//! load step, on real processes (weir-control, two weir-agents in their
//! node netns, containerd, busybox httpd pods behind a Service, a bounded
//! request loop through the VIP from node 0's netns).
//!
//! Each repetition: the Deployment is at 1 replica (1 Ready pod, 1 ready
//! endpoint, no other pod left) and has been idle long enough for the
//! metric to read idle; an HPA on `weir_pod_new_connections_per_second`
//! (`AverageValue` 8, 1..=3 replicas) is applied and reports
//! `ScalingActive`; after a random wait within one metric period (so the
//! step falls at any phase of the sampling and sync ticks, which the rest
//! of a repetition is locked to) a load step of
//! 20 new connections/s starts. Measured from the step: the replica count
//! raised (the decision) and a new pod Ready **and** in the
//! `EndpointSlice`'s ready addresses (the reaction). Then the load stops,
//! the HPA is deleted and the Deployment is set back to 1 replica.
//!
//! Two clusters, one after the other, in the same run:
//! - weir: agents sample every second and push each sample; the HPA
//!   controller runs on metric change (`--hpa-sync-period 0s`).
//! - baseline (Kubernetes' defaults): agents sample every 15 s
//!   (`--metrics-interval 15s`, metrics-server's resolution) and the HPA
//!   controller ticks every 15 s (`--hpa-sync-period 15s`).
//!
//! The pods' readiness probe runs every second (the manifest's
//! `periodSeconds: 1`). Prints one JSON line with the figures.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use weir_tests::api::{Api, condition_status, ready_addresses};
use weir_tests::autoscale::{Load, deployment, hpa, ready_pods, replicas, service};
use weir_tests::{ControlCluster, wait_for};

const TAG: &str = "ab";
const SUBNET: u8 = 55;
const NAME: &str = "react";
/// How long pods may take to start and be reported Ready.
const START: Duration = Duration::from_secs(90);
/// Bound on one load step (the loop stops at the reaction or here).
const LOAD_LIMIT: Duration = Duration::from_mins(2);
/// One request per 50 ms, each on a new connection: 20 connections/s
/// against an average target of 8 per pod.
const EVERY: Duration = Duration::from_millis(50);
const TARGET_PER_POD: &str = "8";

/// Set on SIGINT/SIGTERM: loops stop and the guards clean up.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone)]
struct Args {
    reps: usize,
    baseline_reps: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut me = Self {
            reps: 20,
            baseline_reps: 8,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let v = it.next().with_context(|| format!("{a} needs a value"))?;
            let n: usize = v.parse().with_context(|| format!("{a} {v:?}"))?;
            match a.as_str() {
                "--reps" => me.reps = n,
                "--baseline-reps" => me.baseline_reps = n,
                _ => bail!("unknown argument {a}"),
            }
        }
        Ok(me)
    }
}

/// One way of running the loop.
struct Mode {
    name: &'static str,
    /// Agents' `--metrics-interval`.
    metrics_interval: Duration,
    /// weir-control's `--hpa-sync-period` (zero: on metric change).
    sync_period: Duration,
}

impl Mode {
    /// The longer of the metric resolution and the sync period: the step
    /// starts at a random point within it.
    fn period(&self) -> Duration {
        self.metrics_interval.max(self.sync_period)
    }
}

/// One repetition's timings from the load step, ms.
struct Rep {
    decision_ms: f64,
    reaction_ms: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// A random duration in `[0, max)`, from the kernel's random source (not
/// the clock: every step of a repetition is phase-locked to the agents'
/// sampling ticks, so the clock's sub-second digits repeat).
fn jitter(max: Duration) -> anyhow::Result<Duration> {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("read /dev/urandom")?;
    Ok(max.mul_f64(f64::from(u32::from_ne_bytes(b)) / (f64::from(u32::MAX) + 1.0)))
}

fn stopped() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d`, in slices, unless interrupted.
fn sleep(d: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        stopped()?;
        std::thread::sleep(Duration::from_millis(100).min(d.saturating_sub(t0.elapsed())));
    }
    Ok(())
}

/// Back to the start: no HPA, 1 replica, exactly one pod (Ready and the
/// only ready endpoint), then idle for `quiet`. Returns the Ready pod.
fn reset(api: &Api, quiet: Duration) -> anyhow::Result<BTreeSet<String>> {
    if api
        .get("HorizontalPodAutoscaler", "default", NAME)
        .is_some()
    {
        api.delete("HorizontalPodAutoscaler", "default", NAME)?;
    }
    api.apply(&deployment(NAME))?;
    let first = wait_for("1 pod, Ready, the only endpoint", START, || {
        let all = api.pods(&format!("app={NAME}")).ok()?;
        let ready = ready_pods(api, NAME);
        let slice = api.get("EndpointSlice", "default", NAME)?;
        (all.len() == 1 && ready.len() == 1 && ready_addresses(&slice).len() == 1).then_some(ready)
    })?;
    sleep(quiet)?;
    Ok(first)
}

/// One repetition from a reset Deployment.
fn rep(c: &ControlCluster, api: &Api, vip: Ipv4Addr, mode: &Mode) -> anyhow::Result<Rep> {
    // Idle for a full metric period plus a second: the metric reads idle.
    let first = reset(api, mode.metrics_interval + Duration::from_secs(1))?;
    let conns = json!({"type": "Pods", "pods": {
        "metric": {"name": "weir_pod_new_connections_per_second"},
        "target": {"type": "AverageValue", "averageValue": TARGET_PER_POD}}});
    api.apply(&hpa(NAME, &conns, 300))?;
    wait_for("HPA ScalingActive", Duration::from_mins(1), || {
        api.get("HorizontalPodAutoscaler", "default", NAME)
            .filter(|h| condition_status(h, "ScalingActive") == "True")
    })?;
    let wait = jitter(mode.period())?;
    sleep(wait)?;
    ensure!(replicas(api, NAME) == Some(1), "scaled with no load");
    let netns = PathBuf::from(c.cluster.nodes.first().context("a node")?.netns_path());
    let load = Load::start(netns, vip, "/", EVERY, 10_000, LOAD_LIMIT);
    let step = Instant::now();
    let mut decision = None;
    let reaction = loop {
        stopped()?;
        if step.elapsed() > LOAD_LIMIT {
            bail!(
                "{}: no new replica in the endpoints {LOAD_LIMIT:?} after the step; hpa {}",
                mode.name,
                api.get("HorizontalPodAutoscaler", "default", NAME)
                    .map(|h| h["status"].to_string())
                    .unwrap_or_default()
            );
        }
        if decision.is_none() && replicas(api, NAME).is_some_and(|r| r > 1) {
            decision = Some(step.elapsed());
        }
        let ready = ready_pods(api, NAME);
        if ready.difference(&first).next().is_some()
            && api
                .get("EndpointSlice", "default", NAME)
                .is_some_and(|s| ready_addresses(&s).len() >= 2)
        {
            break step.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(load);
    let decision = decision.unwrap_or(reaction);
    Ok(Rep {
        decision_ms: ms(decision),
        reaction_ms: ms(reaction),
    })
}

/// The nearest-rank `p`th percentile of `sorted`.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    let rank = (p * sorted.len())
        .div_ceil(100)
        .clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or(f64::NAN)
}

fn summary(xs: &[f64]) -> Value {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    json!({
        "p50_ms": percentile(&s, 50),
        "p99_ms": percentile(&s, 99),
        "min_ms": s.first(),
        "max_ms": s.last(),
        "all_ms": xs,
    })
}

/// A cluster run in `mode`: `reps` repetitions.
fn run_mode(mode: &Mode, reps: usize) -> anyhow::Result<Value> {
    let sync = format!("{}s", mode.sync_period.as_secs());
    let control_args = ["--heartbeat-interval", "1s", "--hpa-sync-period", &sync];
    let mut c = ControlCluster::new(TAG, SUBNET, 2, &control_args)?;
    let interval = format!("{}s", mode.metrics_interval.as_secs());
    for n in &mut c.cluster.nodes {
        n.agent_args
            .extend(["--metrics-interval".to_owned(), interval.clone()]);
    }
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let body = || -> anyhow::Result<Value> {
        api.wait_nodes_ready(&c.node_names())?;
        api.apply(&deployment(NAME))?;
        let svc = api.apply(&service(NAME))?;
        let svc: Value = serde_json::from_str(&svc.json)?;
        let vip: Ipv4Addr = svc["spec"]["clusterIP"]
            .as_str()
            .context("clusterIP")?
            .parse()?;
        let mut out = Vec::with_capacity(reps);
        for i in 0..reps {
            let r = rep(&c, &api, vip, mode).with_context(|| format!("rep {i}"))?;
            eprintln!(
                "bench autoscale: {} rep {}/{reps}: decision {:.0} ms, new replica Ready and in the endpoints {:.0} ms",
                mode.name,
                i + 1,
                r.decision_ms,
                r.reaction_ms
            );
            out.push(r);
        }
        let reaction: Vec<f64> = out.iter().map(|r| r.reaction_ms).collect();
        let decision: Vec<f64> = out.iter().map(|r| r.decision_ms).collect();
        Ok(json!({
            "reps": reps,
            "metrics_interval_s": mode.metrics_interval.as_secs(),
            "hpa_sync_period_s": mode.sync_period.as_secs(),
            "reaction": summary(&reaction),
            "decision": summary(&decision),
        }))
    };
    body().map_err(|e| e.context(c.log_tails(30)))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    weir_tests::stop_on_signal("autoscale-bench", &STOP);
    let weir = Mode {
        name: "weir",
        metrics_interval: Duration::from_secs(1),
        sync_period: Duration::ZERO,
    };
    let baseline = Mode {
        name: "baseline",
        metrics_interval: Duration::from_secs(15),
        sync_period: Duration::from_secs(15),
    };
    let w = run_mode(&weir, args.reps)?;
    let b = if args.baseline_reps > 0 {
        run_mode(&baseline, args.baseline_reps)?
    } else {
        Value::Null
    };
    let load = json!({
        "new_connections_per_second": 1000 / EVERY.as_millis(),
        "target_average_per_pod": TARGET_PER_POD,
        "readiness_probe_period_s": 1,
        "nodes": 2,
    });
    println!("{}", json!({"weir": w, "baseline": b, "load": load}));
    Ok(())
}
