//! `quorum validate --probe` against real images made by qemu-img.

mod support;

use support::{Disk, Format, Options, create_image, quorum};

const MIB: u64 = 1 << 20;

fn probe(disk: &Disk) -> support::Output {
    quorum(["validate", "--probe", disk.xml.to_str().unwrap()])
}

#[test]
fn probe_of_matching_images_succeeds() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Qcow2, Format::Raw],
        MIB,
        &Options::default(),
    );

    let out = probe(&disk);

    assert_eq!(
        (out.code, out.stdout.trim()),
        (Some(0), "vda: quorum of 3 replicas, threshold 2"),
        "{out}"
    );
}

#[test]
fn probe_reports_a_missing_replica_file() {
    let disk = Disk::new(
        &[Format::Raw, Format::Raw, Format::Raw],
        MIB,
        &Options::default(),
    );
    std::fs::remove_file(disk.path(2)).unwrap();

    let out = probe(&disk);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("replica 2:") && out.stderr.contains(disk.path(2).to_str().unwrap()),
        "{out}"
    );
}

#[test]
fn probe_reports_a_format_mismatch() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Qcow2, Format::Qcow2],
        MIB,
        &Options::default(),
    );
    std::fs::remove_file(disk.path(1)).unwrap();
    create_image(disk.path(1), Format::Raw, MIB, None);

    let out = probe(&disk);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("replica 1:"), "{out}");
}

#[test]
fn probe_reports_replicas_of_different_sizes() {
    let disk = Disk::new(
        &[Format::Raw, Format::Raw, Format::Raw],
        MIB,
        &Options::default(),
    );
    std::fs::remove_file(disk.path(2)).unwrap();
    create_image(disk.path(2), Format::Raw, 2 * MIB, None);

    let out = probe(&disk);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("replica sizes disagree"), "{out}");
}

#[test]
fn validate_without_probe_does_not_open_images() {
    let disk = Disk::new(
        &[Format::Raw, Format::Raw, Format::Raw],
        MIB,
        &Options::default(),
    );
    std::fs::remove_file(disk.path(0)).unwrap();

    let out = quorum(["validate", disk.xml.to_str().unwrap()]);

    assert_eq!(out.code, Some(0), "{out}");
}

#[test]
fn serve_refuses_replicas_of_different_sizes_naming_both() {
    let disk = Disk::new(
        &[Format::Raw, Format::Raw, Format::Raw],
        MIB,
        &Options::default(),
    );
    std::fs::remove_file(disk.path(1)).unwrap();
    create_image(disk.path(1), Format::Raw, 2 * MIB, None);
    let sock = disk.dir.path().join("s.sock");

    let out = quorum([
        "serve",
        disk.xml.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ]);

    assert_eq!(out.code, Some(1), "{out}");
    let expected = format!(
        "replica {} has size 2097152 bytes, but replica {} has 1048576 bytes",
        disk.path(1).display(),
        disk.path(0).display()
    );
    assert!(out.stderr.contains(&expected), "{out}");
}
