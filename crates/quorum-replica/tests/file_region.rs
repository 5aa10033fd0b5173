//! `Replica::file_region`: which backends let a server send bytes straight
//! from the page cache, and that the region holds exactly those bytes.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use quorum_config::model::StorageSource;
use quorum_replica::{OpenOptions, Replica, create, open};
use tempfile::TempDir;

const SIZE: u64 = 4 << 20;

fn opened(src: &StorageSource, direct: bool) -> Box<dyn Replica> {
    create(src, SIZE, None).unwrap();
    let opts = OpenOptions {
        read_only: false,
        direct,
        no_locking: false,
        nbd_timeout: None,
        refuse_corrupt: false,
    };
    open(src, &opts).unwrap()
}

#[test]
fn raw_region_holds_the_bytes_just_written() {
    let dir = TempDir::new().unwrap();
    let r = opened(&raw(&path_in(&dir, "r.raw")), false);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    r.write_at(&data, 12_345, false).unwrap();

    let region = r.file_region(12_345, data.len() as u64).unwrap();
    let mut back = vec![0; data.len()];
    region.file.read_exact_at(&mut back, region.offset).unwrap();

    assert_eq!(back, data);
}

#[test]
fn raw_region_past_the_end_is_none() {
    let dir = TempDir::new().unwrap();
    let r = opened(&raw(&path_in(&dir, "r.raw")), false);
    assert!(r.file_region(SIZE - 4096, 8192).is_none());
}

#[test]
fn direct_io_raw_has_no_region() {
    let dir = TempDir::new().unwrap();
    let r = opened(&raw(&path_in(&dir, "r.raw")), true);
    assert!(r.file_region(0, 4096).is_none());
}

#[test]
fn qcow2_has_no_region() {
    let dir = TempDir::new().unwrap();
    let r = opened(&qcow2(&path_in(&dir, "q.qcow2")), false);
    assert!(r.file_region(0, 4096).is_none());
}
