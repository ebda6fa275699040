//! Small pure helpers the controllers share: owner references, label and
//! node selectors, pod readiness and availability, taints and tolerations,
//! `IntOrString` percentages, names and template hashes.

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use weir_proto::v1;

use crate::matching;

/// The alphabet of generated name suffixes and template hashes (no vowels,
/// no look-alikes), as Kubernetes' `rand.String`.
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// The label a Deployment adds to its `ReplicaSets`' selectors and pods.
pub const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// The current time.
pub fn now() -> Timestamp {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let nanos = i128::try_from(since_epoch.as_nanos()).unwrap_or_default();
    Timestamp::from_nanosecond(nanos).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A key from proto metadata, as [`super::cache::key_of`] makes one.
pub fn proto_key(meta: &v1::ObjectMeta) -> String {
    if meta.namespace.is_empty() {
        meta.name.clone()
    } else {
        format!("{}/{}", meta.namespace, meta.name)
    }
}

/// `metadata.name` (empty if unset).
pub fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

/// `metadata.namespace`, `default` if unset.
pub fn namespace(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => ns,
        _ => "default",
    }
}

/// `metadata.uid` (empty if unset).
pub fn uid(meta: &ObjectMeta) -> &str {
    meta.uid.as_deref().unwrap_or_default()
}

/// `metadata.resourceVersion` as a number (0 if unset).
pub fn resource_version(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_default()
}

/// The proto metadata events need to name an object.
pub fn proto_meta(api_version: &str, kind: &str, meta: &ObjectMeta) -> v1::ObjectMeta {
    v1::ObjectMeta {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: name(meta).to_owned(),
        uid: uid(meta).to_owned(),
        ..Default::default()
    }
}

/// The controller owner reference, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|r| r.controller == Some(true))
}

/// The `namespace/name` key of an object's controller, if that is a `kind`.
pub fn controller_key(meta: &ObjectMeta, kind: &str) -> Option<String> {
    let owner = controller_of(meta).filter(|o| o.kind == kind)?;
    Some(format!("{}/{}", namespace(meta), owner.name))
}

/// The owner reference a controller puts on what it creates (contract item 4).
pub fn owner_ref(api_version: &str, kind: &str, owner: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        name: name(owner).to_owned(),
        uid: uid(owner).to_owned(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Index function: the uid of the controller owner.
pub fn owner_index<K: k8s_openapi::Metadata<Ty = ObjectMeta>>(object: &K) -> Vec<String> {
    controller_of(object.metadata())
        .map(|r| vec![r.uid.clone()])
        .unwrap_or_default()
}

/// Index function: the node a pod is bound to.
pub fn node_index(pod: &Pod) -> Vec<String> {
    match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        Some(node) if !node.is_empty() => vec![node.to_owned()],
        _ => Vec::new(),
    }
}

/// The labels of an object.
pub fn labels(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    meta.labels.as_ref().unwrap_or(&EMPTY)
}

/// Whether a selector has no requirements (then it selects nothing for
/// adoption, as `apps/v1` refuses empty selectors).
pub fn selector_is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

/// Whether a node satisfies a pod template's `nodeSelector` and required
/// node affinity.
pub fn node_selected(template: &PodTemplateSpec, node: &Node) -> bool {
    template.spec.as_ref().is_none_or(|spec| {
        matching::node_selected(
            spec.node_selector.as_ref(),
            spec.affinity.as_ref(),
            name(&node.metadata),
            labels(&node.metadata),
        )
    })
}

/// The first toleration among `tolerations` that tolerates `taint`.
pub fn toleration_for<'a>(tolerations: &'a [Toleration], taint: &Taint) -> Option<&'a Toleration> {
    tolerations
        .iter()
        .find(|t| matching::tolerates_taint(t, taint))
}

