//! Binding a pod to a node, as the scheduler does (Kubernetes' `pods/binding`
//! subresource): one compare-and-swap write of `spec.nodeName`, plus the
//! `PodScheduled=True` condition the API server sets on a binding.

use serde_json::{Map, Value, json};
use weir_proto::v1;

use super::object::Stored;
use super::{ApiError, Kind, ObjectsApi, Target, WRITE_ATTEMPTS};
use crate::store::{Compare, Op, Store};

impl<S: Store> ObjectsApi<S> {
    /// Binds pod `namespace/name` to `node`: writes `spec.nodeName` and the
    /// `PodScheduled=True` condition, compare-and-swap on the revision read.
    ///
    /// Refused if the pod is gone ([`ApiError::NotFound`]), is another pod
    /// under the same name (`uid` differs: [`ApiError::Conflict`]), is
    /// being deleted or is already bound ([`ApiError::Invalid`], Kubernetes'
    /// wording). An empty `uid` skips the uid check.
    pub async fn bind(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
    ) -> Result<v1::Object, ApiError> {
        if node.is_empty() {
            return Err(ApiError::Invalid(
                "target.name: node name required".to_owned(),
            ));
        }
        let target = Target {
            kind: Kind::Pod,
            key: Kind::Pod.key(namespace, name)?,
            name: name.to_owned(),
        };
        let namespace = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        for _ in 0..WRITE_ATTEMPTS {
            let kv = self.stored(&target).await?;
            let mut doc = match serde_json::from_slice::<Value>(&kv.value) {
                Ok(Value::Object(map)) => map,
                Ok(_) => {
                    return Err(ApiError::Corrupt {
                        key: target.key.clone(),
                        reason: "not a JSON object".to_owned(),
                    });
                }
                Err(e) => {
                    return Err(ApiError::Corrupt {
                        key: target.key.clone(),
                        reason: e.to_string(),
                    });
                }
            };
            check_bindable(&doc, &target, namespace, uid)?;
            set_node(&mut doc, node);
            let value = serde_json::to_vec(&doc)
                .map_err(|e| ApiError::Internal(format!("serialise {}: {e}", target.key)))?;
            let result = self
                .store
                .txn(
                    vec![(target.key.clone(), Compare::ModRevision(kv.mod_revision))],
                    vec![Op::Put {
                        key: target.key.clone(),
                        value,
                    }],
                )
                .await?;
            if result.succeeded {
                return Ok(Stored::new(doc).to_object(result.revision));
            }
        }
        Err(target.conflict())
    }
}

fn str_at<'a>(doc: &'a Map<String, Value>, section: &str, field: &str) -> &'a str {
    doc.get(section)
        .and_then(|s| s.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Refuses a bind of another pod, a terminating pod or a bound pod.
fn check_bindable(
    doc: &Map<String, Value>,
    target: &Target,
    namespace: &str,
    uid: &str,
) -> Result<(), ApiError> {
    if !uid.is_empty() && str_at(doc, "metadata", "uid") != uid {
        return Err(target.conflict());
    }
    let meta = doc.get("metadata");
    if meta
        .and_then(|m| m.get("deletionTimestamp"))
        .is_some_and(|t| !t.is_null())
    {
        return Err(ApiError::Invalid(format!(
            "pod {namespace}/{} is being deleted, cannot be assigned to a host",
            target.name
        )));
    }
    let bound = str_at(doc, "spec", "nodeName");
    if !bound.is_empty() {
        return Err(ApiError::Invalid(format!(
            "pod {namespace}/{} is already assigned to node {bound:?}",
            target.name
        )));
    }
    Ok(())
}

/// Sets `spec.nodeName` and the `PodScheduled=True` condition.
fn set_node(doc: &mut Map<String, Value>, node: &str) {
    let spec = doc.entry("spec").or_insert_with(|| json!({}));
    if let Some(spec) = spec.as_object_mut() {
        spec.insert("nodeName".to_owned(), Value::from(node));
    }
    let now = super::now().to_string();
    let status = doc.entry("status").or_insert_with(|| json!({}));
    if !status.is_object() {
        *status = json!({});
    }
    let Some(status) = status.as_object_mut() else {
        return;
    };
    let conditions = status.entry("conditions").or_insert_with(|| json!([]));
    if !conditions.is_array() {
        *conditions = json!([]);
    }
    if let Some(list) = conditions.as_array_mut() {
        list.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
        list.push(json!({
            "type": "PodScheduled",
            "status": "True",
            "lastProbeTime": null,
            "lastTransitionTime": now,
        }));
    }
}
