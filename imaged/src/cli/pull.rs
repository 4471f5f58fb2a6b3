//! `imaged pull`: a live progress bar per layer on a terminal, plain lines otherwise.

use super::CliError;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use proto::imaged::PullRequest;
use proto::imaged::images_client::ImagesClient;
use proto::imaged::pull_event::Event;
use std::collections::HashMap;
use std::io::IsTerminal;
use tonic::transport::Channel;

/// Pulls `image` through the internal streaming RPC and shows its progress.
pub async fn pull(channel: Channel, image: &str, user: Option<&str>) -> Result<String, CliError> {
    let (username, password) = match user {
        None => (String::new(), String::new()),
        Some(text) => {
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| CliError::Usage("--user takes USER:PASSWORD".into()))?;
            (u.to_string(), p.to_string())
        }
    };
    let mut stream = ImagesClient::new(channel)
        .pull(PullRequest {
            image: image.to_string(),
            username,
            password,
        })
        .await?
        .into_inner();
    let mut view = View::new(std::io::stderr().is_terminal());
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(Event::Resolved(resolved)) => view.resolved(&resolved),
            Some(Event::Layer(layer)) => view.layer(&layer),
            Some(Event::Done(done)) => {
                view.finish();
                println!("{}", done.image_id);
                return Ok(done.image_id);
            }
            None => {}
        }
    }
    Err(CliError::Rpc {
        code: tonic::Code::Unknown,
        message: "pull stream ended without a result".into(),
    })
}

struct View {
    bars: Option<MultiProgress>,
    layers: HashMap<String, ProgressBar>,
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

impl View {
    fn new(terminal: bool) -> Self {
        let bars = terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self {
            bars,
            layers: HashMap::new(),
        }
    }

    fn resolved(&mut self, resolved: &proto::imaged::Resolved) {
        if resolved.layers.is_empty() {
            return;
        }
        eprintln!(
            "{}: resolved to {}",
            resolved.reference, resolved.manifest_digest
        );
        let Some(bars) = &self.bars else {
            for layer in &resolved.layers {
                let state = if layer.present {
                    "already present"
                } else {
                    "pulling"
                };
                eprintln!(
                    "layer {}: {state} ({} bytes)",
                    short(&layer.digest),
                    layer.size
                );
            }
            return;
        };
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("progress template")
        .progress_chars("=> ");
        for layer in &resolved.layers {
            let bar = bars.add(ProgressBar::new(layer.size));
            bar.set_style(style.clone());
            bar.set_prefix(short(&layer.digest).to_string());
            if layer.present {
                bar.set_position(layer.size);
                bar.finish_with_message("already present");
            }
            self.layers.insert(layer.digest.clone(), bar);
        }
    }

    fn layer(&mut self, progress: &proto::imaged::LayerProgress) {
        match self.layers.get(&progress.digest) {
            Some(bar) => {
                bar.set_position(progress.downloaded);
                if progress.finished {
                    bar.finish_with_message("done");
                }
            }
            None if progress.finished => {
                eprintln!(
                    "layer {}: done ({} bytes)",
                    short(&progress.digest),
                    progress.downloaded
                )
            }
            None => {}
        }
    }

    fn finish(&mut self) {
        for bar in self.layers.values() {
            if !bar.is_finished() {
                bar.finish_with_message("done");
            }
        }
    }
}
