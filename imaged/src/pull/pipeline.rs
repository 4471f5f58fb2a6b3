//! One layer's bytes, from the HTTP body to the snapshot, on three threads that overlap the
//! way `curl | tee blob | gunzip | tar -x` does:
//!
//! - ingest: writes the compressed blob into the content store while hashing it, and
//!   forwards each chunk;
//! - decode: runs the processor chain (decrypt, decompress) into plain tar chunks;
//! - hash: hashes them (the diff_id) on their way on, so that inflating, the slowest stage on
//!   a fast network, does nothing else: for snapshotters that apply layers one after another
//!   it sets the pace of the whole pull;
//! - apply (the calling thread): writes the files.
//!
//! Chunks travel through bounded channels of fixed-size chunks, so the memory a layer takes
//! does not depend on its size, and the slowest stage sets the pace for the others.

use super::{Progress, PullError, UnpackLimits, send_layer};
use crate::content::{ContentError, Writer};
use crate::digest::Digest;
use crate::images::LayerRecord;
use crate::registry::{BlobBody, Session};
use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use snapshotters::Snapshotter;
use std::fs::File;
use std::io::{self, BufRead, Read, Seek};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread;
use tokio::sync::mpsc;

/// Size of the chunks handed between stages: large enough that per-chunk costs vanish,
/// small enough that a few in flight per layer stay far below a megabyte or two.
const CHUNK: usize = 256 * 1024;

/// Chunks each channel holds before its sender waits.
const QUEUE: usize = 2;

/// A layer's ratio of tar to blob bytes counts once it has unpacked to more than this.
pub const RATIO_FLOOR: u64 = 64 << 20;

/// Tar chunks of one layer: as many as the two channels between decoder, hasher and applier
/// hold, and one in the hands of each of the three, so no stage waits for a free chunk.
const TAR_CHUNKS: usize = 2 * QUEUE + 3;

/// Where a layer blob comes from. One lives per layer being unpacked, so the size of the
/// variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Source {
    /// The registry, chunk by chunk from [`pump`]; stored through `writer` on the way.
    Remote {
        rx: mpsc::Receiver<io::Result<Bytes>>,
        writer: Writer,
    },
    /// A blob already committed to the content store.
    Local(File),
}

/// How often one layer's download may break off and be resumed where it stopped.
const RESUMES: u32 = 3;

/// Forwards the HTTP body in [`CHUNK`]-sized chunks. Copying out of hyper's buffers lets
/// hyper reuse them at once, instead of each queued chunk pinning a whole read buffer. A
/// body that breaks off is asked for again from the byte it stopped at, so the stages after
/// this one see one unbroken stream (and the digest still covers every byte). `body` starts
/// at byte `from`, the bytes before being the ingest's already.
pub(super) fn pump(
    mut body: BlobBody,
    session: Session,
    layer: LayerRecord,
    progress: Progress,
    from: u64,
) -> mpsc::Receiver<io::Result<Bytes>> {
    const REPORT_EVERY: u64 = 1 << 20;
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let mut received = from;
        let mut reported = from;
        let mut resumed = 0;
        let mut buffer = BytesMut::with_capacity(CHUNK);
        loop {
            match body.chunk().await {
                Ok(Some(mut chunk)) => {
                    received += chunk.len() as u64;
                    if received - reported >= REPORT_EVERY {
                        send_layer(&progress, &layer, received, false);
                        reported = received;
                    }
                    while !chunk.is_empty() {
                        let n = chunk.len().min(CHUNK - buffer.len());
                        buffer.extend_from_slice(&chunk.split_to(n));
                        if buffer.len() == CHUNK {
                            let full =
                                std::mem::replace(&mut buffer, BytesMut::with_capacity(CHUNK));
                            if tx.send(Ok(full.freeze())).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Ok(None) => {
                    if !buffer.is_empty() && tx.send(Ok(buffer.freeze())).await.is_err() {
                        return;
                    }
                    send_layer(&progress, &layer, received, true);
                    return;
                }
                Err(error) if error.resumable && resumed < RESUMES && received < layer.size => {
                    resumed += 1;
                    tracing::info!(digest = %layer.digest, received, detail = %error.detail, "layer download broke off; resuming");
                    match session.blob_from(&layer.digest, received).await {
                        Ok(rest) => body = rest,
                        Err(e) => {
                            let detail =
                                format!("{}; resuming at byte {received}: {e}", error.detail);
                            let _ = tx.send(Err(io::Error::other(detail))).await;
                            return;
                        }
                    }
                }
                Err(error) => {
                    let _ = tx.send(Err(io::Error::other(error.detail))).await;
                    return;
                }
            }
        }
    });
    rx
}

/// What the stages of a layer work with.
pub(super) struct Stages<'a> {
    pub(super) snapshotter: &'a dyn Snapshotter,
    pub(super) processors: &'a processors::Chain,
    pub(super) limits: UnpackLimits,
}

