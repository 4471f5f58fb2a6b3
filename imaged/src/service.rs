//! The image service's logic on plain Rust types: what each CRI RPC (and the internal API)
//! does, without gRPC concerns.

use crate::content::ContentStore;
use crate::digest::Digest;
use crate::error::Error;
use crate::gc::{self, Leases};
use crate::images::{ImageRecord, ImageStore, NamedImage};
use crate::metrics::{Metrics, StoreFigures};
use crate::pull::{EXTRACT_KEY_PREFIX, Progress, PullSettings, Puller};
use crate::reference::Reference;
use crate::registry::auth::Credentials;
use proto::cri;
use snapshotters::{Kind, Mount, Snapshotter, Usage};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::Instrument as _;

/// imaged's image service: it owns the stores and shares them with its puller and the
/// garbage collector.
pub struct ImageService {
    content: Arc<ContentStore>,
    images: Arc<ImageStore>,
    snapshotter: Arc<dyn Snapshotter>,
    /// Snapshotters used before the configured one, kept for the garbage collector.
    retired: Vec<Arc<dyn Snapshotter>>,
    leases: Arc<Leases>,
    puller: Arc<Puller>,
    /// Few names, looked up in each image's sorted name lists (ListImages asks for every
    /// image, and a few comparisons beat hashing each of its names).
    pinned: Vec<String>,
    fs_usage: Arc<FsUsage>,
    metrics: Arc<Metrics>,
    /// The encoded answer to an unfiltered ListImages, and the image store's generation it
    /// was made at: the kubelet lists every few seconds, and the store rarely changes.
    listing: std::sync::Mutex<Option<(u64, bytes::Bytes)>>,
}

/// How long ImageFsInfo reuses a walk of an unchanged store: containerd's period for
/// collecting snapshot statistics.
const FS_USAGE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// ImageFsInfo's last walk of the snapshotter's directory, reused while it is young and
/// nothing imaged did has changed the store: the kubelet asks every few seconds, and a walk of a
/// large store reads every inode. What containers write into their snapshots shows within
/// [`FS_USAGE_MAX_AGE`].
#[derive(Default)]
struct FsUsage {
    /// When it was measured, at which count of changes, and what it found.
    measured: tokio::sync::Mutex<Option<(std::time::Instant, u64, Usage)>>,
    changes: std::sync::atomic::AtomicU64,
}

