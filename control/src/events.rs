//! Kubernetes-style Events (`v1` Event) recorded by the scheduler, the
//! controllers and (over the `Objects` API) the agents: `Scheduled`,
//! `FailedScheduling`, `SuccessfulCreate`, `Started`, `BackOff`, `Killing`…
//! `weirctl describe` lists those whose `involvedObject.uid` is the object's.
//!
//! Recording is best effort: a failed write is logged, never returned, so an
//! event can't fail the action it describes.

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use weir_proto::v1;

use crate::api::ObjectsApi;
use crate::store::Store;

/// Whether an event is routine or worth a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Routine (`Normal`).
    Normal,
    /// Something went wrong or may need attention (`Warning`).
    Warning,
}

impl EventType {
    /// The `type` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// The Event object (as JSON) for `reason`/`message` about `regarding`,
/// reported by `component` (e.g. `default-scheduler`, `replicaset-controller`)
/// on `host` (empty for the control plane).
pub fn event_json(
    regarding: &v1::ObjectMeta,
    kind: EventType,
    reason: &str,
    message: &str,
    component: &str,
    host: &str,
) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = Timestamp::from_second(now.as_secs().try_into().unwrap_or(i64::MAX))
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string();
    let namespace = if regarding.namespace.is_empty() {
        "default"
    } else {
        regarding.namespace.as_str()
    };
    let mut source = json!({ "component": component });
    if !host.is_empty() {
        source["host"] = json!(host);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": format!("{}.{:x}", regarding.name, now.as_nanos()),
            "namespace": namespace,
        },
        "involvedObject": {
            "apiVersion": regarding.api_version,
            "kind": regarding.kind,
            "namespace": regarding.namespace,
            "name": regarding.name,
            "uid": regarding.uid,
        },
        "reason": reason,
        "message": message,
        "type": kind.as_str(),
        "source": source,
        "reportingComponent": component,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    })
}

/// Records an event through `api`; failures are logged, not returned.
pub async fn record<S: Store>(
    api: &ObjectsApi<S>,
    regarding: &v1::ObjectMeta,
    kind: EventType,
    reason: &str,
    message: &str,
    component: &str,
) {
    let event = event_json(regarding, kind, reason, message, component, "");
    let request = v1::ApplyRequest {
        manifest_json: event.to_string(),
        field_manager: component.to_owned(),
    };
    if let Err(e) = api.apply(&request).await {
        tracing::warn!(reason, object = %regarding.name, error = %e, "record event");
    }
}
