//! Mutated qcow2 images opened read-write through quorum-replica, then
//! written, zeroed, discarded and flushed.
//!
//! Input: 32 bytes of operations (4 × `[kind, pattern, len u16 LE,
//! offset u32 LE]`), then the image file. Invariants:
//! - no panic (libfuzzer-sys aborts on a panic even inside `catch_unwind`),
//!   no hang (libFuzzer's `-timeout`);
//! - a replica fenced at open (corrupt layout) leaves the file byte for
//!   byte unchanged;
//! - an image that fails to open leaves the file unchanged, except that
//!   when the header has autoclear feature bits (88..96) set, the header
//!   cluster may be rewritten with them cleared (a writer must clear the
//!   bits it does not know; imago does so as it opens the image, before
//!   it reads the tables);
//! - the header fields qcow2 never lets a writer change (magic, version,
//!   backing file name, cluster bits, virtual size, encryption, snapshot
//!   table pointer, incompatible features, header length...) stay the same:
//!   only the L1 and refcount table fields (36..60), the compatible and
//!   autoclear feature bits (80..96) and where the backing file name is
//!   stored (8..16; a header rewrite moves it after the extensions) may
//!   change;
//! - when every operation and the flush succeeded, the image opens again
//!   and reads back what was written (a write that overwrote metadata and
//!   reported success fails this).
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use quorum_config::model::{Backing, ImageFormat, Source, StorageSource};
use quorum_replica::{OpenOptions, Qcow2Replica, Replica};

const OPS: usize = 4;
const OP_LEN: usize = 8;
/// Guest bytes tracked for the read-back check.
const WINDOW: u64 = 256 * 1024;

fn image_path() -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("quorum-fuzz-qcow2-{}.qcow2", std::process::id()))
}

fn source(path: PathBuf) -> StorageSource {
    StorageSource {
        index: None,
        format: ImageFormat::Qcow2,
        source: Source::File { path },
        // Never follow a backing file the mutated header names.
        backing: Backing::End,
    }
}

const OPTS: OpenOptions = OpenOptions {
    read_only: false,
    direct: false,
    no_locking: true,
    nbd_timeout: None,
};

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: u8,
    pattern: u8,
    len: u64,
    offset: u64,
}

fn ops(data: &[u8], window: u64) -> Vec<Op> {
    data.chunks_exact(OP_LEN)
        .map(|c| {
            let len = u64::from(u16::from_le_bytes([c[2], c[3]])) + 1;
            let len = len.min(window);
            let span = window - len + 1;
            Op {
                kind: c[0] % 5,
                pattern: c[1],
                len,
                offset: u64::from(u32::from_le_bytes([c[4], c[5], c[6], c[7]])) % span,
            }
        })
        .collect()
}

/// Header bytes no writer may change: everything in 0..104 (or the header
/// length) except the L1/refcount table fields and compat/autoclear bits.
fn frozen_header(file: &[u8]) -> Vec<u8> {
    let end = file.len().min(104);
    file[..end]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (8..16).contains(&i) || (36..60).contains(&i) || (80..96).contains(&i) {
                0
            } else {
                b
            }
        })
        .collect()
}

/// The backing file name the header points at (empty if none or unreadable).
fn backing_name(file: &[u8]) -> &[u8] {
    let off = u64::from_be_bytes(file[8..16].try_into().unwrap());
    let len = u64::from(u32::from_be_bytes(file[16..20].try_into().unwrap()));
    if off == 0 || len == 0 {
        return &[];
    }
    usize::try_from(off)
        .ok()
        .and_then(|o| file.get(o..o.checked_add(len as usize)?))
        .unwrap_or(&[])
}

/// The header cluster's size, or the whole file when the header's
/// cluster bits are out of range.
fn header_cluster(file: &[u8]) -> usize {
    let bits = u32::from_be_bytes(file[20..24].try_into().unwrap());
    if (9..=21).contains(&bits) {
        1 << bits
    } else {
        file.len()
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < OPS * OP_LEN + 72 {
        return;
    }
    let (op_bytes, image) = data.split_at(OPS * OP_LEN);
    let path = image_path();
    if std::env::var_os("QUORUM_FUZZ_KEEP_INPUT").is_some() {
        // A stack overflow kills the process before libFuzzer can save the
        // input: keep a copy of the whole input next to the image.
        std::fs::write(path.with_extension("input"), data).unwrap();
    }
    std::fs::write(&path, image).unwrap();
    let src = source(path.clone());

    let replica = match Qcow2Replica::open(&src, &OPTS) {
        Ok(r) => r,
        Err(_) => {
            let after = std::fs::read(&path).unwrap();
            if image.len() >= 96 && image[88..96] != [0; 8] {
                let cs = header_cluster(image);
                assert_eq!(frozen_header(&after), frozen_header(image));
                assert!(
                    after.get(cs..) == image.get(cs..),
                    "a failed open changed the file beyond the header cluster"
                );
            } else {
                assert!(after == image, "a failed open changed the file");
            }
            return;
        }
    };
    let fenced_at_open = replica.fenced().is_some();
    let window = replica.size().min(WINDOW);
    if window == 0 {
        return;
    }
    let mut model = vec![0u8; window as usize];
    let mut model_ok = replica.read_at(&mut model, 0).is_ok();

    let mut all_ok = true;
    for op in ops(op_bytes, window) {
        let range = op.offset as usize..(op.offset + op.len) as usize;
        let r = match op.kind {
            0 => {
                let buf = vec![op.pattern; op.len as usize];
                replica.write_at(&buf, op.offset, op.pattern & 1 == 1)
            }
            1 => replica.write_zeroes(op.offset, op.len, false, false),
            2 => replica.discard(op.offset, op.len),
            3 => replica.write_zeroes(op.offset, op.len, true, false),
            _ => replica.flush(),
        };
        match r {
            Ok(()) => match op.kind {
                0 => model[range].fill(op.pattern),
                1..=3 => model[range].fill(0),
                _ => {}
            },
            Err(_) => {
                all_ok = false;
                model_ok = false;
            }
        }
        // Reads must not panic either, whatever state the image is in.
        let mut buf = vec![0u8; op.len as usize];
        let _ = replica.read_at(&mut buf, op.offset);
        let _ = replica.block_status(op.offset, op.len);
    }
    all_ok &= replica.flush().is_ok();
    drop(replica);

    let after = std::fs::read(&path).unwrap();
    if fenced_at_open {
        assert!(after == image, "a replica fenced at open changed the file");
    }
    assert_eq!(
        frozen_header(&after),
        frozen_header(image),
        "a write changed header fields qcow2 keeps fixed"
    );
    assert!(
        backing_name(&after) == backing_name(image),
        "a write changed the backing file name"
    );
    if !(all_ok && model_ok) {
        return;
    }
    let again = Qcow2Replica::open(&src, &OPTS)
        .unwrap_or_else(|e| panic!("writes reported success, but the image no longer opens: {e}"));
    let mut back = vec![0u8; window as usize];
    again.read_at(&mut back, 0).unwrap();
    if let Some(i) = (0..model.len()).find(|&i| back[i] != model[i]) {
        panic!(
            "guest byte {i}: wrote {:#x}, read back {:#x} after reopening",
            model[i], back[i]
        );
    }
});
