//! Services: what an update may change (cluster IP immutable, allocated
//! node ports kept), and the allocation of cluster IPs from the service CIDR
//! and node ports from 30000-32767.
//!
//! Every allocated value has a record, `/alloc/clusterips/<ip>` or
//! `/alloc/nodeports/<port>`, whose value is the owning service
//! (`<namespace>/<name>`). A Service write creates its new records with
//! `Compare::Absent` in the same transaction as the object, so two
//! concurrent writes can never both take a value; a delete of the Service
//! removes its records in the transaction that removes it.

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::net::Ipv4Addr;

use serde_json::{Map, Value};
use weir_proto::manifest::NODE_PORT_RANGE;

use super::object::Stored;
use super::{ApiError, ObjectsApi};
use crate::nodes::Cidr;
use crate::store::{Compare, Op, Store};

/// The prefix of cluster IP records.
pub const CLUSTER_IP_RECORDS: &str = "/alloc/clusterips/";
/// The prefix of node port records.
pub const NODE_PORT_RECORDS: &str = "/alloc/nodeports/";
/// How many random picks are tried before scanning for a free value.
const RANDOM_PICKS: usize = 64;

/// The default service CIDR (Kubernetes' and weir-control's `--service-cidr`).
pub fn default_service_cidr() -> Cidr {
    Cidr {
        addr: Ipv4Addr::new(10, 96, 0, 0),
        prefix: 16,
    }
}

fn immutable(field: &str, why: &str) -> ApiError {
    ApiError::Invalid(format!("manifest: {field}: field is immutable: {why}"))
}

fn invalid(field: &str, why: &str) -> ApiError {
    ApiError::Invalid(format!("manifest: {field}: {why}"))
}

fn spec_str<'a>(spec: &'a Map<String, Value>, field: &str) -> &'a str {
    spec.get(field).and_then(Value::as_str).unwrap_or_default()
}

/// Checks `desired` as an update of `stored`: the cluster IP is kept when
/// the manifest leaves it out and cannot change; node ports the manifest
/// leaves out keep their allocated values while the type stays `NodePort`
/// (Kubernetes' rules).
pub(super) fn check_update(stored: &Stored, desired: &mut Stored) -> Result<(), ApiError> {
    let empty = Map::new();
    let old = stored.spec().unwrap_or(&empty).clone();
    let spec = desired.spec_mut();
    let old_ip = spec_str(&old, "clusterIP").to_owned();
    let new_ip = spec_str(spec, "clusterIP").to_owned();
    if !old_ip.is_empty() {
        if new_ip.is_empty() {
            spec.insert("clusterIP".to_owned(), Value::from(old_ip.clone()));
            spec.insert("clusterIPs".to_owned(), Value::from(vec![old_ip]));
        } else if new_ip != old_ip {
            return Err(immutable(
                "spec.clusterIP",
                &format!("the service's cluster IP is {old_ip:?}"),
            ));
        }
    }
    if spec_str(spec, "type") != "NodePort" {
        return Ok(());
    }
    let old_ports = old
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let Some(Value::Array(ports)) = spec.get_mut("ports") else {
        return Ok(());
    };
    for port in ports.iter_mut().filter_map(Value::as_object_mut) {
        if port.get("nodePort").is_some_and(|n| !n.is_null()) {
            continue;
        }
        let same = |o: &&Value| {
            let same_name = o.get("name") == port.get("name") && port.get("name").is_some();
            let same_port =
                o.get("port") == port.get("port") && o.get("protocol") == port.get("protocol");
            same_name || same_port
        };
        if let Some(np) = old_ports.iter().find(same).and_then(|o| o.get("nodePort")) {
            port.insert("nodePort".to_owned(), np.clone());
        }
    }
    Ok(())
}

/// What a Service holds: its cluster IP (not `None`) and node ports.
#[derive(Debug, Default, PartialEq, Eq)]
struct Held {
    ip: Option<Ipv4Addr>,
    ports: BTreeSet<u16>,
}

fn held(object: &Stored) -> Held {
    let empty = Map::new();
    let spec = object.spec().unwrap_or(&empty);
    let ip = spec_str(spec, "clusterIP").parse().ok();
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("nodePort")?.as_u64())
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    Held { ip, ports }
}

fn ip_key(ip: Ipv4Addr) -> String {
    format!("{CLUSTER_IP_RECORDS}{ip}")
}

