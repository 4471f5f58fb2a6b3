//! The internal API a runtime uses: image configs, and writable snapshots on top of images
//! that keep their layers until they are removed.

use crate::harness::{Imaged, push, registry};
use fixtures::catalog;
use proto::imaged::images_client::ImagesClient;
use proto::imaged::snapshots_client::SnapshotsClient;
use proto::imaged::{
    ImageConfigRequest, PrepareRequest, RemoveSnapshotRequest, SnapshotKey, UsageResponse,
};
use tonic::Code;
use tonic::transport::Channel;

async fn snapshots(imaged: &Imaged) -> SnapshotsClient<Channel> {
    SnapshotsClient::new(imaged.channel().await)
}

async fn prepare(
    imaged: &Imaged,
    image: &str,
    key: &str,
) -> Result<Vec<snapshotters::Mount>, tonic::Status> {
    let response = snapshots(imaged)
        .await
        .prepare(PrepareRequest {
            image: image.into(),
            key: key.into(),
            readonly: false,
        })
        .await?;
    Ok(imaged::internal_api::mounts_from(response.into_inner()))
}

async fn usage(imaged: &Imaged, key: &str) -> Result<UsageResponse, tonic::Status> {
    let key = SnapshotKey { key: key.into() };
    Ok(snapshots(imaged).await.usage(key).await?.into_inner())
}

async fn remove(imaged: &Imaged, key: &str) -> Result<(), tonic::Status> {
    let request = RemoveSnapshotRequest { key: key.into() };
    snapshots(imaged).await.remove(request).await?;
    Ok(())
}

