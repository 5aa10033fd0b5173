//! [`DiskConfig`] → QEMU block graph, in libvirt's `-blockdev` conventions.
//!
//! ```text
//!  replica 0:  libvirt-1-storage ─ libvirt-1-format (qcow2)
//!  replica 1:  libvirt-2-storage (raw base, read-only)
//!              libvirt-3-storage ─ libvirt-3-format (qcow2, backing: libvirt-2-storage)
//!  quorum:     libvirt-quorum-vda  children: [libvirt-1-format, libvirt-3-format]
//! ```
//!
//! Every layer gets a protocol (storage) node; qcow2 layers also get a format node.
//! Raw layers have no format node: whoever uses them names the storage node.
//! Nodes come deepest first, so every reference names an existing node; the quorum
//! node comes last. Numbers come from `index=` when given, otherwise from a counter.
//!
//! An NBD source with `tls='yes'` names TLS credentials `libvirt-N-storage-tls0`,
//! which the caller must define (`-object tls-creds-x509,id=...`).

use std::collections::HashSet;

use serde_json::{Map, Value, json};

use crate::model::*;

/// The node name of the quorum node itself (always under 32 bytes).
pub fn quorum_node_name(cfg: &DiskConfig) -> String {
    let name = format!("libvirt-quorum-{}", cfg.target.dev);
    if name.len() < 32 {
        name
    } else {
        "libvirt-quorum".to_string()
    }
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
                let id = format!("{}-tls0", name.unwrap_or("libvirt-storage"));
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
fn emit(layer: &StorageSource, read_only: bool, out: &mut Vec<Value>, names: &mut Namer) -> String {
    let below = match &layer.backing {
        Backing::Store(b) => Some(emit(b, true, out, names)),
        _ => None,
    };
    let n = names.number(layer.index);
    let storage_name = format!("libvirt-{n}-storage");
    out.push(Value::Object(storage(
        &layer.source,
        Some(&storage_name),
        read_only,
    )));
    match layer.format {
        ImageFormat::Raw => storage_name,
        ImageFormat::Qcow2 => {
            let format_name = format!("libvirt-{n}-format");
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
/// first, then the quorum node (named by [`quorum_node_name`]).
pub fn blockdev_args(cfg: &DiskConfig) -> Vec<Value> {
    let mut out = Vec::new();
    let mut names = Namer::new(cfg);
    let children: Vec<String> = cfg
        .replicas
        .iter()
        .map(|r| emit(r, cfg.readonly, &mut out, &mut names))
        .collect();
    let mut q = Map::new();
    quorum_options(cfg, &mut q);
    q.insert("node-name".into(), json!(quorum_node_name(cfg)));
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
    blockdev_args(cfg)
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
        node = keyval(&quorum_node_name(cfg)),
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
