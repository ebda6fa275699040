//! A containerd with weir's own config and paths (cri plugin off, its own
//! root, state and socket), as `up`, `test` and the benchmarks start it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A containerd this process started; killed on drop unless detached.
pub struct Containerd {
    child: Option<Child>,
    /// Its gRPC socket.
    pub socket: PathBuf,
}

impl Containerd {
    /// Starts containerd with state under `dir`, content and snapshots under
    /// `root`, and waits until its socket answers.
    pub fn start(dir: &Path, root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{2}\"\n[ttrpc]\n  address = \"{2}.ttrpc\"\n",
                root.display(),
                dir.display(),
                socket.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        let me = Self {
            child: Some(child),
            socket,
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&me.socket).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "containerd did not answer on {} within 20 s",
                    me.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
    }

    /// Leaves containerd running after this process; returns its pid.
    pub fn detach(mut self) -> u32 {
        self.child.take().map_or(0, |c| c.id())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
