//! The key annotations and the two option documents they lead to.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

/// Prefix of every key annotation; the rest names the scheme.
pub(crate) const KEYS_PREFIX: &str = "org.opencontainers.image.enc.keys.";
/// The public options annotation.
pub(crate) const PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";
/// The only layer cipher ocicrypt defines.
const CIPHER: &str = "AES_256_CTR_HMAC_SHA256";

/// The decoded items of one key annotation, or why they could not be decoded.
pub(crate) type Items = Result<Vec<Vec<u8>>, String>;

/// The wrapped-key annotations of a layer: scheme name and its decoded items.
pub(crate) fn wrapped_keys(annotations: &BTreeMap<String, String>) -> Vec<(&str, Items)> {
    annotations
        .iter()
        .filter_map(|(name, value)| {
            let scheme = name.strip_prefix(KEYS_PREFIX)?;
            Some((scheme, decode_items(scheme, value)))
        })
        .collect()
}

/// Splits a comma list of base64 items; a bad item fails the whole scheme, as in Go.
fn decode_items(scheme: &str, value: &str) -> Items {
    value
        .split(',')
        .filter(|item| !item.is_empty())
        .enumerate()
        .map(|(i, item)| {
            decode_base64(item)
                .ok_or_else(|| format!("{scheme} key item {} is not valid base64", i + 1))
        })
        .collect()
}

/// Go's `encoding/base64` StdEncoding, which also skips line breaks.
pub(crate) fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text: String = text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
    STANDARD.decode(text).ok()
}

/// The layer key material, validated.
pub(crate) struct LayerKey {
    pub(crate) symkey: [u8; 32],
    pub(crate) nonce: [u8; 16],
    pub(crate) hmac: [u8; 32],
    /// The plaintext digest the encryptor was given; advisory only.
    pub(crate) digest: String,
}

/// Builds the layer key from the private options (decrypted from a wrapped key) and the
/// `pubopts` annotation.
pub(crate) fn layer_key(
    private: &[u8],
    annotations: &BTreeMap<String, String>,
) -> Result<LayerKey, String> {
    let private = parse_object(private, "private options")?;
    let public = match annotations.get(PUBOPTS) {
        Some(value) => {
            let json = decode_base64(value).ok_or("pubopts annotation is not valid base64")?;
            parse_object(&json, "public options")?
        }
        None => Map::new(),
    };
    let cipher = string_field(&public, "cipher", "public options")?;
    match cipher.as_str() {
        "" => return Err("no cipher type provided".to_string()),
        CIPHER => {}
        other => return Err(format!("unsupported cipher type: {other:?}")),
    }
    let hmac = bytes_field(&public, "hmac", "public options")?;
    if hmac.is_empty() {
        return Err("HMAC is not provided for decryption process".to_string());
    }
    let symkey = bytes_field(&private, "symkey", "private options")?;
    let nonce = cipher_option(&public, &private, "nonce")?.ok_or("nonce is missing")?;
    Ok(LayerKey {
        symkey: symkey.try_into().map_err(|k: Vec<u8>| {
            format!("invalid key length of {} bytes; need 32 bytes", k.len())
        })?,
        nonce: nonce
            .try_into()
            .map_err(|n: Vec<u8>| format!("nonce of {} bytes; need 16 bytes", n.len()))?,
        hmac: hmac
            .try_into()
            .map_err(|h: Vec<u8>| format!("hmac of {} bytes; need 32 bytes", h.len()))?,
        digest: string_field(&private, "digest", "private options")?,
    })
}

fn parse_object(json: &[u8], what: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(Value::Null) => Ok(Map::new()),
        Ok(_) => Err(format!("{what} are not a JSON object")),
        Err(e) => Err(format!("{what} are not valid JSON: {e}")),
    }
}

/// A member looked up the way Go's `encoding/json` does: exact name first, then ignoring case.
fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name)
        .or_else(|| {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

fn string_field(map: &Map<String, Value>, name: &str, what: &str) -> Result<String, String> {
    match field(map, name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{what}: {name} is not a string")),
    }
}

fn bytes_field(map: &Map<String, Value>, name: &str, what: &str) -> Result<Vec<u8>, String> {
    bytes_value(field(map, name)).map_err(|()| format!("{what}: {name} is not base64 bytes"))
}

fn bytes_value(value: Option<&Value>) -> Result<Vec<u8>, ()> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => decode_base64(s).ok_or(()),
        Some(_) => Err(()),
    }
}

