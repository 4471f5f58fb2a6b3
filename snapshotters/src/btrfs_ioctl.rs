//! btrfs subvolume operations, done with the kernel's ioctls.
//!
//! The btrfs snapshotter keeps one subvolume per snapshot. A snapshot without a parent is a
//! fresh subvolume (`BTRFS_IOC_SUBVOL_CREATE`); a child is a writable snapshot of its parent's
//! subvolume (`BTRFS_IOC_SNAP_CREATE_V2`); commit sets the subvolume's read-only flag
//! (`BTRFS_IOC_SUBVOL_SETFLAGS`, read back with `BTRFS_IOC_SUBVOL_GETFLAGS`) so committed
//! snapshots are immutable; removal is `BTRFS_IOC_SNAP_DESTROY`. Where quotas are enabled, a
//! subvolume's exclusive bytes come from its level-0 qgroup in the quota tree
//! (`BTRFS_IOC_TREE_SEARCH`, after `BTRFS_IOC_INO_LOOKUP` gives the subvolume id): a walk
//! would count the data a snapshot shares with its parent as its own. The tests also read
//! flags back to check what the kernel did.
//!
//! These are ioctls rather than the `btrfs` command because the pull path makes a snapshot
//! per layer: a process per snapshot is slow, and its failures come back as stderr text
//! instead of an errno.
//!
//! Operations that name a subvolume take its parent directory's descriptor and a single path
//! component, as the kernel does, so no path is resolved twice. Errors carry only the errno;
//! callers add the paths.

use std::ffi::OsStr;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::Stat;
use rustix::io::Errno;
use rustix::ioctl::{Getter, Opcode, Setter, Updater, ioctl, opcode};

/// `BTRFS_QUOTA_TREE_OBJECTID`.
const QUOTA_TREE: u64 = 8;
/// `BTRFS_QGROUP_STATUS_KEY`: the quota tree's one status item, at (0, 240, 0).
const QGROUP_STATUS_KEY: u32 = 240;
/// `BTRFS_QGROUP_INFO_KEY`: a qgroup's counters, at (0, 242, qgroup id); a level-0 qgroup's
/// id is its subvolume's.
const QGROUP_INFO_KEY: u32 = 242;
/// `BTRFS_QGROUP_STATUS_FLAG_ON`, `_RESCAN` and `_INCONSISTENT`.
const QGROUP_ON: u64 = 1 << 0;
const QGROUP_RESCAN: u64 = 1 << 1;
const QGROUP_INCONSISTENT: u64 = 1 << 2;

/// `BTRFS_IOCTL_MAGIC`.
const MAGIC: u8 = 0x94;
/// `BTRFS_SUPER_MAGIC`, the `statfs` filesystem type.
const SUPER_MAGIC: u32 = 0x9123_683E;
/// `BTRFS_SUBVOL_RDONLY`, both a snapshot-creation flag and a subvolume flag.
const SUBVOL_RDONLY: u64 = 1 << 1;
/// `BTRFS_FIRST_FREE_OBJECTID`: the inode number of every subvolume's root directory.
const FIRST_FREE_OBJECTID: u64 = 256;

/// `BTRFS_PATH_NAME_MAX + 1`.
const VOL_NAME_LEN: usize = 4088;
/// `BTRFS_SUBVOL_NAME_MAX + 1`.
const SUBVOL_NAME_LEN: usize = 4040;
/// `BTRFS_INO_LOOKUP_PATH_MAX`.
const INO_LOOKUP_PATH_LEN: usize = 4080;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; VOL_NAME_LEN],
}

/// `struct btrfs_ioctl_vol_args_v2`. The first union (qgroup inheritance) is left zeroed, and
/// of the second only `name` is used.
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; SUBVOL_NAME_LEN],
}

/// `struct btrfs_ioctl_ino_lookup_args`.
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; INO_LOOKUP_PATH_LEN],
}

/// `struct btrfs_ioctl_search_key`: the range of keys to return from one tree.
#[repr(C)]
#[derive(Default)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused_more: [u64; 4],
}

