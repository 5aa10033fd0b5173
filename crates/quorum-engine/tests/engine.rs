//! Engine semantics against in-memory replicas with injected faults.
//! Scenarios follow QEMU's iotest 081 and the recorded reference runs in
//! shared/reference/qemu-quorum.

mod common;

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use common::{disk, named, with_threshold};
use quorum_engine::{BuildError, Disk, Event, Granularity, OpType, Options, ReadPattern};
use quorum_replica::Replica;
use quorum_replica::testing::{FaultPlan, FaultyReplica, MemReplica, Op};

const SIZE: u64 = 1 << 20;
/// Every replica's content before a test touches it.
const FILL: u8 = 0x5a;
const EIO: i32 = libc::EIO;
const ENOSPC: i32 = libc::ENOSPC;

struct Harness {
    disk: Arc<Disk>,
    mems: Vec<Arc<MemReplica>>,
    plans: Vec<FaultPlan>,
    events: Receiver<Event>,
}

impl Harness {
    /// `n` replicas filled with `FILL`, each behind its own fault plan.
    fn new(n: usize, opts: Options) -> Harness {
        let mems: Vec<Arc<MemReplica>> = (0..n)
            .map(|_| Arc::new(MemReplica::with_data(&vec![FILL; SIZE as usize])))
            .collect();
        let plans: Vec<FaultPlan> = (0..n).map(|_| FaultPlan::new()).collect();
        let replicas = mems
            .iter()
            .zip(&plans)
            .enumerate()
            .map(|(i, (m, p))| {
                let inner: Arc<dyn Replica> = m.clone();
                named(
                    format!("img{}", i + 1),
                    FaultyReplica::with_plan(inner, p.clone()),
                )
            })
            .collect();
        let disk = Arc::new(Disk::new(replicas, opts).unwrap());
        let events = disk.subscribe();
        Harness {
            disk,
            mems,
            plans,
            events,
        }
    }

    /// `n` replicas voting with `threshold`, other options default.
    fn quorum(n: usize, threshold: usize) -> Harness {
        Harness::new(n, with_threshold(threshold))
    }

    /// Three replicas at threshold 2 that rewrite the copies losing a vote.
    fn rewriting() -> Harness {
        Harness::new(
            3,
            Options {
                rewrite_corrupted: true,
                ..with_threshold(2)
            },
        )
    }

    /// Three replicas read in order (no vote) with `threshold`.
    fn fifo(threshold: usize) -> Harness {
        Harness::new(
            3,
            Options {
                read_pattern: ReadPattern::Fifo,
                ..with_threshold(threshold)
            },
        )
    }

    /// Two replicas compared by blkverify at threshold 2.
    fn blkverify() -> Harness {
        Harness::new(
            2,
            Options {
                blkverify: true,
                ..with_threshold(2)
            },
        )
    }

    /// Write `byte` straight into replica `i`, behind the engine's back.
    fn corrupt(&self, i: usize, offset: u64, len: usize, byte: u8) {
        self.mems[i]
            .write_at(&vec![byte; len], offset, false)
            .unwrap();
    }

    /// Make every `op` on `range` fail on each listed replica with its errno.
    fn fail(&self, op: Op, range: Range<u64>, errnos: &[(usize, i32)]) {
        for &(i, errno) in errnos {
            self.plans[i].fail(op, range.clone(), errno);
        }
    }

    /// Replica `i`'s bytes, read behind the engine's back.
    fn replica_bytes(&self, i: usize, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mems[i].read_at(&mut b, offset).unwrap();
        b
    }

    /// Every replica's bytes at the same range.
    fn copies(&self, offset: u64, len: usize) -> Vec<Vec<u8>> {
        (0..self.mems.len())
            .map(|i| self.replica_bytes(i, offset, len))
            .collect()
    }

