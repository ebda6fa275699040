//! A flow record decoded and enriched: what `GET /flows` serves, one JSON
//! object per line.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use weir_common::{
    DIR_INGRESS, DropReason, FLOW_F_UNENFORCED, FLOW_F_UNTRACKED, FLOW_VERDICT_DENIED, FlowRecord,
    PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};

/// What happened to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// Let through.
    Allowed,
    /// Dropped.
    Denied,
}

impl Verdict {
    /// `allowed` / `denied` (any case), as filters name them.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "allowed" | "forwarded" => Some(Self::Allowed),
            "denied" | "dropped" => Some(Self::Denied),
            _ => None,
        }
    }

    /// Lower-case name, as metrics label it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
        }
    }
}

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// IPv4 address (0.0.0.0 when the packet was not IPv4).
    pub ip: Ipv4Addr,
    /// Port (ICMP echo: the identifier; 0 when none).
    pub port: u16,
    /// Security identity (1 host, 2 world, 3 remote node, 256.. pods,
    /// ≥ 2^24 `ipBlock`s; 0 unknown).
    pub identity: u32,
    /// The pod's namespace, if the address is a known pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name, if the address is a known pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// The service VIP the client's socket connected to (socket load balancer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// The VIP.
    pub ip: Ipv4Addr,
    /// The service port.
    pub port: u16,
}

/// An enriched flow record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// When the packet was seen (RFC 3339, UTC).
    pub time: String,
    /// The node whose agent saw it.
    pub node: String,
    /// Allowed or denied.
    pub verdict: Verdict,
    /// Why it was dropped (`POLICY_DENIED_INGRESS`, ...), for denials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// `ingress` (towards the endpoint pod) or `egress` (from it).
    pub direction: String,
    /// `TCP`, `UDP`, `ICMP`, `proto-<n>`, or empty when not IPv4.
    pub protocol: String,
    /// The sender.
    pub source: Peer,
    /// The receiver.
    pub destination: Peer,
    /// The service the client connected to, when the socket LB translated it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    /// The `NetworkPolicy` (`namespace/name`, or `host`) whose rule
    /// allowed the flow; none when nothing enforced it or it was denied
    /// (see [`Self::policies`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// A policy denial's isolating policies (`namespace/name`): those that
    /// select the endpoint for the direction, none of which allowed the
    /// flow (Kubernetes' default deny of an isolated pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// The rule number from the policy map (0: none).
    #[serde(default)]
    pub rule: u32,
    /// TCP flags of the packet (`SYN|ACK`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tcp_flags: String,
    /// Denials of the same key folded into this record since the previous one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u32,
    /// `unenforced` (allowed: the direction is not enforced), `untracked`
    /// (the endpoint enforces nothing; a SYN seen as a new connection).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's signature")]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The lookups that name what a record only numbers.
pub(crate) struct Names<'a> {
    /// Pod IP → (namespace, pod).
    pub(crate) pod_of: &'a (dyn Fn(Ipv4Addr) -> Option<(String, String)> + Send + Sync),
    /// Rule number → `namespace/name` or `host`.
    pub(crate) policy_of: &'a (dyn Fn(u32) -> Option<String> + Send + Sync),
    /// (endpoint ifindex, direction byte) → the policies isolating it.
    pub(crate) isolating: &'a (dyn Fn(u32, u8) -> Vec<String> + Send + Sync),
}

/// Whether a drop reason (as the record numbers it) is a policy denial.
fn policy_denial(reason: u8) -> bool {
    matches!(
        DropReason::from_index(u32::from(reason)),
        Some(DropReason::PolicyDeniedIngress | DropReason::PolicyDeniedEgress)
    )
}

/// The record in a ring buffer item, if it is one.
pub(crate) fn parse(item: &[u8]) -> Option<FlowRecord> {
    if item.len() < size_of::<FlowRecord>() {
        return None;
    }
    // SAFETY: the length is checked; FlowRecord is plain old data (every
    // bit pattern valid) and the read does not need alignment.
    Some(unsafe { item.as_ptr().cast::<FlowRecord>().read_unaligned() })
}

/// The protocol's name.
fn protocol(p: u8) -> String {
    match p {
        0 => String::new(),
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_ICMP => "ICMP".into(),
        n => format!("proto-{n}"),
    }
}

/// TCP flags by name, `|`-joined.
fn tcp_flags(f: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    let mut out = String::new();
    for (_, name) in NAMES.iter().filter(|(bit, _)| f & bit != 0) {
        if !out.is_empty() {
            out.push('|');
        }
        out.push_str(name);
    }
    out
}

