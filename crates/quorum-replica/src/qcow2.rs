//! qcow2 images (and their backing chains) through imago's sync API.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Mapping, StorageOpenOptions};
use parking_lot::RwLock;
use quorum_config::model::{Backing, ImageFormat, Source, StorageSource};

use crate::header::{Qcow2Header, Refusal, has_qcow2_magic};
use crate::layout::{Layout, validate_header};
use crate::lock::LockMode;
use crate::raw::{check_range, check_writable, file_size, open_locked};
use crate::{ErrorKind, Extent, OpenError, OpenOptions, Replica, ReplicaError, Result};

/// Deepest backing chain we follow (guards against header loops).
const MAX_CHAIN: usize = 16;

type Image = FormatAccess<ImagoFile>;

/// A qcow2 image with its backing chain (qcow2 or raw layers, read-only).
///
/// Reads, writes and write-zeroes share a read lock on the imago image and
/// run concurrently; discard (and unmapping write-zeroes) needs imago's
/// `&mut` and takes the write lock. Every layer file holds OFD locks while
/// the replica lives. Dropping flushes imago's metadata caches.
#[derive(Debug)]
pub struct Qcow2Replica {
    // Field order matters: the image is flushed and closed before the locks go.
    image: RwLock<Image>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Whether imago has the image open for writing (not when read-only,
    /// nor when the image was corrupt at open): flush and close only then.
    image_writable: bool,
    /// Why this replica refuses writes, once it does: corruption found at
    /// open, a write that would have hit metadata, or a panic in imago.
    fenced: OnceLock<String>,
    /// The top layer's metadata ranges, for the write-time overlap check.
    layout: RwLock<Arc<Layout>>,
    /// A write allocated since `layout` was read: re-read it at the next flush.
    layout_stale: AtomicBool,
    /// A buffered fd on the top layer, to re-read its metadata.
    meta: fs::File,
    _locks: Vec<fs::File>,
}

/// The text of a panic payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

fn layer_path(src: &StorageSource) -> Result<&Path, OpenError> {
    match &src.source {
        Source::File { path } => Ok(path),
        Source::Block { dev } => Ok(dev),
        Source::Nbd { .. } => Err(OpenError::Nbd {
            name: src.display_name(),
            message: "an NBD layer inside a qcow2 backing chain is not supported".into(),
        }),
    }
}

pub(crate) fn refusal_error(path: &Path, r: Refusal) -> OpenError {
    let path = path.to_path_buf();
    match r {
        Refusal::Encrypted(method) => OpenError::Encrypted { path, method },
        Refusal::Dirty => OpenError::Dirty { path },
        Refusal::Corrupt => OpenError::Corrupt { path },
        Refusal::Feature(feature) => OpenError::UnsupportedFeature { path, feature },
    }
}

/// The header's backing file name, resolved against the image's folder.
pub(crate) fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("/")).join(p)
    }
}

/// Compare two paths by their canonical form (falling back to the text).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The header's backing format name as our enum (`file` is QEMU's alias for raw).
pub(crate) fn parse_format(name: &str) -> Option<ImageFormat> {
    match name {
        "qcow2" => Some(ImageFormat::Qcow2),
        "raw" | "file" => Some(ImageFormat::Raw),
        _ => None,
    }
}

/// Opens one chain: each layer file, its locks, and the imago objects.
struct ChainOpener {
    direct: bool,
    no_locking: bool,
    locks: Vec<fs::File>,
    /// The top layer's metadata layout (depth 0), when it is qcow2.
    top_layout: Option<Layout>,
    /// Whether imago opened the top layer for writing.
    top_writable: bool,
}

impl ChainOpener {
    fn storage(&mut self, path: &Path, write: bool) -> Result<ImagoFile, OpenError> {
        let mode = if write {
            LockMode::WRITER
        } else {
            LockMode::READER
        };
        let file = open_locked(path, write, self.direct, (!self.no_locking).then_some(mode))?;
        let keep = file
            .try_clone()
            .map_err(|e| OpenError::io(path, "dup", e))?;
        self.locks.push(keep);
        let opts = StorageOpenOptions::new()
            .filename(path)
            .write(write)
            .direct(self.direct);
        ImagoFile::from_open_file(file, opts).map_err(|e| OpenError::io(path, "open", e))
    }

