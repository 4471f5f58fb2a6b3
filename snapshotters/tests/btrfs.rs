//! The btrfs snapshotter's own form: every snapshot a subvolume, committed ones read-only,
//! a child a snapshot of its parent; subvolumes that a container makes inside its rootfs, and
//! leftover subvolumes of a crash, do not stop removal or cleanup; a root elsewhere than on
//! btrfs is refused.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use snapshotters::{Backend, Error, Snapshots, Snapshotter};

/// btrfs-progs (`btrfs subvolume …`, `btrfs quota …`), for doing what something other than
/// imaged would.
fn progs(group: &str, args: &[&str], path: &Path) {
    let out = Command::new("btrfs")
        .arg(group)
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_subvolume(path: &Path) -> bool {
    fs::symlink_metadata(path).unwrap().ino() == 256
}

#[test]
fn snapshots_are_subvolumes_and_committed_ones_are_read_only() {
    let env = Env::new(btrfs);
    let snapshots = env.snapshots();
    env.layer("base", None, &Tar::new().file("f", b"base", 0o644).build());
    let base = snapshots.join("1/fs");
    assert!(is_subvolume(&base));
    let denied = fs::write(base.join("g"), b"no").unwrap_err();
    assert_eq!(
        denied.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error())
    );

    let mounts = env
        .sn
        .prepare("child", Some("base"), BTreeMap::new())
        .unwrap();
    let child = snapshots.join("2/fs");
    assert!(is_subvolume(&child));
    assert_eq!(mounts[0].kind, "bind");
    assert_eq!(mounts[0].source, child.display().to_string());
    fs::write(child.join("f"), b"changed").unwrap();
    assert_eq!(fs::read(base.join("f")).unwrap(), b"base");
    assert!(!snapshots.join("1/implicit-dirs").exists());
}

#[test]
fn a_subvolume_made_inside_a_container_does_not_stop_its_removal() {
    let env = Env::new(btrfs);
    env.layer("base", None, &Tar::new().dir("var/", 0o755).build());
    env.sn
        .prepare("container", Some("base"), BTreeMap::new())
        .unwrap();
    let fs = env.snapshots().join("2/fs");
    progs("subvolume", &["create"], &fs.join("var/machines"));
    progs("subvolume", &["create"], &fs.join("var/machines/inner"));
    progs(
        "subvolume",
        &["snapshot", "-r", fs.join("var/machines").to_str().unwrap()],
        &fs.join("ro"),
    );
    env.sn.remove("container").unwrap();
    assert!(!env.snapshots().join("2").exists());
    assert!(!env.snapshots().join("rm-2").exists());
}

#[test]
fn cleanup_destroys_leftover_subvolumes_read_only_ones_too() {
    let env = Env::new(btrfs);
    let snapshots = env.snapshots();
    env.layer("base", None, &Tar::new().file("f", b"x", 0o644).build());
    for leftover in ["new-crashed", "77", "rm-5"] {
        fs::create_dir(snapshots.join(leftover)).unwrap();
    }
    progs("subvolume", &["create"], &snapshots.join("new-crashed/fs"));
    progs(
        "subvolume",
        &["snapshot", "-r", snapshots.join("1/fs").to_str().unwrap()],
        &snapshots.join("77/fs"),
    );
    progs("subvolume", &["create"], &snapshots.join("rm-5/fs"));
    progs("subvolume", &["create"], &snapshots.join("rm-5/fs/nested"));
    env.sn.cleanup().unwrap();
    let mut left: Vec<String> = fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["1"]);
    assert_eq!(env.view("base").read("f"), "x");
}

#[test]
fn a_root_not_on_btrfs_is_refused_naming_it_and_its_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Database::create(dir.path().join("meta.redb")).unwrap();
    let root = dir.path().join("btrfs");
    let err = Snapshots::open(Backend::Btrfs, root.clone(), Arc::new(db))
        .err()
        .expect("refused");
    match err {
        Error::InvalidArgument { key, reason } => {
            assert_eq!(key, root.display().to_string());
            assert!(
                reason.contains("needs its root on btrfs, this one is on "),
                "{reason}"
            );
            assert!(!reason.ends_with("on "), "{reason}");
        }
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

/// With quotas on, a container's usage is what it wrote (its subvolume's exclusive bytes), not
/// the image it shares with its parent; without them, and for committed snapshots, the walk's.
#[test]
fn with_quotas_a_containers_usage_is_what_it_wrote() {
    let image = vec![0x5a; 4 << 20];
    let written = vec![0xa5; 256 << 10];
    let usage_of_container = |quotas: bool| {
        let env = Env::new(btrfs);
        if quotas {
            progs("quota", &["enable"], env.sn.root());
            progs("quota", &["rescan", "-w"], env.sn.root());
        }
        env.layer(
            "base",
            None,
            &Tar::new().file("image", &image, 0o644).build(),
        );
        let mounts = env
            .sn
            .prepare("container", Some("base"), BTreeMap::new())
            .unwrap();
        fs::write(Path::new(&mounts[0].source).join("written"), &written).unwrap();
        let dir = fs::File::open(&mounts[0].source).unwrap();
        rustix::fs::syncfs(&dir).unwrap();
        let base = env.sn.usage("base").unwrap();
        assert!(base.size >= image.len() as u64, "{base:?}");
        env.sn.usage("container").unwrap()
    };
    let counted = usage_of_container(true);
    assert!(counted.size >= written.len() as u64, "{counted:?}");
    assert!(counted.size < image.len() as u64, "{counted:?}");
    assert_eq!(counted.inodes, 3);
    let walked = usage_of_container(false);
    assert!(
        walked.size >= (image.len() + written.len()) as u64,
        "{walked:?}"
    );
    assert_eq!(walked.inodes, 3);
}
