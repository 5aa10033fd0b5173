//! `quorum check` and `quorum create` end to end, on images made and
//! verified with qemu-img / qemu-io.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Disk, Format, Options, QUORUM, quorum, run_timeout, tool};

const MIB: u64 = 1 << 20;

fn check(disk: &Disk, extra: &[&str]) -> support::Output {
    let mut args = vec!["check", disk.xml.to_str().unwrap()];
    args.extend_from_slice(extra);
    quorum(args)
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
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());

    let out = check(&disk, &[]);

    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("all replicas agree"), "{out}");
}

#[test]
fn one_corrupt_replica_exits_2() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    disk.fill(1, 0x42, 65536, 4096);

    let out = check(&disk, &[]);

    assert_eq!(out.code, Some(2), "{out}");
}

#[test]
fn json_report_names_the_divergent_range_and_replica() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    disk.fill(1, 0x42, 65536, 4096);
    disk.fill(2, 0x43, 3 * MIB, 8192);

    let out = check(&disk, &["--json"]);

    assert_eq!(out.code, Some(2), "{out}");
    assert_eq!(
        json_ranges(&out),
        vec![(65536, 4096, vec![1]), (3 * MIB, 8192, vec![2])]
    );
}

#[test]
fn check_without_repair_leaves_the_corrupt_replica_alone() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    disk.fill(1, 0x42, 65536, 4096);

    let out = check(&disk, &[]);

    assert_eq!(out.code, Some(2), "{out}");
    assert!(disk.replica_has(1, 0x42, 65536, 4096).ok());
}

#[test]
fn repair_exits_0_and_rewrites_the_raw_replica() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    disk.fill(1, 0x42, 65536, 4096);

    let out = check(&disk, &["--repair"]);

    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(
        disk.peek_raw(1, 0, (4 * MIB) as usize),
        vec![0x5a; (4 * MIB) as usize]
    );
}

#[test]
fn check_after_repair_finds_agreement() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    disk.fill(0, 0x42, 0, 12345);
    let repair = check(&disk, &["--repair"]);
    assert_eq!(repair.code, Some(0), "{repair}");

    let out = check(&disk, &["--json"]);

    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(json_ranges(&out), vec![]);
}

#[test]
fn repair_on_qcow2_leaves_a_consistent_image_with_the_majority_data() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Qcow2, Format::Raw],
        4 * MIB,
        &Options::default(),
    );
    for i in 0..3 {
        disk.fill(i, 0x5a, 0, 2 * MIB);
    }
    disk.fill(0, 0x42, MIB, 65536);

    let out = check(&disk, &["--repair"]);
    assert_eq!(out.code, Some(0), "{out}");

    let img = tool(
        "qemu-img",
        ["check", "-f", "qcow2", disk.path(0).to_str().unwrap()],
    );
    assert!(img.ok(), "{img}");
    let data = disk.replica_has(0, 0x5a, 0, 2 * MIB);
    assert!(
        data.ok() && data.stdout.contains("read 2097152/2097152"),
        "{data}"
    );
}

#[test]
fn repair_fills_a_range_only_one_qcow2_replica_lacks() {
    // Replica 0 never got the write: unallocated there, data on the others.
    let disk = Disk::new(&[Format::Qcow2; 3], 4 * MIB, &Options::default());
    disk.fill(1, 0x77, 2 * MIB, 65536);
    disk.fill(2, 0x77, 2 * MIB, 65536);

    let out = check(&disk, &["--repair"]);
    assert_eq!(out.code, Some(0), "{out}");

    let img = tool(
        "qemu-img",
        ["check", "-f", "qcow2", disk.path(0).to_str().unwrap()],
    );
    assert!(img.ok(), "{img}");
    assert!(disk.replica_has(0, 0x77, 2 * MIB, 65536).ok());
}

#[test]
fn no_quorum_spot_exits_3_and_is_not_rewritten() {
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    disk.fill(0, 0x41, 8192, 4096);
    disk.fill(1, 0x42, 8192, 4096);

    let out = check(&disk, &["--repair"]);

    assert_eq!(out.code, Some(3), "{out}");
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
    let disk = Disk::raw_filled(3, 4 * MIB, 0x5a, &Options::default());
    disk.fill(0, 0x41, 8192, 4096);
    disk.fill(1, 0x42, 8192, 4096);

    let out = check(&disk, &["--json"]);

    assert_eq!(out.code, Some(3), "{out}");
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
    let created = quorum(["create", disk.xml.to_str().unwrap(), "--size", "100G"]);
    assert!(created.ok(), "{created}");

    // The bound is the command's own timeout, generous for a 2-core CI box.
    let out = run_timeout(
        Command::new(QUORUM).args(["check", disk.xml.to_str().unwrap()]),
        Duration::from_secs(60),
    );

    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("all replicas agree"), "{out}");
}

#[test]
fn create_makes_missing_images_and_leaves_existing_ones_alone() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Raw, Format::Qcow2],
        4 * MIB,
        &Options::default(),
    );
    disk.fill(0, 0x5a, 0, 65536);
    std::fs::remove_file(disk.path(1)).expect("remove");
    std::fs::remove_file(disk.path(2)).expect("remove");

    let out = quorum(["create", disk.xml.to_str().unwrap(), "--size", "4M"]);

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
    let disk = Disk::new(&[Format::Raw; 3], 4 * MIB, &Options::default());
    let grown = tool(
        "qemu-img",
        ["resize", "-f", "raw", disk.path(2).to_str().unwrap(), "8M"],
    );
    assert!(grown.ok(), "{grown}");
    std::fs::remove_file(disk.path(1)).expect("remove");

    let out = quorum(["create", disk.xml.to_str().unwrap(), "--size", "4M"]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("disagree on size"), "{out}");
    assert!(
        !disk.path(1).exists(),
        "created an image despite the size conflict"
    );
}
