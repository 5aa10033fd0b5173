//! Driver tests: the real socket path with an in-memory backend, driven by
//! `nbd-proto`'s client and by hand-written frames, plus real NBD clients.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use nbd_proto::consts::{cmd_flags, errno, transmission_flags as tf};
use nbd_proto::{BlockExtent, Chunk, ClientConfig, Command, Reply};
use tokio_util::sync::CancellationToken;

use quorum_engine::FileRegion;

use super::{Backend, Export, Listener, ServerConfig, ZeroCopy, serve_with};

#[path = "../../tests/common/nbd_raw.rs"]
mod nbd_raw;
use nbd_raw::{RawClient, checks, error_of, wait_for_socket};

mod interop;

const SIZE: u64 = 1 << 20;
/// Reads and writes at this offset block until the test releases them.
const GATED: u64 = 512 * 1024;

/// Blocks operations at [`GATED`] until released, announcing each arrival.
struct Gate {
    entered: Mutex<std_mpsc::Sender<()>>,
    release: Mutex<std_mpsc::Receiver<()>>,
}

#[derive(Default)]
struct MemBackend {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: Mutex<u32>,
    fua_writes: Mutex<u32>,
    gate: Option<Gate>,
    /// Offered as every read's page-cache region, at the read's offset.
    region: Option<Arc<std::fs::File>>,
    /// Claims page-cache speed, so the driver runs small requests inline.
    fast: AtomicBool,
    /// Told `(offset, len)` of every write as it reaches the backend.
    writes_seen: Option<Mutex<std_mpsc::Sender<(u64, usize)>>>,
    /// Writes covering this byte fail with EIO (and write nothing).
    fail_writes_over: Option<u64>,
}

impl MemBackend {
    fn new(read_only: bool) -> Self {
        Self {
            data: Mutex::new(vec![0; SIZE as usize]),
            read_only,
            ..Default::default()
        }
    }

    fn pass_gate(&self, offset: u64) {
        if let (Some(g), true) = (&self.gate, offset == GATED) {
            g.entered.lock().unwrap().send(()).unwrap();
            g.release.lock().unwrap().recv().unwrap();
        }
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.pass_gate(offset);
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn read_with_region(&self, offset: u64, buf: &mut [u8]) -> Result<Option<FileRegion>, i32> {
        self.read(offset, buf)?;
        Ok(self.region.clone().map(|file| FileRegion { file, offset }))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), i32> {
        self.pass_gate(offset);
        if let Some(tx) = &self.writes_seen {
            let _ = tx.lock().unwrap().send((offset, data.len()));
        }
        if self
            .fail_writes_over
            .is_some_and(|b| (offset..offset + data.len() as u64).contains(&b))
        {
            return Err(libc::EIO);
        }
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        *self.fua_writes.lock().unwrap() += u32::from(fua);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool, _fua: bool) -> Result<(), i32> {
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + len as usize].fill(0);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), i32> {
        self.write_zeroes(offset, len, true, false)
    }
    fn flush(&self) -> Result<(), i32> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn fast_small_requests(&self) -> bool {
        self.fast.load(Ordering::Relaxed)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool, bool)>, i32> {
        let d = self.data.lock().unwrap();
        let end = (offset + len).min(SIZE);
        let mut out: Vec<(u64, bool, bool)> = Vec::new();
        let mut at = offset - offset % 4096;
        while at < end {
            let zero = d[at as usize..(at + 4096) as usize].iter().all(|&b| b == 0);
            let start = at.max(offset);
            out.push((at + 4096 - start, zero, zero));
            at += 4096;
        }
        Ok(out)
    }
}

/// An NBD server on a unix socket in a temp dir, on its own runtime thread.
/// Dropping it shuts the server down and waits for `serve` to return.
struct TestServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    token: CancellationToken,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    rw: Arc<MemBackend>,
}

impl TestServer {
    fn start() -> Self {
        Self::start_with(MemBackend::new(false))
    }

    fn start_with(rw: MemBackend) -> Self {
        Self::start_config(rw, ServerConfig::default())
    }

