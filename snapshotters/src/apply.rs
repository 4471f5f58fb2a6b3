//! Applies an OCI layer tar stream to a snapshot's layer directory (the overlay upperdir),
//! following the OCI image spec's layer format (changesets, whiteouts, opaque directories)
//! and the safety rules of `docs/architecture.md` ("Layer application").
//!
//! - The `tar` crate only parses headers ([`stream`]); every file is created here, with
//!   `*at` calls on the final component relative to a parent directory opened inside the
//!   layer root by [`resolve`]. `..` and absolute names are clamped into the root, symlinked
//!   parents resolve inside it, and nothing is ever created or changed through a final
//!   symlink.
//! - Whiteouts take one of three forms ([`Whiteouts`]). For overlayfs they are written in its
//!   on-disk form: `.wh.<name>` becomes a 0:0 character device, `.wh..wh..opq` the
//!   `trusted.overlay.opaque=y` xattr; the layer is applied alone, without its parents, so
//!   lower layers are never consulted: missing parent directories are created 0755 and a
//!   hardlink to a file only in a lower layer fails. For btrfs and native the layer is
//!   applied onto a copy of its parent, and what a whiteout hides is deleted from it, except
//!   what this layer wrote itself (the image spec scopes whiteouts to lower layers); the
//!   times of directories the layer changes without naming them are kept. What the layer
//!   wrote is known by its names as spelled in the archive: a whiteout reaching a written
//!   entry through a symlinked parent deletes it (it stays inside the root either way).
//!   A native layer applied without its parent lists what its whiteouts hide, by their
//!   names as spelled, for the merge onto the parent at commit.
//! - Metadata goes on in the order create, lchown, xattrs, chmod, times (chown clears
//!   setuid, setgid and `security.capability`); directory times are set after the whole
//!   layer, so children added later do not change them.
//! - Every change to the tree happens on the calling thread in archive order; small regular
//!   files are created there and then written and given their metadata on a second thread
//!   ([`files`]), through their descriptors. Most entries are new, so each is created
//!   first and whatever is in the way is removed only when the creation reports it.

mod files;
mod resolve;
mod stream;

use std::collections::HashSet;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, Stat, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use crate::{ApplyStats, Error, LayerError};
use crate::{copy, fsutil, hidden};
use files::{Handoff, Job};
use resolve::{Missing, open_dir};
use stream::{Entry, TarStream, Time};

pub use stream::MAX_EXTENSION_SIZE;

/// Caps on what one layer application may write; `None` is unlimited, as in containerd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyLimits {
    /// Most tar entries in one layer (extension headers not counted).
    pub max_entries: Option<u64>,
    /// Most bytes of regular file content in one layer.
    pub max_bytes: Option<u64>,
    /// Most path components in one entry name.
    pub max_depth: Option<u64>,
}

/// How whiteouts and opaque directories reach the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Whiteouts {
    /// overlayfs's markers, in a layer directory that starts empty.
    Overlay,
    /// Deletions, in a tree that starts as a copy of the parent.
    Delete,
    /// A list of what they hide ([`hidden`]), beside a tree that starts empty and is merged
    /// onto its parent later. A hardlink to a file the layer does not contain needs the
    /// parent, and fails with [`LayerError::NeedsParent`].
    Record,
}

/// Whether the files of the tree a layer applies to are its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inodes {
    /// Nothing else refers to them.
    Own,
    /// Non-directories from the parent are hardlinks to the parent's inodes: an entry that
    /// would change one in place (a hardlink entry, which takes on its header's owner, mode
    /// and times) first gives it a copy of its own.
    SharedWithParent,
}

