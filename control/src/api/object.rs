//! A stored object: its JSON (without `metadata.resourceVersion`, which is
//! the store's mod revision) and the server-set metadata Apply maintains.

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::hash::BuildHasher as _;
use std::io::Read as _;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value};
use weir_proto::v1;

use super::ApiError;
use crate::store::{KeyValue, Op};

/// The finalizer of an owner whose dependents are being deleted first
/// (Foreground propagation), as Kubernetes names it.
pub const FOREGROUND: &str = "foregroundDeletion";

/// One object as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored(Map<String, Value>);

impl Stored {
    /// Wraps a validated object.
    pub fn new(object: Map<String, Value>) -> Self {
        Self(object)
    }

    /// Decodes a stored value.
    pub fn decode(kv: &KeyValue) -> Result<Self, ApiError> {
        match serde_json::from_slice(&kv.value) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(other) => Err(ApiError::Corrupt {
                key: kv.key.clone(),
                reason: format!("not a JSON object: {other}"),
            }),
            Err(e) => Err(ApiError::Corrupt {
                key: kv.key.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// The write that stores this object at `key`.
    pub fn put(&self, key: &str) -> Result<Op, ApiError> {
        let value = serde_json::to_vec(&self.0)
            .map_err(|e| ApiError::Internal(format!("serialise {key}: {e}")))?;
        Ok(Op::Put {
            key: key.to_owned(),
            value,
        })
    }

    fn meta(&self) -> Option<&Map<String, Value>> {
        self.0.get("metadata").and_then(Value::as_object)
    }

    fn meta_mut(&mut self) -> &mut Map<String, Value> {
        let meta = self
            .0
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if !meta.is_object() {
            *meta = Value::Object(Map::new());
        }
        meta.as_object_mut()
            .expect("metadata was just made an object")
    }

    fn meta_str(&self, field: &str) -> &str {
        self.meta()
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.meta_str("name")
    }

    /// `metadata.namespace` (empty for cluster-scoped kinds).
    pub fn namespace(&self) -> &str {
        self.meta_str("namespace")
    }

    fn generation(&self) -> u64 {
        self.meta()
            .and_then(|m| m.get("generation"))
            .and_then(Value::as_u64)
            .unwrap_or_default()
    }

    /// `metadata.labels`.
    pub fn labels(&self) -> BTreeMap<String, String> {
        labels_of(self)
    }

    /// One annotation's value, if it is set (and a string).
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.meta()?.get("annotations")?.get(key)?.as_str()
    }

    /// Sets (`Some`) or removes (`None`) one annotation; an emptied
    /// `annotations` map is removed.
    pub fn set_annotation(&mut self, key: &str, value: Option<String>) {
        let meta = self.meta_mut();
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if !annotations.is_object() {
            *annotations = Value::Object(Map::new());
        }
        let Some(map) = annotations.as_object_mut() else {
            return;
        };
        match value {
            Some(v) => {
                map.insert(key.to_owned(), Value::from(v));
            }
            None => {
                map.remove(key);
            }
        }
        if map.is_empty() {
            meta.remove("annotations");
        }
    }

    /// `metadata.uid`.
    pub fn uid(&self) -> &str {
        self.meta_str("uid")
    }

    /// The whole object as JSON.
    pub fn json(&self) -> &Map<String, Value> {
        &self.0
    }

    /// `spec`, if it is a mapping.
    pub fn spec(&self) -> Option<&Map<String, Value>> {
        self.0.get("spec").and_then(Value::as_object)
    }

    /// `spec`, made a mapping if it was not one.
    pub fn spec_mut(&mut self) -> &mut Map<String, Value> {
        let spec = self
            .0
            .entry("spec")
            .or_insert_with(|| Value::Object(Map::new()));
        if !spec.is_object() {
            *spec = Value::Object(Map::new());
        }
        spec.as_object_mut().expect("spec was just made an object")
    }

    /// A string field of `spec` (empty if unset).
    pub fn spec_str(&self, field: &str) -> &str {
        self.spec()
            .and_then(|s| s.get(field))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// `metadata.deletionTimestamp`, if the object is being deleted.
    pub fn deletion_timestamp(&self) -> Option<Timestamp> {
        self.meta()
            .and_then(|m| m.get("deletionTimestamp"))
            .and_then(Value::as_str)
            .and_then(|t| t.parse().ok())
    }

    /// Marks the object as being deleted at `at`; `grace` is the pod's
    /// `deletionGracePeriodSeconds` (none for other kinds).
    pub fn set_deleting(&mut self, at: Timestamp, grace: Option<i64>) {
        let meta = self.meta_mut();
        meta.insert("deletionTimestamp".to_owned(), Value::from(at.to_string()));
        if let Some(grace) = grace {
            meta.insert("deletionGracePeriodSeconds".to_owned(), Value::from(grace));
        }
    }

    /// `metadata.finalizers`.
    pub fn finalizers(&self) -> Vec<String> {
        self.meta()
            .and_then(|m| m.get("finalizers"))
            .and_then(Value::as_array)
            .map(|f| {
                f.iter()
                    .filter_map(|v| Some(v.as_str()?.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Adds a finalizer unless it is there already.
    pub fn add_finalizer(&mut self, finalizer: &str) {
        let mut all = self.finalizers();
        if !all.iter().any(|f| f == finalizer) {
            all.push(finalizer.to_owned());
            self.meta_mut()
                .insert("finalizers".to_owned(), Value::from(all));
        }
    }

    /// `metadata.ownerReferences` as (kind, name, uid).
    pub fn owners(&self) -> Vec<(String, String, String)> {
        self.meta()
            .and_then(|m| m.get("ownerReferences"))
            .and_then(Value::as_array)
            .map(|refs| {
                refs.iter()
                    .filter_map(|r| {
                        let field = |f: &str| r.get(f).and_then(Value::as_str).map(str::to_owned);
                        Some((field("kind")?, field("name")?, field("uid")?))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes the owner references to `uid`; whether there was one.
    pub fn remove_owner(&mut self, uid: &str) -> bool {
        let meta = self.meta_mut();
        let Some(Value::Array(refs)) = meta.get_mut("ownerReferences") else {
            return false;
        };
        let before = refs.len();
        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
        let removed = refs.len() != before;
        if refs.is_empty() {
            meta.remove("ownerReferences");
        }
        removed
    }

    /// Sets the metadata a create gives: uid, creation time, generation 1.
    pub fn set_created(&mut self) {
        let now = now();
        let meta = self.meta_mut();
        meta.insert("uid".to_owned(), Value::from(new_uid()));
        meta.insert("creationTimestamp".to_owned(), Value::from(now.to_string()));
        meta.insert("generation".to_owned(), Value::from(1u64));
    }

    /// This (desired) object as an update of `stored`: server-set metadata
    /// and status carried over, generation bumped only if spec changed.
    #[must_use]
    pub fn updating(mut self, stored: &Self) -> Self {
        let spec_changed = self.0.get("spec") != stored.0.get("spec");
        let generation = stored.generation() + u64::from(spec_changed);
        if let Some(old) = stored.meta() {
            let meta = self.meta_mut();
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                if let Some(value) = old.get(field) {
                    meta.insert(field.to_owned(), value.clone());
                }
            }
        }
        self.meta_mut()
            .insert("generation".to_owned(), Value::from(generation));
        if stored.finalizers().iter().any(|f| f == FOREGROUND) {
            self.add_finalizer(FOREGROUND);
        }
        match stored.0.get("status") {
            Some(status) => self.0.insert("status".to_owned(), status.clone()),
            None => self.0.remove("status"),
        };
        self
    }

    /// Replaces `.status` (`null` removes it).
    pub fn set_status(&mut self, status: Value) {
        if status.is_null() {
            self.0.remove("status");
        } else {
            self.0.insert("status".to_owned(), status);
        }
    }

    /// The API object at `resource_version`: typed metadata plus the JSON
    /// with `metadata.resourceVersion` as a string, as Kubernetes has it.
    pub fn to_object(&self, resource_version: u64) -> v1::Object {
        let mut json = self.clone();
        json.meta_mut().insert(
            "resourceVersion".to_owned(),
            Value::from(resource_version.to_string()),
        );
        let type_str = |field: &str| {
            self.0
                .get(field)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let creation_timestamp_unix = self
            .meta_str("creationTimestamp")
            .parse::<Timestamp>()
            .map(Timestamp::as_second)
            .unwrap_or_default();
        v1::Object {
            meta: Some(v1::ObjectMeta {
                api_version: type_str("apiVersion"),
                kind: type_str("kind"),
                namespace: self.namespace().to_owned(),
                name: self.name().to_owned(),
                uid: self.meta_str("uid").to_owned(),
                resource_version,
                generation: self.generation(),
                labels: self.labels().into_iter().collect(),
                creation_timestamp_unix,
            }),
            json: Value::Object(json.0).to_string(),
        }
    }
}

/// `metadata.labels` of an object (non-string values skipped).
pub fn labels_of(object: &Stored) -> BTreeMap<String, String> {
    object
        .meta()
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The current time, to the second, as Kubernetes timestamps have it.
pub fn now() -> Timestamp {
    Timestamp::from_second(unix_now().as_secs().try_into().unwrap_or(i64::MAX))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Time since the Unix epoch (zero if the clock is before it).
fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A random (version 4 layout) UUID from /dev/urandom; if that cannot be
/// read, from std's randomly keyed hasher over the time and a counter.
fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = unix_now().as_nanos();
        let hi = RandomState::new().hash_one((n, nanos));
        let lo = RandomState::new().hash_one((nanos, n));
        b[..8].copy_from_slice(&hi.to_le_bytes());
        b[8..].copy_from_slice(&lo.to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().fold(String::with_capacity(32), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    });
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}
