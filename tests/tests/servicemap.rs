//! The cluster service map end to end: weir-control and two weir-agents;
//! a `server` Deployment (2 busybox httpd replicas serving 4 KiB) behind
//! Service `web`, [`N`] successful requests to the Service's VIP from the
//! `client` Deployment's pod (made by the test in its netns), and
//! connections from the `intruder` Deployment's pod that a `NetworkPolicy`
//! denies at the servers. The real `weirctl map` must show
//! client → service web (backend server) with ≥ N connections and the
//! bytes of the answers (the client is selected by an allow-all egress
//! policy, so its node tracks its connections), the intruder's drops
//! towards the servers, and the same as a Graphviz digraph. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use weir_tests::api::{Api, uid};
use weir_tests::{ControlCluster, http_get_in, tcp_connect_in, wait_for};

const TAG: &str = "sm";
const SUBNET: u8 = 37;
const NS: &str = "smap";
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
/// Successful requests the client makes.
const N: u64 = 20;
/// The size of the servers' answer body.
const BODY: u64 = 4096;
/// How long the pods may take to start and the requests to show in the map
/// (agents report every 5 s).
const SHOWN: Duration = Duration::from_mins(2);

fn deployment(name: &str, replicas: u32, script: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "c", "image": "busybox",
                        "command": ["sh", "-c", script]}],
                },
            },
        },
    })
}

fn policy(name: &str, spec: &Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

/// The edge from workload `source` in [`NS`] to the end `(kind, name)`.
fn edge<'a>(edges: &'a [Value], source: &str, kind: &str, name: &str) -> Option<&'a Value> {
    edges.iter().find(|e| {
        e["source"]["kind"] == "workload"
            && e["source"]["namespace"] == NS
            && e["source"]["name"] == source
            && e["destination"]["kind"] == kind
            && e["destination"]["name"] == name
    })
}

fn map_json(c: &ControlCluster, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut all = vec!["map", "-o", "json"];
    all.extend_from_slice(args);
    let out = c.weirctl(&all)?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("map -o json:\n{out}"))?;
    v["edges"].as_array().cloned().context("no edges array")
}

/// The netns of the Running pod of Deployment `app`.
fn pod_netns(c: &ControlCluster, app: &str) -> anyhow::Result<PathBuf> {
    let api = Api::connect(&c.control.url())?;
    let selector = format!("app={app}");
    let pod = wait_for(&format!("a Running {app} pod"), SHOWN, || {
        api.list("Pod", NS, &selector)
            .ok()?
            .into_iter()
            .find(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
    })?;
    let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    Ok(c.node_named(node)
        .with_context(|| format!("{app} on unknown node {node}"))?
        .pod_netns(&uid(&pod)))
}

fn setup(c: &ControlCluster) -> anyhow::Result<String> {
    let api = Api::connect(&c.control.url())?;
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))?;
    // Policies first, so every pod starts under them.
    api.apply(&policy(
        "server-from-client",
        &json!({"podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                         "ports": [{"port": 8080}]}]}),
    ))?;
    api.apply(&policy(
        "client-egress",
        &json!({"podSelector": {"matchLabels": {"app": "client"}},
            "policyTypes": ["Egress"], "egress": [{}]}),
    ))?;
    api.apply(&json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "server"},
                 "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))?;
    let vip = wait_for("service web's clusterIP", Duration::from_secs(10), || {
        api.get("Service", NS, "web")?["spec"]["clusterIP"]
            .as_str()
            .map(str::to_owned)
    })?;
    api.apply(&deployment(
        "server",
        2,
        &format!(
            "mkdir -p /srv && head -c {BODY} /dev/zero | tr '\\0' x > /srv/index.html && exec httpd -f -p 8080 -h /srv"
        ),
    ))?;
    // The requests are made by the test from these pods' netns (the
    // image's static busybox wget crashes here).
    for name in ["client", "intruder"] {
        api.apply(&deployment(name, 1, "exec sleep 3600"))?;
    }
    Ok(vip)
}

#[test]
fn the_service_map_shows_connections_bytes_and_drops() -> anyhow::Result<()> {
    let mut c = ControlCluster::new(TAG, SUBNET, 2, CONTROL_ARGS)?;
    c.start_agents()?;
    let vip: Ipv4Addr = setup(&c)?.parse()?;
    let addr = SocketAddr::from((vip, 80));
    let client = pod_netns(&c, "client")?;
    let intruder = pod_netns(&c, "intruder")?;
    // N successful requests (retried until the servers answer).
    let mut ok = 0;
    wait_for("N answers from web", SHOWN, || {
        if matches!(
            http_get_in(&client, addr, "/", Duration::from_secs(2)),
            Ok((200, _))
        ) {
            ok += 1;
        }
        (ok >= N).then_some(())
    })?;
    for _ in 0..3 {
        let (r, _) = tcp_connect_in(&intruder, addr, Duration::from_secs(1))?;
        ensure!(r.is_err(), "the intruder must be refused");
    }

    let mut last = Vec::new();
    let mut last_err = String::new();
    let shown = wait_for("client → web and the intruder's drops", SHOWN, || {
        last = match map_json(&c, &["-n", NS]) {
            Ok(l) => l,
            Err(e) => {
                last_err = format!("{e:#}");
                return None;
            }
        };
        let to_web = edge(&last, "client", "service", "web")?;
        let done = to_web["connections"].as_u64()? >= N && to_web["bytes"].as_u64()? >= N * BODY;
        let dropped = last
            .iter()
            .any(|e| e["source"]["name"] == "intruder" && e["drops"].as_u64().unwrap_or(0) > 0);
        (done && dropped).then(|| last.clone())
    });
    let edges = shown.with_context(|| {
        format!(
            "last map:\n{}\nlast error: {last_err}\nflows:\n{:?}\ncontrol log:\n{}\nagent logs:\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            c.weirctl_output(&["flows", "-n", NS, "--last", "6"], None),
            weir_tests::tail(&c.control.log_text(), 20),
            c.cluster
                .nodes
                .iter()
                .map(|n| {
                    let log = n.agent_log_text();
                    let interesting: Vec<&str> = log
                        .lines()
                        .filter(|l| {
                            l.contains("WARN") || l.contains("ERROR") || l.contains("service map")
                        })
                        .collect();
                    weir_tests::tail(&interesting.join("\n"), 20)
                })
                .collect::<Vec<_>>()
                .join("\n---\n")
        )
    })?;

    check_edges(&edges)?;

    // The filter: another namespace has none of these; -A has them.
    ensure!(
        map_json(&c, &["-n", "default"])?
            .iter()
            .all(|e| { e["source"]["namespace"] != NS && e["destination"]["namespace"] != NS })
    );
    ensure!(edge(&map_json(&c, &["-A"])?, "client", "service", "web").is_some());

    let table = c.weirctl(&["map", "-n", NS])?;
    let header = table.lines().next().unwrap_or_default();
    ensure!(
        header.split_whitespace().collect::<Vec<_>>()
            == [
                "SOURCE",
                "DESTINATION",
                "PORT",
                "CONNECTIONS",
                "BYTES",
                "DROPS"
            ],
        "{table}"
    );
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("{NS}/client "))
                && l.contains(&format!("service:{NS}/web"))),
        "{table}"
    );

    let dot = c.weirctl(&["map", "-n", NS, "-o", "dot"])?;
    check_dot(&dot)?;
    ensure!(
        dot.contains(&format!("\"{NS}/client\" -> \"service:{NS}/web\"")),
        "{dot}"
    );
    ensure!(
        dot.lines()
            .any(|l| l.contains(&format!("\"{NS}/intruder\" -> ")) && l.contains("color=red")),
        "drops in red:\n{dot}"
    );
    Ok(())
}

