//! The pull pipeline, top to bottom: resolve the reference, fetch and verify manifest and
//! config, then download, verify, decompress and apply every missing layer concurrently,
//! commit the snapshots in order and record the image.
//!
//! Each layer body flows through one pass: HTTP chunks -> content-store ingest (digest
//! checked) -> processor chain -> diff_id hash -> tar applier. Where the snapshotter can
//! rebase (overlayfs, native), layers are applied into independent snapshots with no parent
//! and get their parent when committed, so no layer waits for the one below it. Elsewhere
//! (btrfs, or native for a layer that needs its parent's files) a layer is applied onto its
//! committed parent: layers still download concurrently, the one next in line streams
//! straight into its snapshot, and the others go to the content store first and are applied
//! from there once their parent commits.

mod pipeline;

use crate::content::{ContentError, ContentStore, Writer};
use crate::digest::{Digest, chain_ids};
use crate::gc::Leases;
use crate::images::{ImageRecord, ImageStore, LayerRecord};
use crate::locks::KeyedLocks;
use crate::manifest::{self, Document, HostPlatform, ImageConfig, Manifest, ManifestError};
use crate::reference::Reference;
use crate::registry::auth::Credentials;
use crate::registry::{CONFIG_LIMIT, Registry, RegistryError, Session};
use bytes::Bytes;
use pipeline::{Source, Stages, apply_blob, pump};
use proto::imaged::pull_event::Event;
use proto::imaged::{Done, Layer, LayerProgress, Resolved};
use snapshotters::Snapshotter;
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

/// Keys of the Active snapshots that layers are unpacked into, as containerd names them:
/// whatever still has such a key at start-up was cut off by a crash.
pub const EXTRACT_KEY_PREFIX: &str = "extract-";

/// The labels of a layer's snapshot, while unpacked and once committed: containerd's
/// `containerd.io/snapshot.ref`, naming the chain ID the snapshot is (or will be).
fn snapshot_labels(layer: &LayerRecord) -> BTreeMap<String, String> {
    BTreeMap::from([(
        snapshotters::UNPACK_LABEL.to_string(),
        layer.chain_id.to_string(),
    )])
}

/// Where progress events go, if anyone listens.
pub type Progress = Option<mpsc::UnboundedSender<Event>>;

/// Why a pull failed. Every variant names the reference or digest concerned.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry could not deliver.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A manifest, index or config was refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Storing a blob failed, or it did not match its digest.
    #[error("layer {digest}: {source}")]
    Blob {
        /// Layer blob.
        digest: Digest,
        /// Cause.
        source: ContentError,
    },
    /// Storing a manifest or config failed.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// The uncompressed layer does not hash to the config's diff_id.
    #[error("layer {digest}: diff_id mismatch: config says {expected}, content is {actual}")]
    DiffId {
        /// Layer blob.
        digest: Digest,
        /// diff_id from the config.
        expected: Digest,
        /// Digest of the uncompressed stream.
        actual: Digest,
    },
    /// No processor turns the layer into tar, or the layer's key cannot be unwrapped.
    #[error("{}", about_layer(digest, "", source))]
    Processor {
        /// Layer blob.
        digest: Digest,
        /// Cause.
        source: processors::Error,
    },
    /// The processor chain failed while streaming (corrupt compression, a decryption or
    /// external processor failure).
    #[error("{}", about_layer(digest, "decoding failed: ", source))]
    Decode {
        /// Layer blob.
        digest: Digest,
        /// Cause; carries a [`processors::Error`] when a processor reported it.
        source: io::Error,
    },
    /// The image has more layers than imaged accepts.
    #[error(
        "manifest {manifest} of {reference} has {layers} layers, more than max_image_layers ({cap})"
    )]
    TooManyLayers {
        /// The reference pulled.
        reference: String,
        /// The manifest chosen.
        manifest: Digest,
        /// Its layers.
        layers: usize,
        /// The cap.
        cap: usize,
    },
    /// The layer unpacked to more than a limit allows.
    #[error("layer {digest}: {detail}")]
    Expansion {
        /// Layer blob.
        digest: Digest,
        /// The limit crossed, and by what.
        detail: String,
    },
    /// The download broke off.
    #[error("layer {digest}: download interrupted: {detail}")]
    Stream {
        /// Layer blob.
        digest: Digest,
        /// What happened.
        detail: String,
    },
    /// The tar stream could not be applied (corrupt compression, hostile entries...).
    #[error("layer {digest}: {source}")]
    Apply {
        /// Layer blob.
        digest: Digest,
        /// Cause.
        source: snapshotters::Error,
    },
    /// Snapshot bookkeeping failed.
    #[error("snapshot {key}: {source}")]
    Snapshot {
        /// Snapshot key or name.
        key: String,
        /// Cause.
        source: snapshotters::Error,
    },
    /// Recording the image failed.
    #[error(transparent)]
    Images(#[from] crate::images::ImageStoreError),
    /// The layer's snapshot is missing and its blob is no longer stored (it was discarded
    /// after an unpack), so it can only come from the registry again.
    #[error(
        "layer {digest}: neither its snapshot nor its blob is stored here (discarded after unpacking); pull the image again"
    )]
    BlobGone {
        /// Layer blob.
        digest: Digest,
    },
    /// Not unpacked because a layer below it failed, which is the error to report.
    #[error("layer {digest}: not unpacked, a layer below it failed")]
    BelowFailed {
        /// Layer blob.
        digest: Digest,
    },
}

