//! The `imaged` binary: `serve` runs the daemon; the other commands are clients of it.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use imaged::cli::{self, Format};
use imaged::config::Config;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "imaged",
    version,
    about = "CRI image service: pulls, stores and unpacks OCI images"
)]
struct Args {
    /// Socket of the daemon (client commands).
    #[arg(
        long,
        global = true,
        env = "IMAGED_SOCKET",
        default_value = "/run/imaged/imaged.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Configuration file (TOML; every key optional).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Pull an image, showing progress.
    Pull {
        /// Image reference.
        image: String,
        /// Registry credentials as USER:PASSWORD.
        #[arg(long)]
        user: Option<String>,
    },
    /// List images.
    Images {
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Format,
        /// Print image ids only.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show one image.
    Inspect {
        /// Name, digest reference or id.
        image: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "json")]
        output: Format,
    },
    /// Remove images.
    Rmi {
        /// Names, digest references or ids.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Mount an image's root filesystem on a directory (read-only unless --rw).
    Mount {
        /// Name, digest reference or id of a pulled image.
        image: String,
        /// An existing directory.
        dir: PathBuf,
        /// A writable snapshot on top of the image; what is written goes at unmount.
        #[arg(long)]
        rw: bool,
    },
    /// Unmount what `imaged mount` put on a directory and remove its snapshot.
    Unmount {
        /// The directory.
        dir: PathBuf,
    },
    /// Show the image filesystem usage.
    Fsinfo {
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Format,
    },
    /// Verify the store: blob digests, images' parts, snapshot metadata against the disk,
    /// crash leftovers. Opens the store when no daemon runs, else asks the daemon. Exits 1
    /// when problems were found (repaired or not), 0 when there were none, 2 when the
    /// check could not run.
    Check {
        /// Configuration file, for the root and the socket.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Remove what cannot be trusted: corrupt blobs, images missing parts, broken
        /// snapshots, leftovers. Affected images can then be pulled again.
        #[arg(long)]
        repair: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show the registry hosts a reference is pulled from (hosts.toml resolution).
    Hosts {
        /// Image reference.
        image: String,
        /// Configuration file, for `registry.config_path`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default configuration.
    Default,
}

/// The exit statuses of `imaged check` when it found problems, and when it could not check.
const PROBLEMS_FOUND: u8 = 1;
const CHECK_FAILED: u8 = 2;

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let args = Args::parse();
    if let Command::Check {
        config,
        repair,
        output,
    } = &args.command
    {
        let (config, repair, output) = (config.clone(), *repair, *output);
        let mut found = false;
        let status = plumbing::main("imaged check", async {
            let config = Config::load(config.as_deref())?;
            found = cli::check(&config, repair, output).await?;
            anyhow::Ok(())
        });
        return match (status == std::process::ExitCode::SUCCESS, found) {
            (false, _) => std::process::ExitCode::from(CHECK_FAILED),
            (true, true) => std::process::ExitCode::from(PROBLEMS_FOUND),
            (true, false) => status,
        };
    }
    plumbing::main("imaged", run(args))
}

/// glibc gives each thread an arena on its first allocation, up to eight per core on 64-bit,
/// and each keeps what is freed in it. A pull runs four threads per layer that pass 256 KiB
/// chunks along, so freed chunks pile up across many arenas. With two, a cold zstd pull of a
/// 1.1 GB image peaks at 42-43 MB of RSS instead of 44-49 MB, at the same CPU within the
/// noise of the measurement. An arena cap set in the environment (`MALLOC_ARENA_MAX`, or
/// `glibc.malloc.arena_max` in `GLIBC_TUNABLES`) still decides.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    let set = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.arena_max"));
    if !set {
        // SAFETY: mallopt only sets a parameter of the allocator, and runs here before any
        // thread is started.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Serve { config } => serve(config).await,
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{}", Config::default_toml());
            Ok(())
        }
        Command::Hosts { image, config } => {
            let config = Config::load(config.as_deref())?;
            imaged::cli::print_hosts(&config, &image)?;
            Ok(())
        }
        command => client(&args.socket, command).await,
    }
}

async fn client(socket: &std::path::Path, command: Command) -> anyhow::Result<()> {
    let channel = cli::connect(socket).await?;
    match command {
        Command::Pull { image, user } => {
            cli::pull(channel, &image, user.as_deref()).await?;
        }
        Command::Images { output, quiet } => cli::images(channel, output, quiet).await?,
        Command::Inspect { image, output } => cli::inspect(channel, &image, output).await?,
        Command::Rmi { images } => cli::remove(channel, &images).await?,
        Command::Fsinfo { output } => cli::fs_info(channel, output).await?,
        Command::Mount { image, dir, rw } => cli::mount(channel, &image, &dir, rw).await?,
        Command::Unmount { dir } => cli::unmount(channel, &dir).await?,
        Command::Serve { .. }
        | Command::Config { .. }
        | Command::Hosts { .. }
        | Command::Check { .. } => {
            unreachable!("handled without a connection")
        }
    }
    Ok(())
}

async fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMAGED_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::load(config.as_deref())?;
    let daemon = imaged::daemon::Daemon::open(&config)
        .await
        .with_context(|| format!("starting with root {}", config.root.display()))?;
    daemon.serve(plumbing::shutdown_signal()).await?;
    tracing::info!("stopped");
    // Now, not once the runtime has waited for blocking work that abandoned requests left
    // (an apply, a check hashing the store): the shutdown grace is the bound.
    std::process::exit(0)
}