/// Mounts `mounts`, runs `f` on the mounted tree, unmounts.
fn with_rootfs<T>(mounts: &[snapshotters::Mount], f: impl FnOnce(&std::path::Path) -> T) -> T {
    let target = tempfile::tempdir().unwrap();
    plumbing::mount::Mount::mount_all(mounts, target.path()).unwrap();
    let result = f(target.path());
    plumbing::mount::unmount(target.path()).unwrap();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_names_the_image_by_reference_and_by_id() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let built = push(&registry, "fixtures/cfg", "v1", &catalog::user("www-data"));
    let image = format!("{}/fixtures/cfg:v1", registry.addr());
    imaged.pull(&image).await.unwrap();
    let mut images = ImagesClient::new(imaged.channel().await);
    let ask = |image: &str| ImageConfigRequest {
        image: image.into(),
    };

    let by_name = images.config(ask(&image)).await.unwrap().into_inner();
    assert_eq!(by_name.name, image);
    assert_eq!(by_name.id, built.id());
    let repo_digest = format!("{}/fixtures/cfg@{}", registry.addr(), built.manifest.digest);
    assert_eq!(by_name.repo_digest, repo_digest);
    assert_eq!(by_name.config, built.config.bytes);

    let by_id = images.config(ask(built.id())).await.unwrap().into_inner();
    assert_eq!((by_id.name, by_id.id), (image.clone(), by_name.id));
    let by_digest = images.config(ask(&repo_digest)).await.unwrap().into_inner();
    assert_eq!(by_digest.name, repo_digest);

    let missing = format!("{}/fixtures/cfg:v2", registry.addr());
    let status = images.config(ask(&missing)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("fixtures/cfg:v2"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_snapshot_is_writable_measured_and_prepared_once() {
    let registry = registry();
    let imaged = Imaged::start().await;
    push(&registry, "fixtures/rw", "v1", &catalog::simple("rw"));
    push(&registry, "fixtures/other", "v1", &catalog::simple("other"));
    let image = format!("{}/fixtures/rw:v1", registry.addr());
    let other = format!("{}/fixtures/other:v1", registry.addr());
    imaged.pull(&image).await.unwrap();
    imaged.pull(&other).await.unwrap();

    let mounts = prepare(&imaged, &image, "container-1").await.unwrap();
    assert_eq!(
        prepare(&imaged, &image, "container-1").await.unwrap(),
        mounts
    );
    let status = prepare(&imaged, &other, "container-1").await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    let key = SnapshotKey {
        key: "container-1".into(),
    };
    let again = snapshots(&imaged).await.mounts(key).await.unwrap();
    assert_eq!(
        imaged::internal_api::mounts_from(again.into_inner()),
        mounts
    );

    let empty = usage(&imaged, "container-1").await.unwrap();
    let content = with_rootfs(&mounts, |root| {
        std::fs::write(root.join("written"), vec![7u8; 1 << 20]).unwrap();
        std::fs::read_to_string(root.join("fixture")).unwrap()
    });
    assert_eq!(content, "rw\n");
    let used = usage(&imaged, "container-1").await.unwrap();
    assert!(
        used.bytes >= empty.bytes + (1 << 20),
        "{empty:?} -> {used:?}"
    );
    assert!(used.inodes > empty.inodes, "{empty:?} -> {used:?}");
    assert!(std::path::Path::new(&used.mountpoint).is_dir(), "{used:?}");

    remove(&imaged, "container-1").await.unwrap();
    remove(&imaged, "container-1").await.unwrap();
    let key = SnapshotKey {
        key: "container-1".into(),
    };
    let status = snapshots(&imaged).await.mounts(key).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        usage(&imaged, "gone").await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_layers_are_out_of_the_runtimes_reach() {
    let registry = registry();
    let imaged = Imaged::start().await;
    push(&registry, "fixtures/keys", "v1", &catalog::simple("keys"));
    let image = format!("{}/fixtures/keys:v1", registry.addr());
    imaged.pull(&image).await.unwrap();
    let before = imaged.store_files();
    let status = imaged
        .cri()
        .await
        .image_status(proto::cri::ImageStatusRequest {
            image: Some(crate::harness::spec(&image)),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&status.info["info"]).unwrap();
    let chain_id = info["chainID"].as_str().unwrap().to_string();
    for key in [chain_id.as_str(), "extract-1 x", ""] {
        let status = remove(&imaged, key).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{key}: {status:?}");
        let status = prepare(&imaged, &image, key).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{key}: {status:?}");
    }
    let status = prepare(&imaged, "missing:v1", "c").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("missing:v1"), "{status:?}");
    assert_eq!(imaged.store_files(), before);
    assert!(imaged.status(&image).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_image_keeps_the_layers_under_a_prepared_snapshot() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let spec = catalog::many_layers();
    push(&registry, "fixtures/held", "v1", &spec);
    let image = format!("{}/fixtures/held:v1", registry.addr());
    imaged.pull(&image).await.unwrap();
    let mounts = prepare(&imaged, &image, "held").await.unwrap();

    imaged.remove(&image).await;
    assert!(imaged.status(&image).await.is_none());
    let imaged = imaged.crash_and_restart().await;

    let key = SnapshotKey { key: "held".into() };
    let again = snapshots(&imaged).await.mounts(key).await.unwrap();
    assert_eq!(
        imaged::internal_api::mounts_from(again.into_inner()),
        mounts
    );
    let tree = with_rootfs(&mounts, |root| fixtures::tree::Tree::read(root).unwrap());
    crate::harness::assert_tree(&spec.expected_tree(), &tree, "held");

    let held = snapshot_dirs(&imaged);
    assert!(held.len() > spec.layers.len(), "{held:?}");
    remove(&imaged, "held").await.unwrap();
    let imaged = imaged.crash_and_restart().await;
    assert_eq!(snapshot_dirs(&imaged), Vec::<String>::new());
}

/// The snapshot directories on disk.
fn snapshot_dirs(imaged: &Imaged) -> Vec<String> {
    let files = imaged.store_files().into_iter();
    files
        .filter(|f| f.contains("/snapshots/") && f.ends_with("/fs"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_and_pause_images_run_on_a_prepared_rootfs() {
    let registry = registry();
    let imaged = Imaged::start().await;
    push(
        &registry,
        "fixtures/busybox",
        "v1",
        &catalog::busybox().unwrap(),
    );
    push(
        &registry,
        "fixtures/pause",
        "v1",
        &catalog::pause().unwrap(),
    );
    let busybox = format!("{}/fixtures/busybox:v1", registry.addr());
    let pause = format!("{}/fixtures/pause:v1", registry.addr());
    imaged.pull(&busybox).await.unwrap();
    imaged.pull(&pause).await.unwrap();

    let mounts = prepare(&imaged, &busybox, "busybox-run").await.unwrap();
    let output = with_rootfs(&mounts, |root| {
        std::process::Command::new("chroot")
            .arg(root)
            .args([
                "/bin/sh",
                "-c",
                "echo -n hello > /tmp/out; cat /tmp/out; id -u",
            ])
            .output()
            .unwrap()
    });
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello0\n",
        "{output:?}"
    );

    let mounts = prepare(&imaged, &pause, "pause-run").await.unwrap();
    let status = with_rootfs(&mounts, |root| {
        let mut child = std::process::Command::new("chroot")
            .arg(root)
            .arg("/pause")
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "pause exited by itself"
        );
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        child.wait().unwrap()
    });
    assert!(status.success(), "{status:?}");
}
