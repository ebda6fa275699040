//! The `Objects` gRPC service over any [`Store`]: `Apply`, `UpdateStatus`, `Get`,
//! `List`, `Delete` and `Watch` for the kinds in [`Kind`].
//!
//! Objects are stored as JSON without `metadata.resourceVersion` (the
//! store's mod revision is the resource version; it is filled in on every
//! read). Apply writes metadata and spec and keeps the stored status;
//! `UpdateStatus` writes status only. Every write is compare-and-swap on the
//! mod revision it read; an Apply whose manifest carries
//! `metadata.resourceVersion` is compare-and-swap on that version (a
//! conflict otherwise). A namespaced object needs its namespace to exist;
//! what an update may change is in `update.rs`, how Delete cascades in
//! `delete.rs`.

mod bind;
mod delete;
pub mod identity;
mod kinds;
mod namespaces;
mod object;
pub mod selector;
mod services;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_identity;
#[cfg(test)]
mod tests_lifecycle;
#[cfg(test)]
mod tests_services;
mod update;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use serde_json::Value;
use tonic::{Request, Response, Status};
use weir_proto::v1;
use weir_proto::v1::objects_server::{Objects, ObjectsServer};

use self::kinds::Validated;
pub use self::kinds::{Kind, NAMESPACE_NAME_LABEL};
pub use self::namespaces::SYSTEM_NAMESPACES;
pub use self::object::now;
use self::object::{Stored, labels_of};
pub use self::selector::{Selector, SelectorError};
pub use self::services::{CLUSTER_IP_RECORDS, NODE_PORT_RECORDS};
use crate::store::{Compare, Event, EventKind, KeyValue, Store, StoreError};

/// How often a write is retried when another writer changed the object
/// between our read and our compare-and-swap.
const WRITE_ATTEMPTS: usize = 5;

/// Why an API call failed; each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request or manifest is invalid (`<source>: <field>: <reason>`).
    #[error("{0}")]
    Invalid(String),
    /// The object does not exist.
    #[error("{plural} \"{name}\" not found")]
    NotFound {
        /// The kind's plural, e.g. `pods`.
        plural: &'static str,
        /// The object's name.
        name: String,
    },
    /// The request is valid but the cluster's state forbids it (a
    /// namespace that is being deleted, a system namespace).
    #[error("{0}")]
    Forbidden(String),
    /// The object changed since the caller (or our retries) read it.
    #[error(
        "operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; \
         please apply your changes to the latest version"
    )]
    Conflict {
        /// The kind's plural, e.g. `pods`.
        plural: &'static str,
        /// The object's name.
        name: String,
    },
    /// A resource the cluster allocates from has run out (security
    /// identities).
    #[error("{0}")]
    Exhausted(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A stored object could not be decoded.
    #[error("corrupt object at {key}: {reason}")]
    Corrupt {
        /// The store key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bug: something that cannot fail did.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        let message = err.to_string();
        match err {
            ApiError::Invalid(_) => Status::invalid_argument(message),
            ApiError::NotFound { .. } => Status::not_found(message),
            ApiError::Conflict { .. } => Status::aborted(message),
            ApiError::Forbidden(_) => Status::failed_precondition(message),
            ApiError::Exhausted(_) => Status::resource_exhausted(message),
            ApiError::Store(StoreError::Compacted { .. }) => Status::out_of_range(message),
            ApiError::Store(_) | ApiError::Corrupt { .. } | ApiError::Internal(_) => {
                Status::internal(message)
            }
        }
    }
}

/// The `Objects` service over a store.
pub struct ObjectsApi<S> {
    store: Arc<S>,
    /// Where cluster IPs are allocated from.
    service_cidr: crate::nodes::Cidr,
}

/// The `Objects` gRPC server over `store`, ready to add to a tonic router.
pub fn service<S: Store>(store: Arc<S>) -> ObjectsServer<ObjectsApi<S>> {
    ObjectsServer::new(ObjectsApi::new(store))
}

/// The `Objects` gRPC server over an API the caller also uses in-process
/// (the scheduler, controllers and the `Nodes` service share one).
pub fn service_from<S: Store>(api: Arc<ObjectsApi<S>>) -> ObjectsServer<ObjectsApi<S>> {
    ObjectsServer::from_arc(api)
}

