//! The agent's HTTP endpoint: Prometheus metrics, pod status (Kubernetes
//! Pod JSON) and container logs that can be followed.
//!
//! - `GET /metrics`
//! - `GET /api/v1/pods`, `GET /api/v1/namespaces/{ns}/pods/{name}`
//! - `GET /api/v1/namespaces/{ns}/pods/{name}/log?container=C&follow=true`
//! - `GET /flows?follow=true&namespace=N&pod=P&verdict=allowed|denied&port=N&limit=N`
//!   (JSON lines, see [`crate::flows::Flow`])
//! - `GET /policy/explain?src=NS/POD|IP&dst=NS/POD|IP&port=N&protocol=TCP|UDP&direction=egress|ingress`
//!   (JSON `{"node", "steps": [...]}`, see [`crate::control::policy::explain::Step`]):
//!   the verdict of this node's policy maps on a new connection, for the
//!   ends that are pods of this node (404 if neither is)
//! - `GET /healthz`

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, LazyLock, Mutex, OnceLock, atomic::AtomicU64},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_util::sync::CancellationToken;

use weir_common::{BACKENDS_MAP, SVC_MAP};

use crate::control::policy::explain;
use crate::flows::{Flow, FlowFilter, FlowHub, Verdict};
use crate::pod::Manager;

#[derive(Clone)]
struct App {
    mgr: Manager,
    node: String,
}

/// Serves the endpoint on `addr` until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    mgr: Manager,
    node: String,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/pods", get(pods))
        .route("/api/v1/namespaces/{ns}/pods/{name}", get(pod))
        .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(logs))
        .route("/flows", get(flows))
        .route("/policy/explain", get(policy_explain))
        .with_state(App { mgr, node });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics, pods and logs");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

async fn pods(State(app): State<App>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"apiVersion": "v1", "kind": "PodList", "items": app.mgr.pods()}))
}

async fn pod(State(app): State<App>, Path((ns, name)): Path<(String, String)>) -> Response {
    match app.mgr.pod(&ns, &name) {
        Some(p) => Json(p).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("pods \"{name}\" not found in namespace \"{ns}\"\n"),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct LogQuery {
    container: Option<String>,
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(app): State<App>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let Some(pod) = app.mgr.pod(&ns, &name) else {
        return (
            StatusCode::NOT_FOUND,
            format!("pods \"{name}\" not found in namespace \"{ns}\"\n"),
        )
            .into_response();
    };
    let names: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| c.name.clone())
        .collect();
    let container = match (q.container, names.as_slice()) {
        (Some(c), _) if names.contains(&c) => c,
        (Some(c), _) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("container {c} is not valid for pod {name}\n"),
            )
                .into_response();
        }
        (None, [only]) => only.clone(),
        (None, _) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "a container name must be specified for pod {name}, choose one of: {names:?}\n"
                ),
            )
                .into_response();
        }
    };
    let Some(path) = app.mgr.log_path(&ns, &name, &container) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let follow = q.follow;
    let stream = async_stream(path, follow);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The file's content, then (when following) what is appended to it.
fn async_stream(
    path: std::path::PathBuf,
    follow: bool,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
    futures::stream::unfold(
        (None::<tokio::fs::File>, 0u64, path),
        move |(file, pos, path)| async move {
            let mut file = match file {
                Some(f) => f,
                None => match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return None,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return Some((Ok(Vec::new()), (None, pos, path)));
                    }
                    Err(e) => return Some((Err(e), (None, pos, path))),
                },
            };
            loop {
                if file.seek(std::io::SeekFrom::Start(pos)).await.is_err() {
                    return None;
                }
                let mut buf = vec![0u8; 64 * 1024];
                match file.read(&mut buf).await {
                    Ok(0) if !follow => return None,
                    Ok(0) => {
                        if !path.exists() {
                            return None; // the pod is gone
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        let next = pos + n as u64;
                        return Some((Ok(buf), (Some(file), next, path)));
                    }
                    Err(e) => return Some((Err(e), (Some(file), pos, path))),
                }
            }
        },
    )
}

/// The node's flow hub, once flow observation runs.
static FLOW_HUB: OnceLock<Arc<FlowHub>> = OnceLock::new();

/// Serves `hub` on `GET /flows` and adds its counters to `/metrics`. Only
/// the first call counts (one hub per agent).
pub fn set_flow_hub(hub: Arc<FlowHub>) {
    if FLOW_HUB.set(hub).is_err() {
        tracing::warn!("a flow hub is already set; keeping the first");
    }
}

