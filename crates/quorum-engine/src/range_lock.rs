//! Byte-range locks: writes exclude every overlapping request; reads share.
//!
//! Reads take shared locks so a vote never sees a write half-applied across
//! replicas (which would look like corruption and could be "repaired" with
//! stale data). Non-overlapping requests never wait for each other.
//!
//! [`RangeLock::lock_all`] quiesces the disk (membership changes): it stops
//! new locks from being granted until every held one is released, then
//! holds the whole disk. So a thread must never take a second range lock
//! while it holds one (nothing does), or a quiesce would deadlock with it.

use parking_lot::{Condvar, Mutex};

#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Mutex<State>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct State {
    held: Vec<Held>,
    /// Quiesces waiting for every held lock to go: no new lock meanwhile
    /// (a stream of overlapping requests would starve them otherwise).
    draining: usize,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl Held {
    fn conflicts(&self, start: u64, end: u64, exclusive: bool) -> bool {
        (self.exclusive || exclusive) && self.start < end && start < self.end
    }
}

/// Releases its range on drop.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    pub(crate) fn lock(&self, offset: u64, len: u64, exclusive: bool) -> RangeGuard<'_> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (start, end) = (offset, offset.saturating_add(len.max(1)));
        let mut st = self.held.lock();
        while st.draining > 0 || st.held.iter().any(|h| h.conflicts(start, end, exclusive)) {
            self.released.wait(&mut st);
        }
        st.held.push(Held {
            id,
            start,
            end,
            exclusive,
        });
        RangeGuard { lock: self, id }
    }

    /// Every byte, exclusively, once the requests in flight have ended; no
    /// new range lock is granted while this waits.
    pub(crate) fn lock_all(&self) -> RangeGuard<'_> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        // The top bit keeps these apart from `lock`'s ids (another counter).
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) | 1 << 63;
        let mut st = self.held.lock();
        st.draining += 1;
        while !st.held.is_empty() {
            self.released.wait(&mut st);
        }
        st.draining -= 1;
        st.held.push(Held {
            id,
            start: 0,
            end: u64::MAX,
            exclusive: true,
        });
        RangeGuard { lock: self, id }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.lock.held.lock();
        if let Some(i) = st.held.iter().position(|h| h.id == self.id) {
            st.held.swap_remove(i);
        }
        drop(st);
        self.lock.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn shared_locks_on_one_range_coexist() {
        let l = RangeLock::default();
        let _a = l.lock(0, 10, false);
        let _b = l.lock(5, 10, false);
        assert_eq!(l.held.lock().held.len(), 2);
    }

    #[test]
    fn disjoint_exclusive_locks_coexist() {
        let l = RangeLock::default();
        let _a = l.lock(0, 10, true);
        let _b = l.lock(10, 10, true);
        assert_eq!(l.held.lock().held.len(), 2);
    }

    #[test]
    fn overlapping_exclusive_lock_waits_for_release() {
        let l = Arc::new(RangeLock::default());
        let first = l.lock(0, 10, true);
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, entered) = (l.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = l.lock(9, 1, true);
                entered.store(true, Ordering::SeqCst);
            })
        };
        // The waiter cannot have entered while `first` is held.
        let before = entered.load(Ordering::SeqCst);
        drop(first);
        t.join().unwrap();
        assert!(!before && entered.load(Ordering::SeqCst));
    }

    #[test]
    fn quiesce_waits_for_held_locks_and_new_ones_wait_for_it() {
        let l = Arc::new(RangeLock::default());
        let first = l.lock(0, 10, false);
        let t = {
            let l = l.clone();
            std::thread::spawn(move || {
                let all = l.lock_all();
                // A disjoint lock taken after the quiesce began.
                std::thread::scope(|s| {
                    let other = s.spawn(|| drop(l.lock(1 << 40, 1, false)));
                    let held = l.held.lock().held.len();
                    drop(all);
                    other.join().unwrap();
                    held
                })
            })
        };
        // Bounded wait until the quiesce is draining (no sleeps).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while l.held.lock().draining == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let draining = l.held.lock().draining;
        drop(first);
        // While the quiesce held everything, only it was held.
        assert_eq!((draining, t.join().unwrap()), (1, 1));
    }
}
