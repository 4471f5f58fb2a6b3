//! The WebSocket variants of remote command and port forward, driven by a WebSocket
//! client against the streaming server with the scripted runtime.

mod common;

use futures_util::{SinkExt as _, StreamExt as _};
use proto::cri;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use streaming::remotecommand::{Version, status};
use streaming::{Config, Outcome};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};

type Ws = WebSocketStream<TcpStream>;

const WAIT: Duration = Duration::from_secs(10);

/// Connects to a streaming URL offering `protocols` (comma-separated; `None` offers none).
async fn connect(url: &str, protocols: Option<&str>) -> Result<Ws, Error> {
    let mut request = url.replacen("http://", "ws://", 1).into_client_request()?;
    if let Some(protocols) = protocols {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocols.parse().unwrap());
    }
    let authority = request.uri().authority().unwrap().to_string();
    let tcp = TcpStream::connect(authority).await.unwrap();
    tokio_tungstenite::client_async(request, tcp)
        .await
        .map(|(ws, _)| ws)
}

/// The HTTP status a refused handshake got.
fn refused_with(result: Result<Ws, Error>) -> u16 {
    match result {
        Err(Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
        Ok(_) => panic!("handshake was accepted"),
    }
}

/// The data messages the server sends up to its close frame, and the close code.
async fn until_close(ws: &mut Ws) -> (Vec<Message>, CloseCode) {
    let mut messages = Vec::new();
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the server closes the session in time")
            .expect("the server sends a close frame before the connection ends")
            .expect("the connection stays sound");
        match message {
            Message::Close(frame) => {
                return (messages, frame.expect("a close code").code);
            }
            Message::Binary(_) | Message::Text(_) => messages.push(message),
            _ => {}
        }
    }
}

/// The next data message.
async fn next(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the session goes on")
            .expect("the connection stays sound");
        if matches!(message, Message::Binary(_) | Message::Text(_)) {
            return message;
        }
    }
}

fn binary(message: &Message) -> Vec<u8> {
    match message {
        Message::Binary(data) => data.to_vec(),
        other => panic!("expected a binary message, got {other:?}"),
    }
}

/// Each channel's data, the messages of a channel joined in order.
fn by_channel(messages: &[Message]) -> HashMap<u8, Vec<u8>> {
    let mut channels: HashMap<u8, Vec<u8>> = HashMap::new();
    for message in messages {
        let data = binary(message);
        channels
            .entry(data[0])
            .or_default()
            .extend_from_slice(&data[1..]);
    }
    channels
}

fn exec(cmd: &[&str], stdin: bool, stdout: bool, stderr: bool, tty: bool) -> cri::ExecRequest {
    cri::ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout,
        stderr,
    }
}

fn v4_status(outcome: Outcome) -> Vec<u8> {
    status(Version::V4, &outcome).unwrap().into_bytes()
}

#[tokio::test]
async fn exec_sends_stdout_stderr_then_the_status_then_closes() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["echo", "hello", "world"], false, true, true, false))
        .unwrap();
    let mut ws = connect(&url, Some("v4.channel.k8s.io")).await.unwrap();
    let (messages, code) = until_close(&mut ws).await;
    assert_eq!(code, CloseCode::Normal);
    // The session opens with an empty message on stdout, and ends with the status.
    assert_eq!(binary(&messages[0]), [1]);
    let last = binary(messages.last().unwrap());
    assert_eq!(last[0], 3);
    let channels = by_channel(&messages);
    assert_eq!(channels[&1], b"hello world");
    assert_eq!(channels[&2], b"err");
    assert_eq!(channels[&3], v4_status(Outcome::Exited(0)));
    assert_eq!(channels.len(), 3);
}

#[tokio::test]
async fn v4_and_v5_report_success_and_exit_codes_as_json() {
    let (server, _) = common::server(Config::default()).await;
    for protocol in ["v4.channel.k8s.io", "v5.channel.k8s.io"] {
        for (cmd, outcome) in [
            (&["echo", "x"][..], Outcome::Exited(0)),
            (&["exit", "3"][..], Outcome::Exited(3)),
        ] {
            let url = server
                .exec_url(exec(cmd, false, true, false, false))
                .unwrap();
            let mut ws = connect(&url, Some(protocol)).await.unwrap();
            let (messages, _) = until_close(&mut ws).await;
            let mut want = vec![3];
            want.extend(v4_status(outcome));
            assert_eq!(binary(messages.last().unwrap()), want, "{protocol} {cmd:?}");
        }
    }
}

