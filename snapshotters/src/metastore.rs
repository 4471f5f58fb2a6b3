//! Snapshot metadata in redb, shared by every backend.
//!
//! Each backend gets three tables prefixed `snapshots/<backend>/`: `records` maps a key or
//! name to its [`Record`] (JSON), `children` maps a parent name to its children, and
//! `sequence` holds the last id handed out. Ids come from that sequence and never change, so
//! on-disk directories are named by id and a commit moves no data. Every operation runs in
//! one transaction ([`MetaStore::read`] or [`MetaStore::write`]); a backend does its
//! directory work inside the write closure so the metadata commits only if the disk agrees.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadOnlyTable, ReadableDatabase,
    ReadableMultimapTable, ReadableTable, Table, TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Info, Kind, MetadataError, Usage};

type Records<'a> = TableDefinition<'a, &'static str, &'static [u8]>;
type Children<'a> = MultimapTableDefinition<'a, &'static str, &'static str>;
type Sequence<'a> = TableDefinition<'a, &'static str, u64>;

const SEQUENCE_KEY: &str = "id";

/// What is stored for each snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) id: u64,
    pub(crate) kind: Kind,
    pub(crate) parent: Option<String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) created: SystemTime,
    pub(crate) updated: SystemTime,
    /// Of a Committed snapshot, once measured; `None` before, and while Active or View.
    pub(crate) usage: Option<Usage>,
}

impl Record {
    pub(crate) fn info(&self, key: &str) -> Info {
        Info {
            kind: self.kind,
            name: key.to_owned(),
            parent: self.parent.clone(),
            labels: self.labels.clone(),
            created: self.created,
            updated: self.updated,
        }
    }
}

/// What a backend needs to find a snapshot's directories and build its mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) id: u64,
    pub(crate) kind: Kind,
    /// Ids of the parent chain, nearest parent first.
    pub(crate) parent_ids: Vec<u64>,
}

/// Snapshot metadata of one backend inside a shared database.
pub(crate) struct MetaStore {
    db: Arc<Database>,
    records: String,
    children: String,
    sequence: String,
}

impl MetaStore {
    /// Opens (creating if needed) the tables of `backend`.
    pub(crate) fn open(db: Arc<Database>, backend: &str) -> Result<Self, Error> {
        let store = MetaStore {
            db,
            records: format!("snapshots/{backend}/records"),
            children: format!("snapshots/{backend}/children"),
            sequence: format!("snapshots/{backend}/sequence"),
        };
        store.write(backend, |_| Ok(()))?;
        Ok(store)
    }

    /// Runs `f` in a read transaction. `context` names the key for error messages.
    pub(crate) fn read<T>(
        &self,
        context: &str,
        f: impl FnOnce(&Reader) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let fail = |e: redb::Error| metadata_error(context, e);
        let txn = self.db.begin_read().map_err(|e| fail(e.into()))?;
        let reader = Reader {
            records: txn
                .open_table(self.records_def())
                .map_err(|e| fail(e.into()))?,
        };
        f(&reader)
    }

    /// Runs `f` in a write transaction, committed only if `f` succeeds.
    pub(crate) fn write<T>(
        &self,
        context: &str,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let fail = |e: redb::Error| metadata_error(context, e);
        let txn = self.db.begin_write().map_err(|e| fail(e.into()))?;
        let value = {
            let mut writer = Writer {
                records: txn
                    .open_table(self.records_def())
                    .map_err(|e| fail(e.into()))?,
                children: txn
                    .open_multimap_table(self.children_def())
                    .map_err(|e| fail(e.into()))?,
                sequence: txn
                    .open_table(self.sequence_def())
                    .map_err(|e| fail(e.into()))?,
            };
            f(&mut writer)
        };
        match value {
            Ok(value) => {
                txn.commit().map_err(|e| fail(e.into()))?;
                Ok(value)
            }
            Err(e) => {
                if let Err(abort) = txn.abort() {
                    tracing::warn!(context, error = %abort, "aborting snapshot metadata transaction");
                }
                Err(e)
            }
        }
    }

