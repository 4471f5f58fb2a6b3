//! Containers, on the service's state: CreateContainer, StartContainer, StopContainer,
//! RemoveContainer, ContainerStatus, ListContainers.

use super::{RuntimeService, now};
use crate::container::{self, Container};
use crate::container_spec::{self, Placement};
use crate::error::Error;
use crate::sandbox::Sandbox;
use proto::cri;
use std::collections::HashMap;

impl RuntimeService {
    /// `CreateContainer`: returns the new container's id.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, Error> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "container metadata needs a name".into(),
            ));
        }
        let _containers = self.containers_lock.lock().await;
        let sandbox = self
            .find(sandbox_id)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "pod sandbox",
                id: sandbox_id.into(),
            })?;
        if self.state_of(&sandbox) != cri::PodSandboxState::SandboxReady {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        let reserved = Container::reserved_name(&config, &sandbox.id);
        let taken = self
            .containers
            .read()
            .await
            .values()
            .find(|c| Container::reserved_name(&c.config, &c.sandbox_id) == reserved)
            .map(|c| c.id.clone());
        if let Some(owner) = taken {
            return Err(Error::AlreadyExists(format!(
                "container name {name:?} is already used in pod sandbox {} by {owner}",
                sandbox.id
            )));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if image_name.is_empty() {
            return Err(Error::InvalidArgument(
                "container config names no image".into(),
            ));
        }
        let image = self.images.get(&image_name).await?;
        let mut container = Container {
            id: super::new_id()?,
            sandbox_id: sandbox.id.clone(),
            image_name,
            image_ref: image.repo_digest.clone(),
            image_id: image.id.clone(),
            stop_signal: image.config["StopSignal"].as_str().map(str::to_string),
            runtime_handler: sandbox.runtime_handler.clone(),
            log_path: log_path(&sandbox, &config),
            created_at: now(),
            started_at: 0,
            pid: 0,
            user: None,
            config,
        };
        match self
            .build_container(&mut container, &sandbox, &image.config)
            .await
        {
            Ok(()) => {}
            Err(e) => {
                self.discard(&container).await;
                return Err(e);
            }
        }
        let id = container.id.clone();
        self.save_container(container).await?;
        Ok(id)
    }

    async fn build_container(
        &self,
        container: &mut Container,
        sandbox: &Sandbox,
        image: &serde_json::Value,
    ) -> Result<(), Error> {
        let userns = pod_userns(sandbox, &container.config)?;
        let bundle = container::bundle(&self.config.state, &container.id);
        let mounts = self
            .images
            .prepare(&container.id, &container.image_id, false)
            .await?;
        let rootfs = bundle.join("rootfs");
        let (mounts_copy, staging) = (mounts.clone(), bundle.clone());
        let (pinned, volumes) = (userns.clone(), container.config.mounts.clone());
        let idmapped = plumbing::blocking(move || {
            let userns = pinned.as_ref().map(|(path, m)| (path.as_path(), m));
            crate::sandbox::mount_rootfs(&staging, &mounts_copy, userns)?;
            crate::userns::idmap_volumes(&volumes, &staging.join("volumes"), pinned.as_ref())
        })
        .await?;
        let paths = self.paths(&sandbox.id);
        let host_ipc =
            crate::sandbox::namespace_options(&sandbox.config).ipc() == cri::NamespaceMode::Node;
        let placement = Placement {
            rootfs,
            sandbox_pid: sandbox.pid,
            sandbox_files: paths.files.clone(),
            shm: if host_ipc {
                "/dev/shm".into()
            } else {
                paths.bundle.join("shm")
            },
            hostname: crate::sandbox::hostname(&sandbox.config),
            cgroups_path: self.cgroups_path(sandbox, &container.id),
            sandbox_privileged: sandbox
                .config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .is_some_and(|s| s.privileged),
            handler: container.runtime_handler.clone(),
            recursive_read_only: self
                .features_of(&container.runtime_handler)
                .recursive_read_only,
            userns,
            idmapped,
        };
        let spec = container_spec::build(&container.config, image, &placement)?;
        container.user = spec.process().as_ref().map(|p| container_user(p.user()));
        let config_path = bundle.join("config.json");
        let json = serde_json::to_vec_pretty(&spec).expect("spec serialises");
        std::fs::write(&config_path, json).map_err(Error::io("write", &config_path))?;
        let runtime = self.runtime(&container.runtime_handler)?;
        let conmon = self.conmon()?;
        let created = container.clone();
        container.pid =
            plumbing::blocking(move || container::create(&created, &bundle, &runtime, &conmon))
                .await?;
        Ok(())
    }

    /// Removes whatever of a container exists; errors are logged.
    async fn discard(&self, container: &Container) {
        let bundle = container::bundle(&self.config.state, &container.id);
        let parts = self
            .runtime(&container.runtime_handler)
            .and_then(|r| Ok((r, self.conmon()?)));
        if let Ok((runtime, conmon)) = parts {
            let removed = container.clone();
            let result = plumbing::blocking(move || {
                container::stop(&removed, 0, &runtime, &conmon)?;
                container::remove_files(&removed, &bundle, &runtime, &conmon)
            })
            .await;
            if let Err(e) = result {
                tracing::warn!(container = %container.id, error = %e, "removing");
            }
        }
        if let Err(e) = self.images.remove(&container.id).await {
            tracing::warn!(container = %container.id, error = %e, "removing the rootfs snapshot");
        }
    }

    /// `StartContainer`: only a created container starts.
    pub async fn start_container(&self, id: &str) -> Result<(), Error> {
        let _containers = self.containers_lock.lock().await;
        let mut container = self.find_container(id).await?;
        let conmon = self.conmon()?;
        let state = container.state(&conmon);
        if state != cri::ContainerState::ContainerCreated {
            return Err(Error::FailedPrecondition(format!(
                "container {} is {}, not created",
                container.id,
                state.as_str_name()
            )));
        }
        let runtime = self.runtime(&container.runtime_handler)?;
        let started = container.id.clone();
        plumbing::blocking(move || runtime.start(&started)).await?;
        container.started_at = now();
        self.save_container(container).await
    }

    /// `ExecSync`: runs `cmd` in a running container, `timeout` seconds at most (none when
    /// zero).
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: i64,
    ) -> Result<crate::exec::Output, Error> {
        let target = self.running_container(id).await?;
        let timeout = std::time::Duration::from_secs(timeout.max(0) as u64);
        plumbing::blocking(move || {
            crate::exec::exec_sync(
                &target.runtime,
                &target.container.id,
                &target.bundle,
                &cmd,
                timeout,
            )
        })
        .await
    }

    /// The container `id` (or a unique prefix) with what an exec or attach needs of it;
    /// FailedPrecondition unless it is running.
    pub async fn running_container(&self, id: &str) -> Result<Running, Error> {
        let container = self.find_container(id).await?;
        let state = container.state(&self.conmon_dirs());
        if state != cri::ContainerState::ContainerRunning {
            return Err(Error::FailedPrecondition(format!(
                "container {} is {}, not running",
                container.id,
                state.as_str_name()
            )));
        }
        Ok(Running {
            runtime: self.runtime(&container.runtime_handler)?,
            bundle: container::bundle(&self.config.state, &container.id),
            sockets: self.config.attach_dir(),
            container,
        })
    }

    /// `ReopenContainerLog`: conmon reopens the log file (the kubelet renamed it away to
    /// rotate it); returns once the new file exists.
    pub async fn reopen_container_log(&self, id: &str) -> Result<(), Error> {
        let container = self.find_container(id).await?;
        let state = container.state(&self.conmon_dirs());
        if state != cri::ContainerState::ContainerRunning {
            return Err(Error::FailedPrecondition(format!(
                "container {} is {}, not running",
                container.id,
                state.as_str_name()
            )));
        }
        if container.log_path.is_empty() {
            return Ok(());
        }
        let bundle = container::bundle(&self.config.state, &container.id);
        let log = std::path::PathBuf::from(&container.log_path);
        plumbing::blocking(move || container::reopen_log(&bundle, &log)).await
    }

    /// `UpdateContainerResources`: new CPU and memory limits for a running or created
    /// container, through `RUNTIME update`; the recorded config follows on success.
    pub async fn update_container_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<(), Error> {
        let _containers = self.containers_lock.lock().await;
        let mut container = self.find_container(id).await?;
        let state = container.state(&self.conmon_dirs());
        if state == cri::ContainerState::ContainerExited {
            return Err(Error::FailedPrecondition(format!(
                "container {} has exited",
                container.id
            )));
        }
        let limits = container_spec::limits(&resources, container_spec::Controllers::of_host())?;
        let runtime = self.runtime(&container.runtime_handler)?;
        let bundle = container::bundle(&self.config.state, &container.id);
        let updated = container.id.clone();
        plumbing::blocking(move || container::update(&runtime, &updated, &bundle, &limits)).await?;
        let linux = container.config.linux.get_or_insert_with(Default::default);
        linux.resources = Some(resources);
        self.save_container(container).await
    }

    /// `StopContainer`: the stop signal, `timeout` seconds, then SIGKILL. Idempotent; an
    /// unknown id is fine.
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), Error> {
        let Some(container) = self.find_container_opt(id).await? else {
            return Ok(());
        };
        let runtime = self.runtime(&container.runtime_handler)?;
        let conmon = self.conmon()?;
        plumbing::blocking(move || container::stop(&container, timeout, &runtime, &conmon)).await
    }

    /// `RemoveContainer`: kills it first when running. Idempotent; an unknown id is fine.
    pub async fn remove_container(&self, id: &str) -> Result<(), Error> {
        let _containers = self.containers_lock.lock().await;
        let Some(container) = self.find_container_opt(id).await? else {
            return Ok(());
        };
        self.remove_container_now(&container).await
    }

    pub(super) async fn remove_container_now(&self, container: &Container) -> Result<(), Error> {
        let runtime = self.runtime(&container.runtime_handler)?;
        let conmon = self.conmon()?;
        let bundle = container::bundle(&self.config.state, &container.id);
        let removed = container.clone();
        plumbing::blocking(move || {
            container::stop(&removed, 0, &runtime, &conmon)?;
            container::remove_files(&removed, &bundle, &runtime, &conmon)
        })
        .await?;
        self.images.remove(&container.id).await?;
        self.containers_store
            .delete(&container.id)
            .map_err(Error::io("remove record of", &container.id))?;
        self.containers.write().await.remove(&container.id);
        Ok(())
    }

    /// The containers of sandbox `id`.
    pub(super) async fn containers_of(&self, id: &str) -> Vec<Container> {
        let containers = self.containers.read().await;
        containers
            .values()
            .filter(|c| c.sandbox_id == id)
            .cloned()
            .collect()
    }

    /// `ContainerStatus`.
    pub async fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::ContainerStatusResponse, Error> {
        let container = self.find_container(id).await?;
        let conmon = self.conmon_dirs();
        let exit = container.exit(&conmon);
        let bundle = container::bundle(&self.config.state, &container.id);
        let (finished_at, exit_code, reason) = match exit {
            Some(exit) => (
                exit.at,
                exit.code,
                container::reason(&bundle, exit).to_string(),
            ),
            None => (0, 0, String::new()),
        };
        let info = if verbose {
            let spec: serde_json::Value = std::fs::read(bundle.join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let info = serde_json::json!({
                "sandboxID": container.sandbox_id,
                "pid": container.pid,
                "runtimeHandler": container.runtime_handler,
                "snapshotKey": container.id,
                "config": container.config,
                "runtimeSpec": spec,
            });
            HashMap::from([("info".to_string(), info.to_string())])
        } else {
            HashMap::new()
        };
        let status = cri::ContainerStatus {
            id: container.id.clone(),
            metadata: container.config.metadata.clone(),
            state: container.state(&conmon).into(),
            created_at: container.created_at,
            started_at: container.started_at,
            finished_at,
            exit_code,
            image: Some(cri::ImageSpec {
                image: container.image_name.clone(),
                ..Default::default()
            }),
            image_ref: container.image_ref.clone(),
            image_id: container.image_id.clone(),
            reason,
            labels: container.config.labels.clone(),
            annotations: container.config.annotations.clone(),
            mounts: container.config.mounts.clone(),
            log_path: container.log_path.clone(),
            user: container.user.clone(),
            resources: container
                .config
                .linux
                .as_ref()
                .and_then(|l| l.resources.clone())
                .map(|linux| cri::ContainerResources {
                    linux: Some(linux),
                    windows: None,
                }),
            ..Default::default()
        };
        Ok(cri::ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }

    /// `ListContainers`, with the filter's conditions all applied.
    pub async fn list_containers(
        &self,
        filter: Option<cri::ContainerFilter>,
    ) -> Vec<cri::Container> {
        let filter = filter.unwrap_or_default();
        let conmon = self.conmon_dirs();
        let containers = self.containers.read().await;
        containers
            .values()
            .filter(|c| c.selected(&filter.id, &filter.pod_sandbox_id, &filter.label_selector))
            .map(|c| cri::Container {
                id: c.id.clone(),
                pod_sandbox_id: c.sandbox_id.clone(),
                metadata: c.config.metadata.clone(),
                image: Some(cri::ImageSpec {
                    image: c.image_name.clone(),
                    ..Default::default()
                }),
                image_ref: c.image_ref.clone(),
                image_id: c.image_id.clone(),
                state: c.state(&conmon).into(),
                created_at: c.created_at,
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
            })
            .filter(|c| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|want| want.state == c.state)
            })
            .collect()
    }

    pub(super) async fn find_container(&self, id: &str) -> Result<Container, Error> {
        self.find_container_opt(id)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: "container",
                id: id.into(),
            })
    }

    /// The container whose id is `id` or starts with it.
    async fn find_container_opt(&self, id: &str) -> Result<Option<Container>, Error> {
        super::by_prefix(&*self.containers.read().await, id, "container")
    }

    async fn save_container(&self, container: Container) -> Result<(), Error> {
        self.containers_store
            .put(&container.id, &container)
            .map_err(Error::io("write record of", &container.id))?;
        self.containers
            .write()
            .await
            .insert(container.id.clone(), container);
        Ok(())
    }
}

