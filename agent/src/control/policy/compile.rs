//! Kubernetes `NetworkPolicy` semantics → one local endpoint's policy map
//! entries (`weir_pol_v1`: peer identity, port, protocol, direction →
//! allow, with the policy that allowed it).
//!
//! Choices where Kubernetes leaves room or weir's dataplane differs:
//! - **ipBlock and pod (or host) IPs.** Every ipBlock prefix (cidr and
//!   each except) has its own CIDR identity in the node-wide LPM ipcache;
//!   a rule allows every prefix identity inside its cidr and not inside
//!   one of its excepts, which is exact for addresses whose longest match
//!   is a prefix. A pod IP's longest match is its /32 (its identity), so
//!   the rule also allows a pod identity when **all** the identity's IPs
//!   in the ipcache lie inside the block (outside its excepts), and the
//!   host identity when all this node's addresses do. Identities are per
//!   (namespace, labels), so this never opens a pod the block does not
//!   cover; a block covering only some pods of an identity allows none of
//!   them (stricter than Kubernetes' per-IP reading, never looser).
//! - **Named egress ports** resolve against the destination pods: an
//!   identity's ports are the union over its pods in the ipcache. Pods of
//!   one identity that give the same name different numbers all get every
//!   number (logged as a warning): keys carry identities, not pods.
//! - **Cluster DNS** is served by the agent on the node IP (pods reach
//!   10.96.0.10 through the socket load balancer, which rewrites it to
//!   node IP:53 before the packet reaches the veth, so the policy sees
//!   the host identity). For egress selectors weir's DNS is a virtual pod
//!   in `kube-system` labelled `k8s-app=kube-dns` (`CoreDNS`'s labels) with
//!   named ports `dns` (53/UDP) and `dns-tcp` (53/TCP): a peer that would
//!   select it allows the host identity, on port 53 only.
//! - **The node may always reach its pods** (probes come from the agent):
//!   an ingress-enforced endpoint gets an allow-all entry from the host
//!   identity, attributed to [`PolicyRef::Host`].
//! - Anything the compiler cannot read (a bad CIDR, SCTP, an `endPort`
//!   range over [`MAX_RANGE`] ports, an unknown operator) allows nothing
//!   for that part and is reported in [`EndpointPolicy::warnings`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weir_proto::manifest::selector_matches;

use super::{
    ID_ANY, ID_HOST, IpEntry, Labels, NamedPort, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyData,
    parse_block_cidr, proto_number,
};
use crate::net::Cidr;

/// The most ports one `endPort` range may expand to.
pub const MAX_RANGE: u32 = 1024;
/// The namespace of weir's virtual DNS pod.
pub const DNS_NAMESPACE: &str = "kube-system";
/// The labels of weir's virtual DNS pod.
pub const DNS_LABELS: [(&str, &str); 1] = [("k8s-app", "kube-dns")];
/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// Which way a connection goes, seen from the local endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the endpoint (its Ingress policy; tcx egress on its veth).
    Ingress,
    /// From the endpoint (its Egress policy; tcx ingress on its veth).
    Egress,
}

impl Direction {
    /// The `dir` byte of a `weir_pol_v1` key.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Ingress => 0,
            Self::Egress => 1,
        }
    }
}

/// What allowed an entry (for flow attribution).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyRef {
    /// A `NetworkPolicy`.
    Policy {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// weir's built-in allowance of the node to its pods.
    Host,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Policy { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Host => f.write_str("<host>"),
        }
    }
}

/// One allow entry of an endpoint's policy map.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entry {
    /// The peer's identity (0 = any).
    pub peer_identity: u32,
    /// The destination port (0 = any; then `proto` may be 0 too).
    pub port: u16,
    /// The IP protocol (0 = any, 6, 17).
    pub proto: u8,
    /// The direction.
    pub dir: Direction,
    /// The policy that allowed it.
    pub rule: PolicyRef,
}

/// The key of a `weir_pol_v1` entry (without the endpoint).
pub type EntryKey = (Direction, u32, u16, u8);

