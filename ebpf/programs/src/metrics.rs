//! Kernel-level TCP metrics per local IPv4 address (a pod IP).
//!
//! A `sock_ops` program at the cgroup2 root counts connections that reach
//! ESTABLISHED (active: opened by the address; passive: accepted by it) and
//! samples the smoothed RTT when a connection is established and when it
//! leaves ESTABLISHED (it asks for state callbacks on each new connection).
//! A `tcp:tcp_retransmit_skb` tracepoint counts retransmitted segments by
//! their source address. Both only count addresses inside the node's pod
//! CIDR ([`MetricsConfig`]) so nodes sharing a kernel stay apart, and never
//! change what the socket does. IPv4 connections of dual-stack sockets
//! (IPv4-mapped IPv6) count as IPv4.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    macros::{map, sock_ops, tracepoint},
    maps::{Array, PerCpuHashMap},
    programs::{SockOpsContext, TracePointContext},
};
use weir_common::{MetricsConfig, SOCK_STATS_MAP_ENTRIES, SockStats};

/// Local IPv4 address (network order) → TCP statistics.
#[map(name = "weir_sock_stats_v1")]
static WEIR_SOCK_STATS_V1: PerCpuHashMap<u32, SockStats> =
    PerCpuHashMap::pinned(SOCK_STATS_MAP_ENTRIES, 0);

/// Which addresses to count, index 0.
#[map(name = "weir_metrics_cfg_v1")]
static WEIR_METRICS_CFG_V1: Array<MetricsConfig> = Array::pinned(1, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as
/// loaded from network order on a little-endian machine.
const V4_MAPPED: u32 = 0xffff_0000;
const TCP_ESTABLISHED: u32 = 1;
/// Offsets in the `tcp:tcp_retransmit_skb` record (tracefs `format`).
const TP_FAMILY: usize = 32;
const TP_SADDR: usize = 34;

enum Event {
    Opened,
    Accepted,
    Rtt(u32),
    Retransmit,
}

/// Counts established connections and samples their smoothed RTT.
#[sock_ops]
pub fn weir_metrics_sockops(ctx: SockOpsContext) -> u32 {
    // Dual-stack listeners (`::`, as busybox httpd binds) see IPv4 peers
    // as IPv4-mapped IPv6 sockets.
    // Every context field is read up front with its own load: the verifier
    // refuses a load through a context pointer the compiler offset itself
    // (which it does when branches read different fields).
    let ops = ctx.ops;
    // SAFETY: the kernel hands the program a valid bpf_sock_ops.
    let (v4, v6) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
        )
    };
    let ip = match ctx.family() {
        AF_INET => v4,
        AF_INET6 if v6[0] == 0 && v6[1] == 0 && v6[2] == V4_MAPPED => v6[3],
        _ => return 1,
    };
    // SAFETY: the kernel hands the program a valid bpf_sock_ops.
    let srtt = unsafe { (*ctx.ops).srtt_us };
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if !wanted(ip) {
                return 1;
            }
            let ev = if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
                Event::Opened
            } else {
                Event::Accepted
            };
            count(ip, &ev);
            count(ip, &Event::Rtt(srtt));
            #[expect(clippy::cast_possible_wrap, reason = "a small flag bit")]
            let flags = (ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32;
            let _ = ctx.set_cb_flags(flags);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(0) == TCP_ESTABLISHED && wanted(ip) => {
            count(ip, &Event::Rtt(srtt));
        }
        _ => {}
    }
    1
}

/// Counts a retransmitted TCP segment by its source address.
#[tracepoint]
pub fn weir_metrics_retransmit(ctx: TracePointContext) -> u32 {
    // SAFETY: the offsets are those of the event's format; reads are checked.
    let family = u32::from(unsafe { ctx.read_at::<u16>(TP_FAMILY) }.unwrap_or(0));
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    // SAFETY: as above; `saddr` is 4 bytes in network order, the socket's
    // IPv4 address also for an IPv4-mapped IPv6 socket.
    let Ok(ip) = (unsafe { ctx.read_at::<u32>(TP_SADDR) }) else {
        return 0;
    };
    if wanted(ip) {
        count(ip, &Event::Retransmit);
    }
    0
}

#[inline(always)]
fn wanted(ip: u32) -> bool {
    match WEIR_METRICS_CFG_V1.get(0) {
        Some(c) => ip & c.mask == c.net,
        None => true,
    }
}

#[inline(always)]
fn count(ip: u32, ev: &Event) {
    if let Some(s) = WEIR_SOCK_STATS_V1.get_ptr_mut(&ip) {
        // SAFETY: this CPU's slot of a live entry; no other CPU writes it.
        unsafe { apply(&mut *s, ev) };
        return;
    }
    let mut s = SockStats::default();
    apply(&mut s, ev);
    // BPF_NOEXIST: a racing CPU's entry wins; this event is then lost (a
    // full map only loses counts).
    let _ = WEIR_SOCK_STATS_V1.insert(&ip, &s, 1);
}

#[inline(always)]
fn apply(s: &mut SockStats, ev: &Event) {
    match ev {
        Event::Opened => s.opened += 1,
        Event::Accepted => s.accepted += 1,
        Event::Retransmit => s.retransmits += 1,
        Event::Rtt(v) => {
            if *v != 0 {
                s.rtt_samples += 1;
                s.srtt_sum += u64::from(*v);
            }
        }
    }
}
