//! Network policy enforcement in eBPF: the TC programs `weir_pol_from_pod`
//! (the pod's Egress policy) and `weir_pol_to_pod` (its Ingress policy) on
//! each pod's host-side veth, and typed access to their maps (ipcache,
//! endpoints, policy entries, conntrack, drop counters).
//!
//! The map shapes and the semantics are written down in the policy
//! dataplane contract (`CONTRACT-policy-dataplane.md`): identities, the
//! lookup order, when flows get conntrack entries, what a policy change
//! does to established flows ([`PolicyDataplane::prune_conntrack`]).
//!
//! Adoption like [`crate::dataplane`]: maps pinned under the node's
//! directory are reused with their contents, pinned TCX links (in
//! `pol-links/`) get the fresh program swapped in instead of a second link.
//! Policy entries are changed by diff ([`PolicyDataplane::set_policy`]),
//! never flushed, so flows that stay allowed never see a gap.

mod ipcache;
mod maps;

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
    },
};
use weir_common::{
    DIR_EGRESS, DIR_INGRESS, EP_F_EGRESS, EP_F_INGRESS, EP_F_SOURCE_CHECK, EndpointConfig,
    PROG_POL_FROM_POD, PROG_POL_TO_POD, PolicyKey,
};

pub use self::maps::{Decision, PolicyDiff};
use crate::dataplane::EBPF_OBJECT;

/// A policy dataplane operation that failed, naming what it was about.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The eBPF object could not be loaded.
    #[error("load eBPF object for network policy: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    /// A program could not be found, loaded or attached.
    #[error("{what} {prog} on {iface}: {source}")]
    Program {
        /// What was being done.
        what: &'static str,
        /// The program.
        prog: &'static str,
        /// The interface ("" when none).
        iface: String,
        /// The error.
        source: Box<aya::programs::ProgramError>,
    },
    /// A pinned link could not be opened, adopted, pinned or unpinned.
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
    /// A directory under bpffs could not be created.
    #[error("create {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A prefix was not a valid IPv4 CIDR.
    #[error(transparent)]
    Cidr(#[from] weir_proto::cidr::CidrError),
}

pub use weir_proto::cidr::Cidr;

/// A direction of a pod's traffic, as a `NetworkPolicy` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Towards the pod (its Ingress policy).
    Ingress,
    /// From the pod (its Egress policy).
    Egress,
}

impl Direction {
    /// The map encoding ([`DIR_INGRESS`] / [`DIR_EGRESS`]).
    #[must_use]
    pub fn raw(self) -> u8 {
        match self {
            Self::Ingress => DIR_INGRESS,
            Self::Egress => DIR_EGRESS,
        }
    }

    /// The direction of map encoding `raw`, if valid.
    #[must_use]
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            DIR_INGRESS => Some(Self::Ingress),
            DIR_EGRESS => Some(Self::Egress),
            _ => None,
        }
    }
}

/// A pod's policy state: its identity, address and enforced directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The pod's security identity.
    pub identity: u32,
    /// The pod's IPv4 address.
    pub ip: Ipv4Addr,
    /// Some policy selects the pod for Ingress.
    pub ingress: bool,
    /// Some policy selects the pod for Egress.
    pub egress: bool,
    /// Drop packets the pod sends from another source address.
    pub source_check: bool,
}

impl Endpoint {
    /// Whether direction `dir` is enforced.
    #[must_use]
    pub fn enforces(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }

    fn to_raw(self) -> EndpointConfig {
        let mut flags = 0;
        for (on, bit) in [
            (self.ingress, EP_F_INGRESS),
            (self.egress, EP_F_EGRESS),
            (self.source_check, EP_F_SOURCE_CHECK),
        ] {
            if on {
                flags |= bit;
            }
        }
        EndpointConfig {
            identity: self.identity,
            pod_ip: u32::from(self.ip).to_be(),
            flags,
            pad: 0,
        }
    }

    fn from_raw(c: EndpointConfig) -> Self {
        Self {
            identity: c.identity,
            ip: Ipv4Addr::from(u32::from_be(c.pod_ip)),
            ingress: c.flags & EP_F_INGRESS != 0,
            egress: c.flags & EP_F_EGRESS != 0,
            source_check: c.flags & EP_F_SOURCE_CHECK != 0,
        }
    }
}

/// One allow entry of an endpoint's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    /// The peer's identity; [`weir_common::ID_ANY`] for any peer.
    pub peer: u32,
    /// Destination port; 0 for any.
    pub port: u16,
    /// IP protocol ([`weir_common::PROTO_TCP`], [`weir_common::PROTO_UDP`]); 0 for any.
    pub proto: u8,
    /// The direction it allows.
    pub dir: Direction,
    /// Index of the rule (`NetworkPolicy`) allowing it, for flow records.
    pub rule: u32,
}

