//! Quorum events (QEMU's QMP names and fields) and exact per-replica counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use parking_lot::Mutex;
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

impl Event {
    /// Log the event as one structured `tracing` line.
    pub fn log(&self) {
        match self {
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
#[derive(Debug, Default)]
pub(crate) struct EventBus {
    subscribers: Mutex<Vec<mpsc::Sender<Event>>>,
}

impl EventBus {
    pub(crate) fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.subscribers.lock().push(tx);
        rx
    }

    pub(crate) fn emit(&self, event: Event) {
        event.log();
        let mut subs = self.subscribers.lock();
        if subs.is_empty() {
            return;
        }
        subs.retain(|s| s.send(event.clone()).is_ok());
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
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, node_name: &str) -> ReplicaStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
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
        }
    }
}
