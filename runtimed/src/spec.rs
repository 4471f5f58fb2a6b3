//! OCI runtime specs, built with the `oci-spec` crate on its defaults (runc's: default
//! mounts, masked and read-only paths, capabilities, `RLIMIT_NOFILE`), changed the way
//! containerd's CRI plugin changes them.

use oci_spec::OciSpecError;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResourcesBuilder, Mount, MountBuilder, RootBuilder, Spec,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What the sandbox's infra process is made of.
#[derive(Debug, Clone)]
pub struct SandboxProcess {
    /// The pod's hostname; ignored in the host's UTS namespace.
    pub hostname: String,
    /// The pinned network namespace to join; `None` for host network (which also means the
    /// host's UTS namespace, as containerd and the kubelet expect).
    pub netns: Option<PathBuf>,
    /// The pod's pinned user namespace and its mappings; `None` in the node's.
    pub userns: Option<(PathBuf, crate::userns::Mappings)>,
    /// Stay in the host's PID namespace.
    pub host_pid: bool,
    /// Stay in the host's IPC namespace (and use the host's `/dev/shm`).
    pub host_ipc: bool,
    /// The sandbox's own `/dev/shm` (a tmpfs), bound in when it has its own IPC namespace.
    pub shm: PathBuf,
    /// Entrypoint and Cmd of the pause image.
    pub args: Vec<String>,
    /// The pause image's `Env`.
    pub env: Vec<String>,
    /// cgroups path, in the form of the cgroup driver.
    pub cgroups_path: String,
    /// Pod sysctls, applied in the pod's namespaces.
    pub sysctls: HashMap<String, String>,
    /// The OOM score the kubelet gives sandboxes (-998), clamped to what this process may set.
    pub oom_score_adj: i32,
}

/// containerd gives the pause process the smallest CPU weight.
const SANDBOX_CPU_SHARES: u64 = 2;

/// The spec of a sandbox's infra process, with its rootfs at `rootfs` (read-only).
pub fn sandbox(process: &SandboxProcess, rootfs: &Path) -> Result<Spec, OciSpecError> {
    let mut spec = Spec::default();
    spec.set_root(Some(
        RootBuilder::default().path(rootfs).readonly(true).build()?,
    ));
    let mut namespaces = vec![namespace(LinuxNamespaceType::Mount, None)?];
    if let Some((path, _)) = &process.userns {
        namespaces.push(namespace(LinuxNamespaceType::User, Some(path))?);
    }
    if let Some(netns) = &process.netns {
        namespaces.push(namespace(LinuxNamespaceType::Network, Some(netns))?);
        namespaces.push(namespace(LinuxNamespaceType::Uts, None)?);
        spec.set_hostname(Some(process.hostname.clone()));
    } else {
        spec.set_hostname(None);
    }
    if !process.host_pid {
        namespaces.push(namespace(LinuxNamespaceType::Pid, None)?);
    }
    if !process.host_ipc {
        namespaces.push(namespace(LinuxNamespaceType::Ipc, None)?);
    }
    let shm = if process.host_ipc {
        Path::new("/dev/shm")
    } else {
        process.shm.as_path()
    };
    let mounts = spec.mounts().clone().unwrap_or_default();
    spec.set_mounts(Some(with_shm(mounts, shm)?));
    if let Some(p) = spec.process_mut().as_mut() {
        p.set_args(Some(process.args.clone()));
        p.set_env(Some(process.env.clone()));
        p.set_cwd(PathBuf::from("/"));
        p.set_oom_score_adj(Some(process.oom_score_adj));
    }
    if let Some(linux) = spec.linux_mut().as_mut() {
        linux.set_namespaces(Some(namespaces));
        if let Some((_, mappings)) = &process.userns {
            let (uids, gids) = mappings.oci();
            linux.set_uid_mappings(Some(uids));
            linux.set_gid_mappings(Some(gids));
        }
        linux.set_cgroups_path(Some(PathBuf::from(&process.cgroups_path)));
        linux.set_sysctl(Some(process.sysctls.clone()));
        let cpu = LinuxCpuBuilder::default()
            .shares(SANDBOX_CPU_SHARES)
            .build()?;
        let resources = LinuxResourcesBuilder::default().cpu(cpu).build()?;
        linux.set_resources(Some(resources));
    }
    Ok(spec)
}

