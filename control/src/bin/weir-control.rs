//! weir-control: the thin control service. Holds the cluster's objects in a
//! store, serves the `Objects` API (users) and the `Nodes` API (agents), and
//! runs the scheduler and the controllers.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use tokio::sync::watch;
use weir_control::{
    api, controllers, leader, metrics, nodes, scheduler,
    store::{EtcdStore, RedbStore, Store},
};

/// weir's control service.
///
/// Stores the cluster's objects (Kubernetes-shaped namespaces, pods, replica
/// sets, deployments, daemon sets, nodes and events) and serves them over gRPC:
/// `weir.v1.Objects` for users and weirctl (`Apply`, `UpdateStatus`, `Get`,
/// `List`, `Delete`, `Watch`) and `weir.v1.Nodes` for agents (`Register`,
/// `Heartbeat`, `WatchNode`, `ReportPodStatus`). Runs the controllers
/// (replica sets, deployments, daemon sets, node lifecycle). With no flags it
/// keeps its objects in an embedded redb file; `--store
/// etcd://host:port[,host:port...]` uses etcd, where several weir-controls
/// may share one cluster: all serve the API, and the one elected leader
/// through an etcd lease runs the controllers and the scheduler.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address to serve the API on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,

    /// Address to serve Prometheus `/metrics` on (empty: don't).
    #[arg(long, default_value = "0.0.0.0:7444")]
    metrics_listen: String,

    /// Where objects live: a redb file path (default) or
    /// `etcd://host:port[,host:port...]`.
    #[arg(long, default_value = "/var/lib/weir/control/weir.redb")]
    store: String,

    /// Key prefix of weir's objects in etcd.
    #[arg(long, default_value = "/weir")]
    etcd_prefix: String,

    // --- Nodes service (agents) ---
    /// The cluster's pod CIDR; each node gets a /24 of it.
    #[arg(long, default_value = "10.244.0.0/16", value_name = "CIDR")]
    cluster_cidr: nodes::Cidr,

    /// The service CIDR handed to agents.
    #[arg(long, default_value = "10.96.0.0/16", value_name = "CIDR")]
    service_cidr: nodes::Cidr,

    /// How often agents heartbeat (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = controllers::parse_duration)]
    heartbeat_interval: Duration,

    // --- controllers ---
    /// How long a node may miss heartbeats before it is marked
    /// `Ready=Unknown`, tainted unreachable and its pods evicted.
    #[arg(long, default_value = "40s", value_parser = controllers::parse_duration)]
    node_monitor_grace_period: Duration,

    /// How often the node lifecycle controller checks every node's heartbeat.
    #[arg(long, default_value = "5s", value_parser = controllers::parse_duration)]
    node_monitor_period: Duration,

    /// Most pods one `ReplicaSet` reconcile creates or deletes at once.
    #[arg(long, default_value_t = 500)]
    burst_replicas: usize,

    /// How long events are kept after they last happened.
    #[arg(long, default_value = "1h", value_parser = controllers::parse_duration)]
    event_ttl: Duration,

    /// `HorizontalPodAutoscaler` sync: 0s (default) reconciles an HPA on
    /// every metrics report of its target's pods (and on HPA or target
    /// changes, with a 15s resync); a period (e.g. 15s, Kubernetes'
    /// default) syncs every HPA at that period only.
    #[arg(long, default_value = "0s", value_parser = controllers::parse_duration)]
    hpa_sync_period: Duration,

    /// Serve the API only: run neither the scheduler nor the controllers
    /// (for tests and debugging; nothing then acts on the objects).
    #[arg(long)]
    disable_controllers: bool,

    // --- scheduler ---
    /// Scheduler configuration, YAML, every key optional (camelCase):
    /// `weights: {leastAllocated: 1, mostAllocated: 0, balancedAllocation: 1,
    /// selectorSpread: 2, nodeAffinity: 2, podAffinity: 2, taintToleration: 3}`
    /// (0 turns a score off; `mostAllocated` > 0 with `leastAllocated: 0`
    /// packs pods), `percentageOfNodesToScore` (0 = adaptive as
    /// kube-scheduler: on 100+ nodes stop filtering once 50% minus 1% per
    /// 125 nodes, at least 5%, were found feasible), `bindConcurrency`
    /// (256), `recordScheduledEvents` (true), `unschedulableFlushSeconds`
    /// (30), `schedulerName` (default-scheduler).
    #[arg(long, value_name = "FILE")]
    scheduler_config: Option<PathBuf>,

    /// Do not run the scheduler (pods stay pending unless bound otherwise).
    #[arg(long)]
    no_scheduler: bool,

    // --- leader election (etcd store) ---
    /// With the etcd store: the leader lease's TTL. A leader renews it every
    /// third of it and stops leading once it passes unrenewed; a standby
    /// takes over within about this long after the leader dies.
    #[arg(long, default_value = "10s", value_parser = controllers::parse_duration)]
    leader_lease: Duration,

    /// With the etcd store: this control's identity in leader election
    /// (default `<hostname>-<pid>`).
    #[arg(long)]
    leader_id: Option<String>,
}