/// One local endpoint's compiled policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Some policy selects the endpoint for Ingress.
    pub ingress_enforced: bool,
    /// Some policy selects the endpoint for Egress.
    pub egress_enforced: bool,
    /// The policies that isolate it for Ingress (a drop is theirs).
    pub isolating_ingress: Vec<PolicyRef>,
    /// The policies that isolate it for Egress.
    pub isolating_egress: Vec<PolicyRef>,
    /// The allow entries (the same key may come from several policies).
    pub entries: BTreeSet<Entry>,
    /// The ipBlock prefixes its rules name, with their identities (the
    /// node-wide ipcache must hold all of [`PolicyData::lpm_entries`]).
    pub cidrs: Vec<(Cidr, u32)>,
    /// What the compiler skipped (allowing nothing for it), and why.
    pub warnings: Vec<String>,
}

impl EndpointPolicy {
    /// The entries as map keys, one policy each (the first in order, so
    /// a `NetworkPolicy` wins over the built-in host rule).
    pub fn map_entries(&self) -> BTreeMap<EntryKey, PolicyRef> {
        let mut out = BTreeMap::new();
        for e in &self.entries {
            out.entry((e.dir, e.peer_identity, e.port, e.proto))
                .or_insert_with(|| e.rule.clone());
        }
        out
    }
}

/// The endpoint a policy is compiled for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's labels.
    pub labels: Labels,
    /// The pod's identity.
    pub identity: u32,
    /// Its named container ports (ingress rules' named ports resolve here).
    pub named_ports: Vec<NamedPort>,
}

/// A local endpoint from its pod (None without a `weir.io/identity`).
pub fn endpoint_of_pod(pod: &Pod) -> Option<LocalEndpoint> {
    let identity = pod
        .metadata
        .annotations
        .as_ref()?
        .get("weir.io/identity")?
        .parse()
        .ok()?;
    let named_ports = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                port: u16::try_from(p.container_port).ok()?,
                proto: proto_number(p.protocol.as_deref().unwrap_or_default())?,
            })
        })
        .collect();
    Some(LocalEndpoint {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        identity,
        named_ports,
    })
}

/// What a rule's peers resolve to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Pods (named ports from the ipcache).
    Pods,
    /// A CIDR prefix or the host through an ipBlock: no named ports.
    Addresses,
    /// weir's DNS on the host: port 53 only.
    ClusterDns,
}

/// One resolved peer.
type Target = (u32, Kind);

/// A rule's port list, resolved as far as it can be without the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PortSel {
    /// Any port, any protocol.
    All,
    /// Any port of one protocol.
    Proto(u8),
    /// One port.
    Port(u16, u8),
    /// A named port of the destination.
    Named(String, u8),
}

/// Compiles every policy that selects `ep` into its entries.
pub fn compile(data: &PolicyData, ep: &LocalEndpoint) -> EndpointPolicy {
    let mut c = Compiler {
        data,
        ep,
        by_identity: data.ips_by_identity(),
        out: EndpointPolicy::default(),
        cidrs: BTreeMap::new(),
    };
    for ((ns, name), policy) in data
        .policies()
        .range((ep.namespace.clone(), String::new())..)
    {
        if *ns != ep.namespace {
            break;
        }
        let spec = policy.spec.clone().unwrap_or_default();
        let selects = spec
            .pod_selector
            .as_ref()
            .is_none_or(|s| matches(&mut c.out.warnings, s, &ep.labels));
        if !selects {
            continue;
        }
        let rule = PolicyRef::Policy {
            namespace: ns.clone(),
            name: name.clone(),
        };
        let (ingress, egress) = policy_types(&spec);
        if ingress {
            c.out.ingress_enforced = true;
            c.out.isolating_ingress.push(rule.clone());
            for r in spec.ingress.iter().flatten() {
                c.rule(
                    Direction::Ingress,
                    &rule,
                    r.from.as_deref(),
                    r.ports.as_deref(),
                );
            }
        }
        if egress {
            c.out.egress_enforced = true;
            c.out.isolating_egress.push(rule.clone());
            for r in spec.egress.iter().flatten() {
                c.rule(
                    Direction::Egress,
                    &rule,
                    r.to.as_deref(),
                    r.ports.as_deref(),
                );
            }
        }
    }
    if c.out.ingress_enforced {
        c.out.entries.insert(Entry {
            peer_identity: ID_HOST,
            port: 0,
            proto: 0,
            dir: Direction::Ingress,
            rule: PolicyRef::Host,
        });
    }
    c.out.cidrs = c.cidrs.into_iter().collect();
    for w in &c.out.warnings {
        tracing::warn!(namespace = %ep.namespace, identity = ep.identity, "network policy: {w}");
    }
    c.out
}

