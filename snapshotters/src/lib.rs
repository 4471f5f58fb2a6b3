//! Snapshotters for imaged, following containerd's snapshotter model, and the safe
//! application of OCI layer tar streams into them.
//!
//! - [`Snapshotter`] is the interface the rest of the workspace uses; [`Snapshots`]
//!   implements it for each [`Backend`]: overlayfs, btrfs and native.
//! - [`Mount`] (from `plumbing`, which both daemons share) describes how to mount a
//!   snapshot; the snapshotter only returns mounts, and whoever needs the filesystem mounts
//!   them with `plumbing::mount`.
//! - `metastore` keeps keys, ids, kinds, parents, labels and frozen usage in redb, shared by
//!   every backend; `apply` turns a layer tar into files, whiteouts included, without ever
//!   leaving the snapshot directory; `snapshots` is what backends share, and each backend's
//!   module holds only what is its own.
#![deny(missing_docs)]

mod apply;
mod btrfs;
mod btrfs_ioctl;
mod copy;
mod error;
mod fsutil;
mod hidden;
mod implicit;
mod metastore;
mod native;
mod overlayfs;
mod rebase;
mod snapshots;

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use apply::{ApplyLimits, MAX_EXTENSION_SIZE};
pub use error::{Error, ErrorKind, LayerError, MetadataError};
pub use fsutil::disk_usage;
pub use plumbing::mount::Mount;
pub use snapshots::Snapshots;

/// The label of the Active snapshots that layers are unpacked into (containerd's, naming
/// the chain ID the snapshot will be committed as). Only [`Snapshotter::apply`] may write
/// into a snapshot prepared with it, never anything through its mounts: native then shares
/// the parent's files with it instead of copying them.
pub const UNPACK_LABEL: &str = "containerd.io/snapshot.ref";

/// The snapshotters there are, by the names containerd and the config use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Layers are overlay lowerdirs, applied in parallel and rebased at commit.
    Overlayfs,
    /// Every snapshot a btrfs subvolume, a child a snapshot of its parent.
    Btrfs,
    /// Plain directories, a child a full copy of its parent; any filesystem.
    Native,
}

impl Backend {
    /// Every backend, in the order the documentation lists them.
    pub const ALL: [Backend; 3] = [Backend::Overlayfs, Backend::Btrfs, Backend::Native];

    /// The backend's name: `overlayfs`, `btrfs` or `native`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Overlayfs => "overlayfs",
            Backend::Btrfs => "btrfs",
            Backend::Native => "native",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown snapshotter {s:?}: use overlayfs, btrfs or native"))
    }
}

fn layout(backend: Backend, root: &Path) -> Result<Box<dyn snapshots::Layout>, Error> {
    Ok(match backend {
        Backend::Overlayfs => Box::new(overlayfs::OverlayLayout::new(root)?),
        Backend::Btrfs => Box::new(btrfs::BtrfsLayout::new(root)?),
        Backend::Native => Box::new(native::NativeLayout),
    })
}

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Writable; named by a key; can be committed.
    Active,
    /// Read-only; named by a key; can never be committed.
    View,
    /// Immutable; named by a name; the only kind that can be a parent.
    Committed,
}

/// What [`Snapshotter::stat`] and [`Snapshotter::walk`] report about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Active, View or Committed.
    pub kind: Kind,
    /// The key (Active, View) or name (Committed).
    pub name: String,
    /// Name of the committed parent; `None` for a snapshot that starts empty.
    pub parent: Option<String>,
    /// Labels as last set by prepare/view, commit or update.
    pub labels: BTreeMap<String, String>,
    /// When the snapshot was created (a commit keeps the creation time of its active key).
    pub created: SystemTime,
    /// When the snapshot was last changed (created, committed or relabelled).
    pub updated: SystemTime,
}

/// Disk usage of one snapshot alone, parents excluded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes as `du` counts them: `st_blocks * 512`, each hardlinked inode once.
    pub size: u64,
    /// Number of inodes, the snapshot's root directory included.
    pub inodes: u64,
}

/// One disagreement [`Snapshotter::check`] found between metadata and disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `snapshot <key>`, or the path of a directory nothing owns.
    pub subject: String,
    /// What is wrong.
    pub problem: String,
    /// Whether it was removed.
    pub repaired: bool,
}

/// What one layer application did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Tar entries applied (extension headers such as PAX or GNU long names not counted).
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
}

