//! Pod start latency and running pods, for the pod benchmark (scripts/bench-pods.sh): the
//! time from RunPodSandbox to a container's first line in its CRI log file, as the kubelet
//! starts a pod (RunPodSandbox, PullImage when cold, CreateContainer, StartContainer).
//! Speaks plain CRI v1 to a runtime and an image endpoint, so the same client measures
//! runtimed with imaged and containerd.
//!
//! ```text
//! pod_latency --runtime-endpoint S --image-endpoint S pull IMAGE...
//! pod_latency --runtime-endpoint S --image-endpoint S start --image IMG --log-dir D --runs N [--cold]
//! pod_latency --runtime-endpoint S --image-endpoint S pods --image IMG --log-dir D --count N
//! pod_latency --runtime-endpoint S --image-endpoint S teardown
//! ```
//!
//! `start` prints the seconds of each timed run, one a line; every pod is stopped and
//! removed after its run, outside the timed part. `pods` starts COUNT pods and leaves them
//! running; `teardown` stops and removes every pod sandbox of the runtime.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use proto::cri::image_service_client::ImageServiceClient;
use proto::cri::runtime_service_client::RuntimeServiceClient;
use proto::cri::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxContainerConfig,
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata,
    PullImageRequest, RemoveImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

/// How long a container may take to write its first log line before the run fails.
const LOG_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser)]
struct Args {
    /// The CRI runtime service: `unix:///path` or a path.
    #[arg(long)]
    runtime_endpoint: String,
    /// The CRI image service: `unix:///path` or a path.
    #[arg(long)]
    image_endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull each IMAGE (untimed), e.g. the pause image a node keeps.
    Pull { images: Vec<String> },
    /// Time RUNS pod starts of one container of IMAGE, printing each run's seconds.
    Start {
        #[arg(long)]
        image: String,
        /// Pod log directories go under this directory.
        #[arg(long)]
        log_dir: PathBuf,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Untimed runs first, so that one-time work (the CNI bridge's creation, the first
        /// exec of every binary) is not counted as a pod start.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Remove IMAGE before each run and pull it inside the timed part, after
        /// RunPodSandbox as the kubelet does; otherwise IMAGE is pulled once beforehand.
        #[arg(long)]
        cold: bool,
    },
    /// Start COUNT pods of one sleeping container of IMAGE each and leave them running.
    Pods {
        #[arg(long)]
        image: String,
        #[arg(long)]
        log_dir: PathBuf,
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
    /// Stop and remove every pod sandbox.
    Teardown,
}

struct Clients {
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("pod_latency: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut clients = Clients {
        runtime: RuntimeServiceClient::new(dial(&args.runtime_endpoint).await?),
        image: ImageServiceClient::new(dial(&args.image_endpoint).await?),
    };
    match args.command {
        Command::Pull { images } => {
            for image in &images {
                pull(&mut clients, image).await?;
            }
        }
        Command::Start {
            image,
            log_dir,
            runs,
            warmup,
            cold,
        } => {
            if !cold {
                pull(&mut clients, &image).await?;
            }
            for run in 0..warmup + runs {
                if cold {
                    remove_image(&mut clients, &image).await?;
                }
                let start = Instant::now();
                let pod = start_pod(&mut clients, &image, &log_dir, cold).await?;
                let seconds = start.elapsed().as_secs_f64();
                remove_pod(&mut clients, &pod).await?;
                if run >= warmup {
                    println!("{seconds:.3}");
                }
            }
        }
        Command::Pods {
            image,
            log_dir,
            count,
        } => {
            pull(&mut clients, &image).await?;
            for _ in 0..count {
                start_pod(&mut clients, &image, &log_dir, false).await?;
            }
        }
        Command::Teardown => {
            let pods = clients
                .runtime
                .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
                .context("listing pod sandboxes")?
                .into_inner()
                .items;
            for pod in pods {
                remove_pod(&mut clients, &pod.id).await?;
            }
        }
    }
    Ok(())
}

async fn dial(endpoint: &str) -> anyhow::Result<Channel> {
    let path = Path::new(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    plumbing::grpc::connect(path)
        .await
        .with_context(|| format!("connecting to {}", path.display()))
}

/// Starts a pod with one container of `image` running `echo ready; exec sleep 3600`, and
/// returns its sandbox id once the container's log file holds its first full line.
/// `pull_image` pulls `image` between RunPodSandbox and CreateContainer.
async fn start_pod(
    clients: &mut Clients,
    image: &str,
    log_dir: &Path,
    pull_image: bool,
) -> anyhow::Result<String> {
    // A unique name and uid per pod: both runtimes refuse a second pod of the same name.
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let name = format!("bench-{}-{nanos}", std::process::id());
    let pod_log_dir = log_dir.join(&name);
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: format!("{name}-uid"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.clone(),
        log_directory: pod_log_dir.display().to_string(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..PodSandboxConfig::default()
    };
    let pod = clients
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    if pull_image {
        pull(clients, image).await?;
    }
    let container = clients
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "sleep".into(),
                    attempt: 0,
                }),
                image: Some(image_spec(image)),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo ready; exec sleep 3600".into(),
                ],
                log_path: "sleep.log".into(),
                linux: Some(LinuxContainerConfig::default()),
                ..ContainerConfig::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    clients
        .runtime
        .start_container(StartContainerRequest {
            container_id: container,
        })
        .await
        .context("StartContainer")?;
    wait_for_line(&pod_log_dir.join("sleep.log")).await?;
    Ok(pod)
}

/// Polls `path` every millisecond until it holds a whole line: the CRI log format writes
/// one line per record, so the container's first output has reached the file.
async fn wait_for_line(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + LOG_TIMEOUT;
    loop {
        match std::fs::read(path) {
            Ok(content) if content.contains(&b'\n') => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        if Instant::now() > deadline {
            bail!("{}: no log line after {LOG_TIMEOUT:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn remove_pod(clients: &mut Clients, pod: &str) -> anyhow::Result<()> {
    clients
        .runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .with_context(|| format!("StopPodSandbox {pod}"))?;
    clients
        .runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .with_context(|| format!("RemovePodSandbox {pod}"))?;
    Ok(())
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        ..ImageSpec::default()
    }
}

async fn pull(clients: &mut Clients, image: &str) -> anyhow::Result<()> {
    clients
        .image
        .pull_image(PullImageRequest {
            image: Some(image_spec(image)),
            ..PullImageRequest::default()
        })
        .await
        .with_context(|| format!("pulling {image}"))?;
    Ok(())
}

/// Removes `image`; one already absent is fine (the first cold run finds it pulled or not).
async fn remove_image(clients: &mut Clients, image: &str) -> anyhow::Result<()> {
    match clients
        .image
        .remove_image(RemoveImageRequest {
            image: Some(image_spec(image)),
        })
        .await
    {
        Err(status) if status.code() != tonic::Code::NotFound => {
            Err(status).with_context(|| format!("removing {image}"))
        }
        _ => Ok(()),
    }
}
