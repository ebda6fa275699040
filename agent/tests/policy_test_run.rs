//! Root tests: the network policy programs (`weir_pol_from_pod` = a pod's
//! Egress policy, `weir_pol_to_pod` = its Ingress policy) run through the
//! kernel's `BPF_PROG_TEST_RUN` on crafted frames, with their maps
//! programmed by the agent's [`PolicyDataplane`].
//!
//! Each test runs on a thread in a network namespace of its own holding
//! veth devices: their ifindexes are the endpoints, and each run passes
//! one in the `__sk_buff` context so the program sees the packet on that
//! device (two pods on one node = two devices). The test loads the same
//! object on the same pins (so the same maps) to run the programs. Verdicts
//! are checked against the kernel's return code, drop counters through
//! [`PolicyDataplane::drops`], conntrack entries through
//! [`PolicyDataplane::conntrack`], and every new-flow verdict against
//! [`PolicyDataplane::decide`] (the userspace evaluation `prune` uses).
//!
//! A real-traffic test attaches the programs with [`PolicyDataplane::attach`]
//! to the host side of a veth pair between two network namespaces and makes
//! TCP connections that policy allows and refuses.
//!
//! Pins live under `/sys/fs/bpf/wpol-<pid>-<test>/`, removed on drop.

mod common;

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions},
};
use common::{
    CLIENT_MAC, NODE_MAC, OBJECT, Pkt, Scratch, TC_ACT_SHOT, TC_ACT_UNSPEC, TCP_FIN_ACK,
    TCP_PSH_ACK, TCP_SYN, TCP_SYN_ACK, classifier, frame, ip,
};
use weir_agent::dataplane::Dataplane;
use weir_agent::policy::{Cidr, Decision, Direction, Endpoint, PolicyDataplane, PolicyEntry};
use weir_common::{
    CT_F_FIN, CT_F_REPLY_SEEN, CT_F_UNENFORCED, CT_MAP, CT_RULE_NONE, CtKey, CtValue, DIR_EGRESS,
    DIR_INGRESS, DropReason, ID_ANY, ID_CIDR_MIN, ID_HOST, ID_WORLD, PROG_POL_FROM_POD,
    PROG_POL_TO_POD, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const PEER_X: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 20);
const PEER_Y: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 21);
const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const ID_A: u32 = 1000;
const ID_B: u32 = 1001;
const ID_X: u32 = 300;
const ID_Y: u32 = 301;

// ----------------------------------------------------------------- rigs

/// Runs `f` on a thread in a fresh network namespace holding `n` veth
/// devices, with their ifindexes (the namespace goes with the thread).
fn in_netns<T: Send>(n: usize, f: impl FnOnce(&[u32]) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            let eps: Vec<u32> = (0..n)
                .map(|i| {
                    // A veth end stands for a pod's host-side veth (no dummy
                    // driver on every kernel).
                    let name = format!("wpol{i}");
                    let peer = format!("wpol{i}p");
                    ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
                    let c = std::ffi::CString::new(name).expect("name");
                    // SAFETY: a NUL-terminated string.
                    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
                    assert!(idx > 1, "ifindex of veth {i}");
                    idx
                })
                .collect();
            f(&eps)
        })
        .join()
        .expect("test thread")
    })
}

/// The agent's policy dataplane on scratch pins, and a second copy of the
/// object on the same maps whose programs the test runs.
struct Rig {
    dp: PolicyDataplane,
    ebpf: Ebpf,
    _scratch: Scratch,
}

impl Rig {
    fn new(tag: &str) -> Self {
        Self::on(Scratch::new("wpol", tag, |_| {}))
    }

    fn on(scratch: Scratch) -> Self {
        let dp = PolicyDataplane::load(&scratch.0).expect("load policy dataplane");
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&scratch.0)
            .load(OBJECT)
            .expect("load object on the same pins");
        for prog in [PROG_POL_FROM_POD, PROG_POL_TO_POD] {
            classifier(&mut ebpf, prog).load().expect("load program");
        }
        Self {
            dp,
            ebpf,
            _scratch: scratch,
        }
    }

    /// Runs `prog` on frame `f` as seen on device `ifindex`; the return code.
    fn run(&self, prog: &str, ifindex: u32, f: &[u8]) -> u32 {
        let p: &SchedClassifier = self
            .ebpf
            .program(prog)
            .expect("program")
            .try_into()
            .expect("classifier");
        // struct __sk_buff up to `ifindex` (offset 40); the kernel runs the
        // program on that device of the caller's network namespace.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; f.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {prog} on {ifindex}: {e:?}"));
        assert_eq!(&out[..f.len()], f, "{prog} never changes a packet");
        r.return_value
    }

    /// What the pod on `ep` sends (its Egress policy).
    fn sends(&self, ep: u32, f: &[u8]) -> u32 {
        self.run(PROG_POL_FROM_POD, ep, f)
    }

    /// What is delivered to the pod on `ep` (its Ingress policy).
    fn receives(&self, ep: u32, f: &[u8]) -> u32 {
        self.run(PROG_POL_TO_POD, ep, f)
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.dp
            .drops()
            .expect("read drops")
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| n)
    }

    fn ct(&self, ep: u32) -> Vec<(CtKey, CtValue)> {
        self.dp.conntrack(Some(ep)).expect("read conntrack")
    }

    fn endpoint(&self, ep: u32, identity: u32, ip: Ipv4Addr, ingress: bool, egress: bool) {
        self.dp
            .set_endpoint(
                ep,
                &Endpoint {
                    identity,
                    ip,
                    ingress,
                    egress,
                    source_check: false,
                },
            )
            .expect("set endpoint");
    }

    fn pods(&self, pods: &[(Ipv4Addr, u32)]) {
        for (ip, id) in pods {
            self.dp
                .upsert_ipcache(Cidr::host(*ip), *id)
                .expect("upsert ipcache");
        }
    }

    /// Runs a new flow's first packet and checks the kernel's verdict
    /// against `expect` and against the userspace [`PolicyDataplane::decide`].
    fn check_new(&self, ep: u32, dir: Direction, f: &[u8], expect: u32, what: &str) {
        let (peer, port, proto) = peer_of(f, dir);
        let rc = match dir {
            Direction::Ingress => self.receives(ep, f),
            Direction::Egress => self.sends(ep, f),
        };
        assert_eq!(rc, expect, "{what}: kernel verdict");
        let d = self.dp.decide(ep, dir, peer, port, proto).expect("decide");
        let user = if matches!(d, Decision::Denied { .. }) {
            TC_ACT_SHOT
        } else {
            TC_ACT_UNSPEC
        };
        assert_eq!(user, expect, "{what}: userspace decision {d:?}");
    }
}

