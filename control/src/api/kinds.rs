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
}

/// A validated manifest: the object (metadata and spec, no status) and the
/// warnings for fields accepted but ignored.
#[derive(Debug)]
pub struct Validated {
    /// The defaulted object as JSON.
    pub object: Map<String, Value>,
    /// One line per ignored field.
    pub warnings: Vec<String>,
}

impl Kind {
    /// Every kind, in the order `weirctl get all` lists them.
    pub const ALL: [Self; 7] = [
        Self::Pod,
        Self::ReplicaSet,
        Self::Deployment,
        Self::DaemonSet,
        Self::Node,
        Self::Namespace,
        Self::Event,
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
        }
    }

    /// The API group (`core` for v1 kinds), as in keys.
    pub fn group(self) -> &'static str {
        match self {
            Self::ReplicaSet | Self::Deployment | Self::DaemonSet => "apps",
            Self::Namespace | Self::Pod | Self::Node | Self::Event => "core",
        }
    }

    /// The `apiVersion` field.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::ReplicaSet | Self::Deployment | Self::DaemonSet => "apps/v1",
            Self::Namespace | Self::Pod | Self::Node | Self::Event => "v1",
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
        match self {
            Self::Pod => {
                let valid = weir_proto::manifest::validate_pod(source, doc)
                    .map_err(|e| ApiError::Invalid(e.to_string()))?;
                let object = match serde_json::to_value(&valid.pod) {
                    Ok(Value::Object(map)) => map,
                    Ok(other) => {
                        return Err(ApiError::Internal(format!(
                            "pod serialised to a non-object: {other}"
                        )));
                    }
                    Err(e) => return Err(ApiError::Internal(format!("serialise pod: {e}"))),
                };
                Ok(Validated {
                    object,
                    warnings: valid.warnings,
                })
            }
            Self::Namespace => validate_namespace(source, doc),
            Self::ReplicaSet => {
                passthrough::<k8s_openapi::api::apps::v1::ReplicaSet>(self, source, doc)
            }
            Self::Deployment => {
                passthrough::<k8s_openapi::api::apps::v1::Deployment>(self, source, doc)
            }
            Self::DaemonSet => {
                passthrough::<k8s_openapi::api::apps::v1::DaemonSet>(self, source, doc)
            }
            Self::Node => passthrough::<k8s_openapi::api::core::v1::Node>(self, source, doc),
            Self::Event => passthrough::<k8s_openapi::api::core::v1::Event>(self, source, doc),
        }
    }

    /// Checks a status of this kind has the shape k8s-openapi reads.
    pub fn check_status(self, status: &Value) -> Result<(), ApiError> {
        use k8s_openapi::api::apps::v1::{DaemonSetStatus, DeploymentStatus, ReplicaSetStatus};
        use k8s_openapi::api::core::v1::{NamespaceStatus, NodeStatus, PodStatus};
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
            Self::Event => Ok(()),
        };
        checked.map_err(|e| ApiError::Invalid(format!("status: {e}")))
    }
}

/// Interim validation for kinds without a table yet: the manifest must
/// parse as the k8s-openapi type; it is stored as that type serialises,
/// without `status`.
fn passthrough<T>(kind: Kind, source: &str, doc: &Value) -> Result<Validated, ApiError>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_json::from_value(doc.clone())
        .map_err(|e| ApiError::Invalid(format!("{source}: {e}")))?;
    let Value::Object(mut object) = serde_json::to_value(&typed)
        .map_err(|e| ApiError::Internal(format!("serialise {}: {e}", kind.name())))?
    else {
        return Err(ApiError::Internal(format!(
            "{} serialised to a non-object",
            kind.name()
        )));
    };
    object.remove("status");
    Ok(Validated {
        object,
        warnings: Vec::new(),
    })
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
                let ok = value
                    .as_object()
                    .is_some_and(|m| m.values().all(Value::is_string));
                if !ok {
                    return Err(invalid(&path, "must be a map of strings to strings"));
                }
                if field == "labels" {
                    let labels = value
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    // Reuse the selector grammar's key and value rules.
                    super::selector::Selector::parse(&labels)
                        .map_err(|e| invalid(&path, &e.reason))?;
                }
                meta.insert(field.clone(), value.clone());
            }
            "namespace" => return Err(invalid(&path, "namespaces are cluster-scoped")),
            f if SERVER_SET.contains(&f) => {}
            _ => return Err(invalid(&path, "unknown field")),
        }
    }
    if !meta.contains_key("name") {
        return Err(invalid("metadata.name", "required"));
    }
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
    Ok(Validated { object, warnings })
}
