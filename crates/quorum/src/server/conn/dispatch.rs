//! Request dispatch: runs one checked request against the backend (inline
//! on the reader task or on the blocking pool) and builds its reply.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nbd_proto::consts::{cmd_flags, errno as nbd};
use nbd_proto::{
    Command, Request, RequestHeader, TransmissionInfo, allocation_flags, build_extents,
    put_block_status, put_offset_data_header, put_offset_hole, put_simple_reply,
};

use super::reply::{Outgoing, error_reply, ok_reply};
use crate::server::nbd_error;
use crate::server::pool::BufferPool;

/// Reads and plain writes up to this size run on the connection's reader
/// task, without a hand-off to the blocking pool, while the backend says its
/// small requests are fast (page cache): two thread switches per request
/// would cost more than the I/O.
const INLINE_MAX: u32 = 128 * 1024;

pub(super) fn runs_inline(h: &RequestHeader, backend: &dyn crate::server::Backend) -> bool {
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
pub(super) async fn blocking<F>(h: &RequestHeader, info: &TransmissionInfo, f: F) -> Outgoing
where
    F: FnOnce() -> Outgoing + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(reply) => reply,
        Err(_) => error_reply(h, info, nbd::EIO, None),
    }
}

/// Execute one checked request against the backend (blocking) and build its reply.
pub(super) fn execute_now(
    req: Request,
    backend: &dyn crate::server::Backend,
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
    backend: &dyn crate::server::Backend,
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
    backend: &dyn crate::server::Backend,
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
