//! Helper of `cargo xtask bench lb` (xtask does not link the agent): loads
//! or adopts a node's socket balancer through `weir_agent::lb` and programs
//! a generated service table, timing it the way the agent does: the whole
//! table with [`lb::Dataplane::sync`] (a listing, a restart), one service
//! with [`lb::Dataplane::sync_changes`] (one event). One JSON line on
//! stdout.
//!
//! Service `i` of `n`: VIP `10.96.0.0 + 1024 + i`, port 80/TCP, 4 backends
//! `10.200.0.0 + 4i + j`:8080, except the last one (the measured one),
//! whose backends are `--real`. xtask generates the same table as
//! kube-proxy iptables rules.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use weir_agent::lb::{self, Change, Options, Protocol, ServiceSpec};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Load/adopt, allow the netns, sync `--services` from whatever the
    /// maps hold, then resync the same (no-op).
    Sync {
        #[command(flatten)]
        node: Target,
        /// Services in the table.
        #[arg(long)]
        services: usize,
    },
    /// With the table programmed (this is a restart: load, adopt, full
    /// resync against the pins, timed): `--changes` incremental syncs that
    /// each change one service's backends (a different service each time).
    Churn {
        #[command(flatten)]
        node: Target,
        /// Services in the table.
        #[arg(long)]
        services: usize,
        /// Single-service changes.
        #[arg(long, default_value_t = 200)]
        changes: usize,
    },
    /// Detach and unpin the node's balancer.
    Remove {
        /// Node name.
        #[arg(long)]
        node: String,
    },
}

#[derive(clap::Args)]
struct Target {
    /// Node name (pins under /sys/fs/bpf/weir/<node>).
    #[arg(long)]
    node: String,
    /// cgroup v2 directory to attach to.
    #[arg(long)]
    cgroup: PathBuf,
    /// Network namespaces (paths) to balance for.
    #[arg(long)]
    allow: Vec<PathBuf>,
    /// The measured service's backends, `ip:port` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    real: Vec<std::net::SocketAddrV4>,
}

/// The generated table of `n` services.
fn table(n: usize, real: &[std::net::SocketAddrV4]) -> anyhow::Result<Vec<ServiceSpec>> {
    (0..n)
        .map(|i| {
            let i32 = u32::try_from(i).context("service index")?;
            let backends = if i + 1 == n {
                real.iter().map(|a| (*a.ip(), a.port())).collect()
            } else {
                (0..4)
                    .map(|j| (Ipv4Addr::from(0x0ac8_0000 + 4 * i32 + j), 8080))
                    .collect()
            };
            Ok(ServiceSpec {
                vip: Ipv4Addr::from(0x0a60_0000 + 1024 + i32),
                port: 80,
                proto: Protocol::Tcp,
                backends,
                affinity: None,
            })
        })
        .collect()
}

fn load(n: &Target) -> anyhow::Result<lb::Dataplane> {
    let opts = Options {
        cgroup: n.cgroup.clone(),
        netns_filter: true,
    };
    let dp = lb::Dataplane::load(std::path::Path::new("/sys/fs/bpf"), &n.node, &opts)?;
    for p in &n.allow {
        dp.allow_netns(lb::netns_cookie(p)?)?;
    }
    Ok(dp)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Sync { node, services } => {
            let dp = load(&node)?;
            let t = table(services, &node.real)?;
            let started = Instant::now();
            let first = dp.sync(&t)?;
            let first_took = started.elapsed();
            let started = Instant::now();
            let again = dp.sync(&t)?;
            let again_took = started.elapsed();
            anyhow::ensure!(again.writes == 0, "a resync wrote {} entries", again.writes);
            println!(
                "{}",
                serde_json::json!({
                    "services": first.services,
                    "writes": first.writes,
                    "sync_ms": ms(first_took),
                    "noop_sync_ms": ms(again_took),
                })
            );
        }
        Cmd::Churn {
            node,
            services,
            changes,
        } => {
            let mut t = table(services, &node.real)?;
            // An agent restart: load (reads the pinned maps into the
            // mirror) and resync the whole table against them.
            let started = Instant::now();
            let dp = load(&node)?;
            let load_took = started.elapsed();
            let restart = dp.sync(&t)?;
            let restart_took = started.elapsed();
            anyhow::ensure!(
                restart.writes == 0,
                "the resync after a restart wrote {} entries",
                restart.writes
            );
            let mut took = Vec::with_capacity(changes);
            // Never the measured (last) service: its backends are real.
            let span = services.saturating_sub(1).max(1);
            for c in 0..changes {
                let i = (c * 7919) % span;
                let b = &mut t[i].backends;
                // Alternate: drop the last backend, put it back.
                if b.len() == 4 {
                    b.pop();
                } else {
                    let base = 0x0ac8_0000 + 4 * u32::try_from(i)?;
                    b.push((Ipv4Addr::from(base + 3), 8080));
                }
                let started = Instant::now();
                let s = dp.sync_changes(&[Change::Put(t[i].clone())])?;
                took.push(started.elapsed());
                anyhow::ensure!(s.writes > 0, "change {c} wrote nothing");
            }
            anyhow::ensure!(
                dp.mirror() == dp.current(),
                "after the changes the mirror and the maps differ"
            );
            let full = dp.sync(&t)?;
            anyhow::ensure!(
                full.writes == 0,
                "a full sync after the changes wrote {} entries",
                full.writes
            );
            took.sort();
            let pct = |p: usize| took[(p * took.len()).div_ceil(100).max(1) - 1];
            println!(
                "{}",
                serde_json::json!({
                    "changes": changes,
                    "restart_load_ms": ms(load_took),
                    "restart_resync_ms": ms(restart_took.saturating_sub(load_took)),
                    "restart_total_ms": ms(restart_took),
                    "restart_writes": restart.writes,
                    "p50_ms": ms(pct(50)),
                    "p99_ms": ms(pct(99)),
                    "max_ms": ms(took.last().copied().unwrap_or_default()),
                })
            );
        }
        Cmd::Remove { node } => {
            let bpffs = std::path::Path::new("/sys/fs/bpf");
            lb::Dataplane::remove(bpffs, &node)?;
            let _ = std::fs::remove_dir_all(bpffs.join("weir").join(&node));
        }
    }
    Ok(())
}
