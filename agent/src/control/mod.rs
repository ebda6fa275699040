//! Control mode: the node joins a weir-control cluster instead of reading
//! a manifest directory.
//!
//! The agent registers first (which gives it its pod CIDR), then runs
//! three loops: heartbeats (re-registering if the control forgot the node),
//! the `WatchNode` stream (the pods bound to this node become the desired
//! set; peers become routes) and the status reporter (pod status to the
//! control, terminated pods, and `kubelet` events). Losing the control
//! never stops a pod: the desired set only changes on what the control
//! says, and the streams reconnect with backoff and resume.

pub mod events;
pub mod metrics;
pub mod policy;
mod report;
pub mod resources;
pub mod routes;
mod servicemap;
pub mod services;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use weir_proto::v1;
use weir_proto::v1::nodes_client::NodesClient;
use weir_proto::v1::objects_client::ObjectsClient;

use crate::net::Cidr;
use crate::pod::Manager;

/// First delay before a retry; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest delay between retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long one unary call to the control may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Who this node is, as it registers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The node's name.
    pub node: String,
    /// The node's IP, reachable from the other nodes.
    pub address: String,
    /// Extra node labels (`--node-labels`).
    pub labels: HashMap<String, String>,
    /// The agent's version (`nodeInfo.kubeletVersion`).
    pub version: String,
}

/// Cluster DNS (control mode): the zone the node's server answers from,
/// fed from the service table, and the local service entry that sends the
/// conventional DNS service IP to it.
#[derive(Debug, Clone)]
pub struct ClusterDns {
    /// The zone the node's DNS server answers from.
    pub zone: Arc<crate::dns::Zone>,
    /// The DNS service IP pods use (`--cluster-dns`, 10.96.0.10).
    pub service_ip: std::net::Ipv4Addr,
    /// This node's IP: the server listens on port 53 there.
    pub node_ip: std::net::Ipv4Addr,
}

impl ClusterDns {
    /// Port 53.
    pub const PORT: u16 = 53;

    /// The socket-LB entries (UDP and TCP) from the DNS service IP to this
    /// node's server.
    pub fn local_specs(&self) -> [crate::lb::ServiceSpec; 2] {
        [crate::lb::Protocol::Udp, crate::lb::Protocol::Tcp].map(|proto| crate::lb::ServiceSpec {
            vip: self.service_ip,
            port: Self::PORT,
            proto,
            backends: vec![(self.node_ip, Self::PORT)],
            affinity: None,
        })
    }
}

/// Why control mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The `--control` URL is not usable.
    #[error("--control {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The control handed out an assignment the agent cannot use.
    #[error("register: the control's {field} {value:?} is not a CIDR: {reason}")]
    Assignment {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// Cancelled before the node could register.
    #[error("stopped before the node could register")]
    Cancelled,
}

/// Parses `--node-labels k=v,k2=v2`.
pub fn parse_labels(text: &str) -> Result<HashMap<String, String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("node label {pair:?}: expected key=value"))?;
            if k.is_empty() {
                return Err(format!("node label {pair:?}: empty key"));
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The node's network assignment from the control.
#[derive(Debug, Clone, Copy)]
pub struct Assignment {
    /// This node's pod CIDR.
    pub pod_cidr: Cidr,
    /// The cluster's pod CIDR.
    pub cluster_cidr: Cidr,
    /// The service CIDR.
    pub service_cidr: Cidr,
    /// How often to heartbeat.
    pub heartbeat: Duration,
}

impl Assignment {
    /// Writes the assignment to `file` (atomically).
    pub fn save(&self, file: &Path) -> std::io::Result<()> {
        let text = serde_json::json!({
            "pod_cidr": self.pod_cidr.to_string(),
            "cluster_cidr": self.cluster_cidr.to_string(),
            "service_cidr": self.service_cidr.to_string(),
            "heartbeat_interval_ms": u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX),
        })
        .to_string();
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, file)
    }

    /// The assignment cached in `file`, if it is there and readable.
    pub fn load(file: &Path) -> Option<Self> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
        let text = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Self::from_response(&v1::RegisterResponse {
            pod_cidr: text("pod_cidr"),
            cluster_cidr: text("cluster_cidr"),
            service_cidr: text("service_cidr"),
            heartbeat_interval_ms: v
                .get("heartbeat_interval_ms")
                .and_then(serde_json::Value::as_u64)?,
        })
        .ok()
    }

    fn from_response(r: &v1::RegisterResponse) -> Result<Self, ControlError> {
        let cidr = |field: &'static str, value: &str| {
            value.parse::<Cidr>().map_err(|e| ControlError::Assignment {
                field,
                value: value.to_owned(),
                reason: e.to_string(),
            })
        };
        Ok(Self {
            pod_cidr: cidr("pod_cidr", &r.pod_cidr)?,
            cluster_cidr: cidr("cluster_cidr", &r.cluster_cidr)?,
            service_cidr: cidr("service_cidr", &r.service_cidr)?,
            heartbeat: Duration::from_millis(r.heartbeat_interval_ms.max(100)),
        })
    }
}

