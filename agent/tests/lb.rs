//! Root test on the real kernel: the socket-level service balancer between
//! network namespaces made here (a client, an outsider, two backends with
//! TCP and UDP servers on threads), attached through `weir_agent::lb` to a
//! cgroup v2 directory of its own that this test process joins.
//!
//! VIPs are from 10.96.0.0/16, which sits behind an `unreachable` route in
//! every namespace: a missed translation fails, it never leaves.

use std::{
    fs::File,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use weir_agent::lb::{self, Options, Protocol, ServiceSpec};

const BPFFS: &str = "/sys/fs/bpf";
const CGROUP2: &str = "/sys/fs/cgroup/unified";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces, deleted on drop.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
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

/// The node's balancer pins, removed on drop.
struct Pins(String);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = lb::Dataplane::remove(Path::new(BPFFS), &self.0) {
            eprintln!("remove balancer pins: {e}");
        }
        let _ = std::fs::remove_dir_all(Path::new(BPFFS).join("weir").join(&self.0));
    }
}

/// Server threads, stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
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

fn spawn_in(ns: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    let file = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f();
    })
}

/// TCP server: says its name, then echoes lines. UDP server: answers its name.
fn start_servers(ns: &str, name: &'static str, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let st = stop.clone();
    let tcp = spawn_in(ns, move || {
        let l = TcpListener::bind("0.0.0.0:8080").expect("bind tcp");
        l.set_nonblocking(true).expect("nonblocking");
        tx.send(()).expect("ready");
        while !st.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut c, _)) => {
                    let st = st.clone();
                    std::thread::spawn(move || {
                        c.set_nonblocking(false).ok();
                        c.set_read_timeout(Some(Duration::from_millis(200))).ok();
                        let _ = c.write_all(format!("{name}\n").as_bytes());
                        let mut r = BufReader::new(c.try_clone().expect("clone"));
                        let mut line = String::new();
                        while !st.load(Ordering::SeqCst) {
                            match r.read_line(&mut line) {
                                Ok(0) => break,
                                Ok(_) => {
                                    let _ = c.write_all(line.as_bytes());
                                    line.clear();
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        ErrorKind::WouldBlock | ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let (utx, urx) = std::sync::mpsc::channel();
    let st = stop.clone();
    let udp = spawn_in(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:5353").expect("bind udp");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        utx.send(()).expect("ready");
        let mut buf = [0u8; 64];
        while !st.load(Ordering::SeqCst) {
            if let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(name.as_bytes(), from);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("tcp server ready");
    urx.recv_timeout(Duration::from_secs(5))
        .expect("udp server ready");
    vec![tcp, udp]
}

fn tcp_name(addr: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    let c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(c.try_clone()?).read_line(&mut line)?;
    Ok((line.trim().to_owned(), c))
}

fn echo(c: &TcpStream, msg: &str) -> std::io::Result<String> {
    (&*c).write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(c.try_clone()?).read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario over one shared setup")]
fn socket_level_service_balancing() {
    let uniq = format!("wlb{}", std::process::id() % 1_000_000);
    let (c, x, b1, b2) = (
        format!("{uniq}c"),
        format!("{uniq}x"),
        format!("{uniq}b1"),
        format!("{uniq}b2"),
    );
    let _netns = Netns(vec![c.clone(), x.clone(), b1.clone(), b2.clone()]);
    for n in [&c, &x, &b1, &b2] {
        ip(&["netns", "add", n]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "route", "add", "unreachable", "10.96.0.0/16"]);
    }
    // client c ↔ b1 (10.250.1.0/24), c ↔ b2 (10.250.2.0/24), outsider x ↔ b1 (10.250.3.0/24).
    for (a, b, net) in [(&c, &b1, 1), (&c, &b2, 2), (&x, &b1, 3)] {
        let (va, vb) = (format!("v{net}a"), format!("v{net}b"));
        ip(&[
            "-n", a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", b,
        ]);
        ip(&[
            "-n",
            a,
            "addr",
            "add",
            &format!("10.250.{net}.1/24"),
            "dev",
            &va,
        ]);
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("10.250.{net}.2/24"),
            "dev",
            &vb,
        ]);
        ip(&["-n", a, "link", "set", &va, "up"]);
        ip(&["-n", b, "link", "set", &vb, "up"]);
    }
    // The outsider can reach b1's backend address, so a translation would show.
    ip(&[
        "-n",
        &x,
        "route",
        "add",
        "10.250.1.0/24",
        "via",
        "10.250.3.2",
    ]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut servers = Servers {
        stop: stop.clone(),
        threads: Vec::new(),
    };
    servers.threads.extend(start_servers(&b1, "b1", &stop));
    servers.threads.extend(start_servers(&b2, "b2", &stop));

    let cgroup = Cgroup::join(&format!("weir-lbtest-{uniq}"));
    let node = format!("lbtest-{uniq}");
    let _pins = Pins(node.clone());
    let opts = Options {
        cgroup: cgroup.dir.clone(),
        netns_filter: true,
    };
    let dp = lb::Dataplane::load(Path::new(BPFFS), &node, &opts).expect("load balancer");
    let host = Options::host_root(Path::new("/sys/fs/cgroup")).expect("a cgroup v2 hierarchy");
    assert!(cgroup.dir.starts_with(&host.cgroup) && host.netns_filter);
    let c_cookie = lb::netns_cookie(Path::new(&format!("/var/run/netns/{c}"))).expect("cookie");
    dp.allow_netns(c_cookie).expect("allow client netns");

    let vip = Ipv4Addr::new(10, 96, 77, 10);
    let be1 = Ipv4Addr::new(10, 250, 1, 2);
    let be2 = Ipv4Addr::new(10, 250, 2, 2);
    let svc = |port, proto, backends: Vec<(Ipv4Addr, u16)>, affinity| ServiceSpec {
        vip,
        port,
        proto,
        backends,
        affinity,
    };
    let mut desired = vec![
        svc(80, Protocol::Tcp, vec![(be1, 8080), (be2, 8080)], None),
        svc(53, Protocol::Udp, vec![(be1, 5353), (be2, 5353)], None),
        svc(81, Protocol::Tcp, vec![], None),
        svc(
            82,
            Protocol::Tcp,
            vec![(be1, 8080), (be2, 8080)],
            Some(Duration::from_mins(1)),
        ),
    ];
    let stats = dp.sync(&desired).expect("sync");
    assert_eq!(stats.services, 4);
    assert_eq!(
        dp.sync(&desired).expect("resync").writes,
        0,
        "a resync writes nothing"
    );
    let at = |port| SocketAddr::V4(SocketAddrV4::new(vip, port));

    // The agent's metrics: the sync histogram and the map sizes, read
    // from the pinned maps.
    weir_agent::http::observe_lb_sync(dp.pin_dir(), Duration::from_millis(3));
    let metrics = weir_agent::http::render_lb(&node);
    assert!(
        metrics.contains("weir_lb_sync_duration_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("weir_lb_services{{node=\"{node}\"}} 4")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "weir_lb_map_entries{{node=\"{node}\",map=\"weir_svc_slots_v1\"}} 6"
        )),
        "{metrics}"
    );

    // TCP spreads over both backends; the peer shows the VIP.
    let seen = in_netns(&c, || {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let (name, conn) = tcp_name(at(80)).expect("connect to VIP:80");
            assert_eq!(
                conn.peer_addr().expect("getpeername"),
                at(80),
                "getpeername shows the VIP"
            );
            seen.insert(name);
        }
        seen
    });
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["b1", "b2"]);

    // UDP, unconnected: replies come from the VIP; connected: peer is the VIP.
    let seen = in_netns(&c, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut seen = std::collections::BTreeSet::new();
        let mut buf = [0u8; 64];
        for _ in 0..30 {
            s.send_to(b"hi", at(53)).expect("sendmsg to VIP");
            let (n, from) = s.recv_from(&mut buf).expect("reply");
            assert_eq!(from, at(53), "recvmsg shows the VIP as the source");
            seen.insert(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let cs = UdpSocket::bind("0.0.0.0:0").expect("bind");
        cs.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        cs.connect(at(53)).expect("connect udp");
        assert_eq!(cs.peer_addr().expect("getpeername"), at(53));
        cs.send(b"hi").expect("send");
        let n = cs.recv(&mut buf).expect("connected reply");
        assert!(n > 0);
        seen
    });
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["b1", "b2"]);

    // No backends: refused at once.
    in_netns(&c, || {
        let t = Instant::now();
        let err = TcpStream::connect_timeout(&at(81), Duration::from_secs(3)).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "took {:?}",
            t.elapsed()
        );
    });

    // ClientIP affinity: one backend for all connections.
    let names = in_netns(&c, || {
        (0..15)
            .map(|_| tcp_name(at(82)).expect("connect to VIP:82").0)
            .collect::<std::collections::BTreeSet<_>>()
    });
    assert_eq!(names.len(), 1, "affinity kept one backend: {names:?}");

    // An outsider netns (not in the node's set) is not translated.
    in_netns(&x, || {
        let r = TcpStream::connect_timeout(&at(80), Duration::from_secs(2));
        let err = r.expect_err("the outsider's connect to the VIP was translated");
        assert_eq!(
            err.kind(),
            ErrorKind::HostUnreachable,
            "not the VIP's unreachable route: {err}"
        );
    });

    // Agent restart: the balancer keeps working with no agent, and a new
    // one adopts the pinned links (no second program on the cgroup).
    drop(dp);
    let name = in_netns(&c, || tcp_name(at(80)).expect("connect with no agent").0);
    assert!(name == "b1" || name == "b2");

    // With no agent, `inspect` shows the table from the pinned maps.
    let snap = lb::inspect::read(Path::new(BPFFS), &node).expect("inspect pinned maps");
    assert_eq!(snap.services.len(), desired.len());
    let web = snap
        .services
        .iter()
        .find(|s| s.vip == vip && s.port == 80 && s.protocol == "TCP")
        .expect("VIP:80/TCP in the table");
    let mut got: Vec<(Ipv4Addr, u16)> = web.backends.iter().map(|b| (b.ip, b.port)).collect();
    got.sort_unstable();
    assert_eq!(got, desired[0].backends);
    assert_eq!((web.count, web.missing_slots), (2, 0));
    let sticky = snap.services.iter().find(|s| s.port == 82).expect("VIP:82");
    assert_eq!(sticky.affinity_timeout_seconds, Some(60));
    assert!(
        sticky.affinity_clients >= 1,
        "the client's affinity entry shows"
    );
    assert!(snap.map_entries["weir_sock_rev_v1"] >= 1);
    let table = lb::inspect::run(
        ["inspect", "services", "--node", &node]
            .into_iter()
            .map(Into::into),
    )
    .expect("inspect services");
    assert!(
        table.contains("10.96.77.10:81/TCP") && table.contains("<none: refused>"),
        "{table}"
    );
    let dp = lb::Dataplane::load(Path::new(BPFFS), &node, &opts).expect("reload balancer");
    let attached = Command::new("bpftool")
        .args(["cgroup", "show", cgroup.dir.to_str().expect("utf-8")])
        .output()
        .expect("bpftool");
    let listing = String::from_utf8_lossy(&attached.stdout);
    assert_eq!(
        listing.matches("connect4").count(),
        1,
        "one connect4 program after adoption:\n{listing}"
    );
    // The adopted balancer's mirror is what the pins hold, and a full
    // resync against it writes nothing.
    assert_eq!(dp.mirror(), dp.current(), "mirror read from the pins");
    assert_eq!(dp.sync(&desired).expect("sync after adopt").writes, 0);

    // Remove a backend (incrementally, as the agent does for one event):
    // only those services' entries are written, an existing connection
    // keeps working, new ones avoid it.
    let (old, conn) = in_netns(&c, || tcp_name(at(80)).expect("connect"));
    let (gone, survivor) = if old == "b1" {
        (be1, "b2")
    } else {
        (be2, "b1")
    };
    desired[0].backends.retain(|(i, _)| *i != gone);
    desired[3].backends.retain(|(i, _)| *i != gone);
    let before = dp.current();
    let stats = dp
        .sync_changes(&[
            lb::Change::Put(desired[0].clone()),
            lb::Change::Put(desired[3].clone()),
        ])
        .expect("sync without one backend");
    assert!(stats.writes > 0);
    let after = dp.current();
    assert_eq!(dp.mirror(), after, "mirror and kernel agree");
    for untouched in [&desired[1], &desired[2]] {
        let v = before.svcs[&untouched.key()];
        assert_eq!(after.svcs[&untouched.key()], v);
        for slot in 0..v.count {
            let k = weir_common::SlotKey { id: v.id, slot };
            assert_eq!(after.slots[&k], before.slots[&k]);
            assert_eq!(
                after.backends[&after.slots[&k]],
                before.backends[&before.slots[&k]]
            );
        }
    }
    assert_eq!(
        dp.sync(&desired).expect("full resync").writes,
        0,
        "the incremental result is what a full sync plans"
    );
    in_netns(&c, || {
        for _ in 0..15 {
            assert_eq!(tcp_name(at(80)).expect("connect").0, survivor);
        }
        assert_eq!(echo(&conn, "still").expect("old connection"), "still");
    });

    // A sequence of changes: remove, add, change; mirror and kernel agree
    // after each, and a restarted balancer's full resync writes nothing.
    let steps = [
        lb::Change::Remove(desired[2].key()),
        lb::Change::Put(svc(83, Protocol::Tcp, vec![(be1, 8080)], None)),
        lb::Change::Put(svc(53, Protocol::Udp, vec![(be2, 5353)], None)),
        lb::Change::Put(svc(81, Protocol::Tcp, vec![(be2, 8080), (be1, 8080)], None)),
    ];
    for step in &steps {
        dp.sync_changes(std::slice::from_ref(step)).expect("change");
        assert_eq!(dp.mirror(), dp.current(), "after {step:?}");
        match step {
            lb::Change::Put(s) => {
                desired.retain(|d| d.key() != s.key());
                desired.push(s.clone());
            }
            lb::Change::Remove(k) => desired.retain(|d| d.key() != *k),
        }
    }
    let name = in_netns(&c, || {
        tcp_name(at(83)).expect("connect to the added VIP:83").0
    });
    assert_eq!(name, "b1");
    drop(dp);
    let dp = lb::Dataplane::load(Path::new(BPFFS), &node, &opts).expect("reload balancer");
    assert_eq!(dp.mirror(), dp.current());
    assert_eq!(dp.sync(&desired).expect("resync after restart").writes, 0);
    assert_eq!(dp.current().svcs.len(), desired.len());
    drop(dp);
    drop(servers);
}