const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// Applies the layer in `tar` to the directory `root`, then reads `tar` to EOF. Returns the
/// statistics and the cleaned paths of the directories the layer names itself (any other
/// directory in `root` was created as a missing parent).
///
/// With [`Whiteouts::Record`], the list goes to `hidden_list`.
pub(crate) fn apply_layer(
    root: &Path,
    tar: &mut dyn BufRead,
    limits: &ApplyLimits,
    whiteouts: Whiteouts,
    inodes: Inodes,
    hidden_list: &Path,
) -> Result<(ApplyStats, Vec<Vec<u8>>), Error> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open layer directory", root)(e.into()))?;
    std::thread::scope(|scope| {
        let (jobs, queue) = sync_channel(files::QUEUE);
        let (done, answers) = channel();
        scope.spawn(move || files::work(queue, done));
        let mut layer = Layer {
            root: root_fd,
            limits: *limits,
            stats: ApplyStats::default(),
            dir_times: Vec::new(),
            whiteouts,
            recorder: (whiteouts == Whiteouts::Record)
                .then(|| hidden::Recorder::new(hidden_list.to_path_buf())),
            inodes,
            privatized: HashSet::new(),
            written: HashSet::new(),
            timed: HashSet::new(),
            opaque: HashSet::new(),
            hasher: RandomState::new(),
            parent: None,
            removed: false,
            files: Handoff::new(jobs, answers),
        };
        let mut stream = TarStream::new(tar);
        let applied = layer.apply_all(&mut stream);
        // Every handed-over file is finished (or has failed) before the layer counts as
        // applied, and before directory times are set.
        layer.files.wait();
        applied.and(layer.files.check())?;
        layer.set_dir_times()?;
        if let Some(recorder) = layer.recorder.take() {
            recorder.finish()?;
        }
        stream.drain()?;
        let dirs = layer
            .dir_times
            .into_iter()
            .filter(|dir| dir.named)
            .map(|dir| dir.path)
            .collect();
        Ok((layer.stats, dirs))
    })
}

/// State of one layer application.
struct Layer {
    root: OwnedFd,
    limits: ApplyLimits,
    stats: ApplyStats,
    /// Directory times to set at the end, in archive order.
    dir_times: Vec<DirTimes>,
    whiteouts: Whiteouts,
    /// With [`Whiteouts::Record`]: where the whiteouts go.
    recorder: Option<hidden::Recorder>,
    inodes: Inodes,
    /// With [`Inodes::SharedWithParent`]: hashes of the hardlink targets given an inode of
    /// their own, which later links must join rather than copy again.
    privatized: HashSet<u64>,
    /// With [`Whiteouts::Delete`]: hashes of the cleaned paths this layer wrote (and of
    /// their parents), which its own whiteouts must not delete; hashes keep a layer of a
    /// million entries within a few MiB.
    written: HashSet<u64>,
    /// With [`Whiteouts::Delete`]: hashes of the directories whose final times are settled,
    /// because the layer names them or their times before the layer were kept.
    timed: HashSet<u64>,
    /// With [`Whiteouts::Delete`]: hashes of the directories made opaque; below them only
    /// written paths remain, so another opaque marker there has nothing left to delete.
    opaque: HashSet<u64>,
    hasher: RandomState,
    /// The previous entry's parent directory (cleaned path and descriptor), reused while
    /// entries share it: archives list a directory's files together.
    parent: Option<(Vec<u8>, OwnedFd)>,
    /// Set when the current entry removed something; a removal may replace a directory on
    /// the cached parent's path, so the cache is dropped.
    removed: bool,
    /// Small regular files are finished by a second thread.
    files: Handoff,
}

/// Times for one directory: from its own entry (`named`), or as found in the parent's copy
/// before this layer changed it.
struct DirTimes {
    path: Vec<u8>,
    times: Timestamps,
    named: bool,
}

/// The file types a layer may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Regular,
    Directory,
    Symlink,
    Hardlink,
    /// Character or block device, or FIFO.
    Node(FileType),
}

/// What an entry's base name says to do.
#[derive(Debug, PartialEq, Eq)]
enum Name<'a> {
    Plain,
    /// `.wh..wh..opq`: hide the lower layers' content of the directory.
    Opaque,
    /// `.wh.<name>`: hide `<name>` of the lower layers.
    Whiteout(&'a [u8]),
    /// Any other `.wh..wh.` name: aufs metadata, which hides nothing real.
    AufsMeta,
}

/// What was at a path before an entry replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    Nothing,
    /// A directory, kept because the entry is a directory too.
    Directory,
    /// A whiteout, removed.
    Whiteout,
    /// Anything else, removed.
    Other,
}

impl Layer {
    fn apply_all(&mut self, stream: &mut TarStream<'_>) -> Result<(), Error> {
        while let Some(entry) = stream.next_entry()? {
            self.apply(&entry, stream).map_err(|reason| Error::Layer {
                path: String::from_utf8_lossy(&entry.path).into_owned(),
                reason,
            })?;
            self.files.check()?;
        }
        Ok(())
    }

