//! The monitor from the command line: serve's default socket beside the
//! record and its runtime file, `quorum status` live through the running
//! daemon and offline otherwise (stopped, killed, --no-qmp), `status --qmp`,
//! `replace` and `scrub` with `--wait`, and their refusals.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, Disk, Format, Options, quorum};

fn disk() -> Disk {
    Disk::new(&[Format::Raw; 3], 4 << 20, &Options::default())
}

fn state(disk: &Disk) -> PathBuf {
    disk.file("vda.state")
}

/// Start serve and wait (bounded) for its start-up lines: the NBD socket
/// accepts a moment before the monitor, the runtime file and the lines.
fn serve(disk: &Disk, extra: &[&str]) -> Daemon {
    let s = state(disk);
    let mut args = vec!["--state", s.to_str().unwrap()];
    args.extend_from_slice(extra);
    let d = Daemon::start(disk, &args);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(disk.file("serve.out"))
        .unwrap_or_default()
        .contains("  stop:")
    {
        assert!(
            Instant::now() < deadline,
            "no start-up lines: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

fn status_json(disk: &Disk, extra: &[&str]) -> Value {
    let s = state(disk);
    let mut args = vec![
        "status",
        disk.xml.to_str().unwrap(),
        "--state",
        s.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = quorum(&args);
    assert!(out.ok(), "{out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn run_file(disk: &Disk) -> PathBuf {
    disk.file("vda.state.run")
}

#[test]
fn default_monitor_beside_the_record_and_runtime_file() {
    let disk = disk();
    let d = serve(&disk, &[]);
    let qmp = disk.file("vda.qmp");
    let rf: Value = serde_json::from_slice(&std::fs::read(run_file(&disk)).expect("runtime file"))
        .expect("runtime file JSON");
    assert_eq!(rf["pid"], d.pid(), "{rf}");
    assert_eq!(rf["qmp"], qmp.to_str().unwrap(), "{rf}");
    assert_eq!(rf["export"], d.uri.as_str(), "{rf}");
    let out = std::fs::read_to_string(disk.file("serve.out")).unwrap_or_default();
    assert!(
        out.contains(&format!("  monitor: quorum status --qmp {}", qmp.display())),
        "{out}"
    );

    let live = status_json(&disk, &[]);
    assert_eq!(live["source"], "monitor", "{live:#}");
    assert_eq!(live["monitor"]["socket"], qmp.to_str().unwrap());
    assert_eq!(
        live["monitor"]["quorum"]["replicas"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    assert_eq!(
        live["record"]["in_use"], true,
        "the record is still read: {live:#}"
    );
    assert_eq!(live["replicas"][1]["state"], "in-sync", "{live:#}");
    let offline = status_json(&disk, &["--offline"]);
    assert_eq!(offline["source"], "record", "{offline:#}");
    assert!(offline.get("monitor").is_none());

    let text = quorum([
        "status",
        disk.xml.to_str().unwrap(),
        "--state",
        state(&disk).to_str().unwrap(),
    ]);
    assert!(text.ok(), "{text}");
    assert!(text.stdout.contains("(live)"), "{text}");
    let row = text
        .stdout
        .lines()
        .find(|l| l.starts_with("replica-2"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("in-sync") && row.contains(&disk.path(2).display().to_string()),
        "{row}"
    );

    // --qmp alone needs no XML.
    let out = quorum(["status", "--qmp", qmp.to_str().unwrap(), "--json"]);
    assert!(out.ok(), "{out}");
    let v: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(v["source"], "monitor");
    assert!(v.get("record").is_none(), "{v:#}");
    assert_eq!(v["disk"]["size"], 4 << 20);

    assert_eq!(d.stop(), Some(0));
    assert!(!qmp.exists(), "socket left after stop");
    assert!(!run_file(&disk).exists(), "runtime file left after stop");
    let after = status_json(&disk, &[]);
    assert_eq!(after["source"], "record", "{after:#}");
}

#[test]
fn killed_daemon_leaves_a_stale_runtime_file_that_is_ignored_and_replaced() {
    let disk = disk();
    let d = serve(&disk, &[]);
    d.kill9();
    assert!(run_file(&disk).exists());
    let s = status_json(&disk, &[]);
    assert_eq!(s["source"], "record", "dead PID taken as running: {s:#}");
    // A restart takes over the stale socket.
    let d = serve(&disk, &[]);
    assert_eq!(status_json(&disk, &[])["source"], "monitor");
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn no_qmp_means_no_socket_and_an_offline_status() {
    let disk = disk();
    let d = serve(&disk, &["--no-qmp"]);
    assert!(!disk.file("vda.qmp").exists());
    let rf: Value = serde_json::from_slice(&std::fs::read(run_file(&disk)).expect("runtime file"))
        .expect("json");
    assert!(rf["qmp"].is_null(), "{rf}");
    assert_eq!(status_json(&disk, &[])["source"], "record");
    let out = quorum([
        "scrub",
        disk.xml.to_str().unwrap(),
        "--state",
        state(&disk).to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("without a monitor (--no-qmp)"), "{out}");
    assert!(out.stderr.contains("\nhint: "), "{out}");
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn a_record_path_too_long_for_a_socket_means_no_default_monitor() {
    let disk = disk();
    let deep = disk.file(&"d".repeat(100));
    std::fs::create_dir(&deep).expect("mkdir");
    let s = deep.join("vda.state");
    let d = Daemon::start(&disk, &["--state", s.to_str().unwrap()]);
    assert!(!deep.join("vda.qmp").exists());
    assert!(d.log_text().contains("no monitor"), "{}", d.log_text());
    assert_eq!(d.stop(), Some(0));
}

fn scrub(disk: &Disk, extra: &[&str]) -> support::Output {
    let s = state(disk);
    let mut args = vec![
        "scrub",
        disk.xml.to_str().unwrap(),
        "--state",
        s.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    quorum(&args)
}

#[test]
fn scrub_and_replace_through_the_monitor_refuse_clearly() {
    let disk = disk();
    // No daemon: an error and a hint.
    let out = scrub(&disk, &["--wait"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no running `quorum serve`"), "{out}");
    assert!(out.stderr.contains("hint: "), "{out}");

    let d = serve(&disk, &[]);
    let out = scrub(&disk, &["--cancel"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no scrub is running"), "{out}");
    let out = scrub(&disk, &["--wait"]);
    assert!(out.ok() && out.stdout.contains("scrub completed"), "{out}");

    let replace = |args: &[&str], input: Option<&str>| {
        let s = state(&disk);
        let mut all = vec!["replace", "--state", s.to_str().unwrap()];
        all.extend_from_slice(args);
        support::run_with_input(
            std::process::Command::new(support::QUORUM)
                .args(&all)
                .env("QUORUM_STATE_DIR", support::state_dir()),
            input,
            support::TIMEOUT,
        )
    };
    let xml = disk.xml.to_str().unwrap();
    let new = |p: &Path| {
        format!(
            "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>",
            p.display()
        )
    };
    let out = replace(&[xml, "replica-1"], None);
    assert_eq!(out.code, Some(2), "missing NEW.xml is a usage error: {out}");
    let out = replace(&[xml, "replica-9", "-"], Some(&new(&disk.file("new.raw"))));
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no replica named 'replica-9'"), "{out}");
    let out = replace(&[xml, "replica-1", "-"], Some("<backingStore type='file'>"));
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("invalid backing-store"), "{out}");
    let missing = disk.file("missing.raw");
    let out = replace(&[xml, "replica-1", "-"], Some(&new(&missing)));
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains(&format!("cannot open {}", missing.display())),
        "{out}"
    );
    // The hint says how to make the image, at the disk's size.
    assert!(
        out.stderr.contains(&format!(
            "qemu-img create -f raw {} {}",
            missing.display(),
            4 << 20
        )),
        "{out}"
    );
    // The disk still serves, every replica in place.
    let s = status_json(&disk, &[]);
    assert_eq!(
        s["monitor"]["quorum"]["replicas"][1]["state"], "in-sync",
        "{s:#}"
    );
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn scrub_wait_reports_and_repairs_and_replace_wait_rebuilds() {
    let disk = disk();
    let xml = disk.xml.to_str().unwrap().to_owned();
    let s = state(&disk);
    let s = s.to_str().unwrap();
    // The record knows every region, so serve's first comparison leaves
    // the planted blocks to the scrub.
    let out = quorum(["check", "--repair", "--state", s, &xml]);
    assert!(out.ok(), "{out}");
    disk.poke_raw(0, 8192, &[0xab; 4096]);
    disk.poke_raw(2, 1 << 20, &[0xcd; 4096]);
    let d = serve(&disk, &[]);

    // Without --repair: found, not repaired, exit bit 4.
    let out = scrub(&disk, &["--wait"]);
    assert_eq!(out.code, Some(4), "{out}");
    assert_eq!(disk.peek_raw(0, 8192, 4096), vec![0xab; 4096]);
    // With it: repaired, exit 0, the replicas equal again.
    let out = scrub(&disk, &["--repair", "--wait"]);
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(disk.peek_raw(0, 8192, 4096), vec![0u8; 4096]);
    assert_eq!(disk.peek_raw(2, 1 << 20, 4096), vec![0u8; 4096]);
    // Without --rate the scrub runs at the resync's default, 200 MiB/s.
    let js = status_json(&disk, &[]);
    assert_eq!(js["monitor"]["scrub"]["rate"], 200 << 20, "{js:#}");
    // The live status says how the last scrub ended.
    let st = quorum(["status", &xml, "--state", s]);
    assert!(st.ok(), "{st}");
    assert!(
        st.stdout
            .contains("Scrub : completed (repair): 4.0 MiB scanned, 2 divergent range(s)"),
        "{st}"
    );
    let out = scrub(&disk, &["--wait"]);
    assert_eq!(out.code, Some(0), "a second scan finds nothing: {out}");

    // Replace replica-1 by a file full of garbage; --wait returns once it
    // is rebuilt, and it is then byte-identical.
    let new = disk.file("new.raw");
    std::fs::write(&new, vec![0x77u8; 4 << 20]).unwrap();
    let fragment = format!(
        "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>",
        new.display()
    );
    let out = support::run_with_input(
        std::process::Command::new(support::QUORUM)
            .args(["replace", &xml, "--state", s, "replica-1", "-", "--wait"])
            .env("QUORUM_STATE_DIR", support::state_dir()),
        Some(&fragment),
        support::TIMEOUT,
    );
    assert!(out.ok(), "{out}");
    let st = status_json(&disk, &[]);
    let r1 = &st["monitor"]["quorum"]["replicas"][1];
    assert_eq!(r1["state"], "in-sync", "{st:#}");
    assert_eq!(r1["uri"], new.display().to_string(), "{st:#}");
    // The live table shows the running disk, and says where it no longer
    // matches the XML.
    let text = quorum(["status", &xml, "--state", s]);
    assert!(text.ok(), "{text}");
    assert!(
        text.stdout.contains(&format!(
            "replica-1 is {} (the XML has {})",
            new.display(),
            disk.path(1).display()
        )),
        "{text}"
    );
    // A replica removed through the monitor is `removed`, not shifted.
    let mut q = support::qmp::Qmp::connect(&disk.file("vda.qmp"));
    q.ok(
        "quorum-replica-remove",
        serde_json::json!({"replica": "replica-0"}),
    );
    let st = status_json(&disk, &[]);
    assert_eq!(st["replicas"][0]["state"], "removed", "{st:#}");
    assert_eq!(st["replicas"][1]["state"], "in-sync", "{st:#}");
    assert_eq!(st["replicas"][2]["state"], "in-sync", "{st:#}");
    let text = quorum(["status", &xml, "--state", s]);
    assert!(
        text.stdout.contains(&format!(
            "replica-0 ({}) was removed",
            disk.path(0).display()
        )),
        "{text}"
    );
    assert!(
        text.stdout.lines().any(|l| l.starts_with("replica-2 ")),
        "{text}"
    );
    assert_eq!(d.stop(), Some(0));
    assert_eq!(
        std::fs::read(&new).unwrap(),
        std::fs::read(disk.path(2)).unwrap()
    );
}
