//! Layers encrypted by real skopeo, with keys made by real openssl, decrypted through
//! [`Chain`]. Both tools must be installed: the tests fail, never skip, without them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use fixtures::keys::{KeyPair, certificate, export, key_pair};
use fixtures::tool::run_args;
use processors::{Chain, Decryption, Error, Keyring, Layer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tar_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn write_blob(layout: &Path, data: &[u8]) -> Value {
    let digest = sha256(data);
    let hex = digest.strip_prefix("sha256:").unwrap();
    fs::write(layout.join("blobs/sha256").join(hex), data).unwrap();
    json!({"digest": digest, "size": data.len()})
}

/// An OCI layout with tag `v1` holding gzip layers of these tars.
fn image(layout: &Path, tars: &[Vec<u8>]) {
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut layers = Vec::new();
    for tar in tars {
        let mut layer = write_blob(layout, &gzip(tar));
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        layers.push(layer);
    }
    let diff_ids: Vec<_> = tars.iter().map(|t| sha256(t)).collect();
    let config = json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let mut config = write_blob(layout, config.to_string().as_bytes());
    config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": layers});
    let mut manifest = write_blob(layout, manifest.to_string().as_bytes());
    manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    manifest["annotations"] = json!({"org.opencontainers.image.ref.name": "v1"});
    let index = json!({"schemaVersion": 2, "manifests": [manifest]});
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
}

/// A layer of an image as read back from its layout.
struct Blob {
    media_type: String,
    digest: String,
    annotations: BTreeMap<String, String>,
    data: Vec<u8>,
    diff_id: String,
}

fn read_json(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&read_blob(layout, digest)).unwrap()
}

fn read_blob(layout: &Path, digest: &str) -> Vec<u8> {
    fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap()
}

fn layers(layout: &Path) -> Vec<Blob> {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = read_json(layout, index["manifests"][0]["digest"].as_str().unwrap());
    let config = read_json(layout, manifest["config"]["digest"].as_str().unwrap());
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    layers
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            let digest = layer["digest"].as_str().unwrap().to_string();
            Blob {
                media_type: layer["mediaType"].as_str().unwrap().to_string(),
                annotations: serde_json::from_value(layer["annotations"].clone())
                    .unwrap_or_default(),
                data: read_blob(layout, &digest),
                digest,
                diff_id: diff_id.as_str().unwrap().to_string(),
            }
        })
        .collect()
}

