//! The agent's view of the cluster for network policy, fed by `WatchNode`:
//! namespaces (name → labels, for namespaceSelectors), security identities
//! (number → namespace and labels, for pod selectors), every
//! `NetworkPolicy` of the cluster, and the ipcache (pod IP → identity,
//! pod, node and named ports). It also owns the local CIDR identities of
//! ipBlock prefixes. [`compile`] turns it into one endpoint's map entries.
//!
//! [`PolicyHub`] holds the state behind a lock and bumps a
//! `tokio::sync::watch` generation on every change, so a reconcile loop
//! knows to recompile.

pub mod compile;
pub mod enforce;
#[cfg(test)]
mod eval;
pub mod explain;
#[cfg(test)]
mod netpol_tests;
pub mod rules;
#[cfg(test)]
mod state_tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use weir_proto::v1;
use weir_proto::v1::node_event::Event;

pub use compile::{
    Direction, EndpointPolicy, Entry, LocalEndpoint, PolicyRef, compile, endpoint_of_pod,
};

use crate::net::Cidr;

/// Identity 0: "any peer" in policy keys; never a real identity.
pub const ID_ANY: u32 = 0;
/// Identity 1: this node's own addresses.
pub const ID_HOST: u32 = 1;
/// Identity 2: an address the ipcache does not know.
pub const ID_WORLD: u32 = 2;
/// First identity of the CIDR identities the agent allocates locally.
pub const CIDR_ID_BASE: u32 = 1 << 24;

/// IP protocol numbers as the dataplane keys them.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// SCTP (never enforced by weir: the control refuses it in policies).
pub const PROTO_SCTP: u8 = 132;

/// Labels of a namespace, a pod or an identity.
pub type Labels = BTreeMap<String, String>;

/// The protocol number of a Kubernetes protocol name (`TCP` when empty).
pub fn proto_number(name: &str) -> Option<u8> {
    match name {
        "" | "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        _ => None,
    }
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    /// `spec.containers[].ports[].name`.
    pub name: String,
    /// The container port.
    pub port: u16,
    /// Its protocol number.
    pub proto: u8,
}

/// One security identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    /// The namespace of the pods that carry it.
    pub namespace: String,
    /// Their labels.
    pub labels: Labels,
}

/// One ipcache entry: a pod's IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpEntry {
    /// The pod's identity.
    pub identity: u32,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The node it runs on.
    pub node: String,
    /// Its named container ports.
    pub named_ports: Vec<NamedPort>,
}

/// Why a policy event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PolicyEventError {
    /// An ipcache event whose IP is not IPv4.
    #[error("ipcache entry for pod {namespace}/{pod}: ip {ip:?} is not an IPv4 address")]
    BadIp {
        /// The IP as sent.
        ip: String,
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        pod: String,
    },
    /// A policy event without its object.
    #[error("policy event without a policy object")]
    NoPolicy,
    /// A policy whose JSON does not parse.
    #[error("network policy {name:?}: {reason}")]
    BadPolicy {
        /// The policy's name (from the object's typed metadata).
        name: String,
        /// Why it was refused.
        reason: String,
    },
}

/// The cluster as network policy sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyData {
    namespaces: BTreeMap<String, Labels>,
    identities: BTreeMap<u32, IdentityInfo>,
    /// (namespace, name) → policy.
    policies: BTreeMap<(String, String), NetworkPolicy>,
    ipcache: BTreeMap<Ipv4Addr, IpEntry>,
    /// Every ipBlock prefix (cidr and except) of every policy → its local
    /// identity. Kept stable while the prefix is in use.
    cidr_ids: BTreeMap<Cidr, u32>,
    /// This node's own addresses (identity 1).
    host_ips: Vec<Ipv4Addr>,
}

impl PolicyData {
    /// Applies one `WatchNode` event; other kinds of events are ignored.
    /// Returns whether the state changed.
    pub fn apply(&mut self, ev: &Event) -> Result<bool, PolicyEventError> {
        match ev {
            Event::Namespace(n) => Ok(self.apply_namespace(n)),
            Event::Identity(i) => Ok(self.apply_identity(i)),
            Event::Policy(p) => self.apply_policy(p),
            Event::Ipcache(e) => self.apply_ipcache(e),
            _ => Ok(false),
        }
    }

