//! Kubernetes-style Events from the agent (component `kubelet`, source.host
//! = the node): `Created`, `Started`, `Killing`, `BackOff`, `Failed`,
//! derived from the changes of a pod's status, and the probes' `Unhealthy`
//! and `Killing`. They are sent through `Objects.Apply`, best effort: a
//! lost event is logged, never retried.
//!
//! A probe fails every period for as long as it fails, so its events are
//! aggregated as client-go's event correlator does: a repeat of the same
//! (pod, type, reason, message) bumps `count` and `lastTimestamp` of the
//! first event object instead of making a new one, and a key is written at
//! most once per [`REWRITE_AFTER`] (the repeats in between go out in the
//! next write).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use weir_proto::v1;
use weir_proto::v1::objects_client::ObjectsClient;

use super::{CALL_TIMEOUT, Shared};
use crate::pod::probe;

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
    let now = unix_now();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let seen = Occurrences {
        name: format!("{name}.{:x}", now.as_nanos()),
        count: 1,
        first: now.as_secs(),
        last: now.as_secs(),
    };
    event_json_seen(pod, what, node, &seen)
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn stamp(unix_secs: u64) -> String {
    Timestamp::from_second(i64::try_from(unix_secs).unwrap_or(i64::MAX))
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string()
}

/// How often (and since when) one event was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrences {
    /// The Event object's name (kept for every repeat).
    pub name: String,
    /// How many times.
    pub count: u32,
    /// First seen (unix seconds).
    pub first: u64,
    /// Last seen (unix seconds).
    pub last: u64,
}

/// The Event object for `what` about `pod`, seen as `seen` says.
pub fn event_json_seen(pod: &Pod, what: &PodEventNote, node: &str, seen: &Occurrences) -> Value {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": seen.name,
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
        "firstTimestamp": stamp(seen.first),
        "lastTimestamp": stamp(seen.last),
        "count": seen.count,
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

/// A repeated event is written at most this often (its count catches up
/// on the next write).
pub const REWRITE_AFTER: Duration = Duration::from_secs(10);
/// A key not seen for this long is forgotten (its next occurrence is a new
/// event object), as client-go's aggregation window.
pub const FORGET_AFTER: Duration = Duration::from_mins(10);
/// At most this many keys are remembered (the least recently seen go).
pub const MAX_KEYS: usize = 4096;

/// What makes two events the same one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    pod_uid: String,
    kind: &'static str,
    reason: &'static str,
    message: String,
}

#[derive(Debug)]
struct Entry {
    seen: Occurrences,
    last_seen: Instant,
    written: Instant,
    /// Seen since the last write.
    dirty: bool,
}

/// One event write due: the pod, what, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The pod's uid.
    pub pod_uid: String,
    /// What happened.
    pub note: PodEventNote,
    /// The Event object's name and counts.
    pub seen: Occurrences,
}

/// Folds repeats of one event into count bumps of one Event object (see
/// the module docs); pure, so the policy is testable without a control.
#[derive(Debug, Default)]
pub struct Aggregator {
    entries: HashMap<Key, Entry>,
    /// The nanoseconds in the last name handed out (names stay unique
    /// even for events noted within one clock tick).
    last_stamp: u128,
}

impl Aggregator {
    /// Notes one occurrence of `note` about pod `pod_uid` (named `pod_name`)
    /// at `now` (`unix` seconds); the write due now, if any (the first
    /// occurrence at once, a repeat once [`REWRITE_AFTER`] has passed since
    /// the last write, else later through [`Aggregator::due`]).
    pub fn observe(
        &mut self,
        pod_uid: &str,
        pod_name: &str,
        note: &PodEventNote,
        now: Instant,
        unix: Duration,
    ) -> Option<Due> {
        let key = Key {
            pod_uid: pod_uid.to_owned(),
            kind: note.kind,
            reason: note.reason,
            message: note.message.clone(),
        };
        if let Some(e) = self.entries.get_mut(&key) {
            e.seen.count = e.seen.count.saturating_add(1);
            e.seen.last = unix.as_secs();
            e.last_seen = now;
            e.dirty = true;
            if now.duration_since(e.written) < REWRITE_AFTER {
                return None;
            }
            e.written = now;
            e.dirty = false;
            return Some(due(&key, &e.seen));
        }
        if self.entries.len() >= MAX_KEYS {
            self.evict_oldest();
        }
        self.last_stamp = unix.as_nanos().max(self.last_stamp + 1);
        let seen = Occurrences {
            name: format!("{pod_name}.{:x}", self.last_stamp),
            count: 1,
            first: unix.as_secs(),
            last: unix.as_secs(),
        };
        let out = due(&key, &seen);
        self.entries.insert(
            key,
            Entry {
                seen,
                last_seen: now,
                written: now,
                dirty: false,
            },
        );
        Some(out)
    }

    /// The repeats whose write is due at `now`; forgets keys not seen for
    /// [`FORGET_AFTER`] and those of pods `live` says are gone.
    pub fn due(&mut self, now: Instant, live: impl Fn(&str) -> bool) -> Vec<Due> {
        self.entries
            .retain(|k, e| live(&k.pod_uid) && now.duration_since(e.last_seen) < FORGET_AFTER);
        let mut out = Vec::new();
        for (k, e) in &mut self.entries {
            if e.dirty && now.duration_since(e.written) >= REWRITE_AFTER {
                e.dirty = false;
                e.written = now;
                out.push(due(k, &e.seen));
            }
        }
        out
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.entries.remove(&k);
        }
    }
}

fn due(key: &Key, seen: &Occurrences) -> Due {
    Due {
        pod_uid: key.pod_uid.clone(),
        note: PodEventNote {
            kind: key.kind,
            reason: key.reason,
            message: key.message.clone(),
        },
        seen: seen.clone(),
    }
}

