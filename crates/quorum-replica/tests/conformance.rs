//! One suite, run against every backend through `&dyn Replica`.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use quorum_config::model::StorageSource;
use quorum_replica::testing::MemReplica;
use quorum_replica::{ErrorKind, OpenOptions, Replica, create, open};
use tempfile::TempDir;

const SIZE: u64 = 4 << 20;

/// A backend under test, plus what its untouched areas look like.
struct Fixture {
    replica: Arc<dyn Replica>,
    /// Untouched ranges are holes (false when a backing file has data).
    fresh_is_hole: bool,
    /// A server process (NBD backends), killed after the replica closes.
    _server: Option<ChildGuard>,
    _dir: Option<TempDir>,
}

impl Fixture {
    /// A replica on files in `dir`, whose untouched areas are holes.
    fn in_dir(replica: Box<dyn Replica>, dir: TempDir) -> Self {
        Fixture {
            replica: replica.into(),
            fresh_is_hole: true,
            _server: None,
            _dir: Some(dir),
        }
    }
}

/// A fresh image at `name` as `make` declares it, opened read-write.
fn fresh_file(name: &str, make: fn(&Path) -> StorageSource, direct: bool) -> Fixture {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, name);
    create(&make(&path), SIZE, None).unwrap();
    let replica = open(&make(&path), &rw(direct)).unwrap();
    Fixture::in_dir(replica, dir)
}

fn raw_file(direct: bool) -> Fixture {
    fresh_file("r.raw", raw, direct)
}

fn qcow2_file(direct: bool) -> Fixture {
    fresh_file("q.qcow2", qcow2, direct)
}

fn qcow2_over_raw() -> Fixture {
    let dir = TempDir::new().unwrap();
    let base = path_in(&dir, "base.raw");
    let top = path_in(&dir, "top.qcow2");
    let size = SIZE.to_string();
    qemu_image(&base, "raw", &[], &size, &["write -P 0x5a 0 4M"]);
    let chain = over(&top, raw(&base));
    create(&chain, SIZE, None).unwrap();
    let replica = open(&chain, &OpenOptions::default()).unwrap();
    Fixture {
        fresh_is_hole: false,
        ..Fixture::in_dir(replica, dir)
    }
}

fn mem() -> Fixture {
    Fixture {
        replica: Arc::new(MemReplica::new(SIZE)),
        fresh_is_hole: true,
        _server: None,
        _dir: None,
    }
}

/// A raw file behind a real `qemu-nbd`, reached through the NBD client.
fn nbd_over_qemu_nbd() -> Fixture {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "n.raw");
    let socket = path_in(&dir, "nbd.sock");
    create(&raw(&path), SIZE, None).unwrap();
    let server = serve_qemu_nbd(&path, &socket);
    let replica = open(&nbd_unix(&socket), &OpenOptions::default()).unwrap();
    Fixture {
        _server: Some(server),
        ..Fixture::in_dir(replica, dir)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn size_is_declared(f: Fixture) {
    assert_eq!(f.replica.size(), SIZE);
}

fn read_after_unaligned_write(f: Fixture) {
    let data = pattern(10_000, 7);
    f.replica.write_at(&data, 70_001, false).unwrap();
    assert_eq!(read(&*f.replica, 70_001, data.len()), data);
}

fn fua_write_reads_back(f: Fixture) {
    let data = pattern(4096, 3);
    f.replica.write_at(&data, 8192, true).unwrap();
    assert_eq!(read(&*f.replica, 8192, 4096), data);
}

fn read_past_end_is_out_of_range(f: Fixture) {
    let mut buf = vec![0u8; 4096];
    let err = f.replica.read_at(&mut buf, SIZE - 100).unwrap_err();
    assert_eq!(err.kind, ErrorKind::OutOfRange);
}

fn write_past_end_is_out_of_range(f: Fixture) {
    let err = f.replica.write_at(&[1u8; 512], SIZE, false).unwrap_err();
    assert_eq!(err.kind, ErrorKind::OutOfRange);
}

/// Asserts that zeroes written over data (with these flags) read back as zeroes.
fn assert_write_zeroes_reads_zeroes(f: Fixture, may_unmap: bool, fua: bool) {
    f.replica.write_at(&pattern(300_000, 1), 0, false).unwrap();
    f.replica
        .write_zeroes(1000, 200_000, may_unmap, fua)
        .unwrap();
    assert_eq!(read(&*f.replica, 1000, 200_000), vec![0u8; 200_000]);
}

fn write_zeroes_reads_zeroes(f: Fixture) {
    assert_write_zeroes_reads_zeroes(f, false, false);
}

fn write_zeroes_unmap_reads_zeroes(f: Fixture) {
    assert_write_zeroes_reads_zeroes(f, true, true);
}

fn write_zeroes_keeps_neighbours(f: Fixture) {
    let data = pattern(300_000, 1);
    f.replica.write_at(&data, 0, false).unwrap();
    f.replica.write_zeroes(1000, 200_000, true, false).unwrap();
    assert_eq!(read(&*f.replica, 201_000, 99_000), data[201_000..].to_vec());
}

fn discard_reads_zeroes(f: Fixture) {
    f.replica.write_at(&pattern(1 << 20, 9), 0, false).unwrap();
    f.replica.discard(4096, 512 * 1024).unwrap();
    assert_eq!(read(&*f.replica, 4096, 512 * 1024), vec![0u8; 512 * 1024]);
}

fn flush_succeeds(f: Fixture) {
    f.replica.write_at(&[1u8; 4096], 0, false).unwrap();
    f.replica.flush().unwrap();
}

/// Block status of `off..off + len` after 64 KiB of data is written at 1 MiB.
fn status_after_write(f: &Fixture, off: u64, len: u64) -> Vec<quorum_replica::Extent> {
    f.replica
        .write_at(&pattern(65536, 2), 1 << 20, false)
        .unwrap();
    f.replica.block_status(off, len).unwrap()
}

fn block_status_covers_range(f: Fixture) {
    let ext = status_after_write(&f, 0, SIZE);
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), SIZE);
}