/// The peer, destination port and protocol of frame `f` in `dir`.
fn peer_of(f: &[u8], dir: Direction) -> (Ipv4Addr, u16, u8) {
    let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
    let dst = Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let proto = f[23];
    let port = if proto == PROTO_TCP || proto == PROTO_UDP {
        u16::from_be_bytes([f[36], f[37]])
    } else {
        0
    };
    match dir {
        Direction::Ingress => (src, port, proto),
        Direction::Egress => (dst, port, proto),
    }
}

// --------------------------------------------------------------- frames

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    frame(
        &Pkt {
            tcp_flags: flags,
            ..Pkt::new(PROTO_TCP, src, dst)
        },
        b"",
    )
}

fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    tcp(src, dst, TCP_SYN)
}

fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    frame(&Pkt::new(PROTO_UDP, src, dst), b"query")
}

/// An ICMP echo (request: type 8, reply: 0) with identifier `id`.
fn icmp(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, id: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(NODE_MAC);
    f.extend(CLIENT_MAC);
    f.extend(0x0800u16.to_be_bytes());
    f.extend([0x45, 0, 0, 28, 0, 1, 0x40, 0, 64, PROTO_ICMP, 0, 0]);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend([ty, 0, 0, 0]);
    f.extend(id.to_be_bytes());
    f.extend([0, 1]);
    f
}

fn allow(peer: u32, port: u16, proto: u8, dir: Direction, rule: u32) -> PolicyEntry {
    PolicyEntry {
        peer,
        port,
        proto,
        dir,
        rule,
    }
}

use Direction::{Egress, Ingress};

// ---------------------------------------------------------------- tests

/// No endpoint entry, or one that enforces nothing: everything passes and
/// no flow is tracked (Kubernetes' default allow).
#[test]
fn default_allow_without_enforcement() {
    in_netns(1, |eps| {
        let rig = Rig::new("default");
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X)]);
        let frames = [
            syn(sa(WORLD, 40_000), sa(POD_A, 80)),
            udp(sa(PEER_X, 40_000), sa(POD_A, 53)),
            icmp(WORLD, POD_A, 8, 7),
        ];
        for round in ["no endpoint", "endpoint enforcing nothing"] {
            for f in &frames {
                assert_eq!(rig.receives(a, f), TC_ACT_UNSPEC, "{round}: to the pod");
                assert_eq!(rig.sends(a, f), TC_ACT_UNSPEC, "{round}: from the pod");
            }
            rig.endpoint(a, ID_A, POD_A, false, false);
        }
        assert!(rig.ct(a).is_empty(), "nothing tracked: {:?}", rig.ct(a));
        assert!(
            rig.dp.drops().expect("drops").iter().all(|(_, n)| *n == 0),
            "no drops"
        );
    });
}

/// Ingress enforced with no entry: a SYN from an unknown peer (world) is
/// dropped and counted; the pod's own connections still go out (Egress is
/// not enforced) and their replies come back through conntrack.
#[test]
fn enforced_ingress_denies_unknown_peer_and_counts() {
    in_netns(1, |eps| {
        let rig = Rig::new("deny");
        let a = eps[0];
        rig.endpoint(a, ID_A, POD_A, true, false);
        let before = rig.drops(DropReason::PolicyDeniedIngress);
        for i in 0..3 {
            rig.check_new(
                a,
                Ingress,
                &syn(sa(WORLD, 40_000 + i), sa(POD_A, 80)),
                TC_ACT_SHOT,
                "SYN from world",
            );
        }
        assert_eq!(
            rig.drops(DropReason::PolicyDeniedIngress) - before,
            3,
            "each drop counted once"
        );
        assert_eq!(rig.drops(DropReason::PolicyDeniedEgress), 0);
        assert!(rig.ct(a).is_empty(), "a denied flow is not tracked");
        // The pod connects out: passes, tracked only for its replies.
        let out = syn(sa(POD_A, 45_000), sa(WORLD, 443));
        assert_eq!(rig.sends(a, &out), TC_ACT_UNSPEC);
        let ct = rig.ct(a);
        assert_eq!(ct.len(), 1, "{ct:?}");
        assert_eq!(ct[0].0.dir, DIR_EGRESS);
        assert_eq!(ct[0].1.flags & CT_F_UNENFORCED, CT_F_UNENFORCED);
        assert_eq!(ct[0].1.rule, CT_RULE_NONE);
        let reply = tcp(sa(WORLD, 443), sa(POD_A, 45_000), TCP_SYN_ACK);
        assert_eq!(
            rig.receives(a, &reply),
            TC_ACT_UNSPEC,
            "reply of its own flow"
        );
        assert_ne!(rig.ct(a)[0].1.flags & CT_F_REPLY_SEEN, 0, "reply seen");
        // The same peer on another port is still a new, denied flow.
        let other = tcp(sa(WORLD, 443), sa(POD_A, 45_001), TCP_SYN_ACK);
        assert_eq!(rig.receives(a, &other), TC_ACT_SHOT);
    });
}