/// The edges the traffic must have made.
fn check_edges(edges: &[Value]) -> anyhow::Result<()> {
    let to_web = edge(edges, "client", "service", "web").context("client → web")?;
    ensure!(
        to_web["port"] == 80 && to_web["protocol"] == "TCP",
        "the service port: {to_web}"
    );
    ensure!(
        to_web["destination"]["namespace"] == NS,
        "the VIP named as its Service: {to_web}"
    );
    ensure!(
        to_web["backend"]["kind"] == "workload" && to_web["backend"]["name"] == "server",
        "served by the server Deployment: {to_web}"
    );
    ensure!(to_web["drops"] == 0, "the client is allowed: {to_web}");
    // The intruder's denials happen at the servers' ingress, where the
    // service is not known: they name the server workload.
    let denied = edges
        .iter()
        .find(|e| e["source"]["name"] == "intruder" && e["drops"].as_u64().unwrap_or(0) > 0)
        .context("intruder drops")?;
    ensure!(
        denied["source"]["kind"] == "workload"
            && denied["destination"]["name"] == "server"
            && denied["destination"]["kind"] == "workload"
            && denied["port"] == 8080,
        "denied at the server pods' port: {denied}"
    );
    ensure!(
        !edges.iter().any(|e| e["source"]["kind"] == "pod"),
        "every pod named by its workload: {edges:?}"
    );

    Ok(())
}

/// A digraph: the header, balanced braces and quotes, every statement a
/// node or an edge between declared nodes.
fn check_dot(dot: &str) -> anyhow::Result<()> {
    let lines: Vec<&str> = dot.lines().map(str::trim).collect();
    ensure!(lines.first() == Some(&"digraph servicemap {"), "{dot}");
    ensure!(lines.last() == Some(&"}"), "{dot}");
    ensure!(
        dot.matches('{').count() == dot.matches('}').count(),
        "{dot}"
    );
    let mut declared = Vec::new();
    for l in &lines[1..lines.len() - 1] {
        ensure!(l.ends_with(';'), "statement without ';': {l}");
        ensure!(
            l.replace("\\\"", "").matches('"').count() % 2 == 0,
            "unbalanced quotes: {l}"
        );
        if let Some((from, rest)) = l.split_once(" -> ") {
            let to = rest.split(" [").next().unwrap_or_default();
            ensure!(
                declared.contains(&from) && declared.contains(&to),
                "edge between undeclared nodes: {l}"
            );
        } else if l.starts_with('"') {
            declared.push(l.split(" [").next().unwrap_or_default());
        }
    }
    Ok(())
}
