//! `quorum qemu-args` nodes live beside libvirt's own: a QEMU whose command
//! line already holds the nodes libvirt gives a domain's other disk
//! (`libvirt-1-storage`, `libvirt-1-format`) still starts with ours added,
//! where the old `libvirt-N-*` names made it refuse ("Duplicate nodes").
//!
//! Needs qemu-system-x86_64 (bookworm-backports) and qemu-img; fails if missing.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Disk, Format, Options, QUORUM, require, state_dir};

const MIB: u64 = 1 << 20;

/// The nodes libvirt 9 writes for a plain raw file disk: storage, then format.
fn libvirt_other_disk(image: &Path) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!(
            r#"{{"driver":"file","filename":"{}","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}}"#,
            image.display()
        ),
        "-blockdev".into(),
        r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"raw","file":"libvirt-1-storage"}"#
            .into(),
    ]
}

/// qemu-system-x86_64 with no machine, `args`, and `quit` typed into its
/// monitor: exit 0 once every `-blockdev` was opened, 1 when one was refused.
fn qemu_opens(args: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(require("qemu-system-x86_64"))
        .args(["-machine", "none", "-nodefaults", "-display", "none"])
        .args(["-monitor", "stdio"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    // A QEMU that refused its command line has exited: the pipe may be closed.
    let _ = child.stdin.take().expect("stdin").write_all(b"quit\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu-system-x86_64 did not quit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    (status.code(), err)
}

fn qemu_args(disk: &Disk, extra: &[&str]) -> Vec<String> {
    let out = support::run(
        Command::new(QUORUM)
            .env("QUORUM_STATE_DIR", state_dir())
            .arg("qemu-args")
            .arg(&disk.xml)
            .args(["--format", "argv"])
            .args(extra),
    );
    assert!(out.ok(), "{out}");
    out.stdout.lines().map(str::to_string).collect()
}

#[test]
fn qemu_starts_with_our_nodes_beside_libvirts_own() {
    let disk = Disk::new(
        &[Format::Qcow2, Format::Raw, Format::Raw],
        MIB,
        &Options::default(),
    );
    let other = disk.file("other.raw");
    support::create_image(&other, Format::Raw, MIB, None);

    let mut args = libvirt_other_disk(&other);
    args.extend(qemu_args(&disk, &[]));
    let (code, err) = qemu_opens(&args);

    assert_eq!(
        code,
        Some(0),
        "QEMU refused the command line: {err}\n{args:#?}"
    );
}

#[test]
fn the_old_libvirt_names_are_what_qemu_refuses() {
    // The control: the same check does fail on a clash, so the test above
    // proves the names differ, not that QEMU ignores duplicates.
    let disk = Disk::new(&[Format::Raw, Format::Raw], MIB, &Options::default());
    let other = disk.file("other.raw");
    support::create_image(&other, Format::Raw, MIB, None);

    let mut args = libvirt_other_disk(&other);
    args.extend(
        qemu_args(&disk, &["--node-prefix", "old"])
            .into_iter()
            .map(|a| {
                a.replace("\"old-1-storage\"", "\"libvirt-1-storage\"")
                    .replace("\"old\"", "\"libvirt-quorum-vda\"")
            }),
    );
    let (code, err) = qemu_opens(&args);

    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Duplicate nodes"), "{err}");
}

#[test]
fn a_chosen_prefix_reaches_qemu_and_a_bad_one_is_a_usage_error() {
    let disk = Disk::new(&[Format::Raw, Format::Raw], MIB, &Options::default());

    let args = qemu_args(&disk, &["--node-prefix", "mine"]);
    let (code, err) = qemu_opens(&args);
    let bad = support::quorum([
        "qemu-args".as_ref(),
        disk.xml.as_os_str(),
        "--node-prefix".as_ref(),
        "libvirt".as_ref(),
    ]);

    assert_eq!(code, Some(0), "{err}");
    assert!(
        args.iter().any(|a| a.contains(r#""node-name":"mine""#)),
        "{args:?}"
    );
    assert_eq!(bad.code, Some(2), "{bad}");
    assert!(
        bad.stderr.contains("clash with the nodes libvirt names"),
        "{bad}"
    );
}