/// A pod's `Ready` condition, if reported.
fn ready_condition(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// Whether a pod's `Ready` condition is `True`.
pub fn pod_ready(pod: &Pod) -> bool {
    ready_condition(pod).is_some_and(|c| c.status == "True")
}

/// The pod's `Ready` condition as (status is True, last transition in ms
/// since the epoch), if it has one with a transition time.
pub fn pod_ready_transition(pod: &Pod) -> Option<(bool, i64)> {
    let c = ready_condition(pod)?;
    let at = c.last_transition_time.as_ref()?.0.as_millisecond();
    Some((c.status == "True", at))
}

/// The pod's `status.startTime` in ms since the epoch, if set.
pub fn pod_started_ms(pod: &Pod) -> Option<i64> {
    Some(pod.status.as_ref()?.start_time.as_ref()?.0.as_millisecond())
}

/// When the pod became ready (its `Ready` condition's last transition).
pub fn pod_ready_since(pod: &Pod) -> Option<Timestamp> {
    ready_condition(pod)
        .filter(|c| c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
}

/// Whether a pod has been ready for at least `min_ready_seconds`; if it is
/// ready but not yet long enough, `Err(remaining)` says how long to wait.
pub fn pod_available(
    pod: &Pod,
    min_ready_seconds: i32,
    now: Timestamp,
) -> Result<bool, std::time::Duration> {
    if !pod_ready(pod) {
        return Ok(false);
    }
    if min_ready_seconds <= 0 {
        return Ok(true);
    }
    let Some(since) = pod_ready_since(pod) else {
        return Ok(true);
    };
    let due = since + SignedDuration::from_secs(i64::from(min_ready_seconds));
    if due <= now {
        Ok(true)
    } else {
        Err(std::time::Duration::try_from(due.duration_since(now)).unwrap_or_default())
    }
}

/// Whether a pod counts toward its controller's replicas: not terminating,
/// not finished.
pub fn pod_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// `spec.nodeName`, empty if unbound.
pub fn pod_node(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default()
}

/// Resolves a `maxSurge`/`maxUnavailable` value against `total`: an int
/// as is, a percentage rounded up (surge) or down (unavailable).
pub fn scaled_value(
    value: Option<&IntOrString>,
    default: &str,
    total: i32,
    round_up: bool,
) -> Result<i32, String> {
    let text = match value {
        Some(IntOrString::Int(n)) if *n < 0 => return Err(format!("{n} must be non-negative")),
        Some(IntOrString::Int(n)) => return Ok(*n),
        Some(IntOrString::String(s)) => s.as_str(),
        None => default,
    };
    let Some(percent) = text.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) else {
        return Err(format!(
            "{text:?} must be an integer or a percentage like \"25%\""
        ));
    };
    if percent < 0 {
        return Err(format!("{text:?} must be non-negative"));
    }
    let product = percent * i64::from(total);
    let scaled = if round_up {
        (product + 99) / 100
    } else {
        product / 100
    };
    i32::try_from(scaled).map_err(|_| format!("{text:?} of {total} is out of range"))
}

/// A 5-character random name suffix from [`ALPHABET`].
pub fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut bits = RandomState::new().hash_one((n, nanos));
    let len = ALPHABET.len() as u64;
    (0..5)
        .map(|_| {
            let c = ALPHABET[usize::try_from(bits % len).unwrap_or_default()];
            bits /= len;
            char::from(c)
        })
        .collect()
}

/// Sorts object keys recursively so equal templates hash equally.
fn canonical(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), canonical(v)))
                .collect::<serde_json::Map<_, _>>(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// A template without the `pod-template-hash` label, for comparing and
/// hashing templates.
pub fn template_without_hash(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = template.clone();
    let meta = t.metadata.get_or_insert_with(ObjectMeta::default);
    if let Some(labels) = &mut meta.labels {
        labels.remove(TEMPLATE_HASH_LABEL);
        if labels.is_empty() {
            meta.labels = None;
        }
    }
    if meta == &ObjectMeta::default() {
        t.metadata = None;
    }
    t
}

/// Whether two pod templates are equal ignoring `pod-template-hash`.
pub fn templates_equal(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    let a = serde_json::to_value(template_without_hash(a)).map(|v| canonical(&v));
    let b = serde_json::to_value(template_without_hash(b)).map(|v| canonical(&v));
    matches!((a, b), (Ok(a), Ok(b)) if a == b)
}

/// The `pod-template-hash` of a template (FNV-1a over its canonical JSON
/// without the hash label, plus the collision count), as 10 characters of
/// [`ALPHABET`].
pub fn template_hash(template: &PodTemplateSpec, collision_count: i32) -> String {
    let json = serde_json::to_value(template_without_hash(template))
        .map(|v| canonical(&v).to_string())
        .unwrap_or_default();
    let mut hash: u32 = 0x811c_9dc5;
    for byte in json.bytes().chain(collision_count.to_le_bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    // Like Kubernetes' SafeEncodeString of the decimal hash, padded to 10.
    format!("{hash:010}")
        .bytes()
        .map(|d| char::from(ALPHABET[usize::from(d - b'0')]))
        .collect()
}

/// Seconds from `from` to `to` (negative if `to` is earlier).
pub fn seconds_between(from: Timestamp, to: Timestamp) -> i64 {
    to.as_second() - from.as_second()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn percentages_round_like_kubernetes() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(scaled_value(Some(&pct("25%")), "25%", 10, true), Ok(3));
        assert_eq!(scaled_value(Some(&pct("25%")), "25%", 10, false), Ok(2));
        assert_eq!(scaled_value(None, "25%", 1, true), Ok(1));
        assert_eq!(scaled_value(None, "25%", 1, false), Ok(0));
        assert_eq!(
            scaled_value(Some(&IntOrString::Int(2)), "", 10, true),
            Ok(2)
        );
        assert!(scaled_value(Some(&pct("x")), "", 10, true).is_err());
        assert!(scaled_value(Some(&IntOrString::Int(-1)), "", 10, true).is_err());
    }

    #[test]
    fn template_hash_ignores_its_own_label_and_key_order() {
        let a: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "i:1"}]}
        }))
        .unwrap();
        let mut b = a.clone();
        b.metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(TEMPLATE_HASH_LABEL.into(), "zzz".into());
        assert_eq!(template_hash(&a, 0), template_hash(&b, 0));
        assert!(templates_equal(&a, &b));
        assert_eq!(template_hash(&a, 0).len(), 10);
        assert_ne!(template_hash(&a, 0), template_hash(&a, 1));
        let mut c = a.clone();
        c.spec.as_mut().unwrap().containers[0].image = Some("i:2".into());
        assert_ne!(template_hash(&a, 0), template_hash(&c, 0));
        assert!(!templates_equal(&a, &c));
    }

    #[test]
    fn suffixes_use_the_alphabet() {
        let s = random_suffix();
        assert_eq!(s.len(), 5);
        assert!(s.bytes().all(|b| ALPHABET.contains(&b)));
        assert_ne!(random_suffix(), random_suffix());
    }
}
