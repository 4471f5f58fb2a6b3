//! Mount descriptions (what snapshotters return and runtimes mount as a container's rootfs),
//! and the code that performs them.
//!
//! mount(2) takes at most one page of option data. A long overlay `lowerdir=` list (one entry
//! per layer) is rewritten relative to the lower directories' common parent, and the mount is
//! then made from a freshly spawned thread that has unshared its filesystem context and
//! changed into that parent, so the process working directory never changes.

use std::ffi::CString;
use std::io;
use std::path::{Component, Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};
use rustix::thread::UnshareFlags;
use serde::{Deserialize, Serialize};

/// Why a mount or unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A system call failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What was being done, e.g. "bind mount".
        op: &'static str,
        /// The mount target.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// The options do not fit in the page mount(2) takes, even with lowerdirs compacted.
    #[error("mount on {path:?}: options of {len} bytes do not fit in one page")]
    TooLong {
        /// The mount target.
        path: PathBuf,
        /// Length of the option string.
        len: usize,
    },
}

impl MountError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MountError {
        let path = path.to_owned();
        move |source| MountError::Io { op, path, source }
    }
}

/// One mount: what the `mount` command would be given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Filesystem type: `overlay` or `bind` (any other type is passed to mount(2) as is).
    pub kind: String,
    /// Source: a directory for `bind`, the word `overlay` for overlay.
    pub source: String,
    /// Options as `mount -o` takes them: flags (`ro`, `rbind`, `nosuid`…) and data
    /// (`lowerdir=…`, `index=off`…). Paths in them are absolute.
    pub options: Vec<String>,
}

/// Room mount(2) leaves below one page before options must be compacted; containerd keeps
/// the same margin.
const PAGE_MARGIN: usize = 512;

