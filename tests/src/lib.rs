//! End-to-end test harness: a private containerd, a host bridge and node
//! network namespaces, real weir-agent processes, and probes that observe
//! the result from outside (HTTP, `ip`, cgroupfs, bpffs). xtask's `up` and
//! `bench` use its small helpers too.
//!
//! Everything a [`Cluster`] creates carries its tag and is removed when it
//! drops, even when the test failed. Clusters are serialized by a process-
//! wide lock: they share the host's `unreachable` routes.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub mod api;
pub mod autoscale;
pub mod etcd;

static SERIAL: Mutex<()> = Mutex::new(());

/// Cluster CIDR and service CIDR kept behind `unreachable` routes on the host.
pub const GUARDED_CIDRS: [&str; 2] = ["10.244.0.0/16", "10.96.0.0/16"];

/// `RUST_LOG` of the agents and controls the harness starts: `info`, or
/// `WEIR_TEST_LOG` when set.
fn log_level() -> String {
    std::env::var("WEIR_TEST_LOG").unwrap_or_else(|_| "info".into())
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The weir-agent binary (built by `cargo xtask test` / `cargo build`).
pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WEIR_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace().join("target/debug/weir-agent");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p weir-agent` (cargo xtask test does)",
        p.display()
    );
    p
}

/// The weir-control binary (built by `cargo xtask test` / `cargo build`).
pub fn control_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WEIR_CONTROL_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace().join("target/debug/weir-control");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p weir-control` (cargo xtask test does)",
        p.display()
    );
    p
}

/// The weirctl binary (built with weir-control).
pub fn weirctl_bin() -> PathBuf {
    control_bin().with_file_name("weirctl")
}

/// The directory holding the busybox OCI image tarball.
pub fn image_dir() -> PathBuf {
    let d = workspace().join("target/images");
    assert!(
        d.join("busybox.tar").exists(),
        "{} is missing: run `cargo xtask image` (cargo xtask test does)",
        d.join("busybox.tar").display()
    );
    d
}

/// Runs a command, failing with its stderr when it fails.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, ignoring failure (cleanup).
pub fn sh_quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Polls `f` every 100 ms until it returns Some, or fails after `limit`
/// with `what`.
pub fn wait_for<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    wait_for_every(what, limit, Duration::from_millis(100), f)
}

