//! The agent's local state under `/var/lib/weir/<node>/`: one record per pod,
//! written (fsync + atomic rename) before the action it records, so an agent
//! killed at any line finds what it was doing.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

/// A state file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct StateError {
    what: &'static str,
    path: PathBuf,
    source: io::Error,
}

/// What the agent remembers of one container across restarts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerRecord {
    /// containerd container id.
    pub id: String,
    /// Times the container was restarted.
    pub restart_count: u32,
    /// Index into the back-off sequence (reset after a long healthy run).
    pub backoff_index: u32,
    /// Unix seconds the current run started, if running.
    pub started_at: Option<i64>,
    /// How the last run ended.
    pub last_terminated: Option<Terminated>,
    /// Whether the container finished for good (restart policy says no more).
    pub done: bool,
}

/// How a container run ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Terminated {
    /// Exit code (128 + signal when killed).
    pub exit_code: i32,
    /// Completed, Error, `OOMKilled`, `StartError`.
    pub reason: String,
    /// Detail, e.g. the start error.
    pub message: Option<String>,
    /// Unix seconds.
    pub started_at: Option<i64>,
    /// Unix seconds.
    pub finished_at: Option<i64>,
}

/// The pod's network, as set up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetRecord {
    /// Pod IP.
    pub ip: std::net::Ipv4Addr,
    /// Host-side veth.
    pub host_veth: String,
    /// Host-side veth ifindex (key of the traffic counters).
    pub host_ifindex: u32,
}

/// Everything the agent keeps about one pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodRecord {
    /// The pod uid.
    pub uid: String,
    /// The manifest it came from (file name in standalone mode).
    pub source: String,
    /// The validated pod (metadata + spec).
    pub pod: Pod,
    /// Unix seconds the agent first saw it.
    pub created_at: i64,
    /// Network, once set up.
    pub net: Option<NetRecord>,
    /// Containers by name.
    pub containers: BTreeMap<String, ContainerRecord>,
    /// Set before teardown starts: an agent restarted mid-teardown finishes
    /// it instead of running the pod again.
    #[serde(default)]
    pub terminating: bool,
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating) the state directory.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let pods = root.join("pods");
        std::fs::create_dir_all(&pods).map_err(|source| StateError {
            what: "create",
            path: pods,
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn pod_path(&self, uid: &str) -> PathBuf {
        self.root.join("pods").join(format!("{uid}.json"))
    }

    /// Writes a pod record durably.
    pub fn save(&self, rec: &PodRecord) -> Result<(), StateError> {
        let path = self.pod_path(&rec.uid);
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| StateError {
            what: "encode",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomic(&path, &bytes)
    }

    /// Removes a pod record; a missing one is fine.
    pub fn remove(&self, uid: &str) -> Result<(), StateError> {
        let path = self.pod_path(uid);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError {
                what: "remove",
                path,
                source,
            }),
        }
    }

    /// Loads every pod record; unreadable ones are reported and skipped.
    pub fn load_all(&self) -> Vec<PodRecord> {
        let dir = self.root.join("pods");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path).map(|b| serde_json::from_slice::<PodRecord>(&b)) {
                Ok(Ok(rec)) => out.push(rec),
                Ok(Err(e)) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable pod record");
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot read pod record");
                }
            }
        }
        out
    }
}

/// Writes `bytes` to `path` through a temp file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let err = |what, source| StateError {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(|e| err("create", e))?;
    f.write_all(bytes).map_err(|e| err("write", e))?;
    f.sync_all().map_err(|e| err("sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("rename", e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_remove() {
        let dir = std::env::temp_dir().join(format!("weir-state-test-{}", std::process::id()));
        let st = StateDir::open(&dir).expect("open state dir");
        let mut rec = PodRecord {
            uid: "u1".into(),
            source: "a.yaml".into(),
            pod: Pod::default(),
            created_at: 1,
            net: None,
            containers: BTreeMap::new(),
            terminating: false,
        };
        rec.containers.insert(
            "c".into(),
            ContainerRecord {
                id: "x-c".into(),
                restart_count: 2,
                ..Default::default()
            },
        );
        st.save(&rec).expect("save");
        let all = st.load_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].containers["c"].restart_count, 2);
        st.remove("u1").expect("remove");
        st.remove("u1").expect("remove twice");
        assert!(st.load_all().is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
