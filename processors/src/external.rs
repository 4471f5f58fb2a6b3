//! External stream processors: binaries configured like containerd's `[stream_processors]`.

use std::path::PathBuf;

use crate::{Error, Layer, Stream};

/// One `[stream_processors.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
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
        let _ = (media_type, payload, input);
        todo!("external processors")
    }
}

/// Checks a configuration.
pub(crate) fn validate(processors: &[ExternalProcessor]) -> Result<(), Error> {
    let _ = processors;
    Ok(())
}

/// The fd 3 payload for the processor `name` and this layer, if containerd sends one.
pub(crate) fn payload_for(name: &str, layer: &Layer<'_>) -> Option<Vec<u8>> {
    let _ = (name, layer);
    None
}