    fn apply(&mut self, entry: &Entry, stream: &mut TarStream<'_>) -> Result<(), LayerError> {
        let kind = entry_kind(entry)?;
        self.count(entry, kind)?;
        let path = clean(&entry.path);
        if path.is_empty() {
            // The root entry `./`: its mode and owner must not change the snapshot root.
            return Ok(());
        }
        self.check_depth(&path)?;
        let (parent, base) = split_last(&path);
        match (classify(base)?, self.whiteouts) {
            (Name::Opaque, Whiteouts::Overlay) => return self.opaque(parent),
            (Name::Opaque, Whiteouts::Delete) => return self.delete_unwritten(parent),
            (Name::Whiteout(target), Whiteouts::Overlay) => {
                return self.whiteout(parent, target, entry);
            }
            (Name::Whiteout(target), Whiteouts::Delete) => {
                return self.delete_hidden(parent, target);
            }
            (Name::Opaque, Whiteouts::Record) => return self.record(parent, None),
            (Name::Whiteout(target), Whiteouts::Record) => {
                return self.record(parent, Some(target));
            }
            (Name::AufsMeta, _) => return Ok(()),
            (Name::Plain, _) => {}
        }
        let (parent, dir) = self.parent_dir(parent)?;
        self.removed = false;
        let applied = match kind {
            EntryKind::Directory => self.directory(&dir, base, entry, &path),
            EntryKind::Regular => self.regular(&dir, base, entry, stream),
            EntryKind::Symlink => self.symlink(&dir, base, entry),
            EntryKind::Hardlink => self.hardlink(&dir, base, entry),
            EntryKind::Node(file_type) => self.node(&dir, base, entry, file_type),
        };
        if !self.removed {
            self.parent = Some((parent, dir));
        }
        if applied.is_ok() && self.whiteouts == Whiteouts::Delete {
            self.mark_written(&path);
        }
        applied
    }

    /// Records `path` and its parents as written by this layer. A path already recorded
    /// has its parents recorded too, so the climb stops there.
    fn mark_written(&mut self, path: &[u8]) {
        let mut path = path;
        while !path.is_empty() && self.written.insert(self.hasher.hash_one(path)) {
            path = split_last(path).0;
        }
    }

    fn is_written(&self, path: &[u8]) -> bool {
        self.written.contains(&self.hasher.hash_one(path))
    }

    /// With [`Whiteouts::Delete`], remembers the times of the directory at `path` before
    /// this layer first changes it, unless the layer named it before (a name that comes
    /// later sets the times after these).
    fn keep_times(&mut self, path: &[u8], dir: &OwnedFd) -> Result<(), LayerError> {
        if self.whiteouts != Whiteouts::Delete || path.is_empty() {
            return Ok(());
        }
        if !self.timed.insert(self.hasher.hash_one(path)) {
            return Ok(());
        }
        let stat = rustix::fs::fstat(dir).map_err(io_error("inspect parent directory"))?;
        self.dir_times.push(DirTimes {
            path: path.to_vec(),
            times: fsutil::stat_times(&stat),
            named: false,
        });
        Ok(())
    }