/// Decodes, hashes and applies one layer into the snapshot `key`, then checks the blob and
/// the diff_id. A remote blob is committed to the content store only when both match.
pub(super) fn apply_blob(
    stages: &Stages<'_>,
    key: &str,
    layer: &LayerRecord,
    source: Source,
) -> Result<(), PullError> {
    let (snapshotter, processors) = (stages.snapshotter, stages.processors);
    let replay = match &source {
        Source::Local(file) => file.try_clone().ok(),
        Source::Remote { .. } => None,
    };
    thread::scope(|scope| {
        let (blob, ingest) = match source {
            Source::Remote { rx, writer } => {
                let (tx, blob_rx) = sync_channel(QUEUE);
                let ingest = scope.spawn(move || ingest(rx, Some(tx), writer, layer));
                let blob: processors::Input<'_> = Box::new(ChunkReader::new(blob_rx, None));
                (blob, Some(ingest))
            }
            Source::Local(file) => {
                let blob: processors::Input<'_> =
                    Box::new(io::BufReader::with_capacity(CHUNK, file));
                (blob, None)
            }
        };
        let (plain_tx, plain_rx) = sync_channel(QUEUE);
        let (tar_tx, tar_rx) = sync_channel(QUEUE);
        // The tar chunks circulate, back to the decoder once the applier has read them.
        let (free_tx, free_rx) = sync_channel(TAR_CHUNKS);
        for _ in 0..TAR_CHUNKS {
            free_tx.send(vec![0; CHUNK]).expect("room for every chunk");
        }
        let limits = stages.limits;
        let decode = scope.spawn(move || {
            let counted = Counted::new(blob);
            let read = counted.read.clone();
            let blob: processors::Input<'_> = Box::new(counted);
            let limits = Limits { limits, read };
            decode(processors, layer, blob, &limits, plain_tx, free_rx)
        });
        let hash = scope.spawn(move || hash(plain_rx, tar_tx));
        let applied = apply_tar(
            snapshotter,
            key,
            layer,
            ChunkReader::new(tar_rx, Some(free_tx)),
        );
        // The applier reads the tar stream to its end unless it fails, so on success the
        // hasher has seen all of it.
        let decoded = decode.join().expect("decode thread");
        let hashed = hash.join().expect("hash thread");
        let decoded = decoded.map(|()| hashed);
        let mut writer = ingest
            .map(|ingest| ingest.join().expect("ingest thread"))
            .transpose()?;
        // A lying blob explains any later failure, and a failed decoder the applier's.
        let checked = decoded
            .and_then(|actual| applied.map(|()| actual))
            .and_then(|actual| {
                if actual == layer.diff_id {
                    return Ok(());
                }
                Err(PullError::DiffId {
                    digest: layer.digest.clone(),
                    expected: layer.diff_id.clone(),
                    actual,
                })
            });
        if let Err(error) = checked {
            return Err(tampering(processors, layer, writer.as_mut(), replay).unwrap_or(error));
        }
        match writer {
            Some(writer) => writer.commit().map_err(|source| PullError::Blob {
                digest: layer.digest.clone(),
                source,
            }),
            None => Ok(()),
        }
    })
}

/// The integrity failure of an encrypted blob, if it has one. Decryption checks the blob's
/// HMAC only at its end, while the stages after it (gunzip, the tar reader) may already have
/// failed on the altered plaintext: the HMAC says what really happened.
fn tampering(
    processors: &processors::Chain,
    layer: &LayerRecord,
    writer: Option<&mut Writer>,
    local: Option<File>,
) -> Option<PullError> {
    if !processors::ocicrypt::is_encrypted(&layer.media_type) {
        return None;
    }
    let mut blob = match (writer, local) {
        (Some(writer), _) => writer.reopen().ok()?,
        (None, Some(file)) => file,
        (None, None) => return None,
    };
    blob.seek(io::SeekFrom::Start(0)).ok()?;
    let blob = Box::new(io::BufReader::with_capacity(CHUNK, blob));
    let source = processors
        .verify_ciphertext(&layer.descriptor(), blob)
        .err()?;
    Some(PullError::Processor {
        digest: layer.digest.clone(),
        source,
    })
}

