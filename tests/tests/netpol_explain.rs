//! `weirctl policy explain` and denial attribution end to end: weir-control
//! and two weir-agents, a server x/a (node 0), a client y/b (node 1) and
//! a client x/c (node 0); in x a deny-all plus an allow-from-namespace-y.
//! Explain must say y/b → x/a:80 is allowed by x/allow-from-y (exit 0,
//! with the identity and key that matched, across nodes) and x/c → x/a:80
//! and an outside address → x/a are denied by the default deny of both
//! isolating policies (exit 1); a real denied connection must show in
//! `weirctl flows --verdict denied -o json` naming them, and be counted
//! per isolating policy in `weir_policy_verdicts_total`. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use weir_tests::api::{Api, uid};
use weir_tests::{ControlCluster, tcp_connect_in, wait_for};

const TAG: &str = "pe";
const SUBNET: u8 = 47;
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
const START: Duration = Duration::from_secs(90);
/// How long a policy may take to reach the nodes' maps.
const CONVERGE: Duration = Duration::from_secs(15);

struct Pod {
    netns: PathBuf,
    ip: Ipv4Addr,
    identity: u64,
}

fn pod_json(ns: &str, name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c", "image": "busybox",
                "command": ["sh", "-c",
                    "mkdir -p /srv && echo ok > /srv/index.html && exec httpd -f -p 80 -h /srv"],
            }],
        },
    })
}

