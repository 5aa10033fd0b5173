//! `quorum validate`: check a disk XML document, like `virsh define` without running anything.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use quorum_config::DiskConfig;

/// Check a quorum disk XML document.
///
/// Prints a one-line summary (`vda: quorum of 3 replicas, threshold 2`) and
/// exits 0 when the document is valid. Otherwise prints its errors as
/// `FILE:LINE:COL: XML error: ...` or `FILE:LINE:COL: unsupported configuration: ...`
/// on stderr (the first 20, then one line counting the rest) and exits 1.
/// Image files need not exist unless `--probe` is given.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Prints `vda: quorum of 3 replicas, threshold 2` and exits 0 when the document is valid.
Otherwise prints the errors on stderr, one per line, and exits 1:
  disk.xml:4:14: XML error: attribute value must be quoted (value=2)
  disk.xml:3:3: unsupported configuration: quorum threshold 4 exceeds the number of replicas (3)
A malformed document stops at its first fault; a well-formed one lists every error, up to
20, then one line says how many more there are and where they start:
  disk.xml:31:3: too many errors: 4980 more errors from here on not shown

One file is one replica: two paths that reach the same file (a symlink, a hard link,
`..` through a symlinked folder; same device and inode, or the same block device) are
refused like a path written twice, naming both. serve, check and create refuse it too.

A threshold that is not a majority of the replicas (2 of 4, 2 of 5) is valid but
warned about on stderr (exit status 0): a write acknowledged by T replicas can be
outvoted later by the replicas that missed it. `quorum serve` logs the same warning.

A <domain> may hold the disk as libvirt never could, under <devices>, or as stock libvirt
keeps it: in <metadata>, under quorum's namespace (see `quorum domxml --help`). Elements
that only concern the guest or QEMU (<address>, <boot order>, driver cache/io/discard, ...)
are accepted and ignored, each with a `note:` line on stderr.

Examples:
  quorum validate examples/quorum.xml --target vda
  virsh dumpxml vm | quorum validate - --target vda")]
pub struct Args {
    /// The XML file (`-`: standard input): a `<disk type='quorum'>`, or a whole
    /// `<domain>` holding it under `<devices>` or in quorum's `<metadata>`.
    pub file: PathBuf,
    /// Pick the disk whose `<target dev=...>` is DEV (default: the first quorum disk).
    #[arg(long, value_name = "DEV")]
    pub target: Option<String>,
    /// Also open every replica's image headers: report missing files, format
    /// mismatches, backing chains that differ from the XML and size disagreements.
    #[arg(long)]
    pub probe: bool,
}

/// Load `file`; on failure print every error line on stderr and return `None`.
pub(crate) fn load_or_report(file: &Path, target: Option<&str>) -> Option<DiskConfig> {
    match super::util::read_disk(file, target) {
        Ok(loaded) => Some(loaded.disk),
        Err(errors) => {
            eprintln!("{errors}");
            None
        }
    }
}

/// `vda: quorum of 3 replicas, threshold 2`.
pub(crate) fn summary(cfg: &DiskConfig) -> String {
    let n = cfg.replicas.len();
    let plural = if n == 1 { "" } else { "s" };
    format!(
        "{}: quorum of {n} replica{plural}, threshold {}",
        cfg.target.dev, cfg.threshold
    )
}

/// Log (for `serve`) that the threshold is below a majority, with the reason.
pub(crate) fn log_threshold_warning(cfg: &DiskConfig) {
    if let Some(w) = cfg.minority_threshold_warning() {
        tracing::warn!("{w}");
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Some(cfg) = load_or_report(&args.file, args.target.as_deref()) else {
        return Ok(ExitCode::from(1));
    };
    if let Some(w) = cfg.minority_threshold_warning() {
        eprintln!("{}: warning: {w}", args.file.display());
    }
    if args.probe {
        let problems = super::probe::probe(&cfg)?;
        if !problems.is_empty() {
            for p in &problems {
                eprintln!("{p}");
            }
            return Ok(ExitCode::from(1));
        }
    }
    println!("{}", summary(&cfg));
    Ok(ExitCode::SUCCESS)
}
