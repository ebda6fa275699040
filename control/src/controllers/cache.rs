//! An informer: a typed in-memory cache of one kind, filled by List and kept
//! current by Watch through [`ObjectsApi`] (re-listing when the watch's
//! history was compacted), with secondary indexes (pods by owner uid and by
//! node) and a broadcast of changes that controllers map to work-queue keys.
//!
//! Controllers also write their own successful writes through the cache
//! ([`Cache::observe`], [`Cache::observe_deleted`]) so that the next
//! reconcile sees them before the watch delivers them (what client-go's
//! "expectations" are for); entries only move forward in resource version,
//! so a late watch event never undoes one, and a write-through the watch
//! has already passed is dropped, so a late one never resurrects an object
//! the watch saw deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};
use weir_proto::v1;

use super::meta;
use crate::api::{Kind, ObjectsApi};
use crate::store::Store;

/// Index name: pods (or any object) by the uid of their controller owner.
pub const BY_OWNER: &str = "owner";
/// Index name: pods by `spec.nodeName`.
pub const BY_NODE: &str = "node";

/// How many changes a slow subscriber may fall behind before it is told to
/// resync everything.
const CHANGES_CAPACITY: usize = 8192;
/// Delay before re-listing after a failed List or Watch.
const RELIST_DELAY: Duration = Duration::from_millis(500);

/// The k8s-openapi types a cache holds.
pub trait Object:
    k8s_openapi::Metadata<Ty = ObjectMeta> + DeserializeOwned + Send + Sync + 'static
{
}
impl<T> Object for T where
    T: k8s_openapi::Metadata<Ty = ObjectMeta> + DeserializeOwned + Send + Sync + 'static
{
}

/// Computes the index values of an object.
pub type IndexFn<K> = fn(&K) -> Vec<String>;

/// One change seen by the cache.
#[derive(Debug)]
pub enum Change<K> {
    /// An object was added or modified (`old` is its previous state, if cached).
    Upsert {
        /// The previous state, if the cache had one.
        old: Option<Arc<K>>,
        /// The new state.
        new: Arc<K>,
    },
    /// An object was deleted; its last state.
    Delete(Arc<K>),
    /// The cache was re-listed (or the subscriber lagged): re-check everything.
    Resync,
}

impl<K> Clone for Change<K> {
    fn clone(&self) -> Self {
        match self {
            Self::Upsert { old, new } => Self::Upsert {
                old: old.clone(),
                new: Arc::clone(new),
            },
            Self::Delete(k) => Self::Delete(Arc::clone(k)),
            Self::Resync => Self::Resync,
        }
    }
}

struct Entry<K> {
    revision: u64,
    object: Arc<K>,
}

struct Inner<K> {
    objects: BTreeMap<String, Entry<K>>,
    /// Keys deleted at a revision, so older events can't resurrect them.
    tombstones: HashMap<String, u64>,
    /// The revision the List and Watch have brought the cache to: every
    /// change of the kind up to it is in `objects`.
    watched: u64,
    /// index name → value → keys.
    indexes: HashMap<&'static str, HashMap<String, BTreeSet<String>>>,
}

/// The cache of one kind.
pub struct Cache<K> {
    kind: Kind,
    inner: RwLock<Inner<K>>,
    indexers: Vec<(&'static str, IndexFn<K>)>,
    changes: broadcast::Sender<Change<K>>,
    synced: watch::Sender<bool>,
}

/// The cache key of an object: `<namespace>/<name>`, or `<name>` if
/// cluster-scoped.
pub fn key_of(meta: &ObjectMeta) -> String {
    let name = meta.name.as_deref().unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_owned(),
    }
}

