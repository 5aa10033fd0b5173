//! qcow2 header validation and the image's metadata layout.
//!
//! Two levels of trouble, after what QEMU does with them:
//!
//! - [`validate_header`]: header fields QEMU refuses to open an image with
//!   (cluster size out of range, an L1 table too small for the virtual size,
//!   tables larger than QEMU allows, unaligned table offsets, no refcount
//!   table). `open` and `probe` both refuse these.
//! - [`Layout::read`]: where the metadata lives (header cluster, L1 table,
//!   refcount table and blocks, L2 tables, snapshot table and the snapshots'
//!   L1 tables), and the corruption `qemu-img check` reports about it:
//!   tables beyond the end of the file, tables overlapping each other or the
//!   header, metadata clusters with refcount 0, and active data clusters
//!   that lie beyond the file, on metadata, have refcount 0, or are shared
//!   without a refcount saying so (one pass over the active L2 tables).
//!   QEMU opens such images; so do we, but the replica refuses writes (see
//!   `Qcow2Replica`; imago then opens it read-only), and `validate --probe`
//!   reports it.
//!
//! [`Layout::overlap`] is the write-time check: a guest write that would
//! land on a host range holding metadata is refused, as QEMU's metadata
//! overlap check refuses it ("Preventing invalid write on metadata").

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::header::{Qcow2Header, Tables};

/// Largest active L1 table QEMU accepts, in bytes.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most internal snapshots QEMU accepts.
const MAX_SNAPSHOTS: u32 = 65536;
/// Bits 9..=55 of an L1 entry hold the L2 table offset.
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// An L2 entry whose cluster may be written in place (refcount 1).
const L2_COPIED: u64 = 1 << 63;
/// An L2 entry for a compressed cluster.
const L2_COMPRESSED: u64 = 1 << 62;
/// Bits 9..=63 of a refcount table entry hold the refcount block offset.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Check the header fields QEMU checks before it opens an image. The error
/// says what is wrong, in words.
pub(crate) fn validate_header(h: &Qcow2Header) -> Result<(), String> {
    let t = &h.tables;
    if !(9..=21).contains(&t.cluster_bits) {
        return Err(format!(
            "unsupported cluster size 2^{} (QEMU accepts 512 bytes to 2 MiB)",
            t.cluster_bits
        ));
    }
    let cs = 1u64 << t.cluster_bits;
    if h.version == 3 && t.header_len < 104 {
        return Err(format!("qcow2 header too short ({} bytes)", t.header_len));
    }
    if t.header_len > cs {
        return Err(format!(
            "qcow2 header ({} bytes) exceeds the cluster size ({cs})",
            t.header_len
        ));
    }
    if t.backing_len != 0 && t.backing_offset.saturating_add(u64::from(t.backing_len)) > cs {
        return Err("backing file name lies outside the first cluster".into());
    }
    if t.refcount_order > 6 {
        return Err(format!(
            "refcount width 2^{} bits is too large (at most 64)",
            t.refcount_order
        ));
    }
    if t.refcount_table_clusters == 0 {
        return Err("the image has no refcount table".into());
    }
    let reftable_bytes = u64::from(t.refcount_table_clusters) << t.cluster_bits;
    if reftable_bytes > MAX_REFTABLE_BYTES {
        return Err(format!(
            "refcount table too large ({reftable_bytes} bytes, QEMU allows {MAX_REFTABLE_BYTES})"
        ));
    }
    aligned(
        "refcount table",
        t.refcount_table_offset,
        cs,
        reftable_bytes,
    )?;
    if t.refcount_table_offset == 0 {
        return Err("refcount table at offset 0 (inside the header)".into());
    }
    let l1_bytes = u64::from(t.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(format!(
            "active L1 table too large ({} entries, QEMU allows {})",
            t.l1_size,
            MAX_L1_BYTES / 8
        ));
    }
    // One L1 entry maps cs / 8 clusters of cs bytes.
    let per_l1 = 1u128 << (2 * t.cluster_bits - 3);
    let needed = u128::from(h.size).div_ceil(per_l1);
    if u128::from(t.l1_size) < needed {
        return Err(format!(
            "L1 table is too small: {} entries, but a virtual size of {} bytes needs {needed}",
            t.l1_size, h.size
        ));
    }
    if t.l1_size != 0 {
        aligned("L1 table", t.l1_offset, cs, l1_bytes)?;
        if t.l1_offset == 0 {
            return Err("L1 table at offset 0 (inside the header)".into());
        }
    }
    if t.nb_snapshots > MAX_SNAPSHOTS {
        return Err(format!(
            "too many snapshots ({}, QEMU allows {MAX_SNAPSHOTS})",
            t.nb_snapshots
        ));
    }
    if t.nb_snapshots != 0 {
        aligned("snapshot table", t.snapshots_offset, cs, 0)?;
    }
    Ok(())
}

