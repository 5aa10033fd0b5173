//! A small pool of read buffers, so the read path does not fault in fresh
//! memory for every request (QEMU's profile spends most of its time there).

use parking_lot::Mutex;

/// Buffers kept at most; more are freed.
const MAX_POOLED: usize = 64;
/// Buffers larger than this are not kept.
const MAX_POOLED_LEN: usize = 32 << 20;

#[derive(Debug, Default)]
pub(crate) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A buffer of at least `len` initialised bytes (contents unspecified).
    pub(crate) fn get(&self, len: usize) -> Vec<u8> {
        let mut free = self.free.lock();
        if let Some(i) = free.iter().position(|b| b.len() >= len) {
            return free.swap_remove(i);
        }
        drop(free);
        vec![0; len.max(4096).next_power_of_two()]
    }

    pub(crate) fn put(&self, buf: Vec<u8>) {
        if buf.len() > MAX_POOLED_LEN {
            return;
        }
        let mut free = self.free.lock();
        if free.len() < MAX_POOLED {
            free.push(buf);
        }
    }
}
