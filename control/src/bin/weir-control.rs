//! weir-control: the thin control service. Holds the cluster's objects in a
//! store, serves the `Objects` API (users) and the `Nodes` API (agents), and
//! runs the scheduler and the controllers.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use weir_control::{
    api, controllers, nodes, scheduler,
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
/// etcd://host:port[,host:port...]` uses etcd.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address to serve the API on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,

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
}

impl Args {
    fn controllers(&self) -> controllers::Config {
        controllers::Config {
            node_monitor_grace_period: self.node_monitor_grace_period,
            node_monitor_period: self.node_monitor_period,
            burst_replicas: self.burst_replicas,
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
        serve(&args, Arc::new(store)).await
    } else {
        let path = PathBuf::from(&args.store);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let store =
            RedbStore::open(&path).with_context(|| format!("open store {}", path.display()))?;
        serve(&args, Arc::new(store)).await
    }
}

async fn serve<S: Store>(args: &Args, store: Arc<S>) -> anyhow::Result<()> {
    let listen = args.listen;
    let scheduler_config = args.scheduler()?;
    let api = Arc::new(api::ObjectsApi::new(store));
    api.ensure_default_namespaces()
        .await
        .context("create the default namespaces")?;
    tracing::info!(%listen, store = %args.store, "weir-control serving");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let controllers = (!args.disable_controllers)
        .then(|| controllers::spawn(Arc::clone(&api), args.controllers(), stopped.clone()));
    let scheduler = scheduler_config.map(|config| {
        let api = Arc::clone(&api);
        let mut stopped = stopped;
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(e) = scheduler::run(api, config, shutdown).await {
                tracing::error!(error = format!("{e:#}"), "scheduler stopped");
            }
        })
    });
    let (close, closed) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(api::service_from(Arc::clone(&api)))
            .add_service(nodes::service(Arc::clone(&api), args.nodes()))
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
    // heartbeats stop and evict every pod.
    stop.send_replace(true);
    for (what, task) in [("scheduler", scheduler), ("controllers", controllers)] {
        if let Some(task) = task
            && tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
        {
            tracing::warn!("{what} did not stop within 5s");
        }
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
