//! Arrival-order execution for overlapping requests on one export.
//!
//! Requests are registered synchronously as they are decoded (so across all
//! connections of an export, registration order is arrival order). A
//! request waits for every earlier in-flight request that overlaps it when
//! at least one of the two writes. Two reads never wait for each other.
//! This keeps a read from seeing half of a concurrent write (which would
//! make replicas look divergent) and applies overlapping writes in order.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    write: bool,
    done: CancellationToken,
}

/// The in-flight ranges of one export.
#[derive(Debug, Default)]
pub(crate) struct RangeOrder {
    inner: Mutex<(u64, Vec<Entry>)>,
}

/// A registered request; dropping it lets later overlapping requests run.
#[derive(Debug)]
pub(crate) struct OrderGuard {
    order: Arc<RangeOrder>,
    id: u64,
    deps: Vec<CancellationToken>,
    done: CancellationToken,
}

impl RangeOrder {
    /// Register `[start, start + len)`; `write` for requests that change data.
    pub(crate) fn register(self: &Arc<Self>, start: u64, len: u64, write: bool) -> OrderGuard {
        let end = start.saturating_add(len);
        let done = CancellationToken::new();
        let mut g = self.inner.lock();
        let (next_id, active) = &mut *g;
        let deps = active
            .iter()
            .filter(|e| (write || e.write) && e.start < end && start < e.end)
            .map(|e| e.done.clone())
            .collect();
        let id = *next_id;
        *next_id += 1;
        if len > 0 {
            active.push(Entry {
                id,
                start,
                end,
                write,
                done: done.clone(),
            });
        }
        OrderGuard {
            order: self.clone(),
            id,
            deps,
            done,
        }
    }

    #[cfg(test)]
    pub(crate) fn active(&self) -> usize {
        self.inner.lock().1.len()
    }
}

impl OrderGuard {
    /// True when no earlier conflicting request is still running.
    pub(crate) fn is_ready(&self) -> bool {
        self.deps.iter().all(CancellationToken::is_cancelled)
    }

    /// Wait until every earlier conflicting request has finished.
    pub(crate) async fn wait(&mut self) {
        for d in self.deps.drain(..) {
            d.cancelled().await;
        }
    }
}

impl Drop for OrderGuard {
    fn drop(&mut self) {
        let mut g = self.order.inner.lock();
        if let Some(i) = g.1.iter().position(|e| e.id == self.id) {
            g.1.swap_remove(i);
        }
        drop(g);
        self.done.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_ready(g: &mut OrderGuard) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let fut = std::pin::pin!(g.wait());
        fut.poll(&mut cx).is_ready()
    }

    use std::future::Future;

    #[test]
    fn overlapping_write_waits_for_earlier_write() {
        let o = Arc::new(RangeOrder::default());
        let first = o.register(0, 4096, true);

        let mut second = o.register(1024, 10, true);

        assert!(!is_ready(&mut second));
        drop(first);
    }

    #[test]
    fn write_runs_once_earlier_overlap_is_dropped() {
        let o = Arc::new(RangeOrder::default());
        let first = o.register(0, 4096, false);
        let mut second = o.register(0, 4096, true);

        drop(first);

        assert!(is_ready(&mut second));
    }

    #[test]
    fn reads_do_not_wait_for_reads() {
        let o = Arc::new(RangeOrder::default());
        let _first = o.register(0, 4096, false);

        let mut second = o.register(0, 4096, false);

        assert!(is_ready(&mut second));
    }

    #[test]
    fn disjoint_writes_do_not_wait() {
        let o = Arc::new(RangeOrder::default());
        let _first = o.register(0, 4096, true);

        let mut second = o.register(4096, 4096, true);

        assert!(is_ready(&mut second));
    }

    #[test]
    fn dropped_guards_leave_no_entries() {
        let o = Arc::new(RangeOrder::default());

        drop(o.register(0, 1, true));
        drop(o.register(0, 1, false));

        assert_eq!(o.active(), 0);
    }
}
