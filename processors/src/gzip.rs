//! gzip decompression with ISA-L's igzip (the system's libisal), which inflates with about
//! 15% less CPU than zlib-rs on layers of binaries: on a node whose registry is close,
//! inflating is the largest part of a cold pull's CPU time.
//!
//! The reader is written here over the raw `isal-sys` bindings because the `isal-rs` reader
//! takes two inflate calls in a member that produce no output for corrupt input, and short
//! reads (a chunk ending a few bytes into a Huffman code) do that to valid streams. Each
//! member's header is read with a header state of our own, kept across calls: the one
//! `isal_inflate` makes for itself lives for one call, so a header with a name, comment or
//! extra field split by a short read would lose its flags.

use crate::{Input, Stream};
use isal_sys::igzip_lib as isal;
use std::io::{self, BufRead, Read};

/// Wraps a gzip stream; concatenated members are read as one stream, like `gzip -d`.
pub(crate) fn decoder<'a>(input: Input<'a>) -> Stream<'a> {
    Box::new(Gunzip::new(input))
}

/// A streaming gunzip over a buffered reader: each member's header is parsed and its CRC32
/// and size are checked against its trailer.
struct Gunzip<R> {
    input: R,
    state: State,
    /// Compressed bytes consumed, for naming where the stream went wrong.
    consumed: u64,
}

/// The inflate state (about 100 KiB of history and lookup tables, so on the heap) and the
/// state of the member header being read.
struct State {
    inflate: Box<isal::inflate_state>,
    header: Box<isal::isal_gzip_header>,
}

// SAFETY: the inflate state's only pointers are next_in and next_out, which point into
// buffers borrowed for one call and are null between calls; the header's buffer pointers are
// always null (its fields are skipped, not kept). Nothing ties either to a thread.
unsafe impl Send for State {}

impl<R: BufRead> Gunzip<R> {
    fn new(input: R) -> Self {
        let mut inflate = Box::<isal::inflate_state>::new_uninit();
        let mut header = Box::<isal::isal_gzip_header>::new_uninit();
        // SAFETY: both structs hold integers, arrays and pointers only, for which zero bytes
        // are valid values, so zeroing initialises them; the init functions then set what
        // they need.
        let (mut inflate, header) = unsafe {
            inflate.as_mut_ptr().write_bytes(0, 1);
            header.as_mut_ptr().write_bytes(0, 1);
            isal::isal_inflate_init(inflate.as_mut_ptr());
            isal::isal_gzip_header_init(header.as_mut_ptr());
            (inflate.assume_init(), header.assume_init())
        };
        inflate.crc_flag = isal::ISAL_GZIP;
        Self {
            input,
            state: State { inflate, header },
            consumed: 0,
        }
    }

    fn member_finished(&self) -> bool {
        self.state.inflate.block_state == isal::isal_block_state_ISAL_BLOCK_FINISH
    }

    /// Inflates from the buffered input into `out`; returns (input consumed, output produced).
    fn step(&mut self, out: &mut [u8]) -> io::Result<(usize, usize)> {
        let input = self.input.fill_buf()?;
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(out.len()).unwrap_or(u32::MAX);
        let state = &mut *self.state.inflate;
        state.next_in = input.as_ptr().cast_mut();
        state.avail_in = avail_in;
        state.next_out = out.as_mut_ptr();
        state.avail_out = avail_out;
        // The header is read until done (wrapper_flag set), then the member is inflated.
        let in_header = state.wrapper_flag == 0;
        // SAFETY: next_in/avail_in describe the reader's buffer and next_out/avail_out `out`,
        // both live for this call; ISA-L reads only the former and writes only the latter.
        // The pointers are cleared before the buffers can go away.
        let code = unsafe {
            if in_header {
                isal::isal_read_gzip_header(state, &mut *self.state.header)
            } else {
                isal::isal_inflate(state)
            }
        };
        let consumed = (avail_in - state.avail_in) as usize;
        let produced = (avail_out - state.avail_out) as usize;
        state.next_in = std::ptr::null_mut();
        state.next_out = std::ptr::null_mut();
        self.input.consume(consumed);
        self.consumed += consumed as u64;
        // A header cut short asks for more input (ISAL_END_INPUT); errors are negative.
        if code < 0 || (!in_header && code != isal::ISAL_DECOMP_OK as i32) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "gzip: {} (near compressed byte {})",
                    describe(code),
                    self.consumed
                ),
            ));
        }
        Ok((consumed, produced))
    }

    /// Starts the next member after one that finished.
    fn reset(&mut self) {
        // SAFETY: both were initialised in `new` and are live.
        unsafe {
            isal::isal_inflate_reset(&mut *self.state.inflate);
            isal::isal_gzip_header_init(&mut *self.state.header);
        }
        self.state.inflate.crc_flag = isal::ISAL_GZIP;
    }
}

