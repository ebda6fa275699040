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
//!
//! An existing flow keeps its backend across table swaps (`weir_np_flow_v1`).
//! When a backend leaves a UDP service's table, its UDP flows are deleted
//! (with their reverse-NAT and SNAT entries), as kube-proxy deletes the
//! conntrack entries of UDP flows to removed endpoints: a UDP client has no
//! connection to lose, so its next datagram is balanced afresh instead of
//! being sent on to a backend that is gone. TCP flows are left alone: an
//! established connection to a terminating pod finishes.

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
    Backend, FlowKey, MAGLEV_MAP, MAGLEV_MAX_SIZE, MaglevTable, NP_BACKEND_REMOTE, NP_FLAG_SNAT,
    NP_FLOW_MAP, NP_FLOW_MAP_ENTRIES, NP_REV_MAP, NP_SNAT_MAP, NP_SVC_MAP, NpFlow, NpRev,
    NpService, NpSnat, PROG_NP_EGRESS, PROG_NP_INGRESS, PROTO_UDP, SvcKey,
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
    /// UDP flows deleted because their backend left the service.
    pub flows_flushed: usize,
}

struct Maps {
    svcs: HashMap<MapData, SvcKey, NpService>,
    tables: HashMap<MapData, u32, MaglevTable>,
    flows: HashMap<MapData, FlowKey, NpFlow>,
    revs: HashMap<MapData, FlowKey, NpRev>,
    snats: HashMap<MapData, FlowKey, NpSnat>,
}

/// A backend as the flow map holds it: (IP, port), network order.
type BackendAddr = (u32, u16);

/// The backends that left each UDP service port (by its `weir_np_svc_v1` key).
type Gone = BTreeMap<SvcKey, BTreeSet<BackendAddr>>;