    /// Read through the engine: the voted bytes, or the errno.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let mut b = vec![0; len];
        self.disk
            .read(offset, &mut b)
            .map(|()| b)
            .map_err(|e| e.errno)
    }

    /// Write through the engine without FUA, returning the errno on failure.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), i32> {
        self.disk.write(offset, data, false).map_err(|e| e.errno)
    }

    /// Flush through the engine, returning the errno on failure.
    fn flush(&self) -> Result<(), i32> {
        self.disk.flush().map_err(|e| e.errno)
    }

    /// The events raised since the last call.
    fn events(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    /// Checks that an engine read of `len` bytes at `offset` returns `byte` throughout.
    #[track_caller]
    fn assert_reads_back(&self, offset: u64, len: usize, byte: u8) {
        assert_eq!(self.read(offset, len), Ok(vec![byte; len]));
    }

    /// Checks that replica `i` holds `byte` throughout `len` bytes at `offset`.
    #[track_caller]
    fn assert_replica_holds(&self, i: usize, offset: u64, len: usize, byte: u8) {
        assert_eq!(self.replica_bytes(i, offset, len), vec![byte; len]);
    }
}

/// A `QUORUM_REPORT_BAD` event.
fn bad(op: OpType, error: Option<&str>, node: &str, sector_num: u64, sectors_count: u64) -> Event {
    Event::ReportBad {
        op,
        error: error.map(str::to_owned),
        node_name: node.into(),
        sector_num,
        sectors_count,
    }
}

/// A `QUORUM_REPORT_BAD` event for an EIO on `node`.
fn io_error(op: OpType, node: &str, sector_num: u64, sectors_count: u64) -> Event {
    bad(
        op,
        Some("Input/output error"),
        node,
        sector_num,
        sectors_count,
    )
}

/// A `QUORUM_FAILURE` event from the default disk id.
fn failure(sector_num: u64, sectors_count: u64) -> Event {
    Event::Failure {
        reference: "quorum0".into(),
        sector_num,
        sectors_count,
    }
}

/// A blkverify mismatch event from the default disk id, first differing at `offset`.
fn mismatch(offset: u64, sector_num: u64, sectors_count: u64) -> Event {
    Event::BlkverifyMismatch {
        reference: "quorum0".into(),
        offset,
        sector_num,
        sectors_count,
    }
}

#[test]
fn read_with_one_corrupt_replica_returns_majority() {
    let h = Harness::quorum(3, 2);
    h.corrupt(1, 0, SIZE as usize, 0x42);
    h.assert_reads_back(0, 65536, FILL);
}

#[test]
fn voted_out_replica_raises_report_bad_without_error() {
    let h = Harness::quorum(3, 2);
    h.corrupt(1, 0, 65536, 0x11);
    h.read(0, 65536).unwrap();
    assert_eq!(h.events(), vec![bad(OpType::Read, None, "img2", 0, 128)]);
}

#[test]
fn read_with_two_differently_corrupt_replicas_fails_with_eio() {
    let h = Harness::quorum(3, 2);
    h.corrupt(0, 0, 4096, 0x41);
    h.corrupt(1, 0, 4096, 0x42);
    assert_eq!(h.read(0, 4096), Err(EIO));
}

#[test]
fn failed_vote_raises_quorum_failure() {
    let h = Harness::quorum(3, 2);
    h.corrupt(0, 0, 4096, 0x41);
    h.corrupt(1, 0, 4096, 0x42);
    let _ = h.read(1000, 100);
    assert_eq!(h.events(), vec![failure(1, 2)]);
}

#[test]
fn threshold_three_fails_where_one_replica_differs() {
    let h = Harness::quorum(3, 3);
    h.corrupt(1, 0, 65536, 0x11);
    assert_eq!(h.read(0, SIZE as usize), Err(EIO));
}

#[test]
fn threshold_three_reads_region_where_all_agree() {
    let h = Harness::quorum(3, 3);
    h.corrupt(1, 0, 65536, 0x11);
    assert!(h.read(65536, 983040).is_ok());
}

#[test]
fn scattered_corruption_succeeds_with_per_block_vote() {
    let h = Harness::quorum(3, 2);
    h.corrupt(0, 0, 4096, 0x01);
    h.corrupt(1, 512 << 10, 4096, 0x02);
    h.assert_reads_back(0, SIZE as usize, FILL);
}

#[test]
fn scattered_corruption_fails_with_whole_request_vote_like_qemu() {
    let h = Harness::new(
        3,
        Options {
            granularity: Granularity::Request,
            ..with_threshold(2)
        },
    );
    h.corrupt(0, 0, 4096, 0x01);
    h.corrupt(1, 512 << 10, 4096, 0x02);
    assert_eq!(h.read(0, SIZE as usize), Err(EIO));
}

