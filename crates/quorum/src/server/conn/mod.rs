//! One client connection: handshake, then the pipelined transmission phase.
//!
//! ```text
//!  run ── handshake ──▶ transmission (this file: the reader loop)
//!     decode ─▶ check_request ─▶ RangeOrder ─┬▶ dispatch: execute_now inline,
//!        │                                    │   or on the blocking pool
//!        └ large write ─▶ stream_write: payload written in pieces as it arrives
//!                                             ▼
//!                    reply: Outgoing ─ mpsc ─▶ writer (vectored write / sendfile)
//! ```
//! On the way out the loop stops reading, in-flight tasks drain within the
//! shutdown grace period (a hard end drops their replies), then the writer
//! closes the socket.
//!
//! - `dispatch`: runs one checked request against the backend and builds its
//!   reply (read, write, zeroes, trim, flush, cache, block status).
//! - `stream_write`: large writes read into aligned buffers, or streamed to
//!   the backend while the payload arrives.
//! - `reply`: `Outgoing`, the reply builders and the writer task.

mod dispatch;
mod reply;
mod stream_write;

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use nbd_proto::consts::{MAX_PAYLOAD, REQUEST_HEADER_LEN, errno as nbd};
use nbd_proto::{
    Command, ExportInfo, HandshakeOutcome, Incoming, Negotiated, RequestDecoder, ServerHandshake,
    TransmissionInfo, check_request,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::order::OrderGuard;
use super::sendfile::ReplySocket;
use super::{ExportState, ServerConfig, ZeroCopy};
use dispatch::{blocking, execute_now, runs_inline};
use reply::{Outgoing, error_reply, writer};
use stream_write::{large_write, read_payload, streamed_write};

pub(crate) struct ConnCtx {
    pub(crate) id: u64,
    pub(crate) catalogue: Arc<[ExportInfo]>,
    pub(crate) exports: Arc<[ExportState]>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) config: Arc<ServerConfig>,
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
