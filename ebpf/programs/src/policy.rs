//! Network policy on each pod's host-side veth (TCX).
//!
//! `weir_pol_from_pod` (TCX ingress: what the pod sent) enforces the pod's
//! Egress policy, `weir_pol_to_pod` (TCX egress: what is delivered to it)
//! its Ingress policy. The endpoint entry (keyed by the veth's ifindex) says
//! which directions are enforced; without one everything passes.
//!
//! A packet of a known flow passes in either direction and refreshes its
//! conntrack entry, which counts its packets and bytes (the service map's
//! traffic). The first packet of a flow in an enforced direction
//! looks its peer up in the ipcache (a miss is world) and then the
//! endpoint's policy entries, at most nine hash lookups whatever the rule
//! count: (identity, port, proto), (identity, any port, proto), (identity,
//! any, any) for the peer's identity, its CIDR identity, and any peer.
//! Allowed, it gets a conntrack entry (no entry: dropped as `CtMapFull`,
//! never let through untracked); denied, it is dropped and counted by
//! reason. A flow started in a direction that is not enforced still gets an
//! entry when the other direction is, so its replies pass there.
//!
//! Allowed packets return `TC_ACT_UNSPEC` (TCX_NEXT): the next TCX program
//! (the traffic counters) runs. Any other code ends the TCX chain there —
//! `TC_ACT_PIPE` included — so the agent attaches these programs first on
//! both hooks and the counters count what policy let through.
//!
//! Flow records ([`flows`]): each new flow verdict — a conntrack
//! entry created (allowed), a packet dropped — is written to the
//! `weir_flows_v1` ring buffer, denials aggregated per key and everything
//! capped by a per-CPU token bucket. An endpoint that tracks nothing gets a
//! record for each TCP SYN without ACK (a new connection, no conntrack
//! needed); its UDP and ICMP are not recorded.

mod flows;

use self::flows::Seen;
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use weir_common::{
    CT_F_FIN, CT_F_REPLY_SEEN, CT_F_RST, CT_F_UNENFORCED, CT_MAP_ENTRIES, CT_RULE_NONE, CtKey,
    CtValue, DIR_EGRESS, DIR_INGRESS, DROP_REASONS, DropReason, EP_F_EGRESS, EP_F_INGRESS,
    EP_F_SOURCE_CHECK, EndpointConfig, FLOW_F_UNENFORCED, FLOW_F_UNTRACKED, ID_ANY, ID_WORLD,
    IPCACHE_MAP_ENTRIES, IpCacheValue, POL_EP_MAP_ENTRIES, POL_MAP_ENTRIES, PROTO_ICMP, PROTO_TCP,
    PROTO_UDP, PolicyKey, PolicyValue,
};

/// IP/CIDR → identity.
#[map(name = "weir_ipcache_v1")]
pub(crate) static WEIR_IPCACHE_V1: LpmTrie<u32, IpCacheValue> =
    LpmTrie::pinned(IPCACHE_MAP_ENTRIES, 0);

/// Endpoints: host-side veth ifindex → identity, IP, enforced directions.
#[map(name = "weir_pol_ep_v1")]
static WEIR_POL_EP_V1: HashMap<u32, EndpointConfig> = HashMap::pinned(POL_EP_MAP_ENTRIES, 0);

/// Allowed (endpoint, peer identity, port, proto, direction); only
/// userspace writes it, so it need not be preallocated.
#[map(name = "weir_pol_v1")]
static WEIR_POL_V1: HashMap<PolicyKey, PolicyValue> =
    HashMap::pinned(POL_MAP_ENTRIES, BPF_F_NO_PREALLOC);

/// Flows per endpoint, in the direction of their first packet, with their
/// packet and byte counts.
#[map(name = "weir_ct_v2")]
static WEIR_CT_V2: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CT_MAP_ENTRIES, 0);

/// Dropped packets by [`DropReason`].
#[map(name = "weir_drops_v1")]
static WEIR_DROPS_V1: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASONS, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IP_OFF: usize = 14;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;

/// Enforces the pod's Egress policy on what it sends.
#[classifier]
pub fn weir_pol_from_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, DIR_EGRESS)
}

/// Enforces the pod's Ingress policy on what is delivered to it.
#[classifier]
pub fn weir_pol_to_pod(ctx: TcContext) -> i32 {
    verdict(&ctx, DIR_INGRESS)
}

#[inline(always)]
fn verdict(ctx: &TcContext, dir: u8) -> i32 {
    let mut seen = Seen::default();
    match decide(ctx, dir, &mut seen) {
        Ok(()) => {
            if seen.new_flow {
                flows::allowed(ctx, dir, &seen);
            }
            TC_ACT_UNSPEC
        }
        Err(reason) => {
            if let Some(c) = WEIR_DROPS_V1.get_ptr_mut(reason as u32) {
                // SAFETY: this CPU's slot of a live array element.
                unsafe { *c += 1 };
            }
            flows::denied(ctx, dir, &seen, reason);
            TC_ACT_SHOT
        }
    }
}