/// A probe note as the pod event it is.
fn probe_event(n: &probe::Note) -> PodEventNote {
    PodEventNote {
        kind: if n.warning { "Warning" } else { "Normal" },
        reason: n.reason,
        message: n.message.clone(),
    }
}

/// Records the pods' probe events (aggregated) until `cancel`.
pub(crate) async fn record_probes(sh: Arc<Shared>, cancel: CancellationToken) {
    let mut notes = sh.mgr.probe_notes();
    let mut agg = Aggregator::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let writes = tokio::select! {
            () = cancel.cancelled() => return,
            r = notes.recv() => match r {
                Ok(n) => {
                    let Some(pod) = pod_of(&sh, &n.pod_uid) else { continue };
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    agg.observe(&n.pod_uid, &name, &probe_event(&n), Instant::now(), unix_now())
                        .into_iter()
                        .collect()
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "probe events dropped: the recorder fell behind");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                let d = sh.desired();
                agg.due(Instant::now(), |uid| d.pods.contains_key(uid))
            }
        };
        for w in writes {
            if let Some(pod) = pod_of(&sh, &w.pod_uid) {
                write(&sh, &pod, &w).await;
            }
        }
    }
}

/// The control's pod of `uid`, if it is still desired.
fn pod_of(sh: &Shared, uid: &str) -> Option<Pod> {
    sh.desired().pods.get(uid).map(|p| p.pod.clone())
}

async fn write(sh: &Shared, pod: &Pod, w: &Due) {
    let e = event_json_seen(pod, &w.note, sh.node(), &w.seen);
    let req = v1::ApplyRequest {
        manifest_json: e.to_string(),
        field_manager: COMPONENT.to_owned(),
    };
    let mut client = sh.control.objects.clone();
    match tokio::time::timeout(CALL_TIMEOUT, client.apply(req)).await {
        Ok(Ok(_)) => {}
        Ok(Err(s)) => {
            tracing::debug!(reason = w.note.reason, error = %s.message(), "event not recorded");
        }
        Err(_) => tracing::debug!(reason = w.note.reason, "event not recorded: timed out"),
    }
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

    fn note(message: &str) -> PodEventNote {
        warning("Unhealthy", message.into())
    }

    #[test]
    fn repeats_bump_the_count_of_one_event_at_most_every_rewrite_interval() {
        let mut a = Aggregator::default();
        let t0 = Instant::now();
        let unix = Duration::from_secs(1_000);
        let live = |_: &str| true;
        let first = a
            .observe("u1", "web", &note("Readiness probe failed: 500"), t0, unix)
            .expect("the first occurrence is written at once");
        assert_eq!(first.seen.count, 1);
        assert!(first.seen.name.starts_with("web."));
        // Repeats within the interval wait; then one write carries them all.
        for s in 1..=3 {
            let t = t0 + Duration::from_secs(s);
            let unix = unix + Duration::from_secs(s);
            assert_eq!(
                a.observe("u1", "web", &note("Readiness probe failed: 500"), t, unix),
                None
            );
        }
        assert!(a.due(t0 + Duration::from_secs(5), live).is_empty());
        let later = a.due(t0 + REWRITE_AFTER, live);
        assert_eq!(later.len(), 1, "{later:?}");
        assert_eq!(later[0].seen.name, first.seen.name, "the same object");
        assert_eq!(later[0].seen.count, 4);
        assert_eq!((later[0].seen.first, later[0].seen.last), (1_000, 1_003));
        assert!(
            a.due(t0 + REWRITE_AFTER * 2, live).is_empty(),
            "nothing new"
        );
        // A repeat after the interval is written at once.
        let t = t0 + REWRITE_AFTER * 3;
        let now = a
            .observe("u1", "web", &note("Readiness probe failed: 500"), t, unix)
            .expect("due");
        assert_eq!(
            (now.seen.count, now.seen.name),
            (5, first.seen.name.clone())
        );
        // Another message, type or pod is another event.
        let other = a
            .observe("u1", "web", &note("Readiness probe failed: 503"), t, unix)
            .expect("new");
        assert_ne!(other.seen.name, first.seen.name);
        assert!(
            a.observe("u2", "web2", &note("Readiness probe failed: 500"), t, unix)
                .is_some()
        );
        let normal = PodEventNote {
            kind: "Normal",
            ..note("Readiness probe failed: 500")
        };
        assert!(a.observe("u1", "web", &normal, t, unix).is_some());
        assert_eq!(a.len(), 4);
        // Gone pods and stale keys are forgotten.
        a.due(t, |uid| uid != "u2");
        assert_eq!(a.len(), 3);
        a.due(t + FORGET_AFTER, live);
        assert!(a.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut a = Aggregator::default();
        let t0 = Instant::now();
        for i in 0..=MAX_KEYS {
            let t = t0 + Duration::from_millis(u64::try_from(i).unwrap());
            a.observe("u1", "web", &note(&format!("m{i}")), t, Duration::ZERO);
        }
        assert_eq!(a.len(), MAX_KEYS);
    }

    #[test]
    fn aggregated_events_keep_name_count_and_first_time() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web".into());
        pod.metadata.uid = Some("u1".into());
        let seen = Occurrences {
            name: "web.abc".into(),
            count: 7,
            first: 1_700_000_000,
            last: 1_700_000_060,
        };
        let e = event_json_seen(&pod, &note("Liveness probe failed: x"), "n1", &seen);
        assert_eq!(e["metadata"]["name"], "web.abc");
        assert_eq!(e["count"], 7);
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["firstTimestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(e["lastTimestamp"], "2023-11-14T22:14:20Z");
        serde_json::from_value::<k8s_openapi::api::core::v1::Event>(e).expect("an Event");
    }
}
