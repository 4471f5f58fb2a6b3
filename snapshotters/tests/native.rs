//! The native snapshotter's own form: a snapshot a layer is unpacked into shares its parent's
//! files through hardlinks, a hardlink entry that changes such a file gets a copy of its own
//! first, an inode that can take no more links is copied, and everything else (a container's
//! rootfs) is a full copy that writes never reach the parent through.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use fixtures::volume::Volume;
use snapshotters::{Backend, LayerError, Snapshots, Snapshotter, UNPACK_LABEL};
use tar::EntryType;

/// btrfs caps an inode's links at 65,535 (BTRFS_LINK_MAX), a cap a test can reach.
const LINK_MAX: u64 = 65_535;

fn native_on_btrfs(dir: &Path) -> (Snapshots, Option<Volume>) {
    let volume = Volume::btrfs(dir).unwrap();
    (open(Backend::Native, &volume.mountpoint), Some(volume))
}

fn unpack(name: &str) -> BTreeMap<String, String> {
    labels(&[(UNPACK_LABEL, name)])
}

#[test]
fn unpack_snapshots_link_the_parents_files_and_containers_copy_them() {
    let env = Env::new(native);
    let first = Tar::new()
        .dir("d/", 0o755)
        .file("d/f", b"base", 0o644)
        .symlink("s", "d/f")
        .build();
    env.layer("1", None, &first);
    let parent = env.view("1");

    let child = Mounted::new(&env.sn.prepare("extract 2", Some("1"), unpack("2")).unwrap());
    assert_eq!(child.meta("d/f").ino(), parent.meta("d/f").ino());
    assert_eq!(child.meta("s").ino(), parent.meta("s").ino());
    assert_ne!(
        child.meta("d").ino(),
        parent.meta("d").ino(),
        "directories are its own"
    );

    let container = Mounted::new(
        &env.sn
            .prepare("container", Some("1"), BTreeMap::new())
            .unwrap(),
    );
    assert_ne!(container.meta("d/f").ino(), parent.meta("d/f").ino());
    fs::write(container.path("d/f"), b"changed by the container").unwrap();
    assert_eq!(parent.read("d/f"), "base");
    assert_eq!(child.read("d/f"), "base");
}

/// A header of `kind` for `name` with the given mode, owner and mtime.
fn owned(kind: EntryType, name: &str, mode: u32, uid: u64, mtime: u64) -> tar::Header {
    let mut header = Tar::header(kind, name, mode);
    header.set_uid(uid);
    header.set_mtime(mtime);
    header
}

