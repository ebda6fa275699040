//! Unit tests of the Deployment controller's pure decisions.

use k8s_openapi::api::apps::v1::{DeploymentStrategy, RollingUpdateDeployment};
use serde_json::json;

use super::*;
use crate::controllers::tests::{apply_one, get};

fn c(replicas: i32, pods: i32, available: i32) -> Counts {
    Counts {
        replicas,
        pods,
        available,
    }
}

fn spec(strategy: &serde_json::Value, replicas: i32) -> DeploymentSpec {
    serde_json::from_value(json!({
        "replicas": replicas,
        "selector": {"matchLabels": {"app": "a"}},
        "template": {"metadata": {"labels": {"app": "a"}}},
        "strategy": strategy,
    }))
    .unwrap()
}

#[test]
fn defaults_are_kubernetes_defaults() {
    let p = params(
        &serde_json::from_value(json!({
            "selector": {}, "template": {}
        }))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(p.replicas, 1);
    assert_eq!(
        p.strategy,
        // 25% of 1: surge rounds up to 1, unavailable down to 0.
        Strategy::RollingUpdate {
            max_surge: 1,
            max_unavailable: 0
        }
    );
    assert_eq!(p.revision_history_limit, 10);
    assert_eq!(p.progress_deadline_seconds, 600);
    assert!(!p.paused);
    let p = params(&spec(&json!({}), 10)).unwrap();
    assert_eq!(
        p.strategy,
        Strategy::RollingUpdate {
            max_surge: 3,
            max_unavailable: 2
        }
    );
}

#[test]
fn both_zero_is_refused_and_rounded_zeros_get_one_unavailable() {
    let err = params(&spec(
        &json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}),
        3,
    ))
    .unwrap_err();
    assert_eq!(err.0, "spec.strategy.rollingUpdate");
    let p = params(&spec(
        &json!({"rollingUpdate": {"maxSurge": "10%", "maxUnavailable": "10%"}}),
        3,
    ))
    .unwrap();
    // 10% of 3: surge rounds up to 1; unavailable rounds down to 0.
    assert_eq!(
        p.strategy,
        Strategy::RollingUpdate {
            max_surge: 1,
            max_unavailable: 0
        }
    );
    let p = params(&spec(
        &json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "10%"}}),
        3,
    ))
    .unwrap();
    assert_eq!(
        p.strategy,
        Strategy::RollingUpdate {
            max_surge: 0,
            max_unavailable: 1
        }
    );
    assert!(params(&spec(&json!({"type": "Blue"}), 3)).is_err());
    let _ = DeploymentStrategy {
        rolling_update: Some(RollingUpdateDeployment::default()),
        type_: None,
    };
}

#[test]
fn first_step_surges_the_new_replica_set() {
    // 3 replicas, surge 1, unavailable 0: new goes to 1, old untouched.
    assert_eq!(
        rolling_step(3, 1, 0, c(0, 0, 0), &[c(3, 3, 3)]),
        (1, vec![3])
    );
    // surge 2: new goes to 2.
    assert_eq!(
        rolling_step(3, 2, 0, c(0, 0, 0), &[c(3, 3, 3)]),
        (2, vec![3])
    );
    // Surge 0: the new RS can't grow until old pods go; old scaled down by
    // maxUnavailable.
    assert_eq!(
        rolling_step(4, 0, 1, c(0, 0, 0), &[c(4, 4, 4)]),
        (0, vec![3])
    );
}

#[test]
fn old_scale_down_waits_for_new_availability() {
    // new at 1 but not available yet; at max surge: nothing to do.
    assert_eq!(
        rolling_step(3, 1, 0, c(1, 1, 0), &[c(3, 3, 3)]),
        (1, vec![3])
    );
    // new pod available: one old pod may go.
    assert_eq!(
        rolling_step(3, 1, 0, c(1, 1, 1), &[c(3, 3, 3)]),
        (1, vec![2])
    );
    // maxUnavailable 1 lets one more go at once.
    assert_eq!(
        rolling_step(3, 1, 1, c(1, 1, 1), &[c(3, 3, 3)]),
        (1, vec![1])
    );
}

#[test]
fn unhealthy_old_pods_go_first_and_old_pods_still_terminating_count() {
    // Old RS has 3 replicas but only 1 available: the 2 unhealthy ones go
    // without touching availability.
    assert_eq!(
        rolling_step(3, 1, 1, c(1, 1, 1), &[c(3, 3, 1)]),
        (1, vec![1])
    );
    // As in Kubernetes, with maxUnavailable 0 the new RS's unavailable pod
    // leaves no room to remove even unhealthy old pods.
    assert_eq!(
        rolling_step(3, 1, 0, c(1, 1, 0), &[c(3, 3, 1)]),
        (1, vec![3])
    );
    // Old RS scaled to 2 but still has 3 pods: no room to surge.
    assert_eq!(
        rolling_step(3, 1, 0, c(1, 0, 0), &[c(2, 3, 3)]),
        (1, vec![2])
    );
    assert_eq!(
        rolling_step(3, 1, 0, c(1, 1, 0), &[c(2, 3, 3)]),
        (1, vec![2])
    );
}

