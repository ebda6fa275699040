//! Unit tests of the decision logic: every filter and score, preemption's
//! choice and the unschedulable message, on hand-built caches.

use std::sync::Arc;

use serde_json::{Value, json};
use weir_proto::v1;

use super::decide::{Core, Decision, victims_on};
use super::model::{NodeInfo, PodInfo, node_from_object, pod_from_object};
use super::plugins::{self, PodContext, Reason, ScoreScratch, nodes_to_find};
use super::{Config, Weights};

fn object(doc: &Value) -> v1::Object {
    v1::Object {
        meta: Some(v1::ObjectMeta {
            name: doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            namespace: doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            ..Default::default()
        }),
        json: doc.to_string(),
    }
}

/// A Ready node: `extra` is merged into the manifest (spec, labels...).
fn node(name: &str, cpu: &str, memory: &str, extra: &Value) -> NodeInfo {
    let mut doc = json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    });
    merge(&mut doc, extra);
    node_from_object(&object(&doc)).unwrap()
}

/// A pod requesting `cpu`/`memory`; `extra` merged into the manifest.
fn pod(name: &str, cpu: &str, memory: &str, extra: &Value) -> PodInfo {
    let mut doc = json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "c", "image": "busybox",
                 "resources": {"requests": {"cpu": cpu, "memory": memory}}}]},
    });
    merge(&mut doc, extra);
    pod_from_object(&object(&doc)).unwrap()
}

