//! `policy explain`: whether a connection would be allowed at this node,
//! and by which policy, as the kernel sees it — the endpoint entry, the
//! ipcache and the policy map read back from the pinned maps and judged
//! with [`PolicyDataplane::decide`] (the programs' lookups in their
//! order), named with the enforcer's isolating policies and the rule
//! table.
//!
//! The agent answers for the ends that are its own pods: the source's
//! Egress (`direction=egress`) and the destination's Ingress
//! (`direction=ingress`), or both. `weirctl policy explain` asks the
//! source's node and the destination's node and prints the steps.

use std::net::Ipv4Addr;

use super::enforce::Enforcer;
use super::rules::rule_name;
use super::{Direction as PolDirection, PROTO_TCP, PROTO_UDP, PolicyData};
use crate::policy::{Decision, Direction, Endpoint, PolicyError};

/// One end of the connection to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A pod (`namespace/name`).
    Pod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// An address (external, or a pod by IP).
    Ip(Ipv4Addr),
}

impl Target {
    /// `namespace/name` or an IPv4 address.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse() {
            return Ok(Self::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::Pod {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!(
                "{s:?} is neither namespace/pod nor an IPv4 address"
            )),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// What to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The client.
    pub src: Target,
    /// The server.
    pub dst: Target,
    /// The destination port.
    pub port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// Only this side (`None`: every side that is a local pod).
    pub direction: Option<PolDirection>,
}

/// The protocol number of `TCP` / `UDP` (any case; empty = TCP).
pub fn parse_protocol(s: &str) -> Result<u8, String> {
    match s.to_ascii_uppercase().as_str() {
        "" | "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        _ => Err(format!("protocol {s:?} is not valid: use TCP or UDP")),
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        0 => "any".to_owned(),
        PROTO_TCP => "TCP".to_owned(),
        PROTO_UDP => "UDP".to_owned(),
        n => format!("proto-{n}"),
    }
}

fn direction_name(d: PolDirection) -> &'static str {
    match d {
        PolDirection::Ingress => "ingress",
        PolDirection::Egress => "egress",
    }
}

pub use weir_proto::explain::{MatchedKey, Party, Step};

/// Why a question could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// Neither end is a pod of this node.
    #[error("neither {src} nor {dst} is a pod running on node {node}")]
    NotLocal {
        /// The source.
        src: String,
        /// The destination.
        dst: String,
        /// This node.
        node: String,
    },
    /// A pod the question names has no address in the ipcache.
    #[error("pod {0} has no IP in this node's ipcache (not running, or unknown)")]
    NoAddress(String),
    /// The maps could not be read.
    #[error(transparent)]
    Dataplane(#[from] PolicyError),
}

/// The lookups a step needs (the enforcer's dataplane in the agent; fakes
/// in tests).
pub trait Judge {
    /// The endpoint entry of `ifindex`.
    fn endpoint(&self, ifindex: u32) -> Result<Option<Endpoint>, PolicyError>;
    /// The programs' verdict on a new flow.
    fn decide(
        &self,
        ifindex: u32,
        dir: Direction,
        peer: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> Result<Decision, PolicyError>;
    /// The peer's (identity, CIDR identity) from the ipcache's longest
    /// match (world, 0 on a miss), for sides `decide` does not look up.
    fn identity_of(&self, ip: Ipv4Addr) -> Result<(u32, u32), PolicyError>;
    /// The policies isolating `ifindex` in `dir`.
    fn isolating(&self, ifindex: u32, dir: PolDirection) -> Vec<String>;
    /// The name of rule number `rule`.
    fn rule(&self, rule: u32) -> Option<String>;
}

impl Judge for Enforcer {
    fn endpoint(&self, ifindex: u32) -> Result<Option<Endpoint>, PolicyError> {
        self.dataplane().endpoint(ifindex)
    }

    fn decide(
        &self,
        ifindex: u32,
        dir: Direction,
        peer: Ipv4Addr,
        port: u16,
        proto: u8,
    ) -> Result<Decision, PolicyError> {
        self.dataplane().decide(ifindex, dir, peer, port, proto)
    }

