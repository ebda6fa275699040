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
pub(crate) async fn create_pods<S: Store>(
    ctx: &Ctx<S>,
    owner: &Owner<'_>,
    pods: Vec<Pod>,
) -> Result<usize, Error> {
    let attempted = pods.len();
    let mut pods = pods.into_iter();
    let mut created = 0;
    let mut batch = 1;
    loop {
        let chunk: Vec<Pod> = pods.by_ref().take(batch).collect();
        if chunk.is_empty() {
            return Ok(created);
        }
        let results = join_all(chunk.iter().map(|pod| create_one(ctx, owner, pod))).await;
        let mut errors = results.into_iter().filter_map(Result::err);
        let first = errors.next();
        let failed = usize::from(first.is_some()) + errors.count();
        created += chunk.len() - failed;
        if let Some(first) = first {
            return Err(Error::Partial {
                action: "pod creates",
                failed: attempted - created,
                attempted,
                first: Box::new(first),
            });
        }
        batch *= 2;
    }
}

async fn create_one<S: Store>(ctx: &Ctx<S>, owner: &Owner<'_>, pod: &Pod) -> Result<(), Error> {
    let name = meta::name(&pod.metadata);
    match ctx
        .client
        .apply(&ctx.pods, "create", pod, owner.component)
        .await
    {
        Ok(()) => {
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
            Ok(())
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
/// controller owner, not terminating) that match `selector`.
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
    let orphans: Vec<Arc<Pod>> = ctx
        .pods
        .list_namespace(meta::namespace(owner.meta))
        .into_iter()
        .filter(|p| {
            meta::controller_of(&p.metadata).is_none()
                && p.metadata.deletion_timestamp.is_none()
                && meta::selector_matches(selector, meta::labels(&p.metadata))
        })
        .collect();
    for orphan in orphans {
        let mut adopted = (*orphan).clone();
        adopted
            .metadata
            .owner_references
            .get_or_insert_with(Vec::new)
            .push(meta::owner_ref(
                owner.kind.api_version(),
                owner.kind.name(),
                owner.meta,
            ));
        tracing::info!(owner = %owner.key(), pod = meta::name(&orphan.metadata), "adopting orphan pod");
        ctx.client
            .apply(&ctx.pods, "adopt", &adopted, owner.component)
            .await?;
        if let Some(pod) = ctx.pods.get(&super::cache::key_of(&orphan.metadata)) {
            claimed.push(pod);
        }
    }
    Ok(claimed)
}
