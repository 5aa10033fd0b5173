//! XML text → [`DiskConfig`], collecting every semantic error of a well-formed document.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use roxmltree::{Attribute, Document, Node};

use crate::Loaded;
use crate::error::{ConfigError, ConfigErrors, ErrorKind};
use crate::identity::{Identity, identify};
use crate::libvirt::NAMESPACE;
use crate::model::*;
use crate::syntax;

/// Deepest backing chain accepted (layers below a replica's top image).
pub const MAX_CHAIN_DEPTH: usize = 32;

/// Most errors reported for one document. Past this, one more line says how
/// many were left out (kind [`ErrorKind::Omitted`], placed at the first one
/// left out): a document that is wrong thousands of times over is usually
/// wrong in one way, and the first errors show it.
pub const MAX_ERRORS: usize = 20;

/// Parse and validate `text`. See [`crate::parse_str`]; with `use_fs`, layers
/// are also compared by device and inode (see [`crate::load`]).
pub(crate) fn parse(
    text: &str,
    file: &str,
    base_dir: &Path,
    target: Option<&str>,
    use_fs: bool,
) -> Result<Loaded, ConfigErrors> {
    let doc = match Document::parse(text) {
        Ok(d) => d,
        Err(e) => {
            let (line, col, message) = syntax::describe(text, &e);
            return Err(ConfigError {
                file: file.to_string(),
                line,
                col,
                kind: ErrorKind::Xml,
                message,
            }
            .into());
        }
    };
    let base_dir = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
    let mut p = Parser {
        positions: syntax::Positions::new(text),
        use_fs,
        file,
        base_dir: &base_dir,
        errors: Vec::new(),
        notes: Vec::new(),
        layers: Vec::new(),
        in_metadata: false,
    };
    let cfg = p.root(&doc, target);
    match cfg {
        Some((disk, socket)) if p.errors.is_empty() => {
            p.notes.sort_by_key(|e| (e.line, e.col));
            Ok(Loaded {
                disk,
                socket,
                notes: p.notes,
            })
        }
        _ => {
            let mut errors = p.errors;
            errors.sort_by_key(|e| (e.line, e.col));
            if errors.len() > MAX_ERRORS {
                let more = errors.len() - MAX_ERRORS;
                let first_left_out = &errors[MAX_ERRORS];
                let note = ConfigError {
                    file: file.to_string(),
                    line: first_left_out.line,
                    col: first_left_out.col,
                    kind: ErrorKind::Omitted,
                    message: format!(
                        "{more} more error{} from here on not shown",
                        if more == 1 { "" } else { "s" }
                    ),
                };
                errors.truncate(MAX_ERRORS);
                errors.push(note);
            }
            Err(ConfigErrors(errors))
        }
    }
}

/// One storage layer seen while parsing, for the duplicate-path rule.
struct LayerSeen {
    replica: usize,
    depth: usize,
    /// The path (or NBD address) as written out in full.
    name: String,
    /// Equal for layers that are one file.
    key: Identity,
    pos: (u32, u32),
}

struct Parser<'a> {
    /// Line/column lookups: one pass over the text, then cheap per error.
    positions: syntax::Positions<'a>,
    /// Compare layers by device and inode too (see [`crate::load`]).
    use_fs: bool,
    file: &'a str,
    base_dir: &'a Path,
    errors: Vec<ConfigError>,
    /// What was accepted but ignored ([`ErrorKind::Note`]).
    notes: Vec<ConfigError>,
    layers: Vec<LayerSeen>,
    /// Parsing a disk kept in the domain's `<metadata>`: elements in our
    /// namespace count as ours (`virsh metadata --set` puts them all there).
    in_metadata: bool,
}

const PREFIXES: [&str; 6] = ["fd", "hd", "sd", "vd", "xvd", "ubd"];

/// `(fd|hd|sd|vd|xvd|ubd)[a-zA-Z0-9_]+`, matched whole.
pub fn is_valid_target_dev(dev: &str) -> bool {
    PREFIXES.iter().any(|p| {
        dev.strip_prefix(p).is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
    })
}

fn is_elem(n: &Node<'_, '_>, name: &str) -> bool {
    n.is_element() && n.tag_name().name() == name && n.tag_name().namespace().is_none()
}

/// Element `name` in no namespace or in ours, whatever the prefix.
fn is_ours(n: &Node<'_, '_>, name: &str) -> bool {
    n.is_element()
        && n.tag_name().name() == name
        && matches!(n.tag_name().namespace(), None | Some(NAMESPACE))
}

/// Disk elements that `virsh dumpxml` adds or a libvirt user writes which
/// only concern the guest or QEMU, never the replicas: accepted, ignored,
/// and noted.
const IGNORED_DISK_ELEMENTS: [&str; 9] = [
    "address",
    "boot",
    "iotune",
    "blockio",
    "geometry",
    "wwn",
    "vendor",
    "product",
    "throttlefilters",
];

