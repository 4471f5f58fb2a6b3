//! Accepts gRPC clients that send a unix socket path as the HTTP/2 `:authority`.
//!
//! grpc-go before it learned to send `localhost` for unix sockets (crictl and critest 1.26
//! among its users) puts the socket path, e.g. `/run/imaged/imaged.sock`, in `:authority`.
//! The h2 crate under tonic refuses such a request as malformed (hyperium/h2#487), so each
//! connection goes through this filter: client header blocks are decoded and re-encoded,
//! with an invalid authority replaced by `localhost`; every other frame, and the whole
//! server-to-client direction, passes through unchanged. Written here because no HTTP/2
//! server in the tonic stack has an option for it.

use loona_hpack::{Decoder, Encoder};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::UnixStream;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The server's SETTINGS_MAX_FRAME_SIZE (the HTTP/2 default, which tonic keeps).
const MAX_FRAME: usize = 16 * 1024;
/// Header blocks larger than this are refused (h2's own default header list limit).
const MAX_HEADER_BLOCK: usize = 16 << 20;

/// A connection seen through the filter; what tonic serves.
pub struct Filtered {
    inner: DuplexStream,
}

impl tonic::transport::server::Connected for Filtered {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Filtered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Filtered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Puts the filter between a client connection and the server.
pub fn filter(client: UnixStream) -> Filtered {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = tokio::io::split(theirs);
        let upstream = async {
            let result = rewrite(&mut client_read, &mut server_write).await;
            let _ = server_write.shutdown().await;
            result
        };
        let downstream = async {
            let result = tokio::io::copy(&mut server_read, &mut client_write).await;
            let _ = client_write.shutdown().await;
            result.map(drop)
        };
        if let (Err(e), _) | (_, Err(e)) = tokio::join!(upstream, downstream) {
            tracing::debug!(error = %e, "connection closed with an error");
        }
    });
    Filtered { inner: ours }
}

/// Copies the client's HTTP/2 stream, re-encoding header blocks.
async fn rewrite<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    if let Err(e) = from.read_exact(&mut preface).await {
        return if e.kind() == io::ErrorKind::UnexpectedEof {
            Ok(())
        } else {
            Err(e)
        };
    }
    to.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: let the server answer it.
        tokio::io::copy(from, to).await?;
        return Ok(());
    }
    let mut headers = HeaderRewriter::default();
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; length];
        from.read_exact(&mut payload).await?;
        let out = match head[3] {
            HEADERS | CONTINUATION => headers.frame(&head, payload)?,
            _ => [&head[..], &payload].concat(),
        };
        if !out.is_empty() {
            to.write_all(&out).await?;
        }
    }
}

#[derive(Default)]
struct HeaderRewriter {
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    pending: Option<PendingHeaders>,
}

/// A HEADERS frame waiting for its CONTINUATIONs: (flags, stream, priority, block).
type PendingHeaders = (u8, [u8; 4], Vec<u8>, Vec<u8>);

impl HeaderRewriter {
    /// Takes one HEADERS or CONTINUATION frame; returns the bytes to forward (none until the
    /// header block is complete).
    fn frame(&mut self, head: &[u8; 9], payload: Vec<u8>) -> io::Result<Vec<u8>> {
        let flags = head[4];
        let stream = [head[5], head[6], head[7], head[8]];
        let (flags, priority, block) = if head[3] == HEADERS {
            let (priority, block) = split_headers_payload(flags, payload)?;
            self.pending = Some((flags, stream, priority, Vec::new()));
            (flags, None, block)
        } else {
            (flags, Some(()), payload)
        };
        let Some(pending) = self.pending.as_mut() else {
            return Err(protocol("CONTINUATION without HEADERS"));
        };
        if priority.is_some() && pending.1 != stream {
            return Err(protocol("CONTINUATION on another stream"));
        }
        pending.3.extend_from_slice(&block);
        if pending.3.len() > MAX_HEADER_BLOCK {
            return Err(protocol("header block too large"));
        }
        if flags & END_HEADERS == 0 {
            return Ok(Vec::new());
        }
        let (first_flags, stream, priority, block) = self.pending.take().expect("pending block");
        let fields = self
            .decoder
            .decode(&block)
            .map_err(|e| protocol(&format!("HPACK: {e:?}")))?;
        let fields: Vec<(Vec<u8>, Vec<u8>)> = fields.into_iter().map(fix_authority).collect();
        let encoded = self
            .encoder
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        Ok(frames(first_flags, stream, &priority, &encoded))
    }
}

