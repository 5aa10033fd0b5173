//! Helpers shared by the integration tests: layer descriptions and
//! external QEMU tools (which must be installed: tests fail loudly if not).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use quorum_config::model::{Backing, ImageFormat, NbdHost, Source, StorageSource};
use quorum_replica::{OpenError, OpenOptions, Replica, open};

/// A locked, buffered read-write open.
pub const RW: OpenOptions = OpenOptions {
    read_only: false,
    direct: false,
    no_locking: false,
    nbd_timeout: None,
    refuse_corrupt: false,
};

/// A locked, buffered read-only open.
pub const RO: OpenOptions = OpenOptions {
    read_only: true,
    direct: false,
    no_locking: false,
    nbd_timeout: None,
    refuse_corrupt: false,
};

/// A locked read-write open, with `O_DIRECT` if `direct`.
pub fn rw(direct: bool) -> OpenOptions {
    OpenOptions { direct, ..RW }
}

/// A top-level layer (no index) from its parts.
fn storage(format: ImageFormat, source: Source, backing: Backing) -> StorageSource {
    StorageSource {
        index: None,
        format,
        source,
        backing,
    }
}

/// A file layer with the given format and backing.
pub fn layer(path: &Path, format: ImageFormat, backing: Backing) -> StorageSource {
    let source = Source::File {
        path: path.to_path_buf(),
    };
    storage(format, source, backing)
}

pub fn qcow2(path: &Path) -> StorageSource {
    layer(path, ImageFormat::Qcow2, Backing::Unspecified)
}

pub fn raw(path: &Path) -> StorageSource {
    layer(path, ImageFormat::Raw, Backing::Unspecified)
}

pub fn over(top: &Path, below: StorageSource) -> StorageSource {
    layer(top, ImageFormat::Qcow2, Backing::Store(Box::new(below)))
}

/// An NBD layer (default export) declared with `format`, without backing.
pub fn nbd(format: ImageFormat, host: NbdHost, tls: Option<bool>) -> StorageSource {
    let source = Source::Nbd {
        export: None,
        host,
        tls,
    };
    storage(format, source, Backing::Unspecified)
}

/// An XML layer for an NBD export on a unix socket (raw, default export).
pub fn nbd_unix(socket: &Path) -> StorageSource {
    let host = NbdHost::Unix {
        socket: socket.to_path_buf(),
    };
    nbd(ImageFormat::Raw, host, None)
}

/// Open `src` read-only (see [`RO`]); panics on failure.
pub fn open_ro(src: &StorageSource) -> Box<dyn Replica> {
    open(src, &RO).unwrap()
}

/// `len` bytes read from `r` at `off`.
pub fn read(r: &dyn Replica, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    r.read_at(&mut buf, off).unwrap();
    buf
}

/// Asserts that `err` is a lock conflict.
pub fn assert_locked(err: OpenError) {
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
}

/// stdout followed by stderr, as text.
fn combined(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a tool to completion; panics if it can't be started.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required for this test and could not be run: {e}"))
}

/// Run a tool and require success.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    let text = combined(&out);
    assert!(out.status.success(), "{tool} {args:?} failed: {text}");
    text
}

/// `qemu-img create -f <fmt> <opts...> <path> <size>`, then any `writes` via `qemu-io` (unchecked).
pub fn qemu_image(path: &Path, fmt: &str, opts: &[&str], size: &str, writes: &[&str]) {
    let mut args = vec!["create", "-f", fmt];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[p(path), size]);
    run_ok("qemu-img", &args);
    if !writes.is_empty() {
        qemu_io(fmt, path, writes);
    }
}

/// How a qemu-made overlay's header names its backing file.
#[derive(Debug, Clone, Copy)]
pub enum BackingName {
    Absolute,
    Relative,
}

/// qemu-made `dir/base.<fmt>` (see `qemu_image`) under `dir/top.qcow2`; returns (base, top).
pub fn qemu_chain(
    dir: &tempfile::TempDir,
    fmt: &str,
    size: &str,
    writes: &[&str],
    name: BackingName,
) -> (PathBuf, PathBuf) {
    let file = format!("base.{fmt}");
    let (base, top) = (path_in(dir, &file), path_in(dir, "top.qcow2"));
    qemu_image(&base, fmt, &[], size, writes);
    let header_name = match name {
        BackingName::Absolute => p(&base),
        BackingName::Relative => file.as_str(),
    };
    let args = [
        "create",
        "-f",
        "qcow2",
        "-b",
        header_name,
        "-F",
        fmt,
        p(&top),
    ];
    run_ok("qemu-img", &args);
    (base, top)
}

