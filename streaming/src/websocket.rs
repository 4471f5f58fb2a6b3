//! Kubernetes' channel protocols over WebSocket. Every message carries one channel's data
//! behind the channel's number: a byte, or in the `base64.` variants a digit followed by
//! the data in base64 (then messages are text). Remote command uses channels 0 to 4
//! (stdin, stdout, stderr, error, resize); port forward a data and an error channel per
//! port. A session ends with a close frame.

use crate::remotecommand::{self, Version, Wanted};
use crate::server::{offers, plain};
use crate::{Gone, Io, Outcome, Output, Runtime, portforward};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::{Sink, SinkExt as _, Stream, StreamExt as _};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// The first byte of v5's close signal; the second names the channel the client ends.
const CLOSE_SIGNAL: u8 = 255;

/// The most ports one port-forward session carries: two channels each, numbered in a byte.
pub(crate) const MAX_PORTS: usize = 128;

/// The largest message and frame a client may send: the SPDY side's frame limit, well
/// above what the Kubernetes clients write at once.
const MAX_MESSAGE: usize = 1 << 20;

/// tungstenite's settings with this server's size limits.
fn limits() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// How long a closed session waits for the client's close frame before it drops the
/// connection.
const LINGER: Duration = Duration::from_secs(2);

/// A subprotocol this server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Protocol {
    /// Its name; empty for the client that offers none.
    name: &'static str,
    /// Messages are text: the channel as a digit, then the data in base64.
    base64: bool,
    /// How the error channel reports the end of a remote command.
    status: Version,
    /// The client may end one of its channels with `[255, channel]`.
    close_signal: bool,
}

impl Protocol {
    const fn binary(name: &'static str, status: Version) -> Self {
        Self {
            name,
            base64: false,
            status,
            close_signal: false,
        }
    }

    const fn text(name: &'static str, status: Version) -> Self {
        Self {
            name,
            base64: true,
            status,
            close_signal: false,
        }
    }
}

/// The remote-command subprotocols. The client's order of preference decides.
pub(crate) const REMOTE_COMMAND: &[Protocol] = &[
    Protocol {
        name: "v5.channel.k8s.io",
        base64: false,
        status: Version::V4,
        close_signal: true,
    },
    Protocol::binary("v4.channel.k8s.io", Version::V4),
    Protocol::text("v4.base64.channel.k8s.io", Version::V4),
    Protocol::binary("v3.channel.k8s.io", Version::V3),
    Protocol::binary("v2.channel.k8s.io", Version::V2),
    Protocol::binary("channel.k8s.io", Version::V1),
    Protocol::text("base64.channel.k8s.io", Version::V1),
    Protocol::binary("", Version::V1),
];

/// The port-forward subprotocols.
pub(crate) const PORT_FORWARD: &[Protocol] = &[
    Protocol::binary("v4.channel.k8s.io", Version::V4),
    Protocol::text("v4.base64.channel.k8s.io", Version::V4),
    Protocol::binary("", Version::V4),
];

type HttpResponse = Response<Full<Bytes>>;

/// How a handshake is answered.
pub(crate) enum Handshake {
    /// With this 101; the session speaks the protocol.
    Accepted(Protocol, HttpResponse),
    /// With this refusal.
    Refused(HttpResponse),
}

/// Checks a client's WebSocket handshake and picks the first subprotocol it offers that
/// is `supported`.
pub(crate) fn accept(headers: &HeaderMap, supported: &[Protocol]) -> Handshake {
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        let mut refusal = plain(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13");
        refusal.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Handshake::Refused(refusal);
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Handshake::Refused(plain(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key is required",
        ));
    };
    let offered = offers(headers, header::SEC_WEBSOCKET_PROTOCOL);
    let Some(protocol) = choose(&offered, supported) else {
        let names: Vec<&str> = supported
            .iter()
            .map(|p| p.name)
            .filter(|n| !n.is_empty())
            .collect();
        return Handshake::Refused(plain(
            StatusCode::FORBIDDEN,
            &format!(
                "none of the subprotocols {offered:?} is supported; this URL speaks {names:?}"
            ),
        ));
    };
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers_out = response.headers_mut();
    headers_out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers_out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .expect("base64 is a valid header value");
    headers_out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if !protocol.name.is_empty() {
        headers_out.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol.name),
        );
    }
    Handshake::Accepted(protocol, response)
}

