//! The CRI v1 `ImageService` over gRPC: a thin layer that names the image in the RPC's span,
//! calls [`ImageService`](crate::service::ImageService) and converts errors.

mod listing;
pub mod status;

pub use listing::ImageServer;

use crate::reference::is_docker_hub;
use crate::registry::auth::{AuthInput, Credentials};
use crate::service::ImageService;
use proto::cri;
use proto::cri::image_service_server;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The tonic server side of `runtime.v1.ImageService`, served inside [`ImageServer`].
#[derive(Clone)]
pub struct CriImageService {
    service: Arc<ImageService>,
}

impl CriImageService {
    /// Wraps the service.
    pub fn new(service: Arc<ImageService>) -> Self {
        Self { service }
    }
}

/// The image a ListImages request is limited to, if any.
fn list_filter(request: &cri::ListImagesRequest) -> Option<&str> {
    request
        .filter
        .as_ref()
        .and_then(|f| f.image.as_ref())
        .map(|s| s.image.as_str())
}

/// The requested image, also recorded in the RPC's span.
fn image_name(spec: Option<&cri::ImageSpec>) -> &str {
    let name = spec.map_or("", |s| s.image.as_str());
    tracing::Span::current().record("image", name);
    name
}

/// Decodes the CRI credentials; `server_address`, when set, limits them to that registry.
pub fn credentials(
    auth: Option<&cri::AuthConfig>,
    registry: &str,
) -> Result<Credentials, crate::error::Error> {
    let Some(auth) = auth else {
        return Ok(Credentials::Anonymous);
    };
    if !auth.server_address.is_empty() {
        let address = auth.server_address.as_str();
        let host = address
            .split_once("://")
            .map_or(address, |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or("");
        let same = host == registry || (is_docker_hub(registry) && is_docker_hub(host));
        if !same {
            return Ok(Credentials::Anonymous);
        }
    }
    Ok(Credentials::from_auth(&AuthInput {
        username: &auth.username,
        password: &auth.password,
        auth: &auth.auth,
        identity_token: &auth.identity_token,
        registry_token: &auth.registry_token,
    })?)
}

#[tonic::async_trait]
impl image_service_server::ImageService for CriImageService {
    /// The decoded form of what [`ImageServer`] answers ListImages with on the socket.
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let request = request.into_inner();
        let images = self
            .service
            .list(list_filter(&request))
            .map_err(|e| status::to_status(&e))?;
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref());
        let (image, info) = self
            .service
            .status(name, request.verbose)
            .map_err(|e| status::to_status(&e))?;
        Ok(Response::new(cri::ImageStatusResponse { image, info }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref());
        let reference =
            crate::reference::Reference::parse(name).map_err(|e| status::to_status(&e.into()))?;
        let credentials = credentials(request.auth.as_ref(), &reference.registry)
            .map_err(|e| status::to_status(&e))?;
        let started = std::time::Instant::now();
        match self.service.pull(name, credentials, None).await {
            Ok(image_ref) => {
                tracing::info!(image_ref, elapsed = ?started.elapsed(), "pulled");
                Ok(Response::new(cri::PullImageResponse { image_ref }))
            }
            Err(e) => {
                tracing::warn!(error = %e, "pull failed");
                Err(status::to_status(&e))
            }
        }
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref());
        self.service
            .remove(name)
            .await
            .map_err(|e| status::to_status(&e))?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let usage = self.service.fs_info().await;
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![usage],
            container_filesystems: vec![],
        }))
    }
}
