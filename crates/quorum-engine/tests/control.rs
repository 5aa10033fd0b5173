//! The control plane's membership changes on a live disk: replace, remove
//! and add a replica, the resync rate, and what the record keeps of them.
//! In-memory replicas with injected faults and a real record file; the
//! healer is observed through events, with bounded waits.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use quorum_engine::record::{self, Record, STATE_REMOVED};
use quorum_engine::{ControlError, Disk, Event, Member, Options, ReplicaState, Tracking};
use quorum_replica::Replica;
use quorum_replica::testing::{FaultPlan, FaultyReplica, MemReplica, Op};

const SIZE: u64 = 8 << 20;
const CHUNK: u64 = 64 << 10;
const CHUNKS: u64 = SIZE / CHUNK;
const OLD: u8 = 0x5a;
const GARBAGE: u8 = 0xee;
const WITHIN: Duration = Duration::from_secs(60);

/// In-memory replicas `replica-0`..., identities 1, 2, ..., and a record.
struct Set {
    mems: Vec<Arc<MemReplica>>,
    plans: Vec<FaultPlan>,
    dir: tempfile::TempDir,
}

impl Set {
    fn new(n: usize) -> Set {
        Set {
            mems: (0..n).map(|_| filled(OLD)).collect(),
            plans: (0..n).map(|_| FaultPlan::new()).collect(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("d.state")
    }

    /// A tracked disk over the set, resyncing at `rate` bytes/s.
    fn open(&self, threshold: usize, rate: u64) -> Disk {
        self.open_on(&self.state(), threshold, rate, &[])
    }

    /// A tracked disk over the set and `extra` members, with the record at
    /// `path`.
    fn open_on(
        &self,
        path: &std::path::Path,
        threshold: usize,
        rate: u64,
        extra: &[(Arc<MemReplica>, u64)],
    ) -> Disk {
        let mut members: Vec<Member> = self
            .mems
            .iter()
            .zip(&self.plans)
            .enumerate()
            .map(|(i, (m, p))| member(m, p, i as u64 + 1))
            .collect();
        members.extend(
            extra
                .iter()
                .map(|(m, id)| member(m, &FaultPlan::new(), *id)),
        );
        open_members(path, threshold, rate, members)
    }
}

/// A tracked disk over `members`, named `replica-0`..., with the record at
/// `path`, resyncing at `rate` bytes/s.
fn open_members(
    path: &std::path::Path,
    threshold: usize,
    rate: u64,
    mut members: Vec<Member>,
) -> Disk {
    let o = Record::open(path, SIZE, 4 << 20, CHUNK, members.len()).unwrap();
    for (i, m) in members.iter_mut().enumerate() {
        m.name = format!("replica-{i}");
    }
    let opts = Options {
        threshold,
        ..Options::default()
    };
    Disk::assemble_tracked(
        members,
        opts,
        Some(Tracking {
            record: o.record,
            resync_rate: rate,
            rebuild: Vec::new(),
        }),
    )
    .unwrap()
}

fn filled(byte: u8) -> Arc<MemReplica> {
    Arc::new(MemReplica::with_data(&vec![byte; SIZE as usize]))
}

/// An opened member over `mem`, with faults from `plan`.
fn member(mem: &Arc<MemReplica>, plan: &FaultPlan, identity: u64) -> Member {
    let inner: Arc<dyn Replica> = mem.clone();
    Member {
        name: "ignored".into(),
        uri: format!("mem:{identity}"),
        replica: Ok(Box::new(FaultyReplica::with_plan(inner, plan.clone()))),
        reopen: None,
        identity,
        hint: None,
    }
}

fn read(d: &Disk, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read(offset, &mut b).unwrap();
    b
}

/// Events until `pred` holds for one (bounded); `None` if none did.
fn events_until(events: &Receiver<Event>, pred: impl Fn(&Event) -> bool) -> Option<Vec<Event>> {
    let deadline = Instant::now() + WITHIN;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let e = events.recv_timeout(left).ok()?;
        let done = pred(&e);
        seen.push(e);
        if done {
            return Some(seen);
        }
    }
    None
}

fn is_state(e: &Event, node: &str, to: &str) -> bool {
    matches!(e, Event::ReplicaState { node_name, new, .. } if node_name == node && new == to)
}

/// The states `node` went through, in order.
fn states_of(events: &[Event], node: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ReplicaState { node_name, new, .. } if node_name == node => Some(new.clone()),
            _ => None,
        })
        .collect()
}

