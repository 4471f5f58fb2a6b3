//! The OCI runtime spec of a container: the image config and the CRI ContainerConfig
//! combined as containerd's CRI plugin combines them, on `oci-spec`'s defaults (runc's).

use crate::error::Error;
use crate::seccomp;
use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxCpuBuilder, LinuxDevice, LinuxDeviceBuilder,
    LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxHugepageLimitBuilder,
    LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResourcesBuilder, Mount, MountBuilder, RootBuilder, Spec, UserBuilder,
};
use proto::cri;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

/// Where a container is placed and what it shares with its sandbox.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The mounted rootfs (its /etc/passwd and /etc/group resolve users).
    pub rootfs: PathBuf,
    /// The sandbox's infra process, whose namespaces the container joins.
    pub sandbox_pid: i64,
    /// The sandbox's hostname, hosts and resolv.conf directory.
    pub sandbox_files: PathBuf,
    /// The sandbox's `/dev/shm` (the host's with host IPC).
    pub shm: PathBuf,
    /// The sandbox's hostname, for `HOSTNAME`.
    pub hostname: String,
    /// cgroups path in the driver's form.
    pub cgroups_path: String,
    /// Whether the sandbox is privileged (a privileged container needs it).
    pub sandbox_privileged: bool,
    /// The sandbox's runtime handler, and whether it makes mounts read-only recursively.
    pub handler: String,
    pub recursive_read_only: bool,
    /// The pod's pinned user namespace and its mappings; `None` in the node's.
    pub userns: Option<(PathBuf, crate::userns::Mappings)>,
    /// Idmapped clones to bind instead of the host paths of CRI mounts with id mappings,
    /// by container path.
    pub idmapped: std::collections::HashMap<String, PathBuf>,
}

/// containerd's default capabilities.
const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability, in the kernel's bit order (CAP_CHOWN is bit 0).
const ALL_CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The spec of `config`'s container from its image's `config` object.
pub fn build(
    config: &cri::ContainerConfig,
    image: &serde_json::Value,
    placement: &Placement,
) -> Result<Spec, Error> {
    let security = security(config);
    if security.privileged && !placement.sandbox_privileged {
        return Err(Error::InvalidArgument(
            "no privileged container allowed in a sandbox that is not privileged".into(),
        ));
    }
    let mut spec = Spec::default();
    spec.set_hostname(None);
    let root = RootBuilder::default()
        .path(&placement.rootfs)
        .readonly(security.readonly_rootfs)
        .build()
        .map_err(spec_error)?;
    spec.set_root(Some(root));
    let user = user(&security, image, &placement.rootfs)?;
    let capabilities = capabilities(&security)?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args(config, image)?));
    process.set_env(Some(env(config, image, &placement.hostname)));
    process.set_cwd(PathBuf::from(cwd(config, image)));
    process.set_user(user);
    process.set_capabilities(Some(capabilities.clone()));
    process.set_no_new_privileges(Some(security.no_new_privs));
    process.set_apparmor_profile(apparmor(&security, apparmor_enabled())?);
    process.set_terminal(Some(config.tty));
    let resources = config.linux.as_ref().and_then(|l| l.resources.clone());
    if let Some(r) = resources.as_ref().filter(|r| r.oom_score_adj != 0) {
        let score = crate::spec::clamp_oom_score_adj(r.oom_score_adj as i32);
        process.set_oom_score_adj(Some(score));
    }
    spec.set_process(Some(process));
    spec.set_mounts(Some(mounts(config, placement, security.privileged)?));
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut joined = namespaces(&security, placement.sandbox_pid)?;
    if let Some((path, mappings)) = &placement.userns {
        let user = LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::User)
            .path(path)
            .build()
            .map_err(spec_error)?;
        joined.insert(0, user);
        let (uids, gids) = mappings.oci();
        linux.set_uid_mappings(Some(uids));
        linux.set_gid_mappings(Some(gids));
    }
    linux.set_namespaces(Some(joined));
    linux.set_cgroups_path(Some(PathBuf::from(&placement.cgroups_path)));
    if let Some(propagation) = rootfs_propagation(&config.mounts) {
        linux.set_rootfs_propagation(Some(propagation.into()));
    }
    if security.privileged {
        linux.set_masked_paths(Some(vec![]));
        linux.set_readonly_paths(Some(vec![]));
    } else {
        linux.set_masked_paths(Some(security.masked_paths.clone()));
        linux.set_readonly_paths(Some(security.readonly_paths.clone()));
    }
    if !security.privileged {
        #[allow(deprecated, reason = "critest 1.26 sends only the deprecated string")]
        let path = &security.seccomp_profile_path;
        let bounding = capabilities.bounding().clone().unwrap_or_default();
        linux.set_seccomp(seccomp::for_request(
            security.seccomp.as_ref(),
            path,
            &bounding,
        )?);
    }
    let mut cgroup = match &resources {
        Some(r) => limits(r, Controllers::of_host())?,
        None => Default::default(),
    };
    let (nodes, rules) = devices(config, security.privileged)?;
    linux.set_devices((!nodes.is_empty()).then_some(nodes));
    cgroup.set_devices((!rules.is_empty()).then_some(rules));
    linux.set_resources(Some(cgroup));
    spec.set_linux(Some(linux));
    Ok(spec)
}

