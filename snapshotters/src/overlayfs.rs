//! The overlayfs snapshotter's layout.
//!
//! Each snapshot's `fs` is the layer's diff: the upperdir while Active, a lowerdir once
//! Committed; Active snapshots also get `work`, overlay's workdir. Layers are applied
//! straight into `fs`, with whiteouts in overlay's own on-disk form, so nothing is mounted
//! during an unpack and layers can be applied in parallel and rebased at commit.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::apply::Whiteouts;
use crate::implicit;
use crate::metastore::{Record, Snapshot};
use crate::snapshots::{Layout, bind, make_dir};
use crate::{Error, Kind, Mount};

/// Present when the overlay module has the `index` feature, which must then be turned off:
/// lower directories are shared by many mounts, and with the index on, an upper used in
/// another combination fails with EBUSY or ESTALE.
const INDEX_PARAMETER: &str = "/sys/module/overlay/parameters/index";

/// overlayfs: a snapshot's `fs` is its layer alone, with `work` beside it while Active.
pub(crate) struct OverlayLayout {
    index_off: bool,
}

impl OverlayLayout {
    pub(crate) fn new(root: &Path) -> Result<Self, Error> {
        check_root_path(root)?;
        Ok(OverlayLayout {
            index_off: Path::new(INDEX_PARAMETER).exists(),
        })
    }
}

impl Layout for OverlayLayout {
    /// With a parent, `fs` takes the owner of the parent's `fs` so the merged root keeps
    /// the image root's owner.
    fn populate(
        &self,
        temp: &Path,
        kind: Kind,
        parent: Option<&Path>,
        _: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let fs = temp.join("fs");
        make_dir(&fs, 0o755)?;
        if kind == Kind::Active {
            make_dir(&temp.join("work"), 0o711)?;
        }
        match parent {
            Some(parent) => copy_owner(parent, &fs),
            None => Ok(()),
        }
    }

    fn mounts(&self, snapshots: &Path, snapshot: &Snapshot) -> Vec<Mount> {
        overlay_mounts(snapshots, snapshot, self.index_off)
    }

    fn whiteouts(&self, _: &Record) -> Whiteouts {
        Whiteouts::Overlay
    }

    fn rebase(&self) -> bool {
        true
    }

    fn applied(&self, dir: &Path, _: &Record, named: &[Vec<u8>]) -> Result<(), Error> {
        implicit::record(&dir.join("fs"), &dir.join(implicit::FILE), named)
    }

    /// A rebased snapshot's root takes its new parent's owner, and the directories its
    /// layer only implied take their attributes from the lower layers.
    fn committed(
        &self,
        snapshots: &Path,
        before: &Record,
        snapshot: &Snapshot,
    ) -> Result<(), Error> {
        let fs = |id: u64| snapshots.join(id.to_string()).join("fs");
        if let (None, Some(parent)) = (&before.parent, snapshot.parent_ids.first()) {
            copy_owner(&fs(*parent), &fs(snapshot.id))?;
        }
        let lowers: Vec<PathBuf> = snapshot.parent_ids.iter().map(|id| fs(*id)).collect();
        implicit::copy_up(
            &fs(snapshot.id),
            &snapshots.join(snapshot.id.to_string()).join(implicit::FILE),
            &lowers,
        )
    }
}

/// The mounts of a snapshot, as containerd's overlay snapshotter returns them: a snapshot
/// without parents is a bind of its own directory (rw when Active), a read-only one with a
/// single parent is a read-only bind of that parent, and everything else is an overlay whose
/// lowerdirs are the parents, nearest first, with upperdir and workdir when Active.
fn overlay_mounts(snapshots: &Path, snapshot: &Snapshot, index_off: bool) -> Vec<Mount> {
    let path = |id: u64, sub: &str| snapshots.join(id.to_string()).join(sub);
    match (snapshot.kind, snapshot.parent_ids.as_slice()) {
        (Kind::Active, []) => vec![bind(&path(snapshot.id, "fs"), true)],
        (Kind::View | Kind::Committed, []) => vec![bind(&path(snapshot.id, "fs"), false)],
        // The kernel refuses an overlay with neither an upperdir nor a second lowerdir.
        (Kind::View | Kind::Committed, [parent]) => vec![bind(&path(*parent, "fs"), false)],
        (kind, parents) => {
            let shown = |id: u64, sub: &str| path(id, sub).display().to_string();
            let mut options = Vec::new();
            if kind == Kind::Active {
                options.push(format!("workdir={}", shown(snapshot.id, "work")));
                options.push(format!("upperdir={}", shown(snapshot.id, "fs")));
            }
            let lowers: Vec<String> = parents.iter().map(|id| shown(*id, "fs")).collect();
            options.push(format!("lowerdir={}", lowers.join(":")));
            if index_off {
                options.push("index=off".to_owned());
            }
            vec![Mount {
                kind: "overlay".to_owned(),
                source: "overlay".to_owned(),
                options,
            }]
        }
    }
}

