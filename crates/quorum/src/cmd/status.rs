//! `quorum status`: what the disk's record says (replica states, missed
//! bytes, write intent, last clean shutdown), read offline.
//!
//! The report is a plain struct ([`Status`]) filled from a source: today
//! the record read with [`quorum_engine::record::inspect`] (no lock, so it
//! works beside a running daemon); a live source (the daemon's monitor
//! socket) can fill the same struct, and both print alike.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use quorum_config::DiskConfig;
use quorum_engine::ReplicaState;
use quorum_engine::record::{Distrust, Inspection};
use serde::Serialize;

use super::util::{human_size, load_disk};
use crate::output::outln;

/// Show each replica's state, missed bytes and generation, the dirty
/// regions and whether the last daemon stopped cleanly, from the disk's
/// record (see `serve --state`), as `mdadm --detail` does for an array.
///
/// The record is read without its lock: this works while `quorum serve`
/// runs (the report then says the disk is in use, and is a snapshot).
///
/// Exit status: 0 the record was read (whatever the replicas' states),
/// 1 no usable record (missing or corrupt: the report says so and what the
/// next start does) or invalid XML, 2 usage error.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Exit status:
  0   the record was read, whatever the replicas' states
  1   no usable record (missing or corrupt; the report still prints and
      says what the next start does), or invalid XML
  2   usage error (unknown option, missing argument)

Examples:
  quorum status examples/quorum.xml
  quorum status examples/quorum.xml --json
  quorum status domain.xml --target vdb --state /var/lib/quorum/vdb.state")]
pub struct Args {
    /// Quorum disk XML (a <disk> or a <domain>).
    pub file: PathBuf,
    /// Which disk of a <domain> (its target dev); default: the first quorum disk.
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// The disk's record, when serve was given --state; default: as serve's.
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where a [`Status`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The record file, read offline.
    Record,
}

/// Everything `quorum status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// How the data was obtained.
    pub source: Source,
    /// The disk as configured.
    pub disk: DiskInfo,
    /// The record.
    pub record: RecordInfo,
    /// One entry per configured replica, in disk order.
    pub replicas: Vec<ReplicaInfo>,
}

/// The disk as the XML and the record describe it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    /// `<target dev=>`.
    pub target: String,
    /// Virtual size in bytes (from the record; `None` without one).
    pub size: Option<u64>,
    /// Copies that must agree.
    pub threshold: u32,
    /// Number of replicas in the XML.
    pub replicas: usize,
}

/// What the record holds, or why it is not usable.
#[derive(Debug, Clone, Serialize)]
pub struct RecordInfo {
    /// Its path.
    pub path: PathBuf,
    /// `ok`, `missing`, `corrupt` or `mismatch`.
    pub status: &'static str,
    /// Why it is not usable (for the three last statuses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// What the next start of the daemon does with it.
    pub next_start: String,
    /// A process (a running daemon, or `quorum check`) holds its lock.
    pub in_use: bool,
    /// The last daemon stopped cleanly: the record's clean flag is set
    /// and no region is left dirty. A dirty region under a clean flag is
    /// reported as not clean: the next start reconciles it as after a
    /// crash (and today's engine leaves the flag set from the previous
    /// stop while a daemon runs, so after `kill -9` only the dirty regions
    /// tell).
    pub clean_shutdown: Option<bool>,
    /// The record header's own clean flag, as written.
    pub clean_flag: Option<bool>,
    /// Regions with writes possibly in flight (write intent).
    pub dirty_regions: Option<u64>,
    /// Their bytes (capped at the disk's size).
    pub dirty_bytes: Option<u64>,
    /// Bytes per dirty region.
    pub region_size: Option<u64>,
    /// Bytes per missed-write chunk.
    pub chunk_size: Option<u64>,
    /// The replicas are still to be compared in full (a record started
    /// afresh).
    pub full_comparison_pending: Option<bool>,
    /// Bitmap pages that failed their checksum (counted as all set).
    pub bad_pages: usize,
}

/// One replica.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaInfo {
    /// Index in the XML (replica-N in the daemon's logs).
    pub index: usize,
    /// File path, device or URI from the XML.
    pub source: String,
    /// `in-sync`, `stale`, `resyncing`, `failed`, `new`; `None` when the
    /// record does not know it.
    pub state: Option<&'static str>,
    /// Bytes it missed and has not been resynced.
    pub missed_bytes: Option<u64>,
    /// Bumped at every start of the disk with this replica in it.
    pub generation: Option<u64>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = load_disk(&args.file, args.target.as_deref())?;
    let path = args
        .state
        .clone()
        .unwrap_or_else(|| super::state::default_path(&cfg));
    let status = from_record(&cfg, &path, quorum_engine::record::inspect(&path));
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_text(&status);
    }
    Ok(ExitCode::from(if status.record.status == "ok" {
        crate::exit::OK
    } else {
        crate::exit::ERROR
    }))
}

