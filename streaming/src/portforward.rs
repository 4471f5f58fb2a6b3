//! `portforward.k8s.io` over SPDY: for each connection it forwards, the client opens an
//! `error` and a `data` stream carrying the same `requestID` and `port`; once both are
//! there the server dials the port and copies bytes both ways on the data stream, and a
//! failure is reported as text on the error stream.

use crate::spdy::frame::status;
use crate::spdy::{Session, Stream, StreamWriter};
use crate::{Output, Runtime};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Connections one session dials at once; the others wait their turn (each dial may take
/// a thread of the runtime's for seconds).
const MAX_DIALS: usize = 16;

/// The two streams of one forwarded connection, as they arrive.
#[derive(Default)]
struct Pair {
    error: Option<Stream>,
    data: Option<Stream>,
    since: Option<Instant>,
}

/// What a stream's headers say about it.
struct Key {
    data: bool,
    port: u16,
    request: String,
}

fn key(stream: &Stream) -> Result<Key, String> {
    let headers = &stream.headers;
    let data = match headers.get("streamtype") {
        Some("data") => true,
        Some("error") => false,
        other => return Err(format!("stream type {other:?} is not data or error")),
    };
    let port = headers
        .get("port")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port {:?} is not 1 to 65535", headers.get("port")))?;
    let request = headers
        .get("requestid")
        .ok_or("no requestID header")?
        .to_string();
    Ok(Key {
        data,
        port,
        request,
    })
}

/// Serves port forwards to `sandbox` on `session` until the client goes away; a pair that
/// stays incomplete for `timeout` is reset.
pub async fn serve<R: Runtime>(
    mut session: Session,
    runtime: Arc<R>,
    sandbox: String,
    timeout: Duration,
) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let dials = Arc::new(tokio::sync::Semaphore::new(MAX_DIALS));
    let mut sweep = tokio::time::interval(timeout.max(Duration::from_millis(100)) / 2);
    loop {
        let stream = tokio::select! {
            stream = session.accept() => stream,
            _ = sweep.tick() => {
                drop_stale(&mut pairs, timeout).await;
                continue;
            }
        };
        let Some(stream) = stream else { break };
        let key = match key(&stream) {
            Ok(key) => key,
            Err(e) => {
                tracing::debug!(stream = stream.id, error = %e, "bad port-forward stream");
                stream.output.reset(status::PROTOCOL_ERROR).await;
                continue;
            }
        };
        let pair = pairs.entry(key.request.clone()).or_default();
        pair.since.get_or_insert_with(Instant::now);
        let slot = if key.data {
            &mut pair.data
        } else {
            &mut pair.error
        };
        if slot.is_some() {
            stream.output.reset(status::PROTOCOL_ERROR).await;
            continue;
        }
        *slot = Some(stream);
        if pair.error.is_some() && pair.data.is_some() {
            let pair = pairs.remove(&key.request).expect("just filed");
            let (error, data) = (pair.error.expect("complete"), pair.data.expect("complete"));
            let runtime = runtime.clone();
            let sandbox = sandbox.clone();
            let ended = session.ended();
            let dials = dials.clone();
            tokio::spawn(async move {
                // A connection lives no longer than its session.
                tokio::select! {
                    () = forward(&*runtime, &sandbox, key.port, error.output, data, &dials) => {}
                    () = ended => {}
                }
            });
        }
    }
    session.close().await;
}

async fn drop_stale(pairs: &mut HashMap<String, Pair>, timeout: Duration) {
    let stale: Vec<String> = pairs
        .iter()
        .filter(|(_, p)| p.since.is_some_and(|t| t.elapsed() >= timeout))
        .map(|(k, _)| k.clone())
        .collect();
    for request in stale {
        let pair = pairs.remove(&request).expect("listed");
        tracing::debug!(request, "port-forward stream pair incomplete; resetting");
        for stream in [pair.error, pair.data].into_iter().flatten() {
            stream.output.reset(status::CANCEL).await;
        }
    }
}

/// One forwarded connection.
async fn forward<R: Runtime>(
    runtime: &R,
    sandbox: &str,
    port: u16,
    error: StreamWriter,
    data: Stream,
    dials: &tokio::sync::Semaphore,
) {
    let dialled = match dials.acquire().await {
        Ok(_turn) => runtime.dial(sandbox, port).await,
        Err(_) => return,
    };
    let tcp = match dialled {
        Ok(tcp) => tcp,
        Err(e) => {
            let text = failure(port, sandbox, &e);
            tracing::info!(%text);
            let _ = error.write(Bytes::from(text)).await;
            let _ = error.finish().await;
            data.output.reset(status::CANCEL).await;
            return;
        }
    };
    copy(tcp, data.input, &data.output).await;
    // The client reads the error stream to its end before it lets the connection go.
    let _ = error.finish().await;
}

/// What the client is told when `port` cannot be dialled.
pub(crate) fn failure(port: u16, sandbox: &str, error: &std::io::Error) -> String {
    format!("error forwarding port {port} to pod {sandbox}: {error}")
}

/// Copies between `tcp` and a data stream. When the port's side ends, the stream ends
/// and the connection is done; when the client's side ends, the port's write side is shut
/// and its answer still flows back.
pub(crate) async fn copy<W: Output>(tcp: TcpStream, mut input: mpsc::Receiver<Bytes>, output: &W) {
    let (mut from_port, mut to_port) = tcp.into_split();
    let upstream = async move {
        while let Some(chunk) = input.recv().await {
            if to_port.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to_port.shutdown().await;
        // Keep the write half (and so the connection) until the port's side is done.
        std::future::pending::<()>().await;
    };
    let downstream = async {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match from_port.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if output
                        .write(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        output.finish().await;
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
