//! Round-trip times of CRI image calls, for the pull benchmark: one PullImage (a cold pull,
//! timed from the request to the answer, without a client process starting up), and over
//! one connection the PullImage of an image already present (a warm pull) and ListImages.
//! Speaks plain CRI, so the same numbers can be taken from imaged and from containerd.
//!
//! ```text
//! cri_latency --socket S once IMAGE
//! cri_latency --socket S populate --prefix REGISTRY/bench/many --count 1000
//! cri_latency --socket S warm IMAGE --calls 100
//! cri_latency --socket S list --calls 1000
//! cri_latency --socket S load IMAGE --status STORED --concurrency 200
//! ```
//!
//! `once` prints the seconds; `warm` and `list` print `p50_ms P50 p99_ms P99 calls N`
//! (and `images N` for list). `load` times ImageStatus (of STORED), ListImages and
//! ImageFsInfo idle, then again while IMAGE is pulled, with CONCURRENCY status calls at a
//! time: one line each, `idle` and `load`, of `<call>_p50 P50 <call>_p99 P99` per call
//! (milliseconds), then `calls N` and, under load, `pull_s S`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{StreamExt, TryStreamExt};
use proto::cri::image_service_client::ImageServiceClient;
use proto::cri::{ImageSpec, ListImagesRequest, PullImageRequest};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// The CRI image service's unix socket.
    #[arg(long)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull IMAGE once and print how many seconds the call took.
    Once { image: String },
    /// Pull PREFIX:0 .. PREFIX:<COUNT - 1>, eight at a time.
    Populate {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: u32,
    },
    /// Pull IMAGE once, then time CALLS more pulls of it.
    Warm {
        image: String,
        #[arg(long, default_value_t = 100)]
        calls: usize,
    },
    /// Time CALLS ListImages calls.
    List {
        #[arg(long, default_value_t = 1000)]
        calls: usize,
    },
    /// Time ImageStatus, ListImages and ImageFsInfo idle, then while IMAGE is pulled.
    Load {
        image: String,
        /// A stored image to ask the status of.
        #[arg(long)]
        status: String,
        /// Status calls in flight at a time while the pull runs.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = imaged::cli::connect(&args.socket)
        .await
        .with_context(|| format!("connecting to {}", args.socket.display()))?;
    let mut client = ImageServiceClient::new(channel);
    match args.command {
        Command::Once { image } => {
            let start = Instant::now();
            pull(&mut client, &image).await?;
            println!("{:.3}", start.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Populate { prefix, count } => populate(&client, &prefix, count).await,
        Command::Warm { image, calls } => {
            pull(&mut client, &image).await?;
            let times = timed(calls, || {
                let mut client = client.clone();
                let image = image.clone();
                async move { pull(&mut client, &image).await }
            })
            .await?;
            report(&times, "");
            Ok(())
        }
        Command::Load {
            image,
            status,
            concurrency,
        } => load(&client, &image, &status, concurrency).await,
        Command::List { calls } => {
            let images = list(&mut client).await?;
            let times = timed(calls, || {
                let mut client = client.clone();
                async move { list(&mut client).await.map(drop) }
            })
            .await?;
            report(&times, &format!(" images {images}"));
            Ok(())
        }
    }
}

/// Latencies of the three calls, each sorted.
#[derive(Default)]
struct Calls {
    status: Vec<Duration>,
    list: Vec<Duration>,
    fs_info: Vec<Duration>,
}

impl Calls {
    fn print(mut self, label: &str, extra: &str) {
        let mut line = label.to_string();
        for (name, times) in [
            ("status", &mut self.status),
            ("list", &mut self.list),
            ("fsinfo", &mut self.fs_info),
        ] {
            times.sort();
            line += &format!(
                " {name}_p50 {:.3} {name}_p99 {:.3}",
                at(times, 0.5),
                at(times, 0.99)
            );
        }
        println!("{line} calls {}{extra}", self.status.len());
    }
}

async fn load(
    client: &ImageServiceClient<Channel>,
    image: &str,
    stored: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    // The same waves as under load, a few of them, with nothing else going on.
    let mut idle = Calls::default();
    for _ in 0..5 {
        wave(client, stored, concurrency, &mut idle).await?;
    }
    idle.print("idle", "");
    let started = Instant::now();
    let mut puller = client.clone();
    let image = image.to_string();
    let pull = tokio::spawn(async move { pull(&mut puller, &image).await });
    let mut busy = Calls::default();
    while !pull.is_finished() {
        wave(client, stored, concurrency, &mut busy).await?;
    }
    pull.await??;
    busy.print(
        "load",
        &format!(" pull_s {:.3}", started.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// `concurrency` status calls at once, beside one ListImages and one ImageFsInfo.
async fn wave(
    client: &ImageServiceClient<Channel>,
    stored: &str,
    concurrency: usize,
    calls: &mut Calls,
) -> anyhow::Result<()> {
    let statuses =
        futures_util::future::try_join_all((0..concurrency).map(|_| status(client, stored)));
    let mut lister = client.clone();
    let (statuses, listed, sized) =
        tokio::join!(statuses, time(list(&mut lister)), fs_info(client));
    calls.status.extend(statuses?);
    calls.list.push(listed?);
    calls.fs_info.push(sized?);
    Ok(())
}

async fn time<T>(call: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<Duration> {
    let start = Instant::now();
    call.await?;
    Ok(start.elapsed())
}

async fn status(client: &ImageServiceClient<Channel>, image: &str) -> anyhow::Result<Duration> {
    let request = proto::cri::ImageStatusRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..ImageSpec::default()
        }),
        verbose: false,
    };
    let mut client = client.clone();
    time(async move {
        let response = client.image_status(request).await.context("image status")?;
        response
            .into_inner()
            .image
            .map(drop)
            .with_context(|| format!("{image} is not stored"))
    })
    .await
}

async fn fs_info(client: &ImageServiceClient<Channel>) -> anyhow::Result<Duration> {
    let mut client = client.clone();
    time(async move {
        client
            .image_fs_info(proto::cri::ImageFsInfoRequest {})
            .await
            .context("image fs info")
    })
    .await
}

async fn populate(
    client: &ImageServiceClient<Channel>,
    prefix: &str,
    count: u32,
) -> anyhow::Result<()> {
    futures_util::stream::iter(0..count)
        .map(|n| {
            let mut client = client.clone();
            let image = format!("{prefix}:{n}");
            async move { pull(&mut client, &image).await }
        })
        .buffer_unordered(8)
        .try_collect::<()>()
        .await
}

async fn pull(client: &mut ImageServiceClient<Channel>, image: &str) -> anyhow::Result<()> {
    let response = client
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..ImageSpec::default()
            }),
            ..PullImageRequest::default()
        })
        .await
        .with_context(|| format!("pulling {image}"))?;
    if response.into_inner().image_ref.is_empty() {
        bail!("pulling {image}: empty image_ref");
    }
    Ok(())
}

async fn list(client: &mut ImageServiceClient<Channel>) -> anyhow::Result<usize> {
    let response = client
        .list_images(ListImagesRequest { filter: None })
        .await
        .context("listing images")?;
    Ok(response.into_inner().images.len())
}

/// Runs `call` `calls` times in a row and returns each duration, sorted.
async fn timed<F, Fut>(calls: usize, mut call: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        call().await?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times)
}

/// The `q` quantile of sorted durations, in milliseconds.
fn at(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1e3
}

fn report(sorted: &[Duration], extra: &str) {
    println!(
        "p50_ms {:.3} p99_ms {:.3} calls {}{extra}",
        at(sorted, 0.50),
        at(sorted, 0.99),
        sorted.len()
    );
}
