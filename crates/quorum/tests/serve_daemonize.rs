//! `quorum serve --daemonize`, `--socket-mode`, `--socket-owner`, and the
//! systemd readiness message (`NOTIFY_SOCKET`, `Type=notify`).
//!
//! Every daemon is stopped by the PID in its pid file when a test ends,
//! also when it fails.

mod support;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Disk, Options, QUORUM, qemu_io, state_dir};

const MIB: u64 = 1 << 20;

/// Kills the daemon named by a pid file on drop.
struct PidGuard(PathBuf);

impl PidGuard {
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Run quorum with piped stdout and stderr; bounded, including the time
/// until both pipes close (a daemon that kept them would hang `$(...)`).
fn run_piped(args: &[&std::ffi::OsStr], env: &[(&str, &Path)]) -> support::Output {
    let mut cmd = Command::new(QUORUM);
    cmd.env("QUORUM_STATE_DIR", state_dir())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start quorum");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "quorum {args:?} did not return");
        std::thread::sleep(Duration::from_millis(10));
    };
    while !(t_out.is_finished() && t_err.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "quorum {args:?} returned but its output pipes stayed open"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    support::Output {
        code: status.code(),
        stdout: t_out.join().expect("stdout"),
        stderr: t_err.join().expect("stderr"),
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

#[test]
fn daemonize_returns_once_the_socket_listens_and_leaves_the_daemon_running() {
    let disk = Disk::raw_filled(3, MIB, 0x5a, &Options::default());
    let sock = disk.file("d.sock");
    let guard = PidGuard(disk.file("d.pid"));

    let out = run_piped(
        &[
            os("serve"),
            disk.xml.as_os_str(),
            os("--socket"),
            sock.as_os_str(),
            os("--pid-file"),
            guard.0.as_os_str(),
            os("--daemonize"),
        ],
        &[],
    );

    assert_eq!(out.code, Some(0), "{out}");
    // No waiting: when the parent has exited 0, the socket accepts.
    UnixStream::connect(&sock).expect("the socket listens when --daemonize returns");
    let pid = guard
        .pid()
        .expect("pid file written before the parent returns");
    assert!(alive(pid), "the daemon runs on");
    let uri = format!("nbd+unix:///vda?socket={}", sock.display());
    let read = qemu_io(&uri, &["read -P 0x5a 0 64k"]);
    assert!(
        read.ok() && !read.text().contains("verification failed"),
        "{read}"
    );
    // SAFETY: the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(Instant::now() < deadline, "daemon {pid} ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!sock.exists(), "a graceful stop removes the socket");
}

#[test]
fn daemonize_exits_non_zero_with_the_error_when_it_cannot_listen() {
    let disk = Disk::raw_filled(2, MIB, 0x5a, &Options::default());
    let sock = disk.file("missing-folder/d.sock");
    let guard = PidGuard(disk.file("d.pid"));

    let out = run_piped(
        &[
            os("serve"),
            disk.xml.as_os_str(),
            os("--socket"),
            sock.as_os_str(),
            os("--pid-file"),
            guard.0.as_os_str(),
            os("--daemonize"),
        ],
        &[],
    );

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains(&format!("cannot listen on {}", sock.display())),
        "{out}"
    );
    assert!(guard.pid().is_none(), "no daemon left behind");
}

#[test]
fn daemonize_reports_a_bad_document_and_exits_1() {
    let disk = Disk::raw_filled(2, MIB, 0x5a, &Options::default());
    std::fs::write(&disk.xml, "<disk type='quorum'>").unwrap();

    let out = run_piped(&[os("serve"), disk.xml.as_os_str(), os("--daemonize")], &[]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("XML error: premature end of data"),
        "{out}"
    );
}

#[test]
fn socket_mode_and_owner_are_set_before_clients_are_told() {
    let disk = Disk::raw_filled(2, MIB, 0x5a, &Options::default());
    let sock = disk.file("d.sock");
    let guard = PidGuard(disk.file("d.pid"));
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let (uid, gid) = if uid == 0 { (65534, 65534) } else { (uid, gid) };

    let out = run_piped(
        &[
            os("serve"),
            disk.xml.as_os_str(),
            os("--socket"),
            sock.as_os_str(),
            os("--pid-file"),
            guard.0.as_os_str(),
            os("--daemonize"),
            os("--socket-mode"),
            os("0600"),
            os("--socket-owner"),
            os(&format!("+{uid}:+{gid}")),
        ],
        &[],
    );

    assert_eq!(out.code, Some(0), "{out}");
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!((m.uid(), m.gid()), (uid, gid));
}

#[test]
fn socket_mode_without_a_socket_or_a_bad_one_is_a_usage_error() {
    let disk = Disk::raw_filled(2, MIB, 0x5a, &Options::default());

    let no_socket = support::quorum([
        os("serve"),
        disk.xml.as_os_str(),
        os("--socket-mode"),
        os("0660"),
    ]);
    let bad = support::quorum([
        os("serve"),
        disk.xml.as_os_str(),
        os("--socket"),
        os("x.sock"),
        os("--socket-mode"),
        os("rw"),
    ]);

    assert_eq!(no_socket.code, Some(2), "{no_socket}");
    assert_eq!(bad.code, Some(2), "{bad}");
    assert!(bad.stderr.contains("give octal permission bits"), "{bad}");
}

#[test]
fn systemd_is_told_ready_once_the_socket_listens() {
    let disk = Disk::raw_filled(2, MIB, 0x5a, &Options::default());
    let sock = disk.file("d.sock");
    let notify_path = disk.file("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let guard = PidGuard(disk.file("d.pid"));
    let mut child = Command::new(QUORUM)
        .env("QUORUM_STATE_DIR", state_dir())
        .env("NOTIFY_SOCKET", &notify_path)
        .arg("serve")
        .arg(&disk.xml)
        .arg("--socket")
        .arg(&sock)
        .arg("--pid-file")
        .arg(&guard.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start quorum serve");

    let mut buf = [0u8; 256];
    let got = notify.recv(&mut buf);
    let connected = UnixStream::connect(&sock).is_ok();
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }

    let n = got.expect("a READY=1 datagram within 60 s");
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        format!("READY=1\nMAINPID={}\n", child.id())
    );
    assert!(connected, "READY=1 came before the socket listened");
}
