//! `WatchNode`: one node's desired state as a stream of events.
//!
//! From revision 0 the stream lists the pods bound to the node and every
//! routable node, every Service with its `EndpointSlice`, and what network
//! policy needs (namespaces, identities, policies, the ipcache; see
//! `policy.rs`), as ADDED, all at the list's revision, sends a Bookmark
//! to mark the end of that state, then follows one store watch on the whole store
//! from the list's revision, so nothing between the list and the watch is
//! missed. From any other revision it follows the watch from there. A
//! Bookmark with the last revision processed comes every bookmark interval;
//! a compacted revision ends the stream with a Resync.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;
use weir_proto::v1;

use super::filter::{self, NODES, PODS};
use super::policy;
use super::services::{self, Listed, SERVICES, SLICES};
use crate::store::{Store, StoreError, WatchReceiver};

/// Everything a node's stream draws on: pods, nodes and Services live
/// under `/core/`, `EndpointSlices` under `/discovery.k8s.io/`; one watch on
/// the whole store keeps them in revision order.
const WATCHED: &str = "/";
/// Events buffered between the stream's task and its client.
const BUFFER: usize = 256;

/// The events of one `WatchNode` call, ready to return from the service.
pub type NodeEventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::NodeEvent, Status>> + Send>>;

type Sender = mpsc::Sender<Result<v1::NodeEvent, Status>>;

#[expect(
    clippy::unnecessary_wraps,
    reason = "every item of the stream is a Result"
)]
fn event(revision: u64, e: v1::node_event::Event) -> Result<v1::NodeEvent, Status> {
    Ok(v1::NodeEvent {
        revision,
        event: Some(e),
    })
}

fn bookmark(revision: u64) -> Result<v1::NodeEvent, Status> {
    event(revision, v1::node_event::Event::Bookmark(v1::Bookmark {}))
}

fn resync(compacted: u64) -> Result<v1::NodeEvent, Status> {
    event(
        compacted,
        v1::node_event::Event::Resync(v1::Resync {
            reason: format!("compacted: relist (history before revision {compacted} is gone)"),
        }),
    )
}

