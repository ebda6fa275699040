//! The machine a benchmark runs on, built and torn down like the e2e
//! harness does: a host bridge, node network namespaces on it, a private
//! containerd, and weir-agent in the node netns watching a manifest dir.
//!
//! Every name is unique to the benchmarks (`wbench*`, 10.250.77.0/24, pod
//! CIDRs 10.244.77.0/24 and 10.244.78.0/24), so a running `cargo xtask up`
//! or e2e test is never touched. Each part is an RAII guard; [`scrub`]
//! removes whatever an earlier, interrupted run left behind and runs again
//! after everything else has dropped.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use serde_json::Value;

use super::util::{
    cmdline, http_get, kill_if, pids_where, remove_cgroup_tree, sh, sh_quiet, signal, wait_for,
};

/// Where everything the benchmarks write lives (containerd root, agent state).
pub(crate) const DIR: &str = "/tmp/weir-bench";
/// The node weir-agent runs.
pub(crate) const NODE: &str = "wbench-n1";
/// The node the baseline runs on: same kind of netns, no agent.
pub(crate) const BASE_NODE: &str = "wbench-b1";
const BRIDGE: &str = "wbenchbr";
const HOST_IP: &str = "10.250.77.1";
/// weir's node IP (its agent API listens here).
pub(crate) const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 2);
const BASE_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 3);
/// weir's pod CIDR: .2-.254 holds 253 pods.
pub(crate) const POD_CIDR: &str = "10.244.77.0/24";
/// The CIDRs kept behind `unreachable` routes (as the agent and `up` do).
const GUARDED: [&str; 2] = ["10.244.0.0/16", "10.96.0.0/16"];
/// containerd namespace of the baseline's containers.
pub(crate) const BASE_CTR_NS: &str = "wbench-base";
/// Prefix of every network namespace the benchmarks create.
const NETNS_PREFIX: &str = "wbench-";

/// The path of a named netns.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

fn containerd_dir() -> PathBuf {
    Path::new(DIR).join("containerd")
}

fn node_dir() -> PathBuf {
    Path::new(DIR).join(NODE)
}

/// A node network namespace, its veth to the bridge and its addresses.
struct NodeNs {
    name: &'static str,
    ip: Ipv4Addr,
    host_if: &'static str,
}

const NODES: [NodeNs; 2] = [
    NodeNs {
        name: NODE,
        ip: NODE_IP,
        host_if: "wbenchh1",
    },
    NodeNs {
        name: BASE_NODE,
        ip: BASE_NODE_IP,
        host_if: "wbenchh2",
    },
];

/// The bridge, the node namespaces and the host's guard routes this run
/// added. Dropping removes them.
struct Net {
    added_guards: Vec<&'static str>,
}

