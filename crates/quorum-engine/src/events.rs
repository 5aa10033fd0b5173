//! Quorum events (QEMU's QMP names and fields) and exact per-replica counters.
//!
//! Every event reaches every subscriber, unmerged. The log is another
//! matter: a replica that fails every request would write a line per
//! request, so [`EventBus`] logs the first event of each kind, replica and
//! error, then one summary line per [`LOG_WINDOW`] with how many more there
//! were, and the rest when the disk closes. Replica state changes are
//! always logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quorum_replica::{ErrorKind, ReplicaError};
use serde::Serialize;

/// Which operation an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    /// A read.
    Read,
    /// A write, write-zeroes or discard.
    Write,
    /// A flush.
    Flush,
}

impl OpType {
    /// QEMU's name for it (`read`, `write`, `flush`).
    pub fn as_str(self) -> &'static str {
        match self {
            OpType::Read => "read",
            OpType::Write => "write",
            OpType::Flush => "flush",
        }
    }
}

/// An event, serialised as QEMU's QMP events are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", content = "data")]
pub enum Event {
    /// One replica failed or was voted out.
    #[serde(rename = "QUORUM_REPORT_BAD")]
    ReportBad {
        /// The operation.
        #[serde(rename = "type")]
        op: OpType,
        /// The I/O error, absent when the replica was voted out.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// The replica's node name.
        #[serde(rename = "node-name")]
        node_name: String,
        /// First 512-byte sector.
        #[serde(rename = "sector-num")]
        sector_num: u64,
        /// Sectors covered.
        #[serde(rename = "sectors-count")]
        sectors_count: u64,
    },
    /// The request could not reach quorum and failed.
    #[serde(rename = "QUORUM_FAILURE")]
    Failure {
        /// The disk's id.
        reference: String,
        /// First 512-byte sector.
        #[serde(rename = "sector-num")]
        sector_num: u64,
        /// Sectors covered.
        #[serde(rename = "sectors-count")]
        sectors_count: u64,
    },
    /// A replica changed state (failed, or answered again).
    #[serde(rename = "QUORUM_REPLICA_STATE")]
    ReplicaState {
        /// The replica's node name.
        #[serde(rename = "node-name")]
        node_name: String,
        /// State before.
        old: String,
        /// State now.
        new: String,
        /// Why.
        reason: String,
    },
    /// A replica's resync (or full rebuild) finished: it is in-sync again.
    #[serde(rename = "QUORUM_RESYNC_COMPLETED")]
    ResyncCompleted {
        /// The replica's node name.
        #[serde(rename = "node-name")]
        node_name: String,
        /// Bytes copied to it by this resync.
        bytes: u64,
    },
    /// An online scrub ended (finished, cancelled, or stopped by an error).
    #[serde(rename = "QUORUM_SCRUB_COMPLETED")]
    ScrubCompleted {
        /// Whether minority blocks were rewritten.
        repair: bool,
        /// `completed`, `cancelled` or `failed`.
        status: String,
        /// Bytes of the disk scanned.
        #[serde(rename = "scanned-bytes")]
        scanned_bytes: u64,
        /// Divergent ranges found.
        divergent: u64,
        /// Of those, ranges repaired.
        repaired: u64,
        /// Of those, ranges without a majority (never repaired).
        #[serde(rename = "no-quorum")]
        no_quorum: u64,
    },
    /// blkverify found the two replicas different; the read failed.
    #[serde(rename = "QUORUM_BLKVERIFY_MISMATCH")]
    BlkverifyMismatch {
        /// The disk's id.
        reference: String,
        /// Absolute offset of the first differing byte.
        offset: u64,
        /// First 512-byte sector of the request.
        #[serde(rename = "sector-num")]
        sector_num: u64,
        /// Sectors the request covered.
        #[serde(rename = "sectors-count")]
        sectors_count: u64,
    },
}

/// `(sector-num, sectors-count)` of a byte range, as QEMU computes them.
pub fn sectors(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / 512;
    let end = (offset + len).div_ceil(512);
    (first, end - first)
}

