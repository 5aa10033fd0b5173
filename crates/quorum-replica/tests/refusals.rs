//! Images we refuse, chains we resolve, and what probe reports.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::*;
use quorum_config::model::{Backing, ImageFormat, NbdHost, StorageSource};
use quorum_replica::{OpenError, OpenOptions, create, open, probe, probe_chain};
use tempfile::TempDir;

fn open_err(src: &StorageSource) -> OpenError {
    open(src, &OpenOptions::default()).unwrap_err()
}

/// Asserts that opening `src` fails with a message containing every one of `needles`.
fn assert_open_refused(src: &StorageSource, needles: &[&str]) {
    let err = open_err(src).to_string();
    assert!(needles.iter().all(|n| err.contains(n)), "{err}");
}

/// Asserts that some problem `probe_chain` reports for `src` contains every one of `needles`.
fn assert_chain_problem(src: &StorageSource, needles: &[&str]) {
    let problems = probe_chain(src);
    assert!(
        problems
            .iter()
            .any(|m| needles.iter().all(|n| m.contains(n))),
        "{problems:?}"
    );
}

fn qemu_qcow2(dir: &TempDir, name: &str, opts: &[&str]) -> PathBuf {
    let path = path_in(dir, name);
    qemu_image(&path, "qcow2", opts, "1M", &[]);
    path
}

/// A LUKS-encrypted qcow2 made by `qemu-img`.
fn encrypted_qcow2(dir: &TempDir) -> PathBuf {
    qemu_qcow2(
        dir,
        "e.qcow2",
        &[
            "--object",
            "secret,id=s0,data=x",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        ],
    )
}

#[test]
fn encrypted_qcow2_is_refused() {
    let dir = TempDir::new().unwrap();
    let err = open_err(&qcow2(&encrypted_qcow2(&dir)));
    assert!(matches!(err, OpenError::Encrypted { .. }), "{err}");
}

#[test]
fn dirty_qcow2_is_refused_with_repair_hint() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(&dir, "d.qcow2", &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&1u64.to_be_bytes(), 72).unwrap();
    assert_open_refused(&qcow2(&path), &["dirty", "qemu-img check -r all"]);
}

#[test]
fn extended_l2_qcow2_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(&dir, "x.qcow2", &["-o", "extended_l2=on"]);
    assert_open_refused(&qcow2(&path), &["extended L2"]);
}

#[test]
fn zstd_qcow2_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = qemu_qcow2(&dir, "z.qcow2", &["-o", "compression_type=zstd"]);
    assert_open_refused(&qcow2(&path), &["zstd"]);
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
    let host = NbdHost::Tcp {
        name: "localhost".into(),
        port: 10809,
    };
    nbd(format, host, tls)
}

#[test]
fn nbd_with_tls_is_refused() {
    let src = nbd_tcp(ImageFormat::Raw, Some(true));
    assert_open_refused(&src, &["TLS for NBD replicas is not supported yet"]);
}

#[test]
fn qcow2_over_nbd_is_refused() {
    assert_open_refused(
        &nbd_tcp(ImageFormat::Qcow2, None),
        &[
            "qcow2 over NBD is not supported; export the qcow2 with qemu-nbd -f qcow2 and declare it raw",
        ],
    );
}

#[test]
fn nbd_replicas_cannot_be_created() {
    let err = create(&nbd_tcp(ImageFormat::Raw, None), 1 << 20, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("network replicas can't be created"), "{err}");
}

/// A raw base of 1 MiB of 0x66 under a qcow2 top whose header names it by full path.
fn base_and_top(dir: &TempDir) -> (PathBuf, PathBuf) {
    let base_data = ["write -P 0x66 0 1M"];
    qemu_chain(dir, "raw", "1M", &base_data, BackingName::Absolute)
}

/// `base_and_top` with the base file then deleted.
fn top_missing_base(dir: &TempDir) -> (PathBuf, PathBuf) {
    let (base, top) = base_and_top(dir);
    std::fs::remove_file(&base).unwrap();
    (base, top)
}

/// `base_and_top` plus a 1 MiB `other.raw`; returns (base, other, top declared over other).
fn chain_over_other(dir: &TempDir) -> (PathBuf, PathBuf, StorageSource) {
    let (base, top) = base_and_top(dir);
    let other = path_in(dir, "other.raw");
    qemu_image(&other, "raw", &[], "1M", &[]);
    (base, other.clone(), over(&top, raw(&other)))
}

#[test]
fn xml_chain_differing_from_header_names_both() {
    let dir = TempDir::new().unwrap();
    let (base, other, chain) = chain_over_other(&dir);
    assert_open_refused(&chain, &[p(&base), p(&other)]);
}

#[test]
fn xml_chain_matches_header_through_a_relative_name() {
    let dir = TempDir::new().unwrap();
    let (base, top) = qemu_chain(&dir, "raw", "1M", &[], BackingName::Relative);
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
    let (base, top) = top_missing_base(&dir);
    assert_open_refused(&qcow2(&top), &[p(&base)]);
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
    assert_chain_problem(&over(&top, qcow2(&base)), &["format qcow2"]);
}

#[test]
fn probe_chain_reports_a_differing_backing_file() {
    let dir = TempDir::new().unwrap();
    let (_base, other, chain) = chain_over_other(&dir);
    assert_chain_problem(&chain, &[p(&other), "header names"]);
}

#[test]
fn probe_chain_reports_a_missing_header_backing_file() {
    let dir = TempDir::new().unwrap();
    let (base, top) = top_missing_base(&dir);
    assert_chain_problem(&qcow2(&top), &[p(&base)]);
}

#[test]
fn probe_reports_refusal_of_encrypted_image() {
    let dir = TempDir::new().unwrap();
    let info = probe(&qcow2(&encrypted_qcow2(&dir))).unwrap();
    assert!(info.refusal.unwrap().contains("encrypted"));
}
