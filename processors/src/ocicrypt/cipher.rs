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
