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

/// Name of the services map: (VIP, port, protocol) → [`SvcValue`].
pub const SVC_MAP: &str = "weir_svc_v1";
/// Name of the backend-slots map: ([`SlotKey`]) → backend id.
pub const SLOTS_MAP: &str = "weir_svc_slots_v1";
/// Name of the backends map: backend id → [`Backend`].
pub const BACKENDS_MAP: &str = "weir_backends_v1";
/// Name of the LRU reverse map: socket cookie → the [`SvcKey`] it asked for.
pub const SOCK_REV_MAP: &str = "weir_sock_rev_v1";
/// Name of the LRU ClientIP-affinity map: [`AffinityKey`] → [`AffinityValue`].
pub const AFFINITY_MAP: &str = "weir_affinity_v1";
/// Name of the map of network namespaces (by netns cookie) whose sockets
/// this node balances: netns cookie (u64) → 1 (u32).
pub const LB_NETNS_MAP: &str = "weir_lb_netns_v1";
/// Name of the one-element config array of the balancer: index 0 → [`LbConfig`].
pub const LB_CONFIG_MAP: &str = "weir_lb_cfg_v1";

/// Maximum number of services (VIP, port, protocol) per node.
pub const SVC_MAP_ENTRIES: u32 = 65_536;
/// Maximum number of backend slots (summed over services) per node.
pub const SLOTS_MAP_ENTRIES: u32 = 262_144;
/// Maximum number of backends per node.
pub const BACKENDS_MAP_ENTRIES: u32 = 262_144;
/// Number of sockets whose VIP is remembered (LRU).
pub const SOCK_REV_MAP_ENTRIES: u32 = 262_144;
/// Number of (client, service) affinity entries (LRU).
pub const AFFINITY_MAP_ENTRIES: u32 = 65_536;
/// Maximum number of network namespaces a node balances for.
pub const LB_NETNS_MAP_ENTRIES: u32 = 4096;
/// Maximum number of backends of one service (slots 0..count).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 1000;

/// Name of the cgroup `connect4` program (TCP, connected UDP).
pub const PROG_LB_CONNECT4: &str = "weir_lb_connect4";
/// Name of the cgroup `sendmsg4` program (unconnected UDP).
pub const PROG_LB_SENDMSG4: &str = "weir_lb_sendmsg4";
/// Name of the cgroup `recvmsg4` program (UDP replies show the VIP).
pub const PROG_LB_RECVMSG4: &str = "weir_lb_recvmsg4";
/// Name of the cgroup `getpeername4` program (a connected peer shows the VIP).
pub const PROG_LB_GETPEERNAME4: &str = "weir_lb_getpeername4";

/// [`SvcValue::flags`] bit: `ClientIP` session affinity.
pub const SVC_FLAG_AFFINITY: u32 = 1;
/// [`LbConfig::flags`] bit: only balance sockets whose netns cookie is in
/// [`LB_NETNS_MAP`] (several nodes share one cgroup attach point).
pub const LB_CFG_NETNS_FILTER: u32 = 1;

/// IP protocol number of TCP (as in [`SvcKey::proto`]).
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP (as in [`SvcKey::proto`]).
pub const PROTO_UDP: u8 = 17;

/// Name of the `NodePort` services map: (node IP, nodePort, protocol)
/// ([`SvcKey`]) → [`NpService`].
pub const NP_SVC_MAP: &str = "weir_np_svc_v1";
/// Name of the Maglev tables map: [`NpService::id`] → [`MaglevTable`]. One
/// update replaces a whole table (hash map elements are swapped under RCU):
/// a packet sees the old table or the new one, never a mix.
pub const MAGLEV_MAP: &str = "weir_maglev_v1";
/// Name of the LRU `NodePort` flow map: client → node:nodePort
/// ([`FlowKey`]) → [`NpFlow`] (a flow keeps its backend across table swaps).
pub const NP_FLOW_MAP: &str = "weir_np_flow_v1";
/// Name of the LRU reverse-NAT map: a backend's reply ([`FlowKey`] as the
/// reply is addressed) → [`NpRev`] (what the client must see).
pub const NP_REV_MAP: &str = "weir_np_rev_v1";
/// Name of the LRU SNAT map: client → backend after DNAT ([`FlowKey`]) →
/// [`NpSnat`] (the node address and port the uplink egress writes).
pub const NP_SNAT_MAP: &str = "weir_np_snat_v1";
/// Name of the TC program on the uplink's ingress (DNAT, reverse SNAT).
pub const PROG_NP_INGRESS: &str = "weir_np_ingress";
/// Name of the TC program on the uplink's egress (SNAT, reverse DNAT).
pub const PROG_NP_EGRESS: &str = "weir_np_egress";
/// Maximum number of `NodePort` service ports per node.
pub const NP_SVC_MAP_ENTRIES: u32 = 4096;
/// Maximum number of Maglev tables (one per `NodePort` service port).
pub const MAGLEV_MAP_ENTRIES: u32 = 4096;
/// The largest Maglev table size (a prime).
pub const MAGLEV_MAX_SIZE: u32 = 16_381;
/// Entries in a [`MaglevTable`] value: a power of two above
/// [`MAGLEV_MAX_SIZE`], so the program bounds an index with a mask the
/// verifier understands.
pub const MAGLEV_CAPACITY: usize = 16_384;
/// Number of `NodePort` flows remembered (LRU, each of the flow, reverse
/// and SNAT maps).
pub const NP_FLOW_MAP_ENTRIES: u32 = 65_536;
/// [`NpService::flags`] bit: externalTrafficPolicy Cluster (SNAT flows to
/// remote backends to the node's address).
pub const NP_FLAG_SNAT: u32 = 1;
/// [`Backend::pad`] bit in a [`MaglevTable`]: the backend runs on another node.
pub const NP_BACKEND_REMOTE: u16 = 1;
/// [`NpRev::flags`] bit: the reply comes back through the uplink (it was
/// SNATed): rewrite its MACs and send it out where it came in.
pub const NP_REV_REDIRECT: u16 = 1;
/// First port the SNAT allocates (host order; above Linux's ephemeral range).
pub const NP_SNAT_PORT_MIN: u16 = 61_000;
/// Number of SNAT ports.
pub const NP_SNAT_PORTS: u16 = 4_500;

