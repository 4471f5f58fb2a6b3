//! Stream processors turn a layer blob into a plain tar stream.
//!
//! Each processor accepts one media type and returns a reader of another; [`Chain`] picks
//! processors by media type and stacks them until a plain tar stream remains
//! (`tar+gzip+encrypted` → decrypt → `tar+gzip` → gunzip → `tar`). Configured external
//! processors ([`external`]) come first, then the built-in ones: ocicrypt decryption
//! ([`ocicrypt`]), gzip and zstd. Everything is a streaming [`Read`] adapter: no blob is
//! ever held whole in memory.
//!
//! A stage may discover a failure only at the end of its input (an HMAC that does not
//! match, a child process exiting non-zero). It then fails the read that would have
//! returned end of file, with an [`io::Error`] whose inner error is an [`Error`]
//! (see [`Error::from_io`]): a consumer must read the final stream to EOF before it
//! trusts what it got.
#![deny(missing_docs)]

pub mod external;
mod gzip;
mod media;
pub mod ocicrypt;
mod zstd;

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read};

pub use external::ExternalProcessor;
pub use media::MediaType;
pub use ocicrypt::Keyring;

/// The plain tar media type every chain ends with.
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Most stages one chain may stack.
pub const MAX_STAGES: usize = 8;

/// Errors of processors: building a chain, or found while streaming through it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No processor turns this media type into a tar stream.
    #[error("no processor for media type {0:?}")]
    Unsupported(String),
    /// A processor chain grew past [`MAX_STAGES`] or came back to a media type it had
    /// already produced.
    #[error("processor chain for {media_type:?} loops or exceeds {MAX_STAGES} stages: {path}")]
    ChainTooLong {
        /// The layer's media type.
        media_type: String,
        /// The media types seen, joined by " -> ".
        path: String,
    },
    /// Setting up a decoder failed.
    #[error("{processor}: {source}")]
    Setup {
        /// Processor that failed.
        processor: String,
        /// Cause.
        source: io::Error,
    },
    /// An external processor could not be started, failed or was killed.
    #[error("stream processor {name}: {reason}")]
    External {
        /// The processor's table key in the configuration.
        name: String,
        /// What happened, with the tail of its stderr.
        reason: String,
    },
    /// The configuration of processors is wrong.
    #[error("stream processor {name}: {reason}")]
    Config {
        /// The processor's table key.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An encrypted layer arrived and decryption is disabled.
    #[error("layer {digest} is encrypted ({media_type}) and image decryption is disabled")]
    DecryptionDisabled {
        /// Layer blob digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// None of the node's keys unwraps the layer key.
    #[error(
        "layer {digest}: no private key on this node decrypts it (wrapped for: {wrapped_for}){detail}"
    )]
    NoKey {
        /// Layer blob digest.
        digest: String,
        /// The schemes and key types the layer key was wrapped for, e.g.
        /// `jwe (RSA-OAEP, ECDH-ES+A256KW P-256), pkcs7`.
        wrapped_for: String,
        /// Per-scheme reasons, empty or starting with "; ".
        detail: String,
    },
    /// The encryption metadata (annotations, wrapped keys, options) is malformed.
    #[error("layer {digest}: invalid encryption metadata: {reason}")]
    InvalidEncryption {
        /// Layer blob digest.
        digest: String,
        /// What is wrong; never key material.
        reason: String,
    },
    /// The decrypted stream failed its integrity check (HMAC).
    #[error(
        "layer {digest}: ciphertext failed its integrity check (expected hmac {expected}, computed {actual})"
    )]
    Integrity {
        /// Layer blob digest.
        digest: String,
        /// The HMAC from the layer's public options, hex.
        expected: String,
        /// The HMAC of the ciphertext received, hex.
        actual: String,
    },
}

impl Error {
    /// Wraps the error into an [`io::Error`], as stages report failures from `read`.
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The processor error an [`io::Error`] from a stream carries, if any.
    pub fn from_io(error: &io::Error) -> Option<&Error> {
        error.get_ref().and_then(|inner| inner.downcast_ref())
    }
}

