//! Manifest parsing and validation: Kubernetes-shaped YAML in, validated
//! k8s-openapi objects out (Pod, `ReplicaSet`, Deployment, `DaemonSet`, Node,
//! Event, Service, `EndpointSlice`, `NetworkPolicy`, `HorizontalPodAutoscaler`).
//!
//! A document goes through three steps. The raw JSON is walked against its
//! kind's field table (rendered for the README by [`field_table_markdown`]):
//! every field is used, accepted with a warning, or refused with a reason,
//! and a field Kubernetes does not know is refused (k8s-openapi would
//! silently ignore it). Then the JSON becomes the k8s-openapi type, and its
//! values are checked (names, ports, quantities, selectors) and defaulted as
//! Kubernetes does. A workload's pod template goes through the Pod's own
//! table and checks, with paths such as `spec.template.spec.containers[0].image`.

mod apps;
mod check;
mod fields;
mod hpa;
mod names;
mod netpol;
mod netpol_fields;
mod node;
mod pod;
mod quantity;
mod service;
mod service_fields;
mod table;
mod walk;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Event, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use check::selector_matches;
pub use hpa::{DEFAULT_CPU_UTILIZATION, SCALABLE_KINDS, default_rules as hpa_default_rules};
pub use names::{dns1123_label, dns1123_subdomain};
pub use quantity::{parse_cpu_millis, parse_memory_bytes};
pub use service::{DEFAULT_AFFINITY_TIMEOUT, MAX_ENDPOINTS, NODE_PORT_RANGE};
pub use table::{FieldClass, FieldRule, Inert, Part, Shape, Table};

use check::Checker;
use pod::Mode;

/// The refusal for any kind other than Pod.
const POD_ONLY: &str = "is not supported here (weir-agent standalone mode runs Pods)";

/// One validated object of a kind other than Pod, plus the warnings for
/// fields weir accepts but ignores.
#[derive(Debug, Clone)]
pub struct Valid<T> {
    /// The object with Kubernetes defaults applied and `status` dropped.
    pub object: T,
    /// One line per ignored field: `<source>: <field>: ignored: <why>`.
    pub warnings: Vec<String>,
}

/// One parsed, validated Pod plus the warnings for fields weir accepts but ignores.
#[derive(Debug, Clone)]
pub struct ValidPod {
    /// The Pod with Kubernetes defaults applied and `status` dropped.
    pub pod: Pod,
    /// One line per ignored field: `<source>: <field>: ignored: <why>`.
    pub warnings: Vec<String>,
    /// Parsed resources of each container, in the order of `spec.containers`.
    pub limits: Vec<ContainerResources>,
}

/// Parsed resources of one container (same order as spec.containers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerResources {
    /// `requests.cpu` in millicores (defaulted to the limit when only that is set).
    pub cpu_request_millis: Option<u64>,
    /// `limits.cpu` in millicores.
    pub cpu_limit_millis: Option<u64>,
    /// `requests.memory` in bytes (defaulted to the limit when only that is set).
    pub memory_request_bytes: Option<u64>,
    /// `limits.memory` in bytes.
    pub memory_limit_bytes: Option<u64>,
}

/// Why a manifest was refused. Display is one line: `<source>: <field>: <reason>`.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The text is not valid YAML.
    #[error("{file}: invalid YAML: {reason}")]
    Yaml {
        /// The file name given by the caller.
        file: String,
        /// The parser's message, on one line.
        reason: String,
    },
    /// A document as a whole is unusable (not a mapping, or not a Pod k8s-openapi reads).
    #[error("{file}: {reason}")]
    Document {
        /// The file name given by the caller, with the document number when there are several.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// One field is refused.
    #[error("{file}: {field}: {reason}")]
    Invalid {
        /// The file name given by the caller, with the document number when there are several.
        file: String,
        /// Kubernetes-style field path, e.g. `spec.containers[1].ports[0].containerPort`.
        field: String,
        /// What is wrong and, where it helps, what to write instead.
        reason: String,
    },
}

/// Split a (possibly multi-document, `---` separated) YAML text into JSON
/// values; empty documents skipped. `source` is the file name used in errors.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Value>, ManifestError> {
    let options = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_multiple_with_options::<Value>(text, options).map_err(|e| {
        ManifestError::Yaml {
            file: source.to_owned(),
            reason: e
                .to_string()
                // Advice to the programmer, not to whoever wrote the manifest.
                .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        }
    })
}

