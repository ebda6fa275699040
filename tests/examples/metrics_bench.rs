//! The body of `cargo xtask bench metrics`: what weir's metrics cost, on
//! real processes (one standalone node: weir-agent in its netns,
//! containerd, busybox pods).
//!
//! (a) Agent CPU for 1 s sampling at N pods (default 110): utime + stime of
//!     the agent over an idle window with `--metrics-interval 1s`, and with
//!     `--metrics-interval 0` (sampling off), alternating (the agent is
//!     restarted between windows and left to settle), nothing scraping it.
//! (b) The eBPF counters (TC traffic counters on every pod veth, the
//!     `sock_ops` connection/RTT counter and the `tcp_retransmit_skb`
//!     tracepoint) against none: pod-to-pod requests/s with wrk from a
//!     client pod's netns to a keep-alive HTTP responder in the web pod's
//!     netns, keep-alive (per-packet cost) and a new connection per request
//!     (the `sock_ops` worst case), in paired reps alternating the order. "Off" removes every pinned
//!     link of the node (detaching them); "on" restarts the agent, which
//!     attaches them again. The agent is stopped during both.
//!
//! Prints one JSON line with the figures.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use weir_tests::{Cluster, Node, wait_for};

/// Harness tag and bridge subnet (10.250.58.0/24) of this bench's cluster.
const TAG: &str = "mb";
const SUBNET: u8 = 58;
const PORT: u16 = 8080;
/// The measured responder's port, in the web pod's netns.
const RESPONDER_PORT: u16 = 8081;
/// How long all pods may take to run.
const START: Duration = Duration::from_mins(5);
/// Quiet time after an agent (re)start before a CPU window opens.
const SETTLE: Duration = Duration::from_secs(10);
/// Bound of one wrk run beyond its duration.
const WRK_SLACK: Duration = Duration::from_secs(20);

/// Set on SIGINT/SIGTERM: loops stop and the guards clean up.
static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone)]
struct Args {
    pods: usize,
    idle_secs: u64,
    cpu_reps: usize,
    reps: usize,
    secs: u32,
    threads: u32,
    conns: u32,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut me = Self {
            pods: 110,
            idle_secs: 30,
            cpu_reps: 2,
            reps: 5,
            secs: 5,
            threads: 2,
            conns: 16,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let v = it.next().with_context(|| format!("{a} needs a value"))?;
            let n: u64 = v.parse().with_context(|| format!("{a} {v:?}"))?;
            let small = || u32::try_from(n).context("too large");
            let size = || usize::try_from(n).context("too large");
            match a.as_str() {
                "--pods" => me.pods = size()?,
                "--idle-secs" => me.idle_secs = n,
                "--cpu-reps" => me.cpu_reps = size()?,
                "--reps" => me.reps = size()?,
                "--secs" => me.secs = small()?,
                "--threads" => me.threads = small()?,
                "--conns" => me.conns = small()?,
                other => bail!(
                    "unknown argument {other:?} (--pods --idle-secs --cpu-reps --reps --secs --threads --conns)"
                ),
            }
        }
        ensure!((3..=250).contains(&me.pods), "--pods must be 3..=250");
        ensure!(me.reps >= 1 && me.cpu_reps >= 1, "reps must be at least 1");
        Ok(me)
    }
}

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn sleep(d: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        check_stop()?;
        std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
    Ok(())
}

fn pod(name: &str, command: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "{command}"]
"#
    )
}

/// utime + stime of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .map(|i| f.get(*i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
        .sum();
    // USER_HZ.
    #[expect(clippy::cast_precision_loss, reason = "seconds as a float")]
    Ok(ticks as f64 / 100.0)
}

/// Restarts the agent with `--metrics-interval interval` and lets it settle.
fn restart(n: &mut Node, interval: &str) -> anyhow::Result<()> {
    n.kill_agent();
    if let Some(i) = n.agent_args.iter().position(|a| a == "--metrics-interval") {
        n.agent_args.drain(i..i + 2);
    }
    n.agent_args
        .extend(["--metrics-interval".to_owned(), interval.to_owned()]);
    n.start_agent()?;
    sleep(SETTLE)
}

