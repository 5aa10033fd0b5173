//! The write and flush paths: replicate a write, zeroing or discard to
//! every replica under an exclusive range lock (recording intent and what
//! each replica missed, with tracking), then settle it by the threshold
//! rule; flush likewise, and best-effort for shutdown.

use std::time::Instant;

use quorum_replica::{Replica, ReplicaError};
use quorum_vote::{Mask, vote_status};

use super::fanout::FanOut;
use super::{Disk, IoError, PARALLEL_MIN};
use crate::events::{Counters, OpType};

impl Disk {
    /// Apply `op` to every replica under an exclusive range lock; success at
    /// `threshold` successes. Counted and timed as one client write.
    fn replicate(
        &self,
        name: &'static str,
        offset: u64,
        len: u64,
        op: impl Fn(&dyn Replica) -> Result<(), ReplicaError> + Sync,
    ) -> Result<(), IoError> {
        let start = Instant::now();
        let r = self.replicate_locked(name, offset, len, op);
        self.requests.done(OpType::Write, len, start, &r);
        r
    }

    fn replicate_locked(
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
        let start = Instant::now();
        let out = self.fan_out("flush", true, 0, |_, r| r.flush());
        let r = self.settle("flush", OpType::Flush, 0, 0, &out);
        self.requests.done(OpType::Flush, 0, start, &r);
        r
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
