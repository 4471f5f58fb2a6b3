//! PKCS#7 (CMS EnvelopedData) key wrapping, read by walking the DER: the content-encryption
//! parameters ocicrypt writes are not valid GCMParameters, so typed CMS parsers refuse them.

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{AesGcm, Nonce};
use der::Decode;
use sha1::Sha1;

use super::keys::{Keys, PrivateKey};

const ENVELOPED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03];
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const RSAES_OAEP: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x07];
const AES_GCM_PREFIX: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01];

/// Deepest nesting the walker follows; real messages need about eight levels.
const MAX_DEPTH: usize = 32;

/// One tag-length-value element.
#[derive(Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    /// The whole element, header included (DER only; used to compare names).
    raw: &'a [u8],
}

impl<'a> Tlv<'a> {
    fn constructed(&self) -> bool {
        self.tag & 0x20 != 0
    }

    /// The elements inside a constructed element.
    fn children(&self, depth: usize) -> Result<Vec<Tlv<'a>>, String> {
        let mut input = self.content;
        let mut out = Vec::new();
        while !input.is_empty() {
            out.push(read(&mut input, depth + 1)?);
        }
        Ok(out)
    }
}

fn bad(what: &str) -> String {
    format!("PKCS#7: {what}")
}

/// Reads one element from the front of `input`; BER indefinite lengths are accepted.
fn read<'a>(input: &mut &'a [u8], depth: usize) -> Result<Tlv<'a>, String> {
    if depth > MAX_DEPTH {
        return Err(bad("nested too deeply"));
    }
    let start = *input;
    let (&tag, rest) = input.split_first().ok_or_else(|| bad("truncated"))?;
    if tag & 0x1f == 0x1f {
        return Err(bad("multi-byte tags are not supported"));
    }
    let (&first, mut rest) = rest.split_first().ok_or_else(|| bad("truncated"))?;
    let content;
    if first == 0x80 {
        if tag & 0x20 == 0 {
            return Err(bad("indefinite length on a primitive element"));
        }
        let body = rest;
        loop {
            if rest.starts_with(&[0, 0]) {
                content = &body[..body.len() - rest.len()];
                rest = &rest[2..];
                break;
            }
            read(&mut rest, depth + 1)?;
        }
    } else {
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count > 4 || rest.len() < count {
                return Err(bad("bad length"));
            }
            let (bytes, after) = rest.split_at(count);
            rest = after;
            bytes.iter().fold(0, |n, &b| (n << 8) | usize::from(b))
        };
        if rest.len() < len {
            return Err(bad("truncated"));
        }
        (content, rest) = rest.split_at(len);
    }
    *input = rest;
    Ok(Tlv {
        tag,
        content,
        raw: &start[..start.len() - input.len()],
    })
}

/// A recipient the content key was encrypted for, named by certificate issuer and serial.
struct KeyTrans {
    issuer: Vec<u8>,
    serial: Vec<u8>,
    oaep: bool,
    encrypted_key: Vec<u8>,
}

/// A parsed EnvelopedData with AES-GCM content.
pub(crate) struct Envelope {
    recipients: Vec<KeyTrans>,
    key_len: usize,
    nonce: Vec<u8>,
    /// GCM ciphertext followed by its 16-byte tag.
    sealed: Vec<u8>,
}

/// Parses a DER (or BER) ContentInfo holding EnvelopedData.
pub(crate) fn parse(data: &[u8]) -> Result<Envelope, String> {
    let mut input = data;
    let info = read(&mut input, 0)?;
    let [oid, explicit] = sequence(&info, 0, "ContentInfo")?[..] else {
        return Err(bad("ContentInfo has the wrong shape"));
    };
    if oid.tag != 0x06 || oid.content != ENVELOPED_DATA {
        return Err(bad("not EnvelopedData"));
    }
    let [enveloped] = explicit.children(1)?[..] else {
        return Err(bad("EnvelopedData missing"));
    };
    let fields = sequence(&enveloped, 2, "EnvelopedData")?;
    let rest: Vec<_> = fields
        .iter()
        .skip(1)
        .filter(|f| f.tag != 0xa0 && f.tag != 0xa1)
        .collect();
    let [set, content_info, ..] = rest[..] else {
        return Err(bad("EnvelopedData has the wrong shape"));
    };
    if set.tag != 0x31 {
        return Err(bad("recipientInfos is not a SET"));
    }
    let recipients = set
        .children(3)?
        .iter()
        .filter_map(|r| key_trans(r, 4).transpose())
        .collect::<Result<_, _>>()?;
    let (key_len, nonce, sealed) = encrypted_content(content_info, 3)?;
    Ok(Envelope {
        recipients,
        key_len,
        nonce,
        sealed,
    })
}

fn sequence<'a>(tlv: &Tlv<'a>, depth: usize, what: &str) -> Result<Vec<Tlv<'a>>, String> {
    if tlv.tag != 0x30 {
        return Err(bad(&format!("{what} is not a SEQUENCE")));
    }
    tlv.children(depth)
}

