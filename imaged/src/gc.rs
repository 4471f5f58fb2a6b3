//! Garbage collection: blobs and snapshots that no image references, and that no running
//! pull has leased, are deleted. Runs after RemoveImage and at start-up.

use crate::content::ContentStore;
use crate::digest::Digest;
use crate::images::ImageStore;
use snapshotters::{Kind, Snapshotter};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Errors while collecting.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// Deleting a blob failed.
    #[error(transparent)]
    Content(#[from] crate::content::ContentError),
    /// Removing a snapshot failed.
    #[error("removing snapshot: {0}")]
    Snapshot(#[from] snapshotters::Error),
}

/// Digests held by running pulls, counted.
#[derive(Debug, Default)]
pub struct Leases {
    held: tokio::sync::Mutex<HashMap<Digest, usize>>,
}

/// Releases its digests when dropped.
#[derive(Debug)]
pub struct Lease {
    leases: Arc<Leases>,
    digests: Vec<Digest>,
}

impl Leases {
    /// Leases `digests` until the returned guard drops. Waits while a collection runs.
    pub async fn acquire(self: &Arc<Self>, digests: Vec<Digest>) -> Lease {
        let mut held = self.held.lock().await;
        for digest in &digests {
            *held.entry(digest.clone()).or_default() += 1;
        }
        Lease {
            leases: self.clone(),
            digests,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let leases = self.leases.clone();
        let digests = std::mem::take(&mut self.digests);
        let release = async move {
            let mut held = leases.held.lock().await;
            for digest in digests {
                if let Some(count) = held.get_mut(&digest) {
                    *count -= 1;
                    if *count == 0 {
                        held.remove(&digest);
                    }
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(release);
            }
            Err(_) => tracing::warn!("lease dropped outside the runtime"),
        }
    }
}

/// What a collection removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Blobs deleted.
    pub blobs: usize,
    /// Bytes of the blobs deleted.
    pub blob_bytes: u64,
    /// Snapshots removed.
    pub snapshots: usize,
}

/// Deletes unreferenced blobs, and committed snapshots of every snapshotter given. Holds
/// the lease table for the whole run so no pull can start using something that is being
/// deleted.
pub async fn collect(
    images: Arc<ImageStore>,
    content: Arc<ContentStore>,
    snapshotters: Vec<Arc<dyn Snapshotter>>,
    leases: Arc<Leases>,
) -> Result<Collected, GcError> {
    let held = leases.held.lock().await;
    let leased: HashSet<Digest> = held.keys().cloned().collect();
    let result = tokio::task::spawn_blocking(move || {
        let (mut blobs, mut chains) = images.referenced();
        blobs.extend(leased.iter().cloned());
        chains.extend(leased);
        let (swept, blob_bytes) = sweep_blobs(&content, &blobs)?;
        content.drop_stale_partials(crate::content::PARTIAL_MAX_AGE)?;
        let mut collected = Collected {
            blobs: swept,
            blob_bytes,
            snapshots: 0,
        };
        for snapshotter in &snapshotters {
            collected.snapshots += sweep_snapshots(snapshotter.as_ref(), &chains)?;
        }
        Ok(collected)
    })
    .await
    .expect("gc task");
    drop(held);
    result
}

/// Deletes the blobs not in `blobs`; returns how many went and their bytes.
fn sweep_blobs(content: &ContentStore, blobs: &HashSet<Digest>) -> Result<(usize, u64), GcError> {
    let (mut deleted, mut bytes) = (0, 0);
    for digest in content.list()? {
        if !blobs.contains(&digest) {
            bytes += std::fs::metadata(content.path(&digest)).map_or(0, |m| m.len());
            content.delete(&digest)?;
            deleted += 1;
        }
    }
    Ok((deleted, bytes))
}

/// Removes the committed snapshots whose name is no referenced chain, children first, and
/// returns how many went.
fn sweep_snapshots(
    snapshotter: &dyn Snapshotter,
    chains: &HashSet<Digest>,
) -> Result<usize, GcError> {
    let mut removed = 0;
    let mut committed: HashMap<String, Option<String>> = HashMap::new();
    let mut active_parents: HashSet<String> = HashSet::new();
    snapshotter.walk(&mut |info| {
        if info.kind == Kind::Committed {
            committed.insert(info.name.clone(), info.parent.clone());
        } else if let Some(parent) = &info.parent {
            active_parents.insert(parent.clone());
        }
    })?;
    let mut victims: HashSet<String> = committed
        .keys()
        .filter(|name| Digest::parse(name).map_or(true, |d| !chains.contains(&d)))
        .cloned()
        .collect();
    // Children first: a snapshot can go once no remaining snapshot names it as parent.
    while !victims.is_empty() {
        let parents: HashSet<&String> = committed
            .values()
            .flatten()
            .chain(&active_parents)
            .collect();
        let ready: Vec<String> = victims
            .iter()
            .filter(|v| !parents.contains(v))
            .cloned()
            .collect();
        if ready.is_empty() {
            break;
        }
        for name in ready {
            snapshotter.remove(&name)?;
            committed.remove(&name);
            victims.remove(&name);
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemorySnapshotter;
    use std::collections::BTreeMap;

    fn commit(snapshotter: &MemorySnapshotter, name: &str, parent: Option<&str>) {
        let key = format!("extract-{name}");
        snapshotter.prepare(&key, None, BTreeMap::new()).unwrap();
        snapshotter
            .commit(name, &key, parent, BTreeMap::new())
            .unwrap();
    }

    #[test]
    fn sweep_keeps_what_is_referenced_and_removes_children_before_parents() {
        let dir = tempfile::tempdir().unwrap();
        let content = ContentStore::open(dir.path()).unwrap();
        let (kept, dropped) = (b"kept".as_slice(), b"dropped".as_slice());
        for data in [kept, dropped] {
            content.write_verified(&Digest::of(data), data).unwrap();
        }
        let chain = |n: &str| Digest::of(n.as_bytes()).to_string();
        let snapshotter = MemorySnapshotter::default();
        commit(&snapshotter, &chain("base"), None);
        commit(&snapshotter, &chain("mid"), Some(&chain("base")));
        commit(&snapshotter, &chain("top"), Some(&chain("mid")));
        commit(&snapshotter, &chain("under-a-container"), None);
        commit(&snapshotter, "not-a-digest", None);
        let container_parent = chain("under-a-container");
        snapshotter
            .prepare("container", Some(&container_parent), BTreeMap::new())
            .unwrap();

        let blobs = HashSet::from([Digest::of(kept)]);
        let chains = HashSet::from([Digest::parse(&chain("base")).unwrap()]);
        assert_eq!(
            sweep_blobs(&content, &blobs).unwrap(),
            (1, dropped.len() as u64)
        );
        assert_eq!(sweep_snapshots(&snapshotter, &chains).unwrap(), 3);

        assert_eq!(content.list().unwrap(), vec![Digest::of(kept)]);
        let mut left: Vec<String> = snapshotter.tree().into_iter().map(|s| s.0).collect();
        left.sort();
        let mut expected = vec![
            chain("base"),
            chain("under-a-container"),
            "container".into(),
        ];
        expected.sort();
        assert_eq!(left, expected);
    }

    #[test]
    fn sweep_of_a_store_everything_references_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let content = ContentStore::open(dir.path()).unwrap();
        let blob = Digest::of(b"blob");
        content.write_verified(&blob, b"blob").unwrap();
        let snapshotter = MemorySnapshotter::default();
        let name = Digest::of(b"chain");
        commit(&snapshotter, name.as_str(), None);
        assert_eq!(
            sweep_blobs(&content, &HashSet::from([blob])).unwrap(),
            (0, 0)
        );
        assert_eq!(
            sweep_snapshots(&snapshotter, &HashSet::from([name])).unwrap(),
            0
        );
        assert_eq!(snapshotter.tree().len(), 1);
    }
}