    fn identity_of(&self, ip: Ipv4Addr) -> Result<(u32, u32), PolicyError> {
        let best = self
            .dataplane()
            .ipcache()?
            .into_iter()
            .filter(|(c, _)| c.contains(ip))
            .max_by_key(|(c, _)| c.prefix);
        Ok(best.map_or((super::ID_WORLD, 0), |(_, v)| (v.identity, v.cidr_identity)))
    }

    fn isolating(&self, ifindex: u32, dir: PolDirection) -> Vec<String> {
        self.isolation(ifindex)
            .map(|i| i.get(dir).iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    fn rule(&self, rule: u32) -> Option<String> {
        rule_name(rule).map(|r| r.to_string())
    }
}

/// A local endpoint: (ifindex, pod IP).
pub type LocalLookup<'a> = &'a dyn Fn(&str, &str) -> Option<(u32, Ipv4Addr)>;

/// Answers `q` at node `node`: the steps for the ends that are local pods
/// (`local` finds them), peers named from `data`'s ipcache.
pub fn explain(
    judge: &dyn Judge,
    data: &PolicyData,
    local: LocalLookup<'_>,
    node: &str,
    q: &Query,
) -> Result<Vec<Step>, ExplainError> {
    let local_of = |t: &Target| match t {
        Target::Pod { namespace, name } => local(namespace, name),
        Target::Ip(_) => None,
    };
    let mut steps = Vec::new();
    for (dir, me, other) in [
        (PolDirection::Egress, &q.src, &q.dst),
        (PolDirection::Ingress, &q.dst, &q.src),
    ] {
        if q.direction.is_some_and(|d| d != dir) {
            continue;
        }
        let Some((ifindex, ip)) = local_of(me) else {
            continue;
        };
        let peer_ip = match local_of(other) {
            Some((_, ip)) => ip,
            None => address(data, other)?,
        };
        let (me_party, peer_party) = (party(data, ip, me), party(data, peer_ip, other));
        steps.push(step(
            judge,
            node,
            dir,
            ifindex,
            me_party,
            (peer_ip, peer_party),
            q,
        )?);
    }
    if steps.is_empty() {
        return Err(ExplainError::NotLocal {
            src: q.src.to_string(),
            dst: q.dst.to_string(),
            node: node.to_owned(),
        });
    }
    Ok(steps)
}

/// A target's address: its own, or the pod's from the ipcache.
fn address(data: &PolicyData, t: &Target) -> Result<Ipv4Addr, ExplainError> {
    match t {
        Target::Ip(ip) => Ok(*ip),
        Target::Pod { namespace, name } => data
            .ipcache()
            .iter()
            .find(|(_, e)| e.namespace == *namespace && e.pod == *name)
            .map(|(ip, _)| *ip)
            .ok_or_else(|| ExplainError::NoAddress(t.to_string())),
    }
}

fn party(data: &PolicyData, ip: Ipv4Addr, t: &Target) -> Party {
    let (namespace, pod) = match (t, data.ipcache().get(&ip)) {
        (Target::Pod { namespace, name }, _) => (Some(namespace.clone()), Some(name.clone())),
        (Target::Ip(_), Some(e)) => (Some(e.namespace.clone()), Some(e.pod.clone())),
        (Target::Ip(_), None) => (None, None),
    };
    Party {
        ip: ip.to_string(),
        identity: 0,
        namespace,
        pod,
    }
}

/// Judges one side from the maps.
fn step(
    judge: &dyn Judge,
    node: &str,
    dir: PolDirection,
    ifindex: u32,
    mut me: Party,
    (peer_ip, mut peer): (Ipv4Addr, Party),
    q: &Query,
) -> Result<Step, ExplainError> {
    let dp_dir = match dir {
        PolDirection::Ingress => Direction::Ingress,
        PolDirection::Egress => Direction::Egress,
    };
    let ep = judge.endpoint(ifindex)?;
    me.identity = ep.map_or(0, |e| e.identity);
    let decision = judge.decide(ifindex, dp_dir, peer_ip, q.port, q.proto)?;
    let enforced = ep.is_some_and(|e| e.enforces(dp_dir));
    let (allowed, peer_cidr_identity, policy, matched_key) = match decision {
        Decision::Unenforced => {
            let (id, cidr) = judge.identity_of(peer_ip)?;
            peer.identity = id;
            (true, cidr, None, None)
        }
        Decision::Allowed {
            entry,
            peer_identity,
            cidr_identity,
        } => {
            peer.identity = peer_identity;
            let policy = judge
                .rule(entry.rule)
                .unwrap_or_else(|| format!("rule-{}", entry.rule));
            let key = MatchedKey {
                ep: ifindex,
                identity: entry.peer,
                port: entry.port,
                protocol: protocol_name(entry.proto),
                direction: direction_name(dir).to_owned(),
            };
            (true, cidr_identity, Some(policy), Some(key))
        }
        Decision::Denied {
            peer_identity,
            cidr_identity,
        } => {
            peer.identity = peer_identity;
            (false, cidr_identity, None, None)
        }
    };
    Ok(Step {
        node: node.to_owned(),
        direction: direction_name(dir).to_owned(),
        endpoint: me,
        ifindex,
        peer,
        peer_cidr_identity,
        enforced,
        isolated_by: if enforced {
            judge.isolating(ifindex, dir)
        } else {
            Vec::new()
        },
        verdict: if allowed { "ALLOWED" } else { "DENIED" }.to_owned(),
        policy,
        matched_key,
    })
}
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::control::policy::IpEntry;
    use crate::policy::PolicyEntry;

    /// Endpoints 10 (x/a, egress enforced) and 20 (y/b, ingress enforced);
    /// y/b allows identity 300 on 80/TCP by rule 500; everything else is
    /// denied where enforced.
    struct Fake;

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);