/// `<log_directory>/<log_path>` when the sandbox and the container both name one.
fn log_path(sandbox: &Sandbox, config: &cri::ContainerConfig) -> String {
    let directory = &sandbox.config.log_directory;
    if directory.is_empty() || config.log_path.is_empty() {
        return String::new();
    }
    std::path::Path::new(directory)
        .join(&config.log_path)
        .display()
        .to_string()
}

fn container_user(user: &oci_spec::runtime::User) -> cri::ContainerUser {
    let groups = user.additional_gids().clone().unwrap_or_default();
    cri::ContainerUser {
        linux: Some(cri::LinuxContainerUser {
            uid: user.uid().into(),
            gid: user.gid().into(),
            supplemental_groups: groups.into_iter().map(i64::from).collect(),
        }),
    }
}

/// The pod's user namespace for a container of it; the container may only ask for the
/// pod's own, as containerd requires.
fn pod_userns(
    sandbox: &Sandbox,
    config: &cri::ContainerConfig,
) -> Result<Option<(std::path::PathBuf, crate::userns::Mappings)>, Error> {
    let pod = sandbox.pinned_userns()?;
    let asked = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    if crate::userns::Mappings::of(&asked)? != pod.as_ref().map(|(_, m)| m.clone()) {
        return Err(Error::InvalidArgument(format!(
            "container's user namespace differs from that of pod sandbox {}",
            sandbox.id
        )));
    }
    Ok(pod)
}

/// A running container, as exec and attach find it.
pub struct Running {
    /// Its record.
    pub container: Container,
    /// Its runtime handler.
    pub runtime: crate::oci::Runtime,
    /// Its bundle (config.json, conmon's `ctl` fifo).
    pub bundle: std::path::PathBuf,
    /// conmon's attach socket directory, holding one directory per container.
    pub sockets: std::path::PathBuf,
}
