//! A blocking NBD test client over a unix socket, built on `nbd-proto`,
//! plus hand-written frames and shared checks for malformed input.
//!
//! Used both by the server's unit tests (in-memory backend) and by
//! `tests/nbd_malformed.rs` (the real `quorum serve`), so the same checks
//! run against both.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use nbd_proto::consts::{REQUEST_MAGIC, cmd, errno};
use nbd_proto::{
    Chunk, ClientConfig, ClientHandshake, ClientNegotiated, ClientTransmission, Command, Reply,
};

/// How long any single socket read may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Wait (bounded) until a unix socket accepts connections.
pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "socket {} never accepted",
            path.display()
        );
        std::thread::yield_now();
    }
}

/// A connected, negotiated client.
pub struct RawClient {
    /// The socket.
    pub stream: UnixStream,
    /// Transmission state (cookies, reply decoding).
    pub t: ClientTransmission,
    /// What the handshake agreed on.
    pub neg: ClientNegotiated,
    inbuf: BytesMut,
}

impl RawClient {
    /// Connect with structured replies and `base:allocation`.
    pub fn connect(path: &Path, export: &str) -> Self {
        Self::connect_with(
            path,
            ClientConfig {
                export: export.into(),
                structured: true,
                base_allocation: true,
            },
        )
    }

    /// Connect with the given handshake configuration.
    pub fn connect_with(path: &Path, cfg: ClientConfig) -> Self {
        let mut stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut hs = ClientHandshake::new(cfg);
        let mut inbuf = BytesMut::new();
        let neg = loop {
            if let Some(done) = hs.handle_input(&mut inbuf).expect("handshake") {
                if let Some(out) = hs.poll_transmit() {
                    stream.write_all(&out).unwrap();
                }
                break done;
            }
            if let Some(out) = hs.poll_transmit() {
                stream.write_all(&out).unwrap();
            }
            let mut tmp = [0u8; 4096];
            let n = stream.read(&mut tmp).expect("read during handshake");
            assert!(n > 0, "server closed during handshake");
            inbuf.extend_from_slice(&tmp[..n]);
        };
        Self {
            stream,
            t: ClientTransmission::new(),
            neg,
            inbuf,
        }
    }

