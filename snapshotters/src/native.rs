//! The native snapshotter's layout: plain directories on any filesystem.
//!
//! An Active child starts as a full copy of its parent (reflinked where the filesystem can),
//! and its layers delete what their whiteouts hide; a View of a parent is a read-only bind
//! of the parent itself, since nothing can change it. Each snapshot costs a full tree.

use std::path::Path;

use crate::apply::Whiteouts;
use crate::copy;
use crate::metastore::{Record, Snapshot};
use crate::snapshots::{Layout, bind, make_dir};
use crate::{Error, Kind, Mount};

pub(crate) struct NativeLayout;

impl Layout for NativeLayout {
    fn populate(&self, temp: &Path, kind: Kind, parent: Option<&Path>) -> Result<(), Error> {
        let fs = temp.join("fs");
        make_dir(&fs, 0o755)?;
        match (kind, parent) {
            (Kind::Active, Some(parent)) => copy::copy_tree(parent, &fs),
            _ => Ok(()),
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