/// Value of [`NP_SVC_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NpService {
    /// Key of the service's table in [`MAGLEV_MAP`] (host order).
    pub id: u32,
    /// [`NP_FLAG_SNAT`] and future bits (host order).
    pub flags: u32,
}

/// Value of [`MAGLEV_MAP`]: entries `0..size` are the table.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MaglevTable {
    /// Table size `M`, a prime ≤ [`MAGLEV_MAX_SIZE`] (host order).
    pub size: u32,
    /// Zero.
    pub pad: u32,
    /// Entry `hash % M` is the flow's backend; `pad` carries [`NP_BACKEND_REMOTE`].
    pub entries: [Backend; MAGLEV_CAPACITY],
}

/// A 5-tuple, as key of the `NodePort` flow maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network byte order.
    pub saddr: u32,
    /// Destination address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// Value of [`NP_FLOW_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NpFlow {
    /// Backend address, network byte order.
    pub ip: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// SNAT port (network byte order), 0 if the flow keeps its source.
    pub nat_port: u16,
}

/// Value of [`NP_REV_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NpRev {
    /// The client's address, network byte order.
    pub client_ip: u32,
    /// The node address the client sent to, network byte order.
    pub node_ip: u32,
    /// The client's port, network byte order.
    pub client_port: u16,
    /// The nodePort, network byte order.
    pub node_port: u16,
    /// The MAC the client's packets came from (next hop back to it).
    pub mac: [u8; 6],
    /// [`NP_REV_REDIRECT`] and future bits (host order).
    pub flags: u16,
}

/// Value of [`NP_SNAT_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NpSnat {
    /// The node address, network byte order.
    pub ip: u32,
    /// The SNAT port, network byte order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}

/// Key of [`SVC_MAP`] and value of [`SOCK_REV_MAP`]: a service's VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// The VIP, network byte order.
    pub ip: u32,
    /// The port, network byte order.
    pub port: u16,
    /// IP protocol: [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// Value of [`SVC_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    /// Service id (host order), the first half of [`SlotKey`].
    pub id: u32,
    /// Number of ready backends: slots `0..count` are valid (host order).
    pub count: u32,
    /// [`SVC_FLAG_AFFINITY`] and future bits (host order).
    pub flags: u32,
    /// `ClientIP` affinity timeout in seconds (host order).
    pub affinity_timeout_s: u32,
}

/// Key of [`SLOTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// Service id (host order).
    pub id: u32,
    /// Slot index, `0..count` (host order).
    pub slot: u32,
}

/// Value of [`BACKENDS_MAP`]: where a backend listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Pod IP, network byte order.
    pub ip: u32,
    /// Port, network byte order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}

/// Key of [`AFFINITY_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client: its network namespace cookie (each pod has its own netns).
    pub client: u64,
    /// Service id (host order).
    pub id: u32,
    /// Zero.
    pub pad: u32,
}

/// Value of [`AFFINITY_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// Backend id the client was sent to (host order).
    pub backend: u32,
    /// Zero.
    pub pad: u32,
    /// `bpf_ktime_get_ns` of the last use.
    pub last_used_ns: u64,
}

/// Value of [`LB_CONFIG_MAP`] at index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// [`LB_CFG_NETNS_FILTER`] and future bits.
    pub flags: u32,
}

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

// ------------------------------------------------------------ network policy