/// The containerd snapshotter model.
///
/// A *key* names an Active or View snapshot, a *name* a Committed one; keys and names share
/// one namespace. A *parent* is always the name of a Committed snapshot, and `None` means the
/// snapshot starts as an empty directory.
///
/// - [`prepare`](Snapshotter::prepare) creates an **Active** snapshot: writable mounts that
///   start with the parent's content. Only an Active snapshot can be committed.
/// - [`view`](Snapshotter::view) creates a **View**: read-only mounts of the parent, never
///   committed.
/// - [`commit`](Snapshotter::commit) turns an Active key into a **Committed** name: the key
///   disappears, the content is frozen, and it can now be a parent.
///
/// Methods return mounts and never mount anything themselves (except that
/// [`apply`](Snapshotter::apply) writes into the snapshot's own directory). Labels are never
/// inherited: each call sets exactly the labels it is given.
pub trait Snapshotter: Send + Sync {
    /// Creates Active `key` on top of `parent` and returns its mounts.
    ///
    /// Errors: `key` taken → AlreadyExists; `parent` missing → NotFound; `parent` not
    /// Committed → InvalidArgument.
    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error>;

    /// Creates View `key` of `parent` and returns its read-only mounts. Errors as `prepare`.
    fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error>;

    /// Commits Active `key` as `name`, with exactly `labels`.
    ///
    /// `parent: Some(p)` rebases: the snapshot was prepared with no parent (layers are applied
    /// in parallel, each independently) and gets committed parent `p` now; `p` must be
    /// Committed, and only a snapshotter whose [`rebase`](Snapshotter::rebase) is true can do
    /// it (else FailedPrecondition). Errors: `name` taken → AlreadyExists (and `key` stays
    /// Active); `key` is not Active → FailedPrecondition; `key` missing → NotFound.
    fn commit(
        &self,
        name: &str,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error>;

    /// Removes a snapshot of any kind. Errors: children exist → FailedPrecondition.
    fn remove(&self, key: &str) -> Result<(), Error>;

    /// Describes one snapshot.
    fn stat(&self, key: &str) -> Result<Info, Error>;

    /// Changes labels, the only mutable field. `fieldpaths` empty or containing `labels`
    /// replaces all labels with `info.labels`; `labels.<k>` sets (or, when absent from
    /// `info.labels`, deletes) label `k` alone. Any other path → InvalidArgument.
    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info, Error>;

    /// Recomputes the mounts of an Active or View snapshot; Committed → FailedPrecondition.
    fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error>;

    /// Usage of the snapshot alone: measured now for Active and View; for Committed,
    /// measured at the first call and kept, since a committed snapshot never changes (and a
    /// commit stays cheap on the pull path, where a btrfs or native tree is the whole image).
    fn usage(&self, key: &str) -> Result<Usage, Error>;

    /// Calls `f` for every snapshot, in key order.
    fn walk(&self, f: &mut dyn FnMut(&Info)) -> Result<(), Error>;

    /// Applies an uncompressed OCI layer tar stream into Active `key` (into its own
    /// directory, directly; nothing is mounted) and then reads `tar` to EOF, so a caller that
    /// hashes every byte also covers data after the end-of-archive blocks. A failed layer
    /// leaves the Active snapshot in place for the caller to [`remove`](Snapshotter::remove).
    /// File content is written straight from the reader's buffer.
    fn apply(&self, key: &str, tar: &mut dyn BufRead) -> Result<ApplyStats, Error>;

    /// Removes on-disk directories that no metadata refers to (crash leftovers, temporary
    /// `new-*` and `rm-*` directories). One that cannot be removed is logged and left for
    /// the next cleanup; errors are the metadata store's.
    fn cleanup(&self) -> Result<(), Error>;

    /// Compares the metadata with the disk: every snapshot's directory is present, every
    /// parent is recorded, and no directory is left that no snapshot owns (but those being
    /// created). With `repair`, what disagrees goes: a snapshot whose directory or parent is
    /// gone, with every snapshot above it, and unowned directories.
    fn check(&self, repair: bool) -> Result<Vec<Finding>, Error>;

    /// Whether [`commit`](Snapshotter::commit) can give a parent to a snapshot prepared
    /// without one (containerd's "rebase" capability). Where it cannot, each layer must be
    /// prepared on its parent, applied after the parent is committed.
    fn rebase(&self) -> bool;

    /// Directory holding this snapshotter's data.
    fn root(&self) -> &Path;
}