/// Attributes of the same kind, per element.
fn ignored_attribute(elem: &str, attr: &str) -> bool {
    match elem {
        "driver" => matches!(
            attr,
            "cache"
                | "io"
                | "discard"
                | "detect_zeroes"
                | "error_policy"
                | "rerror_policy"
                | "iothread"
                | "queues"
                | "queue_size"
                | "copy_on_read"
                | "ioeventfd"
                | "event_idx"
                | "iommu"
                | "ats"
                | "packed"
                | "page_per_vq"
                | "metadata_cache"
        ),
        "target" => matches!(attr, "tray" | "removable" | "rotation_rate"),
        _ => false,
    }
}

fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The disk a domain document names: a device, or an export in our metadata.
enum Picked<'a, 'i> {
    Device(Node<'a, 'i>),
    Export(Node<'a, 'i>),
}

/// Collects the known child elements of one element, reporting unknown and repeated ones.
struct Children<'a, 'input> {
    found: Vec<(&'static str, Node<'a, 'input>)>,
}

impl<'a, 'input> Children<'a, 'input> {
    fn one(&self, name: &str) -> Option<Node<'a, 'input>> {
        self.found.iter().find(|(n, _)| *n == name).map(|(_, e)| *e)
    }
    fn all(&self, name: &str) -> impl Iterator<Item = Node<'a, 'input>> + '_ {
        let name = name.to_string();
        self.found
            .iter()
            .filter(move |(n, _)| *n == name)
            .map(|(_, e)| *e)
    }
}

