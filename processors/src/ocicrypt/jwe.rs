//! JWE key wrapping (RFC 7516): JSON (flattened or general) and compact serialization.

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{AesGcm, Nonce};
use base64::Engine;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::keys::{Keys, PrivateKey};

/// base64url as JOSE writes it (unpadded), tolerating padding.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The header members key unwrapping looks at.
#[derive(Debug, Default, Clone, Deserialize)]
struct Header {
    alg: Option<String>,
    enc: Option<String>,
    epk: Option<Epk>,
    apu: Option<String>,
    apv: Option<String>,
}

impl Header {
    /// Members of `self`, else of `other`: the JOSE header of a recipient is the union of
    /// its own, the shared unprotected and the protected headers.
    fn or(self, other: &Header) -> Header {
        Header {
            alg: self.alg.or_else(|| other.alg.clone()),
            enc: self.enc.or_else(|| other.enc.clone()),
            epk: self.epk.or_else(|| other.epk.clone()),
            apu: self.apu.or_else(|| other.apu.clone()),
            apv: self.apv.or_else(|| other.apv.clone()),
        }
    }
}

/// An ephemeral EC public key (JWK).
#[derive(Debug, Clone, Deserialize)]
struct Epk {
    #[serde(default)]
    crv: String,
    #[serde(default)]
    x: String,
    #[serde(default)]
    y: String,
}

#[derive(Deserialize)]
struct JsonRecipient {
    header: Option<Header>,
    encrypted_key: Option<String>,
}

#[derive(Deserialize)]
struct JsonJwe {
    protected: Option<String>,
    unprotected: Option<Header>,
    header: Option<Header>,
    encrypted_key: Option<String>,
    recipients: Option<Vec<JsonRecipient>>,
    iv: Option<String>,
    ciphertext: String,
    tag: Option<String>,
    aad: Option<String>,
}

/// One recipient: its full header and the wrapped content key.
struct Recipient {
    header: Header,
    encrypted_key: Vec<u8>,
}

/// A parsed JWE.
pub(crate) struct Jwe {
    recipients: Vec<Recipient>,
    /// The additional authenticated data: the `protected` member as written, and `aad`.
    aad: Vec<u8>,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
}

fn b64url(value: &str, what: &str) -> Result<Vec<u8>, String> {
    BASE64URL
        .decode(value)
        .map_err(|_| format!("JWE {what} is not valid base64url"))
}

fn protected_header(protected: &str) -> Result<Header, String> {
    if protected.is_empty() {
        return Ok(Header::default());
    }
    serde_json::from_slice(&b64url(protected, "protected header")?)
        .map_err(|e| format!("JWE protected header is not valid JSON: {e}"))
}

/// Parses a JWE in JSON or compact serialization.
pub(crate) fn parse(data: &[u8]) -> Result<Jwe, String> {
    if data.trim_ascii_start().starts_with(b"{") {
        parse_json(data)
    } else {
        parse_compact(data)
    }
}

fn parse_json(data: &[u8]) -> Result<Jwe, String> {
    let json: JsonJwe =
        serde_json::from_slice(data).map_err(|e| format!("JWE is not valid JSON: {e}"))?;
    let protected = json.protected.unwrap_or_default();
    let shared = json
        .unprotected
        .unwrap_or_default()
        .or(&protected_header(&protected)?);
    // The general form also copies recipient 0's key to the top level: only `recipients` counts.
    let listed = match json.recipients {
        Some(recipients) => recipients,
        None => vec![JsonRecipient {
            header: json.header,
            encrypted_key: json.encrypted_key,
        }],
    };
    let recipients = listed
        .into_iter()
        .map(|r| {
            Ok(Recipient {
                header: r.header.unwrap_or_default().or(&shared),
                encrypted_key: b64url(&r.encrypted_key.unwrap_or_default(), "encrypted_key")?,
            })
        })
        .collect::<Result<_, String>>()?;
    let mut aad = protected.into_bytes();
    if let Some(extra) = json.aad {
        aad.push(b'.');
        aad.extend(extra.into_bytes());
    }
    Ok(Jwe {
        recipients,
        aad,
        iv: b64url(&json.iv.unwrap_or_default(), "iv")?,
        ciphertext: b64url(&json.ciphertext, "ciphertext")?,
        tag: b64url(&json.tag.unwrap_or_default(), "tag")?,
    })
}

