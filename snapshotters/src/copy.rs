//! Copies of snapshot trees, for snapshotters whose snapshots start as a copy of their
//! parent: a full copy ([`copy_tree`]) for a snapshot anything may write into, or one that
//! shares the parent's files ([`link_tree`]) for a snapshot only the layer applier writes,
//! which replaces what it changes rather than changing it in place ([`privatize`]); and the
//! same sharing copy merged under a layer applied alone ([`merge_tree`]).
//!
//! Like the removal in `fsutil`, the copy never recurses and holds a fixed number of
//! descriptors: a hostile layer can nest directories thousands of levels deep, so each tree is
//! walked with one directory descriptor that climbs back through `..`. Nothing is followed:
//! every call is relative to a directory descriptor and refuses a symlink as its last
//! component, and only directories opened with `O_NOFOLLOW | O_DIRECTORY` are entered.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, CWD, FileType, Gid, Mode, OFlags, SeekFrom, Stat, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use crate::Error;
use crate::fsutil;
use crate::hidden::Hidden;

/// Copies everything below `from` into the existing empty directory `to`, and gives `to` the
/// owner, mode, xattrs and times of `from`.
///
/// Hardlinks within the tree stay hardlinks, holes stay holes (and data is shared where the
/// file system can reflink), and a name that already exists in `to` is an error rather than
/// merged.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<(), Error> {
    tree(from, to, false, None)
}

/// Like [`copy_tree`], except that every entry other than a directory is a new hardlink to
/// the inode in `from` rather than a copy of it: directories are the tree's own, files are
/// shared. An inode that cannot take another link (`EMLINK`, or `EPERM` under
/// `fs.protected_hardlinks` without the capability) is copied instead, its other names
/// linked to that copy.
pub(crate) fn link_tree(from: &Path, to: &Path) -> Result<(), Error> {
    tree(from, to, true, None)
}

/// Makes `upper`, the tree of a layer applied alone, the tree of that layer on top of
/// `lower`: every entry of `lower` that the layer neither replaces (an entry of its own at
/// the same path) nor hides (`hidden`) is linked in as [`link_tree`] links. A directory both
/// have is merged and keeps the layer's attributes (its times as they were before the merge
/// linked into it), unless the layer made it opaque; `upper`'s root takes `lower`'s
/// attributes, as a layer's root entry does not count. This is what overlayfs shows of the
/// two, and a directory the layer only implied is left for [`crate::implicit`].
pub(crate) fn merge_tree(lower: &Path, upper: &Path, hidden: &Hidden) -> Result<(), Error> {
    tree(lower, upper, true, Some(hidden))
}

fn tree(from: &Path, to: &Path, share: bool, merge: Option<&Hidden>) -> Result<(), Error> {
    let src = open_dir(CWD, from)
        .op("open directory")
        .map_err(|f| f.at(from))?;
    // Taken before anything is read, so that the copy gets the atime of before the copy.
    let stat = rustix::fs::fstat(&src)
        .op("inspect")
        .map_err(|f| f.at(from))?;
    let dst = open_dir(CWD, to)
        .op("open directory")
        .map_err(|f| f.at(to))?;
    let dst_root = dst
        .try_clone()
        .op("duplicate descriptor")
        .map_err(|f| f.at(to))?;
    let mut copier = Copier {
        from,
        dst_root,
        rel: PathBuf::new(),
        links: HashMap::new(),
        share,
        merge,
    };
    let (src, dst) = match merge {
        // The layer hides all of `lower` below its root.
        Some(hidden) if hidden.is_opaque(b"") => (src, dst),
        _ => copier.walk(src, dst)?,
    };
    set_metadata(&src, c".", &dst, c".", &stat).map_err(|f| f.at(from))
}

/// One copy in progress.
struct Copier<'a> {
    from: &'a Path,
    /// The top of the destination, from which the first copy of a hardlinked inode is found.
    dst_root: OwnedFd,
    /// Path of the directory being copied, relative to both tops.
    rel: PathBuf,
    /// `(st_dev, st_ino)` of each copied source inode with several names → directory
    /// (relative) and name of its first copy.
    links: HashMap<(u64, u64), (PathBuf, CString)>,
    /// Whether entries other than directories are linked to the source rather than copied.
    share: bool,
    /// With [`merge_tree`]: what the destination's layer hides of the source.
    merge: Option<&'a Hidden>,
}

/// A source directory the walk enters.
enum Subdir {
    /// Not in the destination: created there, and given the source's `lstat` attributes
    /// once its content is complete.
    New(Stat),
    /// In the destination too (a merge): entered, and given back its times afterwards.
    Shared(Timestamps),
}