/// An entry (identity, port, proto) allows exactly that: not another
/// port, protocol, peer or direction; the flow is tracked with its rule.
#[test]
fn allow_by_identity_port_and_protocol() {
    in_netns(1, |eps| {
        let rig = Rig::new("exact");
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X), (PEER_Y, ID_Y)]);
        rig.dp
            .set_policy(a, &[allow(ID_X, 80, PROTO_TCP, Ingress, 7)])
            .expect("set policy");
        rig.endpoint(a, ID_A, POD_A, true, true);
        let x = sa(PEER_X, 40_000);
        rig.check_new(
            a,
            Ingress,
            &syn(x, sa(POD_A, 80)),
            TC_ACT_UNSPEC,
            "X:80/TCP",
        );
        let ct = rig.ct(a);
        assert_eq!(ct.len(), 1, "{ct:?}");
        assert_eq!((ct[0].0.dir, ct[0].1.rule), (DIR_INGRESS, 7));
        assert_eq!(ct[0].1.flags & CT_F_UNENFORCED, 0);
        let cases = [
            (syn(x, sa(POD_A, 81)), "X on another port"),
            (udp(x, sa(POD_A, 80)), "X on UDP 80"),
            (syn(sa(PEER_Y, 40_000), sa(POD_A, 80)), "Y on 80"),
            (syn(sa(WORLD, 40_000), sa(POD_A, 80)), "world on 80"),
            (icmp(PEER_X, POD_A, 8, 1), "X ping"),
        ];
        for (f, what) in &cases {
            rig.check_new(a, Ingress, f, TC_ACT_SHOT, what);
        }
        // The entry is an Ingress one: the pod may not open flows to X:80.
        rig.check_new(
            a,
            Egress,
            &syn(sa(POD_A, 45_000), sa(PEER_X, 80)),
            TC_ACT_SHOT,
            "A to X:80 (egress)",
        );
        assert_eq!(rig.drops(DropReason::PolicyDeniedIngress), 5);
        assert_eq!(rig.drops(DropReason::PolicyDeniedEgress), 1);
    });
}

/// Wildcards: any port of a protocol, any protocol of a peer, any peer on
/// a port (world included), and the entry that matched in lookup order.
#[test]
fn wildcard_ports_protocols_and_peers() {
    in_netns(1, |eps| {
        let rig = Rig::new("wild");
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X), (PEER_Y, ID_Y)]);
        rig.dp
            .set_policy(
                a,
                &[
                    allow(ID_X, 0, PROTO_TCP, Ingress, 1),
                    allow(ID_Y, 0, 0, Ingress, 2),
                    allow(ID_ANY, 53, PROTO_UDP, Ingress, 3),
                    allow(ID_X, 8080, PROTO_TCP, Ingress, 4),
                ],
            )
            .expect("set policy");
        rig.endpoint(a, ID_A, POD_A, true, false);
        let pass = [
            (syn(sa(PEER_X, 1), sa(POD_A, 22)), "X any TCP port"),
            (syn(sa(PEER_X, 2), sa(POD_A, 65_535)), "X TCP 65535"),
            (udp(sa(PEER_Y, 3), sa(POD_A, 9999)), "Y any proto: UDP"),
            (icmp(PEER_Y, POD_A, 8, 4), "Y any proto: ICMP"),
            (udp(sa(WORLD, 5), sa(POD_A, 53)), "world UDP 53"),
            (udp(sa(PEER_X, 6), sa(POD_A, 53)), "X UDP 53 (any peer)"),
        ];
        for (f, what) in &pass {
            rig.check_new(a, Ingress, f, TC_ACT_UNSPEC, what);
        }
        let deny = [
            (udp(sa(PEER_X, 7), sa(POD_A, 54)), "X UDP 54"),
            (syn(sa(WORLD, 8), sa(POD_A, 53)), "world TCP 53"),
            (icmp(PEER_X, POD_A, 8, 9), "X ping"),
        ];
        for (f, what) in &deny {
            rig.check_new(a, Ingress, f, TC_ACT_SHOT, what);
        }
        // The most specific entry wins: X:8080 is rule 4, not rule 1.
        let d = rig
            .dp
            .decide(a, Ingress, PEER_X, 8080, PROTO_TCP)
            .expect("decide");
        assert!(
            matches!(d, Decision::Allowed { entry, peer_identity: ID_X, .. } if entry.rule == 4),
            "{d:?}"
        );
        assert_eq!(
            rig.receives(a, &syn(sa(PEER_X, 10), sa(POD_A, 8080))),
            TC_ACT_UNSPEC
        );
        let ct = rig.ct(a);
        let rule = ct
            .iter()
            .find(|(k, _)| u16::from_be(k.dport) == 8080)
            .map(|(_, v)| v.rule);
        assert_eq!(rule, Some(4), "{ct:?}");
        let d = rig
            .dp
            .decide(a, Ingress, WORLD, 53, PROTO_UDP)
            .expect("decide");
        assert!(
            matches!(d, Decision::Allowed { entry, peer_identity: ID_WORLD, .. } if entry.peer == ID_ANY),
            "{d:?}"
        );
    });
}

