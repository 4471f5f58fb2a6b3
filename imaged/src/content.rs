//! Content-addressed blob store: `<root>/content/blobs/sha256/<hex>`.
//!
//! Blobs are written to a private ingest directory, checked against the expected size and
//! digest, synced and only then renamed into place, so nothing unverified is ever visible.
//! What a download that broke off had received (the process killed, the connection given
//! up) is kept as `<root>/content/partial/<hex>`, and the next writer of that blob starts
//! from it, so only the rest is fetched; partials unused for [`PARTIAL_MAX_AGE`] go.

use crate::digest::Digest;
use sha2::{Digest as _, Sha256};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// A file operation failed.
    #[error("content store {path}: {source}")]
    Io {
        /// Path operated on.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The data does not hash to the digest it was fetched by.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Digest asked for.
        expected: Digest,
        /// Digest of what arrived.
        actual: Digest,
    },
    /// More or fewer bytes arrived than the descriptor announced.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Blob.
        digest: Digest,
        /// Announced size.
        expected: u64,
        /// Bytes received (so far, when too many).
        actual: u64,
    },
    /// A download resumed from a partial one does not hash to its digest: the partial's
    /// bytes were wrong (a torn write, a registry that sent others). It is not kept, so the
    /// next download starts over.
    #[error(
        "digest mismatch: expected {expected}, got {actual}, resuming a partial download at byte {from} (the next pull starts over)"
    )]
    ResumedMismatch {
        /// Digest asked for.
        expected: Digest,
        /// Digest of the whole.
        actual: Digest,
        /// Where the partial download ended.
        from: u64,
    },
    /// A blob the store should hold is missing.
    #[error("blob {0} not found in the content store")]
    NotFound(Digest),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The blob store under `<root>/content`.
#[derive(Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    partial: PathBuf,
    next_ingest: AtomicU64,
}

/// How long the bytes of a download that broke off are kept for the next one.
pub const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Bytes an ingest writes between starting their writeback: a few MiB keeps the device busy
/// while the layer downloads, without a syscall per chunk.
const WRITEBACK_STEP: u64 = 8 << 20;