impl Args {
    fn controllers(&self) -> controllers::Config {
        controllers::Config {
            node_monitor_grace_period: self.node_monitor_grace_period,
            node_monitor_period: self.node_monitor_period,
            burst_replicas: self.burst_replicas,
            event_ttl: self.event_ttl,
            hpa_sync_period: self.hpa_sync_period,
            ..controllers::Config::default()
        }
    }

    /// The scheduler's configuration, or `None` if it is not to run.
    fn scheduler(&self) -> anyhow::Result<Option<scheduler::Config>> {
        if self.no_scheduler || self.disable_controllers {
            return Ok(None);
        }
        Ok(Some(match &self.scheduler_config {
            Some(path) => scheduler::Config::load(path)?,
            None => scheduler::Config::default(),
        }))
    }

    /// Leader election settings (checked even where unused, so a bad flag
    /// is refused on every store).
    fn leader(&self) -> anyhow::Result<leader::Config> {
        let id = self.leader_id.clone().unwrap_or_else(leader::default_id);
        Ok(leader::Config::new(id, self.leader_lease)?)
    }

    fn nodes(&self) -> nodes::NodesConfig {
        nodes::NodesConfig {
            cluster_cidr: self.cluster_cidr,
            service_cidr: self.service_cidr,
            heartbeat_interval: self.heartbeat_interval,
            ..nodes::NodesConfig::default()
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    let result = runtime.block_on(run(args));
    // Don't wait on anything still blocked (e.g. a store call): serve has
    // already stopped everything that writes.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(endpoints) = args.store.strip_prefix("etcd://") {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(|e| format!("http://{e}"))
            .collect();
        let store = EtcdStore::connect(&endpoints, &args.etcd_prefix)
            .await
            .with_context(|| format!("connect to etcd at {}", args.store))?;
        let lock = leader::EtcdLock::new(
            store.client(),
            format!("{}{}", store.key_prefix(), leader::LEADER_KEY),
        );
        let elector = leader::Elector::new(lock, args.leader()?);
        serve(&args, Arc::new(store), Some(elector)).await
    } else {
        let path = PathBuf::from(&args.store);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let store =
            RedbStore::open(&path).with_context(|| format!("open store {}", path.display()))?;
        serve(&args, Arc::new(store), None).await
    }
}

async fn serve<S: Store>(
    args: &Args,
    store: Arc<S>,
    elector: Option<leader::Elector<leader::EtcdLock>>,
) -> anyhow::Result<()> {
    let listen = args.listen;
    let leader_config = args.leader()?;
    // --- metrics (agents' samples, in memory; read by the autoscaler) ---
    let metrics_store = metrics::MetricsStore::new();
    let leading = Leading {
        id: leader_config.id.clone(),
        controllers: (!args.disable_controllers).then(|| controllers::Config {
            metrics: Some(Arc::clone(&metrics_store)),
            ..args.controllers()
        }),
        scheduler: args.scheduler()?,
    };
    let api = Arc::new(api::ObjectsApi::new(store).with_service_cidr(args.service_cidr));
    api.ensure_default_namespaces()
        .await
        .context("create the default namespaces")?;
    tracing::info!(%listen, store = %args.store, "weir-control serving");
    let (stop, stopped) = watch::channel(false);
    let background = spawn_leader_work(&api, leading, elector, stopped);
    spawn_metrics_endpoint(args, &api, &metrics_store, &stop)?;
    let (close, closed) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(api::service_from(Arc::clone(&api)))
            .add_service(nodes::service(Arc::clone(&api), args.nodes()))
            // The cluster service map (agents report edges, readers get them).
            .add_service(weir_control::servicemap::service(Arc::clone(&api)))
            .add_service(metrics::service(
                Arc::clone(&metrics_store),
                Arc::clone(&api),
            ))
            .serve_with_shutdown(listen, async {
                let _ = closed.await;
            }),
    );
    let early_exit = tokio::select! {
        () = signalled() => None,
        exited = &mut server => Some(exited),
    };
    // Stop everything that acts on the cluster first, while agents can
    // still reach us: a node controller outliving the server would see the
    // heartbeats stop and evict every pod. A leader then resigns.
    stop.send_replace(true);
    if let Some(background) = background
        && tokio::time::timeout(Duration::from_secs(10), background)
            .await
            .is_err()
    {
        tracing::warn!("the controllers and the scheduler did not stop within 10s");
    }
    let outcome = if let Some(exited) = early_exit {
        exited
    } else {
        let _ = close.send(());
        // Agents' WatchNode streams never end by themselves: give requests
        // in flight a moment, then go.
        if let Ok(exited) = tokio::time::timeout(Duration::from_secs(2), &mut server).await {
            exited
        } else {
            server.abort();
            tracing::info!("closed the agents' streams");
            Ok(Ok(()))
        }
    };
    outcome
        .context("server task")?
        .with_context(|| format!("serve on {listen}"))
}

