//! `quorum check`: offline scrub of every replica, with optional repair.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use quorum_engine::{Disk, Divergence, Mask, OpenOptions};
use serde::Serialize;

use super::util::{human_size, load_disk};
use crate::output::outln;

/// Bytes voted per step.
const STEP: u64 = 4 << 20;

/// Read every block of every replica, vote, and report where they differ.
///
/// Ranges that every replica reports unallocated are skipped, so a sparse
/// disk checks quickly. Run it while nothing else uses the images (it takes
/// the same locks as `serve`).
///
/// The disk's record (see --state) tells which replicas missed writes:
/// their missed ranges do not vote, and are listed as stale. With --repair,
/// what an unclean stop left is reconciled and stale replicas are resynced
/// first, then the scrub runs.
///
/// Exit status: 0 all agree (or all repaired), 4 divergence not repaired,
/// 8 blocks without quorum, 12 both, 1 error, 2 usage error.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Exit status (bits, as fsck's; no result shares a code with a usage error):
  0   all replicas agree, or every divergence was repaired
  4   divergence found and not repaired (run again with --repair)
  8   some blocks have no quorum: no `threshold` replicas agree, so --repair
      leaves them alone rather than guess
  12  both 4 and 8
  1   error (invalid XML, a replica that cannot be opened, an I/O error)
  2   usage error (unknown option, missing argument)
The verdict is in the exit status even when nobody reads the output
(`quorum check d.xml | head -3`).

Examples:
  quorum check examples/quorum.xml
  quorum check examples/quorum.xml --repair
  quorum check examples/quorum.xml --json")]
pub struct Args {
    /// Quorum disk XML (a <disk>, or a <domain> with it in <devices> or in
    /// quorum's <metadata>; `-` reads standard input).
    pub file: PathBuf,
    /// Which disk of a <domain> (its target dev); default: the first quorum disk.
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// Rewrite blocks that lost the vote with the majority's content.
    #[arg(long)]
    pub repair: bool,
    /// Print a JSON report instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub record: super::state::StateArgs,
}

/// One divergent range as `check --json` prints it (and the monitor's
/// `query-scrub` returns it).
#[derive(Debug, Serialize)]
pub struct Range {
    offset: u64,
    length: u64,
    bad_replicas: Vec<usize>,
    failed_replicas: Vec<usize>,
    quorum: bool,
    resolved: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    disk: String,
    size: u64,
    replicas: Vec<String>,
    threshold: usize,
    checked_bytes: u64,
    skipped_bytes: u64,
    /// Replicas that could not be opened (checked without them).
    missing: Vec<Missing>,
    /// Bytes each replica missed and has not been resynced (their ranges
    /// do not vote); empty without a record.
    stale_bytes: Vec<u64>,
    /// Bytes copied to stale replicas by --repair before the scrub.
    resynced_bytes: u64,
    ranges: Vec<Range>,
}

#[derive(Debug, Serialize)]
struct Missing {
    replica: usize,
    reason: String,
}

fn members(m: Mask) -> Vec<usize> {
    (0..64).filter(|i| m & (1 << i) != 0).collect()
}