/// Starts the stream of `node`'s events from `from_revision`.
pub fn start<S: Store>(
    store: Arc<S>,
    node: String,
    from_revision: u64,
    bookmark_every: Duration,
) -> NodeEventStream {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        if let Err(e) = run(&*store, &node, from_revision, bookmark_every, &tx).await {
            tracing::debug!(node, error = %e.message(), "node watch ended");
            let _ = tx.send(Err(e)).await;
        }
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Why the stream stopped: the client went away (not an error) or a
/// failure to pass on.
fn gone() -> Status {
    Status::cancelled("client gone")
}

async fn send(tx: &Sender, item: Result<v1::NodeEvent, Status>) -> Result<(), Status> {
    tx.send(item).await.map_err(|_| gone())
}

fn store_status(e: &StoreError) -> Status {
    Status::internal(format!("store: {e}"))
}

async fn run<S: Store>(
    store: &S,
    node: &str,
    from_revision: u64,
    bookmark_every: Duration,
    tx: &Sender,
) -> Result<(), Status> {
    let (rx, skip_nodes_until, start, listed) = if from_revision == 0 {
        let (pods, pods_at) = store.list(PODS).await.map_err(|e| store_status(&e))?;
        let (nodes, nodes_at) = store.list(NODES).await.map_err(|e| store_status(&e))?;
        for kv in &pods {
            if let Some(json) = filter::json_of(kv).filter(|p| filter::node_name(p) == node) {
                let pod = v1::PodEvent {
                    r#type: v1::EventType::Added.into(),
                    pod: Some(filter::object(json, kv.mod_revision)),
                };
                send(tx, event(pods_at, v1::node_event::Event::Pod(pod))).await?;
            }
        }
        for kv in &nodes {
            if let Some((node_name, address, pod_cidr)) =
                filter::json_of(kv).as_ref().and_then(filter::peer_of)
            {
                let peer = v1::PeerEvent {
                    r#type: v1::EventType::Added.into(),
                    node_name,
                    address,
                    pod_cidr,
                };
                send(tx, event(pods_at, v1::node_event::Event::Peer(peer))).await?;
            }
        }
        let (services, listed) = services::list(store).await.map_err(|e| store_status(&e))?;
        for s in services {
            send(tx, event(pods_at, v1::node_event::Event::Service(s))).await?;
        }
        let (policy_state, policy_listed) = policy::list(store, &pods)
            .await
            .map_err(|e| store_status(&e))?;
        for e in policy_state {
            send(tx, event(pods_at, e)).await?;
        }
        send(tx, bookmark(pods_at)).await?;
        let rx = watch(store, pods_at, tx).await?;
        (rx, nodes_at, pods_at, (listed, policy_listed))
    } else {
        let rx = watch(store, from_revision, tx).await?;
        (rx, 0, from_revision, Default::default())
    };
    let Some(rx) = rx else { return Ok(()) };
    let skip = Skip {
        nodes_until: skip_nodes_until,
        services: listed.0,
        policy: listed.1,
    };
    follow(store, rx, node, skip, start, bookmark_every, tx).await
}

/// The store watch from `revision`, or `None` after telling the client to
/// resync because that revision is compacted.
async fn watch<S: Store>(
    store: &S,
    revision: u64,
    tx: &Sender,
) -> Result<Option<WatchReceiver>, Status> {
    match store.watch(WATCHED, revision).await {
        Ok(rx) => Ok(Some(rx)),
        Err(StoreError::Compacted { compacted, .. }) => {
            send(tx, resync(compacted)).await?;
            Ok(None)
        }
        Err(e) => Err(store_status(&e)),
    }
}

/// What the initial list already holds: node events up to `nodes_until`,
/// service and slice events up to `services`' revisions, policy,
/// namespace and identity events up to `policy`'s.
#[derive(Debug, Clone, Copy)]
struct Skip {
    nodes_until: u64,
    services: Listed,
    policy: policy::Listed,
}

/// Passes on the watch's events for `node` (those the initial list already
/// holds are skipped), with bookmarks.
async fn follow<S: Store>(
    store: &S,
    mut rx: WatchReceiver,
    node: &str,
    skip: Skip,
    mut last: u64,
    bookmark_every: Duration,
    tx: &Sender,
) -> Result<(), Status> {
    let mut ticks = tokio::time::interval(bookmark_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = tx.closed() => return Ok(()),
            _ = ticks.tick() => send(tx, bookmark(last)).await?,
            got = rx.recv() => match got {
                None => return Err(Status::unavailable("store watch ended")),
                Some(Err(StoreError::Compacted { compacted, .. })) => {
                    return send(tx, resync(compacted)).await;
                }
                Some(Err(e)) => return Err(store_status(&e)),
                Some(Ok(ev)) => {
                    last = ev.revision();
                    let key = ev.kv.key.as_str();
                    // A pod's ipcache entry (every node's) and the pod (its node's).
                    for out in policy::events(&ev, skip.policy) {
                        send(tx, event(last, out)).await?;
                    }
                    let out = if key.starts_with(PODS) {
                        filter::pod_event(node, &ev).map(v1::node_event::Event::Pod)
                    } else if key.starts_with(NODES) {
                        (ev.revision() > skip.nodes_until)
                            .then(|| filter::peer_event(&ev))
                            .flatten()
                            .map(v1::node_event::Event::Peer)
                    } else if key.starts_with(SERVICES) || key.starts_with(SLICES) {
                        services::event(store, &ev, skip.services)
                            .await
                            .map_err(|e| store_status(&e))?
                            .map(v1::node_event::Event::Service)
                    } else {
                        None
                    };
                    if let Some(out) = out {
                        send(tx, event(last, out)).await?;
                    }
                }
            },
        }
    }
}