    /// `.wh.<target>` onto a copy of the parent: deletes `target` unless this layer wrote it;
    /// of a directory this layer wrote into, only what the parent had goes, as overlayfs
    /// then marks it opaque.
    fn delete_hidden(&mut self, parent: &[u8], target: &[u8]) -> Result<(), LayerError> {
        let path = join(parent, target);
        let dir = match open_dir(&self.root, parent, Missing::Fail) {
            Ok(dir) => dir,
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(io_error("open parent directory")(e)),
        };
        if self.is_written(&path) {
            return match rustix::fs::statat(&dir, target, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) if fsutil::is_dir(&stat) => self.delete_unwritten(&path),
                Ok(_) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(io_error("inspect whiteout target")(e)),
            };
        }
        self.keep_times(parent, &dir)?;
        // The cached parent may be the deleted directory or lie below it.
        self.parent = None;
        match fsutil::remove_at(dir.as_fd(), target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove whited-out entry")(e)),
        }
    }

    /// `.wh..wh..opq` onto a copy of the parent: deletes everything below `dir_path` that
    /// this layer did not write.
    fn delete_unwritten(&mut self, dir_path: &[u8]) -> Result<(), LayerError> {
        if self.below_opaque(dir_path) {
            return Ok(());
        }
        self.opaque.insert(self.hasher.hash_one(dir_path));
        self.parent = None;
        let mut pending = vec![dir_path.to_vec()];
        while let Some(path) = pending.pop() {
            let dir = open_dir(&self.root, &path, Missing::Create)
                .map_err(io_error("open opaque directory"))?;
            self.keep_times(&path, &dir)?;
            for name in list_dir(&dir).map_err(io_error("list opaque directory"))? {
                let child = join(&path, &name);
                if !self.is_written(&child) {
                    fsutil::remove_at(dir.as_fd(), &name)
                        .map_err(io_error("remove entry below opaque directory"))?;
                    continue;
                }
                let stat = rustix::fs::statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io_error("inspect entry below opaque directory"))?;
                if fsutil::is_dir(&stat) {
                    pending.push(child);
                }
            }
        }
        Ok(())
    }

    /// With [`Whiteouts::Record`]: lists `parent/target` as hidden, or `parent` as opaque
    /// without a target. An opaque directory is created if the layer has not, as a copy
    /// of the parent would have it; a whiteout creates nothing. A `parent` that runs
    /// through a symlink of the layer's own is listed as such instead: what it hides lies
    /// where the symlink leads, which only the parent's tree shows.
    fn record(&mut self, parent: &[u8], target: Option<&[u8]>) -> Result<(), LayerError> {
        let components: Vec<&[u8]> = parent.split(|b| *b == b'/').collect();
        let through_symlink = hidden::first_non_directory(&self.root, &components)
            .map_err(io_error("inspect whiteout directory"))?
            == Some(FileType::Symlink);
        if target.is_none() {
            open_dir(&self.root, parent, Missing::Create)
                .map_err(io_error("open opaque directory"))?;
        }
        let recorded = match target {
            _ if through_symlink => self.recorder().through_symlink(parent),
            Some(target) => self.recorder().hide(&join(parent, target)),
            None => self.recorder().opaque(parent),
        };
        recorded.map_err(io_error("record whiteout"))
    }

    fn recorder(&mut self) -> &mut hidden::Recorder {
        self.recorder.as_mut().expect("a recorder in Record mode")
    }

    /// Whether `path` or a directory above it was made opaque already.
    fn below_opaque(&self, path: &[u8]) -> bool {
        let mut path = path;
        loop {
            if self.opaque.contains(&self.hasher.hash_one(path)) {
                return true;
            }
            if path.is_empty() {
                return false;
            }
            path = split_last(path).0;
        }
    }

    /// Opens (or takes from the cache) the directory at the cleaned path `parent`.
    fn parent_dir(&mut self, parent: &[u8]) -> Result<(Vec<u8>, OwnedFd), LayerError> {
        match self.parent.take() {
            Some((cached, dir)) if cached == parent => Ok((cached, dir)),
            _ => {
                let dir = open_dir(&self.root, parent, Missing::Create)
                    .map_err(io_error("open parent directory"))?;
                self.keep_times(parent, &dir)?;
                Ok((parent.to_vec(), dir))
            }
        }
    }

    /// Makes room for a new entry at `base`; see [`clear`].
    fn clear(
        &mut self,
        dir: &OwnedFd,
        base: &[u8],
        keep_dir: bool,
    ) -> Result<Existing, LayerError> {
        let existing = clear(dir, base, keep_dir, self.whiteouts)?;
        if matches!(existing, Existing::Whiteout | Existing::Other) {
            self.removed = true;
        }
        Ok(existing)
    }

    /// Creates `base` with `create`; if an entry is in the way, removes it and creates again.
    /// Most entries are new, so trying first saves a lookup per entry.
    fn create<T>(
        &mut self,
        dir: &OwnedFd,
        base: &[u8],
        op: &'static str,
        create: impl Fn() -> rustix::io::Result<T>,
    ) -> Result<T, LayerError> {
        match create() {
            Err(Errno::EXIST) => {
                self.clear(dir, base, false)?;
                create().map_err(io_error(op))
            }
            created => created.map_err(io_error(op)),
        }
    }

    fn count(&mut self, entry: &Entry, kind: EntryKind) -> Result<(), LayerError> {
        self.stats.entries += 1;
        if let Some(limit) = self
            .limits
            .max_entries
            .filter(|limit| self.stats.entries > *limit)
        {
            return Err(LayerError::Limit {
                what: "entries",
                limit,
            });
        }
        if kind == EntryKind::Regular {
            self.stats.bytes += entry.size;
            if let Some(limit) = self
                .limits
                .max_bytes
                .filter(|limit| self.stats.bytes > *limit)
            {
                return Err(LayerError::Limit {
                    what: "bytes",
                    limit,
                });
            }
        }
        Ok(())
    }

    fn check_depth(&self, path: &[u8]) -> Result<(), LayerError> {
        let depth = path.split(|b| *b == b'/').count() as u64;
        match self.limits.max_depth {
            Some(limit) if depth > limit => Err(LayerError::Limit {
                what: "path components",
                limit,
            }),
            _ => Ok(()),
        }
    }

    fn opaque(&self, dir_path: &[u8]) -> Result<(), LayerError> {
        let dir = open_dir(&self.root, dir_path, Missing::Create)
            .map_err(io_error("open opaque directory"))?;
        set_xattr_at(&dir, b".", OPAQUE_XATTR, b"y").map_err(io_error("mark directory opaque"))
    }

    fn whiteout(&self, parent: &[u8], target: &[u8], entry: &Entry) -> Result<(), LayerError> {
        let dir = open_dir(&self.root, parent, Missing::Create)
            .map_err(io_error("open parent directory"))?;
        match rustix::fs::statat(&dir, target, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => {
                rustix::fs::mknodat(&dir, target, FileType::CharacterDevice, Mode::empty(), 0)
                    .map_err(io_error("create whiteout"))?;
                chown_at(&dir, target, entry).map_err(io_error("change owner of whiteout"))
            }
            // Written earlier in this layer, so it stays; only what lies below it is hidden.
            Ok(stat) if fsutil::is_dir(&stat) => set_xattr_at(&dir, target, OPAQUE_XATTR, b"y")
                .map_err(io_error("mark directory opaque")),
            // A non-directory of this layer already hides the lower one.
            Ok(_) => Ok(()),
            Err(e) => Err(io_error("inspect whiteout target")(e)),
        }
    }

    fn directory(
        &mut self,
        dir: &OwnedFd,
        base: &[u8],
        entry: &Entry,
        path: &[u8],
    ) -> Result<(), LayerError> {
        let mkdir = || rustix::fs::mkdirat(dir, base, Mode::from_raw_mode(0o700));
        let existing = match mkdir() {
            Ok(()) => Existing::Nothing,
            Err(Errno::EXIST) => {
                let existing = self.clear(dir, base, true)?;
                if existing != Existing::Directory {
                    mkdir().map_err(io_error("create directory"))?;
                }
                existing
            }
            Err(e) => return Err(io_error("create directory")(e)),
        };
        if existing == Existing::Whiteout {
            // The whiteout hid a lower entry; the new directory must keep hiding its content.
            set_xattr_at(dir, base, OPAQUE_XATTR, b"y")
                .map_err(io_error("mark directory opaque"))?;
        }
        set_metadata(dir, base, entry, EntryKind::Directory)?;
        if self.whiteouts == Whiteouts::Delete {
            self.timed.insert(self.hasher.hash_one(path));
        }
        self.dir_times.push(DirTimes {
            path: path.to_vec(),
            times: timestamps(entry),
            named: true,
        });
        Ok(())
    }

    fn regular(
        &mut self,
        dir: &OwnedFd,
        base: &[u8],
        entry: &Entry,
        stream: &mut TarStream<'_>,
    ) -> Result<(), LayerError> {
        let fd = self.create(dir, base, "create file", || {
            rustix::fs::openat(
                dir,
                base,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        })?;
        let mut file = File::from(fd);
        if let Some(size) = usize::try_from(entry.size)
            .ok()
            .filter(|size| *size <= files::MAX_FILE)
        {
            let mut data = self.files.buffer(size);
            let mut filled = 0;
            while filled < data.len() {
                filled += stream.read_data(&mut data[filled..])?;
            }
            self.files.send(Job {
                file,
                data,
                entry: entry.clone(),
            });
            return Ok(());
        }
        // Larger files are written from the stream's buffer as it comes, with no fsync.
        loop {
            let data = stream.data()?;
            if data.is_empty() {
                break;
            }
            file.write_all(data).map_err(io_error("write file"))?;
            let n = data.len();
            stream.consume_data(n);
        }
        set_file_metadata(&file, entry)
    }

    fn symlink(&mut self, dir: &OwnedFd, base: &[u8], entry: &Entry) -> Result<(), LayerError> {
        self.create(dir, base, "create symlink", || {
            rustix::fs::symlinkat(entry.link.as_slice(), dir, base)
        })?;
        set_metadata(dir, base, entry, EntryKind::Symlink)?;
        set_times(dir, base, entry)
    }

    fn hardlink(&mut self, dir: &OwnedFd, base: &[u8], entry: &Entry) -> Result<(), LayerError> {
        let target = clean(&entry.link);
        if target.is_empty() {
            return Err(io_error("hard link to the root directory")(Errno::PERM));
        }
        let (target_parent, target_base) = split_last(&target);
        let below = || LayerError::NeedsParent {
            target: String::from_utf8_lossy(&target).into_owned(),
        };
        let target_dir = match open_dir(&self.root, target_parent, Missing::Fail) {
            Err(e) if self.whiteouts == Whiteouts::Record && is_missing(&e) => return Err(below()),
            opened => opened.map_err(io_error("open hard link target directory"))?,
        };
        if self.whiteouts == Whiteouts::Record
            && matches!(
                rustix::fs::statat(&target_dir, target_base, AtFlags::SYMLINK_NOFOLLOW),
                Err(Errno::NOENT)
            )
        {
            return Err(below());
        }
        // The target's own header may still be on its way onto the inode.
        self.files.wait();
        self.own_inode(&target_dir, &target, target_base)?;
        // Flags 0: a final symlink is linked itself, never followed.
        self.create(dir, base, "hard link", || {
            rustix::fs::linkat(&target_dir, target_base, dir, base, AtFlags::empty())
        })?;
        let stat = rustix::fs::statat(dir, base, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(io_error("inspect hard link"))?;
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Hardlink,
        };
        set_metadata(dir, base, entry, kind)?;
        set_times(dir, base, entry)
    }

    /// Before a hardlink entry changes its target: a target from the parent gets an inode
    /// of its own, unless this layer wrote it.
    fn own_inode(&mut self, dir: &OwnedFd, target: &[u8], base: &[u8]) -> Result<(), LayerError> {
        if self.inodes == Inodes::Own || self.is_written(target) {
            return Ok(());
        }
        if self.privatized.insert(self.hasher.hash_one(target)) {
            let base = std::ffi::CString::new(base).map_err(io_error("copy hard link target"))?;
            copy::privatize(dir, &base).map_err(io_error("copy hard link target"))?;
        }
        Ok(())
    }

    fn node(
        &mut self,
        dir: &OwnedFd,
        base: &[u8],
        entry: &Entry,
        file_type: FileType,
    ) -> Result<(), LayerError> {
        let (major, minor) = entry.device;
        self.create(dir, base, "create device or fifo", || {
            rustix::fs::mknodat(
                dir,
                base,
                file_type,
                Mode::from_raw_mode(entry.mode),
                rustix::fs::makedev(major, minor),
            )
        })?;
        set_metadata(dir, base, entry, EntryKind::Node(file_type))?;
        set_times(dir, base, entry)
    }

    /// Sets directory times in archive order.
    fn set_dir_times(&self) -> Result<(), Error> {
        for DirTimes { path, times, .. } in &self.dir_times {
            self.set_dir_time(path, times).map_err(|e| Error::Layer {
                path: String::from_utf8_lossy(path).into_owned(),
                reason: io_error("set directory times")(e),
            })?;
        }
        Ok(())
    }

    /// A directory replaced or removed later in the layer is skipped, and nothing is ever
    /// followed through a symlink.
    fn set_dir_time(&self, path: &[u8], times: &Timestamps) -> io::Result<()> {
        let (parent, base) = split_last(path);
        let dir = match open_dir(&self.root, parent, Missing::Fail) {
            Ok(dir) => dir,
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&dir, base, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) if fsutil::is_dir(&stat) => Ok(rustix::fs::utimensat(
                &dir,
                base,
                times,
                AtFlags::SYMLINK_NOFOLLOW,
            )?),
            Ok(_) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn entry_kind(entry: &Entry) -> Result<EntryKind, LayerError> {
    Ok(match entry.typeflag {
        b'\0' if entry.path.ends_with(b"/") => EntryKind::Directory,
        b'0' | b'\0' => EntryKind::Regular,
        b'1' => EntryKind::Hardlink,
        b'2' => EntryKind::Symlink,
        b'3' => EntryKind::Node(FileType::CharacterDevice),
        b'4' => EntryKind::Node(FileType::BlockDevice),
        b'5' => EntryKind::Directory,
        b'6' => EntryKind::Node(FileType::Fifo),
        other => return Err(LayerError::UnsupportedType(char::from(other))),
    })
}

/// Classifies a base name. A whiteout's target must be a child of its directory, so `.wh.`,
/// `.wh..` and `.wh...` are invalid.
fn classify(base: &[u8]) -> Result<Name<'_>, LayerError> {
    let Some(rest) = base.strip_prefix(b".wh.") else {
        return Ok(Name::Plain);
    };
    if rest == b".wh..opq" {
        Ok(Name::Opaque)
    } else if rest.starts_with(b".wh.") {
        Ok(Name::AufsMeta)
    } else if rest.is_empty() || rest == b"." || rest == b".." {
        Err(LayerError::InvalidWhiteout)
    } else {
        Ok(Name::Whiteout(rest))
    }
}

/// Cleans a tar name lexically into a root-relative path (`a/b`, or empty for the root):
/// empty and `.` components go, and `..` removes the previous component but never climbs
/// above the root, so `../../x` and `/x` both become `x`.
fn clean(path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    parts.join(&b'/')
}

/// `parent/name`, or `name` at the root.
fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    [parent, name].join(&b'/')
}

