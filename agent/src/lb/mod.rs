//! East-west service load balancing at the socket level: loads the cgroup
//! `sock_addr` programs (`connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`),
//! attaches them to a cgroup v2 directory with pinned links, and keeps the
//! service maps equal to the desired services by diff ([`Dataplane::sync`]).
//!
//! Everything is pinned under `/sys/fs/bpf/weir/<node>/`: the maps by name,
//! the links under `lb-links/`, so services keep working while the agent is
//! down. A restarted agent adopts both: pinned maps keep their contents, a
//! pinned link gets the new program swapped in (`bpf_link_update`), never a
//! second link stacked next to it.
//!
//! Where to attach: the programs act for every socket of every process in
//! the cgroup subtree. On a pure v2 host that is the root (or the pods'
//! parent); on the v1 hybrid machines here the v2 hierarchy is
//! `/sys/fs/cgroup/unified`, where runc also places every container. When
//! several nodes share one attach point (the root), [`Options::netns_filter`]
//! makes each node's programs act only for sockets in the network namespaces
//! given to [`Dataplane::allow_netns`] (the node's own and its pods').

pub mod inspect;
pub mod maglev;
pub mod nodeport;
mod plan;
mod sys;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
pub use nodeport::{NodePort, NodePortBackend, NodePortSpec, NodePortStats};
pub use plan::{
    Change, Current, Op, Plan, Protocol, ServiceSpec, apply_op, backend, plan, plan_changes,
};
use weir_common::{
    AFFINITY_MAP, AffinityKey, AffinityValue, BACKENDS_MAP, Backend, LB_CFG_NETNS_FILTER,
    LB_CONFIG_MAP, LB_NETNS_MAP, LbConfig, PROG_LB_CONNECT4, PROG_LB_GETPEERNAME4,
    PROG_LB_RECVMSG4, PROG_LB_SENDMSG4, SLOTS_MAP, SOCK_REV_MAP, SVC_MAP, SlotKey, SvcKey,
    SvcValue,
};

use crate::dataplane::{EBPF_OBJECT, ensure_bpffs};

/// The balancer's programs, in attach order.
pub const PROGRAMS: [&str; 4] = [
    PROG_LB_CONNECT4,
    PROG_LB_SENDMSG4,
    PROG_LB_RECVMSG4,
    PROG_LB_GETPEERNAME4,
];

/// The balancer's pinned maps (east-west and `NodePort`).
pub const MAPS: [&str; 12] = [
    weir_common::NP_SVC_MAP,
    weir_common::MAGLEV_MAP,
    weir_common::NP_FLOW_MAP,
    weir_common::NP_REV_MAP,
    weir_common::NP_SNAT_MAP,
    SVC_MAP,
    SLOTS_MAP,
    BACKENDS_MAP,
    SOCK_REV_MAP,
    AFFINITY_MAP,
    LB_NETNS_MAP,
    LB_CONFIG_MAP,
];

/// A balancer operation that failed, naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// A file or directory (bpffs, cgroup) could not be used.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The eBPF object could not be loaded.
    #[error("load eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    /// A program could not be found, loaded or attached.
    #[error("{what} program {prog}: {source}")]
    Program {
        /// What was being done.
        what: &'static str,
        /// The program.
        prog: &'static str,
        /// The error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("{what} map {map}: {source}")]
    Map {
        /// What was being done.
        what: &'static str,
        /// The map.
        map: &'static str,
        /// The error.
        source: Box<MapError>,
    },
}

/// How the balancer is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The cgroup v2 directory to attach to (its whole subtree is covered).
    pub cgroup: PathBuf,
    /// Act only for sockets in network namespaces given to
    /// [`Dataplane::allow_netns`] (needed when several nodes share `cgroup`).
    pub netns_filter: bool,
}

impl Options {
    /// Attach at the root of the host's cgroup v2 hierarchy under
    /// `cgroupfs` (pure v2: `cgroupfs` itself; v1 hybrid: `cgroupfs/unified`)
    /// with the netns filter on: that covers the node's host processes and
    /// every pod (runc places containers under the v2 root too), and lets
    /// several nodes share one machine. `None` if there is no v2 hierarchy.
    pub fn host_root(cgroupfs: &Path) -> Option<Self> {
        [cgroupfs.to_path_buf(), cgroupfs.join("unified")]
            .into_iter()
            .find(|d| d.join("cgroup.controllers").exists())
            .map(|cgroup| Self {
                cgroup,
                netns_filter: true,
            })
    }
}

