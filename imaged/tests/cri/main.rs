//! Integration tests: a real `imaged` process, real `docker-registry` processes, CRI calls
//! over the unix socket, and rootfs trees mounted from the overlay snapshots. Root only.

mod auth;
mod check;
mod crash;
mod encrypted;
mod errors;
mod files;
mod harness;
mod internal;
mod metrics;
mod mirrors;
mod mount;
mod names;
mod pull;
mod snapshotters;