/// Polls `f` every `every` until it returns Some, or fails after `limit`.
pub fn wait_for_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("read from {addr}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Builds a node the way a machine would be cabled: network namespace
/// `name` joined to `bridge` by a veth (`host_if` on the host, eth0 inside)
/// with `ip`/24, loopback up, a default route via `gateway`, and forwarding
/// on inside the node (never on the host).
pub fn add_node_netns(
    name: &str,
    host_if: &str,
    bridge: &str,
    ip: &str,
    gateway: &str,
) -> anyhow::Result<()> {
    sh("ip", &["netns", "add", name])?;
    sh(
        "ip",
        &[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name,
        ],
    )?;
    sh("ip", &["link", "set", host_if, "master", bridge, "up"])?;
    let n = |args: &[&str]| {
        let mut all = vec!["-n", name];
        all.extend_from_slice(args);
        sh("ip", &all)
    };
    n(&["link", "set", "lo", "up"])?;
    n(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    n(&["link", "set", "eth0", "up"])?;
    n(&["route", "add", "default", "via", gateway])?;
    sh(
        "ip",
        &[
            "netns",
            "exec",
            name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    Ok(())
}

/// A private containerd (own root, state and socket).
pub struct Containerd {
    child: Option<Child>,
    detached: bool,
    config: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
    dir: PathBuf,
}

impl Containerd {
    /// Starts one under `dir` (content and snapshots too) and waits until
    /// it answers.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with_root(dir, &dir.join("root"))
    }

    /// Starts one with state and socket under `dir`, content and snapshots
    /// under `root`, and waits until it answers.
    pub fn start_with_root(dir: &Path, root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{2}\"\n[ttrpc]\n  address = \"{2}.ttrpc\"\n",
                root.display(),
                dir.display(),
                socket.display()
            ),
        )?;
        let mut me = Self {
            child: None,
            config,
            socket,
            dir: dir.to_path_buf(),
            detached: false,
        };
        me.restart()?;
        Ok(me)
    }

    /// Leaves containerd running past this value (and its directory in
    /// place); returns its pid.
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        self.child.take().map_or(0, |c| c.id())
    }

    /// SIGKILLs containerd (its shims, and so the containers, keep running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts containerd (again) with the same config and waits until it answers.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd (apt-get install containerd runc)")?;
        self.child = Some(child);
        let sock = self.socket.clone();
        wait_for("containerd socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        })?;
        Ok(())
    }

    /// `ctr` against this containerd, as an independent observer.
    pub fn ctr(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        let sock = self.socket.display().to_string();
        let mut all = vec!["-a", sock.as_str(), "-n", ns];
        all.extend_from_slice(args);
        sh("ctr", &all)
    }

    /// Ends containerd and its shims, unmounts what it left under its
    /// directory and removes it (once; nothing for a detached one).
    pub fn shut_down(&mut self) {
        if self.detached {
            return;
        }
        self.detached = true;
        self.kill();
        // Shims of this containerd outlive it: end them too.
        sh_quiet(
            "pkill",
            &[
                "-9",
                "-f",
                &format!(
                    "containerd-shim-runc-v2.*-address {}",
                    self.socket.display()
                ),
            ],
        );
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let dir = self.dir.display().to_string();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            sh_quiet("umount", &["-l", m]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// One node: a network namespace on the cluster's bridge and its agent.
pub struct Node {
    /// Node name (also its netns name).
    pub name: String,
    /// Node IP on the bridge.
    pub ip: Ipv4Addr,
    /// Pod CIDR.
    pub pod_cidr: String,
    /// Manifest directory the agent watches.
    pub manifests: PathBuf,
    /// Agent's state, logs and run dirs live under here.
    pub dir: PathBuf,
    agent: Option<Child>,
    socket: PathBuf,
    /// Extra agent flags.
    pub agent_args: Vec<String>,
    /// weir-control's URL when the agent runs in control mode.
    control: Option<String>,
    /// The pod CIDR a standalone agent uses instead of `pod_cidr` (after a
    /// control-mode agent, whose CIDR came from the control).
    standalone_cidr: Option<String>,
}

impl Node {
    /// Where the node's netns is bind-mounted.
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// The containerd namespace the agent uses.
    pub fn containerd_ns(&self) -> String {
        format!("weir-{}", self.name)
    }

    /// The network namespace of this node's pod `uid`.
    pub fn pod_netns(&self, uid: &str) -> PathBuf {
        Path::new("/run/weir/netns").join(&self.name).join(uid)
    }

    /// The agent's own log file.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The agent's log so far.
    pub fn agent_log_text(&self) -> String {
        std::fs::read_to_string(self.agent_log()).unwrap_or_default()
    }

    /// Starts weir-agent in the node's netns (the agent enters it itself).
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())?;
        let mut cmd = Command::new(agent_bin());
        cmd.args(["--node-name", &self.name, "--netns", &self.netns_path()])
            .args(["--node-ip", &self.ip.to_string()]);
        match &self.control {
            Some(url) => cmd.args(["--control", url]),
            None => cmd
                .args([
                    "--pod-cidr",
                    self.standalone_cidr.as_deref().unwrap_or(&self.pod_cidr),
                ])
                .arg("--manifest-dir")
                .arg(&self.manifests),
        };
        let child = cmd
            .arg("--containerd-socket")
            .arg(&self.socket)
            .arg("--image-dir")
            .arg(image_dir())
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--log-dir")
            .arg(self.dir.join("logs"))
            .args(&self.agent_args)
            .env("RUST_LOG", log_level())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start weir-agent")?;
        self.agent = Some(child);
        let addr = self.api();
        wait_for("agent API", Duration::from_secs(30), || {
            http_get(addr, "/healthz", Duration::from_secs(1)).ok()
        })
        .with_context(|| format!("agent log tail:\n{}", tail(&self.agent_log_text(), 30)))?;
        Ok(())
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Starts weir-agent in control mode against `url` (it registers, so
    /// the control must be up for the agent's API to come up).
    pub fn start_agent_with_control(&mut self, url: &str) -> anyhow::Result<()> {
        self.control = Some(url.to_owned());
        self.start_agent()
    }

    /// The pod CIDR the agent's IPAM holds (in control mode, the one the
    /// control assigned).
    pub fn ipam_cidr(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("state/ipam.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["pod_cidr"].as_str().map(str::to_owned)
    }

    /// Switches a control-mode node back to standalone (an empty manifest
    /// directory: the next agent stops every pod), keeping the pod CIDR
    /// its IPAM was opened with. Kills the running agent.
    pub fn leave_control(&mut self) {
        self.kill_agent();
        if self.control.take().is_some() {
            self.standalone_cidr = self.ipam_cidr();
        }
    }

    /// SIGKILLs the agent (pods keep running).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The agent's API address.
    pub fn api(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 10250))
    }

    /// Writes a manifest into the watched directory (atomically).
    pub fn apply(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    /// Removes a manifest.
    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.manifests.join(file))?;
        Ok(())
    }

    /// The agent's pod list.
    pub fn pods(&self) -> anyhow::Result<Vec<Value>> {
        let (code, body) = http_get(self.api(), "/api/v1/pods", Duration::from_secs(5))?;
        if code != 200 {
            bail!("GET /api/v1/pods: {code} {body}");
        }
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// One pod by name (namespace default).
    pub fn pod(&self, name: &str) -> Option<Value> {
        self.pods()
            .ok()?
            .into_iter()
            .find(|p| p["metadata"]["name"] == name)
    }

    /// Waits until pod `name` satisfies `f`.
    pub fn wait_pod(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        wait_for(&format!("pod {name}: {what}"), limit, || {
            self.pod(name).filter(|p| f(p))
        })
        .with_context(|| {
            format!(
                "last seen: {}\nagent log tail:\n{}",
                self.pod(name)
                    .map(|p| p["status"].to_string())
                    .unwrap_or_default(),
                tail(&self.agent_log_text(), 30)
            )
        })
    }

    /// Waits until pod `name` runs with every container ready; returns its IP.
    pub fn wait_running(&self, name: &str, limit: Duration) -> anyhow::Result<Ipv4Addr> {
        let p = self.wait_pod(name, "Running and Ready", limit, |p| {
            p["status"]["phase"] == "Running"
                && p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })?;
        Ok(p["status"]["podIP"].as_str().context("podIP")?.parse()?)
    }

    /// Runs a command inside the node's netns (as an observer).
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let net = format!("--net={}", self.netns_path());
        let mut all = vec![net.as_str()];
        all.extend_from_slice(args);
        sh("nsenter", &all)
    }

    /// Where the node's balancer pins map `map` (e.g. `weir_svc_v1`).
    pub fn lb_pin(&self, map: &str) -> PathBuf {
        Path::new("/sys/fs/bpf/weir").join(&self.name).join(map)
    }

    /// The entries of the node's pinned map `map` as the kernel holds them
    /// (read with `bpftool` as an observer): (key bytes, value bytes).
    pub fn lb_map(&self, map: &str) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        bpf_map_entries(&self.lb_pin(map))
    }

    /// The ids of the balancer's pinned links, by program (the same ids
    /// after an agent restart mean the links were adopted, not re-made).
    pub fn lb_link_ids(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let dir = self.lb_pin("lb-links");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let e = e?;
            let pin = e.path().display().to_string();
            let v: Value =
                serde_json::from_str(&sh("bpftool", &["-j", "link", "show", "pinned", &pin])?)?;
            let id = v["id"]
                .as_u64()
                .with_context(|| format!("no link id in {v}"))?;
            out.push((e.file_name().to_string_lossy().into_owned(), id));
        }
        out.sort();
        Ok(out)
    }

    /// The agent's metrics text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.api(), "/metrics", Duration::from_secs(5))?.1)
    }
}

