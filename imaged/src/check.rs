//! `imaged check`: every blob against its digest, every image against the parts it needs,
//! every snapshotter's metadata against its disk, and what crashes leave behind (partial
//! downloads, unpacks that never finished). With repair, what cannot be trusted goes:
//! corrupt blobs, images missing parts, broken snapshots, leftovers; the garbage collector
//! then takes what only those images used, and the images pull again.

use crate::content::ContentStore;
use crate::digest::Digest;
use crate::images::{ImageStore, NamedImage};
use crate::pull::EXTRACT_KEY_PREFIX;
use serde::Serialize;
use snapshotters::{Kind, Snapshotter};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What it is about: `blob <digest>`, `image <id> (<name>)`, `<snapshotter> snapshot
    /// <key>`, or a path.
    pub subject: String,
    /// What is wrong with it.
    pub problem: String,
    /// Whether repair removed it.
    pub repaired: bool,
}

/// Why a check could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A directory of the store could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A snapshotter's metadata could not be read.
    #[error("snapshotter {name}: {source}")]
    Snapshotter {
        /// Its name.
        name: String,
        /// Cause.
        source: snapshotters::Error,
    },
}

/// The stores a check looks at.
pub struct Store {
    /// Blobs and partial downloads.
    pub content: Arc<ContentStore>,
    /// Image records.
    pub images: Arc<ImageStore>,
    /// The configured snapshotter first, then the others that hold snapshots.
    pub snapshotters: Vec<Arc<dyn Snapshotter>>,
    /// Whether a daemon is working on the store: then its partial downloads and unpacks in
    /// progress belong to running pulls and are not leftovers.
    pub live: bool,
}

/// Checks the store and, with `repair`, removes what cannot be trusted.
pub fn run(store: &Store, repair: bool) -> Result<Vec<Problem>, CheckError> {
    let mut problems = Vec::new();
    let declared = declared_sizes(&store.images.list());
    let bad = check_blobs(&store.content, &declared, repair, &mut problems)?;
    check_ingest(store, repair, &mut problems)?;
    check_partials(&store.content, &declared, repair, &mut problems)?;
    let mut broken = HashSet::new();
    for (i, snapshotter) in store.snapshotters.iter().enumerate() {
        let found = check_snapshots(snapshotter.as_ref(), store.live, repair, &mut problems)?;
        if i == 0 {
            broken = found;
        }
    }
    check_images(store, &bad, &broken, repair, &mut problems)?;
    Ok(problems)
}

/// Layer sizes as image records declare them.
fn declared_sizes(images: &[Arc<NamedImage>]) -> HashMap<Digest, u64> {
    images
        .iter()
        .flat_map(|image| image.record.layers.iter())
        .map(|layer| (layer.digest.clone(), layer.size))
        .collect()
}

/// Hashes every blob; returns the digests whose content is wrong.
fn check_blobs(
    content: &ContentStore,
    declared: &HashMap<Digest, u64>,
    repair: bool,
    problems: &mut Vec<Problem>,
) -> Result<HashSet<Digest>, CheckError> {
    let mut bad = HashSet::new();
    for path in entries(content.blobs_dir())? {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
            let problem = "not a blob: its name is no sha256 digest".to_string();
            problems.push(removal(path.display().to_string(), problem, &path, repair));
            continue;
        };
        let Some(problem) = blob_problem(&path, &digest, declared.get(&digest)) else {
            continue;
        };
        let repaired = repair && content.delete(&digest).is_ok();
        problems.push(Problem {
            subject: format!("blob {digest}"),
            problem,
            repaired,
        });
        bad.insert(digest);
    }
    Ok(bad)
}

/// What is wrong with one blob file, if anything.
fn blob_problem(path: &Path, digest: &Digest, declared: Option<&u64>) -> Option<String> {
    let (actual, size) = match hash_file(path) {
        Ok(hashed) => hashed,
        // Collected meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("it cannot be read: {e}")),
    };
    if &actual != digest {
        return Some(format!("its content hashes to {actual}"));
    }
    match declared {
        Some(&expected) if expected != size => Some(format!(
            "it holds {size} bytes, its image declares {expected}"
        )),
        _ => None,
    }
}

fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    crate::content::hash_file(path).map(|(hasher, size)| (Digest::from_hasher(hasher), size))
}

/// Partial downloads: leftovers of a process that stopped, unless this one is running them.
fn check_ingest(
    store: &Store,
    repair: bool,
    problems: &mut Vec<Problem>,
) -> Result<(), CheckError> {
    let own = format!("-{}-", std::process::id());
    for path in entries(store.content.ingest_dir())? {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if store.live && name.contains(&own) {
            continue;
        }
        let data = path.join("data");
        let size = fs::metadata(&data).map_or(0, |m| m.len());
        let problem = format!("a download left behind ({size} bytes)");
        // Repaired as a start does it: its bytes are kept for the next download of the blob.
        let digest = name
            .split('-')
            .next()
            .and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
        if repair && let Some(digest) = &digest {
            store.content.keep_partial(digest, &data);
        }
        problems.push(removal(path.display().to_string(), problem, &path, repair));
    }
    Ok(())
}

