//! Checks and defaults of `v1` Node (metadata and spec) and `v1` Event.

use std::collections::HashSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Event, Node};

use super::check::{Checker, Scope, one_of};
use super::pod::TAINT_EFFECTS;
use super::{ManifestError, names};

const EVENT_TYPES: [&str; 2] = ["Normal", "Warning"];

/// Checks and defaults a Node: `spec.podCIDRs` defaults to `[podCIDR]`.
pub(super) fn node(c: &Checker<'_>, node: &mut Node) -> Result<(), ManifestError> {
    c.object_meta(&mut node.metadata, Scope::Cluster)?;
    let Some(spec) = node.spec.as_mut() else {
        return Ok(());
    };
    if let Some(cidr) = spec.pod_cidr.as_deref().filter(|c| !c.is_empty()) {
        check_cidr(cidr).map_err(|r| c.err("spec.podCIDR", r))?;
    }
    let cidrs = spec.pod_cidrs.get_or_insert_with(Vec::new);
    if cidrs.is_empty() {
        cidrs.extend(spec.pod_cidr.iter().filter(|c| !c.is_empty()).cloned());
    }
    let mut families = HashSet::new();
    for (i, cidr) in cidrs.iter().enumerate() {
        let path = format!("spec.podCIDRs[{i}]");
        let v4 = check_cidr(cidr).map_err(|r| c.err(&path, r))?;
        if !families.insert(v4) {
            return Err(c.err(
                &path,
                "may specify no more than one CIDR for each IP family",
            ));
        }
    }
    match (
        spec.pod_cidr.as_deref().filter(|c| !c.is_empty()),
        cidrs.first(),
    ) {
        (Some(one), Some(first)) if one != first => {
            return Err(c.err(
                "spec.podCIDRs[0]",
                format!("{first:?} must match spec.podCIDR {one:?}"),
            ));
        }
        (None, Some(first)) => spec.pod_cidr = Some(first.clone()),
        _ => {}
    }
    if spec.pod_cidrs.as_ref().is_some_and(Vec::is_empty) {
        spec.pod_cidrs = None;
    }
    let mut seen = HashSet::new();
    for (i, t) in spec.taints.iter().flatten().enumerate() {
        let path = format!("spec.taints[{i}]");
        names::qualified_name(&t.key).map_err(|r| c.err(&format!("{path}.key"), r))?;
        names::label_value(t.value.as_deref().unwrap_or_default())
            .map_err(|r| c.err(&format!("{path}.value"), r))?;
        one_of(&t.effect, &TAINT_EFFECTS).map_err(|r| c.err(&format!("{path}.effect"), r))?;
        if !seen.insert((t.key.as_str(), t.effect.as_str())) {
            return Err(c.err(
                &path,
                format!(
                    "duplicate taint {}:{}: taints must be unique by key and effect",
                    t.key, t.effect
                ),
            ));
        }
    }
    Ok(())
}

/// `a.b.c.d/n` or an IPv6 CIDR; returns whether it is IPv4.
fn check_cidr(cidr: &str) -> Result<bool, String> {
    let bad = || format!("{cidr:?} is not a valid CIDR (such as 10.244.1.0/24)");
    let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok(addr.is_ipv4())
}

/// Checks an Event: `involvedObject` names its object, `type` is Normal or
/// Warning, and the object's namespace (if any) is the event's.
pub(super) fn event(c: &Checker<'_>, event: &mut Event) -> Result<(), ManifestError> {
    c.object_meta(&mut event.metadata, Scope::Namespaced)?;
    let involved = &event.involved_object;
    if involved.name.as_deref().unwrap_or_default().is_empty() {
        return Err(c.err("involvedObject.name", "required"));
    }
    if involved.kind.as_deref().unwrap_or_default().is_empty() {
        return Err(c.err("involvedObject.kind", "required"));
    }
    let namespace = event.metadata.namespace.as_deref().unwrap_or_default();
    if let Some(ns) = involved
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty() && *n != namespace)
    {
        return Err(c.err(
            "involvedObject.namespace",
            format!("{ns:?} does not match the event's namespace {namespace:?}"),
        ));
    }
    if let Some(kind) = event.type_.as_deref() {
        one_of(kind, &EVENT_TYPES).map_err(|r| c.err("type", r))?;
    }
    Ok(())
}
