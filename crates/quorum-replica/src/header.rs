//! The few qcow2 header fields we check ourselves before imago opens an
//! image (imago would open some of these images and return wrong data).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// qcow2 magic, `QFI\xfb`.
pub(crate) const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// What a qcow2 header says, as far as we care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Qcow2Header {
    pub version: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub incompatible: u64,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The fields that place the metadata tables (see [`crate::layout`]).
    pub tables: Tables,
}

/// Where the header says the metadata tables are, and how big they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tables {
    pub cluster_bits: u32,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub refcount_order: u32,
    pub header_len: u64,
    pub backing_offset: u64,
    pub backing_len: u32,
}

/// A reason imago must not open an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    Encrypted(u32),
    Dirty,
    Corrupt,
    Feature(String),
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Read exactly `len` bytes at `off`, or fail with "truncated".
fn read_exact(file: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, off).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            invalid("qcow2 header is truncated")
        } else {
            e
        }
    })?;
    Ok(buf)
}

/// Whether the file starts with the qcow2 magic.
pub(crate) fn has_qcow2_magic(file: &File) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == QCOW2_MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl Qcow2Header {
    /// Parse the header of the qcow2 image in `file`.
    pub(crate) fn read(file: &File) -> io::Result<Self> {
        let b = read_exact(file, 0, 72)?;
        if b[0..4] != QCOW2_MAGIC {
            return Err(invalid("not a qcow2 image (bad magic)"));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(invalid(format!("unsupported qcow2 version {version}")));
        }
        let backing_off = be64(&b, 8);
        let backing_len = be32(&b, 16);
        let size = be64(&b, 24);
        let crypt_method = be32(&b, 32);
        let (mut incompatible, mut compression_type, mut header_len) = (0, 0, 72u64);
        let mut refcount_order = 4;
        if version == 3 {
            let v3 = read_exact(file, 72, 32)?;
            incompatible = be64(&v3, 0);
            refcount_order = be32(&v3, 24);
            header_len = u64::from(be32(&v3, 28));
            if header_len > 104 {
                compression_type = read_exact(file, 104, 1)?[0];
            }
        }
        let tables = Tables {
            cluster_bits: be32(&b, 20),
            l1_size: be32(&b, 36),
            l1_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            refcount_order,
            header_len,
            backing_offset: backing_off,
            backing_len,
        };
        let backing_file = if backing_off != 0 && backing_len != 0 {
            if backing_len > 1023 {
                return Err(invalid("qcow2 backing file name is too long"));
            }
            let raw = read_exact(file, backing_off, backing_len as usize)?;
            Some(String::from_utf8(raw).map_err(|_| invalid("backing file name is not UTF-8"))?)
        } else {
            None
        };
        let backing_format = Self::read_backing_format(file, header_len, backing_off)?;
        Ok(Qcow2Header {
            version,
            size,
            crypt_method,
            incompatible,
            compression_type,
            backing_file,
            backing_format,
            tables,
        })
    }

    /// Walk the header extensions for the backing format name.
    fn read_backing_format(file: &File, mut off: u64, limit: u64) -> io::Result<Option<String>> {
        // Extensions live in the first cluster, before the backing name.
        let end = if limit != 0 { limit } else { 512 * 1024 };
        while off + 8 <= end {
            let h = read_exact(file, off, 8)?;
            let (kind, len) = (be32(&h, 0), u64::from(be32(&h, 4)));
            if kind == EXT_END {
                break;
            }
            if kind == EXT_BACKING_FORMAT {
                let raw = read_exact(file, off + 8, len as usize)?;
                return Ok(Some(String::from_utf8_lossy(&raw).into_owned()));
            }
            off += 8 + len.div_ceil(8) * 8;
        }
        Ok(None)
    }

    /// Why imago must not open this image, if it must not.
    pub(crate) fn refusal(&self) -> Option<Refusal> {
        if self.crypt_method != 0 {
            return Some(Refusal::Encrypted(self.crypt_method));
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Some(Refusal::Dirty);
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Some(Refusal::Corrupt);
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Some(Refusal::Feature(
                "extended L2 entries (extended_l2=on)".into(),
            ));
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 && self.compression_type != 0 {
            let name = if self.compression_type == 1 {
                "zstd"
            } else {
                "unknown"
            };
            return Some(Refusal::Feature(format!(
                "{name} compression (compression_type={name})"
            )));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Some(Refusal::Feature("an external data file".into()));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = self.incompatible & !known;
        if unknown != 0 {
            return Some(Refusal::Feature(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        None
    }
}