fn peer(names: &Names<'_>, addr_be: u32, port_be: u16, identity: u32) -> Peer {
    let ip = Ipv4Addr::from(u32::from_be(addr_be));
    let pod = if ip.is_unspecified() {
        None
    } else {
        (names.pod_of)(ip)
    };
    let (namespace, pod) = pod.map_or((None, None), |(n, p)| (Some(n), Some(p)));
    Peer {
        ip,
        port: u16::from_be(port_be),
        identity,
        namespace,
        pod,
    }
}

/// RFC 3339 of `wall_ns` nanoseconds since the Unix epoch.
fn timestamp(wall_ns: i128) -> String {
    k8s_openapi::jiff::Timestamp::from_nanosecond(wall_ns)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}

/// Decodes and names record `r` seen on `node` at `wall_ns`.
pub(crate) fn enrich(r: &FlowRecord, node: &str, wall_ns: i128, names: &Names<'_>) -> Flow {
    let verdict = if r.verdict == FLOW_VERDICT_DENIED {
        Verdict::Denied
    } else {
        Verdict::Allowed
    };
    let unnamed = r.flags & (FLOW_F_UNENFORCED | FLOW_F_UNTRACKED) != 0;
    let policies = if verdict == Verdict::Denied && policy_denial(r.reason) {
        (names.isolating)(r.ep, r.dir)
    } else {
        Vec::new()
    };
    let policy = (verdict == Verdict::Allowed && !unnamed && r.rule != 0)
        .then(|| (names.policy_of)(r.rule).unwrap_or_else(|| format!("rule-{}", r.rule)));
    let mut flags = Vec::new();
    if r.flags & FLOW_F_UNENFORCED != 0 {
        flags.push("unenforced".to_owned());
    }
    if r.flags & FLOW_F_UNTRACKED != 0 {
        flags.push("untracked".to_owned());
    }
    let service = (r.flags & weir_common::FLOW_F_SERVICE != 0).then(|| Service {
        ip: Ipv4Addr::from(u32::from_be(r.svc_ip)),
        port: u16::from_be(r.svc_port),
    });
    Flow {
        time: timestamp(wall_ns),
        node: node.to_owned(),
        verdict,
        drop_reason: (verdict == Verdict::Denied).then(|| {
            DropReason::from_index(u32::from(r.reason))
                .map_or_else(|| format!("REASON_{}", r.reason), |d| d.name().to_owned())
        }),
        direction: if r.dir == DIR_INGRESS {
            "ingress"
        } else {
            "egress"
        }
        .to_owned(),
        protocol: protocol(r.proto),
        source: peer(names, r.saddr, r.sport, r.src_identity),
        destination: peer(names, r.daddr, r.dport, r.dst_identity),
        service,
        policy,
        policies,
        rule: r.rule,
        tcp_flags: if r.proto == PROTO_TCP {
            tcp_flags(r.tcp_flags)
        } else {
            String::new()
        },
        suppressed: r.suppressed,
        flags,
    }
}

/// Which flows to show; every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Either end is a pod of this namespace.
    pub namespace: Option<String>,
    /// Either end is a pod of this name (in `namespace` if given).
    pub pod: Option<String>,
    /// Only this verdict.
    pub verdict: Option<Verdict>,
    /// Either port, or the service port, is this one.
    pub port: Option<u16>,
}

impl FlowFilter {
    fn end_matches(&self, p: &Peer) -> bool {
        let ns_ok = self
            .namespace
            .as_deref()
            .is_none_or(|n| p.namespace.as_deref() == Some(n));
        let pod_ok = self
            .pod
            .as_deref()
            .is_none_or(|n| p.pod.as_deref() == Some(n));
        ns_ok && pod_ok
    }

    /// Whether `f` passes the filter.
    #[must_use]
    pub fn matches(&self, f: &Flow) -> bool {
        if self.verdict.is_some_and(|v| v != f.verdict) {
            return false;
        }
        if let Some(port) = self.port {
            let svc = f.service.as_ref().is_some_and(|s| s.port == port);
            if f.source.port != port && f.destination.port != port && !svc {
                return false;
            }
        }
        if self.namespace.is_none() && self.pod.is_none() {
            return true;
        }
        self.end_matches(&f.source) || self.end_matches(&f.destination)
    }
}

/// The monotonic clock (`bpf_ktime_get_ns`) and the wall clock read together.
pub(crate) struct Clock {
    mono_ns: i128,
    real_ns: i128,
}