/// At most one log line per kind of event, replica and error per window.
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

impl Event {
    /// What events are summarised together in the log: kind, replica (or
    /// disk), operation and error.
    fn log_key(&self) -> Option<String> {
        match self {
            Event::ReportBad {
                op,
                error,
                node_name,
                ..
            } => Some(format!(
                "QUORUM_REPORT_BAD {node_name} {} {}",
                op.as_str(),
                error.as_deref().unwrap_or("voted out")
            )),
            Event::Failure { reference, .. } => Some(format!("QUORUM_FAILURE {reference}")),
            Event::BlkverifyMismatch { reference, .. } => {
                Some(format!("QUORUM_BLKVERIFY_MISMATCH {reference}"))
            }
            Event::ReplicaState { .. }
            | Event::ResyncCompleted { .. }
            | Event::ScrubCompleted { .. } => None,
        }
    }

    /// Log the event as one structured `tracing` line.
    pub fn log(&self) {
        match self {
            Event::ReplicaState {
                node_name,
                old,
                new,
                reason,
            } => {
                if new == "failed" {
                    tracing::warn!(
                        event = "QUORUM_REPLICA_STATE",
                        node_name = %node_name,
                        old = %old,
                        new = %new,
                        "replica {node_name} is {new}: {reason}; requests no longer wait for it, retrying in the background"
                    );
                } else if old == "failed" {
                    tracing::info!(
                        event = "QUORUM_REPLICA_STATE",
                        node_name = %node_name,
                        old = %old,
                        new = %new,
                        "replica {node_name} is {new} again (was {old}): {reason}"
                    );
                } else {
                    tracing::info!(
                        event = "QUORUM_REPLICA_STATE",
                        node_name = %node_name,
                        old = %old,
                        new = %new,
                        "replica {node_name} is {new} (was {old}): {reason}"
                    );
                }
            }
            Event::ReportBad {
                op,
                error,
                node_name,
                sector_num,
                sectors_count,
            } => {
                tracing::warn!(
                    event = "QUORUM_REPORT_BAD",
                    r#type = op.as_str(),
                    error = error.as_deref().unwrap_or(""),
                    node_name = %node_name,
                    sector_num,
                    sectors_count,
                    "replica reported bad"
                );
            }
            Event::Failure {
                reference,
                sector_num,
                sectors_count,
            } => {
                tracing::error!(
                    event = "QUORUM_FAILURE",
                    reference = %reference,
                    sector_num,
                    sectors_count,
                    "no quorum"
                );
            }
            Event::ResyncCompleted { node_name, bytes } => {
                tracing::info!(
                    event = "QUORUM_RESYNC_COMPLETED",
                    node_name = %node_name,
                    bytes,
                    // Worded as before the event existed: scripts and the
                    // bench look for it.
                    "resync of {node_name} completed: {bytes} bytes copied"
                );
            }
            Event::ScrubCompleted {
                repair,
                status,
                scanned_bytes,
                divergent,
                repaired,
                no_quorum,
            } => {
                tracing::info!(
                    event = "QUORUM_SCRUB_COMPLETED",
                    repair,
                    status = %status,
                    scanned_bytes,
                    divergent,
                    repaired,
                    no_quorum,
                    "scrub {status}: {divergent} divergent range(s), {repaired} repaired, {no_quorum} without quorum"
                );
            }
            Event::BlkverifyMismatch {
                reference,
                offset,
                sector_num,
                sectors_count,
            } => {
                tracing::error!(
                    event = "QUORUM_BLKVERIFY_MISMATCH",
                    reference = %reference,
                    offset,
                    sector_num,
                    sectors_count,
                    "blkverify mismatch"
                );
            }
        }
    }
}

/// Delivers events to every live subscriber; never drops or merges events.
/// Logs them rate-limited (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct EventBus {
    subscribers: Mutex<Vec<mpsc::Sender<Event>>>,
    limiter: Mutex<LogLimiter>,
}

