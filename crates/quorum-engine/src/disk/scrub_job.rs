//! The online scrub job: a background thread that reads every allocated
//! block of every replica of the live disk, votes, and (with repair)
//! rewrites the blocks that lost, while the disk serves.
//!
//! # The walk
//!
//! Like the offline `quorum check`, the job walks the disk from offset 0 in
//! steps of [`STEP`] bytes. Each step asks every replica for its block
//! status and skips the ranges that every replica reports zero
//! (unallocated); the rest it scrubs with [`Disk::scrub`]'s range scrub.
//!
//! # Ordering with guest writes
//!
//! Each scrubbed range is read, voted and rewritten under the disk's range
//! lock, as a guest request would be: shared without repair, exclusive with
//! repair. A guest write to the range therefore lands wholly before or
//! wholly after the scrub of it, so the scrub never takes a write in flight
//! for a divergence and never rewrites a block with data older than an
//! acknowledged write. Guest requests to other ranges go on meanwhile; one
//! to the range being scrubbed waits for one step's reads (at most
//! [`STEP`] bytes per replica). Ranges that missed writes on a stale
//! replica are settled and voted without it, as reads are.
//!
//! # Throttling
//!
//! With a rate limit, the job waits between steps until the bytes it has
//! scrubbed so far are due at that rate (skipped, unallocated ranges do
//! not count). It holds no lock and no reference to the disk while it
//! waits: it waits on a condition variable that [`Disk::cancel_scrub`] and
//! [`Disk::close`] signal, so both take effect at once.
//!
//! # What is reported
//!
//! Divergent ranges are listed in [`ScrubProgress::divergences`] in disk
//! order, adjacent ones with the same outcome merged (as `quorum check`
//! lists them). As each range is complete, it is reported as a guest read
//! would report it: each replica that lost the vote gets one
//! `QUORUM_REPORT_BAD` (type `read`, no `error`, the range's sectors) and
//! one voted-out read (`voted_out_reads`, `voted_out_bytes`); a range
//! without a majority gets one `QUORUM_FAILURE`; a replica whose read fails
//! gets a `QUORUM_REPORT_BAD` with the error and a `read_errors` count.
//! Rewrites count in `rewrites` and `rewritten_bytes`. The job ends with
//! one `QUORUM_SCRUB_COMPLETED` (status `completed`, `cancelled` or
//! `failed`).
//!
//! # Lifetime
//!
//! The thread holds only a weak reference to the disk, taken for one step
//! at a time: it never keeps a dropped disk alive for longer than a step.
//! [`Disk::close`] stops it (the scrub ends `failed`: the disk closed) and
//! joins it before flushing; a close that runs on the scrub thread itself
//! (the thread dropped the last reference) does not wait for itself.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use super::{AllocationWalk, ControlError, Disk, Divergence};
use crate::events::{Counters, Event, OpType};

/// Bytes scrubbed per step (and held under one range lock at most).
pub(super) const STEP: u64 = 1 << 20;

/// How an online scrub stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScrubState {
    /// No scrub has run since the disk opened.
    None,
    /// Running.
    Running,
    /// Scanned the whole disk.
    Completed,
    /// Cancelled before the end.
    Cancelled,
    /// Stopped by an error (the disk closed, or a request failed).
    Failed,
}

impl ScrubState {
    /// The status of `QUORUM_SCRUB_COMPLETED` for a scrub that ended so.
    fn as_str(self) -> &'static str {
        match self {
            ScrubState::None => "none",
            ScrubState::Running => "running",
            ScrubState::Completed => "completed",
            ScrubState::Cancelled => "cancelled",
            ScrubState::Failed => "failed",
        }
    }
}

