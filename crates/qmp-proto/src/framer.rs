//! Splits a QMP byte stream into JSON texts.
//!
//! Clients such as `qemu.qmp` send compact JSON with no newline after it,
//! so messages cannot be split on lines: the framer follows string and
//! nesting state byte by byte and hands out each complete top-level value,
//! whatever the read boundaries were. It never buffers more than one
//! message, and enforces two bounds so that no client can make the daemon
//! hold unbounded memory: [`MAX_MESSAGE`] bytes per message and
//! [`MAX_DEPTH`] levels of nesting. Crossing either is fatal for that
//! client (the monitor replies with an error and closes it): there is no
//! sound place to resume inside an oversized value.
//!
//! Garbage between values (a stray `}`, a bare word) is reported as one
//! error per token and skipped: the stream resynchronises at the next
//! `{` or `[`.

/// Largest message, in bytes.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest nesting of objects and arrays.
pub const MAX_DEPTH: usize = 64;

/// What the framer found in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One complete JSON text (an object or array, or a scalar token).
    Text(Vec<u8>),
    /// Bytes that cannot start a JSON value; skipped.
    Garbage(Vec<u8>),
    /// A message over [`MAX_MESSAGE`] bytes or [`MAX_DEPTH`] deep: the
    /// stream cannot be resynchronised, the client must be closed.
    TooLarge(&'static str),
}

/// Incremental splitter; feed it bytes as they arrive.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Inside a bare token at top level (a number, `true`, garbage).
    in_token: bool,
    /// Stopped after [`Frame::TooLarge`]: everything else is ignored.
    dead: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_delimiter(b: u8) -> bool {
    is_space(b) || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')
}

