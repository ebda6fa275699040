//! Follows `WatchNode`: the pods bound to this node become the manager's
//! desired set, the peers become routes. The stream reconnects with
//! backoff and resumes from the last revision seen; a Resync (or a first
//! connection) re-lists, and only a complete list (ended by its Bookmark)
//! replaces the desired set, so nothing stops because the control is gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use k8s_openapi::api::core::v1::Pod;
use tokio_util::sync::CancellationToken;
use weir_proto::v1;
use weir_proto::v1::node_event::Event;

use super::routes::{PeerRoute, PeerRoutes};
use super::services::{Applied, ServiceTable};
use super::{BACKOFF_INITIAL, ControlPod, Shared, events, next_backoff};
use crate::lb::Change;
use crate::pod::DesiredPod;

/// A stream silent for this long (the control bookmarks every 10 s) is
/// taken for dead and reconnected.
const SILENCE: Duration = Duration::from_secs(30);
/// Most service events applied to the table before they are programmed:
/// the events of a burst that have already arrived are programmed at once
/// (one map update, one DNS zone refresh), which bounds how long the first
/// of them waits.
const SERVICE_BATCH: usize = 256;

/// A pod event's object as the agent keeps it: (uid, pod).
pub(crate) fn control_pod(object: &v1::Object) -> Result<(String, ControlPod), String> {
    let pod: Pod = serde_json::from_str(&object.json).map_err(|e| format!("pod JSON: {e}"))?;
    let uid = pod
        .metadata
        .uid
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or("pod without metadata.uid")?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = pod.metadata.name.clone().unwrap_or_default();
    Ok((
        uid,
        ControlPod {
            namespace,
            name,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            resource_version: object.meta.as_ref().map_or(0, |m| m.resource_version),
            pod,
        },
    ))
}

/// The manager's desired set: every bound pod not marked for deletion.
pub(crate) fn desired_pods(pods: &BTreeMap<String, ControlPod>) -> Vec<DesiredPod> {
    pods.iter()
        .filter(|(_, p)| !p.deleting)
        .map(|(uid, p)| DesiredPod {
            uid: uid.clone(),
            source: "control".to_owned(),
            pod: p.pod.clone(),
        })
        .collect()
}

/// A peer event as a route (None if its address or CIDR do not parse).
fn peer_route(p: &v1::PeerEvent) -> Option<PeerRoute> {
    Some(PeerRoute {
        cidr: p.pod_cidr.parse().ok()?,
        via: p.address.parse().ok()?,
    })
}

/// The events the policy state follows.
macro_rules! policy_event {
    () => {
        Event::Namespace(_) | Event::Identity(_) | Event::Policy(_) | Event::Ipcache(_)
    };
}

/// The state of one connection's initial list, until its Bookmark.
#[derive(Default)]
struct Listing {
    pods: BTreeMap<String, ControlPod>,
    peers: BTreeMap<String, PeerRoute>,
    services: ServiceTable,
    policy: super::policy::PolicyData,
}

/// How one connection's stream ended.
enum Ended {
    /// The agent is stopping.
    Cancelled,
    /// The control asked for a re-list.
    Resync,
    /// The stream broke or went silent.
    Lost,
}