fn aligned(what: &str, offset: u64, cs: u64, len: u64) -> Result<(), String> {
    if !offset.is_multiple_of(cs) {
        return Err(format!(
            "{what} offset {offset:#x} is not aligned to a cluster"
        ));
    }
    if offset.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
        return Err(format!("{what} offset {offset:#x} is out of range"));
    }
    Ok(())
}

/// What a metadata range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Header,
    L1,
    RefTable,
    RefBlock,
    L2,
    Snapshots,
    SnapshotL1,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Header => "header",
            Kind::L1 => "active L1 table",
            Kind::RefTable => "refcount table",
            Kind::RefBlock => "refcount block",
            Kind::L2 => "active L2 table",
            Kind::Snapshots => "snapshot table",
            Kind::SnapshotL1 => "inactive L1 table",
        })
    }
}

/// One metadata range `[start, end)` of the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    pub start: u64,
    pub end: u64,
    pub kind: Kind,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {:#x}..{:#x}", self.kind, self.start, self.end)
    }
}

/// The metadata ranges of an image, sorted by start, and the corruption
/// found among them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layout {
    regions: Vec<Region>,
    /// What `qemu-img check` would call corruption, one line each (capped).
    pub corruption: Vec<String>,
}

/// Images whose file holds more clusters than this (16 TiB of 64 KiB
/// clusters) get no data-cluster scan at open (its bitmaps would take
/// more than 64 MiB).
const MAX_SCANNED_CLUSTERS: u64 = 1 << 28;

/// A fixed-size bit set over host cluster indices; indices outside it read
/// as set (so nothing beyond it is trusted).
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: u64) -> Self {
        Bits(vec![0; n.div_ceil(64) as usize])
    }

    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_none_or(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u64) {
        if let Some(w) = self.0.get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
        }
    }
}

/// At most this many corruption lines are kept.
const MAX_PROBLEMS: usize = 8;

/// Fill `buf` from `offset`; bytes past the end of the file stay zero.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(())
}

fn read_table(file: &File, offset: u64, entries: u64) -> io::Result<Vec<u64>> {
    let mut buf = vec![0u8; (entries * 8) as usize];
    read_at_most(file, &mut buf, offset)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect())
}