/// The agent's connection to weir-control.
#[derive(Clone)]
pub struct Control {
    settings: Arc<Settings>,
    nodes: NodesClient<Channel>,
    objects: ObjectsClient<Channel>,
    /// The connection itself, for the other services' clients.
    channel: Channel,
}

/// The next backoff delay after `d`.
pub fn next_backoff(d: Duration) -> Duration {
    (d * 2).min(BACKOFF_MAX)
}

impl Control {
    /// A (lazy) connection to the control at `url` (e.g.
    /// `http://10.0.0.1:7443`); nothing is sent yet.
    pub fn new(url: &str, settings: Settings) -> Result<Self, ControlError> {
        let bad = |reason: String| ControlError::Url {
            url: url.to_owned(),
            reason,
        };
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        Ok(Self {
            settings: Arc::new(settings),
            nodes: NodesClient::new(channel.clone()),
            objects: ObjectsClient::new(channel.clone()),
            channel,
        })
    }

    fn register_request(&self) -> v1::RegisterRequest {
        let capacity = resources::capacity();
        v1::RegisterRequest {
            node_name: self.settings.node.clone(),
            allocatable: Some(resources::allocatable(&capacity)),
            capacity: Some(capacity),
            labels: self.settings.labels.clone(),
            address: self.settings.address.clone(),
            agent_version: self.settings.version.clone(),
        }
    }

