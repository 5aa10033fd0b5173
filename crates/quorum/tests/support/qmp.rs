//! A raw QMP connection for protocol tests: bytes in, CRLF lines out, every
//! read bounded by a timeout.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

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

/// One negotiated monitor connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received and not yet taken by [`Qmp::wait_event`].
    pub events: Vec<Value>,
    next_id: u64,
}

impl Qmp {
    /// Connect to `path` (waiting up to 10 s for it to accept), read the
    /// greeting and negotiate capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "monitor {} not accepting within 10 s: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
            next_id: 1,
        };
        let greeting = q.read_line().expect("a greeting");
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        q.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        q
    }

    fn read_line(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                serde_json::from_str(line.trim_end())
                    .unwrap_or_else(|e| panic!("monitor sent invalid JSON ({e}): {line:?}")),
            ),
        }
    }

    /// Run `command` with `arguments`: `Ok(return)` or `Err(error)`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        self.writer
            .write_all(msg.to_string().as_bytes())
            .expect("send to the monitor");
        loop {
            let v = self
                .read_line()
                .unwrap_or_else(|| panic!("monitor closed during {command}"));
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            assert_eq!(v["id"], json!(id), "reply to another command: {v}");
            return match v.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(v["error"].clone()),
            };
        }
    }

    /// Run `command`, panicking on an error reply.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments)
            .unwrap_or_else(|e| panic!("{command} failed: {e}"))
    }

    /// The first event (received before or within `timeout`) for which
    /// `pred` holds, removed from [`Qmp::events`] (the others stay).
    pub fn wait_event(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(&pred) {
                return self.events.remove(i);
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no such event within {timeout:?}: {:?}", self.events));
            self.writer
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.read_line() {
                Some(v) => self.events.push(v),
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "no such event within {timeout:?}: {:?}",
                        self.events
                    );
                }
            }
            self.writer
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
        }
    }

    /// Every event received so far whose name is `name`, taken.
    pub fn take_events(&mut self, name: &str) -> Vec<Value> {
        let (mine, rest): (Vec<Value>, Vec<Value>) = std::mem::take(&mut self.events)
            .into_iter()
            .partition(|e| e["event"] == name);
        self.events = rest;
        mine
    }
}
