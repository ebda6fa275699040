//! `cargo xtask image`: a small, reproducible OCI image tarball built from
//! Debian's busybox-static, so tests and demos never need a registry.
//!
//! The same busybox binary always gives the same digests: every entry has
//! mtime 0, uid/gid 0 and a fixed mode, entries are sorted, and the JSON
//! documents are serialized with sorted keys.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The name containerd gives the image (annotation `io.containerd.image.name`).
pub const IMAGE_NAME: &str = "docker.io/library/busybox:latest";
/// File name of the tarball inside the output directory.
pub const TAR_NAME: &str = "busybox.tar";

const BUSYBOX: &str = "/bin/busybox";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Applets the tests and examples rely on; the build fails if one is missing.
const REQUIRED_APPLETS: &[&str] = &[
    "sh", "httpd", "nc", "wget", "sleep", "echo", "cat", "ls", "ps", "env", "true", "false", "yes",
    "dd", "nslookup", "hostname", "ip", "ifconfig", "kill", "mkdir", "rm", "seq", "head", "tail",
    "grep", "wc", "date", "id", "printf", "test", "pwd", "uname",
];
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";
const INDEX_HTML: &str = "weir ok\n";

/// Arguments of `cargo xtask image`.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Directory to write busybox.tar into [default: <workspace>/target/images].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Runs `cargo xtask image`.
pub fn run(args: &ImageArgs) -> anyhow::Result<()> {
    let out_dir = args.out.clone().unwrap_or_else(default_out_dir);
    let path = build_busybox_image(&out_dir)?;
    println!("{}", path.display());
    println!("image: {IMAGE_NAME}");
    Ok(())
}

/// `<workspace>/target/images`, where `up`, `test` and `bench` look for images.
pub fn default_out_dir() -> PathBuf {
    crate::workspace_root().join("target").join("images")
}

/// Builds `<out_dir>/busybox.tar` (an OCI image layout tarball named
/// [`IMAGE_NAME`]) and returns its path. Installs busybox-static first when
/// running as root and it is missing.
pub fn build_busybox_image(out_dir: &Path) -> anyhow::Result<PathBuf> {
    ensure_busybox()?;
    let busybox = fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX}"))?;
    let applets = list_applets()?;

    let layer = build_layer(&busybox, &applets).context("build layer tar")?;
    let diff_id = digest(&layer);
    let arch = oci_arch()?;

    let config = to_json(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))?;
    let manifest = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": digest(&config), "size": config.len() },
        // The layer is uncompressed, so its digest is its diff ID.
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": diff_id, "size": layer.len() }],
    }))?;
    let index = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": { "architecture": arch, "os": "linux" },
            "annotations": {
                // Without this annotation containerd imports nothing.
                "io.containerd.image.name": IMAGE_NAME,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    }))?;

    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    files.insert("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
    files.insert("index.json".into(), &index);
    for blob in [&layer, &config, &manifest] {
        files.insert(format!("blobs/sha256/{}", hex(blob)), blob);
    }
    let mut outer = tar::Builder::new(Vec::new());
    append_dir(&mut outer, "blobs/", 0o755)?;
    append_dir(&mut outer, "blobs/sha256/", 0o755)?;
    for (name, data) in files {
        append_file(&mut outer, &name, 0o644, data)?;
    }
    let outer = outer.into_inner().context("finish image tar")?;

    fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let path = out_dir.join(TAR_NAME);
    // Write then rename, so a reader never sees a half-written tarball.
    let tmp = out_dir.join(format!(".{TAR_NAME}.{}", std::process::id()));
    fs::write(&tmp, &outer).with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(path)
}

/// Installs busybox-static when missing (root only), else says how to.
fn ensure_busybox() -> anyhow::Result<()> {
    if Path::new(BUSYBOX).exists() {
        return Ok(());
    }
    let is_root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !is_root {
        bail!("{BUSYBOX} is missing: run `apt-get install -y busybox-static` as root");
    }
    eprintln!("{BUSYBOX} is missing: installing busybox-static");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "busybox-static"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    // A fresh machine may have empty package lists: update once and retry.
    if !install().context("run apt-get install")?.success() {
        let update = Command::new("apt-get").arg("update").status();
        ensure!(
            update.context("run apt-get update")?.success(),
            "apt-get update failed"
        );
        ensure!(
            install().context("run apt-get install")?.success(),
            "apt-get install -y busybox-static failed"
        );
    }
    ensure!(
        Path::new(BUSYBOX).exists(),
        "busybox-static installed but {BUSYBOX} is missing"
    );
    Ok(())
}