#[tokio::test]
async fn older_versions_report_only_failures_as_text() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["exit", "2"], false, true, false, false))
        .unwrap();
    let mut ws = connect(&url, Some("channel.k8s.io")).await.unwrap();
    let (messages, _) = until_close(&mut ws).await;
    assert_eq!(
        by_channel(&messages)[&3],
        b"command terminated with exit code 2"
    );

    let url = server
        .exec_url(exec(&["echo", "fine"], false, true, false, false))
        .unwrap();
    let mut ws = connect(&url, Some("v2.channel.k8s.io")).await.unwrap();
    let (messages, _) = until_close(&mut ws).await;
    let channels = by_channel(&messages);
    assert_eq!(channels[&1], b"fine");
    assert!(!channels.contains_key(&3), "a success says nothing on v2");
}

#[tokio::test]
async fn v5_close_signal_ends_stdin() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["cat"], true, true, false, false))
        .unwrap();
    let mut ws = connect(&url, Some("v5.channel.k8s.io")).await.unwrap();
    assert_eq!(binary(&next(&mut ws).await), [1]);
    ws.send(Message::binary(&b"\x00abc"[..])).await.unwrap();
    ws.send(Message::binary(&b"\x00def"[..])).await.unwrap();
    ws.send(Message::binary(&[255u8, 0][..])).await.unwrap();
    let (messages, code) = until_close(&mut ws).await;
    assert_eq!(code, CloseCode::Normal);
    let channels = by_channel(&messages);
    assert_eq!(channels[&1], b"abcdef");
    assert_eq!(channels[&3], v4_status(Outcome::Exited(0)));
}

#[tokio::test]
async fn v4_has_no_close_signal() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["cat"], true, true, false, false))
        .unwrap();
    let mut ws = connect(&url, Some("v4.channel.k8s.io")).await.unwrap();
    assert_eq!(binary(&next(&mut ws).await), [1]);
    ws.send(Message::binary(&b"\x00abc"[..])).await.unwrap();
    ws.send(Message::binary(&[255u8, 0][..])).await.unwrap();
    assert_eq!(binary(&next(&mut ws).await), b"\x01abc");
    let more = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
    assert!(
        more.is_err(),
        "stdin stays open on v4, so cat goes on: {more:?}"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_ends_its_command() {
    let (server, cancelled) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["wait"], true, true, false, false))
        .unwrap();
    let mut ws = connect(&url, Some("v5.channel.k8s.io")).await.unwrap();
    assert_eq!(binary(&next(&mut ws).await), [1]);
    ws.close(None).await.unwrap();
    drop(ws);
    let deadline = tokio::time::Instant::now() + WAIT;
    while cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the command was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn resizes_reach_the_terminal() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["sizes", "2"], true, true, false, true))
        .unwrap();
    let mut ws = connect(&url, Some("v4.channel.k8s.io")).await.unwrap();
    assert_eq!(binary(&next(&mut ws).await), [1]);
    ws.send(Message::binary(&b"\x04{\"Width\":80,\"Height\":24}"[..]))
        .await
        .unwrap();
    ws.send(Message::binary(&b"\x04{\"Width\":100,\"Height\":30}"[..]))
        .await
        .unwrap();
    let (messages, _) = until_close(&mut ws).await;
    let channels = by_channel(&messages);
    assert_eq!(channels[&1], b"80x24\n100x30\n");
    assert_eq!(channels[&3], v4_status(Outcome::Exited(0)));
}

