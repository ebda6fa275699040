//! Root-only test of [`Network`] against the real kernel: a throwaway node
//! netns, two pods, traffic between them, restart adoption, repair and
//! teardown. `ip`, `nsenter` and busybox `ping` are only observers here.
//!
//! Run: `cargo test -p weir-agent --lib net::roottest -- --ignored --nocapture`

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use nix::mount::{MntFlags, umount2};
use nix::sched::{CloneFlags, setns};

use super::*;

fn run(args: &[&str]) -> String {
    // A single ping right after a pod's network comes up can lose its echo
    // to neighbour resolution on a loaded machine: reachability gets a few
    // tries, everything else one.
    let tries = if args.contains(&"ping") { 4 } else { 1 };
    let mut out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    for _ in 1..tries {
        if out.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    }
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn succeeds(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap()
        .status
        .success()
}

/// A node netns with lo, an address and a default route on a stand-in uplink
/// (so 169.254.1.1 is routed off-veth and proxy ARP answers), `ip_forward` on.
/// Dropping it deletes the netns, unmounts the netns dir and removes temp dirs.
struct Node {
    name: String,
    root: PathBuf,
    sleeper: Option<Child>,
}

impl Node {
    fn new() -> Self {
        let name = format!("weirnettest-node-{}", std::process::id());
        let root = std::env::temp_dir().join(&name);
        let node = Node {
            name,
            root,
            sleeper: None,
        };
        let n = node.name.as_str();
        run(&["ip", "netns", "add", n]);
        run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        // No dummy driver on this kernel: a veth whose peer stays in the
        // node netns stands in for the uplink.
        run(&[
            "ip", "-n", n, "link", "add", "uplink0", "mtu", "1450", "type", "veth", "peer", "name",
            "uplink0p", "mtu", "1450",
        ]);
        run(&["ip", "-n", n, "link", "set", "uplink0p", "up"]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            "10.250.99.2/24",
            "dev",
            "uplink0",
        ]);
        run(&["ip", "-n", n, "link", "set", "uplink0", "up"]);
        run(&[
            "ip",
            "-n",
            n,
            "route",
            "add",
            "default",
            "via",
            "10.250.99.1",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            n,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ]);
        node
    }

    fn cfg(&self) -> NodeNetConfig {
        NodeNetConfig {
            node_name: self.name.clone(),
            pod_cidr: "10.244.7.0/24".parse().unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            service_cidr: "10.96.0.0/16".parse().unwrap(),
            state_dir: self.root.join("state"),
            netns_dir: self.root.join("netns"),
        }
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", self.name.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.sleeper.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let netns_dir = self.root.join("netns");
        if let Ok(entries) = fs::read_dir(&netns_dir) {
            for e in entries.flatten() {
                let _ = umount2(&e.path(), MntFlags::MNT_DETACH);
            }
        }
        let _ = umount2(&netns_dir, MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.root);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn nsenter(netns: &Path, args: &[&str]) -> String {
    let net = format!("--net={}", netns.display());
    let mut all = vec!["nsenter", net.as_str()];
    all.extend_from_slice(args);
    run(&all)
}

#[test]
#[ignore = "needs root"]
fn pods_get_working_networks_and_go_away_cleanly() {
    // The machine may carry other routes (e.g. a running weir demo): what
    // matters is that this test's node never changes them.
    let root_routes_before = run(&["ip", "-4", "route", "show"]);
    let mut node = Node::new();
    let node_ns = fs::File::open(format!("/run/netns/{}", node.name)).unwrap();
    // Like main(): enter the node netns on one thread, then start the
    // runtime there (its workers inherit the netns) and block_on from it.
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            setns(node_ns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            exercise(&mut node, &rt)
        })
        .join()
    });
    drop(node);
    let veths = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    // This thread stayed in the machine's root netns, which must be untouched.
    let root_links = run(&["ip", "link", "show"]);
    assert!(
        veths.iter().all(|v| !root_links.contains(v.as_str())),
        "{root_links}"
    );
    // Other suites may change the machine's routes meanwhile; this node's
    // must never show up there, and no guard route may appear or vanish.
    let root_routes = run(&["ip", "-4", "route", "show"]);
    let guards = |r: &str| {
        r.lines()
            .filter(|l| l.starts_with("unreachable"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        guards(&root_routes),
        guards(&root_routes_before),
        "{root_routes}"
    );
    assert!(!root_routes.contains("10.244.7."), "{root_routes}");
}

fn exercise(node: &mut Node, rt: &tokio::runtime::Runtime) -> Vec<String> {
    let cfg = node.cfg();
    let net = rt.block_on(Network::open(cfg.clone())).unwrap();
    let routes = node.ip(&["-4", "route", "show"]);
    assert!(routes.contains("unreachable 10.244.0.0/16"), "{routes}");
    assert!(routes.contains("unreachable 10.96.0.0/16"), "{routes}");
    // Open again: existing unreachable routes are fine.
    drop(net);
    let net = rt.block_on(Network::open(cfg.clone())).unwrap();

    // A mount namespace copied before the pods exist must see their netns
    // files appear and disappear (shared propagation of the netns dir).
    let sleeper = Command::new("unshare")
        .args(["--mount", "--propagation", "unchanged", "sleep", "120"])
        .spawn()
        .unwrap();
    let sleeper_pid = sleeper.id().to_string();
    node.sleeper = Some(sleeper);
    std::thread::sleep(std::time::Duration::from_millis(200));

    let (a, b) = ("pod-a-0000-1111", "pod-b-0000-2222");
    let started = std::time::Instant::now();
    let pa = rt.block_on(net.setup_pod(a)).unwrap();
    println!("first pod set up in {:?}", started.elapsed());
    let pb = rt.block_on(net.setup_pod(b)).unwrap();
    println!("{pa:?}\n{pb:?}");
    assert_ne!(pa.ip, pb.ip);
    assert_eq!(pa.host_veth, host::veth_name(a));
    check_node_side(node, &[&pa, &pb]);
    check_pod_side(&pa);

    // The copied mount namespace sees the netns file as a netns.
    let fstype = run(&[
        "nsenter",
        "-t",
        &sleeper_pid,
        "-m",
        "stat",
        "-f",
        "-c",
        "%T",
        pa.netns_path.to_str().unwrap(),
    ]);
    assert_eq!(fstype.trim(), "nsfs");
    check_traffic(node, &pa, &pb);

    // Idempotent: same answer again, and after an agent "restart".
    assert_eq!(rt.block_on(net.setup_pod(a)).unwrap(), pa);
    assert_eq!(rt.block_on(net.inspect_pod(a)).unwrap(), Some(pa.clone()));
    drop(net);
    let net = rt.block_on(Network::open(cfg.clone())).unwrap();
    assert_eq!(rt.block_on(net.inspect_pod(a)).unwrap(), Some(pa.clone()));
    assert_eq!(rt.block_on(net.inspect_pod(b)).unwrap(), Some(pb.clone()));
    assert_eq!(rt.block_on(net.setup_pod(b)).unwrap(), pb);
    assert_eq!(rt.block_on(net.inspect_pod("never-was")).unwrap(), None);
    assert_eq!(net.known_pods(), vec![a.to_owned(), b.to_owned()]);

    // Repair: the veth deleted behind our back comes back, same IP.
    node.ip(&["link", "del", &pb.host_veth]);
    assert_eq!(rt.block_on(net.inspect_pod(b)).unwrap(), None);
    let pb2 = rt.block_on(net.setup_pod(b)).unwrap();
    assert_eq!(pb2.ip, pb.ip);
    nsenter(
        &pa.netns_path,
        &["busybox", "ping", "-c1", "-W1", &pb.ip.to_string()],
    );

    // Adopt a netns file left by a crash before its bind mount.
    let c = "pod-c-crashed";
    fs::write(cfg.netns_dir.join(c), b"").unwrap();
    let pc = rt.block_on(net.setup_pod(c)).unwrap();
    nsenter(
        &pc.netns_path,
        &["busybox", "ping", "-c1", "-W1", &pa.ip.to_string()],
    );

    // Repair: a foreign eth0 in the pod netns (its peer is not our veth).
    node.ip(&["link", "del", &pc.host_veth]);
    nsenter(
        &pc.netns_path,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "x0",
        ],
    );
    assert_eq!(rt.block_on(net.inspect_pod(c)).unwrap(), None);
    let pc = rt.block_on(net.setup_pod(c)).unwrap();
    let links = nsenter(&pc.netns_path, &["ip", "-o", "link", "show"]);
    assert!(!links.contains("x0"), "{links}");
    nsenter(
        &pc.netns_path,
        &["busybox", "ping", "-c1", "-W1", &pa.ip.to_string()],
    );
    many_pods(rt, &net, &[&pa, &pb, &pc]);

    // Teardown, twice, and check nothing is left.
    for uid in [a, b, c, a, b, c, "never-was"] {
        rt.block_on(net.teardown_pod(uid)).unwrap();
    }
    let links = node.ip(&["link", "show"]);
    assert!(!links.contains("weir"), "{links}");
    let routes = node.ip(&["-4", "route", "show"]);
    assert!(!routes.contains("10.244.7."), "{routes}");
    assert_eq!(fs::read_dir(&cfg.netns_dir).unwrap().count(), 0);
    let ipam = fs::read_to_string(cfg.state_dir.join("ipam.json")).unwrap();
    assert!(ipam.contains("\"leases\": {}"), "{ipam}");
    assert!(net.known_pods().is_empty());
    assert!(!succeeds(&[
        "nsenter",
        "-t",
        &sleeper_pid,
        "-m",
        "test",
        "-e",
        pa.netns_path.to_str().unwrap(),
    ]));
    vec![pa.host_veth, pb.host_veth, pc.host_veth]
}