/// ipBlock 10.9.8.0/24 except 10.9.8.0/28: the except is a longer prefix
/// with its own CIDR identity that the policy does not allow; a pod inside
/// the block matches it through its `cidr_identity` (and not inside the
/// except).
#[test]
fn ipblock_with_except() {
    in_netns(1, |eps| {
        let rig = Rig::new("ipblock");
        let a = eps[0];
        let block = ID_CIDR_MIN + 10;
        let except = ID_CIDR_MIN + 11;
        let pod_in_block = Ipv4Addr::new(10, 9, 8, 200);
        let pod_in_except = Ipv4Addr::new(10, 9, 8, 7);
        rig.pods(&[(pod_in_block, 400), (pod_in_except, 401)]);
        // Host bits in the CIDR are masked (the API stores "as written").
        for (c, id) in [("10.9.8.77/24", block), ("10.9.8.0/28", except)] {
            rig.dp
                .upsert_ipcache(Cidr::parse_masked(c).expect("cidr"), id)
                .expect("upsert cidr");
        }
        rig.dp
            .set_policy(a, &[allow(block, 0, PROTO_TCP, Egress, 1)])
            .expect("set policy");
        rig.endpoint(a, ID_A, POD_A, false, true);
        let to = |ip: Ipv4Addr, port| syn(sa(POD_A, port), sa(ip, 443));
        let cases = [
            (
                Ipv4Addr::new(10, 9, 8, 100),
                TC_ACT_UNSPEC,
                "inside the block",
            ),
            (
                Ipv4Addr::new(10, 9, 8, 255),
                TC_ACT_UNSPEC,
                "block broadcast",
            ),
            (Ipv4Addr::new(10, 9, 8, 5), TC_ACT_SHOT, "inside the except"),
            (
                Ipv4Addr::new(10, 9, 8, 15),
                TC_ACT_SHOT,
                "end of the except",
            ),
            (
                Ipv4Addr::new(10, 9, 8, 16),
                TC_ACT_UNSPEC,
                "just past the except",
            ),
            (Ipv4Addr::new(10, 9, 9, 1), TC_ACT_SHOT, "outside the block"),
            (pod_in_block, TC_ACT_UNSPEC, "a pod inside the block"),
            (pod_in_except, TC_ACT_SHOT, "a pod inside the except"),
        ];
        for (i, (ip, expect, what)) in cases.iter().enumerate() {
            let port = 41_000 + u16::try_from(i).expect("small");
            rig.check_new(a, Egress, &to(*ip, port), *expect, what);
        }
        let cache = rig.dp.ipcache().expect("ipcache");
        let pod = cache
            .iter()
            .find(|(c, _)| *c == Cidr::host(pod_in_block))
            .expect("pod entry")
            .1;
        assert_eq!((pod.identity, pod.cidr_identity), (400, block));
        assert!(
            cache
                .iter()
                .any(|(c, v)| c.to_string() == "10.9.8.0/24" && v.identity == block),
            "{cache:?}"
        );
        // The except goes: its addresses fall back to the block.
        assert!(
            rig.dp
                .remove_ipcache("10.9.8.0/28".parse().expect("cidr"), except)
                .expect("remove")
        );
        rig.check_new(
            a,
            Egress,
            &to(pod_in_except, 42_000),
            TC_ACT_UNSPEC,
            "except gone",
        );
    });
}

/// Both directions enforced, only Ingress from X on 80 allowed: X's
/// connection works both ways (the pod's replies pass its enforced Egress
/// through conntrack), but the pod may not open one to X.
#[test]
fn replies_of_allowed_flows_pass_both_ways() {
    in_netns(1, |eps| {
        let rig = Rig::new("replies");
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X)]);
        rig.dp
            .set_policy(a, &[allow(ID_X, 80, PROTO_TCP, Ingress, 1)])
            .expect("set policy");
        rig.endpoint(a, ID_A, POD_A, true, true);
        let (x, pa) = (sa(PEER_X, 40_000), sa(POD_A, 80));
        assert_eq!(rig.receives(a, &syn(x, pa)), TC_ACT_UNSPEC, "SYN");
        assert_eq!(
            rig.sends(a, &tcp(pa, x, TCP_SYN_ACK)),
            TC_ACT_UNSPEC,
            "SYN-ACK"
        );
        for _ in 0..3 {
            assert_eq!(
                rig.receives(a, &tcp(x, pa, TCP_PSH_ACK)),
                TC_ACT_UNSPEC,
                "data in"
            );
            assert_eq!(
                rig.sends(a, &tcp(pa, x, TCP_PSH_ACK)),
                TC_ACT_UNSPEC,
                "data out"
            );
        }
        assert_eq!(rig.sends(a, &tcp(pa, x, TCP_FIN_ACK)), TC_ACT_UNSPEC, "FIN");
        let ct = rig.ct(a);
        assert_eq!(ct.len(), 1, "one entry for both directions: {ct:?}");
        let v = ct[0].1;
        assert_eq!(
            v.flags & (CT_F_REPLY_SEEN | CT_F_FIN),
            CT_F_REPLY_SEEN | CT_F_FIN
        );
        assert!(v.last_ns > v.created_ns, "refreshed: {v:?}");
        // Egress is enforced and allows nothing: the pod cannot start one.
        rig.check_new(
            a,
            Egress,
            &syn(sa(POD_A, 45_000), sa(PEER_X, 80)),
            TC_ACT_SHOT,
            "A to X:80",
        );
    });
}

/// A reply-looking packet without a flow is a new flow: denied when that
/// direction is enforced; after the pod opened the flow it passes.
#[test]
fn reply_without_conntrack_entry_is_denied() {
    in_netns(1, |eps| {
        let rig = Rig::new("noct");
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X)]);
        rig.endpoint(a, ID_A, POD_A, true, false);
        let synack = tcp(sa(PEER_X, 80), sa(POD_A, 45_000), TCP_SYN_ACK);
        assert_eq!(rig.receives(a, &synack), TC_ACT_SHOT, "unsolicited SYN-ACK");
        let data = tcp(sa(PEER_X, 80), sa(POD_A, 45_000), TCP_PSH_ACK);
        assert_eq!(rig.receives(a, &data), TC_ACT_SHOT, "unsolicited data");
        assert_eq!(
            rig.sends(a, &syn(sa(POD_A, 45_000), sa(PEER_X, 80))),
            TC_ACT_UNSPEC
        );
        assert_eq!(rig.receives(a, &synack), TC_ACT_UNSPEC, "now a reply");
        // A ping out and its reply; an unsolicited echo reply is denied.
        assert_eq!(rig.sends(a, &icmp(POD_A, PEER_X, 8, 77)), TC_ACT_UNSPEC);
        assert_eq!(
            rig.receives(a, &icmp(PEER_X, POD_A, 0, 77)),
            TC_ACT_UNSPEC,
            "echo reply"
        );
        assert_eq!(
            rig.receives(a, &icmp(PEER_X, POD_A, 0, 78)),
            TC_ACT_SHOT,
            "other id"
        );
        assert_eq!(rig.drops(DropReason::PolicyDeniedIngress), 3);
    });
}