    impl Judge for Fake {
        fn endpoint(&self, ifindex: u32) -> Result<Option<Endpoint>, PolicyError> {
            Ok(match ifindex {
                10 => Some(Endpoint {
                    identity: 300,
                    ip: A,
                    ingress: false,
                    egress: false,
                    source_check: true,
                }),
                20 => Some(Endpoint {
                    identity: 400,
                    ip: B,
                    ingress: true,
                    egress: false,
                    source_check: true,
                }),
                _ => None,
            })
        }

        fn decide(
            &self,
            ifindex: u32,
            dir: Direction,
            peer: Ipv4Addr,
            port: u16,
            proto: u8,
        ) -> Result<Decision, PolicyError> {
            let id = if peer == A { 300 } else { 2 };
            Ok(match (ifindex, dir) {
                (20, Direction::Ingress) if id == 300 && port == 80 && proto == PROTO_TCP => {
                    Decision::Allowed {
                        entry: PolicyEntry {
                            peer: 300,
                            port: 80,
                            proto: PROTO_TCP,
                            dir,
                            rule: 500,
                        },
                        peer_identity: id,
                        cidr_identity: 0,
                    }
                }
                (20, Direction::Ingress) => Decision::Denied {
                    peer_identity: id,
                    cidr_identity: 0,
                },
                _ => Decision::Unenforced,
            })
        }

        fn identity_of(&self, ip: Ipv4Addr) -> Result<(u32, u32), PolicyError> {
            Ok(if ip == B { (400, 0) } else { (2, 0) })
        }

        fn isolating(&self, ifindex: u32, dir: PolDirection) -> Vec<String> {
            if ifindex == 20 && dir == PolDirection::Ingress {
                vec!["y/deny-all".into(), "y/allow-x".into()]
            } else {
                Vec::new()
            }
        }

        fn rule(&self, rule: u32) -> Option<String> {
            (rule == 500).then(|| "y/allow-x".to_owned())
        }
    }

