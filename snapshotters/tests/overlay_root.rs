//! Root-only tests: real layer application and real overlay mounts (run as root, as CI is).
//!
//! `conformance` holds backend-independent checks, each taking a constructor, for the rules
//! of containerd's snapshotter model (kinds, keys, parents, labels, usage, mounts) that every
//! backend must keep, as containerd's snapshot test suite does; they look at results
//! through the mounts the snapshotter returns. `conformance!` runs every check against one
//! backend.
//! `overlay` holds checks of overlay's own on-disk form and mount options. Hostile archives
//! are built here, byte by byte where the `tar` crate's builder refuses to write them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use snapshotters::{Error, LayerError, Mount, Overlay, Snapshotter};
use tar::{EntryType, Header};
use tempfile::TempDir;

const MTIME: u64 = 1_600_000_000;

type Constructor = fn(&Path) -> Box<dyn Snapshotter>;

fn overlay_snapshotter(dir: &Path) -> Box<dyn Snapshotter> {
    Box::new(open_overlay(dir))
}

fn open_overlay(dir: &Path) -> Overlay {
    let db = redb::Database::create(dir.join("meta.redb")).unwrap();
    Overlay::open(dir.join("overlayfs"), Arc::new(db)).unwrap()
}

/// Builds layer archives, including names and link names the `tar` builder would refuse.
struct Tar {
    builder: tar::Builder<Vec<u8>>,
}

