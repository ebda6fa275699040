//! Pushes the agent's metric samples to the control: one
//! `MetricsReport` per sample on one long-lived `Metrics.Report` stream,
//! reconnecting with back-off when the stream fails or ends.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use weir_proto::v1::{self, metrics_client::MetricsClient};

use super::{BACKOFF_INITIAL, next_backoff};
use crate::metrics::{Sample, subscribe};

/// A stream that lived this long was healthy: the next failure retries
/// from [`BACKOFF_INITIAL`].
const HEALTHY: Duration = Duration::from_secs(10);

/// The report for one sample.
#[must_use]
pub fn report(s: &Sample) -> v1::MetricsReport {
    let node = &s.node_name;
    v1::MetricsReport {
        node_name: node.clone(),
        node: Some(v1::NodeMetrics {
            name: node.clone(),
            timestamp_ms: s.timestamp_ms,
            window_ms: s.window_ms,
            cpu_cores: s.node.cpu_cores,
            memory_working_set_bytes: s.node.memory_working_set_bytes,
            values: s.node.values.clone().into_iter().collect(),
        }),
        pods: s
            .pods
            .iter()
            .map(|p| v1::PodMetrics {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                node_name: node.clone(),
                timestamp_ms: s.timestamp_ms,
                window_ms: s.window_ms,
                cpu_cores: p.cpu_cores,
                memory_working_set_bytes: p.memory_working_set_bytes,
                containers: p
                    .containers
                    .iter()
                    .map(|c| v1::ContainerMetrics {
                        name: c.name.clone(),
                        cpu_cores: c.cpu_cores,
                        memory_working_set_bytes: c.memory_working_set_bytes,
                    })
                    .collect(),
                values: p.values.clone().into_iter().collect(),
            })
            .collect(),
    }
}

/// The reports of the samples made from now on, until `cancel`.
fn reports(cancel: CancellationToken) -> impl futures::Stream<Item = v1::MetricsReport> {
    let mut rx = subscribe();
    rx.mark_unchanged();
    futures::stream::unfold((rx, cancel), |(mut rx, cancel)| async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return None,
                r = rx.changed() => r.ok()?,
            }
            let s = rx.borrow_and_update().clone();
            if let Some(s) = s {
                return Some((report(&s), (rx, cancel)));
            }
        }
    })
}

/// Streams samples to the control on `channel` until `cancel`.
pub async fn push(channel: Channel, cancel: CancellationToken) {
    let mut delay = BACKOFF_INITIAL;
    loop {
        let started = Instant::now();
        let mut client = MetricsClient::new(channel.clone());
        let r = tokio::select! {
            () = cancel.cancelled() => return,
            r = client.report(reports(cancel.clone())) => r,
        };
        if cancel.is_cancelled() {
            return;
        }
        if started.elapsed() > HEALTHY {
            delay = BACKOFF_INITIAL;
        }
        match r {
            Ok(_) => {
                tracing::info!(retry_in = ?delay, "the control ended the metrics stream; reconnecting");
            }
            // A control without the Metrics service: say so quietly.
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::debug!(retry_in = ?delay, "the control does not serve Metrics; retrying later");
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), code = ?s.code(), retry_in = ?delay, "metrics stream to the control failed; reconnecting");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = next_backoff(delay);
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp, reason = "the values are exact in binary")]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use weir_proto::v1::metrics_server::{Metrics, MetricsServer};

    use super::*;

    /// A control that keeps the node names of the reports it gets and ends
    /// each stream after its first report (the agent must reconnect).
    #[derive(Clone, Default)]
    struct Control(Arc<Mutex<Vec<(usize, String)>>>, Arc<Mutex<usize>>);

    #[tonic::async_trait]
    impl Metrics for Control {
        async fn report(
            &self,
            request: tonic::Request<tonic::Streaming<v1::MetricsReport>>,
        ) -> Result<tonic::Response<v1::ReportMetricsResponse>, tonic::Status> {
            let stream_no = {
                let mut n = self.1.lock().expect("lock");
                *n += 1;
                *n
            };
            let mut s = request.into_inner();
            if let Some(r) = s.message().await? {
                self.0.lock().expect("lock").push((stream_no, r.node_name));
            }
            Ok(tonic::Response::new(v1::ReportMetricsResponse {}))
        }

        async fn list_pods(
            &self,
            _: tonic::Request<v1::ListPodMetricsRequest>,
        ) -> Result<tonic::Response<v1::ListPodMetricsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }

        async fn list_nodes(
            &self,
            _: tonic::Request<v1::ListNodeMetricsRequest>,
        ) -> Result<tonic::Response<v1::ListNodeMetricsResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }

    #[tokio::test]
    async fn samples_are_streamed_and_the_stream_reconnects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let control = Control::default();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| s);
            Some((conn, l))
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MetricsServer::new(control.clone()))
                .serve_with_incoming(incoming),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(push(channel, cancel.clone()));
        let got = || control.0.lock().expect("lock").clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut i = 0;
        while got().len() < 2 {
            assert!(Instant::now() < deadline, "reports got: {:?}", got());
            i += 1;
            crate::metrics::publish(Sample {
                node_name: format!("n{i}"),
                ..Sample::default()
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reports = got();
        assert_eq!(reports[0].0, 1, "{reports:?}");
        assert_eq!(reports[1].0, 2, "the second report came on a new stream");
        assert!(reports[0].1.starts_with('n') && reports[0].1 != reports[1].1);
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("push ends on cancel")
            .expect("push task");
    }
    use crate::metrics::{ContainerSample, NodeSample, PodSample};

    #[test]
    fn report_carries_every_reading() {
        let s = Sample {
            node_name: "n1".into(),
            timestamp_ms: 5,
            window_ms: 1000,
            node: NodeSample {
                cpu_cores: 1.5,
                memory_working_set_bytes: 7,
                values: BTreeMap::from([("weir_node_oom_kills".into(), 1.0)]),
            },
            pods: vec![PodSample {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                cpu_cores: 1.0,
                memory_working_set_bytes: 3,
                containers: vec![ContainerSample {
                    name: "c".into(),
                    cpu_cores: 1.0,
                    cpu_seconds: 9.0,
                    memory_working_set_bytes: 3,
                }],
                values: BTreeMap::from([("weir_pod_new_connections_per_second".into(), 4.0)]),
                ..PodSample::default()
            }],
        };
        let r = report(&s);
        assert_eq!(r.node_name, "n1");
        let node = r.node.expect("node");
        assert_eq!((node.cpu_cores, node.window_ms), (1.5, 1000));
        assert_eq!(node.values["weir_node_oom_kills"], 1.0);
        let p = &r.pods[0];
        assert_eq!((p.namespace.as_str(), p.node_name.as_str()), ("ns", "n1"));
        assert_eq!(p.values["weir_pod_new_connections_per_second"], 4.0);
        assert_eq!(p.containers[0].name, "c");
        assert_eq!(p.timestamp_ms, 5);
    }
}