fn parse_compact(data: &[u8]) -> Result<Jwe, String> {
    let text = std::str::from_utf8(data).map_err(|_| "JWE is neither JSON nor compact text")?;
    let parts: Vec<&str> = text.trim().split('.').collect();
    let [protected, encrypted_key, iv, ciphertext, tag] = parts[..] else {
        return Err("JWE is neither JSON nor compact serialization".to_string());
    };
    Ok(Jwe {
        recipients: vec![Recipient {
            header: protected_header(protected)?,
            encrypted_key: b64url(encrypted_key, "encrypted_key")?,
        }],
        aad: protected.as_bytes().to_vec(),
        iv: b64url(iv, "iv")?,
        ciphertext: b64url(ciphertext, "ciphertext")?,
        tag: b64url(tag, "tag")?,
    })
}

impl Jwe {
    /// The key types the recipients need, e.g. `RSA-OAEP` or `ECDH-ES+A256KW P-384`.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.recipients
            .iter()
            .map(|r| {
                let alg = r.header.alg.as_deref().unwrap_or("no alg");
                match &r.header.epk {
                    Some(epk) => format!("{alg} {}", epk.crv),
                    None => alg.to_string(),
                }
            })
            .collect()
    }

    /// The plaintext (the private options), if some recipient can be unwrapped with some key.
    pub(crate) fn decrypt(&self, keys: &Keys) -> Result<Vec<u8>, String> {
        let mut tried = 0;
        let mut refused = Vec::new();
        for recipient in &self.recipients {
            let alg = recipient.header.alg.as_deref().unwrap_or_default();
            if !ALGS.contains(&alg) {
                refused.push(format!("key algorithm {alg:?} is not allowed"));
                continue;
            }
            for key in &keys.keys {
                let Some(cek) = unwrap_cek(&recipient.header, &recipient.encrypted_key, &key.key)
                else {
                    continue;
                };
                tried += 1;
                match cek.and_then(|cek| self.open(&recipient.header, &cek)) {
                    Ok(plain) => return Ok(plain),
                    Err(why) => {
                        tracing::debug!(key = %key.path.display(), "JWE recipient not unwrapped: {why}")
                    }
                }
            }
        }
        refused.push(match tried {
            0 => format!(
                "no key of a type the recipients need (the node has {})",
                key_kinds(keys)
            ),
            n => format!("none of {n} candidate key(s) unwraps a recipient"),
        });
        Err(refused.join("; "))
    }

    /// Decrypts the content with the content encryption key.
    fn open(&self, header: &Header, cek: &[u8]) -> Result<Vec<u8>, String> {
        let enc = header.enc.as_deref().unwrap_or_default();
        let mut sealed = self.ciphertext.clone();
        sealed.extend_from_slice(&self.tag);
        let nonce = <&Nonce<U12>>::try_from(&self.iv[..]).map_err(|_| "JWE iv is not 12 bytes")?;
        let payload = Payload {
            msg: &sealed,
            aad: &self.aad,
        };
        let result = match enc {
            "A128GCM" => gcm::<aes::Aes128>(cek)?.decrypt(nonce, payload),
            "A192GCM" => gcm::<aes::Aes192>(cek)?.decrypt(nonce, payload),
            "A256GCM" => gcm::<aes::Aes256>(cek)?.decrypt(nonce, payload),
            other => return Err(format!("content encryption {other:?} is not supported")),
        };
        result.map_err(|_| "content decryption failed".to_string())
    }
}

