//! Manifests, indexes and image configs (OCI and Docker schema2), parsed from untrusted
//! registry bytes, and the choice of this node's platform from an index.

use crate::digest::Digest;
use serde::Deserialize;
use std::collections::BTreeMap;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What we send in `Accept` when resolving.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
/// Largest manifest or index we read (containerd uses the same bound).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config we read.
pub const MAX_CONFIG: u64 = 32 << 20;

const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Why registry JSON was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid JSON of the expected shape.
    #[error("malformed {what} {digest}: {message}")]
    Malformed {
        /// manifest, index or config.
        what: &'static str,
        /// Digest of the document.
        digest: Digest,
        /// Parser message.
        message: String,
    },
    /// A media type we do not handle.
    #[error("unsupported media type {media_type:?} for {what} {digest}")]
    Unsupported {
        /// What carried it.
        what: &'static str,
        /// The media type.
        media_type: String,
        /// Digest of the object.
        digest: Digest,
    },
    /// The index has no manifest for this node.
    #[error("index {digest} has no manifest for platform {platform}")]
    NoPlatform {
        /// Index digest.
        digest: Digest,
        /// The platform looked for.
        platform: String,
    },
    /// The config's layer list does not fit the manifest.
    #[error("image config {digest} lists {diff_ids} diff_ids but the manifest has {layers} layers")]
    LayerCount {
        /// Config digest.
        digest: Digest,
        /// Number of diff_ids.
        diff_ids: usize,
        /// Number of layers.
        layers: usize,
    },
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the target.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the target.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Platform (index entries only).
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Platform of an index entry.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// GOARCH name.
    pub architecture: String,
    /// GOOS name.
    pub os: String,
    /// CPU variant.
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// Media type, when the document states it.
    pub media_type: Option<String>,
    /// The image config.
    pub config: Descriptor,
    /// Layers, base first.
    pub layers: Vec<Descriptor>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// Platform manifests.
    pub manifests: Vec<Descriptor>,
}

/// The parts of an image config the image service reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    /// Container defaults.
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    /// Layer diff IDs.
    pub rootfs: RootFs,
}

/// `config` section of the image config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerConfig {
    /// `USER`.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

/// `rootfs` section of the image config.
#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Uncompressed layer digests, base first.
    pub diff_ids: Vec<Digest>,
}

/// A fetched top-level document: either a manifest or an index.
#[derive(Debug, Clone)]
pub enum Document {
    /// Single-platform manifest.
    Manifest(Manifest),
    /// Multi-platform index.
    Index(Index),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
}

/// Parses a manifest or index, using the HTTP content type, else the document's own
/// `mediaType`, else its shape.
pub fn parse_document(
    content_type: Option<&str>,
    bytes: &[u8],
    digest: &Digest,
) -> Result<Document, ManifestError> {
    let malformed = |message: String| ManifestError::Malformed {
        what: "manifest",
        digest: digest.clone(),
        message,
    };
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let declared = probe.media_type.as_deref().or(content_type.and_then(|c| {
        let c = c.split(';').next().unwrap_or("").trim();
        (!c.is_empty() && c != "application/json" && c != "text/plain").then_some(c)
    }));
    let is_index = match declared {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        None => probe.manifests.is_some(),
        Some(other) => {
            return Err(ManifestError::Unsupported {
                what: "manifest",
                media_type: other.to_string(),
                digest: digest.clone(),
            });
        }
    };
    if probe.schema_version != Some(2) {
        return Err(malformed(format!(
            "schemaVersion {:?} is not 2 (Docker schema1 is not supported)",
            probe.schema_version
        )));
    }
    if is_index {
        let index = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        return Ok(Document::Index(index));
    }
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    if !CONFIG_TYPES.contains(&manifest.config.media_type.as_str()) {
        return Err(ManifestError::Unsupported {
            what: "config",
            media_type: manifest.config.media_type.clone(),
            digest: manifest.config.digest.clone(),
        });
    }
    Ok(Document::Manifest(manifest))
}

/// Refuses a manifest with a layer no processor chain turns into tar, before anything of it
/// is downloaded.
pub fn check_layer_types(
    manifest: &Manifest,
    accepts: impl Fn(&str) -> bool,
) -> Result<(), ManifestError> {
    match manifest.layers.iter().find(|l| !accepts(&l.media_type)) {
        Some(layer) => Err(ManifestError::Unsupported {
            what: "layer",
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
        }),
        None => Ok(()),
    }
}

/// Parses an image config and checks it against its manifest.
pub fn parse_config(
    bytes: &[u8],
    digest: &Digest,
    manifest: &Manifest,
) -> Result<ImageConfig, ManifestError> {
    let config: ImageConfig =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            what: "config",
            digest: digest.clone(),
            message: e.to_string(),
        })?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(ManifestError::LayerCount {
            digest: digest.clone(),
            diff_ids: config.rootfs.diff_ids.len(),
            layers: manifest.layers.len(),
        });
    }
    Ok(config)
}