impl Tar {
    fn new() -> Self {
        Tar {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, name: &str, mode: u32) -> Header {
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        let bytes = name.as_bytes();
        assert!(bytes.len() <= 100, "use PAX for long names");
        header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_size(0);
        header
    }

    fn with_link(mut header: Header, target: &str) -> Header {
        let bytes = target.as_bytes();
        assert!(bytes.len() <= 100);
        header.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
        header
    }

    fn entry(mut self, mut header: Header, data: &[u8]) -> Self {
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    fn dir(self, name: &str, mode: u32) -> Self {
        self.entry(Self::header(EntryType::Directory, name, mode), b"")
    }

    fn file(self, name: &str, data: &[u8], mode: u32) -> Self {
        self.entry(Self::header(EntryType::Regular, name, mode), data)
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        let header = Self::with_link(Self::header(EntryType::Symlink, name, 0o777), target);
        self.entry(header, b"")
    }

    fn link(self, name: &str, target: &str) -> Self {
        let header = Self::with_link(Self::header(EntryType::Link, name, 0o644), target);
        self.entry(header, b"")
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.builder
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }

    fn build(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

/// A mount on a temporary directory, unmounted when dropped (also when a test panics).
struct Mounted {
    target: PathBuf,
    _dir: TempDir,
}

impl Mounted {
    fn new(mounts: &[Mount]) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m");
        fs::create_dir(&target).unwrap();
        Mount::mount_all(mounts, &target).unwrap();
        Mounted { target, _dir: dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.target.join(rel)
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.path(rel)).is_ok()
    }

    fn list(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.path(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn meta(&self, rel: &str) -> fs::Metadata {
        fs::symlink_metadata(self.path(rel)).unwrap()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = plumbing::mount::unmount(&self.target) {
            eprintln!("unmounting {}: {e}", self.target.display());
        }
    }
}

/// A snapshotter in a temporary directory.
struct Env {
    sn: Box<dyn Snapshotter>,
    tmp: TempDir,
    views: AtomicU64,
}

impl Env {
    fn new(new: Constructor) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let sn = new(tmp.path());
        Env {
            sn,
            tmp,
            views: AtomicU64::new(0),
        }
    }

    /// A directory outside the snapshotter, for escape attempts to aim at.
    fn outside(&self) -> PathBuf {
        let dir = self.tmp.path().join("outside");
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn apply(&self, key: &str, tar: &[u8]) -> Result<snapshotters::ApplyStats, Error> {
        let mut reader = tar;
        self.sn.apply(key, &mut reader)
    }

    /// Unpacks one layer as the pull path does: prepare, apply, commit.
    fn layer(&self, name: &str, parent: Option<&str>, tar: &[u8]) {
        let key = format!("extract {name}");
        self.sn.prepare(&key, parent, BTreeMap::new()).unwrap();
        self.apply(&key, tar).unwrap();
        self.sn.commit(name, &key, None, BTreeMap::new()).unwrap();
    }

    /// Applies one layer into a fresh Active snapshot with no parent and returns the error.
    fn apply_err(&self, tar: &[u8]) -> LayerError {
        let key = format!("failing-{}", self.views.fetch_add(1, Ordering::Relaxed));
        self.sn.prepare(&key, None, BTreeMap::new()).unwrap();
        let err = self.apply(&key, tar).unwrap_err();
        self.sn.remove(&key).unwrap();
        match err {
            Error::Layer { reason, .. } => reason,
            other => panic!("expected a layer error, got {other}"),
        }
    }

    /// Applies one layer into a fresh Active snapshot with no parent and mounts it.
    fn applied(&self, tar: &[u8]) -> Mounted {
        let key = format!("active-{}", self.views.fetch_add(1, Ordering::Relaxed));
        let mounts = self.sn.prepare(&key, None, BTreeMap::new()).unwrap();
        self.apply(&key, tar).unwrap();
        Mounted::new(&mounts)
    }

    /// A read-only view of committed `name`, mounted.
    fn view(&self, name: &str) -> Mounted {
        let key = format!("view-{}", self.views.fetch_add(1, Ordering::Relaxed));
        Mounted::new(&self.sn.view(&key, Some(name), BTreeMap::new()).unwrap())
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Host paths that must never be written, unique per run.
fn host_scratch(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    PathBuf::from(format!("/tmp/imaged-{tag}-{}-{nanos}", std::process::id()))
}

/// Counts what the applier reads, to see it reach EOF or stop early.
struct Counting<'a> {
    inner: &'a [u8],
    read: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

/// A raw header block, for archives no builder writes.
fn raw_header(kind: u8, name: &str, size: u64) -> Vec<u8> {
    let mut header = Tar::header(EntryType::new(kind), name, 0o644);
    header.set_size(size);
    header.set_cksum();
    header.as_bytes().to_vec()
}

macro_rules! conformance {
    ($backend:ident, $new:expr, [$($check:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[test]
                fn $check() {
                    super::conformance::$check($new)
                }
            )*
        }
    };
}

conformance!(
    overlayfs,
    super::overlay_snapshotter,
    [
        item02_unpack_keys_labels_and_chain_names,
        item03_concurrent_commits_of_one_chain,
        item04_prepare_errors,
        item05_commit_errors_and_labels,
        item06_remove_order,
        stat_update_usage_walk_and_kinds,
        item10_to_12_whiteouts_and_opaque_directories,
        item13_directory_and_file_replacement,
        item14_hardlinks,
        item15_mode_bits_and_capabilities,
        item16_pax_ownership,
        item17_times,
        item18_devices,
        item19_apply_reads_to_eof_and_failed_layers_are_removable,
        item20_root_entry_is_ignored,
        item21_traversal_is_clamped,
        item22_symlinked_parents_stay_inside,
        item23_parent_swapped_for_a_symlink,
        item24_final_symlink_is_replaced,
        item25_directory_over_symlink,
        item26_hardlinks_stay_inside,
        item27_invalid_whiteouts,
        item28_forged_overlay_xattrs,
        item29_symlink_loop,
        item30_header_bombs,
        item31_many_small_files_in_archive_order,
        rebase_commit_of_independently_applied_layers,
    ]
);

mod conformance {
    use super::*;

    pub fn item02_unpack_keys_labels_and_chain_names(new: Constructor) {
        let env = Env::new(new);
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
        assert_eq!(info.kind, snapshotters::Kind::Committed);
        assert_eq!(info.labels, unpack_labels);
        assert!(matches!(env.sn.stat(&key), Err(Error::NotFound { .. })));
        // A second pull finds the chain committed and prepares nothing.
        let mut names = Vec::new();
        env.sn
            .walk(&mut |info| names.push(info.name.clone()))
            .unwrap();
        assert_eq!(names, [chain]);
    }

    pub fn item03_concurrent_commits_of_one_chain(new: Constructor) {
        let env = Env::new(new);
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
        assert_eq!(
            all,
            [("sha256:chain".to_owned(), snapshotters::Kind::Committed)]
        );
        assert_eq!(env.view("sha256:chain").read("d/f"), "same");
    }

    pub fn item04_prepare_errors(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item05_commit_errors_and_labels(new: Constructor) {
        let env = Env::new(new);
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
        assert_eq!(env.sn.stat("k").unwrap().kind, snapshotters::Kind::Active);
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

    pub fn item06_remove_order(new: Constructor) {
        let env = Env::new(new);
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

    pub fn stat_update_usage_walk_and_kinds(new: Constructor) {
        let env = Env::new(new);
        env.sn.prepare("a", None, labels(&[("x", "1")])).unwrap();
        let info = env.sn.stat("a").unwrap();
        assert_eq!(
            (info.kind, info.parent.clone(), info.labels.clone()),
            (snapshotters::Kind::Active, None, labels(&[("x", "1")]))
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
                ("A".to_owned(), snapshotters::Kind::Committed, None),
                (
                    "v".to_owned(),
                    snapshotters::Kind::View,
                    Some("A".to_owned())
                ),
            ]
        );
        assert!(env.sn.root().is_absolute());
    }

    pub fn item10_to_12_whiteouts_and_opaque_directories(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item13_directory_and_file_replacement(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item14_hardlinks(new: Constructor) {
        let env = Env::new(new);
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
        assert!(matches!(
            env.apply_err(&to_missing),
            LayerError::Io {
                op: "hard link",
                ..
            }
        ));
    }

    pub fn item15_mode_bits_and_capabilities(new: Constructor) {
        let env = Env::new(new);
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
        let n = rustix::fs::lgetxattr(applied.path("cap"), "security.capability", &mut buf[..])
            .unwrap();
        assert_eq!(&buf[..n], &cap);
        let n = rustix::fs::lgetxattr(applied.path("cap"), "user.note", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"kept");
    }

    pub fn item16_pax_ownership(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item17_times(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item18_devices(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item19_apply_reads_to_eof_and_failed_layers_are_removable(new: Constructor) {
        let env = Env::new(new);
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
        let stats = env.sn.apply("k", &mut reader).unwrap();
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

    pub fn item20_root_entry_is_ignored(new: Constructor) {
        let env = Env::new(new);
        let mut root = Tar::header(EntryType::Directory, "./", 0o700);
        root.set_uid(77);
        let applied = env.applied(&Tar::new().entry(root, b"").file("f", b"x", 0o644).build());
        let meta = applied.meta("");
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o755, 0));
        assert_eq!(applied.list(""), ["f"]);
    }

    pub fn item21_traversal_is_clamped(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item22_symlinked_parents_stay_inside(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item23_parent_swapped_for_a_symlink(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item24_final_symlink_is_replaced(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item25_directory_over_symlink(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item26_hardlinks_stay_inside(new: Constructor) {
        let env = Env::new(new);
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
        assert!(matches!(env.apply_err(&missing), LayerError::Io { .. }));

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

    pub fn item27_invalid_whiteouts(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item28_forged_overlay_xattrs(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item29_symlink_loop(new: Constructor) {
        let env = Env::new(new);
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

    pub fn item30_header_bombs(new: Constructor) {
        let env = Env::new(new);
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
            let err = env.sn.apply("bomb", &mut reader).unwrap_err();
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
    pub fn item31_many_small_files_in_archive_order(new: Constructor) {
        let env = Env::new(new);
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

    pub fn rebase_commit_of_independently_applied_layers(new: Constructor) {
        let env = Env::new(new);
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
}

/// Overlay's own on-disk form and mount options.
mod overlay {
    use super::*;

    struct OverlayEnv {
        env: Env,
        snapshots: PathBuf,
    }

    fn overlay_env() -> OverlayEnv {
        let env = Env::new(overlay_snapshotter);
        let snapshots = env.sn.root().join("snapshots");
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
    fn with_sync_fs_applies_and_syncs() {
        let dir = host_scratch("sync-fs");
        fs::create_dir_all(&dir).unwrap();
        let sn = open_overlay(&dir).with_sync_fs(true);
        sn.prepare("synced", None, BTreeMap::new()).unwrap();
        let layer = Tar::new()
            .dir("d/", 0o755)
            .file("d/f", b"kept", 0o644)
            .build();
        let stats = sn.apply("synced", &mut layer.as_slice()).unwrap();
        assert_eq!((stats.entries, stats.bytes), (2, 4));
        sn.commit("synced-layer", "synced", None, BTreeMap::new())
            .unwrap();
        let view = Mounted::new(&sn.view("v", Some("synced-layer"), BTreeMap::new()).unwrap());
        assert_eq!(view.read("d/f"), "kept");
        drop(view);
        fs::remove_dir_all(&dir).unwrap();
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
    fn item06_cleanup_removes_leftovers_and_removed_snapshots() {
        let o = overlay_env();
        let sn = &o.env.sn;
        o.env
            .layer("a", None, &Tar::new().file("f", b"x", 0o644).build());
        sn.prepare("b", Some("a"), BTreeMap::new()).unwrap();
        // Crash leftovers: a temporary directory, a directory whose metadata never committed,
        // and a half-removed one.
        for leftover in ["new-crashed/fs", "77/fs/deep/er", "rm-5/fs"] {
            fs::create_dir_all(o.snapshots.join(leftover)).unwrap();
        }
        sn.cleanup().unwrap();
        let mut names: Vec<String> = fs::read_dir(&o.snapshots)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["1", "2"]);

        sn.remove("b").unwrap();
        assert!(!o.snapshots.join("2").exists());
        sn.remove("a").unwrap();
        sn.cleanup().unwrap();
        assert_eq!(fs::read_dir(&o.snapshots).unwrap().count(), 0);

        // The sequence moved on, so a new snapshot never lands in a leftover's directory.
        fs::create_dir_all(o.snapshots.join("3/fs/stale")).unwrap();
        sn.prepare("c", None, BTreeMap::new()).unwrap();
        assert!(!o.snapshots.join("3/fs/stale").exists());
    }

    #[test]
    fn item07_active_with_three_parents() {
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
    fn item08_bind_and_view_mounts() {
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
    fn item09_two_hundred_layers_mount_without_changing_cwd() {
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
    fn item10_whiteouts_are_char_devices_owned_like_the_entry() {
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
    fn item11_opaque_markers_become_xattrs_in_either_order() {
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
    fn item12_a_directory_replacing_a_whiteout_is_opaque() {
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
    fn item14_a_hardlink_to_a_lower_only_file_fails() {
        let o = overlay_env();
        let env = &o.env;
        env.layer("1", None, &Tar::new().file("lower", b"", 0o644).build());
        env.sn.prepare("k", Some("1"), BTreeMap::new()).unwrap();
        let err = env
            .apply("k", &Tar::new().link("l", "lower").build())
            .unwrap_err();
        assert!(
            matches!(err, Error::Layer { ref path, reason: LayerError::Io { .. } } if path == "l"),
            "{err}"
        );
        env.sn.remove("k").unwrap();
    }

    #[test]
    fn item28_forged_overlay_xattrs_are_not_written() {
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

    #[test]
    fn item30_caps_on_entries_bytes_and_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = snapshotters::ApplyLimits {
            max_entries: Some(2),
            max_bytes: Some(10),
            max_depth: Some(3),
        };
        let sn = open_overlay(tmp.path()).with_limits(limits);
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
            sn.prepare("k", None, BTreeMap::new()).unwrap();
            let err = sn.apply("k", &mut layer.as_slice()).unwrap_err();
            assert!(
                matches!(err, Error::Layer { reason: LayerError::Limit { what: w, .. }, .. } if w == what),
                "{err}"
            );
            assert_eq!(err.kind(), snapshotters::ErrorKind::ResourceExhausted);
            sn.remove("k").unwrap();
        }
        sn.prepare("ok", None, BTreeMap::new()).unwrap();
        sn.apply(
            "ok",
            &mut Tar::new()
                .file("a/b/c", b"0123456789", 0o644)
                .build()
                .as_slice(),
        )
        .unwrap();
    }
}