fn completions_of(events: &[Event], node: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::ResyncCompleted { node_name, .. } if node_name == node))
        .count()
}

/// Bounded wait for `cond`.
fn eventually(cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + WITHIN;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::yield_now();
    }
    cond()
}

#[test]
fn replace_under_concurrent_writes_rebuilds_an_identical_replica() {
    let set = Set::new(3);
    let d = Arc::new(set.open(2, 0));
    let events = d.subscribe();
    let new = filled(GARBAGE);
    let start = Arc::new(Barrier::new(5));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (d, start) = (d.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for k in 0..64u64 {
                    let at = (k * 4 + t) * 3 * 4096;
                    d.write(at, &[(t * 64 + k) as u8 | 0x80; 4096], false)
                        .unwrap();
                }
            })
        })
        .collect();
    start.wait();
    let replaced = d.replace_replica("replica-1", member(&new, &FaultPlan::new(), 9));
    for w in writers {
        w.join().unwrap();
    }
    let seen = events_until(
        &events,
        |e| matches!(e, Event::ResyncCompleted { node_name, .. } if node_name == "replica-1"),
    )
    .unwrap_or_default();
    let info = d.replicas_info()[1].clone();
    let all_readable = (0..4u64).all(|t| {
        (0..64u64)
            .all(|k| read(&d, (k * 4 + t) * 3 * 4096, 4096) == [(t * 64 + k) as u8 | 0x80; 4096])
    });
    d.close();
    let seen: Vec<Event> = seen.into_iter().chain(events.try_iter()).collect();
    assert_eq!(
        (
            replaced,
            states_of(&seen, "replica-1"),
            completions_of(&seen, "replica-1"),
            (info.state, info.uri, info.resync_progress),
            new.contents() == set.mems[0].contents(),
            set.mems[2].contents() == set.mems[0].contents(),
            all_readable
        ),
        (
            Ok(()),
            vec!["new".to_owned(), "resyncing".into(), "in-sync".into()],
            1,
            (ReplicaState::InSync, "mem:9".to_owned(), None),
            true,
            true,
            true
        )
    );
}

#[test]
fn replaced_replica_is_released_once_swapped() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    let old = set.mems[1].clone();
    d.replace_replica("replica-1", member(&filled(OLD), &FaultPlan::new(), 9))
        .unwrap();
    // The set and this test hold the only references left.
    assert!(eventually(|| Arc::strong_count(&old) == 2));
}

#[test]
fn replaced_replicas_garbage_is_never_read_while_it_is_new() {
    // Two replicas, threshold 1: were the new one asked, its garbage would
    // tie with the good copy.
    let set = Set::new(2);
    let d = set.open(1, 0);
    let events = d.subscribe();
    let new = filled(GARBAGE);
    // The rebuild cannot write yet.
    let plan = FaultPlan::new();
    plan.fail(Op::Write, 0..SIZE, libc::EIO);
    d.replace_replica("replica-1", member(&new, &plan, 9))
        .unwrap();
    let mut reads_old = true;
    for pass in 0..3 {
        for at in (0..SIZE).step_by(1 << 20) {
            reads_old &= read(&d, at, 1 << 20).iter().all(|&b| b == OLD);
        }
        if pass == 0 {
            // Resyncing (failing) by now, or still new.
            events_until(&events, |e| is_state(e, "replica-1", "resyncing"));
        }
    }
    let lagging = matches!(
        d.replica_states()[1],
        ReplicaState::New | ReplicaState::Resyncing
    );
    plan.clear();
    let synced = events_until(&events, |e| is_state(e, "replica-1", "in-sync")).is_some();
    assert_eq!(
        (
            reads_old,
            lagging,
            synced,
            new.contents() == set.mems[0].contents()
        ),
        (true, true, true, true)
    );
}

