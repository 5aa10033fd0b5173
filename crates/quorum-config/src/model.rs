//! The typed model of a quorum disk, as read from libvirt domain XML.
//!
//! Everything here is plain data: parsing lives in `parse`, canonical output
//! in `write`, and QEMU argument generation in `qemu`.

use std::path::PathBuf;

/// One `<disk type='quorum'>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// `device=` attribute; only `disk` is accepted.
    pub device: DeviceKind,
    /// `<driver>` options (defaults when the element is absent).
    pub driver: DriverOptions,
    /// `<threshold value='T'/>`: copies that must agree.
    pub threshold: u32,
    /// The replicas, in document order (replica 0 first).
    pub replicas: Vec<StorageSource>,
    /// `<target dev= bus=>`.
    pub target: Target,
    /// `<readonly/>`: the exported disk refuses writes.
    pub readonly: bool,
    /// `<shareable/>`.
    pub shareable: bool,
    /// `<serial>`.
    pub serial: Option<String>,
    /// `<alias name=>`.
    pub alias: Option<String>,
}

impl DiskConfig {
    /// Why the threshold is unsafe, when it is not a majority of the replicas
    /// (`2 * T <= N`, for example 2 of 4 or 2 of 5); `None` when it is.
    ///
    /// A write is acknowledged once T replicas have it. Below a majority, the
    /// replicas that missed it are at least as many as those that took it, so a
    /// later read can be outvoted (or tied) by the old data, and two halves
    /// that cannot see each other can each accept different writes. Valid, as
    /// in QEMU, but worth a warning.
    pub fn minority_threshold_warning(&self) -> Option<String> {
        let n = self.replicas.len();
        let t = self.threshold as usize;
        if n == 0 || 2 * t > n {
            return None;
        }
        Some(format!(
            "threshold {t} is not a majority of {n} replicas: a write counts as done once {t} \
             replica{s} have it, and the {missed} that missed it can then outvote (or tie) it on \
             a later read; use a threshold of at least {majority}",
            s = if t == 1 { "" } else { "s" },
            missed = n - t,
            majority = n / 2 + 1,
        ))
    }
}

/// `device=` of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// `device='disk'`, the only kind a quorum disk can be.
    #[default]
    Disk,
}

/// `<driver>` attributes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DriverOptions {
    /// `name=`, kept as written (libvirt writes `qemu`).
    pub name: Option<String>,
    /// `read_pattern=`.
    pub read_pattern: ReadPattern,
    /// `rewrite_corrupted='on'`.
    pub rewrite_corrupted: bool,
    /// `blkverify='on'`.
    pub blkverify: bool,
}

/// How reads are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadPattern {
    /// Read every replica and vote.
    #[default]
    Quorum,
    /// Read replica 0, fall back in order on error; no vote.
    Fifo,
}

/// `<target>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `dev=`, e.g. `vda`.
    pub dev: String,
    /// `bus=`, e.g. `virtio`.
    pub bus: Option<String>,
}

/// One replica, or one layer of a replica's backing chain (a `<backingStore>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSource {
    /// `index=` attribute, kept on output.
    pub index: Option<u32>,
    /// `<format type=>`.
    pub format: ImageFormat,
    /// `<source>`.
    pub source: Source,
    /// What lies below this layer.
    pub backing: Backing,
}

/// Image format of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw bytes.
    Raw,
    /// qcow2 (v2 or v3).
    Qcow2,
}

impl ImageFormat {
    /// The name used in XML and by QEMU.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Where a layer's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `type='file'`, `<source file=>`; absolute after parsing.
    File {
        /// Path, resolved against the XML file's folder.
        path: PathBuf,
    },
    /// `type='block'`, `<source dev=>`.
    Block {
        /// Block device path.
        dev: PathBuf,
    },
    /// `type='network'`, `<source protocol='nbd'>`.
    Nbd {
        /// `name=`: the export name (None = the server's default export).
        export: Option<String>,
        /// `<host>`.
        host: NbdHost,
        /// `tls=` (None when not written).
        tls: Option<bool>,
    },
}

/// Address of an NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdHost {
    /// `<host name= port=>`.
    Tcp {
        /// Host name or address.
        name: String,
        /// TCP port (10809 when not written).
        port: u16,
    },
    /// `<host transport='unix' socket=>`.
    Unix {
        /// Socket path, resolved against the XML file's folder.
        socket: PathBuf,
    },
}

/// What lies below a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// No nested `<backingStore>`: the chain is open, and the image header decides.
    Unspecified,
    /// An empty `<backingStore/>`: the chain ends here.
    End,
    /// A nested `<backingStore>`.
    Store(Box<StorageSource>),
}

impl StorageSource {
    /// Iterate this layer and every layer below it, top first.
    pub fn chain(&self) -> impl Iterator<Item = &StorageSource> {
        let mut next = Some(self);
        std::iter::from_fn(move || {
            let cur = next?;
            next = match &cur.backing {
                Backing::Store(b) => Some(b),
                _ => None,
            };
            Some(cur)
        })
    }

    /// A short human name for this layer: its path or NBD address.
    pub fn display_name(&self) -> String {
        match &self.source {
            Source::File { path } => path.display().to_string(),
            Source::Block { dev } => dev.display().to_string(),
            Source::Nbd { export, host, .. } => {
                let name = export.as_deref().unwrap_or("");
                match host {
                    NbdHost::Tcp { name: h, port } => format!("nbd://{h}:{port}/{name}"),
                    NbdHost::Unix { socket } => {
                        format!("nbd+unix:///{name}?socket={}", socket.display())
                    }
                }
            }
        }
    }
}