/// Validate one document that must be `apiVersion: v1`, `kind: Pod`, as
/// weir-agent's standalone mode runs it (the scheduling fields are ignored
/// with a warning), and apply Kubernetes defaulting (namespace `default`,
/// restartPolicy `Always`, terminationGracePeriodSeconds 30, port protocol
/// `TCP`, requests from limits). Defaults of ignored fields (dnsPolicy,
/// imagePullPolicy, ...) are not applied.
pub fn validate_pod(source: &str, doc: &Value) -> Result<ValidPod, ManifestError> {
    // Kind first, so a Deployment is refused as such rather than field by field.
    if let Some(Value::String(kind)) = doc.get("kind").filter(|k| doc.is_object() && *k != "Pod") {
        return Err(ManifestError::Invalid {
            file: source.to_owned(),
            field: "kind".to_owned(),
            reason: format!("kind {kind} {POD_ONLY}"),
        });
    }
    pod_in(source, doc, Mode::Standalone)
}

/// Validate a Pod as weir-control stores it: like [`validate_pod`], but the
/// scheduling fields (nodeName, nodeSelector, affinity, tolerations,
/// priority, hostPort) are used and checked, `spec.priority` defaults to 0
/// (or the built-in class's value), and `metadata.resourceVersion` and
/// `metadata.ownerReferences` are kept.
pub fn validate_cluster_pod(source: &str, doc: &Value) -> Result<ValidPod, ManifestError> {
    pod_in(source, doc, Mode::Cluster)
}

fn pod_in(source: &str, doc: &Value, mode: Mode) -> Result<ValidPod, ManifestError> {
    let table = match mode {
        Mode::Cluster => &fields::POD,
        Mode::Standalone => &fields::POD_STANDALONE,
    };
    let (mut pod, mut warnings) = typed::<Pod>(source, doc, table, "v1")?;
    let mut c = Checker {
        file: source,
        warnings: &mut warnings,
    };
    let limits = pod::check_and_default(&mut c, &mut pod, mode)?;
    Ok(ValidPod {
        pod,
        warnings,
        limits,
    })
}

/// Validate an `apps/v1` `ReplicaSet` and apply Kubernetes defaulting
/// (replicas 1, minReadySeconds 0, and the Pod defaults in the template).
pub fn validate_replica_set(source: &str, doc: &Value) -> Result<Valid<ReplicaSet>, ManifestError> {
    validate_with(
        source,
        doc,
        &fields::REPLICA_SET,
        "apps/v1",
        apps::replica_set,
    )
}

/// Validate an `apps/v1` Deployment and apply Kubernetes defaulting
/// (replicas 1, strategy `RollingUpdate` with maxSurge and maxUnavailable
/// 25%, revisionHistoryLimit 10, progressDeadlineSeconds 600,
/// minReadySeconds 0, and the Pod defaults in the template).
pub fn validate_deployment(source: &str, doc: &Value) -> Result<Valid<Deployment>, ManifestError> {
    validate_with(
        source,
        doc,
        &fields::DEPLOYMENT,
        "apps/v1",
        apps::deployment,
    )
}

/// Validate an `apps/v1` `DaemonSet` and apply Kubernetes defaulting
/// (updateStrategy `RollingUpdate` with maxUnavailable 1 and maxSurge 0,
/// revisionHistoryLimit 10, minReadySeconds 0, and the Pod defaults in the
/// template).
pub fn validate_daemon_set(source: &str, doc: &Value) -> Result<Valid<DaemonSet>, ManifestError> {
    validate_with(
        source,
        doc,
        &fields::DAEMON_SET,
        "apps/v1",
        apps::daemon_set,
    )
}

/// Validate a `v1` Node (metadata and spec; status is the agent's).
pub fn validate_node(source: &str, doc: &Value) -> Result<Valid<Node>, ManifestError> {
    validate_with(source, doc, &fields::NODE, "v1", |c, n| node::node(c, n))
}

/// Validate a `v1` Event.
pub fn validate_event(source: &str, doc: &Value) -> Result<Valid<Event>, ManifestError> {
    validate_with(source, doc, &fields::EVENT, "v1", |c, e| node::event(c, e))
}

