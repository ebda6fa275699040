//! Checks on the values of a typed Pod spec (names, ports, resources,
//! scheduling fields) and the Kubernetes defaults weir applies. Runs after
//! the table walk, so every field seen here is one weir uses and has the
//! right JSON shape. The same checks run on the pod template of workloads.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{
    Affinity, Container, NodeSelectorTerm, Pod, PodAffinityTerm, PodSpec, Probe, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::check::{Checker, Scope, one_of};
use super::names;
use super::quantity::{parse_cpu_millis, parse_memory_bytes};
use super::{ContainerResources, ManifestError, key_path};

const DEFAULT_RESTART_POLICY: &str = "Always";
const DEFAULT_GRACE_SECONDS: i64 = 30;
const DEFAULT_PROTOCOL: &str = "TCP";
const RESTART_POLICIES: [&str; 3] = ["Always", "OnFailure", "Never"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const TOLERATION_OPERATORS: [&str; 2] = ["Equal", "Exists"];
/// Taint effects; a toleration may also leave it empty (every effect).
pub(super) const TAINT_EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
const NODE_OPERATORS: [&str; 6] = ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"];
const PREEMPTION_POLICIES: [&str; 2] = ["PreemptLowerPriority", "Never"];
/// Kubernetes' built-in priority classes and their values.
const BUILTIN_PRIORITY_CLASSES: [(&str, i32); 2] = [
    ("system-cluster-critical", 2_000_000_000),
    ("system-node-critical", 2_000_001_000),
];
const NO_PRIORITY_CLASSES: &str = "weir has no PriorityClass objects";

/// Who reads the Pod: weir-control (with a scheduler) or weir-agent's
/// standalone mode (the scheduling fields are ignored with a warning there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// weir-control: the scheduling fields are used and checked.
    Cluster,
    /// weir-agent standalone: the scheduling fields are ignored.
    Standalone,
}

struct PodChecker<'c, 'a> {
    c: &'c mut Checker<'a>,
    /// The spec's path: `spec` or `spec.template.spec`.
    path: &'c str,
}

/// Checks `pod` and fills in the defaults; returns the parsed resources of
/// each container, in order.
pub(super) fn check_and_default(
    c: &mut Checker<'_>,
    pod: &mut Pod,
    mode: Mode,
) -> Result<Vec<ContainerResources>, ManifestError> {
    c.object_meta(&mut pod.metadata, Scope::Namespaced)?;
    let spec = pod.spec.as_mut().ok_or_else(|| c.err("spec", "required"))?;
    check_spec(c, "spec", spec, mode)
}

/// Checks and defaults a Pod spec found at `path` (`spec`, `spec.template.spec`).
pub(super) fn check_spec(
    c: &mut Checker<'_>,
    path: &str,
    spec: &mut PodSpec,
    mode: Mode,
) -> Result<Vec<ContainerResources>, ManifestError> {
    let mut p = PodChecker { c, path };
    let resources = p.spec(spec)?;
    if mode == Mode::Cluster {
        p.scheduling(spec)?;
    }
    Ok(resources)
}

impl PodChecker<'_, '_> {
    fn spec(&mut self, spec: &mut PodSpec) -> Result<Vec<ContainerResources>, ManifestError> {
        let base = self.path;
        if spec.containers.is_empty() {
            return Err(self.c.err(
                &format!("{base}.containers"),
                "must contain at least one container",
            ));
        }
        match spec.restart_policy.as_deref() {
            None => spec.restart_policy = Some(DEFAULT_RESTART_POLICY.to_owned()),
            Some(p) => {
                one_of(p, &RESTART_POLICIES)
                    .map_err(|r| self.c.err(&format!("{base}.restartPolicy"), r))?;
            }
        }
        match spec.termination_grace_period_seconds {
            None => spec.termination_grace_period_seconds = Some(DEFAULT_GRACE_SECONDS),
            Some(s) if s < 0 => {
                return Err(self.c.err(
                    &format!("{base}.terminationGracePeriodSeconds"),
                    format!("{s} must be >= 0"),
                ));
            }
            Some(_) => {}
        }
        if let Some(os) = spec.os.as_ref().filter(|os| os.name != "linux") {
            return Err(self.c.err(
                &format!("{base}.os.name"),
                format!(
                    "not supported: {:?}: weir runs Linux containers only",
                    os.name
                ),
            ));
        }

        let mut container_names = HashSet::new();
        // (port, protocol) → where it was first declared; containers share one netns.
        let mut ports_seen = HashMap::new();
        let mut resources = Vec::with_capacity(spec.containers.len());
        for (i, container) in spec.containers.iter_mut().enumerate() {
            let path = format!("{base}.containers[{i}]");
            if !container_names.insert(container.name.clone()) {
                return Err(self.c.err(
                    &format!("{path}.name"),
                    format!("duplicate container name {:?}", container.name),
                ));
            }
            self.container(&path, container, &mut ports_seen)?;
            resources.push(self.resources(&path, container)?);
        }
        Ok(resources)
    }