fn spec_error(e: oci_spec::OciSpecError) -> Error {
    Error::InvalidArgument(format!("runtime spec: {e}"))
}

fn security(config: &cri::ContainerConfig) -> cri::LinuxContainerSecurityContext {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default()
}

/// The strings of a JSON list (an image config's `Entrypoint`, `Cmd`, `Env`).
pub fn strings(value: &serde_json::Value) -> Vec<String> {
    let items = value.as_array().cloned().unwrap_or_default();
    items
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// `command` + `args` when the CRI gives a command; else the image's Entrypoint (unless
/// `[""]`) followed by `args`, or by the image's Cmd when there are none.
pub fn args(
    config: &cri::ContainerConfig,
    image: &serde_json::Value,
) -> Result<Vec<String>, Error> {
    let args = if config.command.is_empty() {
        let mut entrypoint = strings(&image["Entrypoint"]);
        if entrypoint == [""] {
            entrypoint.clear();
        }
        let rest = if config.args.is_empty() {
            strings(&image["Cmd"])
        } else {
            config.args.clone()
        };
        entrypoint.extend(rest);
        entrypoint
    } else {
        [config.command.clone(), config.args.clone()].concat()
    };
    if args.is_empty() {
        return Err(Error::InvalidArgument(
            "container has no command: neither the config nor the image names one".into(),
        ));
    }
    Ok(args)
}

/// The default PATH, HOSTNAME, the image's Env, then the CRI's; later keys win.
pub fn env(
    config: &cri::ContainerConfig,
    image: &serde_json::Value,
    hostname: &str,
) -> Vec<String> {
    let mut env: Vec<String> = vec![DEFAULT_PATH.into(), format!("HOSTNAME={hostname}")];
    let cri = config
        .envs
        .iter()
        .map(|kv| format!("{}={}", kv.key, kv.value));
    for entry in strings(&image["Env"]).into_iter().chain(cri) {
        let key = entry.split('=').next().unwrap_or_default().to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(entry);
    }
    env
}

fn cwd(config: &cri::ContainerConfig, image: &serde_json::Value) -> String {
    [
        config.working_dir.as_str(),
        image["WorkingDir"].as_str().unwrap_or_default(),
    ]
    .into_iter()
    .find(|d| !d.is_empty())
    .unwrap_or("/")
    .to_string()
}

/// The process's user: the CRI's uid or name (with its group), else the image's `User`,
/// resolved in the rootfs's /etc/passwd and /etc/group; supplemental groups are the
/// primary one, the groups listing the user (unless the policy is Strict), and the CRI's.
pub fn user(
    security: &cri::LinuxContainerSecurityContext,
    image: &serde_json::Value,
    rootfs: &Path,
) -> Result<oci_spec::runtime::User, Error> {
    if security.run_as_group.is_some()
        && security.run_as_user.is_none()
        && security.run_as_username.is_empty()
    {
        return Err(Error::InvalidArgument(
            "run_as_group is set without run_as_user or run_as_username".into(),
        ));
    }
    let spec = if let Some(uid) = &security.run_as_user {
        uid.value.to_string()
    } else if !security.run_as_username.is_empty() {
        security.run_as_username.clone()
    } else {
        image["User"].as_str().unwrap_or_default().to_string()
    };
    let (name, group) = match spec.split_once(':') {
        Some((name, group)) => (name.to_string(), Some(group.to_string())),
        None => (spec, None),
    };
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let groups = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let entry = find_user(&passwd, &name);
    let (uid, mut gid, username) = match (&entry, name.parse::<u32>()) {
        (Some((user, uid, gid)), _) => (*uid, *gid, user.clone()),
        (None, Ok(uid)) => (uid, 0, String::new()),
        (None, Err(_)) if name.is_empty() => (0, 0, String::new()),
        (None, Err(_)) => {
            return Err(Error::InvalidArgument(format!(
                "user {name:?} is not in the image's /etc/passwd"
            )));
        }
    };
    if let Some(group) = group.or(security.run_as_group.as_ref().map(|g| g.value.to_string())) {
        gid = resolve_group(&groups, &group)?;
    }
    let mut additional: Vec<u32> = vec![gid];
    let strict = security.supplemental_groups_policy() == cri::SupplementalGroupsPolicy::Strict;
    if !username.is_empty() && !strict {
        additional.extend(member_groups(&groups, &username));
    }
    additional.extend(security.supplemental_groups.iter().map(|g| *g as u32));
    additional.sort_unstable();
    additional.dedup();
    UserBuilder::default()
        .uid(uid)
        .gid(gid)
        .additional_gids(additional)
        .build()
        .map_err(spec_error)
}

/// `(name, uid, gid)` of the passwd entry with this name or uid.
fn find_user(passwd: &str, name: &str) -> Option<(String, u32, u32)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || (fields[0] != name && fields[2] != name) {
            return None;
        }
        Some((
            fields[0].to_string(),
            fields[2].parse().ok()?,
            fields[3].parse().ok()?,
        ))
    })
}

