//! The Pod field table: every field Kubernetes knows in the parts of a Pod
//! that weir reads, each with its class (used, accepted with a warning, or
//! refused) and the reason. Fields absent from the table are unknown to
//! Kubernetes and refused. Below a warned or refused field nothing is checked
//! here (k8s-openapi still checks the types of warned fields).

use std::fmt::Write as _;

/// The JSON shape a used field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A mapping whose keys are themselves fields in the table.
    Object,
    /// A list of mappings whose keys are fields in the table (`path[].key`).
    ObjectList,
    /// A string.
    String,
    /// An integer that fits in `i32`.
    I32,
    /// An integer that fits in `i64`.
    I64,
    /// A list of strings.
    StringList,
    /// A mapping of string keys to string values (labels, annotations).
    StringMap,
    /// A mapping of resource names to quantities (strings or numbers).
    QuantityMap,
}

/// The value at which a warned or refused field asks for nothing, so it is
/// accepted silently. `null`, `[]` and `{}` are always inert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inert {
    /// Only `null`, `[]` and `{}`.
    Empty,
    /// Also `false`.
    False,
    /// Also `true`.
    True,
    /// Also `0`.
    Zero,
    /// Also this exact string.
    Str(&'static str),
}

/// What weir does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldClass {
    /// weir reads and honours the field; `note` says how it is checked or defaulted.
    Used {
        shape: Shape,
        required: bool,
        note: &'static str,
    },
    /// Accepted and ignored with a warning; `why` says why ignoring it is
    /// harmless. A `dropped` field is also removed from the parsed Pod.
    Warn {
        inert: Inert,
        dropped: bool,
        why: &'static str,
    },
    /// Refused; `why` says what weir cannot honour.
    Refused { inert: Inert, why: &'static str },
}

/// One row of the table. `path` uses `[]` for "every element of this list".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldRule {
    /// Field path in Kubernetes style, e.g. `spec.containers[].ports[].containerPort`.
    pub path: &'static str,
    /// What weir does with it.
    pub class: FieldClass,
}

const fn used(path: &'static str, shape: Shape, note: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Used {
            shape,
            required: false,
            note,
        },
    }
}

const fn required(path: &'static str, shape: Shape, note: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Used {
            shape,
            required: true,
            note,
        },
    }
}

const fn warn(path: &'static str, why: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Warn {
            inert: Inert::Empty,
            dropped: false,
            why,
        },
    }
}

const fn warn_unless(path: &'static str, inert: Inert, why: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Warn {
            inert,
            dropped: false,
            why,
        },
    }
}

const fn dropped(path: &'static str, why: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Warn {
            inert: Inert::Empty,
            dropped: true,
            why,
        },
    }
}

const fn refused(path: &'static str, why: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Refused {
            inert: Inert::Empty,
            why,
        },
    }
}

const fn refused_unless(path: &'static str, inert: Inert, why: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Refused { inert, why },
    }
}

const SERVER_SET: &str = "set by weir, not read from manifests";
const NO_PULL: &str = "weir never pulls images; the image must already be in containerd";
const ONE_NODE: &str = "weir-agent runs the pod on its own node";
const NO_PROBES: &str = "probes are not run yet; a running container counts as ready";
const NO_VOLUMES: &str = "weir has no volume support yet";
const NO_USER: &str =
    "weir does not change the process user yet; the container would run as the image's user";
const NO_SA: &str = "weir has no service accounts; no token is mounted";
const NO_HOST_PORT: &str = "host ports are not supported; reach the pod through a Service";