    fn container(
        &mut self,
        path: &str,
        c: &mut Container,
        ports_seen: &mut HashMap<(i32, String), String>,
    ) -> Result<(), ManifestError> {
        names::dns1123_label(&c.name).map_err(|r| self.c.err(&format!("{path}.name"), r))?;
        let image = c.image.as_deref().unwrap_or_default();
        if image.is_empty() {
            return Err(self.c.err(&format!("{path}.image"), "required"));
        }
        if image.trim() != image {
            return Err(self.c.err(
                &format!("{path}.image"),
                format!("{image:?} must not have leading or trailing whitespace"),
            ));
        }
        if let Some(dir) = c
            .working_dir
            .as_deref()
            .filter(|d| !d.is_empty() && !d.starts_with('/'))
        {
            return Err(self.c.err(
                &format!("{path}.workingDir"),
                format!("{dir:?} must be an absolute path"),
            ));
        }
        for (j, env) in c.env.iter().flatten().enumerate() {
            names::env_var_name(&env.name)
                .map_err(|r| self.c.err(&format!("{path}.env[{j}].name"), r))?;
        }

        let mut port_names = HashSet::new();
        for (j, port) in c.ports.iter_mut().flatten().enumerate() {
            let port_path = format!("{path}.ports[{j}]");
            if !(1..=65535).contains(&port.container_port) {
                return Err(self.c.err(
                    &format!("{port_path}.containerPort"),
                    format!(
                        "{} must be between 1 and 65535, inclusive",
                        port.container_port
                    ),
                ));
            }
            let protocol = port
                .protocol
                .get_or_insert_with(|| DEFAULT_PROTOCOL.to_owned());
            one_of(protocol, &PROTOCOLS)
                .map_err(|r| self.c.err(&format!("{port_path}.protocol"), r))?;
            if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                names::iana_svc_name(name)
                    .map_err(|r| self.c.err(&format!("{port_path}.name"), r))?;
                if !port_names.insert(name.to_owned()) {
                    return Err(self.c.err(
                        &format!("{port_path}.name"),
                        format!("duplicate port name {name:?}"),
                    ));
                }
            }
            let key = (port.container_port, protocol.clone());
            if let Some(first) = ports_seen.get(&key) {
                self.c.warnings.push(format!(
                    "{}: {port_path}: duplicate port definition with {first}: the containers of a pod share one network namespace",
                    self.c.file
                ));
            } else {
                ports_seen.insert(key, port_path);
            }
        }
        let port_names: Vec<String> = port_names.into_iter().collect();
        for (field, probe) in [
            ("livenessProbe", c.liveness_probe.as_mut()),
            ("readinessProbe", c.readiness_probe.as_mut()),
            ("startupProbe", c.startup_probe.as_mut()),
        ] {
            if let Some(probe) = probe {
                let single_success = field != "readinessProbe";
                self.probe(
                    &format!("{path}.{field}"),
                    probe,
                    single_success,
                    &port_names,
                )?;
            }
        }
        Ok(())
    }

    /// Checks a probe and fills in Kubernetes' defaults.
    fn probe(
        &self,
        path: &str,
        p: &mut Probe,
        single_success: bool,
        port_names: &[String],
    ) -> Result<(), ManifestError> {
        let handlers = usize::from(p.http_get.is_some())
            + usize::from(p.tcp_socket.is_some())
            + usize::from(p.exec.is_some());
        if handlers != 1 {
            return Err(self.c.err(
                path,
                format!(
                    "must have exactly one handler (httpGet, tcpSocket or exec), found {handlers}"
                ),
            ));
        }
        let port = |field: &str, port: &IntOrString| -> Result<(), ManifestError> {
            match port {
                IntOrString::Int(n) if !(1..=65535).contains(n) => Err(self
                    .c
                    .err(field, format!("{n} must be between 1 and 65535, inclusive"))),
                IntOrString::String(name) if !port_names.contains(name) => Err(self.c.err(
                    field,
                    format!("{name:?} is not the name of one of the container's ports"),
                )),
                _ => Ok(()),
            }
        };
        if let Some(h) = p.http_get.as_mut() {
            port(&format!("{path}.httpGet.port"), &h.port)?;
            let scheme = h.scheme.get_or_insert_with(|| "HTTP".to_owned());
            if scheme != "HTTP" {
                return Err(self.c.err(
                    &format!("{path}.httpGet.scheme"),
                    format!("not supported: {scheme:?}: weir probes speak plain HTTP only"),
                ));
            }
            if let Some(p) = h
                .path
                .as_deref()
                .filter(|p| !p.is_empty() && !p.starts_with('/'))
            {
                return Err(self.c.err(
                    &format!("{path}.httpGet.path"),
                    format!("{p:?} must start with `/`"),
                ));
            }
            for (i, header) in h.http_headers.iter().flatten().enumerate() {
                let bad_name = header.name.is_empty()
                    || !header
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
                if bad_name {
                    return Err(self.c.err(
                        &format!("{path}.httpGet.httpHeaders[{i}].name"),
                        format!("{:?} is not a valid HTTP header name", header.name),
                    ));
                }
                if header.value.bytes().any(|b| b == b'\r' || b == b'\n') {
                    return Err(self.c.err(
                        &format!("{path}.httpGet.httpHeaders[{i}].value"),
                        "must not contain line breaks",
                    ));
                }
            }
        }
        if let Some(t) = p.tcp_socket.as_ref() {
            port(&format!("{path}.tcpSocket.port"), &t.port)?;
        }
        if let Some(e) = p.exec.as_ref()
            && e.command.as_ref().is_none_or(Vec::is_empty)
        {
            return Err(self
                .c
                .err(&format!("{path}.exec.command"), "must not be empty"));
        }
        let number = |field: &str, value: &mut Option<i32>, default: i32, min: i32| {
            let v = *value.get_or_insert(default);
            if v < min {
                return Err(self
                    .c
                    .err(&format!("{path}.{field}"), format!("{v} must be >= {min}")));
            }
            Ok(v)
        };
        number("initialDelaySeconds", &mut p.initial_delay_seconds, 0, 0)?;
        number("periodSeconds", &mut p.period_seconds, 10, 1)?;
        number("timeoutSeconds", &mut p.timeout_seconds, 1, 1)?;
        number("failureThreshold", &mut p.failure_threshold, 3, 1)?;
        let success = number("successThreshold", &mut p.success_threshold, 1, 1)?;
        if single_success && success != 1 {
            return Err(self.c.err(
                &format!("{path}.successThreshold"),
                format!("{success} must be 1 for liveness and startup probes"),
            ));
        }
        Ok(())
    }

    /// Parses requests and limits, defaulting a missing request to its limit
    /// as Kubernetes does.
    fn resources(
        &self,
        path: &str,
        c: &mut Container,
    ) -> Result<ContainerResources, ManifestError> {
        let Some(res) = c.resources.as_mut() else {
            return Ok(ContainerResources::default());
        };
        let base = format!("{path}.resources");
        let limits = self.quantities(&format!("{base}.limits"), res.limits.as_ref())?;
        let mut requests = self.quantities(&format!("{base}.requests"), res.requests.as_ref())?;
        for (name, q) in res.limits.iter().flatten() {
            if let (false, Some(&limit)) = (requests.contains_key(name), limits.get(name)) {
                requests.insert(name.clone(), limit);
                res.requests
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name.clone(), q.clone());
            }
        }
        for (name, request) in &requests {
            let Some(&limit) = limits.get(name) else {
                continue;
            };
            if *request > limit {
                let text = |m: &Option<BTreeMap<String, Quantity>>| {
                    m.as_ref()
                        .and_then(|m| m.get(name))
                        .map_or(String::new(), |q| q.0.clone())
                };
                return Err(self.c.err(
                    &key_path(&format!("{base}.requests"), name),
                    format!(
                        "{:?} must be less than or equal to the {name} limit {:?}",
                        text(&res.requests),
                        text(&res.limits),
                    ),
                ));
            }
        }
        Ok(ContainerResources {
            cpu_request_millis: requests.get("cpu").copied(),
            cpu_limit_millis: limits.get("cpu").copied(),
            memory_request_bytes: requests.get("memory").copied(),
            memory_limit_bytes: limits.get("memory").copied(),
        })
    }

    /// Parses one requests or limits map; resource names other than cpu and
    /// memory are refused.
    fn quantities(
        &self,
        path: &str,
        map: Option<&BTreeMap<String, Quantity>>,
    ) -> Result<BTreeMap<String, u64>, ManifestError> {
        let mut out = BTreeMap::new();
        for (name, q) in map.into_iter().flatten() {
            let field = key_path(path, name);
            let parsed = match name.as_str() {
                "cpu" => parse_cpu_millis(&q.0),
                "memory" => parse_memory_bytes(&q.0),
                _ => {
                    return Err(self.c.err(
                        &field,
                        "not supported: weir enforces only the cpu and memory resources",
                    ));
                }
            };
            out.insert(name.clone(), parsed.map_err(|r| self.c.err(&field, r))?);
        }
        Ok(out)
    }
}