    /// Send bytes exactly as given.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Send one request (with `payload` for writes); returns its cookie.
    pub fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let mut out = BytesMut::new();
        let cookie = self
            .t
            .encode_request(&mut out, command, flags, offset, length);
        out.put_slice(payload);
        self.send_raw(&out);
        cookie
    }

    /// Read until one reply message decodes.
    pub fn reply(&mut self) -> Reply {
        loop {
            if let Some(r) = self.t.decode_reply(&mut self.inbuf).expect("reply decodes") {
                return r;
            }
            let mut tmp = vec![0u8; 1 << 20];
            let n = self.stream.read(&mut tmp).expect("read reply");
            assert!(n > 0, "server closed the connection");
            self.inbuf.extend_from_slice(&tmp[..n]);
        }
    }

    /// All messages of the next reply (until its final one).
    pub fn full_reply(&mut self) -> Vec<Reply> {
        let mut v = vec![self.reply()];
        while !v.last().unwrap().is_final() {
            v.push(self.reply());
        }
        v
    }

    /// Send a request and collect its whole reply.
    pub fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Vec<Reply> {
        self.send(command, flags, offset, length, payload);
        self.full_reply()
    }

    /// Read `len` bytes (assembling structured chunks); `Err(nbd errno)` on failure.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let replies = self.call(Command::Read, 0, offset, len, &[]);
        let mut buf = vec![0u8; len as usize];
        for r in replies {
            match r {
                Reply::Simple { error: 0, data, .. } => buf.copy_from_slice(&data),
                Reply::Simple { error, .. } => return Err(error),
                Reply::Chunk {
                    chunk: Chunk::OffsetData { offset: o, data },
                    ..
                } => {
                    let at = (o - offset) as usize;
                    buf[at..at + data.len()].copy_from_slice(&data);
                }
                Reply::Chunk {
                    chunk: Chunk::OffsetHole { offset: o, length },
                    ..
                } => {
                    let at = (o - offset) as usize;
                    buf[at..at + length as usize].fill(0);
                }
                Reply::Chunk {
                    chunk: Chunk::None, ..
                } => {}
                other => return Err(error_of(&[other])),
            }
        }
        Ok(buf)
    }

    /// Write `data`; `Err(nbd errno)` on failure.
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), u32> {
        let r = self.call(Command::Write, flags, offset, data.len() as u32, data);
        match error_of(&r) {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// Assert the server closes the connection (EOF or reset) without
    /// sending anything more.
    pub fn assert_closed_by_server(&mut self) {
        let mut tmp = [0u8; 64];
        match self.stream.read(&mut tmp) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }
}

/// The NBD error of a reply (0 if it succeeded).
pub fn error_of(replies: &[Reply]) -> u32 {
    replies
        .iter()
        .map(|r| match r {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk {
                chunk: Chunk::Error { error, .. },
                ..
            }
            | Reply::Chunk {
                chunk: Chunk::ErrorOffset { error, .. },
                ..
            }
            | Reply::Chunk {
                chunk: Chunk::UnknownError { error, .. },
                ..
            } => *error,
            _ => 0,
        })
        .find(|&e| e != 0)
        .unwrap_or(0)
}

/// A request header built by hand (for frames the codec would not produce).
pub fn raw_header(
    magic: u32,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.put_u32(magic);
    b.put_u16(flags);
    b.put_u16(command);
    b.put_u64(cookie);
    b.put_u64(offset);
    b.put_u32(len);
    b
}

/// Shared malformed-input checks. Each takes the socket path and an export
/// of at least 1 MiB that accepts writes (except where noted).
pub mod checks {
    use super::*;

    /// A request with a bad magic closes that client; the server keeps serving.
    pub fn bad_magic_disconnects_only_that_client(path: &Path, export: &str) {
        let mut bystander = RawClient::connect(path, export);
        let mut c = RawClient::connect(path, export);

        c.send_raw(&raw_header(0xdead_beef, cmd::READ, 0, 1, 0, 512));

        c.assert_closed_by_server();
        assert_eq!(bystander.read(0, 512).map(|d| d.len()), Ok(512));
    }

    /// Half a header and then EOF: the server drops the client quietly.
    pub fn truncated_header_then_close_leaves_server_serving(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);

        c.send_raw(&raw_header(REQUEST_MAGIC, cmd::READ, 0, 1, 0, 512)[..13]);
        drop(c);

        assert_eq!(
            RawClient::connect(path, export)
                .read(0, 512)
                .map(|d| d.len()),
            Ok(512)
        );
    }

    /// A write announcing 4 GiB is refused at once, before any payload is sent.
    pub fn oversized_write_is_refused_without_its_payload(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);
        let cookie =
            c.t.encode_request(&mut BytesMut::new(), Command::Flush, 0, 0, 0);

        c.send_raw(&raw_header(
            REQUEST_MAGIC,
            cmd::WRITE,
            0,
            cookie,
            0,
            u32::MAX,
        ));
        let r = c.full_reply();

        assert_eq!(error_of(&r), errno::EINVAL);
    }

    /// A read larger than the maximum payload fails cleanly.
    pub fn oversized_read_fails_cleanly(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);

        let r = c.call(Command::Read, 0, 0, 64 << 20, &[]);

        assert!(matches!(error_of(&r), errno::EINVAL | errno::EOVERFLOW));
        assert_eq!(c.read(0, 512).map(|d| d.len()), Ok(512));
    }

    /// A read past the end of the export is `EINVAL`.
    pub fn read_past_end_is_einval(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);
        let size = c.neg.size;

        let r = c.read(size - 512, 1024);

        assert_eq!(r, Err(errno::EINVAL));
    }

    /// A write past the end of the export is `EINVAL` and the stream stays in sync.
    pub fn write_past_end_is_einval(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);
        let size = c.neg.size;

        let r = c.write(size - 512, &[1u8; 1024], 0);

        assert_eq!(r, Err(errno::EINVAL));
        assert_eq!(c.read(0, 512).map(|d| d.len()), Ok(512));
    }

    /// A write to a read-only export is `EPERM`. `export` must be read-only.
    pub fn write_to_read_only_export_is_eperm(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);

        let r = c.write(0, &[1u8; 512], 0);

        assert_eq!(r, Err(errno::EPERM));
    }

    /// An unknown command gets `EINVAL` and the connection stays usable.
    pub fn unknown_command_is_einval(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);

        let r = c.call(Command::Unknown(99), 0, 0, 0, &[]);

        assert_eq!(error_of(&r), errno::EINVAL);
        assert_eq!(c.read(0, 512).map(|d| d.len()), Ok(512));
    }

    /// A client that vanishes in the middle of a write payload harms nobody.
    pub fn disconnect_mid_write_leaves_server_serving(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);
        c.send_raw(&raw_header(REQUEST_MAGIC, cmd::WRITE, 0, 1, 0, 4096));
        c.send_raw(&[0xee; 1000]);
        drop(c);

        let mut other = RawClient::connect(path, export);

        assert_eq!(other.write(0, &[7u8; 4096], 0), Ok(()));
        assert_eq!(other.read(0, 4096), Ok(vec![7u8; 4096]));
    }

    /// Many pipelined requests on one connection all get their replies.
    pub fn pipelined_requests_all_complete(path: &Path, export: &str) {
        let mut c = RawClient::connect(path, export);
        for i in 0..200u64 {
            c.send(Command::Write, 0, i * 512, 512, &[i as u8; 512]);
        }
        for _ in 0..200 {
            c.full_reply();
        }

        let data = c.read(0, 200 * 512).expect("read back");

        let expected: Vec<u8> = (0..200u8).flat_map(|i| [i; 512]).collect();
        assert_eq!(data, expected);
    }
}
