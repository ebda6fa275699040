//! The node's part of the cluster service map: flows aggregated into edges
//! (source → destination service or pod, port, protocol) with connection,
//! drop and byte totals since the agent started.
//!
//! Each connection is counted once in the cluster, where its record says
//! most: at the source pod's egress (the only place that knows the service
//! the socket load balancer translated), or at the destination's ingress
//! when the source is not a pod (host, other nodes, the world). A pod's
//! connection is also seen at the destination pod's ingress; that record is
//! not counted again. Denials are counted wherever they happen (the other
//! end never sees them), packets folded into a denial record included.
//!
//! Bytes come from the policy conntrack (`weir_ct_v2` counts each entry's
//! bytes), which exists only at endpoints a `NetworkPolicy` selects: a
//! counted connection's bytes are added when this node has a conntrack entry
//! with its 5-tuple ([`EdgeTable::add_bytes`]); other edges show 0 bytes.
//!
//! Pods are reported as kind `pod`; the control resolves them to their
//! workloads (it has the owner references).

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use weir_common::{ID_CIDR_MIN, ID_HOST, ID_POD_MIN, ID_REMOTE_NODE, PROTO_TCP, PROTO_UDP};
use weir_proto::v1;

use super::{Flow, FlowHub, Peer, Verdict};

/// [`End::kind`] of a pod (the control turns it into its workload).
pub const KIND_POD: &str = "pod";
/// [`End::kind`] of a service (the socket load balancer's VIP).
pub const KIND_SERVICE: &str = "service";
/// [`End::kind`] of a node (this one by name, another by address).
pub const KIND_HOST: &str = "host";
/// [`End::kind`] of an address outside the cluster.
pub const KIND_WORLD: &str = "world";

/// Most edges a node keeps; new ones beyond are counted in
/// [`EdgeTable::overflow`] instead.
pub const MAX_EDGES: usize = 10_000;
/// Most connections whose bytes are followed at once.
pub const MAX_TRACKED: usize = 65_536;
/// Reports a followed connection may miss its conntrack entry before it is
/// forgotten (its last bytes are then not counted).
const MISSES_BEFORE_FORGET: u8 = 2;

/// One end of an edge, as the node can name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct End {
    /// [`KIND_POD`], [`KIND_SERVICE`], [`KIND_HOST`] or [`KIND_WORLD`].
    pub kind: &'static str,
    /// The pod's namespace (empty otherwise, and for a service until it is
    /// named at report time).
    pub namespace: String,
    /// The pod's name; for a service its VIP; a node's name or address;
    /// the world's address.
    pub name: String,
}

impl End {
    fn new(kind: &'static str, namespace: &str, name: impl Into<String>) -> Self {
        Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.into(),
        }
    }

    fn proto(&self) -> v1::Endpoint {
        v1::Endpoint {
            kind: self.kind.to_owned(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// What an edge is: who connected where.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EdgeKey {
    /// Who opened the connections.
    pub source: End,
    /// The service, when the socket load balancer translated its VIP;
    /// else the peer.
    pub destination: End,
    /// The pod that served a service.
    pub backend: Option<End>,
    /// The destination port (the service port for a service).
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
}

/// An edge's totals since the agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections allowed.
    pub connections: u64,
    /// Bytes of those connections, both directions, where conntrack has them.
    pub bytes: u64,
    /// Packets of new flows dropped.
    pub drops: u64,
    /// When it was last seen (ms since the Unix epoch).
    pub last_seen_ms: i64,
}

/// A connection's addresses as its first packet had them (the conntrack
/// key without the endpoint); host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    /// Source address.
    pub saddr: Ipv4Addr,
    /// Destination address.
    pub daddr: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
}

/// A counted connection whose bytes are followed.
struct Tracked {
    edge: Arc<EdgeKey>,
    /// The conntrack byte count already added to the edge.
    bytes_seen: u64,
    /// Reports in a row that found no conntrack entry.
    misses: u8,
}

/// How a flow record counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    /// A connection, counted here.
    Connection,
    /// `n` dropped packets.
    Drops(u64),
}

/// (service VIP, port, protocol) → the service's (namespace, name).
pub type ServiceNames<'a> = dyn Fn(Ipv4Addr, u16, &str) -> Option<(String, String)> + 'a;

/// The node's edges.
pub struct EdgeTable {
    node: String,
    edges: HashMap<Arc<EdgeKey>, Counts>,
    tracked: HashMap<Tuple, Tracked>,
    overflow: u64,
}

