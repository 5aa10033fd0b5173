//! Differential tests: QEMU's quorum driver is the oracle. Each scenario
//! builds the same images twice, runs the same qemu-io commands (a) on
//! QEMU's quorum (`json:` from `quorum qemu-args --json`, no daemon running)
//! and (b) on our export, and asserts the same success/failure and bytes.
//! Only whole-request cases, where the two semantics agree, are compared.
//! Also a replay of QEMU iotest 081 against the export.

mod support;

use support::{Daemon, Disk, Format, Options, Output, qemu_io, quorum, result_lines, tool};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 2 * MIB;

/// QEMU's quorum for this disk's XML, built by `quorum qemu-args --json`.
fn qemu_target(disk: &Disk) -> String {
    let out = quorum(["qemu-args", "--json", disk.xml.to_str().unwrap()]);
    assert!(out.ok(), "qemu-args: {out}");
    format!("json:{}", out.stdout.trim())
}

/// Same commands on QEMU's quorum and on our export, each on a fresh build.
fn both(build: impl Fn() -> Disk, cmds: &[&str]) -> (Output, Output, Disk, Disk) {
    let qemu_disk = build();
    let qemu = qemu_io(&qemu_target(&qemu_disk), cmds);
    let our_disk = build();
    // QEMU's driver keeps no record. Ours, on a first start, compares the
    // replicas and rewrites minority copies (a full resync), which would
    // repair the corruption these scenarios compare on.
    let d = Daemon::start(&our_disk, &["--no-tracking"]);
    let ours = qemu_io(&d.uri, cmds);
    assert_eq!(d.stop(), Some(0), "daemon did not stop cleanly");
    (qemu, ours, qemu_disk, our_disk)
}

/// Assert both sides gave the same exit status and result lines.
fn assert_same(qemu: &Output, ours: &Output) {
    assert_eq!(
        (qemu.code, result_lines(qemu)),
        (ours.code, result_lines(ours)),
        "\nqemu: {qemu}\nours: {ours}"
    );
}

/// The whole virtual disk as bytes, via `qemu-img convert`.
fn dump(disk: &Disk, source: &str, name: &str) -> Vec<u8> {
    let dest = disk.file(name);
    let mut args = vec!["convert".to_owned()];
    if !source.starts_with("json:") {
        args.extend(["-f".to_owned(), "raw".to_owned()]);
    }
    args.extend([
        "-O".to_owned(),
        "raw".to_owned(),
        source.to_owned(),
        dest.to_str().unwrap().to_owned(),
    ]);
    let out = tool("qemu-img", args);
    assert!(out.ok(), "qemu-img convert {source}: {out}");
    std::fs::read(dest).expect("dump")
}

/// Dump the disk through QEMU's quorum, then through our export.
fn dump_both(build: impl Fn() -> Disk) -> (Output, Vec<u8>, Vec<u8>) {
    let qemu_disk = build();
    let qemu_bytes = dump(&qemu_disk, &qemu_target(&qemu_disk), "qemu.dump");
    let our_disk = build();
    // QEMU's driver keeps no record. Ours, on a first start, compares the
    // replicas and rewrites minority copies (a full resync), which would
    // repair the corruption these scenarios compare on.
    let d = Daemon::start(&our_disk, &["--no-tracking"]);
    let our_bytes = dump(&our_disk, &d.uri, "ours.dump");
    let log = Output {
        code: d.stop(),
        stdout: String::new(),
        stderr: String::new(),
    };
    (log, qemu_bytes, our_bytes)
}

fn filled(opts: Options) -> impl Fn() -> Disk {
    move || Disk::raw_filled(3, SIZE, 0x5a, &opts)
}

/// One overwrite of a replica: (replica, pattern, offset, length).
type Fill = (usize, u8, u64, u64);

/// As [`filled`], then each of `fills` written over its replica, in order.
fn corrupted(opts: Options, fills: &[Fill]) -> impl Fn() -> Disk {
    move || {
        let d = filled(opts.clone())();
        for &(i, pattern, off, len) in fills {
            d.fill(i, pattern, off, len);
        }
        d
    }
}

fn t(threshold: usize) -> Options {
    Options {
        threshold,
        ..Options::default()
    }
}

/// Assert both sides give the same results for `cmds` and ours succeeds.
#[track_caller]
fn assert_both_succeed(build: impl Fn() -> Disk, cmds: &[&str]) {
    let (qemu, ours, _, _) = both(build, cmds);

    assert_same(&qemu, &ours);
    assert_eq!(ours.code, Some(0), "{ours}");
}

/// Assert both sides give the same results for `cmds` and ours fails with EIO.
#[track_caller]
fn assert_both_fail_with_eio(build: impl Fn() -> Disk, cmds: &[&str]) {
    let (qemu, ours, _, _) = both(build, cmds);

    assert_same_eio(&qemu, &ours);
}

