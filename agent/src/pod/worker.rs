//! One pod's lifecycle: network, containers, restarts with back-off,
//! graceful termination and teardown. Every step is idempotent, so a worker
//! that adopts a pod after an agent restart resumes wherever the last one
//! stopped.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::FutureExt as _;
use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::{sync::mpsc, time::Instant};

use super::{
    Msg, Shared, container_id, labels, pod_key,
    probe::{self, AbortOnDrop},
    status::{
        ContainerView, Live, keep_transition_times, pod_status, restart_delay, should_restart,
    },
};
use crate::{
    cri::{
        ContainerParams, Runtime, TaskState,
        events::TaskEvent,
        image, process_args,
        spec::{SpecParams, build},
    },
    state::{ContainerRecord, NetRecord, PodRecord, Terminated, now_unix},
};

const SIGTERM: u32 = 15;
const SIGKILL: u32 = 9;
/// A run this long resets the back-off, as kubelet does.
const BACKOFF_RESET_AFTER: i64 = 600;
/// How long an exit by SIGKILL waits for its OOM event to arrive.
const OOM_GRACE: Duration = Duration::from_millis(300);
/// Retry interval for steps that failed for reasons outside the pod.
const RETRY: Duration = Duration::from_secs(2);

pub(super) struct Worker {
    sh: Arc<Shared>,
    rec: PodRecord,
    rx: mpsc::UnboundedReceiver<Msg>,
    deferred: VecDeque<Msg>,
    live: BTreeMap<String, Live>,
    retry_at: HashMap<String, Instant>,
    oom: HashMap<String, bool>,
    netns: Option<PathBuf>,
    net_error: Option<String>,
    /// The traffic counters' attach, running off the async threads while
    /// the containers are created; awaited before any process starts.
    attach: Option<Attach>,
    /// The worker's own channel, for its containers' probe tasks.
    me: mpsc::WeakUnboundedSender<Msg>,
    /// Probe state of each running container.
    probes: HashMap<String, Probing>,
    /// Numbers container runs, so a stale probe report is ignored.
    runs: u64,
}

/// The probes of one container run, as far as the worker knows them.
struct Probing {
    run: u64,
    /// The probe task; stops when this is dropped.
    task: Option<AbortOnDrop>,
    /// The startup probe succeeded (or there is none).
    started: bool,
    /// The readiness probe's result; `None` without a readiness probe
    /// (ready once started).
    ready: Option<bool>,
    /// A failed liveness or startup probe is killing the container.
    killing: bool,
}

/// An eBPF attach in flight (each TCX attach waits out an RCU grace period
/// under RTNL, ~11 ms here, so it must not sit on the runtime's threads).
type Attach = futures::future::Shared<futures::future::BoxFuture<'static, Result<(), String>>>;

impl Worker {
    pub(super) fn new(
        sh: Arc<Shared>,
        rec: PodRecord,
        rx: mpsc::UnboundedReceiver<Msg>,
        me: mpsc::WeakUnboundedSender<Msg>,
    ) -> Self {
        Self {
            sh,
            rec,
            rx,
            deferred: VecDeque::new(),
            live: BTreeMap::new(),
            retry_at: HashMap::new(),
            oom: HashMap::new(),
            netns: None,
            net_error: None,
            attach: None,
            me,
            probes: HashMap::new(),
            runs: 0,
        }
    }

    fn containers(&self) -> Vec<Container> {
        self.rec
            .pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()
    }