/// The test's scratch space: a plain image, and skopeo to encrypt it.
struct Fixture {
    dir: tempfile::TempDir,
    tars: Vec<Vec<u8>>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tars = vec![
            tar_layer(&[("etc/hello", b"hello from layer one\n")]),
            tar_layer(&[("usr/share/data", &b"0123456789".repeat(5000))]),
        ];
        image(&dir.path().join("plain"), &tars);
        Self { dir, tars }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn keys_dir(&self, name: &str) -> PathBuf {
        let dir = self.path(name);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Encrypts the plain image with skopeo; `args` are its encryption options.
    fn encrypt(&self, name: &str, args: &[&str]) -> Vec<Blob> {
        let src = format!("oci:{}:v1", self.path("plain").display());
        let dst = format!("oci:{}:v1", self.path(name).display());
        let mut all = vec!["--insecure-policy", "copy"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[&src, &dst]);
        run_args("skopeo", &all).unwrap();
        layers(&self.path(name))
    }
}

fn open(keys: &Keyring, blob: &Blob, data: Vec<u8>) -> Result<Vec<u8>, Error> {
    let chain = Chain::new(vec![], Decryption::Node(keys.clone())).unwrap();
    let layer = Layer {
        media_type: &blob.media_type,
        digest: &blob.digest,
        size: data.len() as u64,
        annotations: &blob.annotations,
    };
    chain.check_access(&layer)?;
    let mut out = Vec::new();
    match chain
        .open(&layer, Box::new(io::Cursor::new(data)))?
        .read_to_end(&mut out)
    {
        Ok(_) => Ok(out),
        Err(e) => Err(into_error(e)),
    }
}

fn into_error(e: io::Error) -> Error {
    match Error::from_io(&e) {
        Some(Error::Integrity {
            digest,
            expected,
            actual,
        }) => Error::Integrity {
            digest: digest.clone(),
            expected: expected.clone(),
            actual: actual.clone(),
        },
        _ => panic!("stream failed with a plain I/O error: {e}"),
    }
}

/// Every layer decrypts with `keys` to the tar its diff_id names.
fn assert_decrypts(keys: &Keyring, blobs: &[Blob]) {
    for blob in blobs {
        assert!(
            blob.media_type.ends_with("+encrypted"),
            "{}",
            blob.media_type
        );
        let tar = open(keys, blob, blob.data.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sha256(&tar), blob.diff_id);
    }
}

fn keyring_with(fixture: &Fixture, name: &str, files: &[(&KeyPair, &str, &str)]) -> Keyring {
    let dir = fixture.keys_dir(name);
    for (pair, form, file) in files {
        export(pair, form, &dir.join(file)).unwrap();
    }
    Keyring::new(dir)
}

#[test]
fn jwe_rsa_layers_decrypt_with_every_key_encoding() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &["--encryption-key", &format!("jwe:{}", path(&rsa.public))],
    );
    assert_eq!(blobs.len(), 2);
    assert_eq!(
        blobs[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
    );
    assert!(
        blobs[0]
            .annotations
            .contains_key("org.opencontainers.image.enc.keys.jwe")
    );
    for form in ["pkcs8", "pkcs1", "der"] {
        let keys = keyring_with(&fx, &format!("keys-{form}"), &[(&rsa, form, "key")]);
        assert_decrypts(&keys, &blobs);
    }
}

#[test]
fn jwe_rsa_4096_layers_decrypt() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:4096").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &["--encryption-key", &format!("jwe:{}", path(&rsa.public))],
    );
    assert_decrypts(
        &keyring_with(&fx, "keys", &[(&rsa, "pkcs8", "k.pem")]),
        &blobs,
    );
}

#[test]
fn jwe_ec_layers_decrypt_on_p256_and_p384() {
    let fx = Fixture::new();
    for (curve, forms) in [("P-256", ["sec1", "pkcs8"]), ("P-384", ["der", "sec1"])] {
        let ec = key_pair(fx.dir.path(), curve, &format!("ec:{curve}")).unwrap();
        let name = format!("enc-{curve}");
        let blobs = fx.encrypt(
            &name,
            &["--encryption-key", &format!("jwe:{}", path(&ec.public))],
        );
        for form in forms {
            let keys = keyring_with(&fx, &format!("keys-{curve}-{form}"), &[(&ec, form, "k")]);
            assert_decrypts(&keys, &blobs);
        }
    }
}

#[test]
fn two_recipients_decrypt_with_either_key_alone() {
    let fx = Fixture::new();
    let a = key_pair(fx.dir.path(), "a", "rsa:2048").unwrap();
    let b = key_pair(fx.dir.path(), "b", "rsa:2048").unwrap();
    let c = key_pair(fx.dir.path(), "c", "ec:P-384").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &[
            "--encryption-key",
            &format!("jwe:{}", path(&a.public)),
            "--encryption-key",
            &format!("jwe:{}", path(&b.public)),
            "--encryption-key",
            &format!("jwe:{}", path(&c.public)),
        ],
    );
    for (name, pair, form) in [
        ("only-a", &a, "pkcs8"),
        ("only-b", &b, "pkcs1"),
        ("only-c", &c, "sec1"),
    ] {
        assert_decrypts(&keyring_with(&fx, name, &[(pair, form, "k.pem")]), &blobs);
    }
}

