//! Images we refuse, chains we resolve, and what probe reports.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use quorum_config::model::{Backing, ImageFormat, NbdHost, Source, StorageSource};
use quorum_replica::{OpenError, OpenOptions, create, open, probe, probe_chain};
use tempfile::TempDir;

fn open_err(src: &StorageSource) -> OpenError {
    open(src, &OpenOptions::default()).unwrap_err()
}

fn qemu_qcow2(dir: &TempDir, name: &str, opts: &[&str]) -> std::path::PathBuf {
    let path = path_in(dir, name);
    let mut args = vec!["create", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[p(&path), "1M"]);
    run_ok("qemu-img", &args);
    path
}

#[test]
fn encrypted_qcow2_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(
        &dir,
        "e.qcow2",
        &[
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
    );
    let err = open_err(&qcow2(&path));
    assert!(matches!(err, OpenError::Encrypted { .. }), "{err}");
}

#[test]
fn dirty_qcow2_is_refused_with_repair_hint() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(&dir, "d.qcow2", &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&1u64.to_be_bytes(), 72).unwrap();
    let err = open_err(&qcow2(&path)).to_string();
    assert!(
        err.contains("dirty") && err.contains("qemu-img check -r all"),
        "{err}"
    );
}

#[test]
fn extended_l2_qcow2_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(&dir, "x.qcow2", &["-o", "extended_l2=on"]);
    let err = open_err(&qcow2(&path)).to_string();
    assert!(err.contains("extended L2"), "{err}");
}

#[test]
fn zstd_qcow2_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(&dir, "z.qcow2", &["-o", "compression_type=zstd"]);
    let err = open_err(&qcow2(&path)).to_string();
    assert!(err.contains("zstd"), "{err}");
}

#[test]
fn raw_file_declared_qcow2_is_a_format_mismatch() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "r.img");
    create(&raw(&path), 1 << 20, None).unwrap();
    let err = open_err(&qcow2(&path));
    assert!(matches!(err, OpenError::FormatMismatch { .. }), "{err}");
}

fn nbd_tcp(format: ImageFormat, tls: Option<bool>) -> StorageSource {
    StorageSource {
        index: None,
        format,
        source: Source::Nbd {
            export: None,
            host: NbdHost::Tcp {
                name: "localhost".into(),
                port: 10809,
            },
            tls,
        },
        backing: Backing::Unspecified,
    }
}

#[test]
fn nbd_with_tls_is_refused() {
    let err = open_err(&nbd_tcp(ImageFormat::Raw, Some(true))).to_string();
    assert!(
        err.contains("TLS for NBD replicas is not supported yet"),
        "{err}"
    );
}

#[test]
fn qcow2_over_nbd_is_refused() {
    let err = open_err(&nbd_tcp(ImageFormat::Qcow2, None)).to_string();
    assert!(
        err.contains("qcow2 over NBD is not supported; export the qcow2 with qemu-nbd -f qcow2 and declare it raw"),
        "{err}"
    );
}

#[test]
fn nbd_replicas_cannot_be_created() {
    let err = create(&nbd_tcp(ImageFormat::Raw, None), 1 << 20, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("network replicas can't be created"), "{err}");
}

fn base_and_top(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let (base, top) = (path_in(dir, "base.raw"), path_in(dir, "top.qcow2"));
    run_ok("qemu-img", &["create", "-f", "raw", p(&base), "1M"]);
    qemu_io("raw", &base, &["write -P 0x66 0 1M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "raw",
            p(&top),
        ],
    );
    (base, top)
}

#[test]
fn xml_chain_differing_from_header_names_both() {
    let dir = TempDir::new().unwrap();
    let (base, top) = base_and_top(&dir);
    let other = path_in(&dir, "other.raw");
    run_ok("qemu-img", &["create", "-f", "raw", p(&other), "1M"]);
    let err = open_err(&over(&top, raw(&other))).to_string();
    assert!(err.contains(p(&base)) && err.contains(p(&other)), "{err}");
}

#[test]
fn xml_chain_matches_header_through_a_relative_name() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.raw"), path_in(&dir, "top.qcow2"));
    run_ok("qemu-img", &["create", "-f", "raw", p(&base), "1M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            p(&top),
        ],
    );
    open(&over(&top, raw(&base)), &OpenOptions::default()).unwrap();
}

