//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to
//! build and run weir (apt packages, bpf-linker, rust-src for nightly) and
//! skips whatever is already there.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages weir builds and runs with, and what each is for.
const PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links the eBPF programs with LLVM 22",
    ),
    ("libpolly-22-dev", "bpf-linker's LLVM 22 link dependency"),
    ("libzstd-dev", "bpf-linker's LLVM 22 link dependency"),
    (
        "protobuf-compiler",
        "containerd-client's build script runs protoc",
    ),
    (
        "libprotobuf-dev",
        "protoc's well-known types (google/protobuf/*.proto), imported by etcd-client's protos",
    ),
    ("containerd", "the container runtime weir-agent drives"),
    ("runc", "the OCI runtime under containerd"),
    ("busybox-static", "the binary of the local busybox image"),
    (
        "iproute2",
        "tests and `xtask up` build node namespaces with ip",
    ),
    ("bpftool", "tests observe the attached eBPF programs"),
    (
        "util-linux",
        "nsenter, for tests that look inside namespaces",
    ),
    ("procps", "pkill, for test cleanup"),
    ("wrk", "`bench lb` drives HTTP load with wrk"),
    (
        "iptables",
        "`bench lb`'s kube-proxy baseline (iptables-nft and iptables-legacy)",
    ),
    (
        "etcd-server",
        "the etcd store backend's tests start an etcd",
    ),
    (
        "prometheus",
        "the Prometheus test scrapes the agents' /metrics and queries PromQL",
    ),
];

fn have_package(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Installs whatever is missing.
pub fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !have_package(p))
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let has_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_linker {
        eprintln!("xtask setup: installing bpf-linker (about a minute)");
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    let src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        });
    if !src {
        eprintln!("xtask setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    ensure_bpffs()
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there, as systemd
/// does at boot on most distributions (some VMs boot without it). The
/// agent does the same for itself; tests that pin before any agent ran
/// need it first.
fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    });
    if !mounted {
        eprintln!("xtask setup: mounting bpffs at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}
