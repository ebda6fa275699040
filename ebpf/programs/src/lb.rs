//! East-west service load balancing at the socket level.
//!
//! cgroup `connect4` (TCP, connected UDP) and `sendmsg4` (unconnected UDP)
//! rewrite a service VIP:port to a backend chosen at random over the
//! service's slots (or the client's affinity entry), and remember the VIP
//! per socket cookie; `recvmsg4` and `getpeername4` show the VIP again. No
//! per-packet NAT, no conntrack. A service with no ready backend fails the
//! connect with `ECONNREFUSED`.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap},
    programs::SockAddrContext,
};
use weir_common::{
    AFFINITY_MAP_ENTRIES, AffinityKey, AffinityValue, BACKENDS_MAP_ENTRIES, Backend,
    LB_CFG_NETNS_FILTER, LB_NETNS_MAP_ENTRIES, LbConfig, SLOTS_MAP_ENTRIES, SOCK_REV_MAP_ENTRIES,
    SVC_FLAG_AFFINITY, SVC_MAP_ENTRIES, SlotKey, SvcKey, SvcValue,
};

/// Services: VIP, port, protocol → id, backend count, flags.
#[map(name = "weir_svc_v1")]
static WEIR_SVC_V1: HashMap<SvcKey, SvcValue> = HashMap::pinned(SVC_MAP_ENTRIES, 0);

/// Backend slots: (service id, slot) → backend id.
#[map(name = "weir_svc_slots_v1")]
static WEIR_SVC_SLOTS_V1: HashMap<SlotKey, u32> = HashMap::pinned(SLOTS_MAP_ENTRIES, 0);

/// Backends: id → pod IP and port.
#[map(name = "weir_backends_v1")]
static WEIR_BACKENDS_V1: HashMap<u32, Backend> = HashMap::pinned(BACKENDS_MAP_ENTRIES, 0);

/// Socket cookie → the VIP the socket asked for.
#[map(name = "weir_sock_rev_v1")]
pub(crate) static WEIR_SOCK_REV_V1: LruHashMap<u64, SvcKey> =
    LruHashMap::pinned(SOCK_REV_MAP_ENTRIES, 0);

/// (client netns cookie, service id) → backend and last use.
#[map(name = "weir_affinity_v1")]
static WEIR_AFFINITY_V1: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_MAP_ENTRIES, 0);

/// Network namespaces (by cookie) this node balances for.
#[map(name = "weir_lb_netns_v1")]
static WEIR_LB_NETNS_V1: HashMap<u64, u32> = HashMap::pinned(LB_NETNS_MAP_ENTRIES, 0);

/// The balancer's configuration, index 0.
#[map(name = "weir_lb_cfg_v1")]
static WEIR_LB_CFG_V1: Array<LbConfig> = Array::pinned(1, 0);

const ECONNREFUSED: i32 = 111;
/// Allow the call (with whatever address the program wrote).
const ALLOW: i32 = 1;
/// Fail the call (with the errno given to `bpf_set_retval`).
const DENY: i32 = 0;

/// Balances `connect()` of TCP and UDP sockets to a service VIP.
#[cgroup_sock_addr(connect4)]
pub fn weir_lb_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, true)
}

/// Balances each `sendmsg()` of an unconnected UDP socket to a service VIP.
#[cgroup_sock_addr(sendmsg4)]
pub fn weir_lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false)
}

/// Shows the VIP as the source of a reply from a backend.
#[cgroup_sock_addr(recvmsg4)]
pub fn weir_lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

/// Shows the VIP as the peer of a socket connected through a service.
#[cgroup_sock_addr(getpeername4)]
pub fn weir_lb_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

#[inline(always)]
fn netns_allowed(ctx: &SockAddrContext) -> bool {
    let filter = WEIR_LB_CFG_V1
        .get(0)
        .is_some_and(|c| c.flags & LB_CFG_NETNS_FILTER != 0);
    if !filter {
        return true;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is only tested for presence.
    unsafe { WEIR_LB_NETNS_V1.get(&cookie) }.is_some()
}

#[inline(always)]
fn translate(ctx: &SockAddrContext, connect: bool) -> i32 {
    if !netns_allowed(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "port is in the low 16 bits"
    )]
    let key = SvcKey {
        ip: sa.user_ip4,
        port: sa.user_port as u16,
        proto: sa.protocol as u8,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(svc) = (unsafe { WEIR_SVC_V1.get(&key) }).copied() else {
        if connect {
            // A socket re-connected away from a VIP no longer shows it. The
            // lock-free lookup first: almost every connect has no entry.
            // SAFETY: the cookie helper takes the program's context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
            // SAFETY: the value is only tested for presence.
            if unsafe { WEIR_SOCK_REV_V1.get(&cookie) }.is_some() {
                let _ = WEIR_SOCK_REV_V1.remove(&cookie);
            }
        }
        return ALLOW;
    };
    if svc.count == 0 {
        // SAFETY: plain helper call.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return DENY;
    }
    let Some(backend) = pick(ctx, &svc) else {
        // SAFETY: plain helper call.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return DENY;
    };
    sa.user_ip4 = backend.ip;
    sa.user_port = u32::from(backend.port);
    // SAFETY: the cookie helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let _ = WEIR_SOCK_REV_V1.insert(&cookie, &key, 0);
    ALLOW
}

#[inline(always)]
fn pick(ctx: &SockAddrContext, svc: &SvcValue) -> Option<Backend> {
    let affinity = svc.flags & SVC_FLAG_AFFINITY != 0;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let akey = AffinityKey {
        // SAFETY: the cookie helper takes the program's context.
        client: if affinity {
            unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }
        } else {
            0
        },
        id: svc.id,
        pad: 0,
    };
    if affinity && let Some(a) = WEIR_AFFINITY_V1.get_ptr_mut(&akey) {
        // SAFETY: a live LRU entry; a racing update only changes which
        // recent backend is used.
        let (id, last) = unsafe { ((*a).backend, (*a).last_used_ns) };
        let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
        if now.wrapping_sub(last) <= timeout_ns
            // SAFETY: the value is copied out at once.
            && let Some(b) = unsafe { WEIR_BACKENDS_V1.get(&id) }.copied()
        {
            // SAFETY: as above.
            unsafe { (*a).last_used_ns = now };
            return Some(b);
        }
    }
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.count;
    // SAFETY: the value is copied out at once.
    let id = unsafe { WEIR_SVC_SLOTS_V1.get(&SlotKey { id: svc.id, slot }) }.copied()?;
    // SAFETY: the value is copied out at once.
    let b = unsafe { WEIR_BACKENDS_V1.get(&id) }.copied()?;
    if affinity {
        let v = AffinityValue {
            backend: id,
            pad: 0,
            last_used_ns: now,
        };
        let _ = WEIR_AFFINITY_V1.insert(&akey, &v, 0);
    }
    Some(b)
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    // SAFETY: the cookie helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(vip) = (unsafe { WEIR_SOCK_REV_V1.get(&cookie) }).copied() else {
        return;
    };
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip4 = vip.ip;
    sa.user_port = u32::from(vip.port);
}
