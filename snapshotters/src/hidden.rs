//! What a layer applied alone hides of the layers below it, kept beside its tree until the
//! layer is merged onto its parent (native's rebase at commit).
//!
//! The list is written while the layer is applied, one record per whiteout: `h` and the
//! cleaned path a `.wh.<name>` hides, or `o` and the directory a `.wh..wh..opq` makes opaque,
//! each ending in NUL. It goes to a file rather than memory, since a layer may hold any number
//! of whiteouts, and is read back as a stream; the merge keeps only 64-bit hashes of the
//! paths, as the applier does for the paths it wrote.

use std::collections::HashSet;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::{Error, LayerError};

/// Name of the list, next to the snapshot's `fs` directory.
pub(crate) const FILE: &str = "hidden";

const HIDE: u8 = b'h';
const OPAQUE: u8 = b'o';
const THROUGH_SYMLINK: u8 = b's';

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

    /// A whiteout in the directory `path` runs through a symlink of the layer's own: what
    /// it hides lies where the symlink leads, which only the parent's tree shows, so the
    /// layer cannot be merged onto a parent.
    pub(crate) fn through_symlink(&mut self, path: &[u8]) -> io::Result<()> {
        self.record(THROUGH_SYMLINK, path)
    }

    fn record(&mut self, tag: u8, path: &[u8]) -> io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            // Appended to: a second layer applied into the snapshot keeps the first's.
            None => {
                let file = File::options().create(true).append(true).open(&self.path)?;
                self.file.insert(BufWriter::new(file))
            }
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
    /// Reads the list at `hidden_list` of a layer about to be merged onto `lower`, and
    /// fails with [`LayerError::NeedsParent`] when a path the layer names, there or in
    /// `implied_list` (directories it created without naming them, see
    /// [`crate::implicit`]), runs through a non-directory of `lower`: applied onto a copy
    /// of `lower` the layer would have followed a symlink there, or replaced a file, which
    /// a merge of the trees cannot do. Missing lists name nothing.
    pub(crate) fn for_merge(
        lower: &Path,
        hidden_list: &Path,
        implied_list: &Path,
    ) -> Result<Hidden, Error> {
        let reach = Reach::open(lower)?;
        let mut loaded = Hidden {
            hidden: HashSet::new(),
            opaque: HashSet::new(),
            hasher: RandomState::new(),
        };
        for_each_record(hidden_list, |tag, path| {
            if tag == THROUGH_SYMLINK {
                return Err(needs_parent(path));
            }
            // A whiteout's last component may be anything; an opaque directory is entered.
            reach.check(path, tag == OPAQUE)?;
            let hash = loaded.hasher.hash_one(path);
            match tag {
                HIDE => loaded.hidden.insert(hash),
                _ => loaded.opaque.insert(hash),
            };
            Ok(())
        })?;
        for_each_path(implied_list, |path| reach.check(path, true))?;
        Ok(loaded)
    }

    /// Whether a whiteout hides some path; an opaque directory aside, which is the
    /// layer's own.
    pub(crate) fn hides_any(&self) -> bool {
        !self.hidden.is_empty()
    }

    /// Whether the parent's entry at `path` is hidden, with everything below it.
    pub(crate) fn hides(&self, path: &[u8]) -> bool {
        !self.hidden.is_empty() && self.hidden.contains(&self.hasher.hash_one(path))
    }

    /// Whether the parent's entries of the directory `path` are hidden.
    pub(crate) fn is_opaque(&self, path: &[u8]) -> bool {
        !self.opaque.is_empty() && self.opaque.contains(&self.hasher.hash_one(path))
    }

    /// Whether what the parent has at `path` is out of sight: hidden itself, or below a
    /// hidden or opaque directory.
    pub(crate) fn covers(&self, path: &[u8]) -> bool {
        if self.hides(path) {
            return true;
        }
        let mut above = path;
        while let Some(end) = above.iter().rposition(|b| *b == b'/') {
            above = &above[..end];
            if self.hides(above) || self.is_opaque(above) {
                return true;
            }
        }
        !path.is_empty() && self.is_opaque(b"")
    }
}

/// The tree a layer's paths are followed in, to find those that run through a
/// non-directory.
struct Reach<'a> {
    tree: &'a Path,
    root: OwnedFd,
}