/// Name of the LPM trie IP/CIDR → [`IpCacheValue`] (key: a prefix length and
/// an IPv4 address in network order, `aya`'s `lpm_trie::Key<u32>`).
pub const IPCACHE_MAP: &str = "weir_ipcache_v1";
/// Name of the map of policy endpoints: ifindex of a pod's host-side veth
/// (u32, host order) → [`EndpointConfig`].
pub const POL_EP_MAP: &str = "weir_pol_ep_v1";
/// Name of the map of allowed (endpoint, peer, port, protocol, direction):
/// [`PolicyKey`] → [`PolicyValue`].
pub const POL_MAP: &str = "weir_pol_v1";
/// Name of the LRU connection-tracking map: [`CtKey`] → [`CtValue`].
///
/// v2 added [`CtValue::packets`] and [`CtValue::bytes`]; an agent finding
/// [`CT_MAP_V1`] pinned copies its entries over and removes it.
pub const CT_MAP: &str = "weir_ct_v2";
/// The conntrack map's previous name (24-byte values: [`CtValue`] without
/// `packets` and `bytes`).
pub const CT_MAP_V1: &str = "weir_ct_v1";
/// Name of the per-CPU array of policy drop counters, indexed by
/// [`DropReason`] (u64 packets).
pub const DROPS_MAP: &str = "weir_drops_v1";
/// Name of the TC program enforcing a pod's Egress policy (host-side veth,
/// TCX ingress: packets the pod sent).
pub const PROG_POL_FROM_POD: &str = "weir_pol_from_pod";
/// Name of the TC program enforcing a pod's Ingress policy (host-side veth,
/// TCX egress: packets delivered to the pod).
pub const PROG_POL_TO_POD: &str = "weir_pol_to_pod";

/// Maximum number of ipcache prefixes per node.
pub const IPCACHE_MAP_ENTRIES: u32 = 65_536;
/// Maximum number of policy endpoints (pod veths) per node.
pub const POL_EP_MAP_ENTRIES: u32 = 4096;
/// Maximum number of policy entries per node, summed over endpoints.
pub const POL_MAP_ENTRIES: u32 = 262_144;
/// Number of tracked connections (LRU: the least recently used go first).
pub const CT_MAP_ENTRIES: u32 = 262_144;
/// Length of [`DROPS_MAP`]: one more than the largest [`DropReason`].
pub const DROP_REASONS: u32 = 8;

/// Identity in a [`PolicyKey`] that matches any peer (never a real identity).
pub const ID_ANY: u32 = 0;
/// Identity of the node itself (its own addresses).
pub const ID_HOST: u32 = 1;
/// Identity of any address the ipcache does not hold.
pub const ID_WORLD: u32 = 2;
/// Identity of another node's addresses.
pub const ID_REMOTE_NODE: u32 = 3;
/// The first identity the control allocates for pods; 4..256 are reserved.
pub const ID_POD_MIN: u32 = 256;
/// The first CIDR identity (allocated by the agent for `ipBlock`s); every
/// identity from here up is a CIDR identity.
pub const ID_CIDR_MIN: u32 = 1 << 24;

/// [`EndpointConfig::flags`] bit: some policy selects the pod for Ingress.
pub const EP_F_INGRESS: u32 = 1;
/// [`EndpointConfig::flags`] bit: some policy selects the pod for Egress.
pub const EP_F_EGRESS: u32 = 2;
/// [`EndpointConfig::flags`] bit: drop IPv4 packets the pod sends from any
/// source but [`EndpointConfig::pod_ip`] (anti-spoofing).
pub const EP_F_SOURCE_CHECK: u32 = 4;

/// [`PolicyKey::dir`] / [`CtKey::dir`]: towards the pod (its Ingress policy).
pub const DIR_INGRESS: u8 = 0;
/// [`PolicyKey::dir`] / [`CtKey::dir`]: from the pod (its Egress policy).
pub const DIR_EGRESS: u8 = 1;

/// [`CtValue::flags`] bit: a packet of the other direction passed.
pub const CT_F_REPLY_SEEN: u32 = 1;
/// [`CtValue::flags`] bit: a TCP FIN was seen.
pub const CT_F_FIN: u32 = 2;
/// [`CtValue::flags`] bit: a TCP RST was seen.
pub const CT_F_RST: u32 = 4;
/// [`CtValue::flags`] bit: created in a direction that was not enforced,
/// only so replies pass the other, enforced, direction.
pub const CT_F_UNENFORCED: u32 = 8;
/// [`CtValue::rule`] of an entry no policy entry allowed ([`CT_F_UNENFORCED`]).
pub const CT_RULE_NONE: u32 = u32::MAX;

/// [`IpCacheValue::flags`] bit: an `ipBlock` names this very prefix
/// (`cidr_identity` is its own, not inherited from a shorter prefix).
pub const IPCACHE_F_CIDR: u32 = 1;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;

/// Value of [`IPCACHE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpCacheValue {
    /// The prefix's identity: a pod's, [`ID_HOST`], [`ID_REMOTE_NODE`], or,
    /// for a prefix only an `ipBlock` names, its CIDR identity (host order).
    pub identity: u32,
    /// The CIDR identity of the longest `ipBlock` prefix holding this one
    /// (itself included), 0 if none: how an `ipBlock` matches a pod IP that
    /// has its own /32 (host order).
    pub cidr_identity: u32,
    /// [`IPCACHE_F_CIDR`] and future bits (host order).
    pub flags: u32,
}

/// Value of [`POL_EP_MAP`]: a pod's policy state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointConfig {
    /// The pod's identity (host order).
    pub identity: u32,
    /// The pod's IPv4 address, network byte order.
    pub pod_ip: u32,
    /// [`EP_F_INGRESS`], [`EP_F_EGRESS`], [`EP_F_SOURCE_CHECK`] (host order).
    pub flags: u32,
    /// Zero.
    pub pad: u32,
}

