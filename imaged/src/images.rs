//! Image records and the names that point at them, kept in redb and mirrored in memory so
//! that ListImages and ImageStatus never touch the disk.

use crate::digest::Digest;
use crate::reference::Reference;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    /// redb failed.
    #[error("image metadata: {0}")]
    Db(String),
    /// A stored record could not be decoded.
    #[error("image metadata record {id}: {message}")]
    Corrupt {
        /// Record key.
        id: String,
        /// Decoder message.
        message: String,
    },
    /// An ID prefix matches several images.
    #[error("image id prefix {0:?} is ambiguous")]
    Ambiguous(String),
}

fn db_err(e: impl std::fmt::Display) -> ImageStoreError {
    ImageStoreError::Db(e.to_string())
}

/// One layer of a stored image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// Compressed blob digest.
    pub digest: Digest,
    /// Uncompressed digest.
    pub diff_id: Digest,
    /// Chain ID: the snapshot name.
    pub chain_id: Digest,
    /// Compressed size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// The descriptor's annotations (encrypted layers carry their wrapped keys here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl LayerRecord {
    /// The layer as the processors see it.
    pub fn descriptor(&self) -> processors::Layer<'_> {
        processors::Layer {
            media_type: &self.media_type,
            digest: self.digest.as_str(),
            size: self.size,
            annotations: &self.annotations,
        }
    }
}

/// A stored image (one platform).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// Image ID: the config digest.
    pub id: Digest,
    /// The platform manifest.
    pub manifest: Digest,
    /// The index the manifest was chosen from, if any.
    pub index: Option<Digest>,
    /// Layers, base first.
    pub layers: Vec<LayerRecord>,
    /// Bytes of index + manifest + config + layers.
    pub size: u64,
    /// Numeric user from the config.
    pub uid: Option<i64>,
    /// Named user from the config.
    pub username: String,
}

impl ImageRecord {
    /// Every blob this image needs.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.id, &self.manifest]
            .into_iter()
            .chain(self.index.iter())
            .chain(self.layers.iter().map(|l| &l.digest))
    }

    /// The layer blobs and chain IDs an unpack of this image holds from the collector.
    pub fn layer_leases(&self) -> impl Iterator<Item = Digest> + '_ {
        self.layers
            .iter()
            .flat_map(|l| [l.digest.clone(), l.chain_id.clone()])
    }

    /// The top snapshot: the chain ID of the last layer.
    pub fn top_chain(&self) -> Option<&Digest> {
        self.layers.last().map(|l| &l.chain_id)
    }
}

/// An image with the names that point at it.
#[derive(Debug, Clone)]
pub struct NamedImage {
    /// The record.
    pub record: Arc<ImageRecord>,
    /// `name:tag` names, sorted.
    pub tags: Vec<String>,
    /// `name@digest` names, sorted.
    pub digests: Vec<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Every image with its names, sorted by id (the order ListImages answers in). The
    /// names are kept here rather than looked up per call, so listing does no lookups.
    images: BTreeMap<Digest, Arc<NamedImage>>,
    names: BTreeMap<String, Digest>,
    /// Counts the changes to the two maps, for whoever keeps something made from them.
    generation: u64,
}

impl State {
    fn set_name(&mut self, name: String, id: Digest) {
        if let Some(old) = self.names.insert(name.clone(), id.clone())
            && old != id
        {
            self.edit(&old, |named| {
                named.tags.retain(|n| *n != name);
                named.digests.retain(|n| *n != name);
            });
        }
        self.edit(&id, |named| {
            let list = match name.contains('@') {
                true => &mut named.digests,
                false => &mut named.tags,
            };
            if let Err(at) = list.binary_search(&name) {
                list.insert(at, name);
            }
        });
    }

    /// Changes the names of image `id`, if it is stored.
    fn edit(&mut self, id: &Digest, change: impl FnOnce(&mut NamedImage)) {
        if let Some(named) = self.images.get_mut(id) {
            change(Arc::make_mut(named));
        }
    }

