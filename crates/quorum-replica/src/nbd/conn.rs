//! One connection in transmission phase:
//!
//! ```text
//!  Conn::submit ─▶ writer (Mutex<Stream>) ─▶ socket
//!        │ cookie ─▶ Shared::pending           │
//!  Conn::wait ◀─ mpsc ◀─ Shared::dispatch ◀─ reader_loop
//! ```
//! The handshake, submitting requests and waiting for their replies, the
//! reader thread with its stall check, and checking and copying replies.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nbd_proto::consts::{MAX_PAYLOAD, cmd_flags, rep, state, transmission_flags as tf};
use nbd_proto::{
    Chunk, ClientConfig, ClientHandshake, ClientNegotiated, ClientTransmission, Command,
    ProtocolError, Reply,
};
use parking_lot::Mutex;

use super::NbdConfig;
use super::failure::{Failure, is_timeout};
use super::stream::{READ_CHUNK, Stream};
use crate::Extent;

/// Largest zeroing, trim or block-status request sent at once.
const BIG_PIECE: u64 = 1 << 30;

/// What the handshake told us about the export.
#[derive(Debug, Clone, Copy)]
pub(super) struct Export {
    pub(super) size: u64,
    pub(super) flags: u16,
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
pub(super) struct Shared {
    inner: Mutex<Inner>,
    pub(super) dead: AtomicBool,
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
pub(super) struct Conn {
    writer: Mutex<Stream>,
    pub(super) shared: Arc<Shared>,
    pub(super) export: Export,
    reader: Option<JoinHandle<()>>,
}

impl Conn {
    pub(super) fn open(cfg: &NbdConfig) -> std::result::Result<Conn, String> {
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

    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), Failure> {
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

    pub(super) fn write(
        &self,
        buf: &[u8],
        offset: u64,
        fua: bool,
    ) -> std::result::Result<(), Failure> {
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

    pub(super) fn write_zeroes(
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
    pub(super) fn each_piece(
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

    pub(super) fn flush(&self) -> std::result::Result<(), Failure> {
        if self.export.has(tf::SEND_FLUSH) {
            self.call(Command::Flush, 0, 0, 0, &[])?;
        }
        Ok(())
    }

    pub(super) fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Vec<Extent>, Failure> {
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
