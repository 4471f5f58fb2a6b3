//! Start-up and serving: the state directories, and the CRI runtime service on its unix
//! socket until told to stop.

use crate::config::Config;
use crate::cri::{CriRuntimeService, Streams};
use crate::service::RuntimeService;
use crate::stream::Streamer;
use proto::cri::runtime_service_server::RuntimeServiceServer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the daemon could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A directory or the socket could not be made.
    #[error("{path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving {path}: {message}")]
    Serve {
        /// Socket.
        path: PathBuf,
        /// Cause.
        message: String,
    },
}

/// A daemon ready to serve.
pub struct Daemon {
    service: Arc<RuntimeService>,
    address: PathBuf,
    stream_address: std::net::SocketAddr,
    streaming: streaming::Config,
}

impl Daemon {
    /// Creates the root and state directories (conmon's exit and socket directories
    /// among them) and loads the recorded sandboxes and containers.
    pub fn open(config: Config) -> Result<Self, StartError> {
        let (exits, sockets) = (config.exit_dir(), config.attach_dir());
        for dir in [&config.root, &config.state, &exits, &sockets] {
            create_dir(dir)?;
        }
        let address = config.address.clone();
        let stream_address = config.stream_address();
        let streaming = streaming::Config {
            idle_timeout: config.stream_idle_timeout(),
            ..Default::default()
        };
        let root = config.root.clone();
        let service = RuntimeService::open(config).map_err(|source| StartError::Io {
            path: root.join("sandboxes"),
            source,
        })?;
        Ok(Self {
            address,
            stream_address,
            streaming,
            service: Arc::new(service),
        })
    }

    /// Serves until `shutdown` resolves, then lets running requests finish.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), StartError> {
        let listener =
            plumbing::grpc::bind(&self.address, None).map_err(|source| StartError::Io {
                path: self.address.clone(),
                source,
            })?;
        let (streams, stream_listener) = self.bind_streams().await?;
        self.service.remove_unrecorded().await;
        tracing::info!(socket = %self.address.display(), "serving CRI runtime service");
        let (stop_streams, streams_stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(streams.clone().serve(stream_listener, async {
            let _ = streams_stopped.await;
        }));
        let cri = CriRuntimeService::new(self.service.clone(), streams);
        let result = tonic::transport::Server::builder()
            .layer(plumbing::grpc::RpcSpans::new(rpc_span))
            .add_service(RuntimeServiceServer::new(cri))
            .serve_with_incoming_shutdown(plumbing::grpc::incoming(listener), shutdown)
            .await;
        drop(stop_streams);
        let _ = std::fs::remove_file(&self.address);
        result.map_err(|e| StartError::Serve {
            path: self.address.clone(),
            message: plumbing::error_chain(&e),
        })
    }
}

impl Daemon {
    /// The streaming server on its TCP address; the port is chosen now when it is 0.
    async fn bind_streams(&self) -> Result<(Arc<Streams>, tokio::net::TcpListener), StartError> {
        let io = |source| StartError::Io {
            path: PathBuf::from(self.stream_address.to_string()),
            source,
        };
        let listener = tokio::net::TcpListener::bind(self.stream_address)
            .await
            .map_err(io)?;
        let address = listener.local_addr().map_err(io)?;
        tracing::info!(%address, "serving exec, attach and port-forward streams");
        let streamer = Streamer(self.service.clone());
        let server = Streams::new(streamer, self.streaming.clone(), address);
        Ok((Arc::new(server), listener))
    }
}

/// The span every RPC runs in; handlers fill in the ids they act on.
fn rpc_span(method: &str) -> tracing::Span {
    tracing::info_span!(
        "rpc",
        method,
        sandbox = tracing::field::Empty,
        container = tracing::field::Empty
    )
}

fn create_dir(path: &Path) -> Result<(), StartError> {
    std::fs::create_dir_all(path).map_err(|source| StartError::Io {
        path: path.to_path_buf(),
        source,
    })
}
