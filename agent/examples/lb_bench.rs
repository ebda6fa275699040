//! Helper of `cargo xtask bench lb` (xtask does not link the agent): loads
//! or adopts a node's socket balancer through `weir_agent::lb` and programs
//! a generated service table, timing it the way the agent does: the whole
//! table with [`lb::Dataplane::sync`] (a listing, a restart), one service
//! with [`lb::Dataplane::sync_changes`] (one event). One JSON line on
//! stdout.
//!
//! `maglev`: `NodePort` Maglev disruption and table swaps, through
//! [`lb::maglev`] and [`lb::NodePort`] on a scratch node whose programs
//! sit on the loopback of a network namespace of this process's own.
//!
//! Service `i` of `n`: VIP `10.96.0.0 + 1024 + i`, port 80/TCP, 4 backends
//! `10.200.0.0 + 4i + j`:8080, except the last one (the measured one),
//! whose backends are `--real`. xtask generates the same table as
//! kube-proxy iptables rules.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use clap::Parser;
use weir_agent::lb::{
    self, Change, NodePort, NodePortBackend, NodePortSpec, Options, Protocol, ServiceSpec, maglev,
};
use weir_common::{Backend, MAGLEV_MAP, MaglevTable};

const BPFFS: &str = "/sys/fs/bpf";

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
    /// `NodePort` Maglev: the share of flows removing 1 of `--backends`
    /// remaps (each backend in turn), by the Maglev code alone (one table
    /// size) and as the agent programs it (tables read back from the
    /// kernel), and `--swaps` table swaps (backend set changes) timed the
    /// way the agent times them: around the map update. The node's pins
    /// are removed at the end.
    Maglev {
        /// Scratch node name (pins under /sys/fs/bpf/weir/<node>).
        #[arg(long, default_value = "wlbb-mg")]
        node: String,
        /// Backends of the service.
        #[arg(long, default_value_t = 10)]
        backends: u8,
        /// Table swaps timed.
        #[arg(long, default_value_t = 200)]
        swaps: usize,
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

fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

/// The `p`th percentile of sorted `v` (nearest rank).
fn pct(v: &[Duration], p: usize) -> Duration {
    v.get((p * v.len()).div_ceil(100).max(1) - 1)
        .copied()
        .unwrap_or_default()
}

/// Detaches and unpins node `node`'s balancer and removes its bpffs directory.
fn remove(node: &str) -> anyhow::Result<()> {
    let bpffs = Path::new(BPFFS);
    lb::Dataplane::remove(bpffs, node)?;
    let dir = bpffs.join("weir").join(node);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The `NodePort` address of the `maglev` scratch node (TEST-NET-1).
const MAGLEV_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// `n` ready backends on another node (Cluster policy: all of them are in
/// the table), in the agent's order.
fn np_backends(n: u8) -> Vec<NodePortBackend> {
    (0..n)
        .map(|i| NodePortBackend {
            ip: Ipv4Addr::new(10, 201, 0, 10 + i),
            port: 8080,
            node: Some("wlbb-mg-peer".to_owned()),
        })
        .collect()
}

/// The share of flows whose backend differs between tables `before` and
/// `after`. Same size: the share of entries that differ. Sizes `M1 ≠ M2`
/// (distinct primes): a flow hash `h` picks entry `h mod M1` before and
/// `h mod M2` after, and every pair of entries is equally likely (CRT), so
/// the share is `1 − Σ_b c1(b)·c2(b) / (M1·M2)` with `c(b)` the entries
/// backend `b` owns.
fn flows_remapped(before: &[Backend], after: &[Backend]) -> f64 {
    if before.len() == after.len() {
        return maglev::remapped(before, after);
    }
    let owned = |t: &[Backend]| {
        let mut c: BTreeMap<(u32, u16), u64> = BTreeMap::new();
        for b in t {
            *c.entry((b.ip, b.port)).or_default() += 1;
        }
        c
    };
    let (c1, c2) = (owned(before), owned(after));
    let same: u64 = c1
        .iter()
        .map(|(b, n)| n * c2.get(b).copied().unwrap_or(0))
        .sum();
    #[expect(clippy::cast_precision_loss, reason = "table sizes are < 2^14")]
    let share = 1.0 - same as f64 / (before.len() as f64 * after.len() as f64);
    share
}

/// Mean and maximum of `v` (0 if empty).
fn avg_max(v: &[f64]) -> (f64, f64) {
    #[expect(clippy::cast_precision_loss, reason = "a handful of values")]
    let avg = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (avg, v.iter().copied().fold(0.0, f64::max))
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The only Maglev table in the pinned map, as the kernel holds it.
fn kernel_table(tables: &HashMap<MapData, u32, MaglevTable>) -> anyhow::Result<Vec<Backend>> {
    let mut ids = tables.keys();
    let id = ids.next().context("no Maglev table in the map")??;
    anyhow::ensure!(ids.next().is_none(), "more than one Maglev table");
    let t = tables.get(&id, 0)?;
    let size = usize::try_from(t.size)?;
    Ok(t.entries.get(..size).context("table size")?.to_vec())
}

/// The `maglev` subcommand: see [`Cmd::Maglev`].
fn maglev_bench(node: &str, n: u8, swaps: usize) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(n >= 2, "--backends must be at least 2");
    let all = np_backends(n);
    // (1) Maglev alone, one table size for both sets.
    let keys: Vec<(Ipv4Addr, u16)> = all.iter().map(|b| (b.ip, b.port)).collect();
    let size = maglev::table_size(keys.len());
    let keyed = |ks: &[(Ipv4Addr, u16)]| -> Vec<(Ipv4Addr, u16)> {
        maglev::build(ks, size)
            .iter()
            .map(|i| ks[*i as usize])
            .collect()
    };
    let before = keyed(&keys);
    let alone: Vec<f64> = (0..keys.len())
        .map(|k| {
            let mut less = keys.clone();
            less.remove(k);
            maglev::remapped(&before, &keyed(&less))
        })
        .collect();
    let (alone_avg, alone_worst) = avg_max(&alone);

    // (2) As the agent programs it: the NodePort programs of a scratch
    // node on the loopback of a network namespace of our own.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare netns")?;
    remove(node)?;
    let pin_dir = Path::new(BPFFS).join("weir").join(node);
    let run = programmed(&pin_dir, node, &all, swaps);
    let cleaned = remove(node);
    let programmed = run?;
    cleaned?;
    Ok(serde_json::json!({
        "backends": n,
        "remap_one_removed": {
            "maglev_one_size": {
                "table_size": size,
                "avg": round4(alone_avg),
                "worst": round4(alone_worst),
            },
            "as_programmed": programmed.remap,
        },
        "swaps": swaps,
        "swap_us": programmed.swap,
        "sync_us": programmed.sync,
    }))
}

/// What [`programmed`] measured.
struct Programmed {
    remap: serde_json::Value,
    swap: serde_json::Value,
    sync: serde_json::Value,
}

/// Programs one `NodePort` service of `all` through [`NodePort::sync`],
/// then `swaps` backend set changes (every other one without one backend,
/// each in turn, then all again): each is one table swap, timed by the
/// agent around the map update, and checked in the kernel's table.
fn programmed(
    pin_dir: &Path,
    node: &str,
    all: &[NodePortBackend],
    swaps: usize,
) -> anyhow::Result<Programmed> {
    let np = NodePort::load(pin_dir, node, MAGLEV_NODE_IP, "lo")?;
    let spec = |backends: Vec<NodePortBackend>| {
        [NodePortSpec {
            node_port: 30080,
            proto: Protocol::Tcp,
            local: false,
            backends,
        }]
    };
    let first = np.sync(&spec(all.to_vec()))?;
    anyhow::ensure!(
        first.tables == 1,
        "the first sync wrote {} tables",
        first.tables
    );
    let pin = pin_dir.join(MAGLEV_MAP);
    let data = MapData::from_pin(&pin).with_context(|| format!("open {}", pin.display()))?;
    let tables: HashMap<MapData, u32, MaglevTable> = HashMap::try_from(Map::HashMap(data))?;
    let full = kernel_table(&tables)?;
    let mut remap = Vec::new();
    let mut sizes_after = std::collections::BTreeSet::new();
    let (mut swap, mut sync) = (Vec::with_capacity(swaps), Vec::with_capacity(swaps));
    for r in 0..swaps {
        let gone = (r / 2) % all.len();
        let mut set = all.to_vec();
        if r % 2 == 0 {
            set.remove(gone);
        }
        let started = Instant::now();
        let s = np.sync(&spec(set))?;
        sync.push(started.elapsed());
        anyhow::ensure!(s.tables == 1, "change {r} swapped {} tables", s.tables);
        swap.push(s.slowest_swap);
        let live = kernel_table(&tables)?;
        if r % 2 == 1 {
            anyhow::ensure!(live == full, "change {r}: the full set's table is not back");
            continue;
        }
        let g = &all[gone];
        let g = (u32::from(g.ip).to_be(), g.port.to_be());
        anyhow::ensure!(
            !live.iter().any(|b| (b.ip, b.port) == g),
            "change {r}: the removed backend is still in the table"
        );
        if remap.len() < all.len() {
            remap.push(flows_remapped(&full, &live));
            sizes_after.insert(live.len());
        }
    }
    let (avg, worst) = avg_max(&remap);
    swap.sort();
    sync.sort();
    let figures = |v: &[Duration]| {
        serde_json::json!({
            "p50": us(pct(v, 50)),
            "p99": us(pct(v, 99)),
            "max": us(v.last().copied().unwrap_or_default()),
        })
    };
    Ok(Programmed {
        remap: serde_json::json!({
            "table_size_before": full.len(),
            "table_size_after": sizes_after,
            "removals": remap.len(),
            "avg": round4(avg),
            "worst": round4(worst),
        }),
        swap: figures(&swap),
        sync: figures(&sync),
    })
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
        Cmd::Maglev {
            node,
            backends,
            swaps,
        } => println!("{}", maglev_bench(&node, backends, swaps)?),
        Cmd::Remove { node } => {
            let bpffs = std::path::Path::new(BPFFS);
            lb::Dataplane::remove(bpffs, &node)?;
            let _ = std::fs::remove_dir_all(bpffs.join("weir").join(&node));
        }
    }
    Ok(())
}
