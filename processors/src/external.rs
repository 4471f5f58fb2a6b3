//! External stream processors: binaries configured like containerd's `[stream_processors]`.
//!
//! The binary reads the blob on stdin and writes the next media type on stdout; its
//! environment is imaged's, then the configured `env`, then `STREAM_PROCESSOR_MEDIATYPE`
//! naming the type fed in. A payload, when there is one, is readable on fd 3.

mod child;
mod payload;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use rustix::pipe::{PipeFlags, pipe_with};

use crate::{Error, Stream};

pub(crate) use payload::payload_for;

/// The descriptor number the payload is readable on in the child.
const PAYLOAD_FD: RawFd = 3;

/// One `[stream_processors.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalProcessor {
    /// The table key (not part of the table itself).
    #[serde(skip)]
    pub name: String,
    /// Media types it reads, compared as exact strings.
    pub accepts: Vec<String>,
    /// Media type it writes.
    pub returns: String,
    /// The binary; a bare name is looked up in `PATH`.
    pub path: PathBuf,
    /// Arguments after the binary name.
    #[serde(default)]
    pub args: Vec<String>,
    /// `KEY=VALUE` entries added to imaged's environment.
    #[serde(default)]
    pub env: Vec<String>,
}

impl ExternalProcessor {
    /// Starts the binary on `input` (a blob of `media_type`); its stdout is the returned
    /// stream.
    pub(crate) fn spawn<'a>(
        &self,
        media_type: &str,
        payload: Option<Vec<u8>>,
        input: Stream<'a>,
    ) -> Result<Stream<'a>, Error> {
        let mut command = self.command(media_type);
        let payload_writer = match payload {
            Some(bytes) => Some(self.pass_payload(&mut command, bytes)?),
            None => None,
        };
        let process = command
            .spawn()
            .map_err(|e| self.failure(format!("cannot start {}: {e}", self.path.display())))?;
        // The child holds its own copy of the read end now; ours must go so the writer
        // sees a broken pipe once the child is gone.
        drop(command);
        if let Some(writer) = payload_writer {
            write_payload(writer);
        }
        let stream = child::ChildStream::new(self.name.clone(), process, input)
            .map_err(|e| self.failure(format!("cannot set up pipes: {e}")))?;
        Ok(Box::new(stream))
    }

    fn command(&self, media_type: &str) -> Command {
        let mut command = Command::new(&self.path);
        command
            .args(&self.args)
            .envs(self.env.iter().filter_map(|entry| entry.split_once('=')))
            .env("STREAM_PROCESSOR_MEDIATYPE", media_type)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Arranges for the read end of a new pipe to be fd 3 in the child; returns the write
    /// end with the bytes still to be written into it.
    fn pass_payload(
        &self,
        command: &mut Command,
        bytes: Vec<u8>,
    ) -> Result<(OwnedFd, Vec<u8>), Error> {
        let (reader, writer) = pipe_with(PipeFlags::CLOEXEC)
            .map_err(|e| self.failure(format!("cannot create the payload pipe: {e}")))?;
        // SAFETY: the closure runs in the forked child before exec and only calls dup2 and
        // fcntl, which are async-signal-safe; it owns `reader`, so the descriptor stays
        // open in the parent (and therefore in the child) until the command is dropped.
        unsafe {
            command.pre_exec(move || {
                let fd = reader.as_raw_fd();
                let result = if fd == PAYLOAD_FD {
                    // dup2 onto itself would keep close-on-exec set.
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, PAYLOAD_FD)
                };
                if result == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok((writer, bytes))
    }

    fn failure(&self, reason: String) -> Error {
        Error::External {
            name: self.name.clone(),
            reason,
        }
    }
}

/// Writes the payload from a thread: a child that reads fd 3 late (or never) must not
/// block the pull, and the write ends with a broken pipe once the child is gone.
fn write_payload((writer, bytes): (OwnedFd, Vec<u8>)) {
    std::thread::spawn(move || {
        let _ = File::from(writer).write_all(&bytes);
    });
}

/// Checks a configuration.
pub(crate) fn validate(processors: &[ExternalProcessor]) -> Result<(), Error> {
    processors.iter().try_for_each(validate_one)
}

fn validate_one(processor: &ExternalProcessor) -> Result<(), Error> {
    let invalid = |reason: String| Error::Config {
        name: processor.name.clone(),
        reason,
    };
    if processor.accepts.is_empty() {
        return Err(invalid("`accepts` is empty".to_string()));
    }
    if processor.returns.is_empty() {
        return Err(invalid("`returns` is empty".to_string()));
    }
    if processor.path.as_os_str().is_empty() {
        return Err(invalid("`path` is empty".to_string()));
    }
    if processor.accepts.contains(&processor.returns) {
        return Err(invalid(format!(
            "`returns` {:?} is also in `accepts`: the chain would never end",
            processor.returns
        )));
    }
    if let Some(entry) = processor.env.iter().find(|e| !e.contains('=')) {
        return Err(invalid(format!("`env` entry {entry:?} is not KEY=VALUE")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor() -> ExternalProcessor {
        ExternalProcessor {
            name: "unzstd".to_string(),
            accepts: vec!["application/vnd.oci.image.layer.v1.tar+zstd".to_string()],
            returns: crate::TAR.to_string(),
            path: PathBuf::from("zstd"),
            args: vec!["-d".to_string()],
            env: vec!["A=b=c".to_string()],
        }
    }

    fn config_error(change: impl FnOnce(&mut ExternalProcessor)) -> String {
        let mut p = processor();
        change(&mut p);
        match validate(&[p]) {
            Err(e @ Error::Config { .. }) => e.to_string(),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn a_complete_processor_is_valid() {
        validate(&[processor()]).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        type Change = fn(&mut ExternalProcessor);
        let cases: [(Change, &str); 5] = [
            (|p| p.accepts.clear(), "`accepts`"),
            (|p| p.returns.clear(), "`returns`"),
            (|p| p.path = PathBuf::new(), "`path`"),
            (|p| p.returns = p.accepts[0].clone(), "`returns`"),
            (|p| p.env.push("NOVALUE".to_string()), "`env`"),
        ];
        for (change, field) in cases {
            let message = config_error(change);
            assert!(message.contains("unzstd"), "{message}");
            assert!(message.contains(field), "{message}");
        }
    }
}