/// The names in the directory `dir` (an `O_PATH` descriptor), read completely so that
/// entries can be removed while going through them.
fn list_dir(dir: &OwnedFd) -> rustix::io::Result<Vec<Vec<u8>>> {
    let listing = rustix::fs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let names = fsutil::read_names(&listing)?;
    Ok(names
        .into_iter()
        .map(std::ffi::CString::into_bytes)
        .collect())
}

/// Splits a cleaned, non-empty path into its parent (empty for the root) and base name.
fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(slash) => (&path[..slash], &path[slash + 1..]),
        None => (&[], path),
    }
}

/// Makes room for a new entry at `base`: an existing directory stays if `keep_dir`,
/// anything else is removed (a directory with its content; a symlink itself, unfollowed).
/// Only an overlay layer directory holds whiteouts; elsewhere a 0:0 device is a device.
fn clear(
    dir: &OwnedFd,
    base: &[u8],
    keep_dir: bool,
    whiteouts: Whiteouts,
) -> Result<Existing, LayerError> {
    let stat = match rustix::fs::statat(dir, base, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(Existing::Nothing),
        Err(e) => return Err(io_error("inspect existing entry")(e)),
    };
    if keep_dir && fsutil::is_dir(&stat) {
        return Ok(Existing::Directory);
    }
    fsutil::remove_at(dir.as_fd(), base).map_err(io_error("remove existing entry"))?;
    Ok(if whiteouts == Whiteouts::Overlay && is_whiteout(&stat) {
        Existing::Whiteout
    } else {
        Existing::Other
    })
}

