//! The mark a rebase that changes a snapshot's tree leaves beside it, from before the change
//! until the commit is in: `started <parent id> <parent key>` while the tree is being
//! changed, `merged <parent id> <parent key>` once it is done, each ending in a newline.
//! It is written whole (a temporary file renamed over it), so a crash leaves the old mark,
//! the new one, or a mark that is refused as damaged.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Error, fsutil};

/// Name of the mark, next to the snapshot's `fs` directory.
pub(crate) const FILE: &str = "rebase";

/// Where a rebase of a snapshot's tree got to.
#[derive(Debug, PartialEq)]
pub(crate) enum Mark {
    /// The tree is being changed, or the change stopped part way.
    Started(Onto),
    /// The tree is the layer on the parent.
    Merged(Onto),
}

/// The committed parent of a rebase.
#[derive(Debug, PartialEq)]
pub(crate) struct Onto {
    pub(crate) id: u64,
    pub(crate) key: String,
}

/// Reads the mark in `dir`: none when there is no file, an error naming it when it is
/// damaged.
pub(crate) fn read(dir: &Path) -> Result<Option<Mark>, Error> {
    let path = dir.join(FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path)(e)),
    };
    parse(&text).map(Some).ok_or_else(|| {
        Error::io("read", &path)(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a damaged rebase mark {text:?}"),
        ))
    })
}

fn parse(text: &str) -> Option<Mark> {
    let mut fields = text.strip_suffix('\n')?.splitn(3, ' ');
    let (state, id, key) = (fields.next()?, fields.next()?, fields.next()?);
    let onto = Onto {
        id: id.parse().ok()?,
        key: key.to_owned(),
    };
    match state {
        "started" => Some(Mark::Started(onto)),
        "merged" => Some(Mark::Merged(onto)),
        _ => None,
    }
}

/// Writes `mark` into `dir`, replacing the one there; on failure the old one stays.
pub(crate) fn write(dir: &Path, mark: &Mark) -> Result<(), Error> {
    let (state, onto) = match mark {
        Mark::Started(onto) => ("started", onto),
        Mark::Merged(onto) => ("merged", onto),
    };
    let temp = dir.join(format!("{FILE}.new"));
    let written = fs::write(&temp, format!("{state} {} {}\n", onto.id, onto.key))
        .map_err(Error::io("write", &temp))
        .and_then(|()| {
            let path = dir.join(FILE);
            fs::rename(&temp, &path).map_err(Error::io("rename into place", path))
        });
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// Removes the mark in `dir`, if there is one, and says where it could not.
pub(crate) fn remove(dir: &Path) -> Result<(), (PathBuf, io::Error)> {
    let path = dir.join(FILE);
    fsutil::remove_file_if_present(&path).map_err(|e| (path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn onto(id: u64, key: &str) -> Onto {
        Onto {
            id,
            key: key.to_owned(),
        }
    }

    #[test]
    fn marks_come_back_as_written_keys_with_spaces_included() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        for mark in [
            Mark::Started(onto(12, "a key with spaces")),
            Mark::Merged(onto(12, "a key with spaces")),
        ] {
            write(dir.path(), &mark).unwrap();
            assert_eq!(read(dir.path()).unwrap(), Some(mark));
        }
        assert!(!dir.path().join("rebase.new").exists());
        remove(dir.path()).unwrap();
        remove(dir.path()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
    }

    #[test]
    fn a_cut_or_unknown_mark_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "",
            "merged 12",
            "merged 12 key",
            "merged x key\n",
            "done 1 k\n",
        ] {
            fs::write(dir.path().join(FILE), text).unwrap();
            let err = read(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains(FILE) && err.contains("damaged"),
                "{text:?}: {err}"
            );
        }
    }
}
