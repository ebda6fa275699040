//! One scheduling decision, without I/O: filter the nodes (a rotating
//! sample of them on large clusters), score the feasible ones, pick the
//! best; or, when none fits, say why and look for pods to preempt.

use std::sync::Arc;

use super::Config;
use super::cache::{Cache, NodeState};
use super::model::PodInfo;
use super::plugins::{self, PodContext, Reason, ScoreScratch};

/// A node to preempt pods on.
#[derive(Debug, Clone)]
pub struct Preemption {
    /// The node's name.
    pub node_name: String,
    /// The pods to evict (all of strictly lower priority).
    pub victims: Vec<Arc<PodInfo>>,
}

/// What to do with a pod.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Bind it to this node slot.
    Bind(usize),
    /// It fits nowhere.
    Unschedulable {
        /// `0/N nodes are available: …` (plus the preemption outcome).
        message: String,
        /// Pods to evict to make room, if preemption found some.
        preemption: Option<Preemption>,
    },
}

/// The scheduler's state that decisions read and update.
#[derive(Debug)]
pub struct Core {
    /// Nodes and pods.
    pub cache: Cache,
    /// Weights and knobs.
    pub config: Config,
    next_start: usize,
    rng: u64,
    feasible: Vec<usize>,
    failed: Vec<(usize, Reason)>,
    scratch: ScoreScratch,
}

