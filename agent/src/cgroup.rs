//! Pod cgroups, read and removed through cgroupfs.
//!
//! runc creates them from the OCI spec's `cgroupsPath`
//! (`/<containerd-ns>/<pod-uid>/<container>`); the agent only reads usage
//! and removes the pod's directories at teardown. Both layouts are handled:
//! pure cgroup v2 (`/sys/fs/cgroup/cgroup.controllers` exists) and the v1
//! hybrid (controllers under `/sys/fs/cgroup/<ctrl>`, v2 at `unified`).

use std::path::{Path, PathBuf};

/// The host's cgroup layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Unified hierarchy at the root.
    V2(PathBuf),
    /// v1 controllers (plus possibly a unified mount for the rest).
    V1(PathBuf),
}

/// A pod's cpu and memory usage.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Cumulative cpu time in seconds.
    pub cpu_seconds: f64,
    /// Memory usage in bytes.
    pub memory_bytes: u64,
    /// Working set: usage minus inactive file cache.
    pub working_set_bytes: u64,
}

/// CPU throttling of a cgroup (CFS bandwidth control), cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throttling {
    /// Enforcement periods in which the cgroup was throttled.
    pub periods: u64,
    /// Total time the cgroup's tasks were throttled, in seconds.
    pub seconds: f64,
}

impl Layout {
    /// Detects the layout under `root` (normally /sys/fs/cgroup).
    pub fn detect(root: &Path) -> Self {
        if root.join("cgroup.controllers").exists() {
            Self::V2(root.to_path_buf())
        } else {
            Self::V1(root.to_path_buf())
        }
    }

    /// Every directory a cgroup path `rel` has (one per v1 hierarchy).
    pub fn dirs(&self, rel: &str) -> Vec<PathBuf> {
        let rel = rel.trim_start_matches('/');
        match self {
            Self::V2(root) => vec![root.join(rel)],
            Self::V1(root) => std::fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !p.is_symlink())
                .map(|p| p.join(rel))
                .collect(),
        }
    }

    /// Usage of cgroup `rel` (a pod's directory aggregates its containers).
    pub fn usage(&self, rel: &str) -> Option<Usage> {
        let rel = rel.trim_start_matches('/');
        match self {
            Self::V2(root) => {
                let dir = root.join(rel);
                let cpu_us = stat_field(&read(&dir.join("cpu.stat"))?, "usage_usec")?;
                let mem = read(&dir.join("memory.current"))?
                    .trim()
                    .parse::<u64>()
                    .ok()?;
                let inactive = read(&dir.join("memory.stat"))
                    .and_then(|s| stat_field(&s, "inactive_file"))
                    .unwrap_or(0);
                #[expect(clippy::cast_precision_loss, reason = "cpu seconds as a float metric")]
                let cpu_seconds = cpu_us as f64 / 1e6;
                Some(Usage {
                    cpu_seconds,
                    memory_bytes: mem,
                    working_set_bytes: mem.saturating_sub(inactive),
                })
            }
            Self::V1(root) => {
                let cpu_ns = read(&root.join("cpuacct").join(rel).join("cpuacct.usage"))?
                    .trim()
                    .parse::<u64>()
                    .ok()?;
                let mdir = root.join("memory").join(rel);
                let mem = read(&mdir.join("memory.usage_in_bytes"))?
                    .trim()
                    .parse::<u64>()
                    .ok()?;
                let inactive = read(&mdir.join("memory.stat"))
                    .and_then(|s| stat_field(&s, "total_inactive_file"))
                    .unwrap_or(0);
                #[expect(clippy::cast_precision_loss, reason = "cpu seconds as a float metric")]
                let cpu_seconds = cpu_ns as f64 / 1e9;
                Some(Usage {
                    cpu_seconds,
                    memory_bytes: mem,
                    working_set_bytes: mem.saturating_sub(inactive),
                })
            }
        }
    }

    /// How many processes of cgroup `rel` the kernel OOM-killed (the
    /// `oom_kill` counter of `memory.events` on v2, `memory.oom_control` on v1).
    pub fn oom_kills(&self, rel: &str) -> Option<u64> {
        let rel = rel.trim_start_matches('/');
        match self {
            Self::V2(root) => stat_field(&read(&root.join(rel).join("memory.events"))?, "oom_kill"),
            Self::V1(root) => stat_field(
                &read(&root.join("memory").join(rel).join("memory.oom_control"))?,
                "oom_kill",
            ),
        }
    }

    /// CPU throttling of cgroup `rel`: periods throttled and time throttled
    /// (`cpu.stat` of the v1 `cpu` controller: `nr_throttled`,
    /// `throttled_time` in ns; v2: `nr_throttled`, `throttled_usec`). A
    /// cgroup without a CPU limit reads zero.
    pub fn throttling(&self, rel: &str) -> Option<Throttling> {
        let rel = rel.trim_start_matches('/');
        let (text, unit) = match self {
            Self::V2(root) => (read(&root.join(rel).join("cpu.stat"))?, 1e6),
            Self::V1(root) => (read(&root.join("cpu").join(rel).join("cpu.stat"))?, 1e9),
        };
        let key = if matches!(self, Self::V2(_)) {
            "throttled_usec"
        } else {
            "throttled_time"
        };
        #[expect(clippy::cast_precision_loss, reason = "seconds as a float metric")]
        let seconds = stat_field(&text, key).unwrap_or(0) as f64 / unit;
        Some(Throttling {
            periods: stat_field(&text, "nr_throttled").unwrap_or(0),
            seconds,
        })
    }

    /// Removes cgroup `rel` and everything below it, deepest first, in
    /// every hierarchy. Directories still holding processes are left (and
    /// reported); missing ones are fine.
    pub fn remove(&self, rel: &str) {
        for dir in self.dirs(rel) {
            remove_tree(&dir);
        }
    }
}

