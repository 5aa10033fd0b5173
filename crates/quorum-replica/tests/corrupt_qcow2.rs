//! Corrupt qcow2 images, built with `qemu-img create` plus byte edits, and
//! what QEMU (qemu-io, qemu-img check) and quorum do with them: quorum must
//! refuse what QEMU refuses at open, fail what QEMU fails at write time, and
//! never write into the image's metadata.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use quorum_config::model::ImageFormat;
use quorum_replica::{ErrorKind, OpenError, OpenOptions, Replica, open, probe_chain};
use tempfile::TempDir;

const CLUSTER: u64 = 65536;
// Where `qemu-img create -f qcow2 x 64M` puts things (cluster_size 64 KiB).
const REFTABLE: u64 = 0x10000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;

/// `qemu-img create -f qcow2 <name> 64M` with 64 KiB at 0 written (0x11),
/// so the image has an L2 table at 0x40000 and a data cluster at 0x50000.
fn image(dir: &TempDir, name: &str) -> PathBuf {
    let path = path_in(dir, name);
    qemu_image(&path, "qcow2", &[], "64M", &["write -P 0x11 0 64k"]);
    assert_eq!(
        be64(&path, L1),
        0x8000_0000_0000_0000 | L2,
        "layout changed"
    );
    path
}

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn peek(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

fn be64(path: &Path, off: u64) -> u64 {
    u64::from_be_bytes(peek(path, off, 8).try_into().unwrap())
}

/// A copy of `path` for QEMU to try (QEMU may damage it further).
fn qemu_copy(path: &Path) -> PathBuf {
    let copy = path.with_extension("qemu.qcow2");
    std::fs::copy(path, &copy).unwrap();
    copy
}

/// qemu-io with a time limit; (success, combined output).
fn qemu_io_bounded(path: &Path, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["60", "qemu-io", "-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p(path));
    let out = run("timeout", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `qemu-img check`: (exit code, output). 2 means corruption found.
fn qemu_img_check(path: &Path) -> (Option<i32>, String) {
    let out = run("timeout", &["60", "qemu-img", "check", p(path)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn open_rw(path: &Path) -> Result<Box<dyn Replica>, OpenError> {
    open(&qcow2(path), &rw(false))
}

fn assert_eio(r: quorum_replica::Result<()>, needles: &[&str]) {
    let e = r.expect_err("the write must fail");
    assert_eq!(e.kind, ErrorKind::Io(libc::EIO), "{e}");
    let text = e.to_string();
    assert!(needles.iter().all(|n| text.contains(n)), "{text}");
}

#[test]
fn refcount_table_beyond_eof_fails_writes_only_like_qemu_and_leaves_the_file_alone() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "a.qcow2");
    poke(&path, 48, &0x4000_0000u64.to_be_bytes());
    let (len, header) = (
        std::fs::metadata(&path).unwrap().len(),
        peek(&path, 0, 4096),
    );

    // QEMU: qemu-img check calls it corruption; qemu-io opens the image,
    // reads, and fails the first allocating write.
    let (code, text) = qemu_img_check(&path);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("exceeding the end of the file"), "{text}");
    let (ok, text) = qemu_io_bounded(
        &qemu_copy(&path),
        &["read -P 0x11 0 64k", "write -P 0x22 1M 64k"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("read 65536/65536 bytes at offset 0"),
        "{text}"
    );
    assert!(text.contains("write failed: Input/output error"), "{text}");

    // quorum: opens it, reads, fails every write with EIO naming the
    // replica, the problem and the repair; the file is untouched.
    let r = open_rw(&path).unwrap();
    assert_eq!(read(&*r, 0, 65536), vec![0x11; 65536]);
    let needles = [
        p(&path),
        "refcount table at 0x40000000",
        "beyond the end of the file",
        "qemu-img check -r all",
    ];
    assert_eio(r.write_at(&[0x22; 65536], 1 << 20, false), &needles);
    assert_eio(r.write_at(&[0x22; 512], 0, true), &needles);
    assert_eio(r.write_zeroes(1 << 20, 65536, false, false), &needles);
    assert_eio(r.discard(0, 65536), &needles);
    r.flush().unwrap();
    drop(r);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert_eq!(peek(&path, 0, 4096), header);

    // validate --probe reports it.
    let problems = probe_chain(&qcow2(&path));
    assert!(
        problems
            .iter()
            .any(|m| m.contains("refcount table at 0x40000000") && m.contains("qemu-img check")),
        "{problems:?}"
    );
}

#[test]
fn write_onto_an_l2_table_is_refused_like_qemu_and_the_image_stays_openable() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "b.qcow2");
    // L2 entry 0 (guest cluster 0) now points at the L2 table itself.
    poke(&path, L2, &(0x8000_0000_0000_0000u64 | L2).to_be_bytes());
    let l2_before = peek(&path, L2, CLUSTER as usize);

    // QEMU opens it and refuses the write onto metadata.
    let (code, text) = qemu_img_check(&path);
    assert_eq!(code, Some(2), "{text}");
    let (ok, text) = qemu_io_bounded(&qemu_copy(&path), &["write -P 0xab 0 4k"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("write failed: Input/output error")
            && text.contains("Preventing invalid write on metadata"),
        "{text}"
    );

    // quorum finds it at open (as `qemu-img check` does) and refuses the
    // write, and every later one (QEMU marks the image corrupt and stops
    // too); reads still work.
    let r = open_rw(&path).unwrap();
    let needles = [
        p(&path),
        "data cluster 0x40000 overlaps the active L2 table at 0x40000..0x50000",
        "qemu-img check -r all",
    ];
    assert_eio(r.write_at(&[0xab; 4096], 0, false), &needles);
    assert_eio(r.write_at(&[0xcd; 4096], 1 << 20, false), &needles);
    assert_eq!(read(&*r, 1 << 20, 4096), vec![0; 4096]);
    drop(r);
    assert_eq!(peek(&path, L2, CLUSTER as usize), l2_before);

    // The image still opens. `qemu-img check -r all` only makes the
    // cluster shared (refcount 2), which QEMU then accepts; quorum still
    // refuses writes (a discard would free the L2 table in use), and
    // `qemu-img convert` gives an image it takes.
    drop(open_rw(&path).unwrap());
    run_ok("qemu-img", &["check", "-r", "all", p(&path)]);
    let r = open_rw(&path).unwrap();
    assert_eio(
        r.write_at(&[0xab; 4096], 0, true),
        &["overlaps the active L2 table", "qemu-img convert"],
    );
    drop(r);
    let copy = path_in(&dir, "b2.qcow2");
    run_ok("qemu-img", &["convert", "-O", "qcow2", p(&path), p(&copy)]);
    let r = open_rw(&copy).unwrap();
    r.write_at(&[0xab; 4096], 0, true).unwrap();
    assert_eq!(read(&*r, 0, 4096), vec![0xab; 4096]);
}

#[test]
fn compressed_cluster_beyond_eof_is_corruption() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "z.qcow2");
    qemu_image(&path, "qcow2", &[], "64M", &["write -c -P 0x11 0 64k"]);
    let e = be64(&path, L2);
    assert_eq!(e >> 62, 1, "not compressed: {e:#x}");
    // Same size, host offset 64 GiB (offset bits 0..54 for 64 KiB clusters).
    let bent = (e & !((1u64 << 54) - 1)) | (1 << 36);
    poke(&path, L2, &bent.to_be_bytes());
    let before = std::fs::read(&path).unwrap();

    let (code, text) = qemu_img_check(&path);
    assert_eq!(code, Some(2), "{text}");

    let r = open_rw(&path).unwrap();
    assert_eio(
        r.write_at(&[0x22; 4096], 0, false),
        &[
            p(&path),
            "compressed data at 0x1000000000 lies beyond the end of the file",
        ],
    );
    drop(r);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn l1_table_of_size_zero_is_refused_at_open_like_qemu() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "c.qcow2");
    poke(&path, 36, &0u32.to_be_bytes());

    let (ok, text) = qemu_io_bounded(&path, &["read 0 4k"]);
    assert!(!ok, "{text}");
    assert!(text.contains("L1 table is too small"), "{text}");

    let err = open_rw(&path).unwrap_err().to_string();
    assert!(
        err.contains(p(&path)) && err.contains("L1 table is too small"),
        "{err}"
    );
    let err = open(
        &qcow2(&path),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("L1 table is too small"), "{err}");
}

#[test]
fn tables_overlapping_each_other_are_corruption_and_writes_are_refused() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "d.qcow2");
    // The L1 table moved onto the refcount table's cluster.
    poke(&path, 40, &REFTABLE.to_be_bytes());
    let before = std::fs::read(&path).unwrap();

    let (code, text) = qemu_img_check(&path);
    assert_eq!(code, Some(2), "{text}");

    let r = open_rw(&path).unwrap();
    assert_eio(
        r.write_at(&[1; 512], 0, true),
        &[p(&path), "overlaps", "refcount table", "active L1 table"],
    );
    drop(r);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn l2_table_beyond_eof_is_corruption() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "e.qcow2");
    poke(
        &path,
        L1,
        &(0x8000_0000_0000_0000u64 | 0x1_0000_0000).to_be_bytes(),
    );

    let (code, text) = qemu_img_check(&path);
    assert_eq!(code, Some(2), "{text}");

    let r = open_rw(&path).unwrap();
    assert_eio(
        r.write_at(&[1; 512], 8 << 20, false),
        &[
            "active L2 table at 0x100000000",
            "beyond the end of the file",
        ],
    );
}

