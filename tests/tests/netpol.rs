//! `NetworkPolicy` enforced end to end on a real weir cluster: weir-control
//! and two weir-agents in control mode, the upstream Kubernetes
//! `test/e2e/network/netpol` layout (namespaces x, y, z × pods a, b, c,
//! busybox httpd on ports 80 and 81, the test's UDP echo servers on 80
//! and 81, spread over both nodes) and the full 9×9 reachability matrix
//! (TCP, and UDP where the upstream case does) probed from inside each
//! pod's network namespace, checked against each case's expected matrix
//! (written as upstream writes them: a rule per (from, to), loopback
//! always allowed). The cases are upstream's `network_policy.go` ones by
//! name (SCTP ones: weir refuses SCTP policies, which is asserted), each
//! check printing how many same-node and cross-node pairs it covered.
//! A matrix is probed until it matches or [`CONVERGE`] passes (policies
//! take a moment to reach the nodes), so a failure prints the last matrix
//! with the differences marked. Needs root.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use weir_tests::api::{Api, condition_status, uid};
use weir_tests::{ControlCluster, in_netns, tcp_connect_in, wait_for};

const TAG: &str = "nq";
const SUBNET: u8 = 61;
/// Short heartbeats, so nodes are Ready soon.
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
/// How long the pods may take to start.
const START: Duration = Duration::from_secs(90);
/// One probe's connect timeout (a denied SYN is dropped: it times out).
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// How long a matrix may take to match after a change.
const CONVERGE: Duration = Duration::from_secs(12);
/// The test's own echo server port inside the x/a pod.
const ECHO_PORT: u16 = 82;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

/// One of the nine pods.
#[derive(Debug, Clone)]
struct Peer {
    ns: String,
    name: String,
    uid: String,
    netns: PathBuf,
    ip: Ipv4Addr,
    node: String,
}

impl Peer {
    fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    fn is(&self, key: &str) -> bool {
        self.key() == key
    }
}

struct Env {
    c: ControlCluster,
    api: Api,
    pods: Vec<Peer>,
}

type Matrix = Vec<Vec<bool>>;

/// Whether a case allows `from` → `to`.
type Allow<'a> = &'a dyn Fn(&Peer, &Peer) -> bool;

fn pod_json(ns: &str, name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c", "image": "busybox",
                "command": ["sh", "-c",
                    "mkdir -p /srv && echo ok > /srv/index.html && httpd -p 80 -h /srv && exec httpd -f -p 81 -h /srv"],
                "ports": [
                    {"name": "serve-80-tcp", "containerPort": 80},
                    {"name": "serve-81-tcp", "containerPort": 81},
                    // Served by the test's own UDP echo servers.
                    {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
                    {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"},
                ],
            }],
        },
    })
}

fn setup() -> anyhow::Result<Env> {
    let mut c = ControlCluster::new(TAG, SUBNET, 2, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let nodes = c.node_names();
    for ns in NAMESPACES {
        api.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"ns": ns}}}))?;
    }
    let mut i = 0;
    for ns in NAMESPACES {
        for p in PODS {
            api.apply(&pod_json(ns, p, &nodes[i % nodes.len()]))?;
            i += 1;
        }
    }
    // A service in y for the DNS case.
    api.apply(&json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "y"},
        "spec": {"selector": {"pod": "a"}, "ports": [{"port": 80}]}}))?;
    let mut pods = Vec::new();
    for ns in NAMESPACES {
        for p in PODS {
            let v = wait_for(&format!("pod {ns}/{p} Running+Ready"), START, || {
                api.get("Pod", ns, p).filter(|v| {
                    v["status"]["phase"] == "Running"
                        && condition_status(v, "Ready") == "True"
                        && v["status"]["podIP"].is_string()
                })
            })?;
            let node = v["spec"]["nodeName"].as_str().unwrap_or_default();
            let netns = c
                .node_named(node)
                .with_context(|| format!("{ns}/{p} on unknown node {node}"))?
                .pod_netns(&uid(&v));
            pods.push(Peer {
                ns: ns.to_owned(),
                name: p.to_owned(),
                uid: uid(&v),
                netns,
                ip: v["status"]["podIP"].as_str().unwrap_or_default().parse()?,
                node: node.to_owned(),
            });
        }
    }
    Ok(Env { c, api, pods })
}

/// Whether a TCP connect from `from` to `to:port` succeeds in time.
fn probe(from: &Peer, to: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    tcp_connect_in(&from.netns, SocketAddr::from((to, port)), timeout).is_ok_and(|(r, _)| r.is_ok())
}

/// Whether a UDP datagram from `from` to `to:port` is echoed in time.
fn probe_udp(from: &Peer, to: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let Ok(s) = weir_tests::udp_bind_in(&from.netns, SocketAddr::from(([0, 0, 0, 0], 0))) else {
        return false;
    };
    if s.set_read_timeout(Some(timeout)).is_err()
        || s.connect((to, port)).is_err()
        || s.send(b"ping").is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == b"ping")
}

/// A protocol and port the matrix is probed on.
#[derive(Debug, Clone, Copy)]
struct Port {
    udp: bool,
    port: u16,
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.udp { "UDP" } else { "TCP" };
        write!(f, "{proto} {}", self.port)
    }
}

const T80: Port = Port {
    udp: false,
    port: 80,
};
const T81: Port = Port {
    udp: false,
    port: 81,
};
const U80: Port = Port {
    udp: true,
    port: 80,
};
const U81: Port = Port {
    udp: true,
    port: 81,
};

/// The 9×9 matrix on `port`, every probe in parallel.
fn probe_matrix(pods: &[Peer], port: Port) -> Matrix {
    let handles: Vec<Vec<_>> = pods
        .iter()
        .map(|from| {
            pods.iter()
                .map(|to| {
                    let (from, ip) = (from.clone(), to.ip);
                    std::thread::spawn(move || {
                        if port.udp {
                            probe_udp(&from, ip, port.port, PROBE_TIMEOUT)
                        } else {
                            probe(&from, ip, port.port, PROBE_TIMEOUT)
                        }
                    })
                })
                .collect()
        })
        .collect();
    handles
        .into_iter()
        .map(|row| row.into_iter().map(|h| h.join().unwrap_or(false)).collect())
        .collect()
}