/// Fill a [`Status`] from what [`quorum_engine::record::inspect`] returned.
pub fn from_record(cfg: &DiskConfig, path: &Path, got: Result<Inspection, Distrust>) -> Status {
    let n = cfg.replicas.len();
    let got = got.and_then(|i| {
        if i.header.replicas.len() == n {
            Ok(i)
        } else {
            Err(Distrust::Mismatch(format!(
                "{} replicas in the record, {n} in the XML",
                i.header.replicas.len()
            )))
        }
    });
    let disk = DiskInfo {
        target: cfg.target.dev.clone(),
        size: got.as_ref().ok().map(|i| i.header.size),
        threshold: cfg.threshold,
        replicas: n,
    };
    match got {
        Ok(i) => {
            let h = &i.header;
            let cap = |count: u64, unit: u64| count.saturating_mul(unit).min(h.size);
            let replicas = cfg
                .replicas
                .iter()
                .enumerate()
                .map(|(k, r)| ReplicaInfo {
                    index: k,
                    source: r.display_name(),
                    state: Some(ReplicaState::from_u8(h.replicas[k].state).as_str()),
                    missed_bytes: Some(cap(i.missed_chunks[k], h.chunk)),
                    generation: Some(h.replicas[k].generation),
                })
                .collect();
            let next_start = if i.in_use {
                "the disk is in use by a running daemon (or check): this is a snapshot".to_owned()
            } else if i.dirty_regions > 0 && h.compare_only {
                "compare the remaining regions by majority, then serve".to_owned()
            } else if i.dirty_regions > 0 {
                "reconcile the dirty regions before they are read, then serve".to_owned()
            } else if i.missed_chunks.iter().any(|&c| c > 0) {
                "serve, and resync what the replicas missed in the background".to_owned()
            } else {
                "serve at once: nothing to reconcile or resync".to_owned()
            };
            Status {
                source: Source::Record,
                disk,
                record: RecordInfo {
                    path: path.to_owned(),
                    status: "ok",
                    problem: None,
                    next_start,
                    in_use: i.in_use,
                    clean_shutdown: Some(h.clean && i.dirty_regions == 0),
                    clean_flag: Some(h.clean),
                    dirty_regions: Some(i.dirty_regions),
                    dirty_bytes: Some(cap(i.dirty_regions, h.region)),
                    region_size: Some(h.region),
                    chunk_size: Some(h.chunk),
                    full_comparison_pending: Some(h.compare_only),
                    bad_pages: i.bad_pages,
                },
                replicas,
            }
        }
        Err(why) => {
            let (status, problem) = match why {
                Distrust::Missing => ("missing", why.to_string()),
                Distrust::Corrupt(w) => ("corrupt", w),
                Distrust::Mismatch(_) => ("mismatch", why.to_string()),
            };
            Status {
                source: Source::Record,
                disk,
                record: RecordInfo {
                    path: path.to_owned(),
                    status,
                    problem: Some(problem),
                    next_start: "start a new record and compare every region of the replicas by majority (full comparison) while serving".to_owned(),
                    in_use: false,
                    clean_shutdown: None,
                    clean_flag: None,
                    dirty_regions: None,
                    dirty_bytes: None,
                    region_size: None,
                    chunk_size: None,
                    full_comparison_pending: None,
                    bad_pages: 0,
                },
                replicas: cfg
                    .replicas
                    .iter()
                    .enumerate()
                    .map(|(k, r)| ReplicaInfo {
                        index: k,
                        source: r.display_name(),
                        state: None,
                        missed_bytes: None,
                        generation: None,
                    })
                    .collect(),
            }
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn print_text(s: &Status) {
    let r = &s.record;
    let line = |k: &str, v: String| outln!("{k:>24} : {v}");
    outln!("{}:", s.disk.target);
    line(
        "Size",
        s.disk.size.map_or_else(
            || "unknown (no record)".to_owned(),
            |b| format!("{} ({b} bytes)", human_size(b)),
        ),
    );
    line(
        "Threshold",
        format!("{} of {} replicas", s.disk.threshold, s.disk.replicas),
    );
    line("Record", r.path.display().to_string());
    match &r.problem {
        Some(p) => line("Record state", format!("{}: {p}", r.status)),
        None => line("Record state", "ok".to_owned()),
    }
    line(
        "In use",
        if r.in_use {
            "yes, by a running daemon (or check); figures are a snapshot".to_owned()
        } else {
            "no".to_owned()
        },
    );
    if let (Some(clean), Some(dirty), Some(bytes), Some(region), Some(compare)) = (
        r.clean_shutdown,
        r.dirty_regions,
        r.dirty_bytes,
        r.region_size,
        r.full_comparison_pending,
    ) {
        line("Last clean shutdown", yes_no(clean).to_owned());
        line(
            "Dirty regions",
            format!(
                "{dirty} ({}, {} each)",
                human_size(bytes),
                human_size(region)
            ),
        );
        line("Full comparison pending", yes_no(compare).to_owned());
        if r.bad_pages > 0 {
            line(
                "Corrupt bitmap pages",
                format!("{} (counted as dirty/missed)", r.bad_pages),
            );
        }
    }
    line("Next start", r.next_start.clone());
    outln!();
    outln!(
        "{:>7}  {:<10} {:>14} {:>10}  Source",
        "Replica",
        "State",
        "Missed",
        "Generation"
    );
    for rep in &s.replicas {
        outln!(
            "{:>7}  {:<10} {:>14} {:>10}  {}",
            rep.index,
            rep.state.unwrap_or("unknown"),
            rep.missed_bytes.map_or_else(|| "-".to_owned(), human_size),
            rep.generation
                .map_or_else(|| "-".to_owned(), |g| g.to_string()),
            rep.source
        );
    }
}
