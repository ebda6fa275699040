//! Workloads on a real weir cluster, end to end: weir-control (redb, or
//! etcd) with its scheduler and controllers, three weir-agents in control
//! mode, each in its own node netns sharing one private containerd, busybox
//! httpd pods answering real HTTP across nodes, and the real weirctl for
//! what a user types (apply, get, scale, rollout, cordon, drain). Covers
//! spreading, scaling, rolling updates under live probes and rollbacks,
//! node failure and recovery, control restarts on either store,
//! cordon/drain, and taint/affinity placement. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use weir_tests::api::{Api, condition, condition_status, heartbeat, name, uid};
use weir_tests::{ControlCluster, http_get_in, wait_for};

/// Short heartbeats and node grace, so a dead agent shows within seconds.
const CONTROL_ARGS: &[&str] = &[
    "--heartbeat-interval",
    "1s",
    "--node-monitor-grace-period",
    "10s",
    "--node-monitor-period",
    "1s",
];
/// The node monitor grace period above.
const NODE_GRACE: Duration = Duration::from_secs(10);
/// How long pods may take to be scheduled, started and reported Ready.
const START: Duration = Duration::from_secs(90);
/// The web pods' port.
const PORT: u16 = 8080;

fn node_of(p: &Value) -> String {
    p["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn terminating(p: &Value) -> bool {
    p["metadata"]["deletionTimestamp"].is_string()
}

fn pod_ip(p: &Value) -> Option<Ipv4Addr> {
    p["status"]["podIP"].as_str()?.parse().ok()
}

fn running_ready(p: &Value) -> bool {
    !terminating(p)
        && p["status"]["phase"] == "Running"
        && condition_status(p, "Ready") == "True"
        && pod_ip(p).is_some()
        && !node_of(p).is_empty()
}

/// One line per pod: name, node, phase, terminating; for failure messages.
fn summary(pods: &[Value]) -> String {
    pods.iter()
        .map(|p| {
            format!(
                "{} node={} phase={} ready={}{}",
                name(p),
                node_of(p),
                p["status"]["phase"].as_str().unwrap_or("-"),
                condition_status(p, "Ready"),
                if terminating(p) { " terminating" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until exactly `n` pods match `selector`, none terminating, all
/// Running and Ready on a node, and `also` holds for the set; returns them.
fn wait_settled(
    api: &Api,
    selector: &str,
    n: usize,
    limit: Duration,
    also: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    wait_for(
        &format!("exactly {n} Running+Ready pods {selector}, none terminating"),
        limit,
        || {
            let pods = api.pods(selector).ok()?;
            (pods.len() == n && pods.iter().all(running_ready) && also(&pods)).then_some(pods)
        },
    )
    .with_context(|| {
        format!(
            "last seen:\n{}",
            summary(&api.pods(selector).unwrap_or_default())
        )
    })
}

fn nodes_of(pods: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in pods {
        *m.entry(node_of(p)).or_insert(0) += 1;
    }
    m
}

/// A Deployment of busybox httpd pods answering `web-<version>` on
/// [`PORT`]; `extra` is added to the pod spec (indented 6 spaces).
fn web_deployment(name: &str, replicas: u32, version: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxSurge: 1, maxUnavailable: 1}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      terminationGracePeriodSeconds: 1
{extra}      containers:
      - name: web
        image: busybox
        env:
        - {{name: VERSION, value: "{version}"}}
        command: ["sh", "-c", "mkdir -p /srv && echo {name}-$VERSION > /srv/index.html && exec httpd -f -p {PORT} -h /srv"]
        ports:
        - containerPort: {PORT}
"#
    )
}

/// The client pods by node: node name → the pod's netns.
fn clients(c: &ControlCluster, api: &Api) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let n = c.cluster.nodes.len();
    let pods = wait_settled(api, "app=client", n, START, |p| nodes_of(p).len() == n)?;
    pods.iter()
        .map(|p| {
            let node = node_of(p);
            let netns = c
                .node_named(&node)
                .with_context(|| format!("client on unknown node {node}"))?
                .pod_netns(&uid(p));
            Ok((node, netns))
        })
        .collect()
}

/// GET / of `ip` from inside the pod netns `from`; the trimmed body of a 200.
fn answer(from: &std::path::Path, ip: Ipv4Addr, timeout: Duration) -> anyhow::Result<String> {
    let (code, body) = http_get_in(from, SocketAddr::from((ip, PORT)), "/", timeout)?;
    ensure!(code == 200, "GET http://{ip}:{PORT}/: {code} {body}");
    Ok(body.trim().to_owned())
}

/// Every pod answers `body` over HTTP from a client pod on another node.
fn each_answers_across_nodes(
    clients: &BTreeMap<String, PathBuf>,
    pods: &[Value],
    body: &str,
) -> anyhow::Result<()> {
    for p in pods {
        let node = node_of(p);
        let (from_node, from) = clients
            .iter()
            .find(|(n, _)| **n != node)
            .context("a client on another node")?;
        let ip = pod_ip(p).context("podIP")?;
        let got = wait_for(
            &format!("{} ({ip} on {node}) answering from {from_node}", name(p)),
            Duration::from_secs(20),
            || answer(from, ip, Duration::from_secs(2)).ok(),
        )?;
        ensure!(got == body, "{} answered {got:?}, not {body:?}", name(p));
    }
    Ok(())
}

/// What a live probe saw while a rollout ran.
#[derive(Debug, Default)]
struct ProbeLog {
    rounds: usize,
    /// Fewest pods answering in a round (confirmed by an immediate re-probe).
    min_serving: usize,
    /// The rounds below the floor: (time since start, answering, listed).
    dips: Vec<(Duration, usize, Vec<String>)>,
    bodies: BTreeSet<String>,
}

/// One probe round: lists the pods `selector` with an IP and counts those
/// answering HTTP from `from` (in parallel); returns (answering, listed,
/// bodies).
fn probe_round(
    api: &Api,
    from: &std::path::Path,
    selector: &str,
) -> (usize, Vec<String>, BTreeSet<String>) {
    let pods = api.pods(selector).unwrap_or_default();
    let targets: Vec<(String, Ipv4Addr)> = pods
        .iter()
        .filter_map(|p| Some((name(p), pod_ip(p)?)))
        .collect();
    let answers: Vec<Option<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(_, ip)| s.spawn(move || answer(from, *ip, Duration::from_millis(800)).ok()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    let listed = targets
        .iter()
        .zip(&answers)
        .map(|((n, ip), a)| format!("{n}@{ip}={}", a.as_deref().unwrap_or("-")))
        .collect();
    let bodies: BTreeSet<String> = answers.iter().flatten().cloned().collect();
    (answers.iter().flatten().count(), listed, bodies)
}

/// Probes the pods `selector` every 100 ms from `from` until `stop` (at
/// most `limit`), counting rounds in `rounds`. A round below `floor` is
/// re-probed at once with a fresh list, so a pod replaced between the list
/// and the probe doesn't count as a dip; a dip is a round whose re-probe is
/// below the floor too.
fn probe_until(
    api: &Api,
    from: &std::path::Path,
    selector: &str,
    floor: usize,
    (stop, rounds): (&AtomicBool, &AtomicUsize),
    limit: Duration,
) -> ProbeLog {
    let start = Instant::now();
    let mut log = ProbeLog {
        min_serving: usize::MAX,
        ..ProbeLog::default()
    };
    while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
        let (mut serving, mut listed, bodies) = probe_round(api, from, selector);
        log.bodies.extend(bodies);
        if serving < floor {
            let (again, listed_again, bodies) = probe_round(api, from, selector);
            log.bodies.extend(bodies);
            if again >= floor {
                serving = again;
            } else {
                listed.extend(listed_again);
                log.dips.push((start.elapsed(), serving.max(again), listed));
            }
        }
        log.min_serving = log.min_serving.min(serving);
        log.rounds += 1;
        rounds.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
    }
    log
}

/// Starts probing the pods of Deployment `name` from `from`, runs
/// `trigger` (which starts a rollout) after the first round, then
/// `weirctl rollout status deployment/<name>`: the rollout must succeed and
/// never leave fewer than `floor` pods answering. Returns what the probes
/// saw.
fn rollout_under_probe(
    c: &ControlCluster,
    api: &Api,
    from: &std::path::Path,
    name: &str,
    floor: usize,
    trigger: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<ProbeLog> {
    let stop = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    let selector = format!("app={name}");
    let (status, log) = std::thread::scope(|s| {
        let prober = s.spawn(|| probe_until(api, from, &selector, floor, (&stop, &rounds), START));
        let status = wait_for("a first probe round", Duration::from_secs(10), || {
            (rounds.load(Ordering::Relaxed) > 0).then_some(())
        })
        .and_then(|()| trigger())
        .and_then(|()| {
            c.weirctl(&[
                "rollout",
                "status",
                &format!("deployment/{name}"),
                "--timeout",
                "90s",
            ])
        });
        // A few rounds past the end, to see the last pods answer.
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        (status, prober.join())
    });
    let log = log.map_err(|_| anyhow::anyhow!("the probe thread panicked"))?;
    let out = status?;
    ensure!(
        out.contains(&format!("deployment \"{name}\" successfully rolled out")),
        "{out}"
    );
    ensure!(
        log.dips.is_empty(),
        "fewer than {floor} pods answered during the rollout: {:#?}",
        log.dips
    );
    Ok(log)
}

/// The pods' `pod-template-hash` labels.
fn hashes(pods: &[Value]) -> BTreeSet<String> {
    pods.iter()
        .filter_map(|p| p["metadata"]["labels"]["pod-template-hash"].as_str())
        .map(str::to_owned)
        .collect()
}

fn revision(o: &Value) -> String {
    o["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Scenario 1: a Deployment of 6 spreads over the 3 nodes, each pod
/// answers from another node, and `get pods -o wide` shows where.
fn deployment_spreads_and_answers(
    c: &ControlCluster,
    api: &Api,
    clients: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<Vec<Value>> {
    let out = c.weirctl_apply(&web_deployment("web", 6, "v1", ""))?;
    ensure!(out.trim() == "deployment.apps/web created", "{out}");
    let pods = wait_settled(api, "app=web", 6, START, |_| true)?;
    let spread = nodes_of(&pods);
    for n in c.node_names() {
        ensure!(
            spread.get(&n).copied().unwrap_or(0) >= 1,
            "node {n} got no web pod: {spread:?}"
        );
    }
    each_answers_across_nodes(clients, &pods, "web-v1")?;
    let wide = c.weirctl(&["get", "pods", "-o", "wide", "-l", "app=web"])?;
    let header = wide.lines().next().unwrap_or_default();
    ensure!(header.contains("NODE") && header.contains("IP"), "{wide}");
    for p in &pods {
        let line = wide
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name(p).as_str()))
            .with_context(|| format!("{} missing from get -o wide:\n{wide}", name(p)))?;
        let ip = pod_ip(p).context("podIP")?.to_string();
        let cols: Vec<&str> = line.split_whitespace().collect();
        ensure!(
            cols.contains(&node_of(p).as_str()) && cols.contains(&ip.as_str()),
            "{line}"
        );
    }
    Ok(pods)
}

/// Whether the agent of node `node` still runs pod `uid`, or containerd
/// still holds its containers.
fn still_on_node(c: &ControlCluster, node: &str, uid: &str) -> anyhow::Result<bool> {
    let n = c.node_named(node).context("node")?;
    if n.pods()?.iter().any(|p| p["metadata"]["uid"] == uid) {
        return Ok(true);
    }
    let filter = format!("labels.\"io.weir.pod.uid\"=={uid}");
    let left = c
        .cluster
        .containerd
        .ctr(&n.containerd_ns(), &["containers", "ls", "-q", &filter])?;
    Ok(!left.trim().is_empty())
}

/// Scenario 2: `weirctl scale` up to 9 keeps the 6 and adds 3; down to 4
/// removes 5, torn down on their nodes.
fn scale_up_and_down(c: &ControlCluster, api: &Api, before: &[Value]) -> anyhow::Result<()> {
    let out = c.weirctl(&["scale", "deployment", "web", "--replicas", "9"])?;
    ensure!(out.trim() == "deployment.apps/web scaled", "{out}");
    let nine = wait_settled(api, "app=web", 9, START, |_| true)?;
    let names: BTreeSet<String> = nine.iter().map(name).collect();
    for p in before {
        ensure!(names.contains(&name(p)), "{} went on scale up", name(p));
    }
    c.weirctl(&["scale", "deployment/web", "--replicas", "4"])?;
    let four = wait_settled(api, "app=web", 4, START, |_| true)?;
    let kept: BTreeSet<String> = four.iter().map(uid).collect();
    let removed: Vec<&Value> = nine.iter().filter(|p| !kept.contains(&uid(p))).collect();
    ensure!(removed.len() == 5, "{removed:?}");
    for p in removed {
        let (node, id) = (node_of(p), uid(p));
        wait_for(
            &format!("{} torn down on {node}", name(p)),
            Duration::from_secs(30),
            || still_on_node(c, &node, &id).ok().filter(|on| !on),
        )?;
    }
    let d = api.get("Deployment", "default", "web").context("web")?;
    ensure!(d["spec"]["replicas"] == 4, "{}", d["spec"]);
    Ok(())
}

/// Scenario 3: a rolling update (env change, 4 replicas, surge 1,
/// unavailable 1) never leaves fewer than 3 pods answering; `rollout undo`
/// brings the old template back on the old `ReplicaSet`.
fn rolling_update_and_undo(
    c: &ControlCluster,
    api: &Api,
    clients: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<()> {
    let from = clients.values().next().context("a client")?;
    let v1_pods = wait_settled(api, "app=web", 4, START, |_| true)?;
    let old_hash = hashes(&v1_pods).into_iter().next().context("hash")?;
    let old_rs_name = format!("web-{old_hash}");
    let old_rs = api
        .get("ReplicaSet", "default", &old_rs_name)
        .with_context(|| format!("ReplicaSet {old_rs_name}"))?;

    let log = rollout_under_probe(c, api, from, "web", 3, || {
        let out = c.weirctl_apply(&web_deployment("web", 4, "v2", ""))?;
        ensure!(out.trim() == "deployment.apps/web configured", "{out}");
        Ok(())
    })?;
    ensure!(
        log.bodies.contains("web-v1") && log.bodies.contains("web-v2"),
        "the probes never saw both versions: {log:?}"
    );
    eprintln!(
        "rollout: {} probe rounds, fewest answering {}",
        log.rounds, log.min_serving
    );
    let v2_pods = wait_settled(api, "app=web", 4, START, |p| !hashes(p).contains(&old_hash))?;
    ensure!(hashes(&v2_pods).len() == 1, "{}", summary(&v2_pods));
    each_answers_across_nodes(clients, &v2_pods, "web-v2")?;
    let old = api
        .get("ReplicaSet", "default", &old_rs_name)
        .context("old RS")?;
    ensure!(old["spec"]["replicas"] == 0, "{}", old["spec"]);
    let d = api.get("Deployment", "default", "web").context("web")?;
    ensure!(revision(&d) == "2", "{}", d["metadata"]);

    let log = rollout_under_probe(c, api, from, "web", 3, || {
        let out = c.weirctl(&["rollout", "undo", "deployment/web"])?;
        ensure!(out.trim() == "deployment.apps/web rolled back", "{out}");
        Ok(())
    })?;
    ensure!(
        log.bodies.contains("web-v1") && log.bodies.contains("web-v2"),
        "the probes never saw both versions: {log:?}"
    );
    eprintln!(
        "undo: {} probe rounds, fewest answering {}",
        log.rounds, log.min_serving
    );
    let back = wait_settled(api, "app=web", 4, START, |p| {
        hashes(p) == BTreeSet::from([old_hash.clone()])
    })?;
    each_answers_across_nodes(clients, &back, "web-v1")?;
    let reused = api
        .get("ReplicaSet", "default", &old_rs_name)
        .context("old RS")?;
    ensure!(
        uid(&reused) == uid(&old_rs),
        "the old ReplicaSet was replaced"
    );
    ensure!(reused["spec"]["replicas"] == 4, "{}", reused["spec"]);
    ensure!(revision(&reused) == "3", "{}", reused["metadata"]);
    let d = api.get("Deployment", "default", "web").context("web")?;
    ensure!(revision(&d) == "3", "{}", d["metadata"]);
    Ok(())
}

#[test]
fn deployment_spreads_scales_rolls_out_under_probes_and_rolls_back() -> anyhow::Result<()> {
    let mut c = ControlCluster::new("wa", 51, 3, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    api.wait_nodes_ready(&c.node_names())?;
    c.weirctl_apply(weir_tests::CLIENT_DS)?;
    let clients = clients(&c, &api)?;
    let six = deployment_spreads_and_answers(&c, &api, &clients)?;
    scale_up_and_down(&c, &api, &six)?;
    rolling_update_and_undo(&c, &api, &clients)?;
    Ok(())
}

/// Every object's uid, by `Kind/namespace/name`.
fn all_uids(api: &Api) -> anyhow::Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for kind in [
        "Namespace",
        "Node",
        "Pod",
        "ReplicaSet",
        "Deployment",
        "DaemonSet",
    ] {
        for o in api.list(kind, "", "")? {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
            m.insert(format!("{kind}/{ns}/{}", name(&o)), uid(&o));
        }
    }
    Ok(m)
}

/// Every node's containerd tasks: `id pid status` lines, sorted.
fn tasks(c: &ControlCluster) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    c.cluster
        .nodes
        .iter()
        .map(|n| {
            let t = c
                .cluster
                .containerd
                .ctr(&n.containerd_ns(), &["tasks", "ls"])?;
            let lines = t
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            Ok((n.name.clone(), lines))
        })
        .collect()
}

/// Scenario 5/6: SIGKILL weir-control and start it on the same store: no
/// object lost (same uids), running pods untouched (same tasks and pids,
/// no restarts), agents reconnect (fresh heartbeats), and the cluster
/// works on (a scale-up runs a new pod that answers).
fn control_restart_loses_nothing(
    c: &mut ControlCluster,
    api: &Api,
    clients: &BTreeMap<String, PathBuf>,
    deployment: &str,
) -> anyhow::Result<()> {
    let selector = format!("app={deployment}");
    let pods = api.pods(&selector)?;
    let n = pods.len();
    ensure!(pods.iter().all(running_ready), "{}", summary(&pods));
    let uids = all_uids(api)?;
    let tasks_before = tasks(c)?;
    let beats: BTreeMap<String, String> = c
        .node_names()
        .into_iter()
        .map(|n| {
            let b = api
                .get("Node", "", &n)
                .map(|o| heartbeat(&o))
                .unwrap_or_default();
            (n, b)
        })
        .collect();

    c.control.kill();
    std::thread::sleep(Duration::from_secs(2));
    let body = format!("{deployment}-v1");
    each_answers_across_nodes(clients, &pods, &body).context("with the control down")?;
    c.control.restart()?;

    for (node, beat) in &beats {
        wait_for(
            &format!("{node} heartbeating to the new control"),
            Duration::from_secs(30),
            || {
                api.get("Node", "", node)
                    .filter(|o| heartbeat(o) != *beat && condition_status(o, "Ready") == "True")
            },
        )?;
    }
    let after = all_uids(api)?;
    for (key, id) in &uids {
        ensure!(
            after.get(key) == Some(id),
            "{key}: uid {id} before the restart, {:?} after",
            after.get(key)
        );
    }
    let tasks_after = tasks(c)?;
    ensure!(
        tasks_after == tasks_before,
        "a pod's task changed: before {tasks_before:#?}\nafter {tasks_after:#?}"
    );
    let same = wait_settled(api, &selector, n, Duration::from_secs(20), |_| true)?;
    for p in &same {
        let restarts = &p["status"]["containerStatuses"][0]["restartCount"];
        ensure!(*restarts == 0, "{} restarted: {restarts}", name(p));
    }
    let grown = n + 1;
    c.weirctl(&[
        "scale",
        "deployment",
        deployment,
        "--replicas",
        &grown.to_string(),
    ])?;
    let pods = wait_settled(api, &selector, grown, START, |_| true)?;
    each_answers_across_nodes(clients, &pods, &body)?;
    Ok(())
}

/// Waits until Deployment `name` has `n` Running+Ready pods, none on
/// `avoid`, ignoring terminating ones; returns them.
fn wait_ready_avoiding(
    api: &Api,
    name: &str,
    n: usize,
    avoid: &str,
    limit: Duration,
) -> anyhow::Result<Vec<Value>> {
    let selector = format!("app={name}");
    wait_for(
        &format!("{n} Ready pods of {name}, none on {avoid}"),
        limit,
        || {
            let live: Vec<Value> = api
                .pods(&selector)
                .ok()?
                .into_iter()
                .filter(|p| !terminating(p))
                .collect();
            (live.len() == n
                && live.iter().all(running_ready)
                && live.iter().all(|p| node_of(p) != avoid))
            .then_some(live)
        },
    )
    .with_context(|| {
        format!(
            "last seen:\n{}",
            summary(&api.pods(&selector).unwrap_or_default())
        )
    })
}

fn node_line(c: &ControlCluster, node: &str) -> anyhow::Result<String> {
    let out = c.weirctl(&["get", "nodes"])?;
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(node))
        .map(str::to_owned)
        .with_context(|| format!("{node} missing from get nodes:\n{out}"))
}

/// Scenario 7: cordon keeps new pods off a node; drain evicts its pods
/// (not the `DaemonSet`'s) and they come back elsewhere; uncordon lets pods
/// land there again.
fn cordon_drain_uncordon(c: &ControlCluster, api: &Api, node: &str) -> anyhow::Result<()> {
    let out = c.weirctl(&["cordon", node])?;
    ensure!(out.trim() == format!("node/{node} cordoned"), "{out}");
    let line = node_line(c, node)?;
    ensure!(line.contains("SchedulingDisabled"), "{line}");
    let before: BTreeSet<String> = api.pods("app=web")?.iter().map(uid).collect();
    c.weirctl(&["scale", "deployment", "web", "--replicas", "9"])?;
    let nine = wait_settled(api, "app=web", 9, START, |_| true)?;
    for p in nine.iter().filter(|p| !before.contains(&uid(p))) {
        ensure!(node_of(p) != node, "{} landed on cordoned {node}", name(p));
    }
    let on_node = nine.iter().filter(|p| node_of(p) == node).count();
    ensure!(on_node > 0, "no web pod to drain on {node}");

    let (ok, out, err) = c.weirctl_output(
        &["drain", node, "--ignore-daemonsets", "--timeout", "60s"],
        None,
    )?;
    ensure!(ok, "drain failed:\n{err}{out}");
    ensure!(out.contains(&format!("node/{node} drained")), "{out}{err}");
    ensure!(
        out.matches("evicted").count() >= on_node,
        "{on_node} pods to evict:\n{out}"
    );
    let nine = wait_ready_avoiding(api, "web", 9, node, START)?;
    ensure!(
        api.pods("app=web")?.iter().all(|p| node_of(p) != node),
        "a web pod is still on {node}"
    );
    let ds_left = api
        .pods("app=client")?
        .iter()
        .filter(|p| node_of(p) == node && !terminating(p))
        .count();
    ensure!(ds_left == 1, "drain touched the DaemonSet pod on {node}");

    let out = c.weirctl(&["uncordon", node])?;
    ensure!(out.trim() == format!("node/{node} uncordoned"), "{out}");
    ensure!(!node_line(c, node)?.contains("SchedulingDisabled"));
    c.weirctl(&["scale", "deployment", "web", "--replicas", "12"])?;
    let twelve = wait_settled(api, "app=web", 12, START, |_| true)?;
    let known: BTreeSet<String> = nine.iter().map(uid).collect();
    ensure!(
        twelve
            .iter()
            .any(|p| !known.contains(&uid(p)) && node_of(p) == node),
        "no new pod landed on uncordoned {node}:\n{}",
        summary(&twelve)
    );
    c.weirctl(&["scale", "deployment", "web", "--replicas", "6"])?;
    wait_settled(api, "app=web", 6, START, |_| true)?;
    Ok(())
}

fn unreachable_taints(node: &Value) -> usize {
    node["spec"]["taints"].as_array().map_or(0, |t| {
        t.iter()
            .filter(|t| t["key"] == "node.kubernetes.io/unreachable")
            .count()
    })
}

/// Scenario 4: kill -9 the agent of the node with the most web pods: within the grace period (plus a
/// margin) the node is `NotReady` and tainted, and the Deployment is back to
/// full strength on the other nodes; a restarted agent makes the node
/// Ready again, untainted, and its evicted pods go.
fn agent_death_and_return(
    c: &mut ControlCluster,
    api: &Api,
    clients: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<Duration> {
    let pods = wait_settled(api, "app=web", 6, START, |_| true)?;
    // The node with the most web pods.
    let (node, _) = nodes_of(&pods)
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .context("no web pods")?;
    let i = c
        .node_names()
        .iter()
        .position(|n| *n == node)
        .context("the pods' node")?;
    let doomed: Vec<&Value> = pods.iter().filter(|p| node_of(p) == node).collect();
    ensure!(
        !doomed.is_empty(),
        "no web pod on {node}:\n{}",
        summary(&pods)
    );
    let killed = Instant::now();
    c.node(i).kill_agent();

    let limit = NODE_GRACE + Duration::from_secs(30);
    wait_for(&format!("{node} NotReady and tainted"), limit, || {
        api.get("Node", "", &node)
            .filter(|o| condition_status(o, "Ready") != "True" && unreachable_taints(o) == 2)
    })?;
    let line = node_line(c, &node)?;
    ensure!(line.contains("NotReady"), "{line}");
    let replaced = wait_ready_avoiding(api, "web", 6, &node, limit)?;
    let took = killed.elapsed();
    // Not before the grace period (less a heartbeat and the timestamps'
    // whole seconds).
    ensure!(
        took + Duration::from_secs(3) >= NODE_GRACE,
        "pods of {node} replaced after {took:?}, within the grace period"
    );
    each_answers_across_nodes(clients, &replaced, "web-v1")?;

    c.start_agent(i)?;
    wait_for(
        &format!("{node} Ready and untainted"),
        Duration::from_secs(30),
        || {
            api.get("Node", "", &node)
                .filter(|o| condition_status(o, "Ready") == "True" && unreachable_taints(o) == 0)
        },
    )?;
    let line = node_line(c, &node)?;
    ensure!(line.split_whitespace().nth(1) == Some("Ready"), "{line}");
    // The evicted pods are stopped and their objects removed.
    for p in doomed {
        let (n, id) = (name(p), uid(p));
        wait_for(
            &format!("evicted {n} gone"),
            Duration::from_secs(30),
            || {
                api.get("Pod", "default", &n)
                    .is_none_or(|o| uid(&o) != id)
                    .then_some(())
            },
        )?;
        wait_for(
            &format!("{n} torn down on {node}"),
            Duration::from_secs(30),
            || still_on_node(c, &node, &id).ok().filter(|on| !on),
        )?;
    }
    wait_settled(api, "app=client", 3, START, |p| nodes_of(p).len() == 3)?;
    Ok(took)
}

#[test]
fn nodes_cordon_drain_fail_recover_and_the_control_restarts() -> anyhow::Result<()> {
    let mut c = ControlCluster::new("wb", 52, 3, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    api.wait_nodes_ready(&c.node_names())?;
    c.weirctl_apply(weir_tests::CLIENT_DS)?;
    c.weirctl_apply(&web_deployment("web", 6, "v1", ""))?;
    let clients = clients(&c, &api)?;
    wait_settled(&api, "app=web", 6, START, |_| true)?;
    let n3 = c.node(2).name.clone();
    cordon_drain_uncordon(&c, &api, &n3)?;
    control_restart_loses_nothing(&mut c, &api, &clients, "web")?;
    c.weirctl(&["scale", "deployment", "web", "--replicas", "6"])?;
    let took = agent_death_and_return(&mut c, &api, &clients)?;
    eprintln!("pods of the killed node replaced after {took:?}");
    Ok(())
}

#[test]
fn control_on_etcd_runs_pods_and_restarts_without_losing_them() -> anyhow::Result<()> {
    let etcd = weir_tests::etcd::Etcd::start(std::path::Path::new("/tmp/weir-e2e-etcd-wd"))?;
    let mut c = ControlCluster::with_store("wd", 54, 3, Some(&etcd.store_url()), CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    api.wait_nodes_ready(&c.node_names())?;
    c.weirctl_apply(weir_tests::CLIENT_DS)?;
    c.weirctl_apply(&web_deployment("web", 3, "v1", ""))?;
    let clients = clients(&c, &api)?;
    let pods = wait_settled(&api, "app=web", 3, START, |_| true)?;
    each_answers_across_nodes(&clients, &pods, "web-v1")?;
    // The objects live in etcd: it holds at least a key per object.
    let objects = all_uids(&api)?.len();
    let keys = etcd.keys()?;
    ensure!(
        usize::try_from(keys)? >= objects,
        "etcd holds {keys} keys for {objects} objects"
    );
    control_restart_loses_nothing(&mut c, &api, &clients, "web")?;
    ensure!(etcd.answers(), "etcd went away");
    Ok(())
}

/// Node `node` with `taints` (read-modify-apply through weirctl).
fn set_taints(c: &ControlCluster, node: &str, taints: &Value) -> anyhow::Result<()> {
    let mut n: Value = serde_json::from_str(&c.weirctl(&["get", "node", node, "-o", "json"])?)?;
    n["spec"]["taints"] = taints.clone();
    if let Some(o) = n.as_object_mut() {
        o.remove("status");
    }
    let out = c.weirctl_apply(&n.to_string())?;
    ensure!(out.trim() == format!("node/{node} configured"), "{out}");
    Ok(())
}

/// A pod (busybox httpd) with `spec` merged into its spec.
fn placed_pod(name: &str, spec: &Value) -> Value {
    let mut p = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "web",
                "image": "busybox",
                "command": ["sh", "-c", format!("mkdir -p /srv && echo {name} > /srv/index.html && exec httpd -f -p {PORT} -h /srv")],
            }],
        },
    });
    if let (Some(dst), Some(src)) = (p["spec"].as_object_mut(), spec.as_object()) {
        for (k, v) in src {
            dst.insert(k.clone(), v.clone());
        }
    }
    p
}

fn hostname_selector(node: &str) -> Value {
    json!({"kubernetes.io/hostname": node})
}

const DEDICATED: &str =
    r#"{"key": "dedicated", "operator": "Equal", "value": "special", "effect": "NoSchedule"}"#;

/// Waits until pod `name` is refused by the scheduler; returns its
/// `PodScheduled` message.
fn wait_unschedulable(api: &Api, name: &str) -> anyhow::Result<String> {
    let p = wait_for(
        &format!("{name} Unschedulable"),
        Duration::from_secs(30),
        || {
            api.get("Pod", "default", name).filter(|p| {
                condition(p, "PodScheduled")
                    .is_some_and(|c| c["status"] == "False" && c["reason"] == "Unschedulable")
            })
        },
    )?;
    ensure!(
        node_of(&p).is_empty(),
        "{name} was bound to {}",
        node_of(&p)
    );
    Ok(condition(&p, "PodScheduled")
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_owned())
}

/// Taints and tolerations, nodeSelector and required node affinity.
fn taints_and_node_affinity(c: &ControlCluster, api: &Api, names: &[String]) -> anyhow::Result<()> {
    let (n2, n3) = (&names[1], &names[2]);
    let dedicated: Value = serde_json::from_str(DEDICATED)?;
    set_taints(
        c,
        n3,
        &json!([{"key": "dedicated", "value": "special", "effect": "NoSchedule"}]),
    )?;
    c.weirctl_apply(&web_deployment("plain", 6, "v1", ""))?;
    let plain = wait_settled(api, "app=plain", 6, START, |_| true)?;
    ensure!(
        plain.iter().all(|p| node_of(p) != *n3),
        "a pod without the toleration landed on tainted {n3}:\n{}",
        summary(&plain)
    );
    let spec = json!({"nodeSelector": hostname_selector(n3)});
    c.weirctl_apply(&placed_pod("untolerated", &spec).to_string())?;
    let why = wait_unschedulable(api, "untolerated")?;
    ensure!(
        why.contains("untolerated taint") && why.contains("dedicated"),
        "{why}"
    );
    let spec = json!({"nodeSelector": hostname_selector(n3), "tolerations": [dedicated]});
    c.weirctl_apply(&placed_pod("tolerant", &spec).to_string())?;
    let spec = json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [n2]}]}]}}}});
    c.weirctl_apply(&placed_pod("affine", &spec).to_string())?;
    let tolerant = wait_settled(api, "app=tolerant", 1, START, |_| true)?;
    ensure!(node_of(&tolerant[0]) == *n3, "{}", summary(&tolerant));
    let affine = wait_settled(api, "app=affine", 1, START, |_| true)?;
    ensure!(node_of(&affine[0]) == *n2, "{}", summary(&affine));
    let wide = c.weirctl(&["get", "pods", "-o", "wide"])?;
    let line = wide
        .lines()
        .find(|l| l.starts_with("untolerated "))
        .with_context(|| format!("untolerated missing:\n{wide}"))?;
    ensure!(line.contains("Pending"), "{line}");

    // Untainted, the waiting pod is scheduled where its selector says.
    set_taints(c, n3, &json!([]))?;
    let p = wait_settled(api, "app=untolerated", 1, START, |_| true)?;
    ensure!(node_of(&p[0]) == *n3, "{}", summary(&p));
    Ok(())
}