impl ContentStore {
    /// Opens (creating) the store; the downloads an earlier process left in the ingest area
    /// are kept as partials for the next download of their blob.
    pub fn open(root: &Path) -> Result<Self, ContentError> {
        let store = Self::open_as_found(root)?;
        let ingest = &store.ingest;
        for entry in fs::read_dir(ingest).map_err(io_err(ingest))? {
            let dir = entry.map_err(io_err(ingest))?.path();
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            if let Some(Ok(digest)) = name
                .split('-')
                .next()
                .map(|hex| Digest::parse(&format!("sha256:{hex}")))
            {
                store.keep_partial(&digest, &dir.join("data"));
            }
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(store)
    }

    /// Opens (creating) the store as it is, partial downloads included, for a check.
    pub fn open_as_found(root: &Path) -> Result<Self, ContentError> {
        let blobs = root.join("content/blobs/sha256");
        let ingest = root.join("content/ingest");
        let partial = root.join("content/partial");
        for dir in [&blobs, &ingest, &partial] {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        Ok(Self {
            blobs,
            ingest,
            partial,
            next_ingest: AtomicU64::new(0),
        })
    }

    /// Keeps `data`, a download of `digest` that broke off, unless a longer one is kept.
    pub fn keep_partial(&self, digest: &Digest, data: &Path) {
        keep_partial(&self.partial, digest, data);
    }

    /// The directory of partial downloads kept for the next one, one `<hex>` file each.
    pub fn partial_dir(&self) -> &Path {
        &self.partial
    }

    /// Removes the partials not used for `max_age`; returns how many went.
    pub fn drop_stale_partials(&self, max_age: std::time::Duration) -> Result<usize, ContentError> {
        let mut dropped = 0;
        for entry in fs::read_dir(&self.partial).map_err(io_err(&self.partial))? {
            let path = entry.map_err(io_err(&self.partial))?.path();
            let stale = fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > max_age));
            if stale && fs::remove_file(&path).is_ok() {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// The directory of committed blobs, each named by its hex digest.
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs
    }

    /// The directory of downloads in progress, one `<hex>-<pid>-<n>` directory each.
    pub fn ingest_dir(&self) -> &Path {
        &self.ingest
    }

    /// Where a committed blob lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Whether the blob is committed.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).exists()
    }

    /// Reads a whole committed blob (manifests and configs: small by construction).
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, ContentError> {
        fs::read(self.path(digest)).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ContentError::NotFound(digest.clone()),
            _ => ContentError::Io {
                path: self.path(digest),
                source,
            },
        })
    }

    /// Opens a committed blob for streaming.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, ContentError> {
        let path = self.path(digest);
        File::open(&path).map_err(io_err(&path))
    }

    /// Stores `data` after checking it hashes to `digest`.
    pub fn write_verified(&self, digest: &Digest, data: &[u8]) -> Result<(), ContentError> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut writer = self.start_writer(digest, data.len() as u64, false)?;
        writer.write(data)?;
        writer.commit()
    }

    /// Starts an ingest of a blob expected to be `size` bytes hashing to `digest`, from the
    /// partial download of it if one is kept ([`Writer::written`] says how far it got).
    pub fn writer(&self, digest: &Digest, size: u64) -> Result<Writer, ContentError> {
        self.start_writer(digest, size, true)
    }

    fn start_writer(
        &self,
        digest: &Digest,
        size: u64,
        resume: bool,
    ) -> Result<Writer, ContentError> {
        let n = self.next_ingest.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .ingest
            .join(format!("{}-{}-{n}", digest.hex(), std::process::id()));
        fs::create_dir(&dir).map_err(io_err(&dir))?;
        let data = dir.join("data");
        // Taken by a rename, so two writers of one blob never share a partial.
        let resumed = resume && fs::rename(self.partial.join(digest.hex()), &data).is_ok();
        let (file, hasher, written) = match resumed.then(|| hash_prefix(&data, size)).flatten() {
            Some((hasher, written)) => {
                let file = fs::OpenOptions::new().append(true).open(&data);
                (file.map_err(io_err(&data))?, hasher, written)
            }
            None => (
                File::create(&data).map_err(io_err(&data))?,
                Sha256::new(),
                0,
            ),
        };
        if written > 0 {
            tracing::debug!(%digest, written, "resuming a download that broke off");
        }
        Ok(Writer {
            file: BufWriter::with_capacity(64 * 1024, file),
            hasher,
            written,
            resumed_from: written,
            writeback_from: written,
            digest: digest.clone(),
            size,
            target: self.path(digest),
            partial: self.partial.clone(),
            dir,
            checked: false,
            committed: false,
            poisoned: false,
        })
    }

    /// Deletes a committed blob; absent blobs are fine.
    pub fn delete(&self, digest: &Digest) -> Result<(), ContentError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Digests of every committed blob.
    pub fn list(&self) -> Result<Vec<Digest>, ContentError> {
        let entries = fs::read_dir(&self.blobs).map_err(io_err(&self.blobs))?;
        let mut digests = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&self.blobs))?;
            if let Ok(digest) = Digest::parse(&format!("sha256:{}", entry.file_name().display())) {
                digests.push(digest);
            }
        }
        Ok(digests)
    }
}

/// One blob being ingested; dropped without [`Writer::commit`] it leaves nothing behind.
#[derive(Debug)]
pub struct Writer {
    file: BufWriter<File>,
    hasher: Sha256,
    written: u64,
    /// The bytes a partial download gave it to start with.
    resumed_from: u64,
    /// The bytes whose writeback to disk has been started.
    writeback_from: u64,
    digest: Digest,
    size: u64,
    target: PathBuf,
    partial: PathBuf,
    dir: PathBuf,
    checked: bool,
    committed: bool,
    /// More than the size arrived, or the digest did not match: nothing worth keeping.
    poisoned: bool,
}

