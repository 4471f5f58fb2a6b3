//! Applies uncompressed layer tars with the overlay snapshotter and with GNU `tar -x`, the
//! same files into fresh directories on the same filesystem, and prints both times and
//! their ratio. Each run starts with dirty pages synced and caches dropped (root needed), as
//! ext4 without a journal otherwise scans cached inode tables for recently deleted inodes on
//! every create; keep the tars on tmpfs so that dropping caches does not drop them.
//!
//! `cargo run --release -p snapshotters --example apply_bench -- [--runs N] [--dir D] TAR...`
//! applies each tar in turn into directories under D; `--parallel` applies all of them at
//! once (one thread, or one `tar` process, per file), like a pull of independent layers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshotters::{Backend, Snapshots, Snapshotter};

struct Args {
    runs: usize,
    dir: PathBuf,
    parallel: bool,
    tars: Vec<PathBuf>,
}

const USAGE: &str = "usage: apply_bench [--runs N] [--dir D] [--parallel] TAR...";

fn parse_args() -> Args {
    let mut args = Args {
        runs: 5,
        dir: std::env::temp_dir(),
        parallel: false,
        tars: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => args.runs = it.next().and_then(|n| n.parse().ok()).expect("--runs N"),
            "--dir" => args.dir = it.next().expect("--dir D").into(),
            "--parallel" => args.parallel = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => args.tars.push(arg.into()),
        }
    }
    assert!(!args.tars.is_empty(), "{USAGE}");
    args
}

fn main() -> io::Result<()> {
    let args = parse_args();
    let mut ours = Vec::new();
    let mut gnu = Vec::new();
    for run in 0..args.runs {
        let work = tempfile::tempdir_in(&args.dir)?;
        ours.push(time_imaged(work.path(), &args)?);
        gnu.push(time_tar(work.path(), &args)?);
        println!(
            "run {}: snapshotter {:.3} s, tar -x {:.3} s",
            run + 1,
            ours[run].as_secs_f64(),
            gnu[run].as_secs_f64()
        );
    }
    let (ours, gnu) = (median(ours), median(gnu));
    println!(
        "median: snapshotter {:.3} s, tar -x {:.3} s, ratio {:.2}",
        ours.as_secs_f64(),
        gnu.as_secs_f64(),
        ours.as_secs_f64() / gnu.as_secs_f64()
    );
    Ok(())
}

fn time_imaged(work: &Path, args: &Args) -> io::Result<Duration> {
    let db = redb::Database::create(work.join("meta.redb")).map_err(io::Error::other)?;
    let overlay = Snapshots::open(Backend::Overlayfs, work.join("overlayfs"), Arc::new(db))
        .map_err(io::Error::other)?;
    let keys: Vec<String> = (0..args.tars.len()).map(|n| format!("layer-{n}")).collect();
    for key in &keys {
        overlay
            .prepare(key, None, BTreeMap::new())
            .map_err(io::Error::other)?;
    }
    drop_caches();
    let apply = |key: &str, tar: &Path| -> io::Result<()> {
        let mut reader = BufReader::with_capacity(256 * 1024, File::open(tar)?);
        overlay.apply(key, &mut reader).map_err(io::Error::other)?;
        Ok(())
    };
    let start = Instant::now();
    if args.parallel {
        std::thread::scope(|scope| {
            let handles: Vec<_> = keys
                .iter()
                .zip(&args.tars)
                .map(|(key, tar)| scope.spawn(move || apply(key, tar)))
                .collect();
            handles
                .into_iter()
                .try_for_each(|handle| handle.join().expect("apply thread panicked"))
        })?;
    } else {
        for (key, tar) in keys.iter().zip(&args.tars) {
            apply(key, tar)?;
        }
    }
    Ok(start.elapsed())
}

fn time_tar(work: &Path, args: &Args) -> io::Result<Duration> {
    let dirs: Vec<PathBuf> = (0..args.tars.len())
        .map(|n| work.join(format!("tar-{n}")))
        .collect();
    for dir in &dirs {
        std::fs::create_dir(dir)?;
    }
    drop_caches();
    let command = |tar: &Path, dir: &Path| {
        let mut command = Command::new("tar");
        command.arg("-x").arg("-f").arg(tar).arg("-C").arg(dir);
        command
    };
    let start = Instant::now();
    if args.parallel {
        let children = args
            .tars
            .iter()
            .zip(&dirs)
            .map(|(tar, dir)| command(tar, dir).spawn())
            .collect::<io::Result<Vec<_>>>()?;
        for mut child in children {
            check(child.wait()?)?;
        }
    } else {
        for (tar, dir) in args.tars.iter().zip(&dirs) {
            check(command(tar, dir).status()?)?;
        }
    }
    Ok(start.elapsed())
}

fn check(status: std::process::ExitStatus) -> io::Result<()> {
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("tar -x failed: {status}")))
    }
}

/// Syncs, then drops caches: dirty pages of the previous run would otherwise be written back
/// during the next one, and every run starts cold.
fn drop_caches() {
    rustix::fs::sync();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("cannot drop caches: {e}");
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}
