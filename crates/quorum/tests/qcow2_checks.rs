//! qcow2 images that are wrong, through the CLI: `validate --probe` refuses
//! what `serve` and `check` refuse, a qcow2 file declared raw is a format
//! mismatch, and a disk with one corrupt qcow2 replica keeps serving the
//! majority's data (`quorum serve` driven by qemu-io).

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{
    Daemon, Disk, Format, Options, TIMEOUT, create_image, qemu_io, quorum, require, run_timeout,
};

const MIB: u64 = 1 << 20;

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// A `quorum serve` child, killed by PID if a test fails before it is stopped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `quorum serve` on `disk`, where one replica is unusable: it either
/// refuses to start (every replica required) or starts without that replica
/// (degraded start). Either way its stderr must say which replica and why;
/// returns that stderr once it contains every one of `needles` or serve
/// exited (bounded: 20 s).
fn serve_reports(disk: &Disk, needles: &[&str]) -> String {
    serve_outcome(disk, needles).1
}

/// As [`serve_reports`], also saying whether serve exited by itself.
fn serve_outcome(disk: &Disk, needles: &[&str]) -> (bool, String) {
    let log = disk.file("serve-refused.log");
    let child = Command::new(env!("CARGO_BIN_EXE_quorum"))
        .arg("serve")
        .arg(&disk.xml)
        .arg("--socket")
        .arg(disk.file("nbd.sock"))
        .env("QUORUM_STATE_DIR", disk.file("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start quorum serve");
    let mut serve = Serve(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let exited = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break Some(status);
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) || Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if exited.is_none() {
        // Started degraded: stop it (SIGTERM, bounded wait, then SIGKILL).
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(serve.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while serve.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(serve);
    if let Some(status) = exited {
        assert!(!status.success(), "serve exited 0");
    }
    (exited.is_some(), std::fs::read_to_string(&log).unwrap())
}

#[test]
fn a_single_replica_disk_with_an_empty_l1_table_is_refused_like_qemu() {
    // Served as all zeros before; qemu-io refuses to open the image.
    let opts = Options {
        threshold: 1,
        ..Options::default()
    };
    let disk = Disk::new(&[Format::Qcow2], MIB, &opts);
    let out = run_timeout(
        Command::new(require("qemu-io"))
            .args(["-f", "qcow2", "-c", "write -P 0x11 0 64k"])
            .arg(disk.path(0)),
        TIMEOUT,
    );
    assert!(out.ok(), "{out}");
    poke(disk.path(0), 36, &0u32.to_be_bytes());
    let name = disk.path(0).to_str().unwrap();

    let qemu = run_timeout(
        Command::new(require("qemu-io"))
            .args(["-f", "qcow2", "-c", "read 0 4k"])
            .arg(disk.path(0)),
        TIMEOUT,
    );
    assert!(
        !qemu.ok() && qemu.stderr.contains("L1 table is too small"),
        "{qemu}"
    );
    let (exited, log) = serve_outcome(&disk, &[name, "L1 table is too small"]);
    assert!(exited, "serve must refuse to start: {log}");
    assert!(
        log.contains(name) && log.contains("L1 table is too small"),
        "{log}"
    );
}

#[test]
fn a_qcow2_file_declared_raw_is_a_format_mismatch_for_serve_check_and_probe() {
    let disk = Disk::new(&[Format::Raw; 3], MIB, &Options::default());
    std::fs::remove_file(disk.path(1)).unwrap();
    create_image(disk.path(1), Format::Qcow2, MIB, None);
    let name = disk.path(1).to_str().unwrap();

    let mismatch = "the XML says format raw, but the file is qcow2";
    let check = quorum(["check", disk.xml.to_str().unwrap()]);
    assert!(
        check.stderr.contains(name) && check.stderr.contains(mismatch),
        "{check}"
    );
    assert!(!check.stderr.contains("size"), "{check}");
    let serve = serve_reports(&disk, &[name, mismatch]);
    assert!(serve.contains(name) && serve.contains(mismatch), "{serve}");
    assert!(!serve.contains("size"), "{serve}");
    let probe = quorum(["validate", "--probe", disk.xml.to_str().unwrap()]);
    assert_eq!(probe.code, Some(1), "{probe}");
    assert!(probe.stderr.contains("replica 1:"), "{probe}");
}

/// Header edits QEMU refuses to open: (offset, bytes, what quorum says,
/// what `qemu-img info` says).
const BAD_HEADERS: &[(&str, u64, &[u8], &str, &str)] = &[
    (
        "cluster size 4 MiB",
        20,
        &22u32.to_be_bytes(),
        "unsupported cluster size 2^22",
        "Unsupported cluster size",
    ),
    (
        "L1 table of 5 Mi entries",
        36,
        &0x50_0000u32.to_be_bytes(),
        "active L1 table too large",
        "Active L1 table too large",
    ),
    (
        "refcount table of 1 Mi clusters",
        56,
        &0x10_0000u32.to_be_bytes(),
        "refcount table too large",
        "Reference count table too large",
    ),
    (
        "L1 table of 0 entries",
        36,
        &0u32.to_be_bytes(),
        "L1 table is too small",
        "L1 table is too small",
    ),
];

#[test]
fn validate_probe_refuses_the_qcow2_headers_serve_and_check_refuse() {
    for &(what, off, bytes, ours, qemus) in BAD_HEADERS {
        let disk = Disk::new(&[Format::Qcow2; 3], MIB, &Options::default());
        poke(disk.path(2), off, bytes);
        let name = disk.path(2).to_str().unwrap();

        let info = run_timeout(
            Command::new(require("qemu-img"))
                .args(["info", "-f", "qcow2"])
                .arg(disk.path(2)),
            TIMEOUT,
        );
        assert!(!info.ok() && info.stderr.contains(qemus), "{what}: {info}");

        let probe = quorum(["validate", "--probe", disk.xml.to_str().unwrap()]);
        assert_eq!(probe.code, Some(1), "{what}: {probe}");
        assert!(
            probe.stderr.contains("replica 2:")
                && probe.stderr.contains(name)
                && probe.stderr.contains(ours),
            "{what}: {probe}"
        );
        let check = quorum(["check", disk.xml.to_str().unwrap()]);
        assert!(
            check.stderr.contains(name) && check.stderr.contains(ours),
            "{what}: {check}"
        );
        let serve = serve_reports(&disk, &[name, ours]);
        assert!(
            serve.contains(name) && serve.contains(ours),
            "{what}: {serve}"
        );
    }
}

#[test]
fn chain_end_over_a_header_backing_file_is_accepted_by_probe_and_serve_alike() {
    // `<backingStore/>` ends the chain (QEMU's `backing: null`) even when the
    // header names a backing file: serve reads zeroes there, probe agrees.
    let disk = Disk::new(&[Format::Qcow2; 3], MIB, &Options::default());
    let base = disk.file("base.raw");
    create_image(&base, Format::Raw, MIB, None);
    std::fs::remove_file(disk.path(0)).unwrap();
    create_image(disk.path(0), Format::Qcow2, MIB, Some(&base));
    assert!(
        disk.xml_text(&Options::default())
            .contains("<backingStore/>")
    );

    let probe = quorum(["validate", "--probe", disk.xml.to_str().unwrap()]);
    assert_eq!(probe.code, Some(0), "{probe}");
    let d = Daemon::start(&disk, &[]);
    let out = qemu_io(&d.uri, &["read -P 0 0 64k"]);
    assert!(out.ok(), "{out}");
    assert_eq!(d.stop(), Some(0));
}

/// A 3-replica qcow2 disk with 64 KiB of 0x11 at 0 in every replica.
fn disk_with_data() -> Disk {
    let disk = Disk::new(&[Format::Qcow2; 3], 64 * MIB, &Options::default());
    for i in 0..3 {
        let out = run_timeout(
            Command::new(require("qemu-io"))
                .args(["-f", "qcow2", "-c", "write -P 0x11 0 64k"])
                .arg(disk.path(i)),
            TIMEOUT,
        );
        assert!(out.ok(), "{out}");
    }
    disk
}

/// Serve `disk`, write 0x22 at 0 and 1 MiB, read back both and the old
/// data in between: the majority must carry every command.
fn majority_carries_on(disk: &Disk) -> (support::Output, String) {
    let d = Daemon::start(disk, &[]);
    let out = qemu_io(
        &d.uri,
        &[
            "read -P 0x11 4k 60k",
            "write -P 0x22 0 4k",
            "write -P 0x22 1M 64k",
            "read -P 0x22 0 4k",
            "read -P 0x11 4k 60k",
            "read -P 0x22 1M 64k",
        ],
    );
    let log = d.log_text();
    assert_eq!(d.stop(), Some(0), "{log}");
    (out, log)
}

#[test]
fn one_replica_with_its_refcount_table_beyond_eof_does_not_take_the_disk_down() {
    let disk = disk_with_data();
    poke(disk.path(1), 48, &0x4000_0000u64.to_be_bytes());
    let header = std::fs::read(disk.path(1)).unwrap();

    let (out, log) = majority_carries_on(&disk);

    assert!(out.ok() && !out.text().contains("failed"), "{out}\n{log}");
    assert!(log.contains("beyond the end of the file"), "{log}");
    assert_eq!(std::fs::read(disk.path(1)).unwrap(), header);
}

#[test]
fn one_replica_whose_l2_entry_points_at_its_l2_table_does_not_take_the_disk_down() {
    let disk = disk_with_data();
    poke(
        disk.path(1),
        0x40000,
        &0x8000_0000_0004_0000u64.to_be_bytes(),
    );
    let l2 = std::fs::read(disk.path(1)).unwrap()[0x40000..0x50000].to_vec();

    let (out, log) = majority_carries_on(&disk);

    assert!(out.ok() && !out.text().contains("failed"), "{out}\n{log}");
    assert!(log.contains("overlaps the active L2 table"), "{log}");
    assert_eq!(
        std::fs::read(disk.path(1)).unwrap()[0x40000..0x50000],
        l2[..]
    );
    // Still opens, so `qemu-img check -r all` can repair it.
    let check = run_timeout(
        Command::new(require("qemu-img"))
            .args(["check", "-r", "all"])
            .arg(disk.path(1)),
        TIMEOUT,
    );
    assert!(check.ok(), "{check}");
}