/// Two pods on one node: A's conntrack entry for its flow to B does not
/// let the flow into B, whose own Ingress policy decides; once B allows
/// A, the flow and its replies pass all four hooks.
#[test]
fn same_node_pods_each_enforce_their_own_policy() {
    in_netns(2, |eps| {
        let rig = Rig::new("samenode");
        let (a, b) = (eps[0], eps[1]);
        rig.pods(&[(POD_A, ID_A), (POD_B, ID_B)]);
        rig.dp
            .set_policy(a, &[allow(ID_B, 80, PROTO_TCP, Egress, 1)])
            .expect("policy A");
        rig.endpoint(a, ID_A, POD_A, true, true);
        rig.endpoint(b, ID_B, POD_B, true, false);
        let (pa, pb) = (sa(POD_A, 45_000), sa(POD_B, 80));
        assert_eq!(
            rig.sends(a, &syn(pa, pb)),
            TC_ACT_UNSPEC,
            "A's egress allows B:80"
        );
        assert_eq!(
            rig.receives(b, &syn(pa, pb)),
            TC_ACT_SHOT,
            "B's ingress denies A"
        );
        rig.dp
            .set_policy(b, &[allow(ID_A, 0, 0, Ingress, 2)])
            .expect("policy B");
        assert_eq!(rig.sends(a, &syn(pa, pb)), TC_ACT_UNSPEC, "A (retransmit)");
        assert_eq!(
            rig.receives(b, &syn(pa, pb)),
            TC_ACT_UNSPEC,
            "B allows A now"
        );
        let synack = tcp(pb, pa, TCP_SYN_ACK);
        assert_eq!(rig.sends(b, &synack), TC_ACT_UNSPEC, "B's reply leaves");
        assert_eq!(rig.receives(a, &synack), TC_ACT_UNSPEC, "A's reply arrives");
        let (ca, cb) = (rig.ct(a), rig.ct(b));
        assert_eq!((ca.len(), cb.len()), (1, 1), "{ca:?} {cb:?}");
        assert_eq!((ca[0].0.dir, cb[0].0.dir), (DIR_EGRESS, DIR_INGRESS));
        // B may not open flows to A's port 80 (A's Ingress denies).
        let back = syn(sa(POD_B, 46_000), sa(POD_A, 80));
        assert_eq!(rig.sends(b, &back), TC_ACT_UNSPEC, "B's egress is open");
        assert_eq!(rig.receives(a, &back), TC_ACT_SHOT, "A's ingress denies B");
    });
}

/// UDP: an allowed query and its answer pass; a denied one does not.
#[test]
fn udp_flows() {
    in_netns(1, |eps| {
        let rig = Rig::new("udp");
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X), (PEER_Y, ID_Y)]);
        rig.dp
            .set_policy(a, &[allow(ID_X, 53, PROTO_UDP, Egress, 1)])
            .expect("set policy");
        rig.endpoint(a, ID_A, POD_A, true, true);
        let (pa, x) = (sa(POD_A, 33_000), sa(PEER_X, 53));
        rig.check_new(a, Egress, &udp(pa, x), TC_ACT_UNSPEC, "query to X:53");
        assert_eq!(rig.receives(a, &udp(x, pa)), TC_ACT_UNSPEC, "answer");
        rig.check_new(a, Egress, &udp(pa, sa(PEER_Y, 53)), TC_ACT_SHOT, "to Y:53");
        rig.check_new(
            a,
            Ingress,
            &udp(sa(PEER_Y, 53), pa),
            TC_ACT_SHOT,
            "from Y:53",
        );
        assert_eq!(rig.drops(DropReason::PolicyDeniedEgress), 1);
        assert_eq!(rig.drops(DropReason::PolicyDeniedIngress), 1);
    });
}