    /// Open `src` (top layer when `write`) and everything below it.
    fn open(&mut self, src: &StorageSource, write: bool, depth: usize) -> Result<Image, OpenError> {
        let path = layer_path(src)?;
        if depth > MAX_CHAIN {
            return Err(OpenError::invalid(
                path,
                format!("backing chain deeper than {MAX_CHAIN} layers"),
            ));
        }
        match src.format {
            ImageFormat::Raw => self.open_raw(src, path, write),
            ImageFormat::Qcow2 => self.open_qcow2(src, path, write, depth),
        }
    }

    fn open_raw(
        &mut self,
        src: &StorageSource,
        path: &Path,
        write: bool,
    ) -> Result<Image, OpenError> {
        if let Backing::Store(_) = src.backing {
            return Err(OpenError::invalid(
                path,
                "a raw image cannot have a backing store",
            ));
        }
        let file = self.storage(path, write)?;
        let raw = Raw::builder(file)
            .write(write)
            .open(DenyImplicitOpenGate::default())
            .map_err(|source| OpenError::Imago {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(FormatAccess::new(raw))
    }

    fn open_qcow2(
        &mut self,
        src: &StorageSource,
        path: &Path,
        write: bool,
        depth: usize,
    ) -> Result<Image, OpenError> {
        let file = self.storage(path, write)?;
        // Read the header through a buffered fd: the locked one may be O_DIRECT.
        let buffered = fs::File::open(path).map_err(|e| OpenError::io(path, "open", e))?;
        let (header, layout) = inspect_qcow2(path, &buffered)?;
        // A corrupt image is opened read-only inside imago: the replica
        // refuses writes anyway, and imago then writes nothing at all (not
        // even the header, to clear autoclear bits).
        let write = if let Some(msg) = corruption_message(path, &layout) {
            tracing::error!("{msg}");
            false
        } else {
            write
        };
        if depth == 0 {
            self.top_writable = write;
            self.top_layout = Some(layout);
        }
        let below = backing_layer(
            src,
            path,
            header.backing_file.as_deref(),
            header.backing_format.as_deref(),
        )?;
        let backing = match below {
            Some(layer) => Some(self.open(&layer, false, depth + 1)?),
            None => None,
        };
        let qcow2 = catch_unwind(AssertUnwindSafe(|| {
            Qcow2::<ImagoFile>::builder(file)
                .write(write)
                .backing(backing)
                .open(DenyImplicitOpenGate::default())
        }))
        .map_err(|panic| {
            OpenError::invalid(
                path,
                format!(
                    "the qcow2 layer (imago) panicked opening it: {}",
                    panic_text(&*panic)
                ),
            )
        })?
        .map_err(|source| OpenError::Imago {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FormatAccess::new(qcow2))
    }
}

/// Magic check, header parse, and refusals for a file the XML calls qcow2.
pub(crate) fn check_qcow2_header(path: &Path, file: &fs::File) -> Result<Qcow2Header, OpenError> {
    let is_qcow2 = has_qcow2_magic(file).map_err(|e| OpenError::io(path, "read header", e))?;
    if !is_qcow2 {
        return Err(OpenError::FormatMismatch {
            path: path.to_path_buf(),
            expected: "qcow2",
            found: "not qcow2 (raw?)",
        });
    }
    let header = Qcow2Header::read(file).map_err(|e| OpenError::invalid(path, e.to_string()))?;
    if let Some(r) = header.refusal() {
        return Err(refusal_error(path, r));
    }
    validate_header(&header).map_err(|e| {
        OpenError::invalid(
            path,
            format!("invalid qcow2 header: {e} (QEMU refuses to open it too)"),
        )
    })?;
    Ok(header)
}

/// Everything `open` and `probe` check before imago sees an image: the
/// header ([`check_qcow2_header`]) and the metadata layout. Layout
/// corruption is not an error here: see [`corruption_message`].
pub(crate) fn inspect_qcow2(
    path: &Path,
    file: &fs::File,
) -> Result<(Qcow2Header, Layout), OpenError> {
    let header = check_qcow2_header(path, file)?;
    let len = file_size(file).map_err(|e| OpenError::io(path, "get size", e))?;
    let layout = Layout::read(file, len, &header.tables, true)
        .map_err(|e| OpenError::io(path, "read qcow2 metadata", e))?;
    Ok((header, layout))
}

/// What to tell the user about an image whose layout is corrupt, or `None`.
pub(crate) fn corruption_message(path: &Path, layout: &Layout) -> Option<String> {
    if layout.corruption.is_empty() {
        return None;
    }
    let p = path.display();
    Some(format!(
        "replica {p} is a corrupt qcow2 image ({}); quorum refuses writes to it; \
         `qemu-img check -r all {p}` repairs it (a guest cluster mapped onto metadata \
         stays so: copy the image with `qemu-img convert -O qcow2` instead)",
        layout.corruption.join("; ")
    ))
}

/// The layer below `src`: the XML's when it gives one (checked against the
/// header), none at `<backingStore/>`, else the header's.
pub(crate) fn backing_layer(
    src: &StorageSource,
    path: &Path,
    backing_file: Option<&str>,
    backing_format: Option<&str>,
) -> Result<Option<StorageSource>, OpenError> {
    let header_path = backing_file.map(|n| resolve_backing(path, n));
    match &src.backing {
        Backing::End => Ok(None),
        Backing::Store(below) => {
            let xml_name = below.display_name();
            let matches = match (&header_path, &below.source) {
                (Some(h), Source::File { path: x }) | (Some(h), Source::Block { dev: x }) => {
                    same_file(h, x)
                }
                _ => false,
            };
            if !matches {
                return Err(OpenError::BackingMismatch {
                    path: path.to_path_buf(),
                    xml: xml_name,
                    header: backing_file.unwrap_or("none").to_owned(),
                });
            }
            if let Some(f) = backing_format.and_then(parse_format)
                && f != below.format
            {
                return Err(OpenError::invalid(
                    path,
                    format!(
                        "the XML says backing {xml_name} is {}, but the image header says {}",
                        below.format.as_str(),
                        f.as_str()
                    ),
                ));
            }
            Ok(Some((**below).clone()))
        }
        Backing::Unspecified => {
            let Some(bpath) = header_path else {
                return Ok(None);
            };
            let format = match backing_format {
                Some(name) => parse_format(name).ok_or_else(|| {
                    OpenError::invalid(
                        path,
                        format!("unknown backing format {name:?} in the image header"),
                    )
                })?,
                None => probe_format(&bpath)?,
            };
            Ok(Some(StorageSource {
                index: None,
                format,
                source: Source::File { path: bpath },
                backing: Backing::Unspecified,
            }))
        }
    }
}

/// qcow2 when the file has the magic, else raw.
pub(crate) fn probe_format(path: &Path) -> Result<ImageFormat, OpenError> {
    let f = fs::File::open(path).map_err(|e| OpenError::io(path, "open", e))?;
    let q = has_qcow2_magic(&f).map_err(|e| OpenError::io(path, "read header", e))?;
    Ok(if q {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

impl Qcow2Replica {
    /// Open the qcow2 image `src` and its backing chain.
    pub fn open(src: &StorageSource, opts: &OpenOptions) -> Result<Self, OpenError> {
        let path = layer_path(src)?.to_path_buf();
        if src.format != ImageFormat::Qcow2 {
            return Err(OpenError::invalid(&path, "not a qcow2 layer"));
        }
        let mut opener = ChainOpener {
            direct: opts.direct,
            no_locking: opts.no_locking,
            locks: Vec::new(),
            top_layout: None,
            top_writable: false,
        };
        let image = opener.open(src, !opts.read_only, 0)?;
        let layout = opener.top_layout.take().unwrap_or_default();
        let fenced = OnceLock::new();
        if let Some(msg) = corruption_message(&path, &layout) {
            let _ = fenced.set(msg);
        }
        let meta = fs::File::open(&path).map_err(|e| OpenError::io(&path, "open", e))?;
        Ok(Qcow2Replica {
            size: image.size(),
            image: RwLock::new(image),
            path,
            read_only: opts.read_only,
            image_writable: opener.top_writable,
            fenced,
            layout: RwLock::new(Arc::new(layout)),
            layout_stale: AtomicBool::new(false),
            meta,
            _locks: opener.locks,
        })
    }

    /// Why this replica refuses writes, if it does.
    pub fn fenced(&self) -> Option<&str> {
        self.fenced.get().map(String::as_str)
    }

    /// Refuse every write from now on, for `reason` (the first reason stays).
    fn fence(&self, reason: String) {
        if self.fenced.set(reason).is_ok() {
            tracing::error!(path = %self.path.display(), reason = self.fenced().unwrap_or_default(), "qcow2 replica now refuses writes");
        }
    }

    /// Fail a write-like `op` when the replica is fenced.
    fn unfenced(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        match self.fenced() {
            Some(why) => Err(ReplicaError::new(ErrorKind::Io(libc::EIO), op, why).at(offset, len)),
            None => Ok(()),
        }
    }

    /// Run `f` (a call into imago); a panic in it becomes an EIO error of
    /// this replica, which is fenced (imago's state may be half-updated).
    fn guarded<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(panic) => {
                let why = format!(
                    "replica {}: the qcow2 layer (imago) panicked during {op}: {}",
                    self.path.display(),
                    panic_text(&*panic)
                );
                self.fence(why.clone());
                Err(ReplicaError::new(ErrorKind::Io(libc::EIO), op, why))
            }
        }
    }

    /// QEMU's metadata overlap check for a guest write to
    /// `[offset, offset + len)`: every part already allocated in the top
    /// layer is written in place, so its host range must hold no metadata.
    /// Parts not allocated yet get fresh clusters from imago's allocator
    /// (and new metadata), so the layout is re-read at the next flush.
    fn check_overlap(&self, image: &Image, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let layout = Arc::clone(&self.layout.read());
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (mapping, length) = image
                .get_mapping(pos, end - pos)
                .map_err(|e| ReplicaError::io(op, &e).at(offset, len))?;
            if length == 0 {
                break;
            }
            match mapping {
                Mapping::Raw {
                    offset: host,
                    writable: true,
                    ..
                } => {
                    if let Some(r) = layout.overlap(host, length) {
                        let why = format!(
                            "replica {}: preventing invalid write on qcow2 metadata: guest offset {pos:#x} \
                             maps to host offset {host:#x}, inside the {r}; the image is corrupt, \
                             `qemu-img check -r all {}` repairs it",
                            self.path.display(),
                            self.path.display()
                        );
                        self.fence(why.clone());
                        return Err(
                            ReplicaError::new(ErrorKind::Io(libc::EIO), op, why).at(offset, len)
                        );
                    }
                }
                _ => self.layout_stale.store(true, Ordering::Relaxed),
            }
            pos += length;
        }
        Ok(())
    }

    /// Re-read the top layer's metadata layout after allocating writes
    /// (called once imago's caches are flushed, so the file is current).
    fn refresh_layout(&self) {
        if !self.layout_stale.swap(false, Ordering::Relaxed) {
            return;
        }
        let read = Qcow2Header::read(&self.meta).and_then(|h| {
            let len = file_size(&self.meta)?;
            Layout::read(&self.meta, len, &h.tables, false)
        });
        match read {
            Ok(layout) => {
                if let Some(msg) = corruption_message(&self.path, &layout) {
                    self.fence(msg);
                }
                *self.layout.write() = Arc::new(layout);
            }
            Err(e) => self.fence(format!(
                "replica {}: cannot re-read the qcow2 metadata: {e}",
                self.path.display()
            )),
        }
    }

    /// The top image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writable(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        check_writable(self.read_only, self.size, op, offset, len)
    }

    fn sync_all(&self, image: &Image, op: &'static str) -> Result<()> {
        image.flush().map_err(|e| ReplicaError::io(op, &e))?;
        image.sync().map_err(|e| ReplicaError::io(op, &e))
    }
}

impl Replica for Qcow2Replica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_range(self.size, "read", offset, len)?;
        self.guarded("read", || {
            self.image
                .read()
                .read(buf, offset)
                .map_err(|e| ReplicaError::io("read", &e).at(offset, len))
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let len = buf.len() as u64;
        self.writable("write", offset, len)?;
        self.unfenced("write", offset, len)?;
        self.guarded("write", || {
            let image = self.image.read();
            self.check_overlap(&image, "write", offset, len)?;
            image
                .write(buf, offset)
                .map_err(|e| ReplicaError::io("write", &e).at(offset, len))?;
            if fua {
                self.sync_all(&image, "write")
            } else {
                Ok(())
            }
        })?;
        if fua {
            self.refresh_layout();
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        self.writable("write_zeroes", offset, len)?;
        self.unfenced("write_zeroes", offset, len)?;
        let err = |e: std::io::Error| ReplicaError::io("write_zeroes", &e).at(offset, len);
        self.guarded("write_zeroes", || {
            if may_unmap {
                self.image
                    .write()
                    .discard_to_zero(offset, len)
                    .map_err(err)?;
            } else {
                let image = self.image.read();
                self.check_overlap(&image, "write_zeroes", offset, len)?;
                image.write_zeroes(offset, len).map_err(err)?;
            }
            if fua {
                self.sync_all(&self.image.read(), "write_zeroes")
            } else {
                Ok(())
            }
        })
    }

    /// Deallocates clusters and leaves the range reading as zeroes (never
    /// the backing file's data), so replicas stay identical.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("discard", offset, len)?;
        self.unfenced("discard", offset, len)?;
        self.guarded("discard", || {
            self.image
                .write()
                .discard_to_zero(offset, len)
                .map_err(|e| ReplicaError::io("discard", &e).at(offset, len))
        })
    }

    fn flush(&self) -> Result<()> {
        if !self.image_writable {
            return Ok(());
        }
        self.guarded("flush", || self.sync_all(&self.image.read(), "flush"))?;
        self.refresh_layout();
        Ok(())
    }

    /// Data in any layer (including compressed clusters) is data; explicit
    /// zero clusters are `zero`; unallocated in every layer is `hole + zero`.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.size, "block_status", offset, len)?;
        self.guarded("block_status", || self.extents(offset, len))
    }
}

impl Qcow2Replica {
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let image = self.image.read();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let (mapping, length) = image
                .get_mapping(pos, end - pos)
                .map_err(|e| ReplicaError::io("block_status", &e).at(offset, len))?;
            let (zero, hole) = match mapping {
                Mapping::Zero { explicit: true, .. } => (true, false),
                Mapping::Zero { .. } => (true, true),
                Mapping::Eof { .. } => break,
                _ => (false, false),
            };
            if length == 0 {
                break;
            }
            match out.last_mut() {
                Some(last) if last.zero == zero && last.hole == hole => last.length += length,
                _ => out.push(Extent { length, zero, hole }),
            }
            pos += length;
        }
        Ok(out)
    }
}

impl Drop for Qcow2Replica {
    fn drop(&mut self) {
        if !self.image_writable {
            return;
        }
        let flushed = catch_unwind(AssertUnwindSafe(|| {
            self.sync_all(&self.image.read(), "flush")
        }))
        .unwrap_or_else(|_| {
            Err(ReplicaError::new(
                ErrorKind::Io(libc::EIO),
                "flush",
                "imago panicked",
            ))
        });
        if let Err(e) = flushed {
            tracing::warn!(path = %self.path.display(), error = %e, "flushing qcow2 replica on close failed");
        }
    }
}
