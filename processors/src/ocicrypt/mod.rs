//! ocicrypt layer decryption with keys kept on the node.
//!
//! A layer's symmetric key sits in its annotations, wrapped for one or more recipients
//! (JWE or PKCS#7); the keys directory must hold a private key (and for PKCS#7 its
//! certificate) that unwraps one of them. The blob itself is AES-256-CTR with an
//! HMAC-SHA256 over the ciphertext, verified when the stream ends.

mod cipher;
mod jwe;
mod keys;
mod options;
mod pkcs7;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crate::{Error, Layer, Stream};
use keys::{Fingerprint, Keys};
use options::LayerKey;

/// Private keys (and certificates, for PKCS#7) read from a directory.
#[derive(Clone, Default)]
pub struct Keyring {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    dir: PathBuf,
    /// The keys last read and the directory fingerprint they were read at.
    cache: Mutex<Option<(Fingerprint, Arc<Keys>)>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Keys in `dir`, read when first needed and again whenever the directory changes.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: dir.into(),
                cache: Mutex::default(),
            }),
        }
    }

    /// The current keys, re-read if any file under the directory changed.
    fn keys(&self) -> Arc<Keys> {
        let dir = &self.inner.dir;
        let now = keys::fingerprint(dir);
        let mut cache = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, keys)) = cache.as_ref()
            && *seen == now
        {
            return keys.clone();
        }
        let keys = Arc::new(keys::load(dir));
        tracing::info!(
            dir = %dir.display(),
            keys = keys.keys.len(),
            certificates = keys.certs.len(),
            "read decryption keys"
        );
        *cache = Some((now, keys.clone()));
        keys
    }
}

/// Whether a media type names an ocicrypt-encrypted blob.
pub fn is_encrypted(media_type: &str) -> bool {
    media_type.ends_with("+encrypted")
}

/// The media type of the blob inside an encrypted one.
pub fn plain_media_type(media_type: &str) -> &str {
    media_type.strip_suffix("+encrypted").unwrap_or(media_type)
}

/// Unwraps the layer key and returns a reader of the plaintext blob.
pub(crate) fn decrypt<'a>(
    keys: &Keyring,
    layer: &Layer<'_>,
    input: Stream<'a>,
) -> Result<Stream<'a>, Error> {
    let key = unwrap(keys, layer)?;
    Ok(Box::new(cipher::Decryptor::new(&key, layer.digest, input)))
}

/// Unwraps the layer key only.
pub(crate) fn check(keys: &Keyring, layer: &Layer<'_>) -> Result<(), Error> {
    unwrap(keys, layer).map(drop)
}

/// One decoded item of a key annotation.
enum Wrapped {
    Jwe(jwe::Jwe),
    Pkcs7(pkcs7::Envelope),
    /// A scheme imaged cannot unwrap (pgp, pkcs11, key providers).
    Unsupported,
}

impl Wrapped {
    fn parse(scheme: &str, item: &[u8]) -> Result<Self, String> {
        match scheme {
            "jwe" => jwe::parse(item).map(Self::Jwe),
            "pkcs7" => pkcs7::parse(item).map(Self::Pkcs7),
            _ => Ok(Self::Unsupported),
        }
    }

    fn describe(&self) -> Vec<String> {
        match self {
            Self::Jwe(jwe) => jwe.describe(),
            Self::Pkcs7(envelope) => envelope.describe(),
            Self::Unsupported => Vec::new(),
        }
    }

    fn decrypt(&self, keys: &Keys) -> Result<Vec<u8>, String> {
        match self {
            Self::Jwe(jwe) => jwe.decrypt(keys),
            Self::Pkcs7(envelope) => envelope.decrypt(keys),
            Self::Unsupported => Err("scheme not supported by imaged".to_string()),
        }
    }
}

/// What went wrong with the schemes tried so far.
#[derive(Default)]
struct Failures {
    wrapped_for: Vec<String>,
    detail: Vec<String>,
    malformed: Vec<String>,
}

