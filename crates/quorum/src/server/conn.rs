//! One client connection: handshake, then the pipelined transmission phase.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use nbd_proto::consts::{MAX_PAYLOAD, REQUEST_HEADER_LEN, cmd_flags, errno as nbd};
use nbd_proto::{
    Command, ExportInfo, HandshakeOutcome, Incoming, Negotiated, Request, RequestDecoder,
    RequestHeader, ServerHandshake, TransmissionInfo, allocation_flags, build_extents,
    check_request, put_block_status, put_error, put_offset_data_header, put_offset_hole,
    put_simple_reply,
};
use quorum_engine::FileRegion;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::order::OrderGuard;
use super::pool::{BufferPool, PooledBuf};
use super::sendfile::{ReplySocket, send_region};
use super::{ExportState, ServerConfig, ZeroCopy, nbd_error};

pub(crate) struct ConnCtx {
    pub(crate) id: u64,
    pub(crate) catalogue: Arc<[ExportInfo]>,
    pub(crate) exports: Arc<[ExportState]>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) config: Arc<ServerConfig>,
}

/// A reply ready to send: header bytes plus optional data, sent with one
/// vectored write. Holding the permit until written bounds memory.
#[derive(Default)]
struct Outgoing {
    header: Bytes,
    data: Bytes,
    /// Where `data` also sits in a page cache: sent from there instead.
    file: Option<FileRegion>,
    /// Held while `data` is sent from `file`: overlapping writes wait.
    order: Option<OrderGuard>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn new(header: Bytes, data: Bytes) -> Outgoing {
        Outgoing {
            header,
            data,
            ..Outgoing::default()
        }
    }

    /// Keep the request's range ordered until sent if the data goes out
    /// from a page cache; otherwise release it now.
    fn hold_order(&mut self, guard: Option<OrderGuard>) {
        if self.file.is_some() {
            self.order = guard;
        }
    }
}

const READ_CHUNK: usize = 64 * 1024;

pub(crate) async fn run<R, W>(ctx: ConnCtx, mut rd: R, mut wr: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplySocket,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let timeout = ctx.config.handshake_timeout;
    let negotiated = tokio::select! {
        _ = ctx.shutdown.cancelled() => return,
        r = tokio::time::timeout(timeout, handshake(&ctx, &mut rd, &mut wr, &mut buf)) => r,
    };
    let n = match negotiated {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(conn = ctx.id, error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!(conn = ctx.id, "handshake timed out");
            return;
        }
    };
    debug!(
        conn = ctx.id,
        export = n.export,
        structured = n.structured,
        "transmission"
    );
    transmission(ctx, n, rd, wr, buf).await;
}