    fn policy(&self) -> String {
        self.rec
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn ns(&self) -> &str {
        self.rec
            .pod
            .metadata
            .namespace
            .as_deref()
            .unwrap_or("default")
    }

    fn name(&self) -> &str {
        self.rec.pod.metadata.name.as_deref().unwrap_or("")
    }

    fn save(&self) {
        // fsync: keep it off the runtime's few threads' critical path.
        if let Err(e) = tokio::task::block_in_place(|| self.sh.state.save(&self.rec)) {
            tracing::error!(pod = %pod_key(&self.rec.pod), error = %e, "cannot save pod record");
        }
    }

    fn cid(&self, name: &str) -> String {
        container_id(&self.rec.uid, name)
    }

    /// The worker's loop. Each step is boxed: a task's future is as large
    /// as its largest state, and a worker spends its life waiting for a
    /// message, so the steps' big futures (tonic calls, netlink) are only
    /// allocated while a step runs. At 250 pods this is most of the agent's
    /// per-pod memory.
    pub(super) async fn run(mut self, adopt: bool) {
        for c in self.containers() {
            let id = self.cid(&c.name);
            self.rec
                .containers
                .entry(c.name.clone())
                .or_insert_with(|| ContainerRecord {
                    id,
                    ..Default::default()
                });
            let live = match self.rec.containers[&c.name].last_terminated.clone() {
                Some(t) if self.rec.containers[&c.name].done => Live::Terminated(t),
                _ => Live::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                },
            };
            self.live.insert(c.name.clone(), live);
        }
        if self.rec.terminating {
            Box::pin(self.terminate()).await;
            return;
        }
        self.save();
        if adopt {
            Box::pin(self.adopt_tasks()).await;
        }
        loop {
            Box::pin(self.converge()).await;
            self.publish();
            let msg = if let Some(m) = self.deferred.pop_front() {
                Some(m)
            } else {
                let wake = self.retry_at.values().min().copied();
                tokio::select! {
                    m = self.rx.recv() => m,
                    () = sleep_until(wake) => continue,
                }
            };
            match msg {
                None => return, // manager gone: leave the pod running
                Some(Msg::Stop(done)) => {
                    Box::pin(self.terminate()).await;
                    let _ = done.send(());
                    return;
                }
                Some(Msg::Resync) => Box::pin(self.resync()).await,
                Some(Msg::Probe(r)) => self.on_probe(r),
                Some(Msg::Task(ev)) => Box::pin(self.on_event(ev)).await,
            }
        }
    }