#[test]
fn pkcs7_layers_need_the_key_and_its_certificate() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    let cert = fx.path("cert.pem");
    certificate(&rsa, &cert).unwrap();
    let blobs = fx.encrypt(
        "enc",
        &["--encryption-key", &format!("pkcs7:{}", path(&cert))],
    );
    assert!(
        blobs[0]
            .annotations
            .contains_key("org.opencontainers.image.enc.keys.pkcs7")
    );

    let keys = keyring_with(&fx, "keys", &[(&rsa, "pkcs1", "key.pem")]);
    let err = open(&keys, &blobs[0], blobs[0].data.clone()).unwrap_err();
    let Error::NoKey {
        wrapped_for,
        detail,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert!(
        wrapped_for.contains("pkcs7 (RSA, issuer CN=imaged-test, serial"),
        "{err}"
    );
    assert!(detail.contains("certificate"), "{err}");

    fs::copy(&cert, fx.path("keys/cert.pem")).unwrap();
    assert_decrypts(&keys, &blobs);
}

#[test]
fn wrong_key_names_what_the_layer_was_wrapped_for() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    let ec = key_pair(fx.dir.path(), "ec", "ec:P-256").unwrap();
    let other = key_pair(fx.dir.path(), "other", "rsa:2048").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &[
            "--encryption-key",
            &format!("jwe:{}", path(&rsa.public)),
            "--encryption-key",
            &format!("jwe:{}", path(&ec.public)),
        ],
    );
    let keys = keyring_with(&fx, "keys", &[(&other, "pkcs8", "k.pem")]);
    let err = open(&keys, &blobs[0], blobs[0].data.clone()).unwrap_err();
    let Error::NoKey {
        digest,
        wrapped_for,
        detail,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(digest, &blobs[0].digest);
    assert_eq!(wrapped_for, "jwe (RSA-OAEP, ECDH-ES+A256KW P-256)", "{err}");
    assert!(detail.contains("jwe: none of 1 candidate key(s)"), "{err}");

    let ec_only = keyring_with(
        &fx,
        "keys-ec",
        &[(
            &key_pair(fx.dir.path(), "e2", "ec:P-384").unwrap(),
            "pkcs8",
            "k",
        )],
    );
    let err = open(&ec_only, &blobs[0], blobs[0].data.clone()).unwrap_err();
    assert!(err.to_string().contains("the node has EC P-384"), "{err}");
}

#[test]
fn no_key_at_all_is_reported_with_the_directory() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &["--encryption-key", &format!("jwe:{}", path(&rsa.public))],
    );
    let missing = Keyring::new(fx.path("no-such-dir"));
    let err = open(&missing, &blobs[0], blobs[0].data.clone()).unwrap_err();
    let Error::NoKey {
        wrapped_for,
        detail,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(wrapped_for, "jwe (RSA-OAEP)");
    assert!(
        detail.contains("no-such-dir has no usable private keys"),
        "{err}"
    );
}

#[test]
fn keys_added_later_are_picked_up() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &["--encryption-key", &format!("jwe:{}", path(&rsa.public))],
    );
    let dir = fx.keys_dir("keys");
    let keys = Keyring::new(&dir);
    assert!(matches!(
        open(&keys, &blobs[0], blobs[0].data.clone()),
        Err(Error::NoKey { .. })
    ));
    export(&rsa, "der", &dir.join("sub-key.der")).unwrap();
    assert_decrypts(&keys, &blobs);
    fs::remove_file(dir.join("sub-key.der")).unwrap();
    assert!(matches!(
        open(&keys, &blobs[0], blobs[0].data.clone()),
        Err(Error::NoKey { .. })
    ));
}

#[test]
fn unusable_files_do_not_disable_the_good_key() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &["--encryption-key", &format!("jwe:{}", path(&rsa.public))],
    );
    let dir = fx.keys_dir("keys");
    fs::write(dir.join("README"), "keys for the node\n").unwrap();
    fs::copy(&rsa.public, dir.join("public.pem")).unwrap();
    std::os::unix::fs::symlink(&rsa.private, dir.join("link.pem")).unwrap();
    run_args(
        "openssl",
        &[
            "pkey",
            "-in",
            path(&rsa.private),
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            path(&dir.join("protected.pem")),
        ],
    )
    .unwrap();
    fs::create_dir(dir.join("nested")).unwrap();
    export(&rsa, "pkcs1", &dir.join("nested/key.pem")).unwrap();
    assert_decrypts(&Keyring::new(&dir), &blobs);
}