impl Layout {
    /// Read the metadata layout of the image in `file` (`file_len` bytes
    /// long), whose header passed [`validate_header`].
    ///
    /// With `counts`, also check the refcounts of the metadata clusters and
    /// scan the active L2 tables' data clusters (what `open` does); without,
    /// only the tables' places (cheap enough to redo after allocating writes).
    pub(crate) fn read(file: &File, file_len: u64, t: &Tables, counts: bool) -> io::Result<Layout> {
        let cs = 1u64 << t.cluster_bits;
        let mut regions = vec![Region {
            start: 0,
            end: cs,
            kind: Kind::Header,
        }];
        let mut corruption = Vec::new();
        let mut note = |msg: String| {
            if corruption.len() < MAX_PROBLEMS {
                corruption.push(msg);
            }
        };
        let end_of = |start: u64, len: u64| start.saturating_add(len);
        if t.l1_size != 0 {
            regions.push(Region {
                start: t.l1_offset,
                end: end_of(t.l1_offset, u64::from(t.l1_size) * 8),
                kind: Kind::L1,
            });
        }
        let reftable_entries = (u64::from(t.refcount_table_clusters) << t.cluster_bits) / 8;
        regions.push(Region {
            start: t.refcount_table_offset,
            end: end_of(t.refcount_table_offset, reftable_entries * 8),
            kind: Kind::RefTable,
        });
        // Tables that start beyond the file are not read: they hold nothing.
        let in_file = |off: u64| off < file_len;
        let mut tables: Vec<(Kind, u64, u64, u64)> = Vec::new(); // kind, offset, entries, mask
        if t.l1_size != 0 && in_file(t.l1_offset) {
            tables.push((Kind::L2, t.l1_offset, u64::from(t.l1_size), L1_OFFSET_MASK));
        }
        if in_file(t.refcount_table_offset) {
            tables.push((
                Kind::RefBlock,
                t.refcount_table_offset,
                reftable_entries,
                REFT_OFFSET_MASK,
            ));
        }
        if t.nb_snapshots != 0 {
            let (snap_end, snap_l1s) = read_snapshots(file, file_len, t, &mut note)?;
            regions.push(Region {
                start: t.snapshots_offset,
                end: snap_end,
                kind: Kind::Snapshots,
            });
            for (off, size) in snap_l1s {
                if !off.is_multiple_of(cs) {
                    note(format!("inactive L1 table offset {off:#x} is not aligned"));
                    continue;
                }
                regions.push(Region {
                    start: off,
                    end: end_of(off, size * 8),
                    kind: Kind::SnapshotL1,
                });
            }
        }
        for (kind, offset, entries, mask) in tables {
            for (i, e) in read_table(file, offset, entries)?.into_iter().enumerate() {
                let off = e & mask;
                if off == 0 {
                    continue;
                }
                if !off.is_multiple_of(cs) {
                    note(format!(
                        "{kind} offset {off:#x} (entry {i}) is not aligned to a cluster"
                    ));
                    continue;
                }
                regions.push(Region {
                    start: off,
                    end: end_of(off, cs),
                    kind,
                });
            }
        }
        // A table may end in the last, partly written cluster of the file.
        let file_end = file_len.div_ceil(cs).saturating_mul(cs);
        for r in &regions {
            if r.end > file_end {
                note(format!(
                    "{r} lies beyond the end of the file ({file_len} bytes)"
                ));
            }
        }
        // Every metadata cluster must be counted as used: an allocator that
        // thinks it free would hand it out (a missing refcount block is even
        // placed over the first cluster it covers, e.g. the header).
        if counts && in_file(t.refcount_table_offset) {
            let reftable = read_table(file, t.refcount_table_offset, reftable_entries)?;
            let mut refcounts = Refcounts::new(file, t, &reftable);
            // Host clusters in use so far (metadata, then active data).
            let clusters = file_end / cs;
            let scan_data = clusters <= MAX_SCANNED_CLUSTERS;
            let bits = if scan_data { clusters } else { 0 };
            let mut used = Bits::new(bits);
            let mut meta = Bits::new(bits);
            'regions: for r in &regions {
                if r.end > file_end {
                    continue;
                }
                let mut c = r.start / cs;
                while c * cs < r.end {
                    used.set(c);
                    meta.set(c);
                    if refcounts.get(c)? == 0 {
                        note(format!("cluster {c:#x} of the {r} has refcount 0"));
                        continue 'regions;
                    }
                    c += 1;
                }
            }
            // Data clusters of the active L2 tables (what `qemu-img check`
            // counts): inside the file, not metadata, counted, and not
            // shared unless their refcount says so. Compressed data may
            // share host clusters, so it is only checked for lying in the
            // file, off the metadata, in counted clusters.
            let l2s: Vec<u64> = regions
                .iter()
                .filter(|r| scan_data && r.kind == Kind::L2 && r.end <= file_end)
                .map(|r| r.start)
                .collect();
            let mut l2 = vec![0u8; cs as usize];
            for l2_off in l2s {
                read_at_most(file, &mut l2, l2_off)?;
                for (i, e) in l2.chunks_exact(8).enumerate() {
                    let e = u64::from_be_bytes(e.try_into().unwrap());
                    let at = || format!("L2 table at {l2_off:#x} entry {i}");
                    if e & L2_COMPRESSED != 0 {
                        // Compressed data: a byte range that may share host
                        // clusters with other compressed clusters.
                        let x = 62 - (t.cluster_bits - 8);
                        let off = e & ((1 << x) - 1);
                        let sectors = ((e & ((1 << 62) - 1)) >> x) + 1;
                        let end = (off & !511).saturating_add(sectors * 512);
                        if end > file_end {
                            note(format!(
                                "{}: compressed data at {off:#x} lies beyond the end of the file ({file_len} bytes)",
                                at()
                            ));
                            continue;
                        }
                        for c in off / cs..end.div_ceil(cs) {
                            if meta.get(c) {
                                note(format!(
                                    "{}: compressed data at {off:#x} overlaps metadata",
                                    at()
                                ));
                                break;
                            }
                            if refcounts.get(c)? == 0 {
                                note(format!(
                                    "{}: compressed data at {off:#x} has refcount 0",
                                    at()
                                ));
                                break;
                            }
                        }
                        continue;
                    }
                    let off = e & L1_OFFSET_MASK;
                    if off == 0 {
                        continue;
                    }
                    if !off.is_multiple_of(cs) {
                        note(format!("{}: data cluster {off:#x} is not aligned", at()));
                        continue;
                    }
                    let c = off / cs;
                    if off >= file_end {
                        note(format!(
                            "{}: data cluster {off:#x} lies beyond the end of the file ({file_len} bytes)",
                            at()
                        ));
                    } else {
                        let refcount = refcounts.get(c)?;
                        let copied = e & L2_COPIED != 0;
                        // Shared (with metadata or another guest cluster)
                        // is fine only for a counted, copy-on-write cluster.
                        let shared_badly = copied || refcount < 2;
                        if refcount == 0 {
                            note(format!("{}: data cluster {off:#x} has refcount 0", at()));
                        } else if meta.get(c) {
                            // Never sound, whatever the refcount says: `qemu-img
                            // check -r all` leaves such a cluster shared (refcount
                            // 2, copy on write), and a later discard or COW frees
                            // the metadata cluster while it is in use.
                            let r = regions
                                .iter()
                                .find(|r| r.start < off + cs && r.end > off)
                                .copied();
                            let what = r.map_or("metadata".to_string(), |r| r.to_string());
                            note(format!(
                                "{}: data cluster {off:#x} overlaps the {what}",
                                at()
                            ));
                        } else if used.get(c) && shared_badly {
                            note(format!(
                                "{}: data cluster {off:#x} is used twice, but its refcount is {refcount}",
                                at()
                            ));
                        } else if copied && refcount != 1 {
                            note(format!(
                                "{}: data cluster {off:#x} is marked unshared (COPIED), but its refcount is {refcount}",
                                at()
                            ));
                        }
                        used.set(c);
                    }
                }
            }
        }
        regions.sort_by_key(|r| (r.start, r.end));
        for w in regions.windows(2) {
            if w[1].start < w[0].end {
                note(format!("{} overlaps {}", w[1], w[0]));
            }
        }
        Ok(Layout {
            regions,
            corruption,
        })
    }

    /// The first metadata range that `[start, start + len)` overlaps.
    pub(crate) fn overlap(&self, start: u64, len: u64) -> Option<Region> {
        let end = start.saturating_add(len);
        // Regions may overlap each other (in corrupt images), so the one
        // ending latest before `start` is not enough: scan those that start
        // before `end`.
        let upto = self.regions.partition_point(|r| r.start < end);
        self.regions[..upto]
            .iter()
            .rev()
            .find(|r| r.end > start)
            .copied()
    }
}