    /// Reads what containerd has for each container after an agent restart.
    async fn adopt_tasks(&mut self) {
        for c in self.containers() {
            if matches!(self.live.get(&c.name), Some(Live::Terminated(_))) {
                continue;
            }
            let id = self.cid(&c.name);
            match self.sh.rt.task_state(&id).await {
                Ok(TaskState::Running { .. }) => {
                    let started_at = self.rec.containers[&c.name]
                        .started_at
                        .unwrap_or_else(now_unix);
                    self.live
                        .insert(c.name.clone(), Live::Running { started_at });
                    self.start_probes(&c, started_at);
                }
                Ok(TaskState::Stopped {
                    exit_status,
                    exited_at,
                }) => {
                    self.on_exit(&c.name, exit_status, exited_at, false).await;
                }
                Ok(TaskState::Created) => {
                    let _ = self.sh.rt.kill(&id, SIGKILL, true).await;
                    let _ = self.sh.rt.delete_task(&id).await;
                }
                Ok(TaskState::Absent) => {}
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot read task state; will retry");
                }
            }
        }
    }

    /// Re-reads task states after the event stream reconnected.
    async fn resync(&mut self) {
        let running: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| matches!(l, Live::Running { .. }))
            .map(|(n, _)| n.clone())
            .collect();
        for name in running {
            let id = self.cid(&name);
            match self.sh.rt.task_state(&id).await {
                Ok(TaskState::Stopped {
                    exit_status,
                    exited_at,
                }) => self.on_exit(&name, exit_status, exited_at, false).await,
                Ok(TaskState::Absent) => self.on_exit(&name, 255, None, false).await,
                _ => {}
            }
        }
    }

    async fn on_event(&mut self, ev: TaskEvent) {
        let name_of = |id: &str| {
            self.rec
                .containers
                .iter()
                .find(|(_, c)| c.id == id)
                .map(|(n, _)| n.clone())
        };
        match ev {
            TaskEvent::Oom { container_id } => {
                if let Some(n) = name_of(&container_id) {
                    self.oom.insert(n, true);
                }
            }
            TaskEvent::Exit {
                container_id,
                exit_status,
                exited_at,
            } => {
                let Some(name) = name_of(&container_id) else {
                    return;
                };
                if !matches!(self.live.get(&name), Some(Live::Running { .. })) {
                    return;
                }
                if exit_status == 128 + SIGKILL && !self.oom.get(&name).copied().unwrap_or(false) {
                    self.await_oom(&container_id, &name).await;
                }
                let oom = self.oom.remove(&name).unwrap_or(false);
                self.on_exit(&name, exit_status, exited_at, oom).await;
            }
            TaskEvent::Resync => self.resync().await,
        }
    }

    /// After a SIGKILL exit, waits briefly for an OOM event that containerd
    /// may publish after the exit; other messages are kept for later.
    async fn await_oom(&mut self, cid: &str, name: &str) {
        let deadline = Instant::now() + OOM_GRACE;
        loop {
            let m = tokio::select! {
                m = self.rx.recv() => m,
                () = tokio::time::sleep_until(deadline) => return,
            };
            match m {
                Some(Msg::Task(TaskEvent::Oom { container_id })) if container_id == cid => {
                    self.oom.insert(name.to_owned(), true);
                    return;
                }
                Some(other) => self.deferred.push_back(other),
                None => return,
            }
        }
    }

    /// Records how a run ended and decides about the restart.
    async fn on_exit(&mut self, name: &str, exit_status: u32, exited_at: Option<i64>, oom: bool) {
        let id = self.cid(name);
        // The OOM event can trail the exit event by more than the grace we
        // give it; the kernel's own count in the container's cgroup (gone
        // once the task is deleted) settles it.
        let cgroup = format!("/{}/{}/{name}", self.sh.rt.namespace(), self.rec.uid);
        let oom = oom
            || (exit_status == 128 + SIGKILL
                && self.sh.cgroups.oom_kills(&cgroup).is_some_and(|n| n > 0));
        if let Err(e) = self.sh.rt.delete_task(&id).await {
            tracing::warn!(container = %id, error = %e, "cannot delete exited task");
        }
        let code = i32::try_from(exit_status).unwrap_or(i32::MAX);
        let reason = if oom {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let t = Terminated {
            exit_code: code,
            reason: reason.into(),
            message: None,
            started_at: self.rec.containers[name].started_at,
            finished_at: exited_at.or_else(|| Some(now_unix())),
        };
        tracing::info!(pod = %pod_key(&self.rec.pod), container = name, exit_code = code, reason, "container exited");
        self.finished(name, t);
    }

    fn finished(&mut self, name: &str, t: Terminated) {
        self.probes.remove(name);
        let policy = self.policy();
        let (initial, max) = (self.sh.cfg.backoff_initial, self.sh.cfg.backoff_max);
        let pod = format!("{}_{}({})", self.name(), self.ns(), self.rec.uid);
        let c = self
            .rec
            .containers
            .get_mut(name)
            .expect("container record exists for every spec container");
        if t.started_at
            .zip(t.finished_at)
            .is_some_and(|(s, f)| f - s >= BACKOFF_RESET_AFTER)
        {
            c.backoff_index = 0;
        }
        c.started_at = None;
        c.last_terminated = Some(t.clone());
        if should_restart(&policy, t.exit_code) {
            let delay = restart_delay(c.backoff_index, initial, max);
            c.backoff_index = c.backoff_index.saturating_add(1);
            let live = if delay.is_zero() {
                Live::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                }
            } else {
                Live::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(format!(
                        "back-off {}s restarting failed container={name} pod={pod}",
                        delay.as_secs()
                    )),
                }
            };
            self.live.insert(name.to_owned(), live);
            self.retry_at
                .insert(name.to_owned(), Instant::now() + delay);
        } else {
            c.done = true;
            self.live.insert(name.to_owned(), Live::Terminated(t));
            self.retry_at.remove(name);
        }
        self.save();
    }

    /// Brings network and containers as far as they can go right now.
    /// Whether a container waits to be started and its retry time has come.
    fn due(&self, name: &str, now: Instant) -> bool {
        matches!(self.live.get(name), Some(Live::Waiting { .. }))
            && self.retry_at.get(name).is_none_or(|t| *t <= now)
    }

    async fn converge(&mut self) {
        let now = Instant::now();
        if self.netns.is_some() && !self.containers().iter().any(|c| self.due(&c.name, now)) {
            return;
        }
        let sh = self.sh.clone();
        let _permit = sh
            .steps
            .acquire()
            .await
            .expect("the step semaphore is never closed");
        if self.netns.is_none() && !self.setup_network().await {
            return;
        }
        let now = Instant::now();
        for c in self.containers() {
            if self.due(&c.name, now) {
                self.start_container(&c).await;
            }
        }
    }

    async fn setup_network(&mut self) -> bool {
        match self.sh.net.setup_pod(&self.rec.uid).await {
            Ok(net) => {
                let rec = NetRecord {
                    ip: net.ip,
                    host_veth: net.host_veth.clone(),
                    host_ifindex: net.host_ifindex,
                };
                let (sh, veth, ifindex) =
                    (self.sh.clone(), net.host_veth.clone(), net.host_ifindex);
                let attach = tokio::task::spawn_blocking(move || sh.dp.attach_pod(&veth, ifindex));
                // Network policy is enforced before any process starts too.
                let policy = self
                    .sh
                    .policy
                    .get()
                    .cloned()
                    .map(|p| p.pod_up(self.rec.uid.clone(), self.rec.pod.clone(), rec.clone()));
                self.attach = Some(
                    futures::FutureExt::boxed(async move {
                        match attach.await {
                            Ok(r) => r.map_err(|e| format!("attach traffic counters: {e}"))?,
                            Err(e) => return Err(format!("attach traffic counters: {e}")),
                        }
                        match policy {
                            Some(up) => {
                                up.await.map_err(|e| format!("enforce network policy: {e}"))
                            }
                            None => Ok(()),
                        }
                    })
                    .shared(),
                );
                if let Err(e) = self.write_hosts(net.ip) {
                    return self.net_failed(format!("write /etc/hosts, /etc/resolv.conf: {e}"));
                }
                self.rec.net = Some(rec);
                self.sh.lb_allow(&self.rec.uid);
                self.netns = Some(net.netns_path);
                self.net_error = None;
                self.save();
                true
            }
            Err(e) => self.net_failed(e.to_string()),
        }
    }

    fn net_failed(&mut self, msg: String) -> bool {
        tracing::warn!(pod = %pod_key(&self.rec.pod), error = %msg, "pod network setup failed; retrying");
        for (name, live) in &mut self.live {
            if matches!(live, Live::Waiting { .. }) {
                *live = Live::Waiting {
                    reason: "ContainerCreating".into(),
                    message: Some(format!("pod network: {msg}")),
                };
                self.retry_at.insert(name.clone(), Instant::now() + RETRY);
            }
        }
        self.net_error = Some(msg);
        false
    }

    fn hosts_path(&self) -> PathBuf {
        self.sh
            .cfg
            .run_dir
            .join("pods")
            .join(&self.rec.uid)
            .join("hosts")
    }

    fn write_hosts(&self, ip: std::net::Ipv4Addr) -> std::io::Result<()> {
        let path = self.hosts_path();
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let text = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{}\n",
            self.name()
        );
        std::fs::write(path, text)?;
        if let Some(dns) = &self.sh.cfg.dns {
            std::fs::write(
                self.resolv_path(),
                crate::dns::resolv_conf(dns.nameserver, self.ns(), &dns.domain),
            )?;
        }
        Ok(())
    }

    /// The pod's /etc/resolv.conf on the node (control mode).
    fn resolv_path(&self) -> PathBuf {
        self.hosts_path().with_file_name("resolv.conf")
    }

    async fn start_container(&mut self, c: &Container) {
        let image_ref = image::normalize_reference(c.image.as_deref().unwrap_or_default());
        let ns = self.sh.rt.namespace().to_owned();
        let mut top = image::resolve(self.sh.rt.channel(), &ns, &image_ref).await;
        if matches!(top, Ok(None)) {
            self.sh.import_images().await;
            top = image::resolve(self.sh.rt.channel(), &ns, &image_ref).await;
        }
        let top = match top {
            Ok(Some(t)) => t,
            Ok(None) => {
                let dir = self
                    .sh
                    .cfg
                    .image_dir
                    .as_ref()
                    .map_or_else(|| "--image-dir".into(), |d| d.display().to_string());
                self.wait(
                    &c.name,
                    "ErrImageNeverPull",
                    format!("image \"{image_ref}\" is not present on node {} and weir never pulls; put its OCI tarball in {dir}", self.sh.cfg.node),
                    Duration::from_secs(5),
                );
                return;
            }
            Err(e) => {
                self.wait(
                    &c.name,
                    "ContainerCreating",
                    format!("resolve image: {e}"),
                    RETRY,
                );
                return;
            }
        };
        let result = self.create_and_start(c, &image_ref, &top).await;
        let result = match result {
            Err(StartFailure::Dataplane(msg)) => {
                // The container is created but not started: retry the
                // attach (with the network step) and start it then.
                tracing::warn!(pod = %pod_key(&self.rec.pod), error = %msg, "retrying");
                self.attach = None;
                self.netns = None;
                self.wait(&c.name, "ContainerCreating", msg, RETRY);
                return;
            }
            Err(StartFailure::Cri(e)) => Err(e),
            Ok(()) => Ok(()),
        };
        if !matches!(&result, Err(e) if e.is_unavailable()) {
            // An attempt after an earlier run is a restart, whether or not
            // the process comes up.
            let rec = self
                .rec
                .containers
                .get_mut(&c.name)
                .expect("container record exists");
            if rec.last_terminated.is_some() {
                rec.restart_count += 1;
            }
        }
        match result {
            Ok(()) => {
                let now = now_unix();
                let rec = self
                    .rec
                    .containers
                    .get_mut(&c.name)
                    .expect("container record exists");
                rec.started_at = Some(now);
                self.retry_at.remove(&c.name);
                self.live
                    .insert(c.name.clone(), Live::Running { started_at: now });
                self.start_probes(c, now);
                self.save();
                tracing::info!(pod = %pod_key(&self.rec.pod), container = %c.name, "container started");
            }
            Err(e) if e.is_unavailable() => {
                self.wait(
                    &c.name,
                    "ContainerCreating",
                    format!("containerd unavailable: {e}"),
                    RETRY,
                );
            }
            Err(e) => {
                // The process could not be started (bad command, ...): a
                // failed run, subject to the restart policy and back-off.
                // Start afresh next time: the container record and its
                // snapshot may hold what made the start fail.
                let id = self.cid(&c.name);
                let _ = self.sh.rt.delete_task(&id).await;
                let _ = self.sh.rt.delete_container(&id).await;
                tracing::warn!(pod = %pod_key(&self.rec.pod), container = %c.name, error = %e, "container failed to start");
                let t = Terminated {
                    exit_code: 128,
                    reason: "StartError".into(),
                    message: Some(e.to_string()),
                    started_at: None,
                    finished_at: Some(now_unix()),
                };
                self.finished(&c.name, t);
            }
        }
    }

    fn wait(&mut self, name: &str, reason: &str, message: String, retry: Duration) {
        self.live.insert(
            name.to_owned(),
            Live::Waiting {
                reason: reason.into(),
                message: Some(message),
            },
        );
        self.retry_at
            .insert(name.to_owned(), Instant::now() + retry);
    }

    async fn create_and_start(
        &self,
        c: &Container,
        image_ref: &str,
        top: &str,
    ) -> Result<(), StartFailure> {
        let rt = &self.sh.rt;
        let img = rt.image_config(image_ref).await?;
        let command = c.command.clone().unwrap_or_default();
        let args = c.args.clone().unwrap_or_default();
        let mut env: Vec<String> = img.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        env.push(format!("HOSTNAME={}", self.name()));
        for e in c.env.iter().flatten() {
            env.push(format!(
                "{}={}",
                e.name,
                e.value.clone().unwrap_or_default()
            ));
        }
        let cwd = c
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .or_else(|| Some(img.working_dir.clone()).filter(|w| !w.is_empty()))
            .unwrap_or_else(|| "/".into());
        let res = resources(c);
        let id = self.cid(&c.name);
        let cgroups_path = format!("/{}/{}/{}", rt.namespace(), self.rec.uid, c.name);
        let netns = self
            .netns
            .clone()
            .expect("network is set up before containers start");
        let hosts = self.hosts_path();
        // Control mode only; a pod adopted from before cluster DNS has none.
        let resolv = Some(self.resolv_path()).filter(|p| self.sh.cfg.dns.is_some() && p.exists());
        let spec = build(&SpecParams {
            args: process_args(&command, &args, &img),
            env,
            cwd: &cwd,
            hostname: self.name(),
            netns: &netns,
            cgroups_path: &cgroups_path,
            shim_group: &self.rec.uid,
            hosts_file: Some(&hosts),
            resolv_file: resolv.as_deref(),
            cpu_request_millis: res.0,
            cpu_limit_millis: res.1,
            memory_limit_bytes: res.2,
        });
        let labels = HashMap::from([
            (labels::POD_UID.to_owned(), self.rec.uid.clone()),
            (labels::POD_NAME.to_owned(), self.name().to_owned()),
            (labels::POD_NAMESPACE.to_owned(), self.ns().to_owned()),
            (labels::CONTAINER.to_owned(), c.name.clone()),
        ]);
        // A previous run's task may linger (agent killed between exit and delete).
        rt.delete_task(&id).await?;
        let mounts = rt
            .ensure_container(&ContainerParams {
                id: &id,
                image: image_ref,
                labels,
                spec,
                parent_snapshot: top,
            })
            .await?;
        let log = self
            .sh
            .log_path(self.ns(), self.name(), &self.rec.uid, &c.name);
        if let Some(d) = log.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        rt.create_task(&id, mounts, &log).await?;
        // No process runs before its pod's traffic is counted.
        if let Some(attach) = self.attach.clone()
            && let Err(e) = attach.await
        {
            return Err(StartFailure::Dataplane(e));
        }
        rt.start_task(&id).await?;
        Ok(())
    }

    fn grace(&self) -> Duration {
        let grace = self
            .rec
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(grace).unwrap_or(0))
    }

    /// Starts the probes of a container that runs since `started_at` (unix
    /// seconds); without probes it is started and ready at once.
    fn start_probes(&mut self, c: &Container, started_at: i64) {
        self.runs += 1;
        let set = probe::Set::of(c);
        let ready = set.readiness.as_ref().map(|_| false);
        let started = set.startup.is_none();
        let task = match (&self.rec.net, set.is_empty()) {
            (Some(net), false) => {
                let ran_for = u64::try_from(now_unix() - started_at).unwrap_or(0);
                let since = Instant::now()
                    .checked_sub(Duration::from_secs(ran_for))
                    .unwrap_or_else(Instant::now);
                let target = probe::Target {
                    ip: net.ip,
                    rt: self.sh.rt.clone(),
                    container_id: self.cid(&c.name),
                };
                Some(probe::spawn(
                    self.me.clone(),
                    c.name.clone(),
                    self.runs,
                    target,
                    set,
                    since,
                    probe::Recorder {
                        sink: self.sh.notes.clone(),
                        pod_uid: self.rec.uid.clone(),
                    },
                ))
            }
            _ => None,
        };
        self.probes.insert(
            c.name.clone(),
            Probing {
                run: self.runs,
                task,
                started,
                ready,
                killing: false,
            },
        );
    }

    /// A probe task's report: readiness changes are published; a failed
    /// liveness or startup probe kills the container (SIGTERM, the pod's
    /// grace period, SIGKILL), whose exit then restarts it per the restart
    /// policy.
    fn on_probe(&mut self, r: probe::Report) {
        let pod = pod_key(&self.rec.pod);
        let grace = self.grace();
        let id = self.cid(&r.container);
        let Some(p) = self.probes.get_mut(&r.container).filter(|p| p.run == r.run) else {
            return;
        };
        match r.event {
            probe::Event::Started => p.started = true,
            probe::Event::Ready(ready) => {
                tracing::info!(pod = %pod, container = %r.container, ready, "readiness changed");
                p.ready = Some(ready);
            }
            probe::Event::Unhealthy { kind, message } => {
                if p.killing {
                    return;
                }
                p.killing = true;
                p.ready = p.ready.map(|_| false);
                p.started = false;
                p.task = None;
                tracing::warn!(pod = %pod, container = %r.container, %message, "{} probe failed; container will be restarted", kind.name());
                let rt = self.sh.rt.clone();
                tokio::spawn(async move {
                    if let Err(e) = rt.kill(&id, SIGTERM, false).await {
                        tracing::warn!(container = %id, error = %e, "SIGTERM failed");
                    }
                    if !wait_stopped(&rt, &id, grace).await {
                        let _ = rt.kill(&id, SIGKILL, true).await;
                    }
                });
            }
        }
    }

    /// Graceful stop (SIGTERM, grace period, SIGKILL) and full teardown.
    async fn terminate(&mut self) {
        tracing::info!(pod = %pod_key(&self.rec.pod), "stopping pod");
        self.probes.clear();
        self.rec.terminating = true;
        self.save();
        // Shown as Terminating (deletionTimestamp set) until it is gone.
        self.rec.pod.metadata.deletion_timestamp =
            k8s_openapi::jiff::Timestamp::from_second(now_unix())
                .ok()
                .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
        self.publish();
        let grace = self
            .rec
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
        let ids: Vec<String> = self.rec.containers.values().map(|c| c.id.clone()).collect();
        let rt = self.sh.rt.clone();
        for id in &ids {
            if let Err(e) = rt.kill(id, SIGTERM, false).await {
                tracing::warn!(container = %id, error = %e, "SIGTERM failed");
            }
        }
        let deadline = Instant::now() + grace;
        for id in &ids {
            let left = deadline.saturating_duration_since(Instant::now());
            if !wait_stopped(&rt, id, left).await {
                tracing::info!(container = %id, "grace period over; sending SIGKILL");
                let _ = rt.kill(id, SIGKILL, true).await;
                wait_stopped(&rt, id, Duration::from_secs(10)).await;
            }
        }
        let mut clean = true;
        for id in &ids {
            if let Err(e) = rt.delete_task(id).await.and(rt.delete_container(id).await) {
                tracing::warn!(container = %id, error = %e, "cannot remove container");
                clean = false;
            }
        }
        if let Some(net) = &self.rec.net {
            // Each TCX detach waits out an RCU grace period: off the runtime.
            let (sh, veth, ifindex) = (self.sh.clone(), net.host_veth.clone(), net.host_ifindex);
            let detached = tokio::task::spawn_blocking(move || sh.dp.detach_pod(&veth, ifindex))
                .await
                .unwrap_or_else(|e| Err(crate::dataplane::DataplaneError::Task(e.to_string())));
            if let Err(e) = detached {
                tracing::warn!(error = %e, "cannot detach traffic counters");
                clean = false;
            }
        }
        if let (Some(net), Some(policy)) = (&self.rec.net, self.sh.policy.get().cloned())
            && let Err(e) = policy.pod_down(self.rec.uid.clone(), net.clone()).await
        {
            tracing::warn!(error = %e, "cannot stop enforcing network policy");
            clean = false;
        }
        self.sh.lb_forget(&self.rec.uid);
        if let Err(e) = self.sh.net.teardown_pod(&self.rec.uid).await {
            tracing::warn!(error = %e, "cannot tear down pod network");
            clean = false;
        }
        self.sh
            .cgroups
            .remove(&format!("/{}/{}", rt.namespace(), self.rec.uid));
        let log_dir = self.sh.log_path(self.ns(), self.name(), &self.rec.uid, "x");
        if let Some(d) = log_dir.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(d) = self.hosts_path().parent() {
            let _ = std::fs::remove_dir_all(d);
        }
        if clean {
            if let Err(e) = self.sh.state.remove(&self.rec.uid) {
                tracing::warn!(error = %e, "cannot remove pod record");
            }
            tracing::info!(pod = %pod_key(&self.rec.pod), "pod removed");
        } else {
            tracing::warn!(pod = %pod_key(&self.rec.pod), "teardown incomplete; the next agent start finishes it");
        }
    }

    fn publish(&self) {
        let views: Vec<ContainerView> = self
            .containers()
            .iter()
            .map(|c| ContainerView {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                live: self.live.get(&c.name).cloned().unwrap_or(Live::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                }),
                record: self
                    .rec
                    .containers
                    .get(&c.name)
                    .cloned()
                    .unwrap_or_default(),
                started: self.probes.get(&c.name).is_some_and(|p| p.started),
                ready: self
                    .probes
                    .get(&c.name)
                    .is_some_and(|p| p.started && p.ready.unwrap_or(true)),
            })
            .collect();
        let mut pod: Pod = self.rec.pod.clone();
        pod.metadata.uid = Some(self.rec.uid.clone());
        if let Some(spec) = pod.spec.as_mut() {
            spec.node_name = Some(self.sh.cfg.node.clone());
        }
        let mut status = pod_status(
            &views,
            self.rec.net.as_ref().map(|n| n.ip),
            self.sh.cfg.node_ip.as_deref(),
            self.rec.created_at,
            now_unix(),
        );
        let mut published = self.sh.views.write().expect("views lock poisoned");
        let old = published.get(&self.rec.uid).and_then(|p| p.status.as_ref());
        keep_transition_times(&mut status, old);
        pod.status = Some(status);
        published.insert(self.rec.uid.clone(), pod);
        drop(published);
        if let Some(n) = &self.rec.net {
            self.sh
                .ifindexes
                .write()
                .expect("ifindex lock poisoned")
                .insert(self.rec.uid.clone(), n.host_ifindex);
        }
        self.sh.changed();
    }
}