    /// Stores `record`, keeping the names an earlier record with the same id had.
    fn insert(&mut self, record: ImageRecord) {
        let id = record.id.clone();
        let record = Arc::new(record);
        match self.images.get_mut(&id) {
            Some(named) => Arc::make_mut(named).record = record,
            None => {
                self.images.insert(
                    id,
                    Arc::new(NamedImage {
                        record,
                        tags: Vec::new(),
                        digests: Vec::new(),
                    }),
                );
            }
        }
    }
}

/// Images and names, persisted in redb.
#[derive(Debug)]
pub struct ImageStore {
    db: Arc<Database>,
    state: RwLock<State>,
}

impl ImageStore {
    /// Loads every record into memory.
    pub fn open(db: Arc<Database>) -> Result<Self, ImageStoreError> {
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(IMAGES).map_err(db_err)?;
        txn.open_table(NAMES).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        let mut state = State::default();
        let read = db.begin_read().map_err(db_err)?;
        for row in read
            .open_table(IMAGES)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (key, value) = row.map_err(db_err)?;
            let record: ImageRecord =
                serde_json::from_slice(value.value()).map_err(|e| ImageStoreError::Corrupt {
                    id: key.value().to_string(),
                    message: e.to_string(),
                })?;
            state.insert(record);
        }
        for row in read
            .open_table(NAMES)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (name, id) = row.map_err(db_err)?;
            let id = Digest::parse(id.value()).map_err(|e| ImageStoreError::Corrupt {
                id: name.value().to_string(),
                message: e.to_string(),
            })?;
            state.set_name(name.value().to_string(), id);
        }
        drop(read);
        Ok(Self {
            db,
            state: RwLock::new(state),
        })
    }

    /// Stores `record` and points `names` at it, in one transaction. A name that pointed at
    /// another image moves; that image stays, possibly untagged.
    pub fn put(&self, record: &ImageRecord, names: &[String]) -> Result<(), ImageStoreError> {
        if self.holds(record, names) {
            return Ok(());
        }
        let encoded = serde_json::to_vec(record).expect("image record serialises");
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut images = txn.open_table(IMAGES).map_err(db_err)?;
            images
                .insert(record.id.as_str(), encoded.as_slice())
                .map_err(db_err)?;
            let mut table = txn.open_table(NAMES).map_err(db_err)?;
            for name in names {
                table
                    .insert(name.as_str(), record.id.as_str())
                    .map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        let mut state = self.state.write().expect("image state");
        state.insert(record.clone());
        for name in names {
            state.set_name(name.clone(), record.id.clone());
        }
        state.generation += 1;
        Ok(())
    }

    /// Whether `record` is stored as it is and every name already points at it: a pull of
    /// an image already present then writes nothing.
    fn holds(&self, record: &ImageRecord, names: &[String]) -> bool {
        let state = self.state.read().expect("image state");
        state
            .images
            .get(&record.id)
            .is_some_and(|n| *n.record == *record)
            && names.iter().all(|n| state.names.get(n) == Some(&record.id))
    }

    /// Finds an image by name, digest reference, full ID or unique ID prefix.
    pub fn lookup(&self, text: &str) -> Result<Option<Arc<NamedImage>>, ImageStoreError> {
        let state = self.state.read().expect("image state");
        if let Ok(reference) = Reference::parse(text) {
            // A parsed reference prints as the name it is recorded under: `name:tag`, or
            // `name@digest` (a tag next to a digest is dropped by the parser).
            if let Some(id) = state.names.get(&reference.to_string()) {
                return Ok(state.images.get(id).cloned());
            }
        }
        let prefix = text.strip_prefix("sha256:").unwrap_or(text);
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let prefix = prefix.to_ascii_lowercase();
        let mut matches = state
            .images
            .values()
            .filter(|n| n.record.id.hex().starts_with(&prefix));
        match (matches.next(), matches.next()) {
            (Some(named), None) => Ok(Some(named.clone())),
            (Some(_), Some(_)) => Err(ImageStoreError::Ambiguous(text.to_string())),
            (None, _) => Ok(None),
        }
    }

    /// Every image with its names, by id.
    pub fn list(&self) -> Vec<Arc<NamedImage>> {
        let state = self.state.read().expect("image state");
        state.images.values().cloned().collect()
    }

    /// Grows with every change of images or names: what was made from a [`list`] taken
    /// after reading it holds while it stays the same.
    ///
    /// [`list`]: ImageStore::list
    pub fn generation(&self) -> u64 {
        self.state.read().expect("image state").generation
    }

    /// Removes an image and every name pointing at it.
    pub fn remove(&self, id: &Digest) -> Result<(), ImageStoreError> {
        let names: Vec<String> = {
            let state = self.state.read().expect("image state");
            state
                .images
                .get(id)
                .map(|n| n.tags.iter().chain(&n.digests).cloned().collect())
                .unwrap_or_default()
        };
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut images = txn.open_table(IMAGES).map_err(db_err)?;
            images.remove(id.as_str()).map_err(db_err)?;
            let mut table = txn.open_table(NAMES).map_err(db_err)?;
            for name in &names {
                table.remove(name.as_str()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        let mut state = self.state.write().expect("image state");
        state.images.remove(id);
        for name in &names {
            state.names.remove(name);
        }
        state.generation += 1;
        Ok(())
    }

    /// Blob digests and chain IDs still used by some image.
    pub fn referenced(&self) -> (HashSet<Digest>, HashSet<Digest>) {
        let state = self.state.read().expect("image state");
        let mut blobs = HashSet::new();
        let mut chains = HashSet::new();
        for record in state.images.values().map(|n| &n.record) {
            blobs.extend(record.blobs().cloned());
            chains.extend(record.layers.iter().map(|l| l.chain_id.clone()));
        }
        (blobs, chains)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seed: &[u8]) -> ImageRecord {
        ImageRecord {
            id: Digest::of(seed),
            manifest: Digest::of(&[seed, b"m"].concat()),
            index: None,
            layers: vec![],
            size: 10,
            uid: None,
            username: String::new(),
        }
    }

    fn store() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("meta.redb")).unwrap());
        (dir, ImageStore::open(db).unwrap())
    }

    #[test]
    fn lookup_by_every_name_and_id_prefix() {
        let (_dir, store) = store();
        let a = record(b"a");
        let digest_name = format!("docker.io/library/busybox@{}", a.manifest);
        store
            .put(
                &a,
                &[
                    "docker.io/library/busybox:latest".into(),
                    digest_name.clone(),
                ],
            )
            .unwrap();
        for text in [
            "busybox",
            "busybox:latest",
            "docker.io/library/busybox:latest",
            digest_name.as_str(),
            a.id.as_str(),
            a.id.hex(),
            &a.id.hex()[..12],
            &a.id.as_str()[..19],
        ] {
            let found = store.lookup(text).unwrap().expect(text);
            assert_eq!(found.record.id, a.id, "{text}");
        }
        assert!(store.lookup(a.manifest.as_str()).unwrap().is_none());
        assert!(store.lookup("nope").unwrap().is_none());
        assert!(store.lookup("").unwrap().is_none());
    }

    #[test]
    fn moved_tag_leaves_old_image_untagged_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let (a, b) = (record(b"a"), record(b"b"));
        {
            let store = ImageStore::open(Arc::new(Database::create(&path).unwrap())).unwrap();
            store
                .put(&a, &["r.io/x:1".into(), "r.io/x:2".into()])
                .unwrap();
            store.put(&b, &["r.io/x:1".into()]).unwrap();
        }
        let store = ImageStore::open(Arc::new(Database::create(&path).unwrap())).unwrap();
        let old = store.lookup(a.id.as_str()).unwrap().unwrap();
        assert_eq!(old.tags, ["r.io/x:2"]);
        let new = store.lookup("r.io/x:1").unwrap().unwrap();
        assert_eq!(new.record.id, b.id);
        store.remove(&b.id).unwrap();
        assert!(store.lookup("r.io/x:1").unwrap().is_none());
        assert_eq!(store.list().len(), 1);
    }
}
