//! `NetworkPolicy` validation: the Kubernetes documentation's examples
//! apply unchanged, defaults are the apiserver's, and every refusal names
//! its field and says why.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::{ManifestError, Valid, parse_documents, validate_network_policy};

/// The `NetworkPolicy` examples of kubernetes.io's "Network Policies" page
/// (concepts/services-networking/network-policies), verbatim.
const UPSTREAM: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 5978
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-ingress
spec:
  podSelector: {}
  policyTypes:
  - Ingress
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-ingress
spec:
  podSelector: {}
  ingress:
  - {}
  policyTypes:
  - Ingress
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-egress
spec:
  podSelector: {}
  policyTypes:
  - Egress
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-egress
spec:
  podSelector: {}
  egress:
  - {}
  policyTypes:
  - Egress
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-all
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  - Egress
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: multi-port-egress
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
    - Egress
  egress:
    - to:
        - ipBlock:
            cidr: 10.0.0.0/24
      ports:
        - protocol: TCP
          port: 32000
          endPort: 32768
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: egress-namespaces
spec:
  podSelector:
    matchLabels:
      app: myapp
  policyTypes:
  - Egress
  egress:
  - to:
    - namespaceSelector:
        matchExpressions:
        - key: namespace
          operator: In
          values: [frontend, backend]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: and-selectors
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          user: alice
      podSelector:
        matchLabels:
          role: client
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-dns
  namespace: default
spec:
  podSelector: {}
  policyTypes:
  - Egress
  egress:
  - to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
      podSelector:
        matchLabels:
          k8s-app: kube-dns
    ports:
    - protocol: UDP
      port: 53
    - port: dns-tcp
";

fn valid(doc: &Value) -> Valid<NetworkPolicy> {
    validate_network_policy("np.yaml", doc).unwrap_or_else(|e| panic!("{doc}: {e}"))
}

fn policy(spec: &Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "p"}, "spec": spec})
}