impl<K: Object> Cache<K> {
    /// An empty, unsynced cache of `kind` with the given indexes.
    pub fn new(kind: Kind, indexers: Vec<(&'static str, IndexFn<K>)>) -> Arc<Self> {
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        Arc::new(Self {
            kind,
            inner: RwLock::new(Inner {
                objects: BTreeMap::new(),
                tombstones: HashMap::new(),
                watched: 0,
                indexes: HashMap::new(),
            }),
            indexers,
            changes,
            synced: watch::channel(false).0,
        })
    }

    /// The kind cached.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner<K>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner<K>> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// One object by key.
    pub fn get(&self, key: &str) -> Option<Arc<K>> {
        self.read().objects.get(key).map(|e| Arc::clone(&e.object))
    }

    /// Every object.
    pub fn list(&self) -> Vec<Arc<K>> {
        self.read()
            .objects
            .values()
            .map(|e| Arc::clone(&e.object))
            .collect()
    }

    /// Every object in `namespace`.
    pub fn list_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        let prefix = format!("{namespace}/");
        self.read()
            .objects
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, e)| Arc::clone(&e.object))
            .collect()
    }

    /// The objects whose index `index` has `value`.
    pub fn by_index(&self, index: &str, value: &str) -> Vec<Arc<K>> {
        let inner = self.read();
        let Some(keys) = inner.indexes.get(index).and_then(|i| i.get(value)) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|k| inner.objects.get(k).map(|e| Arc::clone(&e.object)))
            .collect()
    }

    /// Subscribes to changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change<K>> {
        self.changes.subscribe()
    }

    /// Whether the first List has been loaded.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first List has been loaded.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // An error means the sender is gone, which cannot happen while
        // `self` lives; don't wait forever on it either way.
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Records an object the API returned for our own write, unless the
    /// cache already has it at this or a later revision, or the watch has
    /// passed that revision (then the cache holds what followed it).
    pub fn observe(&self, object: &v1::Object) {
        match decode::<K>(object) {
            Ok((revision, typed)) => self.upsert(revision, typed, false),
            Err(e) => tracing::warn!(kind = self.kind.name(), error = %e, "cache: skip object"),
        }
    }

    /// Records that our own delete removed the object at `key`, last
    /// written at `revision` (same rules as [`Cache::observe`]).
    pub fn observe_deleted(&self, key: &str, revision: u64) {
        self.remove(key, revision, false);
    }

    /// Records a watch event (an object, or a deletion if `deleted`) and
    /// that the watch has reached `revision`.
    fn watched(&self, object: &v1::Object, deleted: bool, revision: u64) {
        if deleted {
            let key = object
                .meta
                .as_ref()
                .map(meta::proto_key)
                .unwrap_or_default();
            self.remove(&key, revision, true);
        } else {
            match decode::<K>(object) {
                Ok((revision, typed)) => self.upsert(revision, typed, true),
                Err(e) => tracing::warn!(kind = self.kind.name(), error = %e, "cache: skip object"),
            }
        }
        let mut inner = self.write();
        inner.watched = inner.watched.max(revision);
        // Every later event is newer than these tombstones.
        if !inner.tombstones.is_empty() {
            inner.tombstones.retain(|_, &mut t| t > revision);
        }
    }

    fn remove(&self, key: &str, revision: u64, from_watch: bool) {
        let removed = {
            let mut inner = self.write();
            if (!from_watch && revision <= inner.watched)
                || inner
                    .objects
                    .get(key)
                    .is_some_and(|e| e.revision > revision)
            {
                return;
            }
            inner.tombstones.insert(key.to_owned(), revision);
            let removed = inner.objects.remove(key);
            if let Some(e) = &removed {
                self.unindex(&mut inner, key, &e.object);
            }
            removed
        };
        if let Some(e) = removed {
            let _ = self.changes.send(Change::Delete(e.object));
        }
    }

    fn upsert(&self, revision: u64, object: K, from_watch: bool) {
        let key = key_of(object.metadata());
        let object = Arc::new(object);
        let old = {
            let mut inner = self.write();
            if (!from_watch && revision <= inner.watched)
                || inner.tombstones.get(&key).is_some_and(|&t| t >= revision)
            {
                return;
            }
            inner.tombstones.remove(&key);
            if inner
                .objects
                .get(&key)
                .is_some_and(|e| e.revision >= revision)
            {
                return;
            }
            let old = inner.objects.insert(
                key.clone(),
                Entry {
                    revision,
                    object: Arc::clone(&object),
                },
            );
            if let Some(e) = &old {
                self.unindex(&mut inner, &key, &e.object);
            }
            self.index(&mut inner, &key, &object);
            old.map(|e| e.object)
        };
        let _ = self.changes.send(Change::Upsert { old, new: object });
    }

    fn index(&self, inner: &mut Inner<K>, key: &str, object: &K) {
        for (name, f) in &self.indexers {
            let index = inner.indexes.entry(name).or_default();
            for value in f(object) {
                index.entry(value).or_default().insert(key.to_owned());
            }
        }
    }

    fn unindex(&self, inner: &mut Inner<K>, key: &str, object: &K) {
        for (name, f) in &self.indexers {
            let Some(index) = inner.indexes.get_mut(name) else {
                continue;
            };
            for value in f(object) {
                if let Some(keys) = index.get_mut(&value) {
                    keys.remove(key);
                    if keys.is_empty() {
                        index.remove(&value);
                    }
                }
            }
        }
    }

    /// Replaces the whole content with a List's result (read at `revision`).
    fn replace(&self, items: &[v1::Object], revision: u64) {
        {
            let mut inner = self.write();
            inner.watched = revision;
            inner.objects.clear();
            inner.tombstones.clear();
            inner.indexes.clear();
            for item in items {
                match decode::<K>(item) {
                    Ok((revision, typed)) => {
                        let key = key_of(typed.metadata());
                        let object = Arc::new(typed);
                        self.index(&mut inner, &key, &object);
                        inner.objects.insert(key, Entry { revision, object });
                    }
                    Err(e) => {
                        tracing::warn!(kind = self.kind.name(), error = %e, "cache: skip object");
                    }
                }
            }
        }
        self.synced.send_replace(true);
        let _ = self.changes.send(Change::Resync);
    }

    /// Lists and watches the kind until `shutdown` turns true, re-listing
    /// whenever the watch ends (compaction, store error).
    pub async fn run<S: Store>(
        self: Arc<Self>,
        api: Arc<ObjectsApi<S>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                () = self.list_and_watch(&api) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            tokio::select! {
                () = tokio::time::sleep(RELIST_DELAY) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// One List followed by a Watch from its revision; returns when the
    /// watch ends or fails.
    async fn list_and_watch<S: Store>(&self, api: &ObjectsApi<S>) {
        let kind = self.kind.name();
        let list = api
            .list(&v1::ListRequest {
                kind: kind.to_owned(),
                namespace: String::new(),
                label_selector: String::new(),
            })
            .await;
        let list = match list {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(kind, error = %e, "informer: list");
                return;
            }
        };
        self.replace(&list.items, list.revision);
        let stream = api
            .watch(&v1::WatchRequest {
                kind: kind.to_owned(),
                namespace: String::new(),
                label_selector: String::new(),
                from_revision: list.revision,
            })
            .await;
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(kind, error = %e, "informer: watch");
                return;
            }
        };
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(kind, error = %e, "informer: watch stream");
                    return;
                }
            };
            match v1::EventType::try_from(event.r#type) {
                Ok(v1::EventType::Added | v1::EventType::Modified) => {
                    if let Some(object) = &event.object {
                        self.watched(object, false, event.revision);
                    }
                }
                Ok(v1::EventType::Deleted) => {
                    if let Some(object) = &event.object {
                        self.watched(object, true, event.revision);
                    }
                }
                Ok(v1::EventType::Error) => {
                    tracing::info!(kind, error = %event.error, "informer: watch ended, re-listing");
                    return;
                }
                _ => {}
            }
        }
    }
}

