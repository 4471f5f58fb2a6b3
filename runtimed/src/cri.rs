//! The CRI v1 `RuntimeService` over gRPC: a thin layer over
//! [`RuntimeService`](crate::service::RuntimeService). RPCs that runtimed does not perform
//! answer Unimplemented naming the method, which the kubelet and critest report as is.

use crate::service::RuntimeService;
use proto::cri;
use proto::cri::runtime_service_server;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The tonic server side of `runtime.v1.RuntimeService`.
#[derive(Clone)]
pub struct CriRuntimeService {
    service: Arc<RuntimeService>,
    streams: Arc<Streams>,
}

/// The streaming server behind Exec, Attach and PortForward.
pub type Streams = streaming::Server<crate::stream::Streamer>;

impl CriRuntimeService {
    /// Wraps the service and the streaming server its URLs point at.
    pub fn new(service: Arc<RuntimeService>, streams: Arc<Streams>) -> Self {
        Self { service, streams }
    }
}

/// The sandbox id of a request, also recorded in the RPC's span.
fn sandbox_id(id: String) -> String {
    tracing::Span::current().record("sandbox", &id);
    id
}

/// The container id of a request, also recorded in the RPC's span.
fn container_id(id: String) -> String {
    tracing::Span::current().record("container", &id);
    id
}

fn url_status(error: streaming::RequestError) -> Status {
    match error {
        streaming::RequestError::Invalid(_) => Status::invalid_argument(error.to_string()),
        streaming::RequestError::TooMany => Status::resource_exhausted(error.to_string()),
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!("runtimed does not implement {method}"))
}

type Events = Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

#[tonic::async_trait]
impl runtime_service_server::RuntimeService for CriRuntimeService {
    type GetContainerEventsStream = Events;

    async fn version(
        &self,
        _request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(self.service.version()))
    }

    async fn status(
        &self,
        request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = request.into_inner().verbose;
        Ok(Response::new(self.service.status(verbose)))
    }

    async fn runtime_config(
        &self,
        _request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(self.service.runtime_config()))
    }

    /// The pod CIDR matters to a CNI configuration that runtimed would write from a
    /// template; with the operator's own configuration in `conf_dir` there is nothing to
    /// change, as in containerd without `conf_template`.
    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let config = request.into_inner().runtime_config;
        let cidr = config.and_then(|c| c.network_config).map(|n| n.pod_cidr);
        tracing::info!(pod_cidr = ?cidr, "runtime config updated");
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let request = request.into_inner();
        let config = request.config.unwrap_or_default();
        let pod_sandbox_id = self
            .service
            .run_pod_sandbox(config, &request.runtime_handler)
            .await
            .map_err(|e| e.to_status())?;
        tracing::Span::current().record("sandbox", &pod_sandbox_id);
        Ok(Response::new(cri::RunPodSandboxResponse { pod_sandbox_id }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = sandbox_id(request.into_inner().pod_sandbox_id);
        self.service
            .stop_pod_sandbox(&id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = sandbox_id(request.into_inner().pod_sandbox_id);
        self.service
            .remove_pod_sandbox(&id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let request = request.into_inner();
        let id = sandbox_id(request.pod_sandbox_id);
        let status = self
            .service
            .pod_sandbox_status(&id, request.verbose)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(status))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let items = self
            .service
            .list_pod_sandbox(request.into_inner().filter)
            .await;
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let sandbox = sandbox_id(request.pod_sandbox_id);
        let config = request.config.unwrap_or_default();
        let container_id = self
            .service
            .create_container(&sandbox, config)
            .await
            .map_err(|e| e.to_status())?;
        tracing::Span::current().record("container", &container_id);
        Ok(Response::new(cri::CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = container_id(request.into_inner().container_id);
        self.service
            .start_container(&id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let request = request.into_inner();
        let id = container_id(request.container_id);
        self.service
            .stop_container(&id, request.timeout)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = container_id(request.into_inner().container_id);
        self.service
            .remove_container(&id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let request = request.into_inner();
        let id = container_id(request.container_id);
        let status = self
            .service
            .container_status(&id, request.verbose)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(status))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let containers = self
            .service
            .list_containers(request.into_inner().filter)
            .await;
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let request = request.into_inner();
        let id = container_id(request.container_id);
        let output = self
            .service
            .exec_sync(&id, request.cmd, request.timeout)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: output.stdout,
            stderr: output.stderr,
            exit_code: output.exit_code,
        }))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = container_id(request.into_inner().container_id);
        let stats = self
            .service
            .container_stats(&id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let filter = request.into_inner().filter;
        let stats = self.service.list_container_stats(filter).await;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = sandbox_id(request.into_inner().pod_sandbox_id);
        let stats = self
            .service
            .pod_sandbox_stats(&id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let filter = request.into_inner().filter;
        let stats = self.service.list_pod_sandbox_stats(filter).await;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = container_id(request.into_inner().container_id);
        self.service
            .reopen_container_log(&id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let request = request.into_inner();
        let id = container_id(request.container_id);
        let resources = request.linux.unwrap_or_default();
        self.service
            .update_container_resources(&id, resources)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Events>, Status> {
        Err(unimplemented("GetContainerEvents"))
    }

    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let mut request = request.into_inner();
        let id = container_id(std::mem::take(&mut request.container_id));
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument(format!(
                "exec in container {id}: the command is empty"
            )));
        }
        let target = self.service.running_container(&id).await;
        request.container_id = target.map_err(|e| e.to_status())?.container.id;
        let url = self.streams.exec_url(request).map_err(url_status)?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let mut request = request.into_inner();
        let id = container_id(std::mem::take(&mut request.container_id));
        let target = self.service.running_container(&id).await;
        request.container_id = target.map_err(|e| e.to_status())?.container.id;
        let url = self.streams.attach_url(request).map_err(url_status)?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let mut request = request.into_inner();
        let id = sandbox_id(std::mem::take(&mut request.pod_sandbox_id));
        let target = self.service.forwarding_netns(&id).await;
        request.pod_sandbox_id = target.map_err(|e| e.to_status())?.0;
        let url = self.streams.port_forward_url(request).map_err(url_status)?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(unimplemented("CheckpointContainer"))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Err(unimplemented("ListMetricDescriptors"))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Err(unimplemented("ListPodSandboxMetrics"))
    }
}