/// A directory entered by the walk, with the subdirectories of its parent still to copy.
struct Frame {
    name: CString,
    subdir: Subdir,
    rest: Vec<(CString, Subdir)>,
}

impl Copier<'_> {
    /// Copies the content of `src` into `dst`, depth first, and returns the descriptors of both
    /// tops again.
    fn walk(&mut self, mut src: OwnedFd, mut dst: OwnedFd) -> Result<(OwnedFd, OwnedFd), Error> {
        let mut stack = Vec::new();
        let mut subdirs = self.copy_entries(&src, &dst, self.merge.is_some())?;
        loop {
            if let Some((name, subdir)) = subdirs.pop() {
                let shared = matches!(subdir, Subdir::Shared(_));
                (src, dst) = descend(&src, &dst, &name, !shared)
                    .map_err(|f| f.at(self.path(Some(&name))))?;
                self.rel.push(OsStr::from_bytes(name.to_bytes()));
                let inner = self.copy_entries(&src, &dst, shared)?;
                let rest = std::mem::replace(&mut subdirs, inner);
                stack.push(Frame { name, subdir, rest });
                continue;
            }
            let Some(frame) = stack.pop() else {
                return Ok((src, dst));
            };
            (src, dst) = climb(&src, &dst).map_err(|f| f.at(self.path(None)))?;
            self.rel.pop();
            // Only now: creating the entries would change its times, and its default ACL would
            // otherwise be inherited by copies that bring their own.
            let done = match &frame.subdir {
                Subdir::New(stat) => set_metadata(&src, &frame.name, &dst, &frame.name, stat),
                Subdir::Shared(times) => {
                    rustix::fs::utimensat(&dst, &frame.name, times, AtFlags::SYMLINK_NOFOLLOW)
                        .op("restore times")
                }
            };
            done.map_err(|f| f.at(self.path(Some(&frame.name))))?;
            subdirs = frame.rest;
        }
    }

    /// Copies the entries of `src` other than directories into `dst` and returns the
    /// subdirectories, which the walk copies next. With `merging`, `dst` is a directory of
    /// the layer [`merge_tree`] links into, and each entry is first looked up there.
    fn copy_entries(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        merging: bool,
    ) -> Result<Vec<(CString, Subdir)>, Error> {
        // Read completely first, so that no directory stream stays open below this level.
        let entries = fsutil::read_entries(src)
            .op("read directory")
            .map_err(|f| f.at(self.path(None)))?;
        let mut subdirs = Vec::new();
        for (name, kind) in entries {
            // Below a directory the layer does not have, only its whiteouts count.
            if let Some(hidden) = self.merge.filter(|h| merging || h.hides_any()) {
                let merged = self
                    .merge_entry(hidden, src, dst, &name, kind, merging)
                    .map_err(|f| f.at(self.path(Some(&name))))?;
                match merged {
                    Merged::Absent => {}
                    Merged::Skipped => continue,
                    Merged::Shared(times) => {
                        subdirs.push((name, Subdir::Shared(times)));
                        continue;
                    }
                }
            }
            // Linking needs no lstat, unless the directory listing leaves the type open.
            let linked = self.share && !matches!(kind, FileType::Directory | FileType::Unknown);
            let copied = match linked {
                true => self.link_entry(src, dst, &name).map(|()| None),
                false => self.copy_entry(src, dst, &name),
            };
            match copied {
                Ok(Some(stat)) => subdirs.push((name, Subdir::New(stat))),
                Ok(None) => {}
                Err(f) => return Err(f.at(self.path(Some(&name)))),
            }
        }
        Ok(subdirs)
    }

    /// What [`merge_tree`] does with the source's entry `name`: hidden by the layer, or
    /// replaced by its entry of that name, it stays out; a directory both have is merged
    /// unless the layer made it opaque. Unless `merging`, `dst` is a directory of the
    /// parent's that the walk created, and only the whiteouts are looked at.
    fn merge_entry(
        &self,
        hidden: &Hidden,
        src: &OwnedFd,
        dst: &OwnedFd,
        name: &CStr,
        kind: FileType,
        merging: bool,
    ) -> Result<Merged, Failed> {
        let mut path = self.rel.as_os_str().as_bytes().to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name.to_bytes());
        if hidden.hides(&path) {
            return Ok(Merged::Skipped);
        }
        if !merging {
            return Ok(Merged::Absent);
        }
        let upper = match rustix::fs::statat(dst, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(upper) => upper,
            Err(Errno::NOENT) => return Ok(Merged::Absent),
            Err(e) => return Err(e).op("inspect the layer's entry"),
        };
        let lower_is_dir = match kind {
            FileType::Unknown => fsutil::is_dir(
                &rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW).op("inspect")?,
            ),
            kind => kind == FileType::Directory,
        };
        Ok(
            if lower_is_dir && fsutil::is_dir(&upper) && !hidden.is_opaque(&path) {
                Merged::Shared(fsutil::stat_times(&upper))
            } else {
                Merged::Skipped
            },
        )
    }

    /// Copies (or links) one entry that is not a directory; for a directory, returns its
    /// `lstat` instead.
    fn copy_entry(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        name: &CStr,
    ) -> Result<Option<Stat>, Failed> {
        let stat = rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW).op("inspect")?;
        if fsutil::is_dir(&stat) {
            return Ok(Some(stat));
        }
        if self.share {
            self.link_entry(src, dst, name)?;
        } else {
            self.copy_file_entry(src, dst, name, &stat)?;
        }
        Ok(None)
    }

    /// Links `name` in `dst` to the inode of `name` in `src`, not a directory; an inode that
    /// can take no more links is copied once, its other names linked to the copy.
    fn link_entry(&mut self, src: &OwnedFd, dst: &OwnedFd, name: &CStr) -> Result<(), Failed> {
        // Flags 0: a symlink is linked itself.
        match rustix::fs::linkat(src, name, dst, name, AtFlags::empty()) {
            Ok(()) => Ok(()),
            Err(Errno::MLINK | Errno::PERM) => {
                let stat =
                    rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW).op("inspect")?;
                self.copy_file_entry(src, dst, name, &stat)
            }
            Err(e) => Err(e).op("link"),
        }
    }

    /// Copies the non-directory `name`, or links it to the copy already made of its inode.
    fn copy_file_entry(
        &mut self,
        src: &OwnedFd,
        dst: &OwnedFd,
        name: &CStr,
        stat: &Stat,
    ) -> Result<(), Failed> {
        let inode = (stat.st_dev, stat.st_ino);
        if stat.st_nlink > 1
            && let Some((dir, first)) = self.links.get(&inode)
        {
            return self.link(dir, first, dst, name).op("link");
        }
        create(src, name, dst, name, stat)?;
        set_metadata(src, name, dst, name, stat)?;
        if stat.st_nlink > 1 {
            self.links
                .insert(inode, (self.rel.clone(), name.to_owned()));
        }
        Ok(())
    }

    /// Links `name` in `dst` to the copy `first` in directory `dir` of the destination.
    fn link(&self, dir: &Path, first: &CStr, dst: &OwnedFd, name: &CStr) -> io::Result<()> {
        // One component at a time: the whole path may be longer than PATH_MAX.
        let mut at: Option<OwnedFd> = None;
        for part in dir {
            let parent = at.as_ref().map_or(self.dst_root.as_fd(), AsFd::as_fd);
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            at = Some(rustix::fs::openat(parent, part, flags, Mode::empty())?);
        }
        let parent = at.as_ref().map_or(self.dst_root.as_fd(), AsFd::as_fd);
        Ok(rustix::fs::linkat(
            parent,
            first,
            dst,
            name,
            AtFlags::empty(),
        )?)
    }

    /// The source path of `name` in the current directory, or of the directory itself.
    fn path(&self, name: Option<&CStr>) -> PathBuf {
        let mut path = self.from.to_path_buf();
        let name = name.map(|name| OsStr::from_bytes(name.to_bytes()));
        for part in self.rel.iter().chain(name) {
            path.push(part);
        }
        path
    }
}