/// Last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A host bridge, a private containerd and N nodes.
pub struct Cluster {
    /// Short unique tag in every name.
    pub tag: String,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The containerd.
    pub containerd: Containerd,
    bridge: String,
    subnet: u8,
    dir: PathBuf,
    added_guards: Vec<&'static str>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Sets up `nodes` nodes (without starting agents). `subnet` picks
    /// 10.250.<subnet>.0/24 for the bridge and 10.244.<subnet*4+i>.0/24 for
    /// node i's pods.
    pub fn new(tag: &str, subnet: u8, nodes: usize) -> anyhow::Result<Self> {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = PathBuf::from(format!("/tmp/weir-e2e-{tag}"));
        let bridge = format!("wt{tag}br");
        // Leftovers of a crashed earlier run of the same test.
        cleanup_names(tag, &bridge, &dir);
        std::fs::create_dir_all(&dir)?;
        let containerd = Containerd::start(&dir.join("containerd"))?;
        let mut c = Self {
            tag: tag.to_owned(),
            nodes: Vec::new(),
            containerd,
            bridge: bridge.clone(),
            subnet,
            dir: dir.clone(),
            added_guards: Vec::new(),
            _serial: serial,
        };
        for cidr in GUARDED_CIDRS {
            let present = sh("ip", &["route", "show", "type", "unreachable", cidr])
                .is_ok_and(|s| !s.trim().is_empty());
            if !present {
                sh("ip", &["route", "add", "unreachable", cidr])?;
                c.added_guards.push(cidr);
            }
        }
        sh("ip", &["link", "add", &bridge, "type", "bridge"])?;
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.250.{subnet}.1/24"),
                "dev",
                &bridge,
            ],
        )?;
        sh("ip", &["link", "set", &bridge, "up"])?;
        for i in 0..nodes {
            c.add_node(i)?;
        }
        Ok(c)
    }

    fn add_node(&mut self, i: usize) -> anyhow::Result<()> {
        let idx = u8::try_from(i).context("node index")?;
        let name = format!("wt{}-n{}", self.tag, i + 1);
        let ip = Ipv4Addr::new(10, 250, self.subnet, idx + 2);
        let pod_net = self.subnet * 4 + idx;
        let pod_cidr = format!("10.244.{pod_net}.0/24");
        let host_if = format!("wt{}h{}", self.tag, i + 1);
        add_node_netns(
            &name,
            &host_if,
            &self.bridge,
            &ip.to_string(),
            &format!("10.250.{}.1", self.subnet),
        )?;
        sh("ip", &["route", "add", &pod_cidr, "via", &ip.to_string()])?;
        let dir = self.dir.join(&name);
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        self.nodes.push(Node {
            name,
            ip,
            pod_cidr,
            manifests,
            dir,
            agent: None,
            socket: self.containerd.socket.clone(),
            agent_args: vec![
                "--backoff-initial".into(),
                "1s".into(),
                "--backoff-max".into(),
                "4s".into(),
            ],
            control: None,
            standalone_cidr: None,
        });
        Ok(())
    }

    /// Node `i`.
    pub fn node(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }
}

