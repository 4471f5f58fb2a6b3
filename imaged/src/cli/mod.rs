//! Client commands of the `imaged` binary: they talk CRI (and the internal API for pull
//! progress) to a running daemon's socket.

mod check;
mod mount;
mod output;
mod pull;

pub use check::check;
pub use mount::{mount, unmount};
pub use output::{Format, human_size};
pub use pull::pull;

use proto::cri;
use proto::cri::image_service_client::ImageServiceClient;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The socket could not be reached.
    #[error("connecting to {path}: {message}")]
    Connect {
        /// Socket.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// The daemon answered with an error.
    #[error("{code:?}: {message}")]
    Rpc {
        /// gRPC code.
        code: tonic::Code,
        /// Message.
        message: String,
    },
    /// The named image does not exist.
    #[error("image {0:?} not found")]
    NotFound(String),
    /// Bad command-line value.
    #[error("{0}")]
    Usage(String),
    /// The store could not be opened or checked.
    #[error("checking the store: {0}")]
    Store(String),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        Self::Rpc {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// Opens a gRPC channel over the unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Channel, CliError> {
    plumbing::grpc::connect(path)
        .await
        .map_err(|e| CliError::Connect {
            path: path.to_path_buf(),
            message: plumbing::error_chain(&e),
        })
}

/// `imaged images`.
pub async fn images(channel: Channel, format: Format, quiet: bool) -> Result<(), CliError> {
    let response = ImageServiceClient::new(channel)
        .list_images(cri::ListImagesRequest { filter: None })
        .await?
        .into_inner();
    let mut images = response.images;
    images.sort_by(|a, b| a.repo_tags.cmp(&b.repo_tags).then(a.id.cmp(&b.id)));
    output::print_images(&images, format, quiet);
    Ok(())
}

/// `imaged inspect REF`.
pub async fn inspect(channel: Channel, image: &str, format: Format) -> Result<(), CliError> {
    let response = ImageServiceClient::new(channel)
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: true,
        })
        .await?
        .into_inner();
    let Some(status) = response.image else {
        return Err(CliError::NotFound(image.to_string()));
    };
    let info = response
        .info
        .get("info")
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok());
    output::print_inspect(&status, info, format);
    Ok(())
}

/// `imaged rmi REF...`: removes each image, failing if one is unknown.
pub async fn remove(channel: Channel, images: &[String]) -> Result<(), CliError> {
    let mut client = ImageServiceClient::new(channel);
    for image in images {
        let spec = cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        };
        let status = client
            .image_status(cri::ImageStatusRequest {
                image: Some(spec),
                verbose: false,
            })
            .await?
            .into_inner();
        let Some(found) = status.image else {
            return Err(CliError::NotFound(image.clone()));
        };
        client
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: found.id.clone(),
                    ..Default::default()
                }),
            })
            .await?;
        println!("Deleted: {}", found.id);
    }
    Ok(())
}

/// `imaged fsinfo`.
pub async fn fs_info(channel: Channel, format: Format) -> Result<(), CliError> {
    let response = ImageServiceClient::new(channel)
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await?
        .into_inner();
    output::print_fs_info(&response.image_filesystems, format);
    Ok(())
}

/// `imaged hosts REF`: the hosts a pull of REF tries, in order, with what each may do.
pub fn print_hosts(config: &crate::config::Config, image: &str) -> Result<(), CliError> {
    let reference =
        crate::reference::Reference::parse(image).map_err(|e| CliError::Usage(e.to_string()))?;
    let hosts =
        crate::registry::hosts::hosts_for(&config.registry.config_path, &reference.registry)
            .map_err(|e| CliError::Usage(e.to_string()))?;
    println!("{reference}");
    for (i, host) in hosts.iter().enumerate() {
        let caps = host.capabilities;
        let caps: Vec<&str> = [
            ("pull", caps.pull),
            ("resolve", caps.resolve),
            ("push", caps.push),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        let tls = match (host.base.scheme(), host.skip_verify, host.ca.is_empty()) {
            ("http", _, _) => "plain HTTP".to_string(),
            (_, true, _) => "TLS, verification off".to_string(),
            (_, false, true) => "TLS, system roots".to_string(),
            (_, false, false) => format!(
                "TLS, CA {}",
                host.ca
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        println!(
            "{}. {}  [{}]  {tls}{}  (from {})",
            i + 1,
            host.base,
            caps.join(","),
            if host.client.is_empty() {
                ""
            } else {
                ", client certificate"
            },
            host.source
        );
    }
    Ok(())
}
