//! The quorum disk: fans every request out to the replicas and applies the
//! read vote, the write/flush threshold rule, and rewrite-corrupted.

use std::fmt;
use std::sync::Arc;

use quorum_replica::{Extent, FileRegion, Replica, ReplicaError};
use quorum_vote::{BlockVote, Copy, Granularity, Mask, Verdict, vote_read, vote_status};

use crate::events::{Counters, Event, OpType, ReplicaStats, sectors};
use crate::heal::{Heal, HealStats};
use crate::membership::{self, Members, Reopen, ReplicaState, Slot};
use crate::pool::{AlignedBuf, BufPool};
use crate::record::Record;

pub use quorum_config::ReadPattern;

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

/// Results of one request on every replica, and which were not asked.
struct FanOut<T> {
    results: Vec<Result<T, ReplicaError>>,
    /// Replicas the request went without (failed, or excluded).
    skipped: Mask,
}

/// One virtual disk over N replicas.
pub struct Disk {
    /// Replicas, their states and the event bus, shared with retry threads.
    members: Arc<Members>,
    opts: Options,
    size: u64,
    pool: BufPool,
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

/// Outcome of reading and voting one range (shared by reads and scrub).
struct Voted {
    verdict: Verdict,
    extra: Vec<AlignedBuf>,
}

/// A divergent range found by [`Disk::scrub`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// Absolute offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Replicas that lost the vote (or all that read, when there is no quorum).
    pub bad: Mask,
    /// Replicas whose read failed.
    pub failed: Mask,
    /// The range has a majority (it can be repaired).
    pub has_quorum: bool,
    /// The losers were rewritten with the majority.
    pub repaired: bool,
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
                    } else if h.record.header().replicas[i].state == ReplicaState::New as u8 {
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
                Ok(r) => Slot::new(m.name, r),
                Err(why) => Slot::missing(m.name, size, why, m.reopen),
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
                    replica = %members.slots[i].name,
                    "replica {} is {st}: {} MiB to resync",
                    members.slots[i].name,
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
            workers,
            parallel: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) || remote,
            remote,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn slots(&self) -> &[Slot] {
        &self.members.slots
    }

    /// Number of replicas.
    pub fn replica_count(&self) -> usize {
        self.slots().len()
    }

    /// Node names of the replicas, in order.
    pub fn replica_names(&self) -> Vec<&str> {
        self.slots().iter().map(|s| s.name.as_str()).collect()
    }

    /// Each replica's state, in order.
    pub fn replica_states(&self) -> Vec<ReplicaState> {
        self.slots().iter().map(Slot::state).collect()
    }

    /// The replicas that are failed now: index, node name and why.
    pub fn failed_replicas(&self) -> Vec<(usize, String, String)> {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_up())
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

    /// Missed bytes per replica, as the record has them (`None` without
    /// tracking).
    pub fn missed_bytes(&self) -> Option<Vec<u64>> {
        let h = self.members.heal.as_ref()?;
        let chunk = h.record.header().chunk;
        Some(
            (0..self.slots().len())
                .map(|i| h.record.missed_count(i) * chunk)
                .collect(),
        )
    }

    /// Exact per-replica counters.
    pub fn stats(&self) -> Vec<ReplicaStats> {
        self.slots()
            .iter()
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

    /// Run `f` on every replica that is up; in parallel on the worker pool
    /// when asked. Failed replicas are not asked: their result is an error
    /// and their bit is set in `skipped`. A replica whose error says it
    /// cannot be reached is failed from now on.
    fn fan_out<T: Send>(
        &self,
        op: &'static str,
        parallel: bool,
        exclude: Mask,
        f: impl Fn(usize, &dyn Replica) -> Result<T, ReplicaError> + Sync,
    ) -> FanOut<T> {
        let slots = self.slots();
        let failed: Mask = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_up())
            .fold(0, |m, (i, _)| m | 1 << i);
        let skipped = failed | exclude;
        let call = |i: usize, s: &Slot| {
            if failed & (1 << i) != 0 {
                Counters::add(&s.counters.skipped, 1);
                return Err(s.skipped_error(op));
            }
            if exclude & (1 << i) != 0 {
                return Err(s.skipped_error(op));
            }
            f(i, &*s.replica())
        };
        let asked = slots.len() - skipped.count_ones() as usize;
        // Remote replicas always go in parallel; nothing does on one CPU.
        let parallel = (parallel || self.remote) && self.parallel && asked > 1;
        let results: Vec<Result<T, ReplicaError>> = if !parallel {
            slots.iter().enumerate().map(|(i, s)| call(i, s)).collect()
        } else {
            let mut out: Vec<Option<Result<T, ReplicaError>>> =
                (0..slots.len()).map(|_| None).collect();
            let call = &call;
            self.workers.scope(|scope| {
                let mut first = None;
                for (i, (o, s)) in out.iter_mut().zip(slots).enumerate() {
                    if skipped & (1 << i) != 0 {
                        *o = Some(call(i, s));
                    } else if first.is_none() {
                        first = Some((i, o, s));
                    } else {
                        scope.spawn(move |_| *o = Some(call(i, s)));
                    }
                }
                if let Some((i, o, s)) = first {
                    *o = Some(call(i, s));
                }
            });
            out.into_iter()
                .map(|o| o.expect("every replica ran"))
                .collect()
        };
        for (i, r) in results.iter().enumerate() {
            if skipped & (1 << i) == 0
                && let Err(e) = r
                && membership::is_unreachable(e)
            {
                self.members.fail(i, e);
            }
        }
        FanOut { results, skipped }
    }

    fn report_bad(&self, i: usize, op: OpType, err: Option<&ReplicaError>, offset: u64, len: u64) {
        let slot = &self.slots()[i];
        let (sector_num, sectors_count) = match op {
            OpType::Flush => (0, 0),
            _ => sectors(offset, len),
        };
        self.members.events.emit(Event::ReportBad {
            op,
            error: err.map(|e| strerror(e.errno())),
            node_name: slot.name.clone(),
            sector_num,
            sectors_count,
        });
    }

    fn report_failure(&self, offset: u64, len: u64) {
        let (sector_num, sectors_count) = sectors(offset, len);
        self.members.events.emit(Event::Failure {
            reference: self.opts.id.clone(),
            sector_num,
            sectors_count,
        });
    }

    /// Read `buf.len()` bytes at `offset`, by the disk's read pattern.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let len = buf.len() as u64;
        self.check_range("read", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.read_voted(offset, buf).map(drop)
    }

    /// [`Disk::read`], and also where the voted bytes sit unchanged in a
    /// replica's page cache, if one whose copy won every block offers that
    /// ([`Replica::file_region`]). A server may send the reply from there;
    /// the bytes stay the voted ones only while no write to the range runs,
    /// so the caller keeps overlapping writes out until it has sent them.
    pub fn read_with_region(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<FileRegion>, IoError> {
        let len = buf.len() as u64;
        self.check_range("read", offset, len)?;
        if buf.is_empty() {
            return Ok(None);
        }
        let winners = self.read_voted(offset, buf)?;
        Ok((0..self.slots().len())
            .filter(|i| winners & (1 << i) != 0)
            .find_map(|i| self.slots()[i].replica().file_region(offset, len)))
    }

    /// Read under a shared range lock; returns the replicas whose copy is
    /// the result for the whole range.
    fn read_voted(&self, offset: u64, buf: &mut [u8]) -> Result<Mask, IoError> {
        self.members.settle_range(offset, buf.len() as u64);
        let _guard = self.members.ranges.lock(offset, buf.len() as u64, false);
        match self.opts.read_pattern {
            ReadPattern::Fifo => self.read_fifo(offset, buf),
            ReadPattern::Quorum => self.read_quorum(offset, buf),
        }
    }

    fn read_fifo(&self, offset: u64, buf: &mut [u8]) -> Result<Mask, IoError> {
        let len = buf.len() as u64;
        let mut errno = quorum_vote::EIO;
        let stale = self.members.stale_mask(offset, len);
        for (i, slot) in self.slots().iter().enumerate() {
            if !slot.is_up() {
                Counters::add(&slot.counters.skipped, 1);
                continue;
            }
            if stale & (1 << i) != 0 {
                continue;
            }
            match slot.replica().read_at(buf, offset) {
                Ok(()) => return Ok(1 << i),
                Err(e) => {
                    Counters::add(&slot.counters.read_errors, 1);
                    self.report_bad(i, OpType::Read, Some(&e), offset, len);
                    if membership::is_unreachable(&e) {
                        self.members.fail(i, &e);
                    }
                    errno = e.errno();
                }
            }
        }
        self.report_failure(offset, len);
        Err(IoError {
            errno,
            op: "read",
            offset,
            len,
        })
    }

    /// Read every replica (replica 0 straight into `buf`) and vote.
    fn read_and_vote(
        &self,
        offset: u64,
        buf: &mut [u8],
        granularity: Granularity,
    ) -> (Voted, Vec<Option<ReplicaError>>) {
        let len = buf.len();
        let mut extra: Vec<AlignedBuf> = (1..self.slots().len())
            .map(|_| self.pool.get(len))
            .collect();
        let FanOut { results, skipped } = {
            let mut targets: Vec<&mut [u8]> = Vec::with_capacity(self.slots().len());
            targets.push(&mut *buf);
            targets.extend(extra.iter_mut().map(|b| &mut b[..len]));
            let targets: Vec<parking_lot::Mutex<&mut [u8]>> =
                targets.into_iter().map(parking_lot::Mutex::new).collect();
            let stale = self.members.stale_mask(offset, len as u64);
            self.fan_out("read", len >= PARALLEL_MIN, stale, |i, r| {
                let mut t = targets[i].lock();
                r.read_at(&mut t, offset)
            })
        };
        let copies: Vec<Copy<'_>> = results
            .iter()
            .enumerate()
            .map(|(i, r)| match r {
                Ok(()) if i == 0 => Copy::Data(&*buf),
                Ok(()) => Copy::Data(&extra[i - 1][..len]),
                Err(e) => Copy::Failed(e.errno()),
            })
            .collect();
        let verdict = vote_read(&copies, self.opts.threshold, offset, granularity);
        drop(copies);
        // Errors to report: not those of replicas the read went without.
        let errors = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.err().filter(|_| skipped & (1 << i) == 0))
            .collect();
        (Voted { verdict, extra }, errors)
    }

    fn read_quorum(&self, offset: u64, buf: &mut [u8]) -> Result<Mask, IoError> {
        let len = buf.len() as u64;
        let (voted, errors) = self.read_and_vote(offset, buf, self.opts.granularity);
        for (i, e) in errors.iter().enumerate() {
            if let Some(e) = e {
                Counters::add(&self.slots()[i].counters.read_errors, 1);
                self.report_bad(i, OpType::Read, Some(e), offset, len);
            }
        }
        let result = match &voted.verdict {
            // Both copies read but differ: with n = T = 2 that is no quorum.
            Verdict::NoQuorum { failed: 0, .. } if self.opts.blkverify => {
                let at = first_difference(&voted, buf);
                let (sector_num, sectors_count) = sectors(offset, len);
                self.members.events.emit(Event::BlkverifyMismatch {
                    reference: self.opts.id.clone(),
                    offset: offset + at as u64,
                    sector_num,
                    sectors_count,
                });
                Err(IoError {
                    errno: libc::EIO,
                    op: "read",
                    offset,
                    len,
                })
            }
            Verdict::NoQuorum { errno, .. } => {
                self.report_failure(offset, len);
                Err(IoError {
                    errno: *errno,
                    op: "read",
                    offset,
                    len,
                })
            }
            Verdict::Agreed { blocks, failed } => {
                assemble(buf, blocks, &voted.extra);
                self.report_dissent(offset, blocks);
                if self.opts.rewrite_corrupted {
                    self.rewrite(offset, buf, blocks, None);
                }
                let all = Mask::MAX >> (Mask::BITS as usize - self.slots().len());
                Ok(blocks.iter().fold(all & !failed, |m, b| m & !b.dissent))
            }
        };
        for b in voted.extra {
            self.pool.put(b);
        }
        result
    }

    /// One REPORT_BAD per replica and contiguous losing range.
    fn report_dissent(&self, offset: u64, blocks: &[BlockVote]) {
        for (i, slot) in self.slots().iter().enumerate() {
            let ranges = losing_ranges(blocks, i);
            if ranges.is_empty() {
                continue;
            }
            Counters::add(&slot.counters.voted_out_reads, 1);
            for (start, len) in ranges {
                Counters::add(&slot.counters.voted_out_bytes, len as u64);
                self.report_bad(i, OpType::Read, None, offset + start as u64, len as u64);
            }
        }
    }

    /// Write the winning bytes (`buf`) over every block a replica lost.
    /// Returns the replicas whose rewrite failed.
    fn rewrite(&self, offset: u64, buf: &[u8], blocks: &[BlockVote], only: Option<Mask>) -> Mask {
        let mut failed = 0;
        for (i, slot) in self.slots().iter().enumerate() {
            if only.is_some_and(|m| m & (1 << i) == 0) || !slot.is_up() {
                continue;
            }
            let replica = slot.replica();
            for (start, len) in losing_ranges(blocks, i) {
                let data = &buf[start..start + len];
                match replica.write_at(data, offset + start as u64, false) {
                    Ok(()) => {
                        Counters::add(&slot.counters.rewrites, 1);
                        Counters::add(&slot.counters.rewritten_bytes, len as u64);
                    }
                    Err(e) => {
                        failed |= 1 << i;
                        Counters::add(&slot.counters.rewrite_errors, 1);
                        tracing::warn!(replica = %slot.name, error = %e, "rewrite of a corrupted range failed");
                    }
                }
            }
        }
        failed
    }

    /// Apply `op` to every replica under an exclusive range lock; success at
    /// `threshold` successes.
    fn replicate(
        &self,
        name: &'static str,
        offset: u64,
        len: u64,
        op: impl Fn(&dyn Replica) -> Result<(), ReplicaError> + Sync,
    ) -> Result<(), IoError> {
        self.check_writable(name, offset, len)?;
        self.members.settle_range(offset, len);
        let _guard = self.members.ranges.lock(offset, len, true);
        let io_error = |errno| IoError {
            errno,
            op: name,
            offset,
            len,
        };
        let heal = self.members.heal.as_ref();
        if let Some(h) = heal
            && let Err(e) = h.begin_write(offset, len)
        {
            tracing::error!(error = %e, "cannot record write intent; failing the write");
            return Err(io_error(libc::EIO));
        }
        let out = self.fan_out(name, len as usize >= PARALLEL_MIN, 0, |_, r| op(r));
        if let Some(h) = heal {
            let missed = out
                .results
                .iter()
                .enumerate()
                .filter(|(_, r)| r.is_err())
                .fold(0, |m: Mask, (i, _)| m | 1 << i);
            let recorded = h.end_write(offset, len, missed);
            for i in (0..self.slots().len()).filter(|i| missed & (1 << i) != 0) {
                self.members.note_missed(i);
            }
            if let Err(e) = recorded {
                tracing::error!(error = %e, "cannot record missed writes; failing the write");
                return Err(io_error(libc::EIO));
            }
        }
        self.settle(name, OpType::Write, offset, len, &out)
    }

    fn settle(
        &self,
        name: &'static str,
        op: OpType,
        offset: u64,
        len: u64,
        out: &FanOut<()>,
    ) -> Result<(), IoError> {
        let results = &out.results;
        for (i, r) in results.iter().enumerate() {
            if out.skipped & (1 << i) != 0 {
                continue;
            }
            if let Err(e) = r {
                let c = &self.slots()[i].counters;
                Counters::add(
                    if op == OpType::Flush {
                        &c.flush_errors
                    } else {
                        &c.write_errors
                    },
                    1,
                );
                self.report_bad(i, op, Some(e), offset, len);
            }
        }
        let statuses: Vec<Result<(), i32>> = results
            .iter()
            .map(|r| r.as_ref().map(|_| ()).map_err(ReplicaError::errno))
            .collect();
        vote_status(&statuses, self.opts.threshold).map_err(|errno| {
            if op == OpType::Flush {
                self.report_failure(0, 0);
            } else {
                self.report_failure(offset, len);
            }
            IoError {
                errno,
                op: name,
                offset,
                len,
            }
        })
    }

    /// Write `data` at `offset` to every replica (FUA passed to each).
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        self.replicate("write", offset, data.len() as u64, |r| {
            r.write_at(data, offset, fua)
        })
    }

    /// Make a range read as zeroes on every replica.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        self.replicate("write_zeroes", offset, len, |r| {
            r.write_zeroes(offset, len, may_unmap, fua)
        })
    }

    /// Deallocate a range on every replica.
    ///
    /// Done as zeroing with unmap allowed, never as a plain discard: replicas
    /// of different kinds read different things after a discard (zeroes, a
    /// backing file's data), and a later vote would take that for corruption.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.replicate("discard", offset, len, |r| {
            r.write_zeroes(offset, len, true, false)
        })
    }

    /// Flush every replica in parallel; success at `threshold` successes.
    pub fn flush(&self) -> Result<(), IoError> {
        let out = self.fan_out("flush", true, 0, |_, r| r.flush());
        self.settle("flush", OpType::Flush, 0, 0, &out)
    }

    /// Block status: zero (and hole) only where every replica says so.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, IoError> {
        self.check_range("block_status", offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let stale = self.members.stale_mask(offset, len);
        let out = self.fan_out("block_status", false, stale, |_, r| {
            r.block_status(offset, len)
        });
        // Replicas the request went without have no say.
        let lists: Vec<Vec<Extent>> = out
            .results
            .into_iter()
            .enumerate()
            .filter(|(i, _)| out.skipped & (1 << i) == 0)
            .map(|(_, r)| {
                r.unwrap_or_else(|_| {
                    vec![Extent {
                        length: len,
                        zero: false,
                        hole: false,
                    }]
                })
            })
            .collect();
        Ok(merge_status(&lists))
    }

    /// Read and vote `[offset, offset + len)` without events, reporting the
    /// ranges where replicas disagree; with `repair`, rewrite the losers.
    /// A range without quorum is reported and never repaired.
    pub fn scrub(&self, offset: u64, len: u64, repair: bool) -> Result<Vec<Divergence>, IoError> {
        self.check_range("scrub", offset, len)?;
        if repair {
            self.check_writable("scrub", offset, len)?;
        }
        self.members.settle_range(offset, len);
        let _guard = self.members.ranges.lock(offset, len, repair);
        let mut buf = self.pool.get(len as usize);
        let buf_slice = &mut buf[..len as usize];
        let (voted, _errors) = self.read_and_vote(offset, buf_slice, self.opts.granularity);
        let mut out = Vec::new();
        match &voted.verdict {
            Verdict::Agreed { blocks, failed } => {
                self.settle_scrub(
                    offset,
                    buf_slice,
                    &voted.extra,
                    blocks,
                    *failed,
                    repair,
                    &mut out,
                );
                if *failed != 0 && out.is_empty() {
                    out.push(Divergence {
                        offset,
                        length: len,
                        bad: 0,
                        failed: *failed,
                        has_quorum: true,
                        repaired: false,
                    });
                }
            }
            Verdict::NoQuorum {
                failed,
                undecided,
                decided,
                ..
            } => {
                let all: Mask = (1 << self.slots().len()) - 1;
                let ranges = if undecided.is_empty() {
                    vec![(0, len as usize)]
                } else {
                    undecided.clone()
                };
                for (start, l) in ranges {
                    out.push(Divergence {
                        offset: offset + start as u64,
                        length: l as u64,
                        bad: all & !failed,
                        failed: *failed,
                        has_quorum: false,
                        repaired: false,
                    });
                }
                // Blocks that do have a majority are reported (and repaired)
                // like those of an agreed range.
                self.settle_scrub(
                    offset,
                    buf_slice,
                    &voted.extra,
                    decided,
                    *failed,
                    repair,
                    &mut out,
                );
                out.sort_by_key(|d| d.offset);
            }
        }
        for b in voted.extra {
            self.pool.put(b);
        }
        self.pool.put(buf);
        Ok(out)
    }

    /// Report the dissenting blocks of a scrubbed range that have a winner,
    /// rewriting the losers first with `repair`. `buf` holds replica 0's
    /// copy and `extra` the others'.
    #[allow(clippy::too_many_arguments)]
    fn settle_scrub(
        &self,
        offset: u64,
        buf: &mut [u8],
        extra: &[AlignedBuf],
        blocks: &[BlockVote],
        failed: Mask,
        repair: bool,
        out: &mut Vec<Divergence>,
    ) {
        if blocks.iter().all(|b| b.dissent == 0) {
            return;
        }
        assemble(buf, blocks, extra);
        let rewrite_failed = if repair {
            self.rewrite(offset, buf, blocks, None)
        } else {
            0
        };
        out.extend(
            blocks
                .iter()
                .filter(|b| b.dissent != 0)
                .map(|b| Divergence {
                    offset: offset + b.start as u64,
                    length: b.len as u64,
                    bad: b.dissent,
                    failed,
                    has_quorum: true,
                    repaired: repair && b.dissent & rewrite_failed == 0,
                }),
        );
    }

    /// Flush every replica (best effort, for shutdown); returns the failures.
    /// Failed replicas are left out: they are not waited on.
    pub fn flush_all(&self) -> Vec<(String, ReplicaError)> {
        let out = self.fan_out("flush", true, 0, |_, r| r.flush());
        out.results
            .into_iter()
            .zip(self.slots())
            .enumerate()
            .filter(|(i, _)| out.skipped & (1 << i) == 0)
            .filter_map(|(_, (r, s))| r.err().map(|e| (s.name.clone(), e)))
            .collect()
    }
}

