//! Integration tests: real runtimed (and imaged, registry, runc, crun, conmon and CNI
//! plugins) processes. Root only.

mod cni;
mod containers;
mod daemon;
mod harness;
mod sandbox;
mod streams;
