//! Registry mirrors from hosts.toml, against real `docker-registry` processes: a
//! pull-through cache, failover past a dead mirror, pull-only mirrors, HTTPS with a private CA
//! and with client certificates, path-prefixed mirrors (`override_path`), hostile files,
//! and the `ns` query parameter. Every claim is checked in the registries' access logs.

use crate::harness::{Imaged, assert_tree, push, registry, requests_for};
use fixtures::catalog;
use fixtures::registry::{PrefixProxy, Registry, RegistryOptions, TlsMaterial};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;

/// The certs.d directory name `<host>_<port>_` for `host:port`.
fn underscore_dir(addr: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    format!("{host}_{port}_")
}

/// `ns=` as sent for a reference on the registry at `addr` (`127.0.0.1%3APORT`).
fn ns(addr: &str) -> String {
    format!("ns={}", fixtures::http::percent_encode(addr))
}

/// The `GET` requests for `digest`'s blob.
fn blob_gets(registry: &Registry, digest: &str) -> Vec<String> {
    requests_for(registry, &format!("/blobs/{digest}"))
        .into_iter()
        .filter(|r| r.starts_with("GET "))
        .collect()
}

/// The requests after the first `before`.
fn requests_since(registry: &Registry, before: usize) -> Vec<String> {
    registry.requests().split_off(before)
}

