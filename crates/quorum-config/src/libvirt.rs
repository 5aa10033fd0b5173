//! Quorum disks in a stock libvirt domain.
//!
//! libvirt refuses `<disk type='quorum'>`, but keeps any element of a
//! foreign namespace in `<metadata>` verbatim. A domain that stock libvirt
//! runs therefore carries each quorum disk there, and sees in `<devices>`
//! only an ordinary NBD disk on the unix socket `quorum serve` listens on:
//!
//! ```xml
//! <metadata>
//!   <quorum:disks xmlns:quorum='https://quorum.dev/xmlns/libvirt/1'>
//!     <quorum:export target='vda' socket='/run/quorum/demo/vda.sock'>
//!       <quorum:disk type='quorum' device='disk'>...</quorum:disk>
//!     </quorum:export>
//!   </quorum:disks>
//! </metadata>
//! ```
//!
//! One top-level element (`<disks>`) per namespace, as libvirt wants; one
//! `<export>` per quorum disk, naming its target dev and socket. Elements are
//! matched by local name in our namespace or none, whatever their prefix:
//! `virsh metadata --set` puts every element into the namespace.

/// The XML namespace of quorum's element in a domain's `<metadata>`.
pub const NAMESPACE: &str = "https://quorum.dev/xmlns/libvirt/1";

use std::ops::Range;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};

use crate::error::{ConfigError, ConfigErrors, ErrorKind};
use crate::model::DiskConfig;
use crate::{parse, syntax};

/// The prefix `to-libvirt` writes our elements with.
pub const PREFIX: &str = "quorum";

/// Where `quorum serve` listens for QEMU by default: `/run/quorum`.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/quorum";

/// Longest unix socket path the kernel takes (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Disk elements that describe the guest's view (or QEMU's handling) of a
/// disk: moved onto the NBD frontend by [`to_libvirt`] and back by
/// [`from_libvirt`]. The quorum parser notes and ignores them.
const FRONTEND_ELEMENTS: [&str; 9] = [
    "boot",
    "address",
    "iotune",
    "blockio",
    "geometry",
    "wwn",
    "vendor",
    "product",
    "throttlefilters",
];

/// `<driver>` attributes that go with the frontend likewise.
const FRONTEND_DRIVER_ATTRS: [&str; 17] = [
    "cache",
    "io",
    "discard",
    "detect_zeroes",
    "error_policy",
    "rerror_policy",
    "iothread",
    "queues",
    "queue_size",
    "copy_on_read",
    "ioeventfd",
    "event_idx",
    "iommu",
    "ats",
    "packed",
    "page_per_vq",
    "metadata_cache",
];

/// The runtime directory of one domain: `RUNTIME_DIR/NAME`.
pub fn domain_dir(runtime_dir: &Path, domain: &str) -> PathBuf {
    runtime_dir.join(domain)
}

/// The socket of one quorum disk: `RUNTIME_DIR/NAME/DEV.sock`.
pub fn socket_path(runtime_dir: &Path, domain: &str, dev: &str) -> PathBuf {
    domain_dir(runtime_dir, domain).join(format!("{dev}.sock"))
}

/// One quorum disk of a domain, as kept in its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The disk's target dev.
    pub target: String,
    /// Where QEMU expects the NBD export.
    pub socket: PathBuf,
    /// The disk.
    pub disk: DiskConfig,
}

/// What a domain document says about its quorum disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisks {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`, when written.
    pub uuid: Option<String>,
    /// The exports in our metadata, in document order.
    pub exports: Vec<Export>,
    /// The DAC `<seclabel model='dac'>`'s `<label>` (e.g. `+64055:+994`), if any.
    pub dac_label: Option<String>,
}

struct Ctx<'a> {
    text: &'a str,
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, offset: usize, kind: ErrorKind, message: String) -> ConfigErrors {
        let (line, col) = syntax::line_col(self.text, offset);
        ConfigError {
            file: self.file.to_string(),
            line,
            col,
            kind,
            message,
        }
        .into()
    }

    fn doc(&self) -> Result<Document<'_>, ConfigErrors> {
        Document::parse(self.text).map_err(|e| {
            let (line, col, message) = syntax::describe(self.text, &e);
            ConfigErrors(vec![ConfigError {
                file: self.file.to_string(),
                line,
                col,
                kind: ErrorKind::Xml,
                message,
            }])
        })
    }
}

