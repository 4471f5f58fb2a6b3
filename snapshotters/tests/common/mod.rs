//! What the snapshotter tests share: the backends in temporary directories (btrfs on a
//! loop-mounted file formatted for the test), layer archives built here (byte by byte where
//! the `tar` crate's builder refuses to write them), and mounts that unmount when dropped.
//! Everything runs as root, as CI does: layers create devices, owners and xattrs, and every
//! result is looked at through a real mount.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fixtures::volume::Volume;
use snapshotters::{Backend, Error, LayerError, Mount, Snapshots, Snapshotter};
use tar::{EntryType, Header};
use tempfile::TempDir;

pub const MTIME: u64 = 1_600_000_000;

/// Opens a backend in a test's temporary directory; btrfs also returns its volume.
pub type Constructor = fn(&Path) -> (Snapshots, Option<Volume>);

pub fn overlayfs(dir: &Path) -> (Snapshots, Option<Volume>) {
    (open(Backend::Overlayfs, dir), None)
}

pub fn native(dir: &Path) -> (Snapshots, Option<Volume>) {
    (open(Backend::Native, dir), None)
}

pub fn btrfs(dir: &Path) -> (Snapshots, Option<Volume>) {
    let volume = Volume::btrfs(dir).unwrap();
    (open(Backend::Btrfs, &volume.mountpoint), Some(volume))
}

/// `backend` rooted at `dir/<backend>`, its metadata in `dir/meta.redb`.
pub fn open(backend: Backend, dir: &Path) -> Snapshots {
    let db = redb::Database::create(dir.join("meta.redb")).unwrap();
    Snapshots::open(backend, dir.join(backend.name()), Arc::new(db)).unwrap()
}

/// Builds layer archives, including names and link names the `tar` builder would refuse.
pub struct Tar {
    builder: tar::Builder<Vec<u8>>,
}

