//! `NodePort` services end to end: weir-control allocating the service,
//! three weir-agents programming the TC `NodePort` programs on their uplink
//! (`eth0` of each node netns) with per-service Maglev tables, and a client
//! in its own network namespace on the cluster's bridge calling
//! `<node IP>:<nodePort>` over TCP (curl, as an observer) and UDP.
//! busybox httpd backends answer their pod name; the UDP backends are
//! sockets the test binds inside each pod's netns. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use weir_tests::api::{Api, condition_status, uid};
use weir_tests::{ControlCluster, sh, sh_quiet, udp_bind_in, wait_for};

const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
const START: Duration = Duration::from_secs(90);
const PROGRAMMED: Duration = Duration::from_secs(20);
const TAG: &str = "np";
const SUBNET: u8 = 58;
const TCP_NODE_PORT: u16 = 31_080;
const UDP_NODE_PORT: u16 = 31_053;
const UDP_PORT: u16 = 5353;
/// Requests per node in a spread check.
const N: usize = 15;

/// Three httpd pods answering their name: two on node 1, one on node 2,
/// none on node 3.
fn web_pods(nodes: &[String]) -> String {
    [("web-1", 0), ("web-2", 0), ("web-3", 1)]
        .iter()
        .map(|(name, n)| {
            format!(
                r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: npweb}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: busybox
    command: ["sh", "-c", "mkdir -p /srv && hostname > /srv/index.html && exec httpd -f -p 8080 -h /srv"]
    ports:
    - {{name: http, containerPort: 8080}}
"#,
                node = nodes[*n]
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn web_svc(policy: &str) -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata:
  name: npweb
spec:
  type: NodePort
  externalTrafficPolicy: {policy}
  selector: {{app: npweb}}
  ports:
  - {{name: http, port: 80, targetPort: http, nodePort: {TCP_NODE_PORT}, protocol: TCP}}
  - {{name: echo, port: 53, targetPort: {UDP_PORT}, nodePort: {UDP_NODE_PORT}, protocol: UDP}}
"
    )
}

/// The client: a netns with a veth on the cluster's bridge; removed on drop.
struct ClientNs {
    name: String,
    host_if: String,
}

impl ClientNs {
    fn new(bridge: &str, ip: Ipv4Addr) -> anyhow::Result<Self> {
        let me = Self {
            name: format!("wt{TAG}-client"),
            host_if: format!("wt{TAG}cv"),
        };
        me.cleanup();
        sh("ip", &["netns", "add", &me.name])?;
        sh(
            "ip",
            &[
                "link",
                "add",
                &me.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &me.name,
            ],
        )?;
        sh("ip", &["link", "set", &me.host_if, "master", bridge, "up"])?;
        let n = |args: &[&str]| {
            let mut all = vec!["-n", me.name.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all)
        };
        n(&["link", "set", "lo", "up"])?;
        n(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        n(&["link", "set", "eth0", "up"])?;
        // No TIME_WAIT in the client: a fixed source port can connect again
        // at once (the same 5-tuple, which must land on the same backend).
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &me.name,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_max_tw_buckets=0",
            ],
        )?;
        Ok(me)
    }

    fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    fn cleanup(&self) {
        sh_quiet("ip", &["netns", "del", &self.name]);
        sh_quiet("ip", &["link", "del", &self.host_if]);
    }

    /// An HTTP GET by curl in the client netns (from `local_port` if
    /// given): the body, or why it failed, and how long it took.
    fn get(&self, to: SocketAddr, local_port: Option<u16>) -> (Result<String, String>, Duration) {
        let url = format!("http://{to}/");
        let port = local_port.map(|p| p.to_string());
        let mut args = vec![
            "netns",
            "exec",
            self.name.as_str(),
            "curl",
            "-sS",
            "--connect-timeout",
            "2",
            "--max-time",
            "4",
        ];
        if let Some(p) = &port {
            args.extend(["--local-port", p.as_str()]);
        }
        args.push(&url);
        let started = Instant::now();
        let r = match Command::new("ip").args(&args).output() {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        (r, started.elapsed())
    }

    /// One UDP exchange with `to`: the backend that answered, the source
    /// address it saw, and where the answer came from.
    fn udp(&self, to: SocketAddr) -> anyhow::Result<(String, Ipv4Addr, SocketAddr)> {
        let sock = udp_bind_in(&self.path(), "0.0.0.0:0".parse()?)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send_to(b"who", to)?;
        let mut buf = [0u8; 256];
        let (n, from) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("no UDP answer from {to}"))?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (name, saw) = text
            .split_once(' ')
            .with_context(|| format!("odd UDP answer {text:?}"))?;
        Ok((name.to_owned(), saw.parse()?, from))
    }
}

