//! A real client's bytes replayed: `data/crictl-exec.client` is everything crictl 1.26
//! (client-go's SPDY transport, Go's zlib) sent for `crictl exec CONTAINER CMD` (stdout and
//! stderr, no stdin, no terminal), captured on the loopback interface. Replayed against the
//! server with a fresh token, it must yield the answers client-go waits for, and every
//! header block Go compressed with the SPDY/3 dictionary must inflate.

mod common;

use bytes::BytesMut;
use proto::cri;
use std::collections::BTreeMap;
use streaming::spdy::frame::{FLAG_FIN, Frame};
use streaming::spdy::headers::Inflater;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CLIENT: &[u8] = include_bytes!("data/crictl-exec.client");

/// The HTTP head and the SPDY frames after it.
fn split(bytes: &[u8]) -> (String, Vec<Frame>) {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
    let mut rest = BytesMut::from(&bytes[end..]);
    let mut frames = Vec::new();
    while let Some(frame) = Frame::decode(&mut rest).unwrap() {
        frames.push(frame);
    }
    assert!(rest.is_empty(), "a partial frame is left: {rest:?}");
    (head, frames)
}

#[test]
fn go_header_blocks_inflate_with_the_spdy3_dictionary() {
    let (head, frames) = split(CLIENT);
    assert!(head.starts_with("POST /exec/"), "{head}");
    let mut inflater = Inflater::default();
    let mut types = BTreeMap::new();
    for frame in frames {
        if let Frame::SynStream { id, headers, .. } = frame {
            let headers = inflater.headers(&headers).unwrap();
            types.insert(id, headers.get("streamtype").unwrap().to_string());
        }
    }
    let types: Vec<_> = types.into_iter().collect();
    assert_eq!(
        types,
        [
            (1, "error".to_string()),
            (3, "stdout".to_string()),
            (5, "stderr".to_string())
        ]
    );
}

#[tokio::test]
async fn replayed_crictl_exec_gets_replies_output_status_and_goaway() {
    let (server, _) = common::server(Default::default()).await;
    let url = server
        .exec_url(cri::ExecRequest {
            container_id: "c1".into(),
            cmd: vec!["echo".into(), "hello".into()],
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .unwrap();
    let (address, path) = url
        .strip_prefix("http://")
        .unwrap()
        .split_once('/')
        .unwrap();
    let token = path.strip_prefix("exec/").unwrap();
    // The recorded token has the same length, so every offset stays as recorded.
    let at = CLIENT.windows(6).position(|w| w == b"/exec/").unwrap() + 6;
    let mut replay = CLIENT.to_vec();
    replay[at..at + 8].copy_from_slice(token.as_bytes());

    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tcp.write_all(&replay).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("the server closes the session")
    .unwrap();

    let (head, frames) = split(&answer);
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    let mut replied = Vec::new();
    let mut data: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut finished = Vec::new();
    let mut goaway = None;
    for frame in frames {
        match frame {
            Frame::SynReply { id, .. } => replied.push(id),
            Frame::Data { id, flags, data: d } => {
                data.entry(id).or_default().extend_from_slice(&d);
                if flags & FLAG_FIN != 0 {
                    finished.push(id);
                }
            }
            Frame::GoAway { status, .. } => goaway = Some(status),
            Frame::WindowUpdate { .. } | Frame::Ping { .. } => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    assert_eq!(replied, [1, 3, 5]);
    assert_eq!(data.get(&3).map(Vec::as_slice), Some(&b"hello"[..]));
    assert_eq!(data.get(&5).map(Vec::as_slice), Some(&b"err"[..]));
    assert_eq!(
        data.get(&1).map(Vec::as_slice),
        Some(&br#"{"metadata":{},"status":"Success"}"#[..])
    );
    finished.sort();
    assert_eq!(finished, [1, 3, 5], "every stream ends");
    assert_eq!(goaway, Some(0));
}