/// What the parser found.
enum Parsed {
    /// ARP: always passes (the pod's neighbour resolution).
    Arp,
    /// Not IPv4 (IPv6 included) or too short for an Ethernet header.
    Other,
    /// IPv4 too short for its own headers; the source if it could be read.
    Malformed,
    /// An IPv4 fragment, with its addresses and protocol (no ports).
    Fragment(Flow),
    /// An IPv4 packet whose ports (if any) could be read.
    Ip(Flow),
}

/// An IPv4 packet's flow fields (all zero: not known).
#[derive(Clone, Copy, Default)]
pub(crate) struct Flow {
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
    /// Network order.
    pub(crate) sport: u16,
    /// Network order.
    pub(crate) dport: u16,
    pub(crate) proto: u8,
    pub(crate) tcp_flags: u8,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Parsed {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return Parsed::Other;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => {}
        ETH_P_ARP => return Parsed::Arp,
        _ => return Parsed::Other,
    }
    let Ok(vihl) = ctx.load::<u8>(IP_OFF) else {
        return Parsed::Malformed;
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    let (Ok(frag), Ok(proto), Ok(saddr), Ok(daddr)) = (
        ctx.load::<u16>(IP_OFF + 6),
        ctx.load::<u8>(IP_OFF + 9),
        ctx.load::<u32>(IP_OFF + 12),
        ctx.load::<u32>(IP_OFF + 16),
    ) else {
        return Parsed::Malformed;
    };
    let mut f = Flow {
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto,
        tcp_flags: 0,
    };
    if u16::from_be(frag) & 0x3fff != 0 {
        return Parsed::Fragment(f);
    }
    let l4 = IP_OFF + ihl;
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let (Ok(sport), Ok(dport)) = (ctx.load::<u16>(l4), ctx.load::<u16>(l4 + 2)) else {
                return Parsed::Malformed;
            };
            f.sport = sport;
            f.dport = dport;
            if proto == PROTO_TCP {
                let Ok(flags) = ctx.load::<u8>(l4 + 13) else {
                    return Parsed::Malformed;
                };
                f.tcp_flags = flags;
            }
        }
        PROTO_ICMP => {
            let Ok(ty) = ctx.load::<u8>(l4) else {
                return Parsed::Malformed;
            };
            // An echo and its reply share the identifier: it is both
            // "ports", so the reply's reversed key matches the request's.
            if ty == ICMP_ECHO || ty == ICMP_ECHO_REPLY {
                let Ok(id) = ctx.load::<u16>(l4 + 4) else {
                    return Parsed::Malformed;
                };
                f.sport = id;
                f.dport = id;
            }
        }
        _ => {}
    }
    Parsed::Ip(f)
}

#[inline(always)]
fn decide(ctx: &TcContext, dir: u8, seen: &mut Seen) -> Result<(), DropReason> {
    // SAFETY: the kernel hands the program a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let Some(ep) = (unsafe { WEIR_POL_EP_V1.get(&ifindex) }).copied() else {
        return Ok(());
    };
    seen.ep = ifindex;
    seen.ep_identity = ep.identity;
    let (this, other) = if dir == DIR_INGRESS {
        (EP_F_INGRESS, EP_F_EGRESS)
    } else {
        (EP_F_EGRESS, EP_F_INGRESS)
    };
    let enforced = ep.flags & this != 0;
    let tracked = enforced || ep.flags & other != 0;
    let source_check = dir == DIR_EGRESS && ep.flags & EP_F_SOURCE_CHECK != 0;
    if !tracked && !source_check {
        if flows::enabled()
            && let Parsed::Ip(f) = parse(ctx)
        {
            untracked(seen, f);
        }
        return Ok(());
    }
    let f = match parse(ctx) {
        Parsed::Arp => return Ok(()),
        Parsed::Ip(f) => f,
        Parsed::Fragment(f) => {
            seen.flow = f;
            if source_check && f.saddr != ep.pod_ip {
                return Err(DropReason::SourceSpoofed);
            }
            return if enforced {
                Err(DropReason::Fragment)
            } else {
                Ok(())
            };
        }
        Parsed::Other => {
            return if enforced {
                Err(DropReason::NotIpv4)
            } else {
                Ok(())
            };
        }
        Parsed::Malformed => {
            return if enforced || source_check {
                Err(DropReason::Malformed)
            } else {
                Ok(())
            };
        }
    };
    seen.flow = f;
    if source_check && f.saddr != ep.pod_ip {
        return Err(DropReason::SourceSpoofed);
    }
    if !tracked {
        untracked(seen, f);
        return Ok(());
    }
    track(ctx, ifindex, dir, enforced, &f, seen)
}

/// Marks a TCP SYN without ACK at an endpoint that tracks nothing as a new
/// connection (the only "new flow" such an endpoint can tell).
#[inline(always)]
fn untracked(seen: &mut Seen, f: Flow) {
    if f.proto == PROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        seen.flow = f;
        seen.new_flow = true;
        seen.flags = FLOW_F_UNTRACKED;
    }
}

