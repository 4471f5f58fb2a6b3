//! imaged, as runtimed sees it: image configs and rootfs snapshots over imaged's internal
//! API, and CRI PullImage for images the node does not have yet (the pause image). The
//! connection is made on first use, so runtimed starts whether or not imaged is up yet.

use plumbing::mount::Mount;
use proto::cri;
use proto::cri::image_service_client::ImageServiceClient;
use proto::imaged::images_client::ImagesClient;
use proto::imaged::snapshots_client::SnapshotsClient;
use proto::imaged::{ImageConfigRequest, PrepareRequest, RemoveSnapshotRequest, SnapshotKey};
use std::path::PathBuf;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// An image's identity and config, as imaged answers.
#[derive(Debug, Clone)]
pub struct Image {
    /// The normalised reference.
    pub name: String,
    /// The image id (config digest).
    pub id: String,
    /// The repo digest.
    pub repo_digest: String,
    /// The parsed OCI config's `config` object (Entrypoint, Cmd, Env, User, ...).
    pub config: serde_json::Value,
}

/// The client of imaged's socket.
pub struct Images {
    socket: PathBuf,
    channel: Mutex<Option<Channel>>,
}

impl Images {
    /// A client of the socket at `socket`.
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            channel: Mutex::default(),
        }
    }

    async fn channel(&self) -> Result<Channel, tonic::Status> {
        let mut channel = self.channel.lock().await;
        if let Some(channel) = channel.as_ref() {
            return Ok(channel.clone());
        }
        let connected = plumbing::grpc::connect(&self.socket).await.map_err(|e| {
            let cause = plumbing::error_chain(&e);
            tonic::Status::unavailable(format!("image service {}: {cause}", self.socket.display()))
        })?;
        *channel = Some(connected.clone());
        Ok(connected)
    }

    /// The image `name` refers to; NotFound when imaged does not hold it.
    pub async fn get(&self, name: &str) -> Result<Image, tonic::Status> {
        let request = ImageConfigRequest { image: name.into() };
        let mut client = ImagesClient::new(self.channel().await?);
        let response = client.config(request).await?.into_inner();
        let config: serde_json::Value = serde_json::from_slice(&response.config)
            .map_err(|e| tonic::Status::internal(format!("config of image {name}: {e}")))?;
        Ok(Image {
            name: response.name,
            id: response.id,
            repo_digest: response.repo_digest,
            config: config.get("config").cloned().unwrap_or_default(),
        })
    }

    /// The image, pulled first when the node does not have it (as the kubelet would for a
    /// container image; the pause image has no one else to pull it).
    pub async fn get_or_pull(&self, name: &str) -> Result<Image, tonic::Status> {
        match self.get(name).await {
            Err(status) if status.code() == tonic::Code::NotFound => {
                let spec = cri::ImageSpec {
                    image: name.into(),
                    ..Default::default()
                };
                let request = cri::PullImageRequest {
                    image: Some(spec),
                    ..Default::default()
                };
                let mut client = ImageServiceClient::new(self.channel().await?);
                client.pull_image(request).await?;
                self.get(name).await
            }
            other => other,
        }
    }

    /// A writable snapshot `key` on top of `image`.
    pub async fn prepare(
        &self,
        key: &str,
        image: &str,
        readonly: bool,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let request = PrepareRequest {
            image: image.into(),
            key: key.into(),
            readonly,
        };
        let mut client = SnapshotsClient::new(self.channel().await?);
        Ok(into_mounts(
            client.prepare(request).await?.into_inner().mounts,
        ))
    }

    /// What snapshot `key` holds on disk: bytes, inodes, and the directory it lives under.
    pub async fn usage(&self, key: &str) -> Result<(u64, u64, String), tonic::Status> {
        let request = SnapshotKey { key: key.into() };
        let mut client = SnapshotsClient::new(self.channel().await?);
        let usage = client.usage(request).await?.into_inner();
        Ok((usage.bytes, usage.inodes, usage.mountpoint))
    }

    /// Removes snapshot `key`; absent keys are fine.
    pub async fn remove(&self, key: &str) -> Result<(), tonic::Status> {
        let request = RemoveSnapshotRequest { key: key.into() };
        let mut client = SnapshotsClient::new(self.channel().await?);
        client.remove(request).await?;
        Ok(())
    }
}

fn into_mounts(mounts: Vec<proto::imaged::Mount>) -> Vec<Mount> {
    mounts
        .into_iter()
        .map(|m| Mount {
            kind: m.r#type,
            source: m.source,
            options: m.options,
        })
        .collect()
}
