//! Root tests: weir's TC programs run on crafted frames through the
//! kernel's `BPF_PROG_TEST_RUN` (aya's [`TestRun`]), with their maps filled
//! by the agent's own code.
//!
//! - `NodePort` (`weir_np_ingress` / `weir_np_egress`): the maps are
//!   programmed by [`NodePort::sync`] on a scratch node whose links sit on
//!   the loopback of a network namespace of the test's own; the test loads
//!   the same object with the same pin directory (so the same maps) and runs
//!   the programs on Ethernet/IPv4/TCP and UDP frames. Outputs are checked
//!   byte for byte against frames built here with the expected addresses,
//!   and their IP and L4 checksums are verified independently.
//! - Traffic counters (`weir_from_pod` / `weir_to_pod`): counted into the
//!   map of a scratch [`Dataplane`] and read back through it.
//!
//! Everything is pinned under `/sys/fs/bpf/wptr-<pid>-<test>/`, removed on
//! drop. The cgroup `sock_addr` programs cannot be test-run.

mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
};
use weir_agent::{
    dataplane::Dataplane,
    lb::{NodePort, NodePortBackend, NodePortSpec, Protocol, maglev},
};
use weir_common::{
    Backend, FlowKey, MAGLEV_MAP, MaglevTable, NP_BACKEND_REMOTE, NP_FLOW_MAP, NP_REV_MAP,
    NP_REV_REDIRECT, NP_SNAT_MAP, NP_SNAT_PORT_MIN, NP_SNAT_PORTS, NP_SVC_MAP, NpFlow, NpRev,
    NpService, NpSnat, PROG_FROM_POD, PROG_NP_EGRESS, PROG_NP_INGRESS, PROG_TO_POD, PROTO_TCP,
    PROTO_UDP, SvcKey,
};

use common::{
    CLIENT_MAC, NODE_MAC, OBJECT, Pkt, Scratch, TC_ACT_OK, TC_ACT_PIPE, TC_ACT_REDIRECT,
    TC_ACT_SHOT, assert_csums, assert_same, be_ip, classifier, frame, ones_sum, run,
};

const NODE: &str = "wptr-node";
const OTHER: &str = "wptr-other";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const NODE_PORT: u16 = 30080;
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
/// The next hop a remote backend's reply comes from.
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];

// ---------------------------------------------------------------- frames

/// The destination (or source) address of IPv4 frame `f`.
fn dst_of(f: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(f[30], f[31], f[32], f[33]),
        u16::from_be_bytes([f[36], f[37]]),
    )
}

fn addr(b: Backend) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(b.ip)), u16::from_be(b.port))
}

/// `weir_np_ingress`'s flow hash (murmur3's finaliser over a mix).
fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = k.saddr
        ^ k.daddr.rotate_left(13)
        ^ ((u32::from(k.sport) << 16) | u32::from(k.dport)).rotate_left(7)
        ^ u32::from(k.proto);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The backend table `t` gives a new flow `k`.
fn maglev_pick(t: &[Backend], k: &FlowKey) -> Backend {
    let n = u32::try_from(t.len()).expect("table size");
    t[usize::try_from(flow_hash(k) % n).expect("index")]
}

// ----------------------------------------------------------------- rigs

/// Unpins a scratch directory's `NodePort` links.
fn remove_np_links(dir: &Path) {
    if let Err(e) = NodePort::remove(&dir.join("np")) {
        eprintln!("remove NodePort links: {e}");
    }
}

/// The `NodePort` programs of node [`NODE`] with their maps programmed by
/// the agent, and a second copy of the object sharing those maps whose
/// programs the test runs.
struct Rig {
    np: NodePort,
    ebpf: Ebpf,
    // Dropped last: unpins everything.
    _scratch: Scratch,
}

