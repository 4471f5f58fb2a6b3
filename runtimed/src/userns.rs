//! User namespaces for pods (`NamespaceOption.userns_options`, mode POD): the pod gets a
//! user namespace with the kubelet's one uid and one gid range, pinned on a file beside
//! its network namespace, which is created inside it so that the pod's root holds its
//! capabilities over the pod network too. Image layers and volumes are shown to the pod
//! through idmapped mounts (a clone of the directory, mapped with the pod's namespace), so
//! files owned by root on disk belong to the pod's root; only what is the pod's alone (the
//! new, empty upper layer, its hostname, hosts and resolv.conf) is handed to the pod's root
//! by chown. Doing the idmapping here rather than through the OCI runtime's mount options
//! makes it work with runc 1.1 and crun alike.

use crate::error::Error;
use oci_spec::runtime::{LinuxIdMapping, LinuxIdMappingBuilder};
use proto::cri;
use rustix::mount::{MoveMountFlags, OpenTreeFlags};
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Whether pods can have user namespaces here: idmapped overlay layers need Linux 5.19 and
/// idmapped tmpfs, which the kubelet's secret, configMap and token volumes are, 6.3.
/// Either runtime creates the namespaces; the idmapping is done here, so no handler needs
/// idmap support of its own.
pub fn supported() -> bool {
    crate::spec::kernel_at_least(6, 3)
}

/// One pod's mappings: container ids to host ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mappings {
    pub uid: cri::IdMapping,
    pub gid: cri::IdMapping,
}

impl Mappings {
    /// The mappings `options` ask for; `None` for the node's user namespace. Validated as
    /// containerd validates them: POD mode needs exactly one uid and one gid range, NODE
    /// mode none, and no other mode is defined for user namespaces.
    pub fn of(options: &cri::NamespaceOption) -> Result<Option<Self>, Error> {
        let Some(userns) = &options.userns_options else {
            return Ok(None);
        };
        let invalid = |why: String| Err(Error::InvalidArgument(format!("user namespace: {why}")));
        match userns.mode() {
            cri::NamespaceMode::Node if userns.uids.is_empty() && userns.gids.is_empty() => {
                Ok(None)
            }
            cri::NamespaceMode::Node => invalid("mode NODE takes no id mappings".into()),
            cri::NamespaceMode::Pod => {
                let one = |kind: &str, list: &[cri::IdMapping]| match list {
                    [m] if m.length > 0 => Ok(*m),
                    [m] => Err(Error::InvalidArgument(format!(
                        "user namespace: {kind} mapping of length {}",
                        m.length
                    ))),
                    _ => Err(Error::InvalidArgument(format!(
                        "user namespace: mode POD needs exactly one {kind} mapping, got {}",
                        list.len()
                    ))),
                };
                Ok(Some(Self {
                    uid: one("uid", &userns.uids)?,
                    gid: one("gid", &userns.gids)?,
                }))
            }
            mode => invalid(format!("mode {} is not supported", mode.as_str_name())),
        }
    }

    /// The host uid and gid the pod's root is, when the ranges start at root.
    pub fn host_root(&self) -> Option<(u32, u32)> {
        (self.uid.container_id == 0 && self.gid.container_id == 0)
            .then_some((self.uid.host_id, self.gid.host_id))
    }

    /// The spec's `uidMappings` and `gidMappings`.
    pub fn oci(&self) -> (Vec<LinuxIdMapping>, Vec<LinuxIdMapping>) {
        let one = |m: &cri::IdMapping| {
            LinuxIdMappingBuilder::default()
                .container_id(m.container_id)
                .host_id(m.host_id)
                .size(m.length)
                .build()
                .expect("every field is set")
        };
        (vec![one(&self.uid)], vec![one(&self.gid)])
    }

    fn map_line(m: &cri::IdMapping) -> String {
        format!("{} {} {}\n", m.container_id, m.host_id, m.length)
    }
}

/// Creates a user namespace with `mappings` and a network namespace owned by it, pinned at
/// `user` and `net` (files that must not exist yet).
///
/// A multi-threaded process cannot unshare a user namespace, so a child does it (and the
/// network namespace with it) and then waits in `sleep` while this process writes its id
/// maps and pins both namespaces; the child is killed once they are pinned.
pub fn create(mappings: &Mappings, user: &Path, net: &Path) -> io::Result<()> {
    let mut command = Command::new("sleep");
    command.arg("infinity").stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only makes syscalls.
    unsafe {
        command.pre_exec(|| {
            // Killed with runtimed should it die before killing the child itself.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            rustix::thread::unshare_unsafe(
                rustix::thread::UnshareFlags::NEWUSER | rustix::thread::UnshareFlags::NEWNET,
            )
            .map_err(io::Error::from)
        });
    }
    let mut child = command.spawn()?;
    let pinned = pin(child.id(), mappings, user, net);
    let _ = child.kill();
    let _ = child.wait();
    if pinned.is_err() {
        let _ = crate::netns::remove(user);
        let _ = crate::netns::remove(net);
    }
    pinned
}