/// The expected matrix: `allow(from, to)`, loopback always allowed (a
/// pod's connection to itself never leaves its namespace).
fn expect(pods: &[Peer], allow: impl Fn(&Peer, &Peer) -> bool) -> Matrix {
    pods.iter()
        .map(|f| {
            pods.iter()
                .map(|t| f.key() == t.key() || allow(f, t))
                .collect()
        })
        .collect()
}

/// The matrix as a table: `.` connected, `X` refused/timed out, and a
/// `!` after every cell that differs from `want`.
fn render(pods: &[Peer], got: &Matrix, want: &Matrix) -> String {
    let mut s = format!("{:6}", "from\\to");
    for p in pods {
        let _ = write!(s, "{:5}", p.key());
    }
    s.push('\n');
    for (i, f) in pods.iter().enumerate() {
        let _ = write!(s, "{:7}", f.key());
        for j in 0..pods.len() {
            let cell = if got[i][j] { "." } else { "X" };
            let bad = if got[i][j] == want[i][j] { " " } else { "!" };
            let _ = write!(s, "{cell}{bad}   ");
        }
        s.push('\n');
    }
    s
}

/// The pairs `want` checks (loopback left out), as "same-node: n (a
/// allowed, d denied), cross-node: ...".
fn pair_kinds(pods: &[Peer], want: &Matrix) -> String {
    let mut n = [[0usize; 2]; 2];
    for (i, f) in pods.iter().enumerate() {
        for (j, t) in pods.iter().enumerate() {
            if i != j {
                n[usize::from(f.node != t.node)][usize::from(want[i][j])] += 1;
            }
        }
    }
    format!(
        "same-node {} ({} allowed, {} denied), cross-node {} ({} allowed, {} denied)",
        n[0][0] + n[0][1],
        n[0][1],
        n[0][0],
        n[1][0] + n[1][1],
        n[1][1],
        n[1][0]
    )
}

/// Probes until the matrix on `port` equals `want` (or [`CONVERGE`]).
fn check(env: &Env, case: &str, port: Port, want: &Matrix) -> anyhow::Result<()> {
    check_quiet(env, case, port, want)?;
    println!("    {port}: {}", pair_kinds(&env.pods, want));
    Ok(())
}

/// [`check`] without the pair counts.
fn check_quiet(env: &Env, case: &str, port: Port, want: &Matrix) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let got = probe_matrix(&env.pods, port);
        if got == *want {
            println!(
                "{case} ({port}): matrix as expected after {:?}",
                start.elapsed()
            );
            return Ok(());
        }
        if start.elapsed() > CONVERGE {
            let ips: Vec<String> = env
                .pods
                .iter()
                .map(|p| format!("{}={}", p.key(), p.ip))
                .collect();
            bail!(
                "{case} ({port}): reachability differs (! marks it):\n{}\n{}\npods: {}",
                render(&env.pods, &got, want),
                drops(env),
                ips.join(" ")
            );
        }
    }
}

