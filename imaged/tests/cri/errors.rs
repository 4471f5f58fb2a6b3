//! Hostile and broken input: the right gRPC code, a message naming what was wrong, and a
//! store left as it was.

use crate::harness::{Imaged, push, registry};
use fixtures::catalog;
use fixtures::image::{Built, Compression, Entry, ImageSpec, Layer, OCI_MANIFEST};
use fixtures::registry::{Route, StaticRegistry};
use tonic::Code;

async fn expect_failure(imaged: &Imaged, image: &str, code: Code, needles: &[&str]) {
    let before = imaged.store_files();
    let err = imaged.pull(image).await.unwrap_err();
    assert_eq!(err.code(), code, "{image}: {err:?}");
    for needle in needles {
        assert!(
            err.message().contains(needle),
            "{image}: {needle:?} not in {:?}",
            err.message()
        );
    }
    // Manifests and configs may stay (they were verified); nothing of the layers may.
    let after: Vec<String> = imaged
        .store_files()
        .difference(&before)
        .filter(|f| !f.starts_with("content/blobs/"))
        .cloned()
        .collect();
    assert!(after.is_empty(), "{image}: left behind {after:?}");
    assert_eq!(imaged.status(image).await, None);
}

fn push_built(registry: &fixtures::registry::Registry, repo: &str, built: &Built) {
    registry.pusher().push_image(repo, built, &["v1"]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_unreachable_and_invalid_references() {
    let registry = registry();
    let imaged = Imaged::start().await;
    push(&registry, "fixtures/simple", "v1", &catalog::simple("x"));
    let addr = registry.addr();
    expect_failure(
        &imaged,
        &format!("{addr}/fixtures/nope:v1"),
        Code::NotFound,
        &["not found", "fixtures/nope"],
    )
    .await;
    expect_failure(
        &imaged,
        &format!("{addr}/fixtures/simple:v2"),
        Code::NotFound,
        &["fixtures/simple:v2"],
    )
    .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    expect_failure(
        &imaged,
        &format!("{dead}/x/y:1"),
        Code::Unavailable,
        &[&dead.to_string()],
    )
    .await;
    for bad in ["docker.io/Library/x", "a::b", "x@sha256:1234"] {
        expect_failure(&imaged, bad, Code::InvalidArgument, &[bad]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_digests_sizes_and_media_types_are_refused() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let addr = registry.addr();
    let diff_id = catalog::hostile_diff_id().unwrap();
    push_built(&registry, "hostile/diff-id", &diff_id);
    let layer = diff_id.layers[0].blob.digest.clone();
    expect_failure(
        &imaged,
        &format!("{addr}/hostile/diff-id:v1"),
        Code::DataLoss,
        &["diff_id", &layer],
    )
    .await;
    for (repo, offset) in [("hostile/bigger", 10), ("hostile/smaller", -10)] {
        let built = catalog::hostile_layer_size(offset).unwrap();
        push_built(&registry, repo, &built);
        let layer = built.layers[0].blob.digest.clone();
        expect_failure(
            &imaged,
            &format!("{addr}/{repo}:v1"),
            Code::DataLoss,
            &[&layer],
        )
        .await;
    }
    let unsupported = catalog::unsupported_media_type().unwrap();
    push_built(&registry, "hostile/media", &unsupported);
    expect_failure(
        &imaged,
        &format!("{addr}/hostile/media:v1"),
        Code::InvalidArgument,
        &[catalog::UNSUPPORTED_LAYER_TYPE],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_manifest_is_invalid_argument() {
    let manifest = catalog::malformed_manifest();
    let fake = StaticRegistry::start(vec![Route::manifest(
        "bad/json",
        "v1",
        OCI_MANIFEST,
        &manifest.bytes,
    )])
    .unwrap();
    let imaged = Imaged::start().await;
    expect_failure(
        &imaged,
        &format!("{}/bad/json:v1", fake.addr()),
        Code::InvalidArgument,
        &["malformed manifest"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_entries_never_escape_the_snapshot() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "host secret\n").unwrap();
    let before = fixtures::tree::Tree::read(outside.path()).unwrap();
    let escapes = [
        ("traversal", catalog::hostile_traversal(outside.path())),
        ("absolute", catalog::hostile_absolute(outside.path())),
        ("symlink", catalog::hostile_symlink_escape(outside.path())),
        ("hardlink", catalog::hostile_hardlink_escape(outside.path())),
    ];
    for (name, spec) in escapes {
        push(&registry, &format!("hostile/{name}"), "v1", &spec);
        let image = format!("{}/hostile/{name}:v1", registry.addr());
        match imaged.pull(&image).await {
            // Escaping names are clamped into the rootfs, as containerd does.
            Ok(_) => {
                let tree = imaged.rootfs(&image).await;
                assert!(!tree.nodes.is_empty(), "{name}: empty rootfs");
            }
            Err(err) => assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}"),
        }
        let after = fixtures::tree::Tree::read(outside.path()).unwrap();
        assert!(
            before.diff(&after).is_empty(),
            "{name} wrote outside: {:?}",
            before.diff(&after)
        );
        assert!(!std::path::Path::new("/fixtures-escaped-traversal").exists());
    }
}

/// A body is read up to imaged's limit for its kind, or the size its descriptor declares,
/// and no further: beyond the limit is ResourceExhausted naming it, longer or shorter than
/// declared is DataLoss naming the declared size, each naming the host and the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stop_at_their_limit_or_their_declared_size() {
    let built = catalog::simple("bounded bodies").build().unwrap();
    let config_sized = |size: u64| {
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&built.manifest.bytes).unwrap();
        manifest["config"]["size"] = size.into();
        serde_json::to_vec(&manifest).unwrap()
    };
    let real = built.config.bytes.len() as u64;
    let oversized = vec![b' '; (4 << 20) + 1];
    let mut routes = vec![Route::manifest(
        "big/manifest",
        "v1",
        OCI_MANIFEST,
        &oversized,
    )];
    for (repo, size) in [
        ("config/longer", real - 1),
        ("config/shorter", real + 10),
        ("config/huge", 64 << 20),
    ] {
        routes.push(Route::manifest(
            repo,
            "v1",
            OCI_MANIFEST,
            &config_sized(size),
        ));
        routes.push(Route::blob(repo, &built.config));
    }
    let fake = StaticRegistry::start(routes).unwrap();
    let imaged = Imaged::start().await;
    let addr = fake.addr();
    let config = &built.config.digest;
    let cases = [
        (
            "big/manifest",
            Code::ResourceExhausted,
            vec![
                format!("{addr}/v2/big/manifest/manifests/v1"),
                "4194304".into(),
            ],
        ),
        (
            "config/longer",
            Code::DataLoss,
            vec![
                format!("{addr}/v2/config/longer/blobs/{config}"),
                format!("longer than the {} bytes its descriptor declares", real - 1),
            ],
        ),
        (
            "config/shorter",
            Code::DataLoss,
            vec![format!("ended after {real} of the {} bytes", real + 10)],
        ),
        (
            "config/huge",
            Code::ResourceExhausted,
            vec![
                config.clone(),
                "declares 67108864 bytes".into(),
                "33554432".into(),
            ],
        ),
    ];
    for (repo, code, needles) in cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        expect_failure(&imaged, &format!("{addr}/{repo}:v1"), code, &needles).await;
    }
}

/// A registry that is never silent yet never done: a manifest or config that has not
/// arrived by `image_pull_request_timeout` is DeadlineExceeded, a layer slower than
/// `image_pull_min_rate` over a window is Unavailable, each naming the host. Each body would
/// arrive whole after a few seconds, so a deadline that does not hold fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registries_that_dribble_are_held_to_deadlines_and_a_minimum_rate() {
    let built = catalog::simple("dribbled").build().unwrap();
    let pace = std::time::Duration::from_millis(15);
    let paced = |route: Route| Route {
        response: route.response.paced(pace),
        ..route
    };
    let manifest = |repo: &str| Route::manifest(repo, "v1", OCI_MANIFEST, &built.manifest.bytes);
    let layer = &built.layers[0].blob;
    let fake = StaticRegistry::start(vec![
        paced(manifest("slow/manifest")),
        manifest("slow/config"),
        paced(Route::blob("slow/config", &built.config)),
        manifest("slow/layer"),
        Route::blob("slow/layer", &built.config),
        paced(Route::blob("slow/layer", layer)),
    ])
    .unwrap();
    let imaged = Imaged::start_with(
        "image_pull_request_timeout = \"1s\"\nimage_pull_min_rate_window = \"1s\"\n",
    )
    .await;
    let addr = fake.addr();
    for repo in ["slow/manifest", "slow/config"] {
        let needles = [addr.as_str(), "within 1s", "image_pull_request_timeout"];
        let image = format!("{addr}/{repo}:v1");
        expect_failure(&imaged, &image, Code::DeadlineExceeded, &needles).await;
    }
    let needles = [layer.digest.as_str(), addr.as_str(), "image_pull_min_rate"];
    let image = format!("{addr}/slow/layer:v1");
    expect_failure(&imaged, &image, Code::Unavailable, &needles).await;
}

/// An image with more layers than `max_image_layers` is refused before any layer is asked
/// for, naming the reference, the count and the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_beyond_the_layer_cap_are_refused_before_any_layer_is_fetched() {
    let layers = (0..3)
        .map(|i| Layer::new(vec![Entry::file(&format!("f{i}"), 0o644, "x")]))
        .collect();
    let built = ImageSpec::new(layers).build().unwrap();
    let mut routes = vec![
        Route::manifest("many/layers", "v1", OCI_MANIFEST, &built.manifest.bytes),
        Route::blob("many/layers", &built.config),
    ];
    routes.extend(
        built
            .layers
            .iter()
            .map(|l| Route::blob("many/layers", &l.blob)),
    );
    let fake = StaticRegistry::start(routes).unwrap();
    let imaged = Imaged::start_with("max_image_layers = 2\n").await;
    let image = format!("{}/many/layers:v1", fake.addr());
    let needles = [image.as_str(), "3 layers", "max_image_layers (2)"];
    expect_failure(&imaged, &image, Code::ResourceExhausted, &needles).await;
    let fetched: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| built.layers.iter().any(|l| r.contains(&l.blob.digest)))
        .collect();
    assert!(fetched.is_empty(), "{fetched:?}");
}