fn plain<'a, 'i>(n: Node<'a, 'i>, name: &str) -> bool {
    n.is_element() && n.tag_name().name() == name && n.tag_name().namespace().is_none()
}

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children().find(|c| plain(*c, name))
}

fn domain_root<'a, 'i>(ctx: &Ctx<'_>, doc: &'a Document<'i>) -> Result<Node<'a, 'i>, ConfigErrors> {
    let root = doc.root_element();
    if !plain(root, "domain") {
        return Err(ctx.err(
            root.range().start,
            ErrorKind::Xml,
            format!(
                "root element must be <domain>, not <{}>",
                root.tag_name().name()
            ),
        ));
    }
    Ok(root)
}

/// `<name>`, checked to be usable as one folder name.
fn domain_name(ctx: &Ctx<'_>, domain: Node<'_, '_>) -> Result<String, ConfigErrors> {
    let Some(n) = child(domain, "name") else {
        return Err(ctx.err(
            domain.range().start,
            ErrorKind::Xml,
            "missing domain name".into(),
        ));
    };
    let name = n.text().unwrap_or("").trim().to_string();
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(ctx.err(
            n.range().start,
            ErrorKind::Xml,
            format!("domain name '{name}' cannot name a runtime folder"),
        ));
    }
    Ok(name)
}

fn text_of(n: Node<'_, '_>) -> Option<String> {
    n.text().map(|t| t.trim().to_string())
}

fn our_top<'a, 'i>(domain: Node<'a, 'i>) -> Option<Node<'a, 'i>> {
    domain
        .children()
        .filter(|c| plain(*c, "metadata"))
        .flat_map(|m| m.children())
        .find(|c| c.is_element() && c.tag_name().namespace() == Some(NAMESPACE))
}

/// Whitespace before `offset` on its line, if only whitespace precedes it.
fn indent_at(text: &str, offset: usize) -> &str {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let lead = &text[line_start..offset];
    if lead.chars().all(|c| c == ' ' || c == '\t') {
        lead
    } else {
        ""
    }
}

/// `xml` (lines joined by `\n`, first line not indented) indented by `indent`
/// on every line but the first.
fn reindent(xml: &str, indent: &str) -> String {
    let mut out = String::new();
    for (i, line) in xml.trim_end().lines().enumerate() {
        if i > 0 {
            out.push('\n');
            if !line.is_empty() {
                out.push_str(indent);
            }
        }
        out.push_str(line);
    }
    out
}

