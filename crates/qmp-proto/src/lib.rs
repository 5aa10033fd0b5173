//! Sans-IO QMP (QEMU Machine Protocol), written after QEMU's
//! `docs/interop/qmp-spec.rst`: the stream framer and the shapes of the
//! messages. No sockets and no commands here; `quorum serve --qmp` drives
//! it (as `nbd-proto` is driven by the NBD server), and the fuzz target
//! `qmp_stream` feeds it arbitrary bytes.
//!
//! - [`framer`] splits the byte stream into JSON texts, within bounds;
//! - [`parse_request`] checks one text is a command;
//! - [`greeting`], [`success`], [`failure`], [`timestamped`] shape what the
//!   server sends, each as one CRLF-terminated [`line`].
#![warn(missing_docs)]

pub mod framer;

pub use framer::{Frame, Framer, MAX_DEPTH, MAX_MESSAGE};
use serde_json::{Map, Value, json};

/// `CommandNotFound`, `GenericError`: QEMU's error classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// Error class.
    pub class: &'static str,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound`.
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
}

/// One message as a line: compact JSON and CRLF.
pub fn line(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("JSON values serialise");
    out.extend_from_slice(b"\r\n");
    out
}

/// `{"return": value, "id": id}` (no `id` when the request had none).
pub fn success(value: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), value);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// `{"error": {"class", "desc"}, "id": id}`.
pub fn failure(e: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// A well-formed command: `{"execute", "arguments"?, "id"?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Command name.
    pub execute: String,
    /// Its arguments (empty when absent).
    pub arguments: Map<String, Value>,
    /// Echoed in the reply.
    pub id: Option<Value>,
}

/// Parse one framed JSON text into a [`Request`]; on error, the reply's
/// error and the id when one could be read.
pub fn parse_request(text: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let v: Value = serde_json::from_slice(text)
        .map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut m) = v else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = m.remove("id");
    let fail = |desc: String| Err((QmpError::generic(desc), id.clone()));
    if let Some(k) = m
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return fail(format!("QMP input member '{k}' is unexpected"));
    }
    let execute = match m.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
        None => return fail("QMP input lacks member 'execute'".into()),
    };
    let arguments = match m.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// The greeting, sent as soon as a client connects; `version` is what
/// `query-version` returns (`{"qemu": {"major", "minor", "micro"},
/// "package"}`).
pub fn greeting(version: Value) -> Value {
    json!({"QMP": {"version": version, "capabilities": []}})
}

/// An event (`{"event", "data"}`) with its timestamp added:
/// `{"event", "data", "timestamp": {"seconds", "microseconds"}}`.
pub fn timestamped(mut event: Value, at: std::time::SystemTime) -> Value {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    if let Value::Object(m) = &mut event {
        m.insert(
            "timestamp".into(),
            json!({"seconds": since.as_secs(), "microseconds": since.subsec_micros()}),
        );
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_with_crlf() {
        assert_eq!(line(&json!({"return": {}})), b"{\"return\":{}}\r\n");
    }

    #[test]
    fn requests_echo_any_id() {
        let r = parse_request(br#"{"execute":"x","id":{"n":[1]}}"#).unwrap();
        assert_eq!(r.execute, "x");
        assert_eq!(r.id, Some(json!({"n": [1]})));
        assert!(r.arguments.is_empty());
    }

    #[test]
    fn malformed_requests_say_why() {
        let desc = |t: &[u8]| parse_request(t).unwrap_err().0.desc;
        assert_eq!(desc(b"[1]"), "QMP input must be a JSON object");
        assert_eq!(desc(b"{}"), "QMP input lacks member 'execute'");
        assert_eq!(
            desc(br#"{"execute":1}"#),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(br#"{"execute":"x","foo":1}"#),
            "QMP input member 'foo' is unexpected"
        );
        assert_eq!(
            desc(br#"{"execute":"x","arguments":[]}"#),
            "QMP input member 'arguments' must be an object"
        );
        assert!(desc(b"{execute}").starts_with("JSON parse error"));
        let (_, id) = parse_request(br#"{"execute":1,"id":7}"#).unwrap_err();
        assert_eq!(id, Some(json!(7)));
    }

    #[test]
    fn events_carry_a_timestamp() {
        let e = json!({"event": "QUORUM_RESYNC_COMPLETED",
                       "data": {"node-name": "replica-1", "bytes": 4096}});
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000);
        assert_eq!(
            timestamped(e, at),
            json!({"event": "QUORUM_RESYNC_COMPLETED",
                   "data": {"node-name": "replica-1", "bytes": 4096},
                   "timestamp": {"seconds": 1, "microseconds": 500000}})
        );
    }
}
