//! Standalone mode: the pods in a manifest directory are the node's desired
//! state, like kubelet's static pods. A new file starts its pods, a changed
//! file replaces them, a removed file stops them.
//!
//! A pod's uid is derived from its file and its content, so an unchanged
//! manifest keeps its pod across agent restarts and any change makes a new
//! pod. A file that becomes invalid is refused with one clear line and the
//! pods from its last valid version keep running: bad input loses nothing.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;

use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use weir_proto::manifest;

use crate::pod::{DesiredPod, Manager};

/// How often the directory is rescanned without a change notification
/// (inotify can overflow, and a directory may not support it).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// Rescan interval when inotify is unavailable.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

struct FileState {
    stamp: (SystemTime, u64),
    pods: Vec<DesiredPod>,
}

/// The manifest directory and what each file last yielded.
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    scanned: bool,
}

/// Stable uid of a pod from its source file, namespace/name and content.
pub fn pod_uid(source: &str, namespace: &str, name: &str, content: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [
        source.as_bytes(),
        b"\0",
        namespace.as_bytes(),
        b"\0",
        name.as_bytes(),
        b"\0",
        content,
    ] {
        h.update(part);
    }
    let d = h.finalize();
    let x = crate::pod::hex(&d[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

impl ManifestDir {
    /// A scanner of `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            scanned: false,
        }
    }

    /// Rescans the directory; returns the desired pods if anything changed.
    pub fn scan(&mut self) -> Option<Vec<DesiredPod>> {
        let mut seen = std::collections::HashSet::new();
        let mut changed = !self.scanned;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot read manifest directory");
                return None;
            }
        };
        let mut files: Vec<(PathBuf, (SystemTime, u64))> = entries
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                let name = path.file_name()?.to_str()?;
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if name.starts_with('.') || !matches!(ext, "yaml" | "yml" | "json") {
                    return None;
                }
                // One stat per file (following symlinks, as a reader would).
                let meta = std::fs::metadata(&path)
                    .ok()
                    .filter(std::fs::Metadata::is_file)?;
                Some((
                    path,
                    (
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        meta.len(),
                    ),
                ))
            })
            .collect();
        files.sort();
        for (path, stamp) in files {
            seen.insert(path.clone());
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let source = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match std::fs::read(&path) {
                Ok(bytes) => match parse_file(&source, &bytes) {
                    Ok(pods) => {
                        self.files.insert(path, FileState { stamp, pods });
                        changed = true;
                    }
                    Err(e) => {
                        tracing::error!("manifest refused: {e}");
                        // Keep the last valid pods of this file; remember the
                        // stamp so the error is reported once per change.
                        let pods = self.files.remove(&path).map(|f| f.pods).unwrap_or_default();
                        self.files.insert(path, FileState { stamp, pods });
                    }
                },
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read manifest");
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        changed |= before != self.files.len();
        self.scanned = true;
        changed.then(|| self.desired())
    }

    /// The desired pods; a namespace/name claimed by two files goes to the
    /// first file by name, and the other is refused.
    fn desired(&self) -> Vec<DesiredPod> {
        let mut out: Vec<DesiredPod> = Vec::new();
        for f in self.files.values() {
            for p in &f.pods {
                let key = crate::pod::pod_key(&p.pod);
                if let Some(first) = out.iter().find(|o| crate::pod::pod_key(&o.pod) == key) {
                    tracing::error!(
                        "manifest refused: {}: metadata.name: pod {key} is already defined in {}",
                        p.source,
                        first.source
                    );
                    continue;
                }
                out.push(p.clone());
            }
        }
        out
    }
}

fn parse_file(source: &str, bytes: &[u8]) -> Result<Vec<DesiredPod>, manifest::ManifestError> {
    let text = String::from_utf8_lossy(bytes);
    let docs = manifest::parse_documents(source, &text)?;
    let mut out = Vec::new();
    for doc in &docs {
        let valid = manifest::validate_pod(source, doc)?;
        for w in &valid.warnings {
            tracing::warn!("{source}: {w}");
        }
        let ns = valid
            .pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = valid.pod.metadata.name.clone().unwrap_or_default();
        let content = serde_json::to_vec(doc).unwrap_or_default();
        out.push(DesiredPod {
            uid: pod_uid(source, &ns, &name, &content),
            source: source.to_owned(),
            pod: valid.pod,
        });
    }
    Ok(out)
}

/// Wakes `notify` whenever an entry of `dir` changes (inotify, on a thread
/// of its own that blocks in read). Returns false if inotify is unavailable.
fn watch(dir: &Path, notify: Arc<Notify>) -> bool {
    use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify};
    let Ok(ino) = Inotify::init(InitFlags::IN_CLOEXEC) else {
        return false;
    };
    let flags = F::IN_CREATE
        | F::IN_DELETE
        | F::IN_MODIFY
        | F::IN_CLOSE_WRITE
        | F::IN_MOVED_TO
        | F::IN_MOVED_FROM
        | F::IN_ATTRIB;
    if ino.add_watch(dir, flags).is_err() {
        return false;
    }
    std::thread::Builder::new()
        .name("weir-manifests".into())
        .spawn(move || {
            while ino.read_events().is_ok() {
                notify.notify_one();
            }
        })
        .is_ok()
}

/// Follows the directory until `cancel`, reconciling pods on every change.
pub async fn run(dir: PathBuf, mgr: Manager, cancel: CancellationToken) {
    let mut scanner = ManifestDir::new(&dir);
    let notify = Arc::new(Notify::new());
    let interval = if watch(&dir, notify.clone()) {
        RESYNC_INTERVAL
    } else {
        tracing::warn!(dir = %dir.display(), "no inotify on the manifest directory; polling it");
        POLL_INTERVAL
    };
    loop {
        if let Some(desired) = tokio::task::block_in_place(|| scanner.scan()) {
            mgr.reconcile(&desired);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = notify.notified() => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: c\n    image: busybox\n";

    #[test]
    fn uid_is_stable_and_changes_with_content() {
        let a = pod_uid("a.yaml", "default", "web", b"x");
        assert_eq!(a, pod_uid("a.yaml", "default", "web", b"x"));
        assert_ne!(a, pod_uid("a.yaml", "default", "web", b"y"));
        assert_ne!(a, pod_uid("b.yaml", "default", "web", b"x"));
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn scan_adds_changes_removes_and_keeps_last_valid() {
        let dir = std::env::temp_dir().join(format!("weir-standalone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut s = ManifestDir::new(&dir);
        assert_eq!(s.scan().map(|d| d.len()), Some(0));
        std::fs::write(dir.join("web.yaml"), POD).expect("write");
        let d = s.scan().expect("changed");
        assert_eq!(d.len(), 1);
        let uid = d[0].uid.clone();
        assert!(s.scan().is_none(), "unchanged directory reports no change");
        // An invalid edit is refused; the last valid pod stays desired.
        std::fs::write(dir.join("web.yaml"), "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers: []\n  bogusField: 1\n")
            .expect("write");
        let kept = s.scan().unwrap_or_else(|| s.desired());
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].uid, uid);
        // A duplicate name in another file is refused.
        std::fs::write(
            dir.join("z.yaml"),
            POD.replace("image: busybox", "image: other"),
        )
        .expect("write");
        assert_eq!(s.scan().map(|d| d.len()), Some(1));
        std::fs::remove_file(dir.join("web.yaml")).expect("rm");
        std::fs::remove_file(dir.join("z.yaml")).expect("rm");
        assert_eq!(s.scan().map(|d| d.len()), Some(0));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
