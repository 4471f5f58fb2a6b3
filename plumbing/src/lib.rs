//! Node-level plumbing shared by the daemons: serving and dialling gRPC over unix sockets
//! (with the `:authority` fix old grpc-go clients need), one tracing span per RPC, mounts
//! (overlay options compacted to fit mount(2)'s page), Go-style durations as containerd's
//! configuration files write them, and error chains on one line.
//!
//! Nothing here knows about images or containers; both daemons depend on this crate and it
//! depends on neither.
#![deny(missing_docs)]

pub mod authority;
mod duration;
pub mod grpc;
pub mod mount;

pub use duration::go_duration;

/// A daemon binary's `main`: runs `run` on a multi-threaded tokio runtime and turns its
/// error into `<name>: <error and causes>` on stderr and exit status 1.
pub fn main<E: std::fmt::Display>(
    name: &str,
    run: impl Future<Output = Result<(), E>>,
) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs blocking work (file system, child processes, mounts) on tokio's blocking pool, off
/// the reactor, and returns what it returned. A panic in `work` is passed on.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Resolves at the first SIGTERM or SIGINT, so a daemon can stop accepting connections and
/// let running requests finish. The handlers are installed by this call, not when the future
/// is first polled: a signal that comes once the socket is up but before serving polls its
/// shutdown future must not kill the daemon outright.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing running requests"),
            _ = int.recv() => tracing::info!("SIGINT: finishing running requests"),
        }
    }
}

/// The error and its causes on one line, `outer: cause: root cause` (reqwest, tonic and
/// hyper keep the useful part in their sources).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_joins_every_cause() {
        let error = Outer(std::io::Error::other("root"));
        assert_eq!(error_chain(&error), "outer: root");
    }
}
