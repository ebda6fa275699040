//! The controllers' narrow view of [`ObjectsApi`]: typed apply, status
//! update, delete and events, each writing its result through to the
//! matching cache so the next reconcile sees it at once.

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

/// A typed API client for the controllers.
pub(crate) struct Client<S> {
    api: Arc<ObjectsApi<S>>,
}

impl<S: Store> Client<S> {
    pub(crate) fn new(api: Arc<ObjectsApi<S>>) -> Self {
        Self { api }
    }

    /// Applies `object` (metadata and spec; its `resourceVersion`, if any,
    /// is sent along for the API's optimistic concurrency) and records the
    /// stored result in `cache`.
    pub(crate) async fn apply<K: Object + Serialize>(
        &self,
        cache: &Cache<K>,
        action: &'static str,
        object: &K,
        manager: &str,
    ) -> Result<(), Error> {
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
                key,
                source,
            })?;
        if let Some(stored) = &response.object {
            cache.observe(stored);
        }
        Ok(())
    }

    /// Replaces the status of `object` (compare-and-swap on
    /// `resource_version` if non-zero) and records the result.
    pub(crate) async fn update_status<K: Object, T: Serialize>(
        &self,
        cache: &Cache<K>,
        object: &ObjectMeta,
        status: &T,
        resource_version: u64,
    ) -> Result<(), Error> {
        let kind = cache.kind();
        let key = super::cache::key_of(object);
        let status_json = serde_json::to_string(status).map_err(|source| Error::Encode {
            kind: kind.name(),
            key: key.clone(),
            source,
        })?;
        let stored = self
            .api
            .update_status(&v1::UpdateStatusRequest {
                r#ref: Some(object_ref(kind, object)),
                status_json,
                resource_version,
            })
            .await
            .map_err(|source| Error::Api {
                action: "update status of",
                kind: kind.name(),
                key,
                source,
            })?;
        cache.observe(&stored);
        Ok(())
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
                // A graceful delete keeps the object with a deletion
                // timestamp; the watch brings that state.
                let revision = response
                    .object
                    .as_ref()
                    .and_then(|o| o.meta.as_ref())
                    .map_or_else(|| meta::resource_version(object), |m| m.resource_version);
                cache.observe_deleted(&key, revision);
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
