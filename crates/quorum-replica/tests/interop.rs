//! Images we write are valid for QEMU, and images QEMU writes read back here.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use quorum_config::model::StorageSource;
use quorum_replica::{OpenOptions, create, open};
use tempfile::TempDir;

/// `qemu-io` reads matching what `write_pattern_and_close` leaves.
const PATTERN_READS: &[&str] = &[
    "read -P 0xab 1M 64k",
    "read -P 0xcd 3000 1000",
    "read -P 0 2M 1M",
];

fn write_pattern_and_close(src: &StorageSource) {
    let r = open(src, &OpenOptions::default()).unwrap();
    r.write_at(&[0xab; 65536], 1 << 20, false).unwrap();
    r.write_at(&[0xcd; 1000], 3000, false).unwrap();
    r.discard(2 << 20, 1 << 20).unwrap();
}

/// An 8 MiB `dir/name`, created as `make` declares it, with the pattern written by us.
fn written_by_us(dir: &TempDir, name: &str, make: fn(&Path) -> StorageSource) -> PathBuf {
    let path = path_in(dir, name);
    create(&make(&path), 8 << 20, None).unwrap();
    write_pattern_and_close(&make(&path));
    path
}

/// Asserts that `qemu-img check` passes on the image.
fn assert_qemu_img_check_ok(path: &Path) {
    run_ok("qemu-img", &["check", p(path)]);
}

/// `qemu-img info --output=json` of the image.
fn qemu_img_info_json(path: &Path) -> String {
    run_ok("qemu-img", &["info", "--output=json", p(path)])
}

/// `dir/c.qcow2`, compressed by `qemu-img convert` from 4 MiB raw (2 MiB of 0x77).
fn compressed_by_qemu(dir: &TempDir) -> PathBuf {
    let (src, dst) = (path_in(dir, "src.raw"), path_in(dir, "c.qcow2"));
    qemu_image(&src, "raw", &[], "4M", &["write -P 0x77 0 2M"]);
    let args = [
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        p(&src),
        p(&dst),
    ];
    run_ok("qemu-img", &args);
    dst
}

/// Asserts that `src`, opened read-only here, holds `expected` at `off`.
fn assert_reads_back(src: &StorageSource, off: u64, expected: &[u8]) {
    assert_eq!(read(&*open_ro(src), off, expected.len()), expected);
}

#[test]
fn qcow2_written_by_us_passes_qemu_img_check() {
    let dir = TempDir::new().unwrap();
    assert_qemu_img_check_ok(&written_by_us(&dir, "a.qcow2", qcow2));
}

#[test]
fn qcow2_written_by_us_reads_back_in_qemu_io() {
    let dir = TempDir::new().unwrap();
    let path = written_by_us(&dir, "a.qcow2", qcow2);
    assert_qemu_io_ok("qcow2", &path, PATTERN_READS);
}

#[test]
fn raw_written_by_us_reads_back_in_qemu_io() {
    let dir = TempDir::new().unwrap();
    let path = written_by_us(&dir, "a.raw", raw);
    assert_qemu_io_ok("raw", &path, PATTERN_READS);
}

#[test]
fn qcow2_over_raw_written_by_us_passes_check_and_reads_in_qemu_io() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.raw"), path_in(&dir, "top.qcow2"));
    qemu_image(&base, "raw", &[], "8M", &["write -P 0x11 0 8M"]);
    let chain = over(&top, raw(&base));
    create(&chain, 8 << 20, None).unwrap();
    write_pattern_and_close(&chain);
    assert_qemu_img_check_ok(&top);
    let reads = [
        "read -P 0x11 0 3000",
        "read -P 0xab 1M 64k",
        "read -P 0 2M 1M",
        "read -P 0x11 4M 1M",
    ];
    assert_qemu_io_ok("qcow2", &top, &reads);
}

#[test]
fn create_writes_backing_file_and_format_into_header() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.raw"), path_in(&dir, "top.qcow2"));
    qemu_image(&base, "raw", &[], "1M", &[]);
    create(&over(&top, raw(&base)), 1 << 20, None).unwrap();
    let info = qemu_img_info_json(&top);
    assert!(
        info.contains(&format!("\"backing-filename\": \"{}\"", p(&base)))
            && info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
}

#[test]
fn create_honours_cluster_size() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    create(&qcow2(&path), 1 << 20, Some(4096)).unwrap();
    let info = qemu_img_info_json(&path);
    assert!(info.contains("\"cluster-size\": 4096"), "{info}");
}

#[test]
fn qcow2_written_by_qemu_io_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    qemu_image(&path, "qcow2", &[], "8M", &["write -P 0x42 12345 70000"]);
    assert_reads_back(&qcow2(&path), 12345, &[0x42; 70000]);
}

#[test]
fn qcow2_v2_written_by_qemu_io_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    let v2 = ["-o", "compat=0.10"];
    qemu_image(&path, "qcow2", &v2, "8M", &["write -P 0x43 0 4096"]);
    let r = open(&qcow2(&path), &OpenOptions::default()).unwrap();
    assert_eq!(read(&*r, 0, 4096), vec![0x43; 4096]);
}

#[test]
fn qcow2_over_raw_written_by_qemu_io_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let base_data = ["write -P 0x22 0 4M"];
    let (base, top) = qemu_chain(&dir, "raw", "4M", &base_data, BackingName::Absolute);
    qemu_io("qcow2", &top, &["write -P 0x33 1M 4096"]);
    let expected: Vec<u8> = [vec![0x22; 4096], vec![0x33; 4096], vec![0x22; 4096]].concat();
    assert_reads_back(&over(&top, raw(&base)), (1 << 20) - 4096, &expected);
}

#[test]
fn compressed_image_from_qemu_img_convert_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let expected = [vec![0x77; 2 << 20], vec![0; 2 << 20]].concat();
    assert_reads_back(&qcow2(&compressed_by_qemu(&dir)), 0, &expected);
}

#[test]
fn written_compressed_image_stays_valid_after_our_writes() {
    let dir = TempDir::new().unwrap();
    let dst = compressed_by_qemu(&dir);
    write_pattern_and_close(&qcow2(&dst));
    assert_qemu_img_check_ok(&dst);
}

#[test]
fn block_status_reports_qemu_zero_clusters_as_zero() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    let writes = ["write -P 1 0 1M", "write -z 0 64k"];
    qemu_image(&path, "qcow2", &[], "8M", &writes);
    let ext = open_ro(&qcow2(&path)).block_status(0, 65536).unwrap();
    assert!(ext[0].zero && !ext[0].hole, "{ext:?}");
}

#[test]
fn qcow2_over_qcow2_with_relative_header_name_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let base_data = ["write -P 0x44 0 4M"];
    let (_base, top) = qemu_chain(&dir, "qcow2", "4M", &base_data, BackingName::Relative);
    qemu_io("qcow2", &top, &["write -P 0x55 0 4096"]);
    let expected = [vec![0x55; 4096], vec![0x44; 4096]].concat();
    assert_reads_back(&qcow2(&top), 0, &expected);
}

#[test]
fn block_status_reports_backing_data_as_data() {
    let dir = TempDir::new().unwrap();
    let base_data = ["write -P 0x44 0 1M"];
    let (_base, top) = qemu_chain(&dir, "qcow2", "4M", &base_data, BackingName::Absolute);
    let ext = open_ro(&qcow2(&top)).block_status(0, 4 << 20).unwrap();
    let summary: Vec<(u64, bool)> = ext.iter().map(|e| (e.length, e.hole)).collect();
    assert_eq!(summary, vec![(1 << 20, false), (3 << 20, true)]);
}
