//! gRPC types: the CRI v1 API from the `k8s-cri` crate, and imaged's internal API.
#![deny(missing_docs)]

/// CRI v1 (`runtime.v1`): messages, `ImageService` and `RuntimeService` servers and clients.
pub use k8s_cri::v1 as cri;

/// imaged's internal API (`imaged.v1`): pull with progress events.
#[allow(missing_docs, clippy::all)]
pub mod imaged {
    tonic::include_proto!("imaged.v1");
}