/// Node side: each veth up with proxy ARP and the uplink's MTU, a /32 route each.
fn check_node_side(node: &Node, pods: &[&PodNet]) {
    let routes = node.ip(&["-4", "route", "show"]);
    println!("node routes:\n{routes}");
    for p in pods {
        let veth = node.ip(&["-d", "link", "show", &p.host_veth]);
        assert!(
            veth.contains("state UP") && veth.contains("mtu 1450"),
            "{veth}"
        );
        assert!(veth.starts_with(&format!("{}:", p.host_ifindex)), "{veth}");
        let proxy_arp = run(&[
            "ip",
            "netns",
            "exec",
            &node.name,
            "cat",
            &format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", p.host_veth),
        ]);
        assert_eq!(proxy_arp.trim(), "1");
        let line = routes
            .lines()
            .find(|l| l.starts_with(&format!("{} dev {} ", p.ip, p.host_veth)))
            .unwrap_or_else(|| panic!("no /32 route for {p:?}: {routes}"));
        assert!(line.contains("scope link"), "{line}");
    }
}

/// Pod side: lo up, eth0 up with the /32 and the uplink's MTU, gateway routes.
fn check_pod_side(pod: &PodNet) {
    let addrs = nsenter(&pod.netns_path, &["ip", "-4", "addr", "show"]);
    println!("pod addrs:\n{addrs}");
    assert!(addrs.contains("127.0.0.1/8"), "lo not up: {addrs}");
    assert!(addrs.contains(&format!("inet {}/32", pod.ip)), "{addrs}");
    let links = nsenter(&pod.netns_path, &["ip", "link", "show", "eth0"]);
    assert!(
        links.contains("mtu 1450") && links.contains("state UP"),
        "{links}"
    );
    let proutes = nsenter(&pod.netns_path, &["ip", "-4", "route", "show"]);
    println!("pod routes:\n{proutes}");
    let has = |start: &str, flag: &str| {
        proutes
            .lines()
            .any(|l| l.starts_with(start) && l.contains(flag))
    };
    assert!(
        has("default via 169.254.1.1 dev eth0 ", "onlink"),
        "{proutes}"
    );
    assert!(has("169.254.1.1 dev eth0 ", "scope link"), "{proutes}");
}