/// Drive the handshake; `Ok(None)` means the client aborted or left.
async fn handshake<R, W>(
    ctx: &ConnCtx,
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
) -> std::io::Result<Option<Negotiated>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hs = ServerHandshake::new(ctx.catalogue.to_vec());
    loop {
        let r = hs.handle_input(buf);
        if let Some(out) = hs.poll_transmit() {
            wr.write_all(&out).await?;
        }
        match r {
            Ok(Some(HandshakeOutcome::Negotiated(n))) => return Ok(Some(n)),
            Ok(Some(HandshakeOutcome::Aborted)) => return Ok(None),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        buf.reserve(READ_CHUNK);
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Why the reader loop stopped.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// `NBD_CMD_DISC`, EOF between requests, or shutdown: finish in-flight work.
    Clean,
    /// Protocol violation or I/O error: drop the client now.
    Hard,
}

async fn transmission<R, W>(ctx: ConnCtx, n: Negotiated, mut rd: R, wr: W, mut buf: BytesMut)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: ReplySocket,
{
    let export = &ctx.exports[n.export];
    let info = TransmissionInfo {
        size: ctx.catalogue[n.export].size,
        flags: n.flags,
        structured: n.structured,
        base_allocation: n.base_allocation,
        max_payload: MAX_PAYLOAD,
    };
    // A bigger send buffer helps copied replies too, so it is always asked for.
    let roomy = wr.roomy();
    let zero_copy = match ctx.config.zero_copy {
        ZeroCopy::Off => false,
        ZeroCopy::Auto => roomy,
        ZeroCopy::On => true,
    };
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(writer(ctx.id, wr, rx));
    let permits = Arc::new(Semaphore::new(ctx.config.max_in_flight));
    let mut tasks = JoinSet::new();
    let mut decoder = RequestDecoder::new(MAX_PAYLOAD);

    let end = 'outer: loop {
        while tasks.try_join_next().is_some() {}
        loop {
            // A large write's payload is still (partly) in the socket.
            let large = large_write(&decoder, &buf);
            let incoming = if large.is_some() {
                None
            } else {
                match decoder.decode(&mut buf) {
                    Ok(Some(i)) => Some(i),
                    Ok(None) => break,
                    Err(e) => {
                        warn!(conn = ctx.id, error = %e, "protocol error; disconnecting client");
                        break 'outer End::Hard;
                    }
                }
            };
            let permit = tokio::select! {
                _ = ctx.shutdown.cancelled() => break 'outer End::Clean,
                p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            // Set when a large write registered its range before its payload.
            let mut early_guard = None;
            let req = match (large, incoming) {
                (Some(h), _) => {
                    buf.advance(REQUEST_HEADER_LEN);
                    let backend = &*export.backend;
                    if check_request(&h, &info).is_ok() && runs_inline(&h, backend) {
                        let guard = export.order.register(h.offset, h.length.into(), true);
                        if guard.is_ready() {
                            let streamed =
                                streamed_write(&ctx, export, h, &info, &mut buf, &mut rd);
                            let reply = match streamed.await {
                                Ok(reply) => reply,
                                Err(end) => break 'outer end,
                            };
                            drop(guard);
                            let _ = tx.send(Outgoing {
                                _permit: Some(permit),
                                ..reply
                            });
                            continue;
                        }
                        early_guard = Some(guard);
                    }
                    let read = read_payload(h, &mut buf, &mut rd, &export.buffers);
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => break 'outer End::Clean,
                        r = read => match r {
                            Ok(req) => req,
                            Err(e) => {
                                debug!(conn = ctx.id, error = %e, "client left mid-write");
                                break 'outer End::Hard;
                            }
                        },
                    }
                }
                (None, Some(Incoming::Oversized(h))) => {
                    debug!(conn = ctx.id, length = h.length, "oversized write rejected");
                    let _ = tx.send(error_reply(&h, &info, nbd::EINVAL, Some(permit)));
                    continue;
                }
                (None, Some(Incoming::Request(r))) => r,
                (None, None) => unreachable!("decode returned a request or broke out"),
            };
            if req.header.command == Command::Disc {
                break 'outer End::Clean;
            }
            if let Err(e) = check_request(&req.header, &info) {
                debug!(conn = ctx.id, request = ?req.header, error = e, "request refused");
                let _ = tx.send(error_reply(&req.header, &info, e, Some(permit)));
                continue;
            }
            let h = &req.header;
            let guard = early_guard.or_else(|| match h.command {
                Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => Some(
                    export
                        .order
                        .register(h.offset, h.length.into(), h.command.is_write()),
                ),
                _ => None,
            });
            let backend = export.backend.clone();
            if guard.as_ref().is_none_or(OrderGuard::is_ready)
                && runs_inline(&req.header, &*backend)
            {
                let mut reply = execute_now(req, &*backend, &info, &export.buffers, zero_copy);
                reply.hold_order(guard);
                reply._permit = Some(permit);
                let _ = tx.send(reply);
                continue;
            }
            let tx = tx.clone();
            let buffers = export.buffers.clone();
            tasks.spawn(async move {
                let mut guard = guard;
                if let Some(g) = guard.as_mut() {
                    g.wait().await;
                }
                let h = req.header;
                let run = move || execute_now(req, &*backend, &info, &buffers, zero_copy);
                let mut reply = blocking(&h, &info, run).await;
                reply.hold_order(guard);
                reply._permit = Some(permit);
                let _ = tx.send(reply);
            });
        }
        let want = decoder
            .bytes_wanted(&buf)
            .saturating_sub(buf.len())
            .max(READ_CHUNK);
        buf.reserve(want);
        let read = tokio::select! {
            _ = ctx.shutdown.cancelled() => break End::Clean,
            r = rd.read_buf(&mut buf) => r,
        };
        match read {
            Ok(0) if buf.is_empty() && decoder.discarding() == 0 => break End::Clean,
            Ok(0) => {
                debug!(conn = ctx.id, "client left mid-request");
                break End::Hard;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(conn = ctx.id, error = %e, "read failed");
                break End::Hard;
            }
        }
    };
    drop(rd);
    if end == End::Hard {
        // Nothing more is sent. Requests already running still finish (and
        // keep their ranges ordered until then); their replies are dropped.
        writer.abort();
    }
    let grace = ctx.config.shutdown_grace;
    let drained = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} });
    if drained.await.is_err() {
        warn!(conn = ctx.id, "in-flight requests did not finish in time");
        tasks.abort_all();
    }
    drop(tx);
    let _ = writer.await;
}

