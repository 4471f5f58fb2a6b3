//! Image references, normalised the way docker/distribution (and so containerd) does:
//! `busybox` becomes `docker.io/library/busybox:latest`.
//!
//! Hand-written because no maintained crate implements the normalisation rules exactly
//! (oci-spec's parser accepts names containerd rejects and differs on Docker Hub paths).

use crate::digest::Digest;
use std::fmt;

/// The registry that short names resolve to.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Docker Hub's legacy index host; references naming it are normalised to [`DOCKER_HUB`].
const DOCKER_HUB_INDEX: &str = "index.docker.io";

/// Whether `host` is one of Docker Hub's names.
pub fn is_docker_hub(host: &str) -> bool {
    [DOCKER_HUB, DOCKER_HUB_API, DOCKER_HUB_INDEX].contains(&host)
}
const MAX_NAME: usize = 255;

/// A fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host, with port if any (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/busybox`).
    pub repository: String,
    /// Tag; always `None` when a digest is present (the digest wins, like containerd).
    pub tag: Option<String>,
    /// Manifest (or index) digest.
    pub digest: Option<Digest>,
}

/// Why a reference was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct InvalidReference {
    /// The text as given.
    pub reference: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Reference {
    /// Parses and normalises a reference; a name without tag or digest gets `:latest`.
    pub fn parse(text: &str) -> Result<Self, InvalidReference> {
        let fail = |reason| InvalidReference {
            reference: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(fail("empty"));
        }
        if is_hex64(text) {
            return Err(fail("a 64-digit hex string is an image id, not a name"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (
                rest,
                Some(Digest::parse(digest).map_err(|_| fail("digest is not sha256:<64 hex>"))?),
            ),
            None => (text, None),
        };
        let (name, tag) = split_tag(rest);
        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(fail("invalid tag"));
        }
        let (registry, repository) = split_registry(name);
        if !valid_host(&registry) {
            return Err(fail("invalid registry host"));
        }
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(fail("repository name must be lowercase"));
        }
        if !repository.split('/').all(valid_component) {
            return Err(fail("invalid repository name"));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME {
            return Err(fail("name longer than 255 characters"));
        }
        let tag = match (&digest, tag) {
            (Some(_), _) => None,
            (None, tag) => Some(tag.unwrap_or("latest").to_string()),
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`, the name that tags and digests attach to.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tag or digest a registry resolves, as used in `manifests/<this>`.
    pub fn object(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.as_str(),
            (None, Some(tag)) => tag,
            (None, None) => "latest",
        }
    }

    /// This name pinned to a digest: `registry/repository@digest`.
    pub fn with_digest(&self, digest: &Digest) -> String {
        format!("{}@{digest}", self.name())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn split_tag(text: &str) -> (&str, Option<&str>) {
    let last_slash = text.rfind('/').map_or(0, |i| i + 1);
    match text[last_slash..].rfind(':') {
        Some(i) => (&text[..last_slash + i], Some(&text[last_slash + i + 1..])),
        None => (text, None),
    }
}

fn split_registry(name: &str) -> (String, String) {
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    let registry = if registry == DOCKER_HUB_INDEX {
        DOCKER_HUB.to_string()
    } else {
        registry
    };
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    (registry, repository)
}

fn is_hex64(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(part: &str) -> bool {
    let bytes = part.as_bytes();
    if bytes.is_empty()
        || !bytes[0].is_ascii_alphanumeric()
        || !bytes[bytes.len() - 1].is_ascii_alphanumeric()
    {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_lowercase() || b.is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && matches!(bytes[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &part[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok || sep.is_empty() {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

fn valid_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => (name, Some(port)),
        _ => (host, None),
    };
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !name.is_empty()
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:9700f9a2f5bf4c3ab7c8c9d9b1f7e9a3c2b4d6e8f0a1b3c5d7e9f1a3b5c766bf";

    fn norm(text: &str) -> String {
        Reference::parse(text).unwrap().to_string()
    }

    #[test]
    fn normalises_like_containerd() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("library/busybox", "docker.io/library/busybox:latest"),
            ("index.docker.io/foo/bar", "docker.io/foo/bar:latest"),
            ("quay.io/a/b", "quay.io/a/b:latest"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("127.0.0.1:5000/a/b:v1", "127.0.0.1:5000/a/b:v1"),
            ("foo/bar", "docker.io/foo/bar:latest"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), want, "{input}");
        }
        assert_eq!(
            norm(&format!("busybox@{D}")),
            format!("docker.io/library/busybox@{D}")
        );
        assert_eq!(
            norm(&format!("busybox:1.36@{D}")),
            format!("docker.io/library/busybox@{D}")
        );
    }

    #[test]
    fn refuses_invalid_names() {
        for bad in [
            "",
            "docker.io/Library/x",
            "a::b",
            "UPPER",
            "x:",
            "x@sha256:short",
            "a//b",
            "-a",
            "a/b:-tag",
            "9700f9a2f5bf4c3ab7c8c9d9b1f7e9a3c2b4d6e8f0a1b3c5d7e9f1a3b5c766bf",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn object_is_digest_before_tag() {
        let r = Reference::parse(&format!("x:1@{D}")).unwrap();
        assert_eq!(r.object(), D);
        assert_eq!(Reference::parse("x:1").unwrap().object(), "1");
    }
}
