//! runtimed: the CRI RuntimeService. It will run pod sandboxes and containers with an OCI
//! runtime (runc, crun) under conmon, on rootfs mounts that imaged prepares, with CNI
//! networking. It never reads image content itself: image configs and writable snapshots
//! come from imaged's internal API.
//!
//! Today it answers the runtime-level RPCs (Version, Status, RuntimeConfig,
//! UpdateRuntimeConfig); the pod and container RPCs answer Unimplemented naming the method.
//! [`config`] holds the configuration, [`cni`] the network configuration, [`service`] the
//! RPCs' logic, [`cri`] the gRPC edge and [`daemon`] start-up and serving.

pub mod cni;
pub mod config;
pub mod cri;
pub mod daemon;
pub mod service;
