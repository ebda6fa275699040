//! Value checks shared by every kind: object metadata, label selectors,
//! and the checker that names the file and field in its errors.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use super::{ManifestError, key_path, names};

const DEFAULT_NAMESPACE: &str = "default";
/// Kubernetes' `TotalAnnotationSizeLimitB`.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;
const SELECTOR_OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// Where an object lives, and so how its metadata is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// In a namespace (default `default`); name a DNS-1123 subdomain.
    Namespaced,
    /// Cluster-scoped; name a DNS-1123 subdomain (Node).
    Cluster,
}

/// Names the file in errors and collects warnings.
pub(super) struct Checker<'a> {
    pub file: &'a str,
    pub warnings: &'a mut Vec<String>,
}

impl Checker<'_> {
    pub fn err(&self, field: &str, reason: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            file: self.file.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// Checks (and defaults the namespace of) a whole object's metadata.
    pub fn object_meta(&self, meta: &mut ObjectMeta, scope: Scope) -> Result<(), ManifestError> {
        let name = meta.name.as_deref().unwrap_or_default();
        names::dns1123_subdomain(name).map_err(|r| self.err("metadata.name", r))?;
        match (scope, meta.namespace.as_deref()) {
            (Scope::Namespaced, None | Some("")) => {
                meta.namespace = Some(DEFAULT_NAMESPACE.to_owned());
            }
            (Scope::Namespaced, Some(ns)) => {
                names::dns1123_label(ns).map_err(|r| self.err("metadata.namespace", r))?;
            }
            (Scope::Cluster, None | Some("")) => meta.namespace = None,
            (Scope::Cluster, Some(ns)) => {
                return Err(self.err(
                    "metadata.namespace",
                    format!("{ns:?}: not allowed: this kind is cluster-scoped"),
                ));
            }
        }
        self.labels("metadata", meta)?;
        self.owner_references(meta)
    }

    /// Checks labels and annotations below `path` (`metadata`,
    /// `spec.template.metadata`).
    pub fn labels(&self, path: &str, meta: &ObjectMeta) -> Result<(), ManifestError> {
        self.label_map(&format!("{path}.labels"), meta.labels.as_ref())?;
        let mut total = 0;
        for (key, value) in meta.annotations.iter().flatten() {
            let field = key_path(&format!("{path}.annotations"), key);
            names::qualified_name(key)
                .map_err(|r| self.err(&field, format!("invalid key: {r}")))?;
            total += key.len() + value.len();
        }
        if total > ANNOTATIONS_MAX_BYTES {
            return Err(self.err(
                &format!("{path}.annotations"),
                format!(
                    "{total} bytes in total, more than the {ANNOTATIONS_MAX_BYTES} Kubernetes allows"
                ),
            ));
        }
        Ok(())
    }

    /// Checks a map of label keys to label values (labels, nodeSelector, matchLabels).
    pub fn label_map(
        &self,
        path: &str,
        map: Option<&BTreeMap<String, String>>,
    ) -> Result<(), ManifestError> {
        for (key, value) in map.into_iter().flatten() {
            let field = key_path(path, key);
            names::qualified_name(key)
                .map_err(|r| self.err(&field, format!("invalid key: {r}")))?;
            names::label_value(value).map_err(|r| self.err(&field, r))?;
        }
        Ok(())
    }

    fn owner_references(&self, meta: &ObjectMeta) -> Result<(), ManifestError> {
        let mut controller = None;
        for (i, r) in meta.owner_references.iter().flatten().enumerate() {
            let path = format!("metadata.ownerReferences[{i}]");
            for (field, value) in [
                ("apiVersion", &r.api_version),
                ("kind", &r.kind),
                ("name", &r.name),
                ("uid", &r.uid),
            ] {
                if value.is_empty() {
                    return Err(self.err(&format!("{path}.{field}"), "required"));
                }
            }
            if r.controller == Some(true) {
                if let Some(first) = controller {
                    return Err(self.err(
                        &format!("{path}.controller"),
                        format!(
                            "only one reference can have controller set to true; ownerReferences[{first}] has it too"
                        ),
                    ));
                }
                controller = Some(i);
            }
        }
        Ok(())
    }

    /// Checks a label selector's syntax; `empty_ok` says whether a selector
    /// with no terms (matching everything) is allowed.
    pub fn label_selector(
        &self,
        path: &str,
        selector: &LabelSelector,
        empty_ok: bool,
    ) -> Result<(), ManifestError> {
        self.label_map(
            &format!("{path}.matchLabels"),
            selector.match_labels.as_ref(),
        )?;
        let expressions = selector.match_expressions.as_deref().unwrap_or_default();
        for (i, e) in expressions.iter().enumerate() {
            let p = format!("{path}.matchExpressions[{i}]");
            names::qualified_name(&e.key).map_err(|r| self.err(&format!("{p}.key"), r))?;
            one_of(&e.operator, &SELECTOR_OPERATORS)
                .map_err(|r| self.err(&format!("{p}.operator"), r))?;
            let values = e.values.as_deref().unwrap_or_default();
            match (e.operator.as_str(), values.is_empty()) {
                ("In" | "NotIn", true) => {
                    return Err(self.err(
                        &format!("{p}.values"),
                        format!("must be specified when operator is {}", e.operator),
                    ));
                }
                ("Exists" | "DoesNotExist", false) => {
                    return Err(self.err(
                        &format!("{p}.values"),
                        format!("may not be specified when operator is {}", e.operator),
                    ));
                }
                _ => {}
            }
            for (j, v) in values.iter().enumerate() {
                names::label_value(v).map_err(|r| self.err(&format!("{p}.values[{j}]"), r))?;
            }
        }
        let empty = selector
            .match_labels
            .as_ref()
            .is_none_or(BTreeMap::is_empty)
            && expressions.is_empty();
        if empty && !empty_ok {
            return Err(self.err(
                path,
                "empty selector is invalid: it would select every pod in the namespace",
            ));
        }
        Ok(())
    }
}

/// Whether `selector` (already checked) selects an object with `labels`.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let equal = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    equal
        && selector.match_expressions.iter().flatten().all(|e| {
            let value = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// `Ok` if `value` is one of `allowed`, else Kubernetes' "unsupported value".
pub(super) fn one_of(value: &str, allowed: &[&str]) -> Result<(), String> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        let list = allowed
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        Err(format!(
            "unsupported value {value:?}: must be one of {list}"
        ))
    }
}