    /// Registers once.
    async fn register_once(&self) -> Result<v1::RegisterResponse, tonic::Status> {
        let mut nodes = self.nodes.clone();
        match tokio::time::timeout(CALL_TIMEOUT, nodes.register(self.register_request())).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded("register timed out")),
        }
    }

    /// Registers, retrying with backoff until the control answers (or
    /// `cancel`), and returns the node's assignment, which is also kept in
    /// `cache`. If the control is unreachable and an earlier assignment is
    /// cached, that one is used at once (the pods this node runs keep their
    /// network; heartbeats re-register once the control is back).
    pub async fn register(
        &self,
        cache: &Path,
        cancel: &CancellationToken,
    ) -> Result<Assignment, ControlError> {
        let mut delay = BACKOFF_INITIAL;
        loop {
            match self.register_once().await {
                Ok(r) => {
                    tracing::info!(node = %self.settings.node, pod_cidr = %r.pod_cidr, "registered with the control");
                    let a = Assignment::from_response(&r)?;
                    if let Err(e) = a.save(cache) {
                        tracing::warn!(file = %cache.display(), error = %e, "cannot cache the assignment");
                    }
                    return Ok(a);
                }
                Err(s) => {
                    let unreachable = matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::DeadlineExceeded
                            | tonic::Code::Unknown
                    );
                    if unreachable && let Some(a) = Assignment::load(cache) {
                        tracing::warn!(error = %s.message(), pod_cidr = %a.pod_cidr, "the control is unreachable; starting with the cached assignment");
                        return Ok(a);
                    }
                    tracing::warn!(error = %s.message(), code = ?s.code(), retry_in = ?delay, "cannot register with the control; retrying");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return Err(ControlError::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
            delay = next_backoff(delay);
        }
    }

    /// Runs heartbeats, the node watch and the status reporter until
    /// `cancel`. Pods keep running whatever happens to the control.
    pub async fn run(
        self,
        mgr: Manager,
        assignment: Assignment,
        lb: Option<Arc<crate::lb::Dataplane>>,
        dns: Option<ClusterDns>,
        cancel: CancellationToken,
    ) {
        let dns_task = dns.as_ref().map(|d| {
            let addr = std::net::SocketAddr::from((d.node_ip, ClusterDns::PORT));
            let (zone, cancel) = (d.zone.clone(), cancel.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::dns::serve(addr, zone, cancel).await {
                    tracing::error!(error = %e, "no cluster DNS on this node");
                }
            })
        });
        let metrics = tokio::spawn(metrics::push(self.channel.clone(), cancel.clone()));
        let policy = Arc::new(policy_hub(&self.settings.address));
        let enforcer = load_enforcer(&mgr, &policy);
        let shared = Arc::new(Shared {
            control: self,
            mgr,
            assignment,
            lb,
            dns,
            services: Mutex::new(services::ServiceTable::default()),
            policy,
            desired: Mutex::new(Desired::default()),
            desired_changed: Notify::new(),
            started: crate::state::now_unix(),
        });
        let beat = tokio::spawn(heartbeats(shared.clone(), cancel.clone()));
        let follow = tokio::spawn(watch::follow(shared.clone(), cancel.clone()));
        let probes = tokio::spawn(events::record_probes(shared.clone(), cancel.clone()));
        let isolation = enforcer.clone();
        if let Some(e) = &enforcer {
            set_explainer(&shared, e.clone());
        }
        let enforce = enforcer.map(|e| {
            let sh = shared.clone();
            let fresh: Arc<policy::enforce::FreshPods> =
                Arc::new(move |uid: &str| sh.desired().pods.get(uid).map(|p| p.pod.clone()));
            tokio::spawn(policy::enforce::run(
                e,
                shared.mgr.clone(),
                fresh,
                cancel.clone(),
            ))
        });
        let flows = isolation.and_then(|e| start_flows(&shared, e, cancel.clone()));
        let report = tokio::spawn(report::run(shared, cancel.clone()));
        let _ = tokio::join!(beat, follow, probes, report, metrics);
        if let Some(t) = enforce {
            let _ = t.await;
        }
        if let Some(t) = flows {
            let _ = t.await;
        }
        if let Some(t) = dns_task {
            let _ = t.await;
        }
    }
}

/// One pod the control has bound to this node.
#[derive(Debug, Clone)]
pub(crate) struct ControlPod {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) pod: k8s_openapi::api::core::v1::Pod,
    /// `metadata.deletionTimestamp` is set: stop it, then report it
    /// terminated.
    pub(crate) deleting: bool,
    /// The resource version the agent last saw.
    pub(crate) resource_version: u64,
}

/// The desired state as the control last said it.
#[derive(Debug, Default)]
pub(crate) struct Desired {
    /// uid → pod.
    pub(crate) pods: BTreeMap<String, ControlPod>,
    /// A full list has been received: until then the adopted pods run
    /// untouched.
    pub(crate) synced: bool,
}

/// What the three loops share.
pub(crate) struct Shared {
    pub(crate) control: Control,
    pub(crate) mgr: Manager,
    pub(crate) assignment: Assignment,
    /// The socket load balancer, if it could be loaded.
    pub(crate) lb: Option<Arc<crate::lb::Dataplane>>,
    /// Cluster DNS, fed from the service table.
    pub(crate) dns: Option<ClusterDns>,
    /// Every service the control sent, as the load balancer needs them.
    pub(crate) services: Mutex<services::ServiceTable>,
    /// Network policy state (namespaces, identities, policies, ipcache).
    pub(crate) policy: Arc<policy::PolicyHub>,
    pub(crate) desired: Mutex<Desired>,
    /// Woken when the desired set changes (the reporter looks again).
    pub(crate) desired_changed: Notify,
    /// When this agent started (unix seconds).
    pub(crate) started: i64,
}

