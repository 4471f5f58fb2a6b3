//! imaged: the CRI ImageService. It pulls images from OCI registries (through hosts.toml
//! mirrors), keeps them in a content-addressed store, unpacks layers into snapshots and
//! answers the kubelet's image RPCs.
//!
//! The flow of a pull is in [`pull`]; the RPC semantics in [`service`]; the gRPC edge in
//! [`cri`] and [`internal_api`]; start-up in [`daemon`]. The `imaged` binary's client
//! commands live in [`cli`].

// Errors carry the digests, paths and hosts they name; they are built only on failure, so
// their size is not worth boxing.
#![allow(clippy::result_large_err)]

pub mod check;
pub mod cli;
pub mod config;
pub mod content;
pub mod cri;
pub mod daemon;
pub mod digest;
pub mod error;
pub mod gc;
pub mod images;
pub mod internal_api;
pub mod locks;
pub mod manifest;
pub mod metrics;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod service;
#[cfg(test)]
mod testing;

pub use error::Error;
