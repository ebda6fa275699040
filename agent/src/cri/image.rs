//! OCI image import into containerd 1.6.
//!
//! containerd 1.6 has no Transfer service, so an import is done on the client
//! side, the way `ctr images import` does it: every blob goes through the
//! Content service under a lease, the image record points at the manifest,
//! and the layers are unpacked for the `overlayfs` snapshotter under their
//! chain IDs. GC labels (`containerd.io/gc.ref.*`) keep the content and the
//! snapshot chain alive once the lease is gone; the snapshot label on the
//! config is also how [`resolve`] finds the top chain ID later.
//!
//! This module owns the image tarball format (an OCI image layout in a tar,
//! one manifest, named by the `io.containerd.image.name` annotation) and
//! reference normalization.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, GetImageRequest, Image, Info, InfoRequest,
    ReadContentRequest, UpdateImageRequest, UpdateRequest, WriteAction, WriteContentRequest,
    WriteContentResponse,
};
use containerd_client::types::Descriptor;
use futures::SinkExt as _;
use futures::channel::mpsc;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

/// The snapshotter images are unpacked for.
pub const SNAPSHOTTER: &str = "overlayfs";

const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
const LABEL_GC_CONFIG: &str = "containerd.io/gc.ref.content.config";
const LABEL_GC_LAYER: &str = "containerd.io/gc.ref.content.l.";
const LABEL_GC_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot.overlayfs";
const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";

const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Bytes per Content.Write message (containerd's own clients use 1 MiB).
const CHUNK: u64 = 1 << 20;
/// Upper bound for JSON documents (index, manifest, config) read into memory.
const MAX_JSON: u64 = 8 << 20;
/// A crashed import leaves a lease behind; containerd drops it after this.
const LEASE_EXPIRY: Duration = Duration::from_hours(1);

/// Why an image could not be imported or resolved.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The containerd namespace cannot be sent as gRPC metadata.
    #[error("invalid containerd namespace {ns:?}")]
    Namespace { ns: String },
    /// The image directory could not be listed.
    #[error("import {dir}: list directory: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// Reading the tarball failed.
    #[error("import {path}: {what}: {source}")]
    Read {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    /// A JSON document in the tarball does not parse.
    #[error("import {path}: parse {what}: {source}")]
    Parse {
        path: PathBuf,
        what: String,
        source: serde_json::Error,
    },
    /// The tarball is not an image this importer understands.
    #[error("import {path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    /// A containerd call failed during an import.
    #[error("import {path}: {what}: {source}")]
    Import {
        path: PathBuf,
        what: String,
        source: ContainerdError,
    },
    /// A containerd call failed while resolving an image.
    #[error("resolve image {image}: {what}: {source}")]
    Resolve {
        image: String,
        what: String,
        source: ContainerdError,
    },
    /// The image record exists but its blobs are not what an image should be.
    #[error("resolve image {image}: {reason}")]
    Broken { image: String, reason: String },
    /// The image is present but was never unpacked for [`SNAPSHOTTER`].
    #[error("image {image} is present but not unpacked for snapshotter {SNAPSHOTTER}")]
    NotUnpacked { image: String },
}

/// A failed containerd call. Shows containerd's own message, which already
/// ends with the error class (`…: not found`); the full gRPC status is kept.
#[derive(Debug)]
pub struct ContainerdError(pub Box<Status>);

impl ContainerdError {
    /// The gRPC status code, e.g. to tell `NotFound` from the rest.
    pub fn code(&self) -> Code {
        self.0.code()
    }
}

impl std::fmt::Display for ContainerdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.message().is_empty() {
            write!(f, "{:?}", self.0.code())
        } else {
            f.write_str(self.0.message())
        }
    }
}

impl std::error::Error for ContainerdError {}

/// An image now present and unpacked in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// The normalized image name (`docker.io/library/busybox:latest`).
    pub name: String,
    /// Chain ID of the top layer: the parent snapshot of a container's rootfs.
    pub top_chain_id: String,
}

/// Import one OCI image tarball (index.json + blobs/) into namespace `ns`. Idempotent (fast when already present).
pub async fn import_tar(
    channel: Channel,
    ns: &str,
    path: &Path,
) -> Result<ImportedImage, ImageError> {
    let started = Instant::now();
    let mut api = Api::new(channel, ns)?;
    let layout = read_layout(path).await?;

    let lease = api.create_lease().await.map_err(|e| ImageError::Import {
        path: path.to_owned(),
        what: "create lease".into(),
        source: ContainerdError(Box::new(e)),
    })?;
    let importer = Importer {
        api: &api,
        path,
        layout: &layout,
    };
    let result = importer.run().await;
    api.lease = None;
    if let Err(e) = api.delete_lease(&lease).await {
        // The image is complete either way; the lease expires on its own.
        tracing::warn!(lease, error = %e, "delete import lease");
    }
    let stats = result?;
    tracing::info!(
        image = layout.name,
        path = %path.display(),
        written_bytes = stats.written_bytes,
        unpacked_layers = stats.unpacked_layers,
        elapsed_ms = started.elapsed().as_millis(),
        "imported image"
    );
    Ok(ImportedImage {
        name: layout.name,
        top_chain_id: layout.chain_ids.last().cloned().unwrap_or_default(),
    })
}

