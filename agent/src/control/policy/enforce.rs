//! Enforcement: keeps the policy dataplane ([`PolicyDataplane`]) equal to
//! what [`compile`] makes of the [`PolicyHub`] for every local pod.
//!
//! - **Pod start** ([`PodPolicy::pod_up`], from the pod worker, before any
//!   container starts): the policy programs are attached to the pod's
//!   host-side veth, its /32 goes into the ipcache, then its policy
//!   entries, then its endpoint (so a selected pod never runs unenforced).
//!   A pod waits until the hub has a complete list from the control.
//! - **Changes** ([`run`]): on every hub generation change and every local
//!   endpoint change (debounced by [`DEBOUNCE`]) every local endpoint is
//!   recompiled and programmed by diff: ipcache additions, then per
//!   endpoint the direction flags being dropped, the entries, the flags
//!   being raised (the contract's gap-free order), then ipcache removals
//!   and one conntrack prune when anything was taken away.
//! - **Agent restart**: the maps and links are pinned and adopted as they
//!   are — nothing is flushed at load, so enforcement never lapses and
//!   established flows keep their conntrack entries. Nothing is written
//!   until the hub holds a complete list; then the pods adopted from the
//!   previous agent are taken over (programs swapped in their links),
//!   endpoints and links of pods that are gone are removed, and the
//!   first reconcile rewrites only what changed meanwhile.
//! - **Pod teardown** ([`PodPolicy::pod_down`]): endpoint (with its
//!   entries and conntrack) removed, programs detached.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weir_common::{ID_CIDR_MIN, IPCACHE_F_CIDR};

use super::compile::{self, EndpointPolicy};
use super::rules::rule_number;
use super::{PolicyData, PolicyHub, compile as compile_policy, endpoint_of_pod};
use crate::net::Cidr;
use crate::pod::{Manager, PodPolicy};
use crate::policy::{Direction, Endpoint, PolicyDataplane, PolicyEntry, PolicyError};
use crate::state::NetRecord;

/// How long a change waits for more changes before it is programmed.
pub const DEBOUNCE: Duration = Duration::from_millis(10);
/// How long a failed reconcile waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// One local pod the enforcer programs.
#[derive(Debug, Clone)]
struct Local {
    uid: String,
    iface: String,
    ip: Ipv4Addr,
    /// The pod as it was when it started (its labels and identity until the
    /// control's current view says otherwise).
    pod: Pod,
}

/// What the enforcer has programmed.
#[derive(Debug, Default)]
struct State {
    /// Local endpoints by host-side veth ifindex.
    endpoints: BTreeMap<u32, Local>,
    /// The (prefix, identity) slots the ipcache holds.
    ipcache: BTreeSet<(Cidr, u32)>,
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Endpoints programmed.
    pub endpoints: usize,
    /// Policy entries written (added or changed).
    pub written: usize,
    /// Policy entries removed.
    pub removed: usize,
    /// ipcache slots added.
    pub ipcache_added: usize,
    /// ipcache slots removed.
    pub ipcache_removed: usize,
    /// Conntrack entries pruned.
    pub pruned: usize,
}

/// The policies that isolate one local endpoint, per direction: a
/// default-deny drop at that endpoint is theirs (flow attribution,
/// `policy explain`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Isolation {
    /// The policies that select the endpoint for Ingress.
    pub ingress: Vec<compile::PolicyRef>,
    /// The policies that select the endpoint for Egress.
    pub egress: Vec<compile::PolicyRef>,
}

impl Isolation {
    fn of(p: &EndpointPolicy) -> Self {
        Self {
            ingress: p.isolating_ingress.clone(),
            egress: p.isolating_egress.clone(),
        }
    }

    /// The policies isolating direction `dir`.
    #[must_use]
    pub fn get(&self, dir: compile::Direction) -> &[compile::PolicyRef] {
        match dir {
            compile::Direction::Ingress => &self.ingress,
            compile::Direction::Egress => &self.egress,
        }
    }
}

/// A pod's fresh view (the control's current pod object) by uid.
pub type FreshPods = dyn Fn(&str) -> Option<Pod> + Send + Sync;