impl Shared {
    pub(crate) fn node(&self) -> &str {
        &self.control.settings.node
    }

    pub(crate) fn desired(&self) -> std::sync::MutexGuard<'_, Desired> {
        self.desired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Loads network policy enforcement on the node's pin directory and hands
/// it to the pods; `None` (logged: policies are not enforced) if the
/// kernel refuses it.
fn load_enforcer(
    mgr: &Manager,
    hub: &Arc<policy::PolicyHub>,
) -> Option<Arc<policy::enforce::Enforcer>> {
    match policy::enforce::Enforcer::load(mgr.dataplane().pin_dir(), hub.clone()) {
        Ok(e) => {
            let e = Arc::new(e);
            mgr.set_policy(e.clone());
            Some(e)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot load the network policy dataplane: policies are NOT enforced on this node");
            None
        }
    }
}

/// Reads the policy programs' flow records (pinned next to the policy maps)
/// into the agent's flow hub, served at `/flows` and in `/metrics`, named
/// from the policy state: pod IPs → namespace/pod, rule numbers → policy,
/// a denial's endpoint → the policies isolating it (from the enforcer).
fn start_flows(
    shared: &Arc<Shared>,
    enforcer: Arc<policy::enforce::Enforcer>,
    cancel: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let pin_dir = shared.mgr.dataplane().pin_dir().to_path_buf();
    let (reader, counters) =
        match crate::flows::open(&pin_dir, &crate::flows::FlowSettings::default()) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "no flow records on this node");
                return None;
            }
        };
    let hub_state = shared.policy.clone();
    let bytes_from = enforcer.clone();
    let enrich = crate::flows::Enricher {
        pod_of: Box::new(move |ip| {
            hub_state.read(|d| {
                d.ipcache()
                    .get(&ip)
                    .map(|e| (e.namespace.clone(), e.pod.clone()))
            })
        }),
        policy_of: Box::new(|n| policy::rules::rule_name(n).map(|r| r.to_string())),
    };
    let hub = Arc::new(
        crate::flows::FlowHub::new(shared.node(), FLOW_HISTORY, enrich)
            .with_counters(counters)
            .with_isolation(Box::new(move |ep, dir| {
                let dir = if dir == weir_common::DIR_INGRESS {
                    policy::Direction::Ingress
                } else {
                    policy::Direction::Egress
                };
                enforcer
                    .isolation(ep)
                    .map(|i| i.get(dir).iter().map(ToString::to_string).collect())
                    .unwrap_or_default()
            })),
    );
    crate::http::set_flow_hub(hub.clone());
    let map = start_service_map(shared, &hub, bytes_from, cancel.clone());
    Some(tokio::spawn(async move {
        if let Err(e) = crate::flows::run(reader, hub, cancel).await {
            tracing::error!(error = %e, "flow records stopped");
        }
        let _ = map.await;
    }))
}

/// Aggregates the hub's flows into service map edges and reports them to
/// the control (bytes from `enforcer`'s conntrack).
fn start_service_map(
    shared: &Arc<Shared>,
    hub: &Arc<crate::flows::FlowHub>,
    enforcer: Arc<policy::enforce::Enforcer>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let table = Arc::new(Mutex::new(crate::flows::edges::EdgeTable::new(
        shared.node(),
    )));
    let agg = tokio::spawn(crate::flows::edges::aggregate(
        hub.clone(),
        table.clone(),
        cancel.clone(),
    ));
    let push = tokio::spawn(servicemap::run(
        shared.clone(),
        table,
        Some(enforcer),
        cancel,
    ));
    tokio::spawn(async move {
        let _ = tokio::join!(agg, push);
    })
}

