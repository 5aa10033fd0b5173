//! `Disk::read_with_region`: the page-cache region a server may send a read
//! from must belong to a replica whose copy won every block of the read.

mod common;

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;

use common::{disk, named};
use quorum_engine::{Disk, FileRegion};
use quorum_replica::{OpenOptions, RawReplica};
use tempfile::TempDir;

const SIZE: u64 = 1 << 20;
const BLOCK: usize = 4096;

struct Replicas {
    _dir: TempDir,
    paths: Vec<PathBuf>,
    disk: Disk,
}

/// Three raw replica files filled with 0x5a, voting at threshold 2.
fn three_raw() -> Replicas {
    let dir = TempDir::new().unwrap();
    let paths: Vec<PathBuf> = (1..=3)
        .map(|i| dir.path().join(format!("r{i}.raw")))
        .collect();
    let opts = OpenOptions {
        read_only: false,
        direct: false,
        no_locking: false,
        nbd_timeout: None,
        refuse_corrupt: false,
    };
    let replicas = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = std::fs::File::create(p).unwrap();
            f.write_all_at(&vec![0x5a; SIZE as usize], 0).unwrap();
            named(format!("replica-{i}"), RawReplica::open(p, &opts).unwrap())
        })
        .collect();
    let disk = disk(replicas, 2).unwrap();
    Replicas {
        _dir: dir,
        paths,
        disk,
    }
}

/// `three_raw` with block `b` of replica `i` corrupted for each `(i, b)`.
fn three_raw_corrupted(blocks: &[(usize, u64)]) -> Replicas {
    let r = three_raw();
    for &(i, block) in blocks {
        r.corrupt_block(i, block);
    }
    r
}

impl Replicas {
    /// Overwrite one block of replica `i` behind the engine's back.
    /// Each replica gets its own garbage, so two corrupt copies never agree.
    fn corrupt_block(&self, i: usize, block: u64) {
        let f = FsOpen::new().write(true).open(&self.paths[i]).unwrap();
        f.write_all_at(&[0xe0 + i as u8; BLOCK], block * BLOCK as u64)
            .unwrap();
    }

    /// Which replica file a region points into.
    fn replica_of(&self, region: &FileRegion) -> usize {
        let ino = region.file.metadata().unwrap().ino();
        let found = self
            .paths
            .iter()
            .position(|p| p.metadata().unwrap().ino() == ino);
        found.unwrap()
    }

    /// Read through the engine: the voted bytes and the region, if any.
    fn read(&self, offset: u64, len: usize) -> (Vec<u8>, Option<FileRegion>) {
        let mut buf = vec![0; len];
        let region = self.disk.read_with_region(offset, &mut buf).unwrap();
        (buf, region)
    }

    /// Which replica the region of a read points into; panics if there is none.
    fn region_replica(&self, offset: u64, len: usize) -> usize {
        let (_, region) = self.read(offset, len);
        self.replica_of(&region.unwrap())
    }
}

#[test]
fn unanimous_read_points_at_the_first_replica_at_the_same_offset() {
    let r = three_raw();
    let (_, region) = r.read(8192, 65536);
    let region = region.unwrap();
    assert_eq!((r.replica_of(&region), region.offset), (0, 8192));
}

#[test]
fn a_voted_out_replica_is_never_the_region() {
    let r = three_raw_corrupted(&[(0, 2)]);
    assert_eq!(r.region_replica(0, 65536), 1);
}

#[test]
fn region_holds_exactly_the_voted_bytes() {
    let r = three_raw_corrupted(&[(0, 2)]);
    let (voted, region) = r.read(0, 65536);
    let region = region.unwrap();
    let mut sent = vec![0; voted.len()];
    region.file.read_exact_at(&mut sent, region.offset).unwrap();
    assert_eq!(sent, voted);
}

#[test]
fn only_the_replica_that_won_every_block_qualifies() {
    let r = three_raw_corrupted(&[(0, 1), (1, 3)]);
    assert_eq!(r.region_replica(0, 65536), 2);
}

#[test]
fn no_region_when_every_replica_lost_some_block() {
    let r = three_raw_corrupted(&[(0, 1), (1, 3), (2, 5)]);
    let (voted, region) = r.read(0, 65536);
    assert_eq!((voted, region.is_none()), (vec![0x5a; 65536], true));
}

#[test]
fn read_without_quorum_fails_with_eio() {
    let r = three_raw_corrupted(&[(0, 0), (1, 0)]);
    let mut buf = vec![0; 4096];
    let err = r.disk.read_with_region(0, &mut buf).unwrap_err();
    assert_eq!(err.errno, libc::EIO);
}
