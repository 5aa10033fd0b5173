//! Turn `roxmltree` syntax errors into libvirt-style messages at the first fault.

use roxmltree::Error as X;

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (u32, u32) {
    Positions::new(text).line_col(offset)
}

/// Bytes per checkpoint of [`Positions`]' character counts.
const CHUNK: usize = 256;

/// Line and column lookups for many offsets of one text.
///
/// Built once in O(n); each lookup then costs a binary search over the line
/// starts plus at most two partial chunks of `CHUNK` bytes, so reporting k
/// errors of an n-byte document costs O(n + k) rather than O(n * k) (even
/// when the whole document is one line).
pub(crate) struct Positions<'a> {
    text: &'a str,
    /// Byte offset of the start of every line (the first is 0).
    line_starts: Vec<usize>,
    /// `chars_before[i]`: characters in `text[..i * CHUNK]`.
    chars_before: Vec<usize>,
}

/// True for the first byte of a UTF-8 character.
fn starts_char(b: u8) -> bool {
    (b as i8) >= -0x40
}

impl<'a> Positions<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let bytes = text.as_bytes();
        let mut line_starts = vec![0];
        line_starts.extend(
            bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        );
        let mut chars_before = Vec::with_capacity(bytes.len() / CHUNK + 2);
        let mut n = 0;
        for chunk in bytes.chunks(CHUNK) {
            chars_before.push(n);
            n += chunk.iter().filter(|b| starts_char(**b)).count();
        }
        chars_before.push(n);
        Positions {
            text,
            line_starts,
            chars_before,
        }
    }

    /// Characters in `text[..offset]`; `offset` is at most the text length.
    fn chars_to(&self, offset: usize) -> usize {
        let c = offset / CHUNK;
        let partial = &self.text.as_bytes()[c * CHUNK..offset];
        self.chars_before[c] + partial.iter().filter(|b| starts_char(**b)).count()
    }

    /// 1-based line and column (in characters) of a byte offset; offsets past
    /// the end or inside a character count from the character's start.
    pub(crate) fn line_col(&self, offset: usize) -> (u32, u32) {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        let col = self.chars_to(offset) - self.chars_to(start) + 1;
        (to_u32(line), to_u32(col))
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Byte offset of a 1-based line:column position (column in characters).
fn offset_of(text: &str, line: u32, col: u32) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(i) => start += i + 1,
            None => return text.len(),
        }
    }
    text[start..]
        .char_indices()
        .nth(col.saturating_sub(1) as usize)
        .map_or(text.len(), |(i, _)| start + i)
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':') || b >= 0x80
}

