//! Helpers shared by the integration tests: layer descriptions and
//! external QEMU tools (which must be installed: tests fail loudly if not).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use quorum_config::model::{Backing, ImageFormat, Source, StorageSource};

/// A file layer with the given format and backing.
pub fn layer(path: &Path, format: ImageFormat, backing: Backing) -> StorageSource {
    StorageSource {
        index: None,
        format,
        source: Source::File {
            path: path.to_path_buf(),
        },
        backing,
    }
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
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed: {text}");
    text
}

/// `qemu-io` commands on an image; returns combined output and success.
pub fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = path.to_str().unwrap();
    args.push(p);
    let out = run("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && !text.contains("failed") && !text.contains("Error");
    (ok, text)
}

/// A child process killed (by PID) and reaped on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let child = cmd
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io is required for this test");
    let guard = ChildGuard(child);
    wait_until(|| has_locks(path));
    guard
}

/// Start `qemu-nbd` serving `path` on a unix socket; wait for the socket.
pub fn hold_with_qemu_nbd(fmt: &str, path: &Path, socket: &Path) -> ChildGuard {
    let child = Command::new("qemu-nbd")
        .args(["-f", fmt, "-k"])
        .arg(socket)
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd is required for this test");
    let guard = ChildGuard(child);
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
    let child = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool} is required for this test and could not be run: {e}"));
    let mut guard = ChildGuard(child);
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

/// An XML layer for an NBD export on a unix socket (raw, default export).
pub fn nbd_unix(socket: &Path) -> StorageSource {
    StorageSource {
        index: None,
        format: ImageFormat::Raw,
        source: Source::Nbd {
            export: None,
            host: quorum_config::model::NbdHost::Unix {
                socket: socket.to_path_buf(),
            },
            tls: None,
        },
        backing: Backing::Unspecified,
    }
}

/// Wait (bounded) until a unix socket accepts connections.
pub fn wait_for_socket(socket: &Path) {
    wait_until(|| std::os::unix::net::UnixStream::connect(socket).is_ok());
}

/// `qemu-nbd` serving a raw file on a unix socket, persistent (`-t`) and
/// with discard passed through; waits until the socket accepts.
pub fn serve_qemu_nbd(path: &Path, socket: &Path) -> ChildGuard {
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-t", "--discard=unmap", "-k"])
        .arg(socket)
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd is required for this test");
    let guard = ChildGuard(child);
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
    let child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(socket)
        .arg("-P")
        .arg(&pid)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit is required for this test");
    let guard = ChildGuard(child);
    wait_until(|| std::fs::metadata(&pid).is_ok_and(|m| m.len() > 0));
    guard
}
