//! The node's service table as the control streams it (`ServiceEvent`s:
//! each Service with its `EndpointSlice`), turned into the socket load
//! balancer's desired state ([`crate::lb::ServiceSpec`]): one entry per
//! `ClusterIP` and service port, backed by the slice's ready endpoints.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use weir_proto::v1;

use crate::dns::{PortRecord, ServiceRecord};
use crate::lb::{NodePortBackend, NodePortSpec, Protocol, ServiceSpec};

/// Kubernetes' default `ClientIP` affinity timeout (3 hours).
const DEFAULT_AFFINITY: Duration = Duration::from_hours(3);

/// Every service the control has sent, by `<namespace>/<name>`.
#[derive(Debug, Default, Clone)]
pub struct ServiceTable {
    services: BTreeMap<String, Vec<ServiceSpec>>,
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

impl ServiceTable {
    /// Applies one event; whether the table changed.
    pub fn apply(&mut self, ev: &v1::ServiceEvent) -> Result<bool, ServiceError> {
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
            let np = self.nodeports.remove(&key).is_some();
            return Ok(self.services.remove(&key).is_some() || dns || np);
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
        let nodeports = nodeports_of(&service, slice.as_ref());
        let changed = self.services.get(&key) != Some(&specs)
            || self.dns.get(&dns_key) != Some(&record)
            || self.nodeports.get(&key).unwrap_or(&Vec::new()) != &nodeports;
        self.services.insert(key.clone(), specs);
        self.dns.insert(dns_key, record);
        if nodeports.is_empty() {
            self.nodeports.remove(&key);
        } else {
            self.nodeports.insert(key, nodeports);
        }
        Ok(changed)
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
/// headless), its ready endpoints and its ports.
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
    ServiceRecord {
        cluster_ip,
        endpoints: ready_addresses(slice),
        ports,
    }
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
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => continue,
        };
        let Ok(service_port) = u16::try_from(port.port) else {
            continue;
        };
        let target = slice
            .and_then(|s| s.ports.as_ref())
            .and_then(|ports| {
                ports.iter().find(|p| {
                    p.name.as_deref().unwrap_or_default()
                        == port.name.as_deref().unwrap_or_default()
                })
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
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
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => continue,
        };
        let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let target = slice
            .and_then(|s| s.ports.as_ref())
            .and_then(|ports| {
                ports.iter().find(|p| {
                    p.name.as_deref().unwrap_or_default()
                        == port.name.as_deref().unwrap_or_default()
                })
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
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
}
