//! `cargo xtask up` / `down`: a three-node weir cluster on this machine.
//!
//! The machine plays the datacenter: a host bridge `weir-br0`
//! (10.250.0.1/24) with three node network namespaces on it
//! (`weir-node-1..3`, 10.250.0.2..4), `unreachable` routes for the cluster
//! and service CIDRs so nothing of them leaves the machine, and routes from
//! the host to each node's pod CIDR. weir-control runs on the host with its
//! embedded store; one weir-agent per node runs in the node's namespace (it
//! enters it itself), all sharing one containerd with weir's own config and
//! paths. The manifests in `examples/` (a Deployment of six HTTP servers, a
//! Service in front of them and a client pod) are applied with weirctl and
//! shown answering across nodes, directly and through the Service's
//! `ClusterIP`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::workspace_root;

const NODES: usize = 3;
const BRIDGE: &str = "weir-br0";
const HOST_IP: &str = "10.250.0.1";
const CONTROL_PORT: u16 = 7443;
const GUARDED: [&str; 2] = ["10.244.0.0/16", "10.96.0.0/16"];
const RUN_DIR: &str = "/run/weir";
const LOG_DIR: &str = "/var/log/weir";
const CONTAINERD_DIR: &str = "/run/weir/containerd";
const CONTAINERD_ROOT: &str = "/var/lib/weir/containerd";
const CONTROL_STORE: &str = "/var/lib/weir/control";

/// Node `i` (1-based): its name and IP on the bridge.
fn node(i: usize) -> (String, String) {
    (format!("weir-node-{i}"), format!("10.250.0.{}", i + 1))
}

fn control_url() -> String {
    format!("http://{HOST_IP}:{CONTROL_PORT}")
}

fn socket() -> PathBuf {
    Path::new(CONTAINERD_DIR).join("containerd.sock")
}

fn pidfile(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{name}.pid"))
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn pid_alive(pidfile: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Runs weirctl against the cluster; its stdout, or its stderr as the error.
fn weirctl(args: &[&str]) -> anyhow::Result<String> {
    let bin = workspace_root().join("target/debug/weirctl");
    let out = Command::new(&bin)
        .args(["--server", &control_url()])
        .args(args)
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "weirctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The items of `weirctl get <what> -o json` (empty if it fails).
fn items(what: &[&str]) -> Vec<Value> {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend(["-o", "json"]);
    weirctl(&args)
        .ok()
        .and_then(|out| serde_json::from_str::<Value>(&out).ok())
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

fn start_containerd() -> anyhow::Result<()> {
    let pidfile = Path::new(CONTAINERD_DIR).join("containerd.pid");
    if pid_alive(&pidfile).is_some() {
        return Ok(());
    }
    let cd = weir_tests::Containerd::start_with_root(
        Path::new(CONTAINERD_DIR),
        Path::new(CONTAINERD_ROOT),
    )?;
    eprintln!("containerd up (socket {})", cd.socket.display());
    std::fs::write(&pidfile, cd.detach().to_string())?;
    Ok(())
}

fn node_networks() -> anyhow::Result<()> {
    for cidr in GUARDED {
        if ip(&["route", "show", "type", "unreachable", cidr])?
            .trim()
            .is_empty()
        {
            ip(&["route", "add", "unreachable", cidr])?;
        }
    }
    if ip(&["link", "show", BRIDGE]).is_err() {
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE])?;
        ip(&["link", "set", BRIDGE, "up"])?;
    }
    let existing = ip(&["netns", "list"])?;
    for i in 1..=NODES {
        let (name, node_ip) = node(i);
        if !existing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str()))
        {
            weir_tests::add_node_netns(&name, &format!("weir-n{i}-up"), BRIDGE, &node_ip, HOST_IP)?;
        }
    }
    Ok(())
}

/// Starts `cmd` in the background unless `name`'s pidfile names a live
/// process; output goes to /var/log/weir/<name>.log.
fn daemon(name: &str, mut cmd: Command) -> anyhow::Result<()> {
    if let Some(pid) = pid_alive(&pidfile(name)) {
        eprintln!("{name} already running (pid {pid})");
        return Ok(());
    }
    std::fs::create_dir_all(LOG_DIR)?;
    std::fs::create_dir_all(RUN_DIR)?;
    let log_path = Path::new(LOG_DIR).join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let child = cmd
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    std::fs::write(pidfile(name), child.id().to_string())?;
    eprintln!(
        "{name} started (pid {}, log {})",
        child.id(),
        log_path.display()
    );
    Ok(())
}

fn start_control(bin: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(CONTROL_STORE)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg(format!("0.0.0.0:{CONTROL_PORT}"))
        .arg("--store")
        .arg(Path::new(CONTROL_STORE).join("weir.redb"));
    daemon("weir-control", cmd)?;
    weir_tests::wait_for("weir-control answering", Duration::from_secs(30), || {
        weirctl(&["get", "namespaces"]).ok()
    })?;
    Ok(())
}