/// Per log key: when its window opened and how many events it swallowed.
#[derive(Debug, Default)]
struct LogLimiter {
    windows: HashMap<String, (Instant, u64)>,
}

impl LogLimiter {
    /// True if `key`'s event is to be logged in full; otherwise counts it.
    /// Logs the summary of a window that has ended.
    fn admit(&mut self, key: String, now: Instant) -> bool {
        match self.windows.get_mut(&key) {
            None => {
                self.windows.insert(key, (now, 0));
                true
            }
            Some((start, n)) if now.duration_since(*start) < LOG_WINDOW => {
                *n += 1;
                false
            }
            Some((start, n)) => {
                summarise(&key, *n, now.duration_since(*start));
                *start = now;
                *n = 0;
                true
            }
        }
    }

    /// Log every pending summary (the disk is closing).
    fn drain(&mut self, now: Instant) {
        for (key, (start, n)) in self.windows.drain() {
            summarise(&key, n, now.duration_since(start));
        }
    }
}

fn summarise(key: &str, n: u64, over: Duration) {
    if n > 0 {
        tracing::warn!(
            repeated = n,
            "{n} more {key} in the last {:.0} s (not logged one by one; counters and subscribers have them all)",
            over.as_secs_f64()
        );
    }
}

impl EventBus {
    pub(crate) fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.subscribers.lock().push(tx);
        rx
    }

    pub(crate) fn emit(&self, event: Event) {
        let logged = match event.log_key() {
            Some(key) => self.limiter.lock().admit(key, Instant::now()),
            None => true,
        };
        if logged {
            event.log();
        }
        let mut subs = self.subscribers.lock();
        if subs.is_empty() {
            return;
        }
        subs.retain(|s| s.send(event.clone()).is_ok());
    }

    /// Log the summaries still pending.
    pub(crate) fn flush_log(&self) {
        self.limiter.lock().drain(Instant::now());
    }
}

/// Exact counters of one replica.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) read_errors: AtomicU64,
    pub(crate) write_errors: AtomicU64,
    pub(crate) flush_errors: AtomicU64,
    pub(crate) voted_out_bytes: AtomicU64,
    pub(crate) voted_out_reads: AtomicU64,
    pub(crate) rewrites: AtomicU64,
    pub(crate) rewritten_bytes: AtomicU64,
    pub(crate) rewrite_errors: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    /// Reads, writes and flushes asked of it, and their latency.
    pub(crate) ops: OpLatencies,
}

/// Upper bounds (nanoseconds) of the latency histogram buckets: powers of
/// two from 1 us to about 8.6 s; a last, unbounded bucket follows.
pub const LATENCY_BOUNDS_NS: [u64; 24] = {
    let mut b = [0u64; 24];
    let mut i = 0;
    while i < 24 {
        b[i] = 1024 << i;
        i += 1;
    }
    b
};

/// The bucket of a latency: the first whose bound is at least `ns`, or the
/// last (overflow) bucket.
pub(crate) fn latency_bucket(ns: u64) -> usize {
    // Bounds are 1024 << i: bucket i holds (512 << i, 1024 << i].
    let bits = (u64::BITS - ns.saturating_sub(1).leading_zeros()) as usize;
    bits.saturating_sub(10).min(LATENCY_BOUNDS_NS.len())
}

/// A latency histogram being counted: atomics only, so the request path
/// never takes a lock to record a latency.
#[derive(Debug, Default)]
pub(crate) struct LatencyCounter {
    count: AtomicU64,
    sum_ns: AtomicU64,
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
}