/// Partial downloads kept for the next one must be named by a digest and be shorter than
/// the blob images declare; their bytes cannot be checked before the rest arrives.
fn check_partials(
    content: &ContentStore,
    declared: &HashMap<Digest, u64>,
    repair: bool,
    problems: &mut Vec<Problem>,
) -> Result<(), CheckError> {
    for path in entries(content.partial_dir())? {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let size = fs::metadata(&path).map_or(0, |m| m.len());
        let problem = match Digest::parse(&format!("sha256:{name}")) {
            Err(_) => "not a partial download: its name is no sha256 digest".to_string(),
            Ok(digest) => match declared.get(&digest) {
                Some(&whole) if size >= whole => {
                    format!("a partial download of {size} bytes of a {whole}-byte blob")
                }
                _ => continue,
            },
        };
        problems.push(removal(path.display().to_string(), problem, &path, repair));
    }
    Ok(())
}

/// Checks one snapshotter; returns the keys of the snapshots found broken.
fn check_snapshots(
    snapshotter: &dyn Snapshotter,
    live: bool,
    repair: bool,
    problems: &mut Vec<Problem>,
) -> Result<HashSet<String>, CheckError> {
    let name = snapshotter
        .root()
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let failed = |source| CheckError::Snapshotter {
        name: name.clone(),
        source,
    };
    if !live {
        let mut unfinished = Vec::new();
        snapshotter
            .walk(&mut |info| {
                if info.kind == Kind::Active && info.name.starts_with(EXTRACT_KEY_PREFIX) {
                    unfinished.push(info.name.clone());
                }
            })
            .map_err(failed)?;
        for key in unfinished {
            problems.push(Problem {
                subject: format!("{name} snapshot {key}"),
                problem: "a layer unpack that never finished".into(),
                repaired: repair && snapshotter.remove(&key).is_ok(),
            });
        }
    }
    let mut broken = HashSet::new();
    for finding in snapshotter.check(repair).map_err(failed)? {
        let subject = match finding.subject.strip_prefix("snapshot ") {
            Some(key) => {
                broken.insert(key.to_string());
                format!("{name} snapshot {key}")
            }
            None => finding.subject,
        };
        problems.push(Problem {
            subject,
            problem: finding.problem,
            repaired: finding.repaired,
        });
    }
    Ok(broken)
}

/// Images whose manifest, config or index is missing or corrupt, or with a layer that is
/// neither unpacked (in the configured snapshotter, not `broken`) nor stored as a sound blob.
fn check_images(
    store: &Store,
    bad: &HashSet<Digest>,
    broken: &HashSet<String>,
    repair: bool,
    problems: &mut Vec<Problem>,
) -> Result<(), CheckError> {
    let sound = |digest: &Digest| store.content.contains(digest) && !bad.contains(digest);
    let snapshotter = store.snapshotters.first().map(Arc::as_ref);
    for image in store.images.list() {
        let record = &image.record;
        let mut missing = Vec::new();
        let documents = [
            ("config", Some(&record.id)),
            ("manifest", Some(&record.manifest)),
        ];
        for (what, digest) in documents
            .into_iter()
            .chain([("index", record.index.as_ref())])
        {
            if let Some(digest) = digest.filter(|d| !sound(d)) {
                missing.push(format!("its {what} {digest} is {}", absence(bad, digest)));
            }
        }
        let unpacked = record
            .layers
            .iter()
            .rposition(|layer| {
                !broken.contains(layer.chain_id.as_str())
                    && snapshotter.is_some_and(|s| committed(s, &layer.chain_id))
            })
            .map_or(0, |top| top + 1);
        for layer in &record.layers[unpacked..] {
            if !sound(&layer.digest) {
                missing.push(format!(
                    "its layer {} is not unpacked and its blob is {}",
                    layer.digest,
                    absence(bad, &layer.digest)
                ));
            }
        }
        // An image removed meanwhile takes its parts with it.
        let removed = || matches!(store.images.lookup(record.id.as_str()), Ok(None));
        if missing.is_empty() || removed() {
            continue;
        }
        let name = image.tags.first().or(image.digests.first());
        let subject = match name {
            Some(name) => format!("image {} ({name})", record.id),
            None => format!("image {}", record.id),
        };
        problems.push(Problem {
            subject,
            problem: missing.join("; "),
            repaired: repair && store.images.remove(&record.id).is_ok(),
        });
    }
    Ok(())
}

fn absence(bad: &HashSet<Digest>, digest: &Digest) -> &'static str {
    if bad.contains(digest) {
        "corrupt"
    } else {
        "missing"
    }
}

fn committed(snapshotter: &dyn Snapshotter, chain_id: &Digest) -> bool {
    snapshotter
        .stat(chain_id.as_str())
        .is_ok_and(|info| info.kind == Kind::Committed)
}

/// A problem whose repair removes `path`.
fn removal(subject: String, problem: String, path: &Path, repair: bool) -> Problem {
    Problem {
        subject,
        problem,
        repaired: repair && remove(path).is_ok(),
    }
}

fn remove(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>, CheckError> {
    let failed = |source| CheckError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(failed)? {
        paths.push(entry.map_err(failed)?.path());
    }
    paths.sort();
    Ok(paths)
}
