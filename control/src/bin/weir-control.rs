//! weir-control: the thin control service. Holds the cluster's objects in a
//! store and serves the `Objects` API (so far; the `Nodes` service, the
//! scheduler and the controllers come next).

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Parser;
use weir_control::{
    api, scheduler,
    store::{EtcdStore, RedbStore, Store},
};

/// weir's control service.
///
/// Stores the cluster's objects (Kubernetes-shaped: Namespace and Pod so
/// far) and serves them over gRPC (`weir.v1.Objects`: `Apply`, `UpdateStatus`,
/// `Get`, `List`, `Delete`, `Watch`). With no flags it keeps its objects in an
/// embedded redb file; `--store etcd://host:port[,host:port...]` uses etcd.
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

    // --- scheduler (control/src/scheduler) ---
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // --- scheduler config (control/src/scheduler) ---
    let scheduler = if args.no_scheduler {
        None
    } else {
        Some(match &args.scheduler_config {
            Some(path) => scheduler::Config::load(path)?,
            None => scheduler::Config::default(),
        })
    };
    // --- end scheduler config ---
    if let Some(endpoints) = args.store.strip_prefix("etcd://") {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(|e| format!("http://{e}"))
            .collect();
        let store = EtcdStore::connect(&endpoints, &args.etcd_prefix)
            .await
            .with_context(|| format!("connect to etcd at {}", args.store))?;
        serve(args.listen, Arc::new(store), &args.store, scheduler).await
    } else {
        let path = PathBuf::from(&args.store);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let store =
            RedbStore::open(&path).with_context(|| format!("open store {}", path.display()))?;
        serve(args.listen, Arc::new(store), &args.store, scheduler).await
    }
}

async fn serve<S: Store>(
    listen: SocketAddr,
    store: Arc<S>,
    what: &str,
    scheduler: Option<scheduler::Config>,
) -> anyhow::Result<()> {
    tracing::info!(%listen, store = what, "weir-control serving");
    let api = Arc::new(api::ObjectsApi::new(store));
    // --- scheduler (control/src/scheduler): runs beside the server ---
    let scheduler_task = scheduler.map(|config| {
        let api = Arc::clone(&api);
        tokio::spawn(async move {
            if let Err(e) = scheduler::run(api, config, std::future::pending()).await {
                tracing::error!(error = format!("{e:#}"), "scheduler stopped");
            }
        })
    });
    // --- end scheduler ---
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let served = tonic::transport::Server::builder()
        .add_service(api::service_from(api))
        .serve_with_shutdown(listen, shutdown)
        .await
        .with_context(|| format!("serve on {listen}"));
    if let Some(task) = scheduler_task {
        task.abort();
    }
    served
}