/// Assert both sides gave the same results and ours failed a read with EIO.
#[track_caller]
fn assert_same_eio(qemu: &Output, ours: &Output) {
    assert_same(qemu, ours);
    assert!(
        ours.text().contains("read failed: Input/output error"),
        "{ours}"
    );
}

#[test]
fn all_replicas_agree_both_read_the_pattern() {
    assert_both_succeed(filled(t(2)), &["read -P 0x5a 0 1M"]);
}

#[test]
fn one_corrupt_of_three_at_threshold_2_both_read_the_majority() {
    let build = corrupted(t(2), &[(1, 0x42, 0, 64 * 1024)]);

    assert_both_succeed(build, &["read -P 0x5a 0 1M"]);
}

#[test]
fn two_corrupt_differently_at_threshold_2_both_fail_with_eio() {
    let build = corrupted(t(2), &[(0, 0x41, 0, 64 * 1024), (1, 0x42, 0, 64 * 1024)]);

    assert_both_fail_with_eio(build, &["read -P 0x5a 0 64k"]);
}

#[test]
fn one_corrupt_at_threshold_3_both_fail_with_eio() {
    let build = corrupted(t(3), &[(2, 0x11, 0, 64 * 1024)]);

    assert_both_fail_with_eio(build, &["read -P 0x5a 0 1M"]);
}

#[test]
fn threshold_3_region_where_all_agree_both_succeed() {
    let build = corrupted(t(3), &[(2, 0x11, 0, 64 * 1024)]);

    assert_both_succeed(build, &["read -P 0x5a 64k 960k"]);
}

/// Each replica holds its own pattern at 1M..1M+4k.
const TIE: [Fill; 3] = [
    (0, 0xaa, MIB, 4096),
    (1, 0xbb, MIB, 4096),
    (2, 0xcc, MIB, 4096),
];

/// Reads of each replica's own pattern in the tie.
const TIE_READS: [&str; 3] = [
    "read -P 0xaa 1M 4k",
    "read -P 0xbb 1M 4k",
    "read -P 0xcc 1M 4k",
];

fn three_way_tie() -> Disk {
    corrupted(t(1), &TIE)()
}

#[test]
fn three_way_tie_at_threshold_1_both_return_the_same_lines() {
    let (qemu, ours, _, _) = both(three_way_tie, &TIE_READS);

    assert_same(&qemu, &ours);
}

#[test]
fn three_way_tie_at_threshold_1_both_return_the_highest_replica() {
    let (_, qemu_bytes, our_bytes) = dump_both(three_way_tie);

    assert!(qemu_bytes == our_bytes, "dumps differ");
    assert_eq!(
        &our_bytes[MIB as usize..MIB as usize + 4096],
        &[0xcc; 4096][..]
    );
}

#[test]
fn two_against_one_at_threshold_1_both_return_the_majority() {
    let build = corrupted(t(1), &[TIE[0], TIE[1], TIE[2], (2, 0xbb, MIB, 4096)]);

    assert_both_succeed(build, &["read -P 0xbb 1M 4k"]);
}

#[test]
fn fifo_with_replica_0_corrupt_both_return_replica_0_data() {
    let opts = Options {
        read_pattern: "fifo",
        ..t(2)
    };
    let build = corrupted(opts, &[(0, 0x11, 0, 64 * 1024)]);

    assert_both_succeed(build, &["read -P 0x11 0 64k", "read -P 0x5a 64k 64k"]);
}

#[test]
fn writes_land_identically_on_every_replica_file() {
    let build = || Disk::new(&[Format::Raw; 3], SIZE, &t(2));

    let (qemu, ours, qemu_disk, our_disk) = both(
        build,
        &[
            "write -P 0x77 0 64k",
            "write -P 0x78 100000 3000",
            "write -z 1M 64k",
        ],
    );

    assert_same(&qemu, &ours);
    for i in 0..3 {
        assert!(
            qemu_disk.peek_raw(i, 0, SIZE as usize) == our_disk.peek_raw(i, 0, SIZE as usize),
            "replica {i} differs between QEMU's quorum and ours"
        );
    }
}

fn qcow2_with_backing() -> Disk {
    let opts = t(2);
    let mut d = Disk::new(&[Format::Qcow2, Format::Qcow2, Format::Qcow2], SIZE, &opts);
    d.add_raw_backing(2, 0x5a, &opts);
    d.fill(0, 0x5a, 0, SIZE);
    d.fill(1, 0x5a, 0, SIZE);
    d.fill(1, 0x11, 0, 64 * 1024);
    // Replica 2 reads 0x5a from its backing file, except one cluster of its own.
    d.fill(2, 0x5a, MIB, 4096);
    d
}

#[test]
fn qcow2_replicas_with_a_raw_backing_chain_both_read_the_same_bytes() {
    let (log, qemu_bytes, our_bytes) = dump_both(qcow2_with_backing);

    assert_eq!(log.code, Some(0));
    assert!(qemu_bytes == our_bytes, "dumps differ");
}