impl PullError {
    /// Whether a layer applied without its parent needs the parent's files, as its apply
    /// or the rebase at its commit found.
    fn needs_parent(&self) -> bool {
        let (PullError::Apply { source, .. } | PullError::Snapshot { source, .. }) = self else {
            return false;
        };
        matches!(
            source,
            snapshotters::Error::Layer {
                reason: snapshotters::LayerError::NeedsParent { .. },
                ..
            }
        )
    }
}

/// `layer <digest>: <what><cause>`, or the cause alone when it names the layer already
/// (the decryption errors do), so the digest is not repeated.
fn about_layer(digest: &Digest, what: &str, cause: &dyn std::fmt::Display) -> String {
    let cause = cause.to_string();
    if cause.contains(digest.as_str()) {
        cause
    } else {
        format!("layer {digest}: {what}{cause}")
    }
}

/// How pulls reach registries and decode layers; the daemon builds it from its config.
pub struct PullSettings {
    /// Registry access.
    pub registry: Arc<Registry>,
    /// Layer processors.
    pub processors: processors::Chain,
    /// Layer downloads per pull.
    pub max_concurrent_downloads: usize,
    /// Layer blobs leave the content store once unpacked and committed.
    pub discard_unpacked_layers: bool,
    /// The platform picked from indexes.
    pub platform: HostPlatform,
    /// What one layer may unpack to.
    pub unpack_limits: UnpackLimits,
    /// Images with more layers are refused; `None` is no cap.
    pub max_layers: Option<usize>,
}

/// Caps on what one layer may unpack to, against decompression bombs: a few MiB of gzip can
/// hold gigabytes of zeros, which would otherwise be written out in full before the diff_id
/// check fails them. `None` is no cap.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Most bytes of tar one layer may unpack to.
    pub max_size: Option<u64>,
    /// Most bytes of tar per byte of blob, counted once a layer has unpacked to more than
    /// 64 MiB: small layers of highly compressible text are common.
    pub max_ratio: Option<u64>,
}

/// Everything a pull needs; one per daemon. The stores are the service's, shared.
pub struct Puller {
    content: Arc<ContentStore>,
    images: Arc<ImageStore>,
    snapshotter: Arc<dyn Snapshotter>,
    /// Digests in use by running pulls (kept from the garbage collector).
    leases: Arc<Leases>,
    registry: Arc<Registry>,
    processors: processors::Chain,
    max_concurrent_downloads: usize,
    discard_unpacked_layers: bool,
    unpack_limits: UnpackLimits,
    max_layers: Option<usize>,
    /// One lock per chain ID (and per config digest), so a layer is unpacked once however
    /// many pulls want it.
    locks: KeyedLocks,
    platform: HostPlatform,
}

struct Resolution {
    /// Digest the reference resolved to (index or manifest).
    top: Digest,
    index: Option<(Digest, Bytes)>,
    manifest: Manifest,
    manifest_digest: Digest,
    manifest_bytes: Bytes,
}

impl Puller {
    /// A puller writing into the given stores.
    pub fn new(
        content: Arc<ContentStore>,
        images: Arc<ImageStore>,
        snapshotter: Arc<dyn Snapshotter>,
        leases: Arc<Leases>,
        settings: PullSettings,
    ) -> Self {
        Self {
            content,
            images,
            snapshotter,
            leases,
            registry: settings.registry,
            processors: settings.processors,
            max_concurrent_downloads: settings.max_concurrent_downloads,
            discard_unpacked_layers: settings.discard_unpacked_layers,
            unpack_limits: settings.unpack_limits,
            max_layers: settings.max_layers,
            locks: KeyedLocks::default(),
            platform: settings.platform,
        }
    }

