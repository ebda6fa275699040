//! weir-agent: runs a node's pods through containerd, wires their network
//! with netlink and counts their traffic in eBPF.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use weir_agent::{
    cgroup::Layout,
    control::{self, Assignment, Control},
    cri::{self, Runtime, events},
    dataplane::Dataplane,
    http,
    net::{Cidr, Network, NodeNetConfig},
    pod::{self, Manager},
    standalone,
    state::StateDir,
};

/// weir's node agent.
///
/// Runs the pods of one node: each pod gets a network namespace with a veth
/// and an IP from the node's pod CIDR, its containers run through containerd
/// (runc) in the agent's own containerd namespace, and eBPF programs on each
/// pod's veth count its traffic. With --control the node joins a
/// weir-control cluster: it registers (and gets its pod CIDR), heartbeats,
/// runs the pods bound to it and reports their status. Without it the agent
/// runs in standalone mode: the Pod manifests in --manifest-dir are the
/// node's pods (add a file to start, change it to replace, remove it to stop).
///
/// Killing the agent leaves pods, addresses and pinned eBPF state in place;
/// the next start adopts them without restarting anything.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Node name; names the containerd namespace, state, logs and bpffs dirs.
    #[arg(long, env = "WEIR_NODE_NAME")]
    node_name: String,

    /// Network namespace to run in (the node's), entered before anything
    /// else. Without it the agent uses its own (production hosts).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,

    /// The node's IP, reported as the pods' hostIP (and, with --control,
    /// the address other nodes route this node's pods through; required
    /// then).
    #[arg(long)]
    node_ip: Option<String>,

    /// weir-control's URL, e.g. `http://10.0.0.1:7443`: control mode (the
    /// pod CIDR comes from the control; no manifest directory).
    #[arg(long, value_name = "URL")]
    control: Option<String>,

    /// Extra node labels (control mode), e.g. `zone=a,disk=ssd`.
    #[arg(long, value_name = "K=V,...", value_parser = control::parse_labels)]
    node_labels: Option<HashMap<String, String>>,

    /// containerd's socket.
    #[arg(
        long,
        default_value = "/run/containerd/containerd.sock",
        value_name = "PATH"
    )]
    containerd_socket: PathBuf,

    /// containerd namespace for this node's containers (and the pods'
    /// cgroup parent). Default: weir-<node-name>.
    #[arg(long)]
    containerd_namespace: Option<String>,

    /// This node's pod CIDR (a /24 of the cluster CIDR); standalone mode.
    #[arg(long, value_name = "CIDR", required_unless_present = "control")]
    pod_cidr: Option<Cidr>,

    /// The cluster's pod CIDR; kept behind an `unreachable` route.
    #[arg(long, default_value = "10.244.0.0/16", value_name = "CIDR")]
    cluster_cidr: Cidr,

    /// The service CIDR; kept behind an `unreachable` route.
    #[arg(long, default_value = "10.96.0.0/16", value_name = "CIDR")]
    service_cidr: Cidr,

    /// The cluster DNS domain (control mode): the agent answers
    /// `<svc>.<ns>.svc.<domain>` on its node IP, port 53.
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    cluster_domain: String,

    /// The DNS service IP pods get as their nameserver (control mode);
    /// each node sends it to its own DNS server.
    #[arg(long, default_value = "10.96.0.10", value_name = "IP")]
    cluster_dns: std::net::Ipv4Addr,

    /// Directory of Pod manifests (standalone mode).
    #[arg(long, value_name = "DIR", required_unless_present = "control")]
    manifest_dir: Option<PathBuf>,

    /// Directory of OCI image tarballs, imported at start and whenever a pod
    /// needs an image that is not present (weir never pulls).
    #[arg(long, value_name = "DIR")]
    image_dir: Option<PathBuf>,

    /// Local state (IPAM leases, pod records). Default: /var/lib/weir/<node>.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Container logs. Default: /var/log/weir/<node>.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,

    /// Runtime files (pod netns mounts, hosts files). Default: /run/weir.
    #[arg(long, default_value = "/run/weir", value_name = "DIR")]
    run_dir: PathBuf,

    /// bpffs mount; weir pins under <bpffs>/weir/<node>/.
    #[arg(long, default_value = "/sys/fs/bpf", value_name = "DIR")]
    bpffs: PathBuf,

    /// cgroupfs mount.
    #[arg(long, default_value = "/sys/fs/cgroup", value_name = "DIR")]
    cgroupfs: PathBuf,

    /// Address for /metrics, pod status and logs (inside the node netns).
    #[arg(long, default_value = "0.0.0.0:10250")]
    listen: SocketAddr,

    /// First restart back-off after a container crash (doubles each time).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    backoff_initial: Duration,

    /// Restart back-off cap.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    backoff_max: Duration,

    /// Metrics sampling period (per-pod rates, pushed to the control); 0
    /// turns sampling off (`/metrics` still serves the counters).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    metrics_interval: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 10s, 5m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unit must be ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn main() -> anyhow::Result<()> {
    // glibc gives every thread that allocates its own malloc arena and keeps
    // freed memory in them; the agent's short-lived pod-netns threads would
    // leave dozens of mostly-empty arenas resident. Two are plenty here.
    // SAFETY: mallopt is called before any other thread exists.
    // A fixed mmap threshold also stops glibc from raising it after big
    // frees: large buffers (a 250-pod PodList is ~0.5 MB) then always come
    // from mmap and go back to the kernel when freed, instead of fragmenting
    // the heap for good.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    // `weir-agent inspect ...` reads pinned state and exits; it needs no
    // node flags and works while the agent is stopped.
    if std::env::args_os().nth(1).is_some_and(|a| a == "inspect") {
        use weir_agent::lb::inspect::{self, InspectError};
        match inspect::run(std::env::args_os().skip(1)) {
            Ok(out) => print!("{out}"),
            Err(InspectError::Usage(e)) => e.exit(),
            Err(e) => return Err(e.into()),
        }
        return Ok(());
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // setns() moves only the calling thread: enter the node's netns before
    // the runtime spawns its workers, so every thread starts there.
    if let Some(ns) = &args.netns {
        let f =
            std::fs::File::open(ns).with_context(|| format!("open node netns {}", ns.display()))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("enter node netns {}", ns.display()))?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let node = args.node_name.clone();
    let ns = args
        .containerd_namespace
        .clone()
        .unwrap_or_else(|| format!("weir-{node}"));
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/weir").join(&node));
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/log/weir").join(&node));
    let state = StateDir::open(&state_dir)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let cancel = CancellationToken::new();
    let Some((joined, (pod_cidr, cluster_cidr, service_cidr))) =
        network_plan(&args, &state_dir, &cancel, &mut term).await?
    else {
        return Ok(());
    };
    let net = Network::open(NodeNetConfig {
        node_name: node.clone(),
        pod_cidr,
        cluster_cidr,
        service_cidr,
        state_dir: state_dir.clone(),
        netns_dir: args.run_dir.join("netns").join(&node),
    })
    .await
    .context("set up node network")?;
    let dp = Dataplane::load(&args.bpffs, &node).context("load eBPF dataplane")?;
    load_kernel_metrics(&args, &node, pod_cidr);
    let channel = cri::connect(&args.containerd_socket)?;
    let rt = Runtime::new(channel.clone(), ns.clone());
    let cgroups = Layout::detect(&args.cgroupfs);
    tracing::info!(node, containerd_namespace = %ns, cgroups = ?cgroups, "weir-agent starting");
    let mgr = Manager::new(
        pod::Config {
            node: node.clone(),
            node_ip: args.node_ip.clone(),
            log_dir,
            run_dir: args.run_dir.join(&node),
            image_dir: args.image_dir.clone(),
            backoff_initial: args.backoff_initial,
            backoff_max: args.backoff_max,
            dns: args.control.as_ref().map(|_| pod::PodDns {
                nameserver: args.cluster_dns,
                domain: args.cluster_domain.clone(),
            }),
        },
        rt,
        net,
        dp,
        state,
        cgroups,
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(events::follow(
        channel.clone(),
        ns.clone(),
        tx,
        cancel.clone(),
    ));
    let dispatch = mgr.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            dispatch.dispatch(ev);
        }
    });
    // Serve status and metrics even while containerd is still down.
    let http_task = tokio::spawn(http::serve(
        args.listen,
        mgr.clone(),
        node.clone(),
        cancel.clone(),
    ));
    tokio::spawn(weir_agent::metrics::run(
        mgr.clone(),
        node.clone(),
        args.metrics_interval,
        cancel.clone(),
    ));
    wait_for_containerd(&channel, &args.containerd_socket, &cancel).await;
    pod::import_images_now(&mgr).await;
    mgr.adopt().await;
    let watch = follow_desired_state(&args, joined, &node, &mgr, &cancel)?;

    tokio::spawn(trim_memory(cancel.clone()));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = http_task => {
            r.context("http task")?.context("serve http")?;
        }
    }
    // Pods, their networks and pinned eBPF state stay: the next agent adopts them.
    tracing::info!("weir-agent stopping; pods keep running");
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), watch).await;
    Ok(())
}

