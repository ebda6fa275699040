//! The shared suite against `EtcdStore` on a real etcd (Debian's
//! etcd-server, `/usr/bin/etcd`), plus a crash test: etcd killed (SIGKILL) in
//! the middle of writes keeps every write it acknowledged.
//!
//! One etcd serves the whole test process: it is started on first use on a
//! free loopback port pair with its data under the temp dir, and it goes
//! when the process does (an `atexit` hook kills it and removes its
//! directory; should the process die by a signal instead, `PR_SET_PDEATHSIG`
//! kills etcd, and the next run removes the directories of dead test
//! processes). Each suite test writes under its own key prefix, but the
//! suite's bodies also assert exact store-wide revisions (`created + 1`, "a
//! failed txn reports the current revision", compaction points), which
//! another test writing to the same etcd at the same time would break, so
//! the suite tests take turns on it.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::EtcdStore;
use crate::store::tests::store_suite;
use crate::store::{Compare, Op, Store};

const ETCD: &str = "/usr/bin/etcd";
/// Directories of test etcds: `<temp>/weir-etcd-test-<pid>-<name>`.
const DIR_PREFIX: &str = "weir-etcd-test-";

/// One etcd process on loopback (the scheduler bench starts one too).
pub(crate) struct Etcd {
    /// Holds `data/` and `etcd.log`.
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Flags beyond the ones every test etcd gets.
    extra_args: Vec<String>,
    child: Option<Child>,
}

/// A free loopback port (the OS picks it; etcd binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes the directories of test etcds whose process is gone.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether process `pid` runs (a zombie has ended).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).is_ok_and(|stat| {
        // "pid (comm) S …": the state follows the last ')'.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Spawns `cmd` from a thread that never exits, so that the child's
/// parent-death signal fires when the test process ends and not when the
/// (short-lived) thread that asked for it does.
fn spawn_kept(mut cmd: Command) -> Child {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("etcd-parent".into())
        .spawn(move || {
            // SAFETY: prctl is async-signal-safe; nothing else runs between
            // fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                    Ok(())
                });
            }
            let _ = tx.send(cmd.spawn());
            loop {
                std::thread::park();
            }
        })
        .unwrap();
    rx.recv().unwrap().expect("spawn /usr/bin/etcd")
}

