//! `imaged mount` and `imaged unmount`, run as a user runs them, against a daemon holding a
//! pulled fixture.

use crate::harness::{Imaged, assert_tree, disk_for, push, registry};
use fixtures::catalog;
use fixtures::registry::Registry;
use fixtures::tree::Tree;
use std::path::Path;
use std::process::{Command, Output};

fn imaged_cli(imaged: &Imaged, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imaged"))
        .arg("--socket")
        .arg(&imaged.socket)
        .args(args)
        .output()
        .unwrap()
}

fn said(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn is_mountpoint(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(dir.to_str().unwrap()))
}

/// With every snapshotter: their mounts differ (overlay, bind of a subvolume, bind of a
/// directory), what a user sees must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_shows_the_image_read_only_or_writable_and_unmount_removes_the_snapshot() {
    let registry = registry();
    for backend in ["overlayfs", "native", "btrfs"] {
        let disk = disk_for(backend);
        let imaged = Imaged::start_at(&disk.root, &format!("snapshotter = {backend:?}\n")).await;
        mount_cycle(&registry, &imaged, backend).await;
        assert!(imaged.stop().success());
    }
}

async fn mount_cycle(registry: &Registry, imaged: &Imaged, backend: &str) {
    let spec = catalog::whiteouts();
    push(registry, "fixtures/mount", "v1", &spec);
    let image = format!("{}/fixtures/mount:v1", registry.addr());
    imaged.pull(&image).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().to_str().unwrap();

    let out = imaged_cli(imaged, &["mount", &image, target]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(target));
    assert_tree(
        &spec.expected_tree(),
        &Tree::read(dir.path()).unwrap(),
        &format!("mounted with {backend}"),
    );
    assert!(
        std::fs::write(dir.path().join("new"), b"x").is_err(),
        "read-only"
    );

    let again = imaged_cli(imaged, &["mount", &image, target]);
    assert!(!again.status.success());
    assert!(said(&again).contains(target), "{}", said(&again));

    let out = imaged_cli(imaged, &["unmount", target]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(!is_mountpoint(dir.path()));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let twice = imaged_cli(imaged, &["unmount", target]);
    assert!(!twice.status.success());
    assert!(said(&twice).contains(target), "{}", said(&twice));

    let out = imaged_cli(imaged, &["mount", "--rw", &image, target]);
    assert!(out.status.success(), "{}", said(&out));
    std::fs::write(dir.path().join("new"), b"written").unwrap();
    let out = imaged_cli(imaged, &["unmount", target]);
    assert!(out.status.success(), "{}", said(&out));
    let out = imaged_cli(imaged, &["mount", &image, target]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        !dir.path().join("new").exists(),
        "a writable mount's changes go with it"
    );
    let out = imaged_cli(imaged, &["unmount", target]);
    assert!(out.status.success(), "{}", said(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounting_an_image_not_present_names_it_and_leaves_nothing() {
    let imaged = Imaged::start().await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().to_str().unwrap();
    let out = imaged_cli(&imaged, &["mount", "example.com/absent:v1", target]);
    assert!(!out.status.success());
    let said = said(&out);
    assert!(
        said.contains("NotFound") && said.contains("example.com/absent:v1"),
        "{said}"
    );
    assert!(!is_mountpoint(dir.path()));
    let out = imaged_cli(&imaged, &["unmount", target]);
    assert!(!out.status.success(), "nothing was left to unmount");
    let missing = imaged_cli(
        &imaged,
        &["mount", "example.com/absent:v1", "/nonexistent/dir"],
    );
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/dir"));
}
