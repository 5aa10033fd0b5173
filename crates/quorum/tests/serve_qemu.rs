//! `quorum serve` driven by QEMU's own tools over `nbd+unix://`: qemu-io
//! reads and writes, replicas corrupted underneath the daemon, and
//! qemu-img info / convert / compare / map.

mod support;

use support::{
    Daemon, Disk, Format, Options, Output, qemu_io, qemu_io_read_only, qemu_io_writeback,
    result_lines, tool,
};

const MIB: u64 = 1 << 20;

fn read_ok_line(len: u64, off: u64) -> String {
    format!("read {len}/{len} bytes at offset {off}")
}

#[test]
fn pattern_written_through_export_reads_back() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);

    let out = qemu_io(&d.uri, &["write -P 0x32 0 4M", "read -P 0x32 0 4M"]);

    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains(&read_ok_line(4 * MIB, 0)), "{out}");
}

#[test]
fn write_through_export_reaches_every_replica_file() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);

    let out = qemu_io(&d.uri, &["write -P 0x44 1M 64k"]);
    assert!(out.ok(), "{out}");
    assert_eq!(d.stop(), Some(0));

    for i in 0..3 {
        assert_eq!(
            disk.peek_raw(i, MIB, 65536),
            vec![0x44; 65536],
            "replica {i}"
        );
    }
}

/// Serve `disk` with `flags`, overwrite replica files underneath the
/// running daemon (`(replica, offset, bytes)`), run one qemu-io command
/// through the export, then stop the daemon, which must exit 0.
fn run_under_corruption(
    disk: &Disk,
    flags: &[&str],
    pokes: &[(usize, u64, &[u8])],
    cmd: &str,
) -> Output {
    let d = Daemon::start(disk, flags);
    for &(i, off, bytes) in pokes {
        disk.poke_raw(i, off, bytes);
    }
    let out = qemu_io(&d.uri, &[cmd]);
    assert_eq!(d.stop(), Some(0), "daemon exit after {cmd}");
    out
}

/// Three raw replicas of 0x5a.
fn disk_of_0x5a() -> Disk {
    Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default())
}

#[test]
fn read_succeeds_when_one_replica_file_is_corrupted_underneath() {
    let disk = disk_of_0x5a();

    let out = run_under_corruption(&disk, &[], &[(1, 0, &[0x42; 65536])], "read -P 0x5a 0 4M");

    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains(&read_ok_line(4 * MIB, 0)), "{out}");
}

/// Corrupt replica 0, the first a zero-copy reply could come from, under a
/// daemon started with `--sendfile WHEN`, and read the whole disk back.
fn assert_first_replica_outvoted(when: &str) {
    let disk = disk_of_0x5a();
    let pokes: &[(usize, u64, &[u8])] = &[(0, 0, &[0x42; 65536])];

    let out = run_under_corruption(&disk, &["--sendfile", when], pokes, "read -P 0x5a 0 4M");

    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains(&read_ok_line(4 * MIB, 0)), "{out}");
}

#[test]
fn sendfile_reply_never_comes_from_a_voted_out_first_replica() {
    assert_first_replica_outvoted("always");
}

#[test]
fn sendfile_reply_shows_the_latest_write() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    let d = Daemon::start(&disk, &["--sendfile", "always"]);

    let out = qemu_io(&d.uri, &["write -P 0x44 64k 1M", "read -P 0x44 64k 1M"]);

    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains(&read_ok_line(MIB, 65536)), "{out}");
}

#[test]
fn copied_replies_outvote_a_corrupt_replica_too() {
    assert_first_replica_outvoted("never");
}

#[test]
fn read_fails_with_eio_when_two_replicas_are_corrupted_differently() {
    let disk = disk_of_0x5a();
    let pokes: &[(usize, u64, &[u8])] = &[(0, 0, &[0x41; 65536]), (1, 0, &[0x42; 65536])];

    let out = run_under_corruption(&disk, &[], pokes, "read -P 0x5a 0 64k");

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.text().contains("read failed: Input/output error"),
        "{out}"
    );
}

