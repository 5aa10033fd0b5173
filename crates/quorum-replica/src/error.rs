//! Errors of replica I/O: a kind, the context, and the source.

use std::io;
use std::path::{Path, PathBuf};

/// Result of a replica operation.
pub type Result<T, E = ReplicaError> = std::result::Result<T, E>;

/// What went wrong, as a class the engine can vote on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An OS error, by errno (EIO, ENOSPC, ...).
    Io(i32),
    /// The backend does not implement this operation.
    Unsupported,
    /// The range lies beyond the end of the replica.
    OutOfRange,
    /// The replica is opened read-only.
    ReadOnly,
}

/// An error from a replica, with the operation and location it hit.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed{}: {message}", at.map(|(o, l)| format!(" at offset {o} length {l}")).unwrap_or_default())]
pub struct ReplicaError {
    /// The class of error.
    pub kind: ErrorKind,
    /// The operation (`read`, `write`, `flush`, `open`, ...).
    pub op: &'static str,
    /// Offset and length, when the operation had one.
    pub at: Option<(u64, u64)>,
    /// Human-readable detail.
    pub message: String,
}

impl ReplicaError {
    /// A new error.
    pub fn new(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> Self {
        ReplicaError {
            kind,
            op,
            at: None,
            message: message.into(),
        }
    }

    /// An error from an `io::Error`.
    pub fn io(op: &'static str, err: &io::Error) -> Self {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        ReplicaError::new(ErrorKind::Io(errno), op, err.to_string())
    }

    /// "operation not supported by this backend".
    pub fn unsupported(op: &'static str) -> Self {
        ReplicaError::new(ErrorKind::Unsupported, op, "not supported by this replica")
    }

    /// Attach the range the operation covered.
    pub fn at(mut self, offset: u64, len: u64) -> Self {
        self.at = Some((offset, len));
        self
    }

    /// The errno this error maps to (for votes and NBD replies).
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io(e) => e,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::OutOfRange => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EPERM,
        }
    }
}

/// Why a replica (or one layer of its backing chain) could not be opened,
/// probed or created. Every variant names the file it is about.
///
/// Display shows this error only, never its [`source`](std::error::Error::source):
/// print the whole chain (anyhow's `{:#}`, or [`chain`]) so that each cause
/// appears once. [`OpenError::hint`] gives the fix, where one is known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// An OS error while opening, reading the header, or creating.
    #[error("replica {path}: cannot {op}")]
    Io {
        /// The layer's file.
        path: PathBuf,
        /// What we were doing (`open`, `read header`, `create`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the image with conflicting permissions.
    #[error(
        "replica {path} is locked by another process (is QEMU or another quorum using it?): {detail}"
    )]
    Locked {
        /// The layer's file.
        path: PathBuf,
        /// Which permission conflicted.
        detail: String,
    },
    /// A LUKS/AES-encrypted qcow2 image (imago would return ciphertext).
    #[error(
        "replica {path} is an encrypted qcow2 image (crypt_method {method}); encrypted images are not supported"
    )]
    Encrypted {
        /// The layer's file.
        path: PathBuf,
        /// The header's `crypt_method`.
        method: u32,
    },
    /// The qcow2 dirty bit is set: the image was not closed cleanly.
    #[error(
        "replica {path} has the qcow2 dirty bit set (it was not closed cleanly); repair it with `qemu-img check -r all {path}`"
    )]
    Dirty {
        /// The layer's file.
        path: PathBuf,
    },
    /// The qcow2 corrupt bit is set.
    #[error(
        "replica {path} is marked corrupt in its qcow2 header; check it with `qemu-img check -r all {path}`"
    )]
    Corrupt {
        /// The layer's file.
        path: PathBuf,
    },
    /// A qcow2 feature this backend cannot handle (zstd, extended L2, ...).
    #[error(
        "replica {path} uses {feature}, which is not supported; convert it with `qemu-img convert -O qcow2`"
    )]
    UnsupportedFeature {
        /// The layer's file.
        path: PathBuf,
        /// The feature, in words.
        feature: String,
    },
    /// The file is not in the format the XML declares.
    #[error("replica {path}: the XML says format {expected}, but the file is {found}")]
    FormatMismatch {
        /// The layer's file.
        path: PathBuf,
        /// What the XML says.
        expected: &'static str,
        /// What the file looks like.
        found: &'static str,
    },
    /// The XML's backing chain and the image header disagree.
    #[error(
        "replica {path}: the XML gives backing file {xml}, but the image header names {header}"
    )]
    BackingMismatch {
        /// The layer whose header was read.
        path: PathBuf,
        /// The XML's next layer (or `none`).
        xml: String,
        /// The header's backing file (or `none`).
        header: String,
    },
    /// The image is malformed or a request makes no sense for it.
    #[error("replica {path}: {message}")]
    Invalid {
        /// The layer's file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// imago refused or failed to open the image.
    #[error("replica {path}: qcow2 open failed")]
    Imago {
        /// The layer's file.
        path: PathBuf,
        /// imago's error.
        #[source]
        source: io::Error,
    },
    /// The file exists and `create` does not overwrite.
    #[error("replica {path} already exists; refusing to overwrite it")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// An NBD replica is unreachable, refused the handshake, or is
    /// declared in a way that can't be served (TLS, qcow2 over NBD).
    #[error("replica {name}: {message}")]
    Nbd {
        /// The NBD address, as a URI.
        name: String,
        /// What went wrong.
        message: String,
    },
}