impl Tar {
    pub fn new() -> Self {
        Tar {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub fn header(kind: EntryType, name: &str, mode: u32) -> Header {
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

    pub fn with_link(mut header: Header, target: &str) -> Header {
        let bytes = target.as_bytes();
        assert!(bytes.len() <= 100);
        header.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
        header
    }

    pub fn entry(mut self, mut header: Header, data: &[u8]) -> Self {
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    pub fn dir(self, name: &str, mode: u32) -> Self {
        self.entry(Self::header(EntryType::Directory, name, mode), b"")
    }

    pub fn file(self, name: &str, data: &[u8], mode: u32) -> Self {
        self.entry(Self::header(EntryType::Regular, name, mode), data)
    }

    pub fn symlink(self, name: &str, target: &str) -> Self {
        let header = Self::with_link(Self::header(EntryType::Symlink, name, 0o777), target);
        self.entry(header, b"")
    }

    pub fn link(self, name: &str, target: &str) -> Self {
        let header = Self::with_link(Self::header(EntryType::Link, name, 0o644), target);
        self.entry(header, b"")
    }

    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.builder
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }

    pub fn build(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

/// A mount on a temporary directory, unmounted when dropped (also when a test panics).
pub struct Mounted {
    pub target: PathBuf,
    _dir: TempDir,
}

impl Mounted {
    pub fn new(mounts: &[Mount]) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m");
        fs::create_dir(&target).unwrap();
        Mount::mount_all(mounts, &target).unwrap();
        Mounted { target, _dir: dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.target.join(rel)
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    pub fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.path(rel)).is_ok()
    }

    pub fn list(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.path(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    pub fn meta(&self, rel: &str) -> fs::Metadata {
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

/// How [`Env::layer`] unpacks a layer with a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpack {
    /// Prepared on the committed parent, applied, committed.
    OnParent,
    /// Prepared without a parent, applied alone, committed onto the parent (a rebase), as
    /// the puller unpacks where the snapshotter offers it.
    Rebased,
}

/// A backend and how its layers are unpacked, for checks that run both ways.
pub type Setup = (Constructor, Unpack);

/// A snapshotter in a temporary directory (on its own btrfs volume for btrfs).
pub struct Env {
    pub sn: Snapshots,
    pub unpack: Unpack,
    /// Unmounted after the snapshotter is gone and before its directory is removed.
    _volume: Option<Volume>,
    pub tmp: TempDir,
    views: AtomicU64,
}

impl Env {
    pub fn new(new: Constructor) -> Env {
        Env::with(new, |sn| sn)
    }

    /// An Env whose layers are unpacked as `setup` says.
    pub fn setup((new, unpack): Setup) -> Env {
        Env {
            unpack,
            ..Env::new(new)
        }
    }

    /// [`Env::with`] for a [`Setup`].
    pub fn setup_with((new, unpack): Setup, configure: impl FnOnce(Snapshots) -> Snapshots) -> Env {
        Env {
            unpack,
            ..Env::with(new, configure)
        }
    }

    /// An Env whose snapshotter `configure` adjusts (limits, syncing).
    pub fn with(new: Constructor, configure: impl FnOnce(Snapshots) -> Snapshots) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let (sn, volume) = new(tmp.path());
        Env {
            sn: configure(sn),
            unpack: Unpack::OnParent,
            _volume: volume,
            tmp,
            views: AtomicU64::new(0),
        }
    }

    /// Where the snapshot directories are: `<root>/snapshots`.
    pub fn snapshots(&self) -> PathBuf {
        self.sn.root().join("snapshots")
    }

    /// A directory outside the snapshotter, for escape attempts to aim at.
    pub fn outside(&self) -> PathBuf {
        let dir = self.tmp.path().join("outside");
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub fn apply(&self, key: &str, tar: &[u8]) -> Result<snapshotters::ApplyStats, Error> {
        let mut reader = tar;
        self.sn.apply(key, &mut reader)
    }

    /// Unpacks one layer as the pull path does: prepare with the unpack label, apply,
    /// commit; on the parent or onto it, as [`Env::unpack`] says.
    pub fn layer(&self, name: &str, parent: Option<&str>, tar: &[u8]) {
        let key = format!("extract {name}");
        let unpack = labels(&[(snapshotters::UNPACK_LABEL, name)]);
        let (prepared_on, committed_onto) = match self.unpack {
            Unpack::OnParent => (parent, None),
            Unpack::Rebased => (None, parent),
        };
        self.sn.prepare(&key, prepared_on, unpack.clone()).unwrap();
        self.apply(&key, tar).unwrap();
        self.sn.commit(name, &key, committed_onto, unpack).unwrap();
    }

    /// [`Env::layer`], and where a rebase is refused because the layer needs its parent's
    /// tree, applied onto the parent instead, as the puller then does. Returns whether it
    /// was refused.
    pub fn layer_or_onto_parent(&self, name: &str, parent: Option<&str>, tar: &[u8]) -> bool {
        if self.unpack == Unpack::OnParent {
            self.layer(name, parent, tar);
            return false;
        }
        let key = format!("extract {name}");
        let unpack = labels(&[(snapshotters::UNPACK_LABEL, name)]);
        self.sn.prepare(&key, None, unpack.clone()).unwrap();
        self.apply(&key, tar).unwrap();
        match self.sn.commit(name, &key, parent, unpack.clone()) {
            Ok(()) => return false,
            Err(Error::Layer {
                reason: LayerError::NeedsParent { .. },
                ..
            }) => {}
            Err(other) => panic!("commit of {name}: {other}"),
        }
        self.sn.remove(&key).unwrap();
        self.sn.prepare(&key, parent, unpack.clone()).unwrap();
        self.apply(&key, tar).unwrap();
        self.sn.commit(name, &key, None, unpack).unwrap();
        true
    }

    /// Applies one layer into a fresh Active snapshot with no parent and returns the error.
    pub fn apply_err(&self, tar: &[u8]) -> LayerError {
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
    pub fn applied(&self, tar: &[u8]) -> Mounted {
        let key = format!("active-{}", self.views.fetch_add(1, Ordering::Relaxed));
        let mounts = self.sn.prepare(&key, None, BTreeMap::new()).unwrap();
        self.apply(&key, tar).unwrap();
        Mounted::new(&mounts)
    }

    /// A read-only view of committed `name`, mounted.
    pub fn view(&self, name: &str) -> Mounted {
        let key = format!("view-{}", self.views.fetch_add(1, Ordering::Relaxed));
        Mounted::new(&self.sn.view(&key, Some(name), BTreeMap::new()).unwrap())
    }
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Host paths that must never be written, unique per run.
pub fn host_scratch(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    PathBuf::from(format!("/tmp/imaged-{tag}-{}-{nanos}", std::process::id()))
}

/// Counts what the applier reads, to see it reach EOF or stop early.
pub struct Counting<'a> {
    pub inner: &'a [u8],
    pub read: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

/// A raw header block, for archives no builder writes.
pub fn raw_header(kind: u8, name: &str, size: u64) -> Vec<u8> {
    let mut header = Tar::header(EntryType::new(kind), name, 0o644);
    header.set_size(size);
    header.set_cksum();
    header.as_bytes().to_vec()
}