/// Stores a layer blob from the registry in the content store, committed once its digest
/// and size are checked; nothing is applied.
pub(super) fn store(
    rx: mpsc::Receiver<io::Result<Bytes>>,
    writer: Writer,
    layer: &LayerRecord,
) -> Result<(), PullError> {
    ingest(rx, None, writer, layer)?
        .commit()
        .map_err(|source| PullError::Blob {
            digest: layer.digest.clone(),
            source,
        })
}

/// Writes every chunk of the body into the content store and forwards it to the decoder,
/// if there is one. Reads the body to its end even when the decoder stopped early: the
/// blob's digest is checked in every case.
fn ingest(
    mut rx: mpsc::Receiver<io::Result<Bytes>>,
    mut forward: Option<SyncSender<io::Result<Bytes>>>,
    mut writer: Writer,
    layer: &LayerRecord,
) -> Result<Writer, PullError> {
    let blob_error = |source: ContentError| PullError::Blob {
        digest: layer.digest.clone(),
        source,
    };
    if let Some(tx) = &forward
        && writer.written() > 0
    {
        forward_resumed(&mut writer, tx).map_err(blob_error)?;
    }
    while let Some(item) = rx.blocking_recv() {
        let chunk = match item {
            Ok(chunk) => chunk,
            Err(e) => {
                let detail = e.to_string();
                if let Some(tx) = forward {
                    let _ = tx.send(Err(e));
                }
                return Err(PullError::Stream {
                    digest: layer.digest.clone(),
                    detail,
                });
            }
        };
        if let Err(e) = writer.write(&chunk) {
            if let Some(tx) = forward {
                let _ = tx.send(Err(io::Error::other(e.to_string())));
            }
            return Err(blob_error(e));
        }
        if let Some(tx) = &forward
            && tx.send(Ok(chunk)).is_err()
        {
            forward = None;
        }
    }
    drop(forward);
    writer.check().map_err(blob_error)?;
    Ok(writer)
}

/// Sends the decoder what a resumed download had received before, read back from the
/// ingest, ahead of what the registry sends now.
fn forward_resumed(
    writer: &mut Writer,
    tx: &SyncSender<io::Result<Bytes>>,
) -> Result<(), ContentError> {
    let mut file = writer.reopen()?;
    let mut left = writer.written();
    while left > 0 {
        let mut chunk = vec![0; CHUNK.min(left as usize)];
        let read = file.read(&mut chunk).map_err(|source| ContentError::Io {
            path: writer.path(),
            source,
        })?;
        if read == 0 {
            return Err(ContentError::Io {
                path: writer.path(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the download to resume from ended {left} bytes short"),
                ),
            });
        }
        chunk.truncate(read);
        left -= read as u64;
        if tx.send(Ok(Bytes::from(chunk))).is_err() {
            break;
        }
    }
    Ok(())
}