impl<S: Store> ObjectsApi<S> {
    /// The API over `store`, for in-process callers: they go through the
    /// same validation, defaulting and compare-and-swap as gRPC clients.
    pub fn new(store: Arc<S>) -> Self {
        Self {
            store,
            service_cidr: services::default_service_cidr(),
        }
    }

    /// The API allocating cluster IPs from `cidr` (default 10.96.0.0/16).
    #[must_use]
    pub fn with_service_cidr(mut self, cidr: crate::nodes::Cidr) -> Self {
        self.service_cidr = cidr;
        self
    }

    /// The service CIDR cluster IPs are allocated from.
    pub fn service_cidr(&self) -> crate::nodes::Cidr {
        self.service_cidr
    }

    /// The store under the API.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The stored object `target` names, or `NotFound`.
    async fn stored(&self, target: &Target) -> Result<KeyValue, ApiError> {
        self.store
            .get(&target.key)
            .await?
            .ok_or_else(|| target.not_found())
    }
}

/// The stream a Watch returns.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

/// A resolved object reference.
struct Target {
    kind: Kind,
    key: String,
    name: String,
}

impl Target {
    fn resolve(r: Option<&v1::ObjectRef>) -> Result<Self, ApiError> {
        let r = r.ok_or_else(|| ApiError::Invalid("ref: required".to_owned()))?;
        let kind = Kind::from_name(&r.kind)?;
        kind.check_api_version(&r.api_version)?;
        let key = kind.key(&r.namespace, &r.name)?;
        Ok(Self {
            kind,
            key,
            name: r.name.clone(),
        })
    }

    fn not_found(&self) -> ApiError {
        ApiError::NotFound {
            plural: self.kind.plural(),
            name: self.name.clone(),
        }
    }

    fn conflict(&self) -> ApiError {
        ApiError::Conflict {
            plural: self.kind.plural(),
            name: self.name.clone(),
        }
    }
}

/// The kind a manifest names.
fn manifest_kind(doc: &Value) -> Result<Kind, ApiError> {
    match doc.get("kind") {
        None | Some(Value::Null) => Err(ApiError::Invalid("manifest: kind: required".to_owned())),
        Some(Value::String(kind)) => Kind::from_name(kind),
        Some(other) => Err(ApiError::Invalid(format!(
            "manifest: kind: must be a string, got {other}"
        ))),
    }
}

fn parse_selector(text: &str) -> Result<Selector, ApiError> {
    Selector::parse(text).map_err(|e| ApiError::Invalid(e.to_string()))
}

impl<S: Store> ObjectsApi<S> {
    /// Creates or updates an object from a manifest; see the module docs.
    pub async fn apply(&self, req: &v1::ApplyRequest) -> Result<v1::ApplyResponse, ApiError> {
        let doc: Value = serde_json::from_str(&req.manifest_json)
            .map_err(|e| ApiError::Invalid(format!("manifest: invalid JSON: {e}")))?;
        let kind = manifest_kind(&doc)?;
        let Validated {
            object,
            mut warnings,
            resource_version,
        } = kind.validate("manifest", &doc)?;
        let desired = Stored::new(object);
        let given_identity = (kind == Kind::Pod)
            .then(|| {
                desired
                    .annotation(identity::IDENTITY_ANNOTATION)
                    .map(str::to_owned)
            })
            .flatten();
        let target = Target {
            kind,
            key: kind.key(desired.namespace(), desired.name())?,
            name: desired.name().to_owned(),
        };
        for _ in 0..WRITE_ATTEMPTS {
            let current = self.store.get(&target.key).await?;
            let guard = self
                .namespace_guard(kind, desired.namespace(), current.is_none())
                .await?;
            let stored_before = match &current {
                Some(kv) if matches!(kind, Kind::Service | Kind::Pod) => Some(Stored::decode(kv)?),
                _ => None,
            };
            let (mut compares, mut written, created) = match current {
                None => {
                    if resource_version.is_some() {
                        // An update of a version that no longer exists.
                        return Err(target.not_found());
                    }
                    let mut created = desired.clone();
                    created.set_created();
                    (vec![(target.key.clone(), Compare::Absent)], created, true)
                }
                Some(kv) => {
                    if resource_version.is_some_and(|rv| rv != kv.mod_revision) {
                        return Err(target.conflict());
                    }
                    let stored = Stored::decode(&kv)?;
                    let mut updated = desired.clone();
                    update::check(kind, &stored, &mut updated)?;
                    if kind == Kind::Pod {
                        identity::carry_over(&stored, &mut updated);
                    }
                    let updated = updated.updating(&stored);
                    if updated == stored {
                        warnings.extend(identity::overridden(given_identity.as_deref(), &stored));
                        return Ok(v1::ApplyResponse {
                            object: Some(stored.to_object(kv.mod_revision)),
                            warnings,
                            created: false,
                        });
                    }
                    let compare = (target.key.clone(), Compare::ModRevision(kv.mod_revision));
                    (vec![compare], updated, false)
                }
            };
            compares.extend(guard);
            let (claims, ops) = self
                .write_ops(kind, stored_before.as_ref(), &mut written, &target.key)
                .await?;
            compares.extend(claims);
            let result = self.store.txn(compares, ops).await?;
            if result.succeeded {
                warnings.extend(identity::overridden(given_identity.as_deref(), &written));
                return Ok(v1::ApplyResponse {
                    object: Some(written.to_object(result.revision)),
                    warnings,
                    created,
                });
            }
            if resource_version.is_some() {
                return Err(target.conflict());
            }
        }
        Err(target.conflict())
    }

