//! Opens directories inside a layer root as if the root were `/`.
//!
//! The fast path is one `openat2` with `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: symlinks,
//! absolute ones included, and `..` resolve inside the root, exactly as they will once the
//! layer is part of a container's rootfs, so `bin -> /usr/bin` works and `l -> /etc` cannot
//! reach the host. When a directory is missing and may be created, or on kernels without
//! openat2, a component walk does the same resolution by hand, one `O_NOFOLLOW` step at a
//! time, creating missing directories 0755 (the target of a dangling symlink included).

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// What to do when a directory on the path does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    /// Create it 0755, owned by the caller.
    Create,
    /// Fail with ENOENT.
    Fail,
}

/// The kernel's own limit on symlinks followed in one lookup.
const MAX_SYMLINKS: u32 = 40;

/// openat2 reports EAGAIN when a rename raced with a `..` lookup; retrying is safe.
const MAX_RETRIES: u32 = 16;

/// Opens the directory at `path` (relative, `/`-separated; empty for the root itself) as an
/// `O_PATH` descriptor, resolving it inside `root`.
pub(crate) fn open_dir(root: &OwnedFd, path: &[u8], missing: Missing) -> io::Result<OwnedFd> {
    let target: &[u8] = if path.is_empty() { b"." } else { path };
    let mut retries = 0;
    loop {
        let opened = rustix::fs::openat2(
            root,
            target,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        );
        match opened {
            Ok(fd) => return Ok(fd),
            Err(Errno::AGAIN) if retries < MAX_RETRIES => retries += 1,
            Err(Errno::NOENT) if missing == Missing::Create => return walk(root, path, missing),
            Err(Errno::NOSYS) => return walk(root, path, missing),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Resolves `path` one component at a time, following symlinks inside `root` by hand.
fn walk(root: &OwnedFd, path: &[u8], missing: Missing) -> io::Result<OwnedFd> {
    let mut pending: VecDeque<Vec<u8>> = components(path).map(<[u8]>::to_vec).collect();
    let mut resolved: Vec<Vec<u8>> = Vec::new();
    let mut cur = reopen(root, &resolved)?;
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == b".." {
            resolved.pop();
            cur = reopen(root, &resolved)?;
            continue;
        }
        match rustix::fs::statat(&cur, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
                FileType::Directory => {
                    cur = open_child(&cur, &name)?;
                    resolved.push(name);
                }
                FileType::Symlink => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Errno::LOOP.into());
                    }
                    let target =
                        rustix::fs::readlinkat(&cur, name.as_slice(), Vec::new())?.into_bytes();
                    if target.starts_with(b"/") {
                        resolved.clear();
                        cur = reopen(root, &resolved)?;
                    }
                    for component in components(&target).rev() {
                        pending.push_front(component.to_vec());
                    }
                }
                _ => return Err(Errno::NOTDIR.into()),
            },
            Err(Errno::NOENT) if missing == Missing::Create => {
                rustix::fs::mkdirat(&cur, name.as_slice(), Mode::from_raw_mode(0o755))?;
                // mkdirat's mode passes through the process umask.
                rustix::fs::chmodat(
                    &cur,
                    name.as_slice(),
                    Mode::from_raw_mode(0o755),
                    AtFlags::empty(),
                )?;
                cur = open_child(&cur, &name)?;
                resolved.push(name);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(cur)
}

/// Reopens a path known to consist of real directories only.
fn reopen(root: &OwnedFd, resolved: &[Vec<u8>]) -> io::Result<OwnedFd> {
    let mut cur = rustix::fs::openat(
        root,
        c".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for name in resolved {
        cur = open_child(&cur, name)?;
    }
    Ok(cur)
}

fn open_child(dir: &OwnedFd, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The components of `path` that name something: empty and `.` components dropped, `..` kept.
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    fn root_fd(path: &Path) -> OwnedFd {
        rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    fn resolves_to(fd: &OwnedFd, expected: &Path) -> bool {
        let a = rustix::fs::fstat(fd).unwrap();
        let b = rustix::fs::stat(expected).unwrap();
        (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    }

    #[test]
    fn missing_parents_are_created_inside_the_root_even_through_dangling_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir(&root).unwrap();
        symlink(&outside, root.join("abs")).unwrap();
        symlink("../../../../up/there", root.join("rel")).unwrap();
        let fd = root_fd(&root);

        let dir = open_dir(&fd, b"abs/a/b", Missing::Create).unwrap();
        let inside = root.join(outside.strip_prefix("/").unwrap()).join("a/b");
        assert!(resolves_to(&dir, &inside));
        assert!(!outside.exists());

        let dir = open_dir(&fd, b"rel/x", Missing::Create).unwrap();
        assert!(resolves_to(&dir, &root.join("up/there/x")));
    }

    #[test]
    fn walking_by_hand_matches_openat2() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        symlink("/usr/bin", root.join("bin")).unwrap();
        symlink("..", root.join("usr/bin/up")).unwrap();
        let fd = root_fd(root);
        for path in [&b"bin"[..], b"bin/up/bin", b""] {
            let fast = open_dir(&fd, path, Missing::Fail).unwrap();
            let slow = walk(&fd, path, Missing::Fail).unwrap();
            let (a, b) = (
                rustix::fs::fstat(&fast).unwrap(),
                rustix::fs::fstat(&slow).unwrap(),
            );
            assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
        }
        assert_eq!(
            walk(&fd, b"nope", Missing::Fail)
                .unwrap_err()
                .raw_os_error(),
            Some(Errno::NOENT.raw_os_error())
        );
    }

    #[test]
    fn loops_and_files_in_the_path_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        symlink("a", root.join("a")).unwrap();
        fs::write(root.join("file"), b"").unwrap();
        let fd = root_fd(root);
        for missing in [Missing::Create, Missing::Fail] {
            let err = open_dir(&fd, b"a", missing).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(Errno::LOOP.raw_os_error()));
            let err = walk(&fd, b"a/b", missing).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(Errno::LOOP.raw_os_error()));
            let err = open_dir(&fd, b"file/x", missing).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(Errno::NOTDIR.raw_os_error()));
        }
    }
}