    /// Pulls `reference` and returns the stored image.
    pub async fn pull(
        self: &Arc<Self>,
        reference: &Reference,
        credentials: Credentials,
        progress: Progress,
    ) -> Result<ImageRecord, PullError> {
        let session = self.registry.session(reference, credentials)?;
        let resolution = self.resolve(&session).await?;
        let layers = resolution.manifest.layers.len();
        if let Some(cap) = self.max_layers
            && layers > cap
        {
            return Err(PullError::TooManyLayers {
                reference: reference.to_string(),
                manifest: resolution.manifest_digest,
                layers,
                cap,
            });
        }
        let config_digest = resolution.manifest.config.digest.clone();
        let mut held = vec![
            resolution.top.clone(),
            resolution.manifest_digest.clone(),
            config_digest.clone(),
        ];
        let _documents = self.leases.acquire(held.clone()).await;
        self.store_documents(&resolution)?;
        let config = self.fetch_config(&session, &resolution.manifest).await?;
        let record = self.record(&resolution, &config);
        held.extend(record.layer_leases());
        let _layers = self.leases.acquire(held).await;
        let resolved = Resolved {
            reference: reference.to_string(),
            manifest_digest: resolution.top.to_string(),
            layers: vec![],
        };
        self.unpack(Some(&session), &record.layers, resolved, &progress)
            .await?;
        self.images
            .put(&record, &names(reference, &resolution.top))?;
        send(
            &progress,
            Event::Done(Done {
                image_id: record.id.to_string(),
            }),
        );
        Ok(record)
    }

    async fn resolve(&self, session: &Session) -> Result<Resolution, PullError> {
        let resolution = self.resolve_manifest(session).await?;
        manifest::check_layer_types(&resolution.manifest, |t| self.processors.accepts(t))?;
        Ok(resolution)
    }

    async fn resolve_manifest(&self, session: &Session) -> Result<Resolution, PullError> {
        let top = session.resolve().await?;
        match manifest::parse_document(top.content_type.as_deref(), &top.bytes, &top.digest)? {
            Document::Manifest(manifest) => Ok(Resolution {
                top: top.digest.clone(),
                index: None,
                manifest,
                manifest_digest: top.digest,
                manifest_bytes: top.bytes,
            }),
            Document::Index(index) => {
                let descriptor = self.platform.select(&index, &top.digest)?;
                let chosen = descriptor.digest.clone();
                let fetched = session.manifest(&chosen, descriptor.size).await?;
                let doc = manifest::parse_document(
                    fetched.content_type.as_deref(),
                    &fetched.bytes,
                    &chosen,
                )?;
                let Document::Manifest(manifest) = doc else {
                    return Err(ManifestError::Unsupported {
                        what: "manifest",
                        media_type: "nested index".into(),
                        digest: chosen,
                    }
                    .into());
                };
                Ok(Resolution {
                    top: top.digest.clone(),
                    index: Some((top.digest, top.bytes)),
                    manifest,
                    manifest_digest: chosen,
                    manifest_bytes: fetched.bytes,
                })
            }
        }
    }

    fn store_documents(&self, resolution: &Resolution) -> Result<(), ContentError> {
        if let Some((digest, bytes)) = &resolution.index {
            self.content.write_verified(digest, bytes)?;
        }
        self.content
            .write_verified(&resolution.manifest_digest, &resolution.manifest_bytes)
    }

    async fn fetch_config(
        &self,
        session: &Session,
        manifest: &Manifest,
    ) -> Result<ImageConfig, PullError> {
        let digest = &manifest.config.digest;
        // Concurrent pulls of one image fetch its config once.
        let _guard = self.locks.lock(digest.as_str()).await;
        let bytes = match self.content.read(digest) {
            Ok(bytes) => Bytes::from(bytes),
            Err(ContentError::NotFound(_)) => {
                let bytes = session
                    .small_blob(digest, manifest.config.size, CONFIG_LIMIT)
                    .await?;
                self.content.write_verified(digest, &bytes)?;
                bytes
            }
            Err(e) => return Err(e.into()),
        };
        Ok(manifest::parse_config(&bytes, digest, manifest)?)
    }

    fn record(&self, resolution: &Resolution, config: &ImageConfig) -> ImageRecord {
        let manifest = &resolution.manifest;
        let chains = chain_ids(&config.rootfs.diff_ids);
        let layers: Vec<LayerRecord> = manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .zip(chains)
            .map(|((layer, diff_id), chain_id)| LayerRecord {
                digest: layer.digest.clone(),
                diff_id: diff_id.clone(),
                chain_id,
                size: layer.size,
                media_type: layer.media_type.clone(),
                annotations: layer.annotations.clone(),
            })
            .collect();
        let index_size = resolution.index.as_ref().map_or(0, |(_, b)| b.len() as u64);
        let size = index_size
            + resolution.manifest_bytes.len() as u64
            + manifest.config.size
            + layers.iter().map(|l| l.size).sum::<u64>();
        let (uid, username) = manifest::user_of(config);
        ImageRecord {
            id: manifest.config.digest.clone(),
            manifest: resolution.manifest_digest.clone(),
            index: resolution.index.as_ref().map(|(d, _)| d.clone()),
            layers,
            size,
            uid,
            username,
        }
    }

