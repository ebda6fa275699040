//! The node's service table as the control streams it (`ServiceEvent`s:
//! each Service with its `EndpointSlice`), turned into the socket load
//! balancer's desired state ([`crate::lb::ServiceSpec`]): one entry per
//! `ClusterIP` and service port, backed by the slice's ready endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use weir_proto::v1;

use crate::dns::{PortRecord, ServiceRecord};
use weir_common::SvcKey;

use crate::lb::{NodePortBackend, NodePortSpec, Protocol, ServiceSpec};

/// Kubernetes' default `ClientIP` affinity timeout (3 hours).
const DEFAULT_AFFINITY: Duration = Duration::from_hours(3);

/// Every service the control has sent, by `<namespace>/<name>`.
#[derive(Debug, Default, Clone)]
pub struct ServiceTable {
    services: BTreeMap<String, Vec<ServiceSpec>>,
    /// Which services (`<namespace>/<name>`) have an entry with that key:
    /// the first one owns it, as in [`Self::specs`].
    owners: BTreeMap<SvcKey, BTreeSet<String>>,
    /// The cluster DNS view, by (namespace, name).
    dns: BTreeMap<(String, String), ServiceRecord>,
    nodeports: BTreeMap<String, Vec<NodePortSpec>>,
}

/// Why a service event could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The event carries no Service.
    #[error("service event without a service")]
    Missing,
    /// The Service or `EndpointSlice` JSON does not parse.
    #[error("{what}: {source}")]
    Decode {
        /// Which object.
        what: &'static str,
        /// The parser's error.
        source: serde_json::Error,
    },
}

/// What one event changed in a [`ServiceTable`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The load balancer entries whose spec may have changed (added,
    /// changed or gone): resolve each with [`ServiceTable::spec_for`].
    pub lb_keys: BTreeSet<SvcKey>,
    /// Whether the cluster DNS view changed.
    pub dns: bool,
    /// Whether the service's `NodePort` entries changed.
    pub nodeports: bool,
}

impl Applied {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        self.dns || self.nodeports || !self.lb_keys.is_empty()
    }

    /// Adds what a later event changed (a burst is programmed once).
    pub fn merge(&mut self, later: Applied) {
        self.lb_keys.extend(later.lb_keys);
        self.dns |= later.dns;
        self.nodeports |= later.nodeports;
    }
}

/// The first spec of each key in `specs`.
fn by_key(specs: &[ServiceSpec]) -> BTreeMap<SvcKey, &ServiceSpec> {
    let mut out = BTreeMap::new();
    for s in specs {
        out.entry(s.key()).or_insert(s);
    }
    out
}

impl ServiceTable {
    /// Applies one event; whether the table changed.
    pub fn apply(&mut self, ev: &v1::ServiceEvent) -> Result<bool, ServiceError> {
        self.apply_event(ev).map(|a| a.changed())
    }

    /// The entry with `key` the load balancer is to have, if a service
    /// has one: the first service's (by `<namespace>/<name>`), as in
    /// [`Self::specs`].
    pub fn spec_for(&self, key: &SvcKey) -> Option<&ServiceSpec> {
        let owner = self.owners.get(key)?.first()?;
        self.services.get(owner)?.iter().find(|s| s.key() == *key)
    }

    /// Replaces (or with `None` removes) one service's entries; the keys
    /// whose entry of this service changed.
    fn set(&mut self, name: &str, specs: Option<Vec<ServiceSpec>>) -> BTreeSet<SvcKey> {
        let old = self.services.remove(name).unwrap_or_default();
        let specs_present = specs.is_some();
        let new = specs.unwrap_or_default();
        let (before, after) = (by_key(&old), by_key(&new));
        let changed: BTreeSet<SvcKey> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .copied()
            .collect();
        for k in before.keys().filter(|k| !after.contains_key(*k)) {
            if let Some(o) = self.owners.get_mut(k) {
                o.remove(name);
                if o.is_empty() {
                    self.owners.remove(k);
                }
            }
        }
        for k in after.keys() {
            self.owners.entry(*k).or_default().insert(name.to_owned());
        }
        if specs_present {
            self.services.insert(name.to_owned(), new);
        }
        changed
    }

