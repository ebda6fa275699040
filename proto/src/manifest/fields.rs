//! The rows of every kind's field table (see `table.rs` for what the
//! classes mean) and the tables built from them.

use std::sync::LazyLock;

use super::table::{FieldClass, FieldRule, Inert, Part, Shape, Table};

pub(super) const fn used(path: &'static str, shape: Shape, note: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Used {
            shape,
            required: false,
            note,
        },
    }
}

pub(super) const fn required(path: &'static str, shape: Shape, note: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Used {
            shape,
            required: true,
            note,
        },
    }
}

pub(super) const fn warn(path: &'static str, why: &'static str) -> FieldRule {
    warn_unless(path, Inert::Empty, why)
}

pub(super) const fn warn_unless(path: &'static str, inert: Inert, why: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Warn {
            inert,
            dropped: false,
            why,
        },
    }
}

pub(super) const fn dropped(path: &'static str, why: &'static str) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Warn {
            inert: Inert::Empty,
            dropped: true,
            why,
        },
    }
}

pub(super) const fn refused(path: &'static str, why: &'static str) -> FieldRule {
    refused_unless(path, Inert::Empty, why)
}

pub(super) const fn refused_unless(
    path: &'static str,
    inert: Inert,
    why: &'static str,
) -> FieldRule {
    FieldRule {
        path,
        class: FieldClass::Refused { inert, why },
    }
}

pub(super) const SERVER_SET: &str = "set by weir, not read from manifests";
const NO_PULL: &str = "weir never pulls images; the image must already be in containerd";
const ONE_NODE: &str = "weir-agent runs the pod on its own node";
const PROBE_PORT: &str = "1..=65535, or the name of one of the container's ports";
const NO_VOLUMES: &str = "weir has no volume support yet";
const NO_USER: &str =
    "weir does not change the process user yet; the container would run as the image's user";
const NO_SA: &str = "weir has no service accounts; no token is mounted";
const NO_HOST_PORT: &str = "host ports are not supported; reach the pod through a Service";

const STATUS: &str = "status is reported by weir, not read from manifests";
const NO_FINALIZERS: &str = "weir does not process finalizers yet; kept but not acted on";
const FROM_OWNER: &str = "the controller sets it on the pods it creates";

/// `metadata` of a whole object (every kind).
#[rustfmt::skip]
pub(super) static OBJECT_META: &[FieldRule] = &[
    required("metadata", Shape::Object, ""),
    required("metadata.name", Shape::String, "DNS-1123 subdomain, at most 253 characters (Namespace: DNS-1123 label)"),
    used("metadata.namespace", Shape::String, "namespaced kinds: DNS-1123 label, default `default`, must exist; cluster-scoped kinds: must be empty"),
    used("metadata.labels", Shape::StringMap, "keys and values checked like Kubernetes"),
    used("metadata.annotations", Shape::StringMap, "keys checked like Kubernetes; 256 KiB in total"),
    used("metadata.resourceVersion", Shape::String, "optional: if set, the write fails with a conflict unless it is the stored version"),
    used("metadata.ownerReferences", Shape::ObjectList, "deleting the owner deletes this object (Background, Foreground) or releases it (Orphan)"),
    required("metadata.ownerReferences[].apiVersion", Shape::String, ""),
    required("metadata.ownerReferences[].kind", Shape::String, ""),
    required("metadata.ownerReferences[].name", Shape::String, ""),
    required("metadata.ownerReferences[].uid", Shape::String, "the owner's uid"),
    used("metadata.ownerReferences[].controller", Shape::Bool, "at most one owner is the controller"),
    used("metadata.ownerReferences[].blockOwnerDeletion", Shape::Bool, "a Foreground delete of the owner waits for this object"),
    refused("metadata.generateName", "generated names are not supported yet; set metadata.name"),
    dropped("metadata.uid", SERVER_SET),
    dropped("metadata.creationTimestamp", SERVER_SET),
    dropped("metadata.deletionTimestamp", SERVER_SET),
    dropped("metadata.deletionGracePeriodSeconds", SERVER_SET),
    dropped("metadata.generation", SERVER_SET),
    dropped("metadata.managedFields", SERVER_SET),
    dropped("metadata.selfLink", SERVER_SET),
    warn("metadata.finalizers", NO_FINALIZERS),
];

