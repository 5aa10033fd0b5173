//! Errors of replica I/O: a kind, the context, and the source.

use std::io;

/// Result of a replica operation.
pub type Result<T, E = ReplicaError> = std::result::Result<T, E>;

/// What went wrong, as a class the engine can vote on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An OS error, by errno (EIO, ENOSPC, ...).
    Io(i32),
    /// The backend does not implement this operation.
    Unsupported,
    /// The range lies beyond the end of the replica.
    OutOfRange,
    /// The replica is opened read-only.
    ReadOnly,
}

/// An error from a replica, with the operation and location it hit.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed{}: {message}", at.map(|(o, l)| format!(" at offset {o} length {l}")).unwrap_or_default())]
pub struct ReplicaError {
    /// The class of error.
    pub kind: ErrorKind,
    /// The operation (`read`, `write`, `flush`, `open`, ...).
    pub op: &'static str,
    /// Offset and length, when the operation had one.
    pub at: Option<(u64, u64)>,
    /// Human-readable detail.
    pub message: String,
}

impl ReplicaError {
    /// A new error.
    pub fn new(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> Self {
        ReplicaError { kind, op, at: None, message: message.into() }
    }

    /// An error from an `io::Error`.
    pub fn io(op: &'static str, err: &io::Error) -> Self {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        ReplicaError::new(ErrorKind::Io(errno), op, err.to_string())
    }

    /// "operation not supported by this backend".
    pub fn unsupported(op: &'static str) -> Self {
        ReplicaError::new(ErrorKind::Unsupported, op, "not supported by this replica")
    }

    /// Attach the range the operation covered.
    pub fn at(mut self, offset: u64, len: u64) -> Self {
        self.at = Some((offset, len));
        self
    }

    /// The errno this error maps to (for votes and NBD replies).
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io(e) => e,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::OutOfRange => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EPERM,
        }
    }
}
