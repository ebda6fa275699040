//! `cargo xtask codegen`: the Rust for weir's gRPC API, generated from
//! `proto/weir/v1/*.proto` by tonic-prost-build and checked in under
//! `proto/src/gen/` (no build.rs, so building weir needs no protoc). A test
//! here regenerates into a temporary directory and fails on drift.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Regenerates the checked-in code in `proto/src/gen/`.
pub fn run() -> anyhow::Result<()> {
    let out_dir = checked_in_dir();
    generate(&out_dir)?;
    println!("generated {}", out_dir.display());
    Ok(())
}

/// The directory the generated code is checked in to.
fn checked_in_dir() -> PathBuf {
    crate::workspace_root().join("proto/src/gen")
}

/// The include root of the `.proto` files (imports are relative to it).
fn proto_root() -> PathBuf {
    crate::workspace_root().join("proto")
}

/// The `.proto` files to compile, sorted so the output doesn't depend on
/// directory order.
fn proto_files() -> anyhow::Result<Vec<PathBuf>> {
    let dir = proto_root().join("weir/v1");
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "proto") {
            files.push(path);
        }
    }
    anyhow::ensure!(!files.is_empty(), "no .proto files in {}", dir.display());
    files.sort();
    Ok(files)
}

/// The generated `.rs` files directly in `dir`, sorted.
fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Generates the messages, clients and servers of `proto/weir/v1/*.proto`
/// into `out_dir` (one file per package, named as tonic-prost-build names
/// it, e.g. `weir.v1.rs`), replacing any `.rs` files already there so a
/// removed package leaves nothing stale. The output is formatted by
/// prettyplease and depends only on the `.proto` files and the generator's
/// version.
pub fn generate(out_dir: &Path) -> anyhow::Result<()> {
    let protos = proto_files()?;
    fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    for stale in rust_files(out_dir)? {
        fs::remove_file(&stale).with_context(|| format!("remove {}", stale.display()))?;
    }
    let include = proto_root();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_protos(&protos, std::slice::from_ref(&include))
        .context("compile proto/weir/v1/*.proto (is protoc installed? `cargo xtask setup`)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names and contents of the `.rs` files in `dir`.
    fn snapshot(dir: &Path) -> Vec<(String, String)> {
        rust_files(dir)
            .unwrap()
            .into_iter()
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let text = fs::read_to_string(&p).unwrap();
                (name, text)
            })
            .collect()
    }

    /// The checked-in generated code is what `cargo xtask codegen` makes of
    /// the `.proto` files today.
    #[test]
    fn generated_code_is_up_to_date() {
        let tmp = tempfile::tempdir().unwrap();
        generate(tmp.path()).unwrap();
        let fresh = snapshot(tmp.path());
        let checked_in = snapshot(&checked_in_dir());
        assert!(!fresh.is_empty(), "the generator produced no files");

        let names = |s: &[(String, String)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&checked_in),
            names(&fresh),
            "proto/src/gen/ has other files than the generator makes: run `cargo xtask codegen`"
        );
        for ((name, old), (_, new)) in checked_in.iter().zip(&fresh) {
            if old != new {
                let line = old
                    .lines()
                    .zip(new.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or_else(|| old.lines().count().min(new.lines().count()))
                    + 1;
                panic!(
                    "proto/src/gen/{name} is stale (first difference at line {line}): \
                     run `cargo xtask codegen` and commit the result"
                );
            }
        }
    }
}