impl Rig {
    fn new(tag: &str) -> Self {
        let scratch = Scratch::new("wptr", tag, remove_np_links);
        let dir = scratch.0.join("np");
        // NodePort attaches to an uplink: the loopback of a network
        // namespace of a thread of ours, which nothing else sees.
        let np = std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
                NodePort::load(&dir, NODE, NODE_IP, "lo").expect("load NodePort")
            })
            .join()
            .expect("NodePort thread")
        });
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(OBJECT)
            .expect("load object on the same pins");
        for prog in [PROG_NP_INGRESS, PROG_NP_EGRESS] {
            classifier(&mut ebpf, prog).load().expect("load program");
        }
        Self {
            np,
            ebpf,
            _scratch: scratch,
        }
    }

    fn sync(&self, specs: &[NodePortSpec]) {
        self.np.sync(specs).expect("NodePort sync");
    }

    fn ingress(&self, f: &[u8]) -> (u32, Vec<u8>) {
        run(&self.ebpf, PROG_NP_INGRESS, f)
    }

    fn egress(&self, f: &[u8]) -> (u32, Vec<u8>) {
        run(&self.ebpf, PROG_NP_EGRESS, f)
    }

    fn get<K: aya::Pod, V: aya::Pod>(&self, map: &str, k: &K) -> Option<V> {
        let m: HashMap<&MapData, K, V> = self
            .ebpf
            .map(map)
            .expect("map")
            .try_into()
            .expect("hash map");
        m.get(k, 0).ok()
    }

    fn entries<K: aya::Pod, V: aya::Pod>(&self, map: &str) -> Vec<(K, V)> {
        let m: HashMap<&MapData, K, V> = self
            .ebpf
            .map(map)
            .expect("map")
            .try_into()
            .expect("hash map");
        m.iter().map(|r| r.expect("map entry")).collect()
    }

    fn forget_flow(&mut self, k: &FlowKey) {
        let mut m: HashMap<&mut MapData, FlowKey, NpFlow> = self
            .ebpf
            .map_mut(NP_FLOW_MAP)
            .expect("flow map")
            .try_into()
            .expect("hash map");
        m.remove(k).expect("remove flow");
    }

    /// The Maglev table the kernel holds for node port `port`/`proto`.
    fn table(&self, port: u16, proto: u8) -> Option<Vec<Backend>> {
        let key = SvcKey {
            ip: be_ip(NODE_IP),
            port: port.to_be(),
            proto,
            pad: 0,
        };
        let svc: NpService = self.get(NP_SVC_MAP, &key)?;
        // A table is 128 KiB, copied a few times on the way out of a
        // lookup in a debug build: more than a test thread's stack.
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .stack_size(32 << 20)
                .spawn_scoped(s, || {
                    let t: MaglevTable = self.get(MAGLEV_MAP, &svc.id)?;
                    let size = usize::try_from(t.size).expect("size");
                    Some(t.entries[..size].to_vec())
                })
                .expect("spawn table reader")
                .join()
                .expect("table reader")
        })
    }
}

fn spec(node_port: u16, proto: Protocol, local: bool, bs: &[(SocketAddrV4, &str)]) -> NodePortSpec {
    NodePortSpec {
        node_port,
        proto,
        local,
        backends: bs
            .iter()
            .map(|(a, node)| NodePortBackend {
                ip: *a.ip(),
                port: a.port(),
                node: Some((*node).to_owned()),
            })
            .collect(),
    }
}

fn sa(a: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(a), port)
}