fn pin(pid: u32, mappings: &Mappings, user: &Path, net: &Path) -> io::Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let named = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    std::fs::write(proc.join("uid_map"), Mappings::map_line(&mappings.uid))
        .map_err(named("write uid_map"))?;
    std::fs::write(proc.join("gid_map"), Mappings::map_line(&mappings.gid))
        .map_err(named("write gid_map"))?;
    for (kind, target) in [("user", user), ("net", net)] {
        crate::netns::pin(&proc.join("ns").join(kind), target)
            .map_err(named(&format!("pin the {kind} namespace")))?;
    }
    Ok(())
}

/// What an idmapped clone shows, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// The directory alone, read-only, nosuid, nodev: image layers, which overlayfs only
    /// reads.
    Layers,
    /// The directory and every mount below it, as `rbind` takes them: volumes.
    Volume,
}

/// Mounts a clone of `source` on `target`, with its ids mapped through the user namespace
/// pinned at `userns`: a file owned by host uid 0 shows as the namespace's root's host uid.
pub fn idmapped_bind(source: &Path, target: &Path, userns: &Path, kind: Share) -> io::Result<()> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    let mut attrs = MOUNT_ATTR_IDMAP;
    match kind {
        Share::Layers => attrs |= MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        Share::Volume => flags |= OpenTreeFlags::AT_RECURSIVE,
    }
    let tree = rustix::mount::open_tree(rustix::fs::CWD, source, flags)?;
    let ns = std::fs::File::open(userns)?;
    set_attrs(&tree, &ns, attrs, kind == Share::Volume).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "idmapping {} (its filesystem may not support idmapped mounts): {e}",
                source.display()
            ),
        )
    })?;
    rustix::mount::move_mount(
        &tree,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

/// `struct mount_attr` of mount_setattr(2), which neither rustix nor libc wraps: so the
/// call is made by hand.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

fn set_attrs(
    tree: &impl std::os::fd::AsFd,
    ns: &std::fs::File,
    attrs: u64,
    recursive: bool,
) -> io::Result<()> {
    let flags = if recursive {
        libc::AT_EMPTY_PATH | libc::AT_RECURSIVE
    } else {
        libc::AT_EMPTY_PATH
    };
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: ns.as_raw_fd() as u64,
    };
    // SAFETY: the path is an empty C string, `attr` lives across the call and its size is
    // passed with it; the kernel only reads both.
    let result = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_fd().as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Idmapped clones, under `dir`, of the CRI mounts that carry id mappings; keyed by their
/// container path, to be bound in place of their host path. Mappings are honoured only as
/// the pod's own (the kubelet gives each volume the pod's), in a pod with a user namespace.
pub fn idmap_volumes(
    mounts: &[cri::Mount],
    dir: &Path,
    userns: Option<&(PathBuf, Mappings)>,
) -> Result<HashMap<String, PathBuf>, Error> {
    let mut sources = HashMap::new();
    let mapped = mounts
        .iter()
        .filter(|m| !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty());
    for (index, mount) in mapped.enumerate() {
        let refuse = |why: &str| {
            Err(Error::InvalidArgument(format!(
                "mount {}: {why}",
                mount.container_path
            )))
        };
        let Some((path, mappings)) = userns else {
            return refuse("id mappings need a pod with a user namespace");
        };
        if mount.uid_mappings != [mappings.uid] || mount.gid_mappings != [mappings.gid] {
            return refuse("id mappings differ from the pod's user namespace");
        }
        let source = std::fs::canonicalize(&mount.host_path).map_err(|e| {
            Error::InvalidArgument(format!("mount host path {:?}: {e}", mount.host_path))
        })?;
        let target = dir.join(index.to_string());
        std::fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        if source.is_dir() {
            std::fs::create_dir(&target).map_err(Error::io("create directory", &target))?;
        } else {
            std::fs::write(&target, b"").map_err(Error::io("create", &target))?;
        }
        idmapped_bind(&source, &target, path, Share::Volume)
            .map_err(Error::io("idmap", &source))?;
        sources.insert(mount.container_path.clone(), target);
    }
    Ok(sources)
}

/// Mounts a rootfs (`mounts` from imaged) on `target` as the pod's user namespace sees it.
/// Overlayfs cannot be idmapped itself but takes idmapped lower layers: the directory that
/// holds them is cloned idmapped at `staging` and the lower layers are reached through it.
/// The upper layer, new and empty, is handed to the pod's root instead (as containerd
/// does), so what the pod writes is owned by its mapped ids on disk.
pub fn mount_rootfs(
    mounts: &[plumbing::mount::Mount],
    target: &Path,
    staging: &Path,
    (userns, mappings): (&Path, &Mappings),
) -> io::Result<()> {
    let [mount] = mounts else {
        return Err(io::Error::other(format!(
            "a rootfs of {} mounts cannot be idmapped",
            mounts.len()
        )));
    };
    if mount.kind == "bind" {
        return idmapped_bind(Path::new(&mount.source), target, userns, Share::Volume);
    }
    let (uid, gid) = mappings
        .host_root()
        .ok_or_else(|| io::Error::other("the pod's id ranges do not start at root"))?;
    for dir in dirs_of(&mount.options, &["upperdir", "workdir"]) {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
    }
    let lower = dirs_of(&mount.options, &["lowerdir"]);
    let root =
        common_root(&lower).ok_or_else(|| io::Error::other("the rootfs has no lower layers"))?;
    std::fs::create_dir_all(staging)?;
    idmapped_bind(&root, staging, userns, Share::Layers)?;
    let rebased = plumbing::mount::Mount {
        kind: mount.kind.clone(),
        source: mount.source.clone(),
        options: mount
            .options
            .iter()
            .map(|o| rebase(o, &root, staging))
            .collect(),
    };
    let mounted = plumbing::mount::Mount::mount_all(&[rebased], target).map_err(io::Error::other);
    if mounted.is_err() {
        let _ = plumbing::mount::unmount(staging);
    }
    mounted
}

/// Every directory an overlay option of one of `keys` names.
fn dirs_of(options: &[String], keys: &[&str]) -> Vec<PathBuf> {
    options
        .iter()
        .filter_map(|o| {
            let (key, value) = o.split_once('=')?;
            keys.contains(&key)
                .then(|| value.split(':').map(PathBuf::from).collect::<Vec<_>>())
        })
        .flatten()
        .collect()
}

fn common_root(dirs: &[PathBuf]) -> Option<PathBuf> {
    let first = dirs.first()?.parent()?.to_path_buf();
    let mut root = first;
    while !dirs.iter().all(|d| d.starts_with(&root)) {
        root = root.parent()?.to_path_buf();
    }
    Some(root)
}

/// A `lowerdir=` option with each of its paths under `root` moved under `staging`; other
/// options as they are.
fn rebase(option: &str, root: &Path, staging: &Path) -> String {
    let Some(value) = option.strip_prefix("lowerdir=") else {
        return option.to_string();
    };
    let key = "lowerdir";
    let paths: Vec<String> = value
        .split(':')
        .map(|p| match Path::new(p).strip_prefix(root) {
            Ok(rest) => staging.join(rest).display().to_string(),
            Err(_) => p.to_string(),
        })
        .collect();
    format!("{key}={}", paths.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(container_id: u32, host_id: u32, length: u32) -> cri::IdMapping {
        cri::IdMapping {
            host_id,
            container_id,
            length,
        }
    }

    fn options(mode: cri::NamespaceMode, uids: Vec<cri::IdMapping>) -> cri::NamespaceOption {
        cri::NamespaceOption {
            userns_options: Some(cri::UserNamespace {
                mode: mode as i32,
                gids: uids.clone(),
                uids,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pod_mode_takes_one_range_of_each_and_node_mode_none() {
        assert_eq!(Mappings::of(&Default::default()).unwrap(), None);
        let pod = Mappings::of(&options(
            cri::NamespaceMode::Pod,
            vec![mapping(0, 65536, 65536)],
        ))
        .unwrap()
        .unwrap();
        assert_eq!(pod.host_root(), Some((65536, 65536)));
        assert_eq!(Mappings::map_line(&pod.uid), "0 65536 65536\n");
        let node = options(cri::NamespaceMode::Node, vec![]);
        assert_eq!(Mappings::of(&node).unwrap(), None);
        let refused = [
            options(cri::NamespaceMode::Node, vec![mapping(0, 1, 1)]),
            options(cri::NamespaceMode::Pod, vec![]),
            options(
                cri::NamespaceMode::Pod,
                vec![mapping(0, 1, 1), mapping(1, 2, 1)],
            ),
            options(cri::NamespaceMode::Pod, vec![mapping(0, 1, 0)]),
            options(cri::NamespaceMode::Container, vec![mapping(0, 1, 1)]),
        ];
        for options in refused {
            let err = Mappings::of(&options).unwrap_err().to_string();
            assert!(err.contains("user namespace"), "{err}");
        }
    }

    #[test]
    fn lower_layers_are_rebased_under_the_idmapped_clone() {
        let options: Vec<String> = [
            "index=off",
            "lowerdir=/var/lib/imaged/snapshots/3/fs:/var/lib/imaged/snapshots/1/fs",
            "upperdir=/var/lib/imaged/snapshots/9/fs",
            "workdir=/var/lib/imaged/snapshots/9/work",
        ]
        .map(String::from)
        .to_vec();
        let root = common_root(&dirs_of(&options, &["lowerdir"])).unwrap();
        assert_eq!(root, Path::new("/var/lib/imaged/snapshots"));
        let staging = Path::new("/run/runtimed/containers/c/idmap");
        let rebased: Vec<String> = options.iter().map(|o| rebase(o, &root, staging)).collect();
        assert_eq!(
            rebased,
            [
                "index=off",
                "lowerdir=/run/runtimed/containers/c/idmap/3/fs:/run/runtimed/containers/c/idmap/1/fs",
                "upperdir=/var/lib/imaged/snapshots/9/fs",
                "workdir=/var/lib/imaged/snapshots/9/work",
            ]
        );
    }
}
