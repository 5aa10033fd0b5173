//! Missed-write tracking, stale replicas and the online resync, against
//! in-memory replicas with injected faults and a real record file. The
//! healer thread is observed through events and the record, with bounds.

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use quorum_engine::record::Record;
use quorum_engine::{Disk, Event, Member, Options, ReplicaState, Tracking};
use quorum_replica::Replica;
use quorum_replica::testing::{FaultPlan, FaultyReplica, MemReplica, Op};

const SIZE: u64 = 8 << 20;
const CHUNK: u64 = 64 << 10;
const OLD: u8 = 0x5a;
const NEW: u8 = 0x11;
const WITHIN: Duration = Duration::from_secs(20);

struct Set {
    mems: Vec<Arc<MemReplica>>,
    plans: Vec<FaultPlan>,
    dir: tempfile::TempDir,
}

impl Set {
    fn new(n: usize) -> Set {
        Set {
            mems: (0..n)
                .map(|_| Arc::new(MemReplica::with_data(&vec![OLD; SIZE as usize])))
                .collect(),
            plans: (0..n).map(|_| FaultPlan::new()).collect(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A tracked disk over the set, with `identities` (0: unknown).
    fn open_with(&self, threshold: usize, identities: &[u64]) -> Disk {
        let o = Record::open(
            &self.dir.path().join("d.state"),
            SIZE,
            4 << 20,
            CHUNK,
            self.mems.len(),
        )
        .unwrap();
        let members = self
            .mems
            .iter()
            .zip(&self.plans)
            .enumerate()
            .map(|(i, (m, p))| {
                let inner: Arc<dyn Replica> = m.clone();
                Member {
                    uri: format!("mem:{i}"),
                    name: format!("r{i}"),
                    replica: Ok(Box::new(FaultyReplica::with_plan(inner, p.clone()))),
                    reopen: None,
                    identity: identities.get(i).copied().unwrap_or(0),
                    hint: None,
                }
            })
            .collect();
        let opts = Options {
            threshold,
            ..Options::default()
        };
        Disk::assemble_tracked(
            members,
            opts,
            Some(Tracking {
                record: o.record,
                resync_rate: 0,
                rebuild: Vec::new(),
            }),
        )
        .unwrap()
    }

    fn open(&self, threshold: usize) -> Disk {
        self.open_with(threshold, &[])
    }
}

fn read(d: &Disk, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(offset, &mut b).unwrap();
    b
}

/// Wait (bounded) for replica `node` to reach state `to`.
fn wait_state(events: &Receiver<Event>, node: &str, to: &str) -> bool {
    let deadline = Instant::now() + WITHIN;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(Event::ReplicaState { node_name, new, .. }) if node_name == node && new == to => {
                return true;
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn four_replicas_two_that_missed_a_write_never_outvote_the_new_data() {
    // Replicas 2 and 3 refuse writes (so they also cannot be resynced) but
    // still read their old data: a 2-2 tie that the tie-break would give to
    // the old copies, were the stale ones allowed to vote.
    let set = Set::new(4);
    set.plans[2].fail(Op::Write, 0..SIZE, libc::EIO);
    set.plans[3].fail(Op::Write, 0..SIZE, libc::EIO);
    let d = set.open(2);
    d.write(1 << 20, &[NEW; 4096], false).unwrap();
    // Stale, or resyncing (the healer tries, and fails on every write).
    let lagging = d.replica_states()[2..]
        .iter()
        .all(|s| matches!(s, ReplicaState::Stale | ReplicaState::Resyncing));
    assert_eq!(
        (read(&d, 1 << 20, 4096) == [NEW; 4096], lagging),
        (true, true)
    );
}

#[test]
fn replica_that_missed_a_write_is_resynced_and_then_outvotes_a_corruption() {
    let set = Set::new(3);
    set.plans[2].fail(Op::Write, 0..SIZE, libc::EIO);
    let d = set.open(2);
    let events = d.subscribe();
    d.write(1 << 20, &[NEW; 4096], false).unwrap();
    set.plans[2].clear();
    let synced = wait_state(&events, "r2", "in-sync");
    // Only the chunk the write touched was copied.
    let stats = d.heal_stats().unwrap();
    set.plans[1].corrupt_reads(1 << 20..(1 << 20) + 4096, 0xff);
    assert_eq!(
        (
            synced,
            stats.resync_bytes,
            set.mems[2].contents()[1 << 20..(1 << 20) + 4096] == [NEW; 4096],
            read(&d, 1 << 20, 4096) == [NEW; 4096]
        ),
        (true, CHUNK, true, true)
    );
}

#[test]
fn unreachable_replica_misses_writes_then_comes_back_stale_and_is_resynced() {
    let set = Set::new(3);
    let d = set.open(2);
    // Compare every region first (a fresh record knows none of them).
    d.heal_now();
    let events = d.subscribe();
    set.plans[1].fail(Op::Read, 0..SIZE, libc::ENOTCONN);
    set.plans[1].fail(Op::Write, 0..SIZE, libc::ENOTCONN);
    read(&d, 0, 4096);
    let failed = wait_state(&events, "r1", "failed");
    for k in 0..10u64 {
        d.write(k * 3 * CHUNK, &[NEW; 8192], false).unwrap();
    }
    let missed = d.missed_bytes().unwrap()[1];
    set.plans[1].clear();
    let stale = wait_state(&events, "r1", "stale");
    let synced = wait_state(&events, "r1", "in-sync");
    assert_eq!(
        (
            failed,
            stale,
            synced,
            missed,
            set.mems[1].contents() == set.mems[0].contents()
        ),
        (true, true, true, 10 * CHUNK, true)
    );
}

#[test]
fn resync_resumes_from_the_record_after_a_restart() {
    let set = Set::new(3);
    set.plans[2].fail(Op::Write, 0..SIZE, libc::EIO);
    {
        let d = set.open(2);
        for k in 0..16u64 {
            d.write(k * CHUNK * 2, &[NEW; 4096], false).unwrap();
        }
        assert_eq!(d.missed_bytes().unwrap()[2], 16 * CHUNK);
        d.close();
    }
    set.plans[2].clear();
    let d = set.open(2);
    let events = d.subscribe();
    let initial = d.replica_states()[2];
    let synced =
        d.replica_states()[2] == ReplicaState::InSync || wait_state(&events, "r2", "in-sync");
    assert_eq!(
        (
            initial == ReplicaState::InSync,
            synced,
            set.mems[2].contents() == set.mems[0].contents()
        ),
        (false, true, true)
    );
}

#[test]
fn replica_replaced_behind_the_records_back_is_rebuilt_in_full() {
    let set = Set::new(3);
    set.open_with(2, &[1, 2, 3]).close();
    // Another file in replica 1's place (its identity changed), empty.
    set.mems[1]
        .write_at(&vec![0u8; SIZE as usize], 0, false)
        .unwrap();
    let d = set.open_with(2, &[1, 7, 3]);
    let events = d.subscribe();
    let initial = d.replica_states()[1];
    let synced = wait_state(&events, "r1", "in-sync");
    assert_eq!(
        (
            initial,
            synced,
            d.heal_stats().unwrap().resync_bytes,
            set.mems[1].contents() == set.mems[0].contents()
        ),
        (ReplicaState::New, true, SIZE, true)
    );
}

#[test]
fn clean_close_leaves_no_dirty_region_and_reopens_in_sync() {
    let set = Set::new(3);
    let d = set.open(2);
    d.write(0, &[NEW; 65536], false).unwrap();
    // Its region, and maybe the next one (marked ahead of a sequential stream).
    let dirty_while_open = d.heal_stats().unwrap().dirty_regions >= 1;
    d.close();
    let i = quorum_engine::record::inspect(&set.dir.path().join("d.state")).unwrap();
    assert_eq!(
        (
            dirty_while_open,
            i.dirty_regions,
            i.header.clean,
            i.missed_chunks
        ),
        (true, 0, true, vec![0, 0, 0])
    );
}

#[test]
fn first_comparison_reports_and_repairs_a_replica_corrupted_before_the_record_existed() {
    let set = Set::new(3);
    set.mems[1].write_at(&[0xee; 4096], 2 << 20, false).unwrap();
    let d = set.open(2);
    // The first read of the region compares it (a fresh record knows none);
    // the healer may get there first. Either way it is counted as a vote
    // lost (and sent as QUORUM_REPORT_BAD), and repaired.
    let data = read(&d, 2 << 20, 4096);
    assert_eq!(
        (
            data == [OLD; 4096],
            d.stats()[1].voted_out_bytes,
            set.mems[1].contents()[2 << 20..(2 << 20) + 4096] == [OLD; 4096]
        ),
        (true, 4096, true)
    );
}