/// The distinct key types of the node, e.g. `RSA, EC P-256`.
fn key_kinds(keys: &Keys) -> String {
    let mut kinds: Vec<&str> = keys.keys.iter().map(|k| k.key.kind()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds.join(", ")
}

/// The key wrapping algorithms accepted, as go-jose v4 in ocicrypt allows them.
const ALGS: [&str; 5] = [
    "RSA-OAEP",
    "RSA-OAEP-256",
    "ECDH-ES+A128KW",
    "ECDH-ES+A192KW",
    "ECDH-ES+A256KW",
];

fn gcm<C>(key: &[u8]) -> Result<AesGcm<C, U12>, String>
where
    AesGcm<C, U12>: KeyInit,
{
    AesGcm::<C, U12>::new_from_slice(key).map_err(|_| "content key of the wrong length".to_string())
}

/// Unwraps the content key with `key`; `None` when the key type does not fit the recipient.
fn unwrap_cek(
    header: &Header,
    encrypted_key: &[u8],
    key: &PrivateKey,
) -> Option<Result<Vec<u8>, String>> {
    let alg = header.alg.as_deref()?;
    match (alg, key) {
        ("RSA-OAEP", PrivateKey::Rsa(rsa)) => Some(
            rsa.decrypt(rsa::Oaep::<Sha1>::new(), encrypted_key)
                .map_err(|_| "RSA-OAEP decryption failed".to_string()),
        ),
        ("RSA-OAEP-256", PrivateKey::Rsa(rsa)) => Some(
            rsa.decrypt(rsa::Oaep::<Sha256>::new(), encrypted_key)
                .map_err(|_| "RSA-OAEP-256 decryption failed".to_string()),
        ),
        (_, PrivateKey::P256(_) | PrivateKey::P384(_)) if alg.starts_with("ECDH-ES+") => {
            let epk = header.epk.as_ref()?;
            let z = shared_secret(key, epk)?;
            Some(z.and_then(|z| unwrap_ecdh(header, alg, &z, encrypted_key)))
        }
        _ => None,
    }
}

/// The ECDH shared secret with the ephemeral key; `None` when the curves differ.
fn shared_secret(key: &PrivateKey, epk: &Epk) -> Option<Result<Vec<u8>, String>> {
    let point = || -> Result<Vec<u8>, String> {
        let mut point = vec![4];
        point.extend(b64url(&epk.x, "epk x")?);
        point.extend(b64url(&epk.y, "epk y")?);
        Ok(point)
    };
    let bad_point = |_| format!("JWE epk is not a valid {} point", epk.crv);
    match (key, epk.crv.as_str()) {
        (PrivateKey::P256(secret), "P-256") => Some(point().and_then(|p| {
            let public = p256::PublicKey::from_sec1_bytes(&p).map_err(bad_point)?;
            let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), public.as_affine());
            Ok(shared.raw_secret_bytes().to_vec())
        })),
        (PrivateKey::P384(secret), "P-384") => Some(point().and_then(|p| {
            let public = p384::PublicKey::from_sec1_bytes(&p).map_err(bad_point)?;
            let shared = p384::ecdh::diffie_hellman(secret.to_nonzero_scalar(), public.as_affine());
            Ok(shared.raw_secret_bytes().to_vec())
        })),
        _ => None,
    }
}