fn remove_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove cgroup");
    }
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v2_and_v1_layouts() {
        let base = std::env::temp_dir().join(format!("weir-cg-{}", std::process::id()));
        let v2 = base.join("v2");
        std::fs::create_dir_all(v2.join("ns/pod")).expect("mkdir");
        std::fs::write(v2.join("cgroup.controllers"), "cpu memory").expect("write");
        std::fs::write(
            v2.join("ns/pod/cpu.stat"),
            "usage_usec 2500000\nuser_usec 1\n",
        )
        .expect("write");
        std::fs::write(v2.join("ns/pod/memory.current"), "1000\n").expect("write");
        std::fs::write(v2.join("ns/pod/memory.stat"), "anon 1\ninactive_file 400\n")
            .expect("write");
        std::fs::write(
            v2.join("ns/pod/memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .expect("write");
        let l = Layout::detect(&v2);
        assert_eq!(l.oom_kills("ns/pod"), Some(1));
        std::fs::write(
            v2.join("ns/pod/cpu.stat"),
            "usage_usec 2500000\nnr_periods 10\nnr_throttled 4\nthrottled_usec 1500000\n",
        )
        .expect("write");
        let t = l.throttling("/ns/pod").expect("throttling");
        assert_eq!(t.periods, 4);
        assert!((t.seconds - 1.5).abs() < 1e-9);
        assert!(matches!(l, Layout::V2(_)));
        let u = l.usage("/ns/pod").expect("usage");
        assert!((u.cpu_seconds - 2.5).abs() < 1e-9);
        assert_eq!(u.working_set_bytes, 600);

        let v1 = base.join("v1");
        std::fs::create_dir_all(v1.join("cpuacct/ns/pod")).expect("mkdir");
        std::fs::create_dir_all(v1.join("memory/ns/pod")).expect("mkdir");
        std::fs::write(v1.join("cpuacct/ns/pod/cpuacct.usage"), "3000000000\n").expect("write");
        std::fs::write(v1.join("memory/ns/pod/memory.usage_in_bytes"), "5000\n").expect("write");
        std::fs::write(
            v1.join("memory/ns/pod/memory.stat"),
            "cache 1\ntotal_inactive_file 1000\n",
        )
        .expect("write");
        std::fs::write(
            v1.join("memory/ns/pod/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .expect("write");
        let l = Layout::detect(&v1);
        assert!(matches!(l, Layout::V1(_)));
        assert_eq!(l.oom_kills("ns/pod"), Some(2));
        assert_eq!(l.throttling("ns/pod"), None, "no cpu controller directory");
        std::fs::create_dir_all(v1.join("cpu/ns/pod")).expect("mkdir");
        std::fs::write(
            v1.join("cpu/ns/pod/cpu.stat"),
            "nr_periods 7\nnr_throttled 3\nthrottled_time 250000000\n",
        )
        .expect("write");
        let t = l.throttling("ns/pod").expect("throttling");
        assert_eq!(t.periods, 3);
        assert!((t.seconds - 0.25).abs() < 1e-9);
        let u = l.usage("ns/pod").expect("usage");
        assert!((u.cpu_seconds - 3.0).abs() < 1e-9);
        assert_eq!((u.memory_bytes, u.working_set_bytes), (5000, 4000));
        // cgroupfs directories hold only virtual files and rmdir works on
        // them; model that with empty directories.
        std::fs::create_dir_all(v1.join("pids/ns/pod2/c")).expect("mkdir");
        l.remove("ns/pod2");
        assert!(!v1.join("pids/ns/pod2").exists());
        assert!(v1.join("pids/ns").exists());
        std::fs::remove_dir_all(&base).expect("cleanup");
    }
}