/// Follows the node's stream until `cancel`.
pub(crate) async fn follow(sh: Arc<Shared>, cancel: CancellationToken) {
    let mut routes = match PeerRoutes::open(sh.assignment.pod_cidr) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "no routes to other nodes' pods");
            None
        }
    };
    let mut revision = 0u64;
    let mut delay = BACKOFF_INITIAL;
    loop {
        let mut nodes = sh.control.nodes.clone();
        let req = v1::WatchNodeRequest {
            node_name: sh.node().to_owned(),
            from_revision: revision,
        };
        let opened = tokio::select! {
            () = cancel.cancelled() => return,
            r = tokio::time::timeout(SILENCE, nodes.watch_node(req)) => r,
        };
        match opened {
            Ok(Ok(stream)) => {
                let mut stream = stream.into_inner();
                match consume(
                    &sh,
                    &mut stream,
                    &mut revision,
                    &mut delay,
                    routes.as_mut(),
                    &cancel,
                )
                .await
                {
                    Ended::Cancelled => return,
                    Ended::Resync => {
                        revision = 0;
                        continue;
                    }
                    Ended::Lost => {}
                }
            }
            Ok(Err(s)) => {
                tracing::warn!(error = %s.message(), retry_in = ?delay, "cannot watch the node; retrying");
            }
            Err(_) => tracing::warn!(retry_in = ?delay, "node watch did not open; retrying"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = next_backoff(delay);
    }
}

/// Applies one connection's events until it ends. A connection from
/// revision 0 first collects the full list up to its Bookmark.
async fn consume(
    sh: &Shared,
    stream: &mut tonic::Streaming<v1::NodeEvent>,
    revision: &mut u64,
    delay: &mut Duration,
    mut routes: Option<&mut PeerRoutes>,
    cancel: &CancellationToken,
) -> Ended {
    let mut listing = (*revision == 0).then(Listing::default);
    // Service events applied to the table, not yet programmed.
    let mut pending = Pending::default();
    loop {
        let ev = match next_event(sh, stream, &mut pending, cancel).await {
            Ok(ev) => ev,
            Err(ended) => return ended,
        };
        *delay = BACKOFF_INITIAL;
        if !matches!(ev.event, Some(Event::Service(_))) {
            pending.program(sh);
        }
        match (ev.event, listing.as_mut()) {
            (Some(Event::Resync(r)), _) => {
                tracing::warn!(reason = %r.reason, "control asks for a resync; re-listing");
                return Ended::Resync;
            }
            (Some(Event::Bookmark(_)), _) => {
                *revision = ev.revision;
                if let Some(list) = listing.take() {
                    // Policy first: pods started by the new list are
                    // enforced against the complete policy state.
                    sh.policy.replace(list.policy);
                    replace(sh, list.pods);
                    *sh.services
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = list.services;
                    sync_services(sh);
                    if let Some(r) = routes.as_deref_mut()
                        && let Err(e) = r.sync(&list.peers).await
                    {
                        tracing::warn!(error = %e, "cannot sync peer routes");
                    }
                }
            }
            (Some(Event::Pod(p)), Some(list)) => {
                if let Some((uid, pod)) = pod_of(&p) {
                    list.pods.insert(uid, pod);
                }
            }
            (Some(Event::Pod(p)), None) => {
                *revision = ev.revision;
                on_pod(sh, &p);
            }
            (Some(Event::Peer(p)), _) if p.node_name == sh.node() => {}
            (Some(Event::Peer(p)), Some(list)) => {
                if let Some(r) = peer_route(&p) {
                    list.peers.insert(p.node_name.clone(), r);
                }
            }
            (Some(Event::Peer(p)), None) => {
                *revision = ev.revision;
                on_peer(routes.as_deref_mut(), &p).await;
            }
            (Some(Event::Service(svc)), Some(list)) => {
                if let Err(e) = list.services.apply(&svc) {
                    tracing::error!(error = %e, "service from the control refused");
                }
            }
            (Some(Event::Service(svc)), None) => {
                *revision = ev.revision;
                let applied = sh
                    .services
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .apply_event(&svc);
                match applied {
                    Ok(a) => pending.add(a),
                    Err(e) => tracing::error!(error = %e, "service from the control refused"),
                }
            }
            (Some(pe @ policy_event!()), Some(list)) => {
                if let Err(e) = list.policy.apply(&pe) {
                    tracing::error!(error = %e, "policy event from the control refused");
                }
            }
            (Some(pe @ policy_event!()), None) => {
                *revision = ev.revision;
                if let Err(e) = sh.policy.apply(&pe) {
                    tracing::error!(error = %e, "policy event from the control refused");
                }
            }
            _ => {}
        }
    }
}

/// The connection's next event. In a burst, takes the events that have
/// already arrived and programs the pending service changes once nothing
/// more is waiting (or the batch is full), and before the stream ends.
async fn next_event(
    sh: &Shared,
    stream: &mut tonic::Streaming<v1::NodeEvent>,
    pending: &mut Pending,
    cancel: &CancellationToken,
) -> Result<v1::NodeEvent, Ended> {
    let ready = if pending.events > 0 && pending.events < SERVICE_BATCH {
        stream.message().now_or_never()
    } else {
        None
    };
    let got = if let Some(r) = ready {
        Ok(r)
    } else {
        pending.program(sh);
        tokio::select! {
            () = cancel.cancelled() => return Err(Ended::Cancelled),
            r = tokio::time::timeout(SILENCE, stream.message()) => r,
        }
    };
    match got {
        Ok(Ok(Some(ev))) => Ok(ev),
        Ok(Ok(None)) => {
            pending.program(sh);
            tracing::warn!("node watch ended; reconnecting");
            Err(Ended::Lost)
        }
        Ok(Err(s)) => {
            pending.program(sh);
            tracing::warn!(error = %s.message(), "node watch failed; reconnecting");
            Err(Ended::Lost)
        }
        Err(_) => {
            tracing::warn!("node watch silent for {SILENCE:?}; reconnecting");
            Err(Ended::Lost)
        }
    }
}

/// Service events applied to the table whose changes are not programmed
/// yet.
#[derive(Default)]
struct Pending {
    applied: Applied,
    events: usize,
}

impl Pending {
    fn add(&mut self, applied: Applied) {
        self.applied.merge(applied);
        self.events += 1;
    }

    /// Programs what the pending events changed, if anything.
    fn program(&mut self, sh: &Shared) {
        let p = std::mem::take(self);
        if p.applied.changed() {
            sync_changed_services(sh, &p.applied);
        }
    }
}

fn pod_of(p: &v1::PodEvent) -> Option<(String, ControlPod)> {
    let object = p.pod.as_ref()?;
    match control_pod(object) {
        Ok(x) => Some(x),
        Err(e) => {
            let name = object
                .meta
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            tracing::error!(pod = %name, error = %e, "pod from the control refused");
            None
        }
    }
}

/// Programs the load balancer with the service table (a diff: entries
/// that didn't change are not written), plus the local DNS service entry,
/// and refreshes the cluster DNS zone.
fn sync_services(sh: &Shared) {
    let (mut specs, nodeports, services, records) = {
        let t = sh
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (
            t.specs(),
            t.nodeport_specs(),
            t.len(),
            sh.dns.as_ref().map(|_| t.dns_records()),
        )
    };
    if let (Some(dns), Some(records)) = (&sh.dns, records) {
        dns.zone.set(records);
        specs.extend(dns.local_specs());
    }
    let Some(lb) = &sh.lb else { return };
    sync_nodeports(sh, lb, &nodeports);
    let started = std::time::Instant::now();
    let synced = lb.sync(&specs);
    crate::http::observe_lb_sync(lb.pin_dir(), started.elapsed());
    match synced {
        Ok(stats) => tracing::debug!(
            services,
            ports = specs.len(),
            took = ?started.elapsed(),
            ?stats,
            "service table programmed"
        ),
        Err(e) => tracing::error!(error = %e, "cannot program the service table"),
    }
}

/// Programs the `NodePort` maps (attaching the uplink programs the first
/// time a `NodePort` service shows up).
fn sync_nodeports(sh: &Shared, lb: &crate::lb::Dataplane, nodeports: &[crate::lb::NodePortSpec]) {
    let Ok(node_ip) = sh.control.settings.address.parse() else {
        tracing::error!(address = %sh.control.settings.address, "node address is not IPv4: NodePort services are not served");
        return;
    };
    if nodeports.is_empty() && !lb.nodeport_loaded() {
        return;
    }
    match lb.sync_nodeports(sh.node(), node_ip, nodeports) {
        Ok(stats) => tracing::debug!(
            ports = nodeports.len(),
            ?stats,
            "NodePort services programmed"
        ),
        Err(e) => tracing::error!(error = %e, "cannot program NodePort services"),
    }
}

/// Programs what one service event (or a burst of them) changed: only the
/// load balancer entries with the keys it touched (each resolved against
/// the whole table, then the local DNS entry, else removed), O(those
/// services); then the cluster DNS zone, refreshed only if its view changed.
fn sync_changed_services(sh: &Shared, applied: &Applied) {
    program_changed(sh, applied);
    // After the maps: the zone is rebuilt whole, O(services).
    if let Some(dns) = &sh.dns
        && applied.dns
    {
        let records = sh
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .dns_records();
        dns.zone.set(records);
    }
}

/// Programs the load balancer entries (and `NodePort` services) that
/// `applied` touched.
fn program_changed(sh: &Shared, applied: &Applied) {
    let Some(lb) = &sh.lb else { return };
    let changes: Vec<Change> = {
        let t = sh
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let local = sh.dns.as_ref().map(super::ClusterDns::local_specs);
        applied
            .lb_keys
            .iter()
            .map(|key| {
                t.spec_for(key)
                    .or_else(|| local.iter().flatten().find(|s| s.key() == *key))
                    .map_or(Change::Remove(*key), |s| Change::Put(s.clone()))
            })
            .collect()
    };
    if applied.nodeports {
        let nodeports = sh
            .services
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .nodeport_specs();
        sync_nodeports(sh, lb, &nodeports);
    }
    if changes.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let synced = lb.sync_changes(&changes);
    crate::http::observe_lb_sync(lb.pin_dir(), started.elapsed());
    match synced {
        Ok(stats) => tracing::debug!(
            changed = changes.len(),
            took = ?started.elapsed(),
            ?stats,
            "service change programmed"
        ),
        Err(e) => tracing::error!(error = %e, "cannot program a service change"),
    }
}

/// Replaces the desired set with a complete list.
fn replace(sh: &Shared, pods: BTreeMap<String, ControlPod>) {
    let killing: Vec<ControlPod> = {
        let mut d = sh.desired();
        let newly: Vec<ControlPod> = pods
            .iter()
            .filter(|(uid, p)| p.deleting && !d.pods.get(*uid).is_some_and(|o| o.deleting))
            .map(|(_, p)| p.clone())
            .collect();
        d.pods = pods;
        d.synced = true;
        newly
    };
    tracing::info!(
        pods = sh.desired().pods.len(),
        "desired pods listed from the control"
    );
    apply(sh, &killing);
}

/// One pod change.
fn on_pod(sh: &Shared, p: &v1::PodEvent) {
    let Some((uid, pod)) = pod_of(p) else { return };
    let mut killing = Vec::new();
    {
        let mut d = sh.desired();
        if p.r#type() == v1::EventType::Deleted {
            d.pods.remove(&uid);
        } else {
            let was_deleting = d.pods.get(&uid).is_some_and(|o| o.deleting);
            if pod.deleting && !was_deleting {
                killing.push(pod.clone());
            }
            // A recreated pod of the same name replaces the old one.
            d.pods
                .retain(|u, o| u == &uid || o.namespace != pod.namespace || o.name != pod.name);
            d.pods.insert(uid, pod);
        }
    }
    apply(sh, &killing);
}

