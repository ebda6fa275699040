//! Per-pod and per-node metrics sampled every `--metrics-interval`.
//!
//! Each sample reads every pod's cumulative counters — cgroup CPU time,
//! throttling, memory working set and OOM kills (pod and containers), the
//! eBPF traffic counters of its veth, the kernel's drop counters of that
//! veth, and the eBPF TCP statistics of its IP ([`kernel`]) — and turns
//! them into rates over the window since the previous sample ([`rates`]).
//! The newest [`Sample`] is published for `/metrics` and the push to the
//! control ([`subscribe`], [`latest`]).
//!
//! Node totals are the sums over the node's pods (several weir nodes may
//! share one kernel, so machine-wide figures would mix nodes).

pub mod kernel;
pub mod rates;

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use kernel::KernelMetrics;
pub use rates::Reading;

use crate::pod::Manager;

/// The default sampling period.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// One container's readings over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerSample {
    /// The container's name.
    pub name: String,
    /// CPU used over the window, in cores.
    pub cpu_cores: f64,
    /// Cumulative CPU time, seconds.
    pub cpu_seconds: f64,
    /// Memory working set, bytes.
    pub memory_working_set_bytes: u64,
}

/// One pod's readings over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSample {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's uid.
    pub uid: String,
    /// CPU used over the window, in cores.
    pub cpu_cores: f64,
    /// Memory working set, bytes.
    pub memory_working_set_bytes: u64,
    /// Per-container readings.
    pub containers: Vec<ContainerSample>,
    /// Per-second rates and gauges by name (`weir_pod_*`, see [`rates::values`]).
    pub values: BTreeMap<String, f64>,
    /// The cumulative readings at the end of the window.
    pub totals: Reading,
}

/// A node's totals over a window (sums over its pods).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeSample {
    /// CPU used by the node's pods, in cores.
    pub cpu_cores: f64,
    /// Memory working set of the node's pods, bytes.
    pub memory_working_set_bytes: u64,
    /// Per-second rates and gauges by name (`weir_node_*`).
    pub values: BTreeMap<String, f64>,
}

/// One sampling period's readings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// The node's name.
    pub node_name: String,
    /// When the window ended, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The window's length, milliseconds.
    pub window_ms: i64,
    /// The node's totals.
    pub node: NodeSample,
    /// Every pod read in both this sample and the one before.
    pub pods: Vec<PodSample>,
}

/// The newest sample, published by [`run`].
fn channel() -> &'static watch::Sender<Option<Arc<Sample>>> {
    static LATEST: OnceLock<watch::Sender<Option<Arc<Sample>>>> = OnceLock::new();
    LATEST.get_or_init(|| watch::Sender::new(None))
}

/// The newest sample, if the sampler has made one.
#[must_use]
pub fn latest() -> Option<Arc<Sample>> {
    channel().borrow().clone()
}

/// Publishes `s` as the newest sample (what [`run`] does each period).
pub fn publish(s: Sample) {
    channel().send_replace(Some(Arc::new(s)));
}

/// Sees every new sample.
#[must_use]
pub fn subscribe() -> watch::Receiver<Option<Arc<Sample>>> {
    channel().subscribe()
}

static KERNEL: OnceLock<Arc<KernelMetrics>> = OnceLock::new();

/// Hands the loaded TCP metric programs to the sampler and `/metrics`. Only
/// the first call counts.
pub fn set_kernel(k: Arc<KernelMetrics>) {
    if KERNEL.set(k).is_err() {
        tracing::warn!("kernel metrics are already set; keeping the first");
    }
}

/// The TCP metric programs, once loaded.
#[must_use]
pub fn kernel() -> Option<&'static KernelMetrics> {
    KERNEL.get().map(AsRef::as_ref)
}

/// Kernel drop counters of the host-side veths by ifindex (receive drops
/// towards the pod, transmit drops from the pod), as last read.
static VETH_DROPS: Mutex<BTreeMap<u32, (u64, u64)>> = Mutex::new(BTreeMap::new());

/// The drop counters last read for the veth with this ifindex.
#[must_use]
pub fn veth_drops(ifindex: u32) -> (u64, u64) {
    VETH_DROPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&ifindex)
        .copied()
        .unwrap_or_default()
}