/// Node → pod, pod → pod both ways, pod → node; other nodes' ranges unreachable.
fn check_traffic(node: &Node, pa: &PodNet, pb: &PodNet) {
    let (ip_a, ip_b) = (pa.ip.to_string(), pb.ip.to_string());
    run(&[
        "ip", "netns", "exec", &node.name, "busybox", "ping", "-c1", "-W1", &ip_a,
    ]);
    nsenter(&pa.netns_path, &["busybox", "ping", "-c1", "-W1", &ip_b]);
    nsenter(&pb.netns_path, &["busybox", "ping", "-c1", "-W1", &ip_a]);
    nsenter(
        &pa.netns_path,
        &["busybox", "ping", "-c1", "-W1", "10.250.99.2"],
    );
    // Other nodes' pod ranges and services are unreachable, not forwarded.
    assert!(!succeeds(&[
        "nsenter",
        &format!("--net={}", pa.netns_path.display()),
        "busybox",
        "ping",
        "-c1",
        "-W1",
        "10.244.9.9",
    ]));
}

/// Many pods at once: distinct addresses, all reachable, all torn down.
fn many_pods(rt: &tokio::runtime::Runtime, net: &Network, others: &[&PodNet]) {
    let many: Vec<String> = (0..16).map(|i| format!("pod-many-{i}")).collect();
    let started = std::time::Instant::now();
    let nets = rt
        .block_on(futures::future::try_join_all(
            many.iter().map(|u| net.setup_pod(u)),
        ))
        .unwrap();
    println!(
        "{} pods set up concurrently in {:?}",
        nets.len(),
        started.elapsed()
    );
    let ips: std::collections::HashSet<_> = nets.iter().map(|p| p.ip).collect();
    assert_eq!(ips.len(), many.len());
    assert!(others.iter().all(|o| !ips.contains(&o.ip)));
    for p in &nets {
        nsenter(
            &others[0].netns_path,
            &["busybox", "ping", "-c1", "-W1", &p.ip.to_string()],
        );
    }
    let started = std::time::Instant::now();
    rt.block_on(futures::future::try_join_all(
        many.iter().map(|u| net.teardown_pod(u)),
    ))
    .unwrap();
    println!(
        "{} pods torn down concurrently in {:?}",
        many.len(),
        started.elapsed()
    );
}
