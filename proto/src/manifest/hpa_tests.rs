//! `HorizontalPodAutoscaler` validation: the apiserver's refusals, each
//! naming its field, and its defaults.

use serde_json::{Value, json};

use super::{ManifestError, validate_horizontal_pod_autoscaler};

fn hpa(spec: &Value) -> Value {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": spec,
    })
}

fn base() -> Value {
    json!({
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
        "minReplicas": 2,
        "maxReplicas": 10,
        "metrics": [
            {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}},
            {"type": "Pods", "pods": {"metric": {"name": "weir_pod_new_connections_per_second"}, "target": {"type": "AverageValue", "averageValue": 10}}},
        ],
    })
}

fn with(pointer: &str, value: Value) -> Value {
    let mut spec = base();
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
    let target = spec.pointer_mut(parent).expect("parent exists");
    match target {
        Value::Object(m) if value.is_null() => {
            m.remove(key);
        }
        Value::Object(m) => {
            m.insert(key.to_owned(), value);
        }
        Value::Array(a) => a[key.parse::<usize>().expect("index")] = value,
        _ => panic!("{pointer}"),
    }
    hpa(&spec)
}

/// The refused field and reason.
fn refused(doc: &Value) -> (String, String) {
    match validate_horizontal_pod_autoscaler("hpa.yaml", doc) {
        Err(ManifestError::Invalid { field, reason, .. }) => (field, reason),
        other => panic!("expected a field refusal for {doc}, got {other:?}"),
    }
}

#[test]
fn a_valid_hpa_is_defaulted_like_the_apiserver() {
    let v = validate_horizontal_pod_autoscaler("hpa.yaml", &hpa(&base())).expect("valid");
    let spec = v.object.spec;
    assert_eq!(spec.min_replicas, Some(2));
    let pods = spec.metrics.expect("metrics")[1]
        .pods
        .clone()
        .expect("pods");
    assert_eq!(pods.target.average_value.expect("value").0, "10");
    let minimal =
        json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "maxReplicas": 3});
    let v = validate_horizontal_pod_autoscaler("hpa.yaml", &hpa(&minimal)).expect("valid");
    let spec = v.object.spec;
    assert_eq!(spec.min_replicas, Some(1));
    assert_eq!(
        spec.scale_target_ref.api_version.as_deref(),
        Some("apps/v1")
    );
    let m = &spec.metrics.expect("defaulted")[0];
    assert_eq!(m.type_, "Resource");
    let r = m.resource.as_ref().expect("resource");
    assert_eq!(
        (r.name.as_str(), r.target.average_utilization),
        ("cpu", Some(80))
    );
    assert!(
        spec.behavior.is_none(),
        "behavior is defaulted only when given"
    );
}

#[test]
fn a_given_behavior_gets_the_missing_defaults() {
    let doc = with(
        "/behavior",
        json!({"scaleDown": {"stabilizationWindowSeconds": 30}}),
    );
    let v = validate_horizontal_pod_autoscaler("hpa.yaml", &doc).expect("valid");
    let b = v.object.spec.behavior.expect("behavior");
    let down = b.scale_down.expect("down");
    assert_eq!(down.stabilization_window_seconds, Some(30));
    assert_eq!(down.select_policy.as_deref(), Some("Max"));
    assert_eq!(down.policies.expect("policies")[0].type_, "Percent");
    let up = b.scale_up.expect("up");
    assert_eq!(up.stabilization_window_seconds, Some(0));
    assert_eq!(up.policies.expect("policies").len(), 2);
}