    /// Applies one event; what changed.
    pub fn apply_event(&mut self, ev: &v1::ServiceEvent) -> Result<Applied, ServiceError> {
        let object = ev.service.as_ref().ok_or(ServiceError::Missing)?;
        let service: Service =
            serde_json::from_str(&object.json).map_err(|source| ServiceError::Decode {
                what: "service",
                source,
            })?;
        let namespace = service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let name = service.metadata.name.clone().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        let dns_key = (namespace, name);
        if ev.r#type() == v1::EventType::Deleted {
            let dns = self.dns.remove(&dns_key).is_some();
            let present = self.services.contains_key(&key);
            let nodeports = self.nodeports.remove(&key).is_some();
            let lb_keys = self.set(&key, None);
            return Ok(Applied {
                lb_keys,
                dns: dns || present,
                nodeports,
            });
        }
        let slice =
            match &ev.endpoint_slice {
                Some(o) => Some(serde_json::from_str::<EndpointSlice>(&o.json).map_err(
                    |source| ServiceError::Decode {
                        what: "endpoint slice",
                        source,
                    },
                )?),
                None => None,
            };
        let specs = specs_of(&service, slice.as_ref());
        let record = dns_of(&service, slice.as_ref());
        let dns = self.dns.get(&dns_key) != Some(&record) || !self.services.contains_key(&key);
        self.dns.insert(dns_key, record);
        let nodeports = nodeports_of(&service, slice.as_ref());
        let nodeports_changed = self.nodeports.get(&key).unwrap_or(&Vec::new()) != &nodeports;
        if nodeports.is_empty() {
            self.nodeports.remove(&key);
        } else {
            self.nodeports.insert(key.clone(), nodeports);
        }
        let lb_keys = self.set(&key, Some(specs));
        Ok(Applied {
            lb_keys,
            dns,
            nodeports: nodeports_changed,
        })
    }

    /// The load balancer's desired state: every service port of every
    /// service.
    pub fn specs(&self) -> Vec<ServiceSpec> {
        self.services.values().flatten().cloned().collect()
    }

    /// The cluster DNS view of every service, by (namespace, name).
    pub fn dns_records(&self) -> BTreeMap<(String, String), ServiceRecord> {
        self.dns.clone()
    }

    /// The `NodePort` dataplane's desired state: every nodePort of every
    /// `NodePort` service.
    pub fn nodeport_specs(&self) -> Vec<NodePortSpec> {
        self.nodeports.values().flatten().cloned().collect()
    }

    /// How many services the table holds.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// The ready endpoints' addresses of a slice.
fn ready_addresses(slice: Option<&EndpointSlice>) -> Vec<Ipv4Addr> {
    slice
        .map(|s| {
            s.endpoints
                .iter()
                .flatten()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .flat_map(|e| e.addresses.iter())
                .filter_map(|a| a.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The cluster DNS view of one Service: its `ClusterIP` (None when
/// headless), its ready endpoints (headless only: a `ClusterIP` service is
/// answered with its `ClusterIP`, so its endpoints changing leaves the DNS
/// view, and the zone, alone) and its ports.
pub fn dns_of(service: &Service, slice: Option<&EndpointSlice>) -> ServiceRecord {
    let spec = service.spec.as_ref();
    let cluster_ip = spec
        .and_then(|s| s.cluster_ip.as_deref())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(PortRecord {
                name: p.name.clone().filter(|n| !n.is_empty()),
                protocol: p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
                port: u16::try_from(p.port).ok()?,
            })
        })
        .collect();
    let endpoints = if cluster_ip.is_none() {
        ready_addresses(slice)
    } else {
        Vec::new()
    };
    ServiceRecord {
        cluster_ip,
        endpoints,
        ports,
    }
}

/// A service port's protocol, if the load balancer handles it (TCP, UDP).
fn protocol_of(port: &ServicePort) -> Option<Protocol> {
    match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// The backends' port for a service port: the slice's port of the same
/// name (the resolved targetPort).
fn target_port(slice: Option<&EndpointSlice>, port: &ServicePort) -> Option<u16> {
    let name = port.name.as_deref().unwrap_or_default();
    slice?
        .ports
        .as_ref()?
        .iter()
        .find(|p| p.name.as_deref().unwrap_or_default() == name)?
        .port
        .and_then(|p| u16::try_from(p).ok())
}

/// The load-balancer entries of one Service: one per port, on its
/// `ClusterIP`, backed by the ready endpoints' addresses and the slice's port
/// of the same name. Headless services (no `ClusterIP`) balance nothing.
pub fn specs_of(service: &Service, slice: Option<&EndpointSlice>) -> Vec<ServiceSpec> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let Some(vip) = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
    else {
        return Vec::new();
    };
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(DEFAULT_AFFINITY, Duration::from_secs)
    });
    let ready = ready_addresses(slice);
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(proto) = protocol_of(port) else {
            continue;
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            continue;
        };
        let target = target_port(slice, port);
        let backends = match target {
            Some(target) => ready.iter().map(|ip| (*ip, target)).collect(),
            None => Vec::new(),
        };
        out.push(ServiceSpec {
            vip,
            port: service_port,
            proto,
            backends,
            affinity,
        });
    }
    out
}