/// Gives the non-directory `name` in `dir` an inode of its own: a copy with its content,
/// owner, xattrs, mode and times replaces it, so that changing it afterwards leaves the inode
/// it shared alone. Other names of the old inode keep it, as overlayfs's copy-up does without
/// its index. A missing name and a directory are left for the caller's link to refuse.
pub(crate) fn privatize(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) if !fsutil::is_dir(&stat) => stat,
        Ok(_) | Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut attempt = 0u32;
    let temp = loop {
        let temp = CString::new(format!(".imaged-copy-{}-{attempt}", std::process::id()))
            .expect("no NUL in a formatted name");
        match create(dir, name, dir, &temp, &stat) {
            Ok(()) => break temp,
            // Left by an earlier attempt, or the layer's own: another name.
            Err(Failed { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists && attempt < 100 =>
            {
                attempt += 1;
            }
            Err(failed) => return Err(failed.source),
        }
    };
    let replaced = set_metadata(dir, name, dir, &temp, &stat)
        .map_err(|f| f.source)
        .and_then(|()| Ok(rustix::fs::renameat(dir, &temp, dir, name)?));
    if replaced.is_err() {
        // Best effort: the failed layer's snapshot, temp included, is removed as a whole.
        let _ = rustix::fs::unlinkat(dir, &temp, AtFlags::empty());
    }
    replaced
}

/// What [`merge_tree`] makes of one entry of the lower tree.
enum Merged {
    /// The layer has nothing there: the entry is linked (or its directory copied) in.
    Absent,
    /// Hidden or replaced by the layer.
    Skipped,
    /// A directory in both, merged; these are the layer's directory's times.
    Shared(Timestamps),
}

/// A failed step; [`Failed::at`] names the entry it was about.
struct Failed {
    op: &'static str,
    source: io::Error,
}

impl Failed {
    fn at(self, path: impl Into<PathBuf>) -> Error {
        Error::io(self.op, path)(self.source)
    }
}

trait Step<T> {
    fn op(self, op: &'static str) -> Result<T, Failed>;
}

impl<T, E: Into<io::Error>> Step<T> for Result<T, E> {
    fn op(self, op: &'static str) -> Result<T, Failed> {
        self.map_err(|e| Failed {
            op,
            source: e.into(),
        })
    }
}

fn open_dir<Fd: AsFd, P: rustix::path::Arg>(dir: Fd, path: P) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, path, flags, Mode::empty())
}

