//! runtimed's error: every module's failure in one enum, turned into a gRPC status in
//! exactly one place ([`Error::to_status`]).

use crate::cni::CniError;
use crate::oci::OciError;
use std::path::PathBuf;
use tonic::{Code, Status};

/// Errors of runtimed's RPCs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No sandbox or container has this id.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// `pod sandbox` or `container`.
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The request is wrong; the text names the field and the value.
    #[error("{0}")]
    InvalidArgument(String),
    /// A name is already taken; the text names it and its owner.
    #[error("{0}")]
    AlreadyExists(String),
    /// The node is not in a state to do it (no network configured, no conmon...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A command ran past its timeout (ExecSync).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// imaged answered with an error (its code is kept).
    #[error("image service: {}", .0.message())]
    Image(Status),
    /// The OCI runtime or conmon failed.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// A CNI plugin failed.
    #[error(transparent)]
    Cni(#[from] CniError),
    /// A file system or mount operation failed.
    #[error("{what} {path}: {message}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        message: String,
    },
}

impl Error {
    /// A failure of `what` on `path`.
    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |e| Error::Io {
            what,
            path,
            message: e.to_string(),
        }
    }

    /// The status a CRI client sees; the message is the whole error.
    pub fn to_status(&self) -> Status {
        let code = match self {
            Error::NotFound { .. } => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) | Error::Oci(OciError::Missing { .. }) => {
                Code::FailedPrecondition
            }
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Image(status) => status.code(),
            Error::Oci(_) | Error::Cni(_) | Error::Io { .. } => Code::Internal,
        };
        Status::new(code, self.to_string())
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::Image(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_its_code() {
        let cni = CniError::NotFound {
            network: "n".into(),
            plugin: "p".into(),
            dirs: "/d".into(),
        };
        let missing = OciError::Missing {
            what: "conmon".into(),
            path: "conmon".into(),
        };
        let failed = OciError::Failed {
            id: "c".into(),
            program: "runc".into(),
            command: "start".into(),
            message: "x".into(),
        };
        let cases = [
            (
                Error::NotFound {
                    what: "pod sandbox",
                    id: "1".into(),
                },
                Code::NotFound,
            ),
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (Error::Image(Status::not_found("image x")), Code::NotFound),
            (Error::DeadlineExceeded("x".into()), Code::DeadlineExceeded),
            (Error::Oci(missing), Code::FailedPrecondition),
            (Error::Oci(failed), Code::Internal),
            (Error::Cni(cni), Code::Internal),
            (
                Error::io("mount", "/p")(std::io::Error::other("x")),
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = error.to_status();
            assert_eq!(status.code(), code, "{error:?}");
            assert_eq!(status.message(), error.to_string());
        }
    }
}
