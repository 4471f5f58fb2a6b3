//! The SPDY side of the streaming server, frame by frame: a small client written with the
//! crate's own frame and header code drives exec, attach and port-forward sessions against
//! a scripted runtime, including the cases real clients rarely produce (flow control, bad
//! frames, streams that never come, clients that vanish).

mod common;

use bytes::{Bytes, BytesMut};
use proto::cri;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use streaming::Config;
use streaming::spdy::Headers;
use streaming::spdy::frame::{FLAG_FIN, Frame, SETTINGS_INITIAL_WINDOW_SIZE, status};
use streaming::spdy::headers::{Deflater, Inflater};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// One client connection, upgraded.
struct Client {
    tcp: TcpStream,
    buf: BytesMut,
    deflater: Deflater,
    inflater: Inflater,
    next_id: u32,
}

/// What the server sent, gathered per stream.
#[derive(Debug, Default)]
struct Seen {
    replied: Vec<u32>,
    data: BTreeMap<u32, Vec<u8>>,
    finished: Vec<u32>,
    resets: Vec<(u32, u32)>,
    pings: Vec<u32>,
    goaway: Option<u32>,
    window_updates: usize,
}

impl Seen {
    fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.data.get(&id).map(Vec::as_slice).unwrap_or_default())
            .into_owned()
    }
}

/// Sends the upgrade request for `url` offering `protocols`; the status and the head.
async fn request(url: &str, protocols: &[&str]) -> (TcpStream, u16, String, BytesMut) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut tcp = TcpStream::connect(host).await.unwrap();
    let offers: String = protocols
        .iter()
        .map(|p| format!("X-Stream-Protocol-Version: {p}\r\n"))
        .collect();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n{offers}Content-Length: 0\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = tcp.read_buf(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed during the HTTP answer");
    };
    let head = String::from_utf8(buf.split_to(end).to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    (tcp, status, head, buf)
}

impl Client {
    async fn connect(url: &str, protocol: &str) -> Self {
        let (tcp, status, head, buf) = request(url, &[protocol]).await;
        assert_eq!(status, 101, "{head}");
        Self {
            tcp,
            buf,
            deflater: Deflater::default(),
            inflater: Inflater::default(),
            next_id: 1,
        }
    }

