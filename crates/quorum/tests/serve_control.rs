//! The control plane end to end, under real load: a replica swapped for an
//! empty file through the monitor while fio writes and verifies through the
//! export, and an online scrub that repairs corruption planted behind the
//! daemon's back while fio writes elsewhere. Checked with fio's own verify,
//! the monitor's events and counters, and the replica files byte by byte.

mod support;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::qmp::Qmp;
use support::{Daemon, Disk, Options, create_image, require, wait_bounded};

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(180);

/// fio over the export: 64 KiB random writes over `[offset, offset+size)`
/// at `rate`, each block once, then every block read back and checked
/// (crc32c headers); fatal on the first mismatch.
fn start_fio(uri: &str, dir: &Path, offset: u64, size: u64, rate: &str) -> Child {
    Command::new(require("fio"))
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            &format!("--rate={rate}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .current_dir(dir)
        .stdout(std::fs::File::create(dir.join("fio.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("fio.err")).unwrap())
        .spawn()
        .expect("start fio")
}

fn finish_fio(mut fio: Child, dir: &Path) {
    let status = wait_bounded(&mut fio, LONG).unwrap_or_else(|| {
        let _ = fio.kill();
        let _ = fio.wait();
        panic!("fio did not finish within {LONG:?}")
    });
    let out = std::fs::read_to_string(dir.join("fio.out")).unwrap_or_default();
    let err = std::fs::read_to_string(dir.join("fio.err")).unwrap_or_default();
    assert!(status.success(), "fio failed ({status}):\n{out}\n{err}");
    assert!(!out.contains("verify: bad"), "fio verify errors:\n{out}");
}

/// Poll `query-quorum` (bounded) until `cond` holds on it.
fn wait_quorum(q: &mut Qmp, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + LONG;
    loop {
        let v = q.ok("query-quorum", json!({}));
        if cond(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {LONG:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn replica<'a>(quorum: &'a Value, name: &str) -> &'a Value {
    quorum["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no replica {name} in {quorum}"))
}

fn assert_same_files(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {at}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn hot_replace_under_fio_load_rebuilds_the_new_replica_byte_identical() {
    let size = 64 * MIB;
    let disk = Disk::raw_filled(3, size, 0, &Options::default());
    let dir = disk.dir.path().to_path_buf();
    let qmp_path = dir.join("qmp.sock");
    // A slow resync, so the rebuild runs while fio writes and verifies.
    let d = Daemon::start(
        &disk,
        &["--qmp", qmp_path.to_str().unwrap(), "--resync-rate", "16M"],
    );
    let mut q = Qmp::connect(&qmp_path);
    let fio = start_fio(&d.uri, &dir, 0, size, "24m");
    wait_quorum(&mut q, "fio writing", |v| {
        v["stats"]["writes"].as_u64().unwrap_or(0) >= 32
    });

    let new = dir.join("new.raw");
    create_image(&new, support::Format::Raw, size, None);
    let xml = format!(
        "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>",
        new.display()
    );
    q.ok(
        "quorum-replica-replace",
        json!({"replica": "replica-1", "backing-store": xml}),
    );
    // The old file is released at once: another writer may lock it.
    let old = disk.path(1).to_path_buf();
    let out = support::qemu_io_file_out(&old, support::Format::Raw, "read 0 4k");
    assert!(out.ok(), "the replaced replica is still locked: {out}");

    finish_fio(fio, &dir);
    q.ok("quorum-set-resync-rate", json!({"rate": 0}));
    let done = q.wait_event(LONG, |e| {
        e["event"] == "QUORUM_RESYNC_COMPLETED" && e["data"]["node-name"] == "replica-1"
    });
    assert!(done["data"]["bytes"].as_u64().unwrap() > 0, "{done}");
    assert!(done["timestamp"]["seconds"].as_u64().is_some(), "{done}");

    let states: Vec<String> = q
        .take_events("QUORUM_REPLICA_STATE")
        .iter()
        .filter(|e| e["data"]["node-name"] == "replica-1")
        .map(|e| e["data"]["new"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        states.first().map(String::as_str),
        Some("new"),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("in-sync"),
        "{states:?}"
    );
    assert!(states.iter().any(|s| s == "resyncing"), "{states:?}");

    let v = q.ok("query-quorum", json!({}));
    let r1 = replica(&v, "replica-1");
    assert_eq!(r1["state"], "in-sync", "{v}");
    assert_eq!(r1["uri"], new.display().to_string(), "{v}");
    assert_eq!(r1["missed-bytes"], 0, "{v}");
    assert_eq!(d.stop(), Some(0));
    assert_same_files(&new, disk.path(0));
    assert_same_files(&new, disk.path(2));
}

#[test]
fn online_scrub_repairs_planted_corruption_while_fio_writes() {
    let size = 32 * MIB;
    let disk = Disk::raw_filled(3, size, 0x5a, &Options::default());
    let dir = disk.dir.path().to_path_buf();
    // Six corrupt blocks, two on each replica, in the first half; fio
    // writes the second half meanwhile.
    let planted: Vec<(usize, u64)> = (0..6u64)
        .map(|k| ((k % 3) as usize, (k * 37 + 5) * 4096 * 16))
        .collect();
    // The record knows every region, so serve's first comparison does not
    // repair the planted blocks before the scrub finds them.
    let checked = support::quorum(["check", "--repair", disk.xml.to_str().unwrap()]);
    assert!(checked.ok(), "{checked}");
    for &(i, off) in &planted {
        assert!(off + 4096 <= size / 2);
        disk.poke_raw(i, off, &[0xc3; 4096]);
    }
    let qmp_path = dir.join("qmp.sock");
    let d = Daemon::start(&disk, &["--qmp", qmp_path.to_str().unwrap()]);
    let mut q = Qmp::connect(&qmp_path);
    let fio = start_fio(&d.uri, &dir, size / 2, size / 2, "8m");
    wait_quorum(&mut q, "fio writing", |v| {
        v["stats"]["writes"].as_u64().unwrap_or(0) >= 16
    });

    q.ok("quorum-scrub", json!({"repair": true, "rate": 8 * MIB}));
    // A second scrub is refused while this one runs.
    let again = q
        .execute("quorum-scrub", json!({"repair": false}))
        .expect_err("a second scrub while one runs");
    assert_eq!(again["class"], "GenericError", "{again}");
    let done = q.wait_event(LONG, |e| e["event"] == "QUORUM_SCRUB_COMPLETED");
    let data = &done["data"];
    assert_eq!(data["status"], "completed", "{done}");
    assert_eq!(data["divergent"], 6, "{done}");
    assert_eq!(data["repaired"], 6, "{done}");
    assert_eq!(data["no-quorum"], 0, "{done}");
    finish_fio(fio, &dir);

    // Exactly one REPORT_BAD (voted out: no error) per planted block, for
    // the replica it was planted on.
    let mut bad: Vec<(String, u64)> = q
        .take_events("QUORUM_REPORT_BAD")
        .iter()
        .map(|e| {
            assert!(e["data"].get("error").is_none(), "{e}");
            (
                e["data"]["node-name"].as_str().unwrap().to_owned(),
                e["data"]["sector-num"].as_u64().unwrap(),
            )
        })
        .collect();
    bad.sort();
    let mut want: Vec<(String, u64)> = planted
        .iter()
        .map(|&(i, off)| (format!("replica-{i}"), off / 512))
        .collect();
    want.sort();
    assert_eq!(bad, want);

    let scrub = q.ok("query-scrub", json!({}));
    assert_eq!(scrub["status"], "completed", "{scrub}");
    assert_eq!(
        scrub["divergent"].as_array().map(Vec::len),
        Some(6),
        "{scrub}"
    );
    let v = q.ok("query-quorum", json!({}));
    for i in 0..3 {
        let r = replica(&v, &format!("replica-{i}"));
        assert_eq!(r["bad-votes"], 2, "replica-{i}: {v}");
        assert_eq!(r["rewrites"], 2, "replica-{i}: {v}");
    }
    assert_eq!(d.stop(), Some(0));
    assert_same_files(disk.path(0), disk.path(1));
    assert_same_files(disk.path(0), disk.path(2));
    // Nothing fio did not write changed: the planted blocks are the
    // majority's again.
    for &(i, off) in &planted {
        assert_eq!(disk.peek_raw(i, off, 4096), vec![0x5a; 4096]);
    }
}

#[test]
fn remove_then_add_through_the_monitor_never_below_the_threshold() {
    let size = 16 * MIB;
    let disk = Disk::raw_filled(3, size, 0x5a, &Options::default());
    let dir = disk.dir.path().to_path_buf();
    let qmp_path = dir.join("qmp.sock");
    let d = Daemon::start(&disk, &["--qmp", qmp_path.to_str().unwrap()]);
    let mut q = Qmp::connect(&qmp_path);

    q.ok("quorum-replica-remove", json!({"replica": "replica-2"}));
    let ev = q.wait_event(LONG, |e| {
        e["event"] == "QUORUM_REPLICA_STATE" && e["data"]["node-name"] == "replica-2"
    });
    assert_eq!(ev["data"]["new"], "removed", "{ev}");
    let v = q.ok("query-quorum", json!({}));
    assert_eq!(v["replicas"].as_array().map(Vec::len), Some(2), "{v}");
    // Threshold 2 of the 2 left: removing another is refused.
    let err = q
        .execute("quorum-replica-remove", json!({"replica": "replica-1"}))
        .expect_err("removing below the threshold");
    assert_eq!(err["class"], "GenericError", "{err}");
    assert!(err["desc"].as_str().unwrap().contains("threshold"), "{err}");
    // The removed file is released and no longer written.
    let removed = disk.path(2).to_path_buf();
    let out = support::qemu_io(&d.uri, &["write -P 0x21 1M 1M"]);
    assert!(out.ok(), "{out}");
    assert_eq!(disk.peek_raw(2, MIB, 4096), vec![0x5a; 4096]);
    let out = support::qemu_io_file_out(&removed, support::Format::Raw, "read 0 4k");
    assert!(out.ok(), "the removed replica is still locked: {out}");

    // A new, empty replica takes the free slot and is rebuilt in full.
    let new = dir.join("added.raw");
    create_image(&new, support::Format::Raw, size, None);
    let xml = format!(
        "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>",
        new.display()
    );
    let added = q.ok("quorum-replica-add", json!({"backing-store": xml}));
    let name = added["replica"]
        .as_str()
        .expect("the new node name")
        .to_owned();
    assert_eq!(name, "replica-2");
    q.wait_event(LONG, |e| {
        e["event"] == "QUORUM_RESYNC_COMPLETED" && e["data"]["node-name"] == name
    });
    let v = q.ok("query-quorum", json!({}));
    assert_eq!(replica(&v, &name)["state"], "in-sync", "{v}");
    assert_eq!(v["replicas"].as_array().map(Vec::len), Some(3), "{v}");
    let out = support::qemu_io(&d.uri, &["read -P 0x21 1M 1M", "read -P 0x5a 0 1M"]);
    assert!(out.ok(), "{out}");
    assert_eq!(d.stop(), Some(0));
    assert_same_files(&new, disk.path(0));
}

#[test]
fn a_dead_remote_replica_is_replaced_by_a_local_qcow2_while_the_disk_serves() {
    use support::nbdkit::{Nbdkit, with_replicas};
    let size = 16 * MIB;
    let disk = Disk::new(&[support::Format::Raw; 2], size, &Options::default());
    let dir = disk.dir.path().to_path_buf();
    let remote = dir.join("remote.raw");
    create_image(&remote, support::Format::Raw, size, None);
    let mut kit = Nbdkit::start(&dir, &remote, &[], &[]);
    let xml = with_replicas(&disk.xml_text(&Options::default()), &[&kit]);
    std::fs::write(&disk.xml, xml).unwrap();
    let checked = support::quorum(["check", "--repair", disk.xml.to_str().unwrap()]);
    assert!(checked.ok(), "{checked}");
    let qmp_path = dir.join("qmp.sock");
    let d = Daemon::start(
        &disk,
        &[
            "--qmp",
            qmp_path.to_str().unwrap(),
            "--replica-timeout",
            "2",
        ],
    );
    let mut q = Qmp::connect(&qmp_path);
    let out = support::qemu_io(&d.uri, &["write -P 0x31 0 4M"]);
    assert!(out.ok(), "{out}");

    // The remote replica dies; the next write notices and goes on with 2.
    kit.kill9();
    let out = support::qemu_io(&d.uri, &["write -P 0x32 4M 1M"]);
    assert!(out.ok(), "{out}");
    let failed = q.wait_event(LONG, |e| {
        e["event"] == "QUORUM_REPLICA_STATE"
            && e["data"]["node-name"] == "replica-2"
            && e["data"]["new"] == "failed"
    });
    assert!(failed["data"]["reason"].as_str().is_some(), "{failed}");

    // A fresh local qcow2 takes its place and is rebuilt from the two.
    let new = dir.join("new.qcow2");
    create_image(&new, support::Format::Qcow2, size, None);
    let fragment = format!(
        "<backingStore type='file'><format type='qcow2'/><source file='{}'/></backingStore>",
        new.display()
    );
    q.ok(
        "quorum-replica-replace",
        json!({"replica": "replica-2", "backing-store": fragment}),
    );
    q.wait_event(LONG, |e| {
        e["event"] == "QUORUM_RESYNC_COMPLETED" && e["data"]["node-name"] == "replica-2"
    });
    let v = q.ok("query-quorum", json!({}));
    let r2 = replica(&v, "replica-2");
    assert_eq!(r2["state"], "in-sync", "{v}");
    assert_eq!(r2["uri"], new.display().to_string(), "{v}");
    let out = support::qemu_io(&d.uri, &["read -P 0x31 0 4M", "read -P 0x32 4M 1M"]);
    assert!(out.ok(), "{out}");
    assert_eq!(d.stop(), Some(0));
    let cmp = support::tool(
        "qemu-img",
        [
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            disk.path(0).to_str().unwrap(),
            new.to_str().unwrap(),
        ],
    );
    assert!(cmp.ok(), "the rebuilt qcow2 differs: {cmp}");
}

#[test]
fn a_daemon_killed_during_a_rebuild_resumes_it_and_never_reads_the_new_replica_early() {
    let size = 32 * MIB;
    let disk = Disk::raw_filled(3, size, 0x5a, &Options::default());
    let dir = disk.dir.path().to_path_buf();
    let state = dir.join("vda.state");
    let state_arg = state.to_str().unwrap().to_owned();
    let qmp_path = dir.join("qmp.sock");
    let qmp_arg = qmp_path.to_str().unwrap().to_owned();
    // Slow enough that the rebuild is still going when the daemon dies.
    let args = [
        "--state",
        state_arg.as_str(),
        "--qmp",
        qmp_arg.as_str(),
        "--resync-rate",
        "4M",
    ];
    let d = Daemon::start(&disk, &args);
    let mut q = Qmp::connect(&qmp_path);
    let new = dir.join("new.raw");
    std::fs::write(&new, vec![0x77u8; size as usize]).unwrap();
    let fragment = format!(
        "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>",
        new.display()
    );
    q.ok(
        "quorum-replica-replace",
        json!({"replica": "replica-1", "backing-store": fragment}),
    );
    wait_quorum(&mut q, "the rebuild under way", |v| {
        replica(v, "replica-1")["resync-progress"]
            .as_u64()
            .is_some_and(|p| p > 0)
    });
    drop(q);
    d.kill9();

    // The XML now names the new replica; the same record carries on.
    let text = disk.xml_text(&Options::default()).replace(
        &disk.path(1).display().to_string(),
        &new.display().to_string(),
    );
    std::fs::write(&disk.xml, text).unwrap();
    let d = Daemon::start(&disk, &args);
    // Its garbage is never read or voted: every block reads the majority's
    // data, and replica-1 is never outvoted (it was not asked).
    let out = support::qemu_io(&d.uri, &[&format!("read -P 0x5a 0 {size}")]);
    assert!(out.ok(), "{out}");
    let mut q = Qmp::connect(&qmp_path);
    let r1 = replica(&q.ok("query-quorum", json!({})), "replica-1").clone();
    assert_eq!(r1["bad-votes"], 0, "{r1}");
    assert_ne!(r1["state"], "in-sync", "{r1}");
    assert!(r1["missed-bytes"].as_u64().unwrap() > 0, "{r1}");
    q.ok("quorum-set-resync-rate", json!({"rate": 0}));
    wait_quorum(&mut q, "the rebuild resumed and done", |v| {
        replica(v, "replica-1")["state"] == "in-sync"
    });
    assert_eq!(d.stop(), Some(0));
    assert_same_files(&new, disk.path(0));
}
