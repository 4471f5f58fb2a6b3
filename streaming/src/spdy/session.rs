//! The server side of a SPDY/3.1 session on an upgraded connection: the client opens
//! streams, the session answers each SYN_STREAM with a SYN_REPLY and hands the stream to
//! [`Session::accept`]; the application reads what the client sends on a stream and writes
//! back through a [`StreamWriter`].
//!
//! Flow control: the session grants credit back (WINDOW_UPDATE) as it delivers data, so a
//! client that waits for credit never stalls. Go's spdystream, which every Kubernetes
//! client uses, never grants credit itself, so the session only holds back its own data for
//! a peer that has shown it speaks flow control (a SETTINGS initial window or a
//! WINDOW_UPDATE); with any other peer, waiting for credit would stall after 64 KiB.

use super::frame::{FLAG_FIN, Frame, SETTINGS_INITIAL_WINDOW_SIZE, status};
use super::headers::{Deflater, Headers, Inflater};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{Notify, mpsc};

/// GOAWAY status codes (§2.6.6).
const GOAWAY_OK: u32 = 0;
const GOAWAY_PROTOCOL_ERROR: u32 = 1;

/// SPDY/3's window before any SETTINGS, per stream and for the session.
const DEFAULT_WINDOW: i64 = 64 << 10;

/// The largest DATA frame this side writes.
const MAX_DATA: usize = 32 << 10;

/// Frames received on one stream waiting for the application; a full queue holds the
/// session's reader, which is the back-pressure a slow consumer puts on the client.
const STREAM_QUEUE: usize = 16;

/// Streams accepted but not yet taken by [`Session::accept`].
const ACCEPT_QUEUE: usize = 32;

/// How much of the connection is read ahead while a stream's reader is slow.
const BACKLOG: usize = 1 << 20;

/// The most streams open at once on one session; beyond it SYN_STREAM is refused.
pub const MAX_STREAMS: usize = 1000;

/// How long a closed session keeps reading what the client still sends, so that closing
/// with unread bytes does not reset the connection under data the client has yet to read.
const LINGER: Duration = Duration::from_secs(2);

/// A stream the client opened.
pub struct Stream {
    /// Its id.
    pub id: u32,
    /// The headers of its SYN_STREAM.
    pub headers: Headers,
    /// What the client sends on it, until its FIN or a reset.
    pub input: mpsc::Receiver<Bytes>,
    /// Writes to the client on it.
    pub output: StreamWriter,
}

/// What the reader and the writer share.
struct Shared {
    credit: Mutex<Credit>,
    more_credit: Notify,
    /// Set once the client is gone (or the session ended): work for it should stop.
    end: tokio::sync::watch::Sender<bool>,
    /// Milliseconds since `epoch` at the last frame in either direction.
    last_active: AtomicU64,
    epoch: Instant,
}

/// Send windows (§2.6.8); kept from the start, enforced once the peer shows it uses them.
/// `streams` holds exactly the streams this side may still write on: an entry is made when
/// a stream is accepted and goes at its FIN or reset, so nothing a client sends about other
/// ids is kept.
struct Credit {
    enforced: bool,
    initial: i64,
    session: i64,
    streams: HashMap<u32, i64>,
}

impl Shared {
    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_active.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

enum Out {
    Frame(Frame),
    Reply(u32),
    Close(u32),
}

/// Writes on one stream. Clones write to the same stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Out>,
    shared: Arc<Shared>,
}

/// The stream cannot be written: the client reset it or the session is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream {0} is closed")]
pub struct Closed(pub u32);

impl StreamWriter {
    /// Sends `data`, in frames of at most 32 KiB.
    pub async fn write(&self, mut data: Bytes) -> Result<(), Closed> {
        while !data.is_empty() {
            let n = self.take_credit(data.len().min(MAX_DATA)).await?;
            let chunk = data.split_to(n);
            self.send(Frame::Data {
                id: self.id,
                flags: 0,
                data: chunk,
            })
            .await?;
        }
        Ok(())
    }