/// Required pod anti-affinity spreads one per node and leaves the
/// replica that fits nowhere pending; a `DaemonSet` runs one pod per node,
/// each answering from another node.
fn anti_affinity_and_daemonset(
    c: &ControlCluster,
    api: &Api,
    names: &[String],
    clients: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<()> {
    let anti = "      affinity:\n        podAntiAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n          - labelSelector: {matchLabels: {app: anti}}\n            topologyKey: kubernetes.io/hostname\n";
    c.weirctl_apply(&web_deployment("anti", 3, "v1", anti))?;
    let pods = wait_settled(api, "app=anti", 3, START, |_| true)?;
    let spread = nodes_of(&pods);
    ensure!(spread.len() == 3, "{spread:?}");
    c.weirctl(&["scale", "deployment", "anti", "--replicas", "4"])?;
    let fourth = wait_for("a 4th anti pod", Duration::from_secs(30), || {
        api.pods("app=anti")
            .ok()?
            .into_iter()
            .find(|p| node_of(p).is_empty())
    })?;
    let why = wait_unschedulable(api, &name(&fourth))?;
    ensure!(why.contains("anti-affinity"), "{why}");

    let ds = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: perhost\nspec:\n  selector:\n    matchLabels: {app: perhost}\n  template:\n    metadata:\n      labels: {app: perhost}\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        image: busybox\n        command: [\"sh\", \"-c\", \"mkdir -p /srv && echo perhost > /srv/index.html && exec httpd -f -p 8080 -h /srv\"]\n";
    c.weirctl_apply(ds)?;
    let pods = wait_settled(api, "app=perhost", 3, START, |p| nodes_of(p).len() == 3)?;
    let on: BTreeSet<String> = pods.iter().map(node_of).collect();
    ensure!(on == names.iter().cloned().collect(), "{on:?}");
    each_answers_across_nodes(clients, &pods, "perhost")?;
    Ok(())
}

#[test]
fn taints_affinity_and_daemonsets_place_pods_where_the_manifests_say() -> anyhow::Result<()> {
    let mut c = ControlCluster::new("wc", 53, 3, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let names = c.node_names();
    api.wait_nodes_ready(&names)?;
    c.weirctl_apply(weir_tests::CLIENT_DS)?;
    let clients = clients(&c, &api)?;
    taints_and_node_affinity(&c, &api, &names)?;
    anti_affinity_and_daemonset(&c, &api, &names, &clients)?;
    Ok(())
}