/// A boxed byte stream handed from one processor to the next.
pub type Stream<'a> = Box<dyn Read + Send + 'a>;

/// A boxed buffered byte stream: the blob a chain starts from. A decompressor reads straight
/// from its buffer, so the blob's bytes are not copied into a buffer of the decompressor's.
pub type Input<'a> = Box<dyn BufRead + Send + 'a>;

/// Buffer put in front of a decompressor whose input is another stage's output.
const BUFFER: usize = 256 * 1024;

/// The stream between two stages, buffered when it came so.
enum Link<'a> {
    Buffered(Input<'a>),
    Plain(Stream<'a>),
}

impl<'a> Link<'a> {
    fn buffered(self) -> Input<'a> {
        match self {
            Link::Buffered(input) => input,
            Link::Plain(stream) => Box::new(BufReader::with_capacity(BUFFER, stream)),
        }
    }

    fn into_stream(self) -> Stream<'a> {
        match self {
            Link::Buffered(input) => input,
            Link::Plain(stream) => stream,
        }
    }
}

/// The layer descriptor as processors see it.
#[derive(Debug, Clone, Copy)]
pub struct Layer<'a> {
    /// Media type of the blob.
    pub media_type: &'a str,
    /// Digest of the blob, `sha256:<hex>`.
    pub digest: &'a str,
    /// Size of the blob.
    pub size: u64,
    /// The descriptor's annotations (the ocicrypt keys and options live here).
    pub annotations: &'a BTreeMap<String, String>,
}

/// How encrypted layers are handled.
#[derive(Debug, Clone, Default)]
pub enum Decryption {
    /// Encrypted layers fail with [`Error::DecryptionDisabled`]; external processors get
    /// no payload.
    #[default]
    Disabled,
    /// The node key model: keys from a directory on the node, and the ocicrypt payload
    /// handed to external decoders the way containerd's CRI plugin does.
    Node(Keyring),
}

/// The processors available to a pull, chosen by media type.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    external: Vec<ExternalProcessor>,
    decryption: Decryption,
}

impl Chain {
    /// The built-in processors only, with decryption disabled.
    pub fn builtin() -> Self {
        Self::default()
    }

