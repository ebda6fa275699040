//! A private etcd (Debian's etcd-server, `/usr/bin/etcd`) on loopback for
//! end-to-end tests and benchmarks of weir-control's etcd store: fresh data
//! directory, free ports, killed and removed on drop.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

const ETCD: &str = "/usr/bin/etcd";

/// One etcd process serving on `127.0.0.1:<client_port>`.
pub struct Etcd {
    dir: PathBuf,
    client_port: u16,
    child: Child,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts a fresh etcd with its data under `dir` and waits until it is
    /// healthy.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        if !Path::new(ETCD).exists() {
            bail!("{ETCD} is missing: apt-get install -y etcd-server (cargo xtask setup)");
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let client_port = free_port()?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{}", free_port()?);
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
        let mut etcd = Self {
            dir: dir.to_owned(),
            client_port,
            child,
        };
        let healthy = crate::wait_for("etcd healthy", Duration::from_secs(15), || {
            healthy(client_port).then_some(())
        });
        if let Err(e) = healthy {
            let log = std::fs::read_to_string(etcd.dir.join("etcd.log")).unwrap_or_default();
            etcd.kill();
            bail!("{e}\n{}", crate::tail(&log, 20));
        }
        Ok(etcd)
    }

    /// The client endpoint as weir-control's `--store` takes it:
    /// `etcd://127.0.0.1:<port>`.
    pub fn store_url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// The client endpoint, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether etcd's `/health` on `port` says it is healthy.
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