/// `metadata` of a pod template (`spec.template.metadata`).
#[rustfmt::skip]
static TEMPLATE_META: &[FieldRule] = &[
    used("metadata", Shape::Object, ""),
    used("metadata.labels", Shape::StringMap, "required in effect: spec.selector must match them"),
    used("metadata.annotations", Shape::StringMap, "copied to the pods"),
    warn("metadata.name", "pods are named after their owner"),
    warn("metadata.namespace", "pods are created in their owner's namespace"),
    warn("metadata.generateName", "pods are named after their owner"),
    warn("metadata.ownerReferences", FROM_OWNER),
    warn("metadata.finalizers", NO_FINALIZERS),
    dropped("metadata.uid", SERVER_SET),
    dropped("metadata.resourceVersion", SERVER_SET),
    dropped("metadata.creationTimestamp", SERVER_SET),
    dropped("metadata.deletionTimestamp", SERVER_SET),
    dropped("metadata.deletionGracePeriodSeconds", SERVER_SET),
    dropped("metadata.generation", SERVER_SET),
    dropped("metadata.managedFields", SERVER_SET),
    dropped("metadata.selfLink", SERVER_SET),
];

/// A `LabelSelector` (`matchLabels` and `matchExpressions`).
#[rustfmt::skip]
static LABEL_SELECTOR: &[FieldRule] = &[
    used("matchLabels", Shape::StringMap, "every label must be equal"),
    used("matchExpressions", Shape::ObjectList, "every expression must hold"),
    required("matchExpressions[].key", Shape::String, "a label key"),
    required("matchExpressions[].operator", Shape::String, "`In`, `NotIn`, `Exists` or `DoesNotExist`"),
    used("matchExpressions[].values", Shape::StringList, "non-empty for `In` and `NotIn`, empty otherwise"),
];

pub(super) static LABEL_SELECTOR_PARTS: &[Part] = &[Part::Rows(LABEL_SELECTOR)];

/// A `NodeSelectorTerm` of node affinity.
#[rustfmt::skip]
static NODE_SELECTOR_TERM: &[FieldRule] = &[
    used("matchExpressions", Shape::ObjectList, "node labels; every expression must hold"),
    required("matchExpressions[].key", Shape::String, "a label key"),
    required("matchExpressions[].operator", Shape::String, "`In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt` or `Lt`"),
    used("matchExpressions[].values", Shape::StringList, "non-empty for `In` and `NotIn`, one integer for `Gt` and `Lt`, empty otherwise"),
    used("matchFields", Shape::ObjectList, "node fields; only `metadata.name`"),
    required("matchFields[].key", Shape::String, "`metadata.name`"),
    required("matchFields[].operator", Shape::String, "`In` or `NotIn`"),
    used("matchFields[].values", Shape::StringList, "exactly one node name"),
];

static NODE_SELECTOR_TERM_PARTS: &[Part] = &[Part::Rows(NODE_SELECTOR_TERM)];

/// A `PodAffinityTerm`.
#[rustfmt::skip]
static POD_AFFINITY_TERM: &[FieldRule] = &[
    used("labelSelector", Shape::Object, "the pods this term is about"),
    used("namespaces", Shape::StringList, "where those pods are; default the pod's own namespace"),
    required("topologyKey", Shape::String, "a node label, e.g. `kubernetes.io/hostname`"),
    refused("namespaceSelector", "selecting namespaces by label is not supported; list them in namespaces"),
    refused("matchLabelKeys", "matchLabelKeys is not supported"),
    refused("mismatchLabelKeys", "mismatchLabelKeys is not supported"),
];

static POD_AFFINITY_TERM_PARTS: &[Part] = &[
    Part::Rows(POD_AFFINITY_TERM),
    Part::Mount("labelSelector", LABEL_SELECTOR_PARTS),
];

/// The Pod's own top-level rows.
#[rustfmt::skip]
static POD_TOP: &[FieldRule] = &[
    required("apiVersion", Shape::String, "must be `v1`"),
    required("kind", Shape::String, "must be `Pod`"),
    dropped("status", STATUS),
];

