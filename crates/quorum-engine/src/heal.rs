//! Getting redundancy back: write intent, missed chunks, reconciliation
//! after an unclean stop, and the online resync.
//!
//! ```text
//!  write ──▶ settle its regions ──▶ range lock ──▶ begin_write: dirty bit, fdatasync
//!                                                  fan out to every replica that is up
//!                                                  end_write: missed bits of replicas it
//!                                                  did not reach, fdatasync, then ack
//!  read ──▶ settle its regions ──▶ range lock ──▶ vote among replicas that missed nothing here
//!
//!  healer thread (one per disk):
//!    1. settle the regions left dirty by an unclean stop (also done on demand by
//!       the first request that touches one): per block, the largest group of
//!       replicas that did not miss it wins, ties broken deterministically
//!       (quorum_vote::vote_reconcile), and every replica is made equal
//!    2. resync: copy each stale replica's missed chunks from voted data,
//!       throttled; flush it; then clear its bits; in-sync when none is left
//!    3. every few seconds, flush every replica and clear the dirty bits of the
//!       regions whose writes all ended before that flush began
//! ```
//!
//! Ordering: a region is settled under an exclusive range lock before any
//! request in it runs; resync copies a chunk under the chunk's exclusive
//! range lock, so a guest write to it either happens before (and is copied)
//! or after (and reaches the replica itself). Each resync batch (pick a
//! replica, copy, flush, clear its bits) runs under the members' control
//! lock, so a replica replaced, removed or added meanwhile never inherits
//! bits cleared for the one before it. What the record stores and when it
//! is synced is said in [`crate::record`].
//!
//! A replica put in a slot by the control plane (replaced, added) is `new`:
//! every chunk missed, so it votes nowhere and is read nowhere, but gets
//! every write; the resync rebuilds it in full and it turns `in-sync`
//! (QUORUM_RESYNC_COMPLETED) when no missed bit is left.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quorum_vote::{Copy, Granularity, Mask, Verdict, vote_read, vote_reconcile};

use crate::events::{Counters, Event, OpType, sectors};
use crate::membership::{Members, ReplicaState, Slot, is_unreachable};
use crate::record::{Record, RecordError};

/// How often idle dirty regions are flushed and cleared.
const CLEAN_EVERY: Duration = Duration::from_secs(5);
/// How often resync progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Chunks copied between two flushes of the replica being resynced.
const BATCH_CHUNKS: u64 = 256;
/// Most chunks copied with one read of each source (1 MiB of 64 KiB chunks).
const RUN_CHUNKS: u64 = 16;
/// At most one "cannot resync" warning per replica this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Regions marked dirty ahead of a write that needs a sync anyway, so a
/// sequential stream syncs the record once per this many regions.
const LOOKAHEAD: u64 = 3;

/// Write intent and missed-chunk tracking of one disk.
#[derive(Debug)]
pub(crate) struct Heal {
    pub(crate) record: Record,
    region: u64,
    chunk: u64,
    threshold: usize,
    intent: Mutex<Intent>,
    /// Counts ended writes; a region's `ended` is the value after its last.
    epoch: AtomicU64,
    /// Regions to reconcile before anything reads or writes them: dirty
    /// (writes were in flight) or unknown (never compared).
    unsettled: Mutex<Vec<bool>>,
    unsettled_left: AtomicU64,
    /// Resync rate limit in bytes per second (0: none); changed live.
    rate: AtomicU64,
    /// Bytes the resync copied so far (all replicas).
    copied: AtomicU64,
    /// Bytes the resync copied to each replica since its last completion
    /// (or since another replica took its slot), for every possible slot.
    copied_to: Vec<AtomicU64>,
    /// Bytes rewritten while settling regions.
    reconciled: AtomicU64,
    /// False on a read-only disk: the record is read, never written, and
    /// nothing is reconciled or resynced.
    active: bool,
    /// When the last "cannot resync" warning was logged.
    warned: Mutex<Option<Instant>>,
}

#[derive(Debug)]
struct Intent {
    /// Writes in flight per region.
    inflight: Vec<u32>,
    /// Epoch at which the region's last write ended.
    ended: Vec<u64>,
}