/// Enters `name` in both trees, creating it in `dst` first when `create`.
fn descend(
    src: &OwnedFd,
    dst: &OwnedFd,
    name: &CStr,
    create: bool,
) -> Result<(OwnedFd, OwnedFd), Failed> {
    let src = open_dir(src, name).op("open directory")?;
    if create {
        // Private until its own mode is copied, once its content is complete.
        rustix::fs::mkdirat(dst, name, Mode::from_raw_mode(0o700)).op("create directory")?;
    }
    let dst = open_dir(dst, name).op("open directory")?;
    Ok((src, dst))
}

fn climb(src: &OwnedFd, dst: &OwnedFd) -> Result<(OwnedFd, OwnedFd), Failed> {
    let src = open_dir(src, c"..").op("open parent directory")?;
    let dst = open_dir(dst, c"..").op("open parent directory")?;
    Ok((src, dst))
}

/// Creates `to` in `dst` as a copy of the non-directory `from` in `src`, with its content but
/// none of its metadata.
fn create(src: &OwnedFd, from: &CStr, dst: &OwnedFd, to: &CStr, stat: &Stat) -> Result<(), Failed> {
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => copy_file(src, from, dst, to, stat),
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(src, from, Vec::new()).op("read symlink")?;
            rustix::fs::symlinkat(&target, dst, to).op("create symlink")
        }
        kind @ (FileType::CharacterDevice
        | FileType::BlockDevice
        | FileType::Fifo
        | FileType::Socket) => {
            rustix::fs::mknodat(dst, to, kind, Mode::empty(), stat.st_rdev).op("create node")
        }
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "unexpected file type",
        ))
        .op("copy"),
    }
}

fn copy_file(
    src: &OwnedFd,
    from: &CStr,
    dst: &OwnedFd,
    to: &CStr,
    stat: &Stat,
) -> Result<(), Failed> {
    // Non-blocking, should a FIFO ever take the file's place; no atime updates on parents.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOATIME;
    let from =
        rustix::fs::openat(src, from, flags | OFlags::CLOEXEC, Mode::empty()).op("open file")?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let to = rustix::fs::openat(dst, to, flags, Mode::from_raw_mode(0o600)).op("create file")?;
    let (from, to) = (File::from(from), File::from(to));
    match rustix::fs::ioctl_ficlone(&to, &from) {
        Ok(()) => Ok(()),
        // The file system cannot share extents (or not between these two files).
        Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY | Errno::NOSYS) => {
            let size = u64::try_from(stat.st_size).unwrap_or(0);
            copy_data(&from, &to, size).op("copy data")
        }
        Err(e) => Err(e).op("clone file"),
    }
}