/// Starts following what the node should run: the control's stream
/// (control mode, with the service load balancer) or the manifest directory.
fn follow_desired_state(
    args: &Args,
    joined: Option<(Control, Assignment)>,
    node: &str,
    mgr: &pod::Manager,
    cancel: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    Ok(match joined {
        Some((control, assignment)) => {
            let lb = load_lb(args, node, mgr);
            let dns = cluster_dns(args)?;
            tokio::spawn(control.run(mgr.clone(), assignment, lb, dns, cancel.clone()))
        }
        None => tokio::spawn(standalone::run(
            args.manifest_dir
                .clone()
                .context("--manifest-dir is required without --control")?,
            mgr.clone(),
            cancel.clone(),
        )),
    })
}

/// Loads (or adopts) the socket load balancer for services, attached at the
/// cgroup2 root and acting only for this node's network namespaces; `None`
/// (services not balanced, logged) if the kernel or mounts don't allow it.
fn load_lb(
    args: &Args,
    node: &str,
    mgr: &pod::Manager,
) -> Option<std::sync::Arc<weir_agent::lb::Dataplane>> {
    use weir_agent::lb;
    let Some(opts) = lb::Options::host_root(&args.cgroupfs) else {
        tracing::error!(cgroupfs = %args.cgroupfs.display(), "no cgroup2 hierarchy: services are not balanced");
        return None;
    };
    let loaded = lb::Dataplane::load(&args.bpffs, node, &opts)
        .and_then(|dp| lb::own_netns_cookie().map(|own| (dp, own)));
    match loaded {
        Ok((dp, own)) => {
            let dp = std::sync::Arc::new(dp);
            mgr.set_lb(std::sync::Arc::clone(&dp), own);
            Some(dp)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot load the service load balancer: services are not balanced");
            None
        }
    }
}

