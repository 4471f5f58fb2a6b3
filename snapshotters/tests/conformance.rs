//! One conformance suite for every snapshotter: each check is written once, takes a
//! constructor, and runs against overlayfs (on the test machine's disk), btrfs (on a
//! loop-mounted file formatted for the test) and native (on any directory), as containerd's
//! snapshot test suite does. Checks cover the model's rules (kinds, keys, parents, labels,
//! usage, removal, cleanup) and look at layer results through the mounts the snapshotter
//! returns. Backend-specific checks live beside this file.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use snapshotters::{Backend, Error, ErrorKind, Kind, LayerError, Snapshotter};
use tar::EntryType;

macro_rules! conformance {
    ($([$backend:ident, $new:expr]),* ; $checks:tt) => {
        $(conformance!(@one $backend, $new, $checks);)*
    };
    (@one $backend:ident, $new:expr, [$($check:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[test]
                fn $check() {
                    super::$check($new)
                }
            )*
        }
    };
}

conformance!(
    [overlayfs, (super::overlayfs, super::Unpack::OnParent)],
    [btrfs, (super::btrfs, super::Unpack::OnParent)],
    [native, (super::native, super::Unpack::OnParent)],
    [native_rebased, (super::native, super::Unpack::Rebased)];
    [
        unpack_keys_labels_and_chain_names,
        one_of_two_concurrent_commits_of_a_chain_wins,
        prepare_and_view_errors,
        commit_errors_and_labels,
        a_parent_with_children_cannot_be_removed,
        whiteouts_and_opaque_directories_hide_lower_content,
        directories_and_files_replace_each_other,
        hardlinks_within_a_layer,
        setuid_setgid_sticky_and_capabilities,
        pax_owners_beyond_the_ustar_range,
        times_with_nanoseconds,
        device_nodes_and_fifos,
        apply_reads_to_eof_and_failed_layers_are_removable,
        the_root_entry_is_ignored,
        dotdot_and_absolute_names_are_clamped,
        symlinked_parents_resolve_inside,
        a_parent_swapped_for_a_symlink_stays_inside,
        a_final_symlink_is_replaced_not_followed,
        a_directory_replaces_a_symlink,
        hardlinks_resolve_inside,
        invalid_whiteout_names_are_refused,
        forged_overlay_xattrs_hide_nothing,
        symlink_loops_fail_quickly,
        header_bombs_are_refused_early,
        many_small_files_land_in_archive_order,
        rebase_commit_where_offered_and_refused_elsewhere,
        cleanup_removes_crash_leftovers,
        check_finds_and_repairs_what_disagrees_with_the_disk,
        whiteouts_through_a_hostile_parent_stay_inside,
        a_whiteout_after_entries_of_its_directory_hides_only_the_lower_ones,
        three_parents_stack_nearest_first,
        views_are_read_only,
        parent_chains_of_depth_1_2_and_130,
        deletions_across_layers,
        hardlinks_across_layers,
        types_change_across_layers,
        metadata_survives_into_children,
        sparse_files_stay_sparse_in_children,
        limits_cap_entries_bytes_and_depth,
        synced_applies_land,
    ]
);

pub fn unpack_keys_labels_and_chain_names(new: Setup) {
    let env = Env::setup(new);
    let chain = "sha256:c3191d32a37d7159b2e30830937d2e30268ad6c375a773a8994911a3aba9b93f";
    let key = format!("extract-173024513-x2Qf {chain}");
    let unpack_labels = labels(&[("containerd.io/snapshot.ref", chain)]);
    env.sn.prepare(&key, None, unpack_labels.clone()).unwrap();
    assert_eq!(env.sn.stat(&key).unwrap().labels, unpack_labels);
    env.apply(&key, &Tar::new().file("f", b"x", 0o644).build())
        .unwrap();
    env.sn
        .commit(chain, &key, None, unpack_labels.clone())
        .unwrap();

    let info = env.sn.stat(chain).unwrap();
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.labels, unpack_labels);
    assert!(matches!(env.sn.stat(&key), Err(Error::NotFound { .. })));
    // A second pull finds the chain committed and prepares nothing.
    let mut names = Vec::new();
    env.sn
        .walk(&mut |info| names.push(info.name.clone()))
        .unwrap();
    assert_eq!(names, [chain]);
}

pub fn one_of_two_concurrent_commits_of_a_chain_wins(new: Setup) {
    let env = Env::setup(new);
    let layer = Tar::new()
        .dir("d/", 0o755)
        .file("d/f", b"same", 0o644)
        .build();
    let barrier = std::sync::Barrier::new(2);
    let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let (env, layer, barrier) = (&env, &layer, &barrier);
                s.spawn(move || {
                    let key = format!("extract-{i} sha256:chain");
                    env.sn.prepare(&key, None, BTreeMap::new()).unwrap();
                    env.apply(&key, layer).unwrap();
                    barrier.wait();
                    let result = env.sn.commit("sha256:chain", &key, None, BTreeMap::new());
                    if let Err(Error::AlreadyExists { .. }) = result {
                        env.sn.remove(&key).unwrap();
                    }
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(Error::AlreadyExists { key }) if key == "sha256:chain"))
    );
    let mut all = Vec::new();
    env.sn
        .walk(&mut |info| all.push((info.name.clone(), info.kind)))
        .unwrap();
    assert_eq!(all, [("sha256:chain".to_owned(), Kind::Committed)]);
    assert_eq!(env.view("sha256:chain").read("d/f"), "same");
}

