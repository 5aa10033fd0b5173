//! Byte-range locks: writes exclude every overlapping request; reads share.
//!
//! Reads take shared locks so a vote never sees a write half-applied across
//! replicas (which would look like corruption and could be "repaired" with
//! stale data). Non-overlapping requests never wait for each other.

use parking_lot::{Condvar, Mutex};

#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Mutex<Vec<Held>>,
    released: Condvar,
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
        let mut held = self.held.lock();
        while held.iter().any(|h| h.conflicts(start, end, exclusive)) {
            self.released.wait(&mut held);
        }
        held.push(Held {
            id,
            start,
            end,
            exclusive,
        });
        RangeGuard { lock: self, id }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock();
        if let Some(i) = held.iter().position(|h| h.id == self.id) {
            held.swap_remove(i);
        }
        drop(held);
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
        assert_eq!(l.held.lock().len(), 2);
    }

    #[test]
    fn disjoint_exclusive_locks_coexist() {
        let l = RangeLock::default();
        let _a = l.lock(0, 10, true);
        let _b = l.lock(10, 10, true);
        assert_eq!(l.held.lock().len(), 2);
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
}