/// Key of [`POL_MAP`]: an entry allows (a `NetworkPolicy` only allows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// ifindex of the endpoint's host-side veth (host order).
    pub ep: u32,
    /// The peer's identity, [`ID_ANY`] for any peer (host order).
    pub identity: u32,
    /// Destination port, 0 = any (host order).
    pub port: u16,
    /// IP protocol, 0 = any.
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
}

/// Value of [`POL_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// Index of the rule (`NetworkPolicy`) that allows, for flow records (host order).
    pub rule: u32,
    /// Zero (future bits).
    pub flags: u32,
}

/// Key of [`CT_MAP`]: a flow at one endpoint, in the direction of its
/// first packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// ifindex of the endpoint's host-side veth (host order).
    pub ep: u32,
    /// Source address of the first packet, network byte order.
    pub saddr: u32,
    /// Destination address of the first packet, network byte order.
    pub daddr: u32,
    /// Source port (ICMP echo: the identifier), network byte order.
    pub sport: u16,
    /// Destination port (ICMP echo: the identifier), network byte order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Direction of the first packet: [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    /// Zero.
    pub pad: u16,
}

/// Value of [`CT_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` of the first packet.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the latest packet.
    pub last_ns: u64,
    /// [`CT_F_REPLY_SEEN`], [`CT_F_FIN`], [`CT_F_RST`], [`CT_F_UNENFORCED`].
    pub flags: u32,
    /// [`PolicyValue::rule`] of the entry that allowed the flow, or
    /// [`CT_RULE_NONE`] (host order).
    pub rule: u32,
    /// Packets of the flow in both directions that passed this endpoint's
    /// programs (the service map's traffic; racing CPUs add atomically).
    pub packets: u64,
    /// Their bytes (`skb->len`: layer 2 up).
    pub bytes: u64,
}

/// Why a policy program dropped a packet: the index into [`DROPS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// No policy entry allows a new flow to the pod.
    PolicyDeniedIngress = 1,
    /// No policy entry allows a new flow from the pod.
    PolicyDeniedEgress = 2,
    /// A flow that needed a conntrack entry could not get one.
    CtMapFull = 3,
    /// An IPv4 packet too short for its headers.
    Malformed = 4,
    /// An IPv4 fragment (its ports cannot be known) in an enforced direction.
    Fragment = 5,
    /// Neither IPv4 nor ARP in an enforced direction (weir is IPv4 only).
    NotIpv4 = 6,
    /// The pod sent from an address that is not its own.
    SourceSpoofed = 7,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [Self; 7] = [
        Self::PolicyDeniedIngress,
        Self::PolicyDeniedEgress,
        Self::CtMapFull,
        Self::Malformed,
        Self::Fragment,
        Self::NotIpv4,
        Self::SourceSpoofed,
    ];

    /// The reason's name as metrics and flow records print it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::PolicyDeniedIngress => "POLICY_DENIED_INGRESS",
            Self::PolicyDeniedEgress => "POLICY_DENIED_EGRESS",
            Self::CtMapFull => "CT_MAP_FULL",
            Self::Malformed => "MALFORMED",
            Self::Fragment => "FRAGMENT",
            Self::NotIpv4 => "NOT_IPV4",
            Self::SourceSpoofed => "SOURCE_SPOOFED",
        }
    }

    /// The reason with index `i`, if there is one.
    #[must_use]
    pub const fn from_index(i: u32) -> Option<Self> {
        match i {
            1 => Some(Self::PolicyDeniedIngress),
            2 => Some(Self::PolicyDeniedEgress),
            3 => Some(Self::CtMapFull),
            4 => Some(Self::Malformed),
            5 => Some(Self::Fragment),
            6 => Some(Self::NotIpv4),
            7 => Some(Self::SourceSpoofed),
            _ => None,
        }
    }
}

// --------------------------------------------------------------- flow records

