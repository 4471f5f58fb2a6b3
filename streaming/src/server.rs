//! The HTTP side: one-time URLs for cached requests, and the upgrade of a client's
//! connection on such a URL to SPDY/3.1 or WebSocket.

use crate::remotecommand::{self, Version, Wanted};
use crate::spdy::Session;
use crate::{Outcome, Runtime, portforward, websocket};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use proto::cri;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The most URLs handed out and not yet used.
pub const MAX_PENDING: usize = 1000;

/// The header a SPDY client offers its protocols in, and the server answers with.
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";

/// How the streaming server runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// A session with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// How long a client has to open the streams of a session.
    pub stream_creation_timeout: Duration,
    /// How long a URL stays usable.
    pub token_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(4 * 3600),
            stream_creation_timeout: Duration::from_secs(30),
            token_ttl: Duration::from_secs(60),
        }
    }
}

/// Why a request gets no URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request contradicts itself (gRPC InvalidArgument).
    #[error("{0}")]
    Invalid(String),
    /// Too many URLs are pending (gRPC ResourceExhausted).
    #[error("{MAX_PENDING} streaming requests are already waiting for their clients")]
    TooMany,
}

/// A request waiting for its client.
#[derive(Debug, Clone)]
enum Cached {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

impl Cached {
    fn path(&self) -> &'static str {
        match self {
            Cached::Exec(_) => "exec",
            Cached::Attach(_) => "attach",
            Cached::PortForward(_) => "portforward",
        }
    }
}

/// The streaming server: hands out URLs and serves them.
pub struct Server<R> {
    runtime: Arc<R>,
    config: Config,
    base: String,
    pending: Mutex<HashMap<String, (Instant, Cached)>>,
}

impl<R: Runtime> Server<R> {
    /// A server whose URLs point at `address` (the listener's own address).
    pub fn new(runtime: R, config: Config, address: SocketAddr) -> Self {
        let host = match address {
            // A wildcard is not an address a client can dial; the kubelet runs here.
            SocketAddr::V4(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
            SocketAddr::V6(a) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
            other => other.to_string(),
        };
        Self {
            runtime: Arc::new(runtime),
            config,
            base: format!("http://{host}"),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// The URL of an exec session.
    pub fn exec_url(&self, request: cri::ExecRequest) -> Result<String, RequestError> {
        streams_check(request.tty, request.stdin, request.stdout, request.stderr)?;
        self.cache(Cached::Exec(request))
    }

    /// The URL of an attach session.
    pub fn attach_url(&self, request: cri::AttachRequest) -> Result<String, RequestError> {
        streams_check(request.tty, request.stdin, request.stdout, request.stderr)?;
        self.cache(Cached::Attach(request))
    }

    /// The URL of a port-forward session.
    pub fn port_forward_url(
        &self,
        request: cri::PortForwardRequest,
    ) -> Result<String, RequestError> {
        if request.pod_sandbox_id.is_empty() {
            return Err(RequestError::Invalid("pod sandbox id is empty".into()));
        }
        if let Some(port) = request.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(RequestError::Invalid(format!(
                "port {port} is not 1 to 65535"
            )));
        }
        self.cache(Cached::PortForward(request))
    }

    fn cache(&self, request: Cached) -> Result<String, RequestError> {
        let mut pending = self.pending.lock().expect("pending");
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, (expires, _)| *expires > Instant::now());
        }
        if pending.len() >= MAX_PENDING {
            return Err(RequestError::TooMany);
        }
        let token = loop {
            let token = new_token();
            if !pending.contains_key(&token) {
                break token;
            }
        };
        let url = format!("{}/{}/{token}", self.base, request.path());
        pending.insert(token, (Instant::now() + self.config.token_ttl, request));
        Ok(url)
    }

    /// The request behind `token`, if it is pending, unexpired and made for `path`; a
    /// token is used up by asking.
    fn consume(&self, path: &str, token: &str) -> Option<Cached> {
        let (expires, request) = self.pending.lock().expect("pending").remove(token)?;
        (expires > Instant::now() && request.path() == path).then_some(request)
    }

