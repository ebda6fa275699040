//! Pods: one worker task per pod drives its network, containers, restarts
//! and teardown; the [`Manager`] starts, adopts and stops workers and routes
//! containerd's task events to them.

pub mod probe;
pub mod status;
mod worker;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::{
    cgroup::Layout,
    cri::{Runtime, events::TaskEvent},
    dataplane::Dataplane,
    net::Network,
    state::{NetRecord, PodRecord, StateDir, now_unix},
};

/// Network policy enforcement on the pods' host-side veths (control mode;
/// a standalone node has none and attaches nothing).
pub trait PodPolicy: Send + Sync {
    /// The pod's veth exists and none of its containers runs yet: attach
    /// the policy programs and enforce the pod's policy. No process of the
    /// pod starts before the future resolves `Ok` (an `Err` is retried with
    /// the network step).
    fn pod_up(
        self: Arc<Self>,
        uid: String,
        pod: Pod,
        net: NetRecord,
    ) -> futures::future::BoxFuture<'static, Result<(), String>>;

    /// The pod's containers are gone: stop enforcing and detach.
    fn pod_down(
        self: Arc<Self>,
        uid: String,
        net: NetRecord,
    ) -> futures::future::BoxFuture<'static, Result<(), String>>;
}

/// Label keys on every containerd container weir creates.
pub mod labels {
    /// The pod uid.
    pub const POD_UID: &str = "io.weir.pod.uid";
    /// The pod name.
    pub const POD_NAME: &str = "io.weir.pod.name";
    /// The pod namespace.
    pub const POD_NAMESPACE: &str = "io.weir.pod.namespace";
    /// The container name.
    pub const CONTAINER: &str = "io.weir.container.name";
}

/// Settings of the pod machinery.
#[derive(Clone, Debug)]
pub struct Config {
    /// Node name.
    pub node: String,
    /// The node's IP (for status.hostIP).
    pub node_ip: Option<String>,
    /// Container logs go under `<log_dir>/<ns>_<pod>_<uid>/<container>.log`.
    pub log_dir: PathBuf,
    /// Per-pod runtime files (hosts) under `<run_dir>/pods/<uid>/`.
    pub run_dir: PathBuf,
    /// Directory of OCI image tarballs to import.
    pub image_dir: Option<PathBuf>,
    /// First back-off delay after a crash.
    pub backoff_initial: Duration,
    /// Back-off cap.
    pub backoff_max: Duration,
    /// Cluster DNS for the pods' /etc/resolv.conf (control mode); None
    /// keeps the image's own resolv.conf (standalone).
    pub dns: Option<PodDns>,
}

/// What a pod's /etc/resolv.conf points to.
#[derive(Clone, Debug)]
pub struct PodDns {
    /// The DNS service IP.
    pub nameserver: std::net::Ipv4Addr,
    /// The cluster domain (search path `<ns>.svc.<domain> svc.<domain> <domain>`).
    pub domain: String,
}

/// A pod the node should run.
#[derive(Clone, Debug)]
pub struct DesiredPod {
    /// Pod uid (stable for an unchanged manifest).
    pub uid: String,
    /// Where it came from.
    pub source: String,
    /// The validated pod.
    pub pod: Pod,
}

enum Msg {
    Task(TaskEvent),
    Resync,
    Probe(probe::Report),
    Stop(oneshot::Sender<()>),
}

struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    stopping: bool,
}

pub(crate) struct Shared {
    cfg: Config,
    rt: Runtime,
    net: Network,
    dp: Dataplane,
    state: StateDir,
    cgroups: Layout,
    workers: Mutex<HashMap<String, Handle>>,
    routes: Mutex<HashMap<String, String>>,
    views: RwLock<BTreeMap<String, Pod>>,
    ifindexes: RwLock<HashMap<String, u32>>,
    last_import: tokio::sync::Mutex<Option<Instant>>,
    /// Bounds how many pods run a start step at once: on a small node a
    /// burst of hundreds only thrashes (every step ends in runc, which is
    /// CPU-bound) and holds every in-flight step's memory at once.
    steps: tokio::sync::Semaphore,
    /// Bumped whenever a pod's view changes or its worker ends, for
    /// whoever reports pod status (control mode).
    changes: tokio::sync::watch::Sender<u64>,
    /// The socket load balancer (control mode): told about each pod's
    /// network namespace so its sockets are balanced.
    lb: OnceLock<Arc<crate::lb::Dataplane>>,
    /// Probe events (`Unhealthy`, `Killing`), for whoever records events.
    notes: tokio::sync::broadcast::Sender<probe::Note>,
    /// Network policy enforcement (control mode).
    policy: OnceLock<Arc<dyn PodPolicy>>,
}

