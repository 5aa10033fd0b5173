//! A raw QMP connection for protocol tests: bytes in, CRLF lines out, every
//! read bounded by a timeout.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Bound on one reply.
pub const REPLY: Duration = Duration::from_secs(30);

/// One client connection.
pub struct Raw {
    pub reader: BufReader<UnixStream>,
    pub stream: UnixStream,
}

impl Raw {
    /// Connect (nothing read yet).
    pub fn connect(path: &Path) -> Raw {
        let stream =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream.set_read_timeout(Some(REPLY)).expect("timeout");
        Raw {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            stream,
        }
    }

    /// Connect, read the greeting and negotiate.
    pub fn negotiated(path: &Path) -> Raw {
        let mut c = Raw::connect(path);
        let g = c.message();
        assert!(g.get("QMP").is_some(), "greeting: {g}");
        let r = c.command(r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(r, serde_json::json!({"return": {}}));
        c
    }

    /// Send raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to monitor");
    }

    /// One raw line, CRLF included; empty at end of stream.
    pub fn raw_line(&mut self) -> String {
        let mut s = String::new();
        self.reader
            .read_line(&mut s)
            .expect("read from monitor (timed out?)");
        s
    }

    /// True when the daemon closed the connection: end of stream, or
    /// ECONNRESET (a unix socket closed with our bytes still unread reads
    /// as a reset once its queued replies are read). Panics on a message.
    pub fn closed(&mut self) -> bool {
        let mut s = String::new();
        match self.reader.read_line(&mut s) {
            Ok(0) => true,
            Ok(_) => panic!("a message instead of the end of the connection: {s:?}"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Err(e) => panic!("reading from the monitor: {e}"),
        }
    }

    /// The next message, checking it ends with CRLF.
    pub fn message(&mut self) -> Value {
        let l = self.raw_line();
        assert!(l.ends_with("\r\n"), "line without CRLF: {l:?}");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}"))
    }

    /// The next message that is not an event.
    pub fn reply(&mut self) -> Value {
        loop {
            let m = self.message();
            if m.get("event").is_none() {
                return m;
            }
        }
    }

    /// Send `text` and return the reply.
    pub fn command(&mut self, text: &str) -> Value {
        self.send(text.as_bytes());
        self.reply()
    }

    /// The next event named `name` (skipping replies and other events).
    pub fn event(&mut self, name: &str) -> Value {
        loop {
            let m = self.message();
            if m.get("event").and_then(Value::as_str) == Some(name) {
                return m;
            }
        }
    }
}