#[test]
fn an_l2_entry_corrupted_after_open_is_caught_by_the_write_time_overlap_check() {
    // The image is sound at open; the L2 entry is bent onto the L2 table
    // underneath the open replica, before imago first loads that table.
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "g.qcow2");
    let r = open_rw(&path).unwrap();
    poke(&path, L2, &(0x8000_0000_0000_0000u64 | L2).to_be_bytes());
    let l2_before = peek(&path, L2, CLUSTER as usize);

    assert_eio(
        r.write_at(&[0xab; 4096], 0, false),
        &[
            p(&path),
            "preventing invalid write on qcow2 metadata",
            "active L2 table at 0x40000..0x50000",
            "qemu-img check -r all",
        ],
    );
    assert_eio(
        r.write_at(&[0xcd; 4096], 1 << 20, false),
        &["preventing invalid write"],
    );
    drop(r);
    assert_eq!(peek(&path, L2, CLUSTER as usize), l2_before);
}

#[test]
fn data_cluster_with_refcount_zero_is_corruption_found_at_open() {
    // `qemu-img check`: "ERROR cluster 5 refcount=0 reference=1". QEMU
    // opens it, hands cluster 5 out again for the next L2 table, then
    // refuses the guest write that would overwrite that table.
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "f.qcow2");
    qemu_image(&path, "qcow2", &[], "2G", &["write -P 0x11 0 64k"]);
    assert_eq!(be64(&path, L2), 0x8000_0000_0000_0000 | 0x50000);
    poke(&path, 0x20000 + 5 * 2, &[0, 0]);
    let before = std::fs::read(&path).unwrap();

    let (code, text) = qemu_img_check(&path);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("refcount=0 reference=1"), "{text}");
    let (ok, text) = qemu_io_bounded(
        &qemu_copy(&path),
        &["write -P 0x22 1G 4k", "flush", "write -P 0x33 0 4k"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("Preventing invalid write on metadata (overlaps with active L2 table)"),
        "{text}"
    );

    // quorum refuses writes from the start: the guest data at 0 survives.
    let r = open_rw(&path).unwrap();
    assert_eio(
        r.write_at(&[0x22; 4096], 1 << 30, false),
        &[
            p(&path),
            "data cluster 0x50000 has refcount 0",
            "qemu-img check -r all",
        ],
    );
    assert_eq!(read(&*r, 0, 65536), vec![0x11; 65536]);
    drop(r);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn metadata_allocated_after_open_is_guarded_too() {
    // Sound at open; then cluster 0x50000 (guest data at 0) loses its
    // refcount underneath the replica, so the next L2 table is allocated
    // on top of it. After the flush re-reads the layout, the write to guest
    // offset 0, which would overwrite that L2 table, is refused.
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "h.qcow2");
    qemu_image(&path, "qcow2", &[], "2G", &["write -P 0x11 0 64k"]);
    let r = open_rw(&path).unwrap();
    poke(&path, 0x20000 + 5 * 2, &[0, 0]);

    r.write_at(&[0x22; 4096], 1 << 30, false).unwrap();
    assert_eq!(be64(&path, L1 + 16) & !(1 << 63), 0x50000, "not reused");
    r.flush().unwrap();
    assert_eio(r.write_at(&[0x33; 4096], 0, false), &[p(&path), "0x50000"]);
    assert_eq!(read(&*r, 1 << 30, 4096), vec![0x22; 4096]);
    drop(r);
    // The new L2 table was not overwritten: 1 GiB still reads back.
    assert_ne!(peek(&path, 0x50000, 8), vec![0x33; 8]);
    let r = open(
        &qcow2(&path),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(read(&*r, 1 << 30, 4096), vec![0x22; 4096]);
}

#[test]
fn raw_declared_file_with_qcow2_magic_is_a_format_mismatch() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir, "q.qcow2");
    let err = open(
        &layer(
            &path,
            ImageFormat::Raw,
            quorum_config::model::Backing::Unspecified,
        ),
        &rw(false),
    )
    .unwrap_err();
    assert!(matches!(err, OpenError::FormatMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(p(&path))
            && text.contains("the XML says format raw")
            && text.contains("qcow2"),
        "{text}"
    );
}
