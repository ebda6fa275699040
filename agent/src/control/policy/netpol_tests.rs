//! The upstream `test/e2e/network/netpol` policy shapes as compile tests:
//! namespaces x, y, z × pods a, b, c; every endpoint is compiled and the
//! 9×9 reachability matrix is evaluated the way the kernel will (LPM
//! ipcache, then the `weir_pol_v1` lookup order on the client's egress
//! and the server's ingress), against each case's expected matrix.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::eval::{Verdict, identity_of, verdict};
use super::*;

const NS: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const TCP: u8 = PROTO_TCP;
const UDP: u8 = PROTO_UDP;

fn pod_ip(n: usize, p: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        244,
        u8::try_from(n + 1).unwrap(),
        u8::try_from(p + 10).unwrap(),
    )
}

fn split(pod: &str) -> (usize, usize) {
    let (n, p) = pod.split_once('/').unwrap();
    (
        NS.iter().position(|x| *x == n).unwrap(),
        PODS.iter().position(|x| *x == p).unwrap(),
    )
}

fn ip(pod: &str) -> Ipv4Addr {
    let (n, p) = split(pod);
    pod_ip(n, p)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The upstream pods' named ports: 80 and 81 on TCP and UDP.
fn serve_ports() -> Vec<NamedPort> {
    let mut out = Vec::new();
    for port in [80, 81] {
        for (proto, name) in [(TCP, "tcp"), (UDP, "udp")] {
            out.push(NamedPort {
                name: format!("serve-{port}-{name}"),
                port,
                proto,
            });
        }
    }
    out
}

/// x, y, z (label ns=<name>) × a, b, c (label pod=<name>), kube-system,
/// and this node's address.
fn model() -> PolicyData {
    let mut d = PolicyData::default();
    d.set_host_ips(vec![HOST]);
    d.test_namespace("kube-system", &[]);
    for (n, ns) in NS.iter().enumerate() {
        d.test_namespace(ns, &[("ns", ns)]);
        for (p, pod) in PODS.iter().enumerate() {
            let id = 256 + u32::try_from(n * 3 + p).unwrap();
            d.test_identity(id, ns, &labels(&[("pod", pod)]));
            add_pod(&mut d, &format!("{ns}/{pod}"), id, serve_ports());
        }
    }
    d
}

fn add_pod(d: &mut PolicyData, pod: &str, identity: u32, named_ports: Vec<NamedPort>) {
    let (n, p) = split(pod);
    d.test_ip(
        pod_ip(n, p),
        IpEntry {
            identity,
            namespace: NS[n].to_owned(),
            pod: PODS[p].to_owned(),
            node: format!("node-{}", (n + p) % 2),
            named_ports,
        },
    );
}

/// Gives a pod new labels (so a new identity, as the control does).
fn relabel(d: &mut PolicyData, pod: &str, identity: u32, l: &[(&str, &str)]) {
    let (n, _) = split(pod);
    d.test_identity(identity, NS[n], &labels(l));
    add_pod(d, pod, identity, serve_ports());
}

/// The local endpoint of a model pod, as its agent sees it.
fn endpoint(d: &PolicyData, pod: &str) -> LocalEndpoint {
    let e = &d.ipcache()[&ip(pod)];
    LocalEndpoint {
        namespace: e.namespace.clone(),
        labels: d.identities()[&e.identity].labels.clone(),
        identity: e.identity,
        named_ports: e.named_ports.clone(),
    }
}

fn np(d: &mut PolicyData, ns: &str, name: &str, spec: Value) {
    let mut v = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
    });
    v["spec"] = spec;
    let p: NetworkPolicy = serde_json::from_value(v).unwrap();
    d.test_policy(p);
}

/// The upstream tests' extra egress rule so clients can resolve names.
fn allow_dns() -> Value {
    json!({"ports": [{"protocol": "UDP", "port": 53}]})
}

fn compiled(d: &PolicyData, pod: &str) -> EndpointPolicy {
    compile(d, &endpoint(d, pod))
}