#[test]
fn qcow2_replicas_with_a_raw_backing_chain_both_read_the_pattern() {
    assert_both_succeed(qcow2_with_backing, &["read -P 0x5a 0 1M"]);
}

#[test]
fn whole_request_vote_flag_fails_scattered_corruption_like_qemu() {
    let build = corrupted(t(2), &[(0, 0x01, 0, 4096), (1, 0x02, 512 * 1024, 4096)]);
    let qemu_disk = build();
    let qemu = qemu_io(&qemu_target(&qemu_disk), &["read -P 0x5a 0 1M"]);
    let our_disk = build();
    let d = Daemon::start(&our_disk, &["--whole-request-vote", "--no-tracking"]);

    let ours = qemu_io(&d.uri, &["read -P 0x5a 0 1M"]);

    assert_same_eio(&qemu, &ours);
}

// ---- iotest 081, replayed against our engine through the export ----

const SIZE_081: u64 = 10 * MIB;

fn opts_081(rewrite: bool) -> Options {
    Options {
        rewrite_corrupted: rewrite,
        ..t(2)
    }
}

/// Read 0x32 over the whole 10M disk.
const READ_081: &[&str] = &["read -P 0x32 0 10M"];

/// Start a daemon on `disk` and run `cmds` through its export; the daemon keeps running.
fn serve_and_run(disk: &Disk, cmds: &[&str]) -> (Output, Daemon) {
    let d = Daemon::start(disk, &[]);
    let out = qemu_io(&d.uri, cmds);
    (out, d)
}

/// Assert qemu-io's only result line reports a whole read of `len` bytes at 0.
#[track_caller]
fn assert_read_whole(out: &Output, len: u64) {
    assert_eq!(
        result_lines(out),
        [format!("read {len}/{len} bytes at offset 0")],
        "{out}"
    );
}

/// Assert a fresh daemon on `disk` reads 0x32 over 10M and then stops cleanly.
#[track_caller]
fn assert_serves_0x32(disk: &Disk) {
    let (r, d) = serve_and_run(disk, READ_081);
    assert_read_whole(&r, SIZE_081);
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn iotest_081_replay_through_the_export() {
    let disk = Disk::new(&[Format::Raw; 3], SIZE_081, &opts_081(false));

    // Write through quorum, every child holds it.
    let (w, d) = serve_and_run(&disk, &["write -P 0x32 0 10M"]);
    assert!(w.ok(), "{w}");
    assert_eq!(d.stop(), Some(0));
    for i in 0..3 {
        let r = disk.replica_has(i, 0x32, 0, SIZE_081);
        assert!(
            r.ok() && r.stdout.contains("read 10485760/10485760"),
            "child {i}: {r}"
        );
    }

    // Corrupt child 2; the read still succeeds and leaves it corrupt.
    disk.fill(1, 0x42, 0, SIZE_081);
    assert_serves_0x32(&disk);
    assert!(disk.replica_has(1, 0x42, 0, 512).ok());

    // With rewrite_corrupted the read repairs child 2.
    disk.write_xml(&opts_081(true));
    assert_serves_0x32(&disk);
    let fixed = disk.replica_has(1, 0x32, 0, SIZE_081);
    assert!(fixed.stdout.contains("read 10485760/10485760"), "{fixed}");

    // Break quorum: two children differ from each other and the third.
    disk.fill(0, 0x41, 0, SIZE_081);
    disk.fill(1, 0x42, 0, SIZE_081);
    let (r, _d) = serve_and_run(&disk, READ_081);
    assert_eq!(
        (r.code, result_lines(&r)),
        (Some(1), vec!["read failed: Input/output error".to_owned()]),
        "{r}"
    );
}

fn blkverify_disk() -> Disk {
    let opts = Options {
        blkverify: true,
        ..t(2)
    };
    Disk::raw_filled(2, SIZE_081, 0x32, &opts)
}

#[test]
fn iotest_081_blkverify_same_content_reads() {
    let disk = blkverify_disk();
    let (r, _d) = serve_and_run(&disk, READ_081);

    assert_read_whole(&r, SIZE_081);
}

#[test]
fn iotest_081_blkverify_mismatch_fails_the_request_and_the_daemon_keeps_serving() {
    // QEMU exits the process here; ours fails the request with EIO.
    let disk = blkverify_disk();
    disk.fill(1, 0x42, MIB, 4096);
    let d = Daemon::start(&disk, &[]);

    let bad = qemu_io(&d.uri, READ_081);
    let good = qemu_io(&d.uri, &["read -P 0x32 0 1M"]);

    assert!(
        bad.text().contains("read failed: Input/output error"),
        "{bad}"
    );
    assert_read_whole(&good, MIB);
}