/// Import every *.tar in `dir`; returns the imported images and per-file errors (one bad tar never stops the others).
pub async fn import_dir(
    channel: Channel,
    ns: &str,
    dir: &Path,
) -> (Vec<ImportedImage>, Vec<ImageError>) {
    let mut tars = Vec::new();
    let mut errors = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                match entry {
                    Ok(e) if e.path().extension().is_some_and(|x| x == "tar") => {
                        tars.push(e.path());
                    }
                    Ok(_) => {}
                    Err(source) => errors.push(ImageError::ReadDir {
                        dir: dir.to_owned(),
                        source,
                    }),
                }
            }
        }
        Err(source) => {
            errors.push(ImageError::ReadDir {
                dir: dir.to_owned(),
                source,
            });
            return (Vec::new(), errors);
        }
    }
    tars.sort();
    let mut images = Vec::new();
    for tar in tars {
        match import_tar(channel.clone(), ns, &tar).await {
            Ok(image) => images.push(image),
            Err(e) => errors.push(e),
        }
    }
    (images, errors)
}

/// The top snapshot chain ID of an image already present and unpacked in `ns`
/// (image → manifest → config Info label `containerd.io/gc.ref.snapshot.overlayfs`),
/// or `Ok(None)` if the image is not present (`NotFound`) — used by the pod code
/// to give a clear waiting reason instead of hanging.
pub async fn resolve(
    channel: Channel,
    ns: &str,
    image: &str,
) -> Result<Option<String>, ImageError> {
    let name = normalize_reference(image);
    let api = Api::new(channel, ns)?;
    let grpc = |what: &str| {
        let (image, what) = (name.clone(), what.to_owned());
        move |e: Status| ImageError::Resolve {
            image,
            what,
            source: ContainerdError(Box::new(e)),
        }
    };
    let broken = |reason: String| ImageError::Broken {
        image: name.clone(),
        reason,
    };

    let record = api
        .images()
        .get(api.req(GetImageRequest { name: name.clone() }))
        .await;
    let target = match record {
        Ok(r) => r.into_inner().image.and_then(|i| i.target),
        Err(e) if e.code() == Code::NotFound => return Ok(None),
        Err(e) => return Err(grpc("get image")(e)),
    }
    .ok_or_else(|| broken("image record has no target".into()))?;

    let mut manifest_digest = target.digest;
    if is_index(&target.media_type) {
        let bytes = api
            .read_blob(&manifest_digest)
            .await
            .map_err(grpc(&format!("read index {manifest_digest}")))?;
        let index: OciIndex = serde_json::from_slice(&bytes)
            .map_err(|e| broken(format!("parse index {manifest_digest}: {e}")))?;
        manifest_digest = pick_platform(&index.manifests)
            .ok_or_else(|| broken(format!("index {manifest_digest} has no manifest")))?
            .digest
            .clone();
    }
    let bytes = api
        .read_blob(&manifest_digest)
        .await
        .map_err(grpc(&format!("read manifest {manifest_digest}")))?;
    let manifest: OciManifest = serde_json::from_slice(&bytes)
        .map_err(|e| broken(format!("parse manifest {manifest_digest}: {e}")))?;
    let config = manifest.config.digest;
    let info = api
        .info(&config)
        .await
        .map_err(grpc(&format!("info config {config}")))?
        .ok_or_else(|| broken(format!("config blob {config} is missing")))?;
    match info.labels.get(LABEL_GC_SNAPSHOT) {
        Some(chain) => Ok(Some(chain.clone())),
        None => Err(ImageError::NotUnpacked { image: name }),
    }
}

/// Normalize a reference like Docker/Kubernetes does: "busybox" → "docker.io/library/busybox:latest", "foo/bar:1" → "docker.io/foo/bar:1", "weir.local/x" → "weir.local/x:latest"; digests (@sha256:) kept.
pub fn normalize_reference(image: &str) -> String {
    let image = image.trim();
    if image.is_empty() {
        return String::new();
    }
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    // Docker's rule: the first component is a registry only if it looks like
    // a host name (has a dot or port, is localhost, or has upper case).
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => ("docker.io", name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    let mut out = format!("{domain}/");
    if domain == "docker.io" && !path.contains('/') {
        out.push_str("library/");
    }
    out.push_str(path);
    let has_tag = path
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'));
    match digest {
        Some(digest) => {
            out.push('@');
            out.push_str(digest);
        }
        None if !has_tag => out.push_str(":latest"),
        None => {}
    }
    out
}

/// Chain IDs of a layer stack, bottom first: the first is the first diff ID,
/// each next one is `sha256(parent + " " + diff_id)` (OCI image spec).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chains: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let chain = match chains.last() {
            None => diff_id.clone(),
            Some(parent) => sha256_digest(format!("{parent} {diff_id}").as_bytes()),
        };
        chains.push(chain);
    }
    chains
}

fn sha256_digest(data: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in Sha256::digest(data) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

// ---------------------------------------------------------------------------
// The tarball.

#[derive(Debug, Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<OciPlatform>,
}

#[derive(Debug, Clone, Deserialize)]
struct OciPlatform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

#[derive(Debug, Deserialize)]
struct OciConfig {
    rootfs: OciRootfs,
}

#[derive(Debug, Deserialize)]
struct OciRootfs {
    diff_ids: Vec<String>,
}

impl OciDescriptor {
    fn to_proto(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: self.annotations.clone(),
        }
    }
}

/// Where a file's bytes sit inside the tarball.
#[derive(Debug, Clone, Copy)]
struct TarEntry {
    offset: u64,
    size: u64,
}

