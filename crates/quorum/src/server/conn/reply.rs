//! Replies: what goes back to the client (`Outgoing`), how replies are
//! built, and the writer task that sends them (vectored writes, `sendfile`
//! for data found in a page cache).

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use nbd_proto::consts::errno as nbd;
use nbd_proto::{RequestHeader, TransmissionInfo, put_error, put_simple_reply};
use quorum_engine::FileRegion;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::debug;

use crate::server::order::OrderGuard;
use crate::server::sendfile::{ReplySocket, send_region};

/// A reply ready to send: header bytes plus optional data, sent with one
/// vectored write. Holding the permit until written bounds memory.
#[derive(Default)]
pub(super) struct Outgoing {
    pub(super) header: Bytes,
    pub(super) data: Bytes,
    /// Where `data` also sits in a page cache: sent from there instead.
    pub(super) file: Option<FileRegion>,
    /// Held while `data` is sent from `file`: overlapping writes wait.
    pub(super) order: Option<OrderGuard>,
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    pub(super) fn new(header: Bytes, data: Bytes) -> Outgoing {
        Outgoing {
            header,
            data,
            ..Outgoing::default()
        }
    }

    /// Keep the request's range ordered until sent if the data goes out
    /// from a page cache; otherwise release it now.
    pub(super) fn hold_order(&mut self, guard: Option<OrderGuard>) {
        if self.file.is_some() {
            self.order = guard;
        }
    }
}

/// Send replies as they complete, batching whatever is queued into one
/// vectored write; data with a page-cache region goes out with `sendfile`
/// after the queued bytes. Closes the write side when the channel closes.
pub(super) async fn writer<W: ReplySocket>(
    id: u64,
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
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

pub(super) fn error_reply(
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

pub(super) fn ok_reply(h: &RequestHeader) -> Outgoing {
    let mut out = BytesMut::with_capacity(16);
    put_simple_reply(&mut out, h.cookie, 0);
    Outgoing::new(out.freeze(), Bytes::new())
}