/// A KeyTransRecipientInfo by issuer and serial; other recipient kinds give `None`.
fn key_trans(tlv: &Tlv<'_>, depth: usize) -> Result<Option<KeyTrans>, String> {
    if tlv.tag != 0x30 {
        return Ok(None);
    }
    let [_, rid, alg, key, ..] = tlv.children(depth)?[..] else {
        return Err(bad("RecipientInfo has the wrong shape"));
    };
    if rid.tag != 0x30 {
        return Ok(None);
    }
    let [issuer, serial] = rid.children(depth + 1)?[..] else {
        return Err(bad("IssuerAndSerialNumber has the wrong shape"));
    };
    let alg_oid = sequence(&alg, depth + 1, "key algorithm")?
        .first()
        .map(|o| o.content)
        .unwrap_or_default();
    if key.tag != 0x04 || serial.tag != 0x02 {
        return Err(bad("RecipientInfo has the wrong shape"));
    }
    Ok(Some(KeyTrans {
        issuer: issuer.raw.to_vec(),
        serial: serial.content.to_vec(),
        oaep: alg_oid == RSAES_OAEP,
        encrypted_key: if alg_oid == RSA_ENCRYPTION || alg_oid == RSAES_OAEP {
            key.content.to_vec()
        } else {
            Vec::new()
        },
    }))
}

/// The AES key length, GCM nonce and sealed content of an EncryptedContentInfo.
fn encrypted_content(tlv: &Tlv<'_>, depth: usize) -> Result<(usize, Vec<u8>, Vec<u8>), String> {
    let fields = sequence(tlv, depth, "EncryptedContentInfo")?;
    let [_, alg, ..] = fields[..] else {
        return Err(bad("EncryptedContentInfo has the wrong shape"));
    };
    let alg = sequence(&alg, depth + 1, "content algorithm")?;
    let oid = alg.first().map(|o| o.content).unwrap_or_default();
    let key_len = match oid.strip_prefix(AES_GCM_PREFIX) {
        Some([6]) => 16,
        Some([26]) => 24,
        Some([46]) => 32,
        _ => return Err(bad("content encryption is not AES-GCM")),
    };
    let params = alg
        .get(1)
        .ok_or_else(|| bad("AES-GCM parameters missing"))?;
    let nonce = gcm_nonce(params, depth + 2)?;
    let content = fields
        .iter()
        .find(|f| f.tag & 0x1f == 0 && f.tag & 0xc0 == 0x80)
        .ok_or_else(|| bad("encrypted content missing"))?;
    let mut sealed = Vec::new();
    octets(content, depth + 1, &mut sealed)?;
    Ok((key_len, nonce, sealed))
}

/// The nonce of GCM parameters, standard (`SEQUENCE { OCTET STRING, INTEGER }`) or as
/// ocicrypt writes them (a primitive wrapper around a SEQUENCE whose nonce is tagged [4]).
fn gcm_nonce(params: &Tlv<'_>, depth: usize) -> Result<Vec<u8>, String> {
    let sequence = match params.tag {
        0x30 => *params,
        0x10 => {
            let mut inner = params.content;
            read(&mut inner, depth + 1)?
        }
        _ => return Err(bad("AES-GCM parameters have the wrong shape")),
    };
    let fields = sequence.children(depth + 1)?;
    let icv_len = fields.get(1).map(|f| f.content);
    if icv_len.is_some_and(|len| len != [16]) {
        return Err(bad("only 16-byte GCM tags are supported"));
    }
    match fields.first() {
        Some(nonce) if (nonce.tag == 0x04 || nonce.tag == 0x84) && nonce.content.len() == 12 => {
            Ok(nonce.content.to_vec())
        }
        _ => Err(bad("AES-GCM nonce is not 12 bytes")),
    }
}

/// Appends the content octets of an OCTET STRING, primitive or in constructed chunks.
fn octets(tlv: &Tlv<'_>, depth: usize, out: &mut Vec<u8>) -> Result<(), String> {
    if !tlv.constructed() {
        out.extend_from_slice(tlv.content);
        return Ok(());
    }
    for chunk in tlv.children(depth)? {
        octets(&chunk, depth + 1, out)?;
    }
    Ok(())
}

/// The issuer name as text, for messages.
fn issuer_name(raw: &[u8]) -> String {
    x509_cert::name::Name::from_der(raw)
        .map_or_else(|_| "(unreadable)".to_string(), |n| n.to_string())
}

