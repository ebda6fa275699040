//! weir-control: the thin control service. Holds the cluster's objects in a
//! store and serves the `Objects` API (so far; the `Nodes` service, the
//! scheduler and the controllers come next).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use weir_control::{
    api, nodes,
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

    // --- Nodes service (agents) ---
    /// The cluster's pod CIDR; each node gets a /24 of it.
    #[arg(long, default_value = "10.244.0.0/16", value_name = "CIDR")]
    cluster_cidr: nodes::Cidr,

    /// The service CIDR handed to agents.
    #[arg(long, default_value = "10.96.0.0/16", value_name = "CIDR")]
    service_cidr: nodes::Cidr,

    /// How often agents heartbeat (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
}

/// Parses `500ms`, `5s`, `2m` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 5s, 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration {s:?}: unit must be ms, s or m")),
    }
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
    let api = Arc::new(api::ObjectsApi::new(store));
    api.ensure_default_namespaces()
        .await
        .context("create the default namespaces")?;
    tracing::info!(%listen, store = %args.store, "weir-control serving");
    // --- Nodes service (agents) ---
    let nodes = nodes::service(
        Arc::clone(&api),
        nodes::NodesConfig {
            cluster_cidr: args.cluster_cidr,
            service_cidr: args.service_cidr,
            heartbeat_interval: args.heartbeat_interval,
            ..nodes::NodesConfig::default()
        },
    );
    // --- end Nodes service ---
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    tonic::transport::Server::builder()
        .add_service(api::service_from(Arc::clone(&api)))
        .add_service(nodes)
        .serve_with_shutdown(listen, shutdown)
        .await
        .with_context(|| format!("serve on {listen}"))
}
