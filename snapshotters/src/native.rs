//! The native snapshotter's layout: plain directories on any filesystem.
//!
//! An Active child starts as a copy of its parent, and its layers delete what their whiteouts
//! hide; a View of a parent is a read-only bind of the parent itself, since nothing can change
//! it. A layer may also be applied alone, into a snapshot without a parent, so that the
//! layers of an image unpack side by side: its whiteouts are then listed ([`hidden`]), and a
//! commit onto a parent (a rebase) merges the parent's tree into it, linking in every entry
//! the layer neither replaces nor hides, which gives what overlayfs would show of the two. A snapshot that something may write into (a container's rootfs) is a full copy,
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
use crate::hidden::{self, Hidden};
use crate::metastore::{Record, Snapshot};
use crate::snapshots::{Layout, Merge, bind, make_dir};
use crate::{Error, Kind, Mount, UNPACK_LABEL};
use crate::{copy, fsutil, implicit};

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

    fn whiteouts(&self, record: &Record) -> Whiteouts {
        match record.parent {
            Some(_) => Whiteouts::Delete,
            None => Whiteouts::Record,
        }
    }

    fn rebase(&self) -> bool {
        true
    }

    fn applied(&self, dir: &Path, record: &Record, named: &[Vec<u8>]) -> Result<(), Error> {
        match record.parent {
            Some(_) => Ok(()),
            None => implicit::record(&dir.join("fs"), &dir.join(implicit::FILE), named),
        }
    }

    /// Merges the layer onto its parent's tree: links in what it keeps of the parent, then
    /// gives the directories the layer only implied the parent's attributes (unless what
    /// the parent had there is hidden, when they stay as the layer made them). A layer
    /// whose paths run through a symlink or file of the parent needs the parent's tree
    /// under it and is refused here, before anything changes.
    fn rebase_onto(&self, dir: &Path, parent: &Path) -> Result<Option<Merge>, Error> {
        let (hidden_list, implied_list) = (dir.join(hidden::FILE), dir.join(implicit::FILE));
        let hidden = Hidden::for_merge(parent, &hidden_list, &implied_list)?;
        let (fs, parent) = (dir.join("fs"), parent.to_path_buf());
        Ok(Some(Box::new(move || {
            copy::merge_tree(&parent, &fs, &hidden)?;
            implicit::copy_up_where(&fs, &implied_list, &[parent], |rel| !hidden.covers(rel))
        })))
    }

    /// Nothing to do in the transaction: the lists a layer applied alone keeps go once the
    /// commit is in ([`Layout::tidy`]), so a failed transaction leaves them for a retry.
    fn committed(&self, _: &Path, _: &Record, _: &Snapshot) -> Result<(), Error> {
        Ok(())
    }

    /// The whiteouts' list, and the implied directories' when no merge used it up.
    fn tidy(&self, dir: &Path) -> Result<(), Error> {
        for list in [hidden::FILE, implicit::FILE] {
            let path = dir.join(list);
            fsutil::remove_file_if_present(&path).map_err(Error::io("remove", &path))?;
        }
        Ok(())
    }
}
