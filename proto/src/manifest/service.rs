//! Checks and defaults of `v1` Service and `discovery.k8s.io/v1`
//! `EndpointSlice`. Allocation of cluster IPs and node ports (and their
//! clashes) is weir-control's, which owns the cluster's state.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::check::{Checker, Scope, one_of};
use super::{ManifestError, names};

/// The node port range, as Kubernetes' default `--service-node-port-range`.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<i32> = 30000..=32767;
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: i32 = 10800;
/// The most endpoints weir keeps in one `EndpointSlice`.
pub const MAX_ENDPOINTS: usize = 1000;
const MAX_AFFINITY_TIMEOUT: i32 = 86400;
const TYPES: [&str; 2] = ["ClusterIP", "NodePort"];
const UNSUPPORTED_TYPES: [&str; 2] = ["LoadBalancer", "ExternalName"];
const PROTOCOLS: [&str; 2] = ["TCP", "UDP"];
const POLICIES: [&str; 2] = ["Cluster", "Local"];
const AFFINITIES: [&str; 2] = ["None", "ClientIP"];

/// Checks and defaults a Service (see the module docs of the field table).
pub(super) fn service(c: &Checker<'_>, svc: &mut Service) -> Result<(), ManifestError> {
    c.object_meta(&mut svc.metadata, Scope::Namespaced)?;
    let spec = svc.spec.get_or_insert_with(ServiceSpec::default);
    let kind = spec
        .type_
        .get_or_insert_with(|| "ClusterIP".to_owned())
        .clone();
    if UNSUPPORTED_TYPES.contains(&kind.as_str()) {
        return Err(c.err(
            "spec.type",
            format!("{kind:?} is not supported by weir: use \"ClusterIP\" or \"NodePort\""),
        ));
    }
    one_of(&kind, &TYPES).map_err(|r| c.err("spec.type", r))?;
    let node_port = kind == "NodePort";
    cluster_ip(c, spec, node_port)?;
    let headless = spec.cluster_ip.as_deref() == Some("None");
    c.label_map("spec.selector", spec.selector.as_ref())?;
    ports(c, spec, node_port, headless)?;
    session_affinity(c, spec)?;
    match (node_port, spec.external_traffic_policy.as_deref()) {
        (true, None | Some("")) => spec.external_traffic_policy = Some("Cluster".to_owned()),
        (true, Some(p)) => {
            one_of(p, &POLICIES).map_err(|r| c.err("spec.externalTrafficPolicy", r))?;
        }
        (false, None | Some("")) => spec.external_traffic_policy = None,
        (false, Some(_)) => {
            return Err(c.err(
                "spec.externalTrafficPolicy",
                "may only be set for NodePort services",
            ));
        }
    }
    let internal = spec
        .internal_traffic_policy
        .get_or_insert_with(|| "Cluster".to_owned());
    one_of(internal, &POLICIES).map_err(|r| c.err("spec.internalTrafficPolicy", r))?;
    let families = spec
        .ip_families
        .get_or_insert_with(|| vec!["IPv4".to_owned()]);
    if let Some((i, f)) = families.iter().enumerate().find(|(_, f)| *f != "IPv4") {
        return Err(c.err(
            &format!("spec.ipFamilies[{i}]"),
            format!("{f:?} is not supported by weir: services are IPv4 only"),
        ));
    }
    if families.is_empty() {
        families.push("IPv4".to_owned());
    }
    let policy = spec
        .ip_family_policy
        .get_or_insert_with(|| "SingleStack".to_owned());
    if policy != "SingleStack" {
        return Err(c.err(
            "spec.ipFamilyPolicy",
            format!(
                "{policy:?} is not supported by weir: services are IPv4 only (\"SingleStack\")"
            ),
        ));
    }
    Ok(())
}

