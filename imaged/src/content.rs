//! Content-addressed blob store: `<root>/content/blobs/sha256/<hex>`.
//!
//! Blobs are written to a private ingest directory, checked against the expected size and
//! digest, synced and only then renamed into place, so nothing unverified is ever visible.

use crate::digest::Digest;
use sha2::{Digest as _, Sha256};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
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
    next_ingest: AtomicU64,
}

impl ContentStore {
    /// Opens (creating) the store and drops partial downloads left by an earlier process.
    pub fn open(root: &Path) -> Result<Self, ContentError> {
        let store = Self::open_as_found(root)?;
        let ingest = &store.ingest;
        fs::remove_dir_all(ingest).map_err(io_err(ingest))?;
        fs::create_dir_all(ingest).map_err(io_err(ingest))?;
        Ok(store)
    }

    /// Opens (creating) the store as it is, partial downloads included, for a check.
    pub fn open_as_found(root: &Path) -> Result<Self, ContentError> {
        let blobs = root.join("content/blobs/sha256");
        let ingest = root.join("content/ingest");
        for dir in [&blobs, &ingest] {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        Ok(Self {
            blobs,
            ingest,
            next_ingest: AtomicU64::new(0),
        })
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
        let mut writer = self.writer(digest, data.len() as u64)?;
        writer.write(data)?;
        writer.commit()
    }

    /// Starts an ingest of a blob expected to be `size` bytes hashing to `digest`.
    pub fn writer(&self, digest: &Digest, size: u64) -> Result<Writer, ContentError> {
        let n = self.next_ingest.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .ingest
            .join(format!("{}-{}-{n}", digest.hex(), std::process::id()));
        fs::create_dir(&dir).map_err(io_err(&dir))?;
        let data = dir.join("data");
        let file = File::create(&data).map_err(io_err(&data))?;
        Ok(Writer {
            file: BufWriter::with_capacity(64 * 1024, file),
            hasher: Sha256::new(),
            written: 0,
            digest: digest.clone(),
            size,
            target: self.path(digest),
            dir,
            checked: false,
            committed: false,
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
    digest: Digest,
    size: u64,
    target: PathBuf,
    dir: PathBuf,
    checked: bool,
    committed: bool,
}

impl Writer {
    /// Appends data; refuses to go past the announced size.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        self.written += chunk.len() as u64;
        if self.written > self.size {
            return Err(ContentError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.written,
            });
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).map_err(io_err(&self.dir))
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
        if actual != self.digest {
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
        let data = self.dir.join("data");
        File::open(&data).map_err(io_err(&data))
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
        let _ = fs::remove_dir_all(&self.dir);
        if !self.committed {
            tracing::debug!(digest = %self.digest, "ingest abandoned");
        }
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