/// Write payloads at least this large are read straight from the socket
/// into a page-aligned pooled buffer: replicas then copy from aligned memory
/// (a misaligned source made each 1 MiB pwrite measurably slower).
const ALIGNED_WRITE_MIN: u32 = 64 * 1024;

/// The header of a complete, acceptable large write at the front of `buf`.
fn large_write(decoder: &RequestDecoder, buf: &BytesMut) -> Option<RequestHeader> {
    if decoder.discarding() > 0 || buf.len() < REQUEST_HEADER_LEN {
        return None;
    }
    let h = RequestHeader::decode(&buf[..REQUEST_HEADER_LEN]).ok()?;
    let fits = (ALIGNED_WRITE_MIN..=MAX_PAYLOAD).contains(&h.length);
    (h.command == Command::Write && fits).then_some(h)
}

/// Read `h`'s payload into an aligned buffer: first what `buf` already
/// holds (its header is consumed), then the rest from the socket.
async fn read_payload<R: AsyncRead + Unpin>(
    h: RequestHeader,
    buf: &mut BytesMut,
    rd: &mut R,
    buffers: &Arc<BufferPool>,
) -> std::io::Result<Request> {
    let (mut payload, have) = start_payload(&h, buf, buffers);
    rd.read_exact(&mut payload.as_mut_slice()[have..]).await?;
    Ok(Request {
        header: h,
        payload: Bytes::from_owner(payload),
    })
}

/// A pooled buffer for `h`'s payload holding what `buf` already had of it
/// (consumed from `buf`), and how many bytes that was.
fn start_payload(
    h: &RequestHeader,
    buf: &mut BytesMut,
    buffers: &Arc<BufferPool>,
) -> (PooledBuf, usize) {
    let len = h.length as usize;
    let mut payload = buffers.get(len);
    let have = buf.len().min(len);
    payload.as_mut_slice()[..have].copy_from_slice(&buf[..have]);
    buf.advance(have);
    (payload, have)
}

/// Stream the large write `h`, whose range is registered and free, and
/// build its reply; `Err` says how the connection must end. On shutdown a
/// write already under way is finished while the client keeps sending
/// (part of it may be on the replicas), within the grace period.
async fn streamed_write<R: AsyncRead + Unpin>(
    ctx: &ConnCtx,
    export: &ExportState,
    h: RequestHeader,
    info: &TransmissionInfo,
    buf: &mut BytesMut,
    rd: &mut R,
) -> Result<Outgoing, End> {
    let stream = stream_write(
        h,
        buf,
        rd,
        &*export.backend,
        &export.buffers,
        ctx.config.write_piece,
    );
    let mut stream = std::pin::pin!(stream);
    let result = tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => {
            match tokio::time::timeout(ctx.config.shutdown_grace, stream).await {
                Ok(r) => r,
                Err(_) => return Err(End::Hard),
            }
        }
        r = &mut stream => r,
    };
    match result {
        Ok(Ok(())) => Ok(ok_reply(&h)),
        Ok(Err(e)) => Ok(error_reply(&h, info, nbd_error(e), None)),
        Err(e) => {
            debug!(conn = ctx.id, error = %e, "client left mid-write");
            Err(End::Hard)
        }
    }
}