fn resolve_group(groups: &str, group: &str) -> Result<u32, Error> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    groups
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 3 && fields[0] == group).then(|| fields[2].parse().ok())?
        })
        .ok_or_else(|| {
            Error::InvalidArgument(format!("group {group:?} is not in the image's /etc/group"))
        })
}

fn member_groups(groups: &str, user: &str) -> Vec<u32> {
    groups
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let members = fields.get(3)?;
            members
                .split(',')
                .any(|m| m == user)
                .then(|| fields[2].parse().ok())?
        })
        .collect()
}

/// containerd's defaults; `ALL` in add gives all and in drop none, before single names.
pub fn capabilities(
    security: &cri::LinuxContainerSecurityContext,
) -> Result<LinuxCapabilities, Error> {
    let parse = |name: &str| -> Result<Capability, Error> {
        let bare = name.trim_start_matches("CAP_").to_ascii_uppercase();
        Capability::from_str(&bare)
            .map_err(|_| Error::InvalidArgument(format!("unknown capability {name:?}")))
    };
    let all = bounding_set;
    let mut set: HashSet<Capability> = if security.privileged {
        all()
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .map(|n| parse(n))
            .collect::<Result<_, _>>()?
    };
    if let Some(caps) = &security.capabilities {
        let is_all = |list: &[String]| list.iter().any(|c| c.eq_ignore_ascii_case("ALL"));
        if is_all(&caps.add_capabilities) {
            set = all();
        }
        if is_all(&caps.drop_capabilities) {
            set.clear();
        }
        for name in caps
            .add_capabilities
            .iter()
            .filter(|c| !c.eq_ignore_ascii_case("ALL"))
        {
            set.insert(parse(name)?);
        }
        for name in caps
            .drop_capabilities
            .iter()
            .filter(|c| !c.eq_ignore_ascii_case("ALL"))
        {
            set.remove(&parse(name)?);
        }
    }
    let mut capabilities = LinuxCapabilities::default();
    capabilities.set_bounding(Some(set.clone()));
    capabilities.set_effective(Some(set.clone()));
    capabilities.set_permitted(Some(set));
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);
    Ok(capabilities)
}

/// `ALL`, as containerd means it: the capabilities in runtimed's own bounding set, since a
/// runtime cannot grant a container more than it holds.
fn bounding_set() -> HashSet<Capability> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    ALL_CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .filter_map(|(_, name)| Capability::from_str(name).ok())
        .collect()
}

/// The sandbox's namespaces joined through its infra process, a new mount namespace, and a
/// PID namespace of its own only in CONTAINER mode.
fn namespaces(
    security: &cri::LinuxContainerSecurityContext,
    pid: i64,
) -> Result<Vec<LinuxNamespace>, Error> {
    let join = |kind, name: &str| {
        LinuxNamespaceBuilder::default()
            .typ(kind)
            .path(format!("/proc/{pid}/ns/{name}"))
            .build()
            .map_err(spec_error)
    };
    let mut namespaces = vec![
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Mount)
            .build()
            .map_err(spec_error)?,
        join(LinuxNamespaceType::Network, "net")?,
        join(LinuxNamespaceType::Ipc, "ipc")?,
        join(LinuxNamespaceType::Uts, "uts")?,
    ];
    let pid_mode = security
        .namespace_options
        .as_ref()
        .map(|n| n.pid())
        .unwrap_or(cri::NamespaceMode::Pod);
    if pid_mode == cri::NamespaceMode::Container {
        let own = LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Pid)
            .build();
        namespaces.push(own.map_err(spec_error)?);
    } else {
        namespaces.push(join(LinuxNamespaceType::Pid, "pid")?);
    }
    Ok(namespaces)
}

