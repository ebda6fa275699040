//! The scheduler: binds pending pods to nodes, in the style of
//! kube-scheduler's framework, with the decision logic (`decide`,
//! `plugins`, `queue`, `cache`) free of I/O and the I/O in `driver`.
//!
//! - **Informers**: List then Watch (from the list's revision) of Nodes and
//!   Pods through [`ObjectsApi`]; a compacted watch re-lists. Each event is
//!   decoded once into the few fields the plugins read.
//! - **Cache**: nodes (allocatable, labels, taints, cordon, readiness) and
//!   the pods placed on them. A pod counts against its node as soon as the
//!   scheduler *assumes* it, before the bind write returns.
//! - **Queue**: priority (higher first), then creation time. A pod that fits
//!   nowhere is parked as unschedulable and retried (after a 1-10 s backoff)
//!   when the cluster changes (a node added or changed in labels, taints,
//!   cordon, readiness or allocatable; a pod deleted or its node freed), and
//!   every [`Config::unschedulable_flush_seconds`].
//! - **Filters** (in kube-scheduler's order, the first failure per node
//!   counts): cordon (unless `node.kubernetes.io/unschedulable` is
//!   tolerated), `NoSchedule`/`NoExecute` taints (a not-Ready node has the
//!   implicit `node.kubernetes.io/not-ready` or `unreachable` `NoSchedule`
//!   taint), `nodeSelector` and required node affinity (`matchExpressions`
//!   on labels, `matchFields` on `metadata.name`), host ports, cpu/memory/pod
//!   count against allocatable minus what placed and assumed pods request,
//!   required pod affinity and anti-affinity (both ways).
//! - **Scores** (0-100 each, summed with [`Weights`]): least-allocated,
//!   most-allocated (bin packing, weight 0 by default), balanced
//!   allocation, spreading one owner's replicas, preferred node affinity,
//!   preferred pod (anti-)affinity, `PreferNoSchedule` taints.
//! - **Sampling**: on clusters of 100+ nodes, filtering stops once
//!   `percentageOfNodesToScore` of the nodes were found feasible (0 =
//!   adaptive as kube-scheduler: 50% minus 1% per 125 nodes, at least 5%,
//!   at least 100 nodes), starting each pod where the previous one stopped.
//!   So a pod costs O(sampled nodes), not O(nodes), when most nodes fit.
//! - **Preemption**: a pod that fits nowhere may evict strictly
//!   lower-priority pods from the node where that costs least (see
//!   `decide`); the victims are deleted gracefully with a `Preempted` event
//!   and the pod gets `status.nominatedNodeName`, then waits for them to go.
//!   Unlike kube-scheduler, the nominated node's freed room is not held for
//!   the preemptor against other pods (priority order mostly does that).
//! - **Binding**: up to [`Config::bind_concurrency`] binds in flight
//!   (`ObjectsApi::bind`, compare-and-swap of `spec.nodeName`), so the
//!   store group-commits them. A failed bind forgets the assumption and
//!   retries the pod after a backoff.
//! - **Reporting**: `PodScheduled=False`, reason `Unschedulable`, with
//!   kube-scheduler's message, and a `FailedScheduling` Warning event, both
//!   only when the message changes; a `Scheduled` event per bind
//!   ([`Config::record_scheduled_events`]).

#[cfg(test)]
mod bench;
mod cache;
mod decide;
mod driver;
mod model;
mod plugins;
mod quantity;
mod queue;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

pub use self::driver::{Stats, run, run_with_stats};

/// The component name on events and the default `spec.schedulerName`.
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// Score plugin weights (0 turns a plugin off). The defaults are
/// kube-scheduler's (`NodeResourcesFit` least-allocated 1,
/// `NodeResourcesBalancedAllocation` 1, `NodeAffinity` 2, `InterPodAffinity`
/// 2, `TaintToleration` 3, spreading 2).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Weights {
    /// Prefer nodes with the most free cpu/memory (spreading load).
    pub least_allocated: i64,
    /// Prefer the fullest nodes (bin packing).
    pub most_allocated: i64,
    /// Prefer nodes whose cpu and memory use stay balanced.
    pub balanced_allocation: i64,
    /// Prefer nodes with fewer pods of the same owner.
    pub selector_spread: i64,
    /// `preferredDuringSchedulingIgnoredDuringExecution` node affinity.
    pub node_affinity: i64,
    /// Preferred pod affinity and anti-affinity.
    pub pod_affinity: i64,
    /// Prefer nodes with fewer untolerated `PreferNoSchedule` taints.
    pub taint_toleration: i64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            least_allocated: 1,
            most_allocated: 0,
            balanced_allocation: 1,
            selector_spread: 2,
            node_affinity: 2,
            pod_affinity: 2,
            taint_toleration: 3,
        }
    }
}

/// The scheduler's configuration (`--scheduler-config <yaml>`; every field
/// optional, camelCase as in the YAML).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Config {
    /// Pods whose `spec.schedulerName` is this (or empty) are ours.
    pub scheduler_name: String,
    /// Score weights.
    pub weights: Weights,
    /// Share of nodes to find feasible before scoring, 1-100; 0: adaptive
    /// (see the module docs).
    pub percentage_of_nodes_to_score: u32,
    /// Bind writes in flight at once.
    pub bind_concurrency: usize,
    /// Whether each bind records a `Scheduled` event (one more write per pod).
    pub record_scheduled_events: bool,
    /// Unschedulable pods parked this long are retried even if nothing
    /// changed.
    pub unschedulable_flush_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            scheduler_name: SCHEDULER_NAME.to_owned(),
            weights: Weights::default(),
            percentage_of_nodes_to_score: 0,
            bind_concurrency: 256,
            record_scheduled_events: true,
            unschedulable_flush_seconds: 30,
        }
    }
}

impl Config {
    /// Parses a YAML configuration (unknown fields are refused).
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        let config: Self = serde_saphyr::from_str(text).context("scheduler config")?;
        config.check()?;
        Ok(config)
    }

    /// Reads [`Config::from_yaml`] from a file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read scheduler config {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks the ranges.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.percentage_of_nodes_to_score <= 100,
            "percentageOfNodesToScore: {} is not in 0..=100",
            self.percentage_of_nodes_to_score
        );
        anyhow::ensure!(
            self.bind_concurrency > 0,
            "bindConcurrency: must be at least 1"
        );
        anyhow::ensure!(
            self.unschedulable_flush_seconds > 0,
            "unschedulableFlushSeconds: must be at least 1"
        );
        let w = &self.weights;
        for (name, value) in [
            ("leastAllocated", w.least_allocated),
            ("mostAllocated", w.most_allocated),
            ("balancedAllocation", w.balanced_allocation),
            ("selectorSpread", w.selector_spread),
            ("nodeAffinity", w.node_affinity),
            ("podAffinity", w.pod_affinity),
            ("taintToleration", w.taint_toleration),
        ] {
            anyhow::ensure!(
                (0..=100).contains(&value),
                "weights.{name}: {value} is not in 0..=100"
            );
        }
        Ok(())
    }
}