/// Passes a packet of a known flow, or decides a new one and records it.
#[inline(always)]
fn track(
    ctx: &TcContext,
    ifindex: u32,
    dir: u8,
    enforced: bool,
    f: &Flow,
    seen: &mut Seen,
) -> Result<(), DropReason> {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let len = u64::from(ctx.len());
    let mut tcp_seen = 0;
    if f.tcp_flags & TCP_FIN != 0 {
        tcp_seen |= CT_F_FIN;
    }
    if f.tcp_flags & TCP_RST != 0 {
        tcp_seen |= CT_F_RST;
    }
    let fwd = CtKey {
        ep: ifindex,
        saddr: f.saddr,
        daddr: f.daddr,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        dir,
        pad: 0,
    };
    if let Some(v) = WEIR_CT_V2.get_ptr_mut(&fwd) {
        touch(v, now, tcp_seen, len);
        return Ok(());
    }
    let rev = CtKey {
        ep: ifindex,
        saddr: f.daddr,
        daddr: f.saddr,
        sport: f.dport,
        dport: f.sport,
        proto: f.proto,
        dir: dir ^ 1,
        pad: 0,
    };
    if let Some(v) = WEIR_CT_V2.get_ptr_mut(&rev) {
        touch(v, now, tcp_seen | CT_F_REPLY_SEEN, len);
        return Ok(());
    }
    let (flags, rule) = if enforced {
        let peer = if dir == DIR_INGRESS { f.saddr } else { f.daddr };
        let port = if f.proto == PROTO_ICMP {
            0
        } else {
            u16::from_be(f.dport)
        };
        match allowed(ifindex, peer, port, f.proto, dir, &mut seen.peer_identity) {
            Some(rule) => (0, rule),
            None if dir == DIR_INGRESS => return Err(DropReason::PolicyDeniedIngress),
            None => return Err(DropReason::PolicyDeniedEgress),
        }
    } else {
        seen.flags = FLOW_F_UNENFORCED;
        (CT_F_UNENFORCED, CT_RULE_NONE)
    };
    if rule != CT_RULE_NONE {
        seen.rule = rule;
    }
    let v = CtValue {
        created_ns: now,
        last_ns: now,
        flags: flags | tcp_seen,
        rule,
        packets: 1,
        bytes: len,
    };
    // Whoever raced us to the same entry recorded the same flow: fine.
    WEIR_CT_V2
        .insert(&fwd, &v, 0)
        .map_err(|_| DropReason::CtMapFull)?;
    seen.new_flow = true;
    Ok(())
}

/// Refreshes a conntrack entry: its last use, the flags seen, and counts
/// the packet.
#[inline(always)]
fn touch(v: *mut CtValue, now: u64, seen: u32, len: u64) {
    // SAFETY: a live map value; racing writers only store the same kind of
    // values (a lost flag or timestamp is harmless). The counters are plain
    // adds (the target has no atomic read-modify-write in stable Rust): two
    // CPUs counting one flow at the same instant may lose a packet, an
    // undercount the service map can live with.
    unsafe {
        (*v).last_ns = now;
        if (*v).flags & seen != seen {
            (*v).flags |= seen;
        }
        (*v).packets = (*v).packets.wrapping_add(1);
        (*v).bytes = (*v).bytes.wrapping_add(len);
    }
}

/// The rule allowing a new flow with `peer` (network order) on `port`
/// (host order), if any; the peer's identity goes to `peer_id`.
#[inline(always)]
fn allowed(ep: u32, peer: u32, port: u16, proto: u8, dir: u8, peer_id: &mut u32) -> Option<u32> {
    let (id, cidr) = match WEIR_IPCACHE_V1.get(Key::new(32, peer)) {
        Some(v) => (v.identity, v.cidr_identity),
        None => (ID_WORLD, 0),
    };
    *peer_id = id;
    if let Some(r) = lookup(ep, id, port, proto, dir) {
        return Some(r);
    }
    if cidr != 0
        && cidr != id
        && let Some(r) = lookup(ep, cidr, port, proto, dir)
    {
        return Some(r);
    }
    lookup(ep, ID_ANY, port, proto, dir)
}

/// (id, port, proto), (id, any port, proto), (id, any, any).
#[inline(always)]
fn lookup(ep: u32, identity: u32, port: u16, proto: u8, dir: u8) -> Option<u32> {
    let mut k = PolicyKey {
        ep,
        identity,
        port,
        proto,
        dir,
    };
    // SAFETY: each value is copied out at once.
    unsafe {
        if port != 0
            && let Some(v) = WEIR_POL_V1.get(&k)
        {
            return Some(v.rule);
        }
        k.port = 0;
        if let Some(v) = WEIR_POL_V1.get(&k) {
            return Some(v.rule);
        }
        k.proto = 0;
        WEIR_POL_V1.get(&k).map(|v| v.rule)
    }
}
