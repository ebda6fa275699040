//! Delete as Kubernetes does it, synchronously inside the call:
//!
//! - A Pod bound to an existing node is deleted gracefully: it gets
//!   `deletionTimestamp` (now + grace) and `deletionGracePeriodSeconds` and
//!   stays until its agent reports it stopped ([`ObjectsApi::remove_pod`]).
//!   An unbound pod, grace 0, or a pod whose node is gone goes at once. A
//!   second Delete may only shorten the grace.
//! - Owners cascade through `metadata.ownerReferences` (dependents are
//!   `ReplicaSets` and Pods in the owner's namespace, found by the owner's
//!   uid): Background removes the owner, then deletes its dependents
//!   (pods gracefully); Foreground marks the owner (deletionTimestamp and
//!   the `foregroundDeletion` finalizer), deletes the dependents, and
//!   removes the owner when the last one is gone; Orphan removes the
//!   reference from the dependents and then the owner.
//! - A Namespace is marked Terminating, everything in it is deleted, and it
//!   goes when it is empty. `default` and `kube-system` cannot be deleted.
//!
//! Whatever waits (a foreground owner, a terminating namespace) is finished
//! by the removal of the last object it waits for, so no background task is
//! needed; a crash in the middle of a cascade leaves dependents whose
//! owner is gone, which a later Delete of them (or a garbage collector)
//! cleans up.

use std::time::Duration;

use serde_json::json;
use weir_proto::v1;

use super::namespaces::SYSTEM_NAMESPACES;
use super::object::{FOREGROUND, Stored, now};
use super::{ApiError, Kind, ObjectsApi, Target, WRITE_ATTEMPTS};
use crate::store::{Compare, KeyValue, Op, Store};

/// The grace a pod gets when neither the request nor the pod says.
const DEFAULT_GRACE_SECONDS: i64 = 30;
/// The kinds that can be dependents of an owner.
const DEPENDENT_KINDS: [Kind; 3] = [Kind::ReplicaSet, Kind::Pod, Kind::EndpointSlice];

/// How a Delete treats the object's dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Propagation {
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    fn parse(text: &str) -> Result<Self, ApiError> {
        match text {
            "" | "Background" => Ok(Self::Background),
            "Foreground" => Ok(Self::Foreground),
            "Orphan" => Ok(Self::Orphan),
            other => Err(ApiError::Invalid(format!(
                "propagation: {other:?} is not one of Background, Foreground, Orphan"
            ))),
        }
    }
}

/// A stored object with the key and revision it was read at.
struct Found {
    kind: Kind,
    key: String,
    kv: KeyValue,
    object: Stored,
}

/// The kind of a stored object, from its `kind` field.
fn kind_of(object: &Stored) -> Option<Kind> {
    let name = object.json().get("kind")?.as_str()?;
    Kind::from_name(name).ok()
}