/// Refcount lookups through the refcount table, one block read at a time.
struct Refcounts<'a> {
    file: &'a File,
    reftable: &'a [u64],
    cluster_bits: u32,
    order: u32,
    /// Refcount blocks read so far, by offset.
    blocks: HashMap<u64, Vec<u8>>,
}

impl<'a> Refcounts<'a> {
    fn new(file: &'a File, t: &Tables, reftable: &'a [u64]) -> Self {
        Refcounts {
            file,
            reftable,
            cluster_bits: t.cluster_bits,
            order: t.refcount_order,
            blocks: HashMap::new(),
        }
    }

    /// The refcount of host cluster `c` (0 when no refcount block covers it).
    fn get(&mut self, c: u64) -> io::Result<u64> {
        let cs = 1u64 << self.cluster_bits;
        // A block holds cs * 8 / 2^order entries.
        let per_block_bits = self.cluster_bits + 3 - self.order;
        let Some(&entry) = self.reftable.get((c >> per_block_bits) as usize) else {
            return Ok(0);
        };
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 || !off.is_multiple_of(cs) {
            return Ok(0);
        }
        if !self.blocks.contains_key(&off) {
            let mut buf = vec![0u8; cs as usize];
            read_at_most(self.file, &mut buf, off)?;
            self.blocks.insert(off, buf);
        }
        let block = &self.blocks[&off];
        let index = c & ((1 << per_block_bits) - 1);
        let bits = 1u64 << self.order;
        Ok(if bits < 8 {
            let byte = block[(index * bits / 8) as usize];
            u64::from(byte >> (index * bits % 8)) & ((1 << bits) - 1)
        } else {
            let width = (bits / 8) as usize;
            let at = index as usize * width;
            block[at..at + width]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        })
    }
}