    /// The compares and writes of an Apply's transaction: the object's
    /// write plus what the kind allocates with it (a pod's identity
    /// records first, so a watcher knows an identity before a pod carries
    /// it; a Service's cluster IP and node port records).
    async fn write_ops(
        &self,
        kind: Kind,
        stored: Option<&Stored>,
        written: &mut Stored,
        key: &str,
    ) -> Result<(Vec<(String, Compare)>, Vec<crate::store::Op>), ApiError> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut after = Vec::new();
        if kind == Kind::Pod {
            let (claims, records) = self.assign_identity(stored, written).await?;
            compares.extend(claims);
            ops.extend(records);
        }
        if kind == Kind::Service {
            let (claims, records) = self.allocate_service(stored, written).await?;
            compares.extend(claims);
            after.extend(records);
        }
        ops.push(written.put(key)?);
        ops.extend(after);
        Ok((compares, ops))
    }

    /// Replaces an object's status only.
    pub async fn update_status(
        &self,
        req: &v1::UpdateStatusRequest,
    ) -> Result<v1::Object, ApiError> {
        let target = Target::resolve(req.r#ref.as_ref())?;
        let status: Value = serde_json::from_str(&req.status_json)
            .map_err(|e| ApiError::Invalid(format!("status_json: invalid JSON: {e}")))?;
        target.kind.check_status(&status)?;
        for _ in 0..WRITE_ATTEMPTS {
            let kv = self.stored(&target).await?;
            if req.resource_version != 0 && req.resource_version != kv.mod_revision {
                return Err(target.conflict());
            }
            let mut object = Stored::decode(&kv)?;
            object.set_status(status.clone());
            let result = self
                .store
                .txn(
                    vec![(target.key.clone(), Compare::ModRevision(kv.mod_revision))],
                    vec![object.put(&target.key)?],
                )
                .await?;
            if result.succeeded {
                return Ok(object.to_object(result.revision));
            }
            if req.resource_version != 0 {
                return Err(target.conflict());
            }
        }
        Err(target.conflict())
    }

    /// Reads one object.
    pub async fn get(&self, r: &v1::ObjectRef) -> Result<v1::Object, ApiError> {
        let target = Target::resolve(Some(r))?;
        let kv = self.stored(&target).await?;
        Ok(Stored::decode(&kv)?.to_object(kv.mod_revision))
    }

    /// Lists the objects of a kind in a namespace (empty: all) whose labels
    /// match the selector, with the revision the list was read at.
    pub async fn list(&self, req: &v1::ListRequest) -> Result<v1::ListResponse, ApiError> {
        let kind = Kind::from_name(&req.kind)?;
        let prefix = kind.prefix(&req.namespace)?;
        let selector = parse_selector(&req.label_selector)?;
        let (kvs, revision) = self.store.list(&prefix).await?;
        let mut items = Vec::new();
        for kv in &kvs {
            let object = Stored::decode(kv)?;
            if selector.matches(&object.labels()) {
                items.push(object.to_object(kv.mod_revision));
            }
        }
        Ok(v1::ListResponse { items, revision })
    }

    /// Streams changes to the objects of a kind in a namespace (empty: all)
    /// matching the selector, after `from_revision` (0: from now).
    pub async fn watch(&self, req: &v1::WatchRequest) -> Result<WatchStream, ApiError> {
        let kind = Kind::from_name(&req.kind)?;
        let prefix = kind.prefix(&req.namespace)?;
        let selector = parse_selector(&req.label_selector)?;
        let from = if req.from_revision == 0 {
            self.store.revision().await?
        } else {
            req.from_revision
        };
        let rx = match self.store.watch(&prefix, from).await {
            Ok(rx) => rx,
            Err(StoreError::Compacted { compacted, .. }) => {
                return Ok(Box::pin(futures::stream::iter([Ok(compacted_event(
                    compacted,
                ))])));
            }
            Err(e) => return Err(e.into()),
        };
        let stream = futures::stream::unfold(Some((rx, selector)), |state| async move {
            let (mut rx, selector) = state?;
            loop {
                match rx.recv().await? {
                    Ok(event) => match watch_event(&event, &selector) {
                        Ok(Some(out)) => return Some((Ok(out), Some((rx, selector)))),
                        Ok(None) => {}
                        Err(e) => return Some((Err(e.into()), None)),
                    },
                    Err(StoreError::Compacted { compacted, .. }) => {
                        return Some((Ok(compacted_event(compacted)), None));
                    }
                    Err(e) => return Some((Err(ApiError::from(e).into()), None)),
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

/// The ERROR event that ends a watch whose history was compacted away.
fn compacted_event(compacted: u64) -> v1::WatchEvent {
    v1::WatchEvent {
        r#type: v1::EventType::Error.into(),
        object: None,
        revision: compacted,
        error: format!("compacted: relist from revision {compacted}"),
    }
}

/// Turns a store event into the watch event a selector's watcher sees, as
/// Kubernetes does: an object that starts matching is ADDED, one that stops
/// matching is DELETED; `None` if the watcher does not see the change.
fn watch_event(event: &Event, selector: &Selector) -> Result<Option<v1::WatchEvent>, ApiError> {
    let revision = event.revision();
    let object = Stored::decode(&event.kv)?;
    let matches_now = selector.matches(&object.labels());
    let matched_before = match &event.prev {
        Some(prev) => selector.matches(&labels_of(&Stored::decode(prev)?)),
        None => false,
    };
    let r#type = match event.kind {
        EventKind::Delete if matches_now => v1::EventType::Deleted,
        EventKind::Put if matches_now => {
            let fresh = event.prev.is_none() || event.kv.create_revision == event.kv.mod_revision;
            if fresh || !matched_before {
                v1::EventType::Added
            } else {
                v1::EventType::Modified
            }
        }
        EventKind::Put if matched_before => v1::EventType::Deleted,
        EventKind::Delete | EventKind::Put => return Ok(None),
    };
    Ok(Some(v1::WatchEvent {
        r#type: r#type.into(),
        object: Some(object.to_object(revision)),
        revision,
        error: String::new(),
    }))
}

#[tonic::async_trait]
impl<S: Store> Objects for ObjectsApi<S> {
    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        Ok(Response::new(Self::apply(self, request.get_ref()).await?))
    }

    async fn update_status(
        &self,
        request: Request<v1::UpdateStatusRequest>,
    ) -> Result<Response<v1::Object>, Status> {
        Ok(Response::new(
            Self::update_status(self, request.get_ref()).await?,
        ))
    }

    async fn get(&self, request: Request<v1::ObjectRef>) -> Result<Response<v1::Object>, Status> {
        Ok(Response::new(Self::get(self, request.get_ref()).await?))
    }

    async fn list(
        &self,
        request: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        Ok(Response::new(Self::list(self, request.get_ref()).await?))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        Ok(Response::new(Self::delete(self, request.get_ref()).await?))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        Ok(Response::new(Self::watch(self, request.get_ref()).await?))
    }
}
