//! A small blocking QMP client for the CLI (`quorum status`, `replace`,
//! `scrub`): connect, negotiate, run commands one at a time. Events that
//! arrive in between are skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};

/// A negotiated connection to a monitor.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

/// How long one reply may take (opening a remote replica may take the
/// replica timeout).
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// The monitor refused a command: its `{"error": {"class", "desc"}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct Refused {
    /// `GenericError`, `CommandNotFound`.
    pub class: String,
    /// Why.
    pub desc: String,
}

impl Client {
    /// Connect to the monitor at `path` and negotiate capabilities.
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to the monitor at {}", path.display()))?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let writer = stream.try_clone()?;
        let mut c = Client {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        };
        let greeting = c.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!(
                "{} did not greet as a QMP monitor does: {greeting}",
                path.display()
            );
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut text = String::new();
        let n = self
            .reader
            .read_line(&mut text)
            .with_context(|| format!("reading from the monitor at {}", self.path.display()))?;
        if n == 0 {
            bail!(
                "the monitor at {} closed the connection",
                self.path.display()
            );
        }
        serde_json::from_str(text.trim_end())
            .with_context(|| format!("the monitor sent invalid JSON: {}", text.trim_end()))
    }

    /// Run `command` with `arguments`; its `return` value, or [`Refused`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = serde_json::to_vec(&msg)?;
        text.extend_from_slice(b"\r\n");
        self.writer
            .write_all(&text)
            .with_context(|| format!("writing to the monitor at {}", self.path.display()))?;
        loop {
            let mut reply = self.read_message()?;
            if reply.get("event").is_some() || reply.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(v) = reply.get_mut("return") {
                return Ok(v.take());
            }
            let err = reply.get("error").cloned().unwrap_or(Value::Null);
            let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            return Err(anyhow!(Refused {
                class: s("class"),
                desc: s("desc"),
            }));
        }
    }
}
