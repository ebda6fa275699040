//! Root tests: the flow records the network policy programs write to
//! `weir_flows_v1`, through `BPF_PROG_TEST_RUN` on crafted frames (as in
//! `policy_test_run.rs`: each run on a veth of a private network namespace
//! standing for a pod's host-side veth), read back with the agent's
//! [`flows::FlowReader`]; sampling counters through [`flows::FlowCounters`].
//!
//! A real-traffic test attaches the programs to a veth pair between two
//! namespaces, connects from the "pod" with a socket whose cookie the test
//! maps to a service VIP in `weir_sock_rev_v1`, and reads the record
//! through the agent's async reader ([`flows::run`]) and [`flows::FlowHub`]:
//! the socket of a packet a pod sends is still known on the host side of
//! its veth, so the record carries the VIP.
//!
//! Pins live under `/sys/fs/bpf/wflow-<pid>-<test>/`, removed on drop.

mod common;

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::Command,
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use common::{
    OBJECT, Pkt, Scratch, TC_ACT_SHOT, TC_ACT_UNSPEC, TCP_PSH_ACK, TCP_SYN, TCP_SYN_ACK,
    classifier, frame, ip,
};
use weir_agent::flows::{self, Enricher, FlowCounters, FlowHub, FlowReader, FlowSettings, Verdict};
use weir_agent::policy::{Cidr, Direction, Endpoint, PolicyDataplane, PolicyEntry};
use weir_common::{
    DIR_EGRESS, DIR_INGRESS, DropReason, FLOW_F_UNENFORCED, FLOW_F_UNTRACKED, FLOW_VERDICT_ALLOWED,
    FLOW_VERDICT_DENIED, FlowRecord, ID_HOST, ID_WORLD, PROG_POL_FROM_POD, PROG_POL_TO_POD,
    PROTO_TCP, PROTO_UDP, SOCK_REV_MAP, SvcKey,
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const PEER_X: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 20);
const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const ID_A: u32 = 1000;
const ID_X: u32 = 300;

// ----------------------------------------------------------------- rigs

/// Runs `f` on a thread pinned to CPU 0 (one token bucket) in a fresh
/// network namespace holding a veth device, with its ifindex.
fn in_netns<T: Send>(f: impl FnOnce(u32) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(0).expect("cpu 0");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)
                .expect("pin to cpu 0");
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            ip(&[
                "link", "add", "wflow0", "type", "veth", "peer", "name", "wflow0p",
            ]);
            let c = std::ffi::CString::new("wflow0").expect("name");
            // SAFETY: a NUL-terminated string.
            let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
            assert!(idx > 1, "ifindex of the veth");
            f(idx)
        })
        .join()
        .expect("test thread")
    })
}

/// The policy dataplane and the flow maps on scratch pins, and a second
/// copy of the object on the same maps whose programs the test runs.
struct Rig {
    dp: PolicyDataplane,
    ebpf: Ebpf,
    reader: FlowReader,
    counters: FlowCounters,
    scratch: Scratch,
}

impl Rig {
    fn new(tag: &str, settings: &FlowSettings) -> Self {
        let scratch = Scratch::new("wflow", tag, |_| {});
        let dp = PolicyDataplane::load(&scratch.0).expect("load policy dataplane");
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&scratch.0)
            .load(OBJECT)
            .expect("load object on the same pins");
        for prog in [PROG_POL_FROM_POD, PROG_POL_TO_POD] {
            classifier(&mut ebpf, prog).load().expect("load program");
        }
        let (reader, counters) = flows::open(&scratch.0, settings).expect("open flow maps");
        Self {
            dp,
            ebpf,
            reader,
            counters,
            scratch,
        }
    }

    fn run(&self, prog: &str, ifindex: u32, f: &[u8]) -> u32 {
        let p: &SchedClassifier = self
            .ebpf
            .program(prog)
            .expect("program")
            .try_into()
            .expect("classifier");
        // struct __sk_buff up to `ifindex` (offset 40).
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
        r.return_value
    }

    fn sends(&self, ep: u32, f: &[u8]) -> u32 {
        self.run(PROG_POL_FROM_POD, ep, f)
    }

    fn receives(&self, ep: u32, f: &[u8]) -> u32 {
        self.run(PROG_POL_TO_POD, ep, f)
    }

    fn endpoint(&self, ep: u32, ingress: bool, egress: bool) {
        self.dp
            .set_endpoint(
                ep,
                &Endpoint {
                    identity: ID_A,
                    ip: POD_A,
                    ingress,
                    egress,
                    source_check: false,
                },
            )
            .expect("set endpoint");
        for (addr, id) in [(POD_A, ID_A), (PEER_X, ID_X)] {
            self.dp
                .upsert_ipcache(Cidr::host(addr), id)
                .expect("ipcache");
        }
    }

    fn records(&mut self) -> Vec<FlowRecord> {
        self.reader.drain()
    }

    fn lost(&self) -> flows::LostCounts {
        self.counters.lost().expect("lost counters")
    }
}

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

fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    frame(&Pkt::new(PROTO_UDP, src, dst), b"query")
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).expect("time") * 1_000_000_000 + u64::try_from(ts.tv_nsec).expect("ns")
}

// ---------------------------------------------------------------- tests

/// A denied SYN gives exactly one record with every field right; the
/// same denial repeated within the window gives none (counted as
/// aggregated) and the next one after the window carries the count.
#[test]
fn denied_flows_are_recorded_once_per_window() {
    in_netns(|ep| {
        let settings = FlowSettings {
            deny_interval: Duration::from_millis(300),
            ..FlowSettings::default()
        };
        let mut rig = Rig::new("denied", &settings);
        rig.endpoint(ep, true, false);
        let syn = tcp(sa(PEER_X, 40000), sa(POD_A, 80), TCP_SYN);
        let before = monotonic_ns();
        assert_eq!(rig.receives(ep, &syn), TC_ACT_SHOT);
        let after = monotonic_ns();
        let recs = rig.records();
        assert_eq!(recs.len(), 1, "{recs:#?}");
        let r = recs[0];
        assert!(r.ts_ns >= before && r.ts_ns <= after, "{r:?}");
        let want = FlowRecord {
            ts_ns: r.ts_ns,
            // BPF_PROG_TEST_RUN gives the skb a socket of its own.
            sock_cookie: r.sock_cookie,
            ep,
            saddr: be(PEER_X),
            daddr: be(POD_A),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            dir: DIR_INGRESS,
            verdict: FLOW_VERDICT_DENIED,
            reason: DropReason::PolicyDeniedIngress as u8,
            src_identity: ID_X,
            dst_identity: ID_A,
            rule: 0,
            svc_ip: 0,
            svc_port: 0,
            tcp_flags: TCP_SYN,
            flags: 0,
            suppressed: 0,
            pad: 0,
        };
        assert_eq!(r, want);
        let agg0 = rig.lost().aggregated;
        for _ in 0..5 {
            assert_eq!(rig.receives(ep, &syn), TC_ACT_SHOT);
        }
        assert!(rig.records().is_empty(), "repeats within the window");
        assert_eq!(rig.lost().aggregated - agg0, 5, "{:?}", rig.lost());
        // Another port is another key: recorded at once.
        let other = tcp(sa(PEER_X, 40000), sa(POD_A, 81), TCP_SYN);
        assert_eq!(rig.receives(ep, &other), TC_ACT_SHOT);
        let recs = rig.records();
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(u16::from_be(recs[0].dport), 81);
        // After the window: one record with the five folded into it.
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(rig.receives(ep, &syn), TC_ACT_SHOT);
        let recs = rig.records();
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(recs[0].suppressed, 5);
        // The drop counters count every packet.
        let drops = rig.counters.drops().expect("drops");
        let n = drops
            .iter()
            .find(|(r, _)| *r == DropReason::PolicyDeniedIngress)
            .map_or(0, |(_, n)| *n);
        assert_eq!(n, 8, "{drops:?}");
    });
}

