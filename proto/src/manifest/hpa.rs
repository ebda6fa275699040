//! `autoscaling/v2` `HorizontalPodAutoscaler`: its field table, the
//! apiserver's checks (`ValidateHorizontalPodAutoscaler`) and defaults
//! (`SetDefaults_HorizontalPodAutoscaler`), and the default scaling rules
//! the controller also uses when `spec.behavior` is absent.
//!
//! weir scales Deployments and `ReplicaSets` on `Resource` metrics (cpu and
//! memory, as a utilization of the pods' requests or an average value) and
//! `Pods` metrics (the agents' per-pod readings by name, e.g.
//! `weir_pod_new_connections_per_second`); `Object`, `External` and
//! `ContainerResource` metrics need a metrics adapter weir does not have
//! and are refused.

use std::sync::LazyLock;

use k8s_openapi::api::autoscaling::v2::{
    HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior,
    MetricSpec, MetricTarget, ResourceMetricSource,
};
use serde_json::Value;

use super::check::{Checker, Scope, one_of};
use super::fields::{OBJECT_META, dropped, refused, required, used};
use super::quantity::parse_cpu_millis;
use super::table::{FieldRule, Part, Shape, Table};
use super::{ManifestError, names};

/// The kinds an HPA can scale.
pub const SCALABLE_KINDS: [&str; 2] = ["Deployment", "ReplicaSet"];
/// Kubernetes' default utilization target when `spec.metrics` is empty.
pub const DEFAULT_CPU_UTILIZATION: i32 = 80;
/// Longest `stabilizationWindowSeconds` Kubernetes accepts (one hour).
pub const MAX_STABILIZATION_SECONDS: i32 = 3600;
/// Longest policy `periodSeconds` Kubernetes accepts (30 minutes).
pub const MAX_PERIOD_SECONDS: i32 = 1800;

const NOT_SUPPORTED: &str = "not supported by weir: it has no metrics adapter for object, external or per-container metrics; use Resource or Pods metrics";
const METRIC_TYPES: [&str; 2] = ["Resource", "Pods"];
const RESOURCES: [&str; 2] = ["cpu", "memory"];
const POLICY_TYPES: [&str; 2] = ["Pods", "Percent"];
const SELECT_POLICIES: [&str; 3] = ["Max", "Min", "Disabled"];

#[rustfmt::skip]
static HPA_ROWS: &[FieldRule] = &[
    required("apiVersion", Shape::String, "must be `autoscaling/v2`"),
    required("kind", Shape::String, "must be `HorizontalPodAutoscaler`"),
    dropped("status", "status is reported by weir's autoscaler, not read from manifests"),
    required("spec", Shape::Object, ""),
    required("spec.scaleTargetRef", Shape::Object, "the workload to scale, in the HPA's namespace"),
    used("spec.scaleTargetRef.apiVersion", Shape::String, "`apps/v1` (default)"),
    required("spec.scaleTargetRef.kind", Shape::String, "`Deployment` or `ReplicaSet`"),
    required("spec.scaleTargetRef.name", Shape::String, "a DNS-1123 subdomain"),
    used("spec.minReplicas", Shape::I32, "at least 1; default 1"),
    required("spec.maxReplicas", Shape::I32, "at least 1 and at least minReplicas"),
    used("spec.metrics", Shape::ObjectList, "default: cpu at 80% utilization; the desired count is the highest any metric asks for"),
    required("spec.metrics[].type", Shape::String, "`Resource` or `Pods` (`Object`, `External`, `ContainerResource`: not supported by weir)"),
    used("spec.metrics[].resource", Shape::Object, "with type `Resource`"),
    required("spec.metrics[].resource.name", Shape::String, "`cpu` or `memory`"),
    required("spec.metrics[].resource.target", Shape::Object, "type `Utilization` (percent of the pods' requests) or `AverageValue` (a quantity per pod)"),
    used("spec.metrics[].pods", Shape::Object, "with type `Pods`"),
    required("spec.metrics[].pods.metric", Shape::Object, ""),
    required("spec.metrics[].pods.metric.name", Shape::String, "a per-pod reading the agents report, e.g. `weir_pod_new_connections_per_second`"),
    refused("spec.metrics[].pods.metric.selector", "weir's per-pod readings carry no labels to select on"),
    required("spec.metrics[].pods.target", Shape::Object, "type `AverageValue`"),
    refused("spec.metrics[].object", NOT_SUPPORTED),
    refused("spec.metrics[].external", NOT_SUPPORTED),
    refused("spec.metrics[].containerResource", NOT_SUPPORTED),
    used("spec.behavior", Shape::Object, "scaling rules; defaults as Kubernetes' (up: no stabilization, max(100%, 4 pods) per 15 s; down: 300 s stabilization, 100% per 15 s)"),
    used("spec.behavior.scaleUp", Shape::Object, ""),
    used("spec.behavior.scaleDown", Shape::Object, ""),
];

