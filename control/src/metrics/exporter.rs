//! weir-control's own `/metrics` (Prometheus text format): objects stored
//! per kind, pods bound to nodes (the scheduler's work), each
//! autoscaler's desired and current replicas, and the metrics reports
//! received per node. Computed at scrape time from the store and the
//! metrics store, so nothing in the write paths pays for it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use weir_proto::v1;

use super::MetricsStore;
use crate::api::{Kind, ObjectsApi};
use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HpaLabels {
    namespace: String,
    hpa: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

struct Sources<S> {
    api: Arc<ObjectsApi<S>>,
    metrics: Arc<MetricsStore>,
}

/// Serves `/metrics` on `listen` until `shutdown` resolves.
pub async fn serve<S: Store>(
    listen: SocketAddr,
    api: Arc<ObjectsApi<S>>,
    metrics: Arc<MetricsStore>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = Router::new()
        .route("/metrics", get(scrape::<S>))
        .with_state(Arc::new(Sources { api, metrics }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn scrape<S: Store>(State(sources): State<Arc<Sources<S>>>) -> Response {
    match render(&sources.api, &sources.metrics).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

async fn list<S: Store>(api: &ObjectsApi<S>, kind: Kind) -> Result<Vec<Value>, String> {
    let listed = api
        .list(&v1::ListRequest {
            kind: kind.name().to_owned(),
            namespace: String::new(),
            label_selector: String::new(),
        })
        .await
        .map_err(|e| format!("list {}: {e}", kind.plural()))?;
    Ok(listed
        .items
        .iter()
        .filter_map(|o| serde_json::from_str(&o.json).ok())
        .collect())
}

/// The exposition text.
pub async fn render<S: Store>(
    api: &ObjectsApi<S>,
    metrics: &MetricsStore,
) -> Result<String, String> {
    let mut reg = Registry::default();
    let objects = Family::<KindLabels, Gauge>::default();
    let bound = Gauge::<i64>::default();
    let desired = Family::<HpaLabels, Gauge>::default();
    let current = Family::<HpaLabels, Gauge>::default();
    let reports = Family::<NodeLabels, Counter>::default();
    let reporting = Gauge::<i64>::default();
    for kind in Kind::ALL {
        let items = list(api, kind).await?;
        objects
            .get_or_create(&KindLabels {
                kind: kind.name().to_owned(),
            })
            .set(i64::try_from(items.len()).unwrap_or(i64::MAX));
        match kind {
            Kind::Pod => {
                let n = items
                    .iter()
                    .filter(|p| {
                        p["spec"]["nodeName"]
                            .as_str()
                            .is_some_and(|n| !n.is_empty())
                    })
                    .count();
                bound.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            Kind::HorizontalPodAutoscaler => {
                for h in &items {
                    let labels = HpaLabels {
                        namespace: h["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        hpa: h["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    };
                    let status = &h["status"];
                    desired
                        .get_or_create(&labels)
                        .set(status["desiredReplicas"].as_i64().unwrap_or(0));
                    current
                        .get_or_create(&labels)
                        .set(status["currentReplicas"].as_i64().unwrap_or(0));
                }
            }
            _ => {}
        }
    }
    for (node, n) in metrics.reports_received() {
        reports.get_or_create(&NodeLabels { node }).inc_by(n);
    }
    reporting.set(i64::try_from(metrics.nodes().len()).unwrap_or(i64::MAX));
    reg.register("weir_control_objects", "Objects stored, per kind", objects);
    reg.register(
        "weir_control_pods_bound",
        "Pods bound to a node (spec.nodeName set)",
        bound,
    );
    reg.register(
        "weir_hpa_desired_replicas",
        "The replica count each HorizontalPodAutoscaler last asked for",
        desired,
    );
    reg.register(
        "weir_hpa_current_replicas",
        "The replicas each HorizontalPodAutoscaler's target has",
        current,
    );
    reg.register(
        "weir_control_metrics_reports",
        "Metrics reports received from each node's agent",
        reports,
    );
    reg.register(
        "weir_control_metrics_nodes",
        "Nodes whose metrics samples are fresh",
        reporting,
    );
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| format!("encode metrics: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    #[tokio::test]
    async fn renders_objects_hpas_and_reports() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Arc::new(RedbStore::open(dir.path().join("s.redb")).expect("store"));
        let api = ObjectsApi::new(store);
        api.ensure_default_namespaces().await.expect("namespaces");
        let hpa = serde_json::json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "maxReplicas": 3},
        });
        api.apply(&v1::ApplyRequest {
            manifest_json: hpa.to_string(),
            field_manager: "test".into(),
        })
        .await
        .expect("apply");
        let metrics = MetricsStore::new();
        metrics.report(
            metrics.session(),
            v1::MetricsReport {
                node_name: "n1".into(),
                ..v1::MetricsReport::default()
            },
        );
        let text = render(&api, &metrics).await.expect("render");
        assert!(
            text.contains("weir_control_objects{kind=\"HorizontalPodAutoscaler\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("weir_hpa_desired_replicas{namespace=\"default\",hpa=\"web\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("weir_control_metrics_reports_total{node=\"n1\"} 1"),
            "{text}"
        );
        assert!(text.contains("weir_control_metrics_nodes 1"), "{text}");
    }
}
