//! Errors of the snapshotters crate. Every variant names the key, entry or path it is
//! about; [`Error::kind`] tells the service edge which status code fits.

use std::io;
use std::path::PathBuf;

/// Everything a snapshotter, a layer application or a mount can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No snapshot has this key or name.
    #[error("snapshot {key:?} not found")]
    NotFound {
        /// The key or name looked up.
        key: String,
    },
    /// The key or name is already taken.
    #[error("snapshot {key:?} already exists")]
    AlreadyExists {
        /// The key or name that is taken.
        key: String,
    },
    /// The request itself is wrong (e.g. a parent that is not committed).
    #[error("snapshot {key:?}: {reason}")]
    InvalidArgument {
        /// The key, name or path the request was about.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The snapshot is not in a state that allows the operation.
    #[error("snapshot {key:?}: {reason}")]
    FailedPrecondition {
        /// The key or name of the snapshot.
        key: String,
        /// Which state prevents the operation.
        reason: String,
    },
    /// A file system or mount call failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What was being done, e.g. "create directory".
        op: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// The metadata store failed.
    #[error("snapshot metadata for {key:?}: {source}")]
    Metadata {
        /// The key or name being read or written (or the table, for store-wide work).
        key: String,
        /// What failed in the store.
        source: MetadataError,
    },
    /// A layer could not be applied; the snapshot holds a partial layer (small files are
    /// finished on a second thread, so entries shortly after the failing one may be there).
    #[error("layer entry {path:?}: {reason}")]
    Layer {
        /// The entry's path as written in the archive, or the header's byte offset when the
        /// path is not known yet.
        path: String,
        /// Why the entry was rejected or failed.
        reason: LayerError,
    },
}

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// redb reported an error.
    #[error(transparent)]
    Store(#[from] redb::Error),
    /// A stored record could not be decoded or encoded.
    #[error("record encoding: {0}")]
    Record(#[from] serde_json::Error),
}

/// Why a layer entry was rejected or failed.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The stream ended inside a header or an entry's data.
    #[error("archive is truncated")]
    Truncated,
    /// The header's checksum does not match its content.
    #[error("header checksum mismatch")]
    Checksum,
    /// A numeric header field could not be parsed or is out of range.
    #[error("malformed {0} field")]
    Field(&'static str),
    /// A PAX record could not be parsed or has an invalid value.
    #[error("malformed PAX record {0:?}")]
    PaxRecord(String),
    /// A PAX header or GNU long name is larger than [`crate::MAX_EXTENSION_SIZE`].
    #[error("{kind} of {size} bytes exceeds the limit of {limit} bytes")]
    ExtensionTooLarge {
        /// "PAX header", "GNU long name" or "GNU long link name".
        kind: &'static str,
        /// Size announced by its header.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Two extension headers of the same kind describe one entry.
    #[error("two {0}s describe one entry")]
    DuplicateExtension(&'static str),
    /// An extension header is not followed by the entry it describes.
    #[error("{0} is not followed by an entry")]
    DanglingExtension(&'static str),
    /// Sparse entries (old GNU `S` or PAX `GNU.sparse.*`) are not supported.
    #[error("sparse files are not supported")]
    Sparse,
    /// The entry type is not one an OCI layer may contain.
    #[error("unsupported entry type {0:?}")]
    UnsupportedType(char),
    /// A whiteout whose target is not a child of its directory (`.wh.`, `.wh..`, `.wh...`).
    #[error("invalid whiteout")]
    InvalidWhiteout,
    /// A device number does not fit in 32 bits.
    #[error("device number does not fit in 32 bits")]
    DeviceNumber,
    /// A configured cap on entries, bytes or path depth was exceeded.
    #[error("layer exceeds the limit of {limit} {what}")]
    Limit {
        /// "entries", "bytes" or "path components".
        what: &'static str,
        /// The configured cap.
        limit: u64,
    },
    /// A layer applied without its parent reaches into the parent's tree: a hardlink to a
    /// file the layer does not contain, a path through what the parent has as a symlink
    /// or a file, or a whiteout through a symlink of the layer's own, which may lead
    /// anywhere in the parent's tree. It can only be applied onto a copy of the parent, if
    /// it has one.
    #[error("{target:?} reaches into the layers below, which a layer applied alone cannot")]
    NeedsParent {
        /// The cleaned target path.
        target: String,
    },
    /// A file system call failed while applying the entry.
    #[error("{op}: {source}")]
    Io {
        /// What was being done, e.g. "create file".
        op: &'static str,
        /// The system error.
        source: io::Error,
    },
}

/// Coarse classes of [`Error`], one per status code the service edge returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The snapshot does not exist.
    NotFound,
    /// The key or name is taken.
    AlreadyExists,
    /// The request or the layer content is invalid.
    InvalidArgument,
    /// The snapshot's state prevents the operation.
    FailedPrecondition,
    /// Out of disk space, quota, or a configured cap.
    ResourceExhausted,
    /// Anything else: system or store failures.
    Internal,
}

impl Error {
    /// The class of this error, for mapping to a status code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::FailedPrecondition { .. } => ErrorKind::FailedPrecondition,
            Error::Io { source, .. } => io_kind(source),
            Error::Metadata { .. } => ErrorKind::Internal,
            Error::Layer { reason, .. } => match reason {
                LayerError::Io { source, .. } => layer_io_kind(source),
                LayerError::Limit { .. } => ErrorKind::ResourceExhausted,
                LayerError::Truncated
                | LayerError::Checksum
                | LayerError::Field(_)
                | LayerError::PaxRecord(_)
                | LayerError::ExtensionTooLarge { .. }
                | LayerError::DuplicateExtension(_)
                | LayerError::DanglingExtension(_)
                | LayerError::Sparse
                | LayerError::UnsupportedType(_)
                | LayerError::InvalidWhiteout
                | LayerError::NeedsParent { .. }
                | LayerError::DeviceNumber => ErrorKind::InvalidArgument,
            },
        }
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

/// A failed file operation while applying a layer is the archive's fault when the error
/// describes the tree it built (a missing link target, a loop, a file where a directory
/// should be), and the system's otherwise.
fn layer_io_kind(source: &io::Error) -> ErrorKind {
    use rustix::io::Errno;
    const CAUSED_BY_THE_ARCHIVE: [Errno; 9] = [
        Errno::NOENT,
        Errno::NOTDIR,
        Errno::ISDIR,
        Errno::EXIST,
        Errno::INVAL,
        Errno::NAMETOOLONG,
        Errno::XDEV,
        Errno::MLINK,
        Errno::LOOP,
    ];
    match Errno::from_io_error(source) {
        Some(errno) if CAUSED_BY_THE_ARCHIVE.contains(&errno) => ErrorKind::InvalidArgument,
        _ => io_kind(source),
    }
}

fn io_kind(source: &io::Error) -> ErrorKind {
    match source.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::ResourceExhausted,
        _ => ErrorKind::Internal,
    }
}