/// Copies the data segments of `from` into the empty `to`, leaving its holes as holes.
fn copy_data(from: &File, to: &File, size: u64) -> io::Result<()> {
    let mut offset = 0;
    loop {
        let start = match rustix::fs::seek(from, SeekFrom::Data(offset)) {
            Ok(start) => start,
            // No data at or after `offset`.
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(from, SeekFrom::Hole(start))?;
        copy_segment(from, to, start, end)?;
        offset = end;
    }
    // A trailing hole has no data that would extend the copy.
    Ok(rustix::fs::ftruncate(to, size)?)
}

fn copy_segment(from: &File, to: &File, start: u64, end: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (start, start);
    while off_in < end {
        let len = usize::try_from(end - off_in).unwrap_or(usize::MAX);
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), len) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            // Not every file system (or pair of them) can copy in the kernel.
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                return write_segment(from, to, off_in, end);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn write_segment(from: &File, to: &File, mut offset: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0; 128 * 1024];
    while offset < end {
        let want = usize::try_from(end - offset).map_or(buf.len(), |left| left.min(buf.len()));
        let read = from.read_at(&mut buf[..want], offset)?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        to.write_all_at(&buf[..read], offset)?;
        offset += read as u64;
    }
    Ok(())
}

/// Gives the copy `to` in `dst` the owner, xattrs, mode and times of `from` in `src`, in
/// this order: a change of owner clears setuid, setgid and `security.capability`.
fn set_metadata(
    src: &OwnedFd,
    from: &CStr,
    dst: &OwnedFd,
    to: &CStr,
    stat: &Stat,
) -> Result<(), Failed> {
    let kind = FileType::from_raw_mode(stat.st_mode);
    let (uid, gid) = (Uid::from_raw(stat.st_uid), Gid::from_raw(stat.st_gid));
    rustix::fs::chownat(dst, to, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
        .op("copy owner")?;
    copy_xattrs(src, from, dst, to, kind)?;
    // A symlink has no mode of its own.
    if kind != FileType::Symlink {
        let mode = Mode::from_raw_mode(stat.st_mode & 0o7777);
        rustix::fs::chmodat(dst, to, mode, AtFlags::empty()).op("copy mode")?;
    }
    let times = fsutil::stat_times(stat);
    rustix::fs::utimensat(dst, to, &times, AtFlags::SYMLINK_NOFOLLOW).op("copy times")
}

/// The largest xattr value, and the largest list of xattr names, that Linux allows.
const XATTR_MAX: usize = 64 * 1024;

/// Copies every xattr, `security.*` and `trusted.*` included.
fn copy_xattrs(
    src: &OwnedFd,
    from: &CStr,
    dst: &OwnedFd,
    to: &CStr,
    kind: FileType,
) -> Result<(), Failed> {
    let from = proc_path(src, from);
    // Buffers of the largest size rather than a size query: rustix 1.1.6 answers an empty
    // buffer with 0 instead of the size, and no xattr can then grow between query and read.
    let mut list = [MaybeUninit::uninit(); XATTR_MAX];
    let attrs = match rustix::fs::llistxattr(&from, &mut list) {
        Ok((attrs, _)) => attrs,
        // The source file system has no xattrs at all.
        Err(Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e).op("list xattrs"),
    };
    let to = proc_path(dst, to);
    let mut buf = [MaybeUninit::uninit(); XATTR_MAX];
    for attr in attrs.split(|b| *b == 0).filter(|attr| !attr.is_empty()) {
        let (value, _) = rustix::fs::lgetxattr(&from, attr, &mut buf).op("read xattr")?;
        match rustix::fs::lsetxattr(&to, attr, value, XattrFlags::empty()) {
            Ok(()) => {}
            Err(e) if cannot_hold(e, attr, kind) => {}
            Err(e) => return Err(e).op("copy xattr"),
        }
    }
    Ok(())
}

/// Whether `error` from setting `attr` means the destination cannot hold it at all; like
/// containerd, the copy then goes on without it.
fn cannot_hold(error: Errno, attr: &[u8], kind: FileType) -> bool {
    // The kernel allows `user.*` on regular files and directories only.
    let user_on_special =
        attr.starts_with(b"user.") && !matches!(kind, FileType::RegularFile | FileType::Directory);
    error == Errno::OPNOTSUPP || (error == Errno::PERM && user_on_special)
}

/// The path of `name` inside `dir` through the descriptor's `/proc/thread-self/fd` entry.
/// There is no `*xattr` call relative to a directory descriptor before Linux 6.13; this way
/// the directory is the one already opened, and `l*xattr` does not follow `name`.
fn proc_path(dir: &OwnedFd, name: &CStr) -> Vec<u8> {
    let mut path = format!("/proc/thread-self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, lchown, symlink};

    use rustix::fs::{Timespec, Timestamps};
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

    /// More levels than the descriptor limit the copy runs under, and a path longer than
    /// PATH_MAX.
    const DEPTH: usize = 2000;
    const MIB: u64 = 1024 * 1024;

    /// Everything the copy must keep about one entry, its inode aside.
    #[derive(Debug, PartialEq)]
    struct Node {
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        rdev: u64,
        mtime: (i64, i64),
        content: Vec<u8>,
        target: Option<PathBuf>,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    }

    /// A v2 `security.capability`: CAP_NET_BIND_SERVICE permitted and effective.
    fn capability() -> Vec<u8> {
        let mut blob = 0x0200_0001u32.to_le_bytes().to_vec();
        for word in [1u32 << 10, 0, 0, 0] {
            blob.extend_from_slice(&word.to_le_bytes());
        }
        blob
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).unwrap();
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn set_mtime(path: &Path, secs: i64, nanos: i64) {
        let time = Timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        };
        let times = Timestamps {
            last_access: time,
            last_modification: time,
        };
        rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    fn mknod(path: &Path, kind: FileType, mode: u32, dev: u64) {
        rustix::fs::mknodat(CWD, path, kind, Mode::empty(), dev).unwrap();
        set_mode(path, mode);
    }

    /// Non-directories given mtimes one second and one nanosecond apart.
    const FILE_TIMES: [&str; 9] = [
        "h1",
        "a/b/suid",
        "a/user",
        "a/abs",
        "a/dangling",
        "null",
        "fifo",
        "sparse",
        "empty",
    ];

    /// A tree with every kind of entry and metadata a layer can hold.
    fn build(src: &Path) {
        let (a, b, sgid) = (src.join("a"), src.join("a/b"), src.join("sgid"));
        fs::create_dir_all(&b).unwrap();
        fs::create_dir(&sgid).unwrap();

        let suid = b.join("suid");
        fs::write(&suid, b"#!/bin/true\n").unwrap();
        chown(&suid, Some(0), Some(0)).unwrap();
        set_xattr(&suid, "security.capability", &capability());
        set_mode(&suid, 0o4755);
        fs::write(a.join("user"), b"user xattr").unwrap();
        set_xattr(&a.join("user"), "user.test", b"hello");
        set_xattr(&a, "trusted.x", b"trusted");

        fs::write(src.join("h1"), b"linked").unwrap();
        chown(src.join("h1"), Some(2000), Some(2001)).unwrap();
        fs::hard_link(src.join("h1"), src.join("h2")).unwrap();
        fs::hard_link(src.join("h1"), a.join("h3")).unwrap();

        symlink("/etc/passwd", a.join("abs")).unwrap();
        lchown(a.join("abs"), Some(1234), Some(5678)).unwrap();
        symlink("../missing", a.join("dangling")).unwrap();
        symlink("b", a.join("dirlink")).unwrap();

        let null = src.join("null");
        mknod(
            &null,
            FileType::CharacterDevice,
            0o640,
            rustix::fs::makedev(1, 3),
        );
        chown(&null, Some(1000), Some(1000)).unwrap();
        mknod(&src.join("fifo"), FileType::Fifo, 0o620, 0);
        mknod(&src.join("sock"), FileType::Socket, 0o755, 0);

        let sparse = File::create_new(src.join("sparse")).unwrap();
        sparse.set_len(64 * MIB).unwrap();
        sparse.write_all_at(&[0xab; 4096], 32 * MIB).unwrap();
        let holey = File::create_new(src.join("holey")).unwrap();
        holey.write_all_at(&[1; 4096], 0).unwrap();
        holey.write_all_at(&[2; 4096], MIB).unwrap();
        File::create_new(src.join("empty")).unwrap();
        fs::write(sgid.join("file"), b"in sgid").unwrap();
        build_deep(&src.join("deep"));

        for (i, name) in (0..).zip(FILE_TIMES) {
            set_mtime(&src.join(name), 1_600_000_000 + i, 100_000_001 + i);
        }
        // Directories last, deepest first: filling them changed their times.
        for (i, (dir, mode, owner)) in (0..).zip([
            (&b, 0o700, 1001),
            (&a, 0o1777, 1000),
            (&sgid, 0o2755, 3000),
            (&src.to_path_buf(), 0o750, 1000),
        ]) {
            chown(dir, Some(owner), Some(owner + 1)).unwrap();
            set_mode(dir, mode);
            set_mtime(dir, 1_500_000_000 + i, 900_000_000 + i);
        }
    }

    /// A chain of `DEPTH` directories `d` with a file at the bottom, built through
    /// descriptors because its path is longer than PATH_MAX.
    fn build_deep(top: &Path) {
        fs::create_dir(top).unwrap();
        let mut dir = open_dir(CWD, top).unwrap();
        for level in 0..DEPTH {
            rustix::fs::mkdirat(&dir, c"d", Mode::from_raw_mode(0o755)).unwrap();
            dir = open_dir(&dir, c"d").unwrap();
            if level % 100 == 0 {
                let id = u32::try_from(level).unwrap();
                rustix::fs::fchown(&dir, Some(Uid::from_raw(id)), Some(Gid::from_raw(id))).unwrap();
                rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o711)).unwrap();
            }
        }
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        let file = rustix::fs::openat(&dir, c"bottom", flags, Mode::from_raw_mode(0o640)).unwrap();
        File::from(file).write_all_at(b"bottom", 0).unwrap();
    }

    /// Every entry below `root` except the deep chain's content, by relative path, with its
    /// `(st_dev, st_ino)`.
    fn collect(root: &Path) -> BTreeMap<PathBuf, (Node, (u64, u64))> {
        let mut nodes = BTreeMap::new();
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() && rel != Path::new("deep") {
                for entry in fs::read_dir(&path).unwrap() {
                    todo.push(rel.join(entry.unwrap().file_name()));
                }
            }
            nodes.insert(rel, (node(&path, &meta), (meta.dev(), meta.ino())));
        }
        nodes
    }

    fn node(path: &Path, meta: &fs::Metadata) -> Node {
        let mut names = vec![0; XATTR_MAX];
        let len = rustix::fs::llistxattr(path, &mut names).unwrap();
        let xattrs = names[..len]
            .split(|b| *b == 0)
            .filter(|name| !name.is_empty())
            .map(|name| {
                let mut value = vec![0; XATTR_MAX];
                let len = rustix::fs::lgetxattr(path, name, &mut value).unwrap();
                value.truncate(len);
                (name.to_vec(), value)
            })
            .collect();
        Node {
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.size(),
            rdev: meta.rdev(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            content: if meta.is_file() {
                fs::read(path).unwrap()
            } else {
                Vec::new()
            },
            target: meta.is_symlink().then(|| fs::read_link(path).unwrap()),
            xattrs,
        }
    }

    /// Compares the deep chains level by level, holding two descriptors at a time.
    fn compare_deep(src: &Path, dst: &Path) {
        let meta = |s: &Stat| (s.st_mode, s.st_uid, s.st_gid, s.st_mtime, s.st_mtime_nsec);
        let mut from = open_dir(CWD, src).unwrap();
        let mut to = open_dir(CWD, dst).unwrap();
        for level in 0..=DEPTH {
            let (a, b) = (
                rustix::fs::fstat(&from).unwrap(),
                rustix::fs::fstat(&to).unwrap(),
            );
            assert_eq!(meta(&a), meta(&b), "level {level}");
            assert_ne!(a.st_ino, b.st_ino, "level {level}");
            if level < DEPTH {
                from = open_dir(&from, c"d").unwrap();
                to = open_dir(&to, c"d").unwrap();
            }
        }
        let bottom = rustix::fs::openat(&to, c"bottom", OFlags::RDONLY, Mode::empty()).unwrap();
        let bottom = File::from(bottom);
        let mut content = [0; 16];
        assert_eq!(bottom.read_at(&mut content, 0).unwrap(), 6);
        assert_eq!(&content[..6], b"bottom");
        assert_eq!(bottom.metadata().unwrap().mode(), 0o100640);
    }

    #[test]
    fn copy_tree_keeps_every_entry_and_its_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dst).unwrap();
        build(&src);

        // Fewer descriptors than levels: a copy holding one per level would fail.
        let limit = getrlimit(Resource::Nofile);
        let lowered = Rlimit {
            current: Some(limit.current.map_or(1024, |current| current.min(1024))),
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, lowered).unwrap();
        let copied = copy_tree(&src, &dst);
        setrlimit(Resource::Nofile, limit).unwrap();
        copied.unwrap();

        let (before, after) = (collect(&src), collect(&dst));
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
        for (rel, (node, _)) in &before {
            assert_eq!(node, &after[rel].0, "{rel:?}");
        }
        let src_inodes: HashSet<_> = before.values().map(|(_, inode)| *inode).collect();
        assert!(after.values().all(|(_, inode)| !src_inodes.contains(inode)));
        let links: HashSet<_> = ["h1", "h2", "a/h3"]
            .map(|rel| after[Path::new(rel)].1)
            .into();
        assert_eq!(links.len(), 1);
        assert_eq!(fs::symlink_metadata(dst.join("h1")).unwrap().nlink(), 3);
        compare_deep(&src.join("deep"), &dst.join("deep"));

        // Equal to the source proves little unless the source has it all.
        let node = |rel: &str| &after[Path::new(rel)].0;
        let suid = node("a/b/suid");
        assert_eq!((suid.mode, suid.uid, suid.gid), (0o104755, 0, 0));
        assert_eq!(suid.xattrs[&b"security.capability"[..]], capability());
        assert_eq!(suid.mtime, (1_600_000_001, 100_000_002));
        let a = node("a");
        assert_eq!((a.mode, a.uid, a.gid), (0o41777, 1000, 1001));
        assert_eq!(a.xattrs[&b"trusted.x"[..]], b"trusted");
        assert_eq!(a.mtime, (1_500_000_001, 900_000_001));
        let b = node("a/b");
        assert_eq!((b.mode, b.uid, b.gid), (0o40700, 1001, 1002));
        assert_eq!(node("sgid").mode, 0o42755);
        let root = node("");
        assert_eq!(
            (root.mode, root.uid, root.mtime.1),
            (0o40750, 1000, 900_000_003)
        );
        assert_eq!(node("a/user").xattrs[&b"user.test"[..]], b"hello");
        let abs = node("a/abs");
        assert_eq!(abs.target.as_deref(), Some(Path::new("/etc/passwd")));
        assert_eq!((abs.uid, abs.gid), (1234, 5678));
        assert_eq!(node("a/dirlink").target.as_deref(), Some(Path::new("b")));
        let null = node("null");
        assert_eq!(null.mode, FileType::CharacterDevice.as_raw_mode() | 0o640);
        assert_eq!(null.rdev, rustix::fs::makedev(1, 3));
        assert_eq!(node("fifo").mode, FileType::Fifo.as_raw_mode() | 0o620);
        assert_eq!(node("sock").mode, FileType::Socket.as_raw_mode() | 0o755);
        let sparse = node("sparse");
        assert_eq!(sparse.size, 64 * MIB);
        assert!(
            sparse.content[32 << 20..(32 << 20) + 4096]
                .iter()
                .all(|b| *b == 0xab)
        );
        assert!(fs::symlink_metadata(dst.join("sparse")).unwrap().blocks() * 512 <= MIB);
        assert_eq!(node("holey").size, MIB + 4096);

        for top in [&src, &dst] {
            fsutil::remove_path(&top.join("deep")).unwrap();
        }
    }

    #[test]
    fn copy_tree_refuses_to_merge_into_existing_names() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("x"), b"new").unwrap();
        fs::write(src.join("sub/y"), b"y").unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let file_taken = tmp.path().join("file-taken");
        fs::create_dir(&file_taken).unwrap();
        fs::write(file_taken.join("x"), b"old").unwrap();
        let dir_taken = tmp.path().join("dir-taken");
        fs::create_dir(&dir_taken).unwrap();
        symlink(&outside, dir_taken.join("sub")).unwrap();

        for (dst, conflict) in [(&file_taken, "x"), (&dir_taken, "sub")] {
            match copy_tree(&src, dst) {
                Err(Error::Io { path, source, .. }) => {
                    assert_eq!(path, src.join(conflict));
                    assert_eq!(source.raw_os_error(), Some(Errno::EXIST.raw_os_error()));
                }
                other => panic!("copy into {dst:?}: {other:?}"),
            }
        }
        assert_eq!(fs::read(file_taken.join("x")).unwrap(), b"old");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn copy_data_keeps_holes_when_the_kernel_cannot_copy() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let from = File::create_new(shm.path().join("from")).unwrap();
        from.set_len(8 * MIB).unwrap();
        from.write_all_at(&[7; 8192], 4 * MIB).unwrap();
        let from = File::open(shm.path().join("from")).unwrap();
        let to = File::create_new(tmp.path().join("to")).unwrap();
        // Between two file systems copy_file_range fails, so the read/write path is tested.
        let mut offset = 0;
        let direct = rustix::fs::copy_file_range(&from, Some(&mut offset), &to, None, 1);
        assert_eq!(
            direct,
            Err(Errno::XDEV),
            "/dev/shm must be tmpfs, TMPDIR not"
        );

        copy_data(&from, &to, 8 * MIB).unwrap();

        assert_eq!(to.metadata().unwrap().len(), 8 * MIB);
        assert!(to.metadata().unwrap().blocks() * 512 <= MIB);
        let mut data = vec![0; 8192 + 2];
        to.read_at(&mut data, 4 * MIB - 1).unwrap();
        assert_eq!(data[0], 0);
        assert!(data[1..=8192].iter().all(|b| *b == 7));
        assert_eq!(data[8193], 0);
    }
}
