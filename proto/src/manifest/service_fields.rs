//! The field tables of `v1` Service and `discovery.k8s.io/v1` `EndpointSlice`
//! (kept apart from `fields.rs` so the two grow independently).

use std::sync::LazyLock;

use super::fields::{
    OBJECT_META, OBJECT_REFERENCE_PARTS, dropped, refused, refused_unless, required, used, warn,
};
use super::table::{FieldRule, Inert, Part, Shape, Table};

const NO_LB: &str = "weir has no load-balancer integration; use NodePort";

/// The `v1` Service rows.
#[rustfmt::skip]
static SERVICE_ROWS: &[FieldRule] = &[
    required("apiVersion", Shape::String, "must be `v1`"),
    required("kind", Shape::String, "must be `Service`"),
    dropped("status", "status is reported by weir, not read from manifests"),
    used("spec", Shape::Object, ""),
    used("spec.type", Shape::String, "`ClusterIP` (default) or `NodePort`; `LoadBalancer` and `ExternalName` are not supported by weir"),
    used("spec.clusterIP", Shape::String, "allocated from the service CIDR if empty; `None` for a headless service; immutable once set"),
    used("spec.clusterIPs", Shape::StringList, "at most one (IPv4); the first is spec.clusterIP"),
    used("spec.selector", Shape::StringMap, "the pods behind the service; without it, EndpointSlices are the user's"),
    used("spec.ports", Shape::ObjectList, "names required and unique when more than one"),
    used("spec.ports[].name", Shape::String, "a DNS-1123 label"),
    required("spec.ports[].port", Shape::I32, "1-65535"),
    used("spec.ports[].protocol", Shape::String, "`TCP` (default) or `UDP`"),
    used("spec.ports[].targetPort", Shape::IntOrString, "a port number or a container port name; default the port"),
    used("spec.ports[].nodePort", Shape::I32, "NodePort services only: 30000-32767, allocated if unset"),
    used("spec.ports[].appProtocol", Shape::String, "kept, not acted on"),
    used("spec.sessionAffinity", Shape::String, "`None` (default) or `ClientIP`"),
    used("spec.sessionAffinityConfig", Shape::Object, "ClientIP only"),
    used("spec.sessionAffinityConfig.clientIP", Shape::Object, ""),
    used("spec.sessionAffinityConfig.clientIP.timeoutSeconds", Shape::I32, "1-86400; default 10800"),
    used("spec.externalTrafficPolicy", Shape::String, "NodePort only: `Cluster` (default) or `Local`"),
    used("spec.internalTrafficPolicy", Shape::String, "`Cluster` (default) or `Local`; accepted"),
    used("spec.publishNotReadyAddresses", Shape::Bool, "not-ready pods are listed as ready endpoints"),
    used("spec.ipFamilies", Shape::StringList, "only `IPv4`"),
    used("spec.ipFamilyPolicy", Shape::String, "only `SingleStack`"),
    refused("spec.externalName", "ExternalName services are not supported by weir"),
    refused("spec.externalIPs", "external IPs are not supported by weir"),
    refused("spec.loadBalancerIP", NO_LB),
    refused("spec.loadBalancerSourceRanges", NO_LB),
    refused("spec.loadBalancerClass", NO_LB),
    refused_unless("spec.allocateLoadBalancerNodePorts", Inert::True, NO_LB),
    refused_unless("spec.healthCheckNodePort", Inert::Zero, NO_LB),
    warn("spec.trafficDistribution", "weir spreads traffic over every ready endpoint"),
];

/// The `v1` Service table.
pub(super) static SERVICE: LazyLock<Table> = LazyLock::new(|| {
    Table::new(
        "Service",
        &[Part::Rows(SERVICE_ROWS), Part::Rows(OBJECT_META)],
        &[],
    )
});

/// The `discovery.k8s.io/v1` `EndpointSlice` rows.
#[rustfmt::skip]
static ENDPOINT_SLICE_ROWS: &[FieldRule] = &[
    required("apiVersion", Shape::String, "must be `discovery.k8s.io/v1`"),
    required("kind", Shape::String, "must be `EndpointSlice`"),
    required("addressType", Shape::String, "only `IPv4`"),
    used("endpoints", Shape::ObjectList, "at most 1000"),
    required("endpoints[].addresses", Shape::StringList, "exactly one IPv4 address"),
    used("endpoints[].conditions", Shape::Object, ""),
    used("endpoints[].conditions.ready", Shape::Bool, "ready endpoints receive traffic"),
    used("endpoints[].conditions.serving", Shape::Bool, ""),
    used("endpoints[].conditions.terminating", Shape::Bool, ""),
    used("endpoints[].hostname", Shape::String, "a DNS-1123 label"),
    used("endpoints[].nodeName", Shape::String, "the node of the endpoint (externalTrafficPolicy Local)"),
    used("endpoints[].targetRef", Shape::Object, "the pod"),
    used("endpoints[].zone", Shape::String, "kept, not acted on"),
    warn("endpoints[].hints", "weir does not route by topology hints"),
    warn("endpoints[].deprecatedTopology", "deprecated in Kubernetes"),
    used("ports", Shape::ObjectList, ""),
    used("ports[].name", Shape::String, "matches the service port's name"),
    used("ports[].port", Shape::I32, "1-65535"),
    used("ports[].protocol", Shape::String, "`TCP` (default) or `UDP`"),
    used("ports[].appProtocol", Shape::String, "kept, not acted on"),
];

/// The `discovery.k8s.io/v1` `EndpointSlice` table.
pub(super) static ENDPOINT_SLICE: LazyLock<Table> = LazyLock::new(|| {
    Table::new(
        "EndpointSlice",
        &[
            Part::Rows(ENDPOINT_SLICE_ROWS),
            Part::Rows(OBJECT_META),
            Part::Mount("endpoints[].targetRef", OBJECT_REFERENCE_PARTS),
        ],
        &[],
    )
});

/// Both tables, for the consistency test.
#[cfg(test)]
pub(super) fn all() -> [&'static Table; 2] {
    [&SERVICE, &ENDPOINT_SLICE]
}