/// `struct btrfs_ioctl_search_args`: the key range, then the items found, each after a
/// `struct btrfs_ioctl_search_header` of [`SEARCH_HEADER`] bytes.
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; 4096 - size_of::<SearchKey>()],
}

/// The size of `struct btrfs_ioctl_search_header`: transid, objectid and offset (`__u64`),
/// then type and len (`__u32`), in host byte order.
const SEARCH_HEADER: usize = 32;

// The sizes are encoded in the opcodes, so a wrong layout would be a different (unknown)
// ioctl; the values are those of <linux/btrfs.h>.
const _: () = assert!(size_of::<VolArgs>() == 4096 && offset_of!(VolArgs, name) == 8);
const _: () = assert!(size_of::<VolArgsV2>() == 4096 && offset_of!(VolArgsV2, flags) == 16);
const _: () = assert!(offset_of!(VolArgsV2, name) == 56);
const _: () = assert!(size_of::<InoLookupArgs>() == 4096);
const _: () = assert!(offset_of!(InoLookupArgs, name) == 16);
const _: () = assert!(size_of::<SearchKey>() == 104 && size_of::<SearchArgs>() == 4096);
const _: () = assert!(offset_of!(SearchKey, min_type) == 56);

const SUBVOL_CREATE: Opcode = opcode::write::<VolArgs>(MAGIC, 14);
const SNAP_DESTROY: Opcode = opcode::write::<VolArgs>(MAGIC, 15);
const TREE_SEARCH: Opcode = opcode::read_write::<SearchArgs>(MAGIC, 17);
const INO_LOOKUP: Opcode = opcode::read_write::<InoLookupArgs>(MAGIC, 18);
const SNAP_CREATE_V2: Opcode = opcode::write::<VolArgsV2>(MAGIC, 23);
const SUBVOL_GETFLAGS: Opcode = opcode::read::<u64>(MAGIC, 25);
const SUBVOL_SETFLAGS: Opcode = opcode::write::<u64>(MAGIC, 26);

impl VolArgs {
    fn new(name: &OsStr) -> io::Result<Self> {
        let mut args = Self {
            fd: 0,
            name: [0; VOL_NAME_LEN],
        };
        fill_name(&mut args.name, name)?;
        Ok(args)
    }
}

/// Copies `name` into a NUL-terminated ioctl name field.
///
/// The kernel looks the name up as one component of the directory the ioctl is issued on:
/// it would stop at a NUL, and an empty name, `.` or `..` would address that directory or its
/// parent. It also overwrites the field's last byte with NUL, silently truncating a name
/// that fills the field.
fn fill_name(field: &mut [u8], name: &OsStr) -> io::Result<()> {
    let bytes = name.as_bytes();
    if matches!(bytes, b"" | b"." | b"..") || bytes.iter().any(|&b| b == b'/' || b == 0) {
        return Err(Errno::INVAL.into());
    }
    if bytes.len() >= field.len() {
        return Err(Errno::NAMETOOLONG.into());
    }
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(())
}

/// Whether `path` is on a btrfs filesystem.
pub(crate) fn is_btrfs(path: &Path) -> io::Result<bool> {
    let fs = rustix::fs::statfs(path)?;
    // `f_type` is a signed word on most targets; the magic is its low 32 bits everywhere.
    Ok(fs.f_type as u32 == SUPER_MAGIC)
}

/// Creates an empty subvolume `name` in the directory `parent`.
pub(crate) fn create_subvolume(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let args = VolArgs::new(name)?;
    // SAFETY: SUBVOL_CREATE takes a `btrfs_ioctl_vol_args`, which `VolArgs` mirrors (layout
    // asserted above), and only reads it.
    unsafe { ioctl(parent, Setter::<SUBVOL_CREATE, VolArgs>::new(args)) }?;
    Ok(())
}