/// The Pod field table (`apiVersion: v1`, `kind: Pod`).
#[rustfmt::skip]
pub static POD_FIELDS: &[FieldRule] = &[
    // Top level.
    required("apiVersion", Shape::String, "must be `v1`"),
    required("kind", Shape::String, "must be `Pod`"),
    required("metadata", Shape::Object, ""),
    required("spec", Shape::Object, ""),
    dropped("status", "status is reported by weir, not read from manifests"),
    // metadata
    required("metadata.name", Shape::String, "DNS-1123 subdomain, at most 253 characters"),
    used("metadata.namespace", Shape::String, "DNS-1123 label, at most 63 characters; default `default`"),
    used("metadata.labels", Shape::StringMap, "keys and values checked like Kubernetes"),
    used("metadata.annotations", Shape::StringMap, "keys checked like Kubernetes; 256 KiB in total"),
    refused("metadata.generateName", "generated names are not supported yet; set metadata.name"),
    dropped("metadata.uid", SERVER_SET),
    dropped("metadata.resourceVersion", SERVER_SET),
    dropped("metadata.creationTimestamp", SERVER_SET),
    dropped("metadata.deletionTimestamp", SERVER_SET),
    dropped("metadata.deletionGracePeriodSeconds", SERVER_SET),
    dropped("metadata.generation", SERVER_SET),
    dropped("metadata.managedFields", SERVER_SET),
    dropped("metadata.selfLink", SERVER_SET),
    warn("metadata.ownerReferences", "weir has no garbage collection by owner yet; kept but not acted on"),
    warn("metadata.finalizers", "weir does not process finalizers yet; kept but not acted on"),
    // spec
    required("spec.containers", Shape::ObjectList, "at least one"),
    used("spec.restartPolicy", Shape::String, "`Always` (default), `OnFailure` or `Never`"),
    used("spec.terminationGracePeriodSeconds", Shape::I64, ">= 0; default 30"),
    used("spec.securityContext", Shape::Object, ""),
    used("spec.os", Shape::Object, ""),
    required("spec.os.name", Shape::String, "must be `linux`"),
    refused_unless("spec.hostNetwork", Inert::False, "weir pods always get their own network namespace"),
    refused_unless("spec.hostPID", Inert::False, "sharing the node's PID namespace is not supported"),
    refused_unless("spec.hostIPC", Inert::False, "sharing the node's IPC namespace is not supported"),
    refused_unless("spec.hostUsers", Inert::True, "user namespaces are not supported; containers use the node's users"),
    refused_unless("spec.shareProcessNamespace", Inert::False, "each container of a weir pod has its own PID namespace"),
    refused("spec.volumes", NO_VOLUMES),
    refused("spec.initContainers", "init containers are not supported yet"),
    refused("spec.ephemeralContainers", "ephemeral containers are not supported"),
    refused("spec.activeDeadlineSeconds", "weir does not enforce pod deadlines yet"),
    refused("spec.dnsConfig", "weir has no cluster DNS yet; a custom resolv.conf is not supported"),
    refused("spec.hostAliases", "weir does not write /etc/hosts entries yet"),
    refused("spec.hostname", "setting the pod's hostname is not supported yet"),
    refused("spec.hostnameOverride", "setting the pod's hostname is not supported yet"),
    refused("spec.subdomain", "weir has no cluster DNS yet"),
    refused_unless("spec.setHostnameAsFQDN", Inert::False, "weir has no cluster DNS yet"),
    refused("spec.readinessGates", "nothing in weir sets readiness gate conditions, so the pod would never be ready"),
    refused("spec.resourceClaims", "dynamic resource allocation is not supported"),
    refused("spec.resources", "pod-level resources are not supported yet; set them per container"),
    refused("spec.runtimeClassName", "weir runs every container with runc"),
    refused("spec.schedulingGates", "scheduling gates are not supported; the pod would start at once"),
    refused("spec.schedulingGroup", "gang scheduling is not supported"),
    refused("spec.evictionResponders", "eviction responders are not supported"),
    warn("spec.affinity", ONE_NODE),
    warn("spec.nodeName", ONE_NODE),
    warn("spec.nodeSelector", ONE_NODE),
    warn("spec.tolerations", ONE_NODE),
    warn("spec.topologySpreadConstraints", ONE_NODE),
    warn("spec.schedulerName", ONE_NODE),
    warn("spec.priority", "weir does not preempt pods"),
    warn("spec.priorityClassName", "weir does not preempt pods"),
    warn("spec.preemptionPolicy", "weir does not preempt pods"),
    warn("spec.overhead", "weir does not account pod overhead"),
    warn("spec.dnsPolicy", "weir has no cluster DNS yet; containers use the image's resolv.conf"),
    warn_unless("spec.enableServiceLinks", Inert::False, "weir does not inject service environment variables"),
    warn("spec.imagePullSecrets", NO_PULL),
    warn("spec.serviceAccountName", NO_SA),
    warn("spec.serviceAccount", NO_SA),
    warn_unless("spec.automountServiceAccountToken", Inert::False, NO_SA),
    // spec.securityContext
    refused("spec.securityContext.runAsUser", NO_USER),
    refused("spec.securityContext.runAsGroup", NO_USER),
    refused("spec.securityContext.supplementalGroups", NO_USER),
    refused("spec.securityContext.sysctls", "setting sysctls is not supported yet"),
    warn_unless("spec.securityContext.runAsNonRoot", Inert::False, "weir does not check the image's user"),
    warn("spec.securityContext.fsGroup", "fsGroup applies to volumes, which weir does not support"),
    warn("spec.securityContext.fsGroupChangePolicy", "fsGroup applies to volumes, which weir does not support"),
    warn("spec.securityContext.supplementalGroupsPolicy", "weir does not set supplemental groups"),
    warn("spec.securityContext.seLinuxOptions", "SELinux labels are not applied"),
    warn("spec.securityContext.seLinuxChangePolicy", "SELinux labels are not applied"),
    warn("spec.securityContext.seccompProfile", "seccomp profiles are not applied yet"),
    warn("spec.securityContext.appArmorProfile", "AppArmor profiles are not applied"),
    warn("spec.securityContext.windowsOptions", "Windows options do not apply on Linux"),
    // spec.containers[]
    required("spec.containers[].name", Shape::String, "DNS-1123 label, unique in the pod"),
    required("spec.containers[].image", Shape::String, "non-empty; must already be in containerd"),
    used("spec.containers[].command", Shape::StringList, "replaces the image's entrypoint"),
    used("spec.containers[].args", Shape::StringList, "replaces the image's cmd"),
    used("spec.containers[].workingDir", Shape::String, "absolute path"),
    used("spec.containers[].env", Shape::ObjectList, ""),
    required("spec.containers[].env[].name", Shape::String, "printable ASCII without `=`"),
    used("spec.containers[].env[].value", Shape::String, ""),
    refused("spec.containers[].env[].valueFrom", "values from ConfigMaps, Secrets or the downward API are not supported yet"),
    refused("spec.containers[].envFrom", "values from ConfigMaps or Secrets are not supported yet"),
    used("spec.containers[].ports", Shape::ObjectList, ""),
    required("spec.containers[].ports[].containerPort", Shape::I32, "1..=65535"),
    used("spec.containers[].ports[].protocol", Shape::String, "`TCP` (default), `UDP` or `SCTP`"),
    used("spec.containers[].ports[].name", Shape::String, "IANA service name (at most 15 characters), unique in the container"),
    refused_unless("spec.containers[].ports[].hostPort", Inert::Zero, NO_HOST_PORT),
    refused_unless("spec.containers[].ports[].hostIP", Inert::Str(""), NO_HOST_PORT),
    used("spec.containers[].resources", Shape::Object, ""),
    used("spec.containers[].resources.requests", Shape::QuantityMap, "`cpu` and `memory` only; defaults to the limit"),
    used("spec.containers[].resources.limits", Shape::QuantityMap, "`cpu` and `memory` only; not below the request"),
    refused("spec.containers[].resources.claims", "dynamic resource allocation is not supported"),
    used("spec.containers[].securityContext", Shape::Object, ""),
    refused_unless("spec.containers[].securityContext.privileged", Inert::False, "privileged containers are not supported"),
    used("spec.containers[].securityContext.capabilities", Shape::Object, ""),
    refused("spec.containers[].securityContext.capabilities.add", "adding capabilities is not supported; containers get the runtime's default set"),
    warn("spec.containers[].securityContext.capabilities.drop", "dropping capabilities is not applied yet; the container keeps the runtime's default set"),
    refused("spec.containers[].securityContext.runAsUser", NO_USER),
    refused("spec.containers[].securityContext.runAsGroup", NO_USER),
    refused_unless("spec.containers[].securityContext.procMount", Inert::Str("Default"), "only the default /proc mount is supported"),
    warn_unless("spec.containers[].securityContext.runAsNonRoot", Inert::False, "weir does not check the image's user"),
    warn_unless("spec.containers[].securityContext.allowPrivilegeEscalation", Inert::True, "no_new_privs is not set yet"),
    warn_unless("spec.containers[].securityContext.readOnlyRootFilesystem", Inert::False, "the root filesystem stays writable"),
    warn("spec.containers[].securityContext.seLinuxOptions", "SELinux labels are not applied"),
    warn("spec.containers[].securityContext.seccompProfile", "seccomp profiles are not applied yet"),
    warn("spec.containers[].securityContext.appArmorProfile", "AppArmor profiles are not applied"),
    warn("spec.containers[].securityContext.windowsOptions", "Windows options do not apply on Linux"),
    refused("spec.containers[].volumeMounts", NO_VOLUMES),
    refused("spec.containers[].volumeDevices", NO_VOLUMES),
    refused("spec.containers[].lifecycle", "lifecycle hooks (postStart, preStop, stopSignal) are not supported yet"),
    refused("spec.containers[].restartPolicy", "per-container restart policies are not supported; use spec.restartPolicy"),
    refused("spec.containers[].restartPolicyRules", "per-container restart rules are not supported; use spec.restartPolicy"),
    warn("spec.containers[].imagePullPolicy", NO_PULL),
    warn("spec.containers[].livenessProbe", NO_PROBES),
    warn("spec.containers[].readinessProbe", NO_PROBES),
    warn("spec.containers[].startupProbe", NO_PROBES),
    warn("spec.containers[].resizePolicy", "in-place resize is not supported"),
    warn("spec.containers[].terminationMessagePath", "weir does not read termination messages"),
    warn("spec.containers[].terminationMessagePolicy", "weir does not read termination messages"),
    warn_unless("spec.containers[].stdin", Inert::False, "weir does not attach stdin or a terminal"),
    warn_unless("spec.containers[].stdinOnce", Inert::False, "weir does not attach stdin or a terminal"),
    warn_unless("spec.containers[].tty", Inert::False, "weir does not attach stdin or a terminal"),
];