/// Answers a `policy explain` question with this node's policy maps.
pub type Explainer =
    dyn Fn(&explain::Query) -> Result<Vec<explain::Step>, explain::ExplainError> + Send + Sync;

/// The node's policy explainer, once policy enforcement runs.
static EXPLAINER: OnceLock<Arc<Explainer>> = OnceLock::new();

/// Serves `f` on `GET /policy/explain`. Only the first call counts.
pub fn set_policy_explainer(f: Arc<Explainer>) {
    if EXPLAINER.set(f).is_err() {
        tracing::warn!("a policy explainer is already set; keeping the first");
    }
}

#[derive(Deserialize)]
struct ExplainQuery {
    src: String,
    dst: String,
    port: u16,
    #[serde(default)]
    protocol: String,
    direction: Option<String>,
}

impl ExplainQuery {
    fn query(&self) -> Result<explain::Query, String> {
        use crate::control::policy::Direction;
        let direction = match self.direction.as_deref().unwrap_or_default() {
            "" => None,
            "egress" => Some(Direction::Egress),
            "ingress" => Some(Direction::Ingress),
            d => {
                return Err(format!(
                    "direction {d:?} is not valid: use egress or ingress"
                ));
            }
        };
        if self.port == 0 {
            return Err("port 0 is not valid: use 1-65535".to_owned());
        }
        Ok(explain::Query {
            src: explain::Target::parse(&self.src).map_err(|e| format!("src: {e}"))?,
            dst: explain::Target::parse(&self.dst).map_err(|e| format!("dst: {e}"))?,
            port: self.port,
            proto: explain::parse_protocol(&self.protocol)?,
            direction,
        })
    }
}