/// Corrupt 4 KiB of replica 2 at 8 KiB under the daemon, read the first
/// 64 KiB through the export (the vote must hide it), and return what
/// replica 2 then holds there.
fn replica_2_after_outvoted_read(disk: &Disk) -> Vec<u8> {
    let pokes: &[(usize, u64, &[u8])] = &[(2, 8192, &[0x42; 4096])];
    let out = run_under_corruption(disk, &[], pokes, "read -P 0x5a 0 64k");
    assert!(out.ok(), "{out}");
    disk.peek_raw(2, 0, 65536)
}

#[test]
fn corrupted_replica_is_left_alone_without_rewrite_corrupted() {
    let r2 = replica_2_after_outvoted_read(&disk_of_0x5a());

    assert_eq!(r2[8192..12288], [0x42; 4096]);
}

/// Three raw replicas of 0x5a with rewrite_corrupted on.
fn rewriting_disk() -> Disk {
    let opts = Options {
        rewrite_corrupted: true,
        ..Options::default()
    };
    Disk::raw_filled(3, 4 * MIB, 0x5a, &opts)
}

#[test]
fn rewrite_corrupted_repairs_the_replica_file_on_disk() {
    let r2 = replica_2_after_outvoted_read(&rewriting_disk());

    assert_eq!(r2, vec![0x5a; 65536]);
}

#[test]
fn scattered_corruption_reads_through_export_but_fails_in_qemu_quorum() {
    // Replica 0 bad at 0..4k, replica 1 bad at 512k..516k: QEMU's
    // whole-request vote sees three versions; ours votes per block.
    let opts = Options::default();
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &opts);
    disk.fill(0, 0x01, 0, 4096);
    disk.fill(1, 0x02, 512 * 1024, 4096);
    // QEMU first: our first start compares the replicas and repairs
    // minority copies (a full resync without a record).
    let qemu = qemu_io(&disk.qemu_quorum_json(&opts), &["read -P 0x5a 0 1M"]);
    let d = Daemon::start(&disk, &[]);
    let ours = qemu_io(&d.uri, &["read -P 0x5a 0 1M"]);
    assert_eq!(d.stop(), Some(0));

    assert_eq!(
        (ours.code, result_lines(&ours)),
        (Some(0), vec![read_ok_line(MIB, 0)]),
        "ours: {ours}"
    );
    assert_eq!(
        (qemu.code, result_lines(&qemu)),
        (Some(1), vec!["read failed: Input/output error".to_owned()]),
        "qemu: {qemu}"
    );
}

#[test]
fn daemon_exits_zero_on_sigterm_and_removes_socket_and_pid_file() {
    let disk = Disk::new(&[Format::Raw; 3], MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);
    let (socket, pid_file) = (d.socket.clone(), d.pid_file.clone());
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("pid file").trim(),
        d.pid().to_string()
    );

    let code = d.stop();

    assert_eq!(code, Some(0));
    assert!(!socket.exists() && !pid_file.exists());
}

#[test]
fn qemu_img_info_reports_the_virtual_size() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Qcow2, Format::Raw],
        8 * MIB,
        &Options::default(),
    );
    let d = Daemon::start(&disk, &[]);

    let out = tool("qemu-img", ["info", "--output=json", &d.uri]);

    assert!(out.ok(), "{out}");
    let info: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(info["virtual-size"], 8 * MIB);
}

#[test]
fn qemu_img_convert_export_to_file_matches_the_replicas() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    for i in 0..3 {
        disk.fill(i, 0x77, MIB, 12345);
    }
    let d = Daemon::start(&disk, &[]);
    let dest = disk.file("out.raw");

    let conv = tool(
        "qemu-img",
        [
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &d.uri,
            dest.to_str().unwrap(),
        ],
    );
    assert!(conv.ok(), "{conv}");

    assert_identical(dest.to_str().unwrap(), disk.path(0).to_str().unwrap());
}

