//! The kinds the API serves, their store keys, and how a manifest of each
//! is validated and defaulted (metadata and spec only; status is dropped).

use serde_json::{Map, Value};

use super::ApiError;

/// A kind the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `v1` Namespace (cluster-scoped).
    Namespace,
    /// `v1` Pod (namespaced).
    Pod,
    /// `apps/v1` `ReplicaSet` (namespaced).
    ReplicaSet,
    /// `apps/v1` Deployment (namespaced).
    Deployment,
    /// `apps/v1` `DaemonSet` (namespaced).
    DaemonSet,
    /// `v1` Node (cluster-scoped).
    Node,
    /// `v1` Event (namespaced).
    Event,
    /// `v1` Service (namespaced).
    Service,
    /// `discovery.k8s.io/v1` `EndpointSlice` (namespaced).
    EndpointSlice,
    /// `networking.k8s.io/v1` `NetworkPolicy` (namespaced).
    NetworkPolicy,
    /// `autoscaling/v2` `HorizontalPodAutoscaler` (namespaced).
    HorizontalPodAutoscaler,
}

/// A validated manifest: the object (metadata and spec, no status), the
/// warnings for fields accepted but ignored, and the resource version the
/// writer read (`metadata.resourceVersion`, taken out of the object).
#[derive(Debug)]
pub struct Validated {
    /// The defaulted object as JSON.
    pub object: Map<String, Value>,
    /// One line per ignored field.
    pub warnings: Vec<String>,
    /// `metadata.resourceVersion` of the manifest, if it had one: the
    /// write must then be to exactly that version.
    pub resource_version: Option<u64>,
}

impl Validated {
    /// Takes `metadata.resourceVersion` out of `object` (it is the store's
    /// revision, never stored) and parses it.
    fn new(
        source: &str,
        mut object: Map<String, Value>,
        warnings: Vec<String>,
    ) -> Result<Self, ApiError> {
        let rv = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .and_then(|m| m.remove("resourceVersion"));
        let resource_version = match rv {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.parse::<u64>().map_err(|_| {
                ApiError::Invalid(format!(
                    "{source}: metadata.resourceVersion: {s:?} is not a resource version weir gave out"
                ))
            })?),
            Some(other) => {
                return Err(ApiError::Invalid(format!(
                    "{source}: metadata.resourceVersion: must be a string, got {other}"
                )));
            }
        };
        Ok(Self {
            object,
            warnings,
            resource_version,
        })
    }
}

impl Kind {
    /// Every kind, in the order `weirctl get all` lists them.
    pub const ALL: [Self; 11] = [
        Self::Pod,
        Self::Service,
        Self::ReplicaSet,
        Self::Deployment,
        Self::DaemonSet,
        Self::Node,
        Self::Namespace,
        Self::Event,
        Self::EndpointSlice,
        Self::NetworkPolicy,
        Self::HorizontalPodAutoscaler,
    ];

    /// Looks up a kind by its `kind` field.
    pub fn from_name(kind: &str) -> Result<Self, ApiError> {
        if kind.is_empty() {
            return Err(ApiError::Invalid("kind: required".to_owned()));
        }
        Self::ALL
            .into_iter()
            .find(|k| k.name() == kind)
            .ok_or_else(|| ApiError::Invalid(format!("kind {kind} is not supported")))
    }

