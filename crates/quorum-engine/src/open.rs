//! Opening a disk from its validated configuration.
//!
//! Every replica is tried. The disk opens when at least `threshold` of them
//! did; the others start failed, each with a way to open it again that the
//! retry thread uses (see [`crate::membership`]).

use std::time::Duration;

use quorum_config::DiskConfig;
use quorum_vote::Granularity;

use crate::disk::{BuildError, Disk, Member, Options};

/// How to open a disk's replicas.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open every replica read-only (shared locks only), whatever the XML says.
    pub read_only: bool,
    /// Vote on whole requests, as QEMU does, instead of per 4 KiB block.
    pub whole_request_vote: bool,
    /// Take no image locks (QEMU's `locking=off`); benchmarks only.
    pub no_locking: bool,
    /// Bound on each request to a remote replica (default 30 s).
    pub replica_timeout: Option<Duration>,
    /// Keep trying, in the background, to open the replicas that could not
    /// be opened (a daemon does; a one-shot check does not).
    pub retry_missing: bool,
}

/// A disk that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Too few replicas opened, or the replicas do not form a valid quorum.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Engine options for a configuration.
pub fn options_from_config(cfg: &DiskConfig, opts: &OpenOptions) -> Options {
    Options {
        threshold: cfg.threshold as usize,
        read_pattern: cfg.driver.read_pattern,
        rewrite_corrupted: cfg.driver.rewrite_corrupted,
        blkverify: cfg.driver.blkverify,
        read_only: cfg.readonly || opts.read_only,
        granularity: if opts.whole_request_vote {
            Granularity::Request
        } else {
            Granularity::Block(4096)
        },
        id: cfg.target.dev.clone(),
    }
}

/// An error and its causes, each once, joined by ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        // Some errors still print their source themselves; don't repeat it.
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// Open the replicas of `cfg` and assemble the disk. Replica `i` is named
/// `replica-i` in events. Replicas that cannot be opened are reported in
/// the log and left failed, as long as `threshold` others opened.
pub fn open(cfg: &DiskConfig, opts: &OpenOptions) -> Result<Disk, OpenError> {
    let options = options_from_config(cfg, opts);
    let ropts = quorum_replica::OpenOptions {
        read_only: options.read_only,
        no_locking: opts.no_locking,
        nbd_timeout: opts.replica_timeout,
        ..Default::default()
    };
    let opened: Vec<Result<Box<dyn quorum_replica::Replica>, quorum_replica::OpenError>> = cfg
        .replicas
        .iter()
        .map(|src| quorum_replica::open(src, &ropts))
        .collect();
    // Sizes are compared here, where the replicas' paths are known.
    let mut first: Option<(usize, u64)> = None;
    for (i, r) in opened.iter().enumerate() {
        let Ok(r) = r else { continue };
        match first {
            None => first = Some((i, r.size())),
            Some((f, size)) if r.size() != size => {
                return Err(BuildError::SizeMismatch {
                    name: cfg.replicas[i].display_name(),
                    size: r.size(),
                    first_name: cfg.replicas[f].display_name(),
                    first_size: size,
                }
                .into());
            }
            Some(_) => {}
        }
    }
    let members = cfg
        .replicas
        .iter()
        .zip(opened)
        .enumerate()
        .map(|(index, (src, opened))| {
            let name = format!("replica-{index}");
            match opened {
                Ok(r) => Member {
                    name,
                    replica: Ok(r),
                    reopen: None,
                },
                Err(e) => {
                    let src = src.clone();
                    let why = format!("{}: {}", src.display_name(), error_chain(&e));
                    let reopen: Option<crate::Reopen> = opts.retry_missing.then(|| {
                        Box::new(move || {
                            quorum_replica::open(&src, &ropts).map_err(|e| error_chain(&e))
                        }) as crate::Reopen
                    });
                    Member {
                        name,
                        replica: Err(why),
                        reopen,
                    }
                }
            }
        })
        .collect();
    Ok(Disk::assemble(members, options)?)
}