#[test]
fn replace_with_another_size_is_refused() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    let small = Arc::new(MemReplica::new(SIZE / 2));
    let err = d
        .replace_replica("replica-1", member(&small, &FaultPlan::new(), 9))
        .unwrap_err();
    assert!(
        matches!(&err, ControlError::Refused(m) if m.contains("4194304 bytes") && m.contains("8388608 bytes")),
        "{err}"
    );
}

#[test]
fn replace_is_refused_when_the_others_hold_too_few_in_sync_replicas() {
    let set = Set::new(3);
    set.plans[2].fail(Op::Write, 0..SIZE, libc::EIO);
    let d = set.open(2, 0);
    d.write(0, &[1; 4096], false).unwrap();
    let err = d
        .replace_replica("replica-0", member(&filled(0), &FaultPlan::new(), 9))
        .unwrap_err();
    let states = d.replica_states();
    assert!(
        matches!(&err, ControlError::Refused(m)
            if m.contains("1 in-sync replica(s) among the others")
            && m.contains("replica-1: in-sync")
            && m.contains("replica-2: ")
            && m.contains("threshold 2")),
        "{err}"
    );
    assert_eq!(states[0], ReplicaState::InSync);
}

#[test]
fn replace_of_an_unknown_replica_is_refused() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    let err = d
        .replace_replica("replica-7", member(&filled(0), &FaultPlan::new(), 9))
        .unwrap_err();
    assert_eq!(err, ControlError::NotFound("replica-7".into()));
}

#[test]
fn a_replica_of_the_disk_cannot_be_added_or_swapped_in_twice() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    // Replica 0's image (identity 1) put in replica 1's place, or added.
    let err = d
        .replace_replica("replica-1", member(&filled(0), &FaultPlan::new(), 1))
        .unwrap_err();
    assert!(
        matches!(&err, ControlError::Refused(m) if m.contains("is replica-0 already")),
        "{err}"
    );
    let err = d
        .add_replica(member(&filled(0), &FaultPlan::new(), 3))
        .unwrap_err();
    assert!(
        matches!(&err, ControlError::Refused(m) if m.contains("is replica-2 already")),
        "{err}"
    );
    assert_eq!(d.replica_count(), 3);
    assert!(
        d.replica_states()
            .iter()
            .all(|s| *s == ReplicaState::InSync)
    );
}

#[test]
fn replace_and_add_without_tracking_are_refused() {
    let set = Set::new(3);
    let members = (0..3)
        .map(|i| member(&set.mems[i], &set.plans[i], i as u64 + 1))
        .collect();
    let d = Disk::assemble(
        members,
        Options {
            threshold: 2,
            ..Options::default()
        },
    )
    .unwrap();
    let name = d.replica_names()[1].to_owned();
    let replace = d
        .replace_replica(&name, member(&filled(0), &FaultPlan::new(), 9))
        .unwrap_err();
    let add = d
        .add_replica(member(&filled(0), &FaultPlan::new(), 9))
        .unwrap_err();
    for err in [replace, add] {
        assert!(
            matches!(&err, ControlError::Refused(m) if m.contains("needs the disk's record") && m.contains("--no-tracking")),
            "{err}"
        );
    }
}

