//! The online scrub job: a background walk of the live disk that finds and
//! (with repair) fixes what replicas lost behind the disk's back, with
//! exact events and counters, ordered with concurrent guest writes.

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{named, with_threshold};
use quorum_engine::{ControlError, Disk, Event, OpType, Options, ScrubState};
use quorum_replica::testing::{FaultyReplica, MemReplica};
use quorum_replica::{Extent, Replica};

/// Several scrub steps (1 MiB each).
const SIZE: u64 = 8 << 20;
/// Written through the disk before each test: the first half is allocated.
const DATA: u64 = 4 << 20;
/// Long enough for anything that should happen promptly on a busy machine.
const PROMPT: Duration = Duration::from_secs(10);
/// A rate at which the scrub of `DATA` would take a minute: after its
/// first step, the job waits 16 s for the next.
const SLOW: u64 = 64 << 10;

struct Harness {
    disk: Arc<Disk>,
    mems: Vec<Arc<MemReplica>>,
    events: Receiver<Event>,
}

fn harness(n: usize, opts: Options) -> Harness {
    let mems: Vec<Arc<MemReplica>> = (0..n).map(|_| Arc::new(MemReplica::new(SIZE))).collect();
    let replicas = mems
        .iter()
        .enumerate()
        .map(|(i, m)| {
            named(
                format!("replica-{i}"),
                FaultyReplica::new(Arc::clone(m) as Arc<dyn Replica>),
            )
        })
        .collect();
    let disk = Arc::new(Disk::new(replicas, opts).unwrap());
    for off in (0..DATA).step_by(1 << 20) {
        disk.write(off, &pattern(off, 1 << 20, 0), false).unwrap();
    }
    let events = disk.subscribe();
    Harness { disk, mems, events }
}

/// Distinct bytes per offset and generation.
fn pattern(offset: u64, len: usize, generation: u8) -> Vec<u8> {
    (0..len as u64)
        .map(|k| ((offset + k) / 7 % 251) as u8 ^ generation.wrapping_mul(37))
        .collect()
}

impl Harness {
    /// Flip `len` bytes at `offset` of replica `i`, behind the disk's back.
    fn corrupt(&self, i: usize, offset: u64, len: usize) {
        let mut b = vec![0; len];
        self.mems[i].read_at(&mut b, offset).unwrap();
        b.iter_mut().for_each(|x| *x ^= 0xa5);
        self.mems[i].write_at(&b, offset, false).unwrap();
    }

    fn contents(&self) -> Vec<Vec<u8>> {
        self.mems.iter().map(|m| m.contents()).collect()
    }

    /// Events up to and including `QUORUM_SCRUB_COMPLETED` (bounded wait).
    fn until_completed(&self) -> (Vec<Event>, Event) {
        let deadline = Instant::now() + PROMPT;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e @ Event::ScrubCompleted { .. }) => return (before, e),
                Ok(e) => before.push(e),
                Err(e) => panic!("no QUORUM_SCRUB_COMPLETED within {PROMPT:?}: {e:?}"),
            }
        }
    }

    /// Start a slow scrub and return once its first step is done (the job
    /// then waits 16 s for its next): two corrupted ranges in the first
    /// step, of which the first is reported when the step ends.
    fn start_slow_and_finish_one_step(&self, repair: bool) {
        self.corrupt(1, 0, 1);
        self.corrupt(1, 65536, 1);
        self.disk.start_scrub(repair, SLOW).unwrap();
        let first = self.events.recv_timeout(PROMPT).unwrap();
        assert!(matches!(first, Event::ReportBad { .. }), "{first:?}");
    }

    fn voted_out(&self) -> Vec<(u64, u64)> {
        self.disk
            .stats()
            .iter()
            .map(|s| (s.voted_out_reads, s.voted_out_bytes))
            .collect()
    }
}

fn completed(repair: bool, status: &str, divergent: u64, repaired: u64, no_quorum: u64) -> Event {
    Event::ScrubCompleted {
        repair,
        status: status.into(),
        scanned_bytes: SIZE,
        divergent,
        repaired,
        no_quorum,
    }
}

