//! The patched imago (patches/imago, see PATCHED.md) on its own, without
//! quorum's checks in front of it: its refcount allocator must not recurse
//! without end on a corrupt image.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions};
use tempfile::TempDir;

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn imago_rw(path: &Path) -> FormatAccess<ImagoFile> {
    let opts = StorageOpenOptions::new().filename(path).write(true);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let storage = ImagoFile::from_open_file(file, opts).unwrap();
    let q = Qcow2::<ImagoFile>::builder(storage)
        .write(true)
        .open(DenyImplicitOpenGate::default())
        .unwrap();
    FormatAccess::new(q)
}

/// Opens `path` in imago, makes an allocating write at `offset`, and
/// checks that it fails without touching the file (header included).
fn allocating_write_fails_cleanly(path: &Path, offset: u64) {
    let before = std::fs::read(path).unwrap();
    let image = imago_rw(path);
    let buf = vec![0x22u8; 4096];
    // Unpatched imago either recurses until the stack overflows (the test
    // binary aborts) or writes a refcount block over the header.
    let err = image.write(&buf[..], offset).unwrap_err();
    assert!(
        err.to_string().contains("refcount structures are corrupt"),
        "{err}"
    );
    let _ = image.flush();
    drop(image);
    assert!(std::fs::read(path).unwrap() == before, "the file changed");
}

#[test]
fn refcount_table_beyond_eof_fails_the_write_instead_of_overwriting_the_header() {
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "a.qcow2");
    qemu_image(&path, "qcow2", &[], "64M", &[]);
    poke(&path, 48, &0x4000_0000u64.to_be_bytes());
    allocating_write_fails_cleanly(&path, 1 << 20);
}

#[test]
fn missing_first_refcount_block_fails_the_write_instead_of_recursing() {
    // Found by the qcow2_open_write fuzz target: 4 KiB clusters, data at
    // 8 KiB, refcount table entry 0 cleared.
    let dir = TempDir::new().unwrap();
    let path = path_in(&dir, "b.qcow2");
    qemu_image(
        &path,
        "qcow2",
        &["-o", "cluster_size=4096"],
        "4M",
        &["write -P 0x33 8k 8k"],
    );
    poke(&path, 0x1000, &0u64.to_be_bytes());
    allocating_write_fails_cleanly(&path, 0x20000);
}
