//! Exact request counters and latency histograms: per replica (what the
//! disk asked of each) and disk-wide (what its clients asked).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{named, with_threshold};
use quorum_engine::{Disk, LATENCY_BOUNDS_NS, Latency, Options, ReadPattern, ReplicaStats};
use quorum_replica::Replica;
use quorum_replica::testing::{FaultPlan, FaultyReplica, MemReplica, Op};

const SIZE: u64 = 1 << 20;

struct Setup {
    disk: Disk,
    mems: Vec<Arc<MemReplica>>,
    plans: Vec<FaultPlan>,
}

fn setup(n: usize, opts: Options) -> Setup {
    let mems: Vec<Arc<MemReplica>> = (0..n)
        .map(|_| Arc::new(MemReplica::with_data(&vec![0x5a; SIZE as usize])))
        .collect();
    let plans: Vec<FaultPlan> = (0..n).map(|_| FaultPlan::new()).collect();
    let replicas = mems
        .iter()
        .zip(&plans)
        .enumerate()
        .map(|(i, (m, p))| {
            let inner: Arc<dyn Replica> = m.clone();
            named(
                format!("replica-{i}"),
                FaultyReplica::with_plan(inner, p.clone()),
            )
        })
        .collect();
    Setup {
        disk: Disk::new(replicas, opts).unwrap(),
        mems,
        plans,
    }
}

/// (reads, writes, flushes, timeouts, skipped) of each replica.
fn calls(stats: &[ReplicaStats]) -> Vec<(u64, u64, u64, u64, u64)> {
    stats
        .iter()
        .map(|s| (s.reads, s.writes, s.flushes, s.timeouts, s.skipped))
        .collect()
}

/// A histogram is consistent: its buckets add up to its count.
#[track_caller]
fn assert_consistent(l: &Latency) {
    assert_eq!(l.buckets.len(), LATENCY_BOUNDS_NS.len() + 1);
    assert_eq!(l.buckets.iter().sum::<u64>(), l.count);
}

/// Small and large (parallel fan-out) requests of every kind.
fn known_sequence(d: &Disk) {
    let mut small = vec![0; 4096];
    let mut large = vec![0; 128 << 10];
    for k in 0..4 {
        d.read(k * 4096, &mut small).unwrap();
    }
    d.read(0, &mut large).unwrap();
    d.read_with_region(8192, &mut small).unwrap();
    d.write(0, &[1; 4096], false).unwrap();
    d.write(65536, &vec![2; 128 << 10], true).unwrap();
    d.write_zeroes(4096, 8192, false, false).unwrap();
    d.discard(16384, 4096).unwrap();
    for _ in 0..3 {
        d.flush().unwrap();
    }
}

#[test]
fn replica_counters_count_every_call_of_a_known_sequence() {
    let s = setup(3, with_threshold(2));
    known_sequence(&s.disk);
    let stats = s.disk.stats();
    assert_eq!(calls(&stats), vec![(6, 4, 3, 0, 0); 3]);
    for r in &stats {
        assert_eq!(
            (
                r.read_latency.count,
                r.write_latency.count,
                r.flush_latency.count
            ),
            (6, 4, 3)
        );
        for l in [&r.read_latency, &r.write_latency, &r.flush_latency] {
            assert_consistent(l);
        }
    }
    // The fault plans saw exactly what the counters say.
    for p in &s.plans {
        assert_eq!(
            (
                p.calls(Op::Read),
                p.calls(Op::Write) + p.calls(Op::WriteZeroes) + p.calls(Op::Discard),
                p.calls(Op::Flush)
            ),
            (6, 4, 3)
        );
    }
}

#[test]
fn disk_stats_count_client_requests_and_bytes() {
    let s = setup(3, with_threshold(2));
    known_sequence(&s.disk);
    // Refused before any replica is asked: counted as failed requests.
    assert!(s.disk.read(SIZE, &mut [0; 512]).is_err());
    let st = s.disk.disk_stats();
    assert_eq!(
        (
            st.reads,
            st.read_bytes,
            st.writes,
            st.written_bytes,
            st.flushes,
            st.failed
        ),
        (
            7,
            5 * 4096 + (128 << 10),
            4,
            4096 + (128 << 10) + 8192 + 4096,
            3,
            1
        )
    );
    assert_eq!(
        (
            st.read_latency.count,
            st.write_latency.count,
            st.flush_latency.count
        ),
        (7, 4, 3)
    );
    for l in [&st.read_latency, &st.write_latency, &st.flush_latency] {
        assert_consistent(l);
    }
    assert_eq!(calls(&s.disk.stats()), vec![(6, 4, 3, 0, 0); 3]);
}