/// A policy change is a diff (entries that stay are not rewritten). Flows
/// it no longer allows keep passing until `prune_conntrack`, which removes
/// exactly them: their next packet is judged as a new flow and dropped.
/// Flows that stay allowed are untouched throughout. An ipcache change (a
/// peer's identity) is pruned the same way.
#[test]
fn policy_update_and_conntrack_prune() {
    in_netns(1, |eps| {
        let rig = Rig::new("update");
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X), (PEER_Y, ID_Y)]);
        let both = [
            allow(ID_X, 80, PROTO_TCP, Ingress, 1),
            allow(ID_X, 8080, PROTO_TCP, Ingress, 2),
            allow(ID_Y, 80, PROTO_TCP, Ingress, 3),
        ];
        let d = rig.dp.set_policy(a, &both).expect("set policy");
        assert_eq!((d.added, d.kept, d.removed), (3, 0, 0));
        rig.endpoint(a, ID_A, POD_A, true, false);
        let f80 = (sa(PEER_X, 40_080), sa(POD_A, 80));
        let f8080 = (sa(PEER_X, 48_080), sa(POD_A, 8080));
        let fy = (sa(PEER_Y, 40_081), sa(POD_A, 80));
        for (src, dst) in [f80, f8080, fy] {
            assert_eq!(rig.receives(a, &syn(src, dst)), TC_ACT_UNSPEC);
        }
        assert_eq!(rig.ct(a).len(), 3);
        let d = rig.dp.set_policy(a, &[both[0], both[2]]).expect("update");
        assert_eq!((d.added, d.changed, d.kept, d.removed), (0, 0, 2, 1));
        assert_eq!(
            rig.dp.policy(a).expect("read policy"),
            vec![both[0], both[2]]
        );
        // Established: still passing until pruned (Kubernetes allows either).
        let data = |(s, d): (SocketAddrV4, SocketAddrV4)| tcp(s, d, TCP_PSH_ACK);
        assert_eq!(rig.receives(a, &data(f8080)), TC_ACT_UNSPEC, "before prune");
        rig.check_new(
            a,
            Ingress,
            &syn(sa(PEER_X, 1), sa(POD_A, 8080)),
            TC_ACT_SHOT,
            "new 8080",
        );
        assert_eq!(rig.dp.prune_conntrack(a).expect("prune"), 1);
        assert_eq!(
            rig.receives(a, &data(f8080)),
            TC_ACT_SHOT,
            "cut after prune"
        );
        assert_eq!(
            rig.sends(a, &data((f8080.1, f8080.0))),
            TC_ACT_UNSPEC,
            "(egress is not enforced: the pod's packets leave, and track a new flow)"
        );
        assert_eq!(
            rig.receives(a, &data(f80)),
            TC_ACT_UNSPEC,
            "80 stays allowed"
        );
        assert_eq!(rig.receives(a, &data(fy)), TC_ACT_UNSPEC, "Y stays allowed");
        // Y is relabelled: its identity changes, its flow is pruned.
        rig.dp
            .upsert_ipcache(Cidr::host(PEER_Y), 555)
            .expect("relabel");
        assert_eq!(rig.dp.prune_all().expect("prune all"), 1);
        assert_eq!(rig.receives(a, &data(fy)), TC_ACT_SHOT, "Y cut");
        assert_eq!(rig.receives(a, &data(f80)), TC_ACT_UNSPEC, "X:80 still up");
        // Same entries again: nothing is written.
        let d = rig.dp.set_policy(a, &[both[0], both[2]]).expect("again");
        assert_eq!((d.added, d.changed, d.kept, d.removed), (0, 0, 2, 0));
        // A changed rule is an in-place update, not a delete + insert.
        let moved = allow(ID_X, 80, PROTO_TCP, Ingress, 9);
        let d = rig.dp.set_policy(a, &[moved, both[2]]).expect("rule");
        assert_eq!((d.added, d.changed, d.kept, d.removed), (0, 1, 1, 0));
        // The endpoint goes: its entries and flows with it.
        rig.dp.remove_endpoint(a).expect("remove endpoint");
        assert!(rig.dp.policy(a).expect("policy").is_empty());
        assert!(rig.ct(a).is_empty());
        assert_eq!(
            rig.receives(a, &data(f8080)),
            TC_ACT_UNSPEC,
            "unenforced again"
        );
    });
}

/// A flow that needs a conntrack entry and cannot get one is dropped with
/// `CtMapFull`, never let through. An LRU map evicts instead of filling,
/// so the test pins a plain hash map of 2 entries as `weir_ct_v1` before
/// the object is loaded: the loader reuses a pinned map by name.
#[test]
fn conntrack_full_drops_with_reason() {
    in_netns(1, |eps| {
        let scratch = Scratch::new("wpol", "ctfull", |_| {});
        pin_hash_map(
            &scratch.0.join(CT_MAP),
            size_of::<CtKey>(),
            size_of::<CtValue>(),
            2,
        );
        let rig = Rig::on(scratch);
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X)]);
        rig.dp
            .set_policy(a, &[allow(ID_X, 0, PROTO_TCP, Ingress, 1)])
            .expect("set policy");
        rig.endpoint(a, ID_A, POD_A, true, false);
        let flow = |p: u16| (sa(PEER_X, p), sa(POD_A, 80));
        for p in [1, 2] {
            let (s, d) = flow(p);
            assert_eq!(rig.receives(a, &syn(s, d)), TC_ACT_UNSPEC, "flow {p} fits");
        }
        let (s, d) = flow(3);
        assert_eq!(
            rig.receives(a, &syn(s, d)),
            TC_ACT_SHOT,
            "allowed but untrackable"
        );
        assert_eq!(rig.drops(DropReason::CtMapFull), 1);
        assert_eq!(rig.drops(DropReason::PolicyDeniedIngress), 0);
        // An unenforced direction that must track for the enforced one.
        let out = syn(sa(POD_A, 45_000), sa(WORLD, 443));
        assert_eq!(rig.sends(a, &out), TC_ACT_SHOT, "untrackable own flow");
        assert_eq!(rig.drops(DropReason::CtMapFull), 2);
        // Tracked flows still pass both ways.
        let (s, d) = flow(1);
        assert_eq!(rig.receives(a, &tcp(s, d, TCP_PSH_ACK)), TC_ACT_UNSPEC);
        assert_eq!(rig.sends(a, &tcp(d, s, TCP_PSH_ACK)), TC_ACT_UNSPEC);
    });
}