impl Drop for ClientNs {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// UDP servers in the pods' netns answering their pod name and the source
/// address they saw; stopped on drop.
struct UdpServers(Arc<AtomicBool>);

impl UdpServers {
    fn start(servers: Vec<(String, UdpSocket)>) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        for (name, sock) in servers {
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(format!("{name} {}", from.ip()).as_bytes(), from);
                    }
                }
            });
        }
        Ok(Self(stop))
    }
}

impl Drop for UdpServers {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn running_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && condition_status(p, "Ready") == "True"
        && p["status"]["podIP"].is_string()
}

struct Setup {
    /// Node IPs by node index.
    ips: Vec<Ipv4Addr>,
    /// Pod name → node index.
    placement: BTreeMap<String, usize>,
    /// The client's address.
    client: Ipv4Addr,
}

fn answers_from(
    client: &ClientNs,
    ip: Ipv4Addr,
    n: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let (r, _) = client.get(SocketAddr::from((ip, TCP_NODE_PORT)), None);
        let body = r.map_err(|e| anyhow::anyhow!("GET {ip}:{TCP_NODE_PORT}: {e}"))?;
        *seen.entry(body).or_insert(0) += 1;
    }
    Ok(seen)
}

fn cluster_policy(s: &Setup, client: &ClientNs) -> anyhow::Result<()> {
    let all: BTreeSet<String> = s.placement.keys().cloned().collect();
    // Programmed on every node (node 3 has no backend of its own).
    for ip in &s.ips {
        wait_for(&format!("{ip}:{TCP_NODE_PORT} answers"), PROGRAMMED, || {
            client
                .get(SocketAddr::from((*ip, TCP_NODE_PORT)), None)
                .0
                .ok()
        })?;
    }
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for ip in &s.ips {
        let seen = answers_from(client, *ip, N)?;
        eprintln!("Cluster: {ip}:{TCP_NODE_PORT} → {seen:?}");
        for (b, k) in seen {
            ensure!(all.contains(&b), "unknown backend answered: {b:?}");
            *total.entry(b).or_insert(0) += k;
        }
    }
    ensure!(
        total.len() == all.len(),
        "requests not spread over every backend: {total:?}"
    );
    // A fixed source port (same 5-tuple) always lands on the same backend.
    for (i, ip) in s.ips.iter().enumerate() {
        // Below the ephemeral range, so no random earlier connection holds it.
        let port = 20_000 + u16::try_from(i)?;
        let mut seen = BTreeSet::new();
        for _ in 0..5 {
            let (r, _) = client.get(SocketAddr::from((*ip, TCP_NODE_PORT)), Some(port));
            seen.insert(r.map_err(|e| anyhow::anyhow!("GET from port {port}: {e}"))?);
        }
        ensure!(
            seen.len() == 1,
            "source port {port} to {ip} landed on {seen:?}"
        );
    }
    // UDP: the reply comes from <node IP>:<nodePort>; a backend on
    // another node sees the node (SNAT), one on the same node the client.
    for (i, ip) in s.ips.iter().enumerate() {
        let to = SocketAddr::from((*ip, UDP_NODE_PORT));
        let mut names = BTreeSet::new();
        for _ in 0..6 {
            let (name, saw, from) = client.udp(to)?;
            ensure!(from == to, "UDP reply from {from}, not {to}");
            let Some(at) = s.placement.get(&name) else {
                bail!("unknown UDP backend {name:?}");
            };
            let want = if *at == i { s.client } else { *ip };
            ensure!(
                saw == want,
                "{name} (node {at}) saw {saw}, not {want}, via {to}"
            );
            names.insert(name);
        }
        eprintln!("Cluster UDP {to} → {names:?}");
    }
    Ok(())
}

