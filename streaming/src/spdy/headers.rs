//! SPDY/3 header blocks (§2.6.10): a count, then length-prefixed names and values,
//! compressed with zlib primed by the SPDY/3 dictionary. Each direction of a connection
//! keeps one zlib context for all its blocks, flushed with a sync flush after each block,
//! so an [`Inflater`] and a [`Deflater`] live as long as the session.

use bytes::{Buf as _, BufMut as _, Bytes};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The dictionary of §2.6.10.1, byte for byte.
const DICTIONARY: &[u8; 1423] = include_bytes!("dictionary.bin");

/// The most a header block may inflate to; streams carry a handful of short headers, so
/// more is a zlib bomb.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;

/// A stream's headers, names lowercase as SPDY/3 requires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

/// Why a header block could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// zlib refused the bytes.
    #[error("header block does not inflate: {0}")]
    Inflate(String),
    /// Inflated above [`MAX_HEADER_BLOCK`].
    #[error("header block inflates above {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    /// The inflated bytes are not a count of names and values.
    #[error("header block is malformed")]
    Malformed,
}

impl Headers {
    /// Headers from `(name, value)` pairs.
    pub fn new<N: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (N, V)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(n, v)| (n.into().to_ascii_lowercase(), v.into()))
                .collect(),
        )
    }

    /// The value of `name`, compared without case; the first of NUL-joined values.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or_default())
    }

    fn to_block(&self) -> Vec<u8> {
        let mut block = Vec::new();
        block.put_u32(self.0.len() as u32);
        for (name, value) in &self.0 {
            block.put_u32(name.len() as u32);
            block.put_slice(name.as_bytes());
            block.put_u32(value.len() as u32);
            block.put_slice(value.as_bytes());
        }
        block
    }

    fn from_block(mut block: &[u8]) -> Result<Self, HeaderError> {
        let take = |block: &mut &[u8]| -> Result<String, HeaderError> {
            if block.remaining() < 4 {
                return Err(HeaderError::Malformed);
            }
            let len = block.get_u32() as usize;
            if block.remaining() < len {
                return Err(HeaderError::Malformed);
            }
            let text = std::str::from_utf8(&block[..len]).map_err(|_| HeaderError::Malformed)?;
            let text = text.to_string();
            block.advance(len);
            Ok(text)
        };
        if block.remaining() < 4 {
            return Err(HeaderError::Malformed);
        }
        let count = block.get_u32() as usize;
        // Each pair takes at least 8 bytes, which bounds a lying count.
        if count > block.remaining() / 8 {
            return Err(HeaderError::Malformed);
        }
        let mut pairs = Vec::with_capacity(count);
        for _ in 0..count {
            let name = take(&mut block)?;
            let value = take(&mut block)?;
            pairs.push((name, value));
        }
        if block.has_remaining() {
            return Err(HeaderError::Malformed);
        }
        Ok(Self(pairs))
    }
}

/// The receiving direction's zlib context.
pub struct Inflater(Decompress);

impl Default for Inflater {
    fn default() -> Self {
        Self(Decompress::new(true))
    }
}

impl Inflater {
    /// Inflates one header block and reads its headers.
    pub fn headers(&mut self, compressed: &[u8]) -> Result<Headers, HeaderError> {
        let mut out = Vec::with_capacity(1024);
        let mut input = compressed;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(HeaderError::TooLarge);
                }
                out.reserve(out.len().min(MAX_HEADER_BLOCK - out.len()));
            }
            let before = self.0.total_in();
            let result = self
                .0
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            input = &input[(self.0.total_in() - before) as usize..];
            match result {
                Ok(Status::StreamEnd) => break,
                Ok(_) if input.is_empty() && out.len() < out.capacity() => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| HeaderError::Inflate(e.to_string()))?;
                }
                Err(e) => return Err(HeaderError::Inflate(e.to_string())),
            }
        }
        Headers::from_block(&out)
    }
}

/// The sending direction's zlib context.
pub struct Deflater(Compress);

impl Default for Deflater {
    fn default() -> Self {
        let mut compress = Compress::new(Compression::default(), true);
        compress
            .set_dictionary(DICTIONARY)
            .expect("a fresh zlib stream takes a dictionary");
        Self(compress)
    }
}

impl Deflater {
    /// `headers` as a compressed block, flushed so the peer can read it whole.
    pub fn block(&mut self, headers: &Headers) -> Bytes {
        let plain = headers.to_block();
        let mut out = Vec::with_capacity(plain.len() + 64);
        let mut input = &plain[..];
        loop {
            let before = self.0.total_in();
            self.0
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("deflate of an in-memory block cannot fail");
            input = &input[(self.0.total_in() - before) as usize..];
            // Done once all input is taken and the flush left room to spare.
            if input.is_empty() && out.len() < out.capacity() {
                return Bytes::from(out);
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_through_one_context_per_direction() {
        let (mut deflate, mut inflate) = (Deflater::default(), Inflater::default());
        for headers in [
            Headers::new([("streamtype", "error")]),
            Headers::new([("StreamType", "data"), ("port", "80"), ("requestID", "0")]),
            Headers::default(),
            Headers::new([("x", "a\0b".to_string()), ("y", "v".repeat(5000))]),
        ] {
            let block = deflate.block(&headers);
            assert_eq!(inflate.headers(&block), Ok(headers));
        }
    }

    #[test]
    fn names_compare_without_case_and_take_the_first_value() {
        let headers = Headers::new([("StreamType", "stdout"), ("multi", "a\0b")]);
        assert_eq!(headers.get("streamtype"), Some("stdout"));
        assert_eq!(headers.get("STREAMTYPE"), Some("stdout"));
        assert_eq!(headers.get("multi"), Some("a"));
        assert_eq!(headers.get("port"), None);
    }

    #[test]
    fn a_block_that_inflates_too_far_is_refused() {
        let mut deflate = Deflater::default();
        let block = deflate.block(&Headers::new([("x", "0".repeat(200_000))]));
        assert!(block.len() < 2000, "zeros compress");
        assert_eq!(
            Inflater::default().headers(&block),
            Err(HeaderError::TooLarge)
        );
    }

    #[test]
    fn garbage_and_lying_counts_are_refused() {
        assert!(matches!(
            Inflater::default().headers(b"not zlib at all"),
            Err(HeaderError::Inflate(_))
        ));
        assert_eq!(
            Headers::from_block(b"\xff\xff\xff\xff"),
            Err(HeaderError::Malformed)
        );
        assert_eq!(
            Headers::from_block(b"\x00\x00\x00\x01\x00\x00\x00\x09ab\x00\x00\x00\x00"),
            Err(HeaderError::Malformed)
        );
        assert_eq!(
            Headers::from_block(b"\x00\x00\x00\x00extra"),
            Err(HeaderError::Malformed)
        );
    }
}
