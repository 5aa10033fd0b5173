//! Replica membership: which replicas take part in requests, and getting a
//! failed one back.
//!
//! ```text
//!   open ok ───────────────▶ Up ◀──────────── retry thread: reopen / probe ok
//!   open failed ──┐           │                      ▲
//!                 ▼           ▼ timeout, disconnect  │
//!               Failed ◀──────┘ (unreachable errno)  │
//!                 └──────────────────────────────────┘
//! ```
//!
//! A request fans out only to `Up` replicas; a `Failed` one counts as a
//! failed copy (or write) without being asked, so a hung remote replica
//! costs its timeout once, not once per request. Only errors that say the
//! replica cannot be reached fail it (timeouts, lost connections); a media
//! error on one block stays that request's error, as in QEMU.
//!
//! Each failed replica has one retry thread. It waits 1 s, then twice as
//! long after every failed attempt (at most [`MAX_RETRY`]), and tries to
//! reopen a replica that never opened, or else to read its first block. It
//! stops when the replica answers or the disk is dropped.
//!
//! The replica behind a slot can be swapped (a replica that opens late
//! replaces its placeholder, the control plane replaces a replica), so
//! requests take an `Arc` of it for their duration. The states (in-sync,
//! stale, resyncing, failed, new) live here, one atomic per replica, read by
//! every request without locks.
//!
//! Slots are stored for the most replicas a quorum can have
//! ([`quorum_vote::MAX_REPLICAS`]), allocated once and never moved, so a
//! replica can be added while requests run without a lock on their path:
//!
//! ```text
//!   all:  [ r0 | r1 | (removed) | r3 | vacant ... vacant ]   64 slots
//!           └──────── span ─────────┘                        requests see slots()[..span]
//! ```
//!
//! A slot's index is its bit in vote masks and its place in the record.
//! `span` only grows (by one, when a replica is added past the last slot),
//! and only while the disk is quiesced ([`crate::range_lock::RangeLock::lock_all`]),
//! so a request that took the range lock sees one length throughout. A
//! removed slot inside the span is empty (its own state, not up: never
//! asked, never voting, never retried) until an added replica reuses it;
//! an add takes the first empty slot, so holes last only until then. A
//! slot keeps its node name: slot `k` of a disk opened from its
//! configuration is `replica-k`, and a slot past the configured ones is
//! named `replica-k` too.
//!
//! Membership changes, the healer's batches and the retry threads' swaps
//! are serialised by one control mutex that no request takes.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use quorum_replica::{ErrorKind, Replica, ReplicaError};

use crate::events::{Counters, Event, EventBus};
use crate::heal::Heal;
use crate::range_lock::RangeLock;

/// Longest wait between two attempts to get a failed replica back.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// First wait after a replica failed.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Opens a replica again (the retry thread calls it for a replica that
/// could not be opened): the replica and its identity (see
/// [`crate::record::ReplicaEntry::identity`]; 0 if unknown), or why not.
pub type Reopen = Box<dyn Fn() -> Result<(Box<dyn Replica>, u64), String> + Send + Sync>;

/// What the engine knows of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplicaState {
    /// Holds every acknowledged write: votes everywhere.
    InSync = 0,
    /// Missed some writes (its missed chunks never vote and are never read);
    /// waiting for the resync.
    Stale = 1,
    /// Its missed chunks are being copied to it.
    Resyncing = 2,
    /// Unreachable (could not be opened, timed out, disconnected): requests
    /// go without it, what it misses is recorded; retried in the background.
    Failed = 3,
    /// Not known to hold this disk (replaced, or created empty): every
    /// chunk counts as missed until rebuilt.
    New = 4,
}

impl ReplicaState {
    /// The name used in events, logs and the record.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InSync => "in-sync",
            ReplicaState::Stale => "stale",
            ReplicaState::Resyncing => "resyncing",
            ReplicaState::Failed => "failed",
            ReplicaState::New => "new",
        }
    }

    /// From the record's byte (unknown values read as stale: not trusted).
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => ReplicaState::InSync,
            2 => ReplicaState::Resyncing,
            3 => ReplicaState::Failed,
            4 => ReplicaState::New,
            _ => ReplicaState::Stale,
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state byte of an empty slot (a removed replica, or none yet); the
/// record stores the same value for a removed replica.
pub(crate) const VACANT: u8 = crate::record::STATE_REMOVED;
/// How an empty slot is named in events.
pub(crate) const VACANT_NAME: &str = "removed";