    fn apply_namespace(&mut self, n: &v1::NamespaceEvent) -> bool {
        if n.r#type() == v1::EventType::Deleted {
            return self.namespaces.remove(&n.name).is_some();
        }
        let labels: Labels = n.labels.clone().into_iter().collect();
        self.namespaces.insert(n.name.clone(), labels.clone()) != Some(labels)
    }

    fn apply_identity(&mut self, i: &v1::IdentityEvent) -> bool {
        if i.r#type() == v1::EventType::Deleted {
            return self.identities.remove(&i.id).is_some();
        }
        let info = IdentityInfo {
            namespace: i.namespace.clone(),
            labels: i.labels.clone().into_iter().collect(),
        };
        self.identities.insert(i.id, info.clone()) != Some(info)
    }

    fn apply_policy(&mut self, p: &v1::PolicyEvent) -> Result<bool, PolicyEventError> {
        let object = p.policy.as_ref().ok_or(PolicyEventError::NoPolicy)?;
        let name_of = || {
            object
                .meta
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default()
        };
        let policy: NetworkPolicy =
            serde_json::from_str(&object.json).map_err(|e| PolicyEventError::BadPolicy {
                name: name_of(),
                reason: format!("JSON: {e}"),
            })?;
        let key = (
            policy
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            policy.metadata.name.clone().unwrap_or_default(),
        );
        let changed = if p.r#type() == v1::EventType::Deleted {
            self.policies.remove(&key).is_some()
        } else {
            self.policies.insert(key, policy.clone()) != Some(policy)
        };
        if changed {
            self.refresh_cidr_ids();
        }
        Ok(changed)
    }

    fn apply_ipcache(&mut self, e: &v1::IpCacheEvent) -> Result<bool, PolicyEventError> {
        let ip: Ipv4Addr = e.ip.parse().map_err(|_| PolicyEventError::BadIp {
            ip: e.ip.clone(),
            namespace: e.namespace.clone(),
            pod: e.pod_name.clone(),
        })?;
        if e.r#type() == v1::EventType::Deleted {
            // The IP may already belong to another pod: only that pod's
            // own entry goes.
            let same = self
                .ipcache
                .get(&ip)
                .is_some_and(|x| x.namespace == e.namespace && x.pod == e.pod_name);
            return Ok(same && self.ipcache.remove(&ip).is_some());
        }
        let entry = IpEntry {
            identity: e.identity,
            namespace: e.namespace.clone(),
            pod: e.pod_name.clone(),
            node: e.node_name.clone(),
            named_ports: e
                .named_ports
                .iter()
                .filter_map(|p| {
                    Some(NamedPort {
                        name: p.name.clone(),
                        port: u16::try_from(p.port).ok().filter(|p| *p != 0)?,
                        proto: proto_number(&p.protocol)?,
                    })
                })
                .collect(),
        };
        Ok(self.ipcache.insert(ip, entry.clone()) != Some(entry))
    }

    /// Sets this node's own addresses (identity 1). Returns whether they
    /// changed.
    pub fn set_host_ips(&mut self, mut ips: Vec<Ipv4Addr>) -> bool {
        ips.sort_unstable();
        ips.dedup();
        let changed = self.host_ips != ips;
        self.host_ips = ips;
        changed
    }

    /// Allocates identities to new ipBlock prefixes and releases those no
    /// policy uses any more; prefixes still in use keep theirs.
    fn refresh_cidr_ids(&mut self) {
        let used: BTreeSet<Cidr> = self.policies.values().flat_map(policy_prefixes).collect();
        self.cidr_ids.retain(|c, _| used.contains(c));
        let mut taken: BTreeSet<u32> = self.cidr_ids.values().copied().collect();
        for c in used {
            if self.cidr_ids.contains_key(&c) {
                continue;
            }
            let id = cidr_identity(c, &taken);
            taken.insert(id);
            self.cidr_ids.insert(c, id);
        }
    }

    /// The namespaces' labels.
    pub fn namespaces(&self) -> &BTreeMap<String, Labels> {
        &self.namespaces
    }

    /// The labels a namespaceSelector sees for `ns` (only the automatic
    /// name label if the namespace is unknown).
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        self.namespaces.get(ns).cloned().unwrap_or_else(|| {
            Labels::from([("kubernetes.io/metadata.name".to_owned(), ns.to_owned())])
        })
    }

    /// The security identities.
    pub fn identities(&self) -> &BTreeMap<u32, IdentityInfo> {
        &self.identities
    }

    /// The policies by (namespace, name).
    pub fn policies(&self) -> &BTreeMap<(String, String), NetworkPolicy> {
        &self.policies
    }

    /// The pod IPs.
    pub fn ipcache(&self) -> &BTreeMap<Ipv4Addr, IpEntry> {
        &self.ipcache
    }

    /// The ipBlock prefixes and their local identities.
    pub fn cidr_ids(&self) -> &BTreeMap<Cidr, u32> {
        &self.cidr_ids
    }

    /// This node's own addresses.
    pub fn host_ips(&self) -> &[Ipv4Addr] {
        &self.host_ips
    }

    /// The node-wide LPM ipcache (`weir_ipcache_v1`): every pod's /32 →
    /// its identity, this node's addresses → host, and every ipBlock
    /// prefix → its CIDR identity. All prefixes must be installed (not
    /// only one endpoint's): the compiler's ipBlock decisions assume the
    /// longest match of an address is the most specific prefix any policy
    /// names. A /32 that is both a pod (or host) and an ipBlock prefix is
    /// the pod's; rules covering it allow the pod's identity instead.
    pub fn lpm_entries(&self) -> Vec<(Cidr, u32)> {
        let host32 = |ip: Ipv4Addr| Cidr {
            addr: ip,
            prefix: 32,
        };
        let mut out: BTreeMap<Cidr, u32> = self.cidr_ids.iter().map(|(c, id)| (*c, *id)).collect();
        for ip in &self.host_ips {
            out.insert(host32(*ip), ID_HOST);
        }
        for (ip, e) in &self.ipcache {
            out.insert(host32(*ip), e.identity);
        }
        out.into_iter().collect()
    }

    /// Pod identity → the IPs that carry it, from the ipcache.
    pub fn ips_by_identity(&self) -> BTreeMap<u32, Vec<(Ipv4Addr, &IpEntry)>> {
        let mut out: BTreeMap<u32, Vec<(Ipv4Addr, &IpEntry)>> = BTreeMap::new();
        for (ip, e) in &self.ipcache {
            out.entry(e.identity).or_default().push((*ip, e));
        }
        out
    }

    /// Test helpers: build a state without events.
    #[cfg(test)]
    pub(crate) fn test_namespace(&mut self, name: &str, labels: &[(&str, &str)]) {
        let mut l: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.insert("kubernetes.io/metadata.name".to_owned(), name.to_owned());
        self.namespaces.insert(name.to_owned(), l);
    }

    #[cfg(test)]
    pub(crate) fn test_identity(&mut self, id: u32, namespace: &str, labels: &Labels) {
        self.identities.insert(
            id,
            IdentityInfo {
                namespace: namespace.to_owned(),
                labels: labels.clone(),
            },
        );
    }

    #[cfg(test)]
    pub(crate) fn test_ip(&mut self, ip: Ipv4Addr, entry: IpEntry) {
        self.ipcache.insert(ip, entry);
    }

    #[cfg(test)]
    pub(crate) fn test_policy(&mut self, policy: NetworkPolicy) {
        let key = (
            policy.metadata.namespace.clone().unwrap_or_default(),
            policy.metadata.name.clone().unwrap_or_default(),
        );
        self.policies.insert(key, policy);
        self.refresh_cidr_ids();
    }

    #[cfg(test)]
    pub(crate) fn test_remove_policy(&mut self, namespace: &str, name: &str) {
        self.policies
            .remove(&(namespace.to_owned(), name.to_owned()));
        self.refresh_cidr_ids();
    }
}