/// `spec` of a Pod, also `spec.template.spec` of workloads.
#[rustfmt::skip]
static POD_SPEC: &[FieldRule] = &[
    required("spec", Shape::Object, ""),
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
    used("spec.nodeName", Shape::String, "the node the pod runs on: set by the scheduler, or by hand to skip it; DNS-1123 subdomain; immutable once set, kept by a re-apply without it"),
    used("spec.nodeSelector", Shape::StringMap, "scheduler filter: the node must have every label"),
    used("spec.affinity", Shape::Object, "read by the scheduler"),
    used("spec.affinity.nodeAffinity", Shape::Object, ""),
    used("spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution", Shape::Object, "scheduler filter"),
    required("spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms", Shape::ObjectList, "at least one; the node must match one term"),
    used("spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution", Shape::ObjectList, "scheduler score"),
    required("spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[].weight", Shape::I32, "1..=100"),
    required("spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[].preference", Shape::Object, ""),
    used("spec.affinity.podAffinity", Shape::Object, ""),
    used("spec.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution", Shape::ObjectList, "scheduler filter"),
    used("spec.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution", Shape::ObjectList, "scheduler score"),
    required("spec.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[].weight", Shape::I32, "1..=100"),
    required("spec.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[].podAffinityTerm", Shape::Object, ""),
    used("spec.affinity.podAntiAffinity", Shape::Object, ""),
    used("spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution", Shape::ObjectList, "scheduler filter"),
    used("spec.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution", Shape::ObjectList, "scheduler score"),
    required("spec.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[].weight", Shape::I32, "1..=100"),
    required("spec.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[].podAffinityTerm", Shape::Object, ""),
    used("spec.tolerations", Shape::ObjectList, "scheduler filter and NoExecute eviction"),
    used("spec.tolerations[].key", Shape::String, "a label key; empty with `Exists` tolerates every taint"),
    used("spec.tolerations[].operator", Shape::String, "`Equal` (default) or `Exists`"),
    used("spec.tolerations[].value", Shape::String, "empty with `Exists`"),
    used("spec.tolerations[].effect", Shape::String, "`NoSchedule`, `PreferNoSchedule`, `NoExecute` or empty (all)"),
    used("spec.tolerations[].tolerationSeconds", Shape::I64, "only with `NoExecute`: how long the pod stays on a tainted node"),
    used("spec.priority", Shape::I32, "the scheduling priority (weir has no PriorityClass objects: set it here); default 0, or the built-in class's value"),
    used("spec.priorityClassName", Shape::String, "`system-cluster-critical` or `system-node-critical`; another name only together with spec.priority"),
    used("spec.preemptionPolicy", Shape::String, "`PreemptLowerPriority` (default) or `Never`"),
    warn("spec.topologySpreadConstraints", "the scheduler spreads the replicas of one owner but does not enforce topology spread constraints"),
    warn_unless("spec.schedulerName", Inert::Str("default-scheduler"), "weir has one scheduler"),
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
    used("spec.containers[].ports[].hostPort", Shape::I32, "0..=65535 (0: none); the scheduler puts pods with the same hostPort and protocol on different nodes"),
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
    used("spec.containers[].livenessProbe", Shape::Object, "exactly one handler; a failure restarts the container (per spec.restartPolicy)"),
    used("spec.containers[].readinessProbe", Shape::Object, "exactly one handler; drives the container's `ready` and the pod's Ready condition"),
    used("spec.containers[].startupProbe", Shape::Object, "exactly one handler; liveness and readiness start once it succeeded; a failure restarts the container"),
    warn("spec.containers[].resizePolicy", "in-place resize is not supported"),
    warn("spec.containers[].terminationMessagePath", "weir does not read termination messages"),
    warn("spec.containers[].terminationMessagePolicy", "weir does not read termination messages"),
    warn_unless("spec.containers[].stdin", Inert::False, "weir does not attach stdin or a terminal"),
    warn_unless("spec.containers[].stdinOnce", Inert::False, "weir does not attach stdin or a terminal"),
    warn_unless("spec.containers[].tty", Inert::False, "weir does not attach stdin or a terminal"),
];