impl LatencyCounter {
    /// Count one operation that took `d`.
    pub(crate) fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[latency_bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// What has been counted so far. Taken without a lock, so a snapshot
    /// racing with requests may count one in `buckets` and not yet in
    /// `count`; each figure is exact once the requests have returned.
    pub(crate) fn snapshot(&self) -> Latency {
        Latency {
            count: self.count.load(Ordering::Relaxed),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// One latency histogram per operation. A histogram's count is the
/// number of operations of its kind: nothing else counts them.
#[derive(Debug, Default)]
pub(crate) struct OpLatencies {
    read: LatencyCounter,
    write: LatencyCounter,
    flush: LatencyCounter,
}

impl OpLatencies {
    /// Count one `op` that took `d`.
    pub(crate) fn record(&self, op: OpType, d: Duration) {
        match op {
            OpType::Read => &self.read,
            OpType::Write => &self.write,
            OpType::Flush => &self.flush,
        }
        .record(d);
    }

    /// Read, write and flush histograms, as counted so far.
    pub(crate) fn snapshot(&self) -> [Latency; 3] {
        [
            self.read.snapshot(),
            self.write.snapshot(),
            self.flush.snapshot(),
        ]
    }
}

/// A latency histogram, as counted so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Operations timed.
    pub count: u64,
    /// Sum of their latencies, in nanoseconds.
    pub sum_ns: u64,
    /// Operations per bucket (not cumulative): `LATENCY_BOUNDS_NS.len() + 1`
    /// entries, the last for latencies above every bound.
    pub buckets: Vec<u64>,
}

impl Latency {
    /// Mean latency in nanoseconds (`None` before the first operation).
    pub fn mean_ns(&self) -> Option<u64> {
        (self.count > 0).then(|| self.sum_ns / self.count)
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), in
    /// nanoseconds: an upper estimate, at most twice the true value.
    /// `None` before the first operation; `u64::MAX` for the last bucket.
    pub fn quantile_ns(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BOUNDS_NS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// A snapshot of one replica's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplicaStats {
    /// The replica's node name.
    pub node_name: String,
    /// Reads that failed with an I/O error.
    pub read_errors: u64,
    /// Writes, write-zeroes and discards that failed.
    pub write_errors: u64,
    /// Flushes that failed.
    pub flush_errors: u64,
    /// Reads in which this replica was voted out.
    pub voted_out_reads: u64,
    /// Bytes in which this replica was voted out.
    pub voted_out_bytes: u64,
    /// Rewrites of voted-out ranges (rewrite-corrupted or repair).
    pub rewrites: u64,
    /// Bytes rewritten.
    pub rewritten_bytes: u64,
    /// Rewrites that failed.
    pub rewrite_errors: u64,
    /// Requests that went without this replica because it was failed.
    pub skipped: u64,
    /// Reads asked of this replica (guest reads, scrub reads), whether
    /// they succeeded or not; requests that went without it are not
    /// counted here but in `skipped`.
    pub reads: u64,
    /// Writes, write-zeroes and discards asked of it, including the
    /// rewrites of voted-out ranges (also counted in `rewrites`).
    pub writes: u64,
    /// Flushes asked of it.
    pub flushes: u64,
    /// Requests that failed on it with ETIMEDOUT (any operation).
    pub timeouts: u64,
    /// Latency of its reads.
    pub read_latency: Latency,
    /// Latency of its writes, write-zeroes and discards.
    pub write_latency: Latency,
    /// Latency of its flushes.
    pub flush_latency: Latency,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Make one call to the replica, counting it as `op` (`None`: block
    /// status, counted only if it times out) and timing it.
    ///
    /// Two clock reads and three relaxed atomic adds: cheap enough to wrap
    /// every replica call the disk makes.
    pub(crate) fn timed<T>(
        &self,
        op: Option<OpType>,
        call: impl FnOnce() -> Result<T, ReplicaError>,
    ) -> Result<T, ReplicaError> {
        let Some(op) = op else {
            let r = call();
            self.note_timeout(&r);
            return r;
        };
        let start = Instant::now();
        let r = call();
        self.ops.record(op, start.elapsed());
        self.note_timeout(&r);
        r
    }

    fn note_timeout<T>(&self, r: &Result<T, ReplicaError>) {
        if let Err(e) = r
            && e.kind == ErrorKind::Io(libc::ETIMEDOUT)
        {
            Counters::add(&self.timeouts, 1);
        }
    }

    pub(crate) fn snapshot(&self, node_name: &str) -> ReplicaStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let [read_latency, write_latency, flush_latency] = self.ops.snapshot();
        ReplicaStats {
            node_name: node_name.to_owned(),
            read_errors: g(&self.read_errors),
            write_errors: g(&self.write_errors),
            flush_errors: g(&self.flush_errors),
            voted_out_reads: g(&self.voted_out_reads),
            voted_out_bytes: g(&self.voted_out_bytes),
            rewrites: g(&self.rewrites),
            rewritten_bytes: g(&self.rewritten_bytes),
            rewrite_errors: g(&self.rewrite_errors),
            skipped: g(&self.skipped),
            reads: read_latency.count,
            writes: write_latency.count,
            flushes: flush_latency.count,
            timeouts: g(&self.timeouts),
            read_latency,
            write_latency,
            flush_latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_logs_the_first_event_then_one_per_window() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        let key = || "QUORUM_REPORT_BAD replica-1 read EIO".to_owned();
        let admitted: Vec<bool> = [0, 1, 2, 9_999, 10_000, 10_001]
            .iter()
            .map(|ms| l.admit(key(), t0 + Duration::from_millis(*ms)))
            .collect();
        assert_eq!(admitted, vec![true, false, false, false, true, false]);
    }

    #[test]
    fn limiter_keeps_keys_apart() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(
            (
                l.admit("a".into(), t0),
                l.admit("b".into(), t0),
                l.admit("a".into(), t0)
            ),
            (true, true, false)
        );
    }

    #[test]
    fn limiter_counts_what_it_swallowed_until_drained() {
        let mut l = LogLimiter::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            l.admit("a".into(), t0);
        }
        assert_eq!(l.windows.get("a").map(|w| w.1), Some(4));
        l.drain(t0);
        assert!(l.windows.is_empty());
    }

    #[test]
    fn latency_buckets_follow_the_bounds() {
        // Every bound falls in its own bucket, one nanosecond more in the next.
        for (i, b) in LATENCY_BOUNDS_NS.iter().enumerate() {
            assert_eq!((latency_bucket(*b), latency_bucket(b + 1)), (i, i + 1));
        }
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BOUNDS_NS.len());
    }

    #[test]
    fn latency_counter_counts_sums_and_buckets() {
        let c = LatencyCounter::default();
        for us in [1, 3, 3, 100] {
            c.record(Duration::from_micros(us));
        }
        c.record(Duration::from_secs(100));
        let l = c.snapshot();
        let mut want = vec![0; LATENCY_BOUNDS_NS.len() + 1];
        want[0] = 1; // 1000 ns <= 1024
        want[2] = 2; // 3000 ns in (2048, 4096]
        want[7] = 1; // 100 us in (65536, 131072]
        want[LATENCY_BOUNDS_NS.len()] = 1;
        assert_eq!(
            (l.count, l.sum_ns, l.buckets),
            (5, 107_000 + 100_000_000_000, want)
        );
    }

    #[test]
    fn timed_counts_the_call_its_latency_and_timeouts() {
        let c = Counters::default();
        let timeout = || {
            Err::<(), _>(ReplicaError::new(
                ErrorKind::Io(libc::ETIMEDOUT),
                "read",
                "timed out",
            ))
        };
        c.timed(Some(OpType::Read), || Ok(())).unwrap();
        c.timed(Some(OpType::Read), timeout).unwrap_err();
        c.timed(Some(OpType::Flush), || Ok(())).unwrap();
        c.timed(None, timeout).unwrap_err();
        let s = c.snapshot("r");
        assert_eq!(
            (
                s.reads,
                s.writes,
                s.flushes,
                s.timeouts,
                s.read_latency.count,
                s.flush_latency.count
            ),
            (2, 0, 1, 2, 2, 1)
        );
    }

    #[test]
    fn state_changes_are_never_rate_limited() {
        let e = Event::ReplicaState {
            node_name: "replica-1".into(),
            old: "in-sync".into(),
            new: "failed".into(),
            reason: "timed out".into(),
        };
        assert_eq!(e.log_key(), None);
    }
}