fn port_key(port: u16) -> String {
    format!("{NODE_PORT_RECORDS}{port}")
}

fn owner_of(object: &Stored) -> String {
    format!("{}/{}", object.namespace(), object.name())
}

/// The deletes that release everything `object` (a Service) holds.
pub(super) fn release_ops(object: &Stored) -> Vec<Op> {
    let h = held(object);
    h.ip.map(ip_key)
        .into_iter()
        .chain(h.ports.iter().map(|p| port_key(*p)))
        .map(|key| Op::Delete { key })
        .collect()
}

/// A random `u64`, from std's randomly keyed hasher.
fn random(salt: u64) -> u64 {
    RandomState::new().hash_one((salt, std::time::SystemTime::now()))
}

impl<S: Store> ObjectsApi<S> {
    /// Allocates what `desired` (a Service) needs and checks what it asks
    /// for: returns the compares and writes of its allocation records, to
    /// go in the transaction that writes it (releasing what `stored` held
    /// and `desired` no longer does). A clash is refused naming the field.
    pub(super) async fn allocate_service(
        &self,
        stored: Option<&Stored>,
        desired: &mut Stored,
    ) -> Result<(Vec<(String, Compare)>, Vec<Op>), ApiError> {
        let owner = owner_of(desired);
        let before = stored.map(held).unwrap_or_default();
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut claim = |key: String, compare: Compare| {
            compares.push((key.clone(), compare));
            ops.push(Op::Put {
                key,
                value: owner.clone().into_bytes(),
            });
        };
        // The cluster IP.
        let spec = desired.spec_mut();
        let ip_text = spec_str(spec, "clusterIP").to_owned();
        if ip_text.is_empty() {
            let ip = self.free_cluster_ip().await?;
            spec.insert("clusterIP".to_owned(), Value::from(ip.to_string()));
            spec.insert("clusterIPs".to_owned(), Value::from(vec![ip.to_string()]));
            claim(ip_key(ip), Compare::Absent);
        } else if let Ok(ip) = ip_text.parse::<Ipv4Addr>()
            && before.ip != Some(ip)
        {
            self.check_cluster_ip(ip)?;
            let compare = self
                .claimable(&ip_key(ip), &owner, "spec.clusterIP", &ip_text)
                .await?;
            claim(ip_key(ip), compare);
        }
        // The node ports.
        let node_port = spec_str(spec, "type") == "NodePort";
        let mut wanted = BTreeSet::new();
        if let Some(Value::Array(ports)) = spec.get_mut("ports") {
            for (i, port) in ports.iter_mut().enumerate() {
                let Some(port) = port.as_object_mut() else {
                    continue;
                };
                let given = port.get("nodePort").and_then(Value::as_u64);
                match given.and_then(|p| u16::try_from(p).ok()) {
                    Some(p) => {
                        if !before.ports.contains(&p) && wanted.insert(p) {
                            let field = format!("spec.ports[{i}].nodePort");
                            let compare = self
                                .claimable(&port_key(p), &owner, &field, &p.to_string())
                                .await?;
                            claim(port_key(p), compare);
                        }
                        wanted.insert(p);
                    }
                    None if node_port => {
                        let p = self.free_node_port(&wanted).await?;
                        port.insert("nodePort".to_owned(), Value::from(p));
                        wanted.insert(p);
                        claim(port_key(p), Compare::Absent);
                    }
                    None => {}
                }
            }
        }
        // Release what is no longer held.
        let after = held(desired);
        if let Some(ip) = before.ip.filter(|ip| after.ip != Some(*ip)) {
            ops.push(Op::Delete { key: ip_key(ip) });
        }
        for p in before.ports.difference(&after.ports) {
            ops.push(Op::Delete { key: port_key(*p) });
        }
        Ok((compares, ops))
    }

    /// A user-given cluster IP must be a host address of the service CIDR.
    fn check_cluster_ip(&self, ip: Ipv4Addr) -> Result<(), ApiError> {
        let cidr = self.service_cidr;
        let (first, last) = host_range(cidr);
        let n = u32::from(ip);
        if n < first || n > last {
            return Err(invalid(
                "spec.clusterIP",
                &format!("{ip}: provided IP is not in the valid range: the service CIDR is {cidr}"),
            ));
        }
        Ok(())
    }

