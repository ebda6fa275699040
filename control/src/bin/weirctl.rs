//! weirctl: the command line for weir-control, shaped like kubectl.
//!
//! Every command talks to the `Objects` gRPC API (`--server`, else
//! `WEIR_SERVER`, else `server:` in `~/.config/weir/config`, else
//! `http://127.0.0.1:7443`); `logs` and `flows` read the node agents' HTTP
//! endpoints.
//! Errors go to stderr as kubectl prints them and exit 1.

#![expect(
    clippy::doc_markdown,
    reason = "doc comments here are also clap's --help text, read in a terminal: kind names stay plain"
)]

#[path = "weirctl/apply.rs"]
mod apply;
#[path = "weirctl/client.rs"]
mod client;
#[path = "weirctl/delete.rs"]
mod delete;
#[path = "weirctl/describe.rs"]
mod describe;
#[path = "weirctl/doc.rs"]
mod doc;
#[path = "weirctl/explain.rs"]
mod explain;
#[path = "weirctl/flows.rs"]
mod flows;
#[path = "weirctl/format.rs"]
mod format;
#[path = "weirctl/get.rs"]
mod get;
#[path = "weirctl/hpa.rs"]
mod hpa;
#[path = "weirctl/logs.rs"]
mod logs;
#[path = "weirctl/map.rs"]
mod map;
#[path = "weirctl/netpol.rs"]
mod netpol;
#[path = "weirctl/node.rs"]
mod node;
#[path = "weirctl/printers.rs"]
mod printers;
#[path = "weirctl/resource.rs"]
mod resource;
#[path = "weirctl/rollout.rs"]
mod rollout;
#[path = "weirctl/services.rs"]
mod services;
#[path = "weirctl/top.rs"]
mod top;

use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::client::{Api, ServerError, resolve_server};
use crate::get::Output;
use crate::resource::{Resource, one_target};