/// `qemu-io` commands on an image; returns combined output and success.
pub fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(path));
    let out = run("qemu-io", &args);
    let text = combined(&out);
    let ok = out.status.success() && !text.contains("failed") && !text.contains("Error");
    (ok, text)
}

/// Asserts that all `qemu-io` commands `cmds` on the image succeed.
pub fn assert_qemu_io_ok(fmt: &str, path: &Path, cmds: &[&str]) {
    let (ok, out) = qemu_io(fmt, path, cmds);
    assert!(ok, "{out}");
}

/// Asserts that a `qemu-io` write to the image fails on a lock.
pub fn assert_qemu_io_write_locked_out(fmt: &str, path: &Path) {
    let (ok, out) = qemu_io(fmt, path, &["write 0 512"]);
    assert!(!ok && out.contains("lock"), "{out}");
}

/// A child process killed (by PID) and reaped on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawn `cmd` quietly (stdout, stderr discarded) under a guard; panics if it can't start.
fn spawn_quiet(tool: &str, cmd: &mut Command) -> ChildGuard {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool} is required for this test and could not be run: {e}"));
    ChildGuard(child)
}

/// Whether any OFD lock is held on `path` (per /proc/locks).
pub fn has_locks(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    locks.lines().any(|l| {
        l.split_whitespace()
            .any(|f| f.ends_with(&format!(":{ino}")))
    })
}

/// Start `qemu-io` interactively (it opens the image and waits on stdin),
/// and wait (bounded) until its locks are visible.
pub fn hold_with_qemu_io(fmt: &str, path: &Path, read_only: bool) -> ChildGuard {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", fmt]);
    if read_only {
        cmd.arg("-r");
    }
    let guard = spawn_quiet("qemu-io", cmd.arg(path).stdin(Stdio::piped()));
    wait_until(|| has_locks(path));
    guard
}

/// Start `qemu-nbd` serving `path` on a unix socket; wait for the socket.
pub fn hold_with_qemu_nbd(fmt: &str, path: &Path, socket: &Path) -> ChildGuard {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", fmt, "-k"]).arg(socket).arg(path);
    let guard = spawn_quiet("qemu-nbd", &mut cmd);
    wait_until(|| socket.exists() && has_locks(path));
    guard
}

/// Poll `cond` for up to 10 s.
pub fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Start a tool and wait (bounded) for it to exit; `None` if it kept
/// running for 10 s (it is then killed by the guard).
pub fn exit_status_within(tool: &str, args: &[&str]) -> Option<std::process::ExitStatus> {
    let mut guard = spawn_quiet(tool, Command::new(tool).args(args));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait (bounded) until a unix socket accepts connections.
pub fn wait_for_socket(socket: &Path) {
    wait_until(|| std::os::unix::net::UnixStream::connect(socket).is_ok());
}

/// `qemu-nbd` serving a raw file on a unix socket, persistent (`-t`) and
/// with discard passed through; waits until the socket accepts.
pub fn serve_qemu_nbd(path: &Path, socket: &Path) -> ChildGuard {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-t", "--discard=unmap", "-k"])
        .arg(socket)
        .arg(path);
    let guard = spawn_quiet("qemu-nbd", &mut cmd);
    wait_for_socket(socket);
    guard
}

/// `nbdkit -f` on a unix socket with `args` (plugin, filters, parameters);
/// waits for its pid file, which it writes once it accepts connections.
pub fn serve_nbdkit(dir: &tempfile::TempDir, socket: &Path, args: &[&str]) -> ChildGuard {
    let pid = dir.path().join(format!(
        "{}.pid",
        socket.file_name().unwrap().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&pid);
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(socket)
        .arg("-P")
        .arg(&pid)
        .args(args);
    let guard = spawn_quiet("nbdkit", &mut cmd);
    wait_until(|| std::fs::metadata(&pid).is_ok_and(|m| m.len() > 0));
    guard
}