/// Where a filesystem-storage registry keeps the blob `digest`.
fn stored_blob(storage: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    storage.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_cache_keeps_serving_after_the_upstream_is_gone() {
    let upstream = registry();
    let spec = catalog::demo();
    let built = push(&upstream, "fixtures/demo", "v1", &spec);
    let cache = Registry::start(RegistryOptions {
        proxy_remote: Some(upstream.url()),
        ..RegistryOptions::default()
    })
    .unwrap();
    let image = format!("{}/fixtures/demo:v1", upstream.addr());
    let hosts = format!(
        "[host.\"{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
        cache.url()
    );

    let first = Imaged::start().await;
    first.hosts_toml(&underscore_dir(upstream.addr()), &hosts);
    assert_eq!(first.pull(&image).await.unwrap(), built.id());
    let manifest = requests_for(&cache, "/v2/fixtures/demo/manifests/v1");
    assert!(
        manifest.iter().any(|r| r.contains(&ns(upstream.addr()))),
        "cache: {:?}",
        cache.requests()
    );
    // imaged asked only the cache, once per layer. The cache fetched from the upstream: on a
    // miss docker-registry 2.x's proxy GETs a blob twice there (one stream answers the client,
    // another is stored), so the upstream count is the cache's business; none came from imaged.
    assert!(cache.log().contains("imaged/"), "{}", cache.log());
    assert!(
        !upstream.log().contains("imaged/"),
        "imaged went to the upstream: {}",
        upstream.log()
    );
    for layer in &built.layers {
        let digest = &layer.blob.digest;
        assert_eq!(
            blob_gets(&cache, digest),
            [format!(
                "GET /v2/fixtures/demo/blobs/{digest}?{} HTTP/1.1",
                ns(upstream.addr())
            )],
            "cache: {:?}",
            cache.requests()
        );
        assert!(
            !blob_gets(&upstream, digest).is_empty(),
            "the cache did not fetch {digest}: {:?}",
            upstream.requests()
        );
        // The cache commits a blob once it has streamed it; give it a moment.
        let stored = stored_blob(cache.storage(), digest);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stored.is_file() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(stored.is_file(), "cache did not store {digest}");
    }

    let upstream_addr = upstream.addr().to_string();
    drop(upstream);
    let second = Imaged::start().await;
    second.hosts_toml(&upstream_addr, &hosts);
    let before = cache.requests().len();
    assert_eq!(second.pull(&image).await.unwrap(), built.id());
    assert_tree(
        &spec.expected_tree(),
        &second.rootfs(&image).await,
        "from the cache",
    );
    let served = requests_since(&cache, before);
    for layer in &built.layers {
        assert!(
            served
                .iter()
                .any(|r| r.starts_with("GET ") && r.contains(&layer.blob.digest)),
            "{} not served by the cache: {served:?}",
            layer.blob.digest
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_mirror_is_skipped() {
    let registry = registry();
    let built = push(&registry, "fixtures/simple", "v1", &catalog::simple("dead"));
    let imaged = Imaged::start().await;
    imaged.hosts_toml(
        registry.addr(),
        &format!("[host.\"http://{}\"]\n", crate::harness::free_addr()),
    );
    let image = format!("{}/fixtures/simple:v1", registry.addr());
    let before = registry.requests().len();
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    let seen = requests_since(&registry, before);
    assert!(
        seen.iter()
            .any(|r| r.starts_with("GET /v2/fixtures/simple/manifests/v1 ")),
        "{seen:?}"
    );
    for layer in &built.layers {
        assert_eq!(
            blob_gets(&registry, &layer.blob.digest).len(),
            1,
            "{seen:?}"
        );
    }
    assert!(seen.iter().all(|r| !r.contains("ns=")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_only_mirror_serves_blobs_of_a_tag_resolved_upstream() {
    let upstream = registry();
    let mirror = registry();
    let spec = catalog::simple("pull-only");
    let built = push(&upstream, "fixtures/simple", "v1", &spec);
    push(&mirror, "fixtures/simple", "v1", &spec);
    let imaged = Imaged::start().await;
    imaged.hosts_toml(
        upstream.addr(),
        &format!("[host.\"{}\"]\ncapabilities = [\"pull\"]\n", mirror.url()),
    );
    let (upstream_before, mirror_before) = (upstream.requests().len(), mirror.requests().len());
    let image = format!("{}/fixtures/simple:v1", upstream.addr());
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    let on_upstream = requests_since(&upstream, upstream_before);
    let on_mirror = requests_since(&mirror, mirror_before);
    assert!(
        on_upstream
            .iter()
            .any(|r| r.starts_with("GET /v2/fixtures/simple/manifests/v1 ")),
        "upstream: {on_upstream:?}"
    );
    assert!(
        on_upstream.iter().all(|r| !r.contains("/blobs/")),
        "upstream: {on_upstream:?}"
    );
    assert!(
        on_mirror.iter().all(|r| !r.contains("/manifests/v1")),
        "mirror: {on_mirror:?}"
    );
    for digest in built
        .layers
        .iter()
        .map(|l| &l.blob.digest)
        .chain([&built.config.digest])
    {
        let want = format!(
            "GET /v2/fixtures/simple/blobs/{digest}?{} ",
            ns(upstream.addr())
        );
        assert!(
            on_mirror.iter().any(|r| r.starts_with(&want)),
            "{want:?} not in mirror: {on_mirror:?}"
        );
    }
}

/// An HTTPS registry holding one fixture image, and an imaged with `files` of the TLS
/// material in the certs.d directory of that registry.
struct Secure {
    /// Keeps the certificate files the HTTPS registry reads alive.
    _tls: TlsMaterial,
    /// Keeps the storage the HTTPS registry serves alive.
    _plain: Registry,
    secure: Registry,
    built: fixtures::image::Built,
    image: String,
    imaged: Imaged,
}

impl Secure {
    async fn start(marker: &str, require_client: bool, files: &[&str]) -> Self {
        let tls = TlsMaterial::generate().unwrap();
        // The HTTPS registry serves what was pushed to a plain one sharing its storage.
        let plain = registry();
        let built = push(&plain, "fixtures/simple", "v1", &catalog::simple(marker));
        let secure = Registry::start(RegistryOptions {
            storage: Some(plain.storage().to_path_buf()),
            tls: Some(tls.registry_tls(require_client)),
            ..RegistryOptions::default()
        })
        .unwrap();
        let image = format!("{}/fixtures/simple:v1", secure.addr());
        let imaged = Imaged::start().await;
        tls.copy_to(&imaged.certs.join(secure.addr()), files)
            .unwrap();
        Self {
            _tls: tls,
            _plain: plain,
            secure,
            built,
            image,
            imaged,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_mirror_with_a_private_ca() {
    let Secure {
        _tls,
        _plain,
        secure,
        built,
        image,
        imaged,
    } = Secure::start("tls", false, &["ca.pem"]).await;
    let url = secure.url();
    // `server` keeps the built-in plain-HTTP entry for a loopback registry out of the list,
    // so every entry is HTTPS and a certificate failure is the only failure.
    let write = |settings: &str| {
        imaged.hosts_toml(
            secure.addr(),
            &format!("server = \"{url}\"\n\n[host.\"{url}\"]\n{settings}"),
        );
    };

    write("");
    let err = imaged.pull(&image).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&url), "{err:?}");
    assert!(
        err.message().contains("invalid peer certificate"),
        "{err:?}"
    );
    assert!(secure.requests().is_empty(), "{:?}", secure.requests());

    write("ca = \"ca.pem\"\n");
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    let seen = secure.requests();
    assert!(
        seen.iter()
            .any(|r| r.starts_with("GET /v2/fixtures/simple/manifests/v1 ")),
        "{seen:?}"
    );

    write("skip_verify = true\n");
    let before = secure.requests().len();
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    let seen = requests_since(&secure, before);
    assert!(
        seen.iter()
            .any(|r| r.starts_with("GET /v2/fixtures/simple/manifests/v1 ")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_mirror_requiring_a_client_certificate() {
    let Secure {
        _tls,
        _plain,
        secure,
        built,
        image,
        imaged,
    } = Secure::start("mtls", true, &["ca.pem", "client.pem", "client-key.pem"]).await;
    let url = secure.url();
    let write = |settings: &str| {
        imaged.hosts_toml(
            secure.addr(),
            &format!(
                "server = \"{url}\"\nca = \"ca.pem\"\n\n[host.\"{url}\"]\nca = \"ca.pem\"\n{settings}"
            ),
        );
    };

    write("");
    let err = imaged.pull(&image).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&url), "{err:?}");
    assert!(secure.requests().is_empty(), "{:?}", secure.requests());

    write("client = [[\"client.pem\", \"client-key.pem\"]]\n");
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    let seen = secure.requests();
    assert!(
        seen.iter()
            .any(|r| r.starts_with("GET /v2/fixtures/simple/manifests/v1 ")),
        "{seen:?}"
    );
    for layer in &built.layers {
        assert_eq!(blob_gets(&secure, &layer.blob.digest).len(), 1, "{seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_path_mirror_behind_a_path_prefix() {
    let registry = registry();
    let built = push(
        &registry,
        "fixtures/simple",
        "v1",
        &catalog::simple("prefix"),
    );
    let proxy = PrefixProxy::start("mirror/path", registry.addr()).unwrap();
    let imaged = Imaged::start().await;
    imaged.hosts_toml(
        registry.addr(),
        &format!("[host.\"{}\"]\noverride_path = true\n", proxy.url()),
    );
    let image = format!("{}/fixtures/simple:v1", registry.addr());
    let before = registry.requests().len();
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    let through_proxy = proxy.requests();
    let want = format!(
        "GET /mirror/path/fixtures/simple/manifests/v1?{}",
        ns(registry.addr())
    );
    assert!(
        through_proxy.contains(&want),
        "{want:?} not in proxy: {through_proxy:?}"
    );
    // Every request reached the registry through the proxy: all carry `ns`.
    let seen = requests_since(&registry, before);
    assert!(
        seen.iter()
            .any(|r| r.starts_with("GET /v2/fixtures/simple/manifests/v1?ns=")),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|r| r.contains(&ns(registry.addr()))),
        "{seen:?}"
    );
    for layer in &built.layers {
        assert_eq!(
            blob_gets(&registry, &layer.blob.digest).len(),
            1,
            "{seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hosts_toml_fails_with_the_path_and_field() {
    let registry = registry();
    push(
        &registry,
        "fixtures/simple",
        "v1",
        &catalog::simple("hostile"),
    );
    let imaged = Imaged::start().await;
    let addr = registry.addr();
    let image = format!("{addr}/fixtures/simple:v1");
    let file = imaged.certs.join(addr).join("hosts.toml");
    let file = file.display().to_string();
    let cases = [
        (
            format!("[host.\"http://{addr}\"\ncapabilities = [\"pull\"]\n"),
            vec!["parsing".to_string(), "line 1".into()],
        ),
        (
            format!("[host.\"http://{addr}\"]\nca = \"missing-ca.pem\"\n"),
            vec![
                format!("host.\"http://{addr}\".ca"),
                "missing-ca.pem".into(),
            ],
        ),
        (
            "[host.\"127.0.0.1:99999\"]\n".to_string(),
            vec![
                "host.\"127.0.0.1:99999\".url".to_string(),
                "invalid port".into(),
            ],
        ),
        (
            format!("[host.\"http://{addr}\"]\nmirror_of = \"docker.io\"\n"),
            vec![
                format!("host.\"http://{addr}\".mirror_of"),
                "unknown field".into(),
            ],
        ),
    ];
    for (text, needles) in cases {
        imaged.hosts_toml(addr, &text);
        let before = registry.requests().len();
        let err = imaged.pull(&image).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{text}: {err:?}");
        for needle in needles.iter().chain([&file]) {
            assert!(
                err.message().contains(needle.as_str()),
                "{text}: {needle:?} not in {:?}",
                err.message()
            );
        }
        let seen = requests_since(&registry, before);
        assert!(seen.is_empty(), "{text}: requests were sent: {seen:?}");
        assert_eq!(imaged.status(&image).await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_goes_to_mirrors_and_never_to_the_registry() {
    let upstream = registry();
    // An empty mirror: it answers 404 for everything, and the upstream serves the image.
    let mirror = registry();
    let built = push(&upstream, "fixtures/simple", "v1", &catalog::simple("ns"));
    let imaged = Imaged::start().await;
    imaged.hosts_toml(upstream.addr(), &format!("[host.\"{}\"]\n", mirror.url()));
    let (upstream_before, mirror_before) = (upstream.requests().len(), mirror.requests().len());
    let image = format!("{}/fixtures/simple:v1", upstream.addr());
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    let on_mirror = requests_since(&mirror, mirror_before);
    let on_upstream = requests_since(&upstream, upstream_before);
    let want = format!(
        "GET /v2/fixtures/simple/manifests/v1?{} ",
        ns(upstream.addr())
    );
    assert!(
        on_mirror.iter().any(|r| r.starts_with(&want)),
        "{want:?} not in mirror: {on_mirror:?}"
    );
    let encoded = ns(upstream.addr());
    assert!(encoded.contains("127.0.0.1%3A"), "{encoded}");
    assert!(
        on_mirror.iter().all(|r| r.contains(&encoded)),
        "mirror: {on_mirror:?}"
    );
    assert!(
        on_upstream
            .iter()
            .any(|r| r.starts_with("GET /v2/fixtures/simple/manifests/v1 ")),
        "upstream: {on_upstream:?}"
    );
    assert!(
        on_upstream.iter().all(|r| !r.contains("ns=")),
        "upstream: {on_upstream:?}"
    );
}