impl Parser<'_> {
    fn pos(&self, offset: usize) -> (u32, u32) {
        self.positions.line_col(offset)
    }

    fn push(&mut self, pos: (u32, u32), kind: ErrorKind, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: pos.0,
            col: pos.1,
            kind,
            message,
        });
    }

    fn note(&mut self, pos: (u32, u32), message: String) {
        self.notes.push(ConfigError {
            file: self.file.to_string(),
            line: pos.0,
            col: pos.1,
            kind: ErrorKind::Note,
            message,
        });
    }

    /// An element of ours: no namespace, or ours inside `<metadata>`.
    fn ns_ok(&self, n: &Node<'_, '_>) -> bool {
        match n.tag_name().namespace() {
            None => true,
            Some(ns) => self.in_metadata && ns == NAMESPACE,
        }
    }

    fn err_node(&mut self, n: Node<'_, '_>, kind: ErrorKind, message: String) {
        let pos = self.pos(n.range().start);
        self.push(pos, kind, message);
    }

    fn err_attr(&mut self, a: &Attribute<'_, '_>, kind: ErrorKind, message: String) {
        let pos = self.pos(a.range().start);
        self.push(pos, kind, message);
    }

    /// Report attributes not in `allowed`. `foreign` lists attributes that belong to
    /// the same element under another `type`, with a note that says so.
    fn check_attrs(&mut self, n: Node<'_, '_>, allowed: &[&str], foreign: &[&str], note: &str) {
        let elem = n.tag_name().name();
        for a in n.attributes() {
            let ok = a.namespace().is_none() && allowed.contains(&a.name());
            if ok {
                continue;
            }
            if a.namespace().is_none() && ignored_attribute(elem, a.name()) {
                let pos = self.pos(a.range().start);
                self.note(
                    pos,
                    format!(
                        "ignored attribute '{}' of <{elem}>: it concerns the guest or QEMU, \
                         not the replicas",
                        a.name()
                    ),
                );
                continue;
            }
            let msg = if a.namespace().is_none() && foreign.contains(&a.name()) {
                format!("attribute '{}' does not belong to {note}", a.name())
            } else {
                format!("unknown attribute '{}' on element <{elem}>", a.name())
            };
            self.err_attr(&a, ErrorKind::Xml, msg);
        }
    }

    /// Sort the children of `n` into `known` names; report the rest, and text.
    fn children<'a, 'input>(
        &mut self,
        n: Node<'a, 'input>,
        known: &[&'static str],
        repeatable: &[&'static str],
        foreign: &[&str],
        note: &str,
    ) -> Children<'a, 'input> {
        let parent = n.tag_name().name();
        let mut found: Vec<(&'static str, Node<'a, 'input>)> = Vec::new();
        // Which `known` names were seen, so a repeat costs O(1), not a scan of `found`.
        let mut seen = vec![false; known.len()];
        for c in n.children() {
            if c.is_text() {
                let t = c.text().unwrap_or("").trim();
                if !t.is_empty() {
                    let shown: String = t.chars().take(20).collect();
                    self.err_node(
                        c,
                        ErrorKind::Xml,
                        format!("unexpected text '{shown}' in element <{parent}>"),
                    );
                }
                continue;
            }
            if !c.is_element() {
                continue;
            }
            let name = c.tag_name().name();
            let ours = self.ns_ok(&c);
            let hit = known.iter().position(|k| *k == name && ours);
            let again = hit.is_some_and(|i| std::mem::replace(&mut seen[i], true));
            match hit.map(|i| &known[i]) {
                Some(k) if again && !repeatable.contains(k) => {
                    self.err_node(
                        c,
                        ErrorKind::Xml,
                        format!("element <{name}> is given more than once in <{parent}>"),
                    );
                }
                Some(k) => found.push((k, c)),
                None if ours && parent == "disk" && IGNORED_DISK_ELEMENTS.contains(&name) => {
                    let pos = self.pos(c.range().start);
                    self.note(
                        pos,
                        format!(
                            "ignored element <{name}>: it concerns the guest or QEMU, not the \
                             replicas"
                        ),
                    );
                }
                None if ours && foreign.contains(&name) => {
                    self.err_node(
                        c,
                        ErrorKind::Xml,
                        format!("element <{name}> does not belong to {note}"),
                    );
                }
                None => self.err_node(
                    c,
                    ErrorKind::Xml,
                    format!("unknown element <{name}> in <{parent}>"),
                ),
            }
        }
        Children { found }
    }

    fn no_children(&mut self, n: Node<'_, '_>) {
        self.children(n, &[], &[], &[], "");
    }

    fn root(
        &mut self,
        doc: &Document<'_>,
        target: Option<&str>,
    ) -> Option<(DiskConfig, Option<PathBuf>)> {
        let root = doc.root_element();
        if is_elem(&root, "disk") {
            let dev = disk_target_dev(root);
            if let Some(want) = target
                && dev != Some(want)
            {
                self.err_node(
                    root,
                    ErrorKind::InvalidArg,
                    format!("no disk with target dev '{want}' in this document"),
                );
                return None;
            }
            return self.disk(root).map(|d| (d, None));
        }
        let picked = if is_elem(&root, "domain") {
            let exports = self.metadata_exports(root);
            self.pick_from_domain(root, target, &exports)?
        } else if root.tag_name().namespace() == Some(NAMESPACE)
            || (root.tag_name().namespace().is_none() && root.tag_name().name() == "disks")
        {
            // What `virsh metadata DOMAIN URI` prints: our element alone,
            // which libvirt prints without its namespace.
            let exports = self.exports_of(root);
            self.pick_export(root, target, &exports)?
        } else {
            self.err_node(
                root,
                ErrorKind::Xml,
                format!(
                    "root element must be <disk> or <domain>, not <{}>",
                    root.tag_name().name()
                ),
            );
            return None;
        };
        match picked {
            Picked::Device(d) => self.disk(d).map(|d| (d, None)),
            Picked::Export(e) => self.export(e),
        }
    }

    fn pick_from_domain<'a, 'i>(
        &mut self,
        domain: Node<'a, 'i>,
        target: Option<&str>,
        exports: &[Node<'a, 'i>],
    ) -> Option<Picked<'a, 'i>> {
        let disks: Vec<_> = domain
            .children()
            .filter(|c| is_elem(c, "devices"))
            .flat_map(|d| d.children())
            .filter(|c| is_elem(c, "disk"))
            .collect();
        let is_quorum = |d: &Node<'_, '_>| d.attribute("type") == Some("quorum");
        let Some(want) = target else {
            if let Some(d) = disks.iter().find(|d| is_quorum(d)) {
                return Some(Picked::Device(*d));
            }
            if let Some(e) = exports.first() {
                return Some(Picked::Export(*e));
            }
            self.err_node(
                domain,
                ErrorKind::Xml,
                format!(
                    "no <disk type='quorum'> under <devices> in the domain, nor in its \
                     <metadata> under namespace '{NAMESPACE}'"
                ),
            );
            return None;
        };
        let named = |d: &&Node<'a, 'i>| disk_target_dev(**d) == Some(want);
        if let Some(d) = disks.iter().filter(named).find(|d| is_quorum(d)) {
            return Some(Picked::Device(*d));
        }
        if let Some(e) = exports.iter().find(|e| e.attribute("target") == Some(want)) {
            return Some(Picked::Export(*e));
        }
        if let Some(d) = disks.iter().find(named) {
            // Not a quorum disk: `disk` says so, at its type.
            return Some(Picked::Device(*d));
        }
        self.err_node(
            domain,
            ErrorKind::InvalidArg,
            format!("no disk with target dev '{want}' in the domain"),
        );
        None
    }

    /// Pick an export of our metadata element `top` (root of the document).
    fn pick_export<'a, 'i>(
        &mut self,
        top: Node<'a, 'i>,
        target: Option<&str>,
        exports: &[Node<'a, 'i>],
    ) -> Option<Picked<'a, 'i>> {
        let found = match target {
            None => exports.first(),
            Some(want) => exports.iter().find(|e| e.attribute("target") == Some(want)),
        };
        if found.is_none() {
            let msg = match target {
                None => "no <export> in this document".to_string(),
                Some(want) => format!("no disk with target dev '{want}' in this document"),
            };
            let kind = if target.is_some() {
                ErrorKind::InvalidArg
            } else {
                ErrorKind::Xml
            };
            self.err_node(top, kind, msg);
        }
        found.map(|e| Picked::Export(*e))
    }

    /// The `<export>` elements of the domain's metadata under our namespace.
    /// libvirt keeps one element per namespace in `<metadata>`; a second is
    /// an error here too.
    fn metadata_exports<'a, 'i>(&mut self, domain: Node<'a, 'i>) -> Vec<Node<'a, 'i>> {
        let mut first: Option<Node<'a, 'i>> = None;
        let tops: Vec<_> = domain
            .children()
            .filter(|c| is_elem(c, "metadata"))
            .flat_map(|m| m.children())
            .filter(|c| c.is_element() && c.tag_name().namespace() == Some(NAMESPACE))
            .collect();
        for c in tops {
            match first {
                None => first = Some(c),
                Some(f) => {
                    let (l, col) = self.pos(f.range().start);
                    let msg = format!(
                        "more than one element in namespace '{NAMESPACE}' in <metadata> \
                         (libvirt keeps one per namespace; the first is at line {l}, column {col})"
                    );
                    self.err_node(c, ErrorKind::Xml, msg);
                }
            }
        }
        match first {
            Some(top) => self.exports_of(top),
            None => Vec::new(),
        }
    }

    /// The `<export>` children of our top-level metadata element `<disks>`.
    fn exports_of<'a, 'i>(&mut self, top: Node<'a, 'i>) -> Vec<Node<'a, 'i>> {
        if top.tag_name().name() != "disks" {
            let msg = format!(
                "unknown element <{}> in namespace '{NAMESPACE}' (expected <disks>)",
                top.tag_name().name()
            );
            self.err_node(top, ErrorKind::Xml, msg);
            return Vec::new();
        }
        self.check_attrs(top, &[], &[], "");
        let was = std::mem::replace(&mut self.in_metadata, true);
        let kids = self.children(top, &["export"], &["export"], &[], "");
        self.in_metadata = was;
        let exports: Vec<_> = kids.all("export").collect();
        let mut seen: HashMap<&str, (u32, u32)> = HashMap::new();
        for e in &exports {
            let Some(a) = e.attribute_node("target") else {
                continue;
            };
            let pos = self.pos(a.range().start);
            if let Some(first) = seen.get(a.value()) {
                let msg = format!(
                    "target '{}' has more than one <export> (the first is at line {}, column {})",
                    a.value(),
                    first.0,
                    first.1
                );
                self.err_attr(&a, ErrorKind::Xml, msg);
            } else {
                seen.insert(a.value(), pos);
            }
        }
        exports
    }

    /// One `<export target= socket=>` holding a quorum `<disk>`.
    fn export(&mut self, e: Node<'_, '_>) -> Option<(DiskConfig, Option<PathBuf>)> {
        self.check_attrs(e, &["target", "socket"], &[], "");
        let was = std::mem::replace(&mut self.in_metadata, true);
        let kids = self.children(e, &["disk"], &[], &[], "");
        let target = match e.attribute_node("target") {
            None => {
                self.err_node(e, ErrorKind::Xml, "missing export target".into());
                None
            }
            Some(a) => Some(a),
        };
        let socket = match e.attribute_node("socket") {
            None => {
                self.err_node(e, ErrorKind::Xml, "missing export socket".into());
                None
            }
            Some(a) if a.value().is_empty() => {
                self.err_attr(&a, ErrorKind::Xml, "empty export socket".into());
                None
            }
            Some(a) => Some(self.base_dir.join(a.value())),
        };
        let cfg = match kids.one("disk") {
            None => {
                self.err_node(e, ErrorKind::Xml, "missing <disk> in <export>".into());
                None
            }
            Some(d) => self.disk(d),
        };
        self.in_metadata = was;
        let cfg = cfg?;
        if let Some(a) = target
            && a.value() != cfg.target.dev
        {
            let msg = format!(
                "export target '{}' does not match its disk's target dev '{}'",
                a.value(),
                cfg.target.dev
            );
            self.err_attr(&a, ErrorKind::Xml, msg);
        }
        Some((cfg, socket))
    }

    fn disk(&mut self, disk: Node<'_, '_>) -> Option<DiskConfig> {
        self.check_attrs(disk, &["type", "device"], &[], "");
        match disk.attribute_node("type") {
            None => self.err_node(disk, ErrorKind::Xml, "missing disk type".into()),
            Some(a) if a.value() == "quorum" => {}
            Some(a) => {
                // Its content is some other kind of disk: judging it as a quorum is noise.
                let msg = format!("disk type '{}' is not a quorum disk", a.value());
                self.err_attr(&a, ErrorKind::Unsupported, msg);
                return None;
            }
        }
        let device = match disk.attribute_node("device") {
            None => DeviceKind::Disk,
            Some(a) => match a.value() {
                "disk" => DeviceKind::Disk,
                v @ ("lun" | "cdrom" | "floppy") => {
                    let msg = format!("disk device '{v}' is not supported for a quorum disk");
                    self.err_attr(&a, ErrorKind::Unsupported, msg);
                    DeviceKind::Disk
                }
                v => {
                    self.err_attr(&a, ErrorKind::Xml, format!("unknown disk device '{v}'"));
                    DeviceKind::Disk
                }
            },
        };

        let kids = self.children(
            disk,
            &[
                "driver",
                "threshold",
                "backingStore",
                "target",
                "readonly",
                "shareable",
                "serial",
                "alias",
            ],
            &["backingStore"],
            &[],
            "",
        );

        let (driver, driver_node) = match kids.one("driver") {
            Some(d) => (self.driver(d), Some(d)),
            None => (DriverOptions::default(), None),
        };
        let threshold_node = kids.one("threshold");
        let threshold = match threshold_node {
            Some(t) => self.threshold(t),
            None => {
                self.err_node(disk, ErrorKind::Xml, "missing disk threshold".into());
                None
            }
        };

        let store_nodes: Vec<_> = kids.all("backingStore").collect();
        let mut replicas = Vec::new();
        for (i, n) in store_nodes.iter().enumerate() {
            if is_empty_store(*n) {
                self.err_node(
                    *n,
                    ErrorKind::Xml,
                    "a replica cannot be an empty <backingStore/>".into(),
                );
                continue;
            }
            if let Some(s) = self.layer(*n, i, 0) {
                replicas.push(s);
            }
        }
        if store_nodes.is_empty() {
            self.err_node(
                disk,
                ErrorKind::Xml,
                "missing quorum replicas: add at least one <backingStore>".into(),
            );
        }

        let target = match kids.one("target") {
            Some(t) => self.target(t),
            None => {
                self.err_node(disk, ErrorKind::Xml, "missing disk target".into());
                None
            }
        };
        let readonly = kids.one("readonly");
        let shareable = kids.one("shareable");
        for n in [readonly, shareable].into_iter().flatten() {
            self.check_attrs(n, &[], &[], "");
            self.no_children(n);
        }
        let serial = kids.one("serial").map(|n| self.serial(n));
        let alias = kids.one("alias").and_then(|n| self.alias(n));

        self.cross_checks(
            threshold_node,
            threshold,
            store_nodes.len(),
            driver_node,
            &driver,
            readonly,
        );
        self.duplicates();
        self.indexes(&store_nodes);

        Some(DiskConfig {
            device,
            driver,
            threshold: threshold?,
            replicas,
            target: target?,
            readonly: readonly.is_some(),
            shareable: shareable.is_some(),
            serial,
            alias,
        })
    }

    fn driver(&mut self, d: Node<'_, '_>) -> DriverOptions {
        self.check_attrs(
            d,
            &[
                "name",
                "type",
                "read_pattern",
                "rewrite_corrupted",
                "blkverify",
            ],
            &[],
            "",
        );
        self.no_children(d);
        if let Some(a) = d.attribute_node("type")
            && a.value() != "quorum"
        {
            let msg = format!(
                "driver type '{}' is not supported for a quorum disk, only 'quorum'",
                a.value()
            );
            self.err_attr(&a, ErrorKind::Unsupported, msg);
        }
        let read_pattern = match d.attribute_node("read_pattern") {
            None => ReadPattern::Quorum,
            Some(a) => match a.value() {
                "quorum" => ReadPattern::Quorum,
                "fifo" => ReadPattern::Fifo,
                v => {
                    let msg = format!("unknown read_pattern '{v}' (expected 'quorum' or 'fifo')");
                    self.err_attr(&a, ErrorKind::Xml, msg);
                    ReadPattern::Quorum
                }
            },
        };
        DriverOptions {
            name: d.attribute("name").map(str::to_string),
            read_pattern,
            rewrite_corrupted: self.on_off(d, "rewrite_corrupted"),
            blkverify: self.on_off(d, "blkverify"),
        }
    }

    fn on_off(&mut self, n: Node<'_, '_>, attr: &str) -> bool {
        match n.attribute_node(attr) {
            None => false,
            Some(a) => match a.value() {
                "on" => true,
                "off" => false,
                v => {
                    let msg = format!("invalid {attr} value '{v}' (expected 'on' or 'off')");
                    self.err_attr(&a, ErrorKind::Xml, msg);
                    false
                }
            },
        }
    }

    fn threshold(&mut self, t: Node<'_, '_>) -> Option<u32> {
        self.check_attrs(t, &["value"], &[], "");
        self.no_children(t);
        let Some(a) = t.attribute_node("value") else {
            self.err_node(t, ErrorKind::Xml, "missing threshold value".into());
            return None;
        };
        match parse_decimal(a.value()).and_then(|v| u32::try_from(v).ok()) {
            Some(0) => {
                let msg = "quorum threshold must be at least 1".to_string();
                self.err_attr(&a, ErrorKind::Unsupported, msg);
                None
            }
            Some(v) => Some(v),
            None => {
                let msg = format!("invalid threshold value '{}'", a.value());
                self.err_attr(&a, ErrorKind::Xml, msg);
                None
            }
        }
    }

    fn target(&mut self, t: Node<'_, '_>) -> Option<Target> {
        self.check_attrs(t, &["dev", "bus"], &[], "");
        self.no_children(t);
        let Some(dev) = t.attribute_node("dev") else {
            self.err_node(t, ErrorKind::Xml, "missing target dev".into());
            return None;
        };
        if !is_valid_target_dev(dev.value()) {
            let msg = format!(
                "invalid target dev '{}': expected a name like 'vda' (fd, hd, sd, vd, xvd or ubd, then letters, digits or '_')",
                dev.value()
            );
            self.err_attr(&dev, ErrorKind::Xml, msg);
            return None;
        }
        Some(Target {
            dev: dev.value().to_string(),
            bus: t.attribute("bus").map(str::to_string),
        })
    }

    fn serial(&mut self, n: Node<'_, '_>) -> String {
        self.check_attrs(n, &[], &[], "");
        let mut s = String::new();
        for c in n.children() {
            if c.is_element() {
                let msg = format!("unknown element <{}> in <serial>", c.tag_name().name());
                self.err_node(c, ErrorKind::Xml, msg);
            } else if let Some(t) = c.text().filter(|_| c.is_text()) {
                s.push_str(t);
            }
        }
        s
    }

    fn alias(&mut self, n: Node<'_, '_>) -> Option<String> {
        self.check_attrs(n, &["name"], &[], "");
        self.no_children(n);
        let name = n.attribute("name");
        if name.is_none() {
            self.err_node(n, ErrorKind::Xml, "missing alias name".into());
        }
        name.map(str::to_string)
    }

    /// One non-empty `<backingStore>`: a replica (depth 0) or a layer of its chain.
    fn layer(&mut self, n: Node<'_, '_>, replica: usize, depth: usize) -> Option<StorageSource> {
        self.check_attrs(n, &["type", "index"], &[], "");
        let kind = match n.attribute_node("type") {
            None => {
                self.err_node(n, ErrorKind::Xml, "missing backing store type".into());
                None
            }
            Some(a) => match a.value() {
                v @ ("file" | "block" | "network") => Some(v),
                v @ ("dir" | "volume" | "nvme" | "vhostuser" | "vhostvdpa") => {
                    let msg = format!(
                        "backing store type '{v}' is not supported (only 'file', 'block' and 'network')"
                    );
                    self.err_attr(&a, ErrorKind::Unsupported, msg);
                    None
                }
                v => {
                    self.err_attr(
                        &a,
                        ErrorKind::Xml,
                        format!("unknown backing store type '{v}'"),
                    );
                    None
                }
            },
        };
        let index = n.attribute_node("index").and_then(|a| {
            let v = parse_decimal(a.value()).and_then(|v| u32::try_from(v).ok());
            if v.is_none() || v == Some(0) {
                let msg = format!(
                    "invalid backing store index '{}' (expected a positive integer)",
                    a.value()
                );
                self.err_attr(&a, ErrorKind::Xml, msg);
                return None;
            }
            v
        });
        let kids = self.children(n, &["format", "source", "backingStore"], &[], &[], "");

        let format = match kids.one("format") {
            None => {
                self.err_node(
                    n,
                    ErrorKind::Xml,
                    "missing disk backing store format".into(),
                );
                None
            }
            Some(f) => self.format(f),
        };
        let source = match (kids.one("source"), kind) {
            (None, _) => {
                self.err_node(
                    n,
                    ErrorKind::Xml,
                    "missing disk backing store source".into(),
                );
                None
            }
            (Some(_), None) => None,
            (Some(s), Some(kind)) => self.source(s, kind),
        };
        if let (Some(s), Some(src)) = (kids.one("source"), &source) {
            let pos = self.pos(s.range().start);
            self.layers.push(LayerSeen {
                replica,
                depth,
                name: display_key(src),
                key: identify(src, self.use_fs),
                pos,
            });
        }

        let backing = match kids.one("backingStore") {
            None => Backing::Unspecified,
            Some(b) if is_empty_store(b) => Backing::End,
            Some(b) if depth + 1 > MAX_CHAIN_DEPTH => {
                let msg = format!("backing chain is deeper than {MAX_CHAIN_DEPTH} layers");
                self.err_node(b, ErrorKind::Unsupported, msg);
                Backing::Unspecified
            }
            Some(b) => {
                let below = self.layer(b, replica, depth + 1);
                if format == Some(ImageFormat::Raw) {
                    self.err_node(
                        b,
                        ErrorKind::Unsupported,
                        "a raw image has no backing store; only qcow2 layers can have one".into(),
                    );
                }
                match below {
                    Some(s) => Backing::Store(Box::new(s)),
                    None => Backing::Unspecified,
                }
            }
        };

        Some(StorageSource {
            index,
            format: format?,
            source: source?,
            backing,
        })
    }

    fn format(&mut self, f: Node<'_, '_>) -> Option<ImageFormat> {
        self.check_attrs(f, &["type"], &[], "");
        self.no_children(f);
        let Some(a) = f.attribute_node("type") else {
            self.err_node(f, ErrorKind::Xml, "missing format type".into());
            return None;
        };
        match a.value() {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            v => {
                let msg =
                    format!("backing store format '{v}' is not supported (only 'raw' and 'qcow2')");
                self.err_attr(&a, ErrorKind::Unsupported, msg);
                None
            }
        }
    }

    fn path_attr(&mut self, s: Node<'_, '_>, attr: &str) -> Option<PathBuf> {
        let Some(a) = s.attribute_node(attr) else {
            self.err_node(s, ErrorKind::Xml, format!("missing source {attr}"));
            return None;
        };
        if a.value().is_empty() {
            self.err_attr(&a, ErrorKind::Xml, format!("empty source {attr}"));
            return None;
        }
        Some(self.base_dir.join(a.value()))
    }

    fn source(&mut self, s: Node<'_, '_>, kind: &str) -> Option<Source> {
        const ALL: [&str; 5] = ["file", "dev", "protocol", "name", "tls"];
        let note = format!("a source of type '{kind}'");
        match kind {
            "file" => {
                self.check_attrs(s, &["file"], &ALL, &note);
                self.children(s, &[], &[], &["host"], &note);
                Some(Source::File {
                    path: self.path_attr(s, "file")?,
                })
            }
            "block" => {
                self.check_attrs(s, &["dev"], &ALL, &note);
                self.children(s, &[], &[], &["host"], &note);
                Some(Source::Block {
                    dev: self.path_attr(s, "dev")?,
                })
            }
            _ => self.network(s, &note, &ALL),
        }
    }

    fn network(&mut self, s: Node<'_, '_>, note: &str, all: &[&str]) -> Option<Source> {
        self.check_attrs(s, &["protocol", "name", "tls"], all, note);
        let kids = self.children(s, &["host"], &["host"], &[], "");
        let protocol_ok = match s.attribute_node("protocol") {
            None => {
                self.err_node(s, ErrorKind::Xml, "missing network source protocol".into());
                false
            }
            Some(a) if a.value() == "nbd" => true,
            Some(a) => {
                let msg = format!(
                    "network protocol '{}' is not supported, only 'nbd'",
                    a.value()
                );
                self.err_attr(&a, ErrorKind::Unsupported, msg);
                false
            }
        };
        let tls = match s.attribute_node("tls") {
            None => None,
            Some(a) => match a.value() {
                "yes" => Some(true),
                "no" => Some(false),
                v => {
                    let msg = format!("invalid tls value '{v}' (expected 'yes' or 'no')");
                    self.err_attr(&a, ErrorKind::Xml, msg);
                    None
                }
            },
        };
        let hosts: Vec<_> = kids.all("host").collect();
        let host = match hosts.as_slice() {
            [] => {
                self.err_node(s, ErrorKind::Xml, "missing host in network source".into());
                None
            }
            [h] => self.host(*h),
            [_, extra, ..] => {
                self.err_node(
                    *extra,
                    ErrorKind::Unsupported,
                    "an nbd source takes exactly one <host>".into(),
                );
                None
            }
        };
        if !protocol_ok {
            return None;
        }
        Some(Source::Nbd {
            export: s.attribute("name").map(str::to_string),
            host: host?,
            tls,
        })
    }

    fn host(&mut self, h: Node<'_, '_>) -> Option<NbdHost> {
        self.no_children(h);
        let transport = h.attribute_node("transport");
        match transport.as_ref().map(|a| a.value()) {
            None | Some("tcp") => {
                self.check_attrs(
                    h,
                    &["name", "port", "transport"],
                    &["socket"],
                    "a host with transport 'tcp' (use transport='unix')",
                );
                let name = match h.attribute_node("name") {
                    Some(a) if a.value().is_empty() => {
                        self.err_attr(&a, ErrorKind::Xml, "empty host name".into());
                        None
                    }
                    Some(a) => Some(a.value().to_string()),
                    None => {
                        self.err_node(h, ErrorKind::Xml, "missing host name".into());
                        None
                    }
                };
                let port = match h.attribute_node("port") {
                    None => Some(10809),
                    Some(a) => {
                        let p = parse_decimal(a.value())
                            .and_then(|v| u16::try_from(v).ok())
                            .filter(|p| *p != 0);
                        if p.is_none() {
                            let msg = format!("invalid port '{}' (expected 1 to 65535)", a.value());
                            self.err_attr(&a, ErrorKind::Xml, msg);
                        }
                        p
                    }
                };
                Some(NbdHost::Tcp {
                    name: name?,
                    port: port?,
                })
            }
            Some("unix") => {
                self.check_attrs(
                    h,
                    &["socket", "transport"],
                    &["name", "port"],
                    "a host with transport 'unix'",
                );
                let Some(a) = h.attribute_node("socket") else {
                    self.err_node(
                        h,
                        ErrorKind::Xml,
                        "missing socket for host transport 'unix'".into(),
                    );
                    return None;
                };
                if a.value().is_empty() {
                    self.err_attr(&a, ErrorKind::Xml, "empty host socket".into());
                    return None;
                }
                Some(NbdHost::Unix {
                    socket: self.base_dir.join(a.value()),
                })
            }
            Some(v) => {
                let msg = format!("host transport '{v}' is not supported (only 'tcp' and 'unix')");
                let a = transport.expect("matched Some");
                self.err_attr(&a, ErrorKind::Unsupported, msg);
                None
            }
        }
    }

    fn cross_checks(
        &mut self,
        threshold_node: Option<Node<'_, '_>>,
        threshold: Option<u32>,
        n: usize,
        driver_node: Option<Node<'_, '_>>,
        driver: &DriverOptions,
        readonly: Option<Node<'_, '_>>,
    ) {
        if let (Some(t), Some(tn)) = (threshold, threshold_node)
            && n > 0
            && t as usize > n
        {
            let msg = format!("quorum threshold {t} exceeds the number of replicas ({n})");
            self.err_node(tn, ErrorKind::Unsupported, msg);
        }
        let Some(d) = driver_node else { return };
        let attr = |name: &str| {
            d.attribute_node(name)
                .expect("attribute was parsed as 'on'")
        };
        if driver.blkverify && (n != 2 || threshold != Some(2)) {
            self.err_attr(
                &attr("blkverify"),
                ErrorKind::Unsupported,
                "blkverify='on' needs exactly 2 replicas and threshold 2".into(),
            );
        }
        if driver.blkverify && driver.rewrite_corrupted {
            self.err_attr(
                &attr("rewrite_corrupted"),
                ErrorKind::Unsupported,
                "rewrite_corrupted='on' cannot be used with blkverify='on'".into(),
            );
        }
        if driver.rewrite_corrupted && readonly.is_some() {
            self.err_attr(
                &attr("rewrite_corrupted"),
                ErrorKind::Unsupported,
                "rewrite_corrupted='on' cannot be used on a <readonly/> disk".into(),
            );
        }
    }

    /// A replica's top layer may appear nowhere else; shared read-only bases are fine,
    /// but a layer may not repeat inside its own chain.
    ///
    /// Each layer is compared with the earliest earlier layer it clashes with:
    /// for a top layer, the first use of its path; below the top, the first top
    /// layer or the first layer of its own replica with that path. Kept per path,
    /// so the check is linear in the number of layers.
    fn duplicates(&mut self) {
        #[derive(Default)]
        struct FirstUses {
            any: Option<usize>,
            top: Option<usize>,
            by_replica: HashMap<usize, usize>,
        }
        let layers = std::mem::take(&mut self.layers);
        let mut seen: HashMap<&Identity, FirstUses> = HashMap::new();
        for (i, l) in layers.iter().enumerate() {
            let uses = seen.entry(&l.key).or_default();
            let clash = if l.depth == 0 {
                uses.any
            } else {
                match (uses.top, uses.by_replica.get(&l.replica)) {
                    (Some(a), Some(&b)) => Some(a.min(b)),
                    (a, b) => a.or(b.copied()),
                }
            };
            uses.any.get_or_insert(i);
            if l.depth == 0 {
                uses.top.get_or_insert(i);
            }
            uses.by_replica.entry(l.replica).or_insert(i);
            if let Some(first) = clash.map(|j| &layers[j]) {
                let msg = if first.name == l.name {
                    format!(
                        "replica path '{}' is used more than once (first at line {}, column {})",
                        l.name, first.pos.0, first.pos.1
                    )
                } else {
                    format!(
                        "replica path '{}' is the same file as '{}' ({}; first at line {}, \
                         column {}): one file can only be one replica",
                        l.name,
                        first.name,
                        l.key.reason(),
                        first.pos.0,
                        first.pos.1
                    )
                };
                self.push(l.pos, ErrorKind::Unsupported, msg);
            }
        }
    }

    /// `index` values must be unique over the whole disk.
    fn indexes(&mut self, stores: &[Node<'_, '_>]) {
        let mut seen = std::collections::HashSet::new();
        let mut todo: Vec<Node<'_, '_>> = stores.to_vec();
        let mut all = Vec::new();
        while let Some(n) = todo.pop() {
            all.push(n);
            todo.extend(n.children().filter(|c| is_ours(c, "backingStore")));
        }
        all.sort_by_key(|n| n.range().start);
        for n in all {
            let Some(a) = n.attribute_node("index") else {
                continue;
            };
            let Some(v) = parse_decimal(a.value()) else {
                continue;
            };
            if !seen.insert(v) {
                let msg = format!("backing store index '{}' is used more than once", a.value());
                self.err_attr(&a, ErrorKind::Xml, msg);
            }
        }
    }
}

fn display_key(s: &Source) -> String {
    StorageSource {
        index: None,
        format: ImageFormat::Raw,
        source: s.clone(),
        backing: Backing::Unspecified,
    }
    .display_name()
}

/// `<backingStore/>` with no attributes and no element children ends a chain.
fn is_empty_store(n: Node<'_, '_>) -> bool {
    n.attributes().len() == 0 && !n.children().any(|c| c.is_element())
}

fn disk_target_dev<'a>(disk: Node<'a, '_>) -> Option<&'a str> {
    disk.children()
        .find(|c| is_ours(c, "target"))
        .and_then(|t| t.attribute("dev"))
}
