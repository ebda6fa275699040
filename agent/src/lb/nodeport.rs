//! `NodePort` services, north-south: the TC programs `weir_np_ingress` and
//! `weir_np_egress` on the node's uplink (TCX links pinned under
//! `/sys/fs/bpf/weir/<node>/np-links/`), and the `NodePort` maps kept equal
//! to the desired services by diff ([`NodePort::sync`]).
//!
//! Each service port gets a Maglev table ([`super::maglev`]) over its
//! ready backends (externalTrafficPolicy Local: only this node's), written
//! as one value of `weir_maglev_v1`: one map update swaps a whole table
//! atomically. A restarted agent adopts the pinned links (the program on
//! them is replaced) and the maps (tables that did not change are not
//! rewritten).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
    },
};
use weir_common::{
    Backend, MAGLEV_MAP, MAGLEV_MAX_SIZE, MaglevTable, NP_BACKEND_REMOTE, NP_FLAG_SNAT, NP_SVC_MAP,
    NpService, PROG_NP_EGRESS, PROG_NP_INGRESS, SvcKey,
};

use super::{LbError, Protocol, backend, ignore_missing, io_err, maglev, map_err, prog_err, take};
use crate::dataplane::EBPF_OBJECT;

/// One desired `NodePort` service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortSpec {
    /// The nodePort.
    pub node_port: u16,
    /// The protocol.
    pub proto: Protocol,
    /// externalTrafficPolicy Local: only this node's backends, no SNAT.
    pub local: bool,
    /// Ready backends: pod IP, target port, the node it runs on.
    pub backends: Vec<NodePortBackend>,
}

/// A ready backend of a `NodePort` service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePortBackend {
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Target port.
    pub port: u16,
    /// The node the pod runs on (the endpoint's `nodeName`), if known.
    pub node: Option<String>,
}

/// What one [`NodePort::sync`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodePortStats {
    /// Tables written (swapped).
    pub tables: usize,
    /// Service entries written or removed.
    pub services: usize,
    /// The slowest single table swap (one map update).
    pub slowest_swap: Duration,
}

struct Maps {
    svcs: HashMap<MapData, SvcKey, NpService>,
    tables: HashMap<MapData, u32, MaglevTable>,
}

/// The node's `NodePort` dataplane on its uplink.
pub struct NodePort {
    node: String,
    node_ip: Ipv4Addr,
    _ebpf: Ebpf,
    maps: Mutex<Maps>,
    /// The table entries last written per id (saves reading 128 KiB back).
    written: Mutex<BTreeMap<u32, Vec<Backend>>>,
}

impl NodePort {
    /// Loads the `NodePort` programs of node `node` (maps pinned in
    /// `pin_dir`), and attaches (or adopts) them on `uplink`'s TCX ingress
    /// and egress.
    pub fn load(
        pin_dir: &Path,
        node: &str,
        node_ip: Ipv4Addr,
        uplink: &str,
    ) -> Result<Self, LbError> {
        let links_dir = pin_dir.join("np-links");
        std::fs::create_dir_all(&links_dir).map_err(io_err("create", &links_dir))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(Box::new)?;
        let maps = Maps {
            svcs: take(&mut ebpf, NP_SVC_MAP)?,
            tables: take(&mut ebpf, MAGLEV_MAP)?,
        };
        for (prog, dir) in [
            (PROG_NP_INGRESS, TcAttachType::Ingress),
            (PROG_NP_EGRESS, TcAttachType::Egress),
        ] {
            attach(&mut ebpf, prog, uplink, dir, &links_dir.join(prog))?;
        }
        tracing::info!(node, %node_ip, uplink, "NodePort programs attached");
        Ok(Self {
            node: node.to_owned(),
            node_ip,
            _ebpf: ebpf,
            maps: Mutex::new(maps),
            written: Mutex::new(BTreeMap::new()),
        })
    }

