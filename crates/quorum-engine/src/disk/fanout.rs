//! The fan-out: one request on every replica that is up (on the worker
//! pool when large or remote), failing the replicas that cannot be reached;
//! and the REPORT_BAD and FAILURE events the read and write paths emit.

use quorum_replica::{Replica, ReplicaError};
use quorum_vote::Mask;

use super::{Disk, strerror};
use crate::events::{Counters, Event, OpType, sectors};
use crate::membership::{self, Slot};

/// Results of one request on every replica, and which were not asked.
pub(super) struct FanOut<T> {
    pub(super) results: Vec<Result<T, ReplicaError>>,
    /// Replicas the request went without (failed, or excluded).
    pub(super) skipped: Mask,
}

impl Disk {
    /// Run `f` on every replica that is up; in parallel on the worker pool
    /// when asked. Failed replicas are not asked: their result is an error
    /// and their bit is set in `skipped`. A replica whose error says it
    /// cannot be reached is failed from now on.
    pub(super) fn fan_out<T: Send>(
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
        let counted = counted_as(op);
        let call = |i: usize, s: &Slot| {
            if failed & (1 << i) != 0 {
                Counters::add(&s.counters.skipped, 1);
                return Err(s.skipped_error(op));
            }
            if exclude & (1 << i) != 0 {
                return Err(s.skipped_error(op));
            }
            let replica = s.replica();
            s.counters.timed(counted, || f(i, &*replica))
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

    /// Time and count a call to replica `i` made outside [`Disk::fan_out`].
    pub(super) fn timed<T>(
        &self,
        i: usize,
        op: OpType,
        call: impl FnOnce() -> Result<T, ReplicaError>,
    ) -> Result<T, ReplicaError> {
        self.slots()[i].counters.timed(Some(op), call)
    }

    pub(super) fn report_bad(
        &self,
        i: usize,
        op: OpType,
        err: Option<&ReplicaError>,
        offset: u64,
        len: u64,
    ) {
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

    pub(super) fn report_failure(&self, offset: u64, len: u64) {
        let (sector_num, sectors_count) = sectors(offset, len);
        self.members.events.emit(Event::Failure {
            reference: self.opts.id.clone(),
            sector_num,
            sectors_count,
        });
    }
}

/// Which per-replica counter and latency histogram the calls of a fan-out
/// named `op` go to (`None`: block status, not counted as I/O).
fn counted_as(op: &str) -> Option<OpType> {
    match op {
        "read" => Some(OpType::Read),
        "write" | "write_zeroes" | "discard" => Some(OpType::Write),
        "flush" => Some(OpType::Flush),
        _ => None,
    }
}