impl<S: Store> ObjectsApi<S> {
    /// Deletes one object as described in the module docs and returns its
    /// last state (for a pod being stopped or an owner waiting for its
    /// dependents, the object with its `deletionTimestamp`).
    pub async fn delete(&self, req: &v1::DeleteRequest) -> Result<v1::DeleteResponse, ApiError> {
        let target = Target::resolve(req.r#ref.as_ref())?;
        let propagation = Propagation::parse(&req.propagation)?;
        if let Some(grace) = req.grace_period_seconds.filter(|g| *g < 0) {
            return Err(ApiError::Invalid(format!(
                "grace_period_seconds: {grace} must be greater than or equal to 0"
            )));
        }
        let object = match target.kind {
            Kind::Pod => self.delete_pod(&target, req.grace_period_seconds).await?,
            Kind::Namespace => self.delete_namespace(&target).await?,
            _ => self.delete_owner(&target, propagation).await?,
        };
        Ok(v1::DeleteResponse {
            object: Some(object),
        })
    }

    /// Removes a pod its agent has stopped (the end of a graceful delete),
    /// if it is still the pod with `uid`; returns its last state, or `None`
    /// if there is no such pod. Finishes whatever waited for it (an owner
    /// deleted in the foreground, a terminating namespace).
    pub async fn remove_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Option<v1::Object>, ApiError> {
        let key = Kind::Pod.key(namespace, name)?;
        for _ in 0..WRITE_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(None);
            };
            let pod = Stored::decode(&kv)?;
            if pod.uid() != uid {
                return Ok(None);
            }
            if self.remove(&key, kv.mod_revision).await? {
                self.after_removed(&pod).await?;
                return Ok(Some(pod.to_object(kv.mod_revision)));
            }
        }
        Err(ApiError::Conflict {
            plural: Kind::Pod.plural(),
            name: name.to_owned(),
        })
    }

    async fn read(&self, target: &Target) -> Result<Found, ApiError> {
        let kv = self.stored(target).await?;
        Ok(Found {
            kind: target.kind,
            key: target.key.clone(),
            object: Stored::decode(&kv)?,
            kv,
        })
    }

    /// Compare-and-swap delete of `key` at `revision`; whether it happened.
    /// A Service's cluster IP and node ports are released in the same
    /// transaction.
    async fn remove(&self, key: &str, revision: u64) -> Result<bool, ApiError> {
        let mut ops = vec![Op::Delete {
            key: key.to_owned(),
        }];
        if key.starts_with(&Kind::Service.prefix("")?) {
            match self.store.get(key).await? {
                Some(kv) if kv.mod_revision == revision => {
                    ops.extend(super::services::release_ops(&Stored::decode(&kv)?));
                }
                _ => return Ok(false),
            }
        }
        let result = self
            .store
            .txn(vec![(key.to_owned(), Compare::ModRevision(revision))], ops)
            .await?;
        Ok(result.succeeded)
    }

    /// Compare-and-swap write of `object` over the revision it was read at.
    async fn rewrite(
        &self,
        key: &str,
        revision: u64,
        object: &Stored,
    ) -> Result<Option<u64>, ApiError> {
        let result = self
            .store
            .txn(
                vec![(key.to_owned(), Compare::ModRevision(revision))],
                vec![object.put(key)?],
            )
            .await?;
        Ok(result.succeeded.then_some(result.revision))
    }

    async fn delete_pod(
        &self,
        target: &Target,
        grace: Option<i64>,
    ) -> Result<v1::Object, ApiError> {
        for _ in 0..WRITE_ATTEMPTS {
            let Found { kv, mut object, .. } = self.read(target).await?;
            let grace = grace
                .or_else(|| {
                    object
                        .spec()
                        .and_then(|s| s.get("terminationGracePeriodSeconds"))
                        .and_then(serde_json::Value::as_i64)
                })
                .unwrap_or(DEFAULT_GRACE_SECONDS);
            let node = object.spec_str("nodeName").to_owned();
            let node_exists =
                !node.is_empty() && self.store.get(&Kind::Node.key("", &node)?).await?.is_some();
            if grace == 0 || !node_exists {
                if self.remove(&target.key, kv.mod_revision).await? {
                    self.after_removed(&object).await?;
                    return Ok(object.to_object(kv.mod_revision));
                }
                continue;
            }
            let deadline = now()
                .checked_add(Duration::from_secs(grace.unsigned_abs()))
                .map_err(|e| ApiError::Invalid(format!("grace_period_seconds: {grace}: {e}")))?;
            if object.deletion_timestamp().is_some_and(|at| at <= deadline) {
                // Already terminating at least as soon: only shortening is allowed.
                return Ok(object.to_object(kv.mod_revision));
            }
            object.set_deleting(deadline, Some(grace));
            if let Some(revision) = self.rewrite(&target.key, kv.mod_revision, &object).await? {
                return Ok(object.to_object(revision));
            }
        }
        Err(target.conflict())
    }

    /// The objects that name `owner` (by uid) in their ownerReferences.
    async fn dependents(&self, owner: &Stored) -> Result<Vec<Found>, ApiError> {
        let mut out = Vec::new();
        if owner.namespace().is_empty() || owner.uid().is_empty() {
            return Ok(out);
        }
        for kind in DEPENDENT_KINDS {
            let (kvs, _) = self.store.list(&kind.prefix(owner.namespace())?).await?;
            for kv in kvs {
                let object = Stored::decode(&kv)?;
                if object.owners().iter().any(|(_, _, uid)| uid == owner.uid()) {
                    out.push(Found {
                        kind,
                        key: kv.key.clone(),
                        kv,
                        object,
                    });
                }
            }
        }
        Ok(out)
    }

    async fn delete_owner(
        &self,
        target: &Target,
        propagation: Propagation,
    ) -> Result<v1::Object, ApiError> {
        match propagation {
            Propagation::Orphan => {
                let owner = self.read(target).await?;
                for dependent in self.dependents(&owner.object).await? {
                    self.orphan(dependent, owner.object.uid()).await?;
                }
                self.remove_found(target).await
            }
            Propagation::Background => {
                let owner = self.read(target).await?;
                let last = self.remove_found(target).await?;
                let mut queue = self.dependents(&owner.object).await?;
                while let Some(dependent) = queue.pop() {
                    if dependent.kind == Kind::Pod {
                        self.delete_dependent_pod(&dependent).await?;
                    } else if self
                        .remove(&dependent.key, dependent.kv.mod_revision)
                        .await?
                    {
                        queue.extend(self.dependents(&dependent.object).await?);
                    }
                }
                Ok(last)
            }
            Propagation::Foreground => self.delete_foreground(target).await,
        }
    }

    /// Removes the object now (retrying on concurrent writes) and finishes
    /// whatever waited for it.
    async fn remove_found(&self, target: &Target) -> Result<v1::Object, ApiError> {
        for _ in 0..WRITE_ATTEMPTS {
            let found = self.read(target).await?;
            if self.remove(&found.key, found.kv.mod_revision).await? {
                self.after_removed(&found.object).await?;
                return Ok(found.object.to_object(found.kv.mod_revision));
            }
        }
        Err(target.conflict())
    }

    async fn delete_dependent_pod(&self, pod: &Found) -> Result<(), ApiError> {
        let target = Target {
            kind: Kind::Pod,
            key: pod.key.clone(),
            name: pod.object.name().to_owned(),
        };
        match self.delete_pod(&target, None).await {
            Ok(_) | Err(ApiError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes the reference to `owner_uid` from a dependent.
    async fn orphan(&self, mut dependent: Found, owner_uid: &str) -> Result<(), ApiError> {
        for _ in 0..WRITE_ATTEMPTS {
            if !dependent.object.remove_owner(owner_uid) {
                return Ok(());
            }
            let revision = dependent.kv.mod_revision;
            if self
                .rewrite(&dependent.key, revision, &dependent.object)
                .await?
                .is_some()
            {
                return Ok(());
            }
            let Some(kv) = self.store.get(&dependent.key).await? else {
                return Ok(());
            };
            dependent.object = Stored::decode(&kv)?;
            dependent.kv = kv;
        }
        Err(ApiError::Conflict {
            plural: dependent.kind.plural(),
            name: dependent.object.name().to_owned(),
        })
    }

    /// Marks an object as deleted in the foreground (deletionTimestamp and
    /// the finalizer); returns it as stored after the mark.
    async fn mark_foreground(&self, mut found: Found) -> Result<Found, ApiError> {
        for _ in 0..WRITE_ATTEMPTS {
            if found.object.deletion_timestamp().is_some()
                && found.object.finalizers().iter().any(|f| f == FOREGROUND)
            {
                return Ok(found);
            }
            if found.object.deletion_timestamp().is_none() {
                found.object.set_deleting(now(), None);
            }
            found.object.add_finalizer(FOREGROUND);
            if let Some(revision) = self
                .rewrite(&found.key, found.kv.mod_revision, &found.object)
                .await?
            {
                found.kv.mod_revision = revision;
                return Ok(found);
            }
            let kv = self
                .store
                .get(&found.key)
                .await?
                .ok_or_else(|| ApiError::NotFound {
                    plural: found.kind.plural(),
                    name: found.object.name().to_owned(),
                })?;
            found.object = Stored::decode(&kv)?;
            found.kv = kv;
        }
        Err(ApiError::Conflict {
            plural: found.kind.plural(),
            name: found.object.name().to_owned(),
        })
    }

    async fn delete_foreground(&self, target: &Target) -> Result<v1::Object, ApiError> {
        let owner = self.mark_foreground(self.read(target).await?).await?;
        // Owners whose dependents are being deleted, outermost first.
        let mut waiting = vec![owner.key.clone()];
        let mut queue = self.dependents(&owner.object).await?;
        while let Some(dependent) = queue.pop() {
            if dependent.kind == Kind::Pod {
                self.delete_dependent_pod(&dependent).await?;
            } else {
                let marked = self.mark_foreground(dependent).await?;
                queue.extend(self.dependents(&marked.object).await?);
                waiting.push(marked.key);
            }
        }
        // Innermost first: each goes if nothing waits on it any more.
        for key in waiting.iter().rev() {
            if let Some(kv) = self.store.get(key).await? {
                let object = Stored::decode(&kv)?;
                self.finish_foreground(key, &kv, &object).await?;
            }
        }
        match self.store.get(&target.key).await? {
            Some(kv) => Ok(Stored::decode(&kv)?.to_object(kv.mod_revision)),
            None => Ok(owner.object.to_object(owner.kv.mod_revision)),
        }
    }

    /// Removes a foreground-deleted owner once it has no dependents left.
    async fn finish_foreground(
        &self,
        key: &str,
        kv: &KeyValue,
        owner: &Stored,
    ) -> Result<(), ApiError> {
        let waiting = owner.deletion_timestamp().is_some()
            && owner.finalizers().iter().any(|f| f == FOREGROUND);
        if !waiting || !self.dependents(owner).await?.is_empty() {
            return Ok(());
        }
        if self.remove(key, kv.mod_revision).await? {
            self.after_removed(owner).await?;
        }
        Ok(())
    }

    /// After `gone` was removed: finish the foreground deletes of its
    /// owners and the deletion of its namespace, if they waited only for it.
    async fn after_removed(&self, gone: &Stored) -> Result<(), ApiError> {
        let mut queue = vec![gone.clone()];
        while let Some(gone) = queue.pop() {
            for (kind, name, uid) in gone.owners() {
                let Ok(kind) = Kind::from_name(&kind) else {
                    continue;
                };
                if !kind.namespaced() {
                    continue;
                }
                let key = kind.key(gone.namespace(), &name)?;
                let Some(kv) = self.store.get(&key).await? else {
                    continue;
                };
                let owner = Stored::decode(&kv)?;
                let waiting = owner.uid() == uid
                    && owner.deletion_timestamp().is_some()
                    && owner.finalizers().iter().any(|f| f == FOREGROUND);
                if waiting
                    && self.dependents(&owner).await?.is_empty()
                    && self.remove(&key, kv.mod_revision).await?
                {
                    queue.push(owner);
                }
            }
            if kind_of(&gone).is_some_and(Kind::namespaced) {
                self.finish_namespace(gone.namespace()).await?;
            }
        }
        Ok(())
    }

    async fn delete_namespace(&self, target: &Target) -> Result<v1::Object, ApiError> {
        if SYSTEM_NAMESPACES.contains(&target.name.as_str()) {
            return Err(ApiError::Forbidden(format!(
                "namespaces \"{}\" is forbidden: this namespace may not be deleted",
                target.name
            )));
        }
        let mut marked = None;
        for _ in 0..WRITE_ATTEMPTS {
            let Found { kv, mut object, .. } = self.read(target).await?;
            if object.deletion_timestamp().is_some() {
                marked = Some(object.to_object(kv.mod_revision));
                break;
            }
            object.set_deleting(now(), None);
            object.set_status(json!({ "phase": "Terminating" }));
            if let Some(revision) = self.rewrite(&target.key, kv.mod_revision, &object).await? {
                marked = Some(object.to_object(revision));
                break;
            }
        }
        let marked = marked.ok_or_else(|| target.conflict())?;
        for kind in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
            let (kvs, _) = self.store.list(&kind.prefix(&target.name)?).await?;
            for kv in kvs {
                let object = Stored::decode(&kv)?;
                let found = Found {
                    kind,
                    key: kv.key.clone(),
                    kv,
                    object,
                };
                if kind == Kind::Pod {
                    self.delete_dependent_pod(&found).await?;
                } else {
                    let item = Target {
                        kind,
                        key: found.key.clone(),
                        name: found.object.name().to_owned(),
                    };
                    match self.remove_found(&item).await {
                        Ok(_) | Err(ApiError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.finish_namespace(&target.name).await?;
        match self.store.get(&target.key).await? {
            Some(kv) => Ok(Stored::decode(&kv)?.to_object(kv.mod_revision)),
            None => Ok(marked),
        }
    }

    /// Removes a terminating namespace once nothing is left in it.
    async fn finish_namespace(&self, namespace: &str) -> Result<(), ApiError> {
        let key = Kind::Namespace.key("", namespace)?;
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(());
        };
        if Stored::decode(&kv)?.deletion_timestamp().is_none() {
            return Ok(());
        }
        for kind in Kind::ALL.into_iter().filter(|k| k.namespaced()) {
            let (kvs, _) = self.store.list(&kind.prefix(namespace)?).await?;
            if !kvs.is_empty() {
                return Ok(());
            }
        }
        self.remove(&key, kv.mod_revision).await?;
        Ok(())
    }
}