/// (node, sector-num, sectors-count) of every voted-out REPORT_BAD, sorted.
fn bad_votes(events: &[Event]) -> Vec<(String, u64, u64)> {
    let mut v: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::ReportBad {
                op: OpType::Read,
                error: None,
                node_name,
                sector_num,
                sectors_count,
            } => Some((node_name.clone(), *sector_num, *sectors_count)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Corruptions planted by [`plant`]: (replica, offset, length) of each
/// divergent range, as the scrub reports it (whole 4 KiB blocks).
type Planted = Vec<(usize, u64, u64)>;

/// Six corruptions on different replicas, in allocated and unallocated
/// ranges, one of them across a scrub step boundary (two blocks, one range).
fn plant(h: &Harness) -> Planted {
    h.corrupt(0, 4096 + 10, 100);
    h.corrupt(1, 65536, 4096);
    h.corrupt(2, 3 << 20, 1);
    h.corrupt(0, (1 << 20) - 100, 200); // blocks on both sides of step 1
    h.corrupt(1, DATA + 8192, 50); // unallocated on the others
    h.corrupt(2, SIZE - 1, 1);
    vec![
        (0, 4096, 4096),
        (0, (1 << 20) - 4096, 8192),
        (1, 65536, 4096),
        (1, DATA + 8192, 4096),
        (2, 3 << 20, 4096),
        (2, SIZE - 4096, 4096),
    ]
}

fn expected_votes(planted: &Planted) -> Vec<(String, u64, u64)> {
    let mut v: Vec<_> = planted
        .iter()
        .map(|(i, off, len)| (format!("replica-{i}"), off / 512, len / 512))
        .collect();
    v.sort();
    v
}

fn expected_voted_out(planted: &Planted, n: usize) -> Vec<(u64, u64)> {
    (0..n)
        .map(|r| {
            let mine = planted.iter().filter(|p| p.0 == r);
            (mine.clone().count() as u64, mine.map(|p| p.2).sum())
        })
        .collect()
}

#[test]
fn repair_fixes_every_corruption_with_one_bad_vote_and_event_each() {
    let h = harness(3, with_threshold(2));
    let before = h.contents()[0].clone();
    let planted = plant(&h);
    h.disk.start_scrub(true, 0).unwrap();
    let (events, done) = h.until_completed();
    assert_eq!(done, completed(true, "completed", 6, 6, 0));
    assert_eq!(bad_votes(&events), expected_votes(&planted));
    assert_eq!(
        events.len(),
        planted.len(),
        "only the bad votes: {events:?}"
    );
    assert_eq!(h.voted_out(), expected_voted_out(&planted, 3));
    // The range across the step boundary is rewritten by both steps.
    let rewrites: Vec<(u64, u64)> = h
        .disk
        .stats()
        .iter()
        .map(|s| (s.rewrites, s.rewritten_bytes))
        .collect();
    assert_eq!(rewrites, vec![(3, 12288), (2, 8192), (2, 8192)]);
    let p = h.disk.scrub_progress();
    assert_eq!(
        (p.state, p.done_bytes, p.total_bytes, p.repair),
        (ScrubState::Completed, SIZE, SIZE, true)
    );
    let listed: Vec<_> = p
        .divergences
        .iter()
        .map(|d| (d.offset, d.length, d.bad, d.has_quorum, d.repaired))
        .collect();
    let mut want: Vec<_> = planted
        .iter()
        .map(|(i, off, len)| (*off, *len, 1 << i, true, true))
        .collect();
    want.sort();
    assert_eq!(listed, want);
    for c in h.contents() {
        assert!(c == before, "a replica differs after repair");
    }
}

#[test]
fn without_repair_nothing_changes_and_the_divergences_are_listed() {
    let h = harness(3, with_threshold(2));
    let planted = plant(&h);
    let corrupted = h.contents();
    h.disk.start_scrub(false, 0).unwrap();
    let (events, done) = h.until_completed();
    assert_eq!(done, completed(false, "completed", 6, 0, 0));
    assert_eq!(bad_votes(&events), expected_votes(&planted));
    assert_eq!(h.voted_out(), expected_voted_out(&planted, 3));
    assert!(h.contents() == corrupted, "a scrub without repair wrote");
    let p = h.disk.scrub_progress();
    assert_eq!(p.divergences.len(), 6);
    assert!(p.divergences.iter().all(|d| d.has_quorum && !d.repaired));
    assert!(
        h.disk
            .stats()
            .iter()
            .all(|s| s.rewrites == 0 && s.writes == 4)
    );
}

#[test]
fn a_range_without_quorum_fails_once_and_is_left_alone() {
    let h = harness(3, with_threshold(2));
    h.corrupt(0, 8192, 10);
    h.mems[1].write_at(&[0xee; 10], 8192, false).unwrap();
    h.corrupt(2, 1 << 21, 10);
    let corrupted = h.contents();
    h.disk.start_scrub(true, 0).unwrap();
    let (events, done) = h.until_completed();
    assert_eq!(done, completed(true, "completed", 2, 1, 1));
    let failures: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Failure { .. }))
        .collect();
    assert_eq!(
        failures,
        vec![&Event::Failure {
            reference: "quorum0".into(),
            sector_num: 16,
            sectors_count: 8
        }]
    );
    assert_eq!(bad_votes(&events), vec![("replica-2".into(), 4096, 8)]);
    // The block without quorum keeps its three versions; the other is fixed.
    let after = h.contents();
    let block = 8192..12288;
    for i in 0..3 {
        assert!(after[i][block.clone()] == corrupted[i][block.clone()]);
    }
    let fixed = (1 << 21)..(1 << 21) + 4096;
    assert!(after[2][fixed.clone()] == after[0][fixed]);
}

