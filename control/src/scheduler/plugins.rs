//! Filter and score plugins, as pure functions of the cache and the pod
//! (kube-scheduler's framework, minus the plugin registry): a pre-filter
//! pass computes what inter-pod affinity needs once per pod, filters say
//! whether a node can take the pod (and why not), scores rank the feasible
//! nodes 0-100 per plugin, combined by the configured weights.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::{PodAffinityTerm, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::Weights;
use super::cache::{Cache, NodeState};
use super::model::{NodeInfo, PodInfo, Readiness};
use crate::matching;

/// The taint a cordoned node is treated as having.
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
/// The taint a `Ready=False` node is treated as having.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// The taint a node with `Ready=Unknown` (or no condition) is treated as having.
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// The label whose topology is one node.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Which taint a pod did not tolerate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintRef {
    /// `spec.taints[i]` of the node.
    Node(usize),
    /// The implicit `node.kubernetes.io/not-ready:NoSchedule`.
    NotReady,
    /// The implicit `node.kubernetes.io/unreachable:NoSchedule`.
    Unreachable,
}

/// Why a node cannot take a pod (the first failing filter's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Cordoned, and the pod does not tolerate it.
    Unschedulable,
    /// A `NoSchedule`/`NoExecute` taint the pod does not tolerate.
    Taint(TaintRef),
    /// `nodeSelector` or required node affinity.
    NodeAffinity,
    /// A host port is taken.
    Ports,
    /// Not enough of some resources.
    Insufficient {
        /// Cpu.
        cpu: bool,
        /// Memory.
        memory: bool,
        /// Pod count.
        pods: bool,
    },
    /// No pod on the node's topology matches a required affinity term.
    PodAffinity,
    /// A pod matching a required anti-affinity term is on the topology.
    PodAntiAffinity,
    /// A placed pod's required anti-affinity term matches this pod.
    ExistingAntiAffinity,
}

impl Reason {
    /// Whether evicting pods could cure it (preemption candidates).
    pub fn resolvable(self) -> bool {
        matches!(
            self,
            Self::Ports
                | Self::Insufficient { .. }
                | Self::PodAntiAffinity
                | Self::ExistingAntiAffinity
        )
    }

    /// The reasons in kube-scheduler's wording.
    pub fn texts(self, node: &NodeInfo, out: &mut Vec<String>) {
        match self {
            Self::Unschedulable => out.push("node(s) were unschedulable".to_owned()),
            Self::Taint(t) => {
                let (key, value) = match t {
                    TaintRef::Node(i) => node.taints.get(i).map_or(("", ""), |t| {
                        (t.key.as_str(), t.value.as_deref().unwrap_or(""))
                    }),
                    TaintRef::NotReady => (TAINT_NOT_READY, ""),
                    TaintRef::Unreachable => (TAINT_UNREACHABLE, ""),
                };
                out.push(format!("node(s) had untolerated taint {{{key}: {value}}}"));
            }
            Self::NodeAffinity => {
                out.push("node(s) didn't match Pod's node affinity/selector".to_owned());
            }
            Self::Ports => {
                out.push("node(s) didn't have free ports for the requested pod ports".to_owned());
            }
            Self::Insufficient { cpu, memory, pods } => {
                if pods {
                    out.push("Too many pods".to_owned());
                }
                if cpu {
                    out.push("Insufficient cpu".to_owned());
                }
                if memory {
                    out.push("Insufficient memory".to_owned());
                }
            }
            Self::PodAffinity => out.push("node(s) didn't match pod affinity rules".to_owned()),
            Self::PodAntiAffinity => {
                out.push("node(s) didn't match pod anti-affinity rules".to_owned());
            }
            Self::ExistingAntiAffinity => {
                out.push("node(s) didn't satisfy existing pods anti-affinity rules".to_owned());
            }
        }
    }
}

/// `"0/3 nodes are available: 1 node(s) had untolerated taint {k: v}, 2 Insufficient cpu."`:
/// a histogram of `reasons`, sorted as kube-scheduler sorts it (as strings).
pub fn fit_message(total_nodes: usize, reasons: impl IntoIterator<Item = String>) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in reasons {
        *counts.entry(r).or_default() += 1;
    }
    let mut lines: Vec<String> = counts
        .into_iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect();
    lines.sort();
    if lines.is_empty() {
        format!("0/{total_nodes} nodes are available.")
    } else {
        format!("0/{total_nodes} nodes are available: {}.", lines.join(", "))
    }
}

fn tolerated(pod: &PodInfo, key: &str, value: &str, effect: &str) -> bool {
    pod.tolerations
        .iter()
        .any(|t| matching::tolerates(t, key, value, effect))
}