impl Mount {
    /// Mounts `mounts` (at most one element in practice) on `target`, in order. If one fails,
    /// the ones already mounted are unmounted again.
    ///
    /// Overlay options longer than `pagesize - 512` bytes have their lowerdirs rewritten
    /// relative to their common parent directory; the mount is then made from a new thread
    /// that did `unshare(CLONE_FS)` and `chdir` there. This supports hundreds of layers.
    pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
        let target =
            std::path::absolute(target).map_err(MountError::io("resolve mount target", target))?;
        for (done, mount) in mounts.iter().enumerate() {
            if let Err(e) = mount.mount(&target) {
                for _ in 0..done {
                    if let Err(undo) = unmount(&target) {
                        tracing::warn!(error = %undo, "undoing a partial mount");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn mount(&self, target: &Path) -> Result<(), MountError> {
        let options = Options::parse(&self.options);
        if self.kind == "bind" || options.flags.contains(MountFlags::BIND) {
            return self.bind(target, options.flags);
        }
        let data = options.data.join(",");
        let limit = rustix::param::page_size() - PAGE_MARGIN;
        if data.len() < limit {
            return mount_here(&self.source, target, &self.kind, options.flags, &data)
                .map_err(MountError::io("mount", target));
        }
        let Some((dir, compacted)) = compact_lowerdirs(&options.data) else {
            return Err(too_long(target, data.len()));
        };
        let data = compacted.join(",");
        if data.len() >= rustix::param::page_size() {
            return Err(too_long(target, data.len()));
        }
        mount_from(dir, &self.source, target, &self.kind, options.flags, &data)
            .map_err(MountError::io("mount", target))
    }

    fn bind(&self, target: &Path, flags: MountFlags) -> Result<(), MountError> {
        let source = Path::new(&self.source);
        let first = (flags | MountFlags::BIND) - MountFlags::RDONLY;
        rustix::mount::mount(source, target, "none", first, None).map_err(|e| MountError::Io {
            op: "bind mount",
            path: target.to_owned(),
            source: e.into(),
        })?;
        if !flags.contains(MountFlags::RDONLY) {
            return Ok(());
        }
        // A bind mount ignores MS_RDONLY on creation; only a remount makes it read-only.
        let remount = (flags | MountFlags::BIND) - MountFlags::REC;
        if let Err(e) = rustix::mount::mount_remount(target, remount, "") {
            let _ = unmount(target);
            return Err(MountError::Io {
                op: "remount read-only",
                path: target.to_owned(),
                source: e.into(),
            });
        }
        Ok(())
    }
}

/// Unmounts `target`; if it is busy, detaches it so it goes away once no longer used.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    let result = match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
        Err(Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH)
        }
        other => other,
    };
    result.map_err(|e| MountError::Io {
        op: "unmount",
        path: target.to_owned(),
        source: e.into(),
    })
}

/// Mount options split into mount(2) flags and the filesystem's data string.
#[derive(Debug, PartialEq, Eq)]
struct Options {
    flags: MountFlags,
    data: Vec<String>,
}

impl Options {
    fn parse(options: &[String]) -> Options {
        let mut flags = MountFlags::empty();
        let mut data = Vec::new();
        for option in options {
            match option.as_str() {
                "defaults" => {}
                "ro" => flags |= MountFlags::RDONLY,
                "rw" => flags -= MountFlags::RDONLY,
                "bind" => flags |= MountFlags::BIND,
                "rbind" => flags |= MountFlags::BIND | MountFlags::REC,
                "nosuid" => flags |= MountFlags::NOSUID,
                "suid" => flags -= MountFlags::NOSUID,
                "nodev" => flags |= MountFlags::NODEV,
                "dev" => flags -= MountFlags::NODEV,
                "noexec" => flags |= MountFlags::NOEXEC,
                "exec" => flags -= MountFlags::NOEXEC,
                "noatime" => flags |= MountFlags::NOATIME,
                "nodiratime" => flags |= MountFlags::NODIRATIME,
                "relatime" => flags |= MountFlags::RELATIME,
                "strictatime" => flags |= MountFlags::STRICTATIME,
                "sync" => flags |= MountFlags::SYNCHRONOUS,
                "dirsync" => flags |= MountFlags::DIRSYNC,
                _ => data.push(option.clone()),
            }
        }
        Options { flags, data }
    }
}

fn too_long(target: &Path, len: usize) -> MountError {
    MountError::TooLong {
        path: target.to_owned(),
        len,
    }
}

/// Rewrites the `lowerdir=` option relative to the lowerdirs' common parent directory.
/// Returns that directory and the new options, or `None` if there is nothing to rewrite.
fn compact_lowerdirs(data: &[String]) -> Option<(PathBuf, Vec<String>)> {
    let index = data.iter().position(|o| o.starts_with("lowerdir="))?;
    let dirs: Vec<&Path> = data[index]["lowerdir=".len()..]
        .split(':')
        .map(Path::new)
        .collect();
    let common = common_parent(&dirs)?;
    let mut relative = Vec::with_capacity(dirs.len());
    for dir in &dirs {
        relative.push(dir.strip_prefix(&common).ok()?.to_str()?);
    }
    let mut compacted = data.to_vec();
    compacted[index] = format!("lowerdir={}", relative.join(":"));
    Some((common, compacted))
}

/// The deepest directory that is a strict ancestor of every one of `dirs` (all absolute).
fn common_parent(dirs: &[&Path]) -> Option<PathBuf> {
    let first = dirs.first()?;
    if !dirs.iter().all(|d| d.is_absolute()) {
        return None;
    }
    let mut common: Vec<Component<'_>> = first.components().collect();
    for dir in &dirs[1..] {
        let shared = common
            .iter()
            .zip(dir.components())
            .take_while(|(a, b)| *a == b)
            .count();
        common.truncate(shared);
    }
    // Every relative path must stay non-empty, so a prefix equal to one of the dirs backs up.
    let shortest = dirs.iter().map(|d| d.components().count()).min()?;
    if common.len() >= shortest {
        common.truncate(shortest - 1);
    }
    if common.is_empty() {
        return None;
    }
    Some(common.iter().collect())
}

fn mount_here(
    source: &str,
    target: &Path,
    kind: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let data = CString::new(data).map_err(|_| io::Error::from(Errno::INVAL))?;
    Ok(rustix::mount::mount(
        source,
        target,
        kind,
        flags,
        Some(data.as_c_str()),
    )?)
}

/// Mounts from a new thread whose working directory is `dir`, leaving the process's alone.
/// A thread whose filesystem context was unshared must never run other work, so it is a
/// fresh `std::thread` that ends with this mount, never a pooled one.
fn mount_from(
    dir: PathBuf,
    source: &str,
    target: &Path,
    kind: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let (source, target, kind, data) = (
        source.to_owned(),
        target.to_owned(),
        kind.to_owned(),
        data.to_owned(),
    );
    let thread =
        std::thread::Builder::new()
            .name("mount".to_owned())
            .spawn(move || -> io::Result<()> {
                // SAFETY: CLONE_FS only gives this thread its own cwd, root and umask. The file
                // descriptor table stays shared, so no descriptor becomes invalid elsewhere.
                unsafe { rustix::thread::unshare_unsafe(UnshareFlags::FS) }?;
                rustix::process::chdir(&dir)?;
                mount_here(&source, &target, &kind, flags, &data)
            })?;
    thread
        .join()
        .map_err(|_| io::Error::other("mount thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let parsed = Options::parse(&strings(&[
            "ro",
            "rbind",
            "nosuid",
            "index=off",
            "lowerdir=/a:/b",
        ]));
        assert_eq!(
            parsed.flags,
            MountFlags::RDONLY | MountFlags::BIND | MountFlags::REC | MountFlags::NOSUID
        );
        assert_eq!(parsed.data, strings(&["index=off", "lowerdir=/a:/b"]));

