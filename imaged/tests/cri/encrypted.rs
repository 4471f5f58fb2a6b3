//! Encrypted images end to end: keys made by openssl, images encrypted by skopeo into a real
//! registry, pulled through CRI with the keys in imaged's keys directory. openssl, skopeo
//! and zstd must be installed: the tests fail, never skip, without them.

use crate::harness::{Imaged, assert_not_on_disk, assert_tree, registry};
use fixtures::catalog;
use fixtures::image::{Blob, Compression, Entry, ImageSpec, Layer, OCI_MANIFEST};
use fixtures::keys::{self, KeyPair};
use fixtures::registry::Registry;
use fixtures::tool::run_args;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tonic::Code;

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const GZIP_ENCRYPTED: &str = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const ZSTD_ENCRYPTED: &str = "application/vnd.oci.image.layer.v1.tar+zstd+encrypted";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const JWE_KEYS: &str = "org.opencontainers.image.enc.keys.jwe";

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An image as the registry holds it.
struct Pushed {
    repo: String,
    /// The reference to pull.
    image: String,
    digest: String,
    manifest: Value,
}

impl Pushed {
    fn layer(&self, index: usize) -> &Value {
        &self.manifest["layers"][index]
    }

    fn layer_digest(&self, index: usize) -> &str {
        self.layer(index)["digest"].as_str().unwrap()
    }

    fn media_type(&self, index: usize) -> &str {
        self.layer(index)["mediaType"].as_str().unwrap()
    }

    fn config_digest(&self) -> &str {
        self.manifest["config"]["digest"].as_str().unwrap()
    }

    /// Store paths a failed pull may add: the verified manifest and config, and the
    /// directories holding them.
    fn documents(&self) -> BTreeSet<String> {
        let blob = |digest: &str| {
            format!(
                "content/blobs/sha256/{}",
                digest.strip_prefix("sha256:").unwrap()
            )
        };
        BTreeSet::from([
            "content/blobs".to_string(),
            "content/blobs/sha256".to_string(),
            blob(&self.digest),
            blob(self.config_digest()),
        ])
    }
}

/// Scratch space for keys and layouts, and the registry encrypted images are pushed to.
struct Lab {
    dir: tempfile::TempDir,
    registry: Registry,
}