/// Decodes an API object into its revision and typed form.
fn decode<K: DeserializeOwned>(object: &v1::Object) -> Result<(u64, K), String> {
    let revision = object
        .meta
        .as_ref()
        .map(|m| m.resource_version)
        .unwrap_or_default();
    let typed = serde_json::from_str(&object.json).map_err(|e| {
        let name = object.meta.as_ref().map_or("?", |m| m.name.as_str());
        format!("decode {name}: {e}")
    })?;
    Ok((revision, typed))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    use super::*;

    fn pod_object(name: &str, rv: u64, node: &str, owner: &str) -> v1::Object {
        let json = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string(),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                    "uid": owner, "controller": true}]},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        });
        v1::Object {
            meta: Some(v1::ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                resource_version: rv,
                ..Default::default()
            }),
            json: json.to_string(),
        }
    }

    fn pods() -> Arc<Cache<Pod>> {
        Cache::new(
            Kind::Pod,
            vec![(BY_OWNER, meta::owner_index), (BY_NODE, meta::node_index)],
        )
    }

    #[test]
    fn indexes_follow_updates_and_deletes() {
        let cache = pods();
        cache.observe(&pod_object("a", 5, "n1", "u1"));
        cache.observe(&pod_object("b", 6, "n1", "u2"));
        assert_eq!(cache.by_index(BY_NODE, "n1").len(), 2);
        assert_eq!(cache.by_index(BY_OWNER, "u1").len(), 1);
        cache.observe(&pod_object("a", 7, "n2", "u1"));
        assert_eq!(cache.by_index(BY_NODE, "n1").len(), 1);
        assert_eq!(cache.by_index(BY_NODE, "n2").len(), 1);
        cache.observe_deleted("default/b", 8);
        assert!(cache.by_index(BY_NODE, "n1").is_empty());
        assert!(cache.by_index(BY_OWNER, "u2").is_empty());
        assert_eq!(cache.list_namespace("default").len(), 1);
    }

    #[test]
    fn stale_events_never_move_an_entry_back() {
        let cache = pods();
        cache.observe(&pod_object("a", 9, "n2", "u1"));
        cache.observe(&pod_object("a", 7, "n1", "u1"));
        let a = cache.get("default/a").unwrap();
        assert_eq!(a.spec.as_ref().unwrap().node_name.as_deref(), Some("n2"));
        cache.observe_deleted("default/a", 10);
        cache.observe(&pod_object("a", 9, "n2", "u1"));
        assert!(
            cache.get("default/a").is_none(),
            "resurrected by a stale event"
        );
        cache.observe(&pod_object("a", 11, "n3", "u1"));
        assert!(
            cache.get("default/a").is_some(),
            "a newer create must be seen"
        );
    }

    #[test]
    fn a_late_write_through_never_resurrects_what_the_watch_deleted() {
        let cache = pods();
        cache.watched(&pod_object("a", 5, "n1", "u1"), false, 5);
        // The watch sees a delete at 7 and moves on to 9 (pruning tombstones).
        cache.watched(&pod_object("a", 7, "n1", "u1"), true, 7);
        cache.watched(&pod_object("b", 9, "n1", "u1"), false, 9);
        // Our own write's response (revision 6) arrives only now.
        cache.observe(&pod_object("a", 6, "n1", "u1"));
        assert!(cache.get("default/a").is_none(), "resurrected");
        cache.observe_deleted("default/b", 8);
        assert!(
            cache.get("default/b").is_some(),
            "deleted by a stale delete"
        );
        // A write-through ahead of the watch is seen at once.
        cache.observe(&pod_object("c", 10, "n1", "u1"));
        assert!(cache.get("default/c").is_some());
    }
}