    /// The compare that claims `key` for `owner`, or a clash naming `field`.
    /// A record whose service no longer holds the value is stale and is
    /// taken over.
    async fn claimable(
        &self,
        key: &str,
        owner: &str,
        field: &str,
        value: &str,
    ) -> Result<Compare, ApiError> {
        let Some(kv) = self.store.get(key).await? else {
            return Ok(Compare::Absent);
        };
        let holder = String::from_utf8_lossy(&kv.value).into_owned();
        if holder == owner || !self.still_holds(&holder, key).await? {
            return Ok(Compare::ModRevision(kv.mod_revision));
        }
        Err(invalid(
            field,
            &format!(
                "{value}: provided {} is already allocated (by service {holder})",
                if key.starts_with(CLUSTER_IP_RECORDS) {
                    "IP"
                } else {
                    "port"
                }
            ),
        ))
    }

    /// Whether the service `holder` (`<ns>/<name>`) still holds `key`'s value.
    async fn still_holds(&self, holder: &str, key: &str) -> Result<bool, ApiError> {
        let Some((ns, name)) = holder.split_once('/') else {
            return Ok(false);
        };
        let Ok(svc_key) = super::Kind::Service.key(ns, name) else {
            return Ok(false);
        };
        let Some(kv) = self.store.get(&svc_key).await? else {
            return Ok(false);
        };
        let h = held(&Stored::decode(&kv)?);
        Ok(h.ip.is_some_and(|ip| ip_key(ip) == key) || h.ports.iter().any(|p| port_key(*p) == key))
    }

    async fn used(&self, prefix: &str) -> Result<BTreeSet<String>, ApiError> {
        let (kvs, _) = self.store.list(prefix).await?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix(prefix).map(str::to_owned))
            .collect())
    }

    /// A free cluster IP: random picks, then a scan; never the network,
    /// broadcast, `.1` (the `kubernetes` service) or `.10` (DNS).
    async fn free_cluster_ip(&self) -> Result<Ipv4Addr, ApiError> {
        let used = self.used(CLUSTER_IP_RECORDS).await?;
        let cidr = self.service_cidr;
        let (first, last) = host_range(cidr);
        let base = u32::from(cidr.addr);
        let reserved = [base + 1, base + 10];
        let free =
            |n: u32| !reserved.contains(&n) && !used.contains(&Ipv4Addr::from(n).to_string());
        let span = u64::from(last - first) + 1;
        for salt in 0..RANDOM_PICKS {
            let n = first + u32::try_from(random(salt as u64) % span).unwrap_or(0);
            if free(n) {
                return Ok(Ipv4Addr::from(n));
            }
        }
        (first..=last)
            .find(|n| free(*n))
            .map(Ipv4Addr::from)
            .ok_or_else(|| {
                invalid(
                    "spec.clusterIP",
                    &format!("no free cluster IP left in the service CIDR {cidr}"),
                )
            })
    }

    /// A free node port, not in `taken` (this service's own).
    async fn free_node_port(&self, taken: &BTreeSet<u16>) -> Result<u16, ApiError> {
        let used = self.used(NODE_PORT_RECORDS).await?;
        let first = u16::try_from(*NODE_PORT_RANGE.start()).unwrap_or(30000);
        let last = u16::try_from(*NODE_PORT_RANGE.end()).unwrap_or(32767);
        let free = |p: u16| !taken.contains(&p) && !used.contains(&p.to_string());
        let span = u64::from(last - first) + 1;
        for salt in 0..RANDOM_PICKS {
            let p = first + u16::try_from(random(salt as u64) % span).unwrap_or(0);
            if free(p) {
                return Ok(p);
            }
        }
        (first..=last).find(|p| free(*p)).ok_or_else(|| {
            invalid(
                "spec.ports[].nodePort",
                &format!("no free node port left in {first}-{last}"),
            )
        })
    }
}

/// The first and last host address of `cidr` (network and broadcast excluded).
fn host_range(cidr: Cidr) -> (u32, u32) {
    let base = u32::from(cidr.addr);
    let size = if cidr.prefix == 0 {
        u32::MAX
    } else {
        (1u32 << (32 - u32::from(cidr.prefix))) - 1
    };
    (
        base.saturating_add(1),
        base.saturating_add(size).saturating_sub(1).max(base + 1),
    )
}
