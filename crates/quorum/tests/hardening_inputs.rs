//! Hostile or careless inputs to `validate`, `serve`, `check` and `create`
//! (issue "Hardening", items 9, 10, 13 and 14), run as a user would, with
//! images made and checked by qemu-img / qemu-io.

mod support;

use std::fmt::Write as _;

use support::{Daemon, Disk, Format, Options, quorum};

const MIB: u64 = 1 << 20;

fn opts(threshold: usize) -> Options {
    Options {
        threshold,
        ..Options::default()
    }
}

// ---- item 10: many errors ----

#[test]
fn validate_prints_the_first_20_errors_and_counts_the_rest() {
    let disk = Disk::new(&[Format::Raw], MIB, &opts(1));
    let mut xml = String::from("<disk type='quorum'>\n<threshold value='1'/>\n");
    for i in 0..500 {
        let _ = writeln!(xml, "<bogus{i}/>");
    }
    let _ = write!(
        xml,
        "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>\n\
         <target dev='vda'/>\n</disk>\n",
        disk.path(0).display()
    );
    std::fs::write(&disk.xml, xml).unwrap();

    let out = quorum(["validate", disk.xml.to_str().unwrap()]);

    assert_eq!(out.code, Some(1), "{out}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 21, "{out}");
    let label = disk.xml.display();
    assert_eq!(
        lines[0],
        format!("{label}:3:1: XML error: unknown element <bogus0> in <disk>")
    );
    assert_eq!(
        lines[20],
        format!("{label}:23:1: too many errors: 480 more errors from here on not shown")
    );
}

// ---- item 14: a threshold below a majority ----

#[test]
fn validate_warns_when_the_threshold_is_not_a_majority_and_only_then() {
    let disk = Disk::new(&[Format::Raw; 5], MIB, &opts(2));

    let minority = quorum(["validate", disk.xml.to_str().unwrap()]);
    disk.write_xml(&opts(3));
    let majority = quorum(["validate", disk.xml.to_str().unwrap()]);

    assert!(minority.ok(), "a minority threshold is valid: {minority}");
    assert_eq!(minority.stdout, "vda: quorum of 5 replicas, threshold 2\n");
    assert_eq!(
        minority.stderr,
        format!(
            "{}: warning: threshold 2 is not a majority of 5 replicas: a write counts as done \
             once 2 replicas have it, and the 3 that missed it can then outvote (or tie) it on \
             a later read; use a threshold of at least 3\n",
            disk.xml.display()
        )
    );
    assert!(majority.ok(), "{majority}");
    assert_eq!(majority.stderr, "", "{majority}");
}

#[test]
fn serve_logs_the_minority_threshold_warning_at_start_and_only_then() {
    let disk = Disk::new(
        &[Format::Raw, Format::Qcow2, Format::Raw, Format::Raw],
        MIB,
        &opts(2),
    );

    let daemon = Daemon::start(&disk, &[]);
    let minority_log = daemon.log_text();
    let minority_code = daemon.stop();
    disk.write_xml(&opts(3));
    let daemon = Daemon::start(&disk, &[]);
    let majority_log = daemon.log_text();
    daemon.stop();

    assert!(
        minority_log.contains("threshold 2 is not a majority of 4 replicas")
            && minority_log.contains("use a threshold of at least 3"),
        "serve log:\n{minority_log}"
    );
    assert_eq!(minority_code, Some(0));
    assert!(
        !majority_log.contains("not a majority"),
        "serve log:\n{majority_log}"
    );
}

// ---- item 9: one file through two paths ----

/// Three raw replicas where replica 2 is named through a symlink to replica 0.
fn disk_with_a_symlinked_replica() -> (Disk, String) {
    let mut disk = Disk::new(&[Format::Raw; 3], MIB, &opts(2));
    let link = disk.file("link.raw");
    std::os::unix::fs::symlink(disk.path(0), &link).unwrap();
    std::fs::remove_file(disk.path(2)).unwrap();
    disk.replicas[2].path = link;
    disk.write_xml(&opts(2));
    let want = format!(
        "replica path '{}' is the same file as '{}' (the same device and inode; first at line 6, \
         column 5): one file can only be one replica",
        disk.path(2).display(),
        disk.path(0).display()
    );
    (disk, want)
}

#[test]
fn validate_refuses_a_replica_that_is_a_symlink_to_another() {
    let (disk, want) = disk_with_a_symlinked_replica();

    let out = quorum(["validate", disk.xml.to_str().unwrap()]);

    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(
        out.stderr,
        format!(
            "{}:14:5: unsupported configuration: {want}\n",
            disk.xml.display()
        )
    );
}

#[test]
fn serve_check_and_create_refuse_a_replica_that_is_a_symlink_to_another() {
    let (disk, want) = disk_with_a_symlinked_replica();
    let xml = disk.xml.to_str().unwrap();
    let socket = disk.file("nbd.sock");

    let serve = support::run_timeout(
        std::process::Command::new(support::QUORUM).args([
            "serve",
            xml,
            "--socket",
            socket.to_str().unwrap(),
        ]),
        std::time::Duration::from_secs(30),
    );
    let check = quorum(["check", xml]);
    let create = quorum(["create", xml, "--size", "1M"]);

    for (name, out) in [("serve", &serve), ("check", &check), ("create", &create)] {
        assert_eq!(out.code, Some(1), "{name}: {out}");
        assert!(out.stderr.contains(&want), "{name}: {out}");
    }
    assert!(!socket.exists(), "serve must not have listened");
}

// ---- item 13: create's arguments, and --create-missing into a populated set ----

/// `qemu-img info --output=json` of an image.
fn img_info(path: &std::path::Path) -> serde_json::Value {
    let out = support::tool(
        "qemu-img",
        ["info", "--output=json", "-U", path.to_str().unwrap()],
    );
    assert!(out.ok(), "{out}");
    serde_json::from_str(&out.stdout).expect("qemu-img info json")
}

/// Remove every replica image of `disk`.
fn remove_all(disk: &Disk) {
    for r in &disk.replicas {
        std::fs::remove_file(&r.path).expect("remove image");
    }
}

#[test]
fn create_rounds_a_size_up_to_512_bytes_as_qemu_img_create_does() {
    let disk = Disk::new(&[Format::Raw, Format::Qcow2], MIB, &opts(1));
    remove_all(&disk);
    let reference = |fmt: &str| {
        let p = disk.file(&format!("ref.{fmt}"));
        let out = support::tool(
            "qemu-img",
            ["create", "-q", "-f", fmt, p.to_str().unwrap(), "1000"],
        );
        assert!(out.ok(), "{out}");
        img_info(&p)["virtual-size"].as_u64().unwrap()
    };

    let out = quorum(["create", disk.xml.to_str().unwrap(), "--size", "1000"]);

    assert!(out.ok(), "{out}");
    assert!(
        out.stdout.contains("rounded up to 1024 bytes"),
        "says so: {out}"
    );
    assert_eq!(reference("raw"), 1024);
    for (i, fmt) in [(0, "raw"), (1, "qcow2")] {
        let size = img_info(disk.path(i))["virtual-size"].as_u64().unwrap();
        assert_eq!(size, reference(fmt), "{fmt} replica");
    }
    let check = support::tool("qemu-img", ["check", disk.path(1).to_str().unwrap()]);
    assert!(check.ok(), "{check}");
    support::qemu_io_file(disk.path(1), Format::Qcow2, "write -P 0x33 512 512");
    support::qemu_io_file(disk.path(1), Format::Qcow2, "read -P 0x33 512 512");
}

#[test]
fn create_with_a_bad_cluster_size_creates_nothing() {
    let disk = Disk::new(&[Format::Raw, Format::Qcow2, Format::Raw], MIB, &opts(2));
    remove_all(&disk);
    let xml = disk.xml.to_str().unwrap();

    for bad in ["1000", "256", "4M"] {
        let out = quorum(["create", xml, "--size", "1M", "--cluster-size", bad]);

        assert_eq!(out.code, Some(2), "a usage error: {out}");
        assert!(
            out.stderr.contains("must be a power of two from 512 to 2M"),
            "{out}"
        );
        for r in &disk.replicas {
            assert!(
                !r.path.exists(),
                "--cluster-size {bad} made {}",
                r.path.display()
            );
        }
    }
}

#[test]
fn create_takes_a_cluster_size_with_units() {
    let disk = Disk::new(&[Format::Qcow2, Format::Raw], MIB, &opts(1));
    remove_all(&disk);

    let out = quorum([
        "create",
        disk.xml.to_str().unwrap(),
        "--size",
        "4M",
        "--cluster-size",
        "2M",
    ]);

    assert!(out.ok(), "{out}");
    let info = img_info(disk.path(0));
    assert_eq!(info["cluster-size"].as_u64(), Some(2 << 20), "{info}");
    assert_eq!(info["virtual-size"].as_u64(), Some(4 * MIB), "{info}");
}

#[test]
fn create_with_a_missing_block_device_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("disk.xml");
    let first = dir.path().join("r0.qcow2");
    std::fs::write(
        &xml,
        format!(
            "<disk type='quorum'>\n  <threshold value='1'/>\n\
             <backingStore type='file'><format type='qcow2'/><source file='{}'/></backingStore>\n\
             <backingStore type='block'><format type='raw'/><source dev='{}'/></backingStore>\n\
             <target dev='vda'/>\n</disk>\n",
            first.display(),
            dir.path().join("no-such-device").display()
        ),
    )
    .unwrap();

    let out = quorum(["create", xml.to_str().unwrap(), "--size", "1M"]);

    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("no-such-device does not exist"),
        "{out}"
    );
    assert!(!first.exists(), "made {} before refusing", first.display());
}

