//! The CRI streaming server: the URLs that Exec, Attach and PortForward answer with, and
//! the protocols a client speaks on them once the HTTP connection is upgraded: SPDY/3.1
//! with Kubernetes' remote-command (`v4.channel.k8s.io` down to `channel.k8s.io`) and
//! `portforward.k8s.io` sub-protocols, and their WebSocket variants.
//!
//! The crate knows nothing of containers: a [`Runtime`] runs the command, attaches to the
//! container or dials the port, and this crate carries the bytes.

mod portforward;
pub mod remotecommand;
pub mod server;
pub mod spdy;
mod websocket;

pub use server::{Config, RequestError, Server};

use bytes::Bytes;
use proto::cri;
use std::future::Future;
use tokio::sync::mpsc;

/// A terminal size, as the client's resize stream sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TerminalSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The client's side of an exec or attach session, as the request asked for it.
#[derive(Debug, Default)]
pub struct Io {
    /// What the client types; closed at the client's end of input.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// The command's stdout (or its terminal); dropping it ends the client's stdout.
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// The command's stderr; never with a terminal.
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Terminal sizes, the first as soon as the client knows it; only with a terminal.
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
}

/// How an exec or attach session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command exited with this status (0 for an attach that ended normally).
    Exited(i32),
    /// The session could not run; the text goes to the client.
    Failed(String),
}

/// The client is gone: what was written cannot reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gone;

/// One channel towards the client, whatever carries it (a SPDY stream, a WebSocket
/// channel), so that copying into it is written once.
pub(crate) trait Output: Send + Sync + 'static {
    /// Sends `data` on the channel.
    fn write(&self, data: Bytes) -> impl Future<Output = Result<(), Gone>> + Send;

    /// Tells the client nothing more comes on the channel, where the protocol can.
    fn finish(&self) -> impl Future<Output = ()> + Send;
}

/// What the streaming server needs from the runtime behind it.
pub trait Runtime: Send + Sync + 'static {
    /// Runs the request's command in its container with `io` until the command exits.
    /// When the client goes away first, the returned future is dropped: the command must
    /// be killed when it is (in a `Drop`), since nothing else will tell.
    fn exec(&self, request: cri::ExecRequest, io: Io) -> impl Future<Output = Outcome> + Send;

    /// Joins the container's stdio until the container exits or the client detaches
    /// (which leaves the container running).
    fn attach(&self, request: cri::AttachRequest, io: Io) -> impl Future<Output = Outcome> + Send;

    /// A TCP connection to `port` on the pod's loopback (in its network namespace, or the
    /// host's for a host-network pod).
    fn dial(
        &self,
        sandbox_id: &str,
        port: u16,
    ) -> impl Future<Output = std::io::Result<tokio::net::TcpStream>> + Send;
}
