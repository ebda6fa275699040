//! The endpoints controller: for every Service with a selector, one
//! `EndpointSlice` named after it listing the pods the selector picks in its
//! namespace that have an IP, with their conditions (ready, serving,
//! terminating) and the service's ports resolved against the pods
//! (`targetPort` by number or by container port name).
//!
//! A slice's ports apply to every endpoint in it, so pods that resolve the
//! ports differently (a named `targetPort` that one pod lacks or numbers
//! otherwise) cannot share it: the slice lists the largest group of pods
//! that agree, and the others are left out, as Kubernetes leaves a pod
//! lacking the name out of that port. The slice is owned by the Service
//! (deleted with it by the API's cascade). Only IPv4 pod addresses are
//! listed (the slice's addressType).
//!
//! Events on the Service (as Kubernetes' endpointslice controller records
//! them): Warning `FailedToUpdateEndpointSlices` when writing the slice
//! fails (the write is retried with backoff), and Warning
//! `EndpointsOverCapacity` once when the selector picks more pods than one
//! slice holds ([`weir_proto::manifest::MAX_ENDPOINTS`]; the rest are left
//! out), again only after the Service was back under the limit.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::cache::{self, Change};
use super::client::Error;
use super::queue::WorkQueue;
use super::{Action, Ctx, changed, drive, forward, forward_own, meta, queue_all};
use crate::api::Kind;
use crate::events::EventType;
use crate::store::Store;

/// The event source and field manager of this controller.
pub const COMPONENT: &str = "endpointslice-controller";
/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// This controller's value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "endpointslice-controller.weir";
/// The event reason of a failed slice write.
pub const FAILED_UPDATE: &str = "FailedToUpdateEndpointSlices";
/// The event reason of a Service selecting more pods than a slice holds.
pub const OVER_CAPACITY: &str = "EndpointsOverCapacity";

/// The Services warned about being over capacity (key → how many pods were
/// left out then), so the warning is not repeated on every reconcile.
#[derive(Debug, Default)]
struct Warned(Mutex<HashMap<String, usize>>);

impl Warned {
    /// Notes that `key` leaves out `over` pods for capacity; true if that
    /// calls for a warning (it was under the limit before).
    fn over(&self, key: &str, over: usize) -> bool {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if over == 0 {
            m.remove(key);
            return false;
        }
        m.insert(key.to_owned(), over).is_none()
    }
}

/// Starts the controller: its queue feeders and its worker.
pub(crate) fn start<S: Store>(
    ctx: &Arc<Ctx<S>>,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let queue = WorkQueue::new();
    let from_services = forward_own(&ctx.services, &queue, shutdown);
    let services = Arc::clone(&ctx.services);
    let from_pods = forward(
        ctx.pods.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        move |change| {
            if let Change::Resync = change {
                return services
                    .list()
                    .iter()
                    .map(|s| cache::key_of(&s.metadata))
                    .collect();
            }
            let mut keys: Vec<String> = changed(change)
                .into_iter()
                .flat_map(|pod| services_of_pod(&services, pod))
                .collect();
            keys.dedup();
            keys
        },
    );
    let from_slices = forward(
        ctx.endpoint_slices.subscribe(),
        Arc::clone(&queue),
        shutdown.clone(),
        move |change| {
            changed(change)
                .into_iter()
                .filter_map(|s| {
                    let svc = meta::labels(&s.metadata).get(SERVICE_NAME_LABEL)?;
                    Some(format!("{}/{svc}", meta::namespace(&s.metadata)))
                })
                .collect()
        },
    );
    queue_all(&ctx.services, &queue);
    let warned = Arc::new(Warned::default());
    let worker = drive(COMPONENT, ctx, queue, shutdown, move |ctx, key| {
        let warned = Arc::clone(&warned);
        async move { reconcile(&ctx, &warned, &key).await }
    });
    vec![from_services, from_pods, from_slices, worker]
}

/// The Services in a pod's namespace whose selector picks it.
fn services_of_pod(services: &cache::Cache<Service>, pod: &Pod) -> Vec<String> {
    services
        .list_namespace(meta::namespace(&pod.metadata))
        .iter()
        .filter(|s| selects(s, meta::labels(&pod.metadata)))
        .map(|s| cache::key_of(&s.metadata))
        .collect()
}