    /// Unpacks an image's layers whose snapshots are missing from its blobs in the content
    /// store, as after a switch to another snapshotter; nothing is downloaded.
    pub async fn restore(self: &Arc<Self>, record: &ImageRecord) -> Result<(), PullError> {
        let _layers = self.leases.acquire(record.layer_leases().collect()).await;
        let resolved = Resolved {
            reference: record.id.to_string(),
            manifest_digest: record.manifest.to_string(),
            layers: vec![],
        };
        self.unpack(None, &record.layers, resolved, &None).await
    }

    /// Unpacks the layers whose chain is not committed yet and commits them. Without a
    /// session, only blobs in the content store can be used.
    async fn unpack(
        self: &Arc<Self>,
        session: Option<&Session>,
        layers: &[LayerRecord],
        resolved: Resolved,
        progress: &Progress,
    ) -> Result<(), PullError> {
        // Locks are taken base first by every pull, so two pulls cannot deadlock.
        let mut guards = Vec::with_capacity(layers.len());
        for layer in layers {
            guards.push(self.locks.lock(layer.chain_id.as_str()).await);
        }
        let missing = self.missing_layers(layers).await?;
        self.check_access(layers, &missing).await?;
        send(
            progress,
            Event::Resolved(Resolved {
                layers: layers
                    .iter()
                    .enumerate()
                    .map(|(i, l)| Layer {
                        digest: l.digest.to_string(),
                        size: l.size,
                        present: !missing.contains(&i),
                    })
                    .collect(),
                ..resolved
            }),
        );
        let job = |i: usize| LayerJob {
            session: session.cloned(),
            layer: layers[i].clone(),
            progress: progress.clone(),
        };
        let committed = match self.snapshotter.rebase() {
            true => match self.unpack_independent(layers, &missing, &job).await {
                // Rare (a hardlink to a lower layer's file, a path through a lower
                // layer's symlink, a whiteout through the layer's own), and only where a
                // snapshotter can also apply a layer onto its parent: then it does.
                Err(e) if e.needs_parent() => {
                    tracing::info!(error = %e, "applying the layers onto their parents instead");
                    self.unpack_on_parents(layers, &missing, job).await
                }
                other => other,
            },
            false => self.unpack_on_parents(layers, &missing, job).await,
        };
        if committed.is_ok() && self.discard_unpacked_layers {
            self.discard(missing.iter().map(|&i| layers[i].digest.clone()).collect())
                .await;
        }
        drop(guards);
        committed
    }

    /// Applies every missing layer at once, each into a snapshot of its own, and commits
    /// them base first, each rebased onto the one below.
    async fn unpack_independent(
        self: &Arc<Self>,
        layers: &[LayerRecord],
        missing: &[usize],
        job: impl Fn(usize) -> LayerJob,
    ) -> Result<(), PullError> {
        let downloads = Arc::new(Semaphore::new(self.max_concurrent_downloads));
        // Largest first: the biggest layer sets how long the pull takes, so it must not
        // wait for a download slot behind small ones.
        let mut order = missing.to_vec();
        order.sort_by_key(|&i| Reverse(layers[i].size));
        let mut tasks = Vec::with_capacity(order.len());
        for i in order {
            let permit = downloads
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let this = self.clone();
            let job = job(i);
            let task = tokio::spawn(
                async move {
                    let _permit = permit;
                    this.unpack_layer(job, None).await
                }
                .in_current_span(),
            );
            tasks.push((i, task));
        }
        // Each layer is committed as soon as it and the ones below are applied: a rebase
        // that merges trees (native) then overlaps the layers still being applied.
        tasks.sort_by_key(|(i, _)| *i);
        let mut settler = Settler::new(self.snapshotter.clone());
        for (i, task) in tasks {
            let outcome = task.await.expect("layer task");
            let (layer, parent) = (layers[i].clone(), parent_chain(layers, i));
            settler = tokio::task::spawn_blocking(move || {
                settler.settle(&layer, parent.as_ref(), outcome);
                settler
            })
            .await
            .expect("commit task");
        }
        tokio::task::spawn_blocking(move || settler.finish())
            .await
            .expect("removal task")
    }

