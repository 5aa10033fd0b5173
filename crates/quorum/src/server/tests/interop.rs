//! Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdsh) against the
//! in-memory server. A missing tool fails the test.

use std::process::{Command as Proc, Output};

use super::*;

fn uri(s: &TestServer, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", s.path().display())
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Proc::new(program)
        .args(args)
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn qemu_io_writes_and_verifies_a_pattern() {
    let s = TestServer::start();

    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4096 64k",
            "-c",
            "read -P 0xab 4096 64k",
            &uri(&s, "rw"),
        ],
    );

    let text = stdout(&o);
    assert!(text.contains("read 65536/65536 bytes"), "{text}");
    assert!(!text.contains("fail"), "{text}");
    assert_eq!(s.rw.data.lock().unwrap()[4096..4096 + 65536], [0xab; 65536]);
}

#[test]
fn qemu_io_refuses_to_open_read_only_export_for_writing() {
    let s = TestServer::start();

    let o = Proc::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &uri(&s, "ro")])
        .output()
        .expect("qemu-io must be installed");

    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"));
}

#[test]
fn qemu_io_reads_read_only_export() {
    let s = TestServer::start();

    let o = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 4k", &uri(&s, "ro")],
    );

    assert!(
        stdout(&o).contains("read 4096/4096 bytes"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn qemu_img_info_reports_the_size() {
    let s = TestServer::start();

    let o = run("qemu-img", &["info", "--output=json", &uri(&s, "rw")]);

    assert!(
        stdout(&o).contains("\"virtual-size\": 1048576"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn qemu_img_map_shows_data_and_zero_ranges() {
    let s = TestServer::start();
    RawClient::connect(s.path(), "rw")
        .write(4096, &[1u8; 4096], 0)
        .unwrap();

    let o = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &uri(&s, "rw")],
    );

    let text = stdout(&o);
    assert!(text.contains("\"start\": 4096, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "{text}");
}

#[test]
fn nbdinfo_lists_every_export() {
    let s = TestServer::start();
    let u = format!("nbd+unix://?socket={}", s.path().display());

    let o = run("nbdinfo", &["--list", &u]);

    let text = stdout(&o);
    assert!(
        text.contains("export=\"rw\"") && text.contains("export=\"ro\""),
        "{text}"
    );
}

#[test]
fn nbdinfo_shows_size_flags_and_base_allocation() {
    let s = TestServer::start();

    let o = run("nbdinfo", &[&uri(&s, "rw")]);

    let text = stdout(&o);
    assert!(text.contains("export-size: 1048576"), "{text}");
    assert!(text.contains("base:allocation"), "{text}");
    assert!(
        text.contains("can_fua: true") && text.contains("can_multi_conn: true"),
        "{text}"
    );
    assert!(text.contains("description: in-memory disk"), "{text}");
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    let s = TestServer::start();
    RawClient::connect(s.path(), "rw")
        .write(4096, &[1u8; 4096], 0)
        .unwrap();

    let o = run("nbdinfo", &["--map", &uri(&s, "rw")]);

    let text = stdout(&o);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0][..3], ["0", "4096", "3"], "{text}");
    assert_eq!(lines[1][..3], ["4096", "4096", "0"], "{text}");
    assert_eq!(lines[2][..3], ["8192", "1040384", "3"], "{text}");
}

#[test]
fn nbdsh_fua_write_zero_trim_flush_and_out_of_range() {
    let s = TestServer::start();
    let script = "\
h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA)
assert h.pread(512, 0) == b'x' * 512
h.zero(512, 0)
assert h.pread(512, 0) == bytes(512)
h.trim(4096, 0)
h.flush()
h.set_strict_mode(0)
try:
    h.pread(1024, 1048576 - 512)
    raise SystemExit('out-of-range read succeeded')
except nbd.Error as e:
    assert e.errno == 'EINVAL', e.errno
print('ok')
";

    let o = run("nbdsh", &["-u", &uri(&s, "rw"), "-c", script]);

    assert_eq!(stdout(&o).trim(), "ok");
    assert_eq!(*s.rw.fua_writes.lock().unwrap(), 1);
}
