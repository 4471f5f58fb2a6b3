//! Content digests: only `sha256:<64 lower-case hex>` is accepted, because digests from
//! registries and manifests end up in file names and must never carry a path.

use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;

/// A validated `sha256:<hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Digest(String);

/// Why a digest string was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
pub struct InvalidDigest(pub String);

impl Digest {
    /// Parses and validates `sha256:<64 lower-case hex>`.
    pub fn parse(text: &str) -> Result<Self, InvalidDigest> {
        let valid = text.strip_prefix("sha256:").is_some_and(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if valid {
            Ok(Self(text.to_string()))
        } else {
            Err(InvalidDigest(text.to_string()))
        }
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(data))
    }

    /// The digest a finished hasher computed.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("sha256:{}", hex::encode(hasher.finalize())))
    }

    /// The hex part, used as a file name.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The full `sha256:<hex>` text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Digest::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Chain IDs per the OCI image spec: `c0 = d0`, `cN = sha256(c(N-1) + " " + dN)`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chains: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chains.last() {
            None => diff_id.clone(),
            Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()),
        };
        chains.push(next);
    }
    chains
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(hex: &str) -> Digest {
        Digest::parse(&format!("sha256:{hex}")).unwrap()
    }

    #[test]
    fn chain_ids_match_the_image_spec_vectors() {
        let diffs = [
            d("c6f988f4874bb0add23a778f753c65efe992244e148a1d2ec2a8b664fb66bbd1"),
            d("5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"),
            d("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        ];
        let chains = chain_ids(&diffs);
        assert_eq!(chains[0], diffs[0]);
        assert_eq!(
            chains[1],
            d("c3191d32a37d7159b2e30830937d2e30268ad6c375a773a8994911a3aba9b93f")
        );
        assert_eq!(
            chains[2],
            d("6f0a0696263337b2d736479620d499fcbfdcaabd531638e8a7591dacf9797635")
        );
    }

    #[test]
    fn hostile_digests_are_refused() {
        for bad in [
            "sha256:../../etc/passwd",
            "sha256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
            "sha512:0000",
            "",
            "sha256:",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }
}