/// A container's liveness, readiness or startup probe.
#[rustfmt::skip]
static PROBE: &[FieldRule] = &[
    used("httpGet", Shape::Object, "GET from the node to the pod IP; status 200..=399 is success"),
    used("httpGet.path", Shape::String, "default `/`"),
    required("httpGet.port", Shape::IntOrString, PROBE_PORT),
    refused("httpGet.host", "probes always connect to the pod IP"),
    used("httpGet.scheme", Shape::String, "`HTTP` (default); `HTTPS` is not supported"),
    used("httpGet.httpHeaders", Shape::ObjectList, ""),
    refused("httpGet.protocol", "weir probes speak HTTP/1.1 only"),
    required("httpGet.httpHeaders[].name", Shape::String, "an HTTP header name"),
    required("httpGet.httpHeaders[].value", Shape::String, ""),
    used("tcpSocket", Shape::Object, "TCP connect from the node to the pod IP"),
    required("tcpSocket.port", Shape::IntOrString, PROBE_PORT),
    refused("tcpSocket.host", "probes always connect to the pod IP"),
    used("exec", Shape::Object, "runs in the container; exit status 0 is success"),
    required("exec.command", Shape::StringList, "non-empty; not run through a shell"),
    refused("grpc", "gRPC probes are not supported; use httpGet, tcpSocket or exec"),
    used("initialDelaySeconds", Shape::I32, ">= 0; default 0"),
    used("periodSeconds", Shape::I32, ">= 1; default 10"),
    used("timeoutSeconds", Shape::I32, ">= 1; default 1"),
    used("successThreshold", Shape::I32, ">= 1; default 1; must be 1 for liveness and startup probes"),
    used("failureThreshold", Shape::I32, ">= 1; default 3"),
    refused("terminationGracePeriodSeconds", "a probe's own grace period is not supported; spec.terminationGracePeriodSeconds applies"),
];

static PROBE_PARTS: &[Part] = &[Part::Rows(PROBE)];

/// `spec` of a Pod with every mounted part.
static POD_SPEC_PARTS: &[Part] = &[
    Part::Rows(POD_SPEC),
    Part::Mount("spec.containers[].livenessProbe", PROBE_PARTS),
    Part::Mount("spec.containers[].readinessProbe", PROBE_PARTS),
    Part::Mount("spec.containers[].startupProbe", PROBE_PARTS),
    Part::Mount(
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[]",
        NODE_SELECTOR_TERM_PARTS,
    ),
    Part::Mount(
        "spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[].preference",
        NODE_SELECTOR_TERM_PARTS,
    ),
    Part::Mount(
        "spec.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[]",
        POD_AFFINITY_TERM_PARTS,
    ),
    Part::Mount(
        "spec.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[].podAffinityTerm",
        POD_AFFINITY_TERM_PARTS,
    ),
    Part::Mount(
        "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[]",
        POD_AFFINITY_TERM_PARTS,
    ),
    Part::Mount(
        "spec.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[].podAffinityTerm",
        POD_AFFINITY_TERM_PARTS,
    ),
];

/// Where the standalone agent (no scheduler, no API) differs from the cluster.
#[rustfmt::skip]
static STANDALONE: &[FieldRule] = &[
    dropped("metadata.resourceVersion", SERVER_SET),
    warn("metadata.ownerReferences", "weir-agent standalone has no garbage collection by owner; kept but not acted on"),
    warn("spec.nodeName", ONE_NODE),
    warn("spec.nodeSelector", ONE_NODE),
    warn("spec.affinity", ONE_NODE),
    warn("spec.tolerations", ONE_NODE),
    warn("spec.priority", "weir-agent standalone does not preempt pods"),
    warn("spec.priorityClassName", "weir-agent standalone does not preempt pods"),
    warn("spec.preemptionPolicy", "weir-agent standalone does not preempt pods"),
    refused_unless("spec.containers[].ports[].hostPort", Inert::Zero, NO_HOST_PORT),
];

static POD_PARTS: &[Part] = &[
    Part::Rows(POD_TOP),
    Part::Rows(OBJECT_META),
    Part::Mount("", POD_SPEC_PARTS),
];

/// The Pod table as weir-control applies it.
pub(super) static POD: LazyLock<Table> = LazyLock::new(|| Table::new("Pod", POD_PARTS, &[]));

/// The Pod table as weir-agent's standalone mode applies it.
pub(super) static POD_STANDALONE: LazyLock<Table> =
    LazyLock::new(|| Table::new("Pod", POD_PARTS, STANDALONE));

/// The pod template of workloads: `spec.template.{metadata,spec}`.
static TEMPLATE_PARTS: &[Part] = &[Part::Rows(TEMPLATE_META), Part::Mount("", POD_SPEC_PARTS)];

