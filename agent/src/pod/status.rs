//! Pod status as Kubernetes shows it: phase, conditions, container states,
//! restart counts, exit codes and reasons. Pure functions of the worker's
//! view, so the rules are unit-tested without containerd.

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
        ContainerStatus, PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};

use crate::state::{ContainerRecord, Terminated};

/// The live state of one container, as the worker knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Live {
    /// Not running; `reason` says why (`ContainerCreating`, `ErrImageNeverPull`,
    /// `CrashLoopBackOff`, ...).
    Waiting {
        /// Kubernetes-style reason.
        reason: String,
        /// Human detail.
        message: Option<String>,
    },
    /// Running since `started_at` (unix seconds).
    Running {
        /// Unix seconds.
        started_at: i64,
    },
    /// Finished and will not be restarted.
    Terminated(Terminated),
}

/// One container's status inputs.
#[derive(Clone, Debug)]
pub struct ContainerView {
    /// Container name.
    pub name: String,
    /// Image reference as written in the manifest.
    pub image: String,
    /// Live state.
    pub live: Live,
    /// Persisted counters and last termination.
    pub record: ContainerRecord,
    /// The startup probe succeeded (or there is none), while running.
    pub started: bool,
    /// Ready (readiness probe succeeded, or none and started), while running.
    pub ready: bool,
}

/// Whether a container that exited with `exit_code` is restarted under `policy`.
pub fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// Delay before restart number `backoff_index` (0-based): the first restart
/// is immediate, then `initial`, doubling, capped at `max` (kubelet's rule).
pub fn restart_delay(backoff_index: u32, initial: Duration, max: Duration) -> Duration {
    if backoff_index == 0 {
        return Duration::ZERO;
    }
    let shift = (backoff_index - 1).min(20);
    initial.saturating_mul(1 << shift).min(max)
}

/// The pod phase: Pending until every container has started once; then
/// Running while any runs or will restart; Succeeded when all finished with
/// 0 for good; Failed when all finished for good and one failed.
pub fn phase(containers: &[ContainerView]) -> &'static str {
    let never_started = containers.iter().any(|c| {
        matches!(c.live, Live::Waiting { .. })
            && c.record.restart_count == 0
            && c.record.last_terminated.is_none()
    });
    if never_started {
        return "Pending";
    }
    let all_done = containers
        .iter()
        .all(|c| matches!(c.live, Live::Terminated(_)));
    if !all_done {
        return "Running";
    }
    let failed = containers
        .iter()
        .any(|c| matches!(&c.live, Live::Terminated(t) if t.exit_code != 0));
    if failed { "Failed" } else { "Succeeded" }
}

fn time(unix: Option<i64>) -> Option<Time> {
    unix.and_then(|s| Timestamp::from_second(s).ok()).map(Time)
}

fn terminated_state(t: &Terminated) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: t.exit_code,
        reason: Some(t.reason.clone()),
        message: t.message.clone(),
        started_at: time(t.started_at),
        finished_at: time(t.finished_at),
        ..Default::default()
    }
}

fn condition(kind: &str, ok: bool, now: i64) -> PodCondition {
    PodCondition {
        type_: kind.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        last_transition_time: time(Some(now)),
        ..Default::default()
    }
}

/// Keeps each condition's `lastTransitionTime` from `old` while its status
/// holds, as the kubelet does: the time says when it last changed, not
/// when the status was last built.
pub fn keep_transition_times(new: &mut PodStatus, old: Option<&PodStatus>) {
    let (Some(conds), Some(old)) = (
        new.conditions.as_mut(),
        old.and_then(|o| o.conditions.as_ref()),
    ) else {
        return;
    };
    for c in conds {
        if let Some(prev) = old
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time
                .clone_from(&prev.last_transition_time);
        }
    }
}