/// Serves `/metrics` on `--metrics-listen` (unless empty) until shutdown.
fn spawn_metrics_endpoint<S: Store>(
    args: &Args,
    api: &Arc<api::ObjectsApi<S>>,
    store: &Arc<metrics::MetricsStore>,
    stop: &watch::Sender<bool>,
) -> anyhow::Result<()> {
    if args.metrics_listen.is_empty() {
        return Ok(());
    }
    let listen: SocketAddr = args
        .metrics_listen
        .parse()
        .with_context(|| format!("--metrics-listen {:?}", args.metrics_listen))?;
    let (api, store) = (Arc::clone(api), Arc::clone(store));
    let mut stopped = stop.subscribe();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        if let Err(e) = metrics::exporter::serve(listen, api, store, shutdown).await {
            tracing::error!(%listen, error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn signalled() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        } => {}
    }
}

// --- leader election: who runs the controllers and the scheduler ---
//
// With redb there is one control, always the leader: its work runs until
// shutdown. With etcd the work runs only while this process holds the
// leader lease (`leader::Elector`), and stops as soon as it loses it. With
// --disable-controllers there is no work and no campaign.

/// What the leader runs, and who it is.
#[derive(Clone)]
struct Leading {
    id: String,
    controllers: Option<controllers::Config>,
    scheduler: Option<scheduler::Config>,
}

/// Starts the leader's work: under `elector` if there is one, else at
/// once. The task ends once `shutdown` turns true and the work stopped.
fn spawn_leader_work<S: Store>(
    api: &Arc<api::ObjectsApi<S>>,
    leading: Leading,
    elector: Option<leader::Elector<leader::EtcdLock>>,
    shutdown: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if leading.controllers.is_none() && leading.scheduler.is_none() {
        return None;
    }
    let api = Arc::clone(api);
    let term = move |stop| lead(Arc::clone(&api), leading.clone(), stop);
    Some(match elector {
        Some(elector) => tokio::spawn(elector.run(term, shutdown)),
        None => tokio::spawn(term(shutdown)),
    })
}

/// One term of leadership: records it, runs the controllers and the
/// scheduler until `stop` turns true, then waits (bounded) for them.
async fn lead<S: Store>(
    api: Arc<api::ObjectsApi<S>>,
    leading: Leading,
    mut stop: watch::Receiver<bool>,
) {
    leader::record_became_leader(&api, &leading.id).await;
    let controllers = leading
        .controllers
        .map(|config| controllers::spawn(Arc::clone(&api), config, stop.clone()));
    let scheduler = leading.scheduler.map(|config| {
        let api = Arc::clone(&api);
        let mut stopped = stop.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(e) = scheduler::run(api, config, shutdown).await {
                tracing::error!(error = format!("{e:#}"), "scheduler stopped");
            }
        })
    });
    let _ = stop.wait_for(|stop| *stop).await;
    // Both stop side by side within one bound, inside the elector's grace.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let scheduler = async {
        if let Some(scheduler) = scheduler
            && tokio::time::timeout_at(deadline, scheduler).await.is_err()
        {
            tracing::warn!("scheduler did not stop within 4s");
        }
    };
    let controllers = async {
        if let Some(controllers) = controllers
            && tokio::time::timeout_at(deadline, controllers)
                .await
                .is_err()
        {
            tracing::warn!("controllers did not stop within 4s");
        }
    };
    tokio::join!(scheduler, controllers);
}
