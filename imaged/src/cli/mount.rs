//! `imaged mount` and `imaged unmount`: an image's root filesystem on a directory, as
//! `ctr images mount` gives it. The snapshot is prepared through the daemon's internal API
//! (a read-only view, or writable on top of the image) under a key made from the
//! directory, so that unmounting finds it again, and this process mounts it.

use super::CliError;
use proto::imaged::snapshots_client::SnapshotsClient;
use proto::imaged::{PrepareRequest, RemoveSnapshotRequest, SnapshotKey};
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

/// The snapshot key of what is mounted on `dir` (an absolute, resolved path).
fn key(dir: &Path) -> String {
    format!("imaged-mount:{}", dir.display())
}

/// `dir` resolved; it must be a directory.
fn target(dir: &Path) -> Result<PathBuf, CliError> {
    let resolved = std::fs::canonicalize(dir)
        .map_err(|e| CliError::Usage(format!("mount target {}: {e}", dir.display())))?;
    if !resolved.is_dir() {
        return Err(CliError::Usage(format!(
            "mount target {} is not a directory",
            dir.display()
        )));
    }
    Ok(resolved)
}

/// Whether a snapshot for `key` exists.
async fn mounted(snapshots: &mut SnapshotsClient<Channel>, key: &str) -> Result<bool, CliError> {
    let request = SnapshotKey { key: key.into() };
    match snapshots.mounts(request).await {
        Ok(_) => Ok(true),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
        Err(status) => Err(status.into()),
    }
}

/// Mounts `image`'s root filesystem on `dir`: read-only, or a writable snapshot on top of
/// the image when `writable`. Prints the directory.
pub async fn mount(
    channel: Channel,
    image: &str,
    dir: &Path,
    writable: bool,
) -> Result<(), CliError> {
    let dir = target(dir)?;
    let key = key(&dir);
    let mut snapshots = SnapshotsClient::new(channel);
    if mounted(&mut snapshots, &key).await? {
        return Err(CliError::Usage(format!(
            "{} already has an image mounted (imaged unmount {0} first)",
            dir.display()
        )));
    }
    let request = PrepareRequest {
        image: image.into(),
        key: key.clone(),
        readonly: !writable,
    };
    let mounts = crate::internal_api::mounts_from(snapshots.prepare(request).await?.into_inner());
    if let Err(e) = plumbing::mount::Mount::mount_all(&mounts, &dir) {
        let _ = snapshots.remove(RemoveSnapshotRequest { key }).await;
        return Err(CliError::Usage(format!(
            "mounting {image} on {}: {}",
            dir.display(),
            plumbing::error_chain(&e)
        )));
    }
    println!("{}", dir.display());
    Ok(())
}

/// Unmounts what `imaged mount` put on `dir` and removes its snapshot (and with it what
/// was written there).
pub async fn unmount(channel: Channel, dir: &Path) -> Result<(), CliError> {
    let dir = target(dir)?;
    let key = key(&dir);
    let mut snapshots = SnapshotsClient::new(channel);
    if !mounted(&mut snapshots, &key).await? {
        return Err(CliError::Usage(format!(
            "no image is mounted on {} by imaged mount",
            dir.display()
        )));
    }
    match plumbing::mount::unmount(&dir) {
        // Unmounted already by hand: the snapshot still goes.
        Err(plumbing::mount::MountError::Io { source, .. })
            if source.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => {
            return Err(CliError::Usage(format!(
                "unmounting {}: {}",
                dir.display(),
                plumbing::error_chain(&e)
            )));
        }
        Ok(()) => {}
    }
    snapshots.remove(RemoveSnapshotRequest { key }).await?;
    Ok(())
}