    /// Ends this side of the stream (an empty DATA frame with FIN).
    pub async fn finish(&self) -> Result<(), Closed> {
        let sent = self
            .send(Frame::Data {
                id: self.id,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
            .await;
        self.forget();
        sent
    }

    /// Resets the stream with `status` (one of [`super::frame::status`]).
    pub async fn reset(&self, status: u32) {
        self.forget();
        let _ = self
            .out
            .send(Out::Frame(Frame::RstStream {
                id: self.id,
                status,
            }))
            .await;
    }

    async fn send(&self, frame: Frame) -> Result<(), Closed> {
        if !self.is_open() {
            return Err(Closed(self.id));
        }
        self.out
            .send(Out::Frame(frame))
            .await
            .map_err(|_| Closed(self.id))
    }

    fn is_open(&self) -> bool {
        let credit = self.shared.credit.lock().expect("credit");
        credit.streams.contains_key(&self.id)
    }

    /// This side is done with the stream.
    fn forget(&self) {
        self.shared
            .credit
            .lock()
            .expect("credit")
            .streams
            .remove(&self.id);
        self.shared.more_credit.notify_waiters();
    }

    /// Up to `want` bytes of credit; all of it when the peer does not use flow control.
    async fn take_credit(&self, want: usize) -> Result<usize, Closed> {
        loop {
            let notified = self.shared.more_credit.notified();
            {
                let mut credit = self.shared.credit.lock().expect("credit");
                let Some(&stream) = credit.streams.get(&self.id) else {
                    return Err(Closed(self.id));
                };
                if self.out.is_closed() {
                    return Err(Closed(self.id));
                }
                let allowed = stream.min(credit.session);
                let n = if credit.enforced {
                    want.min(allowed.max(0) as usize)
                } else {
                    want
                };
                if n > 0 {
                    credit.session -= n as i64;
                    *credit.streams.get_mut(&self.id).expect("inserted") -= n as i64;
                    return Ok(n);
                }
            }
            notified.await;
        }
    }
}

impl crate::Output for StreamWriter {
    async fn write(&self, data: Bytes) -> Result<(), crate::Gone> {
        StreamWriter::write(self, data)
            .await
            .map_err(|_| crate::Gone)
    }

    async fn finish(&self) {
        let _ = StreamWriter::finish(self).await;
    }
}

/// A running session; dropping it drops the connection.
pub struct Session {
    incoming: mpsc::Receiver<Stream>,
    out: mpsc::Sender<Out>,
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.end.send_replace(true);
        self.shared.more_credit.notify_waiters();
        self.reader.abort();
        self.writer.abort();
    }
}

impl Session {
    /// Starts serving SPDY on `io`; a session with no frame either way for `idle` is
    /// closed.
    pub fn start<T>(io: T, idle: Duration) -> Self
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let shared = Arc::new(Shared {
            credit: Mutex::new(Credit {
                enforced: false,
                initial: DEFAULT_WINDOW,
                session: DEFAULT_WINDOW,
                streams: HashMap::new(),
            }),
            more_credit: Notify::new(),
            end: tokio::sync::watch::channel(false).0,
            last_active: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let (out, outbox) = mpsc::channel(64);
        let (accepted, incoming) = mpsc::channel(ACCEPT_QUEUE);
        let writer = tokio::spawn(write_frames(write, outbox, shared.clone()));
        let reader = Reader {
            streams: HashMap::new(),
            last_id: 0,
            accepted: Some(accepted),
            inflater: Inflater::default(),
            out: out.clone(),
            shared: shared.clone(),
            unacked: 0,
            idle,
        };
        let reader = tokio::spawn(reader.run(read));
        Self {
            incoming,
            out,
            shared,
            reader,
            writer,
        }
    }

    /// Resolves once the client is gone: its connection closed or broke, or it was idle
    /// too long. A session's work should stop then.
    pub fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut ended = self.shared.end.subscribe();
        async move {
            let _ = ended.wait_for(|ended| *ended).await;
        }
    }