/// runc's default mounts (a read-write sysfs when privileged), the sandbox's shm,
/// hostname, hosts and resolv.conf unless a CRI mount covers them, then the CRI mounts.
fn mounts(
    config: &cri::ContainerConfig,
    placement: &Placement,
    privileged: bool,
) -> Result<Vec<Mount>, Error> {
    let covered: HashSet<&str> = config
        .mounts
        .iter()
        .map(|m| m.container_path.as_str())
        .collect();
    let mut mounts: Vec<Mount> = oci_spec::runtime::get_default_mounts()
        .into_iter()
        .filter(|m| !covered.contains(m.destination().to_string_lossy().as_ref()))
        .filter(|m| m.destination() != Path::new("/dev/shm"))
        .map(|mut m| {
            if privileged && m.destination() == Path::new("/sys") {
                m.set_options(Some(vec![
                    "nosuid".into(),
                    "noexec".into(),
                    "nodev".into(),
                    "rw".into(),
                ]));
            }
            m
        })
        .collect();
    let bind = |destination: &str, source: &Path, options: Vec<String>| {
        MountBuilder::default()
            .destination(destination)
            .typ("bind")
            .source(source)
            .options(options)
            .build()
            .map_err(spec_error)
    };
    let rw = |extra: &[&str]| {
        let mut options = vec![
            "rbind".to_string(),
            "rprivate".to_string(),
            "rw".to_string(),
        ];
        options.extend(extra.iter().map(|s| s.to_string()));
        options
    };
    if !covered.contains("/dev/shm") {
        mounts.push(bind(
            "/dev/shm",
            &placement.shm,
            rw(&["nosuid", "nodev", "noexec"]),
        )?);
    }
    for file in ["hostname", "hosts", "resolv.conf"] {
        let destination = format!("/etc/{file}");
        if !covered.contains(destination.as_str()) {
            mounts.push(bind(
                &destination,
                &placement.sandbox_files.join(file),
                rw(&[]),
            )?);
        }
    }
    let mut cri_mounts = config.mounts.clone();
    cri_mounts.sort_by_key(|m| Path::new(&m.container_path).components().count());
    for mount in &cri_mounts {
        mounts.push(cri_mount(mount, placement)?);
    }
    Ok(mounts)
}

/// `rro` (every mount below read-only too), for a read-only, private mount on a handler
/// that can do it; refused otherwise rather than made read-only at its top only.
fn recursive_read_only(mount: &cri::Mount, placement: &Placement) -> Result<&'static str, Error> {
    let refuse = |why: &str| {
        Err(Error::InvalidArgument(format!(
            "mount {}: recursive read-only {why}",
            mount.container_path
        )))
    };
    if !mount.readonly {
        return refuse("needs readonly set too");
    }
    if mount.propagation() != cri::MountPropagation::PropagationPrivate {
        return refuse("needs private propagation");
    }
    if !placement.recursive_read_only {
        return refuse(&format!(
            "is not supported by runtime handler {:?}",
            placement.handler
        ));
    }
    Ok("rro")
}

/// The rootfs propagation the CRI mounts need, as containerd sets it: `rshared` for a
/// bidirectional mount (so mounts made inside reach the host), else `rslave` for a
/// host-to-container one.
fn rootfs_propagation(mounts: &[cri::Mount]) -> Option<&'static str> {
    let has = |p| mounts.iter().any(|m| m.propagation() == p);
    if has(cri::MountPropagation::PropagationBidirectional) {
        Some("rshared")
    } else if has(cri::MountPropagation::PropagationHostToContainer) {
        Some("rslave")
    } else {
        None
    }
}