/// Whether a lookup failed because a component of the path is not there (or not a
/// directory).
fn is_missing(error: &io::Error) -> bool {
    matches!(
        Errno::from_io_error(error),
        Some(Errno::NOENT | Errno::NOTDIR)
    )
}

fn is_whiteout(stat: &Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::CharacterDevice && stat.st_rdev == 0
}

/// Owner, then xattrs, then mode: chown clears setuid, setgid and `security.capability`.
fn set_metadata(
    dir: &OwnedFd,
    base: &[u8],
    entry: &Entry,
    kind: EntryKind,
) -> Result<(), LayerError> {
    chown_at(dir, base, entry).map_err(io_error("change owner"))?;
    for (name, value) in &entry.xattrs {
        set_entry_xattr(name, kind, || set_xattr_at(dir, base, name, value))?;
    }
    if kind != EntryKind::Symlink {
        rustix::fs::chmodat(dir, base, Mode::from_raw_mode(entry.mode), AtFlags::empty())
            .map_err(io_error("change mode"))?;
    }
    Ok(())
}

/// [`set_metadata`] and the times of a regular file, through its open descriptor.
fn set_file_metadata(file: &File, entry: &Entry) -> Result<(), LayerError> {
    rustix::fs::fchown(
        file,
        Some(Uid::from_raw(entry.uid)),
        Some(Gid::from_raw(entry.gid)),
    )
    .map_err(io_error("change owner"))?;
    for (name, value) in &entry.xattrs {
        set_entry_xattr(name, EntryKind::Regular, || {
            rustix::fs::fsetxattr(file, name, value, XattrFlags::empty())
        })?;
    }
    rustix::fs::fchmod(file, Mode::from_raw_mode(entry.mode)).map_err(io_error("change mode"))?;
    rustix::fs::futimens(file, &timestamps(entry)).map_err(io_error("set times"))
}