/// Finds a key that unwraps the layer key, and reads the options it protects.
fn unwrap(keyring: &Keyring, layer: &Layer<'_>) -> Result<LayerKey, Error> {
    let keys = keyring.keys();
    let schemes = options::wrapped_keys(layer.annotations);
    if schemes.is_empty() {
        return Err(invalid(layer, "no wrapped key annotation"));
    }
    let mut failures = Failures::default();
    for (scheme, items) in schemes {
        let items = match items {
            Ok(items) => items,
            Err(why) => {
                failures.wrapped_for.push(scheme.to_string());
                failures.malformed.push(why);
                continue;
            }
        };
        let parsed: Vec<_> = items.iter().map(|i| Wrapped::parse(scheme, i)).collect();
        failures.wrapped_for.push(describe(scheme, &parsed));
        if keys.keys.is_empty() {
            continue;
        }
        match try_items(&parsed, &keys, &mut failures.malformed) {
            Ok(private) => {
                return options::layer_key(&private, layer.annotations)
                    .map_err(|why| invalid(layer, &why));
            }
            Err(why) => failures.detail.push(format!("{scheme}: {why}")),
        }
    }
    Err(no_key(keyring, layer, &keys, failures))
}

/// The private options from the first item some key unwraps.
fn try_items(
    parsed: &[Result<Wrapped, String>],
    keys: &Keys,
    malformed: &mut Vec<String>,
) -> Result<Vec<u8>, String> {
    let mut reasons: Vec<String> = Vec::new();
    for item in parsed {
        match item.as_ref().map(|w| w.decrypt(keys)) {
            Ok(Ok(private)) => return Ok(private),
            Ok(Err(why)) if !reasons.contains(&why) => reasons.push(why),
            Ok(Err(_)) => {}
            Err(why) => malformed.push(why.clone()),
        }
    }
    Err(reasons.join("; "))
}

/// `scheme (recipient, recipient)`, listing each distinct recipient kind once.
fn describe(scheme: &str, parsed: &[Result<Wrapped, String>]) -> String {
    let mut kinds: Vec<String> = Vec::new();
    for kind in parsed.iter().flatten().flat_map(Wrapped::describe) {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    match kinds.is_empty() {
        true => scheme.to_string(),
        false => format!("{scheme} ({})", kinds.join(", ")),
    }
}

fn no_key(keyring: &Keyring, layer: &Layer<'_>, keys: &Keys, failures: Failures) -> Error {
    if !keys.keys.is_empty() && !failures.malformed.is_empty() {
        return invalid(layer, &failures.malformed.join("; "));
    }
    let detail = match keys.keys.is_empty() {
        true => format!(
            "; missing private key: the keys directory {} has no usable private keys",
            keyring.inner.dir.display()
        ),
        false if failures.detail.is_empty() => String::new(),
        false => format!("; {}", failures.detail.join("; ")),
    };
    Error::NoKey {
        digest: layer.digest.to_string(),
        wrapped_for: failures.wrapped_for.join(", "),
        detail,
    }
}

fn invalid(layer: &Layer<'_>, reason: &str) -> Error {
    Error::InvalidEncryption {
        digest: layer.digest.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn error(keys: &Keyring, annotations: &[(&str, &str)]) -> Error {
        let annotations: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let layer = Layer {
            media_type: "application/vnd.oci.image.layer.v1.tar+encrypted",
            digest: "sha256:ab",
            size: 0,
            annotations: &annotations,
        };
        check(keys, &layer).unwrap_err()
    }

    #[test]
    fn a_layer_without_wrapped_keys_is_invalid() {
        let err = error(&Keyring::new("/nonexistent"), &[]);
        assert!(matches!(err, Error::InvalidEncryption { .. }), "{err}");
    }

    #[test]
    fn unsupported_schemes_are_listed_as_wrapped_for() {
        let err = error(
            &Keyring::new("/nonexistent"),
            &[
                ("org.opencontainers.image.enc.keys.pgp", "AAAA"),
                ("org.opencontainers.image.enc.keys.provider.kms", "AAAA"),
            ],
        );
        let Error::NoKey {
            wrapped_for,
            detail,
            ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(wrapped_for, "pgp, provider.kms");
        assert!(
            detail.contains("/nonexistent has no usable private keys"),
            "{err}"
        );
    }

    #[test]
    fn encrypted_media_types_are_recognised() {
        let media = "application/vnd.oci.image.layer.v1.tar+zstd+encrypted";
        assert!(is_encrypted(media));
        assert_eq!(
            plain_media_type(media),
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        assert!(!is_encrypted("application/vnd.oci.image.layer.v1.tar"));
    }
}
