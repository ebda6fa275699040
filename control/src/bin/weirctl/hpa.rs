//! HorizontalPodAutoscalers in weirctl: `get hpa` cells (kubectl's
//! REFERENCE and TARGETS columns), `describe hpa`, and `autoscale`.

use serde_json::{Value, json};

use crate::client::Api;
use crate::describe::{header, labels_annotations};
use crate::doc::Doc;
use crate::format::{describe_time, int, or};
use crate::resource::{Resource, one_target};

/// The cells after NAME: REFERENCE TARGETS MINPODS MAXPODS REPLICAS AGE.
pub fn hpa_cells(v: &Value, created: String) -> Vec<String> {
    let spec = &v["spec"];
    let status = &v["status"];
    vec![
        reference(v),
        targets(v),
        spec["minReplicas"].as_i64().unwrap_or(1).to_string(),
        int(&spec["maxReplicas"]).to_string(),
        int(&status["currentReplicas"]).to_string(),
        created,
    ]
}

/// `Deployment/web`.
fn reference(v: &Value) -> String {
    let r = &v["spec"]["scaleTargetRef"];
    format!("{}/{}", or(&r["kind"], ""), or(&r["name"], ""))
}

/// One `name: current/target` per metric, as kubectl prints TARGETS
/// (`cpu: 45%/50%, weir_pod_new_connections_per_second: 12/10`).
pub fn targets(v: &Value) -> String {
    let metrics = v["spec"]["metrics"].as_array().cloned().unwrap_or_default();
    if metrics.is_empty() {
        return "<none>".to_owned();
    }
    let current = v["status"]["currentMetrics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    metrics
        .iter()
        .map(|m| {
            let (name, target, now) = metric_pair(m, &current);
            format!("{name}: {now}/{target}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A metric's name, its target and its current value (`<unknown>` when
/// the status has none).
fn metric_pair(m: &Value, current: &[Value]) -> (String, String, String) {
    let unknown = || "<unknown>".to_owned();
    match m["type"].as_str() {
        Some("Resource") => {
            let name = or(&m["resource"]["name"], "").to_owned();
            let t = &m["resource"]["target"];
            let now = current
                .iter()
                .find(|c| c["type"] == "Resource" && c["resource"]["name"] == name.as_str())
                .map(|c| &c["resource"]["current"]);
            if let Some(u) = t["averageUtilization"].as_i64() {
                let now = now
                    .and_then(|c| c["averageUtilization"].as_i64())
                    .map_or_else(unknown, |n| format!("{n}%"));
                (name, format!("{u}%"), now)
            } else {
                let now = now
                    .and_then(|c| c["averageValue"].as_str())
                    .map_or_else(unknown, str::to_owned);
                (name, or(&t["averageValue"], "").to_owned(), now)
            }
        }
        Some("Pods") => {
            let name = or(&m["pods"]["metric"]["name"], "").to_owned();
            let now = current
                .iter()
                .find(|c| c["type"] == "Pods" && c["pods"]["metric"]["name"] == name.as_str())
                .and_then(|c| c["pods"]["current"]["averageValue"].as_str())
                .map_or_else(unknown, str::to_owned);
            let target = or(&m["pods"]["target"]["averageValue"], "").to_owned();
            (name, target, now)
        }
        other => (
            other.unwrap_or("<unknown>").to_owned(),
            unknown(),
            unknown(),
        ),
    }
}

/// `describe hpa`'s sections (the events follow from the caller).
pub fn describe_hpa(d: &mut Doc, v: &Value) {
    header(d, v, true);
    labels_annotations(d, 0, &v["metadata"]);
    d.kv(
        0,
        "CreationTimestamp",
        &describe_time(&v["metadata"]["creationTimestamp"]),
    );
    d.kv(0, "Reference", &reference(v));
    d.kv(0, "Metrics", "( current / target )");
    let current = v["status"]["currentMetrics"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for m in v["spec"]["metrics"].as_array().into_iter().flatten() {
        let (name, target, now) = metric_pair(m, &current);
        let label = if m["type"] == "Resource" {
            if m["resource"]["target"]["averageUtilization"].is_null() {
                format!("resource {name} on pods")
            } else {
                format!("resource {name} on pods  (as a percentage of request)")
            }
        } else {
            format!("{name:?} on pods")
        };
        d.kv(1, &label, &format!("{now} / {target}"));
    }
    let spec = &v["spec"];
    d.kv(
        0,
        "Min replicas",
        &spec["minReplicas"].as_i64().unwrap_or(1).to_string(),
    );
    d.kv(0, "Max replicas", &int(&spec["maxReplicas"]).to_string());
    behavior(d, &spec["behavior"]);
    let status = &v["status"];
    d.kv(
        0,
        &format!("{} pods", or(&spec["scaleTargetRef"]["kind"], "Target")),
        &format!(
            "{} current / {} desired",
            int(&status["currentReplicas"]),
            int(&status["desiredReplicas"])
        ),
    );
    match status["conditions"].as_array().filter(|c| !c.is_empty()) {
        Some(conds) => {
            d.line(0, &["Conditions:"]);
            d.line(1, &["Type", "Status", "Reason", "Message"]);
            d.line(1, &["----", "------", "------", "-------"]);
            for c in conds {
                d.line(
                    1,
                    &[
                        or(&c["type"], ""),
                        or(&c["status"], ""),
                        or(&c["reason"], ""),
                        or(&c["message"], ""),
                    ],
                );
            }
        }
        None => d.kv(0, "Conditions", "<none>"),
    }
}

/// kubectl's Behavior section, when the spec has one.
fn behavior(d: &mut Doc, b: &Value) {
    if b.is_null() {
        return;
    }
    d.kv(0, "Behavior", "");
    for (key, title) in [("scaleUp", "Scale Up"), ("scaleDown", "Scale Down")] {
        let r = &b[key];
        if r.is_null() {
            continue;
        }
        d.kv(1, title, "");
        d.kv(
            2,
            "Stabilization Window",
            &format!("{} seconds", int(&r["stabilizationWindowSeconds"])),
        );
        d.kv(2, "Select Policy", or(&r["selectPolicy"], "Max"));
        d.kv(2, "Policies", "");
        for p in r["policies"].as_array().into_iter().flatten() {
            d.line(
                3,
                &[&format!(
                    "- Type: {}  Value: {}  Period: {} seconds",
                    or(&p["type"], ""),
                    int(&p["value"]),
                    int(&p["periodSeconds"])
                )],
            );
        }
    }
}

/// The manifest `autoscale` applies: an HPA named after the target, on
/// cpu utilization (default 80%).
pub fn autoscale_manifest(
    r: Resource,
    ns: &str,
    name: &str,
    min: Option<i32>,
    max: i32,
    cpu_percent: Option<i32>,
) -> Value {
    let mut spec = json!({
        "scaleTargetRef": {"apiVersion": r.api_version(), "kind": r.kind(), "name": name},
        "maxReplicas": max,
    });
    if let Some(min) = min {
        spec["minReplicas"] = json!(min);
    }
    if let Some(cpu) = cpu_percent {
        spec["metrics"] = json!([{
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": cpu}},
        }]);
    }
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

/// `weirctl autoscale`'s arguments.
#[derive(clap::Args, Debug)]
pub struct AutoscaleArgs {
    /// deployment/NAME, replicaset/NAME, or TYPE NAME.
    #[arg(required = true)]
    target: Vec<String>,
    /// The fewest replicas (default 1).
    #[arg(long)]
    min: Option<i32>,
    /// The most replicas.
    #[arg(long)]
    max: i32,
    /// The target average cpu utilization, in percent of the requests.
    #[arg(long)]
    cpu_percent: Option<i32>,
}

/// `weirctl autoscale deployment NAME --max N [--min M] [--cpu-percent P]`.
pub async fn autoscale(api: &Api, ns: &str, a: &AutoscaleArgs) -> anyhow::Result<()> {
    let (r, name) = one_target(&a.target, "autoscale")?;
    let name = name.as_str();
    if !matches!(r, Resource::Deployment | Resource::ReplicaSet) {
        anyhow::bail!("cannot autoscale a {}: not scalable", r.kind());
    }
    // kubectl checks the target exists first.
    api.get(r, ns, name).await?;
    let manifest = autoscale_manifest(r, ns, name, a.min, a.max, a.cpu_percent);
    let (_, created, warnings) = api.apply(&manifest).await?;
    for w in warnings {
        eprintln!("Warning: {w}");
    }
    let verb = if created { "autoscaled" } else { "configured" };
    println!("horizontalpodautoscaler.autoscaling/{name} {verb}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": "web"},
                "minReplicas": 2, "maxReplicas": 10,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}},
                    {"type": "Pods", "pods": {"metric": {"name": "weir_pod_new_connections_per_second"}, "target": {"type": "AverageValue", "averageValue": "10"}}},
                ],
            },
            "status": {
                "currentReplicas": 3, "desiredReplicas": 4,
                "currentMetrics": [
                    {"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 45, "averageValue": "225m"}}},
                ],
                "conditions": [{"type": "AbleToScale", "status": "True", "reason": "SucceededRescale", "message": "the HPA controller was able to update the target scale to 4"}],
            },
        })
    }

    #[test]
    fn get_cells_show_targets_like_kubectl() {
        let cells = hpa_cells(&hpa(), "5m".into());
        assert_eq!(
            cells,
            [
                "Deployment/web",
                "cpu: 45%/50%, weir_pod_new_connections_per_second: <unknown>/10",
                "2",
                "10",
                "3",
                "5m"
            ]
        );
    }

    #[test]
    fn describe_lists_metrics_and_conditions() {
        let mut d = Doc::default();
        describe_hpa(&mut d, &hpa());
        let text = d.render();
        assert!(text.contains("Reference:"), "{text}");
        assert!(
            text.contains("resource cpu on pods  (as a percentage of request):  45% / 50%"),
            "{text}"
        );
        assert!(text.contains("Deployment pods:"), "{text}");
        assert!(text.contains("3 current / 4 desired"), "{text}");
        assert!(
            text.contains("AbleToScale  True    SucceededRescale  the HPA controller"),
            "{text}"
        );
    }

    #[test]
    fn autoscale_builds_a_cpu_hpa() {
        let m = autoscale_manifest(Resource::Deployment, "shop", "web", Some(2), 5, Some(60));
        assert_eq!(m["spec"]["scaleTargetRef"]["apiVersion"], "apps/v1");
        assert_eq!(
            m["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
            60
        );
        assert_eq!(m["spec"]["minReplicas"], 2);
    }
}