#[test]
fn tie_at_threshold_one_returns_highest_replica() {
    let h = Harness::quorum(3, 1);
    h.corrupt(0, SIZE - 4096, 4096, 0xaa);
    h.corrupt(1, SIZE - 4096, 4096, 0xbb);
    h.corrupt(2, SIZE - 4096, 4096, 0xcc);
    h.assert_reads_back(SIZE - 4096, 4096, 0xcc);
}

#[test]
fn rewrite_corrupted_repairs_the_losing_replica() {
    let h = Harness::rewriting();
    h.corrupt(1, 0, SIZE as usize, 0x42);
    h.read(0, SIZE as usize).unwrap();
    h.assert_replica_holds(1, 0, SIZE as usize, FILL);
}

#[test]
fn rewrite_corrupted_touches_only_the_request_range() {
    let h = Harness::rewriting();
    h.corrupt(0, 0, 8192, 0x11);
    h.read(0, 4096).unwrap();
    assert_eq!(
        h.replica_bytes(0, 0, 8192),
        [vec![FILL; 4096], vec![0x11; 4096]].concat()
    );
}

#[test]
fn rewrite_corrupted_repairs_exactly_the_losing_blocks() {
    let h = Harness::rewriting();
    h.corrupt(2, 8192, 16, 0x11);
    h.read(0, 65536).unwrap();
    assert_eq!(h.plans[2].calls(Op::Write), 1);
}

#[test]
fn rewrite_corrupted_never_rewrites_without_quorum() {
    let h = Harness::rewriting();
    h.corrupt(0, 0, 4096, 0x11);
    h.corrupt(1, 0, 4096, 0x22);
    let _ = h.read(0, 4096);
    assert_eq!(
        (h.replica_bytes(0, 0, 1), h.replica_bytes(1, 0, 1)),
        (vec![0x11], vec![0x22])
    );
}

#[test]
fn rewrite_corrupted_skips_replica_with_read_error() {
    let h = Harness::rewriting();
    h.corrupt(0, 0, 4096, 0x11);
    h.fail(Op::Read, 0..4096, &[(0, EIO)]);
    h.read(0, 4096).unwrap();
    h.assert_replica_holds(0, 0, 4096, 0x11);
}

#[test]
fn read_error_on_one_replica_is_reported_and_read_succeeds() {
    let h = Harness::quorum(3, 2);
    h.fail(Op::Read, 786432..790528, &[(2, EIO)]);
    h.read(786432, 4096).unwrap();
    assert_eq!(h.events(), vec![io_error(OpType::Read, "img3", 1536, 8)]);
}

#[test]
fn read_errors_below_threshold_fail_with_majority_errno() {
    let h = Harness::quorum(3, 1);
    h.fail(Op::Read, 0..SIZE, &[(0, ENOSPC), (1, EIO), (2, ENOSPC)]);
    assert_eq!(h.read(0, 65536), Err(ENOSPC));
}

#[test]
fn read_errno_tie_goes_to_highest_replica() {
    let h = Harness::quorum(3, 3);
    h.fail(Op::Read, 0..SIZE, &[(0, EIO), (1, ENOSPC)]);
    assert_eq!(h.read(0, 65536), Err(ENOSPC));
}

#[test]
fn two_reads_that_disagree_after_an_error_fail_at_threshold_two() {
    let h = Harness::quorum(3, 2);
    h.corrupt(2, 0, 65536, 0x11);
    h.fail(Op::Read, 0..SIZE, &[(0, EIO)]);
    assert_eq!(h.read(0, 65536), Err(EIO));
}

#[test]
fn write_with_one_failing_replica_succeeds_and_reports() {
    let h = Harness::quorum(3, 2);
    h.fail(Op::Write, 0..SIZE, &[(1, EIO)]);
    h.write(524288, &[0x33; 4096]).unwrap();
    assert_eq!(h.events(), vec![io_error(OpType::Write, "img2", 1024, 8)]);
}

#[test]
fn write_below_threshold_fails_with_majority_errno_and_keeps_data() {
    let h = Harness::quorum(3, 1);
    h.fail(Op::Write, 0..SIZE, &[(0, ENOSPC), (1, ENOSPC), (2, EIO)]);
    assert_eq!(h.write(0, &[1; 4096]), Err(ENOSPC));
}