    /// Serves connections from `listener` until `shutdown` resolves; sessions already
    /// running carry on.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "streaming server accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let server = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, std::convert::Infallible>(server.handle(request)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "streaming connection failed");
                }
            });
        }
    }

    fn handle(self: &Arc<Self>, mut request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
        }
        let mut parts = request.uri().path().trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let Some(cached) = self.consume(kind, token) else {
            return plain(StatusCode::NOT_FOUND, "unknown or expired streaming URL");
        };
        if is_websocket_upgrade(request.headers()) {
            return self.websocket(cached, request);
        }
        let offers = offers(request.headers(), PROTOCOL_HEADER);
        let supported: &[&str] = match cached {
            Cached::PortForward(_) => &["portforward.k8s.io"],
            _ => &Version::SPDY.map(|(name, _)| name),
        };
        if !is_spdy_upgrade(request.headers()) {
            return plain(
                StatusCode::BAD_REQUEST,
                "expected an upgrade to SPDY/3.1 (Connection: Upgrade, Upgrade: SPDY/3.1)",
            );
        }
        if offers.is_empty() {
            return plain(
                StatusCode::BAD_REQUEST,
                "X-Stream-Protocol-Version is required",
            );
        }
        let Some(protocol) = offers
            .iter()
            .find_map(|o| supported.iter().find(|s| *s == o))
        else {
            let mut response = plain(
                StatusCode::FORBIDDEN,
                &format!("none of the protocols {offers:?} is supported"),
            );
            for name in supported {
                response.headers_mut().append(
                    "x-accepted-stream-protocol-versions",
                    header::HeaderValue::from_static(name),
                );
            }
            return response;
        };
        let upgrade = hyper::upgrade::on(&mut request);
        let server = self.clone();
        let protocol: &'static str = protocol;
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => server.run(cached, protocol, TokioIo::new(upgraded)).await,
                Err(e) => tracing::debug!(error = %e, "streaming upgrade failed"),
            }
        });
        let mut response = Response::new(Full::default());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        headers.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("SPDY/3.1"),
        );
        headers.insert(PROTOCOL_HEADER, header::HeaderValue::from_static(protocol));
        response
    }

    /// Answers a WebSocket handshake for `cached` and serves the session once the
    /// connection is upgraded.
    fn websocket(
        self: &Arc<Self>,
        cached: Cached,
        mut request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket handshake is a GET",
            );
        }
        let supported = match &cached {
            Cached::PortForward(forward) if forward.port.len() > websocket::MAX_PORTS => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "at most {} ports go over one WebSocket",
                        websocket::MAX_PORTS
                    ),
                );
            }
            Cached::PortForward(_) => websocket::PORT_FORWARD,
            _ => websocket::REMOTE_COMMAND,
        };
        let (protocol, response) = match websocket::accept(request.headers(), supported) {
            websocket::Handshake::Accepted(protocol, response) => (protocol, response),
            websocket::Handshake::Refused(refusal) => return refusal,
        };
        let upgrade = hyper::upgrade::on(&mut request);
        let server = self.clone();
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    server
                        .run_websocket(cached, protocol, TokioIo::new(upgraded))
                        .await;
                }
                Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
            }
        });
        response
    }

    async fn run_websocket<T>(&self, cached: Cached, protocol: websocket::Protocol, io: T)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let idle = self.config.idle_timeout;
        let runtime = &self.runtime;
        match cached {
            Cached::Exec(request) => {
                let wanted = wanted(request.tty, request.stdin, request.stdout, request.stderr);
                websocket::remote_command(io, protocol, wanted, idle, |io| {
                    runtime.exec(request, io)
                })
                .await;
            }
            Cached::Attach(request) => {
                let wanted = wanted(request.tty, request.stdin, request.stdout, request.stderr);
                websocket::remote_command(io, protocol, wanted, idle, |io| {
                    runtime.attach(request, io)
                })
                .await;
            }
            Cached::PortForward(request) => {
                // port_forward_url let only 1 to 65535 through.
                let ports = request
                    .port
                    .iter()
                    .filter_map(|p| u16::try_from(*p).ok())
                    .collect();
                websocket::port_forward(
                    io,
                    protocol,
                    runtime.clone(),
                    request.pod_sandbox_id,
                    ports,
                    idle,
                )
                .await;
            }
        }
    }

    async fn run<T>(&self, cached: Cached, protocol: &str, io: T)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let session = Session::start(io, self.config.idle_timeout);
        let timeout = self.config.stream_creation_timeout;
        let version = Version::SPDY
            .iter()
            .find(|(name, _)| *name == protocol)
            .map(|(_, v)| *v);
        match (cached, version) {
            (Cached::Exec(request), Some(version)) => {
                let wanted = wanted(request.tty, request.stdin, request.stdout, request.stderr);
                let runtime = &self.runtime;
                remotecommand::serve(session, version, wanted, timeout, |io| {
                    runtime.exec(request, io)
                })
                .await;
            }
            (Cached::Attach(request), Some(version)) => {
                let wanted = wanted(request.tty, request.stdin, request.stdout, request.stderr);
                let runtime = &self.runtime;
                remotecommand::serve(session, version, wanted, timeout, |io| {
                    runtime.attach(request, io)
                })
                .await;
            }
            (Cached::PortForward(request), _) => {
                portforward::serve(
                    session,
                    self.runtime.clone(),
                    request.pod_sandbox_id,
                    timeout,
                )
                .await;
            }
            (_, None) => {
                tracing::debug!(protocol, "no remote-command version for protocol");
                session.close().await;
            }
        }
    }
}

