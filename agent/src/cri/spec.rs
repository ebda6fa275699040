//! The OCI runtime spec for one container of a pod.
//!
//! Close to containerd's default Unix spec, plus what makes it a pod member:
//! the pod's network namespace by path, the pod's cgroup parent, resource
//! limits from the Pod spec and the shim-group annotation that puts all of a
//! pod's containers in one runc shim.

use std::path::Path;

use serde_json::{Value, json};

/// Annotation that makes containerd's runc v2 shim serve every container
/// with the same value from one shim process.
pub const SHIM_GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";

/// CFS period weir uses for cpu limits, as kubelet does.
const CPU_PERIOD_US: u64 = 100_000;

/// What the spec is built from.
pub struct SpecParams<'a> {
    /// Process args (entrypoint + args, already resolved against the image).
    pub args: Vec<String>,
    /// `NAME=value` environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: &'a str,
    /// Hostname (the pod name).
    pub hostname: &'a str,
    /// Path of the pod's network namespace.
    pub netns: &'a Path,
    /// cgroupsPath, e.g. `/weir-node-1/<pod-uid>/<container>`.
    pub cgroups_path: &'a str,
    /// Shim group (the pod uid).
    pub shim_group: &'a str,
    /// The pod's /etc/hosts file on the node.
    pub hosts_file: Option<&'a Path>,
    /// The pod's /etc/resolv.conf file on the node (None: the image's own).
    pub resolv_file: Option<&'a Path>,
    /// cpu request in millicores.
    pub cpu_request_millis: Option<u64>,
    /// cpu limit in millicores.
    pub cpu_limit_millis: Option<u64>,
    /// memory limit in bytes.
    pub memory_limit_bytes: Option<u64>,
}

/// cpu shares for a request, as kubelet computes them (min 2).
pub fn cpu_shares(request_millis: u64) -> u64 {
    (request_millis * 1024 / 1000).max(2)
}

/// CFS quota for a limit over [`CPU_PERIOD_US`] (min 1 ms, as kubelet).
pub fn cpu_quota(limit_millis: u64) -> u64 {
    (limit_millis * CPU_PERIOD_US / 1000).max(1000)
}

/// Builds the spec.
pub fn build(p: &SpecParams<'_>) -> Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
    ];
    if let Some(hosts) = p.hosts_file {
        mounts.push(json!({"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]}));
    }
    if let Some(resolv) = p.resolv_file {
        mounts.push(json!({"destination": "/etc/resolv.conf", "type": "bind", "source": resolv, "options": ["rbind", "ro"]}));
    }
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    let request = p.cpu_request_millis.or(p.cpu_limit_millis);
    if request.is_some() || p.cpu_limit_millis.is_some() {
        let mut cpu = serde_json::Map::new();
        if let Some(r) = request {
            cpu.insert("shares".into(), json!(cpu_shares(r)));
        }
        if let Some(l) = p.cpu_limit_millis {
            cpu.insert("quota".into(), json!(cpu_quota(l)));
            cpu.insert("period".into(), json!(CPU_PERIOD_US));
        }
        resources["cpu"] = Value::Object(cpu);
    }
    if let Some(m) = p.memory_limit_bytes {
        resources["memory"] = json!({"limit": m});
    }
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": p.args,
            "env": p.env,
            "cwd": p.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": p.hostname,
        "mounts": mounts,
        "annotations": {SHIM_GROUP_ANNOTATION: p.shim_group},
        "linux": {
            "cgroupsPath": p.cgroups_path,
            "resources": resources,
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": p.netns}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SpecParams<'static> {
        SpecParams {
            args: vec!["httpd".into(), "-f".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/",
            hostname: "web",
            netns: Path::new("/run/weir/netns/n1/uid"),
            cgroups_path: "/weir-n1/uid/web",
            shim_group: "uid",
            hosts_file: None,
            resolv_file: None,
            cpu_request_millis: Some(250),
            cpu_limit_millis: Some(500),
            memory_limit_bytes: Some(64 << 20),
        }
    }

    #[test]
    fn resources_follow_kubelet() {
        let s = build(&params());
        let r = &s["linux"]["resources"];
        assert_eq!(r["cpu"]["shares"], 256);
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["memory"]["limit"], 64 << 20);
        assert_eq!(cpu_shares(1), 2);
        assert_eq!(cpu_quota(1), 1000);
    }

    #[test]
    fn limit_alone_also_sets_shares() {
        let s = build(&SpecParams {
            cpu_request_millis: None,
            memory_limit_bytes: None,
            ..params()
        });
        assert_eq!(s["linux"]["resources"]["cpu"]["shares"], 512);
        assert!(s["linux"]["resources"].get("memory").is_none());
    }

    #[test]
    fn resolv_conf_is_mounted_only_when_given() {
        let dests = |s: &Value| -> Vec<String> {
            s["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["destination"].as_str().unwrap().to_owned())
                .collect()
        };
        assert!(!dests(&build(&params())).contains(&"/etc/resolv.conf".to_owned()));
        let resolv = Path::new("/run/weir/n1/pods/uid/resolv.conf");
        let s = build(&SpecParams {
            resolv_file: Some(resolv),
            ..params()
        });
        assert!(dests(&s).contains(&"/etc/resolv.conf".to_owned()));
    }

    #[test]
    fn joins_pod_netns_and_shim_group() {
        let s = build(&params());
        let ns = s["linux"]["namespaces"]
            .as_array()
            .expect("namespaces is an array");
        assert!(
            ns.iter()
                .any(|n| n["type"] == "network" && n["path"] == "/run/weir/netns/n1/uid")
        );
        assert_eq!(s["annotations"][SHIM_GROUP_ANNOTATION], "uid");
        assert_eq!(s["linux"]["cgroupsPath"], "/weir-n1/uid/web");
        assert_eq!(s["process"]["args"][0], "httpd");
    }
}
