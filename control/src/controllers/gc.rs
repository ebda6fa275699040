//! The garbage collector, a periodic sweep beside the reconcilers:
//!
//! - **orphans**: a `ReplicaSet` or pod whose controlling owner
//!   (`ownerReferences[controller=true]`) no longer exists — as the same
//!   object, by uid — is deleted (pods gracefully). The API cascades inside
//!   its Delete, so this only finds what a crash in the middle of a cascade
//!   left behind, or dependents written by a stale client.
//! - **events** older than `--event-ttl` (Kubernetes' default: one hour) are
//!   deleted, so a busy cluster's events don't grow without bound.
//! - **security identities** no pod carries any more are released once
//!   they have stayed unused for the identity grace period (see
//!   `api::identity` for the compare-and-swap that keeps this safe against
//!   concurrent pod creates).
//!
//! Owners are first looked up in the caches; a dependent is only deleted
//! after the API confirms its owner is gone (a cache may lag the store).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weir_proto::v1;

use super::Ctx;
use super::meta::{self, controller_of};
use crate::api::Kind;
use crate::store::Store;

pub(crate) fn start<S: Store>(
    ctx: &Arc<Ctx<S>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let ctx = Arc::clone(ctx);
    let mut shutdown = shutdown.clone();
    vec![tokio::spawn(async move {
        let mut tick = tokio::time::interval(ctx.config.gc_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let orphans = sweep_orphans(&ctx).await;
            let events = sweep_events(&ctx, meta::now()).await;
            if orphans + events > 0 {
                tracing::info!(orphans, events, "garbage collector: deleted");
            }
            sweep_identities(&ctx).await;
        }
    })]
}

/// Whether the owner `r` of an object in `namespace` is alive in the
/// controllers' caches (same uid); `None` for kinds without a cache.
fn cached_owner_alive<S: Store>(ctx: &Ctx<S>, namespace: &str, r: &OwnerReference) -> Option<bool> {
    let key = format!("{namespace}/{}", r.name);
    let uid = |m: &ObjectMeta| meta::uid(m) == r.uid;
    match r.kind.as_str() {
        "ReplicaSet" => Some(ctx.replicasets.get(&key).is_some_and(|o| uid(&o.metadata))),
        "Deployment" => Some(ctx.deployments.get(&key).is_some_and(|o| uid(&o.metadata))),
        "DaemonSet" => Some(ctx.daemonsets.get(&key).is_some_and(|o| uid(&o.metadata))),
        _ => None,
    }
}

/// Whether the owner `r` exists in the store as the same object.
async fn owner_in_store<S: Store>(ctx: &Ctx<S>, namespace: &str, r: &OwnerReference) -> bool {
    let Ok(kind) = Kind::from_name(&r.kind) else {
        return true; // not a kind weir stores: leave the dependent alone
    };
    let owner = v1::ObjectRef {
        api_version: kind.api_version().to_owned(),
        kind: kind.name().to_owned(),
        namespace: namespace.to_owned(),
        name: r.name.clone(),
    };
    match ctx.client.api().get(&owner).await {
        Ok(stored) => stored.meta.is_none_or(|m| m.uid == r.uid),
        Err(crate::api::ApiError::NotFound { .. }) => false,
        Err(_) => true, // can't tell: try again next sweep
    }
}

/// Deletes `ReplicaSets` and pods whose controlling owner is gone; how many.
async fn sweep_orphans<S: Store>(ctx: &Ctx<S>) -> usize {
    let mut deleted = 0;
    for rs in ctx.replicasets.list() {
        if orphaned(ctx, &rs.metadata).await
            && ctx
                .client
                .delete(&ctx.replicasets, &rs.metadata, None)
                .await
                .is_ok()
        {
            deleted += 1;
        }
    }
    for pod in ctx.pods.list() {
        if pod.metadata.deletion_timestamp.is_none()
            && orphaned(ctx, &pod.metadata).await
            && ctx
                .client
                .delete(&ctx.pods, &pod.metadata, None)
                .await
                .is_ok()
        {
            deleted += 1;
        }
    }
    deleted
}