impl<R: BufRead> Read for Gunzip<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let at_end = self.input.fill_buf()?.is_empty();
            if self.member_finished() {
                if at_end {
                    return Ok(0);
                }
                self.reset();
            }
            if at_end {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "gzip: stream ends inside a member, after {} compressed bytes",
                        self.consumed
                    ),
                ));
            }
            let (consumed, produced) = self.step(out)?;
            if produced > 0 {
                return Ok(produced);
            }
            // With input and room for output, ISA-L always takes some input; a call that
            // takes none would repeat forever.
            if consumed == 0 && !self.member_finished() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("gzip: inflate stopped at compressed byte {}", self.consumed),
                ));
            }
        }
    }
}

/// What an `isal_inflate` error code means.
fn describe(code: i32) -> std::borrow::Cow<'static, str> {
    match code {
        isal::ISAL_INVALID_BLOCK => "invalid deflate block".into(),
        isal::ISAL_INVALID_SYMBOL => "invalid deflate symbol".into(),
        isal::ISAL_INVALID_LOOKBACK => "invalid back-reference distance".into(),
        isal::ISAL_INVALID_WRAPPER => "not a gzip member (bad header)".into(),
        isal::ISAL_UNSUPPORTED_METHOD => "unsupported compression method".into(),
        isal::ISAL_INCORRECT_CHECKSUM => {
            "the member's CRC32 or length does not match its trailer".into()
        }
        other => format!("inflate failed with code {other}").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Write};

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    /// Text with repeats and noise, so it compresses into dynamic Huffman blocks.
    fn sample(len: usize) -> Vec<u8> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if i % 7 == 0 {
                    (state % 251) as u8
                } else {
                    b"layer tar "[i % 10]
                }
            })
            .collect()
    }

    fn gunzip(input: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Gunzip::new(BufReader::with_capacity(crate::BUFFER, input)).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Hands out at most `step` bytes per read, as a chunk boundary does.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn inflates_what_zlib_compressed_whatever_the_read_sizes() {
        let data = sample(3 << 20);
        let compressed = gzip(&data);
        assert_eq!(gunzip(compressed.as_slice()).unwrap(), data);
        for step in [1, 3, 4096] {
            let small = &compressed[..compressed.len().min(200_000)];
            let partial = gunzip(Dribble(small, step));
            let error = partial.expect_err("a cut stream fails");
            assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
        }
        let whole = {
            let mut out = Vec::new();
            let reader = BufReader::with_capacity(5, Dribble(&compressed, 5));
            Gunzip::new(reader).read_to_end(&mut out).unwrap();
            out
        };
        assert_eq!(whole, data);
    }

    #[test]
    fn members_are_read_one_after_another() {
        let (first, second) = (sample(100_000), b"second member\n".to_vec());
        let mut both = gzip(&first);
        both.extend(gzip(b""));
        both.extend(gzip(&second));
        assert_eq!(gunzip(both.as_slice()).unwrap(), [first, second].concat());
    }

    #[test]
    fn header_fields_are_skipped_however_the_header_is_split() {
        let mut encoder = flate2::GzBuilder::new()
            .filename("layer.tar")
            .comment("a comment")
            .extra(vec![1, 2, 3, 4])
            .write(Vec::new(), flate2::Compression::fast());
        encoder.write_all(b"payload").unwrap();
        let named = encoder.finish().unwrap();
        // The same member with a header CRC (FHCRC) instead: flags, time, xfl, os, crc16.
        let plain = gzip(b"payload");
        let mut header = vec![0x1f, 0x8b, 8, 0x02, 0, 0, 0, 0, 0, 3];
        let mut crc = flate2::Crc::new();
        crc.update(&header);
        header.extend_from_slice(&(crc.sum() as u16).to_le_bytes());
        let checked = [header.as_slice(), &plain[10..]].concat();
        for compressed in [named, checked] {
            assert_eq!(gunzip(compressed.as_slice()).unwrap(), b"payload");
            for step in [1, 2, 3, 7] {
                let reader = BufReader::with_capacity(step, Dribble(&compressed, step));
                let mut out = Vec::new();
                Gunzip::new(reader).read_to_end(&mut out).unwrap();
                assert_eq!(out, b"payload", "reads of {step} bytes");
            }
        }
    }

    #[test]
    fn damage_is_an_error_naming_it() {
        let compressed = gzip(&sample(50_000));
        let trailer = compressed.len() - 8;
        for (at, what) in [(trailer, "CRC32"), (trailer + 4, "length")] {
            let mut bad = compressed.clone();
            bad[at] ^= 1;
            let error = gunzip(bad.as_slice()).expect_err(what);
            assert_eq!(error.kind(), io::ErrorKind::InvalidData);
            assert!(
                error.to_string().contains("does not match its trailer"),
                "{error}"
            );
        }
        let mut bad_header = compressed.clone();
        bad_header[0] = 0;
        let error = gunzip(bad_header.as_slice()).expect_err("bad magic");
        assert!(error.to_string().contains("not a gzip member"), "{error}");
        let mut trailing = compressed.clone();
        trailing.extend_from_slice(b"garbage after the member");
        let error = gunzip(trailing.as_slice()).expect_err("trailing garbage");
        assert!(error.to_string().contains("not a gzip member"), "{error}");
        let error = gunzip(&b""[..]).expect_err("empty");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