pub fn prepare_and_view_errors(new: Setup) {
    let env = Env::setup(new);
    env.sn.prepare("k", None, BTreeMap::new()).unwrap();
    assert!(
        matches!(env.sn.prepare("k", None, BTreeMap::new()), Err(Error::AlreadyExists { key }) if key == "k")
    );
    assert!(matches!(
        env.sn.view("k", None, BTreeMap::new()),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        env.sn.prepare("c", Some("k"), BTreeMap::new()),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(
        matches!(env.sn.prepare("c", Some("nope"), BTreeMap::new()), Err(Error::NotFound { key }) if key == "nope")
    );
    env.sn.view("v", None, BTreeMap::new()).unwrap();
    assert!(matches!(
        env.sn.view("c", Some("v"), BTreeMap::new()),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(env.sn.stat("c"), Err(Error::NotFound { .. })));
}

pub fn commit_errors_and_labels(new: Setup) {
    let env = Env::setup(new);
    env.layer("base", None, &Tar::new().file("f", b"1", 0o644).build());
    env.sn.view("v", Some("base"), BTreeMap::new()).unwrap();
    assert!(matches!(
        env.sn.commit("x", "v", None, BTreeMap::new()),
        Err(Error::FailedPrecondition { .. })
    ));

    env.sn
        .prepare("k", Some("base"), labels(&[("from", "prepare")]))
        .unwrap();
    assert!(
        matches!(env.sn.commit("base", "k", None, BTreeMap::new()), Err(Error::AlreadyExists { key }) if key == "base")
    );
    assert_eq!(env.sn.stat("k").unwrap().kind, Kind::Active);
    assert!(matches!(
        env.sn.commit("y", "missing", None, BTreeMap::new()),
        Err(Error::NotFound { .. })
    ));

    env.sn
        .commit("top", "k", None, labels(&[("from", "commit")]))
        .unwrap();
    let info = env.sn.stat("top").unwrap();
    assert_eq!(info.labels, labels(&[("from", "commit")]));
    assert_eq!(info.parent.as_deref(), Some("base"));
    env.sn
        .commit("empty-labels", "k", None, BTreeMap::new())
        .unwrap_err();
}

pub fn a_parent_with_children_cannot_be_removed(new: Setup) {
    let env = Env::setup(new);
    env.layer("a", None, &Tar::new().file("a", b"a", 0o644).build());
    env.layer("b", Some("a"), &Tar::new().file("b", b"b", 0o644).build());
    env.sn.prepare("c", Some("b"), BTreeMap::new()).unwrap();
    assert!(matches!(
        env.sn.remove("a"),
        Err(Error::FailedPrecondition { .. })
    ));
    assert!(matches!(
        env.sn.remove("b"),
        Err(Error::FailedPrecondition { .. })
    ));
    env.sn.remove("c").unwrap();
    env.sn.remove("b").unwrap();
    env.sn.remove("a").unwrap();
    assert!(matches!(env.sn.remove("a"), Err(Error::NotFound { .. })));
    env.sn.cleanup().unwrap();
    let mut count = 0;
    env.sn.walk(&mut |_| count += 1).unwrap();
    assert_eq!(count, 0);
}

pub fn stat_update_usage_walk_and_kinds(new: Setup) {
    let env = Env::setup(new);
    env.sn.prepare("a", None, labels(&[("x", "1")])).unwrap();
    let info = env.sn.stat("a").unwrap();
    assert_eq!(
        (info.kind, info.parent.clone(), info.labels.clone()),
        (Kind::Active, None, labels(&[("x", "1")]))
    );
    env.apply(
        "a",
        &Tar::new()
            .file("big", &vec![7u8; 100 * 1024], 0o644)
            .build(),
    )
    .unwrap();
    let usage = env.sn.usage("a").unwrap();
    assert!(usage.size >= 100 * 1024, "{usage:?}");
    assert_eq!(usage.inodes, 2);

    env.sn
        .commit("A", "a", None, labels(&[("y", "2")]))
        .unwrap();
    assert_eq!(env.sn.usage("A").unwrap(), usage);
    assert!(matches!(
        env.sn.mounts("A"),
        Err(Error::FailedPrecondition { .. })
    ));

    let mut requested = env.sn.stat("A").unwrap();
    requested.labels = labels(&[("y", "3"), ("z", "4")]);
    assert_eq!(
        env.sn.update(&requested, &["labels.z"]).unwrap().labels,
        labels(&[("y", "2"), ("z", "4")])
    );
    assert_eq!(
        env.sn.update(&requested, &[]).unwrap().labels,
        labels(&[("y", "3"), ("z", "4")])
    );
    requested.labels = BTreeMap::new();
    assert_eq!(
        env.sn.update(&requested, &["labels.y"]).unwrap().labels,
        labels(&[("z", "4")])
    );
    assert!(matches!(
        env.sn.update(&requested, &["parent"]),
        Err(Error::InvalidArgument { .. })
    ));
    assert_eq!(env.sn.stat("A").unwrap().labels, labels(&[("z", "4")]));

    let view_mounts = env.sn.view("v", Some("A"), BTreeMap::new()).unwrap();
    assert!(matches!(
        env.apply("v", &Tar::new().build()),
        Err(Error::FailedPrecondition { .. })
    ));
    assert!(matches!(
        env.apply("A", &Tar::new().build()),
        Err(Error::FailedPrecondition { .. })
    ));
    assert_eq!(env.sn.mounts("v").unwrap(), view_mounts);
    let mut seen = Vec::new();
    env.sn
        .walk(&mut |info| seen.push((info.name.clone(), info.kind, info.parent.clone())))
        .unwrap();
    assert_eq!(
        seen,
        [
            ("A".to_owned(), Kind::Committed, None),
            ("v".to_owned(), Kind::View, Some("A".to_owned())),
        ]
    );
    assert!(env.sn.root().is_absolute());
}

pub fn whiteouts_and_opaque_directories_hide_lower_content(new: Setup) {
    let env = Env::setup(new);
    let base = Tar::new()
        .file("a", b"a", 0o644)
        .file("b", b"b", 0o644)
        .dir("d/", 0o755)
        .file("d/old", b"old", 0o644)
        .dir("e/", 0o755)
        .file("e/old", b"old", 0o644)
        .dir("x/", 0o755)
        .file("x/lower", b"lower", 0o644)
        .build();
    env.layer("1", None, &base);
    let top = Tar::new()
        .file(".wh.a", b"", 0o644)
        .file("d/.wh..wh..opq", b"", 0o644)
        .file("d/new", b"new", 0o644)
        .file("e/new", b"new", 0o644)
        .file("e/.wh..wh..opq", b"", 0o644)
        .file(".wh.x", b"", 0o644)
        .dir("x/", 0o755)
        .file("x/n", b"n", 0o644)
        .build();
    env.layer("2", Some("1"), &top);
    let view = env.view("2");
    assert!(!view.exists("a"));
    assert_eq!(view.read("b"), "b");
    assert_eq!(view.list("d"), ["new"]);
    assert_eq!(view.list("e"), ["new"]);
    assert_eq!(view.list("x"), ["n"]);
}

pub fn directories_and_files_replace_each_other(new: Setup) {
    let env = Env::setup(new);
    let lower = Tar::new()
        .dir("d/", 0o755)
        .file("d/old", b"old", 0o644)
        .dir("t/", 0o755)
        .dir("t/child/", 0o755)
        .file("t/child/deep", b"deep", 0o644)
        .file("x", b"file", 0o644)
        .build();
    env.layer("1", None, &lower);
    let mut d = Tar::header(EntryType::Directory, "d/", 0o700);
    d.set_uid(5);
    d.set_gid(6);
    d.set_mtime(1234);
    let upper = Tar::new()
        .entry(d, b"")
        .file("t", b"now a file", 0o644)
        .dir("x/", 0o750)
        .file("x/inner", b"inner", 0o644)
        .build();
    env.layer("2", Some("1"), &upper);
    let view = env.view("2");
    assert_eq!(view.list("d"), ["old"]);
    let meta = view.meta("d");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.mtime()),
        (0o700, 5, 6, 1234)
    );
    assert!(view.meta("t").is_file());
    assert_eq!(view.read("t"), "now a file");
    assert!(view.meta("x").is_dir());
    assert_eq!(view.list("x"), ["inner"]);

    let same_layer = Tar::new()
        .dir("d/", 0o755)
        .file("d/a", b"a", 0o644)
        .dir("d/", 0o711)
        .dir("t/", 0o755)
        .file("t/c", b"c", 0o644)
        .file("t", b"file", 0o644)
        .file("f", b"file", 0o644)
        .dir("f/", 0o755)
        .build();
    let applied = env.applied(&same_layer);
    assert_eq!(applied.list("d"), ["a"]);
    assert_eq!(applied.meta("d").mode() & 0o7777, 0o711);
    assert_eq!(applied.read("t"), "file");
    assert!(applied.meta("f").is_dir());
}

pub fn hardlinks_within_a_layer(new: Setup) {
    let env = Env::setup(new);
    let layer = Tar::new()
        .file("a", b"data", 0o644)
        .link("b", "a")
        .symlink("s", "a")
        .link("h", "s")
        .dir("sub/", 0o755)
        .link("sub/c", "./a")
        .build();
    let applied = env.applied(&layer);
    assert_eq!(applied.meta("a").ino(), applied.meta("b").ino());
    assert_eq!(applied.meta("a").ino(), applied.meta("sub/c").ino());
    assert_eq!(applied.meta("a").nlink(), 3);
    assert!(applied.meta("h").file_type().is_symlink());
    assert_eq!(applied.meta("h").ino(), applied.meta("s").ino());

    let to_dir = Tar::new().dir("d/", 0o755).link("l", "d").build();
    assert!(matches!(
        env.apply_err(&to_dir),
        LayerError::Io {
            op: "hard link",
            ..
        }
    ));
    let to_missing = Tar::new().link("l", "missing").build();
    assert_missing_target(&env, env.apply_err(&to_missing), "missing");
}

/// A parentless layer's hardlink to `target`, which it does not contain: a failed link, or
/// for native (which merges such a layer onto its parent later) a link that needs the parent.
fn assert_missing_target(env: &Env, err: LayerError, target: &str) {
    match env.sn.backend() {
        Backend::Native => assert!(
            matches!(err, LayerError::NeedsParent { target: ref t } if t == target),
            "{err}"
        ),
        _ => assert!(matches!(err, LayerError::Io { .. }), "{err}"),
    }
}

pub fn setuid_setgid_sticky_and_capabilities(new: Setup) {
    let env = Env::setup(new);
    // VFS_CAP_REVISION_2 with the effective flag; cap_net_bind_service permitted.
    let cap: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut owned = Tar::header(EntryType::Regular, "cap", 0o755);
    owned.set_uid(1000);
    owned.set_gid(1000);
    let layer = Tar::new()
        .file("suid", b"#!", 0o4755)
        .dir("sgid/", 0o2755)
        .dir("sticky/", 0o1777)
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.note", b"kept"),
        ])
        .entry(owned, b"binary")
        .build();
    let applied = env.applied(&layer);
    assert_eq!(applied.meta("suid").mode() & 0o7777, 0o4755);
    assert_eq!(applied.meta("sgid").mode() & 0o7777, 0o2755);
    assert_eq!(applied.meta("sticky").mode() & 0o7777, 0o1777);
    let meta = applied.meta("cap");
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (1000, 0o755));
    let mut buf = [0u8; 64];
    let n =
        rustix::fs::lgetxattr(applied.path("cap"), "security.capability", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], &cap);
    let n = rustix::fs::lgetxattr(applied.path("cap"), "user.note", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"kept");
}