/// Parses an ipBlock CIDR as agents must read it: host bits are masked
/// ("10.1.2.3/16" is 10.1.0.0/16). `Ok(None)` for an IPv6 block (pods
/// are IPv4: it matches nothing).
pub fn parse_block_cidr(text: &str) -> Result<Option<Cidr>, String> {
    if text
        .split_once('/')
        .is_some_and(|(addr, _)| addr.contains(':'))
    {
        return Ok(None);
    }
    Cidr::parse_masked(text)
        .map(Some)
        .map_err(|e| format!("ipBlock {e}"))
}

/// Every IPv4 prefix (cidr and except) a policy's ipBlocks name.
fn policy_prefixes(p: &NetworkPolicy) -> Vec<Cidr> {
    let Some(spec) = &p.spec else {
        return Vec::new();
    };
    let peers = spec
        .ingress
        .iter()
        .flatten()
        .flat_map(|r| r.from.iter().flatten())
        .chain(
            spec.egress
                .iter()
                .flatten()
                .flat_map(|r| r.to.iter().flatten()),
        );
    peers
        .filter_map(|peer| peer.ip_block.as_ref())
        .flat_map(|b| std::iter::once(&b.cidr).chain(b.except.iter().flatten()))
        .filter_map(|t| parse_block_cidr(t).ok().flatten())
        .collect()
}