fn cleanup_names(tag: &str, bridge: &str, dir: &Path) {
    for i in 1..=4 {
        let name = format!("wt{tag}-n{i}");
        sh_quiet("ip", &["netns", "del", &name]);
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/weir/{name}"));
        sh_quiet("ip", &["link", "del", &format!("wt{tag}h{i}")]);
    }
    sh_quiet("ip", &["link", "del", bridge]);
    let _ = std::fs::remove_dir_all(dir);
    // The agents' parent directories go too once nothing else uses them
    // (remove_dir fails on a directory another node still has entries in).
    let _ = std::fs::remove_dir("/sys/fs/bpf/weir");
    let _ = std::fs::remove_dir("/run/weir/netns");
    let _ = std::fs::remove_dir("/run/weir");
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.containerd.child.is_none() {
            let _ = self.containerd.restart();
        }
        // Let each agent tear its pods down the way a user would: remove the
        // manifests and wait for the pods to go.
        for n in &mut self.nodes {
            if let Ok(entries) = std::fs::read_dir(&n.manifests) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            if n.agent.is_none() {
                // A missing binary or image panics; inside a drop that
                // would abort the process and skip the rest of the cleanup.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| n.start_agent()));
            }
        }
        for n in &mut self.nodes {
            let _ = wait_for("pods gone", Duration::from_secs(30), || {
                n.pods().ok().filter(Vec::is_empty)
            });
            n.kill_agent();
        }
        // Whatever is left (a failed test) goes by force.
        for n in &self.nodes {
            let _ = self.containerd.ctr(&n.containerd_ns(), &["tasks", "ls"]);
            let netns_dir = Path::new("/run/weir/netns").join(&n.name);
            for p in n
                .dir
                .join("state/pods")
                .read_dir()
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Some(uid) = p.path().file_stem().and_then(|s| s.to_str()) {
                    sh_quiet(
                        "umount",
                        &["-l", &netns_dir.join(uid).display().to_string()],
                    );
                    let _ = std::fs::remove_file(netns_dir.join(uid));
                }
            }
            for ctrl in [
                "cpu",
                "cpuacct",
                "memory",
                "pids",
                "devices",
                "freezer",
                "blkio",
                "cpuset",
                "systemd",
                "unified",
                "perf_event",
                "net_cls",
                "net_prio",
                "hugetlb",
                "rdma",
                "misc",
            ] {
                remove_cgroup_tree(
                    &Path::new("/sys/fs/cgroup")
                        .join(ctrl)
                        .join(n.containerd_ns()),
                );
            }
            remove_cgroup_tree(&Path::new("/sys/fs/cgroup").join(n.containerd_ns()));
            sh_quiet("ip", &["route", "del", &n.pod_cidr]);
            // The agent keeps its pod-netns directory a shared mount point
            // (as `ip netns` does); it outlives the agent by design.
            let netns_dir = Path::new("/run/weir/netns").join(&n.name);
            sh_quiet("umount", &["-l", &netns_dir.display().to_string()]);
            let _ = std::fs::remove_dir(&netns_dir);
            let _ = std::fs::remove_dir_all(Path::new("/run/weir").join(&n.name));
        }
        cleanup_names(&self.tag, &self.bridge, Path::new("/nonexistent"));
        for cidr in &self.added_guards {
            sh_quiet("ip", &["route", "del", "unreachable", cidr]);
        }
        // Its containerd (when private) lives under the directory: end it
        // and its mounts first, then retry a little, and say so if it stays.
        self.containerd.shut_down();
        let mut last = None;
        for _ in 0..20 {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => return,
                Err(_) if !self.dir.exists() => return,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "cluster teardown: could not remove {}: {last:?}",
            self.dir.display()
        );
    }
}