/// Receive `h`'s payload and write it out while it arrives, in page-aligned
/// pieces of at least `piece` bytes, so that the replicas' copies overlap
/// the client refilling its socket buffer (a unix socket holds only the
/// sender's ~208 KiB, so reading 1 MiB whole means several waits for the
/// client). The outer error is the socket's; after a failed piece the rest
/// is read and dropped and the write fails as a whole, like any write that
/// failed part-way. A client that leaves mid-payload may leave part of an
/// unacknowledged write on the replicas, as a crash mid-write would.
async fn stream_write<R: AsyncRead + Unpin>(
    h: RequestHeader,
    buf: &mut BytesMut,
    rd: &mut R,
    backend: &dyn super::Backend,
    buffers: &Arc<BufferPool>,
    piece: usize,
) -> std::io::Result<Result<(), i32>> {
    const PAGE: u64 = 4096;
    let len = h.length as usize;
    let (mut payload, mut have) = start_payload(&h, buf, buffers);
    let dst = payload.as_mut_slice();
    let (mut done, mut result) = (0, Ok(()));
    while done < len {
        let end = if have == len {
            len
        } else {
            // Offsets fit: `h` passed `check_request`.
            let abs_end = (h.offset + have as u64) / PAGE * PAGE;
            abs_end.saturating_sub(h.offset) as usize
        };
        if end > done && (end == len || end - done >= piece) {
            if result.is_ok() {
                result = backend.write(h.offset + done as u64, &dst[done..end], false);
            }
            done = end;
            continue;
        }
        let n = rd.read(&mut dst[have..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
    Ok(result)
}

/// Send replies as they complete, batching whatever is queued into one
/// vectored write; data with a page-cache region goes out with `sendfile`
/// after the queued bytes. Closes the write side when the channel closes.
async fn writer<W: ReplySocket>(id: u64, mut wr: W, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut batch: Vec<Outgoing> = Vec::new();
    while rx.recv_many(&mut batch, 64).await > 0 {
        if let Err(e) = write_batch(&mut wr, &mut batch).await {
            debug!(conn = id, error = %e, "write failed");
            return;
        }
        batch.clear();
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

async fn write_batch<W: ReplySocket>(wr: &mut W, batch: &mut [Outgoing]) -> std::io::Result<()> {
    let mut parts = Parts::default();
    for o in batch {
        parts.push(o.header.clone());
        match &o.file {
            None => parts.push(o.data.clone()),
            Some(region) => {
                wr.write_all_buf(&mut parts).await?;
                send_region(wr, region, &o.data, o.order.take()).await?;
            }
        }
    }
    wr.write_all_buf(&mut parts).await
}

/// A list of byte buffers presented as one `Buf`, for vectored writes.
#[derive(Default)]
struct Parts(VecDeque<Bytes>);

impl Parts {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.0.push_back(b);
        }
    }
}

impl Buf for Parts {
    fn remaining(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.0.front().map_or(&[], |b| &b[..])
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, b) in dst.iter_mut().zip(self.0.iter()) {
            *slot = IoSlice::new(b);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.0.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.0.pop_front();
        }
    }
}

fn error_reply(
    h: &RequestHeader,
    info: &TransmissionInfo,
    error: u32,
    permit: Option<OwnedSemaphorePermit>,
) -> Outgoing {
    let mut out = BytesMut::with_capacity(64);
    if info.structured {
        put_error(&mut out, h.cookie, true, error, error_message(error));
    } else {
        put_simple_reply(&mut out, h.cookie, error);
    }
    Outgoing {
        _permit: permit,
        ..Outgoing::new(out.freeze(), Bytes::new())
    }
}

fn error_message(error: u32) -> &'static str {
    match error {
        nbd::EPERM => "export is read-only",
        nbd::EINVAL => "invalid request",
        nbd::EOVERFLOW => "request too large",
        nbd::ENOTSUP => "operation not supported",
        nbd::ENOSPC => "no space left",
        nbd::ENOMEM => "out of memory",
        nbd::ESHUTDOWN => "server shutting down",
        _ => "I/O error",
    }
}

fn ok_reply(h: &RequestHeader) -> Outgoing {
    let mut out = BytesMut::with_capacity(16);
    put_simple_reply(&mut out, h.cookie, 0);
    Outgoing::new(out.freeze(), Bytes::new())
}

/// Reads and plain writes up to this size run on the connection's reader
/// task, without a hand-off to the blocking pool, while the backend says its
/// small requests are fast (page cache): two thread switches per request
/// would cost more than the I/O.
const INLINE_MAX: u32 = 128 * 1024;

fn runs_inline(h: &RequestHeader, backend: &dyn super::Backend) -> bool {
    // On one CPU nothing runs beside this task anyway, so large requests
    // skip the hand-off too.
    let fits = h.length <= INLINE_MAX || one_cpu();
    let eligible = match h.command {
        Command::Read => fits,
        Command::Write => fits && !h.has_flag(cmd_flags::FUA),
        _ => false,
    };
    eligible && backend.fast_small_requests()
}

/// The process may run on one CPU only (affinity or cgroup quota).
fn one_cpu() -> bool {
    static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONE.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() == 1))
}