#[test]
fn serve_create_missing_beside_data_rebuilds_the_new_replica_and_never_lets_it_vote() {
    let disk = Disk::new(&[Format::Raw, Format::Qcow2, Format::Raw], MIB, &opts(2));
    let xml = disk.xml.to_str().unwrap();
    let socket = disk.file("nbd.sock");
    // Beside empty replicas a new one is harmless: serve makes it and starts.
    std::fs::remove_file(disk.path(2)).unwrap();
    Daemon::start(&disk, &["--create-missing"]).stop();
    assert!(disk.path(2).exists());
    // Now the replicas hold data and the third is lost.
    for i in 0..3 {
        disk.fill(i, 0x5a, 0, MIB);
    }
    std::fs::remove_file(disk.path(2)).unwrap();

    // Without a record nothing could keep the empty file from voting: refused.
    let serve = support::run_timeout(
        std::process::Command::new(support::QUORUM).args([
            "serve",
            xml,
            "--socket",
            socket.to_str().unwrap(),
            "--create-missing",
            "--no-tracking",
        ]),
        std::time::Duration::from_secs(20),
    );
    assert_eq!(serve.code, Some(1), "{serve}");
    assert!(
        serve
            .stderr
            .contains("an empty replica would vote as if it were in sync"),
        "{serve}"
    );
    assert!(!disk.path(2).exists(), "serve made the empty voter");

    // With the record: made, started as new, rebuilt online.
    let d = Daemon::start(&disk, &["--create-missing"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !d.log_text().contains("resync of replica-2 completed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no rebuild:\n{}",
            d.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = d.log_text();
    assert_eq!(d.stop(), Some(0));
    assert!(log.contains("replica replica-2 is new"), "{log}");
    let copied = disk.replica_has(2, 0x5a, 0, MIB);
    assert!(copied.ok() && !copied.text().contains("fail"), "{copied}");

    // `quorum create` records a replica it makes beside data as new too;
    // `check --repair` then rebuilds it offline.
    std::fs::remove_file(disk.path(2)).unwrap();
    let create = quorum(["create", xml]);
    assert!(
        create.ok() && create.stderr.contains("recorded as new"),
        "{create}"
    );
    let repair = quorum(["check", xml, "--repair"]);
    assert!(repair.ok(), "{repair}");
    let copied = disk.replica_has(2, 0x5a, 0, MIB);
    assert!(copied.ok() && !copied.text().contains("fail"), "{copied}");
}
