//! Raw files and block devices: `pread`/`pwrite`, `fallocate`, `SEEK_DATA`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::lock::{self, LockFailure, LockMode};
use crate::{ErrorKind, Extent, FileRegion, OpenError, OpenOptions, Replica, ReplicaError, Result};

/// Alignment used for `O_DIRECT` (covers 512- and 4096-byte sectors).
const DIRECT_ALIGN: usize = 4096;
/// Largest chunk of zeroes written at once when fallocate can't help.
const ZERO_CHUNK: usize = 1 << 20;

/// A raw image: a regular file or a block device, byte for byte.
///
/// The size is fixed at open (file length, or `BLKGETSIZE64`). With
/// `direct`, the file is opened `O_DIRECT`; unaligned requests go through an
/// aligned bounce buffer, and unaligned writes read-modify-write under one
/// mutex (so the size must be a multiple of 4096).
#[derive(Debug)]
pub struct RawReplica {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Some in `O_DIRECT` mode: serialises read-modify-write of partial blocks.
    rmw: Option<Mutex<()>>,
}

/// Open `path` read-write or read-only, optionally `O_DIRECT`, and take
/// QEMU-compatible OFD locks for `mode`.
pub(crate) fn open_locked(
    path: &Path,
    write: bool,
    direct: bool,
    mode: Option<LockMode>,
) -> Result<File, OpenError> {
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(write);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    let file = oo.open(path).map_err(|e| OpenError::io(path, "open", e))?;
    let Some(mode) = mode else { return Ok(file) };
    match lock::lock(&file, mode) {
        Ok(()) => Ok(file),
        Err(LockFailure::Conflict(detail)) => Err(OpenError::Locked {
            path: path.to_path_buf(),
            detail,
        }),
        Err(LockFailure::Io(e)) => Err(OpenError::io(path, "lock", e)),
    }
}

/// Size of a regular file or block device.
pub(crate) fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 through a valid pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

pub(crate) fn check_range(size: u64, op: &'static str, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ReplicaError::new(
            ErrorKind::OutOfRange,
            op,
            format!("range ends beyond the replica size {size}"),
        )
        .at(offset, len)),
    }
}

/// Refuse writes to a read-only replica, then check the range.
pub(crate) fn check_writable(
    read_only: bool,
    size: u64,
    op: &'static str,
    offset: u64,
    len: u64,
) -> Result<()> {
    if read_only {
        return Err(
            ReplicaError::new(ErrorKind::ReadOnly, op, "replica is opened read-only")
                .at(offset, len),
        );
    }
    check_range(size, op, offset, len)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on a valid fd.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fallocate_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::ENODEV)
    )
}

/// A heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> Self {
        let layout =
            std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `layout.size()` initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `zeroed`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn aligned(offset: u64, len: usize, ptr: *const u8) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && len.is_multiple_of(DIRECT_ALIGN)
        && (ptr as usize).is_multiple_of(DIRECT_ALIGN)
}

