//! zstd decompression.

use crate::{Error, Input, Stream};

/// Wraps a zstd stream (multiple frames are read as one stream).
pub(crate) fn decoder<'a>(input: Input<'a>) -> Result<Stream<'a>, Error> {
    let decoder =
        ::zstd::stream::read::Decoder::with_buffer(input).map_err(|source| Error::Setup {
            processor: "zstd".to_string(),
            source,
        })?;
    Ok(Box::new(decoder))
}