pub fn pax_owners_beyond_the_ustar_range(new: Setup) {
    let env = Env::setup(new);
    let mut header = Tar::header(EntryType::Regular, "owned", 0o644);
    header.set_username("root").unwrap();
    header.set_groupname("root").unwrap();
    let layer = Tar::new()
        .pax(&[("uid", b"3000000"), ("gid", b"3000001"), ("uname", b"root")])
        .entry(header, b"x")
        .build();
    let applied = env.applied(&layer);
    let meta = applied.meta("owned");
    assert_eq!((meta.uid(), meta.gid()), (3_000_000, 3_000_001));
}

pub fn times_with_nanoseconds(new: Setup) {
    let env = Env::setup(new);
    let mut dir = Tar::header(EntryType::Directory, "d/", 0o755);
    dir.set_mtime(1_500_000_000);
    let mut zero = Tar::header(EntryType::Regular, "zero", 0o644);
    zero.set_mtime(0);
    let layer = Tar::new()
        .entry(dir, b"")
        .file("d/child", b"c", 0o644)
        .dir("d/sub/", 0o755)
        .pax(&[("mtime", b"1600000000.123456789"), ("atime", b"1.5")])
        .file("precise", b"p", 0o644)
        .entry(zero, b"")
        .symlink("link", "precise")
        .build();
    let applied = env.applied(&layer);
    assert_eq!(applied.meta("d").mtime(), 1_500_000_000);
    let precise = applied.meta("precise");
    assert_eq!(
        (precise.mtime(), precise.mtime_nsec()),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!(
        (precise.atime(), precise.atime_nsec()),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!(applied.meta("zero").mtime(), 0);
    assert_eq!(applied.meta("link").mtime(), MTIME as i64);
    assert_eq!(applied.meta("d/sub").mtime(), MTIME as i64);
}

pub fn device_nodes_and_fifos(new: Setup) {
    let env = Env::setup(new);
    let mut null = Tar::header(EntryType::Char, "dev/null", 0o666);
    null.set_device_major(1).unwrap();
    null.set_device_minor(3).unwrap();
    let mut block = Tar::header(EntryType::Block, "dev/loop0", 0o660);
    block.set_device_major(7).unwrap();
    block.set_device_minor(0).unwrap();
    let layer = Tar::new()
        .dir("dev/", 0o755)
        .entry(null, b"")
        .entry(block, b"")
        .entry(Tar::header(EntryType::Fifo, "fifo", 0o600), b"")
        .build();
    let applied = env.applied(&layer);
    let null = applied.meta("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (null.rdev(), null.mode() & 0o7777),
        (rustix::fs::makedev(1, 3), 0o666)
    );
    let block = applied.meta("dev/loop0");
    assert!(block.file_type().is_block_device());
    assert_eq!(block.rdev(), rustix::fs::makedev(7, 0));
    assert!(applied.meta("fifo").file_type().is_fifo());

    let mut huge = Tar::header(EntryType::Char, "huge", 0o666);
    huge.as_ustar_mut().unwrap().dev_major = [0x80, 0, 0, 1, 0, 0, 0, 0];
    assert!(matches!(
        env.apply_err(&Tar::new().entry(huge, b"").build()),
        LayerError::DeviceNumber
    ));
}

pub fn apply_reads_to_eof_and_failed_layers_are_removable(new: Setup) {
    let env = Env::setup(new);
    let mut stream = Tar::new()
        .file("f", b"hello", 0o644)
        .dir("d/", 0o755)
        .build();
    stream.extend_from_slice(b"trailing bytes after the end-of-archive blocks");
    env.sn.prepare("k", None, BTreeMap::new()).unwrap();
    let mut reader = Counting {
        inner: &stream,
        read: 0,
    };
    let stats = env
        .sn
        .apply("k", &mut io::BufReader::new(&mut reader))
        .unwrap();
    assert_eq!(reader.read, stream.len());
    assert_eq!((stats.entries, stats.bytes), (2, 5));

    let mut truncated = Tar::new().file("big", &[1u8; 4096], 0o644).build();
    truncated.truncate(1024);
    env.sn.prepare("bad", None, BTreeMap::new()).unwrap();
    let err = env.apply("bad", &truncated).unwrap_err();
    assert!(
        matches!(err, Error::Layer { ref path, reason: LayerError::Truncated } if path == "big"),
        "{err}"
    );
    env.sn.remove("bad").unwrap();
    assert!(matches!(env.sn.stat("bad"), Err(Error::NotFound { .. })));

    let corrupt = {
        let mut bytes = Tar::new().file("f", b"x", 0o644).build();
        bytes[0] ^= 1;
        bytes
    };
    assert!(matches!(env.apply_err(&corrupt), LayerError::Checksum));
    let unknown = Tar::new()
        .entry(Tar::header(EntryType::new(b'7'), "contiguous", 0o644), b"")
        .build();
    assert!(matches!(
        env.apply_err(&unknown),
        LayerError::UnsupportedType('7')
    ));
    let sparse = Tar::new()
        .entry(Tar::header(EntryType::GNUSparse, "sparse", 0o644), b"")
        .build();
    assert!(matches!(env.apply_err(&sparse), LayerError::Sparse));
}

pub fn the_root_entry_is_ignored(new: Setup) {
    let env = Env::setup(new);
    let mut root = Tar::header(EntryType::Directory, "./", 0o700);
    root.set_uid(77);
    let applied = env.applied(&Tar::new().entry(root, b"").file("f", b"x", 0o644).build());
    let meta = applied.meta("");
    assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o755, 0));
    assert_eq!(applied.list(""), ["f"]);
}

