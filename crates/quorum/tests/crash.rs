//! Crash consistency with `kill -9`. Two writers run at once: a libnbd
//! client (tests/support/crash_io.py, python3-libnbd) writes
//! self-describing 4 KiB blocks at queue depth 32 over the first half of
//! the disk and logs every acknowledged write, and fio writes 4 KiB random
//! blocks with `verify=crc32c` patterns at queue depth 32 over the second
//! half. The daemon is killed with SIGKILL mid-stream, restarted on the
//! same record, and the whole disk is read back: no read may fail, every
//! acknowledged write of the first half must be there (or a later one), no
//! block may be torn. Repeated, then the replica files must be identical.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Daemon, Disk, Format, Options, run};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
/// Blocks of the first half, the checked writer's.
const BLOCKS: u64 = SIZE / 4096 / 2;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/crash_io.py")
}

fn python() -> PathBuf {
    // python3-libnbd is a module of Debian's python3 only.
    let py = support::require("/usr/bin/python3");
    let probe = run(Command::new(&py).args(["-c", "import nbd"]));
    assert!(probe.ok(), "python3-libnbd is required: {probe}");
    py
}

/// Lines in the log, and the next sequence number to use.
fn log_state(log: &Path) -> (usize, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let next = text
        .lines()
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .max()
        .map_or(0, |s| s + 1);
    (text.lines().count(), next)
}

fn start_writer(py: &Path, uri: &str, log: &Path, seq: u64, seed: u64) -> Child {
    Command::new(py)
        .arg(script())
        .args(["write", uri])
        .arg(log)
        .args([
            seq.to_string(),
            "0".into(),
            BLOCKS.to_string(),
            seed.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the writer")
}

/// fio: 4 KiB random writes with crc32c verify headers over the second
/// half, at queue depth 32, until the daemon dies.
fn start_fio(uri: &str, dir: &Path) -> Child {
    Command::new(support::require("fio"))
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--offset={}", SIZE / 2),
            &format!("--size={}", SIZE / 2),
            "--time_based",
            "--runtime=120",
            "--verify=crc32c",
            "--do_verify=0",
            // Nothing to replay after the kill: no verify state file.
            "--verify_state_save=0",
        ])
        .arg(format!("--directory={}", dir.display()))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fio")
}

/// Wait (bounded) until `log` has `lines` more lines than `from`.
fn wait_for_progress(log: &Path, from: usize, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while log_state(log).0 < from + lines {
        assert!(
            Instant::now() < deadline,
            "the writer made no progress in 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_child(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the writer did not exit after the daemon died");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The checker's summary line, and whether it passed.
fn check(py: &Path, uri: &str, log: &Path) -> (bool, String) {
    let out = run(Command::new(py)
        .arg(script())
        .args(["check", uri])
        .arg(log)
        .args(["0", &BLOCKS.to_string()]));
    let tail: String = out.stderr.lines().take(5).collect::<Vec<_>>().join("\n");
    (out.ok(), format!("{} {tail}", out.stdout.trim()))
}

/// `kills` rounds of write / kill -9 / restart / check; returns the
/// failed checks (empty when every one passed).
fn kill_rounds(
    replicas: usize,
    threshold: usize,
    kills: u64,
    extra: &[&str],
) -> (Disk, Vec<String>) {
    let py = python();
    let opts = Options {
        threshold,
        ..Options::default()
    };
    let disk = Disk::new(&vec![Format::Raw; replicas], SIZE, &opts);
    let log = disk.file("acked.log");
    let mut failures = Vec::new();
    let mut d = Daemon::start(&disk, extra);
    for k in 0..kills {
        let (lines, seq) = log_state(&log);
        let mut fio = start_fio(&d.uri, disk.dir.path());
        let mut w = start_writer(&py, &d.uri, &log, seq, k);
        // Kill after a varying amount of progress, never by the clock.
        wait_for_progress(&log, lines, 200 + 150 * (k as usize % 5));
        d.kill9();
        wait_child(&mut w);
        wait_child(&mut fio);
        d = Daemon::start(&disk, extra);
        let (ok, summary) = check(&py, &d.uri, &log);
        if !ok {
            failures.push(format!("round {k}: {summary}"));
        }
    }
    assert_eq!(d.stop(), Some(0), "the last daemon did not stop cleanly");
    (disk, failures)
}

fn replicas_identical(disk: &Disk, n: usize) -> bool {
    let first = std::fs::read(disk.path(0)).unwrap();
    (1..n).all(|i| std::fs::read(disk.path(i)).unwrap() == first)
}

#[test]
fn two_replicas_threshold_two_survive_twenty_kills() {
    let (disk, failures) = kill_rounds(2, 2, 20, &[]);
    assert_eq!(failures, Vec::<String>::new());
    assert!(
        replicas_identical(&disk, 2),
        "replicas differ after the last check"
    );
}

#[test]
fn three_replicas_threshold_two_survive_twenty_kills() {
    let (disk, failures) = kill_rounds(3, 2, 20, &[]);
    assert_eq!(failures, Vec::<String>::new());
    assert!(
        replicas_identical(&disk, 3),
        "replicas differ after the last check"
    );
}

/// A torn write, made by hand: the daemon writes a block and is killed
/// before its next flush (the region is still dirty in the record), then
/// one replica is given another version of that block, as when a crash
/// lands between the replicas' writes. `--no-tracking` as the control.
fn torn_write_then_read(extra: &[&str]) -> (support::Output, Vec<u8>, Vec<u8>) {
    let disk = Disk::new(&[Format::Raw; 2], SIZE, &Options::default());
    let d = Daemon::start(&disk, extra);
    let w = support::qemu_io_writeback(&d.uri, &["write -P 0x11 1M 4k"]);
    assert!(w.ok(), "{w}");
    d.kill9();
    disk.poke_raw(1, MIB, &[0x22; 4096]);
    let d = Daemon::start(&disk, extra);
    let out = support::qemu_io(&d.uri, &["read 1M 4k"]);
    assert_eq!(d.stop(), Some(0));
    (
        out,
        disk.peek_raw(0, MIB, 4096),
        disk.peek_raw(1, MIB, 4096),
    )
}

#[test]
fn torn_write_between_two_replicas_is_made_equal_after_a_crash() {
    let (out, r0, r1) = torn_write_then_read(&[]);
    assert!(out.ok() && !out.text().contains("fail"), "{out}");
    assert!(r0 == r1 && (r0 == [0x11; 4096] || r0 == [0x22; 4096]));
}

#[test]
fn without_the_record_a_torn_write_leaves_the_block_unreadable() {
    let (out, r0, r1) = torn_write_then_read(&["--no-tracking"]);
    assert!(
        out.text().contains("read failed: Input/output error"),
        "{out}"
    );
    assert_ne!(r0, r1);
}