/// Rows every workload (`apps/v1`) has.
#[rustfmt::skip]
static WORKLOAD_TOP: &[FieldRule] = &[
    required("apiVersion", Shape::String, "must be `apps/v1`"),
    required("kind", Shape::String, ""),
    required("spec", Shape::Object, ""),
    dropped("status", STATUS),
    required("spec.selector", Shape::Object, "must match spec.template.metadata.labels; immutable"),
    required("spec.template", Shape::Object, "the pods to run; spec.restartPolicy must be `Always`"),
    used("spec.minReadySeconds", Shape::I32, ">= 0; default 0"),
];

#[rustfmt::skip]
static REPLICA_SET_SPEC: &[FieldRule] = &[
    used("spec.replicas", Shape::I32, ">= 0; default 1"),
];

#[rustfmt::skip]
static DEPLOYMENT_SPEC: &[FieldRule] = &[
    used("spec.replicas", Shape::I32, ">= 0; default 1"),
    used("spec.revisionHistoryLimit", Shape::I32, ">= 0; default 10 old ReplicaSets kept"),
    used("spec.progressDeadlineSeconds", Shape::I32, "> minReadySeconds; default 600"),
    used("spec.strategy", Shape::Object, "default RollingUpdate"),
    used("spec.strategy.type", Shape::String, "`RollingUpdate` (default) or `Recreate`"),
    used("spec.strategy.rollingUpdate", Shape::Object, "only with RollingUpdate"),
    used("spec.strategy.rollingUpdate.maxSurge", Shape::IntOrString, "a count or a percentage; default 25%"),
    used("spec.strategy.rollingUpdate.maxUnavailable", Shape::IntOrString, "a count or a percentage up to 100%; default 25%; not 0 if maxSurge is 0"),
    refused_unless("spec.paused", Inert::False, "pausing a Deployment's rollouts is not supported"),
];

#[rustfmt::skip]
static DAEMON_SET_SPEC: &[FieldRule] = &[
    used("spec.revisionHistoryLimit", Shape::I32, ">= 0; default 10"),
    used("spec.updateStrategy", Shape::Object, "default RollingUpdate"),
    used("spec.updateStrategy.type", Shape::String, "`RollingUpdate` (default) or `OnDelete`"),
    used("spec.updateStrategy.rollingUpdate", Shape::Object, "only with RollingUpdate"),
    used("spec.updateStrategy.rollingUpdate.maxUnavailable", Shape::IntOrString, "a count or a percentage up to 100%; default 1"),
    used("spec.updateStrategy.rollingUpdate.maxSurge", Shape::IntOrString, "a count or a percentage; default 0; not both 0"),
];

macro_rules! workload_parts {
    ($spec:expr) => {
        &[
            Part::Rows(WORKLOAD_TOP),
            Part::Rows(OBJECT_META),
            Part::Rows($spec),
            Part::Mount("spec.selector", LABEL_SELECTOR_PARTS),
            Part::Mount("spec.template", TEMPLATE_PARTS),
        ]
    };
}

/// The `apps/v1` `ReplicaSet` table.
pub(super) static REPLICA_SET: LazyLock<Table> =
    LazyLock::new(|| Table::new("ReplicaSet", workload_parts!(REPLICA_SET_SPEC), &[]));

/// The `apps/v1` Deployment table.
pub(super) static DEPLOYMENT: LazyLock<Table> =
    LazyLock::new(|| Table::new("Deployment", workload_parts!(DEPLOYMENT_SPEC), &[]));

/// The `apps/v1` `DaemonSet` table.
pub(super) static DAEMON_SET: LazyLock<Table> =
    LazyLock::new(|| Table::new("DaemonSet", workload_parts!(DAEMON_SET_SPEC), &[]));

