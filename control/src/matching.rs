//! Kubernetes' matching rules, shared by the controllers and the scheduler:
//! label selectors, node selector terms, `nodeSelector` plus required node
//! affinity, and taints against tolerations.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration,
};

/// Whether `labels` satisfy a label selector (an empty selector matches
/// everything).
pub use weir_proto::manifest::selector_matches;

/// Whether `toleration` tolerates the taint `key=value:effect`
/// (Kubernetes' `ToleratesTaint`).
pub fn tolerates(toleration: &Toleration, key: &str, value: &str, effect: &str) -> bool {
    if let Some(e) = toleration.effect.as_deref().filter(|e| !e.is_empty())
        && e != effect
    {
        return false;
    }
    if let Some(k) = toleration.key.as_deref().filter(|k| !k.is_empty())
        && k != key
    {
        return false;
    }
    match toleration.operator.as_deref() {
        Some("Exists") => true,
        None | Some("" | "Equal") => toleration.value.as_deref().unwrap_or("") == value,
        Some(_) => false,
    }
}

/// Whether `toleration` tolerates `taint`.
pub fn tolerates_taint(toleration: &Toleration, taint: &Taint) -> bool {
    tolerates(
        toleration,
        &taint.key,
        taint.value.as_deref().unwrap_or(""),
        &taint.effect,
    )
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    let listed = |v: &str| values.iter().any(|x| x == v);
    match req.operator.as_str() {
        "In" => value.is_some_and(listed),
        "NotIn" => value.is_none_or(|v| !listed(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), [bound]) = (value, values) else {
                return false;
            };
            let (Ok(v), Ok(bound)) = (v.parse::<i64>(), bound.parse::<i64>()) else {
                return false;
            };
            if req.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// Whether a node selector term matches the node `name` with `labels`:
/// every `matchExpressions` on labels and every `matchFields` (only
/// `metadata.name`) holds; a term with neither matches nothing.
pub fn node_term_matches(
    term: &NodeSelectorTerm,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(name)))
}

/// Whether the node `name` with `labels` satisfies a pod's `nodeSelector`
/// and required node affinity.
pub fn node_selected(
    node_selector: Option<&BTreeMap<String, String>>,
    affinity: Option<&Affinity>,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let by_selector = node_selector
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let required = affinity
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    by_selector
        && required.is_none_or(|r| {
            r.node_selector_terms
                .iter()
                .any(|t| node_term_matches(t, name, labels))
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NodeSelector;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["db".into()]),
            }]),
        };
        assert!(selector_matches(&sel, &labels(&[("app", "web")])));
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "fe")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "db")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("app", "api")])));
    }

    #[test]
    fn tolerations_follow_kubernetes_rules() {
        let taint = Taint {
            key: "node.kubernetes.io/unreachable".into(),
            effect: "NoExecute".into(),
            ..Default::default()
        };
        let exists_any = Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        };
        let by_key = Toleration {
            key: Some("node.kubernetes.io/unreachable".into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            ..Default::default()
        };
        let wrong_effect = Toleration {
            effect: Some("NoSchedule".into()),
            ..by_key.clone()
        };
        let equal_needs_value = Toleration {
            key: Some("node.kubernetes.io/unreachable".into()),
            value: Some("x".into()),
            ..Default::default()
        };
        let equal_value = Toleration {
            key: Some("node.kubernetes.io/unreachable".into()),
            operator: Some("Equal".into()),
            ..Default::default()
        };
        assert!(tolerates_taint(&exists_any, &taint));
        assert!(tolerates_taint(&by_key, &taint));
        assert!(!tolerates_taint(&wrong_effect, &taint));
        assert!(!tolerates_taint(&equal_needs_value, &taint));
        assert!(tolerates_taint(&equal_value, &taint));
        assert!(tolerates(&equal_needs_value, &taint.key, "x", "NoSchedule"));
    }

    fn req(key: &str, operator: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn node_terms_match_labels_fields_and_numbers() {
        let node = labels(&[("zone", "a"), ("cores", "8")]);
        let term = |exprs: Vec<NodeSelectorRequirement>, fields: Vec<NodeSelectorRequirement>| {
            NodeSelectorTerm {
                match_expressions: Some(exprs),
                match_fields: Some(fields),
            }
        };
        assert!(!node_term_matches(&term(vec![], vec![]), "n1", &node));
        assert!(node_term_matches(
            &term(vec![req("zone", "In", &["a", "b"])], vec![]),
            "n1",
            &node
        ));
        assert!(!node_term_matches(
            &term(vec![req("zone", "NotIn", &["a"])], vec![]),
            "n1",
            &node
        ));
        assert!(node_term_matches(
            &term(vec![req("gpu", "DoesNotExist", &[])], vec![]),
            "n1",
            &node
        ));
        assert!(node_term_matches(
            &term(vec![req("cores", "Gt", &["4"])], vec![]),
            "n1",
            &node
        ));
        assert!(!node_term_matches(
            &term(vec![req("cores", "Lt", &["4"])], vec![]),
            "n1",
            &node
        ));
        assert!(!node_term_matches(
            &term(vec![req("cores", "Gt", &["4", "5"])], vec![]),
            "n1",
            &node
        ));
        let by_name = term(vec![], vec![req("metadata.name", "In", &["n1"])]);
        assert!(node_term_matches(&by_name, "n1", &node));
        assert!(!node_term_matches(&by_name, "n2", &node));

        let affinity = Affinity {
            node_affinity: Some(k8s_openapi::api::core::v1::NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![by_name],
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let zone_a = labels(&[("zone", "a")]);
        assert!(node_selected(Some(&zone_a), Some(&affinity), "n1", &node));
        assert!(!node_selected(Some(&zone_a), Some(&affinity), "n2", &node));
        assert!(!node_selected(
            Some(&labels(&[("zone", "b")])),
            None,
            "n1",
            &node
        ));
        assert!(node_selected(None, None, "n2", &node));
    }
}
