//! `quorum status`: what the disk's record says (replica states, missed
//! bytes, write intent, last clean shutdown), read offline.
//!
//! The report is a plain struct ([`Status`]) filled from the record read
//! with [`quorum_engine::record::inspect`] (no lock, so it works beside a
//! running daemon); when the disk's daemon runs (its `<record>.run` names
//! a live PID whose monitor answers), the monitor's `query-quorum` fills
//! in the live part: exact states, missed bytes, resync progress, counters.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use quorum_config::DiskConfig;
use quorum_engine::ReplicaState;
use quorum_engine::record::{Distrust, Inspection};
use serde::Serialize;

use serde_json::json;

use super::util::{human_size, load_disk};
use crate::output::outln;
use crate::qmp::client::Client;

/// Show each replica's state, missed bytes and generation, the dirty
/// regions and whether the last daemon stopped cleanly, from the disk's
/// record (see `serve --state`), as `mdadm --detail` does for an array.
///
/// When the disk's daemon runs, its monitor is asked too (found through
/// `<record>.run`, which `quorum serve` writes): the report then shows the
/// live state of every replica, resync progress and exact counters
/// (reads, writes, errors, bad votes). `--qmp PATH` asks a monitor
/// directly, without the XML; `--offline` reads only the record.
///
/// The record is read without its lock: this works while `quorum serve`
/// runs (the report then says the disk is in use).
///
/// Exit status: 0 the record was read or the monitor answered (whatever
/// the replicas' states), 1 no usable record (missing or corrupt: the
/// report says so and what the next start does), invalid XML, or a
/// monitor that does not answer, 2 usage error.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Exit status:
  0   the record was read or the monitor answered, whatever the replicas'
      states
  1   no usable record (missing or corrupt; the report still prints and
      says what the next start does), invalid XML, or --qmp did not answer
  2   usage error (unknown option, missing argument)

Examples:
  quorum status examples/quorum.xml            live when its daemon runs
  quorum status examples/quorum.xml --offline  the record only
  quorum status examples/quorum.xml --json
  quorum status --qmp /var/lib/quorum/vda-0123456789abcdef.qmp
  quorum status domain.xml --target vdb --state /var/lib/quorum/vdb.state")]
pub struct Args {
    /// Quorum disk XML (a <disk> or a <domain>).
    #[arg(required_unless_present = "qmp")]
    pub file: Option<PathBuf>,
    /// Ask the monitor at this socket (`quorum serve --qmp PATH`) for the
    /// live state; with FILE, the record is read as well.
    #[arg(long, value_name = "PATH", conflicts_with = "offline")]
    pub qmp: Option<PathBuf>,
    /// Read only the record, even when the daemon runs.
    #[arg(long)]
    pub offline: bool,
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
    /// The running daemon's monitor (and the record, when the XML was given).
    Monitor,
}

/// Everything `quorum status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// How the data was obtained.
    pub source: Source,
    /// The disk as configured.
    pub disk: DiskInfo,
    /// The record (absent with `--qmp` alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordInfo>,
    /// One entry per configured replica, in disk order.
    pub replicas: Vec<ReplicaInfo>,
    /// What the running daemon's monitor said (`source: monitor`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitor: Option<Live>,
}

/// The live part of a report.
#[derive(Debug, Clone, Serialize)]
pub struct Live {
    /// The monitor socket asked.
    pub socket: PathBuf,
    /// Its `query-quorum` reply, as is.
    pub quorum: serde_json::Value,
    /// Its `query-scrub` reply (the current or last online scrub), as is.
    pub scrub: serde_json::Value,
}

/// Ask a monitor for what the live view shows.
fn ask(socket: PathBuf, c: &mut Client) -> anyhow::Result<Live> {
    let quorum = c.execute("query-quorum", json!({}))?;
    let scrub = c.execute("query-scrub", json!({}))?;
    Ok(Live {
        socket,
        quorum,
        scrub,
    })
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
    /// Regions not compared yet since the record was started afresh.
    pub unknown_regions: Option<u64>,
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
    let Some(file) = &args.file else {
        // --qmp alone: the monitor is all there is.
        let socket = args.qmp.clone().expect("clap requires FILE or --qmp");
        let mut c = Client::connect(&socket)?;
        let status = from_monitor(ask(socket, &mut c)?);
        print(&status, args.json)?;
        return Ok(ExitCode::SUCCESS);
    };
    let cfg = load_disk(file, args.target.as_deref())?;
    let path = args
        .state
        .clone()
        .unwrap_or_else(|| super::state::default_path(&cfg));
    let mut status = from_record(&cfg, &path, quorum_engine::record::inspect(&path));
    let live = match &args.qmp {
        Some(q) => Some((q.clone(), Client::connect(q)?)),
        None if !args.offline => super::monitor::find_running(&path).ok(),
        None => None,
    };
    if let Some((socket, mut c)) = live {
        apply_live(&mut status, ask(socket, &mut c)?);
    }
    print(&status, args.json)?;
    let record_ok = status.record.as_ref().is_some_and(|r| r.status == "ok");
    Ok(ExitCode::from(if record_ok || status.monitor.is_some() {
        crate::exit::OK
    } else {
        crate::exit::ERROR
    }))
}

