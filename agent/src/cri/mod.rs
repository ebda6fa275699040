//! containerd: images, containers, tasks and the event stream.
//!
//! Everything goes through containerd's gRPC API in the agent's own
//! containerd namespace; the agent never runs `ctr`.

pub mod events;
pub mod image;
pub mod spec;

use std::{collections::HashMap, path::Path, time::Duration};

use containerd_client::{
    services::v1::{
        Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
        DeleteTaskRequest, GetRequest, KillRequest, ListContainersRequest, StartRequest,
        container::Runtime as ContainerRuntime,
        containers_client::ContainersClient,
        snapshots::{
            PrepareSnapshotRequest, RemoveSnapshotRequest, snapshots_client::SnapshotsClient,
        },
        tasks_client::TasksClient,
    },
    types::{Mount, v1::Status},
};
use prost_types::Any;
use tonic::{Code, Request, transport::Channel};

/// The snapshotter weir unpacks images for and runs containers on.
pub const SNAPSHOTTER: &str = "overlayfs";
/// The runtime every container runs with (runc through the v2 shim).
pub const RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// A failed containerd call, naming the call and the object it was about.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// containerd's socket could not be reached.
    #[error("connect to containerd at {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// A gRPC call failed.
    #[error("containerd {call} {id}: {}", .status.message())]
    Call {
        /// The call, e.g. "create task".
        call: &'static str,
        /// The container (or snapshot) it was about.
        id: String,
        /// The status containerd returned.
        status: tonic::Status,
    },
    /// The OCI spec could not be serialized.
    #[error("encode OCI spec for {id}: {source}")]
    Spec {
        /// The container.
        id: String,
        /// The serialization error.
        source: serde_json::Error,
    },
}

impl CriError {
    fn call(call: &'static str, id: &str, status: tonic::Status) -> Self {
        Self::Call {
            call,
            id: id.to_owned(),
            status,
        }
    }

    /// Whether containerd is unreachable (as opposed to refusing a request).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Call { status, .. } => status.code() == Code::Unavailable,
            Self::Spec { .. } => false,
        }
    }
}

/// What containerd says about a container's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// No task exists.
    Absent,
    /// Created but not started.
    Created,
    /// Running (or paused) with this pid.
    Running {
        /// The init process' pid.
        pid: u32,
    },
    /// Exited, not yet deleted.
    Stopped {
        /// The exit status.
        exit_status: u32,
        /// Unix seconds of the exit, if known.
        exited_at: Option<i64>,
    },
}

/// Connects to containerd's socket, lazily: the channel reconnects by itself,
/// so a containerd that restarts (or is not up yet) only fails calls.
pub fn connect(socket: &Path) -> Result<Channel, CriError> {
    let path = socket.to_path_buf();
    let endpoint = tonic::transport::Endpoint::try_from("http://[::]")
        .map_err(|source| CriError::Connect {
            socket: socket.display().to_string(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2));
    Ok(endpoint.connect_with_connector_lazy(tower_service(path)))
}

fn tower_service(
    path: std::path::PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_| {
        let path = path.clone();
        async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        }
    })
}

/// Wraps a message in a request for namespace `ns`.
pub fn request<T>(ns: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    if let Ok(v) = ns.parse() {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    req
}

/// Containers and tasks in one containerd namespace.
#[derive(Clone)]
pub struct Runtime {
    channel: Channel,
    ns: String,
}

/// What a container is created from.
pub struct ContainerParams<'a> {
    /// containerd container id (also the snapshot key).
    pub id: &'a str,
    /// Normalized image reference.
    pub image: &'a str,
    /// Labels to put on the container (pod identity, for adoption).
    pub labels: HashMap<String, String>,
    /// The OCI runtime spec (JSON).
    pub spec: serde_json::Value,
    /// Top snapshot chain id of the image.
    pub parent_snapshot: &'a str,
}

impl Runtime {
    /// A runtime for namespace `ns` over `channel`.
    pub fn new(channel: Channel, ns: impl Into<String>) -> Self {
        Self {
            channel,
            ns: ns.into(),
        }
    }

    /// The containerd namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The underlying channel.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }

    fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    /// Lists containers with their labels.
    pub async fn list_containers(
        &self,
    ) -> Result<Vec<(String, HashMap<String, String>)>, CriError> {
        let resp = self
            .containers()
            .list(request(&self.ns, ListContainersRequest { filters: vec![] }))
            .await
            .map_err(|s| CriError::call("list containers", &self.ns, s))?;
        Ok(resp
            .into_inner()
            .containers
            .into_iter()
            .map(|c| (c.id, c.labels))
            .collect())
    }

    /// Creates the container (if it does not exist yet) and prepares its
    /// rootfs snapshot (if not prepared yet); returns the rootfs mounts.
    ///
    /// The container is created before the snapshot so containerd's GC never
    /// sees an unreferenced active snapshot.
    pub async fn ensure_container(&self, p: &ContainerParams<'_>) -> Result<Vec<Mount>, CriError> {
        let spec = serde_json::to_vec(&p.spec).map_err(|source| CriError::Spec {
            id: p.id.to_owned(),
            source,
        })?;
        let container = Container {
            id: p.id.to_owned(),
            labels: p.labels.clone(),
            image: p.image.to_owned(),
            runtime: Some(ContainerRuntime {
                name: RUNTIME.to_owned(),
                options: None,
            }),
            spec: Some(Any {
                type_url: SPEC_TYPE_URL.to_owned(),
                value: spec,
            }),
            snapshotter: SNAPSHOTTER.to_owned(),
            snapshot_key: p.id.to_owned(),
            ..Default::default()
        };
        match self
            .containers()
            .create(request(
                &self.ns,
                CreateContainerRequest {
                    container: Some(container),
                },
            ))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(CriError::call("create container", p.id, s)),
        }
        let prepared = self
            .snapshots()
            .prepare(request(
                &self.ns,
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_owned(),
                    key: p.id.to_owned(),
                    parent: p.parent_snapshot.to_owned(),
                    labels: HashMap::new(),
                },
            ))
            .await;
        match prepared {
            Ok(r) => Ok(r.into_inner().mounts),
            Err(s) if s.code() == Code::AlreadyExists => self.mounts(p.id).await,
            Err(s) => Err(CriError::call("prepare snapshot", p.id, s)),
        }
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>, CriError> {
        use containerd_client::services::v1::snapshots::MountsRequest;
        let r = self
            .snapshots()
            .mounts(request(
                &self.ns,
                MountsRequest {
                    snapshotter: SNAPSHOTTER.to_owned(),
                    key: key.to_owned(),
                },
            ))
            .await
            .map_err(|s| CriError::call("snapshot mounts", key, s))?;
        Ok(r.into_inner().mounts)
    }

    /// Creates the container's task (its process is set up but not
    /// running) with stdout and stderr appended to `log`.
    pub async fn create_task(
        &self,
        id: &str,
        rootfs: Vec<Mount>,
        log: &Path,
    ) -> Result<(), CriError> {
        let uri = format!("file://{}", log.display());
        let created = self
            .tasks()
            .create(request(
                &self.ns,
                CreateTaskRequest {
                    container_id: id.to_owned(),
                    rootfs,
                    stdout: uri.clone(),
                    stderr: uri,
                    ..Default::default()
                },
            ))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(CriError::call("create task", id, s)),
        }
    }

    /// Starts a created task. Returns the pid.
    pub async fn start_task(&self, id: &str) -> Result<u32, CriError> {
        let started = self
            .tasks()
            .start(request(
                &self.ns,
                StartRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                },
            ))
            .await
            .map_err(|s| CriError::call("start task", id, s))?;
        Ok(started.into_inner().pid)
    }

    /// The state of the container's task.
    pub async fn task_state(&self, id: &str) -> Result<TaskState, CriError> {
        let r = self
            .tasks()
            .get(request(
                &self.ns,
                GetRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                },
            ))
            .await;
        let process = match r {
            Ok(r) => r.into_inner().process,
            Err(s) if s.code() == Code::NotFound => return Ok(TaskState::Absent),
            Err(s) => return Err(CriError::call("get task", id, s)),
        };
        let Some(p) = process else {
            return Ok(TaskState::Absent);
        };
        Ok(
            match Status::try_from(p.status).unwrap_or(Status::Unknown) {
                Status::Created => TaskState::Created,
                Status::Stopped => TaskState::Stopped {
                    exit_status: p.exit_status,
                    exited_at: p.exited_at.map(|t| t.seconds),
                },
                Status::Running | Status::Paused | Status::Pausing | Status::Unknown => {
                    TaskState::Running { pid: p.pid }
                }
            },
        )
    }

    /// Sends `signal` to the task's init process (or, with `all`, to every
    /// process of the container). A task that is gone is not an error.
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), CriError> {
        match self
            .tasks()
            .kill(request(
                &self.ns,
                KillRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                    signal,
                    all,
                },
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => Ok(()),
            Err(s) => Err(CriError::call("kill task", id, s)),
        }
    }

    /// Deletes a stopped task. `NotFound` is success.
    pub async fn delete_task(&self, id: &str) -> Result<(), CriError> {
        match self
            .tasks()
            .delete(request(
                &self.ns,
                DeleteTaskRequest {
                    container_id: id.to_owned(),
                },
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(CriError::call("delete task", id, s)),
        }
    }

    /// Deletes the container and its rootfs snapshot (the task must be
    /// gone). `NotFound` at any step is success.
    pub async fn delete_container(&self, id: &str) -> Result<(), CriError> {
        match self
            .containers()
            .delete(request(
                &self.ns,
                DeleteContainerRequest { id: id.to_owned() },
            ))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(CriError::call("delete container", id, s)),
        }
        match self
            .snapshots()
            .remove(request(
                &self.ns,
                RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_owned(),
                    key: id.to_owned(),
                },
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(CriError::call("remove snapshot", id, s)),
        }
    }
}