/// An allowed new flow is recorded with the rule that allowed it; its
/// further packets and replies are not. A flow started in the direction
/// that is not enforced is recorded as unenforced, without rule.
#[test]
fn allowed_new_flows_carry_their_rule() {
    in_netns(|ep| {
        let mut rig = Rig::new("allowed", &FlowSettings::default());
        let entry = PolicyEntry {
            peer: ID_X,
            port: 80,
            proto: PROTO_TCP,
            dir: Direction::Ingress,
            rule: 42,
        };
        rig.dp.set_policy(ep, &[entry]).expect("policy");
        rig.endpoint(ep, true, false);
        let (client, server) = (sa(PEER_X, 40001), sa(POD_A, 80));
        assert_eq!(
            rig.receives(ep, &tcp(client, server, TCP_SYN)),
            TC_ACT_UNSPEC
        );
        let recs = rig.records();
        assert_eq!(recs.len(), 1, "{recs:#?}");
        let r = recs[0];
        assert_eq!(
            (r.verdict, r.reason, r.rule, r.flags, r.dir),
            (FLOW_VERDICT_ALLOWED, 0, 42, 0, DIR_INGRESS)
        );
        assert_eq!((r.src_identity, r.dst_identity), (ID_X, ID_A));
        assert_eq!((r.saddr, r.daddr), (be(PEER_X), be(POD_A)));
        // Established: the reply, the ACK, data both ways.
        assert_eq!(
            rig.sends(ep, &tcp(server, client, TCP_SYN_ACK)),
            TC_ACT_UNSPEC
        );
        for _ in 0..3 {
            assert_eq!(
                rig.receives(ep, &tcp(client, server, TCP_PSH_ACK)),
                TC_ACT_UNSPEC
            );
            assert_eq!(
                rig.sends(ep, &tcp(server, client, TCP_PSH_ACK)),
                TC_ACT_UNSPEC
            );
        }
        assert!(
            rig.records().is_empty(),
            "no record for established packets"
        );
        // The pod's own connection out (Egress not enforced, tracked for
        // its replies): recorded as unenforced, to the world.
        let out = tcp(sa(POD_A, 50000), sa(WORLD, 443), TCP_SYN);
        assert_eq!(rig.sends(ep, &out), TC_ACT_UNSPEC);
        let recs = rig.records();
        assert_eq!(recs.len(), 1, "{recs:#?}");
        let r = recs[0];
        assert_eq!(
            (r.verdict, r.rule, r.flags, r.dir),
            (FLOW_VERDICT_ALLOWED, 0, FLOW_F_UNENFORCED, DIR_EGRESS)
        );
        assert_eq!((r.src_identity, r.dst_identity), (ID_A, ID_WORLD));
        let lost = rig.lost();
        assert_eq!((lost.rate_limited, lost.ring_full), (0, 0), "{lost:?}");
    });
}

/// An endpoint that enforces nothing tracks nothing: a TCP SYN without
/// ACK is recorded as a new connection (untracked), nothing else is.
#[test]
fn untracked_endpoints_record_tcp_syns_only() {
    in_netns(|ep| {
        let mut rig = Rig::new("untracked", &FlowSettings::default());
        rig.endpoint(ep, false, false);
        let (client, server) = (sa(PEER_X, 40002), sa(POD_A, 8080));
        assert_eq!(
            rig.receives(ep, &tcp(client, server, TCP_SYN)),
            TC_ACT_UNSPEC
        );
        assert_eq!(
            rig.sends(ep, &tcp(server, client, TCP_SYN_ACK)),
            TC_ACT_UNSPEC
        );
        assert_eq!(
            rig.receives(ep, &tcp(client, server, TCP_PSH_ACK)),
            TC_ACT_UNSPEC
        );
        assert_eq!(rig.receives(ep, &udp(client, sa(POD_A, 53))), TC_ACT_UNSPEC);
        let recs = rig.records();
        assert_eq!(recs.len(), 1, "{recs:#?}");
        let r = recs[0];
        assert_eq!(
            (r.verdict, r.flags, r.rule, r.dir, r.tcp_flags),
            (
                FLOW_VERDICT_ALLOWED,
                FLOW_F_UNTRACKED,
                0,
                DIR_INGRESS,
                TCP_SYN
            )
        );
        assert_eq!((r.src_identity, r.dst_identity), (ID_X, ID_A));
        assert!(rig.dp.conntrack(Some(ep)).expect("ct").is_empty());
        // Without an endpoint entry: nothing recorded at all.
        rig.dp.remove_endpoint(ep).expect("remove");
        assert_eq!(
            rig.receives(ep, &tcp(client, server, TCP_SYN)),
            TC_ACT_UNSPEC
        );
        assert!(rig.records().is_empty());
        // Disabled: no records, verdicts unchanged.
        rig.endpoint(ep, true, false);
        let off = FlowSettings {
            enabled: false,
            ..FlowSettings::default()
        };
        flows::configure(&rig.scratch.0, &off).expect("configure");
        assert_eq!(rig.receives(ep, &tcp(client, server, TCP_SYN)), TC_ACT_SHOT);
        assert!(rig.records().is_empty(), "disabled");
    });
}

