//! The overlayfs snapshotter.
//!
//! Each snapshot owns `<root>/snapshots/<id>/fs`, the layer's diff: the upperdir while Active,
//! a lowerdir once Committed. Active snapshots also get `<id>/work`, overlay's workdir.
//! Directories are named by metadata id, created as `new-*` and renamed into place inside the
//! metadata transaction, and removed by renaming to `rm-<id>` first. Layers are applied
//! straight into `fs`, with whiteouts in overlay's own on-disk form, so nothing is mounted
//! during an unpack and layers can be applied in parallel and rebased at commit.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::Database;

use crate::apply::{self, ApplyLimits};
use crate::fsutil;
use crate::implicit;
use crate::metastore::{MetaStore, Snapshot};
use crate::{ApplyStats, Error, Info, Kind, Mount, Snapshotter, Usage};

/// Present when the overlay module has the `index` feature, which must then be turned off:
/// lower directories are shared by many mounts, and with the index on, an upper used in
/// another combination fails with EBUSY or ESTALE.
const INDEX_PARAMETER: &str = "/sys/module/overlay/parameters/index";

/// The overlayfs snapshotter. See the module documentation for the layout.
pub struct Overlay {
    root: PathBuf,
    snapshots: PathBuf,
    store: MetaStore,
    index_off: bool,
    limits: ApplyLimits,
    sync_fs: bool,
}

impl Overlay {
    /// Opens (creating if needed) a snapshotter rooted at `root`, keeping its metadata in
    /// tables prefixed `snapshots/overlayfs/` of `db`.
    pub fn open(root: PathBuf, db: Arc<Database>) -> Result<Self, Error> {
        let root =
            std::path::absolute(&root).map_err(Error::io("resolve snapshotter root", &root))?;
        check_root_path(&root)?;
        let snapshots = root.join("snapshots");
        fs::create_dir_all(&snapshots).map_err(Error::io("create directory", &snapshots))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(Error::io("set permissions of", &root))?;
        let store = MetaStore::open(db, "overlayfs")?;
        Ok(Overlay {
            root,
            snapshots,
            store,
            index_off: Path::new(INDEX_PARAMETER).exists(),
            limits: ApplyLimits::default(),
            sync_fs: false,
        })
    }

    /// Caps what one [`Snapshotter::apply`] may write.
    pub fn with_limits(mut self, limits: ApplyLimits) -> Self {
        self.limits = limits;
        self
    }

    /// After each [`Snapshotter::apply`], syncs the filesystem holding the snapshot (one
    /// `syncfs`, no fsync per file), so an applied layer is on disk before it is committed.
    pub fn with_sync_fs(mut self, sync_fs: bool) -> Self {
        self.sync_fs = sync_fs;
        self
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        let snapshot = self.store.write(key, |tx| {
            // Made inside the transaction so a concurrent cleanup never sees it half done;
            // dropping it on any error below deletes it.
            let temp = self.temp_dir(kind)?;
            let snapshot = tx.create(key, kind, parent, labels)?;
            self.install(temp, &snapshot)?;
            Ok(snapshot)
        })?;
        Ok(overlay_mounts(&self.snapshots, &snapshot, self.index_off))
    }

    fn temp_dir(&self, kind: Kind) -> Result<tempfile::TempDir, Error> {
        let temp = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(&self.snapshots)
            .map_err(Error::io("create temporary directory in", &self.snapshots))?;
        make_dir(&temp.path().join("fs"), 0o755)?;
        if kind == Kind::Active {
            make_dir(&temp.path().join("work"), 0o711)?;
        }
        Ok(temp)
    }

    /// Gives `temp` its final name. With a parent, `fs` takes the owner of the parent's `fs`
    /// so the merged root keeps the image root's owner.
    fn install(&self, temp: tempfile::TempDir, snapshot: &Snapshot) -> Result<(), Error> {
        if let Some(parent) = snapshot.parent_ids.first() {
            copy_owner(&self.fs_dir(*parent), &temp.path().join("fs"))?;
        }
        let dest = self.dir(snapshot.id);
        // The id is fresh, so anything already there was left by an aborted transaction.
        fsutil::remove_path(&dest).map_err(Error::io("remove stale directory", &dest))?;
        fs::rename(temp.path(), &dest)
            .map_err(Error::io("rename temporary directory to", &dest))?;
        let _ = temp.keep();
        Ok(())
    }

    fn delete_dir(&self, id: u64) {
        let dir = self.dir(id);
        let doomed = self.snapshots.join(format!("rm-{id}"));
        let result = fs::rename(&dir, &doomed).and_then(|()| fsutil::remove_path(&doomed));
        if let Err(error) = result {
            tracing::warn!(dir = %dir.display(), %error, "removing snapshot directory; cleanup will retry");
        }
    }
}

