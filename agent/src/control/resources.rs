//! What the node offers: capacity (CPUs, memory, pod slots) and what is
//! left for pods after a small reserve for the system and the agent.

use weir_proto::v1;

/// Pods one node runs at most (kubelet's default).
pub const MAX_PODS: i64 = 110;
/// CPU kept back from pods, in millicores.
pub const RESERVED_CPU_MILLIS: i64 = 100;
/// Memory kept back from pods, in bytes.
pub const RESERVED_MEMORY_BYTES: i64 = 256 << 20;

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<i64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The node's capacity: CPUs this process may use, total memory, pods.
pub fn capacity() -> v1::Resources {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .as_deref()
        .and_then(mem_total)
        .unwrap_or(0);
    v1::Resources {
        cpu_millis: i64::try_from(cpus).unwrap_or(i64::MAX / 1000) * 1000,
        memory_bytes: memory,
        pods: MAX_PODS,
    }
}

/// Capacity minus the reserve (never below zero).
pub fn allocatable(capacity: &v1::Resources) -> v1::Resources {
    v1::Resources {
        cpu_millis: (capacity.cpu_millis - RESERVED_CPU_MILLIS).max(0),
        memory_bytes: (capacity.memory_bytes - RESERVED_MEMORY_BYTES).max(0),
        pods: capacity.pods,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memtotal_and_reserves_a_little() {
        let text = "MemTotal:        8000000 kB\nMemFree:         100 kB\n";
        assert_eq!(mem_total(text), Some(8_000_000 * 1024));
        assert_eq!(mem_total("nothing"), None);
        let cap = v1::Resources {
            cpu_millis: 2000,
            memory_bytes: 1 << 30,
            pods: 110,
        };
        let a = allocatable(&cap);
        assert_eq!(a.cpu_millis, 1900);
        assert_eq!(a.memory_bytes, (1 << 30) - (256 << 20));
        assert_eq!(a.pods, 110);
        let tiny = v1::Resources {
            cpu_millis: 50,
            memory_bytes: 1,
            pods: 1,
        };
        assert_eq!(allocatable(&tiny).cpu_millis, 0);
        assert!(capacity().cpu_millis >= 1000);
    }
}
