//! The native snapshotter's layout: plain directories on any filesystem.
//!
//! An Active child starts as a copy of its parent, and its layers delete what their whiteouts
//! hide; a View of a parent is a read-only bind of the parent itself, since nothing can change
//! it. A snapshot that something may write into (a container's rootfs) is a full copy,
//! reflinked where the filesystem can. A snapshot a layer is unpacked into ([`UNPACK_LABEL`])
//! is written by the applier alone, which replaces what it changes and never writes into an
//! existing file: there the parent's files are hardlinked rather than copied, so unpacking an
//! image costs its directories and one link per file and layer instead of a copy of the whole
//! tree per layer. Such a snapshot carries a `linked` marker beside `fs`, read by the applier.
//! Files then show more links than the image has; only Views of committed layers see them,
//! since every container gets a full copy.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use crate::apply::{Inodes, Whiteouts};
use crate::copy;
use crate::metastore::{Record, Snapshot};
use crate::snapshots::{Layout, bind, make_dir};
use crate::{Error, Kind, Mount, UNPACK_LABEL};

pub(crate) struct NativeLayout;

/// Present in the directory of a snapshot whose files are hardlinks to its parent's.
const LINKED: &str = "linked";

impl Layout for NativeLayout {
    fn populate(
        &self,
        temp: &Path,
        kind: Kind,
        parent: Option<&Path>,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Error> {
        let fs = temp.join("fs");
        make_dir(&fs, 0o755)?;
        match (kind, parent) {
            (Kind::Active, Some(parent)) if labels.contains_key(UNPACK_LABEL) => {
                let marker = temp.join(LINKED);
                File::create(&marker).map_err(Error::io("create", &marker))?;
                copy::link_tree(parent, &fs)
            }
            (Kind::Active, Some(parent)) => copy::copy_tree(parent, &fs),
            _ => Ok(()),
        }
    }

    fn inodes(&self, dir: &Path) -> Result<Inodes, Error> {
        let marker = dir.join(LINKED);
        match marker.try_exists() {
            Ok(true) => Ok(Inodes::SharedWithParent),
            Ok(false) => Ok(Inodes::Own),
            Err(e) => Err(Error::io("inspect", &marker)(e)),
        }
    }

    fn mounts(&self, snapshots: &Path, snapshot: &Snapshot) -> Vec<Mount> {
        let fs = |id: u64| snapshots.join(id.to_string()).join("fs");
        match (snapshot.kind, snapshot.parent_ids.first()) {
            (Kind::View, Some(parent)) => vec![bind(&fs(*parent), false)],
            (kind, _) => vec![bind(&fs(snapshot.id), kind == Kind::Active)],
        }
    }

    fn whiteouts(&self) -> Whiteouts {
        Whiteouts::Delete
    }

    fn rebase(&self) -> bool {
        false
    }

    fn committed(&self, _: &Path, _: &Record, _: &Snapshot) -> Result<(), Error> {
        Ok(())
    }
}