/// Validate a `v1` Service and apply Kubernetes defaulting (type
/// `ClusterIP`, port protocol `TCP`, targetPort = port, sessionAffinity
/// `None` or `ClientIP`'s 10800 s timeout, externalTrafficPolicy `Cluster` for
/// `NodePort`, internalTrafficPolicy `Cluster`, IPv4 single stack). Cluster IP
/// and node ports are allocated by weir-control.
pub fn validate_service(source: &str, doc: &Value) -> Result<Valid<Service>, ManifestError> {
    validate_with(source, doc, &service_fields::SERVICE, "v1", |c, s| {
        service::service(c, s)
    })
}

/// Validate a `discovery.k8s.io/v1` `EndpointSlice` (IPv4 only, at most
/// [`MAX_ENDPOINTS`] endpoints).
pub fn validate_endpoint_slice(
    source: &str,
    doc: &Value,
) -> Result<Valid<EndpointSlice>, ManifestError> {
    validate_with(
        source,
        doc,
        &service_fields::ENDPOINT_SLICE,
        "discovery.k8s.io/v1",
        |c, s| service::endpoint_slice(c, s),
    )
}

/// Validate a `networking.k8s.io/v1` `NetworkPolicy` as the apiserver
/// does (selectors, CIDRs and their `except`s, protocols, ports and port
/// ranges, policy types) and apply its defaulting: port protocol `TCP`, and
/// `policyTypes` `[Ingress]`, plus `Egress` if there are egress rules. SCTP
/// is refused (weir's dataplane handles TCP and UDP); an IPv6 `ipBlock` or
/// a CIDR with host bits set is accepted with a warning.
pub fn validate_network_policy(
    source: &str,
    doc: &Value,
) -> Result<Valid<NetworkPolicy>, ManifestError> {
    validate_with(
        source,
        doc,
        &netpol_fields::NETWORK_POLICY,
        "networking.k8s.io/v1",
        netpol::network_policy,
    )
}

/// Validate an `autoscaling/v2` `HorizontalPodAutoscaler` as the apiserver
/// does (target kind and name, minReplicas ≥ 1, maxReplicas ≥ minReplicas,
/// each metric's source and a positive target, behavior policies and
/// windows) and apply its defaulting: minReplicas 1, metrics cpu at 80%
/// utilization, and every absent field of a given `behavior` (see
/// [`hpa_default_rules`]). `Object`, `External` and `ContainerResource`
/// metrics are refused as not supported by weir.
pub fn validate_horizontal_pod_autoscaler(
    source: &str,
    doc: &Value,
) -> Result<Valid<HorizontalPodAutoscaler>, ManifestError> {
    validate_with(
        source,
        &hpa::quantities_as_strings(doc),
        &hpa::HORIZONTAL_POD_AUTOSCALER,
        "autoscaling/v2",
        hpa::horizontal_pod_autoscaler,
    )
}

fn validate_with<T: DeserializeOwned>(
    source: &str,
    doc: &Value,
    table: &Table,
    api_version: &str,
    check: impl FnOnce(&mut Checker<'_>, &mut T) -> Result<(), ManifestError>,
) -> Result<Valid<T>, ManifestError> {
    let (mut object, mut warnings) = typed::<T>(source, doc, table, api_version)?;
    let mut c = Checker {
        file: source,
        warnings: &mut warnings,
    };
    check(&mut c, &mut object)?;
    Ok(Valid { object, warnings })
}

/// Checks kind and apiVersion, walks the document against `table` and
/// deserialises it.
fn typed<T: DeserializeOwned>(
    source: &str,
    doc: &Value,
    table: &Table,
    api_version: &str,
) -> Result<(T, Vec<String>), ManifestError> {
    let invalid = |field: &str, reason: String| ManifestError::Invalid {
        file: source.to_owned(),
        field: field.to_owned(),
        reason,
    };
    let Value::Object(map) = doc else {
        return Err(ManifestError::Document {
            file: source.to_owned(),
            reason: "a document must be a mapping with apiVersion, kind, metadata and spec"
                .to_owned(),
        });
    };
    let kind = table.kind();
    match map.get("kind") {
        None | Some(Value::Null) => return Err(invalid("kind", "required".to_owned())),
        Some(Value::String(k)) if k == kind => {}
        Some(other) => return Err(invalid("kind", format!("{other} is not {kind:?}"))),
    }
    match map.get("apiVersion") {
        None | Some(Value::Null) => return Err(invalid("apiVersion", "required".to_owned())),
        Some(Value::String(v)) if v == api_version => {}
        Some(other) => {
            return Err(invalid(
                "apiVersion",
                format!("{other} is not valid for kind {kind}: expected {api_version:?}"),
            ));
        }
    }
    let mut map = map.clone();
    let walked = walk::walk(source, table, &mut map)?;
    let object = to_typed(source, kind, &map, &walked.kept_warned)?;
    Ok((object, walked.warnings))
}

/// [`parse_documents`] + [`validate_pod`] for every document; a document of
/// another kind is refused with "kind X is not supported here (weir-agent
/// standalone mode runs Pods)". With several documents, errors and warnings
/// name the document: `pods.yaml (document 2)`.
pub fn parse_pods(source: &str, text: &str) -> Result<Vec<ValidPod>, ManifestError> {
    let docs = parse_documents(source, text)?;
    let several = docs.len() > 1;
    docs.iter()
        .enumerate()
        .map(|(i, doc)| {
            if several {
                validate_pod(&format!("{source} (document {})", i + 1), doc)
            } else {
                validate_pod(source, doc)
            }
        })
        .collect()
}

/// The path of a map entry: `parent.key` for plain keys, `parent[key]` for
/// keys with dots or slashes (`metadata.labels[app.kubernetes.io/name]`).
fn key_path(parent: &str, key: &str) -> String {
    let plain = key
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("{parent}.{key}")
    } else {
        format!("{parent}[{key}]")
    }
}

