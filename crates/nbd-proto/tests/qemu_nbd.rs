//! The client state machine against a real `qemu-nbd` (must be installed),
//! through a tiny blocking driver over a unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use nbd_proto::consts::{MAX_PAYLOAD, cmd_flags, state, transmission_flags as tf};
use nbd_proto::{
    Chunk, ClientConfig, ClientHandshake, ClientNegotiated, ClientTransmission, Command, Reply,
};

const SIZE: u64 = 4 << 20;

/// A `qemu-nbd` serving a fresh sparse raw file; killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl QemuNbd {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let socket = dir.path().join("nbd.sock");
        let child = Proc::new("qemu-nbd")
            .args([
                "--format=raw",
                "--export-name=vda",
                "--persistent",
                "--shared=4",
            ])
            .arg(format!("--socket={}", socket.display()))
            .arg(&image)
            .spawn()
            .expect("qemu-nbd must be installed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Conn {
    s: UnixStream,
    t: ClientTransmission,
    inbuf: BytesMut,
    neg: ClientNegotiated,
}

impl Conn {
    fn open(socket: &Path, structured: bool) -> Self {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let cfg = ClientConfig {
            export: "vda".into(),
            structured,
            base_allocation: structured,
        };
        let mut hs = ClientHandshake::new(cfg);
        let mut inbuf = BytesMut::new();
        let neg = loop {
            let done = hs.handle_input(&mut inbuf).unwrap();
            if let Some(out) = hs.poll_transmit() {
                s.write_all(&out).unwrap();
            }
            if let Some(n) = done {
                break n;
            }
            fill(&mut s, &mut inbuf);
        };
        Self {
            s,
            t: ClientTransmission::new(),
            inbuf,
            neg,
        }
    }

    fn call(
        &mut self,
        c: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Vec<Reply> {
        let mut out = BytesMut::new();
        self.t.encode_request(&mut out, c, flags, offset, len);
        out.put_slice(payload);
        self.s.write_all(&out).unwrap();
        let mut replies = Vec::new();
        loop {
            match self.t.decode_reply(&mut self.inbuf).unwrap() {
                Some(r) => {
                    let last = r.is_final();
                    replies.push(r);
                    if last {
                        return replies;
                    }
                }
                None => fill(&mut self.s, &mut self.inbuf),
            }
        }
    }
}

fn fill(s: &mut UnixStream, buf: &mut BytesMut) {
    let mut tmp = vec![0u8; 1 << 16];
    let n = s.read(&mut tmp).unwrap();
    assert!(n > 0, "qemu-nbd closed the connection");
    buf.extend_from_slice(&tmp[..n]);
}

fn assemble(replies: &[Reply], offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xffu8; len];
    for r in replies {
        match r {
            Reply::Simple { error: 0, data, .. } => buf.copy_from_slice(data),
            Reply::Chunk {
                chunk: Chunk::OffsetData { offset: o, data },
                ..
            } => {
                let at = (o - offset) as usize;
                buf[at..at + data.len()].copy_from_slice(data);
            }
            Reply::Chunk {
                chunk: Chunk::OffsetHole { offset: o, length },
                ..
            } => {
                let at = (o - offset) as usize;
                buf[at..at + *length as usize].fill(0);
            }
            Reply::Chunk {
                chunk: Chunk::None, ..
            } => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }
    buf
}

#[test]
fn handshake_with_qemu_nbd_negotiates_structured_replies_and_base_allocation() {
    let q = QemuNbd::start();

    let c = Conn::open(&q.socket, true);

    assert_eq!(c.neg.size, SIZE);
    assert!(c.neg.structured && c.neg.base_allocation.is_some());
    assert!(c.neg.flags & tf::SEND_FLUSH != 0);
    assert!(c.neg.block_size.is_some_and(|b| b.maximum <= MAX_PAYLOAD));
}

#[test]
fn write_then_structured_read_returns_the_data() {
    let q = QemuNbd::start();
    let mut c = Conn::open(&q.socket, true);
    let data: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();

    let w = c.call(Command::Write, cmd_flags::FUA, 65536, 8192, &data);
    let r = c.call(Command::Read, 0, 65536, 8192, &[]);

    assert!(matches!(
        &w[..],
        [Reply::Simple { error: 0, .. }]
            | [Reply::Chunk {
                chunk: Chunk::None,
                ..
            }]
    ));
    assert_eq!(assemble(&r, 65536, 8192), data);
}

#[test]
fn simple_read_returns_zeroes_of_a_fresh_image() {
    let q = QemuNbd::start();
    let mut c = Conn::open(&q.socket, false);

    let r = c.call(Command::Read, 0, 0, 4096, &[]);

    assert!(!c.neg.structured);
    assert_eq!(assemble(&r, 0, 4096), vec![0u8; 4096]);
}

#[test]
fn block_status_of_a_sparse_image_is_a_hole() {
    let q = QemuNbd::start();
    let mut c = Conn::open(&q.socket, true);
    let ctx = c.neg.base_allocation.unwrap();

    let r = c.call(Command::BlockStatus, 0, 0, 1 << 20, &[]);

    let Reply::Chunk {
        chunk: Chunk::BlockStatus {
            context_id,
            extents,
        },
        ..
    } = &r[0]
    else {
        panic!("expected block status, got {r:?}");
    };
    assert_eq!(*context_id, ctx);
    assert_eq!(extents[0].flags, state::HOLE | state::ZERO);
}

#[test]
fn read_past_the_end_is_an_error_chunk() {
    let q = QemuNbd::start();
    let mut c = Conn::open(&q.socket, true);

    let r = c.call(Command::Read, 0, SIZE - 512, 1024, &[]);

    assert!(
        matches!(&r[..], [Reply::Chunk { chunk: Chunk::Error { error, .. }, done: true, .. }] if *error != 0)
    );
}