pub fn dotdot_and_absolute_names_are_clamped(new: Setup) {
    let env = Env::setup(new);
    let host = host_scratch("pwn");
    let rel = host.strip_prefix("/").unwrap().to_str().unwrap();
    let layer = Tar::new()
        .file(&format!("../../../../{rel}"), b"dotdot", 0o644)
        .file(&format!("/{rel}-abs"), b"absolute", 0o644)
        .build();
    let applied = env.applied(&layer);
    assert_eq!(applied.read(rel), "dotdot");
    assert_eq!(applied.read(&format!("{rel}-abs")), "absolute");
    assert!(!host.exists());
    assert!(!PathBuf::from(format!("{}-abs", host.display())).exists());
}

pub fn symlinked_parents_resolve_inside(new: Setup) {
    let env = Env::setup(new);
    let outside = env.outside();
    let rel = outside
        .strip_prefix("/")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let layer = Tar::new()
        .symlink("abs", outside.to_str().unwrap())
        .file("abs/passwd", b"abs", 0o644)
        .symlink("rel", &format!("../../../../../../../../../{rel}/r"))
        .file("rel/passwd", b"rel", 0o644)
        .symlink("chain1", "chain2")
        .symlink("chain2", &format!("{}/c", outside.display()))
        .file("chain1/passwd", b"chain", 0o644)
        .build();
    let applied = env.applied(&layer);
    assert_eq!(applied.read(&format!("{rel}/passwd")), "abs");
    assert_eq!(applied.read(&format!("{rel}/r/passwd")), "rel");
    assert_eq!(applied.read(&format!("{rel}/c/passwd")), "chain");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

pub fn a_parent_swapped_for_a_symlink_stays_inside(new: Setup) {
    let env = Env::setup(new);
    let host = host_scratch("swap");
    let name = host.file_name().unwrap().to_str().unwrap().to_owned();
    let layer = Tar::new()
        .dir("foo/", 0o755)
        .file(&format!("foo/tmp/{name}"), b"first", 0o644)
        .symlink("foo", "/")
        .file(&format!("foo/tmp/{name}"), b"last", 0o644)
        .dir("foo/", 0o755)
        .build();
    let applied = env.applied(&layer);
    assert!(!host.exists());
    assert_eq!(applied.read(&format!("tmp/{name}")), "last");
    assert!(applied.meta("foo").is_dir());
    assert!(applied.list("foo").is_empty());
}

pub fn a_final_symlink_is_replaced_not_followed(new: Setup) {
    let env = Env::setup(new);
    let target = env.outside().join("secret");
    fs::write(&target, b"secret").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    let layer = Tar::new()
        .symlink("f", target.to_str().unwrap())
        .file("f", b"inside", 0o644)
        .build();
    let applied = env.applied(&layer);
    assert!(applied.meta("f").is_file());
    assert_eq!(applied.read("f"), "inside");
    assert_eq!(fs::read(&target).unwrap(), b"secret");
    assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o600);
}

pub fn a_directory_replaces_a_symlink(new: Setup) {
    let env = Env::setup(new);
    let outside = env.outside().join("dir");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
    let layer = Tar::new()
        .symlink("d", outside.to_str().unwrap())
        .dir("d/", 0o777)
        .build();
    let applied = env.applied(&layer);
    assert!(applied.meta("d").is_dir());
    assert_eq!(applied.meta("d").mode() & 0o7777, 0o777);
    assert_eq!(fs::metadata(&outside).unwrap().mode() & 0o7777, 0o700);
}

pub fn hardlinks_resolve_inside(new: Setup) {
    let env = Env::setup(new);
    let layer = Tar::new()
        .dir("etc/", 0o755)
        .file("etc/shadow", b"inside", 0o640)
        .link("dotdot", "../../../etc/shadow")
        .symlink("l", "/etc")
        .link("via-symlink", "l/shadow")
        .build();
    let applied = env.applied(&layer);
    let inode = applied.meta("etc/shadow").ino();
    assert_eq!(applied.meta("dotdot").ino(), inode);
    assert_eq!(applied.meta("via-symlink").ino(), inode);
    let missing = Tar::new().link("x", "../../../etc/shadow").build();
    assert_missing_target(&env, env.apply_err(&missing), "etc/shadow");

    let outside = env.outside().join("file");
    fs::write(&outside, b"outside").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o640)).unwrap();
    let before = fs::metadata(&outside).unwrap();
    let mut link = Tar::with_link(Tar::header(EntryType::Link, "h", 0o777), "s");
    link.set_uid(4242);
    link.set_mtime(12345);
    let layer = Tar::new()
        .symlink("s", outside.to_str().unwrap())
        .entry(link, b"")
        .build();
    let applied = env.applied(&layer);
    assert!(applied.meta("h").file_type().is_symlink());
    let after = fs::metadata(&outside).unwrap();
    assert_eq!(
        (after.mode(), after.uid(), after.mtime(), after.mtime_nsec()),
        (
            before.mode(),
            before.uid(),
            before.mtime(),
            before.mtime_nsec()
        )
    );
}

pub fn invalid_whiteout_names_are_refused(new: Setup) {
    let env = Env::setup(new);
    for name in [".wh..", "etc/.wh..", ".wh...", ".wh."] {
        let layer = Tar::new().file(name, b"", 0o644).build();
        assert!(
            matches!(env.apply_err(&layer), LayerError::InvalidWhiteout),
            "{name}"
        );
    }
    let lower = Tar::new()
        .dir("etc/", 0o755)
        .file("etc/passwd", b"root", 0o644)
        .dir("other/", 0o755)
        .build();
    env.layer("1", None, &lower);
    env.layer(
        "2",
        Some("1"),
        &Tar::new().file("a/../.wh.etc", b"", 0o644).build(),
    );
    let view = env.view("2");
    assert_eq!(view.list(""), ["other"]);
}

