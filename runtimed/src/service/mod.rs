//! The runtime service's logic on plain Rust types: what each RPC answers, without gRPC
//! concerns.

mod containers;
pub use containers::Running;
mod recover;
mod stats;

use crate::cni::{self, Network};
use crate::config::{CgroupDriver, Config};
use crate::container::Container;
use crate::error::Error;
use crate::images::{Image, Images};
use crate::oci::{self, Conmon, Runtime};
use crate::sandbox::{self, Paths, Sandbox, Setup};
use crate::store::Store;
use proto::cri;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use tokio::sync::{Mutex, RwLock};

/// The CRI version this service speaks, as `VersionResponse.version` reports it.
const KUBELET_API_VERSION: &str = "0.1.0";
/// The name the kubelet shows as `<runtime_name>://<version>`.
const RUNTIME_NAME: &str = "runtimed";

/// runtimed's runtime service.
pub struct RuntimeService {
    config: Config,
    images: Images,
    sandboxes_store: Store,
    sandboxes: RwLock<BTreeMap<String, Sandbox>>,
    containers_store: Store,
    containers: RwLock<BTreeMap<String, Container>>,
    /// Sandbox lifecycle changes one at a time, so a name is reserved once and a network
    /// attached and detached once.
    lifecycle: Mutex<()>,
    /// Container creations, starts and removals one at a time (taken after `lifecycle`
    /// when both are needed), so a name is reserved once.
    containers_lock: Mutex<()>,
    /// The last CPU reading of each container (time, CPU nanoseconds), for the rate.
    cpu_samples: Mutex<HashMap<String, (i64, u64)>>,
    /// What each configured handler can do, asked once at start-up.
    features: BTreeMap<String, oci::Features>,
}

impl RuntimeService {
    /// A service configured by `config`, with the sandboxes recorded under its root.
    pub fn open(config: Config) -> std::io::Result<Self> {
        let sandboxes_store = Store::open(config.root.join("sandboxes"))?;
        let sandboxes = sandboxes_store
            .load::<Sandbox>()?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let containers_store = Store::open(config.root.join("containers"))?;
        let containers = containers_store
            .load::<Container>()?
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
        let features = config
            .runtimes
            .keys()
            .map(|name| {
                let features = runtime(&config, name).map(|r| r.features());
                (name.clone(), features.unwrap_or_default())
            })
            .collect();
        Ok(Self {
            features,
            images: Images::new(config.image_socket()),
            config,
            sandboxes_store,
            sandboxes: RwLock::new(sandboxes),
            containers_store,
            containers: RwLock::new(containers),
            lifecycle: Mutex::default(),
            containers_lock: Mutex::default(),
            cpu_samples: Mutex::default(),
        })
    }

    /// `Version`.
    pub fn version(&self) -> cri::VersionResponse {
        cri::VersionResponse {
            version: KUBELET_API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        }
    }