#[test]
fn failed_write_is_not_rolled_back() {
    let h = Harness::quorum(3, 2);
    h.fail(Op::Write, 0..SIZE, &[(0, EIO), (1, EIO)]);
    let _ = h.write(0, &[0x66; 4096]);
    h.assert_replica_holds(2, 0, 4096, 0x66);
}

#[test]
fn flush_succeeds_at_threshold() {
    let h = Harness::quorum(3, 2);
    h.fail(Op::Flush, 0..1, &[(1, EIO)]);
    assert!(h.flush().is_ok());
}

#[test]
fn flush_below_threshold_fails() {
    let h = Harness::quorum(3, 2);
    h.fail(Op::Flush, 0..1, &[(0, EIO), (1, EIO)]);
    assert_eq!(h.flush(), Err(EIO));
}

#[test]
fn fifo_returns_replica_zero_without_voting() {
    let h = Harness::fifo(2);
    h.corrupt(0, 0, 4096, 0x11);
    h.assert_reads_back(0, 4096, 0x11);
}

#[test]
fn fifo_falls_back_to_next_replica_on_error() {
    let h = Harness::fifo(3);
    h.corrupt(0, 0, 4096, 0x11);
    h.fail(Op::Read, 0..SIZE, &[(0, EIO)]);
    h.assert_reads_back(0, 4096, FILL);
}

#[test]
fn fifo_with_every_replica_failing_returns_last_errno() {
    let h = Harness::fifo(1);
    h.fail(Op::Read, 0..SIZE, &[(0, EIO), (1, EIO), (2, ENOSPC)]);
    assert_eq!(h.read(0, 4096), Err(ENOSPC));
}

#[test]
fn blkverify_mismatch_fails_read_and_names_first_difference() {
    let h = Harness::blkverify();
    h.corrupt(1, 5000, 10, 0x11);
    let r = h.read(4096, 8192);
    assert_eq!((r, h.events()), (Err(EIO), vec![mismatch(5000, 8, 16)]));
}

#[test]
fn blkverify_with_equal_replicas_reads() {
    let h = Harness::blkverify();
    assert!(h.read(0, 65536).is_ok());
}

#[test]
fn blkverify_needs_two_replicas_and_threshold_two() {
    let mems = (0..3)
        .map(|i| named(format!("r{i}"), MemReplica::new(4096)))
        .collect();
    let r = Disk::new(
        mems,
        Options {
            blkverify: true,
            ..with_threshold(2)
        },
    );
    assert!(matches!(r, Err(BuildError::Invalid(_))));
}

#[test]
fn replicas_of_different_sizes_are_refused_naming_both() {
    let mems = vec![
        named("a", MemReplica::new(4096)),
        named("b", MemReplica::new(8192)),
    ];
    let e = disk(mems, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "replica b has size 8192 bytes, but replica a has 4096 bytes; all replicas must have the same size"
    );
}

#[test]
fn write_to_read_only_disk_is_eperm() {
    let h = Harness::new(
        3,
        Options {
            read_only: true,
            ..with_threshold(2)
        },
    );
    assert_eq!(h.write(0, &[1; 512]), Err(libc::EPERM));
}

#[test]
fn read_beyond_end_is_einval() {
    let h = Harness::quorum(3, 2);
    assert_eq!(h.read(SIZE - 512, 1024), Err(libc::EINVAL));
}

#[test]
fn discard_reads_back_zeroes_on_every_replica() {
    let h = Harness::quorum(3, 2);
    h.disk.discard(0, 65536).unwrap();
    assert_eq!(h.copies(0, 65536), vec![vec![0; 65536]; 3]);
}

#[test]
fn write_zeroes_reads_back_zeroes() {
    let h = Harness::quorum(3, 2);
    h.disk.write_zeroes(4096, 8192, false, false).unwrap();
    h.assert_reads_back(4096, 8192, 0);
}