fn attr_escape(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// Apply non-overlapping `(range, replacement)` edits to `text`.
fn splice(text: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (r, s) in edits {
        out.push_str(&text[at..r.start]);
        out.push_str(&s);
        at = r.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Every element of canonical disk XML with prefix `p:` (canonical XML
/// escapes `<` everywhere else, so every `<` starts a tag).
fn prefixed(xml: &str, p: &str) -> String {
    xml.replace("</", "\u{0}")
        .replace('<', &format!("<{p}:"))
        .replace('\u{0}', &format!("</{p}:"))
}

/// Rewrite a domain that holds proposal-style `<disk type='quorum'>` disks
/// into one stock libvirt accepts: each becomes an NBD disk on the unix
/// socket `RUNTIME_DIR/NAME/DEV.sock` (target, bus, serial, boot order,
/// address, readonly, shareable and the guest-side driver options kept;
/// alias `ua-quorum-DEV`), and its canonical XML goes into the domain's
/// `<metadata>` under [`NAMESPACE`]. Everything else is kept byte for byte.
///
/// `base_dir` resolves relative image paths (libvirt wants absolute ones);
/// with `use_fs`, layers are compared by inode as [`crate::load`] does.
pub fn to_libvirt(
    text: &str,
    file: &str,
    base_dir: &Path,
    runtime_dir: &Path,
    use_fs: bool,
) -> Result<String, ConfigErrors> {
    let ctx = Ctx { text, file };
    let doc = ctx.doc()?;
    let domain = domain_root(&ctx, &doc)?;
    let name = domain_name(&ctx, domain)?;
    if let Some(top) = our_top(domain) {
        return Err(ctx.err(
            top.range().start,
            ErrorKind::Unsupported,
            "the domain already carries quorum disks in its <metadata>: run \
             'quorum domxml from-libvirt' first, edit, then convert again"
                .into(),
        ));
    }
    let disks: Vec<Node<'_, '_>> = domain
        .children()
        .filter(|c| plain(*c, "devices"))
        .flat_map(|d| d.children())
        .filter(|c| plain(*c, "disk") && c.attribute("type") == Some("quorum"))
        .collect();
    if disks.is_empty() {
        return Err(ctx.err(
            domain.range().start,
            ErrorKind::Xml,
            "no <disk type='quorum'> under <devices> in the domain".into(),
        ));
    }
    let mut edits = Vec::new();
    let mut exports = String::new();
    let mut errors = Vec::new();
    for d in &disks {
        let Some(dev) = child(*d, "target").and_then(|t| t.attribute("dev")) else {
            errors.push(ctx.err(
                d.range().start,
                ErrorKind::Xml,
                "missing disk target".into(),
            ));
            continue;
        };
        let loaded = match parse::parse(text, file, base_dir, Some(dev), use_fs) {
            Ok(l) => l,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let cfg = loaded.disk;
        let socket = socket_path(runtime_dir, &name, dev);
        let socket_s = socket.to_string_lossy().into_owned();
        if socket_s.len() > MAX_SOCKET_PATH {
            errors.push(ctx.err(
                d.range().start,
                ErrorKind::Unsupported,
                format!(
                    "socket path '{socket_s}' is longer than the {MAX_SOCKET_PATH} bytes a unix \
                     socket takes: choose a shorter runtime folder"
                ),
            ));
            continue;
        }
        let indent = indent_at(text, d.range().start);
        let fe = frontend(text, *d, &cfg, &socket_s);
        edits.push((d.range(), reindent(&fe, indent)));
        exports.push_str(&export_xml(dev, &socket_s, &cfg));
    }
    if !errors.is_empty() {
        let mut all: Vec<ConfigError> = errors.into_iter().flat_map(|e| e.0).collect();
        all.sort_by_key(|e| (e.line, e.col));
        all.dedup();
        return Err(ConfigErrors(all));
    }
    let element = format!(
        "<{PREFIX}:disks xmlns:{PREFIX}='{NAMESPACE}'>\n{}</{PREFIX}:disks>",
        indent_lines(&exports, "  ")
    );
    edits.push(metadata_edit(text, domain, &element));
    Ok(splice(text, edits))
}

/// One `<quorum:export>` element holding `cfg` in canonical form.
fn export_xml(dev: &str, socket: &str, cfg: &DiskConfig) -> String {
    let disk_xml = prefixed(&crate::to_xml(cfg), PREFIX);
    format!(
        "<{PREFIX}:export target='{}' socket='{}'>\n{}</{PREFIX}:export>\n",
        attr_escape(dev),
        attr_escape(socket),
        indent_lines(&disk_xml, "  ")
    )
}

/// What `quorum attach` hands libvirt for one proposal-style disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachParts {
    /// The quorum disk, with its target and socket.
    pub export: Export,
    /// The NBD disk for `virsh attach-device`.
    pub frontend: String,
}

/// The frontend and metadata entry of the `<disk type='quorum'>` that is
/// the root of `text`, for domain `domain` (its sockets under `runtime_dir`).
pub fn attach_parts(
    text: &str,
    file: &str,
    base_dir: &Path,
    runtime_dir: &Path,
    domain: &str,
    use_fs: bool,
) -> Result<AttachParts, ConfigErrors> {
    let ctx = Ctx { text, file };
    let doc = ctx.doc()?;
    let root = doc.root_element();
    if !plain(root, "disk") {
        return Err(ctx.err(
            root.range().start,
            ErrorKind::Xml,
            format!(
                "root element must be <disk>, not <{}>",
                root.tag_name().name()
            ),
        ));
    }
    let cfg = parse::parse(text, file, base_dir, None, use_fs)?.disk;
    if domain.is_empty() || domain == "." || domain == ".." || domain.contains('/') {
        return Err(ctx.err(
            0,
            ErrorKind::InvalidArg,
            format!("domain name '{domain}' cannot name a runtime folder"),
        ));
    }
    let dev = cfg.target.dev.clone();
    let socket = socket_path(runtime_dir, domain, &dev);
    let socket_s = socket.to_string_lossy().into_owned();
    Ok(AttachParts {
        frontend: format!("{}\n", frontend(text, root, &cfg, &socket_s)),
        export: Export {
            target: dev,
            socket,
            disk: cfg,
        },
    })
}

/// One `<export>` element in no namespace, as `virsh metadata --set` wants
/// it (libvirt puts every element into the namespace given with --key).
fn export_plain(dev: &str, socket: &str, cfg: &DiskConfig) -> String {
    format!(
        "<export target='{}' socket='{}'>\n{}</export>\n",
        attr_escape(dev),
        attr_escape(socket),
        indent_lines(&crate::to_xml(cfg), "  ")
    )
}

/// Our metadata element after adding `add` and removing the export of
/// target `remove`, from `current` (what `virsh metadata DOMAIN URI`
/// prints, if anything), in no namespace, for `virsh metadata --set --key
/// quorum`. `None` when no export is left. Errors: `add`'s target is there
/// already, or `remove`'s is not.
pub fn edit_metadata(
    current: Option<&str>,
    add: Option<&Export>,
    remove: Option<&str>,
) -> Result<Option<String>, String> {
    let mut kept: Vec<String> = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    if let Some(cur) = current.filter(|c| !c.trim().is_empty()) {
        let doc = Document::parse(cur).map_err(|e| format!("quorum metadata: {e}"))?;
        for e in doc
            .root_element()
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "export")
        {
            let t = e.attribute("target").unwrap_or("").to_string();
            if remove != Some(t.as_str()) {
                // Written again in canonical form, whatever prefix it had.
                let l = parse::parse(cur, "quorum metadata", Path::new("/"), Some(&t), false)
                    .map_err(|e| e.to_string())?;
                let socket = l.socket.unwrap_or_default();
                kept.push(export_plain(&t, &socket.to_string_lossy(), &l.disk));
            }
            targets.push(t);
        }
    }
    if let Some(t) = remove
        && !targets.iter().any(|x| x == t)
    {
        return Err(format!("the domain's quorum metadata has no disk '{t}'"));
    }
    if let Some(e) = add {
        if targets.contains(&e.target) {
            return Err(format!(
                "the domain already has a quorum disk '{}'",
                e.target
            ));
        }
        kept.push(export_plain(
            &e.target,
            &e.socket.to_string_lossy(),
            &e.disk,
        ));
    }
    if kept.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "<disks>\n{}</disks>\n",
        indent_lines(&kept.concat(), "  ")
    )))
}