/// `spec.metrics[].*.target`.
#[rustfmt::skip]
static TARGET_ROWS: &[FieldRule] = &[
    required("type", Shape::String, "`Utilization`, `AverageValue` or `Value`"),
    used("averageUtilization", Shape::I32, "percent of the pods' requests, above 0"),
    used("averageValue", Shape::IntOrString, "a quantity above 0 (`500m`, `10`, `64Mi`)"),
    used("value", Shape::IntOrString, "refused for Resource and Pods metrics (as Kubernetes)"),
];

/// `spec.behavior.scaleUp` / `scaleDown`.
#[rustfmt::skip]
static RULES_ROWS: &[FieldRule] = &[
    used("stabilizationWindowSeconds", Shape::I32, "0-3600; default 0 (up) or 300 (down)"),
    used("selectPolicy", Shape::String, "`Max` (default), `Min` or `Disabled`"),
    used("policies", Shape::ObjectList, "default: up 100% and 4 pods per 15 s, down 100% per 15 s"),
    required("policies[].type", Shape::String, "`Pods` or `Percent`"),
    required("policies[].value", Shape::I32, "above 0"),
    required("policies[].periodSeconds", Shape::I32, "1-1800"),
    refused("tolerance", "an alpha field; weir uses Kubernetes' 10% tolerance"),
];

static TARGET_PARTS: &[Part] = &[Part::Rows(TARGET_ROWS)];
static RULES_PARTS: &[Part] = &[Part::Rows(RULES_ROWS)];

/// The `autoscaling/v2` `HorizontalPodAutoscaler` table.
pub(super) static HORIZONTAL_POD_AUTOSCALER: LazyLock<Table> = LazyLock::new(|| {
    Table::new(
        "HorizontalPodAutoscaler",
        &[
            Part::Rows(HPA_ROWS),
            Part::Rows(OBJECT_META),
            Part::Mount("spec.metrics[].resource.target", TARGET_PARTS),
            Part::Mount("spec.metrics[].pods.target", TARGET_PARTS),
            Part::Mount("spec.behavior.scaleUp", RULES_PARTS),
            Part::Mount("spec.behavior.scaleDown", RULES_PARTS),
        ],
        &[],
    )
});

/// Quantities may be written as YAML numbers (`averageValue: 10`);
/// k8s-openapi reads them as strings only.
pub(super) fn quantities_as_strings(doc: &Value) -> Value {
    let mut doc = doc.clone();
    if let Some(metrics) = doc
        .pointer_mut("/spec/metrics")
        .and_then(Value::as_array_mut)
    {
        for metric in metrics {
            for source in ["resource", "pods"] {
                let Some(Value::Object(target)) = metric.pointer_mut(&format!("/{source}/target"))
                else {
                    continue;
                };
                for field in ["averageValue", "value"] {
                    if let Some(n @ Value::Number(_)) = target.get(field) {
                        let text = n.to_string();
                        target.insert(field.to_owned(), Value::String(text));
                    }
                }
            }
        }
    }
    doc
}

