//! What an update may change, per kind, as Kubernetes rules it: a pod's
//! spec is immutable but for a few fields and its node stays once bound; a
//! workload's selector and a node's pod CIDRs are immutable. Fields a
//! re-applied manifest leaves out that the server set (a pod's node, a
//! node's CIDRs) are carried over.

use serde_json::{Map, Value};

use super::ApiError;
use super::kinds::Kind;
use super::object::Stored;

/// What a pod update may change, for the refusal message.
const POD_MUTABLE: &str = "a pod's spec may only change in spec.containers[*].image, \
     spec.activeDeadlineSeconds and spec.tolerations (additions)";

/// Checks `desired` as an update of `stored` and fills in what it may
/// leave out; an error names the field.
pub(super) fn check(kind: Kind, stored: &Stored, desired: &mut Stored) -> Result<(), ApiError> {
    match kind {
        Kind::Pod => pod(stored, desired),
        Kind::ReplicaSet | Kind::Deployment | Kind::DaemonSet => {
            let before = stored.spec().and_then(|s| s.get("selector"));
            let after = desired.spec().and_then(|s| s.get("selector"));
            if before == after {
                Ok(())
            } else {
                Err(immutable(
                    "spec.selector",
                    "the selector of a workload cannot change",
                ))
            }
        }
        Kind::Node => node(stored, desired),
        Kind::Service => super::services::check_update(stored, desired),
        Kind::Namespace
        | Kind::Event
        | Kind::EndpointSlice
        | Kind::NetworkPolicy
        | Kind::HorizontalPodAutoscaler => Ok(()),
    }
}

fn immutable(field: &str, why: &str) -> ApiError {
    ApiError::Invalid(format!("manifest: {field}: field is immutable: {why}"))
}

/// Keeps the bound node; refuses a change of it and of any spec field
/// Kubernetes does not let a pod change. Setting the node of an unbound
/// pod is allowed (it is how a pod is bound).
fn pod(stored: &Stored, desired: &mut Stored) -> Result<(), ApiError> {
    let bound = stored.spec_str("nodeName").to_owned();
    let wanted = desired.spec_str("nodeName").to_owned();
    if !bound.is_empty() {
        if wanted.is_empty() {
            desired
                .spec_mut()
                .insert("nodeName".to_owned(), Value::from(bound));
        } else if wanted != bound {
            return Err(immutable(
                "spec.nodeName",
                &format!("the pod is bound to node {bound:?}"),
            ));
        }
    }
    let empty = Map::new();
    let before = stored.spec().unwrap_or(&empty);
    let after = desired.spec().unwrap_or(&empty);
    if let (Some(Value::Array(old)), new) = (before.get("tolerations"), after.get("tolerations")) {
        let new = new.and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        if let Some(i) = old.iter().position(|t| !new.contains(t)) {
            return Err(immutable(
                &format!("spec.tolerations[{i}]"),
                "tolerations may be added to a pod, not removed or changed",
            ));
        }
    }
    match first_difference(before, after) {
        Some(field) => Err(immutable(&field, POD_MUTABLE)),
        None => Ok(()),
    }
}

/// The first spec field (`spec.x` or `spec.containers[i].x`) that differs
/// beyond what a pod may change.
fn first_difference(before: &Map<String, Value>, after: &Map<String, Value>) -> Option<String> {
    const FREE: [&str; 3] = ["activeDeadlineSeconds", "tolerations", "nodeName"];
    let keys = before
        .keys()
        .chain(after.keys().filter(|k| !before.contains_key(*k)));
    for key in keys {
        if FREE.contains(&key.as_str()) || before.get(key) == after.get(key) {
            continue;
        }
        if key == "containers" {
            if let Some(field) = container_difference(before.get(key), after.get(key)) {
                return Some(field);
            }
            continue;
        }
        return Some(format!("spec.{key}"));
    }
    None
}

fn container_difference(before: Option<&Value>, after: Option<&Value>) -> Option<String> {
    let (Some(Value::Array(old)), Some(Value::Array(new))) = (before, after) else {
        return Some("spec.containers".to_owned());
    };
    if old.len() != new.len() {
        return Some("spec.containers".to_owned());
    }
    for (i, (a, b)) in old.iter().zip(new).enumerate() {
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return Some(format!("spec.containers[{i}]"));
        };
        let keys = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k)));
        for key in keys {
            if key != "image" && a.get(key) != b.get(key) {
                return Some(format!("spec.containers[{i}].{key}"));
            }
        }
    }
    None
}

/// Keeps a node's pod CIDRs when the manifest leaves them out; refuses a change.
fn node(stored: &Stored, desired: &mut Stored) -> Result<(), ApiError> {
    for field in ["podCIDR", "podCIDRs"] {
        let Some(old) = stored
            .spec()
            .and_then(|s| s.get(field))
            .filter(|v| !is_empty(v))
            .cloned()
        else {
            continue;
        };
        match desired.spec().and_then(|s| s.get(field)) {
            None => {
                desired.spec_mut().insert(field.to_owned(), old);
            }
            Some(new) if is_empty(new) => {
                desired.spec_mut().insert(field.to_owned(), old);
            }
            Some(new) if *new != old => {
                return Err(immutable(
                    &format!("spec.{field}"),
                    &format!("a node's pod CIDR cannot change once set (it is {old})"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}