#[test]
#[expect(clippy::too_many_lines, reason = "one table of cases")]
fn every_refusal_names_its_field_and_reason() {
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            with("/scaleTargetRef/kind", Value::Null),
            "spec.scaleTargetRef.kind",
            "required",
        ),
        (
            with("/scaleTargetRef/name", Value::Null),
            "spec.scaleTargetRef.name",
            "required",
        ),
        (
            with("/scaleTargetRef/kind", json!("StatefulSet")),
            "spec.scaleTargetRef.kind",
            "must be one of",
        ),
        (
            with("/scaleTargetRef/apiVersion", json!("apps/v2")),
            "spec.scaleTargetRef.apiVersion",
            "apps/v1",
        ),
        (
            with("/minReplicas", json!(0)),
            "spec.minReplicas",
            "greater than or equal to 1",
        ),
        (
            with("/maxReplicas", json!(1)),
            "spec.maxReplicas",
            "minReplicas (2)",
        ),
        (
            with("/maxReplicas", Value::Null),
            "spec.maxReplicas",
            "required",
        ),
        (
            with(
                "/metrics/0",
                json!({"type": "Object", "object": {"metric": {"name": "x"}}}),
            ),
            "spec.metrics[0].object",
            "not supported by weir",
        ),
        (
            with("/metrics/0", json!({"type": "External"})),
            "spec.metrics[0].type",
            "not supported by weir",
        ),
        (
            with("/metrics/0", json!({"type": "Resource"})),
            "spec.metrics[0].resource",
            "must populate",
        ),
        (
            with("/metrics/0/resource/name", json!("gpu")),
            "spec.metrics[0].resource.name",
            "must be one of",
        ),
        (
            with("/metrics/0/resource/target/averageUtilization", json!(0)),
            "spec.metrics[0].resource.target.averageUtilization",
            "greater than 0",
        ),
        (
            with(
                "/metrics/0/resource/target",
                json!({"type": "Value", "value": "1"}),
            ),
            "spec.metrics[0].resource.target.type",
            "Utilization or AverageValue",
        ),
        (
            with("/metrics/1/pods/target/averageValue", json!("0")),
            "spec.metrics[1].pods.target.averageValue",
            "must be positive",
        ),
        (
            with("/metrics/1/pods/target/averageValue", json!(0)),
            "spec.metrics[1].pods.target.averageValue",
            "must be positive",
        ),
        (
            with("/metrics/1/pods/target/type", json!("Utilization")),
            "spec.metrics[1].pods.target.type",
            "AverageValue",
        ),
        (
            with("/metrics/1/pods/metric/name", json!("")),
            "spec.metrics[1].pods.metric.name",
            "required",
        ),
        (
            with(
                "/behavior",
                json!({"scaleUp": {"policies": [{"type": "Replicas", "value": 1, "periodSeconds": 15}]}}),
            ),
            "spec.behavior.scaleUp.policies[0].type",
            "must be one of",
        ),
        (
            with(
                "/behavior",
                json!({"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 15}]}}),
            ),
            "spec.behavior.scaleUp.policies[0].value",
            "greater than 0",
        ),
        (
            with(
                "/behavior",
                json!({"scaleDown": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 1801}]}}),
            ),
            "spec.behavior.scaleDown.policies[0].periodSeconds",
            "between 1 and 1800",
        ),
        (
            with(
                "/behavior",
                json!({"scaleDown": {"stabilizationWindowSeconds": 3601}}),
            ),
            "spec.behavior.scaleDown.stabilizationWindowSeconds",
            "between 0 and 3600",
        ),
        (
            with(
                "/behavior",
                json!({"scaleDown": {"selectPolicy": "Average"}}),
            ),
            "spec.behavior.scaleDown.selectPolicy",
            "must be one of",
        ),
        (
            with("/behavior", json!({"scaleDown": {"policies": []}})),
            "spec.behavior.scaleDown.policies",
            "at least one policy",
        ),
        (with("/replicas", json!(3)), "spec.replicas", ""),
    ];
    for (doc, field, reason) in cases {
        let (f, r) = refused(&doc);
        assert_eq!(f, field, "{r}");
        assert!(r.contains(reason), "{field}: {r:?} lacks {reason:?}");
    }
}