fn start_agent(bin: &Path, i: usize, image_dir: &Path) -> anyhow::Result<()> {
    let (name, node_ip) = node(i);
    let mut cmd = Command::new(bin);
    cmd.args(["--node-name", &name])
        .args(["--netns", &format!("/run/netns/{name}")])
        .args(["--node-ip", &node_ip])
        .args(["--control", &control_url()])
        .arg("--containerd-socket")
        .arg(socket())
        .arg("--image-dir")
        .arg(image_dir);
    daemon(&format!("{name}.agent"), cmd)
}

/// Routes from the host to each node's pod CIDR (as the control assigned
/// them), so the host can reach every pod.
fn host_routes(nodes: &[Value]) -> anyhow::Result<()> {
    for n in nodes {
        let cidr = n["spec"]["podCIDR"].as_str().unwrap_or_default();
        let via = n["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == "InternalIP")
            .and_then(|a| a["address"].as_str())
            .unwrap_or_default();
        if cidr.is_empty() || via.is_empty() {
            bail!(
                "node {} has no pod CIDR or address yet",
                n["metadata"]["name"]
            );
        }
        ip(&["route", "replace", cidr, "via", via])?;
    }
    Ok(())
}

fn ready(node: &Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Brings up the cluster and runs the examples through it.
pub fn up() -> anyhow::Result<()> {
    crate::setup::setup()?;
    let root = workspace_root();
    crate::cargo(&["build", "-p", "weir-agent", "-p", "weir-control"])?;
    let image_dir = crate::image::default_out_dir();
    crate::image::build_busybox_image(&image_dir)?;
    start_containerd()?;
    node_networks()?;
    start_control(&root.join("target/debug/weir-control"))?;
    for i in 1..=NODES {
        start_agent(&root.join("target/debug/weir-agent"), i, &image_dir)?;
    }
    let nodes = weir_tests::wait_for("3 nodes Ready", Duration::from_mins(1), || {
        let nodes = items(&["nodes"]);
        (nodes.len() == NODES && nodes.iter().all(ready)).then_some(nodes)
    })?;
    host_routes(&nodes)?;
    println!("{}", weirctl(&["get", "nodes", "-o", "wide"])?);
    print!(
        "{}",
        weirctl(&["apply", "-f", &root.join("examples").to_string_lossy()])?
    );
    let pods = weir_tests::wait_for("example pods Running", Duration::from_mins(2), || {
        let pods = items(&["pods"]);
        let running = pods
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && !p["status"]["podIP"].is_null())
            .count();
        (running >= 7 && running == pods.len()).then_some(pods)
    })?;
    println!("\n{}", weirctl(&["get", "pods", "-o", "wide"])?);
    demo(&pods)?;
    println!(
        "\nweir is up: weir-control at {url} (WEIR_SERVER={url} weirctl get all), agents on {NODES} nodes.\nLogs: {LOG_DIR}/. Tear down: cargo xtask down",
        url = control_url()
    );
    Ok(())
}

/// HTTP from the client pod to every web pod, across nodes.
fn demo(pods: &[Value]) -> anyhow::Result<()> {
    let client = pods
        .iter()
        .find(|p| p["metadata"]["name"] == "client")
        .context("the client pod from examples/client.yaml")?;
    let client_node = client["spec"]["nodeName"].as_str().unwrap_or_default();
    let netns = format!(
        "--net=/run/weir/netns/{client_node}/{}",
        client["metadata"]["uid"].as_str().unwrap_or_default()
    );
    let mut nodes_used = std::collections::BTreeSet::new();
    println!("client (on {client_node}) -> each web pod over HTTP:");
    for p in pods
        .iter()
        .filter(|p| p["metadata"]["labels"]["app"] == "web")
    {
        let pod_ip = p["status"]["podIP"].as_str().unwrap_or_default();
        let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
        nodes_used.insert(node.to_owned());
        let url = format!("http://{pod_ip}:8080/");
        let body =
            weir_tests::wait_for(&format!("{url} answering"), Duration::from_secs(20), || {
                let out = Command::new("nsenter")
                    .args([netns.as_str(), "busybox", "wget", "-qO-", &url])
                    .output()
                    .ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            })?;
        println!("  -> {pod_ip:<12} on {node:<12} {body}");
    }
    println!(
        "web pods spread over {} nodes: {}",
        nodes_used.len(),
        nodes_used.into_iter().collect::<Vec<_>>().join(", ")
    );
    through_service(&netns)
}

/// HTTP from the client pod to the `web` service's `ClusterIP`: each request
/// is balanced to a ready pod at connect time by the agent's eBPF programs.
fn through_service(netns: &str) -> anyhow::Result<()> {
    let services = items(&["services"]);
    let vip = services
        .iter()
        .find(|s| s["metadata"]["name"] == "web")
        .and_then(|s| s["spec"]["clusterIP"].as_str())
        .context("the web service from examples/web-service.yaml has no clusterIP")?
        .to_owned();
    let url = format!("http://{vip}/");
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..12 {
        let body =
            weir_tests::wait_for(&format!("{url} answering"), Duration::from_secs(20), || {
                let out = Command::new("nsenter")
                    .args([netns, "busybox", "wget", "-qO-", &url])
                    .output()
                    .ok()?;
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            })?;
        *answers.entry(body).or_default() += 1;
    }
    println!("client -> service web ({vip}:80), 12 requests, balanced in eBPF:");
    for (body, n) in answers {
        println!("  {n:>2} x {body}");
    }
    Ok(())
}

/// Stops the cluster: the examples deleted through weirctl (so the agents
/// remove their pods), then the agents, weir-control, containerd,
/// namespaces, bridge, routes and state.
pub fn down() {
    let root = workspace_root();
    if pid_alive(&pidfile("weir-control")).is_some() {
        if let Err(e) = weirctl(&[
            "delete",
            "-f",
            &root.join("examples").to_string_lossy(),
            "--grace-period",
            "1",
        ]) {
            eprintln!("warning: {e}");
        }
        let gone = weir_tests::wait_for("pods removed", Duration::from_mins(1), || {
            weirctl(&["get", "pods", "-A", "-o", "name"])
                .ok()
                .filter(|out| out.trim().is_empty())
        });
        if let Err(e) = gone {
            eprintln!("warning: {e}");
        }
    }
    for i in 1..=NODES {
        stop(&format!("{}.agent", node(i).0));
    }
    stop("weir-control");
    let cd_pid = Path::new(CONTAINERD_DIR).join("containerd.pid");
    if let Some(pid) = pid_alive(&cd_pid) {
        quiet("kill", &[&pid.to_string()]);
        let _ = std::fs::remove_file(&cd_pid);
    }
    // Whatever the delete above didn't stop (weir-control gone, a refused
    // manifest): the shims of weir's containerd, and with them the pods.
    quiet(
        "pkill",
        &[
            "-9",
            "-f",
            &format!("containerd-shim.*-address {}", socket().display()),
        ],
    );
    // Their rootfs mounts, which containerd would have removed.
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        for target in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if target.starts_with(CONTAINERD_DIR) {
                quiet("umount", &["-l", target]);
            }
        }
    }
    for i in 1..=NODES {
        let (name, _) = node(i);
        quiet("ip", &["route", "del", &format!("10.244.{i}.0/24")]);
        quiet("ip", &["netns", "del", &name]);
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/weir/{name}"));
        let netns_dir = format!("/run/weir/netns/{name}");
        for pod in std::fs::read_dir(&netns_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            quiet("umount", &["-l", &pod.path().to_string_lossy()]);
            let _ = std::fs::remove_file(pod.path());
        }
        quiet("umount", &["-l", &netns_dir]);
        let _ = std::fs::remove_dir(&netns_dir);
        let _ = std::fs::remove_dir_all(format!("/run/weir/{name}"));
        let _ = std::fs::remove_dir_all(format!("/var/lib/weir/{name}"));
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let tree = hierarchy.path().join(format!("weir-{name}"));
            kill_cgroup_tree(&tree);
            weir_tests::remove_cgroup_tree(&tree);
        }
    }
    quiet("ip", &["link", "del", BRIDGE]);
    for cidr in GUARDED {
        quiet("ip", &["route", "del", "unreachable", cidr]);
    }
    let _ = std::fs::remove_dir_all(CONTROL_STORE);
    // containerd's runtime state (its rootfs mounts are gone above) and the
    // shared parents, once no other node (a test's) has entries in them.
    let _ = std::fs::remove_dir_all(CONTAINERD_DIR);
    let _ = std::fs::remove_dir_all(CONTAINERD_ROOT);
    for dir in ["/sys/fs/bpf/weir", "/run/weir/netns", RUN_DIR, "/var/lib/weir"] {
        let _ = std::fs::remove_dir(dir);
    }
    eprintln!("weir is down");
}

/// SIGKILLs every process left in a cgroup tree (containers whose shim is
/// gone run on, reparented to init).
fn kill_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            kill_cgroup_tree(&e.path());
        }
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.split_whitespace() {
        quiet("kill", &["-9", pid]);
    }
    if !procs.trim().is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills the process in `name`'s pidfile and waits for it to go.
fn stop(name: &str) {
    let file = pidfile(name);
    if let Some(pid) = pid_alive(&file) {
        quiet("kill", &[&pid.to_string()]);
        let _ = weir_tests::wait_for(&format!("{name} stopped"), Duration::from_secs(10), || {
            pid_alive(&file).is_none().then_some(())
        });
    }
    let _ = std::fs::remove_file(&file);
}