/// Snapshots the subvolume `source` as `name` in the directory `parent`, read-only if asked.
///
/// `source` may be any descriptor inside the source subvolume (normally its root, opened
/// `O_RDONLY | O_DIRECTORY`); the whole subvolume is snapshotted. Subvolumes nested in it
/// are not: they show up in the snapshot as empty directories.
pub(crate) fn snapshot(
    source: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    name: &OsStr,
    readonly: bool,
) -> io::Result<()> {
    let mut args = VolArgsV2 {
        fd: source.as_raw_fd().into(),
        transid: 0,
        flags: if readonly { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; SUBVOL_NAME_LEN],
    };
    fill_name(&mut args.name, name)?;
    // SAFETY: SNAP_CREATE_V2 takes a `btrfs_ioctl_vol_args_v2`, which `VolArgsV2` mirrors
    // (layout asserted above), and only reads it; `args.fd` stays open for the call because
    // `source` is borrowed across it.
    unsafe { ioctl(parent, Setter::<SNAP_CREATE_V2, VolArgsV2>::new(args)) }?;
    Ok(())
}

/// Destroys the subvolume `name` in the directory `parent`.
///
/// Read-only subvolumes need no flag change first: with `CAP_SYS_ADMIN` the kernel skips the
/// permission check that would see the read-only root (without it, destroying needs the
/// `user_subvol_rm_allowed` mount option anyway). The kernel refuses a subvolume that still
/// holds nested subvolumes, and a plain directory, but not one in use: open descriptors keep
/// reading it, and mounts inside it are silently detached, so unmount first. The entry is
/// gone on return; the space is reclaimed in the background.
pub(crate) fn destroy_subvolume(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let args = VolArgs::new(name)?;
    // SAFETY: SNAP_DESTROY takes a `btrfs_ioctl_vol_args`, which `VolArgs` mirrors (layout
    // asserted above), and only reads it.
    unsafe { ioctl(parent, Setter::<SNAP_DESTROY, VolArgs>::new(args)) }?;
    Ok(())
}

/// Sets or clears the read-only flag of the subvolume whose root is `subvolume`.
///
/// Only later opens and changes are refused: a descriptor already open for writing keeps
/// writing (seen on Linux 6.18), so commit only once the writers have closed.
pub(crate) fn set_readonly(subvolume: BorrowedFd<'_>, readonly: bool) -> io::Result<()> {
    let flags = flags(subvolume)?;
    let flags = if readonly {
        flags | SUBVOL_RDONLY
    } else {
        flags & !SUBVOL_RDONLY
    };
    // SAFETY: SUBVOL_SETFLAGS takes a pointer to a `__u64`, which it only reads.
    unsafe { ioctl(subvolume, Setter::<SUBVOL_SETFLAGS, u64>::new(flags)) }?;
    Ok(())
}

/// Whether the subvolume containing `subvolume` is read-only.
#[cfg(test)]
pub(crate) fn is_readonly(subvolume: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(flags(subvolume)? & SUBVOL_RDONLY != 0)
}

fn flags(subvolume: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: SUBVOL_GETFLAGS writes a `__u64` through its pointer, which `Getter<_, u64>`
    // provides.
    Ok(unsafe { ioctl(subvolume, Getter::<SUBVOL_GETFLAGS, u64>::new()) }?)
}

/// Whether `stat` describes a subvolume's root directory. Only meaningful for a file known to
/// be on btrfs: elsewhere inode 256 is an ordinary inode number.
pub(crate) fn is_subvolume(stat: &Stat) -> bool {
    stat.st_ino == FIRST_FREE_OBJECTID
}

/// The id of the subvolume containing `subvolume` (5 for the top-level subvolume).
pub(crate) fn subvolume_id(subvolume: BorrowedFd<'_>) -> io::Result<u64> {
    // Tree 0 means the fd's own subvolume, and looking up its root directory returns before
    // the path search, which is the part that needs CAP_SYS_ADMIN.
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: FIRST_FREE_OBJECTID,
        name: [0; INO_LOOKUP_PATH_LEN],
    };
    // SAFETY: INO_LOOKUP reads and writes a `btrfs_ioctl_ino_lookup_args`, which
    // `InoLookupArgs` mirrors (layout asserted above), through the exclusive borrow.
    unsafe {
        ioctl(
            subvolume,
            Updater::<INO_LOOKUP, InoLookupArgs>::new(&mut args),
        )
    }?;
    Ok(args.treeid)
}

