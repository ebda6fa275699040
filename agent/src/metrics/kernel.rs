//! The kernel-level TCP metric programs: loads them from the weir object,
//! attaches the `sock_ops` counter at the cgroup2 root and the
//! `tcp:tcp_retransmit_skb` tracepoint, pins map and links under
//! `/sys/fs/bpf/weir/<node>/` and reads the per-address statistics.
//!
//! Adoption: the statistics map is pinned and reused with its contents (an
//! agent restart never resets the counters). A restarted agent attaches
//! fresh links first and then moves their pins over the old ones, which
//! detaches the old links: for that instant both count (a connection
//! established right then may count twice), never neither.

use std::{
    fs::File,
    io,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuHashMap},
    programs::{CgroupAttachMode, SockOps, TracePoint, links::FdLink},
};
use weir_common::{
    METRICS_CFG_MAP, MetricsConfig, PROG_METRICS_RETRANSMIT, PROG_METRICS_SOCKOPS, SOCK_STATS_MAP,
    SockStats,
};
use weir_proto::cidr::Cidr;

use crate::dataplane::{EBPF_OBJECT, ensure_bpffs};

/// Where tracefs is mounted (aya reads tracepoint ids there).
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// A kernel-metrics operation that failed, naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum KernelMetricsError {
    /// A file or mount operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The object could not be loaded.
    #[error("load eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    /// A program could not be found, loaded, attached or pinned.
    #[error("{what} {prog}: {source}")]
    Program {
        /// What was being done.
        what: &'static str,
        /// The program.
        prog: &'static str,
        /// The error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("{what} {map}: {source}")]
    Map {
        /// What was being done.
        what: &'static str,
        /// The map.
        map: &'static str,
        /// The error.
        source: Box<aya::maps::MapError>,
    },
}

fn prog_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
    prog: &'static str,
) -> impl FnOnce(E) -> KernelMetricsError {
    move |e| KernelMetricsError::Program {
        what,
        prog,
        source: Box::new(e),
    }
}

fn map_err(
    what: &'static str,
    map: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> KernelMetricsError {
    move |e| KernelMetricsError::Map {
        what,
        map,
        source: Box::new(e),
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelMetricsError {
    let path = path.to_path_buf();
    move |source| KernelMetricsError::Io { what, path, source }
}

/// The node's TCP metric programs and their statistics map.
pub struct KernelMetrics {
    // Keeps the programs loaded; the pinned links keep them attached.
    _ebpf: Ebpf,
    stats: Mutex<PerCpuHashMap<MapData, u32, SockStats>>,
}

impl KernelMetrics {
    /// Loads the programs of node `node` (map pinned under
    /// `bpffs/weir/<node>/`), counting only addresses in `pod_cidr` (all
    /// addresses if `None`), attaches the `sock_ops` program to the cgroup
    /// v2 directory `cgroup` and the retransmit tracepoint (mounting tracefs
    /// at [`TRACEFS`] if nothing is there).
    pub fn load(
        bpffs: &Path,
        node: &str,
        cgroup: &Path,
        pod_cidr: Option<Cidr>,
    ) -> Result<Self, KernelMetricsError> {
        ensure_bpffs(bpffs).map_err(|e| KernelMetricsError::Io {
            what: "prepare bpffs",
            path: bpffs.to_path_buf(),
            source: io::Error::other(e),
        })?;
        let pin_dir = bpffs.join("weir").join(node);
        let links = pin_dir.join("metrics-links");
        std::fs::create_dir_all(&links).map_err(io_err("create", &links))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(EBPF_OBJECT)
            .map_err(Box::new)?;
        let mut cfg: Array<MapData, MetricsConfig> = take(&mut ebpf, METRICS_CFG_MAP)?;
        let config = pod_cidr.map_or(MetricsConfig::default(), |c| MetricsConfig {
            net: u32::from(c.addr).to_be(),
            mask: c.mask().to_be(),
        });
        // Before attaching: never count other nodes' addresses.
        cfg.set(0, config, 0)
            .map_err(map_err("write", METRICS_CFG_MAP))?;
        let cg = File::open(cgroup).map_err(io_err("open cgroup", cgroup))?;
        attach_sockops(&mut ebpf, &cg, &links.join(PROG_METRICS_SOCKOPS))?;
        ensure_tracefs(Path::new(TRACEFS))?;
        attach_retransmit(&mut ebpf, &links.join(PROG_METRICS_RETRANSMIT))?;
        let stats = PerCpuHashMap::try_from(ebpf.take_map(SOCK_STATS_MAP).ok_or_else(|| {
            map_err("find", SOCK_STATS_MAP)(aya::maps::MapError::InvalidName {
                name: SOCK_STATS_MAP.to_owned(),
            })
        })?)
        .map_err(map_err("open", SOCK_STATS_MAP))?;
        tracing::info!(node, cgroup = %cgroup.display(), pod_cidr = ?pod_cidr.map(|c| c.to_string()), "kernel TCP metrics attached");
        Ok(Self {
            _ebpf: ebpf,
            stats: Mutex::new(stats),
        })
    }

    /// The statistics of local address `ip` summed over CPUs; zero if none.
    pub fn stats(&self, ip: Ipv4Addr) -> SockStats {
        let map = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&u32::from(ip).to_be(), 0)
            .map(|v| v.iter().fold(SockStats::default(), |a, c| a + *c))
            .unwrap_or_default()
    }

    /// Removes the statistics of addresses not in `keep` (pods that are
    /// gone: a reused IP must start from zero).
    pub fn retain(&self, keep: &[Ipv4Addr]) {
        let mut map = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gone: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(&Ipv4Addr::from(u32::from_be(*k))))
            .collect();
        for k in gone {
            let _ = map.remove(&k);
        }
    }
}

fn take<V: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<V, KernelMetricsError> {
    let map = ebpf.take_map(name).ok_or_else(|| {
        map_err("find", name)(aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        })
    })?;
    V::try_from(map).map_err(map_err("open", name))
}