    fn start_config(rw: MemBackend, config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let token = CancellationToken::new();
        let rw = Arc::new(rw);
        let exports = vec![
            Export {
                name: "rw".into(),
                description: "in-memory disk".into(),
                backend: rw.clone(),
            },
            Export {
                name: "ro".into(),
                description: String::new(),
                backend: Arc::new(MemBackend::new(true)),
            },
        ];
        let (p, t) = (path.clone(), token.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::UnixListener::bind(&p)?;
                serve_with(Listener::Unix(l), exports, t, config).await
            })
        });
        wait_for_socket(&path);
        Self {
            _dir: dir,
            path,
            token,
            thread: Some(thread),
            rw,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Cancel and wait for `serve` to return its result.
    fn stop(&mut self) -> std::io::Result<()> {
        self.token.cancel();
        self.thread.take().map_or(Ok(()), |t| t.join().unwrap())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn gated() -> (MemBackend, std_mpsc::Receiver<()>, std_mpsc::Sender<()>) {
    let (entered_tx, entered_rx) = std_mpsc::channel();
    let (release_tx, release_rx) = std_mpsc::channel();
    let b = MemBackend {
        gate: Some(Gate {
            entered: Mutex::new(entered_tx),
            release: Mutex::new(release_rx),
        }),
        ..MemBackend::new(false)
    };
    (b, entered_rx, release_tx)
}

#[test]
fn written_data_reads_back() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");

    c.write(4096, b"hello quorum", 0).unwrap();

    assert_eq!(c.read(4096, 12).unwrap(), b"hello quorum");
}

#[test]
fn simple_replies_carry_read_data() {
    let s = TestServer::start();
    let cfg = ClientConfig {
        export: "rw".into(),
        structured: false,
        base_allocation: false,
    };
    let mut c = RawClient::connect_with(s.path(), cfg);
    c.write(0, &[9u8; 1000], 0).unwrap();

    let r = c.call(Command::Read, 0, 0, 1000, &[]);

    assert!(matches!(&r[..], [Reply::Simple { error: 0, data, .. }] if data[..] == [9u8; 1000]));
}

#[test]
fn default_export_name_maps_to_the_first_export() {
    let s = TestServer::start();

    let c = RawClient::connect(s.path(), "");

    assert_eq!(c.neg.name.as_deref(), Some("rw"));
}

#[test]
fn advertised_flags_are_truthful() {
    let s = TestServer::start();

    let (rw, ro) = (
        RawClient::connect(s.path(), "rw"),
        RawClient::connect(s.path(), "ro"),
    );

    let rw_flags = tf::HAS_FLAGS
        | tf::SEND_FLUSH
        | tf::SEND_FUA
        | tf::SEND_TRIM
        | tf::SEND_WRITE_ZEROES
        | tf::SEND_FAST_ZERO
        | tf::SEND_CACHE
        | tf::CAN_MULTI_CONN;
    assert_eq!(rw.neg.flags, rw_flags);
    assert_eq!(
        ro.neg.flags,
        tf::HAS_FLAGS | tf::READ_ONLY | tf::SEND_FLUSH | tf::SEND_CACHE | tf::CAN_MULTI_CONN
    );
}

#[test]
fn all_zero_read_is_sent_as_a_hole() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");

    let r = c.call(Command::Read, 0, 8192, 4096, &[]);

    assert!(matches!(
        &r[..],
        [Reply::Chunk {
            done: true,
            chunk: Chunk::OffsetHole {
                offset: 8192,
                length: 4096
            },
            ..
        }]
    ));
}

#[test]
fn block_status_reports_data_and_zero_extents() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");
    c.write(4096, &[1u8; 4096], 0).unwrap();

    let r = c.call(Command::BlockStatus, 0, 0, 12288, &[]);

    let extents = vec![
        BlockExtent {
            length: 4096,
            flags: 3,
        },
        BlockExtent {
            length: 4096,
            flags: 0,
        },
        BlockExtent {
            length: 4096,
            flags: 3,
        },
    ];
    assert!(
        matches!(&r[..], [Reply::Chunk { chunk: Chunk::BlockStatus { context_id: 1, extents: e }, .. }] if *e == extents)
    );
}

#[test]
fn fua_write_reaches_the_backend_as_fua() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");

    c.write(0, &[1u8; 512], cmd_flags::FUA).unwrap();

    assert_eq!(*s.rw.fua_writes.lock().unwrap(), 1);
}

