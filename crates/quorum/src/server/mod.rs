//! NBD server: a tokio driver for `nbd-proto`'s sans-IO state machines.
//!
//! ```text
//!  serve(listener) ── accept ──▶ connection task (one per client)
//!                                  ├─ handshake: ServerHandshake over the socket
//!                                  └─ transmission:
//!         reader loop ── RequestDecoder ─▶ check_request ─▶ RangeOrder ─▶ task per request
//!                                                                        └ spawn_blocking(Backend)
//!         writer task ◀── mpsc (header + data parts, vectored write) ◀──┘ replies, any order
//!                      └─ read data found in a replica's page cache: sendfile
//! ```
//! In-flight requests per connection are bounded (semaphore) for
//! back-pressure. Protocol errors (bad magic, truncated frames) close only
//! that client. On shutdown the listener stops, connections stop reading,
//! in-flight requests finish (bounded by a grace period) and `serve` returns
//! so the caller can flush replicas.

mod conn;
mod order;
mod pool;
mod sendfile;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use nbd_proto::ExportInfo;
use nbd_proto::consts::{errno as nbd, transmission_flags as tf};
use quorum_engine::FileRegion;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use order::RangeOrder;

/// The disk behind an export. Every call is blocking (the driver runs it on
/// tokio's blocking pool) and may run concurrently with others. Errors are
/// host errno values (`libc::EIO`, ...); the driver maps them to NBD errors.
/// Callers guarantee `offset + len <= size()`.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes; fixed for the life of the server.
    fn size(&self) -> u64;
    /// Refuse writes, trims and zeroing (`NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;
    /// True only if a flush on one connection covers writes acknowledged on
    /// every connection (`NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool;
    /// True if `write_zeroes` is much faster than writing zeroes (fast-zero
    /// requests fail with `ENOTSUP` otherwise). Default: false.
    fn can_fast_zero(&self) -> bool {
        false
    }
    /// Fill all of `buf` from `offset`; no short reads.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// Like `read`, and also where these exact bytes sit in a host file's
    /// page cache, so the reply may be sent from there with `sendfile`.
    /// The driver keeps overlapping writes waiting until it has sent them.
    /// Default: `read`, no region.
    fn read_with_region(&self, offset: u64, buf: &mut [u8]) -> Result<Option<FileRegion>, i32> {
        self.read(offset, buf).map(|()| None)
    }
    /// Write all of `data` at `offset`; with `fua`, durable on return.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), i32>;
    /// Make the range read as zeroes; `may_unmap` allows punching a hole.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<(), i32>;
    /// Discard the range (advisory; contents afterwards unspecified).
    fn trim(&self, offset: u64, len: u64) -> Result<(), i32>;
    /// Make every acknowledged write durable.
    fn flush(&self) -> Result<(), i32>;
    /// Extents `(length, hole, zero)` covering the range from `offset` in
    /// order; may stop early or run past the end of the range.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool, bool)>, i32>;
    /// True while small reads and writes complete in microseconds (page
    /// cache), so the driver may run them on its network task instead of
    /// handing them to the blocking pool. Default: false.
    fn fast_small_requests(&self) -> bool {
        false
    }
    /// Prefetch hint. Default: nothing to do.
    fn cache(&self, offset: u64, len: u64) -> Result<(), i32> {
        let _ = (offset, len);
        Ok(())
    }
}

/// One export: a name in the catalogue and the backend serving it. The
/// first export is also served under the empty (default) name.
#[derive(Clone)]
pub struct Export {
    /// Export name.
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// The disk.
    pub backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .finish_non_exhaustive()
    }
}

/// Where to accept clients.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp(TcpListener),
}

/// Driver tuning.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests in flight per connection before the driver stops reading.
    pub max_in_flight: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// How long a client may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// When read replies go out with `sendfile` from a replica's page cache.
    pub zero_copy: ZeroCopy,
    /// A large write that runs on the connection's task (see
    /// [`Backend::fast_small_requests`]) is handed to the backend in pieces
    /// of at least this many bytes as its payload arrives, so the replicas'
    /// copies overlap the client sending the rest.
    pub write_piece: usize,
}