/// Reads every link's kernel drop counters in the current network
/// namespace (one netlink dump) into the cache [`veth_drops`] reads.
async fn refresh_veth_drops(handle: &rtnetlink::Handle) {
    use netlink_packet_route::link::LinkAttribute;
    let mut out = BTreeMap::new();
    let mut links = handle.link().get().execute();
    loop {
        match links.try_next().await {
            Ok(Some(msg)) => {
                for a in &msg.attributes {
                    if let LinkAttribute::Stats64(s) = a {
                        // On the host end, what it failed to send went
                        // towards the pod; what it failed to receive came
                        // from the pod.
                        out.insert(msg.header.index, (s.tx_dropped, s.rx_dropped));
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read link statistics");
                return;
            }
        }
    }
    *VETH_DROPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = out;
}

/// A pod's identity and its cumulative readings now.
#[derive(Clone, Debug, Default)]
pub struct PodReading {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Uid.
    pub uid: String,
    /// The pod's readings.
    pub reading: Reading,
    /// Per container: name, cumulative CPU seconds, working set bytes.
    pub containers: Vec<(String, f64, u64)>,
}

/// Reads one pod's cumulative counters now (cgroups, eBPF counters, the
/// veth drop cache); `None` if its cgroup is not there (not started, or gone).
#[must_use]
pub fn read_pod(mgr: &Manager, pod: &Pod) -> Option<PodReading> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let cg = mgr.cgroups();
    let rel = format!("/{}/{uid}", mgr.namespace());
    let usage = cg.usage(&rel)?;
    let throttling = cg.throttling(&rel).unwrap_or_default();
    let mut r = Reading {
        cpu_seconds: usage.cpu_seconds,
        throttled_seconds: throttling.seconds,
        throttled_periods: throttling.periods,
        memory_usage_bytes: usage.memory_bytes,
        memory_working_set_bytes: usage.working_set_bytes,
        oom_kills: cg.oom_kills(&rel).unwrap_or(0),
        ..Reading::default()
    };
    if let Some(ifindex) = mgr.ifindex(&uid) {
        r.net = mgr.dataplane().counters(ifindex);
        (r.receive_drops, r.transmit_drops) = veth_drops(ifindex);
    }
    if let (Some(k), Some(ip)) = (kernel(), pod_ip(pod)) {
        r.tcp = k.stats(ip);
    }
    let containers = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .filter_map(|c| {
            let u = cg.usage(&format!("{rel}/{}", c.name))?;
            Some((c.name.clone(), u.cpu_seconds, u.working_set_bytes))
        })
        .collect();
    Some(PodReading {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid,
        reading: r,
        containers,
    })
}

/// The pod's IPv4 address, if it has one.
#[must_use]
pub fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

/// Reads every pod of the manager now.
#[must_use]
pub fn read_all(mgr: &Manager) -> Vec<PodReading> {
    mgr.pods().iter().filter_map(|p| read_pod(mgr, p)).collect()
}

/// Turns two rounds of readings `secs` apart into a sample: a pod is in it
/// if it was read in both rounds; node totals sum those pods.
#[must_use]
pub fn sample<H: std::hash::BuildHasher>(
    node: &str,
    prev: &HashMap<String, PodReading, H>,
    cur: &[PodReading],
    secs: f64,
    end: SystemTime,
) -> Sample {
    let mut pods = Vec::new();
    let (mut node_prev, mut node_cur) = (Reading::default(), Reading::default());
    for c in cur {
        let Some(p) = prev.get(&c.uid) else { continue };
        node_prev = node_prev + p.reading;
        node_cur = node_cur + c.reading;
        let containers = c
            .containers
            .iter()
            .map(|(name, cpu, wss)| {
                let before = p
                    .containers
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .map_or(*cpu, |(_, cpu, _)| *cpu);
                let cores = rates::cpu_cores(
                    &Reading {
                        cpu_seconds: before,
                        ..Reading::default()
                    },
                    &Reading {
                        cpu_seconds: *cpu,
                        ..Reading::default()
                    },
                    secs,
                );
                ContainerSample {
                    name: name.clone(),
                    cpu_cores: cores,
                    cpu_seconds: *cpu,
                    memory_working_set_bytes: *wss,
                }
            })
            .collect();
        pods.push(PodSample {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            uid: c.uid.clone(),
            cpu_cores: rates::cpu_cores(&p.reading, &c.reading, secs),
            memory_working_set_bytes: c.reading.memory_working_set_bytes,
            containers,
            values: rates::values("weir_pod", &p.reading, &c.reading, secs),
            totals: c.reading,
        });
    }
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    Sample {
        node_name: node.to_owned(),
        timestamp_ms: ms(end
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()),
        window_ms: ms(Duration::from_secs_f64(secs.max(0.0))),
        node: NodeSample {
            cpu_cores: rates::cpu_cores(&node_prev, &node_cur, secs),
            memory_working_set_bytes: node_cur.memory_working_set_bytes,
            values: rates::values("weir_node", &node_prev, &node_cur, secs),
        },
        pods,
    }
}

/// Samples every `interval` until `cancel`, publishing each [`Sample`]
/// (see [`subscribe`]). A zero interval turns sampling off.
pub async fn run(mgr: Manager, node: String, interval: Duration, cancel: CancellationToken) {
    if interval.is_zero() {
        tracing::info!("metrics sampling is off");
        return;
    }
    let netlink = match rtnetlink::new_connection() {
        Ok((conn, handle, _)) => {
            tokio::spawn(conn);
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no netlink socket: veth drop counters are not read");
            None
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev: Option<(Instant, HashMap<String, PodReading>)> = None;
    let mut rounds = 0u64;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(h) = &netlink {
            refresh_veth_drops(h).await;
        }
        let m = mgr.clone();
        let Ok(cur) = tokio::task::spawn_blocking(move || read_all(&m)).await else {
            continue;
        };
        let now = Instant::now();
        rounds += 1;
        if rounds.is_multiple_of(30)
            && let Some(k) = kernel()
        {
            let ips: Vec<Ipv4Addr> = mgr.pods().iter().filter_map(pod_ip).collect();
            k.retain(&ips);
        }
        if let Some((at, before)) = &prev {
            let secs = now.duration_since(*at).as_secs_f64();
            publish(sample(&node, before, &cur, secs, SystemTime::now()));
        }
        prev = Some((now, cur.into_iter().map(|r| (r.uid.clone(), r)).collect()));
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp, reason = "the values are exact in binary")]
mod tests {
    use super::*;

    fn pod(uid: &str, cpu: f64, conns: u64) -> PodReading {
        PodReading {
            namespace: "default".into(),
            name: format!("p-{uid}"),
            uid: uid.into(),
            reading: Reading {
                cpu_seconds: cpu,
                memory_working_set_bytes: 100,
                tcp: weir_common::SockStats {
                    accepted: conns,
                    ..weir_common::SockStats::default()
                },
                ..Reading::default()
            },
            containers: vec![("c".into(), cpu, 100)],
        }
    }

    #[test]
    fn sample_has_pods_read_twice_and_node_sums() {
        let prev: HashMap<String, PodReading> = [pod("a", 1.0, 0), pod("gone", 5.0, 0)]
            .into_iter()
            .map(|p| (p.uid.clone(), p))
            .collect();
        let cur = [pod("a", 2.0, 10), pod("b", 3.0, 7)];
        let s = sample(
            "n1",
            &prev,
            &cur,
            2.0,
            SystemTime::UNIX_EPOCH + Duration::from_secs(3),
        );
        assert_eq!(s.pods.len(), 1, "{s:?}");
        let a = &s.pods[0];
        assert!((a.cpu_cores - 0.5).abs() < 1e-9);
        assert!((a.containers[0].cpu_cores - 0.5).abs() < 1e-9);
        assert_eq!(a.values["weir_pod_new_connections_per_second"], 5.0);
        assert!(
            (s.node.cpu_cores - 0.5).abs() < 1e-9,
            "b has no window yet, gone is gone"
        );
        assert_eq!(s.node.memory_working_set_bytes, 100);
        assert_eq!(s.node.values["weir_node_new_connections_per_second"], 5.0);
        assert_eq!((s.timestamp_ms, s.window_ms), (3000, 2000));
    }
}
