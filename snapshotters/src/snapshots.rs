//! The one [`Snapshotter`] implementation, over a per-backend [`Layout`].
//!
//! Every backend keeps its snapshots as `<root>/snapshots/<id>/fs`, the tree a layer is
//! applied into, named by metadata id. Directories are made as `new-*` and filled outside
//! any transaction (a native copy of a large parent takes seconds, and the database has
//! one writer), then renamed into place inside the metadata transaction; they are removed
//! by renaming to `rm-<id>` first. A crash leaves only names that
//! [`Snapshotter::cleanup`] recognises. What differs between
//! overlayfs, btrfs and native (how `fs` starts, what a commit does, how whiteouts are
//! written, the mounts) is the [`Layout`]'s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use redb::Database;

use crate::apply::{self, ApplyLimits, Inodes, Whiteouts};
use crate::metastore::{MetaStore, Record, Snapshot};
use crate::{
    ApplyStats, Backend, Error, Finding, Info, Kind, Mount, Snapshotter, Usage, fsutil, hidden,
    rebase,
};

/// The change a rebase makes to an Active snapshot's tree, checked and ready to run.
pub(crate) type Merge = Box<dyn FnOnce() -> Result<(), Error>>;

/// What one backend decides.
pub(crate) trait Layout: Send + Sync {
    /// Fills `temp`, the directory of a snapshot being created, with at least `fs`.
    /// `parent` is the parent's `fs`; `labels` are the new snapshot's.
    fn populate(
        &self,
        temp: &Path,
        kind: Kind,
        parent: Option<&Path>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Error>;

    /// Whether the files in `dir/fs`, an Active snapshot's, are its own or its parent's.
    fn inodes(&self, _dir: &Path) -> Result<Inodes, Error> {
        Ok(Inodes::Own)
    }

    /// The mounts of an Active or View snapshot; `snapshots` holds the id directories.
    fn mounts(&self, snapshots: &Path, snapshot: &Snapshot) -> Vec<Mount>;

    /// How layers write whiteouts into the Active snapshot `record`: overlay markers,
    /// deletions from a copy of the parent, or a list for a later merge onto the parent.
    fn whiteouts(&self, record: &Record) -> Whiteouts;

    /// Whether a snapshot prepared without a parent can get one at commit.
    fn rebase(&self) -> bool;

    /// Runs after a layer was applied into `dir/fs` of the Active snapshot `record`;
    /// `named` lists the directories the layer had entries for.
    fn applied(&self, _dir: &Path, _record: &Record, _named: &[Vec<u8>]) -> Result<(), Error> {
        Ok(())
    }

    /// Checks, before the commit transaction of `dir`, an Active snapshot prepared without a
    /// parent, that it can be rebased onto the committed parent whose tree is `parent`,
    /// without changing anything. Returns the change to its tree the rebase needs, if any:
    /// work too long to hold the database's one writer for, run next.
    fn rebase_onto(&self, _dir: &Path, _parent: &Path) -> Result<Option<Merge>, Error> {
        Ok(None)
    }

    /// Tidies `dir` once the commit of an Active snapshot is in; what it leaves only takes
    /// space.
    fn tidy(&self, _dir: &Path) -> Result<(), Error> {
        Ok(())
    }

    /// Runs inside the commit transaction, after the metadata changed; `before` is the
    /// Active record, `snapshot` the Committed one.
    fn committed(
        &self,
        snapshots: &Path,
        before: &Record,
        snapshot: &Snapshot,
    ) -> Result<(), Error>;

    /// The usage of the snapshot whose tree is `fs`; a walk unless the filesystem knows.
    fn usage(&self, fs: &Path, _kind: Kind) -> io::Result<Usage> {
        fsutil::disk_usage(fs)
    }

    /// Removes a snapshot's directory, or a leftover one, with everything in it.
    fn remove(&self, dir: &Path) -> io::Result<()> {
        fsutil::remove_path(dir)
    }
}

/// A directory claimed ([`Snapshots::try_claim`]) until dropped.
struct Claim<'a> {
    snapshots: &'a Snapshots,
    dir: PathBuf,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.snapshots.filled(&self.dir);
    }
}

