//! Types shared by weir's eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, has explicit padding and no
//! `bool`, so the kernel and userspace agree on every byte. A unit test pins
//! the size and offset of each field: a layout change must bump the map
//! version in the map's name.
#![no_std]

/// Name of the per-CPU map of per-pod traffic counters, keyed by the ifindex
/// of the pod's host-side veth.
pub const TRAFFIC_MAP: &str = "weir_traffic_v1";

/// Maximum number of pod veths a node counts traffic for.
pub const TRAFFIC_MAP_ENTRIES: u32 = 4096;

/// Name of the TC program on a pod's host-side veth ingress: packets the pod sent.
pub const PROG_FROM_POD: &str = "weir_from_pod";
/// Name of the TC program on a pod's host-side veth egress: packets sent to the pod.
pub const PROG_TO_POD: &str = "weir_to_pod";

/// Key of [`TRAFFIC_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TrafficKey {
    /// ifindex of the pod's host-side veth, in the node's network namespace (host order).
    pub ifindex: u32,
}

/// Value of [`TRAFFIC_MAP`], one per CPU; userspace sums the CPUs.
///
/// "rx"/"tx" are from the pod's point of view: `rx` counts packets delivered
/// to the pod, `tx` packets the pod sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    /// Packets delivered to the pod.
    pub rx_packets: u64,
    /// Bytes (L2 frame length) delivered to the pod.
    pub rx_bytes: u64,
    /// Packets sent by the pod.
    pub tx_packets: u64,
    /// Bytes (L2 frame length) sent by the pod.
    pub tx_bytes: u64,
}

impl core::ops::Add for TrafficCounters {
    type Output = Self;

    /// Adds another CPU's counters to these.
    fn add(self, other: Self) -> Self {
        Self {
            rx_packets: self.rx_packets.wrapping_add(other.rx_packets),
            rx_bytes: self.rx_bytes.wrapping_add(other.rx_bytes),
            tx_packets: self.tx_packets.wrapping_add(other.tx_packets),
            tx_bytes: self.tx_bytes.wrapping_add(other.tx_bytes),
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are repr(C), Copy, have no padding and every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::TrafficKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficCounters {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::{TrafficCounters, TrafficKey};

    #[test]
    fn traffic_layout_is_pinned() {
        assert_eq!(size_of::<TrafficKey>(), 4);
        assert_eq!(offset_of!(TrafficKey, ifindex), 0);
        assert_eq!(size_of::<TrafficCounters>(), 32);
        assert_eq!(offset_of!(TrafficCounters, rx_packets), 0);
        assert_eq!(offset_of!(TrafficCounters, rx_bytes), 8);
        assert_eq!(offset_of!(TrafficCounters, tx_packets), 16);
        assert_eq!(offset_of!(TrafficCounters, tx_bytes), 24);
    }

    #[test]
    fn counters_add_per_field() {
        let a = TrafficCounters {
            rx_packets: 1,
            rx_bytes: 2,
            tx_packets: 3,
            tx_bytes: 4,
        };
        let b = TrafficCounters {
            rx_packets: 10,
            rx_bytes: 20,
            tx_packets: 30,
            tx_bytes: 40,
        };
        assert_eq!(
            a + b,
            TrafficCounters {
                rx_packets: 11,
                rx_bytes: 22,
                tx_packets: 33,
                tx_bytes: 44
            }
        );
    }
}