/// Creates a `BPF_MAP_TYPE_HASH` and pins it at `path`.
fn pin_hash_map(path: &Path, key: usize, value: usize, max_entries: u32) {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size,
    // max_entries, map_flags (u32 each), zero after.
    let mut attr = [0u32; 32];
    attr[0] = 1; // BPF_MAP_TYPE_HASH
    attr[1] = u32::try_from(key).expect("key size");
    attr[2] = u32::try_from(value).expect("value size");
    attr[3] = max_entries;
    // SAFETY: bpf(2) with a zero-padded bpf_attr of the right size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    assert!(fd >= 0, "create map: {}", std::io::Error::last_os_error());
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // BPF_OBJ_PIN: pathname (u64 pointer), bpf_fd (u32).
    let mut pin = [0u64; 8];
    pin[0] = cpath.as_ptr() as u64;
    pin[1] = u64::try_from(fd).expect("fd");
    // SAFETY: as above; `cpath` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), size_of_val(&pin)) };
    assert_eq!(rc, 0, "pin map: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is ours; the pin keeps the map.
    unsafe { libc::close(i32::try_from(fd).expect("fd")) };
}

/// What cannot be classified: ARP always passes; IPv6 and other
/// ethertypes, IPv4 fragments and truncated headers are dropped (by
/// reason) only where a direction is enforced. Source check: a pod may
/// only send from its own address.
#[test]
fn unclassifiable_frames_and_source_check() {
    in_netns(2, |eps| {
        let rig = Rig::new("odd");
        let (enf, open) = (eps[0], eps[1]);
        rig.endpoint(enf, ID_A, POD_A, true, true);
        rig.endpoint(open, ID_B, POD_B, false, false);
        let good = syn(sa(WORLD, 40_000), sa(POD_A, 80));
        let mut arp = good[..14].to_vec();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        arp.extend([0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend([0u8; 20]);
        let mut ipv6 = good.clone();
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        ipv6.extend([0u8; 40]);
        let mut frag = good.clone();
        frag[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
        let mut later = good.clone();
        later[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
        let cut = good[..40].to_vec();
        let mut options = good.clone();
        options[14] = 0x4f; // IHL 60: the TCP header is not where it says
        let cases: [(&[u8], Option<DropReason>, &str); 6] = [
            (&arp, None, "ARP"),
            (&ipv6, Some(DropReason::NotIpv4), "IPv6"),
            (&frag, Some(DropReason::Fragment), "first fragment"),
            (&later, Some(DropReason::Fragment), "later fragment"),
            (&cut, Some(DropReason::Malformed), "TCP header cut"),
            (
                &options,
                Some(DropReason::Malformed),
                "options past the end",
            ),
        ];
        for (f, reason, what) in cases {
            for (prog, dir) in [(PROG_POL_TO_POD, "to"), (PROG_POL_FROM_POD, "from")] {
                let before = reason.map(|r| rig.drops(r));
                let want = if reason.is_some() {
                    TC_ACT_SHOT
                } else {
                    TC_ACT_UNSPEC
                };
                assert_eq!(rig.run(prog, enf, f), want, "{what} {dir} an enforced pod");
                if let (Some(r), Some(n)) = (reason, before) {
                    assert_eq!(rig.drops(r), n + 1, "{what}: counted as {}", r.name());
                }
                assert_eq!(
                    rig.run(prog, open, f),
                    TC_ACT_UNSPEC,
                    "{what} {dir} an open pod"
                );
            }
        }
        // Source check on the open pod: only its own address may leave.
        rig.dp
            .set_endpoint(
                open,
                &Endpoint {
                    identity: ID_B,
                    ip: POD_B,
                    ingress: false,
                    egress: false,
                    source_check: true,
                },
            )
            .expect("source check");
        let own = syn(sa(POD_B, 1), sa(WORLD, 80));
        let spoofed = syn(sa(POD_A, 1), sa(WORLD, 80));
        assert_eq!(rig.sends(open, &own), TC_ACT_UNSPEC);
        assert_eq!(rig.sends(open, &spoofed), TC_ACT_SHOT);
        assert_eq!(
            rig.receives(open, &spoofed),
            TC_ACT_UNSPEC,
            "only what it sends"
        );
        assert_eq!(rig.drops(DropReason::SourceSpoofed), 1);
        assert!(
            rig.ct(open).is_empty(),
            "no direction enforced: no tracking"
        );
    });
}

/// A restarted agent adopts the pinned maps: endpoints, ipcache, policy
/// entries and flows are still there, and re-applying the same policy
/// writes nothing.
#[test]
fn adoption_keeps_state() {
    in_netns(1, |eps| {
        let rig = Rig::new("adopt");
        let a = eps[0];
        rig.pods(&[(PEER_X, ID_X)]);
        rig.dp
            .upsert_ipcache("10.9.0.0/16".parse().expect("cidr"), ID_CIDR_MIN + 1)
            .expect("cidr");
        let entries = [allow(ID_X, 80, PROTO_TCP, Ingress, 1)];
        rig.dp.set_policy(a, &entries).expect("policy");
        rig.endpoint(a, ID_A, POD_A, true, false);
        assert_eq!(
            rig.receives(a, &syn(sa(PEER_X, 1), sa(POD_A, 80))),
            TC_ACT_UNSPEC
        );
        let Rig {
            dp,
            ebpf,
            _scratch: scratch,
        } = rig;
        let cache = dp.ipcache().expect("ipcache");
        drop(dp);
        let again = PolicyDataplane::load(&scratch.0).expect("reload");
        assert_eq!(again.ipcache().expect("ipcache"), cache);
        let d = again.set_policy(a, &entries).expect("policy");
        assert_eq!((d.added, d.kept), (0, 1));
        assert_eq!(again.conntrack(Some(a)).expect("ct").len(), 1);
        assert!(
            again
                .endpoint(a)
                .expect("endpoint")
                .is_some_and(|e| e.ingress)
        );
        // The mirror rebuilt from the trie keeps both kinds of slots.
        again
            .upsert_ipcache(Cidr::host(Ipv4Addr::new(10, 9, 0, 5)), 700)
            .expect("pod in cidr");
        let v = again
            .ipcache()
            .expect("ipcache")
            .into_iter()
            .find(|(c, _)| c.prefix == 32 && c.addr == Ipv4Addr::new(10, 9, 0, 5))
            .expect("entry")
            .1;
        assert_eq!((v.identity, v.cidr_identity), (700, ID_CIDR_MIN + 1));
        drop(ebpf);
    });
}

// ------------------------------------------------------- real traffic

/// Network namespaces, deleted on drop.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// A "node" and a "pod" namespace joined by a veth pair (10.250.0.1 on
/// the node side, 10.250.0.2 in the pod); all removed on drop.
struct Pair {
    node: String,
    pod: String,
    veth: String,
    _ns: Netns,
}

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);

impl Pair {
    fn new() -> Self {
        let tag = std::process::id() % 100_000;
        let (node, pod) = (format!("wpn{tag}"), format!("wpp{tag}"));
        // Deleting a namespace that was never added fails quietly.
        let ns = Netns(vec![node.clone(), pod.clone()]);
        ip(&["netns", "add", &node]);
        ip(&["netns", "add", &pod]);
        let (veth, inner) = (format!("wph{tag}"), format!("wpc{tag}"));
        let link = ["link", "add", &veth, "type", "veth", "peer", "name", &inner];
        ip(&[&["-n", node.as_str()], &link[..], &["netns", pod.as_str()]].concat());
        for (ns, dev, addr) in [(&node, &veth, NODE_ADDR), (&pod, &inner, POD_ADDR)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Self {
            node,
            pod,
            veth,
            _ns: ns,
        }
    }

    /// A TCP connection from namespace `ns` to `to` (700 ms to connect)
    /// that has sent "ping".
    fn connect(ns: &str, to: SocketAddrV4) -> std::io::Result<TcpStream> {
        in_ns(ns, || {
            let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_millis(700))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"ping")?;
            Ok(s)
        })
    }

    /// The names of the TCX programs on the node-side veth, in run order:
    /// (ingress, egress). Names are cut to 15 bytes by the kernel.
    fn tcx(&self) -> (Vec<String>, Vec<String>) {
        in_ns(&self.node, || {
            let names = |t| {
                SchedClassifier::query_tcx(&self.veth, t)
                    .expect("query tcx")
                    .1
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                    .collect()
            };
            (names(TcAttachType::Ingress), names(TcAttachType::Egress))
        })
    }
}

fn pod_endpoint(ingress: bool, egress: bool) -> Endpoint {
    Endpoint {
        identity: ID_A,
        ip: POD_ADDR,
        ingress,
        egress,
        source_check: true,
    }
}

/// The programs sit on the node side of a veth pair, ahead of the traffic
/// counters (attached before them) in both TCX chains, which still count
/// what passes. The pod's Ingress allows the node (host identity) on one
/// port only: a connection to it works (data both ways), one to another
/// port times out, one the pod opens is refused by its Egress policy. Then
/// Ingress is lifted: both ports answer.
#[test]
fn real_tcp_through_attached_programs() {
    let pair = Pair::new();
    let scratch = Scratch::new("wpol", "real", |_| {});
    let (counters, dp, ifindex) = in_ns(&pair.node, || {
        let counters = Dataplane::load(&scratch.0, "n").expect("load counters");
        let c = std::ffi::CString::new(pair.veth.clone()).expect("name");
        // SAFETY: a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        counters.attach_pod(&pair.veth, ifindex).expect("counters");
        let dp = PolicyDataplane::load(&scratch.0).expect("load");
        dp.attach(&pair.veth).expect("attach");
        // Attaching again adopts the pinned links instead of stacking.
        dp.attach(&pair.veth).expect("re-attach");
        (counters, dp, ifindex)
    });
    assert_eq!(dp.attached_ifaces(), vec![pair.veth.clone()]);
    let (ingress, egress) = pair.tcx();
    assert_eq!(
        ingress,
        ["weir_pol_from_p", "weir_from_pod"],
        "from the pod"
    );
    assert_eq!(egress, ["weir_pol_to_pod", "weir_to_pod"], "to the pod");
    dp.upsert_ipcache(Cidr::host(NODE_ADDR), ID_HOST)
        .expect("ipcache");
    dp.upsert_ipcache(Cidr::host(POD_ADDR), ID_A)
        .expect("ipcache");
    let entry = allow(ID_HOST, 8001, PROTO_TCP, Ingress, 1);
    dp.set_policy(ifindex, &[entry]).expect("policy");
    dp.set_endpoint(ifindex, &pod_endpoint(true, true))
        .expect("endpoint");
    let listeners: Vec<TcpListener> = in_ns(&pair.pod, || {
        [8001, 8002]
            .iter()
            .map(|p| TcpListener::bind(("0.0.0.0", *p)).expect("bind in pod"))
            .collect()
    });
    let _node_listener = in_ns(&pair.node, || {
        TcpListener::bind("0.0.0.0:9000").expect("bind")
    });
    let mut ok = Pair::connect(&pair.node, sa(POD_ADDR, 8001)).expect("8001 is allowed");
    let (mut srv, _) = listeners[0].accept().expect("accept");
    let mut buf = [0u8; 4];
    srv.read_exact(&mut buf).expect("read in pod");
    srv.write_all(b"pong").expect("reply");
    ok.read_exact(&mut buf).expect("reply through conntrack");
    assert_eq!(&buf, b"pong");
    // The counters after the policy programs still ran, both ways.
    let c = counters.counters(ifindex);
    assert!(c.rx_packets >= 3 && c.tx_packets >= 3, "{c:?}");
    let refused = Pair::connect(&pair.node, sa(POD_ADDR, 8002));
    assert!(refused.is_err(), "8002 must time out: {refused:?}");
    let out = Pair::connect(&pair.pod, sa(NODE_ADDR, 9000));
    assert!(out.is_err(), "the pod's Egress allows nothing: {out:?}");
    let drops = dp.drops().expect("drops");
    let n = |r| drops.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
    assert!(n(DropReason::PolicyDeniedIngress) >= 1, "{drops:?}");
    assert!(n(DropReason::PolicyDeniedEgress) >= 1, "{drops:?}");
    // Lift Ingress (endpoint first, then entries): both ports answer.
    dp.set_endpoint(ifindex, &pod_endpoint(false, true))
        .expect("endpoint");
    dp.set_policy(ifindex, &[]).expect("policy");
    let again = Pair::connect(&pair.node, sa(POD_ADDR, 8002));
    assert!(again.is_ok(), "8002 after the policy is lifted: {again:?}");
    in_ns(&pair.node, || {
        dp.detach(&pair.veth).expect("detach");
        counters
            .detach_pod(&pair.veth, ifindex)
            .expect("detach counters");
    });
    assert!(dp.attached_ifaces().is_empty());
    assert_eq!(pair.tcx(), (vec![], vec![]), "detached");
}