    fn records_def(&self) -> Records<'_> {
        TableDefinition::new(&self.records)
    }

    fn children_def(&self) -> Children<'_> {
        MultimapTableDefinition::new(&self.children)
    }

    fn sequence_def(&self) -> Sequence<'_> {
        TableDefinition::new(&self.sequence)
    }
}

fn committed(parent: &str, record: Record) -> Result<Record, Error> {
    if record.kind != Kind::Committed {
        return Err(invalid(
            parent,
            &format!("a parent must be committed, this one is {:?}", record.kind),
        ));
    }
    Ok(record)
}

/// A read transaction's view of one backend's tables.
pub(crate) struct Reader {
    records: ReadOnlyTable<&'static str, &'static [u8]>,
}

impl Reader {
    /// The record of `key`, or NotFound.
    pub(crate) fn get(&self, key: &str) -> Result<Record, Error> {
        get(&self.records, key)
    }

    /// The record of `key` with its parent chain resolved to ids.
    pub(crate) fn snapshot(&self, key: &str) -> Result<Snapshot, Error> {
        snapshot(&self.records, key)
    }

    /// Every record, in key order.
    pub(crate) fn all(&self) -> Result<Vec<(String, Record)>, Error> {
        all(&self.records)
    }

    /// The record of `parent`, which must be Committed (else InvalidArgument).
    pub(crate) fn committed_parent(&self, parent: &str) -> Result<Record, Error> {
        committed(parent, self.get(parent)?)
    }
}

/// A write transaction's view of one backend's tables.
pub(crate) struct Writer<'txn> {
    records: Table<'txn, &'static str, &'static [u8]>,
    children: MultimapTable<'txn, &'static str, &'static str>,
    sequence: Table<'txn, &'static str, u64>,
}

