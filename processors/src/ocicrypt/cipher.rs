//! The layer cipher `AES_256_CTR_HMAC_SHA256`, decrypting as the blob streams through.

use std::io::{self, Read};

use aes::cipher::{KeyIvInit, StreamCipher};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::options::LayerKey;
use crate::{Error, Stream};

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// Decrypts its input; the HMAC of the ciphertext is checked when the input ends.
pub(crate) struct Decryptor<'a> {
    input: Stream<'a>,
    cipher: Aes256Ctr,
    mac: Hmac<Sha256>,
    expected: [u8; 32],
    /// Digest of the plaintext, compared with the advisory `digest` option at the end.
    plain: Sha256,
    claimed: String,
    layer: String,
    state: State,
}

enum State {
    Reading,
    Verified,
    /// The computed HMAC, in hex, of a ciphertext that did not match.
    Failed(String),
}

impl<'a> Decryptor<'a> {
    pub(crate) fn new(key: &LayerKey, layer: &str, input: Stream<'a>) -> Self {
        Self {
            input,
            cipher: Aes256Ctr::new(&key.symkey.into(), &key.nonce.into()),
            mac: <Hmac<Sha256> as KeyInit>::new_from_slice(&key.symkey)
                .expect("HMAC takes keys of any length"),
            expected: key.hmac,
            plain: Sha256::new(),
            claimed: key.digest.clone(),
            layer: layer.to_string(),
            state: State::Reading,
        }
    }

    fn integrity_error(&self, actual: &str) -> io::Error {
        Error::Integrity {
            digest: self.layer.clone(),
            expected: hex::encode(self.expected),
            actual: actual.to_string(),
        }
        .into_io()
    }

    /// Checks the HMAC once the ciphertext has ended.
    fn finish(&mut self) -> io::Result<usize> {
        let actual = self.mac.clone().finalize().into_bytes();
        if !bool::from(actual.as_slice().ct_eq(&self.expected)) {
            let actual = hex::encode(actual);
            self.state = State::Failed(actual.clone());
            return Err(self.integrity_error(&actual));
        }
        self.state = State::Verified;
        let plain = format!("sha256:{}", hex::encode(self.plain.clone().finalize()));
        if plain != self.claimed {
            tracing::debug!(
                layer = %self.layer,
                claimed = %self.claimed,
                decrypted = %plain,
                "the encryptor's digest option differs from the decrypted blob (advisory only)"
            );
        }
        Ok(0)
    }
}

impl Read for Decryptor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.state {
            State::Verified => return Ok(0),
            State::Failed(actual) => return Err(self.integrity_error(actual)),
            State::Reading if buf.is_empty() => return Ok(0),
            State::Reading => {}
        }
        let n = self.input.read(buf)?;
        if n == 0 {
            return self.finish();
        }
        let chunk = &mut buf[..n];
        self.mac.update(chunk);
        self.cipher.apply_keystream(chunk);
        self.plain.update(&*chunk);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [3; 32];
    const NONCE: [u8; 16] = [0xff; 16];

    /// Encrypts like ocicrypt: CTR from the nonce block, then HMAC over the ciphertext.
    fn encrypt(plain: &[u8]) -> (Vec<u8>, [u8; 32]) {
        let mut data = plain.to_vec();
        Aes256Ctr::new(&KEY.into(), &NONCE.into()).apply_keystream(&mut data);
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&KEY).unwrap();
        mac.update(&data);
        (data, mac.finalize().into_bytes().into())
    }

    fn decryptor(data: Vec<u8>, hmac: [u8; 32]) -> Decryptor<'static> {
        let plain_digest = "sha256:unrelated".to_string();
        let key = LayerKey {
            symkey: KEY,
            nonce: NONCE,
            hmac,
            digest: plain_digest,
        };
        Decryptor::new(&key, "sha256:layer", Box::new(io::Cursor::new(data)))
    }

    /// Reads in small pieces, as a tar reader would.
    fn read_small(reader: &mut impl Read) -> (Vec<u8>, io::Result<()>) {
        let mut out = Vec::new();
        let mut buf = [0; 7];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return (out, Ok(())),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Err(e)),
            }
        }
    }

    fn integrity(error: &io::Error) -> (&str, &str) {
        match Error::from_io(error) {
            Some(Error::Integrity {
                digest,
                expected,
                actual,
            }) => {
                assert_eq!(digest, "sha256:layer");
                (expected, actual)
            }
            other => panic!("not an integrity error: {other:?} ({error})"),
        }
    }

    #[test]
    fn counter_runs_over_the_whole_block_and_the_mac_passes() {
        // The all-ones nonce makes the 128-bit counter wrap after the first block.
        let plain: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let (data, hmac) = encrypt(&plain);
        let (out, result) = read_small(&mut decryptor(data, hmac));
        result.unwrap();
        assert_eq!(out, plain);
    }

    #[test]
    fn tampered_ciphertext_fails_at_the_end_and_stays_failed() {
        let (mut data, hmac) = encrypt(&[5; 300]);
        data[100] ^= 0x80;
        let mut reader = decryptor(data, hmac);
        let (out, result) = read_small(&mut reader);
        assert_eq!(out.len(), 300);
        let error = result.unwrap_err();
        let (expected, actual) = integrity(&error);
        assert_eq!(expected, hex::encode(hmac));
        assert_ne!(actual, expected);
        let again = reader.read(&mut [0; 8]).unwrap_err();
        assert_eq!(integrity(&again), (expected, actual));
    }

    #[test]
    fn truncated_ciphertext_fails() {
        let (data, hmac) = encrypt(&[5; 300]);
        let (_, result) = read_small(&mut decryptor(data[..299].to_vec(), hmac));
        integrity(&result.unwrap_err());
        let (_, result) = read_small(&mut decryptor(Vec::new(), hmac));
        integrity(&result.unwrap_err());
    }

    #[test]
    fn input_errors_pass_through_unchanged() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer left"))
            }
        }
        let key = LayerKey {
            symkey: KEY,
            nonce: NONCE,
            hmac: [0; 32],
            digest: String::new(),
        };
        let mut reader = Decryptor::new(&key, "sha256:layer", Box::new(Broken));
        let error = reader.read(&mut [0; 4]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        assert!(Error::from_io(&error).is_none());
    }
}