    /// `Status`: the runtime is ready once serving; the network once a CNI configuration
    /// loads, with the reason containerd gives until then.
    pub fn status(&self, verbose: bool) -> cri::StatusResponse {
        let network = cni::load(&self.config.cni.conf_dir);
        let network_ready = match &network {
            Ok(_) => condition("NetworkReady", Ok(())),
            Err(e) => condition(
                "NetworkReady",
                Err(("NetworkPluginNotReady", e.to_string())),
            ),
        };
        let info = if verbose {
            self.info(&network)
        } else {
            HashMap::new()
        };
        cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![condition("RuntimeReady", Ok(())), network_ready],
            }),
            info,
            runtime_handlers: self.handlers(),
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        }
    }

    /// One entry per configured handler, and `""` for the default one.
    fn handlers(&self) -> Vec<cri::RuntimeHandler> {
        let names = std::iter::once("").chain(self.config.runtimes.keys().map(String::as_str));
        names
            .map(|name| {
                let features = self.features_of(name);
                cri::RuntimeHandler {
                    name: name.into(),
                    features: Some(cri::RuntimeHandlerFeatures {
                        recursive_read_only_mounts: features.recursive_read_only,
                        user_namespaces: crate::userns::supported(),
                    }),
                }
            })
            .collect()
    }

    /// The features of `handler` (`""` is the default one).
    fn features_of(&self, handler: &str) -> oci::Features {
        let name = if handler.is_empty() {
            &self.config.default_runtime
        } else {
            handler
        };
        self.features.get(name).copied().unwrap_or_default()
    }

    /// Verbose status, as containerd's keys: the configuration and the CNI load result.
    fn info(
        &self,
        network: &Result<cni::NetworkList, cni::CniConfigError>,
    ) -> HashMap<String, String> {
        let config = serde_json::to_string(&self.config).expect("config serialises");
        let cni_config = match network {
            Ok(list) => serde_json::json!({
                "path": list.path,
                "name": list.name,
                "cniVersion": list.cni_version,
                "plugins": list.plugins,
            }),
            Err(_) => serde_json::Value::Null,
        };
        let load_status = match network {
            Ok(_) => "OK".to_string(),
            Err(e) => e.to_string(),
        };
        HashMap::from([
            ("config".to_string(), config),
            ("cniconfig".to_string(), cni_config.to_string()),
            (
                "lastCNILoadStatus".to_string(),
                serde_json::Value::String(load_status).to_string(),
            ),
        ])
    }

    /// `RuntimeConfig`: the cgroup driver the kubelet must match.
    pub fn runtime_config(&self) -> cri::RuntimeConfigResponse {
        let cgroup_driver = match self.config.cgroup_driver {
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
        };
        cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cgroup_driver.into(),
            }),
        }
    }
}

/// Pod sandboxes.
impl RuntimeService {
    /// `RunPodSandbox`: returns the new sandbox's id.
    pub async fn run_pod_sandbox(
        &self,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, Error> {
        let metadata = config.metadata.clone().unwrap_or_default();
        if metadata.name.is_empty() || metadata.namespace.is_empty() || metadata.uid.is_empty() {
            return Err(Error::InvalidArgument(
                "pod sandbox metadata needs a name, a namespace and a uid".into(),
            ));
        }
        let _lifecycle = self.lifecycle.lock().await;
        let reserved = Sandbox::reserved_name(&config);
        if let Some(owner) = self.owner_of(&reserved).await {
            return Err(Error::AlreadyExists(format!(
                "pod sandbox name {reserved:?} is reserved for {owner}"
            )));
        }
        let handler = if handler.is_empty() {
            self.config.default_runtime.clone()
        } else {
            handler.to_string()
        };
        let runtime = self.runtime(&handler)?;
        let conmon = self.conmon()?;
        let mut sandbox = Sandbox {
            id: new_id()?,
            runtime_handler: handler,
            created_at: now(),
            netns: None,
            userns: None,
            cni_result: None,
            network_detached: false,
            pid: 0,
            image: String::new(),
            stopped: false,
            config,
        };
        if sandbox.mappings()?.is_some() {
            if sandbox.host_network() {
                return Err(Error::InvalidArgument(
                    "a pod with a user namespace needs a network namespace of its own".into(),
                ));
            }
            sandbox.userns = Some(self.config.state.join("userns").join(&sandbox.id));
        }
        let network = if sandbox.host_network() {
            None
        } else {
            sandbox.netns = Some(self.config.state.join("netns").join(&sandbox.id));
            Some(self.network()?)
        };
        let image = self.images.get_or_pull(&self.config.pause_image).await?;
        sandbox.image = image.id.clone();
        let parts = Parts {
            paths: self.paths(&sandbox.id),
            network,
            runtime,
            conmon,
        };
        if let Err(e) = self.build(&mut sandbox, &parts, &image).await {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "pod sandbox failed; undoing");
            self.tear_down(&mut sandbox, &parts).await;
            return Err(e);
        }
        let id = sandbox.id.clone();
        self.save(sandbox).await?;
        Ok(id)
    }