/// Overlay options are `,`- and `:`-separated and `\` escapes, so the root can hold none of
/// them; mount options are strings, so it must be UTF-8.
fn check_root_path(root: &Path) -> Result<(), Error> {
    let reason = match root.to_str() {
        None => "is not UTF-8",
        Some(s) if s.contains([':', ',', '\\']) => {
            "contains ':', ',' or '\\', which overlay options cannot carry"
        }
        Some(_) => return Ok(()),
    };
    Err(Error::InvalidArgument {
        key: root.display().to_string(),
        reason: format!("snapshotter root {reason}"),
    })
}

fn copy_owner(from: &Path, to: &Path) -> Result<(), Error> {
    let meta = fs::symlink_metadata(from).map_err(Error::io("stat", from))?;
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(Error::io("change owner of", to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(kind: Kind, id: u64, parent_ids: &[u64]) -> Snapshot {
        Snapshot {
            id,
            kind,
            parent_ids: parent_ids.to_vec(),
        }
    }

    fn mounts(kind: Kind, id: u64, parents: &[u64], index_off: bool) -> Vec<Mount> {
        overlay_mounts(
            Path::new("/r/snapshots"),
            &snapshot(kind, id, parents),
            index_off,
        )
    }

    fn mount(kind: &str, source: &str, options: &[&str]) -> Vec<Mount> {
        vec![Mount {
            kind: kind.to_owned(),
            source: source.to_owned(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }]
    }

    #[test]
    fn without_parents_snapshots_are_bind_mounts_of_their_own_fs() {
        assert_eq!(
            mounts(Kind::Active, 4, &[], true),
            mount("bind", "/r/snapshots/4/fs", &["rw", "rbind"])
        );
        assert_eq!(
            mounts(Kind::View, 4, &[], true),
            mount("bind", "/r/snapshots/4/fs", &["ro", "rbind"])
        );
    }

    #[test]
    fn a_view_of_one_parent_binds_the_parent_read_only() {
        assert_eq!(
            mounts(Kind::View, 9, &[3], true),
            mount("bind", "/r/snapshots/3/fs", &["ro", "rbind"])
        );
    }

    #[test]
    fn a_view_of_several_parents_is_an_overlay_without_upper() {
        assert_eq!(
            mounts(Kind::View, 9, &[3, 2], false),
            mount(
                "overlay",
                "overlay",
                &["lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]
            )
        );
    }

    #[test]
    fn an_active_overlay_lists_lowers_nearest_parent_first() {
        assert_eq!(
            mounts(Kind::Active, 12, &[11, 7, 1], true),
            mount(
                "overlay",
                "overlay",
                &[
                    "workdir=/r/snapshots/12/work",
                    "upperdir=/r/snapshots/12/fs",
                    "lowerdir=/r/snapshots/11/fs:/r/snapshots/7/fs:/r/snapshots/1/fs",
                    "index=off",
                ]
            )
        );
    }

    #[test]
    fn roots_that_overlay_options_cannot_carry_are_refused() {
        assert!(check_root_path(Path::new("/var/lib/imaged/snapshots/overlayfs")).is_ok());
        for bad in ["/var/lib/a:b", "/var/lib/a,b", "/var/lib/a\\b"] {
            assert!(matches!(
                check_root_path(Path::new(bad)),
                Err(Error::InvalidArgument { .. })
            ));
        }
    }
}
