//! Root test on the real kernel: the TCP metric programs (`sock_ops`
//! connection/RTT counter, `tcp:tcp_retransmit_skb` tracepoint) attached
//! through `weir_agent::metrics::KernelMetrics` to a cgroup v2 directory of
//! this test, counting a prefix that only a network namespace made here
//! uses. N connections count as N opened and N accepted; a connection whose
//! packets an iptables rule drops retransmits; a reload keeps the counters
//! and leaves one set of links.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use weir_agent::metrics::{KernelMetrics, kernel};
use weir_proto::cidr::Cidr;

const BPFFS: &str = "/sys/fs/bpf";
const CGROUP2: &str = "/sys/fs/cgroup/unified";
/// Connections opened in the first round.
const N: usize = 20;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A cgroup v2 directory this process is moved into; moved back and removed on drop.
struct Cgroup {
    dir: PathBuf,
    back: PathBuf,
}

impl Cgroup {
    fn join(name: &str) -> Self {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("process has a cgroup v2 path");
        let back = Path::new(CGROUP2).join(rel.trim_start_matches('/'));
        let dir = Path::new(CGROUP2).join(name);
        std::fs::create_dir_all(&dir).expect("create test cgroup");
        let g = Self { dir, back };
        std::fs::write(g.dir.join("cgroup.procs"), std::process::id().to_string())
            .expect("join test cgroup");
        g
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.back.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The node's pins, removed on drop.
struct Pins(String);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = weir_agent::metrics::kernel::remove(Path::new(BPFFS), &self.0) {
            eprintln!("remove metric links: {e}");
        }
        let _ = std::fs::remove_dir_all(Path::new(BPFFS).join("weir").join(&self.0));
    }
}

/// Runs `f` on a thread inside the network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
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

/// Opens `n` connections to `addr` (accepting each), then closes them.
fn connect_n(listener: &TcpListener, addr: SocketAddr, n: usize) {
    let mut keep = Vec::new();
    for _ in 0..n {
        let c = TcpStream::connect(addr).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        keep.push((c, s));
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count_links(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).count())
}

#[test]
fn tcp_connections_retransmits_and_rtt_are_counted_per_address() {
    let uniq = std::process::id();
    let ns = Netns(format!("wmt-{uniq}"));
    run("ip", &["netns", "add", &ns.0]);
    let octet = 1 + (uniq % 250);
    let ip = Ipv4Addr::new(10, 253, u8::try_from(octet).expect("octet"), 1);
    let other = Ipv4Addr::new(10, 253, u8::try_from(octet).expect("octet"), 2);
    run("ip", &["-n", &ns.0, "link", "set", "lo", "up"]);
    for a in [ip, other] {
        run(
            "ip",
            &["-n", &ns.0, "addr", "add", &format!("{a}/32"), "dev", "lo"],
        );
    }
    let cgroup = Cgroup::join(&format!("weir-mtest-{uniq}"));
    let node = format!("mtest-{uniq}");
    let _pins = Pins(node.clone());
    // Count only `ip` (a /32): the other address's sockets must not show.
    let cidr = Cidr::new(ip, 32).expect("cidr");
    let k = KernelMetrics::load(Path::new(BPFFS), &node, &cgroup.dir, Some(cidr))
        .expect("load metric programs");
    assert!(kernel().is_none(), "the test uses its own instance");

    in_netns(&ns.0, || {
        let l = TcpListener::bind((ip, 7000)).expect("bind");
        connect_n(&l, SocketAddr::from((ip, 7000)), N);
        let l2 = TcpListener::bind((other, 7000)).expect("bind other");
        connect_n(&l2, SocketAddr::from((other, 7000)), 5);
    });
    wait_for("connections counted", || k.stats(ip).opened >= N as u64);
    let s = k.stats(ip);
    assert_eq!((s.opened, s.accepted), (N as u64, N as u64), "{s:?}");
    // One RTT sample at ESTABLISHED and one when leaving it, per socket.
    wait_for("RTT samples at close", || {
        k.stats(ip).rtt_samples >= 4 * N as u64
    });
    let s = k.stats(ip);
    assert!(s.srtt_sum > 0, "{s:?}");
    let mean_us = s.srtt_sum / s.rtt_samples / 8;
    assert!(mean_us < 200_000, "loopback RTT is small: {mean_us} us");
    assert_eq!(k.stats(other).opened, 0, "outside the prefix");

    // A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6 sockets.
    in_netns(&ns.0, || {
        let l = TcpListener::bind("[::]:7003").expect("bind dual-stack");
        connect_n(&l, SocketAddr::from((ip, 7003)), 3);
    });
    wait_for("dual-stack accepts counted", || {
        k.stats(ip).accepted >= N as u64 + 3
    });
    let s = k.stats(ip);
    assert_eq!(
        (s.opened, s.accepted),
        (N as u64 + 3, N as u64 + 3),
        "{s:?}"
    );

    // Retransmits: drop everything to port 7001 after the handshake.
    in_netns(&ns.0, || {
        let l = TcpListener::bind((ip, 7001)).expect("bind");
        let mut c = TcpStream::connect((ip, 7001)).expect("connect");
        let (mut srv, _) = l.accept().expect("accept");
        run(
            "ip",
            &[
                "netns", "exec", &ns.0, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "7001",
                "-j", "DROP",
            ],
        );
        c.write_all(b"hello").expect("write");
        std::thread::sleep(Duration::from_millis(1500));
        srv.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 8];
        assert!(srv.read(&mut buf).is_err(), "the data was dropped");
    });
    let r = k.stats(ip).retransmits;
    assert!(
        r >= 2,
        "a dropped segment is retransmitted (RTO 200 ms, 1.5 s): {r}"
    );

    // A reload (agent restart) keeps the counts and replaces the links.
    drop(k);
    let links = Path::new(BPFFS)
        .join("weir")
        .join(&node)
        .join("metrics-links");
    assert_eq!(count_links(&links), 2, "links stay pinned");
    let k = KernelMetrics::load(Path::new(BPFFS), &node, &cgroup.dir, Some(cidr))
        .expect("reload metric programs");
    assert_eq!(count_links(&links), 2, "the new links replace the old ones");
    assert_eq!(
        k.stats(ip).opened,
        N as u64 + 4,
        "counts survive the reload"
    );
    in_netns(&ns.0, || {
        let l = TcpListener::bind((ip, 7002)).expect("bind");
        connect_n(&l, SocketAddr::from((ip, 7002)), 5);
    });
    wait_for("more connections", || k.stats(ip).opened >= N as u64 + 9);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        k.stats(ip).opened,
        N as u64 + 9,
        "counted once: the old link is detached"
    );
    k.retain(&[]);
    assert_eq!(k.stats(ip).opened, 0, "retain drops addresses of gone pods");
}