impl Net {
    fn create(with_baseline_node: bool) -> anyhow::Result<Self> {
        let mut net = Self {
            added_guards: Vec::new(),
        };
        for cidr in GUARDED {
            let present = sh("ip", &["route", "show", "type", "unreachable", cidr])
                .is_ok_and(|s| !s.trim().is_empty());
            if !present {
                sh("ip", &["route", "add", "unreachable", cidr])?;
                net.added_guards.push(cidr);
            }
        }
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        sh(
            "ip",
            &["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE],
        )?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        let count = if with_baseline_node { 2 } else { 1 };
        for node in &NODES[..count] {
            node.create()?;
        }
        // The agent installs these in its node itself; the baseline node
        // gets the same so both nodes route alike.
        if with_baseline_node {
            for cidr in GUARDED {
                sh(
                    "ip",
                    &["-n", BASE_NODE, "route", "add", "unreachable", cidr],
                )?;
            }
        }
        Ok(net)
    }
}

impl NodeNs {
    fn create(&self) -> anyhow::Result<()> {
        let name = self.name;
        weir_tests::add_node_netns(name, self.host_if, BRIDGE, &self.ip.to_string(), HOST_IP)?;
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for node in &NODES {
            sh_quiet("ip", &["netns", "del", node.name]);
            sh_quiet("ip", &["link", "del", node.host_if]);
        }
        sh_quiet("ip", &["link", "del", BRIDGE]);
        for cidr in &self.added_guards {
            sh_quiet("ip", &["route", "del", "unreachable", cidr]);
        }
    }
}

/// The benchmarks' private containerd: the harness's (own root, state and
/// socket, no CRI plugin); dropping it also ends its shims and mounts.
pub(crate) use weir_tests::Containerd;

/// Whether `c` is the command line of the benchmarks' containerd.
fn is_our_containerd(c: &[String]) -> bool {
    let config = containerd_dir().join("config.toml").display().to_string();
    c.first().is_some_and(|a| a.ends_with("containerd"))
        && c.windows(2).any(|w| w[0] == "--config" && w[1] == config)
}

/// The shims of the benchmarks' containerd outlive it: end them by pid.
fn kill_shims() {
    let socket = containerd_dir()
        .join("containerd.sock")
        .display()
        .to_string();
    let ours = |c: &[String]| {
        c.first().is_some_and(|a| a.contains("containerd-shim"))
            && c.windows(2).any(|w| w[0] == "-address" && w[1] == socket)
    };
    for pid in pids_where(ours) {
        kill_if(pid, ours);
    }
}

/// weir-agent on [`NODE`], and the directories it reads and writes.
pub(crate) struct Agent {
    child: Option<Child>,
    /// Its process id (for `/proc` readings).
    pub pid: u32,
    /// The manifest directory it watches.
    pub manifests: PathBuf,
    /// Where manifests are written before they are renamed into `manifests`.
    pub staging: PathBuf,
    log: PathBuf,
    keep_log: PathBuf,
    /// Whether its API ever answered (else there are no pods to wait for).
    api_up: bool,
}

impl Agent {
    fn start(
        bin: &Path,
        image_dir: &Path,
        socket: &Path,
        keep_log: PathBuf,
    ) -> anyhow::Result<Self> {
        let dir = node_dir();
        let manifests = dir.join("manifests");
        let staging = dir.join("staging");
        std::fs::create_dir_all(&manifests)?;
        std::fs::create_dir_all(&staging)?;
        let log = dir.join("agent.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(["--node-name", NODE])
            .arg("--netns")
            .arg(netns_path(NODE))
            .args(["--node-ip", &NODE_IP.to_string(), "--pod-cidr", POD_CIDR])
            .arg("--containerd-socket")
            .arg(socket)
            .arg("--manifest-dir")
            .arg(&manifests)
            .arg("--image-dir")
            .arg(image_dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--log-dir")
            .arg(dir.join("logs"))
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id();
        std::fs::write(dir.join("agent.pid"), pid.to_string())?;
        let mut me = Self {
            child: Some(child),
            pid,
            manifests,
            staging,
            log,
            keep_log,
            api_up: false,
        };
        wait_for(
            "weir-agent API",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || http_get(me.api(), "/healthz", Duration::from_secs(1)).ok(),
        )
        .with_context(|| format!("agent log tail:\n{}", me.log_tail(20)))?;
        me.api_up = true;
        Ok(me)
    }

    /// The agent's API address (inside the node netns, reachable over the bridge).
    pub fn api(&self) -> SocketAddr {
        let _ = self;
        SocketAddr::from((NODE_IP, 10250))
    }

    /// The agent's pod list.
    pub fn pods(&self) -> anyhow::Result<Vec<Value>> {
        let (code, body) = http_get(self.api(), "/api/v1/pods", Duration::from_secs(5))?;
        if code != 200 {
            bail!("GET /api/v1/pods: {code} {body}");
        }
        let v: Value = serde_json::from_str(&body).context("parse pod list")?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Removes every manifest at once and waits (at most `limit`) until the
    /// agent lists no pod; returns how long that took.
    pub fn remove_all_pods(&self, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        for e in std::fs::read_dir(&self.manifests)?.flatten() {
            std::fs::remove_file(e.path())?;
        }
        wait_for(
            "the agent's pod list to empty",
            limit,
            Duration::from_millis(100),
            || self.pods().ok().filter(Vec::is_empty),
        )
        .with_context(|| format!("agent log tail:\n{}", self.log_tail(20)))?;
        Ok(start.elapsed())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Let the agent tear its pods down the way a user would (if it is
        // still there to do it; scrub() removes whatever it leaves).
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none());
        if self.api_up
            && running
            && let Err(e) = self.remove_all_pods(Duration::from_mins(2))
        {
            eprintln!("bench: warning: {e:#}");
        }
        if let Some(mut child) = self.child.take() {
            signal(child.id(), Signal::SIGTERM);
            let stopped = wait_for(
                "weir-agent exit",
                Duration::from_secs(5),
                Duration::from_millis(50),
                || child.try_wait().ok().flatten(),
            );
            if stopped.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_file(node_dir().join("agent.pid"));
        if let Some(d) = self.keep_log.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if std::fs::copy(&self.log, &self.keep_log).is_ok() {
            eprintln!("bench: agent log kept at {}", self.keep_log.display());
        }
    }
}

/// Runs [`scrub`] when dropped: the last guard of an [`Env`] to go.
struct Scrub;

impl Drop for Scrub {
    fn drop(&mut self) {
        scrub();
    }
}

/// A benchmark's whole environment. Fields drop in order: the agent (which
/// removes its pods), containerd, the network, then the leftovers scrub.
pub(crate) struct Env {
    /// The agent on [`NODE`].
    pub agent: Agent,
    /// The containerd both weir and the baseline use.
    pub containerd: Containerd,
    _net: Net,
    _scrub: Scrub,
}

impl Env {
    /// Sets everything up. `with_baseline_node` adds [`BASE_NODE`];
    /// `keep_log` is where the agent's log is copied at the end.
    pub fn start(
        agent_bin: &Path,
        image_dir: &Path,
        with_baseline_node: bool,
        keep_log: PathBuf,
    ) -> anyhow::Result<Self> {
        refuse_concurrent_run()?;
        scrub();
        std::fs::create_dir_all(DIR)?;
        std::fs::write(
            Path::new(DIR).join("bench.pid"),
            std::process::id().to_string(),
        )?;
        let scrub_guard = Scrub;
        let net = Net::create(with_baseline_node).context("create bench network")?;
        let containerd = Containerd::start(&containerd_dir())
            .context("start containerd (cargo xtask setup installs it)")?;
        eprintln!(
            "bench: containerd up ({}), node {NODE} at {NODE_IP}",
            containerd.socket.display()
        );
        let agent = Agent::start(agent_bin, image_dir, &containerd.socket, keep_log)?;
        eprintln!(
            "bench: weir-agent up (pid {}, {})",
            agent.pid,
            agent_bin.display()
        );
        Ok(Self {
            agent,
            containerd,
            _net: net,
            _scrub: scrub_guard,
        })
    }
}

fn refuse_concurrent_run() -> anyhow::Result<()> {
    let pidfile = Path::new(DIR).join("bench.pid");
    let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return Ok(());
    };
    if pid != std::process::id() && cmdline(pid).is_some_and(|c| c.iter().any(|a| a == "bench")) {
        bail!("another benchmark is running (pid {pid}); wait for it to finish");
    }
    Ok(())
}

/// Removes everything the benchmarks create, whatever state a run left it
/// in: processes they started (by the pids they recorded), shims of their
/// containerd, network namespaces, links, mounts, pins, cgroups and files.
/// Idempotent.
pub(crate) fn scrub() {
    let dir = Path::new(DIR);
    if let Some(pid) = std::fs::read_to_string(node_dir().join("agent.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        kill_if(pid, |c| c.iter().any(|a| a == NODE));
    }
    for pid in pids_where(is_our_containerd) {
        kill_if(pid, is_our_containerd);
    }
    kill_shims();
    let names = sh("ip", &["netns", "list"]).unwrap_or_default();
    for name in names
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
    {
        sh_quiet("ip", &["netns", "del", name]);
    }
    for node in &NODES {
        sh_quiet("ip", &["link", "del", node.host_if]);
    }
    sh_quiet("ip", &["link", "del", BRIDGE]);
    let pod_netns = Path::new("/run/weir/netns").join(NODE);
    unmount_under(&[dir, &pod_netns]);
    let _ = std::fs::remove_dir_all(&pod_netns);
    let _ = std::fs::remove_dir_all(Path::new("/run/weir").join(NODE));
    let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf/weir").join(NODE));
    // The shared parent too, once no other node has pins in it.
    let _ = std::fs::remove_dir("/sys/fs/bpf/weir");
    // Containers whose shim is gone (an interrupted run) still run in
    // these cgroups: end them by pid, then remove the cgroups.
    let groups: Vec<PathBuf> = [format!("weir-{NODE}"), BASE_CTR_NS.to_owned()]
        .iter()
        .flat_map(|g| cgroup_roots().into_iter().map(move |r| r.join(g)))
        .filter(|d| d.is_dir())
        .collect();
    for pid in groups.iter().flat_map(|g| cgroup_pids(g)) {
        signal(pid, Signal::SIGKILL);
    }
    let _ = wait_for(
        "processes in the bench cgroups to exit",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            groups
                .iter()
                .all(|g| cgroup_pids(g).is_empty())
                .then_some(())
        },
    );
    for g in &groups {
        remove_cgroup_tree(g);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Lazily unmounts every mount at or below each of `dirs`, deepest first.
fn unmount_under(dirs: &[&Path]) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
    ours.dedup();
    for m in ours {
        sh_quiet("umount", &["-l", m]);
    }
}

/// `/sys/fs/cgroup` itself (cgroup v2) and each v1 hierarchy under it.
fn cgroup_roots() -> Vec<PathBuf> {
    let root = PathBuf::from("/sys/fs/cgroup");
    let mut out = vec![root.clone()];
    out.extend(
        std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !p.is_symlink()),
    );
    out
}

/// Every process in cgroup `dir` and its descendants.
fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(cgroup_pids(&e.path()));
        }
    }
    pids
}
