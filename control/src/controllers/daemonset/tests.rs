//! Unit tests of the `DaemonSet` controller's pure decisions.

use serde_json::json;

use super::*;

fn node(name: &str, labels: &serde_json::Value, taints: &serde_json::Value) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": taints},
    }))
    .unwrap()
}

fn ds(template_spec: &serde_json::Value) -> DaemonSet {
    serde_json::from_value(json!({
        "metadata": {"name": "agent", "namespace": "kube-system", "uid": "u1", "generation": 1},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}}, "spec": template_spec},
        }
    }))
    .unwrap()
}

#[test]
fn eligibility_follows_selector_affinity_and_taints() {
    let plain = ds(&json!({"containers": [], "nodeSelector": {"disk": "ssd"}}));
    let t = daemon_template(&plain);
    assert_eq!(
        should_run(&t, &node("a", &json!({"disk": "ssd"}), &json!([]))),
        (true, true)
    );
    assert_eq!(
        should_run(&t, &node("b", &json!({}), &json!([]))),
        (false, false)
    );
    // Standard daemon tolerations: unreachable/not-ready NoExecute and
    // unschedulable NoSchedule are tolerated.
    let tainted = node(
        "c",
        &json!({"disk": "ssd"}),
        &json!([{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
               {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]),
    );
    assert_eq!(should_run(&t, &tainted), (true, true));
    // A user NoSchedule taint: don't start, but keep running.
    let no_schedule = node(
        "d",
        &json!({"disk": "ssd"}),
        &json!([{"key": "gpu", "effect": "NoSchedule"}]),
    );
    assert_eq!(should_run(&t, &no_schedule), (false, true));
    // A user NoExecute taint: neither.
    let no_execute = node(
        "e",
        &json!({"disk": "ssd"}),
        &json!([{"key": "gpu", "value": "x", "effect": "NoExecute"}]),
    );
    assert_eq!(should_run(&t, &no_execute), (false, false));
    // ...unless tolerated.
    let tolerant =
        ds(&json!({"containers": [], "tolerations": [{"key": "gpu", "operator": "Exists"}]}));
    assert_eq!(
        should_run(&daemon_template(&tolerant), &no_execute),
        (true, true)
    );
    // Required node affinity.
    let affine = ds(&json!({"containers": [], "affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1", "z2"]}]}]}}}}));
    let t = daemon_template(&affine);
    assert!(should_run(&t, &node("f", &json!({"zone": "z2"}), &json!([]))).0);
    assert!(!should_run(&t, &node("g", &json!({"zone": "z3"}), &json!([]))).0);
}

#[test]
fn daemon_pods_carry_tolerations_and_are_pinned_to_their_node() {
    let d = ds(&json!({"containers": [{"name": "c", "image": "i"}]}));
    let t = daemon_template(&d);
    let pod = pod_for_node(&d, &t, "node-1");
    assert!(meta::name(&pod.metadata).starts_with("agent-"));
    assert_eq!(pod.metadata.namespace.as_deref(), Some("kube-system"));
    assert_eq!(meta::controller_of(&pod.metadata).unwrap().uid, "u1");
    assert_eq!(target_node(&pod).as_deref(), Some("node-1"));
    assert_eq!(meta::pod_node(&pod), "", "the scheduler binds it");
    let tolerations = pod.spec.as_ref().unwrap().tolerations.as_ref().unwrap();
    assert_eq!(tolerations.len(), 6);
    assert!(meta::labels(&pod.metadata).contains_key(REVISION_HASH_LABEL));
    // Adding the tolerations twice doesn't duplicate them.
    let mut again = d.clone();
    again.spec.template = t.clone();
    assert_eq!(
        daemon_template(&again)
            .spec
            .unwrap()
            .tolerations
            .unwrap()
            .len(),
        6
    );
}

fn pod(name: &str, hash: &str, ready: bool, created: i64) -> Arc<Pod> {
    let conditions = if ready {
        json!([{"type": "Ready", "status": "True"}])
    } else {
        json!([])
    };
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {REVISION_HASH_LABEL: hash},
                "creationTimestamp": Timestamp::from_second(created).unwrap().to_string()},
            "status": {"phase": "Running", "conditions": conditions},
        }))
        .unwrap(),
    )
}

fn state(node: &str, run: (bool, bool), pods: Vec<Arc<Pod>>) -> NodeState {
    NodeState {
        node: node.into(),
        should_run: run.0,
        should_continue: run.1,
        pods,
        terminating: false,
    }
}