/// What one [`Dataplane::sync`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Map writes done.
    pub writes: usize,
    /// Services now programmed.
    pub services: usize,
    /// Affinity entries removed because their backend went.
    pub affinity_purged: usize,
}

struct Maps {
    svcs: HashMap<MapData, SvcKey, SvcValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    netns: HashMap<MapData, u64, u32>,
    /// What `svcs`, `slots` and `backends` hold: read from them once at
    /// load (the pins' contents), then updated by every write that
    /// succeeded, so a sync never re-reads the maps.
    mirror: Current,
}

/// The node's service load balancer.
pub struct Dataplane {
    pin_dir: PathBuf,
    // Keeps the programs loaded for as long as the balancer lives; the
    // pinned links keep them attached beyond that.
    _ebpf: Ebpf,
    maps: Mutex<Maps>,
    /// The `NodePort` dataplane, attached at the first sync.
    nodeport: Mutex<Option<NodePort>>,
}

fn map_err(what: &'static str, map: &'static str) -> impl FnOnce(MapError) -> LbError {
    move |source| LbError::Map {
        what,
        map,
        source: Box::new(source),
    }
}

fn prog_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
    prog: &'static str,
) -> impl FnOnce(E) -> LbError {
    move |source| LbError::Program {
        what,
        prog,
        source: Box::new(source),
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LbError {
    let path = path.to_path_buf();
    move |source| LbError::Io { what, path, source }
}

fn take<V: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<V, LbError> {
    let map = ebpf.take_map(name).ok_or_else(|| LbError::Map {
        what: "find",
        map: name,
        source: Box::new(MapError::InvalidName {
            name: name.to_owned(),
        }),
    })?;
    V::try_from(map).map_err(map_err("open", name))
}

impl Dataplane {
    /// Loads the balancer of node `node`, reusing maps pinned under
    /// `bpffs/weir/<node>/`, and attaches (or adopts) its links on
    /// `opts.cgroup`.
    pub fn load(bpffs: &Path, node: &str, opts: &Options) -> Result<Self, LbError> {
        ensure_bpffs(bpffs).map_err(|e| LbError::Io {
            what: "prepare bpffs",
            path: bpffs.to_path_buf(),
            source: io::Error::other(e),
        })?;
        let pin_dir = bpffs.join("weir").join(node);
        let links_dir = pin_dir.join("lb-links");
        std::fs::create_dir_all(&links_dir).map_err(io_err("create", &links_dir))?;
        let cgroup = File::open(&opts.cgroup).map_err(io_err("open cgroup", &opts.cgroup))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(EBPF_OBJECT)
            .map_err(Box::new)?;
        let mut config: Array<MapData, LbConfig> = take(&mut ebpf, LB_CONFIG_MAP)?;
        let flags = if opts.netns_filter {
            LB_CFG_NETNS_FILTER
        } else {
            0
        };
        // Before attaching: a filtering node must never act on other nodes' sockets.
        config
            .set(0, LbConfig { flags }, 0)
            .map_err(map_err("write", LB_CONFIG_MAP))?;
        for prog in PROGRAMS {
            attach(&mut ebpf, prog, &cgroup, &links_dir.join(prog))?;
        }
        let mut maps = Maps {
            svcs: take(&mut ebpf, SVC_MAP)?,
            slots: take(&mut ebpf, SLOTS_MAP)?,
            backends: take(&mut ebpf, BACKENDS_MAP)?,
            affinity: take(&mut ebpf, AFFINITY_MAP)?,
            netns: take(&mut ebpf, LB_NETNS_MAP)?,
            mirror: Current::default(),
        };
        maps.mirror = read_current(&maps);
        tracing::info!(node, cgroup = %opts.cgroup.display(), netns_filter = opts.netns_filter, "service load balancer attached");
        Ok(Self {
            pin_dir,
            _ebpf: ebpf,
            maps: Mutex::new(maps),
            nodeport: Mutex::new(None),
        })
    }

    /// The node's bpffs directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Balances sockets of the network namespace with this cookie (only
    /// matters with [`Options::netns_filter`]).
    pub fn allow_netns(&self, cookie: u64) -> Result<(), LbError> {
        let mut m = self.maps.lock().expect("lb maps lock poisoned");
        m.netns
            .insert(cookie, 1, 0)
            .map_err(map_err("insert into", LB_NETNS_MAP))
    }

    /// Stops balancing sockets of that network namespace; a missing entry is
    /// not an error.
    pub fn forget_netns(&self, cookie: u64) -> Result<(), LbError> {
        let mut m = self.maps.lock().expect("lb maps lock poisoned");
        ignore_missing(m.netns.remove(&cookie)).map_err(map_err("remove from", LB_NETNS_MAP))
    }

    /// The network namespace cookies balanced for now.
    pub fn allowed_netns(&self) -> Vec<u64> {
        let m = self.maps.lock().expect("lb maps lock poisoned");
        m.netns.keys().filter_map(Result::ok).collect()
    }

    /// What the pinned maps hold now (read from the kernel).
    pub fn current(&self) -> Current {
        let m = self.maps.lock().expect("lb maps lock poisoned");
        read_current(&m)
    }

    /// What the balancer believes the maps hold: read from the pins at
    /// load, then kept up to date by every write. Equal to
    /// [`Self::current`] unless something else writes the maps.
    pub fn mirror(&self) -> Current {
        self.maps
            .lock()
            .expect("lb maps lock poisoned")
            .mirror
            .clone()
    }

    /// Makes the maps hold exactly `desired` by diff against what they
    /// hold (never flushing): unchanged services are not written, slots
    /// are written before a count shrinks and after it grows. Plans the
    /// whole table (O(services), no map reads): for a full resync, e.g.
    /// after a restart; single changes go through [`Self::sync_changes`].
    pub fn sync(&self, desired: &[ServiceSpec]) -> Result<SyncStats, LbError> {
        let mut m = self.maps.lock().expect("lb maps lock poisoned");
        let p = plan(&m.mirror, desired);
        execute(&mut m, &p)
    }

    /// Applies `changes` (services added, changed or removed) by diff
    /// against what the maps hold, touching only those services' entries:
    /// O(the changed services), with the same write order as
    /// [`Self::sync`].
    pub fn sync_changes(&self, changes: &[Change]) -> Result<SyncStats, LbError> {
        let mut m = self.maps.lock().expect("lb maps lock poisoned");
        let p = plan_changes(&m.mirror, changes);
        execute(&mut m, &p)
    }

    /// Whether the `NodePort` programs are attached, by this agent or (as
    /// pinned links) by an earlier one whose maps may need emptying.
    pub fn nodeport_loaded(&self) -> bool {
        self.nodeport
            .lock()
            .expect("nodeport lock poisoned")
            .is_some()
            || nodeport::pinned(&self.pin_dir)
    }

    /// Makes the `NodePort` maps hold exactly `desired` for node `node`
    /// whose address is `node_ip`; the first call attaches the `NodePort`
    /// programs on the interface holding `node_ip` (the uplink).
    pub fn sync_nodeports(
        &self,
        node: &str,
        node_ip: Ipv4Addr,
        desired: &[NodePortSpec],
    ) -> Result<NodePortStats, LbError> {
        let mut np = self.nodeport.lock().expect("nodeport lock poisoned");
        let np = match &mut *np {
            Some(np) => np,
            empty => {
                let uplink = nodeport::interface_of(node_ip)?;
                empty.insert(NodePort::load(&self.pin_dir, node, node_ip, &uplink)?)
            }
        };
        np.sync(desired)
    }

    /// Detaches node `node`'s balancer and removes its pins (links and
    /// maps). Missing pins are not errors. For a node that goes away.
    pub fn remove(bpffs: &Path, node: &str) -> Result<(), LbError> {
        let pin_dir = bpffs.join("weir").join(node);
        let links_dir = pin_dir.join("lb-links");
        for prog in PROGRAMS {
            let pin = links_dir.join(prog);
            match PinnedLink::from_pin(&pin) {
                Ok(link) => {
                    // Dropping the last fd of an unpinned link detaches it.
                    drop(link.unpin().map_err(io_err("unpin", &pin))?);
                }
                Err(e) if !pin.exists() => drop(e),
                Err(e) => return Err(prog_err("open pinned link of", prog)(e)),
            }
        }
        let _ = std::fs::remove_dir(&links_dir);
        NodePort::remove(&pin_dir)?;
        for map in MAPS {
            let pin = pin_dir.join(map);
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("unpin", &pin)(e));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Loads `prog` and attaches it to `cgroup`: through the link pinned at
/// `pin` if there is one (the program on it is replaced), else with a new
/// link that is then pinned there.
fn attach(ebpf: &mut Ebpf, prog: &'static str, cgroup: &File, pin: &Path) -> Result<(), LbError> {
    let p: &mut CgroupSockAddr = ebpf
        .program_mut(prog)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(prog_err("find", prog))?;
    p.load().map_err(prog_err("load", prog))?;
    if pin.exists() {
        let link = sys::obj_get(pin).map_err(io_err("open pinned link", pin))?;
        let fd = p.fd().map_err(prog_err("get fd of", prog))?;
        sys::link_update(link.as_fd(), fd.as_fd())
            .map_err(io_err("replace program on link", pin))?;
        tracing::debug!(prog, pin = %pin.display(), "adopted pinned link");
        return Ok(());
    }
    // A cgroup bpf_link takes no attach flags (0 = `Single`): links always
    // coexist with other links on the cgroup (other nodes' balancers).
    let id = p
        .attach(cgroup.as_fd(), CgroupAttachMode::Single)
        .map_err(prog_err("attach", prog))?;
    let link = p.take_link(id).map_err(prog_err("take link of", prog))?;
    let fd: FdLink = link.try_into().map_err(prog_err("convert link of", prog))?;
    fd.pin(pin).map_err(prog_err("pin link of", prog))?;
    Ok(())
}

/// Writes a plan's ops in order (the mirror follows each write that
/// succeeded), then drops affinity entries of removed backends.
fn execute(m: &mut Maps, p: &Plan) -> Result<SyncStats, LbError> {
    for key in &p.truncated {
        tracing::warn!(
            ?key,
            "service has more than 1000 backends; the rest are ignored"
        );
    }
    for op in &p.ops {
        apply(m, *op)?;
        apply_op(&mut m.mirror, *op);
    }
    let mut purged = 0;
    if p.purge_affinity && !p.removed_backends.is_empty() {
        let stale: Vec<AffinityKey> = m
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| p.removed_backends.contains(&v.backend))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            ignore_missing(m.affinity.remove(&k)).map_err(map_err("remove from", AFFINITY_MAP))?;
            purged += 1;
        }
    }
    Ok(SyncStats {
        writes: p.ops.len(),
        services: m.mirror.svcs.len(),
        affinity_purged: purged,
    })
}

fn read_current(m: &Maps) -> Current {
    Current {
        svcs: m.svcs.iter().filter_map(Result::ok).collect(),
        slots: m.slots.iter().filter_map(Result::ok).collect(),
        backends: m
            .backends
            .iter()
            .filter_map(Result::ok)
            .collect::<BTreeMap<_, _>>(),
    }
}

fn apply(m: &mut Maps, op: Op) -> Result<(), LbError> {
    match op {
        Op::PutBackend(k, v) => m
            .backends
            .insert(k, v, 0)
            .map_err(map_err("insert into", BACKENDS_MAP)),
        Op::PutSlot(k, v) => m
            .slots
            .insert(k, v, 0)
            .map_err(map_err("insert into", SLOTS_MAP)),
        Op::PutSvc(k, v) => m
            .svcs
            .insert(k, v, 0)
            .map_err(map_err("insert into", SVC_MAP)),
        Op::DelSvc(k) => ignore_missing(m.svcs.remove(&k)).map_err(map_err("remove from", SVC_MAP)),
        Op::DelSlot(k) => {
            ignore_missing(m.slots.remove(&k)).map_err(map_err("remove from", SLOTS_MAP))
        }
        Op::DelBackend(k) => {
            ignore_missing(m.backends.remove(&k)).map_err(map_err("remove from", BACKENDS_MAP))
        }
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(aya::sys::SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// The cookie of the network namespace at `path` (e.g. `/var/run/netns/x`
/// or `/proc/<pid>/ns/net`), for [`Dataplane::allow_netns`].
pub fn netns_cookie(path: &Path) -> Result<u64, LbError> {
    let file = File::open(path).map_err(io_err("open netns", path))?;
    // A scratch thread enters the netns so the caller's thread never moves.
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)
                .and_then(|()| sys::current_netns_cookie())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns cookie thread panicked")))
    })
    .map_err(io_err("read cookie of netns", path))
}

/// The cookie of the calling thread's network namespace.
pub fn own_netns_cookie() -> Result<u64, LbError> {
    sys::current_netns_cookie().map_err(io_err("read cookie of netns", Path::new("self")))
}