fn indent_lines(xml: &str, indent: &str) -> String {
    xml.lines().map(|l| format!("{indent}{l}\n")).collect()
}

/// Where our metadata element goes: into `<metadata>` (before its end), or a
/// new `<metadata>` after the domain's `<name>`/`<uuid>`/`<title>`/`<description>`.
fn metadata_edit(text: &str, domain: Node<'_, '_>, element: &str) -> (Range<usize>, String) {
    let child_indent = domain
        .children()
        .find(|c| c.is_element())
        .map_or("  ", |c| indent_at(text, c.range().start))
        .to_string();
    let child_indent = if child_indent.is_empty() {
        "  ".to_string()
    } else {
        child_indent
    };
    let inner_indent = format!("{child_indent}{child_indent}");
    let body = reindent(element, &inner_indent);
    if let Some(m) = child(domain, "metadata") {
        let r = m.range();
        let raw = &text[r.clone()];
        if raw.ends_with("/>") {
            let s = format!("<metadata>\n{inner_indent}{body}\n{child_indent}</metadata>");
            return (r, s);
        }
        let close = r.start
            + raw
                .rfind("</")
                .expect("an element with content has a close tag");
        // Keep what precedes the close tag, then our element on its own line.
        let before = &text[r.start..close];
        let trimmed = before.trim_end_matches([' ', '\t', '\n']);
        let at = r.start + trimmed.len();
        return (at..close, format!("\n{inner_indent}{body}\n{child_indent}"));
    }
    let anchor = ["description", "title", "uuid", "name"]
        .iter()
        .filter_map(|n| child(domain, n))
        .map(|n| n.range().end)
        .max();
    let at = anchor.unwrap_or_else(|| {
        // Right after the domain's start tag.
        let r = domain.range();
        r.start + text[r.clone()].find('>').map_or(0, |i| i + 1)
    });
    (
        at..at,
        format!("\n{child_indent}<metadata>\n{inner_indent}{body}\n{child_indent}</metadata>"),
    )
}