#[test]
fn plan_creates_missing_and_removes_extra_and_misscheduled() {
    let now = Timestamp::from_second(1000).unwrap();
    let nodes = vec![
        state("a", (true, true), vec![]),
        state(
            "b",
            (true, true),
            vec![pod("b1", "h", true, 1), pod("b2", "h", true, 2)],
        ),
        state("c", (false, false), vec![pod("c1", "h", true, 1)]),
        state("d", (false, true), vec![pod("d1", "h", true, 1)]),
        NodeState {
            terminating: true,
            ..state("e", (true, true), vec![])
        },
    ];
    let p = plan(&nodes, "h", Some(1), 0, now);
    assert_eq!(p.create_on, vec!["a".to_owned()]);
    assert_eq!(p.delete, vec!["b2".to_owned(), "c1".to_owned()]);
}

#[test]
fn rolling_update_replaces_at_most_max_unavailable() {
    let now = Timestamp::from_second(1000).unwrap();
    let nodes: Vec<NodeState> = (0..5)
        .map(|i| {
            state(
                &format!("n{i}"),
                (true, true),
                vec![pod(&format!("p{i}"), "old", true, 1)],
            )
        })
        .collect();
    assert_eq!(plan(&nodes, "new", Some(2), 0, now).delete.len(), 2);
    // One node already without a pod: only one more may go.
    let mut fewer = nodes.clone();
    fewer[0].pods.clear();
    let p = plan(&fewer, "new", Some(2), 0, now);
    assert_eq!(p.delete.len(), 1);
    assert_eq!(p.create_on, vec!["n0".to_owned()]);
    // Old pods that are not ready anyway are replaced regardless.
    let mut unready = nodes.clone();
    unready[1].pods = vec![pod("bad", "old", false, 1)];
    unready[2].pods = vec![pod("bad2", "old", false, 1)];
    let p = plan(&unready, "new", Some(1), 0, now);
    assert_eq!(p.delete, vec!["bad".to_owned(), "bad2".to_owned()]);
    // Up to date: nothing to do.
    let current: Vec<NodeState> = (0..3)
        .map(|i| {
            state(
                &format!("n{i}"),
                (true, true),
                vec![pod(&format!("p{i}"), "h", true, 1)],
            )
        })
        .collect();
    assert_eq!(plan(&current, "h", Some(1), 0, now), Plan::default());
}

#[test]
fn on_delete_keeps_old_pods_and_new_unready_ones() {
    let now = Timestamp::from_second(1000).unwrap();
    let nodes = vec![
        state("old-ready", (true, true), vec![pod("a", "old", true, 1)]),
        state("old-unready", (true, true), vec![pod("b", "old", false, 1)]),
        // Just created from the current template, not ready yet.
        state("new-starting", (true, true), vec![pod("c", "h", false, 1)]),
        // Its old pod was deleted by the user: it gets a new one.
        state("deleted", (true, true), vec![]),
        // Duplicates still go, and pods on nodes that must not run it.
        state(
            "dup",
            (true, true),
            vec![pod("d1", "old", true, 1), pod("d2", "h", true, 2)],
        ),
        state("gone", (false, false), vec![pod("e", "old", true, 1)]),
    ];
    let p = plan(&nodes, "h", None, 0, now);
    assert_eq!(p.create_on, vec!["deleted".to_owned()]);
    assert_eq!(p.delete, vec!["d2".to_owned(), "e".to_owned()]);
    // The same nodes under RollingUpdate replace old pods, never new ones.
    let p = plan(&nodes, "h", Some(1), 0, now);
    assert!(p.delete.contains(&"b".to_owned()), "{p:?}");
    assert!(!p.delete.contains(&"c".to_owned()), "{p:?}");
}

#[test]
fn status_counts_per_node() {
    let d = ds(&json!({"containers": []}));
    let now = Timestamp::from_second(1000).unwrap();
    let nodes = vec![
        state("a", (true, true), vec![pod("a1", "h", true, 1)]),
        state("b", (true, true), vec![pod("b1", "old", false, 1)]),
        state("c", (true, true), vec![]),
        state("d", (false, true), vec![pod("d1", "h", true, 1)]),
    ];
    let s = status_of(&d, &nodes, "h", now);
    assert_eq!(s.desired_number_scheduled, 3);
    assert_eq!(s.current_number_scheduled, 2);
    assert_eq!(s.number_misscheduled, 1);
    assert_eq!(s.number_ready, 1);
    assert_eq!(s.updated_number_scheduled, Some(1));
    assert_eq!(s.number_available, Some(1));
    assert_eq!(s.number_unavailable, Some(2));
    assert_eq!(s.observed_generation, Some(1));
}
