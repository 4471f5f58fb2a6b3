//! Start-up and serving: opens the stores, recovers from a crash, and serves the CRI image
//! service and the internal API on one unix socket until told to stop.

use crate::check;
use crate::config::Config;
use crate::content::{ContentError, ContentStore};
use crate::cri::ImageServer;
use crate::images::{ImageStore, ImageStoreError};
use crate::internal_api::InternalApi;
use crate::manifest::HostPlatform;
use crate::metrics::Metrics;
use crate::pull::{EXTRACT_KEY_PREFIX, PullSettings};
use crate::registry::Registry;
use crate::service::ImageService;
use proto::imaged::images_server::ImagesServer;
use proto::imaged::snapshots_server::SnapshotsServer;
use snapshotters::{Backend, Kind, Snapshots, Snapshotter};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the daemon could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file system operation failed.
    #[error("{path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The metadata database could not be opened.
    #[error("opening {path}: {message}")]
    Database {
        /// Database file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// The content store could not be opened.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// The stream processors are misconfigured.
    #[error("stream processors: {0}")]
    Processors(#[from] processors::Error),
    /// Image records could not be loaded.
    #[error(transparent)]
    Images(#[from] ImageStoreError),
    /// The snapshotter could not be opened or cleaned.
    #[error("snapshotter: {0}")]
    Snapshotter(#[from] snapshotters::Error),
    /// The store could not be checked.
    #[error(transparent)]
    Check(#[from] check::CheckError),
    /// Garbage collection after a repair failed.
    #[error(transparent)]
    Gc(#[from] crate::gc::GcError),
    /// The gRPC server failed.
    #[error("serving {path}: {message}")]
    Serve {
        /// Socket.
        path: PathBuf,
        /// Cause.
        message: String,
    },
}

/// How long running requests (pulls, mostly) may go on once the daemon is told to stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A daemon ready to serve.
pub struct Daemon {
    service: Arc<ImageService>,
    /// The metrics endpoint's socket, bound at start so a taken port fails the start.
    metrics: Option<(tokio::net::TcpListener, Arc<Metrics>)>,
    address: PathBuf,
    socket_gid: Option<u32>,
    gc_interval: Option<std::time::Duration>,
}

impl Daemon {
    /// Opens the stores under `config.root` and recovers from an earlier crash.
    pub async fn open(config: &Config) -> Result<Self, StartError> {
        let root = &config.root;
        // Both are imaged's own. Nothing but imaged reads the store; the state directory
        // can be passed through (0711) to reach the socket, whose group decides who may.
        own_dir(root, 0o700)?;
        own_dir(&config.state, 0o711)?;
        let db_path = root.join("meta.redb");
        let db = redb::Database::create(&db_path).map_err(|e| StartError::Database {
            path: db_path.clone(),
            message: e.to_string(),
        })?;
        let db = Arc::new(db);
        let content = Arc::new(ContentStore::open(root)?);
        let images = Arc::new(ImageStore::open(db.clone())?);
        let (snapshotter, retired) = snapshotters(config, &db)?;
        let snapshotter = Arc::new(snapshotter.with_sync_fs(config.image_pull_with_sync_fs));
        drop_unfinished_extractions(snapshotter.as_ref())?;
        let retired = recover_retired(retired);
        warn_overlapping_processors(config);
        let metrics = Arc::new(Metrics::default());
        let settings = PullSettings {
            registry: Registry::new(
                &config.registry.config_path,
                config.deadlines(),
                metrics.clone(),
            ),
            processors: config.processors()?,
            max_concurrent_downloads: config.max_concurrent_downloads,
            discard_unpacked_layers: config.discard_unpacked_layers,
            platform: HostPlatform::current(),
            unpack_limits: config.unpack_limits(),
            max_layers: (config.max_image_layers > 0).then_some(config.max_image_layers),
        };
        let snapshotter: Arc<dyn Snapshotter> = snapshotter;
        let service = Arc::new(ImageService::new(
            content,
            images,
            snapshotter,
            retired,
            settings,
            &config.pinned_images,
            metrics.clone(),
        ));
        if let Err(e) = service.collect_garbage().await {
            tracing::warn!(error = %e, "start-up garbage collection failed");
        }
        let metrics = match &config.metrics_address {
            Some(address) => Some((bind_metrics(address).await?, metrics)),
            None => None,
        };
        Ok(Self {
            service,
            metrics,
            address: config.address.clone(),
            socket_gid: config.socket_gid().map_err(|message| StartError::Io {
                path: config.address.clone(),
                source: std::io::Error::other(message),
            })?,
            gc_interval: config.gc_interval(),
        })
    }

    /// Serves until `shutdown` resolves, then lets running requests finish for up to
    /// [`SHUTDOWN_GRACE`]; those still running then are dropped, which stops their pulls
    /// (a crash would leave no less, and start-up clears it).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), StartError> {
        let listener = plumbing::grpc::bind(&self.address, self.socket_gid).map_err(|source| {
            StartError::Io {
                path: self.address.clone(),
                source,
            }
        })?;
        tracing::info!(socket = %self.address.display(), "serving CRI image service");
        let collector = self
            .gc_interval
            .map(|every| tokio::spawn(collect_every(self.service.clone(), every)));
        let exporter = self.metrics.map(|(listener, metrics)| {
            let service = self.service.clone();
            let figures = move || {
                let service = service.clone();
                async move { service.store_figures().await }
            };
            tokio::spawn(crate::metrics::serve(listener, metrics, figures))
        });
        let internal = InternalApi::new(self.service.clone());
        let (stopping, stopped) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            shutdown.await;
            let _ = stopping.send(());
        };
        let server = tonic::transport::Server::builder()
            .layer(plumbing::grpc::RpcSpans::new(rpc_span))
            .add_service(ImageServer::new(self.service.clone()))
            .add_service(ImagesServer::new(internal.clone()))
            .add_service(SnapshotsServer::new(internal))
            .serve_with_incoming_shutdown(plumbing::grpc::incoming(listener), shutdown);
        let grace_over = async {
            match stopped.await {
                Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            result = server => result,
            () = grace_over => {
                tracing::warn!(
                    grace = ?SHUTDOWN_GRACE,
                    "requests still running are abandoned; the next start clears what they left"
                );
                Ok(())
            }
        };
        for task in collector.into_iter().chain(exporter) {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.address);
        result.map_err(|e| StartError::Serve {
            path: self.address.clone(),
            message: plumbing::error_chain(&e),
        })
    }
}

async fn bind_metrics(address: &str) -> Result<tokio::net::TcpListener, StartError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Io {
            path: PathBuf::from(address),
            source,
        })?;
    if let Ok(bound) = listener.local_addr() {
        tracing::info!(address = %bound, "serving metrics");
    }
    Ok(listener)
}

/// Collects garbage every `every`, for what no RemoveImage leads to: the documents of pulls
/// that failed, snapshots a runtime let go of.
async fn collect_every(service: Arc<ImageService>, every: std::time::Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = service.collect_garbage().await {
            tracing::warn!(error = %e, "periodic garbage collection failed");
        }
    }
}

/// The span every RPC runs in; handlers fill in `image` once they have parsed the request.
fn rpc_span(method: &str) -> tracing::Span {
    tracing::info_span!("rpc", method, image = tracing::field::Empty)
}

/// Creates `path` if needed and gives it `mode`.
fn own_dir(path: &Path, mode: u32) -> Result<(), StartError> {
    let io = |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)
}

