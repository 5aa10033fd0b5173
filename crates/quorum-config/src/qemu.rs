//! [`DiskConfig`] → QEMU block graph, in libvirt's `-blockdev` conventions
//! but under a node-name prefix of our own.
//!
//! ```text
//!  replica 0:  quorum-vda-1-storage ─ quorum-vda-1-format (qcow2)
//!  replica 1:  quorum-vda-2-storage (raw base, read-only)
//!              quorum-vda-3-storage ─ quorum-vda-3-format (qcow2, backing: quorum-vda-2-storage)
//!  quorum:     quorum-vda  children: [quorum-vda-1-format, quorum-vda-3-format]
//! ```
//!
//! libvirt names its own nodes `libvirt-N-storage` / `libvirt-N-format`;
//! QEMU refuses a second node of the same name ("Duplicate nodes"), so ours
//! must never take that form while the domain has any other disk. The default
//! prefix ([`NodeNames::for_disk`]) is `quorum-DEV`, which also keeps two
//! quorum disks of one VM apart; [`NodeNames::with_prefix`] takes any other.
//!
//! Every layer gets a protocol (storage) node; qcow2 layers also get a format node.
//! Raw layers have no format node: whoever uses them names the storage node.
//! Nodes come deepest first, so every reference names an existing node; the quorum
//! node comes last. Numbers come from `index=` when given, otherwise from a counter.
//!
//! An NBD source with `tls='yes'` names TLS credentials `PREFIX-N-storage-tls0`,
//! which the caller must define (`-object tls-creds-x509,id=...`).

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use crate::model::*;

/// QEMU's node names hold at most 31 bytes.
pub const MAX_NODE_NAME: usize = 31;

/// Longest suffix a layer node gets: `-` + a `u32` index + `-storage`.
const LONGEST_SUFFIX: usize = "-4294967295-storage".len();

/// How the nodes of one disk are named: layers `PREFIX-N-storage` and
/// `PREFIX-N-format`, the quorum node `PREFIX` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNames {
    prefix: String,
}

impl NodeNames {
    /// The default: `quorum-DEV` (e.g. `quorum-vda`). When a long target
    /// name would push a node name past 31 bytes, `qrm-` and eight hex digits
    /// of a hash of the target name instead (stable from run to run).
    pub fn for_disk(cfg: &DiskConfig) -> NodeNames {
        let prefix = format!("quorum-{}", cfg.target.dev);
        if prefix.len() + LONGEST_SUFFIX <= MAX_NODE_NAME {
            return NodeNames { prefix };
        }
        // FNV-1a: tiny, and the same on every platform and release.
        let mut h: u32 = 0x811c_9dc5;
        for b in cfg.target.dev.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        NodeNames {
            prefix: format!("qrm-{h:08x}"),
        }
    }

    /// A prefix of the caller's choice. QEMU wants a node name to start with
    /// a letter and hold only letters, digits, `-`, `.` and `_`; every name
    /// this prefix yields must fit in 31 bytes.
    pub fn with_prefix(prefix: &str) -> Result<NodeNames, String> {
        let mut bytes = prefix.bytes();
        if !bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
            || !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(format!(
                "invalid node-name prefix '{prefix}': it must start with a letter and hold only \
                 letters, digits, '-', '.' and '_'"
            ));
        }
        if prefix.len() + LONGEST_SUFFIX > MAX_NODE_NAME {
            return Err(format!(
                "node-name prefix '{prefix}' is too long: QEMU node names hold at most \
                 {MAX_NODE_NAME} bytes, so the prefix may have at most {} bytes",
                MAX_NODE_NAME - LONGEST_SUFFIX
            ));
        }
        if prefix.starts_with("libvirt-") || prefix == "libvirt" {
            return Err(format!(
                "node-name prefix '{prefix}' would clash with the nodes libvirt names \
                 'libvirt-N-storage' and 'libvirt-N-format'"
            ));
        }
        Ok(NodeNames {
            prefix: prefix.to_string(),
        })
    }

    /// The quorum node's name: the prefix itself.
    pub fn quorum(&self) -> &str {
        &self.prefix
    }

    fn storage(&self, n: u32) -> String {
        format!("{}-{n}-storage", self.prefix)
    }

    fn format(&self, n: u32) -> String {
        format!("{}-{n}-format", self.prefix)
    }
}

/// The node name of the quorum node itself under the default naming
/// ([`NodeNames::for_disk`]): `quorum-DEV`.
pub fn quorum_node_name(cfg: &DiskConfig) -> String {
    NodeNames::for_disk(cfg).quorum().to_string()
}