#[test]
fn scaling_a_finished_new_replica_set_and_many_olds() {
    assert_eq!(rolling_step(3, 1, 0, c(5, 5, 5), &[]), (3, vec![]));
    // Two old RSs, oldest first: the oldest is scaled down first.
    assert_eq!(
        rolling_step(4, 1, 1, c(2, 2, 2), &[c(1, 1, 1), c(2, 2, 2)]),
        (2, vec![0, 1])
    );
}

/// A whole rollout through `rolling_step` with a simulated `ReplicaSet`
/// controller and kubelet: never more than `replicas + maxSurge` pods,
/// never fewer than `replicas - maxUnavailable` available.
#[test]
fn simulated_rollouts_respect_both_bounds() {
    for (replicas, surge, unavailable) in [
        (3, 1, 0),
        (3, 0, 1),
        (5, 2, 1),
        (10, 3, 2),
        (1, 1, 0),
        (4, 4, 4),
        (6, 0, 3),
    ] {
        let mut old = c(replicas, replicas, replicas);
        let mut new = c(0, 0, 0);
        // Pods created in the previous round become available in this one.
        let mut steps = 0;
        while !(new.available == replicas && old.pods == 0) {
            steps += 1;
            assert!(
                steps < 100,
                "no progress for {replicas}/{surge}/{unavailable}"
            );
            let (n, o) = rolling_step(replicas, surge, unavailable, new, &[old]);
            new.replicas = n;
            old.replicas = o[0];
            // RS controller for the old RS: delete unavailable pods first.
            while old.pods > old.replicas {
                old.pods -= 1;
                if old.available > old.pods {
                    old.available = old.pods;
                }
            }
            assert!(
                old.available + new.available >= replicas - unavailable,
                "{replicas}/{surge}/{unavailable}: {} available",
                old.available + new.available
            );
            // Kubelet: last round's new pods become ready.
            new.available = new.pods.min(new.replicas);
            // RS controller for the new RS: create pods.
            new.pods = new.replicas;
            assert!(
                new.pods + old.pods <= replicas + surge,
                "{replicas}/{surge}/{unavailable}: {} pods",
                new.pods + old.pods
            );
        }
    }
}

#[test]
fn history_keeps_the_newest_deletable() {
    let old = [(1, true), (4, true), (2, false), (3, true)];
    assert_eq!(history_to_delete(&old, 2), vec![0, 3]);
    assert_eq!(history_to_delete(&old, 10), Vec::<usize>::new());
    assert_eq!(history_to_delete(&old, 0), vec![0, 3, 1]);
}

fn rs(name: &str, replicas: i32, ready: i32, available: i32) -> Arc<ReplicaSet> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {}},
            "status": {"replicas": replicas, "readyReplicas": ready, "availableReplicas": available}
        }))
        .unwrap(),
    )
}

fn condition<'a>(s: &'a DeploymentStatus, t: &str) -> &'a DeploymentCondition {
    s.conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_.as_deref() == Some(t))
        .unwrap()
}

#[test]
fn status_conditions_follow_the_rollout() {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web", "generation": 2},
        "spec": spec(&json!({}), 4),
    }))
    .unwrap();
    let p = params(&d.spec).unwrap();
    let now = Timestamp::from_second(10_000).unwrap();
    let all = vec![rs("web-new", 2, 1, 1), rs("web-old", 3, 3, 3)];
    let (s, recheck) = status_of(&d, &p, Some(&all[0]), &all, now);
    assert_eq!(s.replicas, Some(5));
    assert_eq!(s.updated_replicas, Some(2));
    assert_eq!(s.available_replicas, Some(4));
    assert_eq!(s.unavailable_replicas, Some(1));
    assert_eq!(s.observed_generation, Some(2));
    assert_eq!(condition(&s, "Available").status.as_deref(), Some("True"));
    let progressing = condition(&s, "Progressing");
    assert_eq!(progressing.reason.as_deref(), Some("ReplicaSetUpdated"));
    assert_eq!(
        progressing.message.as_deref(),
        Some("ReplicaSet \"web-new\" is progressing.")
    );
    assert_eq!(recheck, Some(Duration::from_mins(10)));

    // Done: NewReplicaSetAvailable.
    let mut d2 = d.clone();
    d2.status = Some(s);
    let all = vec![rs("web-new", 4, 4, 4), rs("web-old", 0, 0, 0)];
    let (s, _) = status_of(&d2, &p, Some(&all[0]), &all, now);
    assert_eq!(
        condition(&s, "Progressing").reason.as_deref(),
        Some("NewReplicaSetAvailable")
    );

    // Stuck past the deadline: ProgressDeadlineExceeded.
    let all = vec![rs("web-new", 2, 0, 0), rs("web-old", 3, 3, 3)];
    let (s1, _) = status_of(&d, &p, Some(&all[0]), &all, now);
    assert_eq!(condition(&s1, "Available").status.as_deref(), Some("True"));
    d2.status = Some(s1);
    let later = Timestamp::from_second(10_000 + 601).unwrap();
    let (s2, _) = status_of(&d2, &p, Some(&all[0]), &all, later);
    let progressing = condition(&s2, "Progressing");
    assert_eq!(progressing.status.as_deref(), Some("False"));
    assert_eq!(
        progressing.reason.as_deref(),
        Some("ProgressDeadlineExceeded")
    );
}