impl Shared {
    /// Lets the load balancer act for a pod's sockets (its netns is up).
    fn lb_allow(&self, uid: &str) {
        let Some(lb) = self.lb.get() else { return };
        let path = self.net.config().netns_dir.join(uid);
        match crate::lb::netns_cookie(&path).map(|c| lb.allow_netns(c)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(uid, error = %e, "cannot allow the pod's netns in the load balancer");
            }
            Err(e) => tracing::warn!(uid, error = %e, "no netns cookie for the pod"),
        }
    }

    /// Stops the load balancer acting for a pod's sockets (before its netns
    /// goes).
    fn lb_forget(&self, uid: &str) {
        let Some(lb) = self.lb.get() else { return };
        let path = self.net.config().netns_dir.join(uid);
        if let Ok(cookie) = crate::lb::netns_cookie(&path)
            && let Err(e) = lb.forget_netns(cookie)
        {
            tracing::warn!(uid, error = %e, "cannot forget the pod's netns in the load balancer");
        }
    }
}

/// Probe events a slow recorder may fall behind by before the oldest are
/// dropped.
const NOTES_BACKLOG: usize = 1024;

/// Pods that may run a start step (network, containers) at the same time.
pub const CONCURRENT_STEPS: usize = 16;

/// Starts, adopts and stops pod workers.
#[derive(Clone)]
pub struct Manager(Arc<Shared>);

/// containerd id of a pod's container: short, unique per (pod, container).
pub fn container_id(uid: &str, name: &str) -> String {
    let h = Sha256::digest(uid.as_bytes());
    format!("{}-{name}", hex(&h[..6]))
}

impl Manager {
    /// A manager over the node's runtime, network, dataplane and state.
    pub fn new(
        cfg: Config,
        rt: Runtime,
        net: Network,
        dp: Dataplane,
        state: StateDir,
        cgroups: Layout,
    ) -> Self {
        Self(Arc::new(Shared {
            cfg,
            rt,
            net,
            dp,
            state,
            cgroups,
            workers: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            views: RwLock::new(BTreeMap::new()),
            ifindexes: RwLock::new(HashMap::new()),
            last_import: tokio::sync::Mutex::new(None),
            steps: tokio::sync::Semaphore::new(CONCURRENT_STEPS),
            changes: tokio::sync::watch::Sender::new(0),
            lb: OnceLock::new(),
            notes: tokio::sync::broadcast::Sender::new(NOTES_BACKLOG),
            policy: OnceLock::new(),
        }))
    }

    /// Hands the socket load balancer to the pods: every pod network
    /// namespace (the existing ones now, new ones as they are made) is
    /// allowed, and forgotten when the pod goes; `own` (the node's netns
    /// cookie) stays allowed. Namespaces it allowed for pods that are gone
    /// are forgotten.
    pub fn set_lb(&self, lb: Arc<crate::lb::Dataplane>, own: u64) {
        let mut want = vec![own];
        for uid in self.0.net.known_pods() {
            let path = self.0.net.config().netns_dir.join(&uid);
            match crate::lb::netns_cookie(&path) {
                Ok(cookie) => want.push(cookie),
                Err(e) => tracing::warn!(uid, error = %e, "no netns cookie for a pod"),
            }
        }
        for cookie in lb.allowed_netns() {
            if !want.contains(&cookie)
                && let Err(e) = lb.forget_netns(cookie)
            {
                tracing::warn!(cookie, error = %e, "cannot forget a netns in the load balancer");
            }
        }
        for cookie in want {
            if let Err(e) = lb.allow_netns(cookie) {
                tracing::warn!(cookie, error = %e, "cannot allow a netns in the load balancer");
            }
        }
        let _ = self.0.lb.set(lb);
    }

    /// Hands network policy enforcement to the pods: every pod whose
    /// network is set up from now on is enforced before its containers
    /// start. Pods adopted earlier are the caller's to take over (see
    /// [`Manager::pod_nets`]).
    pub fn set_policy(&self, policy: Arc<dyn PodPolicy>) {
        let _ = self.0.policy.set(policy);
    }