fn cri_mount(mount: &cri::Mount, placement: &Placement) -> Result<Mount, Error> {
    if !mount.container_path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "mount container path {:?} is not absolute",
            mount.container_path
        )));
    }
    if mount.image.is_some() {
        return Err(Error::InvalidArgument(format!(
            "mount {}: image volumes are not supported",
            mount.container_path
        )));
    }
    let source = match placement.idmapped.get(&mount.container_path) {
        Some(clone) => clone.clone(),
        None if !mount.uid_mappings.is_empty() || !mount.gid_mappings.is_empty() => {
            return Err(Error::InvalidArgument(format!(
                "mount {}: id mappings need a pod with a user namespace",
                mount.container_path
            )));
        }
        None => std::fs::canonicalize(&mount.host_path).map_err(|e| {
            Error::InvalidArgument(format!("mount host path {:?}: {e}", mount.host_path))
        })?,
    };
    let propagation = match mount.propagation() {
        cri::MountPropagation::PropagationPrivate => "rprivate",
        cri::MountPropagation::PropagationHostToContainer => "rslave",
        cri::MountPropagation::PropagationBidirectional => "rshared",
    };
    let mode = match (mount.readonly, mount.recursive_read_only) {
        (_, true) => recursive_read_only(mount, placement)?,
        (true, false) => "ro",
        (false, false) => "rw",
    };
    MountBuilder::default()
        .destination(&mount.container_path)
        .typ("bind")
        .source(source)
        .options(vec![
            "rbind".to_string(),
            propagation.to_string(),
            mode.to_string(),
        ])
        .build()
        .map_err(spec_error)
}

/// The AppArmor profile to run under, as containerd picks it: on a host without AppArmor
/// any profile but Unconfined is refused rather than silently not applied; on a host with
/// it a `localhost/` profile (privileged containers included) must be loaded already. The
/// RuntimeDefault profile, which would have to be loaded with apparmor_parser first, is
/// not provided: asking for it on an AppArmor host is a failed precondition (ignored for
/// privileged containers, as containerd ignores it), and no profile means none.
fn apparmor(
    security: &cri::LinuxContainerSecurityContext,
    enabled: bool,
) -> Result<Option<String>, Error> {
    use cri::security_profile::ProfileType;
    #[allow(
        deprecated,
        reason = "kubelets before 1.30 send only the deprecated string"
    )]
    let deprecated = security.apparmor_profile.as_str();
    let requested = match (&security.apparmor, deprecated) {
        (Some(p), _) => Some((p.profile_type(), p.localhost_ref.clone())),
        (None, "") => None,
        (None, "unconfined") => Some((ProfileType::Unconfined, String::new())),
        (None, "runtime/default") => Some((ProfileType::RuntimeDefault, String::new())),
        (None, other) => match other.strip_prefix("localhost/") {
            Some(name) => Some((ProfileType::Localhost, name.to_string())),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "apparmor profile {other:?}: expected runtime/default, unconfined or \
                     localhost/<name>"
                )));
            }
        },
    };
    let refuse = |why: String| Err(Error::InvalidArgument(format!("apparmor: {why}")));
    match requested {
        None | Some((ProfileType::Unconfined, _)) => Ok(None),
        Some(_) if !enabled => refuse("this host does not have AppArmor enabled".into()),
        Some((ProfileType::RuntimeDefault, _)) if security.privileged => Ok(None),
        Some((ProfileType::RuntimeDefault, _)) => Err(Error::FailedPrecondition(
            "apparmor: the RuntimeDefault profile is not provided by runtimed".into(),
        )),
        Some((ProfileType::Localhost, name)) => {
            let name = name.trim_start_matches("localhost/").to_string();
            let table = Path::new("/sys/kernel/security/apparmor/profiles");
            let loaded = std::fs::read_to_string(table).map_err(Error::io("read", table))?;
            if loaded.lines().any(|l| l.starts_with(&format!("{name} ("))) {
                Ok(Some(name))
            } else {
                refuse(format!("profile {name:?} is not loaded"))
            }
        }
    }
}

fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y")
}

/// Which cgroup controllers the host has, where limits depend on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controllers {
    /// Swap accounting (`memory.memsw.*` on v1, `memory.swap.max` on v2).
    pub swap: bool,
    /// hugetlb.
    pub hugetlb: bool,
}

impl Controllers {
    /// This host's, from /sys/fs/cgroup.
    pub fn of_host() -> Self {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = root.join("cgroup.controllers");
        match std::fs::read_to_string(&v2) {
            Ok(controllers) => Self {
                swap: own_cgroup_v2()
                    .is_some_and(|c| root.join(c).join("memory.swap.max").exists()),
                hugetlb: controllers.split_whitespace().any(|c| c == "hugetlb"),
            },
            Err(_) => Self {
                swap: root.join("memory/memory.memsw.limit_in_bytes").exists(),
                hugetlb: root.join("hugetlb").exists(),
            },
        }
    }
}

/// This process's cgroup v2 path, relative to the hierarchy's root.
fn own_cgroup_v2() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let line = cgroup.lines().find(|l| l.starts_with("0::"))?;
    Some(
        line.trim_start_matches("0::")
            .trim_start_matches('/')
            .to_string(),
    )
}