/// A weir-control process with its redb store, serving on the cluster's
/// bridge so agents in node netns reach it.
pub struct ControlPlane {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it serves `/metrics` (`--metrics-listen` when the args name
    /// it, else the control's default 0.0.0.0:7444).
    pub metrics_addr: SocketAddr,
    /// Its redb file (or the `--store` given, e.g. `etcd://…`).
    pub store: PathBuf,
    log: PathBuf,
    args: Vec<String>,
}

impl ControlPlane {
    /// Starts weir-control on `ip` (a free port), its store and log under
    /// `dir`, with `args` added, and waits until it listens.
    pub fn start(dir: &Path, ip: Ipv4Addr, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_store(dir, ip, None, args)
    }

    /// Like [`ControlPlane::start`], with `--store store` instead of the
    /// redb file under `dir` when `store` is given (e.g. `etcd://host:port`).
    pub fn start_with_store(
        dir: &Path,
        ip: Ipv4Addr,
        store: Option<&str>,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .with_context(|| format!("find a free port on {ip}"))?
            .port();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        // Only a test that scrapes it names `--metrics-listen`; the others
        // leave the control's default.
        let metrics_addr = args
            .iter()
            .position(|a| a == "--metrics-listen")
            .and_then(|i| args.get(i + 1))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 7444)));
        let mut me = Self {
            child: None,
            addr: SocketAddr::from((ip, port)),
            metrics_addr,
            store: store.map_or_else(|| dir.join("weir.redb"), PathBuf::from),
            log: dir.join("control.log"),
            args,
        };
        me.restart()?;
        Ok(me)
    }

    /// Its URL for agents and clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// (Re)starts it on the same address and store; waits until it listens.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(control_bin())
            .args(["--listen", &self.addr.to_string()])
            .arg("--store")
            .arg(&self.store)
            .args(&self.args)
            .env("RUST_LOG", log_level())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start weir-control")?;
        self.child = Some(child);
        let addr = self.addr;
        wait_for("weir-control listening", Duration::from_secs(20), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()
        })
        .with_context(|| format!("control log tail:\n{}", tail(&self.log_text(), 30)))?;
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A [`Cluster`] whose agents follow a real weir-control (control mode)
/// listening on the bridge's host address.
///
/// Dropping it stops the control, then turns every node back into a
/// standalone agent with no manifests, which stops all pods the way the
/// plain cluster's teardown expects.
pub struct ControlCluster {
    /// The nodes, bridge and containerd.
    pub cluster: Cluster,
    /// weir-control.
    pub control: ControlPlane,
}