/// The per-CPU token bucket caps records (the test thread runs on one CPU):
/// with 3 tokens, 10 distinct denials give 3 records and 7 rate-limited.
#[test]
fn token_bucket_caps_records() {
    in_netns(|ep| {
        let cpus = u32::try_from(aya::util::nr_cpus().expect("cpus")).expect("cpus");
        let settings = FlowSettings {
            node_rate: 3 * cpus,
            ..FlowSettings::default()
        };
        let mut rig = Rig::new("bucket", &settings);
        rig.endpoint(ep, true, false);
        for port in 1..=10 {
            let f = tcp(sa(WORLD, 40003), sa(POD_A, port), TCP_SYN);
            assert_eq!(rig.receives(ep, &f), TC_ACT_SHOT);
        }
        let recs = rig.records();
        let ports: Vec<u16> = recs.iter().map(|r| u16::from_be(r.dport)).collect();
        assert_eq!(
            ports,
            [1, 2, 3],
            "the first three, then the bucket is empty"
        );
        let lost = rig.lost();
        assert_eq!((lost.rate_limited, lost.aggregated), (7, 0), "{lost:?}");
        // It refills at 3/s: a third of a second later there is one more.
        std::thread::sleep(Duration::from_millis(400));
        let f = tcp(sa(WORLD, 40003), sa(POD_A, 11), TCP_SYN);
        assert_eq!(rig.receives(ep, &f), TC_ACT_SHOT);
        let f = tcp(sa(WORLD, 40003), sa(POD_A, 12), TCP_SYN);
        assert_eq!(rig.receives(ep, &f), TC_ACT_SHOT);
        assert_eq!(rig.records().len(), 1, "one token refilled");
        assert_eq!(rig.lost().rate_limited, 8);
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

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
const POD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);

/// A TCP socket in the calling thread's namespace: its cookie, then
/// connected to `to` after `before(cookie)` ran.
fn connect_with_cookie(to: SocketAddrV4, before: impl FnOnce(u64)) -> TcpStream {
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // pointers are to live locals of the sizes passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = OwnedFd::from_raw_fd(fd);
        let mut cookie = 0u64;
        let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("len");
        let rc = libc::getsockopt(
            owned.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        );
        assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
        before(cookie);
        let addr = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("family"),
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            owned.as_raw_fd(),
            (&raw const addr).cast(),
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).expect("len"),
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from(owned)
    }
}

/// A "node" and a "pod" namespace joined by a veth pair (`NODE_ADDR` on
/// the node side, `POD_ADDR` in the pod): the namespaces (deleted on
/// drop), their names and the node-side veth's name.
fn veth_pair() -> (Netns, String, String, String) {
    let tag = std::process::id() % 100_000;
    let (node, pod) = (format!("wfn{tag}"), format!("wfp{tag}"));
    let ns = Netns(vec![node.clone(), pod.clone()]);
    ip(&["netns", "add", &node]);
    ip(&["netns", "add", &pod]);
    let (veth, inner) = (format!("wfh{tag}"), format!("wfc{tag}"));
    let link = ["link", "add", &veth, "type", "veth", "peer", "name", &inner];
    ip(&[&["-n", node.as_str()], &link[..], &["netns", pod.as_str()]].concat());
    for (ns, dev, addr) in [(&node, &veth, NODE_ADDR), (&pod, &inner, POD_ADDR)] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    (ns, node, pod, veth)
}