        let parsed = Options::parse(&strings(&["ro", "rw", "rbind"]));
        assert_eq!(parsed.flags, MountFlags::BIND | MountFlags::REC);
    }

    #[test]
    fn lowerdirs_become_relative_to_their_common_parent() {
        let data = strings(&[
            "workdir=/var/lib/s/snapshots/13/work",
            "upperdir=/var/lib/s/snapshots/13/fs",
            "lowerdir=/var/lib/s/snapshots/12/fs:/var/lib/s/snapshots/11/fs:/var/lib/s/snapshots/1/fs",
            "index=off",
        ]);
        let (dir, compacted) = compact_lowerdirs(&data).unwrap();
        assert_eq!(dir, Path::new("/var/lib/s/snapshots"));
        assert_eq!(
            compacted,
            strings(&[
                "workdir=/var/lib/s/snapshots/13/work",
                "upperdir=/var/lib/s/snapshots/13/fs",
                "lowerdir=12/fs:11/fs:1/fs",
                "index=off",
            ])
        );
    }

    #[test]
    fn a_single_lowerdir_keeps_a_non_empty_relative_path() {
        let data = strings(&["lowerdir=/r/snapshots/7/fs"]);
        let (dir, compacted) = compact_lowerdirs(&data).unwrap();
        assert_eq!(dir, Path::new("/r/snapshots/7"));
        assert_eq!(compacted, strings(&["lowerdir=fs"]));
    }

    #[test]
    fn nested_lowerdirs_back_up_to_a_strict_ancestor() {
        let dirs = [Path::new("/r/a"), Path::new("/r/a/b")];
        assert_eq!(common_parent(&dirs).unwrap(), Path::new("/r"));
    }

    #[test]
    fn relative_or_missing_lowerdirs_are_not_compacted() {
        assert!(compact_lowerdirs(&strings(&["index=off"])).is_none());
        assert!(compact_lowerdirs(&strings(&["lowerdir=a/fs:b/fs"])).is_none());
    }

    #[test]
    fn two_hundred_layers_fit_in_a_page_once_compacted() {
        let root = "/var/lib/imaged/snapshots/overlayfs/snapshots";
        let lowers: Vec<String> = (1..=200)
            .rev()
            .map(|id| format!("{root}/{id}/fs"))
            .collect();
        let data = vec![
            format!("workdir={root}/201/work"),
            format!("upperdir={root}/201/fs"),
            format!("lowerdir={}", lowers.join(":")),
            "index=off".to_owned(),
        ];
        let page = rustix::param::page_size();
        assert!(data.join(",").len() >= page - PAGE_MARGIN);
        let (dir, compacted) = compact_lowerdirs(&data).unwrap();
        assert_eq!(dir, Path::new(root));
        assert!(compacted.join(",").len() < page);
        assert!(compacted[2].starts_with("lowerdir=200/fs:199/fs:"));
        assert!(compacted[2].ends_with(":2/fs:1/fs"));
    }
}
