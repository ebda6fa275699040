//! `describe networkpolicy` as kubectl prints it (`describeNetworkPolicy`):
//! the pod selector, each ingress and egress rule's ports and peers, and
//! the policy types.

use serde_json::Value;

use crate::describe::{header, labels_annotations};
use crate::doc::Doc;
use crate::format::{selector_text, timestamp};

/// kubectl's indent of a rule's lines below "Allowing ... traffic:".
const RULE: &str = "    ";

/// The whole `describe networkpolicy` text of `v` (no events: kubectl
/// shows none for policies).
pub fn describe_network_policy(d: &mut Doc, v: &Value) {
    header(d, v, true);
    let created = timestamp(&v["metadata"]["creationTimestamp"]).map_or_else(
        || "<unset>".to_owned(),
        |t| t.strftime("%Y-%m-%d %H:%M:%S +0000 UTC").to_string(),
    );
    d.kv(0, "Created on", &created);
    labels_annotations(d, 0, &v["metadata"]);
    let spec = &v["spec"];
    d.line(0, &["Spec:"]);
    let pods = &spec["podSelector"];
    let selected = if selector_text(pods) == "<none>" {
        "<none> (Allowing the specific traffic to all pods in this namespace)".to_owned()
    } else {
        selector_text(pods)
    };
    d.line(1, &[&format!("PodSelector:     {selected}")]);
    let types: Vec<&str> = spec["policyTypes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for (kind, peers, word) in [("ingress", "from", "From"), ("egress", "to", "To")] {
        let enabled = types.iter().any(|t| t.eq_ignore_ascii_case(kind));
        if enabled {
            d.line(1, &[&format!("Allowing {kind} traffic:")]);
            rules(d, kind, &spec[kind], peers, word);
        } else {
            d.line(1, &[&format!("Not affecting {kind} traffic")]);
        }
    }
    d.line(1, &[&format!("Policy Types: {}", types.join(", "))]);
}

/// The rules of one direction: ports, then peers, `----------` between rules.
fn rules(d: &mut Doc, kind: &str, rules: &Value, peers: &str, word: &str) {
    let rules = rules.as_array().map_or(&[][..], Vec::as_slice);
    if rules.is_empty() {
        d.line(
            0,
            &[&format!(
                "{RULE}<none> (Selected pods are isolated for {kind} connectivity)"
            )],
        );
        return;
    }
    for (i, rule) in rules.iter().enumerate() {
        let ports = rule["ports"].as_array().map_or(&[][..], Vec::as_slice);
        if ports.is_empty() {
            d.line(
                0,
                &[&format!(
                    "{RULE}To Port: <any> (traffic allowed to all ports)"
                )],
            );
        }
        for p in ports {
            d.line(0, &[&format!("{RULE}{}", port_text(p))]);
        }
        let list = rule[peers].as_array().map_or(&[][..], Vec::as_slice);
        if list.is_empty() {
            let by = if kind == "ingress" {
                "source"
            } else {
                "destination"
            };
            d.line(
                0,
                &[&format!(
                    "{RULE}{word}: <any> (traffic not restricted by {by})"
                )],
            );
        }
        for peer in list {
            d.line(0, &[&format!("{RULE}{word}:")]);
            peer_lines(d, peer);
        }
        if i + 1 != rules.len() {
            d.line(0, &[&format!("{RULE}----------")]);
        }
    }
}

/// `To Port: 80/TCP`, `To Port: http/TCP`, `To Port Range: 32000-32768/TCP`.
fn port_text(p: &Value) -> String {
    let protocol = p["protocol"].as_str().unwrap_or("TCP");
    let port = match &p["port"] {
        Value::String(name) => name.clone(),
        Value::Number(n) => n.to_string(),
        _ => "<any>".to_owned(),
    };
    match p["endPort"].as_i64() {
        Some(end) => format!("To Port Range: {port}-{end}/{protocol}"),
        None => format!("To Port: {port}/{protocol}"),
    }
}

