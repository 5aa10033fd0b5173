//! `quorum serve` with a remote replica: two local raw files plus one raw
//! file behind nbdkit (file plugin, error filter armed by a trigger file).
//! Checked through qemu-io over the export and the daemon's log.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Daemon, Disk, Format, Options, create_image, qemu_io, require};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

/// nbdkit serving a raw file on a unix socket, killed by PID on drop.
struct Nbdkit {
    child: Child,
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two local raw replicas, one remote one, and the daemon's inputs.
struct Setup {
    disk: Disk,
    /// The remote replica's file.
    remote: PathBuf,
    /// While this file exists, nbdkit fails every request with EIO.
    trigger: PathBuf,
    _kit: Nbdkit,
}

/// The XML of `disk` with one more replica: the NBD export on `socket`.
fn xml_with_nbd_replica(disk: &Disk, socket: &Path) -> String {
    let nbd = format!(
        "  <backingStore type='network'>\n    <format type='raw'/>\n    <source protocol='nbd'>\n      <host transport='unix' socket='{}'/>\n    </source>\n  </backingStore>\n",
        socket.display()
    );
    disk.xml_text(&Options::default())
        .replace("  <target ", &format!("{nbd}  <target "))
}

fn start_nbdkit(dir: &Path, file: &Path, trigger: &Path) -> (Nbdkit, PathBuf) {
    let socket = dir.join("remote.sock");
    let pid = dir.join("nbdkit.pid");
    let child = Command::new(require("nbdkit"))
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(&socket)
        .arg("-P")
        .arg(&pid)
        .args(["--filter=error", "file"])
        .arg(file)
        .args(["error=EIO", "error-rate=100%"])
        .arg(format!("error-file={}", trigger.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let kit = Nbdkit { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::metadata(&pid).is_ok_and(|m| m.len() > 0) {
        assert!(Instant::now() < deadline, "nbdkit not ready within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    (kit, socket)
}

fn setup() -> Setup {
    let disk = Disk::new(&[Format::Raw; 2], SIZE, &Options::default());
    let remote = disk.file("remote.raw");
    create_image(&remote, Format::Raw, SIZE, None);
    let trigger = disk.file("fail-remote");
    let (kit, socket) = start_nbdkit(disk.dir.path(), &remote, &trigger);
    std::fs::write(&disk.xml, xml_with_nbd_replica(&disk, &socket)).expect("write xml");
    Setup {
        disk,
        remote,
        trigger,
        _kit: kit,
    }
}

fn read_ok_line(len: u64, off: u64) -> String {
    format!("read {len}/{len} bytes at offset {off}")
}

/// Write 0x5a over the first MiB through the export.
fn write_pattern(d: &Daemon) {
    let out = qemu_io(&d.uri, &["write -P 0x5a 0 1M"]);
    assert!(out.ok() && !out.text().contains("failed"), "{out}");
}

fn peek(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, off).expect("read");
    buf
}

#[test]
fn write_through_export_reads_back() {
    let s = setup();
    let d = Daemon::start(&s.disk, &[]);
    write_pattern(&d);

    let out = qemu_io(&d.uri, &["read -P 0x5a 0 1M"]);

    assert!(out.stdout.contains(&read_ok_line(MIB, 0)), "{out}");
}

#[test]
fn write_through_export_reaches_the_remote_file() {
    let s = setup();
    let d = Daemon::start(&s.disk, &[]);
    write_pattern(&d);

    assert_eq!(d.stop(), Some(0));

    assert_eq!(peek(&s.remote, 0, 65536), vec![0x5a; 65536]);
}

#[test]
fn reads_succeed_while_the_remote_replica_fails() {
    let s = setup();
    let d = Daemon::start(&s.disk, &[]);
    write_pattern(&d);
    std::fs::write(&s.trigger, b"").expect("arm trigger");

    let out = qemu_io(&d.uri, &["read -P 0x5a 0 1M"]);

    assert!(out.stdout.contains(&read_ok_line(MIB, 0)), "{out}");
}

#[test]
fn failing_remote_replica_is_reported_bad_with_eio() {
    let s = setup();
    let d = Daemon::start(&s.disk, &[]);
    write_pattern(&d);
    std::fs::write(&s.trigger, b"").expect("arm trigger");

    let out = qemu_io(&d.uri, &["read -P 0x5a 0 64k"]);

    assert!(out.ok(), "{out}");
    let log = d.log_text();
    assert!(
        log.lines().any(|l| l.contains("QUORUM_REPORT_BAD")
            && l.contains("node_name=replica-2")
            && l.contains("error=\"Input/output error\"")),
        "{log}"
    );
}

#[test]
fn read_fails_with_eio_when_a_local_replica_is_also_bad() {
    let s = setup();
    let d = Daemon::start(&s.disk, &[]);
    write_pattern(&d);
    std::fs::write(&s.trigger, b"").expect("arm trigger");
    s.disk.poke_raw(0, 0, &[0x11; 65536]);

    let out = qemu_io(&d.uri, &["read -P 0x5a 0 64k"]);

    assert!(
        out.text().contains("read failed: Input/output error"),
        "{out}"
    );
}

#[test]
fn unreachable_remote_replica_starts_degraded_naming_the_address() {
    let disk = Disk::new(&[Format::Raw; 2], SIZE, &Options::default());
    let socket = disk.file("nobody.sock");
    std::fs::write(&disk.xml, xml_with_nbd_replica(&disk, &socket)).expect("write xml");

    let d = Daemon::start(&disk, &[]);
    let out = qemu_io(&d.uri, &["write -P 0x33 0 64k", "read -P 0x33 0 64k"]);
    let printed = std::fs::read_to_string(disk.file("serve.out")).unwrap();

    assert!(out.ok() && !out.text().contains("fail"), "{out}");
    assert!(
        printed.contains("missing: replica-2: ")
            && printed.contains(&format!("nbd+unix:///?socket={}", socket.display())),
        "{printed}"
    );
}
