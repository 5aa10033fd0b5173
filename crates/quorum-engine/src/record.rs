//! The disk's persistent record: write intent, each replica's missed
//! chunks, its state and identity. One small file per disk.
//!
//! ```text
//!   0      4 KiB   header slot A  ┐ written alternately, each with a sequence
//!   4 KiB  4 KiB   header slot B  ┘ number and a checksum; the valid one with
//!                                   the higher sequence is current
//!   8 KiB  ...     dirty-region bitmap pages (1 bit per region, 4 MiB)
//!          ...     unknown-region bitmap pages (1 bit per region: not yet
//!                  compared since the record was started afresh)
//!          ...     missed-chunk bitmap pages of replica 0, 1, ... (1 bit per
//!                  chunk, 64 KiB)
//! ```
//!
//! A bitmap page is an 8-byte checksum (xxh3 of the page's bits, seeded
//! with the page's place in the file) and 4088 bytes of bits. A page that
//! reads all zero (never written; the file is sparse) is empty. A page
//! whose checksum does not match (a torn or corrupt write) reads as all
//! ones: every region or chunk it covers is treated as dirty or missed,
//! never trusted.
//!
//! Durability, in the order the engine relies on:
//! - **intent**: a region's dirty bit is written and `fdatasync`ed before
//!   any write to the region reaches a replica ([`Record::sync`] commits
//!   every page changed so far; concurrent writers share one sync);
//! - **missed**: a replica's missed bits are synced before the write that
//!   missed it is acknowledged;
//! - **clearing** (dirty after a flush of every replica, missed after the
//!   chunk was copied and flushed) is written without a sync of its own: a
//!   clear lost in a crash only makes work that is redone;
//! - **header** (states, identities, clean flag): written to the slot not
//!   in use, then `fdatasync`ed, so a torn header write leaves the other.
//!
//! Membership changes on a running disk (`Disk::replace_replica`,
//! `remove_replica`, `add_replica`) are written before the replicas
//! change, each step made durable before the next:
//!
//! | change  | 1. bitmap pages, `fdatasync`     | 2. header, `fdatasync`                     | then, in memory        |
//! |---------|----------------------------------|--------------------------------------------|------------------------|
//! | replace | every chunk of the slot missed   | state `new`, the new replica's identity    | swap the replica       |
//! | remove  | every chunk of the slot missed   | state removed (5), identity 0              | empty the slot         |
//! | add     | every chunk missed (a slot that is reused), or a new map appended after the last (growth) | state `new`, identity; with growth the header counts one more replica | fill the slot |
//!
//! A crash after step 1 leaves bits set that only cost a rebuild; after
//! step 2 the record already says what the disk became. A replica whose
//! slot says removed or new comes back rebuilt in full, never trusted.
//! While a new replica is rebuilt the record keeps it `new` (not
//! `resyncing`), so a restart resumes a rebuild as one.
//!
//! The missed maps are last in the file, in replica order: growing by one
//! replica appends a map where nothing lay, and the header (the commit
//! point, written after the map is synced) is what counts it; a header
//! counting fewer replicas ignores what lies beyond its maps. So growth
//! needs no new file and no new format version: a version 2 reader sees
//! an ordinary record. A record that lists more replicas than the disk
//! has is used when every one past the disk's count is removed or new
//! (they are then forgotten): the configuration was saved without the
//! last replica after removing it, or not yet saved with a replica that
//! was being added when the daemon stopped.
//!
//! The file is locked (`flock`, exclusive) for as long as it is open, so
//! two daemons, or a daemon and `quorum check`, never share it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const MAGIC: &[u8; 8] = b"QUORUMS1";
const VERSION: u32 = 2;
const SLOT: u64 = 4096;
const PAGE: usize = 4096;
const PAGE_BITS: u64 = ((PAGE - 8) * 8) as u64;
const HEADER_FIXED: usize = 56;
const REPLICA_ENTRY: usize = 24;
/// The most replicas a header can list.
const MAX_ENTRIES: usize = quorum_vote::MAX_REPLICAS;

/// A replica's state byte in the record when its slot was removed from the
/// disk (not a `ReplicaState`: an older reader takes it for stale, which is
/// not trusted either).
pub const STATE_REMOVED: u8 = 5;

