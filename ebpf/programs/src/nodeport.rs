//! `NodePort` services, north-south, on the node's uplink (TCX).
//!
//! Ingress: a TCP/UDP packet to `<node IP>:<nodePort>` is DNATed to the
//! backend the service's Maglev table gives its 5-tuple hash (an existing
//! flow keeps its backend). externalTrafficPolicy Cluster to a backend on
//! another node also gets an SNAT entry (node IP and a port from
//! [`NP_SNAT_PORT_MIN`]) that the egress program applies once the kernel
//! has routed the packet out; the backend's reply to that port is
//! reverse-NATed here and sent straight back out of the uplink to the
//! client's MAC. Local (and Cluster to a local backend) is not SNATed: the
//! pod answers the client through the node (its gateway) and the egress
//! program shows the client `<node IP>:<nodePort>` as the source. A service
//! without a table (no backend, or no local one for Local) drops.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_redirect,
    macros::{classifier, map},
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use weir_common::{
    Backend, FlowKey, MAGLEV_CAPACITY, MAGLEV_MAP_ENTRIES, MaglevTable, NP_BACKEND_REMOTE,
    NP_FLAG_SNAT, NP_FLOW_MAP_ENTRIES, NP_REV_REDIRECT, NP_SNAT_PORT_MIN, NP_SNAT_PORTS,
    NP_SVC_MAP_ENTRIES, NpFlow, NpRev, NpService, NpSnat, PROTO_TCP, PROTO_UDP, SvcKey,
};

/// `NodePort` services: (node IP, nodePort, protocol) → table id, flags.
#[map(name = "weir_np_svc_v1")]
static WEIR_NP_SVC_V1: HashMap<SvcKey, NpService> = HashMap::pinned(NP_SVC_MAP_ENTRIES, 0);

/// Maglev tables by id; not preallocated (each is 128 KiB).
#[map(name = "weir_maglev_v1")]
static WEIR_MAGLEV_V1: HashMap<u32, MaglevTable> =
    HashMap::pinned(MAGLEV_MAP_ENTRIES, BPF_F_NO_PREALLOC);

/// Client → node:nodePort flows and their backend.
#[map(name = "weir_np_flow_v1")]
static WEIR_NP_FLOW_V1: LruHashMap<FlowKey, NpFlow> = LruHashMap::pinned(NP_FLOW_MAP_ENTRIES, 0);

/// Replies (as addressed by the backend) → what the client must see.
#[map(name = "weir_np_rev_v1")]
static WEIR_NP_REV_V1: LruHashMap<FlowKey, NpRev> = LruHashMap::pinned(NP_FLOW_MAP_ENTRIES, 0);

