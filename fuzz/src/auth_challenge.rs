//! Fuzzes the two auth parsers of `imaged::registry::auth`: `parse_challenge`, which reads the
//! `WWW-Authenticate` header of any registry or mirror a pull contacts, and
//! `Credentials::from_auth`, which decodes the base64 `auth` field of a CRI `AuthConfig` sent
//! by the kubelet. Neither may panic, and decoded credentials must never show their secret
//! in `Debug` output.

use imaged::registry::auth::{AuthInput, Credentials, parse_challenge};

/// One input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_challenge(text);
    let input = AuthInput {
        auth: text,
        ..AuthInput::default()
    };
    match Credentials::from_auth(&input) {
        Ok(credentials) if text.is_empty() => assert_eq!(credentials, Credentials::Anonymous),
        Ok(credentials) => {
            assert!(matches!(credentials, Credentials::Basic { .. }));
            assert_eq!(format!("{credentials:?}"), "Basic(..)");
        }
        Err(error) => drop(error.to_string()),
    }
}
