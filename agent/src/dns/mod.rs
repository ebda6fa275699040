//! Cluster DNS: every agent (control mode) answers for the cluster domain
//! on its node IP, port 53 (UDP and TCP), from the service table the
//! control streams to it. `<svc>.<ns>.svc.<domain>` A → the `ClusterIP`
//! (headless: the ready endpoints' IPs), `_<port>._<proto>.<svc>.<ns>.svc.<domain>`
//! SRV for named ports, NXDOMAIN for unknown names in the domain and
//! REFUSED for anything outside it: nothing is forwarded off the machine.
//!
//! Negative answers (NXDOMAIN, and NOERROR without data) carry the zone's
//! SOA in the authority section, as `CoreDNS` does (`ns.dns.<domain>.
//! hostmaster.<domain>.`, minimum [`TTL`]), so resolvers cache them for
//! that long (RFC 2308) instead of asking again at once or not at all.

mod server;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use hickory_server::proto::rr::rdata::{A, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};

pub use server::{ServeError, serve};

/// TTL of every answer: short, so service changes show quickly. Also the
/// SOA's TTL and minimum, which bound how long a negative answer is cached.
pub const TTL: u32 = 5;
/// The SOA's refresh, retry and expire (`CoreDNS` values; nobody transfers
/// this zone, but resolvers expect sane numbers).
const SOA_REFRESH: i32 = 7200;
const SOA_RETRY: i32 = 1800;
const SOA_EXPIRE: i32 = 86400;

/// The DNS view of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    /// `spec.clusterIP`, None for headless services.
    pub cluster_ip: Option<Ipv4Addr>,
    /// The ready endpoints' addresses (answered for headless services).
    pub endpoints: Vec<Ipv4Addr>,
    /// The service ports (for SRV).
    pub ports: Vec<PortRecord>,
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRecord {
    /// The port's name (SRV needs one).
    pub name: Option<String>,
    /// `tcp`, `udp` or `sctp` (lower case).
    pub protocol: String,
    /// The service port.
    pub port: u16,
}

/// What a question gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The name exists; these records (possibly none: NOERROR, no data).
    Records(Vec<Record>),
    /// The name is in the cluster domain but does not exist.
    NxDomain,
    /// The name is outside the cluster domain: not ours, not forwarded.
    Refused,
}

/// The cluster zone: every service by (namespace, name), answering
/// questions under `domain`. Cheap to share; replaced wholesale on every
/// service-table change.
#[derive(Debug)]
pub struct Zone {
    domain: String,
    services: RwLock<Arc<BTreeMap<(String, String), ServiceRecord>>>,
    /// The SOA serial: the unix time of the last change (bumped by at
    /// least one per change).
    serial: AtomicU32,
}

fn unix_secs() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    u32::try_from(secs).unwrap_or(u32::MAX)
}

impl Zone {
    /// An empty zone for `domain` (e.g. `cluster.local`).
    pub fn new(domain: &str) -> Self {
        Self {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            services: RwLock::default(),
            serial: AtomicU32::new(unix_secs()),
        }
    }

    /// The zone's SOA record (at the apex): `ns.dns.<domain>.
    /// hostmaster.<domain>.`, minimum and TTL [`TTL`]; None only if the
    /// domain is not a valid name (the server then answers without it).
    pub fn soa(&self) -> Option<Record> {
        let name = |prefix: &str| Name::from_ascii(format!("{prefix}{}.", self.domain)).ok();
        let soa = SOA::new(
            name("ns.dns.")?,
            name("hostmaster.")?,
            self.serial.load(Ordering::Relaxed),
            SOA_REFRESH,
            SOA_RETRY,
            SOA_EXPIRE,
            TTL,
        );
        Some(Record::from_rdata(name("")?, TTL, RData::SOA(soa)))
    }