impl ControlCluster {
    /// A cluster of `nodes` nodes (agents not started) and a running
    /// weir-control with `control_args` (e.g. `--heartbeat-interval 1s`).
    pub fn new(tag: &str, subnet: u8, nodes: usize, control_args: &[&str]) -> anyhow::Result<Self> {
        Self::with_store(tag, subnet, nodes, None, control_args)
    }

    /// Like [`ControlCluster::new`], with weir-control on `store` (e.g.
    /// `etcd://127.0.0.1:2379`) instead of a redb file when given.
    pub fn with_store(
        tag: &str,
        subnet: u8,
        nodes: usize,
        store: Option<&str>,
        control_args: &[&str],
    ) -> anyhow::Result<Self> {
        let cluster = Cluster::new(tag, subnet, nodes)?;
        let control = ControlPlane::start_with_store(
            &cluster.dir.join("control"),
            Ipv4Addr::new(10, 250, subnet, 1),
            store,
            control_args,
        )?;
        Ok(Self { cluster, control })
    }

    /// Starts every node's agent in control mode.
    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..self.cluster.nodes.len() {
            self.start_agent(i)?;
        }
        Ok(())
    }

    /// The node names, in order.
    pub fn node_names(&self) -> Vec<String> {
        self.cluster.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The node called `name`.
    pub fn node_named(&self, name: &str) -> Option<&Node> {
        self.cluster.nodes.iter().find(|n| n.name == name)
    }

    /// Runs the real weirctl against this control with `args` (and
    /// `stdin` fed to it when given); returns (success, stdout, stderr).
    pub fn weirctl_output(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<(bool, String, String)> {
        weirctl(&self.control.url(), args, stdin)
    }

    /// Runs weirctl with `args`; its stdout, or an error with its stderr
    /// when it fails.
    pub fn weirctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let (ok, out, err) = self.weirctl_output(args, None)?;
        if !ok {
            bail!("weirctl {} failed:\n{err}{out}", args.join(" "));
        }
        Ok(out)
    }

    /// `weirctl apply -f -` with `yaml` on stdin; its stdout.
    pub fn weirctl_apply(&self, yaml: &str) -> anyhow::Result<String> {
        let (ok, out, err) = self.weirctl_output(&["apply", "-f", "-"], Some(yaml))?;
        if !ok {
            bail!("weirctl apply failed:\n{err}{out}\nmanifest:\n{yaml}");
        }
        Ok(out)
    }

    /// Node `i`.
    pub fn node(&mut self, i: usize) -> &mut Node {
        self.cluster.node(i)
    }

    /// The last `lines` lines of every agent's log and of the control's,
    /// for the context of a failed e2e step.
    pub fn log_tails(&self, lines: usize) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for n in &self.cluster.nodes {
            let _ = writeln!(
                out,
                "--- agent {} log tail:\n{}",
                n.name,
                tail(&n.agent_log_text(), lines)
            );
        }
        let _ = writeln!(
            out,
            "--- control log tail:\n{}",
            tail(&self.control.log_text(), lines)
        );
        out
    }

    /// Starts node `i`'s agent in control mode.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let url = self.control.url();
        self.cluster.node(i).start_agent_with_control(&url)
    }
}

