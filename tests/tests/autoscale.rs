//! Horizontal pod autoscaling on a real weir cluster, end to end:
//! weir-control (HPA controller on metric change), two weir-agents
//! sampling their pods' cgroups and eBPF counters every second and
//! pushing them to the control, busybox httpd pods behind a Service, and a
//! bounded load step through the Service's VIP from a node. One HPA scales
//! on CPU utilization (each request runs a CGI script that burns CPU), one
//! on weir's kernel metric `weir_pod_new_connections_per_second`. Each
//! case checks that the load makes the Deployment scale up, that the new
//! pods become Ready, join the endpoints and answer requests, that the
//! replica count never reverses more than once under steady load, and that
//! it scales back down once the load stops and the (short) stabilization
//! window has passed. Needs root.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use weir_tests::api::{Api, condition_status, ready_addresses};
use weir_tests::autoscale::{Load, deployment, hpa, ready_pods, replicas, reversals, service};
use weir_tests::{ControlCluster, wait_for};

const TAG: &str = "as";
const SUBNET: u8 = 44;
/// Short heartbeats, so nodes are Ready soon.
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
/// How long pods may take to be scheduled, started and reported Ready.
const START: Duration = Duration::from_secs(90);
/// How long a load step may take to bring a new replica into the endpoints.
const SCALE_UP: Duration = Duration::from_mins(1);
/// The HPAs' scale-down stabilization window.
const DOWN_WINDOW_S: u64 = 10;
/// The longest a load runs (every load loop is bounded in time and count).
const LOAD_LIMIT: Duration = Duration::from_secs(150);

/// One autoscaling case: Deployment + Service + HPA `name` on `metric`,
/// a load step of one request per `every` to `path`, scale up, steady,
/// stop, scale down.
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn case(
    c: &ControlCluster,
    api: &Api,
    name: &str,
    metric: &Value,
    path: &str,
    every: Duration,
) -> anyhow::Result<()> {
    api.apply(&deployment(name))?;
    let svc = api.apply(&service(name))?;
    let svc: Value = serde_json::from_str(&svc.json)?;
    let vip: Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .context("clusterIP")?
        .parse()?;
    let first = wait_for(&format!("{name}: one Ready pod"), START, || {
        let r = ready_pods(api, name);
        (r.len() == 1).then_some(r)
    })?;
    wait_for(&format!("{name}: one endpoint"), START, || {
        api.get("EndpointSlice", "default", name)
            .filter(|s| ready_addresses(s).len() == 1)
    })?;
    api.apply(&hpa(name, metric, DOWN_WINDOW_S))?;
    // Idle: the HPA finds its metric and stays at 1.
    wait_for(
        &format!("{name}: HPA ScalingActive"),
        Duration::from_secs(30),
        || {
            api.get("HorizontalPodAutoscaler", "default", name)
                .filter(|h| condition_status(h, "ScalingActive") == "True")
        },
    )
    .with_context(|| {
        format!(
            "hpa: {:?}",
            api.get("HorizontalPodAutoscaler", "default", name)
        )
    })?;
    ensure!(replicas(api, name) == Some(1), "{name} scaled with no load");

    let node = c.cluster.nodes.first().context("a node")?.netns_path();
    let load = Load::start(PathBuf::from(node), vip, path, every, 3_000, LOAD_LIMIT);
    let step = Instant::now();
    let mut series = vec![1];
    let up = wait_for(
        &format!("{name}: a second Ready pod in the endpoints"),
        SCALE_UP,
        || {
            if let Some(r) = replicas(api, name)
                && series.last() != Some(&r)
            {
                series.push(r);
            }
            let ready = ready_pods(api, name);
            let slice = api.get("EndpointSlice", "default", name)?;
            (ready.len() >= 2 && ready_addresses(&slice).len() >= 2).then_some(ready)
        },
    )
    .with_context(|| {
        format!(
            "replicas {series:?}, hpa {}",
            api.get("HorizontalPodAutoscaler", "default", name)
                .map(|h| h["status"].to_string())
                .unwrap_or_default()
        )
    })?;
    let reaction = step.elapsed();
    eprintln!(
        "{name}: load step -> {} Ready in the endpoints after {reaction:.1?}",
        up.len()
    );
    // The new pods take traffic; under the steady load the count may
    // still grow, but it never goes back and forth.
    let new: BTreeSet<String> = up.difference(&first).cloned().collect();
    wait_for(
        &format!("{name}: a new pod answers through the Service"),
        Duration::from_secs(20),
        || load.answered_by().intersection(&new).next().map(|_| ()),
    )
    .with_context(|| format!("answered by {:?}, new {new:?}", load.answered_by()))?;
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(10) {
        if let Some(r) = replicas(api, name)
            && series.last() != Some(&r)
        {
            series.push(r);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    ensure!(
        reversals(&series) <= 1,
        "{name}: replicas went back and forth under steady load: {series:?}"
    );
    let peak = *series.iter().max().unwrap_or(&1);
    ensure!(peak >= 2, "{name}: never scaled up: {series:?}");
    let answers = load.answers();
    drop(load);
    eprintln!("{name}: {answers} answers under load, replicas {series:?}");

    // Load gone: back to 1 after the stabilization window, not before.
    let stopped = Instant::now();
    wait_for(
        &format!("{name}: back to 1 replica"),
        Duration::from_secs(DOWN_WINDOW_S + 60),
        || (replicas(api, name) == Some(1)).then_some(()),
    )?;
    let down = stopped.elapsed();
    eprintln!("{name}: load stopped -> 1 replica after {down:.1?}");
    ensure!(
        down >= Duration::from_secs(DOWN_WINDOW_S.saturating_sub(2)),
        "{name}: scaled down {down:?} after the load stopped, inside the {DOWN_WINDOW_S} s window"
    );
    // The decisions are explained: events and `weirctl get hpa`.
    let events = api.list("Event", "default", "")?;
    let rescales: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "SuccessfulRescale" && e["involvedObject"]["name"] == name)
        .collect();
    ensure!(
        !rescales.is_empty(),
        "{name}: no SuccessfulRescale event among {} events",
        events.len()
    );
    let table = c.weirctl(&["get", "hpa", name])?;
    ensure!(
        table.contains("REFERENCE") && table.contains(&format!("Deployment/{name}")),
        "weirctl get hpa: {table}"
    );
    let all = c.weirctl(&["get", "all"])?;
    ensure!(
        all.lines()
            .any(|l| l.starts_with(&format!("horizontalpodautoscaler.autoscaling/{name}"))),
        "weirctl get all lists the HPA:\n{all}"
    );
    Ok(())
}

#[test]
fn hpa_scales_on_cpu_and_on_new_connections() -> anyhow::Result<()> {
    let mut c = ControlCluster::new(TAG, SUBNET, 2, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let run = || -> anyhow::Result<()> {
        api.wait_nodes_ready(&c.node_names())?;
        // ~50 ms of CPU per request, 10 requests/s: ~0.5 core on one pod
        // against 100m requested, far over the 50 % target.
        let cpu = json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": 50}}});
        case(
            &c,
            &api,
            "burn",
            &cpu,
            "/cgi-bin/burn",
            Duration::from_millis(100),
        )?;
        // 20 new connections/s against 8 per pod: 3 pods.
        let conns = json!({"type": "Pods", "pods": {
            "metric": {"name": "weir_pod_new_connections_per_second"},
            "target": {"type": "AverageValue", "averageValue": "8"}}});
        case(&c, &api, "conn", &conns, "/", Duration::from_millis(50))
    };
    run().map_err(|e| e.context(c.log_tails(40)))
}
