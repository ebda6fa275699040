//! Developer verbs for the weir workspace: `cargo xtask <command>`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod image;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Image(args) => image::run(&args),
    }
}

/// The workspace root (the parent of the xtask crate).
pub(crate) fn workspace_root() -> PathBuf {
    let xtask = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map_or(xtask.clone(), PathBuf::from)
}
