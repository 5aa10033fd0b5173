//! Images we write are valid for QEMU, and images QEMU writes read back here.

mod common;

use common::*;
use quorum_config::model::{Backing, ImageFormat};
use quorum_replica::{OpenOptions, Replica, create, open};
use tempfile::TempDir;

fn read(r: &dyn Replica, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    r.read_at(&mut buf, off).unwrap();
    buf
}

fn write_pattern_and_close(src: &quorum_config::model::StorageSource) {
    let r = open(src, &OpenOptions::default()).unwrap();
    r.write_at(&[0xab; 65536], 1 << 20, false).unwrap();
    r.write_at(&[0xcd; 1000], 3000, false).unwrap();
    r.discard(2 << 20, 1 << 20).unwrap();
}

#[test]
fn qcow2_written_by_us_passes_qemu_img_check() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    create(&qcow2(&path), 8 << 20, None).unwrap();
    write_pattern_and_close(&qcow2(&path));
    run_ok("qemu-img", &["check", p(&path)]);
}

#[test]
fn qcow2_written_by_us_reads_back_in_qemu_io() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    create(&qcow2(&path), 8 << 20, None).unwrap();
    write_pattern_and_close(&qcow2(&path));
    let (ok, out) = qemu_io(
        "qcow2",
        &path,
        &[
            "read -P 0xab 1M 64k",
            "read -P 0xcd 3000 1000",
            "read -P 0 2M 1M",
        ],
    );
    assert!(ok, "{out}");
}

#[test]
fn raw_written_by_us_reads_back_in_qemu_io() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.raw");
    create(&raw(&path), 8 << 20, None).unwrap();
    write_pattern_and_close(&raw(&path));
    let (ok, out) = qemu_io(
        "raw",
        &path,
        &[
            "read -P 0xab 1M 64k",
            "read -P 0xcd 3000 1000",
            "read -P 0 2M 1M",
        ],
    );
    assert!(ok, "{out}");
}

#[test]
fn qcow2_over_raw_written_by_us_passes_check_and_reads_in_qemu_io() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.raw"), path_in(&dir, "top.qcow2"));
    run_ok("qemu-img", &["create", "-f", "raw", p(&base), "8M"]);
    qemu_io("raw", &base, &["write -P 0x11 0 8M"]);
    let chain = over(&top, layer(&base, ImageFormat::Raw, Backing::Unspecified));
    create(&chain, 8 << 20, None).unwrap();
    write_pattern_and_close(&chain);
    run_ok("qemu-img", &["check", p(&top)]);
    let (ok, out) = qemu_io(
        "qcow2",
        &top,
        &[
            "read -P 0x11 0 3000",
            "read -P 0xab 1M 64k",
            "read -P 0 2M 1M",
            "read -P 0x11 4M 1M",
        ],
    );
    assert!(ok, "{out}");
}

#[test]
fn create_writes_backing_file_and_format_into_header() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.raw"), path_in(&dir, "top.qcow2"));
    run_ok("qemu-img", &["create", "-f", "raw", p(&base), "1M"]);
    create(&over(&top, raw(&base)), 1 << 20, None).unwrap();
    let info = run_ok("qemu-img", &["info", "--output=json", p(&top)]);
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
    let info = run_ok("qemu-img", &["info", "--output=json", p(&path)]);
    assert!(info.contains("\"cluster-size\": 4096"), "{info}");
}

#[test]
fn qcow2_written_by_qemu_io_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", p(&path), "8M"]);
    qemu_io("qcow2", &path, &["write -P 0x42 12345 70000"]);
    let r = open(
        &qcow2(&path),
        &OpenOptions {
            read_only: true,
            direct: false,
            no_locking: false,
        },
    )
    .unwrap();
    assert_eq!(read(&*r, 12345, 70000), vec![0x42; 70000]);
}

#[test]
fn qcow2_v2_written_by_qemu_io_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "compat=0.10", p(&path), "8M"],
    );
    qemu_io("qcow2", &path, &["write -P 0x43 0 4096"]);
    let r = open(&qcow2(&path), &OpenOptions::default()).unwrap();
    assert_eq!(read(&*r, 0, 4096), vec![0x43; 4096]);
}