    /// The `kind` field.
    pub fn name(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::ReplicaSet => "ReplicaSet",
            Self::Deployment => "Deployment",
            Self::DaemonSet => "DaemonSet",
            Self::Node => "Node",
            Self::Event => "Event",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::HorizontalPodAutoscaler => "HorizontalPodAutoscaler",
        }
    }

    /// The API group (`core` for v1 kinds), as in keys.
    pub fn group(self) -> &'static str {
        match self {
            Self::ReplicaSet | Self::Deployment | Self::DaemonSet => "apps",
            Self::Namespace | Self::Pod | Self::Node | Self::Event | Self::Service => "core",
            Self::EndpointSlice => "discovery.k8s.io",
            Self::NetworkPolicy => "networking.k8s.io",
            Self::HorizontalPodAutoscaler => "autoscaling",
        }
    }

    /// The `apiVersion` field.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::ReplicaSet | Self::Deployment | Self::DaemonSet => "apps/v1",
            Self::Namespace | Self::Pod | Self::Node | Self::Event | Self::Service => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::NetworkPolicy => "networking.k8s.io/v1",
            Self::HorizontalPodAutoscaler => "autoscaling/v2",
        }
    }

    /// The lower-case plural, as in keys and Kubernetes' messages.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Namespace => "namespaces",
            Self::Pod => "pods",
            Self::ReplicaSet => "replicasets",
            Self::Deployment => "deployments",
            Self::DaemonSet => "daemonsets",
            Self::Node => "nodes",
            Self::Event => "events",
            Self::Service => "services",
            Self::EndpointSlice => "endpointslices",
            Self::NetworkPolicy => "networkpolicies",
            Self::HorizontalPodAutoscaler => "horizontalpodautoscalers",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Namespace | Self::Node)
    }

    /// Checks an `apiVersion` given alongside this kind (empty: the default).
    pub fn check_api_version(self, api_version: &str) -> Result<(), ApiError> {
        if api_version.is_empty() || api_version == self.api_version() {
            Ok(())
        } else {
            Err(ApiError::Invalid(format!(
                "apiVersion: {api_version:?} is not valid for kind {}: expected {:?}",
                self.name(),
                self.api_version()
            )))
        }
    }

    /// The key of one object: `/<group>/<plural>/<namespace>/<name>` or
    /// `/<group>/<plural>/<name>`. `namespace` is checked to be empty for
    /// cluster-scoped kinds and defaults to `default` for namespaced ones.
    pub fn key(self, namespace: &str, name: &str) -> Result<String, ApiError> {
        check_segment("name", name)?;
        if self.namespaced() {
            let namespace = if namespace.is_empty() {
                "default"
            } else {
                namespace
            };
            check_segment("namespace", namespace)?;
            Ok(format!(
                "/{}/{}/{namespace}/{name}",
                self.group(),
                self.plural()
            ))
        } else {
            self.check_no_namespace(namespace)?;
            Ok(format!("/{}/{}/{name}", self.group(), self.plural()))
        }
    }

    /// The prefix that lists this kind, in one namespace or (empty) all.
    pub fn prefix(self, namespace: &str) -> Result<String, ApiError> {
        if namespace.is_empty() {
            return Ok(format!("/{}/{}/", self.group(), self.plural()));
        }
        if !self.namespaced() {
            self.check_no_namespace(namespace)?;
        }
        check_segment("namespace", namespace)?;
        Ok(format!("/{}/{}/{namespace}/", self.group(), self.plural()))
    }

    fn check_no_namespace(self, namespace: &str) -> Result<(), ApiError> {
        if namespace.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Invalid(format!(
                "namespace: {} is cluster-scoped, got namespace {namespace:?}",
                self.plural()
            )))
        }
    }

    /// Validates and defaults a manifest of this kind; `source` names it in
    /// errors (`<source>: <field>: <reason>`).
    pub fn validate(self, source: &str, doc: &Value) -> Result<Validated, ApiError> {
        use weir_proto::manifest as m;
        let invalid = |e: m::ManifestError| ApiError::Invalid(e.to_string());
        let (object, warnings) = match self {
            Self::Pod => {
                let v = m::validate_cluster_pod(source, doc).map_err(invalid)?;
                (to_map(self, &v.pod)?, v.warnings)
            }
            Self::Namespace => return validate_namespace(source, doc),
            Self::ReplicaSet => {
                typed(self, m::validate_replica_set(source, doc).map_err(invalid)?)?
            }
            Self::Deployment => typed(self, m::validate_deployment(source, doc).map_err(invalid)?)?,
            Self::DaemonSet => typed(self, m::validate_daemon_set(source, doc).map_err(invalid)?)?,
            Self::Node => typed(self, m::validate_node(source, doc).map_err(invalid)?)?,
            Self::Event => typed(self, m::validate_event(source, doc).map_err(invalid)?)?,
            Self::Service => typed(self, m::validate_service(source, doc).map_err(invalid)?)?,
            Self::EndpointSlice => typed(
                self,
                m::validate_endpoint_slice(source, doc).map_err(invalid)?,
            )?,
            Self::NetworkPolicy => typed(
                self,
                m::validate_network_policy(source, doc).map_err(invalid)?,
            )?,
            Self::HorizontalPodAutoscaler => typed(
                self,
                m::validate_horizontal_pod_autoscaler(source, doc).map_err(invalid)?,
            )?,
        };
        Validated::new(source, object, warnings)
    }

    /// Checks a status of this kind has the shape k8s-openapi reads.
    pub fn check_status(self, status: &Value) -> Result<(), ApiError> {
        use k8s_openapi::api::apps::v1::{DaemonSetStatus, DeploymentStatus, ReplicaSetStatus};
        use k8s_openapi::api::core::v1::{NamespaceStatus, NodeStatus, PodStatus, ServiceStatus};
        let checked = match self {
            Self::Pod => serde_json::from_value::<PodStatus>(status.clone()).map(drop),
            Self::Namespace => serde_json::from_value::<NamespaceStatus>(status.clone()).map(drop),
            Self::ReplicaSet => {
                serde_json::from_value::<ReplicaSetStatus>(status.clone()).map(drop)
            }
            Self::Deployment => {
                serde_json::from_value::<DeploymentStatus>(status.clone()).map(drop)
            }
            Self::DaemonSet => serde_json::from_value::<DaemonSetStatus>(status.clone()).map(drop),
            Self::Node => serde_json::from_value::<NodeStatus>(status.clone()).map(drop),
            Self::Service => serde_json::from_value::<ServiceStatus>(status.clone()).map(drop),
            Self::Event | Self::EndpointSlice => Ok(()),
            Self::NetworkPolicy => Err(serde::de::Error::custom("a NetworkPolicy has no status")),
            Self::HorizontalPodAutoscaler => serde_json::from_value::<
                k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerStatus,
            >(status.clone())
            .map(drop),
        };
        checked.map_err(|e| ApiError::Invalid(format!("status: {e}")))
    }
}