async fn orphaned<S: Store>(ctx: &Ctx<S>, object: &ObjectMeta) -> bool {
    let Some(owner) = controller_of(object) else {
        return false;
    };
    let namespace = object.namespace.as_deref().unwrap_or("default");
    if cached_owner_alive(ctx, namespace, owner) == Some(true) {
        return false;
    }
    let gone = !owner_in_store(ctx, namespace, owner).await;
    if gone {
        tracing::info!(
            object = %format!("{namespace}/{}", meta::name(object)),
            owner = %format!("{}/{}", owner.kind, owner.name),
            "garbage collector: owner is gone, deleting its dependent"
        );
    }
    gone
}

/// Marks, revives and releases security identities (see the module docs).
async fn sweep_identities<S: Store>(ctx: &Ctx<S>) {
    match ctx
        .client
        .api()
        .sweep_identities(meta::now(), ctx.config.identity_grace)
        .await
    {
        Ok(s) if s.released > 0 => {
            tracing::info!(
                released = s.released,
                "garbage collector: released unused identities"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "garbage collector: cannot sweep identities"),
    }
}

/// When an event last happened (`lastTimestamp`, `eventTime`, else its
/// creation), from its JSON.
pub fn event_time(event: &Value) -> Option<Timestamp> {
    [
        "/lastTimestamp",
        "/eventTime",
        "/metadata/creationTimestamp",
    ]
    .iter()
    .find_map(|p| event.pointer(p)?.as_str()?.parse().ok())
}

/// Whether an event that last happened at `at` has outlived `ttl` at `now`.
pub fn expired(at: Timestamp, ttl: Duration, now: Timestamp) -> bool {
    at + SignedDuration::try_from(ttl).unwrap_or(SignedDuration::MAX) <= now
}

/// Deletes the events older than the TTL; how many.
async fn sweep_events<S: Store>(ctx: &Ctx<S>, now: Timestamp) -> usize {
    let ttl = ctx.config.event_ttl;
    let list = ctx
        .client
        .api()
        .list(&v1::ListRequest {
            kind: Kind::Event.name().to_owned(),
            namespace: String::new(),
            label_selector: String::new(),
        })
        .await;
    let Ok(list) = list else {
        return 0;
    };
    let mut by_namespace: HashMap<String, Vec<String>> = HashMap::new();
    for item in &list.items {
        let Ok(event) = serde_json::from_str::<Value>(&item.json) else {
            continue;
        };
        if event_time(&event).is_some_and(|at| expired(at, ttl, now))
            && let Some(m) = &item.meta
        {
            by_namespace
                .entry(m.namespace.clone())
                .or_default()
                .push(m.name.clone());
        }
    }
    let mut deleted = 0;
    for (namespace, names) in by_namespace {
        for name in names {
            let gone = ctx
                .client
                .api()
                .delete(&v1::DeleteRequest {
                    r#ref: Some(v1::ObjectRef {
                        api_version: "v1".to_owned(),
                        kind: Kind::Event.name().to_owned(),
                        namespace: namespace.clone(),
                        name,
                    }),
                    propagation: String::new(),
                    grace_period_seconds: None,
                })
                .await;
            deleted += usize::from(gone.is_ok());
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn events_expire_after_their_ttl_from_the_last_occurrence() {
        let e = json!({"lastTimestamp": "1970-01-01T00:16:40Z", "metadata": {"creationTimestamp": "1970-01-01T00:00:10Z"}});
        let last = event_time(&e).unwrap();
        assert_eq!(last, at(1000));
        let ttl = Duration::from_hours(1);
        assert!(!expired(last, ttl, at(1000 + 3599)));
        assert!(expired(last, ttl, at(1000 + 3600)));
        let created_only = json!({"metadata": {"creationTimestamp": "1970-01-01T00:00:10Z"}});
        assert_eq!(event_time(&created_only), Some(at(10)));
        assert_eq!(event_time(&json!({})), None);
    }
}
