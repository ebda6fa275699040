//! Benchmarks whose body is an example of weir-tests (xtask does not link
//! the agent or the control; the examples have the cluster harness and
//! read pinned maps with aya): build the binaries and the example, run it
//! bounded in time, collect the one JSON line it prints at its end.

use std::{
    io::Read as _,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use serde_json::Value;

use super::util::signal;

/// How long an example gets to clean up after SIGTERM.
const CLEANUP: Duration = Duration::from_mins(2);

/// What to build and run.
pub(crate) struct Example<'a> {
    /// The example's name (`tests/examples/<name>.rs`).
    pub name: &'a str,
    /// Dev profile instead of release.
    pub dev: bool,
    /// Build weir-control too and hand it over in `WEIR_CONTROL_BIN`.
    pub control: bool,
    /// The example's arguments.
    pub args: Vec<String>,
    /// Bound on the whole run.
    pub limit: Duration,
}

/// The running example; SIGTERM (so it cleans up) if still running when
/// dropped, SIGKILL if it does not end within [`CLEANUP`].
struct Running(Option<Child>);

impl Running {
    fn wait(&mut self, what: &str, limit: Duration) -> anyhow::Result<ExitStatus> {
        let child = self.0.as_mut().context("example already reaped")?;
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.0 = None;
                return Ok(status);
            }
            if t0.elapsed() > limit {
                bail!("{what} ran over {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        signal(child.id(), Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < CLEANUP {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Example<'_> {
    /// The profile's name.
    pub fn profile(&self) -> &'static str {
        if self.dev { "dev" } else { "release" }
    }

    /// Builds the binaries, the example and the busybox image, runs the
    /// example (its progress on stderr) and returns its JSON line.
    pub fn run(&self) -> anyhow::Result<Value> {
        let release: &[&str] = if self.dev { &[] } else { &["--release"] };
        let build = |extra: &[&str]| {
            let mut args = vec!["build"];
            args.extend_from_slice(extra);
            args.extend_from_slice(release);
            crate::cargo(&args)
        };
        if self.control {
            build(&["-p", "weir-agent", "-p", "weir-control"])?;
        } else {
            build(&["-p", "weir-agent"])?;
        }
        build(&["-p", "weir-tests", "--example", self.name])?;
        crate::image::build_busybox_image(&crate::image::default_out_dir())?;
        let dir =
            crate::workspace_root()
                .join("target")
                .join(if self.dev { "debug" } else { "release" });
        let mut cmd = Command::new(dir.join("examples").join(self.name));
        cmd.args(&self.args)
            .env("WEIR_AGENT_BIN", dir.join("weir-agent"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if self.control {
            cmd.env("WEIR_CONTROL_BIN", dir.join("weir-control"));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("run the {} example", self.name))?;
        let mut running = Running(Some(child));
        let stdout = running
            .0
            .as_mut()
            .and_then(|c| c.stdout.take())
            .context("example stdout")?;
        // The example prints one line at its end: read it on a thread so
        // the wait below stays bounded.
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let mut stdout = stdout;
            stdout.read_to_string(&mut out).map(|_| out)
        });
        let status = running.wait(self.name, self.limit)?;
        let out = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the stdout reader panicked"))?
            .context("read the example's stdout")?;
        if !status.success() {
            bail!("{} failed ({status}); its log is above", self.name);
        }
        let line = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .with_context(|| format!("{} printed nothing", self.name))?;
        serde_json::from_str(line).with_context(|| format!("parse {} output {line:?}", self.name))
    }
}

/// The number at `pointer` in `v`; infinity (a missed target) when absent.
pub(crate) fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or(f64::INFINITY)
}

/// Whether every value of the object `met` is `true`.
pub(crate) fn all_met(met: &Value) -> bool {
    met.as_object()
        .is_some_and(|m| m.values().all(|v| v.as_bool() == Some(true)))
}

/// Prints the `BENCH` line: `line`'s fields followed by the judged ones
/// (`ratio`, `target`, `target_met_each`, `target_met`).
pub(crate) fn print_bench(mut line: Value, judged: &Value) {
    for k in ["ratio", "target", "target_met_each", "target_met"] {
        line[k] = judged[k].clone();
    }
    println!("BENCH {line}");
}