/// A prefix's identity: derived from a hash of the prefix, so it is the
/// same across agent restarts (unless two prefixes collide, when the
/// later one probes to the next free id).
fn cidr_identity(c: Cidr, taken: &BTreeSet<u32>) -> u32 {
    let digest = Sha256::digest(c.to_string().as_bytes());
    let mut h = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let span = u32::MAX - CIDR_ID_BASE;
    loop {
        let id = CIDR_ID_BASE + h % span;
        if !taken.contains(&id) {
            return id;
        }
        h = h.wrapping_add(1);
    }
}

/// The policy state shared by the watch (writer) and the reconcile loop
/// (reader), with a generation that changes whenever the state does.
#[derive(Debug)]
pub struct PolicyHub {
    data: Mutex<PolicyData>,
    generation: watch::Sender<u64>,
    /// A complete list has been received ([`PolicyHub::replace`]): until
    /// then the state is partial and must not be enforced.
    synced: std::sync::atomic::AtomicBool,
}

impl Default for PolicyHub {
    fn default() -> Self {
        Self {
            data: Mutex::new(PolicyData::default()),
            generation: watch::Sender::new(0),
            synced: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl PolicyHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, PolicyData> {
        self.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Applies one live event (ignoring other kinds of events).
    pub fn apply(&self, ev: &Event) -> Result<bool, PolicyEventError> {
        let changed = self.lock().apply(ev)?;
        if changed {
            self.bump();
        }
        Ok(changed)
    }

    /// Replaces the state with a complete list (a new stream from revision
    /// 0): nothing that was not sent again survives. This node's addresses
    /// and the CIDR identities still in use are kept.
    pub fn replace(&self, mut fresh: PolicyData) {
        let changed = {
            let mut d = self.lock();
            fresh.host_ips.clone_from(&d.host_ips);
            fresh.cidr_ids.clone_from(&d.cidr_ids);
            fresh.refresh_cidr_ids();
            let changed = *d != fresh;
            *d = fresh;
            changed
        };
        let first = !self.synced.swap(true, std::sync::atomic::Ordering::SeqCst);
        if changed || first {
            self.bump();
        }
    }

    /// Sets this node's own addresses.
    pub fn set_host_ips(&self, ips: Vec<Ipv4Addr>) {
        if self.lock().set_host_ips(ips) {
            self.bump();
        }
    }

    /// Whether a complete list has been received (the state is whole).
    pub fn synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A receiver that sees the generation change on every state change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Runs `f` on the current state (under the lock: keep it short, e.g.
    /// compile the local endpoints).
    pub fn read<R>(&self, f: impl FnOnce(&PolicyData) -> R) -> R {
        f(&self.lock())
    }
}