#[test]
fn flush_reaches_the_backend() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");

    let r = c.call(Command::Flush, 0, 0, 0, &[]);

    assert_eq!((error_of(&r), *s.rw.flushes.lock().unwrap()), (0, 1));
}

#[test]
fn write_zeroes_zeroes_the_range() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");
    c.write(0, &[5u8; 8192], 0).unwrap();

    let r = c.call(Command::WriteZeroes, cmd_flags::NO_HOLE, 1024, 4096, &[]);

    assert_eq!(error_of(&r), 0);
    assert_eq!(c.read(1024, 4096).unwrap(), vec![0u8; 4096]);
}

#[test]
fn fast_zero_on_slow_backend_is_enotsup() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");

    let r = c.call(Command::WriteZeroes, cmd_flags::FAST_ZERO, 0, 4096, &[]);

    assert_eq!(error_of(&r), errno::ENOTSUP);
}

#[test]
fn trim_succeeds() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");

    let r = c.call(Command::Trim, 0, 0, 4096, &[]);

    assert_eq!(error_of(&r), 0);
}

#[test]
fn replies_come_back_out_of_order() {
    let (b, entered, release) = gated();
    let s = TestServer::start_with(b);
    let mut c = RawClient::connect(s.path(), "rw");
    let slow = c.send(Command::Read, 0, GATED, 512, &[]);
    entered.recv().unwrap();

    let fast = c.send(Command::Flush, 0, 0, 0, &[]);
    let first = c.reply().cookie();
    release.send(()).unwrap();
    let second = c.full_reply()[0].cookie();

    assert_eq!((first, second), (fast, slow));
}

#[test]
fn overlapping_read_waits_for_earlier_write() {
    let (b, entered, release) = gated();
    let s = TestServer::start_with(b);
    let mut c = RawClient::connect(s.path(), "rw");
    let write = c.send(Command::Write, 0, GATED, 512, &[3u8; 512]);
    entered.recv().unwrap();
    let read = c.send(Command::Read, 0, GATED + 256, 512, &[]);

    release.send(()).unwrap();
    release.send(()).unwrap();
    let replies = [c.full_reply(), c.full_reply()];

    assert_eq!(replies[0][0].cookie(), write);
    assert_eq!(replies[1].last().unwrap().cookie(), read);
    assert!(
        matches!(&replies[1][0], Reply::Chunk { chunk: Chunk::OffsetData { data, .. }, .. } if data[..256] == [3u8; 256])
    );
}

#[test]
fn shutdown_finishes_in_flight_requests_then_returns() {
    let (b, entered, release) = gated();
    let mut s = TestServer::start_with(b);
    let mut c = RawClient::connect(s.path(), "rw");
    c.send(Command::Write, 0, GATED, 512, &[4u8; 512]);
    entered.recv().unwrap();
    s.token.cancel();

    release.send(()).unwrap();
    let reply = c.full_reply();

    assert_eq!(error_of(&reply), 0);
    assert!(s.stop().is_ok());
    assert_eq!(s.rw.data.lock().unwrap()[GATED as usize], 4);
}

#[test]
fn client_vanishing_mid_request_releases_its_range() {
    let (b, entered, release) = gated();
    let s = TestServer::start_with(b);
    let mut c = RawClient::connect(s.path(), "rw");
    c.send(Command::Write, 0, GATED, 512, &[1u8; 512]);
    entered.recv().unwrap();
    drop(c);
    release.send(()).unwrap();
    let mut other = RawClient::connect(s.path(), "rw");

    other.send(Command::Write, 0, GATED, 512, &[2u8; 512]);
    entered.recv().unwrap();
    release.send(()).unwrap();

    assert_eq!(error_of(&other.full_reply()), 0);
}

#[test]
fn disc_closes_the_connection() {
    let s = TestServer::start();
    let mut c = RawClient::connect(s.path(), "rw");

    c.send(Command::Disc, 0, 0, 0, &[]);

    c.assert_closed_by_server();
}

#[test]
fn bad_magic_disconnects_only_that_client() {
    let s = TestServer::start();
    checks::bad_magic_disconnects_only_that_client(s.path(), "rw");
}