/// Everything an import needs, read and checked before talking to containerd.
#[derive(Debug)]
struct Layout {
    name: String,
    manifest: OciDescriptor,
    manifest_bytes: Vec<u8>,
    config: OciDescriptor,
    config_bytes: Vec<u8>,
    layers: Vec<(OciDescriptor, TarEntry)>,
    diff_ids: Vec<String>,
    chain_ids: Vec<String>,
}

async fn read_layout(path: &Path) -> Result<Layout, ImageError> {
    let tar = TarFile::open(path).await?;
    let index: OciIndex = tar
        .parse("index.json", tar.get("index.json")?, None)
        .await?;
    let manifest = index
        .manifests
        .first()
        .ok_or_else(|| tar.invalid("index.json lists no manifest".into()))?
        .clone();
    if is_index(&manifest.media_type) {
        return Err(tar.invalid(format!(
            "manifest {} is a multi-platform index; only single-platform images are supported",
            manifest.digest
        )));
    }
    if manifest.media_type != MEDIA_OCI_MANIFEST && manifest.media_type != MEDIA_DOCKER_MANIFEST {
        return Err(tar.invalid(format!(
            "manifest {} has unsupported media type {:?}",
            manifest.digest, manifest.media_type
        )));
    }
    // Stored normalized, so that resolve(normalize_reference(x)) finds it.
    let name = manifest
        .annotations
        .get(ANNOTATION_IMAGE_NAME)
        .map(|n| normalize_reference(n))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            tar.invalid(format!(
                "index.json has no {ANNOTATION_IMAGE_NAME} annotation"
            ))
        })?;

    let (manifest_bytes, parsed): (_, OciManifest) = tar.blob_json("manifest", &manifest).await?;
    let config = parsed.config;
    let (config_bytes, config_json): (_, OciConfig) = tar.blob_json("config", &config).await?;
    let diff_ids = config_json.rootfs.diff_ids;
    if parsed.layers.is_empty() {
        return Err(tar.invalid("manifest lists no layers".into()));
    }
    if diff_ids.len() != parsed.layers.len() {
        return Err(tar.invalid(format!(
            "config lists {} diff IDs for {} layers",
            diff_ids.len(),
            parsed.layers.len()
        )));
    }
    let layers = parsed
        .layers
        .into_iter()
        .map(|layer| tar.blob(&layer).map(|entry| (layer, entry)))
        .collect::<Result<Vec<_>, _>>()?;
    let chain_ids = chain_ids(&diff_ids);
    Ok(Layout {
        name,
        manifest,
        manifest_bytes,
        config,
        config_bytes,
        layers,
        diff_ids,
        chain_ids,
    })
}

/// An indexed image tarball.
struct TarFile<'a> {
    path: &'a Path,
    entries: HashMap<String, TarEntry>,
}

impl<'a> TarFile<'a> {
    async fn open(path: &'a Path) -> Result<Self, ImageError> {
        let owned = path.to_owned();
        let entries = tokio::task::spawn_blocking(move || index_tar(&owned))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|source| ImageError::Read {
                path: path.to_owned(),
                what: "read tar".into(),
                source,
            })?;
        Ok(Self { path, entries })
    }

    fn invalid(&self, reason: String) -> ImageError {
        ImageError::Layout {
            path: self.path.to_owned(),
            reason,
        }
    }

    fn get(&self, name: &str) -> Result<TarEntry, ImageError> {
        self.entries
            .get(name)
            .copied()
            .ok_or_else(|| self.invalid(format!("{name} is missing (not an OCI image layout)")))
    }

    /// Where the blob a descriptor names sits, checking its size.
    fn blob(&self, desc: &OciDescriptor) -> Result<TarEntry, ImageError> {
        let digest = &desc.digest;
        let name = blob_path(digest)
            .ok_or_else(|| self.invalid(format!("unsupported digest {digest:?}")))?;
        let entry = *self
            .entries
            .get(&name)
            .ok_or_else(|| self.invalid(format!("blob {digest} is missing")))?;
        if u64::try_from(desc.size).ok() != Some(entry.size) {
            return Err(self.invalid(format!(
                "blob {digest} has {} bytes, descriptor says {}",
                entry.size, desc.size
            )));
        }
        Ok(entry)
    }

    /// Reads, verifies and parses a JSON blob; returns its bytes too.
    async fn blob_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        desc: &OciDescriptor,
    ) -> Result<(Vec<u8>, T), ImageError> {
        let what = format!("{kind} {}", desc.digest);
        let entry = self.blob(desc)?;
        let bytes = self.read_json(&what, entry, Some(&desc.digest)).await?;
        let value = serde_json::from_slice(&bytes).map_err(|source| ImageError::Parse {
            path: self.path.to_owned(),
            what,
            source,
        })?;
        Ok((bytes, value))
    }

    async fn parse<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        entry: TarEntry,
        digest: Option<&str>,
    ) -> Result<T, ImageError> {
        let bytes = self.read_json(what, entry, digest).await?;
        serde_json::from_slice(&bytes).map_err(|source| ImageError::Parse {
            path: self.path.to_owned(),
            what: what.to_owned(),
            source,
        })
    }

    async fn read_json(
        &self,
        what: &str,
        entry: TarEntry,
        digest: Option<&str>,
    ) -> Result<Vec<u8>, ImageError> {
        if entry.size > MAX_JSON {
            return Err(self.invalid(format!("{what} is too large ({} bytes)", entry.size)));
        }
        let bytes = read_range(self.path, entry)
            .await
            .map_err(|source| ImageError::Read {
                path: self.path.to_owned(),
                what: format!("read {what}"),
                source,
            })?;
        // Verified here because the JSON is parsed before containerd sees it.
        if let Some(digest) = digest
            && sha256_digest(&bytes) != digest
        {
            return Err(self.invalid(format!("{what} does not match its digest")));
        }
        Ok(bytes)
    }
}