pub fn forged_overlay_xattrs_hide_nothing(new: Setup) {
    let env = Env::setup(new);
    env.layer(
        "1",
        None,
        &Tar::new()
            .dir("d/", 0o755)
            .file("d/lower", b"l", 0o644)
            .build(),
    );
    let upper = Tar::new()
        .pax(&[
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
        ])
        .dir("d/", 0o755)
        .build();
    env.layer("2", Some("1"), &upper);
    assert_eq!(env.view("2").list("d"), ["lower"]);
}

pub fn symlink_loops_fail_quickly(new: Setup) {
    let env = Env::setup(new);
    let started = std::time::Instant::now();
    let layer = Tar::new()
        .symlink("a", "a")
        .file("a/b", b"x", 0o644)
        .build();
    assert!(matches!(env.apply_err(&layer), LayerError::Io { .. }));
    let layer = Tar::new()
        .symlink("x", "y")
        .symlink("y", "x")
        .file("x/b", b"x", 0o644)
        .build();
    assert!(matches!(env.apply_err(&layer), LayerError::Io { .. }));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

pub fn header_bombs_are_refused_early(new: Setup) {
    let env = Env::setup(new);
    for (kind, size) in [
        (b'x', 4u64 << 30),
        (b'L', 2 << 20),
        (b'K', (1 << 20) + 1),
        (b'g', 4 << 30),
    ] {
        let mut stream = raw_header(kind, "././@LongLink", size);
        stream.extend(std::iter::repeat_n(b'a', 64 * 1024));
        env.sn.prepare("bomb", None, BTreeMap::new()).unwrap();
        let mut reader = Counting {
            inner: &stream,
            read: 0,
        };
        // A buffer of one tar block, so what is read is what the applier asked for.
        let err = env
            .sn
            .apply("bomb", &mut io::BufReader::with_capacity(512, &mut reader))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Layer {
                    reason: LayerError::ExtensionTooLarge { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            reader.read <= 1024,
            "read {} bytes of a header bomb",
            reader.read
        );
        env.sn.remove("bomb").unwrap();
    }
    let long = "n/".repeat(600) + "file";
    let layer = Tar::new()
        .pax(&[("path", long.as_bytes())])
        .file("short", b"long name", 0o644)
        .build();
    let applied = env.applied(&layer);
    assert_eq!(applied.read(&long), "long name");
    let dangling = Tar::new().pax(&[("path", b"x")]).build();
    assert!(matches!(
        env.apply_err(&dangling),
        LayerError::DanglingExtension(_)
    ));
}

/// Small files are finished off the applier's thread; the tree must still be exactly
/// what applying the entries one after the other gives.
pub fn many_small_files_land_in_archive_order(new: Setup) {
    let env = Env::setup(new);
    let mut tar = Tar::new().dir("many/", 0o755);
    for n in 0..300u32 {
        let mut header = Tar::header(EntryType::Regular, &format!("many/{n}"), 0o600 + n % 64);
        header.set_uid(u64::from(n));
        header.set_gid(u64::from(n + 1));
        header.set_mtime(MTIME + u64::from(n));
        tar = tar.entry(header, n.to_string().repeat(n as usize).as_bytes());
    }
    let big = vec![7u8; 1 << 20];
    // The link follows its target at once, while the target is still queued.
    let mut link = Tar::with_link(Tar::header(EntryType::Link, "many/link", 0o640), "target");
    link.set_uid(42);
    link.set_mtime(1234);
    let layer = tar
        .file("big", &big, 0o644)
        .file("twice", b"first", 0o600)
        .file("twice", b"second", 0o644)
        .file("gone", b"file", 0o644)
        .dir("gone/", 0o750)
        .file("gone/inner", b"inner", 0o644)
        .file("target", b"linked", 0o600)
        .entry(link, b"")
        .build();
    let applied = env.applied(&layer);
    for n in 0..300u32 {
        let path = format!("many/{n}");
        assert_eq!(
            applied.read(&path),
            n.to_string().repeat(n as usize),
            "{path}"
        );
        let meta = applied.meta(&path);
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.mtime()),
            (0o600 + n % 64, n, n + 1, (MTIME + u64::from(n)) as i64),
            "{path}"
        );
    }
    let linked = applied.meta("target");
    assert_eq!(linked.ino(), applied.meta("many/link").ino());
    assert_eq!(
        (linked.mode() & 0o7777, linked.uid(), linked.mtime()),
        (0o640, 42, 1234)
    );
    assert_eq!(fs::read(applied.path("big")).unwrap(), big);
    assert_eq!(applied.read("twice"), "second");
    assert_eq!(applied.meta("twice").mode() & 0o7777, 0o644);
    assert_eq!(applied.list("gone"), ["inner"]);

    // A failure on the other thread names its file and fails the layer.
    let bad = Tar::new()
        .file("fine", b"ok", 0o644)
        .pax(&[("SCHILY.xattr.security.capability", b"bad")])
        .file("bad-capability", b"x", 0o755)
        .file("after", b"ok", 0o644)
        .build();
    env.sn.prepare("bad", None, BTreeMap::new()).unwrap();
    match env.apply("bad", &bad).unwrap_err() {
        Error::Layer {
            path,
            reason: LayerError::Io {
                op: "set xattr", ..
            },
        } => assert_eq!(path, "bad-capability"),
        other => panic!("expected the xattr failure, got {other}"),
    }
    env.sn.remove("bad").unwrap();
}

