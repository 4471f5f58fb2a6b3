//! Fuzzes the registry JSON that a pull reads before anything is verified against a
//! manifest's own contents: `imaged::manifest::parse_document` (manifests and indexes),
//! `parse_config` with `user_of` for the image config a manifest names, and
//! `HostPlatform::current().select` for the platform choice in an index. None may panic.
//!
//! Input layout: the first byte picks the HTTP content type the registry claimed; the rest up
//! to the first NUL byte is the manifest or index, and what follows the NUL is the image
//! config (the document itself when there is no NUL). JSON text never holds a raw NUL, so the
//! split costs no valid document.

use imaged::digest::Digest;
use imaged::manifest::{
    DOCKER_LIST, DOCKER_MANIFEST, Document, HostPlatform, OCI_INDEX, OCI_MANIFEST, parse_config,
    parse_document, user_of,
};

/// What registries send as `Content-Type`: nothing, each supported type, and the generic
/// types that make the parser fall back to the document's own `mediaType` or shape.
const CONTENT_TYPES: [Option<&str>; 8] = [
    None,
    Some(OCI_MANIFEST),
    Some(OCI_INDEX),
    Some(DOCKER_MANIFEST),
    Some(DOCKER_LIST),
    Some("application/json"),
    Some("text/plain; charset=utf-8"),
    Some("application/octet-stream"),
];

/// One input.
pub fn run(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    let (document, config) = match rest.iter().position(|&b| b == 0) {
        Some(nul) => (&rest[..nul], &rest[nul + 1..]),
        None => (rest, rest),
    };
    let digest = Digest::of(document);
    match parse_document(content_type, document, &digest) {
        Ok(Document::Manifest(manifest)) => {
            match parse_config(config, &Digest::of(config), &manifest) {
                Ok(image) => {
                    assert_eq!(image.rootfs.diff_ids.len(), manifest.layers.len());
                    let _ = user_of(&image);
                }
                Err(error) => drop(error.to_string()),
            }
        }
        Ok(Document::Index(index)) => {
            let host = HostPlatform::current();
            match host.select(&index, &digest) {
                Ok(chosen) => {
                    let platform = chosen
                        .platform
                        .as_ref()
                        .expect("a selected manifest has a platform");
                    assert_eq!(platform.os, host.os);
                    assert_eq!(platform.architecture, host.architecture);
                }
                Err(error) => drop(error.to_string()),
            }
        }
        Err(error) => drop(error.to_string()),
    }
}
