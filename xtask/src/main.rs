//! Developer verbs for the weir workspace: `cargo xtask <command>`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod bench;
mod codegen;
mod image;
mod setup;
mod up;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Developer verbs for the weir workspace")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the busybox OCI image tarball (target/images/busybox.tar).
    Image(image::ImageArgs),
    /// Install what a fresh machine lacks (apt packages, bpf-linker, rust-src).
    Setup,
    /// Bring up a three-node weir (weir-control with its embedded store, one
    /// weir-agent per node netns, one containerd) and run examples/ on it.
    Up,
    /// Tear down what `up` started.
    Down,
    /// Regenerate the checked-in gRPC code (proto/src/gen/) from
    /// proto/weir/v1/*.proto.
    Codegen,
    /// Set up, build, and run the whole test suite (unit and root e2e tests).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run a benchmark (release agent, own node and containerd) and print
    /// its `BENCH {json}` line.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Image(args) => image::run(&args),
        Cmd::Setup => setup::setup(),
        Cmd::Up => up::up(),
        Cmd::Down => {
            up::down();
            Ok(())
        }
        Cmd::Codegen => codegen::run(),
        Cmd::Test { args } => test(&args),
        Cmd::Bench(args) => bench::run(&args),
    }
}

/// Runs cargo with `args` in the workspace, failing if it fails.
pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| anyhow::anyhow!("run cargo {}: {e}", args.join(" ")))?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed: {status}",
        args.join(" ")
    );
    Ok(())
}

/// The whole suite: unit tests of every crate, the tests that need a
/// containerd (given a private one) or root (`#[ignore]`d in plain `cargo
/// test`), and the root e2e tests in tests/.
fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    cargo(&["build", "-p", "weir-agent", "-p", "weir-control"])?;
    image::build_busybox_image(&image::default_out_dir())?;
    let dir = std::env::temp_dir().join(format!("weir-xtask-test-{}", std::process::id()));
    let cd = weir_tests::Containerd::start(&dir)?;
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        "weir-ebpf",
        "--no-fail-fast",
    ];
    args.extend(extra.iter().map(String::as_str));
    // Ignored tests need root or a containerd, which this run provides;
    // `bench_*` ones are measurements, not tests, and stay out.
    args.extend(["--", "--include-ignored", "--skip", "bench_"]);
    let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo_bin)
        .args(&args)
        .current_dir(workspace_root())
        .env("WEIR_TEST_CONTAINERD_SOCK", &cd.socket)
        .status();
    // Dropping it ends containerd and its shims and removes the directory.
    drop(cd);
    let status = status.map_err(|e| anyhow::anyhow!("run cargo test: {e}"))?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed: {status}",
        args.join(" ")
    );
    Ok(())
}

/// The workspace root (the parent of the xtask crate).
pub(crate) fn workspace_root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map_or(xtask.clone(), PathBuf::from)
}