/// The current (or last) online scrub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubProgress {
    /// Where it stands.
    pub state: ScrubState,
    /// Whether minority blocks are rewritten.
    pub repair: bool,
    /// Rate limit in bytes per second (0: none).
    pub rate: u64,
    /// Bytes of the disk to scan.
    pub total_bytes: u64,
    /// Bytes scanned so far (ranges skipped as unallocated included).
    pub done_bytes: u64,
    /// Divergent ranges found so far, in disk order.
    pub divergences: Vec<Divergence>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Why the job is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancel,
    Close,
}

/// What the job thread and the disk share: progress and the stop flag,
/// and the condition variable the thread waits on between steps.
#[derive(Debug)]
struct Shared {
    state: Mutex<JobState>,
    wake: Condvar,
}

#[derive(Debug)]
struct JobState {
    progress: ScrubProgress,
    stop: Option<Stop>,
}

/// The disk's online scrub: its shared state and its thread.
#[derive(Debug)]
pub(super) struct ScrubJob {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ScrubJob {
    pub(super) fn new(size: u64) -> ScrubJob {
        ScrubJob {
            shared: Arc::new(Shared {
                state: Mutex::new(JobState {
                    progress: ScrubProgress {
                        state: ScrubState::None,
                        repair: false,
                        rate: 0,
                        total_bytes: size,
                        done_bytes: 0,
                        divergences: Vec::new(),
                        error: None,
                    },
                    stop: None,
                }),
                wake: Condvar::new(),
            }),
            thread: Mutex::new(None),
        }
    }

    /// Stop the job for good (the disk is closing) and wait for its thread,
    /// unless this is that thread.
    pub(super) fn stop_and_join(&self) {
        let thread = self.thread.lock().take();
        self.shared.state.lock().stop = Some(Stop::Close);
        self.shared.wake.notify_all();
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// Wait until `due` (no wait when it has passed), or until asked to
    /// stop; returns the stop.
    fn pause_until(&self, due: Instant) -> Option<Stop> {
        let mut st = self.state.lock();
        while st.stop.is_none() && !self.wake.wait_until(&mut st, due).timed_out() {}
        st.stop
    }
}

/// Where the walk is; owned by the job thread.
#[derive(Debug)]
struct Walk {
    repair: bool,
    rate: u64,
    started: Instant,
    /// Where the walk is, and the allocation status ahead of it.
    alloc: AllocationWalk,
    /// Bytes read and voted (not skipped), for throttling.
    checked: u64,
    /// Divergences listed whose events have been emitted.
    reported: usize,
}

impl Walk {
    /// When the next step may start, at the rate limit.
    fn due(&self) -> Instant {
        if self.rate == 0 {
            return self.started;
        }
        self.started + Duration::from_secs_f64(self.checked as f64 / self.rate as f64)
    }
}

/// How a scrub ended.
enum Outcome {
    Completed,
    Cancelled,
    Failed(String),
}

impl Disk {
    /// Start an online scrub of the whole disk, at most `rate` bytes per
    /// second (0: none); with `repair`, rewrite minority blocks. Refused
    /// while another runs, with `repair` on a read-only disk, and once the
    /// disk is closed. Returns at once; follow it with
    /// [`Disk::scrub_progress`] or the `QUORUM_SCRUB_COMPLETED` event. See
    /// the module doc of `scrub_job.rs` for ordering, throttling and events.
    pub fn start_scrub(self: &Arc<Self>, repair: bool, rate: u64) -> Result<(), ControlError> {
        if repair && self.opts.read_only {
            return Err(ControlError::Refused(
                "the disk is read-only: cannot scrub with repair".into(),
            ));
        }
        let job = &self.scrub_job;
        let mut thread = job.thread.lock();
        // Checked under the thread lock: close takes it to stop the job.
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ControlError::Refused("the disk is closed".into()));
        }
        {
            let mut st = job.shared.state.lock();
            let p = &st.progress;
            if p.state == ScrubState::Running {
                return Err(ControlError::Refused(format!(
                    "a scrub is already running ({} of {} bytes scanned)",
                    p.done_bytes, p.total_bytes
                )));
            }
            st.progress = ScrubProgress {
                state: ScrubState::Running,
                repair,
                rate,
                total_bytes: self.size,
                done_bytes: 0,
                divergences: Vec::new(),
                error: None,
            };
            st.stop = None;
        }
        // The last scrub's thread has ended its scrub; it only exits now
        // (and cannot be dropping the last reference: we hold one).
        if let Some(old) = thread.take() {
            let _ = old.join();
        }
        let weak = Arc::downgrade(self);
        let shared = Arc::clone(&job.shared);
        let spawned = std::thread::Builder::new()
            .name("quorum-scrub".into())
            .spawn(move || run(weak, shared, repair, rate));
        match spawned {
            Ok(t) => {
                *thread = Some(t);
                Ok(())
            }
            Err(e) => {
                let why = format!("cannot start the scrub thread: {e}");
                let mut st = job.shared.state.lock();
                st.progress.state = ScrubState::Failed;
                st.progress.error = Some(why.clone());
                Err(ControlError::Failed(why))
            }
        }
    }

