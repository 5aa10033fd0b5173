//! The monitor: QMP (QEMU Machine Protocol) as `quorum serve --qmp` speaks
//! it, written after QEMU's `docs/interop/qmp-spec.rst`.
//!
//! - `qmp_proto` (sans-IO) splits the byte stream into JSON texts and
//!   shapes messages: greeting, replies, errors, events (every line ends
//!   with CRLF, as QEMU's do);
//! - [`commands`] runs the commands against the disk;
//! - [`server`] accepts clients on the serve process's runtime;
//! - [`client`] is the small blocking client the CLI uses.

pub mod client;
pub mod commands;
pub mod server;

pub use qmp_proto::{QmpError, failure, line, parse_request, success};
use serde_json::{Value, json};

/// The greeting, sent as soon as a client connects.
pub fn greeting() -> Value {
    qmp_proto::greeting(version())
}

/// `query-version`'s value (and the greeting's `version`).
pub fn version() -> Value {
    let n = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({
        "qemu": {
            "major": n(env!("CARGO_PKG_VERSION_MAJOR")),
            "minor": n(env!("CARGO_PKG_VERSION_MINOR")),
            "micro": n(env!("CARGO_PKG_VERSION_PATCH")),
        },
        "package": format!("quorum {}", env!("CARGO_PKG_VERSION")),
    })
}

/// An engine event with its timestamp:
/// `{"event", "data", "timestamp": {"seconds", "microseconds"}}`.
pub fn event(e: &quorum_engine::Event, at: std::time::SystemTime) -> Value {
    qmp_proto::timestamped(serde_json::to_value(e).expect("events serialise"), at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_events_carry_a_timestamp() {
        let e = quorum_engine::Event::ResyncCompleted {
            node_name: "replica-1".into(),
            bytes: 4096,
        };
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000);
        assert_eq!(
            event(&e, at),
            json!({"event": "QUORUM_RESYNC_COMPLETED",
                   "data": {"node-name": "replica-1", "bytes": 4096},
                   "timestamp": {"seconds": 1, "microseconds": 500000}})
        );
    }
}