fn read_clock(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; both clocks exist on Linux.
    unsafe { libc::clock_gettime(id, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    /// Reads both clocks now.
    pub(crate) fn now() -> Self {
        Self {
            mono_ns: read_clock(libc::CLOCK_MONOTONIC),
            real_ns: read_clock(libc::CLOCK_REALTIME),
        }
    }

    /// Wall-clock nanoseconds of monotonic time `ts_ns`.
    pub(crate) fn wall_ns(&self, ts_ns: u64) -> i128 {
        self.real_ns - (self.mono_ns - i128::from(ts_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_common::{DIR_EGRESS, FLOW_F_SERVICE, FLOW_VERDICT_ALLOWED, ID_WORLD};

    fn be(ip: Ipv4Addr) -> u32 {
        u32::from(ip).to_be()
    }

    fn pod_of(ip: Ipv4Addr) -> Option<(String, String)> {
        (ip == Ipv4Addr::new(10, 244, 1, 5)).then(|| ("x".to_owned(), "a".to_owned()))
    }

    fn policy_of(rule: u32) -> Option<String> {
        (rule == 7).then(|| "x/allow-a".to_owned())
    }

    fn no_isolation(_: u32, _: u8) -> Vec<String> {
        Vec::new()
    }

    const NAMES: Names<'static> = Names {
        pod_of: &pod_of,
        policy_of: &policy_of,
        isolating: &no_isolation,
    };

    fn record(verdict: u8, reason: u8, rule: u32, flags: u8) -> FlowRecord {
        FlowRecord {
            ts_ns: 5,
            sock_cookie: 0,
            ep: 4,
            saddr: be(Ipv4Addr::new(192, 0, 2, 1)),
            daddr: be(Ipv4Addr::new(10, 244, 1, 5)),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            dir: DIR_INGRESS,
            verdict,
            reason,
            src_identity: ID_WORLD,
            dst_identity: 300,
            rule,
            svc_ip: 0,
            svc_port: 0,
            tcp_flags: 0x02,
            flags,
            suppressed: 3,
            pad: 0,
        }
    }

    #[test]
    fn enrich_names_pods_and_policies() {
        let names = NAMES;
        let f = enrich(
            &record(FLOW_VERDICT_ALLOWED, 0, 7, 0),
            "n1",
            1_700_000_000_123_456_789,
            &names,
        );
        assert_eq!(f.time, "2023-11-14T22:13:20.123456789Z");
        assert_eq!(f.verdict, Verdict::Allowed);
        assert_eq!(f.policy.as_deref(), Some("x/allow-a"));
        assert_eq!(f.drop_reason, None);
        assert_eq!(f.destination.namespace.as_deref(), Some("x"));
        assert_eq!(f.destination.pod.as_deref(), Some("a"));
        assert_eq!(f.destination.port, 80);
        assert_eq!(f.source.pod, None);
        assert_eq!(f.source.port, 40000);
        assert_eq!(f.source.identity, ID_WORLD);
        assert_eq!(f.tcp_flags, "SYN");
        assert_eq!(tcp_flags(0x12), "SYN|ACK");
        assert_eq!(tcp_flags(0), "");
        assert_eq!(f.protocol, "TCP");
        assert_eq!(f.direction, "ingress");
        // A rule the lookup does not know is still shown by number.
        let f = enrich(&record(FLOW_VERDICT_ALLOWED, 0, 9, 0), "n1", 0, &names);
        assert_eq!(f.policy.as_deref(), Some("rule-9"));
        // Unenforced: no policy even if a rule number were there.
        let f = enrich(
            &record(FLOW_VERDICT_ALLOWED, 0, 7, FLOW_F_UNENFORCED),
            "n1",
            0,
            &names,
        );
        assert_eq!((f.policy, f.flags), (None, vec!["unenforced".to_owned()]));
        let f = enrich(&record(FLOW_VERDICT_DENIED, 1, 0, 0), "n1", 0, &names);
        assert_eq!(f.verdict, Verdict::Denied);
        assert_eq!(f.drop_reason.as_deref(), Some("POLICY_DENIED_INGRESS"));
        assert_eq!((f.policy, f.suppressed), (None, 3));
        let mut r = record(FLOW_VERDICT_ALLOWED, 0, 7, FLOW_F_SERVICE);
        r.dir = DIR_EGRESS;
        r.svc_ip = be(Ipv4Addr::new(10, 96, 0, 20));
        r.svc_port = 8080u16.to_be();
        let f = enrich(&r, "n1", 0, &names);
        assert_eq!(
            f.service,
            Some(Service {
                ip: Ipv4Addr::new(10, 96, 0, 20),
                port: 8080
            })
        );
        assert_eq!(f.direction, "egress");
    }

    /// A policy denial names the policies isolating its endpoint in its
    /// direction (`policies`; `policy` stays the allowing one: none);
    /// other drops name none.
    #[test]
    fn denials_name_the_isolating_policies() {
        fn isolating(ep: u32, dir: u8) -> Vec<String> {
            match (ep, dir) {
                (4, DIR_INGRESS) => vec!["x/deny-all".into(), "x/allow-y".into()],
                (4, DIR_EGRESS) => vec!["x/egress".into()],
                _ => Vec::new(),
            }
        }
        let names = Names {
            isolating: &isolating,
            ..NAMES
        };
        let f = enrich(&record(FLOW_VERDICT_DENIED, 1, 0, 0), "n1", 0, &names);
        assert_eq!(f.policies, ["x/deny-all", "x/allow-y"]);
        assert_eq!(f.policy, None);
        let line = serde_json::to_string(&f).expect("json");
        assert!(
            line.contains("\"policies\":[\"x/deny-all\",\"x/allow-y\"]"),
            "{line}"
        );
        let mut r = record(FLOW_VERDICT_DENIED, 2, 0, 0);
        r.dir = DIR_EGRESS;
        let f = enrich(&r, "n1", 0, &names);
        assert_eq!(f.policies, ["x/egress"]);
        // Not a policy denial (malformed): no policy.
        let f = enrich(&record(FLOW_VERDICT_DENIED, 4, 0, 0), "n1", 0, &names);
        assert_eq!((f.policy, f.policies), (None, Vec::<String>::new()));
        // Another endpoint (gone): the denial stays unnamed.
        let mut r = record(FLOW_VERDICT_DENIED, 1, 0, 0);
        r.ep = 5;
        assert!(enrich(&r, "n1", 0, &names).policies.is_empty());
        // Allowed flows keep their allowing policy and list nothing.
        let f = enrich(&record(FLOW_VERDICT_ALLOWED, 0, 7, 0), "n1", 0, &names);
        assert_eq!(f.policy.as_deref(), Some("x/allow-a"));
        assert!(f.policies.is_empty());
    }

    #[test]
    fn json_round_trips_and_omits_empty_fields() {
        let names = NAMES;
        let f = enrich(&record(FLOW_VERDICT_DENIED, 1, 0, 0), "n1", 0, &names);
        let line = serde_json::to_string(&f).expect("json");
        assert!(
            line.contains("\"dropReason\":\"POLICY_DENIED_INGRESS\""),
            "{line}"
        );
        assert!(!line.contains("\"policy\""), "{line}");
        assert!(!line.contains("\"service\""), "{line}");
        let back: Flow = serde_json::from_str(&line).expect("parse");
        assert_eq!(back, f);
    }

    #[test]
    fn filter_matches_either_end() {
        let names = NAMES;
        let f = enrich(&record(FLOW_VERDICT_DENIED, 1, 0, 0), "n1", 0, &names);
        let with = |m: fn(&mut FlowFilter)| {
            let mut flt = FlowFilter::default();
            m(&mut flt);
            flt.matches(&f)
        };
        assert!(with(|_| {}));
        assert!(with(|x| x.namespace = Some("x".into())));
        assert!(!with(|x| x.namespace = Some("y".into())));
        assert!(with(|x| x.pod = Some("a".into())));
        assert!(with(|x| {
            x.namespace = Some("x".into());
            x.pod = Some("a".into());
        }));
        assert!(!with(|x| {
            x.namespace = Some("y".into());
            x.pod = Some("a".into());
        }));
        assert!(with(|x| x.verdict = Some(Verdict::Denied)));
        assert!(!with(|x| x.verdict = Some(Verdict::Allowed)));
        assert!(with(|x| x.port = Some(80)));
        assert!(with(|x| x.port = Some(40000)));
        assert!(!with(|x| x.port = Some(81)));
        assert_eq!(Verdict::parse("DENIED"), Some(Verdict::Denied));
        assert_eq!(Verdict::parse("nope"), None);
    }

    #[test]
    fn parse_refuses_short_items() {
        let r = record(FLOW_VERDICT_DENIED, 1, 0, 0);
        // SAFETY: FlowRecord is plain old data.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts((&raw const r).cast::<u8>(), size_of::<FlowRecord>())
        };
        assert_eq!(parse(bytes), Some(r));
        assert_eq!(parse(&bytes[..63]), None);
    }

    #[test]
    fn clock_maps_monotonic_to_wall() {
        let c = Clock {
            mono_ns: 1_000,
            real_ns: 1_000_000,
        };
        assert_eq!(c.wall_ns(900), 999_900);
    }
}
