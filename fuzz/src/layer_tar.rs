//! Fuzzes layer application: `snapshotters::Snapshots::apply` turns the input, taken as an
//! uncompressed layer tar from a registry, into files of an Active snapshot. It must never
//! panic, and whatever the tar says (`..`, absolute names, symlinked or hardlinked parents,
//! whiteouts, devices), nothing outside the snapshot's own directory may appear or change:
//! the check compares a listing of the whole temporary tree, the content of the snapshot's
//! directory excepted (its layer `fs/` and the files the snapshotter keeps beside it, such
//! as `implicit-dirs`), before and after the apply, with a sentinel directory beside the
//! snapshotter root as the nearest target of an escape. Removing the snapshot must then
//! leave no snapshot directory behind but the parent's.
//!
//! `LAYER_TAR_SNAPSHOTTER` picks the snapshotter (`overlayfs`, the default, `btrfs` or
//! `native`); btrfs needs `TMPDIR` on a btrfs filesystem. The snapshotters that apply a
//! layer onto a copy of its parent get a committed parent holding a small tree (directories,
//! files, a hardlink, a symlinked directory), so that deletions and links reach lower
//! content; the parent is part of the listing, so the copy must leave it unchanged. The
//! snapshot is prepared with the unpack label, as the puller prepares, so native links the
//! parent's files into it and a change made through such a link shows in the listing.
//! Native also applies layers alone and merges them onto their parent at commit, as the
//! puller unpacks with it: inputs of even length go that way (and the merge is checked like
//! the apply), the others onto the copy.
//!
//! Needs root: the applier creates device nodes (mknod, whiteouts included), changes owners
//! (lchown) and sets `trusted.*` xattrs, as imaged does in production.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use snapshotters::{Backend, Snapshots, Snapshotter};

/// The committed parent, for snapshotters that can apply a layer onto a copy of it.
const PARENT: &str = "fuzz-parent";

/// What a layer applied alone is committed as, merged onto [`PARENT`].
const MERGED: &str = "fuzz-merged";

/// The Active snapshot each input is applied to.
const KEY: &str = "fuzz-layer";

/// A snapshotter and the tree around it, made on the first input and kept for the whole run
/// (libFuzzer exits without running destructors; the smoke script points `TMPDIR` at a
/// directory it removes afterwards).
struct Bench {
    /// Holds `snapshotter/` (the root) and `sentinel/`.
    base: PathBuf,
    /// `<base>/snapshotter/snapshots`: one directory per snapshot.
    snapshots: PathBuf,
    snapshotter: Snapshots,
    /// The parent's name and directory, if the snapshotter needs one.
    parent: Option<(&'static str, PathBuf)>,
}

fn backend() -> Backend {
    std::env::var("LAYER_TAR_SNAPSHOTTER")
        .map(|name| {
            name.parse()
                .unwrap_or_else(|e| panic!("LAYER_TAR_SNAPSHOTTER: {e}"))
        })
        .unwrap_or(Backend::Overlayfs)
}

/// The parent's tree: what deletions, opaque directories and hardlinks can reach.
fn parent_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |kind: tar::EntryType, path: &str, link: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_size(data.len() as u64);
        if !link.is_empty() {
            header.set_link_name(link).expect("link name");
        }
        tar.append_data(&mut header, path, data).expect("append");
    };
    add(tar::EntryType::Directory, "etc", "", b"");
    add(
        tar::EntryType::Regular,
        "etc/passwd",
        "",
        b"root:x:0:0::/:/bin/sh\n",
    );
    add(tar::EntryType::Directory, "usr/bin", "", b"");
    add(tar::EntryType::Regular, "usr/bin/tool", "", b"tool\n");
    add(
        tar::EntryType::Link,
        "usr/bin/tool-link",
        "usr/bin/tool",
        b"",
    );
    add(tar::EntryType::Symlink, "bin", "usr/bin", b"");
    add(tar::EntryType::Directory, "gone/sub", "", b"");
    add(tar::EntryType::Regular, "gone/sub/file", "", b"x");
    tar.into_inner().expect("parent tar")
}

/// Commits `PARENT` from [`parent_layer`] and returns its directory.
fn make_parent(snapshotter: &Snapshots, snapshots: &Path) -> PathBuf {
    let key = "fuzz-parent-extract";
    snapshotter
        .prepare(key, None, BTreeMap::new())
        .expect("prepare parent");
    snapshotter
        .apply(key, &mut parent_layer().as_slice())
        .expect("apply parent");
    snapshotter
        .commit(PARENT, key, None, BTreeMap::new())
        .expect("commit parent");
    snapshot_dir(snapshots, None)
}