/// Every applet this busybox provides, sorted, without `busybox` itself.
fn list_applets() -> anyhow::Result<Vec<String>> {
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("run {BUSYBOX} --list"))?;
    ensure!(
        out.status.success(),
        "{BUSYBOX} --list failed: {}",
        out.status
    );
    let list = String::from_utf8(out.stdout).context("busybox --list is not UTF-8")?;
    let mut applets: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    applets.sort();
    applets.dedup();
    let missing: Vec<&str> = REQUIRED_APPLETS
        .iter()
        .copied()
        .filter(|a| applets.binary_search_by(|x| x.as_str().cmp(a)).is_err())
        .collect();
    ensure!(missing.is_empty(), "{BUSYBOX} lacks applets {missing:?}");
    Ok(applets)
}

enum Node<'a> {
    Dir(u32),
    File(u32, &'a [u8]),
    Symlink(&'a str),
}

/// The root filesystem layer: an uncompressed tar with sorted entries.
fn build_layer(busybox: &[u8], applets: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    nodes.insert("bin/".into(), Node::Dir(0o755));
    nodes.insert("etc/".into(), Node::Dir(0o755));
    nodes.insert("root/".into(), Node::Dir(0o700));
    nodes.insert("tmp/".into(), Node::Dir(0o1777));
    nodes.insert("www/".into(), Node::Dir(0o755));
    nodes.insert("bin/busybox".into(), Node::File(0o755, busybox));
    for applet in applets {
        nodes.insert(format!("bin/{applet}"), Node::Symlink("busybox"));
    }
    nodes.insert("etc/passwd".into(), Node::File(0o644, PASSWD.as_bytes()));
    nodes.insert("etc/group".into(), Node::File(0o644, GROUP.as_bytes()));
    nodes.insert(
        "www/index.html".into(),
        Node::File(0o644, INDEX_HTML.as_bytes()),
    );

    let mut tar = tar::Builder::new(Vec::new());
    for (path, node) in nodes {
        match node {
            Node::Dir(mode) => append_dir(&mut tar, &path, mode)?,
            Node::File(mode, data) => append_file(&mut tar, &path, mode, data)?,
            Node::Symlink(target) => {
                let mut header = header(tar::EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut header, &path, target)
                    .with_context(|| format!("append symlink {path}"))?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn append_dir(tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> anyhow::Result<()> {
    let mut header = header(tar::EntryType::Directory, mode, 0);
    tar.append_data(&mut header, path, std::io::empty())
        .with_context(|| format!("append directory {path}"))
}

fn append_file(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    mode: u32,
    data: &[u8],
) -> anyhow::Result<()> {
    let mut header = header(tar::EntryType::Regular, mode, data.len() as u64);
    tar.append_data(&mut header, path, data)
        .with_context(|| format!("append file {path}"))
}

/// The OCI architecture name of the host (busybox-static is a host binary).
fn oci_arch() -> anyhow::Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => bail!("no OCI architecture name for {other}"),
    })
}

fn to_json(value: &serde_json::Value) -> anyhow::Result<Vec<u8>> {
    // serde_json's map is a BTreeMap here, so keys come out sorted.
    serde_json::to_vec(value).context("serialize JSON")
}

fn hex(data: &[u8]) -> String {
    use std::fmt::Write as _;
    Sha256::digest(data)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_is_reproducible() {
        let applets = vec!["sh".to_owned(), "[".to_owned()];
        let a = build_layer(b"binary", &applets).unwrap();
        let b = build_layer(b"binary", &applets).unwrap();
        assert_eq!(a, b);
        let mut archive = tar::Archive::new(a.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(names.contains(&"bin/sh".to_owned()));
        assert!(names.contains(&"tmp".to_owned()) || names.contains(&"tmp/".to_owned()));
    }

    #[test]
    fn digest_is_sha256() {
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
