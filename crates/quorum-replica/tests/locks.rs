//! OFD locks interoperate with QEMU's image locking, both ways.

mod common;

use std::path::PathBuf;

use common::*;
use quorum_replica::{OpenOptions, Replica, create, open};
use tempfile::TempDir;

/// A fresh 1 MiB qcow2 image made by us.
fn image(dir: &TempDir) -> PathBuf {
    let path = path_in(dir, "r1.qcow2");
    create(&qcow2(&path), 1 << 20, None).unwrap();
    path
}

/// `image`, opened here with `opts`; returns its path and the open replica.
fn held_image(dir: &TempDir, opts: &OpenOptions) -> (PathBuf, Box<dyn Replica>) {
    let path = image(dir);
    let held = open(&qcow2(&path), opts).unwrap();
    (path, held)
}

/// A fresh 1 MiB raw image made by us.
fn raw_image(dir: &TempDir) -> PathBuf {
    let path = path_in(dir, "r.raw");
    create(&raw(&path), 1 << 20, None).unwrap();
    path
}

#[test]
fn qemu_io_write_fails_while_we_hold_the_image_for_writing() {
    let dir = TempDir::new().unwrap();
    let (path, _held) = held_image(&dir, &RW);
    assert_qemu_io_write_locked_out("qcow2", &path);
}

#[test]
fn qemu_img_info_fails_while_we_hold_the_image_for_writing() {
    let dir = TempDir::new().unwrap();
    let (path, _held) = held_image(&dir, &RW);
    let out = run("qemu-img", &["info", p(&path)]);
    assert!(!out.status.success());
}

#[test]
fn qemu_img_info_coexists_with_a_read_only_open() {
    let dir = TempDir::new().unwrap();
    let (path, _held) = held_image(&dir, &RO);
    run_ok("qemu-img", &["info", p(&path)]);
}

#[test]
fn qemu_io_write_fails_while_we_hold_the_image_read_only() {
    let dir = TempDir::new().unwrap();
    let (path, _held) = held_image(&dir, &RO);
    assert_qemu_io_write_locked_out("qcow2", &path);
}

#[test]
fn two_read_only_opens_share_an_image() {
    let dir = TempDir::new().unwrap();
    let (path, _a) = held_image(&dir, &RO);
    open(&qcow2(&path), &RO).unwrap();
}

#[test]
fn second_writer_is_refused() {
    let dir = TempDir::new().unwrap();
    let (path, _a) = held_image(&dir, &RW);
    assert_locked(open(&qcow2(&path), &RW).unwrap_err());
}

#[test]
fn read_only_open_is_refused_while_we_write() {
    let dir = TempDir::new().unwrap();
    let (path, _a) = held_image(&dir, &RW);
    assert_locked(open(&qcow2(&path), &RO).unwrap_err());
}

#[test]
fn lock_is_released_when_the_replica_is_dropped() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir);
    drop(open(&qcow2(&path), &RW).unwrap());
    assert_qemu_io_ok("qcow2", &path, &["write 0 512"]);
}

#[test]
fn open_fails_naming_the_file_while_qemu_io_writes_it() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir);
    let _qemu = hold_with_qemu_io("qcow2", &path, false);
    let err = open(&qcow2(&path), &RW).unwrap_err().to_string();
    let expected = format!(
        "replica {} is locked by another process (is QEMU or another quorum using it?)",
        p(&path)
    );
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn read_only_open_fails_while_qemu_io_writes_it() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir);
    let _qemu = hold_with_qemu_io("qcow2", &path, false);
    assert_locked(open(&qcow2(&path), &RO).unwrap_err());
}

#[test]
fn read_only_open_coexists_with_read_only_qemu_io() {
    let dir = TempDir::new().unwrap();
    let path = image(&dir);
    let _qemu = hold_with_qemu_io("qcow2", &path, true);
    open(&qcow2(&path), &RO).unwrap();
}

#[test]
fn raw_open_fails_while_qemu_nbd_serves_it() {
    let dir = TempDir::new().unwrap();
    let path = raw_image(&dir);
    let _nbd = hold_with_qemu_nbd("raw", &path, &path_in(&dir, "nbd.sock"));
    assert_locked(open(&raw(&path), &RW).unwrap_err());
}

#[test]
fn qemu_nbd_fails_while_we_hold_a_raw_image() {
    let dir = TempDir::new().unwrap();
    let path = raw_image(&dir);
    let _held = open(&raw(&path), &RW).unwrap();
    let sock = path_in(&dir, "nbd.sock");
    let status = exit_status_within("qemu-nbd", &["-f", "raw", "-k", p(&sock), p(&path)]);
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
}

#[test]
fn backing_layer_is_locked_against_qemu_writers() {
    let dir = TempDir::new().unwrap();
    let (base, top) = (path_in(&dir, "base.raw"), path_in(&dir, "top.qcow2"));
    create(&raw(&base), 1 << 20, None).unwrap();
    create(&over(&top, raw(&base)), 1 << 20, None).unwrap();
    let _held = open(&over(&top, raw(&base)), &RW).unwrap();
    assert_qemu_io_write_locked_out("raw", &base);
}

#[test]
fn two_overlays_share_one_backing_layer() {
    let dir = TempDir::new().unwrap();
    let base = path_in(&dir, "base.raw");
    let (t1, t2) = (path_in(&dir, "t1.qcow2"), path_in(&dir, "t2.qcow2"));
    create(&raw(&base), 1 << 20, None).unwrap();
    create(&over(&t1, raw(&base)), 1 << 20, None).unwrap();
    create(&over(&t2, raw(&base)), 1 << 20, None).unwrap();
    let _a = open(&over(&t1, raw(&base)), &RW).unwrap();
    open(&over(&t2, raw(&base)), &RW).unwrap();
}
