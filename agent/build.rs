//! Builds the eBPF programs (ebpf/programs) for bpfel-unknown-none with
//! aya-build, so `cargo build` of the agent always embeds current programs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "weir-ebpf")
        .ok_or_else(|| anyhow!("weir-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("weir-ebpf manifest has no parent directory"))?;
    // aya-build watches the programs' own directory; the map types they
    // share with the agent live next to it and change the object too.
    let common = root_dir
        .parent()
        .ok_or_else(|| anyhow!("weir-ebpf has no parent directory"))?
        .join("common");
    println!("cargo:rerun-if-changed={common}");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