    /// Applies each missing layer onto its committed parent and commits it, base first.
    /// Downloads still run side by side: the layer next in line streams straight into its
    /// snapshot, the others go to the content store and wait there for their parent.
    async fn unpack_on_parents(
        self: &Arc<Self>,
        layers: &[LayerRecord],
        missing: &[usize],
        job: impl Fn(usize) -> LayerJob,
    ) -> Result<(), PullError> {
        let (report, watch) = watch::channel(Chained::default());
        let report = Arc::new(report);
        let downloads = Arc::new(Semaphore::new(self.max_concurrent_downloads));
        // Everything waits for the layer next in line, so it downloads first; then the
        // largest, as in unpack_independent.
        let mut order: Vec<usize> = (0..missing.len()).collect();
        if let Some(rest) = order.get_mut(1..) {
            rest.sort_by_key(|&p| Reverse(layers[missing[p]].size));
        }
        // Dropped (this pull cancelled), the set aborts every task; each task's Outcome then
        // tells the layers waiting above it.
        let mut tasks = JoinSet::new();
        for position in order {
            let i = missing[position];
            let step = Step {
                position,
                parent: parent_chain(layers, i),
                permit: downloads
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open"),
                watch: watch.clone(),
            };
            let (this, job) = (self.clone(), job(i));
            let outcome = Outcome {
                report: report.clone(),
                position,
                committed: false,
            };
            tasks.spawn(
                async move {
                    let mut outcome = outcome;
                    let result = this.unpack_onto_parent(job, step).await;
                    outcome.committed = result.is_ok();
                    (position, result)
                }
                .in_current_span(),
            );
        }
        // The lowest failure is the cause: the layers above it only gave up.
        let mut failure: Option<(usize, PullError)> = None;
        let mut committed = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined.expect("layer task") {
                (position, Ok(())) => committed.push(position),
                (position, Err(e)) => {
                    if failure
                        .as_ref()
                        .is_none_or(|(lowest, _)| position < *lowest)
                    {
                        failure = Some((position, e));
                    }
                }
            }
        }
        let Some((_, error)) = failure else {
            return Ok(());
        };
        // As with overlayfs, a failed pull leaves none of its layers: top first, since a
        // committed snapshot with children cannot go.
        committed.sort_unstable_by_key(|&position| Reverse(position));
        let chains: Vec<String> = committed
            .iter()
            .map(|&position| layers[missing[position]].chain_id.to_string())
            .collect();
        let snapshotter = self.snapshotter.clone();
        tokio::task::spawn_blocking(move || remove_all(snapshotter.as_ref(), &chains))
            .await
            .expect("removal task");
        Err(error)
    }

    async fn unpack_onto_parent(
        self: Arc<Self>,
        job: LayerJob,
        step: Step,
    ) -> Result<(), PullError> {
        let Step {
            position,
            parent,
            permit,
            mut watch,
        } = step;
        let layer = job.layer.clone();
        let below_failed = || PullError::BelowFailed {
            digest: layer.digest.clone(),
        };
        let state = watch.borrow().parent_of(position);
        if state == ParentState::Failed {
            return Err(below_failed());
        }
        if state == ParentState::Pending {
            // A failure below ends the wait for the download too; what was already received
            // goes on into the content store in the background.
            tokio::select! {
                stored = self.download(&job) => stored?,
                _ = watch.wait_for(|chained| chained.parent_of(position) == ParentState::Failed) => {
                    return Err(below_failed());
                }
            }
            drop(permit);
            let state = watch
                .wait_for(|chained| chained.parent_of(position) != ParentState::Pending)
                .await
                .map(|chained| chained.parent_of(position));
            if !matches!(state, Ok(ParentState::Committed)) {
                return Err(below_failed());
            }
        }
        let key = self.clone().unpack_layer(job, parent).await?;
        let snapshotter = self.snapshotter.clone();
        tokio::task::spawn_blocking(move || {
            let committed =
                snapshotter.commit(layer.chain_id.as_str(), &key, None, snapshot_labels(&layer));
            committed.map_err(|source| {
                remove_all(snapshotter.as_ref(), &[key]);
                PullError::Snapshot {
                    key: layer.chain_id.to_string(),
                    source,
                }
            })
        })
        .await
        .expect("commit task")
    }

    /// Stores a layer's blob in the content store (digest and size checked), unless it is
    /// there already.
    async fn download(&self, job: &LayerJob) -> Result<(), PullError> {
        if self.content.contains(&job.layer.digest) {
            return Ok(());
        }
        let (rx, writer) = self.fetch(job).await?;
        let layer = job.layer.clone();
        tokio::task::spawn_blocking(move || pipeline::store(rx, writer, &layer))
            .await
            .expect("download task")
    }

    /// Starts a layer's download: the body's chunks, and the content store's writer for them.
    async fn fetch(
        &self,
        job: &LayerJob,
    ) -> Result<(mpsc::Receiver<io::Result<Bytes>>, Writer), PullError> {
        let layer = &job.layer;
        let Some(session) = &job.session else {
            return Err(PullError::BlobGone {
                digest: layer.digest.clone(),
            });
        };
        // Blocking: a partial download to resume from is hashed first.
        let (content, digest, size) = (self.content.clone(), layer.digest.clone(), layer.size);
        let writer = plumbing::blocking(move || content.writer(&digest, size))
            .await
            .map_err(|source| PullError::Blob {
                digest: layer.digest.clone(),
                source,
            })?;
        let response = session.blob_from(&layer.digest, writer.written()).await?;
        let rx = pump(
            response,
            session.clone(),
            layer.clone(),
            job.progress.clone(),
            writer.written(),
        );
        Ok((rx, writer))
    }

    /// Layers unpacked earlier are not fetched again, but an encrypted one still needs a key
    /// this node holds: a node that lost the key must lose the image too.
    async fn check_access(
        &self,
        layers: &[LayerRecord],
        missing: &[usize],
    ) -> Result<(), PullError> {
        let present: Vec<LayerRecord> = layers
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                !missing.contains(i) && processors::ocicrypt::is_encrypted(&l.media_type)
            })
            .map(|(_, l)| l.clone())
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        let processors = self.processors.clone();
        tokio::task::spawn_blocking(move || {
            present.iter().try_for_each(|layer| {
                processors
                    .check_access(&layer.descriptor())
                    .map_err(|source| PullError::Processor {
                        digest: layer.digest.clone(),
                        source,
                    })
            })
        })
        .await
        .expect("key check task")
    }

    async fn missing_layers(&self, layers: &[LayerRecord]) -> Result<Vec<usize>, PullError> {
        let snapshotter = self.snapshotter.clone();
        let chains: Vec<Digest> = layers.iter().map(|l| l.chain_id.clone()).collect();
        tokio::task::spawn_blocking(move || {
            let mut missing = Vec::new();
            for (i, chain) in chains.iter().enumerate() {
                match snapshotter.stat(chain.as_str()) {
                    Ok(info) if info.kind == snapshotters::Kind::Committed => {}
                    Ok(_) | Err(snapshotters::Error::NotFound { .. }) => missing.push(i),
                    Err(source) => {
                        return Err(PullError::Snapshot {
                            key: chain.to_string(),
                            source,
                        });
                    }
                }
            }
            Ok(missing)
        })
        .await
        .expect("stat task")
    }

    /// Removes the blobs of layers this pull committed (under their chain locks, so no
    /// other pull is unpacking them). A failure is only logged: the image is complete.
    async fn discard(&self, digests: Vec<Digest>) {
        let content = self.content.clone();
        tokio::task::spawn_blocking(move || {
            for digest in digests {
                if let Err(e) = content.delete(&digest) {
                    tracing::warn!(%digest, error = %e, "discarding an unpacked layer's blob failed");
                }
            }
        })
        .await
        .expect("discard task");
    }

    /// Prepares a snapshot on `parent` and fills it; returns its key, or removes it on error.
    async fn unpack_layer(
        self: Arc<Self>,
        job: LayerJob,
        parent: Option<Digest>,
    ) -> Result<String, PullError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let key = format!(
            "{EXTRACT_KEY_PREFIX}{nanos}-{} {}",
            std::process::id(),
            job.layer.chain_id
        );
        let labels = snapshot_labels(&job.layer);
        let snapshotter = self.snapshotter.clone();
        let prepare_key = key.clone();
        tokio::task::spawn_blocking(move || {
            snapshotter.prepare(&prepare_key, parent.as_ref().map(Digest::as_str), labels)
        })
        .await
        .expect("prepare task")
        .map_err(|source| PullError::Snapshot {
            key: key.clone(),
            source,
        })?;
        let started = std::time::Instant::now();
        let result = self.fill(&job, &key).await;
        tracing::debug!(
            digest = %job.layer.digest,
            size = job.layer.size,
            elapsed = ?started.elapsed(),
            ok = result.is_ok(),
            "layer unpacked"
        );
        if result.is_err() {
            let snapshotter = self.snapshotter.clone();
            let remove_key = key.clone();
            let _ = tokio::task::spawn_blocking(move || {
                remove_all(snapshotter.as_ref(), &[remove_key])
            })
            .await;
        }
        result.map(|()| key)
    }

    async fn fill(&self, job: &LayerJob, key: &str) -> Result<(), PullError> {
        let layer = &job.layer;
        // A blob another pull discards meanwhile (the same layer under another chain) is
        // downloaded again rather than failing this pull.
        let local = self
            .content
            .contains(&layer.digest)
            .then(|| self.content.open_blob(&layer.digest).ok())
            .flatten();
        let source = if let Some(file) = local {
            send_layer(&job.progress, layer, layer.size, true);
            Source::Local(file)
        } else {
            let (rx, writer) = self.fetch(job).await?;
            Source::Remote { rx, writer }
        };
        let snapshotter = self.snapshotter.clone();
        let processors = self.processors.clone();
        let layer = layer.clone();
        let key = key.to_string();
        let limits = self.unpack_limits;
        tokio::task::spawn_blocking(move || {
            let stages = Stages {
                snapshotter: snapshotter.as_ref(),
                processors: &processors,
                limits,
            };
            apply_blob(&stages, &key, &layer, source)
        })
        .await
        .expect("apply task")
    }
}

