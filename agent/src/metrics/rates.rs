//! Cumulative readings and the per-second rates between two of them.

use std::collections::BTreeMap;

use weir_common::{SockStats, TrafficCounters};

/// Cumulative readings of one pod (or a node's sum) at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reading {
    /// CPU time used, seconds.
    pub cpu_seconds: f64,
    /// Time throttled by CFS bandwidth control, seconds.
    pub throttled_seconds: f64,
    /// Periods throttled.
    pub throttled_periods: u64,
    /// Memory usage, bytes.
    pub memory_usage_bytes: u64,
    /// Working set (usage minus inactive file cache), bytes.
    pub memory_working_set_bytes: u64,
    /// Processes the kernel OOM-killed.
    pub oom_kills: u64,
    /// Packets and bytes delivered to and sent by the pod (eBPF).
    pub net: TrafficCounters,
    /// Packets the kernel dropped on their way to the pod.
    pub receive_drops: u64,
    /// Packets the kernel dropped on their way from the pod.
    pub transmit_drops: u64,
    /// TCP statistics of the pod's IP (eBPF).
    pub tcp: SockStats,
}

impl core::ops::Add for Reading {
    type Output = Self;

    /// Sums two readings (node totals).
    fn add(self, o: Self) -> Self {
        Self {
            cpu_seconds: self.cpu_seconds + o.cpu_seconds,
            throttled_seconds: self.throttled_seconds + o.throttled_seconds,
            throttled_periods: self.throttled_periods + o.throttled_periods,
            memory_usage_bytes: self.memory_usage_bytes + o.memory_usage_bytes,
            memory_working_set_bytes: self.memory_working_set_bytes + o.memory_working_set_bytes,
            oom_kills: self.oom_kills + o.oom_kills,
            net: self.net + o.net,
            receive_drops: self.receive_drops + o.receive_drops,
            transmit_drops: self.transmit_drops + o.transmit_drops,
            tcp: self.tcp + o.tcp,
        }
    }
}

/// Increase of a counter from `prev` to `cur`; a counter that went down
/// was reset (a recreated cgroup or map entry) and counts from zero.
fn delta(prev: u64, cur: u64) -> u64 {
    if cur >= prev { cur - prev } else { cur }
}

#[expect(clippy::cast_precision_loss, reason = "rates are float metrics")]
fn per_second(prev: u64, cur: u64, secs: f64) -> f64 {
    delta(prev, cur) as f64 / secs
}

/// CPU cores used between two readings `secs` apart (a reset counts from 0).
#[must_use]
pub fn cpu_cores(prev: &Reading, cur: &Reading, secs: f64) -> f64 {
    let d = if cur.cpu_seconds >= prev.cpu_seconds {
        cur.cpu_seconds - prev.cpu_seconds
    } else {
        cur.cpu_seconds
    };
    if secs > 0.0 { d / secs } else { 0.0 }
}