#[test]
fn qcow2_over_raw_written_by_qemu_io_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.raw"), path_in(&dir, "top.qcow2"));
    run_ok("qemu-img", &["create", "-f", "raw", p(&base), "4M"]);
    qemu_io("raw", &base, &["write -P 0x22 0 4M"]);
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
    qemu_io("qcow2", &top, &["write -P 0x33 1M 4096"]);
    let r = open(
        &over(&top, raw(&base)),
        &OpenOptions {
            read_only: true,
            direct: false,
            no_locking: false,
        },
    )
    .unwrap();
    let expected: Vec<u8> = [vec![0x22; 4096], vec![0x33; 4096], vec![0x22; 4096]].concat();
    assert_eq!(read(&*r, (1 << 20) - 4096, 3 * 4096), expected);
}

#[test]
fn compressed_image_from_qemu_img_convert_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let (src, dst) = (path_in(&dir, "src.raw"), path_in(&dir, "c.qcow2"));
    run_ok("qemu-img", &["create", "-f", "raw", p(&src), "4M"]);
    qemu_io("raw", &src, &["write -P 0x77 0 2M"]);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&src),
            p(&dst),
        ],
    );
    let r = open(
        &qcow2(&dst),
        &OpenOptions {
            read_only: true,
            direct: false,
            no_locking: false,
        },
    )
    .unwrap();
    assert_eq!(
        read(&*r, 0, 4 << 20),
        [vec![0x77; 2 << 20], vec![0; 2 << 20]].concat()
    );
}

#[test]
fn written_compressed_image_stays_valid_after_our_writes() {
    let dir = TempDir::new().unwrap();
    let (src, dst) = (path_in(&dir, "src.raw"), path_in(&dir, "c.qcow2"));
    run_ok("qemu-img", &["create", "-f", "raw", p(&src), "4M"]);
    qemu_io("raw", &src, &["write -P 0x77 0 2M"]);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&src),
            p(&dst),
        ],
    );
    write_pattern_and_close(&qcow2(&dst));
    run_ok("qemu-img", &["check", p(&dst)]);
}

#[test]
fn block_status_reports_qemu_zero_clusters_as_zero() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    run_ok("qemu-img", &["create", "-f", "qcow2", p(&path), "8M"]);
    qemu_io("qcow2", &path, &["write -P 1 0 1M", "write -z 0 64k"]);
    let r = open(
        &qcow2(&path),
        &OpenOptions {
            read_only: true,
            direct: false,
            no_locking: false,
        },
    )
    .unwrap();
    let ext = r.block_status(0, 65536).unwrap();
    assert!(ext[0].zero && !ext[0].hole, "{ext:?}");
}

#[test]
fn qcow2_over_qcow2_with_relative_header_name_reads_back_here() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.qcow2"), path_in(&dir, "top.qcow2"));
    run_ok("qemu-img", &["create", "-f", "qcow2", p(&base), "4M"]);
    qemu_io("qcow2", &base, &["write -P 0x44 0 4M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    qemu_io("qcow2", &top, &["write -P 0x55 0 4096"]);
    let r = open(
        &qcow2(&top),
        &OpenOptions {
            read_only: true,
            direct: false,
            no_locking: false,
        },
    )
    .unwrap();
    assert_eq!(
        read(&*r, 0, 8192),
        [vec![0x55; 4096], vec![0x44; 4096]].concat()
    );
}

#[test]
fn block_status_reports_backing_data_as_data() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.qcow2"), path_in(&dir, "top.qcow2"));
    run_ok("qemu-img", &["create", "-f", "qcow2", p(&base), "4M"]);
    qemu_io("qcow2", &base, &["write -P 0x44 0 1M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    let r = open(
        &qcow2(&top),
        &OpenOptions {
            read_only: true,
            direct: false,
            no_locking: false,
        },
    )
    .unwrap();
    let ext = r.block_status(0, 4 << 20).unwrap();
    let summary: Vec<(u64, bool)> = ext.iter().map(|e| (e.length, e.hole)).collect();
    assert_eq!(summary, vec![(1 << 20, false), (3 << 20, true)]);
}