impl Envelope {
    /// The recipients, e.g. `RSA, issuer CN=node, serial 0a`.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.recipients
            .iter()
            .map(|r| {
                format!(
                    "RSA, issuer {}, serial {}",
                    issuer_name(&r.issuer),
                    hex::encode(&r.serial)
                )
            })
            .collect()
    }

    /// The plaintext (the private options), if a recipient has both its certificate and its
    /// private key on the node.
    pub(crate) fn decrypt(&self, keys: &Keys) -> Result<Vec<u8>, String> {
        if keys.certs.is_empty() {
            return Err("no x509 certificates found needed for PKCS7 decryption".to_string());
        }
        let mut reasons = Vec::new();
        for recipient in &self.recipients {
            match self.decrypt_for(recipient, keys) {
                Ok(plain) => return Ok(plain),
                Err(why) => reasons.push(why),
            }
        }
        if reasons.is_empty() {
            reasons.push("no RSA key transport recipient".to_string());
        }
        Err(reasons.join("; "))
    }

    fn decrypt_for(&self, recipient: &KeyTrans, keys: &Keys) -> Result<Vec<u8>, String> {
        let name = || {
            format!(
                "issuer {} serial {}",
                issuer_name(&recipient.issuer),
                hex::encode(&recipient.serial)
            )
        };
        let certs: Vec<_> = keys
            .certs
            .iter()
            .filter(|c| c.issuer == recipient.issuer && c.serial == recipient.serial)
            .collect();
        if certs.is_empty() {
            return Err(format!("no certificate for {}", name()));
        }
        let candidates = keys.keys.iter().filter_map(|k| match &k.key {
            PrivateKey::Rsa(rsa) if certs.iter().any(|c| c.matches(rsa)) => Some(rsa),
            _ => None,
        });
        let mut found = false;
        for rsa in candidates {
            found = true;
            if let Some(plain) = self.open(recipient, rsa) {
                return Ok(plain);
            }
        }
        Err(match found {
            false => format!(
                "certificate {} ({}) is on the node, its private key is not",
                certs[0].path.display(),
                name()
            ),
            true => format!("the key of {} does not decrypt it", name()),
        })
    }

    fn open(&self, recipient: &KeyTrans, rsa: &rsa::PrivateKey) -> Option<Vec<u8>> {
        let key = if recipient.oaep {
            rsa.decrypt(rsa::Oaep::<Sha1>::new(), &recipient.encrypted_key)
        } else {
            rsa.decrypt(rsa::Pkcs1v15Encrypt, &recipient.encrypted_key)
        }
        .ok()?;
        // PKCS#1 v1.5 decryption never fails visibly (implicit rejection): a wrong key yields
        // random bytes, which the length check or the GCM tag then refuses.
        if key.len() != self.key_len {
            return None;
        }
        let nonce = <&Nonce<U12>>::try_from(&self.nonce[..]).ok()?;
        let sealed = &self.sealed[..];
        match self.key_len {
            16 => AesGcm::<aes::Aes128, U12>::new_from_slice(&key)
                .ok()?
                .decrypt(nonce, sealed),
            24 => AesGcm::<aes::Aes192, U12>::new_from_slice(&key)
                .ok()?
                .decrypt(nonce, sealed),
            _ => AesGcm::<aes::Aes256, U12>::new_from_slice(&key)
                .ok()?
                .decrypt(nonce, sealed),
        }
        .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definite_and_indefinite_lengths_are_read() {
        let mut input = &[0x30, 0x03, 0x04, 0x01, 0xaa, 0xff][..];
        let tlv = read(&mut input, 0).unwrap();
        assert_eq!(tlv.content, [0x04, 0x01, 0xaa]);
        assert_eq!(input, [0xff]);
        let mut input = &[0x30, 0x80, 0x04, 0x01, 0xaa, 0x00, 0x00][..];
        let tlv = read(&mut input, 0).unwrap();
        assert_eq!(tlv.children(0).unwrap()[0].content, [0xaa]);
        assert!(input.is_empty());
    }

    #[test]
    fn malformed_encodings_are_errors() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x05, 0x00],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x04, 0x80, 0x00, 0x00],
            &[0x30, 0x80, 0x04, 0x01],
            &[0x1f, 0x01, 0x00],
        ] {
            assert!(read(&mut &bad[..], 0).is_err(), "{bad:02x?}");
        }
        let deep: Vec<u8> = std::iter::repeat_n([0x30, 0x80], 100).flatten().collect();
        assert!(read(&mut &deep[..], 0).is_err());
    }

    #[test]
    fn ocicrypt_gcm_parameters_and_standard_ones_give_the_nonce() {
        let nonce = [7; 12];
        let mut odd = vec![0x10, 0x13, 0x30, 0x11, 0x84, 0x0c];
        odd.extend(nonce);
        odd.extend([0x02, 0x01, 0x10]);
        let mut standard = vec![0x30, 0x11, 0x04, 0x0c];
        standard.extend(nonce);
        standard.extend([0x02, 0x01, 0x10]);
        for params in [odd, standard] {
            let tlv = read(&mut &params[..], 0).unwrap();
            assert_eq!(gcm_nonce(&tlv, 0).unwrap(), nonce);
        }
        let short = [0x30, 0x05, 0x04, 0x03, 1, 2, 3];
        let tlv = read(&mut &short[..], 0).unwrap();
        assert!(gcm_nonce(&tlv, 0).is_err());
    }

    #[test]
    fn other_content_is_refused() {
        // ContentInfo of id-data.
        let data = [
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01, 0xa0,
            0x00,
        ];
        assert_eq!(parse(&data).err().unwrap(), "PKCS#7: not EnvelopedData");
    }
}
