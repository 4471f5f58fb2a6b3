//! gRPC over unix sockets, server and client side, as both daemons serve it and their
//! command-line clients dial it.

use crate::authority::{self, Filtered};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::task::{Context, Poll};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::Instrument as _;
use tracing::instrument::Instrumented;

/// HTTP/2 receive window of clients: a whole ListImages (or ListContainers) answer for
/// thousands of entries fits, so the server never waits for a window update in the middle.
const WINDOW: u32 = 4 << 20;

/// Binds a unix socket at `path` with mode 0660 and, if given, the group `gid`: the parent
/// directory is created and a stale socket from an earlier process replaced; any other file
/// there is refused. The socket is bound under a temporary name and renamed into place once
/// its mode and group are set, so no client ever finds it with others.
pub fn bind(path: &Path, gid: Option<u32>) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        Err(_) => {}
    }
    let mut staged = path.as_os_str().to_owned();
    staged.push(format!(".{}.new", std::process::id()));
    let staged = std::path::PathBuf::from(staged);
    let _ = std::fs::remove_file(&staged);
    let listener = UnixListener::bind(&staged)?;
    let placed = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))
        .and_then(|()| std::os::unix::fs::chown(&staged, None, gid))
        .and_then(|()| std::fs::rename(&staged, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(listener)
}

/// The connections a tonic server takes from `listener`, each behind the `:authority` filter
/// that lets grpc-go clients of before 1.29's unix-socket fix talk to it.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<Filtered>> {
    UnixListenerStream::new(listener).map(|conn| conn.map(authority::filter))
}

/// Opens a gRPC channel over the unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = path.to_path_buf();
    // tonic requires a URI; the connector ignores it and dials the socket.
    Endpoint::from_static("http://localhost")
        .initial_stream_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// A tower layer that runs every RPC of a server inside one span, made from the RPC's path
/// (`/runtime.v1.ImageService/PullImage`) by the daemon's own function, so that each daemon
/// declares the fields its handlers fill in later (an image reference, a container id).
#[derive(Clone, Copy)]
pub struct RpcSpans {
    make: fn(&str) -> tracing::Span,
}

impl RpcSpans {
    /// Spans made by `make` from the RPC's path.
    pub fn new(make: fn(&str) -> tracing::Span) -> Self {
        Self { make }
    }
}

impl<S> tower::Layer<S> for RpcSpans {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced {
            inner,
            make: self.make,
        }
    }
}

/// A service wrapped by [`RpcSpans`].
#[derive(Clone)]
pub struct Traced<S> {
    inner: S,
    make: fn(&str) -> tracing::Span,
}

impl<S, B> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = (self.make)(request.uri().path());
        let future = span.in_scope(|| self.inner.call(request));
        future.instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer as _, Service as _, ServiceExt as _};

    #[test]
    fn bind_replaces_a_stale_socket_and_refuses_other_files() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/d.sock");
        drop(bind(&path, None).unwrap());
        let listener = bind(&path, Some(4242)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 4242);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the socket: {left:?}");
        drop(listener);
        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep").unwrap();
        let err = bind(&file, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[tokio::test]
    async fn every_call_runs_inside_the_span_made_from_its_path() {
        let inner = tower::service_fn(|_: http::Request<()>| async {
            let span = tracing::Span::current();
            let seen = span.metadata().map(|m| (m.name(), span.has_field("path")));
            Ok::<_, std::convert::Infallible>(seen)
        });
        let make: fn(&str) -> tracing::Span = |path| tracing::error_span!("rpc", path);
        let _default = tracing::subscriber::set_default(tracing_subscriber::registry());
        let mut service = RpcSpans::new(make).layer(inner);
        let request = http::Request::builder()
            .uri("/runtime.v1.ImageService/ListImages")
            .body(())
            .unwrap();
        let seen = service.ready().await.unwrap().call(request).await.unwrap();
        assert_eq!(seen, Some(("rpc", true)));
    }
}