    /// The current (or last) online scrub.
    pub fn scrub_progress(&self) -> ScrubProgress {
        self.scrub_job.shared.state.lock().progress.clone()
    }

    /// Ask the running scrub to stop; false if none runs. The scrub ends
    /// (state `cancelled`, `QUORUM_SCRUB_COMPLETED` with status
    /// `cancelled`) as soon as the step in progress, if any, is done.
    pub fn cancel_scrub(&self) -> bool {
        let shared = &self.scrub_job.shared;
        let mut st = shared.state.lock();
        if st.progress.state != ScrubState::Running || st.stop.is_some() {
            return false;
        }
        st.stop = Some(Stop::Cancel);
        shared.wake.notify_all();
        true
    }

    /// Scan one piece from where the walk is: skip it when every replica
    /// reports it unallocated, else scrub it (at most [`STEP`] bytes);
    /// publish progress and report the divergent ranges that are complete.
    /// Returns false at the end.
    fn scrub_step(&self, shared: &Shared, walk: &mut Walk) -> Result<bool, String> {
        let Some((at, l, zero)) = walk
            .alloc
            .next(self, STEP)
            .map_err(|e| format!("block status: {e}"))?
        else {
            return Ok(false);
        };
        let mut found = Vec::new();
        if !zero {
            let (divergences, errors) = self
                .scrub_range(at, l, walk.repair)
                .map_err(|e| format!("scrub: {e}"))?;
            for (i, e) in errors.iter().enumerate() {
                if let Some(e) = e {
                    Counters::add(&self.slots()[i].counters.read_errors, 1);
                    self.report_bad(i, OpType::Read, Some(e), at, l);
                }
            }
            found = divergences;
            walk.checked += l;
        }
        let at = walk.alloc.offset();
        let complete = {
            let mut st = shared.state.lock();
            st.progress.done_bytes = at;
            let list = &mut st.progress.divergences;
            for d in found {
                d.merge_into(list);
            }
            // The last range may still grow in the next step.
            let upto = list.len().saturating_sub(1).max(walk.reported);
            let complete = list[walk.reported..upto].to_vec();
            walk.reported = upto;
            complete
        };
        for d in &complete {
            self.report_divergence(d);
        }
        Ok(at < self.size)
    }

    /// The events and counters of one complete divergent range.
    fn report_divergence(&self, d: &Divergence) {
        if !d.has_quorum {
            self.report_failure(d.offset, d.length);
            return;
        }
        for (i, slot) in self.slots().iter().enumerate() {
            if d.bad & (1 << i) != 0 {
                Counters::add(&slot.counters.voted_out_reads, 1);
                Counters::add(&slot.counters.voted_out_bytes, d.length);
                self.report_bad(i, OpType::Read, None, d.offset, d.length);
            }
        }
    }