impl RawReplica {
    /// Open a raw file or block device, taking writer or reader OFD locks.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self, OpenError> {
        let mode = if opts.read_only {
            LockMode::READER
        } else {
            LockMode::WRITER
        };
        let file = open_locked(
            path,
            !opts.read_only,
            opts.direct,
            (!opts.no_locking).then_some(mode),
        )?;
        let size = file_size(&file).map_err(|e| OpenError::io(path, "get size", e))?;
        if opts.direct && !size.is_multiple_of(DIRECT_ALIGN as u64) {
            return Err(OpenError::invalid(
                path,
                format!("direct I/O needs a size that is a multiple of {DIRECT_ALIGN}, not {size}"),
            ));
        }
        Ok(RawReplica {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size,
            read_only: opts.read_only,
            rmw: opts.direct.then(|| Mutex::new(())),
        })
    }

    /// The file this replica reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writable(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        check_writable(self.read_only, self.size, op, offset, len)
    }

    fn datasync(&self, op: &'static str) -> Result<()> {
        self.file.sync_data().map_err(|e| ReplicaError::io(op, &e))
    }

    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.rmw.is_none() || aligned(offset, buf.len(), buf.as_ptr()) {
            return self.file.write_all_at(buf, offset);
        }
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).next_multiple_of(DIRECT_ALIGN as u64);
        let mut bounce = AlignedBuf::zeroed((end - start) as usize);
        let b = bounce.as_mut();
        let head = (offset - start) as usize;
        let partial = head != 0 || !(offset + buf.len() as u64).is_multiple_of(DIRECT_ALIGN as u64);
        let _guard = self.rmw.as_ref().map(|m| m.lock());
        if partial {
            self.file.read_exact_at(b, start)?;
        }
        b[head..head + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(b, start)
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.rmw.is_none() || aligned(offset, buf.len(), buf.as_ptr()) {
            return self.file.read_exact_at(buf, offset);
        }
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).next_multiple_of(DIRECT_ALIGN as u64);
        let mut bounce = AlignedBuf::zeroed((end - start) as usize);
        let b = bounce.as_mut();
        self.file.read_exact_at(b, start)?;
        let head = (offset - start) as usize;
        buf.copy_from_slice(&b[head..head + buf.len()]);
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = len.min(ZERO_CHUNK as u64) as usize;
        let mut zeroes = AlignedBuf::zeroed(chunk);
        let zeroes = &zeroes.as_mut()[..chunk];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            self.pwrite(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// `lseek` with SEEK_DATA / SEEK_HOLE; `None` when past the last data.
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: plain syscall on a valid fd; we never rely on the file position.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as i64, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

impl Replica for RawReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, "read", offset, buf.len() as u64)?;
        self.pread(buf, offset)
            .map_err(|e| ReplicaError::io("read", &e).at(offset, buf.len() as u64))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.writable("write", offset, buf.len() as u64)?;
        self.pwrite(buf, offset)
            .map_err(|e| ReplicaError::io("write", &e).at(offset, buf.len() as u64))?;
        if fua { self.datasync("write") } else { Ok(()) }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        self.writable("write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        let res = match fallocate(&self.file, mode, offset, len) {
            Err(e) if fallocate_unsupported(&e) => self.write_zero_bytes(offset, len),
            other => other,
        };
        res.map_err(|e| ReplicaError::io("write_zeroes", &e).at(offset, len))?;
        if fua {
            self.datasync("write_zeroes")
        } else {
            Ok(())
        }
    }

    /// Punches a hole; where the file system can't, writes zeroes, so the
    /// range always reads back as zeroes.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true, false)
            .map_err(|e| ReplicaError { op: "discard", ..e })
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.datasync("flush")
    }

    /// Buffered files only: with `O_DIRECT` the page cache may be stale.
    fn file_region(&self, offset: u64, len: u64) -> Option<FileRegion> {
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.size);
        (self.rmw.is_none() && inside).then(|| FileRegion {
            file: self.file.clone(),
            offset,
        })
    }

    /// Holes (per `SEEK_HOLE`) are `hole + zero`; everything else is data.
    /// Where seeking is unsupported (some block devices), all is data.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, "block_status", offset, len)?;
        let end = offset + len;
        let data = |length| Extent {
            length,
            zero: false,
            hole: false,
        };
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next_data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d.unwrap_or(end).min(end),
                Err(_) if out.is_empty() => return Ok(vec![data(len)]),
                Err(e) => return Err(ReplicaError::io("block_status", &e).at(offset, len)),
            };
            if next_data > pos {
                out.push(Extent {
                    length: next_data - pos,
                    zero: true,
                    hole: true,
                });
                pos = next_data;
                continue;
            }
            let next_hole = self
                .seek(pos, libc::SEEK_HOLE)
                .map_err(|e| ReplicaError::io("block_status", &e).at(offset, len))?
                .unwrap_or(end)
                .min(end);
            // A hole at `pos` would have moved SEEK_DATA; guard against races.
            let stop = if next_hole > pos { next_hole } else { end };
            out.push(data(stop - pos));
            pos = stop;
        }
        Ok(out)
    }
}