fn merge(doc: &mut Value, extra: &Value) {
    match (doc, extra) {
        (_, Value::Null) => {}
        (Value::Object(d), Value::Object(e)) => {
            for (k, v) in e {
                merge(d.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (d, e) => *d = e.clone(),
    }
}

fn core_with(nodes: Vec<NodeInfo>) -> Core {
    let mut core = Core::new(Config::default());
    for n in nodes {
        core.cache.upsert_node(n);
    }
    core
}

/// Places `pod` on `node` in the cache (as a bound pod).
fn place(core: &mut Core, mut pod: PodInfo, node: &str) {
    pod.node_name = Some(node.to_owned());
    core.cache.upsert_pod(Arc::new(pod));
}

fn filter(core: &Core, pod: &PodInfo, node: &str) -> Result<(), Reason> {
    let ctx = PodContext::new(pod, &core.cache);
    let i = core.cache.node_index(node).unwrap();
    plugins::filter(&ctx, pod, &core.cache.nodes()[i])
}

fn bound_to(core: &mut Core, pod: &PodInfo) -> String {
    match core.schedule(pod) {
        Decision::Bind(i) => core.cache.nodes()[i].name().to_owned(),
        Decision::Unschedulable { message, .. } => panic!("unschedulable: {message}"),
    }
}

fn message_of(core: &mut Core, pod: &PodInfo) -> String {
    match core.schedule(pod) {
        Decision::Bind(i) => panic!("bound to {}", core.cache.nodes()[i].name()),
        Decision::Unschedulable { message, .. } => message,
    }
}

const NONE: &Value = &Value::Null;

#[test]
fn filter_resources_counts_assumed_pods_and_pod_count() {
    let mut core = core_with(vec![node("n1", "1", "1Gi", NONE)]);
    let p = pod("p", "600m", "100Mi", NONE);
    assert_eq!(filter(&core, &p, "n1"), Ok(()));
    place(&mut core, pod("a", "500m", "950Mi", NONE), "n1");
    assert_eq!(
        filter(&core, &p, "n1"),
        Err(Reason::Insufficient {
            cpu: true,
            memory: true,
            pods: false
        })
    );
    // An assumed pod counts too.
    let mut core = core_with(vec![node(
        "n1",
        "1",
        "1Gi",
        &json!({"status": {"allocatable": {"pods": "1"}}}),
    )]);
    let a = Arc::new(pod("a", "0", "0", NONE));
    core.cache.upsert_pod(Arc::clone(&a));
    core.cache.assume(&a.key, 0);
    assert_eq!(
        filter(&core, &pod("b", "0", "0", NONE), "n1"),
        Err(Reason::Insufficient {
            cpu: false,
            memory: false,
            pods: true
        })
    );
}

#[test]
fn filter_node_selector_and_required_node_affinity_operators() {
    let core = core_with(vec![node(
        "n1",
        "1",
        "1Gi",
        &json!({"metadata": {"labels": {"disk": "ssd", "gen": "5"}}}),
    )]);
    let affinity = |exprs: Value, fields: Value| {
        json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions": exprs, "matchFields": fields}]}}}}})
    };
    let cases = [
        (json!({"spec": {"nodeSelector": {"disk": "ssd"}}}), true),
        (json!({"spec": {"nodeSelector": {"disk": "hdd"}}}), false),
        (
            affinity(
                json!([{"key": "disk", "operator": "In", "values": ["ssd", "nvme"]}]),
                json!([]),
            ),
            true,
        ),
        (
            affinity(
                json!([{"key": "disk", "operator": "NotIn", "values": ["ssd"]}]),
                json!([]),
            ),
            false,
        ),
        (
            affinity(json!([{"key": "disk", "operator": "Exists"}]), json!([])),
            true,
        ),
        (
            affinity(json!([{"key": "gpu", "operator": "Exists"}]), json!([])),
            false,
        ),
        (
            affinity(
                json!([{"key": "gpu", "operator": "DoesNotExist"}]),
                json!([]),
            ),
            true,
        ),
        (
            affinity(
                json!([{"key": "gen", "operator": "Gt", "values": ["4"]}]),
                json!([]),
            ),
            true,
        ),
        (
            affinity(
                json!([{"key": "gen", "operator": "Lt", "values": ["4"]}]),
                json!([]),
            ),
            false,
        ),
        (
            affinity(
                json!([]),
                json!([{"key": "metadata.name", "operator": "In", "values": ["n1"]}]),
            ),
            true,
        ),
        (
            affinity(
                json!([]),
                json!([{"key": "metadata.name", "operator": "In", "values": ["n2"]}]),
            ),
            false,
        ),
        (affinity(json!([]), json!([])), false),
    ];
    for (extra, fits) in cases {
        let p = pod("p", "0", "0", &extra);
        let want = if fits {
            Ok(())
        } else {
            Err(Reason::NodeAffinity)
        };
        assert_eq!(filter(&core, &p, "n1"), want, "{extra}");
    }
}

#[test]
fn filter_taints_and_tolerations() {
    let tainted =
        |effect: &str| json!({"spec": {"taints": [{"key": "k", "value": "v", "effect": effect}]}});
    let core = core_with(vec![
        node("ns", "1", "1Gi", &tainted("NoSchedule")),
        node("ne", "1", "1Gi", &tainted("NoExecute")),
        node("np", "1", "1Gi", &tainted("PreferNoSchedule")),
    ]);
    let plain = pod("p", "0", "0", NONE);
    assert!(matches!(filter(&core, &plain, "ns"), Err(Reason::Taint(_))));
    assert!(matches!(filter(&core, &plain, "ne"), Err(Reason::Taint(_))));
    assert_eq!(
        filter(&core, &plain, "np"),
        Ok(()),
        "PreferNoSchedule only scores"
    );
    let tolerating = |t: Value| pod("t", "0", "0", &json!({"spec": {"tolerations": [t]}}));
    let equal =
        tolerating(json!({"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"}));
    assert_eq!(filter(&core, &equal, "ns"), Ok(()));
    assert!(filter(&core, &equal, "ne").is_err(), "effect must match");
    let exists = tolerating(json!({"key": "k", "operator": "Exists"}));
    assert_eq!(filter(&core, &exists, "ns"), Ok(()));
    assert_eq!(filter(&core, &exists, "ne"), Ok(()));
    let wrong_value = tolerating(json!({"key": "k", "value": "w"}));
    assert!(filter(&core, &wrong_value, "ns").is_err());
    let everything = tolerating(json!({"operator": "Exists"}));
    assert_eq!(filter(&core, &everything, "ne"), Ok(()));
}

#[test]
fn filter_cordoned_and_not_ready_nodes_unless_tolerated() {
    let core = core_with(vec![
        node(
            "cordoned",
            "1",
            "1Gi",
            &json!({"spec": {"unschedulable": true}}),
        ),
        node(
            "down",
            "1",
            "1Gi",
            &json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
        node(
            "lost",
            "1",
            "1Gi",
            &json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}),
        ),
    ]);
    let plain = pod("p", "0", "0", NONE);
    assert_eq!(
        filter(&core, &plain, "cordoned"),
        Err(Reason::Unschedulable)
    );
    assert!(matches!(
        filter(&core, &plain, "down"),
        Err(Reason::Taint(plugins::TaintRef::NotReady))
    ));
    assert!(matches!(
        filter(&core, &plain, "lost"),
        Err(Reason::Taint(plugins::TaintRef::Unreachable))
    ));
    let daemon = pod(
        "d",
        "0",
        "0",
        &json!({"spec": {"tolerations": [
            {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists"},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists"},
        ]}}),
    );
    for n in ["cordoned", "down", "lost"] {
        assert_eq!(filter(&core, &daemon, n), Ok(()), "{n}");
    }
}

#[test]
fn filter_host_ports() {
    let mut core = core_with(vec![node("n1", "1", "1Gi", NONE)]);
    let with_port = |name: &str, port: i64, proto: &str| {
        pod(
            name,
            "0",
            "0",
            &json!({"spec": {"containers": [{"name": "c", "image": "i",
            "ports": [{"containerPort": 80, "hostPort": port, "protocol": proto}]}]}}),
        )
    };
    place(&mut core, with_port("a", 8080, "TCP"), "n1");
    assert_eq!(
        filter(&core, &with_port("b", 8080, "TCP"), "n1"),
        Err(Reason::Ports)
    );
    assert_eq!(filter(&core, &with_port("c", 8080, "UDP"), "n1"), Ok(()));
    assert_eq!(filter(&core, &with_port("d", 8081, "TCP"), "n1"), Ok(()));
}

fn pod_affinity(kind: &str, app: &str) -> Value {
    json!({"spec": {"affinity": {kind: {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": app}}, "topologyKey": "kubernetes.io/hostname"}]}}}})
}

#[test]
fn filter_required_pod_affinity_and_anti_affinity() {
    let mut core = core_with(vec![
        node("n1", "1", "1Gi", NONE),
        node("n2", "1", "1Gi", NONE),
    ]);
    // Affinity: nobody matches yet, but the pod matches itself: anywhere.
    let mut follower = pod("f", "0", "0", &pod_affinity("podAffinity", "db"));
    follower.labels.insert("app".into(), "db".into());
    assert_eq!(filter(&core, &follower, "n1"), Ok(()));
    // Without matching itself, it needs a db pod.
    let web = pod("w", "0", "0", &pod_affinity("podAffinity", "db"));
    assert_eq!(filter(&core, &web, "n1"), Err(Reason::PodAffinity));
    let mut db = pod("db", "0", "0", NONE);
    db.labels.insert("app".into(), "db".into());
    place(&mut core, db, "n2");
    assert_eq!(filter(&core, &web, "n1"), Err(Reason::PodAffinity));
    assert_eq!(filter(&core, &web, "n2"), Ok(()));
    // Anti-affinity against the db pod.
    let loner = pod("l", "0", "0", &pod_affinity("podAntiAffinity", "db"));
    assert_eq!(filter(&core, &loner, "n2"), Err(Reason::PodAntiAffinity));
    assert_eq!(filter(&core, &loner, "n1"), Ok(()));
    // A placed pod's anti-affinity keeps matching pods off its node.
    let mut guard = pod("g", "0", "0", &pod_affinity("podAntiAffinity", "cache"));
    guard.labels.insert("app".into(), "guard".into());
    place(&mut core, guard, "n1");
    let mut cache = pod("c", "0", "0", NONE);
    cache.labels.insert("app".into(), "cache".into());
    assert_eq!(
        filter(&core, &cache, "n1"),
        Err(Reason::ExistingAntiAffinity)
    );
    assert_eq!(filter(&core, &cache, "n2"), Ok(()));
}

fn scores(core: &Core, pod: &PodInfo, weights: &Weights) -> Vec<(String, i64)> {
    let ctx = PodContext::new(pod, &core.cache);
    let nodes = core.cache.nodes();
    let feasible: Vec<usize> = (0..nodes.len()).collect();
    let mut scratch = ScoreScratch::default();
    plugins::score(&ctx, pod, nodes, &feasible, weights, &mut scratch);
    feasible
        .iter()
        .map(|&i| (nodes[i].name().to_owned(), scratch.total[i]))
        .collect()
}

fn only(f: impl FnOnce(&mut Weights)) -> Weights {
    let mut w = Weights {
        least_allocated: 0,
        most_allocated: 0,
        balanced_allocation: 0,
        selector_spread: 0,
        node_affinity: 0,
        pod_affinity: 0,
        taint_toleration: 0,
    };
    f(&mut w);
    w
}

#[test]
fn score_least_and_most_allocated_and_balanced() {
    let mut core = core_with(vec![
        node("empty", "4", "4Gi", NONE),
        node("busy", "4", "4Gi", NONE),
    ]);
    place(&mut core, pod("a", "3", "1Gi", NONE), "busy");
    let p = pod("p", "1", "1Gi", NONE);
    let least = scores(&core, &p, &only(|w| w.least_allocated = 1));
    assert_eq!(least, [("empty".into(), 75), ("busy".into(), 25)]);
    let most = scores(&core, &p, &only(|w| w.most_allocated = 1));
    assert_eq!(most, [("empty".into(), 25), ("busy".into(), 75)]);
    let balanced = scores(&core, &p, &only(|w| w.balanced_allocation = 1));
    // empty: cpu 1/4, mem 1/4 -> 100; busy: cpu 4/4, mem 2/4 -> 75.
    assert_eq!(balanced, [("empty".into(), 100), ("busy".into(), 75)]);
    // Bin packing picks the busy node, the default spreads.
    assert_eq!(bound_to(&mut core, &p), "empty");
    core.config.weights = only(|w| w.most_allocated = 1);
    assert_eq!(bound_to(&mut core, &p), "busy");
}

#[test]
fn score_selector_spread_prefers_nodes_with_fewer_replicas() {
    let owned = |name: &str| {
        pod(
            name,
            "0",
            "0",
            &json!({"metadata": {"ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs-1", "controller": true}]}}),
        )
    };
    let mut core = core_with(vec![
        node("n1", "4", "4Gi", NONE),
        node("n2", "4", "4Gi", NONE),
    ]);
    place(&mut core, owned("a"), "n1");
    place(&mut core, owned("b"), "n1");
    place(&mut core, owned("c"), "n2");
    let s = scores(&core, &owned("d"), &only(|w| w.selector_spread = 1));
    assert_eq!(s, [("n1".into(), 0), ("n2".into(), 50)]);
}

#[test]
fn score_preferred_node_affinity_and_prefer_no_schedule() {
    let core = core_with(vec![
        node("plain", "4", "4Gi", NONE),
        node(
            "ssd",
            "4",
            "4Gi",
            &json!({"metadata": {"labels": {"disk": "ssd"}}}),
        ),
        node(
            "soft",
            "4",
            "4Gi",
            &json!({"spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}}),
        ),
    ]);
    let p = pod(
        "p",
        "0",
        "0",
        &json!({"spec": {"affinity": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 10, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}}]}}}}),
    );
    let s = scores(&core, &p, &only(|w| w.node_affinity = 1));
    assert_eq!(
        s,
        [("plain".into(), 0), ("ssd".into(), 100), ("soft".into(), 0)]
    );
    let s = scores(&core, &p, &only(|w| w.taint_toleration = 1));
    assert_eq!(
        s,
        [
            ("plain".into(), 100),
            ("ssd".into(), 100),
            ("soft".into(), 0)
        ]
    );
    let tolerant = pod(
        "t",
        "0",
        "0",
        &json!({"spec": {"tolerations": [{"key": "k", "operator": "Exists"}]}}),
    );
    let s = scores(&core, &tolerant, &only(|w| w.taint_toleration = 1));
    assert!(s.iter().all(|(_, v)| *v == 100), "{s:?}");
}

#[test]
fn score_preferred_pod_affinity_and_anti_affinity() {
    let mut core = core_with(vec![
        node("n1", "4", "4Gi", NONE),
        node("n2", "4", "4Gi", NONE),
    ]);
    let mut db = pod("db", "0", "0", NONE);
    db.labels.insert("app".into(), "db".into());
    place(&mut core, db, "n2");
    let preferred = |kind: &str| {
        json!({"spec": {"affinity": {kind: {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "db"}},
             "topologyKey": "kubernetes.io/hostname"}}]}}}})
    };
    let near = pod("near", "0", "0", &preferred("podAffinity"));
    assert_eq!(
        scores(&core, &near, &only(|w| w.pod_affinity = 1)),
        [("n1".into(), 0), ("n2".into(), 100)]
    );
    let far = pod("far", "0", "0", &preferred("podAntiAffinity"));
    assert_eq!(
        scores(&core, &far, &only(|w| w.pod_affinity = 1)),
        [("n1".into(), 100), ("n2".into(), 0)]
    );
}