    async fn build(
        &self,
        sandbox: &mut Sandbox,
        parts: &Parts,
        image: &Image,
    ) -> Result<(), Error> {
        let files = (sandbox.clone(), parts.paths.clone());
        plumbing::blocking(move || sandbox::prepare_files(&files.0, &files.1)).await?;
        if let Some(network) = parts.network.clone() {
            let attached = (sandbox.clone(), self.config.cni.bin_dir.clone());
            let result = plumbing::blocking(move || {
                sandbox::attach_network(&attached.0, &network, &attached.1)
            })
            .await?;
            sandbox.cni_result = Some(result.raw);
        }
        let mounts = self.images.prepare(&sandbox.id, &image.id, false).await?;
        let paths = parts.paths.clone();
        let userns = sandbox.pinned_userns()?;
        plumbing::blocking(move || {
            let userns = userns.as_ref().map(|(path, m)| (path.as_path(), m));
            sandbox::mount_rootfs(&paths.bundle, &mounts, userns)
        })
        .await?;
        let (infra, parts_copy, image) = (sandbox.clone(), parts.clone(), image.clone());
        let cgroups_path = self.cgroups_path(&infra, &infra.id);
        sandbox.pid = plumbing::blocking(move || {
            let setup = Setup {
                paths: &parts_copy.paths,
                runtime: &parts_copy.runtime,
                conmon: &parts_copy.conmon,
                image: &image,
                cgroups_path,
            };
            sandbox::start_infra(&infra, &setup)
        })
        .await?;
        Ok(())
    }

