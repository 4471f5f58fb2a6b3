//! The btrfs snapshotter's layout: every snapshot's `fs` is a subvolume.
//!
//! A snapshot without a parent is a new subvolume; a child is a snapshot of its parent's
//! subvolume, so it starts with the parent's tree at no copying cost and changes are
//! copy-on-write; a View is a read-only snapshot. A commit sets the read-only flag, so a
//! committed snapshot cannot change under its children. Layers delete what their whiteouts
//! hide.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::apply::Whiteouts;
use crate::btrfs_ioctl as ioctl;
use crate::metastore::{Record, Snapshot};
use crate::snapshots::{Layout, bind};
use crate::{Error, Kind, Mount, Usage, fsutil};

const FS: &str = "fs";

pub(crate) struct BtrfsLayout;

impl BtrfsLayout {
    /// Refuses a root that is not on btrfs, naming the filesystem it is on.
    pub(crate) fn new(root: &Path) -> Result<Self, Error> {
        if ioctl::is_btrfs(root).map_err(Error::io("inspect filesystem of", root))? {
            return Ok(BtrfsLayout);
        }
        Err(Error::InvalidArgument {
            key: root.display().to_string(),
            reason: format!(
                "the btrfs snapshotter needs its root on btrfs, this one is on {}",
                fsutil::filesystem_name(root)
            ),
        })
    }
}

impl Layout for BtrfsLayout {
    fn populate(
        &self,
        temp: &Path,
        kind: Kind,
        parent: Option<&Path>,
        _: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        // btrfs ioctls need descriptors that are open for reading, not O_PATH ones.
        let dir = open(temp, OFlags::RDONLY)?;
        let fs = temp.join(FS);
        let made = match parent {
            Some(parent) => {
                let source = open(parent, OFlags::RDONLY)?;
                ioctl::snapshot(
                    source.as_fd(),
                    dir.as_fd(),
                    OsStr::new(FS),
                    kind == Kind::View,
                )
            }
            None => ioctl::create_subvolume(dir.as_fd(), OsStr::new(FS)).and_then(|()| {
                rustix::fs::chmodat(&dir, FS, Mode::from_raw_mode(0o755), AtFlags::empty())?;
                if kind == Kind::View {
                    ioctl::set_readonly(open_io(&fs, OFlags::RDONLY)?.as_fd(), true)?;
                }
                Ok(())
            }),
        };
        made.map_err(Error::io("create subvolume", &fs))
    }

    fn mounts(&self, snapshots: &Path, snapshot: &Snapshot) -> Vec<Mount> {
        let fs = snapshots.join(snapshot.id.to_string()).join(FS);
        vec![bind(&fs, snapshot.kind == Kind::Active)]
    }

    fn whiteouts(&self, _: &Record) -> Whiteouts {
        Whiteouts::Delete
    }

    fn rebase(&self) -> bool {
        false
    }

    fn committed(&self, snapshots: &Path, _: &Record, snapshot: &Snapshot) -> Result<(), Error> {
        let fs = snapshots.join(snapshot.id.to_string()).join(FS);
        let subvolume = open(&fs, OFlags::RDONLY)?;
        ioctl::set_readonly(subvolume.as_fd(), true).map_err(Error::io("make read-only", &fs))
    }

    /// With quotas on, an Active snapshot's size is its subvolume's exclusive bytes: what a
    /// container wrote, not the image it shares with its parent. The counters change when a
    /// transaction commits, so they may lag by one commit interval, which saves a sync per
    /// stats request. A committed snapshot keeps the walk: its exclusive bytes shrink as its
    /// children come to share them. Inodes are always counted by the walk.
    fn usage(&self, fs: &Path, kind: Kind) -> io::Result<Usage> {
        let mut usage = fsutil::disk_usage(fs)?;
        if kind == Kind::Active
            && let Some(exclusive) = ioctl::exclusive_bytes(open_io(fs, OFlags::RDONLY)?.as_fd())?
        {
            usage.size = exclusive;
        }
        Ok(usage)
    }

    /// A subvolume cannot be unlinked like a directory: it is destroyed first.
    fn remove(&self, dir: &Path) -> io::Result<()> {
        match open_io(dir, OFlags::RDONLY) {
            Ok(parent) => destroy_fs(&parent)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        fsutil::remove_path(dir)
    }
}

fn destroy_fs(parent: &OwnedFd) -> io::Result<()> {
    match rustix::fs::statat(parent, FS, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) if fsutil::is_dir(&stat) && ioctl::is_subvolume(&stat) => {}
        Ok(_) | Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    match ioctl::destroy_subvolume(parent.as_fd(), OsStr::new(FS)) {
        Err(e) if e.raw_os_error() == Some(Errno::NOTEMPTY.raw_os_error()) => {
            destroy_nested(parent)?;
            ioctl::destroy_subvolume(parent.as_fd(), OsStr::new(FS))
        }
        destroyed => destroyed,
    }
}

/// Destroys the subvolumes inside `parent`'s `fs`, deepest first: any process in a
/// container can create one in its rootfs (systemd does, for `/var/lib/machines`), and a
/// subvolume that holds another cannot be destroyed.
fn destroy_nested(parent: &OwnedFd) -> io::Result<()> {
    fsutil::for_each_dir_bottom_up(
        parent.as_fd(),
        FS,
        &mut |parent, name| match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) if ioctl::is_subvolume(&stat) => {
                ioctl::destroy_subvolume(parent, OsStr::from_bytes(name.to_bytes()))
            }
            Ok(_) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        },
    )
}

fn open(path: &Path, flags: OFlags) -> Result<OwnedFd, Error> {
    open_io(path, flags).map_err(Error::io("open", path))
}

fn open_io(path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}
