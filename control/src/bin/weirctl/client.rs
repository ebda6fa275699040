//! The connection to weir-control: where it is (flag, `WEIR_SERVER`, the
//! config file, the default), the `Objects` calls weirctl makes, and the
//! server's errors printed the way kubectl prints them.

use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};
use weir_proto::v1::{
    self, ApplyRequest, DeleteRequest, ListRequest, ObjectRef, WatchRequest,
    objects_client::ObjectsClient,
};

use crate::resource::Resource;

/// Where weir-control listens when nothing says otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7443";

/// The server address: `--server`/`WEIR_SERVER` (already in `flag`), else
/// `server:` in `$XDG_CONFIG_HOME/weir/config` (or `~/.config/weir/config`),
/// else [`DEFAULT_SERVER`].
pub fn resolve_server(flag: Option<String>) -> anyhow::Result<String> {
    if let Some(s) = flag.filter(|s| !s.is_empty()) {
        return Ok(s);
    }
    if let Some(path) = config_path()
        && path.exists()
    {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read config {}", path.display()))?;
        if let Some(s) =
            server_from_config(&text).with_context(|| format!("config {}", path.display()))?
        {
            return Ok(s);
        }
    }
    Ok(DEFAULT_SERVER.to_owned())
}

fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEIRCONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("weir/config"))
}

/// `server:` of a config file (YAML), if set.
pub fn server_from_config(text: &str) -> anyhow::Result<Option<String>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_saphyr::from_str(text).context("invalid YAML")?;
    match v.get("server") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => anyhow::bail!("server: must be a string like http://host:7443, got {other}"),
    }
}

/// An error the server returned, printed as kubectl prints them:
/// `Error from server (NotFound): pods "x" not found`.
#[derive(Debug, thiserror::Error)]
#[error("{}", render_status(.server, .status))]
pub struct ServerError {
    /// The server's address, for connection errors.
    pub server: String,
    /// The gRPC status.
    pub status: tonic::Status,
}

impl ServerError {
    /// The gRPC code.
    pub fn code(&self) -> tonic::Code {
        self.status.code()
    }
}

fn render_status(server: &str, status: &tonic::Status) -> String {
    use tonic::Code;
    let reason = match status.code() {
        Code::Unavailable => {
            let host = server
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            return format!(
                "The connection to the server {host} was refused - did you specify the right host or port?"
            );
        }
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::Aborted | Code::FailedPrecondition => "Conflict",
        Code::InvalidArgument | Code::OutOfRange => "BadRequest",
        Code::PermissionDenied => "Forbidden",
        Code::Unauthenticated => "Unauthorized",
        Code::DeadlineExceeded => "Timeout",
        Code::Unimplemented => "MethodNotAllowed",
        _ => "InternalError",
    };
    format!("Error from server ({reason}): {}", status.message())
}

/// The `Objects` API as weirctl uses it: JSON in, JSON out.
#[derive(Clone)]
pub struct Api {
    client: ObjectsClient<Channel>,
    server: String,
}

/// An object as read: its JSON and resource version.
pub type Obj = Value;