impl Runtime {
    /// Runs `args` in the container's running task (with the init process'
    /// environment, working directory and user, no stdio) and returns its
    /// exit status, or `None` if it did not finish within `timeout` (it is
    /// killed then). The exec'd process is always cleaned up.
    pub async fn exec(
        &self,
        id: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<Option<u32>, CriError> {
        use containerd_client::services::v1::{
            ExecProcessRequest, GetContainerRequest, WaitRequest,
        };
        let container = self
            .containers()
            .get(request(&self.ns, GetContainerRequest { id: id.to_owned() }))
            .await
            .map_err(|s| CriError::call("get container", id, s))?
            .into_inner()
            .container
            .and_then(|c| c.spec);
        let spec: serde_json::Value = container
            .and_then(|a| serde_json::from_slice(&a.value).ok())
            .unwrap_or_default();
        let mut process = spec["process"].clone();
        if !process.is_object() {
            process = serde_json::json!({ "cwd": "/", "user": { "uid": 0, "gid": 0 } });
        }
        process["args"] = serde_json::json!(args);
        process["terminal"] = serde_json::json!(false);
        let process = serde_json::to_vec(&process).map_err(|source| CriError::Spec {
            id: id.to_owned(),
            source,
        })?;
        let exec_id = format!("probe-{:016x}", rand_u64());
        self.tasks()
            .exec(request(
                &self.ns,
                ExecProcessRequest {
                    container_id: id.to_owned(),
                    exec_id: exec_id.clone(),
                    spec: Some(Any {
                        type_url: PROCESS_TYPE_URL.to_owned(),
                        value: process,
                    }),
                    ..Default::default()
                },
            ))
            .await
            .map_err(|s| CriError::call("exec", id, s))?;
        let result = async {
            self.tasks()
                .start(request(
                    &self.ns,
                    StartRequest {
                        container_id: id.to_owned(),
                        exec_id: exec_id.clone(),
                    },
                ))
                .await
                .map_err(|s| CriError::call("start exec", id, s))?;
            let mut tasks = self.tasks();
            let wait = tasks.wait(request(
                &self.ns,
                WaitRequest {
                    container_id: id.to_owned(),
                    exec_id: exec_id.clone(),
                },
            ));
            match tokio::time::timeout(timeout, wait).await {
                Ok(r) => r
                    .map(|r| Some(r.into_inner().exit_status))
                    .map_err(|s| CriError::call("wait exec", id, s)),
                Err(_) => Ok(None),
            }
        }
        .await;
        self.end_exec(id, exec_id, !matches!(result, Ok(Some(_))))
            .await;
        result
    }
}

impl Runtime {
    /// Kills (if `kill`) and removes an exec'd process.
    async fn end_exec(&self, id: &str, exec_id: String, kill: bool) {
        use containerd_client::services::v1::{DeleteProcessRequest, WaitRequest};
        if kill {
            let _ = self
                .tasks()
                .kill(request(
                    &self.ns,
                    KillRequest {
                        container_id: id.to_owned(),
                        exec_id: exec_id.clone(),
                        signal: 9,
                        all: false,
                    },
                ))
                .await;
            let mut tasks = self.tasks();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tasks.wait(request(
                    &self.ns,
                    WaitRequest {
                        container_id: id.to_owned(),
                        exec_id: exec_id.clone(),
                    },
                )),
            )
            .await;
        }
        let _ = self
            .tasks()
            .delete_process(request(
                &self.ns,
                DeleteProcessRequest {
                    container_id: id.to_owned(),
                    exec_id,
                },
            ))
            .await;
    }
}

