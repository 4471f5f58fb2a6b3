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
        Error::Reference(_) | Error::Auth(_) | Error::InvalidRequest(_) | Error::ReservedKey(_) => {
            Code::InvalidArgument
        }
        Error::Pull(e) => pull_code(e),
        Error::Images(e) => images_code(e),
        Error::Content(e) => content_code(e),
        Error::Gc(GcError::Content(e)) => content_code(e),
        Error::Gc(GcError::Snapshot(e)) => snapshot_code(e),
        Error::ImageNotFound(_) => Code::NotFound,
        Error::Check(_) => Code::Internal,
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
        PullError::Expansion { .. } | PullError::TooManyLayers { .. } => Code::ResourceExhausted,
        PullError::Decode { source, .. } => {
            processors::Error::from_io(source).map_or(Code::InvalidArgument, processor_code)
        }
        PullError::Apply { source, .. } => apply_code(source),
        PullError::Snapshot { source, .. } => snapshot_code(source),
        PullError::Images(e) => images_code(e),
        PullError::BlobGone { .. } => Code::FailedPrecondition,
        PullError::BelowFailed { .. } => Code::Aborted,
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
            FailureKind::TooLarge => Code::ResourceExhausted,
            FailureKind::TimedOut => Code::DeadlineExceeded,
        },
    }
}