/// Why a container did not start.
enum StartFailure {
    /// containerd refused or is unreachable.
    Cri(crate::cri::CriError),
    /// The pod's traffic counters could not be attached.
    Dataplane(String),
}

impl From<crate::cri::CriError> for StartFailure {
    fn from(e: crate::cri::CriError) -> Self {
        Self::Cri(e)
    }
}

/// cpu request, cpu limit (millicores) and memory limit (bytes) of a
/// container; quantities were validated when the manifest was read.
fn resources(c: &Container) -> (Option<u64>, Option<u64>, Option<u64>) {
    use weir_proto::manifest::{parse_cpu_millis, parse_memory_bytes};
    let r = c.resources.as_ref();
    let get = |which: &str, key: &str| {
        r.and_then(|r| {
            if which == "requests" {
                r.requests.as_ref()
            } else {
                r.limits.as_ref()
            }
        })
        .and_then(|m| m.get(key))
        .map(|q| q.0.clone())
    };
    (
        get("requests", "cpu").and_then(|q| parse_cpu_millis(&q).ok()),
        get("limits", "cpu").and_then(|q| parse_cpu_millis(&q).ok()),
        get("limits", "memory").and_then(|q| parse_memory_bytes(&q).ok()),
    )
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Polls until the task is stopped or gone, at most `limit`; true if it is.
pub(super) async fn wait_stopped(rt: &Runtime, id: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match rt.task_state(id).await {
            Ok(TaskState::Stopped { .. } | TaskState::Absent) => return true,
            Ok(_) | Err(_) if Instant::now() >= deadline => return false,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
