//! The quorum disk configuration, read from libvirt domain XML.
//!
//! ```text
//!  file ──load──▶ XML text ──parse_str──▶ DiskConfig ──to_xml──▶ canonical XML
//!                   (roxmltree,              │
//!                    all errors)             └──qemu::blockdev_args / nested_json──▶ QEMU JSON
//! ```
//!
//! Parsing validates as it goes: a malformed document yields one error at its
//! first fault; a well-formed one yields every semantic error it has. Errors
//! carry `file:line:col` in libvirt's wording (see [`ConfigError`]).
#![warn(missing_docs)]

mod error;
mod identity;
pub mod libvirt;
pub mod model;
mod parse;
pub mod qemu;
mod syntax;
mod write;

use std::path::{Path, PathBuf};

pub use error::{ConfigError, ConfigErrors, ErrorKind};
pub use model::*;
pub use parse::{MAX_CHAIN_DEPTH, MAX_ERRORS, is_valid_target_dev};
pub use write::to_xml;

/// Read, parse and validate the disk XML at `path`.
///
/// Relative image paths resolve against the file's folder; `target` picks a
/// disk by `<target dev=>` (default: the first `type='quorum'` disk). Errors
/// are labelled with `path` as given.
///
/// Unlike [`parse_str`], this also asks the file system whether two layers are
/// one file (a symlink, a hard link, `..` through a symlinked folder: same
/// device and inode, or the same block device) and refuses that as it refuses a
/// path written twice. Files need not exist.
pub fn load(path: &Path, target: Option<&str>) -> Result<DiskConfig, ConfigErrors> {
    load_full(path, target).map(|l| l.disk)
}

/// A disk as read, with what came along with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The quorum disk.
    pub disk: DiskConfig,
    /// When the disk came from a domain's `<metadata>` (see [`libvirt`]):
    /// the unix socket its `<export>` names, where QEMU expects the NBD export.
    pub socket: Option<PathBuf>,
    /// Things accepted but ignored ([`ErrorKind::Note`]), in document order:
    /// elements and attributes that only concern the guest or QEMU.
    pub notes: Vec<ConfigError>,
}

/// [`load`], keeping the export socket and the notes.
pub fn load_full(path: &Path, target: Option<&str>) -> Result<Loaded, ConfigErrors> {
    let label = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        file: label.clone(),
        line: 0,
        col: 0,
        kind: ErrorKind::Io,
        message: e.to_string(),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    parse_bytes(&bytes, &label, dir, target)
}

/// As [`load_full`] for bytes read elsewhere (e.g. standard input), labelled
/// `file_label`, relative paths resolved against `base_dir`. Like [`load`]
/// (unlike [`parse_str`]) it asks the file system whether two layers are one file.
pub fn parse_bytes(
    bytes: &[u8],
    file_label: &str,
    base_dir: &Path,
    target: Option<&str>,
) -> Result<Loaded, ConfigErrors> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let good = e.valid_up_to();
            let prefix = std::str::from_utf8(&bytes[..good]).unwrap_or("");
            let (line, col) = syntax::line_col(prefix, good);
            return Err(ConfigError {
                file: file_label.to_string(),
                line,
                col,
                kind: ErrorKind::Xml,
                message: "document is not valid UTF-8".into(),
            }
            .into());
        }
    };
    parse::parse(text, file_label, base_dir, target, true)
}

/// Parse and validate XML `text`. `file_label` prefixes error messages;
/// relative image paths resolve against `base_dir` (made absolute first).
/// Touches no file system: two paths are one file when they are equal once
/// `.` and `..` are resolved (see [`load`] for the check by inode).
pub fn parse_str(
    text: &str,
    file_label: &str,
    base_dir: &Path,
    target: Option<&str>,
) -> Result<DiskConfig, ConfigErrors> {
    parse::parse(text, file_label, base_dir, target, false).map(|l| l.disk)
}

/// [`parse_str`], keeping the export socket and the notes.
pub fn parse_str_full(
    text: &str,
    file_label: &str,
    base_dir: &Path,
    target: Option<&str>,
) -> Result<Loaded, ConfigErrors> {
    parse::parse(text, file_label, base_dir, target, false)
}

/// Parse one `<backingStore>` element given alone (how a replica is named
/// when it is added to, or replaces one of, a running disk). Relative image
/// paths resolve against `base_dir`. Exactly one replica must be given.
pub fn parse_backing_store(
    text: &str,
    file_label: &str,
    base_dir: &Path,
) -> Result<model::StorageSource, ConfigErrors> {
    // The fragment is checked by the same grammar as in a disk: wrap it in
    // the smallest valid disk around it (line numbers stay those of `text`,
    // since the wrapper adds no line before it).
    let doc = format!(
        "<disk type='quorum' device='disk'><threshold value='1'/>{text}\n<target dev='vda'/></disk>"
    );
    let disk = parse::parse(&doc, file_label, base_dir, None, false)?.disk;
    let n = disk.replicas.len();
    if n != 1 {
        return Err(ConfigError {
            file: file_label.to_string(),
            line: 1,
            col: 1,
            kind: ErrorKind::InvalidArg,
            message: format!("expected exactly one <backingStore>, found {n}"),
        }
        .into());
    }
    Ok(disk.replicas.into_iter().next().expect("one replica"))
}