/// The API over a fresh store with namespace `ns`, and controller context
/// whose caches are filled by hand (no informers run).
async fn fresh_ctx(ns: &str) -> (tempfile::TempDir, Arc<Ctx<crate::store::RedbStore>>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(crate::store::RedbStore::open(dir.path().join("store.redb")).unwrap());
    let api = Arc::new(crate::api::ObjectsApi::new(store));
    apply_one(
        &api,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await;
    let ctx = Ctx::new(api, super::super::Config::default());
    (dir, ctx)
}

async fn stored<K: serde::de::DeserializeOwned>(
    ctx: &Ctx<crate::store::RedbStore>,
    kind: &str,
    ns: &str,
    name: &str,
) -> K {
    get(ctx.client.api(), kind, ns, name).await.unwrap()
}

fn deployment(replicas: i32, labels: &serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "conc", "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "web:v1"}]},
            },
        },
    })
}

#[tokio::test]
async fn annotating_a_stale_deployment_keeps_a_concurrent_user_change() {
    let (_dir, ctx) = fresh_ctx("conc").await;
    let api = Arc::clone(ctx.client.api());
    let read = apply_one(&api, &deployment(2, &json!({}))).await;
    // The controller's view, about to go stale.
    ctx.deployments.observe(&read);
    // The user scales and labels the Deployment after the controller read it.
    apply_one(&api, &deployment(5, &json!({"team": "a"}))).await;

    // The reconcile creates the ReplicaSet and annotates the Deployment
    // with its revision: a compare-and-swap on the stale version that
    // conflicts, is retried on the stored one, and so keeps the change.
    reconcile(&ctx, "conc/web").await.unwrap();
    let d: Deployment = stored(&ctx, "Deployment", "conc", "web").await;
    assert_eq!(d.spec.replicas, Some(5), "the user's scale was overwritten");
    assert_eq!(
        meta::labels(&d.metadata).get("team").map(String::as_str),
        Some("a"),
        "the user's label was overwritten"
    );
    assert_eq!(revision_of(&d.metadata), 1);
    // Status is not written for a spec the reconcile did not see.
    assert!(
        d.status
            .as_ref()
            .is_none_or(|s| s.observed_generation != d.metadata.generation),
        "{:?}",
        d.status
    );

    // The next reconcile works from the stored state it read back.
    reconcile(&ctx, "conc/web").await.unwrap();
    let rss = ctx.replicasets.by_index(BY_OWNER, meta::uid(&d.metadata));
    assert_eq!(rss.len(), 1);
    let rs: ReplicaSet = stored(&ctx, "ReplicaSet", "conc", meta::name(&rss[0].metadata)).await;
    assert_eq!(rs.spec.replicas, Some(5));
    let d: Deployment = stored(&ctx, "Deployment", "conc", "web").await;
    assert_eq!(d.status.unwrap().observed_generation, d.metadata.generation);
}

#[tokio::test]
async fn scaling_a_stale_replica_set_keeps_a_concurrent_change() {
    let (_dir, ctx) = fresh_ctx("conc").await;
    let api = Arc::clone(ctx.client.api());
    let read = apply_one(&api, &deployment(3, &json!({}))).await;
    ctx.deployments.observe(&read);
    reconcile(&ctx, "conc/web").await.unwrap();
    let rs = ctx.replicasets.list().pop().expect("a ReplicaSet");
    let rs_name = meta::name(&rs.metadata).to_owned();
    // Someone labels the ReplicaSet behind the controller's cache.
    let mut doc = serde_json::to_value(&*rs).unwrap();
    doc["metadata"]["labels"]["audit"] = json!("yes");
    doc["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    apply_one(&api, &doc).await;
    // The Deployment is scaled; the controller scales its stale RS.
    let read = apply_one(&api, &deployment(4, &json!({}))).await;
    ctx.deployments.observe(&read);
    reconcile(&ctx, "conc/web").await.unwrap();
    let rs: ReplicaSet = stored(&ctx, "ReplicaSet", "conc", &rs_name).await;
    assert_eq!(rs.spec.replicas, Some(4));
    assert_eq!(
        meta::labels(&rs.metadata).get("audit").map(String::as_str),
        Some("yes"),
        "the concurrent label was overwritten"
    );
}