impl Api {
    /// A client for `server`; connects on first use, so commands that fail
    /// before talking to the server never wait on it.
    pub fn new(server: &str) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(server.to_owned())
            .with_context(|| format!("invalid server address {server:?}"))?;
        Ok(Self {
            client: ObjectsClient::new(endpoint.connect_lazy()),
            server: server.to_owned(),
        })
    }

    fn err(&self, status: tonic::Status) -> anyhow::Error {
        ServerError {
            server: self.server.clone(),
            status,
        }
        .into()
    }

    /// One object, or `None` if it does not exist.
    pub async fn try_get(&self, r: Resource, ns: &str, name: &str) -> anyhow::Result<Option<Obj>> {
        match self.client.clone().get(object_ref(r, ns, name)).await {
            Ok(o) => Ok(Some(decode(&o.into_inner())?)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(self.err(s)),
        }
    }

    /// One object; NotFound is the server's error.
    pub async fn get(&self, r: Resource, ns: &str, name: &str) -> anyhow::Result<Obj> {
        match self.client.clone().get(object_ref(r, ns, name)).await {
            Ok(o) => decode(&o.into_inner()),
            Err(s) => Err(self.err(s)),
        }
    }

    /// Objects of a kind in `ns` (empty: all) matching `selector`, with the
    /// revision the list was read at.
    pub async fn list(
        &self,
        r: Resource,
        ns: &str,
        selector: &str,
    ) -> anyhow::Result<(Vec<Obj>, u64)> {
        let ns = if r.namespaced() { ns } else { "" };
        let resp = self
            .client
            .clone()
            .list(ListRequest {
                kind: r.kind().to_owned(),
                namespace: ns.to_owned(),
                label_selector: selector.to_owned(),
            })
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        let mut items = resp
            .items
            .iter()
            .map(decode)
            .collect::<anyhow::Result<Vec<_>>>()?;
        items.sort_by(|a, b| (ns_of(a), name_of(a)).cmp(&(ns_of(b), name_of(b))));
        Ok((items, resp.revision))
    }

    /// Applies one manifest; returns (the stored object, created).
    pub async fn apply(&self, manifest: &Value) -> anyhow::Result<(Obj, bool, Vec<String>)> {
        let resp = self
            .client
            .clone()
            .apply(ApplyRequest {
                manifest_json: manifest.to_string(),
                field_manager: "weirctl".to_owned(),
            })
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        let object = resp
            .object
            .as_ref()
            .map(decode)
            .transpose()?
            .unwrap_or(Value::Null);
        Ok((object, resp.created, resp.warnings))
    }

    /// Deletes one object; returns its last state.
    pub async fn delete(
        &self,
        r: Resource,
        ns: &str,
        name: &str,
        propagation: &str,
        grace: Option<i64>,
    ) -> anyhow::Result<Obj> {
        let resp = self
            .client
            .clone()
            .delete(DeleteRequest {
                r#ref: Some(object_ref(r, ns, name)),
                propagation: propagation.to_owned(),
                grace_period_seconds: grace,
            })
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        resp.object.as_ref().map_or(Ok(Value::Null), decode)
    }

    /// Follows changes after `from_revision`.
    pub async fn watch(
        &self,
        r: Resource,
        ns: &str,
        selector: &str,
        from_revision: u64,
    ) -> anyhow::Result<tonic::Streaming<v1::WatchEvent>> {
        let ns = if r.namespaced() { ns } else { "" };
        Ok(self
            .client
            .clone()
            .watch(WatchRequest {
                kind: r.kind().to_owned(),
                namespace: ns.to_owned(),
                label_selector: selector.to_owned(),
                from_revision,
            })
            .await
            .map_err(|s| self.err(s))?
            .into_inner())
    }

    /// Turns a status from a stream into the same error as a call's.
    pub fn stream_error(&self, status: tonic::Status) -> anyhow::Error {
        self.err(status)
    }
}

/// The reference to one object; cluster-scoped kinds drop the namespace.
pub fn object_ref(r: Resource, ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        api_version: r.api_version().to_owned(),
        kind: r.kind().to_owned(),
        namespace: if r.namespaced() {
            ns.to_owned()
        } else {
            String::new()
        },
        name: name.to_owned(),
    }
}

/// The JSON of an API object.
pub fn decode(o: &v1::Object) -> anyhow::Result<Obj> {
    serde_json::from_str(&o.json).with_context(|| {
        let name = o.meta.as_ref().map(|m| m.name.as_str()).unwrap_or_default();
        format!("decode object {name:?} from the server")
    })
}

/// `metadata.name`.
pub fn name_of(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

/// `metadata.namespace`.
pub fn ns_of(o: &Value) -> &str {
    o["metadata"]["namespace"].as_str().unwrap_or_default()
}

/// `metadata.uid`.
pub fn uid_of(o: &Value) -> &str {
    o["metadata"]["uid"].as_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_read_like_kubectl() {
        let e = ServerError {
            server: "http://127.0.0.1:7443".into(),
            status: tonic::Status::not_found("pods \"x\" not found"),
        };
        assert_eq!(
            e.to_string(),
            "Error from server (NotFound): pods \"x\" not found"
        );
        let e = ServerError {
            server: "http://127.0.0.1:7443".into(),
            status: tonic::Status::unavailable("tcp connect error"),
        };
        assert!(
            e.to_string()
                .starts_with("The connection to the server 127.0.0.1:7443 was refused")
        );
    }

    #[test]
    fn config_file_names_the_server() {
        assert_eq!(
            server_from_config("server: http://10.0.0.1:7443\n").expect("parse"),
            Some("http://10.0.0.1:7443".to_owned())
        );
        assert_eq!(server_from_config("").expect("empty"), None);
        assert!(server_from_config("server: [1]").is_err());
    }
}