impl FsUsage {
    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ImageService {
    /// A service over the given stores, unpacking into `snapshotter` and pulling with
    /// `settings`; `retired` are snapshotters whose leftovers only the garbage collector
    /// sees, `pinned` lists image names reported as pinned, and `metrics` counts the work.
    pub fn new(
        content: Arc<ContentStore>,
        images: Arc<ImageStore>,
        snapshotter: Arc<dyn Snapshotter>,
        retired: Vec<Arc<dyn Snapshotter>>,
        settings: PullSettings,
        pinned: &[String],
        metrics: Arc<Metrics>,
    ) -> Self {
        let pinned = pinned
            .iter()
            .filter_map(|p| Reference::parse(p).ok())
            .map(|r| r.to_string())
            .collect();
        let leases = Arc::new(Leases::default());
        let puller = Arc::new(Puller::new(
            content.clone(),
            images.clone(),
            snapshotter.clone(),
            leases.clone(),
            settings,
        ));
        Self {
            content,
            images,
            snapshotter,
            retired,
            leases,
            puller,
            pinned,
            fs_usage: Arc::default(),
            metrics,
            listing: std::sync::Mutex::default(),
        }
    }

    /// Pulls an image; returns its id.
    pub async fn pull(
        &self,
        image: &str,
        credentials: Credentials,
        progress: Progress,
    ) -> Result<String, Error> {
        let timer = self.metrics.pull_started();
        let reference = Reference::parse(image)?;
        // The pull runs in its own task so a caller that goes away cannot leave it half done.
        let (puller, fs_usage) = (self.puller.clone(), self.fs_usage.clone());
        let pull = async move {
            let pulled = puller.pull(&reference, credentials, progress).await;
            fs_usage.changed();
            if pulled.is_ok() {
                timer.succeeded();
            }
            pulled
        };
        let pulled = tokio::spawn(pull.in_current_span())
            .await
            .expect("pull task")?;
        Ok(pulled.id.to_string())
    }

    /// The CRI view of an image (`None` if nothing matches) and, when `verbose`, its
    /// `ImageStatusResponse.info`.
    pub fn status(
        &self,
        image: &str,
        verbose: bool,
    ) -> Result<(Option<cri::Image>, HashMap<String, String>), Error> {
        let Some(named) = self.images.lookup(image)? else {
            return Ok((None, HashMap::new()));
        };
        let info = if verbose {
            self.info(&named)?
        } else {
            HashMap::new()
        };
        Ok((Some(self.to_cri(&named)), info))
    }

    /// Verbose status: the chain ID and the image config.
    fn info(&self, named: &NamedImage) -> Result<HashMap<String, String>, Error> {
        let config_bytes = self.content.read(&named.record.id)?;
        let config: serde_json::Value =
            serde_json::from_slice(&config_bytes).unwrap_or(serde_json::Value::Null);
        let info = serde_json::json!({
            "chainID": named.record.top_chain().map(Digest::to_string),
            "imageSpec": config,
            "manifestDigest": named.record.manifest.to_string(),
            "size": named.record.size,
        });
        Ok(HashMap::from([("info".to_string(), info.to_string())]))
    }

    /// Every image, or the one the filter names.
    pub fn list(&self, filter: Option<&str>) -> Result<Vec<cri::Image>, Error> {
        let named = match filter.filter(|f| !f.is_empty()) {
            Some(text) => self.images.lookup(text)?.into_iter().collect(),
            None => self.images.list(),
        };
        // The store lists by id, the order of the answer.
        Ok(named.iter().map(|n| self.to_cri(n)).collect())
    }

    /// The ListImagesResponse for `filter`, protobuf-encoded. Without a filter it is made
    /// once per change of the image store and shared by every call until the next change.
    pub fn list_encoded(&self, filter: Option<&str>) -> Result<bytes::Bytes, Error> {
        use prost::Message as _;
        let encode =
            |images| bytes::Bytes::from(cri::ListImagesResponse { images }.encode_to_vec());
        if filter.is_some_and(|f| !f.is_empty()) {
            return Ok(encode(self.list(filter)?));
        }
        // Read before listing: a change in between makes the next call list again.
        let generation = self.images.generation();
        if let Some((made, encoded)) = &*self.listing.lock().expect("listing")
            && *made == generation
        {
            return Ok(encoded.clone());
        }
        let encoded = encode(self.list(None)?);
        *self.listing.lock().expect("listing") = Some((generation, encoded.clone()));
        Ok(encoded)
    }

    /// Removes an image under all its names; absent images are fine.
    pub async fn remove(&self, image: &str) -> Result<(), Error> {
        let Some(named) = self.images.lookup(image)? else {
            return Ok(());
        };
        self.images.remove(&named.record.id)?;
        self.collect_garbage().await
    }

    /// Deletes blobs and snapshots no image needs.
    pub async fn collect_garbage(&self) -> Result<(), Error> {
        let snapshotters = std::iter::once(&self.snapshotter)
            .chain(&self.retired)
            .cloned()
            .collect();
        let collected = gc::collect(
            self.images.clone(),
            self.content.clone(),
            snapshotters,
            self.leases.clone(),
        )
        .await?;
        self.fs_usage.changed();
        self.metrics.collected(
            collected.blobs as u64,
            collected.blob_bytes,
            collected.snapshots as u64,
        );
        tracing::debug!(?collected, "garbage collected");
        Ok(())
    }

    /// Checks the store beside running pulls (see [`check`](crate::check)); with `repair`,
    /// removes what cannot be trusted and then collects what only that used.
    pub async fn check(&self, repair: bool) -> Result<Vec<crate::check::Problem>, Error> {
        let store = crate::check::Store {
            content: self.content.clone(),
            images: self.images.clone(),
            snapshotters: std::iter::once(&self.snapshotter)
                .chain(&self.retired)
                .cloned()
                .collect(),
            live: true,
        };
        let problems = plumbing::blocking(move || crate::check::run(&store, repair)).await?;
        if repair {
            self.collect_garbage().await?;
        }
        Ok(problems)
    }

    /// Usage of the configured snapshotter's directory, the image filesystem as
    /// containerd reports it.
    pub async fn fs_info(&self) -> cri::FilesystemUsage {
        let usage = self.fs_usage().await;
        let (bytes, inodes) = (usage.size, usage.inodes);
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as i64);
        cri::FilesystemUsage {
            timestamp,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.snapshotter.root().display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: bytes }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        }
    }

    /// The store's figures for a metrics scrape: blobs listed and sized, snapshots counted
    /// from metadata, the snapshotter directory's bytes as ImageFsInfo last measured them.
    pub async fn store_figures(&self) -> StoreFigures {
        let content = self.content.clone();
        let snapshotter = self.snapshotter.clone();
        let (blobs, blob_bytes, snapshots) = plumbing::blocking(move || {
            let digests = content.list().unwrap_or_default();
            let bytes: u64 = digests
                .iter()
                .filter_map(|d| std::fs::metadata(content.path(d)).ok())
                .map(|m| m.len())
                .sum();
            let mut snapshots = 0;
            let _ = snapshotter.walk(&mut |_| snapshots += 1);
            (digests.len() as u64, bytes, snapshots)
        })
        .await;
        StoreFigures {
            blobs,
            blob_bytes,
            snapshots,
            snapshot_bytes: self.last_fs_usage().await.size,
        }
    }

    /// The last walk's usage whatever its age (a scrape every 15 s must not walk each time),
    /// or a first walk.
    async fn last_fs_usage(&self) -> Usage {
        let measured = *self.fs_usage.measured.lock().await;
        match measured {
            Some((_, _, usage)) => usage,
            None => self.fs_usage().await,
        }
    }

    /// The snapshotter directory's usage, walked again only when the last walk is old or
    /// the store changed since; concurrent callers share one walk.
    async fn fs_usage(&self) -> Usage {
        let changes = self
            .fs_usage
            .changes
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut measured = self.fs_usage.measured.lock().await;
        if let Some((at, seen, usage)) = *measured
            && seen == changes
            && at.elapsed() < FS_USAGE_MAX_AGE
        {
            return usage;
        }
        let root = self.snapshotter.root().to_path_buf();
        let usage = plumbing::blocking(move || snapshotters::disk_usage(&root))
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "measuring the image filesystem failed");
                Usage::default()
            });
        *measured = Some((std::time::Instant::now(), changes, usage));
        usage
    }

    /// A stored image's identity and config, for the runtime.
    pub fn config(&self, image: &str) -> Result<ImageConfig, Error> {
        let named = self
            .images
            .lookup(image)?
            .ok_or_else(|| Error::ImageNotFound(image.to_string()))?;
        let config = self.content.read(&named.record.id)?;
        let asked = Reference::parse(image).ok().filter(|r| {
            let name = r.to_string();
            named.tags.contains(&name) || named.digests.contains(&name)
        });
        let name = match &asked {
            Some(reference) => reference.to_string(),
            None => named.tags.first().cloned().unwrap_or_default(),
        };
        let repository = asked
            .as_ref()
            .map(|r| format!("{}/{}@", r.registry, r.repository));
        let repo_digest = repository
            .and_then(|prefix| named.digests.iter().find(|d| d.starts_with(&prefix)))
            .or(named.digests.first())
            .cloned()
            .unwrap_or_default();
        Ok(ImageConfig {
            name,
            id: named.record.id.to_string(),
            repo_digest,
            config,
        })
    }

    /// Creates a snapshot `key` on top of an image's layers and returns its mounts; a key
    /// prepared on the same image before gets its mounts again.
    pub async fn prepare(
        &self,
        image: &str,
        key: &str,
        readonly: bool,
    ) -> Result<Vec<Mount>, Error> {
        check_key(key)?;
        let named = self
            .images
            .lookup(image)?
            .ok_or_else(|| Error::ImageNotFound(image.to_string()))?;
        self.unpacked(&named.record).await?;
        let parent = named.record.top_chain().map(Digest::to_string);
        let snapshotter = self.snapshotter.clone();
        let key = key.to_string();
        let kind = if readonly { Kind::View } else { Kind::Active };
        let prepared = plumbing::blocking(move || {
            let created = match kind {
                Kind::View => snapshotter.view(&key, parent.as_deref(), BTreeMap::new()),
                _ => snapshotter.prepare(&key, parent.as_deref(), BTreeMap::new()),
            };
            let mounts = match created {
                Err(snapshotters::Error::AlreadyExists { .. }) => {
                    same_snapshot(snapshotter.as_ref(), &key, kind, parent.as_deref())
                }
                other => other,
            };
            mounts.map_err(|source| Error::Snapshot { key, source })
        })
        .await;
        self.fs_usage.changed();
        prepared
    }

    /// Unpacks the image again from the content store when its top layer has no snapshot,
    /// as after a switch to another snapshotter.
    async fn unpacked(&self, record: &ImageRecord) -> Result<(), Error> {
        let Some(top) = record.top_chain().map(Digest::to_string) else {
            return Ok(());
        };
        let snapshotter = self.snapshotter.clone();
        let present = plumbing::blocking(move || match snapshotter.stat(&top) {
            Ok(info) => Ok(info.kind == Kind::Committed),
            Err(snapshotters::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(Error::Snapshot { key: top, source }),
        })
        .await?;
        if !present {
            tracing::info!(image = %record.id, "unpacking the image again from the content store");
            // In a task of its own, as pulls are: a client that gives up must not leave
            // half the layers unpacked and the other half waiting.
            let (puller, record) = (self.puller.clone(), record.clone());
            tokio::spawn(async move { puller.restore(&record).await }.in_current_span())
                .await
                .expect("restore task")?;
        }
        Ok(())
    }

    /// The mounts of a snapshot made by [`Self::prepare`].
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        check_key(key)?;
        let snapshotter = self.snapshotter.clone();
        let key = key.to_string();
        plumbing::blocking(move || {
            snapshotter
                .mounts(&key)
                .map_err(|source| Error::Snapshot { key, source })
        })
        .await
    }

    /// What a snapshot made by [`Self::prepare`] holds on disk, and the directory it lives
    /// under.
    pub async fn usage(&self, key: &str) -> Result<(Usage, PathBuf), Error> {
        check_key(key)?;
        let snapshotter = self.snapshotter.clone();
        let key = key.to_string();
        plumbing::blocking(move || {
            let usage = snapshotter
                .usage(&key)
                .map_err(|source| Error::Snapshot { key, source })?;
            Ok((usage, snapshotter.root().to_path_buf()))
        })
        .await
    }

    /// Removes a snapshot made by [`Self::prepare`]; absent keys are fine.
    pub async fn remove_snapshot(&self, key: &str) -> Result<(), Error> {
        check_key(key)?;
        let snapshotter = self.snapshotter.clone();
        let key = key.to_string();
        let removed = plumbing::blocking(move || match snapshotter.remove(&key) {
            Ok(()) | Err(snapshotters::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(Error::Snapshot { key, source }),
        })
        .await;
        self.fs_usage.changed();
        removed
    }

    fn to_cri(&self, named: &NamedImage) -> cri::Image {
        let record = &named.record;
        let pinned = self.pinned.iter().any(|name| {
            named.tags.binary_search(name).is_ok() || named.digests.binary_search(name).is_ok()
        });
        cri::Image {
            id: record.id.to_string(),
            repo_tags: named.tags.clone(),
            repo_digests: named.digests.clone(),
            size: record.size,
            uid: record.uid.map(|value| cri::Int64Value { value }),
            username: record.username.clone(),
            spec: Some(cri::ImageSpec {
                image: record.id.to_string(),
                ..Default::default()
            }),
            pinned,
        }
    }
}