/// Walk the snapshot table: its end, and each snapshot's L1 table.
fn read_snapshots(
    file: &File,
    file_len: u64,
    t: &Tables,
    note: &mut impl FnMut(String),
) -> io::Result<(u64, Vec<(u64, u64)>)> {
    let mut off = t.snapshots_offset;
    let mut l1s = Vec::new();
    for i in 0..t.nb_snapshots {
        let mut h = [0u8; 40];
        if off.saturating_add(40) > file_len {
            note(format!(
                "snapshot table entry {i} at {off:#x} lies beyond the end of the file"
            ));
            return Ok((off.saturating_add(40), l1s));
        }
        file.read_exact_at(&mut h, off)?;
        let l1_off = u64::from_be_bytes(h[0..8].try_into().unwrap());
        let l1_size = u64::from(u32::from_be_bytes(h[8..12].try_into().unwrap()));
        let id_len = u64::from(u16::from_be_bytes(h[12..14].try_into().unwrap()));
        let name_len = u64::from(u16::from_be_bytes(h[14..16].try_into().unwrap()));
        let extra = u64::from(u32::from_be_bytes(h[36..40].try_into().unwrap()));
        if l1_size * 8 > MAX_L1_BYTES {
            note(format!("snapshot {i}: inactive L1 table too large"));
        } else if l1_size != 0 {
            l1s.push((l1_off, l1_size));
        }
        off = off
            .saturating_add(40 + extra + id_len + name_len)
            .div_ceil(8)
            .saturating_mul(8);
    }
    Ok((off, l1s))
}
