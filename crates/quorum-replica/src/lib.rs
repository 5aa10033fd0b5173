//! Replica backends behind one small, object-safe trait.
//!
//! ```text
//!                 dyn Replica (size, read_at, write_at, write_zeroes,
//!                    │         discard, flush, block_status)
//!      ┌─────────────┼──────────────┬─────────────────┐
//!   RawReplica   Qcow2Replica    NbdReplica     FaultyReplica
//!  (file/block,  (imago, with    (remote NBD    (test-utils: errors,
//!   pread/pwrite) backing chain)  server)        corruption, delays)
//! ```
//!
//! Calls are blocking and may run concurrently from many threads (`&self`);
//! the engine fans requests out on a thread pool.
//!
//! Entry points: [`open`] (XML layer -> `Box<dyn Replica>`, with OFD locks
//! compatible with QEMU's), [`probe`]/[`probe_chain`] for `validate --probe`,
//! and [`create`] for `quorum create`. Test doubles live in [`testing`]
//! behind the `test-utils` feature.
#![warn(missing_docs)]

mod error;
mod header;
mod layout;
mod lock;
mod nbd;
mod open;
mod qcow2;
mod raw;
#[cfg(feature = "test-utils")]
pub mod testing;

pub use error::{ErrorKind, OpenError, ReplicaError, Result, chain};
pub use nbd::{
    DEFAULT_TIMEOUT as NBD_DEFAULT_TIMEOUT, NbdAddress, NbdConfig, NbdReplica, host_errno,
};
pub use open::{OpenOptions, ProbeInfo, create, open, probe, probe_chain};
pub use qcow2::Qcow2Replica;
pub use raw::RawReplica;

/// Where a replica keeps some of its bytes: a host file read through the
/// page cache, at `offset`. A server may send a reply from it with
/// `sendfile` instead of copying the bytes through user space.
#[derive(Debug, Clone)]
pub struct FileRegion {
    /// The replica's open file (shared, so a reply in flight keeps it open).
    pub file: std::sync::Arc<std::fs::File>,
    /// Byte offset in `file`.
    pub offset: u64,
}

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (> 0).
    pub length: u64,
    /// Reads of this range return zeroes.
    pub zero: bool,
    /// Not allocated in this replica (a hole, or not allocated in any layer).
    pub hole: bool,
}

/// A replica: one copy of the virtual disk.
///
/// Contract for every method:
/// - `offset + len` must lie within `size()`; otherwise the call fails with
///   [`ErrorKind::OutOfRange`] and does nothing.
/// - No alignment is required of callers; backends that need it bounce.
/// - Errors carry an errno class ([`ReplicaError::errno`]) so the engine can
///   vote on them; an optional operation a backend lacks fails with
///   [`ErrorKind::Unsupported`], never a panic.
pub trait Replica: Send + Sync + std::fmt::Debug {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` entirely from `offset`. There are no short reads: either
    /// every byte is read or an error is returned.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Write all of `buf` at `offset`. With `fua`, the data is on stable
    /// storage when this returns (raw: `fdatasync`; qcow2: metadata flush
    /// plus sync). A read-only replica fails with [`ErrorKind::ReadOnly`].
    /// Writes to disjoint ranges may run concurrently; callers serialise
    /// overlapping ones.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;

    /// Make `len` bytes at `offset` read as zeroes. With `may_unmap`, the
    /// backend may deallocate the range instead of writing zeroes; either
    /// way the range reads as zeroes afterwards (never backing data).
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()>;

    /// Deallocate `len` bytes at `offset`. Contents afterwards are
    /// unspecified by the trait; every backend in this crate reads zeroes
    /// afterwards (so replicas stay identical). Default: unsupported.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(ReplicaError::unsupported("discard"))
    }

    /// Make every completed write durable. A no-op on read-only replicas.
    fn flush(&self) -> Result<()>;

    /// Allocation and zero status of `[offset, offset + len)`, as extents
    /// that cover the range from `offset` in order (the last one may end
    /// early: callers ask again). `hole` means unallocated in every layer
    /// (and then also `zero`); data from a backing layer is not a hole.
    /// Default: all data.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent {
            length: len,
            zero: false,
            hole: false,
        }])
    }

    /// True for replicas behind a network hop (NBD): the engine always
    /// fans out to them in parallel. Default: false.
    fn is_remote(&self) -> bool {
        false
    }

    /// Where this replica's bytes `[offset, offset + len)` sit, unchanged,
    /// in a host file read through the page cache (raw files without
    /// `O_DIRECT`). Callers that have just read and voted these bytes may
    /// send them from there. Default: `None`; wrappers that alter data (test
    /// faults) must keep it so.
    fn file_region(&self, offset: u64, len: u64) -> Option<FileRegion> {
        let _ = (offset, len);
        None
    }
}
