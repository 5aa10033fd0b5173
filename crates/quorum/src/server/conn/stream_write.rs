//! Large writes: the payload read straight into a page-aligned buffer, or
//! streamed to the backend in pieces while it arrives.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use nbd_proto::consts::{MAX_PAYLOAD, REQUEST_HEADER_LEN};
use nbd_proto::{Command, Request, RequestDecoder, RequestHeader, TransmissionInfo};
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::debug;

use super::reply::{Outgoing, error_reply, ok_reply};
use super::{ConnCtx, End};
use crate::server::pool::{BufferPool, PooledBuf};
use crate::server::{ExportState, nbd_error};

/// Write payloads at least this large are read straight from the socket
/// into a page-aligned pooled buffer: replicas then copy from aligned memory
/// (a misaligned source made each 1 MiB pwrite measurably slower).
const ALIGNED_WRITE_MIN: u32 = 64 * 1024;

/// The header of a complete, acceptable large write at the front of `buf`.
pub(super) fn large_write(decoder: &RequestDecoder, buf: &BytesMut) -> Option<RequestHeader> {
    if decoder.discarding() > 0 || buf.len() < REQUEST_HEADER_LEN {
        return None;
    }
    let h = RequestHeader::decode(&buf[..REQUEST_HEADER_LEN]).ok()?;
    let fits = (ALIGNED_WRITE_MIN..=MAX_PAYLOAD).contains(&h.length);
    (h.command == Command::Write && fits).then_some(h)
}

/// Read `h`'s payload into an aligned buffer: first what `buf` already
/// holds (its header is consumed), then the rest from the socket.
pub(super) async fn read_payload<R: AsyncRead + Unpin>(
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
pub(super) async fn streamed_write<R: AsyncRead + Unpin>(
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
    backend: &dyn crate::server::Backend,
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