#[test]
fn concurrent_writes_are_kept_and_corruptions_elsewhere_repaired() {
    const WRITERS: u64 = 2;
    // Writers own disjoint blocks in the first 2 MiB; corruptions are beyond.
    let h = harness(3, with_threshold(2));
    h.corrupt(0, (2 << 20) + 4096, 10);
    h.corrupt(1, 3 << 20, 4096);
    h.corrupt(2, DATA + 4096, 1);
    let planted: Planted = vec![
        (0, (2 << 20) + 4096, 4096),
        (1, 3 << 20, 4096),
        (2, DATA + 4096, 4096),
    ];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let disk = Arc::clone(&h.disk);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                // Block k of this writer: offset (k * WRITERS + t) * 8 KiB.
                let mut last: BTreeMap<u64, u8> = BTreeMap::new();
                let mut g: u8 = 0;
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) || rounds < 2 {
                    for k in 0..128u64 {
                        let off = (k * WRITERS + t) * 8192;
                        g = g.wrapping_add(1).max(1);
                        disk.write(off, &pattern(off, 8192, g), false).unwrap();
                        last.insert(off, g);
                    }
                    rounds += 1;
                }
                last
            })
        })
        .collect();
    h.disk.start_scrub(true, 0).unwrap();
    let (events, done) = h.until_completed();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let written: Vec<BTreeMap<u64, u8>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(done, completed(true, "completed", 3, 3, 0));
    assert_eq!(bad_votes(&events), expected_votes(&planted));
    assert_eq!(h.voted_out(), expected_voted_out(&planted, 3));
    // Every acknowledged write reads back, through the disk and on each replica.
    for last in &written {
        for (&off, &g) in last {
            let want = pattern(off, 8192, g);
            let mut got = vec![0; 8192];
            h.disk.read(off, &mut got).unwrap();
            assert!(got == want, "write at {off} lost");
            for m in &h.mems {
                m.read_at(&mut got, off).unwrap();
                assert!(got == want, "write at {off} lost on a replica");
            }
        }
    }
    let c = h.contents();
    assert!(c[0] == c[1] && c[1] == c[2], "replicas differ after repair");
}

#[test]
fn cancel_stops_a_throttled_scrub_promptly() {
    let h = harness(3, with_threshold(2));
    h.start_slow_and_finish_one_step(false);
    let asked = Instant::now();
    assert!(h.disk.cancel_scrub());
    let (_, done) = h.until_completed();
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let p = h.disk.scrub_progress();
    assert_eq!(p.state, ScrubState::Cancelled);
    assert!(p.done_bytes < SIZE);
    assert_eq!(
        done,
        Event::ScrubCompleted {
            repair: false,
            status: "cancelled".into(),
            scanned_bytes: p.done_bytes,
            divergent: 2,
            repaired: 0,
            no_quorum: 0
        }
    );
    assert_eq!(p.done_bytes, 1 << 20, "cancelled after one step");
    assert!(!h.disk.cancel_scrub(), "nothing left to cancel");
}

