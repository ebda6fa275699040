//! Small helpers shared by the benchmarks: commands, bounded waits, a plain
//! HTTP client, `/proc` readings and statistics.

use std::{fs::File, path::Path, time::Duration};

use anyhow::Context as _;
use nix::sys::signal::Signal;

pub(crate) use weir_tests::{
    http_get, remove_cgroup_tree, sh, sh_quiet, wait_for_every as wait_for,
};

/// Moves the calling thread (only it) into the network namespace at `path`.
/// Sockets it opens and processes it spawns afterwards live there.
pub(crate) fn enter_netns(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path).with_context(|| format!("open netns {}", path.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter netns {}", path.display()))
}

/// The arguments of process `pid`, if it exists.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Sends `sig` to `pid` (a process this bench started, named by its id).
pub(crate) fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// SIGKILLs `pid` if its command line satisfies `ours` (guards against a
/// recycled pid), and waits up to 5 s for it to go.
pub(crate) fn kill_if(pid: u32, ours: impl Fn(&[String]) -> bool) {
    if !cmdline(pid).is_some_and(|c| ours(&c)) {
        return;
    }
    signal(pid, Signal::SIGKILL);
    let _ = wait_for(
        "process exit",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || cmdline(pid).is_none_or(|c| c.is_empty()).then_some(()),
    );
}

/// Every process whose arguments satisfy `pred`.
pub(crate) fn pids_where(pred: impl Fn(&[String]) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| cmdline(*pid).is_some_and(|c| pred(&c)))
        .collect()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in bytes.
pub(crate) fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.split(':').next() == Some(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad line {line:?}"))?;
    Ok(kb * 1024)
}

/// utime + stime of process `pid` (all its threads), in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let get = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {} of /proc/{pid}/stat", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub(crate) fn clock_ticks_per_sec() -> anyhow::Result<u64> {
    sh("getconf", &["CLK_TCK"])?
        .trim()
        .parse()
        .context("parse getconf CLK_TCK")
}

/// A count as a float, for ratios and percentages.
#[expect(clippy::cast_precision_loss, reason = "counts here are far below 2^52")]
pub(crate) fn f64_of(n: u64) -> f64 {
    n as f64
}

/// Milliseconds, rounded to 0.1 ms.
pub(crate) fn ms(d: Duration) -> f64 {
    round1(d.as_secs_f64() * 1000.0)
}

/// Rounded to one decimal.
pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Rounded to three decimals.
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted, non-empty `v`.
pub(crate) fn percentile(sorted: &[Duration], p: u32) -> Duration {
    let n = sorted.len();
    // ceil(p/100 * n), at least 1: the smallest value with p % at or below it.
    let rank = (usize::try_from(p).unwrap_or(100) * n).div_ceil(100).max(1);
    sorted[rank.min(n) - 1]
}

/// p50/p90/p99/max of start latencies, as a JSON object in ms.
pub(crate) fn latency_summary(lat: &[Duration]) -> serde_json::Value {
    let mut v = lat.to_vec();
    v.sort();
    let max = v.last().copied().unwrap_or_default();
    serde_json::json!({
        "p50_ms": ms(percentile(&v, 50)),
        "p90_ms": ms(percentile(&v, 90)),
        "p99_ms": ms(percentile(&v, 99)),
        "max_ms": ms(max),
        // The burst's wall time: t0 to the last pod's first connect.
        "wall_ms": ms(max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=50).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50), Duration::from_millis(25));
        assert_eq!(percentile(&v, 90), Duration::from_millis(45));
        assert_eq!(percentile(&v, 99), Duration::from_millis(50));
        let one = [Duration::from_millis(7)];
        assert_eq!(percentile(&one, 50), Duration::from_millis(7));
        assert_eq!(percentile(&one, 99), Duration::from_millis(7));
    }
}