/// The agent's CPU over `idle`, % of one core.
fn idle_cpu_pct(n: &Node, idle: Duration) -> anyhow::Result<f64> {
    let pid = n.agent_pid().context("agent pid")?;
    let (t0, c0) = (Instant::now(), cpu_seconds(pid)?);
    sleep(idle)?;
    let (secs, c1) = (t0.elapsed().as_secs_f64(), cpu_seconds(pid)?);
    Ok((c1 - c0) / secs * 100.0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// wrk from `netns` against `target` for `secs`: requests/s; `close`: a
/// new connection per request.
fn wrk(args: &Args, netns: &Path, target: SocketAddr, close: bool) -> anyhow::Result<f64> {
    check_stop()?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("wrk")
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.conns))
        .arg(format!("-d{}s", args.secs))
        .args(["--timeout", "2s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let mut child = cmd
        .arg(format!("http://{target}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run wrk")?;
    let limit = Duration::from_secs(u64::from(args.secs)) + WRK_SLACK;
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
    ensure!(out.status.success(), "wrk {target}: {text}");
    // Failed requests (refused, reset, non-2xx) would count as requests/s.
    let errors: u64 = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("Socket errors:")
                .or_else(|| l.strip_prefix("Non-2xx or 3xx responses:"))
        })
        .flat_map(|rest| rest.split(','))
        .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
        .sum();
    let rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("no Requests/sec")?
        .trim()
        .parse()
        .with_context(|| format!("parse wrk output:\n{text}"))?;
    // A handful of timeouts on a loaded machine is noise; more is a fault.
    #[expect(clippy::cast_precision_loss, reason = "a count of failures")]
    let failed = errors as f64;
    ensure!(
        failed <= rps * f64::from(args.secs) / 1000.0,
        "wrk {target}: {errors} failed requests (over 0.1 %):\n{text}"
    );
    Ok(rps)
}

/// The measured server: a keep-alive HTTP responder on threads inside the
/// web pod's netns (busybox httpd forks per connection and closes first,
/// which leaves the server's `TIME_WAIT`s colliding with reused client
/// ports: SYNs then wait for retransmission and the figures turn bimodal).
/// A `Connection: close` request gets its answer and the client closes
/// first (wrk does), so `TIME_WAIT` stays with the client, which may reuse it
/// (`tcp_tw_reuse=1` in its netns). Threads stop with the process.
fn start_responder(netns: &Path, port: u16, workers: usize) -> anyhow::Result<()> {
    let file = std::fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    let listener = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<std::net::TcpListener> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(std::net::TcpListener::bind(("0.0.0.0", port))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("responder bind thread panicked"))?
    })?;
    for _ in 0..workers {
        let l = listener.try_clone()?;
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                serve(c);
            }
        });
    }
    Ok(())
}

fn serve(mut c: std::net::TcpStream) {
    use std::io::{Read as _, Write as _};
    let _ = c.set_nodelay(true);
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let n = match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            pending.drain(..end + 4);
            let close = head.contains("connection: close");
            let reply: &[u8] = if close {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            if c.write_all(reply).is_err() {
                return;
            }
        }
    }
}

fn pin_dir(n: &Node) -> PathBuf {
    Path::new("/sys/fs/bpf/weir").join(&n.name)
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).count())
}

/// Attaches every counter (an agent start does) and stops the agent; the
/// pinned links stay.
fn counters_on(n: &mut Node, pods: usize) -> anyhow::Result<()> {
    n.kill_agent();
    n.start_agent()?;
    let dir = pin_dir(n);
    wait_for("every link pinned again", Duration::from_mins(1), || {
        (count(&dir.join("links")) >= 2 * pods && count(&dir.join("metrics-links")) == 2)
            .then_some(())
    })?;
    n.kill_agent();
    Ok(())
}

