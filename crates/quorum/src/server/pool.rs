//! Reusable, page-aligned read buffers for replies. A reply's data is a
//! `Bytes` that owns a buffer from the engine's [`BufPool`] and gives it back
//! when the reply has been written, so steady reads neither fault in fresh
//! memory nor zero it.

use std::sync::Arc;

use quorum_engine::{AlignedBuf, BufPool};

/// Buffers kept per export.
const MAX_KEPT: usize = 128;
/// Buffers larger than this are freed, not kept.
const MAX_KEPT_LEN: usize = 4 << 20;

/// The per-export pool of reply and write-payload buffers.
#[derive(Debug)]
pub(crate) struct BufferPool(BufPool);

impl Default for BufferPool {
    fn default() -> Self {
        BufferPool(BufPool::with_limits(MAX_KEPT, MAX_KEPT_LEN))
    }
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
        PooledBuf {
            buf: Some(self.0.get(len)),
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
        if let Some(buf) = self.buf.take() {
            self.pool.0.put(buf);
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