impl Core {
    /// A core with an empty cache.
    pub fn new(config: Config) -> Self {
        Self {
            cache: Cache::new(),
            config,
            next_start: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            feasible: Vec::new(),
            failed: Vec::new(),
            scratch: ScoreScratch::default(),
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64: tie-breaking only.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Decides where `pod` goes. Does not assume it: the caller does (with
    /// [`Cache::assume`]) once it commits to the bind.
    pub fn schedule(&mut self, pod: &PodInfo) -> Decision {
        let total = self.cache.live_nodes();
        if total == 0 {
            return Decision::Unschedulable {
                message: "no nodes available to schedule pods".to_owned(),
                preemption: None,
            };
        }
        let ctx = PodContext::new(pod, &self.cache);
        let want = plugins::nodes_to_find(total, self.config.percentage_of_nodes_to_score);
        self.find_feasible(&ctx, pod, want);
        if self.feasible.is_empty() {
            return self.unschedulable(&ctx, pod, total);
        }
        let nodes = self.cache.nodes();
        plugins::score(
            &ctx,
            pod,
            nodes,
            &self.feasible,
            &self.config.weights,
            &mut self.scratch,
        );
        let mut best = 0;
        let mut ties = 0u64;
        for i in 0..self.feasible.len() {
            let (s, b) = (self.scratch.total[i], self.scratch.total[best]);
            if i == 0 || s > b {
                best = i;
                ties = 1;
            } else if s == b {
                ties += 1;
                if self.random().is_multiple_of(ties) {
                    best = i;
                }
            }
        }
        Decision::Bind(self.feasible[best])
    }

    /// Filters nodes from the rotating start until `want` fit (or all were
    /// seen), filling `self.feasible` and `self.failed`.
    fn find_feasible(&mut self, ctx: &PodContext, pod: &PodInfo, want: usize) {
        self.feasible.clear();
        self.failed.clear();
        let nodes = self.cache.nodes();
        let slots = nodes.len();
        if slots == 0 {
            return;
        }
        let start = self.next_start % slots;
        let mut seen = 0;
        for step in 0..slots {
            let i = (start + step) % slots;
            let node = &nodes[i];
            if node.info.is_none() {
                continue;
            }
            seen = step + 1;
            match plugins::filter(ctx, pod, node) {
                Ok(()) => {
                    self.feasible.push(i);
                    if self.feasible.len() >= want {
                        break;
                    }
                }
                Err(r) => self.failed.push((i, r)),
            }
        }
        self.next_start = (start + seen) % slots;
    }

    fn unschedulable(&mut self, ctx: &PodContext, pod: &PodInfo, total: usize) -> Decision {
        let nodes = self.cache.nodes();
        let mut texts = Vec::new();
        for (i, reason) in &self.failed {
            if let Some(info) = &nodes[*i].info {
                reason.texts(info, &mut texts);
            }
        }
        let mut message = plugins::fit_message(total, texts);
        let (preemption, post) = self.preempt(ctx, pod, total);
        if let Some(post) = post {
            message.push_str(" preemption: ");
            message.push_str(&post);
        }
        Decision::Unschedulable {
            message,
            preemption,
        }
    }

    /// Kubernetes' `DefaultPreemption`: among nodes where only resolvable
    /// filters failed, the one where evicting strictly lower-priority pods
    /// lets the pod fit with the least harm: lowest highest-victim
    /// priority, then lowest priority sum, then fewest victims. Victims are
    /// chosen by removing all lower-priority pods and giving back the most
    /// important ones while the pod still fits.
    fn preempt(
        &self,
        ctx: &PodContext,
        pod: &PodInfo,
        total: usize,
    ) -> (Option<Preemption>, Option<String>) {
        if pod.never_preempt {
            return (
                None,
                Some("not eligible due to preemptionPolicy=Never.".to_owned()),
            );
        }
        let nodes = self.cache.nodes();
        if let Some(nominated) = pod
            .nominated_node
            .as_deref()
            .and_then(|n| self.cache.node_index(n))
            && nodes[nominated]
                .pods
                .values()
                .any(|p| p.deleting && p.priority < pod.priority)
        {
            return (
                None,
                Some("not eligible due to a terminating pod on the nominated node.".to_owned()),
            );
        }
        let mut best: Option<(Preemption, (i32, i64, usize))> = None;
        let mut texts = Vec::new();
        for (i, reason) in &self.failed {
            if !reason.resolvable() {
                texts.push("Preemption is not helpful for scheduling".to_owned());
                continue;
            }
            match victims_on(ctx, pod, &nodes[*i]) {
                Some(victims) if !victims.is_empty() => {
                    let rank = (
                        victims.iter().map(|v| v.priority).max().unwrap_or(i32::MIN),
                        victims.iter().map(|v| i64::from(v.priority)).sum::<i64>(),
                        victims.len(),
                    );
                    if best.as_ref().is_none_or(|(_, r)| rank < *r) {
                        let candidate = Preemption {
                            node_name: nodes[*i].name().to_owned(),
                            victims,
                        };
                        best = Some((candidate, rank));
                    }
                }
                _ => texts.push("No preemption victims found for incoming pod".to_owned()),
            }
        }
        match best {
            Some((p, _)) => (Some(p), None),
            None => (None, Some(plugins::fit_message(total, texts))),
        }
    }
}

/// The fewest, least important pods to evict from `node` for `pod` to
/// fit, or `None` if even evicting every lower-priority pod is not enough.
pub fn victims_on(ctx: &PodContext, pod: &PodInfo, node: &NodeState) -> Option<Vec<Arc<PodInfo>>> {
    let mut candidates: Vec<Arc<PodInfo>> = node
        .pods
        .values()
        .filter(|p| p.priority < pod.priority && !p.deleting)
        .cloned()
        .collect();
    if candidates.is_empty() {
        return None;
    }
    // Most important first: they are the first given back.
    candidates.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.created.cmp(&b.created))
            .then_with(|| a.key.cmp(&b.key))
    });
    let mut sim = node.clone();
    for v in &candidates {
        sim.remove_pod(&v.key);
    }
    if !plugins::fits_on(ctx, pod, &sim) {
        return None;
    }
    let mut victims = Vec::new();
    for v in candidates {
        sim.add_pod(&v);
        if !plugins::fits_on(ctx, pod, &sim) {
            sim.remove_pod(&v.key);
            victims.push(v);
        }
    }
    Some(victims)
}
