//! overlayfs's own on-disk form and mount options: the layout by id, overlay's whiteout
//! and opaque markers, and mount options for long chains.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use snapshotters::{Mount, Snapshotter};
use tar::EntryType;

struct OverlayEnv {
    env: Env,
    snapshots: PathBuf,
}

fn overlay_env() -> OverlayEnv {
    let env = Env::new(overlayfs);
    let snapshots = env.snapshots();
    OverlayEnv { env, snapshots }
}

fn option<'a>(mount: &'a Mount, name: &str) -> Option<&'a str> {
    mount
        .options
        .iter()
        .find_map(|o| o.strip_prefix(&format!("{name}=")))
}

/// The directory an Active snapshot writes to.
/// The `trusted.overlay.opaque` value of `dir`, or the errno reading it gave.
fn opaque_xattr(dir: &Path) -> Result<Vec<u8>, rustix::io::Errno> {
    let mut value = [0u8; 8];
    let n = rustix::fs::lgetxattr(dir, "trusted.overlay.opaque", &mut value[..])?;
    Ok(value[..n].to_vec())
}

fn upper(mounts: &[Mount]) -> PathBuf {
    let mount = &mounts[0];
    match mount.kind.as_str() {
        "bind" => PathBuf::from(&mount.source),
        _ => PathBuf::from(option(mount, "upperdir").unwrap()),
    }
}

fn index_off() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