/// Run `f` on the blocking pool; a panic in the backend becomes an EIO reply.
async fn blocking<F>(h: &RequestHeader, info: &TransmissionInfo, f: F) -> Outgoing
where
    F: FnOnce() -> Outgoing + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(reply) => reply,
        Err(_) => error_reply(h, info, nbd::EIO, None),
    }
}

/// Execute one checked request against the backend (blocking) and build its reply.
fn execute_now(
    req: Request,
    backend: &dyn super::Backend,
    info: &TransmissionInfo,
    buffers: &Arc<BufferPool>,
    zero_copy: bool,
) -> Outgoing {
    let h = req.header;
    let (off, len) = (h.offset, u64::from(h.length));
    let fua = h.has_flag(cmd_flags::FUA);
    let result = match h.command {
        Command::Read => return read(&h, backend, info, buffers, zero_copy),
        Command::BlockStatus => return block_status(&h, backend, info),
        Command::Write if len == 0 => Ok(()),
        Command::Write => backend.write(off, &req.payload, fua),
        Command::WriteZeroes if h.has_flag(cmd_flags::FAST_ZERO) && !backend.can_fast_zero() => {
            Err(libc::ENOTSUP)
        }
        Command::WriteZeroes if len == 0 => Ok(()),
        Command::WriteZeroes => {
            let may_unmap = !h.has_flag(cmd_flags::NO_HOLE);
            backend.write_zeroes(off, len, may_unmap, fua)
        }
        Command::Trim if len == 0 => Ok(()),
        Command::Trim => backend
            .trim(off, len)
            .and_then(|()| if fua { backend.flush() } else { Ok(()) }),
        Command::Flush => backend.flush(),
        Command::Cache if len == 0 => Ok(()),
        Command::Cache => backend.cache(off, len),
        Command::Disc | Command::Unknown(_) => Err(libc::EINVAL),
    };
    match result {
        Ok(()) => ok_reply(&h),
        Err(e) => error_reply(&h, info, nbd_error(e), None),
    }
}

/// With `zero_copy`, data the backend also finds in a page cache is sent
/// from there.
fn read(
    h: &RequestHeader,
    backend: &dyn super::Backend,
    info: &TransmissionInfo,
    buffers: &Arc<BufferPool>,
    zero_copy: bool,
) -> Outgoing {
    let len = h.length as usize;
    let (data, file) = if len == 0 {
        (Bytes::new(), None)
    } else {
        let mut buf = buffers.get(len);
        match backend.read_with_region(h.offset, buf.as_mut_slice()) {
            Ok(file) => (Bytes::from_owner(buf), file.filter(|_| zero_copy)),
            Err(e) => return error_reply(h, info, nbd_error(e), None),
        }
    };
    let mut header = BytesMut::with_capacity(32);
    if !info.structured {
        put_simple_reply(&mut header, h.cookie, 0);
        return Outgoing {
            file,
            ..Outgoing::new(header.freeze(), data)
        };
    }
    if len == 0 {
        nbd_proto::put_none(&mut header, h.cookie);
        return Outgoing::new(header.freeze(), Bytes::new());
    }
    if is_zero(&data) {
        put_offset_hole(&mut header, h.cookie, true, h.offset, h.length);
        return Outgoing::new(header.freeze(), Bytes::new());
    }
    put_offset_data_header(&mut header, h.cookie, true, h.offset, h.length);
    Outgoing {
        file,
        ..Outgoing::new(header.freeze(), data)
    }
}

fn block_status(
    h: &RequestHeader,
    backend: &dyn super::Backend,
    info: &TransmissionInfo,
) -> Outgoing {
    let (off, len) = (h.offset, u64::from(h.length));
    let Some(ctx_id) = info.base_allocation else {
        return error_reply(h, info, nbd::EINVAL, None);
    };
    match backend.block_status(off, len) {
        Ok(list) => {
            let iter = list
                .into_iter()
                .map(|(l, hole, zero)| (l, allocation_flags(hole, zero)));
            let extents = build_extents(h.length, h.has_flag(cmd_flags::REQ_ONE), iter);
            let mut out = BytesMut::with_capacity(24 + 8 * extents.len());
            put_block_status(&mut out, h.cookie, true, ctx_id, &extents);
            Outgoing::new(out.freeze(), Bytes::new())
        }
        Err(e) => error_reply(h, info, nbd_error(e), None),
    }
}

/// True if every byte is zero; 64-byte blocks OR-folded so it vectorises.
fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}