fn block_status_reports_written_data(f: Fixture) {
    let ext = status_after_write(&f, 1 << 20, 65536);
    assert!(!ext[0].hole && !ext[0].zero, "{ext:?}");
}

fn block_status_reports_fresh_holes(f: Fixture) {
    let ext = f.replica.block_status(2 << 20, 1 << 20).unwrap();
    assert_eq!(
        (ext[0].hole, ext[0].zero),
        (f.fresh_is_hole, f.fresh_is_hole),
        "{ext:?}"
    );
}

fn concurrent_disjoint_writes(f: Fixture) {
    let chunk = 64 * 1024 + 17;
    std::thread::scope(|s| {
        for t in 0..8u8 {
            let r = Arc::clone(&f.replica);
            s.spawn(move || {
                for i in 0..4u64 {
                    let off = (u64::from(t) * 4 + i) * chunk as u64;
                    r.write_at(&pattern(chunk, t * 4 + i as u8), off, false)
                        .unwrap();
                }
            });
        }
    });
    let all = read(&*f.replica, 0, 32 * chunk);
    let expected: Vec<u8> = (0..32u8).flat_map(|k| pattern(chunk, k)).collect();
    assert!(all == expected, "concurrent writes interfered");
}

fn concurrent_reads_during_discard(f: Fixture) {
    let data = pattern(1 << 20, 4);
    f.replica.write_at(&data, 0, false).unwrap();
    std::thread::scope(|s| {
        let r = Arc::clone(&f.replica);
        s.spawn(move || {
            for i in 0..16u64 {
                r.discard((2 << 20) + i * 65536, 65536).unwrap();
            }
        });
        for _ in 0..4 {
            let r = Arc::clone(&f.replica);
            let data = &data;
            s.spawn(move || {
                for _ in 0..16 {
                    assert!(read(&*r, 0, 1 << 20) == *data);
                }
            });
        }
    });
}

/// One module of tests per backend, each running the same-named check on `$make`.
macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        conformance!(
            @cases $backend, $make,
            size_is_declared,
            read_after_unaligned_write,
            fua_write_reads_back,
            read_past_end_is_out_of_range,
            write_past_end_is_out_of_range,
            write_zeroes_reads_zeroes,
            write_zeroes_unmap_reads_zeroes,
            write_zeroes_keeps_neighbours,
            discard_reads_zeroes,
            flush_succeeds,
            block_status_covers_range,
            block_status_reports_written_data,
            block_status_reports_fresh_holes,
            concurrent_disjoint_writes,
            concurrent_reads_during_discard
        );
    };
    (@cases $backend:ident, $make:expr, $($case:ident),*) => {
        mod $backend {
            use super::*;
            $(
                #[test]
                fn $case() {
                    super::$case($make)
                }
            )*
        }
    };
}

conformance!(raw_backend, raw_file(false));
conformance!(raw_direct_backend, raw_file(true));
conformance!(qcow2_backend, qcow2_file(false));
conformance!(qcow2_direct_backend, qcow2_file(true));
conformance!(qcow2_over_raw_backend, qcow2_over_raw());
conformance!(mem_backend, mem());
conformance!(nbd_backend, nbd_over_qemu_nbd());