/// Snapshots of layers that were being unpacked when an earlier process stopped.
fn drop_unfinished_extractions(snapshotter: &dyn Snapshotter) -> Result<(), StartError> {
    let mut stale = Vec::new();
    snapshotter.walk(&mut |info| {
        if info.kind == Kind::Active && info.name.starts_with(EXTRACT_KEY_PREFIX) {
            stale.push(info.name.clone());
        }
    })?;
    for key in stale {
        tracing::info!(key, "removing unfinished layer snapshot");
        snapshotter.remove(&key)?;
    }
    snapshotter.cleanup()?;
    Ok(())
}

/// The configured snapshotter, and the others that hold snapshots from earlier runs (so
/// the garbage collector removes what no image needs any more). One of the others that
/// cannot be opened is left alone with a warning.
fn snapshotters(
    config: &Config,
    db: &Arc<redb::Database>,
) -> Result<(Snapshots, Vec<Snapshots>), StartError> {
    let snapshots = config.root.join("snapshots");
    let configured = config.snapshotter;
    let open =
        |backend: Backend| Snapshots::open(backend, snapshots.join(backend.name()), db.clone());
    let mut retired = Vec::new();
    for backend in Backend::ALL.into_iter().filter(|b| *b != configured) {
        if !snapshots.join(backend.name()).is_dir() {
            continue;
        }
        match open(backend) {
            Ok(snapshotter) => retired.push(snapshotter),
            Err(error) => warn_unusable(backend, &error),
        }
    }
    Ok((open(configured)?, retired))
}

