//! Reusable, page-aligned read buffers. A reply's data is a `Bytes` that
//! owns a pooled buffer and gives it back when the reply has been written,
//! so steady reads neither fault in fresh memory nor zero it.

use std::sync::Arc;

use parking_lot::Mutex;
use quorum_engine::AlignedBuf;

/// Buffers kept per export.
const MAX_KEPT: usize = 128;
/// Buffers larger than this are freed, not kept.
const MAX_KEPT_LEN: usize = 4 << 20;

#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<AlignedBuf>>,
}

/// A buffer of `len` bytes that returns to its pool on drop.
#[derive(Debug)]
pub(crate) struct PooledBuf {
    /// Always `Some` until dropped.
    buf: Option<AlignedBuf>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl BufferPool {
    /// A buffer of exactly `len` bytes (contents unspecified).
    pub(crate) fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let found = {
            let mut free = self.free.lock();
            free.iter()
                .position(|b| b.len() >= len)
                .map(|i| free.swap_remove(i))
        };
        let buf = found.unwrap_or_else(|| AlignedBuf::new(len.next_power_of_two().max(4096)));
        PooledBuf {
            buf: Some(buf),
            len,
            pool: self.clone(),
        }
    }
}

impl PooledBuf {
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut().expect("buffer present")[..self.len]
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("buffer present")[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        if buf.len() > MAX_KEPT_LEN {
            return;
        }
        let mut free = self.pool.free.lock();
        if free.len() < MAX_KEPT {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_buffer_is_reused() {
        let pool = Arc::new(BufferPool::default());
        let ptr = pool.get(4096).as_ref().as_ptr();
        assert_eq!(pool.get(1000).as_ref().as_ptr(), ptr);
    }

    #[test]
    fn buffer_has_the_requested_length() {
        let pool = Arc::new(BufferPool::default());
        assert_eq!(pool.get(1000).as_ref().len(), 1000);
    }
}
