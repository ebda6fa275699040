//! `NetworkPolicy` costs end to end, on real processes: weir-control and
//! three weir-agents (control mode, own node netns, private containerd),
//! busybox pods, policies written through the API. `cargo xtask bench
//! policy` runs it; it prints one line of JSON on stdout (progress on
//! stderr).
//!
//! Pods (namespace `bench`): `srv-<i>` on node i (labels `role=server`,
//! `idx=<i>`; busybox httpd on 80 and 81) and `cli` on node 0
//! (`role=client`). The measured HTTP server is this process's own
//! keep-alive responder bound in `srv-0`'s network namespace on
//! [`PORT`] (busybox httpd closes every connection); wrk runs in `cli`'s
//! network namespace (`nsenter --net`). Both pods are on node 0, so the
//! traffic crosses both pods' veths and the node's bridge, and the
//! server's `weir_pol_to_pod` program judges every new connection.
//!
//! 1. **Propagation**: a deny-all-ingress policy selecting the three
//!    servers applied through the API; per node, the time from the Apply
//!    call to (a) the first failed probe from `cli` (30 ms connect timeout,
//!    one every 2 ms) and (b) the server's `weir_pol_ep_v1` entry carrying
//!    `EP_F_INGRESS`, read from the pinned map. "Enforced on every node" =
//!    the slowest node. Then the policy is deleted and every server must be
//!    reachable again before the next repetition.
//! 2. **Throughput**: requests/s with keep-alive and with `Connection:
//!    close` (one new connection per request), no policy vs a policy
//!    selecting the servers with `--peers` ingress rules, each one peer on
//!    its own port: half `ipBlock` /32s of unused addresses (10.240.0.0/16),
//!    half pod/namespace selectors over distinct label sets that match no
//!    pod, and last a podSelector `role=client` on [`PORT`] (the only one
//!    matching the client). Each repetition runs A B B A ([`rep_plan`]),
//!    the first state alternating between repetitions.
//!    Baseline in the same run: the same rules as iptables + ipset (one
//!    set per peer, one rule per peer with `--match-set … src --dport`, a
//!    chain per policy, conntrack ESTABLISHED first, as iptables-based CNIs
//!    do) in a plain netns pair made here (veth, the same responder, wrk),
//!    against the same pair with no rules.
//! 3. **Flow export**: the agent's CPU (utime + stime of its process) while
//!    the `Connection: close` load runs through the enforced policy (one
//!    flow record per allowed connection), with flow records at the agent's
//!    setting vs disabled through `weir_flow_cfg_v1` (restored after).
//!
//! `--only propagation,throughput,flows` runs a subset (the flow part
//! alone applies the peers policy itself).
//!
//! Every wait is bounded; the cluster guard (and the baseline netns guard)
//! remove everything on error or SIGINT/SIGTERM.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use serde_json::{Value, json};
use weir_common::{
    EP_F_INGRESS, EndpointConfig, FLOW_CFG_DISABLED, FLOW_CFG_MAP, FLOW_LOST_MAP,
    FLOW_LOST_RATE_LIMITED, FLOW_LOST_RING_FULL, FlowConfig, POL_EP_MAP,
};
use weir_tests::api::{Api, condition_status, uid};
use weir_tests::{ControlCluster, in_netns, sh, sh_quiet, tail, tcp_connect_in, wait_for};

/// Harness tag and bridge subnet (10.250.60.0/24) of this bench's cluster.
const TAG: &str = "pv";
const SUBNET: u8 = 60;
const CONTROL_ARGS: &[&str] = &["--heartbeat-interval", "1s"];
const NS: &str = "bench";
const NODES: usize = 3;
/// The responder's port (the port of the rule that matches the client).
const PORT: u16 = 8080;
/// A port busybox serves that no rule allows: the enforcement check.
const DENIED_PORT: u16 = 81;
/// First port of the rules that match nothing.
const FIRST_RULE_PORT: u16 = 20_000;
/// How long the pods may take to start.
const START: Duration = Duration::from_mins(2);
/// Bound on a policy change reaching a node (propagation) or on the
/// switch between throughput states.
const SETTLE: Duration = Duration::from_secs(20);
/// Bound of one wrk run beyond its duration.
const WRK_SLACK: Duration = Duration::from_secs(20);
/// Baseline netns (server, client) and addresses.
const B_SRV: &str = "wpv-s";
const B_CLI: &str = "wpv-c";
const B_SRV_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 0, 2);
const B_CLI_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 0, 1);

/// Set on SIGINT/SIGTERM: every loop stops and the guards clean up.
static STOP: AtomicBool = AtomicBool::new(false);

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Command-line options.
#[derive(Debug, Clone)]
struct Args {
    peers: usize,
    reps: usize,
    prop_reps: usize,
    secs: u32,
    cpu_secs: u32,
    threads: u32,
    conns: u32,
    /// The parts to run (`--only propagation,throughput,flows`; all by default).
    only: Parts,
}

