//! NbdReplica against real servers: error mapping and stalls through
//! nbdkit's error and delay filters, reconnects across a qemu-nbd restart,
//! block status of a sparse nbdkit disk, and open-time refusals.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use quorum_replica::{
    ErrorKind, Extent, NbdAddress, NbdConfig, NbdReplica, OpenOptions, Replica, create, open, probe,
};
use tempfile::TempDir;

const SIZE: u64 = 64 << 20;

/// An nbdkit server in a temp dir; the replica must drop first.
struct Kit {
    replica: NbdReplica,
    _server: ChildGuard,
    dir: TempDir,
}

fn socket(dir: &TempDir) -> PathBuf {
    path_in(dir, "kit.sock")
}

fn config(dir: &TempDir) -> NbdConfig {
    NbdConfig::new(NbdAddress::Unix(socket(dir)), "")
}

/// nbdkit with `args`, connected with `cfg` (given the dir).
fn kit_with(args: &[&str], cfg: impl FnOnce(&TempDir) -> NbdConfig) -> Kit {
    let dir = TempDir::new().unwrap();
    let server = serve_nbdkit(&dir, &socket(&dir), args);
    let replica = NbdReplica::connect(cfg(&dir)).unwrap();
    Kit {
        replica,
        _server: server,
        dir,
    }
}

fn kit(args: &[&str]) -> Kit {
    kit_with(args, config)
}

fn errno_of(r: quorum_replica::Result<()>) -> ErrorKind {
    r.unwrap_err().kind
}

/// nbdkit's 64M memory disk behind its error filter, configured by `params`.
fn failing_kit(params: &[&str]) -> Kit {
    kit(&[&["--filter=error", "memory", "64M"], params].concat())
}

/// Block status of `off..off + len` on a memory disk with 64 KiB written at 1 MiB.
fn memory_disk_status(off: u64, len: u64) -> Vec<Extent> {
    let k = kit(&["memory", "64M"]);
    k.replica.write_at(&[7u8; 65536], 1 << 20, false).unwrap();
    k.replica.block_status(off, len).unwrap()
}

#[test]
fn read_error_from_server_is_eio() {
    let k = failing_kit(&["error-pread=EIO", "error-pread-rate=100%"]);
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        errno_of(k.replica.read_at(&mut buf, 0)),
        ErrorKind::Io(libc::EIO)
    );
}

#[test]
fn write_enospc_from_server_is_enospc() {
    let k = failing_kit(&["error-pwrite=ENOSPC", "error-pwrite-rate=100%"]);
    assert_eq!(
        errno_of(k.replica.write_at(&[1u8; 4096], 0, false)),
        ErrorKind::Io(libc::ENOSPC)
    );
}

#[test]
fn errors_start_when_the_trigger_file_appears() {
    let dir = TempDir::new().unwrap();
    let trigger = path_in(&dir, "fail");
    let arg = format!("error-file={}", trigger.display());
    let k = failing_kit(&["error=EIO", "error-rate=100%", &arg]);
    let mut buf = vec![0u8; 4096];
    k.replica.read_at(&mut buf, 0).unwrap();
    std::fs::write(&trigger, b"").unwrap();
    assert_eq!(
        errno_of(k.replica.read_at(&mut buf, 0)),
        ErrorKind::Io(libc::EIO)
    );
}

#[test]
fn stalled_server_fails_with_timeout() {
    let k = kit_with(&["--filter=delay", "memory", "64M", "delay-read=20"], |d| {
        NbdConfig {
            timeout: Duration::from_millis(300),
            ..config(d)
        }
    });
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    let kind = errno_of(k.replica.read_at(&mut buf, 0));
    assert_eq!(
        (kind, start.elapsed() < Duration::from_secs(5)),
        (ErrorKind::Io(libc::ETIMEDOUT), true)
    );
}

#[test]
fn sparse_memory_disk_reports_holes() {
    let ext = memory_disk_status(0, 1 << 20);
    assert_eq!((ext[0].hole, ext[0].zero), (true, true), "{ext:?}");
}

#[test]
fn sparse_memory_disk_reports_written_data() {
    let ext = memory_disk_status(1 << 20, 65536);
    assert_eq!((ext[0].hole, ext[0].zero), (false, false), "{ext:?}");
}