    /// The network of every recorded pod that is not being torn down:
    /// (uid, pod, network).
    pub fn pod_nets(&self) -> Vec<(String, Pod, NetRecord)> {
        self.0
            .state
            .load_all()
            .into_iter()
            .filter(|r| !r.terminating)
            .filter_map(|r| Some((r.uid, r.pod, r.net?)))
            .collect()
    }

    /// Pods with their status, for the API.
    pub fn pods(&self) -> Vec<Pod> {
        self.0
            .views
            .read()
            .expect("views lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// One pod with its status, by uid.
    pub fn pod_by_uid(&self, uid: &str) -> Option<Pod> {
        self.0
            .views
            .read()
            .expect("views lock poisoned")
            .get(uid)
            .cloned()
    }

    /// Whether a worker still runs (or stops) the pod with this uid; false
    /// once it is fully torn down.
    pub fn has_worker(&self, uid: &str) -> bool {
        self.0
            .workers
            .lock()
            .expect("workers lock poisoned")
            .contains_key(uid)
    }

    /// A receiver that sees a change whenever any pod's status changes or a
    /// pod's worker ends.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    /// The probe events (`Unhealthy`, `Killing`) of every pod from now on.
    pub fn probe_notes(&self) -> tokio::sync::broadcast::Receiver<probe::Note> {
        self.0.notes.subscribe()
    }

    /// Traffic counters and cgroup of each pod, for metrics.
    pub fn dataplane(&self) -> &Dataplane {
        &self.0.dp
    }

    /// The cgroup layout.
    pub fn cgroups(&self) -> &Layout {
        &self.0.cgroups
    }

    /// The containerd namespace (also the pods' cgroup parent).
    pub fn namespace(&self) -> &str {
        self.0.rt.namespace()
    }

    /// Log file of a container.
    pub fn log_path(&self, namespace: &str, name: &str, container: &str) -> Option<PathBuf> {
        let pod = self.pod(namespace, name)?;
        let uid = pod.metadata.uid.as_deref()?;
        Some(self.0.log_path(namespace, name, uid, container))
    }

    /// One pod with its status, by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let views = self.0.views.read().expect("views lock poisoned");
        views
            .values()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(namespace)
                    && p.metadata.name.as_deref() == Some(name)
            })
            .cloned()
    }

    /// Routes one containerd event to the worker that owns the container.
    pub fn dispatch(&self, ev: TaskEvent) {
        let workers = self.0.workers.lock().expect("workers lock poisoned");
        match &ev {
            TaskEvent::Resync => {
                for h in workers.values() {
                    let _ = h.tx.send(Msg::Resync);
                }
            }
            TaskEvent::Exit { container_id, .. } | TaskEvent::Oom { container_id } => {
                let routes = self.0.routes.lock().expect("routes lock poisoned");
                if let Some(h) = routes.get(container_id).and_then(|uid| workers.get(uid)) {
                    let _ = h.tx.send(Msg::Task(ev));
                }
            }
        }
    }

    /// Adopts every pod recorded by an earlier agent (without restarting
    /// anything that runs), then removes containers, networks and eBPF
    /// state that belong to no recorded pod.
    pub async fn adopt(&self) {
        let records = self.0.state.load_all();
        let uids: Vec<String> = records.iter().map(|r| r.uid.clone()).collect();
        for rec in records {
            tracing::info!(pod = %pod_key(&rec.pod), uid = %rec.uid, "adopting pod");
            self.spawn(rec, true);
        }
        self.collect_garbage(&uids).await;
    }

    async fn collect_garbage(&self, uids: &[String]) {
        let sh = &self.0;
        match sh.rt.list_containers().await {
            Ok(list) => {
                for (id, labels) in list {
                    let owner = labels.get(labels::POD_UID);
                    if owner.is_some_and(|u| uids.contains(u)) {
                        continue;
                    }
                    tracing::warn!(container = %id, "removing container of no known pod");
                    let _ = sh.rt.kill(&id, 9, true).await;
                    worker::wait_stopped(&sh.rt, &id, Duration::from_secs(5)).await;
                    if let Err(e) = sh
                        .rt
                        .delete_task(&id)
                        .await
                        .and(sh.rt.delete_container(&id).await)
                    {
                        tracing::warn!(container = %id, error = %e, "cannot remove stale container");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list containers for garbage collection"),
        }
        for uid in sh.net.known_pods() {
            if !uids.contains(&uid) {
                tracing::warn!(uid, "removing network of no known pod");
                sh.lb_forget(&uid);
                if let Err(e) = sh.net.teardown_pod(&uid).await {
                    tracing::warn!(uid, error = %e, "cannot remove stale pod network");
                }
            }
        }
    }

    /// Makes the running pods match `desired`: new pods start, pods no
    /// longer desired stop (and are cleaned up).
    pub fn reconcile(&self, desired: &[DesiredPod]) {
        let running: Vec<String> = {
            let w = self.0.workers.lock().expect("workers lock poisoned");
            w.iter()
                .filter(|(_, h)| !h.stopping)
                .map(|(u, _)| u.clone())
                .collect()
        };
        for uid in &running {
            if !desired.iter().any(|d| &d.uid == uid) {
                self.stop(uid);
            }
        }
        for d in desired {
            if running.contains(&d.uid) {
                continue;
            }
            if self
                .0
                .workers
                .lock()
                .expect("workers lock poisoned")
                .contains_key(&d.uid)
            {
                continue; // still stopping under this uid
            }
            let rec = PodRecord {
                uid: d.uid.clone(),
                source: d.source.clone(),
                pod: d.pod.clone(),
                created_at: now_unix(),
                net: None,
                containers: BTreeMap::new(),
                terminating: false,
            };
            tracing::info!(pod = %pod_key(&rec.pod), uid = %rec.uid, source = %rec.source, "starting pod");
            self.spawn(rec, false);
        }
    }

    /// Asks a pod's worker to stop; returns at once.
    fn stop(&self, uid: &str) {
        let mut w = self.0.workers.lock().expect("workers lock poisoned");
        if let Some(h) = w.get_mut(uid) {
            h.stopping = true;
            let (tx, _rx) = oneshot::channel();
            let _ = h.tx.send(Msg::Stop(tx));
        }
    }

    fn spawn(&self, rec: PodRecord, adopt: bool) {
        let (tx, rx) = mpsc::unbounded_channel();
        let me = tx.downgrade();
        {
            let mut routes = self.0.routes.lock().expect("routes lock poisoned");
            for c in rec.pod.spec.iter().flat_map(|s| &s.containers) {
                routes.insert(container_id(&rec.uid, &c.name), rec.uid.clone());
            }
        }
        let stopping = rec.terminating;
        self.0
            .workers
            .lock()
            .expect("workers lock poisoned")
            .insert(rec.uid.clone(), Handle { tx, stopping });
        let sh = self.0.clone();
        tokio::spawn(async move {
            let uid = rec.uid.clone();
            worker::Worker::new(sh.clone(), rec, rx, me)
                .run(adopt)
                .await;
            sh.workers
                .lock()
                .expect("workers lock poisoned")
                .remove(&uid);
            sh.routes
                .lock()
                .expect("routes lock poisoned")
                .retain(|_, u| u != &uid);
            sh.views.write().expect("views lock poisoned").remove(&uid);
            sh.ifindexes
                .write()
                .expect("ifindex lock poisoned")
                .remove(&uid);
            sh.changed();
        });
    }

    /// ifindex of a pod's host-side veth (key of its traffic counters).
    pub fn ifindex(&self, uid: &str) -> Option<u32> {
        self.0
            .ifindexes
            .read()
            .expect("ifindex lock poisoned")
            .get(uid)
            .copied()
    }

    /// Number of pods with a worker (running or stopping).
    pub fn worker_count(&self) -> usize {
        self.0.workers.lock().expect("workers lock poisoned").len()
    }
}

impl Shared {
    /// Tells subscribers that a pod changed.
    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn log_path(&self, namespace: &str, name: &str, uid: &str, container: &str) -> PathBuf {
        self.cfg
            .log_dir
            .join(format!("{namespace}_{name}_{uid}"))
            .join(format!("{container}.log"))
    }

    /// Imports the image directory, at most every 5 s (it is idempotent and
    /// cheap when nothing changed, but not free).
    async fn import_images(&self) {
        let Some(dir) = &self.cfg.image_dir else {
            return;
        };
        let mut last = self.last_import.lock().await;
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            return;
        }
        *last = Some(Instant::now());
        let (ok, errs) =
            crate::cri::image::import_dir(self.rt.channel(), self.rt.namespace(), dir).await;
        for e in errs {
            tracing::warn!(error = %e, "image import failed");
        }
        if !ok.is_empty() {
            tracing::debug!(count = ok.len(), "images imported");
        }
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `namespace/name` of a pod, for logs.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// Imports the image directory now (at agent start).
pub async fn import_images_now(mgr: &Manager) {
    *mgr.0.last_import.lock().await = None;
    mgr.0.import_images().await;
}