#[test]
fn truncated_header_then_close_leaves_server_serving() {
    let s = TestServer::start();
    checks::truncated_header_then_close_leaves_server_serving(s.path(), "rw");
}

#[test]
fn oversized_write_is_refused_without_its_payload() {
    let s = TestServer::start();
    checks::oversized_write_is_refused_without_its_payload(s.path(), "rw");
}

#[test]
fn oversized_read_fails_cleanly() {
    let s = TestServer::start();
    checks::oversized_read_fails_cleanly(s.path(), "rw");
}

#[test]
fn read_past_end_is_einval() {
    let s = TestServer::start();
    checks::read_past_end_is_einval(s.path(), "rw");
}

#[test]
fn write_past_end_is_einval() {
    let s = TestServer::start();
    checks::write_past_end_is_einval(s.path(), "rw");
}

#[test]
fn write_to_read_only_export_is_eperm() {
    let s = TestServer::start();
    checks::write_to_read_only_export_is_eperm(s.path(), "ro");
}

#[test]
fn unknown_command_is_einval() {
    let s = TestServer::start();
    checks::unknown_command_is_einval(s.path(), "rw");
}

#[test]
fn disconnect_mid_write_leaves_server_serving() {
    let s = TestServer::start();
    checks::disconnect_mid_write_leaves_server_serving(s.path(), "rw");
}

#[test]
fn pipelined_requests_all_complete() {
    let s = TestServer::start();
    checks::pipelined_requests_all_complete(s.path(), "rw");
}

/// A server whose disk holds 0x11 everywhere and offers `file` as the
/// page-cache region of every read.
fn with_region(file: std::fs::File, zero_copy: ZeroCopy) -> TestServer {
    let b = MemBackend {
        data: Mutex::new(vec![0x11; SIZE as usize]),
        region: Some(Arc::new(file)),
        ..MemBackend::new(false)
    };
    let config = ServerConfig {
        zero_copy,
        ..ServerConfig::default()
    };
    TestServer::start_config(b, config)
}

/// A temp file of `len` bytes of 0x22, opened read-only.
fn file_of_0x22(len: usize) -> (tempfile::TempDir, std::fs::File) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    std::fs::write(&path, vec![0x22; len]).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    (dir, f)
}

#[test]
fn read_reply_is_sent_from_the_region() {
    let (_d, f) = file_of_0x22(SIZE as usize);
    let s = with_region(f, ZeroCopy::On);
    let mut c = RawClient::connect(s.path(), "rw");

    assert_eq!(c.read(8192, 65536).unwrap(), vec![0x22; 65536]);
}

#[test]
fn simple_read_reply_is_sent_from_the_region() {
    let (_d, f) = file_of_0x22(SIZE as usize);
    let s = with_region(f, ZeroCopy::On);
    let cfg = ClientConfig {
        export: "rw".into(),
        structured: false,
        base_allocation: false,
    };
    let mut c = RawClient::connect_with(s.path(), cfg);

    let r = c.call(Command::Read, 0, 4096, 1000, &[]);

    assert!(matches!(&r[..], [Reply::Simple { error: 0, data, .. }] if data[..] == [0x22; 1000]));
}

#[test]
fn zero_copy_off_sends_the_read_buffer() {
    let (_d, f) = file_of_0x22(SIZE as usize);
    let s = with_region(f, ZeroCopy::Off);
    let mut c = RawClient::connect(s.path(), "rw");

    assert_eq!(c.read(8192, 65536).unwrap(), vec![0x11; 65536]);
}

#[test]
fn region_shorter_than_the_read_is_finished_from_the_buffer() {
    let (_d, f) = file_of_0x22(16384);
    let s = with_region(f, ZeroCopy::On);
    let mut c = RawClient::connect(s.path(), "rw");

    let got = c.read(0, 65536).unwrap();

    assert_eq!(
        (&got[..16384], &got[16384..]),
        (&[0x22; 16384][..], &[0x11; 49152][..])
    );
}

#[test]
fn unreadable_region_falls_back_to_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("write-only");
    std::fs::write(&path, vec![0x22; SIZE as usize]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let s = with_region(f, ZeroCopy::On);
    let mut c = RawClient::connect(s.path(), "rw");

    assert_eq!(c.read(0, 65536).unwrap(), vec![0x11; 65536]);
}