/// Loads (or adopts) the kernel TCP metric programs for the node's pod
/// CIDR; without them (logged) pods have no connection, retransmit or RTT
/// metrics.
fn load_kernel_metrics(args: &Args, node: &str, pod_cidr: Cidr) {
    use weir_agent::{lb, metrics};
    let Some(opts) = lb::Options::host_root(&args.cgroupfs) else {
        tracing::error!(cgroupfs = %args.cgroupfs.display(), "no cgroup2 hierarchy: no TCP metrics");
        return;
    };
    match metrics::KernelMetrics::load(&args.bpffs, node, &opts.cgroup, Some(pod_cidr)) {
        Ok(k) => metrics::set_kernel(std::sync::Arc::new(k)),
        Err(e) => {
            tracing::error!(error = %e, "cannot load the TCP metric programs: no TCP metrics");
        }
    }
}

/// Cluster DNS settings (control mode), None if the node IP is not an
/// IPv4 address.
fn cluster_dns(args: &Args) -> anyhow::Result<Option<control::ClusterDns>> {
    let Some(ip) = &args.node_ip else {
        return Ok(None);
    };
    let node_ip = ip
        .parse::<std::net::Ipv4Addr>()
        .with_context(|| format!("--node-ip {ip:?} is not an IPv4 address (cluster DNS)"))?;
    Ok(Some(control::ClusterDns {
        zone: std::sync::Arc::new(weir_agent::dns::Zone::new(&args.cluster_domain)),
        service_ip: args.cluster_dns,
        node_ip,
    }))
}

/// The node's joined control (control mode) and its pod, cluster and
/// service CIDRs: from the control's assignment, or from the flags
/// (standalone). `None` if a signal came while registering.
async fn network_plan(
    args: &Args,
    state_dir: &std::path::Path,
    cancel: &CancellationToken,
    term: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<Option<(Option<(Control, Assignment)>, (Cidr, Cidr, Cidr))>> {
    let Some(url) = &args.control else {
        let pod_cidr = args
            .pod_cidr
            .context("--pod-cidr is required without --control")?;
        return Ok(Some((
            None,
            (pod_cidr, args.cluster_cidr, args.service_cidr),
        )));
    };
    let Some((control, a)) = join(args, url, state_dir, cancel, term).await? else {
        return Ok(None);
    };
    let cidrs = (a.pod_cidr, a.cluster_cidr, a.service_cidr);
    Ok(Some((Some((control, a)), cidrs)))
}

/// Control mode: registers with the control (retrying until it answers)
/// and returns the connection and the node's assignment; `None` if a
/// signal came first.
async fn join(
    args: &Args,
    url: &str,
    state_dir: &std::path::Path,
    cancel: &CancellationToken,
    term: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<Option<(Control, Assignment)>> {
    let address = args.node_ip.clone().context(
        "--node-ip is required with --control (other nodes route to this node's pods through it)",
    )?;
    let control = Control::new(
        url,
        control::Settings {
            node: args.node_name.clone(),
            address,
            labels: args.node_labels.clone().unwrap_or_default(),
            version: format!("v{}", env!("CARGO_PKG_VERSION")),
        },
    )?;
    let cache = state_dir.join("control.json");
    tokio::select! {
        r = control.register(&cache, cancel) => Ok(Some((control.clone(), r?))),
        _ = tokio::signal::ctrl_c() => Ok(None),
        _ = term.recv() => Ok(None),
    }
}

/// Hands memory freed after a burst (pods started or stopped) back to the
/// kernel every 10 s, so the agent's RSS follows what it holds, not its peak.
async fn trim_memory(cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        // SAFETY: malloc_trim only walks glibc's own heaps.
        let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
    }
}

/// Waits (with a clear log line, never crashing) until containerd answers.
async fn wait_for_containerd(
    channel: &tonic::transport::Channel,
    socket: &std::path::Path,
    cancel: &CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let v =
            containerd_client::services::v1::version_client::VersionClient::new(channel.clone())
                .version(())
                .await;
        match v {
            Ok(v) => {
                tracing::info!(version = %v.into_inner().version, "containerd is up");
                return;
            }
            Err(e) => {
                tracing::error!(socket = %socket.display(), error = %e.message(), retry_in = ?delay, "containerd is not reachable; retrying");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
