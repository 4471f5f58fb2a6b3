//! The btrfs and native snapshotters through CRI: the fixture images unpack to the same
//! trees as with overlayfs, each layer is fetched once although btrfs applies layers base
//! first, a layer that needs its parent's files unpacks with native too, a switch of
//! snapshotter unpacks images again from the content store, and a btrfs snapshotter on
//! another filesystem is refused at start-up.

use crate::harness::{Imaged, assert_tree, disk_for, gets_of, push, registry};
use fixtures::catalog;
use fixtures::image::{Built, Compression, Entry, ImageSpec, Layer};
use fixtures::registry::Registry;
use std::time::Duration;

const BACKENDS: [&str; 3] = ["overlayfs", "native", "btrfs"];

fn fixture_images() -> Vec<(&'static str, ImageSpec)> {
    vec![
        ("whiteouts", catalog::whiteouts()),
        ("links", catalog::links()),
        ("metadata", catalog::metadata()),
        ("gzip", catalog::compressed(Compression::Gzip)),
        ("zstd", catalog::compressed(Compression::Zstd)),
        ("docker", catalog::docker_schema2()),
        ("layers-120", catalog::many_layers()),
    ]
}

/// GETs the registry served for each blob (config and layers) of `built`.
fn gets_per_blob(registry: &Registry, built: &Built) -> Vec<usize> {
    built
        .blobs()
        .map(|blob| gets_of(registry, &blob.digest).len())
        .collect()
}