impl Snapshotter for Overlay {
    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.create(Kind::Active, key, parent, labels)
    }

    fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.create(Kind::View, key, parent, labels)
    }

    fn commit(
        &self,
        name: &str,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        self.store.write(key, |tx| {
            let record = tx.get(key)?;
            let usage = match record.kind {
                Kind::Active => {
                    let fs = self.fs_dir(record.id);
                    fsutil::disk_usage(&fs).map_err(Error::io("measure disk usage of", &fs))?
                }
                Kind::View | Kind::Committed => Usage::default(),
            };
            let snapshot = tx.commit(key, name, parent, labels, usage)?;
            if let (None, Some(parent)) = (&record.parent, snapshot.parent_ids.first()) {
                copy_owner(&self.fs_dir(*parent), &self.fs_dir(snapshot.id))?;
            }
            let lowers: Vec<PathBuf> = snapshot
                .parent_ids
                .iter()
                .map(|id| self.fs_dir(*id))
                .collect();
            implicit::copy_up(
                &self.fs_dir(snapshot.id),
                &self.dir(snapshot.id).join(implicit::FILE),
                &lowers,
            )
        })
    }

    fn remove(&self, key: &str) -> Result<(), Error> {
        let record = self.store.write(key, |tx| tx.remove(key))?;
        self.delete_dir(record.id);
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<Info, Error> {
        self.store.read(key, |r| Ok(r.get(key)?.info(key)))
    }

    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info, Error> {
        let key = info.name.as_str();
        self.store.write(key, |tx| {
            Ok(tx.update_labels(key, &info.labels, fieldpaths)?.info(key))
        })
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let snapshot = self.store.read(key, |r| r.snapshot(key))?;
        if snapshot.kind == Kind::Committed {
            return Err(Error::FailedPrecondition {
                key: key.to_owned(),
                reason: "a committed snapshot has no mounts; prepare or view it".to_owned(),
            });
        }
        Ok(overlay_mounts(&self.snapshots, &snapshot, self.index_off))
    }

    fn usage(&self, key: &str) -> Result<Usage, Error> {
        let record = self.store.read(key, |r| r.get(key))?;
        match record.usage {
            Some(usage) => Ok(usage),
            None => {
                let fs = self.fs_dir(record.id);
                fsutil::disk_usage(&fs).map_err(Error::io("measure disk usage of", &fs))
            }
        }
    }

    fn walk(&self, f: &mut dyn FnMut(&Info)) -> Result<(), Error> {
        for (key, record) in self.store.read("all snapshots", |r| r.all())? {
            f(&record.info(&key));
        }
        Ok(())
    }

    fn apply(&self, key: &str, tar: &mut dyn Read) -> Result<ApplyStats, Error> {
        let record = self.store.read(key, |r| r.get(key))?;
        if record.kind != Kind::Active {
            return Err(Error::FailedPrecondition {
                key: key.to_owned(),
                reason: format!(
                    "layers apply to active snapshots only, this one is {:?}",
                    record.kind
                ),
            });
        }
        let fs = self.fs_dir(record.id);
        let (stats, named) = apply::apply_layer(&fs, tar, &self.limits)?;
        implicit::record(&fs, &self.dir(record.id).join(implicit::FILE), &named)?;
        if self.sync_fs {
            let dir = fs::File::open(&fs).map_err(Error::io("open", &fs))?;
            rustix::fs::syncfs(&dir).map_err(|e| Error::io("sync filesystem of", &fs)(e.into()))?;
        }
        Ok(stats)
    }

    fn cleanup(&self) -> Result<(), Error> {
        // Listed inside a write transaction: creations make and rename their directory inside
        // one, so no directory seen here is still being set up.
        let garbage = self.store.write("cleanup", |tx| {
            let ids = tx.ids()?;
            let mut garbage = Vec::new();
            let entries =
                fs::read_dir(&self.snapshots).map_err(Error::io("list", &self.snapshots))?;
            for entry in entries {
                let entry = entry.map_err(Error::io("list", &self.snapshots))?;
                let name = entry.file_name();
                let live = name
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|id| ids.contains(&id));
                if !live {
                    garbage.push(entry.path());
                }
            }
            Ok(garbage)
        })?;
        for path in garbage {
            tracing::info!(path = %path.display(), "removing unreferenced snapshot directory");
            fsutil::remove_path(&path).map_err(Error::io("remove", &path))?;
        }
        Ok(())
    }

    fn root(&self) -> &Path {
        &self.root
    }
}