    /// The cluster domain, lower case, without the trailing dot.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Replaces the services answered for.
    pub fn set(&self, services: BTreeMap<(String, String), ServiceRecord>) {
        *self
            .services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(services);
        let now = unix_secs();
        let _ = self
            .serial
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(now.max(s.wrapping_add(1)))
            });
    }

    fn snapshot(&self) -> Arc<BTreeMap<(String, String), ServiceRecord>> {
        self.services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Answers `qtype` for `name`.
    pub fn resolve(&self, name: &Name, qtype: RecordType) -> Answer {
        let ascii = name.to_ascii().to_ascii_lowercase();
        let full = ascii.trim_end_matches('.');
        let prefix = if full == self.domain {
            ""
        } else if let Some(p) = full.strip_suffix(&format!(".{}", self.domain)) {
            p
        } else {
            return Answer::Refused;
        };
        let labels: Vec<&str> = if prefix.is_empty() {
            Vec::new()
        } else {
            prefix.split('.').collect()
        };
        let services = self.snapshot();
        match labels.as_slice() {
            // The apex has the SOA.
            [] if matches!(qtype, RecordType::SOA | RecordType::ANY) => {
                Answer::Records(self.soa().into_iter().collect())
            }
            // The apex and `svc.<domain>` exist (empty non-terminals).
            [] | ["svc"] => Answer::Records(Vec::new()),
            [ns, "svc"] => {
                if services.keys().any(|(n, _)| n == ns) {
                    Answer::Records(Vec::new())
                } else {
                    Answer::NxDomain
                }
            }
            [svc, ns, "svc"] => match services.get(&((*ns).to_owned(), (*svc).to_owned())) {
                Some(rec) => Answer::Records(self.service_records(name, rec, qtype)),
                None => Answer::NxDomain,
            },
            [port, proto, svc, ns, "svc"] => {
                let Some(rec) = services.get(&((*ns).to_owned(), (*svc).to_owned())) else {
                    return Answer::NxDomain;
                };
                let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_'))
                else {
                    return Answer::NxDomain;
                };
                let Some(p) = rec
                    .ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(port) && p.protocol == proto)
                else {
                    return Answer::NxDomain;
                };
                if qtype != RecordType::SRV && qtype != RecordType::ANY {
                    return Answer::Records(Vec::new());
                }
                let Ok(target) = Name::from_ascii(format!("{svc}.{ns}.svc.{}.", self.domain))
                else {
                    return Answer::NxDomain;
                };
                Answer::Records(vec![Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::SRV(SRV::new(0, 100, p.port, target)),
                )])
            }
            _ => Answer::NxDomain,
        }
    }

    /// A records of one service (other types: no data).
    fn service_records(&self, name: &Name, rec: &ServiceRecord, qtype: RecordType) -> Vec<Record> {
        let _ = self;
        if qtype != RecordType::A && qtype != RecordType::ANY {
            return Vec::new();
        }
        let ips: Vec<Ipv4Addr> = match rec.cluster_ip {
            Some(ip) => vec![ip],
            None => rec.endpoints.clone(),
        };
        ips.into_iter()
            .map(|ip| Record::from_rdata(name.clone(), TTL, RData::A(A(ip))))
            .collect()
    }
}