/// The earlier snapshotters without their unfinished extractions; one that fails to drop
/// them is left alone with a warning.
fn recover_retired(retired: Vec<Snapshots>) -> Vec<Arc<dyn Snapshotter>> {
    let mut recovered: Vec<Arc<dyn Snapshotter>> = Vec::new();
    for snapshotter in retired {
        match drop_unfinished_extractions(&snapshotter) {
            Ok(()) => recovered.push(Arc::new(snapshotter)),
            Err(error) => warn_unusable(snapshotter.backend(), &error),
        }
    }
    recovered
}

fn warn_unusable(backend: Backend, error: &dyn std::fmt::Display) {
    tracing::warn!(
        snapshotter = %backend,
        %error,
        "snapshots of an earlier snapshotter cannot be collected"
    );
}

/// Checks the store under `config.root` while no daemon runs, holding the database's lock
/// throughout so none can start meanwhile; `None` when a daemon holds it (ask that one).
/// With `repair`, the collector then takes what only the removed images used.
pub async fn check_store(
    config: &Config,
    repair: bool,
) -> Result<Option<Vec<check::Problem>>, StartError> {
    let db_path = config.root.join("meta.redb");
    let db = match redb::Database::open(&db_path) {
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Ok(None),
        opened => opened.map(Arc::new).map_err(|e| StartError::Database {
            path: db_path,
            message: e.to_string(),
        })?,
    };
    let content = Arc::new(ContentStore::open_as_found(&config.root)?);
    let images = Arc::new(ImageStore::open(db.clone())?);
    let (snapshotter, retired) = snapshotters(config, &db)?;
    let snapshotters: Vec<Arc<dyn Snapshotter>> = std::iter::once(snapshotter)
        .chain(retired)
        .map(|s| Arc::new(s) as Arc<dyn Snapshotter>)
        .collect();
    let store = check::Store {
        content: content.clone(),
        images: images.clone(),
        snapshotters: snapshotters.clone(),
        live: false,
    };
    let problems = plumbing::blocking(move || check::run(&store, repair)).await?;
    if repair {
        let leases = Arc::new(crate::gc::Leases::default());
        crate::gc::collect(images, content, snapshotters, leases).await?;
    }
    Ok(Some(problems))
}

/// Two processors accepting one media type: the first name in sort order wins, as
/// `processors::Chain` picks; say so, since containerd leaves the choice to chance.
fn warn_overlapping_processors(config: &Config) {
    let mut first = std::collections::BTreeMap::new();
    for (name, processor) in &config.stream_processors {
        for media_type in &processor.accepts {
            let used = *first.entry(media_type.as_str()).or_insert(name.as_str());
            if used != name {
                tracing::warn!(
                    media_type,
                    used,
                    ignored = %name,
                    "two stream processors accept one media type"
                );
            }
        }
    }
}