/// `qemu-img compare` of two raw images (files or NBD URIs) finds them identical.
fn assert_identical(a: &str, b: &str) {
    let cmp = tool("qemu-img", ["compare", "-f", "raw", "-F", "raw", a, b]);
    assert!(cmp.ok(), "{cmp}");
    assert!(cmp.stdout.contains("Images are identical"), "{cmp}");
}

#[test]
fn qemu_img_convert_file_to_export_then_compare_is_identical() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Raw, Format::Raw],
        4 * MIB,
        &Options::default(),
    );
    let src = disk.file("src.raw");
    support::write_seeded_file(&src, (4 * MIB) as usize, 7);
    let d = Daemon::start(&disk, &[]);

    let conv = tool(
        "qemu-img",
        [
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &d.uri,
        ],
    );
    assert!(conv.ok(), "{conv}");

    assert_identical(src.to_str().unwrap(), &d.uri);
}

#[test]
fn qemu_img_map_shows_zero_where_all_replicas_are_unallocated_and_data_where_written() {
    let disk = Disk::new(&[Format::Qcow2; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);
    let w = qemu_io(&d.uri, &["write -P 0x33 1M 64k"]);
    assert!(w.ok(), "{w}");

    let out = tool("qemu-img", ["map", "--output=json", "-f", "raw", &d.uri]);

    assert!(out.ok(), "{out}");
    let map: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).expect("json");
    let extents: Vec<(u64, u64, bool, bool)> = map
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![
            (0, MIB, false, true),
            (MIB, 65536, true, false),
            (MIB + 65536, 3 * MIB - 65536, false, true),
        ]
    );
}

#[test]
fn overlapping_pipelined_writes_leave_every_replica_identical() {
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let d = Daemon::start(&disk, &[]);
    let mut cmds: Vec<String> = (0..32u32)
        .map(|k| format!("aio_write -P {} {} 64k", k + 1, (k % 4) * 16384))
        .collect();
    cmds.push("aio_flush".to_owned());
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();

    let out = qemu_io(&d.uri, &cmd_refs);
    assert!(out.ok(), "{out}");
    assert_eq!(d.stop(), Some(0));

    let r0 = disk.peek_raw(0, 0, 131072);
    assert!(
        r0 == disk.peek_raw(1, 0, 131072) && r0 == disk.peek_raw(2, 0, 131072),
        "replicas diverged after overlapping writes"
    );
}

/// On one CPU, large writes reach the replicas in pieces as their payload
/// arrives; pipelined, overlapping and unaligned, they must still land
/// whole and in order on every replica.
#[test]
fn streamed_large_writes_land_whole_and_in_order_on_every_replica() {
    let disk = Disk::new(&[Format::Raw; 3], 8 * MIB, &Options::default());
    let d = Daemon::start_on_one_cpu(&disk, &[]);
    let writes: [(u8, u64, u64); 3] = [
        (0x61, 0, 4 * MIB),
        (0x62, 4608, MIB),
        (0x63, 5 * MIB + 512, 2 * MIB),
    ];
    let mut cmds: Vec<String> = writes
        .iter()
        .map(|(p, off, len)| format!("aio_write -P {p} {off} {len}"))
        .collect();
    cmds.push("aio_flush".to_owned());
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();

    let out = qemu_io_writeback(&d.uri, &cmd_refs);
    assert!(out.ok(), "{out}");
    assert_eq!(d.stop(), Some(0));

    let mut want = vec![0u8; (8 * MIB) as usize];
    for (p, off, len) in writes {
        want[off as usize..(off + len) as usize].fill(p);
    }
    for i in 0..3 {
        assert!(
            disk.peek_raw(i, 0, want.len()) == want,
            "replica {i} differs"
        );
    }
}

