//! Opening a disk from its validated configuration.
//!
//! Every replica is tried. The disk opens when at least `threshold` of them
//! did; the others start failed, each with a way to open it again that the
//! retry thread uses (see [`crate::membership`]).

use std::path::PathBuf;
use std::time::Duration;

use quorum_config::DiskConfig;
use quorum_config::model::{Source, StorageSource};
use quorum_vote::Granularity;

use crate::disk::{BuildError, Disk, Member, Options, Tracking};
use crate::record::{Record, RecordError};

/// Bytes per write-intent (dirty) bit.
pub const REGION: u64 = 4 << 20;
/// Default bytes per missed-write bit.
pub const CHUNK: u64 = 64 << 10;

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
    /// The disk's record (write intent, missed writes, replica states);
    /// `None` tracks nothing (benchmarks and tests only).
    pub state: Option<PathBuf>,
    /// Resync rate limit in bytes per second (0: none).
    pub resync_rate: u64,
    /// Bytes per missed-write bit (default [`CHUNK`]; a power of two,
    /// 4 KiB to 4 MiB).
    pub missed_granularity: Option<u64>,
    /// Replicas just made empty beside replicas that hold data: they start
    /// `new` and are rebuilt in full (needs a record).
    pub rebuild: Vec<usize>,
}

/// A disk that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Too few replicas opened, or the replicas do not form a valid quorum.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The disk's record could not be opened.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A replica is in use by another process (its lock is held): the disk
    /// is not started degraded without it, since someone else runs it.
    #[error("cannot open replica {index}")]
    Replica {
        /// Replica index in the XML.
        index: usize,
        /// Why.
        #[source]
        source: quorum_replica::OpenError,
    },
}

/// What identifies a replica: device, inode and birth time of a file
/// (another file put at the same path differs, even when it reuses the
/// deleted one's inode number, as ext4 and tmpfs do), the device of a block
/// device, the URI of an export.
pub fn identity_of(src: &StorageSource) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let id = match &src.source {
        Source::File { path } => std::fs::metadata(path)
            .map(|m| {
                let born = m
                    .created()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("file {}:{}:{born}", m.dev(), m.ino())
            })
            .ok(),
        Source::Block { dev } => std::fs::metadata(dev)
            .map(|m| format!("block {}", m.rdev()))
            .ok(),
        _ => Some(format!("nbd {}", src.display_name())),
    };
    id.map_or(0, |s| xxhash_rust::xxh3::xxh3_64(s.as_bytes()).max(1))
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

/// Open the replicas of `cfg` and assemble the disk. Replica `i` is named
/// `replica-i` in events. Replicas that cannot be opened are reported in
/// the log and left failed, as long as `threshold` others opened.
pub fn open(cfg: &DiskConfig, opts: &OpenOptions) -> Result<Disk, OpenError> {
    let options = options_from_config(cfg, opts);
    let ropts = replica_options(opts, options.read_only);
    let opened: Vec<Result<Box<dyn quorum_replica::Replica>, quorum_replica::OpenError>> = cfg
        .replicas
        .iter()
        .map(|src| quorum_replica::open(src, &ropts))
        .collect();
    // A lock held elsewhere means another process runs this disk.
    if let Some(index) = opened
        .iter()
        .position(|r| matches!(r, Err(quorum_replica::OpenError::Locked { .. })))
    {
        let source = opened
            .into_iter()
            .nth(index)
            .and_then(Result::err)
            .expect("the locked replica's error");
        return Err(OpenError::Replica { index, source });
    }
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
                    uri: src.display_name(),
                    name,
                    replica: Ok(r),
                    reopen: None,
                    identity: identity_of(src),
                    hint: None,
                },
                Err(e) => {
                    let uri = src.display_name();
                    let src = src.clone();
                    let why = quorum_replica::chain(&e);
                    let hint = e.hint();
                    let reopen: Option<crate::Reopen> = opts.retry_missing.then(|| {
                        Box::new(move || {
                            quorum_replica::open(&src, &ropts)
                                .map(|r| (r, identity_of(&src)))
                                .map_err(|e| quorum_replica::chain(&e))
                        }) as crate::Reopen
                    });
                    Member {
                        uri,
                        name,
                        replica: Err(why),
                        reopen,
                        identity: 0,
                        hint,
                    }
                }
            }
        })
        .collect();
    let tracking = match (&opts.state, first) {
        (Some(path), Some((_, size))) => open_record(path, size, cfg, opts, options.read_only)?,
        // Without a replica there is nothing to track; assembling fails.
        _ => None,
    };
    Ok(Disk::assemble_tracked(members, options, tracking)?)
}

/// How replicas of a disk opened with `opts` are opened.
fn replica_options(opts: &OpenOptions, read_only: bool) -> quorum_replica::OpenOptions {
    quorum_replica::OpenOptions {
        read_only,
        no_locking: opts.no_locking,
        nbd_timeout: opts.replica_timeout,
        // A corrupt qcow2 replica is refused (the disk starts without it)
        // rather than opened to refuse writes: it would miss every write.
        refuse_corrupt: !read_only,
        ..Default::default()
    }
}

/// Open one replica to add to, or replace one of, a running disk that was
/// opened with `opts` (locked as the others are). `name` is its node name.
pub fn open_member(
    src: &StorageSource,
    name: String,
    opts: &OpenOptions,
    read_only: bool,
) -> Result<Member, quorum_replica::OpenError> {
    let r = quorum_replica::open(src, &replica_options(opts, read_only))?;
    Ok(Member {
        name,
        uri: src.display_name(),
        replica: Ok(r),
        reopen: None,
        identity: identity_of(src),
        hint: None,
    })
}

fn open_record(
    path: &std::path::Path,
    size: u64,
    cfg: &DiskConfig,
    opts: &OpenOptions,
    read_only: bool,
) -> Result<Option<Tracking>, OpenError> {
    let chunk = opts.missed_granularity.unwrap_or(CHUNK);
    if !chunk.is_power_of_two() || !(4096..=REGION).contains(&chunk) {
        return Err(BuildError::Invalid(format!(
            "the missed-write granularity must be a power of two from 4 KiB to 4 MiB, not {chunk} bytes"
        ))
        .into());
    }
    if read_only {
        // Read the record to know what is stale; change nothing.
        let o = Record::open_read_only(path, size, REGION, chunk, cfg.replicas.len())?;
        return Ok(o.map(|o| Tracking {
            record: o.record,
            resync_rate: 0,
            rebuild: Vec::new(),
        }));
    }
    let o = Record::open(path, size, REGION, chunk, cfg.replicas.len())?;
    if let Some(why) = &o.distrust {
        tracing::warn!(
            state = %path.display(),
            "state file {}: {why}; every region of the replicas will be compared and made equal (full resync)",
            path.display()
        );
    }
    if o.bad_pages > 0 {
        tracing::warn!(
            state = %path.display(),
            "state file {}: {} page(s) failed their checksum; what they cover is treated as dirty and missed",
            path.display(),
            o.bad_pages
        );
    }
    if let Some(prev) = &o.previous
        && !prev.clean
    {
        tracing::warn!(
            state = %path.display(),
            "the disk was not stopped cleanly: {} dirty region(s) will be reconciled before use",
            o.record.dirty_count()
        );
    }
    Ok(Some(Tracking {
        record: o.record,
        resync_rate: opts.resync_rate,
        rebuild: opts.rebuild.clone(),
    }))
}
