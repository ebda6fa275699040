//! Pod management shared by the `ReplicaSet` and `DaemonSet` controllers:
//! making a pod from a template, creating pods in slow-start batches,
//! deleting pods, and adopting orphans that match a selector.

use std::sync::Arc;

use futures::future::join_all;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::client::Error;
use super::{Ctx, meta};
use crate::api::Kind;
use crate::events::EventType;
use crate::matching;
use crate::store::Store;

/// Who owns the pods being managed, for owner references and events.
pub(crate) struct Owner<'a> {
    /// The owner's kind (`ReplicaSet`, `DaemonSet`).
    pub kind: Kind,
    /// The owner's metadata.
    pub meta: &'a ObjectMeta,
    /// The event source, e.g. `replicaset-controller`.
    pub component: &'static str,
}

impl Owner<'_> {
    fn key(&self) -> String {
        super::cache::key_of(self.meta)
    }
}

/// A pod for `owner` from `template`: named `<owner>-<5 random chars>`,
/// in the owner's namespace, with the template's labels and annotations and
/// a controller owner reference.
pub fn pod_from_template(kind: Kind, owner: &ObjectMeta, template: &PodTemplateSpec) -> Pod {
    let tmeta = template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-{}", meta::name(owner), meta::random_suffix())),
            namespace: Some(meta::namespace(owner).to_owned()),
            labels: tmeta.labels,
            annotations: tmeta.annotations,
            owner_references: Some(vec![meta::owner_ref(
                kind.api_version(),
                kind.name(),
                owner,
            )]),
            ..ObjectMeta::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// Creates `pods` in slow-start batches (1, 2, 4, …) as Kubernetes does,
/// stopping at the first batch with a failure; records `SuccessfulCreate` or
/// `FailedCreate` events on the owner. Returns how many were created.
///
/// Afterwards the owner is read again from the API: if it went away or
/// started a (foreground) deletion meanwhile, the cascade may have listed
/// its dependents before these pods existed, so they are deleted here
/// instead of outliving it (or keeping a foreground delete waiting).
pub(crate) async fn create_pods<S: Store>(
    ctx: &Ctx<S>,
    owner: &Owner<'_>,
    pods: Vec<Pod>,
) -> Result<usize, Error> {
    let attempted = pods.len();
    let mut pods = pods.into_iter();
    let mut created = Vec::new();
    let mut batch = 1;
    let mut failure = None;
    loop {
        let chunk: Vec<Pod> = pods.by_ref().take(batch).collect();
        if chunk.is_empty() {
            break;
        }
        let results = join_all(chunk.iter().map(|pod| create_one(ctx, owner, pod))).await;
        let mut errors = Vec::new();
        for result in results {
            match result {
                Ok(pod) => created.push(pod),
                Err(e) => errors.push(e),
            }
        }
        if let Some(first) = errors.into_iter().next() {
            failure = Some(first);
            break;
        }
        batch *= 2;
    }
    if !created.is_empty() && !ctx.client.alive(owner.kind, owner.meta).await? {
        tracing::info!(owner = %owner.key(), pods = created.len(), "owner went away while creating pods: deleting them");
        for pod in &created {
            ctx.client.delete(&ctx.pods, &pod.metadata, None).await?;
        }
        return Ok(0);
    }
    match failure {
        None => Ok(created.len()),
        Some(first) => Err(Error::Partial {
            action: "pod creates",
            failed: attempted - created.len(),
            attempted,
            first: Box::new(first),
        }),
    }
}

async fn create_one<S: Store>(
    ctx: &Ctx<S>,
    owner: &Owner<'_>,
    pod: &Pod,
) -> Result<Arc<Pod>, Error> {
    let name = meta::name(&pod.metadata);
    match ctx
        .client
        .apply(&ctx.pods, "create", pod, owner.component)
        .await
    {
        Ok(created) => {
            let message = format!("Created pod: {name}");
            ctx.client
                .event(
                    owner.kind,
                    owner.meta,
                    EventType::Normal,
                    "SuccessfulCreate",
                    &message,
                    owner.component,
                )
                .await;
            Ok(created)
        }
        Err(e) => {
            let message = format!("Error creating: {e}");
            ctx.client
                .event(
                    owner.kind,
                    owner.meta,
                    EventType::Warning,
                    "FailedCreate",
                    &message,
                    owner.component,
                )
                .await;
            Err(e)
        }
    }
}

/// Deletes `pods` (gracefully) concurrently, recording `SuccessfulDelete` or
/// `FailedDelete` on the owner.
pub(crate) async fn delete_pods<S: Store>(
    ctx: &Ctx<S>,
    owner: &Owner<'_>,
    pods: &[Arc<Pod>],
) -> Result<(), Error> {
    let results = join_all(pods.iter().map(|pod| async move {
        let name = meta::name(&pod.metadata);
        let result = ctx.client.delete(&ctx.pods, &pod.metadata, None).await;
        let (type_, reason, message) = match &result {
            Ok(()) => (
                EventType::Normal,
                "SuccessfulDelete",
                format!("Deleted pod: {name}"),
            ),
            Err(e) => (
                EventType::Warning,
                "FailedDelete",
                format!("Error deleting: {e}"),
            ),
        };
        ctx.client
            .event(
                owner.kind,
                owner.meta,
                type_,
                reason,
                &message,
                owner.component,
            )
            .await;
        result
    }))
    .await;
    let attempted = results.len();
    let mut errors: Vec<Error> = results.into_iter().filter_map(Result::err).collect();
    if errors.is_empty() {
        return Ok(());
    }
    let failed = errors.len();
    Err(Error::Partial {
        action: "pod deletes",
        failed,
        attempted,
        first: Box::new(errors.swap_remove(0)),
    })
}

/// The pods `owner` controls, after adopting the namespace's orphans (no
/// controller owner, not terminating) that match `selector`. Adoption is a
/// compare-and-swap update of the pod, re-checked on the pod as stored if
/// it changed meanwhile, and only while the owner is not being deleted.
pub(crate) async fn claim_pods<S: Store>(
    ctx: &Ctx<S>,
    owner: &Owner<'_>,
    selector: &LabelSelector,
) -> Result<Vec<Arc<Pod>>, Error> {
    let uid = meta::uid(owner.meta);
    let mut claimed = ctx.pods.by_index(super::cache::BY_OWNER, uid);
    if meta::selector_is_empty(selector) {
        return Ok(claimed);
    }
    let adoptable = |p: &Pod| {
        meta::controller_of(&p.metadata).is_none()
            && p.metadata.deletion_timestamp.is_none()
            && matching::selector_matches(selector, meta::labels(&p.metadata))
    };
    let orphans: Vec<Arc<Pod>> = ctx
        .pods
        .list_namespace(meta::namespace(owner.meta))
        .into_iter()
        .filter(|p| adoptable(p))
        .collect();
    if orphans.is_empty() || !ctx.client.alive(owner.kind, owner.meta).await? {
        return Ok(claimed);
    }
    let reference = meta::owner_ref(owner.kind.api_version(), owner.kind.name(), owner.meta);
    for orphan in orphans {
        tracing::info!(owner = %owner.key(), pod = meta::name(&orphan.metadata), "adopting orphan pod");
        let pod = ctx
            .client
            .update(&ctx.pods, "adopt", &orphan, owner.component, |pod| {
                if !adoptable(pod) {
                    return false;
                }
                pod.metadata
                    .owner_references
                    .get_or_insert_with(Vec::new)
                    .push(reference.clone());
                true
            })
            .await?;
        if meta::controller_of(&pod.metadata).is_some_and(|r| r.uid == uid) {
            claimed.push(pod);
        }
    }
    Ok(claimed)
}
