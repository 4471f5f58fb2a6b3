//! runtimed: the CRI RuntimeService. It will run pod sandboxes and containers with an OCI
//! runtime (runc, crun) under conmon, on rootfs mounts that imaged prepares, with CNI
//! networking. It never reads image content itself: image configs and writable snapshots
//! come from imaged's internal API.
//!
//! Served today: Version, Status, RuntimeConfig, UpdateRuntimeConfig, the pod sandbox
//! lifecycle (RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus,
//! ListPodSandbox) and the container lifecycle (CreateContainer, StartContainer,
//! StopContainer, RemoveContainer, ContainerStatus, ListContainers, ExecSync,
//! UpdateContainerResources, ReopenContainerLog) and the four stats RPCs; the streaming
//! RPCs (Exec, Attach, PortForward) and the optional ones (events, metrics, checkpoints)
//! answer Unimplemented naming the method.
//!
//! [`config`] holds the configuration, [`container`] and [`container_spec`] a container's
//! record, steps and OCI spec, [`exec`] ExecSync, [`stats`] cgroup and network counters, [`cni`] the network configuration and plugin calls,
//! [`images`] the client of imaged, [`netns`] pinned network namespaces, [`spec`] OCI
//! runtime specs, [`oci`] the OCI runtime and conmon, [`seccomp`] seccomp profiles, [`sandbox`] the steps of a sandbox's
//! life, [`store`] records that survive a restart, [`userns`] pods' user namespaces and idmapped mounts, [`service`] the RPCs' logic, [`cri`] the
//! gRPC edge, [`error`] the one error type and its status codes, and [`daemon`] start-up
//! and serving.

pub mod cni;
pub mod config;
pub mod container;
pub mod container_spec;
pub mod cri;
pub mod daemon;
pub mod error;
pub mod exec;
pub mod images;
pub mod netns;
pub mod oci;
pub mod sandbox;
pub mod seccomp;
pub mod service;
pub mod spec;
pub mod stats;
pub mod store;
pub mod stream;
pub mod userns;