    /// Undoes whatever of a sandbox exists, errors logged: what a failed RunPodSandbox
    /// leaves, and what RemovePodSandbox removes.
    async fn tear_down(&self, sandbox: &mut Sandbox, parts: &Parts) {
        let (stopped, parts_copy) = (sandbox.clone(), parts.clone());
        let infra = plumbing::blocking(move || {
            sandbox::stop_infra(&stopped, &parts_copy.runtime, &parts_copy.conmon)
        });
        if let Err(e) = infra.await {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "stopping the infra process");
        }
        if let Err(e) = self.detach(sandbox, parts).await {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "detaching the network");
        }
        let (removed, parts_copy) = (sandbox.clone(), parts.clone());
        let result = plumbing::blocking(move || {
            sandbox::remove_files(
                &removed,
                &parts_copy.paths,
                &parts_copy.runtime,
                &parts_copy.conmon,
            )
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "removing files");
        }
        if let Err(e) = self.images.remove(&sandbox.id).await {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "removing the rootfs snapshot");
        }
    }

    /// Stops the infra process and detaches the network.
    async fn stop(&self, sandbox: &mut Sandbox, parts: &Parts) -> Result<(), Error> {
        let (stopped, parts_copy) = (sandbox.clone(), parts.clone());
        plumbing::blocking(move || {
            sandbox::stop_infra(&stopped, &parts_copy.runtime, &parts_copy.conmon)
        })
        .await?;
        self.detach(sandbox, parts).await?;
        sandbox.stopped = true;
        Ok(())
    }

    /// Detaches the pod network (once) and removes its namespace.
    async fn detach(&self, sandbox: &mut Sandbox, parts: &Parts) -> Result<(), Error> {
        let (mut detached, network, bin_dir) = (
            sandbox.clone(),
            parts.network.clone(),
            self.config.cni.bin_dir.clone(),
        );
        let (detached, result) = plumbing::blocking(move || {
            let result = sandbox::detach_network(&mut detached, network.as_ref(), &bin_dir);
            (detached, result)
        })
        .await;
        *sandbox = detached;
        result
    }

    /// `StopPodSandbox`: idempotent; an unknown id is fine, as the CRI asks.
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), Error> {
        let _lifecycle = self.lifecycle.lock().await;
        let Some(mut sandbox) = self.find(id).await? else {
            return Ok(());
        };
        // Held until the sandbox is stopped, so a CreateContainer under way finishes first
        // and a later one finds the sandbox not ready.
        let _containers = self.containers_lock.lock().await;
        for container in self.containers_of(&sandbox.id).await {
            self.stop_container(&container.id, 0).await?;
        }
        let parts = self.parts_of(&sandbox)?;
        self.stop(&mut sandbox, &parts).await?;
        self.save(sandbox).await
    }

    /// `RemovePodSandbox`: stops it first; idempotent; an unknown id is fine.
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), Error> {
        let _lifecycle = self.lifecycle.lock().await;
        let Some(mut sandbox) = self.find(id).await? else {
            return Ok(());
        };
        let containers = self.containers_lock.lock().await;
        for container in self.containers_of(&sandbox.id).await {
            self.remove_container_now(&container).await?;
        }
        let parts = self.parts_of(&sandbox)?;
        self.stop(&mut sandbox, &parts).await?;
        drop(containers);
        let (removed, parts_copy) = (sandbox.clone(), parts.clone());
        plumbing::blocking(move || {
            sandbox::remove_files(
                &removed,
                &parts_copy.paths,
                &parts_copy.runtime,
                &parts_copy.conmon,
            )
        })
        .await?;
        self.images.remove(&sandbox.id).await?;
        self.sandboxes_store
            .delete(&sandbox.id)
            .map_err(Error::io("remove record of", &sandbox.id))?;
        self.sandboxes.write().await.remove(&sandbox.id);
        Ok(())
    }

    /// `PodSandboxStatus`.
    pub async fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::PodSandboxStatusResponse, Error> {
        let sandbox = self.find(id).await?.ok_or_else(|| Error::NotFound {
            what: "pod sandbox",
            id: id.into(),
        })?;
        let ips = sandbox.ips();
        let network = cri::PodSandboxNetworkStatus {
            ip: ips.first().cloned().unwrap_or_default(),
            additional_ips: ips[ips.len().min(1)..]
                .iter()
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        };
        let info = if verbose {
            let info = serde_json::json!({
                "pid": sandbox.pid,
                "netns": sandbox.netns,
                "runtimeHandler": sandbox.runtime_handler,
                "image": sandbox.image,
                "cniResult": sandbox.cni_result,
                "config": sandbox.config,
            });
            HashMap::from([("info".to_string(), info.to_string())])
        } else {
            HashMap::new()
        };
        let status = cri::PodSandboxStatus {
            id: sandbox.id.clone(),
            metadata: sandbox.config.metadata.clone(),
            state: self.state_of(&sandbox).into(),
            created_at: sandbox.created_at,
            network: Some(network),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace {
                    options: Some(sandbox::namespace_options(&sandbox.config)),
                }),
            }),
            labels: sandbox.config.labels.clone(),
            annotations: sandbox.config.annotations.clone(),
            runtime_handler: sandbox.runtime_handler.clone(),
        };
        Ok(cri::PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses: vec![],
            timestamp: now(),
        })
    }

    /// `ListPodSandbox`, with the filter's conditions all applied.
    pub async fn list_pod_sandbox(
        &self,
        filter: Option<cri::PodSandboxFilter>,
    ) -> Vec<cri::PodSandbox> {
        let filter = filter.unwrap_or_default();
        let sandboxes = self.sandboxes.read().await;
        sandboxes
            .values()
            .filter(|s| s.id.starts_with(&filter.id))
            .filter(|s| labels_match(&filter.label_selector, &s.config.labels))
            .map(|s| cri::PodSandbox {
                id: s.id.clone(),
                metadata: s.config.metadata.clone(),
                state: self.state_of(s).into(),
                created_at: s.created_at,
                labels: s.config.labels.clone(),
                annotations: s.config.annotations.clone(),
                runtime_handler: s.runtime_handler.clone(),
            })
            .filter(|s| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|want| want.state == s.state)
            })
            .collect()
    }

    fn state_of(&self, sandbox: &Sandbox) -> cri::PodSandboxState {
        let exited = self.conmon_dirs().exit_status(&sandbox.id).is_some();
        if sandbox.stopped || exited {
            cri::PodSandboxState::SandboxNotready
        } else {
            cri::PodSandboxState::SandboxReady
        }
    }

    /// Sandbox `id` (or a unique prefix) by its full id, and the network namespace port
    /// forwarding dials into: `None` for a host-network pod. FailedPrecondition unless the
    /// pod is ready.
    pub async fn forwarding_netns(&self, id: &str) -> Result<(String, Option<PathBuf>), Error> {
        let sandbox = self.find(id).await?.ok_or_else(|| Error::NotFound {
            what: "pod sandbox",
            id: id.into(),
        })?;
        if self.state_of(&sandbox) != cri::PodSandboxState::SandboxReady {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        if sandbox.host_network() {
            return Ok((sandbox.id, None));
        }
        match sandbox.netns.clone() {
            Some(netns) => Ok((sandbox.id, Some(netns))),
            None => Err(Error::FailedPrecondition(format!(
                "pod sandbox {} has no network namespace",
                sandbox.id
            ))),
        }
    }

    /// The sandbox whose id is `id` or starts with it (unique prefixes, as crictl sends).
    async fn find(&self, id: &str) -> Result<Option<Sandbox>, Error> {
        by_prefix(&*self.sandboxes.read().await, id, "pod sandbox")
    }

    async fn owner_of(&self, reserved: &str) -> Option<String> {
        let sandboxes = self.sandboxes.read().await;
        let owner = sandboxes
            .values()
            .find(|s| Sandbox::reserved_name(&s.config) == reserved);
        owner.map(|s| s.id.clone())
    }

    async fn save(&self, sandbox: Sandbox) -> Result<(), Error> {
        self.sandboxes_store
            .put(&sandbox.id, &sandbox)
            .map_err(Error::io("write record of", &sandbox.id))?;
        self.sandboxes
            .write()
            .await
            .insert(sandbox.id.clone(), sandbox);
        Ok(())
    }

    fn paths(&self, id: &str) -> Paths {
        Paths::new(&self.config.root, &self.config.state, id)
    }

    fn parts_of(&self, sandbox: &Sandbox) -> Result<Parts, Error> {
        Ok(Parts {
            paths: self.paths(&sandbox.id),
            network: if sandbox.host_network() {
                None
            } else {
                self.network().ok()
            },
            runtime: self.runtime(&sandbox.runtime_handler)?,
            conmon: self.conmon()?,
        })
    }

    fn runtime(&self, handler: &str) -> Result<Runtime, Error> {
        runtime(&self.config, handler)
    }

    fn conmon_dirs(&self) -> Conmon {
        Conmon {
            path: self.config.conmon_path.clone(),
            exits: self.config.exit_dir(),
            sockets: self.config.attach_dir(),
            log_size_max: self.config.log_size_max,
        }
    }

    fn conmon(&self) -> Result<Conmon, Error> {
        let mut conmon = self.conmon_dirs();
        conmon.path = oci::find_binary("conmon", &self.config.conmon_path)?;
        Ok(conmon)
    }

    fn network(&self) -> Result<Network, Error> {
        let list = cni::load(&self.config.cni.conf_dir)
            .map_err(|e| Error::FailedPrecondition(format!("network not ready: {e}")))?;
        Ok(Network::new(list, &self.config.cni.bin_dir))
    }

    /// The cgroup of process `id` of `sandbox` (its infra process or a container): under
    /// the kubelet's cgroup parent, in the driver's form.
    fn cgroups_path(&self, sandbox: &Sandbox, id: &str) -> String {
        let parent = sandbox
            .config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        match self.config.cgroup_driver {
            CgroupDriver::Cgroupfs if parent.is_empty() => format!("/runtimed/{id}"),
            CgroupDriver::Cgroupfs => format!("{}/{id}", parent.trim_end_matches('/')),
            CgroupDriver::Systemd if parent.is_empty() => format!("system.slice:runtimed:{id}"),
            CgroupDriver::Systemd => format!("{parent}:runtimed:{id}"),
        }
    }
}

