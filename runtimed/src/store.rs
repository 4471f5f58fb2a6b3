//! Records that must survive a restart of runtimed, one JSON file per object under a
//! directory, each written to a temporary name, synced and renamed into place, so a crash
//! leaves the old record or the new one, never a torn file.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A directory of `<id>.json` records.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The records under `dir`, created if missing.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Writes record `id` atomically.
    pub fn put<T: Serialize>(&self, id: &str, record: &T) -> std::io::Result<()> {
        let path = self.path(id);
        let temporary = self.dir.join(format!(".{id}.json.tmp"));
        let mut file = std::fs::File::create(&temporary)?;
        serde_json::to_writer_pretty(&mut file, record)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Deletes record `id`; absent is fine.
    pub fn delete(&self, id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every record, with the files that could not be read named in the log and skipped;
    /// temporary files of an interrupted write are removed.
    pub fn load<T: DeserializeOwned>(&self) -> std::io::Result<Vec<T>> {
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(".json.tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match read(&path) {
                Ok(record) => records.push(record),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "skipping record"),
            }
        }
        Ok(records)
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }
}

fn read<T: DeserializeOwned>(path: &Path) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    Ok(serde_json::from_slice(&bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_leftovers_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        store.put("a", &serde_json::json!({"n": 1})).unwrap();
        store.put("a", &serde_json::json!({"n": 2})).unwrap();
        store.put("b", &serde_json::json!({"n": 3})).unwrap();
        std::fs::write(dir.path().join("s/.c.json.tmp"), "{").unwrap();
        std::fs::write(dir.path().join("s/d.json"), "torn").unwrap();
        let mut loaded: Vec<serde_json::Value> = store.load().unwrap();
        loaded.sort_by_key(|v| v["n"].as_u64());
        assert_eq!(
            loaded,
            [serde_json::json!({"n": 2}), serde_json::json!({"n": 3})]
        );
        assert!(!dir.path().join("s/.c.json.tmp").exists());
        store.delete("a").unwrap();
        store.delete("a").unwrap();
        assert_eq!(store.load::<serde_json::Value>().unwrap().len(), 1);
    }
}
