//! The test doubles behave deterministically.

use std::sync::Arc;

use quorum_replica::testing::{Fault, FaultPlan, FaultyReplica, MemReplica, Op, Rule};
use quorum_replica::{ErrorKind, Replica};

fn faulty() -> (FaultyReplica, FaultPlan) {
    let r = FaultyReplica::new(Arc::new(MemReplica::with_data(&[7u8; 65536])) as Arc<dyn Replica>);
    let plan = r.plan();
    (r, plan)
}

#[test]
fn failure_on_a_range_returns_its_errno() {
    let (r, plan) = faulty();
    plan.fail(Op::Read, 4096..8192, libc::EIO);
    let err = r.read_at(&mut [0u8; 512], 4096 + 100).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io(libc::EIO));
}

#[test]
fn failure_does_not_touch_other_ranges() {
    let (r, plan) = faulty();
    plan.fail(Op::Read, 4096..8192, libc::EIO);
    r.read_at(&mut [0u8; 4096], 0).unwrap();
}

#[test]
fn failure_does_not_touch_other_ops() {
    let (r, plan) = faulty();
    plan.fail(Op::Write, 0..65536, libc::ENOSPC);
    r.read_at(&mut [0u8; 4096], 0).unwrap();
}

#[test]
fn failed_write_does_not_reach_the_inner_replica() {
    let mem = Arc::new(MemReplica::new(65536));
    let r = FaultyReplica::new(Arc::clone(&mem) as Arc<dyn Replica>);
    r.plan().fail(Op::Write, 0..65536, libc::ENOSPC);
    let _ = r.write_at(&[1u8; 512], 0, false);
    assert_eq!(mem.contents(), vec![0u8; 65536]);
}

#[test]
fn corruption_flips_only_the_bytes_in_its_range() {
    let (r, plan) = faulty();
    plan.corrupt_reads(100..200, 0xff);
    let mut buf = [0u8; 300];
    r.read_at(&mut buf, 0).unwrap();
    let expected: Vec<u8> = [vec![7u8; 100], vec![7 ^ 0xff; 100], vec![7u8; 100]].concat();
    assert_eq!(buf.to_vec(), expected);
}

#[test]
fn rule_with_times_retires_after_use() {
    let (r, plan) = faulty();
    plan.add(Rule {
        op: Op::Flush,
        range: None,
        fault: Fault::Fail(libc::EIO),
        times: Some(1),
    });
    let _ = r.flush();
    r.flush().unwrap();
}

#[test]
fn calls_are_counted_per_op() {
    let (r, plan) = faulty();
    r.read_at(&mut [0u8; 1], 0).unwrap();
    r.read_at(&mut [0u8; 1], 1).unwrap();
    r.flush().unwrap();
    assert_eq!(
        (
            plan.calls(Op::Read),
            plan.calls(Op::Flush),
            plan.calls(Op::Write)
        ),
        (2, 1, 0)
    );
}

#[test]
fn clearing_the_plan_restores_pass_through() {
    let (r, plan) = faulty();
    plan.fail(Op::Read, 0..65536, libc::EIO);
    plan.clear();
    r.read_at(&mut [0u8; 4096], 0).unwrap();
}

#[test]
fn mem_replica_reports_unwritten_blocks_as_holes() {
    let mem = MemReplica::new(3 * 4096);
    mem.write_at(&[1u8; 10], 4096, false).unwrap();
    let holes: Vec<bool> = mem
        .block_status(0, 3 * 4096)
        .unwrap()
        .iter()
        .map(|e| e.hole)
        .collect();
    assert_eq!(holes, vec![true, false, true]);
}

#[test]
fn read_only_mem_replica_refuses_writes() {
    let mem = MemReplica::new(4096).read_only();
    assert_eq!(
        mem.write_at(&[1u8], 0, false).unwrap_err().kind,
        ErrorKind::ReadOnly
    );
}
