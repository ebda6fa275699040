//! Leader election end to end: two weir-control processes on one private
//! etcd both serve the API, exactly one runs the controllers; a killed
//! (SIGKILL) leader is replaced within the lease TTL, a terminated (SIGTERM)
//! one resigns and is replaced at once.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use tonic::transport::Channel;
use weir_proto::v1::{ApplyRequest, ListRequest, objects_client::ObjectsClient};
use weir_tests::etcd::Etcd;

/// The lease TTL the controls run with.
const LEASE: Duration = Duration::from_secs(6);

/// A weir-control on the shared etcd; killed (SIGKILL) on drop.
struct Control {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Control {
    /// Starts weir-control `id` on a free port; waits until it listens.
    fn start(dir: &Path, id: &str, etcd: &Etcd) -> anyhow::Result<Self> {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        // One log per process (the port tells restarts apart).
        let log = dir.join(format!("{id}-{}.log", addr.port()));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(weir_tests::control_bin())
            .args(["--listen", &addr.to_string()])
            .args(["--store", &etcd.store_url()])
            .args(["--leader-id", id])
            .args(["--leader-lease", &format!("{}s", LEASE.as_secs())])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start weir-control")?;
        let control = Self { child, addr, log };
        weir_tests::wait_for("weir-control listening", Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).ok()
        })
        .with_context(|| format!("{id} log:\n{}", control.log_tail()))?;
        Ok(control)
    }

    fn log_tail(&self) -> String {
        weir_tests::tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 30)
    }

    async fn client(&self) -> anyhow::Result<ObjectsClient<Channel>> {
        Ok(ObjectsClient::connect(format!("http://{}", self.addr)).await?)
    }

    /// SIGKILLs it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERMs it and waits (bounded) for it to exit; whether it exited 0.
    fn terminate(&mut self, limit: Duration) -> anyhow::Result<bool> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {}", self.child.id());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            if start.elapsed() > limit {
                bail!("weir-control did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test's directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn deployment(name: &str, replicas: u32) -> String {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    })
    .to_string()
}

async fn apply(client: &mut ObjectsClient<Channel>, manifest: String) -> anyhow::Result<()> {
    client
        .apply(ApplyRequest {
            manifest_json: manifest,
            field_manager: "leader-e2e".into(),
        })
        .await?;
    Ok(())
}

async fn list(
    client: &mut ObjectsClient<Channel>,
    kind: &str,
    namespace: &str,
) -> anyhow::Result<Vec<Value>> {
    let items = client
        .list(ListRequest {
            kind: kind.into(),
            namespace: namespace.into(),
            label_selector: String::new(),
        })
        .await?
        .into_inner()
        .items;
    items
        .iter()
        .map(|o| serde_json::from_str(&o.json).context("object JSON"))
        .collect()
}