fn proto_number(name: &str) -> Option<(u8, &'static str)> {
    match name {
        "TCP" => Some((PROTO_TCP, "TCP")),
        "UDP" => Some((PROTO_UDP, "UDP")),
        _ => None,
    }
}

/// Whether `identity` is a pod's (not the host, a node, the world or an
/// `ipBlock`).
fn is_pod_identity(identity: u32) -> bool {
    (ID_POD_MIN..ID_CIDR_MIN).contains(&identity)
}

/// How `f` counts on this node, if it does (see the module docs).
fn counted(f: &Flow) -> Option<Counted> {
    if f.verdict == Verdict::Denied {
        return Some(Counted::Drops(1 + u64::from(f.suppressed)));
    }
    let source_is_pod = f.source.pod.is_some() || is_pod_identity(f.source.identity);
    (f.direction == "egress" || !source_is_pod).then_some(Counted::Connection)
}

impl EdgeTable {
    /// An empty table for node `node` (its name names the host end).
    #[must_use]
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            edges: HashMap::new(),
            tracked: HashMap::new(),
            overflow: 0,
        }
    }

    /// The end a flow's peer is.
    fn end(&self, p: &Peer) -> End {
        if let (Some(ns), Some(pod)) = (&p.namespace, &p.pod) {
            return End::new(KIND_POD, ns, pod.as_str());
        }
        match p.identity {
            ID_HOST => End::new(KIND_HOST, "", self.node.as_str()),
            ID_REMOTE_NODE => End::new(KIND_HOST, "", p.ip.to_string()),
            id if is_pod_identity(id) => End::new(KIND_POD, "", p.ip.to_string()),
            _ => End::new(KIND_WORLD, "", p.ip.to_string()),
        }
    }

    fn key(&self, f: &Flow, protocol: &'static str) -> EdgeKey {
        let source = self.end(&f.source);
        let peer = self.end(&f.destination);
        match &f.service {
            Some(s) => EdgeKey {
                source,
                destination: End::new(KIND_SERVICE, "", s.ip.to_string()),
                backend: Some(peer),
                port: s.port,
                protocol,
            },
            None => EdgeKey {
                source,
                destination: peer,
                backend: None,
                port: f.destination.port,
                protocol,
            },
        }
    }

    /// Adds flow `f`, seen at `now_ms`, if it counts here.
    pub fn observe(&mut self, f: &Flow, now_ms: i64) {
        let Some((proto, protocol)) = proto_number(&f.protocol) else {
            return;
        };
        let Some(how) = counted(f) else {
            return;
        };
        let key = self.key(f, protocol);
        let key = match self.edges.get_key_value(&key) {
            Some((k, _)) => k.clone(),
            None if self.edges.len() >= MAX_EDGES => {
                self.overflow += 1;
                return;
            }
            None => {
                let k = Arc::new(key);
                self.edges.insert(k.clone(), Counts::default());
                k
            }
        };
        let Some(counts) = self.edges.get_mut(&key) else {
            return;
        };
        counts.last_seen_ms = counts.last_seen_ms.max(now_ms);
        match how {
            Counted::Drops(n) => counts.drops += n,
            Counted::Connection => {
                counts.connections += 1;
                if self.tracked.len() < MAX_TRACKED {
                    let t = Tuple {
                        saddr: f.source.ip,
                        daddr: f.destination.ip,
                        sport: f.source.port,
                        dport: f.destination.port,
                        proto,
                    };
                    self.tracked.entry(t).or_insert(Tracked {
                        edge: key,
                        bytes_seen: 0,
                        misses: 0,
                    });
                }
            }
        }
    }

    /// Adds the bytes conntrack counted since the last call to the edges of
    /// the connections followed; `bytes` is every conntrack entry's byte
    /// count by 5-tuple (the largest, if several endpoints track it).
    pub fn add_bytes(&mut self, bytes: &HashMap<Tuple, u64>) {
        let edges = &mut self.edges;
        self.tracked.retain(|t, c| {
            let Some(&now) = bytes.get(t) else {
                c.misses += 1;
                return c.misses <= MISSES_BEFORE_FORGET;
            };
            c.misses = 0;
            // A smaller count is a new entry with the same tuple.
            let delta = now.checked_sub(c.bytes_seen).unwrap_or(now);
            c.bytes_seen = now;
            if let Some(counts) = edges.get_mut(&c.edge) {
                counts.bytes += delta;
            }
            true
        });
    }

    /// Edges not kept because the table was full.
    #[must_use]
    pub fn overflow(&self) -> u64 {
        self.overflow
    }

    /// Connections whose bytes are followed.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.tracked.len()
    }

    /// The edges as reported, sorted; `service_of(vip, port, protocol)`
    /// names a service VIP (`namespace`, `name`).
    pub fn report(&self, service_of: &ServiceNames<'_>) -> Vec<v1::Edge> {
        let sorted: BTreeMap<&EdgeKey, &Counts> =
            self.edges.iter().map(|(k, c)| (&**k, c)).collect();
        sorted
            .into_iter()
            .map(|(k, c)| {
                let mut destination = k.destination.proto();
                if k.destination.kind == KIND_SERVICE
                    && let Ok(vip) = k.destination.name.parse::<Ipv4Addr>()
                    && let Some((ns, name)) = service_of(vip, k.port, k.protocol)
                {
                    destination.namespace = ns;
                    destination.name = name;
                }
                v1::Edge {
                    source: Some(k.source.proto()),
                    destination: Some(destination),
                    backend: k.backend.as_ref().map(End::proto),
                    port: u32::from(k.port),
                    protocol: k.protocol.to_owned(),
                    connections: c.connections,
                    bytes: c.bytes,
                    drops: c.drops,
                    last_seen_ms: c.last_seen_ms,
                }
            })
            .collect()
    }
}