    /// The next stream the client opens; `None` once the client went away or said GOAWAY.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Ends the session: GOAWAY after everything already written, then the connection
    /// closes once the client has read it.
    pub async fn close(mut self) {
        // A client that stopped reading cannot hold the session open: each wait is
        // bounded, and dropping the session then drops the connection.
        let _ = tokio::time::timeout(LINGER, async {
            let _ = self.out.send(Out::Close(GOAWAY_OK)).await;
            self.out.closed().await;
        })
        .await;
        self.shared.more_credit.notify_waiters();
        if tokio::time::timeout(LINGER, &mut self.reader)
            .await
            .is_err()
        {
            tracing::debug!("client kept the session open after GOAWAY");
        }
    }
}

struct Reader {
    streams: HashMap<u32, mpsc::Sender<Bytes>>,
    last_id: u32,
    accepted: Option<mpsc::Sender<Stream>>,
    inflater: Inflater,
    out: mpsc::Sender<Out>,
    shared: Arc<Shared>,
    /// Session bytes delivered since the last session WINDOW_UPDATE.
    unacked: u32,
    /// A session with no traffic for this long ends.
    idle: Duration,
}

impl Reader {
    async fn run<R: AsyncRead + Unpin>(mut self, mut read: R) {
        let idle = self.idle;
        let mut buf = BytesMut::with_capacity(64 << 10);
        loop {
            match Frame::decode(&mut buf) {
                Ok(Some(frame)) => {
                    self.shared.touch();
                    if !self.handle(frame, &mut read, &mut buf).await {
                        break;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "SPDY client sent a bad frame");
                    self.close(GOAWAY_PROTOCOL_ERROR);
                    break;
                }
            }
            let read = tokio::select! {
                read = read.read_buf(&mut buf) => read,
                () = idle_expired(&self.shared, idle) => {
                    tracing::debug!(?idle, "SPDY session idle; closing");
                    self.close(GOAWAY_OK);
                    break;
                }
            };
            match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.streams.clear();
        self.accepted = None;
        self.shared.end.send_replace(true);
        // Drain until the client closes, so our close does not reset unread bytes.
        let mut sink = vec![0u8; 16 << 10];
        let _ = tokio::time::timeout(LINGER, async {
            while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    /// Acts on one frame; `false` ends the session. `read` and `buf` are the connection
    /// and what was read of it, for reading on while data waits for its stream's reader.
    async fn handle<R: AsyncRead + Unpin>(
        &mut self,
        frame: Frame,
        read: &mut R,
        buf: &mut BytesMut,
    ) -> bool {
        match frame {
            Frame::SynStream {
                id, flags, headers, ..
            } => self.open(id, flags, &headers).await,
            Frame::Data { id, flags, data } => self.data(id, flags, data, read, buf).await,
            Frame::RstStream { id, .. } => {
                self.forget(id);
                true
            }
            Frame::Settings { entries } => {
                self.settings(&entries);
                true
            }
            Frame::WindowUpdate { id, delta } => {
                self.window_update(id, delta);
                true
            }
            Frame::Ping { id } => {
                // Only the client's own pings (odd ids) are echoed; even ones answer ours.
                if id % 2 == 1 {
                    let _ = self.out.send(Out::Frame(Frame::Ping { id })).await;
                }
                true
            }
            Frame::GoAway { .. } => {
                self.accepted = None;
                true
            }
            Frame::SynReply { headers, .. } | Frame::Headers { headers, .. } => {
                // Inflated only to keep the shared zlib context in step.
                self.inflater.headers(&headers).is_ok()
            }
        }
    }

    async fn open(&mut self, id: u32, flags: u8, block: &[u8]) -> bool {
        // Every block must be inflated in order, even for a refused stream.
        let headers = match self.inflater.headers(block) {
            Ok(headers) => headers,
            Err(e) => {
                tracing::debug!(stream = id, error = %e, "SPDY client sent bad headers");
                self.close(GOAWAY_PROTOCOL_ERROR);
                return false;
            }
        };
        let refuse = |status| Out::Frame(Frame::RstStream { id, status });
        if id.is_multiple_of(2) || id <= self.last_id {
            let _ = self.out.send(refuse(status::PROTOCOL_ERROR)).await;
            return true;
        }
        self.last_id = id;
        let Some(accepted) = self.accepted.clone() else {
            let _ = self.out.send(refuse(status::REFUSED_STREAM)).await;
            return true;
        };
        if !self.track(id) {
            let _ = self.out.send(refuse(status::REFUSED_STREAM)).await;
            return true;
        }
        let (tx, input) = mpsc::channel(STREAM_QUEUE);
        if flags & FLAG_FIN == 0 {
            self.streams.insert(id, tx);
        }
        let stream = Stream {
            id,
            headers,
            input,
            output: StreamWriter {
                id,
                out: self.out.clone(),
                shared: self.shared.clone(),
            },
        };
        // Never wait for the application here: one that stopped accepting (its streams
        // are all there) must not stall the session's reading.
        // The reply goes first, so that nothing the application writes can precede it.
        let _ = self.out.send(Out::Reply(id)).await;
        match accepted.try_send(stream) {
            Ok(()) => {}
            Err(refused) => {
                if matches!(refused, mpsc::error::TrySendError::Closed(_)) {
                    self.accepted = None;
                }
                self.forget(id);
                let _ = self.out.send(refuse(status::REFUSED_STREAM)).await;
            }
        }
        true
    }

    async fn data<R: AsyncRead + Unpin>(
        &mut self,
        id: u32,
        flags: u8,
        data: Bytes,
        read: &mut R,
        buf: &mut BytesMut,
    ) -> bool {
        let len = data.len() as u32;
        // Data on a stream that is closed or was never opened is dropped, unanswered.
        if let Some(tx) = self.streams.get(&id).cloned() {
            if !data.is_empty() && !self.deliver(&tx, data, read, buf).await {
                return false;
            }
            self.grant(id, len).await;
        }
        if flags & FLAG_FIN != 0 {
            self.streams.remove(&id);
        }
        true
    }

    /// Hands `data` to a stream's reader (a stream nobody reads any more swallows it).
    /// While a slow reader holds it up, the connection is read on, up to [`BACKLOG`]
    /// bytes, so that a client that goes away is still noticed; past that, a reader that
    /// takes nothing for the idle timeout ends the session. `false` once it ends.
    async fn deliver<R: AsyncRead + Unpin>(
        &self,
        tx: &mpsc::Sender<Bytes>,
        data: Bytes,
        read: &mut R,
        buf: &mut BytesMut,
    ) -> bool {
        let send = tx.send(data);
        tokio::pin!(send);
        loop {
            tokio::select! {
                _ = &mut send => return true,
                read = read.read_buf(buf), if buf.len() < BACKLOG => {
                    if !matches!(read, Ok(1..)) {
                        return false;
                    }
                }
                () = tokio::time::sleep(self.idle), if buf.len() >= BACKLOG => {
                    tracing::debug!("a stream's reader took nothing for the idle timeout");
                    self.close(GOAWAY_OK);
                    return false;
                }
            }
        }
    }

    /// The stream is gone both ways: nothing more is read or written on it.
    fn forget(&mut self, id: u32) {
        self.streams.remove(&id);
        self.shared
            .credit
            .lock()
            .expect("credit")
            .streams
            .remove(&id);
        self.shared.more_credit.notify_waiters();
    }

    /// Starts counting `id`'s send window; `false` when the session has as many open
    /// streams as it takes.
    fn track(&self, id: u32) -> bool {
        let mut credit = self.shared.credit.lock().expect("credit");
        if credit.streams.len() >= MAX_STREAMS {
            return false;
        }
        let initial = credit.initial;
        credit.streams.insert(id, initial);
        true
    }

    /// Queues GOAWAY without waiting: a writer stuck on a client that does not read must
    /// not hold the reader.
    fn close(&self, status: u32) {
        self.shared.end.send_replace(true);
        let _ = self.out.try_send(Out::Close(status));
    }

    /// Gives back the credit `len` delivered bytes took, for a client that counts it.
    async fn grant(&mut self, id: u32, len: u32) {
        if len == 0 {
            return;
        }
        self.unacked += len;
        let _ = self
            .out
            .send(Out::Frame(Frame::WindowUpdate { id, delta: len }))
            .await;
        if self.unacked as i64 >= DEFAULT_WINDOW / 2 {
            let delta = std::mem::take(&mut self.unacked);
            let _ = self
                .out
                .send(Out::Frame(Frame::WindowUpdate { id: 0, delta }))
                .await;
        }
    }

    fn settings(&mut self, entries: &[(u8, u32, u32)]) {
        let Some(&(_, _, value)) = entries
            .iter()
            .find(|(_, id, _)| *id == SETTINGS_INITIAL_WINDOW_SIZE)
        else {
            return;
        };
        let mut credit = self.shared.credit.lock().expect("credit");
        let change = i64::from(value) - credit.initial;
        credit.initial = i64::from(value);
        credit.enforced = true;
        for window in credit.streams.values_mut() {
            *window = window.saturating_add(change);
        }
        drop(credit);
        self.shared.more_credit.notify_waiters();
    }

    fn window_update(&mut self, id: u32, delta: u32) {
        let mut credit = self.shared.credit.lock().expect("credit");
        credit.enforced = true;
        if id == 0 {
            credit.session = credit.session.saturating_add(i64::from(delta));
        } else if let Some(window) = credit.streams.get_mut(&id) {
            *window = window.saturating_add(i64::from(delta));
        }
        drop(credit);
        self.shared.more_credit.notify_waiters();
    }
}

async fn idle_expired(shared: &Shared, idle: Duration) {
    loop {
        let left = idle.saturating_sub(shared.idle_for());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left).await;
    }
}

/// Writes queued frames, batching what is queued together into one write; compresses
/// SYN_REPLY header blocks here, in the order they go out.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut write: W,
    mut outbox: mpsc::Receiver<Out>,
    shared: Arc<Shared>,
) {
    let mut deflater = Deflater::default();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut last_id = 0;
    while let Some(first) = outbox.recv().await {
        let mut next = Some(first);
        let mut closing = None;
        while let Some(out) = next.take() {
            match out {
                Out::Frame(frame) => frame.encode(&mut buf),
                Out::Reply(id) => {
                    last_id = id;
                    let headers = deflater.block(&Headers::default());
                    Frame::SynReply {
                        id,
                        flags: 0,
                        headers,
                    }
                    .encode(&mut buf);
                }
                Out::Close(status) => {
                    closing = Some(status);
                    break;
                }
            }
            if buf.len() < 256 << 10 {
                next = outbox.try_recv().ok();
            }
        }
        if let Some(status) = closing {
            Frame::GoAway {
                last_good: last_id,
                status,
            }
            .encode(&mut buf);
        }
        shared.touch();
        if write.write_all(&buf).await.is_err() {
            shared.end.send_replace(true);
            break;
        }
        buf.clear();
        if closing.is_some() {
            let _ = write.shutdown().await;
            break;
        }
    }
    outbox.close();
    shared.more_credit.notify_waiters();
}