/// `clusterIP` and `clusterIPs`: empty (allocated later), `None`, or an
/// IPv4 address; the two must agree.
fn cluster_ip(
    c: &Checker<'_>,
    spec: &mut ServiceSpec,
    node_port: bool,
) -> Result<(), ManifestError> {
    let ips = spec.cluster_ips.take().unwrap_or_default();
    if ips.len() > 1 {
        return Err(c.err(
            "spec.clusterIPs",
            "at most one address: weir services are IPv4 only",
        ));
    }
    let one = spec.cluster_ip.take().filter(|ip| !ip.is_empty());
    let ip = match (one, ips.into_iter().next().filter(|ip| !ip.is_empty())) {
        (Some(a), Some(b)) if a != b => {
            return Err(c.err(
                "spec.clusterIPs[0]",
                format!("{b:?} must match spec.clusterIP {a:?}"),
            ));
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => return Ok(()),
    };
    if ip == "None" {
        if node_port {
            return Err(c.err(
                "spec.clusterIP",
                "may not be \"None\" for NodePort services (headless services are ClusterIP)",
            ));
        }
    } else {
        ip.parse::<Ipv4Addr>().map_err(|_| {
            c.err(
                "spec.clusterIP",
                format!("{ip:?} must be a valid IPv4 address (or \"None\" for a headless service)"),
            )
        })?;
    }
    spec.cluster_ips = Some(vec![ip.clone()]);
    spec.cluster_ip = Some(ip);
    Ok(())
}

fn ports(
    c: &Checker<'_>,
    spec: &mut ServiceSpec,
    node_port: bool,
    headless: bool,
) -> Result<(), ManifestError> {
    let ports = spec.ports.get_or_insert_with(Vec::new);
    if ports.is_empty() && !headless {
        return Err(c.err("spec.ports", "required: at least one port"));
    }
    let several = ports.len() > 1;
    let mut names_seen = HashSet::new();
    let mut pairs = HashSet::new();
    let mut node_ports = HashSet::new();
    for (i, p) in ports.iter_mut().enumerate() {
        let path = format!("spec.ports[{i}]");
        port(c, &path, p, several, node_port)?;
        let name = p.name.clone().unwrap_or_default();
        if several && !names_seen.insert(name.clone()) {
            return Err(c.err(
                &format!("{path}.name"),
                format!("duplicate port name {name:?}: names must be unique"),
            ));
        }
        let protocol = p.protocol.clone().unwrap_or_default();
        if !pairs.insert((p.port, protocol.clone())) {
            return Err(c.err(
                &format!("{path}.port"),
                format!("duplicate port {}/{protocol}", p.port),
            ));
        }
        if let Some(np) = p.node_port.filter(|n| *n != 0)
            && !node_ports.insert((np, protocol.clone()))
        {
            return Err(c.err(
                &format!("{path}.nodePort"),
                format!("duplicate node port {np}/{protocol}"),
            ));
        }
    }
    if ports.is_empty() {
        spec.ports = None;
    }
    Ok(())
}

fn port(
    c: &Checker<'_>,
    path: &str,
    p: &mut ServicePort,
    several: bool,
    node_port: bool,
) -> Result<(), ManifestError> {
    match p.name.as_deref().filter(|n| !n.is_empty()) {
        None if several => {
            return Err(c.err(
                &format!("{path}.name"),
                "required when the service has more than one port",
            ));
        }
        None => p.name = None,
        Some(name) => {
            names::dns1123_label(name).map_err(|r| c.err(&format!("{path}.name"), r))?;
        }
    }
    in_port_range(p.port).map_err(|r| c.err(&format!("{path}.port"), r))?;
    let protocol = p.protocol.get_or_insert_with(|| "TCP".to_owned());
    if protocol == "SCTP" {
        return Err(c.err(
            &format!("{path}.protocol"),
            "\"SCTP\" is not supported by weir: use \"TCP\" or \"UDP\"",
        ));
    }
    one_of(protocol, &PROTOCOLS).map_err(|r| c.err(&format!("{path}.protocol"), r))?;
    let target = p.target_port.get_or_insert(IntOrString::Int(p.port));
    match target {
        IntOrString::Int(0) => *target = IntOrString::Int(p.port),
        IntOrString::Int(n) => {
            in_port_range(*n).map_err(|r| c.err(&format!("{path}.targetPort"), r))?;
        }
        IntOrString::String(name) => {
            names::iana_svc_name(name).map_err(|r| c.err(&format!("{path}.targetPort"), r))?;
        }
    }
    match p.node_port.filter(|n| *n != 0) {
        None => p.node_port = None,
        Some(_) if !node_port => {
            return Err(c.err(
                &format!("{path}.nodePort"),
                "may only be set for NodePort services (spec.type: NodePort)",
            ));
        }
        Some(np) if !NODE_PORT_RANGE.contains(&np) => {
            return Err(c.err(
                &format!("{path}.nodePort"),
                format!(
                    "{np} is outside the node port range {}-{}",
                    NODE_PORT_RANGE.start(),
                    NODE_PORT_RANGE.end()
                ),
            ));
        }
        Some(_) => {}
    }
    Ok(())
}

fn in_port_range(port: i32) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("{port} must be between 1 and 65535, inclusive"))
    }
}