/// Name of the ring buffer of [`FlowRecord`]s the policy programs write:
/// one per new flow verdict (an allowed new connection, a denied packet
/// after aggregation), not one per packet.
pub const FLOWS_MAP: &str = "weir_flows_v1";
/// Size of [`FLOWS_MAP`] in bytes (a power of two; each record takes
/// 64 + 8 header bytes: about 29 000 records, ~3 s at the default cap).
pub const FLOWS_MAP_BYTES: u32 = 2 * 1024 * 1024;
/// Name of the one-element config array of the flow records: index 0 →
/// [`FlowConfig`]. All zero (never written) means the defaults.
pub const FLOW_CFG_MAP: &str = "weir_flow_cfg_v1";
/// Name of the LRU map of recently reported denials: [`FlowSeenKey`] →
/// [`FlowSeenValue`] (denials of one key are reported at most once per
/// [`FlowConfig::deny_interval_ms`]).
pub const FLOW_SEEN_MAP: &str = "weir_flow_seen_v1";
/// Number of denial keys remembered (LRU).
pub const FLOW_SEEN_MAP_ENTRIES: u32 = 16_384;
/// Name of the per-CPU one-element array holding each CPU's token bucket
/// ([`FlowBucket`]).
pub const FLOW_BUCKET_MAP: &str = "weir_flow_bucket_v1";
/// Name of the per-CPU array of records not written, indexed by
/// [`FLOW_LOST_AGGREGATED`], [`FLOW_LOST_RATE_LIMITED`], [`FLOW_LOST_RING_FULL`] (u64).
pub const FLOW_LOST_MAP: &str = "weir_flow_lost_v1";
/// Length of [`FLOW_LOST_MAP`].
pub const FLOW_LOST_REASONS: u32 = 3;
/// [`FLOW_LOST_MAP`] index: a denial folded into the next record of its key
/// (reported there as [`FlowRecord::suppressed`]).
pub const FLOW_LOST_AGGREGATED: u32 = 0;
/// [`FLOW_LOST_MAP`] index: the CPU's token bucket was empty.
pub const FLOW_LOST_RATE_LIMITED: u32 = 1;
/// [`FLOW_LOST_MAP`] index: the ring buffer was full (the reader is behind).
pub const FLOW_LOST_RING_FULL: u32 = 2;

/// [`FlowConfig::flags`] bit: write no flow records.
pub const FLOW_CFG_DISABLED: u32 = 1;
/// Records per second per CPU when [`FlowConfig::rate_per_cpu`] is 0.
pub const FLOW_DEFAULT_RATE_PER_CPU: u32 = 2500;
/// Denials of one key are reported at most this often when
/// [`FlowConfig::deny_interval_ms`] is 0.
pub const FLOW_DEFAULT_DENY_INTERVAL_MS: u32 = 1000;
/// The largest per-CPU rate and burst the programs honour (they clamp: no
/// overflow in the bucket's nanosecond arithmetic).
pub const FLOW_MAX_RATE_PER_CPU: u32 = 1_000_000;

/// [`FlowRecord::verdict`]: the flow was let through.
pub const FLOW_VERDICT_ALLOWED: u8 = 1;
/// [`FlowRecord::verdict`]: the packet was dropped ([`FlowRecord::reason`] says why).
pub const FLOW_VERDICT_DENIED: u8 = 2;

/// [`FlowRecord::flags`] bit: allowed because the direction is not
/// enforced (the other one is: the flow got a conntrack entry for its
/// replies); no rule.
pub const FLOW_F_UNENFORCED: u8 = 1;
/// [`FlowRecord::flags`] bit: the endpoint tracks no flows (nothing
/// enforced): a TCP SYN without ACK was taken as a new connection. UDP and
/// ICMP of such endpoints are not recorded.
pub const FLOW_F_UNTRACKED: u8 = 2;
/// [`FlowRecord::flags`] bit: the packet's socket connected to a service
/// VIP: [`FlowRecord::svc_ip`] / [`FlowRecord::svc_port`] hold it.
pub const FLOW_F_SERVICE: u8 = 4;

/// Value of [`FLOW_CFG_MAP`] at index 0; a zero field means its default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowConfig {
    /// [`FLOW_CFG_DISABLED`] and future bits (host order).
    pub flags: u32,
    /// Records per second each CPU may write (token bucket refill), 0 =
    /// [`FLOW_DEFAULT_RATE_PER_CPU`] (host order).
    pub rate_per_cpu: u32,
    /// Token bucket size per CPU, 0 = one second's worth (host order).
    pub burst: u32,
    /// Minimum time between two records of one denial key, 0 =
    /// [`FLOW_DEFAULT_DENY_INTERVAL_MS`] (host order).
    pub deny_interval_ms: u32,
}

/// Value of [`FLOW_BUCKET_MAP`], one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    /// Tokens in units of 1e-9 record (one record costs 1e9).
    pub credit: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}

/// Key of [`FLOW_SEEN_MAP`]: what a denial is aggregated by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowSeenKey {
    /// ifindex of the endpoint's host-side veth (host order).
    pub ep: u32,
    /// The peer's address, network byte order (0 if unknown).
    pub peer: u32,
    /// Destination port, network byte order (0 if none).
    pub port: u16,
    /// IP protocol (0 if unknown).
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub dir: u8,
    /// The [`DropReason`].
    pub reason: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// Value of [`FLOW_SEEN_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSeenValue {
    /// `bpf_ktime_get_ns` of the last record of this key.
    pub last_ns: u64,
    /// Denials folded since that record (host order).
    pub suppressed: u32,
    /// Zero.
    pub pad: u32,
}