/// Checks and defaults an HPA (see the module docs).
pub(super) fn horizontal_pod_autoscaler(
    c: &mut Checker<'_>,
    hpa: &mut HorizontalPodAutoscaler,
) -> Result<(), ManifestError> {
    c.object_meta(&mut hpa.metadata, Scope::Namespaced)?;
    let spec = &mut hpa.spec;
    let target = &mut spec.scale_target_ref;
    if target.kind.is_empty() {
        return Err(c.err("spec.scaleTargetRef.kind", "required"));
    }
    one_of(&target.kind, &SCALABLE_KINDS).map_err(|r| c.err("spec.scaleTargetRef.kind", r))?;
    if target.name.is_empty() {
        return Err(c.err("spec.scaleTargetRef.name", "required"));
    }
    names::dns1123_subdomain(&target.name).map_err(|r| c.err("spec.scaleTargetRef.name", r))?;
    match target.api_version.as_deref() {
        None | Some("") => target.api_version = Some("apps/v1".to_owned()),
        Some("apps/v1") => {}
        Some(other) => {
            return Err(c.err(
                "spec.scaleTargetRef.apiVersion",
                format!("{other:?}: weir scales apps/v1 Deployments and ReplicaSets"),
            ));
        }
    }
    let min = *spec.min_replicas.get_or_insert(1);
    if min < 1 {
        return Err(c.err(
            "spec.minReplicas",
            format!("{min}: must be greater than or equal to 1"),
        ));
    }
    if spec.max_replicas < min {
        return Err(c.err(
            "spec.maxReplicas",
            format!(
                "{}: must be greater than or equal to minReplicas ({min})",
                spec.max_replicas
            ),
        ));
    }
    let metrics = spec.metrics.get_or_insert_with(Vec::new);
    if metrics.is_empty() {
        metrics.push(default_cpu_metric());
    }
    for (i, metric) in metrics.iter().enumerate() {
        metric_spec(c, &format!("spec.metrics[{i}]"), metric)?;
    }
    if let Some(behavior) = &mut spec.behavior {
        behavior_rules(c, behavior)?;
    }
    Ok(())
}