/// Derives the key encryption key from `z` and unwraps the content key (RFC 7518 §4.6).
fn unwrap_ecdh(header: &Header, alg: &str, z: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, String> {
    let apu = b64url(header.apu.as_deref().unwrap_or_default(), "apu")?;
    let apv = b64url(header.apv.as_deref().unwrap_or_default(), "apv")?;
    let kek_len = match alg {
        "ECDH-ES+A128KW" => 16,
        "ECDH-ES+A192KW" => 24,
        _ => 32,
    };
    let kek = concat_kdf(z, alg, &apu, &apv, kek_len);
    let mut out = vec![0; wrapped.len().saturating_sub(8)];
    let unwrapped = match kek_len {
        16 => aes_kw::KwAes128::new_from_slice(&kek).map(|kw| kw.unwrap_key(wrapped, &mut out)),
        24 => aes_kw::KwAes192::new_from_slice(&kek).map(|kw| kw.unwrap_key(wrapped, &mut out)),
        _ => aes_kw::KwAes256::new_from_slice(&kek).map(|kw| kw.unwrap_key(wrapped, &mut out)),
    };
    match unwrapped {
        Ok(Ok(cek)) => Ok(cek.to_vec()),
        _ => Err(format!("{alg} key unwrap failed")),
    }
}

/// The Concat KDF of NIST SP 800-56A §5.8.1 with SHA-256, as RFC 7518 §4.6.2 uses it:
/// written here because no maintained crate of the RustCrypto generation in use offers it.
/// OtherInfo = AlgorithmID ‖ PartyUInfo ‖ PartyVInfo (each length-prefixed) ‖ keydatalen in bits.
fn concat_kdf(z: &[u8], alg: &str, apu: &[u8], apv: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut hash = Sha256::new();
        hash.update(counter.to_be_bytes());
        hash.update(z);
        for part in [alg.as_bytes(), apu, apv] {
            hash.update((part.len() as u32).to_be_bytes());
            hash.update(part);
        }
        hash.update(((len * 8) as u32).to_be_bytes());
        out.extend_from_slice(&hash.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ocicrypt::keys::KeyFile;

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
    }

    fn p256(byte: u8) -> p256::SecretKey {
        p256::SecretKey::from_slice(&[byte; 32]).unwrap()
    }

    fn keys(secrets: Vec<p256::SecretKey>) -> Keys {
        Keys {
            keys: secrets
                .into_iter()
                .map(|s| KeyFile {
                    path: "k".into(),
                    key: PrivateKey::P256(s),
                })
                .collect(),
            certs: Vec::new(),
        }
    }

    /// The parts of a JWE for `recipient`, wrapped with ECDH-ES+A128KW and sealed with
    /// A256GCM: protected header, recipient header, encrypted key, iv, ciphertext, tag.
    /// `shared` puts alg and epk in the protected header, as for a single recipient.
    fn seal(recipient: &p256::SecretKey, alg: &str, shared: bool, plain: &[u8]) -> [String; 6] {
        let ephemeral = p256(9);
        let point = ephemeral.public_key().to_sec1_bytes();
        let (x, y) = (&point[1..33], &point[33..]);
        let recipient_header = format!(
            r#""alg":"{alg}","epk":{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}"#,
            b64(x),
            b64(y)
        );
        let header = match shared {
            true => format!(r#"{{{recipient_header},"enc":"A256GCM"}}"#),
            false => r#"{"enc":"A256GCM"}"#.to_string(),
        };
        let protected = b64(header.as_bytes());
        let z = p256::ecdh::diffie_hellman(
            ephemeral.to_nonzero_scalar(),
            recipient.public_key().as_affine(),
        );
        let kek = concat_kdf(z.raw_secret_bytes(), alg, &[], &[], 16);
        let cek = [4; 32];
        let mut wrapped = [0; 40];
        aes_kw::KwAes128::new_from_slice(&kek)
            .unwrap()
            .wrap_key(&cek, &mut wrapped)
            .unwrap();
        let iv = [6; 12];
        let sealed = gcm::<aes::Aes256>(&cek)
            .unwrap()
            .encrypt(
                <&Nonce<U12>>::try_from(&iv[..]).unwrap(),
                Payload {
                    msg: plain,
                    aad: protected.as_bytes(),
                },
            )
            .unwrap();
        let (ciphertext, tag) = sealed.split_at(sealed.len() - 16);
        [
            protected,
            format!("{{{recipient_header}}}"),
            b64(&wrapped),
            b64(&iv),
            b64(ciphertext),
            b64(tag),
        ]
    }

    /// A compact JWE for `recipient`.
    fn compact(recipient: &p256::SecretKey, alg: &str, plain: &[u8]) -> String {
        let [protected, _, key, iv, ciphertext, tag] = seal(recipient, alg, true, plain);
        format!("{protected}.{key}.{iv}.{ciphertext}.{tag}")
    }

    #[test]
    fn concat_kdf_matches_rfc_7518_appendix_c() {
        let z = [
            158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let key = concat_kdf(&z, "A128GCM", b"Alice", b"Bob", 16);
        assert_eq!(b64(&key), "VqqN6vgjbSBcIijNcacQGg");
    }

    #[test]
    fn compact_ecdh_jwe_decrypts_with_the_right_key_only() {
        let jwe = parse(compact(&p256(1), "ECDH-ES+A128KW", b"{}").as_bytes()).unwrap();
        assert_eq!(jwe.describe(), ["ECDH-ES+A128KW P-256"]);
        assert_eq!(jwe.decrypt(&keys(vec![p256(2), p256(1)])).unwrap(), b"{}");
        let err = jwe.decrypt(&keys(vec![p256(2)])).unwrap_err();
        assert_eq!(err, "none of 1 candidate key(s) unwraps a recipient");
    }

    #[test]
    fn general_json_tries_every_recipient() {
        let [protected, header, key, iv, ciphertext, tag] =
            seal(&p256(1), "ECDH-ES+A256KW", false, b"{}");
        // go-jose also copies the first recipient's key to the top level.
        let general = format!(
            r#"{{"protected":"{protected}","recipients":[{{"header":{{"alg":"RSA-OAEP"}},"encrypted_key":"AAAA"}},{{"header":{header},"encrypted_key":"{key}"}}],"encrypted_key":"AAAA","iv":"{iv}","ciphertext":"{ciphertext}","tag":"{tag}"}}"#
        );
        let jwe = parse(general.as_bytes()).unwrap();
        assert_eq!(jwe.describe(), ["RSA-OAEP", "ECDH-ES+A256KW P-256"]);
        assert!(
            jwe.decrypt(&keys(vec![p256(1)])).is_err(),
            "the KEK length follows alg"
        );
        let [protected, header, key, iv, ciphertext, tag] =
            seal(&p256(1), "ECDH-ES+A128KW", false, b"{}");
        let flattened = format!(
            r#"{{"protected":"{protected}","header":{header},"encrypted_key":"{key}","iv":"{iv}","ciphertext":"{ciphertext}","tag":"{tag}"}}"#
        );
        let jwe = parse(flattened.as_bytes()).unwrap();
        assert_eq!(jwe.decrypt(&keys(vec![p256(2), p256(1)])).unwrap(), b"{}");
    }

    #[test]
    fn tampered_protected_header_fails_the_content_tag() {
        let token = compact(&p256(1), "ECDH-ES+A128KW", b"{}");
        let jwe = parse(token.replacen('e', "f", 1).as_bytes());
        assert!(jwe.is_err() || jwe.unwrap().decrypt(&keys(vec![p256(1)])).is_err());
    }

    #[test]
    fn algorithms_outside_the_allow_list_are_refused() {
        for alg in ["RSA1_5", "dir", "ECDH-ES"] {
            let header = b64(format!(r#"{{"alg":"{alg}","enc":"A256GCM"}}"#).as_bytes());
            let jwe =
                parse(format!("{header}.AAAA.AAAAAAAAAAAAAAAA.AAAA.AAAA").as_bytes()).unwrap();
            let err = jwe.decrypt(&keys(vec![p256(1)])).unwrap_err();
            assert!(
                err.contains(&format!("key algorithm \"{alg}\" is not allowed")),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_documents_are_errors() {
        for bad in [
            &b""[..],
            b"{",
            b"{}",
            b"a.b.c",
            br#"{"ciphertext":"***"}"#,
            br#"{"protected":"bm90IGpzb24","ciphertext":""}"#,
            b"\xff\xfe",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_short_iv_is_refused_not_a_panic() {
        let token = compact(&p256(1), "ECDH-ES+A128KW", b"{}");
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[2] = "AAAA";
        let jwe = parse(parts.join(".").as_bytes()).unwrap();
        assert!(jwe.decrypt(&keys(vec![p256(1)])).is_err());
    }
}