/// What [`Heal::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealStats {
    /// Bytes copied by the resync since the disk opened.
    pub resync_bytes: u64,
    /// Bytes rewritten while reconciling regions after an unclean stop.
    pub reconciled_bytes: u64,
    /// Regions still to reconcile.
    pub unsettled_regions: u64,
    /// Dirty regions in the record.
    pub dirty_regions: u64,
}

impl Heal {
    /// Track a disk with `record`; every region the record has dirty is
    /// reconciled before use.
    pub(crate) fn new(record: Record, threshold: usize, rate: u64, active: bool) -> Heal {
        let h = record.header();
        let regions = record.regions() as usize;
        let mut unsettled = vec![false; regions];
        let dirty = record.unsettled_regions();
        for &r in &dirty {
            unsettled[r as usize] = true;
        }
        let heal = Heal {
            region: h.region,
            chunk: h.chunk,
            threshold,
            intent: Mutex::new(Intent {
                inflight: vec![0; regions],
                ended: vec![0; regions],
            }),
            epoch: AtomicU64::new(0),
            unsettled: Mutex::new(unsettled),
            unsettled_left: AtomicU64::new(dirty.len() as u64),
            rate: AtomicU64::new(rate),
            copied: AtomicU64::new(0),
            copied_to: (0..quorum_vote::MAX_REPLICAS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            reconciled: AtomicU64::new(0),
            active,
            warned: Mutex::new(None),
            record,
        };
        if active && let Err(e) = heal.record.write_header(|h| h.clean = false) {
            tracing::error!(error = %e, "cannot mark the record in use");
        }
        heal
    }

    /// Warn, at most once a minute, that a run could not be resynced.
    fn warn_unresyncable(&self, replica: &str, offset: u64, len: u64) {
        let mut last = self.warned.lock();
        if last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!(
            replica = %replica,
            offset,
            len,
            "resync: the replicas to copy from do not agree here (or cannot be read); retrying later"
        );
    }

    pub(crate) fn stats(&self) -> HealStats {
        HealStats {
            resync_bytes: self.copied.load(Ordering::Relaxed),
            reconciled_bytes: self.reconciled.load(Ordering::Relaxed),
            unsettled_regions: self.unsettled_left.load(Ordering::Acquire),
            dirty_regions: self.record.dirty_count(),
        }
    }

    fn regions(&self, offset: u64, len: u64) -> Range<u64> {
        offset / self.region..(offset + len.max(1)).div_ceil(self.region)
    }

    fn chunks(&self, offset: u64, len: u64) -> Range<u64> {
        offset / self.chunk..(offset + len.max(1)).div_ceil(self.chunk)
    }

    /// Persist replica `i`'s state (logged, not fatal, on failure). A
    /// replica being rebuilt stays `new` in the record until it is in
    /// sync, so a restart resumes a rebuild as one.
    pub(crate) fn save_state(&self, i: usize, state: ReplicaState) {
        if !self.active {
            return;
        }
        if let Err(e) = self.record.write_header(|h| {
            let e = &mut h.replicas[i].state;
            *e = recorded_state(*e, state as u8);
        }) {
            tracing::error!(error = %e, "cannot record a replica state change");
        }
    }

    /// The record has replica `i` as new: it is being rebuilt in full.
    pub(crate) fn is_rebuilding(&self, i: usize) -> bool {
        self.record
            .header()
            .replicas
            .get(i)
            .is_some_and(|e| e.state == ReplicaState::New as u8)
    }

    /// Is the record kept up to date (not a read-only disk)?
    pub(crate) fn is_active(&self) -> bool {
        self.active
    }

    /// The resync rate limit, bytes per second (0: none).
    pub(crate) fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub(crate) fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::Relaxed);
    }

    /// Resync progress of replica `i` in percent, while it has missed
    /// chunks: copied since it started / (copied + still missed).
    pub(crate) fn progress(&self, i: usize) -> Option<u8> {
        let left = self.record.missed_count(i) * self.chunk;
        if left == 0 {
            return None;
        }
        let done = self.copied_to[i].load(Ordering::Relaxed);
        Some((done * 100 / (done + left)) as u8)
    }

    /// Durably, before replica `i`'s slot takes another replica (identity
    /// `identity`, 0: unknown) to rebuild in full: every chunk missed,
    /// then the header says `new` (see the record's module doc).
    pub(crate) fn record_new(&self, i: usize, identity: u64) -> Result<(), RecordError> {
        self.record.mark_all_missed(i);
        self.record.sync()?;
        self.record.write_header(|h| {
            let e = &mut h.replicas[i];
            e.state = ReplicaState::New as u8;
            e.identity = identity;
            e.generation += 1;
        })?;
        self.copied_to[i].store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Durably, before replica `i` leaves the disk: every chunk missed,
    /// then the header says removed and forgets its identity, so the
    /// same replica coming back is rebuilt in full.
    pub(crate) fn record_removed(&self, i: usize) -> Result<(), RecordError> {
        self.record.mark_all_missed(i);
        self.record.sync()?;
        self.record.write_header(|h| {
            let e = &mut h.replicas[i];
            e.state = crate::record::STATE_REMOVED;
            e.identity = 0;
        })?;
        self.copied_to[i].store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Durably list one more replica (identity `identity`), new with every
    /// chunk missed; returns its index.
    pub(crate) fn record_added(&self, identity: u64) -> Result<usize, RecordError> {
        let i = self.record.grow(crate::record::ReplicaEntry {
            state: ReplicaState::New as u8,
            generation: 1,
            identity,
        })?;
        self.copied_to[i].store(0, Ordering::Relaxed);
        Ok(i)
    }

    /// A replica opened with `identity` (0: unknown). Returns true if the
    /// record knew another replica in its place: then everything is
    /// missed on it and it is to be rebuilt in full.
    pub(crate) fn adopt(&self, i: usize, identity: u64) -> bool {
        let known = self.record.header().replicas[i].identity;
        let replaced = identity != 0 && known != 0 && known != identity;
        if !self.active {
            return replaced;
        }
        if replaced {
            self.record.mark_all_missed(i);
            if let Err(e) = self.record.sync() {
                tracing::error!(error = %e, "cannot record a replaced replica");
            }
        }
        let res = self.record.write_header(|h| {
            let e = &mut h.replicas[i];
            if identity != 0 {
                e.identity = identity;
            }
            e.generation += 1;
            if replaced {
                e.state = ReplicaState::New as u8;
            }
        });
        if let Err(e) = res {
            tracing::error!(error = %e, "cannot record a replica's identity");
        }
        replaced
    }

    /// Before a write reaches any replica: its regions are dirty, durably.
    pub(crate) fn begin_write(&self, offset: u64, len: u64) -> Result<(), RecordError> {
        let regions = self.regions(offset, len);
        {
            let mut intent = self.intent.lock();
            for r in regions.clone() {
                intent.inflight[r as usize] += 1;
            }
            if self.record.mark_dirty(regions.clone()) {
                // A sync is due anyway: take the next regions along, so a
                // sequential stream does not stop at every region boundary
                // (not unsettled ones: their bit must mean what it says).
                let last = self.record.regions();
                let unsettled = self.unsettled.lock();
                for r in regions.end..(regions.end + LOOKAHEAD).min(last) {
                    if !unsettled[r as usize] {
                        self.record.mark_dirty(r..r + 1);
                    }
                }
            }
        }
        // Returns at once when the bits are already durable.
        self.record
            .sync()
            .inspect_err(|_| self.end_inflight(regions))
    }

    fn end_inflight(&self, regions: Range<u64>) {
        let e = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        let mut intent = self.intent.lock();
        for r in regions {
            intent.inflight[r as usize] -= 1;
            intent.ended[r as usize] = e;
        }
    }

    /// After the write: the replicas in `missed` did not get it; their
    /// missed bits are durable when this returns, before the ack.
    pub(crate) fn end_write(&self, offset: u64, len: u64, missed: Mask) -> Result<(), RecordError> {
        let mut res = Ok(());
        if missed != 0 {
            let chunks = self.chunks(offset, len);
            for i in (0..64).filter(|i| missed & (1 << i) != 0) {
                self.record.mark_missed(i, chunks.clone());
            }
            res = self.record.sync();
        }
        self.end_inflight(self.regions(offset, len));
        res
    }

    /// Replicas that missed something in `[offset, offset + len)`.
    /// Those of `candidates` that missed something in `[offset, offset + len)`.
    pub(crate) fn missed_mask(&self, candidates: Mask, offset: u64, len: u64) -> Mask {
        let chunks = self.chunks(offset, len);
        (0..Mask::BITS as usize)
            .filter(|&i| candidates & (1 << i) != 0 && self.record.missed_any(i, chunks.clone()))
            .fold(0, |m, i| m | 1 << i)
    }

    fn is_unsettled(&self, r: u64) -> bool {
        self.unsettled.lock()[r as usize]
    }

    fn next_unsettled(&self) -> Option<u64> {
        if self.unsettled_left.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.unsettled
            .lock()
            .iter()
            .position(|&u| u)
            .map(|r| r as u64)
    }

    fn settled(&self, r: u64) {
        let mut u = self.unsettled.lock();
        if std::mem::take(&mut u[r as usize])
            && self.unsettled_left.fetch_sub(1, Ordering::AcqRel) == 1
            && self.record.header().compare_only
            && self.record.unknown_count() == 0
        {
            drop(u);
            if let Err(e) = self.record.write_header(|h| h.compare_only = false) {
                tracing::error!(error = %e, "cannot record the end of the full comparison");
            }
            tracing::info!("every region of the replicas has been compared");
        }
    }
}

/// The state byte to record for a replica the record has as `recorded`
/// and that is now `now`: a replica being rebuilt stays new until in sync.
fn recorded_state(recorded: u8, now: u8) -> u8 {
    if recorded == ReplicaState::New as u8 && now != ReplicaState::InSync as u8 {
        recorded
    } else {
        now
    }
}

/// Region bounds, clipped to the disk.
fn bounds(start: u64, len: u64, size: u64) -> (u64, u64) {
    (start, (start + len).min(size) - start)
}

impl Members {
    fn heal(&self) -> &Heal {
        self.heal
            .as_ref()
            .expect("only called on disks with a record")
    }

    /// Reconcile the unsettled regions of `[offset, offset + len)` before
    /// a request touches them. Cheap when nothing is unsettled.
    pub(crate) fn settle_range(self: &Arc<Self>, offset: u64, len: u64) {
        let Some(h) = &self.heal else { return };
        if !h.active || h.unsettled_left.load(Ordering::Acquire) == 0 {
            return;
        }
        for r in h.regions(offset, len) {
            if h.is_unsettled(r) {
                self.settle_region(r);
            }
        }
    }

    /// Replicas a read of `[offset, offset + len)` must not ask: those that
    /// missed something there.
    pub(crate) fn stale_mask(&self, offset: u64, len: u64) -> Mask {
        let Some(h) = &self.heal else { return 0 };
        let lagging = self
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_lagging())
            .fold(0, |m: Mask, (i, _)| m | 1 << i);
        if lagging == 0 {
            return 0;
        }
        // Only lagging replicas are looked up: no record lock for the others.
        h.missed_mask(lagging, offset, len)
    }

    /// Record (durably, one sync) that for each `(mask, offset, len)` the
    /// replicas in `mask` missed that range; in-sync ones become stale.
    fn record_missed(&self, ranges: &[(Mask, u64, u64)]) {
        let h = self.heal();
        let mut all: Mask = 0;
        for &(mask, offset, len) in ranges {
            for i in (0..self.slots().len()).filter(|i| mask & (1 << i) != 0) {
                h.record.mark_missed(i, h.chunks(offset, len));
            }
            all |= mask;
        }
        if all == 0 {
            return;
        }
        if let Err(e) = h.record.sync() {
            tracing::error!(error = %e, "cannot record missed chunks");
        }
        for i in (0..self.slots().len()).filter(|i| all & (1 << i) != 0) {
            self.note_missed(i);
        }
    }

    /// Make every replica equal in region `r` (see the module doc).
    fn settle_region(self: &Arc<Self>, r: u64) {
        let h = self.heal();
        let (start, len) = bounds(r * h.region, h.region, self.size);
        let _g = self.ranges.lock(start, len, true);
        if !h.is_unsettled(r) {
            return;
        }
        // Never compared since a fresh record: only a majority decides.
        // Dirty from writes in flight at a crash: every block is decided.
        let compare_only = h.record.is_unknown(r);
        let n = self.slots().len();
        // Replicas that are not up miss whatever is made equal here.
        let down: Mask = (0..n)
            .filter(|&i| !self.slots()[i].is_up())
            .fold(0, |m, i| m | 1 << i);
        // What each replica missed here, per piece (a replica that is down
        // misses the whole region).
        let mut missed: Vec<(Mask, u64, u64)> = vec![(down, start, len)];
        let mut written: Mask = 0;
        let mut complete = true;
        let mut at = start;
        while at < start + len {
            let piece = h.chunk.min(start + len - at);
            let mut piece_missed: Mask = 0;
            let eligible: Vec<usize> = (0..n)
                .filter(|&i| down & (1 << i) == 0 && !h.record.missed_any(i, h.chunks(at, piece)))
                .collect();
            let mut bufs: Vec<Option<Vec<u8>>> = vec![None; n];
            for &i in &eligible {
                let mut b = vec![0u8; piece as usize];
                match self.slots()[i].replica().read_at(&mut b, at) {
                    Ok(()) => bufs[i] = Some(b),
                    Err(e) => {
                        if is_unreachable(&e) {
                            self.fail(i, &e);
                        }
                        piece_missed |= 1 << i;
                    }
                }
            }
            let copies: Vec<Copy<'_>> = bufs
                .iter()
                .map(|b| b.as_deref().map_or(Copy::Failed(libc::EIO), Copy::Data))
                .collect();
            let decided = if compare_only {
                // Nothing is known of this region: only a majority decides.
                let ok = copies.iter().filter(|c| matches!(c, Copy::Data(_))).count();
                match vote_read(&copies, h.threshold.min(n), at, Granularity::Block(4096)) {
                    _ if ok == 0 => None,
                    Verdict::Agreed { blocks, .. } => Some(blocks),
                    Verdict::NoQuorum { decided, .. } => Some(decided),
                }
            } else {
                vote_reconcile(&copies, at, Granularity::Block(4096))
            };
            match decided {
                None => complete = false,
                Some(blocks) => {
                    for b in blocks.iter().filter(|b| b.dissent != 0) {
                        let data = bufs[b.source].as_ref().expect("winner was read");
                        let data = data[b.start..b.start + b.len].to_vec();
                        for j in (0..n).filter(|j| b.dissent & (1 << j) != 0) {
                            if compare_only {
                                // Outvoted where nothing was in flight: a
                                // corruption, reported as a read vote is.
                                let (sector_num, sectors_count) =
                                    sectors(at + b.start as u64, b.len as u64);
                                Counters::add(
                                    &self.slots()[j].counters.voted_out_bytes,
                                    b.len as u64,
                                );
                                self.events.emit(Event::ReportBad {
                                    op: OpType::Read,
                                    error: None,
                                    node_name: self.slots()[j].name.clone(),
                                    sector_num,
                                    sectors_count,
                                });
                            }
                            match self.slots()[j].replica().write_at(
                                &data,
                                at + b.start as u64,
                                false,
                            ) {
                                Ok(()) => {
                                    written |= 1 << j;
                                    h.reconciled.fetch_add(b.len as u64, Ordering::Relaxed);
                                }
                                Err(_) => piece_missed |= 1 << j,
                            }
                        }
                    }
                }
            }
            missed.push((piece_missed, at, piece));
            at += piece;
        }
        // A replica whose flush failed may have lost any of it.
        for j in (0..n).filter(|j| written & (1 << j) != 0) {
            if self.slots()[j].replica().flush().is_err() {
                missed.push((1 << j, start, len));
            }
        }
        self.record_missed(&missed);
        if complete {
            h.record.clear_unknown(r);
            h.record.clear_dirty(r);
            h.settled(r);
        }
    }

    /// The replica the resync works on next, if any; moves replicas with
    /// nothing left to in-sync.
    fn next_to_resync(&self) -> Option<usize> {
        let h = self.heal();
        let mut pick = None;
        for (i, s) in self.slots().iter().enumerate() {
            if !s.is_lagging() {
                continue;
            }
            let st = s.state();
            if h.record.missed_count(i) == 0 {
                if s.transition(st, ReplicaState::InSync) {
                    let bytes = h.copied_to[i].swap(0, Ordering::AcqRel);
                    self.announce(i, st, ReplicaState::InSync, "resync completed".into());
                    self.events.emit(Event::ResyncCompleted {
                        node_name: s.name.clone(),
                        bytes,
                    });
                }
            } else if pick.is_none() {
                pick = Some(i);
            }
        }
        pick
    }

    /// Copy up to a batch of replica `i`'s missed chunks; returns the bytes
    /// copied (0 when nothing could be). Adjacent missed chunks are copied
    /// as one run of up to [`RUN_CHUNKS`] chunks: one read per source, one
    /// vote, one write.
    fn resync_batch(self: &Arc<Self>, i: usize, from: &mut u64, max_chunks: u64) -> u64 {
        let h = self.heal();
        let slot = &self.slots()[i];
        let st = slot.state();
        if st != ReplicaState::Resyncing && slot.transition(st, ReplicaState::Resyncing) {
            self.announce(
                i,
                st,
                ReplicaState::Resyncing,
                "copying what it missed".into(),
            );
        }
        let n = self.slots().len();
        let mut done: Vec<Range<u64>> = Vec::new();
        let mut bytes = 0;
        let mut c = match h
            .record
            .next_missed(i, *from)
            .or_else(|| h.record.next_missed(i, 0))
        {
            Some(c) => c,
            None => {
                *from = 0;
                return 0;
            }
        };
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); n];
        let mut data: Vec<u8> = Vec::new();
        let mut budget = max_chunks.max(1);
        while budget > 0 {
            // A run of adjacent missed chunks.
            let mut end = c + 1;
            let chunks = h.record.chunks();
            while end < chunks
                && end - c < RUN_CHUNKS.min(budget)
                && h.record.missed_any(i, end..end + 1)
            {
                end += 1;
            }
            budget -= end - c;
            let (start, len) = bounds(c * h.chunk, (end - c) * h.chunk, self.size);
            let _g = self.ranges.lock(start, len, true);
            if !slot.is_up() || self.is_closed() {
                break;
            }
            // Sources: up, and missed nothing in the run.
            let sources: Vec<usize> = (0..n)
                .filter(|&j| j != i && self.slots()[j].is_up() && !h.record.missed_any(j, c..end))
                .collect();
            let mut read_ok: Mask = 0;
            for &j in &sources {
                let b = &mut bufs[j];
                b.resize(len as usize, 0);
                if self.slots()[j].replica().read_at(b, start).is_ok() {
                    read_ok |= 1 << j;
                }
            }
            let ok = read_ok.count_ones() as usize;
            let copies: Vec<Copy<'_>> = (0..n)
                .map(|j| {
                    if read_ok & (1 << j) != 0 {
                        Copy::Data(&bufs[j][..len as usize])
                    } else {
                        Copy::Failed(libc::EIO)
                    }
                })
                .collect();
            let verdict = (ok > 0).then(|| {
                vote_read(
                    &copies,
                    h.threshold.min(ok),
                    start,
                    Granularity::Block(4096),
                )
            });
            if let Some(Verdict::Agreed { blocks, .. }) = verdict {
                data.resize(len as usize, 0);
                for b in &blocks {
                    data[b.start..b.start + b.len]
                        .copy_from_slice(&bufs[b.source][b.start..b.start + b.len]);
                }
                match slot.replica().write_at(&data[..len as usize], start, false) {
                    Ok(()) => {
                        done.push(c..end);
                        bytes += len;
                    }
                    Err(e) => {
                        if is_unreachable(&e) {
                            self.fail(i, &e);
                        }
                        break;
                    }
                }
            } else {
                h.warn_unresyncable(&slot.name, start, len);
            }
            drop(_g);
            match h.record.next_missed(i, end) {
                Some(next) => c = next,
                None => {
                    c = 0;
                    break;
                }
            }
        }
        *from = c;
        if done.is_empty() {
            return 0;
        }
        // Bits are cleared only once the copies are flushed on the replica.
        match slot.replica().flush() {
            Ok(()) => {
                for run in &done {
                    for c in run.clone() {
                        h.record.clear_missed(i, c);
                    }
                }
                if let Err(e) = h.record.sync() {
                    tracing::error!(error = %e, "cannot record resync progress");
                }
                h.copied.fetch_add(bytes, Ordering::Relaxed);
                h.copied_to[i].fetch_add(bytes, Ordering::Relaxed);
                bytes
            }
            Err(e) => {
                if is_unreachable(&e) {
                    self.fail(i, &e);
                }
                0
            }
        }
    }

    /// Flush every replica and clear the dirty bits of regions whose writes
    /// all ended before the flush began (every one, with `all`, at close).
    pub(crate) fn clean_dirty(&self) -> bool {
        let h = self.heal();
        let dirty = h.record.dirty_regions();
        if dirty.is_empty() {
            return true;
        }
        let epoch = h.epoch.load(Ordering::Acquire);
        for (i, s) in self.slots().iter().enumerate() {
            if s.is_up()
                && let Err(e) = s.replica().flush()
            {
                tracing::debug!(replica = %self.slots()[i].name, error = %e, "flush before clearing dirty regions failed");
                return false;
            }
        }
        {
            let intent = h.intent.lock();
            let unsettled = h.unsettled.lock();
            for r in dirty {
                let k = r as usize;
                if intent.inflight[k] == 0 && intent.ended[k] <= epoch && !unsettled[k] {
                    h.record.clear_dirty(r);
                }
            }
        }
        if let Err(e) = h.record.sync() {
            tracing::error!(error = %e, "cannot record cleared dirty regions");
        }
        h.record.dirty_count() == 0
    }

    /// At close: clear what can be cleared and mark the record clean when
    /// no dirty region is left.
    pub(crate) fn close_heal(&self) {
        let Some(h) = self.heal.as_ref().filter(|h| h.active) else {
            return;
        };
        let clean = self.clean_dirty();
        // Whatever else changed (regions compared, chunks resynced) too.
        if let Err(e) = h.record.sync() {
            tracing::error!(error = %e, "cannot write the record at close");
        }
        let states: Vec<u8> = self.slots().iter().map(Slot::state_byte).collect();
        let res = h.record.write_header(|hd| {
            hd.clean = clean;
            for (e, s) in hd.replicas.iter_mut().zip(&states) {
                e.state = recorded_state(e.state, *s);
            }
        });
        if let Err(e) = res {
            tracing::error!(error = %e, "cannot mark the record clean");
        }
    }

    /// Start the healer thread.
    pub(crate) fn spawn_healer(self: &Arc<Self>) -> Option<std::thread::JoinHandle<()>> {
        if !self.heal.as_ref()?.active {
            return None;
        }
        let m = Arc::clone(self);
        std::thread::Builder::new()
            .name("quorum-heal".into())
            .spawn(move || m.healer_loop())
            .inspect_err(|e| tracing::error!(error = %e, "cannot start the resync thread"))
            .ok()
    }

    /// Reconcile every unsettled region and resync every stale replica
    /// now, unthrottled (for `quorum check --repair`). Returns the bytes
    /// copied to stale replicas.
    pub(crate) fn heal_now(self: &Arc<Self>) -> u64 {
        let Some(h) = self.heal.as_ref().filter(|h| h.active) else {
            return 0;
        };
        while let Some(r) = h.next_unsettled() {
            self.settle_region(r);
            if h.is_unsettled(r) {
                break;
            }
        }
        let mut copied = 0;
        let mut from = vec![0u64; quorum_vote::MAX_REPLICAS];
        loop {
            let _control = self.control.lock();
            let Some(i) = self.next_to_resync() else {
                break;
            };
            let n = self.resync_batch(i, &mut from[i], BATCH_CHUNKS);
            if n == 0 && from[i] == 0 {
                break;
            }
            copied += n;
        }
        self.clean_dirty();
        copied
    }

    /// Wait as long as copying `n` bytes at the resync rate takes from
    /// `started`, following rate changes (0 ends the wait); true when the
    /// disk closes.
    fn throttle(&self, n: u64, started: Instant) -> bool {
        let h = self.heal();
        loop {
            let rate = h.rate();
            if rate == 0 {
                return false;
            }
            let d = Duration::from_secs_f64(n as f64 / rate as f64);
            let Some(left) = d.checked_sub(started.elapsed()).filter(|l| !l.is_zero()) else {
                return false;
            };
            // New work or a rate change wakes this early; the loop then
            // waits out what is left at the current rate.
            if self.wait_for_work(left) {
                return true;
            }
        }
    }

    fn healer_loop(self: Arc<Self>) {
        let h = self.heal();
        let mut last_clean = Instant::now();
        let mut progress = Progress::default();
        let mut from = vec![0u64; quorum_vote::MAX_REPLICAS];
        loop {
            if self.is_closed() {
                return;
            }
            let mut busy = false;
            if let Some(r) = h.next_unsettled() {
                self.settle_region(r);
                busy = true;
            } else {
                // One batch under the control lock: no replica is replaced,
                // removed or added while it copies and clears missed bits.
                let control = self.control.lock();
                if let Some(i) = self.next_to_resync() {
                    if progress.replica != Some(i) {
                        progress = Progress::starting(i);
                    }
                    // A throttled batch is a quarter second's worth at the rate.
                    let rate = h.rate();
                    let max = if rate == 0 {
                        BATCH_CHUNKS
                    } else {
                        (rate / 4 / h.chunk).clamp(1, BATCH_CHUNKS)
                    };
                    let n = self.resync_batch(i, &mut from[i], max);
                    drop(control);
                    busy = n > 0;
                    progress.add(&self, i, n);
                    if n > 0 && self.throttle(n, progress.batch_started) {
                        return;
                    }
                    progress.batch_started = Instant::now();
                } else {
                    progress.replica = None;
                }
            }
            if last_clean.elapsed() >= CLEAN_EVERY {
                self.clean_dirty();
                last_clean = Instant::now();
            }
            if !busy && self.wait_for_work(Duration::from_millis(500)) {
                return;
            }
        }
    }
}