fn refused(spec: &Value) -> (String, String) {
    match validate_network_policy("np.yaml", &policy(spec)) {
        Err(ManifestError::Invalid { field, reason, .. }) => (field, reason),
        other => panic!("{spec}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn upstream_examples_apply_unchanged() {
    let docs = parse_documents("upstream.yaml", UPSTREAM).expect("YAML");
    assert_eq!(docs.len(), 10);
    for doc in &docs {
        let v = valid(doc);
        assert!(v.warnings.is_empty(), "{doc}: {:?}", v.warnings);
        assert_eq!(v.object.metadata.namespace.as_deref(), Some("default"));
    }
    let first = valid(&docs[0]).object.spec.expect("spec");
    let from = first.ingress.as_ref().expect("ingress")[0]
        .from
        .as_ref()
        .expect("from");
    assert_eq!(from.len(), 3);
    assert_eq!(
        from[0].ip_block.as_ref().expect("ipBlock").except,
        Some(vec!["172.17.1.0/24".to_owned()])
    );
}

#[test]
fn defaults_are_the_apiservers() {
    let types = |spec: Value| {
        valid(&policy(&spec))
            .object
            .spec
            .expect("spec")
            .policy_types
            .expect("policyTypes")
    };
    assert_eq!(types(json!({"podSelector": {}})), ["Ingress"]);
    assert_eq!(types(json!({})), ["Ingress"]);
    assert_eq!(
        types(json!({"egress": [{"to": [{"podSelector": {}}]}]})),
        ["Ingress", "Egress"]
    );
    assert_eq!(types(json!({"egress": []})), ["Ingress"]);
    assert_eq!(types(json!({"policyTypes": ["Egress"]})), ["Egress"]);
    let spec = valid(&policy(
        &json!({"ingress": [{"ports": [{"port": 80}, {"protocol": "UDP"}]}]}),
    ))
    .object
    .spec
    .expect("spec");
    let ports = spec.ingress.expect("ingress")[0]
        .ports
        .clone()
        .expect("ports");
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
}

#[test]
fn odd_but_valid_cidrs_are_warned_about() {
    let v = valid(&policy(&json!({"ingress": [{"from": [
        {"ipBlock": {"cidr": "10.1.2.3/16"}},
        {"ipBlock": {"cidr": "::/0"}},
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.1.1/24"]}}]}]})));
    assert_eq!(v.warnings.len(), 3, "{:?}", v.warnings);
    assert!(
        v.warnings[0].contains("spec.ingress[0].from[0].ipBlock.cidr")
            && v.warnings[0].contains("\"10.1.0.0/16\""),
        "{}",
        v.warnings[0]
    );
    assert!(v.warnings[1].contains("IPv6"), "{}", v.warnings[1]);
    assert!(
        v.warnings[2].contains("ipBlock.except[1]") && v.warnings[2].contains("192.168.1.0/24"),
        "{}",
        v.warnings[2]
    );
}

#[test]
#[allow(clippy::too_many_lines)] // one table of cases
fn every_refusal_names_its_field_and_reason() {
    let block = |b: Value| json!({"ingress": [{"from": [{"ipBlock": b}]}]});
    let port = |p: Value| json!({"egress": [{"ports": [p]}]});
    let cases = [
        // CIDRs and their excepts.
        (
            block(json!({"cidr": "10.0.0/8"})),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "not a valid CIDR",
        ),
        (
            block(json!({"cidr": "10.0.0.0"})),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "prefix length",
        ),
        (
            block(json!({"cidr": "10.0.0.0/33"})),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "0-32",
        ),
        (
            block(json!({"cidr": "010.0.0.0/8"})),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "not an IP address",
        ),
        (
            block(json!({"cidr": ""})),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "required",
        ),
        (
            block(json!({})),
            "spec.ingress[0].from[0].ipBlock.cidr",
            "required",
        ),
        (
            block(json!({"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]})),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "not inside it",
        ),
        (
            block(json!({"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]})),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "the whole cidr",
        ),
        (
            block(json!({"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24", "10.0.0.0/8"]})),
            "spec.ingress[0].from[0].ipBlock.except[1]",
            "wider than the cidr",
        ),
        (
            block(json!({"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24x"]})),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "not a valid CIDR",
        ),
        (
            block(json!({"cidr": "10.0.0.0/16", "except": ["fd00::/64"]})),
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "other IP family",
        ),
        // Peers.
        (
            json!({"ingress": [{"from": [{}]}]}),
            "spec.ingress[0].from[0]",
            "must specify a peer",
        ),
        (
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
            "spec.egress[0].to[0]",
            "both ipBlock and another peer",
        ),
        // Ports.
        (
            port(json!({"protocol": "SCTP", "port": 80})),
            "spec.egress[0].ports[0].protocol",
            "not supported by weir",
        ),
        (
            port(json!({"protocol": "ICMP"})),
            "spec.egress[0].ports[0].protocol",
            "unsupported value \"ICMP\"",
        ),
        (
            port(json!({"protocol": "tcp"})),
            "spec.egress[0].ports[0].protocol",
            "unsupported value",
        ),
        (
            port(json!({"port": 0})),
            "spec.egress[0].ports[0].port",
            "between 1 and 65535",
        ),
        (
            port(json!({"port": 65536})),
            "spec.egress[0].ports[0].port",
            "between 1 and 65535",
        ),
        (
            port(json!({"port": "Not_A_Name"})),
            "spec.egress[0].ports[0].port",
            "port name",
        ),
        (
            port(json!({"port": 8080, "endPort": 80})),
            "spec.egress[0].ports[0].endPort",
            "greater than or equal to `port` (8080)",
        ),
        (
            port(json!({"port": 80, "endPort": 70000})),
            "spec.egress[0].ports[0].endPort",
            "between 1 and 65535",
        ),
        (
            port(json!({"port": "http", "endPort": 90})),
            "spec.egress[0].ports[0].endPort",
            "named port",
        ),
        (
            port(json!({"endPort": 90})),
            "spec.egress[0].ports[0].endPort",
            "`port` is not specified",
        ),
        // Selectors.
        (
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["a"]}]}}),
            "spec.podSelector.matchExpressions[0].operator",
            "unsupported value",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}),
            "spec.podSelector.matchExpressions[0].values",
            "must be specified",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["a"]}]}}),
            "spec.podSelector.matchExpressions[0].values",
            "may not be specified",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "-app", "operator": "Exists"}]}}),
            "spec.podSelector.matchExpressions[0].key",
            "qualified name",
        ),
        (
            json!({"podSelector": {"matchLabels": {"app": "not valid"}}}),
            "spec.podSelector.matchLabels.app",
            "label value",
        ),
        (
            json!({"ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["a b"]}]}}]}]}),
            "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values[0]",
            "label value",
        ),
        (
            json!({"egress": [{"to": [{"podSelector": {"matchLabels": {"a/b/c": "x"}}}]}]}),
            "spec.egress[0].to[0].podSelector.matchLabels[a/b/c]",
            "invalid key",
        ),
        // Policy types.
        (
            json!({"policyTypes": ["Ingress", "Sideways"]}),
            "spec.policyTypes[1]",
            "unsupported value \"Sideways\": must be one of \"Ingress\", \"Egress\"",
        ),
        (
            json!({"policyTypes": ["Ingress", "Egress", "Ingress"]}),
            "spec.policyTypes",
            "more than two",
        ),
        // Fields Kubernetes doesn't know.
        (
            json!({"ingress": [{"sources": []}]}),
            "spec.ingress[0].sources",
            "unknown",
        ),
        (
            json!({"ingress": [{"ports": [{"port": 80, "range": 2}]}]}),
            "spec.ingress[0].ports[0].range",
            "unknown",
        ),
    ];
    for (spec, field, reason) in cases {
        let (got_field, got_reason) = refused(&spec);
        assert_eq!(got_field, field, "{spec}: {got_reason}");
        assert!(
            got_reason.contains(reason),
            "{spec}: {field}: {got_reason:?} does not say {reason:?}"
        );
    }
}

#[test]
fn kind_api_version_and_status() {
    let mut doc = policy(&json!({}));
    doc["apiVersion"] = json!("extensions/v1beta1");
    let err = validate_network_policy("np.yaml", &doc).expect_err("old group");
    assert!(err.to_string().contains("networking.k8s.io/v1"), "{err}");
    let mut doc = policy(&json!({}));
    doc["status"] = json!({});
    valid(&doc);
}