/// Which parts of the bench run.
#[derive(Debug, Clone, Copy)]
struct Parts {
    propagation: bool,
    throughput: bool,
    flows: bool,
}

impl Parts {
    const ALL: Self = Self {
        propagation: true,
        throughput: true,
        flows: true,
    };

    fn parse(list: &str) -> anyhow::Result<Self> {
        let mut me = Self {
            propagation: false,
            throughput: false,
            flows: false,
        };
        for part in list.split(',').map(str::trim) {
            match part {
                "propagation" => me.propagation = true,
                "throughput" => me.throughput = true,
                "flows" => me.flows = true,
                other => bail!("--only {other:?}: the parts are propagation, throughput, flows"),
            }
        }
        Ok(me)
    }
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut me = Self {
            peers: 1000,
            reps: 5,
            prop_reps: 30,
            secs: 5,
            cpu_secs: 10,
            threads: 2,
            conns: 16,
            only: Parts::ALL,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let v = it.next().with_context(|| format!("{a} needs a value"))?;
            if a == "--only" {
                me.only = Parts::parse(&v)?;
                continue;
            }
            let n: usize = v.parse().with_context(|| format!("{a} {v:?}"))?;
            let small = || u32::try_from(n).context("too large");
            match a.as_str() {
                "--peers" => me.peers = n,
                "--reps" => me.reps = n,
                "--prop-reps" => me.prop_reps = n,
                "--secs" => me.secs = small()?,
                "--cpu-secs" => me.cpu_secs = small()?,
                "--threads" => me.threads = small()?,
                "--conns" => me.conns = small()?,
                other => bail!(
                    "unknown argument {other:?} (--peers --reps --prop-reps --secs --cpu-secs --threads --conns --only)"
                ),
            }
        }
        ensure!(
            (4..=20_000).contains(&me.peers),
            "--peers must be 4..=20000"
        );
        ensure!(me.reps >= 1 && me.prop_reps >= 1, "reps must be >= 1");
        ensure!(me.secs >= 1 && me.cpu_secs >= 1, "durations must be >= 1");
        ensure!(
            me.threads >= 1 && me.conns >= me.threads,
            "--conns >= --threads >= 1"
        );
        Ok(me)
    }
}

// ---------------------------------------------------------------- server

/// HTTP/1.1 responder on threads of this process, bound in a netns:
/// 200 "ok", keeps the connection unless asked to close. Stopped on drop.
struct Responder {
    stop: Arc<AtomicBool>,
    netns: PathBuf,
    addr: SocketAddr,
    workers: Vec<JoinHandle<()>>,
}

impl Responder {
    fn start(netns: &Path, addr: SocketAddr, workers: usize) -> anyhow::Result<Self> {
        let l = in_netns(netns, move || {
            TcpListener::bind(addr).with_context(|| format!("bind {addr}"))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let l = l.try_clone()?;
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                for c in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(c) = c {
                        handle(c);
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            netns: netns.to_owned(),
            addr,
            workers: handles,
        })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let (n, addr) = (self.workers.len(), self.addr);
        // Wake every worker blocked in accept (at the bound address, or
        // loopback when bound to every address).
        let target = if addr.ip().is_unspecified() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        } else {
            addr
        };
        let woke = in_netns(&self.netns, move || {
            let mut ok = 0;
            for _ in 0..n {
                ok += usize::from(
                    TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok(),
                );
            }
            Ok(ok)
        });
        // Join only when every worker was woken: never hang here.
        if woke.is_ok_and(|ok| ok == n) {
            for t in self.workers.drain(..) {
                let _ = t.join();
            }
        }
    }
}

fn handle(c: TcpStream) {
    let _ = c.set_nodelay(true);
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(w) = c.try_clone() else { return };
    let mut w = std::io::BufWriter::new(w);
    let mut r = BufReader::new(c);
    let mut line = String::new();
    loop {
        let mut close = false;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            let l = line.to_ascii_lowercase();
            close |= l.starts_with("connection:") && l.contains("close");
        }
        let head = if close { "Connection: close\r\n" } else { "" };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n{head}\r\nok\n"
        );
        if w.write_all(resp.as_bytes())
            .and_then(|()| w.flush())
            .is_err()
            || close
        {
            return;
        }
    }
}

// ---------------------------------------------------------------- wrk

#[derive(Clone, Copy, Debug)]
struct Run {
    rps: f64,
    p99_ms: f64,
    errors: u64,
}