fn running(c: &ControlCluster, api: &Api, ns: &str, name: &str) -> anyhow::Result<Pod> {
    let v = wait_for(&format!("pod {ns}/{name} Running"), START, || {
        api.get("Pod", ns, name)
            .filter(|v| v["status"]["phase"] == "Running" && v["status"]["podIP"].is_string())
    })?;
    let node = v["spec"]["nodeName"].as_str().unwrap_or_default();
    Ok(Pod {
        netns: c
            .node_named(node)
            .with_context(|| format!("{ns}/{name} on unknown node {node}"))?
            .pod_netns(&uid(&v)),
        ip: v["status"]["podIP"].as_str().unwrap_or_default().parse()?,
        identity: v["metadata"]["annotations"]["weir.io/identity"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("pod without a weir.io/identity")?,
    })
}

/// `weirctl policy explain args...`: (exit ok, stdout, stderr).
fn explain(c: &ControlCluster, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let mut all = vec!["policy", "explain"];
    all.extend_from_slice(args);
    c.weirctl_output(&all, None)
}

/// Explains until its text contains `want` (the policy reached the maps).
fn explain_until(c: &ControlCluster, args: &[&str], want: &str) -> anyhow::Result<(bool, String)> {
    let mut last = String::new();
    let r = wait_for(
        &format!("policy explain {args:?} saying {want:?}"),
        CONVERGE,
        || {
            let (ok, out, err) = explain(c, args).ok()?;
            last = format!("{out}{err}");
            out.contains(want).then_some((ok, out))
        },
    );
    r.with_context(|| format!("last answer:\n{last}"))
}

struct Env {
    c: ControlCluster,
    nodes: Vec<String>,
    /// x/a, the server (node 0).
    server: Pod,
    /// y/b, allowed (node 1).
    from_y: Pod,
    /// x/c, denied (node 0).
    from_x: Pod,
}

fn setup() -> anyhow::Result<Env> {
    let mut c = ControlCluster::new(TAG, SUBNET, 2, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let nodes = c.node_names();
    for ns in ["x", "y"] {
        api.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"ns": ns}}}))?;
    }
    api.apply(&pod_json("x", "a", &nodes[0]))?;
    api.apply(&pod_json("y", "b", &nodes[1]))?;
    api.apply(&pod_json("x", "c", &nodes[0]))?;
    let server = running(&c, &api, "x", "a")?;
    let from_y = running(&c, &api, "y", "b")?;
    let from_x = running(&c, &api, "x", "c")?;

    // Before any policy: allowed, nothing isolates x/a.
    let (ok, out) = explain_until(&c, &["x/c", "x/a", "80"], "Final verdict")?;
    ensure!(ok, "no policy yet: allowed (exit 0):\n{out}");
    ensure!(out.contains("not isolated for ingress"), "{out}");

    for (name, spec) in [
        (
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
        (
            "allow-from-y",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
    ] {
        api.apply(
            &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x"}, "spec": spec}),
        )?;
    }
    Ok(Env {
        c,
        nodes,
        server,
        from_y,
        from_x,
    })
}

/// Allowed across nodes, by the allowing policy, with the key; text and JSON.
fn allowed(env: &Env) -> anyhow::Result<()> {
    let (c, y) = (&env.c, &env.from_y);
    let (ok, out) = explain_until(c, &["y/b", "x/a", "80"], "by x/allow-from-y")?;
    println!("{out}");
    ensure!(ok, "allowed must exit 0:\n{out}");
    ensure!(out.contains("Final verdict: ALLOWED"), "{out}");
    ensure!(
        out.contains("key {ep ") && out.contains(&format!("identity {}, port any", y.identity)),
        "the matched key names y/b's identity {}:\n{out}",
        y.identity
    );
    ensure!(
        out.contains("x/deny-all") && out.contains("isolated for ingress by"),
        "{out}"
    );
    ensure!(
        out.contains(&format!("peer y/b {}: identity {}", y.ip, y.identity))
            && out.contains(&format!(
                "peer x/a {}: identity {}",
                env.server.ip, env.server.identity
            )),
        "both peers' identities, from the maps:\n{out}"
    );
    let (ok, json_out, err) = explain(c, &["y/b", "x/a", "80", "-o", "json"])?;
    ensure!(ok, "{json_out}{err}");
    let v: Value = serde_json::from_str(&json_out).context("explain -o json")?;
    ensure!(v["verdict"] == "ALLOWED", "{v}");
    let steps = v["steps"].as_array().context("steps")?;
    ensure!(
        steps.len() == 2,
        "egress at y/b's node and ingress at x/a's: {v}"
    );
    ensure!(
        steps[0]["direction"] == "egress" && steps[0]["node"] == env.nodes[1].as_str(),
        "{v}"
    );
    let ingress = &steps[1];
    ensure!(
        ingress["direction"] == "ingress"
            && ingress["node"] == env.nodes[0].as_str()
            && ingress["policy"] == "x/allow-from-y"
            && ingress["matchedKey"]["identity"] == y.identity
            && ingress["endpoint"]["identity"] == env.server.identity,
        "{v}"
    );
    Ok(())
}

/// Denied: same namespace, and an outside address (world).
fn denied(env: &Env) -> anyhow::Result<()> {
    let (ok, out) = explain_until(&env.c, &["x/c", "x/a", "80"], "Final verdict: DENIED")?;
    println!("{out}");
    ensure!(!ok, "denied must exit 1:\n{out}");
    ensure!(
        out.contains("no key matched: DENIED by default-deny of")
            && out.contains("x/deny-all")
            && out.contains("x/allow-from-y"),
        "{out}"
    );
    let (ok, out, _) = explain(&env.c, &["192.0.2.1", "x/a", "80", "--protocol", "UDP"])?;
    ensure!(
        !ok && out.contains("identity 2 (world)") && out.contains("Final verdict: DENIED"),
        "{out}"
    );
    Ok(())
}

/// A real denied connection names the isolating policies in the flows.
fn denied_flow(env: &Env) -> anyhow::Result<()> {
    let target = SocketAddr::from((env.server.ip, 80));
    let (r, _) = tcp_connect_in(&env.from_x.netns, target, Duration::from_secs(1))?;
    ensure!(r.is_err(), "x/c -> x/a:80 must be dropped");
    let (r, _) = tcp_connect_in(&env.from_y.netns, target, Duration::from_secs(3))?;
    ensure!(r.is_ok(), "y/b -> x/a:80 must connect: {r:?}");
    let flow = wait_for("a denied flow naming the policies", CONVERGE, || {
        let out = env
            .c
            .weirctl(&[
                "flows",
                "--verdict",
                "denied",
                "-o",
                "json",
                "--last",
                "200",
            ])
            .ok()?;
        out.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|f| f["destination"]["pod"] == "a" && f["source"]["pod"] == "c")
    })?;
    println!("denied flow: {flow}");
    let policies: Vec<&str> = flow["policies"]
        .as_array()
        .context("policies")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        policies.contains(&"x/deny-all") && policies.contains(&"x/allow-from-y"),
        "{flow}"
    );
    ensure!(
        flow["policy"].is_null(),
        "policy names only an allowing one: {flow}"
    );
    let node = env.c.node_named(&env.nodes[0]).context("node 0")?;
    let metrics = node.metrics()?;
    let counted = |policy: &str| {
        metrics.lines().any(|l| {
            l.starts_with("weir_policy_verdicts_total{")
                && l.contains(&format!("policy=\"{policy}\""))
                && l.contains("verdict=\"denied\"")
        })
    };
    ensure!(
        counted("x/deny-all") && counted("x/allow-from-y") && !counted("default-deny"),
        "denials counted per isolating policy:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("weir_policy_verdicts"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let text = env
        .c
        .weirctl(&["flows", "--verdict", "denied", "--pod", "x/c"])?;
    println!("{text}");
    ensure!(text.contains("by default-deny of"), "{text}");
    Ok(())
}

#[test]
fn policy_explain_and_denials_name_the_policies() -> anyhow::Result<()> {
    let env = setup()?;
    allowed(&env)?;
    denied(&env)?;
    denied_flow(&env)
}