impl Framer {
    /// A framer with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of an incomplete message held.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Consume `input`, appending what it completed to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Frame>) {
        for &b in input {
            if self.dead {
                return;
            }
            self.byte(b, out);
        }
        // A bare token ends at a delimiter; one still open at the end of a
        // read stays pending (it may continue in the next one).
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.in_token {
            if is_delimiter(b) {
                self.end_token(out);
                // The delimiter itself is handled at top level below.
            } else {
                self.push(b, out);
                return;
            }
        }
        if self.depth == 0 && !self.in_string {
            match b {
                _ if is_space(b) => {}
                b'{' | b'[' => {
                    self.depth = 1;
                    self.push(b, out);
                }
                b'"' => {
                    // A top-level string: framed like a value (then refused).
                    self.in_string = true;
                    self.push(b, out);
                }
                b'}' | b']' | b',' | b':' => out.push(Frame::Garbage(vec![b])),
                _ => {
                    self.in_token = true;
                    self.push(b, out);
                }
            }
            return;
        }
        self.push(b, out);
        if self.dead {
            return;
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    self.die("nesting deeper than 64 levels", out);
                }
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            _ => {}
        }
    }

    fn push(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.buf.len() >= MAX_MESSAGE {
            self.die("message larger than 1 MiB", out);
            return;
        }
        self.buf.push(b);
    }

    fn die(&mut self, why: &'static str, out: &mut Vec<Frame>) {
        self.dead = true;
        self.buf = Vec::new();
        out.push(Frame::TooLarge(why));
    }

    fn emit(&mut self, out: &mut Vec<Frame>) {
        out.push(Frame::Text(std::mem::take(&mut self.buf)));
    }

    /// A bare top-level token ended: a scalar (`1`, `null`) or garbage.
    fn end_token(&mut self, out: &mut Vec<Frame>) {
        self.in_token = false;
        let text = std::mem::take(&mut self.buf);
        if serde_json::from_slice::<serde_json::Value>(&text).is_ok() {
            out.push(Frame::Text(text));
        } else {
            out.push(Frame::Garbage(text));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new();
        let mut out = Vec::new();
        for c in chunks {
            f.feed(c, &mut out);
        }
        out
    }

    fn text(s: &str) -> Frame {
        Frame::Text(s.as_bytes().to_vec())
    }

    #[test]
    fn one_object_split_over_every_byte() {
        let msg = br#"{"execute":"query-quorum","id":{"a":[1,2]}}"#;
        let chunks: Vec<&[u8]> = msg.chunks(1).collect();
        assert_eq!(
            frames(&chunks),
            vec![text(r#"{"execute":"query-quorum","id":{"a":[1,2]}}"#)]
        );
    }

    #[test]
    fn several_objects_in_one_read_without_newlines() {
        assert_eq!(
            frames(&[br#"{"execute":"a"}{"execute":"b"} {"execute":"c"}"#]),
            vec![
                text(r#"{"execute":"a"}"#),
                text(r#"{"execute":"b"}"#),
                text(r#"{"execute":"c"}"#)
            ]
        );
    }

    #[test]
    fn split_and_joined_together() {
        assert_eq!(
            frames(&[br#"{"execute":"a"}{"exe"#, br#"cute":"b"}"#]),
            vec![text(r#"{"execute":"a"}"#), text(r#"{"execute":"b"}"#)]
        );
    }

    #[test]
    fn braces_and_escaped_quotes_inside_strings() {
        let msg = r#"{"id":"}{\"]\\","x":"[[[{"}"#;
        // Split right after the backslash of the escaped quote.
        let cut = msg.find(r#"\""#).unwrap() + 1;
        assert_eq!(
            frames(&[&msg.as_bytes()[..cut], &msg.as_bytes()[cut..]]),
            vec![text(msg)]
        );
        let parsed: serde_json::Value = serde_json::from_str(msg).unwrap();
        assert_eq!(parsed["id"], "}{\"]\\");
    }

    #[test]
    fn garbage_between_objects_is_reported_and_skipped() {
        assert_eq!(
            frames(&[b"foo } {\"execute\":\"a\"}\r\n"]),
            vec![
                Frame::Garbage(b"foo".to_vec()),
                Frame::Garbage(b"}".to_vec()),
                text(r#"{"execute":"a"}"#)
            ]
        );
    }

    #[test]
    fn scalars_are_framed_as_texts() {
        assert_eq!(
            frames(&[b"12 null \"s\" "]),
            vec![text("12"), text("null"), text("\"s\"")]
        );
    }

    #[test]
    fn invalid_json_inside_an_object_is_still_one_text() {
        // The monitor's parser reports it; the framer only delimits.
        assert_eq!(
            frames(&[b"{execute: nope}{\"a\":1}"]),
            vec![text("{execute: nope}"), text(r#"{"a":1}"#)]
        );
    }

    #[test]
    fn nesting_deeper_than_the_limit_is_fatal() {
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert_eq!(frames(&[ok.as_bytes()]), vec![text(&ok)]);
        let deep = "[".repeat(MAX_DEPTH + 1);
        let got = frames(&[deep.as_bytes(), b"]]]{\"execute\":\"a\"}"]);
        assert_eq!(got, vec![Frame::TooLarge("nesting deeper than 64 levels")]);
    }

    #[test]
    fn a_message_over_the_size_limit_is_fatal_and_bounded() {
        let mut f = Framer::new();
        let mut out = Vec::new();
        f.feed(b"{\"id\":\"", &mut out);
        let block = vec![b'x'; 64 << 10];
        for _ in 0..40 {
            f.feed(&block, &mut out);
            assert!(f.pending() <= MAX_MESSAGE);
        }
        assert_eq!(out, vec![Frame::TooLarge("message larger than 1 MiB")]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn a_message_just_under_the_limit_passes() {
        let pad = MAX_MESSAGE - r#"{"id":""}"#.len();
        let msg = format!(r#"{{"id":"{}"}}"#, "y".repeat(pad));
        assert_eq!(msg.len(), MAX_MESSAGE);
        assert_eq!(frames(&[msg.as_bytes()]), vec![text(&msg)]);
    }
}