fn chown_at(dir: &OwnedFd, base: &[u8], entry: &Entry) -> rustix::io::Result<()> {
    rustix::fs::chownat(
        dir,
        base,
        Some(Uid::from_raw(entry.uid)),
        Some(Gid::from_raw(entry.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// `trusted.*` is refused, which also blocks forged `trusted.overlay.*` markers. Filesystems
/// without xattrs, and `user.*` on what cannot carry it, are tolerated as containerd does.
fn set_entry_xattr(
    name: &[u8],
    kind: EntryKind,
    set: impl FnOnce() -> rustix::io::Result<()>,
) -> Result<(), LayerError> {
    let shown = String::from_utf8_lossy(name);
    if name.starts_with(b"trusted.") {
        tracing::warn!(xattr = %shown, "ignoring trusted.* xattr in layer");
        return Ok(());
    }
    match set() {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP) => {
            tracing::debug!(xattr = %shown, "xattrs not supported here; skipped");
            Ok(())
        }
        Err(Errno::PERM)
            if name.starts_with(b"user.")
                && !matches!(kind, EntryKind::Regular | EntryKind::Directory) =>
        {
            Ok(())
        }
        Err(e) => Err(io_error("set xattr")(e)),
    }
}

/// `lsetxattr` on `base` inside `dir`. There is no `*at` form before Linux 6.13, so the
/// path goes through the descriptor's `/proc/thread-self/fd` entry: the directory is the
/// one already resolved, and the final component is not followed.
fn set_xattr_at(dir: &OwnedFd, base: &[u8], name: &[u8], value: &[u8]) -> rustix::io::Result<()> {
    let mut path = format!("/proc/thread-self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(base);
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty())
}

fn set_times(dir: &OwnedFd, base: &[u8], entry: &Entry) -> Result<(), LayerError> {
    rustix::fs::utimensat(dir, base, &timestamps(entry), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(io_error("set times"))
}

/// atime is never older than mtime, as containerd sets them.
fn timestamps(entry: &Entry) -> Timestamps {
    let atime = entry.atime.unwrap_or_default().max(entry.mtime);
    Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(entry.mtime),
    }
}

fn timespec(time: Time) -> Timespec {
    Timespec {
        tv_sec: time.secs,
        tv_nsec: i64::from(time.nanos),
    }
}

fn io_error<E: Into<io::Error>>(op: &'static str) -> impl FnOnce(E) -> LayerError {
    move |e| LayerError::Io {
        op,
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_clamped_into_the_root() {
        let cases: [(&str, &str); 9] = [
            ("a/b/c", "a/b/c"),
            ("./a//b/", "a/b"),
            ("../../../../tmp/pwn", "tmp/pwn"),
            ("/etc/x", "etc/x"),
            ("a/../.wh.etc", ".wh.etc"),
            ("a/b/../../..", ""),
            ("./", ""),
            (".", ""),
            ("..wh../x", "..wh../x"),
        ];
        for (name, cleaned) in cases {
            assert_eq!(clean(name.as_bytes()), cleaned.as_bytes(), "{name}");
        }
    }

    #[test]
    fn paths_split_into_parent_and_base() {
        assert_eq!(split_last(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_last(b"c"), (&b""[..], &b"c"[..]));
    }

    #[test]
    fn whiteout_names_are_classified() {
        assert_eq!(classify(b"file").unwrap(), Name::Plain);
        assert_eq!(classify(b".whatever").unwrap(), Name::Plain);
        assert_eq!(classify(b".wh..wh..opq").unwrap(), Name::Opaque);
        assert_eq!(classify(b".wh..wh.plnk").unwrap(), Name::AufsMeta);
        assert_eq!(classify(b".wh.a").unwrap(), Name::Whiteout(b"a"));
        assert_eq!(
            classify(b".wh..hidden").unwrap(),
            Name::Whiteout(b".hidden")
        );
        for invalid in [&b".wh."[..], b".wh..", b".wh..."] {
            assert!(matches!(
                classify(invalid),
                Err(LayerError::InvalidWhiteout)
            ));
        }
    }

    #[test]
    fn atime_is_never_older_than_mtime() {
        let mut entry = Entry {
            typeflag: b'0',
            path: b"f".to_vec(),
            link: Vec::new(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: Time {
                secs: 100,
                nanos: 5,
            },
            atime: Some(Time { secs: 50, nanos: 0 }),
            size: 0,
            device: (0, 0),
            xattrs: Default::default(),
        };
        let times = timestamps(&entry);
        assert_eq!(
            (times.last_access.tv_sec, times.last_access.tv_nsec),
            (100, 5)
        );
        entry.atime = Some(Time {
            secs: 200,
            nanos: 0,
        });
        assert_eq!(timestamps(&entry).last_access.tv_sec, 200);
        assert_eq!(entry_kind(&entry).unwrap(), EntryKind::Regular);
        entry.typeflag = b'7';
        assert!(matches!(
            entry_kind(&entry),
            Err(LayerError::UnsupportedType('7'))
        ));
        entry.typeflag = b'\0';
        entry.path = b"d/".to_vec();
        assert_eq!(entry_kind(&entry).unwrap(), EntryKind::Directory);
    }
}