/// Whether `pod` may send to `dst` (its egress side only).
fn egress_ok(d: &PolicyData, pod: &str, dst: Ipv4Addr, port: u16, proto: u8) -> bool {
    let ep = compiled(d, pod);
    verdict(&ep, &d.lpm_entries(), dst, port, proto, Direction::Egress) == Verdict::Allow
}

/// Whether `pod` may receive from `src` (its ingress side only).
fn ingress_ok(d: &PolicyData, pod: &str, src: Ipv4Addr, port: u16, proto: u8) -> bool {
    let ep = compiled(d, pod);
    verdict(&ep, &d.lpm_entries(), src, port, proto, Direction::Ingress) == Verdict::Allow
}

/// A 9×9 reachability matrix (from, to); loopback always passes (it
/// never crosses the veth), as upstream's `AllowLoopback`.
#[derive(Clone, PartialEq, Eq)]
struct Reach([[bool; 9]; 9]);

fn all_pods() -> Vec<String> {
    NS.iter()
        .flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}")))
        .collect()
}

fn hit(pattern: &str, pod: &str) -> bool {
    let (pn, pp) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let (n, p) = pod.split_once('/').unwrap();
    (pn == "*" || pn == n) && (pp == "*" || pp == p)
}

impl Reach {
    fn new(v: bool) -> Self {
        let mut r = Self([[v; 9]; 9]);
        r.loopback();
        r
    }

    fn loopback(&mut self) {
        for i in 0..9 {
            self.0[i][i] = true;
        }
    }

    /// Sets every (from, to) matching the patterns ("x/a", "x/*", "*/a", "*").
    fn set(mut self, from: &str, to: &str, v: bool) -> Self {
        let pods = all_pods();
        for (i, f) in pods.iter().enumerate() {
            for (j, t) in pods.iter().enumerate() {
                if hit(from, f) && hit(to, t) {
                    self.0[i][j] = v;
                }
            }
        }
        self.loopback();
        self
    }

    fn table(&self) -> String {
        let pods = all_pods();
        let mut s = format!("{:>5}", "");
        for t in &pods {
            let _ = write!(s, " {t:>3}");
        }
        for (i, f) in pods.iter().enumerate() {
            let _ = write!(s, "\n{f:>5}");
            for j in 0..9 {
                let _ = write!(s, " {:>3}", if self.0[i][j] { "." } else { "X" });
            }
        }
        s
    }
}

/// The matrix the compiled entries give for one port and protocol.
fn probe(d: &PolicyData, port: u16, proto: u8) -> Reach {
    let pods = all_pods();
    let lpm = d.lpm_entries();
    let eps: Vec<EndpointPolicy> = pods.iter().map(|p| compiled(d, p)).collect();
    let mut r = Reach([[false; 9]; 9]);
    for (i, f) in pods.iter().enumerate() {
        for (j, t) in pods.iter().enumerate() {
            let out = verdict(&eps[i], &lpm, ip(t), port, proto, Direction::Egress);
            let into = verdict(&eps[j], &lpm, ip(f), port, proto, Direction::Ingress);
            r.0[i][j] = out == Verdict::Allow && into == Verdict::Allow;
        }
    }
    r.loopback();
    r
}

#[track_caller]
fn check(d: &PolicyData, port: u16, proto: u8, expected: &Reach) {
    let got = probe(d, port, proto);
    assert!(
        got == *expected,
        "port {port}/{proto}: expected\n{}\ngot\n{}",
        expected.table(),
        got.table()
    );
}