    /// Configured external processors (they take precedence over the built-in ones for the
    /// media types they accept) and the decryption setting. When several processors accept
    /// the same media type, the one whose name sorts first is used.
    pub fn new(
        mut external: Vec<ExternalProcessor>,
        decryption: Decryption,
    ) -> Result<Self, Error> {
        external::validate(&external)?;
        external.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            external,
            decryption,
        })
    }

    /// Whether some processor chain turns `media_type` into tar, without looking at data.
    pub fn accepts(&self, media_type: &str) -> bool {
        let mut current = media_type.to_string();
        for _ in 0..MAX_STAGES {
            if current == TAR {
                return true;
            }
            current = match self.step(&current) {
                Some(next) => next,
                None => return false,
            };
        }
        false
    }

    /// Wraps `input`, the blob of `layer`, into a reader of the plain tar stream.
    pub fn open<'a>(&self, layer: &Layer<'_>, input: Input<'a>) -> Result<Stream<'a>, Error> {
        let mut current = layer.media_type.to_string();
        let mut seen = vec![current.clone()];
        let mut stream = Link::Buffered(input);
        while current != TAR {
            if seen.len() > MAX_STAGES {
                return Err(Error::ChainTooLong {
                    media_type: layer.media_type.to_string(),
                    path: seen.join(" -> "),
                });
            }
            let next;
            (stream, next) = self.stage(layer, &current, stream)?;
            if seen.contains(&next) {
                seen.push(next);
                return Err(Error::ChainTooLong {
                    media_type: layer.media_type.to_string(),
                    path: seen.join(" -> "),
                });
            }
            seen.push(next.clone());
            current = next;
        }
        Ok(stream.into_stream())
    }

    /// Checks that an encrypted layer's key can be unwrapped with the node's keys, without
    /// reading its blob: a layer already unpacked must not be usable by a node that lost
    /// its key. Plain layers pass.
    pub fn check_access(&self, layer: &Layer<'_>) -> Result<(), Error> {
        if !ocicrypt::is_encrypted(layer.media_type) {
            return Ok(());
        }
        match &self.decryption {
            Decryption::Node(keys) if self.external_for(layer.media_type).is_none() => {
                ocicrypt::check(keys, layer)
            }
            Decryption::Node(_) => Ok(()),
            Decryption::Disabled => Err(Error::DecryptionDisabled {
                digest: layer.digest.to_string(),
                media_type: layer.media_type.to_string(),
            }),
        }
    }

    /// Reads an encrypted blob through decryption alone and reports an integrity failure (or
    /// a key that cannot be unwrapped). A later stage may fail on tampered plaintext before
    /// the check at the end of the blob ran; this tells tampering from a bad blob. Blobs
    /// that are not encrypted, or that an external processor decrypts, pass.
    pub fn verify_ciphertext(&self, layer: &Layer<'_>, blob: Stream<'_>) -> Result<(), Error> {
        let Decryption::Node(keys) = &self.decryption else {
            return Ok(());
        };
        if !ocicrypt::is_encrypted(layer.media_type)
            || self.external_for(layer.media_type).is_some()
        {
            return Ok(());
        }
        let mut plain = ocicrypt::decrypt(keys, layer, blob)?;
        match io::copy(&mut plain, &mut io::sink()) {
            Ok(_) => Ok(()),
            Err(e) => match e.into_inner().map(|inner| inner.downcast::<Error>()) {
                Some(Ok(error)) => Err(*error),
                _ => Ok(()),
            },
        }
    }

    fn external_for(&self, media_type: &str) -> Option<&ExternalProcessor> {
        self.external
            .iter()
            .find(|p| p.accepts.iter().any(|a| a == media_type))
    }

    /// The media type the stage for `media_type` returns, if there is one.
    fn step(&self, media_type: &str) -> Option<String> {
        if let Some(processor) = self.external_for(media_type) {
            return Some(processor.returns.clone());
        }
        if ocicrypt::is_encrypted(media_type) {
            return Some(ocicrypt::plain_media_type(media_type).to_string());
        }
        MediaType::parse(media_type).ok().map(|_| TAR.to_string())
    }

    fn stage<'a>(
        &self,
        layer: &Layer<'_>,
        media_type: &str,
        input: Link<'a>,
    ) -> Result<(Link<'a>, String), Error> {
        if let Some(processor) = self.external_for(media_type) {
            let payload = match &self.decryption {
                Decryption::Node(_) => external::payload_for(&processor.name, layer),
                Decryption::Disabled => None,
            };
            let stream = processor.spawn(media_type, payload, input.into_stream())?;
            return Ok((Link::Plain(stream), processor.returns.clone()));
        }
        if ocicrypt::is_encrypted(media_type) {
            let Decryption::Node(keys) = &self.decryption else {
                return Err(Error::DecryptionDisabled {
                    digest: layer.digest.to_string(),
                    media_type: media_type.to_string(),
                });
            };
            let stream = ocicrypt::decrypt(keys, layer, input.into_stream())?;
            let plain = ocicrypt::plain_media_type(media_type).to_string();
            return Ok((Link::Plain(stream), plain));
        }
        let stream = match MediaType::parse(media_type)? {
            MediaType::Tar => input,
            MediaType::TarGzip => Link::Plain(gzip::decoder(input.buffered())),
            MediaType::TarZstd => Link::Plain(zstd::decoder(input.buffered())?),
        };
        Ok((stream, TAR.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    fn tar_bytes() -> Vec<u8> {
        let mut data = b"hello layer".repeat(1000);
        data.resize(1024 * 20, 0);
        data
    }

    /// A layer descriptor without annotations.
    fn layer<'a>(
        media_type: &'a str,
        digest: &'a str,
        none: &'a BTreeMap<String, String>,
    ) -> Layer<'a> {
        Layer {
            media_type,
            digest,
            size: 0,
            annotations: none,
        }
    }

    fn read_all(chain: &Chain, media_type: &str, blob: Vec<u8>) -> Vec<u8> {
        let annotations = BTreeMap::new();
        let layer = layer(media_type, "sha256:00", &annotations);
        let mut out = Vec::new();
        chain
            .open(&layer, Box::new(io::Cursor::new(blob)))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// `plain` gzipped and zstd-compressed.
    fn compressed(plain: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(plain).unwrap();
        (gz.finish().unwrap(), ::zstd::encode_all(plain, 3).unwrap())
    }

    #[test]
    fn every_builtin_chain_yields_the_same_tar() {
        let plain = tar_bytes();
        let (gz, zst) = compressed(&plain);
        let chain = Chain::builtin();
        for (media, blob) in [
            (TAR, plain.clone()),
            ("application/vnd.oci.image.layer.v1.tar+gzip", gz.clone()),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", gz),
            ("application/vnd.oci.image.layer.v1.tar+zstd", zst),
        ] {
            assert_eq!(read_all(&chain, media, blob), plain, "{media}");
        }
    }

    /// A blob that can only be taken from its buffer, `step` bytes at a time at most; counts
    /// what was consumed.
    struct BufferOnly {
        blob: Vec<u8>,
        step: usize,
        consumed: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Read for BufferOnly {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            panic!("a decompressor copied the blob out of its buffer");
        }
    }

    impl BufRead for BufferOnly {
        fn fill_buf(&mut self) -> io::Result<&[u8]> {
            let at = self.consumed.load(std::sync::atomic::Ordering::Relaxed);
            Ok(&self.blob[at..self.blob.len().min(at + self.step)])
        }

        fn consume(&mut self, amount: usize) {
            self.consumed
                .fetch_add(amount, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The decompressors read from the blob's own buffer, however little it holds at a time
    /// (the end of a chunk, a short read from the registry), and consume all of it.
    #[test]
    fn decompressors_take_the_blob_from_its_buffer_a_few_bytes_at_a_time() {
        let plain = tar_bytes();
        let (gz, zst) = compressed(&plain);
        let annotations = BTreeMap::new();
        for step in [1, 3, 1000] {
            for (media, blob) in [
                ("application/vnd.oci.image.layer.v1.tar+gzip", &gz),
                ("application/vnd.oci.image.layer.v1.tar+zstd", &zst),
            ] {
                let consumed = Arc::default();
                let input = BufferOnly {
                    blob: blob.clone(),
                    step,
                    consumed: Arc::clone(&consumed),
                };
                let mut out = Vec::new();
                Chain::builtin()
                    .open(&layer(media, "sha256:00", &annotations), Box::new(input))
                    .unwrap()
                    .read_to_end(&mut out)
                    .unwrap();
                assert!(out == plain, "{media} in steps of {step} bytes");
                let consumed = consumed.load(std::sync::atomic::Ordering::Relaxed);
                assert_eq!(consumed, blob.len(), "{media} in steps of {step} bytes");
            }
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
        let annotations = BTreeMap::new();
        let layer = layer("application/x-rar", "sha256:00", &annotations);
        let err = Chain::builtin()
            .open(&layer, Box::new(io::empty()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("application/x-rar"), "{err}");
        assert!(!Chain::builtin().accepts("application/x-rar"));
        assert!(Chain::builtin().accepts("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"));
    }

    #[test]
    fn encrypted_layers_fail_clearly_when_decryption_is_disabled() {
        let annotations = BTreeMap::new();
        let layer = layer(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "sha256:ab",
            &annotations,
        );
        let err = Chain::builtin()
            .open(&layer, Box::new(io::empty()))
            .err()
            .unwrap();
        assert!(matches!(err, Error::DecryptionDisabled { .. }), "{err}");
        assert!(err.to_string().contains("sha256:ab"), "{err}");
    }
}