impl Drop for ControlCluster {
    fn drop(&mut self) {
        self.control.kill();
        for n in &mut self.cluster.nodes {
            n.leave_control();
        }
    }
}

/// Runs the weirctl binary against `server` with `args` (and `stdin`
/// when given); returns (success, stdout, stderr).
pub fn weirctl(
    server: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<(bool, String, String)> {
    let mut child = Command::new(weirctl_bin())
        .args(["--server", server])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start weirctl")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .context("write weirctl's stdin")?;
    }
    let out = child.wait_with_output().context("wait for weirctl")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `f` on a new thread inside the network namespace at `netns` (a
/// pod's, `/run/weir/netns/<node>/<uid>`, or a node's), so sockets it opens
/// see that namespace's addresses and routes; returns what `f` returns.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let file =
        std::fs::File::open(netns).with_context(|| format!("open netns {}", netns.display()))?;
    let path = netns.display().to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("enter netns {path}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in {} panicked", netns.display()))?
}

/// [`http_get`] from inside the network namespace at `netns`.
pub fn http_get_in(
    netns: &Path,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    in_netns(netns, move || http_get(addr, &path, timeout))
}

/// The entries of the pinned eBPF map at `pin` (`bpftool -j map dump`,
/// as an observer): (key bytes, value bytes).
pub fn bpf_map_entries(pin: &Path) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let out = sh(
        "bpftool",
        &["-j", "map", "dump", "pinned", &pin.display().to_string()],
    )?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("bpftool said {out}"))?;
    let bytes = |v: &Value| -> anyhow::Result<Vec<u8>> {
        v.as_array()
            .with_context(|| format!("not a byte array: {v}"))?
            .iter()
            .map(|b| {
                let h = b.as_str().unwrap_or_default().trim_start_matches("0x");
                u8::from_str_radix(h, 16).with_context(|| format!("not a hex byte: {b}"))
            })
            .collect()
    };
    v.as_array()
        .with_context(|| format!("bpftool dump is not a list: {out}"))?
        .iter()
        .map(|e| Ok((bytes(&e["key"])?, bytes(&e["value"])?)))
        .collect()
}