fn attach_sockops(ebpf: &mut Ebpf, cgroup: &File, pin: &Path) -> Result<(), KernelMetricsError> {
    let prog = PROG_METRICS_SOCKOPS;
    let p: &mut SockOps = ebpf
        .program_mut(prog)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(prog_err("find", prog))?;
    p.load().map_err(prog_err("load", prog))?;
    // A cgroup bpf_link coexists with the other nodes' links on the root.
    let id = p
        .attach(cgroup.as_fd(), CgroupAttachMode::Single)
        .map_err(prog_err("attach", prog))?;
    let link: FdLink = p
        .take_link(id)
        .map_err(prog_err("take link of", prog))?
        .try_into()
        .map_err(prog_err("convert link of", prog))?;
    pin_over(link, pin, prog)
}

fn attach_retransmit(ebpf: &mut Ebpf, pin: &Path) -> Result<(), KernelMetricsError> {
    let prog = PROG_METRICS_RETRANSMIT;
    let p: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(prog_err("find", prog))?;
    p.load().map_err(prog_err("load", prog))?;
    let id = p
        .attach("tcp", "tcp_retransmit_skb")
        .map_err(prog_err("attach", prog))?;
    let link: FdLink = p
        .take_link(id)
        .map_err(prog_err("take link of", prog))?
        .try_into()
        .map_err(prog_err("convert link of", prog))?;
    pin_over(link, pin, prog)
}

/// Pins `link` at `pin`, replacing (and so detaching) a link pinned there
/// by an earlier agent.
fn pin_over(link: FdLink, pin: &Path, prog: &'static str) -> Result<(), KernelMetricsError> {
    // bpffs refuses names with a dot.
    let mut name = pin.file_name().unwrap_or_default().to_os_string();
    name.push("-new");
    let fresh = pin.with_file_name(name);
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh).map_err(prog_err("pin link of", prog))?;
    std::fs::rename(&fresh, pin).map_err(io_err("move pinned link", pin))
}

/// Detaches node `node`'s metric programs (removing their link pins);
/// missing pins are fine. The statistics map pin stays with the node's
/// other maps.
pub fn remove(bpffs: &Path, node: &str) -> Result<(), KernelMetricsError> {
    let links = bpffs.join("weir").join(node).join("metrics-links");
    for prog in [PROG_METRICS_SOCKOPS, PROG_METRICS_RETRANSMIT] {
        let pin = links.join(prog);
        match std::fs::remove_file(&pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("unpin", &pin)(e));
            }
            _ => {}
        }
    }
    let _ = std::fs::remove_dir(&links);
    Ok(())
}

/// Mounts tracefs at `path` unless one is mounted there already.
fn ensure_tracefs(path: &Path) -> Result<(), KernelMetricsError> {
    const TRACEFS_MAGIC: i64 = 0x7472_6163;
    let fs = nix::sys::statfs::statfs(path).map_err(|e| io_err("statfs", path)(e.into()))?;
    if fs.filesystem_type().0 == TRACEFS_MAGIC {
        return Ok(());
    }
    tracing::info!(path = %path.display(), "tracefs is not mounted; mounting it");
    nix::mount::mount(
        Some("nodev"),
        path,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| io_err("mount tracefs at", path)(e.into()))
}
