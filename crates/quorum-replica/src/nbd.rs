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

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nbd_proto::consts::{
    MAX_PAYLOAD, cmd_flags, errno as nbd_errno, rep, state, transmission_flags as tf,
};
use nbd_proto::{
    Chunk, ClientConfig, ClientHandshake, ClientNegotiated, ClientTransmission, Command,
    ProtocolError, Reply,
};
use parking_lot::Mutex;
use quorum_config::model::{Backing, ImageFormat, NbdHost, Source, StorageSource};

use crate::raw::{check_range, check_writable};
use crate::{ErrorKind, Extent, OpenError, OpenOptions, ProbeInfo, Replica, ReplicaError, Result};

/// Default bound on connecting, on each send, and on waiting for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest zeroing, trim or block-status request sent at once.
const BIG_PIECE: u64 = 1 << 30;
/// Bytes the reader asks the socket for at once (at least).
const READ_CHUNK: usize = 64 * 1024;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP host name (or address) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

/// How to reach one NBD export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// The server.
    pub address: NbdAddress,
    /// Export name ("" for the server's default export).
    pub export: String,
    /// Refuse writes locally.
    pub read_only: bool,
    /// Bound on connecting, on each send, and on waiting for a reply.
    pub timeout: Duration,
}

impl NbdConfig {
    /// Read-write, with [`DEFAULT_TIMEOUT`].
    pub fn new(address: NbdAddress, export: impl Into<String>) -> Self {
        NbdConfig {
            address,
            export: export.into(),
            read_only: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The config for an XML layer. Refuses what we can't serve: TLS,
    /// qcow2 over NBD, and backing stores below an NBD layer.
    pub fn from_source(src: &StorageSource) -> Result<Self, OpenError> {
        let name = src.display_name();
        let refuse = |message: &str| OpenError::Nbd {
            name: name.clone(),
            message: message.to_owned(),
        };
        let Source::Nbd { export, host, tls } = &src.source else {
            return Err(refuse("not an NBD source"));
        };
        if *tls == Some(true) {
            return Err(refuse("TLS for NBD replicas is not supported yet"));
        }
        if src.format == ImageFormat::Qcow2 {
            return Err(refuse(
                "qcow2 over NBD is not supported; export the qcow2 with qemu-nbd -f qcow2 and declare it raw",
            ));
        }
        if let Backing::Store(_) = src.backing {
            return Err(refuse("a raw NBD replica cannot have a backing store"));
        }
        let address = match host {
            NbdHost::Tcp { name, port } => NbdAddress::Tcp {
                host: name.clone(),
                port: *port,
            },
            NbdHost::Unix { socket } => NbdAddress::Unix(socket.clone()),
        };
        Ok(NbdConfig::new(address, export.clone().unwrap_or_default()))
    }

    /// The export as a URI (`nbd://host:port/export` or
    /// `nbd+unix:///export?socket=path`), as errors name it.
    pub fn name(&self) -> String {
        match &self.address {
            NbdAddress::Tcp { host, port } => format!("nbd://{host}:{port}/{}", self.export),
            NbdAddress::Unix(socket) => {
                format!("nbd+unix:///{}?socket={}", self.export, socket.display())
            }
        }
    }
}

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

/// A request's failure: the errno the engine votes on, and words.
#[derive(Debug, Clone)]
struct Failure {
    errno: i32,
    message: String,
    /// The connection was lost (closed or reset, not a timeout): worth one
    /// retry on a new connection.
    lost: bool,
}

impl Failure {
    fn new(errno: i32, message: impl Into<String>) -> Self {
        Failure {
            errno,
            message: message.into(),
            lost: false,
        }
    }

    /// The connection is gone: ENOTCONN, which the engine takes for an
    /// unreachable replica (see `quorum_engine::membership`).
    fn lost(message: impl Into<String>) -> Self {
        Failure {
            lost: true,
            ..Failure::new(libc::ENOTCONN, message)
        }
    }

    fn io(what: &str, e: &io::Error) -> Self {
        if is_timeout(e) {
            return Failure::new(libc::ETIMEDOUT, format!("{what}: timed out"));
        }
        Failure::lost(format!("{what}: {e}"))
    }

    fn protocol(detail: impl fmt::Display) -> Self {
        Failure::new(
            libc::EIO,
            format!("protocol error from the server: {detail}"),
        )
    }

    /// An error the server replied with.
    fn server(error: u32, message: &str) -> Self {
        let errno = host_errno(error);
        let message = if message.is_empty() {
            format!("the server replied {}", io::Error::from_raw_os_error(errno))
        } else {
            format!("the server replied: {message}")
        };
        Failure::new(errno, message)
    }
}

fn is_timeout(e: &io::Error) -> bool {
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

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(addr: &NbdAddress, timeout: Duration) -> io::Result<Stream> {
        match addr {
            NbdAddress::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
            NbdAddress::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address found");
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Socket options are shared by every clone of the socket.
    fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => (&*s).write_all(buf),
            Stream::Unix(s) => (&*s).write_all(buf),
        }
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Append at least one byte (or report EOF as 0) without zeroing the
    /// buffer first.
    fn read_into(&self, buf: &mut BytesMut) -> io::Result<usize> {
        buf.reserve(READ_CHUNK);
        let spare = buf.spare_capacity_mut();
        loop {
            // SAFETY: read(2) writes at most `spare.len()` bytes into memory
            // we own exclusively; it never reads it.
            let n = unsafe { libc::read(self.fd(), spare.as_mut_ptr().cast(), spare.len()) };
            if n >= 0 {
                let n = n as usize;
                // SAFETY: the kernel initialised these `n` bytes.
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// What the handshake told us about the export.
#[derive(Debug, Clone, Copy)]
struct Export {
    size: u64,
    flags: u16,
    base_allocation: Option<u32>,
    /// Largest read or write payload sent at once.
    max_io: u32,
}

impl Export {
    fn new(n: &ClientNegotiated) -> Self {
        let (min, max) = n
            .block_size
            .map_or((1, MAX_PAYLOAD), |b| (b.minimum.max(1), b.maximum));
        let max = max.min(MAX_PAYLOAD).max(min);
        Export {
            size: n.size,
            flags: n.flags,
            base_allocation: n.base_allocation,
            max_io: max / min * min,
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

fn handshake(stream: &Stream, export: &str) -> std::result::Result<ClientNegotiated, String> {
    let mut hs = ClientHandshake::new(ClientConfig {
        export: export.to_owned(),
        structured: true,
        base_allocation: true,
    });
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        let done = hs.handle_input(&mut buf).map_err(|e| refusal(e, export))?;
        while let Some(out) = hs.poll_transmit() {
            stream
                .write_all(&out)
                .map_err(|e| Failure::io("handshake", &e).message)?;
        }
        if let Some(n) = done {
            return Ok(n);
        }
        let n = stream
            .read(&mut chunk)
            .map_err(|e| Failure::io("handshake", &e).message)?;
        if n == 0 {
            return Err("the server closed the connection during the handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn refusal(e: ProtocolError, export: &str) -> String {
    match e {
        ProtocolError::OptionRefused {
            reply: rep::ERR_UNKNOWN,
            ..
        } => format!("the server has no export named {export:?}"),
        ProtocolError::OptionRefused {
            reply: rep::ERR_TLS_REQD,
            ..
        } => "the server requires TLS, which NBD replicas do not support yet".into(),
        e => format!("handshake failed: {e}"),
    }
}

type Outcome = std::result::Result<Vec<Reply>, Failure>;

struct Pending {
    sent: Instant,
    replies: Vec<Reply>,
    done: mpsc::Sender<Outcome>,
}

struct Inner {
    tx: ClientTransmission,
    pending: HashMap<u64, Pending>,
    failed: Option<Failure>,
}

/// State shared by the senders and the reader thread of one connection.
struct Shared {
    inner: Mutex<Inner>,
    dead: AtomicBool,
    timeout: Duration,
}

impl Shared {
    /// Mark the connection dead and fail every request in flight.
    fn fail(&self, f: Failure) {
        let mut inner = self.inner.lock();
        self.dead.store(true, Ordering::Release);
        if inner.failed.is_none() {
            inner.failed = Some(f.clone());
        }
        for (_, p) in inner.pending.drain() {
            let _ = p.done.send(Err(f.clone()));
        }
    }

    /// Decode every complete reply in `buf` and hand finished ones over.
    fn dispatch(&self, buf: &mut BytesMut) -> std::result::Result<(), Failure> {
        let mut inner = self.inner.lock();
        loop {
            let reply = match inner.tx.decode_reply(buf) {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Failure::protocol(e)),
            };
            let cookie = reply.cookie();
            let last = reply.is_final();
            let Some(p) = inner.pending.get_mut(&cookie) else {
                return Err(Failure::protocol(format!(
                    "reply for unknown cookie {cookie}"
                )));
            };
            p.replies.push(reply);
            if last && let Some(p) = inner.pending.remove(&cookie) {
                let _ = p.done.send(Ok(p.replies));
            }
        }
    }

    /// True when a request has waited `timeout` and nothing arrived for as long.
    fn stalled(&self, last_rx: Instant) -> bool {
        let inner = self.inner.lock();
        let oldest = inner.pending.values().map(|p| p.sent).min();
        oldest.is_some_and(|t| t.elapsed() >= self.timeout && last_rx.elapsed() >= self.timeout)
    }
}

fn reader_loop(stream: Stream, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut last_rx = Instant::now();
    let failure = loop {
        match stream.read_into(&mut buf) {
            Ok(0) => break Failure::lost("the server closed the connection"),
            Ok(_) => {
                last_rx = Instant::now();
                if let Err(f) = shared.dispatch(&mut buf) {
                    break f;
                }
            }
            Err(e) if is_timeout(&e) => {
                if shared.stalled(last_rx) {
                    break Failure::new(
                        libc::ETIMEDOUT,
                        format!("no reply from the server within {:?}", shared.timeout),
                    );
                }
            }
            Err(e) => break Failure::io("receive", &e),
        }
    };
    shared.fail(failure);
    stream.shutdown();
}

/// One connection in transmission phase.
struct Conn {
    writer: Mutex<Stream>,
    shared: Arc<Shared>,
    export: Export,
    reader: Option<JoinHandle<()>>,
}

impl Conn {
    fn open(cfg: &NbdConfig) -> std::result::Result<Conn, String> {
        let stream = Stream::connect(&cfg.address, cfg.timeout)
            .map_err(|e| Failure::io("cannot connect", &e).message)?;
        stream
            .set_timeouts(cfg.timeout, cfg.timeout)
            .map_err(|e| format!("cannot set socket timeouts: {e}"))?;
        let negotiated = handshake(&stream, &cfg.export)?;
        let export = Export::new(&negotiated);
        // The reader wakes up this often to look for stalled requests.
        let tick = (cfg.timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        stream
            .set_timeouts(tick, cfg.timeout)
            .map_err(|e| format!("cannot set socket timeouts: {e}"))?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                tx: ClientTransmission::new(),
                pending: HashMap::new(),
                failed: None,
            }),
            dead: AtomicBool::new(false),
            timeout: cfg.timeout,
        });
        let rstream = stream
            .try_clone()
            .map_err(|e| format!("cannot clone the socket: {e}"))?;
        let rshared = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader_loop(rstream, rshared))
            .map_err(|e| format!("cannot start the reader thread: {e}"))?;
        Ok(Conn {
            writer: Mutex::new(stream),
            shared,
            export,
            reader: Some(reader),
        })
    }

    /// Send one request (and its payload); the reply arrives on the receiver.
    fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::result::Result<mpsc::Receiver<Outcome>, Failure> {
        let writer = self.writer.lock();
        let (done, rx) = mpsc::channel();
        let mut header = BytesMut::with_capacity(32);
        {
            let mut inner = self.shared.inner.lock();
            if let Some(f) = &inner.failed {
                return Err(f.clone());
            }
            let cookie = inner
                .tx
                .encode_request(&mut header, command, flags, offset, length);
            inner.pending.insert(
                cookie,
                Pending {
                    sent: Instant::now(),
                    replies: Vec::new(),
                    done,
                },
            );
        }
        let sent = writer
            .write_all(&header)
            .and_then(|()| writer.write_all(payload));
        if let Err(e) = sent {
            let f = Failure::io("send", &e);
            self.shared.fail(f.clone());
            writer.shutdown();
            return Err(f);
        }
        Ok(rx)
    }

    fn wait(rx: &mpsc::Receiver<Outcome>) -> Outcome {
        rx.recv()
            .unwrap_or_else(|_| Err(Failure::lost("the connection was lost")))
    }

    /// Send a request and wait for its (error-checked) reply.
    fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::result::Result<Vec<Reply>, Failure> {
        let rx = self.submit(command, flags, offset, length, payload)?;
        let replies = Self::wait(&rx)?;
        check_replies(&replies)?;
        Ok(replies)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), Failure> {
        let max = self.export.max_io as usize;
        let mut waiting = Vec::new();
        for (i, piece) in buf.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            waiting.push(self.submit(Command::Read, 0, off, piece.len() as u32, &[])?);
        }
        for (i, (rx, dst)) in waiting.iter().zip(buf.chunks_mut(max)).enumerate() {
            let replies = Self::wait(rx)?;
            fill(dst, offset + (i * max) as u64, &replies)?;
        }
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> u16 {
        if fua && self.export.has(tf::SEND_FUA) {
            cmd_flags::FUA
        } else {
            0
        }
    }

    /// Without FUA support, a FUA request is the request plus a flush.
    fn flush_unless_fua(&self, fua: bool) -> std::result::Result<(), Failure> {
        if fua && !self.export.has(tf::SEND_FUA) {
            self.flush()?;
        }
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> std::result::Result<(), Failure> {
        let max = self.export.max_io as usize;
        let flags = self.fua_flag(fua);
        let mut waiting = Vec::new();
        for (i, piece) in buf.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            waiting.push(self.submit(Command::Write, flags, off, piece.len() as u32, piece)?);
        }
        for rx in &waiting {
            check_replies(&Self::wait(rx)?)?;
        }
        self.flush_unless_fua(fua)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> std::result::Result<(), Failure> {
        if !self.export.has(tf::SEND_WRITE_ZEROES) {
            let zeroes = vec![0u8; len.min(u64::from(self.export.max_io)) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeroes.len() as u64);
                self.write(&zeroes[..n as usize], offset + done, false)?;
                done += n;
            }
            return self.flush_unless_fua(fua);
        }
        let mut flags = self.fua_flag(fua);
        if !may_unmap {
            flags |= cmd_flags::NO_HOLE;
        }
        self.each_piece(Command::WriteZeroes, flags, offset, len)?;
        self.flush_unless_fua(fua)
    }

    /// Send a payload-less command over `[offset, offset+len)` in pieces.
    fn each_piece(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), Failure> {
        let mut waiting = Vec::new();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(BIG_PIECE);
            waiting.push(self.submit(command, flags, offset + done, n as u32, &[])?);
            done += n;
        }
        for rx in &waiting {
            check_replies(&Self::wait(rx)?)?;
        }
        Ok(())
    }

    fn flush(&self) -> std::result::Result<(), Failure> {
        if self.export.has(tf::SEND_FLUSH) {
            self.call(Command::Flush, 0, 0, 0, &[])?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, Failure> {
        let Some(id) = self.export.base_allocation else {
            return Ok(vec![Extent {
                length: len,
                zero: false,
                hole: false,
            }]);
        };
        let ask = len.min(BIG_PIECE);
        let replies = self.call(Command::BlockStatus, 0, offset, ask as u32, &[])?;
        let mut out: Vec<Extent> = Vec::new();
        let mut covered = 0u64;
        for r in &replies {
            let Reply::Chunk {
                chunk:
                    Chunk::BlockStatus {
                        context_id,
                        extents,
                    },
                ..
            } = r
            else {
                continue;
            };
            if *context_id != id {
                continue;
            }
            for e in extents {
                if covered >= ask {
                    break;
                }
                let length = u64::from(e.length).min(ask - covered);
                covered += length;
                out.push(Extent {
                    length,
                    zero: e.flags & state::ZERO != 0,
                    hole: e.flags & state::HOLE != 0,
                });
            }
        }
        if out.is_empty() {
            return Err(Failure::protocol("block status reply without extents"));
        }
        Ok(out)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let writer = self.writer.lock();
        if !self.shared.dead.load(Ordering::Acquire) {
            let mut header = BytesMut::with_capacity(32);
            self.shared
                .inner
                .lock()
                .tx
                .encode_request(&mut header, Command::Disc, 0, 0, 0);
            let _ = writer.write_all(&header);
        }
        writer.shutdown();
        drop(writer);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// The first error a reply carries, if any.
fn check_replies(replies: &[Reply]) -> std::result::Result<(), Failure> {
    for r in replies {
        match r {
            Reply::Simple { error, .. } if *error != 0 => return Err(Failure::server(*error, "")),
            Reply::Chunk { chunk, .. } => match chunk {
                Chunk::Error { error, message } | Chunk::ErrorOffset { error, message, .. } => {
                    return Err(Failure::server(*error, message));
                }
                Chunk::UnknownError { error, .. } => return Err(Failure::server(*error, "")),
                _ => {}
            },
            Reply::Simple { .. } => {}
        }
    }
    Ok(())
}

/// Copy a read reply (simple, or data and hole chunks) into `dst`, which
/// starts at export offset `base`. Every byte must be covered.
fn fill(dst: &mut [u8], base: u64, replies: &[Reply]) -> std::result::Result<(), Failure> {
    check_replies(replies)?;
    let len = dst.len() as u64;
    let mut covered = 0u64;
    for r in replies {
        let (off, n) = match r {
            Reply::Simple { data, .. } => {
                if data.len() != dst.len() {
                    return Err(Failure::protocol("short simple read reply"));
                }
                dst.copy_from_slice(data);
                covered += len;
                continue;
            }
            Reply::Chunk {
                chunk: Chunk::OffsetData { offset, data },
                ..
            } => (*offset, data.len() as u64),
            Reply::Chunk {
                chunk: Chunk::OffsetHole { offset, length },
                ..
            } => (*offset, u64::from(*length)),
            Reply::Chunk {
                chunk: Chunk::None, ..
            } => continue,
            Reply::Chunk { .. } => {
                return Err(Failure::protocol("unexpected chunk in a read reply"));
            }
        };
        let start = off
            .checked_sub(base)
            .filter(|s| s.checked_add(n).is_some_and(|e| e <= len))
            .ok_or_else(|| Failure::protocol("read chunk outside the request"))?;
        let range = start as usize..(start + n) as usize;
        match r {
            Reply::Chunk {
                chunk: Chunk::OffsetData { data, .. },
                ..
            } => dst[range].copy_from_slice(data),
            _ => dst[range].fill(0),
        }
        covered += n;
    }
    if covered != len {
        return Err(Failure::protocol(format!(
            "read reply covered {covered} of {len} bytes"
        )));
    }
    Ok(())
}