/// `d` as `check --json` prints it; the one serialisation of a divergent
/// range (the monitor's `query-scrub` uses it too).
pub fn range_json(d: &Divergence) -> Range {
    Range {
        offset: d.offset,
        length: d.length,
        bad_replicas: members(d.bad),
        failed_replicas: members(d.failed),
        quorum: d.has_quorum,
        resolved: d.repaired,
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = load_disk(&args.file, args.target.as_deref())?;
    if args.repair && cfg.readonly {
        bail!("the disk is <readonly/>: refusing to --repair it");
    }
    let opts = OpenOptions {
        read_only: !args.repair,
        state: args.record.path(&cfg),
        missed_granularity: Some(args.record.missed_granularity),
        ..Default::default()
    };
    let disk = quorum_engine::open(&cfg, &opts)?;
    let resynced = if args.repair { disk.heal_now() } else { 0 };
    let stale = disk.missed_bytes().unwrap_or_default();
    for (i, b) in stale.iter().enumerate().filter(|(_, b)| **b > 0) {
        let _ = writeln!(
            std::io::stderr(),
            "quorum check: replica-{i} is stale: {} missed and not resynced yet (serve resyncs it, or check --repair)",
            human_size(*b)
        );
    }
    let missing = disk.failed_replicas();
    for (_, replica, why) in &missing {
        let _ = writeln!(
            std::io::stderr(),
            "quorum check: {replica} could not be opened, checking without it: {why}"
        );
    }
    let progress = if std::io::stderr().is_terminal() && !args.json {
        let pb = ProgressBar::new(disk.size());
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .context("progress template")?,
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let (ranges, checked, skipped) = scrub_all(&disk, args.repair, &progress)?;
    progress.finish_and_clear();

    let names: Vec<String> = cfg.replicas.iter().map(|r| r.display_name()).collect();
    let report = Report {
        disk: cfg.target.dev.clone(),
        size: disk.size(),
        replicas: names.clone(),
        threshold: cfg.threshold as usize,
        checked_bytes: checked,
        skipped_bytes: skipped,
        stale_bytes: stale.clone(),
        resynced_bytes: resynced,
        missing: missing
            .iter()
            .map(|(i, _, why)| Missing {
                replica: *i,
                reason: why.clone(),
            })
            .collect(),
        ranges: ranges.iter().map(range_json).collect(),
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, &names);
    }
    if !disk.close().is_empty() {
        bail!("flushing the replicas after the check failed");
    }
    Ok(ExitCode::from(exit_status(&report.ranges)))
}

/// [`crate::exit`]'s bits: 4 for a divergence left unrepaired, 8 for
/// blocks without quorum, both when both hold, 0 when there is neither.
fn exit_status(ranges: &[Range]) -> u8 {
    let mut code = crate::exit::OK;
    if ranges.iter().any(|r| r.quorum && !r.resolved) {
        code |= crate::exit::DIVERGENT;
    }
    if ranges.iter().any(|r| !r.quorum) {
        code |= crate::exit::NO_QUORUM;
    }
    code
}

/// Scrub the whole disk; returns the divergent ranges (adjacent ones merged),
/// bytes voted and bytes skipped as unallocated everywhere.
fn scrub_all(
    disk: &Disk,
    repair: bool,
    progress: &ProgressBar,
) -> anyhow::Result<(Vec<Divergence>, u64, u64)> {
    let mut out: Vec<Divergence> = Vec::new();
    let (mut checked, mut skipped) = (0u64, 0u64);
    let mut walk = quorum_engine::AllocationWalk::new(0, disk.size());
    while let Some((at, l, zero)) = walk.next(disk, STEP).context("block status")? {
        if zero {
            skipped += l;
        } else {
            checked += l;
            for d in disk.scrub(at, l, repair).context("scrub")? {
                d.merge_into(&mut out);
            }
        }
        progress.set_position(walk.offset());
    }
    Ok((out, checked, skipped))
}

fn print_table(r: &Report, names: &[String]) {
    outln!(
        "{}: {} replicas, threshold {}, {} checked, {} unallocated everywhere (skipped)",
        r.disk,
        names.len(),
        r.threshold,
        human_size(r.checked_bytes),
        human_size(r.skipped_bytes)
    );
    if r.ranges.is_empty() {
        outln!("all replicas agree");
        return;
    }
    outln!(
        "{:>14} {:>12}  {:<24} status",
        "offset",
        "length",
        "bad replicas"
    );
    for x in &r.ranges {
        let bad: Vec<String> = x.bad_replicas.iter().map(|i| i.to_string()).collect();
        let failed: Vec<String> = x
            .failed_replicas
            .iter()
            .map(|i| format!("{i}(I/O error)"))
            .collect();
        let who = [bad, failed].concat().join(",");
        let status = match (x.quorum, x.resolved) {
            (false, _) => "NO QUORUM (not repaired)",
            (true, true) => "repaired",
            (true, false) => "divergent",
        };
        outln!("{:>#14x} {:>12}  {:<24} {status}", x.offset, x.length, who);
    }
    for (i, n) in names.iter().enumerate() {
        outln!("  replica {i}: {n}");
    }
}
