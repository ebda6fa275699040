//! The cluster service map: the `ServiceMap` gRPC service. Agents stream
//! their edges (`Report`, totals since each agent's start); the control
//! keeps every node's newest report in memory (no store writes), folding
//! an agent restart's counters into what it had counted ([`NodeEdges`]),
//! and `Get` merges them cluster-wide by (source, destination, port,
//! protocol) with pods named by their workload ([`resolve`]).
//!
//! A node's edges stay for [`NODE_TTL`] after its last report (a node
//! that is gone keeps its history visible for a while).

mod merge;
pub mod resolve;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};
use weir_proto::v1::{
    self,
    service_map_server::{ServiceMap, ServiceMapServer},
};

pub use self::merge::{EndKey, NodeEdges, RawKey, Totals, merge};
use crate::api::ObjectsApi;
use crate::store::Store;

/// How long a node's edges are kept after its last report.
pub const NODE_TTL: Duration = Duration::from_hours(1);

/// Most edges one report may carry (an agent keeps at most 10 000).
const MAX_REPORT_EDGES: usize = 50_000;

struct Node {
    edges: NodeEdges,
    reported: Instant,
}

/// The `ServiceMap` service.
pub struct ServiceMapService<S: Store> {
    api: Arc<ObjectsApi<S>>,
    nodes: Mutex<HashMap<String, Node>>,
    resolver: tokio::sync::Mutex<resolve::Resolver>,
}

/// The gRPC server for the service map over `api`'s store.
pub fn service<S: Store>(api: Arc<ObjectsApi<S>>) -> ServiceMapServer<ServiceMapService<S>> {
    ServiceMapServer::new(ServiceMapService::new(api))
}

impl<S: Store> ServiceMapService<S> {
    /// A service with no reports yet.
    pub fn new(api: Arc<ObjectsApi<S>>) -> Self {
        Self {
            api,
            nodes: Mutex::new(HashMap::new()),
            resolver: tokio::sync::Mutex::new(resolve::Resolver::default()),
        }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Node>> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one node's report.
    pub fn take_report(&self, report: &v1::EdgeReport) -> Result<(), Status> {
        if report.node_name.is_empty() {
            return Err(Status::invalid_argument("EdgeReport.node_name: empty"));
        }
        if report.edges.len() > MAX_REPORT_EDGES {
            return Err(Status::invalid_argument(format!(
                "EdgeReport.edges: {} edges, at most {MAX_REPORT_EDGES}",
                report.edges.len()
            )));
        }
        let mut nodes = self.nodes();
        let now = Instant::now();
        nodes.retain(|_, n| now.duration_since(n.reported) < NODE_TTL);
        let node = nodes
            .entry(report.node_name.clone())
            .or_insert_with(|| Node {
                edges: NodeEdges::default(),
                reported: now,
            });
        node.edges.update(&report.edges);
        node.reported = now;
        Ok(())
    }

    /// The merged map, edges with an end in `namespace` (empty: all).
    pub async fn map(&self, namespace: &str) -> Vec<v1::Edge> {
        let snapshot: Vec<NodeEdges> = self.nodes().values().map(|n| n.edges.clone()).collect();
        let ends: BTreeSet<EndKey> = snapshot.iter().flat_map(NodeEdges::ends).cloned().collect();
        let names = self.resolver.lock().await.names(&self.api, &ends).await;
        merge(&snapshot, &names, namespace)
    }
}

#[tonic::async_trait]
impl<S: Store> ServiceMap for ServiceMapService<S> {
    async fn report(
        &self,
        request: Request<Streaming<v1::EdgeReport>>,
    ) -> Result<Response<v1::ReportEdgesResponse>, Status> {
        let mut stream = request.into_inner();
        while let Some(next) = stream.next().await {
            self.take_report(&next?)?;
        }
        Ok(Response::new(v1::ReportEdgesResponse {}))
    }

    async fn get(
        &self,
        request: Request<v1::GetServiceMapRequest>,
    ) -> Result<Response<v1::GetServiceMapResponse>, Status> {
        let edges = self.map(&request.get_ref().namespace).await;
        Ok(Response::new(v1::GetServiceMapResponse { edges }))
    }
}