/// A TCP connect from inside the network namespace at `netns`: the
/// connected stream (its socket stays in that netns) or the error, and
/// how long the connect took.
pub fn tcp_connect_in(
    netns: &Path,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<(std::io::Result<TcpStream>, Duration)> {
    in_netns(netns, move || {
        let start = Instant::now();
        let r = TcpStream::connect_timeout(&addr, timeout);
        Ok((r, start.elapsed()))
    })
}

/// A UDP socket bound to `addr` inside the network namespace at `netns`
/// (it stays there whichever thread uses it).
pub fn udp_bind_in(netns: &Path, addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    in_netns(netns, move || {
        std::net::UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))
    })
}

/// Removes a cgroup directory and everything below it, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // A process still in it is a container the agent failed to stop: it
    // goes by force (and is named, so the leak is seen), or the cgroup
    // and the test's directories stay busy.
    let procs = |d: &Path| -> Vec<i32> {
        std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let left = procs(dir);
    if !left.is_empty() {
        eprintln!(
            "cluster teardown: killing processes left in {}: {left:?}",
            dir.display()
        );
        for pid in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = wait_for_every(
            "killed processes gone",
            Duration::from_secs(5),
            Duration::from_millis(20),
            || procs(dir).is_empty().then_some(()),
        );
    }
    let _ = std::fs::remove_dir(dir);
}

/// A client outside the cluster: a network namespace with a veth on a
/// cluster's bridge (its address `ip`/24, no default route), as a machine
/// on the nodes' LAN calling `<node IP>:<nodePort>`. Removed on drop.
pub struct BridgeClient {
    name: String,
    host_if: String,
}

impl BridgeClient {
    /// Creates the client netns on `cluster`'s bridge with address `ip`.
    pub fn new(cluster: &Cluster, ip: Ipv4Addr) -> anyhow::Result<Self> {
        let me = Self {
            name: format!("wt{}-bc", cluster.tag),
            host_if: format!("wt{}bc", cluster.tag),
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
        sh(
            "ip",
            &["link", "set", &me.host_if, "master", &cluster.bridge, "up"],
        )?;
        let n = |args: &[&str]| {
            let mut all = vec!["-n", me.name.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all)
        };
        n(&["link", "set", "lo", "up"])?;
        n(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        n(&["link", "set", "eth0", "up"])?;
        Ok(me)
    }

    /// The client's network namespace (for [`http_get_in`], [`udp_bind_in`]).
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    fn cleanup(&self) {
        sh_quiet("ip", &["netns", "del", &self.name]);
        sh_quiet("ip", &["link", "del", &self.host_if]);
    }
}

impl Drop for BridgeClient {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A `DaemonSet` `client` of idle busybox pods: an HTTP/DNS client on every
/// node for the control-mode e2e tests.
pub const CLIENT_DS: &str = r#"apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: client
spec:
  selector:
    matchLabels: {app: client}
  template:
    metadata:
      labels: {app: client}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: c
        image: busybox
        command: ["sleep", "3600"]
"#;

/// A `Deployment` `web` of `replicas` busybox httpd pods answering their
/// hostname on the named port `http` (8080), for the services e2e tests.
pub fn web_deployment(replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: busybox
        command: ["sh", "-c", "mkdir -p /srv && hostname > /srv/index.html && exec httpd -f -p 8080 -h /srv"]
        ports:
        - {{name: http, containerPort: 8080}}
"#
    )
}

/// A busybox HTTP server pod serving `body` on `port`.
pub fn web_pod(name: &str, port: u16, body: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels:
    app: {name}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: busybox
    command: ["sh", "-c", "mkdir -p /srv && echo {body} > /srv/index.html && exec httpd -f -v -p {port} -h /srv"]
    ports:
    - containerPort: {port}
"#
    )
}

/// Sets `flag` on the first SIGINT or SIGTERM (saying so on stderr as
/// `what`), from a thread of its own: the benchmark examples' loops check
/// it and their guards clean up.
pub fn stop_on_signal(what: &'static str, flag: &'static std::sync::atomic::AtomicBool) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("{what}: interrupted; cleaning up");
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn dechunks_chunked_bodies() {
        assert_eq!(super::dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