fn namespace(
    kind: LinuxNamespaceType,
    path: Option<&Path>,
) -> Result<LinuxNamespace, OciSpecError> {
    let builder = LinuxNamespaceBuilder::default().typ(kind);
    match path {
        Some(path) => builder.path(path).build(),
        None => builder.build(),
    }
}

/// The default mounts with `/dev/shm` replaced by a read-only bind of `shm`.
fn with_shm(mounts: Vec<Mount>, shm: &Path) -> Result<Vec<Mount>, OciSpecError> {
    let mut mounts: Vec<Mount> = mounts
        .into_iter()
        .filter(|m| m.destination() != Path::new("/dev/shm"))
        .collect();
    mounts.push(
        MountBuilder::default()
            .destination("/dev/shm")
            .typ("bind")
            .source(shm)
            .options(vec![
                "rbind".to_string(),
                "ro".to_string(),
                "nosuid".to_string(),
                "nodev".to_string(),
                "noexec".to_string(),
            ])
            .build()?,
    );
    Ok(mounts)
}

/// The lowest OOM score this process may give a child: its own, unless it may lower
/// scores (CAP_SYS_RESOURCE), as containerd's `restrict_oom_score_adj` does.
pub fn clamp_oom_score_adj(requested: i32) -> i32 {
    let own = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(0);
    requested.max(own)
}

/// Whether the running kernel is `major.minor` or newer.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(netns: Option<&str>) -> SandboxProcess {
        SandboxProcess {
            hostname: "pod-a".into(),
            netns: netns.map(PathBuf::from),
            userns: None,
            host_pid: false,
            host_ipc: false,
            shm: PathBuf::from("/run/rtd/s1/shm"),
            args: vec!["/pause".into()],
            env: vec!["PATH=/bin".into()],
            cgroups_path: "/runtimed/s1".into(),
            sysctls: HashMap::from([("kernel.shm_rmid_forced".into(), "1".into())]),
            oom_score_adj: -998,
        }
    }

    fn shm_source(spec: &Spec) -> PathBuf {
        let mounts = spec.mounts().clone().unwrap();
        let shm = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/dev/shm"));
        shm.unwrap().source().clone().unwrap()
    }

    fn kinds(spec: &Spec) -> Vec<(LinuxNamespaceType, Option<PathBuf>)> {
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        namespaces
            .iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect()
    }

    #[test]
    fn a_pod_network_sandbox_joins_its_netns_and_owns_uts_pid_ipc() {
        let spec = sandbox(&process(Some("/run/rtd/netns/s1")), Path::new("/b/rootfs")).unwrap();
        assert_eq!(
            kinds(&spec),
            [
                (LinuxNamespaceType::Mount, None),
                (
                    LinuxNamespaceType::Network,
                    Some("/run/rtd/netns/s1".into())
                ),
                (LinuxNamespaceType::Uts, None),
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Ipc, None),
            ]
        );
        assert_eq!(spec.hostname().as_deref(), Some("pod-a"));
        let root = spec.root().as_ref().unwrap();
        assert_eq!(
            (root.path().as_path(), root.readonly()),
            (Path::new("/b/rootfs"), Some(true))
        );
        assert_eq!(shm_source(&spec), Path::new("/run/rtd/s1/shm"));
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["process"]["args"], serde_json::json!(["/pause"]));
        assert_eq!(json["process"]["oomScoreAdj"], -998);
        assert_eq!(json["linux"]["resources"]["cpu"]["shares"], 2);
        assert_eq!(json["linux"]["sysctl"]["kernel.shm_rmid_forced"], "1");
        assert_eq!(json["linux"]["cgroupsPath"], "/runtimed/s1");
    }

    #[test]
    fn host_namespaces_are_left_out() {
        let mut host = process(None);
        host.host_pid = true;
        host.host_ipc = true;
        let spec = sandbox(&host, Path::new("/b/rootfs")).unwrap();
        assert_eq!(kinds(&spec), [(LinuxNamespaceType::Mount, None)]);
        assert_eq!(spec.hostname(), &None);
        assert_eq!(shm_source(&spec), Path::new("/dev/shm"));
    }

    #[test]
    fn oom_scores_below_our_own_are_raised_to_it() {
        let own: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(clamp_oom_score_adj(-1000), own.max(-1000));
        assert_eq!(clamp_oom_score_adj(1000), 1000);
    }
}