#[test]
fn removed_replica_is_no_longer_asked_and_the_disk_serves_without_it() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    let events = d.subscribe();
    d.remove_replica("replica-2").unwrap();
    let removed = events_until(&events, |e| is_state(e, "replica-2", "removed")).is_some();
    d.write(1 << 20, &[0x11; 8192], false).unwrap();
    let data = read(&d, 1 << 20, 8192);
    let names: Vec<String> = d.replicas_info().into_iter().map(|r| r.name).collect();
    let i = record::inspect(&set.state()).unwrap();
    assert_eq!(
        (
            removed,
            data == [0x11; 8192],
            set.mems[2].contents()[1 << 20..(1 << 20) + 8192] == [OLD; 8192],
            names,
            d.failed_replicas(),
            i.header.replicas[2].state,
            i.missed_chunks[2],
            eventually(|| Arc::strong_count(&set.mems[2]) == 1),
        ),
        (
            true,
            true,
            true,
            vec!["replica-0".to_owned(), "replica-1".into()],
            vec![],
            STATE_REMOVED,
            CHUNKS,
            true
        )
    );
}

#[test]
fn remove_is_refused_below_the_threshold() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    d.remove_replica("replica-2").unwrap();
    let err = d.remove_replica("replica-1").unwrap_err();
    assert!(
        matches!(&err, ControlError::Refused(m) if m.contains("would leave 1 replica(s), but threshold 2")),
        "{err}"
    );
}

#[test]
fn remove_is_refused_when_too_few_in_sync_replicas_would_remain() {
    let set = Set::new(3);
    set.plans[2].fail(Op::Write, 0..SIZE, libc::EIO);
    let d = set.open(2, 0);
    d.write(0, &[1; 4096], false).unwrap();
    let err = d.remove_replica("replica-1").unwrap_err();
    assert!(
        matches!(&err, ControlError::Refused(m) if m.contains("1 in-sync replica(s) among the others")),
        "{err}"
    );
}

#[test]
fn removed_replica_back_in_the_configuration_is_rebuilt_in_full() {
    let set = Set::new(3);
    {
        let d = set.open(2, 0);
        d.remove_replica("replica-2").unwrap();
        d.write(0, &[0x22; 4096], false).unwrap();
        d.close();
    }
    // Restarted with the old configuration: the same replica, untrusted.
    let d = set.open(2, 0);
    let events = d.subscribe();
    // New, or already being rebuilt: never trusted.
    let initial = matches!(
        d.replica_states()[2],
        ReplicaState::New | ReplicaState::Resyncing
    );
    let synced = events_until(&events, |e| is_state(e, "replica-2", "in-sync")).is_some();
    assert_eq!(
        (
            initial,
            synced,
            d.heal_stats().unwrap().resync_bytes,
            set.mems[2].contents() == set.mems[0].contents()
        ),
        (true, true, SIZE, true)
    );
}

#[test]
fn added_replica_takes_the_removed_slot_and_is_rebuilt() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    let events = d.subscribe();
    d.remove_replica("replica-1").unwrap();
    d.write(0, &[0x33; 4096], false).unwrap();
    let new = filled(GARBAGE);
    let name = d.add_replica(member(&new, &FaultPlan::new(), 9));
    let seen = events_until(
        &events,
        |e| matches!(e, Event::ResyncCompleted { node_name, .. } if node_name == "replica-1"),
    )
    .unwrap_or_default();
    assert_eq!(
        (
            name,
            states_of(&seen, "replica-1"),
            d.replica_count(),
            new.contents() == set.mems[0].contents()
        ),
        (
            Ok("replica-1".to_owned()),
            vec![
                "removed".to_owned(),
                "new".into(),
                "resyncing".into(),
                "in-sync".into()
            ],
            3,
            true
        )
    );
}