#[test]
fn a_hardlink_entry_changes_its_own_copy_of_a_lower_file() {
    let env = Env::new(native);
    let lower_link = owned(EntryType::Link, "t2", 0o640, 1, 1_500_000_000);
    let first = Tar::new()
        .entry(
            owned(EntryType::Regular, "t", 0o640, 1, 1_500_000_000),
            b"lower",
        )
        .entry(Tar::with_link(lower_link, "t"), b"")
        .file("u", b"untouched", 0o644)
        .build();
    env.layer("1", None, &first);
    let link = |name| Tar::with_link(owned(EntryType::Link, name, 0o600, 5, 1_700_000_000), "t");
    let second = Tar::new()
        .entry(link("l"), b"")
        .entry(link("l2"), b"")
        .build();
    env.layer("2", Some("1"), &second);

    let upper = env.view("2");
    let t = upper.meta("t");
    assert_eq!(
        (t.mode() & 0o7777, t.uid(), t.mtime()),
        (0o600, 5, 1_700_000_000)
    );
    assert_eq!(upper.meta("l").ino(), t.ino());
    assert_eq!(
        upper.meta("l2").ino(),
        t.ino(),
        "a second link joins the same copy"
    );
    assert_eq!(upper.read("l"), "lower");
    // As with overlayfs's copy-up without its index, the lower name the layer did not name
    // keeps the lower inode.
    assert_ne!(upper.meta("t2").ino(), t.ino());
    assert_eq!(upper.meta("t2").mode() & 0o7777, 0o640);

    let lower = env.view("1");
    let t = lower.meta("t");
    assert_eq!(
        (t.mode() & 0o7777, t.uid(), t.mtime()),
        (0o640, 1, 1_500_000_000)
    );
    assert_eq!(lower.meta("t2").ino(), t.ino());
    assert_eq!(lower.meta("u").ino(), upper.meta("u").ino());
    let leftovers: Vec<_> = fs::read_dir(upper.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with(".imaged"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn an_inode_at_its_link_limit_is_copied_once_for_all_its_names() {
    let env = Env::new(native_on_btrfs);
    let mut first = Tar::new()
        .dir("many/", 0o755)
        .file("many/0", b"linked", 0o644);
    for i in 1..LINK_MAX {
        first = first.link(&format!("many/{i}"), "many/0");
    }
    env.layer("1", None, &first.build());
    assert_eq!(env.view("1").meta("many/0").nlink(), LINK_MAX);

    env.layer(
        "2",
        Some("1"),
        &Tar::new().file("top", b"top", 0o644).build(),
    );
    let upper = env.view("2");
    let copy = upper.meta("many/0");
    assert_eq!(copy.nlink(), LINK_MAX);
    assert_eq!(copy.permissions().mode() & 0o7777, 0o644);
    assert_eq!(
        upper.meta(&format!("many/{}", LINK_MAX - 1)).ino(),
        copy.ino()
    );
    assert_eq!(upper.read("many/12345"), "linked");
    let lower = env.view("1");
    assert_ne!(lower.meta("many/0").ino(), copy.ino());
    assert_eq!(lower.meta("many/0").nlink(), LINK_MAX);
}

/// A layer applied alone and merged onto its parent at commit: a directory it names only
/// through a whiteout keeps the parent's attributes, one it names itself keeps its own
/// (times included, though the merge linked into it), hardlinks of the parent stay one
/// inode, and an opaque root hides all of the parent.
#[test]
fn a_layer_applied_alone_merges_onto_its_parent() {
    let mut env = Env::new(native);
    env.unpack = Unpack::Rebased;
    let first = Tar::new()
        .entry(
            owned(EntryType::Directory, "a/", 0o750, 7, 1_500_000_000),
            b"",
        )
        .file("a/x", b"x", 0o644)
        .file("a/y", b"y", 0o644)
        .entry(
            owned(EntryType::Directory, "b/", 0o755, 0, 1_500_000_000),
            b"",
        )
        .file("b/old", b"old", 0o644)
        .file("t", b"target", 0o644)
        .link("t2", "t")
        .build();
    env.layer("1", None, &first);
    let second = Tar::new()
        .file("a/.wh.x", b"", 0o644)
        .entry(
            owned(EntryType::Directory, "b/", 0o711, 0, 1_600_000_000),
            b"",
        )
        .file("b/new", b"new", 0o644)
        .build();
    env.layer("2", Some("1"), &second);
    let view = env.view("2");
    assert_eq!(view.list("a"), ["y"]);
    let a = view.meta("a");
    assert_eq!(
        (a.mode() & 0o7777, a.uid(), a.mtime()),
        (0o750, 7, 1_500_000_000)
    );
    assert_eq!(view.list("b"), ["new", "old"]);
    let b = view.meta("b");
    assert_eq!((b.mode() & 0o7777, b.mtime()), (0o711, 1_600_000_000));
    assert_eq!(view.meta("t").ino(), view.meta("t2").ino());
    assert_eq!(view.meta("t").ino(), env.view("1").meta("t").ino());
    drop(view);

    let third = Tar::new()
        .file(".wh..wh..opq", b"", 0o644)
        .file("only", b"only", 0o644)
        .build();
    env.layer("3", Some("2"), &third);
    assert_eq!(env.view("3").list(""), ["only"]);
    assert_eq!(env.view("2").list("b"), ["new", "old"]);
}

/// Nothing of the parent reaches a layer's snapshot before its commit, and a failed rebase
/// (the parent is gone) leaves the layer's snapshot Active and unmerged.
#[test]
fn the_merge_happens_at_commit_and_only_onto_a_committed_parent() {
    let env = Env::new(native);
    env.layer("1", None, &Tar::new().file("below", b"b", 0o644).build());
    let key = "extract 2";
    let mounts = env.sn.prepare(key, None, unpack("2")).unwrap();
    env.apply(key, &Tar::new().file("above", b"a", 0o644).build())
        .unwrap();
    assert_eq!(Mounted::new(&mounts).list(""), ["above"]);
    assert!(matches!(
        env.sn.commit("2", key, Some("missing"), unpack("2")),
        Err(snapshotters::Error::NotFound { .. })
    ));
    assert_eq!(Mounted::new(&mounts).list(""), ["above"]);
    env.sn.commit("2", key, Some("1"), unpack("2")).unwrap();
    assert_eq!(env.view("2").list(""), ["above", "below"]);
}

/// Where a merge cannot give what applying the layer onto a copy of its parent gives, the
/// rebase is refused before anything changes: a path through the parent's symlink (a
/// usr-merged `bin`), a whiteout through it, a path through the parent's file.
#[test]
fn paths_through_the_parents_symlinks_or_files_refuse_the_merge() {
    let mut env = Env::new(native);
    env.unpack = Unpack::Rebased;
    let base = Tar::new()
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .file("usr/bin/x", b"x", 0o755)
        .symlink("bin", "usr/bin")
        .file("file", b"f", 0o644)
        .build();
    env.layer("1", None, &base);
    let layers = [
        Tar::new().file("bin/new", b"n", 0o755).build(),
        Tar::new().file("bin/.wh.x", b"", 0o644).build(),
        Tar::new().file("file/inner", b"i", 0o644).build(),
    ];
    for (i, layer) in layers.iter().enumerate() {
        let key = format!("extract {i}");
        env.sn.prepare(&key, None, unpack("2")).unwrap();
        env.apply(&key, layer).unwrap();
        let err = env
            .sn
            .commit("2", &key, Some("1"), unpack("2"))
            .unwrap_err();
        assert!(
            matches!(
                err,
                snapshotters::Error::Layer {
                    reason: LayerError::NeedsParent { .. },
                    ..
                }
            ),
            "layer {i}: {err}"
        );
        assert_eq!(env.sn.stat(&key).unwrap().kind, snapshotters::Kind::Active);
        // Nothing changed, so nothing is marked: the same refusal again.
        let again = env.sn.commit("2", &key, Some("1"), unpack("2"));
        assert!(
            matches!(
                again,
                Err(snapshotters::Error::Layer {
                    reason: LayerError::NeedsParent { .. },
                    ..
                })
            ),
            "layer {i}: {again:?}"
        );
        env.sn.remove(&key).unwrap();
    }
    // Onto a copy of the parent, they go through.
    env.unpack = Unpack::OnParent;
    env.layer("2", Some("1"), &layers[0]);
    env.layer("3", Some("2"), &layers[1]);
    assert_eq!(env.view("3").list("usr/bin"), ["new"]);
}

/// A whiteout in a directory the parent lacks creates nothing, and a directory the layer
/// only implies below a path it hid keeps the layer's attributes, not the hidden one's.
#[test]
fn whiteouts_leave_nothing_of_their_own_after_a_merge() {
    let mut env = Env::new(native);
    env.unpack = Unpack::Rebased;
    let base = Tar::new()
        .entry(
            owned(EntryType::Directory, "x/", 0o700, 5, 1_500_000_000),
            b"",
        )
        .file("x/old", b"old", 0o644)
        .build();
    env.layer("1", None, &base);
    let layer = Tar::new()
        .file("nowhere/.wh.y", b"", 0o644)
        .file(".wh.x", b"", 0o644)
        .file("x/new", b"new", 0o644)
        .build();
    env.layer("2", Some("1"), &layer);
    let view = env.view("2");
    assert_eq!(view.list(""), ["x"]);
    assert_eq!(view.list("x"), ["new"]);
    let x = view.meta("x");
    assert_eq!((x.mode() & 0o7777, x.uid()), (0o755, 0));
}

/// The same layers give the same tree whether each is applied onto a copy of its parent
/// or applied alone and merged onto it.
#[test]
fn merged_layers_give_the_tree_of_layers_applied_onto_their_parents() {
    let layers = [
        Tar::new()
            .entry(
                owned(EntryType::Directory, "etc/", 0o750, 3, 1_400_000_000),
                b"",
            )
            .file("etc/a", b"a", 0o644)
            .file("etc/b", b"b", 0o600)
            .dir("var/", 0o755)
            .dir("var/lib/", 0o700)
            .file("var/lib/db", b"db", 0o640)
            .link("var/lib/db-link", "var/lib/db")
            .symlink("etc/s", "a")
            .dir("gone/", 0o755)
            .file("gone/f", b"f", 0o644)
            .build(),
        Tar::new()
            .file("etc/.wh.a", b"", 0o644)
            .file("etc/c", b"c", 0o644)
            .file("var/lib/.wh..wh..opq", b"", 0o644)
            .file("var/lib/fresh", b"fresh", 0o644)
            .file(".wh.gone", b"", 0o644)
            .dir("gone/", 0o711)
            .file("gone/again", b"again", 0o644)
            .build(),
        Tar::new()
            .dir("etc/b/", 0o755)
            .file("etc/b/inside", b"i", 0o644)
            .file("etc/s", b"now a file", 0o644)
            .file("deep/er/file", b"d", 0o644)
            .build(),
    ];
    let tree = |unpack: Unpack| {
        let mut env = Env::new(native);
        env.unpack = unpack;
        let mut parent = None;
        for (i, layer) in layers.iter().enumerate() {
            let name = i.to_string();
            env.layer(&name, parent.as_deref(), layer);
            parent = Some(name);
        }
        assert_eq!(beside_trees(&env), Vec::<String>::new());
        let view = env.view(parent.as_deref().unwrap());
        fixtures::tree::Tree::read(&view.path("")).unwrap()
    };
    let (on_parents, merged) = (tree(Unpack::OnParent), tree(Unpack::Rebased));
    let options = fixtures::tree::DiffOptions { file_mtimes: true };
    assert_eq!(on_parents.diff_with(&merged, options), Vec::<String>::new());
    assert_eq!(merged.diff_with(&on_parents, options), Vec::<String>::new());
    assert_eq!(on_parents.nodes.len(), merged.nodes.len());
}

/// A whiteout or opaque directory through a symlink the layer itself holds hides what
/// lies where the symlink leads, which only the parent's tree shows: the layer applied
/// alone cannot be merged onto a parent (it can be committed without one), and applied
/// onto its parent it hides the right entry.
#[test]
fn whiteouts_through_the_layers_own_symlink_need_the_parent() {
    let mut env = Env::new(native);
    env.unpack = Unpack::Rebased;
    let base = Tar::new()
        .dir("usr/", 0o755)
        .dir("usr/lib/", 0o755)
        .file("usr/lib/x", b"x", 0o644)
        .file("usr/lib/y", b"y", 0o644)
        .build();
    env.layer("1", None, &base);
    let layers = [
        Tar::new()
            .symlink("lib", "usr/lib")
            .file("lib/.wh.x", b"", 0o644)
            .build(),
        Tar::new()
            .symlink("lib", "/usr/lib")
            .file("lib/.wh..wh..opq", b"", 0o644)
            .build(),
    ];
    assert!(env.layer_or_onto_parent("2", Some("1"), &layers[0]));
    assert_eq!(env.view("2").list("usr/lib"), ["y"]);
    assert!(env.layer_or_onto_parent("3", Some("1"), &layers[1]));
    assert!(env.view("3").list("usr/lib").is_empty());
    // As a base layer there is nothing below to reach.
    env.layer("base", None, &layers[0]);
    assert_eq!(env.view("base").list(""), ["lib"]);
    env.layer("opaque base", None, &layers[1]);
    assert!(env.view("opaque base").list("usr/lib").is_empty());
    assert_eq!(beside_trees(&env), Vec::<String>::new());
}

/// What the snapshot directories hold besides `fs` (and the `linked` marker): the lists
/// and marks of a rebase, which go once the commit is in.
fn beside_trees(env: &Env) -> Vec<String> {
    let mut found = Vec::new();
    for dir in fs::read_dir(env.snapshots()).unwrap() {
        for entry in fs::read_dir(dir.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap();
            if name != "fs" && name != "linked" {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// A whiteout below one of the layer's own files hides what the file replaces anyway:
/// nothing to refuse.
#[test]
fn a_whiteout_below_the_layers_own_file_merges() {
    let mut env = Env::new(native);
    env.unpack = Unpack::Rebased;
    let base = Tar::new().dir("d/", 0o755).file("d/x", b"x", 0o644).build();
    env.layer("1", None, &base);
    let layer = Tar::new()
        .file(".wh.d", b"", 0o644)
        .file("d", b"now a file", 0o644)
        .file("d/.wh.x", b"", 0o644)
        .build();
    assert!(!env.layer_or_onto_parent("2", Some("1"), &layer));
    assert_eq!(env.view("2").read("d"), "now a file");
}

/// Once a commit merged a layer's tree onto a parent, only a commit onto that same parent
/// may follow (its transaction failed: the name was taken), and it merges nothing twice.
#[test]
fn a_merged_tree_commits_only_onto_the_parent_it_was_merged_onto() {
    let env = Env::new(native);
    env.layer("1", None, &Tar::new().file("below", b"b", 0o644).build());
    env.layer(
        "other",
        None,
        &Tar::new().file("elsewhere", b"e", 0o644).build(),
    );
    let key = "extract 2";
    env.sn.prepare(key, None, unpack("2")).unwrap();
    env.apply(key, &Tar::new().file("above", b"a", 0o644).build())
        .unwrap();
    assert!(matches!(
        env.sn.commit("other", key, Some("1"), unpack("2")),
        Err(snapshotters::Error::AlreadyExists { .. })
    ));
    let err = env
        .apply(key, &Tar::new().file("late", b"l", 0o644).build())
        .unwrap_err();
    assert!(
        matches!(&err, snapshotters::Error::FailedPrecondition { .. }),
        "{err}"
    );
    for parent in [Some("other"), None] {
        let err = env.sn.commit("2", key, parent, unpack("2")).unwrap_err();
        assert!(
            matches!(&err, snapshotters::Error::FailedPrecondition { key: k, .. } if k == key),
            "{parent:?}: {err}"
        );
        assert!(err.to_string().contains("\"1\""), "{err}");
    }
    env.sn.commit("2", key, Some("1"), unpack("2")).unwrap();
    assert_eq!(env.view("2").list(""), ["above", "below"]);
}

/// A merge that stopped part way (here: the layer's directory is immutable, so nothing
/// can be linked into it) leaves a tree that is neither the layer nor the layer on its
/// parent: every later commit is refused, and the snapshot can only be removed.
#[test]
fn a_merge_that_stopped_part_way_refuses_every_commit() {
    let env = Env::new(native);
    let base = Tar::new()
        .dir("d/", 0o755)
        .file("d/from-parent", b"p", 0o644)
        .build();
    env.layer("1", None, &base);
    let key = "extract 2";
    let mounts = env.sn.prepare(key, None, unpack("2")).unwrap();
    env.apply(
        key,
        &Tar::new()
            .dir("d/", 0o755)
            .file("d/own", b"o", 0o644)
            .build(),
    )
    .unwrap();
    let active = Mounted::new(&mounts);
    let immutable = |on: bool| {
        let dir = fs::File::open(active.path("d")).unwrap();
        let flags = rustix::fs::ioctl_getflags(&dir).unwrap();
        let flags = match on {
            true => flags | rustix::fs::IFlags::IMMUTABLE,
            false => flags - rustix::fs::IFlags::IMMUTABLE,
        };
        rustix::fs::ioctl_setflags(&dir, flags).unwrap();
    };
    immutable(true);
    let failed = env.sn.commit("2", key, Some("1"), unpack("2"));
    immutable(false);
    assert!(
        matches!(failed, Err(snapshotters::Error::Io { .. })),
        "{failed:?}"
    );
    for parent in [Some("1"), None] {
        let err = env.sn.commit("2", key, parent, unpack("2")).unwrap_err();
        assert!(
            matches!(&err, snapshotters::Error::FailedPrecondition { .. }),
            "{parent:?}: {err}"
        );
        assert!(err.to_string().contains("part way"), "{err}");
    }
    drop(active);
    env.sn.remove(key).unwrap();
    assert!(env.sn.stat(key).is_err());
}