impl OpenError {
    /// The file (or NBD address) this error is about.
    pub fn path(&self) -> String {
        match self {
            OpenError::Io { path, .. }
            | OpenError::Locked { path, .. }
            | OpenError::Encrypted { path, .. }
            | OpenError::Dirty { path }
            | OpenError::Corrupt { path }
            | OpenError::UnsupportedFeature { path, .. }
            | OpenError::FormatMismatch { path, .. }
            | OpenError::BackingMismatch { path, .. }
            | OpenError::Invalid { path, .. }
            | OpenError::Imago { path, .. }
            | OpenError::Exists { path } => path.display().to_string(),
            OpenError::Nbd { name, .. } => name.clone(),
        }
    }

    /// How to fix this, when the fix is known: one sentence for a `hint:`
    /// line under the error. Variants whose message already says what to
    /// run (dirty, corrupt, unsupported feature) have none.
    pub fn hint(&self) -> Option<String> {
        match self {
            OpenError::Io { op, source, .. }
                if *op == "open" && source.kind() == io::ErrorKind::NotFound =>
            {
                Some(
                    "if this is a new replica, create it with `quorum create DISK.xml` \
                     (add --size SIZE when no replica exists yet; `quorum serve --create-missing` \
                     does the same at start-up); if the other replicas already hold data, \
                     `quorum check DISK.xml --repair` then copies it in"
                        .to_owned(),
                )
            }
            OpenError::Io { path, source, .. }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                Some(format!(
                    "run as a user that may read and write {} (check its owner, mode and SELinux/AppArmor label)",
                    path.display()
                ))
            }
            OpenError::Locked { .. } => Some(
                "stop the server that holds the lock (another `quorum serve`, qemu-nbd, \
                 qemu-storage-daemon or a VM using this image), then retry"
                    .to_owned(),
            ),
            OpenError::FormatMismatch {
                expected, found, ..
            } => Some(format!(
                "if the file is the right one, change its <format type='{expected}'/> to \
                 <format type='{found}'/> in the XML"
            )),
            OpenError::BackingMismatch { path, .. } => Some(format!(
                "make the replica's <backingStore> chain in the XML match \
                 `qemu-img info --backing-chain {}`",
                path.display()
            )),
            _ => None,
        }
    }

    pub(crate) fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        OpenError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        OpenError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// `err` and its sources, each once, joined by `: ` (as anyhow's `{:#}`
/// prints them): for logs and lists that hold one error per line.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}
