//! Scrub: read and vote a range without events, and report the ranges
//! where replicas disagree as [`Divergence`]s, rewriting the losers with
//! `repair`. This is the offline `quorum check`'s primitive; the online
//! scrub job (`scrub_job.rs`) walks the disk with it and reports what it
//! finds as events.

use quorum_replica::ReplicaError;
use quorum_vote::{BlockVote, Mask, Verdict};

use super::read::assemble;
use super::{Disk, IoError};
use crate::pool::AlignedBuf;

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

impl Divergence {
    /// Append to `list`, merged into its last range when adjacent with the
    /// same outcome (how `quorum check` and the online scrub list them).
    pub fn merge_into(self, list: &mut Vec<Divergence>) {
        if let Some(last) = list.last_mut()
            && last.offset + last.length == self.offset
            && (last.bad, last.failed, last.has_quorum, last.repaired)
                == (self.bad, self.failed, self.has_quorum, self.repaired)
        {
            last.length += self.length;
            return;
        }
        list.push(self);
    }
}

impl Disk {
    /// Read and vote `[offset, offset + len)` without events, reporting the
    /// ranges where replicas disagree; with `repair`, rewrite the losers.
    /// A range without quorum is reported and never repaired.
    pub fn scrub(&self, offset: u64, len: u64, repair: bool) -> Result<Vec<Divergence>, IoError> {
        self.scrub_range(offset, len, repair).map(|(d, _)| d)
    }

    /// [`Disk::scrub`], and each replica's read error (`None` for those
    /// that read, or were not asked).
    #[allow(clippy::type_complexity)]
    pub(super) fn scrub_range(
        &self,
        offset: u64,
        len: u64,
        repair: bool,
    ) -> Result<(Vec<Divergence>, Vec<Option<ReplicaError>>), IoError> {
        self.check_range("scrub", offset, len)?;
        if repair {
            self.check_writable("scrub", offset, len)?;
        }
        self.members.settle_range(offset, len);
        let _guard = self.members.ranges.lock(offset, len, repair);
        let mut buf = self.pool.get(len as usize);
        let buf_slice = &mut buf[..len as usize];
        let (voted, errors) = self.read_and_vote(offset, buf_slice, self.opts.granularity);
        let mut out = Vec::new();
        // Empty slots (removed replicas) read as failed copies in the vote;
        // they are no replica's failure.
        let present: Mask = self
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_present())
            .fold(0, |m, (i, _)| m | 1 << i);
        match &voted.verdict {
            Verdict::Agreed { blocks, failed } => {
                let failed = &(*failed & present);
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
                let failed = &(*failed & present);
                let all = present;
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
        Ok((out, errors))
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
}
