//! Reports pod status to the control whenever it changes (coalesced over
//! [`DEBOUNCE`], retried on failure), reports pods marked for deletion as
//! terminated once their worker is gone, and derives the `kubelet` events
//! from the status changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use weir_proto::v1;

use super::{BACKOFF_INITIAL, CALL_TIMEOUT, Shared, events, next_backoff};

/// Changes within this window go out as one report.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Look again this often even without a change.
const IDLE: Duration = Duration::from_secs(30);

/// A status as compared for "changed": the JSON without the condition
/// transition times the agent recomputes on every look.
pub(crate) fn fingerprint(status: &Value) -> String {
    let mut s = status.clone();
    if let Some(conds) = s.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conds {
            if let Some(m) = c.as_object_mut() {
                m.remove("lastTransitionTime");
            }
        }
    }
    s.to_string()
}

/// One report to send.
struct Report {
    uid: String,
    namespace: String,
    name: String,
    status: Value,
    resource_version: u64,
    terminated: bool,
}

/// What the reporter remembers between looks.
#[derive(Default)]
struct Memory {
    /// uid → fingerprint of the last status the control took.
    reported: HashMap<String, String>,
    /// uids reported terminated.
    terminated: HashSet<String>,
    /// uid → the last status looked at (for events).
    seen: HashMap<String, PodStatus>,
}

/// Runs until `cancel`.
pub(crate) async fn run(sh: Arc<Shared>, cancel: CancellationToken) {
    let mut changes = sh.mgr.subscribe();
    let mut memory = Memory::default();
    let mut retry: Option<Duration> = None;
    loop {
        let wait = retry.unwrap_or(IDLE);
        tokio::select! {
            () = cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            () = sh.desired_changed.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
        // Coalesce a burst of changes into one look.
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(DEBOUNCE) => {}
        }
        changes.mark_unchanged();
        let reports = look(&sh, &mut memory);
        let mut failed = false;
        for r in reports {
            if !send(&sh, &r, &mut memory).await {
                failed = true;
            }
        }
        retry = if failed {
            Some(retry.map_or(BACKOFF_INITIAL, next_backoff))
        } else {
            None
        };
    }
}

/// The reports due now (and the events the changes call for).
fn look(sh: &Shared, memory: &mut Memory) -> Vec<Report> {
    let pods: Vec<(String, super::ControlPod)> = {
        let d = sh.desired();
        if !d.synced {
            return Vec::new();
        }
        d.pods.iter().map(|(u, p)| (u.clone(), p.clone())).collect()
    };
    let live: HashSet<&str> = pods.iter().map(|(u, _)| u.as_str()).collect();
    memory.reported.retain(|u, _| live.contains(u.as_str()));
    memory.terminated.retain(|u| live.contains(u.as_str()));
    memory.seen.retain(|u, _| live.contains(u.as_str()));
    let mut out = Vec::new();
    for (uid, p) in &pods {
        let view: Option<Pod> = sh.mgr.pod_by_uid(uid);
        if let Some(status) = view.as_ref().and_then(|v| v.status.as_ref()) {
            let notes = events::derive(memory.seen.get(uid), status, sh.started);
            events::send(&sh.control.objects, &p.pod, &notes, sh.node());
            memory.seen.insert(uid.clone(), status.clone());
        }
        if p.deleting {
            if !sh.mgr.has_worker(uid) && !memory.terminated.contains(uid) {
                out.push(Report {
                    uid: uid.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    status: Value::Null,
                    resource_version: p.resource_version,
                    terminated: true,
                });
            }
            continue;
        }
        let Some(status) = view
            .and_then(|v| v.status)
            .and_then(|s| serde_json::to_value(s).ok())
        else {
            continue;
        };
        if memory.reported.get(uid) != Some(&fingerprint(&status)) {
            out.push(Report {
                uid: uid.clone(),
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                status,
                resource_version: p.resource_version,
                terminated: false,
            });
        }
    }
    out
}

/// Sends one report; false if it should be retried.
async fn send(sh: &Shared, r: &Report, memory: &mut Memory) -> bool {
    let req = v1::ReportPodStatusRequest {
        node_name: sh.node().to_owned(),
        pod: Some(v1::ObjectRef {
            api_version: "v1".to_owned(),
            kind: "Pod".to_owned(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        }),
        uid: r.uid.clone(),
        status_json: if r.status.is_null() {
            String::new()
        } else {
            r.status.to_string()
        },
        observed_resource_version: r.resource_version,
        terminated: r.terminated,
    };
    let mut nodes = sh.control.nodes.clone();
    let pod = format!("{}/{}", r.namespace, r.name);
    let done = match tokio::time::timeout(CALL_TIMEOUT, nodes.report_pod_status(req)).await {
        Ok(Ok(_)) => true,
        // The pod is gone or is another one now: nothing to retry.
        Ok(Err(s))
            if matches!(
                s.code(),
                tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument
            ) =>
        {
            tracing::debug!(pod, error = %s.message(), "status report not applicable");
            true
        }
        Ok(Err(s)) => {
            tracing::debug!(pod, error = %s.message(), "status report failed; will retry");
            false
        }
        Err(_) => {
            tracing::debug!(pod, "status report timed out; will retry");
            false
        }
    };
    if done {
        if r.terminated {
            tracing::info!(pod, "reported terminated");
            memory.terminated.insert(r.uid.clone());
        } else {
            memory
                .reported
                .insert(r.uid.clone(), fingerprint(&r.status));
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fingerprints_ignore_transition_times_only() {
        let a = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "t1"}]});
        let b = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "t2"}]});
        let c = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "t2"}]});
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}