/// `(line, col, message)` for a document that `roxmltree` refused.
pub(crate) fn describe(text: &str, err: &X) -> (u32, u32, String) {
    let at = |p: roxmltree::TextPos| (p.row, p.col);
    let end = line_col(text, text.len());
    let ((line, col), msg) = match err {
        X::InvalidChar2("a quote", _, pos) => {
            if let Some(r) = unquoted_attribute(text, offset_of(text, pos.row, pos.col)) {
                return r;
            }
            (at(*pos), "attribute value must be quoted".to_string())
        }
        X::InvalidXmlPrefixUri(p) => (at(*p), "'xml' prefix bound to a wrong namespace".into()),
        X::UnexpectedXmlUri(p) => (
            at(*p),
            "the 'xml' namespace is bound to another prefix".into(),
        ),
        X::UnexpectedXmlnsUri(p) => (at(*p), "the 'xmlns' namespace must not be declared".into()),
        X::InvalidElementNamePrefix(p) => (at(*p), "'xmlns' is not an element prefix".into()),
        X::DuplicatedNamespace(n, p) => (at(*p), format!("namespace '{n}' is declared twice")),
        X::UnknownNamespace(n, p) => (at(*p), format!("undeclared namespace prefix '{n}'")),
        X::UnexpectedCloseTag(open, close, p) => (
            at(*p),
            format!("closing tag '</{close}>' does not match the open element '<{open}>'"),
        ),
        X::UnexpectedEntityCloseTag(p) => (at(*p), "entity value ends an element".into()),
        X::UnknownEntityReference(n, p) => (at(*p), format!("undefined entity '&{n};'")),
        X::MalformedEntityReference(p) => (
            at(*p),
            "malformed entity reference (write '&amp;' for '&')".into(),
        ),
        X::EntityReferenceLoop(p) => (at(*p), "entity references nest too deeply".into()),
        X::InvalidAttributeValue(p) => (at(*p), "'<' is not allowed in an attribute value".into()),
        X::DuplicatedAttribute(n, p) => (at(*p), format!("attribute '{n}' is given twice")),
        X::NoRootNode => (end, "document is empty: no root element".into()),
        X::UnclosedRootNode => (
            end,
            "premature end of data: the root element is not closed".into(),
        ),
        X::UnexpectedDeclaration(p) => (
            at(*p),
            "XML declaration is only allowed at the start of the document".into(),
        ),
        X::DtdDetected => (
            (1, 1),
            "document type definitions (DTD) are not accepted".into(),
        ),
        X::NodesLimitReached => ((1, 1), "document has too many nodes".into()),
        X::AttributesLimitReached => ((1, 1), "document has too many attributes".into()),
        X::NamespacesLimitReached => ((1, 1), "document has too many namespaces".into()),
        X::InvalidName(p) => (at(*p), "invalid element or attribute name".into()),
        X::NonXmlChar(c, p) => (at(*p), format!("character {c:?} is not allowed in XML")),
        X::InvalidChar(want, got, p) => (
            at(*p),
            format!("expected '{}', found '{}'", *want as char, printable(*got)),
        ),
        X::InvalidChar2(want, got, p) => (
            at(*p),
            format!("expected {want}, found '{}'", printable(*got)),
        ),
        X::InvalidString(want, p) => (at(*p), format!("expected '{want}'")),
        X::InvalidExternalID(p) => (at(*p), "invalid external ID".into()),
        X::EntityResolver(p, m) => (at(*p), format!("entity cannot be resolved: {m}")),
        X::InvalidComment(p) => (at(*p), "comment contains '--'".into()),
        X::InvalidCharacterData(p) => (at(*p), "']]>' is not allowed in text".into()),
        X::UnknownToken(p) => (at(*p), "unexpected content".into()),
        X::UnexpectedEndOfStream => (end, "premature end of data".into()),
    };
    (line, col, msg)
}

fn printable(b: u8) -> String {
    if b.is_ascii_graphic() || b == b' ' {
        (b as char).to_string()
    } else {
        format!("\\x{b:02x}")
    }
}

/// For `name=value` without quotes: point at `name` and quote the whole token.
fn unquoted_attribute(text: &str, value_at: usize) -> Option<(u32, u32, String)> {
    let bytes = text.as_bytes();
    let mut i = value_at;
    while i > 0 && bytes[i - 1].is_ascii_whitespace() {
        i -= 1;
    }
    if i == 0 || bytes[i - 1] != b'=' {
        return None;
    }
    i -= 1;
    while i > 0 && bytes[i - 1].is_ascii_whitespace() {
        i -= 1;
    }
    let name_end = i;
    while i > 0 && is_name_byte(bytes[i - 1]) {
        i -= 1;
    }
    if i == name_end {
        return None;
    }
    let name_start = i;
    let mut j = value_at;
    while j < bytes.len() && !bytes[j].is_ascii_whitespace() && !matches!(bytes[j], b'/' | b'>') {
        j += 1;
    }
    let name = &text[name_start..name_end];
    let value = &text[floor_char_boundary(text, value_at)..floor_char_boundary(text, j)];
    let (line, col) = line_col(text, name_start);
    Some((
        line,
        col,
        format!("attribute value must be quoted ({name}={value})"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward definition the lookup table must agree with.
    fn naive(text: &str, offset: usize) -> (u32, u32) {
        let offset = floor_char_boundary(text, offset.min(text.len()));
        let before = &text[..offset];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (to_u32(line), to_u32(col))
    }

    #[test]
    fn positions_agree_with_counting_from_the_start() {
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(["a", "é", "\n", "日本", "<x/>", "𝄞", "\n\n"][i % 7]);
        }
        let p = Positions::new(&text);
        for offset in 0..=text.len() + 3 {
            assert_eq!(p.line_col(offset), naive(&text, offset), "offset {offset}");
        }
    }

    #[test]
    fn positions_of_an_empty_text_are_the_start() {
        assert_eq!(Positions::new("").line_col(0), (1, 1));
        assert_eq!(Positions::new("").line_col(9), (1, 1));
    }
}
