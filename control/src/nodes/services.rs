//! What every agent sees of Services: each Service with its `EndpointSlice`
//! (every node balances every service). A Service change comes with the
//! slice as it is now; a slice change with its Service as it is now;
//! DELETED when the Service goes.
//!
//! The initial list reads Services (at revision `A`) then slices (at
//! `B >= A`); on the watch, Service events up to `A` and slice events up to
//! `B` are already in that state and skipped. A Service change in `(A, B]`
//! comes again as MODIFIED, which is harmless: every event carries the
//! whole current pair.

use serde_json::Value;
use weir_proto::v1;

use super::filter::{self, json_of};
use crate::store::{Event, EventKind, KeyValue, Store, StoreError};

/// Key prefix of Services in the store.
pub const SERVICES: &str = "/core/services/";
/// Key prefix of `EndpointSlices` in the store.
pub const SLICES: &str = "/discovery.k8s.io/endpointslices/";
/// The label naming a slice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The revisions up to which the initial list already holds the state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listed {
    /// Services were listed at this revision.
    pub services: u64,
    /// Slices were listed at this revision.
    pub slices: u64,
}

fn slice_key(namespace: &str, service: &str) -> String {
    format!("{SLICES}{namespace}/{service}")
}

fn service_key(namespace: &str, name: &str) -> String {
    format!("{SERVICES}{namespace}/{name}")
}

fn meta_str<'a>(json: &'a Value, field: &str) -> &'a str {
    json.pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The Service a slice belongs to: its `kubernetes.io/service-name` label,
/// else its own name.
fn service_of_slice(slice: &Value) -> String {
    slice
        .pointer("/metadata/labels")
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .and_then(Value::as_str)
        .unwrap_or_else(|| meta_str(slice, "name"))
        .to_owned()
}

fn to_object(kv: &KeyValue) -> Option<v1::Object> {
    json_of(kv).map(|j| filter::object(j, kv.mod_revision))
}

fn service_event(
    kind: v1::EventType,
    service: v1::Object,
    slice: Option<v1::Object>,
) -> v1::ServiceEvent {
    v1::ServiceEvent {
        r#type: kind.into(),
        service: Some(service),
        endpoint_slice: slice,
    }
}

/// Every Service with its slice, as ADDED events, and the revisions listed at.
pub async fn list<S: Store>(store: &S) -> Result<(Vec<v1::ServiceEvent>, Listed), StoreError> {
    let (services, services_at) = store.list(SERVICES).await?;
    let (slices, slices_at) = store.list(SLICES).await?;
    let mut by_service = std::collections::HashMap::new();
    for kv in &slices {
        if let Some(json) = json_of(kv) {
            let key = service_key(meta_str(&json, "namespace"), &service_of_slice(&json));
            by_service.insert(key, filter::object(json, kv.mod_revision));
        }
    }
    let events = services
        .iter()
        .filter_map(|kv| {
            let service = to_object(kv)?;
            let slice = by_service.remove(&kv.key);
            Some(service_event(v1::EventType::Added, service, slice))
        })
        .collect();
    Ok((
        events,
        Listed {
            services: services_at,
            slices: slices_at,
        },
    ))
}

/// The service event for a store event on a Service or slice key, if any.
pub async fn event<S: Store>(
    store: &S,
    ev: &Event,
    listed: Listed,
) -> Result<Option<v1::ServiceEvent>, StoreError> {
    let key = ev.kv.key.as_str();
    if key.starts_with(SERVICES) {
        if ev.revision() <= listed.services {
            return Ok(None);
        }
        let Some(json) = json_of(&ev.kv) else {
            return Ok(None);
        };
        let service = filter::object(json.clone(), ev.revision());
        let kind = match ev.kind {
            EventKind::Delete => {
                return Ok(Some(service_event(v1::EventType::Deleted, service, None)));
            }
            EventKind::Put if ev.prev.is_none() => v1::EventType::Added,
            EventKind::Put => v1::EventType::Modified,
        };
        let slice = store
            .get(&slice_key(
                meta_str(&json, "namespace"),
                meta_str(&json, "name"),
            ))
            .await?
            .as_ref()
            .and_then(to_object);
        return Ok(Some(service_event(kind, service, slice)));
    }
    if key.starts_with(SLICES) {
        if ev.revision() <= listed.slices {
            return Ok(None);
        }
        let Some(json) = json_of(&ev.kv) else {
            return Ok(None);
        };
        let Some(service) = store
            .get(&service_key(
                meta_str(&json, "namespace"),
                &service_of_slice(&json),
            ))
            .await?
            .as_ref()
            .and_then(to_object)
        else {
            return Ok(None);
        };
        let slice = match ev.kind {
            EventKind::Delete => None,
            EventKind::Put => Some(filter::object(json, ev.revision())),
        };
        return Ok(Some(service_event(v1::EventType::Modified, service, slice)));
    }
    Ok(None)
}