#[test]
fn a_second_scrub_is_refused_while_one_runs() {
    let h = harness(3, with_threshold(2));
    h.disk.start_scrub(false, SLOW).unwrap();
    assert!(matches!(
        h.disk.start_scrub(true, 0),
        Err(ControlError::Refused(_))
    ));
    assert!(
        !h.disk.scrub_progress().repair,
        "the running scrub is unchanged"
    );
    h.disk.cancel_scrub();
    h.until_completed();
    // Once it has ended, another may start.
    h.disk.start_scrub(true, 0).unwrap();
    let (_, done) = h.until_completed();
    assert_eq!(done, completed(true, "completed", 0, 0, 0));
}

#[test]
fn repair_is_refused_on_a_read_only_disk() {
    let mems: Vec<Arc<MemReplica>> = (0..3).map(|_| Arc::new(MemReplica::new(SIZE))).collect();
    let replicas = mems
        .iter()
        .enumerate()
        .map(|(i, m)| {
            named(
                format!("replica-{i}"),
                FaultyReplica::new(Arc::clone(m) as Arc<dyn Replica>),
            )
        })
        .collect();
    let disk = Arc::new(
        Disk::new(
            replicas,
            Options {
                read_only: true,
                ..with_threshold(2)
            },
        )
        .unwrap(),
    );
    let events = disk.subscribe();
    assert!(matches!(
        disk.start_scrub(true, 0),
        Err(ControlError::Refused(_))
    ));
    assert_eq!(disk.scrub_progress().state, ScrubState::None);
    disk.start_scrub(false, 0).unwrap();
    let e = events.recv_timeout(PROMPT).unwrap();
    assert!(
        matches!(&e, Event::ScrubCompleted { status, .. } if status == "completed"),
        "{e:?}"
    );
}

#[test]
fn close_stops_the_scrub_and_releases_the_disk() {
    let h = harness(3, with_threshold(2));
    h.start_slow_and_finish_one_step(true);
    let asked = Instant::now();
    assert!(h.disk.close().is_empty());
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    // The thread is gone: it holds no reference to the disk.
    assert_eq!(Arc::strong_count(&h.disk), 1);
    assert_eq!(Arc::weak_count(&h.disk), 0);
    let (_, done) = h.until_completed();
    assert!(
        matches!(&done, Event::ScrubCompleted { status, .. } if status == "failed"),
        "{done:?}"
    );
    let p = h.disk.scrub_progress();
    assert_eq!(p.state, ScrubState::Failed);
    assert!(p.error.is_some());
    assert!(matches!(
        h.disk.start_scrub(false, 0),
        Err(ControlError::Refused(_))
    ));
}

#[test]
fn dropping_the_disk_while_it_scrubs_frees_it() {
    let h = harness(3, with_threshold(2));
    h.start_slow_and_finish_one_step(false);
    // The job now waits for its next step, and must not keep the disk.
    let Harness { disk, events, .. } = h;
    drop(disk);
    // The event bus goes with the disk: the channel disconnects.
    let deadline = Instant::now() + PROMPT;
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Disconnected) => break,
            Ok(Event::ReportBad { .. }) => {}
            other => panic!("the disk is still alive: {other:?}"),
        }
    }
}

/// A replica whose reads, once `armed`, signal that they started and wait
/// until the gate opens; counts flushes.
#[derive(Debug)]
struct Gated {
    inner: MemReplica,
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(bool, bool, bool, u64)>, // armed, entered, open, flushes
    changed: Condvar,
}

impl Gate {
    fn wait_for(&self, what: impl Fn(&(bool, bool, bool, u64)) -> bool) {
        let st = self.state.lock().unwrap();
        let (st, t) = self
            .changed
            .wait_timeout_while(st, PROMPT, |s| !what(s))
            .unwrap();
        assert!(!t.timed_out(), "gate: timed out at {:?}", *st);
    }

    fn update(&self, f: impl FnOnce(&mut (bool, bool, bool, u64))) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }
}

