//! Registry credentials and `WWW-Authenticate` challenges.
//!
//! The challenge parser is hand-written: the header grammar (RFC 7235 auth-params with
//! quoted strings) is small, and the crates that parse it pull in whole HTTP stacks.

use base64::Engine as _;

/// Credentials a pull may use, from the CRI `AuthConfig`.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials.
    #[default]
    Anonymous,
    /// User name and password (HTTP basic, or sent to a token realm).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// An OAuth2 refresh token (`identity_token`).
    Identity(String),
    /// A bearer token sent as is (`registry_token`).
    Token(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret, even in debug logs.
        f.write_str(match self {
            Self::Anonymous => "Anonymous",
            Self::Basic { .. } => "Basic(..)",
            Self::Identity(_) => "Identity(..)",
            Self::Token(_) => "Token(..)",
        })
    }
}

/// The CRI `auth` field could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("invalid auth config: {0}")]
pub struct InvalidAuth(pub &'static str);

/// The fields of a CRI `AuthConfig`, as plain strings.
#[derive(Debug, Default, Clone)]
pub struct AuthInput<'a> {
    /// `username`.
    pub username: &'a str,
    /// `password`.
    pub password: &'a str,
    /// `auth`: base64 of `user:password`.
    pub auth: &'a str,
    /// `identity_token`.
    pub identity_token: &'a str,
    /// `registry_token`.
    pub registry_token: &'a str,
}

impl Credentials {
    /// Decodes an AuthConfig the way containerd does: username/password first, then
    /// `auth`, then the identity token; a registry token is used as a bearer token.
    pub fn from_auth(input: &AuthInput<'_>) -> Result<Self, InvalidAuth> {
        if !input.username.is_empty() {
            return Ok(Self::Basic {
                username: input.username.into(),
                password: input.password.into(),
            });
        }
        if !input.auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(input.auth.trim())
                .map_err(|_| InvalidAuth("auth is not valid base64"))?;
            let text = String::from_utf8(decoded).map_err(|_| InvalidAuth("auth is not UTF-8"))?;
            let (username, password) = text
                .split_once(':')
                .ok_or(InvalidAuth("auth does not hold user:password"))?;
            return Ok(Self::Basic {
                username: username.into(),
                password: password.trim_end_matches('\0').into(),
            });
        }
        if !input.identity_token.is_empty() {
            return Ok(Self::Identity(input.identity_token.into()));
        }
        if !input.registry_token.is_empty() {
            return Ok(Self::Token(input.registry_token.into()));
        }
        Ok(Self::Anonymous)
    }
}

/// One parsed challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=...`.
    Basic,
    /// `Bearer realm=...,service=...,scope=...`.
    Bearer {
        /// Token endpoint.
        realm: String,
        /// `service` parameter, if any.
        service: Option<String>,
        /// `scope` parameter, if any.
        scope: Option<String>,
        /// `error` parameter (e.g. `insufficient_scope`).
        error: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value; `None` for schemes we do not speak.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    let params = parse_params(rest)?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
            error: get("error"),
        });
    }
    None
}

fn parse_params(text: &str) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(params);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') || key.is_empty() {
            return None;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_style_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull",error="insufficient_scope""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
                error: Some("insufficient_scope".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn auth_field_decodes_like_containerd() {
        let creds = Credentials::from_auth(&AuthInput {
            auth: "dXNlcjpwYXNzAAA=",
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            creds,
            Credentials::Basic {
                username: "user".into(),
                password: "pass".into()
            }
        );
        for bad in ["!!!", "bm9jb2xvbg=="] {
            assert!(
                Credentials::from_auth(&AuthInput {
                    auth: bad,
                    ..Default::default()
                })
                .is_err(),
                "{bad}"
            );
        }
        assert_eq!(format!("{creds:?}"), "Basic(..)");
    }
}