impl PolicyEntry {
    fn key(&self, ep: u32) -> PolicyKey {
        PolicyKey {
            ep,
            identity: self.peer,
            port: self.port,
            proto: self.proto,
            dir: self.dir.raw(),
        }
    }
}

/// Which TCX hook of the host-side veth each program sits on, and the
/// name of its link pin. Both go first in their chain: an allowed packet
/// returns `TC_ACT_UNSPEC` (`TCX_NEXT`) and the programs after them (the
/// traffic counters) run; a dropped one goes no further, so the counters
/// count what policy let through. (A program returning anything but
/// `TCX_NEXT`, `TC_ACT_PIPE` included, ends the chain: after the counters the
/// policy would never run.)
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (PROG_POL_FROM_POD, TcAttachType::Ingress, "from"),
    (PROG_POL_TO_POD, TcAttachType::Egress, "to"),
];

/// The policy programs and their maps on one node.
pub struct PolicyDataplane {
    pin_dir: PathBuf,
    ebpf: Mutex<Ebpf>,
    maps: Mutex<maps::Maps>,
}

impl PolicyDataplane {
    /// Loads the policy programs with their maps pinned in `pin_dir` (the
    /// node's directory, `/sys/fs/bpf/weir/<node>`), reusing pinned maps.
    pub fn load(pin_dir: &Path) -> Result<Self, PolicyError> {
        let links = pin_dir.join("pol-links");
        std::fs::create_dir_all(&links).map_err(|source| PolicyError::Io {
            path: links.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(Box::new)?;
        for (prog, ..) in HOOKS {
            program(&mut ebpf, prog)?
                .load()
                .map_err(prog_err("load", prog, ""))?;
        }
        let mut maps = maps::Maps::take(&mut ebpf)?;
        match maps.migrate_conntrack_v1(pin_dir) {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "conntrack migrated to {}", weir_common::CT_MAP),
            Err(e) => tracing::warn!(error = %e, "conntrack not migrated: flows are judged again"),
        }
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(maps),
        })
    }

    fn link_pin(&self, iface: &str, hook: &str) -> PathBuf {
        self.pin_dir
            .join("pol-links")
            .join(format!("{iface}-{hook}"))
    }

    /// Attaches both programs to pod veth `iface` (host side), adopting
    /// links pinned by an earlier agent. Without an endpoint entry the
    /// programs pass everything.
    pub fn attach(&self, iface: &str) -> Result<(), PolicyError> {
        let mut ebpf = self.ebpf.lock().expect("policy programs lock poisoned");
        for (prog, attach, hook) in HOOKS {
            let p = program(&mut ebpf, prog)?;
            let pin = self.link_pin(iface, hook);
            let id = match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let link = FdLink::from(old)
                        .try_into()
                        .map_err(|e: LinkError| link_err("adopt", &pin, e))?;
                    p.attach_to_link(link)
                        .map_err(prog_err("replace on link", prog, iface))?
                }
                Err(e) if !pin.exists() => {
                    drop(e);
                    let order = TcAttachOptions::TcxOrder(LinkOrder::first());
                    p.attach_with_options(iface, attach, order)
                        .map_err(prog_err("attach", prog, iface))?
                }
                Err(e) => return Err(link_err("open pinned", &pin, e)),
            };
            let link = p
                .take_link(id)
                .map_err(prog_err("take link", prog, iface))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: LinkError| link_err("convert", &pin, e))?;
            // Re-pinning an adopted link over its own path: the old pin goes first.
            let _ = std::fs::remove_file(&pin);
            fd.pin(&pin).map_err(|e| link_err("pin", &pin, e))?;
        }
        Ok(())
    }

    /// Detaches both programs from `iface` and removes their pins. Missing
    /// pins are not errors.
    pub fn detach(&self, iface: &str) -> Result<(), PolicyError> {
        for (.., hook) in HOOKS {
            let pin = self.link_pin(iface, hook);
            match PinnedLink::from_pin(&pin) {
                // Dropping the last fd of an unpinned link detaches it.
                Ok(link) => drop(link.unpin().map_err(|e| link_err("unpin", &pin, e))?),
                Err(e) if !pin.exists() => drop(e),
                Err(e) => return Err(link_err("open pinned", &pin, e)),
            }
        }
        Ok(())
    }

    /// Interfaces that have pinned policy links (to find those of pods
    /// that are gone).
    #[must_use]
    pub fn attached_ifaces(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.pin_dir.join("pol-links"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                Some(name.rsplit_once('-')?.0.to_owned())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, maps::Maps> {
        self.maps.lock().expect("policy maps lock poisoned")
    }

    /// Sets the endpoint of pod veth `ifindex`. A new endpoint, or one whose
    /// pod IP changed (a reused ifindex), starts without conntrack entries.
    /// To start enforcing a direction, call [`Self::set_policy`] first; to
    /// stop, call this first: either way no allowed flow sees a gap.
    pub fn set_endpoint(&self, ifindex: u32, ep: &Endpoint) -> Result<(), PolicyError> {
        self.maps().set_endpoint(ifindex, ep.to_raw())
    }

    /// Removes endpoint `ifindex` with its policy entries and conntrack
    /// entries (its traffic passes unenforced from then on).
    pub fn remove_endpoint(&self, ifindex: u32) -> Result<(), PolicyError> {
        self.maps().remove_endpoint(ifindex)
    }

    /// The endpoint of `ifindex`, if set.
    pub fn endpoint(&self, ifindex: u32) -> Result<Option<Endpoint>, PolicyError> {
        Ok(self.maps().endpoint(ifindex)?.map(Endpoint::from_raw))
    }

    /// Every endpoint, by ifindex.
    pub fn endpoints(&self) -> Result<Vec<(u32, Endpoint)>, PolicyError> {
        Ok(self
            .maps()
            .endpoints()?
            .into_iter()
            .map(|(i, c)| (i, Endpoint::from_raw(c)))
            .collect())
    }

    /// Maps `cidr` to `identity`: a pod's, host's or remote node's (one per
    /// address, usually a /32) or, for identities ≥
    /// [`weir_common::ID_CIDR_MIN`], an `ipBlock`'s. Both kinds can name
    /// the same prefix; the prefixes inside a CIDR identity's prefix get
    /// it as their `cidr_identity`.
    pub fn upsert_ipcache(&self, cidr: Cidr, identity: u32) -> Result<(), PolicyError> {
        self.maps().upsert_ipcache(cidr, identity)
    }

    /// Removes `identity` from `cidr` if it still holds it (the address may
    /// already belong to a new pod); returns whether it did.
    pub fn remove_ipcache(&self, cidr: Cidr, identity: u32) -> Result<bool, PolicyError> {
        self.maps().remove_ipcache(cidr, identity)
    }

    /// The ipcache as the kernel holds it.
    pub fn ipcache(&self) -> Result<Vec<(Cidr, weir_common::IpCacheValue)>, PolicyError> {
        self.maps().ipcache_entries()
    }

    /// Makes endpoint `ifindex`'s policy entries exactly `entries` by diff:
    /// new and changed entries are written before stale ones are removed;
    /// entries that stay are not touched.
    pub fn set_policy(
        &self,
        ifindex: u32,
        entries: &[PolicyEntry],
    ) -> Result<PolicyDiff, PolicyError> {
        self.maps().set_policy(ifindex, entries)
    }

    /// Endpoint `ifindex`'s policy entries.
    pub fn policy(&self, ifindex: u32) -> Result<Vec<PolicyEntry>, PolicyError> {
        self.maps().policy(ifindex)
    }

    /// Deletes endpoint `ifindex`'s conntrack entries whose first direction
    /// is enforced and that the current ipcache and policy no longer allow
    /// (and all of them if it has no endpoint): their next packet is a new
    /// flow and is judged again. Returns how many went.
    pub fn prune_conntrack(&self, ifindex: u32) -> Result<usize, PolicyError> {
        self.maps().prune_conntrack(Some(ifindex))
    }

    /// [`Self::prune_conntrack`] for every endpoint (after ipcache changes)
    /// and removal of entries of endpoints that are gone.
    pub fn prune_all(&self) -> Result<usize, PolicyError> {
        self.maps().prune_conntrack(None)
    }

    /// Conntrack entries of endpoint `ifindex`, or of all endpoints.
    pub fn conntrack(
        &self,
        ifindex: Option<u32>,
    ) -> Result<Vec<(weir_common::CtKey, weir_common::CtValue)>, PolicyError> {
        self.maps().conntrack(ifindex)
    }

    /// What the programs would decide for the first packet of a flow at
    /// endpoint `ifindex` with `peer` on destination `port` / `proto`.
    pub fn decide(
        &self,
        ifindex: u32,
        dir: Direction,
        peer: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> Result<Decision, PolicyError> {
        self.maps().decide(ifindex, dir, peer, port, proto)
    }

    /// Dropped packets by reason, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(weir_common::DropReason, u64)>, PolicyError> {
        self.maps().drops()
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    prog: &'static str,
) -> Result<&'a mut SchedClassifier, PolicyError> {
    ebpf.program_mut(prog)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(prog_err("find", prog, ""))
}

fn prog_err(
    what: &'static str,
    prog: &'static str,
    iface: &str,
) -> impl FnOnce(aya::programs::ProgramError) -> PolicyError {
    let iface = iface.to_owned();
    move |source| PolicyError::Program {
        what,
        prog,
        iface,
        source: Box::new(source),
    }
}

fn link_err(
    what: &'static str,
    path: &Path,
    e: impl std::error::Error + Send + Sync + 'static,
) -> PolicyError {
    PolicyError::Link {
        what,
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}