/// The bytes only the subvolume containing `subvolume` holds, from its qgroup; `None` when
/// quotas are off, or their numbers are being rescanned or known to be inconsistent. The
/// counters change when a transaction commits.
pub(crate) fn exclusive_bytes(subvolume: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let status = match search_item(subvolume, QGROUP_STATUS_KEY, 0) {
        Ok(Some(status)) => status,
        // No quota tree at all: quotas were never enabled.
        Ok(None) | Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    // `struct btrfs_qgroup_status_item`: version, generation, flags, ...
    let flags = le_u64(&status, 16).ok_or(Errno::IO)?;
    if flags & QGROUP_ON == 0 || flags & (QGROUP_RESCAN | QGROUP_INCONSISTENT) != 0 {
        return Ok(None);
    }
    let id = subvolume_id(subvolume)?;
    // `struct btrfs_qgroup_info_item`: generation, rfer, rfer_cmpr, excl, excl_cmpr.
    match search_item(subvolume, QGROUP_INFO_KEY, id)? {
        Some(info) => Ok(Some(le_u64(&info, 24).ok_or(Errno::IO)?)),
        None => Ok(None),
    }
}

/// The data of the quota tree's item (0, `kind`, `offset`), if there is one.
fn search_item(fd: BorrowedFd<'_>, kind: u32, offset: u64) -> rustix::io::Result<Option<Vec<u8>>> {
    let mut args = SearchArgs {
        key: SearchKey {
            tree_id: QUOTA_TREE,
            min_offset: offset,
            max_offset: offset,
            max_transid: u64::MAX,
            min_type: kind,
            max_type: kind,
            nr_items: 1,
            ..SearchKey::default()
        },
        buf: [0; 4096 - size_of::<SearchKey>()],
    };
    // SAFETY: TREE_SEARCH reads and writes a `btrfs_ioctl_search_args`, which `SearchArgs`
    // mirrors (layout asserted above), through the exclusive borrow.
    unsafe { ioctl(fd, Updater::<TREE_SEARCH, SearchArgs>::new(&mut args)) }?;
    if args.key.nr_items == 0 {
        return Ok(None);
    }
    let buf = &args.buf;
    let word = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().expect("four bytes"));
    let long = |at: usize| u64::from_ne_bytes(buf[at..at + 8].try_into().expect("eight bytes"));
    let len = word(28) as usize;
    if (long(8), long(16), word(24)) != (0, offset, kind) || SEARCH_HEADER + len > buf.len() {
        return Err(Errno::IO);
    }
    Ok(Some(buf[SEARCH_HEADER..SEARCH_HEADER + len].to_vec()))
}