/// One pass over the tar headers: where each regular file's data starts.
fn index_tar(path: &Path) -> std::io::Result<HashMap<String, TarEntry>> {
    let mut archive = tar::Archive::new(std::fs::File::open(path)?);
    let mut entries = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path()?.to_string_lossy().into_owned();
        let name = name.trim_start_matches("./").trim_start_matches('/');
        entries.insert(
            name.to_owned(),
            TarEntry {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
        );
    }
    Ok(entries)
}

/// `blobs/sha256/<hex>` for a well-formed sha256 digest, else None (which
/// also keeps a hostile digest from naming any other path).
fn blob_path(digest: &str) -> Option<String> {
    let hex = digest.strip_prefix("sha256:")?;
    let valid = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    valid.then(|| format!("blobs/sha256/{hex}"))
}

fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

/// The manifest for this host's platform, else the first one.
fn pick_platform(manifests: &[OciDescriptor]) -> Option<&OciDescriptor> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .or_else(|| manifests.first())
}

async fn open_at(path: &Path, offset: u64) -> std::io::Result<tokio::fs::File> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(offset)).await?;
    Ok(file)
}

async fn read_range(path: &Path, entry: TarEntry) -> std::io::Result<Vec<u8>> {
    let mut file = open_at(path, entry.offset).await?;
    let mut buf = vec![0; usize::try_from(entry.size).map_err(std::io::Error::other)?];
    file.read_exact(&mut buf).await?;
    Ok(buf)
}

// ---------------------------------------------------------------------------
// containerd.

