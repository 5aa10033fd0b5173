//! Where a disk's record (write intent, missed writes, replica states)
//! lives, and the options every command that opens a disk shares for it.
//!
//! Default: `$QUORUM_STATE_DIR`, else `/var/lib/quorum` for root (a system
//! service), else `$XDG_STATE_HOME/quorum` (`~/.local/state/quorum`).
//! Persistent storage on purpose: a record on a tmpfs that vanished with a
//! reboot would mean a full comparison of the replicas at every boot. The
//! file is named after the disk's target and a hash of its replicas, so
//! the same XML finds the same record wherever it is run from.

use std::path::PathBuf;

use quorum_config::DiskConfig;

use super::util::parse_size;

/// Options shared by `serve` and `check` for the disk's record.
#[derive(Debug, Clone, clap::Args)]
pub struct StateArgs {
    /// The disk's record: write intent, what each replica missed, replica
    /// states. Default: DIR/TARGET-HASH.state, where DIR is
    /// $QUORUM_STATE_DIR, else /var/lib/quorum for root, else
    /// $XDG_STATE_HOME/quorum (~/.local/state/quorum). A missing or corrupt
    /// record means every region of the replicas is compared (full resync).
    #[arg(long, value_name = "PATH")]
    pub state: Option<PathBuf>,
    /// Keep no record: no crash-safe write intent, no tracking of missed
    /// writes, no resync. For measuring what tracking costs; never for
    /// real disks.
    #[arg(long, conflicts_with = "state")]
    pub no_tracking: bool,
    /// Bytes per missed-write bit (4K to 4M, a power of two).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64K")]
    pub missed_granularity: u64,
}

impl StateArgs {
    /// The record's path for `cfg`, or `None` with `--no-tracking`.
    pub fn path(&self, cfg: &DiskConfig) -> Option<PathBuf> {
        if self.no_tracking {
            return None;
        }
        Some(self.state.clone().unwrap_or_else(|| default_path(cfg)))
    }
}

/// The folder records go in by default.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("QUORUM_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/quorum");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("quorum");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/state/quorum")
}

/// `DIR/TARGET-HASH.state`: the hash covers every replica's source.
pub fn default_path(cfg: &DiskConfig) -> PathBuf {
    let sources: Vec<String> = cfg.replicas.iter().map(|r| r.display_name()).collect();
    let hash = xxhash_rust::xxh3::xxh3_64(sources.join("\n").as_bytes());
    let target: String = cfg
        .target
        .dev
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    default_dir().join(format!("{target}-{hash:016x}.state"))
}