/// True for errors that say the replica cannot be reached at all, as
/// opposed to one request failing on it.
pub fn is_unreachable(e: &ReplicaError) -> bool {
    matches!(
        e.kind,
        ErrorKind::Io(
            libc::ETIMEDOUT
                | libc::ENOTCONN
                | libc::ECONNREFUSED
                | libc::ECONNRESET
                | libc::ECONNABORTED
                | libc::EPIPE
                | libc::ESHUTDOWN
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
        )
    )
}

/// One replica of a disk.
pub(crate) struct Slot {
    pub(crate) name: String,
    replica: RwLock<Arc<dyn Replica>>,
    state: AtomicU8,
    /// Where the replica is (a path, an NBD URI), for people.
    uri: Mutex<String>,
    /// Bumped whenever another replica takes the slot (replaced, removed,
    /// added): a retry thread of an earlier one stops.
    generation: AtomicU64,
    /// Why it failed (for logs and errors of skipped requests).
    reason: Mutex<String>,
    /// How to open it again, while it never opened.
    reopen: Mutex<Option<Reopen>>,
    pub(crate) counters: Counters,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("name", &self.name)
            .field("state", &self.state())
            .field("replica", &*self.replica.read())
            .finish_non_exhaustive()
    }
}

impl Slot {
    pub(crate) fn new(name: String, uri: String, replica: Box<dyn Replica>) -> Slot {
        Slot {
            name,
            replica: RwLock::new(Arc::from(replica)),
            state: AtomicU8::new(ReplicaState::InSync as u8),
            uri: Mutex::new(uri),
            generation: AtomicU64::new(0),
            reason: Mutex::new(String::new()),
            reopen: Mutex::new(None),
            counters: Counters::default(),
        }
    }

    /// A replica that could not be opened: a placeholder of `size` bytes
    /// that is never asked, until `reopen` succeeds.
    pub(crate) fn missing(
        name: String,
        uri: String,
        size: u64,
        reason: String,
        reopen: Option<Reopen>,
    ) -> Slot {
        let placeholder = Unavailable {
            size,
            reason: reason.clone(),
        };
        Slot {
            name,
            replica: RwLock::new(Arc::new(placeholder)),
            state: AtomicU8::new(ReplicaState::Failed as u8),
            uri: Mutex::new(uri),
            generation: AtomicU64::new(0),
            reason: Mutex::new(reason),
            reopen: Mutex::new(reopen),
            counters: Counters::default(),
        }
    }

    /// An empty slot of a disk of `size` bytes.
    fn vacant(name: String, size: u64) -> Slot {
        let placeholder = Unavailable {
            size,
            reason: "no replica in this slot".into(),
        };
        Slot {
            name,
            replica: RwLock::new(Arc::new(placeholder)),
            state: AtomicU8::new(VACANT),
            uri: Mutex::new(String::new()),
            generation: AtomicU64::new(0),
            reason: Mutex::new(String::new()),
            reopen: Mutex::new(None),
            counters: Counters::default(),
        }
    }

    /// The replica, for one request.
    pub(crate) fn replica(&self) -> Arc<dyn Replica> {
        Arc::clone(&self.replica.read())
    }