/// What a commit found before its transaction.
struct Committing<'a> {
    /// The id of the record read: the transaction commits that record only.
    id: u64,
    /// The claim on an Active snapshot, held until the commit is done.
    claim: Option<Claim<'a>>,
    /// The id of the parent its tree was merged onto, if it was.
    merged_onto: Option<u64>,
}

fn refused(key: &str, reason: &str) -> Error {
    Error::FailedPrecondition {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Snapshots of one backend (see [`Backend`]) under a root directory, with metadata in a
/// redb database shared with other backends and the rest of imaged.
pub struct Snapshots {
    backend: Backend,
    root: PathBuf,
    snapshots: PathBuf,
    store: MetaStore,
    layout: Box<dyn Layout>,
    limits: ApplyLimits,
    sync_fs: bool,
    /// `new-*` directories being filled and `rm-*` ones being emptied, which cleanup must
    /// leave alone.
    filling: Mutex<HashSet<PathBuf>>,
}

impl Snapshots {
    /// Opens (creating if needed) `backend`'s snapshots under `root`, keeping metadata in
    /// tables prefixed `snapshots/<backend>/` of `db`. A root the backend cannot work on
    /// (btrfs not on btrfs, overlayfs options that cannot name it) is InvalidArgument.
    pub fn open(backend: Backend, root: PathBuf, db: Arc<Database>) -> Result<Self, Error> {
        let root =
            std::path::absolute(&root).map_err(Error::io("resolve snapshotter root", &root))?;
        let snapshots = root.join("snapshots");
        fs::create_dir_all(&snapshots).map_err(Error::io("create directory", &snapshots))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(Error::io("set permissions of", &root))?;
        let layout = crate::layout(backend, &root)?;
        let store = MetaStore::open(db, backend.name())?;
        Ok(Snapshots {
            backend,
            root,
            snapshots,
            store,
            layout,
            limits: ApplyLimits::default(),
            sync_fs: false,
            filling: Mutex::default(),
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

    /// The backend these snapshots belong to.
    pub fn backend(&self) -> Backend {
        self.backend
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
        let parent_id = match parent {
            Some(parent) => Some(self.store.read(parent, |r| r.committed_parent(parent))?.id),
            None => None,
        };
        let temp = self.temp_dir()?;
        let parent_fs = parent_id.map(|id| self.fs_dir(id));
        let made = self
            .layout
            .populate(&temp, kind, parent_fs.as_deref(), &labels)
            .and_then(|()| {
                self.store.write(key, |tx| {
                    let snapshot = tx.create(key, kind, parent, labels)?;
                    if snapshot.parent_ids.first().copied() != parent_id {
                        return Err(Error::FailedPrecondition {
                            key: key.to_owned(),
                            reason: format!("parent {parent:?} was replaced while being copied"),
                        });
                    }
                    self.install(&temp, snapshot.id)?;
                    Ok(snapshot)
                })
            });
        if made.is_err() {
            self.discard(&temp);
        }
        self.filled(&temp);
        made.map(|snapshot| self.layout.mounts(&self.snapshots, &snapshot))
    }

    fn temp_dir(&self) -> Result<PathBuf, Error> {
        let mut filling = self.filling.lock().unwrap_or_else(PoisonError::into_inner);
        let temp = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(&self.snapshots)
            .map_err(Error::io("create temporary directory in", &self.snapshots))?
            .keep();
        filling.insert(temp.clone());
        Ok(temp)
    }

    fn filled(&self, temp: &Path) {
        let mut filling = self.filling.lock().unwrap_or_else(PoisonError::into_inner);
        filling.remove(temp);
    }

    fn install(&self, temp: &Path, id: u64) -> Result<(), Error> {
        let dest = self.dir(id);
        // The id is fresh, so anything already there was left by an aborted transaction.
        self.layout
            .remove(&dest)
            .map_err(Error::io("remove stale directory", &dest))?;
        fs::rename(temp, &dest).map_err(Error::io("rename temporary directory to", &dest))
    }

    fn discard(&self, dir: &Path) {
        if let Err(error) = self.layout.remove(dir)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), %error, "removing snapshot directory; cleanup will retry");
        }
    }

    /// Removes the directory of a snapshot whose record went; [`Self::claim`] marked it
    /// inside that transaction, so no check sees it unowned meanwhile.
    fn delete_dir(&self, id: u64) {
        let dir = self.dir(id);
        let doomed = self.snapshots.join(format!("rm-{id}"));
        self.claim(&doomed);
        match fs::rename(&dir, &doomed) {
            Ok(()) => {
                self.filled(&dir);
                self.discard(&doomed);
            }
            Err(error) => {
                self.filled(&dir);
                tracing::warn!(dir = %dir.display(), %error, "removing snapshot directory; cleanup will retry");
            }
        }
        self.filled(&doomed);
    }

    /// Marks a directory as in use, unless something else has it already.
    fn try_claim(&self, dir: &Path) -> bool {
        self.filling
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir.to_path_buf())
    }

    /// Marks a directory as in use by an operation, which cleanup and check leave alone.
    fn claim(&self, dir: &Path) {
        self.filling
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir.to_path_buf());
    }

    /// Syncs the filesystem of `fs` if the snapshotter was asked to
    /// ([`Snapshots::with_sync_fs`]).
    fn sync(&self, fs: &Path) -> Result<(), Error> {
        if !self.sync_fs {
            return Ok(());
        }
        let dir = fs::File::open(fs).map_err(Error::io("open", fs))?;
        rustix::fs::syncfs(&dir).map_err(|e| Error::io("sync filesystem of", fs)(e.into()))
    }

    fn measure(&self, id: u64, kind: Kind) -> Result<Usage, Error> {
        let fs = self.fs_dir(id);
        self.layout
            .usage(&fs, kind)
            .map_err(Error::io("measure disk usage of", &fs))
    }

    /// Directories under `snapshots/` that no record owns and no creation is filling.
    fn unowned_dirs(&self) -> Result<Vec<PathBuf>, Error> {
        // Listed inside a write transaction: creations make and rename their directory inside
        // one, so no directory seen here is still being set up.
        self.store.write("unowned directories", |tx| {
            let ids = tx.ids()?;
            let filling = self.filling.lock().unwrap_or_else(PoisonError::into_inner);
            let mut unowned = Vec::new();
            let entries =
                fs::read_dir(&self.snapshots).map_err(Error::io("list", &self.snapshots))?;
            for entry in entries {
                let entry = entry.map_err(Error::io("list", &self.snapshots))?;
                let live = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|id| ids.contains(&id));
                let path = entry.path();
                if !live && !filling.contains(&path) {
                    unowned.push(path);
                }
            }
            Ok(unowned)
        })
    }

    /// Snapshots whose directory or parent is gone, and every snapshot above them, deepest
    /// first: removed in this order, children go before their parents.
    fn broken_snapshots(&self) -> Result<Vec<(String, String)>, Error> {
        let records = self.store.read("all snapshots", |r| r.all())?;
        let parents: HashMap<&str, Option<&str>> = records
            .iter()
            .map(|(key, record)| (key.as_str(), record.parent.as_deref()))
            .collect();
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut broken: HashMap<String, String> = HashMap::new();
        for (key, record) in &records {
            let fs = self.fs_dir(record.id);
            if let Some(parent) = record.parent.as_deref() {
                children.entry(parent).or_default().push(key);
                if !parents.contains_key(parent) {
                    broken.insert(key.clone(), format!("its parent {parent} is not recorded"));
                }
            }
            if !fs.is_dir() {
                let problem = format!("its directory {} is missing", fs.display());
                broken.entry(key.clone()).or_insert(problem);
            }
        }
        let mut pending: Vec<String> = broken.keys().cloned().collect();
        while let Some(parent) = pending.pop() {
            for child in children.get(parent.as_str()).into_iter().flatten() {
                if !broken.contains_key(*child) {
                    let problem = format!("its parent {parent} is broken");
                    broken.insert(child.to_string(), problem);
                    pending.push(child.to_string());
                }
            }
        }
        // Capped: metadata with a parent cycle must not hang the check.
        let depth = |key: &str| {
            let mut depth = 0;
            let mut above = parents.get(key).copied().flatten();
            while let Some(parent) = above.filter(|_| depth < parents.len()) {
                depth += 1;
                above = parents.get(parent).copied().flatten();
            }
            depth
        };
        let mut broken: Vec<(String, String)> = broken.into_iter().collect();
        broken.sort_by_cached_key(|(key, _)| (std::cmp::Reverse(depth(key)), key.clone()));
        Ok(broken)
    }

    /// The part of a commit of `key` onto `parent` that runs before its transaction: the
    /// claim of an Active snapshot and, for one prepared without a parent where the layout
    /// can rebase, the merge if the rebase needs one.
    fn before_commit(&self, key: &str, parent: Option<&str>) -> Result<Committing<'_>, Error> {
        // The parent a rebase would merge onto is looked up in the same read; once a merge
        // used it, the transaction checks it is still the committed parent.
        let (record, onto) = self.store.read(key, |r| {
            let record = r.get(key)?;
            let rebases =
                record.kind == Kind::Active && record.parent.is_none() && self.layout.rebase();
            let onto = parent
                .filter(|_| rebases)
                .map(|p| r.committed_parent(p).map(|parent| (p, parent.id)))
                .transpose()?;
            Ok((record, onto))
        })?;
        let mut committing = Committing {
            id: record.id,
            claim: None,
            merged_onto: None,
        };
        // The transaction refuses a snapshot that is not Active.
        if record.kind != Kind::Active {
            return Ok(committing);
        }
        committing.claim = Some(self.hold(key, record.id)?);
        if record.parent.is_some() {
            return Ok(committing);
        }
        self.check_rebase(key, &record, parent)?;
        if self.layout.rebase() {
            committing.merged_onto = self.merge_held(key, record.id, onto)?;
        }
        Ok(committing)
    }

    /// Claims the directory of `key`, whose record had `id`, for a commit or an apply;
    /// refused while another holds it.
    fn hold(&self, key: &str, id: u64) -> Result<Claim<'_>, Error> {
        let dir = self.dir(id);
        if !self.try_claim(&dir) {
            return Err(refused(
                key,
                "a commit of it, a layer applied to it or its removal is under way",
            ));
        }
        let claim = Claim {
            snapshots: self,
            dir,
        };
        // Read again under the claim, which removal needs: the record stays this one now.
        if self.store.read(key, |r| r.get(key))?.id != id {
            return Err(refused(key, "it was removed and prepared again meanwhile"));
        }
        Ok(claim)
    }

    /// Merges the tree of `key`, claimed with the id it had when read, onto the committed
    /// `parent` (its key and id) if the rebase needs it and it is not done yet; returns the
    /// id of the parent it is merged onto. The mark written before the merge refuses, from
    /// then on, a commit onto any other parent or none, and every commit once a merge
    /// stopped part way.
    fn merge_held(
        &self,
        key: &str,
        id: u64,
        parent: Option<(&str, u64)>,
    ) -> Result<Option<u64>, Error> {
        let dir = self.dir(id);
        match (rebase::read(&dir)?, parent) {
            (None, None) => Ok(None),
            (None, Some((parent, parent_id))) => {
                let Some(merge) = self.layout.rebase_onto(&dir, &self.fs_dir(parent_id))? else {
                    return Ok(None);
                };
                let onto = || rebase::Onto {
                    id: parent_id,
                    key: parent.to_owned(),
                };
                rebase::write(&dir, &rebase::Mark::Started(onto()))?;
                merge()?;
                rebase::write(&dir, &rebase::Mark::Merged(onto()))?;
                self.sync(&self.fs_dir(id))?;
                Ok(Some(parent_id))
            }
            (Some(rebase::Mark::Merged(onto)), Some((_, parent_id))) if onto.id == parent_id => {
                Ok(Some(parent_id))
            }
            (Some(rebase::Mark::Merged(onto)), _) => Err(refused(
                key,
                &format!(
                    "its tree was merged onto the parent {:?}; commit it onto that parent or remove it",
                    onto.key
                ),
            )),
            (Some(rebase::Mark::Started(onto)), _) => Err(refused(
                key,
                &format!(
                    "a merge of its tree onto the parent {:?} stopped part way; remove it",
                    onto.key
                ),
            )),
        }
    }

    /// Tidies up after the commit of an Active snapshot; what is left only takes space.
    fn after_commit(&self, dir: &Path) {
        if let Err((path, error)) = rebase::remove(dir) {
            tracing::warn!(path = %path.display(), %error, "removing a rebase mark");
        }
        if let Err(error) = self.layout.tidy(dir) {
            tracing::warn!(dir = %dir.display(), %error, "tidying up after a commit");
        }
    }

    fn check_rebase(&self, key: &str, record: &Record, parent: Option<&str>) -> Result<(), Error> {
        match (&record.parent, parent) {
            (None, Some(parent)) if !self.layout.rebase() => Err(Error::FailedPrecondition {
                key: key.to_owned(),
                reason: format!(
                    "the {} snapshotter cannot rebase a snapshot onto {parent:?}; prepare it on its parent",
                    self.backend.name()
                ),
            }),
            _ => Ok(()),
        }
    }
}