#[tokio::test]
async fn attach_copies_stdin_until_the_client_ends_it() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .attach_url(cri::AttachRequest {
            container_id: "c1".into(),
            stdin: true,
            stdout: true,
            ..Default::default()
        })
        .unwrap();
    let mut ws = connect(&url, Some("v5.channel.k8s.io")).await.unwrap();
    assert_eq!(binary(&next(&mut ws).await), [1]);
    ws.send(Message::binary(&b"\x00typed"[..])).await.unwrap();
    assert_eq!(binary(&next(&mut ws).await), b"\x01typed");
    ws.send(Message::binary(&[255u8, 0][..])).await.unwrap();
    let (messages, _) = until_close(&mut ws).await;
    assert_eq!(by_channel(&messages)[&3], v4_status(Outcome::Exited(0)));
}

#[tokio::test]
async fn base64_variant_speaks_text() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["cat"], true, true, false, false))
        .unwrap();
    let mut ws = connect(&url, Some("v4.base64.channel.k8s.io"))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await, Message::text("1"));
    // "0" is stdin; "aGk=" is "hi".
    ws.send(Message::text("0aGk=")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("1aGk="));
}

#[tokio::test]
async fn port_forward_copies_bytes_both_ways() {
    let (server, _) = common::server(Config::default()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let echo = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut got = [0u8; 4];
        tcp.read_exact(&mut got).await.unwrap();
        tcp.write_all(b"pong").await.unwrap();
        got
    });
    let url = server
        .port_forward_url(cri::PortForwardRequest {
            pod_sandbox_id: "sb".into(),
            port: vec![i32::from(port)],
        })
        .unwrap();
    let mut ws = connect(&url, Some("v4.channel.k8s.io")).await.unwrap();
    let [lo, hi] = port.to_le_bytes();
    assert_eq!(binary(&next(&mut ws).await), [0, lo, hi]);
    assert_eq!(binary(&next(&mut ws).await), [1, lo, hi]);
    ws.send(Message::binary(&b"\x00ping"[..])).await.unwrap();
    assert_eq!(echo.await.unwrap(), *b"ping");
    // The port's side closes after "pong"; with its only port done the session ends.
    let (messages, code) = until_close(&mut ws).await;
    assert_eq!(code, CloseCode::Normal);
    assert_eq!(by_channel(&messages)[&0], b"pong");
    assert_eq!(by_channel(&messages).len(), 1);
}

#[tokio::test]
async fn port_forward_reports_a_closed_port_on_its_error_channel() {
    let (server, _) = common::server(Config::default()).await;
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = server
        .port_forward_url(cri::PortForwardRequest {
            pod_sandbox_id: "sb".into(),
            port: vec![i32::from(closed)],
        })
        .unwrap();
    let mut ws = connect(&url, Some("v4.channel.k8s.io")).await.unwrap();
    let (messages, _) = until_close(&mut ws).await;
    let [lo, hi] = closed.to_le_bytes();
    assert_eq!(binary(&messages[0]), [0, lo, hi]);
    assert_eq!(binary(&messages[1]), [1, lo, hi]);
    let error = String::from_utf8(binary(&messages[2])[1..].to_vec()).unwrap();
    assert_eq!(binary(&messages[2])[0], 1);
    assert!(
        error.starts_with(&format!("error forwarding port {closed} to pod sb: ")),
        "{error}"
    );
    assert_eq!(messages.len(), 3);
}

#[tokio::test]
async fn a_subprotocol_the_server_does_not_speak_is_refused() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["echo"], false, true, false, false))
        .unwrap();
    assert_eq!(
        refused_with(connect(&url, Some("v9.channel.k8s.io")).await),
        403
    );
    let url = server
        .port_forward_url(cri::PortForwardRequest {
            pod_sandbox_id: "sb".into(),
            port: vec![80],
        })
        .unwrap();
    assert_eq!(
        refused_with(connect(&url, Some("portforward.k8s.io")).await),
        403
    );
}

#[tokio::test]
async fn a_used_url_is_not_found() {
    let (server, _) = common::server(Config::default()).await;
    let url = server
        .exec_url(exec(&["echo", "once"], false, true, false, false))
        .unwrap();
    let mut ws = connect(&url, Some("v4.channel.k8s.io")).await.unwrap();
    let (messages, _) = until_close(&mut ws).await;
    assert_eq!(by_channel(&messages)[&1], b"once");
    assert_eq!(
        refused_with(connect(&url, Some("v4.channel.k8s.io")).await),
        404
    );
}
