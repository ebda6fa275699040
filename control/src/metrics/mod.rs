//! Metrics: the in-memory store of the newest sample of every node and pod
//! ([`store`]), filled by the agents through the `weir.v1.Metrics` gRPC
//! service ([`service`]) and read by `weirctl top` and the
//! `HorizontalPodAutoscaler` controller; and weir-control's own
//! Prometheus `/metrics` ([`exporter`]).

pub mod exporter;
pub mod service;
pub mod store;

pub use self::service::{MetricsService, service};
pub use self::store::{MetricsStore, Session, Update, pod_key};