fn taint_tolerated(pod: &PodInfo, taint: &Taint) -> bool {
    pod.tolerations
        .iter()
        .any(|t| matching::tolerates_taint(t, taint))
}

/// `nodeSelector` and required node affinity.
fn node_affinity_matches(pod: &PodInfo, node: &NodeInfo) -> bool {
    matching::node_selected(
        Some(&pod.node_selector),
        pod.affinity.as_ref(),
        &node.name,
        &node.labels,
    )
}

/// A pod affinity term resolved against the pod that carries it.
#[derive(Debug, Clone)]
pub struct Term {
    topology_key: String,
    /// `None`: every namespace.
    namespaces: Option<HashSet<String>>,
    selector: Option<LabelSelector>,
    weight: i64,
}

impl Term {
    fn new(term: &PodAffinityTerm, owner_ns: &str, weight: i64) -> Self {
        let all = term.namespace_selector.as_ref().is_some_and(|s| {
            s.match_labels
                .as_ref()
                .is_none_or(std::collections::BTreeMap::is_empty)
                && s.match_expressions.as_ref().is_none_or(Vec::is_empty)
        });
        let namespaces = if all {
            None
        } else {
            let mut set: HashSet<String> = term.namespaces.iter().flatten().cloned().collect();
            if set.is_empty() {
                set.insert(owner_ns.to_owned());
            }
            Some(set)
        };
        Self {
            topology_key: term.topology_key.clone(),
            namespaces,
            selector: term.label_selector.clone(),
            weight,
        }
    }

    /// Whether `pod` is one this term selects.
    pub fn matches(&self, pod: &PodInfo) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|n| n.contains(&pod.namespace))
            && self
                .selector
                .as_ref()
                .is_some_and(|s| matching::selector_matches(s, &pod.labels))
    }
}

