//! Remote replicas over NBD: a blocking client on nbd-proto's sans-IO
//! state machines.
//!
//! ```text
//!  callers (any thread) ─▶ writer mutex ─▶ socket ─▶ server
//!        ▲                                    │
//!        └─ per-request channel ◀─ reader thread (routes replies by cookie)
//! ```
//! One pipelined connection per replica: every thread's requests share it,
//! and a reader thread hands each reply to its waiter. A stalled connection
//! (no reply within the timeout) fails what is in flight with ETIMEDOUT; a
//! closed one is reconnected once per call, and the call retried once.
//! A reconnect that failed slowly is not retried for as long as it took.
//!
//! The module's files, one concern each:
//! - `mod.rs`: [`NbdReplica`] (the [`Replica`] impl, reconnect policy) and
//!   the probe;
//! - `config.rs`: [`NbdAddress`] and [`NbdConfig`] (from an XML layer);
//! - `stream.rs`: the TCP-or-unix socket wrapper;
//! - `conn.rs`: one connection (handshake, submit/wait, the reader thread,
//!   reply checks);
//! - `failure.rs`: a request's failure and NBD-to-host errno mapping.

mod config;
mod conn;
mod failure;
mod stream;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nbd_proto::Command;
use nbd_proto::consts::transmission_flags as tf;
use parking_lot::Mutex;
use quorum_config::model::{ImageFormat, StorageSource};

pub use config::{NbdAddress, NbdConfig};
pub use failure::host_errno;

use crate::raw::{check_range, check_writable};
use crate::{ErrorKind, Extent, OpenError, OpenOptions, ProbeInfo, Replica, ReplicaError, Result};
use conn::Conn;
use failure::Failure;

/// Default bound on connecting, on each send, and on waiting for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A replica on a remote NBD server (fixed newstyle, structured replies,
/// `base:allocation`). No locks: the server owns its image.
pub struct NbdReplica {
    cfg: NbdConfig,
    name: String,
    size: u64,
    read_only: bool,
    slot: Mutex<Slot>,
}

/// The current connection, and when a failed reconnect may be retried.
struct Slot {
    conn: Option<Arc<Conn>>,
    /// After a failed attempt that took `d`, calls fail fast for another
    /// `d` (so a black-holed server costs at most half the time), with
    /// the attempt's message.
    retry_after: Option<(Instant, String)>,
}

impl fmt::Debug for NbdReplica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdReplica")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl NbdReplica {
    /// Connect to the export an XML layer names (see [`NbdConfig::from_source`]).
    pub fn open(src: &StorageSource, opts: &OpenOptions) -> Result<Self, OpenError> {
        let mut cfg = NbdConfig::from_source(src)?;
        cfg.read_only = opts.read_only;
        if let Some(t) = opts.nbd_timeout {
            cfg.timeout = t;
        }
        Self::connect(cfg)
    }

    /// Connect and negotiate. The replica is read-only if `cfg` says so or
    /// the server marks the export read-only.
    pub fn connect(cfg: NbdConfig) -> Result<Self, OpenError> {
        let name = cfg.name();
        let conn = Conn::open(&cfg).map_err(|message| OpenError::Nbd {
            name: name.clone(),
            message,
        })?;
        let read_only = cfg.read_only || conn.export.flags & tf::READ_ONLY != 0;
        Ok(NbdReplica {
            size: conn.export.size,
            read_only,
            name,
            cfg,
            slot: Mutex::new(Slot {
                conn: Some(Arc::new(conn)),
                retry_after: None,
            }),
        })
    }

    /// The export's URI.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Transmission flags of the current connection (0 when disconnected).
    pub fn transmission_flags(&self) -> u16 {
        self.slot.lock().conn.as_ref().map_or(0, |c| c.export.flags)
    }

    /// The live connection, or a new one (one attempt) if it broke.
    fn conn(&self) -> std::result::Result<Arc<Conn>, Failure> {
        let mut slot = self.slot.lock();
        if let Some(c) = slot.conn.as_ref()
            && !c.shared.dead.load(Ordering::Acquire)
        {
            return Ok(Arc::clone(c));
        }
        slot.conn = None;
        if let Some((until, message)) = &slot.retry_after
            && Instant::now() < *until
        {
            return Err(Failure::new(libc::ENOTCONN, message.clone()));
        }
        let start = Instant::now();
        match self.reconnect() {
            Ok(c) => {
                tracing::info!(replica = %self.name, "reconnected to the nbd server");
                slot.retry_after = None;
                slot.conn = Some(Arc::clone(&c));
                Ok(c)
            }
            Err(message) => {
                slot.retry_after = Some((Instant::now() + start.elapsed(), message.clone()));
                Err(Failure::new(libc::ENOTCONN, message))
            }
        }
    }

    fn reconnect(&self) -> std::result::Result<Arc<Conn>, String> {
        let c = Conn::open(&self.cfg)?;
        if c.export.size != self.size {
            return Err(format!(
                "after reconnecting, the export size is {} instead of {}",
                c.export.size, self.size
            ));
        }
        Ok(Arc::new(c))
    }

    fn call<T>(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Conn) -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let res = match self.conn().and_then(|c| f(&c)) {
            // The connection broke (server restarted?): reconnect once and
            // retry; block requests are idempotent.
            Err(e) if e.lost => self.conn().and_then(|c| f(&c)),
            res => res,
        };
        res.map_err(|e| ReplicaError::new(ErrorKind::Io(e.errno), op, e.message).at(offset, len))
    }
}

impl Replica for NbdReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_range(self.size, "read", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.call("read", offset, len, |c| c.read(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let len = buf.len() as u64;
        check_writable(self.read_only, self.size, "write", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.call("write", offset, len, |c| c.write(buf, offset, fua))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        check_writable(self.read_only, self.size, "write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.call("write_zeroes", offset, len, |c| {
            c.write_zeroes(offset, len, may_unmap, fua)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_writable(self.read_only, self.size, "discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let conn = self.slot.lock().conn.clone();
        if conn.is_some_and(|c| c.export.flags & tf::SEND_TRIM == 0) {
            return Err(ReplicaError::unsupported("discard").at(offset, len));
        }
        self.call("discard", offset, len, |c| {
            if c.export.flags & tf::SEND_TRIM == 0 {
                return Err(Failure::new(
                    libc::ENOTSUP,
                    "the server does not support trim",
                ));
            }
            c.each_piece(Command::Trim, 0, offset, len)
        })
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.call("flush", 0, 0, Conn::flush)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, "block_status", offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.call("block_status", offset, len, |c| c.block_status(offset, len))
    }

    fn is_remote(&self) -> bool {
        true
    }
}

/// Connect to `src` and report its size: the format is whatever the XML
/// says (only raw is accepted), since the server hides the image.
pub(crate) fn probe(src: &StorageSource) -> Result<ProbeInfo, OpenError> {
    let mut cfg = NbdConfig::from_source(src)?;
    cfg.read_only = true;
    let r = NbdReplica::connect(cfg)?;
    Ok(ProbeInfo {
        path: PathBuf::from(r.name()),
        format: ImageFormat::Raw,
        virtual_size: r.size(),
        backing_file: None,
        backing_format: None,
        refusal: None,
    })
}
