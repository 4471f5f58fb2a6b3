//! gRPC over unix sockets, server and client side, as both daemons serve it and their
//! command-line clients dial it.

use crate::authority::{self, Filtered};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
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
/// there is refused. The socket is bound under a staging name and renamed into place once
/// its mode and group are set, so no client ever finds it with others.
pub fn bind(path: &Path, gid: Option<u32>) -> io::Result<UnixListener> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::fs::create_dir_all(parent)?;
    let dir = rustix::fs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    remove_stale(&dir, name)?;
    let staged = format!(".{}.{}", name.to_string_lossy(), std::process::id());
    // Through the directory's descriptor the address stays short, however deep the
    // directory: a socket address holds 107 bytes.
    let address = format!("/proc/self/fd/{}/{staged}", dir.as_raw_fd());
    let _ = rustix::fs::unlinkat(&dir, staged.as_str(), AtFlags::empty());
    let listener = UnixListener::bind(&address)?;
    let placed = rustix::fs::chmodat(
        &dir,
        staged.as_str(),
        Mode::from_raw_mode(0o660),
        AtFlags::empty(),
    )
    .and_then(|()| match gid {
        Some(gid) => rustix::fs::chownat(
            &dir,
            staged.as_str(),
            None,
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::empty(),
        ),
        None => Ok(()),
    })
    // NOREPLACE: a file that appeared at `path` since the stale socket went is kept.
    .and_then(|()| {
        rustix::fs::renameat_with(&dir, staged.as_str(), &dir, name, RenameFlags::NOREPLACE)
    });
    if let Err(e) = placed {
        let _ = rustix::fs::unlinkat(&dir, staged.as_str(), AtFlags::empty());
        return Err(e.into());
    }
    Ok(listener)
}

/// Removes a socket left at `name` in `dir` by an earlier process, and staged sockets of
/// earlier processes (`.<name>.<pid>`); anything else at `name` is refused.
fn remove_stale(dir: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Socket => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        Err(_) => {}
    }
    let prefix = format!(".{}.", name.to_string_lossy());
    let listing = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for entry in rustix::fs::Dir::read_from(&listing)? {
        let entry = entry?;
        let staged = entry.file_name().to_string_lossy();
        let is_staged = staged
            .strip_prefix(&prefix)
            .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if is_staged && entry.file_type() == FileType::Socket {
            let _ = rustix::fs::unlinkat(dir, entry.file_name(), AtFlags::empty());
        }
    }
    Ok(())
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
    use std::os::unix::fs::PermissionsExt;
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
        // A staged socket a crashed process left is cleared by the next bind.
        let crashed = path.with_file_name(".d.sock.99999999");
        drop(std::os::unix::net::UnixListener::bind(&crashed).unwrap());
        drop(bind(&path, None).unwrap());
        assert!(!crashed.exists());
        // A path of 100 bytes binds, though a staging name beside it would not fit.
        let deep = dir
            .path()
            .join("x".repeat(100 - dir.path().as_os_str().len() - 8));
        let long = deep.join("a.sock");
        assert_eq!(long.as_os_str().len(), 100);
        drop(bind(&long, None).unwrap());
        assert!(long.exists());
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