fn local_policy(s: &Setup, client: &ClientNs) -> anyhow::Result<()> {
    let local = |n: usize| -> BTreeSet<String> {
        s.placement
            .iter()
            .filter(|(_, i)| **i == n)
            .map(|(p, _)| p.clone())
            .collect()
    };
    // Node 3 has no local backend: Local drops, the connect times out.
    let empty = s.ips[2];
    wait_for(
        &format!("{empty}:{TCP_NODE_PORT} to stop answering"),
        PROGRAMMED,
        || {
            client
                .get(SocketAddr::from((empty, TCP_NODE_PORT)), None)
                .0
                .err()
        },
    )?;
    for (i, ip) in s.ips.iter().enumerate().take(2) {
        let want = local(i);
        // Remote answers may linger until every node has the new policy.
        wait_for(&format!("{ip} answering only {want:?}"), PROGRAMMED, || {
            answers_from(client, *ip, 6)
                .ok()
                .filter(|seen| seen.keys().all(|b| want.contains(b)))
        })?;
        let seen = answers_from(client, *ip, N)?;
        eprintln!("Local: {ip}:{TCP_NODE_PORT} → {seen:?}");
        ensure!(
            seen.keys().all(|b| want.contains(b)),
            "{ip} answered from non-local backends: {seen:?} (local: {want:?})"
        );
        if want.len() > 1 {
            ensure!(
                seen.len() == want.len(),
                "not spread over local backends: {seen:?}"
            );
        }
        let to = SocketAddr::from((*ip, UDP_NODE_PORT));
        let (name, saw, from) = client.udp(to)?;
        ensure!(
            from == to && want.contains(&name) && saw == s.client,
            "UDP {to}: {name} (saw {saw}, want the client {}) from {from}",
            s.client
        );
    }
    let (r, took) = client.get(SocketAddr::from((empty, TCP_NODE_PORT)), None);
    ensure!(r.is_err(), "node without local pods answered: {r:?}");
    ensure!(
        took < Duration::from_secs(5),
        "node without local pods took {took:?} to fail"
    );
    Ok(())
}

