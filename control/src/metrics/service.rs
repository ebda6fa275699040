//! The `weir.v1.Metrics` gRPC service: agents stream their samples in
//! (`Report`), readers (`weirctl top`, dashboards) list the newest ones.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};
use weir_proto::v1::{
    self, ListNodeMetricsRequest, ListNodeMetricsResponse, ListPodMetricsRequest,
    ListPodMetricsResponse, MetricsReport, ReportMetricsResponse,
    metrics_server::{Metrics, MetricsServer},
};

use super::store::{MetricsStore, pod_key};
use crate::api::ObjectsApi;
use crate::store::Store;

/// The service: the metrics store, plus the API to read pod labels from
/// for label selectors.
pub struct MetricsService<S> {
    metrics: Arc<MetricsStore>,
    api: Arc<ObjectsApi<S>>,
}

/// The gRPC server of the `Metrics` service over `metrics`.
pub fn service<S: Store>(
    metrics: Arc<MetricsStore>,
    api: Arc<ObjectsApi<S>>,
) -> MetricsServer<MetricsService<S>> {
    MetricsServer::new(MetricsService { metrics, api })
}

impl<S: Store> MetricsService<S> {
    /// The keys of the pods in `namespace` (empty: all) whose stored labels
    /// match `selector`.
    async fn selected(&self, namespace: &str, selector: &str) -> Result<HashSet<String>, Status> {
        let listed = self
            .api
            .list(&v1::ListRequest {
                kind: "Pod".to_owned(),
                namespace: namespace.to_owned(),
                label_selector: selector.to_owned(),
            })
            .await?;
        Ok(listed
            .items
            .iter()
            .filter_map(|o| o.meta.as_ref())
            .map(|m| pod_key(&m.namespace, &m.name))
            .collect())
    }
}

#[tonic::async_trait]
impl<S: Store> Metrics for MetricsService<S> {
    async fn report(
        &self,
        request: Request<Streaming<MetricsReport>>,
    ) -> Result<Response<ReportMetricsResponse>, Status> {
        let mut reports = request.into_inner();
        let session = self.metrics.session();
        let mut node: Option<String> = None;
        let ended = loop {
            match reports.next().await {
                None => break Ok(()),
                Some(Err(status)) => break Err(status),
                Some(Ok(report)) => {
                    if report.node_name.is_empty() {
                        break Err(Status::invalid_argument("node_name: required"));
                    }
                    if node.as_deref().is_some_and(|n| n != report.node_name) {
                        break Err(Status::invalid_argument(format!(
                            "node_name: {:?}: this stream reports node {:?}",
                            report.node_name,
                            node.as_deref().unwrap_or_default()
                        )));
                    }
                    if node.is_none() {
                        tracing::debug!(node = %report.node_name, "metrics stream started");
                        node = Some(report.node_name.clone());
                    }
                    self.metrics.report(session, report);
                }
            }
        };
        if let Some(node) = &node {
            tracing::debug!(%node, "metrics stream ended");
            self.metrics.forget(session, node);
        }
        ended.map(|()| Response::new(ReportMetricsResponse {}))
    }

    async fn list_pods(
        &self,
        request: Request<ListPodMetricsRequest>,
    ) -> Result<Response<ListPodMetricsResponse>, Status> {
        let req = request.into_inner();
        let mut items = self.metrics.pods(&req.namespace);
        if !req.label_selector.trim().is_empty() {
            let selected = self.selected(&req.namespace, &req.label_selector).await?;
            items.retain(|p| selected.contains(&pod_key(&p.namespace, &p.name)));
        }
        Ok(Response::new(ListPodMetricsResponse { items }))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodeMetricsRequest>,
    ) -> Result<Response<ListNodeMetricsResponse>, Status> {
        Ok(Response::new(ListNodeMetricsResponse {
            items: self.metrics.nodes(),
        }))
    }
}
