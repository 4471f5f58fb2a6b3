//! The crate's error: every module's error gathered in one enum, turned into a gRPC status
//! in exactly one place (`cri::status`).

use crate::content::ContentError;
use crate::gc::GcError;
use crate::images::ImageStoreError;
use crate::pull::PullError;
use crate::reference::InvalidReference;
use crate::registry::auth::InvalidAuth;

/// Errors of imaged's services.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference does not parse.
    #[error(transparent)]
    Reference(#[from] InvalidReference),
    /// The CRI auth config could not be decoded.
    #[error(transparent)]
    Auth(#[from] InvalidAuth),
    /// The pull failed.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// Image metadata failed.
    #[error(transparent)]
    Images(#[from] ImageStoreError),
    /// The content store failed.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// Garbage collection failed.
    #[error(transparent)]
    Gc(#[from] GcError),
    /// The store could not be checked.
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
    /// No image has this name or id.
    #[error("image {0:?} not found")]
    ImageNotFound(String),
    /// A snapshot operation failed.
    #[error("snapshot {key}: {source}")]
    Snapshot {
        /// Key or name.
        key: String,
        /// Cause.
        source: snapshotters::Error,
    },
    /// The snapshot key is one imaged keeps for its own snapshots.
    #[error("snapshot key {0:?} is reserved for image layers")]
    ReservedKey(String),
    /// A required request field is missing or empty.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
}
