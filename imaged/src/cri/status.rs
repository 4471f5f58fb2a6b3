//! The one place where errors become gRPC statuses.

use crate::content::ContentError;
use crate::error::Error;
use crate::gc::GcError;
use crate::images::ImageStoreError;
use crate::manifest::ManifestError;
use crate::pull::PullError;
use crate::registry::{FailureKind, RegistryError};
use tonic::{Code, Status};

/// Turns an error into the status a CRI client sees; the message is the full error chain.
pub fn to_status(error: &Error) -> Status {
    Status::new(code(error), error.to_string())
}

fn code(error: &Error) -> Code {
    match error {
        Error::Reference(_) | Error::Auth(_) | Error::InvalidRequest(_) => Code::InvalidArgument,
        Error::Pull(e) => pull_code(e),
        Error::Images(e) => images_code(e),
        Error::Content(e) => content_code(e),
        Error::Gc(GcError::Content(e)) => content_code(e),
        Error::Gc(GcError::Snapshot(e)) => snapshot_code(e),
        Error::ImageNotFound(_) => Code::NotFound,
        Error::Snapshot { source, .. } => snapshot_code(source),
    }
}

fn pull_code(error: &PullError) -> Code {
    match error {
        PullError::Registry(e) => registry_code(e),
        PullError::Manifest(ManifestError::NoPlatform { .. }) => Code::NotFound,
        PullError::Manifest(
            ManifestError::Malformed { .. }
            | ManifestError::Unsupported { .. }
            | ManifestError::LayerCount { .. },
        ) => Code::InvalidArgument,
        PullError::Blob { source, .. } | PullError::Content(source) => content_code(source),
        PullError::DiffId { .. } => Code::DataLoss,
        PullError::Processor { source, .. } => processor_code(source),
        PullError::Stream { .. } => Code::Unavailable,
        PullError::Decode { source, .. } => {
            processors::Error::from_io(source).map_or(Code::InvalidArgument, processor_code)
        }
        PullError::Apply { source, .. } => apply_code(source),
        PullError::Snapshot { source, .. } => snapshot_code(source),
        PullError::Images(e) => images_code(e),
    }
}

fn processor_code(error: &processors::Error) -> Code {
    use processors::Error as E;
    match error {
        E::Unsupported(_) | E::ChainTooLong { .. } | E::InvalidEncryption { .. } => {
            Code::InvalidArgument
        }
        E::Config { .. } | E::DecryptionDisabled { .. } | E::NoKey { .. } => {
            Code::FailedPrecondition
        }
        E::Integrity { .. } => Code::DataLoss,
        E::Setup { .. } | E::External { .. } => Code::Internal,
    }
}

fn registry_code(error: &RegistryError) -> Code {
    match error {
        RegistryError::Hosts(_) => Code::FailedPrecondition,
        RegistryError::NoHosts { .. } => Code::NotFound,
        RegistryError::Fetch { kind, .. } => match kind {
            FailureKind::Unavailable => Code::Unavailable,
            FailureKind::NotFound => Code::NotFound,
            FailureKind::Corrupt => Code::DataLoss,
            FailureKind::Unauthenticated => Code::Unauthenticated,
            FailureKind::Failed => Code::Unknown,
        },
    }
}

fn content_code(error: &ContentError) -> Code {
    match error {
        ContentError::DigestMismatch { .. } | ContentError::SizeMismatch { .. } => Code::DataLoss,
        ContentError::NotFound(_) => Code::NotFound,
        ContentError::Io { .. } => Code::Internal,
    }
}

fn images_code(error: &ImageStoreError) -> Code {
    match error {
        ImageStoreError::Ambiguous(_) => Code::InvalidArgument,
        ImageStoreError::Db(_) | ImageStoreError::Corrupt { .. } => Code::Internal,
    }
}

/// A layer that cannot be applied is bad input, unless the disk failed or filled under it.
fn apply_code(error: &snapshotters::Error) -> Code {
    match snapshot_code(error) {
        code @ (Code::Internal | Code::ResourceExhausted) => code,
        _ => Code::InvalidArgument,
    }
}

fn snapshot_code(error: &snapshotters::Error) -> Code {
    use snapshotters::ErrorKind as K;
    match error.kind() {
        K::NotFound => Code::NotFound,
        K::AlreadyExists => Code::AlreadyExists,
        K::InvalidArgument => Code::InvalidArgument,
        K::FailedPrecondition => Code::FailedPrecondition,
        K::ResourceExhausted => Code::ResourceExhausted,
        K::Internal => Code::Internal,
    }
}