/// The first offer that is supported; a client that offers nothing gets the unnamed
/// protocol.
fn choose(offered: &[String], supported: &[Protocol]) -> Option<Protocol> {
    if offered.is_empty() {
        return supported.iter().find(|p| p.name.is_empty()).copied();
    }
    offered.iter().find_map(|offer| {
        supported
            .iter()
            .find(|p| !p.name.is_empty() && p.name == offer)
            .copied()
    })
}

/// Serves one exec or attach session on `io`: runs `run` with the channels `wanted`
/// calls for, then writes its outcome on the error channel and closes. A client that
/// goes away drops `run`.
pub(crate) async fn remote_command<T, F, Fut>(
    io: T,
    protocol: Protocol,
    wanted: Wanted,
    idle: Duration,
    run: F,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(Io) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(limits())).await;
    let (stdin_tx, stdin) = if wanted.stdin {
        let (tx, rx) = mpsc::channel(8);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let (resize_tx, resize) = if wanted.tty {
        let (tx, rx) = mpsc::channel(4);
        let (sizes_tx, sizes) = mpsc::channel(4);
        tokio::spawn(remotecommand::decode_resizes(rx, sizes_tx));
        (Some(tx), Some(sizes))
    } else {
        (None, None)
    };
    let mut inputs = vec![None; usize::from(RESIZE) + 1];
    inputs[usize::from(STDIN)] = stdin_tx;
    inputs[usize::from(RESIZE)] = resize_tx;
    let mut connection = Connection::start(ws, protocol, inputs, idle);
    // Clients wait for a first message, empty, on the lowest channel they read before
    // they take the session as open.
    let first = if wanted.stdout {
        STDOUT
    } else if wanted.stderr {
        STDERR
    } else {
        ERROR
    };
    if connection.outbox.send(first, &[]).await.is_err() {
        return;
    }
    let mut pumps = Vec::new();
    let mut pump = |number: u8| {
        let (tx, task) = remotecommand::pump(connection.channel(number));
        pumps.push(task);
        tx
    };
    let io = Io {
        stdin,
        stdout: wanted.stdout.then(|| pump(STDOUT)),
        stderr: wanted.stderr.then(|| pump(STDERR)),
        resize,
    };
    let outcome = tokio::select! {
        outcome = run(io) => outcome,
        () = connection.gone() => {
            tracing::info!("WebSocket client went away; ending its session");
            return;
        }
    };
    let outbox = connection.outbox.clone();
    let report = async move {
        for pump in pumps {
            let _ = pump.await;
        }
        if let Some(text) = remotecommand::status(protocol.status, &outcome) {
            let _ = outbox.send(ERROR, text.as_bytes()).await;
        }
    };
    tokio::select! {
        () = report => connection.close().await,
        () = connection.gone() => {}
    }
}