impl Disk {
    /// Stop the background threads, flush every replica that is up, and
    /// leave the record clean (no dirty region) when the flushes succeed.
    /// Returns the replicas whose flush failed. Later calls do nothing.
    pub fn close(&self) -> Vec<(String, ReplicaError)> {
        if self.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Vec::new();
        }
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

/// Copy winning blocks whose winner is not replica 0 into `buf`, which holds
/// replica 0's read.
fn assemble<E: std::ops::Deref<Target = [u8]>>(buf: &mut [u8], blocks: &[BlockVote], extra: &[E]) {
    for b in blocks {
        if b.source != 0 {
            let src = &extra[b.source - 1][b.start..b.start + b.len];
            buf[b.start..b.start + b.len].copy_from_slice(src);
        }
    }
}

/// Contiguous ranges (relative start, length) where replica `i` dissented.
fn losing_ranges(blocks: &[BlockVote], i: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for b in blocks.iter().filter(|b| b.dissent & (1 << i) != 0) {
        match out.last_mut() {
            Some((s, l)) if *s + *l == b.start => *l += b.len,
            _ => out.push((b.start, b.len)),
        }
    }
    out
}

/// First differing byte between the two copies of a blkverify read.
fn first_difference(voted: &Voted, buf: &[u8]) -> usize {
    let other = &voted.extra[0][..buf.len()];
    buf.iter().zip(other).position(|(a, b)| a != b).unwrap_or(0)
}

/// Intersect per-replica extents: zero/hole only where every list says so.
/// Stops where the shortest list ends.
pub fn merge_status(lists: &[Vec<Extent>]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut idx = vec![0usize; lists.len()];
    let mut used = vec![0u64; lists.len()];
    loop {
        let mut step = u64::MAX;
        let (mut zero, mut hole) = (true, true);
        for (k, list) in lists.iter().enumerate() {
            let Some(e) = list.get(idx[k]) else {
                return out;
            };
            step = step.min(e.length - used[k]);
            zero &= e.zero;
            hole &= e.hole;
        }
        if step == 0 || step == u64::MAX {
            return out;
        }
        match out.last_mut() {
            Some(l) if l.zero == zero && l.hole == hole => l.length += step,
            _ => out.push(Extent {
                length: step,
                zero,
                hole,
            }),
        }
        for (k, list) in lists.iter().enumerate() {
            used[k] += step;
            if used[k] == list[idx[k]].length {
                idx[k] += 1;
                used[k] = 0;
            }
        }
    }
}
