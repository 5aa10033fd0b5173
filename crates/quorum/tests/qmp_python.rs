//! Real QMP clients against the monitor: `qemu.qmp` (PyPI; scripts/test.sh
//! installs it into a venv, found through $QUORUM_QMP_VENV, default
//! target/qmp-venv) connects, negotiates, runs `query-quorum`, and receives
//! QUORUM_REPORT_BAD for a replica corrupted behind the daemon's back while
//! qemu-io reads through the export; `qmp-shell` runs commands fed on a
//! non-terminal stdin. A missing venv fails the tests.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use support::{Daemon, Disk, Options, run, run_with_input};

/// The venv with qemu.qmp; panics with how to make it when missing.
fn venv() -> PathBuf {
    let dir = std::env::var_os("QUORUM_QMP_VENV").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/qmp-venv"),
        PathBuf::from,
    );
    let python = dir.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "qemu.qmp is not installed in the venv {} ($QUORUM_QMP_VENV): run scripts/test.sh, \
         which makes it, or: python3 -m venv {0} && {0}/bin/pip install qemu.qmp",
        dir.display()
    );
    dir
}

fn start() -> (Disk, Daemon, PathBuf) {
    let disk = Disk::raw_filled(3, 4 << 20, 0x5a, &Options::default());
    let qmp = disk.file("qmp.sock");
    let d = Daemon::start(&disk, &["--qmp", qmp.to_str().unwrap()]);
    (disk, d, qmp)
}

#[test]
fn qemu_qmp_client_queries_and_receives_report_bad() {
    let venv = venv();
    support::require("qemu-io");
    let (disk, d, qmp) = start();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/qmp_events.py");
    let offset = 1 << 20;
    let out = run(Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(&qmp)
        .arg(&d.uri)
        .arg(disk.path(1))
        .arg(offset.to_string()));
    assert!(out.ok(), "qemu.qmp client failed: {out}\n{}", d.log_text());
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let q = &v["query-quorum"];
    assert_eq!(q["replicas"].as_array().map(Vec::len), Some(3), "{v:#}");
    assert_eq!(q["threshold"], 2);
    assert_eq!(v["unknown"], "CommandNotFound", "{v:#}");
    let io = &v["qemu-io"];
    assert_eq!(io["code"], 0, "the voted read failed: {v:#}");
    let e = &v["event"];
    assert_eq!(e["event"], "QUORUM_REPORT_BAD", "{v:#}");
    assert_eq!(e["data"]["node-name"], "replica-1", "{v:#}");
    assert_eq!(e["data"]["type"], "read", "{v:#}");
    assert!(
        e["data"].get("error").is_none(),
        "voted out, not an I/O error: {v:#}"
    );
    assert_eq!(e["data"]["sector-num"], json!(offset / 512), "{v:#}");
    assert!(
        e["timestamp"]["seconds"].as_u64().unwrap_or(0) > 1_600_000_000,
        "{v:#}"
    );
    assert!(
        e["timestamp"]["microseconds"]
            .as_u64()
            .is_some_and(|u| u < 1_000_000)
    );
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn qmp_shell_runs_commands_from_a_pipe() {
    let venv = venv();
    let (_disk, d, qmp) = start();
    let out = run_with_input(
        Command::new(venv.join("bin/qmp-shell")).arg(&qmp),
        Some(
            "query-version\nquorum-set-resync-rate rate=1048576\nquorum-set-resync-rate rate=fast\n",
        ),
        support::TIMEOUT,
    );
    assert!(out.ok(), "qmp-shell: {out}");
    let v = env!("CARGO_PKG_VERSION");
    assert!(
        out.stdout.contains(&format!("Connected to QEMU {v}")),
        "banner: {out}"
    );
    // One compact JSON reply per line, after the `(QEMU) ` prompt.
    let replies: Vec<Value> = out
        .stdout
        .lines()
        .filter_map(|l| {
            l.trim_start_matches("(QEMU) ")
                .strip_prefix('{')
                .map(|r| format!("{{{r}"))
        })
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(replies.len(), 3, "{out}");
    assert_eq!(
        replies[0]["return"]["package"],
        format!("quorum {v}"),
        "{out}"
    );
    assert_eq!(replies[1], json!({"return": {}}), "{out}");
    assert_eq!(replies[2]["error"]["class"], "GenericError", "{out}");
    assert_eq!(d.stop(), Some(0));
}
