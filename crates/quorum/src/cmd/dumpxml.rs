//! `quorum dumpxml`: the disk in canonical XML.

use std::path::PathBuf;
use std::process::ExitCode;

/// Print the quorum disk in canonical XML on stdout.
///
/// Canonical means: two-space indent, single quotes, elements in the order
/// driver, threshold, replicas, target, then the rest; defaults spelled out;
/// image paths absolute. Running `dumpxml` on its own output gives the same bytes.
/// Errors are printed as by `quorum validate` (exit 1).
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Canonical form: two-space indent, single quotes, elements in the order driver, threshold,
replicas, target, then the rest; defaults spelled out; image paths absolute.
`dumpxml` of its own output gives the same bytes.

Example:
  quorum dumpxml examples/quorum.xml > canonical.xml")]
pub struct Args {
    /// The XML file (`-`: standard input): a `<disk type='quorum'>`, or a whole
    /// `<domain>` holding it under `<devices>` or in quorum's `<metadata>`.
    pub file: PathBuf,
    /// Pick the disk whose `<target dev=...>` is DEV (default: the first quorum disk).
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Some(cfg) = super::validate::load_or_report(&args.file, args.target.as_deref()) else {
        return Ok(ExitCode::from(1));
    };
    print!("{}", quorum_config::to_xml(&cfg));
    Ok(ExitCode::SUCCESS)
}