/// The NBD disk libvirt manages in place of quorum disk `d`.
fn frontend(text: &str, d: Node<'_, '_>, cfg: &DiskConfig, socket: &str) -> String {
    let dev = &cfg.target.dev;
    let mut s = String::from("<disk type='network' device='disk'>\n");
    let mut driver = String::from("  <driver name='qemu' type='raw'");
    if let Some(drv) = child(d, "driver") {
        for a in drv.attributes() {
            if a.namespace().is_none() && FRONTEND_DRIVER_ATTRS.contains(&a.name()) {
                driver.push(' ');
                driver.push_str(&text[a.range()]);
            }
        }
    }
    driver.push_str("/>\n");
    s.push_str(&driver);
    s.push_str(&format!(
        "  <source protocol='nbd' name='{}'>\n    <host transport='unix' socket='{}'/>\n  </source>\n",
        attr_escape(dev),
        attr_escape(socket)
    ));
    match child(d, "target") {
        Some(t) => {
            s.push_str("  ");
            s.push_str(&text[t.range()]);
            s.push('\n');
        }
        None => s.push_str(&format!("  <target dev='{}'/>\n", attr_escape(dev))),
    }
    if cfg.readonly {
        s.push_str("  <readonly/>\n");
    }
    if cfg.shareable {
        s.push_str("  <shareable/>\n");
    }
    if let Some(n) = child(d, "serial") {
        s.push_str("  ");
        s.push_str(&text[n.range()]);
        s.push('\n');
    }
    for c in d.children().filter(|c| c.is_element()) {
        if c.tag_name().namespace().is_none() && FRONTEND_ELEMENTS.contains(&c.tag_name().name()) {
            s.push_str("  ");
            s.push_str(&text[c.range()]);
            s.push('\n');
        }
    }
    s.push_str(&format!(
        "  <alias name='ua-quorum-{}'/>\n",
        attr_escape(dev)
    ));
    s.push_str("</disk>");
    s
}

/// The quorum disks kept in a domain's metadata, with the domain's name,
/// UUID and DAC label: what the libvirt hook acts on. A domain without our
/// metadata yields no exports (not an error).
pub fn domain_disks(text: &str, file: &str, base_dir: &Path) -> Result<DomainDisks, ConfigErrors> {
    let ctx = Ctx { text, file };
    let doc = ctx.doc()?;
    let domain = domain_root(&ctx, &doc)?;
    let name = domain_name(&ctx, domain)?;
    let uuid = child(domain, "uuid").and_then(text_of);
    let dac_label = domain
        .children()
        .filter(|c| plain(*c, "seclabel") && c.attribute("model") == Some("dac"))
        .find_map(|s| child(s, "label").and_then(text_of));
    let mut exports = Vec::new();
    if let Some(top) = our_top(domain) {
        let targets: Vec<String> = top
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "export")
            .filter_map(|e| e.attribute("target").map(str::to_string))
            .collect();
        if targets.is_empty() {
            // Let the parser say what is wrong with the element.
            parse::parse(text, file, base_dir, None, false)?;
        }
        for t in targets {
            let l = parse::parse(text, file, base_dir, Some(&t), false)?;
            let socket = l.socket.ok_or_else(|| {
                ctx.err(
                    top.range().start,
                    ErrorKind::Unsupported,
                    format!(
                        "target '{t}' is a quorum disk under <devices>, not an export in \
                         <metadata>: convert the domain with 'quorum domxml to-libvirt'"
                    ),
                )
            })?;
            exports.push(Export {
                target: t,
                socket,
                disk: l.disk,
            });
        }
    }
    Ok(DomainDisks {
        name,
        uuid,
        exports,
        dac_label,
    })
}

