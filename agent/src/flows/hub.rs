//! The last flows, their subscribers and their counters.

use std::{
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::broadcast;
use weir_common::{DropReason, FlowRecord};

use super::{
    FlowCounters,
    record::{self, Flow, FlowFilter, Names, Verdict},
};

/// Pod IP → (namespace, pod).
pub type PodLookup = Box<dyn Fn(Ipv4Addr) -> Option<(String, String)> + Send + Sync>;
/// Rule number → `namespace/name` (or `host`).
pub type PolicyLookup = Box<dyn Fn(u32) -> Option<String> + Send + Sync>;
/// (endpoint ifindex, direction byte `DIR_INGRESS`/`DIR_EGRESS`) → the
/// policies (`namespace/name`) isolating that endpoint in that direction.
pub type IsolationLookup = Box<dyn Fn(u32, u8) -> Vec<String> + Send + Sync>;

/// The lookups that name what flow records only number.
pub struct Enricher {
    /// Pod IP → (namespace, pod), for the cluster's pods.
    pub pod_of: PodLookup,
    /// Policy rule number (as in the policy map) → `namespace/name` or `host`.
    pub policy_of: PolicyLookup,
}

impl Enricher {
    /// An enricher that names nothing.
    #[must_use]
    pub fn none() -> Self {
        Self {
            pod_of: Box::new(|_| None),
            policy_of: Box::new(|_| None),
        }
    }
}

/// Calls `count` with each `policy` label of a flow's verdict counter: the
/// allowing policy; for a policy denial each isolating policy
/// (`default-deny` if none is known); `none` otherwise. Borrows: no
/// allocation per flow.
fn for_each_policy_label(f: &Flow, mut count: impl FnMut(&str)) {
    if !f.policies.is_empty() {
        f.policies.iter().for_each(|p| count(p));
        return;
    }
    if let Some(p) = &f.policy {
        return count(p);
    }
    let denied_by_policy = matches!(
        f.drop_reason.as_deref(),
        Some(r) if r == DropReason::PolicyDeniedIngress.name() || r == DropReason::PolicyDeniedEgress.name()
    );
    count(if denied_by_policy {
        "default-deny"
    } else {
        "none"
    });
}

/// Flows per policy label, indexed by verdict ([`verdict_index`]).
type VerdictCounts = BTreeMap<String, [u64; 2]>;

fn verdict_index(v: Verdict) -> usize {
    match v {
        Verdict::Allowed => 0,
        Verdict::Denied => 1,
    }
}

struct Inner {
    /// The last flows, oldest first, with their sequence numbers.
    ring: VecDeque<(u64, Arc<Flow>)>,
    /// Sequence number of the next flow.
    next: u64,
    /// Flows by policy label and verdict, denials with their folded ones
    /// (looked up by `&str`: a label's `String` is made once).
    verdicts: VerdictCounts,
}

impl Inner {
    /// Counts, keeps (dropping the oldest beyond `capacity`) and numbers
    /// `flow`; returns its sequence number.
    fn push(&mut self, flow: Arc<Flow>, capacity: usize) -> u64 {
        let n = 1 + u64::from(flow.suppressed);
        let v = verdict_index(flow.verdict);
        let verdicts = &mut self.verdicts;
        for_each_policy_label(&flow, |label| {
            if let Some(c) = verdicts.get_mut(label) {
                c[v] += n;
            } else {
                let mut c = [0; 2];
                c[v] = n;
                verdicts.insert(label.to_owned(), c);
            }
        });
        let seq = self.next;
        self.next += 1;
        if self.ring.len() == capacity {
            self.ring.pop_front();
        }
        self.ring.push_back((seq, flow));
        seq
    }
}

/// The flows a node saw: the last `capacity` of them, a broadcast of new
/// ones, and counters for `/metrics`.
pub struct FlowHub {
    node: String,
    capacity: usize,
    enrich: Enricher,
    isolating_of: IsolationLookup,
    inner: Mutex<Inner>,
    tx: broadcast::Sender<(u64, Arc<Flow>)>,
    counters: Option<Mutex<FlowCounters>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    node: String,
    policy: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    node: String,
    reason: String,
}

impl FlowHub {
    /// A hub for node `node` keeping the last `capacity` flows.
    #[must_use]
    pub fn new(node: &str, capacity: usize, enrich: Enricher) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self {
            node: node.to_owned(),
            capacity: capacity.max(1),
            enrich,
            isolating_of: Box::new(|_, _| Vec::new()),
            inner: Mutex::new(Inner {
                ring: VecDeque::new(),
                next: 0,
                verdicts: BTreeMap::new(),
            }),
            tx,
            counters: None,
        }
    }

    /// Adds the programs' counters (drops, lost records) to the metrics.
    #[must_use]
    pub fn with_counters(mut self, counters: FlowCounters) -> Self {
        self.counters = Some(Mutex::new(counters));
        self
    }

    /// Names a policy denial by the policies isolating its endpoint (see
    /// [`IsolationLookup`]); without it denials are `default-deny`.
    #[must_use]
    pub fn with_isolation(mut self, lookup: IsolationLookup) -> Self {
        self.isolating_of = lookup;
        self
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn names(&self) -> Names<'_> {
        Names {
            pod_of: &*self.enrich.pod_of,
            policy_of: &*self.enrich.policy_of,
            isolating: &*self.isolating_of,
        }
    }

    /// Names, counts, keeps and broadcasts record `r`, seen at `wall_ns`
    /// (nanoseconds since the Unix epoch).
    pub fn ingest(&self, r: &FlowRecord, wall_ns: i128) -> Arc<Flow> {
        let flow = Arc::new(record::enrich(r, &self.node, wall_ns, &self.names()));
        let mut inner = self.inner();
        let seq = inner.push(flow.clone(), self.capacity);
        // No subscriber is fine.
        let _ = self.tx.send((seq, flow.clone()));
        flow
    }

    /// [`Self::ingest`] for a batch of records drained together, their
    /// times mapped from the monotonic clock by one [`record::Clock`]
    /// reading: names them outside the lock, then takes it once. Sends
    /// to the broadcast only while someone subscribes.
    pub fn ingest_batch(&self, records: &[FlowRecord]) {
        if records.is_empty() {
            return;
        }
        let clock = record::Clock::now();
        let names = self.names();
        let flows: Vec<Arc<Flow>> = records
            .iter()
            .map(|r| {
                Arc::new(record::enrich(
                    r,
                    &self.node,
                    clock.wall_ns(r.ts_ns),
                    &names,
                ))
            })
            .collect();
        let mut inner = self.inner();
        // Read under the lock: a follower subscribes before it reads the
        // kept flows (under the lock), so a flow is either kept before its
        // read or sent to it.
        let broadcast = self.tx.receiver_count() > 0;
        for flow in flows {
            if broadcast {
                let seq = inner.push(flow.clone(), self.capacity);
                // A subscriber gone since is fine.
                let _ = self.tx.send((seq, flow));
            } else {
                inner.push(flow, self.capacity);
            }
        }
    }

    /// The last `limit` kept flows passing `filter`, oldest first, and the
    /// sequence number after the newest kept one (to skip it when
    /// following a subscription taken before).
    pub fn recent(&self, filter: &FlowFilter, limit: usize) -> (Vec<Arc<Flow>>, u64) {
        let inner = self.inner();
        let mut out: Vec<Arc<Flow>> = inner
            .ring
            .iter()
            .rev()
            .filter(|(_, f)| filter.matches(f))
            .take(limit)
            .map(|(_, f)| f.clone())
            .collect();
        out.reverse();
        (out, inner.next)
    }

    /// New flows as they come, with their sequence numbers.
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Arc<Flow>)> {
        self.tx.subscribe()
    }

    /// Registers `weir_policy_verdicts_total`, and with the programs'
    /// counters `weir_policy_drops_total` and `weir_flow_records_lost_total`.
    pub fn register_metrics(&self, reg: &mut Registry) {
        let verdicts = Family::<VerdictLabels, Counter>::default();
        for (policy, counts) in &self.inner().verdicts {
            for verdict in [Verdict::Allowed, Verdict::Denied] {
                let n = counts[verdict_index(verdict)];
                if n == 0 {
                    continue;
                }
                verdicts
                    .get_or_create(&VerdictLabels {
                        node: self.node.clone(),
                        policy: policy.clone(),
                        verdict: verdict.name().to_owned(),
                    })
                    .inc_by(n);
            }
        }
        reg.register(
            "weir_policy_verdicts",
            "Flows by policy and verdict, from the flow records (denials with the ones aggregated into them): allowed by the policy that allowed them; denied by policy once per policy isolating the endpoint (default-deny: not known); none: nothing enforced",
            verdicts,
        );
        let Some(counters) = &self.counters else {
            return;
        };
        let counters = counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.register_counters(reg, &counters);
    }

    fn register_counters(&self, reg: &mut Registry, counters: &FlowCounters) {
        let labels = |reason: &str| ReasonLabels {
            node: self.node.clone(),
            reason: reason.to_owned(),
        };
        match counters.drops() {
            Ok(drops) => {
                let fam = Family::<ReasonLabels, Counter>::default();
                for (r, n) in drops {
                    fam.get_or_create(&labels(r.name())).inc_by(n);
                }
                reg.register(
                    "weir_policy_drops",
                    "Packets the network policy programs dropped, by reason",
                    fam,
                );
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the policy drop counters"),
        }
        match counters.lost() {
            Ok(lost) => {
                let fam = Family::<ReasonLabels, Counter>::default();
                for (reason, n) in [
                    ("aggregated", lost.aggregated),
                    ("rate_limited", lost.rate_limited),
                    ("ring_full", lost.ring_full),
                ] {
                    fam.get_or_create(&labels(reason)).inc_by(n);
                }
                reg.register(
                    "weir_flow_records_lost",
                    "Flow records not written: aggregated (a denial folded into its key's next record), rate_limited (token bucket), ring_full (reader behind)",
                    fam,
                );
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the flow record counters"),
        }
    }

    /// The hub's metrics alone, in the text exposition format.
    #[must_use]
    pub fn render_metrics(&self) -> String {
        let mut reg = Registry::default();
        self.register_metrics(&mut reg);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_common::{DIR_INGRESS, FLOW_VERDICT_ALLOWED, FLOW_VERDICT_DENIED, PROTO_TCP};

    fn rec(verdict: u8, reason: u8, rule: u32, dport: u16, suppressed: u32) -> FlowRecord {
        FlowRecord {
            saddr: u32::from(Ipv4Addr::new(10, 244, 2, 9)).to_be(),
            daddr: u32::from(Ipv4Addr::new(10, 244, 1, 5)).to_be(),
            sport: 5555u16.to_be(),
            dport: dport.to_be(),
            proto: PROTO_TCP,
            dir: DIR_INGRESS,
            verdict,
            reason,
            rule,
            suppressed,
            ..FlowRecord::default()
        }
    }

    fn hub(capacity: usize) -> FlowHub {
        FlowHub::new(
            "n1",
            capacity,
            Enricher {
                pod_of: Box::new(|ip| {
                    (ip == Ipv4Addr::new(10, 244, 1, 5)).then(|| ("x".into(), "a".into()))
                }),
                policy_of: Box::new(|r| (r == 1).then(|| "x/web".into())),
            },
        )
    }

    #[test]
    fn keeps_the_last_flows_and_filters_them() {
        let h = hub(3);
        for port in [1, 2, 3, 4] {
            h.ingest(&rec(FLOW_VERDICT_ALLOWED, 0, 1, port, 0), 0);
        }
        h.ingest(&rec(FLOW_VERDICT_DENIED, 1, 0, 9, 0), 0);
        let (all, next) = h.recent(&FlowFilter::default(), 100);
        let ports: Vec<u16> = all.iter().map(|f| f.destination.port).collect();
        assert_eq!(ports, [3, 4, 9], "the oldest two went");
        assert_eq!(next, 5);
        let (last, _) = h.recent(&FlowFilter::default(), 1);
        assert_eq!(last[0].destination.port, 9);
        let denied = FlowFilter {
            verdict: Some(Verdict::Denied),
            ..FlowFilter::default()
        };
        assert_eq!(h.recent(&denied, 100).0.len(), 1);
        let other_pod = FlowFilter {
            pod: Some("b".into()),
            ..FlowFilter::default()
        };
        assert!(h.recent(&other_pod, 100).0.is_empty());
    }

    #[tokio::test]
    async fn subscribers_get_new_flows_in_order() {
        let h = hub(10);
        let mut rx = h.subscribe();
        h.ingest(&rec(FLOW_VERDICT_ALLOWED, 0, 1, 80, 0), 0);
        h.ingest(&rec(FLOW_VERDICT_DENIED, 2, 0, 81, 0), 0);
        let (s0, f0) = rx.recv().await.expect("first");
        let (s1, f1) = rx.recv().await.expect("second");
        assert_eq!((s0, s1), (0, 1));
        assert_eq!(f0.destination.port, 80);
        assert_eq!(f1.drop_reason.as_deref(), Some("POLICY_DENIED_EGRESS"));
    }

    /// A batch is kept and counted like single records; it reaches
    /// subscribers in order, and without one it is still kept.
    #[tokio::test]
    async fn batches_are_kept_counted_and_sent_to_subscribers() {
        let h = hub(10);
        h.ingest_batch(&[
            rec(FLOW_VERDICT_ALLOWED, 0, 1, 80, 0),
            rec(FLOW_VERDICT_DENIED, 1, 0, 81, 2),
        ]);
        let mut rx = h.subscribe();
        h.ingest_batch(&[
            rec(FLOW_VERDICT_ALLOWED, 0, 1, 82, 0),
            rec(FLOW_VERDICT_ALLOWED, 0, 0, 83, 0),
        ]);
        h.ingest_batch(&[]);
        let (s0, f0) = rx.recv().await.expect("first");
        let (s1, f1) = rx.recv().await.expect("second");
        assert_eq!((s0, s1), (2, 3), "only the flows after subscribing");
        assert_eq!((f0.destination.port, f1.destination.port), (82, 83));
        assert!(rx.try_recv().is_err(), "nothing more");
        let (all, next) = h.recent(&FlowFilter::default(), 100);
        let ports: Vec<u16> = all.iter().map(|f| f.destination.port).collect();
        assert_eq!(ports, [80, 81, 82, 83]);
        assert_eq!(next, 4);
        assert!(
            all.iter().all(|f| f.time.starts_with("20")),
            "wall clock times"
        );
        let text = h.render_metrics();
        for want in [
            "weir_policy_verdicts_total{node=\"n1\",policy=\"x/web\",verdict=\"allowed\"} 2",
            "weir_policy_verdicts_total{node=\"n1\",policy=\"none\",verdict=\"allowed\"} 1",
            "weir_policy_verdicts_total{node=\"n1\",policy=\"default-deny\",verdict=\"denied\"} 3",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert!(
            !text.contains("x/web\",verdict=\"denied"),
            "no zero counters: {text}"
        );
    }

    #[test]
    fn verdict_counters_by_policy_in_metrics_text() {
        let h = hub(10);
        h.ingest(&rec(FLOW_VERDICT_ALLOWED, 0, 1, 80, 0), 0);
        h.ingest(&rec(FLOW_VERDICT_ALLOWED, 0, 1, 81, 0), 0);
        h.ingest(&rec(FLOW_VERDICT_ALLOWED, 0, 0, 82, 0), 0);
        // A denial with 4 more folded into it counts 5.
        h.ingest(&rec(FLOW_VERDICT_DENIED, 1, 0, 83, 4), 0);
        h.ingest(&rec(FLOW_VERDICT_DENIED, 4, 0, 0, 0), 0);
        let text = h.render_metrics();
        for want in [
            "weir_policy_verdicts_total{node=\"n1\",policy=\"x/web\",verdict=\"allowed\"} 2",
            "weir_policy_verdicts_total{node=\"n1\",policy=\"none\",verdict=\"allowed\"} 1",
            "weir_policy_verdicts_total{node=\"n1\",policy=\"default-deny\",verdict=\"denied\"} 5",
            "weir_policy_verdicts_total{node=\"n1\",policy=\"none\",verdict=\"denied\"} 1",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert!(
            text.contains("# TYPE weir_policy_verdicts counter"),
            "{text}"
        );
        assert!(
            !text.contains("weir_policy_drops"),
            "no counters without maps"
        );
    }

    #[test]
    fn denials_count_per_isolating_policy() {
        let h = hub(10).with_isolation(Box::new(|ep, dir| {
            if ep == 4 && dir == DIR_INGRESS {
                vec!["x/deny-all".into(), "x/allow-y".into()]
            } else {
                Vec::new()
            }
        }));
        let mut r = rec(FLOW_VERDICT_DENIED, 1, 0, 80, 2);
        r.ep = 4;
        let f = h.ingest(&r, 0);
        assert_eq!(f.policies, ["x/deny-all", "x/allow-y"]);
        // Another endpoint: not known.
        h.ingest(&rec(FLOW_VERDICT_DENIED, 1, 0, 81, 0), 0);
        let text = h.render_metrics();
        for want in [
            "weir_policy_verdicts_total{node=\"n1\",policy=\"x/deny-all\",verdict=\"denied\"} 3",
            "weir_policy_verdicts_total{node=\"n1\",policy=\"x/allow-y\",verdict=\"denied\"} 3",
            "weir_policy_verdicts_total{node=\"n1\",policy=\"default-deny\",verdict=\"denied\"} 1",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }
}

/// Per-record cost of [`FlowHub::ingest`] with lookups shaped like the
/// agent's (mutex-guarded maps of 1,000 pods, a rule table, isolation), one
/// subscriber draining the broadcast: `cargo test --release -p weir-agent
/// --lib flows::hub::cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use std::{collections::BTreeMap, sync::Mutex, time::Instant};

    use super::*;
    use weir_common::{DIR_INGRESS, FLOW_VERDICT_ALLOWED, FLOW_VERDICT_DENIED, PROTO_TCP};

    fn pod_ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i)
    }

    fn realistic_hub() -> FlowHub {
        let pods: BTreeMap<Ipv4Addr, (String, String)> = (0..1000)
            .map(|i| (pod_ip(i), ("bench".to_owned(), format!("pod-{i}"))))
            .collect();
        let pods = Arc::new(Mutex::new(pods));
        let rules: BTreeMap<u32, (String, String)> = (0..50)
            .map(|i| (1000 + i, ("bench".to_owned(), format!("policy-{i}"))))
            .collect();
        let rules = Arc::new(Mutex::new(rules));
        let iso: BTreeMap<u32, Vec<(String, String)>> = (0..100)
            .map(|i| (i, vec![("bench".to_owned(), "deny-all".to_owned())]))
            .collect();
        let iso = Arc::new(Mutex::new(iso));
        FlowHub::new(
            "node-0",
            10_000,
            Enricher {
                pod_of: Box::new(move |ip| pods.lock().ok()?.get(&ip).cloned()),
                policy_of: Box::new(move |n| {
                    let t = rules.lock().ok()?;
                    let (ns, name) = t.get(&n)?.clone();
                    Some(format!("{ns}/{name}"))
                }),
            },
        )
        .with_isolation(Box::new(move |ep, _| {
            iso.lock()
                .ok()
                .and_then(|m| m.get(&ep).cloned())
                .map(|v| v.iter().map(|(a, b)| format!("{a}/{b}")).collect())
                .unwrap_or_default()
        }))
    }

    fn records(n: u32) -> Vec<FlowRecord> {
        (0..n)
            .map(|i| {
                let denied = i % 10 == 9;
                FlowRecord {
                    ts_ns: u64::from(i) * 100_000,
                    ep: i % 100,
                    saddr: u32::from(pod_ip(i % 1000)).to_be(),
                    daddr: u32::from(pod_ip((i * 7) % 1000)).to_be(),
                    sport: u16::try_from(30_000 + i % 30_000).unwrap_or(0).to_be(),
                    dport: 8080u16.to_be(),
                    proto: PROTO_TCP,
                    dir: DIR_INGRESS,
                    verdict: if denied {
                        FLOW_VERDICT_DENIED
                    } else {
                        FLOW_VERDICT_ALLOWED
                    },
                    reason: u8::from(denied),
                    src_identity: 300,
                    dst_identity: 301,
                    rule: if denied { 0 } else { 1000 + i % 50 },
                    tcp_flags: 0x02,
                    ..FlowRecord::default()
                }
            })
            .collect()
    }

    #[test]
    #[ignore = "a measurement, not a check: run with --release --nocapture"]
    fn ingest_per_record() {
        let hub = realistic_hub();
        let mut rx = hub.subscribe();
        let recs = records(200_000);
        for _ in 0..3 {
            let t0 = Instant::now();
            for chunk in recs.chunks(64) {
                hub.ingest_batch(chunk);
                while rx.try_recv().is_ok() {}
            }
            let per = t0.elapsed().as_nanos() / recs.len() as u128;
            eprintln!("ingest: {per} ns per record (batches of 64, one subscriber)");
        }
    }
}