fn content_code(error: &ContentError) -> Code {
    match error {
        ContentError::DigestMismatch { .. }
        | ContentError::ResumedMismatch { .. }
        | ContentError::SizeMismatch { .. } => Code::DataLoss,
        ContentError::NotFound(_) => Code::NotFound,
        ContentError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) =>
        {
            Code::ResourceExhausted
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::reference::InvalidReference;
    use crate::registry::Attempt;
    use crate::registry::auth::InvalidAuth;
    use crate::registry::hosts::HostsError;
    use std::io;
    use std::path::PathBuf;

    fn digest() -> Digest {
        Digest::of(b"layer")
    }

    fn io_error(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    fn fetch(kind: FailureKind) -> Error {
        PullError::Registry(RegistryError::Fetch {
            what: "manifest r.io/a:1".into(),
            kind,
            attempts: vec![Attempt {
                url: "https://r.io/v2/a/manifests/1".into(),
                kind,
                detail: "x".into(),
            }],
        })
        .into()
    }

    fn content_errors() -> Vec<(ContentError, Code)> {
        vec![
            (
                ContentError::Io {
                    path: PathBuf::from("/c"),
                    source: io_error(libc::EIO),
                },
                Code::Internal,
            ),
            (
                ContentError::Io {
                    path: PathBuf::from("/c"),
                    source: io_error(libc::ENOSPC),
                },
                Code::ResourceExhausted,
            ),
            (
                ContentError::DigestMismatch {
                    expected: digest(),
                    actual: Digest::of(b"other"),
                },
                Code::DataLoss,
            ),
            (
                ContentError::SizeMismatch {
                    digest: digest(),
                    expected: 1,
                    actual: 2,
                },
                Code::DataLoss,
            ),
            (ContentError::NotFound(digest()), Code::NotFound),
        ]
    }

    fn manifest_errors() -> Vec<(ManifestError, Code)> {
        vec![
            (
                ManifestError::Malformed {
                    what: "manifest",
                    digest: digest(),
                    message: "eof".into(),
                },
                Code::InvalidArgument,
            ),
            (
                ManifestError::Unsupported {
                    what: "layer",
                    media_type: "x".into(),
                    digest: digest(),
                },
                Code::InvalidArgument,
            ),
            (
                ManifestError::NoPlatform {
                    digest: digest(),
                    platform: "linux/s390x".into(),
                },
                Code::NotFound,
            ),
            (
                ManifestError::LayerCount {
                    digest: digest(),
                    diff_ids: 1,
                    layers: 2,
                },
                Code::InvalidArgument,
            ),
        ]
    }

    fn image_store_errors() -> Vec<(ImageStoreError, Code)> {
        vec![
            (ImageStoreError::Db("closed".into()), Code::Internal),
            (
                ImageStoreError::Corrupt {
                    id: "sha256:1".into(),
                    message: "eof".into(),
                },
                Code::Internal,
            ),
            (
                ImageStoreError::Ambiguous("ab".into()),
                Code::InvalidArgument,
            ),
        ]
    }

    fn processor_errors() -> Vec<(processors::Error, Code)> {
        use processors::Error as E;
        let text = || "x".to_string();
        vec![
            (E::Unsupported(text()), Code::InvalidArgument),
            (
                E::ChainTooLong {
                    media_type: text(),
                    path: text(),
                },
                Code::InvalidArgument,
            ),
            (
                E::Setup {
                    processor: text(),
                    source: io_error(libc::EIO),
                },
                Code::Internal,
            ),
            (
                E::External {
                    name: text(),
                    reason: text(),
                },
                Code::Internal,
            ),
            (
                E::Config {
                    name: text(),
                    reason: text(),
                },
                Code::FailedPrecondition,
            ),
            (
                E::DecryptionDisabled {
                    digest: text(),
                    media_type: text(),
                },
                Code::FailedPrecondition,
            ),
            (
                E::NoKey {
                    digest: text(),
                    wrapped_for: text(),
                    detail: String::new(),
                },
                Code::FailedPrecondition,
            ),
            (
                E::InvalidEncryption {
                    digest: text(),
                    reason: text(),
                },
                Code::InvalidArgument,
            ),
            (
                E::Integrity {
                    digest: text(),
                    expected: text(),
                    actual: text(),
                },
                Code::DataLoss,
            ),
        ]
    }

    /// One error of each snapshotter class, with the code it has as a snapshot failure and
    /// the code it has while a layer is applied.
    fn snapshot_errors() -> Vec<(snapshotters::Error, Code, Code)> {
        use snapshotters::{Error as E, LayerError as L};
        let key = || "k".to_string();
        let layer = |reason| E::Layer {
            path: "etc/x".into(),
            reason,
        };
        let metadata = serde_json::from_str::<u8>("x").unwrap_err();
        vec![
            (
                E::NotFound { key: key() },
                Code::NotFound,
                Code::InvalidArgument,
            ),
            (
                E::AlreadyExists { key: key() },
                Code::AlreadyExists,
                Code::InvalidArgument,
            ),
            (
                E::InvalidArgument {
                    key: key(),
                    reason: key(),
                },
                Code::InvalidArgument,
                Code::InvalidArgument,
            ),
            (
                E::FailedPrecondition {
                    key: key(),
                    reason: key(),
                },
                Code::FailedPrecondition,
                Code::InvalidArgument,
            ),
            (
                E::Io {
                    op: "create directory",
                    path: "/s".into(),
                    source: io_error(libc::ENOSPC),
                },
                Code::ResourceExhausted,
                Code::ResourceExhausted,
            ),
            (
                E::Io {
                    op: "create directory",
                    path: "/s".into(),
                    source: io_error(libc::EIO),
                },
                Code::Internal,
                Code::Internal,
            ),
            (
                E::Metadata {
                    key: key(),
                    source: snapshotters::MetadataError::Record(metadata),
                },
                Code::Internal,
                Code::Internal,
            ),
            (
                layer(L::Truncated),
                Code::InvalidArgument,
                Code::InvalidArgument,
            ),
            (
                layer(L::Limit {
                    what: "entries",
                    limit: 1,
                }),
                Code::ResourceExhausted,
                Code::ResourceExhausted,
            ),
            (
                layer(L::Io {
                    op: "create file",
                    source: io_error(libc::ENOTDIR),
                }),
                Code::InvalidArgument,
                Code::InvalidArgument,
            ),
            (
                layer(L::Io {
                    op: "create file",
                    source: io_error(libc::EIO),
                }),
                Code::Internal,
                Code::Internal,
            ),
        ]
    }

    /// Every variant of [`Error`], and of the errors it carries, next to the code it must
    /// become.
    fn table() -> Vec<(Error, Code)> {
        let mut table: Vec<(Error, Code)> = vec![
            (
                InvalidReference {
                    reference: "A:".into(),
                    reason: "bad",
                }
                .into(),
                Code::InvalidArgument,
            ),
            (InvalidAuth("bad base64").into(), Code::InvalidArgument),
            (Error::InvalidRequest("key"), Code::InvalidArgument),
            (
                Error::ReservedKey("extract-1".into()),
                Code::InvalidArgument,
            ),
            (Error::ImageNotFound("a".into()), Code::NotFound),
            (
                PullError::Registry(RegistryError::NoHosts {
                    registry: "r.io".into(),
                    capability: "pull",
                })
                .into(),
                Code::NotFound,
            ),
            (fetch(FailureKind::Unavailable), Code::Unavailable),
            (fetch(FailureKind::NotFound), Code::NotFound),
            (fetch(FailureKind::Corrupt), Code::DataLoss),
            (fetch(FailureKind::Unauthenticated), Code::Unauthenticated),
            (fetch(FailureKind::Failed), Code::Unknown),
            (fetch(FailureKind::TooLarge), Code::ResourceExhausted),
            (fetch(FailureKind::TimedOut), Code::DeadlineExceeded),
            (
                PullError::DiffId {
                    digest: digest(),
                    expected: digest(),
                    actual: digest(),
                }
                .into(),
                Code::DataLoss,
            ),
            (
                PullError::Stream {
                    digest: digest(),
                    detail: "reset".into(),
                }
                .into(),
                Code::Unavailable,
            ),
            (
                PullError::Decode {
                    digest: digest(),
                    source: io::Error::new(io::ErrorKind::InvalidData, "corrupt deflate"),
                }
                .into(),
                Code::InvalidArgument,
            ),
        ];
        let hosts = [
            HostsError::Read {
                path: "/h".into(),
                source: io_error(libc::EACCES),
            },
            HostsError::Syntax {
                path: "/h".into(),
                message: "x".into(),
            },
            HostsError::Field {
                path: "/h".into(),
                field: "ca".into(),
                message: "x".into(),
            },
        ];
        for error in hosts {
            let pull = PullError::Registry(error.into());
            table.push((pull.into(), Code::FailedPrecondition));
        }
        for (error, code) in content_errors() {
            table.push((Error::Content(error), code));
        }
        for (error, code) in content_errors() {
            table.push((PullError::Content(error).into(), code));
        }
        for (source, code) in content_errors() {
            let blob = PullError::Blob {
                digest: digest(),
                source,
            };
            table.push((blob.into(), code));
        }
        for (error, code) in content_errors() {
            table.push((GcError::Content(error).into(), code));
        }
        for (error, code) in manifest_errors() {
            table.push((PullError::Manifest(error).into(), code));
        }
        for (error, code) in image_store_errors() {
            table.push((Error::Images(error), code));
        }
        for (error, code) in image_store_errors() {
            table.push((PullError::Images(error).into(), code));
        }
        for i in 0..processor_errors().len() {
            let (source, code) = processor_errors().swap_remove(i);
            let (streamed, _) = processor_errors().swap_remove(i);
            let processor = PullError::Processor {
                digest: digest(),
                source,
            };
            table.push((processor.into(), code));
            let decoded = PullError::Decode {
                digest: digest(),
                source: streamed.into_io(),
            };
            table.push((decoded.into(), code));
        }
        for (source, code, _) in snapshot_errors() {
            let service = Error::Snapshot {
                key: "k".into(),
                source,
            };
            table.push((service, code));
        }
        for (source, code, _) in snapshot_errors() {
            table.push((GcError::Snapshot(source).into(), code));
        }
        for (source, code, _) in snapshot_errors() {
            let pull = PullError::Snapshot {
                key: "k".into(),
                source,
            };
            table.push((pull.into(), code));
        }
        for (source, _, code) in snapshot_errors() {
            let pull = PullError::Apply {
                digest: digest(),
                source,
            };
            table.push((pull.into(), code));
        }
        table
    }

    #[test]
    fn every_error_becomes_its_code_and_keeps_its_message() {
        for (error, expected) in table() {
            let status = to_status(&error);
            assert_eq!(status.code(), expected, "{error:?}");
            assert_eq!(status.message(), error.to_string());
        }
    }
}
