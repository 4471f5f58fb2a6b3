//! Kubernetes' remote-command protocols over SPDY: the client opens one stream per
//! channel (`error`, `stdin`, `stdout`, `stderr`, `resize`), the server runs the command,
//! ends stdout and stderr, writes how it ended on the error stream and closes.

use crate::spdy::frame::status::REFUSED_STREAM;
use crate::spdy::{Session, Stream, StreamWriter};
use crate::{Io, Outcome, Output, TerminalSize};
use bytes::{Bytes, BytesMut};
use std::time::Duration;
use tokio::sync::mpsc;

/// A remote-command protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// `channel.k8s.io`: no resize; stdin is not carried.
    V1,
    /// `v2.channel.k8s.io`: no resize.
    V2,
    /// `v3.channel.k8s.io`: resize stream.
    V3,
    /// `v4.channel.k8s.io`: resize, and the error stream carries a JSON status.
    V4,
}

impl Version {
    /// The SPDY protocol names, in the server's order of preference.
    pub const SPDY: [(&'static str, Version); 4] = [
        ("v4.channel.k8s.io", Version::V4),
        ("v3.channel.k8s.io", Version::V3),
        ("v2.channel.k8s.io", Version::V2),
        ("channel.k8s.io", Version::V1),
    ];

    fn resizes(self) -> bool {
        self >= Version::V3
    }
}

/// The channels a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// The client sends input.
    pub stdin: bool,
    /// The client wants stdout.
    pub stdout: bool,
    /// The client wants stderr (never with a terminal).
    pub stderr: bool,
    /// A terminal.
    pub tty: bool,
}

/// The status written on the error stream when the session ends; `None` when the
/// protocol writes nothing (v1 to v3 report failures only).
pub fn status(version: Version, outcome: &Outcome) -> Option<String> {
    if version < Version::V4 {
        return match outcome {
            Outcome::Exited(0) => None,
            Outcome::Exited(code) => Some(format!("command terminated with exit code {code}")),
            Outcome::Failed(message) => Some(message.clone()),
        };
    }
    let status = match outcome {
        Outcome::Exited(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(message) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "details": {"causes": [{"message": message}]},
            "code": 500,
        }),
    };
    Some(status.to_string())
}

/// Reads the resize channel: JSON objects one after another, in any framing.
pub(crate) async fn decode_resizes(
    mut input: mpsc::Receiver<Bytes>,
    sizes: mpsc::Sender<TerminalSize>,
) {
    let mut buf = BytesMut::new();
    while let Some(chunk) = input.recv().await {
        buf.extend_from_slice(&chunk);
        let mut parsed = Vec::new();
        let used = {
            let mut objects =
                serde_json::Deserializer::from_slice(&buf).into_iter::<TerminalSize>();
            let mut used = 0;
            loop {
                match objects.next() {
                    Some(Ok(size)) => {
                        used = objects.byte_offset();
                        parsed.push(size);
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "client sent a bad terminal size");
                        return;
                    }
                    None => break,
                }
            }
            used
        };
        for size in parsed {
            if sizes.send(size).await.is_err() {
                return;
            }
        }
        let _ = buf.split_to(used);
        if buf.len() > 4096 {
            tracing::debug!("client's terminal size does not end");
            return;
        }
    }
}

/// Copies what the runtime writes to a channel, then ends the channel.
pub(crate) fn pump<W: Output>(writer: W) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let task = tokio::spawn(async move {
        while let Some(data) = rx.recv().await {
            if writer.write(data).await.is_err() {
                return;
            }
        }
        writer.finish().await;
    });
    (tx, task)
}