/// What the record says of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaEntry {
    /// Its state when last written (see `membership::ReplicaState`).
    pub state: u8,
    /// Bumped every time the disk is opened with this replica in it.
    pub generation: u64,
    /// A hash of what identifies the replica (device and inode of a file,
    /// the URI of an export): another file at the same path differs.
    pub identity: u64,
}

/// The header: geometry, clean flag and replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header sequence number (which slot is current).
    pub seq: u64,
    /// Virtual disk size.
    pub size: u64,
    /// Bytes per dirty bit.
    pub region: u64,
    /// Bytes per missed bit.
    pub chunk: u64,
    /// The last daemon stopped cleanly (no dirty region left).
    pub clean: bool,
    /// The record was started afresh and some regions are still unknown
    /// (not yet compared by majority since); cleared once none is left.
    pub compare_only: bool,
    /// Per replica, in disk order.
    pub replicas: Vec<ReplicaEntry>,
}

/// Why a record could not be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file could not be created, read or written.
    #[error("state file {path}: {what}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the file.
    #[error(
        "state file {0} is locked by another process: is the disk already served (or checked)? Stop that process first"
    )]
    Locked(PathBuf),
}

/// Why an existing record was not trusted (it is then started afresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Distrust {
    /// There was no file.
    Missing,
    /// Neither header slot is valid.
    Corrupt(String),
    /// It describes another geometry (size, granularity, replica count).
    Mismatch(String),
}

impl std::fmt::Display for Distrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Distrust::Missing => f.write_str("it does not exist"),
            Distrust::Corrupt(why) => write!(f, "it is corrupt ({why})"),
            Distrust::Mismatch(why) => write!(f, "it describes another disk ({why})"),
        }
    }
}

/// A bitmap kept in memory and in pages of the file.
#[derive(Debug)]
struct Bitmap {
    /// File offset of the first page.
    base: u64,
    bits: Vec<u64>,
    len: u64,
    /// Pages changed since the last write-out.
    changed: Vec<bool>,
}

impl Bitmap {
    fn new(base: u64, len: u64) -> Bitmap {
        let pages = len.div_ceil(PAGE_BITS).max(1) as usize;
        Bitmap {
            base,
            bits: vec![0; len.div_ceil(64) as usize],
            len,
            changed: vec![false; pages],
        }
    }

    fn pages(&self) -> usize {
        self.changed.len()
    }

    fn bytes(&self) -> u64 {
        self.pages() as u64 * PAGE as u64
    }

    /// Bit `i`; false past the end.
    fn get(&self, i: u64) -> bool {
        i < self.len && self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Set or clear bit `i`; true if it changed. Nothing past the end.
    fn put(&mut self, i: u64, on: bool) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.bits[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        if (*w & m != 0) == on {
            return false;
        }
        if on {
            *w |= m;
        } else {
            *w &= !m;
        }
        self.changed[(i / PAGE_BITS) as usize] = true;
        true
    }

    fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn set_all(&mut self) {
        for i in 0..self.len {
            self.put(i, true);
        }
    }

    /// Page `p` as written to the file.
    fn encode(&self, p: usize) -> Vec<u8> {
        let mut page = vec![0u8; PAGE];
        let first = p as u64 * PAGE_BITS;
        for k in 0..PAGE_BITS.min(self.len.saturating_sub(first)) {
            if self.get(first + k) {
                page[8 + (k / 8) as usize] |= 1 << (k % 8);
            }
        }
        let sum = xxh3_64_with_seed(&page[8..], self.base + p as u64 * PAGE as u64);
        page[..8].copy_from_slice(&sum.to_le_bytes());
        page
    }

    /// Load page `p` from `page`; false if its checksum failed (it then
    /// reads as all ones).
    fn decode(&mut self, p: usize, page: &[u8]) -> bool {
        let first = p as u64 * PAGE_BITS;
        let n = PAGE_BITS.min(self.len.saturating_sub(first));
        let zero = page.iter().all(|&b| b == 0);
        let sum = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
        let ok = zero || sum == xxh3_64_with_seed(&page[8..], self.base + p as u64 * PAGE as u64);
        for k in 0..n {
            let on = !ok || page[8 + (k / 8) as usize] & (1 << (k % 8)) != 0;
            let w = &mut self.bits[((first + k) / 64) as usize];
            if on {
                *w |= 1 << ((first + k) % 64);
            }
        }
        ok
    }
}

/// The record, open and locked.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    file: File,
    inner: Mutex<Inner>,
    /// Serialises write-out + fdatasync (group commit).
    sync: Mutex<u64>,
    /// The version the last sync made durable, readable without the lock:
    /// a writer whose bits are already durable does not queue behind a
    /// sync in progress.
    synced: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Inner {
    header: Header,
    dirty: Bitmap,
    /// Regions not compared since the record was started afresh: they are
    /// compared by majority only, never made equal by a guess.
    unknown: Bitmap,
    missed: Vec<Bitmap>,
    /// Bumped by every change; `sync` writes out up to a value of it.
    version: u64,
}

/// What opening a record found.
#[derive(Debug)]
pub struct Opened {
    /// The record (started afresh when `distrust` is set).
    pub record: Record,
    /// Why the old record was not used, if it was not.
    pub distrust: Option<Distrust>,
    /// Bitmap pages that failed their checksum (read as all ones).
    pub bad_pages: usize,
    /// The header as found (before this open changed anything).
    pub previous: Option<Header>,
}

impl Record {
    /// Open or create the record at `path` for a disk of `size` bytes and
    /// `replicas` replicas, locked. An old record that cannot be trusted is
    /// replaced by one whose every region is dirty and every replica
    /// unknown (identity 0), which means a full comparison of the replicas.
    pub fn open(
        path: &Path,
        size: u64,
        region: u64,
        chunk: u64,
        replicas: usize,
    ) -> Result<Opened, RecordError> {
        Record::open_mode(path, size, region, chunk, replicas, false)
            .map(|o| o.expect("a writable open always gives a record"))
    }