/// The pod's /etc/resolv.conf in control mode.
pub fn resolv_conf(nameserver: Ipv4Addr, namespace: &str, domain: &str) -> String {
    format!(
        "nameserver {nameserver}\nsearch {namespace}.svc.{domain} svc.{domain} {domain}\noptions ndots:5\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        let z = Zone::new("cluster.local");
        let mut m = BTreeMap::new();
        m.insert(
            ("default".to_owned(), "web".to_owned()),
            ServiceRecord {
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 20)),
                endpoints: vec![Ipv4Addr::new(10, 244, 1, 2)],
                ports: vec![PortRecord {
                    name: Some("http".into()),
                    protocol: "tcp".into(),
                    port: 80,
                }],
            },
        );
        m.insert(
            ("default".to_owned(), "db".to_owned()),
            ServiceRecord {
                cluster_ip: None,
                endpoints: vec![Ipv4Addr::new(10, 244, 1, 3), Ipv4Addr::new(10, 244, 2, 3)],
                ports: Vec::new(),
            },
        );
        z.set(m);
        z
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn addresses(a: &Answer) -> Vec<Ipv4Addr> {
        let Answer::Records(r) = a else {
            panic!("not an answer: {a:?}")
        };
        r.iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_record_is_the_cluster_ip_whatever_the_case() {
        let z = zone();
        for q in [
            "web.default.svc.cluster.local.",
            "WEB.Default.svc.cluster.local",
        ] {
            assert_eq!(
                addresses(&z.resolve(&name(q), RecordType::A)),
                [Ipv4Addr::new(10, 96, 0, 20)]
            );
        }
        assert_eq!(
            z.resolve(&name("web.default.svc.cluster.local."), RecordType::AAAA),
            Answer::Records(Vec::new()),
            "an existing name without AAAA data is NOERROR, empty"
        );
    }

    #[test]
    fn headless_answers_the_endpoints() {
        assert_eq!(
            addresses(&zone().resolve(&name("db.default.svc.cluster.local."), RecordType::A)),
            [Ipv4Addr::new(10, 244, 1, 3), Ipv4Addr::new(10, 244, 2, 3)]
        );
    }

    #[test]
    fn srv_for_named_ports() {
        let z = zone();
        let a = z.resolve(
            &name("_http._tcp.web.default.svc.cluster.local."),
            RecordType::SRV,
        );
        let Answer::Records(r) = a else {
            panic!("{a:?}")
        };
        let RData::SRV(srv) = &r[0].data else {
            panic!("{r:?}")
        };
        assert_eq!(srv.port, 80);
        assert_eq!(srv.target, name("web.default.svc.cluster.local."));
        assert_eq!(
            z.resolve(
                &name("_http._udp.web.default.svc.cluster.local."),
                RecordType::SRV
            ),
            Answer::NxDomain
        );
    }

    #[test]
    fn unknown_names_are_nxdomain_and_outside_names_refused() {
        let z = zone();
        for q in [
            "nope.default.svc.cluster.local.",
            "web.other.svc.cluster.local.",
            "other.svc.cluster.local.",
            "x.y.z.cluster.local.",
            "web.default.svc.cluster.local.default.svc.cluster.local.",
        ] {
            assert_eq!(z.resolve(&name(q), RecordType::A), Answer::NxDomain, "{q}");
        }
        for q in ["example.com.", "cluster.local.example.com.", "local."] {
            assert_eq!(z.resolve(&name(q), RecordType::A), Answer::Refused, "{q}");
        }
        assert_eq!(
            z.resolve(&name("default.svc.cluster.local."), RecordType::A),
            Answer::Records(Vec::new())
        );
    }

    #[test]
    fn the_soa_is_corednss() {
        let z = zone();
        let soa = z.soa().expect("a valid domain");
        assert_eq!(soa.name, name("cluster.local."));
        assert_eq!(soa.ttl, TTL);
        let RData::SOA(s) = &soa.data else {
            panic!("{soa:?}")
        };
        assert_eq!(s.mname, name("ns.dns.cluster.local."));
        assert_eq!(s.rname, name("hostmaster.cluster.local."));
        assert_eq!(s.minimum, 5);
        // The apex answers it; a change bumps the serial.
        let before = s.serial;
        assert_eq!(
            z.resolve(&name("cluster.local."), RecordType::SOA),
            Answer::Records(vec![soa.clone()])
        );
        z.set(BTreeMap::new());
        let RData::SOA(after) = z.soa().expect("soa").data else {
            panic!("not an SOA")
        };
        assert!(after.serial > before, "{} then {}", before, after.serial);
    }

    #[test]
    fn changes_show_at_once() {
        let z = zone();
        z.set(BTreeMap::new());
        assert_eq!(
            z.resolve(&name("web.default.svc.cluster.local."), RecordType::A),
            Answer::NxDomain
        );
    }

    #[test]
    fn resolv_conf_has_the_kubernetes_search_path() {
        assert_eq!(
            resolv_conf(Ipv4Addr::new(10, 96, 0, 10), "team", "cluster.local"),
            "nameserver 10.96.0.10\nsearch team.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }
}