/// The streams of one session, by type.
#[derive(Default)]
struct Streams {
    error: Option<StreamWriter>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

impl Streams {
    /// Files `stream` by its `streamtype`; gives it back when the protocol lacks the type.
    fn file(&mut self, stream: Stream, version: Version) -> Option<Stream> {
        let kind = stream.headers.get("streamtype").unwrap_or_default();
        let slot = match kind {
            "error" => {
                self.error = Some(stream.output);
                return None;
            }
            "stdin" => &mut self.stdin,
            "stdout" => &mut self.stdout,
            "stderr" => &mut self.stderr,
            "resize" if version.resizes() => &mut self.resize,
            other => {
                tracing::debug!(stream = stream.id, kind = other, "unexpected stream type");
                return Some(stream);
            }
        };
        *slot = Some(stream);
        None
    }
}

/// Serves one remote-command session: waits up to `timeout` for the streams `wanted`
/// calls for, runs `run` with them, then reports its outcome and closes.
pub async fn serve<F, Fut>(
    mut session: Session,
    version: Version,
    wanted: Wanted,
    timeout: Duration,
    run: F,
) where
    F: FnOnce(Io) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let expected = 1
        + usize::from(wanted.stdin)
        + usize::from(wanted.stdout)
        + usize::from(wanted.stderr)
        + usize::from(wanted.tty && version.resizes());
    let mut streams = Streams::default();
    let collected = tokio::time::timeout(timeout, async {
        let mut count = 0;
        while count < expected {
            let Some(stream) = session.accept().await else {
                return false;
            };
            match streams.file(stream, version) {
                None => count += 1,
                Some(unwanted) => unwanted.output.reset(REFUSED_STREAM).await,
            }
        }
        true
    })
    .await;
    if collected != Ok(true) {
        tracing::info!(
            expected,
            "client did not open its streams in time; closing the session"
        );
        session.close().await;
        return;
    }
    let mut pumps = Vec::new();
    let mut out = |stream: Option<Stream>| {
        stream.map(|s| {
            let (tx, task) = pump(s.output);
            pumps.push(task);
            tx
        })
    };
    let stdout = out(streams.stdout);
    let stderr = out(streams.stderr);
    let resize = streams.resize.map(|s| {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(decode_resizes(s.input, tx));
        rx
    });
    // v1 clients open stdin but the protocol never carried it.
    let stdin = streams
        .stdin
        .filter(|_| version > Version::V1)
        .map(|s| s.input);
    let io = Io {
        stdin,
        stdout,
        stderr,
        resize,
    };
    let ended = session.ended();
    let outcome = tokio::select! {
        outcome = run(io) => outcome,
        () = ended => {
            // Dropping `run` stops the command; nobody is left to tell.
            tracing::info!("client went away; session ended");
            for pump in pumps {
                pump.abort();
            }
            session.close().await;
            return;
        }
    };
    // A client that stops reading must not hold the session here either.
    let report = async {
        for pump in pumps {
            let _ = pump.await;
        }
        if let Some(error) = streams.error {
            if let Some(text) = status(version, &outcome) {
                let _ = error.write(Bytes::from(text)).await;
            }
            let _ = error.finish().await;
        }
    };
    tokio::select! {
        () = report => {}
        () = session.ended() => {}
    }
    session.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_status_is_what_client_go_parses() {
        let success = status(Version::V4, &Outcome::Exited(0)).unwrap();
        assert_eq!(success, r#"{"metadata":{},"status":"Success"}"#);
        let failed: serde_json::Value =
            serde_json::from_str(&status(Version::V4, &Outcome::Exited(3)).unwrap()).unwrap();
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let broken: serde_json::Value = serde_json::from_str(
            &status(Version::V4, &Outcome::Failed("no such container".into())).unwrap(),
        )
        .unwrap();
        assert_eq!(broken["reason"], "InternalError");
        assert_eq!(broken["code"], 500);
        assert_eq!(broken["message"], "no such container");
    }

    #[test]
    fn older_versions_report_failures_only_as_text() {
        assert_eq!(status(Version::V3, &Outcome::Exited(0)), None);
        assert_eq!(
            status(Version::V2, &Outcome::Exited(1)).as_deref(),
            Some("command terminated with exit code 1")
        );
        assert_eq!(
            status(Version::V1, &Outcome::Failed("gone".into())).as_deref(),
            Some("gone")
        );
    }

    #[tokio::test]
    async fn resizes_decode_across_chunk_boundaries() {
        let (tx, rx) = mpsc::channel(8);
        let (sizes_tx, mut sizes) = mpsc::channel(8);
        let task = tokio::spawn(decode_resizes(rx, sizes_tx));
        for chunk in [
            &br#"{"Width":80,"Hei"#[..],
            br#"ght":24}{"Width":100,"Height":30}"#,
            br#" {"Width":1,"Height":2}"#,
        ] {
            tx.send(Bytes::from_static(chunk)).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
        let mut got = Vec::new();
        while let Some(size) = sizes.recv().await {
            got.push((size.width, size.height));
        }
        assert_eq!(got, [(80, 24), (100, 30), (1, 2)]);
    }

    #[tokio::test]
    async fn a_resize_stream_that_never_parses_is_dropped() {
        let (tx, rx) = mpsc::channel(8);
        let (sizes_tx, mut sizes) = mpsc::channel(8);
        let task = tokio::spawn(decode_resizes(rx, sizes_tx));
        tx.send(Bytes::from_static(br#"{"Width":"wide"}"#))
            .await
            .unwrap();
        task.await.unwrap();
        assert!(sizes.recv().await.is_none());
    }
}