#[test]
fn block_status_is_zero_only_where_every_replica_is_zero() {
    let mems: Vec<Arc<MemReplica>> = (0..3).map(|_| Arc::new(MemReplica::new(16384))).collect();
    mems[1].write_at(&[1; 4096], 4096, false).unwrap();
    let replicas = mems
        .iter()
        .enumerate()
        .map(|(i, m)| {
            named(
                format!("r{i}"),
                FaultyReplica::new(m.clone() as Arc<dyn Replica>),
            )
        })
        .collect();
    let disk = disk(replicas, 2).unwrap();
    let st: Vec<(u64, bool)> = disk
        .block_status(0, 16384)
        .unwrap()
        .iter()
        .map(|e| (e.length, e.zero))
        .collect();
    assert_eq!(st, vec![(4096, true), (4096, false), (8192, true)]);
}

#[test]
fn counters_count_every_voted_out_read() {
    let h = Harness::quorum(3, 2);
    h.corrupt(0, 0, 4096, 0x11);
    for _ in 0..5 {
        h.read(0, 4096).unwrap();
    }
    assert_eq!(h.disk.stats()[0].voted_out_reads, 5);
}

#[test]
fn scrub_reports_losing_replica_and_range() {
    let h = Harness::quorum(3, 2);
    h.corrupt(2, 8192, 100, 0x11);
    let d = h.disk.scrub(0, SIZE, false).unwrap();
    assert_eq!(
        d.iter()
            .map(|d| (d.offset, d.length, d.bad, d.has_quorum, d.repaired))
            .collect::<Vec<_>>(),
        vec![(8192, 4096, 0b100, true, false)]
    );
}

#[test]
fn scrub_repair_rewrites_minority_blocks() {
    let h = Harness::quorum(3, 2);
    h.corrupt(2, 8192, 100, 0x11);
    h.disk.scrub(0, SIZE, true).unwrap();
    h.assert_replica_holds(2, 8192, 100, FILL);
}

#[test]
fn scrub_never_repairs_blocks_without_quorum() {
    let h = Harness::quorum(3, 2);
    h.corrupt(0, 0, 4096, 0x11);
    h.corrupt(1, 0, 4096, 0x22);
    h.corrupt(2, 65536, 10, 0x33);
    let d = h.disk.scrub(0, SIZE, true).unwrap();
    let got: Vec<_> = d
        .iter()
        .map(|d| (d.offset, d.has_quorum, d.repaired))
        .collect();
    assert_eq!(
        (got, h.replica_bytes(0, 0, 1), h.replica_bytes(2, 65536, 1)),
        (
            vec![(0, false, false), (65536, true, true)],
            vec![0x11],
            vec![FILL]
        )
    );
}

#[test]
fn scrub_without_repair_reports_repairable_blocks_beside_a_block_without_quorum() {
    // One scrub step: block 0 has three versions, block 16 has a majority.
    let h = Harness::quorum(3, 2);
    h.corrupt(0, 0, 4096, 0x11);
    h.corrupt(1, 0, 4096, 0x22);
    h.corrupt(2, 65536, 10, 0x33);
    let d = h.disk.scrub(0, SIZE, false).unwrap();
    let got: Vec<_> = d
        .iter()
        .map(|d| (d.offset, d.length, d.bad, d.has_quorum, d.repaired))
        .collect();
    assert_eq!(
        (got, h.replica_bytes(2, 65536, 1)),
        (
            vec![
                (0, 4096, 0b111, false, false),
                (65536, 4096, 0b100, true, false)
            ],
            vec![0x33]
        )
    );
}

#[test]
fn concurrent_overlapping_writes_leave_replicas_identical() {
    let h = Harness::quorum(3, 3);
    h.plans[1].delay(Op::Write, 0..SIZE, std::time::Duration::from_micros(200));
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let disk = h.disk.clone();
            std::thread::spawn(move || {
                for k in 0..20u64 {
                    disk.write((k % 4) * 1024, &vec![t; 8192], false).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let copies = h.copies(0, 16384);
    assert!(copies[0] == copies[1] && copies[1] == copies[2]);
}

#[test]
fn fua_is_passed_to_every_replica_as_a_write() {
    let h = Harness::quorum(3, 2);
    h.disk.write(0, &[7; 4096], true).unwrap();
    let writes: Vec<u64> = h.plans.iter().map(|p| p.calls(Op::Write)).collect();
    assert_eq!(writes, vec![1, 1, 1]);
}
