//! The quorum disk: fans every request out to the replicas and applies the
//! read vote, the write/flush threshold rule, and rewrite-corrupted.
//!
//! This file holds the [`Disk`] struct, its assembly from replicas and its
//! accessors; the rest is `impl Disk` blocks, one file per concern:
//!
//! ```text
//!  mod.rs     Disk, Options, Member, Tracking, BuildError, IoError; assemble, accessors, close
//!  fanout.rs  fan_out (every replica, in parallel or not) + REPORT_BAD / FAILURE events
//!  read.rs    read: fifo, or read_and_vote ─▶ assemble winners ─▶ dissent reports ─▶ rewrite
//!  write.rs   write/zeroes/discard: replicate (record intent, fan out) ─▶ settle; flush
//!  status.rs  block_status ─▶ merge_status
//!  stats.rs   DiskStats: client requests counted and timed at this API
//!  scrub.rs   scrub: read_and_vote ─▶ Divergence list (─▶ rewrite with repair)
//!  scrub_job.rs  online scrub: a thread walks the disk with scrub, reports, throttles
//!  control.rs replicas_info; replace/add/remove a replica (record first, then a
//!             quiesced swap); resync rate
//! ```
//!
//! Replicas are addressed by slot index (their bit in vote masks); a
//! removed replica leaves an empty slot inside `slots()` that is never up
//! (see [`crate::membership`]). The public lists (`replica_names`,
//! `replica_states`, `stats`, ...) leave empty slots out.

mod control;
mod fanout;
mod read;
mod scrub;
mod scrub_job;
mod stats;
mod status;
mod write;

use std::fmt;
use std::sync::Arc;

use quorum_replica::{Replica, ReplicaError};
use quorum_vote::Granularity;

use crate::events::{Event, ReplicaStats};
use crate::heal::{Heal, HealStats};
use crate::membership::{Members, Reopen, ReplicaState, Slot};
use crate::pool::BufPool;
use crate::record::Record;

pub use control::{ControlError, ReplicaInfo};
pub use quorum_config::ReadPattern;
pub use scrub::Divergence;
pub use scrub_job::{ScrubProgress, ScrubState};
pub use stats::DiskStats;
pub use status::{AllocationWalk, merge_status};

/// Requests at least this large reach their replicas on the worker pool in
/// parallel; smaller ones go one after another on the calling thread, which
/// is cheaper than two thread hand-offs when the data is in page cache.
const PARALLEL_MIN: usize = 64 << 10;

/// Voting and access options of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Copies that must agree (reads) or succeed (writes, flush).
    pub threshold: usize,
    /// Vote, or read in order.
    pub read_pattern: ReadPattern,
    /// Rewrite the blocks that lost a vote before replying.
    pub rewrite_corrupted: bool,
    /// Two replicas that must be identical; a mismatch fails the read.
    pub blkverify: bool,
    /// Refuse writes.
    pub read_only: bool,
    /// Vote granularity.
    pub granularity: Granularity,
    /// The disk's id in `QUORUM_FAILURE` events (`reference`).
    pub id: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            threshold: 1,
            read_pattern: ReadPattern::Quorum,
            rewrite_corrupted: false,
            blkverify: false,
            read_only: false,
            granularity: Granularity::Block(4096),
            id: "quorum0".into(),
        }
    }
}

/// A failed disk request: the errno returned to the client, with context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    /// The errno (EIO, ENOSPC, EPERM, ...).
    pub errno: i32,
    /// The operation.
    pub op: &'static str,
    /// Offset and length of the request.
    pub offset: u64,
    /// Length of the request.
    pub len: u64,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {} length {} failed: {}",
            self.op,
            self.offset,
            self.len,
            strerror(self.errno)
        )
    }
}

impl std::error::Error for IoError {}

/// The C library's message for an errno.
pub fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno)
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or("")
        .to_owned()
}

/// One replica as [`Disk::assemble`] takes it: opened, or not (yet).
pub struct Member {
    /// Node name in events (`replica-0`, ...).
    pub name: String,
    /// Where it is, for people: a file path or an NBD URI.
    pub uri: String,
    /// The opened replica, or why it could not be opened.
    pub replica: Result<Box<dyn Replica>, String>,
    /// How to open it again later (for one that could not be opened).
    pub reopen: Option<Reopen>,
    /// What identifies it (see [`crate::record::ReplicaEntry::identity`]);
    /// 0 when unknown.
    pub identity: u64,
    /// What to do about it, for one that could not be opened.
    pub hint: Option<String>,
}

