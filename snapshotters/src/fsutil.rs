//! Directory-tree helpers: removal, disk usage, and naming a path's filesystem.
//!
//! The traversal holds one directory descriptor at a time and never recurses. A hostile layer
//! can build a tree of any depth (each entry nests one level deeper through a symlinked
//! parent), and recursion or one descriptor per level would then exhaust the stack or the
//! descriptor table; climbing back up through `..` costs neither.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;

use crate::Usage;

/// What the traversal reports to its visitor.
enum Visit<'a> {
    /// A directory entry (any type) and its `lstat`, before descending into it.
    Entry {
        dir: BorrowedFd<'a>,
        name: &'a CStr,
        stat: &'a Stat,
    },
    /// A directory whose whole subtree has been visited.
    Leave {
        parent: BorrowedFd<'a>,
        name: &'a CStr,
    },
}

/// Visits every entry below `top`, depth first, never following symlinks.
fn walk(top: OwnedFd, visit: &mut dyn FnMut(Visit<'_>) -> io::Result<()>) -> io::Result<()> {
    struct Frame {
        name: Option<CString>,
        subdirs: Vec<CString>,
    }
    let mut cur = top;
    let mut stack = vec![Frame {
        name: None,
        subdirs: scan(&cur, visit)?,
    }];
    while let Some(frame) = stack.last_mut() {
        if let Some(sub) = frame.subdirs.pop() {
            // Entries may vanish under a concurrent removal of the same tree; skip them.
            cur = match rustix::fs::openat(&cur, &sub, dir_flags(), Mode::empty()) {
                Ok(child) => child,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let subdirs = scan(&cur, visit)?;
            stack.push(Frame {
                name: Some(sub),
                subdirs,
            });
            continue;
        }
        let Some(frame) = stack.pop() else { break };
        let Some(name) = frame.name else { break };
        cur = rustix::fs::openat(&cur, c"..", dir_flags(), Mode::empty())?;
        visit(Visit::Leave {
            parent: cur.as_fd(),
            name: &name,
        })?;
    }
    Ok(())
}

/// Reports each entry of `dir` and returns the names of its subdirectories. Names are read
/// completely before the visitor runs, because the visitor may unlink them.
fn scan(
    dir: &OwnedFd,
    visit: &mut dyn FnMut(Visit<'_>) -> io::Result<()>,
) -> io::Result<Vec<CString>> {
    let names = read_names(dir)?;
    let mut subdirs = Vec::new();
    for name in names {
        let stat = match rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        visit(Visit::Entry {
            dir: dir.as_fd(),
            name: &name,
            stat: &stat,
        })?;
        if is_dir(&stat) {
            subdirs.push(name);
        }
    }
    Ok(subdirs)
}

/// The names in the directory `dir` (open for reading), `.` and `..` left out.
pub(crate) fn read_names(dir: &OwnedFd) -> rustix::io::Result<Vec<CString>> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// The names in the directory `dir` (open for reading) with the types the directory lists
/// (`Unknown` where the filesystem does not say), `.` and `..` left out.
pub(crate) fn read_entries(dir: &OwnedFd) -> rustix::io::Result<Vec<(CString, FileType)>> {
    let mut entries = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            entries.push((name.to_owned(), entry.file_type()));
        }
    }
    Ok(entries)
}

/// The access and modification times of `stat`, to give another file.
pub(crate) fn stat_times(stat: &Stat) -> Timestamps {
    // Nanoseconds are below 10⁹, whatever the type of their field.
    Timestamps {
        last_access: Timespec {
            tv_sec: stat.st_atime,
            tv_nsec: stat.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: stat.st_mtime,
            tv_nsec: stat.st_mtime_nsec as _,
        },
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

pub(crate) fn is_dir(stat: &Stat) -> bool {
    FileType::from_raw_mode(stat.st_mode) == FileType::Directory
}

/// Removes `name` inside `parent` whatever its type, a directory with all its content, and
/// never follows a symlink. Entries that vanish meanwhile (a concurrent removal of the same
/// tree) are not an error.
pub(crate) fn remove_at(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if !is_dir(&stat) {
        return Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?);
    }
    let top = rustix::fs::openat(parent, name, dir_flags(), Mode::empty())?;
    walk(top, &mut |visit| {
        let removed = match visit {
            Visit::Entry { dir, name, stat } if !is_dir(stat) => {
                rustix::fs::unlinkat(dir, name, AtFlags::empty())
            }
            Visit::Entry { .. } => Ok(()),
            Visit::Leave { parent, name } => rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR),
        };
        match removed {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    })?;
    Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
}

/// Calls `f` with every directory below `name` in `parent` (as its own parent's descriptor
/// and its name), deepest first, once everything below that directory has been visited.
pub(crate) fn for_each_dir_bottom_up(
    parent: BorrowedFd<'_>,
    name: &str,
    f: &mut dyn FnMut(BorrowedFd<'_>, &CStr) -> io::Result<()>,
) -> io::Result<()> {
    let top = rustix::fs::openat(parent, name, dir_flags(), Mode::empty())?;
    walk(top, &mut |visit| match visit {
        Visit::Leave { parent, name } => f(parent, name),
        Visit::Entry { .. } => Ok(()),
    })
}

/// Removes `path` and everything below it; a missing path is not an error.
pub(crate) fn remove_path(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from(Errno::INVAL));
    };
    let parent = rustix::fs::openat(
        CWD,
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    match remove_at(parent.as_fd(), name.as_encoded_bytes()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes the file at `path`; a missing file is not an error.
pub(crate) fn remove_file_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Measures `path` as `du` does: `st_blocks * 512` of every inode, hardlinked inodes once,
/// the top directory included.
pub fn disk_usage(path: &Path) -> io::Result<Usage> {
    let top = rustix::fs::open(path, dir_flags(), Mode::empty())?;
    let mut usage = Usage::default();
    add_usage(&mut usage, &rustix::fs::fstat(&top)?);
    let mut seen = HashSet::new();
    walk(top, &mut |visit| {
        if let Visit::Entry { stat, .. } = visit {
            let linked = stat.st_nlink > 1 && !is_dir(stat);
            if !linked || seen.insert((stat.st_dev, stat.st_ino)) {
                add_usage(&mut usage, stat);
            }
        }
        Ok(())
    })?;
    Ok(usage)
}

/// The name of the filesystem holding `path`, for messages: the common ones by name, others
/// by their magic number.
pub(crate) fn filesystem_name(path: &Path) -> String {
    const NAMES: [(u64, &str); 8] = [
        (0x9123_683e, "btrfs"),
        (0xef53, "ext2/3/4"),
        (0x5846_5342, "xfs"),
        (0x0102_1994, "tmpfs"),
        (0x794c_7630, "overlayfs"),
        (0x2fc1_2fc1, "zfs"),
        (0x6969, "nfs"),
        (0x6573_5546, "fuse"),
    ];
    match rustix::fs::statfs(path) {
        Ok(statfs) => {
            let magic = statfs.f_type as u64;
            match NAMES.iter().find(|(m, _)| *m == magic) {
                Some((_, name)) => (*name).to_owned(),
                None => format!("a filesystem with magic {magic:#x}"),
            }
        }
        Err(e) => format!("an unknown filesystem ({e})"),
    }
}

fn add_usage(usage: &mut Usage, stat: &Stat) {
    usage.size += u64::try_from(stat.st_blocks).unwrap_or(0) * 512;
    usage.inodes += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_file_already_gone_is_removed_without_error() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("list");
        fs::write(&path, b"x").unwrap();
        remove_file_if_present(&path).unwrap();
        remove_file_if_present(&path).unwrap();
        assert!(!path.exists());
        fs::create_dir(&path).unwrap();
        assert!(
            remove_file_if_present(&path).is_err(),
            "a directory is not a file"
        );
    }

    #[test]
    fn remove_path_deletes_deep_trees_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"x").unwrap();
        let top = tmp.path().join("top");
        let mut deep = top.clone();
        for _ in 0..300 {
            deep.push("d");
        }
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("f"), b"data").unwrap();
        symlink(&outside, top.join("link")).unwrap();

        remove_path(&top).unwrap();

        assert!(!top.exists());
        assert!(outside.join("keep").exists());
        remove_path(&top).unwrap();
    }

    #[test]
    fn disk_usage_counts_hardlinks_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fs");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("a"), vec![1u8; 64 * 1024]).unwrap();
        let single = disk_usage(&dir).unwrap();
        fs::hard_link(dir.join("a"), dir.join("b")).unwrap();
        let linked = disk_usage(&dir).unwrap();
        assert_eq!(single, linked);
        assert_eq!(linked.inodes, 2);
        assert!(linked.size >= 64 * 1024);

        fs::write(dir.join("c"), vec![1u8; 64 * 1024]).unwrap();
        let more = disk_usage(&dir).unwrap();
        assert_eq!(more.inodes, 3);
        assert!(more.size >= linked.size + 64 * 1024);
    }
}