/// At most this many flow entries are looked at per flush: the map's
/// capacity and some slack for entries the datapath adds meanwhile (an
/// LRU map can evict the entry an iteration stands on, which restarts it).
const FLOW_SCAN_LIMIT: usize = NP_FLOW_MAP_ENTRIES as usize + 4096;

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
            flows: take(&mut ebpf, NP_FLOW_MAP)?,
            revs: take(&mut ebpf, NP_REV_MAP)?,
            snats: take(&mut ebpf, NP_SNAT_MAP)?,
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
    /// removed service's entry goes before its table. Then the UDP flows to
    /// backends that left their service are deleted.
    pub fn sync(&self, desired: &[NodePortSpec]) -> Result<NodePortStats, LbError> {
        let mut m = self.maps.lock().expect("nodeport maps lock poisoned");
        let mut written = self.written.lock().expect("nodeport cache lock poisoned");
        let current: BTreeMap<SvcKey, NpService> = m.svcs.iter().filter_map(Result::ok).collect();
        let mut used: BTreeSet<u32> = current.values().map(|v| v.id).collect();
        let mut stats = NodePortStats::default();
        let mut keep = BTreeSet::new();
        let mut gone = Gone::new();
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
            if written.get(&id) != Some(&entries) {
                let before = written
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| read_table(&m.tables, id));
                if before != entries {
                    let started = Instant::now();
                    write_table(&mut m.tables, id, &entries)?;
                    stats.slowest_swap = stats.slowest_swap.max(started.elapsed());
                    stats.tables += 1;
                    note_gone(&mut gone, key, &before, &entries);
                }
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
            let before = written
                .remove(&v.id)
                .unwrap_or_else(|| read_table(&m.tables, v.id));
            ignore_missing(m.svcs.remove(key)).map_err(map_err("remove from", NP_SVC_MAP))?;
            ignore_missing(m.tables.remove(&v.id)).map_err(map_err("remove from", MAGLEV_MAP))?;
            note_gone(&mut gone, *key, &before, &[]);
            stats.services += 1;
        }
        if !gone.is_empty() {
            stats.flows_flushed = flush_udp_flows(&mut m, &gone)?;
            if stats.flows_flushed > 0 {
                tracing::debug!(
                    flows = stats.flows_flushed,
                    "NodePort: UDP flows to removed backends deleted"
                );
            }
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

/// The entries of the pinned table `id` (an adopted map); empty if there
/// is none.
fn read_table(tables: &HashMap<MapData, u32, MaglevTable>, id: u32) -> Vec<Backend> {
    tables
        .get(&id, 0)
        .ok()
        .and_then(|t| t.entries.get(..t.size as usize).map(<[Backend]>::to_vec))
        .unwrap_or_default()
}

/// Notes the backends of UDP service `key` that are in `before` and not
/// in `after`.
fn note_gone(gone: &mut Gone, key: SvcKey, before: &[Backend], after: &[Backend]) {
    if key.proto != PROTO_UDP {
        return;
    }
    let addrs =
        |t: &[Backend]| -> BTreeSet<BackendAddr> { t.iter().map(|b| (b.ip, b.port)).collect() };
    let left: BTreeSet<BackendAddr> = addrs(before).difference(&addrs(after)).copied().collect();
    if !left.is_empty() {
        gone.entry(key).or_default().extend(left);
    }
}

/// The UDP flows (with their entries) whose backend is in `gone` for their
/// service.
fn stale_udp_flows(
    flows: impl IntoIterator<Item = (FlowKey, NpFlow)>,
    gone: &Gone,
) -> Vec<(FlowKey, NpFlow)> {
    flows
        .into_iter()
        .filter(|(k, f)| {
            let svc = SvcKey {
                ip: k.daddr,
                port: k.dport,
                proto: k.proto,
                pad: 0,
            };
            k.proto == PROTO_UDP && gone.get(&svc).is_some_and(|b| b.contains(&(f.ip, f.port)))
        })
        .collect()
}

/// The reverse-NAT key of a flow (as the backend's reply is addressed) and,
/// for a flow with an SNAT port, its SNAT key; as `weir_np_ingress` writes
/// them.
fn nat_keys(k: &FlowKey, f: NpFlow) -> (FlowKey, Option<FlowKey>) {
    let key = |saddr, daddr, sport, dport| FlowKey {
        saddr,
        daddr,
        sport,
        dport,
        proto: k.proto,
        pad: [0; 3],
    };
    if f.nat_port == 0 {
        (key(f.ip, k.saddr, f.port, k.sport), None)
    } else {
        (
            key(f.ip, k.daddr, f.port, f.nat_port),
            Some(key(k.saddr, f.ip, k.sport, f.port)),
        )
    }
}

/// Deletes the UDP flows to the backends in `gone` and their reverse-NAT
/// and SNAT entries (looking at no more than [`FLOW_SCAN_LIMIT`] entries);
/// how many flows went. The flow goes first, so the client's next datagram
/// is balanced afresh even if a later delete fails.
fn flush_udp_flows(m: &mut Maps, gone: &Gone) -> Result<usize, LbError> {
    let stale = stale_udp_flows(
        m.flows.iter().take(FLOW_SCAN_LIMIT).filter_map(Result::ok),
        gone,
    );
    for (k, f) in &stale {
        ignore_missing(m.flows.remove(k)).map_err(map_err("remove from", NP_FLOW_MAP))?;
        let (rev, snat) = nat_keys(k, *f);
        ignore_missing(m.revs.remove(&rev)).map_err(map_err("remove from", NP_REV_MAP))?;
        if let Some(snat) = snat {
            ignore_missing(m.snats.remove(&snat)).map_err(map_err("remove from", NP_SNAT_MAP))?;
        }
    }
    Ok(stale.len())
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
                    read_table(&tables, 7) == *want,
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

    fn addr(ip: [u8; 4], port: u16) -> BackendAddr {
        let b = backend(Ipv4Addr::from(ip), port);
        (b.ip, b.port)
    }

    fn svc(node_port: u16, proto: u8) -> SvcKey {
        SvcKey {
            ip: u32::from(Ipv4Addr::new(192, 0, 2, 1)).to_be(),
            port: node_port.to_be(),
            proto,
            pad: 0,
        }
    }

    fn flow(client_port: u16, s: SvcKey, to: BackendAddr, nat_port: u16) -> (FlowKey, NpFlow) {
        (
            FlowKey {
                saddr: u32::from(Ipv4Addr::new(198, 51, 100, 7)).to_be(),
                daddr: s.ip,
                sport: client_port.to_be(),
                dport: s.port,
                proto: s.proto,
                pad: [0; 3],
            },
            NpFlow {
                ip: to.0,
                port: to.1,
                nat_port: nat_port.to_be(),
            },
        )
    }

    #[test]
    fn only_udp_backends_that_left_are_gone() {
        let (a, b) = (
            backend(Ipv4Addr::new(10, 244, 1, 2), 53),
            backend(Ipv4Addr::new(10, 244, 2, 2), 53),
        );
        let mut gone = Gone::new();
        note_gone(&mut gone, svc(31_053, PROTO_UDP), &[a, b, a], &[a, a]);
        note_gone(&mut gone, svc(31_080, 6), &[a, b], &[a]);
        note_gone(&mut gone, svc(31_054, PROTO_UDP), &[a], &[a]);
        assert_eq!(
            gone,
            Gone::from([(svc(31_053, PROTO_UDP), BTreeSet::from([(b.ip, b.port)]))]),
            "TCP and unchanged services are not noted"
        );
    }

    #[test]
    fn stale_flows_are_udp_flows_of_that_service_to_that_backend() {
        let (a, b) = (addr([10, 244, 1, 2], 53), addr([10, 244, 2, 2], 53));
        let udp = svc(31_053, PROTO_UDP);
        let other_udp = svc(31_054, PROTO_UDP);
        let tcp = svc(31_053, 6);
        let gone = Gone::from([(udp, BTreeSet::from([b]))]);
        let flows = vec![
            flow(1000, udp, a, 0),
            flow(1001, udp, b, 0),
            flow(1002, udp, b, 20_001),
            flow(1003, tcp, b, 0),
            flow(1004, other_udp, b, 0),
        ];
        let stale: Vec<u16> = stale_udp_flows(flows, &gone)
            .iter()
            .map(|(k, _)| u16::from_be(k.sport))
            .collect();
        assert_eq!(stale, [1001, 1002]);
    }

    #[test]
    fn nat_keys_are_the_ones_the_program_writes() {
        let b = addr([10, 244, 2, 2], 5353);
        let (k, f) = flow(40_000, svc(31_053, PROTO_UDP), b, 0);
        let (rev, snat) = nat_keys(&k, f);
        // Without SNAT the backend replies to the client itself.
        assert_eq!(
            (rev.saddr, rev.daddr, rev.sport, rev.dport, rev.proto),
            (b.0, k.saddr, b.1, k.sport, PROTO_UDP)
        );
        assert_eq!(snat, None);
        let (k, f) = flow(40_000, svc(31_053, PROTO_UDP), b, 20_001);
        let (rev, snat) = nat_keys(&k, f);
        // With SNAT it replies to node IP:SNAT port.
        assert_eq!(
            (rev.saddr, rev.daddr, rev.sport, rev.dport),
            (b.0, k.daddr, b.1, 20_001u16.to_be())
        );
        let snat = snat.expect("an SNAT key");
        assert_eq!(
            (snat.saddr, snat.daddr, snat.sport, snat.dport),
            (k.saddr, b.0, k.sport, b.1)
        );
    }

    fn sh(args: &[&str]) {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("run a command");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A node netns whose uplink faces a client netns (198.51.100.0/24, no
    /// routes beyond it), deleted on drop.
    struct Pair {
        node: String,
        client: String,
    }

    impl Pair {
        fn new() -> Self {
            let id = std::process::id();
            let p = Self {
                node: format!("weirnpf-node-{id}"),
                client: format!("weirnpf-cli-{id}"),
            };
            sh(&["ip", "netns", "add", &p.node]);
            sh(&["ip", "netns", "add", &p.client]);
            sh(&[
                "ip", "-n", &p.node, "link", "add", "up0", "type", "veth", "peer", "name", "cl0",
                "netns", &p.client,
            ]);
            sh(&[
                "ip",
                "-n",
                &p.node,
                "addr",
                "add",
                "198.51.100.1/24",
                "dev",
                "up0",
            ]);
            sh(&[
                "ip",
                "-n",
                &p.client,
                "addr",
                "add",
                "198.51.100.7/24",
                "dev",
                "cl0",
            ]);
            for (ns, dev) in [
                (&p.node, "up0"),
                (&p.client, "cl0"),
                (&p.node, "lo"),
                (&p.client, "lo"),
            ] {
                sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            }
            p
        }

        /// Runs `f` on a thread inside netns `ns`.
        fn within<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
            std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("enter netns");
                    f()
                })
                .join()
                .expect("netns thread")
            })
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            for ns in [&self.node, &self.client] {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", ns])
                    .status();
            }
        }
    }

    fn spec(node_port: u16, proto: Protocol, backends: &[NodePortBackend]) -> NodePortSpec {
        NodePortSpec {
            node_port,
            proto,
            local: false,
            backends: backends.to_vec(),
        }
    }

    /// The flows of the node's flow map by protocol: (client port, backend).
    fn flows_of(np: &NodePort, proto: u8) -> Vec<(u16, BackendAddr, FlowKey, NpFlow)> {
        let m = np.maps.lock().unwrap();
        m.flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.proto == proto)
            .map(|(k, f)| (u16::from_be(k.sport), (f.ip, f.port), k, f))
            .collect()
    }

    /// 16 UDP flows and 16 TCP flows (a SYN each) from distinct client
    /// ports, once the node has recorded them all; the UDP sockets.
    fn start_flows(
        pair: &Pair,
        np: &NodePort,
        node_ip: Ipv4Addr,
        udp_port: u16,
        tcp_port: u16,
    ) -> Vec<std::net::UdpSocket> {
        let udp: Vec<std::net::UdpSocket> = Pair::within(&pair.client, || {
            (0..16)
                .map(|_| {
                    let s = std::net::UdpSocket::bind("198.51.100.7:0").unwrap();
                    s.send_to(b"hi", (node_ip, udp_port)).unwrap();
                    s
                })
                .collect()
        });
        Pair::within(&pair.client, || {
            for _ in 0..16 {
                let _ = std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from((node_ip, tcp_port)),
                    Duration::from_millis(30),
                );
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while flows_of(np, PROTO_UDP).len() < 16 || flows_of(np, 6).len() < 16 {
            assert!(Instant::now() < deadline, "flows not recorded");
            std::thread::sleep(Duration::from_millis(20));
        }
        udp
    }

    #[test]
    #[ignore = "needs root"]
    fn udp_flows_to_a_removed_backend_are_deleted_and_tcp_flows_kept() {
        let pair = Pair::new();
        let dir = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/weir-npflow-test-{}",
            std::process::id()
        )));
        std::fs::create_dir_all(&dir.0).unwrap();
        let node_ip = Ipv4Addr::new(198, 51, 100, 1);
        let np = Pair::within(&pair.node, || NodePort::load(&dir.0, "n1", node_ip, "up0"))
            .expect("load NodePort");
        // One backend on this node (no SNAT), one on another (SNAT): both
        // kinds of NAT entries. Nothing routes to them: the DNATed packets
        // die in the node, but their flows are recorded.
        let local = NodePortBackend {
            ip: Ipv4Addr::new(10, 99, 0, 1),
            port: 5000,
            node: Some("n1".into()),
        };
        let remote = NodePortBackend {
            ip: Ipv4Addr::new(10, 99, 0, 2),
            port: 5000,
            node: Some("n2".into()),
        };
        let both = [local.clone(), remote.clone()];
        let (udp_port, tcp_port) = (31_053, 31_080);
        np.sync(&[
            spec(udp_port, Protocol::Udp, &both),
            spec(tcp_port, Protocol::Tcp, &both),
        ])
        .unwrap();
        let udp = start_flows(&pair, &np, node_ip, udp_port, tcp_port);
        let udp_flows = flows_of(&np, PROTO_UDP);
        let tcp_flows = flows_of(&np, 6);
        // Remove a backend that has flows of both protocols.
        let addr_of = |b: &NodePortBackend| {
            let b = backend(b.ip, b.port);
            (b.ip, b.port)
        };
        let has_flows = |b: &&NodePortBackend| {
            let v = addr_of(b);
            udp_flows.iter().any(|f| f.1 == v) && tcp_flows.iter().any(|f| f.1 == v)
        };
        let (gone, stay) = if has_flows(&&remote) {
            (&remote, &local)
        } else {
            (&local, &remote)
        };
        assert!(has_flows(&gone), "a backend with UDP and TCP flows");
        let victim = addr_of(gone);
        let (victim_udp, kept_udp): (Vec<_>, Vec<_>) =
            udp_flows.iter().partition(|f| f.1 == victim);
        let victim_tcp = tcp_flows.iter().filter(|f| f.1 == victim).count();
        let stats = np
            .sync(&[
                spec(udp_port, Protocol::Udp, std::slice::from_ref(stay)),
                spec(tcp_port, Protocol::Tcp, std::slice::from_ref(stay)),
            ])
            .unwrap();
        assert_eq!(stats.flows_flushed, victim_udp.len());
        let after_udp = flows_of(&np, PROTO_UDP);
        assert!(
            after_udp.iter().all(|f| f.1 != victim),
            "a UDP flow still goes to the removed backend"
        );
        assert_eq!(after_udp.len(), kept_udp.len(), "other UDP flows kept");
        assert_eq!(
            flows_of(&np, 6).iter().filter(|f| f.1 == victim).count(),
            victim_tcp,
            "TCP flows to the removed backend are left alone"
        );
        {
            let m = np.maps.lock().unwrap();
            for (_, _, k, f) in &victim_udp {
                let (rev, snat) = nat_keys(k, *f);
                assert!(m.revs.get(&rev, 0).is_err(), "reverse entry left");
                if let Some(snat) = snat {
                    assert!(m.snats.get(&snat, 0).is_err(), "SNAT entry left");
                }
            }
        }
        // The clients whose flow went to the removed backend are balanced
        // afresh on their next datagram.
        let moved: Vec<u16> = victim_udp.iter().map(|f| f.0).collect();
        Pair::within(&pair.client, || {
            for s in &udp {
                if moved.contains(&s.local_addr().unwrap().port()) {
                    s.send_to(b"again", (node_ip, udp_port)).unwrap();
                }
            }
        });
        let stay = addr_of(stay);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = flows_of(&np, PROTO_UDP);
            let rebalanced = moved
                .iter()
                .all(|p| now.iter().any(|f| f.0 == *p && f.1 == stay));
            if rebalanced {
                break;
            }
            assert!(Instant::now() < deadline, "not re-balanced: {now:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(np);
        NodePort::remove(&dir.0).unwrap();
    }
}