/// A random number for exec ids (unique enough among one container's probes).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The parts of an image's config a container's process comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// ENTRYPOINT.
    pub entrypoint: Vec<String>,
    /// CMD.
    pub cmd: Vec<String>,
    /// `NAME=value` environment.
    pub env: Vec<String>,
    /// WORKDIR (empty if unset).
    pub working_dir: String,
}

impl Runtime {
    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, CriError> {
        use containerd_client::services::v1::{ReadContentRequest, content_client::ContentClient};
        use futures::StreamExt as _;
        let mut stream = ContentClient::new(self.channel.clone())
            .read(request(
                &self.ns,
                ReadContentRequest {
                    digest: digest.to_owned(),
                    offset: 0,
                    size: 0,
                },
            ))
            .await
            .map_err(|s| CriError::call("read content", digest, s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend(
                chunk
                    .map_err(|s| CriError::call("read content", digest, s))?
                    .data,
            );
        }
        Ok(out)
    }

    /// Reads an image's process config (image → manifest → config blob).
    pub async fn image_config(&self, image: &str) -> Result<ImageConfig, CriError> {
        use containerd_client::services::v1::{GetImageRequest, images_client::ImagesClient};
        let img = ImagesClient::new(self.channel.clone())
            .get(request(
                &self.ns,
                GetImageRequest {
                    name: image.to_owned(),
                },
            ))
            .await
            .map_err(|s| CriError::call("get image", image, s))?
            .into_inner()
            .image;
        let target = img
            .and_then(|i| i.target)
            .map(|t| t.digest)
            .unwrap_or_default();
        let bad = |what: &str| {
            CriError::call(
                "parse image",
                image,
                tonic::Status::invalid_argument(what.to_owned()),
            )
        };
        let manifest: serde_json::Value = serde_json::from_slice(&self.read_blob(&target).await?)
            .map_err(|_| bad("manifest is not JSON"))?;
        let cfg_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| bad("manifest has no config"))?;
        let cfg: serde_json::Value = serde_json::from_slice(&self.read_blob(cfg_digest).await?)
            .map_err(|_| bad("config is not JSON"))?;
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let c = &cfg["config"];
        Ok(ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

/// The process args Kubernetes runs: `command` replaces ENTRYPOINT, `args`
/// replaces CMD (and a `command` alone drops CMD).
pub fn process_args(command: &[String], args: &[String], image: &ImageConfig) -> Vec<String> {
    match (command.is_empty(), args.is_empty()) {
        (false, _) => command.iter().chain(args).cloned().collect(),
        (true, false) => image.entrypoint.iter().chain(args).cloned().collect(),
        (true, true) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn command_and_args_follow_kubernetes() {
        let img = ImageConfig {
            entrypoint: v(&["/ep"]),
            cmd: v(&["default"]),
            ..Default::default()
        };
        assert_eq!(process_args(&[], &[], &img), v(&["/ep", "default"]));
        assert_eq!(process_args(&[], &v(&["x"]), &img), v(&["/ep", "x"]));
        assert_eq!(process_args(&v(&["sh"]), &[], &img), v(&["sh"]));
        assert_eq!(
            process_args(&v(&["sh", "-c"]), &v(&["echo"]), &img),
            v(&["sh", "-c", "echo"])
        );
    }
}