fn typed<T: serde::Serialize>(
    kind: Kind,
    valid: weir_proto::manifest::Valid<T>,
) -> Result<(Map<String, Value>, Vec<String>), ApiError> {
    Ok((to_map(kind, &valid.object)?, valid.warnings))
}

/// A validated k8s-openapi object as stored JSON, without `status`.
fn to_map<T: serde::Serialize>(kind: Kind, object: &T) -> Result<Map<String, Value>, ApiError> {
    match serde_json::to_value(object) {
        Ok(Value::Object(mut map)) => {
            map.remove("status");
            Ok(map)
        }
        Ok(other) => Err(ApiError::Internal(format!(
            "{} serialised to a non-object: {other}",
            kind.name()
        ))),
        Err(e) => Err(ApiError::Internal(format!(
            "serialise {}: {e}",
            kind.name()
        ))),
    }
}

/// A name or namespace must be non-empty and must not split the key.
fn check_segment(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        Err(ApiError::Invalid(format!("{field}: required")))
    } else if !is_dns_subdomain(value) {
        Err(ApiError::Invalid(format!(
            "{field}: {value:?} must be a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.')"
        )))
    } else {
        Ok(())
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Server-set metadata a manifest may carry (e.g. from a previous Get);
/// dropped, as the Pod table does.
const SERVER_SET: &[&str] = &[
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "managedFields",
    "selfLink",
];

/// Namespace manifests: `metadata.{name,labels,annotations}` used,
/// `spec.finalizers` kept, server-set metadata and `status` dropped,
/// anything else refused.
fn validate_namespace(source: &str, doc: &Value) -> Result<Validated, ApiError> {
    let invalid =
        |field: &str, reason: &str| ApiError::Invalid(format!("{source}: {field}: {reason}"));
    let Value::Object(map) = doc else {
        return Err(ApiError::Invalid(format!(
            "{source}: a document must be a mapping with apiVersion, kind, metadata and spec"
        )));
    };
    if map.get("apiVersion").and_then(Value::as_str) != Some("v1") {
        return Err(invalid("apiVersion", "expected \"v1\" for kind Namespace"));
    }
    let mut warnings = Vec::new();
    let mut object = Map::new();
    object.insert("apiVersion".to_owned(), Value::from("v1"));
    object.insert("kind".to_owned(), Value::from("Namespace"));
    for field in map.keys() {
        match field.as_str() {
            "apiVersion" | "kind" | "metadata" | "spec" => {}
            "status" => warnings.push(format!(
                "{source}: status: ignored: status is reported by weir, not read from manifests"
            )),
            other => return Err(invalid(other, "unknown field")),
        }
    }
    let Some(Value::Object(meta_in)) = map.get("metadata") else {
        return Err(invalid("metadata", "required (a mapping)"));
    };
    let mut meta = Map::new();
    for (field, value) in meta_in {
        let path = format!("metadata.{field}");
        match field.as_str() {
            "name" => {
                let Some(name) = value.as_str() else {
                    return Err(invalid(&path, "must be a string"));
                };
                if !is_dns_label(name) {
                    return Err(invalid(
                        &path,
                        &format!(
                            "{name:?} must be a DNS-1123 label (at most 63 lower-case alphanumerics or '-')"
                        ),
                    ));
                }
                meta.insert(field.clone(), value.clone());
            }
            "labels" | "annotations" => {
                string_map(source, &path, field == "labels", value)?;
                meta.insert(field.clone(), value.clone());
            }
            "namespace" => return Err(invalid(&path, "namespaces are cluster-scoped")),
            "resourceVersion" => {
                meta.insert(field.clone(), value.clone());
            }
            f if SERVER_SET.contains(&f) => {}
            _ => return Err(invalid(&path, "unknown field")),
        }
    }
    let Some(name) = meta.get("name").cloned() else {
        return Err(invalid("metadata.name", "required"));
    };
    set_name_label(&mut meta, name);
    object.insert("metadata".to_owned(), Value::Object(meta));
    if let Some(spec) = map.get("spec") {
        let Value::Object(spec_map) = spec else {
            return Err(invalid("spec", "must be a mapping"));
        };
        for (field, value) in spec_map {
            match field.as_str() {
                "finalizers" => {
                    let ok = value
                        .as_array()
                        .is_some_and(|a| a.iter().all(Value::is_string));
                    if !ok {
                        return Err(invalid("spec.finalizers", "must be a list of strings"));
                    }
                    warnings.push(format!(
                        "{source}: spec.finalizers: ignored: weir does not process finalizers yet; kept but not acted on"
                    ));
                }
                other => return Err(invalid(&format!("spec.{other}"), "unknown field")),
            }
        }
        object.insert("spec".to_owned(), spec.clone());
    }
    Validated::new(source, object, warnings)
}

/// The label every namespace carries with its own name, as Kubernetes sets
/// it (network policies select namespaces by it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Sets [`NAMESPACE_NAME_LABEL`] in a namespace's metadata to `name`,
/// whatever the manifest said (Kubernetes' defaulting does the same).
pub(super) fn set_name_label(meta: &mut Map<String, Value>, name: Value) {
    let labels = meta
        .entry("labels")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(labels) = labels.as_object_mut() {
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name);
    }
}

/// Namespace labels or annotations: a map of strings to strings; labels
/// also with the selector grammar's key and value rules.
fn string_map(source: &str, path: &str, labels: bool, value: &Value) -> Result<(), ApiError> {
    let invalid = |reason: &str| ApiError::Invalid(format!("{source}: {path}: {reason}"));
    let Some(map) = value
        .as_object()
        .filter(|m| m.values().all(Value::is_string))
    else {
        return Err(invalid("must be a map of strings to strings"));
    };
    if labels {
        let text = map
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(",");
        super::selector::Selector::parse(&text).map_err(|e| invalid(&e.reason))?;
    }
    Ok(())
}