#[test]
fn layout_is_named_by_id_and_commit_moves_nothing() {
    let o = overlay_env();
    let sn = &o.env.sn;
    assert_eq!(fs::metadata(sn.root()).unwrap().mode() & 0o7777, 0o700);
    sn.prepare("k", None, BTreeMap::new()).unwrap();
    let one = o.snapshots.join("1");
    assert_eq!(fs::metadata(one.join("fs")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(
        fs::metadata(one.join("work")).unwrap().mode() & 0o7777,
        0o711
    );
    o.env
        .apply("k", &Tar::new().file("f", b"x", 0o644).build())
        .unwrap();
    sn.commit("c", "k", None, BTreeMap::new()).unwrap();
    assert_eq!(fs::read(one.join("fs/f")).unwrap(), b"x");

    std::os::unix::fs::lchown(one.join("fs"), Some(1000), Some(1001)).unwrap();
    sn.prepare("child", Some("c"), BTreeMap::new()).unwrap();
    let child = fs::metadata(o.snapshots.join("2/fs")).unwrap();
    assert_eq!((child.uid(), child.gid()), (1000, 1001));
    sn.view("v", Some("c"), BTreeMap::new()).unwrap();
    assert!(o.snapshots.join("3/fs").is_dir());
    assert!(!o.snapshots.join("3/work").exists());

    sn.prepare("rebased", None, BTreeMap::new()).unwrap();
    sn.commit("r", "rebased", Some("c"), BTreeMap::new())
        .unwrap();
    let rebased = fs::metadata(o.snapshots.join("4/fs")).unwrap();
    assert_eq!((rebased.uid(), rebased.gid()), (1000, 1001));
}

#[test]
fn an_active_overlay_lists_its_lowers_nearest_first() {
    let o = overlay_env();
    let env = &o.env;
    for (i, parent) in [(1, None), (2, Some("1")), (3, Some("2"))] {
        let layer = Tar::new()
            .file("shared", format!("layer {i}").as_bytes(), 0o644)
            .file(&format!("only-{i}"), b"x", 0o644)
            .build();
        env.layer(&i.to_string(), parent, &layer);
    }
    let mounts = env
        .sn
        .prepare("container", Some("3"), BTreeMap::new())
        .unwrap();
    let dir = |id: u32, sub: &str| {
        o.snapshots
            .join(id.to_string())
            .join(sub)
            .display()
            .to_string()
    };
    let mut expected = vec![
        format!("workdir={}", dir(4, "work")),
        format!("upperdir={}", dir(4, "fs")),
        format!(
            "lowerdir={}:{}:{}",
            dir(3, "fs"),
            dir(2, "fs"),
            dir(1, "fs")
        ),
    ];
    if index_off() {
        expected.push("index=off".to_owned());
    }
    assert_eq!(
        mounts,
        [Mount {
            kind: "overlay".to_owned(),
            source: "overlay".to_owned(),
            options: expected
        }]
    );
    assert_eq!(env.sn.mounts("container").unwrap(), mounts);

    let merged = Mounted::new(&mounts);
    assert_eq!(merged.read("shared"), "layer 3");
    assert_eq!(merged.list(""), ["only-1", "only-2", "only-3", "shared"]);
    fs::write(merged.path("new"), b"container").unwrap();
    fs::remove_file(merged.path("only-1")).unwrap();
    assert_eq!(
        fs::read(o.snapshots.join("4/fs/new")).unwrap(),
        b"container"
    );
    assert!(o.snapshots.join("1/fs/only-1").exists());
}

#[test]
fn binds_until_two_layers_then_overlays() {
    let o = overlay_env();
    let env = &o.env;
    let active = env.sn.prepare("a", None, BTreeMap::new()).unwrap();
    let fs1 = o.snapshots.join("1/fs").display().to_string();
    assert_eq!(
        active,
        [Mount {
            kind: "bind".to_owned(),
            source: fs1.clone(),
            options: vec!["rw".to_owned(), "rbind".to_owned()]
        }]
    );
    env.apply("a", &Tar::new().file("f", b"1", 0o644).build())
        .unwrap();
    env.sn.commit("one", "a", None, BTreeMap::new()).unwrap();
    let view = env.sn.view("v1", Some("one"), BTreeMap::new()).unwrap();
    assert_eq!(
        view,
        [Mount {
            kind: "bind".to_owned(),
            source: fs1,
            options: vec!["ro".to_owned(), "rbind".to_owned()]
        }]
    );
    let mounted = Mounted::new(&view);
    assert_eq!(mounted.read("f"), "1");
    let denied = fs::write(mounted.path("g"), b"no").unwrap_err();
    assert_eq!(
        denied.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error())
    );
    drop(mounted);

    env.layer(
        "two",
        Some("one"),
        &Tar::new().file("g", b"2", 0o644).build(),
    );
    let view = env.sn.view("v2", Some("two"), BTreeMap::new()).unwrap();
    assert_eq!(
        (view[0].kind.as_str(), option(&view[0], "upperdir")),
        ("overlay", None)
    );
    let mounted = Mounted::new(&view);
    assert_eq!(mounted.list(""), ["f", "g"]);
    assert!(fs::write(mounted.path("h"), b"no").is_err());
    let empty = env.sn.view("v0", None, BTreeMap::new()).unwrap();
    assert_eq!(empty[0].options, ["ro", "rbind"]);
}

#[test]
fn two_hundred_layers_mount_without_changing_cwd() {
    let o = overlay_env();
    let env = &o.env;
    let mut parent: Option<String> = None;
    for i in 1..=200 {
        let layer = Tar::new()
            .file("top", i.to_string().as_bytes(), 0o644)
            .file(&format!("layer-{i}"), b"x", 0o644)
            .build();
        let name = format!("layer{i}");
        env.layer(&name, parent.as_deref(), &layer);
        parent = Some(name);
    }
    let mounts = env
        .sn
        .prepare("container", parent.as_deref(), BTreeMap::new())
        .unwrap();
    let options = mounts[0].options.join(",");
    assert!(
        options.len() > rustix::param::page_size() - 512,
        "{} bytes",
        options.len()
    );

    let cwd = std::env::current_dir().unwrap();
    let merged = Mounted::new(&mounts);
    assert_eq!(std::env::current_dir().unwrap(), cwd);
    assert_eq!(merged.read("top"), "200");
    assert!(merged.exists("layer-1") && merged.exists("layer-200"));
    assert_eq!(merged.list("").len(), 201);
    drop(merged);

    let view = Mounted::new(
        &env.sn
            .view("view", parent.as_deref(), BTreeMap::new())
            .unwrap(),
    );
    assert_eq!(view.read("top"), "200");
    assert_eq!(std::env::current_dir().unwrap(), cwd);
}

#[test]
fn whiteouts_are_char_devices_owned_like_the_entry() {
    let o = overlay_env();
    let env = &o.env;
    env.layer(
        "1",
        None,
        &Tar::new()
            .file("a", b"a", 0o644)
            .file("b", b"b", 0o644)
            .build(),
    );
    let mounts = env.sn.prepare("k", Some("1"), BTreeMap::new()).unwrap();
    let mut whiteout = Tar::header(EntryType::Regular, ".wh.a", 0o644);
    whiteout.set_uid(1234);
    whiteout.set_gid(5678);
    env.apply("k", &Tar::new().entry(whiteout, b"").build())
        .unwrap();
    let marker = fs::symlink_metadata(upper(&mounts).join("a")).unwrap();
    assert!(marker.file_type().is_char_device());
    assert_eq!((marker.rdev(), marker.uid(), marker.gid()), (0, 1234, 5678));
    assert!(!upper(&mounts).join(".wh.a").exists());
    let merged = Mounted::new(&mounts);
    assert_eq!(merged.list(""), ["b"]);
}

#[test]
fn opaque_markers_become_xattrs_in_either_order() {
    let o = overlay_env();
    let env = &o.env;
    let lower = Tar::new()
        .dir("d/", 0o755)
        .file("d/old", b"", 0o644)
        .dir("e/", 0o755)
        .file("e/old", b"", 0o644)
        .build();
    env.layer("1", None, &lower);
    let mounts = env.sn.prepare("k", Some("1"), BTreeMap::new()).unwrap();
    let layer = Tar::new()
        .file("d/.wh..wh..opq", b"", 0o644)
        .file("d/new", b"", 0o644)
        .file("e/new", b"", 0o644)
        .file("e/.wh..wh..opq", b"", 0o644)
        .build();
    env.apply("k", &layer).unwrap();
    for dir in ["d", "e"] {
        assert_eq!(opaque_xattr(&upper(&mounts).join(dir)).unwrap(), b"y");
        assert!(!upper(&mounts).join(dir).join(".wh..wh..opq").exists());
    }
    let merged = Mounted::new(&mounts);
    assert_eq!(merged.list("d"), ["new"]);
    assert_eq!(merged.list("e"), ["new"]);
}

#[test]
fn a_directory_replacing_a_whiteout_is_opaque() {
    let o = overlay_env();
    let env = &o.env;
    env.layer(
        "1",
        None,
        &Tar::new()
            .dir("x/", 0o755)
            .file("x/lower", b"", 0o644)
            .build(),
    );
    let mounts = env.sn.prepare("k", Some("1"), BTreeMap::new()).unwrap();
    let layer = Tar::new()
        .file(".wh.x", b"", 0o644)
        .dir("x/", 0o755)
        .file("x/n", b"", 0o644)
        .dir("y/", 0o755)
        .file("y/kept", b"", 0o644)
        .file(".wh.y", b"", 0o644)
        .build();
    env.apply("k", &layer).unwrap();
    assert_eq!(opaque_xattr(&upper(&mounts).join("x")).unwrap(), b"y");
    let merged = Mounted::new(&mounts);
    assert_eq!(merged.list("x"), ["n"]);
    assert_eq!(merged.list("y"), ["kept"]);
}

#[test]
fn forged_overlay_xattrs_are_not_written() {
    let o = overlay_env();
    let env = &o.env;
    let mounts = env.sn.prepare("k", None, BTreeMap::new()).unwrap();
    let layer = Tar::new()
        .pax(&[("SCHILY.xattr.trusted.overlay.opaque", b"y")])
        .dir("d/", 0o755)
        .build();
    env.apply("k", &layer).unwrap();
    assert_eq!(
        opaque_xattr(&upper(&mounts).join("d")).unwrap_err(),
        rustix::io::Errno::NODATA
    );
}