/// weir's command line: manage the objects of a weir cluster (kubectl's verbs).
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    /// weir-control's address (default: WEIR_SERVER, then `server:` in
    /// ~/.config/weir/config, then http://127.0.0.1:7443).
    #[arg(long, short = 's', env = "WEIR_SERVER", global = true)]
    server: Option<String>,
    /// The namespace to act in (default: default; `flows`: a filter, all
    /// namespaces without it).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create or update objects from manifests: a file, a directory of
    /// .yaml/.yml/.json files, or - for stdin (multi-document YAML).
    /// Prints `kind/name created|configured|unchanged` per object.
    Apply {
        /// The manifests (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// List objects as a table, or show some by name. Types: pods (po),
    /// deployments (deploy), replicasets (rs), daemonsets (ds), nodes (no),
    /// namespaces (ns), events (ev), services (svc), endpointslices,
    /// horizontalpodautoscalers (hpa), and
    /// `all` (pods, services, daemonsets, deployments, replicasets).
    /// `get deploy web api`, `get deploy/web`.
    Get {
        /// TYPE [NAME...] or TYPE/NAME...
        #[arg(required = true)]
        args: Vec<String>,
        /// List across all namespaces (adds a NAMESPACE column).
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Label selector, e.g. `app=web,tier!=db,env in (a,b)`.
        #[arg(short = 'l', long, default_value = "")]
        selector: String,
        /// Output format: wide (more columns), yaml, json, or name (kind/name).
        #[arg(short, long, value_enum)]
        output: Option<Output>,
        /// After listing, print one line per change (from the list's revision).
        #[arg(short, long)]
        watch: bool,
        /// Don't print the header row.
        #[arg(long)]
        no_headers: bool,
    },
    /// Show the details of objects (kubectl's sections) with their events.
    Describe {
        /// TYPE [NAME...] or TYPE/NAME; without names, all of the type (or those matching -l).
        #[arg(required = true)]
        args: Vec<String>,
        /// Label selector when no names are given.
        #[arg(short = 'l', long, default_value = "")]
        selector: String,
    },
    /// Delete objects by type and names, by label selector, or those in
    /// manifests (-f). Pods get their grace period to stop.
    Delete {
        /// TYPE NAME... or TYPE/NAME...
        args: Vec<String>,
        /// Delete the objects named in these manifests.
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        /// Delete the objects of TYPE matching this selector.
        #[arg(short = 'l', long, default_value = "")]
        selector: String,
        /// Delete all objects of TYPE in the namespace.
        #[arg(long)]
        all: bool,
        /// Seconds a pod gets to stop (-1: the pod's own; 0 needs --force).
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        grace_period: i64,
        /// Remove at once, without waiting for the pods to stop (grace 0).
        #[arg(long)]
        force: bool,
        /// What happens to dependents: background, foreground or orphan.
        #[arg(long, default_value = "background")]
        cascade: String,
        /// Wait until the objects are gone.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        wait: bool,
        /// How long --wait waits (e.g. 30s, 5m; 0: forever).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        timeout: Duration,
        /// Succeed when an object does not exist.
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// Print (or with -f follow) a container's log, read from the agent on
    /// the pod's node (http://<node InternalIP>:<agent-port>).
    Logs {
        /// The pod (NAME or pod/NAME).
        pod: String,
        /// The container; required when the pod has several.
        #[arg(short, long)]
        container: Option<String>,
        /// Keep streaming new lines.
        #[arg(short, long)]
        follow: bool,
        /// The agents' HTTP port.
        #[arg(long, default_value_t = 10250)]
        agent_port: u16,
    },
    /// Show the flows the nodes' policy programs recorded (new connections
    /// allowed, packets denied), like `hubble observe`: from every node's
    /// agent (http://<node InternalIP>:<agent-port>/flows), filtered by
    /// -n/--namespace, --pod, --verdict, --port.
    Flows(flows::FlowArgs),
    /// Show the cluster service map the agents report: edges from workloads
    /// to services and workloads with port, connections, bytes and drops
    /// (-n NS: edges with an end in NS; -A: all; -o wide|json|dot).
    Map(map::MapArgs),
    /// Network policy tools.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Show the newest CPU and memory samples of nodes or pods (from the
    /// agents, through weir-control's Metrics API).
    Top {
        #[command(subcommand)]
        cmd: TopCmd,
    },
    /// Set the replicas of a deployment or replicaset (read-modify-apply
    /// with the resource version read; retried on a conflict).
    Scale {
        /// deployment/NAME, replicaset/NAME, or TYPE NAME.
        #[arg(required = true)]
        target: Vec<String>,
        /// The new number of replicas.
        #[arg(long)]
        replicas: i64,
    },
    /// Create a HorizontalPodAutoscaler (named after the target) that
    /// scales a deployment or replicaset between --min and --max replicas
    /// on cpu utilization (--cpu-percent, default 80).
    Autoscale(hpa::AutoscaleArgs),
    /// Follow, undo or list the rollouts of a deployment.
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// Mark a node unschedulable (spec.unschedulable).
    Cordon {
        /// The node.
        node: String,
    },
    /// Mark a node schedulable again.
    Uncordon {
        /// The node.
        node: String,
    },
    /// Cordon a node and evict its pods (graceful delete), waiting until
    /// they are gone. Refuses DaemonSet pods without --ignore-daemonsets,
    /// pods with no controller without --force, and pods with emptyDir
    /// volumes without --delete-emptydir-data.
    Drain {
        /// The node.
        node: String,
        /// Leave DaemonSet-managed pods in place.
        #[arg(long)]
        ignore_daemonsets: bool,
        /// Evict pods with emptyDir volumes (their data is lost).
        #[arg(long)]
        delete_emptydir_data: bool,
        /// Evict pods that no controller will recreate.
        #[arg(long)]
        force: bool,
        /// Seconds each pod gets to stop (-1: the pod's own).
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        grace_period: i64,
        /// Give up after this long (e.g. 60s; 0: wait forever).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand, Debug)]
enum TopCmd {
    /// CPU (millicores) and memory of every node, and their share of the
    /// node's allocatable.
    #[command(visible_aliases = ["node", "no"])]
    Nodes,
    /// CPU (millicores) and memory of the pods of a namespace.
    #[command(visible_aliases = ["pod", "po"])]
    Pods {
        /// Every namespace (adds a NAMESPACE column).
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Label selector, e.g. `app=web`.
        #[arg(short = 'l', long, default_value = "")]
        selector: String,
        /// One row per container.
        #[arg(long)]
        containers: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Whether a new connection SRC -> DST:PORT is allowed and by which
    /// policy, as the nodes' policy maps see it (like `cilium policy
    /// trace`): the source pod's Egress at its node and the destination
    /// pod's Ingress at its node, with the identities, the isolating
    /// policies and the policy map key that matched. Exit code 0 when
    /// allowed, 1 when denied.
    Explain(explain::ExplainArgs),
}

#[derive(Subcommand, Debug)]
enum RolloutCmd {
    /// Wait until a deployment's (or daemonset's) rollout is done, printing
    /// its progress.
    Status {
        /// deployment/NAME (or TYPE NAME).
        #[arg(required = true)]
        target: Vec<String>,
        /// Give up after this long (e.g. 5m; 0: wait forever).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        timeout: Duration,
        /// Keep watching until done (false: print the status once).
        #[arg(short, long, default_value_t = true, action = clap::ArgAction::Set)]
        watch: bool,
    },
    /// Roll a deployment back to its previous revision (or --to-revision):
    /// that ReplicaSet's pod template is applied to the deployment.
    Undo {
        /// deployment/NAME (or TYPE NAME).
        #[arg(required = true)]
        target: Vec<String>,
        /// The revision to go back to (0: the previous one).
        #[arg(long, default_value_t = 0)]
        to_revision: i64,
    },
    /// List a deployment's revisions (from its ReplicaSets).
    History {
        /// deployment/NAME (or TYPE NAME).
        #[arg(required = true)]
        target: Vec<String>,
        /// Show this revision's pod template.
        #[arg(long, default_value_t = 0)]
        revision: i64,
    },
}

/// An error already printed: exit 1 without another line.
#[derive(Debug, thiserror::Error)]
#[error("(already reported)")]
pub struct Reported;

/// Parses kubectl durations: `30s`, `5m`, `1h`, `250ms`, a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: use e.g. 30s, 5m, 1h");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        if e.downcast_ref::<Reported>().is_none() {
            if let Some(s) = e.downcast_ref::<ServerError>() {
                eprintln!("{s}");
            } else {
                let text = format!("{e:#}");
                if text.starts_with("Error from server") {
                    eprintln!("{text}");
                } else {
                    eprintln!("error: {text}");
                }
            }
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let server = resolve_server(cli.server)?;
    let api = Api::new(&server)?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let ns = namespace.as_str();
    match cli.cmd {
        Cmd::Apply { files } => apply::run(&api, &files, ns).await,
        Cmd::Get {
            args,
            all_namespaces,
            selector,
            output,
            watch,
            no_headers,
        } => {
            let a = get::GetArgs {
                args,
                namespace: namespace.clone(),
                all_namespaces,
                selector,
                output,
                watch,
                no_headers,
            };
            get::run(&api, &a).await
        }
        Cmd::Describe { args, selector } => describe::run(&api, &args, ns, &selector).await,
        Cmd::Delete {
            args,
            files,
            selector,
            all,
            grace_period,
            force,
            cascade,
            wait,
            timeout,
            ignore_not_found,
        } => {
            let o = delete::DeleteOptions {
                grace_period,
                force,
                cascade,
                wait,
                timeout,
                ignore_not_found,
            };
            delete::run(&api, &args, &files, ns, &selector, all, &o).await
        }
        Cmd::Logs {
            pod,
            container,
            follow,
            agent_port,
        } => {
            let o = logs::LogOptions {
                container,
                follow,
                agent_port,
            };
            logs::run(&api, ns, &pod, &o).await
        }
        Cmd::Flows(a) => flows::run(&api, &a.options(cli.namespace)).await,
        Cmd::Map(a) => map::run(&server, ns, &a).await,
        Cmd::Policy { cmd } => policy_cmd(&api, ns, cmd).await,
        Cmd::Top { cmd } => top_cmd(&api, &server, ns, cmd).await,
        Cmd::Scale { target, replicas } => {
            let (r, name) = one_target(&target, "scale")?;
            rollout::scale(&api, r, ns, &name, replicas).await
        }
        Cmd::Autoscale(a) => hpa::autoscale(&api, ns, &a).await,
        Cmd::Rollout { cmd } => rollout_cmd(&api, ns, cmd).await,
        Cmd::Cordon { node } => node::cordon(&api, &node, true).await,
        Cmd::Uncordon { node } => node::cordon(&api, &node, false).await,
        Cmd::Drain {
            node,
            ignore_daemonsets,
            delete_emptydir_data,
            force,
            grace_period,
            timeout,
        } => {
            let o = node::DrainOptions {
                ignore_daemonsets,
                delete_emptydir_data,
                force,
                grace_period: (grace_period >= 0).then_some(grace_period),
                timeout,
            };
            node::drain(&api, &node, &o).await
        }
    }
}

async fn policy_cmd(api: &Api, ns: &str, cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Explain(a) => {
            if explain::run(api, ns, &a).await? {
                Ok(())
            } else {
                // Denied: the trace says so; exit 1.
                Err(Reported.into())
            }
        }
    }
}

async fn top_cmd(api: &Api, server: &str, ns: &str, cmd: TopCmd) -> anyhow::Result<()> {
    match cmd {
        TopCmd::Nodes => top::nodes(api, server).await,
        TopCmd::Pods {
            all_namespaces,
            selector,
            containers,
        } => {
            let o = top::PodOptions {
                namespace: ns.to_owned(),
                all_namespaces,
                selector,
                containers,
            };
            top::pods(server, &o).await
        }
    }
}

async fn rollout_cmd(api: &Api, ns: &str, cmd: RolloutCmd) -> anyhow::Result<()> {
    match cmd {
        RolloutCmd::Status {
            target,
            timeout,
            watch,
        } => {
            let (r, name) = one_target(&target, "rollout status")?;
            rollout::status(api, r, ns, &name, timeout, watch).await
        }
        RolloutCmd::Undo {
            target,
            to_revision,
        } => {
            let (r, name) = one_target(&target, "rollout undo")?;
            if r != Resource::Deployment {
                bail!("no rollbacker has been implemented for {}", r.plural());
            }
            rollout::undo(api, ns, &name, to_revision).await
        }
        RolloutCmd::History { target, revision } => {
            let (r, name) = one_target(&target, "rollout history")?;
            if r != Resource::Deployment {
                bail!("no history viewer has been implemented for {}", r.plural());
            }
            rollout::history(api, ns, &name, revision).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubectl() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_secs(3) / 2));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