/// The little-endian `u64` at `at` in `bytes`, if it is all there.
fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at + 8)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::fs;
    use std::os::fd::{AsFd, OwnedFd};
    use std::path::PathBuf;
    use std::process::Command;

    use rustix::fs::{Mode, OFlags};
    use tempfile::TempDir;

    use super::*;

    /// A freshly made btrfs filesystem on a loop device, unmounted on drop (panics included).
    struct Btrfs {
        mnt: PathBuf,
        _dir: TempDir,
    }

    impl Btrfs {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("image");
            // btrfs refuses filesystems much under 114 MiB; sparse, so this costs nothing.
            fs::File::create(&image)
                .unwrap()
                .set_len(256 << 20)
                .unwrap();
            run(Command::new("mkfs.btrfs").arg("-q").arg(&image));
            let mnt = dir.path().join("mnt");
            fs::create_dir(&mnt).unwrap();
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mnt));
            Self { mnt, _dir: dir }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.mnt.join(rel)
        }

        fn open(&self, rel: &str) -> OwnedFd {
            open_dir(&self.path(rel))
        }
    }

    impl Drop for Btrfs {
        fn drop(&mut self) {
            match Command::new("umount").arg(&self.mnt).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "umount {}: {}",
                    self.mnt.display(),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("umount {}: {e}", self.mnt.display()),
            }
        }
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn open_dir(path: &Path) -> OwnedFd {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        rustix::fs::open(path, flags, Mode::empty()).unwrap()
    }

    fn errno(result: io::Result<impl std::fmt::Debug>) -> Errno {
        Errno::from_io_error(&result.unwrap_err()).unwrap()
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn opcodes_match_the_kernel_header() {
        // Printed by a C program including <linux/btrfs.h>.
        assert_eq!(SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(SNAP_DESTROY, 0x5000_940f);
        assert_eq!(INO_LOOKUP, 0xd000_9412);
        assert_eq!(SNAP_CREATE_V2, 0x5000_9417);
        assert_eq!(SUBVOL_GETFLAGS, 0x8008_9419);
        assert_eq!(SUBVOL_SETFLAGS, 0x4008_941a);
    }

    #[test]
    fn snapshots_share_content_and_readonly_ones_refuse_writes() {
        let fs = Btrfs::new();
        create_subvolume(fs.open("").as_fd(), name("base")).unwrap();
        fs::write(fs.path("base/file"), b"layer").unwrap();
        let base = fs.open("base");
        snapshot(base.as_fd(), fs.open("").as_fd(), name("rw"), false).unwrap();
        snapshot(base.as_fd(), fs.open("").as_fd(), name("ro"), true).unwrap();

        let mut ids = vec![subvolume_id(fs.open("").as_fd()).unwrap()];
        for sub in ["base", "rw", "ro"] {
            assert_eq!(fs::read(fs.path(&format!("{sub}/file"))).unwrap(), b"layer");
            let stat = rustix::fs::stat(fs.path(sub)).unwrap();
            assert!(is_subvolume(&stat), "{sub} root is inode {}", stat.st_ino);
            ids.push(subvolume_id(fs.open(sub).as_fd()).unwrap());
        }
        assert_eq!(ids[0], 5, "the top-level subvolume");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 4, "subvolume ids are distinct: {ids:?}");
        let plain = rustix::fs::stat(fs.path("base/file")).unwrap();
        assert!(!is_subvolume(&plain));

        assert!(!is_readonly(fs.open("rw").as_fd()).unwrap());
        assert!(is_readonly(fs.open("ro").as_fd()).unwrap());
        assert!(!is_readonly(base.as_fd()).unwrap());
        assert_eq!(errno(fs::write(fs.path("ro/new"), b"x")), Errno::ROFS);
        assert_eq!(errno(fs::write(fs.path("ro/file"), b"x")), Errno::ROFS);

        fs::write(fs.path("rw/file"), b"changed").unwrap();
        assert_eq!(fs::read(fs.path("base/file")).unwrap(), b"layer");
    }

    #[test]
    fn readonly_flag_round_trips() {
        let fs = Btrfs::new();
        create_subvolume(fs.open("").as_fd(), name("sub")).unwrap();
        let sub = fs.open("sub");
        set_readonly(sub.as_fd(), true).unwrap();
        assert!(is_readonly(sub.as_fd()).unwrap());
        assert_eq!(errno(fs::write(fs.path("sub/file"), b"x")), Errno::ROFS);
        set_readonly(sub.as_fd(), true).unwrap();
        assert!(is_readonly(sub.as_fd()).unwrap());

        set_readonly(sub.as_fd(), false).unwrap();
        assert!(!is_readonly(sub.as_fd()).unwrap());
        fs::write(fs.path("sub/file"), b"x").unwrap();

        fs::create_dir(fs.path("sub/dir")).unwrap();
        let err = errno(set_readonly(fs.open("sub/dir").as_fd(), true));
        assert_eq!(err, Errno::INVAL, "not a subvolume root");
    }

    #[test]
    fn destroy_removes_writable_and_readonly_subvolumes() {
        let fs = Btrfs::new();
        let root = fs.open("");
        create_subvolume(root.as_fd(), name("rw")).unwrap();
        fs::write(fs.path("rw/file"), b"x").unwrap();
        snapshot(fs.open("rw").as_fd(), root.as_fd(), name("ro"), true).unwrap();
        snapshot(
            fs.open("rw").as_fd(),
            root.as_fd(),
            name("committed"),
            false,
        )
        .unwrap();
        set_readonly(fs.open("committed").as_fd(), true).unwrap();

        for sub in ["ro", "committed", "rw"] {
            assert_eq!(is_readonly(fs.open(sub).as_fd()).unwrap(), sub != "rw");
            destroy_subvolume(root.as_fd(), name(sub)).unwrap();
            assert!(!fs.path(sub).exists(), "{sub} still exists");
        }
        assert_eq!(
            errno(destroy_subvolume(root.as_fd(), name("rw"))),
            Errno::NOENT
        );
    }

    #[test]
    fn destroy_refuses_nested_subvolumes_and_plain_directories() {
        let fs = Btrfs::new();
        let root = fs.open("");
        create_subvolume(root.as_fd(), name("outer")).unwrap();
        create_subvolume(fs.open("outer").as_fd(), name("inner")).unwrap();
        let err = errno(destroy_subvolume(root.as_fd(), name("outer")));
        assert_eq!(err, Errno::NOTEMPTY);
        assert!(fs.path("outer/inner").exists());
        destroy_subvolume(fs.open("outer").as_fd(), name("inner")).unwrap();
        destroy_subvolume(root.as_fd(), name("outer")).unwrap();

        fs::create_dir(fs.path("plain")).unwrap();
        let err = errno(destroy_subvolume(root.as_fd(), name("plain")));
        assert_eq!(err, Errno::INVAL);
        assert!(fs.path("plain").exists());
    }

    #[test]
    fn is_btrfs_tells_filesystems_apart() {
        let fs = Btrfs::new();
        assert!(is_btrfs(&fs.mnt).unwrap());
        create_subvolume(fs.open("").as_fd(), name("sub")).unwrap();
        assert!(is_btrfs(&fs.path("sub")).unwrap());
        assert!(!is_btrfs(Path::new("/proc")).unwrap());
        // Judged by an independent tool, so the test holds wherever the temp dir lives.
        let tmp = std::env::temp_dir();
        let out = Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(&tmp)
            .output();
        let tmp_type = String::from_utf8(out.unwrap().stdout).unwrap();
        assert_eq!(
            is_btrfs(&tmp).unwrap(),
            tmp_type.trim() == "btrfs",
            "{tmp_type}"
        );
        assert_eq!(errno(is_btrfs(&fs.path("missing"))), Errno::NOENT);
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel() {
        // On a non-btrfs directory every name that reached the kernel would get ENOTTY.
        let dir = tempfile::tempdir().unwrap();
        let fd = open_dir(dir.path());
        let fd = fd.as_fd();
        let long = |len| OsString::from("a".repeat(len));
        let create = |n: &OsStr| errno(create_subvolume(fd, n));
        let snap = |n: &OsStr| errno(snapshot(fd, fd, n, false));
        let destroy = |n: &OsStr| errno(destroy_subvolume(fd, n));

        let ops: [&dyn Fn(&OsStr) -> Errno; 3] = [&create, &snap, &destroy];
        for bad in ["", ".", "..", "a/b", "/a", "a\0b"] {
            for op in ops {
                assert_eq!(op(name(bad)), Errno::INVAL, "{bad:?}");
            }
        }
        assert_eq!(create(&long(VOL_NAME_LEN)), Errno::NAMETOOLONG);
        assert_eq!(destroy(&long(VOL_NAME_LEN)), Errno::NAMETOOLONG);
        assert_eq!(snap(&long(SUBVOL_NAME_LEN)), Errno::NAMETOOLONG);
        assert_eq!(create(&long(VOL_NAME_LEN - 1)), Errno::NOTTY);
        assert_eq!(snap(&long(SUBVOL_NAME_LEN - 1)), Errno::NOTTY);
        assert_eq!(create(name("ok")), Errno::NOTTY);
    }
}