struct LayerJob {
    /// None when only the content store may be used.
    session: Option<Session>,
    layer: LayerRecord,
    progress: Progress,
}

/// One layer's place in [`Puller::unpack_on_parents`].
struct Step {
    /// Index among the missing layers.
    position: usize,
    /// Chain ID of the layer below, committed before this one applies.
    parent: Option<Digest>,
    /// A download slot, held until the blob is stored.
    permit: OwnedSemaphorePermit,
    watch: watch::Receiver<Chained>,
}

/// Reports a layer task's end to the layers waiting above it, also when the task panics or
/// is aborted.
struct Outcome {
    report: Arc<watch::Sender<Chained>>,
    position: usize,
    committed: bool,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let (position, committed) = (self.position, self.committed);
        self.report
            .send_modify(|chained| chained.record(position, committed));
    }
}

/// How far [`Puller::unpack_on_parents`] has come: missing layers commit base first, so a
/// count says which are done.
#[derive(Debug, Default)]
struct Chained {
    committed: usize,
    /// The lowest position that failed.
    failed: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParentState {
    Committed,
    Pending,
    /// A layer at or below the parent failed, so it will never be committed.
    Failed,
}

impl Chained {
    fn parent_of(&self, position: usize) -> ParentState {
        if self.committed >= position {
            ParentState::Committed
        } else if self.failed.is_some_and(|failed| failed < position) {
            ParentState::Failed
        } else {
            ParentState::Pending
        }
    }

