//! imaged's internal API (`imaged.v1`): pull with progress for the CLI, and snapshots on
//! top of images for the runtime.

use crate::cri::status::to_status;
use crate::registry::auth::Credentials;
use crate::service::ImageService;
use proto::imaged::{
    self, CheckRequest, CheckResponse, ImageConfigRequest, ImageConfigResponse, MountsResponse,
    PrepareRequest, PullEvent, PullRequest, RemoveSnapshotRequest, SnapshotKey, UsageResponse,
    VersionResponse, images_server, snapshots_server,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

/// Server side of `imaged.v1.Images` and `imaged.v1.Snapshots`.
#[derive(Clone)]
pub struct InternalApi {
    service: Arc<ImageService>,
}

impl InternalApi {
    /// Wraps the service.
    pub fn new(service: Arc<ImageService>) -> Self {
        Self { service }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<PullEvent, Status>> + Send>>;

#[tonic::async_trait]
impl images_server::Images for InternalApi {
    type PullStream = EventStream;

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        tracing::Span::current().record("image", &request.image);
        let credentials = if request.username.is_empty() {
            Credentials::Anonymous
        } else {
            Credentials::Basic {
                username: request.username,
                password: request.password,
            }
        };
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let (results, result_stream) = tokio::sync::mpsc::unbounded_channel();
        let service = self.service.clone();
        let pull = async move {
            if let Err(e) = service
                .pull(&request.image, credentials, Some(events))
                .await
            {
                let _ = results.send(Err(to_status(&e)));
            }
        };
        tokio::spawn(pull.instrument(tracing::Span::current()));
        let progress = UnboundedReceiverStream::new(receiver)
            .map(|event| Ok(PullEvent { event: Some(event) }));
        let failure = UnboundedReceiverStream::new(result_stream);
        Ok(Response::new(Box::pin(progress.chain(failure))))
    }

    async fn version(&self, _request: Request<()>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn config(
        &self,
        request: Request<ImageConfigRequest>,
    ) -> Result<Response<ImageConfigResponse>, Status> {
        let image = request.into_inner().image;
        tracing::Span::current().record("image", &image);
        let config = self.service.config(&image).map_err(|e| to_status(&e))?;
        Ok(Response::new(ImageConfigResponse {
            name: config.name,
            id: config.id,
            repo_digest: config.repo_digest,
            config: config.config,
        }))
    }

    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let problems = self
            .service
            .check(request.into_inner().repair)
            .await
            .map_err(|e| to_status(&e))?;
        let problems = problems
            .into_iter()
            .map(|p| imaged::Problem {
                subject: p.subject,
                problem: p.problem,
                repaired: p.repaired,
            })
            .collect();
        Ok(Response::new(CheckResponse { problems }))
    }
}

#[tonic::async_trait]
impl snapshots_server::Snapshots for InternalApi {
    async fn prepare(
        &self,
        request: Request<PrepareRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let request = request.into_inner();
        tracing::Span::current().record("image", &request.image);
        let mounts = self
            .service
            .prepare(&request.image, &request.key, request.readonly)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(mounts_response(mounts)))
    }

    async fn mounts(
        &self,
        request: Request<SnapshotKey>,
    ) -> Result<Response<MountsResponse>, Status> {
        let mounts = self
            .service
            .mounts(&request.into_inner().key)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(mounts_response(mounts)))
    }

    async fn usage(
        &self,
        request: Request<SnapshotKey>,
    ) -> Result<Response<UsageResponse>, Status> {
        let (usage, root) = self
            .service
            .usage(&request.into_inner().key)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(UsageResponse {
            bytes: usage.size,
            inodes: usage.inodes,
            mountpoint: root.display().to_string(),
        }))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        self.service
            .remove_snapshot(&request.into_inner().key)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(()))
    }
}

/// The mounts of a `MountsResponse`, as a client of the API mounts them.
pub fn mounts_from(response: MountsResponse) -> Vec<snapshotters::Mount> {
    response
        .mounts
        .into_iter()
        .map(|m| snapshotters::Mount {
            kind: m.r#type,
            source: m.source,
            options: m.options,
        })
        .collect()
}

fn mounts_response(mounts: Vec<snapshotters::Mount>) -> MountsResponse {
    MountsResponse {
        mounts: mounts
            .into_iter()
            .map(|m| imaged::Mount {
                r#type: m.kind,
                source: m.source,
                options: m.options,
            })
            .collect(),
    }
}