/// Kubernetes' default metric: cpu at 80% of the requests.
fn default_cpu_metric() -> MetricSpec {
    MetricSpec {
        type_: "Resource".to_owned(),
        resource: Some(ResourceMetricSource {
            name: "cpu".to_owned(),
            target: MetricTarget {
                type_: "Utilization".to_owned(),
                average_utilization: Some(DEFAULT_CPU_UTILIZATION),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }
}

fn metric_spec(c: &Checker<'_>, path: &str, metric: &MetricSpec) -> Result<(), ManifestError> {
    let type_path = format!("{path}.type");
    let kind = metric.type_.as_str();
    if kind.is_empty() {
        return Err(c.err(&type_path, "required"));
    }
    if matches!(kind, "Object" | "External" | "ContainerResource") {
        return Err(c.err(&type_path, format!("{kind:?}: {NOT_SUPPORTED}")));
    }
    one_of(kind, &METRIC_TYPES).map_err(|e| c.err(&type_path, e))?;
    let given = usize::from(metric.resource.is_some()) + usize::from(metric.pods.is_some());
    if given > 1 {
        return Err(c.err(path, "must populate the given metric source only"));
    }
    match (kind, &metric.resource, &metric.pods) {
        ("Resource", Some(source), _) => resource_source(c, path, source),
        ("Pods", _, Some(p)) => {
            if p.metric.name.is_empty() {
                return Err(c.err(&format!("{path}.pods.metric.name"), "required"));
            }
            let tp = format!("{path}.pods.target");
            if p.target.type_ != "AverageValue" {
                return Err(c.err(
                    &format!("{tp}.type"),
                    format!(
                        "{:?}: a Pods metric's target must be AverageValue",
                        p.target.type_
                    ),
                ));
            }
            positive_quantity(c, &format!("{tp}.averageValue"), &p.target)
        }
        (t, _, _) => Err(c.err(
            &format!("{path}.{}", t.to_ascii_lowercase()),
            format!("must populate information for the given metric source (type {t})"),
        )),
    }
}

fn resource_source(
    c: &Checker<'_>,
    path: &str,
    source: &ResourceMetricSource,
) -> Result<(), ManifestError> {
    let name_path = format!("{path}.resource.name");
    one_of(&source.name, &RESOURCES).map_err(|e| c.err(&name_path, e))?;
    let target = &source.target;
    let tp = format!("{path}.resource.target");
    match target.type_.as_str() {
        "Utilization" => match target.average_utilization {
            Some(u) if u > 0 => Ok(()),
            Some(u) => Err(c.err(
                &format!("{tp}.averageUtilization"),
                format!("{u}: must be greater than 0"),
            )),
            None => Err(c.err(
                &format!("{tp}.averageUtilization"),
                "required for type Utilization",
            )),
        },
        "AverageValue" => positive_quantity(c, &format!("{tp}.averageValue"), target),
        other => Err(c.err(
            &format!("{tp}.type"),
            format!("{other:?}: a Resource metric's target must be Utilization or AverageValue"),
        )),
    }
}

fn positive_quantity(c: &Checker<'_>, path: &str, t: &MetricTarget) -> Result<(), ManifestError> {
    let Some(q) = &t.average_value else {
        return Err(c.err(path, "required for type AverageValue"));
    };
    match parse_cpu_millis(&q.0) {
        Ok(0) => Err(c.err(path, format!("{:?}: must be positive", q.0))),
        Ok(_) => Ok(()),
        Err(e) => Err(c.err(path, e)),
    }
}

fn behavior_rules(
    c: &Checker<'_>,
    behavior: &mut HorizontalPodAutoscalerBehavior,
) -> Result<(), ManifestError> {
    for (up, rules) in [
        (true, &mut behavior.scale_up),
        (false, &mut behavior.scale_down),
    ] {
        let path = if up {
            "spec.behavior.scaleUp"
        } else {
            "spec.behavior.scaleDown"
        };
        if let Some(r) = rules.as_ref() {
            scaling_rules(c, path, r)?;
        }
        *rules = Some(default_rules(up, rules.as_ref()));
    }
    Ok(())
}

fn scaling_rules(c: &Checker<'_>, path: &str, r: &HPAScalingRules) -> Result<(), ManifestError> {
    if let Some(w) = r.stabilization_window_seconds
        && !(0..=MAX_STABILIZATION_SECONDS).contains(&w)
    {
        return Err(c.err(
            &format!("{path}.stabilizationWindowSeconds"),
            format!("{w}: must be between 0 and {MAX_STABILIZATION_SECONDS} seconds"),
        ));
    }
    if let Some(s) = &r.select_policy {
        one_of(s, &SELECT_POLICIES).map_err(|e| c.err(&format!("{path}.selectPolicy"), e))?;
    }
    let policies = r.policies.as_deref().unwrap_or_default();
    if r.policies.is_some() && policies.is_empty() {
        return Err(c.err(
            &format!("{path}.policies"),
            "must specify at least one policy (or leave it out for the defaults)",
        ));
    }
    for (i, p) in policies.iter().enumerate() {
        let pp = format!("{path}.policies[{i}]");
        one_of(&p.type_, &POLICY_TYPES).map_err(|e| c.err(&format!("{pp}.type"), e))?;
        if p.value <= 0 {
            return Err(c.err(
                &format!("{pp}.value"),
                format!("{}: must be greater than 0", p.value),
            ));
        }
        if !(1..=MAX_PERIOD_SECONDS).contains(&p.period_seconds) {
            return Err(c.err(
                &format!("{pp}.periodSeconds"),
                format!(
                    "{}: must be between 1 and {MAX_PERIOD_SECONDS} seconds",
                    p.period_seconds
                ),
            ));
        }
    }
    Ok(())
}

/// The scaling rules in force for one direction: the user's `given` ones
/// with every absent field defaulted as Kubernetes does
/// (`GenerateHPAScaleUpRules` / `GenerateHPAScaleDownRules`). Scale-up:
/// no stabilization, `Max` of 100% and 4 pods per 15 s. Scale-down: 300 s
/// stabilization, 100% per 15 s.
pub fn default_rules(up: bool, given: Option<&HPAScalingRules>) -> HPAScalingRules {
    let policy = |type_: &str, value| HPAScalingPolicy {
        type_: type_.to_owned(),
        value,
        period_seconds: 15,
    };
    let (window, policies) = if up {
        (0, vec![policy("Pods", 4), policy("Percent", 100)])
    } else {
        (300, vec![policy("Percent", 100)])
    };
    let given = given.cloned().unwrap_or_default();
    HPAScalingRules {
        stabilization_window_seconds: Some(given.stabilization_window_seconds.unwrap_or(window)),
        select_policy: Some(given.select_policy.unwrap_or_else(|| "Max".to_owned())),
        policies: Some(given.policies.filter(|p| !p.is_empty()).unwrap_or(policies)),
        tolerance: given.tolerance,
    }
}