/// The record whose id is `id` or, failing that, the only one whose id starts with it
/// (crictl sends unique prefixes); `what` names the kind in errors.
fn by_prefix<T: Clone>(
    records: &BTreeMap<String, T>,
    id: &str,
    what: &str,
) -> Result<Option<T>, Error> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} id is empty")));
    }
    if let Some(record) = records.get(id) {
        return Ok(Some(record.clone()));
    }
    let mut matches = records
        .range(id.to_string()..)
        .take_while(|(k, _)| k.starts_with(id));
    match (matches.next(), matches.next()) {
        (Some((_, record)), None) => Ok(Some(record.clone())),
        (Some(_), Some(_)) => Err(Error::InvalidArgument(format!(
            "{what} id prefix {id:?} is ambiguous"
        ))),
        (None, _) => Ok(None),
    }
}

/// Whether every label of `selector` is in `labels` with the same value.
pub(crate) fn labels_match(
    selector: &HashMap<String, String>,
    labels: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What the lifecycle steps of one sandbox work with.
#[derive(Clone)]
struct Parts {
    paths: Paths,
    network: Option<Network>,
    runtime: Runtime,
    conmon: Conmon,
}

/// 64 hex digits from the kernel's random source, as containerd's ids.
fn new_id() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| Error::io("read random bytes from", "getrandom")(e.into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn runtime(config: &Config, handler: &str) -> Result<Runtime, Error> {
    let runtime = config.runtimes.get(handler).ok_or_else(|| {
        Error::InvalidArgument(format!("no runtime handler {handler:?} is configured"))
    })?;
    Ok(Runtime {
        name: handler.to_string(),
        path: oci::find_binary(&format!("runtime {handler}"), &runtime.runtime_path)?,
        root: config.runtime_root(handler, runtime),
        systemd_cgroup: config.cgroup_driver == CgroupDriver::Systemd,
    })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as i64)
}

fn condition(kind: &str, state: Result<(), (&str, String)>) -> cri::RuntimeCondition {
    let (status, reason, message) = match state {
        Ok(()) => (true, String::new(), String::new()),
        Err((reason, message)) => (false, reason.to_string(), message),
    };
    cri::RuntimeCondition {
        r#type: kind.into(),
        status,
        reason,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(conf_dir: &std::path::Path) -> RuntimeService {
        let mut config = Config::default();
        config.cni.conf_dir = conf_dir.to_path_buf();
        config.root = conf_dir.join("root");
        RuntimeService::open(config).unwrap()
    }

    fn conditions(response: &cri::StatusResponse) -> Vec<(String, bool, String)> {
        let status = response.status.as_ref().unwrap();
        status
            .conditions
            .iter()
            .map(|c| (c.r#type.clone(), c.status, c.reason.clone()))
            .collect()
    }

    #[test]
    fn the_network_is_ready_once_a_cni_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let response = service.status(false);
        assert_eq!(
            conditions(&response),
            [
                ("RuntimeReady".into(), true, String::new()),
                ("NetworkReady".into(), false, "NetworkPluginNotReady".into())
            ]
        );
        assert!(response.info.is_empty());
        let list = r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}"#;
        std::fs::write(dir.path().join("10-pods.conflist"), list).unwrap();
        let response = service.status(true);
        assert_eq!(
            conditions(&response)[1],
            ("NetworkReady".into(), true, String::new())
        );
        let cni: serde_json::Value = serde_json::from_str(&response.info["cniconfig"]).unwrap();
        assert_eq!(cni["name"], "pods");
        assert!(response.info["config"].contains("\"pause_image\""));
    }

    #[test]
    fn every_handler_and_the_default_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = service(dir.path())
            .status(false)
            .runtime_handlers
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["", "crun", "runc"]);
    }

    #[test]
    fn version_and_cgroup_driver() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let version = service.version();
        assert_eq!(
            (
                version.version.as_str(),
                version.runtime_api_version.as_str()
            ),
            ("0.1.0", "v1")
        );
        let linux = service.runtime_config().linux.unwrap();
        assert_eq!(linux.cgroup_driver(), cri::CgroupDriver::Cgroupfs);
    }
}
