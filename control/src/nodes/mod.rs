//! The `Nodes` gRPC service agents use: `Register` (the Node object and
//! the node's pod CIDR), `Heartbeat` (`Ready=True`), `WatchNode` (the pods
//! bound to the node, the routes to its peers, every Service, and what
//! network policy needs: policies, namespaces, identities and the
//! ipcache; resumable from a revision) and `ReportPodStatus` (status writes, and the final removal of
//! a pod marked for deletion once its node has torn it down).
//!
//! It works over the same [`ObjectsApi`] as users and controllers, so Node
//! and status writes get the API's validation and compare-and-swap; only
//! the watch and the final pod removal go to the store directly.

pub mod cidr;
pub mod filter;
pub mod node;
pub mod policy;
#[cfg(test)]
mod policy_tests;
pub mod services;
#[cfg(test)]
mod services_tests;
#[cfg(test)]
mod tests;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tonic::{Request, Response, Status};
use weir_proto::v1;
use weir_proto::v1::nodes_server::{Nodes, NodesServer};

pub use self::cidr::{Cidr, CidrError};
use self::filter::json_of;
pub use self::watch::NodeEventStream;
use crate::api::{ApiError, Kind, ObjectsApi};
use crate::store::Store;

/// How often a write is retried when another writer got there first.
const WRITE_ATTEMPTS: usize = 5;

/// The cluster-wide settings the service hands to agents.
#[derive(Debug, Clone)]
pub struct NodesConfig {
    /// The cluster's pod CIDR; node pod CIDRs are `/24`s of it.
    pub cluster_cidr: Cidr,
    /// The service CIDR, passed on to agents.
    pub service_cidr: Cidr,
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// How often a `WatchNode` stream sends a Bookmark.
    pub bookmark_interval: Duration,
}

impl Default for NodesConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: Cidr {
                addr: [10, 244, 0, 0].into(),
                prefix: 16,
            },
            service_cidr: Cidr {
                addr: [10, 96, 0, 0].into(),
                prefix: 16,
            },
            heartbeat_interval: Duration::from_secs(5),
            bookmark_interval: Duration::from_secs(10),
        }
    }
}

/// Why a `Nodes` call failed; each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    /// The request is invalid (`<field>: <reason>`).
    #[error("{0}")]
    Invalid(String),
    /// The node (or pod) is not known: the agent re-registers.
    #[error("{0}")]
    NotFound(String),
    /// The request does not apply to the object as it is now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No pod CIDR is left in the cluster CIDR.
    #[error("no free /24 left in cluster CIDR {0}")]
    Exhausted(Cidr),
    /// The API below failed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<NodesError> for Status {
    fn from(err: NodesError) -> Self {
        match err {
            NodesError::Invalid(m) => Status::invalid_argument(m),
            NodesError::NotFound(m) => Status::not_found(m),
            NodesError::FailedPrecondition(m) => Status::failed_precondition(m),
            e @ NodesError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
            NodesError::Api(e) => e.into(),
        }
    }
}

impl From<crate::store::StoreError> for NodesError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Api(ApiError::Store(e))
    }
}

/// The `Nodes` service over a shared API.
pub struct NodesService<S> {
    api: Arc<ObjectsApi<S>>,
    cfg: NodesConfig,
    /// Registrations one at a time, so two nodes never get one pod CIDR.
    register: tokio::sync::Mutex<()>,
}

/// The `Nodes` gRPC server over `api`, ready to add to a tonic router.
pub fn service<S: Store>(
    api: Arc<ObjectsApi<S>>,
    cfg: NodesConfig,
) -> NodesServer<NodesService<S>> {
    NodesServer::new(NodesService::new(api, cfg))
}

fn node_ref(name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: "v1".to_owned(),
        kind: "Node".to_owned(),
        namespace: String::new(),
        name: name.to_owned(),
    }
}

fn parse_json(what: &str, text: &str) -> Result<Value, NodesError> {
    serde_json::from_str(text)
        .map_err(|e| NodesError::Invalid(format!("{what}: invalid JSON: {e}")))
}