impl Replica for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> quorum_replica::Result<()> {
        if self.gate.state.lock().unwrap().0 {
            self.gate.update(|s| s.1 = true);
            self.gate.wait_for(|s| s.2);
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> quorum_replica::Result<()> {
        self.inner.write_at(buf, offset, fua)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool, f: bool) -> quorum_replica::Result<()> {
        self.inner.write_zeroes(o, l, u, f)
    }
    fn flush(&self) -> quorum_replica::Result<()> {
        self.gate.update(|s| s.3 += 1);
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> quorum_replica::Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
}

#[test]
fn the_last_reference_dropped_by_the_scrub_thread_closes_the_disk() {
    let gate = Arc::new(Gate::default());
    let mut replicas = vec![named(
        "replica-0",
        Gated {
            inner: MemReplica::new(SIZE),
            gate: Arc::clone(&gate),
        },
    )];
    replicas.extend((1..3).map(|i| named(format!("replica-{i}"), MemReplica::new(SIZE))));
    let disk = Arc::new(Disk::new(replicas, with_threshold(2)).unwrap());
    disk.write(0, &[1; 8192], false).unwrap();
    let events = disk.subscribe();
    gate.update(|s| s.0 = true);
    disk.start_scrub(false, 0).unwrap();
    // The scrub thread is inside a step, holding the disk.
    gate.wait_for(|s| s.1);
    drop(disk);
    gate.update(|s| s.2 = true);
    // It ends the step, drops the last reference, and the disk closes on
    // the scrub thread (flushing its replicas) without waiting for itself.
    match events.recv_timeout(PROMPT) {
        Err(RecvTimeoutError::Disconnected) => {}
        other => panic!("the disk is still alive: {other:?}"),
    }
    assert_eq!(gate.state.lock().unwrap().3, 1, "close flushed once");
}

#[test]
fn the_rate_limit_spaces_the_steps() {
    let h = harness(3, with_threshold(2));
    // 4 MiB allocated at 8 MiB/s: the last step is due after 3/8 s.
    let started = Instant::now();
    h.disk.start_scrub(false, 8 << 20).unwrap();
    let (_, done) = h.until_completed();
    assert_eq!(done, completed(false, "completed", 0, 0, 0));
    assert!(
        started.elapsed() >= Duration::from_millis(375),
        "{:?}",
        started.elapsed()
    );
}

/// The scrubs' walk: allocated pieces of at most a step, zero pieces whole,
/// contiguous from start to end, with block status asked once per window
/// (256 MiB) rather than once per piece: each ask costs a SEEK_HOLE that
/// on tmpfs walks every page up to the next hole.
#[test]
fn allocation_walk_covers_the_disk_asking_block_status_once_per_window() {
    use quorum_engine::AllocationWalk;
    use quorum_replica::testing::{FaultPlan, Op};
    const MIB: u64 = 1 << 20;
    let size = 300 * MIB;
    let plans: Vec<FaultPlan> = (0..3).map(|_| FaultPlan::new()).collect();
    let replicas: Vec<(String, Box<dyn Replica>)> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mem = MemReplica::new(size);
            // Data in [8 MiB, 11 MiB) and [280 MiB, 281 MiB); zero elsewhere.
            mem.write_at(&vec![7u8; 3 * MIB as usize], 8 * MIB, false)
                .unwrap();
            mem.write_at(&vec![7u8; MIB as usize], 280 * MIB, false)
                .unwrap();
            let inner: Arc<dyn Replica> = Arc::new(mem);
            let r: Box<dyn Replica> = Box::new(FaultyReplica::with_plan(inner, p.clone()));
            (format!("r{i}"), r)
        })
        .collect();
    let disk = Disk::new(replicas, with_threshold(2)).unwrap();
    let mut walk = AllocationWalk::new(0, size);
    let mut pieces = Vec::new();
    while let Some(p) = walk.next(&disk, MIB).unwrap() {
        pieces.push(p);
    }
    let mut at = 0;
    for &(o, l, _) in &pieces {
        assert_eq!(o, at, "pieces are contiguous: {pieces:?}");
        assert!(l > 0);
        at += l;
    }
    assert_eq!(at, size);
    let data: Vec<(u64, u64)> = pieces
        .iter()
        .filter(|p| !p.2)
        .map(|p| (p.0 / MIB, p.1 / MIB))
        .collect();
    assert_eq!(data, vec![(8, 1), (9, 1), (10, 1), (280, 1)]);
    // Zero ranges come whole (cut only where a window ends).
    assert!(pieces.len() <= 8, "{pieces:?}");
    for p in &plans {
        assert_eq!(p.calls(Op::BlockStatus), 2, "one ask per 256 MiB window");
    }
}
