//! A request's [`Failure`] (the errno the engine votes on, words, and
//! whether the connection was lost) and the NBD-to-host errno mapping.

use std::fmt;
use std::io;

use nbd_proto::consts::errno as nbd_errno;

/// A request's failure: the errno the engine votes on, and words.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) errno: i32,
    pub(super) message: String,
    /// The connection was lost (closed or reset, not a timeout): worth one
    /// retry on a new connection.
    pub(super) lost: bool,
}

impl Failure {
    pub(super) fn new(errno: i32, message: impl Into<String>) -> Self {
        Failure {
            errno,
            message: message.into(),
            lost: false,
        }
    }

    /// The connection is gone: ENOTCONN, which the engine takes for an
    /// unreachable replica (see `quorum_engine::membership`).
    pub(super) fn lost(message: impl Into<String>) -> Self {
        Failure {
            lost: true,
            ..Failure::new(libc::ENOTCONN, message)
        }
    }

    pub(super) fn io(what: &str, e: &io::Error) -> Self {
        if is_timeout(e) {
            return Failure::new(libc::ETIMEDOUT, format!("{what}: timed out"));
        }
        Failure::lost(format!("{what}: {e}"))
    }

    pub(super) fn protocol(detail: impl fmt::Display) -> Self {
        Failure::new(
            libc::EIO,
            format!("protocol error from the server: {detail}"),
        )
    }

    /// An error the server replied with.
    pub(super) fn server(error: u32, message: &str) -> Self {
        let errno = host_errno(error);
        let message = if message.is_empty() {
            format!("the server replied {}", io::Error::from_raw_os_error(errno))
        } else {
            format!("the server replied: {message}")
        };
        Failure::new(errno, message)
    }
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The host errno for an NBD error value.
pub fn host_errno(nbd: u32) -> i32 {
    match nbd {
        nbd_errno::EPERM => libc::EPERM,
        nbd_errno::EIO => libc::EIO,
        nbd_errno::ENOMEM => libc::ENOMEM,
        nbd_errno::EINVAL => libc::EINVAL,
        nbd_errno::ENOSPC => libc::ENOSPC,
        nbd_errno::EOVERFLOW => libc::EOVERFLOW,
        nbd_errno::ENOTSUP => libc::ENOTSUP,
        nbd_errno::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}