    fn data() -> PolicyData {
        let mut d = PolicyData::default();
        for (ip, ns, pod, id) in [(A, "x", "a", 300), (B, "y", "b", 400)] {
            d.test_ip(
                ip,
                IpEntry {
                    identity: id,
                    namespace: ns.into(),
                    pod: pod.into(),
                    node: "n1".into(),
                    named_ports: Vec::new(),
                },
            );
        }
        d
    }

    fn locals() -> BTreeMap<(&'static str, &'static str), (u32, Ipv4Addr)> {
        BTreeMap::from([(("x", "a"), (10, A)), (("y", "b"), (20, B))])
    }

    fn query(src: &str, dst: &str, port: u16) -> Query {
        Query {
            src: Target::parse(src).expect("src"),
            dst: Target::parse(dst).expect("dst"),
            port,
            proto: PROTO_TCP,
            direction: None,
        }
    }

    fn run(q: &Query) -> Result<Vec<Step>, ExplainError> {
        let l = locals();
        let local = |ns: &str, name: &str| {
            l.iter()
                .find(|((n, p), _)| *n == ns && *p == name)
                .map(|(_, v)| *v)
        };
        explain(&Fake, &data(), &local, "n1", q)
    }

    #[test]
    fn allowed_names_the_policy_and_the_key() {
        let steps = run(&query("x/a", "y/b", 80)).expect("explained");
        let [egress, ingress] = steps.as_slice() else {
            panic!("two steps: {steps:?}");
        };
        assert_eq!(egress.direction, "egress");
        assert!(!egress.enforced && egress.allowed() && egress.isolated_by.is_empty());
        assert_eq!(egress.endpoint.identity, 300);
        assert_eq!(egress.peer.pod.as_deref(), Some("b"));
        assert_eq!(
            egress.peer.identity, 400,
            "from the ipcache when unenforced"
        );
        assert_eq!(ingress.direction, "ingress");
        assert!(ingress.enforced && ingress.allowed());
        assert_eq!(ingress.policy.as_deref(), Some("y/allow-x"));
        assert_eq!(ingress.isolated_by, ["y/deny-all", "y/allow-x"]);
        assert_eq!(ingress.peer.identity, 300);
        assert_eq!(ingress.peer.ip, "10.244.1.5");
        assert_eq!(
            ingress.matched_key,
            Some(MatchedKey {
                ep: 20,
                identity: 300,
                port: 80,
                protocol: "TCP".into(),
                direction: "ingress".into()
            })
        );
    }

    #[test]
    fn denied_lists_the_isolating_policies() {
        let steps = run(&query("x/a", "y/b", 81)).expect("explained");
        let ingress = &steps[1];
        assert_eq!(ingress.verdict, "DENIED");
        assert_eq!(ingress.policy, None);
        assert_eq!(ingress.matched_key, None);
        assert_eq!(ingress.isolated_by, ["y/deny-all", "y/allow-x"]);
        // An external client: only the ingress side, peer is world.
        let mut q = query("192.0.2.1", "y/b", 80);
        q.direction = Some(PolDirection::Ingress);
        let steps = run(&q).expect("explained");
        assert_eq!(steps.len(), 1);
        assert_eq!(
            (steps[0].verdict.as_str(), steps[0].peer.identity),
            ("DENIED", 2)
        );
        assert_eq!(steps[0].peer.pod, None);
    }

    #[test]
    fn bad_questions_are_refused() {
        let err = run(&query("x/nope", "192.0.2.1", 80)).expect_err("not local");
        assert!(err.to_string().contains("not") || err.to_string().contains("neither"));
        assert!(matches!(
            run(&query("x/a", "z/gone", 80)),
            Err(ExplainError::NoAddress(p)) if p == "z/gone"
        ));
        assert!(Target::parse("a/b/c").is_err());
        assert!(Target::parse("web").is_err());
        assert_eq!(parse_protocol("udp"), Ok(PROTO_UDP));
        assert!(parse_protocol("SCTP").is_err());
    }
}