#[test]
fn requests_larger_than_the_maximum_payload_are_split() {
    let k = kit(&["memory", "64M"]);
    let data: Vec<u8> = (0..40 << 20).map(|i: u32| (i % 251) as u8).collect();
    k.replica.write_at(&data, 4096, true).unwrap();
    let mut back = vec![0u8; data.len()];
    k.replica.read_at(&mut back, 4096).unwrap();
    assert!(back == data, "40 MiB round trip differs");
}

#[test]
fn write_zeroes_without_server_support_writes_zeroes() {
    let k = kit(&["--filter=nozero", "memory", "64M"]);
    k.replica.write_at(&[9u8; 65536], 0, false).unwrap();
    k.replica.write_zeroes(4096, 8192, false, true).unwrap();
    let mut back = vec![1u8; 8192];
    k.replica.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, vec![0u8; 8192]);
}

#[test]
fn read_only_export_refuses_writes() {
    let k = kit(&["-r", "memory", "64M"]);
    assert_eq!(
        errno_of(k.replica.write_at(&[1u8; 512], 0, false)),
        ErrorKind::ReadOnly
    );
}

#[test]
fn read_only_open_refuses_writes_locally() {
    let k = kit_with(&["memory", "64M"], |d| NbdConfig {
        read_only: true,
        ..config(d)
    });
    assert_eq!(
        errno_of(k.replica.write_zeroes(0, 512, true, false)),
        ErrorKind::ReadOnly
    );
}

#[test]
fn nbd_replicas_are_remote() {
    let k = kit(&["memory", "64M"]);
    assert!(k.replica.is_remote());
}

#[test]
fn probe_reports_the_export_size() {
    let k = kit(&["memory", "64M"]);
    let info = probe(&nbd_unix(&socket(&k.dir))).unwrap();
    assert_eq!(info.virtual_size, SIZE);
}

#[test]
fn unreachable_server_fails_open_naming_the_address() {
    let dir = TempDir::new().unwrap();
    let sock = path_in(&dir, "nobody.sock");
    let err = open(&nbd_unix(&sock), &OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("nbd+unix:///?socket={}", sock.display()))
            && err.contains("cannot connect"),
        "{err}"
    );
}

#[test]
fn unknown_export_is_named_in_the_open_error() {
    let s = Restartable::new();
    let err = NbdReplica::connect(NbdConfig::new(NbdAddress::Unix(s.sock.clone()), "nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no export named \"nope\""), "{err}");
}

/// A raw file behind qemu-nbd, restartable on the same socket.
struct Restartable {
    path: PathBuf,
    sock: PathBuf,
    server: Option<ChildGuard>,
    _dir: TempDir,
}

impl Restartable {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        let path = path_in(&dir, "r.raw");
        let sock = path_in(&dir, "q.sock");
        create(&raw(&path), 1 << 20, None).unwrap();
        let server = Some(serve_qemu_nbd(&path, &sock));
        Restartable {
            path,
            sock,
            server,
            _dir: dir,
        }
    }

    fn stop(&mut self) {
        self.server = None;
        let _ = std::fs::remove_file(&self.sock);
    }

    fn start(&mut self) {
        self.server = Some(serve_qemu_nbd(&self.path, &self.sock));
    }

    /// A replica opened through the NBD client on this server's socket.
    fn client(&self) -> Box<dyn Replica> {
        open(&nbd_unix(&self.sock), &OpenOptions::default()).unwrap()
    }
}

#[test]
fn reconnects_after_server_restart() {
    let mut s = Restartable::new();
    let r = s.client();
    r.write_at(&[0x42; 4096], 0, true).unwrap();
    s.stop();
    s.start();
    let mut buf = vec![0u8; 4096];
    r.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0x42; 4096]);
}

#[test]
fn calls_fail_with_enotconn_while_the_server_is_down() {
    // ENOTCONN, not EIO: the engine takes it for an unreachable replica.
    let mut s = Restartable::new();
    let r = s.client();
    s.stop();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        errno_of(r.read_at(&mut buf, 0)),
        ErrorKind::Io(libc::ENOTCONN)
    );
}

#[test]
fn calls_work_again_once_the_server_is_back() {
    let mut s = Restartable::new();
    let r = s.client();
    s.stop();
    let mut buf = vec![0u8; 4096];
    let _ = r.read_at(&mut buf, 0);
    s.start();
    r.read_at(&mut buf, 0).unwrap();
}