fn run_json(r: Run) -> Value {
    json!({"rps": round1(r.rps), "p99_ms": round3(r.p99_ms), "errors": r.errors})
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// wrk from the netns at `netns` against `target`; `close`: a new
/// connection per request.
fn wrk(
    args: &Args,
    netns: &Path,
    target: SocketAddr,
    close: bool,
    secs: u32,
) -> anyhow::Result<Run> {
    check_stop()?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("wrk")
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.conns))
        .arg(format!("-d{secs}s"))
        .args(["--timeout", "2s", "--latency"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let mut child = cmd
        .arg(format!("http://{target}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run wrk")?;
    let limit = Duration::from_secs(u64::from(secs)) + WRK_SLACK;
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > limit || STOP.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("wrk {target} ran over {limit:?} or was interrupted");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk {target}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("parse wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> anyhow::Result<Run> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("no Requests/sec")?
        .trim()
        .parse()?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .context("no 99% latency")?
        .trim();
    let p99_ms = if let Some(v) = p99.strip_suffix("us") {
        v.parse::<f64>()? / 1000.0
    } else if let Some(v) = p99.strip_suffix("ms") {
        v.parse()?
    } else if let Some(v) = p99.strip_suffix('s') {
        v.parse::<f64>()? * 1000.0
    } else {
        bail!("latency unit of {p99:?}")
    };
    let mut errors = 0;
    for l in text.lines() {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok(Run {
        rps,
        p99_ms,
        errors,
    })
}

fn median_f(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn median_run(mut runs: Vec<Run>) -> Run {
    let errors = runs.iter().map(|r| r.errors).sum();
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    let mut m = runs[runs.len() / 2];
    m.errors = errors;
    m
}

#[expect(clippy::cast_precision_loss, reason = "small counts")]
fn f(n: u64) -> f64 {
    n as f64
}

fn ms(d: Duration) -> f64 {
    round3(d.as_secs_f64() * 1000.0)
}

fn summary(mut lat: Vec<Duration>) -> Value {
    lat.sort();
    let pct = |p: usize| {
        let rank = (p * lat.len()).div_ceil(100).max(1);
        ms(lat[rank.min(lat.len()) - 1])
    };
    json!({"n": lat.len(), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
           "max_ms": ms(*lat.last().unwrap_or(&Duration::ZERO))})
}

// ---------------------------------------------------------------- cluster

struct Pod {
    ip: Ipv4Addr,
    netns: PathBuf,
}

fn pod_json(name: &str, node: &str, labels: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c", "image": "busybox",
                "command": ["sh", "-c",
                    "mkdir -p /srv && echo ok > /srv/index.html && httpd -p 80 -h /srv && exec httpd -f -p 81 -h /srv"],
            }],
        },
    })
}

fn wait_pod(c: &ControlCluster, api: &Api, name: &str) -> anyhow::Result<Pod> {
    let v = wait_for(&format!("pod {name} Running+Ready"), START, || {
        api.get("Pod", NS, name).filter(|v| {
            v["status"]["phase"] == "Running"
                && condition_status(v, "Ready") == "True"
                && v["status"]["podIP"].is_string()
        })
    })?;
    let node = v["spec"]["nodeName"].as_str().unwrap_or_default();
    let netns = c
        .node_named(node)
        .with_context(|| format!("{name} on unknown node {node}"))?
        .pod_netns(&uid(&v));
    Ok(Pod {
        ip: v["status"]["podIP"].as_str().unwrap_or_default().parse()?,
        netns,
    })
}

fn probe(from: &Path, to: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    tcp_connect_in(from, SocketAddr::from((to, port)), timeout).is_ok_and(|(r, _)| r.is_ok())
}

fn netpol(name: &str, spec: Value) -> Value {
    let mut p = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NS}});
    p["spec"] = spec;
    p
}

fn deny_policy() -> Value {
    netpol(
        "deny",
        json!({"podSelector": {"matchLabels": {"role": "server"}}, "policyTypes": ["Ingress"]}),
    )
}

/// The address of the `i`th ipBlock peer (never used by anything).
fn unused_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0af0_0000 + u32::try_from(i).unwrap_or(0xffff))
}

/// The port of rule `i` (the last one is [`PORT`]).
fn rule_port(i: usize) -> u16 {
    FIRST_RULE_PORT + u16::try_from(i).unwrap_or(u16::MAX - FIRST_RULE_PORT)
}

/// The throughput policy: `peers` ingress rules, one peer and one port
/// each; half ipBlock /32s, then selectors over distinct label sets that
/// match nothing, alternately podSelector and namespaceSelector (+ its
/// podSelector), last `role=client` on [`PORT`].
fn peers_policy(peers: usize) -> Value {
    let blocks = peers / 2;
    let mut rules = Vec::with_capacity(peers);
    for i in 0..blocks {
        rules.push(
            json!({"from": [{"ipBlock": {"cidr": format!("{}/32", unused_ip(i))}}],
            "ports": [{"port": rule_port(i), "protocol": "TCP"}]}),
        );
    }
    for i in blocks..peers - 1 {
        let peer = if i % 2 == 0 {
            json!({"podSelector": {"matchLabels": {"peer": format!("p{i}")}}})
        } else {
            json!({"namespaceSelector": {"matchLabels": {"team": format!("t{i}")}},
                   "podSelector": {"matchLabels": {"app": format!("a{i}")}}})
        };
        rules.push(json!({"from": [peer], "ports": [{"port": rule_port(i), "protocol": "TCP"}]}));
    }
    rules.push(
        json!({"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
        "ports": [{"port": PORT, "protocol": "TCP"}]}),
    );
    netpol(
        "peers",
        json!({"podSelector": {"matchLabels": {"role": "server"}},
               "policyTypes": ["Ingress"], "ingress": rules}),
    )
}