/// Serves port forwards to `ports` of `sandbox` on `io`, one connection per port, until
/// every one has ended or the client goes away.
pub(crate) async fn port_forward<T, R: Runtime>(
    io: T,
    protocol: Protocol,
    runtime: Arc<R>,
    sandbox: String,
    ports: Vec<u16>,
    idle: Duration,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(limits())).await;
    let mut inputs = Vec::with_capacity(2 * ports.len());
    let mut data = Vec::with_capacity(ports.len());
    for _ in &ports {
        let (tx, rx) = mpsc::channel(8);
        inputs.extend([Some(tx), None]);
        data.push(rx);
    }
    let mut connection = Connection::start(ws, protocol, inputs, idle);
    // Every channel opens with its port, so that the client knows which is which.
    for (pair, port) in (0u8..).zip(&ports) {
        for channel in [2 * pair, 2 * pair + 1] {
            if connection
                .outbox
                .send(channel, &port.to_le_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let forwards = futures_util::future::join_all((0u8..).zip(ports.iter().zip(data)).map(
        |(pair, (port, input))| {
            let data = connection.channel(2 * pair);
            let error = connection.channel(2 * pair + 1);
            forward(&*runtime, &sandbox, *port, input, data, error)
        },
    ));
    tokio::select! {
        _ = forwards => connection.close().await,
        () = connection.gone() => {}
    }
}

/// One forwarded port: the client's data channel copied to and from a connection to it,
/// or why it could not be dialled on the error channel.
async fn forward<R: Runtime>(
    runtime: &R,
    sandbox: &str,
    port: u16,
    input: mpsc::Receiver<Bytes>,
    data: Channel,
    error: Channel,
) {
    match runtime.dial(sandbox, port).await {
        Ok(tcp) => portforward::copy(tcp, input, &data).await,
        Err(e) => {
            let text = portforward::failure(port, sandbox, &e);
            tracing::info!(%text);
            let _ = error.write(Bytes::from(text)).await;
        }
    }
}

/// When either side last sent a message.
struct Activity {
    epoch: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing has gone either way for `idle`.
    async fn expired(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let quiet = self.epoch.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// Messages to the client, framed for the session's protocol.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Message>,
    base64: bool,
}

impl Outbox {
    async fn send(&self, channel: u8, data: &[u8]) -> Result<(), Gone> {
        self.tx
            .send(frame(self.base64, channel, data))
            .await
            .map_err(|_| Gone)
    }
}

fn frame(base64: bool, channel: u8, data: &[u8]) -> Message {
    if base64 {
        let mut text = String::with_capacity(1 + data.len().div_ceil(3) * 4);
        text.push(char::from(b'0'.wrapping_add(channel)));
        STANDARD.encode_string(data, &mut text);
        Message::text(text)
    } else {
        let mut bytes = BytesMut::with_capacity(1 + data.len());
        bytes.put_u8(channel);
        bytes.put_slice(data);
        Message::binary(bytes.freeze())
    }
}

/// One channel to the client.
struct Channel {
    outbox: Outbox,
    number: u8,
}

impl Output for Channel {
    async fn write(&self, data: Bytes) -> Result<(), Gone> {
        self.outbox.send(self.number, &data).await
    }

    // A channel has no end of its own towards the client: the close frame ends them all.
    async fn finish(&self) {}
}

/// A running WebSocket session: a task writes what the outbox queues, another hands
/// what the client sends to the inputs of its channels. Dropping it drops the connection.
struct Connection {
    outbox: Outbox,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Connection {
    /// Starts the session; `inputs[n]` gets what the client sends on channel `n` (`None`:
    /// a channel whose input is dropped).
    fn start<T>(
        ws: WebSocketStream<T>,
        protocol: Protocol,
        inputs: Vec<Option<mpsc::Sender<Bytes>>>,
        idle: Duration,
    ) -> Self
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        let activity = Arc::new(Activity::new());
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(write_messages(sink, rx, activity.clone()));
        let reader = tokio::spawn(read_messages(stream, protocol, inputs, activity, idle));
        Self {
            outbox: Outbox {
                tx,
                base64: protocol.base64,
            },
            reader,
            writer,
        }
    }

    fn channel(&self, number: u8) -> Channel {
        Channel {
            outbox: self.outbox.clone(),
            number,
        }
    }

    /// Resolves once the client has gone away: closed, broken, or idle too long.
    async fn gone(&mut self) {
        let _ = (&mut self.reader).await;
    }

    /// Sends the close frame after everything queued and waits a little for the client
    /// to answer it.
    async fn close(mut self) {
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }));
        if self.outbox.tx.send(close).await.is_err() {
            return;
        }
        if tokio::time::timeout(LINGER, &mut self.writer)
            .await
            .is_err()
        {
            tracing::debug!("WebSocket client did not read the close frame");
            return;
        }
        if tokio::time::timeout(LINGER, &mut self.reader)
            .await
            .is_err()
        {
            tracing::debug!("WebSocket client kept the connection open after the close frame");
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Writes queued messages until the close frame, or until nothing can queue more.
async fn write_messages<S>(
    mut sink: S,
    mut queued: mpsc::Receiver<Message>,
    activity: Arc<Activity>,
) where
    S: Sink<Message, Error = WsError> + Unpin,
{
    while let Some(message) = queued.recv().await {
        let closing = message.is_close();
        if let Err(e) = sink.send(message).await {
            tracing::debug!(error = %e, "WebSocket write failed");
            return;
        }
        activity.touch();
        if closing {
            return;
        }
    }
}

/// Reads the client's messages into `inputs` until the client closes, breaks the
/// protocol, or sends nothing (and is sent nothing) for `idle`.
async fn read_messages<S>(
    mut stream: S,
    protocol: Protocol,
    mut inputs: Vec<Option<mpsc::Sender<Bytes>>>,
    activity: Arc<Activity>,
    idle: Duration,
) where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            () = activity.expired(idle) => {
                tracing::debug!(?idle, "WebSocket session idle; closing");
                return;
            }
        };
        let data = match message {
            Some(Ok(message @ (Message::Binary(_) | Message::Text(_)))) => message.into_data(),
            // Pings and the close handshake are answered by the protocol layer; after a
            // close frame the stream ends.
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "WebSocket read failed");
                return;
            }
            None => return,
        };
        activity.touch();
        match decode(protocol, inputs.len(), data) {
            Incoming::Data(channel, payload) => {
                if !deliver(&mut inputs, channel, payload, &activity, idle).await {
                    return;
                }
            }
            Incoming::Close(channel) => inputs[channel] = None,
            Incoming::Ignored => {}
            Incoming::Broken(why) => {
                tracing::debug!(why, "WebSocket client broke the channel protocol");
                return;
            }
        }
    }
}

