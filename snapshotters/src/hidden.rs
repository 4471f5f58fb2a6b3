//! What a layer applied alone hides of the layers below it, kept beside its tree until the
//! layer is merged onto its parent (native's rebase at commit).
//!
//! The list is written while the layer is applied, one record per whiteout: `h` and the
//! cleaned path a `.wh.<name>` hides, or `o` and the directory a `.wh..wh..opq` makes opaque,
//! each ending in NUL. It goes to a file rather than memory, since a layer may hold any number
//! of whiteouts; the merge keeps only 64-bit hashes of the paths, as the applier does for the
//! paths it wrote.

use std::collections::HashSet;
use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::Error;

/// Name of the list, next to the snapshot's `fs` directory.
pub(crate) const FILE: &str = "hidden";

const HIDE: u8 = b'h';
const OPAQUE: u8 = b'o';

/// Writes the list of one layer application; the file appears with the first record.
pub(crate) struct Recorder {
    path: PathBuf,
    file: Option<BufWriter<File>>,
}

impl Recorder {
    pub(crate) fn new(path: PathBuf) -> Self {
        Recorder { path, file: None }
    }

    /// `path` and everything below it are hidden from the lower layers.
    pub(crate) fn hide(&mut self, path: &[u8]) -> io::Result<()> {
        self.record(HIDE, path)
    }

    /// The lower layers' entries of the directory `path` are hidden, its own stay.
    pub(crate) fn opaque(&mut self, path: &[u8]) -> io::Result<()> {
        self.record(OPAQUE, path)
    }

    fn record(&mut self, tag: u8, path: &[u8]) -> io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(BufWriter::new(File::create(&self.path)?)),
        };
        file.write_all(&[tag])?;
        file.write_all(path)?;
        file.write_all(&[0])
    }

    /// Writes out what is buffered.
    pub(crate) fn finish(self) -> Result<(), Error> {
        match self.file {
            Some(mut file) => file.flush().map_err(Error::io("write", &self.path)),
            None => Ok(()),
        }
    }
}

/// A loaded list, asked about every path of the parent the merge walks.
pub(crate) struct Hidden {
    hidden: HashSet<u64>,
    opaque: HashSet<u64>,
    hasher: RandomState,
}

impl Hidden {
    /// Reads the list at `path`; a missing list hides nothing.
    pub(crate) fn load(path: &Path) -> Result<Hidden, Error> {
        let mut loaded = Hidden {
            hidden: HashSet::new(),
            opaque: HashSet::new(),
            hasher: RandomState::new(),
        };
        let text = match fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(loaded),
            Err(e) => return Err(Error::io("read", path)(e)),
        };
        for record in text.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let hash = loaded.hasher.hash_one(&record[1..]);
            match record[0] {
                HIDE => loaded.hidden.insert(hash),
                OPAQUE => loaded.opaque.insert(hash),
                _ => {
                    let detail = format!("unknown record {:?}", String::from_utf8_lossy(record));
                    return Err(Error::io("read", path)(io::Error::new(
                        io::ErrorKind::InvalidData,
                        detail,
                    )));
                }
            };
        }
        Ok(loaded)
    }

    /// Whether the parent's entry at `path` is hidden, with everything below it.
    pub(crate) fn hides(&self, path: &[u8]) -> bool {
        !self.hidden.is_empty() && self.hidden.contains(&self.hasher.hash_one(path))
    }

    /// Whether the parent's entries of the directory `path` are hidden.
    pub(crate) fn is_opaque(&self, path: &[u8]) -> bool {
        !self.opaque.is_empty() && self.opaque.contains(&self.hasher.hash_one(path))
    }
}

/// Removes the list at `path`, if there is one.
pub(crate) fn remove(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("remove", path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut recorder = Recorder::new(path.clone());
        recorder.hide(b"a/gone").unwrap();
        recorder.opaque(b"").unwrap();
        recorder.opaque(b"d/e").unwrap();
        recorder.finish().unwrap();
        let hidden = Hidden::load(&path).unwrap();
        assert!(hidden.hides(b"a/gone"));
        assert!(!hidden.hides(b"a"));
        assert!(!hidden.hides(b"d/e"));
        assert!(hidden.is_opaque(b""));
        assert!(hidden.is_opaque(b"d/e"));
        assert!(!hidden.is_opaque(b"a/gone"));
        remove(&path).unwrap();
        remove(&path).unwrap();
    }

    #[test]
    fn no_whiteouts_leave_no_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        Recorder::new(path.clone()).finish().unwrap();
        assert!(!path.exists());
        assert!(!Hidden::load(&path).unwrap().hides(b"x"));
    }

    #[test]
    fn a_damaged_list_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        fs::write(&path, b"hx\0zy\0").unwrap();
        let err = Hidden::load(&path).err().unwrap().to_string();
        assert!(err.contains(FILE), "{err}");
    }
}
