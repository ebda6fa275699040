//! Checks on the values of a typed Pod (names, ports, resources) and the
//! Kubernetes defaults weir applies. Runs after the table walk, so every
//! field seen here is one weir uses and has the right JSON shape.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::names;
use super::quantity::{parse_cpu_millis, parse_memory_bytes};
use super::{ContainerResources, ManifestError, key_path};

const DEFAULT_NAMESPACE: &str = "default";
const DEFAULT_RESTART_POLICY: &str = "Always";
const DEFAULT_GRACE_SECONDS: i64 = 30;
const DEFAULT_PROTOCOL: &str = "TCP";
const RESTART_POLICIES: [&str; 3] = ["Always", "OnFailure", "Never"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
/// Kubernetes' `TotalAnnotationSizeLimitB`.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

struct Checker<'a> {
    file: &'a str,
    warnings: &'a mut Vec<String>,
}

/// Checks `pod` and fills in the defaults; returns the parsed resources of
/// each container, in order.
pub(super) fn check_and_default(
    file: &str,
    pod: &mut Pod,
    warnings: &mut Vec<String>,
) -> Result<Vec<ContainerResources>, ManifestError> {
    let mut c = Checker { file, warnings };
    c.metadata(pod)?;
    let spec = pod.spec.as_mut().ok_or_else(|| c.err("spec", "required"))?;
    c.spec(spec)
}

impl Checker<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            file: self.file.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    fn metadata(&self, pod: &mut Pod) -> Result<(), ManifestError> {
        let meta = &mut pod.metadata;
        let name = meta.name.as_deref().unwrap_or_default();
        names::dns1123_subdomain(name).map_err(|r| self.err("metadata.name", r))?;
        match meta.namespace.as_deref() {
            None | Some("") => meta.namespace = Some(DEFAULT_NAMESPACE.to_owned()),
            Some(ns) => names::dns1123_label(ns).map_err(|r| self.err("metadata.namespace", r))?,
        }
        for (key, value) in meta.labels.iter().flatten() {
            let path = key_path("metadata.labels", key);
            names::qualified_name(key).map_err(|r| self.err(&path, format!("invalid key: {r}")))?;
            names::label_value(value).map_err(|r| self.err(&path, r))?;
        }
        let mut total = 0;
        for (key, value) in meta.annotations.iter().flatten() {
            let path = key_path("metadata.annotations", key);
            names::qualified_name(key).map_err(|r| self.err(&path, format!("invalid key: {r}")))?;
            total += key.len() + value.len();
        }
        if total > ANNOTATIONS_MAX_BYTES {
            return Err(self.err(
                "metadata.annotations",
                format!("{total} bytes in total, more than the {ANNOTATIONS_MAX_BYTES} Kubernetes allows"),
            ));
        }
        Ok(())
    }

    fn spec(&mut self, spec: &mut PodSpec) -> Result<Vec<ContainerResources>, ManifestError> {
        if spec.containers.is_empty() {
            return Err(self.err("spec.containers", "must contain at least one container"));
        }
        match spec.restart_policy.as_deref() {
            None => spec.restart_policy = Some(DEFAULT_RESTART_POLICY.to_owned()),
            Some(p) => {
                one_of(p, &RESTART_POLICIES).map_err(|r| self.err("spec.restartPolicy", r))?;
            }
        }
        match spec.termination_grace_period_seconds {
            None => spec.termination_grace_period_seconds = Some(DEFAULT_GRACE_SECONDS),
            Some(s) if s < 0 => {
                return Err(self.err(
                    "spec.terminationGracePeriodSeconds",
                    format!("{s} must be >= 0"),
                ));
            }
            Some(_) => {}
        }
        if let Some(os) = spec.os.as_ref().filter(|os| os.name != "linux") {
            return Err(self.err(
                "spec.os.name",
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
            let path = format!("spec.containers[{i}]");
            if !container_names.insert(container.name.clone()) {
                return Err(self.err(
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
        names::dns1123_label(&c.name).map_err(|r| self.err(&format!("{path}.name"), r))?;
        let image = c.image.as_deref().unwrap_or_default();
        if image.is_empty() {
            return Err(self.err(&format!("{path}.image"), "required"));
        }
        if image.trim() != image {
            return Err(self.err(
                &format!("{path}.image"),
                format!("{image:?} must not have leading or trailing whitespace"),
            ));
        }
        if let Some(dir) = c
            .working_dir
            .as_deref()
            .filter(|d| !d.is_empty() && !d.starts_with('/'))
        {
            return Err(self.err(
                &format!("{path}.workingDir"),
                format!("{dir:?} must be an absolute path"),
            ));
        }
        for (j, env) in c.env.iter().flatten().enumerate() {
            names::env_var_name(&env.name)
                .map_err(|r| self.err(&format!("{path}.env[{j}].name"), r))?;
        }

        let mut port_names = HashSet::new();
        for (j, port) in c.ports.iter_mut().flatten().enumerate() {
            let port_path = format!("{path}.ports[{j}]");
            if !(1..=65535).contains(&port.container_port) {
                return Err(self.err(
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
                .map_err(|r| self.err(&format!("{port_path}.protocol"), r))?;
            if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                names::iana_svc_name(name)
                    .map_err(|r| self.err(&format!("{port_path}.name"), r))?;
                if !port_names.insert(name.to_owned()) {
                    return Err(self.err(
                        &format!("{port_path}.name"),
                        format!("duplicate port name {name:?}"),
                    ));
                }
            }
            let key = (port.container_port, protocol.clone());
            if let Some(first) = ports_seen.get(&key) {
                self.warnings.push(format!(
                    "{}: {port_path}: duplicate port definition with {first}: the containers of a pod share one network namespace",
                    self.file
                ));
            } else {
                ports_seen.insert(key, port_path);
            }
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
                return Err(self.err(
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
                    return Err(self.err(
                        &field,
                        "not supported: weir enforces only the cpu and memory resources",
                    ));
                }
            };
            out.insert(name.clone(), parsed.map_err(|r| self.err(&field, r))?);
        }
        Ok(out)
    }
}

fn one_of(value: &str, allowed: &[&str]) -> Result<(), String> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        let list = allowed
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        Err(format!(
            "unsupported value {value:?}: must be one of {list}"
        ))
    }
}
