//! `cargo xtask bench <name>`: benchmarks of weir-agent on a node built for
//! the run, against a named baseline in the same run where there is one.
//! Progress goes to stderr; each benchmark ends with one line
//! `BENCH {json}` on stdout (figures, baseline, ratio, target, `target_met`).
//! docs/benchmarks.md records the results.

mod api;
mod autoscale;
mod baseline;
mod density;
mod env;
mod example;
mod lb;
mod lb_programming;
mod metrics;
mod pod_start;
mod policy;
mod probe;
mod scheduler;
mod util;

use std::{path::PathBuf, time::Duration};

use anyhow::ensure;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    bench: Which,
    /// Run this weir-agent binary instead of building and running
    /// target/release/weir-agent.
    #[arg(long, global = true, value_name = "PATH")]
    agent: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Which {
    /// Pods handed to the agent at once: time from the manifests to each
    /// pod's first TCP connect, against containerd + CNI bridge directly.
    PodStart {
        /// Pods in the burst.
        #[arg(long, default_value_t = 50)]
        pods: usize,
    },
    /// Pods on one node: the agent's RSS and its CPU use while idle.
    Density {
        /// Pods on the node.
        #[arg(long, default_value_t = 250)]
        pods: usize,
        /// Length of the idle CPU window, in seconds.
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
    },
    /// The scheduler over the real store and API (no agents): Node objects,
    /// then pods created while it runs; pods bound per second on redb and
    /// etcd, against kube-scheduler's published CI floors.
    Scheduler {
        /// Node objects.
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
        /// Pod counts, one run each (comma-separated).
        #[arg(long, default_value = "10000,50000")]
        pods: String,
        /// Stores to run against (comma-separated: redb, etcd).
        #[arg(long, default_value = "redb,etcd")]
        stores: String,
        /// Bound on each run, in seconds.
        #[arg(long, default_value_t = 600)]
        limit_secs: u64,
    },
    /// weir-control's API latency (Apply, Get, List) with 10k pods stored
    /// under 20 writes/s of churn, redb and etcd, against the Kubernetes SLO.
    Api,
    /// weir-control's RSS with 3 nodes and 100 pods, against k3s's server.
    ControlRss,
    /// The socket service balancer: hop cost vs a direct connection, new
    /// connections at scale vs kube-proxy iptables (nft and legacy), and
    /// programming latency vs iptables-restore.
    Lb {
        /// Services at scale (4 endpoints each).
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Single-service changes timed.
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Build the programming helper in the dev profile instead of
        /// release (shared machines).
        #[arg(long)]
        dev: bool,
        /// Skip the end-to-end programming part (weir-control + agents,
        /// `bench lb-programming`); the target then uses the in-process
        /// figures only and says so.
        #[arg(long)]
        no_e2e: bool,
    },
    /// Service programming end to end on real processes: a Service or
    /// `EndpointSlice` change through weir-control's API → the agent → the
    /// node's pinned maps (single changes, load, agent restart, new node).
    LbProgramming {
        /// Services loaded (4 endpoints each).
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// Single endpoint changes timed.
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Build in the dev profile instead of release (shared machines).
        #[arg(long)]
        dev: bool,
    },
    /// `NetworkPolicy` end to end (3 nodes): propagation apply → enforced,
    /// throughput with a 1,000-peer policy vs none (and iptables + ipset vs
    /// none in the same run), flow-record CPU at the top connection rate.
    Policy(policy::PolicyArgs),
    /// HPA reaction: a load step through a Service → a new replica Ready
    /// and in the endpoints (real weir-control, 2 agents, busybox pods),
    /// weir against Kubernetes' 15 s metric resolution and HPA sync.
    Autoscale {
        /// Repetitions with weir's settings.
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Repetitions of the baseline (0 skips it).
        #[arg(long, default_value_t = 8)]
        baseline_reps: usize,
        /// Build in the dev profile instead of release (shared machines).
        #[arg(long)]
        dev: bool,
    },
    /// What metrics cost: agent CPU for 1 s sampling at 110 pods (on vs
    /// off) and the eBPF counters' cost in pod-to-pod requests/s (attached
    /// vs detached), same run.
    Metrics(metrics::MetricsArgs),
}

/// Most pods a node's /24 holds (.2-.254).
const MAX_PODS: usize = 253;

/// Runs `cargo xtask bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let pods = match &args.bench {
        Which::PodStart { pods } | Which::Density { pods, .. } => *pods,
        Which::Scheduler {
            nodes,
            pods,
            stores,
            limit_secs,
        } => {
            return scheduler::run(*nodes, pods, stores, Duration::from_secs(*limit_secs));
        }
        Which::Api | Which::ControlRss => return run_control(&args.bench),
        Which::Lb {
            services,
            changes,
            dev,
            no_e2e,
        } => {
            ensure!(*services >= 2, "--services must be at least 2");
            crate::setup::setup()?;
            return lb::run(&lb::LbArgs {
                services: *services,
                changes: *changes,
                dev: *dev,
                e2e: !*no_e2e,
            });
        }
        Which::LbProgramming {
            services,
            changes,
            dev,
        } => {
            ensure!(*services >= 1, "--services must be at least 1");
            ensure!(*changes >= 1, "--changes must be at least 1");
            crate::setup::setup()?;
            return lb_programming::run(*services, *changes, *dev);
        }
        Which::Policy(a) => return policy::run_args(a),
        Which::Metrics(a) => return metrics::run_args(a),
        Which::Autoscale {
            reps,
            baseline_reps,
            dev,
        } => {
            crate::setup::setup()?;
            return autoscale::run(*reps, *baseline_reps, *dev);
        }
    };
    ensure!(
        (1..=MAX_PODS).contains(&pods),
        "--pods must be 1..={MAX_PODS} (one /24 per node)"
    );
    crate::setup::setup()?;
    let agent = if let Some(a) = &args.agent {
        a.clone()
    } else {
        crate::cargo(&["build", "--release", "-p", "weir-agent"])?;
        crate::workspace_root().join("target/release/weir-agent")
    };
    ensure!(agent.exists(), "{} is missing", agent.display());
    let image = crate::image::build_busybox_image(&crate::image::default_out_dir())?;
    match args.bench {
        Which::PodStart { pods } => pod_start::run(&agent, &image, pods),
        Which::Density { pods, idle_secs } => {
            density::run(&agent, &image, pods, Duration::from_secs(idle_secs))
        }
        Which::Scheduler { .. }
        | Which::Api
        | Which::ControlRss
        | Which::Lb { .. }
        | Which::LbProgramming { .. }
        | Which::Policy(_)
        | Which::Metrics(_)
        | Which::Autoscale { .. } => {
            anyhow::bail!("internal: control benches are dispatched above")
        }
    }
}

/// Benchmarks of weir-control (release build), no node needed.
fn run_control(which: &Which) -> anyhow::Result<()> {
    crate::setup::setup()?;
    crate::cargo(&["build", "--release", "-p", "weir-control"])?;
    let control = crate::workspace_root().join("target/release/weir-control");
    match which {
        Which::Api => api::run(&control),
        Which::ControlRss => api::run_rss(&control),
        Which::PodStart { .. }
        | Which::Density { .. }
        | Which::Scheduler { .. }
        | Which::Lb { .. }
        | Which::LbProgramming { .. }
        | Which::Policy(_)
        | Which::Metrics(_)
        | Which::Autoscale { .. } => {
            anyhow::bail!("internal: not a weir-control bench")
        }
    }
}