/// What one message from the client means.
#[derive(Debug, PartialEq, Eq)]
enum Incoming {
    /// Data for a channel.
    Data(usize, Bytes),
    /// The client ends a channel (v5).
    Close(usize),
    /// Nothing to act on.
    Ignored,
    /// The session cannot go on.
    Broken(&'static str),
}

fn decode(protocol: Protocol, channels: usize, mut data: Bytes) -> Incoming {
    let Some(&first) = data.first() else {
        return Incoming::Ignored;
    };
    if protocol.close_signal && first == CLOSE_SIGNAL {
        return match data[..] {
            [_, channel] if usize::from(channel) < channels => Incoming::Close(channel.into()),
            [_, _] => Incoming::Broken("close signal for a channel the session does not have"),
            _ => Incoming::Broken("close signal without exactly one channel byte"),
        };
    }
    let payload = data.split_off(1);
    if !protocol.base64 {
        return Incoming::Data(first.into(), payload);
    }
    match STANDARD.decode(&payload) {
        Ok(decoded) => Incoming::Data(first.wrapping_sub(b'0').into(), decoded.into()),
        Err(e) => {
            tracing::debug!(error = %e, "WebSocket client sent bad base64");
            Incoming::Ignored
        }
    }
}

/// Hands `payload` to the input of `channel`; a channel nobody reads drops it. `false`
/// when the channel's reader took nothing for the idle timeout: the session ends then, so
/// a client that left with input unread is not waited for longer than that.
async fn deliver(
    inputs: &mut [Option<mpsc::Sender<Bytes>>],
    channel: usize,
    payload: Bytes,
    activity: &Activity,
    idle: Duration,
) -> bool {
    let Some(slot) = inputs.get_mut(channel) else {
        return true;
    };
    let Some(tx) = slot else {
        return true;
    };
    if payload.is_empty() {
        return true;
    }
    tokio::select! {
        sent = tx.send(payload) => {
            if sent.is_err() {
                *slot = None;
            }
            true
        }
        () = activity.expired(idle) => {
            tracing::debug!(?idle, "a WebSocket channel's reader stalled; closing");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> Protocol {
        *REMOTE_COMMAND.iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn the_clients_first_supported_offer_wins() {
        let offered = [
            "v9.channel.k8s.io",
            "v4.channel.k8s.io",
            "v5.channel.k8s.io",
        ]
        .map(String::from);
        assert_eq!(
            choose(&offered, REMOTE_COMMAND).map(|p| p.name),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(choose(&[], REMOTE_COMMAND).map(|p| p.name), Some(""));
        assert_eq!(choose(&["".into()], PORT_FORWARD), None);
        assert_eq!(choose(&["portforward.k8s.io".into()], PORT_FORWARD), None);
    }

    fn handshake(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.clone(), HeaderValue::from_static(value)))
            .collect()
    }

    #[test]
    fn a_handshake_is_answered_with_the_keys_digest_and_the_protocol() {
        let headers = handshake(&[
            (header::SEC_WEBSOCKET_VERSION, "13"),
            // RFC 6455's own example key and answer.
            (header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ=="),
            (
                header::SEC_WEBSOCKET_PROTOCOL,
                "v5.channel.k8s.io, v4.channel.k8s.io",
            ),
        ]);
        let Handshake::Accepted(protocol, response) = accept(&headers, REMOTE_COMMAND) else {
            panic!("a sound handshake is accepted");
        };
        assert_eq!(protocol.name, "v5.channel.k8s.io");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let got = |name| response.headers().get(name).unwrap().to_str().unwrap();
        assert_eq!(
            got(header::SEC_WEBSOCKET_ACCEPT),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(got(header::SEC_WEBSOCKET_PROTOCOL), "v5.channel.k8s.io");
        assert_eq!(got(header::UPGRADE), "websocket");
    }

    #[test]
    fn a_handshake_without_version_13_or_a_key_is_refused() {
        let old = handshake(&[
            (header::SEC_WEBSOCKET_VERSION, "8"),
            (header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let Handshake::Refused(refusal) = accept(&old, REMOTE_COMMAND) else {
            panic!("version 8 is refused");
        };
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
        assert_eq!(refusal.headers()[header::SEC_WEBSOCKET_VERSION], "13");
        let keyless = handshake(&[(header::SEC_WEBSOCKET_VERSION, "13")]);
        let Handshake::Refused(refusal) = accept(&keyless, REMOTE_COMMAND) else {
            panic!("a handshake without a key is refused");
        };
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn base64_frames_are_a_digit_and_base64() {
        let Message::Text(text) = frame(true, STDOUT, b"hello") else {
            panic!("base64 frames are text");
        };
        assert_eq!(text.as_str(), "1aGVsbG8=");
        let Message::Binary(bytes) = frame(false, ERROR, b"x") else {
            panic!("plain frames are binary");
        };
        assert_eq!(&bytes[..], b"\x03x");
    }

    #[test]
    fn close_signals_are_v5_only_and_checked() {
        let v5 = named("v5.channel.k8s.io");
        let v4 = named("v4.channel.k8s.io");
        let msg = |b: &'static [u8]| Bytes::from_static(b);
        assert_eq!(decode(v5, 5, msg(&[255, STDIN])), Incoming::Close(0));
        assert!(matches!(decode(v5, 5, msg(&[255, 5])), Incoming::Broken(_)));
        assert!(matches!(
            decode(v5, 5, msg(&[255, 0, 0])),
            Incoming::Broken(_)
        ));
        assert_eq!(
            decode(v4, 5, msg(&[255, STDIN])),
            Incoming::Data(255, msg(&[0]))
        );
    }

    #[test]
    fn base64_input_is_decoded_and_bad_base64_dropped() {
        let text = named("base64.channel.k8s.io");
        assert_eq!(
            decode(text, 5, Bytes::from_static(b"0aGk=")),
            Incoming::Data(0, Bytes::from_static(b"hi"))
        );
        assert_eq!(
            decode(text, 5, Bytes::from_static(b"0!!")),
            Incoming::Ignored
        );
        assert_eq!(decode(text, 5, Bytes::new()), Incoming::Ignored);
    }
}