/// One record of [`FLOWS_MAP`], as seen at one endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRecord {
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) of the packet.
    pub ts_ns: u64,
    /// Cookie of the packet's socket (0 if the skb carries none).
    pub sock_cookie: u64,
    /// ifindex of the endpoint's host-side veth (host order).
    pub ep: u32,
    /// Source address, network byte order (0 if not IPv4).
    pub saddr: u32,
    /// Destination address, network byte order.
    pub daddr: u32,
    /// Source port (ICMP echo: the identifier), network byte order.
    pub sport: u16,
    /// Destination port (ICMP echo: the identifier), network byte order.
    pub dport: u16,
    /// IP protocol (0 if not IPv4).
    pub proto: u8,
    /// [`DIR_INGRESS`] (to the endpoint) or [`DIR_EGRESS`] (from it).
    pub dir: u8,
    /// [`FLOW_VERDICT_ALLOWED`] or [`FLOW_VERDICT_DENIED`].
    pub verdict: u8,
    /// The [`DropReason`] of a denial, 0 otherwise.
    pub reason: u8,
    /// Identity of the source (host order; 0 if unknown).
    pub src_identity: u32,
    /// Identity of the destination (host order; 0 if unknown).
    pub dst_identity: u32,
    /// [`PolicyValue::rule`] of the entry that allowed the flow; 0 when no
    /// rule applies (denied, or allowed unenforced: see `flags`) (host order).
    pub rule: u32,
    /// The service VIP the socket connected to, network byte order
    /// (with [`FLOW_F_SERVICE`]).
    pub svc_ip: u32,
    /// The service port, network byte order (with [`FLOW_F_SERVICE`]).
    pub svc_port: u16,
    /// TCP flags of the packet (0 for other protocols).
    pub tcp_flags: u8,
    /// [`FLOW_F_UNENFORCED`], [`FLOW_F_UNTRACKED`], [`FLOW_F_SERVICE`].
    pub flags: u8,
    /// Denials of the same key folded since its previous record (host order).
    pub suppressed: u32,
    /// Zero.
    pub pad: u32,
}

// ---------------------------------------------------------- kernel metrics

/// Name of the per-CPU hash of TCP socket statistics per local IPv4
/// address (a pod IP; network order u32 key) → [`SockStats`]. The programs
/// are global (cgroup2 root, tracepoint): every node on the kernel counts
/// every local address inside its [`MetricsConfig`] prefix; each agent reads
/// only its pods' IPs.
pub const SOCK_STATS_MAP: &str = "weir_sock_stats_v1";
/// Maximum number of addresses in [`SOCK_STATS_MAP`].
pub const SOCK_STATS_MAP_ENTRIES: u32 = 16_384;
/// Name of the one-entry array holding the [`MetricsConfig`].
pub const METRICS_CFG_MAP: &str = "weir_metrics_cfg_v1";
/// Name of the `sock_ops` program counting established connections and
/// sampling smoothed RTTs (cgroup2 root).
pub const PROG_METRICS_SOCKOPS: &str = "weir_metrics_sockops";
/// Name of the tracepoint program (`tcp:tcp_retransmit_skb`) counting
/// retransmitted segments.
pub const PROG_METRICS_RETRANSMIT: &str = "weir_metrics_retransmit";

/// Value of [`SOCK_STATS_MAP`], one per CPU; userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockStats {
    /// TCP connections the address opened (active open reached ESTABLISHED).
    pub opened: u64,
    /// TCP connections the address accepted (passive open reached ESTABLISHED).
    pub accepted: u64,
    /// TCP segments retransmitted from the address.
    pub retransmits: u64,
    /// Smoothed-RTT samples taken (one when a connection is established,
    /// one when it leaves ESTABLISHED).
    pub rtt_samples: u64,
    /// Sum of those samples in the kernel's unit: microseconds << 3
    /// (`tcp_sock.srtt_us`); userspace divides by 8.
    pub srtt_sum: u64,
}

impl core::ops::Add for SockStats {
    type Output = Self;

    /// Adds another CPU's statistics to these.
    fn add(self, o: Self) -> Self {
        Self {
            opened: self.opened.wrapping_add(o.opened),
            accepted: self.accepted.wrapping_add(o.accepted),
            retransmits: self.retransmits.wrapping_add(o.retransmits),
            rtt_samples: self.rtt_samples.wrapping_add(o.rtt_samples),
            srtt_sum: self.srtt_sum.wrapping_add(o.srtt_sum),
        }
    }
}

/// Value of [`METRICS_CFG_MAP`] (index 0): which local addresses to count.
/// An address is counted if `addr & mask == net`; a zero mask counts all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// The node's pod CIDR's network address, network order.
    pub net: u32,
    /// Its netmask, network order.
    pub mask: u32,
}

#[cfg(feature = "user")]
mod user_metrics {
    // SAFETY: repr(C), Copy, no padding (u64/u32 fields only), every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::SockStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MetricsConfig {}
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are repr(C), Copy, have no padding and every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::TrafficKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficCounters {}
    // SAFETY: the balancer's types are repr(C), Copy, with explicit padding
    // fields (no implicit padding) and every bit pattern is valid.
    unsafe impl aya::Pod for super::SvcKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SvcValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LbConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NpService {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MaglevTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NpFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NpRev {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NpSnat {}
    // SAFETY: the policy types are repr(C), Copy, with explicit padding
    // fields (no implicit padding) and every bit pattern is valid.
    unsafe impl aya::Pod for super::IpCacheValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EndpointConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
    // SAFETY: the flow types are repr(C), Copy, with explicit padding
    // fields (no implicit padding) and every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowSeenKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowSeenValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowRecord {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::{
        AffinityKey, AffinityValue, Backend, LbConfig, SlotKey, SvcKey, SvcValue, TrafficCounters,
        TrafficKey,
    };