#[test]
fn default_deny_ingress() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny-ingress",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    let want = Reach::new(true).set("*", "x/*", false);
    check(&d, 80, TCP, &want);
    check(&d, 81, UDP, &want);
    assert_eq!(
        compiled(&d, "x/a").isolating_ingress,
        vec![PolicyRef::Policy {
            namespace: "x".into(),
            name: "deny-ingress".into()
        }]
    );
}

#[test]
fn default_deny_all() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    let want = Reach::new(true)
        .set("*", "x/*", false)
        .set("x/*", "*", false);
    check(&d, 80, TCP, &want);
    check(&d, 80, UDP, &want);
}

#[test]
fn default_deny_egress() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    check(&d, 80, TCP, &Reach::new(true).set("x/*", "*", false));
    assert!(!compiled(&d, "x/a").ingress_enforced);
}

#[test]
fn allow_from_same_namespace_pod_by_pod_selector() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "x-a-from-x-b",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]
        }),
    );
    let want = Reach::new(true)
        .set("*", "x/a", false)
        .set("x/b", "x/a", true);
    check(&d, 80, TCP, &want);
}

#[test]
fn deny_all_ingress_then_allow_all_to_one_target() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny",
        json!({"podSelector": {}, "ingress": []}),
    );
    np(
        &mut d,
        "x",
        "allow-a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}),
    );
    let want = Reach::new(true)
        .set("*", "x/b", false)
        .set("*", "x/c", false);
    check(&d, 80, TCP, &want);
}

#[test]
fn allow_from_all_namespaces() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "all-ns",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    check(&d, 80, TCP, &Reach::new(true));
}

#[test]
fn allow_only_from_another_namespace_by_namespace_selector() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "from-y",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("y/*", "x/a", true),
    );
}

#[test]
fn pod_selector_with_match_expressions() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "in-b",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("x/b", "x/a", true),
    );
}

#[test]
fn namespace_selector_with_match_expressions() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "ns-in-y",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y"]}]}}]}]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("y/*", "x/a", true),
    );
}

#[test]
fn pod_selector_or_namespace_selector_as_two_peers() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "or",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [
                {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}},
                {"podSelector": {"matchLabels": {"pod": "b"}}}
            ]}]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true).set("x/c", "x/a", false));
}

#[test]
fn pod_selector_and_namespace_selector_in_one_peer() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "and",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{
                "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                "podSelector": {"matchLabels": {"pod": "b"}}
            }]}]
        }),
    );
    let want = Reach::new(true)
        .set("*", "x/a", false)
        .set("y/b", "x/a", true)
        .set("z/b", "x/a", true);
    check(&d, 80, TCP, &want);
}

#[test]
fn multiple_pod_and_namespace_selectors() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "multi",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{
                "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}
            }]}]
        }),
    );
    let want = Reach::new(true)
        .set("*", "x/a", false)
        .set("y/b", "x/a", true)
        .set("y/c", "x/a", true)
        .set("z/b", "x/a", true)
        .set("z/c", "x/a", true);
    check(&d, 80, TCP, &want);
}

#[test]
fn any_of_several_pod_selectors() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "b-or-c",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [
                {"podSelector": {"matchLabels": {"pod": "b"}}},
                {"podSelector": {"matchLabels": {"pod": "c"}}}
            ]}]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("x/b", "x/a", true)
            .set("x/c", "x/a", true),
    );
}

#[test]
fn only_a_pod_in_another_namespace() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "y-a",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {"matchLabels": {"pod": "a"}}
            }]}]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("y/a", "x/a", true),
    );
}

#[test]
fn ports_restrict_a_namespace_rule() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "y-81",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 81, "protocol": "TCP"}]}]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/a", false));
    check(
        &d,
        81,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("y/*", "x/a", true),
    );
    check(&d, 81, UDP, &Reach::new(true).set("*", "x/a", false));
}

#[test]
fn stacked_policies_are_a_union() {
    let mut d = model();
    for (name, port) in [("y-80", 80), ("y-81", 81)] {
        np(
            &mut d,
            "x",
            name,
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": port}]}]
            }),
        );
    }
    let want = Reach::new(true)
        .set("*", "x/a", false)
        .set("y/*", "x/a", true);
    check(&d, 80, TCP, &want);
    check(&d, 81, TCP, &want);
    assert_eq!(compiled(&d, "x/a").isolating_ingress.len(), 2);
}

#[test]
fn allow_all_ingress() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    );
    check(&d, 80, TCP, &Reach::new(true));
    check(&d, 81, UDP, &Reach::new(true));
    assert!(compiled(&d, "x/a").ingress_enforced);
}

#[test]
fn ingress_on_one_named_port() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "named",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
    );
    check(&d, 81, TCP, &Reach::new(true));
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/*", false));
    check(&d, 81, UDP, &Reach::new(true).set("*", "x/*", false));
}

#[test]
fn ingress_from_a_namespace_on_one_named_port() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "named-y",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": "serve-80-tcp"}]}]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/*", false)
            .set("y/*", "x/*", true),
    );
    check(&d, 81, TCP, &Reach::new(true).set("*", "x/*", false));
}

#[test]
fn egress_on_one_named_port() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "named-egress",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": "serve-80-tcp"}]}, allow_dns()]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true));
    check(&d, 81, TCP, &Reach::new(true).set("x/a", "*", false));
}

#[test]
fn a_named_egress_port_resolves_per_destination_identity() {
    let mut d = model();
    // y/b names serve-80-tcp 8080: the rule allows 8080 to y/b only.
    add_pod(
        &mut d,
        "y/b",
        256 + 4,
        vec![NamedPort {
            name: "serve-80-tcp".into(),
            port: 8080,
            proto: TCP,
        }],
    );
    np(
        &mut d,
        "x",
        "named-egress",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80-tcp"}]}]
        }),
    );
    assert!(egress_ok(&d, "x/a", ip("y/b"), 8080, TCP));
    assert!(!egress_ok(&d, "x/a", ip("y/b"), 80, TCP));
    assert!(egress_ok(&d, "x/a", ip("y/c"), 80, TCP));
    assert!(!egress_ok(&d, "x/a", ip("y/c"), 8080, TCP));
    // Two pods of one identity that disagree: both numbers, with a warning.
    let mut d2 = d.clone();
    d2.test_ip(
        Ipv4Addr::new(10, 244, 2, 99),
        IpEntry {
            identity: 256 + 5,
            namespace: "y".into(),
            pod: "c-2".into(),
            node: "n".into(),
            named_ports: vec![NamedPort {
                name: "serve-80-tcp".into(),
                port: 9090,
                proto: TCP,
            }],
        },
    );
    let ep = compiled(&d2, "x/a");
    assert!(
        ep.warnings.iter().any(|w| w.contains("9090")),
        "{:?}",
        ep.warnings
    );
    assert!(egress_ok(&d2, "x/a", ip("y/c"), 9090, TCP));
}

#[test]
fn an_updated_policy_replaces_the_old_rules() {
    let mut d = model();
    let spec = |pod: &str| {
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": pod}}}]}]
        })
    };
    np(&mut d, "x", "p", spec("b"));
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("x/b", "x/a", true),
    );
    np(&mut d, "x", "p", spec("c"));
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("x/c", "x/a", true),
    );
}

#[test]
fn ingress_from_an_updated_namespace() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "ns2",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/a", false));
    d.test_namespace("y", &[("ns", "y"), ("ns2", "updated")]);
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("y/*", "x/a", true),
    );
}

#[test]
fn ingress_from_an_updated_pod() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "pod2",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod2": "updated"}}}]}]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/a", false));
    relabel(&mut d, "x/b", 900, &[("pod", "b"), ("pod2", "updated")]);
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("x/b", "x/a", true),
    );
}

#[test]
fn deny_ingress_from_other_namespaces() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "same-ns",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/*", false)
            .set("x/*", "x/*", true),
    );
}

#[test]
fn deny_ingress_to_an_updated_pod() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "target2",
        json!({"podSelector": {"matchLabels": {"target": "isolated"}}, "policyTypes": ["Ingress"]}),
    );
    check(&d, 80, TCP, &Reach::new(true));
    relabel(&mut d, "x/a", 901, &[("pod", "a"), ("target", "isolated")]);
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/a", false));
}

#[test]
fn deny_egress_from_one_pod() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny-a",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}),
    );
    check(&d, 80, TCP, &Reach::new(true).set("x/a", "*", false));
}

#[test]
fn deny_egress_from_a_namespace() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny-x",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": []}),
    );
    check(&d, 80, TCP, &Reach::new(true).set("x/*", "*", false));
}

#[test]
fn ingress_and_egress_together() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "both",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}, allow_dns()]
        }),
    );
    let want = Reach::new(true)
        .set("*", "x/a", false)
        .set("x/a", "*", false)
        .set("x/b", "x/a", true)
        .set("x/a", "x/b", true);
    check(&d, 80, TCP, &want);
}

#[test]
fn client_egress_denies_even_when_the_server_allows() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "to-y",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}, allow_dns()]
        }),
    );
    np(
        &mut d,
        "z",
        "from-x-a",
        json!({
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]
        }),
    );
    let want = Reach::new(true)
        .set("x/a", "*", false)
        .set("x/a", "y/*", true)
        .set("*", "z/*", false);
    check(&d, 80, TCP, &want);
}

#[test]
fn egress_to_a_pod_in_another_namespace() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "to-y-a",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "a"}}}]}, allow_dns()]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("x/a", "*", false)
            .set("x/a", "y/a", true),
    );
}

#[test]
fn any_port_of_one_protocol() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "tcp-only",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"protocol": "TCP"}]}]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true));
    check(&d, 81, TCP, &Reach::new(true));
    check(&d, 80, UDP, &Reach::new(true).set("*", "x/a", false));
}

#[test]
fn an_allow_all_ingress_policy_takes_precedence() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "80-only",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    check(&d, 81, TCP, &Reach::new(true).set("*", "x/a", false));
    np(
        &mut d,
        "x",
        "all",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}),
    );
    check(&d, 81, TCP, &Reach::new(true));
}

#[test]
fn an_allow_all_egress_policy_takes_precedence() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "80-only",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 80}]}, allow_dns()]
        }),
    );
    check(&d, 81, TCP, &Reach::new(true).set("x/a", "*", false));
    check(&d, 80, TCP, &Reach::new(true));
    np(
        &mut d,
        "x",
        "all",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{}], "policyTypes": ["Egress"]}),
    );
    check(&d, 81, TCP, &Reach::new(true));
}

#[test]
fn deleted_policies_stop_enforcing() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/*", false)
            .set("x/*", "*", false),
    );
    d.test_remove_policy("x", "deny");
    check(&d, 80, TCP, &Reach::new(true));
    assert_eq!(compiled(&d, "x/a"), EndpointPolicy::default());
}

#[test]
fn egress_to_a_pod_by_cidr_block() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "cidr",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": format!("{}/32", ip("y/b"))}}]}, allow_dns()]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("x/a", "*", false)
            .set("x/a", "y/b", true),
    );
}

#[test]
fn a_cidr_except_clause_denies_the_excepted_pod() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "except",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("{}/32", ip("x/b"))]}}]}, allow_dns()]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true).set("x/a", "x/b", false));
}

#[test]
fn an_ip_in_both_cidr_and_except_is_allowed_by_another_policy() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "except",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("{}/32", ip("x/b"))]}}]}, allow_dns()]
        }),
    );
    np(
        &mut d,
        "x",
        "just-b",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": format!("{}/32", ip("x/b"))}}]}]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true));
}

#[test]
fn ingress_and_egress_isolation_are_independent() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "a-no-egress",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}),
    );
    np(
        &mut d,
        "x",
        "b-no-ingress",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("x/a", "*", false)
            .set("*", "x/b", false),
    );
    let a = compiled(&d, "x/a");
    assert!(a.egress_enforced && !a.ingress_enforced);
}

#[test]
fn an_sctp_policy_isolates_but_allows_nothing() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "sctp",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/a", false));
    let ep = compiled(&d, "x/a");
    assert!(
        ep.warnings.iter().any(|w| w.contains("SCTP")),
        "{:?}",
        ep.warnings
    );
}

#[test]
fn a_udp_only_policy_does_not_allow_tcp() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "udp-81",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"protocol": "UDP", "port": 81}]}]
        }),
    );
    check(&d, 81, TCP, &Reach::new(true).set("*", "x/a", false));
    check(&d, 81, UDP, &Reach::new(true));
}

#[test]
fn namespace_selector_on_the_default_name_label() {
    for sel in [
        json!({"matchLabels": {"kubernetes.io/metadata.name": "y"}}),
        json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]}),
    ] {
        let mut d = model();
        np(
            &mut d,
            "x",
            "by-name",
            json!({
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": sel}]}]
            }),
        );
        check(
            &d,
            80,
            TCP,
            &Reach::new(true)
                .set("*", "x/a", false)
                .set("y/*", "x/a", true),
        );
    }
}

#[test]
fn ingress_end_port_range() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "range",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80, "endPort": 82}]}]
        }),
    );
    for port in [80, 81, 82] {
        check(
            &d,
            port,
            TCP,
            &Reach::new(true)
                .set("*", "x/a", false)
                .set("y/*", "x/a", true),
        );
    }
    for port in [79, 83] {
        check(&d, port, TCP, &Reach::new(true).set("*", "x/a", false));
    }
}

#[test]
fn egress_end_port_range() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "range",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 81, "endPort": 82}]}, allow_dns()]
        }),
    );
    check(&d, 81, TCP, &Reach::new(true));
    check(&d, 80, TCP, &Reach::new(true).set("x/a", "*", false));
}

#[test]
fn an_end_port_range_too_large_is_refused_and_allows_nothing() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "huge",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"port": 1, "endPort": 2000}, {"port": 443}]}]
        }),
    );
    let ep = compiled(&d, "x/a");
    assert!(
        ep.warnings
            .iter()
            .any(|w| w.contains("1-2000") && w.contains("1024")),
        "{:?}",
        ep.warnings
    );
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/a", false));
    check(&d, 443, TCP, &Reach::new(true));
    // 1024 ports exactly is still expanded.
    np(
        &mut d,
        "x",
        "huge",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"ports": [{"port": 1, "endPort": 1024}]}]
        }),
    );
    assert!(compiled(&d, "x/a").warnings.is_empty());
    check(&d, 1024, TCP, &Reach::new(true));
}

#[test]
fn a_policy_targeting_no_pods_changes_nothing() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "nobody",
        json!({"podSelector": {"matchLabels": {"pod": "zzz"}}, "policyTypes": ["Ingress", "Egress"]}),
    );
    check(&d, 80, TCP, &Reach::new(true));
    for pod in all_pods() {
        assert_eq!(compiled(&d, &pod), EndpointPolicy::default());
    }
}

#[test]
fn deny_all_plus_one_allowed_port() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    np(
        &mut d,
        "x",
        "allow-81",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}]}),
    );
    check(&d, 81, TCP, &Reach::new(true));
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/*", false));
    check(&d, 81, UDP, &Reach::new(true).set("*", "x/*", false));
}

#[test]
fn a_policy_in_another_namespace_does_not_select_pods_here() {
    let mut d = model();
    np(
        &mut d,
        "y",
        "deny",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}),
    );
    check(&d, 80, TCP, &Reach::new(true).set("*", "y/a", false));
}

#[test]
fn egress_to_dns_reaches_the_agents_server_on_the_host() {
    // Pods resolve through 10.96.0.10, which the socket LB rewrites to the
    // node IP:53 before the packet reaches the veth: the host identity.
    let cases = [
        // The upstream tests' rule: UDP 53 to anyone.
        (
            json!({"ports": [{"protocol": "UDP", "port": 53}]}),
            true,
            false,
        ),
        // To every namespace.
        (
            json!({"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}]}),
            true,
            false,
        ),
        // To kube-dns in kube-system, UDP and TCP.
        (
            json!({"to": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}
            }], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}),
            true,
            true,
        ),
        // kube-dns's named ports.
        (
            json!({"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                   "ports": [{"protocol": "UDP", "port": "dns"}, {"protocol": "TCP", "port": "dns-tcp"}]}),
            true,
            true,
        ),
        // To the node's address by ipBlock.
        (
            json!({"to": [{"ipBlock": {"cidr": format!("{HOST}/32")}}], "ports": [{"protocol": "UDP", "port": 53}]}),
            true,
            false,
        ),
        // Another app in kube-system is not the DNS server.
        (
            json!({"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "other"}}}]}),
            false,
            false,
        ),
        // Namespace y only.
        (
            json!({"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}),
            false,
            false,
        ),
    ];
    for (i, (rule, udp, tcp)) in cases.into_iter().enumerate() {
        let mut d = model();
        np(
            &mut d,
            "x",
            "dns",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [rule]}),
        );
        assert_eq!(egress_ok(&d, "x/a", HOST, 53, UDP), udp, "case {i}: UDP 53");
        assert_eq!(egress_ok(&d, "x/a", HOST, 53, TCP), tcp, "case {i}: TCP 53");
        // Selecting DNS never opens the rest of the host.
        if i != 4 && i != 0 {
            assert!(
                !egress_ok(&d, "x/a", HOST, 10250, TCP),
                "case {i}: host 10250"
            );
        }
        assert!(
            !egress_ok(&d, "x/a", HOST, 80, UDP),
            "case {i}: host UDP 80"
        );
    }
}

#[test]
fn the_node_always_reaches_ingress_isolated_pods() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    let ep = compiled(&d, "x/a");
    assert!(
        ingress_ok(&d, "x/a", HOST, 8080, TCP),
        "probes from the node pass"
    );
    assert!(ingress_ok(&d, "x/a", HOST, 53, UDP));
    assert!(
        !egress_ok(&d, "x/a", HOST, 8080, TCP),
        "egress to the node is not implied"
    );
    assert!(ep.entries.iter().any(|e| e.rule == PolicyRef::Host));
    // Another node's address is not the host.
    assert!(!ingress_ok(
        &d,
        "x/a",
        Ipv4Addr::new(192, 168, 0, 2),
        8080,
        TCP
    ));
    // Not enforced: no host entry either (nothing to add).
    assert!(compiled(&d, "y/a").entries.is_empty());
}

#[test]
fn ingress_from_cidr_and_world_addresses() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "cidrs",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [
                {"ipBlock": {"cidr": "10.244.2.0/24"}},
                {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}
            ]}]
        }),
    );
    check(
        &d,
        80,
        TCP,
        &Reach::new(true)
            .set("*", "x/a", false)
            .set("y/*", "x/a", true),
    );
    assert!(ingress_ok(&d, "x/a", Ipv4Addr::new(8, 8, 8, 8), 80, TCP));
    assert!(!ingress_ok(&d, "x/a", Ipv4Addr::new(10, 9, 9, 9), 80, TCP));
    assert!(!ingress_ok(
        &d,
        "x/a",
        Ipv4Addr::new(192, 168, 7, 7),
        80,
        TCP
    ));
    let named: Vec<String> = compiled(&d, "x/a")
        .cidrs
        .iter()
        .map(|(c, _)| c.to_string())
        .collect();
    assert_eq!(
        named,
        ["0.0.0.0/0", "10.0.0.0/8", "10.244.2.0/24", "192.168.0.0/16"]
    );
}

#[test]
fn overlapping_blocks_of_different_policies_resolve_by_longest_prefix() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "wide",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "172.16.0.0/12", "except": ["172.17.0.0/16"]}}]}]
        }),
    );
    np(
        &mut d,
        "x",
        "narrow",
        json!({
            "podSelector": {"matchLabels": {"pod": "b"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "172.17.2.0/24"}}]}, {"to": [{"ipBlock": {"cidr": "172.20.0.0/15"}}]}]
        }),
    );
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    // x/a: the /24 of another policy sits inside a's except: still denied.
    assert!(!egress_ok(&d, "x/a", ip("172.17.2.5"), 80, TCP));
    assert!(!egress_ok(&d, "x/a", ip("172.17.9.9"), 80, TCP));
    // The /15 of another policy sits inside a's cidr: still allowed.
    assert!(egress_ok(&d, "x/a", ip("172.20.1.1"), 80, TCP));
    assert!(egress_ok(&d, "x/a", ip("172.18.0.1"), 80, TCP));
    assert!(!egress_ok(&d, "x/a", ip("172.32.0.1"), 80, TCP));
    // x/b: only its /24 inside a's except, and its /15.
    assert!(egress_ok(&d, "x/b", ip("172.17.2.5"), 80, TCP));
    assert!(!egress_ok(&d, "x/b", ip("172.17.3.5"), 80, TCP));
    assert!(!egress_ok(&d, "x/b", ip("172.18.0.1"), 80, TCP));
    assert!(egress_ok(&d, "x/b", ip("172.21.0.1"), 80, TCP));
    let lpm = d.lpm_entries();
    assert_eq!(identity_of(&lpm, ip("8.8.8.8")), ID_WORLD);
}

#[test]
fn a_block_covering_only_some_pods_of_an_identity_allows_none_of_them() {
    let mut d = model();
    // A second y/b replica outside 10.244.2.0/24, same identity.
    d.test_ip(
        Ipv4Addr::new(10, 244, 9, 9),
        IpEntry {
            identity: 256 + 4,
            namespace: "y".into(),
            pod: "b-2".into(),
            node: "n".into(),
            named_ports: serve_ports(),
        },
    );
    np(
        &mut d,
        "x",
        "y-net",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.244.2.0/24"}}]}]
        }),
    );
    assert!(egress_ok(&d, "x/a", ip("y/a"), 80, TCP));
    assert!(!egress_ok(&d, "x/a", ip("y/b"), 80, TCP));
    assert!(!egress_ok(&d, "x/a", Ipv4Addr::new(10, 244, 9, 9), 80, TCP));
}

#[test]
fn unreadable_parts_allow_nothing() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "bad",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [
                {"from": [{"ipBlock": {"cidr": "nope"}}]},
                {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["bad"]}}]},
                {"from": [{"ipBlock": {"cidr": "fd00::/8"}}]},
                {"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Sometimes"}]}}]},
                {"from": [{}]}
            ]
        }),
    );
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/a", false));
    let ep = compiled(&d, "x/a");
    assert_eq!(ep.entries.len(), 1, "only the host entry: {:?}", ep.entries);
    assert_eq!(ep.warnings.len(), 4, "{:?}", ep.warnings);
}

#[test]
fn endpoints_come_from_pods_with_an_identity() {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"},
                     "annotations": {"weir.io/identity": "300"}},
        "spec": {"containers": [{"name": "c", "image": "i", "ports": [
            {"name": "http", "containerPort": 8080},
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"containerPort": 9000}
        ]}]}
    }))
    .unwrap();
    let ep = endpoint_of_pod(&pod).unwrap();
    assert_eq!(ep.identity, 300);
    assert_eq!(ep.namespace, "x");
    assert_eq!(ep.labels, labels(&[("pod", "a")]));
    assert_eq!(
        ep.named_ports,
        vec![
            NamedPort {
                name: "http".into(),
                port: 8080,
                proto: TCP
            },
            NamedPort {
                name: "dns".into(),
                port: 53,
                proto: UDP
            },
        ]
    );
    let mut bare = pod.clone();
    bare.metadata.annotations = None;
    assert!(endpoint_of_pod(&bare).is_none());
}

#[test]
fn one_rule_per_map_key_and_the_policy_wins_over_the_host_rule() {
    let mut d = model();
    np(
        &mut d,
        "x",
        "a1",
        json!({"podSelector": {}, "ingress": [{}]}),
    );
    np(
        &mut d,
        "x",
        "a2",
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": format!("{HOST}/32")}}]}]}),
    );
    let ep = compiled(&d, "x/a");
    let keys = ep.map_entries();
    assert_eq!(
        keys[&(Direction::Ingress, 0, 0, 0)],
        PolicyRef::Policy {
            namespace: "x".into(),
            name: "a1".into()
        }
    );
    assert_eq!(
        keys[&(Direction::Ingress, ID_HOST, 0, 0)],
        PolicyRef::Policy {
            namespace: "x".into(),
            name: "a2".into()
        }
    );
    assert!(ep.entries.len() > keys.len());
}

#[test]
fn policy_types_default_like_the_apiserver() {
    let mut d = model();
    // No policyTypes, egress rules: Ingress and Egress both isolate.
    np(
        &mut d,
        "x",
        "both",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{}]}),
    );
    let a = compiled(&d, "x/a");
    assert!(a.ingress_enforced && a.egress_enforced);
    check(&d, 80, TCP, &Reach::new(true).set("*", "x/a", false));
    // No policyTypes, no egress rules: Ingress only.
    np(
        &mut d,
        "x",
        "both",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": []}),
    );
    let a = compiled(&d, "x/a");
    assert!(a.ingress_enforced && !a.egress_enforced);
}