impl Writer {
    /// Appends data; refuses to go past the announced size.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        self.written += chunk.len() as u64;
        if self.written > self.size {
            self.poisoned = true;
            return Err(ContentError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.written,
            });
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).map_err(io_err(&self.dir))?;
        if self.written - self.writeback_from >= WRITEBACK_STEP {
            self.start_writeback()?;
        }
        Ok(())
    }

    /// Starts writing the blob's newest bytes to disk without waiting for them, so that the
    /// `fsync` of [`Writer::commit`] finds little left to write: a large layer's commit
    /// would otherwise wait for all of its blob at the end of the pull.
    fn start_writeback(&mut self) -> Result<(), ContentError> {
        self.file.flush().map_err(io_err(&self.dir))?;
        let (from, to) = (self.writeback_from, self.written);
        self.writeback_from = to;
        let fd = self.file.get_ref().as_raw_fd();
        let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
            return Ok(());
        };
        // SAFETY: sync_file_range only reads its integer arguments; `fd` is the open file
        // this writer owns. rustix has no binding for it. Its result is a hint only: the
        // fsync at commit makes the blob durable and reports any write error.
        let _ = unsafe { libc::sync_file_range(fd, offset, len, libc::SYNC_FILE_RANGE_WRITE) };
        Ok(())
    }

    /// Checks that exactly the announced bytes arrived and that they hash to the digest.
    pub fn check(&mut self) -> Result<(), ContentError> {
        if self.checked {
            return Ok(());
        }
        if self.written != self.size {
            return Err(ContentError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.written,
            });
        }
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.digest && self.resumed_from > 0 {
            self.poisoned = true;
            return Err(ContentError::ResumedMismatch {
                expected: self.digest.clone(),
                actual,
                from: self.resumed_from,
            });
        }
        if actual != self.digest {
            self.poisoned = true;
            return Err(ContentError::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        self.checked = true;
        Ok(())
    }

    /// The data written so far, opened for reading from the start.
    pub fn reopen(&mut self) -> Result<File, ContentError> {
        self.file.flush().map_err(io_err(&self.dir))?;
        let data = self.path();
        File::open(&data).map_err(io_err(&data))
    }

    /// The file the ingest writes.
    pub fn path(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Bytes of the blob the ingest holds: from a partial download at first, then growing.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks size and digest, syncs, and renames the blob into the store.
    pub fn commit(mut self) -> Result<(), ContentError> {
        self.check()?;
        self.file.flush().map_err(io_err(&self.dir))?;
        self.file.get_ref().sync_all().map_err(io_err(&self.dir))?;
        let data = self.dir.join("data");
        fs::rename(&data, &self.target).map_err(io_err(&self.target))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.committed {
            tracing::debug!(digest = %self.digest, written = self.written, "ingest abandoned");
            if !self.poisoned && self.written < self.size && self.file.flush().is_ok() {
                keep_partial(&self.partial, &self.digest, &self.dir.join("data"));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Moves `data` to `partial/<hex>` unless it is empty or a longer partial is there.
fn keep_partial(partial: &Path, digest: &Digest, data: &Path) {
    let len = |path: &Path| fs::metadata(path).map_or(0, |m| m.len());
    let kept = partial.join(digest.hex());
    if len(data) > len(&kept) && fs::rename(data, &kept).is_ok() {
        // Its age counts from when it was last of use, not last written.
        let _ = File::options()
            .write(true)
            .open(&kept)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }
}

/// The hash of a partial download's bytes and their count; `None` when it is not shorter
/// than the blob (then it cannot be a prefix worth resuming from) or cannot be read.
fn hash_prefix(data: &Path, size: u64) -> Option<(Sha256, u64)> {
    hash_file(data).ok().filter(|(_, read)| *read < size)
}

/// The SHA-256 state after a whole file, and its length.
pub fn hash_file(path: &Path) -> io::Result<(Sha256, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut read = 0;
    loop {
        let n = io::Read::read(&mut file, &mut buffer)?;
        if n == 0 {
            return Ok((hasher, read));
        }
        hasher.update(&buffer[..n]);
        read += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_blob_becomes_visible_and_bad_one_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = ContentStore::open(root.path()).unwrap();
        let good = Digest::of(b"hello");
        store.write_verified(&good, b"hello").unwrap();
        assert_eq!(store.read(&good).unwrap(), b"hello");

        let claimed = Digest::of(b"other");
        let err = store.write_verified(&claimed, b"evil!").unwrap_err();
        assert!(matches!(err, ContentError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&claimed));
        let ingest = fs::read_dir(root.path().join("content/ingest")).unwrap();
        assert_eq!(ingest.count(), 0);
    }

    #[test]
    fn a_download_that_broke_off_is_resumed_by_the_next_writer_of_its_blob() {
        let root = tempfile::tempdir().unwrap();
        let blob = b"0123456789abcdef";
        let digest = Digest::of(blob);
        let store = ContentStore::open(root.path()).unwrap();
        let mut first = store.writer(&digest, 16).unwrap();
        first.write(&blob[..6]).unwrap();
        drop(first);
        let partial = root.path().join("content/partial").join(digest.hex());
        assert_eq!(fs::read(&partial).unwrap(), &blob[..6]);

        // A process that stopped mid-download leaves its ingest; the next start keeps it.
        let mut second = store.writer(&digest, 16).unwrap();
        assert_eq!(second.written(), 6);
        assert!(!partial.exists(), "a partial serves one writer");
        second.write(&blob[6..10]).unwrap();
        second.reopen().unwrap();
        std::mem::forget(second);
        let store = ContentStore::open(root.path()).unwrap();
        assert_eq!(fs::read(&partial).unwrap(), &blob[..10]);
        let mut third = store.writer(&digest, 16).unwrap();
        assert_eq!(third.written(), 10);
        third.write(&blob[10..]).unwrap();
        third.commit().unwrap();
        assert_eq!(store.read(&digest).unwrap(), blob);
        assert_eq!(
            fs::read_dir(root.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_download_that_proved_wrong_is_not_kept() {
        let root = tempfile::tempdir().unwrap();
        let store = ContentStore::open(root.path()).unwrap();
        let digest = Digest::of(b"abc");
        let mut w = store.writer(&digest, 3).unwrap();
        w.write(b"abd").unwrap();
        assert!(w.check().is_err());
        drop(w);
        let mut w = store.writer(&digest, 2).unwrap();
        assert!(w.write(b"abc").is_err());
        drop(w);
        assert_eq!(
            fs::read_dir(root.path().join("content/partial"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(store.writer(&digest, 3).unwrap().written(), 0);
        assert_eq!(
            store
                .drop_stale_partials(std::time::Duration::ZERO)
                .unwrap(),
            0
        );

        // A partial whose bytes were wrong fails its download once, saying so, and goes.
        let mut torn = store.writer(&digest, 3).unwrap();
        torn.write(b"x").unwrap();
        drop(torn);
        let mut resumed = store.writer(&digest, 3).unwrap();
        assert_eq!(resumed.written(), 1);
        resumed.write(b"bc").unwrap();
        let err = resumed.check().unwrap_err();
        assert!(
            matches!(err, ContentError::ResumedMismatch { from: 1, .. }),
            "{err}"
        );
        drop(resumed);
        assert_eq!(store.writer(&digest, 3).unwrap().written(), 0);
    }

    #[test]
    fn writer_refuses_more_than_announced() {
        let root = tempfile::tempdir().unwrap();
        let store = ContentStore::open(root.path()).unwrap();
        let mut w = store.writer(&Digest::of(b"abc"), 2).unwrap();
        assert!(matches!(
            w.write(b"abc"),
            Err(ContentError::SizeMismatch { .. })
        ));
    }
}