fn protocol(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// Splits a HEADERS payload into its priority fields and header block, dropping padding.
fn split_headers_payload(flags: u8, mut payload: Vec<u8>) -> io::Result<(Vec<u8>, Vec<u8>)> {
    if flags & PADDED != 0 {
        let pad = *payload
            .first()
            .ok_or_else(|| protocol("empty padded HEADERS"))? as usize;
        if pad + 1 > payload.len() {
            return Err(protocol("HEADERS padding longer than the frame"));
        }
        payload.truncate(payload.len() - pad);
        payload.remove(0);
    }
    let priority_len = if flags & PRIORITY != 0 { 5 } else { 0 };
    if payload.len() < priority_len {
        return Err(protocol("HEADERS too short for its priority"));
    }
    let block = payload.split_off(priority_len);
    Ok((payload, block))
}

fn fix_authority((name, value): (Vec<u8>, Vec<u8>)) -> (Vec<u8>, Vec<u8>) {
    if name == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
        (name, b"localhost".to_vec())
    } else {
        (name, value)
    }
}

/// A HEADERS frame (plus CONTINUATIONs if needed) carrying `block`.
fn frames(flags: u8, stream: [u8; 4], priority: &[u8], block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(block.len() + 32);
    let first_room = MAX_FRAME - priority.len();
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut first_flags = flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        first_flags |= END_HEADERS;
    }
    push_frame(
        &mut out,
        HEADERS,
        first_flags,
        stream,
        &[priority, first].concat(),
    );
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        push_frame(&mut out, CONTINUATION, flags, stream, chunk);
    }
    out
}

fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: [u8; 4], payload: &[u8]) {
    let len = (payload.len() as u32).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&stream);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(flags: u8, block: &[u8]) -> ([u8; 9], Vec<u8>) {
        let mut out = Vec::new();
        push_frame(&mut out, HEADERS, flags, [0, 0, 0, 1], block);
        let head: [u8; 9] = out[..9].try_into().unwrap();
        (head, out[9..].to_vec())
    }

    fn decode_frames(bytes: &[u8], decoder: &mut Decoder<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut block = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            block.extend_from_slice(&rest[9..9 + len]);
            rest = &rest[9 + len..];
        }
        decoder.decode(&block).unwrap()
    }

    #[test]
    fn socket_path_authority_becomes_localhost_and_state_stays_in_step() {
        let mut client = Encoder::new();
        let mut server = Decoder::new();
        let mut rewriter = HeaderRewriter::default();
        let request = |path: &[u8]| {
            vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (b":path".to_vec(), path.to_vec()),
                (b":authority".to_vec(), b"/run/imaged/imaged.sock".to_vec()),
            ]
        };
        for path in [&b"/a"[..], b"/b", b"/a"] {
            let fields = request(path);
            let block = client.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            let (head, payload) = headers_frame(END_HEADERS | END_STREAM, &block);
            let out = rewriter.frame(&head, payload).unwrap();
            assert_eq!(out[4] & END_STREAM, END_STREAM);
            let seen = decode_frames(&out, &mut server);
            assert_eq!(seen[1].1, path);
            assert_eq!(seen[2], (b":authority".to_vec(), b"localhost".to_vec()));
        }
    }

    #[test]
    fn valid_authority_and_continuations_pass() {
        let mut client = Encoder::new();
        let mut rewriter = HeaderRewriter::default();
        let big = vec![b'x'; 40_000];
        let fields = [(&b":authority"[..], &b"localhost:1"[..]), (b"x-big", &big)];
        let block = client.encode(fields);
        let (head, payload) = headers_frame(0, &block[..100]);
        assert!(rewriter.frame(&head, payload).unwrap().is_empty());
        let mut cont = Vec::new();
        push_frame(
            &mut cont,
            CONTINUATION,
            END_HEADERS,
            [0, 0, 0, 1],
            &block[100..],
        );
        let out = rewriter
            .frame(&cont[..9].try_into().unwrap(), cont[9..].to_vec())
            .unwrap();
        let seen = decode_frames(&out, &mut Decoder::new());
        assert_eq!(seen[0].1, b"localhost:1");
        assert_eq!(seen[1].1, big);
    }

    #[test]
    fn continuation_without_headers_is_refused() {
        let mut out = Vec::new();
        push_frame(&mut out, CONTINUATION, END_HEADERS, [0, 0, 0, 1], b"");
        let err = HeaderRewriter::default()
            .frame(&out[..9].try_into().unwrap(), vec![])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