/// Resync progress, for the log.
#[derive(Debug)]
struct Progress {
    /// The replica being resynced.
    replica: Option<usize>,
    since: Instant,
    logged: Instant,
    bytes: u64,
    batch_started: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        let now = Instant::now();
        Progress {
            replica: None,
            since: now,
            logged: now,
            bytes: 0,
            batch_started: now,
        }
    }
}

impl Progress {
    /// Timing from now, for replica `i`.
    fn starting(i: usize) -> Progress {
        Progress {
            replica: Some(i),
            ..Progress::default()
        }
    }

    fn add(&mut self, m: &Members, i: usize, n: u64) {
        self.bytes += n;
        if self.logged.elapsed() < PROGRESS_EVERY {
            return;
        }
        let h = m.heal();
        let left = h.record.missed_count(i) * h.chunk;
        let secs = self.since.elapsed().as_secs_f64().max(0.001);
        let rate = self.bytes as f64 / secs;
        let total = left + self.bytes;
        tracing::info!(
            replica = %m.slots()[i].name,
            "resync of {}: {:.0}% ({} MiB left), {:.0} MiB/s, ETA {:.0} s",
            m.slots()[i].name,
            100.0 * self.bytes as f64 / total.max(1) as f64,
            left >> 20,
            rate / f64::from(1 << 20),
            left as f64 / rate.max(1.0)
        );
        self.logged = Instant::now();
    }
}