/// Serves `GET /policy/explain` from the enforcer's maps and the policy
/// state.
fn set_explainer(shared: &Arc<Shared>, enforcer: Arc<policy::enforce::Enforcer>) {
    let node = shared.node().to_owned();
    crate::http::set_policy_explainer(Arc::new(move |q| {
        let local = |ns: &str, name: &str| enforcer.local_endpoint(ns, name);
        let data = enforcer.hub().read(Clone::clone);
        policy::explain::explain(&*enforcer, &data, &local, &node, q)
    }));
}

/// Flow records kept in memory for `/flows`.
const FLOW_HISTORY: usize = 10_000;

/// The policy state, knowing this node's address as the host identity.
fn policy_hub(address: &str) -> policy::PolicyHub {
    let hub = policy::PolicyHub::default();
    hub.set_host_ips(address.parse().into_iter().collect());
    hub
}

fn summaries(mgr: &Manager) -> Vec<v1::PodSummary> {
    mgr.pods()
        .into_iter()
        .map(|p| v1::PodSummary {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            uid: p.metadata.uid.clone().unwrap_or_default(),
            phase: p
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// Heartbeats every interval; re-registers when the control no longer
/// knows the node.
async fn heartbeats(sh: Arc<Shared>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(sh.assignment.heartbeat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        let capacity = resources::capacity();
        let req = v1::HeartbeatRequest {
            node_name: sh.node().to_owned(),
            allocatable: Some(resources::allocatable(&capacity)),
            capacity: Some(capacity),
            pods: summaries(&sh.mgr),
        };
        let mut nodes = sh.control.nodes.clone();
        let sent = tokio::time::timeout(CALL_TIMEOUT, nodes.heartbeat(req)).await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                tracing::warn!("the control does not know this node; registering again");
                match sh.control.register_once().await {
                    Ok(r) if r.pod_cidr != sh.assignment.pod_cidr.to_string() => {
                        tracing::error!(
                            was = %sh.assignment.pod_cidr, now = %r.pod_cidr,
                            "the control assigned another pod CIDR; pods keep their addresses until the agent restarts"
                        );
                    }
                    Ok(_) => tracing::info!("registered again"),
                    Err(s) => tracing::warn!(error = %s.message(), "register again failed"),
                }
            }
            Ok(Err(s)) => tracing::debug!(error = %s.message(), "heartbeat failed"),
            Err(_) => tracing::debug!("heartbeat timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_refuse_clearly() {
        let l = parse_labels("zone=a, disk=ssd,empty=").unwrap();
        assert_eq!(l["zone"], "a");
        assert_eq!(l["disk"], "ssd");
        assert_eq!(l["empty"], "");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("novalue").unwrap_err().contains("key=value"));
        assert!(parse_labels("=x").unwrap_err().contains("empty key"));
    }

    #[test]
    fn assignments_round_trip_through_the_cache() {
        let dir = std::env::temp_dir().join(format!("weir-assign-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("control.json");
        assert!(Assignment::load(&file).is_none());
        let a = Assignment::from_response(&v1::RegisterResponse {
            pod_cidr: "10.244.3.0/24".into(),
            cluster_cidr: "10.244.0.0/16".into(),
            service_cidr: "10.96.0.0/16".into(),
            heartbeat_interval_ms: 5000,
        })
        .unwrap();
        a.save(&file).unwrap();
        let b = Assignment::load(&file).unwrap();
        assert_eq!(b.pod_cidr, a.pod_cidr);
        assert_eq!(b.service_cidr, a.service_cidr);
        assert_eq!(b.heartbeat, Duration::from_secs(5));
        let bad = Assignment::from_response(&v1::RegisterResponse {
            pod_cidr: "nope".into(),
            ..Default::default()
        });
        assert!(bad.unwrap_err().to_string().contains("pod_cidr"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backoff_doubles_to_ten_seconds() {
        let mut d = BACKOFF_INITIAL;
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_backoff(d);
            seen.push(d);
        }
        assert_eq!(seen[1], Duration::from_millis(400));
        assert_eq!(*seen.last().unwrap(), BACKOFF_MAX);
    }
}
