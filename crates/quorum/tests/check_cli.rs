//! `quorum check` and `quorum create` end to end, on images made and
//! verified with qemu-img / qemu-io.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Disk, Format, Options, QUORUM, TIMEOUT, quorum, run_timeout, tool};

const MIB: u64 = 1 << 20;

/// Run `quorum check` with `extra` and assert it exits `code`; returns its output.
#[track_caller]
fn check_exits(disk: &Disk, extra: &[&str], code: i32) -> support::Output {
    check_exits_within(disk, extra, code, TIMEOUT)
}

/// As [`check_exits`], with `quorum check` bounded by `timeout`.
#[track_caller]
fn check_exits_within(
    disk: &Disk,
    extra: &[&str],
    code: i32,
    timeout: Duration,
) -> support::Output {
    let out = run_timeout(
        Command::new(QUORUM)
            .args(["check", disk.xml.to_str().unwrap()])
            .args(extra),
        timeout,
    );
    assert_eq!(out.code, Some(code), "{out}");
    out
}

/// Unallocated 4 MiB replicas of `formats`, default options.
fn disk_of(formats: &[Format]) -> Disk {
    Disk::new(formats, 4 * MIB, &Options::default())
}

/// Run `quorum create` on the disk's XML with `--size size`.
fn create(disk: &Disk, size: &str) -> support::Output {
    quorum(["create", disk.xml.to_str().unwrap(), "--size", size])
}

/// One overwrite of a replica: (replica, pattern, offset, length).
type Fill = (usize, u8, u64, u64);

/// Three raw 4 MiB replicas of 0x5a, then each of `fills` written over its replica.
fn raw_disk(fills: &[Fill]) -> Disk {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    for &(i, pattern, off, len) in fills {
        disk.fill(i, pattern, off, len);
    }
    disk
}

/// Replicas 0 and 1 differ from each other and from replica 2 at 8k..12k.
const NO_QUORUM: [Fill; 2] = [(0, 0x41, 8192, 4096), (1, 0x42, 8192, 4096)];

/// Assert `qemu-img check` finds qcow2 replica 0 consistent.
#[track_caller]
fn assert_replica_0_consistent(disk: &Disk) {
    let img = tool(
        "qemu-img",
        ["check", "-f", "qcow2", disk.path(0).to_str().unwrap()],
    );
    assert!(img.ok(), "{img}");
}

