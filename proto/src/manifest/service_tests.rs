//! Service and `EndpointSlice` validation: defaults, and every refusal names its field.

use serde_json::{Value, json};

use super::table::{FieldClass, Shape};
use super::{ManifestError, service_fields, validate_endpoint_slice, validate_service};

fn svc(spec: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": spec})
}

fn refused_field(doc: &Value) -> (String, String) {
    match validate_service("svc.yaml", doc) {
        Err(ManifestError::Invalid { field, reason, .. }) => (field, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn defaults_like_kubernetes() {
    let v = validate_service(
        "svc.yaml",
        &svc(&json!({"selector": {"app": "web"}, "ports": [{"port": 80}]})),
    )
    .expect("valid");
    let spec = v.object.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(spec.external_traffic_policy, None);
    assert_eq!(spec.ip_families, Some(vec!["IPv4".to_owned()]));
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
    );
    assert_eq!(v.object.metadata.namespace.as_deref(), Some("default"));
}

#[test]
fn node_port_and_client_ip_defaults() {
    let v = validate_service(
        "svc.yaml",
        &svc(&json!({"type": "NodePort", "sessionAffinity": "ClientIP",
            "ports": [{"port": 80, "targetPort": "http", "nodePort": 30080}]})),
    )
    .expect("valid");
    let spec = v.object.spec.expect("spec");
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    let timeout = spec
        .session_affinity_config
        .and_then(|c| c.client_ip)
        .and_then(|c| c.timeout_seconds);
    assert_eq!(timeout, Some(super::DEFAULT_AFFINITY_TIMEOUT));
}

#[test]
fn headless_needs_no_ports_and_keeps_none() {
    let v = validate_service("svc.yaml", &svc(&json!({"clusterIP": "None"}))).expect("valid");
    let spec = v.object.spec.expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.cluster_ips, Some(vec!["None".to_owned()]));
}

#[test]
#[allow(clippy::too_many_lines)] // one table of cases
fn every_refusal_names_its_field() {
    let cases = [
        (
            json!({"type": "LoadBalancer", "ports": [{"port": 80}]}),
            "spec.type",
            "not supported by weir",
        ),
        (
            json!({"type": "ExternalName", "ports": [{"port": 80}]}),
            "spec.type",
            "not supported by weir",
        ),
        (
            json!({"type": "Bogus", "ports": [{"port": 80}]}),
            "spec.type",
            "unsupported value",
        ),
        (
            json!({"externalName": "x.example"}),
            "spec.externalName",
            "not supported",
        ),
        (json!({"ports": []}), "spec.ports", "at least one"),
        (
            json!({"ports": [{"port": 0}]}),
            "spec.ports[0].port",
            "between 1 and 65535",
        ),
        (
            json!({"ports": [{"port": 70000}]}),
            "spec.ports[0].port",
            "between 1 and 65535",
        ),
        (
            json!({"ports": [{"port": 80, "protocol": "SCTP"}]}),
            "spec.ports[0].protocol",
            "not supported by weir",
        ),
        (
            json!({"ports": [{"port": 80, "protocol": "ICMP"}]}),
            "spec.ports[0].protocol",
            "unsupported value",
        ),
        (
            json!({"ports": [{"name": "a", "port": 80}, {"port": 81}]}),
            "spec.ports[1].name",
            "required",
        ),
        (
            json!({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}),
            "spec.ports[1].name",
            "unique",
        ),
        (
            json!({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
            "spec.ports[1].port",
            "duplicate",
        ),
        (
            json!({"ports": [{"port": 80, "targetPort": 0x1_0000}]}),
            "spec.ports[0].targetPort",
            "between",
        ),
        (
            json!({"ports": [{"port": 80, "targetPort": "Not_A_Name"}]}),
            "spec.ports[0].targetPort",
            "port name",
        ),
        (
            json!({"ports": [{"port": 80, "nodePort": 30080}]}),
            "spec.ports[0].nodePort",
            "NodePort",
        ),
        (
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}),
            "spec.ports[0].nodePort",
            "range",
        ),
        (
            json!({"type": "NodePort", "ports": [{"name": "a", "port": 80, "nodePort": 30001}, {"name": "b", "port": 81, "nodePort": 30001}]}),
            "spec.ports[1].nodePort",
            "duplicate",
        ),
        (
            json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}),
            "spec.clusterIP",
            "IPv4",
        ),
        (
            json!({"type": "NodePort", "clusterIP": "None", "ports": [{"port": 80}]}),
            "spec.clusterIP",
            "None",
        ),
        (
            json!({"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.6"], "ports": [{"port": 80}]}),
            "spec.clusterIPs[0]",
            "must match",
        ),
        (
            json!({"sessionAffinity": "Cookie", "ports": [{"port": 80}]}),
            "spec.sessionAffinity",
            "unsupported",
        ),
        (
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}, "ports": [{"port": 80}]}),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            "between",
        ),
        (
            json!({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}}, "ports": [{"port": 80}]}),
            "spec.sessionAffinityConfig",
            "None",
        ),
        (
            json!({"externalTrafficPolicy": "Local", "ports": [{"port": 80}]}),
            "spec.externalTrafficPolicy",
            "NodePort",
        ),
        (
            json!({"type": "NodePort", "externalTrafficPolicy": "Nearest", "ports": [{"port": 80}]}),
            "spec.externalTrafficPolicy",
            "unsupported",
        ),
        (
            json!({"internalTrafficPolicy": "Nearest", "ports": [{"port": 80}]}),
            "spec.internalTrafficPolicy",
            "unsupported",
        ),
        (
            json!({"ipFamilies": ["IPv6"], "ports": [{"port": 80}]}),
            "spec.ipFamilies[0]",
            "IPv4",
        ),
        (
            json!({"ipFamilyPolicy": "RequireDualStack", "ports": [{"port": 80}]}),
            "spec.ipFamilyPolicy",
            "IPv4",
        ),
        (
            json!({"loadBalancerIP": "1.2.3.4", "ports": [{"port": 80}]}),
            "spec.loadBalancerIP",
            "not supported",
        ),
        (
            json!({"selector": {"bad key!": "x"}, "ports": [{"port": 80}]}),
            "spec.selector[bad key!]",
            "invalid key",
        ),
        (
            json!({"ports": [{"port": 80}], "bogus": 1}),
            "spec.bogus",
            "unknown field",
        ),
    ];
    for (spec, field, reason) in cases {
        let (got_field, got_reason) = refused_field(&svc(&spec));
        assert_eq!(got_field, field, "{spec}: {got_reason}");
        assert!(
            got_reason.contains(reason),
            "{spec}: {got_field}: {got_reason:?} lacks {reason:?}"
        );
    }
}