/// Deserialises the walked document. The walk checked every used field, so a
/// failure lies in a warned field k8s-openapi still parses; find which one by
/// dropping each in turn, to name it in the error.
fn to_typed<T: DeserializeOwned>(
    file: &str,
    kind: &str,
    map: &Map<String, Value>,
    kept_warned: &[(String, String)],
) -> Result<T, ManifestError> {
    let doc = Value::Object(map.clone());
    let err = match serde_json::from_value::<T>(doc.clone()) {
        Ok(object) => return Ok(object),
        Err(e) => e,
    };
    for (field, pointer) in kept_warned {
        let mut without = doc.clone();
        let Some((parent, key)) = pointer.rsplit_once('/') else {
            continue;
        };
        let key = key.replace("~1", "/").replace("~0", "~");
        if let Some(Value::Object(m)) = without.pointer_mut(parent) {
            m.remove(&key);
        }
        if serde_json::from_value::<T>(without).is_ok() {
            return Err(ManifestError::Invalid {
                file: file.to_owned(),
                field: field.clone(),
                reason: err.to_string(),
            });
        }
    }
    Err(ManifestError::Document {
        file: file.to_owned(),
        reason: format!("not a valid {kind}: {err}"),
    })
}

/// Renders every kind's field table as Markdown for the README: the Pod's
/// in full (noting where weir-agent's standalone mode differs), the others
/// with the Pod's parts summarised.
pub fn field_table_markdown() -> String {
    let mut out = table::markdown(&fields::POD, Some(&fields::POD_STANDALONE), &[]);
    for t in fields::all().into_iter().skip(1) {
        out.push('\n');
        out.push_str(&table::markdown(t, None, fields::TEMPLATE_SUMMARY));
    }
    out
}

#[cfg(test)]
mod hpa_tests;
#[cfg(test)]
mod netpol_tests;
#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod readme {
    /// The README lists the field table between two markers; this keeps it
    /// current (`WEIR_BLESS=1 cargo test -p weir-proto` rewrites it).
    #[test]
    fn readme_lists_the_current_field_table() {
        const BEGIN: &str = "<!-- pod-fields:begin -->\n";
        const END: &str = "<!-- pod-fields:end -->";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).expect("README.md is readable");
        let start = readme
            .find(BEGIN)
            .expect("README has the pod-fields:begin marker")
            + BEGIN.len();
        let end = readme
            .find(END)
            .expect("README has the pod-fields:end marker");
        let table = super::field_table_markdown();
        if std::env::var_os("WEIR_BLESS").is_some() {
            let updated = format!("{}{table}{}", &readme[..start], &readme[end..]);
            std::fs::write(&path, updated).expect("README.md is writable");
            return;
        }
        assert_eq!(
            &readme[start..end],
            table,
            "README's field table is stale: run WEIR_BLESS=1 cargo test -p weir-proto"
        );
    }
}