#[test]
fn large_zero_copy_reads_pipeline_and_all_arrive_whole() {
    let (_d, f) = file_of_0x22(SIZE as usize);
    let s = with_region(f, ZeroCopy::On);
    let mut c = RawClient::connect(s.path(), "rw");
    for i in 0..8u64 {
        c.send(Command::Read, 0, i * 131072, 131072, &[]);
    }

    let replies: Vec<Vec<Reply>> = (0..8).map(|_| c.full_reply()).collect();

    let whole = |r: &Vec<Reply>| matches!(&r[..], [Reply::Chunk { chunk: Chunk::OffsetData { data, .. }, .. }] if data[..] == [0x22; 131072][..]);
    assert!(replies.iter().all(whole), "{replies:?}");
}

/// A fast backend reporting each write, on a server that streams inline
/// writes in 16 KiB pieces.
fn streaming(fail_writes_over: Option<u64>) -> (TestServer, std_mpsc::Receiver<(u64, usize)>) {
    streaming_in(fail_writes_over, 16 * 1024)
}

/// As [`streaming`], with pieces of at least `piece` bytes.
fn streaming_in(
    fail_writes_over: Option<u64>,
    piece: usize,
) -> (TestServer, std_mpsc::Receiver<(u64, usize)>) {
    let (tx, rx) = std_mpsc::channel();
    let b = MemBackend {
        fast: AtomicBool::new(true),
        writes_seen: Some(Mutex::new(tx)),
        fail_writes_over,
        ..MemBackend::new(false)
    };
    let config = ServerConfig {
        write_piece: piece,
        ..ServerConfig::default()
    };
    (TestServer::start_config(b, config), rx)
}

fn seen(rx: &std_mpsc::Receiver<(u64, usize)>) -> (u64, usize) {
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("the backend saw a write")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i / 4096) as u8 ^ 0x5a).collect()
}

#[test]
fn inline_large_write_reaches_the_backend_while_its_payload_arrives() {
    let (s, writes) = streaming(None);
    let mut c = RawClient::connect(s.path(), "rw");
    let data = pattern(128 * 1024);

    c.send(
        Command::Write,
        0,
        8192,
        128 * 1024,
        &data[..40 * 1024 + 100],
    );
    let (at, first) = seen(&writes);
    c.send_raw(&data[40 * 1024 + 100..]);
    let reply = c.full_reply();

    assert_eq!(at, 8192);
    assert!(
        first <= 40 * 1024,
        "written before the rest was sent: {first}"
    );
    assert!(
        first >= 16 * 1024 && first % 4096 == 0,
        "a page-aligned piece: {first}"
    );
    assert_eq!(error_of(&reply), 0);
    assert_eq!(c.read(8192, 128 * 1024), Ok(data));
}

#[test]
fn streamed_writes_in_ragged_fragments_at_unaligned_offsets_land_whole() {
    let (s, writes) = streaming_in(None, 4096);
    let mut c = RawClient::connect(s.path(), "rw");
    let mut want = vec![0u8; SIZE as usize];
    let mut seed = 0x9e37_79b9_u64;
    let mut next = |n: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (seed >> 33) % n
    };
    for round in 0..24u8 {
        let len = 64 * 1024 + next(64 * 1024) as usize;
        let off = next(SIZE - len as u64);
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ round)
            .collect();
        // Enough for one whole aligned page, so a first piece goes out
        // before the rest is sent.
        let first = 8192 + next(len as u64 - 8192) as usize;
        c.send(Command::Write, 0, off, len as u32, &data[..first]);
        let (at0, n0) = seen(&writes);
        assert!(
            at0 == off && n0 <= first && (at0 + n0 as u64).is_multiple_of(4096),
            "round {round}: first piece {at0}+{n0} is not an aligned prefix of what was sent"
        );
        let mut at = first;
        while at < len {
            let n = (1 + next(20_000) as usize).min(len - at);
            c.send_raw(&data[at..at + n]);
            at += n;
        }
        assert_eq!(error_of(&c.full_reply()), 0, "round {round}");
        while writes.try_recv().is_ok() {}
        want[off as usize..off as usize + len].copy_from_slice(&data);
    }

    assert!(*s.rw.data.lock().unwrap() == want);
}