impl Writer<'_> {
    /// The record of `key`, or NotFound.
    pub(crate) fn get(&self, key: &str) -> Result<Record, Error> {
        get(&self.records, key)
    }

    /// Ids of every snapshot.
    pub(crate) fn ids(&self) -> Result<HashSet<u64>, Error> {
        Ok(all(&self.records)?.into_iter().map(|(_, r)| r.id).collect())
    }

    /// Creates Active or View `key` on `parent` with a fresh id.
    pub(crate) fn create(
        &mut self,
        key: &str,
        kind: Kind,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot, Error> {
        if key.is_empty() {
            return Err(invalid(key, "an empty key is not allowed"));
        }
        if find(&self.records, key)?.is_some() {
            return Err(Error::AlreadyExists {
                key: key.to_owned(),
            });
        }
        if let Some(parent) = parent {
            self.committed_parent(parent)?;
        }
        let id = self.next_id(key)?;
        let now = SystemTime::now();
        let record = Record {
            id,
            kind,
            parent: parent.map(str::to_owned),
            labels,
            created: now,
            updated: now,
            usage: None,
        };
        self.put(key, &record)?;
        if let Some(parent) = parent {
            self.children
                .insert(parent, key)
                .map_err(|e| metadata_error(key, e.into()))?;
        }
        snapshot(&self.records, key)
    }

    /// Turns Active `key` into Committed `name` with `labels`, keeping its id. `parent` rebases a snapshot prepared without a parent; giving its existing parent
    /// again is accepted.
    pub(crate) fn commit(
        &mut self,
        key: &str,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot, Error> {
        let mut record = self.get(key)?;
        if record.kind != Kind::Active {
            return Err(Error::FailedPrecondition {
                key: key.to_owned(),
                reason: format!(
                    "only an active snapshot can be committed, this one is {:?}",
                    record.kind
                ),
            });
        }
        if name.is_empty() {
            return Err(invalid(name, "an empty name is not allowed"));
        }
        if find(&self.records, name)?.is_some() {
            return Err(Error::AlreadyExists {
                key: name.to_owned(),
            });
        }
        let parent = match (record.parent.as_deref(), parent) {
            (Some(old), Some(new)) if old != new => {
                return Err(invalid(
                    key,
                    &format!("has parent {old:?} and cannot be rebased onto {new:?}"),
                ));
            }
            (_, Some(new)) => {
                self.committed_parent(new)?;
                Some(new.to_owned())
            }
            (old, None) => old.map(str::to_owned),
        };
        if let Some(old) = &record.parent {
            self.children
                .remove(old.as_str(), key)
                .map_err(|e| metadata_error(key, e.into()))?;
        }
        if let Some(parent) = &parent {
            self.children
                .insert(parent.as_str(), name)
                .map_err(|e| metadata_error(name, e.into()))?;
        }
        self.records
            .remove(key)
            .map_err(|e| metadata_error(key, e.into()))?;
        record.kind = Kind::Committed;
        record.parent = parent;
        record.labels = labels;
        record.updated = SystemTime::now();
        self.put(name, &record)?;
        snapshot(&self.records, name)
    }

    /// Keeps `usage`, measured, as the usage of Committed `key`, which never changes.
    pub(crate) fn freeze_usage(&mut self, key: &str, usage: Usage) -> Result<(), Error> {
        let mut record = self.get(key)?;
        if record.kind == Kind::Committed {
            record.usage = Some(usage);
            self.put(key, &record)?;
        }
        Ok(())
    }

    /// Removes `key`, refusing while it has children; returns what was removed.
    pub(crate) fn remove(&mut self, key: &str) -> Result<Record, Error> {
        let record = self.get(key)?;
        if has_children(&self.children, key)? {
            return Err(Error::FailedPrecondition {
                key: key.to_owned(),
                reason: "it has children".to_owned(),
            });
        }
        if let Some(parent) = &record.parent {
            self.children
                .remove(parent.as_str(), key)
                .map_err(|e| metadata_error(key, e.into()))?;
        }
        self.records
            .remove(key)
            .map_err(|e| metadata_error(key, e.into()))?;
        Ok(record)
    }

    /// Changes the labels of `key` as [`crate::Snapshotter::update`] describes.
    pub(crate) fn update_labels(
        &mut self,
        key: &str,
        labels: &BTreeMap<String, String>,
        fieldpaths: &[&str],
    ) -> Result<Record, Error> {
        let mut record = self.get(key)?;
        record.labels = updated_labels(&record.labels, labels, fieldpaths)
            .map_err(|path| invalid(key, &format!("field {path:?} cannot be updated")))?;
        record.updated = SystemTime::now();
        self.put(key, &record)?;
        Ok(record)
    }

    fn committed_parent(&self, parent: &str) -> Result<Record, Error> {
        committed(parent, self.get(parent)?)
    }

    fn next_id(&mut self, key: &str) -> Result<u64, Error> {
        let last = self
            .sequence
            .get(SEQUENCE_KEY)
            .map_err(|e| metadata_error(key, e.into()))?
            .map_or(0, |v| v.value());
        let id = last + 1;
        self.sequence
            .insert(SEQUENCE_KEY, id)
            .map_err(|e| metadata_error(key, e.into()))?;
        Ok(id)
    }

    fn put(&mut self, key: &str, record: &Record) -> Result<(), Error> {
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Metadata {
            key: key.to_owned(),
            source: MetadataError::Record(e),
        })?;
        self.records
            .insert(key, bytes.as_slice())
            .map_err(|e| metadata_error(key, e.into()))?;
        Ok(())
    }
}

/// `current` changed by `fieldpaths`: none or `labels` takes all of `requested`, and
/// `labels.<k>` takes `k` alone (deleting it when `requested` lacks it). Errs with the first
/// path that names anything else.
fn updated_labels<'p>(
    current: &BTreeMap<String, String>,
    requested: &BTreeMap<String, String>,
    fieldpaths: &[&'p str],
) -> Result<BTreeMap<String, String>, &'p str> {
    if fieldpaths.is_empty() {
        return Ok(requested.clone());
    }
    let mut labels = current.clone();
    for path in fieldpaths {
        if *path == "labels" {
            labels = requested.clone();
        } else if let Some(label) = path.strip_prefix("labels.") {
            match requested.get(label) {
                Some(value) => labels.insert(label.to_owned(), value.clone()),
                None => labels.remove(label),
            };
        } else {
            return Err(path);
        }
    }
    Ok(labels)
}

