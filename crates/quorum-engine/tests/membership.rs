//! Replica membership: degraded assembly, unreachable replicas taken out of
//! the request path, and their return. In-memory replicas with injected
//! faults; the retry thread is observed through events, with bounds.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::with_threshold;
use quorum_engine::{BuildError, Disk, Event, Member, ReplicaState};
use quorum_replica::Replica;
use quorum_replica::testing::{FaultPlan, FaultyReplica, MemReplica, Op};

const SIZE: u64 = 1 << 20;
const FILL: u8 = 0x5a;
/// Bound on waiting for the retry thread (it first retries after 1 s).
const BACK_WITHIN: Duration = Duration::from_secs(20);

fn mem() -> Box<dyn Replica> {
    Box::new(MemReplica::with_data(&vec![FILL; SIZE as usize]))
}

fn faulty(plan: &FaultPlan) -> Box<dyn Replica> {
    let inner: Arc<dyn Replica> = Arc::new(MemReplica::with_data(&vec![FILL; SIZE as usize]));
    Box::new(FaultyReplica::with_plan(inner, plan.clone()))
}

fn opened(name: &str, r: Box<dyn Replica>) -> Member {
    Member {
        uri: name.into(),
        name: name.into(),
        replica: Ok(r),
        reopen: None,
        identity: 0,
        hint: None,
    }
}

fn missing(name: &str, why: &str) -> Member {
    Member {
        uri: name.into(),
        name: name.into(),
        replica: Err(why.into()),
        reopen: None,
        identity: 0,
        hint: None,
    }
}

