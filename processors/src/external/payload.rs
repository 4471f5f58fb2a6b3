//! The fd 3 payload containerd's CRI plugin hands the ocicrypt decoders.
//!
//! A protobuf `google.protobuf.Any` whose value is the JSON of imgcrypt's `Payload`: no
//! decryption parameters (the decoder reads its own keys directory) and the encrypted
//! layer's descriptor.

use std::collections::BTreeMap;

use prost::Message;
use serde::Serialize;

use crate::Layer;

/// Processor IDs that get a payload; an unmodified `ctd-decoder` needs one.
const DECODERS: [&str; 3] = [
    "io.containerd.ocicrypt.decoder.v1.tar",
    "io.containerd.ocicrypt.decoder.v1.tar.gzip",
    "io.containerd.ocicrypt.decoder.v1.tar.zstd",
];

/// The type URL imgcrypt registers its payload under.
const PAYLOAD_TYPE_URL: &str = "io.containerd.ocicrypt.v1.Payload";

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Payload<'a> {
    decrypt_config: DecryptConfig,
    descriptor: Descriptor<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DecryptConfig {
    /// Always null: the node key model passes no keys.
    parameters: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor<'a> {
    media_type: &'a str,
    digest: &'a str,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

/// The fd 3 payload for the processor `name` and this layer, if containerd sends one.
pub(crate) fn payload_for(name: &str, layer: &Layer<'_>) -> Option<Vec<u8>> {
    if !DECODERS.contains(&name) {
        return None;
    }
    let payload = Payload {
        decrypt_config: DecryptConfig { parameters: None },
        descriptor: Descriptor {
            media_type: layer.media_type,
            digest: layer.digest,
            size: layer.size,
            annotations: layer.annotations,
        },
    };
    let any = Any {
        type_url: PAYLOAD_TYPE_URL.to_string(),
        value: serde_json::to_vec(&payload).expect("the payload serializes to JSON"),
    };
    Some(any.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(annotations: &BTreeMap<String, String>) -> Layer<'_> {
        Layer {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            digest: "sha256:abcd",
            size: 142,
            annotations,
        }
    }

    /// `0x0A <len> type_url 0x12 <len> json`, lengths as varints.
    fn expected_bytes(json: &str) -> Vec<u8> {
        let mut bytes = vec![0x0A, PAYLOAD_TYPE_URL.len() as u8];
        bytes.extend_from_slice(PAYLOAD_TYPE_URL.as_bytes());
        bytes.push(0x12);
        let mut len = json.len();
        while len >= 0x80 {
            bytes.push((len as u8 & 0x7F) | 0x80);
            len >>= 7;
        }
        bytes.push(len as u8);
        bytes.extend_from_slice(json.as_bytes());
        bytes
    }

    #[test]
    fn the_decoder_payload_has_the_documented_layout() {
        let annotations = BTreeMap::from([
            (
                "org.opencontainers.image.enc.pubopts".to_string(),
                "eyJjaXBoZXIiOiJBRVNfMjU2X0NUUl9ITUFDX1NIQTI1NiJ9".to_string(),
            ),
            (
                "org.opencontainers.image.enc.keys.jwe".to_string(),
                "ZXlKaGJHY2lPaUpTVTBFdFQwRkZVQ0o5".repeat(4),
            ),
        ]);
        let json = format!(
            concat!(
                r#"{{"DecryptConfig":{{"Parameters":null}},"#,
                r#""Descriptor":{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip+encrypted","#,
                r#""digest":"sha256:abcd","size":142,"annotations":{{"#,
                r#""org.opencontainers.image.enc.keys.jwe":"{}","#,
                r#""org.opencontainers.image.enc.pubopts":"eyJjaXBoZXIiOiJBRVNfMjU2X0NUUl9ITUFDX1NIQTI1NiJ9"}}}}}}"#
            ),
            "ZXlKaGJHY2lPaUpTVTBFdFQwRkZVQ0o5".repeat(4)
        );
        assert!(json.len() > 0x7F, "the length needs a two-byte varint");
        let bytes = payload_for(
            "io.containerd.ocicrypt.decoder.v1.tar.gzip",
            &layer(&annotations),
        );
        assert_eq!(bytes.unwrap(), expected_bytes(&json));
    }

    #[test]
    fn empty_annotations_are_left_out() {
        let annotations = BTreeMap::new();
        let json = concat!(
            r#"{"DecryptConfig":{"Parameters":null},"#,
            r#""Descriptor":{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip+encrypted","#,
            r#""digest":"sha256:abcd","size":142}}"#
        );
        for name in DECODERS {
            assert_eq!(
                payload_for(name, &layer(&annotations)).unwrap(),
                expected_bytes(json),
                "{name}"
            );
        }
    }

    #[test]
    fn other_processors_get_no_payload() {
        let annotations = BTreeMap::new();
        assert_eq!(payload_for("unzstd", &layer(&annotations)), None);
        assert_eq!(
            payload_for(
                "io.containerd.ocicrypt.decoder.v1.tar.xz",
                &layer(&annotations)
            ),
            None
        );
    }
}