/// Programs the policy dataplane for this node's pods.
pub struct Enforcer {
    dp: PolicyDataplane,
    hub: Arc<PolicyHub>,
    state: Mutex<State>,
    /// The isolating policies of each programmed endpoint, by ifindex
    /// (own lock: the flow reader asks for every denial).
    isolation: Mutex<BTreeMap<u32, Isolation>>,
    /// Woken when the local endpoints change.
    kick: Notify,
}

/// Why a pod could not be enforced.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    /// The dataplane refused an operation.
    #[error(transparent)]
    Dataplane(#[from] PolicyError),
    /// The pod has no identity to enforce it with.
    #[error("pod {pod}: no weir.io/identity annotation (set by the control)")]
    NoIdentity {
        /// namespace/name.
        pod: String,
    },
}

impl Enforcer {
    /// Loads the policy programs on the node's pin directory, adopting
    /// pinned maps as they are (nothing is flushed).
    pub fn load(pin_dir: &Path, hub: Arc<PolicyHub>) -> Result<Self, PolicyError> {
        let dp = PolicyDataplane::load(pin_dir)?;
        let ipcache = installed_slots(&dp)?;
        Ok(Self {
            dp,
            hub,
            state: Mutex::new(State {
                endpoints: BTreeMap::new(),
                ipcache,
            }),
            isolation: Mutex::new(BTreeMap::new()),
            kick: Notify::new(),
        })
    }