/// Crash-safe write intent and missed-write tracking for a disk (see
/// [`crate::heal`]): its record, and how fast to resync.
#[derive(Debug)]
pub struct Tracking {
    /// The disk's record, open and locked.
    pub record: Record,
    /// Resync rate limit in bytes per second (0: none).
    pub resync_rate: u64,
    /// Replicas just made empty: every chunk missed, state new.
    pub rebuild: Vec<usize>,
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// One virtual disk over N replicas.
pub struct Disk {
    /// Replicas, their states and the event bus, shared with retry threads.
    members: Arc<Members>,
    opts: Options,
    size: u64,
    pool: BufPool,
    /// What the disk's clients asked ([`Disk::disk_stats`]).
    requests: stats::DiskCounters,
    /// The online scrub job ([`Disk::start_scrub`]).
    scrub_job: scrub_job::ScrubJob,
    /// The resync thread, when the disk has a record.
    healer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: std::sync::atomic::AtomicBool,
    workers: rayon::ThreadPool,
    /// False when the process may use only one CPU and every replica is
    /// local: parallel page-cache copies then only add context switches
    /// (about a fifth of the daemon's CPU on 1 MiB writes, measured).
    parallel: bool,
    /// Some replica is remote: fan out in parallel whatever the size, since
    /// round trips, not copies, dominate.
    remote: bool,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("members", &self.members)
            .field("opts", &self.opts)
            .finish()
    }
}

/// Why a disk could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Replicas disagree on their virtual size.
    #[error(
        "replica {name} has size {size} bytes, but replica {first_name} has {first_size} bytes; all replicas must have the same size"
    )]
    SizeMismatch {
        /// The replica that differs.
        name: String,
        /// Its size.
        size: u64,
        /// The first replica.
        first_name: String,
        /// Its size.
        first_size: u64,
    },
    /// Threshold, replica count or options do not fit together.
    #[error("{0}")]
    Invalid(String),
    /// Fewer replicas could be opened than the threshold needs.
    #[error(
        "only {usable} of {total} replicas can be used, but threshold {threshold} needs {threshold}:{}{}",
        missing.iter().map(|(n, why)| format!("\n  {n}: {why}")).collect::<String>(),
        hints.iter().map(|h| format!("\nhint: {h}")).collect::<String>()
    )]
    TooFew {
        /// Replicas that opened.
        usable: usize,
        /// Replicas in the disk.
        total: usize,
        /// The threshold.
        threshold: usize,
        /// The others, and why each could not be opened.
        missing: Vec<(String, String)>,
        /// What to do about them (each once).
        hints: Vec<String>,
    },
}

impl Disk {
    /// Assemble a disk from opened replicas, named for events.
    pub fn new(
        replicas: Vec<(String, Box<dyn Replica>)>,
        opts: Options,
    ) -> Result<Disk, BuildError> {
        let members = replicas
            .into_iter()
            .map(|(name, replica)| Member {
                uri: name.clone(),
                name,
                replica: Ok(replica),
                reopen: None,
                identity: 0,
                hint: None,
            })
            .collect();
        Disk::assemble(members, opts)
    }

    /// [`Disk::assemble`] without tracking what replicas miss.
    pub fn assemble(members: Vec<Member>, opts: Options) -> Result<Disk, BuildError> {
        Disk::assemble_tracked(members, opts, None)
    }

