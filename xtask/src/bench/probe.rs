//! Reachability measured from inside a node: a thread that has entered the
//! node's network namespace runs one async task per pod, each retrying a
//! TCP connect to the pod's IP:port every 5 ms until one succeeds. The
//! instant of that first success is the pod's "up" time.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::{env::Agent, util::enter_netns};

/// Pause between two connect attempts to the same pod.
const RETRY_EVERY: Duration = Duration::from_millis(5);
/// One attempt's bound (a local veth answers in microseconds; this only
/// matters when the kernel drops a SYN).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// How often the agent's pod list is read to learn new pod IPs.
pub(crate) const API_POLL_EVERY: Duration = Duration::from_millis(10);

/// A pod to probe: its index and address.
pub(crate) type Target = (usize, SocketAddr);

/// The probing thread.
pub(crate) struct Prober {
    tx: UnboundedSender<Target>,
    thread: JoinHandle<anyhow::Result<Vec<Option<Instant>>>>,
}

impl Prober {
    /// Starts probing from netns `netns` for `n` pods, whose addresses come
    /// through [`Prober::sender`]; gives up at `deadline`.
    pub fn start(netns: &Path, n: usize, deadline: Instant) -> anyhow::Result<Self> {
        let (tx, rx) = unbounded_channel();
        let netns = netns.to_path_buf();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bench-probe".into())
            .spawn(move || -> anyhow::Result<Vec<Option<Instant>>> {
                let entered = enter_netns(&netns);
                let failed = entered.as_ref().err().map(|e| format!("{e:#}"));
                let _ = ready_tx.send(failed);
                entered?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("probe runtime")?;
                Ok(rt.block_on(probe_all(rx, n, deadline)))
            })
            .context("spawn probe thread")?;
        match ready_rx.recv() {
            Ok(None) => Ok(Self { tx, thread }),
            Ok(Some(e)) => anyhow::bail!("probe thread: {e}"),
            Err(_) => anyhow::bail!("probe thread died"),
        }
    }

    /// Where pod addresses go.
    pub fn sender(&self) -> UnboundedSender<Target> {
        self.tx.clone()
    }

    /// Waits until every pod answered or the deadline passed; returns each
    /// pod's first successful connect (`None`: never).
    pub fn finish(self) -> anyhow::Result<Vec<Option<Instant>>> {
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
    }
}

async fn probe_all(
    mut rx: UnboundedReceiver<Target>,
    n: usize,
    deadline: Instant,
) -> Vec<Option<Instant>> {
    let deadline = tokio::time::Instant::from_std(deadline);
    let mut up = vec![None; n];
    let mut seen = vec![false; n];
    let mut tasks = tokio::task::JoinSet::new();
    let mut open = true;
    let mut answered = 0;
    while answered < n {
        tokio::select! {
            t = rx.recv(), if open => match t {
                Some((i, addr)) if i < n && !seen[i] => {
                    seen[i] = true;
                    tasks.spawn(probe_one(i, addr, deadline));
                }
                Some(_) => {}
                None => open = false,
            },
            r = tasks.join_next(), if !tasks.is_empty() => {
                if let Some(Ok((i, t))) = r {
                    up[i] = t;
                    answered += 1;
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
        if !open && tasks.is_empty() {
            break;
        }
    }
    up
}

async fn probe_one(
    i: usize,
    addr: SocketAddr,
    deadline: tokio::time::Instant,
) -> (usize, Option<Instant>) {
    while tokio::time::Instant::now() < deadline {
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr));
        if let Ok(Ok(_conn)) = attempt.await {
            return (i, Some(Instant::now()));
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    (i, None)
}

/// Reads the agent's pod list every [`API_POLL_EVERY`] and hands each new
/// pod IP of the pods named `<prefix><index>` to a [`Prober`].
pub(crate) struct IpWatcher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Option<Instant>>>,
}

impl IpWatcher {
    /// Starts watching for `n` pods listening on `port`, until every one
    /// has an IP, [`IpWatcher::stop`] or `deadline`.
    pub fn start(
        agent: &Agent,
        prefix: &'static str,
        n: usize,
        port: u16,
        to: UnboundedSender<Target>,
        deadline: Instant,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let api = agent.api();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-ipwatch".into())
            .spawn(move || {
                let mut found: Vec<Option<Instant>> = vec![None; n];
                let mut left = n;
                while left > 0 && !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                    for (i, ip) in pod_ips(api, prefix) {
                        if i < n && found[i].is_none() {
                            found[i] = Some(Instant::now());
                            left -= 1;
                            let _ = to.send((i, SocketAddr::from((ip, port))));
                        }
                    }
                    std::thread::sleep(API_POLL_EVERY);
                }
                found
            })
            .context("spawn IP watcher thread")?;
        Ok(Self { stop, thread })
    }

    /// Stops watching; returns when each pod's IP was first seen.
    pub fn stop(self) -> Vec<Option<Instant>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// (index, IP) of every pod named `<prefix><index>` that has an IP.
fn pod_ips(api: SocketAddr, prefix: &str) -> Vec<(usize, std::net::Ipv4Addr)> {
    let Ok((200, body)) = super::util::http_get(api, "/api/v1/pods", Duration::from_secs(2)) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return Vec::new();
    };
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let i = p["metadata"]["name"]
                .as_str()?
                .strip_prefix(prefix)?
                .parse()
                .ok()?;
            let ip = p["status"]["podIP"].as_str()?.parse().ok()?;
            Some((i, ip))
        })
        .collect()
}
