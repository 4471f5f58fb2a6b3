//! `imaged check`: with the daemon stopped the store is opened directly, holding its
//! database lock so no daemon starts meanwhile; with the daemon running (it holds the lock)
//! the check runs inside it, through its socket, beside the pulls it is doing.

use super::{CliError, Format, connect};
use crate::check::Problem;
use crate::config::Config;
use proto::imaged::CheckRequest;
use proto::imaged::images_client::ImagesClient;
use serde::Serialize;

/// How a check reached the store.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
enum Via {
    /// Opened directly.
    Store,
    /// Through the running daemon.
    Daemon,
}

#[derive(Serialize)]
struct Report<'a> {
    via: Via,
    root: &'a std::path::Path,
    problems: &'a [Problem],
}

/// Checks (and with `repair`, repairs) the store `config` names; prints what it found and
/// returns whether anything was.
pub async fn check(config: &Config, repair: bool, format: Format) -> Result<bool, CliError> {
    let failed = |e: &dyn std::fmt::Display| CliError::Store(e.to_string());
    let (via, problems) = match crate::daemon::check_store(config, repair)
        .await
        .map_err(|e| failed(&e))?
    {
        Some(problems) => (Via::Store, problems),
        None => (Via::Daemon, through_daemon(config, repair).await?),
    };
    let report = Report {
        via,
        root: &config.root,
        problems: &problems,
    };
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        ),
        Format::Table => print_report(&report),
    }
    Ok(!problems.is_empty())
}

async fn through_daemon(config: &Config, repair: bool) -> Result<Vec<Problem>, CliError> {
    let channel = connect(&config.address).await?;
    let response = ImagesClient::new(channel)
        .check(CheckRequest { repair })
        .await?
        .into_inner();
    Ok(response
        .problems
        .into_iter()
        .map(|p| Problem {
            subject: p.subject,
            problem: p.problem,
            repaired: p.repaired,
        })
        .collect())
}

fn print_report(report: &Report<'_>) {
    let via = match report.via {
        Via::Store => "directly (no daemon running)",
        Via::Daemon => "through the running daemon",
    };
    println!("checked {} {via}", report.root.display());
    for problem in report.problems {
        let repaired = if problem.repaired { " [repaired]" } else { "" };
        println!("{}: {}{repaired}", problem.subject, problem.problem);
    }
    let repaired = report.problems.iter().filter(|p| p.repaired).count();
    match (report.problems.len(), repaired) {
        (0, _) => println!("no problems found"),
        (found, 0) => println!("{found} problem(s) found"),
        (found, repaired) => println!("{found} problem(s) found, {repaired} repaired"),
    }
}