/// The rule for exactly this path pattern, if Kubernetes knows the field.
pub(super) fn rule(path: &str) -> Option<&'static FieldRule> {
    POD_FIELDS.iter().find(|r| r.path == path)
}

/// The name of the field `path` when it sits directly below `parent` (a
/// pattern such as `spec.containers[]`; `""` for the top level).
pub(super) fn child_name<'p>(parent: &str, path: &'p str) -> Option<&'p str> {
    let rest = if parent.is_empty() {
        path
    } else {
        path.strip_prefix(parent)?.strip_prefix('.')?
    };
    (!rest.contains('.')).then_some(rest)
}

/// The names of the fields directly below `parent`, for "did you mean" hints.
pub(super) fn children(parent: &str) -> impl Iterator<Item = &'static str> + '_ {
    POD_FIELDS
        .iter()
        .filter_map(move |r| child_name(parent, r.path))
}

/// Renders [`POD_FIELDS`] as a Markdown table for the README.
pub fn field_table_markdown() -> String {
    let mut out = String::from("| Pod field | Class | Notes |\n|---|---|---|\n");
    for r in POD_FIELDS {
        let (class, note) = match r.class {
            FieldClass::Used {
                required: true,
                note,
                ..
            } => ("used (required)", note),
            FieldClass::Used { note, .. } => ("used", note),
            FieldClass::Warn {
                dropped: true, why, ..
            } => ("warning, dropped", why),
            FieldClass::Warn { why, .. } => ("warning, ignored", why),
            FieldClass::Refused { why, .. } => ("refused", why),
        };
        let _ = writeln!(out, "| `{}` | {class} | {note} |", r.path);
    }
    out.push_str("| any other field | refused | unknown to Kubernetes |\n");
    out
}
