//! The keys directory: private keys and certificates, classified file by file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use der::{Decode, Encode};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;

/// A private key the unwrappers can use.
pub(crate) enum PrivateKey {
    /// RSA, for JWE RSA-OAEP and PKCS#7.
    Rsa(Box<rsa::PrivateKey>),
    /// EC P-256, for JWE ECDH-ES.
    P256(p256::SecretKey),
    /// EC P-384, for JWE ECDH-ES.
    P384(p384::SecretKey),
}

impl PrivateKey {
    /// The key type as error messages name it.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Rsa(_) => "RSA",
            Self::P256(_) => "EC P-256",
            Self::P384(_) => "EC P-384",
        }
    }
}

/// A private key and the file it came from.
pub(crate) struct KeyFile {
    pub(crate) path: PathBuf,
    pub(crate) key: PrivateKey,
}

/// What PKCS#7 decryption needs of a certificate.
pub(crate) struct Certificate {
    pub(crate) path: PathBuf,
    /// DER of the issuer Name.
    pub(crate) issuer: Vec<u8>,
    /// Content octets of the serial number INTEGER.
    pub(crate) serial: Vec<u8>,
    /// The RSA public key, when the certificate holds one.
    pub(crate) rsa: Option<rsa::PublicKey>,
}

impl Certificate {
    /// Whether `key` is the private half of this certificate's key.
    pub(crate) fn matches(&self, key: &rsa::PrivateKey) -> bool {
        self.rsa
            .as_ref()
            .is_some_and(|public| public.n() == key.n() && public.e() == key.e())
    }
}

/// Everything usable found in the directory.
#[derive(Default)]
pub(crate) struct Keys {
    pub(crate) keys: Vec<KeyFile>,
    pub(crate) certs: Vec<Certificate>,
}

/// Path, inode, size and modification time of every entry: changes when any file is added,
/// removed, replaced or rewritten.
pub(crate) type Fingerprint = Vec<(PathBuf, u64, u64, u128)>;

/// The fingerprint of the tree under `dir`; empty when it does not exist.
pub(crate) fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    walk(dir, &mut |path, meta| {
        use std::os::unix::fs::MetadataExt;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        out.push((path.to_path_buf(), meta.ino(), meta.len(), mtime));
    });
    out.sort();
    out
}

/// Reads every file under `dir`; unusable ones are reported and skipped.
pub(crate) fn load(dir: &Path) -> Keys {
    let mut keys = Keys::default();
    let mut files = Vec::new();
    walk(dir, &mut |path, meta| {
        if meta.file_type().is_symlink() {
            tracing::warn!(file = %path.display(), "ignoring decryption key file: symbolic links are not followed");
        } else if meta.is_file() {
            files.push(path.to_path_buf());
        }
    });
    files.sort();
    for path in files {
        match fs::read(&path) {
            Ok(data) => classify(&path, &data, &mut keys),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring decryption key file: unreadable")
            }
        }
    }
    keys
}

/// Calls `visit` for every entry below `dir`, recursing into real directories only.
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path, &fs::Metadata)) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list decryption keys directory");
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        visit(&path, &meta);
        if meta.is_dir() {
            walk(&path, visit);
        }
    }
}

/// Adds what `data` holds to `keys`, or warns why it cannot be used.
fn classify(path: &Path, data: &[u8], keys: &mut Keys) {
    let result = if data.trim_ascii_start().starts_with(b"-----BEGIN ") {
        pem_items(data, path, keys)
    } else if data.trim_ascii_start().starts_with(b"{") {
        Err("private keys as JWK are not supported; use PEM or DER".to_string())
    } else {
        der_item(data, path, keys)
    };
    if let Err(why) = result {
        tracing::warn!(file = %path.display(), "ignoring decryption key file: {why}");
    }
}

/// Adds every PEM block of a file; fails if none was usable.
fn pem_items(data: &[u8], path: &Path, keys: &mut Keys) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|_| "PEM file is not text".to_string())?;
    let mut used = 0;
    let mut reasons = Vec::new();
    for block in pem_blocks(text) {
        let block = block?;
        match pem_item(&block, path, keys) {
            Ok(true) => used += 1,
            Ok(false) => {}
            Err(why) => reasons.push(why),
        }
    }
    match (used, reasons.is_empty()) {
        (_, false) => Err(reasons.join("; ")),
        (0, true) => Err("no private key or certificate in it".to_string()),
        _ => Ok(()),
    }
}

/// One PEM block: its label, whether it had headers (legacy encryption), its DER.
struct PemBlock {
    label: String,
    headers: Vec<String>,
    der: Vec<u8>,
}