fn required_terms(pod: &PodInfo, anti: bool) -> Vec<Term> {
    let Some(a) = &pod.affinity else {
        return Vec::new();
    };
    let terms = if anti {
        a.pod_anti_affinity.as_ref().and_then(|p| {
            p.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    } else {
        a.pod_affinity.as_ref().and_then(|p| {
            p.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    };
    terms
        .iter()
        .flat_map(|t| t.iter())
        .map(|t| Term::new(t, &pod.namespace, 0))
        .collect()
}

fn preferred_terms(pod: &PodInfo) -> Vec<Term> {
    let Some(a) = &pod.affinity else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(p) = a.pod_affinity.as_ref().and_then(|p| {
        p.preferred_during_scheduling_ignored_during_execution
            .as_ref()
    }) {
        out.extend(
            p.iter()
                .map(|w| Term::new(&w.pod_affinity_term, &pod.namespace, i64::from(w.weight))),
        );
    }
    if let Some(p) = a.pod_anti_affinity.as_ref().and_then(|p| {
        p.preferred_during_scheduling_ignored_during_execution
            .as_ref()
    }) {
        out.extend(
            p.iter()
                .map(|w| Term::new(&w.pod_affinity_term, &pod.namespace, -i64::from(w.weight))),
        );
    }
    out
}

/// What the filters and scores need about one pod, computed once per
/// scheduling attempt (kube-scheduler's `PreFilter`/`PreScore` state).
#[derive(Debug, Default)]
pub struct PodContext {
    affinity: Vec<Term>,
    /// Per affinity term: topology values holding a matching pod.
    affinity_domains: Vec<HashSet<String>>,
    /// No pod matches the affinity terms anywhere but the pod matches them
    /// itself: the first pod of a group may go anywhere.
    affinity_bootstrap: bool,
    anti: Vec<Term>,
    anti_domains: Vec<HashSet<String>>,
    /// `(topology key, value)` pairs placed pods' anti-affinity forbids.
    existing_anti: Vec<(String, String)>,
    preferred: Vec<Term>,
    /// Per preferred term: topology value → matching pods there.
    preferred_counts: Vec<HashMap<String, i64>>,
}

impl PodContext {
    /// The pre-filter pass for `pod`. Walks every placed pod only if the
    /// pod has inter-pod affinity terms (otherwise only the pods with
    /// required anti-affinity).
    pub fn new(pod: &PodInfo, cache: &Cache) -> Self {
        let mut ctx = Self::default();
        let nodes = cache.nodes();
        for (other, node) in cache.anti_affinity_pods() {
            let Some(info) = &nodes[node].info else {
                continue;
            };
            for term in required_terms(other, true) {
                if term.matches(pod)
                    && let Some(v) = info.labels.get(&term.topology_key)
                {
                    ctx.existing_anti
                        .push((term.topology_key.clone(), v.clone()));
                }
            }
        }
        if pod.affinity.is_none() {
            return ctx;
        }
        ctx.affinity = required_terms(pod, false);
        ctx.anti = required_terms(pod, true);
        ctx.preferred = preferred_terms(pod);
        if ctx.affinity.is_empty() && ctx.anti.is_empty() && ctx.preferred.is_empty() {
            return ctx;
        }
        ctx.affinity_domains = vec![HashSet::new(); ctx.affinity.len()];
        ctx.anti_domains = vec![HashSet::new(); ctx.anti.len()];
        ctx.preferred_counts = vec![HashMap::new(); ctx.preferred.len()];
        let mut any_affinity_match = false;
        for entry in cache.pods() {
            let Some(node) = entry.node else { continue };
            let Some(info) = &nodes[node].info else {
                continue;
            };
            if entry.info.key == pod.key {
                continue;
            }
            let other = &entry.info;
            for (term, domains) in ctx.affinity.iter().zip(&mut ctx.affinity_domains) {
                if term.matches(other) {
                    any_affinity_match = true;
                    if let Some(v) = info.labels.get(&term.topology_key) {
                        domains.insert(v.clone());
                    }
                }
            }
            for (term, domains) in ctx.anti.iter().zip(&mut ctx.anti_domains) {
                if term.matches(other)
                    && let Some(v) = info.labels.get(&term.topology_key)
                {
                    domains.insert(v.clone());
                }
            }
            for (term, counts) in ctx.preferred.iter().zip(&mut ctx.preferred_counts) {
                if term.matches(other)
                    && let Some(v) = info.labels.get(&term.topology_key)
                {
                    *counts.entry(v.clone()).or_default() += 1;
                }
            }
        }
        ctx.affinity_bootstrap = !ctx.affinity.is_empty()
            && !any_affinity_match
            && ctx.affinity.iter().all(|t| t.matches(pod));
        ctx
    }

    /// Whether the pod has required anti-affinity (preemption re-checks it
    /// per node).
    pub fn anti_terms(&self) -> &[Term] {
        &self.anti
    }
}

/// The implicit readiness taint of a node that is not Ready, unless the
/// node already carries that taint.
fn readiness_taint(node: &NodeInfo) -> Option<TaintRef> {
    let (key, r) = match node.readiness {
        Readiness::Ready => return None,
        Readiness::NotReady => (TAINT_NOT_READY, TaintRef::NotReady),
        Readiness::Unknown => (TAINT_UNREACHABLE, TaintRef::Unreachable),
    };
    (!node
        .taints
        .iter()
        .any(|t| t.key == key && t.effect == "NoSchedule"))
    .then_some(r)
}

/// Runs the filters in kube-scheduler's order (`NodeUnschedulable`,
/// `TaintToleration`, `NodeAffinity`, `NodePorts`, `NodeResourcesFit`,
/// `InterPodAffinity`) and returns the first failure.
pub fn filter(ctx: &PodContext, pod: &PodInfo, node: &NodeState) -> Result<(), Reason> {
    let Some(info) = &node.info else {
        return Err(Reason::NodeAffinity);
    };
    if info.unschedulable && !tolerated(pod, TAINT_UNSCHEDULABLE, "", "NoSchedule") {
        return Err(Reason::Unschedulable);
    }
    for (i, taint) in info.taints.iter().enumerate() {
        if (taint.effect == "NoSchedule" || taint.effect == "NoExecute")
            && !taint_tolerated(pod, taint)
        {
            return Err(Reason::Taint(TaintRef::Node(i)));
        }
    }
    if let Some(r) = readiness_taint(info) {
        let key = if r == TaintRef::NotReady {
            TAINT_NOT_READY
        } else {
            TAINT_UNREACHABLE
        };
        if !tolerated(pod, key, "", "NoSchedule") {
            return Err(Reason::Taint(r));
        }
    }
    if !node_affinity_matches(pod, info) {
        return Err(Reason::NodeAffinity);
    }
    if pod
        .host_ports
        .iter()
        .any(|p| node.ports.iter().any(|q| p.conflicts(q)))
    {
        return Err(Reason::Ports);
    }
    fits_resources(pod, node, info)?;
    pod_affinity(ctx, info)
}

fn fits_resources(pod: &PodInfo, node: &NodeState, info: &NodeInfo) -> Result<(), Reason> {
    let alloc = &info.allocatable;
    let pods = i64::try_from(node.pods.len()).unwrap_or(i64::MAX) + 1 > alloc.pods;
    let cpu = pod.requests.milli_cpu > 0
        && pod.requests.milli_cpu > alloc.milli_cpu - node.requested.milli_cpu;
    let memory =
        pod.requests.memory > 0 && pod.requests.memory > alloc.memory - node.requested.memory;
    if pods || cpu || memory {
        Err(Reason::Insufficient { cpu, memory, pods })
    } else {
        Ok(())
    }
}

fn pod_affinity(ctx: &PodContext, info: &NodeInfo) -> Result<(), Reason> {
    if !ctx.affinity_bootstrap {
        for (term, domains) in ctx.affinity.iter().zip(&ctx.affinity_domains) {
            if !info
                .labels
                .get(&term.topology_key)
                .is_some_and(|v| domains.contains(v))
            {
                return Err(Reason::PodAffinity);
            }
        }
    } else if ctx
        .affinity
        .iter()
        .any(|t| !info.labels.contains_key(&t.topology_key))
    {
        return Err(Reason::PodAffinity);
    }
    for (term, domains) in ctx.anti.iter().zip(&ctx.anti_domains) {
        if info
            .labels
            .get(&term.topology_key)
            .is_some_and(|v| domains.contains(v))
        {
            return Err(Reason::PodAntiAffinity);
        }
    }
    if ctx
        .existing_anti
        .iter()
        .any(|(k, v)| info.labels.get(k) == Some(v))
    {
        return Err(Reason::ExistingAntiAffinity);
    }
    Ok(())
}

/// Whether the pod would fit on `node` as it is (used by preemption on a
/// node with victims removed): resources, ports, and anti-affinity within
/// the node (hostname topology) both ways.
pub fn fits_on(ctx: &PodContext, pod: &PodInfo, node: &NodeState) -> bool {
    let Some(info) = &node.info else { return false };
    if pod
        .host_ports
        .iter()
        .any(|p| node.ports.iter().any(|q| p.conflicts(q)))
    {
        return false;
    }
    if fits_resources(pod, node, info).is_err() {
        return false;
    }
    let local = |t: &Term| t.topology_key == HOSTNAME_LABEL;
    for term in ctx.anti_terms().iter().filter(|t| local(t)) {
        if node
            .pods
            .values()
            .any(|p| p.key != pod.key && term.matches(p))
        {
            return false;
        }
    }
    for other in node
        .pods
        .values()
        .filter(|p| p.has_required_anti_affinity())
    {
        if required_terms(other, true)
            .iter()
            .any(|t| local(t) && t.matches(pod))
        {
            return false;
        }
    }
    true
}

/// Reusable buffers for scoring, so a pod costs no allocation per node.
#[derive(Debug, Default)]
pub struct ScoreScratch {
    raw: Vec<i64>,
    /// The weighted total per feasible node, filled by [`score`].
    pub total: Vec<i64>,
}

fn fraction(requested: i64, allocatable: i64) -> f64 {
    if allocatable <= 0 {
        return 1.0;
    }
    #[expect(
        clippy::cast_precision_loss,
        reason = "resource amounts are far below 2^52"
    )]
    let f = requested as f64 / allocatable as f64;
    f.min(1.0)
}

#[expect(clippy::cast_possible_truncation, reason = "a score in 0..=100")]
fn pct(f: f64) -> i64 {
    (f * 100.0).round() as i64
}

fn least_allocated(req: i64, alloc: i64) -> i64 {
    if alloc <= 0 || req > alloc {
        0
    } else {
        (alloc - req) * 100 / alloc
    }
}

/// Scores the `feasible` node slots for `pod`; fills `scratch.total` with
/// one weighted sum per node (in `feasible`'s order).
pub fn score(
    ctx: &PodContext,
    pod: &PodInfo,
    nodes: &[NodeState],
    feasible: &[usize],
    weights: &Weights,
    scratch: &mut ScoreScratch,
) {
    scratch.total.clear();
    scratch.total.resize(feasible.len(), 0);
    let info = |i: usize| nodes[i].info.as_deref();
    // Resource scores (already 0-100, no normalisation).
    if weights.least_allocated != 0
        || weights.most_allocated != 0
        || weights.balanced_allocation != 0
    {
        for (slot, &i) in scratch.total.iter_mut().zip(feasible) {
            let Some(n) = info(i) else { continue };
            let cpu = nodes[i].nonzero.milli_cpu + pod.nonzero.milli_cpu;
            let mem = nodes[i].nonzero.memory + pod.nonzero.memory;
            let (a_cpu, a_mem) = (n.allocatable.milli_cpu, n.allocatable.memory);
            if weights.least_allocated != 0 {
                let s = i64::midpoint(least_allocated(cpu, a_cpu), least_allocated(mem, a_mem));
                *slot += weights.least_allocated * s;
            }
            let (f_cpu, f_mem) = (fraction(cpu, a_cpu), fraction(mem, a_mem));
            if weights.most_allocated != 0 {
                *slot += weights.most_allocated * i64::midpoint(pct(f_cpu), pct(f_mem));
            }
            if weights.balanced_allocation != 0 {
                let std = (f_cpu - f_mem).abs() / 2.0;
                *slot += weights.balanced_allocation * pct(1.0 - std);
            }
        }
    }
    // Spreading one owner's replicas: fewer of them on a node is better.
    if weights.selector_spread != 0
        && let Some(owner) = &pod.owner
    {
        fill_raw(scratch, feasible, |i| {
            i64::from(nodes[i].owners.get(owner).copied().unwrap_or(0))
        });
        add_normalised(scratch, weights.selector_spread, true);
    }
    // Preferred node affinity: sum of matching terms' weights.
    let preferred_nodes = pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .filter(|p| !p.is_empty());
    if weights.node_affinity != 0
        && let Some(terms) = preferred_nodes
    {
        fill_raw(scratch, feasible, |i| {
            info(i).map_or(0, |n| {
                terms
                    .iter()
                    .filter(|t| matching::node_term_matches(&t.preference, &n.name, &n.labels))
                    .map(|t| i64::from(t.weight))
                    .sum()
            })
        });
        add_normalised(scratch, weights.node_affinity, false);
    }
    // Preferred pod (anti-)affinity: + or - weight per matching pod in the topology.
    if weights.pod_affinity != 0 && !ctx.preferred.is_empty() {
        fill_raw(scratch, feasible, |i| {
            info(i).map_or(0, |n| {
                ctx.preferred
                    .iter()
                    .zip(&ctx.preferred_counts)
                    .map(|(t, counts)| {
                        n.labels
                            .get(&t.topology_key)
                            .and_then(|v| counts.get(v))
                            .map_or(0, |c| c * t.weight)
                    })
                    .sum()
            })
        });
        add_min_max(scratch, weights.pod_affinity);
    }
    // PreferNoSchedule taints the pod does not tolerate: fewer is better.
    if weights.taint_toleration != 0 {
        fill_raw(scratch, feasible, |i| {
            info(i).map_or(0, |n| {
                let count = n
                    .taints
                    .iter()
                    .filter(|t| t.effect == "PreferNoSchedule" && !taint_tolerated(pod, t))
                    .count();
                i64::try_from(count).unwrap_or(i64::MAX)
            })
        });
        add_normalised(scratch, weights.taint_toleration, true);
    }
}

fn fill_raw(scratch: &mut ScoreScratch, feasible: &[usize], f: impl Fn(usize) -> i64) {
    scratch.raw.clear();
    scratch.raw.extend(feasible.iter().map(|&i| f(i)));
}

/// Adds `weight * raw * 100 / max` (or its reverse, `100 - …`, when fewer
/// is better) to the totals.
fn add_normalised(scratch: &mut ScoreScratch, weight: i64, reverse: bool) {
    let max = scratch.raw.iter().copied().max().unwrap_or(0);
    for (total, &raw) in scratch.total.iter_mut().zip(&scratch.raw) {
        let s = if max <= 0 {
            if reverse { 100 } else { 0 }
        } else {
            raw * 100 / max
        };
        *total += weight * if reverse && max > 0 { 100 - s } else { s };
    }
}

/// Adds `weight * (raw - min) * 100 / (max - min)` (scores that may be negative).
fn add_min_max(scratch: &mut ScoreScratch, weight: i64) {
    let max = scratch.raw.iter().copied().max().unwrap_or(0);
    let min = scratch.raw.iter().copied().min().unwrap_or(0);
    if max == min {
        return;
    }
    for (total, &raw) in scratch.total.iter_mut().zip(&scratch.raw) {
        *total += weight * (raw - min) * 100 / (max - min);
    }
}

/// How many feasible nodes to find before scoring (kube-scheduler's
/// `numFeasibleNodesToFind`): all of them below 100 nodes; otherwise
/// `percentage`% of them (0: adaptive, 50% minus 1% per 125 nodes, at
/// least 5%), and never fewer than 100.
pub fn nodes_to_find(all: usize, percentage: u32) -> usize {
    const MIN_NODES: usize = 100;
    if all < MIN_NODES {
        return all;
    }
    let pct = if percentage == 0 {
        50usize.saturating_sub(all / 125).max(5)
    } else {
        usize::try_from(percentage.min(100)).unwrap_or(100)
    };
    (all * pct / 100).max(MIN_NODES)
}
