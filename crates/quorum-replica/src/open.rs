//! Opening, probing and creating replicas from their XML description.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, StorageOpenOptions};
use quorum_config::model::{Backing, ImageFormat, Source, StorageSource};

use crate::header::{Qcow2Header, has_qcow2_magic};
use crate::qcow2::{
    backing_layer, corruption_message, inspect_qcow2, parse_format, resolve_backing, same_file,
};
use crate::raw::file_size;
use crate::{NbdReplica, OpenError, Qcow2Replica, RawReplica, Replica};

/// How to open a replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open every layer read-only and take only reader locks (shareable
    /// with other readers, including `qemu-img info`).
    pub read_only: bool,
    /// `O_DIRECT`. Raw replicas bounce unaligned requests themselves (and
    /// need a size that is a multiple of 4096); qcow2 leaves alignment to imago.
    pub direct: bool,
    /// Take no image locks at all, like QEMU's `file.locking=off`. Only for
    /// benchmarks and debugging: nothing then stops two writers.
    pub no_locking: bool,
    /// Bound on connecting to, and waiting for, a remote (NBD) replica;
    /// `None` for [`crate::NBD_DEFAULT_TIMEOUT`].
    pub nbd_timeout: Option<std::time::Duration>,
}

fn file_path(src: &StorageSource) -> Result<&Path, OpenError> {
    match &src.source {
        Source::File { path } => Ok(path),
        Source::Block { dev } => Ok(dev),
        Source::Nbd { .. } => Err(OpenError::Nbd {
            name: src.display_name(),
            message: "not a local file".into(),
        }),
    }
}

/// Open one replica (with its backing chain) as the XML describes it.
/// An NBD layer is connected to (see [`NbdReplica`]); it takes no locks.
///
/// Takes QEMU-compatible OFD locks on every layer: writer locks on the top
/// layer unless `read_only`, reader locks on the rest. Fails with
/// [`OpenError::Locked`] when another process holds a conflicting lock.
/// Does not compare sizes between replicas (the engine does).
pub fn open(src: &StorageSource, opts: &OpenOptions) -> Result<Box<dyn Replica>, OpenError> {
    if let Source::Nbd { .. } = src.source {
        return Ok(Box::new(NbdReplica::open(src, opts)?));
    }
    let path = file_path(src)?;
    match src.format {
        ImageFormat::Raw => {
            if let Backing::Store(_) = src.backing {
                return Err(OpenError::invalid(
                    path,
                    "a raw image cannot have a backing store",
                ));
            }
            refuse_qcow2_declared_raw(path)?;
            Ok(Box::new(RawReplica::open(path, opts)?))
        }
        ImageFormat::Qcow2 => Ok(Box::new(Qcow2Replica::open(src, opts)?)),
    }
}

/// A file the XML calls raw but that starts with the qcow2 magic is
/// refused as a format mismatch (opened as raw, its size would be the file's
/// and the guest would see the qcow2 metadata).
fn refuse_qcow2_declared_raw(path: &Path) -> Result<(), OpenError> {
    let file = fs::File::open(path).map_err(|e| OpenError::io(path, "open", e))?;
    if has_qcow2_magic(&file).map_err(|e| OpenError::io(path, "read header", e))? {
        return Err(OpenError::FormatMismatch {
            path: path.to_path_buf(),
            expected: "raw",
            found: "qcow2 (it starts with the qcow2 magic; declare it qcow2 if it is one)",
        });
    }
    Ok(())
}

/// What a file looks like, read without locks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeInfo {
    /// The probed file.
    pub path: PathBuf,
    /// Format by magic: qcow2 if the file starts with `QFI\xfb`, else raw.
    pub format: ImageFormat,
    /// Virtual size (qcow2 header size, or file/device length for raw).
    pub virtual_size: u64,
    /// Backing file name exactly as the qcow2 header stores it.
    pub backing_file: Option<String>,
    /// Backing format from the qcow2 header extension.
    pub backing_format: Option<String>,
    /// Why opening would be refused (encrypted, dirty, zstd, ...), in words.
    pub refusal: Option<String>,
}