/// When to send read replies straight from a page cache
/// ([`Backend::read_with_region`]) instead of copying them into the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// Never: every reply is copied from the request's buffer.
    Off,
    /// On sockets whose send buffer holds a whole large reply (TCP, which
    /// tunes its own; unix sockets once enlarged, as `net.core.wmem_max`
    /// allows). With a small buffer `sendfile` waits on the client for
    /// every few pages and is slower than copying.
    Auto,
    /// On every socket.
    On,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            shutdown_grace: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(30),
            zero_copy: ZeroCopy::Auto,
            write_piece: 128 * 1024,
        }
    }
}

/// Per-export state shared by all connections.
pub(crate) struct ExportState {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) order: Arc<RangeOrder>,
    pub(crate) buffers: Arc<pool::BufferPool>,
}

/// Transmission flags to advertise for a backend, truthfully.
pub fn export_flags(backend: &dyn Backend) -> u16 {
    let mut flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_CACHE;
    if backend.read_only() {
        flags |= tf::READ_ONLY;
    } else {
        flags |= tf::SEND_FUA | tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO;
    }
    if backend.can_multi_conn() {
        flags |= tf::CAN_MULTI_CONN;
    }
    flags
}

/// Map a host errno to the NBD error value sent on the wire.
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => nbd::EPERM,
        libc::ENOMEM => nbd::ENOMEM,
        libc::EINVAL => nbd::EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => nbd::ENOSPC,
        libc::EOVERFLOW => nbd::EOVERFLOW,
        libc::ENOTSUP => nbd::ENOTSUP,
        libc::ESHUTDOWN => nbd::ESHUTDOWN,
        _ => nbd::EIO,
    }
}

/// Serve `exports` on `listener` until `shutdown` is cancelled. Then stop
/// accepting, let connections finish their in-flight requests (at most
/// `config.shutdown_grace`), and return. Accept errors other than
/// resource exhaustion end the server with that error.
pub async fn serve_with(
    listener: Listener,
    exports: Vec<Export>,
    shutdown: CancellationToken,
    config: ServerConfig,
) -> io::Result<()> {
    if exports.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no exports to serve",
        ));
    }
    let catalogue: Arc<[ExportInfo]> = exports
        .iter()
        .map(|e| ExportInfo {
            name: e.name.clone(),
            description: e.description.clone(),
            size: e.backend.size(),
            flags: export_flags(&*e.backend),
        })
        .collect();
    let states: Arc<[ExportState]> = exports
        .into_iter()
        .map(|e| ExportState {
            backend: e.backend,
            order: Arc::default(),
            buffers: Arc::default(),
        })
        .collect();
    let config = Arc::new(config);
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    let result = loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            a = accept(&listener) => a,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) if is_transient(&e) => {
                warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => break Err(e),
        };
        next_id += 1;
        let ctx = conn::ConnCtx {
            id: next_id,
            catalogue: catalogue.clone(),
            exports: states.clone(),
            shutdown: shutdown.clone(),
            config: config.clone(),
        };
        debug!(conn = next_id, "client connected");
        conns.spawn(async move {
            let id = ctx.id;
            match stream {
                Stream::Unix(s) => {
                    let (r, w) = s.into_split();
                    conn::run(ctx, r, w).await
                }
                Stream::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    conn::run(ctx, r, w).await
                }
            }
            debug!(conn = id, "client gone");
        });
    };
    while conns.try_join_next().is_some() {}
    let n = conns.len();
    if n > 0 {
        info!(
            connections = n,
            "waiting for connections to finish in-flight requests"
        );
    }
    let grace = config.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!("connections did not finish in time; dropping them");
        conns.abort_all();
    }
    result
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(l: &Listener) -> io::Result<Stream> {
    match l {
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Stream::Tcp(s)),
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    ) || e.kind() == io::ErrorKind::ConnectionAborted
}
