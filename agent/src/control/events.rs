//! Kubernetes-style Events from the agent (component `kubelet`, source.host
//! = the node): `Created`, `Started`, `Killing`, `BackOff`, `Failed`. They
//! are derived from the changes of a pod's status and sent through
//! `Objects.Apply`, best effort: a lost event is logged, never retried.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tonic::transport::Channel;
use weir_proto::v1;
use weir_proto::v1::objects_client::ObjectsClient;

/// The component name on the agent's events.
pub const COMPONENT: &str = "kubelet";

/// An event about a pod, before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEventNote {
    /// `Normal` or `Warning`.
    pub kind: &'static str,
    /// e.g. `Started`.
    pub reason: &'static str,
    /// Human detail.
    pub message: String,
}

fn normal(reason: &'static str, message: String) -> PodEventNote {
    PodEventNote {
        kind: "Normal",
        reason,
        message,
    }
}

fn warning(reason: &'static str, message: String) -> PodEventNote {
    PodEventNote {
        kind: "Warning",
        reason,
        message,
    }
}

fn waiting_reason(c: &ContainerStatus) -> Option<&str> {
    c.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
}

fn waiting_message(c: &ContainerStatus) -> String {
    c.state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.message.clone())
        .unwrap_or_default()
}

fn started_at(c: &ContainerStatus) -> Option<i64> {
    c.state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()
        .map(|t| t.0.as_second())
}

/// The events a change of a pod's status from `before` to `now` calls for.
/// `since` is when this agent started: a container found running since
/// before that was adopted, not started, and gets no event.
pub fn derive(before: Option<&PodStatus>, now: &PodStatus, since: i64) -> Vec<PodEventNote> {
    let mut out = Vec::new();
    let old = |name: &str| {
        before
            .and_then(|b| b.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == name))
    };
    for c in now.container_statuses.iter().flatten() {
        let prev = old(&c.name);
        if let Some(at) = started_at(c) {
            let new_run = prev.and_then(started_at) != Some(at);
            if new_run && (prev.is_some() || at >= since) {
                out.push(normal("Created", format!("Created container {}", c.name)));
                out.push(normal("Started", format!("Started container {}", c.name)));
            }
        }
        let reason = waiting_reason(c);
        if reason == prev.and_then(waiting_reason) {
            continue;
        }
        match reason {
            Some("CrashLoopBackOff") => out.push(warning(
                "BackOff",
                format!("Back-off restarting failed container {}", c.name),
            )),
            Some(r @ ("ErrImageNeverPull" | "StartError" | "CreateContainerError")) => {
                out.push(warning(
                    "Failed",
                    format!("Error: {r}: {}", waiting_message(c)),
                ));
            }
            _ => {}
        }
        let start_failed = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .filter(|t| t.reason.as_deref() == Some("StartError"));
        let was = prev
            .and_then(|p| p.last_state.as_ref())
            .and_then(|s| s.terminated.as_ref());
        if let Some(t) = start_failed
            && was.map(|w| &w.finished_at) != Some(&t.finished_at)
        {
            out.push(warning(
                "Failed",
                format!(
                    "Error: {}",
                    t.message.clone().unwrap_or_else(|| "StartError".into())
                ),
            ));
        }
    }
    out
}

/// `Killing` notes for each container of a pod being stopped.
pub fn killing(pod: &Pod) -> Vec<PodEventNote> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| normal("Killing", format!("Stopping container {}", c.name)))
        .collect()
}

/// The Event object for `note` about `pod` (as control/src/events.rs
/// builds them).
pub fn event_json(pod: &Pod, what: &PodEventNote, node: &str) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = Timestamp::from_second(i64::try_from(now.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": format!("{name}.{:x}", now.as_nanos()),
            "namespace": namespace,
        },
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": namespace,
            "name": name,
            "uid": pod.metadata.uid.as_deref().unwrap_or_default(),
        },
        "reason": what.reason,
        "message": what.message,
        "type": what.kind,
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT,
        "reportingInstance": node,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    })
}

/// Sends events in the background; failures are logged.
pub fn send(objects: &ObjectsClient<Channel>, pod: &Pod, notes: &[PodEventNote], node: &str) {
    if notes.is_empty() {
        return;
    }
    let events: Vec<Value> = notes.iter().map(|n| event_json(pod, n, node)).collect();
    let mut client = objects.clone();
    tokio::spawn(async move {
        for e in events {
            let req = v1::ApplyRequest {
                manifest_json: e.to_string(),
                field_manager: COMPONENT.to_owned(),
            };
            match tokio::time::timeout(Duration::from_secs(5), client.apply(req)).await {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => {
                    tracing::debug!(reason = %e["reason"], error = %s.message(), "event not recorded");
                }
                Err(_) => tracing::debug!(reason = %e["reason"], "event not recorded: timed out"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateWaiting,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn status(state: ContainerState) -> PodStatus {
        PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "c".into(),
                state: Some(state),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn running(at: i64) -> PodStatus {
        status(ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(Timestamp::from_second(at).unwrap())),
            }),
            ..Default::default()
        })
    }

    fn waiting(reason: &str) -> PodStatus {
        status(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some("why".into()),
            }),
            ..Default::default()
        })
    }

    fn reasons(v: &[PodEventNote]) -> Vec<&str> {
        v.iter().map(|n| n.reason).collect()
    }

    #[test]
    fn events_follow_container_state_changes_once() {
        let creating = waiting("ContainerCreating");
        assert!(derive(None, &creating, 100).is_empty());
        assert_eq!(
            reasons(&derive(Some(&creating), &running(150), 100)),
            ["Created", "Started"]
        );
        // Unchanged: nothing; adopted (running since before the agent): nothing.
        assert!(derive(Some(&running(150)), &running(150), 100).is_empty());
        assert!(derive(None, &running(50), 100).is_empty());
        // A restart is a new run.
        assert_eq!(
            reasons(&derive(Some(&running(150)), &running(160), 100)),
            ["Created", "Started"]
        );
        let back = derive(Some(&running(160)), &waiting("CrashLoopBackOff"), 100);
        assert_eq!(reasons(&back), ["BackOff"]);
        assert_eq!(back[0].kind, "Warning");
        assert!(
            derive(
                Some(&waiting("CrashLoopBackOff")),
                &waiting("CrashLoopBackOff"),
                100
            )
            .is_empty()
        );
        let failed = derive(Some(&creating), &waiting("ErrImageNeverPull"), 100);
        assert_eq!(reasons(&failed), ["Failed"]);
        assert!(failed[0].message.contains("why"));
    }

    #[test]
    fn event_json_has_the_control_planes_shape() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web".into());
        pod.metadata.uid = Some("u1".into());
        let e = event_json(&pod, &normal("Started", "Started container c".into()), "n1");
        assert_eq!(e["involvedObject"]["uid"], "u1");
        assert_eq!(e["involvedObject"]["namespace"], "default");
        assert_eq!(e["source"]["component"], "kubelet");
        assert_eq!(e["source"]["host"], "n1");
        assert!(e["metadata"]["name"].as_str().unwrap().starts_with("web."));
        serde_json::from_value::<k8s_openapi::api::core::v1::Event>(e).expect("an Event");
    }
}