/// A registry that redirects in a circle is given up after a bounded number of hops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_ends_in_an_error_naming_the_url() {
    let path = "/v2/loop/image/manifests/v1";
    let fake = StaticRegistry::start(vec![Route::new(
        "GET",
        path,
        fixtures::http::Response::new(307).with_header("Location", path),
    )])
    .unwrap();
    let imaged = Imaged::start().await;
    let addr = fake.addr();
    let needles = [format!("{addr}{path}"), "redirect".to_string()];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let image = format!("{addr}/loop/image:v1");
    expect_failure(&imaged, &image, Code::Unavailable, &needles).await;
    let hops = fake.requests().iter().filter(|r| r.ends_with(path)).count();
    assert!((2..=11).contains(&hops), "{hops} requests");
}

/// A layer that unpacks to more than a cap allows fails as soon as it crosses it:
/// ResourceExhausted naming the layer and the cap, long before the rest would be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompression_bombs_stop_where_they_cross_a_cap() {
    let registry = registry();
    let one_file = |content: Vec<u8>| {
        ImageSpec::new(vec![
            Layer::new(vec![Entry::file("f", 0o644, content)]).compressed(Compression::Zstd),
        ])
    };
    let bomb = push(
        &registry,
        "hostile/bomb",
        "v1",
        &one_file(vec![0; 192 << 20]),
    );
    let noise: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let large = push(&registry, "fixtures/large", "v1", &one_file(noise));
    push(
        &registry,
        "fixtures/simple",
        "v1",
        &catalog::simple("beside bombs"),
    );
    let imaged = Imaged::start().await;
    let addr = registry.addr();

    let layer = &bomb.layers[0].blob.digest;
    let image = format!("{addr}/hostile/bomb:v1");
    let needles = [
        layer.as_str(),
        "more than 500 times",
        "max_layer_compression_ratio",
    ];
    expect_failure(&imaged, &image, Code::ResourceExhausted, &needles).await;
    let err = imaged.pull(&image).await.unwrap_err();
    let unpacked: u64 = err
        .message()
        .split("unpacks to ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(unpacked < 128 << 20, "stopped after {unpacked} of 192 MiB");
    imaged
        .pull(&format!("{addr}/fixtures/simple:v1"))
        .await
        .unwrap();

    let imaged = Imaged::start_with("max_layer_unpacked_size = 1048576\n").await;

    let layer = &large.layers[0].blob.digest;
    let needles = [
        layer.as_str(),
        "more than 1048576 bytes",
        "max_layer_unpacked_size",
    ];
    let image = format!("{addr}/fixtures/large:v1");
    expect_failure(&imaged, &image, Code::ResourceExhausted, &needles).await;
    imaged
        .pull(&format!("{addr}/fixtures/simple:v1"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_that_do_not_match_their_digest_are_refused() {
    let built = catalog::simple("lying blobs").build().unwrap();
    let mut lying_config = built.config.clone();
    // Of the declared size, so that only the digest tells it apart.
    lying_config.bytes = b"{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}".to_vec();
    lying_config.bytes.resize(built.config.bytes.len(), b' ');
    let layer = &built.layers[0].blob;
    let mut lying_layer = layer.clone();
    lying_layer.bytes = vec![0u8; layer.bytes.len()];
    let manifest = |repo: &str| Route::manifest(repo, "v1", OCI_MANIFEST, &built.manifest.bytes);
    let fake = StaticRegistry::start(vec![
        manifest("bad/config"),
        Route::blob("bad/config", &lying_config),
        manifest("bad/layer"),
        Route::blob("bad/layer", &built.config),
        Route::blob("bad/layer", &lying_layer),
    ])
    .unwrap();
    let imaged = Imaged::start().await;
    let addr = fake.addr();
    expect_failure(
        &imaged,
        &format!("{addr}/bad/config:v1"),
        Code::DataLoss,
        &[&built.config.digest, "digest mismatch"],
    )
    .await;
    expect_failure(
        &imaged,
        &format!("{addr}/bad/layer:v1"),
        Code::DataLoss,
        &[&layer.digest, "digest mismatch"],
    )
    .await;
    assert!(
        !imaged
            .root
            .join("content/blobs/sha256")
            .join(layer.hex())
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documents_of_a_failed_pull_go_with_the_next_periodic_collection() {
    let registry = registry();
    let imaged = Imaged::start_with("garbage_collection_interval = \"3s\"\n").await;
    let kept = push(&registry, "fixtures/simple", "v1", &catalog::simple("kept"));
    let kept_image = format!("{}/fixtures/simple:v1", registry.addr());
    imaged.pull(&kept_image).await.unwrap();
    let hostile = catalog::hostile_diff_id().unwrap();
    push_built(&registry, "hostile/diff-id", &hostile);
    let failed = format!("{}/hostile/diff-id:v1", registry.addr());
    imaged.pull(&failed).await.unwrap_err();

    let blob = |digest: &str| {
        format!(
            "content/blobs/sha256/{}",
            digest.trim_start_matches("sha256:")
        )
    };
    let documents = [blob(&hostile.manifest.digest), blob(&hostile.config.digest)];
    assert!(
        documents.iter().all(|d| imaged.store_files().contains(d)),
        "the failed pull's manifest and config are stored"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while documents.iter().any(|d| imaged.store_files().contains(d)) {
        assert!(
            std::time::Instant::now() < deadline,
            "not collected: {documents:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for kept_blob in kept.blobs() {
        assert!(imaged.store_files().contains(&blob(&kept_blob.digest)));
    }
    assert_eq!(imaged.status(&kept_image).await.unwrap().id, kept.id());
}

/// A disk that fills up under a pull: ResourceExhausted naming the path, nothing partial
/// left (the store checks clean, the image is absent), and once space is freed the same
/// pull succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_pull_cleanly_and_the_next_pull_succeeds() {
    let registry = registry();
    let layers = (0..4)
        .map(|i| {
            Layer::new(vec![Entry::file(
                &format!("big{i}"),
                0o644,
                catalog::noise(i, 3 << 20),
            )])
        })
        .collect();
    let spec = ImageSpec::new(layers);
    let built = push(&registry, "fixtures/big", "v1", &spec);
    let dir = tempfile::tempdir().unwrap();
    let disk = fixtures::volume::Volume::ext4(dir.path(), 64 << 20).unwrap();
    let root = disk.mountpoint.join("root");
    let imaged = Imaged::start_at(&root, "").await;
    let free = rustix::fs::statvfs(&disk.mountpoint).unwrap();
    let free = free.f_bavail * free.f_frsize;
    // About 24 MiB are needed (blobs and unpacked files); leave 8.
    let ballast = disk.mountpoint.join("ballast");
    std::fs::write(&ballast, vec![0u8; (free - (8 << 20)) as usize]).unwrap();

    let image = format!("{}/fixtures/big:v1", registry.addr());
    let err = imaged.pull(&image).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains(&root.display().to_string()),
        "{err:?}"
    );
    assert_eq!(imaged.status(&image).await, None);
    let (status, out) = imaged.check(&[]);
    assert_eq!(status, 0, "{out}");

    std::fs::remove_file(&ballast).unwrap();
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    crate::harness::assert_tree(&spec.expected_tree(), &imaged.rootfs(&image).await, &image);
    drop(imaged);
}