/// The service's selector, if it has a non-empty one.
fn selector(svc: &Service) -> Option<&BTreeMap<String, String>> {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
}

/// Whether `svc` has a selector and it picks `labels`.
pub fn selects(svc: &Service, labels: &BTreeMap<String, String>) -> bool {
    selector(svc).is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Writes the slice one Service should have, if it differs from the cached one.
async fn reconcile<S: Store>(ctx: &Ctx<S>, warned: &Warned, key: &str) -> Result<Action, Error> {
    let Some(svc) = ctx.services.get(key) else {
        // Its slice goes with it (ownerReferences cascade).
        warned.over(key, 0);
        return Ok(Action::Done);
    };
    if svc.metadata.deletion_timestamp.is_some() || selector(&svc).is_none() {
        warned.over(key, 0);
        return Ok(Action::Done);
    }
    let existing = ctx.endpoint_slices.get(key);
    if let Some(e) = &existing {
        let managed_by = meta::labels(&e.metadata).get(MANAGED_BY_LABEL);
        if managed_by.is_some_and(|m| m != MANAGED_BY) {
            tracing::debug!(%key, "endpoints: slice managed by someone else, left alone");
            return Ok(Action::Done);
        }
    }
    let pods = ctx.pods.list_namespace(meta::namespace(&svc.metadata));
    let (desired, left_out) = desired_slice(&svc, &pods);
    if left_out.ports > 0 {
        tracing::warn!(%key, left_out = left_out.ports, "endpoints: pods resolving the ports differently left out of the service's slice");
    }
    if warned.over(key, left_out.capacity) {
        tracing::warn!(%key, left_out = left_out.capacity, "endpoints: more pods than a slice holds");
        let message = over_capacity_message(key, &left_out);
        event(ctx, &svc, OVER_CAPACITY, &message).await;
    }
    if existing.as_deref().is_some_and(|e| same_slice(e, &desired)) {
        return Ok(Action::Done);
    }
    if let Err(e) = ctx
        .client
        .apply(&ctx.endpoint_slices, "write", &desired, COMPONENT)
        .await
    {
        let message = format!("Error updating Endpoint Slices for Service {key}: {e}");
        event(ctx, &svc, FAILED_UPDATE, &message).await;
        return Err(e);
    }
    Ok(Action::Done)
}

/// The over-capacity warning's message.
fn over_capacity_message(key: &str, left_out: &LeftOut) -> String {
    let max = weir_proto::manifest::MAX_ENDPOINTS;
    format!(
        "Service {key} selects {} pods; its EndpointSlice holds at most {max} endpoints, {} are left out",
        left_out.listed + left_out.capacity,
        left_out.capacity
    )
}

/// Records a Warning about the Service.
async fn event<S: Store>(ctx: &Ctx<S>, svc: &Service, reason: &str, message: &str) {
    ctx.client
        .event(
            Kind::Service,
            &svc.metadata,
            EventType::Warning,
            reason,
            message,
            COMPONENT,
        )
        .await;
}

/// Whether two slices say the same (labels, owner, endpoints, ports).
fn same_slice(a: &EndpointSlice, b: &EndpointSlice) -> bool {
    a.metadata.labels == b.metadata.labels
        && a.metadata.owner_references == b.metadata.owner_references
        && a.address_type == b.address_type
        && a.endpoints.as_deref().unwrap_or_default() == b.endpoints.as_deref().unwrap_or_default()
        && a.ports.as_deref().unwrap_or_default() == b.ports.as_deref().unwrap_or_default()
}

/// The ports one pod serves the service's ports on (in service port order;
/// a port whose named `targetPort` the pod lacks is left out).
fn resolve_ports(ports: &[ServicePort], pod: &Pod) -> Vec<EndpointPort> {
    ports
        .iter()
        .filter_map(|p| {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
            let number = match p.target_port.as_ref() {
                None => p.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => named_port(pod, name, &protocol)?,
            };
            Some(EndpointPort {
                name: Some(p.name.clone().unwrap_or_default()),
                port: Some(number),
                protocol: Some(protocol),
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect()
}

/// The number of the pod's container port called `name` with `protocol`.
fn named_port(pod: &Pod, name: &str, protocol: &str) -> Option<i32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == protocol
        })
        .map(|p| p.container_port)
}

/// The pod's IPv4 address (the slice's address type), if it has one.
fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .pod_ip
        .as_deref()
        .filter(|ip| ip.parse::<Ipv4Addr>().is_ok())
}

fn terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The endpoint of one pod: ready = Ready condition and not terminating
/// (or `publishNotReadyAddresses`), serving = ready regardless of
/// termination, terminating = has a deletionTimestamp.
fn endpoint(pod: &Pod, ip: &str, publish_not_ready: bool) -> Endpoint {
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let ready = meta::pod_ready(pod);
    Endpoint {
        addresses: vec![ip.to_owned()],
        conditions: Some(EndpointConditions {
            ready: Some(publish_not_ready || (ready && !terminating)),
            serving: Some(publish_not_ready || ready),
            terminating: Some(terminating),
        }),
        node_name: Some(meta::pod_node(pod).to_owned()).filter(|n| !n.is_empty()),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".to_owned()),
            name: Some(meta::name(&pod.metadata).to_owned()),
            namespace: Some(meta::namespace(&pod.metadata).to_owned()),
            uid: Some(meta::uid(&pod.metadata).to_owned()),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

/// How many selected pods with an IP a slice lists and leaves out, and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeftOut {
    /// Listed.
    pub listed: usize,
    /// Left out: they resolve the ports otherwise than the listed ones.
    pub ports: usize,
    /// Left out: past [`weir_proto::manifest::MAX_ENDPOINTS`].
    pub capacity: usize,
}

/// The slice `svc` should have given the pods of its namespace, and which
/// selected pods with an IP were left out.
pub fn desired_slice(svc: &Service, pods: &[Arc<Pod>]) -> (EndpointSlice, LeftOut) {
    let spec = svc.spec.clone().unwrap_or_default();
    let ports = spec.ports.unwrap_or_default();
    let publish = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut selected: Vec<(&Pod, &str)> = pods
        .iter()
        .filter(|p| selects(svc, meta::labels(&p.metadata)) && !terminal(p))
        .filter_map(|p| pod_ip(p).map(|ip| (p.as_ref(), ip)))
        .collect();
    selected.sort_by(|a, b| meta::name(&a.0.metadata).cmp(meta::name(&b.0.metadata)));
    // Group the pods by how they resolve the ports; the largest group
    // (preferring groups that serve some port) is the slice's.
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (pod, ip) in &selected {
        let resolved = resolve_ports(&ports, pod);
        match groups.iter_mut().find(|(p, _)| *p == resolved) {
            Some((_, members)) => members.push((pod, ip)),
            None => groups.push((resolved, vec![(pod, ip)])),
        }
    }
    let best = groups
        .iter()
        .enumerate()
        .max_by_key(|(i, (p, members))| (!p.is_empty(), members.len(), std::cmp::Reverse(*i)))
        .map(|(i, _)| i);
    let (slice_ports, members) = match best {
        Some(i) => groups.swap_remove(i),
        None => (resolve_ports(&ports, &Pod::default()), Vec::new()),
    };
    let max = weir_proto::manifest::MAX_ENDPOINTS;
    let left_out = LeftOut {
        listed: members.len().min(max),
        ports: selected.len() - members.len(),
        capacity: members.len().saturating_sub(max),
    };
    let endpoints: Vec<Endpoint> = members
        .iter()
        .take(max)
        .map(|(pod, ip)| endpoint(pod, ip, publish))
        .collect();
    let slice = EndpointSlice {
        metadata: slice_meta(&svc.metadata),
        address_type: "IPv4".to_owned(),
        endpoints: Some(endpoints),
        ports: Some(slice_ports),
    };
    (slice, left_out)
}

/// Pods (with their IPs) that resolve the service's ports alike.
type Group<'a> = (Vec<EndpointPort>, Vec<(&'a Pod, &'a str)>);

fn slice_meta(svc: &ObjectMeta) -> ObjectMeta {
    let name = meta::name(svc).to_owned();
    ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(meta::namespace(svc).to_owned()),
        labels: Some(BTreeMap::from([
            (SERVICE_NAME_LABEL.to_owned(), name),
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        ])),
        owner_references: Some(vec![meta::owner_ref("v1", "Service", svc)]),
        ..ObjectMeta::default()
    }
}