#[test]
fn failed_quorum_counts_as_a_failed_request() {
    let s = setup(3, with_threshold(2));
    s.mems[0].write_at(&[1; 4096], 0, false).unwrap();
    s.mems[1].write_at(&[2; 4096], 0, false).unwrap();
    assert!(s.disk.read(0, &mut [0; 4096]).is_err());
    let st = s.disk.disk_stats();
    assert_eq!((st.reads, st.read_bytes, st.failed), (1, 0, 1));
}

#[test]
fn rewrites_are_writes_asked_of_the_replica() {
    let s = setup(
        3,
        Options {
            rewrite_corrupted: true,
            ..with_threshold(2)
        },
    );
    s.mems[1].write_at(&[7; 100], 8192, false).unwrap();
    s.disk.read(0, &mut [0; 16384]).unwrap();
    let stats = s.disk.stats();
    assert_eq!(
        calls(&stats),
        vec![(1, 0, 0, 0, 0), (1, 1, 0, 0, 0), (1, 0, 0, 0, 0)]
    );
    assert_eq!((stats[1].rewrites, stats[1].write_latency.count), (1, 1));
    // Not a client write.
    assert_eq!(s.disk.disk_stats().writes, 0);
}

#[test]
fn fifo_reads_ask_only_the_replicas_they_read() {
    let s = setup(
        3,
        Options {
            read_pattern: ReadPattern::Fifo,
            ..with_threshold(2)
        },
    );
    s.plans[0].fail(Op::Read, 0..4096, libc::EIO);
    s.disk.read(0, &mut [0; 4096]).unwrap();
    s.disk.read(8192, &mut [0; 4096]).unwrap();
    assert_eq!(
        calls(&s.disk.stats()),
        vec![(2, 0, 0, 0, 0), (1, 0, 0, 0, 0), (0, 0, 0, 0, 0)]
    );
}

#[test]
fn timeouts_are_counted_and_skipped_requests_are_not_asked() {
    let s = setup(3, with_threshold(2));
    s.plans[2].fail(Op::Read, 0..SIZE, libc::ETIMEDOUT);
    s.disk.read(0, &mut [0; 4096]).unwrap();
    // The timeout failed replica-2: the next read goes without it.
    s.disk.read(0, &mut [0; 4096]).unwrap();
    let stats = s.disk.stats();
    assert_eq!(calls(&stats)[2], (1, 0, 0, 1, 1));
    assert_eq!(stats[2].read_errors, 1);
    assert_eq!(calls(&stats)[0], (2, 0, 0, 0, 0));
}

#[test]
fn latency_means_are_within_the_measured_bounds() {
    const DELAY: Duration = Duration::from_millis(2);
    const N: u64 = 5;
    let s = setup(3, with_threshold(2));
    s.plans[1].delay(Op::Read, 0..SIZE, DELAY);
    s.plans[1].delay(Op::Flush, 0..SIZE, DELAY);
    let started = Instant::now();
    for k in 0..N {
        s.disk.read(k * 4096, &mut [0; 4096]).unwrap();
        s.disk.flush().unwrap();
    }
    let wall = started.elapsed().as_nanos() as u64;
    let delay = DELAY.as_nanos() as u64;
    let replica = &s.disk.stats()[1];
    let disk = s.disk.disk_stats();
    for l in [
        &replica.read_latency,
        &replica.flush_latency,
        &disk.read_latency,
        &disk.flush_latency,
    ] {
        assert_eq!(l.count, N);
        assert_consistent(l);
        let mean = l.mean_ns().unwrap();
        assert!(
            (delay..=wall / N).contains(&mean),
            "mean {mean} ns outside [{delay}, {}]",
            wall / N
        );
        // Every latency is at least the delay: nothing in buckets below it.
        let below = LATENCY_BOUNDS_NS.iter().filter(|b| **b < delay).count();
        assert!(l.buckets[..below].iter().all(|n| *n == 0), "{l:?}");
    }
}