    /// Makes the `NodePort` maps hold exactly `desired` by diff: a changed
    /// table is swapped in one update before its service entry appears; a
    /// removed service's entry goes before its table.
    pub fn sync(&self, desired: &[NodePortSpec]) -> Result<NodePortStats, LbError> {
        let mut m = self.maps.lock().expect("nodeport maps lock poisoned");
        let mut written = self.written.lock().expect("nodeport cache lock poisoned");
        let current: BTreeMap<SvcKey, NpService> = m.svcs.iter().filter_map(Result::ok).collect();
        let mut used: BTreeSet<u32> = current.values().map(|v| v.id).collect();
        let mut stats = NodePortStats::default();
        let mut keep = BTreeSet::new();
        for spec in desired {
            let key = SvcKey {
                ip: u32::from(self.node_ip).to_be(),
                port: spec.node_port.to_be(),
                proto: spec.proto.number(),
                pad: 0,
            };
            if !keep.insert(key) {
                continue;
            }
            let id = if let Some(v) = current.get(&key) {
                v.id
            } else {
                let id = (1..=u32::MAX).find(|i| !used.contains(i)).unwrap_or(0);
                used.insert(id);
                id
            };
            // The size of the table programmed now (read from the pin
            // after a restart), which a backend change keeps.
            let size = match written.get(&id) {
                Some(e) => u32::try_from(e.len()).ok(),
                None => m.tables.get(&id, 0).ok().map(|t| t.size),
            };
            let entries = self.entries(spec, size);
            if written.get(&id) != Some(&entries) && !table_matches(&m.tables, id, &entries) {
                let started = Instant::now();
                write_table(&mut m.tables, id, &entries)?;
                stats.slowest_swap = stats.slowest_swap.max(started.elapsed());
                stats.tables += 1;
            }
            written.insert(id, entries);
            let value = NpService {
                id,
                flags: if spec.local { 0 } else { NP_FLAG_SNAT },
            };
            if current.get(&key) != Some(&value) {
                m.svcs
                    .insert(key, value, 0)
                    .map_err(map_err("insert into", NP_SVC_MAP))?;
                stats.services += 1;
            }
        }
        for (key, v) in &current {
            if keep.contains(key) {
                continue;
            }
            ignore_missing(m.svcs.remove(key)).map_err(map_err("remove from", NP_SVC_MAP))?;
            ignore_missing(m.tables.remove(&v.id)).map_err(map_err("remove from", MAGLEV_MAP))?;
            written.remove(&v.id);
            stats.services += 1;
        }
        Ok(stats)
    }

    /// A service's Maglev table: its ready backends (only this node's for
    /// Local), marked remote when on another node, of the size of its
    /// current table (`size`) if that still fits ([`maglev::next_size`]).
    /// Empty: no backend, drop.
    fn entries(&self, spec: &NodePortSpec, size: Option<u32>) -> Vec<Backend> {
        let mut bs: Vec<&NodePortBackend> = spec
            .backends
            .iter()
            .filter(|b| !spec.local || b.node.as_deref() == Some(self.node.as_str()))
            .collect();
        bs.sort();
        bs.dedup();
        let keys: Vec<(Ipv4Addr, u16)> = bs.iter().map(|b| (b.ip, b.port)).collect();
        let table = maglev::build(&keys, maglev::next_size(size, keys.len()));
        table
            .iter()
            .filter_map(|i| bs.get(*i as usize))
            .map(|b| {
                let mut v = backend(b.ip, b.port);
                if b.node.as_deref() != Some(self.node.as_str()) {
                    v.pad = NP_BACKEND_REMOTE;
                }
                v
            })
            .collect()
    }

    /// Detaches node `node`'s `NodePort` programs and removes their link
    /// pins. Missing pins are not errors.
    pub fn remove(pin_dir: &Path) -> Result<(), LbError> {
        let links_dir = pin_dir.join("np-links");
        for prog in [PROG_NP_INGRESS, PROG_NP_EGRESS] {
            let pin = links_dir.join(prog);
            match PinnedLink::from_pin(&pin) {
                Ok(link) => drop(link.unpin().map_err(io_err("unpin", &pin))?),
                Err(e) if !pin.exists() => drop(e),
                Err(e) => return Err(prog_err("open pinned link of", prog)(e)),
            }
        }
        let _ = std::fs::remove_dir(&links_dir);
        Ok(())
    }
}

/// Whether `pin_dir` holds pinned `NodePort` links (an earlier agent
/// attached them).
pub fn pinned(pin_dir: &Path) -> bool {
    let links = pin_dir.join("np-links");
    [PROG_NP_INGRESS, PROG_NP_EGRESS]
        .iter()
        .any(|p| links.join(p).exists())
}

/// Whether the pinned table `id` already holds `entries` (an adopted map).
fn table_matches(
    tables: &HashMap<MapData, u32, MaglevTable>,
    id: u32,
    entries: &[Backend],
) -> bool {
    match tables.get(&id, 0) {
        Ok(t) => {
            let size = t.size as usize;
            size == entries.len() && t.entries.get(..size) == Some(entries)
        }
        Err(_) => entries.is_empty(),
    }
}

/// Swaps table `id` for `entries` in one map update; an empty table is
/// removed (the program drops packets of a service without a table).
fn write_table(
    tables: &mut HashMap<MapData, u32, MaglevTable>,
    id: u32,
    entries: &[Backend],
) -> Result<(), LbError> {
    if entries.is_empty() {
        return ignore_missing(tables.remove(&id)).map_err(map_err("remove from", MAGLEV_MAP));
    }
    // SAFETY: all-zero bytes are a valid MaglevTable (plain integers);
    // built on the heap, it is 128 KiB.
    let mut t: Box<MaglevTable> = unsafe { Box::new_zeroed().assume_init() };
    let n = entries.len().min(MAGLEV_MAX_SIZE as usize);
    t.entries[..n].copy_from_slice(&entries[..n]);
    t.size = u32::try_from(n).unwrap_or(MAGLEV_MAX_SIZE);
    tables
        .insert(id, t.as_ref(), 0)
        .map_err(map_err("insert into", MAGLEV_MAP))
}