fn print(status: &Status, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(status)?);
    } else {
        print_text(status);
    }
    Ok(())
}

/// A report from the monitor alone (`--qmp` without the XML).
fn from_monitor(live: Live) -> Status {
    let q = &live.quorum;
    let reps = q["replicas"].as_array().cloned().unwrap_or_default();
    let mut s = Status {
        source: Source::Monitor,
        disk: DiskInfo {
            target: q["id"].as_str().unwrap_or("").to_owned(),
            size: q["size"].as_u64(),
            threshold: q["threshold"].as_u64().unwrap_or(0) as u32,
            replicas: reps.len(),
        },
        record: None,
        replicas: reps
            .iter()
            .enumerate()
            .map(|(k, r)| ReplicaInfo {
                index: k,
                source: r["uri"].as_str().unwrap_or("").to_owned(),
                state: None,
                missed_bytes: None,
                generation: None,
            })
            .collect(),
        monitor: None,
    };
    apply_live(&mut s, live);
    s
}

/// Overlay the monitor's live states and missed bytes on a report.
fn apply_live(s: &mut Status, live: Live) {
    s.source = Source::Monitor;
    if s.disk.size.is_none() {
        s.disk.size = live.quorum["size"].as_u64();
    }
    // The daemon names replica K of the XML `replica-K`; a replica removed
    // through the monitor is not listed, and one added may be past the
    // XML's last.
    let reps = live.quorum["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for r in s.replicas.iter_mut() {
        let name = format!("replica-{}", r.index);
        match reps.iter().find(|l| l["name"] == name.as_str()) {
            Some(l) => {
                if let Some(st) = l["state"].as_str().and_then(state_name) {
                    r.state = Some(st);
                }
                if let Some(m) = l["missed-bytes"].as_u64() {
                    r.missed_bytes = Some(m);
                }
                if r.source.is_empty() {
                    r.source = l["uri"].as_str().unwrap_or("").to_owned();
                }
            }
            None => {
                r.state = Some("removed");
                r.missed_bytes = None;
            }
        }
    }
    s.monitor = Some(live);
}

/// The static name of a replica state the monitor reported.
fn state_name(s: &str) -> Option<&'static str> {
    [
        ReplicaState::InSync,
        ReplicaState::Stale,
        ReplicaState::Resyncing,
        ReplicaState::Failed,
        ReplicaState::New,
    ]
    .into_iter()
    .map(ReplicaState::as_str)
    .find(|n| *n == s)
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
            } else if i.unknown_regions > 0 {
                format!(
                    "serve, and compare the {} region(s) not compared yet by majority (each before its first use)",
                    i.unknown_regions
                )
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
                record: Some(RecordInfo {
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
                    full_comparison_pending: Some(i.unknown_regions > 0),
                    unknown_regions: Some(i.unknown_regions),
                    bad_pages: i.bad_pages,
                }),
                replicas,
                monitor: None,
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
                record: Some(RecordInfo {
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
                    unknown_regions: None,
                    bad_pages: 0,
                }),
                monitor: None,
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
    if let Some(m) = &s.monitor {
        print_live_disk(m, &line);
    }
    if let Some(r) = &s.record {
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
            line(
                "Full comparison pending",
                match r.unknown_regions {
                    Some(n) if compare => format!("yes ({n} region(s) not compared yet)"),
                    _ => yes_no(compare).to_owned(),
                },
            );
            if r.bad_pages > 0 {
                line(
                    "Corrupt bitmap pages",
                    format!("{} (counted as dirty/missed)", r.bad_pages),
                );
            }
        }
        line("Next start", r.next_start.clone());
    }
    if let Some(m) = &s.monitor {
        print_live_table(s, m);
        return;
    }
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

/// Latency as `mean/p99` in microseconds.
fn latency_text(l: &serde_json::Value) -> String {
    match (l["mean-ns"].as_u64(), l["p99-ns"].as_u64()) {
        (Some(mean), Some(p99)) => format!("mean {} us, p99 <= {} us", mean / 1000, p99 / 1000),
        _ => "-".to_owned(),
    }
}

