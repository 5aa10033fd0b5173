//! The read path: under a shared range lock, read in order (fifo) or read
//! every replica and vote (quorum); assemble the winning blocks, report the
//! dissenting replicas, and rewrite what they lost (rewrite-corrupted).

use std::time::Instant;

use quorum_replica::{FileRegion, ReplicaError};
use quorum_vote::{BlockVote, Copy, Granularity, Mask, Verdict, vote_read};

use super::fanout::FanOut;
use super::{Disk, IoError, PARALLEL_MIN, ReadPattern};
use crate::events::{Counters, Event, OpType, sectors};
use crate::membership;
use crate::pool::AlignedBuf;

/// Outcome of reading and voting one range (shared by reads and scrub).
pub(super) struct Voted {
    pub(super) verdict: Verdict,
    pub(super) extra: Vec<AlignedBuf>,
}

impl Disk {
    /// Read `buf.len()` bytes at `offset`, by the disk's read pattern.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.read_request(offset, buf).map(drop)
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
        let winners = self.read_request(offset, buf)?;
        Ok((0..self.slots().len())
            .filter(|i| winners & (1 << i) != 0)
            .find_map(|i| self.slots()[i].replica().file_region(offset, len)))
    }

    /// A client read: checked, read by the read pattern, counted and timed
    /// in the disk's request counters. Returns the replicas whose copy won
    /// every block (none for an empty read).
    fn read_request(&self, offset: u64, buf: &mut [u8]) -> Result<Mask, IoError> {
        let start = Instant::now();
        let len = buf.len() as u64;
        let r = self.check_range("read", offset, len).and_then(|()| {
            if buf.is_empty() {
                return Ok(0);
            }
            self.read_voted(offset, buf)
        });
        self.requests.done(OpType::Read, len, start, &r);
        r
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
            match self.timed(i, OpType::Read, || slot.replica().read_at(buf, offset)) {
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
    pub(super) fn read_and_vote(
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
    pub(super) fn rewrite(
        &self,
        offset: u64,
        buf: &[u8],
        blocks: &[BlockVote],
        only: Option<Mask>,
    ) -> Mask {
        let mut failed = 0;
        for (i, slot) in self.slots().iter().enumerate() {
            if only.is_some_and(|m| m & (1 << i) == 0) || !slot.is_up() {
                continue;
            }
            let replica = slot.replica();
            for (start, len) in losing_ranges(blocks, i) {
                let data = &buf[start..start + len];
                let at = offset + start as u64;
                match self.timed(i, OpType::Write, || replica.write_at(data, at, false)) {
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
}

/// Copy winning blocks whose winner is not replica 0 into `buf`, which holds
/// replica 0's read.
pub(super) fn assemble<E: std::ops::Deref<Target = [u8]>>(
    buf: &mut [u8],
    blocks: &[BlockVote],
    extra: &[E],
) {
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