/// Runs the processor chain over the blob and sends the plain tar stream on in chunks,
/// stopping as soon as the layer unpacks to more than `limits` allow.
fn decode(
    processors: &processors::Chain,
    layer: &LayerRecord,
    blob: processors::Input<'_>,
    limits: &Limits,
    tx: SyncSender<io::Result<Vec<u8>>>,
    free: Receiver<Vec<u8>>,
) -> Result<(), PullError> {
    let mut tar = processors
        .open(&layer.descriptor(), blob)
        .map_err(|source| PullError::Processor {
            digest: layer.digest.clone(),
            source,
        })?;
    let mut unpacked = 0u64;
    // A closed channel either way means the applier stopped; its error says why.
    while let Ok(mut chunk) = free.recv() {
        chunk.resize(CHUNK, 0);
        match read_full(&mut tar, &mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                unpacked += n as u64;
                if let Some(detail) = limits.crossed(unpacked) {
                    let _ = tx.send(Err(io::Error::other(detail.clone())));
                    return Err(PullError::Expansion {
                        digest: layer.digest.clone(),
                        detail,
                    });
                }
                chunk.truncate(n);
                if tx.send(Ok(chunk)).is_err() {
                    break;
                }
            }
            Err(source) => {
                let _ = tx.send(Err(io::Error::new(source.kind(), source.to_string())));
                return Err(PullError::Decode {
                    digest: layer.digest.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// [`UnpackLimits`] with the count of blob bytes the decoder has read.
struct Limits {
    limits: UnpackLimits,
    read: Arc<AtomicU64>,
}

impl Limits {
    /// What `unpacked` bytes of tar cross, if anything.
    fn crossed(&self, unpacked: u64) -> Option<String> {
        if let Some(max) = self.limits.max_size.filter(|max| unpacked > *max) {
            return Some(format!(
                "unpacks to more than {max} bytes (max_layer_unpacked_size)"
            ));
        }
        let read = self.read.load(Ordering::Relaxed).max(1);
        let ratio = self.limits.max_ratio?;
        (unpacked > RATIO_FLOOR && unpacked / read > ratio).then(|| {
            format!(
                "unpacks to {unpacked} bytes from {read} bytes of blob, more than {ratio} times \
                 as many (max_layer_compression_ratio): a decompression bomb"
            )
        })
    }
}

/// A blob reader counting the bytes read or consumed through it, for the decoder to compare
/// with what they unpack to.
struct Counted<'a> {
    inner: processors::Input<'a>,
    read: Arc<AtomicU64>,
}

impl<'a> Counted<'a> {
    fn new(inner: processors::Input<'a>) -> Self {
        Self {
            inner,
            read: Arc::default(),
        }
    }
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl BufRead for Counted<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        self.read.fetch_add(amount as u64, Ordering::Relaxed);
        self.inner.consume(amount);
    }
}

/// Hashes the plain tar chunks and passes them on, errors too; returns the digest of what
/// it passed on.
fn hash(rx: Receiver<io::Result<Vec<u8>>>, tx: SyncSender<io::Result<Vec<u8>>>) -> Digest {
    let mut hasher = Sha256::new();
    for chunk in rx {
        if let Ok(chunk) = &chunk {
            hasher.update(chunk);
        }
        if tx.send(chunk).is_err() {
            break;
        }
    }
    Digest::from_hasher(hasher)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Applies the tar stream, reading it to its end.
fn apply_tar(
    snapshotter: &dyn Snapshotter,
    key: &str,
    layer: &LayerRecord,
    mut tar: ChunkReader<Vec<u8>>,
) -> Result<(), PullError> {
    snapshotter
        .apply(key, &mut tar)
        .map(drop)
        .map_err(|source| PullError::Apply {
            digest: layer.digest.clone(),
            source,
        })
}

/// The receiving end of a chunk channel as a `BufRead` whose buffer is the current chunk; a
/// closed channel is the end of the stream. Chunks read to the end go back to their sender
/// when it recycles them.
struct ChunkReader<T> {
    rx: Receiver<io::Result<T>>,
    chunk: Option<T>,
    position: usize,
    recycle: Option<SyncSender<T>>,
}

impl<T: AsRef<[u8]>> ChunkReader<T> {
    fn new(rx: Receiver<io::Result<T>>, recycle: Option<SyncSender<T>>) -> Self {
        Self {
            rx,
            chunk: None,
            position: 0,
            recycle,
        }
    }

    /// The unread rest of the current chunk, fetching the next one when it is used up;
    /// empty at the end of the stream.
    fn current(&mut self) -> io::Result<&[u8]> {
        loop {
            let len = self.chunk.as_ref().map_or(0, |c| c.as_ref().len());
            if self.position < len {
                break;
            }
            if let (Some(done), Some(recycle)) = (self.chunk.take(), &self.recycle) {
                let _ = recycle.try_send(done);
            }
            self.position = 0;
            match self.rx.recv() {
                Ok(next) => self.chunk = Some(next?),
                Err(_) => return Ok(&[]),
            }
        }
        let chunk = self.chunk.as_ref().expect("chunk present");
        Ok(&chunk.as_ref()[self.position..])
    }
}

impl<T: AsRef<[u8]>> Read for ChunkReader<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = self.current()?;
        let n = buf.len().min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.position += n;
        Ok(n)
    }
}

impl<T: AsRef<[u8]>> BufRead for ChunkReader<T> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.current()
    }

    fn consume(&mut self, amount: usize) {
        self.position += amount;
    }
}
