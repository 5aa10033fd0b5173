//! Issue 9 ("Hardening"), items 1, 2, 11 and 12, end to end against the
//! real binary and its peers:
//!
//! 1. a closed stderr/stdout must not turn majority reads into EIO, keep
//!    `serve` from stopping or starting, or make other commands panic;
//! 2. SIGHUP stops `serve` gracefully, as it stops qemu-nbd and
//!    qemu-storage-daemon (compared in the test), and SIGPIPE is ignored;
//! 11. usage errors (2) and `check`'s results (4, 8, 12) never share a code;
//! 12. an error prints each cause once, plus a `hint:` with the fix.
//!
//! Daemons are waited for by their socket (bounded), stopped by PID, and
//! killed by PID on drop even when an assertion fails.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::nbd_raw::RawClient;
use support::{Disk, Format, Options, QUORUM, qemu_io, quorum, require, tool};

const MIB: u64 = 1 << 20;
const KIB64: usize = 64 << 10;

/// A pipe whose reader is already gone: every write to it fails with EPIPE,
/// as writes to `| head -1` do once head has exited.
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    writer.into()
}

/// Send `sig` to `pid`.
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the PID of a child we have not reaped yet.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Any NBD server (quorum serve, qemu-nbd, qemu-storage-daemon) on a unix
/// socket; killed by PID on drop.
struct Server {
    name: &'static str,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Start `cmd` (its stdout and stderr as the caller set them, or into
    /// `log`) and wait, bounded, until `socket` accepts.
    fn start(name: &'static str, mut cmd: Command, socket: &Path, log: &Path) -> Server {
        cmd.stdin(Stdio::null());
        let mut server = Server {
            name,
            child: Some(
                cmd.spawn()
                    .unwrap_or_else(|e| panic!("cannot start {name}: {e}")),
            ),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
                server.child = None;
                panic!(
                    "{name} exited before serving ({st}):\n{}",
                    server.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not accept on {} within 20 s:\n{}",
                socket.display(),
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send `sig` and wait up to 20 s for the exit; `None` if it did not exit.
    fn signal_and_wait(&mut self, sig: libc::c_int) -> Option<ExitStatus> {
        signal(self.pid(), sig);
        let st = support::wait_bounded(self.child.as_mut().unwrap(), Duration::from_secs(20));
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// Assert the server still answers a read.
    fn assert_serving(&self, export: &str) {
        let mut c = RawClient::connect(&self.socket, export);
        assert_eq!(
            c.read(0, 4096).map(|d| d.len()),
            Ok(4096),
            "{} stopped answering",
            self.name
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `quorum serve` on `disk` with stdout and stderr as given.
fn quorum_serve(disk: &Disk, stdout: Stdio, stderr: Stdio) -> Server {
    let socket = disk.file("nbd.sock");
    let mut cmd = Command::new(QUORUM);
    cmd.arg("serve")
        .arg(&disk.xml)
        .arg("--socket")
        .arg(&socket)
        .arg("--pid-file")
        .arg(disk.file("quorum.pid"))
        .stdout(stdout)
        .stderr(stderr);
    Server::start("quorum serve", cmd, &socket, &disk.file("serve.log"))
}

/// Three raw replicas of 4 MiB; replicas 0 and 1 hold 0xaa in the first
/// 64 KiB, replica 2 holds 0xbb there: a read of it is a 2-of-3 majority
/// that votes replica 2 out (and logs that).
fn disk_with_one_dissenter() -> Disk {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    disk.fill(0, 0xaa, 0, KIB64 as u64);
    disk.fill(1, 0xaa, 0, KIB64 as u64);
    disk.fill(2, 0xbb, 0, KIB64 as u64);
    disk
}

/// Read the 64 KiB the majority holds, through qemu-io.
#[track_caller]
fn assert_majority_read(uri: &str) {
    let out = qemu_io(uri, &["read -P 0xaa 0 64k"]);
    assert!(
        out.ok() && out.stdout.contains("read 65536/65536 bytes at offset 0"),
        "a 2-of-3 majority read failed: {out}"
    );
}

// ---- item 1: a closed stderr or stdout ----------------------------------

/// `quorum serve 2>&1 | head -1`: the log reader is gone. A read that votes
/// one replica out logs a warning into the closed pipe; it must still
/// return the majority's data, SIGPIPE must not kill the daemon, and
/// SIGTERM must still stop it cleanly.
#[test]
fn serve_with_closed_stderr_returns_majority_reads_and_stops_on_sigterm() {
    require("qemu-io");
    let disk = disk_with_one_dissenter();
    let out = std::fs::File::create(disk.file("serve.out")).unwrap();
    let mut server = quorum_serve(&disk, out.into(), closed_pipe());
    let uri = format!("nbd+unix:///vda?socket={}", server.socket.display());

    signal(server.pid(), libc::SIGPIPE);
    server.assert_serving("vda");
    assert_majority_read(&uri);
    assert_majority_read(&uri);
    let st = server.signal_and_wait(libc::SIGTERM);

    assert_eq!(
        st.map(|s| s.code()),
        Some(Some(0)),
        "SIGTERM did not stop serve cleanly"
    );
    assert!(!server.socket.exists(), "socket left behind");
    assert!(!disk.file("quorum.pid").exists(), "pid file left behind");
}

/// `quorum serve | true` with stderr closed too: serve starts, serves the
/// majority, and stops on SIGINT, having lost only its text.
#[test]
fn serve_with_closed_stdout_and_stderr_starts_serves_and_stops_on_sigint() {
    require("qemu-io");
    let disk = disk_with_one_dissenter();
    let mut server = quorum_serve(&disk, closed_pipe(), closed_pipe());
    let uri = format!("nbd+unix:///vda?socket={}", server.socket.display());

    assert_majority_read(&uri);
    let st = server.signal_and_wait(libc::SIGINT);

    assert_eq!(
        st.map(|s| s.code()),
        Some(Some(0)),
        "SIGINT did not stop serve cleanly"
    );
    assert!(!server.socket.exists(), "socket left behind");
}

/// Run the quorum binary with `args`, stdout a pipe nobody reads.
fn quorum_into_closed_stdout(args: &[&std::ffi::OsStr]) -> (Option<i32>, Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(QUORUM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start quorum");
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let st = support::wait_bounded(&mut child, Duration::from_secs(60)).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("quorum {args:?} did not finish within 60 s");
    });
    (st.code(), st.signal(), reader.join().unwrap())
}

/// `quorum check d.xml | head -3`: check still reports its verdict in the
/// exit status, with no panic (it exited 101 before).
#[test]
fn check_into_closed_stdout_keeps_its_verdict_and_does_not_panic() {
    let disk = disk_with_one_dissenter();

    let (code, sig, stderr) = quorum_into_closed_stdout(&["check".as_ref(), disk.xml.as_ref()]);

    assert_eq!((code, sig, stderr.as_str()), (Some(4), None, ""));
}

/// validate, dumpxml and qemu-args with a closed stdout end quietly: by
/// SIGPIPE like `cat | head`, or exit 0; never a panic (exit 101).
#[test]
fn printing_commands_into_closed_stdout_end_quietly() {
    let disk = disk_with_one_dissenter();
    for cmd in ["validate", "dumpxml", "qemu-args"] {
        let (code, sig, stderr) = quorum_into_closed_stdout(&[cmd.as_ref(), disk.xml.as_ref()]);

        assert!(
            (code == Some(0) || sig == Some(libc::SIGPIPE)) && stderr.is_empty(),
            "quorum {cmd} into a closed stdout: exit {code:?}, signal {sig:?}, stderr {stderr:?}"
        );
    }
}

// ---- item 2: SIGHUP (and SIGPIPE) as qemu-nbd and qemu-storage-daemon --

/// 200 writes of 64 KiB, each different, none flushed (no FUA, no FLUSH);
/// returns the data and the client, still connected.
fn write_unflushed(socket: &Path, export: &str) -> (Vec<u8>, RawClient) {
    let data = pattern(200 * KIB64);
    let mut c = RawClient::connect(socket, export);
    for (i, chunk) in data.chunks(KIB64).enumerate() {
        assert_eq!(c.write((i * KIB64) as u64, chunk, 0), Ok(()), "write {i}");
    }
    (data, c)
}

/// Bytes that differ from write to write and from zeros.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| ((k as u32).wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect()
}

/// Whether `image` (of `format`) holds `data` from offset 0 and zeros after
/// it: `qemu-img compare` against a raw file holding exactly `data` (an
/// image larger than the other compares equal when its tail reads zeros).
fn image_holds(dir: &Path, image: &Path, format: &str, data: &[u8]) -> Result<(), String> {
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, data).unwrap();
    let out = tool(
        "qemu-img",
        [
            "compare".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-F".as_ref(),
            format.as_ref(),
            expected.as_os_str(),
            image.as_os_str(),
        ],
    );
    if out.ok() {
        Ok(())
    } else {
        Err(format!("{}: {out}", image.display()))
    }
}

/// Assert [`image_holds`].
#[track_caller]
fn assert_image_holds(dir: &Path, image: &Path, format: &str, data: &[u8], who: &str) {
    if let Err(e) = image_holds(dir, image, format, data) {
        panic!("{who} lost the unflushed writes: {e}");
    }
}

/// What one server did when SIGHUP came after unflushed writes.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// Exit code (`None`: killed by a signal, as SIGHUP's default does).
    code: Option<i32>,
}

/// Write 200 × 64 KiB unflushed, send SIGPIPE (must be ignored), then
/// SIGHUP while the writing client is still connected.
fn hang_up(server: &mut Server, export: &str) -> (Outcome, Vec<u8>) {
    let (data, _client) = write_unflushed(&server.socket, export);
    signal(server.pid(), libc::SIGPIPE);
    server.assert_serving(export);
    let st = server
        .signal_and_wait(libc::SIGHUP)
        .unwrap_or_else(|| panic!("{} did not exit within 20 s of SIGHUP", server.name));
    (Outcome { code: st.code() }, data)
}

/// SIGHUP after 200 unflushed writes: qemu-nbd and qemu-storage-daemon
/// stop gracefully (exit 0) and their qcow2 image holds every write.
/// `quorum serve` must do the same for all its replicas, qcow2 and raw
/// alike, and remove its socket (as qemu-nbd does) and pid file (as
/// qemu-storage-daemon does). Before the fix SIGHUP killed it: no exit
/// code, socket left, qcow2 replicas without the writes.
#[test]
fn sighup_stops_serve_gracefully_like_qemu_nbd_and_qemu_storage_daemon() {
    let size = 16 * MIB;

    // qemu-nbd on one qcow2 image.
    let peer = tempfile::tempdir().unwrap();
    let img = peer.path().join("nbd.qcow2");
    support::create_image(&img, Format::Qcow2, size, None);
    let socket = peer.path().join("qemu-nbd.sock");
    let log = peer.path().join("qemu-nbd.log");
    let mut cmd = Command::new(require("qemu-nbd"));
    // -t: keep serving between clients; -e: two clients at once.
    cmd.args([
        "-f",
        "qcow2",
        "-x",
        "vda",
        "--cache=writeback",
        "-t",
        "-e",
        "2",
        "-k",
    ])
    .arg(&socket)
    .arg(&img)
    .stdout(std::fs::File::create(&log).unwrap())
    .stderr(std::fs::File::create(&log).unwrap());
    let mut nbd = Server::start("qemu-nbd", cmd, &socket, &log);
    let (nbd_outcome, data) = hang_up(&mut nbd, "vda");
    assert_image_holds(peer.path(), &img, "qcow2", &data, "qemu-nbd");
    assert!(
        !socket.exists(),
        "qemu-nbd left its socket (the test assumes it does not)"
    );

    // qemu-storage-daemon on another qcow2 image.
    let img = peer.path().join("qsd.qcow2");
    support::create_image(&img, Format::Qcow2, size, None);
    let socket = peer.path().join("qsd.sock");
    let pid_file = peer.path().join("qsd.pid");
    let log = peer.path().join("qsd.log");
    let mut cmd = Command::new(require("qemu-storage-daemon"));
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=off",
            img.display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=fmt0,file=file0"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .args([
            "--export",
            "type=nbd,id=exp0,node-name=fmt0,name=vda,writable=on",
        ])
        .arg("--pidfile")
        .arg(&pid_file)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut qsd = Server::start("qemu-storage-daemon", cmd, &socket, &log);
    let (qsd_outcome, data) = hang_up(&mut qsd, "vda");
    assert_image_holds(peer.path(), &img, "qcow2", &data, "qemu-storage-daemon");
    assert!(!pid_file.exists(), "qemu-storage-daemon left its pid file");

    // quorum serve on qcow2, qcow2 and raw replicas.
    let disk = Disk::new(
        &[Format::Qcow2, Format::Qcow2, Format::Raw],
        size,
        &Options::default(),
    );
    let log = disk.file("serve.log");
    let mut serve = quorum_serve(
        &disk,
        std::fs::File::create(disk.file("serve.out"))
            .unwrap()
            .into(),
        std::fs::File::create(&log).unwrap().into(),
    );
    let (ours, data) = hang_up(&mut serve, "vda");
    let kept: Vec<(&str, bool)> = disk
        .replicas
        .iter()
        .map(|r| {
            let holds = image_holds(disk.dir.path(), &r.path, r.format.name(), &data);
            (r.format.name(), holds.is_ok())
        })
        .collect();

    assert_eq!(nbd_outcome, qsd_outcome, "qemu-nbd vs qemu-storage-daemon");
    assert_eq!(
        (
            &ours,
            kept,
            disk.file("nbd.sock").exists(),
            disk.file("quorum.pid").exists()
        ),
        (
            &nbd_outcome,
            vec![("qcow2", true), ("qcow2", true), ("raw", true)],
            false,
            false
        ),
        "SIGHUP: quorum serve (exit, replicas holding the writes, socket left, \
         pid file left) vs qemu-nbd's exit\n{}",
        serve.log_text()
    );
    assert_eq!(ours, Outcome { code: Some(0) });
}

// ---- item 11: exit codes ------------------------------------------------

/// Three raw replicas of 8 MiB holding 0x5a, with `fills` applied.
fn filled_disk(fills: &[(usize, u8, u64, u64)]) -> Disk {
    let disk = Disk::raw_filled(3, 8 * MIB, 0x5a, &Options::default());
    for &(i, p, off, len) in fills {
        disk.fill(i, p, off, len);
    }
    disk
}

/// A usage error exits 2; `check`'s verdicts are 4 (divergence not
/// repaired), 8 (no quorum) and 12 (both): none of them is 2. Before the
/// fix a divergence also exited 2, and no quorum 3.
#[test]
fn usage_errors_and_check_verdicts_never_share_an_exit_code() {
    let divergent = (1, 0x42, 65536, 4096);
    // Far from the divergent block, in another 4 MiB scrub step.
    let no_quorum = [(0, 0x41, 5 * MIB, 4096), (1, 0x43, 5 * MIB, 4096)];
    let d = filled_disk(&[divergent]);
    let n = filled_disk(&no_quorum);
    let both = filled_disk(&[divergent, no_quorum[0], no_quorum[1]]);
    let clean = filled_disk(&[]);
    let xml = |d: &Disk| d.xml.display().to_string();

    let codes = [
        quorum(["check", "--no-such-option", &xml(&d)]).code,
        quorum(["check"]).code,
        quorum(["serve", &xml(&d), "--size", "1G"]).code,
        quorum(["check", &xml(&clean)]).code,
        quorum(["check", &xml(&d)]).code,
        quorum(["check", &xml(&n)]).code,
        quorum(["check", &xml(&both)]).code,
        quorum(["check", "/no/such/disk.xml"]).code,
    ];

    assert_eq!(
        codes,
        [2, 2, 2, 0, 4, 8, 12, 1].map(Some),
        "usage, usage, usage, clean, divergent, no quorum, both, error"
    );
}

/// `quorum --help` and `quorum check --help` document the same codes.
#[test]
fn exit_codes_are_documented_in_help() {
    let top = quorum(["--help"]);
    let check = quorum(["check", "--help"]);

    for (out, lines) in [
        (
            &top,
            &[
                "0   success",
                "1   error",
                "2   usage error",
                "4   check:",
                "8   check:",
            ][..],
        ),
        (
            &check,
            &[
                "0   all replicas agree",
                "4   divergence",
                "8   some blocks have no quorum",
                "12  both",
                "1   error",
                "2   usage error",
            ][..],
        ),
    ] {
        assert!(out.ok(), "{out}");
        for l in lines {
            assert!(out.stdout.contains(l), "help lacks {l:?}:\n{}", out.stdout);
        }
    }
}

// ---- item 12: each cause once, plus the fix ------------------------------

/// How often `needle` occurs in `hay`.
fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// Missing replicas (two of three: below the threshold, so no degraded
/// start): each OS error and each path appear once, and one hint says how
/// to create them. Before the fix the cause appeared 2-3 times.
#[test]
fn missing_replica_error_names_each_cause_once_with_the_fix() {
    let disk = filled_disk(&[]);
    let paths = [1, 2].map(|i| disk.path(i).display().to_string());
    std::fs::remove_file(disk.path(1)).unwrap();
    std::fs::remove_file(disk.path(2)).unwrap();

    for args in [
        vec!["check", disk.xml.to_str().unwrap()],
        vec![
            "serve",
            disk.xml.to_str().unwrap(),
            "--socket",
            disk.file("s.sock").to_str().unwrap(),
        ],
    ] {
        let out = quorum(&args);

        let err = &out.stderr;
        assert_eq!(out.code, Some(1), "{out}");
        assert_eq!(
            (
                count(err, "No such file or directory"),
                count(err, &paths[0]),
                count(err, &paths[1]),
                count(err, "hint: "),
            ),
            (2, 1, 1, 1),
            "quorum {}: each cause once:\n{err}",
            args[0]
        );
        assert!(
            err.contains("\nhint: ") && err.contains("quorum create"),
            "quorum {}: no hint:\n{err}",
            args[0]
        );
    }
    // validate --probe lists the same problems, each with its cause.
    let probe = quorum(["validate", "--probe", disk.xml.to_str().unwrap()]);
    assert_eq!(
        count(&probe.stderr, "No such file or directory"),
        2,
        "{probe}"
    );
}

/// A replica locked by a running server: said once, with the fix.
#[test]
fn locked_replica_error_says_it_once_and_to_stop_the_server() {
    let disk = filled_disk(&[]);
    let server = quorum_serve(
        &disk,
        Stdio::null(),
        std::fs::File::create(disk.file("serve.log"))
            .unwrap()
            .into(),
    );

    let out = quorum(["check", "--repair", disk.xml.to_str().unwrap()]);

    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        count(&out.stderr, "is locked by another process"),
        1,
        "{out}"
    );
    assert!(
        out.stderr
            .contains("hint: stop the server that holds the lock"),
        "{out}"
    );
    drop(server);
}