/// Three backends: one on this node, two on another (different ports).
fn three() -> Vec<(SocketAddrV4, &'static str)> {
    vec![
        (sa([10, 244, 1, 10], 8080), NODE),
        (sa([10, 244, 2, 10], 8080), OTHER),
        (sa([10, 244, 3, 10], 8081), OTHER),
    ]
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

// ---------------------------------------------------------------- tests

/// externalTrafficPolicy Cluster, TCP: DNAT to the Maglev-chosen backend;
/// a remote backend gets SNAT (egress) with its NAT entries and its reply
/// is reverse-NATed and redirected back to the client's MAC; a local one
/// is not SNAT-ed and its reply leaves with the nodePort as source.
#[test]
#[expect(clippy::too_many_lines, reason = "one flow walked hop by hop")]
fn nodeport_cluster_tcp_dnat_snat_and_reverse_nat() {
    let mut rig = Rig::new("cluster");
    rig.sync(&[spec(NODE_PORT, Protocol::Tcp, false, &three())]);
    let table = rig.table(NODE_PORT, PROTO_TCP).expect("table programmed");
    assert_eq!(table.len(), maglev::table_size(3) as usize);
    let node = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let mut seen: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
    let mut nat_ports = std::collections::BTreeSet::new();
    for i in 0..200u16 {
        let client = SocketAddrV4::new(CLIENT, 40_000 + i);
        let pkt = Pkt::new(PROTO_TCP, client, node);
        let f = frame(&pkt, REQUEST);
        let chosen = maglev_pick(&table, &pkt.key());
        let backend = addr(chosen);
        let what = format!("flow {client} -> {backend}");
        let (rc, dnat) = rig.ingress(&f);
        assert_eq!(rc, TC_ACT_OK, "{what}: ingress passes");
        assert_csums(&dnat, false, &what);
        assert_same(
            &dnat,
            &frame(
                &Pkt {
                    dst: backend,
                    ..pkt
                },
                REQUEST,
            ),
            &format!("{what}: DNAT"),
        );
        *seen.entry(backend).or_default() += 1;
        assert_eq!(
            rig.ingress(&f),
            (rc, dnat.clone()),
            "{what}: the same 5-tuple again"
        );
        let flow: NpFlow = rig.get(NP_FLOW_MAP, &pkt.key()).expect("flow entry");
        assert_eq!((flow.ip, flow.port), (chosen.ip, chosen.port), "{what}");
        let to_backend = FlowKey {
            daddr: chosen.ip,
            dport: chosen.port,
            ..pkt.key()
        };
        if chosen.pad & NP_BACKEND_REMOTE != 0 {
            let s: NpSnat = rig.get(NP_SNAT_MAP, &to_backend).expect("SNAT entry");
            let nat = u16::from_be(s.port);
            assert_eq!(s.ip, be_ip(NODE_IP), "{what}: SNAT to the node IP");
            assert!(
                (NP_SNAT_PORT_MIN..NP_SNAT_PORT_MIN + NP_SNAT_PORTS).contains(&nat),
                "{what}: SNAT port {nat}"
            );
            assert!(nat_ports.insert(nat), "{what}: SNAT port {nat} reused");
            assert_eq!(flow.nat_port, s.port, "{what}: flow records its NAT port");
            // The kernel routes the DNATed packet out of the uplink: egress SNATs.
            let snat_src = SocketAddrV4::new(NODE_IP, nat);
            let (rc, out) = rig.egress(&dnat);
            assert_eq!(rc, TC_ACT_OK, "{what}: egress passes");
            assert_csums(&out, false, &what);
            assert_same(
                &out,
                &frame(
                    &Pkt {
                        src: snat_src,
                        dst: backend,
                        ..pkt
                    },
                    REQUEST,
                ),
                &format!("{what}: SNAT"),
            );
            let back = Pkt {
                smac: GW_MAC,
                dmac: NODE_MAC,
                ..Pkt::new(PROTO_TCP, backend, snat_src)
            };
            let rev: NpRev = rig.get(NP_REV_MAP, &back.key()).expect("reverse entry");
            assert_eq!(
                rev,
                NpRev {
                    client_ip: be_ip(CLIENT),
                    node_ip: be_ip(NODE_IP),
                    client_port: client.port().to_be(),
                    node_port: NODE_PORT.to_be(),
                    mac: CLIENT_MAC,
                    flags: NP_REV_REDIRECT,
                },
                "{what}: reverse NAT entry"
            );
            // The backend's reply: back to the client, out of the uplink.
            let (rc, out) = rig.ingress(&frame(&back, RESPONSE));
            assert_eq!(rc, TC_ACT_REDIRECT, "{what}: reply redirected out");
            assert_csums(&out, false, &what);
            assert_same(
                &out,
                &frame(
                    &Pkt {
                        smac: NODE_MAC,
                        dmac: CLIENT_MAC,
                        ..Pkt::new(PROTO_TCP, node, client)
                    },
                    RESPONSE,
                ),
                &format!("{what}: reply reverse NAT"),
            );
        } else {
            assert!(
                rig.get::<FlowKey, NpSnat>(NP_SNAT_MAP, &to_backend)
                    .is_none(),
                "{what}: a local backend is not SNATed"
            );
            assert_eq!(flow.nat_port, 0, "{what}");
            assert_eq!(rig.egress(&dnat), (TC_ACT_OK, dnat.clone()), "{what}");
            // The pod answers the client through the node: source → nodePort.
            let back = Pkt {
                smac: GW_MAC,
                dmac: CLIENT_MAC,
                ..Pkt::new(PROTO_TCP, backend, client)
            };
            let rev: NpRev = rig.get(NP_REV_MAP, &back.key()).expect("reverse entry");
            assert_eq!(rev.flags, 0, "{what}: not a redirect");
            let (rc, out) = rig.egress(&frame(&back, RESPONSE));
            assert_eq!(rc, TC_ACT_OK, "{what}");
            assert_csums(&out, false, &what);
            assert_same(
                &out,
                &frame(&Pkt { src: node, ..back }, RESPONSE),
                &format!("{what}: reply source"),
            );
        }
    }
    assert_eq!(seen.len(), 3, "every backend chosen: {seen:?}");
    assert!(seen.values().all(|n| *n >= 30), "spread: {seen:?}");
    // A flow whose entry is gone (LRU) hashes to the same backend again.
    for i in 0..20u16 {
        let pkt = Pkt::new(PROTO_TCP, SocketAddrV4::new(CLIENT, 40_000 + i), node);
        let f = frame(&pkt, REQUEST);
        let before = dst_of(&rig.ingress(&f).1);
        rig.forget_flow(&pkt.key());
        let (rc, out) = rig.ingress(&f);
        assert_eq!(
            (rc, dst_of(&out)),
            (TC_ACT_OK, before),
            "flow {i} re-hashed"
        );
    }
}

/// externalTrafficPolicy Local: only this node's backends are chosen and
/// nothing is SNAT-ed; with no local backend the service drops.
#[test]
fn nodeport_local_chooses_local_backends_without_snat() {
    let rig = Rig::new("local");
    let mut bs = three();
    bs.push((sa([10, 244, 1, 11], 9090), NODE));
    rig.sync(&[
        spec(NODE_PORT, Protocol::Tcp, true, &bs),
        spec(NODE_PORT + 1, Protocol::Tcp, true, &bs[1..3]),
    ]);
    let local: Vec<SocketAddrV4> = bs.iter().filter(|b| b.1 == NODE).map(|b| b.0).collect();
    let table = rig.table(NODE_PORT, PROTO_TCP).expect("table");
    assert!(
        table
            .iter()
            .all(|b| local.contains(&addr(*b)) && b.pad & NP_BACKEND_REMOTE == 0),
        "a Local table holds only local backends"
    );
    let node = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let mut seen: BTreeMap<SocketAddrV4, usize> = BTreeMap::new();
    for i in 0..100u16 {
        let pkt = Pkt::new(PROTO_TCP, SocketAddrV4::new(CLIENT, 50_000 + i), node);
        let (rc, out) = rig.ingress(&frame(&pkt, REQUEST));
        assert_eq!(rc, TC_ACT_OK);
        let backend = dst_of(&out);
        assert!(local.contains(&backend), "flow {i} went to {backend}");
        assert_csums(&out, false, "Local DNAT");
        assert_same(
            &out,
            &frame(
                &Pkt {
                    dst: backend,
                    ..pkt
                },
                REQUEST,
            ),
            "Local DNAT",
        );
        // The DNATed packet leaves untouched (no SNAT).
        assert_eq!(rig.egress(&out), (TC_ACT_OK, out.clone()), "no SNAT");
        *seen.entry(backend).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both local backends chosen: {seen:?}");
    assert!(
        rig.entries::<FlowKey, NpSnat>(NP_SNAT_MAP).is_empty(),
        "no SNAT entry for Local"
    );
    assert!(
        rig.entries::<FlowKey, NpRev>(NP_REV_MAP)
            .iter()
            .all(|(_, r)| r.flags & NP_REV_REDIRECT == 0),
        "no redirect entry for Local"
    );
    // No local backend: no table, the service drops.
    assert!(rig.table(NODE_PORT + 1, PROTO_TCP).is_none());
    let pkt = Pkt::new(
        PROTO_TCP,
        SocketAddrV4::new(CLIENT, 50_000),
        SocketAddrV4::new(NODE_IP, NODE_PORT + 1),
    );
    let f = frame(&pkt, REQUEST);
    assert_eq!(
        rig.ingress(&f),
        (TC_ACT_SHOT, f.clone()),
        "no local backend"
    );
}

/// UDP: checksums fixed when present, a zero ("none") checksum stays zero
/// through DNAT, SNAT and the reverse NAT.
#[test]
fn nodeport_udp_checksums_including_zero() {
    let rig = Rig::new("udp");
    // Remote backends only: every flow is SNATed (the longest path).
    let bs: Vec<_> = three().into_iter().map(|(a, _)| (a, OTHER)).collect();
    rig.sync(&[spec(NODE_PORT, Protocol::Udp, false, &bs)]);
    let node = SocketAddrV4::new(NODE_IP, NODE_PORT);
    for i in 0..40u16 {
        let no_csum = i % 2 == 0;
        let client = SocketAddrV4::new(CLIENT, 33_000 + i);
        let pkt = Pkt {
            no_udp_csum: no_csum,
            ..Pkt::new(PROTO_UDP, client, node)
        };
        let what = format!(
            "UDP flow {client}, checksum {}",
            if no_csum { "0" } else { "set" }
        );
        let (rc, dnat) = rig.ingress(&frame(&pkt, b"query"));
        assert_eq!(rc, TC_ACT_OK, "{what}");
        let backend = dst_of(&dnat);
        assert_csums(&dnat, no_csum, &what);
        assert_same(
            &dnat,
            &frame(
                &Pkt {
                    dst: backend,
                    ..pkt
                },
                b"query",
            ),
            &format!("{what}: DNAT"),
        );
        let (rc, snat) = rig.egress(&dnat);
        assert_eq!(rc, TC_ACT_OK, "{what}");
        assert_csums(&snat, no_csum, &what);
        let src = SocketAddrV4::new(
            Ipv4Addr::new(snat[26], snat[27], snat[28], snat[29]),
            u16::from_be_bytes([snat[34], snat[35]]),
        );
        assert_eq!(*src.ip(), NODE_IP, "{what}: SNAT");
        let back = Pkt {
            smac: GW_MAC,
            dmac: NODE_MAC,
            no_udp_csum: no_csum,
            ..Pkt::new(PROTO_UDP, backend, src)
        };
        let (rc, out) = rig.ingress(&frame(&back, b"answer"));
        assert_eq!(rc, TC_ACT_REDIRECT, "{what}: reply");
        assert_csums(&out, no_csum, &what);
        assert_same(
            &out,
            &frame(
                &Pkt {
                    smac: NODE_MAC,
                    dmac: CLIENT_MAC,
                    no_udp_csum: no_csum,
                    ..Pkt::new(PROTO_UDP, node, client)
                },
                b"answer",
            ),
            &format!("{what}: reply reverse NAT"),
        );
    }
}

/// Anything that is not a TCP/UDP packet to a programmed nodePort passes
/// both programs untouched, short and garbage frames included.
#[test]
fn nodeport_passes_other_traffic_untouched() {
    let rig = Rig::new("other");
    rig.sync(&[spec(NODE_PORT, Protocol::Tcp, false, &three())]);
    let node = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let client = SocketAddrV4::new(CLIENT, 41_000);
    let tcp = |dst| frame(&Pkt::new(PROTO_TCP, client, dst), REQUEST);
    let nodeport = tcp(node);
    let mut frames: Vec<(&str, Vec<u8>)> = vec![
        (
            "TCP to another port",
            tcp(SocketAddrV4::new(NODE_IP, NODE_PORT + 1)),
        ),
        ("TCP to another IP", tcp(sa([10, 77, 0, 2], NODE_PORT))),
        (
            "UDP to the TCP nodePort",
            frame(&Pkt::new(PROTO_UDP, client, node), b"x"),
        ),
    ];
    let mut icmp = nodeport.clone();
    icmp[23] = 1;
    frames.push(("ICMP to the node", icmp));
    let mut ipv6 = nodeport.clone();
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    frames.push(("IPv6 ethertype", ipv6));
    let mut arp = nodeport[..14].to_vec();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    arp.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend([0u8; 20]);
    frames.push(("ARP", arp));
    let mut options = nodeport.clone();
    options[14] = 0x46;
    frames.push(("IPv4 with options", options));
    let mut fragment = nodeport.clone();
    fragment[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    frames.push(("IPv4 first fragment (MF)", fragment));
    let mut later = nodeport.clone();
    later[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
    frames.push(("IPv4 later fragment", later));
    // BPF_PROG_TEST_RUN refuses frames with nothing after the Ethernet
    // header, IPv4 ones shorter than an IP header and IPv6 ones shorter
    // than an IPv6 header: truncation is tested above those.
    // Cut before the end of the TCP checksum, a packet to the nodePort
    // cannot be rewritten consistently, so it is not rewritten at all.
    for len in [34, 36, 37, 38, 40, 50, 51] {
        frames.push(("truncated to-nodePort frame", nodeport[..len].to_vec()));
    }
    for ethertype in [0x0806u16, 0x1234] {
        let mut f = nodeport[..15].to_vec();
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        frames.push(("15-byte non-IP frame", f));
    }
    // Garbage: a fixed pseudo-random stream (xorshift); half of it with an
    // IPv4 ethertype and a plain IPv4 header start.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x.to_le_bytes()[0]
    };
    for i in 0..100usize {
        let mut f: Vec<u8> = (0..54 + i).map(|_| next()).collect();
        frames.push(("garbage", f.clone()));
        f[12..15].copy_from_slice(&[0x08, 0x00, 0x45]);
        frames.push(("garbage IPv4", f[..34 + i].to_vec()));
    }
    for (what, f) in &frames {
        let len = f.len();
        assert_eq!(
            rig.ingress(f),
            (TC_ACT_OK, f.clone()),
            "ingress, {what} ({len} bytes)"
        );
        assert_eq!(
            rig.egress(f),
            (TC_ACT_OK, f.clone()),
            "egress, {what} ({len} bytes)"
        );
    }
    // The service itself still works after all that.
    let (rc, out) = rig.ingress(&nodeport);
    assert_eq!(rc, TC_ACT_OK);
    let backend = dst_of(&out);
    assert_ne!(backend, node, "the nodePort frame is DNATed");
    // With its checksum there (the rest cut), it is DNATed the same way.
    let (rc, cut) = rig.ingress(&nodeport[..52]);
    assert_eq!(
        (rc, dst_of(&cut)),
        (TC_ACT_OK, backend),
        "cut after the checksum"
    );
    assert_eq!(ones_sum(0, &cut[14..34]), 0xffff, "IP header checksum");
    assert_eq!(cut[38..50], nodeport[38..50], "the rest of the TCP header");
}

/// Removing 1 of 10 backends (through the agent) keeps the table's size
/// and established flows, and moves few new flows: those of the removed
/// backend plus Maglev's small extra (≤ 12 % in all).
#[test]
fn nodeport_backend_removal_disrupts_little() {
    let rig = Rig::new("disrupt");
    let bs: Vec<(SocketAddrV4, &str)> = (0..10u8)
        .map(|i| (sa([10, 244, 10 + i, 10], 8080), OTHER))
        .collect();
    rig.sync(&[spec(NODE_PORT, Protocol::Tcp, false, &bs)]);
    let before = rig.table(NODE_PORT, PROTO_TCP).expect("table");
    let node = SocketAddrV4::new(NODE_IP, NODE_PORT);
    let flow = |port: u16| Pkt::new(PROTO_TCP, SocketAddrV4::new(CLIENT, port), node);
    let established: Vec<(Pkt, SocketAddrV4)> = (10_000..10_050)
        .map(|p| {
            let pkt = flow(p);
            (pkt, dst_of(&rig.ingress(&frame(&pkt, REQUEST)).1))
        })
        .collect();
    let gone = bs[3].0;
    rig.sync(&[spec(
        NODE_PORT,
        Protocol::Tcp,
        false,
        &[&bs[..3], &bs[4..]].concat(),
    )]);
    let after = rig.table(NODE_PORT, PROTO_TCP).expect("table");
    assert_eq!(after.len(), before.len(), "the table keeps its size");
    assert!(
        after.iter().all(|b| addr(*b) != gone),
        "the removed backend is out"
    );
    for (pkt, was) in &established {
        if *was != gone {
            let (_, out) = rig.ingress(&frame(pkt, REQUEST));
            assert_eq!(dst_of(&out), *was, "an established flow keeps its backend");
        }
    }
    let (mut moved, n) = (0u32, 2000u16);
    for p in 20_000..20_000 + n {
        let pkt = flow(p);
        let (rc, out) = rig.ingress(&frame(&pkt, REQUEST));
        assert_eq!(rc, TC_ACT_OK);
        let now = dst_of(&out);
        assert_ne!(now, gone);
        if now != addr(maglev_pick(&before, &pkt.key())) {
            moved += 1;
        }
    }
    let share = f64::from(moved) / f64::from(n);
    eprintln!(
        "1 of 10 backends removed: {:.1} % of new flows moved",
        share * 100.0
    );
    assert!((0.07..=0.12).contains(&share), "moved {share}");
}

/// The per-pod counters count packets and bytes by direction, pass every
/// packet (`TC_ACT_PIPE`) and never change it.
#[test]
fn traffic_counters_count_by_direction() {
    let scratch = Scratch::new("wptr", "counters", remove_np_links);
    let dp = Dataplane::load(&scratch.0, "ctr").expect("load dataplane");
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(scratch.0.join("weir").join("ctr"))
        .load(OBJECT)
        .expect("load object on the same pins");
    for prog in [PROG_FROM_POD, PROG_TO_POD] {
        classifier(&mut ebpf, prog).load().expect("load program");
    }
    // BPF_PROG_TEST_RUN runs on the loopback of the test's netns.
    // SAFETY: a NUL-terminated string literal.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    assert_ne!(lo, 0, "lo ifindex");
    let before = dp.counters(lo);
    let out_frame = frame(
        &Pkt::new(
            PROTO_TCP,
            sa([10, 244, 1, 10], 8080),
            SocketAddrV4::new(CLIENT, 40_000),
        ),
        RESPONSE,
    );
    let in_frame = frame(
        &Pkt::new(
            PROTO_UDP,
            SocketAddrV4::new(CLIENT, 40_000),
            sa([10, 244, 1, 10], 53),
        ),
        b"q",
    );
    for _ in 0..3 {
        assert_eq!(
            run(&ebpf, PROG_FROM_POD, &out_frame),
            (TC_ACT_PIPE, out_frame.clone())
        );
    }
    for _ in 0..5 {
        assert_eq!(
            run(&ebpf, PROG_TO_POD, &in_frame),
            (TC_ACT_PIPE, in_frame.clone())
        );
    }
    let c = dp.counters(lo);
    let len = |f: &[u8]| u64::try_from(f.len()).expect("len");
    assert_eq!(c.tx_packets - before.tx_packets, 3, "{c:?}");
    assert_eq!(c.tx_bytes - before.tx_bytes, 3 * len(&out_frame), "{c:?}");
    assert_eq!(c.rx_packets - before.rx_packets, 5, "{c:?}");
    assert_eq!(c.rx_bytes - before.rx_bytes, 5 * len(&in_frame), "{c:?}");
    assert_eq!(
        dp.counted_ifindexes(),
        vec![lo],
        "keyed by the device's ifindex"
    );
    // A short (non-IP) frame is counted too, and passed.
    let mut short = out_frame[..15].to_vec();
    short[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(
        run(&ebpf, PROG_TO_POD, &short),
        (TC_ACT_PIPE, short.clone())
    );
    assert_eq!(dp.counters(lo).rx_bytes - c.rx_bytes, 15);
}