    /// The state of a replica in the slot (an empty slot reads as stale:
    /// check [`Slot::is_present`] where that matters).
    pub(crate) fn state(&self) -> ReplicaState {
        ReplicaState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The state as the record stores it ([`VACANT`] for an empty slot).
    pub(crate) fn state_byte(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// A replica is in the slot (it was not removed).
    pub(crate) fn is_present(&self) -> bool {
        self.state.load(Ordering::Acquire) != VACANT
    }

    /// Present, up, and missing something: stale, resyncing or new.
    pub(crate) fn is_lagging(&self) -> bool {
        let s = self.state.load(Ordering::Acquire);
        s != VACANT && s != ReplicaState::InSync as u8 && s != ReplicaState::Failed as u8
    }

    /// The state's name, `removed` for an empty slot.
    pub(crate) fn state_name(&self) -> &'static str {
        if self.is_present() {
            self.state().as_str()
        } else {
            VACANT_NAME
        }
    }

    /// Where the replica is.
    pub(crate) fn uri(&self) -> String {
        self.uri.lock().clone()
    }

    /// Empty the slot (the caller holds the control lock and has quiesced
    /// the disk); returns the replica that was there, as [`Slot::install`].
    pub(crate) fn vacate(&self, size: u64) -> Arc<dyn Replica> {
        let placeholder = Unavailable {
            size,
            reason: "removed from the disk".into(),
        };
        self.install(Arc::new(placeholder), String::new(), VACANT)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Put `replica` in the slot, in state `state` (the caller holds the
    /// control lock and has quiesced the disk). Returns the replica that
    /// was there, to drop outside any lock: requests still holding it keep
    /// it open until they end.
    pub(crate) fn install(
        &self,
        replica: Arc<dyn Replica>,
        uri: String,
        state: u8,
    ) -> Arc<dyn Replica> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        *self.reopen.lock() = None;
        self.reason.lock().clear();
        *self.uri.lock() = uri;
        let old = std::mem::replace(&mut *self.replica.write(), replica);
        self.state.store(state, Ordering::Release);
        old
    }

    /// Why it is failed (empty while it is up).
    pub(crate) fn reason(&self) -> String {
        if self.is_up() {
            String::new()
        } else {
            self.reason.lock().clone()
        }
    }

    /// Present and not failed: it is asked (reads only where it missed
    /// nothing).
    pub(crate) fn is_up(&self) -> bool {
        let s = self.state.load(Ordering::Acquire);
        s != ReplicaState::Failed as u8 && s != VACANT
    }

    /// Set the state; returns the old one.
    pub(crate) fn swap_state(&self, to: ReplicaState) -> ReplicaState {
        ReplicaState::from_u8(self.state.swap(to as u8, Ordering::AcqRel))
    }

    /// The error a request gets for a replica it did not ask.
    /// Built on every request that goes without the replica, so no lock
    /// and no formatting: only its errno counts (it is never reported).
    pub(crate) fn skipped_error(&self, op: &'static str) -> ReplicaError {
        ReplicaError::new(
            ErrorKind::Io(libc::ENOTCONN),
            op,
            "not asked: failed, or stale in this range",
        )
    }

    /// Move from `from` to `to`; false if another thread got there first.
    pub(crate) fn transition(&self, from: ReplicaState, to: ReplicaState) -> bool {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Shared by the disk, the retry threads and the healer.
#[derive(Debug)]
pub(crate) struct Members {
    /// Every slot a disk can have (see the module doc); only the first
    /// `span` are in use.
    all: Box<[Slot]>,
    span: AtomicUsize,
    /// Serialises membership changes, the healer's batches and the retry
    /// threads' swaps. Never taken by a request.
    pub(crate) control: Mutex<()>,
    pub(crate) events: EventBus,
    pub(crate) size: u64,
    /// Orders requests, resync and reconciliation on byte ranges.
    pub(crate) ranges: RangeLock,
    /// Write intent, missed chunks and resync (with a persistent record).
    pub(crate) heal: Option<Heal>,
    /// Set when the disk is closed; background threads wait on `wake`.
    closed: Mutex<bool>,
    wake: Condvar,
}

impl Members {
    pub(crate) fn new(slots: Vec<Slot>, size: u64, heal: Option<Heal>) -> Arc<Members> {
        let span = slots.len();
        let mut all = slots;
        // Slots past the configured ones are named replica-k, unless a
        // configured replica took that name already.
        let mut k = span;
        while all.len() < quorum_vote::MAX_REPLICAS {
            while all.iter().any(|s| s.name == format!("replica-{k}")) {
                k += 1;
            }
            all.push(Slot::vacant(format!("replica-{k}"), size));
            k += 1;
        }
        let members = Arc::new(Members {
            all: all.into_boxed_slice(),
            span: AtomicUsize::new(span),
            control: Mutex::new(()),
            events: EventBus::default(),
            size,
            ranges: RangeLock::default(),
            heal,
            closed: Mutex::new(false),
            wake: Condvar::new(),
        });
        for (i, slot) in members.slots().iter().enumerate() {
            if slot.is_up() {
                continue;
            }
            let reason = slot.reason.lock().clone();
            if slot.reopen.lock().is_some() {
                tracing::warn!(
                    replica = %slot.name,
                    "replica {} could not be opened: {reason}; going on without it, retrying in the background",
                    slot.name
                );
                Members::spawn_retry(&members, i);
            } else {
                tracing::warn!(
                    replica = %slot.name,
                    "replica {} could not be opened: {reason}; going on without it",
                    slot.name
                );
            }
        }
        members
    }

    /// The slots in use: a replica's index is its place here. Grows only
    /// while the disk is quiesced (see the module doc).
    pub(crate) fn slots(&self) -> &[Slot] {
        &self.all[..self.span.load(Ordering::Acquire)]
    }

    /// Every slot, used or not (for membership changes).
    pub(crate) fn all_slots(&self) -> &[Slot] {
        &self.all
    }

    /// One more slot in use: `i`, the first past the span (the caller
    /// holds the control lock and has quiesced the disk).
    pub(crate) fn extend_span(&self, i: usize) {
        debug_assert_eq!(self.span.load(Ordering::Acquire), i);
        self.span.store(i + 1, Ordering::Release);
    }

    /// Mark replica `i` failed after `err`, once: emits the state change
    /// and starts the retry thread.
    pub(crate) fn fail(self: &Arc<Self>, i: usize, err: &ReplicaError) {
        let slot = &self.slots()[i];
        if !slot.is_present() {
            return;
        }
        let old = slot.state();
        if old == ReplicaState::Failed || !slot.transition(old, ReplicaState::Failed) {
            return;
        }
        let reason = err.to_string();
        *slot.reason.lock() = reason.clone();
        self.announce(i, old, ReplicaState::Failed, reason);
        Members::spawn_retry(self, i);
    }

    /// Emit (and record) a state change that has happened.
    pub(crate) fn announce(&self, i: usize, old: ReplicaState, new: ReplicaState, reason: String) {
        if old == new {
            return;
        }
        if let Some(h) = &self.heal {
            h.save_state(i, new);
        }
        self.events.emit(Event::ReplicaState {
            node_name: self.slots()[i].name.clone(),
            old: old.to_string(),
            new: new.to_string(),
            reason,
        });
    }

    /// Replica `i` has missed chunks now: an in-sync one becomes stale.
    pub(crate) fn note_missed(&self, i: usize) {
        if self.slots()[i].transition(ReplicaState::InSync, ReplicaState::Stale) {
            self.announce(
                i,
                ReplicaState::InSync,
                ReplicaState::Stale,
                "it missed a write".into(),
            );
        }
        self.poke();
    }

    /// Wake the background threads (new work for the healer).
    pub(crate) fn poke(&self) {
        self.wake.notify_all();
    }

    /// True once the disk is closing.
    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.lock()
    }

    fn spawn_retry(members: &Arc<Members>, i: usize) {
        let m = Arc::clone(members);
        let generation = members.slots()[i].generation();
        let spawned = std::thread::Builder::new()
            .name(format!("quorum-retry-{i}"))
            .spawn(move || m.retry_loop(i, generation));
        if let Err(e) = spawned {
            tracing::error!(replica = %members.slots()[i].name, error = %e, "cannot start the retry thread; the replica stays failed");
        }
    }

    /// Wait the whole of `d` unless the disk closes first (new work does
    /// not cut it short: retry back-off and resync throttling rely on
    /// it); true when closed.
    pub(crate) fn wait(&self, d: Duration) -> bool {
        let deadline = std::time::Instant::now() + d;
        let mut closed = self.closed.lock();
        while !*closed && !self.wake.wait_until(&mut closed, deadline).timed_out() {}
        *closed
    }

    /// Wait at most `d`, or until new work is announced ([`Members::poke`])
    /// or the disk closes; true when closed.
    pub(crate) fn wait_for_work(&self, d: Duration) -> bool {
        let mut closed = self.closed.lock();
        if !*closed {
            self.wake.wait_for(&mut closed, d);
        }
        *closed
    }

    pub(crate) fn close(&self) {
        *self.closed.lock() = true;
        self.wake.notify_all();
    }

    /// Bring replica `i` back; stops when another replica takes the slot
    /// (its `generation` changes).
    fn retry_loop(&self, i: usize, generation: u64) {
        let slot = &self.slots()[i];
        let mut delay = FIRST_RETRY;
        loop {
            if self.wait(delay) || slot.generation() != generation {
                return;
            }
            match self.try_back(i, generation) {
                Ok(None) => return,
                Ok(Some((how, replaced))) => {
                    let _control = self.control.lock();
                    if slot.generation() != generation {
                        return;
                    }
                    // Back with what it missed meanwhile recorded: stale
                    // (resynced by the healer) unless it missed nothing; new
                    // (rebuilt in full) if another replica took its place.
                    let to = match &self.heal {
                        Some(h) if replaced || h.is_rebuilding(i) => ReplicaState::New,
                        Some(h) if h.record.missed_count(i) > 0 => ReplicaState::Stale,
                        _ => ReplicaState::InSync,
                    };
                    if slot.transition(ReplicaState::Failed, to) {
                        self.announce(i, ReplicaState::Failed, to, how);
                        self.poke();
                    }
                    return;
                }
                Err(why) => {
                    tracing::debug!(replica = %slot.name, error = %why, "replica still unavailable");
                    let _control = self.control.lock();
                    if slot.generation() != generation {
                        return;
                    }
                    *slot.reason.lock() = why;
                    delay = (delay * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// Reopen the replica if it never opened, then read its first block.
    /// Returns how it came back, and whether it is another replica than
    /// the record knew (to rebuild in full); `None` when another replica
    /// took the slot meanwhile.
    fn try_back(&self, i: usize, generation: u64) -> Result<Option<(String, bool)>, String> {
        let slot = &self.slots()[i];
        let mut how = "it answers again";
        let mut replaced = false;
        // The way to reopen it is taken out while it runs (an NBD connect
        // may take its timeout): a membership change never waits on it.
        let reopen = slot.reopen.lock().take();
        if let Some(f) = reopen {
            let opened = f().and_then(|(r, identity)| {
                if r.size() == self.size {
                    Ok((r, identity))
                } else {
                    Err(format!(
                        "it opened with size {} bytes, but the disk has {} bytes",
                        r.size(),
                        self.size
                    ))
                }
            });
            let _control = self.control.lock();
            if slot.generation() != generation {
                return Ok(None);
            }
            let (r, identity) = match opened {
                Ok(o) => o,
                Err(why) => {
                    *slot.reopen.lock() = Some(f);
                    return Err(why);
                }
            };
            if let Some(h) = &self.heal
                && h.adopt(i, identity)
            {
                how = "it could be opened, but it is not the replica the record knows: rebuilding it in full";
                replaced = true;
            } else {
                how = "it could be opened";
            }
            *slot.replica.write() = Arc::from(r);
        }
        let mut probe = vec![0u8; self.size.min(4096) as usize];
        slot.replica()
            .read_at(&mut probe, 0)
            .map_err(|e| e.to_string())?;
        Ok(Some((how.to_owned(), replaced)))
    }
}

/// Stands in for a replica that could not be opened. Never asked while the
/// slot is failed; answers every call with the reason, just in case.
#[derive(Debug)]
struct Unavailable {
    size: u64,
    reason: String,
}

impl Unavailable {
    fn error(&self, op: &'static str) -> ReplicaError {
        ReplicaError::new(ErrorKind::Io(libc::ENOTCONN), op, self.reason.clone())
    }
}

impl Replica for Unavailable {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> quorum_replica::Result<()> {
        Err(self.error("read"))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64, _fua: bool) -> quorum_replica::Result<()> {
        Err(self.error("write"))
    }
    fn write_zeroes(&self, _o: u64, _l: u64, _u: bool, _f: bool) -> quorum_replica::Result<()> {
        Err(self.error("write_zeroes"))
    }
    fn flush(&self) -> quorum_replica::Result<()> {
        Err(self.error("flush"))
    }
}