/// Hands out layer numbers: explicit `index=` values first, then a counter that skips them.
struct Namer {
    used: HashSet<u32>,
    next: u32,
}

impl Namer {
    fn new(cfg: &DiskConfig) -> Self {
        let used = cfg
            .replicas
            .iter()
            .flat_map(|r| r.chain())
            .filter_map(|l| l.index)
            .collect();
        Namer { used, next: 1 }
    }
    fn number(&mut self, explicit: Option<u32>) -> u32 {
        if let Some(i) = explicit {
            return i;
        }
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        self.used.insert(self.next);
        self.next
    }
}

/// The protocol node for a source; `name` is its node name (None in nested form).
fn storage(source: &Source, name: Option<&str>, read_only: bool) -> Map<String, Value> {
    let mut m = Map::new();
    match source {
        Source::File { path } => {
            m.insert("driver".into(), json!("file"));
            m.insert("filename".into(), json!(path.to_string_lossy()));
        }
        Source::Block { dev } => {
            m.insert("driver".into(), json!("host_device"));
            m.insert("filename".into(), json!(dev.to_string_lossy()));
        }
        Source::Nbd { export, host, tls } => {
            m.insert("driver".into(), json!("nbd"));
            let server = match host {
                NbdHost::Tcp { name, port } => {
                    json!({"type": "inet", "host": name, "port": port.to_string()})
                }
                NbdHost::Unix { socket } => {
                    json!({"type": "unix", "path": socket.to_string_lossy()})
                }
            };
            m.insert("server".into(), server);
            if let Some(e) = export {
                m.insert("export".into(), json!(e));
            }
            if *tls == Some(true) {
                let id = format!("{}-tls0", name.unwrap_or("quorum-storage"));
                m.insert("tls-creds".into(), json!(id));
            }
        }
    }
    if let Some(n) = name {
        m.insert("node-name".into(), json!(n));
    }
    if read_only {
        m.insert("read-only".into(), json!(true));
    }
    m
}

/// Emit one layer (deepest first); returns the node name that layers above must use.
fn emit(
    layer: &StorageSource,
    read_only: bool,
    out: &mut Vec<Value>,
    numbers: &mut Namer,
    names: &NodeNames,
) -> String {
    let below = match &layer.backing {
        Backing::Store(b) => Some(emit(b, true, out, numbers, names)),
        _ => None,
    };
    let n = numbers.number(layer.index);
    let storage_name = names.storage(n);
    out.push(Value::Object(storage(
        &layer.source,
        Some(&storage_name),
        read_only,
    )));
    match layer.format {
        ImageFormat::Raw => storage_name,
        ImageFormat::Qcow2 => {
            let format_name = names.format(n);
            let mut m = Map::new();
            m.insert("driver".into(), json!("qcow2"));
            m.insert("node-name".into(), json!(format_name));
            m.insert("file".into(), json!(storage_name));
            match (&layer.backing, below) {
                (_, Some(b)) => {
                    m.insert("backing".into(), json!(b));
                }
                (Backing::End, None) => {
                    m.insert("backing".into(), Value::Null);
                }
                _ => {}
            }
            if read_only {
                m.insert("read-only".into(), json!(true));
            }
            out.push(Value::Object(m));
            format_name
        }
    }
}

fn quorum_options(cfg: &DiskConfig, m: &mut Map<String, Value>) {
    m.insert("driver".into(), json!("quorum"));
    m.insert("vote-threshold".into(), json!(cfg.threshold));
    let pattern = match cfg.driver.read_pattern {
        ReadPattern::Quorum => "quorum",
        ReadPattern::Fifo => "fifo",
    };
    m.insert("read-pattern".into(), json!(pattern));
    if cfg.driver.rewrite_corrupted {
        m.insert("rewrite-corrupted".into(), json!(true));
    }
    if cfg.driver.blkverify {
        m.insert("blkverify".into(), json!(true));
    }
    if cfg.readonly {
        m.insert("read-only".into(), json!(true));
    }
}

/// One JSON object per `-blockdev`, in order: every replica's layers deepest
/// first, then the quorum node, under the default naming ([`NodeNames::for_disk`]).
pub fn blockdev_args(cfg: &DiskConfig) -> Vec<Value> {
    blockdev_args_named(cfg, &NodeNames::for_disk(cfg))
}