    #[test]
    fn balancer_layouts_are_pinned() {
        assert_eq!(size_of::<SvcKey>(), 8);
        assert_eq!(offset_of!(SvcKey, ip), 0);
        assert_eq!(offset_of!(SvcKey, port), 4);
        assert_eq!(offset_of!(SvcKey, proto), 6);
        assert_eq!(offset_of!(SvcKey, pad), 7);
        assert_eq!(size_of::<SvcValue>(), 16);
        assert_eq!(offset_of!(SvcValue, id), 0);
        assert_eq!(offset_of!(SvcValue, count), 4);
        assert_eq!(offset_of!(SvcValue, flags), 8);
        assert_eq!(offset_of!(SvcValue, affinity_timeout_s), 12);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(offset_of!(SlotKey, id), 0);
        assert_eq!(offset_of!(SlotKey, slot), 4);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(offset_of!(Backend, ip), 0);
        assert_eq!(offset_of!(Backend, port), 4);
        assert_eq!(offset_of!(Backend, pad), 6);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(offset_of!(AffinityKey, client), 0);
        assert_eq!(offset_of!(AffinityKey, id), 8);
        assert_eq!(offset_of!(AffinityKey, pad), 12);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(offset_of!(AffinityValue, backend), 0);
        assert_eq!(offset_of!(AffinityValue, pad), 4);
        assert_eq!(offset_of!(AffinityValue, last_used_ns), 8);
        assert_eq!(size_of::<LbConfig>(), 4);
        assert_eq!(offset_of!(LbConfig, flags), 0);
    }

    #[test]
    fn nodeport_layouts_are_pinned() {
        use super::{FlowKey, MAGLEV_CAPACITY, MaglevTable, NpFlow, NpRev, NpService, NpSnat};
        assert_eq!(size_of::<NpService>(), 8);
        assert_eq!(offset_of!(NpService, flags), 4);
        assert_eq!(size_of::<MaglevTable>(), 8 + 8 * MAGLEV_CAPACITY);
        assert_eq!(offset_of!(MaglevTable, pad), 4);
        assert_eq!(offset_of!(MaglevTable, entries), 8);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(offset_of!(FlowKey, daddr), 4);
        assert_eq!(offset_of!(FlowKey, sport), 8);
        assert_eq!(offset_of!(FlowKey, dport), 10);
        assert_eq!(offset_of!(FlowKey, proto), 12);
        assert_eq!(offset_of!(FlowKey, pad), 13);
        assert_eq!(size_of::<NpFlow>(), 8);
        assert_eq!(offset_of!(NpFlow, port), 4);
        assert_eq!(offset_of!(NpFlow, nat_port), 6);
        assert_eq!(size_of::<NpRev>(), 20);
        assert_eq!(offset_of!(NpRev, node_ip), 4);
        assert_eq!(offset_of!(NpRev, client_port), 8);
        assert_eq!(offset_of!(NpRev, node_port), 10);
        assert_eq!(offset_of!(NpRev, mac), 12);
        assert_eq!(offset_of!(NpRev, flags), 18);
        assert_eq!(size_of::<NpSnat>(), 8);
        assert_eq!(offset_of!(NpSnat, port), 4);
        assert_eq!(offset_of!(NpSnat, pad), 6);
    }