/// A node name must be a DNS-1123 subdomain (the key check enforces it).
fn check_node_name(name: &str) -> Result<(), NodesError> {
    if name.is_empty() {
        return Err(NodesError::Invalid("node_name: required".to_owned()));
    }
    Kind::Node
        .key("", name)
        .map(drop)
        .map_err(|e| NodesError::Invalid(format!("node_name: {e}")))
}

impl<S: Store> NodesService<S> {
    /// The service over `api` with the cluster settings `cfg`.
    pub fn new(api: Arc<ObjectsApi<S>>, cfg: NodesConfig) -> Self {
        Self {
            api,
            cfg,
            register: tokio::sync::Mutex::new(()),
        }
    }

    /// The Node object as JSON, if it exists.
    async fn node(&self, name: &str) -> Result<Option<(Value, u64)>, NodesError> {
        match self.api.get(&node_ref(name)).await {
            Ok(o) => {
                let rv = o.meta.as_ref().map_or(0, |m| m.resource_version);
                Ok(Some((parse_json("stored node", &o.json)?, rv)))
            }
            Err(ApiError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The node's pod CIDR: the one it has (if it lies in the cluster
    /// CIDR), else the lowest free `/24`.
    async fn pod_cidr(&self, name: &str, stored: Option<&Value>) -> Result<Cidr, NodesError> {
        let kept = stored
            .and_then(|s| s.pointer("/spec/podCIDR"))
            .and_then(Value::as_str)
            .and_then(|c| c.parse::<Cidr>().ok())
            .filter(|c| self.cfg.cluster_cidr.contains_net(*c));
        if let Some(c) = kept {
            return Ok(c);
        }
        let nodes = self
            .api
            .list(&v1::ListRequest {
                kind: "Node".to_owned(),
                ..Default::default()
            })
            .await?;
        let used: Vec<Cidr> = nodes
            .items
            .iter()
            .filter(|o| o.meta.as_ref().is_none_or(|m| m.name != name))
            .filter_map(|o| serde_json::from_str::<Value>(&o.json).ok())
            .filter_map(|j| j.pointer("/spec/podCIDR")?.as_str()?.parse().ok())
            .collect();
        cidr::allocate(self.cfg.cluster_cidr, &used)
            .ok_or(NodesError::Exhausted(self.cfg.cluster_cidr))
    }

    /// Creates or updates the Node object and returns the node's network
    /// assignment.
    pub async fn register(
        &self,
        req: &v1::RegisterRequest,
    ) -> Result<v1::RegisterResponse, NodesError> {
        check_node_name(&req.node_name)?;
        req.address.parse::<std::net::Ipv4Addr>().map_err(|_| {
            NodesError::Invalid(format!("address: {:?} is not an IPv4 address", req.address))
        })?;
        let _one_at_a_time = self.register.lock().await;
        let pod_cidr = self.write_spec(req).await?;
        self.write_status(&req.node_name, |stored| {
            node::registered_status(req, stored, &crate::api::now().to_string())
        })
        .await?;
        tracing::info!(node = %req.node_name, %pod_cidr, address = %req.address, "node registered");
        Ok(v1::RegisterResponse {
            pod_cidr: pod_cidr.to_string(),
            cluster_cidr: self.cfg.cluster_cidr.to_string(),
            service_cidr: self.cfg.service_cidr.to_string(),
            heartbeat_interval_ms: u64::try_from(self.cfg.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
        })
    }

    /// Marks the node Ready with a fresh heartbeat time (and its current
    /// resources); `NotFound` if the node is not registered.
    pub async fn heartbeat(&self, req: &v1::HeartbeatRequest) -> Result<(), NodesError> {
        check_node_name(&req.node_name)?;
        self.write_status(&req.node_name, |stored| {
            let mut status = stored.cloned().unwrap_or(Value::Null);
            node::set_ready(&mut status, &crate::api::now().to_string());
            if let Some(c) = &req.capacity {
                status["capacity"] = node::resources(c);
            }
            if let Some(a) = &req.allocatable {
                status["allocatable"] = node::resources(a);
            }
            status
        })
        .await
    }

    /// Applies the node's metadata and spec (read-modify-write with the
    /// resource version read, retried on conflict); returns its pod CIDR.
    async fn write_spec(&self, req: &v1::RegisterRequest) -> Result<Cidr, NodesError> {
        for _ in 0..WRITE_ATTEMPTS {
            let stored = self.node(&req.node_name).await?;
            let pod_cidr = self
                .pod_cidr(&req.node_name, stored.as_ref().map(|(j, _)| j))
                .await?;
            let mut manifest =
                node::manifest(req, stored.as_ref().map(|(j, _)| j), &pod_cidr.to_string());
            if let Some((_, rv)) = &stored {
                manifest["metadata"]["resourceVersion"] = Value::from(rv.to_string());
            }
            let applied = self
                .api
                .apply(&v1::ApplyRequest {
                    manifest_json: manifest.to_string(),
                    field_manager: "weir-nodes".to_owned(),
                })
                .await;
            match applied {
                Ok(_) => return Ok(pod_cidr),
                Err(ApiError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict {
            plural: "nodes",
            name: req.node_name.clone(),
        }
        .into())
    }

    /// Replaces the node's status with `f(stored status)`, compare-and-swap
    /// on the version read, retried on conflict; `NotFound` if the node is
    /// not registered.
    async fn write_status(
        &self,
        name: &str,
        f: impl Fn(Option<&Value>) -> Value,
    ) -> Result<(), NodesError> {
        let not_found =
            || NodesError::NotFound(format!("nodes \"{name}\" not found: register first"));
        for _ in 0..WRITE_ATTEMPTS {
            let Some((json, rv)) = self.node(name).await? else {
                return Err(not_found());
            };
            let status = f(json.get("status"));
            let written = self
                .api
                .update_status(&v1::UpdateStatusRequest {
                    r#ref: Some(node_ref(name)),
                    status_json: status.to_string(),
                    resource_version: rv,
                })
                .await;
            match written {
                Ok(_) => return Ok(()),
                Err(ApiError::Conflict { .. }) => {}
                Err(ApiError::NotFound { .. }) => return Err(not_found()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict {
            plural: "nodes",
            name: name.to_owned(),
        }
        .into())
    }

    /// The stream of `node`'s events from `from_revision` (see [`watch`]).
    pub fn watch_node(&self, req: &v1::WatchNodeRequest) -> Result<NodeEventStream, NodesError> {
        check_node_name(&req.node_name)?;
        Ok(watch::start(
            self.api.store().clone(),
            req.node_name.clone(),
            req.from_revision,
            self.cfg.bookmark_interval,
        ))
    }

    /// Writes a pod's reported status, or removes a pod marked for deletion
    /// once its node reports it terminated. The pod must still be the one
    /// the agent ran (same uid) and be bound to the reporting node.
    pub async fn report_pod_status(
        &self,
        req: &v1::ReportPodStatusRequest,
    ) -> Result<(), NodesError> {
        check_node_name(&req.node_name)?;
        let r = req
            .pod
            .as_ref()
            .ok_or_else(|| NodesError::Invalid("pod: required".to_owned()))?;
        if !r.kind.is_empty() && r.kind != "Pod" {
            return Err(NodesError::Invalid(format!(
                "pod.kind: {:?} is not Pod",
                r.kind
            )));
        }
        if req.uid.is_empty() {
            return Err(NodesError::Invalid("uid: required".to_owned()));
        }
        let key = Kind::Pod.key(&r.namespace, &r.name)?;
        let namespace = if r.namespace.is_empty() {
            "default"
        } else {
            r.namespace.as_str()
        };
        let reported = if req.terminated && req.status_json.is_empty() {
            None
        } else {
            Some(parse_json("status_json", &req.status_json)?)
        };
        for _ in 0..WRITE_ATTEMPTS {
            let Some(kv) = self.api.store().get(&key).await? else {
                if req.terminated {
                    return Ok(()); // already gone
                }
                return Err(NodesError::NotFound(format!(
                    "pods \"{}\" not found in namespace {namespace}",
                    r.name
                )));
            };
            let stored = json_of(&kv).ok_or_else(|| ApiError::Corrupt {
                key: key.clone(),
                reason: "not a JSON object".to_owned(),
            })?;
            check_pod(&stored, req)?;
            let marked = stored.pointer("/metadata/deletionTimestamp").is_some();
            if req.terminated && marked {
                // Through the API, so a Foreground owner or a terminating
                // namespace waiting for this pod is finished too.
                if self
                    .api
                    .remove_pod(namespace, &r.name, &req.uid)
                    .await?
                    .is_some()
                {
                    tracing::info!(pod = %format!("{namespace}/{}", r.name), node = %req.node_name, "pod terminated on its node; removed");
                }
                return Ok(());
            }
            let Some(reported) = &reported else {
                return Ok(());
            };
            let status = merge_status(stored.get("status"), reported.clone());
            if stored.get("status") == Some(&status) {
                return Ok(());
            }
            let write = self
                .api
                .update_status(&v1::UpdateStatusRequest {
                    r#ref: Some(v1::ObjectRef {
                        api_version: "v1".to_owned(),
                        kind: "Pod".to_owned(),
                        namespace: namespace.to_owned(),
                        name: r.name.clone(),
                    }),
                    status_json: status.to_string(),
                    resource_version: kv.mod_revision,
                })
                .await;
            match write {
                Ok(_) => return Ok(()),
                Err(ApiError::Conflict { .. } | ApiError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict {
            plural: "pods",
            name: r.name.clone(),
        }
        .into())
    }
}

/// A report applies only to the pod the agent ran, on the agent's node.
fn check_pod(stored: &Value, req: &v1::ReportPodStatusRequest) -> Result<(), NodesError> {
    let uid = stored
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if uid != req.uid {
        return Err(NodesError::FailedPrecondition(format!(
            "uid: the pod is now {uid:?}, not {:?} (it was deleted and recreated)",
            req.uid
        )));
    }
    let bound = filter::node_name(stored);
    if bound != req.node_name {
        return Err(NodesError::FailedPrecondition(format!(
            "node_name: the pod is bound to {bound:?}, not {:?}",
            req.node_name
        )));
    }
    Ok(())
}

/// The reported status, keeping the stored conditions of types the agent
/// does not report (e.g. the scheduler's).
fn merge_status(stored: Option<&Value>, mut reported: Value) -> Value {
    let kept: Vec<Value> = stored
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| {
            let kind = c.get("type");
            !reported
                .get("conditions")
                .and_then(Value::as_array)
                .is_some_and(|r| r.iter().any(|rc| rc.get("type") == kind))
        })
        .cloned()
        .collect();
    if !kept.is_empty() && reported.is_object() {
        if !reported.get("conditions").is_some_and(Value::is_array) {
            reported["conditions"] = Value::Array(Vec::new());
        }
        if let Some(conds) = reported["conditions"].as_array_mut() {
            conds.extend(kept);
        }
    }
    reported
}

#[tonic::async_trait]
impl<S: Store> Nodes for NodesService<S> {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        Ok(Response::new(
            Self::register(self, request.get_ref()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        Self::heartbeat(self, request.get_ref()).await?;
        Ok(Response::new(v1::HeartbeatResponse {}))
    }

    type WatchNodeStream = NodeEventStream;

    async fn watch_node(
        &self,
        request: Request<v1::WatchNodeRequest>,
    ) -> Result<Response<NodeEventStream>, Status> {
        Ok(Response::new(Self::watch_node(self, request.get_ref())?))
    }

    async fn report_pod_status(
        &self,
        request: Request<v1::ReportPodStatusRequest>,
    ) -> Result<Response<v1::ReportPodStatusResponse>, Status> {
        Self::report_pod_status(self, request.get_ref()).await?;
        Ok(Response::new(v1::ReportPodStatusResponse {}))
    }
}
