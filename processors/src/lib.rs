//! Stream processors turn a layer blob into a plain tar stream.
//!
//! Each processor accepts one media type and returns a reader of another; [`Chain`] picks
//! processors by media type and stacks them until a plain tar stream remains. Everything is
//! a streaming [`Read`] adapter: no blob is ever held whole in memory.
#![deny(missing_docs)]

mod gzip;
mod media;
mod zstd;

use std::io::Read;

pub use media::MediaType;

/// Errors from building a processor chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No processor turns this media type into a tar stream.
    #[error("unsupported layer media type {0:?}")]
    Unsupported(String),
    /// Setting up a decoder failed.
    #[error("{processor}: {source}")]
    Setup {
        /// Processor that failed.
        processor: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// A boxed byte stream handed from one processor to the next.
pub type Stream<'a> = Box<dyn Read + Send + 'a>;

/// The processors available to a pull, chosen by media type.
#[derive(Debug, Default, Clone)]
pub struct Chain {}

impl Chain {
    /// The built-in processors: gzip and zstd decompression.
    pub fn builtin() -> Self {
        Self {}
    }

    /// Wraps `input`, a blob of `media_type`, into a reader of the plain tar stream.
    pub fn open<'a>(&self, media_type: &str, input: Stream<'a>) -> Result<Stream<'a>, Error> {
        let mut kind = MediaType::parse(media_type)?;
        let mut stream = input;
        loop {
            match kind {
                MediaType::Tar => return Ok(stream),
                MediaType::TarGzip => {
                    stream = gzip::decoder(stream);
                    kind = MediaType::Tar;
                }
                MediaType::TarZstd => {
                    stream = zstd::decoder(stream)?;
                    kind = MediaType::Tar;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_bytes() -> Vec<u8> {
        let mut data = b"hello layer".repeat(1000);
        data.resize(1024 * 20, 0);
        data
    }

    fn read_all(chain: &Chain, media: &str, blob: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        chain
            .open(media, Box::new(std::io::Cursor::new(blob)))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn every_builtin_chain_yields_the_same_tar() {
        let plain = tar_bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = ::zstd::encode_all(&plain[..], 3).unwrap();
        let chain = Chain::builtin();
        for (media, blob) in [
            ("application/vnd.oci.image.layer.v1.tar", plain.clone()),
            ("application/vnd.oci.image.layer.v1.tar+gzip", gz.clone()),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", gz),
            ("application/vnd.oci.image.layer.v1.tar+zstd", zst),
        ] {
            assert_eq!(read_all(&chain, media, blob), plain, "{media}");
        }
    }

    #[test]
    fn concatenated_gzip_members_are_read_whole() {
        let mut blob = Vec::new();
        for part in [&b"first "[..], &b"second"[..]] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(part).unwrap();
            blob.extend(gz.finish().unwrap());
        }
        let out = read_all(
            &Chain::builtin(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
            blob,
        );
        assert_eq!(out, b"first second");
    }

    #[test]
    fn unknown_media_type_is_refused_by_name() {
        let err = Chain::builtin()
            .open("application/x-rar", Box::new(std::io::empty()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("application/x-rar"), "{err}");
    }
}