    /// End the scrub: report what is left, set the final state and emit
    /// `QUORUM_SCRUB_COMPLETED`.
    fn finish_scrub(&self, shared: &Shared, walk: &Walk, outcome: Outcome) {
        let rest = shared.state.lock().progress.divergences[walk.reported..].to_vec();
        for d in &rest {
            self.report_divergence(d);
        }
        let mut st = shared.state.lock();
        let p = &mut st.progress;
        (p.state, p.error) = match outcome {
            Outcome::Completed => (ScrubState::Completed, None),
            Outcome::Cancelled => (ScrubState::Cancelled, None),
            Outcome::Failed(why) => {
                tracing::error!(error = %why, "online scrub failed");
                (ScrubState::Failed, Some(why))
            }
        };
        let count = |f: fn(&Divergence) -> bool| p.divergences.iter().filter(|d| f(d)).count();
        let event = Event::ScrubCompleted {
            repair: p.repair,
            status: p.state.as_str().into(),
            scanned_bytes: p.done_bytes,
            divergent: p.divergences.len() as u64,
            repaired: count(|d| d.repaired) as u64,
            no_quorum: count(|d| !d.has_quorum) as u64,
        };
        // Under the state lock: whoever sees the event sees the final state,
        // and no new scrub starts in between.
        self.members.events.emit(event);
    }
}

/// The job thread: walk the disk step by step, each with a reference to the
/// disk taken for the step only.
fn run(disk: Weak<Disk>, shared: Arc<Shared>, repair: bool, rate: u64) {
    let size = disk.upgrade().map_or(0, |d| d.size);
    let mut walk = Walk {
        repair,
        rate,
        started: Instant::now(),
        alloc: AllocationWalk::new(0, size),
        checked: 0,
        reported: 0,
    };
    loop {
        let stop = shared.pause_until(walk.due());
        let Some(d) = disk.upgrade() else {
            // Dropped without a close that could wait for us: nobody is
            // left to tell but the progress.
            let mut st = shared.state.lock();
            st.progress.state = ScrubState::Failed;
            st.progress.error = Some("the disk closed".into());
            return;
        };
        let outcome = match stop {
            Some(Stop::Cancel) => Outcome::Cancelled,
            Some(Stop::Close) => Outcome::Failed("the disk closed".into()),
            None if walk.alloc.offset() >= d.size => Outcome::Completed,
            None => match d.scrub_step(&shared, &mut walk) {
                Ok(true) => continue,
                Ok(false) => Outcome::Completed,
                Err(why) => Outcome::Failed(why),
            },
        };
        d.finish_scrub(&shared, &walk, outcome);
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn div(offset: u64, length: u64, bad: u64) -> Divergence {
        Divergence {
            offset,
            length,
            bad,
            failed: 0,
            has_quorum: true,
            repaired: false,
        }
    }

    #[test]
    fn adjacent_ranges_with_the_same_outcome_merge() {
        let mut l = Vec::new();
        div(0, 4096, 1).merge_into(&mut l);
        div(4096, 4096, 1).merge_into(&mut l);
        div(8192, 4096, 2).merge_into(&mut l);
        div(16384, 4096, 2).merge_into(&mut l);
        assert_eq!(
            l,
            vec![div(0, 8192, 1), div(8192, 4096, 2), div(16384, 4096, 2)]
        );
    }

    #[test]
    fn throttled_walk_is_due_when_its_bytes_are() {
        let started = Instant::now();
        let mut w = Walk {
            repair: false,
            rate: 1 << 20,
            started,
            alloc: AllocationWalk::new(0, 0),
            checked: 0,
            reported: 0,
        };
        assert_eq!(w.due(), started);
        w.checked = 3 << 19;
        assert_eq!(w.due(), started + Duration::from_millis(1500));
        w.rate = 0;
        assert_eq!(w.due(), started);
    }
}