/// An image as the runtime needs it: what ContainerStatus reports and the config that the
/// container's process is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// The normalised reference asked for, or the image's first tag when asked for by id.
    pub name: String,
    /// The image id (config digest).
    pub id: String,
    /// The repo digest of the repository asked for, else the first one.
    pub repo_digest: String,
    /// The OCI image config, as stored.
    pub config: Vec<u8>,
}

/// Keys the runtime may use: not empty, and none of the names imaged gives its own
/// snapshots (layer chain IDs, layers being unpacked), so the internal API can never
/// reach an image's layers.
fn check_key(key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidRequest("snapshot key is empty"));
    }
    if key.starts_with(EXTRACT_KEY_PREFIX) || Digest::parse(key).is_ok() {
        return Err(Error::ReservedKey(key.to_string()));
    }
    Ok(())
}

/// The mounts of `key` when it already is the snapshot asked for (same kind, same parent);
/// AlreadyExists otherwise.
fn same_snapshot(
    snapshotter: &dyn Snapshotter,
    key: &str,
    kind: Kind,
    parent: Option<&str>,
) -> Result<Vec<Mount>, snapshotters::Error> {
    let info = snapshotter.stat(key)?;
    if info.kind == kind && info.parent.as_deref() == parent {
        snapshotter.mounts(key)
    } else {
        Err(snapshotters::Error::AlreadyExists { key: key.into() })
    }
}