/// [`blockdev_args`] with the nodes named by `names`.
pub fn blockdev_args_named(cfg: &DiskConfig, names: &NodeNames) -> Vec<Value> {
    let mut out = Vec::new();
    let mut numbers = Namer::new(cfg);
    let children: Vec<String> = cfg
        .replicas
        .iter()
        .map(|r| emit(r, cfg.readonly, &mut out, &mut numbers, names))
        .collect();
    let mut q = Map::new();
    quorum_options(cfg, &mut q);
    q.insert("node-name".into(), json!(names.quorum()));
    q.insert("children".into(), json!(children));
    out.push(Value::Object(q));
    out
}

/// In nested form every layer has a format driver: QEMU refuses a bare protocol
/// node as a `backing` dict (it also fills in the header's file name).
fn nested_layer(layer: &StorageSource, read_only: bool) -> Value {
    let file = storage(&layer.source, None, false);
    let mut m = Map::new();
    m.insert("driver".into(), json!(layer.format.as_str()));
    m.insert("file".into(), Value::Object(file));
    match (&layer.backing, layer.format) {
        (_, ImageFormat::Raw) | (Backing::Unspecified, _) => {}
        (Backing::End, _) => {
            m.insert("backing".into(), Value::Null);
        }
        (Backing::Store(b), _) => {
            m.insert("backing".into(), nested_layer(b, true));
        }
    }
    if read_only {
        m.insert("read-only".into(), json!(true));
    }
    Value::Object(m)
}

/// The whole disk as one nested object, for `qemu-io 'json:{...}'` or
/// `qemu-img info 'json:{...}'`. A `<readonly/>` disk needs `qemu-io -r`.
pub fn nested_json(cfg: &DiskConfig) -> Value {
    let mut q = Map::new();
    quorum_options(cfg, &mut q);
    let children: Vec<Value> = cfg
        .replicas
        .iter()
        .map(|r| nested_layer(r, cfg.readonly))
        .collect();
    q.insert("children".into(), Value::Array(children));
    Value::Object(q)
}

/// Where qemu-storage-daemon's NBD server listens (`--nbd-server addr.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A unix socket, relative to the daemon's working folder unless absolute.
    Unix(std::path::PathBuf),
    /// A TCP address.
    Inet {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
}

/// One command-line argument per element: `--blockdev` then the node's JSON,
/// for every node of [`blockdev_args`]. Both qemu-system-* and
/// qemu-storage-daemon take `--blockdev`; no element holds a newline, so one
/// per line is safe for `mapfile -t` or `xargs -d '\n'`.
pub fn argv(cfg: &DiskConfig) -> Vec<String> {
    argv_named(cfg, &NodeNames::for_disk(cfg))
}

/// [`argv`] with the nodes named by `names`.
pub fn argv_named(cfg: &DiskConfig, names: &NodeNames) -> Vec<String> {
    blockdev_args_named(cfg, names)
        .into_iter()
        .flat_map(|node| ["--blockdev".to_string(), node.to_string()])
        .collect()
}

/// A value for QEMU's `key=value,...` syntax: a comma is written twice.
fn keyval(v: &str) -> String {
    v.replace(',', ",,")
}

/// The qemu-storage-daemon arguments that export the quorum node over NBD,
/// after [`argv`]: `--nbd-server addr...` and `--export type=nbd,...`, one
/// argument per element. The export is writable unless the disk is
/// `<readonly/>`. Fails when a value holds a newline (it could not be passed
/// one argument per line).
pub fn qsd_nbd_export(cfg: &DiskConfig, addr: &NbdAddr, name: &str) -> Result<Vec<String>, String> {
    qsd_nbd_export_named(cfg, &NodeNames::for_disk(cfg), addr, name)
}

/// [`qsd_nbd_export`] for nodes named by `names`.
pub fn qsd_nbd_export_named(
    cfg: &DiskConfig,
    names: &NodeNames,
    addr: &NbdAddr,
    name: &str,
) -> Result<Vec<String>, String> {
    let server = match addr {
        NbdAddr::Unix(path) => {
            let p = path.to_string_lossy();
            format!("addr.type=unix,addr.path={}", keyval(&p))
        }
        NbdAddr::Inet { host, port } => {
            format!("addr.type=inet,addr.host={},addr.port={port}", keyval(host))
        }
    };
    let export = format!(
        "type=nbd,id=export-{dev},node-name={node},name={name},writable={w}",
        dev = keyval(&cfg.target.dev),
        node = keyval(names.quorum()),
        name = keyval(name),
        w = if cfg.readonly { "off" } else { "on" },
    );
    if server.contains('\n') || export.contains('\n') {
        return Err("the NBD socket path or export name holds a newline".into());
    }
    Ok(vec![
        "--nbd-server".into(),
        server,
        "--export".into(),
        export,
    ])
}