impl Lab {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            registry: registry(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kind` is `rsa:BITS` or `ec:CURVE`.
    fn key_pair(&self, name: &str, kind: &str) -> KeyPair {
        keys::key_pair(self.dir.path(), name, kind).unwrap()
    }

    fn certificate(&self, pair: &KeyPair) -> PathBuf {
        let cert = pair.private.with_extension("crt");
        keys::certificate(pair, &cert).unwrap();
        cert
    }

    /// Writes `spec` as an OCI layout and has skopeo copy it into `repo:v1`, encrypting
    /// with `args` (`--encryption-key ...`, `--encrypt-layer ...`).
    fn encrypt(&self, spec: &ImageSpec, repo: &str, args: &[&str]) -> Pushed {
        let layout = self.path(&format!("layout-{}", repo.replace('/', "-")));
        spec.build()
            .unwrap()
            .write_oci_layout(&layout, "v1")
            .unwrap();
        let source = format!("oci:{}:v1", layout.display());
        let destination = format!("docker://{}/{repo}:v1", self.registry.addr());
        let mut all = vec!["--insecure-policy", "copy", "--dest-tls-verify=false"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[&source, &destination]);
        run_args("skopeo", &all).unwrap();
        self.fetch(repo, "v1")
    }

    fn fetch(&self, repo: &str, tag: &str) -> Pushed {
        let response = self.registry.pusher().get_manifest(repo, tag).unwrap();
        assert_eq!(response.status, 200, "{repo}:{tag}: {}", response.text());
        let manifest: Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(manifest["mediaType"], OCI_MANIFEST, "{repo}:{tag}");
        Pushed {
            repo: repo.to_string(),
            image: format!("{}/{repo}:{tag}", self.registry.addr()),
            digest: sha256(&response.body),
            manifest,
        }
    }

    fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let response = self.registry.pusher().get_blob(repo, digest).unwrap();
        assert_eq!(response.status, 200, "{digest}");
        response.body
    }

    /// Pushes `manifest` (and `blob`, if given) under `tag` of the same repository.
    fn republish(&self, of: &Pushed, tag: &str, manifest: &Value, blob: Option<&Blob>) -> Pushed {
        let pusher = self.registry.pusher();
        if let Some(blob) = blob {
            pusher.push_blob(&of.repo, blob).unwrap();
        }
        let bytes = serde_json::to_vec(manifest).unwrap();
        pusher
            .put_manifest(&of.repo, tag, OCI_MANIFEST, &bytes)
            .unwrap();
        self.fetch(&of.repo, tag)
    }

    /// Re-pushes `of` with layer `index`'s blob changed by `change`; the descriptor's
    /// digest and size follow, so only the encryption can notice.
    fn tamper(&self, of: &Pushed, index: usize, tag: &str, change: fn(&mut Vec<u8>)) -> Pushed {
        let mut bytes = self.blob(&of.repo, of.layer_digest(index));
        change(&mut bytes);
        let blob = Blob::new(of.media_type(index), bytes);
        let mut manifest = of.manifest.clone();
        manifest["layers"][index]["digest"] = blob.digest.clone().into();
        manifest["layers"][index]["size"] = blob.size().into();
        self.republish(of, tag, &manifest, Some(&blob))
    }
}

/// A keys directory for imaged.
fn keys_dir(lab: &Lab, name: &str) -> PathBuf {
    let dir = lab.path(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn install(keys: &Path, file: &Path, name: &str) {
    fs::copy(file, keys.join(name)).unwrap();
}

async fn start(keys: &Path) -> Imaged {
    Imaged::start_with(&format!("[image_decryption]\nkeys_dir = {keys:?}\n")).await
}

/// Pulls `pushed`, checks what ImageStatus reports and that the rootfs is `spec`'s tree.
async fn expect_pull(imaged: &Imaged, pushed: &Pushed, spec: &ImageSpec) {
    let id = imaged
        .pull(&pushed.image)
        .await
        .unwrap_or_else(|e| panic!("{}: {e:?}\n{}", pushed.image, imaged.log()));
    assert_eq!(id, pushed.config_digest(), "{}", pushed.image);
    let status = imaged.status(&pushed.image).await.unwrap();
    assert_eq!(status.id, pushed.config_digest());
    // Images of one plain source share their config, so other names may be listed too.
    assert!(status.repo_tags.contains(&pushed.image), "{status:?}");
    let (name, _) = pushed.image.rsplit_once(':').unwrap();
    let repo_digest = format!("{name}@{}", pushed.digest);
    assert!(status.repo_digests.contains(&repo_digest), "{status:?}");
    let tree = imaged.rootfs(&pushed.image).await;
    assert_tree(&spec.expected_tree(), &tree, &pushed.image);
}

/// Pulls `pushed` expecting one of `codes` and every needle in the message. Apart from the
/// verified manifest and config, the store must be as before: no layer blob, ingest or
/// snapshot.
async fn expect_failure(
    imaged: &Imaged,
    pushed: &Pushed,
    codes: &[Code],
    needles: &[&str],
) -> String {
    let before = imaged.store_files();
    let err = imaged.pull(&pushed.image).await.unwrap_err();
    let message = err.message().to_string();
    assert!(
        codes.contains(&err.code()),
        "{}: {:?} {message}",
        pushed.image,
        err.code()
    );
    for needle in needles {
        assert!(
            message.contains(needle),
            "{}: {needle:?} not in {message:?}",
            pushed.image
        );
    }
    let layers = pushed.manifest["layers"].as_array().unwrap();
    for layer in layers {
        let digest = layer["digest"].as_str().unwrap();
        assert!(
            message.matches(digest).count() <= 1,
            "{digest} repeated in {message:?}"
        );
    }
    let documents = pushed.documents();
    let added: Vec<String> = imaged
        .store_files()
        .difference(&before)
        .filter(|f| !documents.contains(*f))
        .cloned()
        .collect();
    assert!(added.is_empty(), "{}: left behind {added:?}", pushed.image);
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwe_images_pull_with_rsa_and_ec_keys() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let imaged = start(&keys).await;
    // P-256 goes in as a SEC1 `EC PRIVATE KEY`, the others as PKCS#8.
    let cases = [
        ("rsa", "rsa:2048", false),
        ("p256", "ec:P-256", true),
        ("p384", "ec:P-384", false),
    ];
    for (name, kind, sec1) in cases {
        let pair = lab.key_pair(name, kind);
        let spec = catalog::simple(&format!("encrypted for {kind}"));
        let repo = format!("enc/{name}");
        let pushed = lab.encrypt(&spec, &repo, &["--encryption-key", &jwe(&pair)]);
        assert_eq!(pushed.media_type(0), GZIP_ENCRYPTED, "{name}");
        // Only this key is on the node: each algorithm has to work on its own. Files that
        // are no private key are skipped, not fatal.
        for old in fs::read_dir(&keys).unwrap() {
            fs::remove_file(old.unwrap().path()).unwrap();
        }
        let key = keys.join("key.pem");
        if sec1 {
            keys::export(&pair, "sec1", &key).unwrap();
            assert!(fs::read_to_string(&key).unwrap().contains("EC PRIVATE KEY"));
        } else {
            fs::copy(&pair.private, &key).unwrap();
        }
        install(&keys, &pair.public, "key.pub.pem");
        fs::write(keys.join("README"), "node keys\n").unwrap();
        std::os::unix::fs::symlink(&pair.private, keys.join("link.pem")).unwrap();
        expect_pull(&imaged, &pushed, &spec).await;
        // The key is read where it lies, never copied into the store, the state or the log.
        let pem = fs::read_to_string(&key).unwrap();
        let body = pem.lines().nth(1).unwrap();
        assert_not_on_disk(imaged.dir.path(), body.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_encrypted_layers_pull() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    install(&keys, &pair.private, "rsa.pem");
    let spec = catalog::compressed(Compression::Zstd);
    let pushed = lab.encrypt(&spec, "enc/zstd", &["--encryption-key", &jwe(&pair)]);
    assert_eq!(pushed.media_type(0), ZSTD_ENCRYPTED);
    assert_eq!(pushed.media_type(1), ZSTD_ENCRYPTED);
    let imaged = start(&keys).await;
    expect_pull(&imaged, &pushed, &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs7_images_need_the_key_and_its_certificate() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    let cert = lab.certificate(&pair);
    let spec = catalog::simple("encrypted for pkcs7");
    let encryption_key = format!("pkcs7:{}", cert.display());
    let pushed = lab.encrypt(&spec, "enc/pkcs7", &["--encryption-key", &encryption_key]);
    assert_eq!(pushed.media_type(0), GZIP_ENCRYPTED);
    install(&keys, &pair.private, "key.pem");
    let imaged = start(&keys).await;
    let digest = pushed.layer_digest(0).to_string();
    expect_failure(
        &imaged,
        &pushed,
        &[Code::FailedPrecondition],
        &[&digest, "pkcs7"],
    )
    .await;
    install(&keys, &cert, "cert.pem");
    expect_pull(&imaged, &pushed, &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_images_decrypt_only_the_encrypted_layer() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    let spec = catalog::compressed(Compression::Gzip);
    let key = jwe(&pair);
    let top = lab.encrypt(
        &spec,
        "enc/mixed-top",
        &["--encryption-key", &key, "--encrypt-layer", "-1"],
    );
    assert_eq!(
        [top.media_type(0), top.media_type(1)],
        [GZIP, GZIP_ENCRYPTED]
    );
    let base = lab.encrypt(
        &spec,
        "enc/mixed-base",
        &["--encryption-key", &key, "--encrypt-layer", "0"],
    );
    assert_eq!(
        [base.media_type(0), base.media_type(1)],
        [GZIP_ENCRYPTED, GZIP]
    );
    let imaged = start(&keys).await;
    // Without the key only the encrypted layer is named.
    let message = imaged.pull(&top.image).await.unwrap_err();
    assert_eq!(message.code(), Code::FailedPrecondition, "{message:?}");
    assert!(
        message.message().contains(top.layer_digest(1)),
        "{message:?}"
    );
    assert!(
        !message.message().contains(top.layer_digest(0)),
        "{message:?}"
    );
    assert_eq!(imaged.status(&top.image).await, None);
    install(&keys, &pair.private, "key.pem");
    expect_pull(&imaged, &top, &spec).await;
    // Both images unpack to the same layers: a daemon of its own decrypts base's layer.
    let imaged = start(&keys).await;
    expect_pull(&imaged, &base, &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_recipient_images_pull_with_either_key() {
    let lab = Lab::new();
    let first = lab.key_pair("first", "rsa:2048");
    let second = lab.key_pair("second", "rsa:2048");
    let p256 = lab.key_pair("p256", "ec:P-256");
    let spec = catalog::simple("two recipients");
    let (a, b, c) = (jwe(&first), jwe(&second), jwe(&p256));
    let rsa_rsa = lab.encrypt(
        &spec,
        "enc/rsa-rsa",
        &["--encryption-key", &a, "--encryption-key", &b],
    );
    let rsa_ec = lab.encrypt(
        &spec,
        "enc/rsa-ec",
        &["--encryption-key", &a, "--encryption-key", &c],
    );
    // One daemon per key, so no pull finds the layer unpacked already.
    let cases = [(&rsa_rsa, &second), (&rsa_ec, &p256), (&rsa_ec, &first)];
    for (n, (pushed, pair)) in cases.into_iter().enumerate() {
        let keys = keys_dir(&lab, &format!("keys-{n}"));
        install(&keys, &pair.private, "only.pem");
        let imaged = start(&keys).await;
        expect_pull(&imaged, pushed, &spec).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_copy_on_the_node_does_not_unlock_an_encrypted_image() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    let spec = catalog::simple("plain and encrypted");
    let encrypted = lab.encrypt(&spec, "enc/locked", &["--encryption-key", &jwe(&pair)]);
    let built = spec.build().unwrap();
    lab.registry
        .pusher()
        .push_image("plain/open", &built, &["v1"])
        .unwrap();
    let plain = lab.fetch("plain/open", "v1");
    let imaged = start(&keys).await;
    expect_pull(&imaged, &plain, &spec).await;
    // Same diff_ids, so the layers are unpacked already; the key is still required.
    let digest = encrypted.layer_digest(0).to_string();
    expect_failure(&imaged, &encrypted, &[Code::FailedPrecondition], &[&digest]).await;
    assert_eq!(imaged.status(&encrypted.image).await, None);
    install(&keys, &pair.private, "key.pem");
    expect_pull(&imaged, &encrypted, &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_keys_are_failed_precondition() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let rsa = lab.key_pair("rsa", "rsa:2048");
    let p256 = lab.key_pair("p256", "ec:P-256");
    let other = lab.key_pair("other", "rsa:2048");
    let spec = catalog::simple("needs its key");
    let for_rsa = lab.encrypt(&spec, "enc/for-rsa", &["--encryption-key", &jwe(&rsa)]);
    let for_p256 = lab.encrypt(&spec, "enc/for-p256", &["--encryption-key", &jwe(&p256)]);
    let imaged = start(&keys).await;
    for (pushed, wrapped_for) in [(&for_rsa, "RSA-OAEP"), (&for_p256, "P-256")] {
        let digest = pushed.layer_digest(0).to_string();
        let needles = [digest.as_str(), wrapped_for];
        let missing = expect_failure(&imaged, pushed, &[Code::FailedPrecondition], &needles).await;
        assert_eq!(imaged.status(&pushed.image).await, None);
        install(&keys, &other.private, "other.pem");
        let wrong = expect_failure(&imaged, pushed, &[Code::FailedPrecondition], &needles).await;
        assert_ne!(missing, wrong, "a wrong key reads like no key at all");
        fs::remove_file(keys.join("other.pem")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_or_truncated_ciphertext_and_bad_annotations_are_refused() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    install(&keys, &pair.private, "key.pem");
    // One layer, larger than a pipeline chunk: the failure comes mid-stream, and a failed
    // pull has no verified sibling layer whose blob would stay.
    let spec = ImageSpec::new(vec![Layer::new(vec![
        Entry::dir("data", 0o755),
        Entry::file("data/noise", 0o644, catalog::noise(11, 300 * 1024)),
    ])]);
    let pushed = lab.encrypt(&spec, "enc/tamper", &["--encryption-key", &jwe(&pair)]);
    let imaged = start(&keys).await;

    let flipped = lab.tamper(&pushed, 0, "flipped", |bytes| {
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
    });
    expect_corrupt(&imaged, &flipped).await;
    let truncated = lab.tamper(&pushed, 0, "truncated", |bytes| {
        bytes.truncate(bytes.len() - 100);
    });
    let digest = truncated.layer_digest(0).to_string();
    expect_failure(
        &imaged,
        &truncated,
        &[Code::DataLoss],
        &[&digest, "integrity"],
    )
    .await;
    let extended = lab.tamper(&pushed, 0, "extended", |bytes| bytes.extend([0; 64]));
    expect_corrupt(&imaged, &extended).await;

    let mut manifest = pushed.manifest.clone();
    manifest["layers"][0]["annotations"][JWE_KEYS] = "bm90IGEgandl,!!!".into();
    let garbage = lab.republish(&pushed, "garbage-keys", &manifest, None);
    let digest = garbage.layer_digest(0).to_string();
    let codes = [Code::InvalidArgument, Code::FailedPrecondition];
    expect_failure(&imaged, &garbage, &codes, &[&digest]).await;

    // The untouched image still pulls: nothing of the failures stuck.
    expect_pull(&imaged, &pushed, &spec).await;
}

/// A changed ciphertext is reported as failing its integrity check, even when the
/// decompressor stumbled over the altered plaintext before the HMAC at the end was checked.
async fn expect_corrupt(imaged: &Imaged, pushed: &Pushed) {
    let digest = pushed.layer_digest(0).to_string();
    expect_failure(imaged, pushed, &[Code::DataLoss], &[&digest, "integrity"]).await;
    assert_eq!(imaged.status(&pushed.image).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_store_holds_ciphertext_only() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    install(&keys, &pair.private, "key.pem");
    let spec = catalog::compressed(Compression::Gzip);
    let plain = spec.build().unwrap();
    let pushed = lab.encrypt(&spec, "enc/store", &["--encryption-key", &jwe(&pair)]);
    let imaged = start(&keys).await;
    expect_pull(&imaged, &pushed, &spec).await;
    let blobs = imaged.root.join("content/blobs/sha256");
    for entry in fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            sha256(&bytes),
            format!("sha256:{name}"),
            "{}",
            path.display()
        );
        assert!(!bytes.starts_with(&[0x1f, 0x8b]), "gzip data in {name}");
    }
    for (index, layer) in plain.layers.iter().enumerate() {
        assert!(
            !blobs.join(layer.blob.hex()).exists(),
            "plain layer {index}"
        );
        let digest = pushed.layer_digest(index);
        let stored = fs::read(blobs.join(digest.strip_prefix("sha256:").unwrap())).unwrap();
        assert_eq!(stored, lab.blob(&pushed.repo, digest), "layer {index}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_on_every_pull_and_reread_without_restart() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("p256", "ec:P-256");
    let spec = catalog::simple("key comes and goes");
    let pushed = lab.encrypt(&spec, "enc/keys", &["--encryption-key", &jwe(&pair)]);
    let digest = pushed.layer_digest(0).to_string();
    let imaged = start(&keys).await;
    expect_failure(&imaged, &pushed, &[Code::FailedPrecondition], &[&digest]).await;
    install(&keys, &pair.private, "node.pem");
    expect_pull(&imaged, &pushed, &spec).await;
    fs::remove_file(keys.join("node.pem")).unwrap();
    // The layer is unpacked already; the key check alone must refuse.
    expect_failure(&imaged, &pushed, &[Code::FailedPrecondition], &[&digest]).await;
    install(&keys, &pair.private, "node.pem");
    expect_pull(&imaged, &pushed, &spec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_decryption_refuses_encrypted_images() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    install(&keys, &pair.private, "key.pem");
    let spec = catalog::simple("decryption off");
    let pushed = lab.encrypt(&spec, "enc/disabled", &["--encryption-key", &jwe(&pair)]);
    let imaged = Imaged::start_with(&format!(
        "[image_decryption]\nkey_model = \"\"\nkeys_dir = {keys:?}\n"
    ))
    .await;
    let digest = pushed.layer_digest(0).to_string();
    let needles = [digest.as_str(), "decryption is disabled"];
    expect_failure(&imaged, &pushed, &[Code::FailedPrecondition], &needles).await;
    assert_eq!(imaged.status(&pushed.image).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_images_survive_a_restart() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    install(&keys, &pair.private, "key.pem");
    let spec = catalog::simple("restart");
    let pushed = lab.encrypt(&spec, "enc/restart", &["--encryption-key", &jwe(&pair)]);
    let imaged = start(&keys).await;
    expect_pull(&imaged, &pushed, &spec).await;
    let imaged = imaged.crash_and_restart().await;
    let status = imaged.status(&pushed.image).await.unwrap();
    assert_eq!(status.id, pushed.config_digest());
    let tree = imaged.rootfs(&pushed.image).await;
    assert_tree(&spec.expected_tree(), &tree, "after restart");
    expect_pull(&imaged, &pushed, &spec).await;
}

/// Writes an executable shell script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn processor(name: &str, accepts: &str, returns: &str, path: &Path) -> String {
    format!(
        "[stream_processors.{name:?}]\naccepts = [{accepts:?}]\nreturns = {returns:?}\npath = {path:?}\n"
    )
}

/// An image of zstd layers in the lab's registry, pushed plain.
fn zstd_image(lab: &Lab, repo: &str) -> (Pushed, ImageSpec) {
    let spec = catalog::compressed(Compression::Zstd);
    let built = spec.build().unwrap();
    lab.registry
        .pusher()
        .push_image(repo, &built, &["v1"])
        .unwrap();
    (lab.fetch(repo, "v1"), spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_processor_unpacks_zstd_layers() {
    let lab = Lab::new();
    let marker = lab.path("ran");
    let unzstd = script(
        lab.dir.path(),
        "unzstd",
        &format!("echo \"$STREAM_PROCESSOR_MEDIATYPE\" >> {marker:?}\nexec zstd -dc"),
    );
    let (pushed, spec) = zstd_image(&lab, "ext/zstd");
    let imaged = Imaged::start_with(&processor("unzstd", ZSTD, TAR, &unzstd)).await;
    expect_pull(&imaged, &pushed, &spec).await;
    let ran = fs::read_to_string(&marker).unwrap();
    assert_eq!(ran, format!("{ZSTD}\n{ZSTD}\n"), "one run per layer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_or_missing_external_processors_are_named() {
    let lab = Lab::new();
    let (pushed, _) = zstd_image(&lab, "ext/failing");
    let failing = script(
        lab.dir.path(),
        "half-unzstd",
        "zstd -dc | head -c 4096\necho boom >&2\nexit 1",
    );
    let imaged = Imaged::start_with(&processor("half-unzstd", ZSTD, TAR, &failing)).await;
    expect_failure(
        &imaged,
        &pushed,
        &[Code::Internal],
        &["half-unzstd", "boom"],
    )
    .await;
    assert_eq!(imaged.status(&pushed.image).await, None);
    drop(imaged);

    let missing = lab.path("no-such-unzstd");
    let imaged = Imaged::start_with(&processor("unzstd", ZSTD, TAR, &missing)).await;
    expect_failure(
        &imaged,
        &pushed,
        &[Code::Internal],
        &["unzstd", text(&missing)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_decoder_receives_the_ocicrypt_payload() {
    let lab = Lab::new();
    let keys = keys_dir(&lab, "keys");
    let pair = lab.key_pair("rsa", "rsa:2048");
    let spec = catalog::simple("payload");
    let pushed = lab.encrypt(&spec, "enc/payload", &["--encryption-key", &jwe(&pair)]);
    let saved = lab.path("payload");
    let decoder = script(
        lab.dir.path(),
        "save-payload",
        &format!("cat <&3 > {saved:?}\necho no keys here >&2\nexit 1"),
    );
    let name = "io.containerd.ocicrypt.decoder.v1.tar.gzip";
    let config = format!(
        "[image_decryption]\nkeys_dir = {keys:?}\n{}",
        processor(name, GZIP_ENCRYPTED, GZIP, &decoder)
    );
    let imaged = Imaged::start_with(&config).await;
    let digest = pushed.layer_digest(0).to_string();
    expect_failure(&imaged, &pushed, &[Code::Internal], &[name, &digest]).await;
    let payload = String::from_utf8_lossy(&fs::read(&saved).unwrap()).into_owned();
    let annotations: BTreeMap<String, String> =
        serde_json::from_value(pushed.layer(0)["annotations"].clone()).unwrap();
    assert!(annotations.contains_key(JWE_KEYS));
    let annotations = serde_json::to_string(&annotations).unwrap();
    assert!(payload.contains(&digest), "{payload}");
    assert!(payload.contains(&annotations), "{payload}");
}

fn jwe(pair: &KeyPair) -> String {
    format!("jwe:{}", pair.public.display())
}