    fn record(&mut self, position: usize, committed: bool) {
        if committed {
            self.committed += 1;
        } else {
            self.failed = Some(self.failed.map_or(position, |f| f.min(position)));
        }
    }
}

/// The chain ID below layer `i`.
fn parent_chain(layers: &[LayerRecord], i: usize) -> Option<Digest> {
    i.checked_sub(1).map(|p| layers[p].chain_id.clone())
}

fn names(reference: &Reference, top: &Digest) -> Vec<String> {
    match &reference.digest {
        Some(_) => vec![reference.to_string()],
        None => vec![reference.to_string(), reference.with_digest(top)],
    }
}

fn send(progress: &Progress, event: Event) {
    if let Some(tx) = progress {
        let _ = tx.send(event);
    }
}

fn send_layer(progress: &Progress, layer: &LayerRecord, downloaded: u64, finished: bool) {
    send(
        progress,
        Event::Layer(LayerProgress {
            digest: layer.digest.to_string(),
            downloaded,
            size: layer.size,
            finished,
        }),
    );
}

/// Commits the layers a pull unpacked, base first, each onto the one below; once one fails
/// (to apply or to commit), removes every snapshot the pull unpacked, committed or not, and
/// keeps the lowest failure.
struct Settler {
    snapshotter: Arc<dyn Snapshotter>,
    /// Names committed by this pull, base first.
    committed: Vec<String>,
    failure: Option<PullError>,
}

impl Settler {
    fn new(snapshotter: Arc<dyn Snapshotter>) -> Self {
        Settler {
            snapshotter,
            committed: Vec::new(),
            failure: None,
        }
    }

    /// Takes the outcome of the next layer up: its Active snapshot's key, or why it failed.
    fn settle(
        &mut self,
        layer: &LayerRecord,
        parent: Option<&Digest>,
        outcome: Result<String, PullError>,
    ) {
        let key = match outcome {
            Ok(key) if self.failure.is_some() => {
                return remove_all(self.snapshotter.as_ref(), &[key]);
            }
            Ok(key) => key,
            Err(e) => {
                self.failure.get_or_insert(e);
                return;
            }
        };
        let name = layer.chain_id.as_str();
        let parent = parent.map(Digest::as_str);
        match self
            .snapshotter
            .commit(name, &key, parent, snapshot_labels(layer))
        {
            Ok(()) => self.committed.push(name.to_owned()),
            Err(source) => {
                remove_all(self.snapshotter.as_ref(), &[key]);
                self.failure = Some(PullError::Snapshot {
                    key: name.to_owned(),
                    source,
                });
            }
        }
    }

