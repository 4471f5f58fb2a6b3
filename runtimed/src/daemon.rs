//! Start-up and serving: the state directories, and the CRI runtime service on its unix
//! socket until told to stop.

use crate::config::Config;
use crate::cri::CriRuntimeService;
use crate::service::RuntimeService;
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
        let root = config.root.clone();
        let service = RuntimeService::open(config).map_err(|source| StartError::Io {
            path: root.join("sandboxes"),
            source,
        })?;
        Ok(Self {
            address,
            service: Arc::new(service),
        })
    }

    /// Serves until `shutdown` resolves, then lets running requests finish.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), StartError> {
        let listener = plumbing::grpc::bind(&self.address).map_err(|source| StartError::Io {
            path: self.address.clone(),
            source,
        })?;
        self.service.remove_unrecorded().await;
        tracing::info!(socket = %self.address.display(), "serving CRI runtime service");
        let result = tonic::transport::Server::builder()
            .layer(plumbing::grpc::RpcSpans::new(rpc_span))
            .add_service(RuntimeServiceServer::new(CriRuntimeService::new(
                self.service.clone(),
            )))
            .serve_with_incoming_shutdown(plumbing::grpc::incoming(listener), shutdown)
            .await;
        let _ = std::fs::remove_file(&self.address);
        result.map_err(|e| StartError::Serve {
            path: self.address.clone(),
            message: plumbing::error_chain(&e),
        })
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