    /// Assemble a disk of which some replicas may not have opened: it runs
    /// degraded when at least `threshold` did, and retries the others in
    /// the background (see [`crate::membership`]).
    ///
    /// With `tracking`, writes record their intent and what each replica
    /// misses, regions left dirty by an unclean stop are reconciled before
    /// use, and a background thread resyncs stale replicas.
    pub fn assemble_tracked(
        members: Vec<Member>,
        opts: Options,
        tracking: Option<Tracking>,
    ) -> Result<Disk, BuildError> {
        let n = members.len();
        if n == 0 || n > quorum_vote::MAX_REPLICAS {
            return Err(BuildError::Invalid(format!(
                "a quorum needs 1 to {} replicas, got {n}",
                quorum_vote::MAX_REPLICAS
            )));
        }
        if !(1..=n).contains(&opts.threshold) {
            return Err(BuildError::Invalid(format!(
                "threshold {} must be between 1 and the number of replicas ({n})",
                opts.threshold
            )));
        }
        if opts.blkverify && (n != 2 || opts.threshold != 2) {
            return Err(BuildError::Invalid(
                "blkverify needs exactly 2 replicas and threshold 2".into(),
            ));
        }
        let opened: Vec<(&str, u64)> = members
            .iter()
            .filter_map(|m| m.replica.as_ref().ok().map(|r| (m.name.as_str(), r.size())))
            .collect();
        if opened.len() < opts.threshold {
            return Err(BuildError::TooFew {
                usable: opened.len(),
                total: n,
                threshold: opts.threshold,
                missing: members
                    .iter()
                    .filter_map(|m| {
                        m.replica
                            .as_ref()
                            .err()
                            .map(|e| (m.name.clone(), e.clone()))
                    })
                    .collect(),
                hints: members.iter().fold(Vec::new(), |mut v, m| {
                    if let Some(h) = &m.hint
                        && !v.contains(h)
                    {
                        v.push(h.clone());
                    }
                    v
                }),
            });
        }
        let (first_name, size) = opened[0];
        for &(name, s) in &opened[1..] {
            if s != size {
                return Err(BuildError::SizeMismatch {
                    name: name.to_owned(),
                    size: s,
                    first_name: first_name.to_owned(),
                    first_size: size,
                });
            }
        }
        let workers = rayon::ThreadPoolBuilder::new()
            .num_threads((4 * n).max(8))
            .thread_name(|i| format!("quorum-io-{i}"))
            .build()
            .map_err(|e| BuildError::Invalid(format!("cannot start I/O threads: {e}")))?;
        let remote = members
            .iter()
            .any(|m| m.replica.as_ref().is_ok_and(|r| r.is_remote()));
        let rebuild = tracking
            .as_ref()
            .map_or_else(Vec::new, |t| t.rebuild.clone());
        let heal =
            tracking.map(|t| Heal::new(t.record, opts.threshold, t.resync_rate, !opts.read_only));
        // Where the record says what a replica missed, it starts stale (or
        // new, if another replica took its place).
        let mut initial = Vec::with_capacity(n);
        for (i, m) in members.iter().enumerate() {
            let state = match (&heal, &m.replica) {
                (_, Err(_)) => ReplicaState::Failed,
                (None, Ok(_)) => ReplicaState::InSync,
                (Some(h), Ok(_)) => {
                    if rebuild.contains(&i) {
                        h.record.mark_all_missed(i);
                        if let Err(e) = h.record.sync() {
                            tracing::error!(error = %e, "cannot record a new replica");
                        }
                        h.adopt(i, m.identity);
                        ReplicaState::New
                    } else if h.adopt(i, m.identity) {
                        ReplicaState::New
                    } else if h.record.missed_count(i) == 0 {
                        ReplicaState::InSync
                    } else if matches!(
                        h.record.header().replicas[i].state,
                        s if s == ReplicaState::New as u8 || s == crate::record::STATE_REMOVED
                    ) {
                        // Being rebuilt, or removed from the disk since
                        // (then back in the configuration): rebuilt in full.
                        ReplicaState::New
                    } else {
                        ReplicaState::Stale
                    }
                }
            };
            if let Some(h) = &heal {
                h.save_state(i, state);
            }
            initial.push(state);
        }
        let slots = members
            .into_iter()
            .map(|m| match m.replica {
                Ok(r) => Slot::new(m.name, m.uri, r),
                Err(why) => Slot::missing(m.name, m.uri, size, why, m.reopen),
            })
            .collect::<Vec<_>>();
        for (s, st) in slots.iter().zip(&initial) {
            if *st != ReplicaState::Failed {
                s.swap_state(*st);
            }
        }
        let members = Members::new(slots, size, heal);
        for (i, st) in initial.iter().enumerate() {
            if matches!(st, ReplicaState::Stale | ReplicaState::New) {
                tracing::warn!(
                    replica = %members.slots()[i].name,
                    "replica {} is {st}: {} MiB to resync",
                    members.slots()[i].name,
                    members.heal.as_ref().map_or(0, |h| h.record.missed_count(i) * h.record.header().chunk) >> 20
                );
            }
        }
        let healer = members.spawn_healer();
        Ok(Disk {
            members,
            opts,
            size,
            healer: parking_lot::Mutex::new(healer),
            closed: std::sync::atomic::AtomicBool::new(false),
            pool: BufPool::default(),
            requests: stats::DiskCounters::default(),
            scrub_job: scrub_job::ScrubJob::new(size),
            workers,
            parallel: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) || remote,
            remote,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The slots in use, by index (a removed replica leaves an empty one
    /// until an added replica takes it: check [`Slot::is_present`]).
    fn slots(&self) -> &[Slot] {
        self.members.slots()
    }

    /// The replicas' slots, in order, without the empty ones.
    fn present(&self) -> impl Iterator<Item = &Slot> {
        self.slots().iter().filter(|s| s.is_present())
    }

    /// Number of replicas.
    pub fn replica_count(&self) -> usize {
        self.present().count()
    }

    /// Node names of the replicas, in order.
    pub fn replica_names(&self) -> Vec<&str> {
        self.present().map(|s| s.name.as_str()).collect()
    }

    /// Each replica's state, in order.
    pub fn replica_states(&self) -> Vec<ReplicaState> {
        self.present().map(Slot::state).collect()
    }

    /// The replicas that are failed now: slot index, node name and why.
    pub fn failed_replicas(&self) -> Vec<(usize, String, String)> {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_present() && !s.is_up())
            .map(|(i, s)| (i, s.name.clone(), s.reason()))
            .collect()
    }

    /// The options the disk runs with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Receive every event from now on (nothing is merged or dropped).
    pub fn subscribe(&self) -> std::sync::mpsc::Receiver<Event> {
        self.members.events.subscribe()
    }

    /// Resync and reconciliation figures (`None` without tracking).
    pub fn heal_stats(&self) -> Option<HealStats> {
        self.members.heal.as_ref().map(Heal::stats)
    }

    /// Reconcile what an unclean stop left and resync every stale replica
    /// now, without throttling (`quorum check --repair` does this before
    /// its scrub). Returns the bytes copied.
    pub fn heal_now(&self) -> u64 {
        self.members.heal_now()
    }

    /// Missed bytes per replica, in order, as the record has them (`None`
    /// without tracking).
    pub fn missed_bytes(&self) -> Option<Vec<u64>> {
        let h = self.members.heal.as_ref()?;
        let chunk = h.record.header().chunk;
        Some(
            self.slots()
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_present())
                .map(|(i, _)| h.record.missed_count(i) * chunk)
                .collect(),
        )
    }

    /// Exact per-replica counters, in order. A slot's counters go on
    /// across replacements (they are per node name, and monotonic).
    pub fn stats(&self) -> Vec<ReplicaStats> {
        self.present()
            .map(|s| s.counters.snapshot(&s.name))
            .collect()
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(), IoError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(IoError {
                errno: libc::EINVAL,
                op,
                offset,
                len,
            }),
        }
    }

    fn check_writable(&self, op: &'static str, offset: u64, len: u64) -> Result<(), IoError> {
        if self.opts.read_only {
            return Err(IoError {
                errno: libc::EPERM,
                op,
                offset,
                len,
            });
        }
        self.check_range(op, offset, len)
    }
}

impl Disk {
    /// Stop the background threads (an online scrub ends `failed`), flush every replica that is up, and
    /// leave the record clean (no dirty region) when the flushes succeed.
    /// Returns the replicas whose flush failed. Later calls do nothing.
    pub fn close(&self) -> Vec<(String, ReplicaError)> {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Vec::new();
        }
        // First, while the healer still runs: a scrub step may wait on it.
        self.scrub_job.stop_and_join();
        self.members.close();
        if let Some(t) = self.healer.lock().take() {
            let _ = t.join();
        }
        let failures = self.flush_all();
        self.members.close_heal();
        self.members.events.flush_log();
        failures
    }
}

impl Drop for Disk {
    /// [`Disk::close`], for a disk dropped without it.
    fn drop(&mut self) {
        self.close();
    }
}
