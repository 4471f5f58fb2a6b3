//! The `runtimed` binary: `serve` runs the daemon, `config default` prints the default
//! configuration.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use runtimed::config::{Config, Overrides};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "runtimed",
    version,
    about = "CRI runtime service: runs pods with an OCI runtime under conmon"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(Serve),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// `runtimed serve`: the flags override the configuration file.
#[derive(clap::Args)]
struct Serve {
    /// Configuration file (TOML; every key optional).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The socket to listen on.
    #[arg(long)]
    address: Option<PathBuf>,
    /// Persistent state directory.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Volatile state directory.
    #[arg(long)]
    state: Option<PathBuf>,
    /// imaged's socket (unix:///path).
    #[arg(long)]
    image_service_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default configuration.
    Default,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    plumbing::main("runtimed", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Serve(serve) => run_serve(serve).await,
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{}", Config::default_toml());
            Ok(())
        }
    }
}

async fn run_serve(flags: Serve) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUNTIMED_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let overrides = Overrides {
        address: flags.address,
        root: flags.root,
        state: flags.state,
        image_service_endpoint: flags.image_service_endpoint,
    };
    let config = Config::load_with(flags.config.as_deref(), overrides)?;
    let root = config.root.clone();
    let daemon = runtimed::daemon::Daemon::open(config)
        .with_context(|| format!("starting with root {}", root.display()))?;
    daemon.serve(plumbing::shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}
