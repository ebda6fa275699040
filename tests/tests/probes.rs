//! Probe events end to end: a weir-agent in control mode runs pods whose
//! probes fail and records kubelet's `Unhealthy` (each failure, folded into
//! one Event whose count grows) and `Killing` (a liveness restart) Events,
//! which the control stores and `weirctl describe pod` lists. Real
//! weir-control, containerd, runc and busybox httpd. Needs root.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use weir_tests::api::{Api, condition_status, uid};
use weir_tests::{ControlCluster, wait_for};

/// Short heartbeats, so the node is Ready soon.
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
/// How long a pod may take to be scheduled and started.
const START: Duration = Duration::from_secs(90);
/// How long an event may take to show (a probe period, a write).
const RECORDED: Duration = Duration::from_secs(20);

/// busybox httpd without `/ready`: every readiness attempt gets a 404.
const UNREADY: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: unready
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: busybox
    command: ["sh", "-c", "mkdir -p /srv && exec httpd -f -p 8080 -h /srv"]
    readinessProbe:
      httpGet: {path: /ready, port: 8080}
      periodSeconds: 1
      failureThreshold: 1
"#;

/// A liveness probe on a port nothing listens on: refused, then killed.
const UNLIVE: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: unlive
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: busybox
    command: ["sleep", "3600"]
    livenessProbe:
      tcpSocket: {port: 9999}
      periodSeconds: 1
      failureThreshold: 2
"#;

/// The events about `pod` (by uid).
fn events_of(api: &Api, pod: &Value) -> Vec<Value> {
    let uid = uid(pod);
    api.list("Event", "default", "")
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["involvedObject"]["uid"] == uid.as_str())
        .collect()
}

/// The events about `pod` with `reason` and `message`.
fn matching(api: &Api, pod: &Value, reason: &str, message: &str) -> Vec<Value> {
    events_of(api, pod)
        .into_iter()
        .filter(|e| e["reason"] == reason && e["message"] == message)
        .collect()
}

fn summary(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} x{}: {}",
                e["type"], e["reason"], e["count"], e["message"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn failing_probes_record_unhealthy_and_killing_events() -> anyhow::Result<()> {
    let mut c = ControlCluster::new("pb", 33, 1, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let node = c.node_names().remove(0);
    wait_for(
        &format!("node {node} Ready"),
        Duration::from_secs(30),
        || {
            api.get("Node", "", &node)
                .filter(|o| condition_status(o, "Ready") == "True")
        },
    )?;
    c.weirctl_apply(UNREADY)?;
    c.weirctl_apply(UNLIVE)?;
    let unready = api.wait_pod("unready", "running", START, |p| {
        p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string()
    })?;

    // Readiness: Unhealthy with kubelet's message, from kubelet on the node.
    let want = "Readiness probe failed: HTTP probe failed with statuscode: 404";
    let first = wait_for("a readiness Unhealthy event", RECORDED, || {
        matching(&api, &unready, "Unhealthy", want).pop()
    })
    .with_context(|| format!("events: {}", summary(&events_of(&api, &unready))))?;
    ensure!(first["type"] == "Warning", "{first}");
    ensure!(
        first["source"]["component"] == "kubelet" && first["source"]["host"] == node.as_str(),
        "{first}"
    );
    // It keeps failing every second: one Event object whose count grows,
    // not an object per failure.
    let bumped = wait_for("the Unhealthy count to grow", RECORDED, || {
        let all = matching(&api, &unready, "Unhealthy", want);
        all.iter()
            .any(|e| e["count"].as_u64().unwrap_or(0) >= 3)
            .then_some(all)
    })
    .with_context(|| format!("events: {}", summary(&events_of(&api, &unready))))?;
    ensure!(
        bumped.len() == 1,
        "repeats made {} objects:\n{}",
        bumped.len(),
        summary(&bumped)
    );
    ensure!(
        bumped[0]["metadata"]["name"] == first["metadata"]["name"]
            && bumped[0]["firstTimestamp"] == first["firstTimestamp"],
        "the count went to another object: {} vs {first}",
        bumped[0]
    );
    let described = c.weirctl(&["describe", "pod", "unready"])?;
    ensure!(
        described
            .lines()
            .any(|l| l.contains("Warning") && l.contains("Unhealthy") && l.contains(want)),
        "describe pod unready:\n{described}"
    );
    ensure!(
        condition_status(
            &api.get("Pod", "default", "unready").context("unready")?,
            "Ready"
        ) == "False"
    );

    // Liveness: refused, then the container is killed and restarted.
    let unlive = api.wait_pod("unlive", "restarted", START, |p| {
        p["status"]["containerStatuses"][0]["restartCount"]
            .as_u64()
            .is_some_and(|n| n >= 1)
    })?;
    let ip = unlive["status"]["podIP"].as_str().context("unlive podIP")?;
    let refused = format!("Liveness probe failed: dial tcp {ip}:9999: connect: connection refused");
    let killing = "Container web failed liveness probe, will be restarted";
    wait_for("liveness Unhealthy and Killing events", RECORDED, || {
        (!matching(&api, &unlive, "Unhealthy", &refused).is_empty()
            && matching(&api, &unlive, "Killing", killing)
                .iter()
                .all(|e| e["type"] == "Normal")
            && !matching(&api, &unlive, "Killing", killing).is_empty())
        .then_some(())
    })
    .with_context(|| format!("events: {}", summary(&events_of(&api, &unlive))))?;
    Ok(())
}