    /// Open an existing record to read it only, with a shared lock (other
    /// readers may hold it too, a writer may not). `None` when there is no
    /// record or it cannot be trusted: nothing is created or changed.
    pub fn open_read_only(
        path: &Path,
        size: u64,
        region: u64,
        chunk: u64,
        replicas: usize,
    ) -> Result<Option<Opened>, RecordError> {
        if !path.exists() {
            return Ok(None);
        }
        Record::open_mode(path, size, region, chunk, replicas, true)
    }

    fn open_mode(
        path: &Path,
        size: u64,
        region: u64,
        chunk: u64,
        replicas: usize,
        read_only: bool,
    ) -> Result<Option<Opened>, RecordError> {
        let io_err = |what: &str, source: io::Error| RecordError::Io {
            path: path.to_owned(),
            what: what.to_owned(),
            source,
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !read_only
        {
            std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create its folder", e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(!read_only)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err("cannot open", e))?;
        let mode = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(RecordError::Locked(path.to_owned()));
            }
            return Err(io_err("cannot lock", e));
        }
        let len = file.metadata().map_err(|e| io_err("cannot stat", e))?.len();
        let found = if len == 0 {
            Err(Distrust::Missing)
        } else {
            read_header(&file).map_err(Distrust::Corrupt)
        };
        let want_dirty = size.div_ceil(region);
        let want_missed = size.div_ceil(chunk);
        let found = found.and_then(|h| {
            if h.size != size || h.region != region || h.chunk != chunk {
                Err(Distrust::Mismatch(format!(
                    "size {} / region {} / chunk {}, expected {size} / {region} / {chunk}",
                    h.size, h.region, h.chunk
                )))
            } else if h.replicas.len() < replicas
                || h.replicas[replicas..].iter().any(|e| !holds_nothing(e))
            {
                Err(Distrust::Mismatch(format!(
                    "{} replicas, expected {replicas}",
                    h.replicas.len()
                )))
            } else {
                Ok(h)
            }
        });
        let mut dirty = Bitmap::new(2 * SLOT, want_dirty);
        let mut unknown = Bitmap::new(2 * SLOT + dirty.bytes(), want_dirty);
        let mut base = unknown.base + unknown.bytes();
        let mut missed = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            let b = Bitmap::new(base, want_missed);
            base += b.bytes();
            missed.push(b);
        }
        let (header, distrust, bad_pages, previous) = match found {
            Ok(h) => {
                let mut bad = 0;
                for map in [&mut dirty, &mut unknown]
                    .into_iter()
                    .chain(missed.iter_mut())
                {
                    bad += load_pages(&file, map).map_err(|e| io_err("cannot read", e))?;
                }
                // Replicas past the disk's count, that hold nothing it
                // relies on, are forgotten.
                let mut current = h.clone();
                current.replicas.truncate(replicas);
                (current, None, bad, Some(h))
            }
            Err(_) if read_only => return Ok(None),
            Err(why) => {
                // Start afresh: everything to compare, nothing known.
                file.set_len(0).map_err(|e| io_err("cannot truncate", e))?;
                unknown.set_all();
                let h = Header {
                    seq: 0,
                    size,
                    region,
                    chunk,
                    clean: false,
                    compare_only: true,
                    replicas: vec![ReplicaEntry::default(); replicas],
                };
                (h, Some(why), 0, None)
            }
        };
        let record = Record {
            path: path.to_owned(),
            file,
            inner: Mutex::new(Inner {
                header,
                dirty,
                unknown,
                missed,
                version: 1,
            }),
            sync: Mutex::new(0),
            synced: std::sync::atomic::AtomicU64::new(0),
        };
        if distrust.is_some() {
            record.sync()?;
            record.write_header(|_| {})?;
        }
        Ok(Some(Opened {
            record,
            distrust,
            bad_pages,
            previous,
        }))
    }