impl Snapshotter for Snapshots {
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
        let committing = self.before_commit(key, parent)?;
        let committed = self.store.write(key, |tx| {
            let record = tx.get(key)?;
            if record.id != committing.id {
                return Err(refused(key, "it was removed and prepared again meanwhile"));
            }
            self.check_rebase(key, &record, parent)?;
            let snapshot = tx.commit(key, name, parent, labels)?;
            let merged_onto = committing.merged_onto.as_ref();
            if merged_onto.is_some() && snapshot.parent_ids.first() != merged_onto {
                return Err(refused(
                    key,
                    &format!(
                        "its parent {:?} was replaced while its tree was merged onto it",
                        parent.unwrap_or_default()
                    ),
                ));
            }
            self.layout.committed(&self.snapshots, &record, &snapshot)
        });
        if let (Some(claim), Ok(())) = (&committing.claim, &committed) {
            self.after_commit(&claim.dir);
        }
        committed
    }

    fn remove(&self, key: &str) -> Result<(), Error> {
        let mut claimed = None;
        let removed = self.store.write(key, |tx| {
            let record = tx.get(key)?;
            let dir = self.dir(record.id);
            if !self.try_claim(&dir) {
                return Err(refused(
                    key,
                    "a commit of it or a layer applied to it is under way",
                ));
            }
            claimed = Some(dir);
            tx.remove(key)
        });
        match removed {
            Ok(record) => self.delete_dir(record.id),
            // The record stays (the transaction did not commit), and owns its directory.
            Err(error) => {
                if let Some(dir) = claimed {
                    self.filled(&dir);
                }
                return Err(error);
            }
        }
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
        Ok(self.layout.mounts(&self.snapshots, &snapshot))
    }

    fn usage(&self, key: &str) -> Result<Usage, Error> {
        let record = self.store.read(key, |r| r.get(key))?;
        if let Some(usage) = record.usage {
            return Ok(usage);
        }
        // Measured outside any transaction: a btrfs or native tree is the whole image, and
        // the database has one writer.
        let usage = self.measure(record.id, record.kind)?;
        if record.kind == Kind::Committed {
            self.store.write(key, |tx| tx.freeze_usage(key, usage))?;
        }
        Ok(usage)
    }

    fn walk(&self, f: &mut dyn FnMut(&Info)) -> Result<(), Error> {
        for (key, record) in self.store.read("all snapshots", |r| r.all())? {
            f(&record.info(&key));
        }
        Ok(())
    }

    fn apply(&self, key: &str, tar: &mut dyn BufRead) -> Result<ApplyStats, Error> {
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
        let claim = self.hold(key, record.id)?;
        let dir = &claim.dir;
        if rebase::read(dir)?.is_some() {
            return Err(refused(
                key,
                "its tree was merged onto a parent; commit it or remove it",
            ));
        }
        let fs = self.fs_dir(record.id);
        let inodes = self.layout.inodes(dir)?;
        let whiteouts = self.layout.whiteouts(&record);
        let (stats, named) = apply::apply_layer(
            &fs,
            tar,
            &self.limits,
            whiteouts,
            inodes,
            &dir.join(hidden::FILE),
        )
        .map_err(|e| on_full_disk(e, &fs))?;
        self.layout.applied(dir, &record, &named)?;
        self.sync(&fs)?;
        Ok(stats)
    }

    fn cleanup(&self) -> Result<(), Error> {
        // One directory that cannot go must not keep the others, or the daemon, from going on.
        for path in self.unowned_dirs()? {
            tracing::info!(path = %path.display(), "removing unreferenced snapshot directory");
            if let Err(error) = self.layout.remove(&path) {
                tracing::warn!(path = %path.display(), %error, "removing unreferenced snapshot directory failed");
            }
        }
        Ok(())
    }

    fn check(&self, repair: bool) -> Result<Vec<Finding>, Error> {
        let mut findings = Vec::new();
        for (key, problem) in self.broken_snapshots()? {
            // A snapshot removed meanwhile lost its record before its directory.
            if matches!(self.stat(&key), Err(Error::NotFound { .. })) {
                continue;
            }
            let repaired = repair && self.remove(&key).is_ok();
            findings.push(Finding {
                subject: format!("snapshot {key}"),
                problem,
                repaired,
            });
        }
        for path in self.unowned_dirs()? {
            let repaired = repair && self.layout.remove(&path).is_ok();
            findings.push(Finding {
                subject: path.display().to_string(),
                problem: "a directory no snapshot owns".to_owned(),
                repaired,
            });
        }
        Ok(findings)
    }

    fn rebase(&self) -> bool {
        self.layout.rebase()
    }

    fn root(&self) -> &Path {
        &self.root
    }
}

/// A layer entry that ran out of space names the snapshot's directory too: the entry says
/// what was written, the directory which filesystem is full.
fn on_full_disk(error: Error, fs: &Path) -> Error {
    match &error {
        Error::Layer {
            reason: crate::LayerError::Io { source, .. },
            ..
        } if matches!(
            source.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) =>
        {
            Error::Io {
                op: "apply a layer into",
                path: fs.to_path_buf(),
                source: io::Error::new(source.kind(), error.to_string()),
            }
        }
        _ => error,
    }
}

/// A directory with an explicit mode: `create_dir`'s is filtered through the umask.
pub(crate) fn make_dir(path: &Path, mode: u32) -> Result<(), Error> {
    fs::create_dir(path).map_err(Error::io("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(Error::io("set permissions of", path))
}

/// A bind mount of `source`, read-write or read-only.
pub(crate) fn bind(source: &Path, writable: bool) -> Mount {
    Mount {
        kind: "bind".to_owned(),
        source: source.display().to_string(),
        options: vec![
            if writable { "rw" } else { "ro" }.to_owned(),
            "rbind".to_owned(),
        ],
    }
}
