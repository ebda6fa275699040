//! Pod network namespaces: bind-mounted files under the node's netns
//! directory, and short-lived OS threads that work inside them.
//!
//! `setns()` and `unshare()` change only the calling thread, so each
//! operation runs on a fresh thread that exits afterwards; no thread of the
//! agent's runtime ever leaves the node netns.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::statfs::{NSFS_MAGIC, statfs};
use tokio::sync::oneshot;

use super::NetError;

/// Makes `dir` a mount point with shared propagation, as `ip netns` does with
/// /run/netns: netns bind mounts made later then also appear in (and are
/// unmounted from) mount namespaces copied from this one, so a mount
/// namespace created by a container runtime cannot pin a deleted pod netns.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), NetError> {
    let action = || format!("prepare netns directory {}", dir.display());
    fs::create_dir_all(dir).map_err(|e| NetError::io(action(), e))?;
    let make_shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself first.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| NetError::io(action(), e))?;
            make_shared().map_err(|e| NetError::io(action(), e))
        }
        Err(e) => Err(NetError::io(action(), e)),
    }
}

/// Whether `path` is a mounted network namespace (not just a leftover file).
pub(crate) fn is_netns(path: &Path) -> Result<bool, NetError> {
    match statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type() == NSFS_MAGIC),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(NetError::io(format!("stat netns {}", path.display()), e)),
    }
}

/// Creates a new, empty network namespace and bind-mounts it at `path`.
/// A plain file already at `path` (from a crash mid-way) is reused.
pub(crate) async fn create(path: &Path, pod: &str) -> Result<(), NetError> {
    let action = format!("create netns of pod {pod} at {}", path.display());
    let path = path.to_owned();
    on_thread(action.clone(), move || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| NetError::io(&action, e))?;
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetError::io(&action, e))?;
        // /proc/thread-self, not /proc/self: the new netns belongs to this
        // thread only.
        mount(
            Some("/proc/thread-self/ns/net"),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| NetError::io(&action, e))
    })
    .await
}

/// Unmounts (lazily) and removes the netns file at `path`. Missing is success.
pub(crate) fn remove(path: &Path, pod: &str) -> Result<(), NetError> {
    // A file mounted more than once (a crash between two bind mounts of an
    // earlier agent) needs one unmount per layer; bounded in case of a bug.
    for _ in 0..8 {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(e) => {
                return Err(NetError::io(
                    format!("unmount netns of pod {pod} at {}", path.display()),
                    e,
                ));
            }
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(NetError::io(
            format!("remove netns file of pod {pod} at {}", path.display()),
            e,
        )),
        _ => Ok(()),
    }
}

/// Runs `work` with a netlink handle whose socket lives in the netns at
/// `path`, on a dedicated thread with its own current-thread runtime.
pub(crate) async fn run_in<F, Fut, T>(path: &Path, action: String, work: F) -> Result<T, NetError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
    T: Send + 'static,
{
    let ns = File::open(path)
        .map_err(|e| NetError::io(format!("{action}: open netns {}", path.display()), e))?;
    on_thread(action.clone(), move || {
        setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::io(format!("{action}: enter netns"), e))?;
        drop(ns);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::io(format!("{action}: start runtime"), e))?;
        runtime.block_on(async {
            // The socket is created here, so it belongs to the pod netns.
            let (connection, handle, _) = rtnetlink::new_connection()
                .map_err(|e| NetError::io(format!("{action}: open netlink socket"), e))?;
            tokio::spawn(connection);
            work(handle).await
        })
    })
    .await
}

/// Runs `f` on a new OS thread that exits afterwards, so a thread whose
/// namespaces `f` changed is never reused.
async fn on_thread<T, F>(action: String, f: F) -> Result<T, NetError>
where
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("weir-netns".to_owned())
        .spawn(move || {
            // The receiver only goes away if the caller was cancelled.
            let _ = tx.send(f());
        })
        .map_err(|e| NetError::io(format!("{action}: spawn netns thread"), e))?;
    rx.await.map_err(|_| NetError::WorkerPanicked { action })?
}
