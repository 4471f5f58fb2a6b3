//! Parent directories a layer did not name itself.
//!
//! Layers are applied without their parents mounted (so that they can be applied in
//! parallel), so a directory a layer only implies, such as `etc` for an entry `etc/hosts`,
//! is created 0755 root:root. The kernel would have copied it up from the lower layers with
//! their owner, mode, times and xattrs; once the snapshot's parents are known (at commit),
//! [`copy_up`] does the same for the directories [`record`] listed.

use crate::Error;
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Name of the list, next to the snapshot's `fs` directory.
pub(crate) const FILE: &str = "implicit-dirs";

/// Writes to `list` every directory under `fs` that is not in `named` (NUL-separated).
pub(crate) fn record(fs: &Path, list: &Path, named: &[Vec<u8>]) -> Result<(), Error> {
    let named: HashSet<&[u8]> = named.iter().map(Vec::as_slice).collect();
    let mut implied = Vec::new();
    let mut pending = vec![Vec::new()];
    while let Some(rel) = pending.pop() {
        let dir = fs.join(OsStr::from_bytes(&rel));
        let entries = fs::read_dir(&dir).map_err(Error::io("list", &dir))?;
        for entry in entries {
            let entry = entry.map_err(Error::io("list", &dir))?;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(entry.file_name().as_bytes());
            if !named.contains(child.as_slice()) {
                implied.extend_from_slice(&child);
                implied.push(0);
            }
            pending.push(child);
        }
    }
    if implied.is_empty() {
        return Ok(());
    }
    fs::write(list, implied).map_err(Error::io("write", list))
}

/// Gives each listed directory of `fs` the attributes of the same directory in the nearest
/// lower layer that has it, then deletes the list.
pub(crate) fn copy_up(fs: &Path, list: &Path, lowers: &[PathBuf]) -> Result<(), Error> {
    copy_up_where(fs, list, lowers, |_| true)
}

/// [`copy_up`] for the listed directories `wanted` accepts (by path relative to `fs`); the
/// others keep the attributes they were created with.
pub(crate) fn copy_up_where(
    fs: &Path,
    list: &Path,
    lowers: &[PathBuf],
    wanted: impl Fn(&[u8]) -> bool,
) -> Result<(), Error> {
    let text = match fs::read(list) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read", list)(e)),
    };
    if !lowers.is_empty() {
        for rel in text
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty() && wanted(p))
        {
            if let Some(source) = lowers.iter().find_map(|lower| real_dir(lower, rel)) {
                copy_attributes(&source, &fs.join(OsStr::from_bytes(rel)))?;
            }
        }
    }
    fs::remove_file(list).map_err(Error::io("remove", list))
}

/// `lower/rel` if every component is a real directory (overlay never follows a lower
/// layer's symlinks to find a directory).
fn real_dir(lower: &Path, rel: &[u8]) -> Option<PathBuf> {
    let mut dir = rustix::fs::open(
        lower,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    for name in rel.split(|b| *b == b'/') {
        dir = rustix::fs::openat(
            &dir,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
    }
    Some(lower.join(OsStr::from_bytes(rel)))
}

fn copy_attributes(from: &Path, to: &Path) -> Result<(), Error> {
    let meta = fs::symlink_metadata(from).map_err(Error::io("stat", from))?;
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(Error::io("change owner of", to))?;
    copy_xattrs(from, to)?;
    rustix::fs::chmod(to, Mode::from_raw_mode(meta.mode() & 0o7777))
        .map_err(|e| Error::io("change mode of", to)(e.into()))?;
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec() as _,
        },
        last_modification: Timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec() as _,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, to, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| Error::io("set times of", to)(e.into()))
}

/// Copies every xattr except `trusted.*` (overlay's own markers stay per layer).
fn copy_xattrs(from: &Path, to: &Path) -> Result<(), Error> {
    let mut names = vec![0u8; 64 * 1024];
    let len = match rustix::fs::llistxattr(from, &mut names) {
        Ok(len) => len,
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(Error::io("list xattrs of", from)(e.into())),
    };
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"trusted.") {
            continue;
        }
        let name = std::ffi::OsString::from_vec(name.to_vec());
        let mut value = vec![0u8; 64 * 1024];
        let n = rustix::fs::lgetxattr(from, &name, &mut value)
            .map_err(|e| Error::io("read xattr of", from)(e.into()))?;
        rustix::fs::lsetxattr(to, &name, &value[..n], rustix::fs::XattrFlags::empty())
            .map_err(|e| Error::io("set xattr on", to)(e.into()))?;
    }
    Ok(())
}
