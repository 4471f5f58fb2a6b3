//! Stats RPCs on the service's state: ContainerStats, ListContainerStats, PodSandboxStats,
//! ListPodSandboxStats. CPU and memory come from the cgroups of the processes, the writable
//! layer's usage from imaged, the network counters from the pod's namespace.

use super::{RuntimeService, now};
use crate::container::Container;
use crate::error::Error;
use crate::sandbox::Sandbox;
use crate::stats::{self, Cgroups, Usage};
use proto::cri;
use std::path::Path;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl RuntimeService {
    /// `ContainerStats`.
    pub async fn container_stats(&self, id: &str) -> Result<cri::ContainerStats, Error> {
        let container = self.find_container(id).await?;
        Ok(self.stats_of(&container).await)
    }

    /// `ListContainerStats`: the containers the filter selects that are running.
    pub async fn list_container_stats(
        &self,
        filter: Option<cri::ContainerStatsFilter>,
    ) -> Vec<cri::ContainerStats> {
        let filter = filter.unwrap_or_default();
        let conmon = self.conmon_dirs();
        let selected: Vec<Container> = {
            let containers = self.containers.read().await;
            containers
                .values()
                .filter(|c| c.selected(&filter.id, &filter.pod_sandbox_id, &filter.label_selector))
                .filter(|c| c.state(&conmon) == cri::ContainerState::ContainerRunning)
                .cloned()
                .collect()
        };
        let mut stats = Vec::with_capacity(selected.len());
        for container in &selected {
            stats.push(self.stats_of(container).await);
        }
        stats
    }

    async fn stats_of(&self, container: &Container) -> cri::ContainerStats {
        let usage = self.sample(&container.id, container.pid).await;
        let writable_layer = match self.images.usage(&container.id).await {
            Ok((bytes, inodes, mountpoint)) => Some(cri::FilesystemUsage {
                timestamp: now(),
                fs_id: Some(cri::FilesystemIdentifier { mountpoint }),
                used_bytes: Some(cri::UInt64Value { value: bytes }),
                inodes_used: Some(cri::UInt64Value { value: inodes }),
            }),
            Err(e) => {
                tracing::debug!(container = %container.id, error = %e, "writable layer usage");
                None
            }
        };
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: container.id.clone(),
                metadata: container.config.metadata.clone(),
                labels: container.config.labels.clone(),
                annotations: container.config.annotations.clone(),
            }),
            cpu: Some(usage.0),
            memory: Some(usage.1),
            writable_layer,
            swap: None,
        }
    }

    /// CPU and memory of process `pid`'s cgroups, with the CPU rate since the previous
    /// sample of `id`.
    async fn sample(&self, id: &str, pid: i64) -> (cri::CpuUsage, cri::MemoryUsage) {
        let timestamp = now();
        let usage = Cgroups::of(pid)
            .map(|c| c.usage(Path::new(CGROUP_ROOT)))
            .unwrap_or_default();
        let rate = {
            let mut samples = self.cpu_samples.lock().await;
            let previous = samples.insert(id.to_string(), (timestamp, usage.cpu_ns));
            previous.and_then(|(at, cpu)| {
                let elapsed = timestamp.checked_sub(at).filter(|e| *e > 0)? as u128;
                let used = usage.cpu_ns.checked_sub(cpu)? as u128;
                Some((used * 1_000_000_000 / elapsed) as u64)
            })
        };
        (cpu(timestamp, &usage, rate), memory(timestamp, &usage))
    }

    /// `PodSandboxStats`.
    pub async fn pod_sandbox_stats(&self, id: &str) -> Result<cri::PodSandboxStats, Error> {
        let sandbox = self.find(id).await?.ok_or_else(|| Error::NotFound {
            what: "pod sandbox",
            id: id.into(),
        })?;
        Ok(self.sandbox_stats(&sandbox).await)
    }

    /// `ListPodSandboxStats`: the ready sandboxes the filter selects.
    pub async fn list_pod_sandbox_stats(
        &self,
        filter: Option<cri::PodSandboxStatsFilter>,
    ) -> Vec<cri::PodSandboxStats> {
        let filter = filter.unwrap_or_default();
        let selected: Vec<Sandbox> = {
            let sandboxes = self.sandboxes.read().await;
            sandboxes
                .values()
                .filter(|s| s.id.starts_with(&filter.id))
                .filter(|s| super::labels_match(&filter.label_selector, &s.config.labels))
                .filter(|s| self.state_of(s) == cri::PodSandboxState::SandboxReady)
                .cloned()
                .collect()
        };
        let mut stats = Vec::with_capacity(selected.len());
        for sandbox in &selected {
            stats.push(self.sandbox_stats(sandbox).await);
        }
        stats
    }

    /// The pod's usage: its infra process and its running containers added up, the
    /// network counters of its namespace, and each container's stats.
    async fn sandbox_stats(&self, sandbox: &Sandbox) -> cri::PodSandboxStats {
        let timestamp = now();
        let conmon = self.conmon_dirs();
        let root = Path::new(CGROUP_ROOT);
        let mut total = Cgroups::of(sandbox.pid)
            .map(|c| c.usage(root))
            .unwrap_or_default();
        let mut processes = Cgroups::of(sandbox.pid).map_or(0, |c| stats::process_count(&c, root));
        let mut containers = Vec::new();
        for container in self.containers_of(&sandbox.id).await {
            if container.state(&conmon) != cri::ContainerState::ContainerRunning {
                continue;
            }
            if let Some(cgroups) = Cgroups::of(container.pid) {
                add(&mut total, cgroups.usage(root));
                processes += stats::process_count(&cgroups, root);
            }
            containers.push(self.stats_of(&container).await);
        }
        let interfaces: Vec<cri::NetworkInterfaceUsage> = stats::interfaces(sandbox.pid)
            .into_iter()
            .map(
                |(name, rx, rx_errors, tx, tx_errors)| cri::NetworkInterfaceUsage {
                    name,
                    rx_bytes: Some(cri::UInt64Value { value: rx }),
                    rx_errors: Some(cri::UInt64Value { value: rx_errors }),
                    tx_bytes: Some(cri::UInt64Value { value: tx }),
                    tx_errors: Some(cri::UInt64Value { value: tx_errors }),
                },
            )
            .collect();
        let default_interface = interfaces.iter().find(|i| i.name == "eth0").cloned();
        cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: sandbox.id.clone(),
                metadata: sandbox.config.metadata.clone(),
                labels: sandbox.config.labels.clone(),
                annotations: sandbox.config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cpu(timestamp, &total, None)),
                memory: Some(memory(timestamp, &total)),
                network: Some(cri::NetworkUsage {
                    timestamp,
                    default_interface,
                    interfaces,
                }),
                process: Some(cri::ProcessUsage {
                    timestamp,
                    process_count: Some(cri::UInt64Value { value: processes }),
                }),
                containers,
            }),
            windows: None,
        }
    }
}

fn add(total: &mut Usage, more: Usage) {
    total.cpu_ns += more.cpu_ns;
    total.memory += more.memory;
    total.working_set += more.working_set;
    total.rss += more.rss;
    total.page_faults += more.page_faults;
    total.major_page_faults += more.major_page_faults;
}

fn value(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn cpu(timestamp: i64, usage: &Usage, rate: Option<u64>) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp,
        usage_core_nano_seconds: value(usage.cpu_ns),
        usage_nano_cores: rate.and_then(value),
    }
}

fn memory(timestamp: i64, usage: &Usage) -> cri::MemoryUsage {
    let available = usage
        .limit
        .map_or(0, |l| l.saturating_sub(usage.working_set));
    cri::MemoryUsage {
        timestamp,
        working_set_bytes: value(usage.working_set),
        available_bytes: value(available),
        usage_bytes: value(usage.memory),
        rss_bytes: value(usage.rss),
        page_faults: value(usage.page_faults),
        major_page_faults: value(usage.major_page_faults),
    }
}