/// What a request's flags ask of the client's streams; a terminal merges stderr into it.
fn wanted(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Wanted {
    Wanted {
        stdin,
        stdout,
        stderr: stderr && !tty,
        tty,
    }
}

fn streams_check(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<(), RequestError> {
    if tty && stderr {
        return Err(RequestError::Invalid(
            "tty and stderr cannot both be true: a terminal carries stderr with stdout".into(),
        ));
    }
    if !(stdin || stdout || stderr) {
        return Err(RequestError::Invalid(
            "one of stdin, stdout and stderr must be true".into(),
        ));
    }
    Ok(())
}

/// Eight characters of URL-safe base64 from 6 random bytes, as the kubelet's streaming
/// server makes them.
fn new_token() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 6];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
                .expect("getrandom(2) does not fail on a booted kernel");
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The protocols a client offers in header `name` (`X-Stream-Protocol-Version` for SPDY,
/// `Sec-WebSocket-Protocol` for WebSocket): every one of them, comma lists split.
pub(crate) fn offers(headers: &HeaderMap, name: impl header::AsHeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Whether header `name` lists `want` (in any case) among its comma-separated tokens.
fn lists(headers: &HeaderMap, name: header::HeaderName, want: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
    })
}

fn is_spdy_upgrade(headers: &HeaderMap) -> bool {
    lists(headers, header::CONNECTION, "upgrade") && lists(headers, header::UPGRADE, "spdy/3.1")
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    lists(headers, header::CONNECTION, "upgrade") && lists(headers, header::UPGRADE, "websocket")
}

pub(crate) fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Says why a finished session failed, for runtimes' logs.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(code) => write!(f, "exited with status {code}"),
            Outcome::Failed(message) => write!(f, "failed: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_eight_url_safe_characters() {
        for _ in 0..100 {
            let token = new_token();
            assert_eq!(token.len(), 8);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
        }
    }

    #[test]
    fn offers_split_comma_lists_in_order() {
        let mut headers = HeaderMap::new();
        headers.append(
            PROTOCOL_HEADER,
            "v4.channel.k8s.io, v3.channel.k8s.io".parse().unwrap(),
        );
        headers.append(PROTOCOL_HEADER, "channel.k8s.io".parse().unwrap());
        assert_eq!(
            offers(&headers, PROTOCOL_HEADER),
            ["v4.channel.k8s.io", "v3.channel.k8s.io", "channel.k8s.io"]
        );
    }

    #[test]
    fn requests_that_contradict_themselves_get_no_url() {
        assert!(matches!(
            streams_check(true, false, true, true),
            Err(RequestError::Invalid(_))
        ));
        assert!(matches!(
            streams_check(false, false, false, false),
            Err(RequestError::Invalid(_))
        ));
        assert_eq!(streams_check(true, true, true, false), Ok(()));
    }
}