/// Read the format, size and backing information of `src`'s top layer.
/// Takes no locks, so it works while QEMU or a quorum daemon uses the file.
/// An NBD layer is connected to for its size; its format is the XML's
/// (which must be raw), and `path` holds its URI.
pub fn probe(src: &StorageSource) -> Result<ProbeInfo, OpenError> {
    if let Source::Nbd { .. } = src.source {
        return crate::nbd::probe(src);
    }
    probe_path(file_path(src)?)
}

fn probe_path(path: &Path) -> Result<ProbeInfo, OpenError> {
    let file = fs::File::open(path).map_err(|e| OpenError::io(path, "open", e))?;
    let is_qcow2 = has_qcow2_magic(&file).map_err(|e| OpenError::io(path, "read header", e))?;
    if !is_qcow2 {
        let virtual_size = file_size(&file).map_err(|e| OpenError::io(path, "get size", e))?;
        return Ok(ProbeInfo {
            path: path.to_path_buf(),
            format: ImageFormat::Raw,
            virtual_size,
            backing_file: None,
            backing_format: None,
            refusal: None,
        });
    }
    let h = Qcow2Header::read(&file).map_err(|e| OpenError::invalid(path, e.to_string()))?;
    // The same checks `open` makes, so `validate --probe` refuses what
    // `serve` refuses (and reports what it would refuse writes to).
    let refusal = match inspect_qcow2(path, &file) {
        Ok((_, layout)) => corruption_message(path, &layout),
        Err(e) => Some(e.to_string()),
    };
    Ok(ProbeInfo {
        path: path.to_path_buf(),
        format: ImageFormat::Qcow2,
        virtual_size: h.size,
        refusal,
        backing_file: h.backing_file,
        backing_format: h.backing_format,
    })
}

impl ProbeInfo {
    /// Human-readable disagreements between this file and its XML layer
    /// `src`: format, refusals, and the backing file the header names
    /// against the XML's next layer. Empty when they agree.
    pub fn problems(&self, src: &StorageSource) -> Vec<String> {
        let mut out = Vec::new();
        let p = self.path.display();
        if self.format != src.format {
            out.push(format!(
                "{p}: the XML says format {}, but the file looks like {}",
                src.format.as_str(),
                self.format.as_str()
            ));
        }
        if let Some(r) = &self.refusal {
            out.push(r.clone());
        }
        if self.format != ImageFormat::Qcow2 || src.format != ImageFormat::Qcow2 {
            return out;
        }
        if let Backing::Store(below) = &src.backing {
            let header = self
                .backing_file
                .as_deref()
                .map(|n| resolve_backing(&self.path, n));
            let xml = match &below.source {
                Source::File { path } | Source::Block { dev: path } => Some(path.as_path()),
                Source::Nbd { .. } => None,
            };
            match (header, xml) {
                (None, _) => out.push(format!(
                    "{p}: the XML gives backing file {}, but the image header names none",
                    below.display_name()
                )),
                (Some(h), Some(x)) if same_file(&h, x) => {}
                (Some(_), _) => out.push(format!(
                    "{p}: the XML gives backing file {}, but the image header names {}",
                    below.display_name(),
                    self.backing_file.as_deref().unwrap_or_default()
                )),
            }
            if let Some(f) = self.backing_format.as_deref().and_then(parse_format)
                && f != below.format
            {
                out.push(format!(
                    "{p}: the XML says backing {} is {}, but the image header says {}",
                    below.display_name(),
                    below.format.as_str(),
                    f.as_str()
                ));
            }
        }
        out
    }
}