#[test]
fn unspecified_backing_follows_the_header() {
    let dir = TempDir::new().unwrap();
    let (_base, top) = base_and_top(&dir);
    let r = open(&qcow2(&top), &OpenOptions::default()).unwrap();
    let mut buf = [0u8; 512];
    r.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0x66; 512]);
}

#[test]
fn chain_end_ignores_the_header_backing_file() {
    let dir = TempDir::new().unwrap();
    let (_base, top) = base_and_top(&dir);
    let r = open(
        &layer(&top, ImageFormat::Qcow2, Backing::End),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut buf = [1u8; 512];
    r.read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, [0; 512]);
}

#[test]
fn missing_backing_file_names_it() {
    let dir = TempDir::new().unwrap();
    let (base, top) = base_and_top(&dir);
    std::fs::remove_file(&base).unwrap();
    let err = open_err(&qcow2(&top)).to_string();
    assert!(err.contains(p(&base)), "{err}");
}

#[test]
fn create_refuses_an_existing_file() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(&dir, "a.qcow2", &[]);
    let err = create(&qcow2(&path), 1 << 20, None).unwrap_err();
    assert!(matches!(err, OpenError::Exists { .. }), "{err}");
}

#[test]
fn probe_reports_format_size_and_backing() {
    let dir = TempDir::new().unwrap();
    let (base, top) = base_and_top(&dir);
    let info = probe(&qcow2(&top)).unwrap();
    let got = (
        info.format,
        info.virtual_size,
        info.backing_file,
        info.backing_format,
    );
    assert_eq!(
        got,
        (
            ImageFormat::Qcow2,
            1 << 20,
            Some(p(&base).to_owned()),
            Some("raw".to_owned())
        )
    );
}

#[test]
fn probe_detects_raw_by_missing_magic() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "r.raw");
    create(&raw(&path), 12345, None).unwrap();
    let info = probe(&raw(&path)).unwrap();
    assert_eq!((info.format, info.virtual_size), (ImageFormat::Raw, 12345));
}

#[test]
fn probe_chain_of_a_sound_chain_is_empty() {
    let dir = TempDir::new().unwrap();
    let (base, top) = base_and_top(&dir);
    assert_eq!(probe_chain(&over(&top, raw(&base))), Vec::<String>::new());
}

#[test]
fn probe_chain_reports_a_missing_file() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "nope.qcow2");
    let problems = probe_chain(&qcow2(&path));
    assert!(
        problems.len() == 1 && problems[0].contains(p(&path)),
        "{problems:?}"
    );
}

#[test]
fn probe_chain_reports_a_format_mismatch() {
    let dir = TempDir::new().unwrap();
    let (base, top) = base_and_top(&dir);
    let problems = probe_chain(&over(&top, qcow2(&base)));
    assert!(
        problems.iter().any(|p| p.contains("format qcow2")),
        "{problems:?}"
    );
}

#[test]
fn probe_chain_reports_a_differing_backing_file() {
    let dir = TempDir::new().unwrap();
    let (_base, top) = base_and_top(&dir);
    let other = path_in(&dir, "other.raw");
    run_ok("qemu-img", &["create", "-f", "raw", p(&other), "1M"]);
    let problems = probe_chain(&over(&top, raw(&other)));
    assert!(
        problems
            .iter()
            .any(|m| m.contains(p(&other)) && m.contains("header names")),
        "{problems:?}"
    );
}

#[test]
fn probe_chain_reports_a_missing_header_backing_file() {
    let dir = TempDir::new().unwrap();
    let (base, top) = base_and_top(&dir);
    std::fs::remove_file(&base).unwrap();
    let problems = probe_chain(&qcow2(&top));
    assert!(
        problems.iter().any(|m| m.contains(p(&base))),
        "{problems:?}"
    );
}

#[test]
fn probe_reports_refusal_of_encrypted_image() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(
        &dir,
        "e.qcow2",
        &[
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
    );
    let info = probe(&qcow2(&path)).unwrap();
    assert!(info.refusal.unwrap().contains("encrypted"));
}
