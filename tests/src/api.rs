//! A blocking client of weir-control's Objects API for the end-to-end
//! tests (the harness's waits are blocking), and accessors for the fields
//! of the JSON objects it returns.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use tonic::transport::Channel;
use weir_proto::v1::{self, objects_client::ObjectsClient};

use crate::wait_for;

/// A blocking Objects client.
pub struct Api {
    rt: tokio::runtime::Runtime,
    client: ObjectsClient<Channel>,
}

impl Api {
    /// A client of the control at `url` (connected lazily).
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let client = {
            let _guard = rt.enter();
            let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .connect_lazy();
            ObjectsClient::new(channel)
        };
        Ok(Self { rt, client })
    }

    /// Applies a manifest; returns the stored object.
    pub fn apply(&self, manifest: &Value) -> anyhow::Result<v1::Object> {
        let mut c = self.client.clone();
        let r = self.rt.block_on(c.apply(v1::ApplyRequest {
            manifest_json: manifest.to_string(),
            field_manager: "e2e".into(),
        }))?;
        r.into_inner()
            .object
            .ok_or_else(|| anyhow::anyhow!("apply returned no object"))
    }

    fn get_raw(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<v1::Object, tonic::Status> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.get(object_ref(kind, namespace, name)))
            .map(tonic::Response::into_inner)
    }

    /// An object's JSON, or None if it does not exist (or the control is
    /// unreachable).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let o = self.get_raw(kind, namespace, name).ok()?;
        serde_json::from_str(&o.json).ok()
    }

    /// Whether the control answers that the object does not exist.
    pub fn not_found(&self, kind: &str, namespace: &str, name: &str) -> bool {
        matches!(self.get_raw(kind, namespace, name), Err(s) if s.code() == tonic::Code::NotFound)
    }

    /// The objects of `kind` in `namespace` matching the label `selector`
    /// (empty: all).
    pub fn list(&self, kind: &str, namespace: &str, selector: &str) -> anyhow::Result<Vec<Value>> {
        let mut c = self.client.clone();
        let r = self.rt.block_on(c.list(v1::ListRequest {
            kind: kind.into(),
            namespace: namespace.into(),
            label_selector: selector.into(),
        }))?;
        Ok(r.into_inner()
            .items
            .iter()
            .filter_map(|o| serde_json::from_str(&o.json).ok())
            .collect())
    }

    /// Pods in `default` matching `selector` (terminating ones too).
    pub fn pods(&self, selector: &str) -> anyhow::Result<Vec<Value>> {
        self.list("Pod", "default", selector)
    }

    /// Deletes an object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> anyhow::Result<()> {
        let mut c = self.client.clone();
        self.rt.block_on(c.delete(v1::DeleteRequest {
            r#ref: Some(object_ref(kind, namespace, name)),
            ..Default::default()
        }))?;
        Ok(())
    }

    /// Waits until pod `name` (namespace default) satisfies `f`.
    pub fn wait_pod(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        wait_for(&format!("pod {name} in the control: {what}"), limit, || {
            self.get("Pod", "default", name).filter(|p| f(p))
        })
        .map_err(|e| {
            let last = self
                .get("Pod", "default", name)
                .map(|p| p["status"].to_string())
                .unwrap_or_default();
            e.context(format!("last status: {last}"))
        })
    }

    /// Waits (30 s each) until every node of `names` is `Ready` in the
    /// control.
    pub fn wait_nodes_ready(&self, names: &[String]) -> anyhow::Result<()> {
        for n in names {
            wait_for(&format!("node {n} Ready"), Duration::from_secs(30), || {
                self.get("Node", "", n)
                    .filter(|o| condition_status(o, "Ready") == "True")
            })?;
        }
        Ok(())
    }

    /// Waits until the control has pod `name` Running and Ready with an IP.
    pub fn wait_running(&self, name: &str, limit: Duration) -> anyhow::Result<(Value, Ipv4Addr)> {
        let p = self.wait_pod(name, "Running and Ready with a podIP", limit, |p| {
            p["status"]["phase"] == "Running"
                && p["status"]["podIP"].is_string()
                && condition_status(p, "Ready") == "True"
        })?;
        let ip = p["status"]["podIP"].as_str().unwrap_or_default().parse()?;
        Ok((p, ip))
    }
}

fn object_ref(kind: &str, namespace: &str, name: &str) -> v1::ObjectRef {
    v1::ObjectRef {
        api_version: String::new(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// `metadata.name`.
pub fn name(o: &Value) -> String {
    o["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `metadata.uid`.
pub fn uid(o: &Value) -> String {
    o["metadata"]["uid"].as_str().unwrap_or_default().to_owned()
}

/// The condition `kind` of an object.
pub fn condition<'a>(o: &'a Value, kind: &str) -> Option<&'a Value> {
    o["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// The status of condition `kind` of an object (empty if absent).
pub fn condition_status(o: &Value, kind: &str) -> String {
    condition(o, kind)
        .and_then(|c| c["status"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The `lastHeartbeatTime` of a node's `Ready` condition.
pub fn heartbeat(node: &Value) -> String {
    condition(node, "Ready")
        .and_then(|c| c["lastHeartbeatTime"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The addresses of an `EndpointSlice`'s endpoints whose `ready` condition
/// is true (absent counts as ready, as Kubernetes reads it).
pub fn ready_addresses(slice: &Value) -> Vec<String> {
    let mut out: Vec<String> = slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["conditions"]["ready"].as_bool().unwrap_or(true))
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}
