//! Real QEMU accepts what `quorum qemu-args` prints, in both forms: the nested
//! `--json` object via `qemu-io 'json:...'`, and the `-blockdev` lines via
//! `qemu-storage-daemon`, read back over NBD.
//!
//! Needs qemu-img, qemu-io and qemu-storage-daemon (Debian: qemu-utils); fails if missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Three replicas: raw, qcow2, and a qcow2 overlay on a raw base, each 4 MiB.
/// Every replica holds 0x33 at 2M..3M before the test writes anything, in
/// replica 3 only through its raw backing file.
const DISK_XML: &str = "\
<disk type='quorum' device='disk'>
  <driver name='qemu' type='quorum' read_pattern='quorum' rewrite_corrupted='off'/>
  <threshold value='2'/>
  <backingStore type='file'>
    <format type='raw'/>
    <source file='r1.raw'/>
  </backingStore>
  <backingStore type='file'>
    <format type='qcow2'/>
    <source file='r2.qcow2'/>
    <backingStore/>
  </backingStore>
  <backingStore type='file'>
    <format type='qcow2'/>
    <source file='r3.qcow2'/>
    <backingStore type='file'>
      <format type='raw'/>
      <source file='base.raw'/>
      <backingStore/>
    </backingStore>
  </backingStore>
  <target dev='vda' bus='virtio'/>
</disk>
";

fn run(program: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"))
}

/// Exit success and the first stdout line (qemu-io's result line).
fn status_and_first_line(out: &Output) -> (bool, Option<String>) {
    let text = String::from_utf8_lossy(&out.stdout);
    (
        out.status.success(),
        text.lines().next().map(str::to_string),
    )
}