impl Etcd {
    /// Starts a fresh etcd named `name` and waits until it serves.
    fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts a fresh etcd named `name` with `extra_args` and waits until
    /// it serves.
    pub(crate) fn start_with(name: &str, extra_args: &[&str]) -> Self {
        remove_leftovers();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd = Self {
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        etcd.run();
        etcd
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts etcd on this data dir and ports, and waits until it serves.
    fn run(&mut self) {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: apt-get install -y etcd-server (cargo xtask setup)"
        );
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        let mut cmd = Command::new(ETCD);
        cmd.arg("--name=default")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = spawn_kept(cmd);
        self.child = Some(child);
        self.wait_healthy();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// Waits until etcd has a leader and answers `/health`.
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("etcd exited with {status}:\n{}", self.log());
            }
            if healthy(self.client_port) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy within 15 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs etcd and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether etcd's `/health` endpoint on `port` says it is healthy.
fn healthy(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    if conn
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

/// The process-wide etcd, stopped at exit by `stop_shared`.
static SHARED: Mutex<Option<Etcd>> = Mutex::new(None);
static SHARED_ENDPOINT: OnceLock<String> = OnceLock::new();

extern "C" fn stop_shared() {
    let etcd = SHARED.lock().unwrap_or_else(PoisonError::into_inner).take();
    drop(etcd);
}

/// The endpoint of the process-wide etcd, starting it on first use.
fn shared_endpoint() -> String {
    SHARED_ENDPOINT
        .get_or_init(|| {
            let etcd = Etcd::start("shared");
            let endpoint = etcd.endpoint();
            *SHARED.lock().unwrap() = Some(etcd);
            // SAFETY: registers a plain function with no preconditions.
            let rc = unsafe { libc::atexit(stop_shared) };
            assert_eq!(rc, 0, "atexit");
            endpoint
        })
        .clone()
}

/// Suite tests take turns on the shared etcd (see the module docs).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NEXT_PREFIX: AtomicU64 = AtomicU64::new(0);

/// A store on the shared etcd under a prefix no other test uses, and this
/// test's turn on it.
async fn open_shared() -> (tokio::sync::MutexGuard<'static, ()>, EtcdStore) {
    let endpoint = tokio::task::spawn_blocking(shared_endpoint).await.unwrap();
    let turn = TURN.lock().await;
    let prefix = format!("/suite-{}", NEXT_PREFIX.fetch_add(1, Ordering::Relaxed));
    let store = EtcdStore::connect(&[endpoint], &prefix).await.unwrap();
    (turn, store)
}

store_suite!(open_shared().await);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_namespaced_under_the_prefix() {
    let endpoint = tokio::task::spawn_blocking(shared_endpoint).await.unwrap();
    let a = EtcdStore::connect(std::slice::from_ref(&endpoint), "/ns-a")
        .await
        .unwrap();
    let b = EtcdStore::connect(std::slice::from_ref(&endpoint), "/ns-a2/")
        .await
        .unwrap();
    assert_eq!(b.key_prefix(), "/ns-a2");
    let put = |key: &str| Op::Put {
        key: key.into(),
        value: b"v".to_vec(),
    };
    assert!(a.txn(vec![], vec![put("/k")]).await.unwrap().succeeded);
    assert!(b.txn(vec![], vec![put("/k2")]).await.unwrap().succeeded);
    assert_eq!(a.get("/k").await.unwrap().unwrap().key, "/k");
    assert_eq!(b.get("/k").await.unwrap(), None);
    // "/ns-a" must not see "/ns-a2/…" in a list of everything.
    let (all, _) = a.list("").await.unwrap();
    let keys: Vec<_> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/k"]);
    let (all, _) = b.list("").await.unwrap();
    assert_eq!(all.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_fails_when_nothing_answers() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let err = EtcdStore::connect(&[endpoint], "/x")
        .await
        .err()
        .expect("no etcd there");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// etcd acknowledges a write once it is in its fsynced raft log: a SIGKILL
/// in the middle of a write burst loses none of the acknowledged ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_of_etcd() {
    let mut etcd = tokio::task::spawn_blocking(|| Etcd::start("crash"))
        .await
        .unwrap();
    let store = EtcdStore::connect(&[etcd.endpoint()], "/crash")
        .await
        .unwrap();
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (store, acked) = (store.clone(), Arc::clone(&acked));
            tokio::spawn(async move {
                for n in 0..5000 {
                    let key = format!("/w{w}/{n:05}");
                    let r = store
                        .txn(
                            vec![(key.clone(), Compare::Absent)],
                            vec![Op::Put {
                                key: key.clone(),
                                value: n.to_string().into_bytes(),
                            }],
                        )
                        .await;
                    match r {
                        Ok(r) => {
                            assert!(r.succeeded);
                            acked.lock().unwrap().push((key, r.revision));
                        }
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    // Let the writers get going, then kill etcd under them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while acked.lock().unwrap().len() < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    etcd.kill();
    for w in writers {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("writers stop once etcd is gone")
            .unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.len() >= 100,
        "only {} writes before the kill",
        acked.len()
    );
    drop(store);

    let etcd = tokio::task::spawn_blocking(move || {
        etcd.run();
        etcd
    })
    .await
    .unwrap();
    let store = EtcdStore::connect(&[etcd.endpoint()], "/crash")
        .await
        .unwrap();
    let (items, revision) = store.list("").await.unwrap();
    let max_acked = acked.iter().map(|(_, rev)| *rev).max().unwrap();
    assert!(revision >= max_acked);
    let stored: std::collections::HashMap<_, _> =
        items.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    for (key, rev) in &acked {
        let kv = stored
            .get(key)
            .unwrap_or_else(|| panic!("acknowledged write of {key} at {rev} lost"));
        assert_eq!(kv.mod_revision, *rev, "{key}");
        let n = key.rsplit('/').next().unwrap().parse::<u32>().unwrap();
        assert_eq!(kv.value, n.to_string().into_bytes(), "{key}");
    }
    drop(etcd);
}