/// The cgroup limits of CRI resources (0 is unset).
pub fn limits(
    r: &cri::LinuxContainerResources,
    host: Controllers,
) -> Result<oci_spec::runtime::LinuxResources, Error> {
    let mut cpu = LinuxCpuBuilder::default();
    if r.cpu_shares > 0 {
        cpu = cpu.shares(r.cpu_shares as u64);
    }
    if r.cpu_quota > 0 {
        cpu = cpu.quota(r.cpu_quota);
    }
    if r.cpu_period > 0 {
        cpu = cpu.period(r.cpu_period as u64);
    }
    if !r.cpuset_cpus.is_empty() {
        cpu = cpu.cpus(r.cpuset_cpus.clone());
    }
    if !r.cpuset_mems.is_empty() {
        cpu = cpu.mems(r.cpuset_mems.clone());
    }
    let mut resources = LinuxResourcesBuilder::default().cpu(cpu.build().map_err(spec_error)?);
    if r.memory_limit_in_bytes > 0 {
        let mut memory = LinuxMemoryBuilder::default().limit(r.memory_limit_in_bytes);
        // containerd's rule: no swap beyond the limit unless one is given, where the
        // kernel accounts swap at all.
        if host.swap {
            let swap = match r.memory_swap_limit_in_bytes {
                0 => r.memory_limit_in_bytes,
                given => given,
            };
            memory = memory.swap(swap);
        }
        resources = resources.memory(memory.build().map_err(spec_error)?);
    }
    // Without the hugetlb controller the limits are dropped, as containerd's default
    // `tolerate_missing_hugetlb_controller` drops them, rather than failing every pod.
    if !r.hugepage_limits.is_empty() && host.hugetlb {
        let hugepages = r.hugepage_limits.iter().map(|h| {
            LinuxHugepageLimitBuilder::default()
                .page_size(&h.page_size)
                .limit(h.limit as i64)
                .build()
                .map_err(spec_error)
        });
        resources = resources.hugepage_limits(hugepages.collect::<Result<Vec<_>, _>>()?);
    }
    if !r.unified.is_empty() {
        resources = resources.unified(r.unified.clone());
    }
    resources.build().map_err(spec_error)
}

/// The CRI's devices (a directory stands for every device below it), after every host
/// device for a privileged container; with the device cgroup rules that let them be used.
fn devices(
    config: &cri::ContainerConfig,
    privileged: bool,
) -> Result<(Vec<LinuxDevice>, Vec<LinuxDeviceCgroup>), Error> {
    let mut devices = Vec::new();
    let mut rules = Vec::new();
    if privileged {
        let all = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .access("rwm")
            .build()
            .map_err(spec_error)?;
        rules.push(all);
        devices = host_devices(Path::new("/dev"), Path::new("/dev"))?;
    }
    for device in &config.devices {
        let host = Path::new(&device.host_path);
        let found = host_devices(host, Path::new(&device.container_path))?;
        if found.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "device {}: not a device node or a directory of them",
                device.host_path
            )));
        }
        let access = if device.permissions.is_empty() {
            "rwm"
        } else {
            device.permissions.as_str()
        };
        for node in &found {
            let rule = LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(node.typ())
                .major(node.major())
                .minor(node.minor())
                .access(access)
                .build()
                .map_err(spec_error)?;
            rules.push(rule);
        }
        devices.retain(|d| found.iter().all(|f| f.path() != d.path()));
        devices.extend(found);
    }
    Ok((devices, rules))
}

/// What a walk of the host's `/dev` leaves out, as containerd does: directories of
/// devices that are not the host's own, and the console.
const NOT_HOST_DEVICES: [&str; 8] = [
    "pts",
    "shm",
    "fd",
    "mqueue",
    ".lxc",
    ".lxd-mounts",
    ".udev",
    "console",
];