/// Clients plus the metadata every request carries.
struct Api {
    channel: Channel,
    ns: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Api {
    fn new(channel: Channel, ns: &str) -> Result<Self, ImageError> {
        let ns_value = AsciiMetadataValue::try_from(ns)
            .ok()
            .filter(|_| !ns.is_empty())
            .ok_or_else(|| ImageError::Namespace { ns: ns.to_owned() })?;
        Ok(Self {
            channel,
            ns: ns_value,
            lease: None,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        md.insert("containerd-namespace", self.ns.clone());
        if let Some(lease) = &self.lease {
            md.insert("containerd-lease", lease.clone());
        }
        req
    }

    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }

    fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    /// Creates a lease, makes every later request carry it and returns its ID.
    async fn create_lease(&mut self) -> Result<String, Status> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let id = format!(
            "weir-import-{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut expire = prost_types::Timestamp::from(SystemTime::now() + LEASE_EXPIRY);
        expire.nanos = 0;
        let labels = HashMap::from([(LABEL_GC_EXPIRE.to_owned(), expire.to_string())]);
        LeasesClient::new(self.channel.clone())
            .create(self.req(CreateLeaseRequest {
                id: id.clone(),
                labels,
            }))
            .await?;
        self.lease = Some(
            AsciiMetadataValue::try_from(id.as_str())
                .map_err(|e| Status::internal(format!("lease id {id}: {e}")))?,
        );
        Ok(id)
    }

    /// Deletes the lease and runs GC now, so anything the import left
    /// unreferenced (a failed half) is gone when this returns.
    async fn delete_lease(&self, id: &str) -> Result<(), Status> {
        let res = LeasesClient::new(self.channel.clone())
            .delete(self.req(DeleteLeaseRequest {
                id: id.to_owned(),
                sync: true,
            }))
            .await;
        match res {
            Err(e) if e.code() != Code::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn info(&self, digest: &str) -> Result<Option<Info>, Status> {
        let res = self
            .content()
            .info(self.req(InfoRequest {
                digest: digest.to_owned(),
            }))
            .await;
        match res {
            Ok(r) => Ok(r.into_inner().info),
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets the labels of `wanted` that `current` lacks or has different.
    async fn ensure_labels(
        &self,
        digest: &str,
        current: &HashMap<String, String>,
        wanted: &HashMap<String, String>,
    ) -> Result<(), Status> {
        let missing: HashMap<String, String> = wanted
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let paths = missing.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(UpdateRequest {
                info: Some(Info {
                    digest: digest.to_owned(),
                    labels: missing,
                    ..Info::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await?;
        Ok(())
    }

    async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, Status> {
        let mut stream = self
            .content()
            .read(self.req(ReadContentRequest {
                digest: digest.to_owned(),
                offset: 0,
                size: 0,
            }))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            out.extend_from_slice(&chunk.data);
            if out.len() as u64 > MAX_JSON {
                return Err(Status::out_of_range(format!(
                    "blob {digest} is larger than {MAX_JSON} bytes"
                )));
            }
        }
        Ok(out)
    }

    async fn stat_snapshot(&self, key: &str) -> Result<bool, Status> {
        let res = self
            .snapshots()
            .stat(self.req(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_owned(),
            }))
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Code::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn remove_snapshot(&self, key: &str) {
        let res = self
            .snapshots()
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_owned(),
            }))
            .await;
        if let Err(e) = res
            && e.code() != Code::NotFound
        {
            tracing::warn!(key, error = %e, "remove extraction snapshot");
        }
    }
}

/// Where the bytes of a blob come from.
enum Source<'a> {
    Memory(&'a [u8]),
    Tar(&'a Path, TarEntry),
}

#[derive(Debug, Default)]
struct Stats {
    written_bytes: u64,
    unpacked_layers: usize,
}

/// One import of one tarball, under a lease the caller owns.
struct Importer<'a> {
    api: &'a Api,
    path: &'a Path,
    layout: &'a Layout,
}

impl Importer<'_> {
    fn grpc(&self, what: impl Into<String>) -> impl FnOnce(Status) -> ImageError {
        let (path, what) = (self.path.to_owned(), what.into());
        move |e| ImageError::Import {
            path,
            what,
            source: ContainerdError(Box::new(e)),
        }
    }

    async fn run(&self) -> Result<Stats, ImageError> {
        let layout = self.layout;
        let mut stats = Stats::default();

        // Children before parents, so a parent's gc.ref labels never point
        // at content that is not there yet.
        for ((layer, entry), diff_id) in layout.layers.iter().zip(&layout.diff_ids) {
            let labels = HashMap::from([(LABEL_UNCOMPRESSED.to_owned(), diff_id.clone())]);
            stats.written_bytes += self
                .ensure_blob(layer, Source::Tar(self.path, *entry), &labels)
                .await?
                .1;
        }
        let (config_labels, n) = self
            .ensure_blob(
                &layout.config,
                Source::Memory(&layout.config_bytes),
                &HashMap::new(),
            )
            .await?;
        stats.written_bytes += n;
        let mut manifest_labels =
            HashMap::from([(LABEL_GC_CONFIG.to_owned(), layout.config.digest.clone())]);
        for (i, (layer, _)) in layout.layers.iter().enumerate() {
            manifest_labels.insert(format!("{LABEL_GC_LAYER}{i}"), layer.digest.clone());
        }
        stats.written_bytes += self
            .ensure_blob(
                &layout.manifest,
                Source::Memory(&layout.manifest_bytes),
                &manifest_labels,
            )
            .await?
            .1;

        self.ensure_image().await?;
        stats.unpacked_layers = self.unpack().await?;

        let top = layout.chain_ids.last().cloned().unwrap_or_default();
        let wanted = HashMap::from([(LABEL_GC_SNAPSHOT.to_owned(), top)]);
        self.api
            .ensure_labels(&layout.config.digest, &config_labels, &wanted)
            .await
            .map_err(self.grpc(format!("label config {}", layout.config.digest)))?;
        Ok(stats)
    }

    /// Makes the blob present with `labels`; returns its labels as they were
    /// before and the number of bytes written.
    async fn ensure_blob(
        &self,
        desc: &OciDescriptor,
        source: Source<'_>,
        labels: &HashMap<String, String>,
    ) -> Result<(HashMap<String, String>, u64), ImageError> {
        let digest = &desc.digest;
        let existing = self
            .api
            .info(digest)
            .await
            .map_err(self.grpc(format!("info blob {digest}")))?;
        if let Some(info) = existing {
            self.api
                .ensure_labels(digest, &info.labels, labels)
                .await
                .map_err(self.grpc(format!("label blob {digest}")))?;
            return Ok((info.labels, 0));
        }
        if let Some(written) = self.write_blob(desc, source, labels).await? {
            return Ok((labels.clone(), written));
        }
        // Someone else committed it first (or it is shared content from
        // another namespace): our commit labels were not applied.
        let current = self
            .api
            .info(digest)
            .await
            .map_err(self.grpc(format!("info blob {digest}")))?
            .map(|i| i.labels)
            .unwrap_or_default();
        self.api
            .ensure_labels(digest, &current, labels)
            .await
            .map_err(self.grpc(format!("label blob {digest}")))?;
        Ok((current, 0))
    }

    /// Streams one blob through Content.Write. Returns the bytes written, or
    /// None when containerd already had the blob.
    async fn write_blob(
        &self,
        desc: &OciDescriptor,
        source: Source<'_>,
        labels: &HashMap<String, String>,
    ) -> Result<Option<u64>, ImageError> {
        let digest = &desc.digest;
        match self.stream_blob(desc, source, labels).await {
            Ok(written) => Ok(Some(written)),
            // Can come at any point of the stream when another writer (a
            // concurrent import, another namespace) committed it first.
            Err(WriteFailure::Grpc(e)) if e.code() == Code::AlreadyExists => Ok(None),
            Err(WriteFailure::Grpc(e)) => Err(self.grpc(format!("write blob {digest}"))(e)),
            Err(WriteFailure::Read(source)) => Err(ImageError::Read {
                path: self.path.to_owned(),
                what: format!("read blob {digest}"),
                source,
            }),
        }
    }

    async fn stream_blob(
        &self,
        desc: &OciDescriptor,
        source: Source<'_>,
        labels: &HashMap<String, String>,
    ) -> Result<u64, WriteFailure> {
        let digest = &desc.digest;
        let size = u64::try_from(desc.size).unwrap_or_default();
        let lease = self
            .api
            .lease
            .as_ref()
            .and_then(|l| l.to_str().ok())
            .unwrap_or("weir-import");
        // Unique per import: two imports of one blob never fight over a ref
        // lock, and a crashed import's ingest goes away with its lease.
        let r#ref = format!("{lease}-{digest}");
        let message = |action: WriteAction, offset: u64, data: Vec<u8>| WriteContentRequest {
            action: action.into(),
            r#ref: r#ref.clone(),
            total: desc.size,
            expected: digest.clone(),
            offset: i64::try_from(offset).unwrap_or(i64::MAX),
            data,
            labels: HashMap::new(),
        };

        let (mut tx, rx) = mpsc::channel::<WriteContentRequest>(2);
        // The server answers the call only after the first message, so STAT
        // must be queued before awaiting write() or it never returns.
        tx.send(message(WriteAction::Stat, 0, Vec::new()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut responses = self
            .api
            .content()
            .write(self.api.req(rx))
            .await?
            .into_inner();
        recv(&mut responses).await?;

        // Always from offset 0: a write at 0 resets any stale ingest, and
        // the tar is the source of truth anyway.
        let mut reader = match source {
            Source::Tar(path, entry) => Some(open_at(path, entry.offset).await?),
            Source::Memory(_) => None,
        };
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(CHUNK);
            let data = match (&source, reader.as_mut()) {
                (Source::Memory(bytes), _) => {
                    let start = usize::try_from(offset).unwrap_or(usize::MAX);
                    let end = usize::try_from(offset + len).unwrap_or(usize::MAX);
                    bytes
                        .get(start..end)
                        .ok_or_else(|| Status::internal("blob shorter than its size"))?
                        .to_vec()
                }
                (Source::Tar(..), Some(file)) => {
                    let mut buf = vec![0; usize::try_from(len).unwrap_or_default()];
                    file.read_exact(&mut buf).await?;
                    buf
                }
                (Source::Tar(..), None) => unreachable!("tar source always has a reader"),
            };
            let resp = exchange(
                &mut tx,
                &mut responses,
                message(WriteAction::Write, offset, data),
            )
            .await?;
            offset += len;
            if u64::try_from(resp.offset).ok() != Some(offset) {
                return Err(Status::internal(format!(
                    "server is at offset {} after writing up to {offset}",
                    resp.offset
                ))
                .into());
            }
        }

        let mut commit = message(WriteAction::Commit, size, Vec::new());
        commit.labels = labels.clone();
        let resp = exchange(&mut tx, &mut responses, commit).await?;
        if resp.digest != *digest {
            return Err(Status::internal(format!("committed digest is {}", resp.digest)).into());
        }
        // Close our side and let the server finish the call cleanly.
        drop(tx);
        while responses.message().await?.is_some() {}
        Ok(size)
    }

    /// Points the image record at the manifest (create, or replace the target).
    async fn ensure_image(&self) -> Result<(), ImageError> {
        let layout = self.layout;
        let name = &layout.name;
        let grpc = |what: &str| self.grpc(format!("{what} image {name}"));
        let target = layout.manifest.to_proto();
        let target = Descriptor {
            annotations: HashMap::new(),
            ..target
        };
        let existing = match self
            .api
            .images()
            .get(self.api.req(GetImageRequest { name: name.clone() }))
            .await
        {
            Ok(r) => r.into_inner().image,
            Err(e) if e.code() == Code::NotFound => None,
            Err(e) => return Err(grpc("get")(e)),
        };
        if let Some(image) = &existing
            && image.target.as_ref().is_some_and(|t| {
                t.digest == target.digest
                    && t.media_type == target.media_type
                    && t.size == target.size
            })
        {
            return Ok(());
        }
        let image = Image {
            name: name.clone(),
            target: Some(target),
            ..Image::default()
        };
        if existing.is_none() {
            let res = self
                .api
                .images()
                .create(self.api.req(CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                }))
                .await;
            match res {
                Ok(_) => return Ok(()),
                Err(e) if e.code() == Code::AlreadyExists => {}
                Err(e) => return Err(grpc("create")(e)),
            }
        }
        self.api
            .images()
            .update(self.api.req(UpdateImageRequest {
                image: Some(image),
                update_mask: None,
                source_date_epoch: None,
            }))
            .await
            .map_err(grpc("update"))?;
        Ok(())
    }

    /// Unpacks the layers missing from the snapshotter; returns how many.
    async fn unpack(&self) -> Result<usize, ImageError> {
        let layout = self.layout;
        // A committed snapshot implies all its parents: one Stat when warm.
        if let Some(top) = layout.chain_ids.last()
            && self.has_snapshot(top).await?
        {
            return Ok(0);
        }
        let mut unpacked = 0;
        let mut parent = String::new();
        for (((layer, _), diff_id), chain) in layout
            .layers
            .iter()
            .zip(&layout.diff_ids)
            .zip(&layout.chain_ids)
        {
            if !self.has_snapshot(chain).await? {
                self.unpack_layer(layer, diff_id, chain, &parent).await?;
                unpacked += 1;
            }
            parent.clone_from(chain);
        }
        Ok(unpacked)
    }

    async fn has_snapshot(&self, chain: &str) -> Result<bool, ImageError> {
        self.api
            .stat_snapshot(chain)
            .await
            .map_err(self.grpc(format!("stat snapshot {chain}")))
    }

    async fn unpack_layer(
        &self,
        layer: &OciDescriptor,
        diff_id: &str,
        chain: &str,
        parent: &str,
    ) -> Result<(), ImageError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let key = format!("extract-{nanos}-{chain}");
        let what = format!("unpack layer {} (chain {chain})", layer.digest);
        let mounts = self
            .api
            .snapshots()
            .prepare(self.api.req(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.clone(),
                parent: parent.to_owned(),
                labels: HashMap::new(),
            }))
            .await
            .map_err(self.grpc(format!("{what}: prepare snapshot")))?
            .into_inner()
            .mounts;
        let applied = async {
            let applied = DiffClient::new(self.api.channel.clone())
                .apply(self.api.req(ApplyRequest {
                    diff: Some(layer.to_proto()),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                }))
                .await
                .map_err(self.grpc(format!("{what}: apply")))?
                .into_inner()
                .applied
                .map(|d| d.digest)
                .unwrap_or_default();
            if applied != diff_id {
                return Err(ImageError::Layout {
                    path: self.path.to_owned(),
                    reason: format!("{what}: applied diff is {applied}, config says {diff_id}"),
                });
            }
            let res = self
                .api
                .snapshots()
                .commit(self.api.req(CommitSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    name: chain.to_owned(),
                    key: key.clone(),
                    labels: HashMap::new(),
                }))
                .await;
            match res {
                Ok(_) => Ok(true),
                // Another import committed the same chain first.
                Err(e) if e.code() == Code::AlreadyExists => Ok(false),
                Err(e) => Err(self.grpc(format!("{what}: commit snapshot"))(e)),
            }
        }
        .await;
        if !matches!(applied, Ok(true)) {
            self.api.remove_snapshot(&key).await;
        }
        applied.map(|_| ())
    }
}

/// Why streaming a blob into containerd stopped.
enum WriteFailure {
    Grpc(Status),
    Read(std::io::Error),
}

impl From<Status> for WriteFailure {
    fn from(e: Status) -> Self {
        Self::Grpc(e)
    }
}

impl From<std::io::Error> for WriteFailure {
    fn from(e: std::io::Error) -> Self {
        Self::Read(e)
    }
}

/// Reads the one response the server sends per request.
async fn recv(
    responses: &mut Streaming<WriteContentResponse>,
) -> Result<WriteContentResponse, Status> {
    responses
        .message()
        .await?
        .ok_or_else(|| Status::unavailable("content write stream ended early"))
}

/// Sends one write message and waits for its response.
async fn exchange(
    tx: &mut mpsc::Sender<WriteContentRequest>,
    responses: &mut Streaming<WriteContentResponse>,
    msg: WriteContentRequest,
) -> Result<WriteContentResponse, Status> {
    if tx.send(msg).await.is_err() {
        // The request side is gone because the call failed: report why.
        return Err(match responses.message().await {
            Err(e) => e,
            Ok(_) => Status::unavailable("content write stream closed"),
        });
    }
    recv(responses).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_like_docker() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            (
                "index.docker.io/busybox",
                "docker.io/library/busybox:latest",
            ),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest",
            ),
            ("foo/bar:1", "docker.io/foo/bar:1"),
            ("foo/bar/baz", "docker.io/foo/bar/baz:latest"),
            ("weir.local/x", "weir.local/x:latest"),
            ("weir.local/x:v2", "weir.local/x:v2"),
            ("localhost/x", "localhost/x:latest"),
            ("localhost:5000/x", "localhost:5000/x:latest"),
            ("localhost:5000/a/b:3", "localhost:5000/a/b:3"),
            (
                "busybox@sha256:0123456789abcdef",
                "docker.io/library/busybox@sha256:0123456789abcdef",
            ),
            (
                "busybox:1@sha256:0123456789abcdef",
                "docker.io/library/busybox:1@sha256:0123456789abcdef",
            ),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_reference(input), want, "input {input:?}");
        }
    }

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = format!("sha256:{}", "c".repeat(64));
        assert!(chain_ids(&[]).is_empty());
        assert_eq!(chain_ids(std::slice::from_ref(&a)), vec![a.clone()]);
        // Computed with: printf '%s %s' "$PARENT" "$DIFF_ID" | sha256sum
        let ab = "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c";
        let abc = "sha256:c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588";
        assert_eq!(
            chain_ids(&[a.clone(), b, c]),
            vec![a, ab.to_owned(), abc.to_owned()]
        );
    }

    #[test]
    fn blob_paths_reject_odd_digests() {
        let hex = "0".repeat(64);
        assert_eq!(
            blob_path(&format!("sha256:{hex}")),
            Some(format!("blobs/sha256/{hex}"))
        );
        assert_eq!(blob_path("sha256:../../etc/passwd"), None);
        assert_eq!(blob_path(&format!("sha512:{hex}")), None);
        assert_eq!(blob_path(&format!("sha256:{}", "A".repeat(64))), None);
    }

    /// The containerd socket and image tarball for the tests that need a
    /// real containerd (`#[ignore]`d by default; `cargo xtask test` starts a
    /// private containerd, sets `WEIR_TEST_CONTAINERD_SOCK` and runs them).
    /// The tarball comes from `cargo xtask image` or `WEIR_TEST_IMAGE_TAR`.
    fn e2e_env() -> (String, PathBuf) {
        let sock = std::env::var("WEIR_TEST_CONTAINERD_SOCK").expect(
            "WEIR_TEST_CONTAINERD_SOCK names a containerd socket (cargo xtask test sets it)",
        );
        let tar = std::env::var_os("WEIR_TEST_IMAGE_TAR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images/busybox.tar"),
            PathBuf::from,
        );
        assert!(
            tar.exists(),
            "{} is missing: run `cargo xtask image`",
            tar.display()
        );
        (sock, tar)
    }

    fn unique_ns(what: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!("weir-{what}-{}-{nanos}", std::process::id())
    }

    /// Deletes the image and the namespace. The namespace can only go if GC
    /// took every blob and snapshot, so this also proves the import's labels
    /// hold nothing beyond the image.
    async fn remove_all(channel: Channel, ns: &str, image: &str) {
        use containerd_client::services::v1::namespaces_client::NamespacesClient;
        use containerd_client::services::v1::{DeleteImageRequest, DeleteNamespaceRequest};

        let api = Api::new(channel.clone(), ns).unwrap();
        api.images()
            .delete(api.req(DeleteImageRequest {
                name: image.to_owned(),
                sync: true,
                target: None,
            }))
            .await
            .unwrap();
        assert_eq!(resolve(channel.clone(), ns, image).await.unwrap(), None);
        NamespacesClient::new(channel)
            .delete(DeleteNamespaceRequest {
                name: ns.to_owned(),
            })
            .await
            .unwrap();
    }

    /// Cold and warm import, resolve, and a directory with a bad tarball.
    /// Set `WEIR_TEST_NAMESPACE` to import there and keep the result.
    #[tokio::test]
    #[ignore = "needs a containerd: cargo xtask test provides one"]
    async fn imports_into_containerd() {
        let (sock, tar) = e2e_env();
        let keep = std::env::var("WEIR_TEST_NAMESPACE").ok();
        let ns = keep.clone().unwrap_or_else(|| unique_ns("imgtest"));
        let channel = containerd_client::connect(&sock).await.unwrap();

        assert_eq!(
            resolve(channel.clone(), &ns, "busybox").await.unwrap(),
            None
        );

        let t = Instant::now();
        let cold = import_tar(channel.clone(), &ns, &tar).await.unwrap();
        let cold_time = t.elapsed();
        let t = Instant::now();
        let warm = import_tar(channel.clone(), &ns, &tar).await.unwrap();
        let warm_time = t.elapsed();
        eprintln!("import into {ns}: cold {cold_time:?}, warm {warm_time:?}");
        assert_eq!(cold.name, "docker.io/library/busybox:latest");
        assert!(cold.top_chain_id.starts_with("sha256:"));
        assert_eq!(cold, warm);

        let top = resolve(channel.clone(), &ns, "busybox").await.unwrap();
        assert_eq!(top.as_deref(), Some(cold.top_chain_id.as_str()));

        // One bad tarball next to a good one: the good one still imports.
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&tar, dir.join("busybox.tar")).unwrap();
        std::fs::write(dir.join("bad.tar"), b"not a tar").unwrap();
        std::fs::write(dir.join("notes.txt"), b"ignored").unwrap();
        let (images, errors) = import_dir(channel.clone(), &ns, &dir).await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(images, vec![cold.clone()]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("bad.tar"), "{}", errors[0]);

        if keep.is_none() {
            remove_all(channel, &ns, &cold.name).await;
        }
    }

    /// Imports of one tarball racing each other all succeed and agree.
    #[tokio::test]
    #[ignore = "needs a containerd: cargo xtask test provides one"]
    async fn concurrent_imports_agree() {
        let (sock, tar) = e2e_env();
        let ns = unique_ns("imgrace");
        let channel = containerd_client::connect(&sock).await.unwrap();
        let imports = (0..4).map(|_| import_tar(channel.clone(), &ns, &tar));
        let results = futures::future::join_all(imports).await;
        let first = results[0].as_ref().unwrap();
        for result in &results {
            assert_eq!(result.as_ref().unwrap(), first);
        }
        let top = resolve(channel.clone(), &ns, &first.name).await.unwrap();
        assert_eq!(top.as_deref(), Some(first.top_chain_id.as_str()));
        remove_all(channel, &ns, &first.name).await;
    }

    /// A layer whose bytes do not match its digest fails the import with
    /// the blob named, and leaves no image and no lease behind.
    #[tokio::test]
    #[ignore = "needs a containerd: cargo xtask test provides one"]
    async fn corrupt_layer_fails_cleanly() {
        use containerd_client::services::v1::ListRequest;
        use containerd_client::services::v1::namespaces_client::NamespacesClient;

        let (sock, tar) = e2e_env();
        let ns = unique_ns("imgbad");
        let bad = std::env::temp_dir().join(format!("{ns}.tar"));
        let mut bytes = std::fs::read(&tar).unwrap();
        let layer = index_tar(&tar)
            .unwrap()
            .into_iter()
            .filter(|(name, _)| name.starts_with("blobs/"))
            .max_by_key(|(_, e)| e.size)
            .unwrap()
            .1;
        let at = usize::try_from(layer.offset + layer.size / 2).unwrap();
        bytes[at] ^= 0xff;
        std::fs::write(&bad, bytes).unwrap();

        let channel = containerd_client::connect(&sock).await.unwrap();
        let err = import_tar(channel.clone(), &ns, &bad).await.unwrap_err();
        std::fs::remove_file(&bad).unwrap();
        let msg = err.to_string();
        eprintln!("expected failure: {msg}");
        assert!(msg.contains("write blob sha256:"), "{msg}");
        assert_eq!(
            resolve(channel.clone(), &ns, "busybox").await.unwrap(),
            None
        );
        let api = Api::new(channel.clone(), &ns).unwrap();
        let leases = LeasesClient::new(channel.clone())
            .list(api.req(ListRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .leases;
        assert!(leases.is_empty(), "{leases:?}");
        NamespacesClient::new(channel)
            .delete(containerd_client::services::v1::DeleteNamespaceRequest { name: ns })
            .await
            .unwrap();
    }
}