    #[test]
    fn policy_layouts_are_pinned() {
        use super::{CtKey, CtValue, DROP_REASONS, DropReason, EndpointConfig, IpCacheValue};
        use super::{PolicyKey, PolicyValue};
        assert_eq!(size_of::<IpCacheValue>(), 12);
        assert_eq!(offset_of!(IpCacheValue, identity), 0);
        assert_eq!(offset_of!(IpCacheValue, cidr_identity), 4);
        assert_eq!(offset_of!(IpCacheValue, flags), 8);
        assert_eq!(size_of::<EndpointConfig>(), 16);
        assert_eq!(offset_of!(EndpointConfig, identity), 0);
        assert_eq!(offset_of!(EndpointConfig, pod_ip), 4);
        assert_eq!(offset_of!(EndpointConfig, flags), 8);
        assert_eq!(offset_of!(EndpointConfig, pad), 12);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(offset_of!(PolicyKey, ep), 0);
        assert_eq!(offset_of!(PolicyKey, identity), 4);
        assert_eq!(offset_of!(PolicyKey, port), 8);
        assert_eq!(offset_of!(PolicyKey, proto), 10);
        assert_eq!(offset_of!(PolicyKey, dir), 11);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(offset_of!(PolicyValue, rule), 0);
        assert_eq!(offset_of!(PolicyValue, flags), 4);
        assert_eq!(size_of::<CtKey>(), 20);
        assert_eq!(offset_of!(CtKey, ep), 0);
        assert_eq!(offset_of!(CtKey, saddr), 4);
        assert_eq!(offset_of!(CtKey, daddr), 8);
        assert_eq!(offset_of!(CtKey, sport), 12);
        assert_eq!(offset_of!(CtKey, dport), 14);
        assert_eq!(offset_of!(CtKey, proto), 16);
        assert_eq!(offset_of!(CtKey, dir), 17);
        assert_eq!(offset_of!(CtKey, pad), 18);
        assert_eq!(size_of::<CtValue>(), 40);
        assert_eq!(offset_of!(CtValue, created_ns), 0);
        assert_eq!(offset_of!(CtValue, last_ns), 8);
        assert_eq!(offset_of!(CtValue, flags), 16);
        assert_eq!(offset_of!(CtValue, rule), 20);
        assert_eq!(offset_of!(CtValue, packets), 24);
        assert_eq!(offset_of!(CtValue, bytes), 32);
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_index(r as u32), Some(r));
            assert!((r as u32) < DROP_REASONS, "{r:?} fits the drops array");
        }
        assert_eq!(DropReason::from_index(0), None);
    }

    #[test]
    fn flow_layouts_are_pinned() {
        use super::{FlowBucket, FlowConfig, FlowRecord, FlowSeenKey, FlowSeenValue};
        assert_eq!(size_of::<FlowConfig>(), 16);
        assert_eq!(offset_of!(FlowConfig, flags), 0);
        assert_eq!(offset_of!(FlowConfig, rate_per_cpu), 4);
        assert_eq!(offset_of!(FlowConfig, burst), 8);
        assert_eq!(offset_of!(FlowConfig, deny_interval_ms), 12);
        assert_eq!(size_of::<FlowBucket>(), 16);
        assert_eq!(offset_of!(FlowBucket, credit), 0);
        assert_eq!(offset_of!(FlowBucket, last_ns), 8);
        assert_eq!(size_of::<FlowSeenKey>(), 16);
        assert_eq!(offset_of!(FlowSeenKey, ep), 0);
        assert_eq!(offset_of!(FlowSeenKey, peer), 4);
        assert_eq!(offset_of!(FlowSeenKey, port), 8);
        assert_eq!(offset_of!(FlowSeenKey, proto), 10);
        assert_eq!(offset_of!(FlowSeenKey, dir), 11);
        assert_eq!(offset_of!(FlowSeenKey, reason), 12);
        assert_eq!(offset_of!(FlowSeenKey, pad), 13);
        assert_eq!(size_of::<FlowSeenValue>(), 16);
        assert_eq!(offset_of!(FlowSeenValue, last_ns), 0);
        assert_eq!(offset_of!(FlowSeenValue, suppressed), 8);
        assert_eq!(offset_of!(FlowSeenValue, pad), 12);
        assert_eq!(size_of::<FlowRecord>(), 64);
        assert_eq!(offset_of!(FlowRecord, ts_ns), 0);
        assert_eq!(offset_of!(FlowRecord, sock_cookie), 8);
        assert_eq!(offset_of!(FlowRecord, ep), 16);
        assert_eq!(offset_of!(FlowRecord, saddr), 20);
        assert_eq!(offset_of!(FlowRecord, daddr), 24);
        assert_eq!(offset_of!(FlowRecord, sport), 28);
        assert_eq!(offset_of!(FlowRecord, dport), 30);
        assert_eq!(offset_of!(FlowRecord, proto), 32);
        assert_eq!(offset_of!(FlowRecord, dir), 33);
        assert_eq!(offset_of!(FlowRecord, verdict), 34);
        assert_eq!(offset_of!(FlowRecord, reason), 35);
        assert_eq!(offset_of!(FlowRecord, src_identity), 36);
        assert_eq!(offset_of!(FlowRecord, dst_identity), 40);
        assert_eq!(offset_of!(FlowRecord, rule), 44);
        assert_eq!(offset_of!(FlowRecord, svc_ip), 48);
        assert_eq!(offset_of!(FlowRecord, svc_port), 52);
        assert_eq!(offset_of!(FlowRecord, tcp_flags), 54);
        assert_eq!(offset_of!(FlowRecord, flags), 55);
        assert_eq!(offset_of!(FlowRecord, suppressed), 56);
        assert_eq!(offset_of!(FlowRecord, pad), 60);
    }

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

    #[test]
    fn metrics_layouts_are_pinned() {
        use super::{MetricsConfig, SockStats};
        assert_eq!(size_of::<SockStats>(), 40);
        assert_eq!(offset_of!(SockStats, opened), 0);
        assert_eq!(offset_of!(SockStats, accepted), 8);
        assert_eq!(offset_of!(SockStats, retransmits), 16);
        assert_eq!(offset_of!(SockStats, rtt_samples), 24);
        assert_eq!(offset_of!(SockStats, srtt_sum), 32);
        assert_eq!(size_of::<MetricsConfig>(), 8);
        assert_eq!(offset_of!(MetricsConfig, net), 0);
        assert_eq!(offset_of!(MetricsConfig, mask), 4);
        let one = SockStats {
            opened: 1,
            accepted: 2,
            retransmits: 3,
            rtt_samples: 4,
            srtt_sum: 5,
        };
        assert_eq!((one + one).srtt_sum, 10);
        assert_eq!((one + one).opened, 2);
    }
}