fn bench() -> &'static Bench {
    static BENCH: OnceLock<Bench> = OnceLock::new();
    BENCH.get_or_init(|| {
        let base = tempfile::Builder::new()
            .prefix("layer-tar-")
            .tempdir()
            .expect("create temporary directory")
            .keep();
        std::fs::create_dir(base.join("sentinel")).expect("create sentinel directory");
        // In memory: the metadata is not what is fuzzed, and a file would fsync every commit.
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("create in-memory database");
        let root = base.join("snapshotter");
        let snapshotter =
            Snapshots::open(backend(), root.clone(), Arc::new(db)).expect("open snapshotter");
        let snapshots = root.join("snapshots");
        let parent = (backend() != Backend::Overlayfs)
            .then(|| (PARENT, make_parent(&snapshotter, &snapshots)));
        Bench {
            snapshots,
            base,
            snapshotter,
            parent,
        }
    })
}

/// One file system object as the escape check compares it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    path: PathBuf,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
}

/// Everything under `base`, never following symlinks and not entering `snapshot` (whose own
/// entry is listed without its times and size, which its children change).
fn listing(base: &Path, snapshot: &Path) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut pending = vec![base.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
            .map(|entry| entry.expect("read directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
            let is_snapshot = path == snapshot;
            seen.push(Seen {
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                size: if is_snapshot || meta.is_dir() {
                    0
                } else {
                    meta.size()
                },
                mtime: if is_snapshot {
                    (0, 0)
                } else {
                    (meta.mtime(), meta.mtime_nsec())
                },
                path: path.clone(),
            });
            if meta.is_dir() && !is_snapshot {
                pending.push(path);
            }
        }
    }
    seen
}

/// The directory of the only snapshot but the parent: `<snapshots>/<id>`.
fn snapshot_dir(snapshots: &Path, parent: Option<&Path>) -> PathBuf {
    let dirs = others(snapshots, parent);
    assert_eq!(dirs.len(), 1, "one snapshot directory: {dirs:?}");
    dirs[0].clone()
}

/// The snapshot directories other than the parent's.
fn others(snapshots: &Path, parent: Option<&Path>) -> Vec<PathBuf> {
    std::fs::read_dir(snapshots)
        .expect("list snapshots")
        .map(|entry| entry.expect("read snapshots entry").path())
        .filter(|path| Some(path.as_path()) != parent)
        .collect()
}

/// Prepared as the puller prepares: native then links the parent's files into the snapshot,
/// and the listing shows whether the layer changed any of them through the links.
fn unpack_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(snapshotters::UNPACK_LABEL.to_owned(), KEY.to_owned())])
}

/// One input.
pub fn run(data: &[u8]) {
    let bench = bench();
    let (parent, parent_dir) = bench
        .parent
        .as_ref()
        .map(|(name, dir)| (*name, dir.as_path()))
        .unzip();
    let merge = backend() == Backend::Native && data.len().is_multiple_of(2);
    let prepared_on = if merge { None } else { parent };
    bench
        .snapshotter
        .prepare(KEY, prepared_on, unpack_labels())
        .expect("prepare snapshot");
    let snapshot = snapshot_dir(&bench.snapshots, parent_dir);
    let before = listing(&bench.base, &snapshot);
    let mut tar = data;
    let applied = match bench.snapshotter.apply(KEY, &mut tar) {
        Ok(stats) => {
            assert!(
                stats.bytes <= data.len() as u64,
                "{} bytes of file content applied from {} bytes of tar",
                stats.bytes,
                data.len()
            );
            true
        }
        Err(error) => {
            drop(error.to_string());
            false
        }
    };
    let mut key = KEY;
    if merge && applied {
        match bench
            .snapshotter
            .commit(MERGED, KEY, parent, unpack_labels())
        {
            Ok(()) => key = MERGED,
            Err(error) => drop(error.to_string()),
        }
    }
    let after = listing(&bench.base, &snapshot);
    if before != after {
        let gone: Vec<_> = before.iter().filter(|s| !after.contains(s)).collect();
        let new: Vec<_> = after.iter().filter(|s| !before.contains(s)).collect();
        panic!(
            "apply changed files outside the snapshot's directory:\nbefore: {gone:#?}\nafter: {new:#?}"
        );
    }
    bench.snapshotter.remove(key).expect("remove snapshot");
    let left = others(&bench.snapshots, parent_dir);
    assert!(left.is_empty(), "removed snapshot left {left:?}");
}