/// Connects from namespace `pod` to the node's port 9000 with a socket
/// whose cookie is first mapped to `VIP`:80 in `weir_sock_rev_v1` (what
/// the socket LB's connect4 leaves for a socket it translated).
fn connect_through_vip(pin_dir: &Path, pod: &str) -> TcpStream {
    let mut sock_rev: HashMap<MapData, u64, SvcKey> = HashMap::try_from(
        Map::from_map_data(MapData::from_pin(pin_dir.join(SOCK_REV_MAP)).expect("pin"))
            .expect("map"),
    )
    .expect("sock rev map");
    in_ns(pod, || {
        connect_with_cookie(sa(NODE_ADDR, 9000), |cookie| {
            assert_ne!(cookie, 0);
            let vip = SvcKey {
                ip: be(VIP),
                port: 80u16.to_be(),
                proto: PROTO_TCP,
                pad: 0,
            };
            sock_rev.insert(cookie, vip, 0).expect("sock rev entry");
        })
    })
}

/// The hub's metrics after one untracked allowed flow.
fn assert_metrics(metrics: &str) {
    for want in [
        "weir_policy_verdicts_total{node=\"n1\",policy=\"none\",verdict=\"allowed\"} 1",
        "weir_flow_records_lost_total{node=\"n1\",reason=\"ring_full\"} 0",
        "weir_policy_drops_total{node=\"n1\",reason=\"POLICY_DENIED_INGRESS\"} 0",
    ] {
        assert!(metrics.contains(want), "{want} in\n{metrics}");
    }
}

/// On the host side of a pod's veth the packets the pod sends still carry
/// their socket: the SYN's record has the socket's cookie and, with the
/// cookie in `weir_sock_rev_v1` (as the socket LB's connect4 leaves it),
/// the service VIP. Read through the agent's async reader and hub.
#[test]
fn real_syn_carries_socket_cookie_and_service_vip() {
    let (_ns, node, pod, veth) = veth_pair();
    let scratch = Scratch::new("wflow", "real", |_| {});
    let (dp, ifindex) = in_ns(&node, || {
        let c = std::ffi::CString::new(veth.clone()).expect("name");
        // SAFETY: a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        let dp = PolicyDataplane::load(&scratch.0).expect("load");
        dp.attach(&veth).expect("attach");
        (dp, ifindex)
    });
    dp.upsert_ipcache(Cidr::host(NODE_ADDR), ID_HOST)
        .expect("ipcache");
    dp.upsert_ipcache(Cidr::host(POD_ADDR), ID_A)
        .expect("ipcache");
    // Nothing enforced: the SYN is recorded as untracked.
    let ep = Endpoint {
        identity: ID_A,
        ip: POD_ADDR,
        ingress: false,
        egress: false,
        source_check: true,
    };
    dp.set_endpoint(ifindex, &ep).expect("endpoint");
    let (reader, counters) = flows::open(&scratch.0, &FlowSettings::default()).expect("open");
    let hub = Arc::new(
        FlowHub::new(
            "n1",
            100,
            Enricher {
                pod_of: Box::new(|ip| (ip == POD_ADDR).then(|| ("x".into(), "a".into()))),
                policy_of: Box::new(|_| None),
            },
        )
        .with_counters(counters),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = rt.spawn(flows::run(reader, hub.clone(), cancel.clone()));
    let mut rx = hub.subscribe();
    let _listener = in_ns(&node, || TcpListener::bind("0.0.0.0:9000").expect("bind"));
    let _conn = connect_through_vip(&scratch.0, &pod);
    let flow = rt
        .block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let (_, f) = rx.recv().await.expect("flow");
                    if f.destination.port == 9000 {
                        return f;
                    }
                }
            })
            .await
        })
        .expect("a flow for the connection");
    assert_eq!(flow.verdict, Verdict::Allowed);
    assert_eq!(flow.direction, "egress");
    assert_eq!(flow.source.ip, POD_ADDR);
    assert_eq!(
        (flow.source.namespace.as_deref(), flow.source.pod.as_deref()),
        (Some("x"), Some("a"))
    );
    assert_eq!(
        (flow.source.identity, flow.destination.identity),
        (ID_A, ID_HOST)
    );
    assert_eq!(flow.flags, ["untracked"]);
    let svc = flow
        .service
        .clone()
        .expect("the VIP from the socket's cookie");
    assert_eq!((svc.ip, svc.port), (VIP, 80));
    assert_metrics(&hub.render_metrics());
    cancel.cancel();
    rt.block_on(task)
        .expect("join")
        .expect("reader ends cleanly");
    in_ns(&node, || dp.detach(&veth).expect("detach"));
}
