//! pod-start's baseline: the same busybox httpd containers started through
//! containerd directly, without weir. Per container, concurrently: a netns
//! (`ip netns add`), the standard CNI `bridge` plugin with `host-local` IPAM
//! run from the baseline node's netns (so its bridge and gateway live
//! there, as weir's veths live in weir's node), then `ctr run -d` joining
//! that netns. Same containerd, image, command, snapshotter and runtime as
//! weir's pods; its own containerd namespace.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Barrier, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    env::{BASE_CTR_NS, BASE_NODE, Containerd, DIR, netns_path},
    pod_start::{Burst, PORT, first_connects},
    probe::Prober,
    util::{enter_netns, sh, sh_quiet},
};

/// Where Debian's containernetworking-plugins puts the plugins.
const CNI_DIR: &str = "/usr/lib/cni";
const CNI_BRIDGE_NAME: &str = "wbenchcni0";
const CNI_SUBNET: &str = "10.244.78.0/24";

/// The baseline's containers (each named like its netns) and what it
/// creates for them; dropping tears down whatever is still there.
pub(crate) struct Baseline<'a> {
    containerd: &'a Containerd,
    live: Mutex<Vec<String>>,
}

/// Installs the CNI plugins when they are missing (Debian puts them in
/// /usr/lib/cni).
pub(crate) fn ensure_cni_plugins() -> anyhow::Result<()> {
    if Path::new(CNI_DIR).join("bridge").exists() && Path::new(CNI_DIR).join("host-local").exists()
    {
        return Ok(());
    }
    eprintln!("bench: installing containernetworking-plugins (the baseline's CNI bridge)");
    sh("apt-get", &["update", "-qq"])?;
    let status = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "containernetworking-plugins",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get")?;
    anyhow::ensure!(
        status.success(),
        "apt-get install containernetworking-plugins failed"
    );
    Ok(())
}

fn cni_conf() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "wbench",
        "type": "bridge",
        "bridge": CNI_BRIDGE_NAME,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "subnet": CNI_SUBNET,
            "dataDir": cni_data_dir(),
        },
    })
    .to_string()
}

fn cni_data_dir() -> PathBuf {
    Path::new(DIR).join("cni")
}

fn log_dir() -> PathBuf {
    Path::new(DIR).join("baseline-logs")
}

impl<'a> Baseline<'a> {
    /// Imports the busybox image tarball into the baseline's namespace.
    pub fn new(containerd: &'a Containerd, image_tar: &Path) -> anyhow::Result<Self> {
        let tar = image_tar.display().to_string();
        containerd
            .ctr(BASE_CTR_NS, &["images", "import", &tar])
            .context("import busybox for the baseline")?;
        std::fs::create_dir_all(log_dir())?;
        Ok(Self {
            containerd,
            live: Mutex::new(Vec::new()),
        })
    }

    /// Starts `n` containers named `<prefix><index>` at once and measures
    /// each one's first successful connect from the baseline node; then
    /// tears them all down.
    pub fn burst(&self, prefix: &str, n: usize, limit: Duration) -> anyhow::Result<Burst> {
        let start_all = Arc::new(Barrier::new(n + 1));
        let prober = Prober::start(&netns_path(BASE_NODE), n, Instant::now() + limit)?;
        let results = std::thread::scope(|s| {
            let workers: Vec<_> = (0..n)
                .map(|i| {
                    let name = format!("{prefix}{i:03}");
                    let start = start_all.clone();
                    let to = prober.sender();
                    s.spawn(move || -> anyhow::Result<()> {
                        // Enter the node first: the CNI plugin runs from
                        // here, and its bridge and veths go in this netns.
                        let entered = enter_netns(&netns_path(BASE_NODE));
                        start.wait();
                        entered?;
                        let ip = self.network(&name)?;
                        let _ = to.send((i, SocketAddr::from((ip, PORT))));
                        self.run_container(&name)
                    })
                })
                .collect();
            let t0 = Instant::now();
            start_all.wait();
            let errors: Vec<String> = workers
                .into_iter()
                .filter_map(|w| match w.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("baseline worker panicked".into()),
                })
                .collect();
            (t0, errors)
        });
        let (t0, errors) = results;
        if let Some(e) = errors.first() {
            // The prober thread gives up on its own at the deadline.
            bail!(
                "{} of {n} baseline containers failed; first: {e}",
                errors.len()
            );
        }
        let up = prober.finish()?;
        let up = first_connects(t0, &up).context("baseline containers")?;
        let teardown = self.teardown();
        Ok(Burst { up, teardown })
    }

    /// netns + CNI ADD; returns the container's IP.
    fn network(&self, name: &str) -> anyhow::Result<Ipv4Addr> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(name.to_owned());
        sh("ip", &["netns", "add", name])?;
        let out = cni("ADD", name)?;
        let result: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("CNI result {out}"))?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no IP in CNI result {out}"))?;
        Ok(ip)
    }

    fn run_container(&self, name: &str) -> anyhow::Result<()> {
        let netns = format!("network:{}", netns_path(name).display());
        let cgroup = format!("/{BASE_CTR_NS}/{name}");
        let log = format!("file://{}", log_dir().join(format!("{name}.log")).display());
        let port = PORT.to_string();
        self.containerd.ctr(
            BASE_CTR_NS,
            &[
                "run",
                "-d",
                "--log-uri",
                &log,
                "--with-ns",
                &netns,
                "--cgroup",
                &cgroup,
                "--snapshotter",
                "overlayfs",
                crate::image::IMAGE_NAME,
                name,
                "httpd",
                "-f",
                "-p",
                &port,
                "-h",
                "/",
            ],
        )?;
        Ok(())
    }

    /// Removes every container, its task, snapshot, CNI network and netns,
    /// all at once; returns how long that took.
    fn teardown(&self) -> Duration {
        let names = std::mem::take(&mut *self.live.lock().unwrap_or_else(PoisonError::into_inner));
        let start = Instant::now();
        std::thread::scope(|s| {
            for name in &names {
                s.spawn(move || {
                    let entered = enter_netns(&netns_path(BASE_NODE));
                    let ctr = |args: &[&str]| {
                        if let Err(e) = self.containerd.ctr(BASE_CTR_NS, args) {
                            let e = format!("{e:#}");
                            if !e.contains("not found") {
                                eprintln!("bench: baseline teardown of {name}: {e}");
                            }
                        }
                    };
                    ctr(&["tasks", "rm", "-f", name]);
                    ctr(&["containers", "rm", name]);
                    if entered.is_ok()
                        && let Err(e) = cni("DEL", name)
                    {
                        eprintln!("bench: baseline teardown of {name}: {e:#}");
                    }
                    sh_quiet("ip", &["netns", "del", name]);
                });
            }
        });
        start.elapsed()
    }
}

impl Drop for Baseline<'_> {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Runs the CNI bridge plugin (from the calling thread's netns); returns
/// its stdout (the result for ADD).
fn cni(command: &str, name: &str) -> anyhow::Result<String> {
    let mut child = Command::new(Path::new(CNI_DIR).join("bridge"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", name)
        .env("CNI_NETNS", netns_path(name))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run the CNI bridge plugin")?;
    child
        .stdin
        .take()
        .context("CNI stdin")?
        .write_all(cni_conf().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "CNI {command} {name}: {} {}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}