#[test]
fn sub_sector_corruption_is_outvoted_and_rewritten_in_place() {
    let disk = rewriting_disk();

    let out = run_under_corruption(
        &disk,
        &[],
        &[(1, 1024, &[0x11; 16])],
        "read -P 0x5a 1000 100",
    );

    assert_eq!(result_lines(&out), [read_ok_line(100, 1000)], "{out}");

    assert_eq!(disk.peek_raw(1, 1024, 16), vec![0x5a; 16]);
}

#[test]
fn rewrite_corrupted_repairs_only_within_the_request() {
    let disk = rewriting_disk();

    let out = run_under_corruption(&disk, &[], &[(0, 0, &[0x11; 8192])], "read -P 0x5a 0 4k");

    assert!(out.ok(), "{out}");

    assert_eq!(
        (disk.peek_raw(0, 0, 4096), disk.peek_raw(0, 4096, 4096)),
        (vec![0x5a; 4096], vec![0x11; 4096])
    );
}

#[test]
fn rewrite_corrupted_rewrites_nothing_without_quorum() {
    let disk = rewriting_disk();
    let pokes: &[(usize, u64, &[u8])] = &[(0, 0, &[0x11; 4096]), (1, 0, &[0x22; 4096])];

    let out = run_under_corruption(&disk, &[], pokes, "read 0 4k");

    assert_eq!(out.code, Some(1), "{out}");

    assert_eq!(
        (disk.peek_raw(0, 0, 4096), disk.peek_raw(1, 0, 4096)),
        (vec![0x11; 4096], vec![0x22; 4096])
    );
}

#[test]
fn qemu_io_cannot_open_a_served_replica_for_writing() {
    let disk = Disk::raw_filled(3, MIB, 0x5a, &Options::default());
    let _d = Daemon::start(&disk, &[]);

    let out = tool(
        "qemu-io",
        [
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 4k",
            disk.path(1).to_str().unwrap(),
        ],
    );

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.text().contains("Failed to get \"write\" lock"), "{out}");
}

#[test]
fn two_read_only_daemons_share_the_replicas() {
    let disk = Disk::raw_filled(3, MIB, 0x5a, &Options::default());
    let second_dir = disk.file("second");
    std::fs::create_dir(&second_dir).expect("dir");
    let a = Daemon::start(&disk, &["--read-only"]);
    let b = Daemon::start_at(&disk.xml, &second_dir, &["--read-only"]);

    let ra = qemu_io_read_only(&a.uri, &["read -P 0x5a 0 1M"]);
    let rb = qemu_io_read_only(&b.uri, &["read -P 0x5a 0 1M"]);

    assert_eq!(
        (result_lines(&ra), result_lines(&rb)),
        (vec![read_ok_line(MIB, 0)], vec![read_ok_line(MIB, 0)])
    );
}

#[test]
fn voted_out_read_is_logged_as_one_structured_report_bad_line() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    let d = Daemon::start(&disk, &[]);
    disk.poke_raw(1, 0, &[0x11; 65536]);

    let out = qemu_io(&d.uri, &["read -P 0x5a 0 64k"]);

    assert!(out.ok(), "{out}");
    let log = d.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("QUORUM_REPORT_BAD"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    for field in [
        "type=\"read\"",
        "node_name=replica-1",
        "sector_num=0",
        "sectors_count=128",
    ] {
        assert!(lines[0].contains(field), "{field} missing in {}", lines[0]);
    }
}

#[test]
fn read_without_quorum_is_logged_as_quorum_failure() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    let d = Daemon::start(&disk, &[]);
    disk.poke_raw(0, 0, &[0x41; 4096]);
    disk.poke_raw(1, 0, &[0x42; 4096]);

    let out = qemu_io(&d.uri, &["read 0 4k"]);

    assert_eq!(out.code, Some(1), "{out}");
    let log = d.log_text();
    let failure = log
        .lines()
        .find(|l| l.contains("QUORUM_FAILURE"))
        .unwrap_or_default();
    assert!(
        failure.contains("reference=vda") && failure.contains("sectors_count=8"),
        "{log}"
    );
}