/// Builds the `PodStatus`.
pub fn pod_status(
    containers: &[ContainerView],
    pod_ip: Option<std::net::Ipv4Addr>,
    host_ip: Option<&str>,
    start: i64,
    now: i64,
) -> PodStatus {
    let statuses: Vec<ContainerStatus> = containers
        .iter()
        .map(|c| {
            let state = match &c.live {
                Live::Waiting { reason, message } => ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: message.clone(),
                    }),
                    ..Default::default()
                },
                Live::Running { started_at } => ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: time(Some(*started_at)),
                    }),
                    ..Default::default()
                },
                Live::Terminated(t) => ContainerState {
                    terminated: Some(terminated_state(t)),
                    ..Default::default()
                },
            };
            let last_state = match (&c.live, &c.record.last_terminated) {
                (Live::Terminated(_), _) | (_, None) => None,
                (_, Some(t)) => Some(ContainerState {
                    terminated: Some(terminated_state(t)),
                    ..Default::default()
                }),
            };
            let running = matches!(c.live, Live::Running { .. });
            ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone(),
                image_id: String::new(),
                container_id: Some(format!("containerd://{}", c.record.id)),
                ready: running && c.ready,
                started: Some(running && c.started),
                restart_count: i32::try_from(c.record.restart_count).unwrap_or(i32::MAX),
                state: Some(state),
                last_state,
                ..Default::default()
            }
        })
        .collect();
    let ready = !containers.is_empty()
        && containers
            .iter()
            .all(|c| matches!(c.live, Live::Running { .. }) && c.ready);
    PodStatus {
        phase: Some(phase(containers).to_owned()),
        conditions: Some(vec![
            condition("PodScheduled", true, start),
            condition("Initialized", true, start),
            condition("ContainersReady", ready, now),
            condition("Ready", ready, now),
        ]),
        container_statuses: Some(statuses),
        pod_ip: pod_ip.map(|ip| ip.to_string()),
        pod_ips: pod_ip.map(|ip| vec![PodIP { ip: ip.to_string() }]),
        host_ip: host_ip.map(str::to_owned),
        start_time: time(Some(start)),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(live: Live, restarts: u32) -> ContainerView {
        ContainerView {
            name: "c".into(),
            image: "busybox".into(),
            live,
            record: ContainerRecord {
                id: "x-c".into(),
                restart_count: restarts,
                ..Default::default()
            },
            started: true,
            ready: true,
        }
    }

    fn waiting(reason: &str) -> Live {
        Live::Waiting {
            reason: reason.into(),
            message: None,
        }
    }

    fn done(code: i32) -> Live {
        Live::Terminated(Terminated {
            exit_code: code,
            reason: "x".into(),
            ..Default::default()
        })
    }

    #[test]
    fn restart_policy() {
        assert!(should_restart("Always", 0));
        assert!(should_restart("Always", 1));
        assert!(!should_restart("OnFailure", 0));
        assert!(should_restart("OnFailure", 2));
        assert!(!should_restart("Never", 2));
    }

    #[test]
    fn backoff_doubles_to_cap() {
        let (i, m) = (Duration::from_secs(10), Duration::from_mins(5));
        let d: Vec<u64> = (0..8).map(|n| restart_delay(n, i, m).as_secs()).collect();
        assert_eq!(d, vec![0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(restart_delay(1000, i, m), m);
    }

    #[test]
    fn phases() {
        assert_eq!(phase(&[view(waiting("ContainerCreating"), 0)]), "Pending");
        assert_eq!(
            phase(&[
                view(Live::Running { started_at: 1 }, 0),
                view(waiting("ErrImageNeverPull"), 0)
            ]),
            "Pending"
        );
        assert_eq!(phase(&[view(waiting("CrashLoopBackOff"), 3)]), "Running");
        assert_eq!(
            phase(&[view(Live::Running { started_at: 1 }, 0), view(done(0), 0)]),
            "Running"
        );
        assert_eq!(phase(&[view(done(0), 0), view(done(0), 0)]), "Succeeded");
        assert_eq!(phase(&[view(done(0), 0), view(done(137), 0)]), "Failed");
    }

    #[test]
    fn status_carries_reasons_and_last_state() {
        let mut v = view(waiting("CrashLoopBackOff"), 2);
        v.record.last_terminated = Some(Terminated {
            exit_code: 137,
            reason: "OOMKilled".into(),
            ..Default::default()
        });
        let s = pod_status(&[v], Some("10.244.1.2".parse().expect("ip")), None, 1, 2);
        let cs = &s.container_statuses.expect("statuses")[0];
        assert_eq!(cs.restart_count, 2);
        assert_eq!(
            cs.state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref()),
            Some("CrashLoopBackOff")
        );
        let last = cs
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .expect("last state");
        assert_eq!(
            (last.exit_code, last.reason.as_deref()),
            (137, Some("OOMKilled"))
        );
        assert_eq!(s.pod_ip.as_deref(), Some("10.244.1.2"));
        let ready = s
            .conditions
            .expect("conditions")
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.status, "False");
    }

    #[test]
    fn transition_times_hold_while_the_status_holds() {
        let v = |ready| {
            let mut v = view(Live::Running { started_at: 1 }, 0);
            v.ready = ready;
            v
        };
        let old = pod_status(&[v(false)], None, None, 1, 100);
        let mut new = pod_status(&[v(false)], None, None, 1, 200);
        keep_transition_times(&mut new, Some(&old));
        let at = |s: &PodStatus, kind: &str| {
            s.conditions
                .as_ref()
                .and_then(|c| c.iter().find(|c| c.type_ == kind))
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0.as_second())
        };
        assert_eq!(at(&new, "Ready"), Some(100), "unchanged: kept");
        let mut ready = pod_status(&[v(true)], None, None, 1, 300);
        keep_transition_times(&mut ready, Some(&new));
        assert_eq!(at(&ready, "Ready"), Some(300), "changed: now");
        assert_eq!(at(&ready, "PodScheduled"), at(&old, "PodScheduled"));
        let mut first = pod_status(&[v(true)], None, None, 1, 400);
        keep_transition_times(&mut first, None);
        assert_eq!(at(&first, "Ready"), Some(400));
    }
}