/// Detaches every counter of the node: its pinned links go (the agent is
/// stopped, so nothing holds them).
fn counters_off(n: &mut Node) -> anyhow::Result<()> {
    n.kill_agent();
    let dir = pin_dir(n);
    for sub in ["links", "metrics-links"] {
        for e in std::fs::read_dir(dir.join(sub))?.flatten() {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn run(n: &mut Node, args: &Args) -> anyhow::Result<Value> {
    n.agent_args
        .extend(["--metrics-interval".to_owned(), "1s".to_owned()]);
    n.start_agent()?;
    n.apply(
        "web.yaml",
        &pod(
            "web",
            &format!(
                "mkdir -p /srv && echo ok > /srv/index.html && exec httpd -f -p {PORT} -h /srv"
            ),
        ),
    )?;
    n.apply("cli.yaml", &pod("cli", "exec sleep 100000"))?;
    for i in 0..args.pods - 2 {
        n.apply(
            &format!("s{i:03}.yaml"),
            &pod(&format!("s{i:03}"), "exec sleep 100000"),
        )?;
    }
    eprintln!("bench metrics: {} pods starting", args.pods);
    wait_for("every pod running", START, || {
        check_stop().ok()?;
        let pods = n.pods().ok()?;
        let running = pods
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count();
        (running == args.pods).then_some(())
    })?;
    let web_ip: Ipv4Addr = n
        .pod("web")
        .and_then(|p| p["status"]["podIP"].as_str()?.parse().ok())
        .context("web IP")?;
    let cli_uid = n
        .pod("cli")
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
        .context("cli uid")?;
    let cli_netns = n.pod_netns(&cli_uid);
    let web_uid = n
        .pod("web")
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_owned))
        .context("web uid")?;
    start_responder(&n.pod_netns(&web_uid), RESPONDER_PORT, 8)?;
    // Let the client reuse its own TIME_WAIT ports (observer-side setup).
    let out = Command::new("nsenter")
        .arg(format!("--net={}", cli_netns.display()))
        .args(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        .output()?;
    ensure!(out.status.success(), "sysctl tcp_tw_reuse in cli's netns");
    sleep(SETTLE)?;
    let cpu = agent_cpu(n, args)?;
    let requests = requests(
        n,
        args,
        &cli_netns,
        SocketAddr::from((web_ip, RESPONDER_PORT)),
    )?;
    Ok(json!({
        "pods": args.pods,
        "load": uptime(),
        "agent_cpu": cpu,
        "requests": requests,
    }))
}

/// (a) The agent's CPU with sampling on and off, alternating.
fn agent_cpu(n: &mut Node, args: &Args) -> anyhow::Result<Value> {
    let idle = Duration::from_secs(args.idle_secs);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for rep in 0..args.cpu_reps {
        for sampling in if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            restart(n, if sampling { "1s" } else { "0" })?;
            let pct = idle_cpu_pct(n, idle)?;
            eprintln!(
                "bench metrics: agent CPU, sampling {}: {pct:.2} % of a core",
                if sampling { "on" } else { "off" }
            );
            if sampling {
                on.push(pct);
            } else {
                off.push(pct);
            }
        }
    }
    let cost: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a - b).collect();
    Ok(json!({
        "idle_secs": args.idle_secs,
        "sampling_on_pct": r3(&on),
        "sampling_off_pct": r3(&off),
        "cost_pct_of_one_core": r3(&cost),
        "cost_pct_of_one_core_median": round3(median(cost.clone())),
    }))
}

fn r3(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| round3(*x)).collect()
}

/// One mode's paired figures.
#[derive(Default)]
struct Pairs {
    with: Vec<f64>,
    without: Vec<f64>,
    loss: Vec<f64>,
}

impl Pairs {
    fn json(&self) -> Value {
        json!({
            "attached_rps": r3(&self.with),
            "detached_rps": r3(&self.without),
            "loss_pct": r3(&self.loss),
            "loss_pct_median": round3(median(self.loss.clone())),
        })
    }
}

/// (b) Requests/s with the counters attached and detached, paired reps
/// alternating the order, keep-alive and a new connection per request.
fn requests(
    n: &mut Node,
    args: &Args,
    cli_netns: &Path,
    target: SocketAddr,
) -> anyhow::Result<Value> {
    // Warm up to the steady state.
    for close in [false, true] {
        wrk(args, cli_netns, target, close)?;
    }
    let mut modes = [Pairs::default(), Pairs::default()];
    for rep in 0..args.reps {
        let mut rps = [[0.0; 2]; 2]; // [mode][attached, detached]
        for attached in if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            if attached {
                counters_on(n, args.pods)?;
            } else {
                counters_off(n)?;
            }
            for (m, close) in [false, true].into_iter().enumerate() {
                let r = wrk(args, cli_netns, target, close)?;
                eprintln!(
                    "bench metrics: counters {}, {}: {r:.0} requests/s",
                    if attached { "attached" } else { "detached" },
                    if close {
                        "new connection per request"
                    } else {
                        "keep-alive"
                    }
                );
                rps[m][usize::from(!attached)] = r;
            }
        }
        for (m, p) in modes.iter_mut().enumerate() {
            let [with, without] = rps[m];
            p.with.push(with);
            p.without.push(without);
            p.loss.push((without - with) / without * 100.0);
        }
    }
    // Leave the node as the agent keeps it.
    counters_on(n, args.pods)?;
    Ok(json!({
        "wrk": {"threads": args.threads, "connections": args.conns, "seconds": args.secs, "reps": args.reps,
                "server": "keep-alive HTTP responder (8 threads) in the web pod's netns; the client closes first in close mode"},
        "keepalive": modes[0].json(),
        "close": modes[1].json(),
        "loss_pct_median": round3(median(modes[0].loss.clone()).max(median(modes[1].loss.clone()))),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    weir_tests::stop_on_signal("metrics-bench", &STOP);
    let mut c = Cluster::new(TAG, SUBNET, 1)?;
    let r = run(c.node(0), &args);
    let log = weir_tests::tail(&c.node(0).agent_log_text(), 30);
    match r {
        Ok(v) => {
            println!("{v}");
            Ok(())
        }
        Err(e) => Err(e.context(format!("agent log tail:\n{log}"))),
    }
}