pub fn rebase_commit_where_offered_and_refused_elsewhere(new: Setup) {
    let env = Env::setup(new);
    if !env.sn.rebase() {
        env.layer("c1", None, &Tar::new().file("f", b"1", 0o644).build());
        env.sn.prepare("loose", None, BTreeMap::new()).unwrap();
        assert!(matches!(
            env.sn.commit("c2", "loose", Some("c1"), BTreeMap::new()),
            Err(Error::FailedPrecondition { ref key, .. }) if key == "loose"
        ));
        assert_eq!(env.sn.stat("loose").unwrap().kind, Kind::Active);
        return;
    }
    let layers = [
        Tar::new()
            .dir("base/", 0o755)
            .file("base/keep", b"keep", 0o644)
            .file("base/gone", b"gone", 0o644)
            .dir("opq/", 0o755)
            .file("opq/old", b"old", 0o644)
            .dir("implied/", 0o750)
            .dir("implied/deeper/", 0o711)
            .build(),
        Tar::new()
            .dir("base/", 0o755)
            .file("base/.wh.gone", b"", 0o644)
            .dir("opq/", 0o755)
            .file("opq/.wh..wh..opq", b"", 0o644)
            .file("opq/new", b"new", 0o644)
            .build(),
        Tar::new()
            .dir("base/", 0o755)
            .file("base/top", b"top", 0o644)
            .file("implied/deeper/file", b"f", 0o644)
            .file("fresh/file", b"f", 0o644)
            .build(),
    ];
    std::thread::scope(|s| {
        for (i, layer) in layers.iter().enumerate() {
            let env = &env;
            s.spawn(move || {
                let key = format!("extract-{i}");
                env.sn.prepare(&key, None, BTreeMap::new()).unwrap();
                env.apply(&key, layer).unwrap();
            });
        }
    });
    env.sn
        .commit("c1", "extract-0", None, BTreeMap::new())
        .unwrap();
    env.sn
        .commit("c2", "extract-1", Some("c1"), BTreeMap::new())
        .unwrap();
    env.sn
        .commit("c3", "extract-2", Some("c2"), BTreeMap::new())
        .unwrap();
    assert_eq!(env.sn.stat("c3").unwrap().parent.as_deref(), Some("c2"));
    assert!(matches!(
        env.sn.remove("c1"),
        Err(Error::FailedPrecondition { .. })
    ));

    let container = Mounted::new(
        &env.sn
            .prepare("container", Some("c3"), BTreeMap::new())
            .unwrap(),
    );
    assert_eq!(container.list("base"), ["keep", "top"]);
    assert_eq!(container.list("opq"), ["new"]);
    // Parents a layer only implies take the lower layer's attributes at commit, as a
    // kernel copy-up would; a parent no lower layer has stays 0755.
    let mode = |rel: &str| {
        fs::metadata(container.path(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("implied"), 0o750);
    assert_eq!(mode("implied/deeper"), 0o711);
    assert_eq!(mode("fresh"), 0o755);
    fs::write(container.path("base/written"), b"w").unwrap();
    drop(container);

    env.sn.prepare("other", None, BTreeMap::new()).unwrap();
    env.sn
        .prepare("with-parent", Some("c1"), BTreeMap::new())
        .unwrap();
    assert!(matches!(
        env.sn
            .commit("c4", "other", Some("extract-x"), BTreeMap::new()),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        env.sn
            .commit("c4", "with-parent", Some("c2"), BTreeMap::new()),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        env.sn
            .commit("c4", "other", Some("container"), BTreeMap::new()),
        Err(Error::InvalidArgument { .. })
    ));
}

pub fn cleanup_removes_crash_leftovers(new: Setup) {
    let env = Env::setup(new);
    let snapshots = env.snapshots();
    env.layer("a", None, &Tar::new().file("f", b"x", 0o644).build());
    env.sn.prepare("b", Some("a"), BTreeMap::new()).unwrap();
    // A temporary directory, one whose metadata never committed, and a half-removed one.
    for leftover in ["new-crashed/fs", "77/fs/deep/er", "rm-5/fs"] {
        fs::create_dir_all(snapshots.join(leftover)).unwrap();
    }
    env.sn.cleanup().unwrap();
    assert_eq!(names(&snapshots), ["1", "2"]);
    assert_eq!(fs::read(snapshots.join("1/fs/f")).unwrap(), b"x");

    env.sn.remove("b").unwrap();
    assert!(!snapshots.join("2").exists());
    env.sn.remove("a").unwrap();
    env.sn.cleanup().unwrap();
    assert_eq!(names(&snapshots), Vec::<String>::new());

    // The sequence moved on, so a new snapshot never lands in a leftover's directory.
    fs::create_dir_all(snapshots.join("3/fs/stale")).unwrap();
    let mounts = env.sn.prepare("c", None, BTreeMap::new()).unwrap();
    assert!(Mounted::new(&mounts).list("").is_empty());
}

pub fn check_finds_and_repairs_what_disagrees_with_the_disk(new: Setup) {
    let env = Env::setup(new);
    let snapshots = env.snapshots();
    let tar = Tar::new().file("f", b"x", 0o644).build();
    env.layer("a", None, &tar);
    env.layer("b", Some("a"), &tar);
    env.layer("c", Some("b"), &tar);
    env.layer("d", None, &tar);
    env.sn.prepare("e", Some("d"), BTreeMap::new()).unwrap();
    assert_eq!(env.sn.check(false).unwrap(), []);

    // Moved rather than deleted: a committed btrfs subvolume is read-only.
    fs::rename(snapshots.join("2"), snapshots.join("../gone")).unwrap();
    for leftover in ["new-crashed/fs", "99/fs"] {
        fs::create_dir_all(snapshots.join(leftover)).unwrap();
    }
    let expected = |repaired: bool| {
        let finding = |subject: String, problem: &str| snapshotters::Finding {
            subject,
            problem: problem.to_owned(),
            repaired,
        };
        let missing = format!(
            "its directory {} is missing",
            snapshots.join("2/fs").display()
        );
        let unowned = |name: &str| snapshots.join(name).display().to_string();
        vec![
            finding("snapshot c".into(), "its parent b is broken"),
            finding("snapshot b".into(), &missing),
            finding(unowned("99"), "a directory no snapshot owns"),
            finding(unowned("new-crashed"), "a directory no snapshot owns"),
        ]
    };
    let sorted = |mut findings: Vec<snapshotters::Finding>| {
        findings[2..].sort_by(|x, y| x.subject.cmp(&y.subject));
        findings
    };
    assert_eq!(sorted(env.sn.check(false).unwrap()), expected(false));
    assert_eq!(sorted(env.sn.check(true).unwrap()), expected(true));
    assert_eq!(env.sn.check(false).unwrap(), []);
    for gone in ["b", "c"] {
        assert!(matches!(env.sn.stat(gone), Err(Error::NotFound { .. })));
    }
    for kept in ["a", "d", "e"] {
        env.sn.stat(kept).unwrap();
    }
    assert_eq!(names(&snapshots), ["1", "4", "5"]);
}

/// Whiteouts and opaque markers aimed through a parent's symlinks that point out of the
/// snapshot delete inside it, never outside.
pub fn whiteouts_through_a_hostile_parent_stay_inside(new: Setup) {
    let env = Env::setup(new);
    let outside = env.outside();
    fs::write(outside.join("f"), b"outside").unwrap();
    fs::write(outside.join("g"), b"outside").unwrap();
    let first = Tar::new()
        .symlink("l", outside.to_str().unwrap())
        .symlink("up", "../../../../../..")
        .dir("d/", 0o755)
        .file("d/kept", b"kept", 0o644)
        .build();
    env.layer("1", None, &first);
    let second = Tar::new()
        .file("l/.wh.f", b"", 0o644)
        .file("up/.wh..wh..opq", b"", 0o644)
        .file("up/.wh.g", b"", 0o644)
        .file("l/.wh..wh..opq", b"", 0o644)
        .file(".wh.l", b"", 0o644)
        .build();
    // Merged onto the parent, whiteouts through its symlinks could not reach what they
    // aim at: the layer needs its parent's tree.
    let refused = env.layer_or_onto_parent("2", Some("1"), &second);
    assert_eq!(refused, env.unpack == Unpack::Rebased);
    let mut left: Vec<String> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["f", "g"]);
    assert_eq!(fs::read(outside.join("f")).unwrap(), b"outside");
    assert_eq!(env.view("1").read("d/kept"), "kept");
}

/// A whiteout of a directory the same layer wrote into hides what lower layers had there
/// and keeps what the layer wrote, whichever came first.
pub fn a_whiteout_after_entries_of_its_directory_hides_only_the_lower_ones(new: Setup) {
    let env = Env::setup(new);
    let first = Tar::new()
        .dir("d/", 0o755)
        .file("d/old", b"old", 0o644)
        .dir("e/", 0o755)
        .file("e/old", b"old", 0o644)
        .build();
    env.layer("1", None, &first);
    let second = Tar::new()
        .file("d/new", b"new", 0o644)
        .file(".wh.d", b"", 0o644)
        .dir("e/", 0o755)
        .file("e/new", b"new", 0o644)
        .file(".wh.e", b"", 0o644)
        .build();
    env.layer("2", Some("1"), &second);
    let view = env.view("2");
    assert_eq!(view.list("d"), ["new"]);
    assert_eq!(view.list("e"), ["new"]);
}

pub fn three_parents_stack_nearest_first(new: Setup) {
    let env = Env::setup(new);
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
    assert_eq!(env.sn.mounts("container").unwrap(), mounts);
    let container = Mounted::new(&mounts);
    assert_eq!(container.read("shared"), "layer 3");
    assert_eq!(container.list(""), ["only-1", "only-2", "only-3", "shared"]);
    fs::write(container.path("new"), b"container").unwrap();
    fs::remove_file(container.path("only-1")).unwrap();
    drop(container);
    let view = env.view("3");
    assert_eq!(view.list(""), ["only-1", "only-2", "only-3", "shared"]);
    assert_eq!(
        Mounted::new(&env.sn.mounts("container").unwrap()).list(""),
        ["new", "only-2", "only-3", "shared"]
    );
}

pub fn views_are_read_only(new: Setup) {
    let env = Env::setup(new);
    env.layer("one", None, &Tar::new().file("f", b"1", 0o644).build());
    env.layer(
        "two",
        Some("one"),
        &Tar::new().file("g", b"2", 0o644).build(),
    );
    for (name, listing) in [("one", &["f"][..]), ("two", &["f", "g"][..])] {
        let view = env.view(name);
        assert_eq!(view.list(""), listing);
        let denied = fs::write(view.path("h"), b"no").unwrap_err();
        assert_eq!(
            denied.raw_os_error(),
            Some(rustix::io::Errno::ROFS.raw_os_error()),
            "view of {name}"
        );
    }
    let empty = Mounted::new(&env.sn.view("empty", None, BTreeMap::new()).unwrap());
    assert!(empty.list("").is_empty());
    assert!(fs::write(empty.path("h"), b"no").is_err());
}

pub fn parent_chains_of_depth_1_2_and_130(new: Setup) {
    let env = Env::setup(new);
    let mut parent: Option<String> = None;
    for i in 1..=130 {
        let layer = Tar::new()
            .file("top", i.to_string().as_bytes(), 0o644)
            .file(&format!("layer-{i}"), b"x", 0o644)
            .build();
        let name = format!("layer{i}");
        env.layer(&name, parent.as_deref(), &layer);
        parent = Some(name);
    }
    for depth in [1, 2, 130] {
        let view = env.view(&format!("layer{depth}"));
        assert_eq!(view.read("top"), depth.to_string());
        assert_eq!(view.list("").len(), depth + 1);
        assert!(view.exists(&format!("layer-{depth}")));
    }
    let container = Mounted::new(
        &env.sn
            .prepare("container", Some("layer130"), BTreeMap::new())
            .unwrap(),
    );
    assert_eq!(container.read("top"), "130");
    assert!(container.exists("layer-1"));
}

/// What later layers delete is gone from the result, and only that: the other name of a
/// hardlinked file, the rest of a directory, the times of a directory the deleting layer
/// does not name.
pub fn deletions_across_layers(new: Setup) {
    let env = Env::setup(new);
    let mut d = Tar::header(EntryType::Directory, "d/", 0o750);
    d.set_mtime(1_400_000_000);
    let first = Tar::new()
        .file("a", b"a", 0o644)
        .file("h1", b"linked", 0o644)
        .link("h2", "h1")
        .symlink("s", "a")
        .entry(d, b"")
        .file("d/x", b"x", 0o644)
        .file("d/y", b"y", 0o644)
        .build();
    env.layer("1", None, &first);
    env.layer("2", Some("1"), &Tar::new().file("b", b"b", 0o644).build());
    let third = Tar::new()
        .file(".wh.a", b"", 0o644)
        .file(".wh.h1", b"", 0o644)
        .file("d/.wh.x", b"", 0o644)
        .file(".wh.missing", b"", 0o644)
        .build();
    env.layer("3", Some("2"), &third);
    let view = env.view("3");
    assert_eq!(view.list(""), ["b", "d", "h2", "s"]);
    assert_eq!(view.read("h2"), "linked");
    assert_eq!(view.list("d"), ["y"]);
    assert!(view.meta("s").file_type().is_symlink());
    assert!(fs::metadata(view.path("s")).is_err(), "s dangles");
    let d = view.meta("d");
    assert_eq!((d.mode() & 0o7777, d.mtime()), (0o750, 1_400_000_000));
    drop(view);
    assert_eq!(env.view("2").list(""), ["a", "b", "d", "h1", "h2", "s"]);

    let fourth = Tar::new()
        .dir("d/", 0o755)
        .file("d/.wh..wh..opq", b"", 0o644)
        .file("d/new", b"new", 0o644)
        .build();
    env.layer("4", Some("3"), &fourth);
    assert_eq!(env.view("4").list("d"), ["new"]);
    assert_eq!(env.view("3").list("d"), ["y"]);
}

/// A hardlink to a file of a lower layer: a layer applied onto a copy of its parent links
/// to it; overlayfs applies layers alone and refuses it, naming the entry, and native
/// applying a layer alone says that it needs its parent (the puller then applies it so).
pub fn hardlinks_across_layers(new: Setup) {
    let env = Env::setup(new);
    env.layer("1", None, &Tar::new().file("t", b"target", 0o640).build());
    let link = Tar::new().link("l", "t").build();
    if env.sn.backend() == Backend::Overlayfs {
        env.sn.prepare("k", Some("1"), BTreeMap::new()).unwrap();
        let err = env.apply("k", &link).unwrap_err();
        assert!(
            matches!(err, Error::Layer { ref path, reason: LayerError::Io { op: "hard link", .. } } if path == "l"),
            "{err}"
        );
        return;
    }
    if env.unpack == Unpack::Rebased {
        env.sn.prepare("k", None, BTreeMap::new()).unwrap();
        let err = env.apply("k", &link).unwrap_err();
        assert!(
            matches!(err, Error::Layer { ref path, reason: LayerError::NeedsParent { ref target } } if path == "l" && target == "t"),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        return;
    }
    env.layer("2", Some("1"), &link);
    let view = env.view("2");
    assert_eq!(view.meta("l").ino(), view.meta("t").ino());
    assert_eq!(view.read("l"), "target");
    assert_eq!(view.meta("t").nlink(), 2);
    drop(view);
    assert_eq!(env.view("1").meta("t").nlink(), 1);
}

pub fn types_change_across_layers(new: Setup) {
    let env = Env::setup(new);
    let first = Tar::new()
        .file("f", b"file", 0o644)
        .symlink("s", "f")
        .dir("d/", 0o755)
        .file("d/child", b"c", 0o644)
        .build();
    env.layer("1", None, &first);
    let second = Tar::new()
        .dir("f/", 0o711)
        .file("f/inner", b"inner", 0o644)
        .file("s", b"now a file", 0o600)
        .file("d", b"now a file", 0o644)
        .build();
    env.layer("2", Some("1"), &second);
    let view = env.view("2");
    assert!(view.meta("f").is_dir());
    assert_eq!(view.meta("f").mode() & 0o7777, 0o711);
    assert_eq!(view.list("f"), ["inner"]);
    assert!(view.meta("s").is_file());
    assert_eq!(view.read("s"), "now a file");
    assert_eq!(view.read("d"), "now a file");
    drop(view);
    let third = Tar::new()
        .file("f", b"file again", 0o644)
        .dir("d/", 0o755)
        .file("d/fresh", b"fresh", 0o644)
        .symlink("s", "d/fresh")
        .build();
    env.layer("3", Some("2"), &third);
    let view = env.view("3");
    assert!(view.meta("f").is_file());
    assert_eq!(view.read("f"), "file again");
    assert_eq!(view.list("d"), ["fresh"]);
    assert_eq!(view.read("s"), "fresh");
    assert!(view.meta("s").file_type().is_symlink());
}

/// Everything a layer sets survives into its children: a child is a copy (native), a
/// snapshot (btrfs) or an overlay (overlayfs) of it.
pub fn metadata_survives_into_children(new: Setup) {
    let env = Env::setup(new);
    let cap: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut owned_dir = Tar::header(EntryType::Directory, "home/", 0o750);
    owned_dir.set_uid(1000);
    owned_dir.set_gid(1001);
    let mut owned_file = Tar::header(EntryType::Regular, "home/cap", 0o755);
    owned_file.set_uid(1000);
    owned_file.set_gid(1001);
    let mut link = Tar::with_link(Tar::header(EntryType::Symlink, "home/link", 0o777), "cap");
    link.set_uid(7);
    link.set_gid(8);
    let mut null = Tar::header(EntryType::Char, "null", 0o666);
    null.set_device_major(1).unwrap();
    null.set_device_minor(3).unwrap();
    let first = Tar::new()
        .entry(owned_dir, b"")
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.user.note", b"kept"),
            ("mtime", b"1500000000.987654321"),
        ])
        .entry(owned_file, b"binary")
        .entry(link, b"")
        .file("suid", b"#!", 0o4755)
        .dir("sticky/", 0o1777)
        .entry(null, b"")
        .entry(Tar::header(EntryType::Fifo, "fifo", 0o600), b"")
        .file("pair-a", b"pair", 0o644)
        .link("pair-b", "pair-a")
        .build();
    env.layer("1", None, &first);
    env.layer(
        "2",
        Some("1"),
        &Tar::new().file("other", b"o", 0o644).build(),
    );
    let check = |m: &Mounted| {
        let home = m.meta("home");
        assert_eq!(
            (home.mode() & 0o7777, home.uid(), home.gid()),
            (0o750, 1000, 1001)
        );
        let file = m.meta("home/cap");
        assert_eq!(
            (file.mode() & 0o7777, file.uid(), file.gid()),
            (0o755, 1000, 1001)
        );
        assert_eq!(
            (file.mtime(), file.mtime_nsec()),
            (1_500_000_000, 987_654_321)
        );
        let mut buf = [0u8; 64];
        let n =
            rustix::fs::lgetxattr(m.path("home/cap"), "security.capability", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], &cap);
        let n = rustix::fs::lgetxattr(m.path("home/cap"), "user.note", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"kept");
        let link = m.meta("home/link");
        assert_eq!((link.uid(), link.gid()), (7, 8));
        assert_eq!(
            fs::read_link(m.path("home/link")).unwrap(),
            Path::new("cap")
        );
        assert_eq!(m.meta("suid").mode() & 0o7777, 0o4755);
        assert_eq!(m.meta("sticky").mode() & 0o7777, 0o1777);
        let null = m.meta("null");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        assert!(m.meta("fifo").file_type().is_fifo());
        assert_eq!(m.meta("pair-a").ino(), m.meta("pair-b").ino());
        assert_eq!(m.read("other"), "o");
    };
    check(&env.view("2"));
    check(&Mounted::new(
        &env.sn
            .prepare("container", Some("2"), BTreeMap::new())
            .unwrap(),
    ));
}

