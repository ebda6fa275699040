//! Namespaces as Kubernetes keeps them: `default` and `kube-system` always
//! exist (created at start and again on demand, and never deleted), a
//! namespaced object can only be written into an existing namespace, and
//! nothing new is created in a namespace that is being deleted.

use serde_json::{Map, Value};

use super::object::Stored;
use super::{ApiError, Kind, ObjectsApi};
use crate::store::{Compare, Store};

/// The namespaces that always exist.
pub const SYSTEM_NAMESPACES: [&str; 2] = ["default", "kube-system"];

impl<S: Store> ObjectsApi<S> {
    /// Creates the `default` and `kube-system` namespaces if they are
    /// missing (idempotent); weir-control calls it once the store is open.
    pub async fn ensure_default_namespaces(&self) -> Result<(), ApiError> {
        for name in SYSTEM_NAMESPACES {
            self.create_namespace(name).await?;
        }
        Ok(())
    }

    async fn create_namespace(&self, name: &str) -> Result<(), ApiError> {
        let key = Kind::Namespace.key("", name)?;
        let mut meta = Map::new();
        meta.insert("name".to_owned(), Value::from(name));
        super::kinds::set_name_label(&mut meta, Value::from(name));
        let mut object = Map::new();
        object.insert("apiVersion".to_owned(), Value::from("v1"));
        object.insert("kind".to_owned(), Value::from("Namespace"));
        object.insert("metadata".to_owned(), Value::Object(meta));
        let mut namespace = Stored::new(object);
        namespace.set_created();
        namespace.set_status(serde_json::json!({ "phase": "Active" }));
        // Losing the race to another creator is fine: it exists either way.
        self.store
            .txn(
                vec![(key.clone(), Compare::Absent)],
                vec![namespace.put(&key)?],
            )
            .await?;
        Ok(())
    }

    /// For a write of a `kind` object into `namespace`: the compare that
    /// makes the write fail if the namespace changes meanwhile (none for
    /// cluster-scoped kinds). The namespace must exist, and must not be
    /// terminating if the write creates an object.
    pub(super) async fn namespace_guard(
        &self,
        kind: Kind,
        namespace: &str,
        creating: bool,
    ) -> Result<Option<(String, Compare)>, ApiError> {
        if !kind.namespaced() {
            return Ok(None);
        }
        let key = Kind::Namespace.key("", namespace)?;
        let mut kv = self.store.get(&key).await?;
        if kv.is_none() && SYSTEM_NAMESPACES.contains(&namespace) {
            self.create_namespace(namespace).await?;
            kv = self.store.get(&key).await?;
        }
        let kv = kv.ok_or_else(|| ApiError::NotFound {
            plural: Kind::Namespace.plural(),
            name: namespace.to_owned(),
        })?;
        if creating && Stored::decode(&kv)?.deletion_timestamp().is_some() {
            return Err(ApiError::Forbidden(format!(
                "unable to create new content in namespace {namespace} because it is being terminated"
            )));
        }
        Ok(Some((key, Compare::ModRevision(kv.mod_revision))))
    }
}
