//! Disk-wide request counters: what the disk's clients asked (reads,
//! writes, flushes), measured at the [`Disk`] API, with their latency.
//! Per-replica counters (what the disk asked of each replica) are in
//! [`crate::ReplicaStats`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use super::{Disk, IoError};
use crate::events::{Counters, Latency, OpLatencies, OpType};

/// Disk-wide request counters: what the disk's clients asked.
///
/// Every request made through [`Disk::read`], [`Disk::read_with_region`],
/// [`Disk::write`], [`Disk::write_zeroes`], [`Disk::discard`] and
/// [`Disk::flush`] is counted once, failed or not, and timed from the call
/// to its return (range lock waits included). Scrub, resync and shutdown
/// flushes are not client requests and are not counted here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiskStats {
    /// Reads.
    pub reads: u64,
    /// Bytes read (by reads that succeeded).
    pub read_bytes: u64,
    /// Writes, write-zeroes and discards.
    pub writes: u64,
    /// Bytes written (write-zeroes and discards count their length; only
    /// requests that succeeded).
    pub written_bytes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Requests that failed (no quorum, every replica failed, or refused:
    /// out of range, read-only); also counted in `reads`, `writes` or
    /// `flushes`.
    pub failed: u64,
    /// Read latency (every read, failed or not: `count == reads`).
    pub read_latency: Latency,
    /// Write latency (`count == writes`).
    pub write_latency: Latency,
    /// Flush latency (`count == flushes`).
    pub flush_latency: Latency,
}

/// The live counters behind [`DiskStats`]: atomics only. The request
/// counts are the latency histograms' counts.
#[derive(Debug, Default)]
pub(super) struct DiskCounters {
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    failed: AtomicU64,
    ops: OpLatencies,
}

impl DiskCounters {
    /// Count one request of `op` on `len` bytes that started at `start`
    /// and ended with `result`.
    pub(super) fn done<T>(
        &self,
        op: OpType,
        len: u64,
        start: Instant,
        result: &Result<T, IoError>,
    ) {
        self.ops.record(op, start.elapsed());
        let bytes = match op {
            OpType::Read => Some(&self.read_bytes),
            OpType::Write => Some(&self.written_bytes),
            OpType::Flush => None,
        };
        match (result, bytes) {
            (Err(_), _) => Counters::add(&self.failed, 1),
            (Ok(_), Some(b)) => Counters::add(b, len),
            (Ok(_), None) => {}
        }
    }

    fn snapshot(&self) -> DiskStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let [read_latency, write_latency, flush_latency] = self.ops.snapshot();
        DiskStats {
            reads: read_latency.count,
            read_bytes: g(&self.read_bytes),
            writes: write_latency.count,
            written_bytes: g(&self.written_bytes),
            flushes: flush_latency.count,
            failed: g(&self.failed),
            read_latency,
            write_latency,
            flush_latency,
        }
    }
}

impl Disk {
    /// Disk-wide request counters (a snapshot; see [`DiskStats`]).
    pub fn disk_stats(&self) -> DiskStats {
        self.requests.snapshot()
    }
}
