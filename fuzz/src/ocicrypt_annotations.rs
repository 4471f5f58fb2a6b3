//! Fuzzes ocicrypt key unwrapping as a pull meets it: the layer annotations of an encrypted
//! layer (`enc.keys.jwe`, `enc.keys.pkcs7`, `enc.pubopts`) arrive from the registry before
//! anything about them is verified. The keys directory holds an EC P-256 key, an RSA key and
//! its certificate (throwaway keys in `fuzz/keys/ocicrypt`, made for this target only), so
//! inputs reach the JWE and PKCS#7 unwrappers. Nothing may panic; a layer that unwraps is
//! also streamed to its end.
//!
//! Input layout: the first byte picks the mode. 0: the rest is one JWE document, 1: one
//! PKCS#7 DER message (each base64-encoded into its annotation); otherwise the rest, split at
//! NUL bytes, gives the raw values of the jwe, pkcs7 and pubopts annotations.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use processors::{Chain, Decryption, Keyring, Layer};

const JWE: &str = "org.opencontainers.image.enc.keys.jwe";
const PKCS7: &str = "org.opencontainers.image.enc.keys.pkcs7";
const PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";

fn chain() -> &'static Chain {
    static CHAIN: OnceLock<(tempfile::TempDir, Chain)> = OnceLock::new();
    let (_, chain) = CHAIN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("ec.pem", include_str!("../keys/ocicrypt/ec.pem")),
            ("rsa.pem", include_str!("../keys/ocicrypt/rsa.pem")),
            ("cert.pem", include_str!("../keys/ocicrypt/cert.pem")),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let keys = Decryption::Node(Keyring::new(dir.path()));
        let chain = Chain::new(vec![], keys).unwrap();
        (dir, chain)
    });
    chain
}

fn annotations(data: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match data.split_first() {
        Some((0, doc)) => drop(out.insert(JWE.to_string(), STANDARD.encode(doc))),
        Some((1, doc)) => drop(out.insert(PKCS7.to_string(), STANDARD.encode(doc))),
        Some((_, rest)) => {
            for (name, value) in [JWE, PKCS7, PUBOPTS]
                .into_iter()
                .zip(rest.split(|&b| b == 0))
            {
                out.insert(
                    name.to_string(),
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
        }
        None => {}
    }
    out
}

/// One input.
pub fn run(data: &[u8]) {
    let annotations = annotations(data);
    let layer = Layer {
        media_type: "application/vnd.oci.image.layer.v1.tar+encrypted",
        digest: "sha256:00",
        size: 64,
        annotations: &annotations,
    };
    let chain = chain();
    let checked = chain.check_access(&layer);
    match chain.open(&layer, Box::new(&[7; 64][..])) {
        Ok(mut stream) => {
            assert!(checked.is_ok());
            let _ = stream.read_to_end(&mut Vec::new());
        }
        Err(error) => drop(error.to_string()),
    }
}
