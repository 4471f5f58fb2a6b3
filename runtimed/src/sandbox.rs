//! Pod sandboxes: the namespaces a pod's containers share, held by the pause image's
//! process under conmon, with the pod's network attached through CNI.
//!
//! RunPodSandbox, in containerd's order: reserve the name, write hostname, hosts and
//! resolv.conf, mount the pod's `/dev/shm`, pin a network namespace and attach it (loopback,
//! then the pod network), prepare the pause image's rootfs through imaged, then create and
//! start the infra process. A failure at any step undoes the steps before it.

use crate::cni::{self, Attachment, CniResult, Network};
use crate::container_spec;
use crate::error::Error;
use crate::images::Image;
use crate::oci::{Conmon, Create, Runtime};
use crate::seccomp;
use crate::spec::{self, SandboxProcess};
use crate::userns::Mappings;
use oci_spec::runtime::Spec;
use proto::cri;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What is kept of a sandbox, in memory and in `<root>/sandboxes/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sandbox {
    /// 64 hex digits.
    pub id: String,
    /// The request's config, as given.
    pub config: cri::PodSandboxConfig,
    /// The handler that runs its processes.
    pub runtime_handler: String,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    /// The pinned network namespace; `None` for host network.
    pub netns: Option<PathBuf>,
    /// The pinned user namespace; `None` in the node's.
    #[serde(default)]
    pub userns: Option<PathBuf>,
    /// The pod network's ADD result, kept for DEL.
    pub cni_result: Option<serde_json::Value>,
    /// Set once the pod's network was detached, so it happens once.
    pub network_detached: bool,
    /// The infra process on the host.
    pub pid: i64,
    /// The pause image's id.
    pub image: String,
    /// Set by StopPodSandbox.
    pub stopped: bool,
}

/// Where a sandbox's files are.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The bundle: `config.json`, `rootfs`, `shm`, conmon's files (under `state`).
    pub bundle: PathBuf,
    /// hostname, hosts, resolv.conf (under `root`, kept across reboots).
    pub files: PathBuf,
}

impl Paths {
    /// The directories of sandbox `id`.
    pub fn new(root: &Path, state: &Path, id: &str) -> Self {
        Self {
            bundle: state.join("sandboxes").join(id),
            files: root.join("sandboxes").join(id),
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }

    fn shm(&self) -> PathBuf {
        self.bundle.join("shm")
    }
}

/// The namespace options of a sandbox's config (POD for each when unset).
pub fn namespace_options(config: &cri::PodSandboxConfig) -> cri::NamespaceOption {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

impl Sandbox {
    /// The pod's user namespace mappings; `None` in the node's user namespace.
    pub fn mappings(&self) -> Result<Option<Mappings>, Error> {
        Mappings::of(&namespace_options(&self.config))
    }

    /// The pod's pinned user namespace with its mappings; `None` in the node's.
    pub fn pinned_userns(&self) -> Result<Option<(PathBuf, Mappings)>, Error> {
        Ok(self.userns.clone().zip(self.mappings()?))
    }

    /// Whether the pod uses the host's network.
    pub fn host_network(&self) -> bool {
        namespace_options(&self.config).network() == cri::NamespaceMode::Node
    }

    /// `name_namespace_uid_attempt`, the key that makes a sandbox unique, as containerd
    /// reserves it.
    pub fn reserved_name(config: &cri::PodSandboxConfig) -> String {
        let m = config.metadata.clone().unwrap_or_default();
        format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
    }

    /// The pod's IPs, IPv4 first.
    pub fn ips(&self) -> Vec<String> {
        let result = self.cni_result.clone().map(|raw| CniResult { raw });
        let ips = result.map(|r| r.pod_ips("eth0")).unwrap_or_default();
        ips.iter().map(ToString::to_string).collect()
    }

    /// The CNI attachment of this pod to a network, on interface `ifname`.
    pub fn attachment(&self, ifname: &str) -> Attachment {
        let m = self.config.metadata.clone().unwrap_or_default();
        let mappings: Vec<serde_json::Value> = self
            .config
            .port_mappings
            .iter()
            .filter(|p| p.host_port > 0)
            .map(|p| {
                serde_json::json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": protocol(p.protocol()),
                    "hostIP": p.host_ip,
                })
            })
            .collect();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("portMappings".into(), mappings.into());
        if let Some(dns) = &self.config.dns_config {
            let dns = serde_json::json!({
                "servers": dns.servers, "searches": dns.searches, "options": dns.options,
            });
            capabilities.insert("dns".into(), dns);
        }
        Attachment {
            container_id: self.id.clone(),
            netns: self.netns.clone().unwrap_or_default(),
            ifname: ifname.into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), m.namespace),
                ("K8S_POD_NAME".into(), m.name),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), self.id.clone()),
                ("K8S_POD_UID".into(), m.uid),
            ],
            capabilities,
        }
    }
}

fn protocol(protocol: cri::Protocol) -> &'static str {
    match protocol {
        cri::Protocol::Tcp => "tcp",
        cri::Protocol::Udp => "udp",
        cri::Protocol::Sctp => "sctp",
    }
}

/// What building a sandbox needs from the service.
pub struct Setup<'a> {
    /// Its directories.
    pub paths: &'a Paths,
    /// The runtime handler.
    pub runtime: &'a Runtime,
    /// conmon.
    pub conmon: &'a Conmon,
    /// The pause image.
    pub image: &'a Image,
    /// cgroups path for the infra process.
    pub cgroups_path: String,
}

/// Writes hostname, hosts and resolv.conf, and mounts the pod's `/dev/shm`.
pub fn prepare_files(sandbox: &Sandbox, paths: &Paths) -> Result<(), Error> {
    let files = &paths.files;
    std::fs::create_dir_all(files).map_err(Error::io("create directory", files))?;
    let hostname = hostname(&sandbox.config);
    write(&files.join("hostname"), format!("{hostname}\n").as_bytes())?;
    let hosts = std::fs::read("/etc/hosts").unwrap_or_default();
    write(&files.join("hosts"), &hosts)?;
    write(
        &files.join("resolv.conf"),
        &resolv_conf(sandbox.config.dns_config.as_ref()),
    )?;
    if let Some((uid, gid)) = sandbox.mappings()?.and_then(|m| m.host_root()) {
        for file in ["hostname", "hosts", "resolv.conf"] {
            let path = files.join(file);
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(Error::io("hand to the pod's root", &path))?;
        }
    }
    let shm = paths.shm();
    std::fs::create_dir_all(&shm).map_err(Error::io("create directory", &shm))?;
    if !namespace_options(&sandbox.config)
        .ipc
        .eq(&(cri::NamespaceMode::Node as i32))
    {
        let mut data = "mode=1777,size=67108864".to_string();
        if let Some((uid, gid)) = sandbox.mappings()?.and_then(|m| m.host_root()) {
            data.push_str(&format!(",uid={uid},gid={gid}"));
        }
        let data = std::ffi::CString::new(data).expect("no NUL in tmpfs options");
        rustix::mount::mount(
            "shm",
            &shm,
            "tmpfs",
            rustix::mount::MountFlags::NOSUID
                | rustix::mount::MountFlags::NODEV
                | rustix::mount::MountFlags::NOEXEC,
            Some(data.as_c_str()),
        )
        .map_err(|e| Error::io("mount tmpfs on", &shm)(e.into()))?;
    }
    Ok(())
}

fn write(path: &Path, content: &[u8]) -> Result<(), Error> {
    std::fs::write(path, content).map_err(Error::io("write", path))
}

/// The pod's hostname: the config's, else the node's.
pub fn hostname(config: &cri::PodSandboxConfig) -> String {
    if !config.hostname.is_empty() {
        return config.hostname.clone();
    }
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// resolv.conf from the DNS config as containerd writes it, or the node's when none.
pub fn resolv_conf(dns: Option<&cri::DnsConfig>) -> Vec<u8> {
    let Some(dns) = dns else {
        return std::fs::read("/etc/resolv.conf").unwrap_or_default();
    };
    let mut text = String::new();
    if !dns.searches.is_empty() {
        text.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for server in &dns.servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    text.into_bytes()
}

/// Pins the network namespace and attaches loopback and the pod network; returns the pod
/// network's result.
pub fn attach_network(
    sandbox: &Sandbox,
    network: &Network,
    bin_dir: &str,
) -> Result<CniResult, Error> {
    let netns = sandbox
        .netns
        .as_ref()
        .expect("pod network sandboxes have a netns");
    match sandbox.pinned_userns()? {
        Some((userns, mappings)) => crate::userns::create(&mappings, &userns, netns)
            .map_err(Error::io("create user and network namespaces", &userns))?,
        None => {
            crate::netns::create(netns).map_err(Error::io("create network namespace", netns))?
        }
    }
    Network::new(cni::invoke::loopback(), bin_dir).add(&sandbox.attachment("lo"))?;
    Ok(network.add(&sandbox.attachment("eth0"))?)
}

/// Writes the infra process's spec and starts it under conmon; returns its pid.
pub fn start_infra(sandbox: &Sandbox, setup: &Setup<'_>) -> Result<i64, Error> {
    let options = namespace_options(&sandbox.config);
    let image = &setup.image.config;
    let mut args: Vec<String> = container_spec::strings(&image["Entrypoint"]);
    args.extend(container_spec::strings(&image["Cmd"]));
    if args.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "pause image {} has neither Entrypoint nor Cmd",
            setup.image.name
        )));
    }
    let sysctls: HashMap<String, String> = sandbox
        .config
        .linux
        .as_ref()
        .map(|l| l.sysctls.clone())
        .unwrap_or_default();
    let process = SandboxProcess {
        hostname: hostname(&sandbox.config),
        netns: sandbox.netns.clone(),
        userns: sandbox.pinned_userns()?,
        host_pid: options.pid() == cri::NamespaceMode::Node,
        host_ipc: options.ipc() == cri::NamespaceMode::Node,
        shm: setup.paths.shm(),
        args,
        env: container_spec::strings(&image["Env"]),
        cgroups_path: setup.cgroups_path.clone(),
        sysctls,
        oom_score_adj: spec::clamp_oom_score_adj(-998),
    };
    let mut spec = spec::sandbox(&process, &setup.paths.rootfs()).map_err(|e| {
        Error::InvalidArgument(format!("pod sandbox {}: runtime spec: {e}", sandbox.id))
    })?;
    infra_seccomp(&mut spec, &sandbox.config)?;
    let config = setup.paths.bundle.join("config.json");
    let json = serde_json::to_vec_pretty(&spec).expect("spec serialises");
    write(&config, &json)?;
    let name = Sandbox::reserved_name(&sandbox.config);
    let create = Create {
        id: &sandbox.id,
        name: &name,
        bundle: &setup.paths.bundle,
        log: &setup.paths.bundle.join("infra.log"),
        stdio: Default::default(),
    };
    let pid = setup.conmon.create(setup.runtime, &create)?;
    setup.runtime.start(&sandbox.id)?;
    Ok(pid)
}

/// The pod's seccomp profile on the infra process, as containerd applies it; none in a
/// privileged pod.
fn infra_seccomp(spec: &mut Spec, config: &cri::PodSandboxConfig) -> Result<(), Error> {
    let security = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.clone())
        .unwrap_or_default();
    if security.privileged {
        return Ok(());
    }
    #[allow(deprecated, reason = "critest 1.26 sends only the deprecated string")]
    let path = &security.seccomp_profile_path;
    let capabilities = spec
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().clone());
    let bounding = capabilities.and_then(|c| c.bounding().clone());
    let bounding = bounding.unwrap_or_default();
    let profile = seccomp::for_request(security.seccomp.as_ref(), path, &bounding)?;
    if let Some(linux) = spec.linux_mut() {
        linux.set_seccomp(profile);
    }
    Ok(())
}

/// Stops the infra process (SIGKILL: it holds nothing worth a grace period) and waits
/// until conmon recorded its exit. A sandbox whose infra process never started has none.
pub fn stop_infra(sandbox: &Sandbox, runtime: &Runtime, conmon: &Conmon) -> Result<(), Error> {
    if sandbox.pid == 0 || conmon.exit_status(&sandbox.id).is_some() {
        return Ok(());
    }
    match runtime.state(&sandbox.id)? {
        Some(state) if state.status != "stopped" => {
            if let Err(e) = runtime.kill(&sandbox.id, "KILL") {
                tracing::debug!(error = %e, "kill of the infra process");
            }
        }
        _ => return Ok(()),
    }
    for _ in 0..200 {
        if conmon.exit_status(&sandbox.id).is_some() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    Err(Error::FailedPrecondition(format!(
        "pod sandbox {}: the infra process did not exit after SIGKILL",
        sandbox.id
    )))
}

/// Detaches the pod network (once) and deletes the pinned namespace.
pub fn detach_network(
    sandbox: &mut Sandbox,
    network: Option<&Network>,
    bin_dir: &str,
) -> Result<(), Error> {
    let Some(netns) = sandbox.netns.clone() else {
        return Ok(());
    };
    if !sandbox.network_detached && netns.exists() {
        if let Some(network) = network {
            let added = sandbox.cni_result.clone().map(|raw| CniResult { raw });
            network.del(&sandbox.attachment("eth0"), added.as_ref())?;
        }
        let loopback = Network::new(cni::invoke::loopback(), bin_dir);
        if let Err(e) = loopback.del(&sandbox.attachment("lo"), None) {
            tracing::debug!(error = %e, "loopback DEL");
        }
    }
    sandbox.network_detached = true;
    if let Some(userns) = &sandbox.userns {
        crate::netns::remove(userns).map_err(Error::io("remove user namespace", userns))?;
    }
    crate::netns::remove(&netns).map_err(Error::io("remove network namespace", &netns))
}

/// Removes the infra container's runtime state, the rootfs mount, `/dev/shm` and the
/// sandbox's directories. Everything that is already gone is fine; the mounts and
/// directories go even when the runtime fails, and its error is returned after.
pub fn remove_files(
    sandbox: &Sandbox,
    paths: &Paths,
    runtime: &Runtime,
    conmon: &Conmon,
) -> Result<(), Error> {
    let deleted = delete_state(runtime, &sandbox.id);
    let _ = std::fs::remove_file(conmon.exits.join(&sandbox.id));
    remove_bundle(&paths.bundle)?;
    remove_dir(&paths.files)?;
    deleted
}

/// Deletes the runtime's state of `id` when it has one.
pub fn delete_state(runtime: &Runtime, id: &str) -> Result<(), Error> {
    if runtime.state(id)?.is_some() {
        runtime.delete(id)?;
    }
    Ok(())
}

/// Unmounts everything mounted at or below `dir` (deepest first), then removes it. A
/// mount that stays, or a mount table that cannot be read, is an error and the directory
/// is left, since removing it would reach through a mount into what it shows (image
/// layers, volumes).
pub fn remove_bundle(dir: &Path) -> Result<(), Error> {
    let dir = match std::fs::canonicalize(dir) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("resolve", dir)(e)),
    };
    let mut mounted = mounts_under(&dir)?;
    mounted.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for mountpoint in &mounted {
        let _ = plumbing::mount::unmount(mountpoint);
    }
    if let Some(left) = mounts_under(&dir)?.first() {
        return Err(Error::io("unmount", left)(std::io::Error::other(
            "still mounted; not removing the directory",
        )));
    }
    remove_dir(&dir)
}

/// The mount points at or below `dir` (a resolved path), from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let table = Path::new("/proc/self/mountinfo");
    let info = std::fs::read_to_string(table).map_err(Error::io("read", table))?;
    Ok(info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|point| point.starts_with(dir))
        .collect())
}

/// Mountinfo writes space, tab, newline and backslash as three octal digits.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let digits: String = chars.by_ref().take(3).collect();
        match u8::from_str_radix(&digits, 8) {
            Ok(byte) => out.push(byte as char),
            Err(_) => {
                out.push('\\');
                out.push_str(&digits);
            }
        }
    }
    out
}

/// Removes `dir` and everything under it; one that is gone is fine.
pub fn remove_dir(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", dir)(e)),
        _ => Ok(()),
    }
}

/// Mounts the rootfs imaged prepared at `<bundle>/rootfs` (a sandbox's or a container's),
/// idmapped for the pod's user namespace when it has one (its layers cloned under
/// `<bundle>/idmap`).
pub fn mount_rootfs(
    bundle: &Path,
    mounts: &[plumbing::mount::Mount],
    userns: Option<(&Path, &Mappings)>,
) -> Result<(), Error> {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(Error::io("create directory", &rootfs))?;
    let mounted = match userns {
        Some(userns) => {
            let layers = bundle.join("idmap");
            crate::userns::mount_rootfs(mounts, &rootfs, &layers, userns).map_err(|e| e.to_string())
        }
        None => plumbing::mount::Mount::mount_all(mounts, &rootfs).map_err(|e| e.to_string()),
    };
    mounted.map_err(|message| Error::Io {
        what: "mount rootfs",
        path: rootfs.clone(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_is_written_as_containerd_writes_it() {
        let dns = cri::DnsConfig {
            servers: vec!["10.10.10.10".into(), "10.10.10.11".into()],
            searches: vec!["google.com".into(), "svc.local".into()],
            options: vec!["ndots:8".into()],
        };
        assert_eq!(
            String::from_utf8(resolv_conf(Some(&dns))).unwrap(),
            "search google.com svc.local\nnameserver 10.10.10.10\nnameserver 10.10.10.11\noptions ndots:8\n"
        );
    }

    #[test]
    fn only_mappings_with_a_host_port_reach_cni() {
        let config = cri::PodSandboxConfig {
            port_mappings: vec![
                cri::PortMapping {
                    container_port: 80,
                    ..Default::default()
                },
                cri::PortMapping {
                    container_port: 80,
                    host_port: 12000,
                    ..Default::default()
                },
            ],
            metadata: Some(cri::PodSandboxMetadata {
                name: "p".into(),
                namespace: "ns".into(),
                uid: "u".into(),
                attempt: 2,
            }),
            ..Default::default()
        };
        let sandbox = Sandbox {
            id: "s".into(),
            config,
            runtime_handler: String::new(),
            created_at: 1,
            netns: Some("/n".into()),
            userns: None,
            cni_result: None,
            network_detached: false,
            pid: 0,
            image: String::new(),
            stopped: false,
        };
        let attachment = sandbox.attachment("eth0");
        assert_eq!(
            attachment.capabilities["portMappings"],
            serde_json::json!([{"hostPort": 12000, "containerPort": 80, "protocol": "tcp", "hostIP": ""}])
        );
        assert_eq!(Sandbox::reserved_name(&sandbox.config), "p_ns_u_2");
        assert!(
            attachment
                .args
                .contains(&("K8S_POD_NAME".into(), "p".into()))
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
