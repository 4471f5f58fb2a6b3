//! Prometheus metrics of imaged's work, served as OpenMetrics text on `metrics_address`
//! (off by default): pulls by result with their durations, pulls in flight, bytes fetched
//! per registry host, garbage collection runs and what they freed, and the store's blobs and
//! snapshots with their bytes (measured when scraped).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Host {
    host: String,
}

/// What a scrape reports of the store, measured by the service.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreFigures {
    /// Committed blobs.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Snapshots of the configured snapshotter.
    pub snapshots: u64,
    /// The bytes of the snapshotter's directory.
    pub snapshot_bytes: u64,
}

/// The metrics; one per daemon, shared by the service and the registry client.
pub struct Metrics {
    registry: Registry,
    pulls: Family<Outcome, Counter>,
    pull_seconds: Family<Outcome, Histogram>,
    in_flight: Gauge,
    fetched: Family<Host, Counter>,
    gc_runs: Counter,
    gc_blobs: Counter,
    gc_blob_bytes: Counter,
    gc_snapshots: Counter,
    blobs: Gauge,
    blob_bytes: Gauge,
    snapshots: Gauge,
    snapshot_bytes: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let pull_seconds = Family::<Outcome, Histogram>::new_with_constructor(|| {
            // 50 ms to about 7 minutes.
            Histogram::new(exponential_buckets(0.05, 2.0, 14))
        });
        let mut metrics = Self {
            registry: Registry::with_prefix("imaged"),
            pulls: Family::default(),
            pull_seconds,
            in_flight: Gauge::default(),
            fetched: Family::default(),
            gc_runs: Counter::default(),
            gc_blobs: Counter::default(),
            gc_blob_bytes: Counter::default(),
            gc_snapshots: Counter::default(),
            blobs: Gauge::default(),
            blob_bytes: Gauge::default(),
            snapshots: Gauge::default(),
            snapshot_bytes: Gauge::default(),
        };
        metrics.register();
        metrics
    }
}

impl Metrics {
    fn register(&mut self) {
        let r = &mut self.registry;
        r.register("pulls", "Image pulls by result", self.pulls.clone());
        r.register(
            "pull_duration_seconds",
            "How long image pulls took, by result",
            self.pull_seconds.clone(),
        );
        r.register(
            "pulls_in_flight",
            "Image pulls running",
            self.in_flight.clone(),
        );
        r.register(
            "registry_fetched_bytes",
            "Bytes received from registries, by host",
            self.fetched.clone(),
        );
        r.register("gc_runs", "Garbage collection passes", self.gc_runs.clone());
        r.register(
            "gc_removed_blobs",
            "Blobs removed by garbage collection",
            self.gc_blobs.clone(),
        );
        r.register(
            "gc_freed_blob_bytes",
            "Bytes of blobs removed by garbage collection",
            self.gc_blob_bytes.clone(),
        );
        r.register(
            "gc_removed_snapshots",
            "Snapshots removed by garbage collection",
            self.gc_snapshots.clone(),
        );
        r.register("blobs", "Blobs in the content store", self.blobs.clone());
        r.register(
            "blob_bytes",
            "Bytes of the blobs in the content store",
            self.blob_bytes.clone(),
        );
        r.register(
            "snapshots",
            "Snapshots of the configured snapshotter",
            self.snapshots.clone(),
        );
        r.register(
            "snapshot_bytes",
            "Bytes of the configured snapshotter's directory",
            self.snapshot_bytes.clone(),
        );
    }

    /// A pull starts; the guard records its end.
    pub fn pull_started(self: &Arc<Self>) -> PullTimer {
        self.in_flight.inc();
        PullTimer {
            metrics: self.clone(),
            started: std::time::Instant::now(),
            succeeded: false,
        }
    }

    /// Bytes that arrived from a registry host.
    pub fn fetched(&self, host: &str, bytes: u64) {
        self.fetched
            .get_or_create(&Host {
                host: host.to_string(),
            })
            .inc_by(bytes);
    }

    /// A garbage collection pass finished.
    pub fn collected(&self, blobs: u64, blob_bytes: u64, snapshots: u64) {
        self.gc_runs.inc();
        self.gc_blobs.inc_by(blobs);
        self.gc_blob_bytes.inc_by(blob_bytes);
        self.gc_snapshots.inc_by(snapshots);
    }

    /// The exposition, with the store's figures as measured now.
    pub fn encode(&self, store: StoreFigures) -> String {
        let set = |gauge: &Gauge, value: u64| gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        set(&self.blobs, store.blobs);
        set(&self.blob_bytes, store.blob_bytes);
        set(&self.snapshots, store.snapshots);
        set(&self.snapshot_bytes, store.snapshot_bytes);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}

/// Records one pull when dropped: in flight until then, a failure unless marked done.
pub struct PullTimer {
    metrics: Arc<Metrics>,
    started: std::time::Instant,
    succeeded: bool,
}

impl PullTimer {
    /// The pull succeeded.
    pub fn succeeded(mut self) {
        self.succeeded = true;
    }
}

impl Drop for PullTimer {
    fn drop(&mut self) {
        let outcome = Outcome {
            result: if self.succeeded { "success" } else { "failure" },
        };
        self.metrics.in_flight.dec();
        self.metrics.pulls.get_or_create(&outcome).inc();
        self.metrics
            .pull_seconds
            .get_or_create(&outcome)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped; `figures` measures the
/// store for each scrape.
pub async fn serve<F, Fut>(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, figures: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = StoreFigures> + Send,
{
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // Out of descriptors, say: wait rather than spin.
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, figures) = (metrics.clone(), figures.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let (metrics, figures) = (metrics.clone(), figures.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(answer(&request, &metrics, figures).await)
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "metrics connection");
            }
        });
    }
}

async fn answer<B, F, Fut>(
    request: &Request<B>,
    metrics: &Metrics,
    figures: F,
) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = StoreFigures>,
{
    if request.uri().path() != "/metrics" || request.method() != hyper::Method::GET {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let text = metrics.encode(figures().await);
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}
