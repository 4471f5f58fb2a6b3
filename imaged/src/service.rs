//! The image service's logic on plain Rust types: what each CRI RPC (and the internal API)
//! does, without gRPC concerns.

use crate::content::ContentStore;
use crate::digest::Digest;
use crate::error::Error;
use crate::gc::{self, Leases};
use crate::images::{ImageStore, NamedImage};
use crate::pull::{Progress, PullSettings, Puller};
use crate::reference::Reference;
use crate::registry::auth::Credentials;
use proto::cri;
use snapshotters::{Mount, Snapshotter};
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
    leases: Arc<Leases>,
    puller: Arc<Puller>,
    /// Few names, looked up in each image's sorted name lists (ListImages asks for every
    /// image, and a few comparisons beat hashing each of its names).
    pinned: Vec<String>,
    root: PathBuf,
}

impl ImageService {
    /// A service over the stores under `root`, pulling with `settings`; `pinned` lists
    /// image names reported as pinned.
    pub fn new(
        content: Arc<ContentStore>,
        images: Arc<ImageStore>,
        snapshotter: Arc<dyn Snapshotter>,
        settings: PullSettings,
        pinned: &[String],
        root: PathBuf,
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
            leases,
            puller,
            pinned,
            root,
        }
    }

    /// Pulls an image; returns its id.
    pub async fn pull(
        &self,
        image: &str,
        credentials: Credentials,
        progress: Progress,
    ) -> Result<String, Error> {
        let reference = Reference::parse(image)?;
        // The pull runs in its own task so a caller that goes away cannot leave it half done.
        let puller = self.puller.clone();
        let pull = async move { puller.pull(&reference, credentials, progress).await };
        let record = tokio::spawn(pull.in_current_span())
            .await
            .expect("pull task")?;
        Ok(record.id.to_string())
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
        let mut images: Vec<cri::Image> = named.iter().map(|n| self.to_cri(n)).collect();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(images)
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
        let collected = gc::collect(
            self.images.clone(),
            self.content.clone(),
            self.snapshotter.clone(),
            self.leases.clone(),
        )
        .await?;
        tracing::debug!(?collected, "garbage collected");
        Ok(())
    }

    /// Usage of the filesystem holding content and snapshots.
    pub async fn fs_info(&self) -> cri::FilesystemUsage {
        let root = self.root.clone();
        let usage = tokio::task::spawn_blocking(move || snapshotters::disk_usage(&root))
            .await
            .expect("du task")
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "measuring the image filesystem failed");
                snapshotters::Usage::default()
            });
        let (bytes, inodes) = (usage.size, usage.inodes);
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as i64);
        cri::FilesystemUsage {
            timestamp,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.root.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: bytes }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        }
    }

    /// Creates a snapshot `key` on top of an image's layers and returns its mounts.
    pub async fn prepare(
        &self,
        image: &str,
        key: &str,
        readonly: bool,
    ) -> Result<Vec<Mount>, Error> {
        if key.is_empty() {
            return Err(Error::InvalidRequest("snapshot key is empty"));
        }
        let named = self
            .images
            .lookup(image)?
            .ok_or_else(|| Error::ImageNotFound(image.to_string()))?;
        let parent = named.record.top_chain().map(Digest::to_string);
        let snapshotter = self.snapshotter.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let labels = BTreeMap::new();
            let mounts = if readonly {
                snapshotter.view(&key, parent.as_deref(), labels)
            } else {
                snapshotter.prepare(&key, parent.as_deref(), labels)
            };
            mounts.map_err(|source| Error::Snapshot { key, source })
        })
        .await
        .expect("prepare task")
    }

    /// Removes a snapshot made by [`Self::prepare`]; absent keys are fine.
    pub async fn remove_snapshot(&self, key: &str) -> Result<(), Error> {
        let snapshotter = self.snapshotter.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || match snapshotter.remove(&key) {
            Ok(()) | Err(snapshotters::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(Error::Snapshot { key, source }),
        })
        .await
        .expect("remove task")
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