/// Milliseconds since the Unix epoch now.
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Feeds `hub`'s flows into `table` until `cancel`. Flows the broadcast
/// dropped because this task fell behind are logged and not counted.
pub async fn aggregate(hub: Arc<FlowHub>, table: Arc<Mutex<EdgeTable>>, cancel: CancellationToken) {
    let mut rx = hub.subscribe();
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return,
            n = rx.recv() => n,
        };
        match next {
            Ok((_, flow)) => table
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .observe(&flow, now_ms()),
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "the service map fell behind the flows; some are not counted"
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::Service;

    fn peer(ip: [u8; 4], port: u16, identity: u32, pod: Option<(&str, &str)>) -> Peer {
        Peer {
            ip: Ipv4Addr::from(ip),
            port,
            identity,
            namespace: pod.map(|p| p.0.to_owned()),
            pod: pod.map(|p| p.1.to_owned()),
        }
    }

    fn flow(verdict: Verdict, direction: &str, source: Peer, destination: Peer) -> Flow {
        Flow {
            time: String::new(),
            node: "n1".into(),
            verdict,
            drop_reason: None,
            direction: direction.into(),
            protocol: "TCP".into(),
            source,
            destination,
            service: None,
            policy: None,
            policies: Vec::new(),
            rule: 0,
            tcp_flags: String::new(),
            suppressed: 0,
            flags: Vec::new(),
        }
    }

    fn client(port: u16) -> Peer {
        peer([10, 244, 1, 5], port, 300, Some(("x", "client-abc")))
    }

    fn server() -> Peer {
        peer([10, 244, 2, 7], 8080, 400, Some(("x", "server-def")))
    }

    fn via_service(mut f: Flow) -> Flow {
        f.service = Some(Service {
            ip: Ipv4Addr::new(10, 96, 0, 20),
            port: 80,
        });
        f
    }

    fn names(vip: Ipv4Addr, port: u16, proto: &str) -> Option<(String, String)> {
        (vip == Ipv4Addr::new(10, 96, 0, 20) && port == 80 && proto == "TCP")
            .then(|| ("x".to_owned(), "web".to_owned()))
    }

    #[test]
    fn a_connection_counts_once_at_its_source() {
        let mut t = EdgeTable::new("n1");
        for sport in [40000, 40001, 40002] {
            t.observe(
                &via_service(flow(Verdict::Allowed, "egress", client(sport), server())),
                10,
            );
            // The same connection at the server's ingress: not again.
            t.observe(
                &flow(Verdict::Allowed, "ingress", client(sport), server()),
                11,
            );
        }
        let edges = t.report(&names);
        assert_eq!(edges.len(), 1, "{edges:?}");
        let e = &edges[0];
        assert_eq!(e.connections, 3);
        assert_eq!(e.drops, 0);
        assert_eq!(e.port, 80, "the service port");
        assert_eq!(e.protocol, "TCP");
        let src = e.source.as_ref().unwrap();
        assert_eq!(
            (&*src.kind, &*src.namespace, &*src.name),
            ("pod", "x", "client-abc")
        );
        let dst = e.destination.as_ref().unwrap();
        assert_eq!(
            (&*dst.kind, &*dst.namespace, &*dst.name),
            ("service", "x", "web")
        );
        let b = e.backend.as_ref().unwrap();
        assert_eq!((&*b.kind, &*b.name), ("pod", "server-def"));
        assert_eq!(e.last_seen_ms, 10);
    }

    #[test]
    fn ingress_from_outside_the_pods_counts_there() {
        let mut t = EdgeTable::new("n1");
        let host = peer([192, 168, 0, 1], 5000, ID_HOST, None);
        let node2 = peer([192, 168, 0, 2], 5001, ID_REMOTE_NODE, None);
        let world = peer([1, 2, 3, 4], 5002, weir_common::ID_WORLD, None);
        for p in [host, node2, world] {
            t.observe(&flow(Verdict::Allowed, "ingress", p, server()), 1);
        }
        let edges = t.report(&names);
        let sources: Vec<(String, String)> = edges
            .iter()
            .map(|e| {
                let s = e.source.clone().unwrap();
                (s.kind, s.name)
            })
            .collect();
        assert_eq!(
            sources,
            [
                ("host".to_owned(), "192.168.0.2".to_owned()),
                ("host".to_owned(), "n1".to_owned()),
                ("world".to_owned(), "1.2.3.4".to_owned()),
            ]
        );
        assert!(edges.iter().all(|e| e.connections == 1 && e.port == 8080));
    }

    #[test]
    fn denials_count_their_folded_packets_and_other_protocols_do_not_count() {
        let mut t = EdgeTable::new("n1");
        let mut d = flow(Verdict::Denied, "ingress", client(40000), server());
        d.suppressed = 4;
        t.observe(&d, 5);
        t.observe(&d, 9);
        let mut icmp = flow(Verdict::Denied, "ingress", client(0), server());
        icmp.protocol = "ICMP".into();
        t.observe(&icmp, 9);
        let edges = t.report(&names);
        assert_eq!(edges.len(), 1);
        assert_eq!((edges[0].drops, edges[0].connections), (10, 0));
        let dst = edges[0].destination.as_ref().unwrap();
        assert_eq!((&*dst.kind, &*dst.name), ("pod", "server-def"));
        assert_eq!(edges[0].port, 8080);
        assert_eq!(edges[0].last_seen_ms, 9);
        assert_eq!(t.tracked(), 0, "drops follow no bytes");
    }

    #[test]
    fn unnamed_services_and_pods_show_their_addresses() {
        let mut t = EdgeTable::new("n1");
        let mut f = flow(
            Verdict::Allowed,
            "egress",
            client(1),
            peer([10, 244, 3, 3], 53, 500, None),
        );
        f.service = Some(Service {
            ip: Ipv4Addr::new(10, 96, 0, 99),
            port: 53,
        });
        f.protocol = "UDP".into();
        t.observe(&f, 1);
        let e = &t.report(&names)[0];
        let dst = e.destination.as_ref().unwrap();
        assert_eq!(
            (&*dst.kind, &*dst.namespace, &*dst.name),
            ("service", "", "10.96.0.99")
        );
        assert_eq!(e.backend.as_ref().unwrap().name, "10.244.3.3");
        assert_eq!(e.protocol, "UDP");
    }

    #[test]
    fn bytes_follow_conntrack_deltas() {
        let mut t = EdgeTable::new("n1");
        let f = via_service(flow(Verdict::Allowed, "egress", client(40000), server()));
        t.observe(&f, 1);
        let tuple = Tuple {
            saddr: f.source.ip,
            daddr: f.destination.ip,
            sport: 40000,
            dport: 8080,
            proto: PROTO_TCP,
        };
        let bytes = |n: u64| HashMap::from([(tuple, n)]);
        t.add_bytes(&bytes(100));
        t.add_bytes(&bytes(250));
        assert_eq!(t.report(&names)[0].bytes, 250);
        // A new entry with the same tuple starts again.
        t.add_bytes(&bytes(30));
        assert_eq!(t.report(&names)[0].bytes, 280);
        // Gone for longer than allowed: forgotten, the total stays.
        for _ in 0..=MISSES_BEFORE_FORGET {
            t.add_bytes(&HashMap::new());
        }
        assert_eq!(t.tracked(), 0);
        t.add_bytes(&bytes(1000));
        assert_eq!(t.report(&names)[0].bytes, 280);
    }

    #[test]
    fn a_full_table_counts_overflow() {
        let mut t = EdgeTable::new("n1");
        for i in 0..=MAX_EDGES {
            let port = u16::try_from(i % 60_000).unwrap() + 1;
            let ip = [1, 2, u8::try_from(i / 60_000).unwrap(), 1];
            t.observe(
                &flow(
                    Verdict::Allowed,
                    "egress",
                    client(1),
                    peer(ip, port, 2, None),
                ),
                1,
            );
        }
        assert_eq!(t.report(&names).len(), MAX_EDGES);
        assert_eq!(t.overflow(), 1);
    }
}