/// Each node's policy drop counters and endpoints (`bpftool`, as an
/// observer), for failure messages.
fn drops(env: &Env) -> String {
    env.c
        .cluster
        .nodes
        .iter()
        .map(|n| {
            let pin = |map: &str| PathBuf::from(format!("/sys/fs/bpf/weir/{}/{map}", n.name));
            let policy_log: Vec<String> = n
                .agent_log_text()
                .lines()
                .filter(|l| l.contains("polic") || l.contains("ERROR"))
                .map(str::to_owned)
                .collect();
            format!(
                "{} drops by reason: {}\n  endpoints: {}\n  agent log (policy, errors):\n    {}",
                n.name,
                drop_counts(&pin("weir_drops_v1")),
                endpoints(&pin("weir_pol_ep_v1")),
                policy_log.join("\n    ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A per-CPU drop counter array: "reason=count ...".
fn drop_counts(pin: &std::path::Path) -> String {
    let out = weir_tests::sh(
        "bpftool",
        &["-j", "map", "dump", "pinned", &pin.display().to_string()],
    )
    .unwrap_or_else(|e| e.to_string());
    let v: Value = serde_json::from_str(&out).unwrap_or_default();
    let byte = |x: &Value| u8::from_str_radix(x.as_str()?.trim_start_matches("0x"), 16).ok();
    let counts: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(reason, e)| {
            let total: u64 = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let b: Vec<u8> = c["value"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(byte)
                        .collect();
                    b.try_into().map_or(0, u64::from_ne_bytes)
                })
                .sum();
            format!("{reason}={total}")
        })
        .collect();
    counts.join(" ")
}

/// The policy endpoints: "if<ifindex> id= ip= flags=, ...".
fn endpoints(pin: &std::path::Path) -> String {
    let u = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    match weir_tests::bpf_map_entries(pin) {
        Ok(m) => m
            .iter()
            .map(|(k, v)| {
                format!(
                    "if{} id={} ip={} flags={}",
                    u(k),
                    u(&v[0..4]),
                    Ipv4Addr::new(v[4], v[5], v[6], v[7]),
                    u(&v[8..12])
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => e.to_string(),
    }
}

fn peer<'a>(env: &'a Env, key: &str) -> &'a Peer {
    env.pods
        .iter()
        .find(|p| p.is(key))
        .expect("one of the nine pods")
}

fn netpol(ns: &str, name: &str, spec: Value) -> Value {
    let mut p = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns}});
    p["spec"] = spec;
    p
}

fn apply(env: &Env, policy: &Value) -> anyhow::Result<()> {
    env.api
        .apply(policy)
        .with_context(|| format!("apply {policy}"))?;
    Ok(())
}

/// Deletes every policy of x, y and z.
fn clear(env: &Env) -> anyhow::Result<()> {
    for ns in NAMESPACES {
        for p in env.api.list("NetworkPolicy", ns, "")? {
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            env.api.delete("NetworkPolicy", ns, name)?;
        }
    }
    Ok(())
}

/// The cases run so far (printed at the end).
static CASES: AtomicUsize = AtomicUsize::new(0);

/// Runs one case: clears the policies and waits until the TCP 80 matrix
/// is open again (so a case never passes on the previous case's
/// policies), applies `policies`, checks the matrix on each `(port,
/// want)`.
fn case(
    env: &Env,
    name: &str,
    policies: &[Value],
    checks: &[(Port, Allow<'_>)],
) -> anyhow::Result<()> {
    clear(env)?;
    check_quiet(env, "(policies cleared)", T80, &expect(&env.pods, all))?;
    let n = CASES.fetch_add(1, Ordering::Relaxed) + 1;
    println!("case {n}: {name}");
    step(env, name, policies, checks)
}

/// Applies `policies` on top of what is in force and checks each `(port,
/// want)`: one step of a case that changes things as it goes.
fn step(
    env: &Env,
    name: &str,
    policies: &[Value],
    checks: &[(Port, Allow<'_>)],
) -> anyhow::Result<()> {
    for p in policies {
        apply(env, p)?;
    }
    for (port, allow) in checks {
        check(env, name, *port, &expect(&env.pods, allow))?;
    }
    Ok(())
}

fn all(_: &Peer, _: &Peer) -> bool {
    true
}

fn deny_all_ingress(ns: &str) -> Value {
    netpol(
        ns,
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )
}

/// A TCP echo server on [`ECHO_PORT`] inside a pod's netns, until dropped.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(p: &Peer) -> anyhow::Result<Self> {
        let l = in_netns(&p.netns, || {
            let l = TcpListener::bind(("0.0.0.0", ECHO_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut conn, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                            let mut buf = [0u8; 256];
                            while !s.load(Ordering::Relaxed) {
                                match conn.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        if conn.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock
                                                | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An established connection from `from` to the echo server on `to`.
fn echo_connect(from: &Peer, to: &Peer) -> anyhow::Result<TcpStream> {
    let (r, _) = tcp_connect_in(
        &from.netns,
        SocketAddr::from((to.ip, ECHO_PORT)),
        PROBE_TIMEOUT,
    )?;
    let s = r.with_context(|| format!("connect {} → {}:{ECHO_PORT}", from.key(), to.key()))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(s)
}

/// Whether `s` still carries a round trip.
fn echoes(s: &mut TcpStream, msg: &str) -> bool {
    if s.write_all(msg.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).is_ok() && buf == msg.as_bytes()
}

/// Runs `script` in pod `p`'s container; (exit code, output).
fn exec(env: &Env, p: &Peer, script: &str) -> anyhow::Result<(i32, String)> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let node = env
        .c
        .cluster
        .nodes
        .iter()
        .find(|n| {
            p.netns
                .starts_with(std::path::Path::new("/run/weir/netns").join(&n.name))
        })
        .context("the pod's node")?;
    let out = weir_tests::sh("sh", &["-c", &format!("printf %s {} | sha256sum", p.uid)])?;
    let cid = format!("{}-c", out.get(..12).context("sha256sum output")?);
    let id = format!("np-{}", N.fetch_add(1, Ordering::Relaxed));
    let wrapped = format!("({script}) 2>&1; echo \"rc=$?\"");
    let out = env.c.cluster.containerd.ctr(
        &node.containerd_ns(),
        &[
            "tasks",
            "exec",
            "--exec-id",
            &id,
            &cid,
            "sh",
            "-c",
            &wrapped,
        ],
    )?;
    let (body, rc) = out
        .trim_end()
        .rsplit_once("rc=")
        .with_context(|| format!("no exit code in {out:?}"))?;
    Ok((rc.trim().parse()?, body.to_owned()))
}

/// How long after the apply call a deny-all in x stops new connections
/// from z/a to x/a and x/b (on different nodes). Probes every few ms with
/// a 30 ms connect timeout (allowed connects on this host take < 5 ms),
/// so the figure is the first failed probe's start.
fn measure_propagation(env: &Env) -> anyhow::Result<Vec<Duration>> {
    clear(env)?;
    let from = peer(env, "z/a").clone();
    for to in ["x/a", "x/b"] {
        let ip = peer(env, to).ip;
        wait_for(
            &format!("z/a reaches {to} before the policy"),
            CONVERGE,
            || probe(&from, ip, 80, PROBE_TIMEOUT).then_some(()),
        )?;
    }
    let start = Instant::now();
    let watchers: Vec<_> = ["x/a", "x/b"]
        .iter()
        .map(|to| {
            let (from, ip) = (from.clone(), peer(env, to).ip);
            std::thread::spawn(move || {
                while start.elapsed() < Duration::from_secs(5) {
                    let t = start.elapsed();
                    if !probe(&from, ip, 80, Duration::from_millis(30)) {
                        return Some(t);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                None
            })
        })
        .collect();
    apply(env, &deny_all_ingress("x"))?;
    let mut out = Vec::new();
    for w in watchers {
        out.push(
            w.join()
                .ok()
                .flatten()
                .context("the deny-all was not enforced within 5 s")?,
        );
    }
    Ok(out)
}

#[test]
fn network_policies_enforced_end_to_end() -> anyhow::Result<()> {
    let mut env = setup()?;
    let t0 = Instant::now();
    let udp = UdpServers::start(&env.pods)?;
    let same = env
        .pods
        .iter()
        .filter(|p| p.node == env.pods[0].node)
        .count();
    println!(
        "pods: {same} on {}, {} on the other node",
        env.pods[0].node,
        env.pods.len() - same
    );
    ingress_cases(&env)?;
    port_cases(&env)?;
    egress_cases(&env)?;
    egress_dns_case(&env)?;
    update_cases(&env)?;
    drop(udp);
    println!("matrix cases done ({:?})", t0.elapsed());
    policy_update_keeps_allowed_flows(&env)?;
    let took = measure_propagation(&env)?;
    println!("propagation apply → enforced (x/a, x/b on two nodes): {took:?}");
    ensure!(
        took.iter().all(|d| *d < Duration::from_secs(1)),
        "policy propagation too slow: {took:?}"
    );
    agent_restart_never_lapses(&mut env)?;
    println!(
        "netpol e2e: {} cases, took {:?} after setup",
        CASES.load(Ordering::Relaxed),
        t0.elapsed()
    );
    Ok(())
}

/// Whether `weirctl flows` (every node's agent, as JSON lines) shows a
/// flow with `verdict` that `pred` accepts; the probes just made them.
fn flow_seen(env: &Env, verdict: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
    let out = env.c.weirctl(&[
        "flows",
        "--verdict",
        verdict,
        "-o",
        "json",
        "--last",
        "2000",
    ])?;
    let flows: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    anyhow::ensure!(
        flows.iter().any(&pred),
        "weirctl flows --verdict {verdict}: none of the {} flows is the one expected:\n{}",
        flows.len(),
        out.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    eprintln!(
        "weirctl flows --verdict {verdict}: {} flows, the expected one among them",
        flows.len()
    );
    Ok(())
}

/// UDP echo servers on ports 80 and 81 in every pod's netns (busybox has
/// no UDP server the pods could run), until dropped.
struct UdpServers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpServers {
    fn start(pods: &[Peer]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for p in pods {
            for port in [80, 81] {
                let s = weir_tests::udp_bind_in(&p.netns, SocketAddr::from(([0, 0, 0, 0], port)))?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                let stop = stop.clone();
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(&buf[..n], from);
                        }
                    }
                }));
            }
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for UdpServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Re-applies pod `p` with `extra` labels on top of `pod: <name>`.
fn relabel_pod(env: &Env, p: &Peer, extra: &Value) -> anyhow::Result<()> {
    let mut v = pod_json(&p.ns, &p.name, &p.node);
    let mut labels = json!({"pod": p.name});
    for (k, x) in extra.as_object().into_iter().flatten() {
        labels[k] = x.clone();
    }
    v["metadata"]["labels"] = labels;
    env.api
        .apply(&v)
        .with_context(|| format!("relabel pod {}", p.key()))?;
    Ok(())
}

/// Re-applies namespace `ns` with `extra` labels on top of `ns: <name>`.
fn relabel_ns(env: &Env, ns: &str, extra: &Value) -> anyhow::Result<()> {
    let mut labels = json!({"ns": ns});
    for (k, x) in extra.as_object().into_iter().flatten() {
        labels[k] = x.clone();
    }
    env.api
        .apply(&json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": labels}}))
        .with_context(|| format!("relabel namespace {ns}"))?;
    Ok(())
}

/// A policy selecting the pods `pod=<pod>` of `ns` (all of them if `pod`
/// is empty) with the given spec fields.
fn pol(ns: &str, name: &str, pod: &str, mut spec: Value) -> Value {
    spec["podSelector"] = if pod.is_empty() {
        json!({})
    } else {
        json!({"matchLabels": {"pod": pod}})
    };
    netpol(ns, name, spec)
}

/// The upstream ingress cases (`network_policy.go`, TCP).
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn ingress_cases(env: &Env) -> anyhow::Result<()> {
    let to_x = |t: &Peer| t.ns == "x";
    let xa = |t: &Peer| t.is("x/a");

    case(env, "no policy", &[], &[(T80, &all), (T81, &all)])?;

    case(
        env,
        "should support a 'default-deny-ingress' policy",
        &[deny_all_ingress("x")],
        &[(T80, &|_, t| !to_x(t))],
    )?;
    flow_seen(env, "denied", |f| {
        f["destination"]["namespace"] == "x"
            && f["dropReason"]
                .as_str()
                .is_some_and(|r| r.contains("INGRESS"))
            && f["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n == "x/deny-all"))
    })?;

    case(
        env,
        "should deny ingress from pods on other namespaces",
        &[pol(
            "x",
            "allow-same-ns",
            "",
            json!({"ingress": [{"from": [{"podSelector": {}}]}]}),
        )],
        &[(T80, &|f, t| !to_x(t) || f.ns == t.ns)],
    )?;
    flow_seen(env, "allowed", |f| {
        f["destination"]["namespace"] == "x"
            && f["source"]["namespace"] == "x"
            && f["policy"] == "x/allow-same-ns"
    })?;

    case(
        env,
        "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        &[pol(
            "x",
            "x-a-allows-x-b",
            "a",
            json!({"ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || f.is("x/b"))],
    )?;

    case(
        env,
        "should enforce policy to allow ingress traffic for a target",
        &[
            deny_all_ingress("x"),
            pol("x", "allow-all-to-a", "a", json!({"ingress": [{}]})),
        ],
        &[(T80, &|_, t| !to_x(t) || xa(t))],
    )?;

    case(
        env,
        "should enforce policy to allow ingress traffic from pods in all namespaces",
        &[pol(
            "x",
            "allow-from-all-ns",
            "a",
            json!({"ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        )],
        &[(T80, &all)],
    )?;

    case(
        env,
        "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        &[pol(
            "x",
            "allow-ns-y",
            "",
            json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        )],
        &[(T80, &|f, t| !to_x(t) || f.ns == "y")],
    )?;

    case(
        env,
        "multiple policies: a deny-all and an allow from namespace y are a union",
        &[
            deny_all_ingress("x"),
            pol(
                "x",
                "allow-ns-y",
                "",
                json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
            ),
        ],
        &[(T80, &|f, t| !to_x(t) || f.ns == "y")],
    )?;

    case(
        env,
        "should enforce policy based on PodSelector with MatchExpressions",
        &[pol(
            "x",
            "x-a-allows-b-expr",
            "a",
            json!({"ingress": [{"from": [{"podSelector": {"matchExpressions": [
                {"key": "pod", "operator": "In", "values": ["b"]}]}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || f.is("x/b"))],
    )?;

    case(
        env,
        "should enforce policy based on NamespaceSelector with MatchExpressions",
        &[pol(
            "x",
            "x-a-allows-y-expr",
            "a",
            json!({"ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "ns", "operator": "In", "values": ["y"]}]}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || f.ns == "y")],
    )?;

    case(
        env,
        "should enforce policy based on PodSelector or NamespaceSelector",
        &[pol(
            "x",
            "x-a-allows-b-or-not-x",
            "a",
            json!({"ingress": [{"from": [
                {"namespaceSelector": {"matchExpressions": [
                    {"key": "ns", "operator": "NotIn", "values": ["x"]}]}},
                {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || !f.is("x/c"))],
    )?;

    case(
        env,
        "should enforce policy based on PodSelector and NamespaceSelector",
        &[pol(
            "x",
            "x-a-allows-b-not-x",
            "a",
            json!({"ingress": [{"from": [{
                "namespaceSelector": {"matchExpressions": [
                    {"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || f.is("y/b") || f.is("z/b"))],
    )?;

    case(
        env,
        "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        &[pol(
            "x",
            "allow-z-pod-b-c",
            "a",
            json!({"ingress": [{"from": [{
                "namespaceSelector": {"matchExpressions": [
                    {"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                "podSelector": {"matchExpressions": [
                    {"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || (f.ns != "x" && f.name != "a"))],
    )?;

    case(
        env,
        "should enforce policy based on any PodSelectors",
        &[pol(
            "x",
            "x-a-allows-b-c",
            "a",
            json!({"ingress": [{"from": [
                {"podSelector": {"matchLabels": {"pod": "b"}}},
                {"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || f.is("x/b") || f.is("x/c"))],
    )?;

    case(
        env,
        "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        &[pol(
            "x",
            "allow-ns-y-pod-a",
            "a",
            json!({"ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || f.is("y/a"))],
    )?;

    case(
        env,
        "should support allow-all policy",
        &[pol("x", "allow-all", "", json!({"ingress": [{}]}))],
        &[(T80, &all), (T81, &all)],
    )?;

    // Upstream's own ipBlock ingress shape, kept from the first version:
    // the cluster range minus one pod.
    let yb = peer(env, "y/b").ip;
    case(
        env,
        "ingress ipBlock with except",
        &[pol(
            "x",
            "allow-cidr",
            "a",
            json!({"ingress": [{"from": [
                {"ipBlock": {"cidr": cluster_cidr(env), "except": [format!("{yb}/32")]}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) || !f.is("y/b"))],
    )?;
    Ok(())
}

/// The /16 every pod IP is in (checked).
fn cluster_cidr(env: &Env) -> String {
    let o = env.pods[0].ip.octets();
    let cidr = format!("{}.{}.0.0/16", o[0], o[1]);
    assert!(
        env.pods.iter().all(|p| p.ip.octets()[..2] == o[..2]),
        "pods outside {cidr}"
    );
    cidr
}

/// The port cases: numbers, names, endPort, protocols (TCP and UDP).
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn port_cases(env: &Env) -> anyhow::Result<()> {
    let to_x = |t: &Peer| t.ns == "x";
    let xa = |t: &Peer| t.is("x/a");
    let from_y = json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]);

    case(
        env,
        "should enforce policy based on Ports",
        &[pol(
            "x",
            "allow-ingress-on-port-81-ns-x",
            "a",
            json!({"ingress": [{"from": from_y, "ports": [{"port": 81}]}]}),
        )],
        &[(T80, &|_, t| !xa(t)), (T81, &|f, t| !xa(t) || f.ns == "y")],
    )?;

    case(
        env,
        "should enforce multiple, stacked policies with overlapping podSelectors",
        &[pol(
            "x",
            "allow-81-from-y",
            "a",
            json!({"ingress": [{"from": from_y, "ports": [{"port": 81}]}]}),
        )],
        &[(T80, &|_, t| !xa(t)), (T81, &|f, t| !xa(t) || f.ns == "y")],
    )?;
    step(
        env,
        "should enforce multiple, stacked policies with overlapping podSelectors (second policy)",
        &[pol(
            "x",
            "allow-80-from-y",
            "a",
            json!({"ingress": [{"from": from_y, "ports": [{"port": 80}]}]}),
        )],
        &[
            (T80, &|f, t| !xa(t) || f.ns == "y"),
            (T81, &|f, t| !xa(t) || f.ns == "y"),
        ],
    )?;

    case(
        env,
        "should allow ingress access on one named port",
        &[pol(
            "x",
            "allow-81-named",
            "",
            json!({"ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
        )],
        &[(T80, &|_, t| !to_x(t)), (T81, &all)],
    )?;

    case(
        env,
        "should allow ingress access on one named port [UDP]",
        &[pol(
            "x",
            "allow-81-udp-named",
            "",
            json!({"ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
        )],
        &[
            (U81, &all),
            (U80, &|_, t| !to_x(t)),
            (T81, &|_, t| !to_x(t)),
        ],
    )?;

    case(
        env,
        "should allow ingress access from namespace on one named port",
        &[pol(
            "x",
            "allow-80-named-from-y",
            "",
            json!({"ingress": [{"from": from_y, "ports": [{"port": "serve-80-tcp"}]}]}),
        )],
        &[
            (T80, &|f, t| !to_x(t) || f.ns == "y"),
            (T81, &|_, t| !to_x(t)),
        ],
    )?;

    case(
        env,
        "should allow egress access on one named port",
        &[pol(
            "x",
            "allow-egress-80-named",
            "",
            json!({"policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
        )],
        &[(T80, &all), (T81, &|f, _| f.ns != "x")],
    )?;

    case(
        env,
        "should support a 'default-deny-ingress' policy with endPort (80-81 from y)",
        &[
            deny_all_ingress("x"),
            pol(
                "x",
                "allow-80-81-from-y",
                "",
                json!({"ingress": [{"from": from_y, "ports": [{"port": 80, "endPort": 81}]}]}),
            ),
        ],
        &[
            (T80, &|f, t| !to_x(t) || f.ns == "y"),
            (T81, &|f, t| !to_x(t) || f.ns == "y"),
        ],
    )?;

    case(
        env,
        "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector with endPort (81-90)",
        &[pol(
            "x",
            "allow-y-a-81-90",
            "a",
            json!({"ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {"matchLabels": {"pod": "a"}}}],
                "ports": [{"port": 81, "endPort": 90, "protocol": "TCP"}]}]}),
        )],
        &[(T80, &|_, t| !xa(t)), (T81, &|f, t| !xa(t) || f.is("y/a"))],
    )?;

    case(
        env,
        "should enforce egress policy with endPort (from x: only 75-80)",
        &[pol(
            "x",
            "egress-75-80",
            "",
            json!({"policyTypes": ["Egress"], "egress": [{"ports": [{"port": 75, "endPort": 80}]}]}),
        )],
        &[(T80, &all), (T81, &|f, _| f.ns != "x")],
    )?;

    case(
        env,
        "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        &[pol(
            "x",
            "allow-tcp-any-port",
            "a",
            json!({"ingress": [{"ports": [{"protocol": "TCP"}]}]}),
        )],
        &[(T80, &all), (T81, &all), (U80, &|_, t| !xa(t))],
    )?;

    case(
        env,
        "should not allow access by TCP when a policy specifies only UDP",
        &[pol(
            "x",
            "allow-only-udp-81",
            "a",
            json!({"ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}),
        )],
        &[(T81, &|_, t| !xa(t)), (U81, &all), (U80, &|_, t| !xa(t))],
    )?;

    // UDP ([Feature:UDP] upstream).
    case(
        env,
        "should support a 'default-deny-ingress' policy [UDP]",
        &[deny_all_ingress("x")],
        &[(U80, &|_, t| !to_x(t))],
    )?;

    case(
        env,
        "should enforce policy based on Ports [UDP]",
        &[pol(
            "x",
            "allow-ingress-on-udp-81-ns-y",
            "a",
            json!({"ingress": [{"from": from_y, "ports": [{"port": 81, "protocol": "UDP"}]}]}),
        )],
        &[(U80, &|_, t| !xa(t)), (U81, &|f, t| !xa(t) || f.ns == "y")],
    )?;

    case(
        env,
        "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector [UDP]",
        &[pol(
            "x",
            "allow-ns-y-pod-a-udp",
            "a",
            json!({"ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {"matchLabels": {"pod": "a"}}}],
                "ports": [{"port": 80, "protocol": "UDP"}]}]}),
        )],
        &[(U80, &|f, t| !xa(t) || f.is("y/a")), (T80, &|_, t| !xa(t))],
    )?;

    // SCTP: weir's dataplane does TCP and UDP only, so the API refuses a
    // policy naming SCTP (upstream's cases check the plugin does not
    // mistake it for TCP; weir cannot, as it never stores one).
    for (name, spec) in [
        (
            "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP (weir refuses SCTP)",
            json!({"ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
        ),
        (
            "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP (weir refuses SCTP)",
            json!({"ingress": [{"ports": [{"protocol": "SCTP"}]}]}),
        ),
    ] {
        case(env, name, &[], &[])?;
        let err = match env.api.apply(&pol("x", "sctp", "a", spec)) {
            Ok(_) => bail!("{name}: a policy with protocol SCTP was accepted"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains("SCTP"),
            "{name}: refused without naming SCTP: {err}"
        );
        ensure!(
            env.api.list("NetworkPolicy", "x", "")?.is_empty(),
            "{name}: the refused policy was stored"
        );
        check(env, name, T80, &expect(&env.pods, all))?;
        println!("    refused: {}", err.lines().next().unwrap_or_default());
    }
    Ok(())
}

/// The upstream egress cases.
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn egress_cases(env: &Env) -> anyhow::Result<()> {
    let xa = |p: &Peer| p.is("x/a");
    let (ya, yb) = (peer(env, "y/a").ip, peer(env, "y/b").ip);
    let cluster = cluster_cidr(env);

    case(
        env,
        "should deny egress from pods based on PodSelector",
        &[pol(
            "x",
            "deny-egress-a",
            "a",
            json!({"policyTypes": ["Egress"]}),
        )],
        &[(T80, &|f, _| !xa(f))],
    )?;

    case(
        env,
        "should deny egress from all pods in a namespace",
        &[pol(
            "x",
            "deny-egress-all",
            "",
            json!({"policyTypes": ["Egress"]}),
        )],
        &[(T80, &|f, _| f.ns != "x")],
    )?;

    case(
        env,
        "should support a 'default-deny-all' policy",
        &[pol(
            "x",
            "deny-all-tcp-allow-dns",
            "",
            json!({"policyTypes": ["Ingress", "Egress"], "egress": [{"ports": [
                {"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
        )],
        &[
            (T80, &|f, t| f.ns != "x" && t.ns != "x"),
            (U80, &|f, t| f.ns != "x" && t.ns != "x"),
        ],
    )?;
    let (rc, out) = exec(env, peer(env, "x/c"), "nslookup web.y.svc.cluster.local")?;
    ensure!(
        rc == 0 && out.contains("Address"),
        "default-deny-all allowing DNS: x/c cannot resolve a service name (rc {rc}):\n{out}"
    );

    case(
        env,
        "should work with Ingress, Egress specified together",
        &[pol(
            "x",
            "allow-b-in-80-out",
            "a",
            json!({"policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                "egress": [{"ports": [{"port": 80}]}]}),
        )],
        &[
            (T80, &|f, t| !xa(t) || f.is("x/b")),
            (T81, &|f, t| (!xa(t) || f.is("x/b")) && !xa(f)),
        ],
    )?;

    case(
        env,
        "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        &[
            pol(
                "x",
                "x-a-egress-to-y-b",
                "a",
                json!({"policyTypes": ["Egress"], "egress": [{"to": [{
                    "namespaceSelector": {"matchLabels": {"ns": "y"}},
                    "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            ),
            pol(
                "y",
                "y-a-from-x-a",
                "a",
                json!({"ingress": [{"from": [{
                    "namespaceSelector": {"matchLabels": {"ns": "x"}},
                    "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
            ),
        ],
        &[(T80, &|f, t| (!xa(f) || t.is("y/b")) && !t.is("y/a"))],
    )?;

    case(
        env,
        "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
        &[pol(
            "x",
            "x-a-egress-to-y-a",
            "a",
            json!({"policyTypes": ["Egress"], "egress": [{"to": [{
                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        )],
        &[(T80, &|f, t| !xa(f) || t.is("y/a"))],
    )?;

    case(
        env,
        "should enforce multiple egress policies with egress allow-all policy taking precedence",
        &[pol(
            "x",
            "egress-80-only",
            "a",
            json!({"policyTypes": ["Egress"], "egress": [{"ports": [{"port": 80}]}]}),
        )],
        &[(T80, &all), (T81, &|f, _| !xa(f))],
    )?;
    step(
        env,
        "should enforce multiple egress policies with egress allow-all policy taking precedence (allow-all added)",
        &[pol(
            "x",
            "egress-all",
            "a",
            json!({"policyTypes": ["Egress"], "egress": [{}]}),
        )],
        &[(T80, &all), (T81, &all)],
    )?;

    case(
        env,
        "should allow egress access to server in CIDR block",
        &[pol(
            "x",
            "egress-to-y-b-cidr",
            "a",
            json!({"policyTypes": ["Egress"], "egress": [{"to": [
                {"ipBlock": {"cidr": format!("{yb}/32")}}]}]}),
        )],
        &[(T80, &|f, t| !xa(f) || t.is("y/b"))],
    )?;

    case(
        env,
        "should enforce except clause while egress access to server in CIDR block",
        &[pol(
            "x",
            "egress-cluster-except-y-a",
            "a",
            json!({"policyTypes": ["Egress"], "egress": [{"to": [
                {"ipBlock": {"cidr": cluster, "except": [format!("{ya}/32")]}}]}]}),
        )],
        &[(T80, &|f, t| !xa(f) || !t.is("y/a"))],
    )?;

    case(
        env,
        "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        &[
            pol(
                "x",
                "egress-cluster-except-y-a",
                "a",
                json!({"policyTypes": ["Egress"], "egress": [{"to": [
                    {"ipBlock": {"cidr": cluster, "except": [format!("{ya}/32")]}}]}]}),
            ),
            pol(
                "x",
                "egress-y-a",
                "a",
                json!({"policyTypes": ["Egress"], "egress": [{"to": [
                    {"ipBlock": {"cidr": format!("{ya}/32")}}]}]}),
            ),
        ],
        &[(T80, &all)],
    )?;

    case(
        env,
        "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
        &[pol(
            "x",
            "deny-ingress-a",
            "a",
            json!({"policyTypes": ["Ingress"]}),
        )],
        &[(T80, &|_, t| !xa(t))],
    )?;
    step(
        env,
        "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector (egress to y/b only added)",
        &[pol(
            "x",
            "egress-a-to-y-b",
            "a",
            json!({"policyTypes": ["Egress"], "egress": [{"to": [{
                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )],
        &[(T80, &|f, t| !xa(t) && (!xa(f) || t.is("y/b")))],
    )?;
    Ok(())
}

/// Cases that change policies, pods or namespaces while they run.
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn update_cases(env: &Env) -> anyhow::Result<()> {
    let xa = |p: &Peer| p.is("x/a");
    let to_x = |t: &Peer| t.ns == "x";

    case(
        env,
        "should enforce updated policy",
        &[pol(
            "x",
            "allow-all-mutate-to-deny-all",
            "",
            json!({"ingress": [{}]}),
        )],
        &[(T80, &all)],
    )?;
    step(
        env,
        "should enforce updated policy (now deny-all)",
        &[pol(
            "x",
            "allow-all-mutate-to-deny-all",
            "",
            json!({"policyTypes": ["Ingress"]}),
        )],
        &[(T80, &|_, t| !to_x(t))],
    )?;

    case(
        env,
        "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        &[pol(
            "x",
            "allow-only-80",
            "a",
            json!({"ingress": [{"ports": [{"port": 80}]}]}),
        )],
        &[(T80, &all), (T81, &|_, t| !xa(t))],
    )?;
    step(
        env,
        "should enforce multiple ingress policies with ingress allow-all policy taking precedence (allow-all added)",
        &[pol("x", "allow-all", "a", json!({"ingress": [{}]}))],
        &[(T80, &all), (T81, &all)],
    )?;

    case(
        env,
        "should stop enforcing policies after they are deleted",
        &[pol(
            "x",
            "deny-all",
            "",
            json!({"policyTypes": ["Ingress", "Egress"]}),
        )],
        &[(T80, &|f, t| f.ns != "x" && t.ns != "x")],
    )?;
    env.api.delete("NetworkPolicy", "x", "deny-all")?;
    step(
        env,
        "should stop enforcing policies after they are deleted (deleted)",
        &[],
        &[(T80, &all)],
    )?;

    // Namespace y gains a label a policy allows.
    let res = (|| {
        case(
            env,
            "should allow ingress access from updated namespace",
            &[pol(
                "x",
                "allow-ns-updated",
                "a",
                json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}]}),
            )],
            &[(T80, &|_, t| !xa(t))],
        )?;
        relabel_ns(env, "y", &json!({"ns2": "updated"}))?;
        step(
            env,
            "should allow ingress access from updated namespace (y labelled)",
            &[],
            &[(T80, &|f, t| !xa(t) || f.ns == "y")],
        )
    })();
    relabel_ns(env, "y", &json!({}))?;
    res?;

    // Pod x/b gains a label a policy allows (a new identity).
    let xb = peer(env, "x/b");
    let res = (|| {
        case(
            env,
            "should allow ingress access from updated pod",
            &[pol(
                "x",
                "allow-pod-updated",
                "a",
                json!({"ingress": [{"from": [{"podSelector": {"matchLabels": {"pod2": "updated"}}}]}]}),
            )],
            &[(T80, &|_, t| !xa(t))],
        )?;
        relabel_pod(env, xb, &json!({"pod2": "updated"}))?;
        step(
            env,
            "should allow ingress access from updated pod (x/b labelled)",
            &[],
            &[(T80, &|f, t| !xa(t) || f.is("x/b"))],
        )
    })();
    relabel_pod(env, xb, &json!({}))?;
    res?;

    // Pod x/a gains a label that makes a policy select it.
    let xa_peer = peer(env, "x/a");
    let res = (|| {
        case(
            env,
            "should deny ingress access to updated pod",
            &[netpol(
                "x",
                "deny-ingress-via-label-selector",
                json!({"podSelector": {"matchLabels": {"target": "isolated"}},
                    "policyTypes": ["Ingress"]}),
            )],
            &[(T80, &all)],
        )?;
        relabel_pod(env, xa_peer, &json!({"target": "isolated"}))?;
        step(
            env,
            "should deny ingress access to updated pod (x/a labelled)",
            &[],
            &[(T80, &|_, t| !xa(t))],
        )
    })();
    relabel_pod(env, xa_peer, &json!({}))?;
    res?;
    // The re-applies replaced the labels (nothing later sees the extras).
    let labels = |kind: &str, ns: &str, name: &str| {
        env.api
            .get(kind, ns, name)
            .map(|v| v["metadata"]["labels"].clone())
            .unwrap_or_default()
    };
    for (kind, ns, name, extra) in [
        ("Namespace", "", "y", "ns2"),
        ("Pod", "x", "b", "pod2"),
        ("Pod", "x", "a", "target"),
    ] {
        let l = labels(kind, ns, name);
        ensure!(
            l.is_object() && l.get(extra).is_none(),
            "{kind} {name}: labels not restored: {l}"
        );
    }
    clear(env)?;
    check_quiet(env, "labels restored", T80, &expect(&env.pods, all))?;
    Ok(())
}

/// Egress denied in x except DNS: x's pods reach nobody, yet resolve a
/// service name (weir's DNS on the node, through the socket LB).
fn egress_dns_case(env: &Env) -> anyhow::Result<()> {
    case(
        env,
        "egress deny in x except DNS",
        &[netpol(
            "x",
            "egress-dns-only",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [
                {"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
        )],
        &[(T80, &|f, _| f.ns != "x")],
    )?;
    let (rc, out) = exec(env, peer(env, "x/b"), "nslookup web.y.svc.cluster.local")?;
    ensure!(
        rc == 0 && out.contains("Address"),
        "x/b cannot resolve a service name under an egress policy allowing DNS (rc {rc}):\n{out}"
    );
    println!("egress deny in x except DNS: x/b resolves web.y");
    Ok(())
}

/// A policy applied while connections are open: the flow it still allows
/// keeps working, the one it no longer allows is cut (Kubernetes permits
/// either; weir prunes), new connections follow the policy.
fn policy_update_keeps_allowed_flows(env: &Env) -> anyhow::Result<()> {
    clear(env)?;
    let n = CASES.fetch_add(1, Ordering::Relaxed) + 1;
    println!("case {n}: policy update while traffic flows (open connections)");
    let (xa, ya, za) = (peer(env, "x/a"), peer(env, "y/a"), peer(env, "z/a"));
    let _echo = Echo::start(xa)?;
    check(
        env,
        "no policy before the update",
        T80,
        &expect(&env.pods, all),
    )?;
    let mut from_y = echo_connect(ya, xa)?;
    let mut from_z = echo_connect(za, xa)?;
    ensure!(
        echoes(&mut from_y, "y1") && echoes(&mut from_z, "z1"),
        "echo before the update"
    );
    apply(
        env,
        &netpol(
            "x",
            "allow-ns-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
    )?;
    check(
        env,
        "policy update while connections are open",
        T80,
        &expect(&env.pods, |f, t| !t.is("x/a") || f.ns == "y"),
    )?;
    ensure!(
        echoes(&mut from_y, "y2"),
        "the connection y/a → x/a, still allowed, broke when the policy changed"
    );
    ensure!(
        !echoes(&mut from_z, "z2"),
        "the connection z/a → x/a, no longer allowed, still passes"
    );
    println!("policy update: the allowed connection survived, the denied one was cut");
    Ok(())
}

/// SIGKILL + restart of the agent of x/a's node with policies in force:
/// denied probes never get through while it is down or starting, and an
/// established allowed connection survives.
fn agent_restart_never_lapses(env: &mut Env) -> anyhow::Result<()> {
    clear(env)?;
    let n = CASES.fetch_add(1, Ordering::Relaxed) + 1;
    println!("case {n}: agent SIGKILL + restart with policies in force");
    apply(env, &deny_all_ingress("x"))?;
    apply(
        env,
        &netpol(
            "x",
            "allow-ns-y",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
    )?;
    let want = expect(&env.pods, |f, t| t.ns != "x" || f.ns == "y");
    check(env, "before the agent restart", T80, &want)?;
    let (xa, ya) = (peer(env, "x/a").clone(), peer(env, "y/a").clone());
    let _echo = Echo::start(&xa)?;
    let mut conn = echo_connect(&ya, &xa)?;
    ensure!(echoes(&mut conn, "before"), "echo before the restart");
    // Denied probes from z to every x pod, in a loop, until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let leaks = Arc::new(AtomicUsize::new(0));
    let rounds = Arc::new(AtomicUsize::new(0));
    let probers: Vec<_> = env
        .pods
        .iter()
        .filter(|t| t.ns == "x")
        .map(|t| {
            let (from, ip, key) = (peer(env, "z/b").clone(), t.ip, t.key());
            let (stop, leaks, rounds) = (stop.clone(), leaks.clone(), rounds.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if probe(&from, ip, 80, Duration::from_millis(200)) {
                        eprintln!("LEAK: z/b reached {key} during the agent restart");
                        leaks.fetch_add(1, Ordering::Relaxed);
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let node_ix = env
        .c
        .cluster
        .nodes
        .iter()
        .position(|n| {
            xa.netns
                .starts_with(std::path::Path::new("/run/weir/netns").join(&n.name))
        })
        .context("x/a's node")?;
    std::thread::sleep(Duration::from_millis(500));
    env.c.node(node_ix).kill_agent();
    std::thread::sleep(Duration::from_secs(1));
    let restarted = Instant::now();
    env.c.start_agent(node_ix)?;
    // Let the new agent take over (sync, adopt, reconcile) under probing.
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    for p in probers {
        let _ = p.join();
    }
    let log = env.c.node(node_ix).agent_log_text();
    ensure!(
        leaks.load(Ordering::Relaxed) == 0,
        "{} denied probes got through during the agent restart ({} probes)",
        leaks.load(Ordering::Relaxed),
        rounds.load(Ordering::Relaxed)
    );
    ensure!(
        echoes(&mut conn, "after"),
        "the allowed connection y/a → x/a did not survive the agent restart"
    );
    println!(
        "agent restart: {} denied probes, none got through; the allowed connection survived ({:?} since the restart)",
        rounds.load(Ordering::Relaxed),
        restarted.elapsed()
    );
    check(env, "after the agent restart", T80, &want)
        .with_context(|| format!("agent log tail:\n{}", weir_tests::tail(&log, 30)))?;
    // The restarted agent still follows changes.
    clear(env)?;
    check(
        env,
        "policies removed after the restart",
        T80,
        &expect(&env.pods, all),
    )?;
    Ok(())
}