    async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        self.tcp.write_all(&out).await.unwrap();
    }

    /// Opens a stream with `headers`; its id.
    async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        let headers = self.deflater.block(&Headers::new(headers.iter().copied()));
        self.send(Frame::SynStream {
            id,
            associated: 0,
            priority: 0,
            flags: 0,
            headers,
        })
        .await;
        id
    }

    async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
        let flags = if fin { FLAG_FIN } else { 0 };
        let data = Bytes::copy_from_slice(data);
        self.send(Frame::Data { id, flags, data }).await;
    }

    /// The next frame from the server; `None` at the end of the connection.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf).unwrap() {
                if let Frame::SynReply { headers, .. } = &frame {
                    self.inflater.headers(headers).unwrap();
                }
                return Some(frame);
            }
            let n = tokio::time::timeout(WAIT, self.tcp.read_buf(&mut self.buf))
                .await
                .expect("the server answers in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads until the connection ends (or `until` holds), gathering what came.
    async fn gather(&mut self, seen: &mut Seen, until: impl Fn(&Seen) -> bool) {
        while !until(seen) {
            let Some(frame) = self.next().await else {
                return;
            };
            match frame {
                Frame::SynReply { id, .. } => seen.replied.push(id),
                Frame::Data { id, flags, data } => {
                    seen.data.entry(id).or_default().extend_from_slice(&data);
                    if flags & FLAG_FIN != 0 {
                        seen.finished.push(id);
                    }
                }
                Frame::RstStream { id, status } => seen.resets.push((id, status)),
                Frame::Ping { id } => seen.pings.push(id),
                Frame::GoAway { status, .. } => seen.goaway = Some(status),
                Frame::WindowUpdate { .. } => seen.window_updates += 1,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

fn exec(cmd: &[&str], stdin: bool, tty: bool) -> cri::ExecRequest {
    cri::ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        stdin,
        stdout: true,
        stderr: !tty,
        tty,
    }
}

#[tokio::test]
async fn exec_with_stdin_copies_it_and_reports_success() {
    let (server, _) = common::server(Config::default()).await;
    let url = server.exec_url(exec(&["cat"], true, false)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    let error = client.open(&[("streamtype", "error")]).await;
    let stdin = client.open(&[("streamtype", "stdin")]).await;
    let stdout = client.open(&[("streamtype", "stdout")]).await;
    let stderr = client.open(&[("streamtype", "stderr")]).await;
    client.data(stdin, b"typed ", false).await;
    client.data(stdin, b"input", true).await;
    let mut seen = Seen::default();
    client.gather(&mut seen, |_| false).await;
    assert_eq!(seen.replied, [error, stdin, stdout, stderr]);
    assert_eq!(seen.text(stdout), "typed input");
    assert_eq!(seen.text(error), r#"{"metadata":{},"status":"Success"}"#);
    assert!(seen.finished.contains(&stdout) && seen.finished.contains(&stderr));
    assert_eq!(seen.goaway, Some(0));
    // Credit for what the client sent is given back.
    assert!(seen.window_updates >= 2, "{seen:?}");
}

#[tokio::test]
async fn exit_codes_go_back_in_each_protocol_version_s_form() {
    let (server, _) = common::server(Config::default()).await;
    for (protocol, want) in [
        ("v4.channel.k8s.io", "\"reason\":\"NonZeroExitCode\""),
        ("v3.channel.k8s.io", "command terminated with exit code 3"),
        ("v2.channel.k8s.io", "command terminated with exit code 3"),
    ] {
        let url = server.exec_url(exec(&["exit", "3"], false, false)).unwrap();
        let mut client = Client::connect(&url, protocol).await;
        let error = client.open(&[("streamtype", "error")]).await;
        client.open(&[("streamtype", "stdout")]).await;
        client.open(&[("streamtype", "stderr")]).await;
        let mut seen = Seen::default();
        client.gather(&mut seen, |_| false).await;
        assert!(seen.text(error).contains(want), "{protocol}: {seen:?}");
    }
}

#[tokio::test]
async fn terminal_sizes_reach_the_runtime_in_order() {
    let (server, _) = common::server(Config::default()).await;
    let url = server.exec_url(exec(&["sizes", "2"], false, true)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    client.open(&[("streamtype", "error")]).await;
    let stdout = client.open(&[("streamtype", "stdout")]).await;
    let resize = client.open(&[("streamtype", "resize")]).await;
    client
        .data(resize, br#"{"Width":80,"Height":24}{"Width":"#, false)
        .await;
    client.data(resize, br#"132,"Height":43}"#, false).await;
    let mut seen = Seen::default();
    client.gather(&mut seen, |_| false).await;
    assert_eq!(seen.text(stdout), "80x24\n132x43\n");
}

#[tokio::test]
async fn a_client_that_vanishes_cancels_its_command() {
    let (server, cancelled) = common::server(Config::default()).await;
    let url = server.exec_url(exec(&["wait"], false, false)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    for kind in ["error", "stdout", "stderr"] {
        client.open(&[("streamtype", kind)]).await;
    }
    let mut seen = Seen::default();
    client.gather(&mut seen, |s| s.text(3) == "waiting").await;
    drop(client);
    assert_cancelled(&cancelled).await;
}

#[tokio::test]
async fn a_client_that_vanishes_while_its_input_is_unread_cancels_its_command() {
    let (server, cancelled) = common::server(Config::default()).await;
    let url = server.exec_url(exec(&["wait"], true, false)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    let mut ids = Vec::new();
    for kind in ["error", "stdin", "stdout", "stderr"] {
        ids.push(client.open(&[("streamtype", kind)]).await);
    }
    let mut seen = Seen::default();
    client
        .gather(&mut seen, |s| s.text(ids[2]) == "waiting")
        .await;
    // Far more than the stream's queue holds; the command reads none of it.
    for _ in 0..64 {
        client.data(ids[1], &[b'x'; 1024], false).await;
    }
    drop(client);
    assert_cancelled(&cancelled).await;
}

/// A session whose client holds the connection open but has gone quiet.
async fn quiet_client_is_dropped_by_the_idle_timeout(cmd: &[&str], stdin_flood: usize) {
    let config = Config {
        idle_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let (server, cancelled) = common::server(config).await;
    let url = server.exec_url(exec(cmd, true, false)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    let mut ids = Vec::new();
    for kind in ["error", "stdin", "stdout", "stderr"] {
        ids.push(client.open(&[("streamtype", kind)]).await);
    }
    for _ in 0..stdin_flood {
        client.data(ids[1], &[b'x'; 32 << 10], false).await;
    }
    // The client stays connected and reads nothing more.
    assert_cancelled(&cancelled).await;
    drop(client);
}

/// Waits (5 s at most) until the scripted command was dropped unfinished.
async fn assert_cancelled(cancelled: &std::sync::atomic::AtomicUsize) {
    for _ in 0..250 {
        if cancelled.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the command outlived its client");
}

#[tokio::test]
async fn a_client_that_stops_reading_output_is_let_go_after_the_idle_timeout() {
    quiet_client_is_dropped_by_the_idle_timeout(&["flood"], 0).await;
}

#[tokio::test]
async fn a_client_whose_input_outruns_the_command_by_far_is_let_go_after_the_idle_timeout() {
    // 2 MiB: past the 1 MiB the session reads ahead.
    quiet_client_is_dropped_by_the_idle_timeout(&["wait"], 64).await;
}

#[tokio::test]
async fn streams_beyond_what_the_session_takes_are_refused_and_it_carries_on() {
    let (server, _) = common::server(Config::default()).await;
    let url = server.exec_url(exec(&["cat"], true, false)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    let mut ids = Vec::new();
    for kind in ["error", "stdin", "stdout", "stderr"] {
        ids.push(client.open(&[("streamtype", kind)]).await);
    }
    for _ in 0..100 {
        client.open(&[("streamtype", "stdout")]).await;
    }
    client.data(ids[1], b"still here", true).await;
    let mut seen = Seen::default();
    client.gather(&mut seen, |_| false).await;
    assert_eq!(seen.text(ids[2]), "still here");
    assert!(
        seen.resets
            .iter()
            .any(|(_, s)| *s == status::REFUSED_STREAM),
        "{:?}",
        seen.resets
    );
}

#[tokio::test]
async fn missing_streams_time_out_and_the_session_closes() {
    let config = Config {
        stream_creation_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let (server, _) = common::server(config).await;
    let url = server.exec_url(exec(&["echo", "x"], false, false)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    client.open(&[("streamtype", "error")]).await;
    let mut seen = Seen::default();
    client.gather(&mut seen, |_| false).await;
    assert_eq!(seen.goaway, Some(0), "{seen:?}");
    assert!(seen.data.is_empty(), "nothing ran: {seen:?}");
}

#[tokio::test]
async fn an_idle_session_is_closed() {
    let config = Config {
        idle_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let (server, cancelled) = common::server(config).await;
    let url = server.exec_url(exec(&["wait"], false, false)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    for kind in ["error", "stdout", "stderr"] {
        client.open(&[("streamtype", kind)]).await;
    }
    let mut seen = Seen::default();
    client.gather(&mut seen, |_| false).await;
    assert_eq!(seen.goaway, Some(0), "{seen:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        cancelled.load(Ordering::SeqCst),
        1,
        "the command ends with its session"
    );
}

#[tokio::test]
async fn pings_are_answered_and_bad_frames_end_the_session() {
    let (server, _) = common::server(Config::default()).await;
    let url = server.exec_url(exec(&["wait"], false, false)).unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    client.send(Frame::Ping { id: 1 }).await;
    let mut seen = Seen::default();
    client.gather(&mut seen, |s| !s.pings.is_empty()).await;
    assert_eq!(seen.pings, [1]);
    // A SPDY/2 control frame.
    client
        .tcp
        .write_all(b"\x80\x02\x00\x06\x00\x00\x00\x04\x00\x00\x00\x03")
        .await
        .unwrap();
    client.gather(&mut seen, |_| false).await;
    assert_eq!(seen.goaway, Some(1), "PROTOCOL_ERROR: {seen:?}");
}

#[tokio::test]
async fn a_client_that_counts_credit_gets_no_more_than_its_window() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["echo", "twenty-one bytes long"], false, false))
        .unwrap();
    let mut client = Client::connect(&url, "v4.channel.k8s.io").await;
    client
        .send(Frame::Settings {
            entries: vec![(0, SETTINGS_INITIAL_WINDOW_SIZE, 8)],
        })
        .await;
    let error = client.open(&[("streamtype", "error")]).await;
    let stdout = client.open(&[("streamtype", "stdout")]).await;
    client.open(&[("streamtype", "stderr")]).await;
    let mut seen = Seen::default();
    client
        .gather(&mut seen, |s| {
            s.data.get(&stdout).is_some_and(|d| d.len() >= 8)
        })
        .await;
    // Nothing more comes until the client grants it.
    let more = tokio::time::timeout(Duration::from_millis(300), client.next()).await;
    assert!(more.is_err() || matches!(more, Ok(Some(Frame::Data { id, .. })) if id != stdout));
    assert_eq!(seen.text(stdout), "twenty-o");
    client
        .send(Frame::WindowUpdate {
            id: stdout,
            delta: 100,
        })
        .await;
    client
        .send(Frame::WindowUpdate {
            id: error,
            delta: 100,
        })
        .await;
    client.gather(&mut seen, |_| false).await;
    assert_eq!(seen.text(stdout), "twenty-one bytes long");
}

#[tokio::test]
async fn protocols_are_negotiated_and_urls_are_single_use() {
    let (server, _) = common::server(Config::default()).await;
    let url = server.exec_url(exec(&["echo", "x"], false, false)).unwrap();
    let (_, status, head, _) = request(&url, &["v9.channel.k8s.io"]).await;
    assert_eq!(status, 403, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-accepted-stream-protocol-versions: v4.channel.k8s.io"),
        "{head}"
    );
    let (_, status, _, _) = request(&url, &["v4.channel.k8s.io"]).await;
    assert_eq!(status, 404, "a URL is good once");
    let url = server.exec_url(exec(&["echo", "x"], false, false)).unwrap();
    let (_, status, _, _) = request(&url, &[]).await;
    assert_eq!(status, 400);
    let url = server.exec_url(exec(&["echo", "x"], false, false)).unwrap();
    let (_, status, _, _) =
        request(&url.replace("/exec/", "/attach/"), &["v4.channel.k8s.io"]).await;
    assert_eq!(
        status, 404,
        "a token works only for its own kind of request"
    );
}

#[tokio::test]
async fn urls_expire() {
    let config = Config {
        token_ttl: Duration::from_millis(100),
        ..Config::default()
    };
    let (server, _) = common::server(config).await;
    let url = server.exec_url(exec(&["echo", "x"], false, false)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, status, _, _) = request(&url, &["v4.channel.k8s.io"]).await;
    assert_eq!(status, 404);
}

/// A TCP server that answers each connection with `hello <what it read>` then closes.
async fn greeter() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let _ = tcp.read_to_end(&mut got).await;
                let _ = tcp.write_all(&[b"hello ".as_slice(), &got].concat()).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn port_forward_pairs_streams_by_request_and_reports_failures() {
    let (server, _) = common::server(Config::default()).await;
    let port = greeter().await.to_string();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port().to_string()
    };
    let url = server
        .port_forward_url(cri::PortForwardRequest {
            pod_sandbox_id: "p1".into(),
            port: vec![],
        })
        .unwrap();
    let mut client = Client::connect(&url, "portforward.k8s.io").await;
    let stream =
        |kind, port, request| [("streamtype", kind), ("port", port), ("requestid", request)];
    // Two connections at once, their streams interleaved.
    let error0 = client.open(&stream("error", &port, "0")).await;
    let error1 = client.open(&stream("error", &port, "1")).await;
    let data1 = client.open(&stream("data", &port, "1")).await;
    let data0 = client.open(&stream("data", &port, "0")).await;
    client.data(data0, b"zero", true).await;
    client.data(data1, b"one", true).await;
    let error2 = client.open(&stream("error", &closed, "2")).await;
    let data2 = client.open(&stream("data", &closed, "2")).await;
    let bad = client.open(&stream("data", "0", "3")).await;
    let mut seen = Seen::default();
    client
        .gather(&mut seen, |s| {
            [error0, error1, data0, data1, error2]
                .iter()
                .all(|id| s.finished.contains(id))
                && s.resets.len() == 2
        })
        .await;
    assert_eq!(seen.text(data0), "hello zero");
    assert_eq!(seen.text(data1), "hello one");
    assert_eq!(seen.text(error0), "", "no error on a good connection");
    assert!(
        seen.text(error2).contains(&format!("port {closed}")),
        "{seen:?}"
    );
    assert!(seen.resets.contains(&(data2, status::CANCEL)), "{seen:?}");
    assert!(
        seen.resets.contains(&(bad, status::PROTOCOL_ERROR)),
        "{seen:?}"
    );
}
