//! contrib/systemd/quorum-serve@.service: systemd's own checker accepts it,
//! and its ExecStart (with /etc/quorum and /run/quorum moved to a temp dir)
//! serves the disk and tells `NOTIFY_SOCKET` it is ready, as `Type=notify`
//! needs.
//!
//! Needs systemd-analyze (Debian: systemd); fails if missing.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Disk, Options, QUORUM, require, state_dir};

const MIB: u64 = 1 << 20;

fn unit_text() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd/quorum-serve@.service"),
    )
    .expect("the unit template")
}

/// The unit with ExecStart running the quorum under test.
fn unit_for_test() -> String {
    unit_text().replace("/usr/local/bin/quorum", QUORUM)
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quorum-serve@.service"), unit_for_test()).unwrap();

    let out = support::run(
        Command::new(require("systemd-analyze"))
            .args(["verify", "./quorum-serve@vda.service"])
            .current_dir(dir.path()),
    );

    assert!(out.ok(), "{out}");
    assert_eq!(out.stderr, "", "systemd warns about the unit:\n{out}");
}

#[test]
fn exec_start_serves_and_notifies_readiness() {
    let disk = Disk::raw_filled(2, MIB, 0x5a, &Options::default());
    let etc = disk.file("etc");
    let run = disk.file("run");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::copy(&disk.xml, etc.join("vda.xml")).unwrap();
    let line = unit_for_test()
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=").map(str::to_string))
        .expect("ExecStart");
    let line = line
        .replace("%i", "vda")
        .replace("/etc/quorum", &etc.display().to_string())
        .replace("/run/quorum", &run.display().to_string());
    let argv: Vec<&str> = line.split_whitespace().collect();
    let notify_path: PathBuf = disk.file("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();

    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .env("QUORUM_STATE_DIR", state_dir())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run ExecStart");
    let mut buf = [0u8; 256];
    let got = notify.recv(&mut buf);
    let sock = run.join("vda.sock");
    let connected = UnixStream::connect(&sock).is_ok();
    let mode = std::fs::metadata(&sock).map(|m| m.permissions().mode() & 0o777);
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "serve ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }

    let n = got.expect("READY=1 within 60 s");
    assert!(
        std::str::from_utf8(&buf[..n])
            .unwrap()
            .starts_with("READY=1\n")
    );
    assert!(connected);
    assert_eq!(mode.unwrap(), 0o660);
}
