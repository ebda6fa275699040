//! A private etcd (Debian's etcd-server, `/usr/bin/etcd`) on free loopback
//! ports, its data under a directory of its own, for tests of weir-control's
//! etcd store. It is killed and its directory removed when the value drops.

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{tail, wait_for};

const ETCD: &str = "/usr/bin/etcd";

/// One etcd process on 127.0.0.1.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    /// Its client port.
    pub client_port: u16,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("find a free loopback port")?
        .port())
}

impl Etcd {
    /// Starts a fresh etcd with its data and log under `dir` (emptied
    /// first) and waits until it answers `/health`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        if !Path::new(ETCD).exists() {
            bail!("{ETCD} is missing: apt-get install -y etcd-server (cargo xtask setup)");
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let child = Command::new(ETCD)
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start etcd")?;
        let me = Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            client_port,
        };
        wait_for("etcd healthy", Duration::from_secs(20), || {
            let (code, body) = crate::http_get(
                ([127, 0, 0, 1], client_port).into(),
                "/health",
                Duration::from_secs(2),
            )
            .ok()?;
            (code == 200 && body.contains("true")).then_some(())
        })
        .with_context(|| format!("etcd log tail:\n{}", tail(&me.log_text(), 20)))?;
        Ok(me)
    }

    /// weir-control's `--store` value for this etcd.
    pub fn store_url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// Whether it accepts connections.
    pub fn answers(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.client_port)).is_ok()
    }

    /// The number of keys etcd holds (its `etcd_debugging_mvcc_keys_total`
    /// metric), as an observer of what a client stored.
    pub fn keys(&self) -> anyhow::Result<u64> {
        let (code, body) = crate::http_get(
            ([127, 0, 0, 1], self.client_port).into(),
            "/metrics",
            Duration::from_secs(5),
        )?;
        if code != 200 {
            bail!("GET /metrics: {code}");
        }
        body.lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_keys_total "))
            .context("etcd_debugging_mvcc_keys_total missing from /metrics")?
            .trim()
            .parse::<f64>()
            .map(|k| {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a key count, printed as a float"
                )]
                let k = k as u64;
                k
            })
            .context("parse etcd_debugging_mvcc_keys_total")
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
