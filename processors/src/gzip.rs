//! gzip decompression (flate2 on the zlib-rs backend).

use crate::Stream;
use std::io::BufReader;

/// Input buffer size: large reads keep the inflater busy between refills.
const BUFFER: usize = 256 * 1024;

/// Wraps a gzip stream; concatenated members are read as one stream, like `gzip -d`.
pub(crate) fn decoder<'a>(input: Stream<'a>) -> Stream<'a> {
    Box::new(flate2::bufread::MultiGzDecoder::new(
        BufReader::with_capacity(BUFFER, input),
    ))
}