/// Feeds the manager and wakes the reporter.
fn apply(sh: &Shared, killing: &[ControlPod]) {
    let desired = {
        let d = sh.desired();
        if !d.synced {
            return;
        }
        desired_pods(&d.pods)
    };
    for p in killing {
        if let Some(uid) = p.pod.metadata.uid.as_deref()
            && sh.mgr.has_worker(uid)
        {
            tracing::info!(pod = %format!("{}/{}", p.namespace, p.name), "pod marked for deletion; stopping it");
            events::send(
                &sh.control.objects,
                &p.pod,
                &events::killing(&p.pod),
                sh.node(),
            );
        }
    }
    sh.mgr.reconcile(&desired);
    sh.desired_changed.notify_one();
}

async fn on_peer(routes: Option<&mut PeerRoutes>, p: &v1::PeerEvent) {
    let Some(routes) = routes else { return };
    let result = if p.r#type() == v1::EventType::Deleted {
        routes.remove(&p.node_name).await
    } else if let Some(r) = peer_route(p) {
        routes.set(&p.node_name, r).await
    } else {
        tracing::warn!(node = %p.node_name, address = %p.address, cidr = %p.pod_cidr, "peer with an unusable address or CIDR");
        return;
    };
    if let Err(e) = result {
        tracing::warn!(node = %p.node_name, error = %e, "cannot change the route to a peer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: &str) -> v1::Object {
        v1::Object {
            meta: Some(v1::ObjectMeta {
                resource_version: 7,
                ..Default::default()
            }),
            json: json.to_owned(),
        }
    }

    #[test]
    fn control_pods_carry_uid_and_deletion_and_only_live_ones_are_desired() {
        let live = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","uid":"u1"},"spec":{"nodeName":"n1","containers":[{"name":"c","image":"busybox"}]}}"#;
        let (uid, p) = control_pod(&object(live)).unwrap();
        assert_eq!(
            (uid.as_str(), p.namespace.as_str(), p.name.as_str()),
            ("u1", "default", "a")
        );
        assert!(!p.deleting);
        assert_eq!(p.resource_version, 7);
        let dying = live
            .replace(
                "\"uid\":\"u1\"",
                "\"uid\":\"u2\",\"deletionTimestamp\":\"2030-01-01T00:00:00Z\"",
            )
            .replace("\"name\":\"a\"", "\"name\":\"b\"");
        let (uid2, p2) = control_pod(&object(&dying)).unwrap();
        assert!(p2.deleting);
        let set: BTreeMap<String, ControlPod> = [(uid, p), (uid2, p2)].into();
        let d = desired_pods(&set);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].uid, "u1");
        assert_eq!(d[0].source, "control");
        assert!(
            control_pod(&object(r#"{"metadata":{"name":"x"}}"#))
                .unwrap_err()
                .contains("uid")
        );
        assert!(control_pod(&object("nope")).is_err());
    }
}