#[test]
fn failed_piece_fails_the_whole_write_and_the_connection_goes_on() {
    let (s, writes) = streaming(Some(64 * 1024));
    let mut c = RawClient::connect(s.path(), "rw");
    let data = pattern(128 * 1024);

    c.send(Command::Write, 0, 0, 128 * 1024, &data[..64 * 1024]);
    let (at, first) = seen(&writes);
    c.send_raw(&data[64 * 1024..]);
    let reply = c.full_reply();

    assert_eq!(at, 0);
    assert_eq!(error_of(&reply), errno::EIO);
    assert_eq!(
        c.read(0, first as u32),
        Ok(data[..first].to_vec()),
        "earlier pieces stay written"
    );
    assert_eq!(
        c.read(64 * 1024, 4096),
        Ok(vec![0; 4096]),
        "the failed piece is not"
    );
    assert_eq!(c.write(0, &[3; 4096], 0), Ok(()));
}

#[test]
fn client_leaving_mid_streamed_write_leaves_its_range_free() {
    let (s, writes) = streaming(None);
    let mut c = RawClient::connect(s.path(), "rw");
    c.send(Command::Write, 0, 0, 128 * 1024, &pattern(64 * 1024));
    assert_eq!(seen(&writes).0, 0);
    drop(c);
    let mut other = RawClient::connect(s.path(), "rw");

    assert_eq!(other.write(0, &[9; 128 * 1024], 0), Ok(()));
    assert_eq!(other.read(0, 128 * 1024), Ok(vec![9; 128 * 1024]));
}

#[test]
fn shutdown_during_a_streamed_write_finishes_it() {
    let (mut s, writes) = streaming_in(None, 4096);
    let mut c = RawClient::connect(s.path(), "rw");
    let data = pattern(128 * 1024);
    c.send(Command::Write, 0, 0, 128 * 1024, &data[..64 * 1024]);
    // Once all that was sent is written, the server waits for the rest.
    let mut written = 0;
    while written < 64 * 1024 {
        written += seen(&writes).1;
    }

    s.token.cancel();
    c.send_raw(&data[64 * 1024..]);
    let reply = c.full_reply();

    assert_eq!(error_of(&reply), 0);
    assert!(s.stop().is_ok());
    assert_eq!(s.rw.data.lock().unwrap()[..128 * 1024], data[..]);
}

#[test]
fn large_write_behind_a_running_overlapping_read_is_not_streamed() {
    let (b, entered, release) = gated();
    let (tx, writes) = std_mpsc::channel();
    // Slow at first, so the gated read runs on the blocking pool and does
    // not hold up the runtime; fast once the write arrives.
    let b = MemBackend {
        writes_seen: Some(Mutex::new(tx)),
        data: Mutex::new(vec![0x11; SIZE as usize]),
        ..b
    };
    let config = ServerConfig {
        write_piece: 16 * 1024,
        ..ServerConfig::default()
    };
    let s = TestServer::start_config(b, config);
    let mut reader = RawClient::connect(s.path(), "rw");
    let mut writer = RawClient::connect(s.path(), "rw");
    reader.send(Command::Read, 0, GATED, 128 * 1024, &[]);
    entered.recv().unwrap();
    s.rw.fast.store(true, Ordering::Relaxed);

    let write = writer.send(Command::Write, 0, GATED + 4096, 64 * 1024, &[6; 64 * 1024]);
    // Requests register in arrival order: once the flush is answered, the
    // write is registered behind the read.
    assert_eq!(error_of(&writer.call(Command::Flush, 0, 0, 0, &[])), 0);
    release.send(()).unwrap();
    let read = reader.full_reply();

    assert!(
        matches!(&read[0], Reply::Chunk { chunk: Chunk::OffsetData { data, .. }, .. } if data.iter().all(|&b| b == 0x11)),
        "the read saw only the old data"
    );
    assert_eq!(
        seen(&writes),
        (GATED + 4096, 64 * 1024),
        "written whole, after the read"
    );
    let reply = writer.full_reply();
    assert_eq!((reply[0].cookie(), error_of(&reply)), (write, 0));
    assert_eq!(writer.read(GATED + 4096, 4096), Ok(vec![6; 4096]));
}