/// Client → backend (after DNAT) → the source the uplink egress writes.
#[map(name = "weir_np_snat_v1")]
static WEIR_NP_SNAT_V1: LruHashMap<FlowKey, NpSnat> = LruHashMap::pinned(NP_FLOW_MAP_ENTRIES, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_OFF: usize = ETH_HLEN;
const IP_CSUM_OFF: usize = IP_OFF + 10;
const IP_SRC_OFF: usize = IP_OFF + 12;
const IP_DST_OFF: usize = IP_OFF + 16;
const L4_OFF: usize = IP_OFF + 20;
const L4_SPORT_OFF: usize = L4_OFF;
const L4_DPORT_OFF: usize = L4_OFF + 2;
const TCP_CSUM_OFF: usize = L4_OFF + 16;
const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// DNAT to a Maglev-chosen backend; reverse SNAT of replies.
#[classifier]
pub fn weir_np_ingress(ctx: TcContext) -> i32 {
    match ingress(&ctx) {
        Ok(v) => v,
        Err(()) => TC_ACT_OK,
    }
}

/// SNAT of flows to remote backends; reverse DNAT of local backends' replies.
#[classifier]
pub fn weir_np_egress(ctx: TcContext) -> i32 {
    let _ = egress(&ctx);
    TC_ACT_OK
}

/// An IPv4 TCP/UDP packet without IP options or fragmentation.
struct Packet {
    key: FlowKey,
    csum_off: usize,
    /// UDP with a zero checksum stays zero.
    csum_flags: u64,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Packet, ()> {
    let proto: u16 = ctx.load(12).map_err(|_| ())?;
    if u16::from_be(proto) != ETH_P_IP {
        return Err(());
    }
    let vihl: u8 = ctx.load(IP_OFF).map_err(|_| ())?;
    if vihl != 0x45 {
        return Err(());
    }
    let frag: u16 = ctx.load(IP_OFF + 6).map_err(|_| ())?;
    if u16::from_be(frag) & 0x3fff != 0 {
        return Err(());
    }
    let l4: u8 = ctx.load(IP_OFF + 9).map_err(|_| ())?;
    let (csum_off, csum_flags) = match l4 {
        PROTO_TCP => (TCP_CSUM_OFF, 0),
        PROTO_UDP => (UDP_CSUM_OFF, u64::from(BPF_F_MARK_MANGLED_0)),
        _ => return Err(()),
    };
    Ok(Packet {
        key: FlowKey {
            saddr: ctx.load(IP_SRC_OFF).map_err(|_| ())?,
            daddr: ctx.load(IP_DST_OFF).map_err(|_| ())?,
            sport: ctx.load(L4_SPORT_OFF).map_err(|_| ())?,
            dport: ctx.load(L4_DPORT_OFF).map_err(|_| ())?,
            proto: l4,
            pad: [0; 3],
        },
        csum_off,
        csum_flags,
    })
}

/// Rewrites the address at `off` (source or destination) and fixes the
/// IP and L4 (pseudo-header) checksums.
#[inline(always)]
fn set_addr(ctx: &TcContext, p: &Packet, off: usize, old: u32, new: u32) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        p.csum_off,
        u64::from(old),
        u64::from(new),
        u64::from(BPF_F_PSEUDO_HDR) | p.csum_flags | 4,
    )
    .map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

/// Rewrites the port at `off` and fixes the L4 checksum.
#[inline(always)]
fn set_port(ctx: &TcContext, p: &Packet, off: usize, old: u16, new: u16) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(p.csum_off, u64::from(old), u64::from(new), p.csum_flags | 2)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

/// A 32-bit hash of the 5-tuple (murmur3's finaliser over a mix).
#[inline(always)]
fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = k.saddr
        ^ k.daddr.rotate_left(13)
        ^ ((u32::from(k.sport) << 16) | u32::from(k.dport)).rotate_left(7)
        ^ u32::from(k.proto);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn ingress(ctx: &TcContext) -> Result<i32, ()> {
    let p = parse(ctx)?;
    let k = p.key;
    // A reply to an SNAT port: back to the client, out where it came in.
    // SAFETY: the value is copied out at once.
    if let Some(r) = unsafe { WEIR_NP_REV_V1.get(&k) }.copied()
        && r.flags & NP_REV_REDIRECT != 0
    {
        return reply_to_client(ctx, &p, &r);
    }
    let svc_key = SvcKey {
        ip: k.daddr,
        port: k.dport,
        proto: k.proto,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(svc) = unsafe { WEIR_NP_SVC_V1.get(&svc_key) }.copied() else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: the value is copied out at once.
    let flow = match unsafe { WEIR_NP_FLOW_V1.get(&k) }.copied() {
        Some(f) => f,
        None => match new_flow(ctx, &k, &svc) {
            Some(f) => f,
            None => return Ok(TC_ACT_SHOT),
        },
    };
    set_addr(ctx, &p, IP_DST_OFF, k.daddr, flow.ip)?;
    set_port(ctx, &p, L4_DPORT_OFF, k.dport, flow.port)?;
    Ok(TC_ACT_OK)
}

/// Picks the backend of a new flow and writes its NAT entries; `None`:
/// drop (no table, no backend, no SNAT port).
#[inline(always)]
fn new_flow(ctx: &TcContext, k: &FlowKey, svc: &NpService) -> Option<NpFlow> {
    let table = WEIR_MAGLEV_V1.get_ptr(&svc.id)?;
    let h = flow_hash(k);
    // SAFETY: a live map value; `size` is read once.
    let size = unsafe { (*table).size };
    if size == 0 {
        return None;
    }
    // The mask changes nothing for a valid table (size ≤ 16381) but bounds
    // the index for the verifier, which does not follow `%`. (No `size ≤
    // MAGLEV_MAX_SIZE` check here: LLVM would drop the mask after it.)
    let idx = (h % size) as usize & (MAGLEV_CAPACITY - 1);
    // SAFETY: idx < MAGLEV_CAPACITY, the array's length.
    let b: Backend = unsafe { *(*table).entries.as_ptr().add(idx) };
    if b.port == 0 {
        return None;
    }
    let snat = svc.flags & NP_FLAG_SNAT != 0 && b.pad & NP_BACKEND_REMOTE != 0;
    let mut rev = NpRev {
        client_ip: k.saddr,
        node_ip: k.daddr,
        client_port: k.sport,
        node_port: k.dport,
        mac: [0; 6],
        flags: 0,
    };
    let mut flow = NpFlow {
        ip: b.ip,
        port: b.port,
        nat_port: 0,
    };
    if snat {
        rev.mac = ctx.load::<[u8; 6]>(6).ok()?;
        rev.flags = NP_REV_REDIRECT;
        let mut found = 0u16;
        let mut i = 0u32;
        while i < 8 {
            #[expect(clippy::cast_possible_truncation, reason = "< NP_SNAT_PORTS")]
            let port = NP_SNAT_PORT_MIN
                + ((h >> 8).wrapping_add(i * 977) % u32::from(NP_SNAT_PORTS)) as u16;
            let rk = FlowKey {
                saddr: b.ip,
                daddr: k.daddr,
                sport: b.port,
                dport: port.to_be(),
                proto: k.proto,
                pad: [0; 3],
            };
            if WEIR_NP_REV_V1
                .insert(&rk, &rev, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                found = port.to_be();
                break;
            }
            i += 1;
        }
        if found == 0 {
            return None;
        }
        flow.nat_port = found;
        let sk = FlowKey {
            saddr: k.saddr,
            daddr: b.ip,
            sport: k.sport,
            dport: b.port,
            proto: k.proto,
            pad: [0; 3],
        };
        let s = NpSnat {
            ip: k.daddr,
            port: found,
            pad: 0,
        };
        WEIR_NP_SNAT_V1.insert(&sk, &s, 0).ok()?;
    } else {
        let rk = FlowKey {
            saddr: b.ip,
            daddr: k.saddr,
            sport: b.port,
            dport: k.sport,
            proto: k.proto,
            pad: [0; 3],
        };
        WEIR_NP_REV_V1.insert(&rk, &rev, 0).ok()?;
    }
    WEIR_NP_FLOW_V1.insert(k, &flow, 0).ok()?;
    Some(flow)
}

/// A remote backend's reply to an SNAT port: source → node:nodePort,
/// destination → the client, MACs turned around, out of the uplink again.
#[inline(always)]
fn reply_to_client(ctx: &TcContext, p: &Packet, r: &NpRev) -> Result<i32, ()> {
    let k = p.key;
    set_addr(ctx, p, IP_SRC_OFF, k.saddr, r.node_ip)?;
    set_port(ctx, p, L4_SPORT_OFF, k.sport, r.node_port)?;
    set_addr(ctx, p, IP_DST_OFF, k.daddr, r.client_ip)?;
    set_port(ctx, p, L4_DPORT_OFF, k.dport, r.client_port)?;
    let own: [u8; 6] = ctx.load(0).map_err(|_| ())?;
    ctx.store(0, &r.mac, 0).map_err(|_| ())?;
    ctx.store(6, &own, 0).map_err(|_| ())?;
    // SAFETY: the kernel hands the program a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; 0 = the device's egress.
    #[expect(clippy::cast_possible_truncation, reason = "TC_ACT_REDIRECT is 7")]
    let rc = unsafe { bpf_redirect(ifindex, 0) } as i32;
    Ok(rc)
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Result<(), ()> {
    let p = parse(ctx)?;
    let k = p.key;
    // SAFETY: the value is copied out at once.
    if let Some(s) = unsafe { WEIR_NP_SNAT_V1.get(&k) }.copied() {
        set_addr(ctx, &p, IP_SRC_OFF, k.saddr, s.ip)?;
        return set_port(ctx, &p, L4_SPORT_OFF, k.sport, s.port);
    }
    // SAFETY: the value is copied out at once.
    if let Some(r) = unsafe { WEIR_NP_REV_V1.get(&k) }.copied()
        && r.flags & NP_REV_REDIRECT == 0
    {
        set_addr(ctx, &p, IP_SRC_OFF, k.saddr, r.node_ip)?;
        return set_port(ctx, &p, L4_SPORT_OFF, k.sport, r.node_port);
    }
    Ok(())
}