fn slice(body: &Value) -> Value {
    let mut doc = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web"}});
    for (k, v) in body.as_object().expect("mapping") {
        doc[k] = v.clone();
    }
    doc
}

#[test]
fn endpoint_slices_are_checked() {
    let ok = slice(&json!({"addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": true},
            "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default"}}],
        "ports": [{"name": "http", "port": 8080}]}));
    let v = validate_endpoint_slice("es.yaml", &ok).expect("valid");
    assert_eq!(
        v.object.ports.expect("ports")[0].protocol.as_deref(),
        Some("TCP")
    );
    let cases = [
        (
            json!({"addressType": "IPv6"}),
            "addressType",
            "only \"IPv4\"",
        ),
        (json!({}), "addressType", "required"),
        (
            json!({"addressType": "IPv4", "endpoints": [{"addresses": []}]}),
            "endpoints[0].addresses",
            "at least 1",
        ),
        (
            json!({"addressType": "IPv4", "endpoints": [{"addresses": ["fe80::1"]}]}),
            "endpoints[0].addresses[0]",
            "IPv4",
        ),
        (
            json!({"addressType": "IPv4", "ports": [{"port": 0}]}),
            "ports[0].port",
            "between",
        ),
        (
            json!({"addressType": "IPv4", "ports": [{"port": 80, "protocol": "SCTP"}]}),
            "ports[0].protocol",
            "unsupported",
        ),
        (
            json!({"addressType": "IPv4", "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}),
            "ports[1].name",
            "unique",
        ),
    ];
    for (body, field, reason) in cases {
        match validate_endpoint_slice("es.yaml", &slice(&body)) {
            Err(ManifestError::Invalid {
                field: f,
                reason: r,
                ..
            }) => {
                assert_eq!(f, field, "{body}: {r}");
                assert!(r.contains(reason), "{body}: {f}: {r:?} lacks {reason:?}");
            }
            other => panic!("{body}: expected a refusal, got {other:?}"),
        }
    }
    let many: Vec<Value> = (0..=super::MAX_ENDPOINTS)
        .map(|i| json!({"addresses": [format!("10.244.{}.{}", i / 250, i % 250 + 1)]}))
        .collect();
    let err = validate_endpoint_slice(
        "es.yaml",
        &slice(&json!({"addressType": "IPv4", "endpoints": many})),
    )
    .expect_err("too many endpoints");
    assert!(
        err.to_string().contains("endpoints: 1001 endpoints"),
        "{err}"
    );
}

#[test]
fn service_tables_hang_together() {
    for table in service_fields::all() {
        for (path, _) in table.rows() {
            let Some((parent, _)) = path.rsplit_once('.') else {
                continue;
            };
            let parent = parent.strip_suffix("[]").unwrap_or(parent);
            let class = table.rule(parent);
            assert!(
                matches!(
                    class,
                    Some(FieldClass::Used {
                        shape: Shape::Object | Shape::ObjectList,
                        ..
                    })
                ),
                "{}: {path} is below {parent} which is not walked",
                table.kind()
            );
        }
    }
}