    /// The dataplane (for observers: `decide`, drops).
    pub fn dataplane(&self) -> &PolicyDataplane {
        &self.dp
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn isolation_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Isolation>> {
        self.isolation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The policies isolating endpoint `ifindex` (a pod's host-side veth)
    /// as last programmed; `None` if no local endpoint has that ifindex.
    pub fn isolation(&self, ifindex: u32) -> Option<Isolation> {
        self.isolation_map().get(&ifindex).cloned()
    }

    /// The local endpoint of pod `namespace/name`: (ifindex, pod IP).
    pub fn local_endpoint(&self, namespace: &str, name: &str) -> Option<(u32, Ipv4Addr)> {
        self.lock().endpoints.iter().find_map(|(i, l)| {
            (l.pod.metadata.namespace.as_deref() == Some(namespace)
                && l.pod.metadata.name.as_deref() == Some(name))
            .then_some((*i, l.ip))
        })
    }

    /// The policy state the enforcer compiles from.
    pub fn hub(&self) -> &Arc<PolicyHub> {
        &self.hub
    }

    /// Attaches to a new (or adopted) pod's veth and enforces its policy
    /// (blocking: TCX attaches wait for RCU).
    pub fn add(&self, uid: &str, pod: Pod, net: &NetRecord) -> Result<(), EnforceError> {
        let local = Local {
            uid: uid.to_owned(),
            iface: net.host_veth.clone(),
            ip: net.ip,
            pod,
        };
        let ep = endpoint_of_pod(&local.pod).ok_or_else(|| EnforceError::NoIdentity {
            pod: crate::pod::pod_key(&local.pod),
        })?;
        let mut st = self.lock();
        // Under the lock: the restart GC must not detach a link in flight.
        self.dp.attach(&local.iface)?;
        let slot = (host32(local.ip), ep.identity);
        if !st.ipcache.contains(&slot) {
            self.dp.upsert_ipcache(slot.0, slot.1)?;
            st.ipcache.insert(slot);
        }
        let compiled = self.hub.read(|d| compile_policy(d, &ep));
        program(&self.dp, net.host_ifindex, local.ip, ep.identity, &compiled)?;
        self.isolation_map()
            .insert(net.host_ifindex, Isolation::of(&compiled));
        tracing::debug!(pod = %crate::pod::pod_key(&local.pod), ifindex = net.host_ifindex,
            ingress = compiled.ingress_enforced, egress = compiled.egress_enforced, "network policy enforced");
        st.endpoints.insert(net.host_ifindex, local);
        drop(st);
        self.kick.notify_one();
        Ok(())
    }

    /// Stops enforcing a pod that is being torn down and detaches.
    pub fn remove(&self, net: &NetRecord) -> Result<(), PolicyError> {
        let mut st = self.lock();
        st.endpoints.remove(&net.host_ifindex);
        self.isolation_map().remove(&net.host_ifindex);
        self.dp.remove_endpoint(net.host_ifindex)?;
        self.dp.detach(&net.host_veth)?;
        drop(st);
        self.kick.notify_one();
        Ok(())
    }

    /// Takes over the pods adopted from a previous agent (`pods`: uid,
    /// pod, network) and removes the endpoints and links of pods that are
    /// gone. Call once the hub is synced.
    pub fn adopt(&self, pods: Vec<(String, Pod, NetRecord)>) {
        for (uid, pod, net) in pods {
            if self.lock().endpoints.contains_key(&net.host_ifindex) {
                continue;
            }
            if let Err(e) = self.add(&uid, pod, &net) {
                tracing::error!(uid, error = %e, "cannot take over network policy of an adopted pod");
            }
        }
        let st = self.lock();
        let ifaces: BTreeSet<&str> = st.endpoints.values().map(|l| l.iface.as_str()).collect();
        match self.dp.endpoints() {
            Ok(eps) => {
                for (ifindex, _) in eps {
                    if !st.endpoints.contains_key(&ifindex) {
                        tracing::info!(
                            ifindex,
                            "removing the policy endpoint of a pod that is gone"
                        );
                        if let Err(e) = self.dp.remove_endpoint(ifindex) {
                            tracing::warn!(ifindex, error = %e, "cannot remove a stale policy endpoint");
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list policy endpoints"),
        }
        for iface in self.dp.attached_ifaces() {
            if !ifaces.contains(iface.as_str())
                && let Err(e) = self.dp.detach(&iface)
            {
                tracing::warn!(iface, error = %e, "cannot detach stale policy links");
            }
        }
    }

    /// Recompiles every local endpoint and programs the differences.
    /// `fresh` gives a pod's current object (labels and identity may have
    /// changed since it started).
    pub fn reconcile(&self, fresh: &FreshPods) -> Result<Report, PolicyError> {
        let mut st = self.lock();
        let locals: Vec<(u32, Local, Option<Pod>)> = st
            .endpoints
            .iter()
            .map(|(i, l)| (*i, l.clone(), fresh(&l.uid)))
            .collect();
        let (wanted, compiled) = self.hub.read(|d| plan(d, &locals));
        let mut r = Report::default();
        let add: Vec<(Cidr, u32)> = wanted.difference(&st.ipcache).copied().collect();
        for (c, id) in &add {
            self.dp.upsert_ipcache(*c, *id)?;
            st.ipcache.insert((*c, *id));
        }
        r.ipcache_added = add.len();
        for (ifindex, ip, identity, pol) in &compiled {
            let diff = program(&self.dp, *ifindex, *ip, *identity, pol)?;
            self.isolation_map().insert(*ifindex, Isolation::of(pol));
            r.endpoints += 1;
            r.written += diff.added + diff.changed;
            r.removed += diff.removed + diff.changed;
        }
        self.isolation_map()
            .retain(|i, _| st.endpoints.contains_key(i));
        let stale: Vec<(Cidr, u32)> = st.ipcache.difference(&wanted).copied().collect();
        for (c, id) in &stale {
            self.dp.remove_ipcache(*c, *id)?;
            st.ipcache.remove(&(*c, *id));
        }
        r.ipcache_removed = stale.len();
        if r.removed > 0 || r.ipcache_removed > 0 || r.ipcache_added > 0 {
            r.pruned = self.dp.prune_all()?;
        }
        Ok(r)
    }
}

/// The ipcache slots a node's maps hold (from an adopted trie).
fn installed_slots(dp: &PolicyDataplane) -> Result<BTreeSet<(Cidr, u32)>, PolicyError> {
    let mut out = BTreeSet::new();
    for (c, v) in dp.ipcache()? {
        out.insert((c, v.identity));
        if v.identity < ID_CIDR_MIN && v.flags & IPCACHE_F_CIDR != 0 {
            out.insert((c, v.cidr_identity));
        }
    }
    Ok(out)
}

fn host32(ip: Ipv4Addr) -> Cidr {
    Cidr {
        addr: ip,
        prefix: 32,
    }
}

/// One endpoint's compiled policy: (ifindex, pod IP, identity, policy).
type Compiled = (u32, Ipv4Addr, u32, EndpointPolicy);

/// The wanted ipcache slots and every endpoint's compiled policy.
fn plan(
    data: &PolicyData,
    locals: &[(u32, Local, Option<Pod>)],
) -> (BTreeSet<(Cidr, u32)>, Vec<Compiled>) {
    // Node identities (pods, host) by prefix; the agent knows its own
    // pods' addresses before the control does.
    let mut lpm: BTreeMap<Cidr, u32> = data.lpm_entries().into_iter().collect();
    let mut compiled = Vec::new();
    for (ifindex, local, fresh) in locals {
        let ep = fresh
            .as_ref()
            .and_then(endpoint_of_pod)
            .or_else(|| endpoint_of_pod(&local.pod));
        let Some(ep) = ep else {
            tracing::warn!(uid = %local.uid, "pod without a weir.io/identity: its policy is left as it is");
            continue;
        };
        lpm.insert(host32(local.ip), ep.identity);
        compiled.push((*ifindex, local.ip, ep.identity, compile_policy(data, &ep)));
    }
    // Every ipBlock prefix keeps its CIDR slot, also where a pod's /32
    // holds the node slot: an `except` naming a pod's address must still
    // be the longest ipBlock match of that address.
    let mut slots: BTreeSet<(Cidr, u32)> = lpm.into_iter().collect();
    slots.extend(data.cidr_ids().iter().map(|(c, id)| (*c, *id)));
    (slots, compiled)
}

/// The dataplane entries of a compiled policy, with rule numbers.
fn entries(p: &EndpointPolicy) -> Vec<PolicyEntry> {
    p.map_entries()
        .into_iter()
        .map(|((dir, peer, port, proto), rule)| PolicyEntry {
            peer,
            port,
            proto,
            dir: match dir {
                compile::Direction::Ingress => Direction::Ingress,
                compile::Direction::Egress => Direction::Egress,
            },
            rule: rule_number(&rule),
        })
        .collect()
}

/// Programs one endpoint without a gap: directions that stop being
/// enforced are lowered first, then the entries change, then directions
/// that start being enforced are raised. The source check is always on.
fn program(
    dp: &PolicyDataplane,
    ifindex: u32,
    ip: Ipv4Addr,
    identity: u32,
    p: &EndpointPolicy,
) -> Result<crate::policy::PolicyDiff, PolicyError> {
    let want = Endpoint {
        identity,
        ip,
        ingress: p.ingress_enforced,
        egress: p.egress_enforced,
        source_check: true,
    };
    let old = dp.endpoint(ifindex)?;
    if let Some(old) = old {
        let lowered = Endpoint {
            ingress: old.ingress && want.ingress,
            egress: old.egress && want.egress,
            ..want
        };
        if lowered != old {
            dp.set_endpoint(ifindex, &lowered)?;
        }
    }
    let diff = dp.set_policy(ifindex, &entries(p))?;
    if old != Some(want) {
        dp.set_endpoint(ifindex, &want)?;
    }
    Ok(diff)
}

/// How long a starting pod waits for the first complete policy state.
const SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

impl PodPolicy for Enforcer {
    fn pod_up(
        self: Arc<Self>,
        uid: String,
        pod: Pod,
        net: NetRecord,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        async move {
            let mut generation = self.hub.subscribe();
            let synced = async {
                while !self.hub.synced() {
                    if generation.changed().await.is_err() {
                        return Err("the policy state is gone".to_owned());
                    }
                }
                Ok(())
            };
            // Bounded, so a pod waiting for it shows why (and is retried)
            // instead of hanging in ContainerCreating without a status.
            tokio::time::timeout(SYNC_WAIT, synced)
                .await
                .map_err(|_| {
                    format!("no complete network policy state from the control after {SYNC_WAIT:?}")
                })??;
            tokio::task::spawn_blocking(move || self.add(&uid, pod, &net))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn pod_down(
        self: Arc<Self>,
        _uid: String,
        net: NetRecord,
    ) -> futures::future::BoxFuture<'static, Result<(), String>> {
        async move {
            tokio::task::spawn_blocking(move || self.remove(&net))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        }
        .boxed()
    }
}

/// Keeps the dataplane equal to the compiled policy until `cancel`: waits
/// for a complete list, takes over the adopted pods, then reconciles on
/// every hub or endpoint change.
pub async fn run(
    enf: Arc<Enforcer>,
    mgr: Manager,
    fresh: Arc<FreshPods>,
    cancel: CancellationToken,
) {
    let mut generation = enf.hub.subscribe();
    while !enf.hub.synced() {
        tokio::select! {
            () = cancel.cancelled() => return,
            r = generation.changed() => if r.is_err() { return },
        }
    }
    let pods = mgr.pod_nets();
    let e = enf.clone();
    let _ = tokio::task::spawn_blocking(move || e.adopt(pods)).await;
    loop {
        let seen = *generation.borrow_and_update();
        let started = Instant::now();
        let (e, f) = (enf.clone(), fresh.clone());
        match tokio::task::spawn_blocking(move || e.reconcile(&*f)).await {
            Ok(Ok(r)) if r != Report::default() => {
                tracing::info!(generation = seen, took = ?started.elapsed(), ?r, "network policy programmed");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, retry_in = ?RETRY, "cannot program network policy");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
            Err(e) => tracing::error!(error = %e, "network policy reconcile panicked"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            r = generation.changed() => if r.is_err() { return },
            () = enf.kick.notified() => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::policy::{IpEntry, Labels};

    fn pod(ns: &str, name: &str, identity: u32) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"pod": name},
                "annotations": {"weir.io/identity": identity.to_string()}},
            "spec": {"containers": [{"name": "c"}]},
        }))
        .unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        Cidr::parse_masked(s).unwrap()
    }

    /// An `except` naming a pod's own address keeps its CIDR slot next to
    /// the pod's identity (else the address would fall in the enclosing
    /// block and be allowed); the local pod's /32 is there before the
    /// control sends it; the fresh pod object wins over the one it
    /// started with.
    #[test]
    fn plan_keeps_except_slots_on_pod_addresses_and_local_pods() {
        let mut d = PolicyData::default();
        d.test_namespace("x", &[]);
        let other: Ipv4Addr = "10.244.1.5".parse().unwrap();
        d.test_ip(
            other,
            IpEntry {
                identity: 300,
                namespace: "y".into(),
                pod: "b".into(),
                node: "n2".into(),
                named_ports: Vec::new(),
            },
        );
        d.test_identity(300, "y", &Labels::from([("pod".into(), "b".into())]));
        d.test_policy(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "cidr", "namespace": "x"},
                "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16",
                        "except": ["10.244.1.5/32"]}}]}]},
            }))
            .unwrap(),
        );
        let local = Local {
            uid: "u1".into(),
            iface: "veth1".into(),
            ip: "10.244.2.9".parse().unwrap(),
            pod: pod("x", "a", 400),
        };
        let (slots, compiled) = plan(&d, &[(7, local, Some(pod("x", "a", 401)))]);
        let except = d.cidr_ids()[&cidr("10.244.1.5/32")];
        let block = d.cidr_ids()[&cidr("10.244.0.0/16")];
        for want in [
            (cidr("10.244.1.5/32"), 300),
            (cidr("10.244.1.5/32"), except),
            (cidr("10.244.0.0/16"), block),
            (cidr("10.244.2.9/32"), 401),
        ] {
            assert!(slots.contains(&want), "{want:?} missing from {slots:?}");
        }
        assert!(!slots.contains(&(cidr("10.244.2.9/32"), 400)));
        let [(ifindex, ip, identity, pol)] = compiled.as_slice() else {
            panic!("one endpoint: {compiled:?}");
        };
        assert_eq!(
            (*ifindex, ip.to_string(), *identity),
            (7, "10.244.2.9".into(), 401)
        );
        assert!(pol.ingress_enforced && !pol.egress_enforced);
        let peers: BTreeSet<u32> = entries(pol).iter().map(|e| e.peer).collect();
        assert!(peers.contains(&block), "{peers:?}");
        assert!(
            !peers.contains(&except) && !peers.contains(&300),
            "{peers:?}"
        );
        assert!(
            entries(pol)
                .iter()
                .any(|e| e.rule == crate::control::policy::rules::HOST_RULE)
        );
    }
}