#[test]
fn unschedulable_message_in_kubernetes_wording() {
    let mut core = core_with(vec![
        node("n1", "1", "1Gi", NONE),
        node("n2", "1", "1Gi", NONE),
        node(
            "n3",
            "8",
            "8Gi",
            &json!({"spec": {"taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]}}),
        ),
    ]);
    let big = pod("big", "2", "100Mi", NONE);
    assert_eq!(
        message_of(&mut core, &big),
        "0/3 nodes are available: 1 node(s) had untolerated taint {k: v}, 2 Insufficient cpu. \
         preemption: 0/3 nodes are available: 1 Preemption is not helpful for scheduling, \
         2 No preemption victims found for incoming pod."
    );
    let never = pod(
        "never",
        "2",
        "100Mi",
        &json!({"spec": {"preemptionPolicy": "Never"}}),
    );
    assert!(
        message_of(&mut core, &never)
            .ends_with("preemption: not eligible due to preemptionPolicy=Never.")
    );
    let mut empty = core_with(vec![]);
    assert_eq!(
        message_of(&mut empty, &big),
        "no nodes available to schedule pods"
    );
}

fn with_priority(name: &str, cpu: &str, priority: i32) -> PodInfo {
    pod(name, cpu, "0", &json!({"spec": {"priority": priority}}))
}

#[test]
fn preemption_picks_the_cheapest_node_and_fewest_victims() {
    let mut core = core_with(vec![
        node("n1", "2", "8Gi", NONE),
        node("n2", "2", "8Gi", NONE),
    ]);
    // n1: two low pods (priority 1), n2: one mid pod (priority 5) and one low.
    place(&mut core, with_priority("l1", "1", 1), "n1");
    place(&mut core, with_priority("l2", "1", 1), "n1");
    place(&mut core, with_priority("m", "1", 5), "n2");
    place(&mut core, with_priority("l3", "1", 1), "n2");
    let high = with_priority("high", "1", 10);
    match core.schedule(&high) {
        Decision::Unschedulable {
            preemption: Some(p),
            ..
        } => {
            // Highest victim priority 1 on both n1 and n2 (l3 alone frees
            // enough on n2); n1 has two such pods but needs only one.
            assert_eq!(p.victims.len(), 1, "{:?}", p.victims);
            assert_eq!(p.victims[0].priority, 1);
        }
        other => panic!("{other:?}"),
    }
    // Needing 2 cpu: n1 (victims priorities 1+1) beats n2 (5+1).
    let bigger = with_priority("bigger", "2", 10);
    match core.schedule(&bigger) {
        Decision::Unschedulable {
            preemption: Some(p),
            ..
        } => {
            assert_eq!(p.node_name, "n1");
            let mut names: Vec<_> = p.victims.iter().map(|v| v.name.clone()).collect();
            names.sort();
            assert_eq!(names, ["l1", "l2"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn preemption_never_evicts_equal_or_higher_priority_pods() {
    let mut core = core_with(vec![node("n1", "1", "8Gi", NONE)]);
    place(&mut core, with_priority("same", "1", 10), "n1");
    let p = with_priority("p", "1", 10);
    assert!(matches!(
        core.schedule(&p),
        Decision::Unschedulable {
            preemption: None,
            ..
        }
    ));
    let ctx = PodContext::new(&p, &core.cache);
    assert!(victims_on(&ctx, &p, &core.cache.nodes()[0]).is_none());
}

#[test]
fn sampling_finds_a_share_of_large_clusters() {
    assert_eq!(nodes_to_find(50, 0), 50);
    assert_eq!(nodes_to_find(5000, 0), 500, "50% - 5000/125 = 10%");
    assert_eq!(nodes_to_find(100_000, 0), 5000, "at least 5%");
    assert_eq!(nodes_to_find(150, 10), 100, "never fewer than 100");
    assert_eq!(nodes_to_find(5000, 100), 5000);
}

#[test]
fn sampling_rotates_so_load_spreads_over_all_nodes() {
    let nodes: Vec<NodeInfo> = (0..300)
        .map(|i| node(&format!("n{i:03}"), "4", "4Gi", NONE))
        .collect();
    let mut core = core_with(nodes);
    core.config.percentage_of_nodes_to_score = 34;
    let mut seen = std::collections::HashSet::new();
    for i in 0..30 {
        let p = Arc::new(pod(&format!("p{i}"), "100m", "10Mi", NONE));
        core.cache.upsert_pod(Arc::clone(&p));
        let Decision::Bind(n) = core.schedule(&p) else {
            panic!()
        };
        core.cache.assume(&p.key, n);
        seen.insert(n / 100);
    }
    assert_eq!(seen.len(), 3, "every third of the cluster got pods");
}

#[test]
fn config_from_yaml_with_weights_and_refusals() {
    let c = Config::from_yaml(
        "weights:\n  mostAllocated: 5\n  leastAllocated: 0\npercentageOfNodesToScore: 20\n",
    )
    .unwrap();
    assert_eq!(c.weights.most_allocated, 5);
    assert_eq!(c.weights.least_allocated, 0);
    assert_eq!(c.weights.balanced_allocation, 1, "unset keeps the default");
    assert_eq!(c.percentage_of_nodes_to_score, 20);
    let e = Config::from_yaml("weights:\n  bogus: 1\n").unwrap_err();
    assert!(format!("{e:#}").contains("bogus"), "{e:#}");
    let e = Config::from_yaml("percentageOfNodesToScore: 101\n").unwrap_err();
    assert!(
        format!("{e:#}").contains("percentageOfNodesToScore"),
        "{e:#}"
    );
}