impl<'a> Reach<'a> {
    fn open(tree: &'a Path) -> Result<Self, Error> {
        let root = rustix::fs::open(
            tree,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", tree)(e.into()))?;
        Ok(Reach { tree, root })
    }

    /// Fails with [`LayerError::NeedsParent`] when `path`, or all of it but its last
    /// component unless `whole`, meets a non-directory.
    fn check(&self, path: &[u8], whole: bool) -> Result<(), Error> {
        let components: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
        let upto = components.len() - usize::from(!whole);
        match first_non_directory(&self.root, &components[..upto]) {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(needs_parent(path)),
            Err(e) => Err(Error::io(
                "inspect",
                self.tree.join(String::from_utf8_lossy(path).as_ref()),
            )(e)),
        }
    }
}

fn needs_parent(path: &[u8]) -> Error {
    let lossy = String::from_utf8_lossy(path).into_owned();
    Error::Layer {
        path: lossy.clone(),
        reason: LayerError::NeedsParent { target: lossy },
    }
}

/// The type of the first thing that is not a directory that `components`, followed from
/// `root`, meet before they run out or reach a name that does not exist.
pub(crate) fn first_non_directory(
    root: &impl AsFd,
    components: &[&[u8]],
) -> io::Result<Option<FileType>> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut dir: Option<OwnedFd> = None;
    for name in components.iter().filter(|name| !name.is_empty()) {
        let at = dir.as_ref().map_or(root.as_fd(), AsFd::as_fd);
        match rustix::fs::openat(at, *name, flags, Mode::empty()) {
            Ok(next) => dir = Some(next),
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::NOTDIR | Errno::LOOP) => {
                let stat = rustix::fs::statat(at, *name, AtFlags::SYMLINK_NOFOLLOW)?;
                return Ok(Some(FileType::from_raw_mode(stat.st_mode)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Calls `f` with each record's tag and path, reading the list as a stream; a missing list
/// has none.
fn for_each_record(
    path: &Path,
    mut f: impl FnMut(u8, &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    for_each_path(path, |record| match record.split_first() {
        Some((&tag, rest)) if [HIDE, OPAQUE, THROUGH_SYMLINK].contains(&tag) => f(tag, rest),
        _ => Err(Error::io("read", path)(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown record {:?}", String::from_utf8_lossy(record)),
        ))),
    })
}

/// Calls `f` with each NUL-terminated entry of the file at `path`; a missing file has none.
fn for_each_path(path: &Path, mut f: impl FnMut(&[u8]) -> Result<(), Error>) -> Result<(), Error> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read", path)(e)),
    };
    let mut reader = BufReader::new(file);
    let mut entry = Vec::new();
    loop {
        entry.clear();
        let read = reader
            .read_until(0, &mut entry)
            .map_err(Error::io("read", path))?;
        if read == 0 {
            return Ok(());
        }
        if entry.last() == Some(&0) {
            entry.pop();
        }
        if !entry.is_empty() {
            f(&entry)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Loads the list at `path` for a merge onto the (empty but for it) directory it is in.
    fn load(path: &Path) -> Result<Hidden, Error> {
        let dir = path.parent().unwrap();
        Hidden::for_merge(dir, path, &dir.join("no-implied-list"))
    }

    #[test]
    fn records_come_back_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut recorder = Recorder::new(path.clone());
        recorder.hide(b"a/gone").unwrap();
        recorder.opaque(b"d/e").unwrap();
        recorder.finish().unwrap();
        let hidden = load(&path).unwrap();
        assert!(hidden.hides_any());
        assert!(hidden.hides(b"a/gone"));
        assert!(!hidden.hides(b"a"));
        assert!(!hidden.hides(b"d/e"));
        assert!(hidden.is_opaque(b"d/e"));
        assert!(!hidden.is_opaque(b"a/gone"));
        assert!(hidden.covers(b"a/gone"));
        assert!(hidden.covers(b"a/gone/deeper"));
        assert!(hidden.covers(b"d/e/f"));
        assert!(!hidden.covers(b"d/e"));
        assert!(!hidden.covers(b"a"));
    }

    #[test]
    fn an_opaque_root_covers_everything_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let mut recorder = Recorder::new(path.clone());
        recorder.opaque(b"").unwrap();
        recorder.finish().unwrap();
        let hidden = load(&path).unwrap();
        assert!(hidden.is_opaque(b""));
        assert!(!hidden.hides_any());
        assert!(hidden.covers(b"x"));
        assert!(hidden.covers(b"x/y"));
        assert!(!hidden.covers(b""));
    }

    #[test]
    fn no_whiteouts_leave_no_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        Recorder::new(path.clone()).finish().unwrap();
        assert!(!path.exists());
        assert!(!load(&path).unwrap().hides_any());
    }

    #[test]
    fn a_damaged_list_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        fs::write(&path, b"hx\0zy\0").unwrap();
        let err = load(&path).err().unwrap().to_string();
        assert!(err.contains(FILE), "{err}");
    }

    #[test]
    fn paths_through_a_lower_symlink_or_file_need_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        fs::create_dir_all(lower.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", lower.join("bin")).unwrap();
        fs::write(lower.join("file"), b"f").unwrap();
        let (hidden, implied) = (dir.path().join(FILE), dir.path().join("implied"));
        let reach = |records: &[u8], implied_dirs: &[u8]| {
            fs::write(&hidden, records).unwrap();
            fs::write(&implied, implied_dirs).unwrap();
            Hidden::for_merge(&lower, &hidden, &implied).map(|_| ())
        };
        reach(b"husr/bin/x\0hbin\0hmissing/x\0", b"usr\0new/dir\0").unwrap();
        for (records, implied_dirs, target) in [
            (&b"hbin/x\0"[..], &b""[..], "bin/x"),
            (b"obin\0", b"", "bin"),
            (b"hfile/x\0", b"", "file/x"),
            (b"", b"usr\0bin\0", "bin"),
            (b"", b"file/sub\0", "file/sub"),
            (b"hmissing/x\0slib\0", b"", "lib"),
        ] {
            match reach(records, implied_dirs) {
                Err(Error::Layer {
                    reason: LayerError::NeedsParent { target: t },
                    ..
                }) => assert_eq!(t, target),
                other => panic!("{target}: {other:?}"),
            }
        }
    }
}