/// Probe every layer of `src`'s chain (the XML's layers, then the header's
/// when the XML leaves the chain open) and list every problem found:
/// missing or unreadable files, format mismatches, refusals, and backing
/// chains that differ. Empty when the chain is sound.
pub fn probe_chain(src: &StorageSource) -> Vec<String> {
    let mut out = Vec::new();
    let mut layer = src.clone();
    for _ in 0..16 {
        let info = match probe(&layer) {
            Ok(i) => i,
            Err(e) => {
                out.push(crate::chain(&e));
                return out;
            }
        };
        out.extend(info.problems(&layer));
        let next = match &layer.backing {
            Backing::Store(below) => Some((**below).clone()),
            Backing::End => None,
            Backing::Unspecified if info.format == ImageFormat::Qcow2 => {
                match backing_layer(
                    &layer,
                    &info.path,
                    info.backing_file.as_deref(),
                    info.backing_format.as_deref(),
                ) {
                    Ok(next) => next,
                    Err(e) => {
                        out.push(crate::chain(&e));
                        None
                    }
                }
            }
            Backing::Unspecified => None,
        };
        match next {
            Some(n) => layer = n,
            None => return out,
        }
    }
    out.push(format!(
        "{}: backing chain deeper than 16 layers",
        src.display_name()
    ));
    out
}

/// Create `src`'s top layer with virtual size `size`: qcow2 through imago
/// (with the XML's backing file and format in the header, when the XML
/// gives a backing layer), raw as a sparse file. Never overwrites; block
/// devices and NBD sources can't be created.
pub fn create(src: &StorageSource, size: u64, cluster_size: Option<u32>) -> Result<(), OpenError> {
    let path = match &src.source {
        Source::File { path } => path.as_path(),
        Source::Block { dev } => {
            return Err(OpenError::invalid(
                dev,
                "block devices can't be created; make it yourself",
            ));
        }
        Source::Nbd { .. } => {
            return Err(OpenError::Nbd {
                name: src.display_name(),
                message: "network replicas can't be created; create the export on its server"
                    .into(),
            });
        }
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                OpenError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                OpenError::io(path, "create", e)
            }
        })?;
    let res = match src.format {
        ImageFormat::Raw => create_raw(src, path, &file, size),
        ImageFormat::Qcow2 => create_qcow2(src, path, file, size, cluster_size),
    };
    if res.is_err() {
        let _ = fs::remove_file(path);
    }
    res
}

fn create_raw(
    src: &StorageSource,
    path: &Path,
    file: &fs::File,
    size: u64,
) -> Result<(), OpenError> {
    if let Backing::Store(_) = src.backing {
        return Err(OpenError::invalid(
            path,
            "a raw image cannot have a backing store",
        ));
    }
    file.set_len(size)
        .map_err(|e| OpenError::io(path, "set size", e))?;
    file.sync_all().map_err(|e| OpenError::io(path, "sync", e))
}

fn create_qcow2(
    src: &StorageSource,
    path: &Path,
    file: fs::File,
    size: u64,
    cluster_size: Option<u32>,
) -> Result<(), OpenError> {
    let opts = StorageOpenOptions::new().filename(path).write(true);
    let storage =
        ImagoFile::from_open_file(file, opts).map_err(|e| OpenError::io(path, "create", e))?;
    let mut builder = Qcow2::<ImagoFile>::create_builder(storage).size(size);
    if let Some(cs) = cluster_size {
        builder = builder.cluster_size(cs as usize);
    }
    if let Backing::Store(below) = &src.backing {
        let bpath = match &below.source {
            Source::File { path } => path,
            Source::Block { dev } => dev,
            Source::Nbd { .. } => {
                return Err(OpenError::invalid(
                    path,
                    "an nbd backing layer can't be written into a qcow2 header",
                ));
            }
        };
        let name = bpath
            .to_str()
            .ok_or_else(|| OpenError::invalid(path, "backing file path is not UTF-8"))?;
        builder = builder.backing(name.to_owned(), below.format.as_str().to_owned());
    }
    builder.create().map_err(|source| OpenError::Imago {
        path: path.to_path_buf(),
        source,
    })
}