fn ok(program: &str, args: &[&str], cwd: &Path) -> String {
    let out = run(program, args, cwd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\nstdout: {text}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A temp folder with the images and `disk.xml`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let size = (4 * MIB).to_string();
        for args in [
            &["-f", "raw", "r1.raw"][..],
            &["-f", "qcow2", "r2.qcow2"],
            &["-f", "raw", "base.raw"],
            &["-f", "qcow2", "-b", "base.raw", "-F", "raw", "r3.qcow2"],
        ] {
            ok("qemu-img", &[&["create", "-q"], args, &[&size]].concat(), d);
        }
        for (fmt, file) in [
            ("raw", "r1.raw"),
            ("qcow2", "r2.qcow2"),
            ("raw", "base.raw"),
        ] {
            ok(
                "qemu-io",
                &["-f", fmt, "-c", "write -P 0x33 2M 1M", file],
                d,
            );
        }
        std::fs::write(d.join("disk.xml"), DISK_XML).unwrap();
        Fixture { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn quorum(&self, args: &[&str]) -> String {
        ok(env!("CARGO_BIN_EXE_quorum"), args, self.path())
    }

    fn json_form(&self) -> String {
        format!(
            "json:{}",
            self.quorum(&["qemu-args", "--json", "disk.xml"]).trim_end()
        )
    }

    /// Assert a read-only qemu-io `cmd` on the json form prints `expected` first.
    #[track_caller]
    fn assert_json_read(&self, cmd: &str, expected: &str) {
        assert_qemu_io_prints(self.path(), &["-r", "-c", cmd, &self.json_form()], expected);
    }

    /// The `-blockdev` lines, unquoted back to their JSON.
    fn blockdevs(&self) -> Vec<String> {
        self.quorum(&["qemu-args", "disk.xml"])
            .lines()
            .map(|l| {
                let quoted = l
                    .strip_prefix("-blockdev ")
                    .expect("line starts with -blockdev");
                quoted[1..quoted.len() - 1].replace(r"'\''", "'")
            })
            .collect()
    }
}

/// qemu-storage-daemon exporting the quorum node over a unix socket; killed by PID on drop.
struct StorageDaemon {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl StorageDaemon {
    fn start(fx: &Fixture) -> Self {
        let socket = fx.path().join("nbd.sock");
        let log = std::fs::File::create(fx.path().join("qsd.log")).unwrap();
        let mut cmd = Command::new("qemu-storage-daemon");
        for b in fx.blockdevs() {
            cmd.arg("--blockdev").arg(b);
        }
        cmd.arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .arg("--export")
            .arg("type=nbd,id=exp0,node-name=quorum-vda,name=vda,writable=on")
            .current_dir(fx.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-storage-daemon (install qemu-utils): {e}"));
        let dir = fx.path().to_path_buf();
        let mut daemon = StorageDaemon { child, socket, dir };
        daemon.wait_for_socket(fx);
        daemon
    }

    /// Bounded wait: the socket appears, or the daemon dies, or 20 s pass.
    fn wait_for_socket(&mut self, fx: &Fixture) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            let log = || std::fs::read_to_string(fx.path().join("qsd.log")).unwrap_or_default();
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("qemu-storage-daemon exited ({status}):\n{}", log());
            }
            assert!(
                Instant::now() < deadline,
                "no NBD socket after 20 s:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///vda?socket={}", self.socket.display())
    }

    /// Assert a read-only qemu-io `cmd` on the NBD export prints `expected` first.
    #[track_caller]
    fn assert_read(&self, cmd: &str, expected: &str) {
        assert_qemu_io_prints(
            &self.dir,
            &["-r", "-f", "raw", "-c", cmd, &self.uri()],
            expected,
        );
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Assert qemu-io with `args` succeeds and prints `expected` as its first line.
#[track_caller]
fn assert_qemu_io_prints(cwd: &Path, args: &[&str], expected: &str) {
    let out = run("qemu-io", args, cwd);
    assert_eq!(
        status_and_first_line(&out),
        (true, Some(expected.to_string()))
    );
}

/// Write 0x5a over 0..1M through the json form; asserts qemu-io succeeds.
fn write_0x5a_through_json(fx: &Fixture) {
    ok(
        "qemu-io",
        &["-c", "write -P 0x5a 0 1M", &fx.json_form()],
        fx.path(),
    );
}

#[test]
fn qemu_io_writes_through_the_json_form() {
    let fx = Fixture::new();

    assert_qemu_io_prints(
        fx.path(),
        &["-c", "write -P 0x5a 0 1M", &fx.json_form()],
        "wrote 1048576/1048576 bytes at offset 0",
    );
}

#[test]
fn qemu_io_reads_back_through_the_json_form() {
    let fx = Fixture::new();
    write_0x5a_through_json(&fx);

    fx.assert_json_read(
        "read -P 0x5a 0 1M",
        "read 1048576/1048576 bytes at offset 0",
    );
}

#[test]
fn json_write_reaches_every_replica() {
    let fx = Fixture::new();
    write_0x5a_through_json(&fx);

    let reads: Vec<bool> = [
        ("raw", "r1.raw"),
        ("qcow2", "r2.qcow2"),
        ("qcow2", "r3.qcow2"),
    ]
    .iter()
    .map(|(f, file)| {
        run(
            "qemu-io",
            &["-r", "-f", f, "-c", "read -P 0x5a 0 1M", file],
            fx.path(),
        )
    })
    .map(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("read 1048576/1048576")
    })
    .collect();

    assert_eq!(reads, [true, true, true]);
}

#[test]
fn storage_daemon_serves_data_written_through_the_json_form() {
    let fx = Fixture::new();
    write_0x5a_through_json(&fx);
    let qsd = StorageDaemon::start(&fx);

    qsd.assert_read(
        "read -P 0x5a 0 1M",
        "read 1048576/1048576 bytes at offset 0",
    );
}

#[test]
fn storage_daemon_reads_data_from_the_raw_backing_file() {
    let fx = Fixture::new();
    let qsd = StorageDaemon::start(&fx);

    qsd.assert_read(
        "read -P 0x33 2M 1M",
        "read 1048576/1048576 bytes at offset 2097152",
    );
}

#[test]
fn storage_daemon_export_accepts_writes_through_the_quorum() {
    let fx = Fixture::new();
    let qsd = StorageDaemon::start(&fx);
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x7e 1M 64k", &qsd.uri()],
        fx.path(),
    );

    qsd.assert_read(
        "read -P 0x7e 1M 64k",
        "read 65536/65536 bytes at offset 1048576",
    );
}

#[test]
fn readonly_disk_json_form_opens_with_qemu_io_r() {
    let fx = Fixture::new();
    let xml = DISK_XML.replace("</disk>", "<readonly/></disk>");
    std::fs::write(fx.path().join("disk.xml"), xml).unwrap();

    fx.assert_json_read(
        "read -P 0x33 2M 1M",
        "read 1048576/1048576 bytes at offset 2097152",
    );
}