/// The mounts of a snapshot, as containerd's overlay snapshotter returns them: a snapshot
/// without parents is a bind of its own directory (rw when Active), a read-only one with a
/// single parent is a read-only bind of that parent, and everything else is an overlay whose
/// lowerdirs are the parents, nearest first, with upperdir and workdir when Active.
fn overlay_mounts(snapshots: &Path, snapshot: &Snapshot, index_off: bool) -> Vec<Mount> {
    let path = |id: u64, sub: &str| {
        snapshots
            .join(id.to_string())
            .join(sub)
            .display()
            .to_string()
    };
    let bind = |source: String, mode: &str| Mount {
        kind: "bind".to_owned(),
        source,
        options: vec![mode.to_owned(), "rbind".to_owned()],
    };
    match (snapshot.kind, snapshot.parent_ids.as_slice()) {
        (Kind::Active, []) => vec![bind(path(snapshot.id, "fs"), "rw")],
        (Kind::View | Kind::Committed, []) => vec![bind(path(snapshot.id, "fs"), "ro")],
        // The kernel refuses an overlay with neither an upperdir nor a second lowerdir.
        (Kind::View | Kind::Committed, [parent]) => vec![bind(path(*parent, "fs"), "ro")],
        (kind, parents) => {
            let mut options = Vec::new();
            if kind == Kind::Active {
                options.push(format!("workdir={}", path(snapshot.id, "work")));
                options.push(format!("upperdir={}", path(snapshot.id, "fs")));
            }
            let lowers: Vec<String> = parents.iter().map(|id| path(*id, "fs")).collect();
            options.push(format!("lowerdir={}", lowers.join(":")));
            if index_off {
                options.push("index=off".to_owned());
            }
            vec![Mount {
                kind: "overlay".to_owned(),
                source: "overlay".to_owned(),
                options,
            }]
        }
    }
}

/// Overlay options are `,`- and `:`-separated and `\` escapes, so the root can hold none of
/// them; mount options are strings, so it must be UTF-8.
fn check_root_path(root: &Path) -> Result<(), Error> {
    let reason = match root.to_str() {
        None => "is not UTF-8",
        Some(s) if s.contains([':', ',', '\\']) => {
            "contains ':', ',' or '\\', which overlay options cannot carry"
        }
        Some(_) => return Ok(()),
    };
    Err(Error::InvalidArgument {
        key: root.display().to_string(),
        reason: format!("snapshotter root {reason}"),
    })
}

fn make_dir(path: &Path, mode: u32) -> Result<(), Error> {
    fs::create_dir(path).map_err(Error::io("create directory", path))?;
    // Explicit, because create_dir's mode is filtered through the process umask.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(Error::io("set permissions of", path))
}

fn copy_owner(from: &Path, to: &Path) -> Result<(), Error> {
    let meta = fs::symlink_metadata(from).map_err(Error::io("stat", from))?;
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(Error::io("change owner of", to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(kind: Kind, id: u64, parent_ids: &[u64]) -> Snapshot {
        Snapshot {
            id,
            kind,
            parent_ids: parent_ids.to_vec(),
        }
    }

    fn mounts(kind: Kind, id: u64, parents: &[u64], index_off: bool) -> Vec<Mount> {
        overlay_mounts(
            Path::new("/r/snapshots"),
            &snapshot(kind, id, parents),
            index_off,
        )
    }

    fn mount(kind: &str, source: &str, options: &[&str]) -> Vec<Mount> {
        vec![Mount {
            kind: kind.to_owned(),
            source: source.to_owned(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }]
    }

    #[test]
    fn without_parents_snapshots_are_bind_mounts_of_their_own_fs() {
        assert_eq!(
            mounts(Kind::Active, 4, &[], true),
            mount("bind", "/r/snapshots/4/fs", &["rw", "rbind"])
        );
        assert_eq!(
            mounts(Kind::View, 4, &[], true),
            mount("bind", "/r/snapshots/4/fs", &["ro", "rbind"])
        );
    }

    #[test]
    fn a_view_of_one_parent_binds_the_parent_read_only() {
        assert_eq!(
            mounts(Kind::View, 9, &[3], true),
            mount("bind", "/r/snapshots/3/fs", &["ro", "rbind"])
        );
    }

    #[test]
    fn a_view_of_several_parents_is_an_overlay_without_upper() {
        assert_eq!(
            mounts(Kind::View, 9, &[3, 2], false),
            mount(
                "overlay",
                "overlay",
                &["lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]
            )
        );
    }

    #[test]
    fn an_active_overlay_lists_lowers_nearest_parent_first() {
        assert_eq!(
            mounts(Kind::Active, 12, &[11, 7, 1], true),
            mount(
                "overlay",
                "overlay",
                &[
                    "workdir=/r/snapshots/12/work",
                    "upperdir=/r/snapshots/12/fs",
                    "lowerdir=/r/snapshots/11/fs:/r/snapshots/7/fs:/r/snapshots/1/fs",
                    "index=off",
                ]
            )
        );
    }

    #[test]
    fn roots_that_overlay_options_cannot_carry_are_refused() {
        assert!(check_root_path(Path::new("/var/lib/imaged/snapshots/overlayfs")).is_ok());
        for bad in ["/var/lib/a:b", "/var/lib/a,b", "/var/lib/a\\b"] {
            assert!(matches!(
                check_root_path(Path::new(bad)),
                Err(Error::InvalidArgument { .. })
            ));
        }
    }
}