#[test]
fn added_replica_past_the_last_slot_grows_the_disk_and_the_record() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    let events = d.subscribe();
    let new = filled(GARBAGE);
    let name = d.add_replica(member(&new, &FaultPlan::new(), 9));
    let synced = events_until(&events, |e| is_state(e, "replica-3", "in-sync")).is_some();
    d.write(0, &[0x44; 4096], false).unwrap();
    drop(d);
    let i = record::inspect(&set.state()).unwrap();
    // Restarted with the grown configuration: everything in sync.
    let again = set.open_on(&set.state(), 2, 0, &[(new.clone(), 9)]);
    assert_eq!(
        (
            name,
            synced,
            new.contents() == set.mems[0].contents(),
            i.header.replicas.len(),
            i.missed_chunks,
            again.replica_states()
        ),
        (
            Ok("replica-3".to_owned()),
            true,
            true,
            4,
            vec![0; 4],
            vec![ReplicaState::InSync; 4]
        )
    );
}

#[test]
fn grown_then_removed_replica_leaves_a_record_the_old_configuration_uses() {
    let set = Set::new(3);
    {
        let d = set.open(2, 0);
        d.add_replica(member(&filled(OLD), &FaultPlan::new(), 9))
            .unwrap();
        d.remove_replica("replica-3").unwrap();
        d.close();
    }
    let o = Record::open(&set.state(), SIZE, 4 << 20, CHUNK, 3).unwrap();
    assert_eq!((o.distrust, o.record.header().replicas.len()), (None, 3));
}

#[test]
fn resync_rate_changes_live_and_a_rate_of_zero_lets_a_throttled_rebuild_finish() {
    let set = Set::new(3);
    let d = set.open(2, 0);
    let events = d.subscribe();
    d.set_resync_rate(12345);
    let set_to = d.resync_rate();
    // One byte a second: a chunk copied, then a wait of 18 hours.
    d.set_resync_rate(1);
    let new = filled(GARBAGE);
    d.replace_replica("replica-1", member(&new, &FaultPlan::new(), 9))
        .unwrap();
    events_until(&events, |e| is_state(e, "replica-1", "resyncing"));
    let throttled = d.replica_states()[1] != ReplicaState::InSync;
    d.set_resync_rate(0);
    let synced = events_until(&events, |e| is_state(e, "replica-1", "in-sync")).is_some();
    assert_eq!(
        (
            set_to,
            throttled,
            synced,
            d.resync_rate(),
            new.contents() == set.mems[0].contents()
        ),
        (12345, true, true, 0, true)
    );
}

#[test]
fn replica_killed_during_its_rebuild_comes_back_new_never_in_sync() {
    let set = Set::new(3);
    let d = set.open(2, 1);
    let events = d.subscribe();
    let new = filled(GARBAGE);
    d.replace_replica("replica-1", member(&new, &FaultPlan::new(), 9))
        .unwrap();
    events_until(&events, |e| is_state(e, "replica-1", "resyncing"));
    // What a killed daemon leaves: the file as it is now.
    let crashed = set.dir.path().join("crashed.state");
    std::fs::copy(set.state(), &crashed).unwrap();
    let on_disk = record::inspect(&crashed).unwrap();
    // Reopened over the replicas, the new one in its slot (throttled too,
    // so that what is seen is what the record said).
    let members = vec![
        member(&set.mems[0], &FaultPlan::new(), 1),
        member(&new, &FaultPlan::new(), 9),
        member(&set.mems[2], &FaultPlan::new(), 3),
    ];
    let again = open_members(&crashed, 2, 1, members);
    let reopened = matches!(
        again.replica_states()[1],
        ReplicaState::New | ReplicaState::Resyncing
    );
    let missed = again.missed_bytes().unwrap()[1];
    let recorded = record::inspect(&crashed).unwrap().header.replicas[1].state;
    assert_eq!(
        (
            on_disk.header.replicas[1].state,
            on_disk.header.replicas[1].identity,
            on_disk.missed_chunks[1] > 0,
            reopened,
            missed > 0,
            recorded
        ),
        (
            ReplicaState::New as u8,
            9,
            true,
            true,
            true,
            ReplicaState::New as u8
        )
    );
}