/// The messages of the `LeaderElection` events, oldest first.
async fn leader_events(client: &mut ObjectsClient<Channel>) -> anyhow::Result<Vec<String>> {
    let mut events: Vec<(String, String)> = list(client, "Event", "")
        .await?
        .into_iter()
        .filter(|e| e["reason"] == "LeaderElection")
        .map(|e| {
            (
                e["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
                    + e["metadata"]["name"].as_str().unwrap_or_default(),
                e["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    events.sort();
    Ok(events.into_iter().map(|(_, m)| m).collect())
}

/// (`ReplicaSets` owned by deployment `name`, live pods with `app=name`).
async fn counts(client: &mut ObjectsClient<Channel>, name: &str) -> anyhow::Result<(usize, usize)> {
    let sets = list(client, "ReplicaSet", "default")
        .await?
        .iter()
        .filter(|rs| rs["metadata"]["ownerReferences"][0]["name"] == name)
        .count();
    let pods = list(client, "Pod", "default")
        .await?
        .iter()
        .filter(|p| {
            p["metadata"]["labels"]["app"] == name && p["metadata"]["deletionTimestamp"].is_null()
        })
        .count();
    Ok((sets, pods))
}

/// Polls `f` every 100 ms until it is true; how long that took.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if f().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until deployment `name` has one `ReplicaSet` and `replicas` pods,
/// then checks for 2 s that no duplicate appears.
async fn created_once(
    client: &mut ObjectsClient<Channel>,
    name: &str,
    replicas: usize,
) -> anyhow::Result<()> {
    eventually(
        &format!("deployment {name}'s pods"),
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            async move { Ok(counts(&mut client, name).await? == (1, replicas)) }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = counts(client, name).await?;
    anyhow::ensure!(
        after == (1, replicas),
        "deployment {name}: (replicasets, pods) = {after:?}, want (1, {replicas})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_leader_runs_the_controllers_and_a_standby_takes_over() -> anyhow::Result<()> {
    let dir = TempDir(std::env::temp_dir().join(format!("weir-leader-e2e-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let etcd = Etcd::start(&dir.0.join("etcd"))?;
    let mut a = Control::start(&dir.0, "ctl-a", &etcd)?;
    let mut client_a = a.client().await?;
    eventually("ctl-a leads", Duration::from_secs(20), || {
        let mut c = client_a.clone();
        async move { Ok(leader_events(&mut c).await? == ["ctl-a became leader"]) }
    })
    .await
    .with_context(|| format!("ctl-a log:\n{}", a.log_tail()))?;

    // A second control serves the API but stands by.
    let mut b = Control::start(&dir.0, "ctl-b", &etcd)?;
    let mut client_b = b.client().await?;
    eventually("ctl-b standing by", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(&b.log).unwrap_or_default();
        async move { Ok(log.contains("standing by")) }
    })
    .await?;
    apply(&mut client_b, deployment("web", 3)).await?;
    created_once(&mut client_b, "web", 3).await?;
    assert_eq!(
        leader_events(&mut client_b).await?,
        ["ctl-a became leader"],
        "ctl-b must not lead while ctl-a holds the lease"
    );

    // SIGKILL the leader: the standby takes over once the lease expires.
    a.kill();
    let took = eventually("ctl-b leads", LEASE + Duration::from_secs(6), || {
        let mut c = client_b.clone();
        async move {
            Ok(leader_events(&mut c).await?.last().map(String::as_str)
                == Some("ctl-b became leader"))
        }
    })
    .await
    .with_context(|| format!("ctl-b log:\n{}", b.log_tail()))?;
    eprintln!("ctl-b took over {took:?} after ctl-a was killed (lease {LEASE:?})");
    apply(&mut client_b, deployment("api", 2)).await?;
    created_once(&mut client_b, "api", 2).await?;
    assert_eq!(counts(&mut client_b, "web").await?, (1, 3));

    // ctl-a comes back as a standby; SIGTERM the leader: it resigns, and
    // ctl-a takes over well before the lease could have expired.
    a = Control::start(&dir.0, "ctl-a", &etcd)?;
    client_a = a.client().await?;
    eventually("ctl-a standing by again", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(&a.log).unwrap_or_default();
        async move { Ok(log.contains("standing by")) }
    })
    .await?;
    let start = Instant::now();
    let clean = b.terminate(Duration::from_secs(15))?;
    assert!(
        clean,
        "ctl-b exited with an error on SIGTERM:\n{}",
        b.log_tail()
    );
    eventually("ctl-a leads again", Duration::from_secs(10), || {
        let mut c = client_a.clone();
        async move {
            Ok(leader_events(&mut c).await?.last().map(String::as_str)
                == Some("ctl-a became leader"))
        }
    })
    .await?;
    let took = start.elapsed();
    assert!(
        took < LEASE / 2,
        "ctl-a took over {took:?} after ctl-b's SIGTERM: ctl-b did not resign\nctl-b log:\n{}",
        b.log_tail()
    );
    assert!(
        std::fs::read_to_string(&b.log)?.contains("resigned leadership on shutdown"),
        "{}",
        b.log_tail()
    );
    apply(&mut client_a, deployment("jobs", 2)).await?;
    created_once(&mut client_a, "jobs", 2).await?;
    for (name, replicas) in [("web", 3), ("api", 2)] {
        assert_eq!(counts(&mut client_a, name).await?, (1, replicas), "{name}");
    }
    assert_eq!(
        leader_events(&mut client_a).await?,
        [
            "ctl-a became leader",
            "ctl-b became leader",
            "ctl-a became leader"
        ]
    );
    Ok(())
}