fn json_ranges(out: &support::Output) -> Vec<(u64, u64, Vec<u64>)> {
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("check --json output");
    v["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            (
                r["offset"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["bad_replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn clean_replicas_exit_0_and_say_all_agree() {
    let disk = raw_disk(&[]);

    let out = check_exits(&disk, &[], 0);

    assert!(out.stdout.contains("all replicas agree"), "{out}");
}

#[test]
fn one_corrupt_replica_exits_4() {
    let disk = raw_disk(&[(1, 0x42, 65536, 4096)]);

    check_exits(&disk, &[], 4);
}

#[test]
fn json_report_names_the_divergent_range_and_replica() {
    let disk = raw_disk(&[(1, 0x42, 65536, 4096), (2, 0x43, 3 * MIB, 8192)]);

    let out = check_exits(&disk, &["--json"], 4);

    assert_eq!(
        json_ranges(&out),
        vec![(65536, 4096, vec![1]), (3 * MIB, 8192, vec![2])]
    );
}

#[test]
fn check_without_repair_leaves_the_corrupt_replica_alone() {
    let disk = raw_disk(&[(1, 0x42, 65536, 4096)]);

    check_exits(&disk, &[], 4);

    assert!(disk.replica_has(1, 0x42, 65536, 4096).ok());
}

#[test]
fn repair_exits_0_and_rewrites_the_raw_replica() {
    let disk = raw_disk(&[(1, 0x42, 65536, 4096)]);

    check_exits(&disk, &["--repair"], 0);

    assert_eq!(
        disk.peek_raw(1, 0, (4 * MIB) as usize),
        vec![0x5a; (4 * MIB) as usize]
    );
}

#[test]
fn check_after_repair_finds_agreement() {
    let disk = raw_disk(&[(0, 0x42, 0, 12345)]);
    check_exits(&disk, &["--repair"], 0);

    let out = check_exits(&disk, &["--json"], 0);

    assert_eq!(json_ranges(&out), vec![]);
}

#[test]
fn repair_on_qcow2_leaves_a_consistent_image_with_the_majority_data() {
    let disk = disk_of(&[Format::Qcow2, Format::Qcow2, Format::Raw]);
    for i in 0..3 {
        disk.fill(i, 0x5a, 0, 2 * MIB);
    }
    disk.fill(0, 0x42, MIB, 65536);

    check_exits(&disk, &["--repair"], 0);

    assert_replica_0_consistent(&disk);
    let data = disk.replica_has(0, 0x5a, 0, 2 * MIB);
    assert!(
        data.ok() && data.stdout.contains("read 2097152/2097152"),
        "{data}"
    );
}

#[test]
fn repair_fills_a_range_only_one_qcow2_replica_lacks() {
    // Replica 0 never got the write: unallocated there, data on the others.
    let disk = disk_of(&[Format::Qcow2; 3]);
    disk.fill(1, 0x77, 2 * MIB, 65536);
    disk.fill(2, 0x77, 2 * MIB, 65536);

    check_exits(&disk, &["--repair"], 0);

    assert_replica_0_consistent(&disk);
    assert!(disk.replica_has(0, 0x77, 2 * MIB, 65536).ok());
}

#[test]
fn no_quorum_spot_exits_8_and_is_not_rewritten() {
    let disk = raw_disk(&NO_QUORUM);

    check_exits(&disk, &["--repair"], 8);

    assert_eq!(
        (
            disk.peek_raw(0, 8192, 4096),
            disk.peek_raw(1, 8192, 4096),
            disk.peek_raw(2, 8192, 4096)
        ),
        (vec![0x41; 4096], vec![0x42; 4096], vec![0x5a; 4096])
    );
}

#[test]
fn no_quorum_spot_is_reported_with_quorum_false_in_json() {
    let disk = raw_disk(&NO_QUORUM);

    let out = check_exits(&disk, &["--json"], 8);

    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(
        (&v["ranges"][0]["offset"], &v["ranges"][0]["quorum"]),
        (&serde_json::json!(8192), &serde_json::json!(false))
    );
}

#[test]
fn sparse_100g_qcow2_disk_checks_clean_within_the_timeout() {
    let disk = Disk::new(&[Format::Qcow2; 3], MIB, &Options::default());
    for r in &disk.replicas {
        std::fs::remove_file(&r.path).expect("remove image");
    }
    let created = create(&disk, "100G");
    assert!(created.ok(), "{created}");

    // The bound is the command's own timeout, generous for a 2-core CI box.
    let out = check_exits_within(&disk, &[], 0, Duration::from_secs(60));

    assert!(out.stdout.contains("all replicas agree"), "{out}");
}

#[test]
fn create_makes_missing_images_and_leaves_existing_ones_alone() {
    let disk = disk_of(&[Format::Qcow2, Format::Raw, Format::Qcow2]);
    disk.fill(0, 0x5a, 0, 65536);
    std::fs::remove_file(disk.path(1)).expect("remove");
    std::fs::remove_file(disk.path(2)).expect("remove");

    let out = create(&disk, "4M");

    assert!(out.ok(), "{out}");
    assert!(
        disk.replica_has(0, 0x5a, 0, 65536).ok(),
        "existing image changed"
    );
    let info = tool(
        "qemu-img",
        ["info", "--output=json", disk.path(2).to_str().unwrap()],
    );
    let info: serde_json::Value = serde_json::from_str(&info.stdout).expect("json");
    assert_eq!(
        (
            std::fs::metadata(disk.path(1)).expect("raw made").len(),
            info["format"].as_str(),
            info["virtual-size"].as_u64()
        ),
        (4 * MIB, Some("qcow2"), Some(4 * MIB))
    );
}

#[test]
fn create_refuses_when_existing_replicas_disagree_on_size() {
    let disk = disk_of(&[Format::Raw; 3]);
    let grown = tool(
        "qemu-img",
        ["resize", "-f", "raw", disk.path(2).to_str().unwrap(), "8M"],
    );
    assert!(grown.ok(), "{grown}");
    std::fs::remove_file(disk.path(1)).expect("remove");

    let out = create(&disk, "4M");

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("disagree on size"), "{out}");
    assert!(
        !disk.path(1).exists(),
        "created an image despite the size conflict"
    );
}