fn find(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>, Error> {
    let Some(guard) = table.get(key).map_err(|e| metadata_error(key, e.into()))? else {
        return Ok(None);
    };
    decode(key, guard.value()).map(Some)
}

fn get(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Record, Error> {
    find(table, key)?.ok_or_else(|| Error::NotFound {
        key: key.to_owned(),
    })
}

fn snapshot(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Snapshot, Error> {
    let record = get(table, key)?;
    let mut parent_ids = Vec::new();
    let mut next = record.parent.clone();
    while let Some(parent) = next {
        let parent_record = get(table, &parent)?;
        parent_ids.push(parent_record.id);
        next = parent_record.parent;
    }
    Ok(Snapshot {
        id: record.id,
        kind: record.kind,
        parent_ids,
    })
}

fn all(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, Record)>, Error> {
    let mut out = Vec::new();
    let context = "all snapshots";
    for item in table
        .iter()
        .map_err(|e| metadata_error(context, e.into()))?
    {
        let (key, value) = item.map_err(|e| metadata_error(context, e.into()))?;
        let key = key.value().to_owned();
        let record = decode(&key, value.value())?;
        out.push((key, record));
    }
    Ok(out)
}

fn has_children(
    table: &impl ReadableMultimapTable<&'static str, &'static str>,
    key: &str,
) -> Result<bool, Error> {
    let mut children = table.get(key).map_err(|e| metadata_error(key, e.into()))?;
    Ok(children.next().is_some())
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Metadata {
        key: key.to_owned(),
        source: MetadataError::Record(e),
    })
}

fn metadata_error(key: &str, source: redb::Error) -> Error {
    Error::Metadata {
        key: key.to_owned(),
        source: MetadataError::Store(source),
    }
}

fn invalid(key: &str, reason: &str) -> Error {
    Error::InvalidArgument {
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let tmp = tempfile::tempdir().unwrap();
        let db = Database::create(tmp.path().join("meta.redb")).unwrap();
        let store = MetaStore::open(Arc::new(db), "test").unwrap();
        (tmp, store)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn create(
        store: &MetaStore,
        key: &str,
        kind: Kind,
        parent: Option<&str>,
    ) -> Result<Snapshot, Error> {
        store.write(key, |tx| tx.create(key, kind, parent, BTreeMap::new()))
    }

    fn commit(
        store: &MetaStore,
        key: &str,
        name: &str,
        parent: Option<&str>,
    ) -> Result<Snapshot, Error> {
        store.write(key, |tx| tx.commit(key, name, parent, BTreeMap::new()))
    }

    fn chain(store: &MetaStore) {
        create(store, "a-key", Kind::Active, None).unwrap();
        commit(store, "a-key", "a", None).unwrap();
        create(store, "b-key", Kind::Active, Some("a")).unwrap();
        commit(store, "b-key", "b", None).unwrap();
    }

    #[test]
    fn ids_come_from_a_sequence_and_parents_resolve_nearest_first() {
        let (_tmp, store) = store();
        chain(&store);
        let c = create(&store, "c", Kind::Active, Some("b")).unwrap();
        assert_eq!(
            c,
            Snapshot {
                id: 3,
                kind: Kind::Active,
                parent_ids: vec![2, 1]
            }
        );
    }

    #[test]
    fn create_reports_taken_keys_and_bad_parents() {
        let (_tmp, store) = store();
        chain(&store);
        create(&store, "active", Kind::Active, Some("b")).unwrap();
        assert!(
            matches!(create(&store, "active", Kind::View, None), Err(Error::AlreadyExists { key }) if key == "active")
        );
        assert!(
            matches!(create(&store, "x", Kind::Active, Some("missing")), Err(Error::NotFound { key }) if key == "missing")
        );
        assert!(matches!(
            create(&store, "x", Kind::Active, Some("active")),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            create(&store, "", Kind::Active, None),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            store.read("x", |r| r.get("x")),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn commit_keeps_the_id_takes_new_labels_and_usage_is_frozen_once_measured() {
        let (_tmp, store) = store();
        store
            .write("k", |tx| {
                tx.create("k", Kind::Active, None, labels(&[("old", "1")]))
            })
            .unwrap();
        let usage = Usage {
            size: 4096,
            inodes: 3,
        };
        store.write("k", |tx| tx.freeze_usage("k", usage)).unwrap();
        assert_eq!(store.read("k", |r| r.get("k")).unwrap().usage, None);
        let committed = store
            .write("k", |tx| tx.commit("k", "n", None, labels(&[("new", "2")])))
            .unwrap();
        assert_eq!(committed.id, 1);
        let record = store.read("n", |r| r.get("n")).unwrap();
        assert_eq!(record.kind, Kind::Committed);
        assert_eq!(record.labels, labels(&[("new", "2")]));
        assert_eq!(record.usage, None);
        store.write("n", |tx| tx.freeze_usage("n", usage)).unwrap();
        assert_eq!(store.read("n", |r| r.get("n")).unwrap().usage, Some(usage));
        assert!(matches!(
            store.read("k", |r| r.get("k")),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn a_failed_commit_leaves_the_key_active() {
        let (_tmp, store) = store();
        chain(&store);
        create(&store, "k", Kind::Active, Some("b")).unwrap();
        assert!(
            matches!(commit(&store, "k", "a", None), Err(Error::AlreadyExists { key }) if key == "a")
        );
        assert_eq!(store.read("k", |r| r.get("k")).unwrap().kind, Kind::Active);

        create(&store, "v", Kind::View, Some("b")).unwrap();
        assert!(matches!(
            commit(&store, "v", "v2", None),
            Err(Error::FailedPrecondition { .. })
        ));
        assert!(matches!(
            commit(&store, "missing", "m", None),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn rebasing_commit_attaches_the_parent() {
        let (_tmp, store) = store();
        chain(&store);
        create(&store, "layer", Kind::Active, None).unwrap();
        let committed = commit(&store, "layer", "c", Some("b")).unwrap();
        assert_eq!(committed.parent_ids, vec![2, 1]);
        assert_eq!(
            store.read("c", |r| r.get("c")).unwrap().parent.as_deref(),
            Some("b")
        );
        assert!(matches!(
            store.write("b", |tx| tx.remove("b")),
            Err(Error::FailedPrecondition { .. })
        ));

        create(&store, "other", Kind::Active, Some("a")).unwrap();
        assert!(matches!(
            commit(&store, "other", "d", Some("b")),
            Err(Error::InvalidArgument { .. })
        ));
        commit(&store, "other", "d", Some("a")).unwrap();

        create(&store, "orphan", Kind::Active, None).unwrap();
        assert!(matches!(
            commit(&store, "orphan", "e", Some("missing")),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn remove_refuses_parents_until_children_are_gone() {
        let (_tmp, store) = store();
        chain(&store);
        assert!(matches!(
            store.write("a", |tx| tx.remove("a")),
            Err(Error::FailedPrecondition { .. })
        ));
        assert_eq!(store.write("b", |tx| tx.remove("b")).unwrap().id, 2);
        store.write("a", |tx| tx.remove("a")).unwrap();
        assert!(store.read("all", |r| r.all()).unwrap().is_empty());
        assert!(matches!(
            store.write("a", |tx| tx.remove("a")),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn ids_are_never_reused_even_after_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(tmp.path().join("meta.redb")).unwrap());
        let store = MetaStore::open(db.clone(), "test").unwrap();
        create(&store, "x", Kind::Active, None).unwrap();
        store.write("x", |tx| tx.remove("x")).unwrap();
        drop(store);
        let store = MetaStore::open(db.clone(), "test").unwrap();
        assert_eq!(create(&store, "y", Kind::Active, None).unwrap().id, 2);
        let other = MetaStore::open(db, "other").unwrap();
        assert_eq!(create(&other, "y", Kind::Active, None).unwrap().id, 1);
    }

    #[test]
    fn label_updates_follow_field_paths() {
        let current = labels(&[("a", "1"), ("b", "2")]);
        let requested = labels(&[("a", "9"), ("c", "3")]);
        assert_eq!(
            updated_labels(&current, &requested, &[]).unwrap(),
            requested
        );
        assert_eq!(
            updated_labels(&current, &requested, &["labels"]).unwrap(),
            requested
        );
        assert_eq!(
            updated_labels(&current, &requested, &["labels.a", "labels.b"]).unwrap(),
            labels(&[("a", "9")])
        );
        assert_eq!(
            updated_labels(&current, &requested, &["parent"]),
            Err("parent")
        );
    }
}
