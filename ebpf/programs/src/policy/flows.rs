//! Flow records: one per new flow verdict, written to `weir_flows_v1`.
//!
//! So a busy node does not drown its agent:
//! - denials are aggregated: one record per (endpoint, peer, port, proto,
//!   direction, reason) at most every `deny_interval_ms` (an LRU map of
//!   recently reported keys); the denials folded in between are counted in
//!   the next record's `suppressed` and in `weir_flow_lost_v1[aggregated]`;
//! - allowed new flows are recorded once each (they are once per
//!   conntrack entry already);
//! - every record takes a token from its CPU's bucket (`rate_per_cpu`
//!   tokens/s, `burst` at most): none left, or no room in the ring, and the
//!   record is counted as lost by cause instead.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_get_socket_cookie},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use weir_common::{
    DIR_INGRESS, DropReason, FLOW_CFG_DISABLED, FLOW_DEFAULT_DENY_INTERVAL_MS,
    FLOW_DEFAULT_RATE_PER_CPU, FLOW_F_SERVICE, FLOW_LOST_AGGREGATED, FLOW_LOST_RATE_LIMITED,
    FLOW_LOST_REASONS, FLOW_LOST_RING_FULL, FLOW_MAX_RATE_PER_CPU, FLOW_SEEN_MAP_ENTRIES,
    FLOW_VERDICT_ALLOWED, FLOW_VERDICT_DENIED, FLOWS_MAP_BYTES, FlowBucket, FlowConfig, FlowRecord,
    FlowSeenKey, FlowSeenValue, PROTO_ICMP,
};

use super::{Flow, WEIR_IPCACHE_V1};
use crate::lb::WEIR_SOCK_REV_V1;

/// Flow records for the agent.
#[map(name = "weir_flows_v1")]
static WEIR_FLOWS_V1: RingBuf = RingBuf::pinned(FLOWS_MAP_BYTES, 0);

/// Rate, burst, aggregation interval; all zero = defaults.
#[map(name = "weir_flow_cfg_v1")]
static WEIR_FLOW_CFG_V1: Array<FlowConfig> = Array::pinned(1, 0);

/// Denial keys recently reported.
#[map(name = "weir_flow_seen_v1")]
static WEIR_FLOW_SEEN_V1: LruHashMap<FlowSeenKey, FlowSeenValue> =
    LruHashMap::pinned(FLOW_SEEN_MAP_ENTRIES, 0);

/// Each CPU's token bucket.
#[map(name = "weir_flow_bucket_v1")]
static WEIR_FLOW_BUCKET_V1: PerCpuArray<FlowBucket> = PerCpuArray::pinned(1, 0);

/// Records not written, by cause.
#[map(name = "weir_flow_lost_v1")]
static WEIR_FLOW_LOST_V1: PerCpuArray<u64> = PerCpuArray::pinned(FLOW_LOST_REASONS, 0);

const NS_PER_S: u64 = 1_000_000_000;
/// Longest idle time the bucket refills for (keeps the product in u64).
const MAX_REFILL_NS: u64 = 10 * NS_PER_S;

/// What the verdict found out about a packet, for its record.
#[derive(Clone, Copy, Default)]
pub(crate) struct Seen {
    /// ifindex of the endpoint (0: no endpoint, no record).
    pub(crate) ep: u32,
    /// The endpoint's identity.
    pub(crate) ep_identity: u32,
    /// The packet's fields, as far as they were parsed.
    pub(crate) flow: Flow,
    /// The peer's identity if the verdict looked it up (0: not yet).
    pub(crate) peer_identity: u32,
    /// The allowing rule (0: none).
    pub(crate) rule: u32,
    /// `FLOW_F_*` bits.
    pub(crate) flags: u8,
    /// The packet starts a flow (a conntrack entry was created, or a SYN
    /// at an endpoint that tracks nothing).
    pub(crate) new_flow: bool,
}

#[inline(always)]
fn config() -> FlowConfig {
    WEIR_FLOW_CFG_V1.get(0).copied().unwrap_or_default()
}

/// Whether flow records are written at all.
#[inline(always)]
pub(crate) fn enabled() -> bool {
    config().flags & FLOW_CFG_DISABLED == 0
}

#[inline(always)]
fn lost(cause: u32) {
    if let Some(c) = WEIR_FLOW_LOST_V1.get_ptr_mut(cause) {
        // SAFETY: this CPU's slot of a live array element.
        unsafe { *c += 1 };
    }
}

