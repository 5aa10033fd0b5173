//! OFD byte-range locks in QEMU's image-locking layout.
//!
//! QEMU (`file-posix`) expresses block-layer permissions as shared (read)
//! OFD locks on single bytes: byte `100 + bit` means "I use permission
//! `bit`", byte `200 + bit` means "I refuse to share permission `bit`".
//! Bits: 0 consistent read, 1 write, 2 write-unchanged, 3 resize.
//! An opener first takes its bytes, then tests the opposite bytes for
//! locks held by other open file descriptions; that order makes two racing
//! openers see each other.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

const PERM_CONSISTENT_READ: u32 = 1 << 0;
const PERM_WRITE: u32 = 1 << 1;
const PERM_RESIZE: u32 = 1 << 3;
const PERM_BITS: u32 = 4;

/// The permission set of one opener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockMode {
    /// Permissions we use (locked at `100 + bit`).
    perm: u32,
    /// Permissions we refuse to others (locked at `200 + bit`).
    unshared: u32,
}

impl LockMode {
    /// A writer of an image: reads, writes and may resize; shares neither
    /// write nor resize (like QEMU's writable image nodes).
    pub(crate) const WRITER: LockMode = LockMode {
        perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        unshared: PERM_WRITE | PERM_RESIZE,
    };
    /// A reader: reads consistently, refuses writers and resizers, shares
    /// with other readers (like QEMU's read-only opens and `qemu-img info`).
    pub(crate) const READER: LockMode = LockMode {
        perm: PERM_CONSISTENT_READ,
        unshared: PERM_WRITE | PERM_RESIZE,
    };
}

fn perm_name(bit: u32) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

fn flock_for(kind: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: `flock` is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_shared_lock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_for(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: valid fd and a pointer to an initialised `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether another open file description holds any lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_for(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: valid fd and a pointer to an initialised `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub(crate) enum LockFailure {
    /// Another process holds a conflicting lock; the text names the permission.
    Conflict(String),
    /// fcntl itself failed.
    Io(io::Error),
}

/// Take `mode`'s locks on `file` (kept until every fd of this open file
/// description is closed), then check nobody else conflicts.
pub(crate) fn lock(file: &File, mode: LockMode) -> Result<(), LockFailure> {
    for bit in 0..PERM_BITS {
        if mode.perm & (1 << bit) != 0 {
            set_shared_lock(file, PERM_BASE + i64::from(bit)).map_err(LockFailure::Io)?;
        }
        if mode.unshared & (1 << bit) != 0 {
            set_shared_lock(file, SHARED_BASE + i64::from(bit)).map_err(LockFailure::Io)?;
        }
    }
    for bit in 0..PERM_BITS {
        if mode.perm & (1 << bit) != 0
            && held_by_other(file, SHARED_BASE + i64::from(bit)).map_err(LockFailure::Io)?
        {
            return Err(LockFailure::Conflict(format!(
                "another process refuses to share the \"{}\" permission",
                perm_name(bit)
            )));
        }
        if mode.unshared & (1 << bit) != 0
            && held_by_other(file, PERM_BASE + i64::from(bit)).map_err(LockFailure::Io)?
        {
            return Err(LockFailure::Conflict(format!(
                "another process holds the \"{}\" permission",
                perm_name(bit)
            )));
        }
    }
    Ok(())
}