    /// Where the record lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current header.
    pub fn header(&self) -> Header {
        self.inner.lock().header.clone()
    }

    /// Change the header and write it durably to the slot not in use.
    pub fn write_header(&self, f: impl FnOnce(&mut Header)) -> Result<(), RecordError> {
        let _g = self.sync.lock();
        self.write_header_locked(f)
    }

    /// [`Record::write_header`], with the sync lock held.
    fn write_header_locked(&self, f: impl FnOnce(&mut Header)) -> Result<(), RecordError> {
        let (slot, bytes) = {
            let mut inner = self.inner.lock();
            f(&mut inner.header);
            inner.header.seq += 1;
            (inner.header.seq % 2, encode_header(&inner.header))
        };
        self.file
            .write_all_at(&bytes, slot * SLOT)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.io("cannot write the header", e))
    }

    /// Append one replica, `entry`, with every chunk missed (a replica
    /// added to a running disk, to rebuild in full); returns its index.
    /// Its missed map goes after the last one and is synced before the
    /// header that counts it is written (see the module doc): a crash in
    /// between leaves the record as it was.
    pub fn grow(&self, entry: ReplicaEntry) -> Result<usize, RecordError> {
        let _g = self.sync.lock();
        let (i, pages) = {
            let mut inner = self.inner.lock();
            let i = inner.missed.len();
            if i >= MAX_ENTRIES || inner.header.replicas.len() != i {
                return Err(self.io(
                    "cannot list one more replica",
                    io::Error::other(format!("it lists {i}, the most is {MAX_ENTRIES}")),
                ));
            }
            let base = match inner.missed.last() {
                Some(m) => m.base + m.bytes(),
                None => inner.unknown.base + inner.unknown.bytes(),
            };
            let mut map = Bitmap::new(base, inner.header.size.div_ceil(inner.header.chunk));
            map.set_all();
            let pages: Vec<(u64, Vec<u8>)> = (0..map.pages())
                .map(|p| (map.base + (p * PAGE) as u64, map.encode(p)))
                .collect();
            map.changed.fill(false);
            inner.missed.push(map);
            (i, pages)
        };
        let written = pages
            .iter()
            .try_for_each(|(at, bytes)| self.file.write_all_at(bytes, *at))
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.inner.lock().missed.pop();
            return Err(self.io("cannot write a new replica's missed chunks", e));
        }
        let res = self.write_header_locked(|h| h.replicas.push(entry));
        if res.is_err() {
            let mut inner = self.inner.lock();
            inner.missed.pop();
            inner.header.replicas.truncate(i);
        }
        res.map(|()| i)
    }

    /// Replicas the record lists.
    pub fn replica_count(&self) -> usize {
        self.inner.lock().missed.len()
    }

    fn io(&self, what: &str, source: io::Error) -> RecordError {
        RecordError::Io {
            path: self.path.clone(),
            what: what.to_owned(),
            source,
        }
    }

    /// Regions (dirty bits) in the disk.
    pub fn regions(&self) -> u64 {
        self.inner.lock().dirty.len
    }

    /// Chunks (missed bits) per replica.
    pub fn chunks(&self) -> u64 {
        self.inner.lock().missed.first().map_or(0, |m| m.len)
    }

    /// Set dirty bits for `regions`; true if any was new (then [`sync`]
    /// before writing).
    ///
    /// [`sync`]: Record::sync
    pub fn mark_dirty(&self, regions: std::ops::Range<u64>) -> bool {
        let mut inner = self.inner.lock();
        let mut new = false;
        for r in regions {
            new |= inner.dirty.put(r, true);
        }
        if new {
            inner.version += 1;
        }
        new
    }

    /// Clear the dirty bit of region `r` (written out with the next sync).
    pub fn clear_dirty(&self, r: u64) {
        let mut inner = self.inner.lock();
        if inner.dirty.put(r, false) {
            inner.version += 1;
        }
    }

    /// Is region `r` dirty?
    pub fn is_dirty(&self, r: u64) -> bool {
        self.inner.lock().dirty.get(r)
    }

    /// Is region `r` unknown (not compared since a fresh start)?
    pub fn is_unknown(&self, r: u64) -> bool {
        self.inner.lock().unknown.get(r)
    }

    /// Region `r` has been compared (written out with the next sync).
    pub fn clear_unknown(&self, r: u64) {
        let mut inner = self.inner.lock();
        if inner.unknown.put(r, false) {
            inner.version += 1;
        }
    }

    /// Unknown regions.
    pub fn unknown_count(&self) -> u64 {
        self.inner.lock().unknown.count()
    }

    /// Every region that is dirty or unknown: to settle before use.
    pub fn unsettled_regions(&self) -> Vec<u64> {
        let inner = self.inner.lock();
        (0..inner.dirty.len)
            .filter(|&r| inner.dirty.get(r) || inner.unknown.get(r))
            .collect()
    }

    /// Every dirty region.
    pub fn dirty_regions(&self) -> Vec<u64> {
        let inner = self.inner.lock();
        (0..inner.dirty.len)
            .filter(|&r| inner.dirty.get(r))
            .collect()
    }

    /// Set replica `i`'s missed bits for `chunks`; true if any was new.
    pub fn mark_missed(&self, i: usize, chunks: std::ops::Range<u64>) -> bool {
        let mut inner = self.inner.lock();
        let mut new = false;
        for c in chunks {
            new |= inner.missed[i].put(c, true);
        }
        if new {
            inner.version += 1;
        }
        new
    }

    /// Mark every chunk of replica `i` missed (a replica to rebuild).
    pub fn mark_all_missed(&self, i: usize) {
        let mut inner = self.inner.lock();
        inner.missed[i].set_all();
        inner.version += 1;
    }

    /// Clear replica `i`'s missed bit for chunk `c`.
    pub fn clear_missed(&self, i: usize, c: u64) {
        let mut inner = self.inner.lock();
        if inner.missed[i].put(c, false) {
            inner.version += 1;
        }
    }

    /// Has replica `i` missed anything in `chunks`?
    pub fn missed_any(&self, i: usize, chunks: std::ops::Range<u64>) -> bool {
        let inner = self.inner.lock();
        chunks.into_iter().any(|c| inner.missed[i].get(c))
    }

    /// Replica `i`'s first missed chunk at or after `from`.
    pub fn next_missed(&self, i: usize, from: u64) -> Option<u64> {
        let inner = self.inner.lock();
        let map = &inner.missed[i];
        let mut c = from;
        while c < map.len {
            let w = map.bits[(c / 64) as usize] >> (c % 64);
            if w != 0 {
                let at = c + u64::from(w.trailing_zeros());
                return (at < map.len).then_some(at);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    /// Missed chunks of replica `i`.
    pub fn missed_count(&self, i: usize) -> u64 {
        self.inner.lock().missed[i].count()
    }

    /// Dirty regions.
    pub fn dirty_count(&self) -> u64 {
        self.inner.lock().dirty.count()
    }

    /// Write out every page changed so far and `fdatasync`. Concurrent
    /// callers share a sync: one that finds its changes already synced by
    /// another returns at once.
    pub fn sync(&self) -> Result<(), RecordError> {
        let want = self.inner.lock().version;
        if self.synced.load(std::sync::atomic::Ordering::Acquire) >= want {
            return Ok(());
        }
        let mut synced = self.sync.lock();
        if *synced >= want {
            return Ok(());
        }
        let (pages, version) = {
            let mut inner = self.inner.lock();
            let version = inner.version;
            let mut pages: Vec<(u64, Vec<u8>)> = Vec::new();
            let Inner {
                dirty,
                unknown,
                missed,
                ..
            } = &mut *inner;
            for map in [dirty, unknown].into_iter().chain(missed.iter_mut()) {
                for p in 0..map.pages() {
                    if std::mem::take(&mut map.changed[p]) {
                        pages.push((map.base + (p * PAGE) as u64, map.encode(p)));
                    }
                }
            }
            (pages, version)
        };
        for (at, bytes) in &pages {
            self.file
                .write_all_at(bytes, *at)
                .map_err(|e| self.io("cannot write a bitmap page", e))?;
        }
        self.file
            .sync_data()
            .map_err(|e| self.io("cannot sync", e))?;
        *synced = version;
        self.synced
            .store(version, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

/// Record that the replicas at `indices` were made anew (empty, beside
/// replicas that hold data): every chunk is missed on them and their state
/// is new, so they never vote before they are rebuilt. Opens (or starts)
/// the record at `path` with its lock, for a disk of `size` bytes.
pub fn mark_new(
    path: &Path,
    size: u64,
    region: u64,
    chunk: u64,
    replicas: usize,
    indices: &[usize],
) -> Result<(), RecordError> {
    let o = Record::open(path, size, region, chunk, replicas)?;
    for &i in indices {
        o.record.mark_all_missed(i);
    }
    o.record.sync()?;
    o.record.write_header(|h| {
        for &i in indices {
            h.replicas[i].state = crate::ReplicaState::New as u8;
            // Whatever file the record knew there is gone.
            h.replicas[i].identity = 0;
        }
    })
}

/// A replica the disk relies on for nothing: removed, or added and not
/// yet rebuilt. A record listing such replicas past the disk's own is
/// still the disk's (they are forgotten).
fn holds_nothing(e: &ReplicaEntry) -> bool {
    e.state == STATE_REMOVED || e.state == crate::ReplicaState::New as u8
}

/// What [`inspect`] finds in a record, read without taking its lock (a
/// running daemon holds it): a snapshot, for `quorum status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// The current header.
    pub header: Header,
    /// Dirty regions.
    pub dirty_regions: u64,
    /// Regions not compared yet since the record was started afresh.
    pub unknown_regions: u64,
    /// Missed chunks per replica.
    pub missed_chunks: Vec<u64>,
    /// Bitmap pages that failed their checksum (counted as all set).
    pub bad_pages: usize,
    /// Another process holds the record's lock (a daemon serves the disk).
    pub in_use: bool,
}

/// Read the record at `path` without locking or changing it. `Err` says
/// why it cannot be trusted (missing, corrupt): a daemon would start a
/// full comparison.
pub fn inspect(path: &Path) -> Result<Inspection, Distrust> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Distrust::Missing),
        Err(e) => return Err(Distrust::Corrupt(format!("cannot open: {e}"))),
    };
    let header = read_header(&file).map_err(Distrust::Corrupt)?;
    // SAFETY: flock on a descriptor we own; a shared try-lock, released at once.
    let in_use = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0;
    if !in_use {
        // SAFETY: as above.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    }
    let regions = header.size.div_ceil(header.region);
    let mut dirty = Bitmap::new(2 * SLOT, regions);
    let mut unknown = Bitmap::new(2 * SLOT + dirty.bytes(), regions);
    let mut base = unknown.base + unknown.bytes();
    let mut bad = load_pages(&file, &mut dirty).map_err(|e| Distrust::Corrupt(e.to_string()))?;
    bad += load_pages(&file, &mut unknown).map_err(|e| Distrust::Corrupt(e.to_string()))?;
    let mut missed_chunks = Vec::with_capacity(header.replicas.len());
    for _ in 0..header.replicas.len() {
        let mut m = Bitmap::new(base, header.size.div_ceil(header.chunk));
        base += m.bytes();
        bad += load_pages(&file, &mut m).map_err(|e| Distrust::Corrupt(e.to_string()))?;
        missed_chunks.push(m.count());
    }
    Ok(Inspection {
        dirty_regions: dirty.count(),
        unknown_regions: unknown.count(),
        missed_chunks,
        bad_pages: bad,
        in_use,
        header,
    })
}

fn load_pages(file: &File, map: &mut Bitmap) -> io::Result<usize> {
    let mut bad = 0;
    let mut page = vec![0u8; PAGE];
    for p in 0..map.pages() {
        page.fill(0);
        let at = map.base + (p * PAGE) as u64;
        // A short file is a sparse one: what is missing reads as zeroes.
        let mut done = 0;
        while done < PAGE {
            match file.read_at(&mut page[done..], at + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        if !map.decode(p, &page) {
            bad += 1;
        }
    }
    Ok(bad)
}

fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; SLOT as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    // 12..16: checksum length; 16..24: checksum, filled below.
    b[24..32].copy_from_slice(&h.seq.to_le_bytes());
    b[32..40].copy_from_slice(&h.size.to_le_bytes());
    b[40..48].copy_from_slice(&h.region.to_le_bytes());
    b[48..52].copy_from_slice(&(h.chunk as u32).to_le_bytes());
    b[52] = u8::from(h.clean);
    b[53] = h.replicas.len() as u8;
    b[54] = u8::from(h.compare_only);
    for (i, r) in h.replicas.iter().enumerate() {
        let at = HEADER_FIXED + i * REPLICA_ENTRY;
        b[at] = r.state;
        b[at + 8..at + 16].copy_from_slice(&r.generation.to_le_bytes());
        b[at + 16..at + 24].copy_from_slice(&r.identity.to_le_bytes());
    }
    let end = HEADER_FIXED + h.replicas.len() * REPLICA_ENTRY;
    b[12..16].copy_from_slice(&(end as u32).to_le_bytes());
    let sum = xxh3_64_with_seed(&b[24..end], 0);
    b[16..24].copy_from_slice(&sum.to_le_bytes());
    b
}

fn decode_header(b: &[u8]) -> Result<Header, String> {
    if &b[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    if u32_at(8) != VERSION {
        return Err(format!(
            "version {} (this quorum reads {VERSION})",
            u32_at(8)
        ));
    }
    let end = u32_at(12) as usize;
    let n = b[53] as usize;
    if end != HEADER_FIXED + n * REPLICA_ENTRY || end > b.len() {
        return Err("bad header length".into());
    }
    if u64_at(16) != xxh3_64_with_seed(&b[24..end], 0) {
        return Err("header checksum mismatch".into());
    }
    let (region, chunk) = (u64_at(40), u64::from(u32_at(48)));
    if region == 0 || chunk == 0 {
        return Err("zero granularity".into());
    }
    Ok(Header {
        seq: u64_at(24),
        size: u64_at(32),
        region,
        chunk,
        clean: b[52] != 0,
        compare_only: b[54] != 0,
        replicas: (0..n)
            .map(|i| {
                let at = HEADER_FIXED + i * REPLICA_ENTRY;
                ReplicaEntry {
                    state: b[at],
                    generation: u64_at(at + 8),
                    identity: u64_at(at + 16),
                }
            })
            .collect(),
    })
}

/// The valid header slot with the higher sequence number.
fn read_header(file: &File) -> Result<Header, String> {
    let mut best: Option<Header> = None;
    let mut why = Vec::new();
    for slot in 0..2 {
        let mut b = vec![0u8; SLOT as usize];
        if let Err(e) = file.read_exact_at(&mut b, slot * SLOT) {
            why.push(format!("slot {slot}: {e}"));
            continue;
        }
        match decode_header(&b) {
            Ok(h) if best.as_ref().is_none_or(|b| h.seq > b.seq) => best = Some(h),
            Ok(_) => {}
            Err(e) => why.push(format!("slot {slot}: {e}")),
        }
    }
    best.ok_or_else(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn open(path: &Path) -> Opened {
        Record::open(path, 64 * MIB, 4 * MIB, 64 << 10, 3).unwrap()
    }

    #[test]
    fn missing_file_starts_with_every_region_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(&dir.path().join("d.state"));
        assert_eq!(
            (
                o.distrust,
                o.record.unknown_count(),
                o.record.dirty_count(),
                o.record.missed_count(0)
            ),
            (Some(Distrust::Missing), 16, 0, 0)
        );
    }

    #[test]
    fn synced_bits_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        {
            let o = open(&p);
            for r in 0..16 {
                o.record.clear_unknown(r);
            }
            o.record.mark_dirty(3..5);
            o.record.mark_missed(1, 100..103);
            o.record.sync().unwrap();
        }
        let o = open(&p);
        assert_eq!(
            (
                o.distrust,
                o.record.dirty_regions(),
                o.record.missed_count(1),
                o.record.next_missed(1, 0),
                o.bad_pages
            ),
            (None, vec![3, 4], 3, Some(100), 0)
        );
    }

    #[test]
    fn second_open_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        let _first = open(&p);
        let second = Record::open(&p, 64 * MIB, 4 * MIB, 64 << 10, 3);
        assert!(matches!(second, Err(RecordError::Locked(_))));
    }

    #[test]
    fn corrupt_bitmap_page_reads_as_all_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        {
            let o = open(&p);
            for r in 0..16 {
                o.record.clear_unknown(r);
            }
            o.record.mark_missed(2, 5..6);
            o.record.sync().unwrap();
        }
        // Flip a bit in replica 2's missed page.
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let base = 2 * SLOT + PAGE as u64 * 4;
        f.write_all_at(&[0xff], base + 100).unwrap();
        drop(f);
        let o = open(&p);
        assert_eq!(
            (
                o.bad_pages,
                o.record.missed_count(2),
                o.record.dirty_count()
            ),
            (1, 1024, 0)
        );
    }

    #[test]
    fn torn_header_falls_back_to_the_other_slot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        {
            let o = open(&p);
            o.record
                .write_header(|h| h.replicas[1].generation = 7)
                .unwrap();
            o.record
                .write_header(|h| h.replicas[1].generation = 8)
                .unwrap();
        }
        let seq = open(&p).record.header().seq;
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        f.write_all_at(&[0u8; 100], (seq % 2) * SLOT + 30).unwrap();
        drop(f);
        let o = open(&p);
        assert_eq!(
            (o.distrust, o.record.header().replicas[1].generation),
            (None, 7)
        );
    }

    #[test]
    fn garbage_file_is_distrusted_and_started_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        std::fs::write(&p, vec![0x42u8; 20000]).unwrap();
        let o = open(&p);
        assert!(matches!(o.distrust, Some(Distrust::Corrupt(_))));
        assert_eq!(o.record.unknown_count(), 16);
    }

    #[test]
    fn other_geometry_is_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        drop(open(&p));
        let o = Record::open(&p, 128 * MIB, 4 * MIB, 64 << 10, 3).unwrap();
        assert!(matches!(o.distrust, Some(Distrust::Mismatch(_))));
    }

    #[test]
    fn inspect_reads_a_locked_record_without_changing_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        let o = open(&p);
        o.record.mark_missed(1, 0..10);
        o.record.sync().unwrap();
        let before = std::fs::read(&p).unwrap();
        let i = inspect(&p).unwrap();
        assert_eq!(
            (
                i.in_use,
                i.unknown_regions,
                i.missed_chunks,
                std::fs::read(&p).unwrap() == before
            ),
            (true, 16, vec![0, 10, 0], true)
        );
        drop(o);
        assert_eq!(inspect(&dir.path().join("none")), Err(Distrust::Missing));
    }

    #[test]
    fn truncated_file_is_distrusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        drop(open(&p));
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(100).unwrap();
        drop(f);
        let o = open(&p);
        assert!(matches!(o.distrust, Some(Distrust::Corrupt(_))));
    }

    #[test]
    fn grown_replica_is_listed_and_all_missed_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        {
            let o = open(&p);
            o.record.mark_missed(2, 7..8);
            o.record.sync().unwrap();
            let entry = ReplicaEntry {
                state: 4,
                generation: 1,
                identity: 99,
            };
            assert_eq!(o.record.grow(entry).unwrap(), 3);
        }
        let o = Record::open(&p, 64 * MIB, 4 * MIB, 64 << 10, 4).unwrap();
        let h = o.record.header();
        assert_eq!(
            (
                o.distrust,
                o.bad_pages,
                h.replicas.len(),
                h.replicas[3].identity,
                o.record.missed_count(2),
                o.record.missed_count(3)
            ),
            (None, 0, 4, 99, 1, 1024)
        );
    }

    #[test]
    fn removed_replicas_past_the_disks_count_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        {
            let o = open(&p);
            o.record.mark_missed(1, 3..4);
            o.record.sync().unwrap();
            o.record
                .write_header(|h| h.replicas[2].state = STATE_REMOVED)
                .unwrap();
        }
        let o = Record::open(&p, 64 * MIB, 4 * MIB, 64 << 10, 2).unwrap();
        assert_eq!(
            (
                o.distrust,
                o.record.header().replicas.len(),
                o.record.missed_count(1)
            ),
            (None, 2, 1)
        );
    }

    #[test]
    fn replicas_past_the_disks_count_that_hold_data_are_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.state");
        drop(open(&p));
        let o = Record::open(&p, 64 * MIB, 4 * MIB, 64 << 10, 2).unwrap();
        assert!(matches!(o.distrust, Some(Distrust::Mismatch(_))));
    }
}