#[test]
fn node_port_services_balance_with_maglev() -> anyhow::Result<()> {
    let mut c = ControlCluster::new(TAG, SUBNET, 3, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let nodes = c.node_names();
    api.wait_nodes_ready(&nodes)?;
    let client_ip = Ipv4Addr::new(10, 250, SUBNET, 200);
    let client = ClientNs::new(&format!("wt{TAG}br"), client_ip)?;
    c.weirctl_apply(&web_pods(&nodes))?;
    let pods = wait_for("3 web pods Running and Ready", START, || {
        let pods = api.pods("app=npweb").ok()?;
        (pods.len() == 3 && pods.iter().all(running_ready)).then_some(pods)
    })?;
    let mut placement = BTreeMap::new();
    let mut udp = Vec::new();
    for p in &pods {
        let name = p["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
        let i = nodes
            .iter()
            .position(|n| n == node)
            .with_context(|| format!("{name} on unknown node {node}"))?;
        let netns = c.cluster.nodes[i].pod_netns(&uid(p));
        udp.push((
            name.clone(),
            udp_bind_in(&netns, SocketAddr::from(([0, 0, 0, 0], UDP_PORT)))?,
        ));
        placement.insert(name, i);
    }
    let _udp = UdpServers::start(udp)?;
    let setup = Setup {
        ips: c.cluster.nodes.iter().map(|n| n.ip).collect(),
        placement,
        client: client_ip,
    };
    c.weirctl_apply(&web_svc("Cluster"))?;
    let t = Instant::now();
    if let Err(e) = cluster_policy(&setup, &client) {
        dump(&c);
        bail!("externalTrafficPolicy Cluster: {e:#}");
    }
    eprintln!("Cluster policy checked in {:?}", t.elapsed());
    c.weirctl_apply(&web_svc("Local"))?;
    let t = Instant::now();
    if let Err(e) = local_policy(&setup, &client) {
        dump(&c);
        bail!("externalTrafficPolicy Local: {e:#}");
    }
    eprintln!("Local policy checked in {:?}", t.elapsed());
    let t = Instant::now();
    if let Err(e) = agent_down_keeps_serving(&mut c, &setup, &client) {
        dump(&c);
        bail!("agent down: {e:#}");
    }
    eprintln!("agent down, NodePort kept serving: {:?}", t.elapsed());
    let t = Instant::now();
    if let Err(e) = udp_flow_leaves_a_deleted_backend(&api, &setup, &client) {
        dump(&c);
        bail!("UDP flow to a deleted backend: {e:#}");
    }
    eprintln!(
        "a UDP flow to a deleted backend is re-balanced: {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    if let Err(e) = delete_empties_the_maps(&c, &api, &setup, &client) {
        dump(&c);
        bail!("service delete: {e:#}");
    }
    eprintln!(
        "service delete empties the NodePort maps: {:?}",
        t.elapsed()
    );
    Ok(())
}

/// With node 1's agent killed (`SIGKILL`), its pinned programs and maps keep
/// serving; the restarted agent adopts its links (same ids, no second link).
fn agent_down_keeps_serving(
    c: &mut ControlCluster,
    s: &Setup,
    client: &ClientNs,
) -> anyhow::Result<()> {
    let to = SocketAddr::from((s.ips[0], TCP_NODE_PORT));
    let node1 = c.cluster.nodes[0].name.clone();
    let links = || tc_link_ids(&node1);
    let before = links()?;
    let attached = |c: &ControlCluster| {
        c.cluster.nodes[0]
            .agent_log_text()
            .matches("NodePort programs attached")
            .count()
    };
    let attached_before = attached(c);
    ensure!(
        before.len() == 2,
        "two NodePort links on node 1: {before:?}"
    );
    c.node(0).kill_agent();
    for _ in 0..10 {
        let (r, _) = client.get(to, None);
        r.map_err(|e| anyhow::anyhow!("{to} with the agent down: {e}"))?;
    }
    c.start_agent(0)?;
    // The log is appended to: one more attach line is the new agent's.
    wait_for("node 1's agent to re-program", PROGRAMMED, || {
        (attached(c) > attached_before).then_some(())
    })?;
    let (r, _) = client.get(to, None);
    r.map_err(|e| anyhow::anyhow!("{to} after the agent restart: {e}"))?;
    let after = links()?;
    ensure!(before == after, "links not adopted: {before:?} → {after:?}");
    Ok(())
}

/// A UDP client (one socket, so one 5-tuple and one flow) pinned to a
/// backend whose pod is then deleted is balanced afresh on its next
/// datagram, as kube-proxy clears the conntrack of UDP flows to removed
/// endpoints; it is not black-holed towards the gone pod. (Local policy
/// on node 1: its two pods are the backends.)
fn udp_flow_leaves_a_deleted_backend(
    api: &Api,
    s: &Setup,
    client: &ClientNs,
) -> anyhow::Result<()> {
    let to = SocketAddr::from((s.ips[0], UDP_NODE_PORT));
    let sock = udp_bind_in(&client.path(), "0.0.0.0:0".parse()?)?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let ask = || -> anyhow::Result<String> {
        sock.send_to(b"who", to)?;
        let mut buf = [0u8; 256];
        let n = sock
            .recv(&mut buf)
            .with_context(|| format!("no UDP answer from {to}"))?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        Ok(text.split(' ').next().unwrap_or_default().to_owned())
    };
    let first = wait_for("a UDP answer", PROGRAMMED, || ask().ok())?;
    for _ in 0..3 {
        let again = ask()?;
        ensure!(again == first, "one flow answered by {first} then {again}");
    }
    ensure!(
        s.placement.get(&first) == Some(&0),
        "Local on node 1 answered by {first} of another node"
    );
    api.delete("Pod", "default", &first)?;
    wait_for(&format!("pod {first} gone"), START, || {
        api.not_found("Pod", "default", &first).then_some(())
    })?;
    let next = wait_for(
        "the same UDP flow answered by a live backend",
        PROGRAMMED,
        || ask().ok(),
    )?;
    ensure!(next != first, "answered by the deleted {first}");
    ensure!(
        s.placement.get(&next) == Some(&0),
        "Local on node 1 answered by {next} of another node"
    );
    Ok(())
}

/// The ids of node `node`'s pinned `NodePort` TCX links (`bpftool link
/// show pinned`, as an observer).
fn tc_link_ids(node: &str) -> anyhow::Result<Vec<u64>> {
    ["weir_np_ingress", "weir_np_egress"]
        .iter()
        .map(|prog| {
            let pin = format!("/sys/fs/bpf/weir/{node}/np-links/{prog}");
            let out = sh("bpftool", &["-j", "link", "show", "pinned", &pin])?;
            let v: Value =
                serde_json::from_str(&out).with_context(|| format!("bpftool said {out}"))?;
            v["id"]
                .as_u64()
                .with_context(|| format!("no link id in {out}"))
        })
        .collect()
}

/// Deleting the Service empties every node's `NodePort` maps and the
/// nodePort stops answering.
fn delete_empties_the_maps(
    c: &ControlCluster,
    api: &Api,
    s: &Setup,
    client: &ClientNs,
) -> anyhow::Result<()> {
    api.delete("Service", "default", "npweb")?;
    for n in &c.cluster.nodes {
        for map in ["weir_np_svc_v1", "weir_maglev_v1"] {
            wait_for(&format!("{map} of {} empty", n.name), PROGRAMMED, || {
                n.lb_map(map).ok().filter(Vec::is_empty)
            })?;
        }
    }
    let (r, _) = client.get(SocketAddr::from((s.ips[0], TCP_NODE_PORT)), None);
    ensure!(r.is_err(), "a deleted NodePort still answers: {r:?}");
    Ok(())
}

/// What the agents said about `NodePort`, for a failure's diagnosis.
fn dump(c: &ControlCluster) {
    for n in &c.cluster.nodes {
        let log = n.agent_log_text();
        let _ = std::fs::write(format!("/tmp/weir-{TAG}-{}.log", n.name), &log);
        let lines: Vec<&str> = log.lines().collect();
        // The first NodePort error in full (a verifier log spans lines),
        // then the last NodePort lines.
        let first = lines
            .iter()
            .position(|l| l.contains("NodePort") && l.contains("ERROR"));
        let head = first.map_or(&[][..], |i| &lines[i..(i + 80).min(lines.len())]);
        let tail: Vec<&str> = lines
            .iter()
            .filter(|l| l.contains("NodePort"))
            .copied()
            .collect();
        eprintln!(
            "--- {} ---\n{}\n...\n{}",
            n.name,
            head.join("\n"),
            tail[tail.len().saturating_sub(5)..].join("\n")
        );
    }
}
