//! [`DiskConfig`] → canonical XML (two-space indent, single quotes, defaults spelled out).

use std::path::Path;

use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};

use crate::model::*;

/// Escape an attribute value for single quotes; keeps whitespace exact through a re-parse.
fn attr_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
    out
}

fn text_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// An element head: name plus attributes in the order given.
struct Tag {
    name: &'static str,
    content: String,
}

impl Tag {
    fn new(name: &'static str) -> Self {
        Tag {
            name,
            content: name.to_string(),
        }
    }
    fn attr(mut self, key: &str, value: &str) -> Self {
        self.content.push(' ');
        self.content.push_str(key);
        self.content.push_str("='");
        self.content.push_str(&attr_escape(value));
        self.content.push('\'');
        self
    }
    fn opt(self, key: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.attr(key, v),
            None => self,
        }
    }
    fn start(&self) -> BytesStart<'_> {
        BytesStart::from_content(self.content.as_str(), self.name.len())
    }
}

struct Out {
    w: Writer<Vec<u8>>,
}

impl Out {
    // Writing into a Vec cannot fail.
    fn ev(&mut self, e: Event<'_>) {
        self.w.write_event(e).expect("writing to a Vec cannot fail");
    }
    fn empty(&mut self, t: Tag) {
        self.ev(Event::Empty(t.start()));
    }
    fn open(&mut self, t: &Tag) {
        self.ev(Event::Start(t.start()));
    }
    fn close(&mut self, name: &str) {
        self.ev(Event::End(BytesEnd::new(name)));
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// The disk as canonical XML, ending with a newline. Idempotent through [`crate::parse_str`].
pub fn to_xml(cfg: &DiskConfig) -> String {
    let mut o = Out {
        w: Writer::new_with_indent(Vec::new(), b' ', 2),
    };
    let disk = Tag::new("disk").attr("type", "quorum").attr(
        "device",
        match cfg.device {
            DeviceKind::Disk => "disk",
        },
    );
    o.open(&disk);
    let d = &cfg.driver;
    o.empty(
        Tag::new("driver")
            .opt("name", d.name.as_deref())
            .attr("type", "quorum")
            .attr(
                "read_pattern",
                match d.read_pattern {
                    ReadPattern::Quorum => "quorum",
                    ReadPattern::Fifo => "fifo",
                },
            )
            .attr("rewrite_corrupted", on_off(d.rewrite_corrupted))
            .attr("blkverify", on_off(d.blkverify)),
    );
    o.empty(Tag::new("threshold").attr("value", &cfg.threshold.to_string()));
    for r in &cfg.replicas {
        layer(&mut o, r);
    }
    o.empty(
        Tag::new("target")
            .attr("dev", &cfg.target.dev)
            .opt("bus", cfg.target.bus.as_deref()),
    );
    if cfg.readonly {
        o.empty(Tag::new("readonly"));
    }
    if cfg.shareable {
        o.empty(Tag::new("shareable"));
    }
    if let Some(s) = &cfg.serial {
        o.open(&Tag::new("serial"));
        o.ev(Event::Text(BytesText::from_escaped(text_escape(s))));
        o.close("serial");
    }
    if let Some(a) = &cfg.alias {
        o.empty(Tag::new("alias").attr("name", a));
    }
    o.close("disk");
    let mut s = String::from_utf8(o.w.into_inner()).expect("all pieces are UTF-8");
    s.push('\n');
    s
}

fn layer(o: &mut Out, s: &StorageSource) {
    let kind = match s.source {
        Source::File { .. } => "file",
        Source::Block { .. } => "block",
        Source::Nbd { .. } => "network",
    };
    let head = Tag::new("backingStore")
        .attr("type", kind)
        .opt("index", s.index.map(|i| i.to_string()).as_deref());
    o.open(&head);
    o.empty(Tag::new("format").attr("type", s.format.as_str()));
    match &s.source {
        Source::File { path } => o.empty(Tag::new("source").attr("file", &path_str(path))),
        Source::Block { dev } => o.empty(Tag::new("source").attr("dev", &path_str(dev))),
        Source::Nbd { export, host, tls } => {
            let src = Tag::new("source")
                .attr("protocol", "nbd")
                .opt("name", export.as_deref())
                .opt("tls", tls.map(|t| if t { "yes" } else { "no" }));
            o.open(&src);
            match host {
                NbdHost::Tcp { name, port } => o.empty(
                    Tag::new("host")
                        .attr("name", name)
                        .attr("port", &port.to_string()),
                ),
                NbdHost::Unix { socket } => o.empty(
                    Tag::new("host")
                        .attr("transport", "unix")
                        .attr("socket", &path_str(socket)),
                ),
            }
            o.close("source");
        }
    }
    match &s.backing {
        Backing::Unspecified => {}
        Backing::End => o.empty(Tag::new("backingStore")),
        Backing::Store(b) => layer(o, b),
    }
    o.close("backingStore");
}
