//! The node's eBPF dataplane: loads weir's programs, pins maps and links
//! under `/sys/fs/bpf/weir/<node>/`, and adopts what a previous agent pinned.
//!
//! Adoption rules: pinned maps are reused with their contents (an agent
//! restart must not reset counters); a pinned TCX link gets the freshly
//! loaded program swapped in with `bpf_link_update` instead of a second link
//! being stacked next to it.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuHashMap, PerCpuValues},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
    },
    sys::SyscallError,
};
use weir_common::{PROG_FROM_POD, PROG_TO_POD, TRAFFIC_MAP, TrafficCounters, TrafficKey};

/// The compiled eBPF object, embedded at build time.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-ebpf"));

/// A dataplane operation that failed, naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The bpffs directory could not be prepared.
    #[error("prepare bpffs directory {path}: {source}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The blocking task doing the work failed.
    #[error("dataplane task: {0}")]
    Task(String),
    /// The object could not be loaded.
    #[error("load eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    /// A program could not be loaded or attached.
    #[error("{what} {prog} on {iface}: {source}")]
    Program {
        /// What was being done.
        what: &'static str,
        /// The program.
        prog: &'static str,
        /// The interface.
        iface: String,
        /// The error.
        source: Box<aya::programs::ProgramError>,
    },
    /// A link could not be pinned, opened or unpinned.
    #[error("{what} link {path}: {source}")]
    Link {
        /// What was being done.
        what: &'static str,
        /// The pin path.
        path: PathBuf,
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

/// TC direction on a pod's host-side veth and the program that counts it.
const DIRECTIONS: [(TcAttachType, &str, &str); 2] = [
    (TcAttachType::Ingress, PROG_FROM_POD, "ingress"),
    (TcAttachType::Egress, PROG_TO_POD, "egress"),
];

/// The loaded programs and the maps they share.
pub struct Dataplane {
    pin_dir: PathBuf,
    ebpf: Mutex<Ebpf>,
    traffic: Mutex<PerCpuHashMap<MapData, TrafficKey, TrafficCounters>>,
}

impl Dataplane {
    /// Loads the programs for node `node`, reusing maps pinned under
    /// `bpffs/weir/<node>/` (creating and pinning them the first time).
    pub fn load(bpffs: &Path, node: &str) -> Result<Self, DataplaneError> {
        ensure_bpffs(bpffs)?;
        let pin_dir = bpffs.join("weir").join(node);
        for dir in [pin_dir.clone(), pin_dir.join("links")] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| DataplaneError::PinDir { path: dir, source })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(EBPF_OBJECT)
            .map_err(Box::new)?;
        for (_, prog, _) in DIRECTIONS {
            let p: &mut SchedClassifier = program(&mut ebpf, prog)?;
            p.load().map_err(|source| DataplaneError::Program {
                what: "load",
                prog,
                iface: String::new(),
                source: Box::new(source),
            })?;
        }
        let map = ebpf.take_map(TRAFFIC_MAP).ok_or(DataplaneError::Map {
            what: "find",
            map: TRAFFIC_MAP,
            source: Box::new(aya::maps::MapError::InvalidName {
                name: TRAFFIC_MAP.to_owned(),
            }),
        })?;
        let traffic = PerCpuHashMap::try_from(map).map_err(|source| DataplaneError::Map {
            what: "open",
            map: TRAFFIC_MAP,
            source: Box::new(source),
        })?;
        Ok(Self {
            pin_dir,
            ebpf: Mutex::new(ebpf),
            traffic: Mutex::new(traffic),
        })
    }

    /// The node's bpffs directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn link_pin(&self, iface: &str, dir: &str) -> PathBuf {
        self.pin_dir.join("links").join(format!("{iface}-{dir}"))
    }

    /// Attaches the traffic counters to a pod's host-side veth, adopting
    /// links pinned by an earlier agent. Creates the map entry (zeroed) only
    /// if it is missing, so counters survive agent restarts.
    pub fn attach_pod(&self, iface: &str, ifindex: u32) -> Result<(), DataplaneError> {
        self.ensure_counter(ifindex)?;
        let mut ebpf = self.ebpf.lock().expect("dataplane lock poisoned");
        for (attach, prog, dir) in DIRECTIONS {
            let p: &mut SchedClassifier = program(&mut ebpf, prog)?;
            let pin = self.link_pin(iface, dir);
            let link_id = match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let link = FdLink::from(old)
                        .try_into()
                        .map_err(|e: LinkError| link_err("adopt", &pin, e))?;
                    p.attach_to_link(link)
                        .map_err(|source| DataplaneError::Program {
                            what: "replace on link",
                            prog,
                            iface: iface.into(),
                            source: Box::new(source),
                        })?
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    p.attach_with_options(
                        iface,
                        attach,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|source| DataplaneError::Program {
                        what: "attach",
                        prog,
                        iface: iface.into(),
                        source: Box::new(source),
                    })?
                }
                Err(e) => return Err(link_err("open pinned", &pin, e)),
            };
            let link = p
                .take_link(link_id)
                .map_err(|source| DataplaneError::Program {
                    what: "take link",
                    prog,
                    iface: iface.into(),
                    source: Box::new(source),
                })?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: LinkError| link_err("convert", &pin, e))?;
            // A re-pin over an adopted link's own path: remove the old pin first.
            let _ = std::fs::remove_file(&pin);
            fd.pin(&pin).map_err(|e| link_err("pin", &pin, e))?;
        }
        Ok(())
    }

    fn ensure_counter(&self, ifindex: u32) -> Result<(), DataplaneError> {
        let mut map = self.traffic.lock().expect("traffic map lock poisoned");
        let key = TrafficKey { ifindex };
        if map.get(&key, 0).is_ok() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            what: "count cpus for",
            map: TRAFFIC_MAP,
            source: Box::new(aya::maps::MapError::IoError(e)),
        })?;
        let zeros =
            PerCpuValues::try_from(vec![TrafficCounters::default(); cpus]).map_err(|e| {
                DataplaneError::Map {
                    what: "size per-cpu value of",
                    map: TRAFFIC_MAP,
                    source: Box::new(aya::maps::MapError::IoError(e)),
                }
            })?;
        // BPF_NOEXIST: never overwrite counts the programs already made.
        match map.insert(key, zeros, 1) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(source) => Err(DataplaneError::Map {
                what: "insert into",
                map: TRAFFIC_MAP,
                source: Box::new(source),
            }),
        }
    }

    /// Detaches a pod's links (unpinning them) and removes its counters.
    /// Missing pins and entries are not errors.
    pub fn detach_pod(&self, iface: &str, ifindex: u32) -> Result<(), DataplaneError> {
        for (_, _, dir) in DIRECTIONS {
            let pin = self.link_pin(iface, dir);
            match PinnedLink::from_pin(&pin) {
                Ok(link) => {
                    let fd = link.unpin().map_err(|e| link_err("unpin", &pin, e))?;
                    // Dropping the last fd of an unpinned link detaches it.
                    drop(fd);
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(link_err("open pinned", &pin, e)),
            }
        }
        self.remove_counter(ifindex)
    }

    fn remove_counter(&self, ifindex: u32) -> Result<(), DataplaneError> {
        let mut map = self.traffic.lock().expect("traffic map lock poisoned");
        match map.remove(&TrafficKey { ifindex }) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(source) => Err(DataplaneError::Map {
                what: "remove from",
                map: TRAFFIC_MAP,
                source: Box::new(source),
            }),
        }
    }

    /// A pod's counters summed over CPUs; zero if it has none.
    pub fn counters(&self, ifindex: u32) -> TrafficCounters {
        let map = self.traffic.lock().expect("traffic map lock poisoned");
        map.get(&TrafficKey { ifindex }, 0)
            .map(|v| v.iter().fold(TrafficCounters::default(), |a, c| a + *c))
            .unwrap_or_default()
    }

    /// ifindexes that have counters (to find entries of pods that are gone).
    pub fn counted_ifindexes(&self) -> Vec<u32> {
        let map = self.traffic.lock().expect("traffic map lock poisoned");
        map.keys()
            .filter_map(Result::ok)
            .map(|k| k.ifindex)
            .collect()
    }

    /// Interface names that have pinned links (to find pins of pods that are gone).
    pub fn pinned_ifaces(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.pin_dir.join("links"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (iface, _) = name.rsplit_once('-')?;
                Some(iface.to_owned())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Removes pins and counters left for interfaces not in `keep`.
    pub fn garbage_collect(&self, keep_ifaces: &[String], keep_ifindexes: &[u32]) {
        for iface in self.pinned_ifaces() {
            if !keep_ifaces.contains(&iface)
                && let Err(e) = self.detach_pod(&iface, 0)
            {
                tracing::warn!(error = %e, iface, "cannot remove stale links");
            }
        }
        for ifindex in self.counted_ifindexes() {
            if !keep_ifindexes.contains(&ifindex)
                && let Err(e) = self.remove_counter(ifindex)
            {
                tracing::warn!(error = %e, ifindex, "cannot remove stale counters");
            }
        }
    }
}

/// Mounts bpffs at `path` unless one is mounted there already (a fresh
/// machine may have none; pins would otherwise land on sysfs and fail).
pub(crate) fn ensure_bpffs(path: &Path) -> Result<(), DataplaneError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let err = |source: io::Error| DataplaneError::PinDir {
        path: path.to_path_buf(),
        source,
    };
    let fs = nix::sys::statfs::statfs(path).map_err(|e| err(e.into()))?;
    if fs.filesystem_type().0 == BPF_FS_MAGIC {
        return Ok(());
    }
    tracing::info!(path = %path.display(), "bpffs is not mounted; mounting it");
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| err(e.into()))
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(|source| DataplaneError::Program {
            what: "find",
            prog: name,
            iface: String::new(),
            source: Box::new(source),
        })
}

fn link_err(
    what: &'static str,
    path: &Path,
    e: impl std::error::Error + Send + Sync + 'static,
) -> DataplaneError {
    DataplaneError::Link {
        what,
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}
