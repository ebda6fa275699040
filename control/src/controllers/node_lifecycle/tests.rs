//! Unit tests of the node lifecycle decisions.

use serde_json::json;

use super::*;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

fn node(ready: Option<(&str, i64)>) -> Node {
    let conditions = match ready {
        Some((status, beat)) => json!([{"type": "Ready", "status": status,
            "lastHeartbeatTime": at(beat).to_string()}]),
        None => json!([]),
    };
    serde_json::from_value(json!({
        "metadata": {"name": "n1", "creationTimestamp": at(100).to_string()},
        "status": {"conditions": conditions},
    }))
    .unwrap()
}

const GRACE: Duration = Duration::from_secs(40);

#[test]
fn heartbeat_within_grace_is_fine_and_says_when_to_look_again() {
    let v = verdict(&node(Some(("True", 1000))), GRACE, at(1010), None);
    assert!(!v.mark_unknown);
    assert_eq!(v.ready.as_deref(), Some("True"));
    assert_eq!(v.recheck, Some(Duration::from_secs(30)));
}

#[test]
fn overdue_heartbeat_marks_unknown_once() {
    let v = verdict(&node(Some(("True", 1000))), GRACE, at(1040), None);
    assert!(v.mark_unknown);
    assert_eq!(v.ready.as_deref(), Some("Unknown"));
    let v = verdict(&node(Some(("Unknown", 1000))), GRACE, at(1100), None);
    assert!(!v.mark_unknown, "already Unknown");
    assert_eq!(v.ready.as_deref(), Some("Unknown"));
    // Never reported: judged from the node's creation, taints left alone
    // until then.
    let fresh = verdict(&node(None), GRACE, at(120), None);
    assert!(!fresh.mark_unknown);
    assert_eq!(fresh.ready, None);
    assert!(verdict(&node(None), GRACE, at(141), None).mark_unknown);
}

#[test]
fn a_control_that_was_away_gives_every_node_a_full_grace_period() {
    // The control plane comes back at 5000 to a heartbeat from 1000: the
    // node is judged from when the controller first sees it, not evicted.
    let probes = Probes::default();
    let n = node(Some(("True", 1000)));
    let observed = probes.observe(&n, at(5000));
    assert_eq!(observed, at(5000));
    let v = verdict(&n, GRACE, at(5001), Some(observed));
    assert!(!v.mark_unknown, "fresh grace after the control's absence");
    // The heartbeat never changes again: the grace runs out as usual.
    let observed = probes.observe(&n, at(5040));
    assert_eq!(observed, at(5000), "same heartbeat: first sighting kept");
    assert!(verdict(&n, GRACE, at(5040), Some(observed)).mark_unknown);
    // A new heartbeat restarts the clock.
    let n = node(Some(("True", 5030)));
    let observed = probes.observe(&n, at(5041));
    assert_eq!(observed, at(5041));
    assert!(!verdict(&n, GRACE, at(5050), Some(observed)).mark_unknown);
}

#[test]
fn ready_false_keeps_its_status() {
    let v = verdict(&node(Some(("False", 1000))), GRACE, at(1001), None);
    assert!(!v.mark_unknown);
    assert_eq!(v.ready.as_deref(), Some("False"));
}

fn taint(key: &str, effect: &str, added: i64) -> Taint {
    Taint {
        key: key.into(),
        effect: effect.into(),
        value: None,
        time_added: Some(Time(at(added))),
    }
}

#[test]
fn taints_follow_readiness_and_keep_user_taints() {
    let user = taint("gpu", "NoSchedule", 1);
    let now = at(500);
    let added = desired_taints(std::slice::from_ref(&user), "Unknown", now).unwrap();
    assert_eq!(
        added,
        vec![
            user.clone(),
            taint(UNREACHABLE, "NoSchedule", 500),
            taint(UNREACHABLE, "NoExecute", 500)
        ]
    );
    assert_eq!(
        desired_taints(&added, "Unknown", at(900)),
        None,
        "stable, timeAdded kept"
    );
    assert_eq!(
        desired_taints(&added, "True", now),
        Some(vec![user.clone()])
    );
    let not_ready = desired_taints(&added, "False", now).unwrap();
    assert!(not_ready.iter().all(|t| t.key != UNREACHABLE));
    assert_eq!(not_ready.iter().filter(|t| t.key == NOT_READY).count(), 2);
    assert_eq!(desired_taints(&[], "True", now), None);
}

fn pod(tolerations: &serde_json::Value) -> Pod {
    serde_json::from_value(
        json!({"metadata": {"name": "p"}, "spec": {"containers": [], "tolerations": tolerations}}),
    )
    .unwrap()
}

#[test]
fn eviction_honours_tolerations_and_their_seconds() {
    let taints = vec![
        taint(UNREACHABLE, "NoExecute", 1000),
        taint(UNREACHABLE, "NoSchedule", 1000),
    ];
    assert_eq!(eviction(&pod(&json!([])), &taints, at(1000)), Eviction::Now);
    let forever = pod(&json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}]));
    assert_eq!(eviction(&forever, &taints, at(5000)), Eviction::Never);
    let for_300 = pod(
        &json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]),
    );
    assert_eq!(
        eviction(&for_300, &taints, at(1100)),
        Eviction::After(Duration::from_secs(200))
    );
    assert_eq!(eviction(&for_300, &taints, at(1300)), Eviction::Now);
    // Tolerating one NoExecute taint but not another still evicts.
    let more = vec![taints[0].clone(), taint("dedicated", "NoExecute", 1000)];
    assert_eq!(eviction(&forever, &more, at(1000)), Eviction::Now);
    // NoSchedule taints never evict.
    assert_eq!(
        eviction(&pod(&json!([])), &taints[1..], at(1000)),
        Eviction::Never
    );
}