/// Per node: the node's `weir_pol_ep_v1`, opened once.
struct EpMap(HashMap<MapData, u32, EndpointConfig>);

impl EpMap {
    fn open(pin: &Path) -> anyhow::Result<Self> {
        let data = MapData::from_pin(pin).with_context(|| format!("open {}", pin.display()))?;
        Ok(Self(HashMap::try_from(Map::HashMap(data))?))
    }

    /// Whether the endpoint of `ip` has Ingress enforced.
    fn enforced(&self, ip: Ipv4Addr) -> bool {
        let want = u32::from(ip).to_be();
        self.0
            .iter()
            .filter_map(Result::ok)
            .any(|(_, v)| v.pod_ip == want && v.flags & EP_F_INGRESS != 0)
    }
}

struct Env {
    c: ControlCluster,
    api: Api,
    servers: Vec<Pod>,
    client: Pod,
    agent0: u32,
}

fn setup() -> anyhow::Result<Env> {
    let mut c = ControlCluster::new(TAG, SUBNET, NODES, CONTROL_ARGS)?;
    c.start_agents()?;
    let api = Api::connect(&c.control.url())?;
    let nodes = c.node_names();
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": {"team": "bench"}}}))?;
    for (i, n) in nodes.iter().enumerate() {
        api.apply(&pod_json(
            &format!("srv-{i}"),
            n,
            &json!({"role": "server", "idx": i.to_string()}),
        ))?;
    }
    api.apply(&pod_json("cli", &nodes[0], &json!({"role": "client"})))?;
    let mut servers = Vec::new();
    for i in 0..nodes.len() {
        servers.push(wait_pod(&c, &api, &format!("srv-{i}"))?);
    }
    let client = wait_pod(&c, &api, "cli")?;
    let agent0 = c
        .cluster
        .nodes
        .first()
        .and_then(weir_tests::Node::agent_pid)
        .context("node 0's agent pid")?;
    Ok(Env {
        c,
        api,
        servers,
        client,
        agent0,
    })
}

fn logs(env: &Env) -> String {
    let mut out = String::new();
    for n in &env.c.cluster.nodes {
        let _ = write!(
            out,
            "--- {} agent log (tail)\n{}\n",
            n.name,
            tail(&n.agent_log_text(), 30)
        );
    }
    out
}

// ---------------------------------------------------------------- 1. propagation

fn reachable_all(env: &Env) -> bool {
    env.servers
        .iter()
        .all(|s| probe(&env.client.netns, s.ip, 80, Duration::from_millis(500)))
}