/// The device nodes at `host` (itself, or below it when a directory, leaving out
/// [`NOT_HOST_DEVICES`] and nodes that vanish while walking), placed under `target`, with
/// the host node's mode and owner.
fn host_devices(host: &Path, target: &Path) -> Result<Vec<LinuxDevice>, Error> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let meta = std::fs::metadata(host)
        .map_err(|e| Error::InvalidArgument(format!("device {}: {e}", host.display())))?;
    let kind = meta.file_type();
    if kind.is_dir() {
        let entries = std::fs::read_dir(host)
            .map_err(|e| Error::InvalidArgument(format!("device {}: {e}", host.display())))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let skipped = NOT_HOST_DEVICES.map(std::ffi::OsStr::new);
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            if skipped.contains(&name.as_os_str()) || is_link {
                continue;
            }
            match host_devices(&entry.path(), &target.join(&name)) {
                Ok(nodes) => found.extend(nodes),
                Err(_) if !entry.path().exists() => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(found);
    }
    let typ = if kind.is_char_device() {
        LinuxDeviceType::C
    } else if kind.is_block_device() {
        LinuxDeviceType::B
    } else {
        return Ok(Vec::new());
    };
    let rdev = meta.rdev();
    LinuxDeviceBuilder::default()
        .path(target)
        .typ(typ)
        .major(libc::major(rdev) as i64)
        .minor(libc::minor(rdev) as i64)
        .file_mode(meta.mode() & 0o777)
        .uid(meta.uid())
        .gid(meta.gid())
        .build()
        .map(|d| vec![d])
        .map_err(spec_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(command: &[&str], args: &[&str]) -> cri::ContainerConfig {
        cri::ContainerConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: vec![cri::KeyValue {
                key: "B".into(),
                value: "cri".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn command_args_entrypoint_and_cmd_combine_as_in_containerd() {
        let image = serde_json::json!({"Entrypoint": ["/entry"], "Cmd": ["cmd"]});
        assert_eq!(args(&config(&[], &[]), &image).unwrap(), ["/entry", "cmd"]);
        assert_eq!(args(&config(&[], &["a"]), &image).unwrap(), ["/entry", "a"]);
        assert_eq!(args(&config(&["/c"], &["a"]), &image).unwrap(), ["/c", "a"]);
        let blank = serde_json::json!({"Entrypoint": [""], "Cmd": ["cmd"]});
        assert_eq!(args(&config(&[], &[]), &blank).unwrap(), ["cmd"]);
        assert!(args(&config(&[], &[]), &serde_json::json!({})).is_err());
    }

    #[test]
    fn later_environment_keys_win() {
        let image = serde_json::json!({"Env": ["PATH=/image", "A=image", "B=image"]});
        let env = env(&config(&[], &[]), &image, "pod");
        assert_eq!(env, ["HOSTNAME=pod", "PATH=/image", "A=image", "B=cri"]);
    }

    #[test]
    fn users_resolve_in_the_rootfs_and_groups_merge() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nweb:x:1000:1000::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.path().join("etc/group"),
            "web:x:1000:\nextra:x:50000:web\nusers:x:100:\n",
        )
        .unwrap();
        let security = cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            supplemental_groups: vec![1234],
            ..Default::default()
        };
        let user = user(&security, &serde_json::json!({}), root.path()).unwrap();
        assert_eq!((user.uid(), user.gid()), (1000, 1000));
        assert_eq!(user.additional_gids().clone().unwrap(), [1000, 1234, 50000]);
        let strict = cri::LinuxContainerSecurityContext {
            supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
            ..security.clone()
        };
        let user = super::user(&strict, &serde_json::json!({}), root.path()).unwrap();
        assert_eq!(user.additional_gids().clone().unwrap(), [1000, 1234]);
        let by_name = cri::LinuxContainerSecurityContext {
            run_as_username: "web".into(),
            run_as_group: Some(cri::Int64Value { value: 100 }),
            ..Default::default()
        };
        let user = super::user(&by_name, &serde_json::json!({}), root.path()).unwrap();
        assert_eq!((user.uid(), user.gid()), (1000, 100));
        let image_user = serde_json::json!({"User": "4242"});
        let user = super::user(&Default::default(), &image_user, root.path()).unwrap();
        assert_eq!((user.uid(), user.gid()), (4242, 0));
        let nobody = serde_json::json!({"User": "ghost"});
        assert!(super::user(&Default::default(), &nobody, root.path()).is_err());
    }

    #[test]
    fn capabilities_start_from_containerds_and_all_comes_first() {
        let caps = |add: &[&str], drop: &[&str]| {
            let security = cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                    drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            capabilities(&security).unwrap().bounding().clone().unwrap()
        };
        let default = caps(&[], &[]);
        assert_eq!(default.len(), 14);
        assert!(caps(&["NET_ADMIN"], &[]).contains(&Capability::NetAdmin));
        assert!(!caps(&[], &["NET_RAW"]).contains(&Capability::NetRaw));
        assert_eq!(caps(&["ALL"], &[]), bounding_set());
        assert!(bounding_set().contains(&Capability::SysAdmin));
        assert_eq!(
            caps(&["CHOWN"], &["ALL"]),
            HashSet::from([Capability::Chown])
        );
    }

    fn placement(recursive_read_only: bool) -> Placement {
        Placement {
            rootfs: "/b/rootfs".into(),
            sandbox_pid: 1,
            sandbox_files: "/s/files".into(),
            shm: "/s/shm".into(),
            hostname: "pod".into(),
            cgroups_path: "/runtimed/c".into(),
            sandbox_privileged: false,
            handler: "crun".into(),
            recursive_read_only,
            userns: None,
            idmapped: Default::default(),
        }
    }

    #[test]
    fn recursive_read_only_mounts_are_rro_or_refused_by_name() {
        let host = tempfile::tempdir().unwrap();
        let mount = |readonly, propagation: cri::MountPropagation| cri::Mount {
            container_path: "/data".into(),
            host_path: host.path().display().to_string(),
            readonly,
            recursive_read_only: true,
            propagation: propagation as i32,
            ..Default::default()
        };
        let private = cri::MountPropagation::PropagationPrivate;
        let made = cri_mount(&mount(true, private), &placement(true)).unwrap();
        let options = made.options().clone().unwrap();
        assert!(options.contains(&"rro".to_string()), "{options:?}");
        assert!(!options.contains(&"ro".to_string()), "{options:?}");
        let refusals = [
            (mount(false, private), placement(true), "needs readonly"),
            (
                mount(true, cri::MountPropagation::PropagationHostToContainer),
                placement(true),
                "private propagation",
            ),
            (mount(true, private), placement(false), "handler \"crun\""),
        ];
        for (mount, placement, why) in refusals {
            let err = cri_mount(&mount, &placement).unwrap_err().to_string();
            assert!(err.contains("/data") && err.contains(why), "{err}");
        }
    }

    #[test]
    fn hugepages_swap_and_unified_reach_the_cgroup_the_host_has() {
        let resources = cri::LinuxContainerResources {
            memory_limit_in_bytes: 1 << 24,
            memory_swap_limit_in_bytes: 1 << 25,
            hugepage_limits: vec![cri::HugepageLimit {
                page_size: "2MB".into(),
                limit: 1 << 22,
            }],
            unified: [("memory.high".to_string(), "max".to_string())].into(),
            ..Default::default()
        };
        let all = Controllers {
            swap: true,
            hugetlb: true,
        };
        let json = serde_json::to_value(limits(&resources, all).unwrap()).unwrap();
        assert_eq!(json["memory"]["swap"], 1 << 25);
        assert_eq!(json["hugepageLimits"][0]["pageSize"], "2MB");
        assert_eq!(json["hugepageLimits"][0]["limit"], 1 << 22);
        assert_eq!(json["unified"]["memory.high"], "max");
        let no_swap_given = cri::LinuxContainerResources {
            memory_swap_limit_in_bytes: 0,
            ..resources.clone()
        };
        let json = serde_json::to_value(limits(&no_swap_given, all).unwrap()).unwrap();
        assert_eq!(json["memory"]["swap"], 1 << 24, "no swap beyond the limit");
        let none = Controllers {
            swap: false,
            hugetlb: false,
        };
        let json = serde_json::to_value(limits(&resources, none).unwrap()).unwrap();
        assert_eq!(json["memory"].get("swap"), None);
        assert_eq!(json.get("hugepageLimits"), None);
    }

    #[test]
    fn apparmor_profiles_are_refused_where_they_cannot_be_applied() {
        use cri::security_profile::ProfileType;
        let with = |kind: ProfileType, name: &str| cri::LinuxContainerSecurityContext {
            apparmor: Some(cri::SecurityProfile {
                profile_type: kind as i32,
                localhost_ref: name.into(),
            }),
            ..Default::default()
        };
        assert_eq!(apparmor(&Default::default(), false).unwrap(), None);
        assert_eq!(
            apparmor(&with(ProfileType::Unconfined, ""), false).unwrap(),
            None
        );
        let err = apparmor(&with(ProfileType::RuntimeDefault, ""), false).unwrap_err();
        assert!(err.to_string().contains("does not have AppArmor"), "{err}");
        let err = apparmor(&with(ProfileType::Localhost, "no-such-profile"), true).unwrap_err();
        assert!(
            err.to_string().contains("apparmor/profiles"),
            "a profiles table that cannot be read is named: {err}"
        );
        let err = apparmor(&with(ProfileType::RuntimeDefault, ""), true).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        #[allow(deprecated)]
        let bad = cri::LinuxContainerSecurityContext {
            apparmor_profile: "bogus".into(),
            ..Default::default()
        };
        assert!(
            apparmor(&bad, true)
                .unwrap_err()
                .to_string()
                .contains("\"bogus\"")
        );
    }
}