/// Wait (bounded) for the next state change of `node`.
fn next_state(events: &Receiver<Event>, node: &str) -> Option<(String, String)> {
    let deadline = std::time::Instant::now() + BACK_WITHIN;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match events.recv_timeout(left) {
            Ok(Event::ReplicaState {
                node_name,
                old,
                new,
                ..
            }) if node_name == node => return Some((old, new)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn disk_with_one_replica_missing_opens_degraded_and_serves_the_majority() {
    let disk = Disk::assemble(
        vec![
            opened("a", mem()),
            missing("b", "/x/b.raw: No such file or directory"),
            opened("c", mem()),
        ],
        with_threshold(2),
    )
    .unwrap();
    disk.write(4096, &[7u8; 4096], false).unwrap();
    let mut buf = vec![0u8; 8192];
    disk.read(0, &mut buf).unwrap();
    assert_eq!(
        (
            &buf[..4096] == [FILL; 4096].as_slice(),
            &buf[4096..] == [7u8; 4096].as_slice(),
            disk.replica_states(),
            disk.failed_replicas()
        ),
        (
            true,
            true,
            vec![
                ReplicaState::InSync,
                ReplicaState::Failed,
                ReplicaState::InSync
            ],
            vec![(1, "b".into(), "/x/b.raw: No such file or directory".into())]
        )
    );
}

#[test]
fn fewer_usable_replicas_than_the_threshold_is_refused_naming_each_missing_one() {
    let err = Disk::assemble(
        vec![
            missing("a", "a.raw: gone"),
            opened("b", mem()),
            missing("c", "c.qcow2: corrupt"),
        ],
        with_threshold(2),
    )
    .unwrap_err();
    assert!(matches!(
        err,
        BuildError::TooFew {
            usable: 1,
            total: 3,
            threshold: 2,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "only 1 of 3 replicas can be used, but threshold 2 needs 2:\n  a: a.raw: gone\n  c: c.qcow2: corrupt"
    );
}

#[test]
fn timed_out_replica_is_not_asked_again_by_later_requests() {
    let plan = FaultPlan::new();
    plan.fail(Op::Read, 65536..SIZE, libc::ETIMEDOUT);
    let disk = Disk::assemble(
        vec![
            opened("a", mem()),
            opened("b", faulty(&plan)),
            opened("c", mem()),
        ],
        with_threshold(2),
    )
    .unwrap();
    let events = disk.subscribe();
    let mut buf = vec![0u8; 4096];
    for i in 0..20 {
        disk.read(65536 + i * 4096, &mut buf).unwrap();
        assert_eq!(buf, vec![FILL; 4096]);
    }
    disk.write(65536, &[1u8; 4096], false).unwrap();
    let report_bad = events
        .try_iter()
        .filter(|e| matches!(e, Event::ReportBad { .. }))
        .count();
    let stats = &disk.stats()[1];
    assert_eq!(
        (
            plan.calls(Op::Read),
            plan.calls(Op::Write),
            report_bad,
            stats.read_errors,
            stats.skipped,
            disk.replica_states()[1]
        ),
        (1, 0, 1, 1, 20, ReplicaState::Failed)
    );
}

#[test]
fn media_error_on_one_block_does_not_fail_the_replica() {
    let plan = FaultPlan::new();
    plan.fail(Op::Read, 0..4096, libc::EIO);
    let disk = Disk::assemble(
        vec![
            opened("a", mem()),
            opened("b", faulty(&plan)),
            opened("c", mem()),
        ],
        with_threshold(2),
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    disk.read(0, &mut buf).unwrap();
    disk.read(8192, &mut buf).unwrap();
    assert_eq!(
        (plan.calls(Op::Read), disk.replica_states()[1]),
        (2, ReplicaState::InSync)
    );
}

#[test]
fn failed_replica_takes_part_again_once_it_answers() {
    let plan = FaultPlan::new();
    plan.fail(Op::Read, 0..SIZE, libc::ENOTCONN);
    let disk = Disk::assemble(
        vec![
            opened("a", mem()),
            opened("b", faulty(&plan)),
            opened("c", mem()),
        ],
        with_threshold(2),
    )
    .unwrap();
    let events = disk.subscribe();
    let mut buf = vec![0u8; 4096];
    disk.read(0, &mut buf).unwrap();
    let failed = next_state(&events, "b");
    plan.clear();
    let back = next_state(&events, "b");
    let before = plan.calls(Op::Read);
    disk.read(8192, &mut buf).unwrap();
    assert_eq!(
        (failed, back, plan.calls(Op::Read) - before),
        (
            Some(("in-sync".into(), "failed".into())),
            Some(("failed".into(), "in-sync".into())),
            1
        )
    );
}

#[test]
fn replica_that_opens_late_joins_through_its_reopen() {
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let disk = Disk::assemble(
        vec![
            opened("a", mem()),
            Member {
                uri: "test".into(),
                name: "b".into(),
                replica: Err("b.raw: not there yet".into()),
                reopen: Some(Box::new(move || {
                    if flag.load(Ordering::SeqCst) {
                        Ok((mem(), 0))
                    } else {
                        Err("b.raw: not there yet".into())
                    }
                })),
                identity: 0,
                hint: None,
            },
        ],
        with_threshold(1),
    )
    .unwrap();
    let events = disk.subscribe();
    ready.store(true, Ordering::SeqCst);
    let back = next_state(&events, "b");
    assert_eq!(
        (back, disk.replica_states()),
        (
            Some(("failed".into(), "in-sync".into())),
            vec![ReplicaState::InSync, ReplicaState::InSync]
        )
    );
}

#[test]
fn replica_that_opens_late_with_another_size_stays_failed() {
    let disk = Disk::assemble(
        vec![
            opened("a", mem()),
            Member {
                uri: "test".into(),
                name: "b".into(),
                replica: Err("b.raw: not there yet".into()),
                reopen: Some(Box::new(|| Ok((Box::new(MemReplica::new(4096)), 0)))),
                identity: 0,
                hint: None,
            },
        ],
        with_threshold(1),
    )
    .unwrap();
    // The first retry (after 1 s) opens it and finds the wrong size.
    let deadline = std::time::Instant::now() + BACK_WITHIN;
    while !disk.failed_replicas()[0].2.contains("size 4096") && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        (
            disk.replica_states()[1],
            disk.failed_replicas()[0].2.clone()
        ),
        (
            ReplicaState::Failed,
            "it opened with size 4096 bytes, but the disk has 1048576 bytes".to_owned()
        )
    );
}
