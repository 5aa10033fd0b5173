//! Read replies sent straight from a replica's page cache with `sendfile`,
//! saving the copy of the data through user space into the socket.
//!
//! The reply still carries the voted bytes in its own buffer. Whatever the
//! file cannot supply (an error, a short file) or whatever waits too long for
//! socket space is sent from that buffer instead. Until the last byte has
//! left through `sendfile`, the reply holds its range in [`RangeOrder`], so
//! no write can change the pages being sent; the fallback releases it first.
//!
//! [`RangeOrder`]: super::order::RangeOrder

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use quorum_engine::FileRegion;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{tcp, unix};

use super::order::OrderGuard;

/// How long a reply may wait for socket space while it holds its range.
/// Past that it finishes from its own buffer, so a client that stops
/// reading cannot hold up writes to that range from other clients.
const PATIENCE: Duration = Duration::from_millis(100);

/// The unix socket send buffer asked for under [`ZeroCopy::Auto`]: room
/// for a 1 MiB reply whole (the kernel doubles the value it is given).
///
/// [`ZeroCopy::Auto`]: super::ZeroCopy::Auto
const UNIX_SNDBUF: usize = 1 << 20;

/// The write half of a client socket.
pub(crate) trait ReplySocket: AsyncWrite + Unpin + Send + 'static {
    /// Make room for large replies if the socket needs it; true if the
    /// send buffer now holds a 1 MiB reply whole.
    fn roomy(&self) -> bool;
    /// Wait until the socket has space.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send + '_;
    /// One non-blocking `sendfile` of up to `len` bytes of `file` at
    /// `offset`: bytes sent, or `WouldBlock`.
    fn try_sendfile(&self, file: &std::fs::File, offset: u64, len: usize) -> io::Result<usize>;
}

/// `writable` and `try_sendfile` for a tokio socket half.
macro_rules! socket_io {
    () => {
        fn writable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
            self.as_ref().writable()
        }
        fn try_sendfile(&self, file: &std::fs::File, offset: u64, len: usize) -> io::Result<usize> {
            let sock = self.as_ref();
            sock.try_io(Interest::WRITABLE, || {
                sendfile(sock.as_fd(), file, offset, len)
            })
        }
    };
}

impl ReplySocket for unix::OwnedWriteHalf {
    fn roomy(&self) -> bool {
        let sock = self.as_ref();
        let _ = setsockopt(sock, sockopt::SndBuf, &UNIX_SNDBUF);
        getsockopt(sock, sockopt::SndBuf).is_ok_and(|n| n >= UNIX_SNDBUF)
    }
    socket_io!();
}

impl ReplySocket for tcp::OwnedWriteHalf {
    /// TCP grows its send buffer by itself (`net.ipv4.tcp_wmem`).
    fn roomy(&self) -> bool {
        true
    }
    socket_io!();
}

fn sendfile(
    sock: std::os::fd::BorrowedFd<'_>,
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off =
        i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::sys::sendfile::sendfile64(sock, file, Some(&mut off), len).map_err(io::Error::from)
}

/// Send `data` (the voted bytes) using `region`, which holds the same bytes,
/// then release `order`. Errors are the socket's; a file that fails only
/// makes the rest come from `data`.
pub(crate) async fn send_region<W: ReplySocket>(
    wr: &mut W,
    region: &FileRegion,
    data: &[u8],
    mut order: Option<OrderGuard>,
) -> io::Result<()> {
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sent < data.len() {
        let offset = region.offset + sent as u64;
        match wr.try_sendfile(&region.file, offset, data.len() - sent) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout_at(deadline, wr.writable()).await {
                    Ok(r) => r?,
                    Err(_) => break,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    order.take();
    wr.write_all(&data[sent..]).await
}