#[test]
fn flipped_and_truncated_ciphertext_fail_the_integrity_check() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    fx.encrypt(
        "enc",
        &["--encryption-key", &format!("jwe:{}", path(&rsa.public))],
    );
    let keys = keyring_with(&fx, "keys", &[(&rsa, "pkcs8", "k.pem")]);
    // Read as an uncompressed layer, so that the decryption stage alone sees the damage:
    // behind gunzip, a damaged blob may first fail decompression.
    let mut blob = layers(&fx.path("enc")).remove(1);
    blob.media_type = "application/vnd.oci.image.layer.v1.tar+encrypted".to_string();
    let len = blob.data.len();
    let mut flipped = blob.data.clone();
    flipped[len / 2] ^= 1;
    let truncated = blob.data[..len - 1].to_vec();
    let mut extended = blob.data.clone();
    extended.push(0);
    for data in [flipped, truncated, extended] {
        let err = open(&keys, &blob, data).unwrap_err();
        let Error::Integrity {
            digest,
            expected,
            actual,
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(digest, &blob.digest);
        assert_eq!(expected.len(), 64);
        assert_eq!(actual.len(), 64);
        assert_ne!(expected, actual);
    }
    let intact = open(&keys, &blob, blob.data.clone()).unwrap();
    assert_eq!(intact, gzip(&fx.tars[1]));
}

#[test]
fn garbage_key_annotations_are_refused_without_panicking() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &["--encryption-key", &format!("jwe:{}", path(&rsa.public))],
    );
    let keys = keyring_with(&fx, "keys", &[(&rsa, "pkcs8", "k.pem")]);
    let jwe = "org.opencontainers.image.enc.keys.jwe";
    for garbage in ["!!!", "e30=", "bm90IGpzb24=", "", ","] {
        let mut blob = layers(&fx.path("enc")).remove(0);
        blob.annotations
            .insert(jwe.to_string(), garbage.to_string());
        let err = open(&keys, &blob, blob.data.clone()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidEncryption { .. } | Error::NoKey { .. }),
            "{garbage}: {err}"
        );
    }
    // A bad first item does not hide a good second one.
    let mut blob = layers(&fx.path("enc")).remove(0);
    let good = blob.annotations[jwe].clone();
    blob.annotations
        .insert(jwe.to_string(), format!("e30=,{good}"));
    let tar = open(&keys, &blob, blob.data.clone()).unwrap();
    assert_eq!(sha256(&tar), blobs[0].diff_id);
}

#[test]
fn mixed_images_keep_plain_layers_readable() {
    let fx = Fixture::new();
    let rsa = key_pair(fx.dir.path(), "rsa", "rsa:2048").unwrap();
    let blobs = fx.encrypt(
        "enc",
        &[
            "--encryption-key",
            &format!("jwe:{}", path(&rsa.public)),
            "--encrypt-layer",
            "0",
        ],
    );
    assert!(blobs[0].media_type.ends_with("+encrypted"));
    assert_eq!(
        blobs[1].media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let nothing = Keyring::new(fx.path("empty"));
    let plain = open(&nothing, &blobs[1], blobs[1].data.clone()).unwrap();
    assert_eq!(plain, fx.tars[1]);
    assert!(matches!(
        open(&nothing, &blobs[0], blobs[0].data.clone()),
        Err(Error::NoKey { .. })
    ));
    let keys = keyring_with(&fx, "keys", &[(&rsa, "pkcs8", "k.pem")]);
    assert_decrypts(&keys, &blobs[..1]);
}