/// A cipher option: the public map is consulted first, then the private one.
fn cipher_option(
    public: &Map<String, Value>,
    private: &Map<String, Value>,
    name: &str,
) -> Result<Option<Vec<u8>>, String> {
    for (map, what) in [(public, "public options"), (private, "private options")] {
        let options = match field(map, "cipheroptions") {
            None => continue,
            Some(Value::Object(options)) => options,
            Some(_) => return Err(format!("{what}: cipheroptions is not an object")),
        };
        if let Some(value) = options.get(name).filter(|v| !v.is_null()) {
            return bytes_value(Some(value))
                .map(Some)
                .map_err(|()| format!("{what}: cipher option {name} is not base64 bytes"));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    fn private(symkey: &[u8], nonce: Option<&[u8]>) -> Vec<u8> {
        let options = match nonce {
            Some(n) => format!(r#"{{"nonce":"{}"}}"#, b64(n)),
            None => "{}".to_string(),
        };
        format!(
            r#"{{"symkey":"{}","digest":"sha256:ab","cipheroptions":{options}}}"#,
            b64(symkey)
        )
        .into_bytes()
    }

    fn pubopts(json: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(PUBOPTS.to_string(), b64(json.as_bytes()))])
    }

    fn good_pubopts() -> BTreeMap<String, String> {
        pubopts(&format!(
            r#"{{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":"{}","cipheroptions":{{}}}}"#,
            b64(&[7; 32])
        ))
    }

    fn error(private: &[u8], annotations: &BTreeMap<String, String>) -> String {
        match layer_key(private, annotations) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn go_encoded_options_are_read() {
        let key = layer_key(&private(&[1; 32], Some(&[2; 16])), &good_pubopts()).unwrap();
        assert_eq!(key.symkey, [1; 32]);
        assert_eq!(key.nonce, [2; 16]);
        assert_eq!(key.hmac, [7; 32]);
        assert_eq!(key.digest, "sha256:ab");
    }

    #[test]
    fn names_are_matched_ignoring_case_and_nulls_are_empty() {
        let private = format!(
            r#"{{"SymKey":"{}","Digest":null,"CipherOptions":{{"nonce":"{}"}},"extra":1}}"#,
            b64(&[1; 32]),
            b64(&[2; 16])
        );
        let annotations = pubopts(&format!(
            r#"{{"Cipher":"AES_256_CTR_HMAC_SHA256","HMAC":"{}","cipheroptions":null}}"#,
            b64(&[7; 32])
        ));
        let key = layer_key(private.as_bytes(), &annotations).unwrap();
        assert_eq!(key.digest, "");
        assert_eq!(key.nonce, [2; 16]);
    }

    #[test]
    fn public_cipher_options_come_first() {
        let annotations = pubopts(&format!(
            r#"{{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":"{}","cipheroptions":{{"nonce":"{}"}}}}"#,
            b64(&[7; 32]),
            b64(&[9; 16])
        ));
        let key = layer_key(&private(&[1; 32], Some(&[2; 16])), &annotations).unwrap();
        assert_eq!(key.nonce, [9; 16]);
    }

    #[test]
    fn missing_pubopts_means_no_cipher() {
        let err = error(&private(&[1; 32], Some(&[2; 16])), &BTreeMap::new());
        assert_eq!(err, "no cipher type provided");
    }

    #[test]
    fn unknown_cipher_and_empty_hmac_are_refused() {
        let good = private(&[1; 32], Some(&[2; 16]));
        let err = error(&good, &pubopts(r#"{"cipher":"AES_128_GCM","hmac":"AAAA"}"#));
        assert!(err.contains("unsupported cipher type"), "{err}");
        let err = error(&good, &pubopts(r#"{"cipher":"AES_256_CTR_HMAC_SHA256"}"#));
        assert_eq!(err, "HMAC is not provided for decryption process");
    }

    #[test]
    fn wrong_lengths_are_refused_without_showing_the_key() {
        let err = error(&private(&[1; 31], Some(&[2; 16])), &good_pubopts());
        assert_eq!(err, "invalid key length of 31 bytes; need 32 bytes");
        let err = error(&private(&[1; 32], Some(&[2; 15])), &good_pubopts());
        assert_eq!(err, "nonce of 15 bytes; need 16 bytes");
        let err = error(&private(&[1; 32], None), &good_pubopts());
        assert_eq!(err, "nonce is missing");
    }

    #[test]
    fn bad_base64_and_json_are_refused() {
        let good = private(&[1; 32], Some(&[2; 16]));
        let annotations = BTreeMap::from([(PUBOPTS.to_string(), "%%%".to_string())]);
        assert!(error(&good, &annotations).contains("base64"));
        let annotations = BTreeMap::from([(PUBOPTS.to_string(), b64(b"{nope"))]);
        assert!(error(&good, &annotations).contains("not valid JSON"));
        assert!(error(br#"{"symkey":"!!"}"#, &good_pubopts()).contains("symkey"));
        assert!(error(b"[1]", &good_pubopts()).contains("not a JSON object"));
    }

    #[test]
    fn key_items_are_split_on_commas() {
        let annotations = BTreeMap::from([
            (
                format!("{KEYS_PREFIX}jwe"),
                format!("{},{}", b64(b"a"), b64(b"bc")),
            ),
            (format!("{KEYS_PREFIX}pkcs7"), "not base64!".to_string()),
            ("other".to_string(), "x".to_string()),
        ]);
        let keys = wrapped_keys(&annotations);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].0, "jwe");
        assert_eq!(
            keys[0].1.as_ref().unwrap(),
            &vec![b"a".to_vec(), b"bc".to_vec()]
        );
        assert_eq!(
            keys[1].1.as_ref().unwrap_err(),
            "pkcs7 key item 1 is not valid base64"
        );
    }
}