/// The named per-second values between `prev` and `cur`, `secs` apart,
/// with `prefix` `weir_pod` or `weir_node` (the contract's `values` keys).
/// `weir_*_tcp_srtt_seconds` is the mean smoothed RTT of the samples taken
/// in the window, absent if there were none. Empty if `secs` is not positive.
#[must_use]
pub fn values(prefix: &str, prev: &Reading, cur: &Reading, secs: f64) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if secs <= 0.0 {
        return out;
    }
    let mut put = |name: &str, v: f64| {
        out.insert(format!("{prefix}_{name}"), v);
    };
    let (p, c) = (prev, cur);
    put(
        "new_connections_per_second",
        per_second(
            p.tcp.opened + p.tcp.accepted,
            c.tcp.opened + c.tcp.accepted,
            secs,
        ),
    );
    put(
        "tcp_retransmits_per_second",
        per_second(p.tcp.retransmits, c.tcp.retransmits, secs),
    );
    let samples = delta(p.tcp.rtt_samples, c.tcp.rtt_samples);
    if samples > 0 {
        let sum = delta(p.tcp.srtt_sum, c.tcp.srtt_sum);
        // srtt is kept as microseconds << 3.
        #[expect(clippy::cast_precision_loss, reason = "a float metric")]
        let mean = sum as f64 / samples as f64 / 8.0 / 1e6;
        put("tcp_srtt_seconds", mean);
    }
    put(
        "network_receive_bytes_per_second",
        per_second(p.net.rx_bytes, c.net.rx_bytes, secs),
    );
    put(
        "network_transmit_bytes_per_second",
        per_second(p.net.tx_bytes, c.net.tx_bytes, secs),
    );
    put(
        "network_receive_packets_per_second",
        per_second(p.net.rx_packets, c.net.rx_packets, secs),
    );
    put(
        "network_transmit_packets_per_second",
        per_second(p.net.tx_packets, c.net.tx_packets, secs),
    );
    put(
        "network_receive_drops_per_second",
        per_second(p.receive_drops, c.receive_drops, secs),
    );
    put(
        "network_transmit_drops_per_second",
        per_second(p.transmit_drops, c.transmit_drops, secs),
    );
    let throttled = if c.throttled_seconds >= p.throttled_seconds {
        c.throttled_seconds - p.throttled_seconds
    } else {
        c.throttled_seconds
    };
    put("cpu_throttled_seconds_per_second", throttled / secs);
    #[expect(clippy::cast_precision_loss, reason = "a float metric")]
    put("oom_kills", c.oom_kills as f64);
    out
}

#[cfg(test)]
#[allow(clippy::float_cmp, reason = "the values are exact in binary")]
mod tests {
    use super::*;

    fn reading(cpu: f64, conns: u64, rx_bytes: u64) -> Reading {
        Reading {
            cpu_seconds: cpu,
            net: TrafficCounters {
                rx_bytes,
                ..TrafficCounters::default()
            },
            tcp: SockStats {
                opened: conns,
                accepted: conns,
                ..SockStats::default()
            },
            ..Reading::default()
        }
    }

    #[test]
    fn rates_are_deltas_over_the_window() {
        let a = reading(10.0, 5, 1000);
        let mut b = reading(12.0, 15, 5000);
        b.tcp.retransmits = 4;
        b.tcp.rtt_samples = 2;
        b.tcp.srtt_sum = 8 * 300; // 150 us mean
        b.throttled_seconds = 0.5;
        b.oom_kills = 3;
        assert!((cpu_cores(&a, &b, 2.0) - 1.0).abs() < 1e-9);
        let v = values("weir_pod", &a, &b, 2.0);
        assert_eq!(v["weir_pod_new_connections_per_second"], 10.0);
        assert_eq!(v["weir_pod_tcp_retransmits_per_second"], 2.0);
        assert!((v["weir_pod_tcp_srtt_seconds"] - 150e-6).abs() < 1e-12);
        assert_eq!(v["weir_pod_network_receive_bytes_per_second"], 2000.0);
        assert_eq!(v["weir_pod_network_transmit_bytes_per_second"], 0.0);
        assert_eq!(v["weir_pod_cpu_throttled_seconds_per_second"], 0.25);
        assert_eq!(v["weir_pod_oom_kills"], 3.0);
        assert_eq!(v.len(), 11, "{v:?}");
    }

    #[test]
    fn no_rtt_samples_no_srtt_and_resets_count_from_zero() {
        let a = reading(10.0, 50, 9000);
        let b = reading(0.5, 2, 100);
        let v = values("weir_node", &a, &b, 1.0);
        assert!(!v.contains_key("weir_node_tcp_srtt_seconds"));
        assert_eq!(v["weir_node_new_connections_per_second"], 4.0);
        assert_eq!(v["weir_node_network_receive_bytes_per_second"], 100.0);
        assert!((cpu_cores(&a, &b, 1.0) - 0.5).abs() < 1e-9);
        assert!(values("weir_pod", &a, &b, 0.0).is_empty());
    }

    #[test]
    fn readings_add_up() {
        let s = reading(1.0, 1, 10) + reading(2.0, 2, 20);
        assert!((s.cpu_seconds - 3.0).abs() < 1e-9);
        assert_eq!(s.tcp.opened, 3);
        assert_eq!(s.net.rx_bytes, 30);
    }
}