fn propagation(env: &Env, reps: usize) -> anyhow::Result<Value> {
    let maps: Vec<EpMap> = env
        .c
        .cluster
        .nodes
        .iter()
        .map(|n| EpMap::open(&n.lb_pin(POL_EP_MAP)))
        .collect::<anyhow::Result<_>>()?;
    let maps = Arc::new(maps);
    let mut probe_all = Vec::new();
    let mut map_all = Vec::new();
    let mut probe_each = Vec::new();
    let mut apply_all = Vec::new();
    for rep in 0..reps {
        check_stop()?;
        let _ = env.api.delete("NetworkPolicy", NS, "deny");
        wait_for("every server reachable without policy", SETTLE, || {
            (reachable_all(env)
                && env
                    .servers
                    .iter()
                    .zip(maps.iter())
                    .all(|(s, m)| !m.enforced(s.ip)))
            .then_some(())
        })?;
        let start = Instant::now();
        let bound = SETTLE;
        let probers: Vec<_> = env
            .servers
            .iter()
            .map(|s| {
                let (from, ip) = (env.client.netns.clone(), s.ip);
                std::thread::spawn(move || {
                    while start.elapsed() < bound && !STOP.load(Ordering::Relaxed) {
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
        let watchers: Vec<_> = env
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (maps, ip) = (maps.clone(), s.ip);
                std::thread::spawn(move || {
                    while start.elapsed() < bound && !STOP.load(Ordering::Relaxed) {
                        if maps[i].enforced(ip) {
                            return Some(start.elapsed());
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    None
                })
            })
            .collect();
        let called = Instant::now();
        env.api.apply(&deny_policy())?;
        apply_all.push(called.elapsed());
        let mut p = Vec::new();
        for t in probers {
            p.push(t.join().ok().flatten().with_context(|| {
                format!("rep {rep}: the deny was not enforced within {bound:?}")
            })?);
        }
        let mut m = Vec::new();
        for t in watchers {
            m.push(
                t.join()
                    .ok()
                    .flatten()
                    .with_context(|| format!("rep {rep}: no EP_F_INGRESS within {bound:?}"))?,
            );
        }
        probe_each.extend(p.iter().copied());
        probe_all.push(p.iter().copied().max().unwrap_or_default());
        map_all.push(m.iter().copied().max().unwrap_or_default());
        eprintln!(
            "propagation rep {rep}: probe {:?} map {:?} (Apply call {:?})",
            probe_all.last(),
            map_all.last(),
            apply_all.last()
        );
    }
    env.api.delete("NetworkPolicy", NS, "deny")?;
    Ok(json!({
        "reps": reps,
        "nodes": NODES,
        "probe_every_node": summary(probe_all),
        "probe_per_node": summary(probe_each),
        "map_every_node": summary(map_all),
        "apply_call": summary(apply_all),
        "method": "Apply call made (it returns once the store commit is durable; apply_call is its own duration) → (probe) start of the first refused TCP connect from the client pod (30 ms connect timeout, every 2 ms) / (map) the server's weir_pol_ep_v1 entry has EP_F_INGRESS; per repetition the slowest of the 3 nodes",
    }))
}

// ---------------------------------------------------------------- 2. throughput

/// Applies (`on`) or deletes the peers policy and waits until the client
/// is refused on [`DENIED_PORT`] (on) or reaches it (off), and reaches
/// [`PORT`].
fn set_weir_policy(env: &Env, policy: &Value, on: bool) -> anyhow::Result<()> {
    if on {
        env.api.apply(policy)?;
    } else {
        // Absent already at the first switch.
        let _ = env.api.delete("NetworkPolicy", NS, "peers");
    }
    let srv = env.servers[0].ip;
    wait_for(
        &format!("peers policy {}", if on { "enforced" } else { "lifted" }),
        SETTLE,
        || {
            let denied = !probe(
                &env.client.netns,
                srv,
                DENIED_PORT,
                Duration::from_millis(100),
            );
            (denied == on && probe(&env.client.netns, srv, PORT, Duration::from_secs(1)))
                .then_some(())
        },
    )
}

/// The baseline's rules: one ipset per peer (hash:net for the ipBlocks,
/// hash:ip for selectors: empty unless it matches the client), a chain
/// `PV-POL` with one `--match-set … src --dport` rule per peer.
fn ipset_rules(peers: usize) -> (String, String) {
    let blocks = peers / 2;
    let mut sets = String::new();
    let mut rules = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:PV-POL - [0:0]\n\
         -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A INPUT -i wpvs -j PV-POL\n",
    );
    for i in 0..peers {
        let (name, port) = if i < blocks {
            let n = format!("pv-c{i}");
            let _ = write!(sets, "create {n} hash:net\nadd {n} {}/32\n", unused_ip(i));
            (n, rule_port(i))
        } else if i + 1 < peers {
            let n = format!("pv-s{i}");
            let _ = writeln!(sets, "create {n} hash:ip");
            (n, rule_port(i))
        } else {
            let n = format!("pv-s{i}");
            let _ = write!(sets, "create {n} hash:ip\nadd {n} {B_CLI_IP}\n");
            (n, PORT)
        };
        let _ = writeln!(
            rules,
            "-A PV-POL -p tcp -m set --match-set {name} src -m tcp --dport {port} -j ACCEPT"
        );
    }
    rules += "-A PV-POL -j DROP\nCOMMIT\n";
    (sets, rules)
}

/// The baseline netns pair, removed on drop.
struct Baseline;

impl Baseline {
    fn cleanup() {
        sh_quiet("ip", &["netns", "del", B_SRV]);
        sh_quiet("ip", &["netns", "del", B_CLI]);
    }

    fn setup() -> anyhow::Result<Self> {
        Self::cleanup();
        let me = Self;
        for n in [B_SRV, B_CLI] {
            sh("ip", &["netns", "add", n])?;
            sh("ip", &["-n", n, "link", "set", "lo", "up"])?;
        }
        sh(
            "ip",
            &[
                "-n", B_CLI, "link", "add", "wpvc", "type", "veth", "peer", "name", "wpvs",
                "netns", B_SRV,
            ],
        )?;
        sh(
            "ip",
            &[
                "-n",
                B_CLI,
                "addr",
                "add",
                &format!("{B_CLI_IP}/24"),
                "dev",
                "wpvc",
            ],
        )?;
        sh(
            "ip",
            &[
                "-n",
                B_SRV,
                "addr",
                "add",
                &format!("{B_SRV_IP}/24"),
                "dev",
                "wpvs",
            ],
        )?;
        sh("ip", &["-n", B_CLI, "link", "set", "wpvc", "up"])?;
        sh("ip", &["-n", B_SRV, "link", "set", "wpvs", "up"])?;
        Ok(me)
    }

    fn netns(name: &str) -> PathBuf {
        Path::new("/run/netns").join(name)
    }

    /// Loads (or flushes) the rules in the server netns.
    fn set(on: bool, sets: &str, rules: &str) -> anyhow::Result<()> {
        let restore = |cmd: &[&str], input: &str| -> anyhow::Result<()> {
            let mut child = Command::new("ip")
                .args(["netns", "exec", B_SRV])
                .args(cmd)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(input.as_bytes())?;
            let out = child.wait_with_output()?;
            ensure!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        if on {
            restore(&["ipset", "restore", "-exist"], sets)?;
            restore(&["iptables-restore"], rules)
        } else {
            restore(
                &["iptables-restore"],
                "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",
            )?;
            sh("ip", &["netns", "exec", B_SRV, "ipset", "destroy"]).map(drop)
        }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        Self::cleanup();
    }
}

/// Per mode (keep-alive, close): runs without and with rules, paired.
struct Paired {
    none: Vec<Run>,
    with: Vec<Run>,
    loss: Vec<f64>,
}

fn mean_rps(runs: &[Run]) -> f64 {
    runs.iter().map(|r| r.rps).sum::<f64>() / f(runs.len() as u64)
}

impl Paired {
    fn new() -> Self {
        Self {
            none: Vec::new(),
            with: Vec::new(),
            loss: Vec::new(),
        }
    }

    /// One pair: the runs without and with rules of one repetition; its
    /// loss compares their means.
    fn push(&mut self, none: &[Run], with: &[Run]) {
        let (n, w) = (mean_rps(none), mean_rps(with));
        self.loss.push((n - w) / n * 100.0);
        self.none.extend_from_slice(none);
        self.with.extend_from_slice(with);
    }

    fn json(&self) -> Value {
        json!({
            "none": run_json(median_run(self.none.clone())),
            "rules": run_json(median_run(self.with.clone())),
            "loss_pct_median": round3(median_f(self.loss.clone())),
            "loss_pct_each": self.loss.iter().map(|l| round3(*l)).collect::<Vec<_>>(),
        })
    }

    fn loss(&self) -> f64 {
        median_f(self.loss.clone())
    }

    fn rules_rps(&self) -> f64 {
        median_run(self.with.clone()).rps
    }
}

/// The runs of one repetition, in order: (rules on, `Connection: close`).
/// A B B A per mode — state `a` keep-alive then close, state `b` close,
/// keep-alive, keep-alive, close, state `a` close then keep-alive — so each
/// mode's two runs per state are centred on the same instant and a load
/// that drifts steadily over the repetition (other processes on a shared
/// machine) weighs on both states alike; `a` alternates with `rep`.
fn rep_plan(rep: usize) -> [(bool, bool); 8] {
    let (a, b) = if rep.is_multiple_of(2) {
        (false, true)
    } else {
        (true, false)
    };
    [
        (a, false),
        (a, true),
        (b, true),
        (b, false),
        (b, false),
        (b, true),
        (a, true),
        (a, false),
    ]
}

/// Runs one rep of a (none, rules) comparison by [`rep_plan`]: `set`
/// switches the state (only when it changes), `run` runs one mode.
fn paired_rep(
    rep: usize,
    set: &mut dyn FnMut(bool) -> anyhow::Result<()>,
    run: &mut dyn FnMut(bool) -> anyhow::Result<Run>,
    ka: &mut Paired,
    close: &mut Paired,
) -> anyhow::Result<()> {
    // [rules on][close]
    let mut got: [[Vec<Run>; 2]; 2] = Default::default();
    let mut state = None;
    for (on, mode) in rep_plan(rep) {
        if state != Some(on) {
            set(on)?;
            state = Some(on);
        }
        got[usize::from(on)][usize::from(mode)].push(run(mode)?);
    }
    ka.push(&got[0][0], &got[1][0]);
    close.push(&got[0][1], &got[1][1]);
    Ok(())
}

fn throughput(env: &Env, args: &Args) -> anyhow::Result<Value> {
    let load_start = loadavg();
    let policy = peers_policy(args.peers);
    let target = SocketAddr::from((env.servers[0].ip, PORT));
    let workers = 2 * usize::try_from(args.conns)?;
    let responder = Responder::start(
        &env.servers[0].netns,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
        workers,
    )?;
    let (mut w_ka, mut w_close) = (Paired::new(), Paired::new());
    let t0 = Instant::now();
    for rep in 0..args.reps {
        paired_rep(
            rep,
            &mut |on| set_weir_policy(env, &policy, on),
            &mut |close| wrk(args, &env.client.netns, target, close, args.secs),
            &mut w_ka,
            &mut w_close,
        )?;
        eprintln!(
            "weir rep {rep}: keep-alive loss {:.2} %, close loss {:.2} %",
            w_ka.loss.last().unwrap_or(&f64::NAN),
            w_close.loss.last().unwrap_or(&f64::NAN)
        );
    }
    eprintln!("weir throughput pairs took {:?}", t0.elapsed());
    // The policy stays for the flow phase.
    set_weir_policy(env, &policy, true)?;
    drop(responder);

    let (sets, rules) = ipset_rules(args.peers);
    let base = Baseline::setup()?;
    let b_responder = Responder::start(
        &Baseline::netns(B_SRV),
        SocketAddr::from((B_SRV_IP, PORT)),
        workers,
    )?;
    let b_target = SocketAddr::from((B_SRV_IP, PORT));
    let b_cli = Baseline::netns(B_CLI);
    let (mut i_ka, mut i_close) = (Paired::new(), Paired::new());
    for rep in 0..args.reps {
        paired_rep(
            rep,
            &mut |on| {
                Baseline::set(on, &sets, &rules)?;
                ensure!(
                    probe(&b_cli, B_SRV_IP, PORT, Duration::from_secs(1)),
                    "baseline server unreachable (rules {on})"
                );
                Ok(())
            },
            &mut |close| wrk(args, &b_cli, b_target, close, args.secs),
            &mut i_ka,
            &mut i_close,
        )?;
        eprintln!(
            "iptables rep {rep}: keep-alive loss {:.2} %, close loss {:.2} %",
            i_ka.loss.last().unwrap_or(&f64::NAN),
            i_close.loss.last().unwrap_or(&f64::NAN)
        );
    }
    // Proof the baseline's rules enforce: a port no rule allows is refused
    // (dropped) with the rules loaded.
    Baseline::set(true, &sets, &rules)?;
    let b_enforced = !probe(
        &b_cli,
        B_SRV_IP,
        FIRST_RULE_PORT,
        Duration::from_millis(300),
    );
    let iptables_version = sh("iptables", &["-V"]).unwrap_or_default();
    drop(b_responder);
    drop(base);

    let ratio = |w: &Paired, i: &Paired| {
        json!({
            "weir_over_iptables_loss": if i.loss().abs() > f64::EPSILON { round3(w.loss() / i.loss()) } else { f64::NAN },
            "weir_minus_iptables_loss_pct": round3(w.loss() - i.loss()),
            "weir_rules_rps_over_iptables_rules_rps": round3(w.rules_rps() / i.rules_rps()),
        })
    };
    Ok(json!({
        "peers": {
            "total": args.peers,
            "ip_block_32": args.peers / 2,
            "selectors_matching_nothing": args.peers - args.peers / 2 - 1,
            "client_rule": format!("last: podSelector role=client, port {PORT}"),
            "ports": "one per rule, distinct",
        },
        "wrk": {"threads": args.threads, "connections": args.conns, "seconds": args.secs, "reps": args.reps},
        "method": "per repetition A B B A: state a keep-alive, close; state b close, keep-alive, keep-alive, close; state a close, keep-alive (a alternates between none and rules); a pair's loss compares the means of its two runs per state; medians over pairs",
        "load_average": {"start": load_start, "end": loadavg()},
        "weir": {"keepalive": w_ka.json(), "close": w_close.json()},
        "iptables_ipset": {
            "keepalive": i_ka.json(),
            "close": i_close.json(),
            "enforced_check": b_enforced,
            "iptables": iptables_version.trim(),
            "where": "plain netns pair (veth), rules in the server netns INPUT: conntrack ESTABLISHED accept, then a chain with one --match-set/--dport rule per peer, one ipset per peer",
        },
        "ratio": {"keepalive": ratio(&w_ka, &i_ka), "close": ratio(&w_close, &i_close)},
    }))
}

// ---------------------------------------------------------------- 3. flow export

/// Reads (and writes) the node's flow config map.
struct FlowCfg {
    map: Array<MapData, FlowConfig>,
    saved: FlowConfig,
}

impl FlowCfg {
    fn open(pin: &Path) -> anyhow::Result<Self> {
        let data = MapData::from_pin(pin).with_context(|| format!("open {}", pin.display()))?;
        let map: Array<MapData, FlowConfig> = Array::try_from(Map::Array(data))?;
        let saved = map.get(&0, 0)?;
        Ok(Self { map, saved })
    }

    fn set(&mut self, enabled: bool) -> anyhow::Result<()> {
        let mut v = self.saved;
        if enabled {
            v.flags &= !FLOW_CFG_DISABLED;
        } else {
            v.flags |= FLOW_CFG_DISABLED;
        }
        self.map.set(0, v, 0)?;
        Ok(())
    }
}

impl Drop for FlowCfg {
    fn drop(&mut self) {
        let saved = self.saved;
        let _ = self.map.set(0, saved, 0);
    }
}

fn lost(pin: &Path) -> anyhow::Result<(u64, u64)> {
    let data = MapData::from_pin(pin)?;
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let sum = |i: u32| -> anyhow::Result<u64> { Ok(map.get(&i, 0)?.iter().sum()) };
    Ok((sum(FLOW_LOST_RATE_LIMITED)?, sum(FLOW_LOST_RING_FULL)?))
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("stat field")
    };
    Ok(get(11)? + get(12)?)
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), as text.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The flow export part; `apply`: apply the peers policy first (once the
/// responder answers: enforcement is checked against it).
fn flow_export(env: &Env, args: &Args, apply: bool) -> anyhow::Result<Value> {
    let load_start = loadavg();
    let node = &env.c.cluster.nodes[0];
    let mut cfg = FlowCfg::open(&node.lb_pin(FLOW_CFG_MAP))?;
    let saved = cfg.saved;
    let hz: f64 = sh("getconf", &["CLK_TCK"])?.trim().parse()?;
    let target = SocketAddr::from((env.servers[0].ip, PORT));
    let workers = 2 * usize::try_from(args.conns)?;
    let responder = Responder::start(
        &env.servers[0].netns,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
        workers,
    )?;
    if apply {
        set_weir_policy(env, &peers_policy(args.peers), true)?;
    }
    let lost_pin = node.lb_pin(FLOW_LOST_MAP);
    let mut measure = |enabled: bool| -> anyhow::Result<(f64, Run, u64)> {
        cfg.set(enabled)?;
        let (rl0, _) = lost(&lost_pin)?;
        let c0 = cpu_ticks(env.agent0)?;
        let t0 = Instant::now();
        let run = wrk(args, &env.client.netns, target, true, args.cpu_secs)?;
        let c1 = cpu_ticks(env.agent0)?;
        let secs = t0.elapsed().as_secs_f64();
        let (rl1, _) = lost(&lost_pin)?;
        Ok((f(c1 - c0) / hz / secs * 100.0, run, rl1 - rl0))
    };
    let (mut on, mut off, mut cost, mut runs, mut limited) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0u64);
    for rep in 0..args.reps {
        let (a, b) = if rep.is_multiple_of(2) {
            let a = measure(true)?;
            (a, measure(false)?)
        } else {
            let b = measure(false)?;
            (measure(true)?, b)
        };
        eprintln!(
            "flow rep {rep}: agent CPU {:.2} % with records, {:.2} % without, at {:.0} conn/s (load {})",
            a.0,
            b.0,
            a.1.rps,
            loadavg()
        );
        cost.push(a.0 - b.0);
        on.push(a.0);
        off.push(b.0);
        runs.push(a.1);
        limited += a.2;
    }
    drop(cfg);
    drop(responder);
    let (_, ring_full) = lost(&lost_pin)?;
    let rate = median_run(runs.clone());
    let conns = runs.iter().map(|r| r.rps).sum::<f64>() * f64::from(args.cpu_secs);
    Ok(json!({
        "new_connections_per_s": round1(rate.rps),
        "p99_ms": round3(rate.p99_ms),
        "agent_cpu_pct_with_records": round3(median_f(on)),
        "agent_cpu_pct_records_disabled": round3(median_f(off)),
        "cost_pct_of_one_core_median": round3(median_f(cost.clone())),
        "cost_pct_each": cost.iter().map(|c| round3(*c)).collect::<Vec<_>>(),
        "sampling": {
            "setting": "the agent's default (FlowSettings::default): 10,000 records/s per node split over the CPUs' token buckets, denials once per second per key; allowed flows: one record per new connection",
            "rate_per_cpu": saved.rate_per_cpu,
            "burst": saved.burst,
            "deny_interval_ms": saved.deny_interval_ms,
        },
        "records_rate_limited_during_enabled_runs": limited,
        "approx_connections_during_enabled_runs": conns.round(),
        "ring_full_total": ring_full,
        "load_average": {"start": load_start, "end": loadavg()},
        "load": format!("wrk Connection: close, {} threads × {} connections, {} s per run, from the client pod through the {}-peer policy", args.threads, args.conns, args.cpu_secs, args.peers),
        "cpu": "utime+stime of node 0's weir-agent process over the run, % of one core; cost = with records − records disabled (weir_flow_cfg_v1 FLOW_CFG_DISABLED), paired and alternated",
    }))
}

fn run(env: &Env, args: &Args) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    let mut out = serde_json::Map::new();
    if args.only.propagation {
        out.insert("propagation".into(), propagation(env, args.prop_reps)?);
        eprintln!("propagation done ({:?})", t0.elapsed());
    }
    if args.only.throughput {
        out.insert("throughput".into(), throughput(env, args)?);
        eprintln!("throughput done ({:?})", t0.elapsed());
    }
    if args.only.flows {
        // The throughput part leaves the policy applied; alone, apply it.
        let apply = !args.only.throughput;
        out.insert("flow_export".into(), flow_export(env, args, apply)?);
        eprintln!("flow export done ({:?})", t0.elapsed());
    }
    out.insert(
        "machine".into(),
        json!({"cpus": std::thread::available_parallelism().map_or(0, usize::from)}),
    );
    Ok(Value::Object(out))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    weir_tests::stop_on_signal("policy-bench", &STOP);
    let env = setup()?;
    match run(&env, &args) {
        Ok(v) => {
            println!("{v}");
            Ok(())
        }
        Err(e) => {
            eprintln!("{}", logs(&env));
            Err(e)
        }
    }
}