fn peer_lines(d: &mut Doc, peer: &Value) {
    let (pods, namespaces, block) = (
        &peer["podSelector"],
        &peer["namespaceSelector"],
        &peer["ipBlock"],
    );
    if namespaces.is_object() {
        d.line(
            1,
            &[&format!(
                "{RULE}NamespaceSelector: {}",
                selector_text(namespaces)
            )],
        );
    }
    if pods.is_object() {
        d.line(1, &[&format!("{RULE}PodSelector: {}", selector_text(pods))]);
    }
    if block.is_object() {
        let except: Vec<&str> = block["except"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        d.line(1, &[&format!("{RULE}IPBlock:")]);
        d.line(
            2,
            &[&format!(
                "{RULE}CIDR: {}",
                block["cidr"].as_str().unwrap_or_default()
            )],
        );
        d.line(2, &[&format!("{RULE}Except: {}", except.join(", "))]);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn upstream() -> Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "test-network-policy", "namespace": "default",
                "creationTimestamp": "2024-05-06T07:08:09Z"},
            "spec": {"podSelector": {"matchLabels": {"role": "db"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [
                    {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                    {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
                    {"podSelector": {"matchLabels": {"role": "frontend"}}}],
                    "ports": [{"protocol": "TCP", "port": 6379}]},
                    {"from": [{"namespaceSelector": {"matchLabels": {"user": "alice"}},
                               "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["client"]}]}}]}],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
                    "ports": [{"protocol": "TCP", "port": 32000, "endPort": 32768}, {"protocol": "UDP", "port": "dns"}]}]}})
    }

    #[test]
    fn describe_follows_kubectl() {
        let mut d = Doc::default();
        describe_network_policy(&mut d, &upstream());
        let want = "\
Name:         test-network-policy
Namespace:    default
Created on:   2024-05-06 07:08:09 +0000 UTC
Labels:       <none>
Annotations:  <none>
Spec:
  PodSelector:     role=db
  Allowing ingress traffic:
    To Port: 6379/TCP
    From:
      IPBlock:
        CIDR: 172.17.0.0/16
        Except: 172.17.1.0/24
    From:
      NamespaceSelector: project=myproject
    From:
      PodSelector: role=frontend
    ----------
    To Port: <any> (traffic allowed to all ports)
    From:
      NamespaceSelector: user=alice
      PodSelector: role in (client)
  Allowing egress traffic:
    To Port Range: 32000-32768/TCP
    To Port: dns/UDP
    To:
      IPBlock:
        CIDR: 10.0.0.0/24
        Except:
  Policy Types: Ingress, Egress
";
        assert_eq!(d.render(), want);
    }

    #[test]
    fn get_columns_follow_kubectl() {
        use crate::printers::{Options, header, row};
        use crate::resource::Resource;
        let o = Options {
            wide: true,
            with_namespace: false,
            with_kind: false,
            now: "2024-05-06T07:13:09Z".parse().expect("time"),
        };
        assert_eq!(
            header(Resource::NetworkPolicy, &o),
            ["NAME", "POD-SELECTOR", "AGE"]
        );
        assert_eq!(
            row(Resource::NetworkPolicy, &upstream(), &o),
            ["test-network-policy", "role=db", "5m"]
        );
        let all = json!({"metadata": {"name": "deny"}, "spec": {"podSelector": {}}});
        assert_eq!(row(Resource::NetworkPolicy, &all, &o)[1], "<none>");
    }

    #[test]
    fn default_deny_says_what_it_does() {
        let deny = json!({"metadata": {"name": "deny", "namespace": "x"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
        let mut d = Doc::default();
        describe_network_policy(&mut d, &deny);
        let text = d.render();
        assert!(
            text.contains(
                "  PodSelector:     <none> (Allowing the specific traffic to all pods in this namespace)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  Allowing ingress traffic:\n    <none> (Selected pods are isolated for ingress connectivity)\n"
            ),
            "{text}"
        );
        assert!(text.contains("  Not affecting egress traffic\n"), "{text}");
        assert!(text.ends_with("  Policy Types: Ingress\n"), "{text}");
        let allow_all = json!({"metadata": {"name": "all"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}});
        let mut d = Doc::default();
        describe_network_policy(&mut d, &allow_all);
        let text = d.render();
        assert!(
            text.contains(
                "    To Port: <any> (traffic allowed to all ports)\n    To: <any> (traffic not restricted by destination)\n"
            ),
            "{text}"
        );
    }
}
