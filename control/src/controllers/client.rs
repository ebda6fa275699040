//! The controllers' narrow view of [`ObjectsApi`]: typed create,
//! read-modify-write update, status update, delete and events, each
//! writing its result through to the matching cache so the next reconcile
//! sees it at once.
//!
//! Updates and status writes of cached objects are compare-and-swap on the
//! resourceVersion the cache had; on a conflict (someone else wrote the
//! object since) the object is read again from the API, the change is
//! recomputed from that state and retried, so a controller never
//! overwrites a change it has not seen.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use weir_proto::v1;

use super::cache::{Cache, Object};
use super::meta;
use crate::api::{ApiError, Kind, ObjectsApi};
use crate::events::{self, EventType};
use crate::store::Store;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{action} {kind} {key}: {source}")]
    Api {
        /// What the controller was doing (`create`, `scale`, `delete`…).
        action: &'static str,
        /// The kind acted on.
        kind: &'static str,
        /// `<namespace>/<name>` or `<name>`.
        key: String,
        /// The API's error.
        #[source]
        source: ApiError,
    },
    /// An object could not be encoded for the API.
    #[error("encode {kind} {key}: {source}")]
    Encode {
        /// The kind.
        kind: &'static str,
        /// Its key.
        key: String,
        /// The serialiser's error.
        #[source]
        source: serde_json::Error,
    },
    /// An object the API returned could not be decoded.
    #[error("decode {kind} {key}: {source}")]
    Decode {
        /// The kind.
        kind: &'static str,
        /// Its key.
        key: String,
        /// The deserialiser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The object's spec cannot be acted on.
    #[error("{kind} {key}: {field}: {reason}")]
    Spec {
        /// The kind.
        kind: &'static str,
        /// Its key.
        key: String,
        /// The offending field, e.g. `spec.strategy.rollingUpdate.maxSurge`.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Several creates or deletes of one reconcile failed; the first error.
    #[error("{failed} of {attempted} {action} failed, first: {first}")]
    Partial {
        /// What was attempted (`pod creates`, `pod deletes`).
        action: &'static str,
        /// How many failed.
        failed: usize,
        /// How many were attempted.
        attempted: usize,
        /// The first failure.
        first: Box<Error>,
    },
}

/// How often a compare-and-swap write is retried after a conflict.
const CONFLICT_ATTEMPTS: usize = 5;

/// A typed API client for the controllers.
pub(crate) struct Client<S> {
    api: Arc<ObjectsApi<S>>,
}

impl<S: Store> Client<S> {
    pub(crate) fn new(api: Arc<ObjectsApi<S>>) -> Self {
        Self { api }
    }

    /// The API the client writes through.
    pub(crate) fn api(&self) -> &Arc<ObjectsApi<S>> {
        &self.api
    }

    /// Applies `object` (metadata and spec; its `resourceVersion`, if any,
    /// makes it compare-and-swap) and records the stored result in `cache`.
    pub(crate) async fn apply<K: Object + Serialize>(
        &self,
        cache: &Cache<K>,
        action: &'static str,
        object: &K,
        manager: &str,
    ) -> Result<Arc<K>, Error> {
        let kind = cache.kind().name();
        let key = super::cache::key_of(object.metadata());
        let manifest_json = serde_json::to_string(object).map_err(|source| Error::Encode {
            kind,
            key: key.clone(),
            source,
        })?;
        let response = self
            .api
            .apply(&v1::ApplyRequest {
                manifest_json,
                field_manager: manager.to_owned(),
            })
            .await
            .map_err(|source| Error::Api {
                action,
                kind,
                key: key.clone(),
                source,
            })?;
        let stored = response.object.ok_or_else(|| Error::Api {
            action,
            kind,
            key: key.clone(),
            source: ApiError::Internal("apply returned no object".to_owned()),
        })?;
        cache.observe(&stored);
        decode(cache.kind(), &key, &stored)
    }

    /// Read-modify-write of a cached object: `mutate` changes a copy of
    /// `current` (returning `false` if nothing needs changing, then nothing
    /// is written), which is applied with the `resourceVersion` it was read
    /// at; on a conflict the object is read again and `mutate` retried on
    /// that. Returns the object as stored (or as read, if unchanged).
    pub(crate) async fn update<K, F>(
        &self,
        cache: &Cache<K>,
        action: &'static str,
        current: &K,
        manager: &str,
        mut mutate: F,
    ) -> Result<Arc<K>, Error>
    where
        K: Object + Serialize + Clone,
        F: FnMut(&mut K) -> bool,
    {
        let mut current = Arc::new(current.clone());
        for _ in 0..CONFLICT_ATTEMPTS {
            let mut changed = (*current).clone();
            if !mutate(&mut changed) {
                return Ok(current);
            }
            match self.apply(cache, action, &changed, manager).await {
                Err(Error::Api {
                    source: ApiError::Conflict { .. },
                    ..
                }) => current = self.reread(cache, current.metadata()).await?,
                result => return result,
            }
        }
        Err(conflict(cache.kind(), action, current.metadata()))
    }

    /// Reads an object from the API (not the cache, which may lag) and
    /// records it in `cache`.
    pub(crate) async fn reread<K: Object>(
        &self,
        cache: &Cache<K>,
        object: &ObjectMeta,
    ) -> Result<Arc<K>, Error> {
        let kind = cache.kind();
        let key = super::cache::key_of(object);
        let stored = self
            .api
            .get(&object_ref(kind, object))
            .await
            .map_err(|source| Error::Api {
                action: "get",
                kind: kind.name(),
                key: key.clone(),
                source,
            })?;
        cache.observe(&stored);
        decode(kind, &key, &stored)
    }

    /// Replaces the status of a cached object with what `status` computes
    /// from it (`None`: nothing to write), compare-and-swap on the
    /// `resourceVersion` it was read at; on a conflict the object is read
    /// again and its status recomputed. Records the result in `cache`.
    pub(crate) async fn update_status<K, T, F>(
        &self,
        cache: &Cache<K>,
        current: &Arc<K>,
        mut status: F,
    ) -> Result<(), Error>
    where
        K: Object,
        T: Serialize,
        F: FnMut(&K) -> Option<T>,
    {
        let kind = cache.kind();
        let mut current = Arc::clone(current);
        for _ in 0..CONFLICT_ATTEMPTS {
            let Some(wanted) = status(&current) else {
                return Ok(());
            };
            let object = current.metadata();
            let key = super::cache::key_of(object);
            let status_json = serde_json::to_string(&wanted).map_err(|source| Error::Encode {
                kind: kind.name(),
                key: key.clone(),
                source,
            })?;
            let result = self
                .api
                .update_status(&v1::UpdateStatusRequest {
                    r#ref: Some(object_ref(kind, object)),
                    status_json,
                    resource_version: meta::resource_version(object),
                })
                .await;
            match result {
                Ok(stored) => {
                    cache.observe(&stored);
                    return Ok(());
                }
                Err(ApiError::Conflict { .. }) => {
                    current = self.reread(cache, current.metadata()).await?;
                }
                Err(source) => {
                    return Err(Error::Api {
                        action: "update status of",
                        kind: kind.name(),
                        key,
                        source,
                    });
                }
            }
        }
        Err(conflict(kind, "update status of", current.metadata()))
    }

    /// Deletes `object` (`grace`: seconds, `Some(0)` forces; `None` uses the
    /// pod's own grace period); already gone counts as done.
    pub(crate) async fn delete<K: Object>(
        &self,
        cache: &Cache<K>,
        object: &ObjectMeta,
        grace: Option<i64>,
    ) -> Result<(), Error> {
        let kind = cache.kind();
        let key = super::cache::key_of(object);
        let result = self
            .api
            .delete(&v1::DeleteRequest {
                r#ref: Some(object_ref(kind, object)),
                propagation: String::new(),
                grace_period_seconds: grace,
            })
            .await;
        match result {
            Ok(response) => {
                match response.object {
                    // A graceful delete (a bound pod, a foreground owner)
                    // keeps the object with a deletion timestamp: it still
                    // exists and must stay visible (terminating pods count
                    // for Recreate and for a node's daemon pod).
                    Some(last) if terminating::<K>(&last) => cache.observe(&last),
                    Some(last) => {
                        let revision = last
                            .meta
                            .as_ref()
                            .map_or_else(|| meta::resource_version(object), |m| m.resource_version);
                        cache.observe_deleted(&key, revision);
                    }
                    None => cache.observe_deleted(&key, meta::resource_version(object)),
                }
                Ok(())
            }
            Err(ApiError::NotFound { .. }) => {
                cache.observe_deleted(&key, meta::resource_version(object));
                Ok(())
            }
            Err(source) => Err(Error::Api {
                action: "delete",
                kind: kind.name(),
                key,
                source,
            }),
        }
    }

    /// Whether an object exists in the store (not just in a cache, which may
    /// lag another cache).
    pub(crate) async fn exists(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<bool, Error> {
        let r = v1::ObjectRef {
            api_version: kind.api_version().to_owned(),
            kind: kind.name().to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        match self.api.get(&r).await {
            Ok(_) => Ok(true),
            Err(ApiError::NotFound { .. }) => Ok(false),
            Err(source) => Err(Error::Api {
                action: "get",
                kind: kind.name(),
                key: name.to_owned(),
                source,
            }),
        }
    }

    /// Whether the owner `object` (of `kind`) still exists in the store as
    /// the same object (uid) and is not being deleted: read from the API,
    /// not a cache, as Kubernetes' `RecheckDeletionTimestamp` does before a
    /// controller adopts or creates dependents.
    pub(crate) async fn alive(&self, kind: Kind, object: &ObjectMeta) -> Result<bool, Error> {
        match self.api.get(&object_ref(kind, object)).await {
            Ok(stored) => {
                let doc: serde_json::Value =
                    serde_json::from_str(&stored.json).map_err(|source| Error::Decode {
                        kind: kind.name(),
                        key: super::cache::key_of(object),
                        source,
                    })?;
                let same = doc["metadata"]["uid"].as_str() == Some(meta::uid(object));
                Ok(same && doc["metadata"]["deletionTimestamp"].is_null())
            }
            Err(ApiError::NotFound { .. }) => Ok(false),
            Err(source) => Err(Error::Api {
                action: "get",
                kind: kind.name(),
                key: super::cache::key_of(object),
                source,
            }),
        }
    }

    /// Records an event about an object of `kind`.
    pub(crate) async fn event(
        &self,
        kind: Kind,
        regarding: &ObjectMeta,
        type_: EventType,
        reason: &str,
        message: &str,
        component: &str,
    ) {
        let regarding = meta::proto_meta(kind.api_version(), kind.name(), regarding);
        events::record(&self.api, &regarding, type_, reason, message, component).await;
    }
}

/// The error of a write that kept conflicting.
fn conflict(kind: Kind, action: &'static str, object: &ObjectMeta) -> Error {
    Error::Api {
        action,
        kind: kind.name(),
        key: super::cache::key_of(object),
        source: ApiError::Conflict {
            plural: kind.plural(),
            name: meta::name(object).to_owned(),
        },
    }
}

/// Whether an object the API returned has a deletion timestamp.
fn terminating<K: Object>(object: &v1::Object) -> bool {
    serde_json::from_str::<K>(&object.json).is_ok_and(|k| k.metadata().deletion_timestamp.is_some())
}

/// The typed form of an object the API returned.
fn decode<K: Object>(kind: Kind, key: &str, object: &v1::Object) -> Result<Arc<K>, Error> {
    serde_json::from_str(&object.json)
        .map(Arc::new)
        .map_err(|source| Error::Decode {
            kind: kind.name(),
            key: key.to_owned(),
            source,
        })
}

fn object_ref(kind: Kind, object: &ObjectMeta) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: kind.api_version().to_owned(),
        kind: kind.name().to_owned(),
        namespace: if kind.namespaced() {
            meta::namespace(object).to_owned()
        } else {
            String::new()
        },
        name: meta::name(object).to_owned(),
    }
}
