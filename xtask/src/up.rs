//! `cargo xtask up` / `down`: a single-node weir on this machine.
//!
//! The machine plays the datacenter: a host bridge `weir-br0`
//! (10.250.0.1/24), a node network namespace `weir-node-1` (10.250.0.2) on
//! it, routes from the host to the node's pod CIDR, and `unreachable` routes
//! for the cluster and service CIDRs so nothing of them leaves the machine.
//! containerd runs with weir's own config and paths; weir-agent runs in the
//! node namespace (it enters it itself) and the manifests in `examples/`
//! become its pods.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::workspace_root;

const NODE: &str = "weir-node-1";
const BRIDGE: &str = "weir-br0";
const HOST_IP: &str = "10.250.0.1";
const NODE_IP: &str = "10.250.0.2";
const POD_CIDR: &str = "10.244.1.0/24";
const GUARDED: [&str; 2] = ["10.244.0.0/16", "10.96.0.0/16"];
const CONTAINERD_DIR: &str = "/run/weir/containerd";
const CONTAINERD_ROOT: &str = "/var/lib/weir/containerd";

fn socket() -> PathBuf {
    Path::new(CONTAINERD_DIR).join("containerd.sock")
}

fn manifests() -> PathBuf {
    PathBuf::from("/etc/weir").join(NODE).join("manifests")
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

fn node_network() -> anyhow::Result<()> {
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
    if !ip(&["netns", "list"])?
        .lines()
        .any(|l| l.split_whitespace().next() == Some(NODE))
    {
        weir_tests::add_node_netns(NODE, "weir-n1-up", BRIDGE, NODE_IP, HOST_IP)?;
    }
    if ip(&["route", "show", POD_CIDR])?.trim().is_empty() {
        ip(&["route", "add", POD_CIDR, "via", NODE_IP])?;
    }
    Ok(())
}

fn start_agent(agent: &Path, image_dir: &Path) -> anyhow::Result<()> {
    let pidfile = PathBuf::from("/run/weir").join(format!("{NODE}.agent.pid"));
    if let Some(pid) = pid_alive(&pidfile) {
        eprintln!("weir-agent already running (pid {pid})");
        return Ok(());
    }
    std::fs::create_dir_all("/var/log/weir")?;
    let log_path = PathBuf::from("/var/log/weir").join(format!("{NODE}.agent.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let child = Command::new(agent)
        .args([
            "--node-name",
            NODE,
            "--netns",
            &format!("/run/netns/{NODE}"),
            "--node-ip",
            NODE_IP,
        ])
        .args(["--pod-cidr", POD_CIDR])
        .arg("--containerd-socket")
        .arg(socket())
        .arg("--manifest-dir")
        .arg(manifests())
        .arg("--image-dir")
        .arg(image_dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start weir-agent")?;
    std::fs::write(&pidfile, child.id().to_string())?;
    eprintln!(
        "weir-agent started (pid {}, log {})",
        child.id(),
        log_path.display()
    );
    Ok(())
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let (code, body) =
        weir_tests::http_get(addr.parse().ok()?, path, Duration::from_secs(5)).ok()?;
    (code == 200).then_some(body)
}

fn pods() -> Vec<serde_json::Value> {
    http_get(&format!("{NODE_IP}:10250"), "/api/v1/pods")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

/// Brings up the node and runs the examples through it.
pub fn up() -> anyhow::Result<()> {
    crate::setup::setup()?;
    let root = workspace_root();
    crate::cargo(&["build", "-p", "weir-agent"])?;
    let image_dir = crate::image::default_out_dir();
    crate::image::build_busybox_image(&image_dir)?;
    start_containerd()?;
    node_network()?;
    std::fs::create_dir_all(manifests())?;
    start_agent(&root.join("target/debug/weir-agent"), &image_dir)?;
    weir_tests::wait_for("weir-agent API", Duration::from_secs(30), || {
        http_get(&format!("{NODE_IP}:10250"), "/healthz")
    })?;
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root.join("examples"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    for e in &examples {
        let name = e.file_name().context("example file name")?;
        std::fs::copy(e, manifests().join(name))?;
        eprintln!("applied {}", e.display());
    }
    let running = weir_tests::wait_for("example pods Running", Duration::from_secs(90), || {
        let p = pods();
        let all = !p.is_empty() && p.iter().all(|p| p["status"]["phase"] == "Running");
        (all && p.len() >= examples.len()).then_some(p)
    })?;
    demo(&running)?;
    let metrics = http_get(&format!("{NODE_IP}:10250"), "/metrics").unwrap_or_default();
    println!("\nTraffic counted in eBPF (http://{NODE_IP}:10250/metrics):");
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("weir_pod_network_receive_bytes_total{"))
    {
        println!("  {l}");
    }
    println!(
        "\nweir is up. Pod manifests: {} (add, change or remove files)\nAPI: http://{NODE_IP}:10250/api/v1/pods  logs: /var/log/weir/{NODE}.agent.log\nTear down: cargo xtask down",
        manifests().display()
    );
    Ok(())
}

/// Shows the pods and HTTP from the host to each pod and between pods.
fn demo(running: &[serde_json::Value]) -> anyhow::Result<()> {
    println!("\nPods on {NODE}:");
    println!("{:<12} {:<10} {:<14} RESTARTS", "NAME", "STATUS", "IP");
    let mut webs = Vec::new();
    for p in running {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        let ip = p["status"]["podIP"].as_str().unwrap_or("");
        let restarts = p["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0);
        println!(
            "{name:<12} {:<10} {ip:<14} {restarts}",
            p["status"]["phase"].as_str().unwrap_or("")
        );
        let port = p["spec"]["containers"][0]["ports"][0]["containerPort"].as_i64();
        if let Some(port) = port {
            webs.push((
                name.to_owned(),
                ip.to_owned(),
                port,
                p["metadata"]["uid"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    println!();
    for (name, ip, port, _) in &webs {
        let body = weir_tests::wait_for(
            &format!("{name} answering the host"),
            Duration::from_secs(20),
            || http_get(&format!("{ip}:{port}"), "/"),
        )?;
        println!("host -> {name} ({ip}:{port}): {}", body.trim());
    }
    for (from, _, _, uid) in &webs {
        for (to, ip, port, _) in &webs {
            if from == to {
                continue;
            }
            let netns = format!("--net=/run/weir/netns/{NODE}/{uid}");
            let out = Command::new("nsenter")
                .args([
                    netns.as_str(),
                    "busybox",
                    "wget",
                    "-qO-",
                    &format!("http://{ip}:{port}/"),
                ])
                .output()
                .context("nsenter")?;
            if !out.status.success() {
                bail!(
                    "{from} -> {to}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            println!(
                "{from} -> {to} ({ip}:{port}): {}",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }
    Ok(())
}

/// Stops the node: pods removed through the agent, then the agent,
/// containerd, namespaces, bridge and routes.
pub fn down() -> anyhow::Result<()> {
    if let Ok(entries) = std::fs::read_dir(manifests()) {
        for e in entries.flatten() {
            std::fs::remove_file(e.path())?;
        }
    }
    let agent_pid = PathBuf::from("/run/weir").join(format!("{NODE}.agent.pid"));
    if let Some(pid) = pid_alive(&agent_pid) {
        let gone = weir_tests::wait_for("pods removed", Duration::from_mins(1), || {
            pods().is_empty().then_some(())
        });
        if let Err(e) = gone {
            eprintln!("warning: {e}");
        }
        quiet("kill", &[&pid.to_string()]);
        let _ = std::fs::remove_file(&agent_pid);
    }
    let cd_pid = Path::new(CONTAINERD_DIR).join("containerd.pid");
    if let Some(pid) = pid_alive(&cd_pid) {
        quiet("kill", &[&pid.to_string()]);
        let _ = std::fs::remove_file(&cd_pid);
    }
    quiet("ip", &["route", "del", POD_CIDR]);
    quiet("ip", &["netns", "del", NODE]);
    quiet("ip", &["link", "del", BRIDGE]);
    for cidr in GUARDED {
        quiet("ip", &["route", "del", "unreachable", cidr]);
    }
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/weir/{NODE}"));
    let netns_dir = format!("/run/weir/netns/{NODE}");
    quiet("umount", &["-l", &netns_dir]);
    let _ = std::fs::remove_dir(&netns_dir);
    let _ = std::fs::remove_dir_all(format!("/run/weir/{NODE}"));
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(hierarchy.path().join(format!("weir-{NODE}")));
    }
    eprintln!("weir is down");
    Ok(())
}