/// The disk lines the monitor adds.
fn print_live_disk(m: &Live, line: &dyn Fn(&str, String)) {
    let q = &m.quorum;
    let o = &q["options"];
    line("Monitor", format!("{} (live)", m.socket.display()));
    line(
        "Read pattern",
        q["read-pattern"].as_str().unwrap_or("?").to_owned(),
    );
    let mut flags = Vec::new();
    for k in ["rewrite-corrupted", "blkverify", "read-only"] {
        if o[k].as_bool() == Some(true) {
            flags.push(k.to_owned());
        }
    }
    flags.push(format!("vote granularity {}", o["vote-granularity"]));
    flags.push(match o["resync-rate"].as_u64() {
        Some(0) => "resync rate unlimited".to_owned(),
        Some(r) => format!("resync rate {}/s", human_size(r)),
        None => "resync rate ?".to_owned(),
    });
    line("Options", flags.join(", "));
    let st = &q["stats"];
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    line(
        "Requests",
        format!(
            "{} reads ({}), {} writes ({}), {} flushes, {} failed",
            n("reads"),
            human_size(n("read-bytes")),
            n("writes"),
            human_size(n("written-bytes")),
            n("flushes"),
            n("failed")
        ),
    );
    for op in ["read", "write", "flush"] {
        line(
            &format!("{} latency", capitalise(op)),
            latency_text(&st["latency"][op]),
        );
    }
    line("Scrub", scrub_text(&m.scrub));
}

/// The online scrub in one line: none, running with progress, or how the
/// last one ended and what it found.
fn scrub_text(sc: &serde_json::Value) -> String {
    let status = sc["status"].as_str().unwrap_or("?");
    if status == "none" {
        return "none since the daemon started (`quorum scrub FILE`)".to_owned();
    }
    let n = |k: &str| sc[k].as_u64().unwrap_or(0);
    let ranges = sc["divergent"].as_array().map_or(0, Vec::len);
    let mode = if sc["repair"].as_bool() == Some(true) {
        "repair"
    } else {
        "check only"
    };
    let found = format!("{ranges} divergent range(s)");
    match status {
        "running" => format!(
            "running ({mode}): {}% ({} of {}), {found} so far",
            n("progress"),
            human_size(n("done-bytes")),
            human_size(n("total-bytes"))
        ),
        "failed" => format!(
            "failed ({mode}) at {}: {}, {found}",
            human_size(n("done-bytes")),
            sc["error"].as_str().unwrap_or("no reason given")
        ),
        other => format!(
            "{other} ({mode}): {} scanned, {found}",
            human_size(n("done-bytes"))
        ),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// One row per replica, from the monitor.
fn print_live_table(s: &Status, m: &Live) {
    outln!();
    outln!(
        "{:<11} {:<10} {:>12} {:>7} {:>7} {:>9}  Source",
        "Replica",
        "State",
        "Missed",
        "Resync",
        "Errors",
        "Bad votes"
    );
    let reps = m.quorum["replicas"].as_array().cloned().unwrap_or_default();
    // Where the running disk no longer matches the XML (a replica
    // replaced, added or removed through the monitor).
    let mut drift = Vec::new();
    for x in &s.replicas {
        let name = format!("replica-{}", x.index);
        match reps.iter().find(|r| r["name"] == name.as_str()) {
            None => drift.push(format!("{name} ({}) was removed", x.source)),
            Some(r) if !x.source.is_empty() && r["uri"] != x.source.as_str() => {
                drift.push(format!(
                    "{name} is {} (the XML has {})",
                    r["uri"].as_str().unwrap_or("?"),
                    x.source
                ))
            }
            Some(_) => {}
        }
    }
    if !s.replicas.is_empty() {
        for r in &reps {
            let name = r["name"].as_str().unwrap_or("?");
            if !s
                .replicas
                .iter()
                .any(|x| format!("replica-{}", x.index) == name)
            {
                drift.push(format!(
                    "{name} ({}) was added",
                    r["uri"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    for r in &reps {
        let n = |key: &str| r[key].as_u64().unwrap_or(0);
        let errors = n("read-errors") + n("write-errors") + n("flush-errors") + n("timeouts");
        // The running disk's own view: after a replace it differs from the XML.
        let source = r["uri"].as_str().unwrap_or("").to_owned();
        outln!(
            "{:<11} {:<10} {:>12} {:>7} {:>7} {:>9}  {}",
            r["name"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["missed-bytes"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), human_size),
            r["resync-progress"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |p| format!("{p}%")),
            errors,
            n("bad-votes"),
            source
        );
        if let Some(why) = r["reason"].as_str() {
            outln!("{:<11} failed: {why}", "");
        }
    }
    if !drift.is_empty() {
        outln!();
        outln!(
            "The running disk differs from its XML (changed through the monitor); edit the XML to match once every replica is in-sync:"
        );
        for d in drift {
            outln!("  {d}");
        }
    }
}