/// The `v1` Node table.
#[rustfmt::skip]
static NODE_ROWS: &[FieldRule] = &[
    required("apiVersion", Shape::String, "must be `v1`"),
    required("kind", Shape::String, "must be `Node`"),
    dropped("status", "status is reported by the node's agent"),
    used("spec", Shape::Object, ""),
    used("spec.podCIDR", Shape::String, "a CIDR; allocated by weir-control when the agent registers"),
    used("spec.podCIDRs", Shape::StringList, "at most one per IP family; the first is spec.podCIDR"),
    used("spec.providerID", Shape::String, ""),
    used("spec.unschedulable", Shape::Bool, "cordon: no new pods are scheduled to the node"),
    used("spec.taints", Shape::ObjectList, "pods that do not tolerate them are not scheduled (NoSchedule) or evicted (NoExecute)"),
    required("spec.taints[].key", Shape::String, "a label key; unique with the effect"),
    used("spec.taints[].value", Shape::String, "a label value"),
    required("spec.taints[].effect", Shape::String, "`NoSchedule`, `PreferNoSchedule` or `NoExecute`"),
    used("spec.taints[].timeAdded", Shape::String, "RFC 3339 time, for NoExecute"),
    warn("spec.configSource", "dynamic kubelet configuration was removed from Kubernetes"),
    warn("spec.externalID", "deprecated in Kubernetes; not used"),
    warn("spec.podPreemptionPolicy", "an alpha Kubernetes field; weir's scheduler does not read it"),
];

/// The `v1` Node table.
pub(super) static NODE: LazyLock<Table> = LazyLock::new(|| {
    Table::new(
        "Node",
        &[Part::Rows(NODE_ROWS), Part::Rows(OBJECT_META)],
        &[],
    )
});

/// An `ObjectReference` (an event's involvedObject and related).
#[rustfmt::skip]
static OBJECT_REFERENCE: &[FieldRule] = &[
    used("apiVersion", Shape::String, ""),
    used("kind", Shape::String, ""),
    used("name", Shape::String, ""),
    used("namespace", Shape::String, "must be the event's namespace, if set"),
    used("uid", Shape::String, "`describe` finds the object's events by it"),
    used("resourceVersion", Shape::String, ""),
    used("fieldPath", Shape::String, ""),
];

pub(super) static OBJECT_REFERENCE_PARTS: &[Part] = &[Part::Rows(OBJECT_REFERENCE)];

/// The `v1` Event rows.
#[rustfmt::skip]
static EVENT_ROWS: &[FieldRule] = &[
    required("apiVersion", Shape::String, "must be `v1`"),
    required("kind", Shape::String, "must be `Event`"),
    required("involvedObject", Shape::Object, "the object the event is about"),
    used("related", Shape::Object, ""),
    used("reason", Shape::String, "CamelCase, e.g. `Scheduled`"),
    used("message", Shape::String, ""),
    used("type", Shape::String, "`Normal` or `Warning`"),
    used("source", Shape::Object, ""),
    used("source.component", Shape::String, "e.g. `default-scheduler`"),
    used("source.host", Shape::String, "the node, for agents"),
    used("reportingComponent", Shape::String, ""),
    used("reportingInstance", Shape::String, ""),
    used("action", Shape::String, ""),
    used("firstTimestamp", Shape::String, "RFC 3339 time"),
    used("lastTimestamp", Shape::String, "RFC 3339 time"),
    used("eventTime", Shape::String, "RFC 3339 time with microseconds"),
    used("count", Shape::I32, ""),
    used("series", Shape::Object, ""),
    used("series.count", Shape::I32, ""),
    used("series.lastObservedTime", Shape::String, "RFC 3339 time with microseconds"),
];

/// The `v1` Event table.
pub(super) static EVENT: LazyLock<Table> = LazyLock::new(|| {
    Table::new(
        "Event",
        &[
            Part::Rows(EVENT_ROWS),
            Part::Rows(OBJECT_META),
            Part::Mount("involvedObject", OBJECT_REFERENCE_PARTS),
            Part::Mount("related", OBJECT_REFERENCE_PARTS),
        ],
        &[],
    )
});

/// Every table, for the README and the consistency test.
pub(super) fn all() -> [&'static Table; 10] {
    [
        &POD,
        &REPLICA_SET,
        &DEPLOYMENT,
        &DAEMON_SET,
        &NODE,
        &EVENT,
        &super::service_fields::SERVICE,
        &super::service_fields::ENDPOINT_SLICE,
        &super::netpol_fields::NETWORK_POLICY,
        &super::hpa::HORIZONTAL_POD_AUTOSCALER,
    ]
}

/// The path prefixes the README summarises for workload tables.
pub(super) const TEMPLATE_SUMMARY: &[(&str, &str)] = &[
    ("spec.template.spec", "the Pod's `spec.*` (the same table)"),
    ("metadata", "the Pod's `metadata.*`"),
];