fn blob_gets(registry: &Registry, built: &Built) -> usize {
    gets_per_blob(registry, built).iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_snapshotter_unpacks_the_fixtures_to_the_same_tree() {
    let registry = registry();
    let images: Vec<(String, ImageSpec, Built)> = fixture_images()
        .into_iter()
        .map(|(name, spec)| {
            let built = push(&registry, &format!("fixtures/{name}"), "v1", &spec);
            (
                format!("{}/fixtures/{name}:v1", registry.addr()),
                spec,
                built,
            )
        })
        .collect();
    for backend in BACKENDS {
        let disk = disk_for(backend);
        let imaged = Imaged::start_at(&disk.root, &format!("snapshotter = {backend:?}\n")).await;
        for (image, spec, built) in &images {
            let before = gets_per_blob(&registry, built);
            let id = imaged.pull(image).await.unwrap();
            assert_eq!(id, built.id(), "{backend}: {image}");
            let after = gets_per_blob(&registry, built);
            assert!(
                before.iter().zip(&after).all(|(b, a)| a - b <= 1),
                "{backend}: a blob of {image} fetched twice: {before:?} -> {after:?}"
            );
            let tree = imaged.rootfs(image).await;
            assert_tree(&spec.expected_tree(), &tree, &format!("{backend}: {image}"));
        }
        assert!(imaged.stop().success(), "{backend}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_of_snapshotter_unpacks_images_again_without_downloading() {
    let registry = registry();
    let spec = catalog::whiteouts();
    let built = push(&registry, "fixtures/whiteouts", "v1", &spec);
    let image = format!("{}/fixtures/whiteouts:v1", registry.addr());
    let imaged = Imaged::start().await;
    imaged.pull(&image).await.unwrap();
    let fetched = blob_gets(&registry, &built);

    let imaged = imaged.restart_with("snapshotter = \"native\"\n").await;
    assert_eq!(imaged.status(&image).await.unwrap().id, built.id());
    assert_tree(
        &spec.expected_tree(),
        &imaged.rootfs(&image).await,
        "native",
    );
    imaged.pull(&image).await.unwrap();
    assert_eq!(
        blob_gets(&registry, &built),
        fetched,
        "nothing downloaded again"
    );

    let snapshots = |backend: &str| {
        let dir = imaged
            .root
            .join("snapshots")
            .join(backend)
            .join("snapshots");
        std::fs::read_dir(dir).unwrap().count()
    };
    assert!(snapshots("overlayfs") > 0 && snapshots("native") > 0);
    imaged.remove(&image).await;
    assert_eq!(
        (snapshots("overlayfs"), snapshots("native")),
        (0, 0),
        "the collector removes the snapshots of both"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_after_discarded_blobs_needs_the_registry_again() {
    let registry = registry();
    let spec = catalog::demo();
    let built = push(&registry, "fixtures/demo", "v1", &spec);
    let image = format!("{}/fixtures/demo:v1", registry.addr());
    let imaged = Imaged::start_with("discard_unpacked_layers = true\n").await;
    imaged.pull(&image).await.unwrap();

    let imaged = imaged
        .restart_with("snapshotter = \"native\"\ndiscard_unpacked_layers = true\n")
        .await;
    let mut snapshots =
        proto::imaged::snapshots_client::SnapshotsClient::new(imaged.channel().await);
    let refused = snapshots
        .prepare(proto::imaged::PrepareRequest {
            image: image.clone(),
            key: "container".into(),
            readonly: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let layer = &built.layers[0].blob.digest;
    assert!(refused.message().contains(layer.as_str()), "{refused:?}");

    imaged.pull(&image).await.unwrap();
    assert_tree(
        &spec.expected_tree(),
        &imaged.rootfs(&image).await,
        "pulled again",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_btrfs_snapshotter_on_another_filesystem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let config = dir.path().join("imaged.toml");
    std::fs::write(
        &config,
        format!(
            "root = {root:?}\nstate = {:?}\nsnapshotter = \"btrfs\"\n",
            dir.path().join("state")
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imaged"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("imaged exits")
        .unwrap();
    assert!(!status.success());
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    let snapshots = root.join("snapshots/btrfs");
    assert!(
        stderr.contains(&snapshots.display().to_string())
            && stderr.contains("needs its root on btrfs"),
        "{stderr}"
    );
}

/// A hardlink to a file of a lower layer: native applies layers alone and merges them onto
/// their parents, and a layer that needs its parent's files is then applied onto them
/// instead, as btrfs applies every layer. Both give the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hardlink_to_a_lower_layers_file_unpacks_where_layers_can_go_onto_their_parents() {
    let registry = registry();
    let spec = ImageSpec::new(vec![
        Layer::new(vec![
            Entry::dir("lib", 0o755),
            Entry::file("lib/target", 0o644, "below"),
        ]),
        Layer::new(vec![Entry::file("top", 0o644, "above")]),
        Layer::new(vec![Entry {
            mode: 0o644,
            ..Entry::hardlink("lib/link", "lib/target")
        }]),
    ]);
    let built = push(&registry, "fixtures/lower-link", "v1", &spec);
    let image = format!("{}/fixtures/lower-link:v1", registry.addr());
    for backend in ["native", "btrfs"] {
        let disk = disk_for(backend);
        let imaged = Imaged::start_at(&disk.root, &format!("snapshotter = {backend:?}\n")).await;
        let before = blob_gets(&registry, &built);
        assert_eq!(imaged.pull(&image).await.unwrap(), built.id(), "{backend}");
        let tree = imaged.rootfs(&image).await;
        assert_tree(&spec.expected_tree(), &tree, backend);
        // The layers that had arrived are applied again from the content store.
        let fetched = blob_gets(&registry, &built) - before;
        assert!(
            fetched <= built.blobs().count() + 1,
            "{backend}: {fetched} GETs"
        );
        assert!(imaged.stop().success(), "{backend}");
    }
}

/// Layers applied base first stop at the first bad one; what the pull committed below it
/// goes too, and the error names the bad layer, not one that only gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_middle_layer_fails_the_pull_and_leaves_no_snapshot() {
    let registry = registry();
    let spec = ImageSpec::new(
        (0..5)
            .map(|n| Layer::new(vec![Entry::file(&format!("layer-{n}"), 0o644, "x")]))
            .collect(),
    );
    let built = spec.build().unwrap();
    let mut diff_ids: Vec<String> = built.layers.iter().map(|l| l.diff_id.clone()).collect();
    diff_ids[1] = fixtures::tree::sha256_digest(b"not the layer");
    let bad_layer = built.layers[1].blob.digest.clone();
    let bad = Built::assemble(spec.format, spec.config(&diff_ids), built.layers);
    registry
        .pusher()
        .push_image("hostile/middle", &bad, &["v1"])
        .unwrap();
    let image = format!("{}/hostile/middle:v1", registry.addr());
    for backend in BACKENDS {
        let disk = disk_for(backend);
        let imaged = Imaged::start_at(&disk.root, &format!("snapshotter = {backend:?}\n")).await;
        let before = imaged.store_files();
        let err = imaged.pull(&image).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DataLoss, "{backend}: {err:?}");
        assert!(
            err.message().contains("diff_id") && err.message().contains(bad_layer.as_str()),
            "{backend}: {err:?}"
        );
        let left: Vec<String> = imaged
            .store_files()
            .difference(&before)
            .filter(|f| !f.starts_with("content/blobs/"))
            .cloned()
            .collect();
        assert!(left.is_empty(), "{backend}: left behind {left:?}");
        assert_eq!(imaged.status(&image).await, None);
    }
}