/// The `NodePort` entries of one Service: one per port with a `nodePort`
/// (type `NodePort`), backed by the ready endpoints with their node.
pub fn nodeports_of(service: &Service, slice: Option<&EndpointSlice>) -> Vec<NodePortSpec> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    if spec.type_.as_deref() != Some("NodePort") {
        return Vec::new();
    }
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let ready: Vec<(Ipv4Addr, Option<String>)> = slice
        .map(|s| {
            s.endpoints
                .iter()
                .flatten()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .flat_map(|e| {
                    e.addresses
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .map(|ip| (ip, e.node_name.clone()))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some(proto) = protocol_of(port) else {
            continue;
        };
        let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let target = target_port(slice, port);
        let backends = match target {
            Some(port) => ready
                .iter()
                .map(|(ip, node)| NodePortBackend {
                    ip: *ip,
                    port,
                    node: node.clone(),
                })
                .collect(),
            None => Vec::new(),
        };
        out.push(NodePortSpec {
            node_port,
            proto,
            local,
            backends,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(ports: &serde_json::Value, extra: &serde_json::Value) -> Service {
        let mut s = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "ports": ports},
        });
        if let (Some(spec), Some(extra)) = (s["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::from_value(s).unwrap()
    }

    fn slice() -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.2"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.2"], "conditions": {"ready": false}},
                {"addresses": ["10.244.3.2"]},
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
        }))
        .unwrap()
    }

    #[test]
    fn ready_endpoints_back_each_named_port() {
        let svc = service(
            &json!([{"name": "http", "port": 80, "protocol": "TCP"},
                   {"name": "dns", "port": 53, "protocol": "UDP"}]),
            &json!({}),
        );
        let specs = specs_of(&svc, Some(&slice()));
        assert_eq!(specs.len(), 2);
        let http = &specs[0];
        assert_eq!(
            (http.vip, http.port, http.proto),
            (Ipv4Addr::new(10, 96, 0, 20), 80, Protocol::Tcp)
        );
        assert_eq!(
            http.backends,
            [
                (Ipv4Addr::new(10, 244, 1, 2), 8080),
                (Ipv4Addr::new(10, 244, 3, 2), 8080)
            ],
            "not-ready endpoints are left out"
        );
        assert_eq!(specs[1].proto, Protocol::Udp);
        assert_eq!(specs[1].backends[0].1, 5353);
        assert_eq!(http.affinity, None);
    }

    #[test]
    fn no_slice_means_refuse_and_headless_means_nothing() {
        let svc = service(&json!([{"port": 80}]), &json!({}));
        let specs = specs_of(&svc, None);
        assert_eq!(specs.len(), 1);
        assert!(specs[0].backends.is_empty(), "no endpoints: ECONNREFUSED");
        let headless = service(&json!([{"port": 80}]), &json!({"clusterIP": "None"}));
        assert!(specs_of(&headless, Some(&slice())).is_empty());
        let dns = dns_of(&headless, Some(&slice()));
        assert_eq!(dns.cluster_ip, None);
        assert_eq!(
            dns.endpoints,
            [Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 3, 2)],
            "headless DNS answers the ready endpoints"
        );
        assert_eq!(
            dns_of(&svc, None).cluster_ip,
            Some(Ipv4Addr::new(10, 96, 0, 20))
        );
        assert_eq!(
            dns_of(&svc, Some(&slice())),
            dns_of(&svc, None),
            "a ClusterIP service's DNS view does not depend on its endpoints"
        );
    }

    #[test]
    fn client_ip_affinity_carries_its_timeout() {
        let svc = service(
            &json!([{"name": "http", "port": 80}]),
            &json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
        );
        assert_eq!(
            specs_of(&svc, Some(&slice()))[0].affinity,
            Some(Duration::from_mins(1))
        );
        let default = service(
            &json!([{"port": 80}]),
            &json!({"sessionAffinity": "ClientIP"}),
        );
        assert_eq!(specs_of(&default, None)[0].affinity, Some(DEFAULT_AFFINITY));
    }

    #[test]
    fn node_ports_carry_policy_and_nodes() {
        let svc = service(
            &json!([{"name": "http", "port": 80, "nodePort": 30080}]),
            &json!({"type": "NodePort", "externalTrafficPolicy": "Local"}),
        );
        let mut sl = slice();
        sl.endpoints.as_mut().unwrap()[0].node_name = Some("n1".into());
        let np = nodeports_of(&svc, Some(&sl));
        assert_eq!(np.len(), 1);
        assert_eq!((np[0].node_port, np[0].local), (30080, true));
        assert_eq!(np[0].backends.len(), 2, "ready endpoints only");
        assert_eq!(np[0].backends[0].node.as_deref(), Some("n1"));
        assert_eq!(np[0].backends[0].port, 8080);
        let cluster_ip = service(&json!([{"name": "http", "port": 80}]), &json!({}));
        assert!(nodeports_of(&cluster_ip, Some(&sl)).is_empty());
    }

    #[test]
    fn the_table_follows_adds_changes_and_deletes() {
        let object = |s: &Service| v1::Object {
            meta: None,
            json: serde_json::to_string(s).unwrap(),
        };
        let svc = service(&json!([{"name": "http", "port": 80}]), &json!({}));
        let mut table = ServiceTable::default();
        let ev = |t: v1::EventType, slice: Option<&EndpointSlice>| v1::ServiceEvent {
            r#type: t.into(),
            service: Some(object(&svc)),
            endpoint_slice: slice.map(|s| v1::Object {
                meta: None,
                json: serde_json::to_string(s).unwrap(),
            }),
        };
        assert!(table.apply(&ev(v1::EventType::Added, None)).unwrap());
        assert!(table.specs()[0].backends.is_empty());
        assert!(
            table
                .apply(&ev(v1::EventType::Modified, Some(&slice())))
                .unwrap()
        );
        assert_eq!(table.specs()[0].backends.len(), 2);
        assert!(
            !table
                .apply(&ev(v1::EventType::Modified, Some(&slice())))
                .unwrap(),
            "no change"
        );
        assert!(table.apply(&ev(v1::EventType::Deleted, None)).unwrap());
        assert!(table.is_empty());
    }

    #[test]
    fn events_report_the_lb_keys_they_change_and_the_first_owner_wins() {
        let event = |t: v1::EventType, name: &str, port: i64, slice: Option<&EndpointSlice>| {
            let mut svc = service(&json!([{"name": "http", "port": port}]), &json!({}));
            svc.metadata.name = Some(name.to_owned());
            v1::ServiceEvent {
                r#type: t.into(),
                service: Some(v1::Object {
                    meta: None,
                    json: serde_json::to_string(&svc).unwrap(),
                }),
                endpoint_slice: slice.map(|s| v1::Object {
                    meta: None,
                    json: serde_json::to_string(s).unwrap(),
                }),
            }
        };
        let mut table = ServiceTable::default();
        let a = table
            .apply_event(&event(v1::EventType::Added, "web", 80, None))
            .unwrap();
        let key = table.specs()[0].key();
        assert_eq!(a.lb_keys, BTreeSet::from([key]));
        assert!(a.dns);
        assert!(table.spec_for(&key).unwrap().backends.is_empty());
        // Endpoints ready: the same key, now backed.
        let a = table
            .apply_event(&event(v1::EventType::Modified, "web", 80, Some(&slice())))
            .unwrap();
        assert_eq!(a.lb_keys, BTreeSet::from([key]));
        assert_eq!(table.spec_for(&key).unwrap().backends.len(), 2);
        assert!(!a.dns, "a ClusterIP service's endpoints are not in DNS");
        // Another port: the old key goes, the new one comes.
        let mut burst = a;
        let a = table
            .apply_event(&event(v1::EventType::Modified, "web", 81, Some(&slice())))
            .unwrap();
        let key81 = table.specs()[0].key();
        assert_eq!(a.lb_keys, BTreeSet::from([key, key81]));
        assert!(a.dns, "the port is in DNS (SRV)");
        burst.merge(a.clone());
        assert_eq!(burst, a, "a burst programs what each of its events changed");
        assert!(table.spec_for(&key).is_none());
        // A second service on the same VIP and port: the first by name owns it.
        let a = table
            .apply_event(&event(v1::EventType::Added, "api", 81, None))
            .unwrap();
        assert_eq!(a.lb_keys, BTreeSet::from([key81]));
        assert!(
            table.spec_for(&key81).unwrap().backends.is_empty(),
            "api < web"
        );
        let a = table
            .apply_event(&event(v1::EventType::Deleted, "api", 81, None))
            .unwrap();
        assert_eq!(a.lb_keys, BTreeSet::from([key81]));
        assert_eq!(
            table.spec_for(&key81).unwrap().backends.len(),
            2,
            "web again"
        );
        let a = table
            .apply_event(&event(v1::EventType::Modified, "web", 81, Some(&slice())))
            .unwrap();
        assert!(!a.changed());
        let a = table
            .apply_event(&event(v1::EventType::Deleted, "web", 81, None))
            .unwrap();
        assert_eq!(a.lb_keys, BTreeSet::from([key81]));
        assert!(table.spec_for(&key81).is_none() && table.is_empty());
    }
}
