//! `quorum scrub`: an online scrub of a running disk, through its monitor.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::monitor::MonitorArgs;
use super::util::{human_size, parse_size};
use crate::output::outln;

/// Scrub a running disk online: read every block of every replica while
/// the disk serves, vote, and with --repair rewrite the replicas that lost
/// the vote (blocks without a majority are reported, never guessed).
/// `quorum check` does the same on a stopped disk.
///
/// The daemon is found through the disk's XML (as `quorum status FILE`
/// does) or named by its monitor socket (--qmp). Without --wait the scrub
/// is started and the command returns at once; the monitor's `query-scrub`
/// shows its progress and QUORUM_SCRUB_COMPLETED announces its end.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Exit status (with --wait, the bits of `quorum check`):
  0   started (without --wait), or scanned: replicas agree or every
      divergence was repaired
  1   error: no running daemon, the monitor refused (another scrub runs,
      read-only disk), the scrub failed or was cancelled
  2   usage error
  4   --wait: divergence found and not repaired
  8   --wait: blocks without quorum (never repaired by guessing)

Examples:
  quorum scrub disk.xml --wait                 scan, report, change nothing
  quorum scrub disk.xml --repair --rate 100M   repair in the background
  quorum scrub --qmp /run/quorum/vda.qmp --repair --wait
  quorum scrub disk.xml --cancel")]
pub struct Args {
    /// Quorum disk XML of the running disk (or give --qmp).
    #[arg(required_unless_present = "qmp")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub monitor: MonitorArgs,
    /// Rewrite the blocks of replicas that lost the vote.
    #[arg(long, conflicts_with = "cancel")]
    pub repair: bool,
    /// Most bytes per second to scan (e.g. 100M; 0 for no limit); default
    /// 200M, as the resync, which leaves most of the I/O to the guest.
    #[arg(long, value_name = "RATE", value_parser = parse_size, conflicts_with = "cancel")]
    pub rate: Option<u64>,
    /// Wait for the end, with a progress bar on a terminal; the exit status
    /// then says what was found.
    #[arg(long, conflicts_with = "cancel")]
    pub wait: bool,
    /// Cancel the running scrub.
    #[arg(long)]
    pub cancel: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut c = super::monitor::connect(args.file.as_deref(), &args.monitor)?;
    if args.cancel {
        c.execute("quorum-scrub-cancel", json!({}))
            .context("cannot cancel the scrub")?;
        outln!("scrub cancelled");
        return Ok(ExitCode::SUCCESS);
    }
    let mut start = json!({"repair": args.repair});
    if let Some(r) = args.rate {
        start["rate"] = json!(r);
    }
    c.execute("quorum-scrub", start)
        .context("the daemon refused to scrub")?;
    if !args.wait {
        outln!(
            "scrub started{}; `quorum status` or the monitor's query-scrub show its progress",
            if args.repair { " (repair)" } else { "" }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bar = if std::io::stderr().is_terminal() {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "scrub {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .context("progress template")?,
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let last = loop {
        let p = c.execute("query-scrub", json!({}))?;
        bar.set_length(p["total-bytes"].as_u64().unwrap_or(0));
        bar.set_position(p["done-bytes"].as_u64().unwrap_or(0));
        if p["status"] != "running" {
            break p;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    bar.finish_and_clear();
    report(&last)
}

/// Print what a finished scrub found; the exit status of `quorum check`.
fn report(p: &Value) -> anyhow::Result<ExitCode> {
    let status = p["status"].as_str().unwrap_or("?");
    match status {
        "completed" => {}
        "cancelled" => bail!("the scrub was cancelled"),
        _ => bail!(
            "the scrub {status}: {}",
            p["error"].as_str().unwrap_or("no reason given")
        ),
    }
    let ranges = p["divergent"].as_array().cloned().unwrap_or_default();
    let flag = |r: &Value, k: &str| r[k].as_bool().unwrap_or(false);
    let mut code = crate::exit::OK;
    for r in &ranges {
        let what = if !flag(r, "quorum") {
            code |= crate::exit::NO_QUORUM;
            "no quorum, not repaired"
        } else if flag(r, "resolved") {
            "repaired"
        } else {
            code |= crate::exit::DIVERGENT;
            "not repaired"
        };
        outln!(
            "divergent: offset {} length {}: bad replicas {}, failed {}: {what}",
            r["offset"],
            human_size(r["length"].as_u64().unwrap_or(0)),
            r["bad_replicas"],
            r["failed_replicas"]
        );
    }
    outln!(
        "scrub completed: {} scanned, {} divergent range(s)",
        human_size(p["done-bytes"].as_u64().unwrap_or(0)),
        ranges.len()
    );
    Ok(ExitCode::from(code))
}