/// The platform this node runs: `os/arch[/variant]` in OCI (GOARCH) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlatform {
    /// `linux`.
    pub os: &'static str,
    /// `amd64`, `arm64`...
    pub architecture: &'static str,
    /// `v8` on arm64.
    pub variant: Option<&'static str>,
}

impl HostPlatform {
    /// The platform of this build.
    pub fn current() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "x86" => ("386", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Self {
            os: "linux",
            architecture,
            variant,
        }
    }

    fn matches(&self, platform: &Platform) -> bool {
        if platform.os != self.os || platform.architecture != self.architecture {
            return false;
        }
        match (self.variant, platform.variant.as_deref()) {
            (_, None | Some("")) => true,
            (Some(want), Some(got)) => want == got,
            (None, Some(_)) => false,
        }
    }

    /// Picks this platform's manifest from an index: an exact variant beats an entry
    /// without variant; the first match in index order wins.
    pub fn select<'a>(
        &self,
        index: &'a Index,
        digest: &Digest,
    ) -> Result<&'a Descriptor, ManifestError> {
        let candidates = || {
            index
                .manifests
                .iter()
                .filter(|d| d.platform.as_ref().is_some_and(|p| self.matches(p)))
        };
        let exact = candidates()
            .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_deref()) == self.variant);
        exact
            .or_else(|| candidates().next())
            .ok_or_else(|| ManifestError::NoPlatform {
                digest: digest.clone(),
                platform: self.to_string(),
            })
    }
}

impl std::fmt::Display for HostPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// `uid` and `username` for CRI from a config's `User` (text before the first `:`).
pub fn user_of(config: &ImageConfig) -> (Option<i64>, String) {
    let user = config
        .config
        .as_ref()
        .and_then(|c| c.user.as_deref())
        .unwrap_or("");
    let name = user.split(':').next().unwrap_or("");
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        Digest::of(b"x")
    }

    fn index_json(platforms: &[(&str, &str, Option<&str>)]) -> Index {
        let entries: Vec<String> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let variant = variant.map_or(String::new(), |v| format!(",\"variant\":\"{v}\""));
                format!(
                    "{{\"mediaType\":\"{OCI_MANIFEST}\",\"digest\":\"{}\",\"size\":1,\"platform\":{{\"os\":\"{os}\",\"architecture\":\"{arch}\"{variant}}}}}",
                    Digest::of(&[i as u8])
                )
            })
            .collect();
        let text = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_INDEX}\",\"manifests\":[{}]}}",
            entries.join(",")
        );
        match parse_document(None, text.as_bytes(), &digest()).unwrap() {
            Document::Index(i) => i,
            Document::Manifest(_) => panic!("index parsed as manifest"),
        }
    }

    #[test]
    fn selects_amd64_and_arm64_v8() {
        let index = index_json(&[
            ("linux", "arm64", Some("v8")),
            ("linux", "amd64", None),
            ("unknown", "unknown", None),
        ]);
        let amd64 = HostPlatform {
            os: "linux",
            architecture: "amd64",
            variant: None,
        };
        let arm64 = HostPlatform {
            os: "linux",
            architecture: "arm64",
            variant: Some("v8"),
        };
        assert_eq!(
            amd64.select(&index, &digest()).unwrap().digest,
            Digest::of(&[1])
        );
        assert_eq!(
            arm64.select(&index, &digest()).unwrap().digest,
            Digest::of(&[0])
        );
        let s390 = HostPlatform {
            os: "linux",
            architecture: "s390x",
            variant: None,
        };
        assert!(matches!(
            s390.select(&index, &digest()),
            Err(ManifestError::NoPlatform { .. })
        ));
    }

    #[test]
    fn refuses_schema1_garbage_and_unknown_layer_types() {
        let schema1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
        assert!(parse_document(None, schema1, &digest()).is_err());
        assert!(parse_document(None, b"{not json", &digest()).is_err());
        let odd_layer = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":2}},"layers":[{{"mediaType":"application/x-rar","digest":"{d}","size":3}}]}}"#,
            d = digest()
        );
        let Document::Manifest(manifest) =
            parse_document(None, odd_layer.as_bytes(), &digest()).unwrap()
        else {
            panic!("a manifest");
        };
        let builtin = processors::Chain::builtin();
        let err = check_layer_types(&manifest, |t| builtin.accepts(t)).unwrap_err();
        assert!(err.to_string().contains("application/x-rar"), "{err}");
    }

    #[test]
    fn user_split_follows_cri() {
        let cfg = |user: &str| ImageConfig {
            config: Some(ContainerConfig {
                user: Some(user.into()),
            }),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: vec![],
            },
        };
        assert_eq!(user_of(&cfg("")), (None, String::new()));
        assert_eq!(user_of(&cfg("1002")), (Some(1002), String::new()));
        assert_eq!(user_of(&cfg("www-data")), (None, "www-data".into()));
        assert_eq!(user_of(&cfg("1003:users")), (Some(1003), String::new()));
        assert_eq!(user_of(&cfg("www-data:users")), (None, "www-data".into()));
    }
}