/// `GET /policy/explain`.
async fn policy_explain(
    q: Result<Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("{e}: want src, dst, port (and protocol, direction)\n"),
            )
                .into_response();
        }
    };
    let Some(f) = EXPLAINER.get().cloned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "network policy is not enforced on this node\n",
        )
            .into_response();
    };
    let q = match q.query() {
        Ok(q) => q,
        Err(msg) => return (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response(),
    };
    match tokio::task::spawn_blocking(move || f(&q)).await {
        Ok(Ok(steps)) => {
            let node = steps.first().map(|s| s.node.clone()).unwrap_or_default();
            Json(serde_json::json!({"node": node, "steps": steps})).into_response()
        }
        Ok(Err(
            e @ (explain::ExplainError::NotLocal { .. } | explain::ExplainError::NoAddress(_)),
        )) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// How many flows `GET /flows` returns without `limit`.
const FLOWS_DEFAULT_LIMIT: usize = 1000;

#[derive(Deserialize)]
struct FlowQuery {
    namespace: Option<String>,
    pod: Option<String>,
    verdict: Option<String>,
    port: Option<u16>,
    limit: Option<usize>,
    #[serde(default)]
    follow: bool,
}

impl FlowQuery {
    fn filter(&self) -> Result<FlowFilter, String> {
        let verdict =
            match self.verdict.as_deref().filter(|v| !v.is_empty()) {
                None => None,
                Some(v) => Some(Verdict::parse(v).ok_or_else(|| {
                    format!("verdict {v:?} is not valid: use allowed or denied\n")
                })?),
            };
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Ok(FlowFilter {
            namespace: nonempty(&self.namespace),
            pod: nonempty(&self.pod),
            verdict,
            port: self.port,
        })
    }
}

/// One flow as a JSON line.
fn flow_line(f: &Flow) -> Vec<u8> {
    let mut line = serde_json::to_vec(f).unwrap_or_default();
    line.push(b'\n');
    line
}

async fn flows(Query(q): Query<FlowQuery>) -> Response {
    let Some(hub) = FLOW_HUB.get().cloned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "flow observation is not running on this node\n",
        )
            .into_response();
    };
    let filter = match q.filter() {
        Ok(f) => f,
        Err(msg) => return (StatusCode::BAD_REQUEST, msg).into_response(),
    };
    // Subscribe before reading the kept flows: nothing falls in between.
    let rx = q.follow.then(|| hub.subscribe());
    let (kept, next) = hub.recent(&filter, q.limit.unwrap_or(FLOWS_DEFAULT_LIMIT));
    let head: Vec<std::io::Result<Vec<u8>>> = kept.iter().map(|f| Ok(flow_line(f))).collect();
    let head = futures::stream::iter(head);
    let body = match rx {
        None => Body::from_stream(head),
        Some(rx) => Body::from_stream(futures::StreamExt::chain(
            head,
            follow_flows(rx, filter, next),
        )),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// New flows passing `filter` from `rx`, skipping those before `from`
/// (already sent); a slow reader skips what it missed.
fn follow_flows(
    rx: tokio::sync::broadcast::Receiver<(u64, Arc<Flow>)>,
    filter: FlowFilter,
    from: u64,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> {
    use tokio::sync::broadcast::error::RecvError;
    futures::stream::unfold(rx, move |mut rx| {
        let filter = filter.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok((seq, f)) if seq >= from && filter.matches(&f) => {
                        return Some((Ok(flow_line(&f)), rx));
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    node: String,
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    node: String,
    namespace: String,
    pod: String,
    container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    node: String,
    map: String,
}

/// Durations of the service load balancer's syncs (0.5 ms .. ~16 s).
static LB_SYNC: LazyLock<Histogram> =
    LazyLock::new(|| Histogram::new(exponential_buckets(0.000_5, 2.0, 16)));

/// The balancer's pin directory, known once it has synced.
static LB_PIN_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Records one sync of the service load balancer (pinned under `pin_dir`)
/// that took `took`, for `weir_lb_sync_duration_seconds`; from then on
/// `/metrics` also reports the balancer's map sizes.
pub fn observe_lb_sync(pin_dir: &std::path::Path, took: Duration) {
    LB_SYNC.observe(took.as_secs_f64());
    let mut dir = LB_PIN_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if dir.as_deref() != Some(pin_dir) {
        *dir = Some(pin_dir.to_path_buf());
    }
}

/// The load balancer's metrics alone (what [`render`] adds for it), in
/// the text exposition format.
pub fn render_lb(node: &str) -> String {
    let mut reg = Registry::default();
    register_lb(&mut reg, node);
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

/// Registers the balancer's metrics: the sync histogram always, the map
/// sizes (read from the pinned maps now) once it has synced.
fn register_lb(reg: &mut Registry, node: &str) {
    reg.register(
        "weir_lb_sync_duration_seconds",
        "Time to program the service load balancer's maps from the service table",
        LB_SYNC.clone(),
    );
    let dir = LB_PIN_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Some(dir) = dir else { return };
    let counts = match crate::lb::inspect::entry_counts(&dir) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "cannot count the balancer's map entries");
            return;
        }
    };
    let entries = Family::<MapLabels, Gauge>::default();
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    for (map, n) in &counts {
        entries
            .get_or_create(&MapLabels {
                node: node.to_owned(),
                map: (*map).to_owned(),
            })
            .set(gauge(*n));
    }
    let at_node = NodeLabels {
        node: node.to_owned(),
    };
    let services = Family::<NodeLabels, Gauge>::default();
    services
        .get_or_create(&at_node)
        .set(gauge(counts.get(SVC_MAP).copied().unwrap_or(0)));
    let backends = Family::<NodeLabels, Gauge>::default();
    backends
        .get_or_create(&at_node)
        .set(gauge(counts.get(BACKENDS_MAP).copied().unwrap_or(0)));
    reg.register(
        "weir_lb_services",
        "Service ports programmed in the load balancer (weir_svc_v1 entries)",
        services,
    );
    reg.register(
        "weir_lb_backends",
        "Distinct backends programmed in the load balancer (weir_backends_v1 entries)",
        backends,
    );
    reg.register(
        "weir_lb_map_entries",
        "Entries in each of the load balancer's pinned maps",
        entries,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    node: String,
    phase: String,
}

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn gauge_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The per-pod cumulative families of `/metrics` (counters read now).
#[derive(Default)]
struct PodFamilies {
    rx_bytes: Family<PodLabels, Counter>,
    rx_packets: Family<PodLabels, Counter>,
    rx_drops: Family<PodLabels, Counter>,
    tx_bytes: Family<PodLabels, Counter>,
    tx_packets: Family<PodLabels, Counter>,
    tx_drops: Family<PodLabels, Counter>,
    cpu: Family<PodLabels, FloatCounter>,
    throttled: Family<PodLabels, FloatCounter>,
    throttled_periods: Family<PodLabels, Counter>,
    mem: Family<PodLabels, Gauge>,
    wss: Family<PodLabels, Gauge>,
    ooms: Family<PodLabels, Counter>,
    opened: Family<PodLabels, Counter>,
    accepted: Family<PodLabels, Counter>,
    retransmits: Family<PodLabels, Counter>,
    container_cpu: Family<ContainerLabels, FloatCounter>,
    container_wss: Family<ContainerLabels, Gauge>,
}

impl PodFamilies {
    fn add(&self, labels: &PodLabels, r: &crate::metrics::PodReading) {
        let m = &r.reading;
        self.rx_bytes.get_or_create(labels).inc_by(m.net.rx_bytes);
        self.rx_packets
            .get_or_create(labels)
            .inc_by(m.net.rx_packets);
        self.rx_drops.get_or_create(labels).inc_by(m.receive_drops);
        self.tx_bytes.get_or_create(labels).inc_by(m.net.tx_bytes);
        self.tx_packets
            .get_or_create(labels)
            .inc_by(m.net.tx_packets);
        self.tx_drops.get_or_create(labels).inc_by(m.transmit_drops);
        self.cpu.get_or_create(labels).inc_by(m.cpu_seconds);
        self.throttled
            .get_or_create(labels)
            .inc_by(m.throttled_seconds);
        self.throttled_periods
            .get_or_create(labels)
            .inc_by(m.throttled_periods);
        self.mem
            .get_or_create(labels)
            .set(gauge_i64(m.memory_usage_bytes));
        self.wss
            .get_or_create(labels)
            .set(gauge_i64(m.memory_working_set_bytes));
        self.ooms.get_or_create(labels).inc_by(m.oom_kills);
        self.opened.get_or_create(labels).inc_by(m.tcp.opened);
        self.accepted.get_or_create(labels).inc_by(m.tcp.accepted);
        self.retransmits
            .get_or_create(labels)
            .inc_by(m.tcp.retransmits);
        for (name, cpu, wss) in &r.containers {
            let l = ContainerLabels {
                node: labels.node.clone(),
                namespace: labels.namespace.clone(),
                pod: labels.pod.clone(),
                container: name.clone(),
            };
            self.container_cpu.get_or_create(&l).inc_by(*cpu);
            self.container_wss.get_or_create(&l).set(gauge_i64(*wss));
        }
    }

    fn register(self, reg: &mut Registry) {
        let k = crate::metrics::kernel().is_some();
        for (name, help, fam) in [
            (
                "weir_pod_network_receive_bytes",
                "Bytes delivered to the pod (eBPF, host-side veth egress, after network policy)",
                self.rx_bytes,
            ),
            (
                "weir_pod_network_receive_packets",
                "Packets delivered to the pod",
                self.rx_packets,
            ),
            (
                "weir_pod_network_receive_drops",
                "Packets to the pod the kernel dropped on its veth (policy denials: weir_policy_drops_total)",
                self.rx_drops,
            ),
            (
                "weir_pod_network_transmit_bytes",
                "Bytes sent by the pod (eBPF, host-side veth ingress, after network policy)",
                self.tx_bytes,
            ),
            (
                "weir_pod_network_transmit_packets",
                "Packets sent by the pod",
                self.tx_packets,
            ),
            (
                "weir_pod_network_transmit_drops",
                "Packets from the pod the kernel dropped on its veth (policy denials: weir_policy_drops_total)",
                self.tx_drops,
            ),
            (
                "weir_pod_cpu_throttled_periods",
                "CFS periods in which the pod was throttled",
                self.throttled_periods,
            ),
            (
                "weir_pod_oom_kills",
                "Processes of the pod the kernel OOM-killed",
                self.ooms,
            ),
        ] {
            reg.register(name, help, fam);
        }
        if k {
            reg.register(
                "weir_pod_tcp_connections_opened",
                "TCP connections the pod opened that were established (eBPF sock_ops)",
                self.opened,
            );
            reg.register(
                "weir_pod_tcp_connections_accepted",
                "TCP connections the pod accepted (eBPF sock_ops)",
                self.accepted,
            );
            reg.register(
                "weir_pod_tcp_retransmits",
                "TCP segments the pod retransmitted (tracepoint tcp:tcp_retransmit_skb)",
                self.retransmits,
            );
        }
        reg.register_with_unit(
            "weir_pod_cpu_usage",
            "CPU time used by the pod's containers",
            prometheus_client::registry::Unit::Seconds,
            self.cpu,
        );
        reg.register_with_unit(
            "weir_pod_cpu_throttled",
            "Time the pod was throttled by its CPU limit",
            prometheus_client::registry::Unit::Seconds,
            self.throttled,
        );
        reg.register(
            "weir_pod_memory_usage_bytes",
            "Memory used by the pod's cgroup",
            self.mem,
        );
        reg.register(
            "weir_pod_memory_working_set_bytes",
            "Memory usage minus inactive file cache",
            self.wss,
        );
        reg.register_with_unit(
            "weir_container_cpu_usage",
            "CPU time used by the container",
            prometheus_client::registry::Unit::Seconds,
            self.container_cpu,
        );
        reg.register(
            "weir_container_memory_working_set_bytes",
            "Container memory usage minus inactive file cache",
            self.container_wss,
        );
    }
}

/// Registers the newest sample's per-second gauges (named as the metrics
/// API's `values` keys, without the OOM total a counter already has) and
/// CPU cores, per pod and for the node.
fn register_sample(reg: &mut Registry, node: &str, s: &crate::metrics::Sample) {
    let mut pods: BTreeMap<String, Family<PodLabels, FloatGauge>> = BTreeMap::new();
    let cores = Family::<PodLabels, FloatGauge>::default();
    for p in &s.pods {
        let labels = PodLabels {
            node: node.to_owned(),
            namespace: p.namespace.clone(),
            pod: p.name.clone(),
        };
        cores.get_or_create(&labels).set(p.cpu_cores);
        for (k, v) in &p.values {
            if k.ends_with("_oom_kills") {
                continue;
            }
            pods.entry(k.clone())
                .or_default()
                .get_or_create(&labels)
                .set(*v);
        }
    }
    reg.register(
        "weir_pod_cpu_cores",
        "CPU used by the pod over the last sampling window, in cores",
        cores,
    );
    for (k, fam) in pods {
        reg.register(k.clone(), format!("{k} over the last sampling window"), fam);
    }
    let at = NodeLabels {
        node: node.to_owned(),
    };
    let gauge = |v: f64| {
        let g = Family::<NodeLabels, FloatGauge>::default();
        g.get_or_create(&at).set(v);
        g
    };
    reg.register(
        "weir_node_cpu_cores",
        "CPU used by the node's pods over the last sampling window, in cores",
        gauge(s.node.cpu_cores),
    );
    #[expect(clippy::cast_precision_loss, reason = "a float gauge")]
    let wss = s.node.memory_working_set_bytes as f64;
    reg.register(
        "weir_node_memory_working_set_bytes",
        "Memory working set of the node's pods",
        gauge(wss),
    );
    for (k, v) in &s.node.values {
        reg.register(
            k.clone(),
            format!("{k} (sum over the node's pods) over the last sampling window"),
            gauge(*v),
        );
    }
}

/// Renders the metrics: counters and memory read now (eBPF maps, cgroups),
/// per-second gauges from the newest sample.
pub fn render(mgr: &Manager, node: &str) -> String {
    let mut reg = Registry::default();
    let fams = PodFamilies::default();
    let restarts = Family::<ContainerLabels, Counter>::default();
    let phases = Family::<PhaseLabels, Gauge>::default();
    for p in mgr.pods() {
        let labels = PodLabels {
            node: node.to_owned(),
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            pod: p.metadata.name.clone().unwrap_or_default(),
        };
        let status = p.status.as_ref();
        phases
            .get_or_create(&PhaseLabels {
                node: node.to_owned(),
                phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
            })
            .inc();
        for cs in status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
        {
            let l = ContainerLabels {
                node: node.to_owned(),
                namespace: labels.namespace.clone(),
                pod: labels.pod.clone(),
                container: cs.name.clone(),
            };
            restarts
                .get_or_create(&l)
                .inc_by(u64::try_from(cs.restart_count).unwrap_or(0));
        }
        if let Some(r) = crate::metrics::read_pod(mgr, &p) {
            fams.add(&labels, &r);
        }
    }
    fams.register(&mut reg);
    if let Some(s) = crate::metrics::latest() {
        register_sample(&mut reg, node, &s);
    }
    reg.register("weir_container_restarts", "Container restarts", restarts);
    reg.register("weir_pods", "Pods on this node by phase", phases);
    register_lb(&mut reg, node);
    if let Some(hub) = FLOW_HUB.get() {
        hub.register_metrics(&mut reg);
    }
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

async fn metrics(State(app): State<App>) -> Response {
    let body = render(&app.mgr, &app.node);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use weir_common::{DIR_INGRESS, FLOW_VERDICT_ALLOWED, FLOW_VERDICT_DENIED, FlowRecord};

    use super::*;
    use crate::flows::Enricher;

    fn rec(verdict: u8, reason: u8, dport: u16) -> FlowRecord {
        FlowRecord {
            saddr: u32::from(Ipv4Addr::new(10, 244, 2, 9)).to_be(),
            daddr: u32::from(Ipv4Addr::new(10, 244, 1, 5)).to_be(),
            sport: 5555u16.to_be(),
            dport: dport.to_be(),
            proto: weir_common::PROTO_TCP,
            dir: DIR_INGRESS,
            verdict,
            reason,
            ..FlowRecord::default()
        }
    }

    /// Sends `GET path` and returns the connection.
    async fn request(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request");
        c
    }

    /// Reads from `c` until `want` shows up (or 5 s pass); what was read.
    async fn read_until(c: &mut tokio::net::TcpStream, want: &str) -> String {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains(want) {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn flows_are_served_filtered_and_followed() {
        let hub = Arc::new(FlowHub::new("n1", 10, Enricher::none()));
        set_flow_hub(hub.clone());
        hub.ingest(&rec(FLOW_VERDICT_ALLOWED, 0, 80), 0);
        hub.ingest(&rec(FLOW_VERDICT_DENIED, 1, 81), 0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/flows", get(flows));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let mut c = request(addr, "/flows?verdict=denied").await;
        let all = read_until(&mut c, "\r\n0\r\n\r\n").await;
        assert!(all.starts_with("HTTP/1.1 200"), "{all}");
        assert!(all.contains("application/x-ndjson"), "{all}");
        assert!(all.contains("\"port\":81"), "{all}");
        assert!(!all.contains("\"port\":80,"), "only denied: {all}");

        let mut c = request(addr, "/flows?verdict=bogus").await;
        let bad = read_until(&mut c, "allowed or denied").await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");

        // Follow with no past flows: only what comes after.
        let mut c = request(addr, "/flows?follow=true&limit=0&port=82").await;
        let head = read_until(&mut c, "\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        hub.ingest(&rec(FLOW_VERDICT_ALLOWED, 0, 83), 0);
        hub.ingest(&rec(FLOW_VERDICT_DENIED, 2, 82), 0);
        let more = read_until(&mut c, "POLICY_DENIED_EGRESS").await;
        assert!(more.contains("\"port\":82"), "{more}");
        assert!(!more.contains("\"port\":83"), "filtered: {more}");
        assert!(!more.contains("\"port\":81"), "no past flows: {more}");
    }

    #[tokio::test]
    async fn policy_explain_answers_and_refuses() {
        use crate::control::policy::explain::{ExplainError, Step};
        set_policy_explainer(Arc::new(|q: &explain::Query| match &q.dst {
            explain::Target::Pod { name, .. } if name == "a" => Ok(vec![Step {
                node: "n1".into(),
                direction: "ingress".into(),
                verdict: "DENIED".into(),
                isolated_by: vec!["x/deny-all".into()],
                ..Step::default()
            }]),
            _ => Err(ExplainError::NotLocal {
                src: q.src.to_string(),
                dst: q.dst.to_string(),
                node: "n1".into(),
            }),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/policy/explain", get(policy_explain));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let mut c = request(addr, "/policy/explain?src=y/b&dst=x/a&port=80").await;
        let ok = read_until(&mut c, "}]}").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("\"node\":\"n1\""), "{ok}");
        assert!(ok.contains("\"isolatedBy\":[\"x/deny-all\"]"), "{ok}");
        let mut c = request(addr, "/policy/explain?src=y/b&dst=x/zz&port=80").await;
        let nf = read_until(&mut c, "is a pod").await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        for (q, want) in [
            ("src=y/b&dst=x/a&port=80&protocol=SCTP", "TCP or UDP"),
            ("src=y/b&dst=web&port=80", "dst:"),
            ("src=y/b&dst=x/a&port=80&direction=up", "egress or ingress"),
            ("src=y/b&dst=x/a", "want src"),
        ] {
            let mut c = request(addr, &format!("/policy/explain?{q}")).await;
            let bad = read_until(&mut c, want).await;
            assert!(bad.starts_with("HTTP/1.1 400"), "{q}: {bad}");
        }
    }
}