/// Attaches `prog` on `iface`'s TCX hook `dir`: through the link pinned at
/// `pin` if there is one (the program on it is replaced), else with a new
/// link pinned there.
fn attach(
    ebpf: &mut Ebpf,
    prog: &'static str,
    iface: &str,
    dir: TcAttachType,
    pin: &Path,
) -> Result<(), LbError> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(prog)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(prog_err("find", prog))?;
    p.load().map_err(prog_err("load", prog))?;
    let id = match PinnedLink::from_pin(pin) {
        Ok(old) => {
            let link = FdLink::from(old)
                .try_into()
                .map_err(|e: LinkError| prog_err("adopt link of", prog)(e))?;
            p.attach_to_link(link)
                .map_err(prog_err("replace on link", prog))?
        }
        Err(e) if !pin.exists() => {
            drop(e);
            p.attach_with_options(iface, dir, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .map_err(prog_err("attach", prog))?
        }
        Err(e) => return Err(prog_err("open pinned link of", prog)(e)),
    };
    let link = p.take_link(id).map_err(prog_err("take link of", prog))?;
    let fd: FdLink = link
        .try_into()
        .map_err(|e: LinkError| prog_err("convert link of", prog)(e))?;
    let _ = std::fs::remove_file(pin);
    fd.pin(pin).map_err(prog_err("pin link of", prog))?;
    Ok(())
}

/// The name of the interface holding `ip` (the node's uplink).
pub fn interface_of(ip: Ipv4Addr) -> Result<String, LbError> {
    let not_found = || LbError::Io {
        what: "find the interface holding",
        path: PathBuf::from(ip.to_string()),
        source: io::Error::from(io::ErrorKind::NotFound),
    };
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(LbError::Io {
            what: "list interfaces for",
            path: PathBuf::from(ip.to_string()),
            source: io::Error::last_os_error(),
        });
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let sin = unsafe { ifa.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned() };
        if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == ip {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: frees the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(head) };
    found.ok_or_else(not_found)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Pins under a private bpffs directory, removed on drop.
    struct PinDir(PathBuf);

    impl Drop for PinDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn table(n: u8, remote: bool) -> Vec<Backend> {
        let bs: Vec<(Ipv4Addr, u16)> = (0..n)
            .map(|i| (Ipv4Addr::new(10, 244, i, 2), 8080))
            .collect();
        maglev::build(&bs, maglev::table_size(bs.len()))
            .iter()
            .map(|i| {
                let (ip, port) = bs[*i as usize];
                let mut b = backend(ip, port);
                b.pad = if remote { NP_BACKEND_REMOTE } else { 0 };
                b
            })
            .collect()
    }

    #[test]
    #[ignore = "needs root"]
    fn maglev_table_swap_in_the_kernel_is_fast() {
        let dir = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/weir-maglev-test-{}",
            std::process::id()
        )));
        std::fs::create_dir_all(&dir.0).unwrap();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir.0)
            .load(EBPF_OBJECT)
            .unwrap();
        let mut tables: HashMap<MapData, u32, MaglevTable> = take(&mut ebpf, MAGLEV_MAP).unwrap();
        for (n, rounds) in [(10u8, 200usize), (160, 50)] {
            let (a, b) = (table(n, false), table(n, true));
            let mut swaps = Vec::with_capacity(rounds);
            let mut with_build = Vec::with_capacity(rounds);
            for r in 0..rounds {
                let want = if r % 2 == 0 { &a } else { &b };
                let started = Instant::now();
                let built = table(n, r % 2 == 1);
                let built_at = started.elapsed();
                write_table(&mut tables, 7, &built).unwrap();
                let total = started.elapsed();
                swaps.push(total.saturating_sub(built_at));
                with_build.push(total);
                assert!(
                    table_matches(&tables, 7, want),
                    "round {r}: table as written"
                );
            }
            swaps.sort();
            with_build.sort();
            let p50 = swaps[rounds / 2];
            let max = swaps[rounds - 1];
            println!(
                "maglev swap (one map update), n={n} M={}: p50 {p50:?}, max {max:?}; build+swap p50 {:?}",
                a.len(),
                with_build[rounds / 2]
            );
            assert!(p50 < Duration::from_millis(1), "swap p50 {p50:?}");
        }
        write_table(&mut tables, 7, &[]).unwrap();
        assert!(tables.get(&7, 0).is_err(), "an empty table is removed");
    }
}