fn pem_blocks(text: &str) -> impl Iterator<Item = Result<PemBlock, String>> + '_ {
    let mut lines = text.lines().map(str::trim);
    std::iter::from_fn(move || {
        let label = lines.by_ref().find_map(|l| {
            l.strip_prefix("-----BEGIN ")
                .and_then(|l| l.strip_suffix("-----"))
        })?;
        let end = format!("-----END {label}-----");
        let mut headers = Vec::new();
        let mut body = String::new();
        for line in lines.by_ref() {
            if line == end {
                let der = STANDARD
                    .decode(&body)
                    .map_err(|_| format!("bad base64 in PEM block {label}"));
                return Some(der.map(|der| PemBlock {
                    label: label.to_string(),
                    headers,
                    der,
                }));
            }
            if line.contains(':') {
                headers.push(line.to_string());
            } else {
                body.push_str(line);
            }
        }
        Some(Err(format!("PEM block {label} has no end line")))
    })
}

/// Adds one PEM block; `Ok(false)` for blocks that carry nothing to use and need no warning.
fn pem_item(block: &PemBlock, path: &Path, keys: &mut Keys) -> Result<bool, String> {
    if block.headers.iter().any(|h| h.contains("ENCRYPTED")) {
        return Err("password-protected key (no password can be supplied)".to_string());
    }
    let der = &block.der;
    let key = match block.label.as_str() {
        "PRIVATE KEY" => pkcs8_key(der)?,
        "RSA PRIVATE KEY" => PrivateKey::Rsa(Box::new(
            rsa::PrivateKey::from_pkcs1_der(der).map_err(|e| format!("bad PKCS#1 key: {e}"))?,
        )),
        "EC PRIVATE KEY" => sec1_key(der)?,
        "CERTIFICATE" => {
            keys.certs.push(certificate(der, path)?);
            return Ok(true);
        }
        "EC PARAMETERS" => return Ok(false),
        "ENCRYPTED PRIVATE KEY" => {
            return Err("password-protected key (no password can be supplied)".to_string());
        }
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {
            return Err("public key, not a private key".to_string());
        }
        other => return Err(format!("unknown PEM block {other:?}")),
    };
    keys.keys.push(KeyFile {
        path: path.to_path_buf(),
        key,
    });
    Ok(true)
}

/// A DER file: PKCS#8, PKCS#1 or SEC1 private key, or an X.509 certificate.
fn der_item(der: &[u8], path: &Path, keys: &mut Keys) -> Result<(), String> {
    let key = pkcs8_key(der)
        .ok()
        .or_else(|| {
            rsa::PrivateKey::from_pkcs1_der(der)
                .ok()
                .map(|k| PrivateKey::Rsa(Box::new(k)))
        })
        .or_else(|| sec1_key(der).ok());
    if let Some(key) = key {
        keys.keys.push(KeyFile {
            path: path.to_path_buf(),
            key,
        });
        return Ok(());
    }
    if let Ok(cert) = certificate(der, path) {
        keys.certs.push(cert);
        return Ok(());
    }
    if rsa::pkcs8::SubjectPublicKeyInfoRef::from_der(der).is_ok() {
        return Err("public key, not a private key".to_string());
    }
    Err("not an unencrypted private key or a certificate".to_string())
}

fn pkcs8_key(der: &[u8]) -> Result<PrivateKey, String> {
    if let Ok(key) = rsa::PrivateKey::from_pkcs8_der(der) {
        return Ok(PrivateKey::Rsa(Box::new(key)));
    }
    if let Ok(key) = p256::SecretKey::from_pkcs8_der(der) {
        return Ok(PrivateKey::P256(key));
    }
    p384::SecretKey::from_pkcs8_der(der)
        .map(PrivateKey::P384)
        .map_err(|_| "PKCS#8 key of an unsupported type (need RSA, EC P-256 or P-384)".to_string())
}

fn sec1_key(der: &[u8]) -> Result<PrivateKey, String> {
    if let Ok(key) = p256::SecretKey::from_sec1_der(der) {
        return Ok(PrivateKey::P256(key));
    }
    p384::SecretKey::from_sec1_der(der)
        .map(PrivateKey::P384)
        .map_err(|_| "SEC1 EC key on an unsupported curve (need P-256 or P-384)".to_string())
}

fn certificate(der: &[u8], path: &Path) -> Result<Certificate, String> {
    let cert =
        x509_cert::Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
    let tbs = cert.tbs_certificate();
    let issuer = tbs
        .issuer()
        .to_der()
        .map_err(|e| format!("bad certificate issuer: {e}"))?;
    let rsa = tbs
        .subject_public_key_info()
        .to_der()
        .ok()
        .and_then(|spki| rsa::PublicKey::from_public_key_der(&spki).ok());
    Ok(Certificate {
        path: path.to_path_buf(),
        issuer,
        serial: tbs.serial_number().as_bytes().to_vec(),
        rsa,
    })
}