impl PodChecker<'_, '_> {
    fn field(&self, field: &str) -> String {
        format!("{}.{field}", self.path)
    }

    /// The fields the scheduler reads (cluster mode only).
    fn scheduling(&mut self, spec: &mut PodSpec) -> Result<(), ManifestError> {
        if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
            names::dns1123_subdomain(node).map_err(|r| self.c.err(&self.field("nodeName"), r))?;
        }
        self.c
            .label_map(&self.field("nodeSelector"), spec.node_selector.as_ref())?;
        for (i, t) in spec.tolerations.iter().flatten().enumerate() {
            self.toleration(&self.field(&format!("tolerations[{i}]")), t)?;
        }
        if let Some(affinity) = &spec.affinity {
            self.affinity(affinity)?;
        }
        if let Some(policy) = spec.preemption_policy.as_deref() {
            one_of(policy, &PREEMPTION_POLICIES)
                .map_err(|r| self.c.err(&self.field("preemptionPolicy"), r))?;
        }
        self.priority(spec)?;
        self.host_ports(spec)
    }

    fn priority(&mut self, spec: &mut PodSpec) -> Result<(), ManifestError> {
        let class = spec
            .priority_class_name
            .as_deref()
            .filter(|c| !c.is_empty());
        let builtin = class.and_then(|c| {
            BUILTIN_PRIORITY_CLASSES
                .iter()
                .find(|(name, _)| *name == c)
                .map(|(_, v)| *v)
        });
        match (class, builtin, spec.priority) {
            (Some(_), Some(value), None) => spec.priority = Some(value),
            (Some(name), Some(value), Some(given)) if given != value => {
                return Err(self.c.err(
                    &self.field("priority"),
                    format!(
                        "{given} does not match the value {value} of priorityClassName {name:?}"
                    ),
                ));
            }
            (Some(name), None, None) => {
                return Err(self.c.err(
                    &self.field("priorityClassName"),
                    format!(
                        "{name:?} not found: {NO_PRIORITY_CLASSES}; the known classes are system-cluster-critical and system-node-critical, or set spec.priority as well"
                    ),
                ));
            }
            (None, _, None) => spec.priority = Some(0),
            _ => {}
        }
        Ok(())
    }

    fn host_ports(&self, spec: &PodSpec) -> Result<(), ManifestError> {
        let mut seen: HashMap<(i32, &str), String> = HashMap::new();
        for (i, c) in spec.containers.iter().enumerate() {
            for (j, port) in c.ports.iter().flatten().enumerate() {
                let Some(host) = port.host_port.filter(|p| *p != 0) else {
                    continue;
                };
                let path = self.field(&format!("containers[{i}].ports[{j}].hostPort"));
                if !(1..=65535).contains(&host) {
                    return Err(self.c.err(
                        &path,
                        format!("{host} must be between 1 and 65535, inclusive"),
                    ));
                }
                let protocol = port.protocol.as_deref().unwrap_or(DEFAULT_PROTOCOL);
                if let Some(first) = seen.insert((host, protocol), path.clone()) {
                    return Err(self.c.err(
                        &path,
                        format!("duplicate host port {host}/{protocol}: {first} has it too"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn toleration(&self, path: &str, t: &Toleration) -> Result<(), ManifestError> {
        let key = t.key.as_deref().unwrap_or_default();
        let operator = t.operator.as_deref().unwrap_or("Equal");
        one_of(operator, &TOLERATION_OPERATORS)
            .map_err(|r| self.c.err(&format!("{path}.operator"), r))?;
        if key.is_empty() {
            if operator != "Exists" {
                return Err(self.c.err(
                    &format!("{path}.operator"),
                    "must be Exists when key is empty, which means \"match all values and all keys\"",
                ));
            }
        } else {
            names::qualified_name(key).map_err(|r| self.c.err(&format!("{path}.key"), r))?;
        }
        let value = t.value.as_deref().unwrap_or_default();
        if operator == "Exists" && !value.is_empty() {
            return Err(self.c.err(
                &format!("{path}.value"),
                "must be empty when operator is Exists",
            ));
        }
        names::label_value(value).map_err(|r| self.c.err(&format!("{path}.value"), r))?;
        let effect = t.effect.as_deref().unwrap_or_default();
        if !effect.is_empty() {
            one_of(effect, &TAINT_EFFECTS).map_err(|r| self.c.err(&format!("{path}.effect"), r))?;
        }
        if t.toleration_seconds.is_some() && effect != "NoExecute" {
            return Err(self.c.err(
                &format!("{path}.effect"),
                "must be NoExecute when tolerationSeconds is set",
            ));
        }
        Ok(())
    }

    fn affinity(&self, a: &Affinity) -> Result<(), ManifestError> {
        let base = self.field("affinity");
        if let Some(node) = &a.node_affinity {
            let path = format!("{base}.nodeAffinity");
            if let Some(required) = &node.required_during_scheduling_ignored_during_execution {
                let p = format!(
                    "{path}.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
                );
                if required.node_selector_terms.is_empty() {
                    return Err(self.c.err(&p, "must have at least one node selector term"));
                }
                for (i, term) in required.node_selector_terms.iter().enumerate() {
                    self.node_selector_term(&format!("{p}[{i}]"), term)?;
                }
            }
            let preferred = node
                .preferred_during_scheduling_ignored_during_execution
                .iter()
                .flatten();
            for (i, term) in preferred.enumerate() {
                let p = format!("{path}.preferredDuringSchedulingIgnoredDuringExecution[{i}]");
                self.weight(&p, term.weight)?;
                self.node_selector_term(&format!("{p}.preference"), &term.preference)?;
            }
        }
        let pod_affinities = [
            (
                "podAffinity",
                a.pod_affinity.as_ref().map(|p| {
                    (
                        &p.required_during_scheduling_ignored_during_execution,
                        &p.preferred_during_scheduling_ignored_during_execution,
                    )
                }),
            ),
            (
                "podAntiAffinity",
                a.pod_anti_affinity.as_ref().map(|p| {
                    (
                        &p.required_during_scheduling_ignored_during_execution,
                        &p.preferred_during_scheduling_ignored_during_execution,
                    )
                }),
            ),
        ];
        for (name, terms) in pod_affinities {
            let Some((required, preferred)) = terms else {
                continue;
            };
            let path = format!("{base}.{name}");
            for (i, term) in required.iter().flatten().enumerate() {
                self.pod_affinity_term(
                    &format!("{path}.requiredDuringSchedulingIgnoredDuringExecution[{i}]"),
                    term,
                )?;
            }
            for (i, term) in preferred.iter().flatten().enumerate() {
                let p = format!("{path}.preferredDuringSchedulingIgnoredDuringExecution[{i}]");
                self.weight(&p, term.weight)?;
                self.pod_affinity_term(&format!("{p}.podAffinityTerm"), &term.pod_affinity_term)?;
            }
        }
        Ok(())
    }

    fn weight(&self, path: &str, weight: i32) -> Result<(), ManifestError> {
        if (1..=100).contains(&weight) {
            Ok(())
        } else {
            Err(self.c.err(
                &format!("{path}.weight"),
                format!("{weight} must be in the range 1-100"),
            ))
        }
    }

    fn node_selector_term(&self, path: &str, term: &NodeSelectorTerm) -> Result<(), ManifestError> {
        for (i, e) in term.match_expressions.iter().flatten().enumerate() {
            let p = format!("{path}.matchExpressions[{i}]");
            names::qualified_name(&e.key).map_err(|r| self.c.err(&format!("{p}.key"), r))?;
            one_of(&e.operator, &NODE_OPERATORS)
                .map_err(|r| self.c.err(&format!("{p}.operator"), r))?;
            let values = e.values.as_deref().unwrap_or_default();
            let problem = match (e.operator.as_str(), values.len()) {
                ("In" | "NotIn", 0) => {
                    Some("must be specified when operator is In or NotIn".to_owned())
                }
                ("Exists" | "DoesNotExist", n) if n > 0 => {
                    Some("may not be specified when operator is Exists or DoesNotExist".to_owned())
                }
                ("Gt" | "Lt", n) if n != 1 => {
                    Some("must be exactly one integer when operator is Gt or Lt".to_owned())
                }
                ("Gt" | "Lt", _) if values[0].parse::<i64>().is_err() => Some(format!(
                    "{:?} must be an integer for operator {}",
                    values[0], e.operator
                )),
                _ => None,
            };
            if let Some(reason) = problem {
                return Err(self.c.err(&format!("{p}.values"), reason));
            }
        }
        for (i, f) in term.match_fields.iter().flatten().enumerate() {
            let p = format!("{path}.matchFields[{i}]");
            if f.key != "metadata.name" {
                return Err(self.c.err(
                    &format!("{p}.key"),
                    format!("unsupported value {:?}: must be \"metadata.name\"", f.key),
                ));
            }
            one_of(&f.operator, &["In", "NotIn"])
                .map_err(|r| self.c.err(&format!("{p}.operator"), r))?;
            if f.values.as_ref().is_none_or(|v| v.len() != 1) {
                return Err(self
                    .c
                    .err(&format!("{p}.values"), "must have exactly one node name"));
            }
        }
        Ok(())
    }

    fn pod_affinity_term(&self, path: &str, term: &PodAffinityTerm) -> Result<(), ManifestError> {
        if let Some(selector) = &term.label_selector {
            self.c
                .label_selector(&format!("{path}.labelSelector"), selector, true)?;
        }
        for (i, ns) in term.namespaces.iter().flatten().enumerate() {
            names::dns1123_label(ns)
                .map_err(|r| self.c.err(&format!("{path}.namespaces[{i}]"), r))?;
        }
        if term.topology_key.is_empty() {
            return Err(self.c.err(&format!("{path}.topologyKey"), "required"));
        }
        names::qualified_name(&term.topology_key)
            .map_err(|r| self.c.err(&format!("{path}.topologyKey"), r))
    }
}
