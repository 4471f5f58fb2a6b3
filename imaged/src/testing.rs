//! Test doubles for unit tests that run without root: a [`Snapshotter`] that keeps its
//! snapshots in memory and follows the trait's rules (kinds, parents, key namespace, children
//! before parents), so the pull's bookkeeping and the garbage collector can be checked
//! without mounting anything.

use snapshotters::{ApplyStats, Error, Info, Kind, Mount, Snapshotter, Usage};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Snapshots in a map, keyed by key or name.
pub struct MemorySnapshotter {
    snapshots: Mutex<BTreeMap<String, Info>>,
    root: PathBuf,
}

impl Default for MemorySnapshotter {
    fn default() -> Self {
        Self {
            snapshots: Mutex::default(),
            root: PathBuf::from("/nonexistent/memory-snapshotter"),
        }
    }
}

impl MemorySnapshotter {
    /// Every snapshot's name or key with its kind and parent, in key order.
    pub fn tree(&self) -> Vec<(String, Kind, Option<String>)> {
        let snapshots = self.snapshots.lock().unwrap();
        snapshots
            .values()
            .map(|i| (i.name.clone(), i.kind, i.parent.clone()))
            .collect()
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        let mut snapshots = self.snapshots.lock().unwrap();
        if snapshots.contains_key(key) {
            return Err(Error::AlreadyExists { key: key.into() });
        }
        if let Some(parent) = parent {
            committed(&snapshots, parent)?;
        }
        let now = SystemTime::now();
        let info = Info {
            kind,
            name: key.into(),
            parent: parent.map(str::to_string),
            labels,
            created: now,
            updated: now,
        };
        snapshots.insert(key.into(), info);
        Ok(mounts(key, kind))
    }
}

fn mounts(key: &str, kind: Kind) -> Vec<Mount> {
    let mode = if kind == Kind::View { "ro" } else { "rw" };
    vec![Mount {
        kind: "bind".into(),
        source: format!("/nonexistent/memory-snapshotter/{key}"),
        options: vec!["rbind".into(), mode.into()],
    }]
}

fn committed(snapshots: &BTreeMap<String, Info>, name: &str) -> Result<(), Error> {
    match snapshots.get(name) {
        None => Err(Error::NotFound { key: name.into() }),
        Some(info) if info.kind != Kind::Committed => Err(Error::InvalidArgument {
            key: name.into(),
            reason: "a parent must be committed".into(),
        }),
        Some(_) => Ok(()),
    }
}

fn precondition(key: &str, reason: &str) -> Error {
    Error::FailedPrecondition {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Snapshotter for MemorySnapshotter {
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
        let mut snapshots = self.snapshots.lock().unwrap();
        let info = snapshots
            .get(key)
            .ok_or_else(|| Error::NotFound { key: key.into() })?;
        if info.kind != Kind::Active {
            return Err(precondition(
                key,
                "only an active snapshot can be committed",
            ));
        }
        if snapshots.contains_key(name) {
            return Err(Error::AlreadyExists { key: name.into() });
        }
        if let Some(parent) = parent {
            committed(&snapshots, parent)?;
        }
        let mut info = snapshots.remove(key).expect("looked up above");
        info.kind = Kind::Committed;
        info.name = name.into();
        info.parent = parent.map(str::to_string).or(info.parent);
        info.labels = labels;
        info.updated = SystemTime::now();
        snapshots.insert(name.into(), info);
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), Error> {
        let mut snapshots = self.snapshots.lock().unwrap();
        if !snapshots.contains_key(key) {
            return Err(Error::NotFound { key: key.into() });
        }
        if snapshots.values().any(|i| i.parent.as_deref() == Some(key)) {
            return Err(precondition(key, "has children"));
        }
        snapshots.remove(key);
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<Info, Error> {
        let snapshots = self.snapshots.lock().unwrap();
        snapshots
            .get(key)
            .cloned()
            .ok_or_else(|| Error::NotFound { key: key.into() })
    }

    fn update(&self, info: &Info, fieldpaths: &[&str]) -> Result<Info, Error> {
        if fieldpaths.iter().any(|p| *p != "labels") {
            return Err(Error::InvalidArgument {
                key: info.name.clone(),
                reason: "only labels can be updated here".into(),
            });
        }
        let mut snapshots = self.snapshots.lock().unwrap();
        let stored = snapshots
            .get_mut(&info.name)
            .ok_or_else(|| Error::NotFound {
                key: info.name.clone(),
            })?;
        stored.labels = info.labels.clone();
        stored.updated = SystemTime::now();
        Ok(stored.clone())
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let info = self.stat(key)?;
        if info.kind == Kind::Committed {
            return Err(precondition(key, "a committed snapshot has no mounts"));
        }
        Ok(mounts(key, info.kind))
    }

    fn usage(&self, key: &str) -> Result<Usage, Error> {
        self.stat(key).map(|_| Usage::default())
    }

    fn walk(&self, f: &mut dyn FnMut(&Info)) -> Result<(), Error> {
        let snapshots = self.snapshots.lock().unwrap().clone();
        snapshots.values().for_each(f);
        Ok(())
    }

    fn apply(&self, key: &str, tar: &mut dyn BufRead) -> Result<ApplyStats, Error> {
        if self.stat(key)?.kind != Kind::Active {
            return Err(precondition(key, "only an active snapshot can be written"));
        }
        let bytes = std::io::copy(tar, &mut std::io::sink()).map_err(|source| Error::Io {
            op: "read layer",
            path: key.into(),
            source,
        })?;
        Ok(ApplyStats { entries: 0, bytes })
    }

    fn cleanup(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Memory has no disk to disagree with.
    fn check(&self, _repair: bool) -> Result<Vec<snapshotters::Finding>, Error> {
        Ok(Vec::new())
    }

    fn rebase(&self) -> bool {
        true
    }

    fn root(&self) -> &Path {
        &self.root
    }
}