/// A sparse file written by a container keeps its holes in a child of the container's
/// committed snapshot.
pub fn sparse_files_stay_sparse_in_children(new: Setup) {
    let env = Env::setup(new);
    env.layer("1", None, &Tar::new().dir("data/", 0o755).build());
    let mounts = env
        .sn
        .prepare("container", Some("1"), BTreeMap::new())
        .unwrap();
    let container = Mounted::new(&mounts);
    let file = fs::File::create(container.path("data/sparse")).unwrap();
    file.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[9u8; 4096], 32 << 20).unwrap();
    drop(file);
    drop(container);
    env.sn
        .commit("committed", "container", None, BTreeMap::new())
        .unwrap();
    let child = Mounted::new(
        &env.sn
            .prepare("child", Some("committed"), BTreeMap::new())
            .unwrap(),
    );
    let meta = child.meta("data/sparse");
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 <= 1 << 20, "{} blocks", meta.blocks());
    let data = fs::read(child.path("data/sparse")).unwrap();
    assert!(data[(32 << 20)..(32 << 20) + 4096].iter().all(|b| *b == 9));
    assert!(data[..(32 << 20)].iter().all(|b| *b == 0));
}

pub fn limits_cap_entries_bytes_and_depth(new: Setup) {
    let limits = snapshotters::ApplyLimits {
        max_entries: Some(2),
        max_bytes: Some(10),
        max_depth: Some(3),
    };
    let env = Env::setup_with(new, |sn| sn.with_limits(limits));
    let cases = [
        (
            Tar::new()
                .file("a", b"", 0o644)
                .file("b", b"", 0o644)
                .file("c", b"", 0o644)
                .build(),
            "entries",
        ),
        (Tar::new().file("a", b"0123456789a", 0o644).build(), "bytes"),
        (
            Tar::new().file("a/b/c/d", b"", 0o644).build(),
            "path components",
        ),
    ];
    for (layer, what) in cases {
        env.sn.prepare("k", None, BTreeMap::new()).unwrap();
        let err = env.apply("k", &layer).unwrap_err();
        assert!(
            matches!(err, Error::Layer { reason: LayerError::Limit { what: w, .. }, .. } if w == what),
            "{err}"
        );
        assert_eq!(err.kind(), snapshotters::ErrorKind::ResourceExhausted);
        env.sn.remove("k").unwrap();
    }
    env.sn.prepare("ok", None, BTreeMap::new()).unwrap();
    env.apply(
        "ok",
        &Tar::new().file("a/b/c", b"0123456789", 0o644).build(),
    )
    .unwrap();
}

pub fn synced_applies_land(new: Setup) {
    let env = Env::setup_with(new, |sn| sn.with_sync_fs(true));
    let layer = Tar::new()
        .dir("d/", 0o755)
        .file("d/f", b"kept", 0o644)
        .build();
    env.layer("synced", None, &layer);
    assert_eq!(env.view("synced").read("d/f"), "kept");
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}