/// (Ingress, Egress) isolation: `policyTypes` if set, else Kubernetes'
/// default (Ingress, plus Egress when there are egress rules).
fn policy_types(spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec) -> (bool, bool) {
    match &spec.policy_types {
        Some(t) => (
            t.iter().any(|t| t == "Ingress"),
            t.iter().any(|t| t == "Egress"),
        ),
        None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

/// A selector match that reports unknown operators (they match nothing).
fn matches(warnings: &mut Vec<String>, sel: &LabelSelector, labels: &Labels) -> bool {
    if let Some(bad) = sel
        .match_expressions
        .iter()
        .flatten()
        .find(|e| !["In", "NotIn", "Exists", "DoesNotExist"].contains(&e.operator.as_str()))
    {
        let w = format!(
            "selector operator {:?} on {:?} is unknown: it selects nothing",
            bad.operator, bad.key
        );
        if !warnings.contains(&w) {
            warnings.push(w);
        }
        return false;
    }
    selector_matches(sel, labels)
}

struct Compiler<'a> {
    data: &'a PolicyData,
    ep: &'a LocalEndpoint,
    by_identity: BTreeMap<u32, Vec<(Ipv4Addr, &'a IpEntry)>>,
    out: EndpointPolicy,
    cidrs: BTreeMap<Cidr, u32>,
}

impl Compiler<'_> {
    fn warn(&mut self, rule: &PolicyRef, what: &str) {
        let w = format!("policy {rule}: {what}");
        if !self.out.warnings.contains(&w) {
            self.out.warnings.push(w);
        }
    }

    /// One ingress or egress rule: the union of its peers × its ports.
    fn rule(
        &mut self,
        dir: Direction,
        rule: &PolicyRef,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
    ) {
        let selectors = self.port_sels(rule, ports);
        let targets: BTreeSet<Target> = match peers {
            // An empty or absent peer list is any peer.
            None | Some([]) => {
                self.any_peer(dir, rule, &selectors);
                return;
            }
            Some(peers) => peers.iter().flat_map(|p| self.peer(dir, rule, p)).collect(),
        };
        for (identity, kind) in targets {
            for sel in &selectors {
                for (port, proto) in self.resolve(dir, rule, sel, identity, kind) {
                    self.push(identity, port, proto, dir, rule);
                }
            }
        }
    }

    fn push(&mut self, peer_identity: u32, port: u16, proto: u8, dir: Direction, rule: &PolicyRef) {
        self.out.entries.insert(Entry {
            peer_identity,
            port,
            proto,
            dir,
            rule: rule.clone(),
        });
    }

    /// A rule without peers: wildcard keys, except named ports, which
    /// resolve per destination.
    fn any_peer(&mut self, dir: Direction, rule: &PolicyRef, selectors: &[PortSel]) {
        for sel in selectors {
            match (sel, dir) {
                (PortSel::Named(..), Direction::Egress) => {
                    let mut targets: Vec<Target> = self
                        .by_identity
                        .keys()
                        .map(|id| (*id, Kind::Pods))
                        .collect();
                    targets.push((ID_HOST, Kind::ClusterDns));
                    for (identity, kind) in targets {
                        for (port, proto) in self.resolve(dir, rule, sel, identity, kind) {
                            self.push(identity, port, proto, dir, rule);
                        }
                    }
                }
                _ => {
                    for (port, proto) in self.resolve(dir, rule, sel, ID_ANY, Kind::Pods) {
                        self.push(ID_ANY, port, proto, dir, rule);
                    }
                }
            }
        }
    }

    /// The identities one peer selects.
    fn peer(&mut self, dir: Direction, rule: &PolicyRef, peer: &NetworkPolicyPeer) -> Vec<Target> {
        match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
            (Some(block), None, None) => self.block(rule, block),
            (Some(_), _, _) => {
                self.warn(
                    rule,
                    "a peer with an ipBlock and a selector is invalid: it selects nothing",
                );
                Vec::new()
            }
            (None, None, None) => {
                self.warn(rule, "an empty peer is invalid: it selects nothing");
                Vec::new()
            }
            (None, pods, namespaces) => {
                self.selectors(dir, rule, pods.as_ref(), namespaces.as_ref())
            }
        }
    }

    /// podSelector (in the policy's namespace), namespaceSelector (all
    /// pods there), or both (AND).
    fn selectors(
        &mut self,
        dir: Direction,
        rule: &PolicyRef,
        pods: Option<&LabelSelector>,
        namespaces: Option<&LabelSelector>,
    ) -> Vec<Target> {
        let PolicyRef::Policy { namespace: own, .. } = rule else {
            return Vec::new();
        };
        let data = self.data;
        let mut ns_cache: BTreeMap<String, bool> = BTreeMap::new();
        let mut warnings = Vec::new();
        let mut selects = |ns: &str, labels: &Labels| {
            let ns_ok = match namespaces {
                None => ns == own,
                Some(sel) => *ns_cache
                    .entry(ns.to_owned())
                    .or_insert_with(|| matches(&mut warnings, sel, &data.namespace_labels(ns))),
            };
            ns_ok && pods.is_none_or(|sel| matches(&mut warnings, sel, labels))
        };
        let mut out: Vec<Target> = data
            .identities()
            .iter()
            .filter(|(_, info)| selects(&info.namespace, &info.labels))
            .map(|(id, _)| (*id, Kind::Pods))
            .collect();
        let dns_labels: Labels = DNS_LABELS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if dir == Direction::Egress && selects(DNS_NAMESPACE, &dns_labels) {
            out.push((ID_HOST, Kind::ClusterDns));
        }
        for w in warnings {
            self.warn(rule, &w);
        }
        out
    }

    /// An ipBlock: every prefix identity inside it (not in an except),
    /// and the pod (and host) identities whose addresses all are.
    fn block(&mut self, rule: &PolicyRef, block: &IPBlock) -> Vec<Target> {
        let cidr = match parse_block_cidr(&block.cidr) {
            Ok(Some(c)) => c,
            Ok(None) => return Vec::new(), // IPv6: pods are IPv4.
            Err(e) => {
                self.warn(rule, &format!("{e}: the block selects nothing"));
                return Vec::new();
            }
        };
        let mut except = Vec::new();
        for text in block.except.iter().flatten() {
            match parse_block_cidr(text) {
                Ok(Some(c)) => except.push(c),
                Ok(None) => {}
                Err(e) => {
                    self.warn(rule, &format!("except {e}: the block selects nothing"));
                    return Vec::new();
                }
            }
        }
        let inside = |ip: Ipv4Addr| cidr.contains(ip) && !except.iter().any(|e| e.contains(ip));
        let mut out = Vec::new();
        for (prefix, id) in self.data.cidr_ids() {
            let named = *prefix == cidr || except.contains(prefix);
            if named {
                self.cidrs.insert(*prefix, *id);
            }
            if cidr.contains_net(*prefix) && !except.iter().any(|e| e.contains_net(*prefix)) {
                out.push((*id, Kind::Addresses));
            }
        }
        for (id, ips) in &self.by_identity {
            if ips.iter().all(|(ip, _)| inside(*ip)) {
                out.push((*id, Kind::Pods));
            }
        }
        let host = self.data.host_ips();
        if !host.is_empty() && host.iter().all(|ip| inside(*ip)) {
            out.push((ID_HOST, Kind::Addresses));
        }
        out
    }

    /// A rule's ports; an empty or absent list is every port of every
    /// protocol. Invalid ones are skipped (allowing nothing).
    fn port_sels(&mut self, rule: &PolicyRef, ports: Option<&[NetworkPolicyPort]>) -> Vec<PortSel> {
        match ports {
            None | Some([]) => vec![PortSel::All],
            Some(ports) => ports.iter().flat_map(|p| self.port_sel(rule, p)).collect(),
        }
    }

    /// One `ports[]` entry.
    fn port_sel(&mut self, rule: &PolicyRef, p: &NetworkPolicyPort) -> Vec<PortSel> {
        let name = p.protocol.as_deref().unwrap_or("TCP");
        let proto = match proto_number(name) {
            Some(PROTO_SCTP) | None => {
                let w = format!("protocol {name:?} is not enforced by weir (TCP and UDP only)");
                self.warn(rule, &format!("{w}: the port allows nothing"));
                return Vec::new();
            }
            Some(n) => n,
        };
        match (&p.port, p.end_port) {
            (None, None) => vec![PortSel::Proto(proto)],
            (Some(IntOrString::String(name)), None) => vec![PortSel::Named(name.clone(), proto)],
            (Some(IntOrString::Int(n)), end) => self.range(rule, *n, end, proto),
            (_, Some(end)) => {
                let w = format!("endPort {end} without a numeric port: it allows nothing");
                self.warn(rule, &w);
                Vec::new()
            }
        }
    }

    /// A numeric port, or the range `first..=end` expanded (at most
    /// [`MAX_RANGE`] ports).
    fn range(&mut self, rule: &PolicyRef, first: i32, end: Option<i32>, proto: u8) -> Vec<PortSel> {
        let a = u16::try_from(first).ok().filter(|n| *n != 0);
        let b = end.map_or(a, |e| u16::try_from(e).ok());
        let w = match (a, b) {
            (Some(a), Some(b)) if a <= b && u32::from(b - a) < MAX_RANGE => {
                return (a..=b).map(|n| PortSel::Port(n, proto)).collect();
            }
            (Some(a), Some(b)) if a <= b => format!(
                "port range {a}-{b} has {} ports, more than weir expands ({MAX_RANGE})",
                u32::from(b - a) + 1
            ),
            _ => format!("port {first} endPort {end:?} is not a valid range"),
        };
        self.warn(rule, &format!("{w}: it allows nothing"));
        Vec::new()
    }

    /// The (port, proto) keys one port selector gives for one peer.
    fn resolve(
        &mut self,
        dir: Direction,
        rule: &PolicyRef,
        sel: &PortSel,
        identity: u32,
        kind: Kind,
    ) -> Vec<(u16, u8)> {
        let keys = match sel {
            PortSel::All => vec![(0, 0)],
            PortSel::Proto(p) => vec![(0, *p)],
            PortSel::Port(n, p) => vec![(*n, *p)],
            PortSel::Named(name, proto) => self.named(dir, rule, name, *proto, identity, kind),
        };
        if kind != Kind::ClusterDns {
            return keys;
        }
        // weir's DNS is the host: only port 53 of it.
        let dns = [(DNS_PORT, PROTO_UDP), (DNS_PORT, PROTO_TCP)];
        let mut out: Vec<(u16, u8)> = keys
            .into_iter()
            .flat_map(|(port, proto)| {
                dns.into_iter().filter(move |(p, pr)| {
                    (port == 0 || port == *p) && (proto == 0 || proto == *pr)
                })
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// A named port: the local endpoint's for ingress, the destination's
    /// for egress (the union over the identity's pods).
    fn named(
        &mut self,
        dir: Direction,
        rule: &PolicyRef,
        name: &str,
        proto: u8,
        identity: u32,
        kind: Kind,
    ) -> Vec<(u16, u8)> {
        let pick = |ports: &[NamedPort]| -> Vec<u16> {
            ports
                .iter()
                .filter(|p| p.name == name && p.proto == proto)
                .map(|p| p.port)
                .collect()
        };
        let mut numbers: Vec<u16> = match (dir, kind) {
            (Direction::Ingress, _) => pick(&self.ep.named_ports),
            (Direction::Egress, Kind::Pods) => self
                .by_identity
                .get(&identity)
                .into_iter()
                .flatten()
                .flat_map(|(_, e)| pick(&e.named_ports))
                .collect(),
            (Direction::Egress, Kind::ClusterDns) => match name {
                "dns" if proto == PROTO_UDP => vec![DNS_PORT],
                "dns-tcp" if proto == PROTO_TCP => vec![DNS_PORT],
                _ => Vec::new(),
            },
            (Direction::Egress, Kind::Addresses) => Vec::new(),
        };
        numbers.sort_unstable();
        numbers.dedup();
        if numbers.len() > 1 {
            let w = format!("pods of identity {identity} name different ports {name:?}");
            self.warn(rule, &format!("{w} ({numbers:?}): all of them are allowed"));
        }
        numbers.into_iter().map(|n| (n, proto)).collect()
    }
}
