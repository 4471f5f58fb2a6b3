//! runtimed behind the streaming server: exec, attach and port-forward sessions on the
//! containers and pods the service knows.

mod attach;
mod dial;
mod exec;
mod fd;

use crate::service::RuntimeService;
use proto::cri;
use std::sync::Arc;
use streaming::{Io, Outcome};

/// The [`streaming::Runtime`] of runtimed.
pub struct Streamer(pub Arc<RuntimeService>);

impl streaming::Runtime for Streamer {
    async fn exec(&self, request: cri::ExecRequest, io: Io) -> Outcome {
        let target = match self.0.running_container(&request.container_id).await {
            Ok(target) => target,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let outcome = exec::exec(
            target.runtime,
            target.container.id.clone(),
            &target.bundle,
            request.cmd,
            request.tty,
            io,
        )
        .await;
        tracing::info!(container = %target.container.id, %outcome, "exec session ended");
        outcome
    }

    async fn attach(&self, request: cri::AttachRequest, io: Io) -> Outcome {
        let target = match self.0.running_container(&request.container_id).await {
            Ok(target) => target,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let sockets = target.sockets.join(&target.container.id);
        let stdin = target.container.config.stdin;
        let outcome = attach::attach(&sockets, &target.bundle, stdin, io).await;
        tracing::info!(container = %target.container.id, %outcome, "attach session ended");
        outcome
    }

    async fn dial(&self, sandbox_id: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
        let (_, netns) = self
            .0
            .forwarding_netns(sandbox_id)
            .await
            .map_err(std::io::Error::other)?;
        dial::dial(netns, port).await
    }
}