/// The inverse of [`to_libvirt`]: each export in our metadata goes back to
/// `<devices>` as a proposal-style `<disk type='quorum'>` in canonical form,
/// in place of its NBD frontend (whose boot order, address and guest-side
/// driver options it takes back), and our metadata element is removed
/// (with `<metadata>` when nothing else is left in it).
pub fn from_libvirt(text: &str, file: &str, base_dir: &Path) -> Result<String, ConfigErrors> {
    let ctx = Ctx { text, file };
    let doc = ctx.doc()?;
    let domain = domain_root(&ctx, &doc)?;
    let Some(top) = our_top(domain) else {
        return Err(ctx.err(
            domain.range().start,
            ErrorKind::Xml,
            format!("the domain has no quorum disks in its <metadata> (namespace '{NAMESPACE}')"),
        ));
    };
    let disks = domain_disks(text, file, base_dir)?;
    let devices = child(domain, "devices");
    let frontends: Vec<Node<'_, '_>> = devices
        .into_iter()
        .flat_map(|d| d.children())
        .filter(|c| plain(*c, "disk"))
        .collect();
    let mut edits = Vec::new();
    let mut appended = String::new();
    for e in &disks.exports {
        let mut xml = crate::to_xml(&e.disk);
        let fe = frontends
            .iter()
            .find(|f| child(**f, "target").and_then(|t| t.attribute("dev")) == Some(&e.target));
        match fe {
            Some(f) => {
                xml = give_back(text, *f, &xml);
                let indent = indent_at(text, f.range().start);
                edits.push((f.range(), reindent(&xml, indent)));
            }
            None => appended.push_str(&xml),
        }
    }
    if !appended.is_empty() {
        let Some(dv) = devices else {
            return Err(ctx.err(
                domain.range().start,
                ErrorKind::Xml,
                "missing <devices> in the domain".into(),
            ));
        };
        let r = dv.range();
        let raw = &text[r.clone()];
        let indent = dv
            .children()
            .find(|c| c.is_element())
            .map_or("    ", |c| indent_at(text, c.range().start))
            .to_string();
        if raw.ends_with("/>") {
            let outer = indent_at(text, r.start);
            let body = format!("{indent}{}", reindent(&appended, &indent));
            edits.push((r, format!("<devices>\n{body}\n{outer}</devices>")));
        } else {
            let close = r.start + raw.rfind("</").expect("close tag");
            let trimmed = text[r.start..close].trim_end_matches([' ', '\t', '\n']);
            let at = r.start + trimmed.len();
            let outer = indent_at(text, r.start);
            edits.push((
                at..close,
                format!("\n{indent}{}\n{outer}", reindent(&appended, &indent)),
            ));
        }
    }
    // Remove our element, or the whole <metadata> when it held only ours.
    let meta = top.parent().expect("metadata");
    let alone = meta.children().filter(|c| c.is_element()).all(|c| c == top);
    let victim = if alone { meta.range() } else { top.range() };
    let line_start = text[..victim.start].rfind('\n').map_or(0, |i| i + 1);
    let start = if text[line_start..victim.start].trim().is_empty() && line_start > 0 {
        line_start - 1
    } else {
        victim.start
    };
    edits.push((start..victim.end, String::new()));
    Ok(splice(text, edits))
}

/// Canonical disk XML `xml` with the frontend's guest-side elements and
/// driver options put back.
fn give_back(text: &str, f: Node<'_, '_>, xml: &str) -> String {
    let mut attrs = String::new();
    if let Some(drv) = child(f, "driver") {
        for a in drv.attributes() {
            if a.namespace().is_none() && FRONTEND_DRIVER_ATTRS.contains(&a.name()) {
                attrs.push(' ');
                attrs.push_str(&text[a.range()]);
            }
        }
    }
    let mut elems = String::new();
    for c in f.children().filter(|c| c.is_element()) {
        if c.tag_name().namespace().is_none() && FRONTEND_ELEMENTS.contains(&c.tag_name().name()) {
            elems.push_str("  ");
            elems.push_str(&text[c.range()]);
            elems.push('\n');
        }
    }
    let mut out = String::new();
    for line in xml.lines() {
        if line.starts_with("  <driver ") && !attrs.is_empty() {
            let head = line.strip_suffix("/>").unwrap_or(line);
            out.push_str(&format!("{head}{attrs}/>\n"));
        } else if line == "</disk>" {
            out.push_str(&elems);
            out.push_str("</disk>\n");
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}