fn session_affinity(c: &Checker<'_>, spec: &mut ServiceSpec) -> Result<(), ManifestError> {
    let affinity = spec
        .session_affinity
        .get_or_insert_with(|| "None".to_owned())
        .clone();
    one_of(&affinity, &AFFINITIES).map_err(|r| c.err("spec.sessionAffinity", r))?;
    if affinity == "None" {
        if spec
            .session_affinity_config
            .as_ref()
            .and_then(|s| s.client_ip.as_ref())
            .and_then(|s| s.timeout_seconds)
            .is_some()
        {
            return Err(c.err(
                "spec.sessionAffinityConfig",
                "must not be set when spec.sessionAffinity is \"None\"",
            ));
        }
        spec.session_affinity_config = None;
        return Ok(());
    }
    let config = spec
        .session_affinity_config
        .get_or_insert_with(SessionAffinityConfig::default)
        .client_ip
        .get_or_insert_with(ClientIPConfig::default);
    let timeout = *config
        .timeout_seconds
        .get_or_insert(DEFAULT_AFFINITY_TIMEOUT);
    if !(1..=MAX_AFFINITY_TIMEOUT).contains(&timeout) {
        return Err(c.err(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            format!("{timeout} must be between 1 and {MAX_AFFINITY_TIMEOUT}, inclusive"),
        ));
    }
    Ok(())
}

/// Checks and defaults an `EndpointSlice`: IPv4 addresses only, at most
/// [`MAX_ENDPOINTS`] endpoints, port protocols default to TCP.
pub(super) fn endpoint_slice(
    c: &Checker<'_>,
    slice: &mut EndpointSlice,
) -> Result<(), ManifestError> {
    c.object_meta(&mut slice.metadata, Scope::Namespaced)?;
    if slice.address_type != "IPv4" {
        return Err(c.err(
            "addressType",
            format!(
                "{:?} is not supported by weir: only \"IPv4\"",
                slice.address_type
            ),
        ));
    }
    let endpoints = slice.endpoints.as_deref().unwrap_or_default();
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(c.err(
            "endpoints",
            format!(
                "{} endpoints: weir keeps at most {MAX_ENDPOINTS} in one slice",
                endpoints.len()
            ),
        ));
    }
    for (i, e) in endpoints.iter().enumerate() {
        let path = format!("endpoints[{i}]");
        if e.addresses.is_empty() {
            return Err(c.err(
                &format!("{path}.addresses"),
                "must contain at least 1 address",
            ));
        }
        for (j, a) in e.addresses.iter().enumerate() {
            a.parse::<Ipv4Addr>().map_err(|_| {
                c.err(
                    &format!("{path}.addresses[{j}]"),
                    format!("{a:?} must be a valid IPv4 address"),
                )
            })?;
        }
        if let Some(h) = e.hostname.as_deref() {
            names::dns1123_label(h).map_err(|r| c.err(&format!("{path}.hostname"), r))?;
        }
    }
    let mut seen = HashSet::new();
    for (i, p) in slice.ports.iter_mut().flatten().enumerate() {
        let path = format!("ports[{i}]");
        let name = p.name.clone().unwrap_or_default();
        if !name.is_empty() {
            names::dns1123_label(&name).map_err(|r| c.err(&format!("{path}.name"), r))?;
        }
        if !seen.insert(name.clone()) {
            return Err(c.err(
                &format!("{path}.name"),
                format!("duplicate port name {name:?}: names must be unique"),
            ));
        }
        if let Some(port) = p.port {
            in_port_range(port).map_err(|r| c.err(&format!("{path}.port"), r))?;
        }
        let protocol = p.protocol.get_or_insert_with(|| "TCP".to_owned());
        one_of(protocol, &PROTOCOLS).map_err(|r| c.err(&format!("{path}.protocol"), r))?;
    }
    Ok(())
}