/// Records an allowed new flow.
#[inline(always)]
pub(crate) fn allowed(ctx: &TcContext, dir: u8, s: &Seen) {
    let cfg = config();
    if s.ep == 0 || cfg.flags & FLOW_CFG_DISABLED != 0 {
        return;
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    emit(ctx, dir, s, &cfg, now, FLOW_VERDICT_ALLOWED, 0, 0);
}

/// Records a dropped packet, aggregated with its key's recent denials.
#[inline(always)]
pub(crate) fn denied(ctx: &TcContext, dir: u8, s: &Seen, reason: DropReason) {
    let cfg = config();
    if s.ep == 0 || cfg.flags & FLOW_CFG_DISABLED != 0 {
        return;
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = FlowSeenKey {
        ep: s.ep,
        peer: peer_addr(dir, &s.flow),
        port: if s.flow.proto == PROTO_ICMP {
            0
        } else {
            s.flow.dport
        },
        proto: s.flow.proto,
        dir,
        #[expect(clippy::cast_possible_truncation, reason = "reasons are < 256")]
        reason: reason as u8,
        pad: [0; 3],
    };
    let interval_ms = if cfg.deny_interval_ms == 0 {
        FLOW_DEFAULT_DENY_INTERVAL_MS
    } else {
        cfg.deny_interval_ms
    };
    let Some(suppressed) = report_due(&key, now, u64::from(interval_ms) * 1_000_000) else {
        lost(FLOW_LOST_AGGREGATED);
        return;
    };
    #[expect(clippy::cast_possible_truncation, reason = "reasons are < 256")]
    emit(
        ctx,
        dir,
        s,
        &cfg,
        now,
        FLOW_VERDICT_DENIED,
        reason as u8,
        suppressed,
    );
}

/// The peer's address: the source of what comes in, the destination of
/// what goes out.
#[inline(always)]
fn peer_addr(dir: u8, f: &Flow) -> u32 {
    if dir == DIR_INGRESS { f.saddr } else { f.daddr }
}

/// `Some(denials folded since the last record)` if `key` is due for a
/// record (and marks it reported now), `None` if it was reported less than
/// `interval_ns` ago (and counts this one as folded).
#[inline(always)]
fn report_due(key: &FlowSeenKey, now: u64, interval_ns: u64) -> Option<u32> {
    if let Some(v) = WEIR_FLOW_SEEN_V1.get_ptr_mut(key) {
        // SAFETY: a live map value; racing CPUs may lose a count or
        // both report, which only skews the aggregation.
        unsafe {
            if now.wrapping_sub((*v).last_ns) < interval_ns {
                (*v).suppressed = (*v).suppressed.wrapping_add(1);
                return None;
            }
            let folded = (*v).suppressed;
            (*v).last_ns = now;
            (*v).suppressed = 0;
            return Some(folded);
        }
    }
    let v = FlowSeenValue {
        last_ns: now,
        suppressed: 0,
        pad: 0,
    };
    let _ = WEIR_FLOW_SEEN_V1.insert(key, &v, 0);
    Some(0)
}

/// Takes a token from this CPU's bucket, refilled at the configured rate.
#[inline(always)]
fn take_token(cfg: &FlowConfig, now: u64) -> bool {
    let rate = if cfg.rate_per_cpu == 0 {
        FLOW_DEFAULT_RATE_PER_CPU
    } else {
        cfg.rate_per_cpu.min(FLOW_MAX_RATE_PER_CPU)
    };
    let burst = if cfg.burst == 0 {
        rate
    } else {
        cfg.burst.min(FLOW_MAX_RATE_PER_CPU)
    };
    let Some(b) = WEIR_FLOW_BUCKET_V1.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot of a live array element.
    unsafe {
        let elapsed = now.wrapping_sub((*b).last_ns).min(MAX_REFILL_NS);
        let credit = ((*b).credit + elapsed * u64::from(rate)).min(u64::from(burst) * NS_PER_S);
        (*b).last_ns = now;
        if credit < NS_PER_S {
            (*b).credit = credit;
            return false;
        }
        (*b).credit = credit - NS_PER_S;
    }
    true
}

/// Writes one record, if the bucket has a token and the ring has room.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined into one program")]
fn emit(
    ctx: &TcContext,
    dir: u8,
    s: &Seen,
    cfg: &FlowConfig,
    now: u64,
    verdict: u8,
    reason: u8,
    suppressed: u32,
) {
    if !take_token(cfg, now) {
        lost(FLOW_LOST_RATE_LIMITED);
        return;
    }
    let f = &s.flow;
    let peer = if s.peer_identity != 0 || f.proto == 0 {
        s.peer_identity
    } else {
        match WEIR_IPCACHE_V1.get(Key::new(32, peer_addr(dir, f))) {
            Some(v) => v.identity,
            None => weir_common::ID_WORLD,
        }
    };
    let (src_identity, dst_identity) = if dir == DIR_INGRESS {
        (peer, s.ep_identity)
    } else {
        (s.ep_identity, peer)
    };
    // SAFETY: the kernel hands the program a valid __sk_buff.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let mut flags = s.flags;
    let (mut svc_ip, mut svc_port) = (0, 0);
    if cookie != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(vip) = unsafe { WEIR_SOCK_REV_V1.get(&cookie) } {
            svc_ip = vip.ip;
            svc_port = vip.port;
            flags |= FLOW_F_SERVICE;
        }
    }
    let Some(mut entry) = WEIR_FLOWS_V1.reserve::<FlowRecord>(0) else {
        lost(FLOW_LOST_RING_FULL);
        return;
    };
    entry.write(FlowRecord {
        ts_ns: now,
        sock_cookie: cookie,
        ep: s.ep,
        saddr: f.saddr,
        daddr: f.daddr,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        dir,
        verdict,
        reason,
        src_identity,
        dst_identity,
        rule: s.rule,
        svc_ip,
        svc_port,
        tcp_flags: f.tcp_flags,
        flags,
        suppressed,
        pad: 0,
    });
    entry.submit(0);
}