    fn finish(mut self) -> Result<(), PullError> {
        let Some(failure) = self.failure else {
            return Ok(());
        };
        // Top first: a committed snapshot with children cannot go.
        self.committed.reverse();
        remove_all(self.snapshotter.as_ref(), &self.committed);
        Err(failure)
    }
}

fn remove_all(snapshotter: &dyn Snapshotter, keys: &[String]) {
    for key in keys {
        if let Err(e) = snapshotter.remove(key) {
            tracing::warn!(key, error = %e, "removing an unfinished snapshot failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemorySnapshotter;
    use snapshotters::Kind;

    fn layers(count: u8) -> Vec<LayerRecord> {
        let diff_ids: Vec<Digest> = (0..count).map(|i| Digest::of(&[i])).collect();
        diff_ids
            .iter()
            .zip(chain_ids(&diff_ids))
            .map(|(diff_id, chain_id)| LayerRecord {
                digest: Digest::of(diff_id.as_str().as_bytes()),
                diff_id: diff_id.clone(),
                chain_id,
                size: 1,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                annotations: BTreeMap::new(),
            })
            .collect()
    }

    /// What `unpack_independent` settles for layers `missing`: each layer with its parent,
    /// and its parentless Active snapshot as `unpack_layer` prepares it.
    fn unpacked(
        snapshotter: &MemorySnapshotter,
        layers: &[LayerRecord],
        missing: &[usize],
    ) -> (Vec<(LayerRecord, Option<Digest>)>, Vec<String>) {
        let mut plan = Vec::new();
        let mut keys = Vec::new();
        for &i in missing {
            let key = format!("{EXTRACT_KEY_PREFIX}{i} {}", layers[i].chain_id);
            snapshotter
                .prepare(&key, None, snapshot_labels(&layers[i]))
                .unwrap();
            plan.push((layers[i].clone(), parent_chain(layers, i)));
            keys.push(key);
        }
        (plan, keys)
    }

    /// Settles the outcomes in layer order, as `unpack_independent` does.
    fn settle(
        snapshotter: &Arc<MemorySnapshotter>,
        plan: &[(LayerRecord, Option<Digest>)],
        outcomes: Vec<Result<String, PullError>>,
    ) -> Result<(), PullError> {
        let mut settler = Settler::new(snapshotter.clone());
        for ((layer, parent), outcome) in plan.iter().zip(outcomes) {
            settler.settle(layer, parent.as_ref(), outcome);
        }
        settler.finish()
    }

    fn interrupted() -> PullError {
        PullError::Stream {
            digest: Digest::of(b"x"),
            detail: "connection reset".into(),
        }
    }

    #[test]
    fn settle_commits_missing_layers_on_top_of_present_ones() {
        let snapshotter = Arc::new(MemorySnapshotter::default());
        let layers = layers(3);
        let base = layers[0].chain_id.as_str();
        snapshotter.prepare("base", None, BTreeMap::new()).unwrap();
        snapshotter
            .commit(base, "base", None, BTreeMap::new())
            .unwrap();
        let (plan, keys) = unpacked(&snapshotter, &layers, &[1, 2]);

        settle(&snapshotter, &plan, keys.into_iter().map(Ok).collect()).unwrap();

        for (i, layer) in layers.iter().enumerate() {
            let info = snapshotter.stat(layer.chain_id.as_str()).unwrap();
            assert_eq!(info.kind, Kind::Committed);
            let parent = i.checked_sub(1).map(|p| layers[p].chain_id.to_string());
            assert_eq!(info.parent, parent);
            if i > 0 {
                assert_eq!(info.labels, snapshot_labels(layer));
            }
        }
        assert_eq!(snapshotter.tree().len(), 3);
    }

    #[test]
    fn a_failed_layer_removes_every_snapshot_the_pull_unpacked() {
        let snapshotter = Arc::new(MemorySnapshotter::default());
        let layers = layers(3);
        let (plan, keys) = unpacked(&snapshotter, &layers, &[0, 1, 2]);
        snapshotter.remove(&keys[1]).unwrap();
        let outcomes = vec![Ok(keys[0].clone()), Err(interrupted()), Ok(keys[2].clone())];

        let error = settle(&snapshotter, &plan, outcomes).unwrap_err();

        assert!(matches!(error, PullError::Stream { .. }), "{error}");
        assert_eq!(snapshotter.tree(), vec![]);
    }

    #[test]
    fn a_layer_that_needs_its_parent_says_so_from_its_apply_or_its_commit() {
        let needs = || snapshotters::Error::Layer {
            path: "bin/x".into(),
            reason: snapshotters::LayerError::NeedsParent {
                target: "bin/x".into(),
            },
        };
        let digest = Digest::of(b"layer");
        let apply = PullError::Apply {
            digest: digest.clone(),
            source: needs(),
        };
        let commit = PullError::Snapshot {
            key: "chain".into(),
            source: needs(),
        };
        assert!(apply.needs_parent() && commit.needs_parent());
        assert!(!interrupted().needs_parent());
        let other = PullError::Apply {
            digest,
            source: snapshotters::Error::Layer {
                path: "x".into(),
                reason: snapshotters::LayerError::Truncated,
            },
        };
        assert!(!other.needs_parent());
    }

    #[test]
    fn a_failed_commit_removes_every_snapshot_the_pull_unpacked() {
        let snapshotter = Arc::new(MemorySnapshotter::default());
        let layers = layers(3);
        let (plan, keys) = unpacked(&snapshotter, &layers, &[0, 1, 2]);
        let taken = layers[1].chain_id.as_str();
        snapshotter.prepare(taken, None, BTreeMap::new()).unwrap();

        let error = settle(&snapshotter, &plan, keys.into_iter().map(Ok).collect()).unwrap_err();

        let PullError::Snapshot { key, .. } = &error else {
            panic!("{error}");
        };
        assert_eq!(key, taken);
        assert_eq!(
            snapshotter.tree(),
            vec![(taken.to_string(), Kind::Active, None)]
        );
    }
}
