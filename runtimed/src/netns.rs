//! Named network namespaces: a pod's namespace is pinned by bind-mounting it on a file, so
//! it outlives every process in it and CNI plugins and the OCI runtime can join it by path,
//! as containerd does under `/var/run/netns`. [`pin`] pins any namespace so (a pod's user
//! namespace too).

use rustix::mount::{UnmountFlags, mount_bind, unmount};
use rustix::thread::UnshareFlags;
use std::io;
use std::path::Path;

/// Pins the namespace `source` (a `/proc/<pid>/ns/*` file) at `target`, a file that must
/// not exist yet.
pub fn pin(source: &Path, target: &Path) -> io::Result<()> {
    create_pin_file(target)?;
    mount_bind(source, target)?;
    Ok(())
}

fn create_pin_file(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    Ok(())
}

/// Creates a new network namespace pinned at `path` (a file that must not exist yet).
pub fn create(path: &Path) -> io::Result<()> {
    create_pin_file(path)?;
    let target = path.to_path_buf();
    // A thread of its own, since unshare moves the calling thread into the new namespace
    // and this one ends right after pinning it.
    let pinned = std::thread::spawn(move || -> io::Result<()> {
        // SAFETY: CLONE_NEWNET changes only this thread's network namespace, and the thread
        // runs nothing else.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }?;
        mount_bind("/proc/thread-self/ns/net", &target)?;
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("network namespace thread panicked"))?;
    if let Err(e) = pinned {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Unpins and deletes the namespace at `path`; one that is already gone is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match unmount(path, UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
