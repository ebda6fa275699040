//! weir's eBPF programs.
//!
//! Traffic counters: two TC programs on each pod's host-side veth. On that
//! veth, TC *ingress* sees what the pod sent and TC *egress* what is delivered
//! to it. Both count into one per-CPU hash keyed by the veth's ifindex and
//! always let the packet through: they observe, they never decide.
//!
//! Service load balancing: cgroup sock_addr programs in [`lb`]; `NodePort`
//! on the uplink in [`nodeport`].
//!
//! Kernel-level TCP metrics (connections, retransmits, RTT) per pod IP in
//! [`metrics`].
#![no_std]
#![no_main]

mod lb;
mod metrics;
mod nodeport;
mod policy;

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use weir_common::{TRAFFIC_MAP_ENTRIES, TrafficCounters, TrafficKey};

/// Per-pod traffic counters (pinned as `weir_traffic_v1`).
#[map(name = "weir_traffic_v1")]
static WEIR_TRAFFIC_V1: PerCpuHashMap<TrafficKey, TrafficCounters> =
    PerCpuHashMap::pinned(TRAFFIC_MAP_ENTRIES, 0);

/// Counts a packet the pod sent (host-side veth, TC ingress).
#[classifier]
pub fn weir_from_pod(ctx: TcContext) -> i32 {
    count(&ctx, Direction::FromPod);
    TC_ACT_PIPE
}

/// Counts a packet delivered to the pod (host-side veth, TC egress).
#[classifier]
pub fn weir_to_pod(ctx: TcContext) -> i32 {
    count(&ctx, Direction::ToPod);
    TC_ACT_PIPE
}

enum Direction {
    FromPod,
    ToPod,
}

#[inline(always)]
fn count(ctx: &TcContext, dir: Direction) {
    // SAFETY: the kernel hands the program a valid __sk_buff for its lifetime.
    let skb = unsafe { &*ctx.skb.skb };
    let key = TrafficKey {
        ifindex: skb.ifindex,
    };
    let len = u64::from(skb.len);
    let ptr = WEIR_TRAFFIC_V1.get_ptr_mut(&key);
    match ptr {
        // SAFETY: the pointer is this CPU's slot of a live map entry; per-CPU
        // values are never written by another CPU.
        Some(c) => unsafe {
            match dir {
                Direction::FromPod => {
                    (*c).tx_packets += 1;
                    (*c).tx_bytes += len;
                }
                Direction::ToPod => {
                    (*c).rx_packets += 1;
                    (*c).rx_bytes += len;
                }
            }
        },
        None => {
            let mut c = TrafficCounters::default();
            match dir {
                Direction::FromPod => {
                    c.tx_packets = 1;
                    c.tx_bytes = len;
                }
                Direction::ToPod => {
                    c.rx_packets = 1;
                    c.rx_bytes = len;
                }
            }
            // BPF_NOEXIST: if another CPU raced us the entry now exists and
            // this packet is counted on the next one; a full map only loses
            // counts, never packets.
            let _ = WEIR_TRAFFIC_V1.insert(&key, &c, 1);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
